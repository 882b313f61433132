//! The HTTP layer: routes, shared state, the middleware stack (HTTP spans, metrics, panics).
//!
//! `app(state)` builds the whole router so tests drive it with `oneshot`; `serve`
//! in `lib.rs` binds it. This layer knows jobs only through `jobs::JobManager`.

pub mod admin;
pub mod auth;
pub mod avatars;
pub mod error;
pub mod jobs;
pub mod openapi;
pub mod unread;
pub mod upload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::collector::CollectorHandle;
use crate::config::Config;
use crate::metrics::{HttpLabels, Metrics};
use crate::telemetry;
pub use error::{ApiError, ErrorBody, storage_error};

/// Result of the backend's readiness probe: `Ok(description)` or `Err(what is missing)`.
pub type BackendStatus = Arc<std::sync::RwLock<Result<String, String>>>;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub collector: CollectorHandle,
    pub backend_status: BackendStatus,
    /// Set on SIGTERM: /readyz turns 503 so load balancers stop sending work.
    pub draining: Arc<AtomicBool>,
    /// Whether spans are exported (for diagnostics).
    pub exporting: bool,
    pub jobs: Arc<crate::jobs::JobManager>,
    /// Bearer tokens for `/v1/*`; empty: no auth.
    pub auth: auth::Tokens,
}

impl AppState {
    pub fn readiness(&self) -> admin::Readiness {
        let mut checks = Vec::new();
        let sampled = self.collector.has_sample();
        checks.push(admin::ReadinessCheck {
            name: "collector",
            ok: sampled,
            detail: if sampled { "first resource sample taken".into() } else { "waiting for the first resource sample".into() },
        });
        let backend = self.backend_status.read().unwrap_or_else(|e| e.into_inner()).clone();
        checks.push(admin::ReadinessCheck {
            name: "backend",
            ok: backend.is_ok(),
            detail: match backend {
                Ok(d) => format!("{} backend usable: {d}", self.config.backend.as_str()),
                Err(e) => format!("{} backend not usable: {e}", self.config.backend.as_str()),
            },
        });
        // Realtime workers count only where they exist (preview needs none; off: not asked).
        let rt = &self.jobs.realtime;
        if rt.enabled() && rt.has_workers() {
            let r = rt.readiness();
            checks.push(admin::ReadinessCheck { name: "realtime_workers", ok: r.is_ok(), detail: r.unwrap_or_else(|e| e) });
        }
        let draining = self.draining.load(Ordering::Acquire);
        checks.push(admin::ReadinessCheck {
            name: "accepting",
            ok: !draining,
            detail: if draining { "shutting down: draining jobs".into() } else { "accepting jobs".into() },
        });
        admin::Readiness { ready: checks.iter().all(|c| c.ok), checks }
    }
}

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

fn admin_routes(r: Router<AppState>) -> Router<AppState> {
    register(r, admin_endpoints())
}

/// The API routes (jobs, avatars), without admin routes.
fn api_routes(state: &AppState) -> Router<AppState> {
    // Two files at the per-part limit plus the small fields; each part is also checked as it streams.
    let body_limit = (state.config.max_upload_bytes.saturating_mul(2).saturating_add(1 << 20)).min(usize::MAX as u64) as usize;
    register(Router::new(), api_endpoints(body_limit)).route_layer(middleware::from_fn_with_state(state.clone(), auth::require_bearer))
}

fn finish(r: Router<AppState>, state: AppState) -> Router {
    let r = r.fallback(error::not_found).method_not_allowed_fallback(error::method_not_allowed).with_state(state.clone());
    with_stack(r, state)
}

/// Admin routes alone (for a separate `--admin-listen` listener).
pub fn admin_router(state: AppState) -> Router {
    finish(admin_routes(Router::new()), state)
}

/// The whole service on one listener: API plus admin routes unless `--admin-listen` moves them.
pub fn app(state: AppState) -> Router {
    let mut r = register(api_routes(&state), doc_endpoints());
    if state.config.admin_listen.is_none() {
        r = admin_routes(r);
    }
    r = r.merge(crate::ui::routes(&state));
    finish(r, state)
}

/// The one middleware stack: every request gets a server span and a duration
/// observation; an answer given before the request body was read to its end says
/// `Connection: close`; a panicking handler becomes a JSON 500 and the service keeps running.
fn with_stack(router: Router, state: AppState) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn_with_state(state, http_telemetry))
            .layer(middleware::from_fn(unread::close_if_body_unread))
            .layer(CatchPanicLayer::custom(panic_response)),
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send>) -> Response {
    ApiError::internal("the request handler failed unexpectedly; the service keeps running").into_response()
}

/// HTTP server span per the OpenTelemetry HTTP conventions (`{METHOD} {route}`), with
/// the incoming `traceparent` honoured, and `http_server_request_duration_seconds`.
async fn http_telemetry(State(state): State<AppState>, req: Request, next: Next) -> Response {
    {
        let started = Instant::now();
        let method = req.method().as_str().to_string();
        let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
        let span_name = match &route {
            Some(r) => format!("{method} {r}"),
            None => method.clone(),
        };
        let span = tracing::info_span!(
            "http_request",
            otel.name = %span_name,
            otel.kind = "server",
            http.request.method = %method,
            http.route = tracing::field::Empty,
            url.path = %req.uri().path(),
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(r) = &route {
            span.record("http.route", r.as_str());
        }
        telemetry::set_parent(&span, telemetry::extract(req.headers()));
        let client = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.to_string());
        let response = next.run(req).instrument(span.clone()).await;
        let status = response.status().as_u16();
        // One line per refusal: what was refused, where, for whom; never the request's
        // content (5xx are logged with their detail where they are made).
        if response.status().is_client_error()
            && let Some(error::ErrorCode(code)) = response.extensions().get::<error::ErrorCode>()
        {
            let route = route.as_deref().unwrap_or("unmatched");
            tracing::info!(code, status, method = %method, route, client = client.as_deref().unwrap_or("unknown"), "request refused: {code} ({status}) on {method} {route}");
        }
        // i64, not u16: tracing-opentelemetry exports unsigned fields as strings.
        span.record("http.response.status_code", i64::from(status));
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        state
            .metrics
            .http_duration
            .get_or_create(&HttpLabels {
                http_request_method: method,
                http_route: route.unwrap_or_else(|| "unmatched".into()),
                http_response_status_code: status,
            })
            .observe(started.elapsed().as_secs_f64());
        response
    }
}
