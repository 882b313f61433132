//! The real axum router, built once per fuzzing process like `run()` builds it
//! (preview backend, data dir in a temp dir), driven with `oneshot` on a
//! current-thread runtime, and the checks made after every request.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use http_body_util::BodyExt;
use musetalk_sidecar::http::{self, AppState};
use musetalk_sidecar::collector::Sampler;
use musetalk_sidecar::jobs::avatars::AvatarState;
use musetalk_sidecar::metrics::Metrics;
use tower::ServiceExt;

/// The avatar prepared at start-up, so `/v1/avatars/{id}/speak` reaches its field handling.
pub const SPEAK_AVATAR: &str = "fuzzavatar";
/// Keep at most this many fuzz-created avatars (their files) around.
const MAX_AVATARS: usize = 8;

/// A tiny valid video (16x16, 2 frames, MPEG-4 part 2 in mp4).
pub const TINY_MP4: &[u8] = include_bytes!("../assets/tiny-video.mp4.bin");
/// A tiny valid video (16x16 VP8 in WebM, no duration in the header).
pub const TINY_WEBM: &[u8] = include_bytes!("../assets/tiny-video.webm.bin");

/// A PCM WAV file. `declared` overrides the data chunk's size field (a lying header).
pub fn wav(rate: u32, channels: u16, bits: u16, samples: usize, declared: Option<u32>) -> Vec<u8> {
    let block = u32::from(channels) * u32::from(bits).div_ceil(8);
    let data_len = samples * block as usize;
    let mut v = Vec::with_capacity(44 + data_len);
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data_len as u32).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate.wrapping_mul(block)).to_le_bytes());
    v.extend_from_slice(&(block as u16).to_le_bytes());
    v.extend_from_slice(&bits.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&declared.unwrap_or(data_len as u32).to_le_bytes());
    v.extend((0..data_len).map(|i| (i * 37 % 251) as u8));
    v
}

pub struct Harness {
    rt: tokio::runtime::Runtime,
    router: Router,
    state: AppState,
    pub data_dir: PathBuf,
    /// Whether [`SPEAK_AVATAR`] became ready (speak requests are sent only then).
    pub speak_ready: bool,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();
static DATA_DIR: OnceLock<PathBuf> = OnceLock::new();

/// `(route, status, error code)` → count, printed at exit with `FUZZ_STATS=1`: shows how
/// deep the inputs get (how many reach probing, start a job, succeed).
static STATS: std::sync::Mutex<BTreeMap<(String, u16, String), u64>> =
    std::sync::Mutex::new(BTreeMap::new());
/// The first `detail` of each tolerated 5xx (route, status, code), printed with the stats.
static DETAILS: std::sync::Mutex<BTreeMap<(String, u16, String), String>> =
    std::sync::Mutex::new(BTreeMap::new());

extern "C" fn at_exit() {
    if std::env::var_os("FUZZ_STATS").is_some() {
        let stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("fuzz harness: responses (route, status, error code: count)");
        let details = DETAILS.lock().unwrap_or_else(|e| e.into_inner());
        for (key, n) in stats.iter() {
            let (route, status, code) = key;
            eprintln!("  {route} {status} {code}: {n}");
            if let Some(d) = details.get(key) {
                eprintln!(
                    "    first detail: {}",
                    d.chars().take(300).collect::<String>()
                );
            }
        }
    }
    if let Some(d) = DATA_DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The process-wide harness (built on first use).
pub fn harness() -> &'static Harness {
    HARNESS.get_or_init(Harness::new)
}

/// A multipart body with one part per `(name, filename, content type, bytes)`.
pub fn multipart(boundary: &str, parts: &[(&str, Option<&str>, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, filename, ct, data) in parts {
        b.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = filename {
            b.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        if let Some(ct) = ct {
            b.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    b
}

impl Harness {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("musetalk-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the fuzz data dir");
        let dir = dir.canonicalize().expect("canonical data dir");
        let _ = DATA_DIR.set(dir.clone());
        // SAFETY: registers a plain `extern "C" fn` (prints stats, removes the data dir).
        unsafe { libc::atexit(at_exit) };

        // The config as `run()` gets it: clap over a command line. A short job timeout so a
        // job made of fuzz input cannot stall the fuzzer for the default 30 minutes.
        let dir_arg = dir.display().to_string();
        let cli = musetalk_sidecar::cli::Cli::parse_from([
            "x",
            "--data-dir",
            &dir_arg,
            "--listen",
            "127.0.0.1:0",
            "--job-timeout",
            "20s",
            "--kill-grace",
            "1s",
            "--max-retained-jobs",
            "8",
        ]);
        let config = cli.serve;
        config.validate().expect("valid fuzz config");
        std::fs::create_dir_all(config.jobs_dir()).expect("creating the jobs dir");

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (router, state) = {
            let _guard = rt.enter();
            let config = Arc::new(config);
            let metrics = Arc::new(Metrics::new());
            // No sampling thread: a sampler's handle is all the handlers need.
            let sampler = Sampler::new(
                Vec::new(),
                metrics.clone(),
                config.ring_capacity(),
                config.sample_interval,
            );
            let collector = sampler.handle();
            let state = musetalk_sidecar::build_state(config, metrics, collector, http::auth::Tokens::default(), false);
            *state.backend_status.write().unwrap() = Ok("preview (fuzz harness)".into());
            (http::app(state.clone()), state)
        };
        let mut h = Harness {
            rt,
            router,
            state,
            data_dir: dir,
            speak_ready: false,
        };
        h.speak_ready = h.prepare_speak_avatar();
        if !h.speak_ready {
            eprintln!(
                "fuzz harness: avatar `{SPEAK_AVATAR}` did not become ready; /speak is not exercised"
            );
        }
        h
    }

    fn prepare_speak_avatar(&self) -> bool {
        let body = multipart(
            "X",
            &[
                ("avatar_id", None, None, SPEAK_AVATAR.as_bytes()),
                ("video", Some("v.mp4"), Some("video/mp4"), TINY_MP4),
            ],
        );
        let (status, resp) = self.post("/v1/avatars", "multipart/form-data; boundary=X", body);
        if status != StatusCode::ACCEPTED {
            eprintln!(
                "fuzz harness: preparing `{SPEAK_AVATAR}`: {status} {}",
                String::from_utf8_lossy(&resp)
            );
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.state.jobs.avatars().get(SPEAK_AVATAR).map(|a| a.state()) {
                Ok(AvatarState::Ready) => return true,
                Ok(AvatarState::Preparing) => self
                    .rt
                    .block_on(async { tokio::time::sleep(Duration::from_millis(20)).await }),
                _ => return false,
            }
        }
        false
    }

    /// Sends one POST through the router; returns the status and the body.
    pub fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", content_type)
            .body(Body::from(body))
            .expect("a valid request");
        self.rt.block_on(async {
            let resp = self
                .router
                .clone()
                .oneshot(req)
                .await
                .expect("the router is infallible");
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_else(|e| format!("<body error: {e}>").into_bytes());
            (status, body)
        })
    }

    /// Job directories under `jobs/` now.
    fn job_dirs(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.data_dir.join("jobs"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// POSTs `body` to `path` and checks: no 5xx but 507; only `jobs/` and `avatars/`
    /// in the data dir, with generated names only; a refused upload leaves no job dir.
    pub fn exercise(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        input: &dyn std::fmt::Debug,
    ) {
        let before = self.job_dirs();
        let body_copy = std::env::var_os("FUZZ_KNOWN_DIR").map(|_| body.clone());
        let (status, resp) = self.post(path, content_type, body);
        let json = serde_json::from_slice::<serde_json::Value>(&resp).ok();
        {
            let code = json
                .as_ref()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or_default();
            let route = path.replace(SPEAK_AVATAR, "{id}");
            let key = (route, status.as_u16(), code);
            if status.is_server_error() {
                let detail = json
                    .as_ref()
                    .and_then(|v| v.get("detail")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                DETAILS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key.clone())
                    .or_insert(detail);
            }
            *STATS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_default() += 1;
        }
        // Known bug `job-failed-500`: an upload that ffprobe accepts but ffmpeg cannot decode
        // becomes a failed job answered 500 `job_failed` (fuzz/regressions/multipart_raw/).
        let known = status == StatusCode::INTERNAL_SERVER_ERROR
            && crate::known_bug("job-failed-500")
            && resp.starts_with(br#"{"error":"job_failed""#);
        if known {
            save_example(path, content_type, body_copy.as_deref(), json.as_ref());
        }
        if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE && !known {
            panic!(
                "POST {path} answered {status}: {}\ninput: {input:?}",
                String::from_utf8_lossy(&resp)
            );
        }
        if let Err(e) = check_tree(&self.data_dir) {
            panic!("after POST {path} ({status}): {e}\ninput: {input:?}");
        }
        // A refusal (no job ran: the body has no `job_id`) must leave no job directory.
        let ran = json.as_ref().is_some_and(|v| v.get("job_id").is_some());
        if !status.is_success() && !ran {
            let leaked: Vec<_> = self.job_dirs().difference(&before).cloned().collect();
            assert!(
                leaked.is_empty(),
                "POST {path} was refused ({status}: {}) but left job dirs {leaked:?}\ninput: {input:?}",
                String::from_utf8_lossy(&resp)
            );
        }
        self.tidy();
    }

    /// Bounds what accumulates: finished jobs past `--max-retained-jobs`, extra avatars.
    fn tidy(&self) {
        self.state.jobs.sweep();
        let avatars = self.state.jobs.avatars().list();
        if avatars.len() > MAX_AVATARS {
            for a in avatars.iter().filter(|a| a.avatar_id != SPEAK_AVATAR) {
                let _ = self.state.jobs.avatars().remove(&a.avatar_id);
            }
        }
    }
}

/// With `FUZZ_KNOWN_DIR=dir`: keeps one request per route and kind of tolerated 5xx
/// (`{route}__{detail class}.body` and `.content-type`), to turn into regressions.
fn save_example(
    path: &str,
    content_type: &str,
    body: Option<&[u8]>,
    json: Option<&serde_json::Value>,
) {
    let (Some(dir), Some(body)) = (std::env::var_os("FUZZ_KNOWN_DIR"), body) else {
        return;
    };
    let detail = json
        .and_then(|v| v.get("detail")?.as_str())
        .unwrap_or_default();
    // The class: the detail without paths and numbers.
    let class: String = detail
        .split_whitespace()
        .filter(|w| !w.contains('/') && !w.bytes().any(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let route: String = path
        .trim_start_matches('/')
        .replace(SPEAK_AVATAR, "id")
        .replace('/', "_");
    let dir = PathBuf::from(dir);
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{route}__{class}.body"));
    if !file.exists() {
        let _ = std::fs::write(&file, body);
        let _ = std::fs::write(file.with_extension("content-type"), content_type);
    }
}

fn generated_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The data dir holds `jobs/{32 hex}/…` and `avatars/{valid id}/…`, nothing else, no
/// links, and only names the service generated.
pub fn check_tree(root: &Path) -> Result<(), String> {
    let top = std::fs::read_dir(root).map_err(|e| format!("reading {}: {e}", root.display()))?;
    for e in top.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e
            .file_type()
            .map_err(|err| format!("{}: {err}", e.path().display()))?;
        if !(ft.is_dir() && (name == "jobs" || name == "avatars")) {
            return Err(format!(
                "unexpected entry in the data dir: {name:?} ({ft:?})"
            ));
        }
        for sub in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
            let s = sub.file_name().to_string_lossy().into_owned();
            let ok = if name == "jobs" {
                s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
            } else {
                (1..=64).contains(&s.len())
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            };
            if !ok {
                return Err(format!("unexpected name under {name}/: {s:?}"));
            }
            walk(&sub.path())?;
        }
    }
    Ok(())
}

fn walk(p: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return Ok(());
    }; // removed meanwhile
    if meta.file_type().is_symlink() {
        return Err(format!("symlink in the data dir: {}", p.display()));
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !generated_name(&name) {
        return Err(format!(
            "a name the service did not generate: {}",
            p.display()
        ));
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            walk(&e.path())?;
        }
    }
    Ok(())
}
