//! `Connection: close` on answers given before the request body was read to its end.
//!
//! Handlers refuse uploads mid-body (a duplicate or unknown part, a bad field, a full
//! queue). The unread rest is still on the wire, so hyper will not reuse the connection,
//! but nothing tells the client: its pool may hand the connection out again, and its
//! next request then fails as an incomplete message (found as a test flake under load).
//! Saying `Connection: close` makes the client open a fresh one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

/// The middleware: wraps the request body to see whether it reached its end.
pub async fn close_if_body_unread(req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Body::new(Tracked { inner: body, ended: ended.clone() });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::Acquire) {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A body that records reaching its end.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::post;
    use tower::ServiceExt;

    fn app() -> Router {
        Router::new()
            .route("/ignore", post(|| async { StatusCode::BAD_REQUEST }))
            .route("/read", post(|body: Bytes| async move { body.len().to_string() }))
            .route("/get", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(close_if_body_unread))
    }

    async fn connection(method: &str, uri: &str, body: Body) -> Option<String> {
        let req = Request::builder().method(method).uri(uri).body(body).unwrap();
        let resp = app().oneshot(req).await.unwrap();
        resp.headers().get(header::CONNECTION).map(|v| v.to_str().unwrap().to_string())
    }

    /// A body of several chunks, as a real upload arrives.
    fn streamed() -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..4).map(|i| Ok(Bytes::from(vec![i; 1000]))).collect();
        Body::from_stream(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn only_a_refusal_that_leaves_the_body_unread_closes() {
        assert_eq!(connection("POST", "/ignore", streamed()).await.as_deref(), Some("close"));
        assert_eq!(connection("POST", "/read", streamed()).await, None, "a body read to its end keeps the connection");
        assert_eq!(connection("POST", "/ignore", Body::empty()).await, None, "nothing to leave unread");
        assert_eq!(connection("GET", "/get", Body::empty()).await, None);
    }
}
