//! A trial job: the configured backend run once, for real, on a 1 s clip it makes itself — the proof `check` gives before it says "ready".
//!
//! `ffmpeg -version` answering proves little: a relative path handed to a child in
//! another directory, a broken encoder, a wrapper script that fails every real job all
//! pass it. The trial goes through the same doors as a job — the upload probe
//! ([`media::probe_decoding`]), [`Backend::prepare`], [`process::run`],
//! [`Backend::discover`] and the output probe — in a temporary directory it removes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Backend, JobInput, RunOptions, StageParser, media, process};
use crate::config::Config;

/// The trial clip: 1 s, as small as a video gets while still being an H.264 picture.
const CLIP_SECONDS: f64 = 1.0;
/// A trial that takes longer than this is stuck (a preview job of 1 s takes ~0.3 s).
const TRIAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the trial did.
#[derive(Debug)]
pub struct Trial {
    pub seconds: f64,
    pub output_seconds: f64,
    pub output_bytes: u64,
}

/// A directory under the system temp dir, removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("musetalk-sidecar-trial-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes one input of the trial with the configured ffmpeg.
async fn make(ffmpeg: &Path, lavfi: &str, extra: &[&str], out: &Path) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(ffmpeg);
    cmd.args(["-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", lavfi, "-t", &CLIP_SECONDS.to_string()]).args(extra).arg(out);
    let run = cmd.stdin(std::process::Stdio::null()).kill_on_drop(true).output();
    let o = tokio::time::timeout(TRIAL_TIMEOUT, run)
        .await
        .map_err(|_| format!("`{}` did not make a 1 s test clip within {} s", ffmpeg.display(), TRIAL_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot run `{}`: {e}", ffmpeg.display()))?;
    if o.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no error output").trim().to_string();
    Err(format!("`{}` cannot make a 1 s test clip ({}): {last}", ffmpeg.display(), o.status))
}

/// Runs `backend` once on a generated 1 s clip and its 1 s audio; `Err` says which step
/// failed and why, in the words a failed job would use.
pub async fn run(config: &Config, prober: &super::prober::Prober, backend: &dyn Backend) -> Result<Trial, String> {
    let dir = TempDir::new().map_err(|e| format!("cannot create a temporary directory in {}: {e}", std::env::temp_dir().display()))?;
    let (video, audio) = (dir.0.join("trial-video.mp4"), dir.0.join("trial-audio.wav"));
    make(&config.ffmpeg, "testsrc=size=64x64:rate=25", &["-pix_fmt", "yuv420p", "-c:v", "libx264"], &video).await?;
    make(&config.ffmpeg, "sine=frequency=440:sample_rate=16000", &[], &audio).await?;
    let video_info = media::probe_decoding(prober, &video, true).await.map_err(|e| format!("file_processing: the trial video: {e}"))?;
    let audio_info = media::probe_decoding(prober, &audio, false).await.map_err(|e| format!("file_processing: the trial audio: {e}"))?;
    let job = JobInput { job_id: "trial".into(), dir: dir.0.join("job"), video, audio, video_info, audio_info, bbox_shift: None, batch_size: None, avatar_id: None, profile: false, stream: false };
    std::fs::create_dir_all(&job.dir).map_err(|e| format!("cannot create {}: {e}", job.dir.display()))?;

    let started = Instant::now();
    let inv = backend.prepare(&job).map_err(|e| format!("config_creation: {e}"))?;
    let mut parser: Box<dyn StageParser> = backend.stage_parser(&job);
    parser.begin(started);
    let opts = RunOptions { timeout: TRIAL_TIMEOUT.min(config.job_timeout), kill_grace: config.kill_grace, cancel: CancellationToken::new(), traceparent: None };
    let outcome = process::run(&inv, &opts, &mut |_| {}, &mut |stream, line, at| {
        parser.line(stream, line, at);
    })
    .await
    .map_err(|e| format!("subprocess_execution: {e}"))?;
    parser.finish(Instant::now());
    match outcome.ended {
        process::EndReason::TimedOut => return Err(format!("subprocess_execution: the trial job did not finish within {} s", opts.timeout.as_secs())),
        process::EndReason::Cancelled | process::EndReason::Exited => {}
    }
    let output = backend.discover(&job, &outcome, parser.as_ref()).map_err(|e| match e {
        super::PipelineError::Failed { .. } => format!("subprocess_execution: {e}"),
        e => format!("output_discovery: {e}"),
    })?;
    let out = media::probe(prober, &output).await.map_err(|e| format!("output_discovery: the trial output {}: {e}", output.display()))?;
    if !out.has_video {
        return Err(format!("output_discovery: the trial output {} has no video stream", output.display()));
    }
    if let Some(why) = backend.expected_output(&job).and_then(|e| e.mismatch(&out)) {
        return Err(format!("output_discovery: the trial output: {why}"));
    }
    Ok(Trial { seconds: started.elapsed().as_secs_f64(), output_seconds: out.duration_secs, output_bytes: out.size_bytes })
}
