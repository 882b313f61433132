//! Streamed speak (`stream=true`) and realtime latency, against the real binary: the
//! fixture worker (protocol 2: `batch` and `first_frame` events, fragmented MP4 written
//! while its batches come out; it sleeps per batch, so order can be told without timing
//! absolute speed) and the preview engine. The first bytes must reach the client before
//! the worker said `result`; the stream must play whole with the audio's length; a client
//! that leaves mid-stream cancels nothing; an older worker and a failing job still get an
//! honest answer; time to first frame, per-batch latency and time to first byte land in
//! the report and in histograms whose exemplars are traces the OTLP receiver got.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::media::file_part;
use common::otlp::OtlpReceiver;
use common::service::{Service, ServiceBuilder, json};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn worker_service(state: &Path, extra_env: &str) -> ServiceBuilder {
    ServiceBuilder::fixture_musetalk()
        .fixture_worker()
        .arg("--pipeline-env")
        .arg(format!("PYTHONDONTWRITEBYTECODE=1,FIXTURE_WORKER_STATE_DIR={}{extra_env}", state.display()))
}

async fn prepare(svc: &Service, id: &str) {
    let m = common::media::media();
    let form = Form::new().part("video", file_part(&m.video, "v.mp4")).text("avatar_id", id.to_string());
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, a) = json(svc.get(&format!("/v1/avatars/{id}")).await).await;
        if a["state"] == "ready" {
            return;
        }
        assert!(Instant::now() < deadline && a["state"] != "failed", "{a}\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn speak_form(stream: bool) -> Form {
    let mut f = Form::new().part("audio", file_part(&common::media::media().audio, "a.wav")).text("batch_size", "8");
    if stream {
        f = f.text("stream", "true");
    }
    f
}

/// What a streamed answer delivered: when its first bytes came, and all of it.
struct Streamed {
    job: String,
    first_at: f64,
    bytes: Vec<u8>,
    chunks: usize,
}

async fn speak_streamed(svc: &Service, avatar: &str) -> Streamed {
    let r = svc.client().post(svc.url(&format!("/v1/avatars/{avatar}/speak"))).multipart(speak_form(true)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["content-type"], "video/mp4");
    let job = r.headers()["content-location"].to_str().unwrap().trim_start_matches("/v1/jobs/").to_string();
    let mut body = r.bytes_stream();
    let mut out = Streamed { job, first_at: 0.0, bytes: Vec::new(), chunks: 0 };
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("the stream broke: {e}\n{}", svc.logs()));
        if out.chunks == 0 {
            out.first_at = now();
        }
        out.chunks += 1;
        out.bytes.extend_from_slice(&chunk);
    }
    out
}

/// The streamed bytes as a file that decodes whole, with the audio's length.
fn assert_plays(bytes: &[u8]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("streamed.mp4");
    std::fs::write(&f, bytes).unwrap();
    let decode = std::process::Command::new("ffmpeg").args(["-v", "error", "-xerror", "-i"]).arg(&f).args(["-f", "null", "-"]).output().unwrap();
    assert!(decode.status.success(), "the streamed mp4 does not decode: {}", String::from_utf8_lossy(&decode.stderr));
    let streams = std::process::Command::new("ffprobe").args(["-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0"]).arg(&f).output().unwrap();
    let kinds = String::from_utf8_lossy(&streams.stdout).to_string();
    assert!(kinds.contains("video") && kinds.contains("audio"), "streams: {kinds}");
    let d = common::media::duration(&f);
    let audio = common::media::duration(&common::media::media().audio);
    assert!((d - audio).abs() < 0.15, "streamed output lasts {d} s, the audio {audio} s");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_speak_arrives_while_the_worker_still_works() {
    let state = tempfile::tempdir().unwrap();
    let receiver = OtlpReceiver::start().await;
    let svc = worker_service(state.path(), ",FIXTURE_WORKER_BATCH_SLEEP=0.25").args(["--otlp-endpoint", &receiver.grpc_endpoint()]).start().await;
    svc.wait_ready().await;
    prepare(&svc, "s").await;

    let s = speak_streamed(&svc, "s").await;
    // The worker's own `result` time: the first bytes came well before it (10 batches of
    // 0.25 s; the first fragment is out after the second).
    let result: Value = serde_json::from_str(&std::fs::read_to_string(state.path().join(format!("result-{}.json", s.job))).unwrap()).unwrap();
    let result_at = result["time"].as_f64().unwrap();
    assert!(s.first_at < result_at - 0.75, "first bytes at {:.3}, the worker's result at {result_at:.3}: not streamed", s.first_at);
    assert!(s.chunks > 1, "one chunk: nothing was streamed");
    assert_plays(&s.bytes);

    // The report: time to first frame, the batches, time to first byte.
    let (status, report) = json(svc.get(&format!("/v1/jobs/{}/report", s.job)).await).await;
    assert_eq!(status, StatusCode::OK);
    let l = &report["latency"];
    let ttff = l["time_to_first_frame_seconds"].as_f64().unwrap_or_else(|| panic!("{l:#}"));
    let ttfb = l["time_to_first_byte_seconds"].as_f64().unwrap_or_else(|| panic!("{l:#}"));
    assert!(ttff > 0.0 && ttff < report["total_seconds"].as_f64().unwrap(), "{l:#}");
    assert!(ttfb >= ttff, "the first byte cannot come before the first frame: {l:#}");
    assert_eq!(l["batches"]["count"], 10, "{l:#}");
    assert!(l["batches"]["mean_seconds"].as_f64().unwrap() >= 0.25, "{l:#}");
    assert_eq!((l["worker"].as_str(), l["batch_size"].as_str(), l["version"].as_str()), (Some("gpu0"), Some("5-8"), Some("v15")));
    let text = svc.client().get(svc.url(&format!("/v1/jobs/{}/report", s.job))).header("accept", "text/plain").send().await.unwrap().text().await.unwrap();
    assert!(text.contains("Latency: first frame") && text.contains("10 batches"), "{text}");

    // Histograms with exemplars whose trace ids the OTLP receiver got.
    let om = svc.client().get(svc.url("/metrics")).header("accept", "application/openmetrics-text").send().await.unwrap().text().await.unwrap();
    let trace = report["trace_id"].as_str().unwrap();
    for family in ["musetalk_time_to_first_frame_seconds_bucket", "musetalk_batch_duration_seconds_bucket", "musetalk_time_to_first_byte_seconds_bucket"] {
        let line = om.lines().find(|l| l.starts_with(family) && l.contains(&format!("trace_id=\"{trace}\""))).unwrap_or_else(|| panic!("no {family} exemplar for {trace}:\n{om}"));
        for label in ["mode=\"realtime\"", "worker=\"gpu0\"", "batch_size=\"5-8\"", "fp16=\"false\"", "version=\"v15\""] {
            assert!(line.contains(label), "{line}");
        }
    }
    let count = |name: &str| om.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok());
    assert_eq!(count("musetalk_batch_duration_seconds_count"), Some(10.0), "{om}");
    // The first byte is observed once, whether it went out before or after the job ended.
    assert_eq!(count("musetalk_time_to_first_byte_seconds_count"), Some(1.0), "{om}");
    assert_eq!(count("musetalk_time_to_first_frame_seconds_count"), Some(1.0), "{om}");
    receiver.wait_for(Duration::from_secs(10), |spans| spans.iter().any(|s| s.trace_id == trace && s.name == "musetalk.job")).await;

    // A client that leaves mid-stream: its job runs to the end, the next speak is served,
    // and the job's directory holds its output and nothing else.
    let r = svc.client().post(svc.url("/v1/avatars/s/speak")).multipart(speak_form(true)).send().await.unwrap();
    let job = r.headers()["content-location"].to_str().unwrap().trim_start_matches("/v1/jobs/").to_string();
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = json(svc.get(&format!("/v1/jobs/{job}")).await).await;
        if st["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline && !["failed", "cancelled"].contains(&st["state"].as_str().unwrap()), "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = svc.get(&format!("/v1/jobs/{job}/output")).await;
    assert_eq!(out.status(), StatusCode::OK);
    assert_plays(&out.bytes().await.unwrap());
    let left: Vec<String> = std::fs::read_dir(svc.data_dir().join("jobs").join(&job).join("result")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec!["output.mp4".to_string()], "left in the job's result dir");
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars/s/speak")).multipart(speak_form(false)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["report"]["latency"]["time_to_first_byte_seconds"].is_null(), "not streamed: no first byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_engine_streams_too() {
    let svc = ServiceBuilder::new().start().await;
    svc.wait_ready().await;
    prepare(&svc, "p").await;
    let s = speak_streamed(&svc, "p").await;
    assert_plays(&s.bytes);
    let (_, report) = json(svc.get(&format!("/v1/jobs/{}/report", s.job)).await).await;
    let l = &report["latency"];
    assert!(l["time_to_first_frame_seconds"].as_f64().is_some_and(|t| t > 0.0), "{l:#}");
    assert!(l["time_to_first_byte_seconds"].as_f64().is_some(), "{l:#}");
    assert_eq!((l["version"].as_str(), l["worker"].as_str()), (Some("preview"), Some("none")));
    // The stream is the job's output, byte for byte.
    let out = svc.get(&format!("/v1/jobs/{}/output", s.job)).await.bytes().await.unwrap();
    assert_eq!(out.len(), s.bytes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_worker_and_a_failing_job_still_answer_honestly() {
    // A protocol-1 worker writes its output whole: the streamed answer sends it at the end.
    let state = tempfile::tempdir().unwrap();
    let svc = worker_service(state.path(), ",FIXTURE_WORKER_PROTOCOL=1").start().await;
    svc.wait_ready().await;
    prepare(&svc, "old").await;
    let s = speak_streamed(&svc, "old").await;
    assert_plays(&s.bytes);
    let result: Value = serde_json::from_str(&std::fs::read_to_string(state.path().join(format!("result-{}.json", s.job))).unwrap()).unwrap();
    assert!(s.first_at >= result["time"].as_f64().unwrap(), "an older worker's output can only be sent whole, after its result");
    drop(svc);

    // A job that fails before its first frame: the usual JSON error, not a broken video.
    let state = tempfile::tempdir().unwrap();
    let svc = worker_service(state.path(), ",FIXTURE_WORKER_MODE=error_on_infer").start().await;
    svc.wait_ready().await;
    prepare(&svc, "bad").await;
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars/bad/speak")).multipart(speak_form(true)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"], "job_failed");
    assert!(body["detail"].as_str().unwrap().contains("no face detected"), "{body}");
}
