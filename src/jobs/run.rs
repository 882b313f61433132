//! The step runner: one job from its inputs to its report, every step a span and a histogram.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Tracer as _};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::report::{self, ErrorInfo, Files, Media, Report, Subprocess};
use super::avatars::{Avatar, AvatarState};
use super::{Admission, Job, JobEvent, JobManager, JobState, Progress, Step, Work};
use super::metrics::{ExitLabels, InputLabels, JobDurationLabels, JobLabels, LatencyLabels, StageLabels, StepLabels, batch_bucket};
use crate::metrics::{Metrics, ModeLabels, exit_code_label};
use crate::pipeline::realtime::{EngineEvent, InferRequest, PrepareRequest};
use crate::pipeline::{self, JobInput, PipelineError, ProcessOutcome, RunOptions};
use crate::collector::insight::{self, StageGpu};
use crate::collector::CollectorHandle;
use crate::telemetry;
use crate::profile::{self, ShimStatus};

/// What the runner learns along the way, for the report and the metrics.
#[derive(Default)]
struct Record {
    steps: Vec<(String, f64)>,
    stages: Vec<(String, f64)>,
    /// Beside `stages`, one per stage: its GPU figures and verdict (none without a GPU).
    stage_gpu: Vec<Option<StageGpu>>,
    queue_seconds: f64,
    outcome: Option<ProcessOutcome>,
    command: String,
    output_bytes: Option<u64>,
    output_seconds: Option<f64>,
    output_frames: Option<u64>,
    exec_window: Option<(Instant, Instant)>,
    tree_key: Option<u64>,
    worker: Option<String>,
    /// Each stage's window (name, start, end), for slicing the profile.
    stage_windows: Vec<(String, SystemTime, SystemTime)>,
    /// The job's Python profile, when it was to be profiled: taken, or why not.
    profile: Option<Result<profile::Taken, profile::Unavailable>>,
}

/// A failed step: which one (named here only: messages never repeat it), what went
/// wrong, and the state the job ends in.
struct StepFailure {
    step: Step,
    message: String,
    state: JobState,
}

impl StepFailure {
    fn new(step: Step, message: impl Into<String>) -> Self {
        StepFailure { step, message: message.into(), state: JobState::Failed }
    }

    fn from_pipeline(step: Step, e: PipelineError) -> Self {
        let state = match e {
            PipelineError::Cancelled => JobState::Cancelled,
            PipelineError::TimedOut(_) => JobState::TimedOut,
            _ => JobState::Failed,
        };
        // A pipeline that exited non-zero or was killed failed while it ran, even though
        // its exit is only judged when its output is looked for.
        let step = match e {
            PipelineError::Failed { .. } if step == Step::OutputDiscovery => Step::SubprocessExecution,
            _ => step,
        };
        StepFailure { step, message: e.to_string(), state }
    }
}

/// An open step: its span (child of the job's), its start. The only way a step is
/// recorded: [`StepScope::close`] sets the span's error, observes
/// `musetalk_step_duration_seconds` with the trace id as exemplar, adds the timing to the
/// report and the status, and emits `step_end`.
struct StepScope {
    step: Step,
    span: tracing::Span,
    t0: Instant,
}

impl StepScope {
    fn open(job: &Job, step: Step) -> Self {
        let name = step.as_str();
        let span = tracing::info_span!(parent: &job.span(), "step", otel.name = name, musetalk.step = name, otel.status_code = tracing::field::Empty);
        job.emit(JobEvent::StepStart { step: name.into() });
        StepScope { step, span, t0: Instant::now() }
    }

    fn close<T>(self, m: &JobManager, job: &Job, rec: &mut Record, result: Result<T, StepFailure>) -> Result<T, StepFailure> {
        if let Err(e) = &result {
            telemetry::set_error(&self.span, e.message.clone());
        }
        drop(self.span);
        record_step(m, job, rec, self.step, self.t0.elapsed().as_secs_f64());
        result
    }
}

/// Runs `f` as `step` (see [`StepScope`]).
async fn step<T>(m: &JobManager, job: &Job, rec: &mut Record, step: Step, f: impl AsyncFnOnce(&tracing::Span, &mut Record) -> Result<T, StepFailure>) -> Result<T, StepFailure> {
    let scope = StepScope::open(job, step);
    let result = f(&scope.span, rec).instrument(scope.span.clone()).await;
    scope.close(m, job, rec, result)
}

/// Records a step's duration; for `file_processing`, timed by the upload that ran it,
/// this is all; every other step gets here through [`StepScope::close`].
fn record_step(m: &JobManager, job: &Job, rec: &mut Record, step: Step, secs: f64) {
    Metrics::observe_traced(&m.metrics.job.step_duration, &StepLabels { mode: job.mode.as_str(), step: step.as_str() }, secs, &job.trace_id);
    rec.steps.push((step.as_str().to_string(), secs));
    let timings = report::timings(&rec.steps, 0.0);
    job.update(|s| s.steps = timings);
    job.emit(JobEvent::StepEnd { step: step.as_str().into(), seconds: secs });
}

/// A stage that ended: its span stays open until the job's end, when the collector
/// has the samples of its window and its GPU figures can go on it.
struct EndedStage {
    name: String,
    seconds: f64,
    start: SystemTime,
    end: SystemTime,
    span: opentelemetry::global::BoxedSpan,
}

/// Turns stage events into OpenTelemetry spans (with the events' own timestamps) under
/// the step span, stage histograms with exemplars, progress and SSE events.
struct StageRecorder<'a> {
    job: &'a Job,
    metrics: Arc<Metrics>,
    /// The configuration labels its stage histograms carry.
    config: LatencyLabels,
    tracer: opentelemetry::global::BoxedTracer,
    parent: opentelemetry::Context,
    open: HashMap<String, (SystemTime, opentelemetry::global::BoxedSpan)>,
    ended: Vec<EndedStage>,
    current: Option<String>,
}

impl<'a> StageRecorder<'a> {
    fn new(job: &'a Job, metrics: Arc<Metrics>, step_span: &tracing::Span, config: LatencyLabels) -> Self {
        StageRecorder {
            job,
            metrics,
            config,
            tracer: opentelemetry::global::tracer(telemetry::SCOPE),
            parent: step_span.context(),
            open: HashMap::new(),
            ended: Vec::new(),
            current: None,
        }
    }

    fn start(&mut self, name: String, at: SystemTime) {
        if self.open.contains_key(&name) {
            return;
        }
        let s = self.tracer.span_builder(name.clone()).with_start_time(at).with_attributes([KeyValue::new("musetalk.stage", name.clone())]).start_with_context(&self.tracer, &self.parent);
        self.open.insert(name.clone(), (at, s));
        self.current = Some(name.clone());
        self.job.update(|s| {
            s.stage = Some(name.clone());
            s.progress = None;
        });
        self.job.emit(JobEvent::StageStart { stage: name });
    }

    fn end(&mut self, name: String, at: SystemTime) {
        if let Some((t0, span)) = self.open.remove(&name) {
            let secs = at.duration_since(t0).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            Metrics::observe_traced(&self.metrics.job.stage_duration, &StageLabels::new(pipeline::stages::stage_label(&name), &self.config), secs, &self.job.trace_id);
            self.ended.push(EndedStage { name: name.clone(), seconds: secs, start: t0, end: at, span });
            self.job.emit(JobEvent::StageEnd { stage: name, seconds: secs });
        }
    }

    fn progress(&mut self, done: u64, total: Option<u64>) {
        self.job.update(|s| s.progress = Some(Progress { done, total }));
        self.job.emit(JobEvent::Progress { stage: self.current.clone(), done, total });
    }

    /// Ends what is still open (a crash mid-stage), puts each stage's GPU window on its
    /// span and ends the spans at their own end times. Returns the stage timings and,
    /// beside them, their GPU figures.
    fn finish(mut self, collector: &CollectorHandle, tree: Option<u64>) -> (Vec<(String, f64)>, Vec<Option<StageGpu>>, Vec<(String, SystemTime, SystemTime)>) {
        let now = SystemTime::now();
        let open: Vec<String> = self.open.keys().cloned().collect();
        for name in open {
            if let Some((_, s)) = self.open.get_mut(&name) {
                s.set_status(opentelemetry::trace::Status::error("stage did not end: the process stopped"));
            }
            self.end(name, now);
        }
        let clock = pipeline::Clock::now();
        let mut timings = Vec::with_capacity(self.ended.len());
        let mut gpus = Vec::with_capacity(self.ended.len());
        let mut windows = Vec::with_capacity(self.ended.len());
        for mut st in self.ended {
            let gpu = insight::stage_gpu(&collector.window(clock.to_instant(st.start), clock.to_instant(st.end), tree));
            if let Some(g) = &gpu {
                stage_gpu_attributes(&mut st.span, g);
            }
            st.span.end_with_timestamp(st.end);
            windows.push((st.name.clone(), st.start, st.end));
            timings.push((st.name, st.seconds));
            gpus.push(gpu);
        }
        (timings, gpus, windows)
    }
}

/// A stage span's GPU attributes (`musetalk.gpu.*`).
fn stage_gpu_attributes(span: &mut opentelemetry::global::BoxedSpan, g: &StageGpu) {
    let mut kv = vec![
        KeyValue::new("musetalk.gpu.verdict", g.verdict.as_str()),
        KeyValue::new("musetalk.gpu.sm.avg", g.sm.avg),
        KeyValue::new("musetalk.gpu.sm.peak", g.sm.peak),
    ];
    let opt = [
        ("musetalk.gpu.memory_bandwidth.avg", g.memory_bandwidth.map(|m| m.avg)),
        ("musetalk.gpu.tensor_active.avg", g.tensor_active.map(|m| m.avg)),
        ("musetalk.gpu.pcie.receive_bytes", g.pcie_rx_bytes),
        ("musetalk.gpu.pcie.transmit_bytes", g.pcie_tx_bytes),
        ("musetalk.gpu.power.avg", g.power_watts),
        ("musetalk.gpu.energy_joules", g.energy_joules),
        ("musetalk.pipeline.cpu_cores", g.pipeline_cpu_cores),
    ];
    kv.extend(opt.into_iter().filter_map(|(k, v)| v.map(|v| KeyValue::new(k, v))));
    if !g.throttle_reasons.is_empty() {
        kv.push(KeyValue::new("musetalk.gpu.throttle_reasons", opentelemetry::Value::Array(opentelemetry::Array::String(g.throttle_reasons.iter().map(|r| r.clone().into()).collect()))));
    }
    span.set_attributes(kv);
}

/// `queue_wait`: its own span, until `acquire` gives a run slot (or the job is cancelled).
async fn queue_wait<T>(m: &Arc<JobManager>, job: &Job, rec: &mut Record, acquire: impl std::future::Future<Output = Result<T, StepFailure>>) -> Result<T, StepFailure> {
    job.set_state(JobState::Queued);
    let name = Step::QueueWait.as_str();
    let queue_span = tracing::info_span!(parent: &job.span(), "queue_wait", otel.name = name, otel.status_code = tracing::field::Empty);
    let q0 = Instant::now();
    let got = tokio::select! {
        r = acquire => r,
        _ = job.cancel.cancelled() => Err(StepFailure { step: Step::QueueWait, message: "cancelled while queued".into(), state: JobState::Cancelled }),
    };
    rec.queue_seconds = q0.elapsed().as_secs_f64();
    if let Err(e) = &got {
        telemetry::set_error(&queue_span, e.message.clone());
    }
    drop(queue_span);
    m.metrics.job.queue_wait.get_or_create(&ModeLabels { mode: job.mode.as_str() }).observe(rec.queue_seconds);
    got
}

/// Marks the job running (leaves the queue count, enters the in-flight count).
fn enter_running(m: &Arc<JobManager>, job: &Job, admission: Admission) -> RunningGuard {
    m.running[job.mode.index()].fetch_add(1, Ordering::AcqRel);
    admission.release();
    job.set_state(JobState::Running);
    RunningGuard(m.clone(), job.mode.index())
}

pub(super) async fn run_job(m: Arc<JobManager>, job: Arc<Job>, admission: Admission, work: Work, receive_seconds: f64) {
    let mut rec = Record::default();
    let span = job.span();
    let inputs = work.input(&job);
    // Inference and speak jobs are profiled on request or at --profile-ratio.
    let profiled = !matches!(work, Work::Prepare { .. }) && m.profiler().wanted(inputs.profile);
    let result = match &work {
        Work::Simple(inputs) => run_steps(&m, &job, admission, inputs, receive_seconds, profiled, &mut rec).instrument(span).await,
        Work::Speak { avatar, .. } => run_speak(&m, &job, admission, avatar, &inputs, receive_seconds, profiled, &mut rec).instrument(span).await,
        Work::Prepare { avatar } => run_prepare(&m, &job, admission, avatar, receive_seconds, &mut rec).instrument(span).await.map(|_| avatar.material_dir()),
    };
    if let Work::Prepare { avatar } = &work {
        match &result {
            Ok(_) => avatar.set_state(AvatarState::Ready, None),
            Err(f) => avatar.set_state(AvatarState::Failed, Some(format!("{}: {}", f.step, f.message))),
        }
    }
    let is_prepare = matches!(work, Work::Prepare { .. });
    // The speak's lease on its avatar ends with the work, before the job is seen finished:
    // a client that DELETEs the avatar on its answer must not get `avatar_busy`.
    drop(work);
    // The profile's formats are written off the async runtime (a long job's trace is big).
    let profile = match rec.profile.take() {
        Some(p) => {
            let (m2, job2, windows) = (m.clone(), job.clone(), rec.stage_windows.clone());
            tokio::task::spawn_blocking(move || profile_report(&m2, &job2, &windows, p)).await.ok()
        }
        None => None,
    };
    finish(&m, &job, &inputs, rec, result, !is_prepare, profile);
}

/// A realtime job's `queue_wait` for an idle worker (or preview slot), then running.
async fn realtime_slot(m: &Arc<JobManager>, job: &Arc<Job>, rec: &mut Record, admission: Admission) -> Result<(Box<dyn pipeline::realtime::Slot>, RunningGuard), StepFailure> {
    let engine = m.realtime.clone();
    let cancel = job.cancel.clone();
    let slot = queue_wait(m, job, rec, async { engine.acquire(&cancel).await.map_err(|e| StepFailure::from_pipeline(Step::QueueWait, e)) }).await?;
    let running = enter_running(m, job, admission);
    rec.worker = slot.worker();
    Ok((slot, running))
}

/// Realtime `speak`: file_processing, queue_wait (an idle worker), inference,
/// output_discovery, response_preparation.
async fn run_speak(m: &Arc<JobManager>, job: &Arc<Job>, admission: Admission, avatar: &Arc<Avatar>, inputs: &JobInput, receive_seconds: f64, profiled: bool, rec: &mut Record) -> Result<PathBuf, StepFailure> {
    record_step(m, job, rec, Step::FileProcessing, receive_seconds);
    let (mut slot, _running) = realtime_slot(m, job, rec, admission).await?;
    let output = job.dir.join("result").join("output.mp4");
    let scope = StepScope::open(job, Step::Inference);
    let span = scope.span.clone();
    let req = InferRequest {
        job_id: job.id.clone(),
        job_dir: job.dir.clone(),
        avatar_id: avatar.id.clone(),
        avatar_video: avatar.video.clone(),
        avatar_video_info: avatar.video_info.clone(),
        material_dir: avatar.material_dir(),
        audio: inputs.audio.clone(),
        audio_info: inputs.audio_info.clone(),
        output: output.clone(),
        batch_size: inputs.batch_size,
        traceparent: telemetry::traceparent(&span),
        stream: inputs.stream,
    };
    if let Some(w) = &rec.worker {
        span.set_attribute("musetalk.worker", w.clone());
    }
    let mut er = EngineRecorder::new(m, job, &span, latency_labels(m, job, inputs.batch_size, rec));
    // The worker is already running: py-spy attaches to it for this request only.
    let attached = profiled.then(|| m.profiler().attach(slot.pid(), &job.dir.join("profile")));
    let result = slot.infer(&req, &mut |ev| er.on(ev), &job.cancel, m.config.job_timeout).instrument(span.clone()).await;
    // Sampling stops now; py-spy's shutdown is waited for after the worker is handed
    // back (and the stage and resource windows have closed).
    let attached = attached.map(|a| a.map(profile::Attached::interrupt));
    er.finish(rec);
    let expected = slot.expected_output(&req);
    drop(slot);
    rec.profile = match attached {
        Some(Ok(a)) => Some(a.collect().await),
        Some(Err(u)) => Some(Err(u)),
        None => None,
    };
    drop(span);
    scope.close(m, job, rec, result.map_err(|e| StepFailure::from_pipeline(Step::Inference, e)))?;
    discover_output(m, job, rec, inputs, output, expected).await
}

/// Realtime `prepare`: file_processing, queue_wait, avatar_preparation, response_preparation.
async fn run_prepare(m: &Arc<JobManager>, job: &Arc<Job>, admission: Admission, avatar: &Arc<Avatar>, receive_seconds: f64, rec: &mut Record) -> Result<(), StepFailure> {
    record_step(m, job, rec, Step::FileProcessing, receive_seconds);
    let (mut slot, _running) = realtime_slot(m, job, rec, admission).await?;
    let scope = StepScope::open(job, Step::AvatarPreparation);
    let span = scope.span.clone();
    let req = PrepareRequest {
        avatar_id: avatar.id.clone(),
        video: avatar.video.clone(),
        video_info: avatar.video_info.clone(),
        material_dir: avatar.material_dir(),
        bbox_shift: avatar.bbox_shift,
        traceparent: telemetry::traceparent(&span),
    };
    span.set_attribute("musetalk.avatar.id", avatar.id.clone());
    if let Some(w) = &rec.worker {
        span.set_attribute("musetalk.worker", w.clone());
    }
    let mut er = EngineRecorder::new(m, job, &span, latency_labels(m, job, None, rec));
    let result = slot.prepare(&req, &mut |ev| er.on(ev), &job.cancel, m.config.job_timeout).instrument(span.clone()).await;
    er.finish(rec);
    drop(slot);
    drop(span);
    scope.close(m, job, rec, result.map_err(|e| StepFailure::from_pipeline(Step::AvatarPreparation, e)))
}

/// Receives an engine's events: stages, progress, and the process doing the work
/// (registered with the collector for the job's resource window).
struct EngineRecorder<'a> {
    stages: StageRecorder<'a>,
    span: tracing::Span,
    collector: crate::collector::CollectorHandle,
    mode: &'static str,
    guard: Option<crate::collector::TreeGuard>,
    started: Instant,
}

impl<'a> EngineRecorder<'a> {
    fn new(m: &Arc<JobManager>, job: &'a Job, span: &tracing::Span, config: LatencyLabels) -> Self {
        EngineRecorder { stages: StageRecorder::new(job, m.metrics.clone(), span, config), span: span.clone(), collector: m.collector.clone(), mode: job.mode.as_str(), guard: None, started: Instant::now() }
    }

    fn on(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::StageStart { name, at } => self.stages.start(name, at),
            EngineEvent::StageEnd { name, at } => self.stages.end(name, at),
            EngineEvent::Progress { done, total } => self.stages.progress(done, total),
            EngineEvent::FirstFrame { at } => self.stages.job.update_live(|l| {
                l.first_frame.get_or_insert(at);
            }),
            EngineEvent::Batch { seconds, .. } => self.stages.job.update_live(|l| {
                if l.batches.len() < super::MAX_BATCHES {
                    l.batches.push(seconds);
                }
            }),
            EngineEvent::StreamingTo { path } => self.stages.job.update_live(|l| l.streaming_to = Some(path)),
            EngineEvent::Process { pid, shared } => {
                self.span.set_attribute("process.pid", pid as i64);
                if self.guard.is_none() {
                    // A shared worker is already counted in the pipeline gauges by its
                    // pool: register it again only for this job's resource window.
                    let mode = if shared { crate::collector::WINDOW_ONLY } else { self.mode };
                    self.guard = Some(self.collector.register_tree(pid, mode));
                }
            }
        }
    }

    fn finish(self, rec: &mut Record) {
        rec.tree_key = self.guard.as_ref().map(|g| g.key());
        (rec.stages, rec.stage_gpu, rec.stage_windows) = self.stages.finish(&self.collector, rec.tree_key);
        rec.exec_window = Some((self.started, Instant::now()));
    }
}

/// `output_discovery`: the file exists and ffprobe says it is a video.
async fn discover_output(m: &Arc<JobManager>, job: &Arc<Job>, rec: &mut Record, inputs: &JobInput, path: PathBuf, expected: Option<pipeline::ExpectedOutput>) -> Result<PathBuf, StepFailure> {
    step(m, job, rec, Step::OutputDiscovery, async |span, rec| {
        let path = pipeline::require_output(&path).map_err(|e| StepFailure::from_pipeline(Step::OutputDiscovery, e))?;
        probe_output(m, span, rec, inputs, path, expected).await
    })
    .await
}

async fn probe_output(m: &Arc<JobManager>, span: &tracing::Span, rec: &mut Record, inputs: &JobInput, path: PathBuf, expected: Option<pipeline::ExpectedOutput>) -> Result<PathBuf, StepFailure> {
    let size = std::fs::metadata(&path).map(|md| md.len()).unwrap_or(0);
    rec.output_bytes = Some(size);
    span.set_attribute("musetalk.output.bytes", size as i64);
    let input = inputs.video_info.size_bytes + inputs.audio_info.size_bytes;
    if input > 0 {
        span.set_attribute("musetalk.output.input_ratio", size as f64 / input as f64);
    }
    match pipeline::media::probe(m.prober(), &path).await {
        Ok(info) if info.has_video => {
            rec.output_seconds = Some(info.duration_secs);
            rec.output_frames = info.frames;
            span.set_attribute("musetalk.output.seconds", info.duration_secs);
            if let Some(f) = info.frames {
                span.set_attribute("musetalk.output.frames", f as i64);
            }
            match expected.and_then(|e| e.mismatch(&info)) {
                Some(why) => Err(StepFailure::new(Step::OutputDiscovery, why)),
                None => Ok(path),
            }
        }
        Ok(_) => Err(StepFailure::new(Step::OutputDiscovery, format!("{} has no video stream", path.display()))),
        Err(e) => Err(StepFailure::new(Step::OutputDiscovery, format!("the output is not a playable video: {e}"))),
    }
}

async fn run_steps(m: &Arc<JobManager>, job: &Arc<Job>, admission: Admission, inputs: &JobInput, receive_seconds: f64, profiled: bool, rec: &mut Record) -> Result<std::path::PathBuf, StepFailure> {
    // file_processing ran in the request (its span is made by `file_processing_span`); record its time.
    record_step(m, job, rec, Step::FileProcessing, receive_seconds);

    let slots = m.slots.clone();
    let permit = queue_wait(m, job, rec, async {
        slots.acquire_owned().await.map_err(|_| StepFailure { step: Step::QueueWait, message: "the service is shutting down".into(), state: JobState::Cancelled })
    })
    .await?;
    let _running = enter_running(m, job, admission);
    let _permit = permit;

    let pjob = inputs;
    let backend = m.backend.clone();

    let invocation = step(m, job, rec, Step::ConfigCreation, async |_, _| backend.prepare(&pjob).map_err(|e| StepFailure::from_pipeline(Step::ConfigCreation, e))).await?;

    let (outcome, parser) = step(m, job, rec, Step::SubprocessExecution, async |span, rec| execute(m, job, &pjob, &invocation, profiled, span, rec).await).await?;

    let output = step(m, job, rec, Step::OutputDiscovery, async |span, rec| {
        let path = backend.discover(&pjob, &outcome, parser.as_ref()).map_err(|e| StepFailure::from_pipeline(Step::OutputDiscovery, e))?;
        probe_output(m, span, rec, inputs, path, backend.expected_output(&pjob)).await
    })
    .await?;
    Ok(output)
}

struct RunningGuard(Arc<JobManager>, usize);
impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running[self.1].fetch_sub(1, Ordering::AcqRel);
        self.0.publish_queue();
    }
}

/// `subprocess_execution`: runs the invocation (under py-spy when `profiled`), turns its
/// output into stage spans, histogram observations, progress and log events.
async fn execute(
    m: &Arc<JobManager>,
    job: &Arc<Job>,
    pjob: &JobInput,
    inv: &pipeline::Invocation,
    profiled: bool,
    span: &tracing::Span,
    rec: &mut Record,
) -> Result<(ProcessOutcome, Box<dyn pipeline::StageParser>), StepFailure> {
    let opts = RunOptions { timeout: m.config.job_timeout, kill_grace: m.config.kill_grace, cancel: job.cancel.clone(), traceparent: telemetry::traceparent(span) };
    let run = async |inv: &pipeline::Invocation, rec: &mut Record| {
        rec.command = inv.display();
        span.set_attribute("process.command_line", rec.command.clone());
        let mut parser = m.backend.stage_parser(pjob);
        let mut er = EngineRecorder::new(m, job, span, latency_labels(m, job, pjob.batch_size, rec));
        let result = pipeline::process::run_invocation(inv, &opts, parser.as_mut(), &mut |ev| er.on(ev)).await;
        er.finish(rec);
        (result, parser)
    };
    let wrapped = match profiled.then(|| {
        if m.backend.runs_python() {
            m.profiler().wrap(inv, &job.dir.join("profile"))
        } else {
            Err(profile::Unavailable { reason: profile::Reason::NoPython, detail: format!("the {} backend runs no Python process (it renders with ffmpeg)", m.backend.name()) })
        }
    }) {
        Some(Ok(w)) => Some(w),
        Some(Err(u)) => {
            rec.profile = Some(Err(u));
            None
        }
        None => None,
    };
    let (mut result, mut parser) = run(wrapped.as_ref().map_or(inv, |w| &w.invocation), rec).await;
    if let Some(w) = wrapped {
        let py_spy_said: Vec<String> = result.as_ref().map(|o| o.stderr_tail.clone()).unwrap_or_default();
        let (shim, shim_start) = w.shim();
        if let Ok(o) = &mut result {
            // py-spy exits 0 whatever the pipeline did: its shim says how the pipeline ended.
            match shim {
                ShimStatus::Exited(c) => (o.code, o.signal) = (Some(c), None),
                ShimStatus::Signalled(s) => (o.code, o.signal) = (None, Some(s)),
                ShimStatus::NotStarted | ShimStatus::Running => {}
            }
            o.stderr_tail.retain(|l| !l.starts_with("py-spy> "));
            o.stdout_tail.retain(|l| !l.starts_with("py-spy> "));
        }
        // py-spy, not the pipeline, ended the run when the shim recorded no end of its own
        // while the run ended by itself: py-spy could not start (nothing ran), or gave up
        // and killed its child (no Python found within ~1 s, memory unreadable, every
        // Python process gone while a non-Python step still ran). A timeout or a
        // cancellation is the job's own. Either way the pipeline runs again unprofiled:
        // a broken profiler never fails a job (what ran before is lost, and said so).
        let by_py_spy = match (&result, shim) {
            (Err(e), _) => Some(format!("py-spy could not run the pipeline: {e}")),
            (Ok(o), ShimStatus::NotStarted) if o.ended == pipeline::process::EndReason::Exited => Some("py-spy did not start the pipeline".to_string()),
            (Ok(o), ShimStatus::Running) if o.ended == pipeline::process::EndReason::Exited => Some("py-spy stopped the pipeline before it ended".to_string()),
            _ => None,
        };
        if let Some(what) = by_py_spy {
            let why = py_spy_said.iter().filter(|l| !l.trim().is_empty()).last().cloned().unwrap_or_else(|| "no output".into());
            tracing::warn!(job_id = %job.id, "{what} ({why}); running it again without a profile");
            rec.profile = Some(Err(profile::Unavailable { reason: profile::Reason::PySpyFailed, detail: format!("{what}: {why}; the job ran again without a profile") }));
            (result, parser) = run(inv, rec).await;
        } else {
            rec.profile = Some(w.finish(shim_start, &py_spy_said).await);
        }
    }
    let outcome = result.map_err(|e| StepFailure::from_pipeline(Step::SubprocessExecution, e))?;
    if let Some(c) = outcome.code {
        span.set_attribute("process.exit.code", c as i64);
    }
    m.metrics.job.subprocess_exits.get_or_create(&ExitLabels { backend: m.backend.name(), code: exit_code_label(outcome.code, outcome.signal) }).inc();
    rec.outcome = Some(outcome.clone());
    outcome.ended_ok(m.config.job_timeout).map_err(|e| StepFailure::from_pipeline(Step::SubprocessExecution, e))?;
    Ok((outcome, parser))
}

/// Builds the report, sets the final state, records the job metrics. Runs for every
/// job, whatever happened, as `response_preparation`.
/// `response_preparation`, for every job whatever happened: the report, the job span's
/// attributes, the job metrics, then the final state (in that order: a client woken by
/// the state finds the report and the metrics already there).
fn finish(m: &JobManager, job: &Job, inputs: &JobInput, mut rec: Record, result: Result<std::path::PathBuf, StepFailure>, has_output: bool, profile: Option<profile::ProfileReport>) {
    let scope = StepScope::open(job, Step::ResponsePreparation);
    let (state, error) = match &result {
        Ok(_) => (JobState::Succeeded, None),
        Err(f) => (f.state, Some(ErrorInfo { step: f.step.to_string(), message: f.message.clone() })),
    };
    if let Ok(p) = &result
        && has_output
    {
        *job.output.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
    }
    // Resource window: the whole job for host figures, the execution step for its tree.
    let (w0, w1) = rec.exec_window.unwrap_or((job.created_at, Instant::now()));
    let mut resources = m.collector.window(job.created_at, Instant::now(), rec.tree_key);
    if rec.tree_key.is_some() {
        resources.tree = m.collector.window(w0, w1, rec.tree_key).tree;
    }
    let _ = scope.close(m, job, &mut rec, Ok(()));
    // The configuration labels, once: the report states them, the metrics carry them.
    let labels = latency_labels(m, job, inputs.batch_size, &rec);
    let mut report = build_report(m, job, inputs, &rec, state, error, resources, labels.clone());
    report.profile = profile;
    // Retry-After learns from jobs that ran to the end: a cancelled or failed job's
    // seconds say nothing of how long the next one takes, nor does an avatar's preparation.
    if result.is_ok() && has_output {
        m.observe_processing(job.mode, report.total_seconds - report.queue_seconds);
    }
    record_job_span(job, inputs, &report);
    record_job_metrics(m, job, state, &report, labels);
    match &report.error {
        None => tracing::info!(parent: &job.span(), job_id = %job.id, seconds = report.total_seconds, "job succeeded"),
        Some(e) => tracing::warn!(parent: &job.span(), job_id = %job.id, step = %e.step, "job {}: {}", state.as_str(), e.message),
    }
    let steps_now = report.steps.clone();
    let err_text = report.error.as_ref().map(|e| format!("{}: {}", e.step, e.message));
    *job.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
    *job.finished_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    job.update(|s| {
        s.state = state;
        s.steps = steps_now;
        s.stage = None;
        s.error = err_text.clone();
    });
    job.emit(JobEvent::Done { state, error: err_text });
    job.close_span();
}

/// The profile's formats written beside its trace, sliced by stage, and counted.
fn profile_report(m: &JobManager, job: &Job, stage_windows: &[(String, SystemTime, SystemTime)], p: Result<profile::Taken, profile::Unavailable>) -> profile::ProfileReport {
    let rate = m.profiler().rate();
    let built = p.and_then(|t| {
        let url = format!("/v1/jobs/{}/profile", job.id);
        profile::ProfileReport::taken(&t, rate, &job.dir.join("profile"), url, &format!("musetalk-sidecar job {}", job.id), stage_windows)
    });
    m.metrics.profile.count(job.mode.as_str(), built.as_ref().map(|_| ()).map_err(|u| u.reason));
    built.unwrap_or_else(|u| {
        tracing::warn!(job_id = %job.id, reason = u.reason.as_str(), "no profile: {}", u.detail);
        profile::ProfileReport::unavailable(rate, &u)
    })
}

/// The per-request report, from what the runner recorded.
fn build_report(m: &JobManager, job: &Job, inputs: &JobInput, rec: &Record, state: JobState, error: Option<ErrorInfo>, resources: crate::collector::Window, labels: LatencyLabels) -> Report {
    let total = job.created_at.elapsed().as_secs_f64();
    let processing = total - rec.queue_seconds;
    let steps = report::timings(&rec.steps, total);
    // Stage shares are of the step that ran them (subprocess_execution, inference, avatar_preparation).
    let exec_secs = rec.exec_window.map(|(a, b)| b.duration_since(a).as_secs_f64()).unwrap_or(0.0);
    let mut stages = report::timings(&rec.stages, exec_secs);
    for (t, g) in stages.iter_mut().zip(&rec.stage_gpu) {
        t.gpu = g.clone();
    }
    let gpu_energy = insight::energy_joules(&resources).map(|joules| report::GpuEnergy {
        joules,
        per_output_second: rec.output_seconds.filter(|o| *o > 0.0).map(|o| joules / o),
    });
    let live = job.live();
    let latency = report::Latency::from_live(&live, job.created, labels);
    let input_bytes = inputs.video_info.size_bytes + inputs.audio_info.size_bytes;
    let ratio = rec.output_bytes.filter(|_| input_bytes > 0).map(|o| o as f64 / input_bytes as f64);
    let rtf = rec.output_seconds.filter(|_| processing > 0.0).map(|o| o / processing);
    Report {
        job_id: job.id.clone(),
        trace_id: job.trace_id.clone(),
        trace_url: m.config.trace_ui_url.as_ref().map(|u| u.replace("{trace_id}", &job.trace_id)),
        mode: job.mode.as_str().into(),
        backend: job.backend.into(),
        outcome: state.as_str().into(),
        error,
        created_at: humantime::format_rfc3339_millis(job.created).to_string(),
        total_seconds: total,
        queue_seconds: rec.queue_seconds,
        bottleneck: report::bottleneck(&steps, &stages),
        steps,
        stages,
        worker: rec.worker.clone(),
        subprocess: rec.outcome.as_ref().map(|o| Subprocess {
            pid: o.pid,
            exit_code: o.code,
            signal: o.signal,
            seconds: o.duration.as_secs_f64(),
            percent: if total > 0.0 { o.duration.as_secs_f64() / total * 100.0 } else { 0.0 },
            command: rec.command.clone(),
        }),
        files: Files { video_bytes: inputs.video_info.size_bytes, audio_bytes: inputs.audio_info.size_bytes, output_bytes: rec.output_bytes, output_input_ratio: ratio },
        media: Media {
            video_seconds: inputs.video_info.duration_secs,
            audio_seconds: inputs.audio_info.duration_secs,
            output_seconds: rec.output_seconds,
            output_frames: rec.output_frames,
            input_frames: inputs.video_info.frames,
            realtime_factor: rtf,
        },
        resources,
        gpu_energy,
        profile: None,
        latency,
    }
}

/// The labels that tell realtime configurations apart (bounded; README "Latency").
fn latency_labels(m: &JobManager, job: &Job, batch_size: Option<u32>, rec: &Record) -> LatencyLabels {
    let musetalk = m.config.backend == crate::config::BackendKind::Musetalk;
    LatencyLabels {
        mode: job.mode.as_str(),
        version: if musetalk { m.config.musetalk_version.clone() } else { job.backend.to_string() },
        fp16: if musetalk && m.config.musetalk_float16 { "true" } else { "false" },
        batch_size: batch_bucket(batch_size.or(m.config.musetalk_batch_size.filter(|_| musetalk))),
        worker: rec.worker.clone().unwrap_or_else(|| "none".into()),
    }
}

/// The job span's attributes: outcome, media, and the resource window (average and peak).
fn record_job_span(job: &Job, inputs: &JobInput, report: &Report) {
    let js = &job.span();
    js.record("musetalk.outcome", report.outcome.as_str());
    if let Some(e) = &report.error {
        telemetry::set_error(js, format!("{}: {}", e.step, e.message));
    }
    if let Some(a) = &inputs.avatar_id {
        js.set_attribute("musetalk.avatar.id", a.clone());
    }
    if let Some(f) = report.media.input_frames {
        js.set_attribute("musetalk.frames", f as i64);
    }
    if let Some(o) = report.media.output_seconds {
        js.set_attribute("musetalk.output.seconds", o);
    }
    if let Some(r) = report.media.realtime_factor {
        js.set_attribute("musetalk.realtime_factor", r);
    }
    let r = &report.resources;
    let set_ap = |key: &'static str, v: Option<crate::collector::AvgPeak>| {
        if let Some(v) = v {
            js.set_attribute(format!("{key}.avg"), v.avg);
            js.set_attribute(format!("{key}.peak"), v.peak);
        }
    };
    set_ap("musetalk.resources.cpu", r.cpu);
    set_ap("musetalk.resources.memory_used", r.memory_used);
    set_ap("musetalk.resources.pipeline.cpu", r.tree.as_ref().map(|t| t.cpu));
    set_ap("musetalk.resources.pipeline.rss", r.tree.as_ref().map(|t| t.rss));
    set_ap("musetalk.resources.pipeline.gpu_memory", r.tree.as_ref().and_then(|t| t.gpu_memory));
    set_ap("musetalk.resources.gpu.utilization", r.gpus.first().and_then(|g| g.utilization));
    set_ap("musetalk.resources.gpu.memory_used", r.gpus.first().and_then(|g| g.memory_used_bytes));
    let l = &report.latency;
    for (k, v) in [("musetalk.model.version", &l.version), ("musetalk.batch_size_bucket", &l.batch_size.to_string()), ("musetalk.worker", &l.worker)] {
        js.set_attribute(k, v.clone());
    }
    js.set_attribute("musetalk.fp16", l.fp16);
    if let Some(t) = l.time_to_first_frame_seconds {
        js.set_attribute("musetalk.time_to_first_frame_seconds", t);
    }
    if let Some(b) = &l.batches {
        js.set_attribute("musetalk.batch.count", b.count as i64);
        js.set_attribute("musetalk.batch.mean_seconds", b.mean_seconds);
        js.set_attribute("musetalk.batch.max_seconds", b.max_seconds);
    }
    if let Some(p) = &report.profile {
        match (&p.url, &p.unavailable) {
            (Some(url), _) => {
                js.set_attribute("musetalk.profile.url", url.clone());
                js.set_attribute("musetalk.profile.samples", p.samples as i64);
                js.set_attribute("musetalk.profile.summary", p.summary());
            }
            (None, Some(why)) => js.set_attribute("musetalk.profile.unavailable", why.clone()),
            _ => {}
        }
    }
    if let Some(e) = &report.gpu_energy {
        js.set_attribute("musetalk.gpu.energy_joules", e.joules);
        if let Some(p) = e.per_output_second {
            js.set_attribute("musetalk.gpu.energy_joules_per_output_second", p);
        }
    }
}

/// A finished job's metrics: the outcome counter, the job histogram with its exemplar,
/// sizes, ratio, realtime factor.
fn record_job_metrics(m: &JobManager, job: &Job, state: JobState, report: &Report, config: LatencyLabels) {
    let mode = job.mode.as_str();
    let labels = JobLabels { mode, backend: job.backend, outcome: state.as_str() };
    m.metrics.job.jobs.get_or_create(&labels).inc();
    Metrics::observe_traced(&m.metrics.job.job_duration, &JobDurationLabels::new(job.backend, state.as_str(), &config), report.total_seconds, &job.trace_id);
    let ml = ModeLabels { mode };
    m.metrics.job.input_size.get_or_create(&InputLabels { mode, kind: "video" }).observe(report.files.video_bytes as f64);
    m.metrics.job.input_size.get_or_create(&InputLabels { mode, kind: "audio" }).observe(report.files.audio_bytes as f64);
    if let Some(o) = report.files.output_bytes {
        m.metrics.job.output_size.get_or_create(&ml).observe(o as f64);
    }
    if let Some(r) = report.files.output_input_ratio {
        m.metrics.job.output_input_ratio.get_or_create(&ml).observe(r);
    }
    if let Some(r) = report.media.realtime_factor {
        m.metrics.job.realtime_factor.get_or_create(&ml).observe(r);
    }
    let labels = config;
    if let Some(t) = report.latency.time_to_first_frame_seconds {
        Metrics::observe_traced(&m.metrics.job.time_to_first_frame, &labels, t, &job.trace_id);
    }
    for b in job.live().batches {
        Metrics::observe_traced(&m.metrics.job.batch_duration, &labels, b, &job.trace_id);
    }
    job.latency_labels_known(labels, &m.metrics);
}
