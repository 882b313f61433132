//! Streamed answers (`stream=true` on speak): the output video sent while it is written.
//!
//! The engine writes a fragmented MP4 and says where (`EngineEvent::StreamingTo`); this
//! follows the file as it grows and sends each new piece as a chunk, so a player starts
//! before the clip is done. An engine that cannot write progressively (a protocol-1 worker)
//! writes the file whole: it is then sent when the job ends. Nothing is sent before there
//! is a first fragment to send (frames, not only the header: time to first byte is time to
//! playable bytes), so a job that fails first gets the usual JSON error; one that
//! fails mid-stream has its response aborted (no final chunk): never a truncated video
//! that looks whole. A client that goes away stops only its own answer: the job runs on
//! (its output stays at `/v1/jobs/{id}/output`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt;

use crate::http::AppState;
use crate::jobs::{Job, JobState};

/// How often a growing file and the job's state are looked at.
const POLL: Duration = Duration::from_millis(20);
const CHUNK: usize = 64 * 1024;

/// Follows `job`'s output as it is written.
pub async fn answer(st: &AppState, job: Arc<Job>) -> Response {
    // Wait for the first fragment (a `moof` box: playable frames, not only the header),
    // or the job's end.
    let mut scanned = 0;
    let path = loop {
        let ended = job.state().is_terminal();
        if ended && job.state() != JobState::Succeeded {
            // Failed before anything was sent: the usual JSON error, never a broken video.
            return super::jobs::finished_response(&job);
        }
        let growing = job.streaming_to().filter(|p| has_fragment(p, &mut scanned));
        if let Some(p) = growing {
            break Some(p);
        }
        if ended {
            break None;
        }
        tokio::time::sleep(POLL).await;
    };
    let path: PathBuf = match path {
        Some(p) => p,
        None => match (job.state(), job.output()) {
            (JobState::Succeeded, Some(p)) => p,
            _ => return super::jobs::finished_response(&job),
        },
    };
    // Opened once: the descriptor follows the file through the engine's final rename.
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if job.state().is_terminal() => {
            return match job.output() {
                Some(p) => match tokio::fs::File::open(&p).await {
                    Ok(f) => respond(st, job, f),
                    Err(e) => crate::http::ApiError::internal(format!("opening the output {}: {e}", p.display())).into_response(),
                },
                None => {
                    tracing::warn!(job_id = %job.id, "streamed output {} is gone: {e}", path.display());
                    super::jobs::finished_response(&job)
                }
            };
        }
        Err(e) => return crate::http::ApiError::internal(format!("opening the streamed output {}: {e}", path.display())).into_response(),
    };
    respond(st, job, file)
}

/// The file holds a movie fragment (`moof`) in its first MiB: a first chunk that plays.
/// Only what was written since the last look (`scanned` bytes) is read again.
fn has_fragment(path: &std::path::Path, scanned: &mut u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(len) = std::fs::metadata(path).map(|m| m.len().min(1 << 20)) else { return false };
    if len <= *scanned {
        return false;
    }
    // Three bytes back: a `moof` split across two looks is still found.
    let from = scanned.saturating_sub(3);
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let mut new = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.take(len - from).read_to_end(&mut new).is_err() {
        return false;
    }
    *scanned = len;
    new.windows(4).any(|w| w == b"moof")
}

fn respond(st: &AppState, job: Arc<Job>, file: tokio::fs::File) -> Response {
    let metrics = st.metrics.clone();
    let (id, trace) = (job.id.clone(), job.trace_id.clone());
    let body = futures::stream::unfold((file, job, false), move |(mut file, job, done)| {
        let metrics = metrics.clone();
        async move {
            if done {
                return None;
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                // Whether the job had ended *before* this read: then a read of 0 is the end.
                let ended = job.state().is_terminal();
                match file.read(&mut buf).await {
                    Ok(0) if ended => {
                        return match job.state() {
                            JobState::Succeeded => None,
                            s => {
                                let why = job.report().and_then(|r| r.error).map(|e| format!("{}: {}", e.step, e.message)).unwrap_or_else(|| s.as_str().to_string());
                                tracing::warn!(job_id = %job.id, "streamed answer aborted: the job {}: {why}", s.as_str());
                                Some((Err(std::io::Error::other(format!("the job {}: {why}", s.as_str()))), (file, job, true)))
                            }
                        };
                    }
                    Ok(0) => tokio::time::sleep(POLL).await,
                    Ok(n) => {
                        job.first_byte_sent(&metrics);
                        buf.truncate(n);
                        return Some((Ok(bytes::Bytes::from(buf)), (file, job, false)));
                    }
                    Err(e) => return Some((Err(e), (file, job, true))),
                }
            }
        }
    });
    let mut r = (StatusCode::OK, Body::from_stream(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("video/mp4"));
    // Where the report is once the stream ends.
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
        h.insert(header::CONTENT_LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&trace) {
        h.insert("x-trace-id", v);
    }
    r
}
