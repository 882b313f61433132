//! The embedded default backend: real media work with ffmpeg, no model — in memory bounded by a constant, whatever the clip's length.
//!
//! The input video is played forward then backward and looped to the audio's length
//! (MuseTalk cycles its frames the same way), re-encoded as H.264/yuv420p with the
//! input audio muxed in. Every step, span and metric is exercised for real; responses
//! name the backend, so nobody mistakes it for lip-sync.
//!
//! Playing a clip backward means holding frames: ffmpeg's `reverse` keeps every frame
//! it is given (60 s of 1080p30 is 5.9 GiB). So the render is planned ([`plan`]) against
//! a frame budget: a clip as long as the audio plays forward only; a short clip loops in
//! one ffmpeg run; a long one is reversed in chunks that fit the budget, joined into one
//! forward/backward segment on disk, and that segment is looped by re-reading it. The
//! passes run in `musetalk-sidecar preview-render` ([`render`]), a child of the job's
//! own process group, so a job is still one process to time, kill and account for.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use futures::future::BoxFuture;

use super::stages::FfmpegProgress;
use super::{Backend, Invocation, JobInput, PipelineError, ProcessOutcome, StageParser};
use crate::config::Config;

/// Decoded frames one render may hold at once (yuv420p), beyond ffmpeg's own buffers.
pub const FRAME_BUDGET_BYTES: u64 = 256 << 20;
/// The frame rate of clips that state none, and of stills.
const DEFAULT_FPS: f64 = 25.0;
/// The most frames ffmpeg's `loop` filter holds.
const MAX_LOOP_FRAMES: u64 = 32767;

pub struct Preview {
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
    env: Vec<(String, String)>,
    /// This binary, which runs the render's passes (`preview-render`).
    exe: PathBuf,
}

impl Preview {
    pub fn new(config: &Config) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("musetalk-sidecar"));
        Preview { ffmpeg: config.ffmpeg.clone(), ffprobe: config.ffprobe.clone(), env: config.pipeline_env_pairs(), exe }
    }

    /// Where the preview render lands inside the job dir.
    pub fn output_path(job: &JobInput) -> PathBuf {
        job.result_dir().join("preview.mp4")
    }

    /// The output's length: the audio's, to the millisecond (as `-t` is given).
    fn seconds(job: &JobInput) -> f64 {
        (job.audio_info.duration_secs * 1000.0).round() / 1000.0
    }

    /// The output's frame rate: the clip's own (rounded to 0.001), or 25.
    fn fps(job: &JobInput) -> f64 {
        job.video_info.fps.filter(|f| f.is_finite() && *f > 0.0 && !job.video_info.is_still()).map(|f| (f * 1000.0).round() / 1000.0).unwrap_or(DEFAULT_FPS)
    }
}

/// Frames a render of `seconds` at `fps` produces (`-t` stops at the first frame past it).
pub fn expected_frames(seconds: f64, fps: f64) -> u64 {
    (seconds * fps).ceil().max(1.0) as u64
}

/// What `preview-render` is asked to make: everything is known from the job's probes,
/// so the render never probes again.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct Render {
    #[arg(long)]
    pub ffmpeg: PathBuf,
    #[arg(long)]
    pub video: PathBuf,
    #[arg(long)]
    pub audio: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Directory for intermediate files (the job's result dir).
    #[arg(long)]
    pub work: PathBuf,
    /// Output frame rate.
    #[arg(long)]
    pub fps: f64,
    /// Output length: the audio's.
    #[arg(long)]
    pub seconds: f64,
    /// The clip's length (0 for a still).
    #[arg(long)]
    pub video_seconds: f64,
    /// The clip's displayed size (for the frame budget).
    #[arg(long)]
    pub width: u32,
    #[arg(long)]
    pub height: u32,
    /// The clip is one picture.
    #[arg(long)]
    pub still: bool,
    /// Frame budget in bytes (tests make it small to exercise the chunked plan).
    #[arg(long, default_value_t = FRAME_BUDGET_BYTES)]
    pub budget: u64,
    /// Write the output as fragmented MP4 (a fragment every half second, written as it is
    /// encoded), for a streamed answer that follows the file as it grows.
    #[arg(long)]
    pub fragmented: bool,
}

/// One ffmpeg run of a plan, or a file the plan writes first.
#[derive(Debug, Clone, PartialEq)]
pub enum Pass {
    Ffmpeg { what: String, args: Vec<String> },
    WriteFile { path: PathBuf, contents: String },
}

const HEAD: [&str; 7] = ["-hide_banner", "-nostdin", "-y", "-v", "error", "-xerror", "-i"];

fn s(v: &str) -> String {
    v.to_string()
}

fn p(v: &Path) -> String {
    v.display().to_string()
}

/// Even dimensions (H.264 in yuv420p needs them) and the output rate from timestamps —
/// `fps=` keeps a variable-frame-rate clip's real timing, where renumbering frames at
/// a nominal rate played it fast.
fn video_filter(fps: f64) -> String {
    // 8-bit 4:2:0 before anything holds frames: the budget counts frames in it (a 10-bit
    // or 4:4:4 source would otherwise be held at 2–4× the budget).
    format!("scale=trunc(iw/2)*2:trunc(ih/2)*2,fps={fps},format=yuv420p")
}

/// The final encode settings (the job's output).
fn encode_args(r: &Render) -> Vec<String> {
    let mut a: Vec<String> = ["-map", "[v]", "-map", "1:a:0", "-t"].iter().map(|x| s(x)).collect();
    a.push(format!("{:.3}", r.seconds));
    a.extend(["-r", &format!("{}", r.fps), "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k"].iter().map(|x| s(x)));
    if r.fragmented {
        // A keyframe (and so a fragment) every half second, no encoder look-ahead: each
        // fragment is written as soon as its frames are encoded.
        let gop = ((r.fps / 2.0).round() as u64).max(1).to_string();
        a.extend(["-tune", "zerolatency", "-g", &gop, "-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-flush_packets", "1"].iter().map(|x| s(x)));
    } else {
        a.extend(["-movflags", "+faststart"].iter().map(|x| s(x)));
    }
    // Progress every 0.1 s: its first `frame=` is the job's first frame out.
    a.extend(["-stats_period", "0.1", "-progress", "pipe:1", "-nostats"].iter().map(|x| s(x)));
    a.push(p(&r.out));
    a
}

/// Intermediate segments: near-lossless, fast, one codec and rate so they join by copy.
fn segment_args(out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["-an", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", "yuv420p"].iter().map(|x| s(x)).collect();
    a.push(p(out));
    a
}

/// The passes that render `r` within its frame budget.
pub fn plan(r: &Render) -> Vec<Pass> {
    let frame_bytes = (u64::from(r.width.max(2)) * u64::from(r.height.max(2)) * 3 / 2).max(1);
    let fits = r.budget / frame_bytes;
    let clip_frames = (r.video_seconds * r.fps).ceil() as u64;
    let vf = video_filter(r.fps);
    let single = |graph: String, input_opts: &[&str], source: &Path| {
        let mut args: Vec<String> = HEAD[..6].iter().map(|x| s(x)).collect();
        args.extend(input_opts.iter().map(|x| s(x)));
        args.extend([s("-i"), p(source), s("-i"), p(&r.audio), s("-filter_complex"), graph]);
        args.extend(encode_args(r));
        args
    };
    // A still: its one frame, repeated.
    if r.still {
        let graph = format!("[0:v]scale=trunc(iw/2)*2:trunc(ih/2)*2,loop=loop=-1:size=1:start=0,setpts=N/({}*TB),format=yuv420p[v]", r.fps);
        return vec![Pass::Ffmpeg { what: "render".into(), args: single(graph, &[], &r.video) }];
    }
    // The audio ends before the clip does: forward only, nothing held.
    if r.seconds <= r.video_seconds {
        return vec![Pass::Ffmpeg { what: "render".into(), args: single(format!("[0:v]{vf},format=yuv420p[v]"), &[], &r.video) }];
    }
    // Forward and backward held at once: fine for a short clip.
    // ffmpeg's `loop` filter holds at most 32767 frames.
    if 2 * clip_frames.max(1) <= fits.min(MAX_LOOP_FRAMES) {
        let loop_size = 2 * clip_frames.max(1);
        let graph = format!("[0:v]{vf},split=2[f][b];[b]reverse[r];[f][r]concat=n=2:v=1:a=0,loop=loop=-1:size={loop_size}:start=0,setpts=N/({}*TB),format=yuv420p[v]", r.fps);
        return vec![Pass::Ffmpeg { what: "render".into(), args: single(graph, &[], &r.video) }];
    }
    // A long clip: reverse it in chunks that fit, join forward + backward on disk, loop
    // that by re-reading it. The forward segment is made first, at the output rate with a
    // keyframe at every chunk start, and the chunks are cut from it: whole frames on an
    // exact grid (cut from the source, the rate conversion shifted chunk edges by a frame).
    let chunk_frames = fits.max(1);
    let chunks = clip_frames.max(1).div_ceil(chunk_frames);
    let mut passes = Vec::new();
    let forward = r.work.join("pingpong-forward.mp4");
    let mut args: Vec<String> = HEAD.iter().map(|x| s(x)).collect();
    args.extend([p(&r.video), s("-vf"), format!("{vf},format=yuv420p"), s("-g"), chunk_frames.to_string()]);
    args.extend(segment_args(&forward));
    passes.push(Pass::Ffmpeg { what: "forward segment".into(), args });
    // Names relative to the list's own directory (the concat demuxer resolves them there).
    let listed = |f: &Path| format!("file '{}'\n", f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let mut list = listed(&forward);
    for i in (0..chunks).rev() {
        // From half a frame before the chunk's first frame to half a frame before the
        // next chunk's: no rounding can take a neighbour's frame in or leave one out.
        let start = ((i * chunk_frames) as f64 - 0.5).max(0.0) / r.fps;
        let length = (((i + 1) * chunk_frames) as f64 - 0.5) / r.fps - start;
        let part = r.work.join(format!("pingpong-reverse-{i:05}.mp4"));
        let mut args: Vec<String> = HEAD[..6].iter().map(|x| s(x)).collect();
        args.extend([s("-ss"), format!("{start:.6}"), s("-t"), format!("{length:.6}"), s("-i"), p(&forward), s("-vf"), s("reverse")]);
        args.extend(segment_args(&part));
        passes.push(Pass::Ffmpeg { what: format!("reverse chunk {} of {chunks}", chunks - i), args });
        list.push_str(&listed(&part));
    }
    let list_path = r.work.join("pingpong.txt");
    passes.insert(0, Pass::WriteFile { path: list_path.clone(), contents: list });
    let pingpong = r.work.join("pingpong.mp4");
    let mut args: Vec<String> = HEAD[..6].iter().map(|x| s(x)).collect();
    args.extend([s("-f"), s("concat"), s("-safe"), s("0"), s("-i"), p(&list_path), s("-c"), s("copy"), p(&pingpong)]);
    passes.push(Pass::Ffmpeg { what: "join forward and backward".into(), args });
    // `-stream_loop -1` re-reads the segment from disk; setpts renumbers across loops.
    let graph = format!("[0:v]setpts=N/({}*TB),format=yuv420p[v]", r.fps);
    passes.push(Pass::Ffmpeg { what: "render".into(), args: single(graph, &["-stream_loop", "-1"], &pingpong) });
    passes
}

/// `musetalk-sidecar preview-render`: runs the plan's passes one after another with this
/// process's stdout and stderr (the last pass's `-progress` lines are the job's progress,
/// ffmpeg's errors its error tail), removes the intermediates, and exits with the first
/// failing pass's status.
pub fn render(r: Render) -> ExitCode {
    let passes = plan(&r);
    let total = passes.iter().filter(|p| matches!(p, Pass::Ffmpeg { .. })).count();
    let mut temps = Vec::new();
    let mut n = 0;
    let mut result = ExitCode::SUCCESS;
    for pass in passes {
        match pass {
            Pass::WriteFile { path, contents } => {
                if let Err(e) = std::fs::write(&path, contents) {
                    eprintln!("preview-render: cannot write {}: {e}", path.display());
                    result = ExitCode::FAILURE;
                    break;
                }
                temps.push(path);
            }
            Pass::Ffmpeg { what, args } => {
                n += 1;
                let status = std::process::Command::new(&r.ffmpeg).args(&args).stdin(std::process::Stdio::null()).status();
                if let Some(out) = args.last().map(PathBuf::from).filter(|o| *o != r.out) {
                    temps.push(out);
                }
                match status {
                    Ok(s) if s.success() => {}
                    Ok(s) => {
                        eprintln!("preview-render: ffmpeg failed in pass {n} of {total} ({what}): {s}");
                        result = ExitCode::from(s.code().and_then(|c| u8::try_from(c).ok()).filter(|c| *c != 0).unwrap_or(1));
                        break;
                    }
                    Err(e) => {
                        eprintln!("preview-render: cannot run `{}`: {e}", r.ffmpeg.display());
                        result = ExitCode::from(127);
                        break;
                    }
                }
            }
        }
    }
    for t in temps {
        let _ = std::fs::remove_file(t);
    }
    result
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
    fn cheap_trial(&self) -> bool {
        true
    }

    fn runs_python(&self) -> bool {
        false
    }

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
        let fps = Self::fps(job);
        let mut args = vec![
            s("preview-render"),
            s("--ffmpeg"),
            p(&self.ffmpeg),
            s("--video"),
            p(&job.video),
            s("--audio"),
            p(&job.audio),
            s("--out"),
            p(&Self::output_path(job)),
            s("--work"),
            p(&job.result_dir()),
            s("--fps"),
            format!("{fps}"),
            s("--seconds"),
            format!("{:.3}", Self::seconds(job)),
            s("--video-seconds"),
            // The video stream's own length (the container's may include a longer audio track).
            format!("{:.3}", v.frames.filter(|_| !v.is_still()).map(|n| n as f64 / fps).unwrap_or(v.duration_secs)),
            s("--width"),
            v.width.unwrap_or(2).to_string(),
            s("--height"),
            v.height.unwrap_or(2).to_string(),
        ];
        if v.is_still() {
            args.push(s("--still"));
        }
        if job.stream {
            args.push(s("--fragmented"));
        }
        Ok(Invocation { program: p(&self.exe), args, cwd: job.dir.clone(), env: self.env.clone() })
    }

    fn stage_parser(&self, job: &JobInput) -> Box<dyn StageParser> {
        Box::new(FfmpegProgress::new("video_encoding", Some(expected_frames(Self::seconds(job), Self::fps(job)))))
    }

    fn discover(&self, job: &JobInput, outcome: &ProcessOutcome, _: &dyn StageParser) -> Result<PathBuf, PipelineError> {
        // A render stopped before its own clean-up leaves its intermediates: never keep them.
        for e in std::fs::read_dir(job.result_dir()).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("pingpong") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        super::require_clean_exit(outcome)?;
        let _ = &self.ffprobe;
        super::require_output(&Self::output_path(job))
    }

    fn expected_output(&self, job: &JobInput) -> Option<super::ExpectedOutput> {
        let fps = Self::fps(job);
        Some(super::ExpectedOutput { seconds: Self::seconds(job), frames: expected_frames(Self::seconds(job), fps), fps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(seconds: f64, video_seconds: f64, size: (u32, u32)) -> Render {
        Render {
            ffmpeg: "ffmpeg".into(),
            video: "/j/v.mp4".into(),
            audio: "/j/a.wav".into(),
            out: "/j/result/preview.mp4".into(),
            work: "/j/result".into(),
            fps: 30.0,
            seconds,
            video_seconds,
            width: size.0,
            height: size.1,
            still: false,
            budget: FRAME_BUDGET_BYTES,
            fragmented: false,
        }
    }

    fn graphs(passes: &[Pass]) -> Vec<String> {
        passes
            .iter()
            .filter_map(|p| match p {
                Pass::Ffmpeg { args, .. } => args.iter().position(|a| a == "-filter_complex" || a == "-vf").map(|i| args[i + 1].clone()),
                Pass::WriteFile { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_clip_longer_than_the_audio_plays_forward_and_holds_nothing() {
        let passes = plan(&render(60.0, 60.0, (1920, 1080)));
        assert_eq!(passes.len(), 1);
        assert!(!graphs(&passes)[0].contains("reverse") && !graphs(&passes)[0].contains("loop"), "{passes:?}");
    }

    #[test]
    fn a_short_clip_loops_in_memory_in_one_run() {
        let passes = plan(&render(10.0, 2.0, (256, 256)));
        assert_eq!(passes.len(), 1);
        let g = &graphs(&passes)[0];
        assert!(g.contains("reverse") && g.contains("loop=loop=-1:size=120"), "{g}");
        let Pass::Ffmpeg { args, .. } = &passes[0] else { panic!() };
        assert!(args.contains(&"-xerror".to_string()), "a decode error fails the render");
        assert_eq!(args.last().unwrap(), "/j/result/preview.mp4");
    }

    #[test]
    fn a_long_clip_is_reversed_in_chunks_that_fit_the_budget() {
        // 60 s of 1080p30 forward and back would be 11 GiB of frames.
        let r = render(150.0, 60.0, (1920, 1080));
        let passes = plan(&r);
        let frame_bytes = 1920 * 1080 * 3 / 2;
        let chunk_frames = FRAME_BUDGET_BYTES / frame_bytes;
        let chunks = (60.0 * 30.0 / chunk_frames as f64).ceil() as usize;
        // list, forward, the chunks, join, render
        assert_eq!(passes.len(), 1 + 1 + chunks + 1 + 1, "{passes:#?}");
        let Pass::WriteFile { contents, .. } = &passes[0] else { panic!("{passes:?}") };
        let files: Vec<&str> = contents.lines().collect();
        assert!(files[0].contains("pingpong-forward") && files[1].contains(&format!("pingpong-reverse-{:05}", chunks - 1)) && files.last().unwrap().contains("pingpong-reverse-00000"), "{contents}");
        for (i, pass) in passes.iter().enumerate().filter(|(_, p)| matches!(p, Pass::Ffmpeg { what, .. } if what.starts_with("reverse"))) {
            let Pass::Ffmpeg { args, .. } = pass else { unreachable!() };
            let t: f64 = args[args.iter().position(|a| a == "-t").unwrap() + 1].parse().unwrap();
            assert!((t * 30.0).round() as u64 <= chunk_frames, "pass {i} reverses {t} s: more than the budget holds");
            assert!(args.iter().any(|a| a.ends_with("pingpong-forward.mp4")), "chunks are cut from the forward segment");
        }
        let Pass::Ffmpeg { args, .. } = passes.last().unwrap() else { panic!() };
        assert!(args.windows(2).any(|w| w == ["-stream_loop", "-1"]), "the segment is looped by re-reading it");
        assert!(!graphs(&passes).last().unwrap().contains("reverse"));
    }

    #[test]
    fn the_in_memory_loop_respects_ffmpegs_frame_limit() {
        // 64x64 frames are tiny, but 10 minutes forward and back are 36000 frames: more
        // than `loop` holds, so the clip goes the chunked way.
        let passes = plan(&render(1200.0, 600.0, (64, 64)));
        assert!(passes.len() > 1, "{:?}", &passes[..1]);
        // And frames are held as 8-bit 4:2:0 whatever the source (the budget counts that).
        let short = plan(&render(10.0, 2.0, (256, 256)));
        let g = &graphs(&short)[0];
        assert!(g.find("format=yuv420p").unwrap() < g.find("split").unwrap(), "{g}");
    }

    #[test]
    fn a_still_repeats_its_frame() {
        let mut r = render(3.0, 0.0, (180, 320));
        r.still = true;
        let passes = plan(&r);
        assert_eq!(passes.len(), 1);
        assert!(graphs(&passes)[0].contains("loop=loop=-1:size=1"), "{passes:?}");
    }

    #[test]
    fn the_render_rounds_up_to_whole_frames() {
        assert_eq!(expected_frames(3.0, 25.0), 75);
        assert_eq!(expected_frames(3.01, 25.0), 76);
        assert_eq!(expected_frames(0.01, 25.0), 1);
    }
}
