//! `musetalk` backend: MuseTalk's own `python -u -m scripts.inference`, one subprocess per job.
//!
//! Written against the real script's contract (DESIGN.md §3, checked against
//! TMElyralab/MuseTalk `scripts/inference.py`): a per-job YAML config written by a
//! serializer, a per-job result dir, uniquely named inputs (its temp files are named
//! after them), output at `{result_dir}/{version}/{video_stem}_{audio_stem}.mp4`.
//! MuseTalk exits 0 when a task fails, so success is decided from its output: the
//! `Results saved to` line *and* the file being there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::future::BoxFuture;
use serde::Serialize;

use super::stages::{SequentialStages, StageEvent, tqdm_progress};
use super::{Backend, Invocation, JobInput, PipelineError, ProcessOutcome, StageParser, Stream};
use crate::config::Config;

/// Stdout markers and the stage each one begins. Everything before the first marker
/// is `model_loading` (the stage opens when the process starts). MuseTalk prints
/// nothing between extracting frames and computing Whisper features, so those two
/// share one stage.
pub const MARKERS: &[(&str, &str)] = &[
    ("Loaded inference config:", "frame_and_audio_extraction"),
    ("Extracting landmarks...", "face_detection"),
    ("Using saved coordinates", "face_detection"),
    ("Number of frames:", "latent_encoding"),
    ("Starting inference", "unet_inference"),
    ("Padding generated images to original video size", "blending"),
    ("Video generation command:", "video_encoding"),
    ("Audio combination command:", "audio_mux"),
];
const RESULT_MARKER: &str = "Results saved to ";
const ERROR_MARKER: &str = "Error occurred during processing:";

/// Files under the MuseTalk dir that must exist before a job can run (relative paths).
pub const REQUIRED_FILES: &[&str] = &["scripts/inference.py"];

pub struct MuseTalk {
    dir: Option<PathBuf>,
    python: String,
    version: String,
    unet_model_path: String,
    unet_config: String,
    batch_size: Option<u32>,
    float16: bool,
    gpu_id: Option<u32>,
    ffmpeg: PathBuf,
    env: Vec<(String, String)>,
}

impl MuseTalk {
    pub fn new(config: &Config) -> Self {
        MuseTalk {
            dir: config.musetalk_dir.clone(),
            python: config.musetalk_python.clone(),
            version: config.musetalk_version.clone(),
            unet_model_path: config.musetalk_unet_model_path.clone(),
            unet_config: config.musetalk_unet_config.clone(),
            batch_size: config.musetalk_batch_size,
            float16: config.musetalk_float16,
            gpu_id: config.musetalk_gpu_id,
            ffmpeg: config.ffmpeg.clone(),
            env: config.pipeline_env_pairs(),
        }
    }

    fn dir(&self) -> Result<&Path, PipelineError> {
        self.dir.as_deref().ok_or_else(|| PipelineError::Config("--musetalk-dir is not set".into()))
    }

    /// MuseTalk's output path formula (stem = basename up to the FIRST dot).
    pub fn expected_output(&self, job: &JobInput) -> PathBuf {
        let stem = |p: &Path| p.file_name().map(|n| n.to_string_lossy().split('.').next().unwrap_or_default().to_string()).unwrap_or_default();
        job.result_dir().join(&self.version).join(format!("{}_{}.mp4", stem(&job.video), stem(&job.audio)))
    }
}

/// One task of MuseTalk's inference config.
#[derive(Serialize)]
struct Task<'a> {
    video_path: &'a str,
    audio_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    bbox_shift: Option<i32>,
}

impl Backend for MuseTalk {
    fn name(&self) -> &'static str {
        "musetalk"
    }

    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let dir = self.dir.as_deref().ok_or("--musetalk-dir is not set")?;
            for rel in REQUIRED_FILES.iter().copied().chain([self.unet_model_path.as_str(), self.unet_config.as_str()]) {
                let p = if Path::new(rel).is_absolute() { PathBuf::from(rel) } else { dir.join(rel) };
                if !p.is_file() {
                    return Err(format!("{} is missing (download MuseTalk's weights into {}/models, see its README)", p.display(), dir.display()));
                }
            }
            let out = tokio::process::Command::new(&self.python)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("cannot run `{}` ({e}): set --musetalk-python", self.python))?;
            let version = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).trim().to_string();
            Ok(format!("{} with {version}", dir.display()))
        })
    }

    fn prepare(&self, job: &JobInput) -> Result<Invocation, PipelineError> {
        let dir = self.dir()?;
        std::fs::create_dir_all(job.result_dir()).map_err(|e| PipelineError::Config(format!("creating {}: {e}", job.result_dir().display())))?;
        let video = job.video.to_str().ok_or_else(|| PipelineError::Config("video path is not UTF-8".into()))?;
        let audio = job.audio.to_str().ok_or_else(|| PipelineError::Config("audio path is not UTF-8".into()))?;
        let tasks = BTreeMap::from([("task_0", Task { video_path: video, audio_path: audio, bbox_shift: job.bbox_shift })]);
        // A serializer, never string templating: paths with quotes or colons stay data.
        let yaml = serde_yaml_ng::to_string(&tasks).map_err(|e| PipelineError::Config(format!("serializing the inference config: {e}")))?;
        let cfg = job.dir.join("inference.yaml");
        std::fs::write(&cfg, yaml).map_err(|e| PipelineError::Config(format!("writing {}: {e}", cfg.display())))?;
        let mut args: Vec<String> = vec!["-u".into(), "-m".into(), "scripts.inference".into()];
        let mut flag = |k: &str, v: String| {
            args.push(k.into());
            args.push(v);
        };
        flag("--inference_config", cfg.display().to_string());
        flag("--result_dir", job.result_dir().display().to_string());
        flag("--unet_model_path", self.unet_model_path.clone());
        flag("--unet_config", self.unet_config.clone());
        flag("--version", self.version.clone());
        if let Some(b) = job.batch_size.or(self.batch_size) {
            flag("--batch_size", b.to_string());
        }
        if let Some(g) = self.gpu_id {
            flag("--gpu_id", g.to_string());
        }
        // MuseTalk uses --ffmpeg_path only when `ffmpeg` is not on PATH: pass the
        // configured ffmpeg's directory so both cases work.
        if let Some(parent) = self.ffmpeg.parent().filter(|p| !p.as_os_str().is_empty()) {
            flag("--ffmpeg_path", parent.display().to_string());
        }
        if self.float16 {
            args.push("--use_float16".into());
        }
        Ok(Invocation { program: self.python.clone(), args, cwd: dir.to_path_buf(), env: self.env.clone() })
    }

    fn stage_parser(&self, _: &JobInput) -> Box<dyn StageParser> {
        Box::new(MuseTalkParser::default())
    }

    fn discover(&self, job: &JobInput, outcome: &ProcessOutcome, parser: &dyn StageParser) -> Result<PathBuf, PipelineError> {
        if let Some(e) = parser.reported_error() {
            return Err(PipelineError::Reported(e));
        }
        let Some(reported) = parser.reported_output() else {
            // No result line: a crash (non-zero exit) or a run that said nothing useful.
            super::require_clean_exit(outcome)?;
            return Err(PipelineError::Output(format!("MuseTalk exited 0 without `{}`{}", RESULT_MARKER.trim(), outcome.error_tail())));
        };
        // "Results saved to" is printed even when its ffmpeg calls failed: check the file.
        let expected = self.expected_output(job);
        let path = if reported.is_absolute() { reported } else { self.dir()?.join(reported) };
        if path != expected && !path.starts_with(&job.dir) {
            return Err(PipelineError::Output(format!("MuseTalk reported {} outside the job directory", path.display())));
        }
        super::require_output(&path)
    }
}

/// The most UNet batches one tqdm redraw may stand for (tqdm draws at most every 0.1 s).
const MAX_BATCH_JUMP: u64 = 1024;

/// MuseTalk's stdout markers → sequential stages; tqdm bars (stderr) → progress.
#[derive(Default)]
pub struct MuseTalkParser {
    stages: SequentialStages,
    output: Option<PathBuf>,
    error: Option<String>,
    /// In `unet_inference`: batches done so far and when the last of them was seen.
    batches: Option<(u64, Instant)>,
}

impl StageParser for MuseTalkParser {
    fn begin(&mut self, at: Instant) -> Vec<StageEvent> {
        self.stages.enter("model_loading", at)
    }

    fn line(&mut self, stream: Stream, line: &str, at: Instant) -> Vec<StageEvent> {
        if stream == Stream::Stderr {
            let Some((done, total)) = tqdm_progress(line) else { return Vec::new() };
            let mut evs = Vec::new();
            // MuseTalk's UNet loop draws one tqdm step per batch: the time between steps is
            // the batch's (tqdm may draw several at once: their time is shared out), and the
            // first step is the first frame out of the model.
            // A jump of more than MAX_BATCH_JUMP steps at once is no UNet loop (a stray bar):
            // it moves the count on without inventing batches.
            if let (Some("unet_inference"), Some((seen, since))) = (self.stages.current(), self.batches)
                && done > seen
                && done - seen <= MAX_BATCH_JUMP
            {
                if seen == 0 {
                    evs.push(StageEvent::FirstFrame { at });
                }
                let each = at.saturating_duration_since(since).as_secs_f64() / (done - seen) as f64;
                evs.extend((seen..done).map(|_| StageEvent::Batch { seconds: each }));
                self.batches = Some((done, at));
            }
            evs.push(StageEvent::Progress { done, total: Some(total) });
            return evs;
        }
        if let Some(rest) = line.strip_prefix(RESULT_MARKER) {
            self.output = Some(PathBuf::from(rest.trim()));
            return self.stages.close(at);
        }
        if let Some(rest) = line.strip_prefix(ERROR_MARKER) {
            let msg = rest.trim();
            self.error = Some(if msg.is_empty() { "MuseTalk reported an error with no message".into() } else { msg.to_string() });
            return self.stages.close(at);
        }
        match MARKERS.iter().find(|(m, _)| line.starts_with(m)) {
            Some((_, stage)) => {
                if *stage == "unet_inference" && self.batches.is_none() {
                    self.batches = Some((0, at));
                }
                self.stages.enter(stage, at)
            }
            None => Vec::new(),
        }
    }

    fn finish(&mut self, at: Instant) -> Vec<StageEvent> {
        self.stages.close(at)
    }

    fn reported_output(&self) -> Option<PathBuf> {
        self.output.clone()
    }

    fn reported_error(&self) -> Option<String> {
        self.error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ev: &[StageEvent]) -> Vec<String> {
        ev.iter()
            .map(|e| match e {
                StageEvent::Start { name, .. } => format!("+{name}"),
                StageEvent::End { name, .. } => format!("-{name}"),
                StageEvent::Progress { done, total } => format!("{done}/{}", total.unwrap_or(0)),
                StageEvent::FirstFrame { .. } => "first".into(),
                StageEvent::Batch { .. } => "batch".into(),
            })
            .collect()
    }

    #[test]
    fn real_marker_sequence_gives_stages_in_order() {
        let t = Instant::now();
        let mut p = MuseTalkParser::default();
        let mut ev = p.begin(t);
        for (s, l) in [
            (Stream::Stdout, "Loads checkpoint by local backend from path: ./models/dwpose/dw-ll_ucoco_384.pth"),
            (Stream::Stdout, "load unet model from ./models/musetalkV15/unet.pth"),
            (Stream::Stdout, "Loaded inference config: {'task_0': {'video_path': 'v.mp4'}}"),
            (Stream::Stdout, "Extracting landmarks... time-consuming operation"),
            (Stream::Stderr, " 50%|#####     | 25/50 [00:01<00:01, 20.1it/s]"),
            (Stream::Stdout, "Number of frames: 50"),
            (Stream::Stdout, "Starting inference"),
            (Stream::Stdout, "Padding generated images to original video size"),
            (Stream::Stdout, "Video generation command: ffmpeg -y ..."),
            (Stream::Stdout, "Audio combination command: ffmpeg -y ..."),
            (Stream::Stdout, "Results saved to ./r/v15/a_b.mp4"),
        ] {
            ev.extend(p.line(s, l, t));
        }
        ev.extend(p.finish(t));
        assert_eq!(
            names(&ev),
            [
                "+model_loading", "-model_loading", "+frame_and_audio_extraction", "-frame_and_audio_extraction", "+face_detection", "25/50",
                "-face_detection", "+latent_encoding", "-latent_encoding", "+unet_inference", "-unet_inference", "+blending", "-blending",
                "+video_encoding", "-video_encoding", "+audio_mux", "-audio_mux"
            ]
        );
        assert_eq!(p.reported_output(), Some(PathBuf::from("./r/v15/a_b.mp4")));
        assert_eq!(p.reported_error(), None);
    }

    #[test]
    fn unet_tqdm_steps_are_batches_and_the_first_is_the_first_frame() {
        let t = Instant::now();
        let at = |ms: u64| t + std::time::Duration::from_millis(ms);
        let mut p = MuseTalkParser::default();
        p.begin(t);
        p.line(Stream::Stdout, "Starting inference", at(0));
        assert_eq!(p.line(Stream::Stderr, "  0%|          | 0/4 [00:00<?, ?it/s]", at(10)), vec![StageEvent::Progress { done: 0, total: Some(4) }]);
        assert_eq!(
            p.line(Stream::Stderr, " 25%|##        | 1/4 [00:00<00:00,  7.0it/s]", at(200)),
            vec![StageEvent::FirstFrame { at: at(200) }, StageEvent::Batch { seconds: 0.2 }, StageEvent::Progress { done: 1, total: Some(4) }]
        );
        // Two steps drawn at once share the time since the last one.
        let ev = p.line(Stream::Stderr, " 75%|######    | 3/4 [00:00<00:00,  7.0it/s]", at(500));
        assert_eq!(ev, vec![StageEvent::Batch { seconds: 0.15 }, StageEvent::Batch { seconds: 0.15 }, StageEvent::Progress { done: 3, total: Some(4) }]);
        // A stray bar's jump is no batch.
        assert_eq!(p.line(Stream::Stderr, " 99%|######### | 4000000/4000001 [00:00<00:00]", at(550)), vec![StageEvent::Progress { done: 4000000, total: Some(4000001) }]);
        // Bars of other stages are progress only.
        p.line(Stream::Stdout, "Padding generated images to original video size", at(600));
        assert_eq!(p.line(Stream::Stderr, " 10%|#         | 5/50 [00:00<00:00]", at(700)), vec![StageEvent::Progress { done: 5, total: Some(50) }]);
    }

    #[test]
    fn error_line_with_exit_zero_is_a_failure() {
        let t = Instant::now();
        let mut p = MuseTalkParser::default();
        p.begin(t);
        p.line(Stream::Stdout, "Loaded inference config: {}", t);
        let ev = p.line(Stream::Stdout, "Error occurred during processing: division by zero", t);
        assert_eq!(names(&ev), ["-frame_and_audio_extraction"]);
        assert_eq!(p.reported_error().as_deref(), Some("division by zero"));
        p.line(Stream::Stdout, "Error occurred during processing: ", t);
        assert_eq!(p.reported_error().as_deref(), Some("MuseTalk reported an error with no message"));
    }

    #[test]
    fn output_formula_uses_the_stem_up_to_the_first_dot() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            c: Config,
        }
        let c = Cli::parse_from(["x", "--backend", "musetalk", "--musetalk-dir", "/m"]).c;
        let m = MuseTalk::new(&c);
        let job = JobInput {
            job_id: "j".into(),
            dir: "/data/jobs/j".into(),
            video: "/data/jobs/j/v_j.take1.mp4".into(),
            audio: "/data/jobs/j/a_j.wav".into(),
            video_info: Default::default(),
            audio_info: Default::default(),
            bbox_shift: Some(-3),
            batch_size: Some(4),
            avatar_id: None,
            profile: false,
            stream: false,
        };
        assert_eq!(m.expected_output(&job), PathBuf::from("/data/jobs/j/result/v15/v_j_a_j.mp4"));
    }
}
