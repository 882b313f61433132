//! The pipeline: one [`Backend`] trait for every way of turning a video and an audio into a lip-synced mp4.
//!
//! A backend only says *what* to run ([`Backend::prepare`] → [`Invocation`]), how to
//! read the child's output ([`Backend::stage_parser`]) and where the result is
//! ([`Backend::discover`]). Running it (process group, clean env, timeout, SIGTERM →
//! SIGKILL, line capture) is [`process::run`], the same for all, so the job runner
//! never branches on the backend kind. This module knows nothing of HTTP or jobs.

pub mod command;
pub mod groups;
pub mod lines;
pub mod media;
pub mod musetalk;
pub mod preview;
pub mod process;
pub mod prober;
pub mod realtime;
pub mod stages;
pub mod trial;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::config::{BackendKind, Config};
pub use media::MediaInfo;
pub use process::{EndReason, Invocation, ProcessOutcome, RunOptions, Stream};
pub use stages::{StageEvent, StageParser};

/// What stage spans and progress are made from.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    StageStart { name: String, at: std::time::SystemTime },
    StageEnd { name: String, at: std::time::SystemTime },
    Progress { done: u64, total: Option<u64> },
    /// A process now does the work; `shared` when it is a pool worker that outlives the job.
    Process { pid: u32, shared: bool },
    /// The first output frame is ready: the job's time to first frame ends here.
    FirstFrame { at: std::time::SystemTime },
    /// One batch of the model (UNet + VAE decode) took `seconds` for `frames` frames.
    Batch { seconds: f64, frames: Option<u64> },
    /// The output is being written progressively (fragmented MP4) at `path`: a streamed
    /// answer can follow the file as it grows.
    StreamingTo { path: std::path::PathBuf },
}

pub type Sink<'a> = &'a mut (dyn FnMut(EngineEvent) + Send);

/// What a job hands the backend: its private directory and its (uniquely named) inputs.
#[derive(Clone, Debug)]
pub struct JobInput {
    pub job_id: String,
    /// The job's own directory; everything the pipeline writes goes under it.
    pub dir: PathBuf,
    pub video: PathBuf,
    pub audio: PathBuf,
    pub video_info: MediaInfo,
    pub audio_info: MediaInfo,
    pub bbox_shift: Option<i32>,
    pub batch_size: Option<u32>,
    /// The avatar the job belongs to (realtime), or the client's tag (simple): reported, not used by backends.
    pub avatar_id: Option<String>,
    /// The client asked for a Python profile (`profile=true`): for the job runner, not backends.
    pub profile: bool,
    /// A streamed answer follows the output: write it progressively (fragmented MP4) where
    /// the backend can; others write it whole and the answer streams it at the end.
    pub stream: bool,
}

impl JobInput {
    /// Where the pipeline's results go (MuseTalk's `--result_dir`).
    pub fn result_dir(&self) -> PathBuf {
        self.dir.join("result")
    }
}

/// Why a pipeline step failed. The messages never name the step: the job runner's
/// `StepFailure` does, once (a detail read `output_discovery: output_discovery: …`).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Config(String),
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{0}")]
    Io(std::io::Error),
    #[error("pipeline reported an error: {0}")]
    Reported(String),
    #[error("pipeline exited with {status}{tail}")]
    Failed { status: String, tail: String },
    #[error("pipeline timed out after {0:?}; its process group was killed")]
    TimedOut(std::time::Duration),
    #[error("job cancelled; the pipeline's process group was killed")]
    Cancelled,
    #[error("{0}")]
    Output(String),
}

/// A way of running the lip-sync pipeline.
pub trait Backend: Send + Sync + 'static {
    /// The bounded `backend` label (`preview`, `musetalk`, `command`).
    fn name(&self) -> &'static str;

    /// Is it usable here? `Ok(description)` or `Err(what is missing and the fix)`.
    fn probe(&self) -> BoxFuture<'_, Result<String, String>>;

    /// `config_creation`: writes whatever the pipeline needs into the job dir and says what to run.
    fn prepare(&self, job: &JobInput) -> Result<Invocation, PipelineError>;

    /// A fresh parser for the child's output lines (stage markers, progress, results).
    fn stage_parser(&self, job: &JobInput) -> Box<dyn StageParser>;

    /// `output_discovery`: after the process ended, decide success from what it said
    /// and did (not only its exit code) and return the output video.
    fn discover(&self, job: &JobInput, outcome: &ProcessOutcome, parser: &dyn StageParser) -> Result<PathBuf, PipelineError>;

    /// Whether the pipeline runs Python that py-spy can profile (MuseTalk; a command may).
    /// `false` (the ffmpeg preview): a profiled job says so instead of running py-spy.
    fn runs_python(&self) -> bool {
        true
    }

    /// What a whole output of this job is, when the backend knows it: `output_discovery`
    /// probes the output against it, so a render that lost frames (a decoder out of
    /// memory, a truncated write) fails instead of succeeding. `None`: not checked.
    fn expected_output(&self, _job: &JobInput) -> Option<ExpectedOutput> {
        None
    }

    /// Whether `check` proves the backend with a real trial job (cheap: preview) or,
    /// where one run costs minutes of GPU, with [`Backend::probe`] alone.
    fn cheap_trial(&self) -> bool {
        false
    }
}

/// The length and frame count a complete output has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpectedOutput {
    pub seconds: f64,
    pub frames: u64,
    pub fps: f64,
}

impl ExpectedOutput {
    /// Why `info` is not a whole output, if it is not: its frame count (±1) and its
    /// length (±1 frame, + the AAC encoder's padding) against these.
    pub fn mismatch(&self, info: &MediaInfo) -> Option<String> {
        if let Some(frames) = info.frames
            && frames.abs_diff(self.frames) > 1
        {
            return Some(format!("the output has {frames} frames, {} expected: the render lost frames", self.frames));
        }
        let slack = 1.0 / self.fps + 0.05;
        if (info.duration_secs - self.seconds).abs() > slack {
            return Some(format!("the output lasts {:.3} s, {:.3} s expected: the render is incomplete", info.duration_secs, self.seconds));
        }
        None
    }
}

/// The backend the configuration asks for.
pub fn build(config: &Config) -> Arc<dyn Backend> {
    match config.backend {
        BackendKind::Preview => Arc::new(preview::Preview::new(config)),
        BackendKind::Musetalk => Arc::new(musetalk::MuseTalk::new(config)),
        BackendKind::Command => Arc::new(command::CommandBackend::new(config)),
    }
}

/// Maps monotonic instants to wall-clock time against one anchor, so instants that
/// are equal (lines read in one chunk) or ordered stay so on exported spans.
pub struct Clock {
    sys: std::time::SystemTime,
    mono: std::time::Instant,
}

impl Clock {
    pub fn now() -> Self {
        Clock { sys: std::time::SystemTime::now(), mono: std::time::Instant::now() }
    }
    pub fn to_system(&self, at: std::time::Instant) -> std::time::SystemTime {
        if at >= self.mono { self.sys + (at - self.mono) } else { self.sys - (self.mono - at) }
    }

    /// The inverse: a wall-clock time (an event's timestamp) as an instant, for the
    /// collector's ring, which is keyed by `Instant`.
    pub fn to_instant(&self, at: std::time::SystemTime) -> std::time::Instant {
        match self.sys.duration_since(at) {
            Ok(ago) => self.mono.checked_sub(ago).unwrap_or(self.mono),
            Err(ahead) => self.mono + ahead.duration(),
        }
    }
}

/// Default exit-code rule for pipelines that don't report success otherwise.
pub(crate) fn require_clean_exit(outcome: &ProcessOutcome) -> Result<(), PipelineError> {
    if outcome.succeeded() {
        Ok(())
    } else {
        Err(PipelineError::Failed { status: outcome.status_text(), tail: outcome.error_tail() })
    }
}

/// An output file must exist, be a regular file and be non-empty.
pub(crate) fn require_output(path: &Path) -> Result<PathBuf, PipelineError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(path.to_path_buf()),
        Ok(_) => Err(PipelineError::Output(format!("{} is empty or not a file", path.display()))),
        Err(e) => Err(PipelineError::Output(format!("{} not found: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::Clock;
    use std::time::Duration;

    #[test]
    fn clock_maps_both_ways_against_one_anchor() {
        let c = Clock::now();
        let later = c.mono + Duration::from_millis(1500);
        let earlier = c.mono - Duration::from_millis(250);
        assert_eq!(c.to_instant(c.to_system(later)), later);
        assert_eq!(c.to_instant(c.to_system(earlier)), earlier);
    }
}
