//! The one mapping from failures to HTTP: `{"error": "<stable_code>", "detail": "<human text>"}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The JSON body of every error response.
#[derive(Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[schema(example = json!({"error": "job_not_found", "detail": "no job `0123abcd` (finished jobs are kept for --job-retention)"}))]
pub struct ErrorBody {
    /// Stable, machine-readable code (snake_case); each operation lists the codes it can answer.
    #[schema(pattern = "^[a-z][a-z0-9_]*$")]
    pub error: String,
    /// What went wrong and, where there is one, the fix.
    pub detail: String,
}

/// The stable code of an error response, carried to the HTTP middleware.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// An error on its way to the client: a status, a stable code, a detail, maybe Retry-After.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, code, detail: detail.into(), retry_after_secs: None }
    }
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, status = self.status.as_u16(), "{}", self.detail);
        }
        let body = ErrorBody { error: self.code.to_string(), detail: self.detail };
        let mut resp = (self.status, axum::Json(body)).into_response();
        // For the one log line per refusal the HTTP layer writes (it sees route and client).
        resp.extensions_mut().insert(ErrorCode(self.code));
        if let Some(s) = self.retry_after_secs {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        // `Connection: close` for refusals that leave an upload unread comes from the
        // `unread` middleware, which sees whether the body was read, whatever the status.
        resp
    }
}

/// Disk full is the client's to retry later (507), anything else is ours (500).
pub fn storage_error(e: std::io::Error, doing: &str) -> ApiError {
    if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", format!("{doing}: the data dir is full; free space and retry"))
    } else {
        ApiError::internal(format!("{doing}: {e}"))
    }
}


/// 404 for unknown routes, as JSON like every other error.
pub async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route; GET /openapi.json lists the API")
}

/// 405 for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not accept that method")
}
