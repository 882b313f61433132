//! The `musetalk-sidecar` binary: parse the command line, install telemetry, run.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use musetalk_sidecar::config::Config;

/// Runs the MuseTalk lip-sync pipeline behind HTTP and makes every request observable.
#[derive(Parser)]
#[command(name = "musetalk-sidecar", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default when no subcommand is given).
    Serve(Config),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let (config, m) = match cli.command {
        Some(Command::Serve(c)) => (c, matches.subcommand_matches("serve").cloned().unwrap_or_default()),
        None => (cli.serve, matches),
    };
    let config = match Config::from_matches(config, &m).and_then(|c| c.validate().map(|_| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match musetalk_sidecar::telemetry::init(&config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match musetalk_sidecar::run(config, telemetry, tokio_util::sync::CancellationToken::new()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
