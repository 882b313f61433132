//! The embedded default backend: real media work with ffmpeg, no model.
//!
//! The input video is played forward then backward and looped to the audio's length
//! (MuseTalk cycles its frames the same way), re-encoded as H.264/yuv420p with the
//! input audio muxed in. Every step, span and metric is exercised for real; responses
//! name the backend, so nobody mistakes it for lip-sync.

use std::path::PathBuf;

use futures::future::BoxFuture;

use super::stages::FfmpegProgress;
use super::{Backend, Invocation, JobInput, PipelineError, ProcessOutcome, StageParser};
use crate::config::Config;

/// The `loop` filter buffers at most this many frames (ffmpeg's own limit).
const MAX_LOOP_FRAMES: u64 = 32767;

pub struct Preview {
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
    env: Vec<(String, String)>,
}

impl Preview {
    pub fn new(config: &Config) -> Self {
        Preview { ffmpeg: config.ffmpeg.clone(), ffprobe: config.ffprobe.clone(), env: config.pipeline_env_pairs() }
    }

    /// Where the preview render lands inside the job dir.
    pub fn output_path(job: &JobInput) -> PathBuf {
        job.result_dir().join("preview.mp4")
    }
}

/// `ffmpeg -version`'s first line, or why it cannot run.
pub async fn tool_version(tool: &std::path::Path) -> Result<String, String> {
    let out = tokio::process::Command::new(tool)
        .arg("-version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run `{}` ({e}): install ffmpeg (apt-get install ffmpeg) or set --ffmpeg/--ffprobe", tool.display()))?;
    if !out.status.success() {
        return Err(format!("`{} -version` failed with {}", tool.display(), out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

impl Backend for Preview {
    fn name(&self) -> &'static str {
        "preview"
    }

    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let v = tool_version(&self.ffmpeg).await?;
            tool_version(&self.ffprobe).await?;
            Ok(v)
        })
    }

    fn prepare(&self, job: &JobInput) -> Result<Invocation, PipelineError> {
        std::fs::create_dir_all(job.result_dir()).map_err(|e| PipelineError::Config(format!("creating {}: {e}", job.result_dir().display())))?;
        let v = &job.video_info;
        let fps = v.fps.unwrap_or(25.0);
        let frames = v.frames.unwrap_or_else(|| (v.duration_secs * fps).ceil() as u64).max(1);
        // Forward + backward, looped: the loop filter must hold both halves.
        let loop_size = (frames * 2).min(MAX_LOOP_FRAMES);
        let duration = format!("{:.3}", job.audio_info.duration_secs);
        let filter = format!(
            "[0:v]scale=trunc(iw/2)*2:trunc(ih/2)*2,split=2[f][b];[b]reverse[r];[f][r]concat=n=2:v=1:a=0,loop=loop=-1:size={loop_size}:start=0,setpts=N/({fps}*TB),format=yuv420p[v]"
        );
        let args = [
            "-hide_banner", "-nostdin", "-y", "-v", "error", "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([job.video.display().to_string(), "-i".into(), job.audio.display().to_string()])
        .chain(
            [
                "-filter_complex", &filter, "-map", "[v]", "-map", "1:a:0", "-t", &duration, "-r", &format!("{fps}"), "-c:v", "libx264", "-preset", "veryfast",
                "-crf", "23", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", "-progress", "pipe:1", "-nostats",
            ]
            .iter()
            .map(|s| s.to_string()),
        )
        .chain([Self::output_path(job).display().to_string()])
        .collect();
        Ok(Invocation { program: self.ffmpeg.display().to_string(), args, cwd: job.dir.clone(), env: self.env.clone() })
    }

    fn stage_parser(&self, job: &JobInput) -> Box<dyn StageParser> {
        let fps = job.video_info.fps.unwrap_or(25.0);
        Box::new(FfmpegProgress::new("video_encoding", Some((job.audio_info.duration_secs * fps).round() as u64)))
    }

    fn discover(&self, job: &JobInput, outcome: &ProcessOutcome, _: &dyn StageParser) -> Result<PathBuf, PipelineError> {
        super::require_clean_exit(outcome)?;
        let _ = &self.ffprobe;
        super::require_output(&Self::output_path(job))
    }
}
