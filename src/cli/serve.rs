//! `musetalk-sidecar [serve]`: validate the configuration, install telemetry, run the service.

use std::process::ExitCode;

use clap::ArgMatches;

use crate::config::Config;

/// Runs the service until SIGTERM/SIGINT. `matches` are those `config` was parsed from
/// (the TOML file given with `--config` fills what they leave unset).
pub fn main(config: Config, matches: &ArgMatches) -> ExitCode {
    let config = match Config::from_matches(config, matches).and_then(Config::resolved) {
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
        let telemetry = match crate::telemetry::init(&config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match crate::run(config, telemetry, tokio_util::sync::CancellationToken::new()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
