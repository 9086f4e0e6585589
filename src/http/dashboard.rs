//! The live dashboard at `/ui`: one page, its script and its style, embedded in the binary (no
//! CDN, no build step; it works offline), and the node's short metric history it charts
//! (`GET /v1/stats/series`, see [`super::series`]).
//!
//! The page itself holds no data and is served without a token; everything it shows comes from
//! the API with the token the user types into it (kept in the tab's `sessionStorage`): the `read`
//! scope for the views, `admin` for the dead letters and their replay. Its Content-Security-Policy
//! allows only this origin's script, style and connections.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{authorize, other_methods, ApiError, State};
use crate::config::Role;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Nothing from elsewhere: no remote script, style, font or connection, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// The dashboard's routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    let get = |path: &str, to: fn() -> HttpResponse| {
        web::resource(path)
            .route(web::get().to(move || async move { to() }))
            .default_service(other_methods("GET"))
    };
    cfg.service(get("/", || {
        HttpResponse::Found().insert_header((header::LOCATION, "/ui")).finish()
    }))
    .service(get("/ui", || asset("text/html; charset=utf-8", PAGE)))
    .service(get("/ui/app.js", || asset("text/javascript; charset=utf-8", SCRIPT)))
    .service(get("/ui/app.css", || asset("text/css; charset=utf-8", STYLE)))
    .service(
        web::resource("/v1/stats/series")
            .route(web::get().to(series))
            .default_service(other_methods("GET")),
    );
}

#[derive(serde::Deserialize)]
pub(crate) struct SeriesQuery {
    /// How many seconds back (at most the 600 kept).
    seconds: Option<usize>,
}

#[utoipa::path(get, path = "/v1/stats/series", tag = "operations",
    params(("seconds" = Option<usize>, Query, description = "How many seconds back (default 300, at most 600)")),
    responses(
        (status = 200, description = "This node's per-second rates per topic and subscription, and handler p99 per interval, over the last seconds", body = super::series::SeriesView),
        (status = 401, description = "No token or an unknown token", body = super::error::ErrorBody),
        (status = 403, description = "The token lacks the read scope", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn series(
    req: HttpRequest,
    state: State,
    q: web::Query<SeriesQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, Role::Read)?;
    let seconds = q.seconds.unwrap_or(300).min(super::series::KEEP);
    Ok(HttpResponse::Ok().json(state.history.view(seconds)))
}
