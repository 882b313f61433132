//! Test media made with real ffmpeg, shared by every test binary.
//!
//! Clips are named by what they are (`testsrc-128x128-25fps-2s.mp4`) and cached under
//! `CARGO_TARGET_TMPDIR/media`, so the suite makes each one once however many binaries
//! ask for it. Each is written under a unique temporary name and renamed into place:
//! binaries running side by side never read half a file.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::multipart::{Form, Part};

use super::service::Service;

/// The inputs most tests send.
pub struct Media {
    /// 2 s, 128×128, 25 fps H.264 (yuv420p), no audio stream.
    pub video: PathBuf,
    /// 3 s, 440 Hz sine, 16 kHz mono PCM.
    pub audio: PathBuf,
}

/// The standard pair: a job on it succeeds on every backend and its output lasts 3 s.
pub fn media() -> &'static Media {
    static MEDIA: OnceLock<Media> = OnceLock::new();
    MEDIA.get_or_init(|| Media { video: video(128, 128, 25, 2), audio: sine(440, 3, 16_000) })
}

/// `testsrc` at `width`×`height`, `fps`, `seconds` long: H.264, yuv420p, no audio.
pub fn video(width: u32, height: u32, fps: u32, seconds: u32) -> PathBuf {
    make(
        &format!("testsrc-{width}x{height}-{fps}fps-{seconds}s.mp4"),
        &[
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc=size={width}x{height}:rate={fps}"),
            "-t",
            &seconds.to_string(),
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ],
    )
}

/// A `frequency` Hz sine, `seconds` long, mono PCM WAV at `rate` Hz.
pub fn sine(frequency: u32, seconds: u32, rate: u32) -> PathBuf {
    make(
        &format!("sine-{frequency}hz-{seconds}s-{rate}.wav"),
        &[
            "-f",
            "lavfi",
            "-i",
            &format!("sine=frequency={frequency}:duration={seconds}"),
            "-ar",
            &rate.to_string(),
            "-ac",
            "1",
        ],
    )
}

/// A file part for a multipart form, sent under `name`.
pub fn file_part(path: &Path, name: &str) -> Part {
    Part::bytes(std::fs::read(path).unwrap()).file_name(name.to_string())
}

/// The container duration ffprobe reports, in seconds.
pub fn duration(path: &Path) -> f64 {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("run ffprobe (install ffmpeg)");
    assert!(out.status.success(), "ffprobe {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().unwrap_or_else(|e| panic!("ffprobe {}: duration {text:?}: {e}", path.display()))
}

/// Runs ffmpeg with `args` into the cache as `name`, unless it is there already.
pub fn make(name: &str, args: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("media");
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).unwrap();
    // Unique per process and per call, with the real extension last so ffmpeg picks the
    // container from it.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(".tmp-{}-{}-{name}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .arg(&tmp)
        .status()
        .expect("run ffmpeg (install ffmpeg)");
    assert!(status.success(), "ffmpeg {args:?} failed: {status}");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// An upload that holds its admission place until released: the standard video's part
/// streams its first KiB, then waits. A job is admitted before its upload is read, so
/// held uploads fill the queue deterministically.
pub struct HeldUpload {
    tx: futures::channel::mpsc::UnboundedSender<Result<Vec<u8>, std::io::Error>>,
    rest: Vec<u8>,
    response: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
}

/// Starts a `POST /v1/inference` of the standard pair that stops after 1 KiB of video.
pub fn hold_upload(svc: &Service) -> HeldUpload {
    let bytes = std::fs::read(&media().video).unwrap();
    let (first, rest) = bytes.split_at(1024);
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(Ok(first.to_vec())).unwrap();
    let video = Part::stream(reqwest::Body::wrap_stream(rx)).file_name("v.mp4");
    let form = Form::new().part("video", video).part("audio", file_part(&media().audio, "a.wav"));
    let request = svc.client().post(svc.url("/v1/inference")).multipart(form);
    HeldUpload { tx, rest: rest.to_vec(), response: tokio::spawn(request.send()) }
}

impl HeldUpload {
    /// Sends the rest of the upload; the handle answers with the job's response.
    pub fn release(self) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        self.tx.unbounded_send(Ok(self.rest)).unwrap();
        self.tx.close_channel();
        self.response
    }
}

/// What browsers, phones and editors produce, made with ffmpeg (each once per suite).
pub mod real_world {
    use std::path::PathBuf;

    pub const LAVFI: &str = "lavfi";

    /// A browser's MediaRecorder: VP8 + Opus in a live webm (no duration, no cues).
    pub fn recorder_webm() -> PathBuf {
        super::make(
            "rec-vp8-opus-live.webm",
            &["-f", LAVFI, "-i", "testsrc=size=160x120:rate=30", "-f", LAVFI, "-i", "sine=frequency=300:sample_rate=48000", "-t", "3", "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus", "-live", "1", "-f", "webm"],
        )
    }

    /// MediaRecorder audio only: Opus in a live webm, 4 s.
    pub fn recorder_opus() -> PathBuf {
        super::make("rec-opus-live.webm", &["-f", LAVFI, "-i", "sine=frequency=500:sample_rate=48000:duration=4", "-c:a", "libopus", "-live", "1", "-f", "webm"])
    }

    /// 1 s at 30 fps, then 3 s at 10 fps, in Matroska (no frame count in the header).
    pub fn vfr_mkv() -> PathBuf {
        super::make(
            "vfr-30-then-10fps.mkv",
            &["-f", LAVFI, "-i", "testsrc=size=128x96:rate=30", "-frames:v", "60", "-vf", "setpts='if(lt(N,30),N/30,1+(N-30)/10)/TB'", "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p"],
        )
    }

    /// A phone's portrait clip: stored 320x180 with a 90° display matrix.
    pub fn rotated_mp4() -> PathBuf {
        let plain = super::make("plain-320x180.mp4", &["-f", LAVFI, "-i", "testsrc=size=320x180:rate=30", "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p"]);
        super::make("phone-rotated-90.mp4", &["-i", plain.to_str().unwrap(), "-c", "copy", "-metadata:s:v:0", "rotate=90"])
    }

    pub fn portrait_png() -> PathBuf {
        super::make("portrait-180x320.png", &["-f", LAVFI, "-i", "testsrc=size=180x320", "-frames:v", "1"])
    }

    pub fn hevc10_mov() -> PathBuf {
        super::make("hevc-10bit.mov", &["-f", LAVFI, "-i", "testsrc=size=128x128:rate=25", "-t", "2", "-c:v", "libx265", "-x265-params", "log-level=error", "-pix_fmt", "yuv420p10le", "-tag:v", "hvc1"])
    }

    pub fn mp3_8k() -> PathBuf {
        super::make("mono-8k.mp3", &["-f", LAVFI, "-i", "sine=frequency=400:sample_rate=8000:duration=3", "-ac", "1", "-c:a", "libmp3lame"])
    }

    pub fn flac_51() -> PathBuf {
        super::make("surround-5.1.flac", &["-f", LAVFI, "-i", "sine=frequency=350:sample_rate=48000:duration=2.5", "-ac", "6", "-c:a", "flac"])
    }

    pub fn wav() -> PathBuf {
        super::sine(440, 3, 16_000)
    }

    /// Every kind above, named.
    pub fn all() -> Vec<(&'static str, PathBuf)> {
        vec![
            ("MediaRecorder webm (VP8+Opus, no duration)", recorder_webm()),
            ("MediaRecorder opus", recorder_opus()),
            ("variable frame rate mkv", vfr_mkv()),
            ("rotated phone mp4", rotated_mp4()),
            ("portrait png still", portrait_png()),
            ("10-bit HEVC mov", hevc10_mov()),
            ("8 kHz mp3", mp3_8k()),
            ("5.1 flac", flac_51()),
            ("16 kHz wav", wav()),
        ]
    }
}
