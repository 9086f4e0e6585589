//! The API's error body: `{"error": {"code": "snake_case", "message": "..."}}` with a 4xx/5xx status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::control::ControlError;
use crate::ingress::{PublishError, ReplayError};
use crate::subscription::SpecError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    /// The ids of the events concerned (the 504 of `ack=processed`: accepted, still delivered).
    ids: Option<Vec<String>>,
    /// The `Allow` header of a 405: the methods the path has.
    allow: Option<&'static str>,
}

/// The JSON error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case, for programs.
    pub code: String,
    /// For people: what is wrong and what to do.
    pub message: String,
    /// The ids of the events the error is about, when there are some: the `timeout` (504) of
    /// `ack=processed` lists the accepted events (one, or a batch's in order), which are still
    /// delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
}

impl ApiError {
    /// An error with a status, a stable code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            ids: None,
            allow: None,
        }
    }

    /// The stable code of the answer (`not_found`, `forbidden`, …).
    pub fn code(&self) -> &'static str {
        self.code
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
    }

    /// 405 for a method the path does not have; `allow` lists the ones it has (the `Allow` header).
    pub(crate) fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        ApiError {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} does not take {method}; it takes {allow}"),
            )
        }
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over the limit of {limit} bytes (http.max_body_bytes)"),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            r.insert_header(("Retry-After", s.to_string()));
        }
        if let Some(methods) = self.allow {
            r.insert_header((actix_web::http::header::ALLOW, methods));
        }
        r.json(ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                ids: self.ids.clone(),
            },
        })
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        let message = e.to_string();
        match e {
            PublishError::Invalid(_) => Self::bad_request("invalid_event", message),
            PublishError::Overloaded(_) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
            },
            PublishError::Unavailable(crate::ingress::StoreError::Full(_)) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::INSUFFICIENT_STORAGE, "storage_full", message)
            },
            PublishError::Unavailable(_) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "wal_unavailable", message)
            },
            PublishError::Timeout { ids, .. } => ApiError {
                ids: Some(ids),
                ..Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
            },
            PublishError::NotReady => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
            },
            PublishError::Removed => Self::new(StatusCode::SERVICE_UNAVAILABLE, "removed", message),
            PublishError::NotHere(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "subscription_unplaced", message),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        let code = match e {
            // One code for one mistake: a bad topic is `invalid_topic` here as when publishing.
            SpecError::Name(crate::event::EventError::InvalidName { what: "topic", .. }) => "invalid_topic",
            SpecError::Name(_) => "invalid_name",
            SpecError::UnknownHandler { .. } => "unknown_handler",
            SpecError::WebhookUrl { .. } => "invalid_webhook_url",
            SpecError::WebhookRefused { .. } => "webhook_refused",
            SpecError::Instances { .. } => "invalid_instances",
            SpecError::MaxAttempts(_) => "invalid_max_attempts",
        };
        Self::bad_request(code, e.to_string())
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid(s) => s.into(),
            ControlError::Unavailable(m) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            },
            ControlError::Conflict(m) => Self::new(StatusCode::CONFLICT, "last_member", m),
            ControlError::Refused { code, message } => Self::new(StatusCode::CONFLICT, code, message),
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        let message = e.to_string();
        match e {
            ReplayError::NotFound(_) => Self::not_found(message),
            ReplayError::SubscriptionGone(_) => Self::new(StatusCode::CONFLICT, "subscription_gone", message),
            ReplayError::Store(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::event::EventError;
    use crate::ingress::StoreError;

    /// Status, `Retry-After`, `Allow` and the JSON body of `e` as a client gets them.
    async fn answer(e: ApiError) -> (u16, Option<String>, Option<String>, serde_json::Value) {
        let r = e.error_response();
        let header = |name| r.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let (retry, allow) = (header("retry-after"), header("allow"));
        let status = r.status().as_u16();
        let body = actix_web::body::to_bytes(r.into_body()).await.unwrap();
        (status, retry, allow, serde_json::from_slice(&body).unwrap())
    }

    #[actix_rt::test]
    async fn every_publish_error_has_its_status_code_and_retry_advice() {
        let name = |what| EventError::InvalidName {
            what,
            name: "a b".into(),
        };
        let cases: Vec<(PublishError, u16, &str, Option<&str>)> = vec![
            (PublishError::Invalid(name("topic")), 400, "invalid_event", None),
            (
                PublishError::Overloaded("mailboxes full".into()),
                429,
                "overloaded",
                Some("1"),
            ),
            (
                PublishError::Unavailable(StoreError::Full("ENOSPC".into())),
                507,
                "storage_full",
                Some("1"),
            ),
            (
                PublishError::Unavailable(StoreError::Stopped),
                503,
                "wal_unavailable",
                Some("1"),
            ),
            (PublishError::NotReady, 503, "not_ready", Some("1")),
            // Removed for good: retrying this node does not help, so no Retry-After.
            (PublishError::Removed, 503, "removed", None),
            (
                PublishError::NotHere("t/g is unplaced".into()),
                503,
                "subscription_unplaced",
                None,
            ),
        ];
        for (e, status, code, retry) in cases {
            let message = e.to_string();
            let (got_status, got_retry, allow, body) = answer(e.into()).await;
            assert_eq!((got_status, got_retry.as_deref()), (status, retry), "{code}");
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["message"], message.as_str());
            assert!(body["error"].get("ids").is_none(), "{code}: ids only on a timeout");
            assert_eq!(allow, None);
        }
    }

    #[actix_rt::test]
    async fn a_processed_timeout_names_the_accepted_events_in_order() {
        let ids = vec!["b".to_string(), "a".to_string()];
        let e = PublishError::Timeout {
            after: Duration::from_millis(30),
            ids: ids.clone(),
        };
        let (status, retry, _, body) = answer(e.into()).await;
        assert_eq!((status, retry), (504, None));
        assert_eq!(body["error"]["code"], "timeout");
        assert_eq!(body["error"]["ids"], serde_json::json!(ids));
        assert!(body["error"]["message"].as_str().unwrap().contains("ids: b, a"));
    }

    #[actix_rt::test]
    async fn subscription_and_control_errors_keep_one_code_per_mistake() {
        let topic = SpecError::Name(EventError::InvalidName {
            what: "topic",
            name: "a b".into(),
        });
        let group = SpecError::Name(EventError::InvalidName {
            what: "group",
            name: "a b".into(),
        });
        let cases: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
            // A bad topic is `invalid_topic` when subscribing, as when publishing.
            (topic.into(), 400, "invalid_topic", None),
            (group.into(), 400, "invalid_name", None),
            (
                SpecError::Instances { got: 0, max: 64 }.into(),
                400,
                "invalid_instances",
                None,
            ),
            (
                ControlError::Unavailable("no leader".into()).into(),
                503,
                "unavailable",
                Some("1"),
            ),
            (
                ControlError::Conflict("only member".into()).into(),
                409,
                "last_member",
                None,
            ),
            (
                ControlError::Refused {
                    code: "member_up",
                    message: "node 2 is up; pass force=true".into(),
                }
                .into(),
                409,
                "member_up",
                None,
            ),
            (ReplayError::NotFound("x".into()).into(), 404, "not_found", None),
            (
                ReplayError::SubscriptionGone("t/g".into()).into(),
                409,
                "subscription_gone",
                None,
            ),
            (
                ReplayError::Store(StoreError::Stopped).into(),
                503,
                "store_unavailable",
                None,
            ),
        ];
        for (e, status, code, retry) in cases {
            let (got_status, got_retry, _, body) = answer(e).await;
            assert_eq!((got_status, got_retry.as_deref()), (status, retry), "{code}");
            assert_eq!(body["error"]["code"], code);
            assert!(
                !body["error"]["message"].as_str().unwrap().is_empty(),
                "{code}: a message for people"
            );
        }
    }

    #[actix_rt::test]
    async fn a_405_names_the_methods_the_path_takes_in_allow_and_in_the_body() {
        let (status, _, allow, body) =
            answer(ApiError::method_not_allowed("PUT", "/v1/subscriptions", "GET, POST")).await;
        assert_eq!((status, allow.as_deref()), (405, Some("GET, POST")));
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert_eq!(
            body["error"]["message"],
            "/v1/subscriptions does not take PUT; it takes GET, POST"
        );
        let (status, _, _, body) = answer(ApiError::too_large(1024)).await;
        assert_eq!(status, 413);
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("http.max_body_bytes"));
    }
}
