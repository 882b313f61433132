//! Per-job Python profiles with the REAL py-spy (scripts/test.sh installs it from PyPI):
//! the MuseTalk fixture (simple mode, run under py-spy) and the fixture worker (realtime,
//! py-spy attached for one speak) spend their time in distinctly named functions per stage,
//! and each must land in its own stage's window; the profile comes back as speedscope,
//! SVG and collapsed stacks behind the job's bearer auth and goes with the job; the report
//! (JSON and text), the job span, the status page and the metrics say so. Profiling that
//! cannot be done (no py-spy, a py-spy that fails, no Python engine) never fails a job.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::prometheus::sample as metric;
use common::media::file_part;
use common::otlp::OtlpReceiver;
use common::service::{Service, ServiceBuilder, json};
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

const TOKEN: &str = "profile-secret";

/// py-spy on PATH (scripts/test.sh installs it with pip).
fn py_spy() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("py-spy"))
        .find(|p| p.is_file())
        .expect("py-spy is not on PATH: run scripts/test.sh, which installs it (python3 -m pip install py-spy)")
}

fn tokens() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    (dir, file)
}

fn get(svc: &Service, path: &str) -> reqwest::RequestBuilder {
    svc.client().get(svc.url(path)).bearer_auth(TOKEN)
}

async fn infer(svc: &Service, profile: bool) -> Value {
    let m = common::media::media();
    let mut form = Form::new().part("video", file_part(&m.video, "v.mp4")).part("audio", file_part(&m.audio, "a.wav"));
    if profile {
        form = form.text("profile", "true");
    }
    let (status, body) = json(svc.client().post(svc.url("/v1/inference")).bearer_auth(TOKEN).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}\nlogs:\n{}", svc.logs());
    body
}

/// The stage's top functions (own time), names only.
fn top_self(report: &Value, stage: &str) -> Vec<String> {
    let s = report["profile"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap_or_else(|| panic!("no profile for stage {stage}: {:#}", report["profile"]));
    s["top_self"].as_array().unwrap().iter().map(|f| f["function"].as_str().unwrap().to_string()).collect()
}

/// `function`'s share of `stage`'s own time (0 when not listed). Samples are placed by
/// the trace's clock, one sample interval coarse at each stage edge (README "Profiles").
fn share(report: &Value, stage: &str, function: &str) -> f64 {
    let s = report["profile"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap();
    s["top_self"].as_array().unwrap().iter().find(|f| f["function"] == function).and_then(|f| f["percent"].as_f64()).unwrap_or(0.0)
}

/// The first function of `stage`'s own-time ranking, and its percent.
fn leader(report: &Value, stage: &str) -> (String, f64) {
    let s = report["profile"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap();
    let f = &s["top_self"][0];
    (f["function"].as_str().unwrap_or_default().to_string(), f["percent"].as_f64().unwrap_or(0.0))
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_job_is_profiled_under_py_spy_stage_by_stage() {
    let (_t, tokens) = tokens();
    let receiver = OtlpReceiver::start().await;
    let svc = ServiceBuilder::fixture_musetalk()
        .args(["--max-retained-jobs", "1", "--job-retention", "10s"])
        .args(["--pipeline-env", "PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_BUSY=1.5"])
        .arg("--py-spy")
        .arg(py_spy())
        .arg("--auth-token-file")
        .arg(&tokens)
        .args(["--otlp-endpoint", &receiver.grpc_endpoint()])
        .start()
        .await;
    svc.wait_ready().await;

    let body = infer(&svc, true).await;
    let report = &body["report"];
    let job = body["job_id"].as_str().unwrap().to_string();
    let p = &report["profile"];
    assert_eq!(p["url"], format!("/v1/jobs/{job}/profile"), "{p:#}");
    assert!(p["unavailable"].is_null(), "{p:#}");
    assert_eq!(p["rate_hz"], 100);
    assert!(p["samples"].as_u64().unwrap() > 50, "{p:#}");
    // The pipeline ran under py-spy, and its own exit status is the job's.
    assert!(report["subprocess"]["command"].as_str().unwrap().contains("py-spy record"), "{report:#}");
    assert_eq!(report["subprocess"]["exit_code"], 0);

    // Each fixture function in its own stage: the landmark work in face_detection, the
    // UNet batches in unet_inference (each about a second of CPU at 100 Hz).
    let (f, pct) = leader(report, "face_detection");
    assert_eq!(f, "fixture_landmark_work", "{:#}", report["profile"]);
    assert!(pct > 50.0, "face_detection: {pct}% in {f}");
    let (f, pct) = leader(report, "unet_inference");
    assert_eq!(f, "fixture_unet_batch", "{:#}", report["profile"]);
    assert!(pct > 50.0, "unet_inference: {pct}% in {f}");
    // Each function's time stays in its own stage: at most an edge sample spills over.
    assert!(share(report, "face_detection", "fixture_unet_batch") < 5.0, "{:#}", report["profile"]);
    assert!(share(report, "unet_inference", "fixture_landmark_work") < 5.0, "{:#}", report["profile"]);
    assert!(top_self(report, "unet_inference").len() <= 5);
    let unet = report["profile"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "unet_inference").unwrap();
    let total: Vec<&str> = unet["top_total"].as_array().unwrap().iter().map(|f| f["function"].as_str().unwrap()).collect();
    assert!(total.contains(&"main"), "callers count in total time: {total:?}");

    // The three formats, behind the job's auth.
    let r = get(&svc, &format!("/v1/jobs/{job}/profile")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let ss: Value = r.json().await.unwrap();
    assert_eq!(ss["$schema"], "https://www.speedscope.app/file-format-schema.json");
    let frames: Vec<&str> = ss["shared"]["frames"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(frames.contains(&"fixture_unet_batch") && frames.contains(&"fixture_landmark_work"), "{frames:?}");
    assert!(ss["profiles"].as_array().unwrap().iter().any(|p| p["type"] == "evented" && !p["events"].as_array().unwrap().is_empty()));
    let r = get(&svc, &format!("/v1/jobs/{job}/profile?format=svg")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let svg = r.text().await.unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("fixture_unet_batch"), "{}", &svg[..svg.len().min(400)]);
    let collapsed = get(&svc, &format!("/v1/jobs/{job}/profile?format=collapsed")).send().await.unwrap().text().await.unwrap();
    assert!(collapsed.lines().any(|l| l.contains("fixture_unet_batch") && l.rsplit(' ').next().unwrap().parse::<u64>().is_ok()), "{collapsed}");
    let (status, err) = json(get(&svc, &format!("/v1/jobs/{job}/profile?format=pdf")).send().await.unwrap()).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_format")));
    let anon = svc.client().get(svc.url(&format!("/v1/jobs/{job}/profile"))).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED, "the profile is behind the job's auth");

    // The text report reads on from the stage's share to the functions.
    let text = get(&svc, &format!("/v1/jobs/{job}/report")).header("accept", "text/plain").send().await.unwrap().text().await.unwrap();
    assert!(text.contains(&format!("Profile (py-spy, 100 Hz")), "{text}");
    let line = text.lines().find(|l| l.contains("of which") && l.contains("unet_inference")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("fixture_unet_batch"), "{line}");

    // The status page's job view: the flamegraph inline and the per-stage functions.
    let page = get(&svc, &format!("/ui/jobs/{job}")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains(&format!(r#"src="/v1/jobs/{job}/profile?format=svg""#)) && page.contains("fixture_landmark_work"), "{page}");

    // The job span links the profile and sums it up.
    let trace = body["trace_id"].as_str().unwrap().to_string();
    let spans = receiver.wait_for(Duration::from_secs(10), |s| s.iter().any(|s| s.trace_id == trace && s.name == "musetalk.job")).await;
    let span = spans.iter().find(|s| s.trace_id == trace && s.name == "musetalk.job").unwrap();
    assert_eq!(span.attr("musetalk.profile.url").and_then(|v| v.as_str()), Some(format!("/v1/jobs/{job}/profile").as_str()));
    let summary = span.attr("musetalk.profile.summary").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    assert!(summary.contains("unet_inference:") && summary.contains("fixture_unet_batch"), "{summary}");

    let metrics = svc.metrics_text().await;
    assert_eq!(metric(&metrics, r#"musetalk_profiles_total{mode="simple",result="taken",reason="none"}"#), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"musetalk_profiles_total{mode="simple",result="failed",reason="py_spy_failed"}"#), Some(0.0));

    // A job not asked to be profiled has none, and says how to get one. It also pushes the
    // first job out (--max-retained-jobs 1, swept every second with --job-retention 10s):
    // its profile goes with it.
    let plain = infer(&svc, false).await;
    assert!(plain["report"]["profile"].is_null(), "{:#}", plain["report"]);
    let (status, err) = json(get(&svc, &format!("/v1/jobs/{}/profile", plain["job_id"].as_str().unwrap())).send().await.unwrap()).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::NOT_FOUND, Some("profile_not_found")), "{err}");
    assert!(err["detail"].as_str().unwrap().contains("profile=true"), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, err) = json(get(&svc, &format!("/v1/jobs/{job}/profile")).send().await.unwrap()).await;
        if status == StatusCode::NOT_FOUND {
            assert_eq!(err["error"], "job_not_found", "{err}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the first job was not swept: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!svc.data_dir().join("jobs").join(&job).exists(), "the profiled job's directory (and profile) is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_speak_attaches_py_spy_to_the_worker_for_its_request() {
    let (_t, tokens) = tokens();
    let svc = ServiceBuilder::fixture_musetalk()
        .fixture_worker()
        .args(["--pipeline-env", "PYTHONDONTWRITEBYTECODE=1,FIXTURE_WORKER_BUSY=1.5"])
        .arg("--py-spy")
        .arg(py_spy())
        .arg("--auth-token-file")
        .arg(&tokens)
        .start()
        .await;
    let ready = svc.wait_ready().await;
    // This sandbox runs as root: attaching is permitted, and readiness does not say otherwise.
    assert!(!ready.to_string().contains("CAP_SYS_PTRACE"), "{ready}");

    let m = common::media::media();
    let form = Form::new().part("video", file_part(&m.video, "v.mp4")).text("avatar_id", "prof");
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars")).bearer_auth(TOKEN).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, a) = json(get(&svc, "/v1/avatars/prof").send().await.unwrap()).await;
        if a["state"] == "ready" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let form = Form::new().part("audio", file_part(&m.audio, "a.wav")).text("profile", "true");
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars/prof/speak")).bearer_auth(TOKEN).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}\nlogs:\n{}", svc.logs());
    let report = &body["report"];
    assert!(report["profile"]["url"].is_string(), "{:#}", report["profile"]);
    let (f, pct) = leader(report, "audio_features");
    assert_eq!(f, "fixture_worker_features", "{:#}", report["profile"]);
    assert!(pct > 50.0, "audio_features: {pct}%");
    let (f, _) = leader(report, "unet_inference");
    assert_eq!(f, "fixture_worker_unet_batch", "{:#}", report["profile"]);
    assert!(share(report, "audio_features", "fixture_worker_unet_batch") < 5.0, "{:#}", report["profile"]);
    assert!(share(report, "unet_inference", "fixture_worker_features") < 5.0, "{:#}", report["profile"]);
    let metrics = svc.metrics_text().await;
    assert_eq!(metric(&metrics, r#"musetalk_profiles_total{mode="realtime",result="taken",reason="none"}"#), Some(1.0), "{metrics}");
    // The worker lives on after py-spy detached: the next speak (unprofiled) succeeds.
    let form = Form::new().part("audio", file_part(&m.audio, "a.wav"));
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars/prof/speak")).bearer_auth(TOKEN).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_that_cannot_be_done_never_fails_a_job() {
    let (_t, tokens) = tokens();
    let dir = tempfile::tempdir().unwrap();
    // A py-spy that answers --version but fails every recording (as without ptrace).
    let broken = dir.path().join("py-spy");
    std::fs::write(&broken, "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'py-spy 0.4.3'; exit 0; fi\necho 'Error: Permission Denied (os error 13)' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A py-spy that starts the pipeline, then gives up and kills it (as py-spy does when
    // it finds no Python within a second, or cannot read its memory), exiting 0.
    let killer = dir.path().join("py-spy-killer");
    std::fs::write(
        &killer,
        "#!/bin/sh
if [ \"$1\" = --version ]; then echo 'py-spy 0.4.3'; exit 0; fi
while [ \"$1\" != -- ]; do shift; done; shift
\"$@\" &
sleep 0.3
kill -9 $!
echo 'Error: Failed to find python version from target process' >&2
exit 0
",
    )
    .unwrap();
    std::fs::set_permissions(&killer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    for (py_spy, reason, detail) in [
        (PathBuf::from("/nonexistent/py-spy"), "py_spy_missing", "py-spy not found"),
        (broken.clone(), "py_spy_failed", "Permission Denied"),
        (killer.clone(), "py_spy_failed", "py-spy stopped the pipeline before it ended"),
    ] {
        // The MuseTalk fixture (Python, a second of work): py-spy is really used on it.
        let svc = ServiceBuilder::fixture_musetalk()
            .args(["--pipeline-env", "PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_MODE=slow,MUSETALK_FIXTURE_SLEEP=1"])
            .arg("--py-spy")
            .arg(&py_spy)
            .arg("--auth-token-file")
            .arg(&tokens)
            .start()
            .await;
        svc.wait_ready().await;
        let body = infer(&svc, true).await;
        let report = &body["report"];
        assert_eq!(report["outcome"], "succeeded", "{report:#}");
        assert_eq!(report["subprocess"]["exit_code"], 0, "{report:#}");
        let why = report["profile"]["unavailable"].as_str().unwrap_or_else(|| panic!("{:#}", report["profile"]));
        assert!(why.contains(detail), "{why}");
        assert!(report["profile"]["url"].is_null());
        let job = body["job_id"].as_str().unwrap();
        let (status, err) = json(get(&svc, &format!("/v1/jobs/{job}/profile")).send().await.unwrap()).await;
        assert_eq!((status, err["error"].as_str()), (StatusCode::NOT_FOUND, Some("profile_not_found")));
        assert!(err["detail"].as_str().unwrap().contains(detail), "{err}");
        let text = get(&svc, &format!("/v1/jobs/{job}/report")).header("accept", "text/plain").send().await.unwrap().text().await.unwrap();
        assert!(text.contains("Profile: none — "), "{text}");
        let metrics = svc.metrics_text().await;
        assert_eq!(metric(&metrics, &format!(r#"musetalk_profiles_total{{mode="simple",result="failed",reason="{reason}"}}"#)), Some(1.0), "{metrics}");
    }

    // The preview backend renders with ffmpeg: a simple job says there is no Python, and
    // py-spy is not even started.
    let svc = ServiceBuilder::new().arg("--py-spy").arg(&killer).arg("--auth-token-file").arg(&tokens).start().await;
    svc.wait_ready().await;
    let body = infer(&svc, true).await;
    assert_eq!(body["report"]["outcome"], "succeeded");
    assert!(body["report"]["profile"]["unavailable"].as_str().unwrap().contains("renders with ffmpeg"), "{:#}", body["report"]["profile"]);
    assert!(!body["report"]["subprocess"]["command"].as_str().unwrap().contains("py-spy"), "{:#}", body["report"]);
    drop(svc);

    // The preview engine's realtime mode runs no Python: a speak says so and succeeds.
    let svc = ServiceBuilder::new().arg("--py-spy").arg(py_spy()).arg("--auth-token-file").arg(&tokens).start().await;
    svc.wait_ready().await;
    let m = common::media::media();
    let form = Form::new().part("video", file_part(&m.video, "v.mp4")).text("avatar_id", "pv");
    let (status, _) = json(svc.client().post(svc.url("/v1/avatars")).bearer_auth(TOKEN).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while json(get(&svc, "/v1/avatars/pv").send().await.unwrap()).await.1["state"] != "ready" {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let form = Form::new().part("audio", file_part(&m.audio, "a.wav")).text("profile", "1");
    let (status, body) = json(svc.client().post(svc.url("/v1/avatars/pv/speak")).bearer_auth(TOKEN).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["report"]["profile"]["unavailable"].as_str().unwrap().contains("no Python process"), "{:#}", body["report"]["profile"]);
    let metrics = svc.metrics_text().await;
    assert_eq!(metric(&metrics, r#"musetalk_profiles_total{mode="realtime",result="failed",reason="no_python"}"#), Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profiled_pipeline_keeps_its_own_exit_status() {
    // py-spy exits 0 whatever its child did; the job must still fail with the pipeline's
    // own exit code (recorded by the exit-status shim), and the non-Python pipeline leaves
    // an empty profile, said as such.
    let svc = ServiceBuilder::new()
        .args(["--backend", "command", "--pipeline-command", "sh -c 'echo doomed >&2; exit 3' sh {video} {audio} {output}"])
        .arg("--py-spy")
        .arg(py_spy())
        .args(["--profile-ratio", "1"])
        .start()
        .await;
    svc.wait_ready().await;
    let m = common::media::media();
    let form = Form::new().part("video", file_part(&m.video, "v.mp4")).part("audio", file_part(&m.audio, "a.wav"));
    let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let (status, report) = json(svc.client().get(svc.url(&format!("/v1/jobs/{}/report", body["job_id"].as_str().unwrap()))).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["subprocess"]["exit_code"], 3, "{report:#}");
    assert_eq!(report["error"]["step"], "subprocess_execution", "{report:#}");
    let msg = report["error"]["message"].as_str().unwrap();
    assert!(msg.contains("exit code 3") && msg.contains("doomed") && !msg.contains("py-spy>"), "{msg}");
    // --profile-ratio 1 profiled it without being asked; sh holds no Python, as py-spy says.
    assert!(report["profile"]["unavailable"].as_str().is_some_and(|w| w.contains("No python processes found")), "{:#}", report["profile"]);
}
