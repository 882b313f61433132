//! End-to-end tests of the foundation against the REAL binary (DESIGN.md §4, §6, §8):
//! spans reach an OTLP receiver over gRPC and HTTP/protobuf, `/metrics` passes the
//! real `promtool` and is scraped by a real Prometheus, readiness, the admin
//! listener, graceful SIGTERM and configuration errors.
//!
//! Needs `ffmpeg`, `prometheus` and `promtool` on PATH (scripts/test.sh installs them).

mod common;

use std::time::{Duration, Instant};

use common::otlp::{AttrValue, OtlpReceiver, Protocol, ReceivedSpan};
use common::prometheus::{JOB, Prometheus, promtool};
use common::service::{Service, ServiceBuilder};

const SPAN_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh W3C trace id and parent span id (lowercase hex, never all-zero).
fn ids() -> (String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (trace, span)
}

fn attr<'a>(s: &'a ReceivedSpan, key: &str) -> &'a AttrValue {
    s.attr(key).unwrap_or_else(|| {
        panic!(
            "span {:?} has no attribute {key}: {:#?}",
            s.name, s.attributes
        )
    })
}

/// The server-span contract (DESIGN.md §4) checked on what the real exporter sent.
async fn server_span_contract(protocol: Protocol) {
    let receiver = OtlpReceiver::start().await;
    let args: Vec<String> = match protocol {
        Protocol::Grpc => vec!["--otlp-endpoint".into(), receiver.grpc_endpoint()],
        Protocol::Http => {
            vec![
                "--otlp-endpoint".into(),
                receiver.http_endpoint(),
                "--otlp-protocol".into(),
                "http/protobuf".into(),
            ]
        }
    };
    let svc = Service::start(args).await;
    let (trace, parent) = ids();

    // With traceparent: the server span joins the caller's trace.
    let r = svc
        .client()
        .get(svc.url("/healthz"))
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok", "{body}");

    // Without: a new root span.
    assert_eq!(svc.get("/healthz").await.status(), 200);

    // Unknown route: JSON error body.
    let r = svc.get("/no/such/route").await;
    assert_eq!(r.status(), 404);
    assert!(
        r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "route_not_found", "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "exactly {{error, detail}}: {body}"
    );

    let spans = receiver
        .wait_for(SPAN_TIMEOUT, |spans| {
            let healthz: Vec<_> = spans.iter().filter(|s| s.name == "GET /healthz").collect();
            healthz.iter().any(|s| s.trace_id == trace)
                && healthz.iter().any(|s| s.trace_id != trace)
        })
        .await;
    let joined = spans
        .iter()
        .find(|s| s.name == "GET /healthz" && s.trace_id == trace)
        .unwrap();
    assert_eq!(
        joined.parent_span_id.as_deref(),
        Some(parent.as_str()),
        "parent = the traceparent's span id"
    );
    assert_ne!(joined.span_id, parent);
    assert_eq!(joined.kind, 2, "SpanKind SERVER");
    assert_eq!(joined.via, protocol);
    assert_eq!(attr(joined, "http.request.method").as_str(), Some("GET"));
    assert_eq!(attr(joined, "http.route").as_str(), Some("/healthz"));
    assert_eq!(
        attr(joined, "http.response.status_code"),
        &AttrValue::Int(200),
        "http.response.status_code must be an int attribute (semconv), not a string: {joined:#?}"
    );
    assert_ne!(joined.status_code, 2, "a 200 is not an error");
    assert_eq!(
        joined
            .resource
            .get("service.name")
            .and_then(AttrValue::as_str),
        Some("musetalk-sidecar")
    );
    assert_eq!(
        joined
            .resource
            .get("service.version")
            .and_then(AttrValue::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(joined.end_unix_nano >= joined.start_unix_nano && joined.start_unix_nano > 0);

    let spans = receiver
        .wait_for(SPAN_TIMEOUT, |spans| {
            spans
                .iter()
                .any(|s| s.attr("url.path").and_then(AttrValue::as_str) == Some("/no/such/route"))
        })
        .await;
    let unknown = spans
        .iter()
        .find(|s| s.attr("url.path").and_then(AttrValue::as_str) == Some("/no/such/route"))
        .unwrap();
    assert_eq!(
        unknown.name, "GET",
        "no route matched: the span is named by the method alone"
    );
    assert_eq!(unknown.kind, 2);
    assert_eq!(
        unknown
            .attr("http.response.status_code")
            .map(ToString::to_string)
            .as_deref(),
        Some("404"),
        "{unknown:#?}"
    );
    assert_ne!(unknown.status_code, 2, "a 4xx is not a server-span error");

    let root = spans
        .iter()
        .find(|s| s.name == "GET /healthz" && s.trace_id != trace)
        .unwrap();
    assert_eq!(root.parent_span_id, None, "no traceparent: a root span");
    assert_eq!(root.kind, 2);
    assert_eq!(root.trace_id.len(), 32);
    assert_ne!(root.trace_id, "0".repeat(32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_server_span_honours_traceparent() {
    server_span_contract(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_protobuf_server_span_honours_traceparent() {
    server_span_contract(Protocol::Http).await;
}

const FAMILIES: &[&str] = &[
    "system_cpu_utilization_ratio",
    "system_memory_usage_bytes",
    "system_memory_limit_bytes",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "musetalk_collector_up",
    "musetalk_collector_sample_duration_seconds",
    "musetalk_sidecar_build_info",
    "http_server_request_duration_seconds",
];

/// True where NVML could load (an NVIDIA driver is present).
fn nvidia_present() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text_passes_promtool_and_openmetrics_is_negotiated() {
    let svc = Service::start(["--sample-interval", "100ms"]).await;
    svc.wait_ready().await;
    // One request so the HTTP histogram has a series.
    assert_eq!(svc.get("/healthz").await.status(), 200);

    let r = svc.get("/metrics").await;
    assert_eq!(r.status(), 200);
    let ct = r.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "{ct}"
    );
    let body = r.text().await.unwrap();

    let (ok, out) = promtool(&["check", "metrics"], Some(body.as_bytes()));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics reported problems:\n{out}\n--- /metrics ---\n{body}"
    );

    for family in FAMILIES {
        let typed = body.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("#") && w.next() == Some("TYPE") && w.next() == Some(family)
        });
        let sampled = body.lines().any(|l| {
            !l.starts_with('#')
                && l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
        });
        assert!(
            typed && sampled,
            "family {family} missing (TYPE line: {typed}, samples: {sampled}):\n{body}"
        );
    }
    assert!(
        body.lines().any(
            |l| l.starts_with("http_server_request_duration_seconds_count{")
                && l.contains("http_route=\"/healthz\"")
                && l.contains("http_request_method=\"GET\"")
                && l.contains("http_response_status_code=\"200\"")
        ),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "musetalk_sidecar_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    for source in ["cpu", "memory", "process"] {
        assert!(
            body.lines()
                .any(|l| l == format!("musetalk_collector_up{{source=\"{source}\"}} 1")),
            "{source} up:\n{body}"
        );
    }
    if nvidia_present() {
        assert!(
            body.contains("musetalk_collector_up{source=\"gpu\"} 1"),
            "{body}"
        );
        assert!(body.contains("hw_gpu_memory_limit_bytes{"), "{body}");
    } else {
        assert!(
            body.lines()
                .any(|l| l == "musetalk_collector_up{source=\"gpu\"} 0"),
            "no NVML here:\n{body}"
        );
        assert!(
            !body.contains("hw_gpu_"),
            "no GPU: no hw_gpu_ series or families at all:\n{body}"
        );
    }

    // OpenMetrics when the scraper asks for it, as Prometheus does.
    let r = svc
        .client()
        .get(svc.url("/metrics"))
        .header("Accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let om = r.text().await.unwrap();
    assert!(
        om.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{om}"
    );
    assert!(
        om.contains("musetalk_collector_up{source=\"cpu\"} 1"),
        "{om}"
    );
}

fn meminfo_total_bytes() -> f64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024.0
}

fn rss_bytes(pid: u32) -> f64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf only reads a system constant.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_the_service() {
    let svc = Service::start(["--sample-interval", "200ms"]).await;
    svc.wait_ready().await;
    let prom = Prometheus::start(&[svc.metrics_addr()], None).await;
    prom.wait_up(Duration::from_secs(20)).await;

    let targets = prom.active_targets().await;
    let ours: Vec<_> = targets
        .iter()
        .filter(|t| t["labels"]["job"] == JOB)
        .collect();
    assert_eq!(ours.len(), 1, "{targets:#?}");
    let t = ours[0];
    assert_eq!(t["health"], "up", "{t:#}");
    assert_eq!(t["lastError"], "", "{t:#}");
    assert_eq!(
        t["scrapeUrl"],
        format!("http://{}/metrics", svc.metrics_addr()),
        "{t:#}"
    );

    let limit = prom
        .query_value("system_memory_limit_bytes")
        .await
        .expect("system_memory_limit_bytes");
    assert_eq!(limit, meminfo_total_bytes(), "MemTotal from /proc/meminfo");
    let used = prom
        .query_value("system_memory_usage_bytes{system_memory_state=\"used\"}")
        .await
        .expect("system_memory_usage_bytes");
    assert!(
        used > 0.0 && used <= limit,
        "used = total - available is within the total: {used} vs {limit}"
    );
    // Busy share from the mode split: the modes of one CPU add up to 1.
    let modes = prom
        .query_value("sum(system_cpu_utilization_ratio{cpu_logical_number=\"0\"})")
        .await
        .expect("system_cpu_utilization_ratio{cpu_logical_number, cpu_mode}");
    assert!((modes - 1.0).abs() < 0.01, "modes of cpu 0 sum to 1: {modes}");
    assert_eq!(
        prom.query_value("musetalk_collector_up{source=\"cpu\"}")
            .await,
        Some(1.0)
    );
    let build = prom
        .query(&format!(
            "musetalk_sidecar_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ))
        .await;
    assert_eq!(build[0]["value"][1], "1", "{build}");

    let rss = prom
        .query_value(&format!("process_resident_memory_bytes{{job=\"{JOB}\"}}"))
        .await
        .expect("process_resident_memory_bytes");
    let actual = rss_bytes(svc.pid());
    assert!(
        rss > 1e6 && rss < actual * 2.0 && rss > actual / 2.0,
        "scraped RSS {rss} vs /proc statm {actual}"
    );

    // Prometheus' own scrapes went through the service's HTTP middleware.
    let scrapes = prom
        .wait_for(
            "http_server_request_duration_seconds_count{http_route=\"/metrics\",http_request_method=\"GET\",http_response_status_code=\"200\"}",
            Duration::from_secs(10),
            |r| r[0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v >= 1.0),
        )
        .await;
    assert_eq!(scrapes.as_array().unwrap().len(), 1, "{scrapes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ready_with_ffmpeg() {
    let svc = Service::start(["--sample-interval", "100ms"]).await;
    let ready = svc.wait_ready().await;
    assert_eq!(ready["ready"], true, "{ready}");
    let checks = ready["checks"].as_array().unwrap();
    for name in ["collector", "backend", "accepting"] {
        let c = checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {ready}"));
        assert_eq!(c["ok"], true, "{ready}");
    }
    let backend = checks.iter().find(|c| c["name"] == "backend").unwrap();
    assert!(
        backend["detail"].as_str().unwrap().contains("ffmpeg"),
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_503_without_ffmpeg() {
    let svc = Service::start([
        "--sample-interval",
        "100ms",
        "--ffmpeg",
        "/nonexistent/ffmpeg",
    ])
    .await;
    svc.wait_for_log("backend not ready", Duration::from_secs(10))
        .await;
    // Well past the first sample and the probe: still not ready, only because of the backend.
    let until = Instant::now() + Duration::from_millis(600);
    let mut last = serde_json::Value::Null;
    while Instant::now() < until {
        let r = svc.get("/readyz").await;
        assert_eq!(r.status(), 503);
        last = r.json().await.unwrap();
        assert_eq!(last["ready"], false, "{last}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let checks = last["checks"].as_array().unwrap();
    let backend = checks
        .iter()
        .find(|c| c["name"] == "backend")
        .unwrap_or_else(|| panic!("no backend check: {last}"));
    assert_eq!(backend["ok"], false, "{last}");
    let detail = backend["detail"].as_str().unwrap();
    assert!(detail.contains("ffmpeg"), "detail names ffmpeg: {detail}");
    let collector = checks.iter().find(|c| c["name"] == "collector").unwrap();
    assert_eq!(
        collector["ok"], true,
        "the collector is fine; only the backend fails: {last}"
    );
    // The process keeps serving.
    assert_eq!(svc.get("/healthz").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_takes_metrics_off_the_main_port() {
    let svc = Service::start(["--admin-listen", "127.0.0.1:0"]).await;
    let admin = svc
        .admin_addr()
        .expect("admin_addr logged on the listening line");
    assert_ne!(admin, svc.addr());
    svc.wait_ready().await;

    let main = svc.get("/metrics").await;
    assert_eq!(main.status(), 404, "main port must not expose /metrics");
    let body: serde_json::Value = main.json().await.unwrap();
    assert_eq!(body["error"], "route_not_found", "{body}");

    let r = svc
        .client()
        .get(svc.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("musetalk_collector_up"));
    let r = svc
        .client()
        .get(svc.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_flushes_spans() {
    let receiver = OtlpReceiver::start().await;
    // A batch delay far beyond the test: only the shutdown flush can deliver the span.
    let svc = ServiceBuilder::new()
        .args(["--otlp-endpoint", &receiver.grpc_endpoint()])
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .start()
        .await;
    let (trace, parent) = ids();
    let r = svc
        .client()
        .get(svc.url("/healthz"))
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        receiver.trace(&trace).is_empty(),
        "exported before shutdown despite the 60 s batch delay"
    );

    let started = Instant::now();
    svc.sigterm();
    let status = svc.wait_exit(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; logs:\n{}",
        svc.logs()
    );
    let spans = receiver.trace(&trace);
    assert!(
        spans
            .iter()
            .any(|s| s.name == "GET /healthz"
                && s.parent_span_id.as_deref() == Some(parent.as_str())),
        "span of the request before SIGTERM not flushed by exit ({took:?}); got {spans:#?}; logs:\n{}",
        svc.logs()
    );
    let logs = svc.logs();
    assert!(
        logs.contains("SIGTERM received") && logs.contains("flushing telemetry"),
        "{logs}"
    );
}

#[test]
fn invalid_config_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];

    let out = common::service::command()
        .args(base)
        .args(["--max-concurrent-jobs", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("--max-concurrent-jobs"),
        "names the flag: {stderr}"
    );

    // The same through the environment variable.
    let out = common::service::command()
        .args(base)
        .env("MUSETALK_SIDECAR_MAX_CONCURRENT_JOBS", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("--max-concurrent-jobs"),
        "names the flag: {stderr}"
    );
    assert!(!data.exists(), "nothing created for an invalid config");
}
