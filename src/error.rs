//! The library's error type: one enum whose messages tell the user what to change.

use std::path::PathBuf;

/// Everything that can stop a Herald node from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; `key` names the offending setting (TOML key, flag and env var).
    #[error("invalid configuration `{key}`: {message}")]
    Config {
        /// The TOML key of the setting (e.g. `http.addr`).
        key: String,
        /// What is wrong with it and what would be accepted.
        message: String,
    },
    /// A configuration file could not be read or parsed.
    #[error("cannot read configuration file {path}: {message}")]
    ConfigFile {
        /// The file that was given with `--config` / `HERALD_CONFIG`.
        path: PathBuf,
        /// The underlying I/O or TOML error.
        message: String,
    },
    /// The embedded store (WAL, dead letters, subscriptions) failed.
    #[error("storage error in {path}: {message}")]
    Store {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        message: String,
    },
    /// A subscription declared at start-up is invalid or names an unknown handler.
    #[error("invalid subscription {topic}/{group}: {message}")]
    Subscription {
        /// The subscription's topic.
        topic: String,
        /// The subscription's group.
        group: String,
        /// Why it was refused.
        message: String,
    },
    /// Binding a listener or another OS-level operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What Herald was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Result` with Herald's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
