//! Logs and traces: `tracing` subscriber, OpenTelemetry tracer with the OTLP exporter, W3C propagation.
//!
//! A tracer provider is always installed, so every request has a real trace id (for
//! reports, exemplars and `traceparent` to children) even with no collector
//! configured; only the exporter is optional. Export runs on the SDK's batch thread
//! with a bounded queue: a collector that is down or slow costs dropped spans, never
//! request latency or unbounded memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat, OtlpProtocol};

/// The service name unless `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` say otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "musetalk-sidecar";
/// The instrumentation scope of every span this crate makes.
pub const SCOPE: &str = "musetalk-sidecar";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP span exporter for {endpoint}: {source}")]
    Exporter { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(String),
}

/// What the exporter did, process-wide: published on `/metrics` by `metrics.rs`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub spans_exported: AtomicU64,
    pub spans_dropped: AtomicU64,
}

static EXPORT_STATS: ExportStats = ExportStats { spans_exported: AtomicU64::new(0), spans_dropped: AtomicU64::new(0) };

/// Spans exported and dropped (export failed or timed out) since start.
pub fn export_stats() -> (u64, u64) {
    (EXPORT_STATS.spans_exported.load(Ordering::Relaxed), EXPORT_STATS.spans_dropped.load(Ordering::Relaxed))
}

/// Wraps the OTLP exporter: counts what is exported and dropped, and logs the collector
/// going away once (and coming back once), instead of an error per batch.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => {
                EXPORT_STATS.spans_exported.fetch_add(n, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("OTLP span export recovered");
                }
            }
            Err(e) => {
                EXPORT_STATS.spans_dropped.fetch_add(n, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!("OTLP span export failing ({e}); spans are dropped (counted in musetalk_telemetry_spans_dropped_total) until the collector answers again");
                }
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes pending spans.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl TelemetryGuard {
    /// True when spans leave the process (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes and stops the exporter. The SDK call blocks (it waits for the batch
    /// thread), so it runs on the blocking pool, never on an async worker.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry shutdown: {e}");
            }
        })
        .await;
    }
}

/// Where spans go, resolved from config and the standard `OTEL_*` variables.
fn exporter_target(config: &Config) -> Option<(OtlpProtocol, Option<String>)> {
    if let Some(base) = &config.otlp_endpoint {
        let endpoint = match config.otlp_protocol {
            OtlpProtocol::Grpc => base.clone(),
            // A base URL (as OTEL_EXPORTER_OTLP_ENDPOINT is defined) gets the signal path;
            // the exporter uses an endpoint given in code verbatim.
            OtlpProtocol::HttpProtobuf if base.trim_end_matches('/').ends_with("/v1/traces") => base.clone(),
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        };
        return Some((config.otlp_protocol, Some(endpoint)));
    }
    // The signal-specific variable alone also enables export; the exporter reads it itself.
    std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").map(|_| (config.otlp_protocol, None))
}

fn resource() -> Resource {
    let mut b = Resource::builder();
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named_by_env {
        b = b.with_service_name(DEFAULT_SERVICE_NAME);
    }
    b = b.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if let Ok(host) = hostname::get() {
        b = b.with_attribute(KeyValue::new("host.name", host.to_string_lossy().into_owned()));
    }
    b.with_attribute(KeyValue::new("host.arch", std::env::consts::ARCH)).with_attribute(KeyValue::new("os.type", std::env::consts::OS)).build()
}

fn counting<E>(inner: E) -> Counting<E> {
    Counting { inner, failing: AtomicBool::new(false) }
}

/// Builds the tracer provider: always sampling per `OTEL_TRACES_SAMPLER` (the SDK reads
/// it), exporting over OTLP when configured.
pub fn tracer_provider(config: &Config) -> Result<(SdkTracerProvider, bool), TelemetryError> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource());
    let target = exporter_target(config);
    if let Some((protocol, endpoint)) = &target {
        let shown = endpoint.clone().unwrap_or_else(|| "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into());
        let err = |source| TelemetryError::Exporter { endpoint: shown.clone(), source };
        let exporter: Counting<opentelemetry_otlp::SpanExporter> = match protocol {
            OtlpProtocol::Grpc => {
                let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                let b = match endpoint {
                    Some(e) => b.with_endpoint(e.clone()),
                    None => b,
                };
                counting(b.build().map_err(err)?)
            }
            OtlpProtocol::HttpProtobuf => {
                let b = opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                let b = match endpoint {
                    Some(e) => b.with_endpoint(e.clone()),
                    None => b,
                };
                counting(b.build().map_err(err)?)
            }
        };
        // The batch processor's queue (OTEL_BSP_MAX_QUEUE_SIZE, default 2048) bounds memory
        // when the collector is down; spans beyond it are dropped, never waited on.
        builder = builder.with_span_processor(BatchSpanProcessor::builder(exporter).build());
    }
    Ok((builder.build(), target.is_some()))
}

/// Installs logging and tracing for the process. Call once, inside the tokio runtime
/// (the gRPC exporter's channel binds to it).
pub fn init(config: &Config) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (provider, exporting) = tracer_provider(config)?;
    let tracer = provider.tracer(SCOPE);
    opentelemetry::global::set_tracer_provider(provider.clone());
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_current_span(true).with_writer(std::io::stderr).boxed(),
    };
    // Spans are exported whatever RUST_LOG says for log lines: the filter applies to fmt only,
    // and the otel layer takes every span at INFO and above.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_error_records_to_exceptions(true)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider, exporting })
}

/// The W3C trace context carried by `headers` (invalid or absent: an empty context).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers))
}

/// The trace id of a tracing span, 32 hex digits (all zero when no tracer is installed).
pub fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// `traceparent` value for a span: passed to pipeline processes and workers.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Sets a span's parent from an extracted context, if it carries a valid span.
pub fn set_parent(span: &tracing::Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Marks a span failed with a message (OpenTelemetry status Error).
pub fn set_error(span: &tracing::Span, message: impl Into<String>) {
    span.set_status(opentelemetry::trace::Status::error(message.into()));
}

/// Sets an attribute on the OpenTelemetry side of a span (for names `tracing` fields can't declare ahead).
pub fn set_attr(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    span.set_attribute(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_honours_valid_and_ignores_malformed_traceparent() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let cx = extract(&h);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in ["garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-xyz-00f067aa0ba902b7-01"] {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", bad.parse().unwrap());
            assert!(!extract(&h).span().span_context().is_valid(), "{bad}");
        }
    }

    #[test]
    fn http_endpoint_gets_the_signal_path() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            c: Config,
        }
        let c = Cli::parse_from(["x", "--otlp-endpoint", "http://h:4318/", "--otlp-protocol", "http/protobuf"]).c;
        assert_eq!(exporter_target(&c).unwrap().1.unwrap(), "http://h:4318/v1/traces");
        let c = Cli::parse_from(["x", "--otlp-endpoint", "http://h:4318/v1/traces", "--otlp-protocol", "http/protobuf"]).c;
        assert_eq!(exporter_target(&c).unwrap().1.unwrap(), "http://h:4318/v1/traces");
        let c = Cli::parse_from(["x", "--otlp-endpoint", "http://h:4317"]).c;
        assert_eq!(exporter_target(&c).unwrap(), (OtlpProtocol::Grpc, Some("http://h:4317".into())));
    }
}
