//! The JSON API's routes (jobs, avatars, admin probes, `/openapi.json`) and their handlers.
//!
//! A sibling of [`crate::ui`]: both take [`crate::http`]'s state, errors and auth, and
//! [`crate::http::app`] merges them. This layer knows jobs only through `jobs::JobManager`.

pub mod admin;
pub mod avatars;
pub mod jobs;
pub mod openapi;
pub mod stream;
pub mod upload;

use axum::Router;
use axum::middleware;
use axum::routing::{MethodFilter, MethodRouter};

use crate::http::{AppState, auth};

/// An HTTP method a route answers (GET also answers HEAD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

/// One route: method, path (axum's `{param}` syntax, the same as OpenAPI's) and handler.
struct Endpoint {
    method: Method,
    path: &'static str,
    handler: MethodRouter<AppState>,
}

fn ep<H, T>(method: Method, path: &'static str, handler: H) -> Endpoint
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    Endpoint { method, path, handler: axum::routing::on(method.filter(), handler) }
}

/// The API routes (jobs, avatars): the one list the router and [`route_table`] are built from.
/// Upload routes take `body_limit` bytes.
fn api_endpoints(body_limit: usize) -> Vec<Endpoint> {
    use axum::extract::DefaultBodyLimit;
    use Method::*;
    let upload = |mut e: Endpoint| {
        e.handler = e.handler.layer(DefaultBodyLimit::max(body_limit));
        e
    };
    vec![
        upload(ep(Post, "/v1/inference", jobs::inference)),
        ep(Get, "/v1/jobs", jobs::list),
        ep(Get, "/v1/jobs/{id}", jobs::status),
        ep(Delete, "/v1/jobs/{id}", jobs::cancel),
        ep(Get, "/v1/jobs/{id}/report", jobs::report),
        ep(Get, "/v1/jobs/{id}/output", jobs::output),
        ep(Get, "/v1/jobs/{id}/profile", jobs::profile),
        ep(Get, "/v1/jobs/{id}/events", jobs::events),
        upload(ep(Post, "/v1/avatars", avatars::prepare)),
        ep(Get, "/v1/avatars", avatars::list),
        ep(Get, "/v1/avatars/{id}", avatars::show),
        ep(Delete, "/v1/avatars/{id}", avatars::delete),
        upload(ep(Post, "/v1/avatars/{id}/speak", avatars::speak)),
    ]
}

/// Metrics and probes: on the main listener, or on `--admin-listen`.
fn admin_endpoints() -> Vec<Endpoint> {
    vec![ep(Method::Get, "/metrics", admin::metrics), ep(Method::Get, "/healthz", admin::healthz), ep(Method::Get, "/readyz", admin::readyz)]
}

/// The API description, on the main listener, without auth.
fn doc_endpoints() -> Vec<Endpoint> {
    vec![ep(Method::Get, "/openapi.json", openapi::openapi_json)]
}

/// Registers endpoints; two methods of one path share its method router.
fn register(r: Router<AppState>, endpoints: Vec<Endpoint>) -> Router<AppState> {
    endpoints.into_iter().fold(r, |r, e| r.route(e.path, e.handler))
}

/// Every `(method, path)` the service routes (API, admin, `/openapi.json`), from the same
/// lists the router is built from. The HTML status page (`crate::ui`) is not included.
pub fn route_table() -> Vec<(&'static str, &'static str)> {
    [api_endpoints(0), admin_endpoints(), doc_endpoints()].into_iter().flatten().map(|e| (e.method.as_str(), e.path)).collect()
}

/// `/metrics`, `/healthz`, `/readyz`: merged into the main router or served on `--admin-listen`.
pub fn admin_routes() -> Router<AppState> {
    register(Router::new(), admin_endpoints())
}

/// The API routes (jobs, avatars, behind the bearer auth) and `/openapi.json` (open), without admin routes.
pub fn routes(state: &AppState) -> Router<AppState> {
    // Two files at the per-part limit plus the small fields; each part is also checked as it streams.
    let body_limit = (state.config.max_upload_bytes.saturating_mul(2).saturating_add(1 << 20)).min(usize::MAX as u64) as usize;
    let api = register(Router::new(), api_endpoints(body_limit)).route_layer(middleware::from_fn_with_state(state.clone(), auth::require_bearer));
    register(api, doc_endpoints())
}
