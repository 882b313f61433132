//! Realtime routes: `/v1/avatars` (prepare, list, show, delete) and `/v1/avatars/{id}/speak`.

use std::time::Instant;

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::jobs::{AUDIO_EXTS, JobErrorBody, JobFailure, JobResponse, UPLOAD_400, VIDEO_EXTS, finished_response, prefers_async, probe_part, save_part, storage_error, text_field, within_upload_timeout};
use super::{ApiError, AppState};
use crate::jobs::avatars::{AvatarError, AvatarInfo};
use crate::jobs::{Job, MODE_REALTIME, Work};
use crate::telemetry;

impl From<AvatarError> for ApiError {
    fn from(e: AvatarError) -> Self {
        let code = match e {
            AvatarError::Exists(_) => "avatar_exists",
            AvatarError::NotFound(_) => return ApiError::not_found("avatar_not_found", e.to_string()),
            AvatarError::Preparing(_) => "avatar_preparing",
            AvatarError::Failed { .. } => "avatar_failed",
            AvatarError::Busy { .. } => "avatar_busy",
        };
        ApiError::new(StatusCode::CONFLICT, code, e.to_string())
    }
}

/// The multipart body of `POST /v1/avatars` (documentation only: the handler streams the parts).
#[derive(utoipa::ToSchema)]
pub struct AvatarForm {
    /// The avatar's video: mp4, mov, avi, mkv, webm or m4v. At most `--max-upload-bytes`.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub video: Vec<u8>,
    /// The avatar's id: 1–64 of `A–Z a–z 0–9 _ -`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub avatar_id: String,
    /// MuseTalk `--bbox_shift`, −200…200.
    #[schema(required = false, minimum = -200, maximum = 200)]
    pub bbox_shift: i32,
}

/// The multipart body of `POST /v1/avatars/{id}/speak` (documentation only).
#[derive(utoipa::ToSchema)]
pub struct SpeakForm {
    /// The speech: wav, mp3, m4a, aac, flac, ogg or opus. At most `--max-upload-bytes`.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub audio: Vec<u8>,
    /// MuseTalk `--batch_size`, 1…256.
    #[schema(required = false, minimum = 1, maximum = 256)]
    pub batch_size: u32,
}

/// `POST /v1/avatars`: the avatar (in `preparing`) and its preparation job.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AvatarPrepared {
    pub avatar: AvatarInfo,
    /// The preparation job (`Location` points at it).
    pub job_id: String,
    pub trace_id: String,
}

fn not_multipart(e: MultipartRejection, parts: &str) -> ApiError {
    ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_multipart", format!("send multipart/form-data with {parts} ({e})"))
}

/// `avatar_id`: 1–64 of `[A-Za-z0-9_-]` (it names a directory).
pub(super) fn valid_avatar_id(v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(ApiError::bad_request("invalid_avatar_id", "avatar_id must be 1–64 characters of A–Z, a–z, 0–9, `_` or `-`"));
    }
    Ok(())
}

fn realtime_enabled(st: &AppState) -> Result<(), ApiError> {
    if st.jobs.realtime.enabled() {
        return Ok(());
    }
    let why = st.jobs.realtime.readiness().err().unwrap_or_default();
    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "realtime_unavailable", why))
}

fn admit(st: &AppState) -> Result<crate::jobs::Admission, ApiError> {
    st.jobs.admit(MODE_REALTIME).map_err(|e| {
        let retry = st.jobs.retry_after_secs(MODE_REALTIME);
        ApiError::from(e).with_retry_after(retry)
    })
}

/// A rejected upload: the span says why, the job (never work) and its files go.
fn reject(st: &AppState, job: &Job, span: &tracing::Span, e: ApiError) -> ApiError {
    telemetry::set_error(span, e.detail.clone());
    telemetry::set_error(&job.span(), e.detail.clone());
    st.jobs.discard(job);
    e
}

/// Prepares a realtime avatar from a video.
///
/// Multipart `video`, `avatar_id`, optional `bbox_shift`. Answers `202` with `Location` of
/// the preparation job (its progress, events and report); the avatar turns `ready` or `failed`.
#[utoipa::path(
    post,
    path = "/v1/avatars",
    tag = "avatars",
    request_body(description = "`video` file, text parts `avatar_id` and optional `bbox_shift`",
        content((AvatarForm = "multipart/form-data", encoding(("video" = (content_type = "video/*, application/octet-stream")))))),
    responses(
        (status = 202, description = "Preparation started; follow `Location`", body = AvatarPrepared,
            headers(("Location" = String, description = "`/v1/jobs/{id}` of the preparation job"))),
        (status = 400, description = UPLOAD_400, body = super::ErrorBody),
        (status = 408, description = "`upload_timeout`", body = super::ErrorBody),
        (status = 409, description = "`avatar_exists`: DELETE it first", body = super::ErrorBody),
        (status = 413, description = "`file_too_large`", body = super::ErrorBody),
        (status = 415, description = "`not_multipart`", body = super::ErrorBody),
        (status = 429, description = "`queue_full`", body = super::ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
        (status = 500, description = "`internal`", body = super::ErrorBody),
        (status = 503, description = "`realtime_unavailable` (no realtime engine) or `shutting_down`", body = super::ErrorBody),
        (status = 507, description = "`insufficient_storage`", body = super::ErrorBody),
    )
)]
pub async fn prepare(State(st): State<AppState>, multipart: Result<Multipart, MultipartRejection>) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| not_multipart(e, "`video` and `avatar_id` parts"))?;
    realtime_enabled(&st)?;
    let admission = admit(&st)?;
    let job = st.jobs.create(MODE_REALTIME)?;
    let span = job.file_processing_span();
    let t0 = Instant::now();
    let received = within_upload_timeout(&st, async {
        let (mut video, mut id, mut bbox) = (None, None, None);
        while let Some(field) = multipart.next_field().await.map_err(|e| ApiError::bad_request("invalid_multipart", format!("the multipart body is malformed: {}", e.body_text())))? {
            let name = field.name().unwrap_or_default().to_string();
            let dup = |present: bool| if present { Err(ApiError::bad_request("duplicate_part", format!("part `{name}` was sent twice"))) } else { Ok(()) };
            match name.as_str() {
                "video" => {
                    dup(video.is_some())?;
                    video = Some(save_part(&st, &job, field, "video", VIDEO_EXTS, "mp4").await?);
                }
                "avatar_id" => {
                    dup(id.is_some())?;
                    let v = text_field(field).await?;
                    valid_avatar_id(&v)?;
                    // Held from here: sent before the video, a taken id is refused
                    // before a byte of the upload is read.
                    id = Some(st.jobs.avatars.reserve(&v)?);
                }
                "bbox_shift" => {
                    dup(bbox.is_some())?;
                    let v = text_field(field).await?;
                    bbox = Some(v.trim().parse::<i32>().ok().filter(|n| (-200..=200).contains(n)).ok_or_else(|| ApiError::bad_request("invalid_bbox_shift", format!("bbox_shift must be an integer from -200 to 200, got `{v}`")))?);
                }
                _ => return Err(ApiError::bad_request("unknown_part", format!("unexpected part `{name}`; expected video, avatar_id, bbox_shift"))),
            }
        }
        let id = id.ok_or_else(|| ApiError::bad_request("missing_part", "the `avatar_id` part is required"))?;
        let (video, bytes) = video.ok_or_else(|| ApiError::bad_request("missing_part", "the `video` part is required"))?;
        if bytes == 0 {
            return Err(ApiError::bad_request("empty_file", "the `video` part is empty"));
        }
        // The upload check decodes the video stream only; the headers say what else is there.
        let (info, all) = tokio::join!(probe_part(&st, "video", &video), crate::pipeline::media::probe(&st.config.ffprobe, &video));
        let mut info = info?;
        info.has_audio = all.is_ok_and(|a| a.has_audio);
        if !info.has_video {
            return Err(ApiError::bad_request("invalid_video", "the `video` part has no video stream"));
        }
        Ok((id, video, info, bbox))
    })
    .instrument(span.clone())
    .await;
    let (reservation, upload, info, bbox) = match received {
        Ok(r) => r,
        Err(e) => return Err(reject(&st, &job, &span, e)),
    };
    // This preparation's own names (the job id is the generation).
    let ext = upload.extension().and_then(|e| e.to_str()).unwrap_or("mp4").to_string();
    let paths = crate::jobs::avatars::paths(&st.config.avatars_dir(), reservation.id(), &job.id, &ext);
    if let Err(e) = std::fs::create_dir_all(&paths.dir).and_then(|_| std::fs::rename(&upload, &paths.source)) {
        return Err(reject(&st, &job, &span, storage_error(e, "storing the avatar video")));
    }
    span.record("musetalk.input.video.bytes", info.size_bytes as i64);
    span.record("musetalk.input.video.seconds", info.duration_secs);
    drop(span);
    let avatar = st.jobs.avatars.insert(reservation, paths, info, bbox, job.id.clone());
    st.jobs.start(job.clone(), admission, Work::Prepare { avatar: avatar.clone() }, t0.elapsed().as_secs_f64());
    let body = AvatarPrepared { avatar: avatar.info(), job_id: job.id.clone(), trace_id: job.trace_id.clone() };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(body)).into_response())
}

/// Lists the avatars, by id.
#[utoipa::path(
    get,
    path = "/v1/avatars",
    tag = "avatars",
    responses((status = 200, description = "Every avatar and its state", body = Vec<AvatarInfo>))
)]
pub async fn list(State(st): State<AppState>) -> Json<Vec<AvatarInfo>> {
    Json(st.jobs.avatars.list())
}

/// One avatar and its state.
#[utoipa::path(
    get,
    path = "/v1/avatars/{id}",
    tag = "avatars",
    params(("id" = String, Path, description = "The avatar id")),
    responses(
        (status = 200, description = "The avatar", body = AvatarInfo),
        (status = 404, description = "`avatar_not_found`", body = super::ErrorBody),
    )
)]
pub async fn show(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<AvatarInfo>, ApiError> {
    Ok(Json(st.jobs.avatars.get(&id)?.info()))
}

/// Removes an avatar and its files; refused while it is being prepared or while speaks
/// accepted for it are queued or running.
#[utoipa::path(
    delete,
    path = "/v1/avatars/{id}",
    tag = "avatars",
    params(("id" = String, Path, description = "The avatar id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "`avatar_not_found`", body = super::ErrorBody),
        (status = 409, description = "`avatar_preparing`: wait until it is `ready` or `failed`; `avatar_busy`: speaks are queued or running for it, DELETE once they finish", body = super::ErrorBody),
    )
)]
pub async fn delete(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    st.jobs.avatars.remove(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Speaks an audio clip with a prepared avatar.
///
/// Multipart `audio`, optional `batch_size`. The same answer as `/v1/inference`: waits
/// for the job, or with `Prefer: respond-async` answers `202` with `Location`.
#[utoipa::path(
    post,
    path = "/v1/avatars/{id}/speak",
    tag = "avatars",
    params(
        ("id" = String, Path, description = "The avatar id (must be `ready`)"),
        ("Prefer" = Option<String>, Header, description = "`respond-async`: answer `202` with the job's status and `Location` at once"),
    ),
    request_body(description = "`audio` file, optional text part `batch_size`",
        content((SpeakForm = "multipart/form-data", encoding(("audio" = (content_type = "audio/*, application/octet-stream")))))),
    responses(
        (status = 200, description = "The job succeeded", body = JobResponse),
        (status = 202, description = "`Prefer: respond-async`: the job is accepted; follow `Location`", body = crate::jobs::JobStatus,
            headers(("Location" = String, description = "`/v1/jobs/{id}`"))),
        (status = 400, description = UPLOAD_400, body = super::ErrorBody),
        (status = 404, description = "`avatar_not_found`", body = super::ErrorBody),
        (status = 408, description = "`upload_timeout`", body = super::ErrorBody),
        (status = 409, description = "`avatar_preparing`, `avatar_failed` (an `ErrorBody`), or `job_cancelled` (a `JobFailure`)", body = JobErrorBody),
        (status = 413, description = "`file_too_large`", body = super::ErrorBody),
        (status = 415, description = "`not_multipart`", body = super::ErrorBody),
        (status = 429, description = "`queue_full`", body = super::ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
        (status = 500, description = "`job_failed` (a `JobFailure`) or `internal`", body = JobErrorBody),
        (status = 503, description = "`realtime_unavailable` or `shutting_down`", body = super::ErrorBody),
        (status = 504, description = "`job_timed_out`", body = JobFailure),
        (status = 507, description = "`insufficient_storage`", body = super::ErrorBody),
    )
)]
pub async fn speak(State(st): State<AppState>, UrlPath(id): UrlPath<String>, headers: HeaderMap, multipart: Result<Multipart, MultipartRejection>) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| not_multipart(e, "an `audio` part"))?;
    realtime_enabled(&st)?;
    let avatar = st.jobs.avatars.ready(&id)?;
    let admission = admit(&st)?;
    let job = st.jobs.create(MODE_REALTIME)?;
    let span = job.file_processing_span();
    let t0 = Instant::now();
    let received = within_upload_timeout(&st, async {
        let (mut audio, mut batch) = (None, None);
        while let Some(field) = multipart.next_field().await.map_err(|e| ApiError::bad_request("invalid_multipart", format!("the multipart body is malformed: {}", e.body_text())))? {
            let name = field.name().unwrap_or_default().to_string();
            let dup = |present: bool| if present { Err(ApiError::bad_request("duplicate_part", format!("part `{name}` was sent twice"))) } else { Ok(()) };
            match name.as_str() {
                "audio" => {
                    dup(audio.is_some())?;
                    audio = Some(save_part(&st, &job, field, "audio", AUDIO_EXTS, "wav").await?);
                }
                "batch_size" => {
                    dup(batch.is_some())?;
                    let v = text_field(field).await?;
                    batch = Some(v.trim().parse::<u32>().ok().filter(|n| (1..=256).contains(n)).ok_or_else(|| ApiError::bad_request("invalid_batch_size", format!("batch_size must be an integer from 1 to 256, got `{v}`")))?);
                }
                _ => return Err(ApiError::bad_request("unknown_part", format!("unexpected part `{name}`; expected audio, batch_size"))),
            }
        }
        let (audio, bytes) = audio.ok_or_else(|| ApiError::bad_request("missing_part", "the `audio` part is required"))?;
        if bytes == 0 {
            return Err(ApiError::bad_request("empty_file", "the `audio` part is empty"));
        }
        let info = probe_part(&st, "audio", &audio).await?;
        if !info.has_audio || info.duration_secs <= 0.0 {
            return Err(ApiError::bad_request("invalid_audio", "the `audio` part has no audio stream (or no duration)"));
        }
        Ok((audio, info, batch))
    })
    .instrument(span.clone())
    .await;
    let (audio, audio_info, batch_size) = match received {
        Ok(r) => r,
        Err(e) => return Err(reject(&st, &job, &span, e)),
    };
    span.record("musetalk.input.audio.bytes", audio_info.size_bytes as i64);
    span.record("musetalk.input.audio.seconds", audio_info.duration_secs);
    drop(span);
    st.jobs.start(job.clone(), admission, Work::Speak { avatar, audio, audio_info, batch_size }, t0.elapsed().as_secs_f64());
    if prefers_async(&headers) {
        return Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(job.status())).into_response());
    }
    job.finished().await;
    Ok(finished_response(&job))
}
