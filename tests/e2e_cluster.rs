//! Many replicas behind one address: three real sidecars and a real nginx started by
//! `scripts/local-cluster.sh` from the shipped configuration (deploy/proxy/nginx.conf.in),
//! driven only through the proxy, as a user's client would be. Every job follow-up must
//! reach the job's owner; avatars prepared once must be spoken from every replica; a
//! replica killed mid-run must cost only its own jobs, with a clear error for them, and
//! rejoin without deleting anyone's files. Run with the preview engine and with the
//! fixture worker (persistent workers).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::{Cluster, owner};
use common::media::{file_part, media};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

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
    // The list is the cluster's, from any replica (each publishes its own every second).
    for _ in 0..3 {
        let want: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, list) = c.json(c.client.get(c.url("/v1/jobs"))).await;
            assert_eq!(status, StatusCode::OK);
            let listed: BTreeSet<&str> = list.as_array().unwrap().iter().filter_map(|j| j["job_id"].as_str()).collect();
            if want.is_subset(&listed) {
                let created: Vec<&str> = list.as_array().unwrap().iter().filter_map(|j| j["created_at"].as_str()).collect();
                assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first: {created:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "GET /v1/jobs misses {:?}", want.difference(&listed).collect::<Vec<_>>());
            tokio::time::sleep(Duration::from_millis(200)).await;
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
    // A streamed speak passes through the proxy as the replica writes it.
    let form = Form::new().text("stream", "true").part("audio", file_part(&media().audio, "a.wav"));
    let r = c.client.post(c.url("/v1/avatars/alice/speak")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    let body = r.bytes().await.unwrap();
    assert!(body.len() > 1000 && &body[4..8] == b"ftyp", "{} bytes", body.len());
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
    let (status, v) = c.json(c.client.post(c.url("/v1/avatars")).multipart(Form::new().text("avatar_id", "alice").part("video", file_part(&media().video, "v.mp4")))).await;
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
    // `check` on the replicas' shared dir: writable, and its locks work.
    let out = Command::new(env!("CARGO_BIN_EXE_musetalk-sidecar")).arg("check").arg("--shared-dir").arg(c.shared.path()).env("NO_COLOR", "1").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("ok") && l.contains("shared dir") && l.contains("flock works")), "{text}");
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
    jobs_and_follow_ups(&c).await;
    avatars_and_a_replica_lost(&mut c).await;
}
