//! Dead letters, cluster-wide: each node stores the dead letters of the instances it ran, and any
//! node lists and replays all of them.
//!
//! `GET /v1/dead-letters` asks every other member for its page over the peer transport
//! (`NodeCore::cluster_dead_letters`: authenticated peers, no user token leaves this node) and
//! merges the pages by dead-letter id (ids are time-ordered ULIDs, so `after` pages through the
//! merged list). Members that do not answer are named in the `x-herald-unreachable` response
//! header instead of failing the listing. `POST /v1/dead-letters/{id}/replay` replays the dead
//! letter where it is stored: here, or on the first member that has it.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{authorize, ApiError, State};
use crate::config::Role;
use crate::control::DeadLettersError;

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
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `local`: only this node's dead letters (what nodes ask each other); default (`cluster`): the cluster's.
    scope: Option<Scope>,
}

/// Query of `POST /v1/dead-letters/{id}/replay`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
pub(super) struct ReplayQuery {
    /// `local`: only look on this node; default (`cluster`): on every member.
    scope: Option<Scope>,
}

/// The answer to a replay.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct ReplayAnswer {
    /// The dead letter's id.
    id: String,
    /// The id of the event sent back to its subscription.
    event_id: String,
}

/// Where a dead-letter route looks (another value answers 400 `invalid_query`).
#[derive(serde::Deserialize, utoipa::ToSchema, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub(super) enum Scope {
    /// Only this node.
    Local,
    /// Every member.
    #[default]
    Cluster,
}

fn local_only(scope: Option<Scope>) -> bool {
    scope.unwrap_or_default() == Scope::Local
}

#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead letters", params(DeadLetterQuery),
    responses((status = 200, description = "Dead letters of every member, oldest first; `x-herald-unreachable` names the members that did not answer", body = [crate::ingress::DeadLetter]),
              (status = 503, description = "The dead-letter store is unavailable (store_unavailable), or too many listings at once (busy)", body = super::error::ErrorBody)))]
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
    if local_only(q.scope) {
        let local = state
            .core
            .ingress()
            .dead_letters(q.after.as_deref(), limit, q.topic.as_deref(), q.group.as_deref())
            .map_err(store_unavailable)?;
        return Ok(HttpResponse::Ok().json(local));
    }
    let found = state
        .core
        .cluster_dead_letters(q.after.as_deref(), limit, q.topic.as_deref(), q.group.as_deref())
        .await
        .map_err(|e| match e {
            DeadLettersError::Store(e) => store_unavailable(e),
            e => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string()),
        })?;
    let mut resp = HttpResponse::Ok();
    if !found.unreachable.is_empty() {
        let names: Vec<String> = found.unreachable.iter().map(u64::to_string).collect();
        resp.insert_header(("x-herald-unreachable", names.join(",")));
    }
    Ok(resp.json(found.dead_letters))
}

fn store_unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string())
}

#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", tag = "dead letters", params(("id" = String, Path), ReplayQuery),
    responses((status = 202, description = "Sent back to its subscription", body = ReplayAnswer),
              (status = 404, description = "No such dead letter", body = super::error::ErrorBody),
              (status = 409, description = "Its subscription is gone (subscription_gone)", body = super::error::ErrorBody),
              (status = 503, description = "The dead-letter store is unavailable (store_unavailable)", body = super::error::ErrorBody)))]
pub(super) async fn replay(
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<ReplayQuery>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let id = path.into_inner();
    let replayed = if local_only(q.scope) {
        state.core.ingress().replay_dead_letter(&id).await?
    } else {
        match state.core.replay_dead_letter_anywhere(&id).await {
            Err(crate::ingress::ReplayError::NotFound(_)) => {
                return Err(ApiError::not_found(format!(
                    "no dead letter {id} on any reachable member"
                )))
            }
            r => r?,
        }
    };
    Ok(HttpResponse::Accepted().json(ReplayAnswer { id, event_id: replayed }))
}
