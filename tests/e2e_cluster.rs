//! Many replicas behind one address: three real sidecars and a real nginx started by
//! `scripts/local-cluster.sh` from the shipped configuration (deploy/proxy/nginx.conf.in),
//! driven only through the proxy, as a user's client would be. Every job follow-up must
//! reach the job's owner; avatars prepared once must be spoken from every replica; a
//! replica killed mid-run must cost only its own jobs, with a clear error for them, and
//! rejoin without deleting anyone's files. Run with the preview engine and with the
//! fixture worker (persistent workers).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::media::media;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What `scripts/local-cluster.sh up` started; `down` when dropped.
struct Cluster {
    state: tempfile::TempDir,
    shared: tempfile::TempDir,
    proxy: u16,
    /// Replica name → pid.
    pids: BTreeMap<String, u32>,
    client: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    fn script(&self) -> Command {
        let mut c = Command::new(Path::new(REPO).join("scripts/local-cluster.sh"));
        c.env("LOCAL_CLUSTER_DIR", self.state.path()).env("MUSETALK_SIDECAR_BIN", env!("CARGO_BIN_EXE_musetalk-sidecar"));
        c
    }

    fn record(&mut self, stdout: &[u8]) {
        for line in String::from_utf8_lossy(stdout).lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            match v["role"].as_str() {
                Some("sidecar") => {
                    self.pids.insert(v["name"].as_str().unwrap().to_string(), v["pid"].as_u64().unwrap() as u32);
                }
                Some("proxy") => assert_eq!(v["port"].as_u64(), Some(u64::from(self.proxy)), "{line}"),
                _ => panic!("unexpected line {line}"),
            }
        }
    }

    async fn up(extra: &[String]) -> Cluster {
        let mut c = Cluster { state: tempfile::tempdir().unwrap(), shared: tempfile::tempdir().unwrap(), proxy: free_port(), pids: BTreeMap::new(), client: reqwest::Client::new() };
        let mut cmd = c.script();
        cmd.args(["up", "--replicas", "3", "--port", &c.proxy.to_string(), "--shared"]).arg(c.shared.path()).arg("--").args(extra);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        assert!(out.status.success(), "local-cluster.sh up: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        c.record(&out.stdout);
        assert_eq!(c.pids.len(), 3, "one line per replica: {}", String::from_utf8_lossy(&out.stdout));
        c
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy)
    }

    fn kill(&self, name: &str) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pids[name] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }

    async fn restart(&mut self, name: &str) {
        let mut cmd = self.script();
        cmd.args(["restart", name]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        assert!(out.status.success(), "restart {name}: {}", String::from_utf8_lossy(&out.stderr));
        self.record(&out.stdout);
    }

    /// Every file under the shared dir (the avatars and their material).
    fn shared_files(&self) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        let mut stack = vec![self.shared.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if !p.starts_with(self.shared.path().join("avatars/.locks")) {
                    out.insert(p);
                }
            }
        }
        out
    }

    async fn json(&self, r: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let r = r.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn job_form(&self) -> Form {
        Form::new().part("video", Part::bytes(std::fs::read(&media().video).unwrap()).file_name("v.mp4")).part("audio", Part::bytes(std::fs::read(&media().audio).unwrap()).file_name("a.wav"))
    }

    /// Submits an async job; its id.
    async fn submit(&self) -> String {
        let (status, v) = self.json(self.client.post(self.url("/v1/inference")).header("prefer", "respond-async").multipart(self.job_form())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v["job_id"].as_str().unwrap().to_string()
    }

    async fn wait_job(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, v) = self.json(self.client.get(self.url(&format!("/v1/jobs/{id}")))).await;
            assert_eq!(status, StatusCode::OK, "{id}: {v}");
            if matches!(v["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{id} did not end: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn prepare(&self, avatar: &str) {
        let form = Form::new().text("avatar_id", avatar.to_string()).part("video", Part::bytes(std::fs::read(&media().video).unwrap()).file_name("v.mp4"));
        let (status, v) = self.json(self.client.post(self.url("/v1/avatars")).multipart(form)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, v) = self.json(self.client.get(self.url(&format!("/v1/avatars/{avatar}")))).await;
            assert_eq!(status, StatusCode::OK, "any replica knows {avatar}: {v}");
            match v["state"].as_str() {
                Some("ready") => return,
                Some("preparing") => {}
                _ => panic!("{avatar}: {v}"),
            }
            assert!(Instant::now() < deadline, "{avatar} not ready: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Speaks for `avatar` (synchronously); the owner of the speak job.
    async fn speak(&self, avatar: &str) -> String {
        let form = Form::new().part("audio", Part::bytes(std::fs::read(&media().audio).unwrap()).file_name("a.wav"));
        let (status, v) = self.json(self.client.post(self.url(&format!("/v1/avatars/{avatar}/speak"))).multipart(form)).await;
        assert_eq!(status, StatusCode::OK, "speak {avatar}: {v}");
        assert_eq!(v["state"], "succeeded", "{v}");
        owner(v["job_id"].as_str().unwrap())
    }

    async fn prepare_jobs(&self) -> BTreeMap<String, String> {
        let (_, list) = self.json(self.client.get(self.url("/v1/avatars"))).await;
        list.as_array().unwrap().iter().map(|a| (a["avatar_id"].as_str().unwrap().to_string(), a["prepare_job_id"].as_str().unwrap().to_string())).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script().arg("down").status();
    }
}

/// `s1` of `s1-0123…`.
fn owner(job: &str) -> String {
    job[..job.len() - 33].to_string()
}

/// 50 async jobs and every follow-up (status, report, output with Range, events, cancel),
/// all through the proxy: each answer must come from the job's owner.
async fn jobs_and_follow_ups(c: &Cluster) {
    let ids: Vec<String> = futures::stream::iter(0..50).map(|_| c.submit()).buffer_unordered(8).collect().await;
    let owners: BTreeSet<String> = ids.iter().map(|id| owner(id)).collect();
    assert_eq!(owners, BTreeSet::from(["s0".to_string(), "s1".into(), "s2".into()]), "new jobs spread over the replicas");
    let mut wrong = Vec::new();
    for id in &ids {
        let v = c.wait_job(id).await;
        if v["state"] != "succeeded" {
            wrong.push(format!("{id}: {v}"));
            continue;
        }
        let (status, report) = c.json(c.client.get(c.url(&format!("/v1/jobs/{id}/report")))).await;
        if status != StatusCode::OK || report["job_id"] != id.as_str() {
            wrong.push(format!("{id} report: {status} {report}"));
        }
        let r = c.client.get(c.url(&format!("/v1/jobs/{id}/output"))).header("range", "bytes=0-99").send().await.unwrap();
        let status = r.status();
        let body = r.bytes().await.unwrap();
        if status != StatusCode::PARTIAL_CONTENT || body.len() != 100 || &body[4..8] != b"ftyp" {
            wrong.push(format!("{id} output range: {status}, {} bytes", body.len()));
        }
        let r = c.client.get(c.url(&format!("/v1/jobs/{id}/events"))).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        if status != StatusCode::OK || !text.contains("event: done") || !text.contains(id.as_str()) {
            wrong.push(format!("{id} events: {status} {text}"));
        }
    }
    // Cancels reach the owner: 200 while it runs, 409 once it ended; never a 404.
    for _ in 0..6 {
        let id = c.submit().await;
        let (status, v) = c.json(c.client.delete(c.url(&format!("/v1/jobs/{id}")))).await;
        if !(status == StatusCode::OK || (status == StatusCode::CONFLICT && v["error"] == "job_finished")) {
            wrong.push(format!("{id} cancel: {status} {v}"));
        }
    }
    assert!(wrong.is_empty(), "{} wrong answers of {}:\n{}", wrong.len(), ids.len() * 4 + 6, wrong.join("\n"));
}

/// Avatars prepared once through the proxy, spoken from every replica; one replica
/// killed with jobs in flight, then restarted.
async fn avatars_and_a_replica_lost(c: &mut Cluster) {
    let avatars = ["alice", "bob", "carol"];
    for a in avatars {
        c.prepare(a).await;
    }
    let prepared = c.prepare_jobs().await;
    assert_eq!(prepared.len(), 3, "{prepared:?}");
    for a in avatars {
        let mut speakers = BTreeSet::new();
        for _ in 0..6 {
            speakers.insert(c.speak(a).await);
        }
        assert_eq!(speakers.len(), 3, "{a} spoken from every replica: {speakers:?}");
    }
    let before = c.shared_files();
    assert!(before.iter().any(|p| p.ends_with("avatar.json")), "{before:?}");

    // In-flight work on s1, then s1 dies.
    let mut on_s1 = Vec::new();
    while on_s1.len() < 2 {
        let id = c.submit().await;
        if owner(&id) == "s1" {
            on_s1.push(id);
        }
    }
    c.kill("s1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &on_s1 {
        let r = c.client.get(c.url(&format!("/v1/jobs/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{id}");
        assert!(r.headers().contains_key("retry-after"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "instance_unavailable", "{v}");
        assert!(v["detail"].as_str().unwrap().contains("`s1`"), "{v}");
    }
    for a in avatars {
        for _ in 0..3 {
            let by = c.speak(a).await;
            assert_ne!(by, "s1");
        }
    }
    assert_eq!(c.prepare_jobs().await, prepared, "nothing was prepared twice");
    let (status, v) = c.json(c.client.post(c.url("/v1/avatars")).multipart(Form::new().text("avatar_id", "alice").part("video", Part::bytes(std::fs::read(&media().video).unwrap()).file_name("v.mp4")))).await;
    assert_eq!((status, v["error"].as_str()), (StatusCode::CONFLICT, Some("avatar_exists")), "{v}");
    let during = c.shared_files();
    assert!(before.is_subset(&during), "no file lost: {:?}", before.difference(&during).collect::<Vec<_>>());

    // s1 rejoins: its lost jobs say so, and it deletes nobody's files.
    c.restart("s1").await;
    for id in &on_s1 {
        let (status, v) = c.json(c.client.get(c.url(&format!("/v1/jobs/{id}/report")))).await;
        assert_eq!((status, v["error"].as_str()), (StatusCode::GONE, Some("job_lost")), "{v}");
    }
    let after = c.shared_files();
    assert!(during.is_subset(&after), "the restart removed {:?}", during.difference(&after).collect::<Vec<_>>());
    let mut speakers = BTreeSet::new();
    for _ in 0..6 {
        speakers.insert(c.speak("alice").await);
    }
    assert!(speakers.contains("s1"), "the restarted replica speaks again: {speakers:?}");
    assert_eq!(c.prepare_jobs().await, prepared);
}

fn nginx_present() -> bool {
    Command::new(Path::new(REPO).join("scripts/ensure-deps.sh")).arg("nginx").status().is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_of_the_preview_engine_behind_nginx() {
    assert!(nginx_present(), "nginx is needed (scripts/ensure-deps.sh nginx)");
    let mut c = Cluster::up(&["--queue-size".into(), "64".into(), "--max-concurrent-jobs".into(), "2".into()]).await;
    jobs_and_follow_ups(&c).await;
    avatars_and_a_replica_lost(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_persistent_workers_behind_nginx() {
    assert!(nginx_present(), "nginx is needed (scripts/ensure-deps.sh nginx)");
    let worker = Path::new(REPO).join("tests/fixtures/worker/fixture_worker.py");
    let extra: Vec<String> = [
        "--backend",
        "command",
        "--pipeline-command",
        "cp {video} {output}",
        "--realtime",
        "--worker-command",
        &format!("python3 -u {}", worker.display()),
        "--pipeline-env",
        "PYTHONDONTWRITEBYTECODE=1",
        "--queue-size",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut c = Cluster::up(&extra).await;
    avatars_and_a_replica_lost(&mut c).await;
}
