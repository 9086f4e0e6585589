//! The user-login example: a Rust handler actor registered in this binary's own `herald` CLI.
//!
//! ```text
//! cargo run --release --example user_login -- node            # a node with the audit-logins handler
//! curl -s -XPOST localhost:7070/v1/topics/user.login/events \
//!      -H 'content-type: application/json' \
//!      -d '{"user_id":42,"username":"ada","login_time":"2026-11-26T10:00:00Z"}'
//! cargo run --release --example user_login -- publish user.login \
//!      '{"user_id":7,"username":"grace","login_time":"2026-11-26T10:01:00Z"}' --key 7
//! ```
//!
//! The handler decodes each event into `UserLogin`; a body that does not decode fails the attempt
//! (retried, then dead-lettered: see `GET /v1/dead-letters`).

use herald::prelude::*;
use serde::Deserialize;

/// The event published on `user.login`.
#[derive(Debug, Deserialize)]
struct UserLogin {
    user_id: u64,
    username: String,
    login_time: chrono::DateTime<chrono::Utc>,
}

/// Counts logins per instance and logs each one.
#[derive(Default)]
struct AuditLogins {
    seen: u64,
}

impl Actor for AuditLogins {
    type Context = Context<Self>;
}

impl Handler<Delivery> for AuditLogins {
    type Result = HandlerResult;

    fn handle(&mut self, d: Delivery, _: &mut Context<Self>) -> HandlerResult {
        let login: UserLogin = d.event.json_data()?;
        self.seen += 1;
        tracing::info!(
            user_id = login.user_id,
            username = %login.username,
            login_time = %login.login_time,
            seen_by_this_instance = self.seen,
            attempt = d.attempt,
            "user logged in"
        );
        Ok(())
    }
}

// The allocator Herald is tuned for (optional, but several times faster under load than glibc's).
#[global_allocator]
static ALLOCATOR: herald::Allocator = herald::Allocator;

fn main() -> std::process::ExitCode {
    Node::builder()
        .handler("audit-logins", AuditLogins::default)
        // Three instances, spread over the nodes of the cluster: an event published to any node
        // goes to one of them (by key when it has one, else the least loaded of two).
        .subscription(SubscriptionSpec::rust("user.login", "audit", "audit-logins").instances(3))
        .main()
}
