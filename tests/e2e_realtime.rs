//! End-to-end tests of realtime mode against the REAL binary: avatars and speak with the
//! `preview` engine, and persistent workers speaking `docs/worker-protocol.md` (the
//! fixture worker in `tests/fixtures/worker`, real ffmpeg work, no model): stage spans
//! under the right parent, progress, a crash mid-job, a hung worker, shutdown.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::media::file_part as part;
use common::prometheus::sample as metric;
use common::otlp::{OtlpReceiver, ReceivedSpan};
use common::service::{Service, ServiceBuilder};
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

struct Media {
    video: PathBuf,
    audio: PathBuf,
}

fn media() -> &'static Media {
    static M: OnceLock<Media> = OnceLock::new();
    M.get_or_init(|| Media { video: common::media::video(128, 128, 25, 2), audio: common::media::sine(440, 2, 16_000) })
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}")))
}

async fn prepare(svc: &Service, id: &str) -> (StatusCode, Value) {
    let form = Form::new().part("video", part(&media().video, "v.mp4")).text("avatar_id", id.to_string());
    json_of(svc.client().post(svc.url("/v1/avatars")).multipart(form).send().await.unwrap()).await
}

async fn speak(svc: &Service, id: &str) -> (StatusCode, Value) {
    let form = Form::new().part("audio", part(&media().audio, "a.wav"));
    json_of(svc.client().post(svc.url(&format!("/v1/avatars/{id}/speak"))).multipart(form).send().await.unwrap()).await
}

/// Polls until the avatar leaves `preparing`; returns its info.
async fn wait_avatar(svc: &Service, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = json_of(svc.get(&format!("/v1/avatars/{id}")).await).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if v["state"] != "preparing" {
            return v;
        }
        assert!(Instant::now() < deadline, "avatar {id} still preparing; logs:\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(svc: &Service) -> String {
    svc.get("/metrics").await.text().await.unwrap()
}


async fn download(svc: &Service, url: &str) -> PathBuf {
    let bytes = svc.get(url).await.bytes().await.unwrap();
    let p = svc.data_dir().join(format!("dl-{}.mp4", uuid()));
    std::fs::write(&p, &bytes).unwrap();
    p
}

fn uuid() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_avatar_prepare_speak_and_refusals() {
    let svc = ServiceBuilder::new().start().await;
    svc.wait_ready().await;
    // Unknown avatar → 404 with a clear message.
    let (status, v) = speak(&svc, "nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"], "avatar_not_found");
    // Bad ids are refused before anything is stored.
    for bad in ["../etc", "a b", "", &"x".repeat(65)] {
        let (status, v) = prepare(&svc, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"], "invalid_avatar_id");
    }
    let (status, v) = prepare(&svc, "alice").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["avatar"]["state"], "preparing");
    let job = v["job_id"].as_str().unwrap().to_string();
    // A second prepare of the same id is a conflict, not an overwrite.
    let (status, v) = prepare(&svc, "alice").await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "avatar_exists");
    let info = wait_avatar(&svc, "alice").await;
    assert_eq!(info["state"], "ready", "{info}");
    let (_, report) = json_of(svc.get(&format!("/v1/jobs/{job}/report")).await).await;
    let steps: Vec<&str> = report["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["file_processing", "avatar_preparation", "response_preparation"], "{report}");
    assert_eq!(report["mode"], "realtime");

    let (status, v) = speak(&svc, "alice").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "succeeded");
    let steps: Vec<&str> = v["report"]["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["file_processing", "inference", "output_discovery", "response_preparation"]);
    let out = download(&svc, v["output_url"].as_str().unwrap()).await;
    assert!((common::media::duration(&out) - 2.0).abs() <= 0.05, "output lasts as long as the clip");

    let (status, list) = json_of(svc.get("/v1/avatars").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let m = metrics(&svc).await;
    assert_eq!(metric(&m, r#"musetalk_jobs_total{mode="realtime",backend="preview",outcome="succeeded"}"#), Some(2.0), "{m}");
    assert!(m.contains(r#"musetalk_step_duration_seconds_count{mode="realtime",step="inference"} 1"#));

    let r = svc.client().delete(svc.url("/v1/avatars/alice")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(!svc.data_dir().join("avatars/alice").exists(), "its files are gone");
    let (status, _) = speak(&svc, "alice").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------
// Persistent workers: the fixture worker speaks the protocol and does real ffmpeg work.

fn fixture_worker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/worker/fixture_worker.py")
}

/// A service whose realtime mode runs fixture workers in `mode`.
fn with_workers(mode: &str, state_dir: &Path, extra: &[&str]) -> ServiceBuilder {
    ServiceBuilder::new()
        .args(["--backend", "command", "--pipeline-command", "cp {video} {output}", "--realtime"])
        .arg("--worker-command")
        .arg(format!("python3 -u {}", fixture_worker().display()))
        .arg("--pipeline-env")
        .arg(format!("FIXTURE_WORKER_MODE={mode},FIXTURE_WORKER_STATE_DIR={},PYTHONDONTWRITEBYTECODE=1", state_dir.display()))
        .args(extra.iter().copied())
}

fn span_named<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no span {name}: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_prepare_and_speak_are_traced_with_the_workers_stages() {
    let receiver = OtlpReceiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let svc = with_workers("ok", state.path(), &["--otlp-endpoint", &receiver.grpc_endpoint(), "--realtime-gpus", "0"]).start().await;
    let ready = svc.wait_ready().await;
    assert!(ready["checks"].as_array().unwrap().iter().any(|c| c["name"] == "realtime_workers" && c["ok"] == true), "{ready}");
    assert!(svc.logs().contains("CUDA_VISIBLE_DEVICES=0"), "the worker got its GPU: {}", svc.logs());
    let m = metrics(&svc).await;
    assert_eq!(metric(&m, r#"musetalk_worker_up{worker="gpu0"}"#), Some(1.0), "{m}");

    let (status, v) = prepare(&svc, "bob").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let prep_trace = v["trace_id"].as_str().unwrap().to_string();
    assert_eq!(wait_avatar(&svc, "bob").await["state"], "ready");

    let (status, v) = speak(&svc, "bob").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let report = &v["report"];
    assert_eq!(report["worker"], "gpu0");
    let stages: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["audio_features", "unet_inference", "blending", "video_encoding", "audio_mux"], "{report}");
    let out = download(&svc, v["output_url"].as_str().unwrap()).await;
    assert!((common::media::duration(&out) - 2.0).abs() <= 0.05);

    // Spans: the worker's stages are children of the `inference` step, with the worker's timings.
    let trace_id = v["trace_id"].as_str().unwrap().to_string();
    let spans = receiver.wait_for(Duration::from_secs(15), |s| s.iter().any(|x| x.trace_id == trace_id && x.name == "audio_mux") && s.iter().any(|x| x.trace_id == trace_id && x.name == "musetalk.job")).await;
    let trace: Vec<ReceivedSpan> = spans.into_iter().filter(|s| s.trace_id == trace_id).collect();
    let inference = span_named(&trace, "inference");
    let job = span_named(&trace, "musetalk.job");
    assert_eq!(inference.parent_span_id.as_deref(), Some(job.span_id.as_str()));
    assert_eq!(job.attr("musetalk.mode").and_then(|a| a.as_str()), Some("realtime"));
    let mut last_start = 0;
    for name in stages {
        let s = span_named(&trace, name);
        assert_eq!(s.parent_span_id.as_deref(), Some(inference.span_id.as_str()), "{name} under inference");
        assert!(s.start_unix_nano >= inference.start_unix_nano && s.end_unix_nano <= inference.end_unix_nano + 50_000_000, "{name} inside inference");
        assert!(s.start_unix_nano >= last_start, "{name} in order");
        last_start = s.start_unix_nano;
    }
    // Preparation stages are in the prepare job's trace.
    let prep = receiver.wait_for(Duration::from_secs(15), |s| s.iter().any(|x| x.trace_id == prep_trace && x.name == "mask_generation")).await;
    let prep: Vec<ReceivedSpan> = prep.into_iter().filter(|s| s.trace_id == prep_trace).collect();
    let step = span_named(&prep, "avatar_preparation");
    for name in ["frame_extraction", "face_detection", "latent_encoding", "mask_generation"] {
        assert_eq!(span_named(&prep, name).parent_span_id.as_deref(), Some(step.span_id.as_str()));
    }
    let m = metrics(&svc).await;
    // The stage histogram carries the configuration labels (README "Streamed speak and latency").
    assert!(
        m.lines().any(|l| l.starts_with(r#"musetalk_stage_duration_seconds_count{mode="realtime",stage="unet_inference",version="command",fp16="false",batch_size="default",worker="gpu0"}"#) && l.ends_with(" 1")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_crash_mid_job_fails_it_clearly_and_the_worker_comes_back() {
    let state = tempfile::tempdir().unwrap();
    let svc = with_workers("crash_once", state.path(), &[]).start().await;
    svc.wait_ready().await;
    let (status, _) = prepare(&svc, "carol").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(wait_avatar(&svc, "carol").await["state"], "ready");
    let (status, v) = speak(&svc, "carol").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"], "job_failed");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("died during infer") && detail.contains("exit code 3"), "{detail}");
    // The worker restarts; the next job succeeds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(&svc).await;
        if metric(&m, r#"musetalk_worker_up{worker="gpu0"}"#) == Some(1.0) {
            assert_eq!(metric(&m, r#"musetalk_worker_restarts_total{worker="gpu0"}"#), Some(1.0), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "worker not back: {}", svc.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = speak(&svc, "carol").await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_worker_times_out_is_killed_with_its_children_and_restarted() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("pids");
    let svc = with_workers("hang_once", state.path(), &["--job-timeout", "3s", "--kill-grace", "1s"])
        .arg("--pipeline-env")
        .arg(format!("FIXTURE_WORKER_PIDFILE={}", pidfile.display()))
        .start()
        .await;
    svc.wait_ready().await;
    let (status, _) = prepare(&svc, "dave").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(wait_avatar(&svc, "dave").await["state"], "ready");
    let (status, v) = speak(&svc, "dave").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert_eq!(v["error"], "job_timed_out");
    let pids: Vec<i32> = std::fs::read_to_string(&pidfile).unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2, "worker and its child");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "hung worker or its child still alive: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, v) = speak(&svc, "dave").await;
    assert_eq!(status, StatusCode::OK, "restarted worker serves: {v}");
    assert_eq!(metric(&metrics(&svc).await, r#"musetalk_worker_restarts_total{worker="gpu0"}"#), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_error_keeps_the_worker_and_shutdown_leaves_no_process() {
    let state = tempfile::tempdir().unwrap();
    let svc = with_workers("error_on_infer", state.path(), &["--realtime-gpus", "0,1"]).start().await;
    svc.wait_ready().await;
    let (status, _) = prepare(&svc, "erin").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(wait_avatar(&svc, "erin").await["state"], "ready");
    let (status, v) = speak(&svc, "erin").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("no face detected"), "{v}");
    let m = metrics(&svc).await;
    assert_eq!(metric(&m, r#"musetalk_worker_restarts_total{worker="gpu0"}"#).unwrap_or(0.0), 0.0, "an error is not a crash");
    assert_eq!(metric(&m, r#"musetalk_worker_up{worker="gpu1"}"#), Some(1.0), "one worker per GPU");
    // Every worker process, found by its command line, ends with the service.
    let workers = worker_pids(svc.pid());
    assert_eq!(workers.len(), 2, "two workers: {workers:?}");
    svc.sigterm();
    let status = svc.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", svc.logs());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for p in workers {
        assert!(!alive(p), "worker {p} outlived the service");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_avatars_survive_a_restart_and_speak_again() {
    let state = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let svc = with_workers("ok", state.path(), &[]).data_dir(data.path()).start().await;
    svc.wait_ready().await;
    let (status, v) = prepare(&svc, "rita").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let prepare_job = v["job_id"].as_str().unwrap().to_string();
    let before = wait_avatar(&svc, "rita").await;
    assert_eq!((&before["state"], &before["restored"]), (&Value::from("ready"), &Value::from(false)), "{before}");
    svc.sigterm();
    assert!(svc.wait_exit(Duration::from_secs(20)).await.success(), "{}", svc.logs());

    // The same engine on the same data dir: the avatar is ready at once, no new preparation.
    let svc = with_workers("ok", state.path(), &[]).data_dir(data.path()).start().await;
    svc.wait_ready().await;
    let (status, after) = json_of(svc.get("/v1/avatars/rita").await).await;
    assert_eq!(status, StatusCode::OK, "{after}\n{}", svc.logs());
    assert_eq!((&after["state"], &after["restored"]), (&Value::from("ready"), &Value::from(true)), "{after}");
    for field in ["prepare_job_id", "created_at", "video_seconds", "video_frames", "width", "height"] {
        assert_eq!(after[field], before[field], "{field} survives the restart");
    }
    assert_eq!(after["prepare_job_id"], prepare_job.as_str());
    assert!(svc.logs().contains("restored the avatars of an earlier run"), "{}", svc.logs());
    let (status, v) = speak(&svc, "rita").await;
    assert_eq!(status, StatusCode::OK, "a restored avatar speaks with the material on disk: {v}\n{}", svc.logs());
    let out = download(&svc, v["output_url"].as_str().unwrap()).await;
    assert!((common::media::duration(&out) - 2.0).abs() <= 0.05);
    svc.sigterm();
    assert!(svc.wait_exit(Duration::from_secs(20)).await.success(), "{}", svc.logs());

    // Another engine (preview) cannot use the worker's material: listed as failed, with
    // why and what to do; its files are kept.
    let svc = ServiceBuilder::new().data_dir(data.path()).start().await;
    svc.wait_ready().await;
    let (_, other) = json_of(svc.get("/v1/avatars/rita").await).await;
    assert_eq!(other["state"], "failed", "{other}");
    assert!(other["error"].as_str().unwrap().contains("`worker` realtime engine"), "{other}");
    let (status, v) = speak(&svc, "rita").await;
    assert_eq!((status, v["error"].as_str()), (StatusCode::CONFLICT, Some("avatar_failed")), "{v}");
    assert!(data.path().join("avatars/rita/avatar.json").is_file());
    // DELETE removes it, files and all, and the id can be prepared again.
    assert_eq!(svc.client().delete(svc.url("/v1/avatars/rita")).send().await.unwrap().status(), StatusCode::NO_CONTENT);
    assert!(!data.path().join("avatars/rita").exists());
    let (status, v) = prepare(&svc, "rita").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(wait_avatar(&svc, "rita").await["state"], "ready");
}

/// Children of the service process (the workers).
fn worker_pids(service: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{service}/task")).unwrap().flatten() {
        if let Ok(c) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(c.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out.retain(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).map(|c| c.contains("fixture_worker")).unwrap_or(false));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_off_for_non_preview_backends_says_how_to_turn_it_on() {
    let svc = ServiceBuilder::new().args(["--backend", "command", "--pipeline-command", "cp {video} {output}"]).start().await;
    svc.wait_ready().await;
    let (status, v) = prepare(&svc, "frank").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "realtime_unavailable");
    assert!(v["detail"].as_str().unwrap().contains("--realtime"), "{v}");
}

/// `(status, body)` of `POST /v1/avatars/{id}/speak` with `Prefer: respond-async`.
async fn speak_async(svc: &Service, id: &str, audio: &Path) -> (StatusCode, Value) {
    let form = Form::new().part("audio", part(audio, "a.wav"));
    json_of(svc.client().post(svc.url(&format!("/v1/avatars/{id}/speak"))).header("Prefer", "respond-async").multipart(form).send().await.unwrap()).await
}

async fn prepare_with(svc: &Service, id: &str, video: &Path) -> (StatusCode, Value) {
    let form = Form::new().text("avatar_id", id.to_string()).part("video", part(video, "v.mp4"));
    json_of(svc.client().post(svc.url("/v1/avatars")).multipart(form).send().await.unwrap()).await
}

/// Waits for a job to end; returns its status.
async fn wait_job(svc: &Service, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = json_of(svc.get(&format!("/v1/jobs/{job}")).await).await;
        if ["succeeded", "failed", "cancelled", "timed_out"].contains(&v["state"].as_str().unwrap_or_default()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {job} did not end: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PSNR (dB) of the first frame of `a` against the first frame of `b`.
fn first_frame_psnr(a: &Path, b: &Path) -> f64 {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "info", "-nostats", "-i"])
        .arg(a)
        .arg("-i")
        .arg(b)
        .args(["-lavfi", "[0:v]scale=320:240,format=yuv420p[x];[1:v]scale=320:240,format=yuv420p[y];[x][y]psnr", "-frames:v", "1", "-f", "null", "-"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let v = err.split("average:").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no PSNR: {err}")).to_string();
    if v == "inf" { 99.0 } else { v.parse().unwrap() }
}

/// Speaks hold their avatar: DELETE while one runs and one waits is refused
/// (`409 avatar_busy`), so is re-creating the id, and both speaks render the avatar they
/// were accepted for; once they are done the avatar is deleted, re-created from another
/// video, and speaks with that one. `--max-concurrent-jobs 1` is one budget for all:
/// the second speak waits while the first runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_hold_their_avatar_against_delete_and_re_creation() {
    let svc = ServiceBuilder::new().args(["--max-concurrent-jobs", "1"]).start().await;
    svc.wait_ready().await;
    let old_video = common::media::video(640, 480, 25, 2);
    let new_video = common::media::make("smptebars-640x480-25fps-2s.mp4", &["-f", "lavfi", "-i", "smptebars=size=640x480:rate=25", "-t", "2", "-pix_fmt", "yuv420p", "-c:v", "libx264"]);
    let long = common::media::sine(440, 30, 16_000);
    let (status, v) = prepare_with(&svc, "held", &old_video).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(wait_avatar(&svc, "held").await["state"], "ready");

    let (s1, j1) = speak_async(&svc, "held", &long).await;
    let (s2, j2) = speak_async(&svc, "held", &long).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED), "{j1} {j2}");
    let (id1, id2) = (j1["job_id"].as_str().unwrap().to_string(), j2["job_id"].as_str().unwrap().to_string());
    // One run slot for everything: while the first renders, the second waits.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, a) = json_of(svc.get(&format!("/v1/jobs/{id1}")).await).await;
        let (_, b) = json_of(svc.get(&format!("/v1/jobs/{id2}")).await).await;
        assert!(!(a["state"] == "running" && b["state"] == "running"), "two renders at once under --max-concurrent-jobs 1");
        if a["state"] == "running" && b["state"] == "queued" {
            break;
        }
        assert!(Instant::now() < deadline, "never saw one running and one queued: {a} {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let r = svc.client().delete(svc.url("/v1/avatars/held")).send().await.unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "avatar_busy", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("2 speak"), "{v}");
    let (status, v) = prepare_with(&svc, "held", &new_video).await;
    assert_eq!(status, StatusCode::CONFLICT, "re-creating a held id is refused: {v}");
    assert_eq!(v["error"], "avatar_exists", "{v}");

    for id in [&id1, &id2] {
        let done = wait_job(&svc, id).await;
        assert_eq!(done["state"], "succeeded", "{done}\n{}", svc.logs());
        let out = download(&svc, &format!("/v1/jobs/{id}/output")).await;
        assert!(first_frame_psnr(&out, &old_video) > 30.0, "job {id} rendered the avatar it was accepted for");
    }
    let r = svc.client().delete(svc.url("/v1/avatars/held")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // Re-created from the other video: its speaks show that one, never the old one.
    let (status, v) = prepare_with(&svc, "held", &new_video).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(wait_avatar(&svc, "held").await["state"], "ready");
    let (status, v) = speak(&svc, "held").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let out = download(&svc, v["output_url"].as_str().unwrap()).await;
    assert!(first_frame_psnr(&out, &new_video) > 30.0, "the re-created avatar's video");
    assert!(first_frame_psnr(&out, &old_video) < 20.0, "not the old one's");
    let names: Vec<String> = std::fs::read_dir(svc.data_dir().join("avatars/held")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(&id1) && !n.contains(&id2)), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("source-")) && names.iter().any(|n| n.starts_with("material-")), "per-preparation names: {names:?}");
}

/// An avatar id sent before the video is reserved before the upload is read: a taken
/// id is refused while the video is still on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_avatar_id_is_refused_before_the_upload() {
    let svc = ServiceBuilder::new().start().await;
    svc.wait_ready().await;
    let (status, v) = prepare(&svc, "taken").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    wait_avatar(&svc, "taken").await;
    // The id part, then the first KiB of the video; the rest is never sent.
    let video = std::fs::read(&media().video).unwrap();
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(video[..1024].to_vec())).unwrap();
    let form = Form::new().text("avatar_id", "taken").part("video", reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(rx)).file_name("v.mp4"));
    let r = tokio::time::timeout(Duration::from_secs(10), svc.client().post(svc.url("/v1/avatars")).multipart(form).send())
        .await
        .expect("the refusal must come while the upload is held")
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "avatar_exists", "{v}");
    drop(tx);
}
