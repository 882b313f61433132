//! Simple-mode routes: `POST /v1/inference` and `/v1/jobs/{id}` (status, report, output, events, cancel).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use tower::ServiceExt;

use super::upload::{self, Media};
use crate::pipeline::JobInput;
use crate::http::{ApiError, AppState, storage_error};
use crate::jobs::{Job, JobError, JobEvent, JobState, Mode, Report};


impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::QueueFull { .. } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string()),
            JobError::Draining => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", e.to_string()).with_retry_after(5),
            JobError::JobDir(io) => storage_error(io, "creating the job directory"),
        }
    }
}

/// `{job_id, trace_id, backend, state, output_url, report}`: the answer to a finished job.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobResponse {
    pub job_id: String,
    /// W3C trace id (32 hex digits) of the job's trace.
    pub trace_id: String,
    /// `preview`, `musetalk` or `command`.
    pub backend: &'static str,
    pub state: JobState,
    /// `/v1/jobs/{id}/output` once the job succeeded.
    pub output_url: Option<String>,
    pub report: Option<Report>,
}

/// A job that ended without success: the error body (`error`, `detail`) plus the job's answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobFailure {
    /// `job_failed`, `job_timed_out` or `job_cancelled`.
    error: &'static str,
    /// The failing step and its message.
    detail: String,
    #[serde(flatten)]
    job: JobResponse,
}

/// A failed synchronous job (`JobFailure`) or any other error (`ErrorBody`, e.g. `internal`).
pub struct JobErrorBody;

impl utoipa::PartialSchema for JobErrorBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::ToSchema;
        let any = utoipa::openapi::schema::AnyOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name(JobFailure::name()))
            .item(utoipa::openapi::Ref::from_schema_name(crate::http::ErrorBody::name()))
            .description(Some("`JobFailure` when the job ended unsuccessfully, `ErrorBody` otherwise"));
        utoipa::openapi::RefOr::T(any.into())
    }
}

impl utoipa::ToSchema for JobErrorBody {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        use utoipa::PartialSchema;
        schemas.push((JobFailure::name().into(), JobFailure::schema()));
        schemas.push((crate::http::ErrorBody::name().into(), crate::http::ErrorBody::schema()));
        <JobFailure as utoipa::ToSchema>::schemas(schemas);
    }
}

/// The multipart body of `POST /v1/inference` (documentation only: the handler streams the parts).
#[derive(utoipa::ToSchema)]
pub struct InferenceForm {
    /// The face video: mp4, mov, avi, mkv, webm or m4v (by file name; anything else is stored as `.mp4`). At most `--max-upload-bytes`.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub video: Vec<u8>,
    /// The speech: wav, mp3, m4a, aac, flac, ogg or opus (anything else is stored as `.wav`). At most `--max-upload-bytes`.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub audio: Vec<u8>,
    /// 1–64 of `A–Z a–z 0–9 _ -`.
    #[schema(required = false, pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub avatar_id: String,
    /// MuseTalk `--bbox_shift`, −200…200.
    #[schema(required = false, minimum = -200, maximum = 200)]
    pub bbox_shift: i32,
    /// MuseTalk `--batch_size`, 1…256.
    #[schema(required = false, minimum = 1, maximum = 256)]
    pub batch_size: u32,
    /// `true`: take a Python profile of this job with py-spy (`GET /v1/jobs/{id}/profile`). Default `false`.
    #[schema(required = false, value_type = String, pattern = "^(true|false|1|0)$")]
    pub profile: String,
}

/// `DELETE /v1/jobs/{id}`: the job and the state it ended in.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CancelResponse {
    pub job_id: String,
    /// `cancelled` once the pipeline stopped (the state so far if it takes longer than `--kill-grace` + 5 s).
    pub state: JobState,
}

/// The mp4 bytes of a job's output.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary, content_media_type = "video/mp4")]
pub struct Mp4(pub Vec<u8>);

fn job_response(job: &Job) -> JobResponse {
    let state = job.state();
    JobResponse {
        job_id: job.id.clone(),
        trace_id: job.trace_id.clone(),
        backend: job.backend,
        state,
        output_url: (state == JobState::Succeeded).then(|| format!("/v1/jobs/{}/output", job.id)),
        report: job.report(),
    }
}

/// A terminal job as an HTTP answer: 200 on success, an error code otherwise.
pub(super) fn finished_response(job: &Job) -> Response {
    let body = job_response(job);
    let (status, code) = match body.state {
        JobState::Succeeded => return Json(body).into_response(),
        JobState::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "job_timed_out"),
        JobState::Cancelled => (StatusCode::CONFLICT, "job_cancelled"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "job_failed"),
    };
    let detail = body.report.as_ref().and_then(|r| r.error.as_ref()).map(|e| format!("{}: {}", e.step, e.message)).unwrap_or_else(|| "the job did not succeed".into());
    (status, Json(JobFailure { error: code, detail, job: body })).into_response()
}

/// Runs a lip-sync job on an uploaded video and audio.
///
/// Multipart `video`, `audio`, optional `avatar_id`, `bbox_shift`, `batch_size`; the parts
/// stream to the job directory. Waits for the job and answers its result, or with
/// `Prefer: respond-async` answers `202` at once with `Location: /v1/jobs/{id}`.
#[utoipa::path(
    post,
    path = "/v1/inference",
    tag = "jobs",
    params(("Prefer" = Option<String>, Header, description = "`respond-async` (RFC 7240): answer `202` with the job's status and `Location` at once instead of waiting")),
    request_body(description = "`video` and `audio` files, optional text parts `avatar_id`, `bbox_shift`, `batch_size`",
        content((InferenceForm = "multipart/form-data", encoding(("video" = (content_type = "video/*, application/octet-stream")), ("audio" = (content_type = "audio/*, application/octet-stream")))))),
    responses(
        (status = 200, description = "The job succeeded", body = JobResponse),
        (status = 202, description = "`Prefer: respond-async`: the job is accepted; follow `Location`", body = crate::jobs::JobStatus,
            headers(("Location" = String, description = "`/v1/jobs/{id}`"))),
        (status = 400, description = upload::UPLOAD_400, body = crate::http::ErrorBody),
        (status = 408, description = "`upload_timeout`: the parts did not arrive within `--upload-timeout`", body = crate::http::ErrorBody),
        (status = 409, description = "`job_cancelled`: the job was cancelled while the client waited", body = JobFailure),
        (status = 413, description = "`file_too_large`: a part exceeds `--max-upload-bytes`", body = crate::http::ErrorBody),
        (status = 415, description = "`not_multipart`: the body is not multipart/form-data", body = crate::http::ErrorBody),
        (status = 429, description = "`queue_full`: the admission queue is full; retry after `Retry-After` seconds", body = crate::http::ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
        (status = 500, description = "`job_failed` (a `JobFailure`: the pipeline failed) or `internal`", body = JobErrorBody),
        (status = 503, description = "`shutting_down`: the service is draining", body = crate::http::ErrorBody,
            headers(("Retry-After" = u64, description = "seconds"))),
        (status = 504, description = "`job_timed_out`: the job ran past `--job-timeout`", body = JobFailure),
        (status = 507, description = "`insufficient_storage`: the data dir is full", body = crate::http::ErrorBody),
    )
)]
pub async fn inference(State(st): State<AppState>, headers: HeaderMap, multipart: Result<Multipart, MultipartRejection>) -> Result<Response, ApiError> {
    let form = &upload::INFERENCE;
    let multipart = form.multipart(multipart)?;
    let a = upload::accept(&st, Mode::Simple, multipart, form).await?;
    let (video, video_info) = a.form.media(Media::Video).ok_or_else(|| ApiError::internal("the video part went missing"))?;
    let (audio, audio_info) = a.form.media(Media::Audio).ok_or_else(|| ApiError::internal("the audio part went missing"))?;
    let inputs = JobInput {
        job_id: a.job.id.clone(),
        dir: a.job.dir.clone(),
        video,
        audio,
        video_info,
        audio_info,
        bbox_shift: a.form.int("bbox_shift").map(|n| n as i32),
        batch_size: a.form.int("batch_size").map(|n| n as u32),
        avatar_id: a.form.text("avatar_id"),
        profile: a.form.flag("profile"),
        stream: false,
    };
    st.jobs.start(a.job.clone(), a.admission, crate::jobs::Work::Simple(inputs), a.receive_seconds);
    Ok(respond(&a.job, &headers).await)
}

/// The answer to an accepted job: `202` + `Location` at once with `Prefer: respond-async`,
/// else the finished job (waited for).
pub(super) async fn respond(job: &Arc<Job>, headers: &HeaderMap) -> Response {
    if prefers_async(headers) {
        let location = format!("/v1/jobs/{}", job.id);
        return (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(job.status())).into_response();
    }
    job.finished().await;
    finished_response(job)
}

/// `Prefer: respond-async` (RFC 7240).
pub(super) fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("respond-async")))
}

fn find(st: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    if let Some(job) = st.jobs.get(id) {
        return Ok(job);
    }
    if st.jobs.was_lost(id) {
        return Err(ApiError::new(
            StatusCode::GONE,
            "job_lost",
            format!("job `{id}` belonged to an earlier run of this instance, which stopped (a crash or a restart) with it; its files are gone: submit it again"),
        ));
    }
    Err(ApiError::not_found("job_not_found", format!("no job `{id}` (finished jobs are kept for --job-retention)")))
}

/// Lists every job still kept, newest first (behind a proxy with `--shared-dir`: every
/// replica's, docs/cluster.md).
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    responses((status = 200, description = "Every kept job's status, newest first; with replicas sharing a dir, the jobs of every replica alive", body = Vec<crate::jobs::JobStatus>))
)]
pub async fn list(State(st): State<AppState>) -> Json<Vec<serde_json::Value>> {
    let jobs = st.jobs.clone();
    Json(tokio::task::spawn_blocking(move || jobs.cluster_list()).await.unwrap_or_default())
}

/// A job's state, current stage, progress and step timings so far.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job's status", body = crate::jobs::JobStatus),
        (status = 404, description = "`job_not_found`: unknown job, or no longer kept (`--job-retention`)", body = crate::http::ErrorBody),
        (status = 410, description = "`job_lost`: the job belonged to an earlier run of this instance (a crash or restart took it)", body = crate::http::ErrorBody),
    )
)]
pub async fn status(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    Ok(Json(find(&st, &id)?.status()).into_response())
}

/// A finished job's report: JSON, or the console text with `Accept: text/plain`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/report",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job id"),
        ("Accept" = Option<String>, Header, description = "`text/plain` (without `application/json`) for the console report; JSON otherwise"),
    ),
    responses(
        (status = 200, description = "The report", content(
            (Report = "application/json"),
            (String = "text/plain"),
        )),
        (status = 404, description = "`job_not_found`", body = crate::http::ErrorBody),
        (status = 410, description = "`job_lost`: the job belonged to an earlier run of this instance (a crash or restart took it)", body = crate::http::ErrorBody),
        (status = 409, description = "`job_not_finished`: the report is ready when the job ends", body = crate::http::ErrorBody),
    )
)]
pub async fn report(State(st): State<AppState>, UrlPath(id): UrlPath<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let job = find(&st, &id)?;
    let report = job.report().ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "job_not_finished", format!("job `{id}` is {}; the report is ready when it ends", job.state().as_str())))?;
    let wants_text = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/plain") && !a.contains("application/json"));
    if wants_text {
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], report.to_text()).into_response());
    }
    Ok(Json(report).into_response())
}

/// `?format=` of `GET /v1/jobs/{id}/profile`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProfileQuery {
    /// `speedscope` (default: speedscope's JSON file format), `svg` (a flamegraph) or
    /// `collapsed` (collapsed stacks, `frame;frame count`).
    pub format: Option<String>,
}

/// A job's Python profile (py-spy), taken on `profile=true` or at `--profile-ratio`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/profile",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id"), ProfileQuery),
    responses(
        (status = 200, description = "The profile", content(
            (serde_json::Value = "application/json"),
            (String = "image/svg+xml"),
            (String = "text/plain"),
        )),
        (status = 400, description = "`invalid_format`: not `speedscope`, `svg` or `collapsed`", body = crate::http::ErrorBody),
        (status = 404, description = "`job_not_found`, or `profile_not_found` with the reason (not asked for, unavailable on this host, py-spy failed)", body = crate::http::ErrorBody),
        (status = 410, description = "`job_lost`: the job belonged to an earlier run of this instance (a crash or restart took it)", body = crate::http::ErrorBody),
        (status = 409, description = "`job_not_finished`: the profile is ready when the job ends", body = crate::http::ErrorBody),
    )
)]
pub async fn profile(State(st): State<AppState>, UrlPath(id): UrlPath<String>, axum::extract::Query(q): axum::extract::Query<ProfileQuery>) -> Result<Response, ApiError> {
    use crate::profile::{COLLAPSED_FILE, SPEEDSCOPE_FILE, SVG_FILE};
    let (file, content_type) = match q.format.as_deref().unwrap_or("speedscope") {
        "speedscope" | "json" => (SPEEDSCOPE_FILE, "application/json"),
        "svg" => (SVG_FILE, "image/svg+xml"),
        "collapsed" => (COLLAPSED_FILE, "text/plain; charset=utf-8"),
        other => return Err(ApiError::bad_request("invalid_format", format!("format must be `speedscope`, `svg` or `collapsed`, got `{other}`"))),
    };
    let job = find(&st, &id)?;
    let report = job.report().ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "job_not_finished", format!("job `{id}` is {}; its profile is ready when it ends", job.state().as_str())))?;
    let not_found = |why: String| ApiError::new(StatusCode::NOT_FOUND, "profile_not_found", why);
    match &report.profile {
        None => return Err(not_found(format!("job `{id}` was not profiled: send `profile=true` with the job (or set --profile-ratio)"))),
        Some(p) if p.url.is_none() => return Err(not_found(format!("job `{id}` has no profile: {}", p.unavailable.as_deref().unwrap_or("not taken")))),
        Some(_) => {}
    }
    // Streamed from the file: a long job's profile is large.
    let f = tokio::fs::File::open(job.dir.join("profile").join(file)).await.map_err(|e| not_found(format!("job `{id}`'s profile is gone ({e})")))?;
    Ok(([(header::CONTENT_TYPE, content_type)], axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f))).into_response())
}

/// A succeeded job's output video, with Range support.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/output",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job id"),
        ("Range" = Option<String>, Header, description = "`bytes=START-END`: answers `206` with that part"),
    ),
    responses(
        (status = 200, description = "The whole mp4", body = Mp4, content_type = "video/mp4",
            headers(("Accept-Ranges" = String, description = "`bytes`"), ("Content-Length" = u64))),
        (status = 206, description = "The requested range of the mp4", body = Mp4, content_type = "video/mp4",
            headers(("Content-Range" = String, description = "`bytes START-END/TOTAL`"), ("Content-Length" = u64))),
        (status = 304, description = "Not modified (`If-Modified-Since`)"),
        (status = 404, description = "`job_not_found`", body = crate::http::ErrorBody),
        (status = 410, description = "`job_lost`: the job belonged to an earlier run of this instance (a crash or restart took it)", body = crate::http::ErrorBody),
        (status = 409, description = "`no_output`: the job has not succeeded (yet)", body = crate::http::ErrorBody),
        (status = 410, description = "`output_gone`: the output file was removed", body = crate::http::ErrorBody),
        (status = 416, description = "The range is not satisfiable (empty body, `Content-Range: bytes */TOTAL`)",
            headers(("Content-Range" = String))),
    )
)]
pub async fn output(State(st): State<AppState>, UrlPath(id): UrlPath<String>, req: Request) -> Result<Response, ApiError> {
    let job = find(&st, &id)?;
    let path = job.output().ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "no_output", format!("job `{id}` is {} and has no output", job.state().as_str())))?;
    let resp = tower_http::services::ServeFile::new_with_mime(&path, &mime::Mime::from(mime_mp4()))
        .oneshot(req)
        .await
        .map_err(|e| ApiError::internal(format!("serving the output: {e}")))?;
    if resp.status() == StatusCode::NOT_FOUND {
        return Err(ApiError::new(StatusCode::GONE, "output_gone", "the output file was removed".to_string()));
    }
    Ok(resp.map(axum::body::Body::new))
}

fn mime_mp4() -> mime::Mime {
    "video/mp4".parse().unwrap_or(mime::APPLICATION_OCTET_STREAM)
}

/// Cancels a queued or running job (a running one has its process group killed).
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job was cancelled", body = CancelResponse),
        (status = 404, description = "`job_not_found`", body = crate::http::ErrorBody),
        (status = 410, description = "`job_lost`: the job belonged to an earlier run of this instance (a crash or restart took it)", body = crate::http::ErrorBody),
        (status = 409, description = "`job_finished`: the job had already ended", body = crate::http::ErrorBody),
    )
)]
pub async fn cancel(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let job = find(&st, &id)?;
    if !job.cancel() {
        return Err(ApiError::new(StatusCode::CONFLICT, "job_finished", format!("job `{id}` already ended {}", job.state().as_str())));
    }
    let state = tokio::time::timeout(st.config.kill_grace + std::time::Duration::from_secs(5), job.finished()).await.unwrap_or(job.state());
    Ok((StatusCode::OK, Json(CancelResponse { job_id: id, state })).into_response())
}

/// Follows a job as Server-Sent Events.
///
/// A `status` event (data: `JobStatus`) first, then `state`, `step_start`, `step_end`,
/// `stage_start`, `stage_end` and `progress` events (data: `JobEvent`, whose `type` is
/// the event name), ending with `done`; a finished job's stream is `status` then `done`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "`text/event-stream`: `event: status` with a `JobStatus` as data, then events whose data is a `JobEvent` (`type` = event name), ending with `done`", body = String, content_type = "text/event-stream"),
        (status = 404, description = "`job_not_found`", body = crate::http::ErrorBody),
        (status = 410, description = "`job_lost`: the job belonged to an earlier run of this instance (a crash or restart took it)", body = crate::http::ErrorBody),
    )
)]
pub async fn events(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&st, &id)?;
    let (snapshot, rx) = job.subscribe();
    let terminal = snapshot.state.is_terminal();
    let mut head = vec![Ok(Event::default().event("status").json_data(&snapshot).unwrap_or_default())];
    if terminal {
        // A finished job's stream still ends with `done`, like a live one.
        let done = JobEvent::Done { state: snapshot.state, error: snapshot.error.clone() };
        head.push(Ok(Event::default().event(done.name()).json_data(&done).unwrap_or_default()));
    }
    let head = futures::stream::iter(head);
    let tail = futures::stream::unfold((rx, terminal), |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let end = matches!(ev, JobEvent::Done { .. });
                    let e = Event::default().event(ev.name()).json_data(&ev).unwrap_or_default();
                    return Some((Ok(e), (rx, end)));
                }
                // A slow reader missed some progress: carry on from the newest.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures::StreamExt;
    Ok(Sse::new(head.chain(tail)).keep_alive(KeepAlive::default()))
}
