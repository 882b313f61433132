//! End-to-end tests of simple-mode jobs against the REAL binary (DESIGN.md §3–§5):
//! real uploads made with ffmpeg, the `preview` backend and the `musetalk` backend run
//! against the fixture MuseTalk tree (`tests/fixtures/musetalk`), with spans checked in
//! an in-process OTLP receiver and metrics read from `/metrics`.
//!
//! Needs `ffmpeg`, `ffprobe` and `python3` with PyYAML on PATH. Every test starts its
//! own service, so they run concurrently; media is tiny (128×128, 2 s video, 3 s audio).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::media::{file_part, media};
use common::otlp::{OtlpReceiver, ReceivedSpan};
use common::service::{Service, ServiceBuilder};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

const SPAN_TIMEOUT: Duration = Duration::from_secs(15);
const JOB_TIMEOUT: Duration = Duration::from_secs(45);
/// The audio's length: every successful output must last this long.
const AUDIO_SECONDS: f64 = 3.0;
/// One frame at 25 fps.
const FRAME: f64 = 0.04;

/// `video` + `audio`, the minimal valid request.
fn good_form() -> Form {
    let m = media();
    Form::new().part("video", file_part(&m.video, "v.mp4")).part("audio", file_part(&m.audio, "a.wav"))
}

// ---------------------------------------------------------------------------------------
// HTTP helpers.

async fn submit(svc: &Service, form: Form, respond_async: bool) -> reqwest::Response {
    let mut req = svc.client().post(svc.url("/v1/inference")).multipart(form);
    if respond_async {
        req = req.header("Prefer", "respond-async");
    }
    req.send().await.unwrap_or_else(|e| panic!("POST /v1/inference: {e}; logs:\n{}", svc.logs()))
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text}"));
    (status, v)
}

async fn get_json(svc: &Service, path: &str) -> (StatusCode, Value) {
    json_of(svc.get(path).await).await
}

/// A 202 answer's job id, checking `Location`.
async fn accepted_id(r: reqwest::Response) -> String {
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers().get("location").expect("202 has Location").to_str().unwrap().to_string();
    let (_, body) = json_of(r).await;
    let id = body["job_id"].as_str().unwrap_or_else(|| panic!("no job_id: {body}")).to_string();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    id
}

/// Polls `GET /v1/jobs/{id}` every 50 ms until `pred` accepts the status.
async fn wait_job(svc: &Service, id: &str, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, v) = get_json(svc, &format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id}: not {what} within {timeout:?}; last status {v}; logs:\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics_text(svc: &Service) -> String {
    let r = svc.client().get(svc.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

/// The value of the sample line that starts with `series ` (exact name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------
// Media and process checks.

struct Probe {
    duration: f64,
    streams: Vec<(String, String)>,
}

fn ffprobe(path: &Path) -> Probe {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "format=duration:stream=codec_type,codec_name", "-of", "json"])
        .arg(path)
        .output()
        .expect("run ffprobe");
    assert!(out.status.success(), "ffprobe {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let duration = v["format"]["duration"].as_str().and_then(|d| d.parse().ok()).unwrap_or_else(|| panic!("no duration: {v}"));
    let streams = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["codec_type"].as_str().unwrap_or_default().to_string(), s["codec_name"].as_str().unwrap_or_default().to_string()))
        .collect();
    Probe { duration, streams }
}

/// Downloads the job's output and checks it is an mp4 of the audio's length with one
/// H.264 video stream and one audio stream.
async fn check_output(svc: &Service, output_url: &str, dir: &Path) -> Probe {
    let r = svc.get(output_url).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    let bytes = r.bytes().await.unwrap();
    let path = dir.join("out.mp4");
    std::fs::write(&path, &bytes).unwrap();
    let p = ffprobe(&path);
    assert!((p.duration - AUDIO_SECONDS).abs() <= FRAME + 1e-6, "output lasts {} s, the audio {AUDIO_SECONDS} s", p.duration);
    let video: Vec<_> = p.streams.iter().filter(|(t, _)| t == "video").collect();
    let audio: Vec<_> = p.streams.iter().filter(|(t, _)| t == "audio").collect();
    assert_eq!(video.len(), 1, "{:?}", p.streams);
    assert_eq!(video[0].1, "h264", "{:?}", p.streams);
    assert_eq!(audio.len(), 1, "{:?}", p.streams);
    p
}

/// `(state, pgrp)` of a process from `/proc/PID/stat`, or `None` if it is gone.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Alive = present in /proc and not a zombie.
fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Live processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(state, g)| g == pgid && state != 'Z'))
        .collect()
}

/// Waits (up to 5 s: the kill is asynchronous to the answer) until none of `pids` and
/// no member of the group `pgid` is alive.
async fn assert_all_gone(pids: &[i32], pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).chain(group_members(pgid)).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes still alive: {left:?} (group {pgid})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn job_dirs(svc: &Service) -> Vec<String> {
    match std::fs::read_dir(svc.data_dir().join("jobs")) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Services.

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/musetalk")
}

/// `--backend musetalk` against the fixture tree in `mode`, with extra `KEY=VALUE`
/// pipeline env and extra flags.
fn musetalk(mode: &str, env: &[String], args: &[&str]) -> ServiceBuilder {
    let dir = fixture_dir();
    let mut b = ServiceBuilder::new().args(["--backend", "musetalk", "--musetalk-python", "python3"]).arg("--musetalk-dir").arg(dir);
    // Repeatable flag, each value itself comma-separated.
    b = b.args(["--pipeline-env", &format!("PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_MODE={mode}")]);
    for kv in env {
        b = b.args(["--pipeline-env", kv]);
    }
    b.args(args.iter().copied())
}

async fn ready(b: ServiceBuilder) -> Service {
    let svc = b.start().await;
    svc.wait_ready().await;
    svc
}

// ---------------------------------------------------------------------------------------
// Span helpers.

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "expected one `{name}` span, got {}: {:?}", found.len(), spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    found[0]
}

fn attr_str<'a>(s: &'a ReceivedSpan, key: &str) -> &'a str {
    s.attr(key).and_then(|v| v.as_str()).unwrap_or_else(|| panic!("span `{}` has no string attribute {key}: {:#?}", s.name, s.attributes))
}

fn attr_i64(s: &ReceivedSpan, key: &str) -> i64 {
    s.attr(key).and_then(|v| v.as_i64()).unwrap_or_else(|| panic!("span `{}` has no int attribute {key}: {:#?}", s.name, s.attributes))
}

const STEPS: &[&str] = &["file_processing", "queue_wait", "config_creation", "subprocess_execution", "output_discovery", "response_preparation"];

/// Waits until the trace holds the job span, its HTTP parent, every step and `stages`;
/// on timeout names what is missing.
async fn wait_job_trace(receiver: &OtlpReceiver, trace_id: &str, stages: &[&str]) -> Vec<ReceivedSpan> {
    let want: Vec<&str> = ["musetalk.job", "POST /v1/inference"].iter().chain(STEPS).chain(stages).copied().collect();
    let deadline = Instant::now() + SPAN_TIMEOUT;
    loop {
        let trace = receiver.trace(trace_id);
        let missing: Vec<&str> = want.iter().copied().filter(|w| !trace.iter().any(|s| s.name == *w)).collect();
        if missing.is_empty() {
            return trace;
        }
        if Instant::now() >= deadline {
            let got: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
            let hint = if missing.contains(&"musetalk.job") && got.contains(&"response_preparation") {
                " (every step span arrived but the job span did not: it is still open after the job ended)"
            } else {
                ""
            };
            panic!("trace {trace_id}: spans {missing:?} not received within {SPAN_TIMEOUT:?}{hint}; received {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The job span and its steps: parent links, attributes, subprocess details.
fn check_job_tree<'a>(trace: &'a [ReceivedSpan], job_id: &str, backend: &str) -> (&'a ReceivedSpan, &'a ReceivedSpan) {
    let job = one(trace, "musetalk.job");
    let server = one(trace, "POST /v1/inference");
    assert_eq!(job.parent_span_id.as_deref(), Some(server.span_id.as_str()), "the job span is a child of the HTTP server span");
    assert_eq!(attr_str(job, "musetalk.job.id"), job_id);
    assert_eq!(attr_str(job, "musetalk.mode"), "simple");
    assert_eq!(attr_str(job, "musetalk.backend"), backend);
    assert_eq!(attr_str(job, "musetalk.outcome"), "succeeded");
    for step in STEPS {
        let s = one(trace, step);
        assert_eq!(s.parent_span_id.as_deref(), Some(job.span_id.as_str()), "`{step}` is a child of musetalk.job");
        assert_ne!(s.status_code, 2, "`{step}` ended in error: {}", s.status_message);
    }
    let exec = one(trace, "subprocess_execution");
    assert!(attr_i64(exec, "process.pid") > 0);
    assert_eq!(attr_i64(exec, "process.exit.code"), 0);
    (job, exec)
}

// ---------------------------------------------------------------------------------------
// 1. Preview backend: sync job, output, Range, spans, metrics with exemplars, report.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_sync_job_output_spans_metrics_and_report() {
    let receiver = OtlpReceiver::start().await;
    let svc = ready(ServiceBuilder::new().args(["--otlp-endpoint", &receiver.grpc_endpoint()])).await;
    let tmp = tempfile::tempdir().unwrap();

    let (status, body) = json_of(submit(&svc, good_form(), false).await).await;
    assert_eq!(status, StatusCode::OK, "{body}; logs:\n{}", svc.logs());
    let job_id = body["job_id"].as_str().unwrap().to_string();
    let trace_id = body["trace_id"].as_str().unwrap().to_string();
    assert_eq!(trace_id.len(), 32, "{body}");
    assert_eq!(body["backend"], "preview");
    assert_eq!(body["state"], "succeeded");
    let output_url = body["output_url"].as_str().unwrap().to_string();
    assert_eq!(output_url, format!("/v1/jobs/{job_id}/output"));

    // The output: an mp4 as long as the audio, one H.264 video and one audio stream.
    check_output(&svc, &output_url, tmp.path()).await;

    // Range.
    let r = svc.client().get(svc.url(&output_url)).header("Range", "bytes=0-99").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(r.headers()["content-range"].to_str().unwrap().starts_with("bytes 0-99/"));
    assert_eq!(r.bytes().await.unwrap().len(), 100);

    // Report: step shares sum to at most 100 %, text has the bottleneck and the trace id.
    let report = &body["report"];
    assert_eq!(report["outcome"], "succeeded");
    assert_eq!(report["trace_id"], trace_id.as_str());
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for s in ["file_processing", "config_creation", "subprocess_execution", "output_discovery", "response_preparation"] {
        assert!(names.contains(&s), "report steps {names:?} lack {s}");
    }
    let sum: f64 = steps.iter().map(|s| s["percent"].as_f64().unwrap()).sum();
    assert!(sum <= 100.5, "step percents sum to {sum}: {report}");
    let r = svc.client().get(svc.url(&format!("/v1/jobs/{job_id}/report"))).header("Accept", "text/plain").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(text.contains("Bottleneck:"), "{text}");
    assert!(text.contains(&trace_id), "{text}");

    // Plain metrics.
    let plain = metrics_text(&svc).await;
    assert_eq!(sample(&plain, r#"musetalk_jobs_total{mode="simple",backend="preview",outcome="succeeded"}"#), Some(1.0), "{plain}");

    // OpenMetrics: a step histogram bucket carries the job's trace id as exemplar.
    let r = svc.client().get(svc.admin_url("/metrics")).header("Accept", "application/openmetrics-text; version=1.0.0").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let om = r.text().await.unwrap();
    let exemplar_ids: Vec<String> = om
        .lines()
        .filter(|l| l.starts_with("musetalk_step_duration_seconds_bucket{"))
        .filter_map(|l| {
            let rest = &l[l.find("# {trace_id=\"")? + "# {trace_id=\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect();
    assert!(!exemplar_ids.is_empty(), "no exemplar on musetalk_step_duration_seconds_bucket:\n{om}");
    assert!(exemplar_ids.contains(&trace_id), "exemplars {exemplar_ids:?} lack the job's trace {trace_id}");

    // Spans: the job under the HTTP server span, every step under the job, the stage under the execution step.
    let trace = wait_job_trace(&receiver, &trace_id, &["video_encoding"]).await;
    let (_, exec) = check_job_tree(&trace, &job_id, "preview");
    let enc = one(&trace, "video_encoding");
    assert_eq!(enc.parent_span_id.as_deref(), Some(exec.span_id.as_str()), "video_encoding is a child of subprocess_execution");
    // The exemplars point at traces that exist.
    for id in &exemplar_ids {
        assert!(!receiver.trace(id).is_empty(), "exemplar trace {id} never reached the receiver");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Server-Sent Events.

#[derive(Debug)]
struct Sse {
    event: String,
    data: Value,
}

/// Reads the SSE stream until a `done` event (or the end), within `timeout`.
async fn read_events(resp: reqwest::Response, timeout: Duration) -> Vec<Sse> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(c)) => c.unwrap(),
            Ok(None) => return out,
            Err(_) => panic!("no `done` event within {timeout:?}; got {out:?}"),
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            let done = event == "done";
            out.push(Sse { event, data: serde_json::from_str(&data).unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data}")) });
            if done {
                return out;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_follow_an_async_job_to_done() {
    let svc = ready(ServiceBuilder::new()).await;
    // A first job holds the only run slot, so the second is still queued when we subscribe.
    let first = accepted_id(submit(&svc, good_form(), true).await).await;
    let id = accepted_id(submit(&svc, good_form(), true).await).await;
    let resp = svc.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = read_events(resp, JOB_TIMEOUT).await;
    let seq: Vec<String> = events
        .iter()
        .map(|e| match e.event.as_str() {
            "stage_start" | "stage_end" => format!("{}:{}", e.event, e.data["stage"].as_str().unwrap_or("?")),
            "step_start" | "step_end" => format!("{}:{}", e.event, e.data["step"].as_str().unwrap_or("?")),
            "state" | "done" => format!("{}:{}", e.event, e.data["state"].as_str().unwrap_or("?")),
            other => other.to_string(),
        })
        .collect();

    assert_eq!(events[0].event, "status", "{seq:?}");
    assert_eq!(events[0].data["job_id"], id.as_str());
    assert!(!events[0].data["state"].as_str().unwrap().contains("succeeded"), "subscribed before the job ended: {seq:?}");
    let pos = |what: &str| seq.iter().position(|s| s == what).unwrap_or_else(|| panic!("no {what} in {seq:?}"));
    // Normally the job is still queued at subscription; if it already runs, the snapshot says so.
    if events[0].data["state"] != "running" {
        assert!(pos("state:running") < pos("stage_start:video_encoding"), "{seq:?}");
    }
    assert!(pos("step_start:subprocess_execution") < pos("stage_start:video_encoding"), "{seq:?}");
    assert!(pos("stage_start:video_encoding") < pos("stage_end:video_encoding"), "{seq:?}");
    assert!(pos("stage_end:video_encoding") < pos("step_end:subprocess_execution"), "{seq:?}");
    assert_eq!(seq.last().unwrap(), "done:succeeded", "{seq:?}");
    let progress: Vec<&Sse> = events.iter().filter(|e| e.event == "progress").collect();
    assert!(!progress.is_empty(), "no progress event: {seq:?}");
    for p in &progress {
        assert!(p.data["total"].as_u64().is_some_and(|t| t > 0), "progress without total: {:?}", p.data);
        assert!(p.data["done"].as_u64().is_some(), "{:?}", p.data);
    }
    let first_progress = seq.iter().position(|s| s == "progress").unwrap();
    assert!(pos("stage_start:video_encoding") < first_progress && first_progress < pos("stage_end:video_encoding"), "{seq:?}");
    // A finished job's stream starts with its final status and ends at once.
    wait_job(&svc, &first, JOB_TIMEOUT, "succeeded", |v| v["state"] == "succeeded").await;
    let events = read_events(svc.get(&format!("/v1/jobs/{first}/events")).await, Duration::from_secs(5)).await;
    assert_eq!(events[0].event, "status", "{events:?}");
    assert_eq!(events[0].data["state"], "succeeded", "{events:?}");
    assert!(events.len() == 1 || events.last().unwrap().event == "done", "{events:?}");
}

// ---------------------------------------------------------------------------------------
// 3. MuseTalk backend against the fixture.

const MUSETALK_STAGES: &[&str] =
    &["model_loading", "frame_and_audio_extraction", "face_detection", "latent_encoding", "unet_inference", "blending", "video_encoding", "audio_mux"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn musetalk_success_stages_config_and_output() {
    let receiver = OtlpReceiver::start().await;
    let svc = ready(musetalk("success", &[], &["--otlp-endpoint", &receiver.grpc_endpoint()])).await;
    let tmp = tempfile::tempdir().unwrap();

    let (status, body) = json_of(submit(&svc, good_form().text("bbox_shift", "-3").text("batch_size", "4"), false).await).await;
    assert_eq!(status, StatusCode::OK, "{body}; logs:\n{}", svc.logs());
    assert_eq!(body["backend"], "musetalk");
    let job_id = body["job_id"].as_str().unwrap().to_string();
    let trace_id = body["trace_id"].as_str().unwrap().to_string();
    check_output(&svc, body["output_url"].as_str().unwrap(), tmp.path()).await;

    // The real CLI, from a per-job YAML config written by a serializer.
    let report = &body["report"];
    let cmd = report["subprocess"]["command"].as_str().unwrap();
    for needle in ["-m scripts.inference", "--inference_config", "--version v15", "--result_dir", "--unet_model_path", "--unet_config", "--batch_size 4"] {
        assert!(cmd.contains(needle), "command lacks `{needle}`: {cmd}");
    }
    assert_eq!(report["subprocess"]["exit_code"], 0);
    let cfg_path = svc.data_dir().join("jobs").join(&job_id).join("inference.yaml");
    assert!(cmd.contains(&cfg_path.display().to_string()), "{cmd} does not use {}", cfg_path.display());
    let cfg = std::fs::read_to_string(&cfg_path).unwrap_or_else(|e| panic!("{}: {e}", cfg_path.display()));
    assert!(cfg.contains("task_0:") && cfg.contains("video_path:") && cfg.contains("audio_path:") && cfg.contains("bbox_shift: -3"), "{cfg}");
    let stage_names: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stage_names, MUSETALK_STAGES, "report stages");

    // Spans: the eight stages, children of subprocess_execution, in start order.
    let trace = wait_job_trace(&receiver, &trace_id, MUSETALK_STAGES).await;
    let (_, exec) = check_job_tree(&trace, &job_id, "musetalk");
    let stages: Vec<&ReceivedSpan> = MUSETALK_STAGES.iter().map(|n| one(&trace, n)).collect();
    // Start times never go backwards along MuseTalk's order (stages whose markers were
    // read together may share a start time).
    let starts: Vec<(&str, u64)> = stages.iter().map(|s| (s.name.as_str(), s.start_unix_nano)).collect();
    for w in starts.windows(2) {
        assert!(w[0].1 <= w[1].1, "stage `{}` starts after `{}`: {starts:?}", w[0].0, w[1].0);
    }
    for s in &stages {
        assert_eq!(s.parent_span_id.as_deref(), Some(exec.span_id.as_str()), "stage `{}` is a child of subprocess_execution", s.name);
        assert!(s.start_unix_nano >= exec.start_unix_nano && s.end_unix_nano <= exec.end_unix_nano, "stage `{}` lies within the execution step", s.name);
        assert!(s.end_unix_nano >= s.start_unix_nano, "stage `{}` ends before it starts", s.name);
    }

    let plain = metrics_text(&svc).await;
    assert_eq!(sample(&plain, r#"musetalk_jobs_total{mode="simple",backend="musetalk",outcome="succeeded"}"#), Some(1.0), "{plain}");
    assert_eq!(sample(&plain, r#"musetalk_subprocess_exits_total{backend="musetalk",code="0"}"#), Some(1.0), "{plain}");
}

/// A failed sync job: 500 `job_failed` with the full job body.
async fn expect_job_failed(svc: &Service) -> Value {
    let (status, body) = json_of(submit(svc, good_form(), false).await).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"], "job_failed", "{body}");
    assert_eq!(body["state"], "failed", "{body}");
    assert!(body["job_id"].is_string() && body["output_url"].is_null(), "{body}");
    assert_eq!(body["report"]["outcome"], "failed", "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn musetalk_task_error_with_exit_zero_fails_the_job() {
    let svc = ready(musetalk("task_error", &[], &[])).await;
    let body = expect_job_failed(&svc).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("division by zero"), "{detail}");
    // It did exit 0: the failure came from its output, not its exit code.
    assert_eq!(body["report"]["subprocess"]["exit_code"], 0, "{body}");
    let plain = metrics_text(&svc).await;
    assert_eq!(sample(&plain, r#"musetalk_jobs_total{mode="simple",backend="musetalk",outcome="failed"}"#), Some(1.0), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn musetalk_crash_fails_the_job_with_exit_code_and_traceback() {
    let svc = ready(musetalk("crash", &[], &[])).await;
    let body = expect_job_failed(&svc).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("exit code 1"), "{detail}");
    assert!(detail.contains("CUDA error: out of memory"), "the traceback's tail is in the detail: {detail}");
    assert_eq!(body["report"]["subprocess"]["exit_code"], 1, "{body}");
    assert_eq!(body["report"]["error"]["step"], "subprocess_execution", "the step that failed, not the one that noticed: {body}");
    assert!(detail.starts_with("subprocess_execution: "), "{detail}");
    let plain = metrics_text(&svc).await;
    assert_eq!(sample(&plain, r#"musetalk_subprocess_exits_total{backend="musetalk",code="1"}"#), Some(1.0), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn musetalk_hang_times_out_and_kills_the_process_group() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pids");
    let svc = ready(musetalk("hang", &[format!("MUSETALK_FIXTURE_PIDFILE={}", pidfile.display())], &["--job-timeout", "3s", "--kill-grace", "1s"])).await;
    let t0 = Instant::now();
    let (status, body) = json_of(submit(&svc, good_form(), false).await).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"], "job_timed_out", "{body}");
    assert_eq!(body["state"], "timed_out", "{body}");
    assert_eq!(body["report"]["outcome"], "timed_out", "{body}");
    assert!(t0.elapsed() < Duration::from_secs(20), "the timeout took {:?}", t0.elapsed());

    let text = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("the fixture never wrote {} ({e}): it did not reach the hang in 3 s", pidfile.display()));
    let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 2, "{text:?}");
    let leader = body["report"]["subprocess"]["pid"].as_i64().unwrap() as i32;
    assert_eq!(pids[0], leader, "the pidfile's first pid is the pipeline the sidecar started");
    assert_all_gone(&pids, leader).await;

    let plain = metrics_text(&svc).await;
    let killed = ["signal_15", "signal_9"].iter().any(|c| sample(&plain, &format!(r#"musetalk_subprocess_exits_total{{backend="musetalk",code="{c}"}}"#)).is_some_and(|v| v >= 1.0));
    assert!(killed, "no signal exit counted:\n{}", plain.lines().filter(|l| l.contains("subprocess_exits")).collect::<Vec<_>>().join("\n"));
    assert_eq!(sample(&plain, r#"musetalk_jobs_total{mode="simple",backend="musetalk",outcome="timed_out"}"#), Some(1.0));
}

// ---------------------------------------------------------------------------------------
// 4. Admission queue.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_and_queued_jobs_all_run() {
    let svc = ready(musetalk("slow", &["MUSETALK_FIXTURE_SLEEP=2".into()], &["--max-concurrent-jobs", "1", "--queue-size", "2"])).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(accepted_id(submit(&svc, good_form(), true).await).await);
    }
    // One running (or about to), two waiting: the next is refused before its upload is read.
    let r = submit(&svc, good_form(), true).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers().get("retry-after").expect("429 has Retry-After").to_str().unwrap().parse().unwrap();
    // No job has finished yet: 5 s assumed for each of the 3 ahead, on 1 slot.
    assert_eq!(retry, 15, "{retry}");
    let (_, body) = json_of(r).await;
    assert_eq!(body["error"], "queue_full", "{body}");
    assert!(body["detail"].is_string(), "{body}");
    // The bound just hit is published: 1 run slot + 2 queue places, all taken.
    let full = metrics_text(&svc).await;
    let admitted = |family: &str| sample(&full, &format!(r#"{family}{{mode="simple"}}"#)).unwrap_or_else(|| panic!("no {family}:\n{full}"));
    assert_eq!(admitted("musetalk_jobs_capacity"), 3.0);
    assert_eq!(admitted("musetalk_jobs_in_flight") + admitted("musetalk_jobs_queued"), 3.0, "{full}");

    // Meanwhile only one runs at a time.
    let states: Vec<String> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(get_json(&svc, &format!("/v1/jobs/{id}")).await.1["state"].as_str().unwrap().to_string());
        }
        v
    };
    assert!(states.iter().filter(|s| *s == "running").count() <= 1, "{states:?}");

    for id in &ids {
        wait_job(&svc, id, JOB_TIMEOUT, "succeeded", |v| {
            let s = v["state"].as_str().unwrap_or_default();
            assert!(!matches!(s, "failed" | "cancelled" | "timed_out"), "job {id} ended {v}");
            s == "succeeded"
        })
        .await;
    }
    let plain = metrics_text(&svc).await;
    let waits = sample(&plain, r#"musetalk_queue_wait_seconds_count{mode="simple"}"#).unwrap_or_else(|| panic!("no queue wait count:\n{plain}"));
    assert!(waits >= 3.0, "{waits}");
    assert_eq!(sample(&plain, r#"musetalk_jobs_total{mode="simple",backend="musetalk",outcome="succeeded"}"#), Some(3.0));
    // Full again: Retry-After now comes from what the jobs really took (each sleeps 2 s
    // in the fixture, plus its start): 3 ahead of ~2–4 s, not 3 × the assumed 5 s.
    let again: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(accepted_id(submit(&svc, good_form(), true).await).await);
        }
        v
    };
    let r = submit(&svc, good_form(), true).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    // The moving average (weight 0.2 on the newest) of the finished jobs' processing
    // times, in the order they finished, × 3 jobs ahead on 1 slot.
    let mut avg: Option<f64> = None;
    for id in &ids {
        let r = get_json(&svc, &format!("/v1/jobs/{id}/report")).await.1;
        let p = r["total_seconds"].as_f64().unwrap() - r["queue_seconds"].as_f64().unwrap();
        avg = Some(avg.map_or(p, |a| 0.8 * a + 0.2 * p));
    }
    let expected = (avg.unwrap() * 3.0).ceil() as u64;
    assert!(retry.abs_diff(expected) <= 1 && retry >= 6, "Retry-After {retry} s; the jobs' own times make {expected} s (each sleeps 2 s)");
    for id in &again {
        assert_eq!(svc.client().delete(svc.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().status(), StatusCode::OK);
    }
    // The queue is free again.
    let id = accepted_id(submit(&svc, good_form(), true).await).await;
    assert_eq!(svc.client().delete(svc.url(&format!("/v1/jobs/{id}"))).send().await.unwrap().status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// 5. Cancellation mid-run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_a_running_job_and_kills_its_processes() {
    let svc = ready(musetalk("slow", &["MUSETALK_FIXTURE_SLEEP=20".into()], &[])).await;
    let id = accepted_id(submit(&svc, good_form(), true).await).await;
    wait_job(&svc, &id, Duration::from_secs(30), "running unet_inference", |v| v["state"] == "running" && v["stage"] == "unet_inference").await;

    let t0 = Instant::now();
    let (status, body) = json_of(svc.client().delete(svc.url(&format!("/v1/jobs/{id}"))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled", "{body}");
    assert_eq!(body["job_id"], id.as_str());
    assert!(t0.elapsed() < Duration::from_secs(10), "cancel took {:?}", t0.elapsed());

    let (status, st) = get_json(&svc, &format!("/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(st["state"], "cancelled", "{st}");
    let (status, report) = get_json(&svc, &format!("/v1/jobs/{id}/report")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["outcome"], "cancelled", "{report}");
    let pid = report["subprocess"]["pid"].as_i64().unwrap_or_else(|| panic!("no subprocess pid: {report}")) as i32;
    assert!(pid > 0);
    assert_all_gone(&[pid], pid).await;
    // No output for a cancelled job; a second DELETE is refused.
    let r = svc.get(&format!("/v1/jobs/{id}/output")).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (status, body) = json_of(svc.client().delete(svc.url(&format!("/v1/jobs/{id}"))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "job_finished");
    let plain = metrics_text(&svc).await;
    assert_eq!(sample(&plain, r#"musetalk_jobs_total{mode="simple",backend="musetalk",outcome="cancelled"}"#), Some(1.0));
}

// ---------------------------------------------------------------------------------------
// 6. Bad input.

async fn expect_error(svc: &Service, r: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let (got, body) = json_of(r).await;
    assert_eq!((got, body["error"].as_str().unwrap_or_default()), (status, code), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    let left = job_dirs(svc);
    assert!(left.is_empty(), "`{code}` left job dirs behind: {left:?}");
    body
}

/// Posts a multipart body announced 1 MB longer than what is sent: two `video` parts, so
/// the service refuses it at the second with the rest of the body never sent. Returns
/// the response head and whatever of the body arrived before the service closed.
async fn refused_mid_upload(svc: &Service, video: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut body = Vec::new();
    for _ in 0..2 {
        body.extend_from_slice(b"--B\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\nContent-Type: video/mp4\r\n\r\n");
        body.extend_from_slice(video);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--B\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n");
    let addr = svc.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("POST /v1/inference HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: {}\r\n\r\n", body.len() + 1_000_000);
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the service closes, or 10 s.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete response: {text:?}"));
    (head.to_string(), rest.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx_and_leaves_nothing_behind() {
    let svc = ready(ServiceBuilder::new()).await;
    let m = media();
    let video = || file_part(&m.video, "v.mp4");
    let audio = || file_part(&m.audio, "a.wav");
    let bad = StatusCode::BAD_REQUEST;

    let cases: Vec<(&str, Form)> = vec![
        ("missing_part", Form::new().part("video", video())),
        ("missing_part", Form::new().part("audio", audio())),
        ("empty_file", Form::new().part("video", Part::bytes(Vec::new()).file_name("v.mp4")).part("audio", audio())),
        ("invalid_video", Form::new().part("video", Part::bytes(b"this is plain text, not a video\n".repeat(20)).file_name("v.mp4")).part("audio", audio())),
        // A video with no audio stream, sent as the audio.
        ("invalid_audio", Form::new().part("video", video()).part("audio", file_part(&m.video, "silent.mp4"))),
        ("invalid_avatar_id", good_form().text("avatar_id", "../../etc")),
        ("invalid_batch_size", good_form().text("batch_size", "-1")),
        ("unknown_part", good_form().text("colour", "blue")),
        ("duplicate_part", Form::new().part("video", video()).part("video", video()).part("audio", audio())),
    ];
    for (code, form) in cases {
        expect_error(&svc, submit(&svc, form, false).await, bad, code).await;
    }
    // A refusal before the body was read to its end says `Connection: close`: the rest of
    // the upload is still on that connection, and a client reusing it failed its next
    // request. Sent raw, so that the rest is surely unsent: the body announces 1 MB more
    // than the two `video` parts it carries, and is refused at the second.
    let (head, answer) = refused_mid_upload(&svc, &std::fs::read(&m.video).unwrap()).await;
    assert!(head.starts_with("HTTP/1.1 400") && answer.contains("duplicate_part"), "{head}\n{answer}");
    assert!(head.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{head}");
    let r = svc.client().post(svc.url("/v1/inference")).header("content-type", "application/json").body(r#"{"video":"v.mp4"}"#).send().await.unwrap();
    expect_error(&svc, r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_multipart").await;
    expect_error(&svc, svc.get("/v1/jobs/nope").await, StatusCode::NOT_FOUND, "job_not_found").await;
    let r = svc.client().delete(svc.url("/v1/jobs/nope")).send().await.unwrap();
    expect_error(&svc, r, StatusCode::NOT_FOUND, "job_not_found").await;

    // Rejected uploads hold no queue place: a good job still runs, and it cannot be cancelled once done.
    let (status, body) = json_of(submit(&svc, good_form(), false).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["job_id"].as_str().unwrap();
    let (status, body) = json_of(svc.client().delete(svc.url(&format!("/v1/jobs/{id}"))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "job_finished", "{body}");
    assert_eq!(job_dirs(&svc), vec![id.to_string()]);
    // Rejections are no jobs: only the good one was counted.
    let plain = metrics_text(&svc).await;
    let total: f64 = plain.lines().filter(|l| l.starts_with("musetalk_jobs_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
    assert_eq!(total, 1.0, "{plain}");

    let r = svc.get("/healthz").await;
    assert_eq!(r.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// 7. Graceful shutdown with a job in flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_sync_request_finish_and_its_job_answered_meanwhile() {
    let svc = std::sync::Arc::new(ready(musetalk("slow", &["MUSETALK_FIXTURE_SLEEP=2".into()], &["--shutdown-grace", "20s"])).await);
    let s = svc.clone();
    let request = tokio::spawn(async move { json_of(submit(&s, good_form(), false).await).await });

    // Wait until the job runs, then ask the service to stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, list) = get_json(&svc, "/v1/jobs").await;
        if list.as_array().unwrap().iter().any(|j| j["state"] == "running") {
            break;
        }
        assert!(Instant::now() < deadline, "no running job: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc.sigterm();
    // Draining: readiness and admission turn new work away, while the job's follow-ups
    // are still answered here (behind a routing proxy, only this replica can).
    let deadline = Instant::now() + Duration::from_secs(10);
    while svc.get("/readyz").await.status() != StatusCode::SERVICE_UNAVAILABLE {
        assert!(Instant::now() < deadline, "readiness never turned 503 on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, list) = get_json(&svc, "/v1/jobs").await;
    let id = list[0]["job_id"].as_str().unwrap().to_string();
    let (status, job) = get_json(&svc, &format!("/v1/jobs/{id}")).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("running")), "{job}");
    let (status, refused) = json_of(submit(&svc, good_form(), true).await).await;
    assert_eq!((status, refused["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down")), "{refused}");

    let (status, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}; logs:\n{}", svc.logs());
    assert_eq!(body["state"], "succeeded", "{body}");
    let exit = svc.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(exit.code(), Some(0), "{exit}; logs:\n{}", svc.logs());
}

// ---------------------------------------------------------------------------------------
// Bearer auth.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_the_api_but_not_the_admin_routes() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# api tokens\nsecret-one\nsecret-two\n").unwrap();
    let svc = ready(ServiceBuilder::new().arg("--auth-token-file").arg(&tokens)).await;
    for auth in [None, Some("Bearer wrong"), Some("Basic c2VjcmV0LW9uZQ=="), Some("Bearer secret-on")] {
        let mut req = svc.client().post(svc.url("/v1/inference")).multipart(good_form());
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"), "{auth:?}");
        let connection = r.headers().get("connection").map(|v| v.to_str().unwrap().to_string());
        let (status, body) = json_of(r).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
        // The refused upload's connection is closed by the server (its body was never read).
        assert_eq!(connection.as_deref(), Some("close"), "{auth:?}");
        let (status, _) = json_of(svc.client().get(svc.url("/v1/jobs")).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert!(job_dirs(&svc).is_empty(), "a refused request writes nothing");
    let r = svc.client().post(svc.url("/v1/inference")).header("Authorization", "Bearer secret-two").multipart(good_form()).send().await.unwrap();
    let (status, body) = json_of(r).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for open in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(svc.get(open).await.status(), StatusCode::OK, "{open} needs no token");
    }
}

#[test]
fn unreadable_or_empty_token_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n# nothing\n").unwrap();
    for (file, needle) in [(empty.as_path(), "holds no token"), (dir.path().join("missing").as_path(), "cannot read --auth-token-file")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_musetalk-sidecar"))
            .args(["--listen", "127.0.0.1:0", "--auth-token-file"])
            .arg(file)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
}

/// A failure names its step once: a pipeline that exits 0 without writing its output
/// fails at output_discovery, and the detail says so once (it used to read
/// `output_discovery: output_discovery: …`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_names_its_step_once() {
    let svc = ready(ServiceBuilder::new().args(["--backend", "command", "--pipeline-command", "true {video} {output}"])).await;
    let body = expect_job_failed(&svc).await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.starts_with("output_discovery: ") && !detail.contains("output_discovery: output_discovery"), "{detail}");
    assert_eq!(body["report"]["error"]["step"], "output_discovery", "{body}");
    let message = body["report"]["error"]["message"].as_str().unwrap();
    assert!(!message.starts_with("output_discovery"), "the message does not repeat the step: {message}");
    let status = get_json(&svc, &format!("/v1/jobs/{}", body["job_id"].as_str().unwrap())).await.1;
    assert!(status["error"].as_str().is_some_and(|e| e.matches("output_discovery").count() <= 1), "{status}");
}
