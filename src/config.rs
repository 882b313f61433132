//! The one typed configuration of the service: flags, `MUSETALK_SIDECAR_*` env vars and an optional TOML file.
//!
//! Precedence (highest first): command-line flag, environment variable, TOML file
//! (`--config`), built-in default. Standard `OTEL_*` variables are read by the
//! fields that name them, so a deployment configured for any OpenTelemetry SDK
//! works unchanged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Which pipeline runs the jobs (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// ffmpeg only: the input video looped to the audio's length and re-muxed. No model.
    Preview,
    /// MuseTalk's own `scripts.inference`, one subprocess per job.
    Musetalk,
    /// Any pipeline given as an argv template (`--pipeline-command`).
    Command,
}

impl BackendKind {
    /// The bounded label value used on metrics and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Preview => "preview",
            BackendKind::Musetalk => "musetalk",
            BackendKind::Command => "command",
        }
    }
}

/// OTLP transport, named as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (tonic), usually port 4317.
    #[value(name = "grpc")]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies, usually port 4318.
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Everything `serve` needs. Every field is a `--flag`, a `MUSETALK_SIDECAR_*`
/// variable and a key of the optional TOML file (the field name, `_` or `-`).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TOML file with any of these settings (keys are the flag names). Flags and env vars win over it.
    #[arg(long, env = "MUSETALK_SIDECAR_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address of the API listener.
    #[arg(long, env = "MUSETALK_SIDECAR_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,

    /// Separate listener for /metrics, /healthz and /readyz, so a public port never exposes them. Unset: they are served on --listen.
    #[arg(long, env = "MUSETALK_SIDECAR_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Where job directories (uploads, outputs, logs) live.
    #[arg(long, env = "MUSETALK_SIDECAR_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// This replica's name behind a routing proxy (docs/cluster.md): job ids become
    /// `{name}-{32 hex}`, so the proxy sends every follow-up to the replica that owns the
    /// job. A DNS label (a Kubernetes pod name fits). Unset: one instance, plain ids.
    #[arg(long, env = "MUSETALK_SIDECAR_INSTANCE_NAME")]
    pub instance_name: Option<String>,

    /// Storage every replica shares (a ReadWriteMany volume): avatars live in
    /// `{shared-dir}/avatars`, so any replica speaks for any avatar, and a replacement
    /// serves the avatars of the one it replaced. Unset: `{data-dir}/avatars`.
    #[arg(long, env = "MUSETALK_SIDECAR_SHARED_DIR")]
    pub shared_dir: Option<PathBuf>,

    /// Pipeline that runs the jobs.
    #[arg(long, env = "MUSETALK_SIDECAR_BACKEND", value_enum, default_value = "preview")]
    pub backend: BackendKind,

    /// MuseTalk repository root (holds scripts/ and models/); required by --backend musetalk.
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_DIR")]
    pub musetalk_dir: Option<PathBuf>,

    /// Python interpreter that can import MuseTalk's dependencies.
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_PYTHON", default_value = "python3")]
    pub musetalk_python: String,

    /// MuseTalk model version passed as --version (output lands in RESULT_DIR/VERSION/).
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_VERSION", default_value = "v15")]
    pub musetalk_version: String,

    /// UNet weights, relative to --musetalk-dir unless absolute.
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_UNET_MODEL_PATH", default_value = "./models/musetalkV15/unet.pth")]
    pub musetalk_unet_model_path: String,

    /// UNet config JSON, relative to --musetalk-dir unless absolute.
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_UNET_CONFIG", default_value = "./models/musetalkV15/musetalk.json")]
    pub musetalk_unet_config: String,

    /// Default --batch_size for MuseTalk when a request gives none. Unset: MuseTalk's own default.
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_BATCH_SIZE")]
    pub musetalk_batch_size: Option<u32>,

    /// Pass --use_float16 to MuseTalk (faster, less GPU memory).
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_FLOAT16", default_value_t = false)]
    pub musetalk_float16: bool,

    /// Pass --gpu_id to MuseTalk. Unset: MuseTalk's default (0).
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_GPU_ID")]
    pub musetalk_gpu_id: Option<u32>,

    /// Pipeline for --backend command: an argv template (split like a shell would, but never run by one) with {video}, {audio}, {output} and {workdir} placeholders.
    #[arg(long, env = "MUSETALK_SIDECAR_PIPELINE_COMMAND")]
    pub pipeline_command: Option<String>,

    /// Extra KEY=VALUE environment for pipeline processes (they otherwise get a clean environment: PATH, HOME, LANG and CUDA/NVIDIA variables). Repeatable; comma-separated in the env var.
    #[arg(long = "pipeline-env", env = "MUSETALK_SIDECAR_PIPELINE_ENV", value_delimiter = ',', value_name = "KEY=VALUE")]
    #[serde(default)]
    pub pipeline_env: Vec<String>,

    /// Start realtime workers at boot (musetalk and command backends): models stay loaded for avatars and speak. The preview backend serves realtime mode without workers.
    #[arg(long, env = "MUSETALK_SIDECAR_REALTIME", default_value_t = false)]
    pub realtime: bool,

    /// GPUs for realtime workers, one worker each (sets CUDA_VISIBLE_DEVICES). Comma-separated.
    #[arg(long, env = "MUSETALK_SIDECAR_REALTIME_GPUS", value_delimiter = ',', default_value = "0")]
    pub realtime_gpus: Vec<String>,

    /// Realtime worker program (argv, no shell) speaking docs/worker-protocol.md. Default with --backend musetalk: MUSETALK_PYTHON -u MUSETALK_WORKER_SCRIPT with the MuseTalk flags.
    #[arg(long, env = "MUSETALK_SIDECAR_WORKER_COMMAND")]
    pub worker_command: Option<String>,

    /// The shipped MuseTalk worker script (relative to the current directory unless absolute).
    #[arg(long, env = "MUSETALK_SIDECAR_MUSETALK_WORKER_SCRIPT", default_value = "worker/musetalk_worker.py")]
    pub musetalk_worker_script: PathBuf,

    /// A realtime worker must say `ready` (models loaded) within this long, or it is restarted.
    #[arg(long, env = "MUSETALK_SIDECAR_WORKER_READY_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub worker_ready_timeout: Duration,

    /// ffmpeg executable (the preview backend, probing and MuseTalk's --ffmpeg_path).
    #[arg(long, env = "MUSETALK_SIDECAR_FFMPEG", default_value = "ffmpeg")]
    pub ffmpeg: PathBuf,

    /// ffprobe executable (input validation, output duration).
    #[arg(long, env = "MUSETALK_SIDECAR_FFPROBE", default_value = "ffprobe")]
    pub ffprobe: PathBuf,

    /// The persistent media probe: `auto` (musetalk-probe-helper next to this binary, when
    /// it is there), `off` (ffprobe once per file), or the helper's path. Where a helper
    /// cannot start, ffprobe answers instead (said once in the log and by `check`).
    #[arg(long, env = "MUSETALK_SIDECAR_PROBE_HELPER", default_value = "auto")]
    pub probe_helper: String,

    /// One probe query of a file (its headers, its start decoded, or its packets counted;
    /// an upload takes one or two) must take no longer: past it the probe is killed and
    /// the upload refused (a hostile file must not hang a request).
    #[arg(long, env = "MUSETALK_SIDECAR_PROBE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,

    /// py-spy executable, for per-job Python profiles (`profile=true`, `--profile-ratio`).
    #[arg(long = "py-spy", env = "MUSETALK_SIDECAR_PY_SPY", default_value = "py-spy")]
    pub py_spy: PathBuf,

    /// Share of inference and speak jobs profiled without asking (0 = only on request, 1 = all).
    #[arg(long, env = "MUSETALK_SIDECAR_PROFILE_RATIO", default_value_t = 0.0)]
    pub profile_ratio: f64,

    /// py-spy samples per second while profiling a job.
    #[arg(long, env = "MUSETALK_SIDECAR_PROFILE_RATE", default_value_t = 100)]
    pub profile_rate: u32,

    /// Jobs that run at once; the rest wait in the admission queue.
    #[arg(long, env = "MUSETALK_SIDECAR_MAX_CONCURRENT_JOBS", default_value_t = 1)]
    pub max_concurrent_jobs: usize,

    /// Jobs that may wait for a slot; beyond it requests get 429 with Retry-After.
    #[arg(long, env = "MUSETALK_SIDECAR_QUEUE_SIZE", default_value_t = 16)]
    pub queue_size: usize,

    /// Resource sampling period (CPU, memory, process trees, GPU).
    #[arg(long, env = "MUSETALK_SIDECAR_SAMPLE_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,

    /// How far back the sample ring buffer reaches (bounds per-job resource windows and memory).
    #[arg(long, env = "MUSETALK_SIDECAR_SAMPLE_RETENTION", default_value = "35m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub sample_retention: Duration,

    /// A job running longer is stopped: SIGTERM to its process group, SIGKILL after --kill-grace.
    #[arg(long, env = "MUSETALK_SIDECAR_JOB_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a pipeline process group is stopped.
    #[arg(long, env = "MUSETALK_SIDECAR_KILL_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,

    /// Finished jobs (directory, output, report) are deleted after this long.
    #[arg(long, env = "MUSETALK_SIDECAR_JOB_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,

    /// At most this many finished jobs are kept (oldest deleted first).
    #[arg(long, env = "MUSETALK_SIDECAR_MAX_RETAINED_JOBS", default_value_t = 200)]
    pub max_retained_jobs: usize,

    /// Largest accepted upload per file part, in bytes.
    #[arg(long, env = "MUSETALK_SIDECAR_MAX_UPLOAD_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// An upload (all parts of one request) must arrive within this long, or it is refused (408) and its place in the queue freed.
    #[arg(long, env = "MUSETALK_SIDECAR_UPLOAD_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub upload_timeout: Duration,

    /// On SIGTERM, running jobs get this long to finish before they are cancelled.
    #[arg(long, env = "MUSETALK_SIDECAR_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,

    /// File holding the bearer token(s) that /v1/* requires, one per line. Unset: no auth.
    #[arg(long, env = "MUSETALK_SIDECAR_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Log format on stderr (level filter: RUST_LOG, default info).
    #[arg(long, env = "MUSETALK_SIDECAR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// OTLP collector base URL (e.g. http://jaeger:4317 for grpc, http://jaeger:4318 for http/protobuf). Unset: no span export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum, default_value = "grpc")]
    pub otlp_protocol: OtlpProtocol,

    /// Grafana dashboard linked from the status page; `{from}`/`{to}` (epoch ms) and `{trace_id}` are filled in, otherwise `from`/`to` are appended for a job's time range.
    #[arg(long, env = "MUSETALK_SIDECAR_GRAFANA_URL")]
    pub grafana_url: Option<String>,

    /// Trace UI link template for reports, with {trace_id} (e.g. http://jaeger:16686/trace/{trace_id}).
    #[arg(long, env = "MUSETALK_SIDECAR_TRACE_UI_URL")]
    pub trace_ui_url: Option<String>,
}

/// What is wrong with a configuration; each variant names the setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    ParseFile { path: PathBuf, source: toml::de::Error },
    #[error("config file {path}: {message}")]
    BadFileValue { path: PathBuf, message: String },
    #[error("--{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

impl Config {
    /// Builds the config from parsed arguments, overlaying the TOML file (if any) under
    /// every value that came from neither a flag nor an environment variable.
    pub fn from_matches(parsed: Config, matches: &ArgMatches) -> Result<Config, ConfigError> {
        let Some(path) = parsed.config.clone() else {
            return Ok(parsed);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile { path: path.clone(), source })?;
        let file: toml::Table =
            toml::from_str(&text).map_err(|source| ConfigError::ParseFile { path: path.clone(), source })?;
        let bad = |message: String| ConfigError::BadFileValue { path: path.clone(), message };
        let mut merged = toml::Table::try_from(&parsed).map_err(|e| bad(e.to_string()))?;
        for (key, value) in file {
            let id = key.replace('-', "_");
            let explicit = match matches.try_contains_id(&id) {
                Ok(_) => matches!(
                    matches.value_source(&id),
                    Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
                ),
                Err(_) => return Err(bad(format!("unknown setting `{key}`"))),
            };
            if !explicit {
                merged.insert(id, value);
            }
        }
        let mut config: Config = merged.try_into().map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
        config.config = Some(path);
        Ok(config)
    }

    /// Checks values that clap's types cannot express; filesystem checks that need the
    /// backend live in the backend's own readiness probe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |flag, message: &str| Err(ConfigError::Invalid { flag, message: message.to_string() });
        if self.max_concurrent_jobs == 0 {
            return invalid("max-concurrent-jobs", "must be at least 1");
        }
        if let Some(name) = &self.instance_name {
            let label = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            let b = name.as_bytes();
            if b.is_empty() || b.len() > 63 || !b.iter().all(|&c| label(c) || c == b'-') || !label(b[0]) || !label(b[b.len() - 1]) {
                return invalid("instance-name", "must be a DNS label: 1–63 of a–z, 0–9 and `-`, starting and ending with a letter or digit");
            }
        }
        if self.sample_interval < Duration::from_millis(50) {
            return invalid("sample-interval", "must be at least 50ms (CPU usage needs a measurable gap)");
        }
        if self.sample_retention < self.sample_interval {
            return invalid("sample-retention", "must be at least one --sample-interval");
        }
        if self.job_timeout.is_zero() {
            return invalid("job-timeout", "must be greater than zero");
        }
        if self.probe_timeout.is_zero() {
            return invalid("probe-timeout", "must be greater than zero");
        }
        if self.max_upload_bytes == 0 {
            return invalid("max-upload-bytes", "must be greater than zero");
        }
        if !(0.0..=1.0).contains(&self.profile_ratio) {
            return invalid("profile-ratio", "must be from 0 to 1 (the share of jobs profiled)");
        }
        if !(1..=1000).contains(&self.profile_rate) {
            return invalid("profile-rate", "must be from 1 to 1000 samples per second");
        }
        for kv in &self.pipeline_env {
            match kv.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains('\0') => {}
                _ => return invalid("pipeline-env", &format!("`{kv}` is not KEY=VALUE")),
            }
        }
        match self.backend {
            BackendKind::Musetalk if self.musetalk_dir.is_none() => {
                return invalid("musetalk-dir", "is required with --backend musetalk (the MuseTalk repository root)");
            }
            BackendKind::Command => {
                let Some(cmd) = &self.pipeline_command else {
                    return invalid("pipeline-command", "is required with --backend command");
                };
                let argv = self.pipeline_argv().map_err(|message| ConfigError::Invalid { flag: "pipeline-command", message })?;
                if argv.is_empty() {
                    return invalid("pipeline-command", "is empty");
                }
                if !cmd.contains("{output}") {
                    return invalid("pipeline-command", "must contain {output}: where the pipeline writes its mp4");
                }
            }
            _ => {}
        }
        if let Some(cmd) = &self.worker_command {
            match shell_words::split(cmd) {
                Ok(argv) if !argv.is_empty() => {}
                Ok(_) => return invalid("worker-command", "is empty"),
                Err(e) => return invalid("worker-command", &format!("cannot split `{cmd}`: {e}")),
            }
        }
        if self.realtime_gpus.is_empty() || self.realtime_gpus.iter().any(|g| g.is_empty() || !g.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')) {
            return invalid("realtime-gpus", "must be a comma-separated list of GPU indices or UUIDs");
        }
        for (flag, url) in [("grafana-url", &self.grafana_url), ("trace-ui-url", &self.trace_ui_url)] {
            if let Some(u) = url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                return invalid(flag, "must be an http:// or https:// URL");
            }
        }
        if let Some(url) = &self.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return invalid("otlp-endpoint", "must be an http:// or https:// URL");
        }
        Ok(())
    }

    /// [`Config::validate`], then every path setting made absolute against the current
    /// directory, once: pipelines and workers run in their own directories (a job's
    /// dir, the MuseTalk repo), so a path relative to the service's would name another
    /// file there. Idempotent. `serve`, `check` and [`crate::run`] all go through it.
    ///
    /// Left as given, deliberately: programs without a `/` (looked up on `PATH`), and
    /// `--musetalk-unet-model-path`/`--musetalk-unet-config`, which are relative to
    /// `--musetalk-dir` as MuseTalk itself expects (it runs there).
    pub fn resolved(mut self) -> Result<Config, ConfigError> {
        self.validate()?;
        let cwd = std::env::current_dir().map_err(|e| ConfigError::Invalid { flag: "data-dir", message: format!("the current directory is unreadable ({e}), so relative paths cannot be resolved: give absolute ones") })?;
        let abs = |p: &Path| if p.is_absolute() { normalized(p) } else { normalized(&cwd.join(p)) };
        // A program named with a `/` is a path; a bare name is for PATH to find.
        let program = |p: &str| if p.contains('/') { abs(Path::new(p)).display().to_string() } else { p.to_string() };
        self.config = self.config.as_deref().map(abs);
        self.data_dir = abs(&self.data_dir);
        self.shared_dir = self.shared_dir.as_deref().map(abs);
        self.musetalk_dir = self.musetalk_dir.as_deref().map(abs);
        self.musetalk_python = program(&self.musetalk_python);
        self.musetalk_worker_script = abs(&self.musetalk_worker_script);
        self.ffmpeg = PathBuf::from(program(&self.ffmpeg.display().to_string()));
        self.ffprobe = PathBuf::from(program(&self.ffprobe.display().to_string()));
        self.py_spy = PathBuf::from(program(&self.py_spy.display().to_string()));
        if !matches!(self.probe_helper.as_str(), "auto" | "off") {
            self.probe_helper = program(&self.probe_helper);
        }
        self.auth_token_file = self.auth_token_file.as_deref().map(abs);
        // The program of an argv template (validated above, so it splits).
        let with_program = |cmd: &str| -> String {
            let mut argv = shell_words::split(cmd).unwrap_or_default();
            match argv.first_mut() {
                Some(first) if first.contains('/') && !Path::new(first.as_str()).is_absolute() => {
                    *first = program(first);
                    shell_words::join(argv)
                }
                _ => cmd.to_string(),
            }
        };
        self.pipeline_command = self.pipeline_command.as_deref().map(with_program);
        self.worker_command = self.worker_command.as_deref().map(with_program);
        Ok(self)
    }

    /// The path settings as `serve` logs them and `check` prints them.
    pub fn paths_summary(&self) -> String {
        let mut parts = vec![format!("data dir {}", self.data_dir.display())];
        if let Some(d) = &self.musetalk_dir {
            parts.push(format!("musetalk dir {}", d.display()));
        }
        if let Some(f) = &self.auth_token_file {
            parts.push(format!("token file {}", f.display()));
        }
        if let Some(f) = &self.config {
            parts.push(format!("config file {}", f.display()));
        }
        parts.join(", ")
    }

    /// The `--pipeline-command` template split into argv (no shell ever sees it).
    pub fn pipeline_argv(&self) -> Result<Vec<String>, String> {
        match &self.pipeline_command {
            None => Ok(Vec::new()),
            Some(cmd) => shell_words::split(cmd).map_err(|e| format!("cannot split `{cmd}`: {e}")),
        }
    }

    /// `--pipeline-env` as pairs (validated by [`Config::validate`]).
    pub fn pipeline_env_pairs(&self) -> Vec<(String, String)> {
        self.pipeline_env
            .iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    /// Samples the ring buffer holds: retention / interval, at least 2.
    pub fn ring_capacity(&self) -> usize {
        let n = self.sample_retention.as_nanos() / self.sample_interval.as_nanos().max(1);
        (n as usize).max(2)
    }

    /// Where the job directories live.
    pub fn jobs_dir(&self) -> PathBuf {
        self.data_dir.join("jobs")
    }

    /// `data/avatars/{id}/`: source video, the engine's material, `avatar.json`.
    pub fn avatars_dir(&self) -> PathBuf {
        self.shared_dir.as_deref().unwrap_or(&self.data_dir).join("avatars")
    }

    /// A path under the MuseTalk dir, unless already absolute.
    pub fn musetalk_path(&self, p: &str) -> Option<PathBuf> {
        let root = self.musetalk_dir.as_deref()?;
        let p = Path::new(p);
        Some(if p.is_absolute() { p.to_path_buf() } else { root.join(p) })
    }
}

/// `p` without its `.` components. `..` stays: folding it lexically would be wrong
/// after a symlink, and the data dir may not exist yet to be canonicalized.
fn normalized(p: &Path) -> PathBuf {
    p.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let m = Cli::command().try_get_matches_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        Config::from_matches(cli.config, &m)
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8000");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.backend, BackendKind::Preview);
        assert_eq!(c.musetalk_python, "python3");
        assert_eq!(c.max_concurrent_jobs, 1);
        assert_eq!(c.queue_size, 16);
        assert_eq!(c.sample_interval, Duration::from_millis(500));
        assert_eq!(c.job_timeout, Duration::from_secs(1800));
        assert!(c.auth_token_file.is_none());
        c.validate().unwrap();
        assert_eq!(c.ring_capacity(), 35 * 60 * 2);
    }

    #[test]
    fn toml_file_fills_what_flags_leave_unset() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "queue-size = 3\nmax_concurrent_jobs = 2\nlisten = \"127.0.0.1:9\"\nsample_interval = \"250ms\"\n").unwrap();
        let c = parse(&["--config", file.to_str().unwrap(), "--listen", "127.0.0.1:7"]).unwrap();
        assert_eq!(c.queue_size, 3);
        assert_eq!(c.max_concurrent_jobs, 2);
        assert_eq!(c.sample_interval, Duration::from_millis(250));
        assert_eq!(c.listen.to_string(), "127.0.0.1:7", "the flag wins over the file");
    }

    #[test]
    fn toml_file_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "no_such_setting = 1\n").unwrap();
        let err = parse(&["--config", file.to_str().unwrap()]).unwrap_err().to_string();
        assert!(err.contains("unknown setting `no_such_setting`"), "{err}");
        std::fs::write(&file, "queue_size = \"many\"\n").unwrap();
        let err = parse(&["--config", file.to_str().unwrap()]).unwrap_err().to_string();
        assert!(err.contains("queue_size") || err.contains("invalid type"), "{err}");
        let err = parse(&["--config", "/nonexistent/x.toml"]).unwrap_err().to_string();
        assert!(err.contains("cannot read config file"), "{err}");
    }

    #[test]
    fn validate_rejects_inconsistent_settings() {
        let cases: &[(&[&str], &str)] = &[
            (&["--max-concurrent-jobs", "0"], "max-concurrent-jobs"),
            (&["--sample-interval", "1ms"], "sample-interval"),
            (&["--profile-ratio", "1.5"], "profile-ratio"),
            (&["--profile-rate", "0"], "profile-rate"),
            (&["--backend", "musetalk"], "musetalk-dir"),
            (&["--backend", "command"], "pipeline-command"),
            (&["--backend", "command", "--pipeline-command", "cp {video} /tmp/x"], "{output}"),
            (&["--backend", "command", "--pipeline-command", "sh -c 'unterminated"], "cannot split"),
            (&["--pipeline-env", "NOEQUALS"], "pipeline-env"),
            (&["--otlp-endpoint", "jaeger:4317"], "otlp-endpoint"),
        ];
        for (args, needle) in cases {
            let err = parse(args).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn relative_paths_are_resolved_once_against_the_current_directory() {
        let cwd = std::env::current_dir().unwrap();
        let c = parse(&[
            "--data-dir", "./data", "--musetalk-dir", "../MuseTalk", "--auth-token-file", "tokens",
            "--ffmpeg", "bin/ffmpeg", "--ffprobe", "ffprobe", "--musetalk-python", ".venv/bin/python",
            "--backend", "command", "--pipeline-command", "./run.sh --in {video} --out {output}",
            "--worker-command", "python3 -u worker.py",
        ])
        .unwrap()
        .resolved()
        .unwrap();
        assert_eq!(c.data_dir, cwd.join("data"));
        assert_eq!(c.musetalk_dir.as_deref(), Some(cwd.join("../MuseTalk").as_path()));
        assert_eq!(c.auth_token_file.as_deref(), Some(cwd.join("tokens").as_path()));
        assert_eq!(c.ffmpeg, cwd.join("bin/ffmpeg"));
        assert_eq!(c.ffprobe, PathBuf::from("ffprobe"), "a bare name is for PATH");
        assert_eq!(c.musetalk_python, cwd.join(".venv/bin/python").display().to_string());
        assert_eq!(c.musetalk_worker_script, cwd.join("worker/musetalk_worker.py"));
        assert_eq!(c.pipeline_argv().unwrap()[0], cwd.join("run.sh").display().to_string());
        assert_eq!(c.pipeline_argv().unwrap()[1..], ["--in", "{video}", "--out", "{output}"]);
        assert_eq!(c.worker_command.as_deref(), Some("python3 -u worker.py"), "a program on PATH is left to PATH");
        assert_eq!(c.musetalk_unet_model_path, "./models/musetalkV15/unet.pth", "relative to --musetalk-dir, where MuseTalk runs");
        let again = c.clone().resolved().unwrap();
        assert_eq!((again.data_dir, again.pipeline_command), (c.data_dir, c.pipeline_command), "resolving twice changes nothing");
        assert!(parse(&["--max-concurrent-jobs", "0"]).unwrap().resolved().is_err(), "resolved() validates");
    }

    #[test]
    fn pipeline_command_is_split_without_a_shell() {
        let c = parse(&["--backend", "command", "--pipeline-command", "run.py --in '{video}' --out {output} ; rm -rf /"]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.pipeline_argv().unwrap(), ["run.py", "--in", "{video}", "--out", "{output}", ";", "rm", "-rf", "/"]);
    }
}
