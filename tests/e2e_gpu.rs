//! The whole GPU path without a GPU: the REAL binary loads the fake `libnvidia-ml.so.1`
//! (tests/fixtures/fake_nvml, built here with `cc`) through `LD_LIBRARY_PATH`, exactly as
//! it loads the driver's, and every figure the script states must come out right:
//! NVML → collector → `/metrics` (OpenTelemetry `hw_*` names, `musetalk_gpu_*`), fields
//! the device does not support absent and asked once, a GPU that falls off the bus and
//! comes back, a real job's pipeline pid attributed its GPU memory and SM share, the
//! report's per-stage GPU figures, verdicts and energy, the job span, `check`, and the
//! status page's GPU cards. (The dashboards against a real Prometheus with the same fake:
//! tests/e2e_dashboards.rs.)

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::media::file_part;
use common::nvml::{FIXTURE_PROCS, FakeNvml, H100};
use common::otlp::OtlpReceiver;
use common::service::{Service, ServiceBuilder, json};
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

const H100_UUID: &str = "GPU-0b8f1c2d-fake-h100";
const T4_UUID: &str = "GPU-77aa-fake-t4";

/// A second, older GPU: no GPM, no PCIe counters, no ECC, no clocks-event reasons, no
/// per-process SM samples, no energy counter: those series must be absent, not 0.
const T4: &str = r#"gpu 1 uuid=GPU-77aa-fake-t4 name="Tesla T4" util=12 mem_util=3 enc=NA dec=NA mem_total=16106127360 mem_used=1073741824 temp=44 power_mw=27000 power_limit_mw=70000 energy_mj=NA pcie_rx_kbps=NA pcie_tx_kbps=NA pcie_gen=NA pcie_width=NA clock_sm=585 clock_mem=5000 clock_sm_max=1590 clock_mem_max=5001 reasons=NA ecc_corr=NA ecc_uncorr=NA"#;

/// One exposed sample: its labels and value.
#[derive(Debug)]
struct Series {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Every sample of `name` in a Prometheus text exposition.
fn samples(text: &str, name: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (labels, value) = match rest.chars().next() {
            Some('{') => {
                let end = rest.rfind('}').unwrap();
                (&rest[1..end], rest[end + 1..].trim())
            }
            Some(' ') => ("", rest.trim()),
            _ => continue,
        };
        let value: f64 = value.split_whitespace().next().unwrap().parse().unwrap();
        let mut map = BTreeMap::new();
        // Label values here never hold `",` (names, UUIDs, versions).
        for kv in labels.split("\",").filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once("=\"").unwrap();
            map.insert(k.trim_start_matches(',').to_string(), v.trim_end_matches('"').to_string());
        }
        out.push(Series { labels: map, value });
    }
    out
}

/// The value of `name` whose labels include every `want` pair (exactly one must match).
fn value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<Series> = samples(text, name)
        .into_iter()
        .filter(|s| want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert!(hits.len() <= 1, "{name} {want:?} matches {} series: {hits:?}", hits.len());
    hits.first().map(|s| s.value)
}

fn close(got: Option<f64>, want: f64, what: &str, text: &str) {
    let g = got.unwrap_or_else(|| panic!("{what}: absent from /metrics:\n{text}"));
    assert!((g - want).abs() <= want.abs() * 1e-6 + 1e-9, "{what}: {g}, the fake says {want}");
}

/// Polls /metrics until `ok` holds (20 s).
async fn metrics_until(svc: &Service, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = svc.metrics_text().await;
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: not within 20 s; /metrics:\n{text}\nlogs:\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The fixture MuseTalk backend (simple mode) and the fixture worker (realtime mode).
fn musetalk_service(nvml: &FakeNvml, extra_env: &str) -> ServiceBuilder {
    nvml.apply(
        ServiceBuilder::fixture_musetalk()
            .fixture_worker()
            .args(["--sample-interval", "200ms", "--pipeline-env"])
            .arg(format!("PYTHONDONTWRITEBYTECODE=1{extra_env}")),
    )
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gpu_series_reads_what_nvml_says() {
    let script = format!("{}{T4}\n", H100.replace("{procs}", FIXTURE_PROCS));
    let nvml = FakeNvml::new(&script);
    let svc = musetalk_service(&nvml, "").start().await;
    svc.wait_ready().await;

    // GPM ratios need two samples; the realtime worker's tree is registered at boot.
    let text = metrics_until(&svc, "GPM ratios and the worker's GPU memory", |t| {
        value(t, "musetalk_gpu_sm_active_ratio", &[("hw_id", H100_UUID)]).is_some()
            && value(t, "musetalk_pipeline_gpu_memory_bytes", &[("mode", "realtime")]).is_some_and(|v| v > 0.0)
    })
    .await;
    let h = |name: &str, extra: &[(&str, &str)]| {
        let mut want = vec![("hw_id", H100_UUID)];
        want.extend_from_slice(extra);
        value(&text, name, &want)
    };

    // Every series carries the OpenTelemetry hardware attributes.
    for s in samples(&text, "hw_gpu_memory_limit_bytes") {
        let (id, model) = if s.labels["gpu"] == "0" { (H100_UUID, "NVIDIA H100 80GB HBM3") } else { (T4_UUID, "Tesla T4") };
        assert_eq!(s.labels["hw_type"], "gpu");
        assert_eq!(s.labels["hw_id"], id);
        assert_eq!(s.labels["hw_model"], model);
        assert_eq!(s.labels["hw_vendor"], "nvidia");
        assert_eq!(s.labels["hw_driver_version"], "550.54.15");
        assert_eq!(s.labels["hw_name"], format!("gpu{}", s.labels["gpu"]));
    }
    assert_eq!(samples(&text, "hw_gpu_memory_limit_bytes").len(), 2, "{text}");

    // The H100: every figure as scripted, in base units.
    close(h("hw_gpu_utilization_ratio", &[("hw_gpu_task", "general")]), 0.93, "SM utilization", &text);
    close(h("hw_gpu_utilization_ratio", &[("hw_gpu_task", "encoder")]), 0.0, "encoder", &text);
    close(h("hw_gpu_utilization_ratio", &[("hw_gpu_task", "decoder")]), 0.04, "decoder", &text);
    close(h("hw_gpu_memory_usage_bytes", &[]), 21474836480.0, "memory used", &text);
    close(h("hw_gpu_memory_limit_bytes", &[]), 85520809984.0, "memory limit", &text);
    close(h("hw_gpu_memory_utilization_ratio", &[]), 21474836480.0 / 85520809984.0, "memory used / limit", &text);
    close(h("musetalk_gpu_memory_bandwidth_utilization_ratio", &[]), 0.38, "memory controller busy", &text);
    close(h("hw_temperature_celsius", &[]), 61.0, "temperature", &text);
    close(h("hw_power_watts", &[]), 412.0, "power", &text);
    close(h("musetalk_gpu_power_limit_watts", &[]), 700.0, "power limit", &text);
    close(h("musetalk_gpu_clock_hertz", &[("clock", "sm")]), 1755e6, "SM clock", &text);
    close(h("musetalk_gpu_clock_hertz", &[("clock", "memory")]), 2619e6, "memory clock", &text);
    close(h("musetalk_gpu_clock_max_hertz", &[("clock", "sm")]), 1980e6, "SM clock max", &text);
    close(h("musetalk_gpu_clocks_event_reasons", &[("reason", "power_cap")]), 1.0, "power cap reason (bit 0x4)", &text);
    for reason in ["thermal", "hw_slowdown", "sync_boost", "idle"] {
        close(h("musetalk_gpu_clocks_event_reasons", &[("reason", reason)]), 0.0, reason, &text);
    }
    close(h("hw_errors_total", &[("error_type", "ecc_corrected")]), 3.0, "ECC corrected", &text);
    close(h("hw_errors_total", &[("error_type", "ecc_uncorrected")]), 0.0, "ECC uncorrected", &text);
    close(h("musetalk_gpu_sm_active_ratio", &[]), 0.88, "GPM SM active", &text);
    close(h("musetalk_gpu_sm_occupancy_ratio", &[]), 0.52, "GPM SM occupancy", &text);
    close(h("musetalk_gpu_tensor_active_ratio", &[]), 0.61, "GPM tensor active", &text);
    close(h("musetalk_gpu_dram_bandwidth_utilization_ratio", &[]), 0.35, "GPM DRAM bandwidth", &text);
    let energy = h("hw_energy_joules_total", &[]).expect("energy counter");
    assert!(energy >= 5000.0, "energy {energy} J: the counter starts at 5000 J");
    let rx = h("hw_gpu_io_bytes_total", &[("network_io_direction", "receive")]).expect("PCIe receive");
    let tx = h("hw_gpu_io_bytes_total", &[("network_io_direction", "transmit")]).expect("PCIe transmit");
    assert!(rx > 0.0 && tx > 0.0 && rx > tx, "PCIe bytes rx {rx} tx {tx} (the fake moves 2 GB/s in, 1 GB/s out)");

    // The worker process (matched by command line) is the realtime tree's: its GPU memory
    // and SM share are the realtime pipeline's.
    close(value(&text, "musetalk_pipeline_gpu_memory_bytes", &[("mode", "realtime")]), 3221225472.0, "worker GPU memory", &text);
    close(value(&text, "musetalk_pipeline_gpu_utilization_ratio", &[("mode", "realtime")]), 0.05, "worker SM share", &text);

    // The T4: what it supports is there, what it does not is absent (not 0).
    let t = |name: &str| samples(&text, name).into_iter().filter(|s| s.labels.get("hw_id").map(String::as_str) == Some(T4_UUID)).count();
    close(value(&text, "hw_gpu_utilization_ratio", &[("hw_id", T4_UUID), ("hw_gpu_task", "general")]), 0.12, "T4 utilization", &text);
    close(value(&text, "hw_power_watts", &[("hw_id", T4_UUID)]), 27.0, "T4 power", &text);
    for absent in [
        "musetalk_gpu_sm_active_ratio",
        "musetalk_gpu_tensor_active_ratio",
        "hw_gpu_io_bytes_total",
        "hw_errors_total",
        "hw_energy_joules_total",
        "musetalk_gpu_clocks_event_reasons",
    ] {
        assert_eq!(t(absent), 0, "{absent} for the T4, which does not report it:\n{text}");
    }
    assert_eq!(value(&text, "hw_gpu_utilization_ratio", &[("hw_id", T4_UUID), ("hw_gpu_task", "encoder")]), None, "T4 encoder: not supported, so absent");

    // Unsupported fields are asked once per device, not every sample: the count of
    // NOT_SUPPORTED answers stops growing (20 more samples at 200 ms).
    let before = nvml.unsupported_calls();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = nvml.unsupported_calls();
    assert_eq!(before, after, "NOT_SUPPORTED fields were asked again");
    let mut per_call: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &after {
        *per_call.entry(c.as_str()).or_default() += 1;
    }
    for (call, n) in &per_call {
        // Two fields share one NVML call (PCIe rx/tx, ECC corrected/uncorrected).
        assert!(*n <= 2, "{call} answered NOT_SUPPORTED {n} times");
        assert!(call.ends_with(" 1"), "only the T4 lacks fields, but {call}");
    }
    assert!(per_call.contains_key("nvmlDeviceGetPcieThroughput 1"), "{per_call:?}");

    // A GPU that falls off the bus: its series go, the other GPU's stay, the service and
    // the GPU source live on; back on the bus, it is published again.
    nvml.write(&script.replace("gpu 1 uuid=", "gpu 1 lost=1 uuid="));
    let text = metrics_until(&svc, "the lost T4's series gone", |t| {
        value(t, "hw_power_watts", &[("hw_id", T4_UUID)]).is_none()
    })
    .await;
    assert!(value(&text, "hw_power_watts", &[("hw_id", H100_UUID)]).is_some(), "the H100 went with the T4:\n{text}");
    assert_eq!(value(&text, "musetalk_collector_up", &[("source", "gpu")]), Some(1.0), "{text}");
    assert_eq!(svc.get("/healthz").await.status(), StatusCode::OK);
    nvml.write(&script);
    metrics_until(&svc, "the T4 back", |t| value(t, "hw_power_watts", &[("hw_id", T4_UUID)]).is_some()).await;

    // `check` sees what the service sees.
    let mut cmd = common::service::command();
    nvml.apply_cmd(&mut cmd);
    let out = cmd.args(["check", "--listen", "127.0.0.1:0"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.contains("nvml")).unwrap_or_else(|| panic!("no nvml line:\n{stdout}"));
    assert!(line.contains("2 GPUs, driver 550.54.15: NVIDIA H100 80GB HBM3, Tesla T4"), "{line}");
}

async fn infer(svc: &Service) -> Value {
    let m = common::media::media();
    let form = Form::new().part("video", file_part(&m.video, "v.mp4")).part("audio", file_part(&m.audio, "a.wav"));
    let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}\nlogs:\n{}", svc.logs());
    body
}

/// The stages that ran long enough to hold GPU samples, with their GPU figures.
fn stage_gpus(report: &Value) -> Vec<(String, Value)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["gpu"].is_null())
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["gpu"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_report_has_per_stage_gpu_figures_verdicts_and_energy() {
    // No throttle reason: the SMs (GPM 88 % active) decide, gpu-bound.
    let steady = H100.replace("reasons=0x4", "reasons=0").replace("{procs}", FIXTURE_PROCS);
    let nvml = FakeNvml::new(&steady);
    let receiver = OtlpReceiver::start().await;
    let svc = musetalk_service(&nvml, ",MUSETALK_FIXTURE_MODE=slow,MUSETALK_FIXTURE_SLEEP=2")
        .args(["--otlp-endpoint", &receiver.grpc_endpoint()])
        .start()
        .await;
    svc.wait_ready().await;

    let body = infer(&svc).await;
    let report = &body["report"];
    let job = body["job_id"].as_str().unwrap().to_string();

    // The pipeline's pid (python -m scripts.inference) was attributed its GPU memory and
    // SM share: the job's tree held 2 GiB and 71 % of the SMs.
    let tree = &report["resources"]["tree"];
    assert_eq!(tree["gpu_memory"]["peak"].as_f64(), Some(2147483648.0), "pipeline GPU memory: {report:#}");
    assert_eq!(tree["gpus"], serde_json::json!([0]), "{report:#}");

    // Per-stage GPU windows and verdicts, on every stage long enough to hold a sample;
    // the long one (the fixture sleeps 2 s in UNet inference) certainly does.
    let stages = stage_gpus(report);
    assert!(stages.iter().any(|(n, _)| n == "unet_inference"), "no GPU figures on unet_inference: {report:#}");
    for (name, g) in &stages {
        let sm = g["sm"]["avg"].as_f64().unwrap();
        assert!((sm - 0.88).abs() < 1e-6, "{name}: SM {sm}, GPM says 88 % active: {g:#}");
        assert_eq!(g["verdict"], "gpu-bound", "{name}: {g:#}");
        assert!(g["throttle_reasons"].as_array().unwrap().is_empty(), "{name}: {g:#}");
        let w = g["power_watts"].as_f64().unwrap();
        assert!((w - 412.0).abs() < 1e-6, "{name}: power {w}");
        let tensor = g["tensor_active"]["avg"].as_f64().unwrap();
        assert!((tensor - 0.61).abs() < 1e-6, "{name}: tensor {tensor}");
        // Counters are pro-rated to the stage's length: an instant stage moved nothing.
        assert!(g["pcie_rx_bytes"].as_f64().unwrap() >= 0.0, "{name}: {g:#}");
    }
    let unet = &stages.iter().find(|(n, _)| n == "unet_inference").unwrap().1;
    let unet_seconds = report["stages"].as_array().unwrap().iter().find(|s| s["name"] == "unet_inference").unwrap()["seconds"].as_f64().unwrap();
    assert!(unet["pcie_rx_bytes"].as_f64().unwrap() > unet["pcie_tx_bytes"].as_f64().unwrap(), "{unet:#}");
    let e = unet["energy_joules"].as_f64().unwrap();
    // The fake's counter advances at exactly its power (412 W); the window's sampling
    // (200 ms) bounds the error.
    assert!((e / unet_seconds - 412.0).abs() < 412.0 * 0.25, "unet_inference: {e} J in {unet_seconds} s: {unet:#}");

    // Energy per job and per output second.
    let energy = &report["gpu_energy"];
    let joules = energy["joules"].as_f64().expect("gpu_energy.joules");
    let total = report["total_seconds"].as_f64().unwrap();
    assert!(joules > 0.0 && joules <= 412.0 * (total + 0.5), "job energy {joules} J over {total} s at 412 W: {report:#}");
    let out_s = report["media"]["output_seconds"].as_f64().unwrap();
    let per = energy["per_output_second"].as_f64().unwrap();
    assert!((per - joules / out_s).abs() < 1e-6, "{energy}");

    // The text report shows them.
    let text = svc
        .client()
        .get(svc.url(&format!("/v1/jobs/{job}/report")))
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("GPU energy"), "{text}");
    let unet_line = text.lines().find(|l| l.contains("unet_inference")).unwrap();
    assert!(unet_line.contains("gpu-bound"), "{unet_line}\n{text}");

    // The job span carries the energy; the stage span its verdict.
    let trace = body["trace_id"].as_str().unwrap().to_string();
    let spans = receiver
        .wait_for(Duration::from_secs(10), |s| s.iter().any(|s| s.trace_id == trace && s.name == "musetalk.job"))
        .await;
    let job_span = spans.iter().find(|s| s.trace_id == trace && s.name == "musetalk.job").unwrap();
    let span_j = job_span.attr("musetalk.gpu.energy_joules").and_then(|v| v.as_f64()).expect("job span energy");
    assert!((span_j - joules).abs() < 1e-6, "span {span_j} J, report {joules} J");
    let unet_span = spans.iter().find(|s| s.trace_id == trace && s.name == "unet_inference").expect("unet_inference span");
    assert_eq!(unet_span.attr("musetalk.gpu.verdict").and_then(|v| v.as_str()), Some("gpu-bound"));

    // The status page: GPU cards (no "No GPU data"), and the verdict per stage in the job view.
    let page = svc.get("/ui/partials/resources").await.text().await.unwrap();
    assert!(page.contains(r#"data-series="gpu0_util""#) && page.contains("NVIDIA H100 80GB HBM3"), "{page}");
    assert!(!page.contains("No GPU data"), "{page}");
    let view = svc.get(&format!("/ui/jobs/{job}")).await.text().await.unwrap();
    assert!(view.contains("gpu-bound"), "{view}");

    // Now the power cap holds the clocks down: the next job's stages are throttled.
    nvml.write(&H100.replace("{procs}", FIXTURE_PROCS));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let body = infer(&svc).await;
    let (name, g) = stage_gpus(&body["report"]).into_iter().find(|(n, _)| n == "unet_inference").expect("unet_inference GPU figures");
    assert_eq!(g["verdict"], "throttled", "{name}: {g:#}");
    assert_eq!(g["throttle_reasons"], serde_json::json!(["power_cap"]), "{g:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_energy_counter_that_goes_back_is_a_reset_not_negative_energy() {
    // The counter wraps every 1.2 s at 400 W (480 J): a job of a few seconds sees it go
    // back at least once. The job's energy is never negative and never more than the
    // power allows; /metrics follows the counter down (a reset to Prometheus).
    let script = H100
        .replace("energy_mj=5000000", "energy_mj=0 energy_wrap_mj=480000")
        .replace("power_mw=412000", "power_mw=400000")
        .replace("{procs}", FIXTURE_PROCS);
    let nvml = FakeNvml::new(&script);
    let svc = musetalk_service(&nvml, ",MUSETALK_FIXTURE_MODE=slow,MUSETALK_FIXTURE_SLEEP=3").start().await;
    svc.wait_ready().await;
    let body = infer(&svc).await;
    let report = &body["report"];
    let joules = report["gpu_energy"]["joules"].as_f64().expect("gpu_energy");
    let total = report["total_seconds"].as_f64().unwrap();
    assert!(joules >= 0.0 && joules <= 400.0 * (total + 0.5), "{joules} J over {total} s at 400 W: {report:#}");
    for (name, g) in stage_gpus(report) {
        let e = g["energy_joules"].as_f64().unwrap_or(0.0);
        assert!(e >= 0.0, "{name}: {e} J");
    }
    // The exposed counter is NVML's, so it goes back with it (never above the wrap).
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let t = svc.metrics_text().await;
        if let Some(v) = value(&t, "hw_energy_joules_total", &[("hw_id", H100_UUID)]) {
            seen.push(v);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(seen.iter().all(|v| *v < 480.0), "{seen:?}");
    assert!(seen.windows(2).any(|w| w[1] < w[0]), "the counter never went back: {seen:?}");
}
