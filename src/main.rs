//! The `musetalk-sidecar` binary: parse the command line and dispatch (src/cli/).

use std::process::ExitCode;

use musetalk_sidecar::cli::{self, Command};

fn main() -> ExitCode {
    let (parsed, matches) = cli::parse();
    let sub = |name: &str| matches.subcommand_matches(name).cloned().unwrap_or_default();
    match parsed.command {
        None => cli::serve::main(parsed.serve, &matches),
        Some(Command::Serve(config)) => cli::serve::main(config, &sub("serve")),
        Some(Command::Infer(args)) => cli::infer::main(args),
        Some(Command::Report(args)) => cli::report::main(args),
        Some(Command::Check(args)) => cli::check::main(args, &sub("check")),
        Some(Command::PreviewRender(r)) => musetalk_sidecar::pipeline::preview::render(r),
        Some(Command::ExitStatus(a)) => musetalk_sidecar::profile::exit_status_main(a),
    }
}
