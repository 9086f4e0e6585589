//! Subscriptions: which handler gets the events of a topic, how many instances run it, and how
//! often a failing event is retried. Plain data plus validation; the router runs them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::event::{validate_name, EventError};

pub mod egress;

/// Which handler a subscription runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HandlerSpec {
    /// A Rust actor registered in the node binary with `NodeBuilder::handler(name, factory)`.
    Rust {
        /// The registered name.
        name: String,
    },
    /// The built-in webhook: POSTs each event as a structured CloudEvent; 2xx is success.
    Webhook {
        /// `http://` or `https://` URL (server certificates are checked against the Mozilla roots).
        url: String,
    },
    /// The built-in log handler: writes each event to the node's log.
    Log,
}

impl HandlerSpec {
    /// A short label for logs and metrics (`rust:audit`, `webhook`, `log`).
    pub fn label(&self) -> String {
        match self {
            HandlerSpec::Rust { name } => format!("rust:{name}"),
            HandlerSpec::Webhook { .. } => "webhook".to_string(),
            HandlerSpec::Log => "log".to_string(),
        }
    }
}

fn one() -> u32 {
    1
}

/// A subscription as users declare it (HTTP API, config file, `NodeBuilder::subscribe`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// The topic whose events it receives.
    pub topic: String,
    /// Its name within the topic; each group gets every event once.
    pub group: String,
    /// What handles the events.
    pub handler: HandlerSpec,
    /// How many handler instances run (each event goes to one of them).
    #[serde(default = "one")]
    pub instances: u32,
    /// Attempts before an event is dead-lettered; the node's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// Why a subscription was refused; each maps to a 4xx with its own code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A bad topic or group name.
    #[error(transparent)]
    Name(#[from] EventError),
    /// No Rust handler of that name is registered in this node binary.
    #[error(
        "unknown handler {name:?}; registered Rust handlers: {known}; built-in handlers: log \
         ({{\"kind\":\"log\"}}) and webhook ({{\"kind\":\"webhook\",\"url\":\"https://…\"}})"
    )]
    UnknownHandler {
        /// The requested name.
        name: String,
        /// The names that are registered, comma separated.
        known: String,
    },
    /// The webhook URL is not an absolute http(s) URL.
    #[error("invalid webhook url {url:?}: {reason}")]
    WebhookUrl {
        /// The refused URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The webhook's host is refused by the node's egress policy (`handlers.webhook_allow`,
    /// `handlers.webhook_deny`, the built-in rules).
    #[error("webhook url {url:?} is refused: {reason}")]
    WebhookRefused {
        /// The refused URL.
        url: String,
        /// Why, naming the rule.
        reason: String,
    },
    /// `instances` out of range.
    #[error("instances must be between 1 and {max} (got {got})")]
    Instances {
        /// The requested count.
        got: u32,
        /// The node's `handlers.max_instances`.
        max: u32,
    },
    /// `max_attempts` out of range.
    #[error("max_attempts must be between 1 and {MAX_ATTEMPTS} (got {0})")]
    MaxAttempts(u32),
}

/// Highest accepted `max_attempts`.
pub const MAX_ATTEMPTS: u32 = 1000;

impl SubscriptionSpec {
    /// A subscription of `topic`/`group` to the registered Rust handler `handler`, one instance.
    pub fn rust(topic: impl Into<String>, group: impl Into<String>, handler: impl Into<String>) -> Self {
        SubscriptionSpec {
            topic: topic.into(),
            group: group.into(),
            handler: HandlerSpec::Rust { name: handler.into() },
            instances: 1,
            max_attempts: None,
        }
    }

    /// Sets the number of instances.
    pub fn instances(mut self, n: u32) -> Self {
        self.instances = n;
        self
    }

    /// Sets `max_attempts`.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Checks names, counts and the handler. `has_handler` says whether a Rust handler name is
    /// registered; `known` lists them for the error message.
    pub fn validate(
        &self,
        max_instances: u32,
        has_handler: impl Fn(&str) -> bool,
        known: impl Fn() -> String,
    ) -> Result<(), SpecError> {
        validate_name("topic", &self.topic)?;
        validate_name("group", &self.group)?;
        if self.instances == 0 || self.instances > max_instances {
            return Err(SpecError::Instances {
                got: self.instances,
                max: max_instances,
            });
        }
        if let Some(n) = self.max_attempts {
            if n == 0 || n > MAX_ATTEMPTS {
                return Err(SpecError::MaxAttempts(n));
            }
        }
        match &self.handler {
            HandlerSpec::Rust { name } if !has_handler(name) => Err(SpecError::UnknownHandler {
                name: name.clone(),
                known: known(),
            }),
            HandlerSpec::Webhook { url } => validate_webhook_url(url),
            _ => Ok(()),
        }
    }

    /// Checks a webhook's host against the egress policy (other handlers pass).
    pub fn check_egress(&self, policy: &egress::EgressPolicy) -> Result<(), SpecError> {
        match &self.handler {
            HandlerSpec::Webhook { url } => policy.check_url(url).map_err(|e| SpecError::WebhookRefused {
                url: url.chars().take(200).collect(),
                reason: e.0,
            }),
            _ => Ok(()),
        }
    }
}

fn validate_webhook_url(raw: &str) -> Result<(), SpecError> {
    let bad = |reason: &str| SpecError::WebhookUrl {
        url: raw.chars().take(200).collect(),
        reason: reason.to_string(),
    };
    let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(bad(&format!("scheme {other:?} is not http or https"))),
    }
    if url.host().is_none() {
        return Err(bad("no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(spec: &SubscriptionSpec) -> Result<(), SpecError> {
        spec.validate(64, |n| n == "audit", || "audit".into())
    }

    #[test]
    fn accepts_a_good_spec_and_refuses_bad_ones() {
        let ok = SubscriptionSpec::rust("user.login", "audit", "audit").instances(4);
        assert_eq!(check(&ok), Ok(()));
        assert!(matches!(
            check(&ok.clone().instances(0)),
            Err(SpecError::Instances { .. })
        ));
        assert!(matches!(
            check(&ok.clone().instances(65)),
            Err(SpecError::Instances { .. })
        ));
        assert!(matches!(
            check(&ok.clone().max_attempts(0)),
            Err(SpecError::MaxAttempts(0))
        ));
        let unknown = SubscriptionSpec::rust("t", "g", "nope");
        assert!(matches!(check(&unknown), Err(SpecError::UnknownHandler { .. })));
        let mut hook = ok.clone();
        hook.handler = HandlerSpec::Webhook {
            url: "ftp://x/y".into(),
        };
        assert!(matches!(check(&hook), Err(SpecError::WebhookUrl { .. })));
        hook.handler = HandlerSpec::Webhook {
            url: "http://127.0.0.1:9/hook".into(),
        };
        assert_eq!(check(&hook), Ok(()));
        hook.handler = HandlerSpec::Webhook {
            url: "https://hooks.example.com/in".into(),
        };
        assert_eq!(check(&hook), Ok(()));
    }

    #[test]
    fn json_shape_matches_the_contract() {
        let s: SubscriptionSpec = serde_json::from_str(
            r#"{"topic":"t","group":"g","handler":{"kind":"webhook","url":"http://h/x"},"instances":2,"max_attempts":5}"#,
        )
        .unwrap();
        assert_eq!(s.instances, 2);
        assert_eq!(
            s.handler,
            HandlerSpec::Webhook {
                url: "http://h/x".into()
            }
        );
        let log: SubscriptionSpec =
            serde_json::from_str(r#"{"topic":"t","group":"g","handler":{"kind":"log"}}"#).unwrap();
        assert_eq!(log.instances, 1);
    }
}
