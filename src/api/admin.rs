//! Admin routes: `/metrics`, `/healthz`, `/readyz` (on the main or the admin listener).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::http::{AppState, Readiness};

/// Prometheus metrics.
///
/// OpenMetrics (with exemplars) when the scraper's `Accept` asks for it, as Prometheus
/// does; classic text 0.0.4 otherwise.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "admin",
    params(("Accept" = Option<String>, Header, description = "`application/openmetrics-text` for OpenMetrics 1.0 with exemplars; text 0.0.4 otherwise")),
    responses((status = 200, description = "The metrics: Prometheus text 0.0.4 (`text/plain; version=0.0.4; charset=utf-8`), or OpenMetrics 1.0 with exemplars (`application/openmetrics-text; version=1.0.0; charset=utf-8`) when asked for", content(
        (String = "text/plain"),
        (String = "application/openmetrics-text"),
    )))
)]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, body) = state.metrics.render(openmetrics);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `GET /healthz`: always `{"status": "ok"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// Alive: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "admin",
    responses((status = 200, description = "The process answers", body = Health))
)]
pub async fn healthz() -> impl IntoResponse {
    axum::Json(Health { status: "ok" })
}

/// Whether the service takes work.
///
/// Ready once the collector has its first sample, the backend is usable and the
/// service is not draining. 503 with the failing checks otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "admin",
    responses(
        (status = 200, description = "Ready: every check holds", body = Readiness),
        (status = 503, description = "Not ready: the checks say which condition fails", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let r = state.readiness();
    let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(r)).into_response()
}
