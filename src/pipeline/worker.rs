//! Persistent realtime workers: supervised processes speaking the JSON-lines protocol of
//! `docs/worker-protocol.md` (models loaded once; prepare/infer requests).
//!
//! Each worker has a supervisor task that starts it (own process group, clean env,
//! `CUDA_VISIBLE_DEVICES`), waits for `ready`, routes its stdout events to the request in
//! flight, turns stderr into tracing events, and restarts it with backoff when it dies.
//! A request takes an idle worker through [`WorkerPool::acquire`] (the queue wait).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use crate::collector::{CollectorHandle, TreeGuard};
use crate::metrics::{Metrics, registered};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

/// The realtime workers' families (registered by the supervisor's component).
#[derive(Debug)]
pub struct WorkerFamilies {
    pub worker_up: Family<WorkerLabels, Gauge>,
    pub worker_restarts: Family<WorkerLabels, Counter>,
}

impl WorkerFamilies {
    pub fn new(r: &mut Registry) -> Self {
        WorkerFamilies {
            worker_up: registered(r, "musetalk_worker_up", "1 while the realtime worker answers, 0 otherwise.", None, Family::default()),
            worker_restarts: registered(r, "musetalk_worker_restarts", "Realtime worker restarts.", None, Family::default()),
        }
    }
}

/// How to start one worker.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// `gpu0`, `gpu1`, … : the `worker` label.
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
}

/// A request line (sidecar → worker).
#[derive(Clone, Debug, Serialize)]
pub struct Request {
    pub id: String,
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(flatten)]
    pub body: serde_json::Value,
}

/// An event line (worker → sidecar).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready {
        #[serde(default)]
        worker: serde_json::Value,
        #[serde(default)]
        load_seconds: Option<f64>,
        /// Protocol version (absent: 1). 2 adds `first_frame`, `batch` and `stream`.
        #[serde(default)]
        protocol: Option<u32>,
        /// What the worker can do beyond version 1: `stream` (progressive fragmented MP4).
        #[serde(default)]
        capabilities: Vec<String>,
    },
    /// Version 2: the first output frame is ready (`t`: the worker's monotonic clock).
    FirstFrame { id: Option<String>, t: Option<f64> },
    /// Version 2: one model batch (UNet + VAE decode) took `seconds` for `frames` frames.
    Batch {
        id: Option<String>,
        #[serde(default)]
        index: Option<u64>,
        #[serde(default)]
        frames: Option<u64>,
        seconds: f64,
    },
    StageStart { id: Option<String>, name: String, t: Option<f64> },
    StageEnd { id: Option<String>, name: String, t: Option<f64> },
    Progress { id: Option<String>, done: u64, total: Option<u64> },
    Result {
        id: Option<String>,
        #[serde(default)]
        output: Option<String>,
        #[serde(default)]
        frames: Option<u64>,
        #[serde(default)]
        seconds: Option<f64>,
    },
    Error { id: Option<String>, message: String },
}

impl Event {
    fn id(&self) -> Option<&str> {
        match self {
            Event::Ready { .. } => None,
            Event::StageStart { id, .. }
            | Event::StageEnd { id, .. }
            | Event::Progress { id, .. }
            | Event::Result { id, .. }
            | Event::Error { id, .. }
            | Event::FirstFrame { id, .. }
            | Event::Batch { id, .. } => id.as_deref(),
        }
    }
}

/// Parses one stdout line; `None` for anything that is not a protocol event.
pub fn parse_event(line: &str) -> Option<Event> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    serde_json::from_str(line).ok()
}

/// What a request in flight receives.
#[derive(Debug)]
pub enum Delivery {
    Event(Event),
    /// The worker died while the request was in flight.
    Exited { status: String, stderr_tail: String },
}

/// One line (without its `\n`), decoded lossily; `None` at end of stream or on a read error.
async fn read_lossy_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
    let mut buf = Vec::new();
    match r.read_until(b'\n', &mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string()),
    }
}

/// Maps a worker's `CLOCK_MONOTONIC` seconds to wall time.
pub fn monotonic_to_system(t: f64) -> SystemTime {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|ts| ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9).unwrap_or(t);
    let now = SystemTime::now();
    let delta = now_mono - t;
    if delta >= 0.0 { now - Duration::from_secs_f64(delta) } else { now + Duration::from_secs_f64(-delta) }
}

struct InFlight {
    id: String,
    tx: mpsc::UnboundedSender<Delivery>,
}

/// One supervised worker.
pub struct Worker {
    pub spec: WorkerSpec,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    in_flight: Mutex<Option<InFlight>>,
    pgid: Mutex<Option<i32>>,
    /// Bumped on every (re)start: a lease from an earlier life must not return the worker.
    generation: AtomicU64,
    ready: AtomicBool,
    stderr_tail: Mutex<VecDeque<String>>,
    pid: Mutex<Option<u32>>,
    /// Said in `ready`: the worker writes a streamed infer's output progressively.
    streams: AtomicBool,
}

impl Worker {
    /// The worker said it can write an infer's output progressively (protocol 2, `stream`).
    pub fn streams(&self) -> bool {
        self.streams.load(Ordering::Acquire)
    }

    fn new(spec: WorkerSpec) -> Self {
        Worker {
            spec,
            stdin: tokio::sync::Mutex::new(None),
            in_flight: Mutex::new(None),
            pgid: Mutex::new(None),
            generation: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            stderr_tail: Mutex::new(VecDeque::new()),
            pid: Mutex::new(None),
            streams: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kill_group(&self, sig: Signal) {
        if let Some(g) = *self.pgid.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = killpg(Pid::from_raw(g), sig);
        }
    }

    fn deliver(&self, d: Delivery) {
        if let Some(f) = self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = f.tx.send(d);
        }
    }
}

/// Timing knobs of the pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub ready_timeout: Duration,
    pub kill_grace: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// All workers, the idle queue, supervision.
pub struct WorkerPool {
    workers: Vec<Arc<Worker>>,
    idle: Mutex<VecDeque<(usize, u64)>>,
    idle_notify: Notify,
    opts: PoolOptions,
    metrics: Arc<Metrics>,
    collector: CollectorHandle,
    stop: CancellationToken,
    supervisors: tokio_util::task::TaskTracker,
}

impl WorkerPool {
    /// Starts every worker's supervisor. Returns at once: workers become idle on `ready`.
    pub fn start(specs: Vec<WorkerSpec>, opts: PoolOptions, metrics: Arc<Metrics>, collector: CollectorHandle) -> Arc<WorkerPool> {
        let pool = Arc::new(WorkerPool {
            workers: specs.into_iter().map(|s| Arc::new(Worker::new(s))).collect(),
            idle: Mutex::default(),
            idle_notify: Notify::new(),
            opts,
            metrics,
            collector,
            stop: CancellationToken::new(),
            supervisors: tokio_util::task::TaskTracker::new(),
        });
        for i in 0..pool.workers.len() {
            let p = pool.clone();
            pool.supervisors.spawn(async move { p.supervise(i).await });
        }
        pool.supervisors.close();
        pool
    }

    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    /// `Ok` when at least one worker is ready, else what is wrong.
    pub fn readiness(&self) -> Result<String, String> {
        let ready = self.workers.iter().filter(|w| w.is_ready()).count();
        if ready > 0 {
            Ok(format!("{ready}/{} realtime workers ready", self.workers.len()))
        } else {
            Err(format!("no realtime worker ready yet (0/{}; models may still be loading)", self.workers.len()))
        }
    }

    fn labels(&self, i: usize) -> WorkerLabels {
        WorkerLabels { worker: self.workers[i].spec.name.clone() }
    }

    /// Waits for an idle, ready worker (or cancellation).
    pub async fn acquire(self: &Arc<Self>, cancel: &CancellationToken) -> Result<Lease, PipelineError> {
        loop {
            let notified = self.idle_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                while let Some((i, seen)) = idle.pop_front() {
                    let w = &self.workers[i];
                    // Skip entries from an earlier life of the worker.
                    if w.generation.load(Ordering::Acquire) == seen && w.is_ready() {
                        return Ok(Lease { pool: self.clone(), index: i, generation: seen, poisoned: false });
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
                _ = self.stop.cancelled() => return Err(PipelineError::Reported("the service is shutting down".into())),
            }
        }
    }

    fn make_idle(&self, i: usize, generation: u64) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push_back((i, generation));
        self.idle_notify.notify_one();
    }

    /// Sends `shutdown` to every worker, waits up to the kill grace, then kills the groups.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        for w in &self.workers {
            let line = serde_json::to_string(&Request { id: "shutdown".into(), op: "shutdown", traceparent: None, body: serde_json::json!({}) }).unwrap_or_default();
            if let Some(stdin) = w.stdin.lock().await.as_mut() {
                let _ = stdin.write_all(format!("{line}\n").as_bytes()).await;
                let _ = stdin.flush().await;
            }
        }
        if tokio::time::timeout(self.opts.kill_grace, self.supervisors.wait()).await.is_err() {
            for w in &self.workers {
                w.kill_group(Signal::SIGKILL);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), self.supervisors.wait()).await;
        }
    }

    async fn supervise(self: Arc<Self>, i: usize) {
        let worker = self.workers[i].clone();
        let labels = self.labels(i);
        self.metrics.worker.worker_up.get_or_create(&labels).set(0);
        // Known from the start: a worker that never restarted reads 0 restarts.
        let _ = self.metrics.worker.worker_restarts.get_or_create(&labels);
        let mut backoff = self.opts.backoff_initial;
        let mut first = true;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if !first {
                self.metrics.worker.worker_restarts.get_or_create(&labels).inc();
                tracing::warn!(worker = %worker.spec.name, "restarting realtime worker in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(self.opts.backoff_max);
            }
            first = false;
            let started = Instant::now();
            let healthy = self.run_once(i, &worker).await;
            self.metrics.worker.worker_up.get_or_create(&labels).set(0);
            // A worker that served for a while earns a fresh backoff.
            if healthy && started.elapsed() > Duration::from_secs(60) {
                backoff = self.opts.backoff_initial;
            }
        }
    }

    /// One life of a worker. Returns whether it reached `ready`.
    async fn run_once(&self, i: usize, worker: &Arc<Worker>) -> bool {
        let spec = &worker.spec;
        let mut cmd = super::process::command(&spec.program, &spec.args, &spec.cwd, Stdio::piped(), spec.env.iter().cloned());
        let mut child: Child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(worker = %spec.name, "cannot start realtime worker `{}`: {e}", spec.program);
                return false;
            }
        };
        let generation = worker.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let pid = child.id().unwrap_or(0);
        *worker.pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
        *worker.pgid.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid as i32);
        worker.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _tree: TreeGuard = self.collector.register_tree(pid, crate::mode::Mode::Realtime.as_str());
        let _tracked = super::groups::track(pid);
        *worker.stdin.lock().await = child.stdin.take();
        tracing::info!(worker = %spec.name, pid, "realtime worker started");

        let stderr = child.stderr.take().map(|s| {
            let w = worker.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(s);
                // Lossy lines: a non-UTF-8 log line must not stop the reader (the pipe
                // would fill and block the worker).
                while let Some(line) = read_lossy_line(&mut reader).await {
                    tracing::info!(target: "worker", worker = %w.spec.name, "{line}");
                    let mut tail = w.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == 20 {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            })
        });
        let mut stdout = child.stdout.take().map(BufReader::new);
        let ready_deadline = tokio::time::sleep(self.opts.ready_timeout);
        tokio::pin!(ready_deadline);
        let mut reached_ready = false;
        let status = loop {
            tokio::select! {
                line = async { match stdout.as_mut() { Some(r) => read_lossy_line(r).await, None => std::future::pending().await } } => match line {
                    Some(line) => match parse_event(&line) {
                        Some(Event::Ready { worker: info, load_seconds, protocol, capabilities }) => {
                            if !reached_ready {
                                reached_ready = true;
                                worker.streams.store(protocol.unwrap_or(1) >= 2 && capabilities.iter().any(|c| c == "stream"), Ordering::Release);
                                worker.ready.store(true, Ordering::Release);
                                self.metrics.worker.worker_up.get_or_create(&self.labels(i)).set(1);
                                tracing::info!(worker = %spec.name, load_seconds, info = %info, "realtime worker ready");
                                self.make_idle(i, generation);
                            }
                        }
                        Some(ev) => {
                            let current = worker.in_flight.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|f| f.id.clone());
                            if ev.id().is_some() && ev.id() == current.as_deref() {
                                worker.deliver(Delivery::Event(ev));
                            } else {
                                tracing::warn!(worker = %spec.name, "event for no request in flight: {line}");
                            }
                        }
                        None => tracing::info!(target: "worker", worker = %spec.name, stream = "stdout", "{line}"),
                    },
                    // stdout closed: the worker is going away; wait for its status.
                    _ => { stdout = None; }
                },
                status = child.wait() => break status.ok(),
                _ = &mut ready_deadline, if !reached_ready => {
                    tracing::error!(worker = %spec.name, "realtime worker did not say `ready` within {:?}; killing it", self.opts.ready_timeout);
                    worker.kill_group(Signal::SIGKILL);
                }
            }
        };
        worker.ready.store(false, Ordering::Release);
        *worker.stdin.lock().await = None;
        // The leader is gone: no helper of its group may outlive it.
        worker.kill_group(Signal::SIGKILL);
        if let Some(h) = stderr {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        use std::os::unix::process::ExitStatusExt;
        let status_text = super::process::status_text(status.and_then(|s| s.code()), status.and_then(|s| s.signal()));
        let tail: Vec<String> = worker.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()).iter().rev().take(5).rev().cloned().collect();
        worker.deliver(Delivery::Exited { status: status_text.clone(), stderr_tail: tail.join(" | ") });
        if !self.stop.is_cancelled() {
            tracing::warn!(worker = %spec.name, "realtime worker exited ({status_text})");
        }
        reached_ready
    }
}

/// Exclusive use of one ready worker for one request. Dropping it returns the worker to
/// the idle queue, unless the lease was poisoned (the worker was killed) or it died.
pub struct Lease {
    pool: Arc<WorkerPool>,
    index: usize,
    generation: u64,
    poisoned: bool,
}

impl Lease {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.pool.workers[self.index]
    }

    pub fn worker_name(&self) -> &str {
        &self.worker().spec.name
    }

    /// Sends the request; the returned channel receives its events (and `Exited`).
    pub async fn send(&mut self, req: &Request) -> Result<mpsc::UnboundedReceiver<Delivery>, PipelineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = self.worker().clone();
        *w.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(InFlight { id: req.id.clone(), tx });
        let line = serde_json::to_string(req).map_err(|e| PipelineError::Config(format!("encoding the worker request: {e}")))?;
        let mut stdin = w.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            self.poisoned = true;
            return Err(PipelineError::Reported(format!("realtime worker {} is not running", w.spec.name)));
        };
        if let Err(e) = async {
            pipe.write_all(line.as_bytes()).await?;
            pipe.write_all(b"\n").await?;
            pipe.flush().await
        }
        .await
        {
            self.poisoned = true;
            return Err(PipelineError::Reported(format!("writing to realtime worker {}: {e}", w.spec.name)));
        }
        Ok(rx)
    }

    /// Kills the worker's process group (TERM, grace, KILL); the supervisor restarts it.
    pub async fn kill(&mut self) {
        self.poisoned = true;
        let w = self.worker().clone();
        w.kill_group(Signal::SIGTERM);
        let deadline = Instant::now() + self.pool.opts.kill_grace;
        while w.generation.load(Ordering::Acquire) == self.generation && w.is_ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if w.is_ready() && w.generation.load(Ordering::Acquire) == self.generation {
            w.kill_group(Signal::SIGKILL);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let w = self.worker().clone();
        w.in_flight.lock().unwrap_or_else(|e| e.into_inner()).take();
        if !self.poisoned && w.generation.load(Ordering::Acquire) == self.generation && w.is_ready() {
            self.pool.make_idle(self.index, self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_junk_is_ignored() {
        assert_eq!(parse_event(r#"{"event":"ready","worker":{"name":"x"},"load_seconds":1.5}"#), Some(Event::Ready { worker: serde_json::json!({"name":"x"}), load_seconds: Some(1.5), protocol: None, capabilities: vec![] }));
        assert_eq!(
            parse_event(r#"{"event":"ready","worker":{},"protocol":2,"capabilities":["stream"]}"#),
            Some(Event::Ready { worker: serde_json::json!({}), load_seconds: None, protocol: Some(2), capabilities: vec!["stream".into()] })
        );
        assert_eq!(parse_event(r#"{"event":"first_frame","id":"a","t":3.25}"#), Some(Event::FirstFrame { id: Some("a".into()), t: Some(3.25) }));
        assert_eq!(parse_event(r#"{"event":"batch","id":"a","index":0,"frames":8,"seconds":0.125}"#), Some(Event::Batch { id: Some("a".into()), index: Some(0), frames: Some(8), seconds: 0.125 }));
        assert_eq!(
            parse_event(r#"{"event":"stage_start","id":"a","name":"unet_inference","t":12.5,"traceparent":"00-x"}"#),
            Some(Event::StageStart { id: Some("a".into()), name: "unet_inference".into(), t: Some(12.5) })
        );
        assert_eq!(parse_event(r#"{"event":"progress","id":"a","done":3,"total":null}"#), Some(Event::Progress { id: Some("a".into()), done: 3, total: None }));
        assert!(matches!(parse_event(r#"{"event":"error","id":null,"message":"bad json"}"#), Some(Event::Error { id: None, .. })));
        for junk in ["", "loading model...", "{not json", r#"{"event":"unknown"}"#, r#"{"event":"progress","id":"a","done":-1}"#, "[1,2]"] {
            assert_eq!(parse_event(junk), None, "{junk}");
        }
    }

    #[tokio::test]
    async fn non_utf8_lines_do_not_stop_the_reader() {
        let data: &[u8] = b"ok one\n\xff\xfe bad\r\n{\"event\":\"ready\"}\nlast";
        let mut r = tokio::io::BufReader::new(data);
        let mut lines = Vec::new();
        while let Some(l) = read_lossy_line(&mut r).await {
            lines.push(l);
        }
        assert_eq!(lines, ["ok one", "\u{fffd}\u{fffd} bad", "{\"event\":\"ready\"}", "last"]);
    }

    #[test]
    fn requests_serialize_flat() {
        let r = Request { id: "r1".into(), op: "infer", traceparent: Some("00-a-b-01".into()), body: serde_json::json!({"audio_path": "/a.wav", "fps": 25}) };
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"id": "r1", "op": "infer", "traceparent": "00-a-b-01", "audio_path": "/a.wav", "fps": 25}));
    }

    #[test]
    fn monotonic_mapping_is_close_to_now() {
        let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let t = now_mono.tv_sec() as f64 + now_mono.tv_nsec() as f64 / 1e9 - 2.0;
        let wall = monotonic_to_system(t);
        let ago = SystemTime::now().duration_since(wall).unwrap().as_secs_f64();
        assert!((ago - 2.0).abs() < 0.05, "{ago}");
    }
}
