//! The one door for multipart uploads: a declarative form ([`Form`]), one reader that streams files to the job dir and checks every part, one flow from admission to refusal ([`accept`]).
//!
//! A route says which parts it takes; everything else — duplicate, unknown, missing and
//! empty parts, bounded text, numbers in range, the probe that decodes the start of each
//! media part, the admission place, the job and its `file_processing` span, and throwing
//! all of it away on a refusal — happens here, the same for every upload route.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::Multipart;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::http::StatusCode;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::http::{ApiError, AppState};
use crate::jobs::avatars::Reservation;
use crate::jobs::{Admission, Job};
use crate::pipeline::MediaInfo;
use crate::pipeline::media::{self, ProbeError};
use crate::telemetry;

/// Longest accepted text part (`avatar_id`, numbers), in bytes.
const MAX_TEXT_FIELD: usize = 256;
/// Audio shorter than one frame at 25 fps yields no video at all.
pub const MIN_AUDIO_SECONDS: f64 = 0.04;

/// A media part: streamed to the job dir under a generated name, then probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    Video,
    Audio,
}

impl Media {
    pub fn name(self) -> &'static str {
        match self {
            Media::Video => "video",
            Media::Audio => "audio",
        }
    }
    /// Extensions kept from the client's file name (anything else gets the default).
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Media::Video => &["mp4", "mov", "avi", "mkv", "webm", "m4v"],
            Media::Audio => &["wav", "mp3", "m4a", "aac", "flac", "ogg", "opus"],
        }
    }
    fn default_extension(self) -> &'static str {
        match self {
            Media::Video => "mp4",
            Media::Audio => "wav",
        }
    }
    fn invalid(self) -> &'static str {
        match self {
            Media::Video => "invalid_video",
            Media::Audio => "invalid_audio",
        }
    }
}

/// What one part of a form may be.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Media(Media),
    /// An integer in `min..=max`; anything else is a 400 with `code`.
    Int { code: &'static str, min: i64, max: i64 },
    /// `avatar_id`: 1–64 of `[A-Za-z0-9_-]` (it names a directory). With `reserve`, the id
    /// is reserved the moment the part is read (a taken id is refused before a video sent
    /// after it is read).
    AvatarId { reserve: bool },
    /// `true`/`false` (or `1`/`0`); anything else is a 400 with `code`.
    Flag { code: &'static str },
}

#[derive(Clone, Copy, Debug)]
pub struct Part {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
}

/// The parts a route takes, in the order their errors are reported.
pub struct Form(pub &'static [Part]);

const VIDEO: Part = Part { name: "video", kind: Kind::Media(Media::Video), required: true };
const AUDIO: Part = Part { name: "audio", kind: Kind::Media(Media::Audio), required: true };
const BBOX_SHIFT: Part = Part { name: "bbox_shift", kind: Kind::Int { code: "invalid_bbox_shift", min: -200, max: 200 }, required: false };
const BATCH_SIZE: Part = Part { name: "batch_size", kind: Kind::Int { code: "invalid_batch_size", min: 1, max: 256 }, required: false };
const PROFILE: Part = Part { name: "profile", kind: Kind::Flag { code: "invalid_profile" }, required: false };
const STREAM: Part = Part { name: "stream", kind: Kind::Flag { code: "invalid_stream" }, required: false };

/// `POST /v1/inference`.
pub const INFERENCE: Form = Form(&[VIDEO, AUDIO, Part { name: "avatar_id", kind: Kind::AvatarId { reserve: false }, required: false }, BBOX_SHIFT, BATCH_SIZE, PROFILE]);
/// `POST /v1/avatars`.
pub const PREPARE: Form = Form(&[VIDEO, Part { name: "avatar_id", kind: Kind::AvatarId { reserve: true }, required: true }, BBOX_SHIFT]);
/// `POST /v1/avatars/{id}/speak`.
pub const SPEAK: Form = Form(&[AUDIO, BATCH_SIZE, PROFILE, STREAM]);

/// Error codes the upload routes can answer with a 400 (for the OpenAPI descriptions).
pub const UPLOAD_400: &str = "Bad input: `invalid_multipart`, `duplicate_part`, `unknown_part`, `missing_part`, `empty_file`, `invalid_video`, `invalid_audio`, `invalid_avatar_id`, `invalid_bbox_shift`, `invalid_batch_size`, `invalid_profile`, `invalid_stream`, `field_too_long`, `invalid_utf8`";

impl Form {
    fn part(&self, name: &str) -> Option<&'static Part> {
        self.0.iter().find(|p| p.name == name)
    }

    fn names(&self) -> String {
        self.0.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }

    /// "`video` and `audio` parts": what a non-multipart request should have sent.
    fn required(&self) -> String {
        let names: Vec<String> = self.0.iter().filter(|p| p.required).map(|p| format!("`{}`", p.name)).collect();
        match names.as_slice() {
            [one] => format!("{} {one} part", if one.trim_start_matches('`').starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }),
            many => format!("{} parts", many.join(" and ")),
        }
    }

    /// The body, or `415 not_multipart` naming the parts this route takes.
    pub fn multipart(&self, m: Result<Multipart, MultipartRejection>) -> Result<Multipart, ApiError> {
        m.map_err(|e| ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_multipart", format!("send multipart/form-data with {} ({e})", self.required())))
    }
}

/// A form as received and checked: files on disk and probed, numbers in range.
#[derive(Default)]
pub struct Received<'a> {
    media: Vec<(Media, PathBuf, MediaInfo)>,
    ints: Vec<(&'static str, i64)>,
    flags: Vec<(&'static str, bool)>,
    texts: Vec<(&'static str, String)>,
    reservation: Option<Reservation<'a>>,
}

impl<'a> Received<'a> {
    /// A media part's file and probe (present when the form requires it).
    pub fn media(&self, m: Media) -> Option<(PathBuf, MediaInfo)> {
        self.media.iter().find(|(k, _, _)| *k == m).map(|(_, p, i)| (p.clone(), i.clone()))
    }
    pub fn int(&self, name: &str) -> Option<i64> {
        self.ints.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
    /// A flag part's value (`false` when not sent).
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, v)| *n == name && *v)
    }
    pub fn text(&self, name: &str) -> Option<String> {
        self.texts.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    }
    /// The avatar id reserved while the form was read (forms with `reserve`).
    pub fn take_reservation(&mut self) -> Option<Reservation<'a>> {
        self.reservation.take()
    }
}

/// An accepted upload: its admission place, its job (created, not started), its form,
/// and how long receiving took (the `file_processing` step).
pub struct Accepted<'a> {
    pub admission: Admission,
    pub job: Arc<Job>,
    pub form: Received<'a>,
    pub receive_seconds: f64,
}

/// Admits (before a byte is read: a full service refuses at once, with `Retry-After`),
/// creates the job and its `file_processing` span, reads `form` within `--upload-timeout`.
/// On a refusal the spans say why and the job (never work) and its files go.
pub async fn accept<'a>(st: &'a AppState, mode: crate::mode::Mode, mut multipart: Multipart, form: &Form) -> Result<Accepted<'a>, ApiError> {
    let admission = st.jobs.admit(mode).map_err(|e| {
        let retry = st.jobs.retry_after_secs(mode);
        ApiError::from(e).with_retry_after(retry)
    })?;
    let job = st.jobs.create(mode)?;
    let span = job.file_processing_span();
    let t0 = Instant::now();
    let limit = st.config.upload_timeout;
    let read = tokio::time::timeout(limit, read(st, &job, &mut multipart, form)).instrument(span.clone()).await.unwrap_or_else(|_| {
        Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "upload_timeout", format!("the upload did not complete within {} (--upload-timeout)", humantime::format_duration(limit))))
    });
    match read {
        Ok(received) => {
            // Unsigned integers would be exported as strings: OTLP integers are i64.
            for (m, _, info) in &received.media {
                span.record(format!("musetalk.input.{}.bytes", m.name()).as_str(), info.size_bytes as i64);
                span.record(format!("musetalk.input.{}.seconds", m.name()).as_str(), info.duration_secs);
            }
            Ok(Accepted { admission, job, form: received, receive_seconds: t0.elapsed().as_secs_f64() })
        }
        Err(e) => {
            telemetry::set_error(&span, e.detail.clone());
            drop(span);
            Err(refuse(st, &job, e))
        }
    }
}

/// Throws away an accepted upload that cannot go on (its job and files), with the reason on its span.
pub fn refuse(st: &AppState, job: &Job, e: ApiError) -> ApiError {
    telemetry::set_error(&job.span(), e.detail.clone());
    job.span().record("musetalk.outcome", "rejected");
    st.jobs.discard(job);
    e
}

/// Streams the parts to the job dir (never whole in memory), then checks and probes them.
async fn read<'a>(st: &'a AppState, job: &Job, multipart: &mut Multipart, form: &Form) -> Result<Received<'a>, ApiError> {
    let bad = |code: &'static str, detail: String| ApiError::bad_request(code, detail);
    let mut r = Received::default();
    let mut files: Vec<(Media, PathBuf, u64)> = Vec::new();
    let mut seen: Vec<&'static str> = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(|e| bad("invalid_multipart", format!("the multipart body is malformed: {}", e.body_text())))? {
        let name = field.name().unwrap_or_default().to_string();
        let Some(part) = form.part(&name) else {
            return Err(bad("unknown_part", format!("unexpected part `{name}`; expected {}", form.names())));
        };
        if seen.contains(&part.name) {
            return Err(bad("duplicate_part", format!("part `{name}` was sent twice")));
        }
        seen.push(part.name);
        match part.kind {
            Kind::Media(m) => {
                let (path, bytes) = save(st, job, field, m).await?;
                files.push((m, path, bytes));
            }
            Kind::Int { code, min, max } => {
                let v = text(field).await?;
                let n = v.trim().parse::<i64>().ok().filter(|n| (min..=max).contains(n)).ok_or_else(|| bad(code, format!("{} must be an integer from {min} to {max}, got `{v}`", part.name)))?;
                r.ints.push((part.name, n));
            }
            Kind::Flag { code } => {
                let v = text(field).await?;
                let on = match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad(code, format!("{} must be `true` or `false`, got `{v}`", part.name))),
                };
                r.flags.push((part.name, on));
            }
            Kind::AvatarId { reserve } => {
                let v = text(field).await?;
                valid_avatar_id(&v)?;
                if reserve {
                    r.reservation = Some(st.jobs.avatars().reserve(&v)?);
                }
                r.texts.push((part.name, v));
            }
        }
    }
    if let Some(p) = form.0.iter().find(|p| p.required && !seen.contains(&p.name)) {
        return Err(bad("missing_part", format!("the `{}` part is required", p.name)));
    }
    // Problems are reported in the form's order, whatever order the parts came in.
    files.sort_by_key(|(m, _, _)| form.0.iter().position(|p| matches!(p.kind, Kind::Media(k) if k == *m)));
    if let Some((m, _, _)) = files.iter().find(|(_, _, bytes)| *bytes == 0) {
        return Err(bad("empty_file", format!("the `{}` part is empty", m.name())));
    }
    let probes = futures::future::join_all(files.iter().map(|(m, path, _)| probe(st, *m, path))).await;
    for ((m, path, _), info) in files.into_iter().zip(probes) {
        r.media.push((m, path, info?));
    }
    Ok(r)
}

/// Writes one file part under the job dir with a generated name (`{kind}_{job}.{ext}`):
/// the client's file name never reaches the filesystem, only an allow-listed extension.
async fn save(st: &AppState, job: &Job, mut field: Field<'_>, m: Media) -> Result<(PathBuf, u64), ApiError> {
    let kind = m.name();
    let ext = field
        .file_name()
        .and_then(|n| Path::new(n).extension())
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .filter(|e| m.extensions().contains(&e.as_str()))
        .unwrap_or_else(|| m.default_extension().to_string());
    let path = job.dir.join(format!("{kind}_{}.{ext}", job.id));
    let file = tokio::fs::File::create(&path).await.map_err(|e| crate::http::storage_error(e, "creating the upload file"))?;
    // tokio::fs runs every write on the blocking pool: batch the small multipart chunks
    // into 1 MiB writes (bounded memory, far fewer thread hops).
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let limit = st.config.max_upload_bytes;
    let mut written: u64 = 0;
    while let Some(chunk) = field.chunk().await.map_err(|e| ApiError::bad_request("invalid_multipart", format!("reading the `{kind}` part: {}", e.body_text())))? {
        written += chunk.len() as u64;
        if written > limit {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "file_too_large", format!("the `{kind}` part exceeds {limit} bytes (--max-upload-bytes)")));
        }
        file.write_all(&chunk).await.map_err(|e| crate::http::storage_error(e, "writing the upload"))?;
    }
    file.flush().await.map_err(|e| crate::http::storage_error(e, "writing the upload"))?;
    Ok((path, written))
}

/// A bounded text part (UTF-8).
async fn text(mut field: Field<'_>) -> Result<String, ApiError> {
    let name = field.name().unwrap_or_default().to_string();
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))? {
        if buf.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(ApiError::bad_request("field_too_long", format!("`{name}` is longer than {MAX_TEXT_FIELD} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| ApiError::bad_request("invalid_utf8", format!("`{name}` is not valid UTF-8")))
}

/// `avatar_id`: 1–64 of `[A-Za-z0-9_-]` (it names a directory).
pub fn valid_avatar_id(v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(ApiError::bad_request("invalid_avatar_id", "avatar_id must be 1–64 characters of A–Z, a–z, 0–9, `_` or `-`"));
    }
    Ok(())
}

/// ffprobe of an uploaded part, decoding the start of the stream a job will use: a 400
/// naming the part when it is not media, does not decode, or lacks its stream.
async fn probe(st: &AppState, m: Media, path: &Path) -> Result<MediaInfo, ApiError> {
    let (part, code) = (m.name(), m.invalid());
    let info = media::probe_decoding(st.jobs.prober(), path, m == Media::Video).await.map_err(|e| match e {
        ProbeError::Unreadable(why) => ApiError::bad_request(code, format!("the `{part}` part is not a readable media file: {why}")),
        ProbeError::Undecodable(why) => ApiError::bad_request(code, format!("the `{part}` part cannot be decoded: {why}")),
        ProbeError::Timeout(limit) => ApiError::bad_request(code, format!("the `{part}` part could not be read within {} s", limit.as_secs_f64())),
        ProbeError::Crashed(how) => ApiError::bad_request(code, format!("the `{part}` part crashed the media reader ({how}); it is not a file this service can read safely")),
        other => ApiError::internal(format!("probing the `{part}` part: {other}")),
    })?;
    match m {
        Media::Video if !info.has_video => Err(ApiError::bad_request(code, "the `video` part has no video stream")),
        Media::Audio if info.has_audio && info.duration_secs < MIN_AUDIO_SECONDS => {
            Err(ApiError::bad_request(code, format!("the `audio` part lasts {:.3} s, shorter than one video frame ({MIN_AUDIO_SECONDS} s)", info.duration_secs)))
        }
        Media::Audio if !info.has_audio || info.duration_secs <= 0.0 => Err(ApiError::bad_request(code, "the `audio` part has no audio stream (or no duration)")),
        _ => Ok(info),
    }
}

#[cfg(test)]
mod tests {
    //! The upload door through the real router (`app()` + `oneshot`): every refusal code
    //! from one table, each leaving no job dir behind.

    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use clap::Parser;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const B: &str = "XBOUNDARYX";

    enum P<'a> {
        File(&'a str, &'a str, Vec<u8>),
        Text(&'a str, Vec<u8>),
    }

    fn body(parts: &[P]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(format!("--{B}\r\n").as_bytes());
            let (head, data) = match p {
                P::File(name, file, data) => (format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n"), data.clone()),
                P::Text(name, data) => (format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"), data.clone()),
            };
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        out
    }

    /// A real 1-frame video, when ffmpeg is here (`None`: the probe cases are skipped).
    fn tiny_video(dir: &std::path::Path) -> Option<Vec<u8>> {
        let out = dir.join("tiny.mp4");
        let ok = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10", "-frames:v", "2", "-pix_fmt", "yuv420p"])
            .arg(&out)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| std::fs::read(&out).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_refusal_of_the_upload_door_from_one_table() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cli = crate::cli::Cli::try_parse_from(["musetalk-sidecar", "--data-dir", data.to_str().unwrap(), "--max-upload-bytes", "5000"]).unwrap();
        let config = Arc::new(cli.serve.resolved().unwrap());
        std::fs::create_dir_all(config.jobs_dir()).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let collector = crate::collector::Sampler::new(Vec::new(), metrics.clone(), config.ring_capacity(), config.sample_interval).handle();
        let state = crate::build_state(config.clone(), metrics, collector, crate::http::auth::Tokens::default(), false);
        let held = state.jobs.avatars().reserve("held").unwrap();
        let app = crate::http::app(state.clone());
        let video = tiny_video(dir.path());
        let junk = b"this is not media".to_vec();
        let wav = b"RIFF-not-really".to_vec();
        let some_video = video.clone().unwrap_or_else(|| junk.clone());

        let inf = "/v1/inference";
        let prep = "/v1/avatars";
        let cases: Vec<(&str, &str, Vec<P>, StatusCode, &str)> = vec![
            ("duplicate part", inf, vec![P::File("video", "v.mp4", junk.clone()), P::File("video", "v.mp4", junk.clone())], StatusCode::BAD_REQUEST, "duplicate_part"),
            ("unknown part", inf, vec![P::Text("colour", b"red".to_vec())], StatusCode::BAD_REQUEST, "unknown_part"),
            ("missing audio", inf, vec![P::File("video", "v.mp4", junk.clone())], StatusCode::BAD_REQUEST, "missing_part"),
            ("empty video", inf, vec![P::File("video", "v.mp4", vec![]), P::File("audio", "a.wav", wav.clone())], StatusCode::BAD_REQUEST, "empty_file"),
            ("video not media", inf, vec![P::File("video", "v.mp4", junk.clone()), P::File("audio", "a.wav", wav.clone())], StatusCode::BAD_REQUEST, "invalid_video"),
            ("bad avatar id", inf, vec![P::Text("avatar_id", b"../x".to_vec())], StatusCode::BAD_REQUEST, "invalid_avatar_id"),
            ("bbox out of range", inf, vec![P::Text("bbox_shift", b"500".to_vec())], StatusCode::BAD_REQUEST, "invalid_bbox_shift"),
            ("batch not a number", inf, vec![P::Text("batch_size", b"many".to_vec())], StatusCode::BAD_REQUEST, "invalid_batch_size"),
            ("profile not a flag", inf, vec![P::Text("profile", b"maybe".to_vec())], StatusCode::BAD_REQUEST, "invalid_profile"),
            ("text too long", inf, vec![P::Text("avatar_id", vec![b'a'; 300])], StatusCode::BAD_REQUEST, "field_too_long"),
            ("text not utf-8", inf, vec![P::Text("avatar_id", vec![0xff, 0xfe])], StatusCode::BAD_REQUEST, "invalid_utf8"),
            ("file too large", inf, vec![P::File("video", "v.mp4", vec![7; 6000])], StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
            ("prepare without id", prep, vec![P::File("video", "v.mp4", some_video.clone())], StatusCode::BAD_REQUEST, "missing_part"),
            ("prepare with an audio part", prep, vec![P::File("audio", "a.wav", wav.clone())], StatusCode::BAD_REQUEST, "unknown_part"),
            ("prepare a taken id", prep, vec![P::Text("avatar_id", b"held".to_vec()), P::File("video", "v.mp4", some_video.clone())], StatusCode::CONFLICT, "avatar_exists"),
            ("speak to no avatar", "/v1/avatars/nobody/speak", vec![P::File("audio", "a.wav", wav.clone())], StatusCode::NOT_FOUND, "avatar_not_found"),
        ];
        let mut cases = cases;
        if let Some(v) = &video {
            cases.push(("audio not media", inf, vec![P::File("video", "v.mp4", v.clone()), P::File("audio", "a.wav", wav.clone())], StatusCode::BAD_REQUEST, "invalid_audio"));
            cases.push(("audio is a video without sound", inf, vec![P::File("video", "v.mp4", v.clone()), P::File("audio", "a.mp4", v.clone())], StatusCode::BAD_REQUEST, "invalid_audio"));
        }
        let send = |path: &str, content_type: String, bytes: Vec<u8>| {
            let app = app.clone();
            let req = Request::post(path).header("content-type", content_type).body(Body::from(bytes)).unwrap();
            async move {
                let r = app.oneshot(req).await.unwrap();
                let status = r.status();
                let v: serde_json::Value = serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
                (status, v)
            }
        };
        let mut failures = Vec::new();
        for (name, path, parts, status, code) in cases {
            let (got, v) = send(path, format!("multipart/form-data; boundary={B}"), body(&parts)).await;
            if got != status || v["error"] != code || !v["detail"].as_str().is_some_and(|d| !d.is_empty()) {
                failures.push(format!("{name}: expected {status} {code}, got {got} {v}"));
            }
            let left: Vec<_> = std::fs::read_dir(config.jobs_dir()).unwrap().flatten().collect();
            if !left.is_empty() {
                failures.push(format!("{name}: left {} job dir(s)", left.len()));
                for d in left {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
        // Not multipart at all, and a multipart body that breaks off.
        let (got, v) = send(inf, "application/json".into(), b"{}".to_vec()).await;
        if got != StatusCode::UNSUPPORTED_MEDIA_TYPE || v["error"] != "not_multipart" || !v["detail"].as_str().unwrap_or_default().contains("`video` and `audio` parts") {
            failures.push(format!("not multipart: {got} {v}"));
        }
        let (got, v) = send(inf, format!("multipart/form-data; boundary={B}"), format!("--{B}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\nabc").into_bytes()).await;
        if got != StatusCode::BAD_REQUEST || v["error"] != "invalid_multipart" {
            failures.push(format!("cut-off multipart: {got} {v}"));
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(state.jobs.avatars().reserve("held").is_err(), "a refused prepare leaves the other's reservation alone");
        drop(held);
        if video.is_none() {
            eprintln!("ffmpeg not found: the probe cases were skipped");
        }
    }
}
