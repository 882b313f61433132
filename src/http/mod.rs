//! The HTTP layer's shared parts: state, errors, auth, the middleware stack, and [`app`],
//! which merges the sibling routers [`crate::api`] (JSON) and [`crate::ui`] (HTML).

pub mod auth;
pub mod error;
mod state;
pub mod unread;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{Buckets, HTTP_BUCKETS, registered};
use crate::telemetry;
use crate::{api, ui};
pub use error::{ApiError, ErrorBody, storage_error};
pub use state::{AppState, BackendStatus, Check, Readiness, ReadinessCheck};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub http_request_method: String,
    /// The route template (`/v1/jobs/{id}`), never the raw path.
    pub http_route: String,
    pub http_response_status_code: u16,
}

/// The HTTP layer's families.
#[derive(Debug)]
pub struct HttpFamilies {
    pub duration: Family<HttpLabels, Histogram, Buckets>,
}

impl HttpFamilies {
    pub fn new(r: &mut Registry) -> Self {
        HttpFamilies { duration: registered(r, "http_server_request_duration", "HTTP server request duration.", Some(Unit::Seconds), Buckets::family(HTTP_BUCKETS)) }
    }
}

fn finish(r: Router<AppState>, state: AppState) -> Router {
    let r = r.fallback(error::not_found).method_not_allowed_fallback(error::method_not_allowed).with_state(state.clone());
    with_stack(r, state)
}

/// Admin routes alone (for a separate `--admin-listen` listener).
pub fn admin_router(state: AppState) -> Router {
    finish(api::admin_routes(), state)
}

/// The whole service on one listener: the API, the status page, and the admin routes
/// unless `--admin-listen` moves them. The one place the sibling routers are merged.
pub fn app(state: AppState) -> Router {
    let mut r = api::routes(&state).merge(ui::routes(&state));
    if state.config.admin_listen.is_none() {
        r = r.merge(api::admin_routes());
    }
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
            .http
            .duration
            .get_or_create(&HttpLabels {
                http_request_method: method,
                http_route: route.unwrap_or_else(|| "unmatched".into()),
                http_response_status_code: status,
            })
            .observe(started.elapsed().as_secs_f64());
        response
    }
}
