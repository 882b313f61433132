//! In-process OTLP trace receiver for integration tests: decodes what the real
//! OpenTelemetry exporter sends over gRPC (tonic) and HTTP/protobuf (axum), and
//! keeps the spans in a flat, assertion-friendly form (DESIGN.md §8).
//!
//! Dropping the receiver shuts both servers down (listeners close, open
//! connections are told to go away), which is how tests simulate a collector
//! that has gone away; `shutdown().await` does the same and waits for it.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Far above anything a batch exporter sends (512 spans per batch by default), so
/// a big batch is never refused by the receiver's own size limits (axum defaults to
/// 2 MiB, tonic to 4 MiB).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

const PROTOBUF: &str = "application/x-protobuf";

/// Which transport delivered a span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

/// An attribute value. Arrays, key/value lists and bytes are kept as their
/// debug rendering in `Other`: the sidecar's contract only uses scalars.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Other(String),
}

impl AttrValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Ints are widened too, so a test need not care how a number was recorded.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            AttrValue::Double(d) => Some(*d),
            AttrValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            AttrValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn from_proto(value: Option<&AnyValue>) -> Self {
        match value.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => AttrValue::Str(s.clone()),
            Some(any_value::Value::IntValue(i)) => AttrValue::Int(*i),
            Some(any_value::Value::DoubleValue(d)) => AttrValue::Double(*d),
            Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
            Some(other) => AttrValue::Other(format!("{other:?}")),
            None => AttrValue::Other(String::new()),
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) | AttrValue::Other(s) => f.write_str(s),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// One span as received, flattened with its resource and scope.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// `None` for a root span (the wire format sends an empty id).
    pub parent_span_id: Option<String>,
    pub name: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: BTreeMap<String, AttrValue>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    /// (event name, event attributes), in recorded order.
    pub events: Vec<(String, BTreeMap<String, AttrValue>)>,
    pub resource: BTreeMap<String, AttrValue>,
    /// Instrumentation scope name.
    pub scope: String,
    pub via: Protocol,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    pub fn duration_secs(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e9
    }

    pub fn event(&self, name: &str) -> Option<&BTreeMap<String, AttrValue>> {
        self.events.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }
}

/// Shared between the receiver handle and both servers.
#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests_grpc: AtomicUsize,
    requests_http: AtomicUsize,
    delay_ms: AtomicU64,
    failing: AtomicBool,
}

impl Shared {
    /// Records a request's spans the moment it arrives, before any configured
    /// delay or failure: the receiver reports what reached it, not what the
    /// exporter believes was delivered.
    fn record(&self, request: &ExportTraceServiceRequest, via: Protocol) {
        let counter = match via {
            Protocol::Grpc => &self.requests_grpc,
            Protocol::Http => &self.requests_http,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let flat = flatten(request, via);
        self.spans.lock().unwrap().extend(flat);
    }

    /// Waits out the configured delay, then says whether to answer with success.
    /// A shutdown cuts the delay short and fails the request, so a dropped
    /// receiver never answers late.
    async fn answer_ok(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst));
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|down| *down) => return false,
            }
        }
        !self.failing.load(Ordering::SeqCst)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr_map(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), AttrValue::from_proto(kv.value.as_ref())))
        .collect()
}

fn flatten(request: &ExportTraceServiceRequest, via: Protocol) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attr_map(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            let scope = ss
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for span in &ss.spans {
                let status = span.status.clone().unwrap_or_default();
                out.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| hex(&span.parent_span_id)),
                    name: span.name.clone(),
                    kind: span.kind,
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    attributes: attr_map(&span.attributes),
                    status_code: status.code,
                    status_message: status.message,
                    events: span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attr_map(&e.attributes)))
                        .collect(),
                    resource: resource.clone(),
                    scope: scope.clone(),
                    via,
                });
            }
        }
    }
    out
}

/// The gRPC side: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
struct GrpcService {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.shared.record(request.get_ref(), Protocol::Grpc);
        if self.shared.answer_ok(&mut self.shutdown.clone()).await {
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        } else {
            // UNAVAILABLE is what a collector that is going away or overloaded answers.
            Err(tonic::Status::unavailable(
                "test receiver: failing or shut down",
            ))
        }
    }
}

#[derive(Clone)]
struct HttpState {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

/// The HTTP side: `POST /v1/traces` with a protobuf body (OTLP/HTTP binary).
async fn http_export(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let header_str = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    // Decoding gzip would need a decompressor this crate does not depend on; the
    // exporter only compresses when told to, so refuse loudly rather than misparse.
    let encoding = header_str(header::CONTENT_ENCODING);
    if !encoding.is_empty() && encoding != "identity" {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("test receiver: Content-Encoding {encoding:?} not supported"),
        )
            .into_response();
    }
    let content_type = header_str(header::CONTENT_TYPE);
    if !content_type.starts_with(PROTOBUF) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("test receiver: expected {PROTOBUF}, got {content_type:?}"),
        )
            .into_response();
    }
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("test receiver: bad protobuf: {e}"),
            )
                .into_response();
        }
    };
    state.shared.record(&request, Protocol::Http);
    if state.shared.answer_ok(&mut state.shutdown.clone()).await {
        (
            [(header::CONTENT_TYPE, PROTOBUF)],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "test receiver: failing or shut down",
        )
            .into_response()
    }
}

/// An OTLP trace receiver listening on two loopback ports, one per protocol.
pub struct OtlpReceiver {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds both servers on 127.0.0.1 with OS-chosen ports and starts them as
    /// tasks on the current runtime. The ports accept connections on return.
    pub async fn start() -> OtlpReceiver {
        let shared = Arc::new(Shared::default());
        let (shutdown, shutdown_rx) = watch::channel(false);

        // Bind before spawning so the endpoints are valid as soon as we return.
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP gRPC receiver");
        let grpc_addr = grpc_listener.local_addr().unwrap();
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP HTTP receiver");
        let http_addr = http_listener.local_addr().unwrap();

        let grpc_service = TraceServiceServer::new(GrpcService {
            shared: shared.clone(),
            shutdown: shutdown_rx.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut grpc_signal = shutdown_rx.clone();
        let grpc_task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener),
                    async move {
                        let _ = grpc_signal.wait_for(|down| *down).await;
                    },
                )
                .await
                .expect("OTLP gRPC receiver failed");
        });

        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
            .with_state(HttpState {
                shared: shared.clone(),
                shutdown: shutdown_rx.clone(),
            });
        let mut http_signal = shutdown_rx;
        let http_task = tokio::spawn(async move {
            axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_signal.wait_for(|down| *down).await;
                })
                .await
                .expect("OTLP HTTP receiver failed");
        });

        OtlpReceiver {
            shared,
            grpc_addr,
            http_addr,
            shutdown,
            tasks: vec![grpc_task, http_task],
        }
    }

    /// For `.with_tonic().with_endpoint(..)`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Base URL, for `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter appends `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Full URL, for `.with_http().with_endpoint(..)` (an endpoint set in code is used as given).
    pub fn http_traces_url(&self) -> String {
        format!("{}/v1/traces", self.http_endpoint())
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.spans.lock().unwrap().clone()
    }

    pub fn spans_named(&self, name: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// The spans of one trace (`trace_id` in lowercase hex).
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let trace_id = trace_id.to_ascii_lowercase();
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Polls every 50 ms until `f` accepts the spans received so far and returns
    /// them; panics after `timeout`, listing what did arrive.
    pub async fn wait_for<F: Fn(&[ReceivedSpan]) -> bool>(
        &self,
        timeout: Duration,
        f: F,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if f(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                panic!(
                    "OTLP receiver: condition not met within {timeout:?}; {} export request(s) \
                     ({} gRPC, {} HTTP) brought {} span(s): {names:?}",
                    self.requests(),
                    self.requests_grpc(),
                    self.requests_http(),
                    spans.len(),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Export calls received over both protocols (including ones answered with an error).
    pub fn requests(&self) -> usize {
        self.requests_grpc() + self.requests_http()
    }

    pub fn requests_grpc(&self) -> usize {
        self.shared.requests_grpc.load(Ordering::SeqCst)
    }

    pub fn requests_http(&self) -> usize {
        self.shared.requests_http.load(Ordering::SeqCst)
    }

    /// Delays every export answer by `d` (spans are still recorded on arrival).
    pub fn set_delay(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// While set, exports are answered with gRPC UNAVAILABLE / HTTP 503 (both
    /// retryable for the exporter); spans are still recorded on arrival.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.shared.spans.lock().unwrap().clear();
    }

    /// Stops both servers and waits (up to 5 s) until their listeners are closed
    /// and their connections drained.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        // Graceful rather than abort: aborting axum's accept task would leave its
        // already-spawned connection tasks serving. The signal reaches both
        // servers' connections, and cuts any delayed answer short.
        let _ = self.shutdown.send(true);
    }
}
