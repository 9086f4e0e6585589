//! `POST /v1/cluster/nodes/{id}/approve`: an admin admits a node whose join waits for approval
//! (`cluster.join_approval = "manual"`; the pending ones are listed in `/v1/cluster` as
//! `pending_joins`). The business logic is [`NodeCore::approve_join`](crate::control::NodeCore::approve_join).

use actix_web::{web, HttpRequest, HttpResponse};

use super::{admin_action, error, ApiError, State};

#[utoipa::path(post, path = "/v1/cluster/nodes/{id}/approve", tag = "cluster", params(("id" = u64, Path)),
    responses((status = 200, description = "Approved: the node is a member and is brought into the Raft group", body = super::NodeStatus),
              (status = 404, description = "No pending join of this node", body = error::ErrorBody),
              (status = 503, description = "The approval could not be committed", body = error::ErrorBody)))]
pub(super) async fn approve_join(
    req: HttpRequest,
    path: web::Path<u64>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    admin_action(&req, &state, "approve_join", id.to_string(), || async {
        let answer = match state.core.approve_join(id).await {
            Ok(true) => Ok(HttpResponse::Ok().json(super::NodeStatus { id, status: "member" })),
            Ok(false) => Err(ApiError::not_found(format!("no pending join of node {id}"))),
            Err(e) => Err(e.into()),
        };
        (None, answer)
    })
    .await
}
