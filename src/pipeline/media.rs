//! Media probing with ffprobe: what an upload really is (streams, duration, frames), and
//! whether the stream a job will use decodes.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What ffprobe says about a file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MediaInfo {
    pub format: String,
    pub duration_secs: f64,
    pub size_bytes: u64,
    pub has_video: bool,
    pub has_audio: bool,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<f64>,
    pub frames: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run ffprobe ({0}): install ffmpeg or set --ffprobe")]
    Spawn(std::io::Error),
    #[error("ffprobe took longer than {0:?}")]
    Timeout(Duration),
    #[error("not a readable media file: {0}")]
    Unreadable(String),
    /// The headers read, but the stream a job would use does not decode.
    #[error("cannot be decoded: {0}")]
    Undecodable(String),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    streams: Vec<ProbeStream>,
    format: Option<ProbeFormat>,
    /// Decoded frames, when asked for (`-show_entries frame=media_type`).
    #[serde(default)]
    frames: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct ProbeStream {
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    avg_frame_rate: Option<String>,
    r_frame_rate: Option<String>,
    nb_frames: Option<String>,
    duration: Option<String>,
}

#[derive(Deserialize)]
struct ProbeFormat {
    format_name: Option<String>,
    duration: Option<String>,
}

fn rate(s: Option<&str>) -> Option<f64> {
    let (n, d) = s?.split_once('/')?;
    let (n, d): (f64, f64) = (n.parse().ok()?, d.parse().ok()?);
    (d > 0.0 && n > 0.0).then_some(n / d)
}

/// Parses `ffprobe -of json` output (separate from running it, so it is unit-tested).
pub fn parse_probe(json: &str, size_bytes: u64) -> Result<MediaInfo, ProbeError> {
    parse_probe_frames(json, size_bytes).map(|(info, _)| info)
}

/// [`parse_probe`], and how many frames ffprobe decoded.
fn parse_probe_frames(json: &str, size_bytes: u64) -> Result<(MediaInfo, usize), ProbeError> {
    let p: Probe = serde_json::from_str(json).map_err(|e| ProbeError::Unreadable(format!("unexpected ffprobe output: {e}")))?;
    // A stream counts only with a codec ffmpeg knows (and, for video, a picture size):
    // ffprobe lists `unknown` or 0x0 streams that no pipeline can decode (found by fuzzing).
    let known = |s: &&ProbeStream| s.codec_name.as_deref().is_some_and(|c| !c.is_empty() && c != "unknown");
    let video = p.streams.iter().filter(known).find(|s| s.codec_type.as_deref() == Some("video") && s.width.unwrap_or(0) > 0 && s.height.unwrap_or(0) > 0);
    let audio = p.streams.iter().filter(known).find(|s| s.codec_type.as_deref() == Some("audio"));
    let stream_duration = p.streams.iter().filter_map(|s| s.duration.as_deref()?.parse::<f64>().ok()).fold(0.0, f64::max);
    let duration = p.format.as_ref().and_then(|f| f.duration.as_deref()?.parse::<f64>().ok()).filter(|d| d.is_finite() && *d > 0.0).unwrap_or(stream_duration);
    let fps = video.and_then(|v| rate(v.avg_frame_rate.as_deref()).or_else(|| rate(v.r_frame_rate.as_deref())));
    let frames = video.and_then(|v| v.nb_frames.as_deref()?.parse().ok()).or_else(|| fps.map(|f| (f * duration).round() as u64));
    let decoded = p.frames.len();
    Ok((MediaInfo {
        format: p.format.and_then(|f| f.format_name).unwrap_or_default(),
        duration_secs: duration,
        size_bytes,
        has_video: video.is_some(),
        has_audio: audio.is_some(),
        width: video.and_then(|v| v.width),
        height: video.and_then(|v| v.height),
        fps,
        frames,
    }, decoded))
}

/// The last line of an ffmpeg tool's stderr, without the `path: ` prefix it adds.
fn reason(stderr: &[u8], fallback: &str) -> String {
    let err = String::from_utf8_lossy(stderr);
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(fallback).trim();
    last.rsplit_once(": ").map(|(_, r)| r).unwrap_or(last).to_string()
}

/// Runs ffprobe with `args` then `path`, bounded in time (a hostile file must not hang a job).
async fn run_ffprobe(ffprobe: &Path, args: &[&str], path: &Path) -> Result<std::process::Output, ProbeError> {
    let limit = Duration::from_secs(30);
    let out = tokio::process::Command::new(ffprobe).args(args).arg(path).stdin(std::process::Stdio::null()).kill_on_drop(true).output();
    let out = tokio::time::timeout(limit, out).await.map_err(|_| ProbeError::Timeout(limit))?.map_err(ProbeError::Spawn)?;
    if !out.status.success() {
        return Err(ProbeError::Unreadable(reason(&out.stderr, "ffprobe failed")));
    }
    Ok(out)
}

const ENTRIES: &str = "format=format_name,duration:stream=codec_type,codec_name,width,height,avg_frame_rate,r_frame_rate,nb_frames,duration";

/// Probes an upload and decodes the start of the stream a job will use: the first
/// video stream's first 10 packets, or the first audio stream's first 2 s. Headers
/// alone can lie: a file ffprobe reads may not decode, and the job would then fail
/// with a server error instead of a 400 (found by fuzzing). One process does both,
/// because starting ffmpeg's tools is most of what a check costs.
pub async fn probe_decoding(ffprobe: &Path, path: &Path, video: bool) -> Result<MediaInfo, ProbeError> {
    let size = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
    let (stream, interval) = if video { ("v:0", "%+#10") } else { ("a:0", "%+2") };
    let entries = format!("{ENTRIES}:frame=media_type");
    let out = run_ffprobe(ffprobe, &["-v", "error", "-select_streams", stream, "-read_intervals", interval, "-show_entries", &entries, "-of", "json"], path).await?;
    let (info, decoded) = parse_probe_frames(&String::from_utf8_lossy(&out.stdout), size)?;
    // Without the stream the caller's "has no video/audio stream" is the clearer error.
    if (video && info.has_video) || (!video && info.has_audio) {
        if !String::from_utf8_lossy(&out.stderr).trim().is_empty() {
            return Err(ProbeError::Undecodable(reason(&out.stderr, "decoding failed")));
        }
        if decoded == 0 {
            return Err(ProbeError::Undecodable("no frame of its first stream decodes".into()));
        }
    }
    Ok(info)
}

/// Runs ffprobe on `path` (headers only: for a pipeline's output).
pub async fn probe(ffprobe: &Path, path: &Path) -> Result<MediaInfo, ProbeError> {
    let size = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
    let out = run_ffprobe(ffprobe, &["-v", "error", "-show_entries", ENTRIES, "-of", "json"], path).await?;
    parse_probe(&String::from_utf8_lossy(&out.stdout), size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_video_and_audio_streams() {
        let json = r#"{"streams":[{"codec_type":"video","codec_name":"h264","width":256,"height":256,"avg_frame_rate":"25/1","r_frame_rate":"25/1","nb_frames":"50","duration":"2.000000"},
            {"codec_type":"audio","codec_name":"aac","duration":"2.02"}],"format":{"format_name":"mov,mp4,m4a,3gp,3g2,mj2","duration":"2.020000"}}"#;
        let m = parse_probe(json, 1234).unwrap();
        assert!(m.has_video && m.has_audio);
        assert_eq!((m.width, m.height, m.fps, m.frames), (Some(256), Some(256), Some(25.0), Some(50)));
        assert!((m.duration_secs - 2.02).abs() < 1e-9);
        assert_eq!(m.size_bytes, 1234);
    }

    #[test]
    fn audio_only_and_missing_counts() {
        let m = parse_probe(r#"{"streams":[{"codec_type":"audio","codec_name":"pcm_s16le"}],"format":{"format_name":"wav","duration":"3.0"}}"#, 0).unwrap();
        assert!(!m.has_video && m.has_audio && m.frames.is_none());
        let m = parse_probe(r#"{"streams":[{"codec_type":"video","codec_name":"h264","width":2,"height":2,"avg_frame_rate":"0/0","r_frame_rate":"30000/1001"}],"format":{"duration":"N/A"}}"#, 0).unwrap();
        assert_eq!(m.duration_secs, 0.0);
        assert!((m.fps.unwrap() - 29.97).abs() < 0.01);
        assert!(parse_probe("not json", 0).is_err());
        // Streams no decoder can use are not streams.
        let m = parse_probe(r#"{"streams":[{"codec_type":"video","codec_name":"unknown","width":64,"height":64},{"codec_type":"audio"}],"format":{"duration":"1"}}"#, 0).unwrap();
        assert!(!m.has_video && !m.has_audio);
        let m = parse_probe(r#"{"streams":[{"codec_type":"video","codec_name":"vp8","width":0,"height":0}],"format":{"duration":"1"}}"#, 0).unwrap();
        assert!(!m.has_video);
    }

    #[test]
    fn counts_decoded_frames() {
        let json = r#"{"frames":[{"media_type":"video","side_data_list":[{}]},{"media_type":"video"}],"programs":[],
            "streams":[{"codec_type":"video","codec_name":"h264","width":128,"height":128}],"format":{"duration":"2.0"}}"#;
        let (m, decoded) = parse_probe_frames(json, 0).unwrap();
        assert!(m.has_video);
        assert_eq!(decoded, 2);
        assert_eq!(parse_probe_frames(r#"{"streams":[],"format":{}}"#, 0).unwrap().1, 0);
    }

    /// Real ffmpeg-made files through the real ffprobe (skipped where ffmpeg is missing).
    #[tokio::test]
    async fn probe_decoding_accepts_real_media_and_refuses_a_broken_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (v, a) = (dir.path().join("v.mp4"), dir.path().join("a.wav"));
        let made = |args: &[&str], out: &Path| std::process::Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).arg(out).status().is_ok_and(|s| s.success());
        if !made(&["-f", "lavfi", "-i", "testsrc=size=64x64:rate=10", "-f", "lavfi", "-i", "sine=duration=1", "-t", "1", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-c:a", "aac"], &v) {
            eprintln!("ffmpeg not found: skipped");
            return;
        }
        assert!(made(&["-f", "lavfi", "-i", "sine=duration=1"], &a));
        let ffprobe = Path::new("ffprobe");
        let info = probe_decoding(ffprobe, &v, true).await.unwrap();
        assert!(info.has_video && (info.duration_secs - 1.0).abs() < 0.1, "{info:?}");
        assert!(probe_decoding(ffprobe, &v, false).await.unwrap().has_audio, "the audio of a video file");
        assert!(probe_decoding(ffprobe, &a, false).await.unwrap().has_audio);
        assert!(!probe_decoding(ffprobe, &a, true).await.unwrap().has_video, "no stream is not a decode error");

        // Headers intact, the coded data overwritten: ffprobe reads it, nothing decodes.
        let mut bytes = std::fs::read(&v).unwrap();
        let mdat = bytes.windows(4).position(|w| w == b"mdat").expect("an mdat box");
        let end = (mdat + 4096).min(bytes.len());
        bytes[mdat + 8..end].iter_mut().for_each(|b| *b = 0xff);
        let broken = dir.path().join("broken.mp4");
        std::fs::write(&broken, &bytes).unwrap();
        match probe_decoding(ffprobe, &broken, true).await {
            Err(ProbeError::Undecodable(why)) => assert!(!why.is_empty()),
            other => panic!("a stream of garbage decoded: {other:?}"),
        }
    }
}
