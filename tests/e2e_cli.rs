//! The command line driven as a user drives it: the REAL binary run as a subprocess
//! (`infer`, `report`, `check`), against a real running service (`preview` backend)
//! started by `common::service`; plus golden files for the text report layout.
//!
//! Needs `ffmpeg`, `ffprobe` and `python3` on PATH. Media is tiny (128×128, 2 s video,
//! 3 s audio). `UPDATE_GOLDEN=1 cargo test --test e2e_cli golden` rewrites the goldens.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::service::{Service, ServiceBuilder, command};
use musetalk_sidecar::collector::insight::{StageGpu, Verdict};
use musetalk_sidecar::collector::{AvgPeak, GpuWindow, TreeWindow, Window};
use musetalk_sidecar::jobs::Report;
use musetalk_sidecar::jobs::report::{self, Bottleneck, ErrorInfo, Files, GpuEnergy, Subprocess, Timing};
use serde_json::Value;

/// The audio's length: the saved video must last this long.
const AUDIO_SECONDS: f64 = 3.0;
/// One frame at 25 fps.
const FRAME: f64 = 0.04;

// ---------------------------------------------------------------------------------------
// Media: the shared clips, under names a user would have (the default output is
// `face_speech.mp4`).

struct Media {
    video: PathBuf,
    audio: PathBuf,
}

fn media() -> &'static Media {
    static MEDIA: OnceLock<Media> = OnceLock::new();
    MEDIA.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e_cli_media");
        std::fs::create_dir_all(&dir).unwrap();
        let named = |from: &Path, name: &str| {
            let to = dir.join(name);
            // A hard link appears whole or not at all; a second binary run finds it there.
            match std::fs::hard_link(from, &to) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("link {}: {e}", to.display()),
                _ => to,
            }
        };
        let shared = common::media::media();
        Media { video: named(&shared.video, "face.mp4"), audio: named(&shared.audio, "speech.wav") }
    })
}

// ---------------------------------------------------------------------------------------
// Running the CLI.

/// What one CLI run did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
    /// The stderr lines starting with `error:` (there must be exactly one on failure).
    fn error_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("error:")).collect()
    }
}

/// Runs `musetalk-sidecar ARGS` in `cwd` to completion (off the async runtime).
async fn cli(cwd: &Path, args: &[&str]) -> Run {
    cli_env(cwd, args, &[]).await
}

async fn cli_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command();
    cmd.args(args).current_dir(cwd).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let shown = format!("{cmd:?}");
    let out: Output = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap_or_else(|e| panic!("{shown}: {e}"));
    Run { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn preview_service(args: &[&str]) -> Service {
    let svc = ServiceBuilder::new().args(args.iter().copied()).start().await;
    svc.wait_ready().await;
    svc
}

async fn json_report(svc: &Service, id: &str) -> Value {
    let r = svc.get(&format!("/v1/jobs/{id}/report")).await;
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    r.json().await.unwrap()
}

async fn text_report(svc: &Service, id: &str) -> String {
    let r = svc.client().get(svc.url(&format!("/v1/jobs/{id}/report"))).header("Accept", "text/plain").send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    r.text().await.unwrap()
}

async fn job_count(svc: &Service) -> usize {
    svc.get("/v1/jobs").await.json::<Vec<Value>>().await.unwrap().len()
}

/// The job id on the first line of a text report (`MuseTalk job ID — …`).
fn job_id_of(text: &str) -> String {
    text.lines().next().and_then(|l| l.strip_prefix("MuseTalk job ")).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no job line in:\n{text}")).to_string()
}

/// The report's `bytes()` formatting, re-implemented to check the text against JSON figures.
fn human(b: u64) -> String {
    let mut v = b as f64;
    let mut i = 0;
    let units = ["B", "KiB", "MiB", "GiB"];
    while v >= 1024.0 && i < 3 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", units[i]) }
}

// ---------------------------------------------------------------------------------------
// infer

#[tokio::test]
async fn infer_saves_the_video_and_prints_the_servers_report() {
    let svc = preview_service(&[]).await;
    let m = media();
    let cwd = tempfile::tempdir().unwrap();
    let server = svc.url("");
    let run = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &server]).await;
    assert_eq!(run.code, Some(0), "{}", run.show());

    // The video, under the default name in the current directory, lasts as long as the audio.
    let saved = cwd.path().join("face_speech.mp4");
    assert!(saved.is_file(), "no {}: {}", saved.display(), run.show());
    let d = common::media::duration(&saved);
    assert!((d - AUDIO_SECONDS).abs() <= FRAME + 1e-6, "saved video lasts {d} s, the audio {AUDIO_SECONDS} s");

    // stdout is the report the service renders, and its figures are the JSON report's.
    let id = job_id_of(&run.stdout);
    assert_eq!(run.stdout, text_report(&svc, &id).await, "stdout is not the service's text report");
    let json = json_report(&svc, &id).await;
    assert_eq!(json["job_id"], id.as_str());
    assert_eq!(json["outcome"], "succeeded");
    let trace = json["trace_id"].as_str().unwrap();
    assert!(run.stdout.contains(&format!("Trace: {trace}")), "{}", run.show());
    let steps = json["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    for s in steps {
        let line = format!("  {:<26} {:>9.3} s", s["name"].as_str().unwrap(), s["seconds"].as_f64().unwrap());
        assert!(run.stdout.lines().any(|l| l.starts_with(&line)), "no step line {line:?} in:\n{}", run.stdout);
    }
    let output_bytes = json["files"]["output_bytes"].as_u64().unwrap();
    assert_eq!(std::fs::metadata(&saved).unwrap().len(), output_bytes, "the saved file is the job's output");
    assert!(run.stdout.contains(&format!("output video               {}", human(output_bytes))), "{}", run.stdout);

    // stderr: the job, its trace and where the video went; no error.
    assert!(run.stderr.contains(&format!("job {id} accepted (trace {trace})")), "{}", run.show());
    assert!(run.stderr.contains("saved face_speech.mp4"), "{}", run.show());
    assert!(run.error_lines().is_empty(), "{}", run.show());
    assert!(!run.stdout.contains('\u{1b}') && !run.stderr.contains('\u{1b}'), "no colour codes off a terminal");

    // Running it again never overwrites silently: refused before any upload (exit 2) ...
    let jobs = job_count(&svc).await;
    let again = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &server]).await;
    assert_eq!(again.code, Some(2), "{}", again.show());
    assert_eq!(again.error_lines().len(), 1, "{}", again.show());
    assert!(again.stderr.contains("face_speech.mp4 already exists") && again.stderr.contains("--force"), "{}", again.show());
    assert_eq!(job_count(&svc).await, jobs, "nothing was uploaded");
    // ... unless --force.
    let forced = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &server, "--force"]).await;
    assert_eq!(forced.code, Some(0), "{}", forced.show());
    assert_ne!(job_id_of(&forced.stdout), id);
}

#[tokio::test]
async fn infer_json_prints_the_servers_json_report() {
    let svc = preview_service(&[]).await;
    let m = media();
    let cwd = tempfile::tempdir().unwrap();
    let out = cwd.path().join("sub").join("result.mp4");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let run = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &svc.url(""), "--out", path_str(&out), "--json", "--bbox-shift", "-3", "--batch-size", "4"]).await;
    assert_eq!(run.code, Some(0), "{}", run.show());
    let printed: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", run.show()));
    let id = printed["job_id"].as_str().expect("job_id").to_string();
    assert_eq!(printed, json_report(&svc, &id).await, "--json prints GET /v1/jobs/{{id}}/report");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), printed["files"]["output_bytes"].as_u64().unwrap());
    // Only the JSON on stdout (pretty-printed, one document).
    assert!(run.stdout.starts_with("{\n") && run.stdout.ends_with("}\n"), "{}", run.stdout);
}

#[tokio::test]
async fn infer_with_auth_names_the_token_flag_then_works_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# the service's tokens\nsecret-one\n").unwrap();
    let svc = preview_service(&["--auth-token-file", path_str(&tokens)]).await;
    let m = media();
    let base = ["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server"];
    let server = svc.url("");
    let mut args: Vec<&str> = base.to_vec();
    args.push(&server);

    let run = cli(dir.path(), &args).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert_eq!(run.error_lines().len(), 1, "{}", run.show());
    assert!(run.stderr.contains("401") && run.stderr.contains("--token-file") && run.stderr.contains("MUSETALK_SIDECAR_TOKEN"), "{}", run.show());

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let run = cli(dir.path(), &[&args[..], &["--token-file", path_str(&wrong)]].concat()).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(run.stderr.contains("refused the token from --token-file"), "{}", run.show());

    // The service's own token file works as the client's (comments skipped); so does the env var.
    let run = cli(dir.path(), &[&args[..], &["--token-file", path_str(&tokens)]].concat()).await;
    assert_eq!(run.code, Some(0), "{}", run.show());
    let id = job_id_of(&run.stdout);
    let run = cli_env(dir.path(), &["report", &id, "--server", &server], &[("MUSETALK_SIDECAR_TOKEN", "secret-one")]).await;
    assert_eq!(run.code, Some(0), "{}", run.show());
    assert_eq!(job_id_of(&run.stdout), id);
}

#[tokio::test]
async fn a_failed_job_prints_its_report_and_exits_1() {
    // A pipeline that exits 3 without writing {output}.
    let svc = preview_service(&["--backend", "command", "--pipeline-command", "sh -c 'echo broken >&2; exit 3' {output}"]).await;
    let m = media();
    let cwd = tempfile::tempdir().unwrap();
    let run = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &svc.url("")]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let id = job_id_of(&run.stdout);
    assert!(run.stdout.contains("— FAILED") && run.stdout.contains("Error in "), "the report is printed:\n{}", run.show());
    assert_eq!(run.stdout, text_report(&svc, &id).await);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.show());
    assert!(errors[0].contains(&format!("job {id} failed")), "{}", run.show());
    assert!(!cwd.path().join("face_speech.mp4").exists(), "no video is saved for a failed job");
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "no partial file is left");
}

#[tokio::test]
async fn infer_input_and_connection_errors_are_one_clear_line() {
    let m = media();
    let cwd = tempfile::tempdir().unwrap();

    // A missing --video file: exit 2, naming the file, before any connection.
    let missing = cwd.path().join("no-such-video.mp4");
    let run = cli(cwd.path(), &["infer", "--video", path_str(&missing), "--audio", path_str(&m.audio), "--server", "http://127.0.0.1:9"]).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert_eq!(run.error_lines().len(), 1, "{}", run.show());
    assert!(run.stderr.contains(path_str(&missing)) && run.stderr.contains("--video"), "{}", run.show());

    // Nothing listens on the port: exit 1, "cannot reach" with the fix.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("http://127.0.0.1:{port}");
    let run = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &server]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.show());
    assert!(errors[0].starts_with(&format!("error: cannot reach the service at {server} (")), "{}", run.show());
    assert!(errors[0].contains("musetalk-sidecar serve") && errors[0].contains("MUSETALK_SIDECAR_SERVER"), "{}", run.show());
    // ... also when the server comes from the environment.
    let run = cli_env(cwd.path(), &["report", "0123456789abcdef0123456789abcdef"], &[("MUSETALK_SIDECAR_SERVER", &server)]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert!(run.stderr.contains(&format!("cannot reach the service at {server}")), "{}", run.show());

    // Usage errors are clap's, exit 2.
    let run = cli(cwd.path(), &["infer", "--audio", path_str(&m.audio)]).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(run.stderr.contains("--video"), "{}", run.show());
    let run = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", "https://example.invalid"]).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(run.stderr.contains("http://"), "{}", run.show());
}

// ---------------------------------------------------------------------------------------
// report

#[tokio::test]
async fn report_prints_an_earlier_job_and_names_an_unknown_one() {
    let svc = preview_service(&[]).await;
    let m = media();
    let cwd = tempfile::tempdir().unwrap();
    let server = svc.url("");
    let run = cli(cwd.path(), &["infer", "--video", path_str(&m.video), "--audio", path_str(&m.audio), "--server", &server, "--out", "x.mp4"]).await;
    assert_eq!(run.code, Some(0), "{}", run.show());
    let id = job_id_of(&run.stdout);

    let report = cli(cwd.path(), &["report", &id, "--server", &server]).await;
    assert_eq!(report.code, Some(0), "{}", report.show());
    assert_eq!(report.stdout, text_report(&svc, &id).await);
    assert_eq!(report.stdout, run.stdout, "the same report `infer` printed");
    assert!(report.stderr.is_empty(), "{}", report.show());

    let json = cli(cwd.path(), &["report", &id, "--server", &server, "--json"]).await;
    assert_eq!(json.code, Some(0), "{}", json.show());
    assert_eq!(serde_json::from_str::<Value>(&json.stdout).unwrap(), json_report(&svc, &id).await);

    let unknown = "0123456789abcdef0123456789abcdef";
    let run = cli(cwd.path(), &["report", unknown, "--server", &server]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert!(run.stdout.is_empty(), "{}", run.show());
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.show());
    assert!(run.stderr.starts_with(&format!("error: no job `{unknown}` on the service at {server}")), "{}", run.show());

    let run = cli(cwd.path(), &["report", "../etc", "--server", &server]).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
}

#[tokio::test]
async fn report_of_a_running_job_says_so_and_of_a_failed_one_exits_1() {
    // A pipeline that takes 2 s, then fails.
    let svc = preview_service(&["--backend", "command", "--pipeline-command", "sh -c 'sleep 2; exit 4' {output}"]).await;
    let m = media();
    let form = reqwest::multipart::Form::new()
        .part("video", reqwest::multipart::Part::bytes(std::fs::read(&m.video).unwrap()).file_name("v.mp4"))
        .part("audio", reqwest::multipart::Part::bytes(std::fs::read(&m.audio).unwrap()).file_name("a.wav"));
    let r = svc.client().post(svc.url("/v1/inference")).header("Prefer", "respond-async").multipart(form).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    let cwd = tempfile::tempdir().unwrap();
    let server = svc.url("");

    let run = cli(cwd.path(), &["report", &id, "--server", &server]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert_eq!(run.error_lines().len(), 1, "{}", run.show());
    assert!(run.stderr.contains(&format!("job `{id}` is")) && run.stderr.contains("ready when it ends"), "{}", run.show());

    // Once it has failed: the report is printed, and the exit status says it failed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v: Value = svc.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
        if v["state"] == "failed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "job not failed in time: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let run = cli(cwd.path(), &["report", &id, "--server", &server]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert_eq!(run.stdout, text_report(&svc, &id).await);
    assert!(run.stdout.contains("— FAILED"), "{}", run.show());
}

// ---------------------------------------------------------------------------------------
// check

/// A listen address any test may check at once: port 0 is always free (the default
/// 0.0.0.0:8000 would make these tests fail wherever a real service runs).
const FREE: &str = "127.0.0.1:0";

/// The `check` output line for `name` (`LEVEL  name  detail`), and the `fix:` line under it if any.
fn check_line<'a>(out: &'a str, name: &str) -> Option<(&'a str, Option<&'a str>)> {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines.iter().position(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name) && rest[name.len()..].starts_with("  ")))?;
    let fix = lines.get(i + 1).map(|l| l.trim_start()).filter(|l| l.starts_with("fix: "));
    Some((lines[i], fix))
}

fn level(line: &str) -> &str {
    line.split_whitespace().next().unwrap()
}

#[tokio::test]
async fn check_the_preview_setup_reports_ffmpeg_and_nvml() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = cli(dir.path(), &["check", "--data-dir", path_str(&data), "--listen", FREE]).await;
    assert_eq!(run.code, Some(0), "the preview set-up has what it needs: {}", run.show());
    let out = &run.stdout;

    let (ffmpeg, _) = check_line(out, "ffmpeg").unwrap_or_else(|| panic!("no ffmpeg line: {out}"));
    assert_eq!(level(ffmpeg), "ok", "{out}");
    assert!(ffmpeg.contains("ffmpeg version"), "{out}");
    assert_eq!(level(check_line(out, "ffprobe").unwrap().0), "ok", "{out}");
    assert_eq!(level(check_line(out, "data dir").unwrap().0), "ok", "{out}");

    let (nvml, fix) = check_line(out, "nvml").unwrap_or_else(|| panic!("no nvml line: {out}"));
    if nvml_wrapper::Nvml::init().is_err() {
        // This machine has no NVIDIA driver: a warning naming what is lost and the fix.
        assert_eq!(level(nvml), "warn", "{out}");
        assert!(nvml.contains("GPU metrics will be absent"), "{out}");
        let fix = fix.unwrap_or_else(|| panic!("no fix line under nvml: {out}"));
        assert!(fix.contains("NVIDIA driver") && fix.contains("--gpus all") && fix.contains("NVIDIA_VISIBLE_DEVICES"), "{out}");
        // ... which --require-gpu makes a failure.
        let strict = cli(dir.path(), &["check", "--data-dir", path_str(&data), "--require-gpu", "--listen", FREE]).await;
        assert_eq!(strict.code, Some(1), "{}", strict.show());
        assert_eq!(level(check_line(&strict.stdout, "nvml").unwrap().0), "FAIL");
    } else {
        assert_eq!(level(nvml), "ok", "{out}");
        assert!(nvml.contains("driver"), "{out}");
    }
    // "ready" rests on a real 1 s job through the preview backend.
    let (trial, _) = check_line(out, "trial job").unwrap_or_else(|| panic!("no trial job line: {out}"));
    assert_eq!(level(trial), "ok", "{out}");
    assert!(trial.contains("a 1 s preview job succeeded"), "{out}");
    // The paths it checked are the resolved ones serve will use.
    let (config, _) = check_line(out, "config").unwrap();
    assert!(config.contains(&format!("data dir {}", data.display())), "{out}");
    let summary = out.lines().last().unwrap();
    assert!(summary.contains("0 failed") && summary.contains("ready to serve with the preview backend"), "{out}");
    assert!(!data.exists(), "check creates nothing");
}

/// `check` against the set-up of a running service: its port is taken and its data dir
/// locked, so `serve` would refuse to start; check says so, naming the holder.
#[tokio::test]
async fn check_fails_on_a_taken_port_and_a_data_dir_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let svc = ServiceBuilder::new().data_dir(&data).start().await;
    svc.wait_ready().await;
    let addr = svc.addr().to_string();
    let run = cli(dir.path(), &["check", "--data-dir", path_str(&data), "--listen", &addr]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let (listen, fix) = check_line(&run.stdout, "listen").unwrap_or_else(|| panic!("no listen line: {}", run.show()));
    assert_eq!(level(listen), "FAIL", "{}", run.show());
    assert!(listen.contains(&addr) && fix.is_some_and(|f| f.contains("--listen")), "{}", run.show());
    let (data_line, fix) = check_line(&run.stdout, "data dir").unwrap();
    assert_eq!(level(data_line), "FAIL", "{}", run.show());
    assert!(data_line.contains(&format!("pid {}", svc.pid())), "{}", run.show());
    assert!(fix.is_some_and(|f| f.contains("--data-dir")), "{}", run.show());
    assert!(check_line(&run.stdout, "trial job").is_none(), "no trial after a failure: {}", run.show());
}

/// An ffmpeg that answers `-version` and `-encoders` (so every tool check passes) but fails
/// every real render, as a broken build or a wrapper would: `check` must not say ready.
#[tokio::test]
async fn check_fails_when_the_backend_cannot_really_run_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let real = String::from_utf8(Command::new("sh").args(["-c", "command -v ffmpeg"]).output().unwrap().stdout).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("ffmpeg");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -filter_complex ] && {{ echo 'Error initializing complex filters: fake ffmpeg refuses to render' >&2; exit 1; }}; done\nexec {} \"$@\"\n",
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let data = dir.path().join("data");
    let run = cli_env(dir.path(), &["check", "--data-dir", path_str(&data), "--listen", FREE], &[("PATH", &path)]).await;
    assert_eq!(run.code, Some(1), "check must fail when a job would: {}", run.show());
    let out = &run.stdout;
    assert_eq!(level(check_line(out, "ffmpeg").unwrap().0), "ok", "the version check alone passes: {out}");
    let (trial, fix) = check_line(out, "trial job").unwrap_or_else(|| panic!("no trial job line: {out}"));
    assert_eq!(level(trial), "FAIL", "{out}");
    assert!(trial.contains("fake ffmpeg refuses to render"), "the pipeline's own error is shown: {out}");
    assert!(fix.is_some_and(|f| f.contains("--ffmpeg")), "{out}");
    assert!(out.lines().last().unwrap().contains("not ready"), "{out}");
    assert!(!data.exists(), "check creates nothing");

    // The same set-up with a working ffmpeg given explicitly is ready.
    let ok_run = cli_env(dir.path(), &["check", "--data-dir", path_str(&data), "--ffmpeg", real.trim(), "--listen", FREE], &[("PATH", &path)]).await;
    assert_eq!(ok_run.code, Some(0), "{}", ok_run.show());
}

#[tokio::test]
async fn check_a_missing_musetalk_dir_fails_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let run = cli(dir.path(), &["check", "--backend", "musetalk", "--musetalk-dir", "/nonexistent", "--data-dir", path_str(dir.path())]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let (line, fix) = check_line(&run.stdout, "musetalk dir").unwrap_or_else(|| panic!("no musetalk dir line: {}", run.show()));
    assert_eq!(level(line), "FAIL");
    assert!(line.contains("/nonexistent"), "{line}");
    assert!(fix.is_some_and(|f| f.contains("--musetalk-dir")), "{}", run.show());
    assert!(run.stdout.lines().last().unwrap().contains("1 failed"), "{}", run.show());

    // Without --musetalk-dir at all, the config line says so.
    let run = cli(dir.path(), &["check", "--backend", "musetalk", "--data-dir", path_str(dir.path())]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let (line, fix) = check_line(&run.stdout, "config").unwrap();
    assert_eq!(level(line), "FAIL");
    assert!(line.contains("--musetalk-dir") && fix.is_some(), "{}", run.show());
}

#[tokio::test]
async fn check_the_musetalk_fixture_lists_models_and_python_packages() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/musetalk");
    let dir = tempfile::tempdir().unwrap();
    let run = cli(dir.path(), &["check", "--backend", "musetalk", "--musetalk-dir", path_str(&fixture), "--data-dir", path_str(dir.path()), "--listen", FREE]).await;
    let out = &run.stdout;
    assert_eq!(level(check_line(out, "musetalk dir").unwrap().0), "ok", "{out}");
    assert_eq!(level(check_line(out, "musetalk script").unwrap().0), "ok", "{out}");

    // Every file of MuseTalk's documented layout, with its size; the fixture's weights
    // are one-line placeholders, which check calls out.
    let models: Vec<&str> = out.lines().filter(|l| l.get(6..).is_some_and(|r| r.starts_with("model "))).collect();
    for rel in [
        "models/musetalk/musetalk.json",
        "models/musetalk/pytorch_model.bin",
        "models/musetalkV15/musetalk.json",
        "models/musetalkV15/unet.pth",
        "models/syncnet/latentsync_syncnet.pt",
        "models/dwpose/dw-ll_ucoco_384.pth",
        "models/face-parse-bisent/79999_iter.pth",
        "models/face-parse-bisent/resnet18-5c106cde.pth",
        "models/sd-vae/config.json",
        "models/sd-vae/diffusion_pytorch_model.bin",
        "models/whisper/config.json",
        "models/whisper/pytorch_model.bin",
        "models/whisper/preprocessor_config.json",
    ] {
        let size = std::fs::metadata(fixture.join(rel)).unwrap().len();
        let line = models.iter().find(|l| l.contains(&format!("{rel}  "))).unwrap_or_else(|| panic!("no line for {rel}: {out}"));
        assert!(line.contains(&format!("{size} B")), "{line}");
    }
    let unet = models.iter().find(|l| l.contains("musetalkV15/unet.pth")).unwrap();
    assert_eq!(level(unet), "warn", "a 88-byte unet.pth is a placeholder: {unet}");
    assert!(out.contains("download_weights.sh"), "{out}");

    // The interpreter runs; the packages MuseTalk imports are not installed here.
    assert_eq!(level(check_line(out, "python").unwrap().0), "ok", "{out}");
    let (pkgs, fix) = check_line(out, "python packages").unwrap_or_else(|| panic!("no python packages line: {out}"));
    let has_torch = Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if has_torch {
        eprintln!("python3 imports torch here; the import check is not asserted to fail");
    } else {
        assert_eq!(level(pkgs), "FAIL", "{out}");
        assert!(pkgs.contains("torch"), "{pkgs}");
        let fix = fix.unwrap_or_else(|| panic!("no fix under python packages: {out}"));
        assert!(fix.contains("pip install -r requirements.txt") && fix.contains(path_str(&fixture)), "{fix}");
        assert_eq!(run.code, Some(1), "a required check failed: {}", run.show());
    }
}

// ---------------------------------------------------------------------------------------
// Golden files for the text report layout.

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// Compares `actual` with the golden file; `UPDATE_GOLDEN=1` rewrites it instead.
fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        eprintln!("rewrote {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {} ({e}); create it with UPDATE_GOLDEN=1 cargo test --test e2e_cli golden", path.display()));
    if expected == actual {
        return;
    }
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut diff = String::new();
    for i in 0..e.len().max(a.len()) {
        match (e.get(i), a.get(i)) {
            (Some(x), Some(y)) if x == y => diff.push_str(&format!("   {x}\n")),
            (x, y) => {
                if let Some(x) = x {
                    diff.push_str(&format!(" - {x}\n"));
                }
                if let Some(y) = y {
                    diff.push_str(&format!(" + {y}\n"));
                }
            }
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        diff.push_str(" (the final newline differs)\n");
    }
    panic!(
        "the text report differs from {} (- golden, + now), line by line:\n{diff}\nIf the new layout is intended, rewrite it with UPDATE_GOLDEN=1 cargo test --test e2e_cli golden and review the diff.",
        path.display()
    );
}

fn t(name: &str, seconds: f64, percent: f64) -> Timing {
    Timing { name: name.into(), seconds, percent, gpu: None }
}

fn ap(avg: f64, peak: f64) -> Option<AvgPeak> {
    Some(AvgPeak { avg, peak, samples: 8 })
}

/// A successful preview job on a host without a GPU.
fn succeeded_report() -> Report {
    Report {
        job_id: "5f2c0e1d9a8b4c7d8e6f5a4b3c2d1e0f".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        trace_url: Some("http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736".into()),
        mode: "simple".into(),
        backend: "preview".into(),
        outcome: "succeeded".into(),
        error: None,
        created_at: "2026-11-28T09:29:28.123Z".into(),
        total_seconds: 4.25,
        queue_seconds: 0.012,
        steps: vec![
            t("file_processing", 0.4, 9.4),
            t("queue_wait", 0.012, 0.3),
            t("config_creation", 0.001, 0.0),
            t("subprocess_execution", 3.5, 82.4),
            t("output_discovery", 0.3, 7.1),
            t("response_preparation", 0.037, 0.9),
        ],
        stages: vec![t("video_encoding", 3.4, 97.1)],
        bottleneck: Some(Bottleneck { step: "subprocess_execution".into(), percent: 82.4, stage: Some("video_encoding".into()) }),
        worker: None,
        subprocess: Some(Subprocess { pid: 4242, exit_code: Some(0), signal: None, seconds: 3.5, percent: 82.4, command: "ffmpeg -hide_banner -nostdin -y -v error -i video.mp4 -i audio.wav out.mp4".into() }),
        files: Files { video_bytes: 18_266, audio_bytes: 96_078, output_bytes: Some(28_614), output_input_ratio: Some(0.25) },
        media: report::Media { video_seconds: 2.0, audio_seconds: 3.0, output_seconds: Some(3.0), output_frames: Some(75), input_frames: Some(50), realtime_factor: Some(0.71) },
        resources: Window {
            samples: 9,
            seconds: 4.25,
            cpu: ap(0.62, 0.97),
            cpu_count: Some(2),
            memory_used: ap(2.6e9, 2.7e9),
            memory_total: Some(24 * 1024 * 1024 * 1024),
            gpus: vec![],
            tree: Some(TreeWindow { cpu: AvgPeak { avg: 0.48, peak: 0.99, samples: 8 }, rss: AvgPeak { avg: 14.2e6, peak: 30.1e6, samples: 8 }, gpu_memory: None, gpu_util: None, max_processes: 1, gpus: vec![] }),
        },
        gpu_energy: None,
        profile: None,
        latency: report::Latency {
            time_to_first_frame_seconds: None,
            time_to_first_byte_seconds: None,
            batches: None,
            version: "preview".into(),
            fp16: false,
            batch_size: "default".into(),
            worker: "none".into(),
        },
    }
}

#[test]
fn golden_text_report_of_a_successful_job() {
    assert_golden("report.txt", &succeeded_report().to_text());
}

#[test]
fn golden_text_report_of_a_failed_job() {
    let mut r = succeeded_report();
    r.backend = "musetalk".into();
    r.outcome = "failed".into();
    r.trace_url = None;
    r.error = Some(ErrorInfo { step: "subprocess_execution".into(), message: "MuseTalk reported: division by zero".into() });
    r.total_seconds = 12.5;
    r.steps = vec![t("file_processing", 0.4, 3.2), t("queue_wait", 0.0, 0.0), t("config_creation", 0.002, 0.0), t("subprocess_execution", 12.098, 96.8)];
    r.stages = vec![t("model_loading", 9.1, 75.2), t("frame_and_audio_extraction", 1.2, 9.9), t("face_detection", 1.798, 14.9)];
    r.bottleneck = Some(Bottleneck { step: "subprocess_execution".into(), percent: 96.8, stage: Some("model_loading".into()) });
    r.subprocess = Some(Subprocess { pid: 5151, exit_code: Some(0), signal: None, seconds: 12.098, percent: 96.8, command: "python3 -u -m scripts.inference --inference_config inference.yaml --result_dir result --version v15".into() });
    r.files.output_bytes = None;
    r.files.output_input_ratio = None;
    r.media.output_seconds = None;
    r.media.realtime_factor = None;
    assert_golden("report_failed.txt", &r.to_text());
}

#[test]
fn golden_text_report_with_gpu_data() {
    let mut r = succeeded_report();
    r.backend = "musetalk".into();
    r.stages = vec![t("model_loading", 1.2, 34.3), t("unet_inference", 2.0, 57.1), t("audio_mux", 0.3, 8.6)];
    let stage = |sm: f64, peak: f64, bw: Option<f64>, rx: f64, power: f64, joules: f64, reasons: &[&str], verdict: Verdict| StageGpu {
        sm: AvgPeak { avg: sm, peak, samples: 3 },
        memory_bandwidth: bw.map(|b| AvgPeak { avg: b, peak: b, samples: 3 }),
        tensor_active: None,
        pcie_rx_bytes: Some(rx),
        pcie_tx_bytes: Some(rx / 8.0),
        power_watts: Some(power),
        energy_joules: Some(joules),
        throttle_reasons: reasons.iter().map(|r| r.to_string()).collect(),
        pipeline_cpu_cores: Some(0.9),
        verdict,
    };
    r.stages[0].gpu = Some(stage(0.08, 0.3, Some(0.02), 3.9e9, 95.0, 114.0, &[], Verdict::TransferBound));
    r.stages[1].gpu = Some(stage(0.93, 0.99, Some(0.41), 2.1e8, 455.0, 910.0, &["power_cap"], Verdict::GpuBound));
    r.stages[2].gpu = Some(stage(0.0, 0.0, None, 0.0, 70.0, 21.0, &[], Verdict::CpuBound));
    r.gpu_energy = Some(GpuEnergy { joules: 1045.0, per_output_second: Some(1045.0 / 3.0) });
    r.bottleneck = Some(Bottleneck { step: "subprocess_execution".into(), percent: 82.4, stage: Some("unet_inference".into()) });
    r.subprocess = None;
    r.resources.tree = Some(TreeWindow {
        cpu: AvgPeak { avg: 0.31, peak: 0.55, samples: 8 },
        rss: AvgPeak { avg: 3.1e9, peak: 3.4e9, samples: 8 },
        gpu_memory: ap(5.2e9, 6.1e9),
        gpu_util: ap(0.71, 0.98),
        max_processes: 3,
        gpus: vec![0],
    });
    r.resources.gpus = vec![
        GpuWindow { index: 0, name: "NVIDIA H200".into(), utilization: ap(0.74, 0.99), memory_used_bytes: ap(6.0e9, 7.5e9), memory_total_bytes: Some(150_000_000_000), temperature_celsius: ap(51.0, 58.0), power_watts: ap(310.0, 480.0), ..Default::default() },
        GpuWindow { index: 1, name: "NVIDIA H200".into(), utilization: ap(0.0, 0.0), memory_used_bytes: ap(5.0e8, 5.0e8), memory_total_bytes: Some(150_000_000_000), temperature_celsius: ap(30.0, 31.0), power_watts: ap(70.0, 72.0), ..Default::default() },
    ];
    assert_golden("report_gpu.txt", &r.to_text());
}
