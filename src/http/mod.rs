//! The HTTP API (its contract is the README's "HTTP API" section): routes, authentication, error mapping and the OpenAPI document.
//!
//! Handlers here parse and check requests, call the node (`NodeCore`, `Ingress`) and map results
//! to responses; they hold no business logic. Every error is a JSON body from [`error::ApiError`];
//! bodies are read with an explicit size limit so an oversized request gets a 413 before it is
//! buffered.

mod dead_letters;
pub mod error;
mod join_approval;
pub mod publish;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::dev::Service;
use actix_web::http::header;
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use futures_util::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

use crate::config::Role;
use crate::control::NodeCore;
use crate::error::{Error, Result};
use crate::subscription::SubscriptionSpec;
pub use error::ApiError;

/// What every route handler gets.
pub(crate) struct AppState {
    pub(crate) core: Arc<NodeCore>,
    pub(crate) http_addr: SocketAddr,
}

type State = web::Data<AppState>;

/// Binds the HTTP listener (port 0 picks a free port); returns it with the bound address.
pub(crate) fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr)> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| Error::io(format!("cannot bind HTTP address {addr}"), e))?;
    let http_addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the HTTP address", e))?;
    Ok((listener, http_addr))
}

/// Builds and starts the HTTP server for `core` on a bound listener.
pub(crate) fn server(
    core: Arc<NodeCore>,
    listener: std::net::TcpListener,
    http_addr: SocketAddr,
) -> Result<actix_web::dev::Server> {
    let state = web::Data::new(AppState { core, http_addr });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(
                web::QueryConfig::default()
                    .error_handler(|e, _| ApiError::bad_request("invalid_query", e.to_string()).into()),
            )
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e, _| ApiError::bad_request("invalid_path", e.to_string()).into()),
            )
            .wrap_fn(|req, srv| {
                // The request is read after the call: routing needs it unshared.
                srv.call(req).map(|res| {
                    match &res {
                        Ok(r) => count_request(Some(r.request()), r.status().as_u16()),
                        // Handlers' and extractors' errors arrive as responses; an error here
                        // left no request behind.
                        Err(e) => count_request(None, e.as_response_error().status_code().as_u16()),
                    }
                    res
                })
            })
            .configure(routes)
    })
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)
    .map_err(|e| Error::io(format!("cannot listen on {http_addr}"), e))?
    .run();
    Ok(server)
}

/// The pattern of a hot route, put in the request's extensions by the route itself, so counting
/// the request needs neither a second match of the path nor a metrics-registry lookup.
#[derive(Clone, Copy)]
struct HotRoute(&'static str);

const PUBLISH_ONE: &str = "/v1/topics/{topic}/events";
const PUBLISH_BATCH: &str = "/v1/topics/{topic}/events/batch";

/// A resource that tags its requests with its pattern (see [`HotRoute`]).
fn hot(
    pattern: &'static str,
) -> actix_web::Resource<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::resource(pattern).wrap_fn(move |req, srv| {
        req.extensions_mut().insert(HotRoute(pattern));
        srv.call(req)
    })
}

/// `herald_http_requests_total{route, status}` += 1. Hot routes use this thread's cached counter
/// handles; the others match the path again to find their pattern (`unmatched` when none does,
/// `unknown` for a response-less error).
fn count_request(req: Option<&HttpRequest>, status: u16) {
    thread_local! {
        static HOT: std::cell::RefCell<std::collections::HashMap<(&'static str, u16), metrics::Counter>> =
            Default::default();
    }
    let hot = req.and_then(|r| r.extensions().get::<HotRoute>().copied());
    match hot {
        Some(HotRoute(route)) => HOT.with(|cache| {
            cache
                .borrow_mut()
                .entry((route, status))
                .or_insert_with(|| {
                    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route, "status" => status.to_string())
                })
                .increment(1)
        }),
        None => {
            let route = match req {
                Some(r) => r.match_pattern().unwrap_or_else(|| "unmatched".to_string()),
                None => "unknown".to_string(),
            };
            metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route, "status" => status.to_string())
                .increment(1);
        }
    }
}

/// Every route of the API.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(hot(PUBLISH_ONE).route(web::post().to(publish::publish_one)))
        .service(hot(PUBLISH_BATCH).route(web::post().to(publish::publish_batch)))
        .route("/v1/subscriptions", web::get().to(list_subscriptions))
        .route("/v1/subscriptions", web::post().to(create_subscription))
        .route(
            "/v1/subscriptions/{topic}/{group}",
            web::delete().to(delete_subscription),
        )
        .route("/v1/cluster", web::get().to(cluster))
        .route("/v1/cluster/placements", web::get().to(placements))
        .route("/v1/cluster/nodes/{id}/drain", web::post().to(drain_node))
        .route("/v1/cluster/nodes/{id}", web::delete().to(remove_node))
        .route(
            "/v1/cluster/nodes/{id}/approve",
            web::post().to(join_approval::approve_join),
        )
        .route("/v1/dead-letters", web::get().to(dead_letters::list))
        .route("/v1/dead-letters/{id}/replay", web::post().to(dead_letters::replay))
        .route("/metrics", web::get().to(metrics_text))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/openapi.json", web::get().to(openapi))
        .default_service(web::to(|req: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError::not_found(format!("no route {} {}", req.method(), req.path())))
        }));
}

/// Checks the bearer token. With no tokens configured everything is allowed (the node is then
/// bound to loopback). Missing or unknown token → 401; a token without the role → 403.
pub(crate) fn authorize(req: &HttpRequest, state: &AppState, need: Role) -> Result<(), ApiError> {
    let tokens = &state.core.config().auth.tokens;
    if tokens.is_empty() {
        return Ok(());
    }
    let unauthorized = |m: &str| ApiError::new(actix_web::http::StatusCode::UNAUTHORIZED, "unauthorized", m);
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token> header"))?
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    let role = tokens
        .iter()
        .find(|t| constant_time_eq(t.token.as_bytes(), presented.trim().as_bytes()))
        .map(|t| t.role)
        .ok_or_else(|| unauthorized("unknown token"))?;
    if role >= need {
        Ok(())
    } else {
        Err(ApiError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token has role {role:?}; the request needs {need:?}"),
        ))
    }
}

/// Compares secrets without leaking the position of the first difference through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the body, refusing it with 413 as soon as it exceeds the limit.
pub(crate) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The request's media type, lower-cased, without parameters; `None` when absent.
pub(crate) fn media_type(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// Reads a JSON body into `T` (415 for another content type, 400 for bad JSON, 413 if too big).
async fn json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<T, ApiError> {
    match media_type(req) {
        None => {}
        Some(m) if crate::event::is_json(&m) => {}
        Some(m) => {
            return Err(ApiError::unsupported_media_type(format!(
                "expected application/json, got {m}"
            )))
        }
    }
    let body = read_body(req, payload, state.core.config().http.max_body_bytes).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

#[utoipa::path(get, path = "/v1/subscriptions", tag = "subscriptions",
    responses((status = 200, description = "The subscriptions", body = [SubscriptionSpec])))]
async fn list_subscriptions(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    Ok(HttpResponse::Ok().json(state.core.subscriptions()))
}

#[utoipa::path(post, path = "/v1/subscriptions", tag = "subscriptions", request_body = SubscriptionSpec,
    responses((status = 201, description = "Created or changed", body = SubscriptionSpec),
              (status = 200, description = "Already existed unchanged", body = SubscriptionSpec),
              (status = 400, description = "Invalid", body = error::ErrorBody)))]
async fn create_subscription(req: HttpRequest, payload: web::Payload, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let spec: SubscriptionSpec = json_body(&req, payload, &state).await?;
    let changed = state.core.create_subscription(spec.clone()).await?;
    let mut r = if changed {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(r.json(spec))
}

#[utoipa::path(delete, path = "/v1/subscriptions/{topic}/{group}", tag = "subscriptions",
    params(("topic" = String, Path), ("group" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such subscription", body = error::ErrorBody)))]
async fn delete_subscription(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let (topic, group) = path.into_inner();
    if state.core.delete_subscription(&topic, &group).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found(format!("no subscription {topic}/{group}")))
    }
}

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "Members and leader", body = crate::control::ClusterView)))]
async fn cluster(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    Ok(HttpResponse::Ok().json(state.core.cluster(state.http_addr)))
}

#[utoipa::path(get, path = "/v1/cluster/placements", tag = "cluster",
    responses((status = 200, description = "Where each subscription runs", body = [crate::control::PlacementView])))]
async fn placements(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    Ok(HttpResponse::Ok().json(state.core.placements()))
}

#[utoipa::path(post, path = "/v1/cluster/nodes/{id}/drain", tag = "cluster", params(("id" = u64, Path)),
    responses((status = 202, description = "Draining: its instances move to other nodes"),
              (status = 404, description = "No such member", body = error::ErrorBody)))]
async fn drain_node(req: HttpRequest, path: web::Path<u64>, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let id = path.into_inner();
    if state.core.drain_node(id).await? {
        Ok(HttpResponse::Accepted().json(serde_json::json!({ "id": id, "status": "draining" })))
    } else {
        Err(ApiError::not_found(format!("no member {id}")))
    }
}

#[utoipa::path(delete, path = "/v1/cluster/nodes/{id}", tag = "cluster", params(("id" = u64, Path)),
    responses((status = 204, description = "Removed from the cluster"),
              (status = 404, description = "No such member", body = error::ErrorBody)))]
async fn remove_node(req: HttpRequest, path: web::Path<u64>, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Admin)?;
    let id = path.into_inner();
    if state.core.remove_node(id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found(format!("no member {id}")))
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
async fn metrics_text(state: State) -> Result<HttpResponse, ApiError> {
    let text = state.core.render_metrics().ok_or_else(|| {
        ApiError::not_found(
            "no metrics recorder is installed in this process (call herald::metrics::install_prometheus)",
        )
    })?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process serves HTTP")))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "WAL replayed, ready"), (status = 503, description = "Not ready yet", body = error::ErrorBody)))]
async fn readyz(state: State) -> Result<HttpResponse, ApiError> {
    let unready = |m: &str| ApiError::new(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "not_ready", m);
    if !state.core.membership().is_running() {
        Err(unready(
            "the membership service has stopped (see the log); restart the node",
        ))
    } else if !state.core.ingress().is_ready() {
        Err(unready("joining the cluster and replaying the write-ahead log"))
    } else if let Some(problem) = state.core.membership().unready_reason() {
        Err(unready(&problem.to_string()))
    } else {
        Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })))
    }
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

/// The OpenAPI document, generated from the route handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "Herald", description = "Actor-based distributed event processing runtime"),
    paths(
        publish::publish_one, publish::publish_batch,
        list_subscriptions, create_subscription, delete_subscription,
        cluster, placements, drain_node, remove_node, dead_letters::list, dead_letters::replay,
        metrics_text, healthz, readyz, join_approval::approve_join
    ),
    components(schemas(
        SubscriptionSpec, crate::subscription::HandlerSpec, crate::ingress::Published,
        crate::ingress::SubscriptionOutcome, crate::ingress::DeadLetter, crate::ingress::AckMode,
        crate::control::ClusterView, crate::control::MemberView, crate::control::PlacementView,
        error::ErrorBody, error::ErrorDetail, publish::BatchAnswer, crate::control::PendingJoinView
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
