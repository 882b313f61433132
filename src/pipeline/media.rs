//! Media probing with ffprobe: what an upload really is (streams, duration, frames).

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
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    streams: Vec<ProbeStream>,
    format: Option<ProbeFormat>,
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
    Ok(MediaInfo {
        format: p.format.and_then(|f| f.format_name).unwrap_or_default(),
        duration_secs: duration,
        size_bytes,
        has_video: video.is_some(),
        has_audio: audio.is_some(),
        width: video.and_then(|v| v.width),
        height: video.and_then(|v| v.height),
        fps,
        frames,
    })
}

/// Runs ffprobe on `path` (bounded in time: a hostile file must not hang a job).
pub async fn probe(ffprobe: &Path, path: &Path) -> Result<MediaInfo, ProbeError> {
    let size = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
    let limit = Duration::from_secs(30);
    let out = tokio::process::Command::new(ffprobe)
        .args(["-v", "error", "-show_entries", "format=format_name,duration:stream=codec_type,codec_name,width,height,avg_frame_rate,r_frame_rate,nb_frames,duration", "-of", "json"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, out).await.map_err(|_| ProbeError::Timeout(limit))?.map_err(ProbeError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().last().unwrap_or("ffprobe failed").trim();
        // ffprobe prefixes errors with the path: keep only the reason.
        let reason = first.rsplit_once(": ").map(|(_, r)| r).unwrap_or(first);
        return Err(ProbeError::Unreadable(reason.to_string()));
    }
    parse_probe(&String::from_utf8_lossy(&out.stdout), size)
}

/// Decodes the start of a file's video (first frame) or audio (first 2 s) with ffmpeg,
/// failing on any decode error: ffprobe reads headers only, and a file it accepts can
/// still be undecodable (a job would then fail with a server error instead of a 400).
pub async fn decode_check(ffmpeg: &Path, path: &Path, video: bool) -> Result<(), String> {
    let limit = Duration::from_secs(30);
    let mut cmd = tokio::process::Command::new(ffmpeg);
    cmd.args(["-v", "error", "-xerror", "-nostdin", "-i"]).arg(path);
    if video {
        cmd.args(["-map", "0:v:0", "-frames:v", "1"]);
    } else {
        cmd.args(["-map", "0:a:0", "-t", "2"]);
    }
    cmd.args(["-f", "null", "-"]).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output()).await.map_err(|_| format!("decoding took longer than {limit:?}"))?.map_err(|e| format!("cannot run ffmpeg ({e})"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && err.trim().is_empty() {
        return Ok(());
    }
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("ffmpeg failed").trim();
    Err(last.rsplit_once(": ").map(|(_, r)| r).unwrap_or(last).to_string())
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
}
