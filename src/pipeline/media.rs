//! Media probing: what an upload really is (streams, duration, frames), and whether the
//! stream a job will use decodes. The rules live here; the facts come from a
//! [`Prober`](super::prober::Prober) (the persistent helper, or ffprobe per file), in
//! ffprobe's own schema, so both give the same answers.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::prober::{Prober, Query};

/// What ffprobe says about a file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MediaInfo {
    pub format: String,
    pub duration_secs: f64,
    pub size_bytes: u64,
    pub has_video: bool,
    pub has_audio: bool,
    /// The displayed size (a phone clip's rotation applied, as ffmpeg decodes it).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<f64>,
    /// Frames of the video stream, when known (the header's count, or counted packets).
    pub frames: Option<u64>,
    /// Clockwise rotation the player applies (display matrix), in degrees; 0 when none.
    #[serde(default)]
    pub rotation: i32,
    /// Where the duration came from: the container or stream header, or packets counted
    /// to the end (a browser's MediaRecorder writes no duration at all).
    #[serde(default)]
    pub duration_source: DurationSource,
}

/// How a [`MediaInfo`]'s duration is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurationSource {
    /// The container header (`format.duration`).
    #[default]
    Container,
    /// A stream header (`stream.duration`), the container having none.
    Stream,
    /// Measured: the stream's packets read to the end (last timestamp + its duration).
    Measured,
    /// A still image: one frame, no duration of its own.
    Still,
    /// Nothing said how long it lasts and measuring found no packet.
    Unknown,
}

impl MediaInfo {
    /// A single picture (png, jpeg, …): it has a frame but no duration of its own.
    pub fn is_still(&self) -> bool {
        self.duration_source == DurationSource::Still
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run ffprobe ({0}): install ffmpeg or set --ffprobe")]
    Spawn(std::io::Error),
    #[error("reading the file took longer than {0:?}")]
    Timeout(Duration),
    /// The probe helper died reading this file (a decoder bug hit by a crafted input):
    /// the helper is restarted, the file refused.
    #[error("the media reader crashed on it ({0})")]
    Crashed(String),
    #[error("not a readable media file: {0}")]
    Unreadable(String),
    /// The headers read, but the stream a job would use does not decode.
    #[error("cannot be decoded: {0}")]
    Undecodable(String),
}

/// What a probe reports, in ffprobe's JSON schema (the `-show_entries` it is asked for): ffprobe
/// prints it, the probe helper builds it, [`interpret`] reads it.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Probe {
    #[serde(default)]
    pub streams: Vec<ProbeStream>,
    pub format: Option<ProbeFormat>,
    /// Decoded frames, when asked for (`-show_entries frame=media_type`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<serde_json::Value>,
}

/// One stream, as ffprobe prints it (numbers it prints as strings stay strings; `N/A` is
/// absent).
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ProbeStream {
    pub codec_type: Option<String>,
    pub codec_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    pub avg_frame_rate: Option<String>,
    pub r_frame_rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nb_frames: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub side_data_list: Vec<SideData>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct SideData {
    pub rotation: Option<f64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ProbeFormat {
    pub format_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
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
    let p = parse_report(json)?;
    let decoded = p.frames.len();
    Ok((interpret(p, size_bytes), decoded))
}

/// ffprobe's `-of json` report.
pub fn parse_report(json: &str) -> Result<Probe, ProbeError> {
    serde_json::from_str(json).map_err(|e| ProbeError::Unreadable(format!("unexpected ffprobe output: {e}")))
}

/// What a probe's report means for a job: which streams count, the displayed size, the
/// duration and where it came from, the frame count.
pub fn interpret(p: Probe, size_bytes: u64) -> MediaInfo {
    // A stream counts only with a codec ffmpeg knows (and, for video, a picture size):
    // ffprobe lists `unknown` or 0x0 streams that no pipeline can decode (found by fuzzing).
    let known = |s: &&ProbeStream| s.codec_name.as_deref().is_some_and(|c| !c.is_empty() && c != "unknown");
    let video = p.streams.iter().filter(known).find(|s| s.codec_type.as_deref() == Some("video") && s.width.unwrap_or(0) > 0 && s.height.unwrap_or(0) > 0);
    let audio = p.streams.iter().filter(known).find(|s| s.codec_type.as_deref() == Some("audio"));
    let positive = |d: Option<&str>| d?.parse::<f64>().ok().filter(|d| d.is_finite() && *d > 0.0);
    let stream_duration = p.streams.iter().filter_map(|s| positive(s.duration.as_deref())).reduce(f64::max);
    let container_duration = p.format.as_ref().and_then(|f| positive(f.duration.as_deref()));
    let format = p.format.and_then(|f| f.format_name).unwrap_or_default();
    // An image demuxer (`png_pipe`, `image2`, …): one picture, no time of its own.
    let still = video.is_some() && (format == "image2" || format.ends_with("_pipe"));
    let (duration, duration_source) = match (container_duration, stream_duration) {
        _ if still => (0.0, DurationSource::Still),
        (Some(d), _) => (d, DurationSource::Container),
        (None, Some(d)) => (d, DurationSource::Stream),
        (None, None) => (0.0, DurationSource::Unknown),
    };
    let fps = video.and_then(|v| rate(v.avg_frame_rate.as_deref()).or_else(|| rate(v.r_frame_rate.as_deref())));
    // Only a count the file states: fps × duration is wrong for variable frame rates.
    let frames = if still { Some(1) } else { video.and_then(|v| v.nb_frames.as_deref()?.parse().ok()).filter(|n| *n > 0) };
    let rotation = video.and_then(|v| v.side_data_list.iter().find_map(|d| d.rotation)).map(|r| (r.round() as i32).rem_euclid(360)).unwrap_or(0);
    let (mut width, mut height) = (video.and_then(|v| v.width), video.and_then(|v| v.height));
    if rotation == 90 || rotation == 270 {
        std::mem::swap(&mut width, &mut height);
    }
    MediaInfo { format, duration_secs: duration, size_bytes, has_video: video.is_some(), has_audio: audio.is_some(), width, height, fps, frames, rotation, duration_source }
}

/// `pts,duration` lines (either may be `N/A`) → span and count (separate from running
/// ffprobe, so it is unit-tested).
pub fn packet_span(csv: &str) -> Option<(f64, u64)> {
    span_of(csv.lines().filter_map(|line| {
        let mut cols = line.split(',');
        let pts = cols.next()?.trim().parse::<f64>().ok()?;
        Some((pts, cols.next().and_then(|d| d.trim().parse::<f64>().ok()).unwrap_or(0.0)))
    }))
}

/// Packets' `(pts, duration)` in seconds (those without a timestamp left out) → `(seconds
/// from the first timestamp to the end of the last packet, packets)`.
pub fn span_of(packets: impl IntoIterator<Item = (f64, f64)>) -> Option<(f64, u64)> {
    let (mut first, mut end, mut count) = (f64::INFINITY, f64::NEG_INFINITY, 0u64);
    for (pts, dur) in packets {
        first = first.min(pts);
        end = end.max(pts + dur);
        count += 1;
    }
    (count > 0 && end > first).then(|| (end - first, count))
}

/// Fills in what the headers did not say by reading the used stream's packets: the
/// duration (a MediaRecorder webm has none anywhere) and the video frame count (mkv and
/// webm state none, and fps × duration is wrong for variable frame rates).
async fn complete(prober: &Prober, path: &Path, video: bool, info: &mut MediaInfo) -> Result<(), ProbeError> {
    let has = if video { info.has_video } else { info.has_audio };
    let unknown_duration = info.duration_source == DurationSource::Unknown;
    let uncounted = video && info.frames.is_none() && !info.is_still();
    if !has || !(unknown_duration || uncounted) {
        return Ok(());
    }
    // Demuxing only (no decoding), so a 10-minute recording costs tens of milliseconds.
    let Some((seconds, packets)) = prober.ask(Query::Packets { video }, path).await?.span else { return Ok(()) };
    if unknown_duration {
        info.duration_secs = seconds;
        info.duration_source = DurationSource::Measured;
    }
    if video {
        info.frames = Some(packets);
    }
    Ok(())
}

/// What an ffmpeg tool's stderr says went wrong: its distinct messages, the last three,
/// without the `[mov,mp4 @ 0x…] ` and `path: ` prefixes. The cause usually comes first
/// ("moov atom not found") and the generic verdict last ("Invalid data found when
/// processing input"): the last line alone hid the cause.
pub fn reason(stderr: &[u8], fallback: &str) -> String {
    let err = String::from_utf8_lossy(stderr);
    let mut messages: Vec<String> = Vec::new();
    for line in err.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let line = match line.strip_prefix('[').and_then(|r| r.split_once("] ")) {
            Some((ctx, rest)) if ctx.contains(" @ ") => rest,
            _ => line,
        };
        let msg = line.rsplit_once(": ").map(|(_, r)| r).unwrap_or(line).trim().to_string();
        if !msg.is_empty() && !messages.contains(&msg) {
            messages.push(msg);
        }
    }
    if messages.is_empty() {
        return fallback.to_string();
    }
    messages[messages.len().saturating_sub(3)..].join("; ")
}

/// Demuxers whose input names other files (playlists, edit lists, compositions).
const REFERENCING: &[&str] = &["hls", "concat", "dash", "imf"];

/// Probes an upload and decodes the start of the stream a job will use: the first
/// video stream's first 10 packets, or the first audio stream's first 2 s. Headers
/// alone can lie: a file ffprobe reads may not decode, and the job would then fail
/// with a server error instead of a 400 (found by fuzzing). One query does both.
pub async fn probe_decoding(prober: &Prober, path: &Path, video: bool) -> Result<MediaInfo, ProbeError> {
    let size = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
    let answer = prober.ask(Query::Decode { video }, path).await?;
    let mut info = interpret(answer.probe, size);
    // A playlist or composition is a list of other files: an upload must be media itself
    // (a local m3u8 would otherwise hand the pipeline another job's upload).
    if REFERENCING.contains(&info.format.as_str()) {
        return Err(ProbeError::Unreadable(format!("a `{}` file refers to other files; upload the media itself", info.format)));
    }
    // Without the stream the caller's "has no video/audio stream" is the clearer error.
    if (video && info.has_video) || (!video && info.has_audio) {
        if !answer.errors.trim().is_empty() {
            return Err(ProbeError::Undecodable(reason(answer.errors.as_bytes(), "decoding failed")));
        }
        if answer.decoded == 0 {
            return Err(ProbeError::Undecodable("no frame of its first stream decodes".into()));
        }
    }
    complete(prober, path, video, &mut info).await?;
    Ok(info)
}

/// Probes `path` (headers, then the packets where the headers state no duration or frame
/// count: for a pipeline's output and an avatar's streams).
pub async fn probe(prober: &Prober, path: &Path) -> Result<MediaInfo, ProbeError> {
    let size = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
    let mut info = interpret(prober.ask(Query::Headers, path).await?.probe, size);
    complete(prober, path, info.has_video, &mut info).await?;
    Ok(info)
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
    fn rotation_stills_and_missing_durations() {
        // A portrait phone clip: stored 1920x1080, displayed rotated.
        let json = r#"{"streams":[{"codec_type":"video","codec_name":"h264","width":1920,"height":1080,"avg_frame_rate":"30/1","nb_frames":"60","side_data_list":[{"rotation":-90}]}],"format":{"format_name":"mov,mp4","duration":"2.0"}}"#;
        let m = parse_probe(json, 0).unwrap();
        assert_eq!((m.width, m.height, m.rotation), (Some(1080), Some(1920), 270));
        assert_eq!(m.duration_source, DurationSource::Container);
        // A still: one frame, no duration of its own.
        let m = parse_probe(r#"{"streams":[{"codec_type":"video","codec_name":"png","width":180,"height":320,"r_frame_rate":"25/1"}],"format":{"format_name":"png_pipe"}}"#, 0).unwrap();
        assert!(m.is_still());
        assert_eq!((m.frames, m.duration_secs), (Some(1), 0.0));
        // A MediaRecorder webm: no duration anywhere, no frame count.
        let m = parse_probe(r#"{"streams":[{"codec_type":"video","codec_name":"vp8","width":160,"height":120,"avg_frame_rate":"30/1"},{"codec_type":"audio","codec_name":"opus"}],"format":{"format_name":"matroska,webm"}}"#, 0).unwrap();
        assert_eq!((m.duration_source, m.frames), (DurationSource::Unknown, None));
        // Stream durations when the container has none.
        let m = parse_probe(r#"{"streams":[{"codec_type":"audio","codec_name":"opus","duration":"4.5"}],"format":{"format_name":"ogg"}}"#, 0).unwrap();
        assert_eq!((m.duration_source, m.duration_secs), (DurationSource::Stream, 4.5));
    }

    #[test]
    fn packet_spans_measure_from_the_first_timestamp_to_the_end_of_the_last_packet() {
        let (secs, n) = packet_span("-0.006500,0.020000\n0.013500,0.020000\n2.993500,0.020000\n").unwrap();
        assert!((secs - 3.02).abs() < 1e-9, "{secs}");
        assert_eq!(n, 3);
        assert_eq!(packet_span("N/A,N/A\n0.5,N/A\n1.0,0.04\n").map(|(s, n)| ((s * 100.0).round(), n)), Some((54.0, 2)));
        assert_eq!(packet_span(""), None);
        assert_eq!(packet_span("0.0,0.0\n"), None, "no time at all is not a duration");
    }

    #[test]
    fn the_reason_keeps_the_cause_before_the_verdict() {
        let err = b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d1c2a0] moov atom not found\n/data/jobs/x/video_x.mp4: Invalid data found when processing input\n";
        assert_eq!(reason(err, "?"), "moov atom not found; Invalid data found when processing input");
        assert_eq!(reason(b"", "ffprobe failed"), "ffprobe failed");
        assert_eq!(reason(b"a: one\nb: one\nc: two\n", "?"), "one; two", "repeats are said once");
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
        let ffprobe = &Prober::ffprobe(Path::new("ffprobe"), Duration::from_secs(30));
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
