//! Where media facts come from: a pool of persistent probe helpers
//! (`musetalk-probe-helper`, FFmpeg's libraries over a pipe), or ffprobe once per file
//! where no helper runs. Both answer the same [`Query`] in ffprobe's schema, so
//! [`media`](super::media) holds the rules once.
//!
//! Why a helper: starting ffprobe costs ~40 ms a file, most of a request's overhead
//! (BENCHMARKS.md §4). Why a separate process still: a decoder bug hit by a crafted file
//! must not take the service down. A helper that dies on a file is replaced and that file
//! refused ([`ProbeError::Crashed`]); one that hangs past `--probe-timeout` is killed and
//! the file refused ([`ProbeError::Timeout`]). One that cannot start at all (missing,
//! FFmpeg's libraries absent) is given up for ffprobe, said once in the log and by `check`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio_util::codec::{FramedRead, LinesCodec};

use super::media::{self, Probe, ProbeError};
use crate::config::Config;
use crate::metrics::registered;

/// The helper protocol's version, said in its `ready` line (docs/probe-helper.md).
pub const PROTOCOL: u32 = 1;
/// The helper's executable name, looked for next to this binary (`--probe-helper auto`).
pub const HELPER_NAME: &str = "musetalk-probe-helper";
/// Helpers that run at once (each probe holds one for a few milliseconds).
const POOL: usize = 4;
/// A helper must say `ready` within this long after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// No reply line is longer (replies are a few hundred bytes).
const MAX_LINE: usize = 1 << 20;
/// How long a probe waits for a free helper before asking ffprobe instead (four files
/// hanging their helpers must not stall every other upload for `--probe-timeout`).
const PERMIT_WAIT: Duration = Duration::from_secs(1);
/// After a helper could not start, helpers are tried again this much later.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Helpers that died on files ffprobe reads fine, in a row, before helpers are given up:
/// the helper is what is broken here (an FFmpeg it was not built for), not the files.
const INNOCENT_CRASHES: u32 = 3;

/// What to learn about a file, as the ffprobe invocations that answer it today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
pub enum Query {
    /// Format and every stream (`-show_entries` [`ENTRIES`]).
    Headers,
    /// The first video (`v:0`) or audio (`a:0`) stream, its start decoded: 10 packets of
    /// video, 2 s of audio (`-read_intervals %+#10` / `%+2`, `frame=media_type`).
    Decode { video: bool },
    /// The span and count of that stream's packets, read to the end without decoding.
    Packets { video: bool },
}

impl Query {
    /// `-select_streams` of the query, when it selects one.
    pub fn stream(self) -> Option<&'static str> {
        match self {
            Query::Headers => None,
            Query::Decode { video } | Query::Packets { video } => Some(if video { "v:0" } else { "a:0" }),
        }
    }
}

/// One line to the helper.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the reply: a stray line can never pass for another request's answer.
    pub id: u64,
    pub path: PathBuf,
    #[serde(flatten)]
    pub query: Query,
}

/// The helper's first line: who it is.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    /// The FFmpeg libraries it runs on (`libavformat 59.27.100`).
    pub ffmpeg: String,
}

/// The helper's answer to one [`Request`] (`ok: false` is ffprobe exiting non-zero).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The request's `id`.
    #[serde(default)]
    pub id: u64,
    pub ok: bool,
    #[serde(default)]
    pub probe: Probe,
    #[serde(default)]
    pub decoded: usize,
    #[serde(default)]
    pub span: Option<(f64, u64)>,
    /// What FFmpeg logged at error level, formatted as ffprobe's `-v error` prints it.
    #[serde(default)]
    pub errors: String,
}

/// What a query learnt, whichever prober answered.
#[derive(Debug, Default)]
pub struct Answer {
    pub probe: Probe,
    /// Frames decoded ([`Query::Decode`]).
    pub decoded: usize,
    /// `(seconds, packets)` ([`Query::Packets`]), `None` when no packet has a timestamp.
    pub span: Option<(f64, u64)>,
    /// FFmpeg's error-level messages, ffprobe's stderr.
    pub errors: String,
}

impl Reply {
    fn into_answer(self) -> Result<Answer, ProbeError> {
        if !self.ok {
            return Err(ProbeError::Unreadable(media::reason(self.errors.as_bytes(), "no decoder opens it")));
        }
        Ok(Answer { probe: self.probe, decoded: self.decoded, span: self.span, errors: self.errors })
    }
}

/// What ffprobe is asked to show (and what the helper fills in).
pub const ENTRIES: &str = "format=format_name,duration:stream=codec_type,codec_name,width,height,avg_frame_rate,r_frame_rate,nb_frames,duration:stream_side_data=rotation";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    via: &'static str,
    result: &'static str,
}

/// The prober's metric family, defined and registered here alone.
#[derive(Clone, Debug)]
pub struct ProbeFamilies {
    pub probes: Family<ProbeLabels, Counter>,
}

impl ProbeFamilies {
    const VIA: [&'static str; 2] = ["helper", "ffprobe"];
    const RESULTS: [&'static str; 5] = ["ok", "unreadable", "crashed", "timeout", "error"];

    pub fn new(r: &mut Registry) -> Self {
        let f = ProbeFamilies { probes: registered(r, "musetalk_media_probes", "Media probe queries (uploads, outputs) by what answered them and how they ended.", None, Family::default()) };
        // Every series at 0: "no helper crashed" reads 0, not no data.
        for via in Self::VIA {
            for result in Self::RESULTS {
                let _ = f.probes.get_or_create(&ProbeLabels { via, result });
            }
        }
        f
    }

    fn count(&self, via: &'static str, r: &Result<Answer, ProbeError>) {
        let result = match r {
            Ok(_) => "ok",
            Err(ProbeError::Unreadable(_) | ProbeError::Undecodable(_)) => "unreadable",
            Err(ProbeError::Crashed(_)) => "crashed",
            Err(ProbeError::Timeout(_)) => "timeout",
            Err(ProbeError::Spawn(_)) => "error",
        };
        self.probes.get_or_create(&ProbeLabels { via, result }).inc();
    }
}

/// Answers [`Query`]s about files. Cheap to clone (the helper pool is shared).
#[derive(Clone)]
pub struct Prober {
    ffprobe: PathBuf,
    limit: Duration,
    helpers: Option<Arc<Pool>>,
    families: Option<ProbeFamilies>,
}

impl Prober {
    /// From `--probe-helper` (`auto`: next to this binary if there; `off`; a path),
    /// `--ffprobe` and `--probe-timeout`.
    pub fn new(config: &Config) -> Prober {
        let program = match config.probe_helper.as_str() {
            "off" => None,
            "auto" => std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(HELPER_NAME))).filter(|p| p.is_file()),
            path => Some(PathBuf::from(path)),
        };
        match program {
            Some(p) => Self::helper(&p, &config.ffprobe, config.probe_timeout),
            None => Self::ffprobe(&config.ffprobe, config.probe_timeout),
        }
    }

    /// Counts every query in `families` (`musetalk_media_probes_total`).
    pub fn counted(self, families: ProbeFamilies) -> Prober {
        Prober { families: Some(families), ..self }
    }

    /// ffprobe once per file, each bounded by `limit`.
    pub fn ffprobe(ffprobe: &Path, limit: Duration) -> Prober {
        Prober { ffprobe: ffprobe.to_path_buf(), limit, helpers: None, families: None }
    }

    /// Persistent helpers running `program`, ffprobe where they cannot start.
    pub fn helper(program: &Path, ffprobe: &Path, limit: Duration) -> Prober {
        Prober { ffprobe: ffprobe.to_path_buf(), limit, helpers: Some(Pool::new(program.to_path_buf())), families: None }
    }

    /// How files are probed now: `Ok` the helper and its FFmpeg, or `Err` why ffprobe
    /// runs per file instead (`check`, and the log at start). Starts a helper to know.
    pub async fn describe(&self) -> Result<String, String> {
        let Some(pool) = &self.helpers else { return Err(format!("no {HELPER_NAME} (next to this binary, or --probe-helper): ffprobe runs once per file")) };
        if let Some(why) = pool.unusable() {
            return Err(why);
        }
        match Helper::start(&pool.program).await {
            Ok((helper, ready)) => {
                pool.put(helper);
                Ok(format!("{} ({}), up to {POOL} at once", pool.program.display(), ready.ffmpeg))
            }
            Err(why) => Err(pool.give_up(why)),
        }
    }

    /// Answers `query` about `path`, within `--probe-timeout`.
    pub async fn ask(&self, query: Query, path: &Path) -> Result<Answer, ProbeError> {
        let (via, answer) = match self.helper_ask(query, path).await {
            Some(answer) => ("helper", answer),
            None => ("ffprobe", self.ffprobe_ask(query, path).await),
        };
        if let Some(f) = &self.families {
            f.count(via, &answer);
        }
        answer
    }

    /// `None`: no helper took it (none configured, set aside, or none could start).
    async fn helper_ask(&self, query: Query, path: &Path) -> Option<Result<Answer, ProbeError>> {
        let pool = self.helpers.as_ref().filter(|p| p.unusable().is_none())?;
        let req = Request { id: pool.next_id.fetch_add(1, Ordering::Relaxed), path: path.to_path_buf(), query };
        let answer = pool.ask(&req, self.limit).await?;
        if !matches!(answer, Err(ProbeError::Crashed(_))) {
            if answer.is_ok() {
                pool.innocent_crashes.store(0, Ordering::Relaxed);
            }
            return Some(answer);
        }
        // A crash is the file's doing only if ffprobe cannot read it either.
        Some(match self.ffprobe_ask(query, path).await {
            Ok(fine) => {
                if pool.innocent_crashes.fetch_add(1, Ordering::Relaxed) + 1 >= INNOCENT_CRASHES {
                    pool.give_up(format!("{INNOCENT_CRASHES} probe helpers in a row died on files ffprobe reads"));
                }
                Ok(fine)
            }
            Err(ProbeError::Spawn(_)) => answer,
            Err(_) => {
                pool.innocent_crashes.store(0, Ordering::Relaxed);
                answer
            }
        })
    }

    async fn ffprobe_ask(&self, query: Query, path: &Path) -> Result<Answer, ProbeError> {
        // Local files only, as the helper opens them: a playlist in an upload fetches nothing.
        let mut args = vec!["-v", "error", "-protocol_whitelist", "file"];
        if let Some(stream) = query.stream() {
            args.extend(["-select_streams", stream]);
        }
        let decode_entries = format!("{ENTRIES}:frame=media_type");
        match query {
            Query::Headers => args.extend(["-show_entries", ENTRIES, "-of", "json"]),
            Query::Decode { video } => args.extend(["-read_intervals", if video { "%+#10" } else { "%+2" }, "-show_entries", &decode_entries, "-of", "json"]),
            Query::Packets { .. } => args.extend(["-show_entries", "packet=pts_time,duration_time", "-of", "csv=p=0"]),
        }
        let out = tokio::process::Command::new(&self.ffprobe).args(&args).arg(path).stdin(Stdio::null()).kill_on_drop(true).output();
        let out = tokio::time::timeout(self.limit, out).await.map_err(|_| ProbeError::Timeout(self.limit))?.map_err(ProbeError::Spawn)?;
        if !out.status.success() {
            return Err(ProbeError::Unreadable(media::reason(&out.stderr, "ffprobe failed")));
        }
        let (stdout, errors) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).into_owned());
        if let Query::Packets { .. } = query {
            return Ok(Answer { span: media::packet_span(&stdout), errors, ..Answer::default() });
        }
        let probe = media::parse_report(&stdout)?;
        Ok(Answer { decoded: probe.frames.len(), probe, span: None, errors })
    }
}

/// Idle helpers, and whether helpers can run here at all.
struct Pool {
    program: PathBuf,
    idle: Mutex<Vec<Helper>>,
    permits: tokio::sync::Semaphore,
    /// Why helpers are not used now, and until when (ffprobe answers meanwhile).
    off: Mutex<Option<(Instant, String)>>,
    next_id: AtomicU64,
    innocent_crashes: AtomicU32,
}

impl Pool {
    fn new(program: PathBuf) -> Arc<Pool> {
        Arc::new(Pool { program, idle: Mutex::default(), permits: tokio::sync::Semaphore::new(POOL), off: Mutex::default(), next_id: AtomicU64::new(1), innocent_crashes: AtomicU32::new(0) })
    }

    /// Why helpers are off now (`None`: try them).
    fn unusable(&self) -> Option<String> {
        let mut off = self.off.lock().unwrap_or_else(|e| e.into_inner());
        match &*off {
            Some((until, why)) if Instant::now() < *until => Some(why.clone()),
            Some(_) => {
                *off = None;
                self.innocent_crashes.store(0, Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    fn put(&self, helper: Helper) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(helper);
    }

    /// An idle helper that is still alive.
    fn take(&self) -> Option<Helper> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut h) = idle.pop() {
            if matches!(h.child.try_wait(), Ok(None)) {
                return Some(h);
            }
        }
        None
    }

    /// Helpers off for [`RETRY_AFTER`] (a start can fail for a passing reason: EMFILE, load).
    fn give_up(&self, why: String) -> String {
        let why = format!("{why}: ffprobe runs once per file instead (helpers are tried again in {} s)", RETRY_AFTER.as_secs());
        let mut off = self.off.lock().unwrap_or_else(|e| e.into_inner());
        if off.is_none() {
            tracing::warn!(helper = %self.program.display(), "{why}");
        }
        *off = Some((Instant::now() + RETRY_AFTER, why.clone()));
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        why
    }

    /// `None`: no helper could take it (the caller asks ffprobe).
    async fn ask(&self, req: &Request, limit: Duration) -> Option<Result<Answer, ProbeError>> {
        let _permit = tokio::time::timeout(PERMIT_WAIT, self.permits.acquire()).await.ok()?.ok()?;
        // A path that is not UTF-8 has no JSON spelling: ffprobe takes it.
        let mut line = serde_json::to_string(req).ok()?;
        line.push('\n');
        // A helper that died while idle (OOM killer, a signal) shows as a failed write:
        // that is not this file's doing, so a freshly started helper gets it.
        let mut helper = match self.take() {
            Some(h) => h,
            None => self.start().await?,
        };
        if helper.send(&line).await.is_err() {
            helper = self.start().await?;
            if helper.send(&line).await.is_err() {
                self.give_up("a probe helper exits as soon as it is given work".into());
                return None;
            }
        }
        Some(match tokio::time::timeout(limit, helper.lines.next()).await {
            Ok(Some(Ok(reply))) => match serde_json::from_str::<Reply>(&reply) {
                Ok(reply) if reply.id == req.id => {
                    self.put(helper);
                    reply.into_answer()
                }
                Ok(reply) => {
                    tracing::warn!(path = %req.path.display(), "the probe helper answered request {} to request {}; restarting it", reply.id, req.id);
                    Err(ProbeError::Crashed(format!("an answer to another request ({})", reply.id)))
                }
                Err(e) => {
                    tracing::warn!(path = %req.path.display(), "the probe helper answered garbage ({e}); restarting it");
                    Err(ProbeError::Crashed(format!("an unreadable answer: {e}")))
                }
            },
            Ok(Some(Err(e))) => {
                tracing::warn!(path = %req.path.display(), "the probe helper's answer is unreadable ({e}); restarting it");
                Err(ProbeError::Crashed(format!("an unreadable answer: {e}")))
            }
            Ok(None) => {
                let status = helper.ended().await;
                tracing::warn!(path = %req.path.display(), "the probe helper died reading a file ({status}); the next probe starts a new helper");
                Err(ProbeError::Crashed(status))
            }
            Err(_) => {
                tracing::warn!(path = %req.path.display(), "the probe helper took longer than {limit:?} on a file; killed, the file is refused");
                Err(ProbeError::Timeout(limit))
            }
        })
    }

    async fn start(&self) -> Option<Helper> {
        match Helper::start(&self.program).await {
            Ok((h, _)) => Some(h),
            Err(why) => {
                self.give_up(why);
                None
            }
        }
    }
}

/// One running helper: its stdin, its stdout as lines (stderr goes to the log).
struct Helper {
    child: Child,
    stdin: ChildStdin,
    lines: FramedRead<ChildStdout, LinesCodec>,
}

impl Helper {
    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await
    }

    /// Starts `program` and waits for its `ready` line.
    async fn start(program: &Path) -> Result<(Helper, Ready), String> {
        let prog = program.display().to_string();
        let mut child = super::process::command(&prog, &[], Path::new("/"), Stdio::piped(), [])
            .spawn()
            .map_err(|e| format!("cannot start the probe helper {prog} ({e})"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            return Err("the probe helper's pipes are missing".into());
        };
        // Its stderr (a panic, the loader's complaint) becomes log events.
        let pid = child.id();
        tokio::spawn(async move {
            let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(MAX_LINE));
            while let Some(Ok(line)) = lines.next().await {
                tracing::warn!(target: "probe_helper", pid, "{line}");
            }
        });
        let mut helper = Helper { child, stdin, lines: FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_LINE)) };
        let first = match tokio::time::timeout(READY_TIMEOUT, helper.lines.next()).await {
            Ok(Some(Ok(line))) => line,
            Ok(_) => return Err(format!("the probe helper {prog} stopped before it was ready ({})", helper.ended().await)),
            Err(_) => return Err(format!("the probe helper {prog} did not say ready within {READY_TIMEOUT:?}")),
        };
        match serde_json::from_str::<Ready>(&first) {
            Ok(ready) if ready.protocol == PROTOCOL => Ok((helper, ready)),
            Ok(ready) => Err(format!("the probe helper {prog} speaks protocol {}, this service {PROTOCOL}", ready.protocol)),
            Err(_) => Err(format!("the probe helper {prog} began with {first:?}, not its ready line")),
        }
    }

    /// How it ended (`signal 6 (SIGABRT)`), once its stdout closed.
    async fn ended(&mut self) -> String {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(s)) => s,
            _ => {
                let _ = self.child.start_kill();
                return "its output closed, still running: killed".into();
            }
        };
        use std::os::unix::process::ExitStatusExt;
        let text = super::process::status_text(status.code(), status.signal());
        match status.signal().and_then(|s| nix::sys::signal::Signal::try_from(s).ok()) {
            Some(sig) => format!("{text} ({sig})"),
            None => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_keep_their_shape() {
        let req = Request { id: 7, path: "/d/v.mp4".into(), query: Query::Decode { video: true } };
        assert_eq!(serde_json::to_string(&req).unwrap(), r#"{"id":7,"path":"/d/v.mp4","query":"decode","video":true}"#);
        let back: Request = serde_json::from_str(r#"{"id":1,"path":"/x","query":"headers"}"#).unwrap();
        assert_eq!(back.query, Query::Headers);
        let r: Reply = serde_json::from_str(r#"{"ok":false,"errors":"[mov,mp4 @ 0x1] moov atom not found\nfile:/x: Invalid data found when processing input\n"}"#).unwrap();
        match r.into_answer() {
            Err(ProbeError::Unreadable(why)) => assert_eq!(why, "moov atom not found; Invalid data found when processing input"),
            other => panic!("{other:?}"),
        }
        assert_eq!(Query::Packets { video: false }.stream(), Some("a:0"));
    }
}
