//! A REAL Prometheus server (the Debian `prometheus` package, 2.42) for end-to-end
//! tests (DESIGN.md §8): started in a temp dir with a generated config that scrapes
//! the given targets every second, exemplar storage on, killed on drop.
//!
//! ```ignore
//! let prom = Prometheus::start(&[svc.metrics_addr()], None).await;
//! prom.wait_up(Duration::from_secs(20)).await;
//! let v = prom.query_value("system_memory_limit_bytes").await;
//! ```

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The scrape job every target is under (`up{job="musetalk-sidecar"}`).
pub const JOB: &str = "musetalk-sidecar";

/// How long Prometheus may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running Prometheus; the process is killed and its temp dir removed on drop
/// (also when the test panics).
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    client: reqwest::Client,
    /// How many targets the job scrapes.
    targets: usize,
}

/// The config Prometheus runs with: global 1 s scrape and evaluation intervals, one
/// job ([`JOB`]) scraping `targets`, then `extra_config` appended verbatim as further
/// top-level YAML keys (e.g. `rule_files:` with absolute paths).
pub fn config_yaml(targets: &[SocketAddr], extra_config: Option<&str>) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let mut yaml = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: '{JOB}'\n    static_configs:\n      - targets: [{}]\n",
        list.join(", ")
    );
    if let Some(extra) = extra_config {
        yaml.push_str(extra);
        if !extra.ends_with('\n') {
            yaml.push('\n');
        }
    }
    yaml
}


/// Runs `promtool` with `args`, feeding `stdin`; returns (success, stdout + stderr).
pub fn promtool(args: &[&str], stdin: Option<&[u8]>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}); install it: apt-get install prometheus (or run scripts/test.sh)"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // A write error means promtool exited early; its output says why.
        let _ = pipe.write_all(input);
    }
    let out = child.wait_with_output().expect("promtool output");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Ok once `/-/ready` is 200; Err(log) if the process exits or 30 s pass (the process
/// is then left for the caller to kill).
async fn wait_ready(
    client: &reqwest::Client,
    addr: SocketAddr,
    child: &mut Child,
    log_path: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    loop {
        if let Ok(r) = client
            .get(format!("http://{addr}/-/ready"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("prometheus exited ({status}):\n{}", log()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "prometheus not ready within {READY_TIMEOUT:?}:\n{}",
                log()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Prometheus {
    /// Writes the config (checked with `promtool check config`), starts Prometheus on a
    /// free loopback port and waits until `/-/ready` answers 200.
    pub async fn start(targets: &[SocketAddr], extra_config: Option<&str>) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("musetalk-prometheus-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(targets, extra_config)).expect("write prometheus.yml");
        let config_s = config.to_str().unwrap().to_string();
        let (ok, out) = promtool(&["check", "config", &config_s], None);
        assert!(
            ok,
            "promtool check config failed:\n{out}\n--- config ---\n{}",
            std::fs::read_to_string(&config).unwrap()
        );

        let client = super::service::client();
        let log_path = dir.path().join("prometheus.log");
        // The port is free when chosen but could be taken before Prometheus binds it: retry.
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let addr: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={config_s}"))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--enable-feature=exemplar-storage")
                .arg("--storage.tsdb.retention.time=1h")
                .arg("--log.level=warn")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run prometheus ({e}); install it: apt-get install prometheus (or run scripts/test.sh)"));
            match wait_ready(&client, addr, &mut child, &log_path).await {
                Ok(()) => {
                    return Prometheus {
                        child,
                        addr,
                        dir,
                        client,
                        targets: targets.len(),
                    };
                }
                Err(log) => {
                    last_log = log;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("Prometheus did not become ready (3 attempts); last log:\n{last_log}");
    }

    /// `http://127.0.0.1:PORT{path}` of the Prometheus web/API listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The temp dir holding prometheus.yml, the TSDB and prometheus.log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.yml")
    }

    /// Prometheus' own log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path (e.g. `/api/v1/targets`, `/api/v1/query_exemplars?…`), asserting
    /// HTTP 200 and `"status": "success"`; returns the `data` field.
    pub async fn api(&self, path_and_query: &str) -> Value {
        let url = self.url(path_and_query);
        let r = self
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {url}: {status}, not JSON ({e}): {body}"));
        assert!(
            status.is_success() && v["status"] == "success",
            "GET {url}: {status}: {body}"
        );
        v["data"].clone()
    }

    /// An instant query (`/api/v1/query`); returns `data.result` (an array of
    /// `{metric, value: [ts, "v"]}` for vectors).
    pub async fn query(&self, promql: &str) -> Value {
        let mut url = reqwest::Url::parse(&self.url("/api/v1/query")).unwrap();
        url.query_pairs_mut().append_pair("query", promql);
        let path = format!("{}?{}", url.path(), url.query().unwrap());
        self.api(&path).await["result"].clone()
    }

    /// The value of the first series `promql` returns, if any.
    pub async fn query_value(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await;
        r.get(0)?["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` every 250 ms until `accept` takes its result; panics after `timeout`
    /// with the last result and Prometheus' targets.
    pub async fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query(promql).await;
            if accept(&r) {
                return r;
            }
            if Instant::now() >= deadline {
                let targets = self.api("/api/v1/targets").await;
                panic!(
                    "`{promql}` not as expected within {timeout:?}; last result: {r}\ntargets: {targets:#}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until every target of [`JOB`] has been scraped successfully (`up == 1`).
    pub async fn wait_up(&self, timeout: Duration) -> Value {
        let n = self.targets;
        self.wait_for(&format!("up{{job=\"{JOB}\"}}"), timeout, |r| {
            let series = r.as_array().map(Vec::as_slice).unwrap_or_default();
            series.len() == n && series.iter().all(|s| s["value"][1] == "1")
        })
        .await
    }

    /// The active targets (`/api/v1/targets` → `activeTargets`).
    pub async fn active_targets(&self) -> Vec<Value> {
        self.api("/api/v1/targets").await["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series (`name{labels}` exactly as exposed) in a `/metrics` text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
