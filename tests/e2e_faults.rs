//! Faults a GPU box really has, against the REAL binary: the OTLP collector down or slow,
//! the data disk full, SIGTERM with jobs running and queued, a crashed sidecar restarted.
//! (Pipeline crash/hang and worker crash/hang are in e2e_jobs.rs and e2e_realtime.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::otlp::OtlpReceiver;
use common::service::{Service, ServiceBuilder};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

struct Media {
    video: PathBuf,
    audio: PathBuf,
}

fn media() -> &'static Media {
    static M: OnceLock<Media> = OnceLock::new();
    M.get_or_init(|| Media { video: common::media::video(64, 64, 10, 1), audio: common::media::sine(440, 1, 8000) })
}

fn form() -> Form {
    let m = media();
    Form::new()
        .part("video", Part::bytes(std::fs::read(&m.video).unwrap()).file_name("v.mp4"))
        .part("audio", Part::bytes(std::fs::read(&m.audio).unwrap()).file_name("a.wav"))
}

async fn job(svc: &Service) -> (StatusCode, Value) {
    let r = svc.client().post(svc.url("/v1/inference")).multipart(form()).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

async fn metrics(svc: &Service) -> String {
    svc.get("/metrics").await.text().await.unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_jobs_still_succeed_drops_logged_once_and_counted() {
    let endpoint = format!("http://127.0.0.1:{}", dead_port());
    let svc = ServiceBuilder::new().args(["--otlp-endpoint", &endpoint]).env("OTEL_EXPORTER_OTLP_TIMEOUT", "500").start().await;
    svc.wait_ready().await;
    for _ in 0..4 {
        let (status, v) = job(&svc).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut m = metrics(&svc).await;
    while metric(&m, "musetalk_telemetry_spans_dropped_total") == 0.0 {
        assert!(Instant::now() < deadline, "no drop counted: {m}\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = metrics(&svc).await;
    }
    // More jobs while it stays down: still one log line for the outage.
    for _ in 0..2 {
        assert_eq!(job(&svc).await.0, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs = svc.logs();
    assert_eq!(logs.matches("OTLP span export failing").count(), 1, "logged once per outage:\n{logs}");
    assert_eq!(metric(&m, "musetalk_telemetry_spans_exported_total"), 0.0);
    // Memory stays bounded: the span queue is capped, nothing piles up per request.
    assert!(rss_kib(svc.pid()) < 96 * 1024, "RSS {} KiB", rss_kib(svc.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_slow_jobs_unaffected_then_recovery_is_logged() {
    let receiver = OtlpReceiver::start().await;
    receiver.set_delay(Duration::from_secs(3));
    let svc = ServiceBuilder::new()
        .args(["--otlp-endpoint", &receiver.http_endpoint(), "--otlp-protocol", "http/protobuf"])
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
        .start()
        .await;
    svc.wait_ready().await;
    for _ in 0..3 {
        let (status, v) = job(&svc).await;
        assert_eq!(status, StatusCode::OK, "a slow collector never fails a job: {v}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&metrics(&svc).await, "musetalk_telemetry_spans_dropped_total") == 0.0 {
        assert!(Instant::now() < deadline, "timed-out exports are counted as drops\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The collector gets fast again: the next exports arrive and the recovery is logged.
    receiver.set_delay(Duration::ZERO);
    let (status, v) = job(&svc).await;
    assert_eq!(status, StatusCode::OK);
    let trace = v["trace_id"].as_str().unwrap().to_string();
    receiver.wait_for(Duration::from_secs(20), |s| s.iter().any(|x| x.trace_id == trace && x.name == "musetalk.job")).await;
    svc.wait_for_log("OTLP span export recovered", Duration::from_secs(10)).await;
    assert!(metric(&metrics(&svc).await, "musetalk_telemetry_spans_exported_total") > 0.0);
}

/// A tmpfs of `size` mounted at `dir` (needs root: CI and the dev machines run as root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status().expect("run mount");
        assert!(st.success(), "mounting a tmpfs needs root (the test command runs as root in CI); this test cannot simulate a full disk otherwise");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_gives_507_serves_no_partial_output_and_recovers() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let _fs = Tmpfs::mount(&data, "4m");
    let svc = ServiceBuilder::new().data_dir(&data).start().await;
    svc.wait_ready().await;
    // Fill the disk but a few KiB.
    let filler = data.join("filler");
    let free = nix::sys::statvfs::statvfs(&data).unwrap();
    let avail = free.blocks_available() as u64 * free.fragment_size() as u64;
    std::fs::write(&filler, vec![0u8; (avail - 8 * 1024) as usize]).unwrap();
    let (status, v) = job(&svc).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{v}");
    assert_eq!(v["error"], "insufficient_storage");
    assert!(v["detail"].as_str().unwrap().contains("free space"), "{v}");
    let left: Vec<_> = std::fs::read_dir(data.join("jobs")).unwrap().flatten().collect();
    assert!(left.is_empty(), "the half-written upload is removed: {left:?}");
    let (_, list) = (StatusCode::OK, svc.get("/v1/jobs").await.json::<Value>().await.unwrap());
    assert!(list.as_array().unwrap().iter().all(|j| j["state"] != "succeeded"), "no output is served: {list}");
    // Space returns: the service works again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (status, v) = job(&svc).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(svc.get("/healthz").await.status(), StatusCode::OK);
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/musetalk")
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_jobs_running_and_queued_ends_every_job_and_leaves_no_process() {
    let state = tempfile::tempdir().unwrap();
    let pidfile = state.path().join("pids");
    let svc = ServiceBuilder::new()
        .args(["--backend", "musetalk", "--musetalk-python", "python3", "--shutdown-grace", "2s", "--kill-grace", "1s"])
        .arg("--musetalk-dir")
        .arg(fixture())
        .arg("--pipeline-env")
        .arg(format!("PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_MODE=hang,MUSETALK_FIXTURE_PIDFILE={}", pidfile.display()))
        .start()
        .await;
    svc.wait_ready().await;
    // One job runs (and hangs past the grace period), one waits in the queue.
    let c1 = tokio::spawn({
        let (client, url) = (svc.client().clone(), svc.url("/v1/inference"));
        async move { client.post(url).multipart(form()).send().await.unwrap() }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "the first job never started: {}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c2 = tokio::spawn({
        let (client, url) = (svc.client().clone(), svc.url("/v1/inference"));
        async move { client.post(url).multipart(form()).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    svc.sigterm();
    for c in [c1, c2] {
        let r = c.await.unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT, "every in-flight request gets its answer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "job_cancelled", "{v}");
        assert_eq!(v["report"]["outcome"], "cancelled");
    }
    let status = svc.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    let pids: Vec<i32> = std::fs::read_to_string(&pidfile).unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for p in pids {
        assert!(!alive(p), "pipeline process {p} outlived the service");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_a_crash_kills_leftover_pipelines_and_cleans_stale_dirs() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let pidfile = outer.path().join("pids");
    let start = |data: &Path| {
        ServiceBuilder::new()
            .data_dir(data)
            .args(["--backend", "musetalk", "--musetalk-python", "python3"])
            .arg("--musetalk-dir")
            .arg(fixture())
            .arg("--pipeline-env")
            .arg(format!("PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_MODE=hang,MUSETALK_FIXTURE_PIDFILE={}", pidfile.display()))
    };
    let svc = start(&data).start().await;
    svc.wait_ready().await;
    let client = svc.client().clone();
    let url = svc.url("/v1/inference");
    let _pending = tokio::spawn(async move { client.post(url).multipart(form()).send().await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "the job never started: {}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pids: Vec<i32> = std::fs::read_to_string(&pidfile).unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    // The sidecar dies hard: its pipeline (own process group) is orphaned.
    svc.signal(nix::sys::signal::Signal::SIGKILL);
    svc.wait_exit(Duration::from_secs(10)).await;
    assert!(pids.iter().all(|p| alive(*p)), "orphans exist before the restart");
    let stale = data.join("jobs").join("stale-job");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("video.mp4"), b"old").unwrap();
    // The restart kills the orphans and removes the stale job dirs.
    let svc2 = start(&data).start().await;
    svc2.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "orphans survived the restart: {pids:?}\n{}", svc2.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!stale.exists(), "stale job dir removed");
    assert!(svc2.logs().contains("left running by an earlier sidecar"), "{}", svc2.logs());
}

/// A second `serve` on the data dir of a running one exits at once, naming the first's
/// pid, and touches nothing: the first's running job succeeds and every output it stored
/// still downloads. (Before the lock, the second killed every recorded process group and
/// removed every job dir before failing to bind.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_data_dir_exits_and_touches_nothing() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let first = ServiceBuilder::new()
        .data_dir(&data)
        .args(["--backend", "musetalk", "--musetalk-python", "python3", "--max-concurrent-jobs", "2"])
        .arg("--musetalk-dir")
        .arg(fixture())
        .arg("--pipeline-env")
        .arg("PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_MODE=slow,MUSETALK_FIXTURE_SLEEP=3")
        .start()
        .await;
    first.wait_ready().await;
    let stored: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (status, v) = job(&first).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            ids.push(v["job_id"].as_str().unwrap().to_string());
        }
        ids
    };
    // One more, still running when the second instance starts.
    let running = {
        let (client, url) = (first.client().clone(), first.url("/v1/inference"));
        tokio::spawn(async move { client.post(url).multipart(form()).send().await.unwrap() })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first.get("/v1/jobs").await.text().await.unwrap().contains("\"running\"") {
        assert!(Instant::now() < deadline, "the third job never started: {}", first.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut second = common::service::command();
    second.arg("serve").arg("--listen").arg("127.0.0.1:0").arg("--data-dir").arg(&data);
    second.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut child = second.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(1), "the second instance must refuse at once (None: still serving after 10 s): {stderr}");
    assert!(
        stderr.contains(&format!("in use by another musetalk-sidecar (pid {})", first.pid())) && stderr.contains("--data-dir"),
        "the error names the holder and the fix: {stderr}"
    );

    let r = running.await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "the first's running job was not touched: {v}\n{}", first.logs());
    for id in stored.iter().chain([&v["job_id"].as_str().unwrap().to_string()]) {
        let r = first.get(&format!("/v1/jobs/{id}/output")).await;
        assert_eq!(r.status(), StatusCode::OK, "output of {id} is gone");
        assert!(!r.bytes().await.unwrap().is_empty());
    }
}
