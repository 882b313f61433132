//! A bounded load test on loopback against the REAL binary: many concurrent clients
//! uploading and running preview jobs. Every accepted job ends in a terminal state, the
//! counters on /metrics equal what the clients saw, refusals are 429 (never a 5xx or a
//! dropped connection), and memory returns near its baseline. Prints the figures
//! (jobs/s, latency, RSS) for BENCHMARKS.md; asserts no timing.

mod common;

use std::time::{Duration, Instant};

use common::service::ServiceBuilder;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};

const CLIENTS: usize = 12;
const REQUESTS_PER_CLIENT: usize = 4;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_every_job_accounted_for_and_memory_returns() {
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let (video, audio) = (read(common::media::video(64, 64, 10, 1)), read(common::media::sine(440, 1, 8000)));
    let svc = ServiceBuilder::new().args(["--max-concurrent-jobs", "2", "--queue-size", "4"]).start().await;
    svc.wait_ready().await;
    // Warm up (first ffmpeg runs, allocator arenas), then take the baseline.
    for _ in 0..2 {
        let form = Form::new().part("video", Part::bytes(video.clone()).file_name("v.mp4")).part("audio", Part::bytes(audio.clone()).file_name("a.wav"));
        assert_eq!(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap().status(), StatusCode::OK);
    }
    let baseline = rss_kib(svc.pid());

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, video, audio) = (svc.client().clone(), svc.url("/v1/inference"), video.clone(), audio.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..REQUESTS_PER_CLIENT {
                let form = Form::new().part("video", Part::bytes(video.clone()).file_name("v.mp4")).part("audio", Part::bytes(audio.clone()).file_name("a.wav"));
                let t0 = Instant::now();
                let r = client.post(&url).multipart(form).send().await;
                let r = r.unwrap_or_else(|e| panic!("a dropped connection under load: {e}"));
                let status = r.status();
                let retry_after = r.headers().get("retry-after").is_some();
                let body: serde_json::Value = r.json().await.expect("every answer is JSON");
                seen.push((status, retry_after, body, t0.elapsed()));
                if status == StatusCode::TOO_MANY_REQUESTS {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            seen
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    let wall = started.elapsed();

    let ok: Vec<_> = results.iter().filter(|r| r.0 == StatusCode::OK).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == StatusCode::TOO_MANY_REQUESTS).collect();
    let other: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK && r.0 != StatusCode::TOO_MANY_REQUESTS).map(|r| (r.0, r.2.clone())).collect();
    assert!(other.is_empty(), "only 200 or 429 under load: {other:?}");
    assert!(!ok.is_empty() && !refused.is_empty(), "the load exceeded the queue: {} ok, {} refused", ok.len(), refused.len());
    for r in &refused {
        assert!(r.1, "429 carries Retry-After");
        assert_eq!(r.2["error"], "queue_full");
    }
    // Every accepted job is terminal and succeeded; the server's counters match.
    let jobs: serde_json::Value = svc.get("/v1/jobs").await.json().await.unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), ok.len() + 2, "every accepted job is in the store (plus the 2 warm-up jobs)");
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "all terminal and succeeded");
    let m = svc.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric_sum(&m, "musetalk_jobs_total{"), (ok.len() + 2) as f64, "{m}");
    assert_eq!(metric_sum(&m, r#"http_server_request_duration_seconds_count{http_request_method="POST",http_route="/v1/inference",http_response_status_code="429"}"#), refused.len() as f64);
    assert_eq!(metric_sum(&m, r#"http_server_request_duration_seconds_count{http_request_method="POST",http_route="/v1/inference",http_response_status_code="200"}"#), (ok.len() + 2) as f64);
    assert_eq!(metric_sum(&m, "musetalk_jobs_in_flight{"), 0.0);
    assert_eq!(metric_sum(&m, "musetalk_jobs_queued{"), 0.0);

    // Memory returns near its baseline once the load is over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(svc.pid());
    let peak = hwm_kib(svc.pid());
    assert!(after < baseline + 16 * 1024, "RSS {after} KiB after the load vs {baseline} KiB before");

    let mut lat: Vec<f64> = ok.iter().map(|r| r.3.as_secs_f64() * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "load: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests in {:.1} s: {} succeeded ({:.2} jobs/s), {} refused (429); latency p50 {:.0} ms p99 {:.0} ms; RSS baseline {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
        wall.as_secs_f64(),
        ok.len(),
        ok.len() as f64 / wall.as_secs_f64(),
        refused.len(),
        p(0.5),
        p(0.99),
        baseline as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );
}
