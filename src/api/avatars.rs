//! Realtime routes: `/v1/avatars` (prepare, list, show, delete) and `/v1/avatars/{id}/speak`.

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::jobs::{JobErrorBody, JobFailure, JobResponse, respond};
use super::upload::{self, Media, UPLOAD_400};
use crate::http::{ApiError, AppState, storage_error};
use crate::jobs::avatars::{AvatarError, AvatarInfo};
use crate::jobs::{Mode, Work};

impl From<AvatarError> for ApiError {
    fn from(e: AvatarError) -> Self {
        let code = match e {
            AvatarError::Exists(_) => "avatar_exists",
            AvatarError::NotFound(_) => return ApiError::not_found("avatar_not_found", e.to_string()),
            AvatarError::Preparing(_) => "avatar_preparing",
            AvatarError::Failed { .. } => "avatar_failed",
            AvatarError::Busy { .. } | AvatarError::BusyElsewhere(_) => "avatar_busy",
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
    /// `true`: take a Python profile of this job with py-spy (`GET /v1/jobs/{id}/profile`). Default `false`.
    #[schema(required = false, value_type = String, pattern = "^(true|false|1|0)$")]
    pub profile: String,
    /// `true`: answer `200` with `video/mp4` at once and send the video while it is
    /// written (fragmented MP4, chunked); the report is then at `Content-Location`.
    #[schema(required = false, value_type = String, pattern = "^(true|false|1|0)$")]
    pub stream: String,
}

/// `POST /v1/avatars`: the avatar (in `preparing`) and its preparation job.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AvatarPrepared {
    pub avatar: AvatarInfo,
    /// The preparation job (`Location` points at it).
    pub job_id: String,
    pub trace_id: String,
}

fn realtime_enabled(st: &AppState) -> Result<(), ApiError> {
    if st.jobs.realtime().enabled() {
        return Ok(());
    }
    let why = st.jobs.realtime().readiness().err().unwrap_or_default();
    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "realtime_unavailable", why))
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
        (status = 400, description = UPLOAD_400, body = crate::http::ErrorBody),
        (status = 408, description = "`upload_timeout`", body = crate::http::ErrorBody),
        (status = 409, description = "`avatar_exists`: DELETE it first", body = crate::http::ErrorBody),
        (status = 413, description = "`file_too_large`", body = crate::http::ErrorBody),
        (status = 415, description = "`not_multipart`", body = crate::http::ErrorBody),
        (status = 429, description = "`queue_full`", body = crate::http::ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
        (status = 500, description = "`internal`", body = crate::http::ErrorBody),
        (status = 503, description = "`realtime_unavailable` (no realtime engine) or `shutting_down`", body = crate::http::ErrorBody),
        (status = 507, description = "`insufficient_storage`", body = crate::http::ErrorBody),
    )
)]
pub async fn prepare(State(st): State<AppState>, multipart: Result<Multipart, MultipartRejection>) -> Result<Response, ApiError> {
    let form = &upload::PREPARE;
    let multipart = form.multipart(multipart)?;
    realtime_enabled(&st)?;
    let mut a = upload::accept(&st, Mode::Realtime, multipart, form).await?;
    let (Some((upload, mut info)), Some(reservation)) = (a.form.media(Media::Video), a.form.take_reservation()) else {
        return Err(upload::refuse(&st, &a.job, ApiError::internal("the video or avatar_id part went missing")));
    };
    // The upload check decodes the video stream only; the headers say what else is there.
    info.has_audio = crate::pipeline::media::probe(st.jobs.prober(), &upload).await.is_ok_and(|all| all.has_audio);
    // This preparation's own names (the job id is the generation).
    let ext = upload.extension().and_then(|e| e.to_str()).unwrap_or("mp4").to_string();
    let paths = crate::jobs::avatars::paths(&st.config.avatars_dir(), reservation.id(), &a.job.id, &ext);
    if let Err(e) = std::fs::create_dir_all(&paths.dir).and_then(|_| move_file(&upload, &paths.source)) {
        return Err(upload::refuse(&st, &a.job, storage_error(e, "storing the avatar video")));
    }
    let bbox = a.form.int("bbox_shift").map(|n| n as i32);
    let avatar = st.jobs.avatars().insert(reservation, paths, info, bbox, a.job.id.clone());
    st.jobs.start(a.job.clone(), a.admission, Work::Prepare { avatar: avatar.clone() }, a.receive_seconds);
    let body = AvatarPrepared { avatar: avatar.info(), job_id: a.job.id.clone(), trace_id: a.job.trace_id.clone() };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/jobs/{}", a.job.id))], Json(body)).into_response())
}

/// Lists the avatars, by id.
#[utoipa::path(
    get,
    path = "/v1/avatars",
    tag = "avatars",
    responses((status = 200, description = "Every avatar and its state", body = Vec<AvatarInfo>))
)]
pub async fn list(State(st): State<AppState>) -> Json<Vec<AvatarInfo>> {
    Json(st.jobs.avatars().list())
}

/// One avatar and its state.
#[utoipa::path(
    get,
    path = "/v1/avatars/{id}",
    tag = "avatars",
    params(("id" = String, Path, description = "The avatar id")),
    responses(
        (status = 200, description = "The avatar", body = AvatarInfo),
        (status = 404, description = "`avatar_not_found`", body = crate::http::ErrorBody),
    )
)]
pub async fn show(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<AvatarInfo>, ApiError> {
    Ok(Json(st.jobs.avatars().get(&id)?.info()))
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
        (status = 404, description = "`avatar_not_found`", body = crate::http::ErrorBody),
        (status = 409, description = "`avatar_preparing`: wait until it is `ready` or `failed`; `avatar_busy`: speaks are queued or running for it, DELETE once they finish", body = crate::http::ErrorBody),
    )
)]
pub async fn delete(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    st.jobs.avatars().remove(&id)?;
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
        (status = 200, description = "The job succeeded (JSON); with `stream=true`, the video itself as it is written (`video/mp4`, fragmented, chunked; `Content-Location: /v1/jobs/{id}`)", content(
            (JobResponse = "application/json"),
            (Vec<u8> = "video/mp4"),
        )),
        (status = 202, description = "`Prefer: respond-async`: the job is accepted; follow `Location`", body = crate::jobs::JobStatus,
            headers(("Location" = String, description = "`/v1/jobs/{id}`"))),
        (status = 400, description = UPLOAD_400, body = crate::http::ErrorBody),
        (status = 404, description = "`avatar_not_found`", body = crate::http::ErrorBody),
        (status = 408, description = "`upload_timeout`", body = crate::http::ErrorBody),
        (status = 409, description = "`avatar_preparing`, `avatar_failed` (an `ErrorBody`), or `job_cancelled` (a `JobFailure`)", body = JobErrorBody),
        (status = 413, description = "`file_too_large`", body = crate::http::ErrorBody),
        (status = 415, description = "`not_multipart`", body = crate::http::ErrorBody),
        (status = 429, description = "`queue_full`", body = crate::http::ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
        (status = 500, description = "`job_failed` (a `JobFailure`) or `internal`", body = JobErrorBody),
        (status = 503, description = "`realtime_unavailable` or `shutting_down`", body = crate::http::ErrorBody),
        (status = 504, description = "`job_timed_out`", body = JobFailure),
        (status = 507, description = "`insufficient_storage`", body = crate::http::ErrorBody),
    )
)]
pub async fn speak(State(st): State<AppState>, UrlPath(id): UrlPath<String>, headers: HeaderMap, multipart: Result<Multipart, MultipartRejection>) -> Result<Response, ApiError> {
    let form = &upload::SPEAK;
    let multipart = form.multipart(multipart)?;
    realtime_enabled(&st)?;
    // Leased before the upload is read: the avatar cannot be deleted under this speak.
    let avatar = st.jobs.avatars().ready(&id)?;
    let a = upload::accept(&st, Mode::Realtime, multipart, form).await?;
    let Some((audio, audio_info)) = a.form.media(Media::Audio) else {
        return Err(upload::refuse(&st, &a.job, ApiError::internal("the audio part went missing")));
    };
    let batch_size = a.form.int("batch_size").map(|n| n as u32);
    let profile = a.form.flag("profile");
    let stream = a.form.flag("stream");
    st.jobs.start(a.job.clone(), a.admission, Work::Speak { avatar, audio, audio_info, batch_size, profile, stream }, a.receive_seconds);
    if stream {
        return Ok(super::stream::answer(&st, a.job.clone()).await);
    }
    Ok(respond(&a.job, &headers).await)
}

/// Renames `from` to `to`, or copies it where they are on different filesystems (the
/// upload in the data dir, the avatar on a shared volume): through a temporary name, so
/// `to` is never seen half-written.
fn move_file(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = to.with_extension("partial");
            std::fs::copy(from, &tmp).and_then(|_| std::fs::rename(&tmp, to)).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            std::fs::remove_file(from)
        }
        other => other,
    }
}
