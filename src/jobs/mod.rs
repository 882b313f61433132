//! Jobs: admission queue, lifecycle, the step runner, the job store and retention.
//!
//! A job is admitted (or refused: queue full → 429) before its upload is accepted,
//! receives its inputs (`file_processing`), waits for a run slot (`queue_wait`), then
//! runs the backend's steps. Every step is a span under the `musetalk.job` span and a
//! `musetalk_step_duration_seconds` observation with the trace id as exemplar.

pub mod avatars;
mod cluster;
pub mod metrics;
pub mod report;
mod run;
pub mod step;

pub use step::Step;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::collector::CollectorHandle;
use crate::config::Config;
use crate::metrics::{Metrics, ModeLabels};
use metrics::{JobLabels, RejectLabels};
use crate::pipeline::{Backend, JobInput, MediaInfo};
pub use report::Report;

pub use crate::mode::Mode;
/// What a job is assumed to take before one has finished (for `Retry-After`).
const DEFAULT_JOB_SECONDS: f64 = 5.0;

/// Moving average with weight 0.2 on the newest job: follows a change in a few jobs.
fn ewma(avg: f64, new: f64) -> f64 {
    0.8 * avg + 0.2 * new
}

/// Seconds until a place frees for a job behind `ahead` others on `slots` run slots,
/// each taking `per_job`: whole seconds, 1 to 300.
fn retry_after(per_job: f64, ahead: usize, slots: usize) -> u64 {
    let waves = (ahead as f64 / slots.max(1) as f64).max(1.0);
    ((per_job * waves).ceil() as u64).clamp(1, 300)
}

/// The `reason` label of `musetalk_jobs_rejected_total`: a full queue (429), a draining service (503).
const REJECT_REASONS: [&str; 2] = ["queue_full", "draining"];


/// What a job does.
pub enum Work {
    /// Simple mode: the backend's pipeline on a video and an audio.
    Simple(JobInput),
    /// Realtime: prepare an avatar (its video is the input).
    Prepare { avatar: Arc<avatars::Avatar> },
    /// Realtime: speak a clip with a prepared avatar.
    /// The lease keeps the avatar from being deleted until the job ends.
    Speak { avatar: avatars::AvatarLease, audio: PathBuf, audio_info: MediaInfo, batch_size: Option<u32>, profile: bool, stream: bool },
}

impl Work {
    /// The job's inputs, as the backend, the report and the metrics see them.
    fn input(&self, job: &Job) -> JobInput {
        let base = |video: &PathBuf, video_info: &MediaInfo, avatar: &str| JobInput {
            job_id: job.id.clone(),
            dir: job.dir.clone(),
            video: video.clone(),
            audio: PathBuf::new(),
            video_info: video_info.clone(),
            audio_info: MediaInfo::default(),
            bbox_shift: None,
            batch_size: None,
            avatar_id: Some(avatar.to_string()),
            profile: false,
            stream: false,
        };
        match self {
            Work::Simple(i) => i.clone(),
            Work::Prepare { avatar } => JobInput { bbox_shift: avatar.bbox_shift, ..base(&avatar.video, &avatar.video_info, &avatar.id) },
            Work::Speak { avatar, audio, audio_info, batch_size, profile, stream } => {
                JobInput { audio: audio.clone(), audio_info: audio_info.clone(), batch_size: *batch_size, profile: *profile, stream: *stream, ..base(&avatar.video, &avatar.video_info, &avatar.id) }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Receiving,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut)
    }
    /// The bounded `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Receiving => "receiving",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }
}

/// What `GET /v1/jobs/{id}` shows: state, progress, timings so far.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct JobStatus {
    pub job_id: String,
    pub trace_id: String,
    pub mode: Mode,
    pub backend: &'static str,
    pub state: JobState,
    pub stage: Option<String>,
    pub progress: Option<Progress>,
    pub created_at: String,
    pub elapsed_seconds: f64,
    pub steps: Vec<report::Timing>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Progress {
    pub done: u64,
    pub total: Option<u64>,
}

/// Server-Sent Event payloads (`event:` is the variant name).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    State { state: JobState },
    StepStart { step: String },
    StepEnd { step: String, seconds: f64 },
    StageStart { stage: String },
    StageEnd { stage: String, seconds: f64 },
    Progress { stage: Option<String>, done: u64, total: Option<u64> },
    Done { state: JobState, error: Option<String> },
}

impl JobEvent {
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::State { .. } => "state",
            JobEvent::StepStart { .. } => "step_start",
            JobEvent::StepEnd { .. } => "step_end",
            JobEvent::StageStart { .. } => "stage_start",
            JobEvent::StageEnd { .. } => "stage_end",
            JobEvent::Progress { .. } => "progress",
            JobEvent::Done { .. } => "done",
        }
    }
}

/// One job. Shared between the HTTP layer (status, events, cancel) and its runner task.
pub struct Job {
    pub id: String,
    pub mode: Mode,
    pub backend: &'static str,
    pub dir: PathBuf,
    pub created: SystemTime,
    pub created_at: Instant,
    /// The `musetalk.job` span; taken out (and so ended and exported) when the job ends.
    span: Mutex<Option<tracing::Span>>,
    pub trace_id: String,
    status: watch::Sender<JobStatus>,
    events: broadcast::Sender<JobEvent>,
    cancel: CancellationToken,
    report: Mutex<Option<Report>>,
    output: Mutex<Option<PathBuf>>,
    finished_at: Mutex<Option<Instant>>,
    /// Latency as it happens: a streamed answer reads it while the job runs.
    live: Mutex<Live>,
}

/// Batches kept per job for the histogram and the report.
pub const MAX_BATCHES: usize = 10_000;

/// What a job's latency showed so far (realtime: first frame, batches, first byte).
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub first_frame: Option<SystemTime>,
    /// Each batch's seconds, at most [`MAX_BATCHES`] (a 30-minute job at 5 batches/s).
    pub batches: Vec<f64>,
    pub first_byte_seconds: Option<f64>,
    /// Where the engine writes the output progressively (fragmented MP4), when it does.
    pub streaming_to: Option<PathBuf>,
    /// The job's configuration labels, set when it ends: a first byte sent after that is
    /// observed by the sender, one sent before by the job's end (never both, never neither).
    labels: Option<metrics::LatencyLabels>,
    first_byte_observed: bool,
}

impl Job {
    /// The latency so far.
    pub fn live(&self) -> Live {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the engine writes the output progressively, once it said so (a streamed
    /// answer polls this: no copy of the rest).
    pub fn streaming_to(&self) -> Option<PathBuf> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).streaming_to.clone()
    }

    pub(crate) fn update_live(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.live.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records the first byte of a streamed answer (once), observed in
    /// `musetalk_time_to_first_byte_seconds` here if the job has already ended.
    pub fn first_byte_sent(&self, m: &Metrics) {
        let mut l = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if l.first_byte_seconds.is_some() {
            return;
        }
        l.first_byte_seconds = Some(self.created_at.elapsed().as_secs_f64());
        Self::observe_first_byte(&mut l, m, &self.trace_id);
    }

    /// The job ended with `labels`: observes a first byte already sent.
    pub(crate) fn latency_labels_known(&self, labels: metrics::LatencyLabels, m: &Metrics) {
        let mut l = self.live.lock().unwrap_or_else(|e| e.into_inner());
        l.labels = Some(labels);
        Self::observe_first_byte(&mut l, m, &self.trace_id);
    }

    fn observe_first_byte(l: &mut Live, m: &Metrics, trace_id: &str) {
        if let (Some(s), Some(labels), false) = (l.first_byte_seconds, &l.labels, l.first_byte_observed) {
            Metrics::observe_traced(&m.job.time_to_first_byte, labels, s, trace_id);
            l.first_byte_observed = true;
        }
    }

    pub fn status(&self) -> JobStatus {
        let mut s = self.status.borrow().clone();
        s.elapsed_seconds = if s.state.is_terminal() {
            self.finished_at.lock().unwrap_or_else(|e| e.into_inner()).map(|f| f.duration_since(self.created_at).as_secs_f64()).unwrap_or(s.elapsed_seconds)
        } else {
            self.created_at.elapsed().as_secs_f64()
        };
        s
    }

    /// The job span (a disabled span once the job has ended).
    pub fn span(&self) -> tracing::Span {
        self.span.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(tracing::Span::none)
    }

    /// Ends the job span: the job store keeps the job, but its span must close to be exported.
    fn close_span(&self) {
        self.span.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn state(&self) -> JobState {
        self.status.borrow().state
    }

    pub fn report(&self) -> Option<Report> {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn output(&self) -> Option<PathBuf> {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn subscribe(&self) -> (JobStatus, broadcast::Receiver<JobEvent>) {
        // Subscribe first, then read the snapshot: no event between the two is lost.
        let rx = self.events.subscribe();
        (self.status(), rx)
    }

    /// Resolves when the job reaches a terminal state.
    pub async fn finished(&self) -> JobState {
        let mut rx = self.status.subscribe();
        loop {
            let state = rx.borrow_and_update().state;
            if state.is_terminal() {
                return state;
            }
            if rx.changed().await.is_err() {
                return self.state();
            }
        }
    }

    /// Asks the job to stop. Returns false if it had already finished.
    pub fn cancel(&self) -> bool {
        if self.state().is_terminal() {
            return false;
        }
        self.cancel.cancel();
        true
    }

    /// The `file_processing` step span (upload, probe), made by the HTTP layer that receives the files.
    pub fn file_processing_span(&self) -> tracing::Span {
        tracing::info_span!(
            parent: &self.span(),
            "step",
            otel.name = Step::FileProcessing.as_str(),
            musetalk.step = Step::FileProcessing.as_str(),
            musetalk.input.video.bytes = tracing::field::Empty,
            musetalk.input.audio.bytes = tracing::field::Empty,
            musetalk.input.video.seconds = tracing::field::Empty,
            musetalk.input.audio.seconds = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        )
    }

    fn emit(&self, ev: JobEvent) {
        let _ = self.events.send(ev);
    }

    fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        self.status.send_modify(f);
    }

    fn set_state(&self, state: JobState) {
        self.update(|s| s.state = state);
        self.emit(JobEvent::State { state });
    }
}

/// Why a job could not be admitted or found; mapped to HTTP once in `api`.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the queue is full ({queued} waiting, {running} running); retry later")]
    QueueFull { queued: usize, running: usize },
    #[error("the service is shutting down")]
    Draining,
    #[error("cannot create the job directory: {0}")]
    JobDir(std::io::Error),
}

/// Holds a place in the admission queue while the upload arrives; released on drop
/// if the job never starts (a failed upload frees its place).
pub struct Admission {
    manager: Arc<JobManager>,
    mode: usize,
    released: AtomicBool,
}

impl Admission {
    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.manager.queued[self.mode].fetch_sub(1, Ordering::AcqRel);
            self.manager.publish_queue();
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release();
    }
}

/// Owns every job: admission, run slots, the store, retention, drain.
pub struct JobManager {
    config: Arc<Config>,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    collector: CollectorHandle,
    realtime: Arc<dyn crate::pipeline::realtime::RealtimeEngine>,
    avatars: avatars::AvatarStore,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    slots: Arc<Semaphore>,
    /// Per mode: jobs admitted but not yet running (uploading or waiting for a slot).
    queued: [AtomicUsize; 2],
    running: [AtomicUsize; 2],
    /// Per mode: moving average of processing seconds of finished jobs (None until one).
    processing_avg: [Mutex<Option<f64>>; 2],
    tracker: TaskTracker,
    draining: AtomicBool,
    /// Per-job Python profiles (py-spy), what this host allows of them.
    profiler: crate::profile::Profiler,
    /// Media facts for uploads and outputs (the persistent helpers, or ffprobe).
    prober: crate::pipeline::prober::Prober,
    /// Ids of the jobs an earlier run of this instance left (interrupted or finished).
    lost: Mutex<std::collections::HashSet<String>>,
}

/// A new job id: 32 hex digits, after `{instance}-` behind a routing proxy (the proxy
/// reads the owner from the id: docs/cluster.md).
pub fn job_id(instance: Option<&str>) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    match instance {
        Some(name) => format!("{name}-{id}"),
        None => id,
    }
}

impl JobManager {
    /// The profiler (`check`'s and `/readyz`'s view of it too).
    pub fn profiler(&self) -> &crate::profile::Profiler {
        &self.profiler
    }

    /// Media facts for uploads and outputs.
    pub fn prober(&self) -> &crate::pipeline::prober::Prober {
        &self.prober
    }

    /// The simple-mode backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The realtime engine (preview, workers, or off).
    pub fn realtime(&self) -> &Arc<dyn crate::pipeline::realtime::RealtimeEngine> {
        &self.realtime
    }

    /// Prepared avatars.
    pub fn avatars(&self) -> &avatars::AvatarStore {
        &self.avatars
    }

    /// `slots` is the run budget (`--max-concurrent-jobs`) shared with the preview realtime engine.
    pub fn new(config: Arc<Config>, backend: Arc<dyn Backend>, realtime: Arc<dyn crate::pipeline::realtime::RealtimeEngine>, metrics: Arc<Metrics>, collector: CollectorHandle, slots: Arc<Semaphore>) -> Arc<Self> {
        let avatars = match &config.shared_dir {
            Some(_) => avatars::AvatarStore::shared(realtime.name(), config.avatars_dir()),
            None => avatars::AvatarStore::new(realtime.name()),
        };
        let profiler = crate::profile::Profiler::new(&config);
        let prober = crate::pipeline::prober::Prober::new(&config).counted(metrics.probe.clone());
        let m = Arc::new(JobManager {
            profiler,
            prober,
            lost: Mutex::default(),
            slots,
            config,
            backend,
            metrics,
            collector,
            realtime,
            avatars,
            jobs: Mutex::default(),
            queued: Default::default(),
            running: Default::default(),
            processing_avg: Default::default(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
        });
        m.publish_queue();
        // Every series whose label set is known now exists now, at 0 (Prometheus'
        // instrumentation guidance): a healthy service's error panels read 0, not "No data".
        for mode in Mode::ALL.map(Mode::as_str) {
            for state in [JobState::Succeeded, JobState::Failed, JobState::Cancelled, JobState::TimedOut] {
                let _ = m.metrics.job.jobs.get_or_create(&JobLabels { mode, backend: m.backend.name(), outcome: state.as_str() });
            }
            for reason in REJECT_REASONS {
                let _ = m.metrics.job.jobs_rejected.get_or_create(&RejectLabels { mode, reason });
            }
        }
        m.metrics.profile.init(&Mode::ALL.map(Mode::as_str));
        m
    }

    /// Removes job dirs left by an earlier run: the job store is in memory, so they
    /// can never be served again.
    pub fn clean_stale_dirs(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.config.jobs_dir()) else { return 0 };
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .flatten()
            .filter(|e| e.path().is_dir() && std::fs::remove_dir_all(e.path()).is_ok())
            .inspect(|e| {
                lost.insert(e.file_name().to_string_lossy().into_owned());
            })
            .count()
    }

    /// Whether `id` was a job of this instance's earlier run (its dir was found at start):
    /// it is gone with that run, which is not the same as never having existed.
    pub fn was_lost(&self, id: &str) -> bool {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// Run slots of a mode: `--max-concurrent-jobs` for simple jobs, one per realtime worker.
    fn slots(&self, mode: usize) -> usize {
        if mode == 0 || !self.realtime.has_workers() { self.config.max_concurrent_jobs } else { self.config.realtime_gpus.len().max(1) }
    }

    fn publish_queue(&self) {
        for (i, mode) in Mode::ALL.iter().enumerate() {
            let l = ModeLabels { mode: mode.as_str() };
            self.metrics.job.jobs_capacity.get_or_create(&l).set((self.slots(i) + self.config.queue_size) as i64);
            self.metrics.job.jobs_queued.get_or_create(&l).set(self.queued[i].load(Ordering::Acquire) as i64);
            self.metrics.job.jobs_in_flight.get_or_create(&l).set(self.running[i].load(Ordering::Acquire) as i64);
        }
    }

    /// Reserves a place before anything is uploaded, so a full service refuses at once.
    pub fn admit(self: &Arc<Self>, mode: Mode) -> Result<Admission, JobError> {
        let refused = |e: JobError| {
            let reason = match e {
                JobError::QueueFull { .. } => REJECT_REASONS[0],
                _ => REJECT_REASONS[1],
            };
            self.metrics.job.jobs_rejected.get_or_create(&RejectLabels { mode: mode.as_str(), reason }).inc();
            Err(e)
        };
        if self.draining.load(Ordering::Acquire) {
            return refused(JobError::Draining);
        }
        let i = mode.index();
        let slots = self.slots(i);
        let running = self.running[i].load(Ordering::Acquire);
        let limit = self.config.queue_size + slots.saturating_sub(running);
        let mut cur = self.queued[i].load(Ordering::Acquire);
        loop {
            if cur >= limit {
                return refused(JobError::QueueFull { queued: cur, running });
            }
            match self.queued[i].compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.publish_queue();
        Ok(Admission { manager: self.clone(), mode: i, released: AtomicBool::new(false) })
    }

    /// Records how long a finished job of `mode` took to process (queue wait excluded),
    /// for [`retry_after_secs`](Self::retry_after_secs).
    pub fn observe_processing(&self, mode: Mode, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            let mut avg = self.processing_avg[mode.index()].lock().unwrap_or_else(|e| e.into_inner());
            *avg = Some(avg.map_or(seconds, |a| ewma(a, seconds)));
        }
    }

    /// `Retry-After` for a refused `mode` request: the time the jobs ahead of it take, from
    /// what this service's jobs of that mode really took (5 s each until one finished).
    pub fn retry_after_secs(&self, mode: Mode) -> u64 {
        let i = mode.index();
        let ahead = self.queued[i].load(Ordering::Acquire) + self.running[i].load(Ordering::Acquire);
        let per_job = self.processing_avg[i].lock().unwrap_or_else(|e| e.into_inner()).unwrap_or(DEFAULT_JOB_SECONDS);
        retry_after(per_job, ahead, self.slots(i))
    }

    /// Creates the job (its dir and its span, child of the current span).
    pub fn create(self: &Arc<Self>, mode: Mode) -> Result<Arc<Job>, JobError> {
        let id = job_id(self.config.instance_name.as_deref());
        let dir = self.config.jobs_dir().join(&id);
        std::fs::create_dir_all(&dir).map_err(JobError::JobDir)?;
        let span = tracing::info_span!(
            "musetalk.job",
            otel.name = "musetalk.job",
            musetalk.job.id = %id,
            musetalk.mode = mode.as_str(),
            musetalk.backend = self.backend.name(),
            musetalk.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        let trace_id = crate::telemetry::trace_id(&span);
        let created = SystemTime::now();
        let status = JobStatus {
            job_id: id.clone(),
            trace_id: trace_id.clone(),
            mode,
            backend: self.backend.name(),
            state: JobState::Receiving,
            stage: None,
            progress: None,
            created_at: humantime::format_rfc3339_millis(created).to_string(),
            elapsed_seconds: 0.0,
            steps: Vec::new(),
            error: None,
        };
        let job = Arc::new(Job {
            id: id.clone(),
            mode,
            backend: self.backend.name(),
            dir,
            created,
            created_at: Instant::now(),
            span: Mutex::new(Some(span)),
            trace_id,
            status: watch::channel(status).0,
            events: broadcast::channel(1024).0,
            cancel: CancellationToken::new(),
            report: Mutex::default(),
            output: Mutex::default(),
            finished_at: Mutex::default(),
            live: Mutex::default(),
        });
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, job.clone());
        Ok(job)
    }

    /// Forgets a job whose upload was rejected (it never became work): no state, no dir.
    pub fn discard(&self, job: &Job) {
        job.close_span();
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&job.id);
        remove_dir(&job.dir);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let mut v: Vec<_> = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| b.created.cmp(&a.created));
        v
    }

    /// Starts the job's runner task. `receive_seconds` is how long the upload took
    /// (the first part of `file_processing`).
    pub fn start(self: &Arc<Self>, job: Arc<Job>, admission: Admission, work: Work, receive_seconds: f64) {
        let m = self.clone();
        self.tracker.spawn(async move { run::run_job(m, job, admission, work, receive_seconds).await });
    }

    /// Stops admitting, waits up to `grace` for jobs to finish, then cancels the rest
    /// and waits for them to reach a terminal state.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            let running: Vec<_> = self.list().into_iter().filter(|j| !j.state().is_terminal()).collect();
            tracing::warn!(jobs = running.len(), "shutdown grace period over: cancelling running jobs");
            for j in &running {
                j.cancel();
            }
            let _ = tokio::time::timeout(self.config.kill_grace + Duration::from_secs(10), self.tracker.wait()).await;
        }
    }

    /// Deletes finished jobs past `--job-retention` or beyond `--max-retained-jobs`.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut finished: Vec<(Instant, String, PathBuf)> = {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.values()
                .filter_map(|j| j.finished_at.lock().unwrap_or_else(|e| e.into_inner()).map(|t| (t, j.id.clone(), j.dir.clone())))
                .collect()
        };
        finished.sort_by_key(|(t, _, _)| std::cmp::Reverse(*t));
        let doomed: Vec<_> = finished
            .into_iter()
            .enumerate()
            .filter(|(i, (t, _, _))| *i >= self.config.max_retained_jobs || now.duration_since(*t) > self.config.job_retention)
            .map(|(_, (_, id, dir))| (id, dir))
            .collect();
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        for (id, dir) in &doomed {
            jobs.remove(id);
            remove_dir(dir);
        }
        doomed.len()
    }

    /// Runs [`JobManager::sweep`] every minute until `stop`.
    pub async fn retention_loop(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.config.job_retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => { self.sweep(); }
                _ = stop.cancelled() => return,
            }
        }
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), "cannot remove job dir: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_follows_the_observed_job_time() {
        // 0.3 s jobs, 17 ahead on one slot: about 6 s, not 90.
        assert_eq!(retry_after(0.3, 17, 1), 6);
        assert_eq!(retry_after(0.3, 17, 4), 2);
        assert_eq!(retry_after(0.01, 1, 1), 1, "at least a second");
        assert_eq!(retry_after(600.0, 10, 1), 300, "at most five minutes");
        assert_eq!(retry_after(DEFAULT_JOB_SECONDS, 0, 1), 5);
        let mut avg = 5.0;
        for _ in 0..20 {
            avg = ewma(avg, 0.3);
        }
        assert!((avg - 0.3).abs() < 0.1, "a few jobs move the average: {avg}");
    }
}
