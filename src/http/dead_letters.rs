//! Dead letters, cluster-wide: each node stores the dead letters of the instances it ran, and any
//! node lists and replays all of them.
//!
//! `GET /v1/dead-letters` asks every other member for its page (`scope=local`, with the caller's
//! `Authorization` header) and merges the pages by dead-letter id (ids are time-ordered ULIDs, so
//! `after` pages through the merged list). Members that do not answer are named in the
//! `x-herald-unreachable` response header instead of failing the listing.
//! `POST /v1/dead-letters/{id}/replay` replays the dead letter where it is stored: here, or on
//! the first member that has it.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::Value;

use super::{authorize, ApiError, State};
use crate::config::Role;

/// How long a member may take to answer a fanned-out request.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Query of `GET /v1/dead-letters`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
pub(super) struct DeadLetterQuery {
    /// Only this topic.
    topic: Option<String>,
    /// Only this group.
    group: Option<String>,
    /// Page after this dead-letter id.
    after: Option<String>,
    /// Page size (default 100, at most 1000).
    limit: Option<usize>,
    /// `local`: only this node's dead letters (what nodes ask each other); default: the cluster's.
    scope: Option<String>,
}

/// Query of `POST /v1/dead-letters/{id}/replay`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
pub(super) struct ReplayQuery {
    /// `local`: only look on this node; default: on every member.
    scope: Option<String>,
}

fn local_only(scope: &Option<String>) -> Result<bool, ApiError> {
    match scope.as_deref() {
        None | Some("cluster") => Ok(false),
        Some("local") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("scope must be `local` or `cluster`, not {other:?}"),
        )),
    }
}

/// A client for asking other members, carrying the caller's credentials.
fn peer_request(req: &HttpRequest, method: actix_web::http::Method, url: &str) -> awc::ClientRequest {
    let client = awc::Client::builder().timeout(PEER_TIMEOUT).finish();
    let mut r = client.request(method, url);
    if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        r = r.insert_header((header::AUTHORIZATION, auth.clone()));
    }
    r
}

#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead letters", params(DeadLetterQuery),
    responses((status = 200, description = "Dead letters of every member, oldest first", body = [crate::ingress::DeadLetter])))]
pub(super) async fn list(
    req: HttpRequest,
    q: web::Query<DeadLetterQuery>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 1000",
        ));
    }
    let local = state
        .core
        .ingress()
        .dead_letters(q.after.as_deref(), limit, q.topic.as_deref(), q.group.as_deref())
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()))?;
    let mut all: Vec<Value> = local
        .into_iter()
        .map(|d| serde_json::to_value(d).unwrap_or(Value::Null))
        .collect();
    let mut unreachable = Vec::new();
    if !local_only(&q.scope)? {
        let mut query: Vec<(&str, String)> = vec![("scope", "local".into()), ("limit", limit.to_string())];
        for (k, v) in [("topic", &q.topic), ("group", &q.group), ("after", &q.after)] {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        let asks = state.core.other_members_http().into_iter().map(|(id, http)| {
            let r = peer_request(
                &req,
                actix_web::http::Method::GET,
                &format!("http://{http}/v1/dead-letters"),
            );
            let query = query.clone();
            async move {
                let answer = async {
                    let mut resp = r
                        .query(&query)
                        .map_err(|e| e.to_string())?
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if !resp.status().is_success() {
                        return Err(format!("status {}", resp.status()));
                    }
                    resp.json::<Vec<Value>>()
                        .limit(64 << 20)
                        .await
                        .map_err(|e| e.to_string())
                }
                .await;
                (id, answer)
            }
        });
        for (id, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Ok(list) => all.extend(list),
                Err(e) => {
                    tracing::warn!(peer = id, error = %e, "cannot list a member's dead letters");
                    unreachable.push(id.to_string());
                }
            }
        }
        all.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        all.dedup_by(|a, b| a["id"] == b["id"]);
        all.truncate(limit);
    }
    let mut resp = HttpResponse::Ok();
    if !unreachable.is_empty() {
        resp.insert_header(("x-herald-unreachable", unreachable.join(",")));
    }
    Ok(resp.json(all))
}

#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", tag = "dead letters", params(("id" = String, Path), ReplayQuery),
    responses((status = 202, description = "Sent back to its subscription"), (status = 404, description = "No such dead letter", body = super::error::ErrorBody)))]
pub(super) async fn replay(
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<ReplayQuery>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let id = path.into_inner();
    match state.core.ingress().replay_dead_letter(&id).await {
        Ok(event_id) => return Ok(HttpResponse::Accepted().json(serde_json::json!({ "id": id, "event_id": event_id }))),
        Err(crate::ingress::ReplayError::NotFound(_)) if !local_only(&q.scope)? => {}
        Err(e) => return Err(e.into()),
    }
    for (peer, http) in state.core.other_members_http() {
        let url = format!("http://{http}/v1/dead-letters/{id}/replay?scope=local");
        match peer_request(&req, actix_web::http::Method::POST, &url).send().await {
            Ok(mut resp) if resp.status() != StatusCode::NOT_FOUND => {
                let body = resp.body().limit(1 << 20).await.unwrap_or_default();
                return Ok(HttpResponse::build(resp.status())
                    .content_type("application/json")
                    .body(body));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(peer, error = %e, "cannot ask a member to replay a dead letter"),
        }
    }
    Err(ApiError::not_found(format!(
        "no dead letter {id} on any reachable member"
    )))
}
