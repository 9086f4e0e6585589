//! TLS for the HTTP API: the server's rustls configuration from `http.tls_cert`, `http.tls_key`
//! and `http.tls_client_ca` (ALPN `http/1.1` only: the API does not speak HTTP/2), and the client
//! configuration the CLI uses to trust a private CA.
//!
//! Both use the ring provider explicitly (never the process-wide default), so no other crypto
//! provider is ever pulled in or chosen by accident.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::HttpConfig;
use crate::error::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates of `path`; the error names `key` (the setting) and the file.
pub fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::config(key, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config(key, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::config(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The PEM private key of `path` (PKCS#8, PKCS#1 or SEC1); the error names `key` and the file.
pub fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).map_err(|e| Error::config(key, format!("cannot read {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| Error::config(key, format!("{} holds no valid PEM private key: {e}", path.display())))
}

/// A root store holding the certificates of `path`.
fn roots(key: &str, path: &Path) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for cert in load_certs(key, path)? {
        store
            .add(cert)
            .map_err(|e| Error::config(key, format!("{}: not a usable CA certificate: {e}", path.display())))?;
    }
    Ok(store)
}

/// The server's TLS configuration, or `None` when `http.tls_cert` is unset (plain HTTP).
pub(crate) fn server_config(http: &HttpConfig) -> Result<Option<rustls::ServerConfig>> {
    let (Some(cert), Some(key)) = (&http.tls_cert, &http.tls_key) else {
        return Ok(None);
    };
    let chain = load_certs("http.tls_cert", cert)?;
    let private = load_key("http.tls_key", key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("http.tls_cert", e.to_string()))?;
    let builder = match &http.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("http.tls_client_ca", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| Error::config("http.tls_client_ca", format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, private).map_err(|e| {
        Error::config(
            "http.tls_key",
            format!("{} does not fit {}: {e}", key.display(), cert.display()),
        )
    })?;
    // HTTP/1.1 only (the listener serves nothing else; see `http::server`): a client offering
    // only h2 is refused in the handshake rather than misunderstood after it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(config))
}

/// A client configuration trusting only the CA certificates of `ca_file` (`--ca-file`), and
/// presenting `client` (certificate chain and key files) when the server asks for one.
pub fn client_config(ca_file: &Path, client: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("--ca-file", e.to_string()))?
        .with_root_certificates(roots("--ca-file", ca_file)?);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("--client-cert", cert)?, load_key("--client-key", key)?)
            .map_err(|e| {
                Error::config(
                    "--client-key",
                    format!("{} does not fit {}: {e}", key.display(), cert.display()),
                )
            })?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
