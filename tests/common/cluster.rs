//! Replicas behind one address, as `scripts/local-cluster.sh` starts them: the tests'
//! handle on them (through the proxy, as a client; the replicas' own addresses for
//! Prometheus).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

use super::media::media;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What `scripts/local-cluster.sh up` started; `down` when dropped.
pub struct Cluster {
    state: tempfile::TempDir,
    pub shared: tempfile::TempDir,
    pub proxy: u16,
    /// Replica name → pid.
    pub pids: BTreeMap<String, u32>,
    /// Replica name → its own address (what Prometheus scrapes).
    pub addrs: BTreeMap<String, SocketAddr>,
    pub client: reqwest::Client,
}

impl Cluster {
    pub fn script(&self) -> Command {
        let mut c = Command::new(Path::new(REPO).join("scripts/local-cluster.sh"));
        c.env("LOCAL_CLUSTER_DIR", self.state.path()).env("MUSETALK_SIDECAR_BIN", env!("CARGO_BIN_EXE_musetalk-sidecar"));
        c
    }

    pub fn record(&mut self, stdout: &[u8]) {
        for line in String::from_utf8_lossy(stdout).lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            match v["role"].as_str() {
                Some("sidecar") => {
                    let name = v["name"].as_str().unwrap().to_string();
                    self.addrs.insert(name.clone(), SocketAddr::from(([127, 0, 0, 1], v["port"].as_u64().unwrap() as u16)));
                    self.pids.insert(name, v["pid"].as_u64().unwrap() as u32);
                }
                Some("proxy") => assert_eq!(v["port"].as_u64(), Some(u64::from(self.proxy)), "{line}"),
                _ => panic!("unexpected line {line}"),
            }
        }
    }

    pub async fn up(extra: &[String]) -> Cluster {
        // The shared dir on another filesystem than the replicas' data dirs where there is one
        // (as a volume is on Kubernetes): uploads then move across filesystems.
        let shm = Path::new("/dev/shm");
        let shared = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let mut c = Cluster { state: tempfile::tempdir().unwrap(), shared, proxy: super::free_port(), pids: BTreeMap::new(), addrs: BTreeMap::new(), client: super::service::client() };
        let mut cmd = c.script();
        cmd.args(["up", "--replicas", "3", "--port", &c.proxy.to_string(), "--shared"]).arg(c.shared.path()).arg("--").args(extra);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        assert!(out.status.success(), "local-cluster.sh up: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        c.record(&out.stdout);
        assert_eq!(c.pids.len(), 3, "one line per replica: {}", String::from_utf8_lossy(&out.stdout));
        c
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy)
    }

    pub fn kill(&self, name: &str) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pids[name] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }

    pub async fn restart(&mut self, name: &str) {
        let mut cmd = self.script();
        cmd.args(["restart", name]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        assert!(out.status.success(), "restart {name}: {}", String::from_utf8_lossy(&out.stderr));
        self.record(&out.stdout);
    }

    /// Every file under the shared dir (the avatars and their material).
    pub fn shared_files(&self) -> BTreeSet<PathBuf> {
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

    pub async fn json(&self, r: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let r = r.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn job_form(&self) -> Form {
        Form::new().part("video", super::media::file_part(&media().video, "v.mp4")).part("audio", super::media::file_part(&media().audio, "a.wav"))
    }

    /// Submits an async job; its id.
    pub async fn submit(&self) -> String {
        let (status, v) = self.json(self.client.post(self.url("/v1/inference")).header("prefer", "respond-async").multipart(self.job_form())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v["job_id"].as_str().unwrap().to_string()
    }

    pub async fn wait_job(&self, id: &str) -> Value {
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

    pub async fn prepare(&self, avatar: &str) {
        let form = Form::new().text("avatar_id", avatar.to_string()).part("video", super::media::file_part(&media().video, "v.mp4"));
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
    pub async fn speak(&self, avatar: &str) -> String {
        let form = Form::new().part("audio", super::media::file_part(&media().audio, "a.wav"));
        let (status, v) = self.json(self.client.post(self.url(&format!("/v1/avatars/{avatar}/speak"))).multipart(form)).await;
        assert_eq!(status, StatusCode::OK, "speak {avatar}: {v}");
        assert_eq!(v["state"], "succeeded", "{v}");
        owner(v["job_id"].as_str().unwrap())
    }

    pub async fn prepare_jobs(&self) -> BTreeMap<String, String> {
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
pub fn owner(job: &str) -> String {
    job[..job.len() - 33].to_string()
}

