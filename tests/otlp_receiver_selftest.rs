//! Checks the test OTLP receiver (tests/common/otlp.rs) against the real
//! opentelemetry-otlp exporter, over both gRPC and HTTP/protobuf.

mod common;

use std::time::Duration;

use common::otlp::{AttrValue, OtlpReceiver, Protocol, ReceivedSpan};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

fn provider(exporter: SpanExporter) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder_empty()
                .with_service_name("selftest")
                .build(),
        )
        .build()
}

/// A parent with a child, attributes of each scalar type, an event and an error status.
/// Returns the parent's trace id in hex.
fn emit(provider: &SdkTracerProvider) -> String {
    let tracer = provider.tracer("selftest-scope");
    tracer.in_span("parent", |cx| {
        let span = cx.span();
        span.set_attribute(KeyValue::new("musetalk.job_id", "job-1"));
        span.set_attribute(KeyValue::new("musetalk.frames", 250i64));
        span.set_attribute(KeyValue::new("musetalk.fps", 25.5f64));
        span.set_attribute(KeyValue::new("musetalk.cached", true));
        span.add_event("stage.done", vec![KeyValue::new("stage", "decode")]);

        let mut child = tracer
            .span_builder("child")
            .with_kind(SpanKind::Client)
            .start_with_context(&tracer, &cx);
        child.set_attribute(KeyValue::new("process.exit_code", 1i64));
        child.set_status(Status::error("ffmpeg failed"));
        child.end();

        format!("{:032x}", span.span_context().trace_id())
    })
}

/// `force_flush` blocks until the batch is exported; the tonic exporter needs the
/// runtime's other threads meanwhile (DESIGN.md §10), hence spawn_blocking.
async fn flush(provider: &SdkTracerProvider) {
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .expect("force_flush");
}

fn check(spans: &[ReceivedSpan], trace_id: &str, via: Protocol) {
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let parent = spans.iter().find(|s| s.name == "parent").unwrap();
    let child = spans.iter().find(|s| s.name == "child").unwrap();
    for s in [parent, child] {
        assert_eq!(s.trace_id, trace_id);
        assert_eq!(s.via, via);
        assert_eq!(s.scope, "selftest-scope");
        assert_eq!(
            s.resource.get("service.name").and_then(AttrValue::as_str),
            Some("selftest")
        );
        assert_eq!(s.span_id.len(), 16);
        assert!(s.end_unix_nano >= s.start_unix_nano && s.start_unix_nano > 0);
        assert!(s.duration_secs() >= 0.0 && s.duration_secs() < 10.0);
    }
    assert_eq!(parent.parent_span_id, None);
    assert_eq!(
        child.parent_span_id.as_deref(),
        Some(parent.span_id.as_str())
    );

    assert_eq!(
        parent.attr("musetalk.job_id").and_then(AttrValue::as_str),
        Some("job-1")
    );
    assert_eq!(
        parent.attr("musetalk.frames").and_then(AttrValue::as_i64),
        Some(250)
    );
    assert_eq!(
        parent.attr("musetalk.fps").and_then(AttrValue::as_f64),
        Some(25.5)
    );
    assert_eq!(parent.attr("musetalk.cached"), Some(&AttrValue::Bool(true)));
    assert_eq!(parent.attr("musetalk.frames").unwrap().to_string(), "250");
    assert_eq!(parent.kind, 1, "internal");
    assert_eq!(parent.status_code, 0, "unset");
    let event = parent.event("stage.done").expect("event");
    assert_eq!(
        event.get("stage").and_then(AttrValue::as_str),
        Some("decode")
    );

    assert_eq!(child.kind, 3, "client");
    assert_eq!(child.status_code, 2, "error");
    assert_eq!(child.status_message, "ffmpeg failed");
    assert_eq!(
        child.attr("process.exit_code").and_then(AttrValue::as_i64),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exporter_spans_arrive_decoded() {
    let receiver = OtlpReceiver::start().await;
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(receiver.grpc_endpoint())
        .build()
        .unwrap();
    let provider = provider(exporter);
    let trace_id = emit(&provider);
    flush(&provider).await;

    let spans = receiver
        .wait_for(Duration::from_secs(5), |s| s.len() >= 2)
        .await;
    check(&spans, &trace_id, Protocol::Grpc);
    assert_eq!(receiver.trace(&trace_id).len(), 2);
    assert_eq!(receiver.requests_grpc(), 1);
    assert_eq!(receiver.requests_http(), 0);

    // Shutting down closes the exporter's open HTTP/2 connection too: the next
    // export fails instead of reaching a receiver that is meant to be gone.
    let started = std::time::Instant::now();
    receiver.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    emit(&provider);
    let p = provider.clone();
    let flushed = tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap();
    assert!(
        flushed.is_err(),
        "export to a stopped receiver should fail: {flushed:?}"
    );

    let p = provider.clone();
    let _ = tokio::task::spawn_blocking(move || p.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exporter_spans_arrive_decoded() {
    let receiver = OtlpReceiver::start().await;
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(receiver.http_traces_url())
        .build()
        .unwrap();
    let provider = provider(exporter);
    let trace_id = emit(&provider);
    flush(&provider).await;

    let spans = receiver
        .wait_for(Duration::from_secs(5), |s| s.len() >= 2)
        .await;
    check(&spans, &trace_id, Protocol::Http);
    assert_eq!(receiver.requests_http(), 1);
    assert_eq!(receiver.requests_grpc(), 0);

    // Dropping the receiver stops it too, a moment later (the signal is async).
    let url = receiver.http_traces_url();
    drop(receiver);
    // Polled rather than slept on: how soon the server task runs depends on load.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let outcome = reqwest::Client::new().post(&url).send().await;
        match outcome {
            Err(e) if e.is_connect() => break,
            other if tokio::time::Instant::now() >= deadline => {
                panic!("receiver still answers 5 s after drop: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_failing_and_shutdown_are_seen_by_the_exporter() {
    let receiver = OtlpReceiver::start().await;
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(receiver.http_traces_url())
        .with_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let provider = provider(exporter);

    // A delay longer than the exporter's timeout: the spans arrive, the flush fails.
    receiver.set_delay(Duration::from_secs(2));
    emit(&provider);
    let p = provider.clone();
    let flushed = tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap();
    assert!(flushed.is_err(), "flush should time out: {flushed:?}");
    assert!(receiver.requests_http() >= 1);
    receiver.set_delay(Duration::ZERO);

    // Failing answers are retried by the exporter, then reported as an error.
    receiver.clear();
    receiver.set_failing(true);
    emit(&provider);
    let p = provider.clone();
    let before = receiver.requests_http();
    let flushed = tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap();
    assert!(flushed.is_err(), "flush should fail: {flushed:?}");
    assert!(
        receiver.requests_http() > before + 1,
        "503 should be retried"
    );
    receiver.set_failing(false);

    // Unsupported bodies are refused with 415, not misparsed.
    let client = reqwest::Client::new();
    let resp = client
        .post(receiver.http_traces_url())
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    // After shutdown the port refuses connections: a collector that is down.
    let url = receiver.http_traces_url();
    receiver.shutdown().await;
    // A fresh client: the one above pools its keep-alive connection, and a
    // request on that closed-by-the-server socket fails as an incomplete
    // message rather than a refused connection.
    let err = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .send()
        .await
        .expect_err("receiver should be down");
    assert!(err.is_connect(), "{err:?}");

    let p = provider.clone();
    let _ = tokio::task::spawn_blocking(move || p.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_panics_with_received_names() {
    let receiver = OtlpReceiver::start().await;
    let outcome = tokio::spawn(async move {
        receiver
            .wait_for(Duration::from_millis(120), |s| !s.is_empty())
            .await;
    })
    .await;
    let panic = outcome.expect_err("should panic").into_panic();
    let msg = panic.downcast_ref::<String>().unwrap();
    assert!(msg.contains("0 span(s): []"), "{msg}");
}
