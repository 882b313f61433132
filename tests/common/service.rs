//! Runs the REAL `musetalk-sidecar` binary for end-to-end tests (DESIGN.md §8).
//!
//! [`ServiceBuilder`] starts `musetalk-sidecar serve` on `127.0.0.1:0` with a temp
//! data dir and JSON logs, reads the bound port(s) from the `listening on http://…`
//! log line, and keeps draining stdout and stderr (so the child never blocks on a
//! full pipe) into buffers that tests can read. The child is killed on drop.
//!
//! ```ignore
//! let svc = ServiceBuilder::new().args(["--sample-interval", "100ms"]).start().await;
//! svc.wait_ready().await;
//! let body = svc.get("/healthz").await.text().await.unwrap();
//! ```

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_musetalk-sidecar");

/// How long the service may take to log its listening line, or to turn ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `Command` for the binary with a clean environment as far as this service is
/// concerned: every `MUSETALK_SIDECAR_*` and `OTEL_*` variable of the test
/// environment is removed (a CI machine exporting `OTEL_EXPORTER_OTLP_ENDPOINT` must
/// not redirect the test's spans), and `RUST_LOG=info` so the listening line is logged.
/// For CLI tests that run the binary to completion (`.output()`).
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("MUSETALK_SIDECAR_") || k.starts_with("OTEL_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Options for one run of `musetalk-sidecar serve`.
pub struct ServiceBuilder {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    data_dir: Option<PathBuf>,
    subcommand: bool,
    bare: bool,
}

impl Default for ServiceBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceBuilder {
    pub fn new() -> Self {
        ServiceBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            data_dir: None,
            subcommand: true,
            bare: false,
        }
    }

    /// One extra argument after `serve --listen 127.0.0.1:0 --data-dir … --log-format json`.
    /// Giving `--listen`, `--data-dir` or `--log-format` here replaces that default
    /// (clap refuses a flag given twice); text logs are parsed for the port too.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the child (set after the defaults, so it wins).
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// Use this data dir instead of a fresh temp dir (e.g. to restart on the same data).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Only `--listen 127.0.0.1:0` (and the [`arg`](Self::arg)s): every other setting at
    /// its built-in default, as a user's `scripts/run.sh` runs it — the relative
    /// `./data` inside the service's own fresh working directory, text logs.
    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }

    /// The MuseTalk fixture backend (tests/fixtures/musetalk: the real CLI contract, no
    /// model) in simple mode.
    pub fn fixture_musetalk() -> Self {
        ServiceBuilder::new()
            .args(["--backend", "musetalk", "--musetalk-python", "python3", "--musetalk-dir"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/musetalk"))
    }

    /// Realtime mode with the fixture worker (tests/fixtures/worker/fixture_worker.py).
    pub fn fixture_worker(self) -> Self {
        let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/worker/fixture_worker.py");
        self.args(["--realtime", "--worker-command"]).arg(format!("python3 -u {}", worker.display()))
    }

    /// Run without the explicit `serve` subcommand (serve is the default).
    pub fn without_subcommand(mut self) -> Self {
        self.subcommand = false;
        self
    }

    /// Starts the service and waits (on the blocking pool) for its listening line.
    pub async fn start(self) -> Service {
        match tokio::task::spawn_blocking(move || self.start_blocking()).await {
            Ok(s) => s,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// As [`ServiceBuilder::start`], for synchronous tests.
    pub fn start_blocking(self) -> Service {
        let temp = tempfile::Builder::new()
            .prefix("musetalk-e2e-")
            .tempdir()
            .expect("temp dir");
        let data_dir = given(&self.args, "--data-dir")
            .map(|d| temp.path().join(d))
            .or_else(|| self.data_dir.clone())
            .unwrap_or_else(|| temp.path().join("data"));
        let mut cmd = command();
        if self.subcommand {
            cmd.arg("serve");
        }
        if given(&self.args, "--listen").is_none() {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        if given(&self.args, "--data-dir").is_none() && !self.bare {
            cmd.arg("--data-dir").arg(&data_dir);
        }
        if given(&self.args, "--log-format").is_none() && !self.bare {
            cmd.arg("--log-format").arg("json");
        }
        cmd.args(&self.args);
        // Fast span export: the batch processor sends every 100 ms instead of 5 s.
        cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd.current_dir(temp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));

        let stderr_buf = Arc::new(Mutex::new(String::new()));
        let stdout_buf = Arc::new(Mutex::new(String::new()));
        let (line_tx, line_rx) = mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        let buf = stderr_buf.clone();
        std::thread::spawn(move || drain_lines(stderr, buf, Some(line_tx)));
        let stdout = child.stdout.take().unwrap();
        let buf = stdout_buf.clone();
        std::thread::spawn(move || drain_lines(stdout, buf, None));

        let mut service = Service {
            child: Mutex::new(Some(child)),
            addr: "0.0.0.0:0".parse().unwrap(),
            admin_addr: None,
            stderr: stderr_buf,
            stdout: stdout_buf,
            data_dir,
            _temp: temp,
            client: client(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match line_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((addr, admin)) = parse_listening(&line) {
                        service.addr = addr;
                        service.admin_addr = admin;
                        return service;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{shown}: no `listening on http://` log line within {START_TIMEOUT:?}; logs:\n{}",
                        service.logs()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stderr closed: the process exited before listening.
                    let status = service.child.lock().unwrap().as_mut().unwrap().wait().ok();
                    panic!(
                        "{shown}: exited ({status:?}) before listening; logs:\n{}",
                        service.logs()
                    )
                }
            }
        }
    }
}

/// Copies a pipe into `buf` line by line (lossy UTF-8), forwarding each line to
/// `lines` while someone listens.
fn drain_lines(pipe: impl Read, buf: Arc<Mutex<String>>, mut lines: Option<mpsc::Sender<String>>) {
    let mut reader = BufReader::new(pipe);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw).into_owned();
                buf.lock().unwrap().push_str(&line);
                if let Some(tx) = &lines
                    && tx.send(line).is_err()
                {
                    lines = None;
                }
            }
        }
    }
}

/// The value of `flag` in `args` (`--flag VALUE` or `--flag=VALUE`), if given.
fn given(args: &[OsString], flag: &str) -> Option<OsString> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a_str = a.to_string_lossy();
        if a_str == flag {
            return it.next().cloned();
        }
        if let Some(v) = a_str.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.into());
        }
    }
    None
}

/// `(addr, admin_addr)` from the log line whose message starts with `listening on http://`
/// (JSON: the `addr` and `admin_addr` fields; text: the address in the message and
/// `admin_addr=…`).
fn parse_listening(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
        let rest = line.split_once("listening on http://")?.1;
        let addr = rest.split_whitespace().next()?.parse().ok()?;
        let admin = line.split_once("admin_addr=").and_then(|(_, r)| {
            r.trim_start_matches('"')
                .split(['"', ' '])
                .next()?
                .parse()
                .ok()
        });
        return Some((addr, admin));
    };
    let fields = &v["fields"];
    if !fields["message"]
        .as_str()?
        .starts_with("listening on http://")
    {
        return None;
    }
    let addr = fields["addr"].as_str()?.parse().ok()?;
    // "same listener" when --admin-listen is not set.
    let admin = fields["admin_addr"].as_str().and_then(|a| a.parse().ok());
    Some((addr, admin))
}

/// An HTTP client for loopback tests: no proxy from the environment, short timeouts.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// A running `musetalk-sidecar serve`. Killed (SIGKILL) on drop if still running.
pub struct Service {
    child: Mutex<Option<Child>>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    data_dir: PathBuf,
    _temp: tempfile::TempDir,
    client: reqwest::Client,
}

impl Service {
    /// Starts with default options plus `args`.
    pub async fn start<I, S>(args: I) -> Service
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ServiceBuilder::new().args(args).start().await
    }

    /// The main listener's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's bound address, when `--admin-listen` was given.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where /metrics is served: the admin listener if any, else the main one.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.admin_addr.unwrap_or(self.addr)
    }

    /// `http://ADDR{path}` on the main listener (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://ADMIN_ADDR{path}` (the main listener when there is no admin one).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.metrics_addr())
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The text of `/metrics` (on the admin listener when there is one).
    pub async fn metrics_text(&self) -> String {
        let url = self.admin_url("/metrics");
        let r = self.client.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}; logs:\n{}", self.logs()));
        r.text().await.unwrap()
    }

    /// GET on the main listener; panics if the request itself fails.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        let url = self.url(path);
        self.client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}; logs:\n{}", self.logs()))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .expect("child already reaped")
            .id()
    }

    /// Everything the process wrote to stderr so far (JSON log lines unless overridden).
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// The parsed JSON log lines so far (lines that are not JSON are skipped).
    pub fn log_records(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls the logs every 50 ms until one line contains `needle`; panics after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?} within {timeout:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls GET /readyz (admin listener if any) every 100 ms until 200; panics after 30 s
    /// with the last answer. Returns the readiness JSON.
    pub async fn wait_ready(&self) -> serde_json::Value {
        let url = self.admin_url("/readyz");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let last;
            match self
                .client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    if status == reqwest::StatusCode::OK {
                        return serde_json::from_str(&body)
                            .unwrap_or_else(|e| panic!("/readyz 200 is not JSON ({e}): {body}"));
                    }
                    last = format!("{status}: {body}");
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "/readyz not 200 within {START_TIMEOUT:?}; last answer: {last}; logs:\n{}",
                    self.logs()
                );
            }
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "service exited ({status}) while waiting for /readyz; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
    }

    /// The exit status if the process has exited (without waiting).
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()?
            .try_wait()
            .ok()
            .flatten()
    }

    /// Waits up to `timeout` for the process to exit; panics (and kills it) if it does not.
    pub async fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                // Let the drain threads take the last lines (the pipes are closed now).
                tokio::time::sleep(Duration::from_millis(50)).await;
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "service did not exit within {timeout:?}; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL now (no graceful shutdown) and reap.
    pub fn kill(&self) {
        if let Some(child) = self.child.lock().unwrap().as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            && child.try_wait().ok().flatten().is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_parses_in_json_and_text() {
        let json = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening on http://127.0.0.1:35143","addr":"127.0.0.1:35143","admin_addr":"127.0.0.1:37681","backend":"preview"},"target":"musetalk_sidecar"}"#;
        assert_eq!(
            parse_listening(json),
            Some((
                "127.0.0.1:35143".parse().unwrap(),
                Some("127.0.0.1:37681".parse().unwrap())
            ))
        );
        let same = json.replace(r#""127.0.0.1:37681""#, r#""same listener""#);
        assert_eq!(
            parse_listening(&same),
            Some(("127.0.0.1:35143".parse().unwrap(), None))
        );
        let text = r#"2026-11-28T09:29:28Z  INFO musetalk_sidecar: listening on http://127.0.0.1:35143 addr=127.0.0.1:35143 admin_addr="same listener" backend="preview""#;
        assert_eq!(
            parse_listening(text),
            Some(("127.0.0.1:35143".parse().unwrap(), None))
        );
        let text = text.replace(r#"admin_addr="same listener""#, "admin_addr=127.0.0.1:9");
        assert_eq!(
            parse_listening(&text),
            Some((
                "127.0.0.1:35143".parse().unwrap(),
                Some("127.0.0.1:9".parse().unwrap())
            ))
        );
        assert_eq!(
            parse_listening(r#"{"fields":{"message":"backend ready"}}"#),
            None
        );
        assert_eq!(
            given(
                &["--a".into(), "1".into(), "--data-dir=/x".into()],
                "--data-dir"
            ),
            Some("/x".into())
        );
        assert_eq!(
            given(&["--data-dir".into(), "/y".into()], "--data-dir"),
            Some("/y".into())
        );
        assert_eq!(
            given(&["--data-dirx".into(), "/y".into()], "--data-dir"),
            None
        );
    }
}

/// A response as its status and JSON body (panics with the body when it is not JSON).
pub async fn json(r: reqwest::Response) -> (reqwest::StatusCode, serde_json::Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}")))
}
