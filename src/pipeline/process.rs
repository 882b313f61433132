//! Subprocess discipline for every pipeline: own process group, clean environment,
//! output turned into lines, timeout and cancellation → SIGTERM, grace, SIGKILL of the group.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use super::lines::LineSplitter;

/// Variables a pipeline inherits from the sidecar; everything else is dropped so
/// secrets in the service's environment never reach a model process.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME"];
const INHERITED_PREFIXES: &[&str] = &["CUDA_", "NVIDIA_"];
/// Lines kept per stream for error details.
const TAIL_LINES: usize = 40;

/// The part of the sidecar's environment a pipeline or worker process inherits.
pub fn inherited_env() -> Vec<(String, std::ffi::OsString)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .filter(|(k, _)| INHERITED_ENV.contains(&k.as_str()) || INHERITED_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect()
}

/// What to run: argv, working directory, extra environment.
#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Invocation {
    /// The command line for spans and logs: secrets never appear here because the
    /// environment (where they would live) is not part of it.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .map(|a| if a.is_empty() || a.contains(char::is_whitespace) { format!("'{a}'") } else { a.to_string() })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub cancel: CancellationToken,
    /// W3C trace context for the child (`TRACEPARENT`), so its own spans join the trace.
    pub traceparent: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Exited,
    TimedOut,
    Cancelled,
}

/// How the process ended and the last lines it printed.
#[derive(Clone, Debug)]
pub struct ProcessOutcome {
    pub pid: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub ended: EndReason,
    pub duration: Duration,
    pub stdout_tail: Vec<String>,
    pub stderr_tail: Vec<String>,
}

impl ProcessOutcome {
    /// `Err` when the process did not end by itself: killed at `timeout`, or cancelled.
    pub fn ended_ok(&self, timeout: Duration) -> Result<(), PipelineError> {
        match self.ended {
            EndReason::TimedOut => Err(PipelineError::TimedOut(timeout)),
            EndReason::Cancelled => Err(PipelineError::Cancelled),
            EndReason::Exited => Ok(()),
        }
    }

    pub fn succeeded(&self) -> bool {
        self.ended == EndReason::Exited && self.code == Some(0)
    }

    /// `exit code 1`, `signal 9`, …
    pub fn status_text(&self) -> String {
        status_text(self.code, self.signal)
    }

    /// The last stderr lines (stdout if stderr is empty), for error details. ffmpeg's
    /// `-progress` lines (`frame=12`, `out_time=…`) say nothing about a failure and are
    /// left out.
    pub fn error_tail(&self) -> String {
        let progress = |l: &&String| l.split_once('=').is_some_and(|(k, v)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') && !v.contains(' '));
        let useful = |t: &Vec<String>| t.iter().filter(|l| !progress(l)).cloned().collect::<Vec<_>>();
        let (err, out) = (useful(&self.stderr_tail), useful(&self.stdout_tail));
        let tail = if err.is_empty() { out } else { err };
        let last: Vec<&str> = tail.iter().rev().take(5).rev().map(String::as_str).collect();
        if last.is_empty() { String::new() } else { format!(": {}", last.join(" | ")) }
    }
}

/// The one spawn builder, for pipelines and realtime workers alike: its own process group
/// (so the whole tree can be signalled), a clean environment ([`inherited_env`], then
/// `PYTHONUNBUFFERED=1`, then `env` in order), stdout and stderr piped, killed if dropped.
pub fn command(program: &str, args: &[String], cwd: &std::path::Path, stdin: Stdio, env: impl IntoIterator<Item = (String, String)>) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd).env_clear().stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    for (k, v) in inherited_env() {
        cmd.env(k, v);
    }
    cmd.env("PYTHONUNBUFFERED", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `exit code 1`, `signal 9`, …: how a process ended, in the words every error uses.
pub fn status_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The pid and process group of a started child, reported before it runs to completion
/// so the caller can register the tree with the collector.
pub type OnSpawn<'a> = &'a mut (dyn FnMut(u32) + Send);
pub type OnLine<'a> = &'a mut (dyn FnMut(Stream, &str, Instant) + Send);

/// Runs `inv` to completion, timeout or cancellation. Every exit path leaves no process
/// of the group behind (orphaned grandchildren included).
/// Runs `inv` and reports through `sink` what stage spans and progress are made from:
/// the process once spawned, and every stage event `parser` reads off its output (each
/// line also becomes a `pipeline` debug event). The one runner behind simple jobs and
/// the preview realtime engine; the end reason is the caller's to judge.
pub async fn run_invocation(inv: &Invocation, opts: &RunOptions, parser: &mut dyn super::StageParser, sink: super::Sink<'_>) -> Result<ProcessOutcome, PipelineError> {
    let clock = super::Clock::now();
    let forward = |evs: Vec<super::StageEvent>, sink: &mut (dyn FnMut(super::EngineEvent) + Send)| {
        for ev in evs {
            sink(match ev {
                super::StageEvent::Start { name, at } => super::EngineEvent::StageStart { name, at: clock.to_system(at) },
                super::StageEvent::End { name, at } => super::EngineEvent::StageEnd { name, at: clock.to_system(at) },
                super::StageEvent::Progress { done, total } => super::EngineEvent::Progress { done, total },
                super::StageEvent::FirstFrame { at } => super::EngineEvent::FirstFrame { at: clock.to_system(at) },
                super::StageEvent::Batch { seconds } => super::EngineEvent::Batch { seconds, frames: None },
            });
        }
    };
    forward(parser.begin(Instant::now()), sink);
    let result = {
        // Both callbacks report through the one sink.
        let cell = std::sync::Mutex::new(&mut *sink);
        run(
            inv,
            opts,
            &mut |pid| {
                tracing::info!(pid, "pipeline started");
                let mut g = cell.lock().unwrap_or_else(|e| e.into_inner());
                (&mut **g)(super::EngineEvent::Process { pid, shared: false });
            },
            &mut |stream, line, at| {
                match stream {
                    Stream::Stdout => tracing::debug!(target: "pipeline", stream = "stdout", "{line}"),
                    Stream::Stderr => tracing::debug!(target: "pipeline", stream = "stderr", "{line}"),
                }
                let evs = parser.line(stream, line, at);
                let mut g = cell.lock().unwrap_or_else(|e| e.into_inner());
                forward(evs, &mut **g);
            },
        )
        .await
    };
    // Stages still open end now, whether the process exited, crashed or never started.
    forward(parser.finish(Instant::now()), sink);
    result
}

pub async fn run(inv: &Invocation, opts: &RunOptions, on_spawn: OnSpawn<'_>, on_line: OnLine<'_>) -> Result<ProcessOutcome, PipelineError> {
    let traceparent = opts.traceparent.iter().map(|tp| ("TRACEPARENT".to_string(), tp.clone()));
    let mut cmd = command(&inv.program, &inv.args, &inv.cwd, Stdio::null(), traceparent.chain(inv.env.iter().cloned()));
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| PipelineError::Spawn { program: inv.program.clone(), source })?;
    let pid = child.id().unwrap_or(0);
    let _tracked = super::groups::track(pid);
    on_spawn(pid);
    let group = Pid::from_raw(pid as i32);

    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Stream, String, Instant)>(256);
    let readers = [(Stream::Stdout, child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)), (Stream::Stderr, child.stderr.take().map(|s| Box::new(s) as _))]
        .into_iter()
        .filter_map(|(stream, r)| r.map(|r| tokio::spawn(read_lines(stream, r, tx.clone()))))
        .collect::<Vec<_>>();
    drop(tx);

    let mut tails = (VecDeque::new(), VecDeque::new());
    let mut handle_line = |stream: Stream, line: String, at: Instant, on_line: &mut (dyn FnMut(Stream, &str, Instant) + Send)| {
        on_line(stream, &line, at);
        let tail = if stream == Stream::Stdout { &mut tails.0 } else { &mut tails.1 };
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };

    let deadline = tokio::time::sleep(opts.timeout);
    tokio::pin!(deadline);
    let mut lines_open = true;
    let (status, ended) = loop {
        tokio::select! {
            biased;
            msg = rx.recv(), if lines_open => match msg {
                Some((s, l, at)) => handle_line(s, l, at, on_line),
                None => lines_open = false,
            },
            status = child.wait() => break (Some(status.map_err(PipelineError::Io)?), EndReason::Exited),
            _ = &mut deadline => break (None, EndReason::TimedOut),
            _ = opts.cancel.cancelled() => break (None, EndReason::Cancelled),
        }
    };
    let status = match status {
        Some(s) => s,
        None => terminate_group(&mut child, group, opts.kill_grace).await.map_err(PipelineError::Io)?,
    };
    // The leader is gone; anything it left in its group (a forked helper) goes too.
    let _ = killpg(group, Signal::SIGKILL);
    // Drain what the readers still hold (bounded: the pipes close once the group is dead).
    let drain = async {
        while let Some((s, l, at)) = rx.recv().await {
            handle_line(s, l, at, on_line);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    for r in readers {
        r.abort();
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(ProcessOutcome {
        pid,
        code: status.code(),
        signal: status.signal(),
        ended,
        duration: started.elapsed(),
        stdout_tail: tails.0.into(),
        stderr_tail: tails.1.into(),
    })
}

/// SIGTERM to the whole group, wait up to `grace`, then SIGKILL.
async fn terminate_group(child: &mut tokio::process::Child, group: Pid, grace: Duration) -> std::io::Result<std::process::ExitStatus> {
    let _ = killpg(group, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = killpg(group, Signal::SIGKILL);
            child.wait().await
        }
    }
}

async fn read_lines(stream: Stream, mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin>, tx: tokio::sync::mpsc::Sender<(Stream, String, Instant)>) {
    let mut splitter = LineSplitter::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = Instant::now();
                for line in splitter.push(&buf[..n]) {
                    if tx.send((stream, line, at)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    if let Some(line) = splitter.finish() {
        let _ = tx.send((stream, line, Instant::now())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_tails_leave_out_progress_lines() {
        let o = ProcessOutcome {
            pid: 1,
            code: None,
            signal: Some(9),
            ended: EndReason::Exited,
            duration: Duration::ZERO,
            stdout_tail: ["frame=12", "fps=0.0", "out_time=00:00:00.480000", "progress=continue"].map(String::from).to_vec(),
            stderr_tail: vec![],
        };
        assert_eq!(o.error_tail(), "", "a killed ffmpeg's progress is no error message");
        let o = ProcessOutcome { stderr_tail: vec!["x264 [error]: malloc of size 1327424 failed".into()], ..o };
        assert_eq!(o.error_tail(), ": x264 [error]: malloc of size 1327424 failed");
    }

    fn sh(script: &str) -> Invocation {
        Invocation { program: "sh".into(), args: vec!["-c".into(), script.into()], cwd: std::env::temp_dir(), env: vec![("EXTRA".into(), "yes".into())] }
    }

    fn opts(timeout_ms: u64) -> RunOptions {
        RunOptions { timeout: Duration::from_millis(timeout_ms), kill_grace: Duration::from_millis(300), cancel: CancellationToken::new(), traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()) }
    }

    async fn collect(inv: &Invocation, o: &RunOptions) -> (ProcessOutcome, Vec<(Stream, String)>) {
        let mut lines = Vec::new();
        let out = run(inv, o, &mut |_| {}, &mut |s, l, _| lines.push((s, l.to_string()))).await.unwrap();
        (out, lines)
    }

    fn alive(pid: i32) -> bool {
        // Zombies still answer kill(0): check the state in /proc.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
    }

    #[tokio::test]
    async fn lines_exit_code_env_and_traceparent() {
        // SECRET must not leak: the child gets a clean environment.
        unsafe { std::env::set_var("MUSETALK_TEST_SECRET", "s3cret") };
        let (out, lines) = collect(&sh("echo out:$EXTRA; printf 'a\\rb\\n' >&2; echo tp:$TRACEPARENT; echo secret:$MUSETALK_TEST_SECRET; exit 3"), &opts(5000)).await;
        assert_eq!(out.code, Some(3));
        assert_eq!(out.ended, EndReason::Exited);
        assert!(!out.succeeded());
        assert!(lines.contains(&(Stream::Stdout, "out:yes".into())));
        assert!(lines.contains(&(Stream::Stderr, "a".into())) && lines.contains(&(Stream::Stderr, "b".into())));
        assert!(lines.contains(&(Stream::Stdout, "tp:00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into())));
        assert!(lines.contains(&(Stream::Stdout, "secret:".into())), "{lines:?}");
        assert_eq!(out.status_text(), "exit code 3");
        assert_eq!(out.error_tail(), ": a | b");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group_even_if_sigterm_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let script = format!("trap '' TERM; sleep 60 & echo $! > {p}; echo started; wait", p = pidfile.display());
        let (out, _) = collect(&sh(&script), &opts(500)).await;
        assert_eq!(out.ended, EndReason::TimedOut);
        assert_eq!(out.signal, Some(9), "SIGTERM was trapped, SIGKILL followed");
        let grandchild: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(grandchild), "the grandchild died with the group");
        assert!(!alive(out.pid as i32));
    }

    #[tokio::test]
    async fn cancellation_stops_the_child() {
        let o = opts(60_000);
        let cancel = o.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        let (out, _) = collect(&sh("sleep 30"), &o).await;
        assert_eq!(out.ended, EndReason::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let inv = Invocation { program: "/nonexistent/pipeline".into(), args: vec![], cwd: std::env::temp_dir(), env: vec![] };
        let err = run(&inv, &opts(1000), &mut |_| {}, &mut |_, _, _| {}).await.unwrap_err();
        assert!(err.to_string().contains("cannot start `/nonexistent/pipeline`"), "{err}");
    }

    #[tokio::test]
    async fn leftover_background_processes_are_killed_after_a_clean_exit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let script = format!("sleep 60 & echo $! > {p}; exit 0", p = pidfile.display());
        let (out, _) = collect(&sh(&script), &opts(5000)).await;
        assert!(out.succeeded());
        let orphan: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(orphan));
    }
}
