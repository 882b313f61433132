//! Admin routes: `/metrics`, `/healthz`, `/readyz` (on the main or the admin listener).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;

/// Prometheus exposition. OpenMetrics (with exemplars) when the scraper's `Accept`
/// asks for it, as Prometheus does; classic text 0.0.4 otherwise.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, body) = state.metrics.render(openmetrics);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Alive: the process answers.
pub async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

#[derive(Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Each condition and whether it holds.
    pub checks: Vec<ReadinessCheck>,
}

#[derive(Serialize)]
pub struct ReadinessCheck {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Ready once the collector has its first sample, the backend is usable and the
/// service is not draining. 503 with the failing checks otherwise.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let r = state.readiness();
    let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(r)).into_response()
}
