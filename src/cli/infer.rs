//! `musetalk-sidecar infer`: upload, follow the job's events, save the video, print the report.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use eventsource_stream::Eventsource;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::ACCEPT;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::client::{Client, ServerArgs};
use super::{CliError, human_bytes, report};

const EXAMPLES: &str = "\
Examples:
  # Lip-sync face.mp4 to speech.wav: saves face_speech.mp4 here, prints the report
  musetalk-sidecar infer --video face.mp4 --audio speech.wav

  # Choose the output (and overwrite it), tune MuseTalk
  musetalk-sidecar infer --video face.mp4 --audio speech.wav --out out/take2.mp4 --force \\
      --bbox-shift -7 --batch-size 16

  # The service's JSON report on stdout, for scripts
  musetalk-sidecar infer --video face.mp4 --audio speech.wav --json > report.json

  # A remote service that requires a token
  MUSETALK_SIDECAR_SERVER=http://gpu-box:8000 musetalk-sidecar infer \\
      --video face.mp4 --audio speech.wav --token-file ~/.musetalk-token

Upload and job progress go to stderr (a live bar on a terminal, a few plain lines
otherwise); the report goes to stdout. Ctrl-C cancels the job on the service.
Exit status: 0 the job succeeded and the video is saved, 1 the service or the job failed
(a failed job's report is still printed), 2 wrong arguments or input files.";

#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct InferArgs {
    /// Input video with the face to animate (mp4, mov, avi, mkv, webm or m4v).
    #[arg(long, value_name = "FILE")]
    pub video: PathBuf,

    /// Input speech (wav, mp3, m4a, aac, flac, ogg or opus); the output lasts as long as it.
    #[arg(long, value_name = "FILE")]
    pub audio: PathBuf,

    #[command(flatten)]
    pub server: ServerArgs,

    /// Where to save the lip-synced mp4 (a directory: saved in it under the default name). Default: VIDEO-STEM_AUDIO-STEM.mp4 in the current directory.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Overwrite the output file if it exists (without it, infer refuses before uploading).
    #[arg(long)]
    pub force: bool,

    /// Avatar id recorded with the job (1–64 characters of A–Z, a–z, 0–9, `_`, `-`).
    #[arg(long, value_name = "ID")]
    pub avatar_id: Option<String>,

    /// MuseTalk's bbox_shift: moves the mouth mask down (positive, mouth opens more) or up (negative), -200 to 200.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-200..=200))]
    pub bbox_shift: Option<i32>,

    /// MuseTalk's batch size (1 to 256); larger is faster and needs more GPU memory. Default: the service's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_size: Option<u32>,

    /// Take a Python profile of the job (py-spy on the service): the report lists the top
    /// functions per stage and links the profile (`/v1/jobs/ID/profile`, speedscope JSON).
    #[arg(long)]
    pub profile: bool,

    /// Print the service's JSON report (pretty-printed, stable field names) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: InferArgs) -> ExitCode {
    super::run_client(run(args))
}

/// An input file that exists and is a regular file, with its size.
fn input_file(path: &Path, flag: &str) -> Result<u64, CliError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(_) => Err(CliError::usage(format!("{flag} {} is not a file", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CliError::usage(format!("{flag} file {} does not exist", path.display()))),
        Err(e) => Err(CliError::usage(format!("cannot read {flag} file {}: {e}", path.display()))),
    }
}

/// `--out`, or `VIDEO-STEM_AUDIO-STEM.mp4` here; refused if it exists (unless `--force`).
fn output_path(args: &InferArgs) -> Result<PathBuf, CliError> {
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
    let default_name = format!("{}_{}.mp4", stem(&args.video), stem(&args.audio));
    let out = match &args.out {
        Some(o) if o.is_dir() => o.join(default_name),
        Some(o) => o.clone(),
        None => PathBuf::from(default_name),
    };
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(CliError::usage(format!("cannot save to {}: the directory {} does not exist (create it, or choose another --out)", out.display(), parent.display())));
    }
    if !args.force && std::fs::symlink_metadata(&out).is_ok() {
        return Err(CliError::usage(format!("{} already exists: pass --force to overwrite it, or --out to save elsewhere", out.display())));
    }
    Ok(out)
}

async fn run(args: InferArgs) -> Result<ExitCode, CliError> {
    let video_bytes = input_file(&args.video, "--video")?;
    let audio_bytes = input_file(&args.audio, "--audio")?;
    if video_bytes == 0 {
        return Err(CliError::usage(format!("--video file {} is empty", args.video.display())));
    }
    if audio_bytes == 0 {
        return Err(CliError::usage(format!("--audio file {} is empty", args.audio.display())));
    }
    let out = output_path(&args)?;
    let client = Client::new(&args.server)?;
    let ui = Ui::new();

    let (id, trace_id) = submit(&client, &args, video_bytes + audio_bytes, &ui).await?;
    ui.line(&format!("job {id} accepted (trace {trace_id})"));

    // From here on the job runs on the service: Ctrl-C cancels it there (once it has
    // ended, Ctrl-C only stops the download).
    let ended = AtomicBool::new(false);
    let result = tokio::select! {
        r = finish(&client, &args, &id, &trace_id, &out, &ui, &ended) => r,
        _ = tokio::signal::ctrl_c() => {
            ui.clear();
            let _ = std::fs::remove_file(partial_path(&out));
            if ended.load(Ordering::Acquire) {
                return Err(CliError { code: 130, message: format!("interrupted: job {id} has ended, but its video was not saved (`musetalk-sidecar report {id}` shows its report)") });
            }
            let _ = client.send(client.delete(&format!("/v1/jobs/{id}")).timeout(Duration::from_secs(15))).await;
            return Err(CliError { code: 130, message: format!("interrupted: job {id} was cancelled on the service") });
        }
    };
    ui.clear();
    result
}

/// Follows the job to its end, saves the video, prints the report.
async fn finish(client: &Client, args: &InferArgs, id: &str, trace_id: &str, out: &Path, ui: &Ui, ended: &AtomicBool) -> Result<ExitCode, CliError> {
    let (state, error) = follow(client, id, ui).await?;
    ended.store(true, Ordering::Release);
    ui.clear();

    let saved = if state == "succeeded" { Some(download(client, id, out, args.force, ui).await) } else { None };
    let fetched = report::fetch(client, id, args.json).await?;
    fetched.print()?;
    match saved {
        Some(Ok(bytes)) => {
            ui.line(&format!("saved {} ({})", out.display(), human_bytes(bytes)));
            Ok(ExitCode::SUCCESS)
        }
        Some(Err(e)) => Err(e),
        None => {
            let why = fetched.error().or(error).unwrap_or_else(|| "no error recorded".into());
            Err(CliError::failed(format!("job {id} {}: {why} (trace {trace_id}; the report above has the details)", state.replace('_', " "))))
        }
    }
}

/// The download's temporary name, beside `out` (hidden, per process).
fn partial_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output.mp4".into());
    out.with_file_name(format!(".{name}.{}.part", std::process::id()))
}

/// Uploads both files (streamed from disk, counting bytes for the bar) and submits
/// with `Prefer: respond-async`. Returns the job id and trace id.
async fn submit(client: &Client, args: &InferArgs, total: u64, ui: &Ui) -> Result<(String, String), CliError> {
    // A cheap request first: an unreachable service, a wrong --server or a missing token
    // is reported before a possibly large upload starts.
    let pre = client.send(client.head("/v1/jobs").timeout(Duration::from_secs(30))).await?;
    if !pre.status().is_success() {
        return Err(client.error_for(pre, None).await);
    }
    ui.start_bytes("upload", total);
    let mut form = Form::new().part("video", file_part(&args.video, "--video", ui).await?).part("audio", file_part(&args.audio, "--audio", ui).await?);
    if let Some(a) = &args.avatar_id {
        form = form.text("avatar_id", a.clone());
    }
    if let Some(b) = args.bbox_shift {
        form = form.text("bbox_shift", b.to_string());
    }
    if let Some(b) = args.batch_size {
        form = form.text("batch_size", b.to_string());
    }
    if args.profile {
        form = form.text("profile", "true");
    }
    if !ui.live {
        ui.line(&format!("uploading {} + {} ({}) to {}", args.video.display(), args.audio.display(), human_bytes(total), client.base()));
    }
    let sent = client.send(client.post("/v1/inference").header("Prefer", "respond-async").multipart(form)).await;
    ui.clear();
    let resp = sent?;
    // 202 (accepted, runs on) or, from a service that ignores Prefer, 200 with the finished job.
    if !resp.status().is_success() {
        return Err(client.error_for(resp, None).await);
    }
    let body: Value = resp.json().await.map_err(|e| CliError::failed(format!("the answer of {} to the upload is not JSON: {e}", client.base())))?;
    let id = body["job_id"].as_str().ok_or_else(|| CliError::failed(format!("the answer of {} to the upload has no job_id: {body}", client.base())))?;
    Ok((id.to_string(), body["trace_id"].as_str().unwrap_or("unknown").to_string()))
}

/// A multipart file part streamed from disk with a known length; every chunk read
/// moves the upload bar.
async fn file_part(path: &Path, flag: &str, ui: &Ui) -> Result<Part, CliError> {
    let file = tokio::fs::File::open(path).await.map_err(|e| CliError::usage(format!("cannot open {flag} file {}: {e}", path.display())))?;
    let len = file.metadata().await.map_err(|e| CliError::usage(format!("cannot read {flag} file {}: {e}", path.display())))?.len();
    let bar = ui.bar.clone();
    let counted = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect_ok(move |chunk| bar.inc(chunk.len() as u64));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "upload".into());
    Ok(Part::stream_with_length(reqwest::Body::wrap_stream(counted), len).file_name(name))
}

/// Follows `GET /v1/jobs/{id}/events` until `done`; returns its state and error. A
/// stream cut before `done` is reopened (the service starts each with a snapshot).
async fn follow(client: &Client, id: &str, ui: &Ui) -> Result<(String, Option<String>), CliError> {
    let mut tracker = Tracker::default();
    let mut lost = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(attempt)).await;
        }
        let resp = match client.send(client.get(&format!("/v1/jobs/{id}/events")).header(ACCEPT, "text/event-stream")).await {
            Ok(r) => r,
            Err(e) => {
                lost = e.message;
                continue;
            }
        };
        if !resp.status().is_success() {
            return Err(client.error_for(resp, Some(id)).await);
        }
        let mut events = resp.bytes_stream().eventsource();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    let data: Value = serde_json::from_str(&ev.data).unwrap_or_default();
                    if let Some(done) = tracker.event(&ev.event, &data, ui) {
                        return Ok(done);
                    }
                }
                Err(e) => {
                    lost = e.to_string();
                    break;
                }
            }
        }
        if lost.is_empty() {
            lost = "the service closed the stream".into();
        }
    }
    Err(CliError::failed(format!("lost the event stream of job {id} ({lost}); it may still be running: `musetalk-sidecar report {id}` once it ends")))
}

/// What the events said so far: drives the bar and the plain lines.
#[derive(Default)]
struct Tracker {
    /// Steps already printed (a reopened stream's snapshot repeats them).
    steps_done: Vec<String>,
    step: Option<String>,
    stage: Option<String>,
}

impl Tracker {
    /// Handles one event; `Some((state, error))` on `done`.
    fn event(&mut self, name: &str, d: &Value, ui: &Ui) -> Option<(String, Option<String>)> {
        let s = |k: &str| d[k].as_str().map(str::to_string);
        match name {
            "status" => {
                for step in d["steps"].as_array().into_iter().flatten() {
                    self.step_end(step["name"].as_str().unwrap_or("?"), step["seconds"].as_f64().unwrap_or(0.0), ui);
                }
                if d["state"] == "queued" {
                    ui.line("queued: waiting for a run slot");
                }
                self.stage = s("stage");
                let (done, total) = (d["progress"]["done"].as_u64(), d["progress"]["total"].as_u64());
                ui.show(self.stage.as_deref().or(self.step.as_deref()).unwrap_or("waiting"), done.zip(total));
            }
            "state" if d["state"] == "queued" && !self.steps_done.iter().any(|s| s == "queue_wait") => {
                ui.show("queued", None);
            }
            "step_start" => {
                self.step = s("step");
                ui.show(self.step.as_deref().unwrap_or("?"), None);
            }
            "step_end" => self.step_end(d["step"].as_str().unwrap_or("?"), d["seconds"].as_f64().unwrap_or(0.0), ui),
            "stage_start" => {
                self.stage = s("stage");
                ui.show(self.stage.as_deref().unwrap_or("?"), None);
            }
            "stage_end" => {
                ui.line(&format!("    {:<24} {:>9.3} s", d["stage"].as_str().unwrap_or("?"), d["seconds"].as_f64().unwrap_or(0.0)));
                self.stage = None;
                ui.show(self.step.as_deref().unwrap_or("running"), None);
            }
            "progress" => {
                let stage = s("stage").or_else(|| self.stage.clone()).or_else(|| self.step.clone()).unwrap_or_else(|| "running".into());
                let done = d["done"].as_u64().unwrap_or(0);
                ui.show(&stage, Some((done, d["total"].as_u64().unwrap_or(0))));
            }
            "done" => return Some((s("state").unwrap_or_else(|| "unknown".into()), s("error"))),
            _ => {}
        }
        None
    }

    fn step_end(&mut self, step: &str, seconds: f64, ui: &Ui) {
        if self.steps_done.iter().any(|s| s == step) {
            return;
        }
        self.steps_done.push(step.to_string());
        ui.line(&format!("  {step:<26} {seconds:>9.3} s"));
    }
}

/// Downloads the output to a partial file beside `out`, then moves it into place
/// (never over an existing file unless `force`). Returns the size.
async fn download(client: &Client, id: &str, out: &Path, force: bool, ui: &Ui) -> Result<u64, CliError> {
    let resp = client.send(client.get(&format!("/v1/jobs/{id}/output"))).await?;
    if !resp.status().is_success() {
        return Err(client.error_for(resp, Some(id)).await);
    }
    let partial = partial_path(out);
    let result = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(|e| CliError::usage(format!("cannot write {}: {e} (choose a writable --out)", partial.display())))?;
        ui.start_bytes("download", resp.content_length().unwrap_or(0));
        let mut body = resp.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| client.transport_error(&e))?;
            file.write_all(&chunk).await.map_err(|e| CliError::failed(format!("writing {}: {e}", partial.display())))?;
            written += chunk.len() as u64;
            ui.bar.inc(chunk.len() as u64);
        }
        file.flush().await.map_err(|e| CliError::failed(format!("writing {}: {e}", partial.display())))?;
        drop(file);
        place(&partial, out, force)?;
        Ok(written)
    }
    .await;
    ui.clear();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Moves the finished download into place; without `force`, a file that appeared at
/// `out` meanwhile is kept (hard link: atomic no-clobber).
fn place(partial: &Path, out: &Path, force: bool) -> Result<(), CliError> {
    if force {
        return std::fs::rename(partial, out).map_err(|e| CliError::failed(format!("cannot move the video to {}: {e}", out.display())));
    }
    match std::fs::hard_link(partial, out) {
        Ok(()) => {
            let _ = std::fs::remove_file(partial);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(CliError::usage(format!("{} appeared while the job ran: pass --force to overwrite it, or --out to save elsewhere", out.display())))
        }
        // A filesystem without hard links: check, then rename.
        Err(_) if std::fs::symlink_metadata(out).is_err() => std::fs::rename(partial, out).map_err(|e| CliError::failed(format!("cannot move the video to {}: {e}", out.display()))),
        Err(e) => Err(CliError::failed(format!("cannot save the video to {}: {e}", out.display()))),
    }
}

/// Progress on stderr: a live bar on a terminal; plain lines otherwise.
struct Ui {
    bar: ProgressBar,
    live: bool,
}

impl Ui {
    fn new() -> Self {
        let live = std::io::stderr().is_terminal();
        let bar = if live { ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()) } else { ProgressBar::hidden() };
        Ui { bar, live }
    }

    /// A line above the bar (or on its own when there is no bar).
    fn line(&self, s: &str) {
        if self.live {
            self.bar.println(s);
        } else {
            eprintln!("{s}");
        }
    }

    fn start_bytes(&self, what: &str, total: u64) {
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_prefix(what.to_string());
        self.bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        if self.live {
            self.bar.enable_steady_tick(Duration::from_millis(200));
        }
    }

    /// The current step or stage, with `done/total` when the pipeline reports it.
    fn show(&self, what: &str, progress: Option<(u64, u64)>) {
        if !self.live {
            return;
        }
        if self.bar.is_finished() {
            // Cleared after the upload: back in progress (elapsed counts from here).
            self.bar.reset();
        }
        let template = match progress {
            Some((_, total)) if total > 0 => "{spinner} {prefix:<24} [{bar:30}] {pos}/{len}  {elapsed}",
            _ => "{spinner} {prefix:<24} {elapsed}",
        };
        self.bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()).progress_chars("=> "));
        self.bar.set_prefix(what.to_string());
        match progress {
            Some((done, total)) if total > 0 => {
                self.bar.set_length(total);
                self.bar.set_position(done);
            }
            _ => {
                self.bar.unset_length();
            }
        }
        self.bar.enable_steady_tick(Duration::from_millis(120));
    }

    fn clear(&self) {
        self.bar.disable_steady_tick();
        if self.live {
            self.bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(video: &str, audio: &str, out: Option<&str>, force: bool) -> InferArgs {
        InferArgs {
            video: video.into(),
            audio: audio.into(),
            server: ServerArgs { server: "http://127.0.0.1:8000".into(), token_file: None },
            out: out.map(PathBuf::from),
            force,
            avatar_id: None,
            bbox_shift: None,
            batch_size: None,
            profile: false,
            json: false,
        }
    }

    #[test]
    fn default_output_is_video_stem_audio_stem_here() {
        assert_eq!(output_path(&args("/in/face.take1.mp4", "/in/speech.wav", None, false)).unwrap(), PathBuf::from("face.take1_speech.mp4"));
    }

    #[test]
    fn output_is_never_overwritten_silently() {
        let dir = std::env::temp_dir().join(format!("musetalk-cli-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let existing = dir.join("x.mp4");
        std::fs::write(&existing, b"keep").unwrap();
        let e = output_path(&args("v.mp4", "a.wav", existing.to_str(), false)).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("already exists") && e.message.contains("--force"), "{}", e.message);
        assert_eq!(output_path(&args("v.mp4", "a.wav", existing.to_str(), true)).unwrap(), existing);
        // A directory: the default name inside it.
        assert_eq!(output_path(&args("v.mp4", "a.wav", dir.to_str(), false)).unwrap(), dir.join("v_a.mp4"));
        let e = output_path(&args("v.mp4", "a.wav", Some("/nonexistent-dir/x.mp4"), false)).unwrap_err();
        assert!(e.message.contains("does not exist"), "{}", e.message);

        // place(): no-clobber unless forced.
        let partial = dir.join("p.part");
        std::fs::write(&partial, b"new").unwrap();
        assert_eq!(place(&partial, &existing, false).unwrap_err().code, 2);
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
        place(&partial, &existing, true).unwrap();
        assert_eq!(std::fs::read(&existing).unwrap(), b"new");
        let fresh = dir.join("fresh.mp4");
        std::fs::write(&partial, b"v").unwrap();
        place(&partial, &fresh, false).unwrap();
        assert!(!partial.exists() && fresh.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
