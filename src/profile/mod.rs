//! Per-job Python profiles with py-spy: which jobs, how (wrapping a simple job's pipeline,
//! attaching to a realtime worker for one request), what is kept, and what the report says.
//!
//! py-spy reads the interpreter from outside, so MuseTalk runs unchanged. A simple job's
//! pipeline runs *under* py-spy (`py-spy record --subprocesses -- <exit-status shim> --
//! <argv>`): the profiler is its ancestor and needs no privilege. py-spy exits 0 whatever
//! its child did, so the hidden `exit-status` subcommand sits between them and writes the
//! pipeline's real status to a file. A realtime worker is already running: py-spy attaches
//! (`--pid`) for the one request, which needs ptrace permission (CAP_SYS_PTRACE, or Yama's
//! ptrace_scope 0). Profiling never fails a job: when it cannot be done, the report says
//! why and `musetalk_profiles_total{result="failed",reason}` counts it.

pub mod trace;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::registered;
use crate::pipeline::Invocation;
use trace::{Trace, WindowProfile};

/// Functions listed per stage and ranking.
pub const TOP_FUNCTIONS: usize = 5;

/// Files of a job's profile, under `{job dir}/profile/`.
pub const TRACE_FILE: &str = "trace.json";
pub const SPEEDSCOPE_FILE: &str = "profile.speedscope.json";
pub const SVG_FILE: &str = "profile.svg";
pub const COLLAPSED_FILE: &str = "profile.collapsed.txt";
const STATUS_FILE: &str = "exit-status";
/// The largest py-spy trace read back (parsing holds it and its intervals in memory).
const MAX_TRACE_BYTES: u64 = 256 << 20;

/// Why a job has no profile: the `reason` label of `musetalk_profiles_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `--py-spy` does not run.
    PySpyMissing,
    /// A realtime worker cannot be attached to (no ptrace permission).
    PtraceDenied,
    /// The engine runs no Python process (the preview engine).
    NoPython,
    /// py-spy ran but failed (could not start the pipeline, attach, or write its trace).
    PySpyFailed,
    /// py-spy wrote a trace without a single sample.
    Empty,
}

impl Reason {
    pub const ALL: [Reason; 5] = [Reason::PySpyMissing, Reason::PtraceDenied, Reason::NoPython, Reason::PySpyFailed, Reason::Empty];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PySpyMissing => "py_spy_missing",
            Reason::PtraceDenied => "ptrace_denied",
            Reason::NoPython => "no_python",
            Reason::PySpyFailed => "py_spy_failed",
            Reason::Empty => "empty",
        }
    }
}

/// No profile for a job that wanted one: the reason (bounded) and the detail (for people).
#[derive(Clone, Debug, PartialEq)]
pub struct Unavailable {
    pub reason: Reason,
    pub detail: String,
}

impl Unavailable {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Unavailable { reason, detail: detail.into() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabels {
    pub mode: &'static str,
    /// `taken` or `failed`.
    pub result: &'static str,
    /// `none` when taken, else a [`Reason`].
    pub reason: &'static str,
}

/// The profiler's metric family, defined and registered here alone.
#[derive(Debug)]
pub struct ProfileFamilies {
    pub profiles: Family<ProfileLabels, Counter>,
}

impl ProfileFamilies {
    pub fn new(r: &mut Registry) -> Self {
        ProfileFamilies { profiles: registered(r, "musetalk_profiles", "Python profiles of jobs (py-spy): taken, or failed by reason.", None, Family::default()) }
    }

    /// Every series at 0, so "no failures" reads 0 rather than no data.
    pub fn init(&self, modes: &[&'static str]) {
        for &mode in modes {
            let _ = self.profiles.get_or_create(&ProfileLabels { mode, result: "taken", reason: "none" });
            for r in Reason::ALL {
                let _ = self.profiles.get_or_create(&ProfileLabels { mode, result: "failed", reason: r.as_str() });
            }
        }
    }

    pub fn count(&self, mode: &'static str, outcome: Result<(), Reason>) {
        let l = match outcome {
            Ok(()) => ProfileLabels { mode, result: "taken", reason: "none" },
            Err(r) => ProfileLabels { mode, result: "failed", reason: r.as_str() },
        };
        self.profiles.get_or_create(&l).inc();
    }
}

/// What the profiler can do on this host, found once at start.
#[derive(Debug)]
pub struct Profiler {
    py_spy: PathBuf,
    /// py-spy's version, or why it does not run.
    version: Result<String, String>,
    /// Whether a running worker can be attached to, or why not.
    attach: Result<(), String>,
    ratio: f64,
    rate: u32,
    /// This binary (the `exit-status` shim).
    exe: PathBuf,
}

/// What `check` and `/readyz` say when workers cannot be profiled, with the fix.
pub const PTRACE_FIX: &str = "profiling of realtime workers unavailable: needs CAP_SYS_PTRACE (docker compose: `cap_add: [SYS_PTRACE]`; Kubernetes: `securityContext.capabilities.add: [SYS_PTRACE]`, see deploy/); simple jobs are profiled either way";

impl Profiler {
    pub fn new(config: &Config) -> Self {
        let version = py_spy_version(&config.py_spy);
        Profiler {
            py_spy: config.py_spy.clone(),
            version,
            attach: ptrace_permitted(&read("/proc/self/status"), std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().as_deref()),
            ratio: config.profile_ratio,
            rate: config.profile_rate,
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("musetalk-sidecar")),
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// py-spy's version, or why it does not run (`check`).
    pub fn version(&self) -> Result<&str, &str> {
        self.version.as_deref().map_err(String::as_str)
    }

    /// `Ok` when running workers can be profiled, else why not (`check`, `/readyz`).
    pub fn attach_permitted(&self) -> Result<(), &str> {
        self.attach.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Is this job profiled: asked for, or drawn at `--profile-ratio`.
    pub fn wanted(&self, requested: bool) -> bool {
        // 53 random bits from the job-id generator's source (uuid v4, getrandom): the low
        // ones, clear of the version and variant bits.
        let draw = (uuid::Uuid::new_v4().as_u128() & ((1 << 53) - 1)) as f64 / (1u64 << 53) as f64;
        requested || (self.ratio > 0.0 && draw < self.ratio)
    }

    /// `inv` run under py-spy, writing into `dir` (created). `Err` when py-spy does not run.
    pub fn wrap(&self, inv: &Invocation, dir: &Path) -> Result<Wrapped, Unavailable> {
        if let Err(why) = &self.version {
            return Err(Unavailable::new(Reason::PySpyMissing, why.clone()));
        }
        std::fs::create_dir_all(dir).map_err(|e| Unavailable::new(Reason::PySpyFailed, format!("creating {}: {e}", dir.display())))?;
        let status = dir.join(STATUS_FILE);
        let mut args = self.record_args(&dir.join(TRACE_FILE));
        args.push("--subprocesses".into());
        args.extend(["--".into(), self.exe.display().to_string(), "exit-status".into(), "--file".into(), status.display().to_string(), "--".into(), inv.program.clone()]);
        args.extend(inv.args.iter().cloned());
        let wrapped = Invocation { program: self.py_spy.display().to_string(), args, cwd: inv.cwd.clone(), env: inv.env.clone() };
        Ok(Wrapped { invocation: wrapped, dir: dir.to_path_buf(), status, started: SystemTime::now() })
    }

    fn record_args(&self, out: &Path) -> Vec<String> {
        // --idle: every thread at every tick, so the trace's intervals are continuous in
        // time (without it a thread that waits has no samples, and its last stack would
        // seem to run on until its next one).
        ["record", "--rate", &self.rate.to_string(), "--format", "chrometrace", "--idle", "--output", &out.display().to_string()].map(String::from).to_vec()
    }

    /// Attaches to a running worker (`pid`) until [`Attached::stop`].
    pub fn attach(&self, pid: Option<u32>, dir: &Path) -> Result<Attached, Unavailable> {
        let Some(pid) = pid else {
            return Err(Unavailable::new(Reason::NoPython, "the realtime engine runs no Python process (the preview engine renders with ffmpeg)"));
        };
        if let Err(why) = &self.version {
            return Err(Unavailable::new(Reason::PySpyMissing, why.clone()));
        }
        if let Err(why) = &self.attach {
            return Err(Unavailable::new(Reason::PtraceDenied, why.clone()));
        }
        std::fs::create_dir_all(dir).map_err(|e| Unavailable::new(Reason::PySpyFailed, format!("creating {}: {e}", dir.display())))?;
        let mut args = self.record_args(&dir.join(TRACE_FILE));
        args.extend(["--subprocesses".into(), "--pid".into(), pid.to_string()]);
        let started = SystemTime::now();
        let mut child = tokio::process::Command::new(&self.py_spy)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Unavailable::new(Reason::PySpyMissing, format!("starting py-spy: {e}")))?;
        // Time 0 of py-spy's trace: its spawn is too early by py-spy's own start-up (tens of
        // ms on a loaded machine: stage edges then shift by as much). Measured on the
        // fixture worker, the moment py-spy prints `Sampling process …` lands samples in
        // their stages within a sample interval: that is the origin, the spawn the fallback.
        let sampling = std::sync::Arc::new(std::sync::Mutex::new(None::<SystemTime>));
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let readers = [child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>), child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)];
        let tasks = readers
            .into_iter()
            .flatten()
            .map(|r| {
                let (sampling, output) = (sampling.clone(), output.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncBufReadExt;
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.contains("Sampling process") {
                            sampling.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(SystemTime::now);
                        }
                        let mut o = output.lock().unwrap_or_else(|e| e.into_inner());
                        if o.len() < 50 {
                            o.push(line);
                        }
                    }
                })
            })
            .collect();
        Ok(Attached { child, dir: dir.to_path_buf(), started, sampling, output, tasks })
    }
}

/// A simple job's invocation under py-spy.
pub struct Wrapped {
    pub invocation: Invocation,
    dir: PathBuf,
    status: PathBuf,
    started: SystemTime,
}

/// The pipeline's own end, as the shim recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShimStatus {
    /// py-spy never started the pipeline (nothing ran).
    NotStarted,
    /// Started, and no end recorded (killed with py-spy).
    Running,
    Exited(i32),
    Signalled(i32),
}

impl Wrapped {
    /// What the shim recorded of the pipeline.
    /// How the pipeline ended and when it started, as the shim recorded them (read once,
    /// after the run).
    pub fn shim(&self) -> (ShimStatus, Option<SystemTime>) {
        parse_status(&std::fs::read_to_string(&self.status).unwrap_or_default())
    }

    /// The profile of the run. Its time 0 is when py-spy started the pipeline: the shim's
    /// recorded start (`shim_start`), else when the job asked for it (py-spy's own start-up
    /// before the shim took ~70 ms on a loaded 2-core machine).
    pub async fn finish(self, shim_start: Option<SystemTime>, stderr: &[String]) -> Result<Taken, Unavailable> {
        let origin = shim_start.unwrap_or(self.started);
        let (dir, stderr) = (self.dir, stderr.to_vec());
        tokio::task::spawn_blocking(move || taken(&dir, origin, &stderr)).await.unwrap_or_else(|e| Err(Unavailable::new(Reason::PySpyFailed, format!("reading the trace: {e}"))))
    }
}

/// py-spy attached to a worker for one request.
pub struct Attached {
    child: tokio::process::Child,
    dir: PathBuf,
    started: SystemTime,
    /// When py-spy said it was sampling (taken as its trace's time 0).
    sampling: std::sync::Arc<std::sync::Mutex<Option<SystemTime>>>,
    /// What py-spy printed (the first lines), for the reason when it failed.
    output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Attached {
    /// Stops sampling now (SIGINT: py-spy writes its trace and exits); [`Attached::collect`]
    /// waits for it. Split so the worker is handed back before py-spy's shutdown.
    pub fn interrupt(self) -> Self {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT);
        }
        self
    }

    /// Waits for py-spy to write its trace (10 s at most) and reads the profile.
    pub async fn collect(mut self) -> Result<Taken, Unavailable> {
        let waited = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if waited.is_err() {
            let _ = self.child.kill().await;
        }
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        let mut said = self.output.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if waited.is_err() {
            said.push("py-spy did not stop within 10 s of SIGINT".into());
        }
        let origin = self.sampling.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or(self.started);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || taken(&dir, origin, &said)).await.unwrap_or_else(|e| Err(Unavailable::new(Reason::PySpyFailed, format!("reading the trace: {e}"))))
    }
}

/// A profile taken: parsed, its formats written beside the trace.
#[derive(Debug)]
pub struct Taken {
    pub trace: Trace,
    /// When py-spy started: its trace's time 0.
    pub origin: SystemTime,
}

fn taken(dir: &Path, origin: SystemTime, stderr: &[String]) -> Result<Taken, Unavailable> {
    let why = || {
        let tail: Vec<&str> = stderr.iter().map(String::as_str).filter(|l| !l.trim().is_empty()).rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
        if tail.is_empty() { String::new() } else { format!(": {}", tail.join(" | ")) }
    };
    let path = dir.join(TRACE_FILE);
    let size = std::fs::metadata(&path).map_err(|_| Unavailable::new(Reason::PySpyFailed, format!("py-spy wrote no trace{}", why())))?.len();
    if size > MAX_TRACE_BYTES {
        return Err(Unavailable::new(Reason::PySpyFailed, format!("py-spy's trace is {} MiB, over the {} MiB this service reads (a very long job: lower --profile-rate)", size >> 20, MAX_TRACE_BYTES >> 20)));
    }
    let bytes = std::fs::read(&path).map_err(|e| Unavailable::new(Reason::PySpyFailed, format!("reading py-spy's trace: {e}")))?;
    let trace = Trace::parse(&bytes).map_err(|e| Unavailable::new(Reason::PySpyFailed, e))?;
    if trace.intervals.is_empty() {
        return Err(Unavailable::new(Reason::Empty, format!("py-spy took no sample (the process ended before the first one, or is not Python){}", why())));
    }
    Ok(Taken { trace, origin })
}

/// What a job's report says of its profile.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ProfileReport {
    /// The profile (speedscope JSON; `?format=svg` for a flamegraph, `?format=collapsed`
    /// for collapsed stacks), when one was taken.
    pub url: Option<String>,
    /// Why there is no profile, when none was taken.
    pub unavailable: Option<String>,
    pub rate_hz: u32,
    /// Thread-samples taken.
    pub samples: u64,
    /// Per stage: the top functions inside the stage's window.
    pub stages: Vec<StageProfile>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct StageProfile {
    pub stage: String,
    #[serde(flatten)]
    pub profile: WindowProfile,
}

impl ProfileReport {
    pub fn unavailable(rate_hz: u32, u: &Unavailable) -> Self {
        ProfileReport { url: None, unavailable: Some(u.detail.clone()), rate_hz, samples: 0, stages: Vec::new() }
    }

    /// Writes the profile's formats into `dir` and slices it by `stages` (name, start, end).
    pub fn taken(t: &Taken, rate_hz: u32, dir: &Path, url: String, title: &str, stages: &[(String, SystemTime, SystemTime)]) -> Result<Self, Unavailable> {
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(|e| Unavailable::new(Reason::PySpyFailed, format!("writing {name}: {e}")));
        write(SPEEDSCOPE_FILE, &serde_json::to_vec(&t.trace.speedscope(title)).unwrap_or_default())?;
        let collapsed = t.trace.collapsed(rate_hz);
        write(COLLAPSED_FILE, collapsed.as_bytes())?;
        write(SVG_FILE, &trace::Trace::flamegraph_svg(&collapsed, title).map_err(|e| Unavailable::new(Reason::PySpyFailed, e))?)?;
        let us = |at: SystemTime| match at.duration_since(t.origin) {
            Ok(d) => d.as_secs_f64() * 1e6,
            Err(e) => -e.duration().as_secs_f64() * 1e6,
        };
        let stages = stages.iter().map(|(name, from, to)| StageProfile { stage: name.clone(), profile: t.trace.window(us(*from), us(*to), TOP_FUNCTIONS) }).collect();
        Ok(ProfileReport { url: Some(url), unavailable: None, rate_hz, samples: t.trace.samples(rate_hz), stages })
    }

    /// One line for the job span: `unet_inference: 48% conv2d, 20% datagen; blending: …`.
    pub fn summary(&self) -> String {
        self.stages
            .iter()
            .filter(|s| !s.profile.top_self.is_empty())
            .map(|s| format!("{}: {}", s.stage, s.profile.top_self.iter().take(3).map(|f| format!("{:.0}% {}", f.percent, f.function)).collect::<Vec<_>>().join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// `py-spy --version`, bounded: a wrapper that hangs must not hold the service's start.
fn py_spy_version(py_spy: &Path) -> Result<String, String> {
    let missing = |e: std::io::Error| format!("py-spy not found ({}: {e}); install it with `python3 -m pip install py-spy` or set --py-spy", py_spy.display());
    let mut child = std::process::Command::new(py_spy).arg("--version").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(missing)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{} --version` did not answer within 5 s", py_spy.display()));
            }
        }
    }
    let o = child.wait_with_output().map_err(missing)?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("py-spy ").to_string())
    } else {
        Err(format!("`{} --version` failed: {}", py_spy.display(), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// May this process ptrace a sibling: CAP_SYS_PTRACE in the effective set, or Yama
/// absent / `ptrace_scope` 0 (classic rules: same user). Scope 1 allows descendants only.
fn ptrace_permitted(proc_status: &str, yama_scope: Option<&str>) -> Result<(), String> {
    const CAP_SYS_PTRACE: u32 = 19;
    let cap = proc_status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).is_some_and(|bits| bits & (1 << CAP_SYS_PTRACE) != 0);
    let scope = yama_scope.and_then(|s| s.trim().parse::<u32>().ok());
    match (cap, scope) {
        (true, Some(3)) => Err(format!("{PTRACE_FIX} (kernel.yama.ptrace_scope is 3: no ptrace at all)")),
        (true, _) | (false, None | Some(0)) => Ok(()),
        (false, Some(s)) => Err(format!("{PTRACE_FIX} (kernel.yama.ptrace_scope is {s})")),
    }
}

/// The shim's file: how the pipeline ended, and when it started (wall clock).
fn parse_status(text: &str) -> (ShimStatus, Option<SystemTime>) {
    let mut st = ShimStatus::NotStarted;
    let mut started = None;
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (word, arg) = (w.next(), w.next());
        st = match (word, arg.and_then(|n| n.parse::<i32>().ok())) {
            (Some("started"), _) => {
                // Written by the shim, but in a directory the pipeline can write to: no
                // value may panic here.
                started = arg.and_then(|a| a.parse::<f64>().ok()).and_then(|s| Duration::try_from_secs_f64(s).ok()).and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d));
                ShimStatus::Running
            }
            (Some("exit"), Some(n)) => ShimStatus::Exited(n),
            (Some("signal"), Some(n)) => ShimStatus::Signalled(n),
            _ => st,
        };
    }
    (st, started)
}

/// The hidden `exit-status` subcommand: runs `argv` (stdio inherited) and records how it
/// ended in `file` — py-spy, its parent, reports 0 whatever its child did.
#[derive(clap::Args, Debug, Clone)]
pub struct ExitStatusArgs {
    #[arg(long)]
    pub file: PathBuf,
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

pub fn exit_status_main(a: ExitStatusArgs) -> ExitCode {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    let record = |line: String| {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&a.file) {
            let _ = writeln!(f, "{line}");
        }
    };
    // When the pipeline started, as wall-clock time: py-spy's trace clock starts with it.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    record(format!("started {}.{:09}", now.as_secs(), now.subsec_nanos()));
    match std::process::Command::new(&a.argv[0]).args(&a.argv[1..]).status() {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => {
                record(format!("exit {c}"));
                ExitCode::from(c.clamp(0, 255) as u8)
            }
            (None, Some(sig)) => {
                record(format!("signal {sig}"));
                ExitCode::from((128 + sig).clamp(0, 255) as u8)
            }
            _ => ExitCode::FAILURE,
        },
        Err(e) => {
            eprintln!("cannot run {}: {e}", a.argv[0]);
            record("exit 127".into());
            ExitCode::from(127)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptrace_rules() {
        let with = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        let without = "Name:\tx\nCapEff:\t0000000000000000\n";
        assert!(ptrace_permitted(with, Some("1\n")).is_ok());
        assert!(ptrace_permitted(with, None).is_ok());
        assert!(ptrace_permitted(without, None).is_ok());
        assert!(ptrace_permitted(without, Some("0")).is_ok());
        let e = ptrace_permitted(without, Some("1")).unwrap_err();
        assert!(e.contains("needs CAP_SYS_PTRACE") && e.contains("ptrace_scope is 1"), "{e}");
        assert!(ptrace_permitted(with, Some("3")).is_err());
    }

    #[test]
    fn shim_status_lines() {
        assert_eq!(parse_status("").0, ShimStatus::NotStarted);
        assert_eq!(parse_status("started 1796535611.264644369\n"), (ShimStatus::Running, Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1796535611.264644369))));
        assert_eq!(parse_status("started 1.5\nexit 3\n").0, ShimStatus::Exited(3));
        assert_eq!(parse_status("started x\nsignal 9\n"), (ShimStatus::Signalled(9), None));
        for hostile in ["started 1e300", "started -5", "started inf", "started NaN", "started 1e19"] {
            let (st, at) = parse_status(hostile);
            assert_eq!(st, ShimStatus::Running, "{hostile}");
            assert!(at.is_none_or(|t| t > SystemTime::UNIX_EPOCH), "{hostile}");
        }
    }

    #[test]
    fn reasons_are_bounded_labels() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, ["py_spy_missing", "ptrace_denied", "no_python", "py_spy_failed", "empty"]);
    }
}
