//! The command line: `serve` (the default), and the client subcommands `infer`,
//! `report` and `check` (DESIGN.md §6).
//!
//! Conventions shared by every subcommand: results on stdout, progress and errors on
//! stderr; colours only on a terminal and never with `NO_COLOR` (anstream strips them);
//! an error is one line naming the cause and the fix; exit status 0 on success, 1 when
//! the service or the job failed, 2 when the invocation or its inputs are wrong (clap's
//! own usage errors are 2 as well).

pub mod check;
pub mod client;
pub mod infer;
pub mod report;
pub mod serve;

use std::process::ExitCode;

use anstyle::{AnsiColor, Style};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::Config;

const TOP_EXAMPLES: &str = "\
Examples:
  # Run the service (serve is the default subcommand)
  musetalk-sidecar --listen 0.0.0.0:8000 --backend preview

  # Check the set-up of a MuseTalk deployment before serving it
  musetalk-sidecar check --backend musetalk --musetalk-dir /opt/MuseTalk

  # Lip-sync a video with a running service, save the result, print the report
  musetalk-sidecar infer --video face.mp4 --audio speech.wav

  # The report of an earlier job, as JSON
  musetalk-sidecar report 5f2c0e1d9a8b4c7d8e6f5a4b3c2d1e0f --json

Client subcommands talk to --server (MUSETALK_SIDECAR_SERVER, default http://127.0.0.1:8000).
Exit status: 0 success, 1 the service or the job failed, 2 wrong arguments or inputs.";

const SERVE_EXAMPLES: &str = "\
Examples:
  musetalk-sidecar serve --listen 0.0.0.0:8000 --data-dir /var/lib/musetalk
  musetalk-sidecar serve --backend musetalk --musetalk-dir /opt/MuseTalk --musetalk-float16
  OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4317 musetalk-sidecar serve \\
      --trace-ui-url 'http://jaeger:16686/trace/{trace_id}'
  musetalk-sidecar serve --config /etc/musetalk-sidecar.toml";

/// Runs the MuseTalk lip-sync pipeline behind HTTP and makes every request observable.
#[derive(Parser)]
#[command(name = "musetalk-sidecar", version, args_conflicts_with_subcommands = true, after_help = TOP_EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service (the default when no subcommand is given).
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(Config),
    /// Upload a video and an audio file to a running service, follow the job, save the
    /// lip-synced video and print the job's report.
    Infer(infer::InferArgs),
    /// Print the report of an earlier job (text, or the service's JSON with --json).
    Report(report::ReportArgs),
    /// Diagnose this set-up (ffmpeg, NVIDIA GPU/NVML, MuseTalk dir, models and Python
    /// packages, OTLP endpoint, data dir); exits 1 when something required is missing.
    Check(check::CheckArgs),
    /// Internal: the preview backend's render passes (run by the service as a job's pipeline).
    #[command(hide = true)]
    PreviewRender(crate::pipeline::preview::Render),
    /// Internal: runs a profiled pipeline under py-spy and records how it ended.
    #[command(hide = true)]
    ExitStatus(crate::profile::ExitStatusArgs),
}

/// Parses the command line (exits with clap's message and status 2 on a usage error).
pub fn parse() -> (Cli, ArgMatches) {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (cli, matches)
}

/// A failure of a client subcommand: one line for stderr, and the exit status.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    /// The invocation or its inputs are wrong (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError { code: 2, message: message.into() }
    }
    /// The service or the job failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        CliError { code: 1, message: message.into() }
    }
}

pub(crate) const ERROR: Style = AnsiColor::Red.on_default().bold();
pub(crate) const WARN: Style = AnsiColor::Yellow.on_default().bold();
pub(crate) const OK: Style = AnsiColor::Green.on_default();
pub(crate) const DIM: Style = Style::new().dimmed();

/// Prints `error: …` on stderr (coloured on a terminal).
pub fn print_error(message: &str) {
    anstream::eprintln!("{ERROR}error:{ERROR:#} {message}");
}

/// Runs a client subcommand on a small runtime and turns its result into an exit status.
pub(crate) fn run_client<F>(fut: F) -> ExitCode
where
    F: std::future::Future<Output = Result<ExitCode, CliError>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            print_error(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            print_error(&e.message);
            ExitCode::from(e.code)
        }
    }
}

/// `1536` → `1.5 KiB` (same units as the report).
pub(crate) fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", U[i]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_and_subcommands_parse() {
        let m = Cli::command().try_get_matches_from(["x", "--listen", "127.0.0.1:1"]).unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.to_string(), "127.0.0.1:1");

        let m = Cli::command().try_get_matches_from(["x", "infer", "--video", "v.mp4", "--audio", "a.wav", "--bbox-shift", "-7"]).unwrap();
        let Some(Command::Infer(a)) = Cli::from_arg_matches(&m).unwrap().command else { panic!("not infer") };
        assert_eq!(a.bbox_shift, Some(-7));

        // Serve flags and a subcommand do not mix.
        assert!(Cli::command().try_get_matches_from(["x", "--listen", "127.0.0.1:1", "report", "j"]).is_err());
        // Out-of-range values are usage errors.
        let e = Cli::command().try_get_matches_from(["x", "infer", "--video", "v", "--audio", "a", "--batch-size", "0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn byte_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
