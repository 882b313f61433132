//! Realtime mode engines: prepare an avatar once, then speak clips against it.
//!
//! [`RealtimeEngine::acquire`] is the queue wait (an idle worker, or a run slot);
//! the [`Slot`] it returns runs one `prepare` or `infer`. Engines: `preview` (ffmpeg,
//! no model: the avatar is its validated video), `worker` (persistent processes
//! speaking `docs/worker-protocol.md`, e.g. `worker/musetalk_worker.py`), `disabled`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::worker::{Delivery, Event, Lease, PoolOptions, Request, WorkerPool, WorkerSpec, monotonic_to_system};
use super::{JobInput, MediaInfo, PipelineError, RunOptions};
use crate::collector::CollectorHandle;
use crate::config::{BackendKind, Config};
use crate::metrics::Metrics;

pub use super::{EngineEvent, Sink};

#[derive(Clone, Debug)]
pub struct PrepareRequest {
    pub avatar_id: String,
    pub video: PathBuf,
    pub video_info: MediaInfo,
    /// The engine's own directory for this avatar's prepared material.
    pub material_dir: PathBuf,
    pub bbox_shift: Option<i32>,
    pub traceparent: Option<String>,
}

#[derive(Clone, Debug)]
pub struct InferRequest {
    pub job_id: String,
    pub job_dir: PathBuf,
    pub avatar_id: String,
    pub avatar_video: PathBuf,
    pub avatar_video_info: MediaInfo,
    pub material_dir: PathBuf,
    pub audio: PathBuf,
    pub audio_info: MediaInfo,
    pub output: PathBuf,
    pub batch_size: Option<u32>,
    pub traceparent: Option<String>,
    /// A streamed answer follows the output (`stream=true`).
    pub stream: bool,
}

/// Exclusive use of whatever runs realtime work, for one request.
pub trait Slot: Send {
    /// The worker's name (the `worker` label), when a worker serves the slot.
    fn worker(&self) -> Option<String>;
    fn pid(&self) -> Option<u32>;
    fn prepare<'a>(&'a mut self, req: &'a PrepareRequest, sink: Sink<'a>, cancel: &'a CancellationToken, timeout: Duration) -> BoxFuture<'a, Result<(), PipelineError>>;
    fn infer<'a>(&'a mut self, req: &'a InferRequest, sink: Sink<'a>, cancel: &'a CancellationToken, timeout: Duration) -> BoxFuture<'a, Result<(), PipelineError>>;
    /// What a whole output of `req` is, when the engine knows it (checked by `output_discovery`).
    fn expected_output(&self, _req: &InferRequest) -> Option<super::ExpectedOutput> {
        None
    }
}

pub trait RealtimeEngine: Send + Sync {
    fn name(&self) -> &'static str;
    fn enabled(&self) -> bool {
        true
    }
    /// Runs persistent worker processes (whose health readiness reports).
    fn has_workers(&self) -> bool {
        false
    }
    /// `Ok(description)` when requests can be served now.
    fn readiness(&self) -> Result<String, String>;
    /// Waits for a free worker or slot (the job's `queue_wait`).
    fn acquire<'a>(&'a self, cancel: &'a CancellationToken) -> BoxFuture<'a, Result<Box<dyn Slot>, PipelineError>>;
    /// Stops workers (shutdown request, grace, kill).
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// The engine the configuration asks for.
/// `run_slots` is the service's `--max-concurrent-jobs` budget: the preview engine runs
/// its renders under it, so simple and realtime work together never exceed it.
pub fn build(config: &Config, metrics: Arc<Metrics>, collector: CollectorHandle, run_slots: Arc<Semaphore>) -> Arc<dyn RealtimeEngine> {
    let worker_argv = match (&config.worker_command, config.backend) {
        (Some(cmd), _) => shell_words::split(cmd).ok(),
        (None, BackendKind::Musetalk) => Some(default_musetalk_worker(config)),
        (None, _) => None,
    };
    match (config.backend, config.realtime, worker_argv) {
        (BackendKind::Preview, _, None) => Arc::new(PreviewEngine { slots: run_slots, config: config.clone() }),
        (_, true, Some(argv)) if !argv.is_empty() => {
            let cwd = config.musetalk_dir.clone().filter(|_| config.backend == BackendKind::Musetalk).unwrap_or_else(|| config.data_dir.clone());
            let specs = config
                .realtime_gpus
                .iter()
                .map(|gpu| {
                    let mut env = config.pipeline_env_pairs();
                    env.push(("CUDA_VISIBLE_DEVICES".into(), gpu.clone()));
                    WorkerSpec { name: format!("gpu{gpu}"), program: argv[0].clone(), args: argv[1..].to_vec(), cwd: cwd.clone(), env }
                })
                .collect();
            let opts = PoolOptions { ready_timeout: config.worker_ready_timeout, kill_grace: config.kill_grace, backoff_initial: Duration::from_secs(1), backoff_max: Duration::from_secs(30) };
            Arc::new(WorkerEngine { pool: WorkerPool::start(specs, opts, metrics, collector) })
        }
        (kind, realtime, _) => Arc::new(Disabled {
            why: if !realtime {
                format!("realtime mode is off: start with --realtime (the {} backend needs its workers started)", kind.as_str())
            } else {
                "realtime mode needs a worker: set --worker-command (a program speaking docs/worker-protocol.md)".to_string()
            },
        }),
    }
}

/// `python -u worker/musetalk_worker.py --musetalk-dir … --version … --unet-model-path … --unet-config …`.
fn default_musetalk_worker(config: &Config) -> Vec<String> {
    let script = if config.musetalk_worker_script.is_absolute() {
        config.musetalk_worker_script.clone()
    } else {
        std::env::current_dir().map(|d| d.join(&config.musetalk_worker_script)).unwrap_or_else(|_| config.musetalk_worker_script.clone())
    };
    let mut argv = vec![config.musetalk_python.clone(), "-u".into(), script.display().to_string()];
    if let Some(dir) = &config.musetalk_dir {
        argv.extend(["--musetalk-dir".into(), dir.display().to_string()]);
    }
    argv.extend(["--version".into(), config.musetalk_version.clone()]);
    argv.extend(["--unet-model-path".into(), config.musetalk_unet_model_path.clone(), "--unet-config".into(), config.musetalk_unet_config.clone()]);
    if let Some(b) = config.musetalk_batch_size {
        argv.extend(["--batch-size".into(), b.to_string()]);
    }
    argv
}

/// Realtime mode switched off or impossible: every request says why.
struct Disabled {
    why: String,
}

impl RealtimeEngine for Disabled {
    fn name(&self) -> &'static str {
        "disabled"
    }
    fn enabled(&self) -> bool {
        false
    }
    fn readiness(&self) -> Result<String, String> {
        Err(self.why.clone())
    }
    fn acquire<'a>(&'a self, _: &'a CancellationToken) -> BoxFuture<'a, Result<Box<dyn Slot>, PipelineError>> {
        Box::pin(async move { Err(PipelineError::Reported(self.why.clone())) })
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// `preview` realtime: no model. Prepare checks the video and extracts a poster frame;
/// speak renders the preview of the avatar's video for the clip.
struct PreviewEngine {
    slots: Arc<Semaphore>,
    config: Config,
}

struct PreviewSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    config: Config,
    pid: Option<u32>,
}

impl RealtimeEngine for PreviewEngine {
    fn name(&self) -> &'static str {
        "preview"
    }
    fn readiness(&self) -> Result<String, String> {
        Ok("preview realtime (ffmpeg)".into())
    }
    fn acquire<'a>(&'a self, cancel: &'a CancellationToken) -> BoxFuture<'a, Result<Box<dyn Slot>, PipelineError>> {
        Box::pin(async move {
            tokio::select! {
                p = self.slots.clone().acquire_owned() => Ok(Box::new(PreviewSlot { _permit: p.map_err(|_| PipelineError::Cancelled)?, config: self.config.clone(), pid: None }) as Box<dyn Slot>),
                _ = cancel.cancelled() => Err(PipelineError::Cancelled),
            }
        })
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl PreviewSlot {
    /// Runs one ffmpeg invocation through the shared runner, forwarding its stages.
    async fn run(&mut self, inv: super::Invocation, mut parser: Box<dyn super::StageParser>, sink: Sink<'_>, cancel: &CancellationToken, timeout: Duration) -> Result<(), PipelineError> {
        let opts = RunOptions { timeout, kill_grace: self.config.kill_grace, cancel: cancel.clone(), traceparent: None };
        let outcome = super::process::run_invocation(&inv, &opts, parser.as_mut(), sink).await?;
        self.pid = Some(outcome.pid).filter(|p| *p != 0);
        outcome.ended_ok(timeout)?;
        super::require_clean_exit(&outcome)
    }
}

impl Slot for PreviewSlot {
    fn worker(&self) -> Option<String> {
        None
    }
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn prepare<'a>(&'a mut self, req: &'a PrepareRequest, sink: Sink<'a>, cancel: &'a CancellationToken, timeout: Duration) -> BoxFuture<'a, Result<(), PipelineError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&req.material_dir).map_err(|e| PipelineError::Config(format!("creating {}: {e}", req.material_dir.display())))?;
            let inv = super::Invocation {
                program: self.config.ffmpeg.display().to_string(),
                args: ["-hide_banner", "-nostdin", "-y", "-v", "error", "-i"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([req.video.display().to_string()])
                    .chain(["-frames:v", "1", "-progress", "pipe:1", "-nostats"].iter().map(|s| s.to_string()))
                    .chain([req.material_dir.join("poster.jpg").display().to_string()])
                    .collect(),
                cwd: req.material_dir.clone(),
                env: self.config.pipeline_env_pairs(),
            };
            self.run(inv, Box::new(super::stages::FfmpegProgress::new("poster_frame", Some(1))), sink, cancel, timeout).await?;
            super::require_output(&req.material_dir.join("poster.jpg")).map(|_| ())
        })
    }

    fn expected_output(&self, req: &InferRequest) -> Option<super::ExpectedOutput> {
        super::Backend::expected_output(&super::preview::Preview::new(&self.config), &preview_job(req))
    }

    fn infer<'a>(&'a mut self, req: &'a InferRequest, sink: Sink<'a>, cancel: &'a CancellationToken, timeout: Duration) -> BoxFuture<'a, Result<(), PipelineError>> {
        Box::pin(async move {
            let job = preview_job(req);
            let backend = super::preview::Preview::new(&self.config);
            let inv = super::Backend::prepare(&backend, &job)?;
            let parser = super::Backend::stage_parser(&backend, &job);
            if req.stream {
                sink(EngineEvent::StreamingTo { path: super::preview::Preview::output_path(&job) });
            }
            self.run(inv, parser, sink, cancel, timeout).await?;
            let out = super::preview::Preview::output_path(&job);
            std::fs::rename(&out, &req.output).map_err(|e| PipelineError::Output(format!("moving {} to {}: {e}", out.display(), req.output.display())))?;
            Ok(())
        })
    }
}

/// A speak as the preview backend's job: the avatar's video, the clip's audio.
fn preview_job(req: &InferRequest) -> JobInput {
    JobInput {
        job_id: req.job_id.clone(),
        dir: req.job_dir.clone(),
        video: req.avatar_video.clone(),
        audio: req.audio.clone(),
        video_info: req.avatar_video_info.clone(),
        audio_info: req.audio_info.clone(),
        bbox_shift: None,
        batch_size: req.batch_size,
        avatar_id: Some(req.avatar_id.clone()),
        profile: false,
        stream: req.stream,
    }
}

/// Persistent workers speaking the JSON-lines protocol.
struct WorkerEngine {
    pool: Arc<WorkerPool>,
}

struct WorkerSlot {
    lease: Lease,
}

impl RealtimeEngine for WorkerEngine {
    fn name(&self) -> &'static str {
        "worker"
    }
    fn has_workers(&self) -> bool {
        true
    }
    fn readiness(&self) -> Result<String, String> {
        self.pool.readiness()
    }
    fn acquire<'a>(&'a self, cancel: &'a CancellationToken) -> BoxFuture<'a, Result<Box<dyn Slot>, PipelineError>> {
        Box::pin(async move { Ok(Box::new(WorkerSlot { lease: self.pool.acquire(cancel).await? }) as Box<dyn Slot>) })
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.shutdown())
    }
}

impl WorkerSlot {
    /// Sends one request and follows it to its `result`/`error`, the worker's death,
    /// the timeout or cancellation (the last two kill the worker: see the protocol doc).
    async fn call(&mut self, op: &'static str, id: String, traceparent: Option<String>, body: serde_json::Value, sink: Sink<'_>, cancel: &CancellationToken, timeout: Duration) -> Result<(), PipelineError> {
        let name = self.lease.worker_name().to_string();
        if let Some(pid) = self.lease.worker().pid() {
            sink(EngineEvent::Process { pid, shared: true });
        }
        let mut rx = self.lease.send(&Request { id, op, traceparent, body }).await?;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let wall = |t: Option<f64>| t.map(monotonic_to_system).unwrap_or_else(SystemTime::now);
        loop {
            tokio::select! {
                d = rx.recv() => match d {
                    Some(Delivery::Event(ev)) => match ev {
                        Event::StageStart { name, t, .. } => sink(EngineEvent::StageStart { name: super::stages::sanitize_stage(&name), at: wall(t) }),
                        Event::StageEnd { name, t, .. } => sink(EngineEvent::StageEnd { name: super::stages::sanitize_stage(&name), at: wall(t) }),
                        Event::Progress { done, total, .. } => sink(EngineEvent::Progress { done, total }),
                        Event::FirstFrame { t, .. } => sink(EngineEvent::FirstFrame { at: wall(t) }),
                        Event::Batch { seconds, frames, .. } if seconds.is_finite() && seconds >= 0.0 => sink(EngineEvent::Batch { seconds, frames }),
                        Event::Batch { .. } => {}
                        Event::Result { .. } => return Ok(()),
                        Event::Error { message, .. } => return Err(PipelineError::Reported(format!("worker {name}: {message}"))),
                        Event::Ready { .. } => {}
                    },
                    Some(Delivery::Exited { status, stderr_tail }) => {
                        let tail = if stderr_tail.is_empty() { String::new() } else { format!(": {stderr_tail}") };
                        return Err(PipelineError::Reported(format!("realtime worker {name} died during {op} ({status}){tail}; it is being restarted")));
                    }
                    None => return Err(PipelineError::Reported(format!("lost contact with realtime worker {name}"))),
                },
                _ = &mut deadline => {
                    self.lease.kill().await;
                    return Err(PipelineError::TimedOut(timeout));
                }
                _ = cancel.cancelled() => {
                    self.lease.kill().await;
                    return Err(PipelineError::Cancelled);
                }
            }
        }
    }
}

impl Slot for WorkerSlot {
    fn worker(&self) -> Option<String> {
        Some(self.lease.worker_name().to_string())
    }
    fn pid(&self) -> Option<u32> {
        self.lease.worker().pid()
    }

    fn prepare<'a>(&'a mut self, req: &'a PrepareRequest, sink: Sink<'a>, cancel: &'a CancellationToken, timeout: Duration) -> BoxFuture<'a, Result<(), PipelineError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&req.material_dir).map_err(|e| PipelineError::Config(format!("creating {}: {e}", req.material_dir.display())))?;
            let body = serde_json::json!({
                "avatar_id": req.avatar_id,
                "video_path": req.video,
                "avatar_dir": req.material_dir,
                "bbox_shift": req.bbox_shift.unwrap_or(0),
            });
            let id = uuid::Uuid::new_v4().simple().to_string();
            self.call("prepare", id, req.traceparent.clone(), body, sink, cancel, timeout).await
        })
    }

    fn infer<'a>(&'a mut self, req: &'a InferRequest, sink: Sink<'a>, cancel: &'a CancellationToken, timeout: Duration) -> BoxFuture<'a, Result<(), PipelineError>> {
        Box::pin(async move {
            if let Some(parent) = req.output.parent() {
                std::fs::create_dir_all(parent).map_err(|e| PipelineError::Config(format!("creating {}: {e}", parent.display())))?;
            }
            let mut body = serde_json::json!({
                "avatar_id": req.avatar_id,
                "avatar_dir": req.material_dir,
                "audio_path": req.audio,
                "output_path": req.output,
                "fps": req.avatar_video_info.fps.map(|f| f.round() as u64).unwrap_or(25),
            });
            if let Some(b) = req.batch_size {
                body["batch_size"] = b.into();
            }
            // A worker that said it streams writes the output progressively; an older one
            // writes it whole and the answer streams it when the job ends.
            if req.stream && self.lease.worker().streams() {
                body["stream"] = true.into();
                sink(EngineEvent::StreamingTo { path: req.output.clone() });
            }
            self.call("infer", req.job_id.clone(), req.traceparent.clone(), body, sink, cancel, timeout).await
        })
    }
}
