//! `musetalk-sidecar report JOB_ID`: the report of an earlier job, as the service renders it.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use reqwest::StatusCode;
use reqwest::header::ACCEPT;

use super::CliError;
use super::client::{Client, ServerArgs};

const EXAMPLES: &str = "\
Examples:
  # The text report (the same layout `infer` prints)
  musetalk-sidecar report 5f2c0e1d9a8b4c7d8e6f5a4b3c2d1e0f

  # The service's JSON report, e.g. for jq
  musetalk-sidecar report 5f2c0e1d9a8b4c7d8e6f5a4b3c2d1e0f --json | jq .steps

  # From another host, with auth
  musetalk-sidecar report JOB_ID --server http://gpu-box:8000 --token-file ~/.musetalk-token

Exit status: 0 the job succeeded, 1 it failed (the report is still printed) or cannot be
read (unknown job, still running, service unreachable), 2 wrong arguments.";

#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct ReportArgs {
    /// The job's id, as printed by `infer` (the `job_id` of the API's answers).
    #[arg(value_name = "JOB_ID")]
    pub job_id: String,

    #[command(flatten)]
    pub server: ServerArgs,

    /// Print the service's JSON report (pretty-printed, stable field names) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: ReportArgs) -> ExitCode {
    super::run_client(run(args))
}

async fn run(args: ReportArgs) -> Result<ExitCode, CliError> {
    let id = args.job_id.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(CliError::usage(format!("`{}` is not a job id (the 32 hex characters `infer` prints as `job …`)", args.job_id)));
    }
    let client = Client::new(&args.server)?;
    let report = fetch(&client, id, args.json).await?;
    report.print()?;
    Ok(report.exit_code())
}

/// A finished job's report, ready to print.
pub struct Fetched {
    /// The service's JSON report.
    pub json: serde_json::Value,
    /// What goes to stdout: the text report, or the JSON pretty-printed.
    pub printed: String,
}

impl Fetched {
    /// `outcome` of the report (`succeeded`, `failed`, `cancelled`, `timed_out`).
    pub fn outcome(&self) -> &str {
        self.json["outcome"].as_str().unwrap_or("unknown")
    }

    pub fn succeeded(&self) -> bool {
        self.outcome() == "succeeded"
    }

    /// The failure as `step: message`, when the report has one.
    pub fn error(&self) -> Option<String> {
        let e = self.json.get("error").filter(|e| !e.is_null())?;
        Some(format!("{}: {}", e["step"].as_str().unwrap_or("?"), e["message"].as_str().unwrap_or("?")))
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.succeeded() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    }

    /// Writes the report to stdout (a closed pipe, as with `| head`, is not an error).
    pub fn print(&self) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        match out.write_all(self.printed.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(CliError::failed(format!("cannot write the report to stdout: {e}"))),
        }
    }
}

/// GETs the JSON report (and, unless `json`, the text the service renders from it).
pub async fn fetch(client: &Client, id: &str, json: bool) -> Result<Fetched, CliError> {
    let path = format!("/v1/jobs/{id}/report");
    let resp = client.send(client.get(&path).header(ACCEPT, "application/json")).await?;
    if resp.status() == StatusCode::CONFLICT {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        // "job `ID` is running; the report is ready when it ends"
        let detail = body["detail"].as_str().map(str::to_string).unwrap_or_else(|| format!("job `{id}` has not ended; its report is ready when it ends"));
        return Err(CliError::failed(detail));
    }
    if !resp.status().is_success() {
        return Err(client.error_for(resp, Some(id)).await);
    }
    let value: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| CliError::failed(format!("the report of job `{id}` from {} is not JSON: {e}", client.base())))?;
    let printed = if json {
        let mut s = serde_json::to_string_pretty(&value).unwrap_or_default();
        s.push('\n');
        s
    } else {
        let resp = client.send(client.get(&path).header(ACCEPT, "text/plain")).await?;
        if !resp.status().is_success() {
            return Err(client.error_for(resp, Some(id)).await);
        }
        resp.text().await.map_err(|e| client.transport_error(&e))?
    };
    Ok(Fetched { json: value, printed })
}
