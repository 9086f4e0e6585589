//! The HTTP API (its contract is the README's "HTTP API" section): routes, authentication, error mapping and the OpenAPI document.
//!
//! Handlers here parse and check requests, call the node (`NodeCore`, `Ingress`) and map results
//! to responses; they hold no business logic. Every error is a JSON body from [`error::ApiError`];
//! bodies are read with an explicit size limit so an oversized request gets a 413 before it is
//! buffered.
//!
//! Every route declares the scope it needs through `authorize` (`publish`, `read`, `admin`;
//! tokens are compared by SHA-256 in constant time). Routes that change the cluster,
//! subscriptions or dead letters go through `admin_action`, which also writes the `herald::audit`
//! line. The server speaks TLS when `http.tls_cert` is set ([`tls`]).

mod dashboard;
mod dead_letters;
pub mod error;
mod join_approval;
pub mod publish;
mod series;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Service;
use actix_web::http::header;
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use futures_util::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

use crate::config::{Role, Scopes};
use crate::control::NodeCore;
use crate::error::{Error, Result};
use crate::subscription::SubscriptionSpec;
pub use error::ApiError;

/// What every route handler gets.
pub(crate) struct AppState {
    pub(crate) core: Arc<NodeCore>,
    pub(crate) http_addr: SocketAddr,
    /// The accepted tokens, hashed once at start (empty: no auth).
    tokens: Vec<Arc<Credential>>,
    /// The dashboard's last ten minutes of rates (`GET /v1/stats/series`).
    history: Arc<series::History>,
}

/// An accepted token, as [`authorize`] checks it.
pub(crate) struct Credential {
    /// SHA-256 of the token.
    digest: [u8; 32],
    scopes: Scopes,
    /// For audit lines; never the token.
    name: String,
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

/// Builds and starts the HTTP server for `core` on a bound listener: over TLS when
/// `http.tls_cert` is set (see [`tls`]), else plain HTTP.
pub(crate) fn server(
    core: Arc<NodeCore>,
    listener: std::net::TcpListener,
    http_addr: SocketAddr,
) -> Result<actix_web::dev::Server> {
    let tls = tls::server_config(&core.config().http)?;
    let tokens = core
        .config()
        .auth
        .tokens
        .iter()
        .map(|t| {
            let digest = t
                .digest()
                .ok_or_else(|| Error::config("auth.tokens", "a hashed token is `sha256:` and 64 hex digits"))?;
            Ok(Arc::new(Credential {
                digest,
                scopes: t.role.clone(),
                name: t.display_name(),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let limits = core.config().http.clone();
    let (workers, per_worker) = connection_split(limits.max_connections);
    let history = Arc::new(series::History::default());
    actix_rt::spawn(series::sample(Arc::downgrade(&core), history.clone()));
    let state = web::Data::new(AppState {
        core,
        http_addr,
        tokens,
        history,
    });
    let app = move || {
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
    };
    let request_timeout = Duration::from_millis(limits.request_timeout_ms);
    let cannot_listen = |e| Error::io(format!("cannot listen on {http_addr}"), e);
    let server = match tls {
        // HTTPS: HTTP/1.1 only. actix-web's own TLS listener offers h2 by ALPN ahead of whatever
        // the config says, and h2 0.3 has a known denial of service (RUSTSEC-2026-0258), so the
        // listener is assembled here from the same parts with an HTTP/1 service: the config's
        // ALPN (`http/1.1`, see [`tls`]) is the only protocol offered, and a client offering
        // only h2 is refused in the handshake.
        Some(config) => {
            let host = http_addr.to_string();
            actix_server::Server::build()
                .workers(workers)
                .max_concurrent_connections(per_worker)
                .disable_signals()
                .shutdown_timeout(5)
                .listen("herald-https", listener, move || {
                    let host = host.clone();
                    actix_http::HttpService::build()
                        .client_request_timeout(request_timeout)
                        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
                        .h1(actix_service::map_config(app(), move |_| {
                            // What `HttpServer` gives an HTTPS app (secure, its host and address);
                            // actix-web keeps the constructor semver-exempt, so a version bump
                            // that changes it fails to compile here rather than misbehave.
                            actix_web::dev::AppConfig::__priv_test_new(true, host.clone(), http_addr)
                        }))
                        .rustls_0_23(config.clone())
                })
                .map_err(cannot_listen)?
                .run()
        }
        None => HttpServer::new(app)
            .disable_signals()
            .shutdown_timeout(5)
            .workers(workers)
            .max_connections(per_worker)
            .client_request_timeout(request_timeout)
            .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
            .listen(listener)
            .map_err(cannot_listen)?
            .run(),
    };
    Ok(server)
}

/// The pattern of a hot route, put in the request's extensions by the route itself, so counting
/// the request needs neither a second match of the path nor a metrics-registry lookup.
/// How long a closing connection may take to shut down (TLS close included) before it is dropped.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The HTTP workers and each one's connection cap for `http.max_connections`: one worker per
/// core but never more workers than connections, each capped at its share, so the node never
/// serves more than `max_connections` at once (actix-web's cap is per worker).
fn connection_split(max_connections: usize) -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = cores.min(max_connections).max(1);
    (workers, (max_connections / workers).max(1))
}

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

/// Every route of the API. Each path is one resource: a method it does not have answers 405 in
/// the error shape with `Allow` (keep `Allow` in step with the resource's routes), an unknown path
/// 404 in the error shape.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        hot(PUBLISH_ONE)
            .route(web::post().to(publish::publish_one))
            .default_service(other_methods("POST")),
    )
    .service(
        hot(PUBLISH_BATCH)
            .route(web::post().to(publish::publish_batch))
            .default_service(other_methods("POST")),
    )
    .service(
        web::resource("/v1/subscriptions")
            .route(web::get().to(list_subscriptions))
            .route(web::post().to(create_subscription))
            .default_service(other_methods("GET, POST")),
    )
    .service(
        web::resource("/v1/subscriptions/{topic}/{group}")
            .route(web::delete().to(delete_subscription))
            .default_service(other_methods("DELETE")),
    )
    .service(
        web::resource("/v1/cluster")
            .route(web::get().to(cluster))
            .default_service(other_methods("GET")),
    )
    .service(
        web::resource("/v1/cluster/placements")
            .route(web::get().to(placements))
            .default_service(other_methods("GET")),
    )
    .service(
        web::resource("/v1/cluster/nodes/{id}/drain")
            .route(web::post().to(drain_node))
            .default_service(other_methods("POST")),
    )
    .service(
        web::resource("/v1/cluster/nodes/{id}/undrain")
            .route(web::post().to(undrain_node))
            .default_service(other_methods("POST")),
    )
    .service(
        web::resource("/v1/cluster/nodes/{id}")
            .route(web::delete().to(remove_node))
            .default_service(other_methods("DELETE")),
    )
    .service(
        web::resource("/v1/cluster/nodes/{id}/approve")
            .route(web::post().to(join_approval::approve_join))
            .default_service(other_methods("POST")),
    )
    .service(
        web::resource("/v1/dead-letters")
            .route(web::get().to(dead_letters::list))
            .default_service(other_methods("GET")),
    )
    .service(
        web::resource("/v1/dead-letters/{id}/replay")
            .route(web::post().to(replay_dead_letter))
            .default_service(other_methods("POST")),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics_text))
            .default_service(other_methods("GET")),
    )
    .service(
        web::resource("/healthz")
            .route(web::get().to(healthz))
            .default_service(other_methods("GET")),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(readyz))
            .default_service(other_methods("GET")),
    )
    .service(
        web::resource("/openapi.json")
            .route(web::get().to(openapi))
            .default_service(other_methods("GET")),
    )
    .configure(dashboard::routes)
    .default_service(web::to(|req: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::not_found(format!("no route {} {}", req.method(), req.path())))
    }));
}

/// A resource's answer to the methods it does not have: 405 in the error shape, `Allow: allow`.
pub(crate) fn other_methods(allow: &'static str) -> actix_web::Route {
    web::to(move |req: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::method_not_allowed(req.method().as_str(), req.path(), allow))
    })
}

/// Who made a request: the token that [`authorize`] accepted.
#[derive(Clone)]
pub(crate) struct Caller(Option<Arc<Credential>>);

impl Caller {
    /// The token's name for audit lines (`anonymous` when the node has no tokens).
    pub(crate) fn name(&self) -> &str {
        self.0.as_ref().map_or("anonymous", |c| c.name.as_str())
    }

    /// 403 unless this caller may publish to `topic` (a `publish:<pattern>` token may not
    /// publish outside its patterns).
    pub(crate) fn check_topic(&self, topic: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(c) if !c.scopes.may_publish(topic) => Err(ApiError::new(
                actix_web::http::StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token {} may not publish to topic {topic:?} (its scopes: {})",
                    c.name, c.scopes
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether some topics may be refused to this caller (see [`Caller::check_topic`]).
    pub(crate) fn topic_limited(&self) -> bool {
        self.0.as_ref().is_some_and(|c| c.scopes.topic_limited())
    }
}

/// Checks the bearer token against the scope the route declares, and returns the caller. With no
/// tokens configured everything is allowed (the node is then bound to loopback). Missing or
/// unknown token → 401; a token without the scope → 403. The scheme name is case-insensitive
/// (RFC 7235); the token is hashed and compared in constant time with every accepted token's
/// hash, so plain and `sha256:` tokens are checked alike.
pub(crate) fn authorize(req: &HttpRequest, state: &AppState, need: Role) -> Result<Caller, ApiError> {
    if state.tokens.is_empty() {
        return Ok(Caller(None));
    }
    let cred = presented_token(req, state)?;
    if cred.scopes.grants(need) {
        Ok(Caller(Some(cred.clone())))
    } else {
        Err(ApiError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {} has scopes {}; the request needs {}",
                cred.name,
                cred.scopes,
                Scopes::from(need)
            ),
        ))
    }
}

/// The accepted token the request presents: 401 when there is none or it is unknown.
fn presented_token<'a>(req: &HttpRequest, state: &'a AppState) -> Result<&'a Arc<Credential>, ApiError> {
    let unauthorized = |m: &str| ApiError::new(actix_web::http::StatusCode::UNAUTHORIZED, "unauthorized", m);
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token> header"))?
        .to_str()
        .ok()
        .map(str::trim)
        .unwrap_or_default();
    let presented = value
        .split_once([' ', '\t'])
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    let digest = crate::config::sha256(presented.as_bytes());
    // Every token is compared, so the time taken does not tell which one matched.
    let mut found = None;
    for t in &state.tokens {
        if constant_time_eq(&t.digest, &digest) {
            found = Some(t);
        }
    }
    found.ok_or_else(|| unauthorized("unknown token"))
}

/// Compares secrets without leaking the position of the first difference through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Logs an admin action as a structured audit event (target `herald::audit`, INFO): what was
/// done (`action`), by which token (`token`: its name, never the token), from where (`remote`:
/// the peer address of the connection), to what (`object`: a subscription key, node id or
/// dead-letter id) and how it ended (`outcome`: `ok`, or the error code of the answer).
pub(crate) fn audit(req: &HttpRequest, token: &str, action: &str, object: &str, outcome: &str) {
    let remote = req.peer_addr().map_or_else(|| "-".to_string(), |a| a.to_string());
    tracing::info!(target: "herald::audit", action, token, remote = %remote, object, outcome, "admin action");
}

/// An admin route's frame: checks the admin scope (a refusal is audited too, with the token's
/// name when the token is known), runs `action`, audits its outcome and returns its answer.
/// `object` names what is acted on; `act` may return a better name for it (e.g. from the body).
async fn admin_action<F, Fut>(
    req: &HttpRequest,
    state: &AppState,
    action: &'static str,
    object: String,
    act: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (Option<String>, Result<HttpResponse, ApiError>)>,
{
    let caller = match authorize(req, state, Role::Admin) {
        Ok(c) => c,
        Err(e) => {
            let name = token_name(req, state);
            audit(req, &name, action, &object, e.code());
            return Err(e);
        }
    };
    let (named, result) = act().await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    audit(req, caller.name(), action, named.as_deref().unwrap_or(&object), outcome);
    result
}

/// The name of the presented token if it is a known one (for auditing a refusal), else `-`.
fn token_name(req: &HttpRequest, state: &AppState) -> String {
    presented_token(req, state).map_or_else(|_| "-".to_string(), |t| t.name.clone())
}

/// Reads the body, refusing it with 413 as soon as it exceeds `http.max_body_bytes`, and with 408
/// when it has not all arrived within `http.body_timeout_ms` (a client trickling its body cannot
/// hold a connection and its buffer for ever).
pub(crate) async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    http: &crate::config::HttpConfig,
) -> Result<web::Bytes, ApiError> {
    let deadline = Duration::from_millis(http.body_timeout_ms);
    tokio::time::timeout(deadline, read_body_within(req, payload, http.max_body_bytes))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                actix_web::http::StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms (http.body_timeout_ms)",
                    http.body_timeout_ms
                ),
            ))
        })
}

async fn read_body_within(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
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
    let body = read_body(req, payload, &state.core.config().http).await?;
    crate::event::check_json(&body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

#[utoipa::path(get, path = "/v1/subscriptions", tag = "subscriptions",
    responses((status = 200, description = "The subscriptions", body = [SubscriptionSpec])))]
async fn list_subscriptions(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Read)?;
    Ok(HttpResponse::Ok().json(state.core.subscriptions()))
}

#[utoipa::path(post, path = "/v1/subscriptions", tag = "subscriptions", request_body = SubscriptionSpec,
    responses((status = 201, description = "Created or changed", body = SubscriptionSpec),
              (status = 200, description = "Already existed unchanged", body = SubscriptionSpec),
              (status = 400, description = "Invalid", body = error::ErrorBody),
              (status = 503, description = "The cluster could not commit the change now (unavailable); see Retry-After", body = error::ErrorBody)))]
async fn create_subscription(req: HttpRequest, payload: web::Payload, state: State) -> Result<HttpResponse, ApiError> {
    admin_action(&req, &state, "create_subscription", "-".to_string(), || async {
        let spec: SubscriptionSpec = match json_body(&req, payload, &state).await {
            Ok(s) => s,
            Err(e) => return (None, Err(e)),
        };
        let key = Some(format!("{}/{}", spec.topic, spec.group));
        let result = state.core.create_subscription(spec.clone()).await;
        let answer = result.map_err(ApiError::from).map(|changed| {
            let mut r = if changed {
                HttpResponse::Created()
            } else {
                HttpResponse::Ok()
            };
            r.json(spec)
        });
        (key, answer)
    })
    .await
}

#[utoipa::path(delete, path = "/v1/subscriptions/{topic}/{group}", tag = "subscriptions",
    params(("topic" = String, Path), ("group" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such subscription", body = error::ErrorBody),
              (status = 503, description = "The cluster could not commit the change now (unavailable); see Retry-After", body = error::ErrorBody)))]
async fn delete_subscription(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let (topic, group) = path.into_inner();
    admin_action(
        &req,
        &state,
        "delete_subscription",
        format!("{topic}/{group}"),
        || async {
            let answer = match state.core.delete_subscription(&topic, &group).await {
                Ok(true) => Ok(HttpResponse::NoContent().finish()),
                Ok(false) => Err(ApiError::not_found(format!("no subscription {topic}/{group}"))),
                Err(e) => Err(e.into()),
            };
            (None, answer)
        },
    )
    .await
}

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "Members and leader", body = crate::control::ClusterView)))]
async fn cluster(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Read)?;
    Ok(HttpResponse::Ok().json(state.core.cluster(state.http_addr)))
}

#[utoipa::path(get, path = "/v1/cluster/placements", tag = "cluster",
    responses((status = 200, description = "Where each subscription runs", body = [crate::control::PlacementView])))]
async fn placements(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Read)?;
    Ok(HttpResponse::Ok().json(state.core.placements()))
}

#[utoipa::path(post, path = "/v1/cluster/nodes/{id}/drain", tag = "cluster", params(("id" = u64, Path)),
    responses((status = 202, description = "Draining: its instances move to other nodes", body = NodeStatus),
              (status = 404, description = "No such member", body = error::ErrorBody),
              (status = 503, description = "The cluster could not commit the change now (unavailable); see Retry-After", body = error::ErrorBody)))]
async fn drain_node(req: HttpRequest, path: web::Path<u64>, state: State) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    admin_action(&req, &state, "drain_node", id.to_string(), || async {
        let answer = match state.core.drain_node(id).await {
            Ok(true) => Ok(HttpResponse::Accepted().json(NodeStatus { id, status: "draining" })),
            Ok(false) => Err(ApiError::not_found(format!("no member {id}"))),
            Err(e) => Err(e.into()),
        };
        (None, answer)
    })
    .await
}

#[utoipa::path(post, path = "/v1/cluster/nodes/{id}/undrain", tag = "cluster", params(("id" = u64, Path)),
    responses((status = 200, description = "Up again: the leader gives it instances again", body = NodeStatus),
              (status = 404, description = "No such member", body = error::ErrorBody),
              (status = 409, description = "It is neither draining nor up (code not_draining)", body = error::ErrorBody),
              (status = 503, description = "The cluster could not commit the change now (unavailable); see Retry-After", body = error::ErrorBody)))]
async fn undrain_node(req: HttpRequest, path: web::Path<u64>, state: State) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    admin_action(&req, &state, "undrain_node", id.to_string(), || async {
        let answer = match state.core.undrain_node(id).await {
            Ok(true) => Ok(HttpResponse::Ok().json(serde_json::json!({ "id": id, "status": "up" }))),
            Ok(false) => Err(ApiError::not_found(format!("no member {id}"))),
            Err(e) => Err(e.into()),
        };
        (None, answer)
    })
    .await
}

/// Query of `DELETE /v1/cluster/nodes/{id}`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    /// Remove the node even though it is up and running (it then refuses new events with 503
    /// `removed` and hands over those it holds).
    force: Option<bool>,
}

#[utoipa::path(delete, path = "/v1/cluster/nodes/{id}", tag = "cluster", params(("id" = u64, Path), RemoveQuery),
    responses((status = 204, description = "Removed from the cluster"),
              (status = 404, description = "No such member", body = error::ErrorBody),
              (status = 409, description = "It is the only member (code last_member), or it is up and running and force is not set (code member_up)", body = error::ErrorBody),
              (status = 503, description = "The cluster could not commit the change now (unavailable); see Retry-After", body = error::ErrorBody)))]
async fn remove_node(
    req: HttpRequest,
    path: web::Path<u64>,
    query: web::Query<RemoveQuery>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let force = query.force.unwrap_or(false);
    admin_action(&req, &state, "remove_node", id.to_string(), || async {
        let answer = match state.core.remove_node(id, force).await {
            Ok(true) => Ok(HttpResponse::NoContent().finish()),
            Ok(false) => Err(ApiError::not_found(format!("no member {id}"))),
            Err(e) => Err(e.into()),
        };
        (None, answer)
    })
    .await
}

/// `POST /v1/dead-letters/{id}/replay` (see [`dead_letters::replay`]), audited.
async fn replay_dead_letter(
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<dead_letters::ReplayQuery>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path.as_str().to_string();
    admin_action(&req, &state, "replay_dead_letter", id, || async {
        (None, dead_letters::replay(req.clone(), path, q, state.clone()).await)
    })
    .await
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
async fn metrics_text(req: HttpRequest, state: State) -> Result<HttpResponse, ApiError> {
    if state.core.config().http.metrics_auth {
        authorize(&req, &state, Role::Read)?;
    }
    let text = state.core.render_metrics().ok_or_else(|| {
        ApiError::not_found(
            "no metrics recorder is installed in this process (call herald::metrics::install_prometheus)",
        )
    })?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process serves HTTP", body = Status)))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "WAL replayed, ready", body = Status), (status = 503, description = "Not ready yet (not_ready), the store refuses writes (storage_unhealthy), or the node was removed from its cluster (removed)", body = error::ErrorBody)))]
async fn readyz(state: State) -> Result<HttpResponse, ApiError> {
    let unready = |m: &str| ApiError::new(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "not_ready", m);
    if state.core.ingress().is_removed() {
        Err(ApiError::new(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "removed",
            "this node was removed from the cluster (DELETE /v1/cluster/nodes/{id}); it takes no events: stop it, \
             or restart it with --join to join again",
        ))
    } else if !state.core.membership().is_running() {
        Err(unready(
            "the membership service has stopped (see the log); restart the node",
        ))
    } else if !state.core.ingress().is_ready() {
        Err(unready("joining the cluster and replaying the write-ahead log"))
    } else if let Some(problem) = state.core.ingress().storage_problem() {
        Err(ApiError::new(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "storage_unhealthy",
            format!("the store refuses writes and recovers by itself when it can write again: {problem}"),
        ))
    } else if let Some(problem) = state.core.membership().unready_reason() {
        Err(unready(&problem.to_string()))
    } else {
        Ok(HttpResponse::Ok().json(Status { status: "ready" }))
    }
}

/// `{"status": …}` of `/healthz` (`ok`) and `/readyz` (`ready`).
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Status {
    status: &'static str,
}

/// `{"id": …, "status": …}`: a node's new state after drain (`draining`) or approval (`member`).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct NodeStatus {
    id: u64,
    status: &'static str,
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
        cluster, placements, drain_node, undrain_node, remove_node, dead_letters::list, dead_letters::replay,
        metrics_text, healthz, readyz, join_approval::approve_join, dashboard::series
    ),
    components(schemas(
        SubscriptionSpec, crate::subscription::HandlerSpec, crate::ingress::Published,
        crate::ingress::SubscriptionOutcome, crate::ingress::DeadLetter, crate::ingress::AckMode,
        crate::control::ClusterView, crate::control::MemberView, crate::control::PlacementView,
        error::ErrorBody, error::ErrorDetail, publish::BatchAnswer, crate::control::PendingJoinView,
        publish::CloudEventDoc, dead_letters::ReplayAnswer, dead_letters::Scope, NodeStatus, Status,
        series::SeriesView, series::TopicSeries, series::SubscriptionSeries
    )),
    modifiers(&BearerAuth, &ErrorResponses)
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

/// The error answers the frame of every route gives, added to each operation of the document that
/// does not describe them itself, all with the `{"error": …}` body: 401 and 403 (and the bearer
/// security requirement) where [`authorize`] runs, 400 where a path, query or header parameter
/// or a body is parsed, and 408, 413 and 415 where a body is read ([`read_body`], [`json_body`]).
struct ErrorResponses;

/// Paths whose operations need no token (`/metrics` needs one only with `http.metrics_auth`).
const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::SecurityRequirement;
        for (path, item) in openapi.paths.paths.iter_mut() {
            let open = OPEN_PATHS.contains(&path.as_str());
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                if open {
                    if path == "/metrics" {
                        error_response(
                            op,
                            401,
                            "With http.metrics_auth: missing or unknown token (unauthorized)",
                        );
                        error_response(
                            op,
                            403,
                            "With http.metrics_auth: the token lacks the read scope (forbidden)",
                        );
                    }
                } else {
                    op.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
                    error_response(op, 401, "Missing or unknown bearer token (unauthorized)");
                    error_response(op, 403, "The token lacks the scope this operation needs (forbidden)");
                }
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || op.request_body.is_some() {
                    error_response(
                        op,
                        400,
                        "Invalid request: a path, query or header parameter or the body (the code names which)",
                    );
                }
                if op.request_body.is_some() {
                    error_response(
                        op,
                        408,
                        "The body did not arrive within http.body_timeout_ms (request_timeout)",
                    );
                    error_response(op, 413, "The body is over http.max_body_bytes (payload_too_large)");
                    error_response(op, 415, "Unsupported content type (unsupported_media_type)");
                }
            }
        }
    }
}

/// Adds `status` with the `ErrorBody` schema to `op` unless it describes that status already.
fn error_response(op: &mut utoipa::openapi::path::Operation, status: u16, description: &str) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    op.responses.responses.entry(status.to_string()).or_insert_with(|| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
            .into()
    });
}
