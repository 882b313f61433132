//! `musetalk-sidecar check`: diagnoses a set-up — the troubleshooting section, automated.
//!
//! Takes the same configuration as `serve` (flags, env, `--config`), so
//! `check --backend musetalk --musetalk-dir X` checks exactly what `serve` would run.
//! One line per check (`ok|warn|FAIL  name  detail`), a `fix:` line under each one that
//! is not ok, a summary; exit 1 when a required check failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anstyle::Style;
use clap::{ArgMatches, Args};
use tokio::process::Command;

use super::{DIM, ERROR, OK, WARN, human_bytes};
use crate::config::{BackendKind, Config, ConfigError};

const EXAMPLES: &str = "\
Examples:
  # The default set-up (preview backend)
  musetalk-sidecar check

  # A MuseTalk deployment, exactly as it will be served
  musetalk-sidecar check --backend musetalk --musetalk-dir /opt/MuseTalk \\
      --musetalk-python /opt/MuseTalk/.venv/bin/python

  # The same settings as a running deployment (env vars and --config are honoured)
  musetalk-sidecar check --config /etc/musetalk-sidecar.toml --require-gpu

Every flag of `serve` is accepted. Output: one line per check (`ok`, `warn` or `FAIL`,
the check, what was found) and a `fix:` line under each one that is not ok.
Exit status: 0 nothing required is missing (warnings allowed), 1 a check failed,
2 wrong arguments.";

/// Below this much free space in the data dir, `check` warns (uploads and outputs of kept jobs live there).
const LOW_SPACE: u64 = 5 * 1024 * 1024 * 1024;

/// Model weights smaller than this are placeholders or broken downloads (the real ones are 40 MB – 3.4 GB).
const TINY_WEIGHTS: u64 = 1024 * 1024;

/// Which set-ups need a file of MuseTalk's layout.
#[derive(Clone, Copy, PartialEq)]
enum Need {
    /// Every inference run opens it.
    Always,
    /// The UNet of one version: needed when `--musetalk-unet-*` point at it.
    Unet,
    /// Training only.
    Training,
}

/// MuseTalk's documented `models/` layout (its README, "organized in `models` as follows").
const MODEL_LAYOUT: &[(&str, Need)] = &[
    ("models/musetalk/musetalk.json", Need::Unet),
    ("models/musetalk/pytorch_model.bin", Need::Unet),
    ("models/musetalkV15/musetalk.json", Need::Unet),
    ("models/musetalkV15/unet.pth", Need::Unet),
    ("models/syncnet/latentsync_syncnet.pt", Need::Training),
    ("models/dwpose/dw-ll_ucoco_384.pth", Need::Always),
    ("models/face-parse-bisent/79999_iter.pth", Need::Always),
    ("models/face-parse-bisent/resnet18-5c106cde.pth", Need::Always),
    ("models/sd-vae/config.json", Need::Always),
    ("models/sd-vae/diffusion_pytorch_model.bin", Need::Always),
    ("models/whisper/config.json", Need::Always),
    ("models/whisper/pytorch_model.bin", Need::Always),
    ("models/whisper/preprocessor_config.json", Need::Always),
];

/// Python modules MuseTalk's inference imports (import name, pip package).
const PYTHON_MODULES: &[(&str, &str)] = &[
    ("torch", "torch"),
    ("diffusers", "diffusers"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("omegaconf", "omegaconf"),
    ("cv2", "opencv-python"),
    ("librosa", "librosa"),
    ("soundfile", "soundfile"),
    ("mmcv", "mmcv"),
    ("mmdet", "mmdet"),
    ("mmpose", "mmpose"),
];

/// Imports each module and prints JSON: the failures, and torch's CUDA view when it imports.
const IMPORT_SCRIPT: &str = r#"
import importlib, json, sys
missing = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as e:
        missing[name] = (type(e).__name__ + ": " + str(e)).strip()
cuda = None
if "torch" not in missing:
    try:
        import torch
        cuda = {"version": torch.__version__, "available": bool(torch.cuda.is_available()), "devices": torch.cuda.device_count()}
    except BaseException as e:
        cuda = {"error": str(e)}
print(json.dumps({"missing": missing, "torch": cuda}))
"#;

#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: Config,

    /// Fail (instead of warn) when no NVIDIA GPU is usable through NVML.
    #[arg(long)]
    pub require_gpu: bool,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the output.
#[derive(Debug)]
pub struct Outcome {
    pub level: Level,
    pub name: String,
    pub detail: String,
    pub fix: Option<String>,
}

fn ok(name: &str, detail: impl Into<String>) -> Outcome {
    Outcome { level: Level::Ok, name: name.into(), detail: detail.into(), fix: None }
}
fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Outcome {
    Outcome { level: Level::Warn, name: name.into(), detail: detail.into(), fix: Some(fix.into()) }
}
fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Outcome {
    Outcome { level: Level::Fail, name: name.into(), detail: detail.into(), fix: Some(fix.into()) }
}

/// Prints each outcome as it comes, and counts them.
#[derive(Default)]
struct Printer {
    counts: [usize; 3],
}

impl Printer {
    fn print(&mut self, o: Outcome) {
        let (label, style): (&str, Style) = match o.level {
            Level::Ok => ("ok", OK),
            Level::Warn => ("warn", WARN),
            Level::Fail => ("FAIL", ERROR),
        };
        self.counts[o.level as usize] += 1;
        anstream::println!("{style}{label:<4}{style:#}  {:<16} {}", o.name, o.detail);
        if let Some(fix) = o.fix {
            Self::fix(&fix);
        }
    }

    fn fix(fix: &str) {
        anstream::println!("      {DIM}fix:{DIM:#} {fix}");
    }

    /// Related checks with one fix, printed once after them when any is not ok.
    fn print_group(&mut self, outcomes: Vec<Outcome>, fix: String) {
        let needed = outcomes.iter().any(|o| o.level != Level::Ok);
        for o in outcomes {
            self.print(o);
        }
        if needed {
            Self::fix(&fix);
        }
    }
}

pub fn main(args: CheckArgs, matches: &ArgMatches) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            super::print_error(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, matches))
}

async fn run(args: CheckArgs, matches: &ArgMatches) -> ExitCode {
    let mut p = Printer::default();
    let flags_only = args.config.clone();
    let config = match Config::from_matches(args.config, matches) {
        Ok(c) => c,
        Err(e) => {
            p.print(fail("config", e.to_string(), "fix the file given with --config (keys are the flag names; see `musetalk-sidecar serve --help`)"));
            flags_only
        }
    };
    let config = check_config(config, &mut p);

    p.print(tool(&config.ffmpeg, "ffmpeg", "--ffmpeg").await);
    p.print(tool(&config.ffprobe, "ffprobe", "--ffprobe").await);
    if let Some(o) = encoders(&config.ffmpeg).await {
        p.print(o);
    }
    // One prober for this line and the trial job: one helper started, not two.
    let prober = crate::pipeline::prober::Prober::new(&config);
    p.print(media_probe(&prober).await);
    p.print(nvml(args.require_gpu));
    for o in py_spy(&config) {
        p.print(o);
    }
    p.print(data_dir(&config.data_dir));
    if config.shared_dir.is_some() {
        p.print(shared_dir(&config));
    }
    p.print(listen("listen", "--listen", config.listen));
    if let Some(addr) = config.admin_listen {
        p.print(listen("admin listen", "--admin-listen", addr));
    }
    if let Some(path) = &config.auth_token_file {
        p.print(match crate::http::auth::Tokens::load(path) {
            Ok(_) => ok("auth tokens", format!("{} holds at least one token", path.display())),
            Err(e) => fail("auth tokens", e, "point --auth-token-file at a readable file with one token per line"),
        });
    }
    if let Some(url) = &config.otlp_endpoint {
        p.print(otlp(url, config.otlp_protocol).await);
    }
    match config.backend {
        BackendKind::Preview => {}
        // Without --musetalk-dir the config line has already failed and named the flag.
        BackendKind::Musetalk => {
            if let Some(dir) = &config.musetalk_dir {
                musetalk(&config, dir, &mut p).await;
            }
        }
        BackendKind::Command => {
            if let Some(o) = pipeline_program(&config) {
                p.print(o);
            }
        }
    }
    // "ready" only once the backend has done what a job asks of it. After a failure
    // above the verdict is "not ready" already, and the trial would only repeat it.
    if p.counts[Level::Fail as usize] == 0 {
        p.print(backend_works(&config, &prober).await);
    }

    let [oks, warns, fails] = p.counts;
    let verdict = if fails == 0 {
        format!("ready to serve with the {} backend", config.backend.as_str())
    } else {
        format!("not ready: fix the FAIL line{} above", if fails == 1 { "" } else { "s" })
    };
    let style = if fails > 0 { ERROR } else if warns > 0 { WARN } else { OK };
    anstream::println!(
        "\n{style}{oks} ok, {warns} warning{}, {fails} failed{style:#}: {verdict}",
        if warns == 1 { "" } else { "s" }
    );
    if fails > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// The settings that clap's types cannot check (same rules as `serve`), and the paths
/// resolved as `serve` resolves them. Returns the config the other checks look at.
fn check_config(config: Config, p: &mut Printer) -> Config {
    match config.clone().resolved() {
        Ok(resolved) => {
            p.print(ok("config", format!("valid (backend {}; {})", resolved.backend.as_str(), resolved.paths_summary())));
            resolved
        }
        Err(e) => {
            let fix = match &e {
                ConfigError::Invalid { flag, .. } => format!("set --{flag} (or its MUSETALK_SIDECAR_* variable); `musetalk-sidecar serve --help` describes it"),
                _ => "fix the file given with --config".to_string(),
            };
            p.print(fail("config", e.to_string(), fix));
            config
        }
    }
}

/// The backend does a job: preview runs a real 1 s trial job (the pipeline, end to end);
/// the model backends, whose one run costs minutes of GPU, answer their readiness probe.
async fn backend_works(config: &Config, prober: &crate::pipeline::prober::Prober) -> Outcome {
    let backend = crate::pipeline::build(config);
    if !backend.cheap_trial() {
        return match backend.probe().await {
            Ok(d) => ok("backend", format!("{} backend ready: {d}", backend.name())),
            Err(e) => fail("backend", format!("{} backend not ready: {e}", backend.name()), "`serve` answers /readyz 503 with this reason until it is fixed; the MuseTalk lines above say what the backend needs"),
        };
    }
    match crate::pipeline::trial::run(config, prober, backend.as_ref()).await {
        Ok(t) => ok("trial job", format!("a 1 s preview job succeeded in {:.2} s ({:.2} s of video, {})", t.seconds, t.output_seconds, human_bytes(t.output_bytes))),
        Err(e) => fail(
            "trial job",
            format!("a 1 s preview job failed: {e}"),
            format!(
                "every job would fail the same way, with this error: repair {} (Debian/Ubuntu: `apt-get install ffmpeg`) or point --ffmpeg/--ffprobe at a working build",
                config.ffmpeg.display()
            ),
        ),
    }
}

/// Runs a program with a time limit; `Err` says why it could not.
async fn output_of(program: &Path, args: &[&str], cwd: Option<&Path>, limit: Duration) -> Result<std::process::Output, String> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true).env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err("not found".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("did not finish within {} s", limit.as_secs())),
    }
}

fn first_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b).lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default().to_string()
}

/// `ffmpeg -version` / `ffprobe -version`: found, and its version line.
async fn tool(program: &Path, name: &str, flag: &str) -> Outcome {
    let fix = format!("install ffmpeg (Debian/Ubuntu: `apt-get install ffmpeg`; it includes {name}) or point {flag} at the executable");
    match output_of(program, &["-version"], None, Duration::from_secs(10)).await {
        Ok(o) if o.status.success() => {
            let line = first_line(&o.stdout);
            let line = line.split(" Copyright").next().unwrap_or(&line).to_string();
            ok(name, format!("{line} ({})", shown(program)))
        }
        Ok(o) => fail(name, format!("`{} -version` exited with {}: {}", program.display(), o.status, first_line(&o.stderr)), fix),
        Err(why) => fail(name, format!("`{}`: {why}", program.display()), fix),
    }
}

/// The encoders the pipelines use (libx264 video, AAC audio); `None` when ffmpeg does not run (already reported).
async fn encoders(ffmpeg: &Path) -> Option<Outcome> {
    let o = output_of(ffmpeg, &["-hide_banner", "-encoders"], None, Duration::from_secs(10)).await.ok().filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&o.stdout);
    let has = |name: &str| text.lines().any(|l| l.split_whitespace().nth(1) == Some(name));
    let missing: Vec<&str> = ["libx264", "aac"].into_iter().filter(|e| !has(e)).collect();
    Some(if missing.is_empty() {
        ok("ffmpeg encoders", "libx264 and aac available")
    } else {
        fail(
            "ffmpeg encoders",
            format!("{} missing from this ffmpeg build", missing.join(" and ")),
            "install an ffmpeg built with libx264 and aac (Debian/Ubuntu's `ffmpeg` package has both) or point --ffmpeg at one",
        )
    })
}

/// NVML: the library loads, GPU count, driver version. Absent is a warning (GPU metrics
/// will be absent) unless `--require-gpu`.
fn nvml(require: bool) -> Outcome {
    let fix = "on a GPU host install the NVIDIA driver (it provides libnvidia-ml.so.1); in a container run it with `docker run --gpus all` (or the NVIDIA container runtime with NVIDIA_VISIBLE_DEVICES=all); pass --require-gpu to make this a failure";
    let absent = |detail: String| if require { fail("nvml", detail, fix) } else { warn("nvml", detail, fix) };
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let why = e.to_string();
            let why = why.trim_start_matches("a libloading error occurred: ");
            return absent(format!("NVML did not load ({why}): GPU metrics will be absent"));
        }
    };
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => return absent(format!("NVML loaded but cannot count GPUs ({e}): GPU metrics will be absent")),
    };
    if count == 0 {
        return absent("NVML loaded but sees no GPU: GPU metrics will be absent".into());
    }
    let driver = nvml.sys_driver_version().unwrap_or_else(|e| format!("unknown ({e})"));
    let names: Vec<String> = (0..count).map(|i| nvml.device_by_index(i).and_then(|d| d.name()).unwrap_or_else(|e| format!("GPU {i}: {e}"))).collect();
    ok("nvml", format!("{count} GPU{}, driver {driver}: {}", if count == 1 { "" } else { "s" }, names.join(", ")))
}

/// py-spy for per-job profiles (optional: a warning when missing), and whether realtime
/// workers can be attached to.
fn py_spy(config: &Config) -> Vec<Outcome> {
    let profiler = crate::profile::Profiler::new(config);
    let mut out = Vec::new();
    match profiler.version() {
        Ok(v) => out.push(ok("py-spy", format!("{v} ({}): jobs can be profiled (profile=true, --profile-ratio)", config.py_spy.display()))),
        Err(why) => {
            out.push(warn("py-spy", format!("{why}: jobs cannot be profiled"), "python3 -m pip install py-spy (or give its path with --py-spy); scripts/run.sh and scripts/test.sh install it"));
            return out;
        }
    }
    if config.realtime
        && let Err(why) = profiler.attach_permitted()
    {
        out.push(warn("py-spy attach", why.to_string(), "add the SYS_PTRACE capability to the container (deploy/compose: cap_add; Kubernetes: securityContext.capabilities.add), or run with kernel.yama.ptrace_scope=0"));
    }
    out
}

/// The persistent probe helper starts (each upload then costs no ffprobe start).
async fn media_probe(prober: &crate::pipeline::prober::Prober) -> Outcome {
    match prober.describe().await {
        Ok(d) => ok("media probe", format!("persistent helper {d}")),
        Err(why) => warn(
            "media probe",
            why,
            "build musetalk-probe-helper (scripts/run.sh and `cargo build --release` put it next to musetalk-sidecar; it needs FFmpeg's libraries: apt-get install ffmpeg), or say --probe-helper off",
        ),
    }
}

/// The shared dir (`--shared-dir`) takes files and `flock` locks: what replicas sharing
/// avatars rely on (docs/cluster.md).
fn shared_dir(config: &Config) -> Outcome {
    let name = "shared dir";
    let dir = config.shared_dir.as_deref().unwrap_or(&config.data_dir).display();
    // The lock the avatar store takes, on a name no avatar can have.
    match crate::jobs::avatars::lock_file(&config.avatars_dir(), ".check", true) {
        Ok(_) => ok(name, format!("{dir}: writable, flock works (avatars shared across replicas)")),
        Err(crate::jobs::avatars::LockFailure::Io(e)) => fail(name, format!("{dir}: cannot create files there ({e})"), "mount a writable ReadWriteMany volume there (every replica the same), or fix its permissions for this user"),
        Err(crate::jobs::avatars::LockFailure::Held(e)) => fail(
            name,
            format!("{dir}: flock fails ({e}): replicas could prepare or delete the same avatar at once"),
            "use storage with locks across clients (NFSv4, CephFS, a cloud file store with POSIX locks; NFSv3 needs lockd)",
        ),
    }
}

/// The data dir (or, before the first run, its nearest existing ancestor) is writable,
/// and has room.
fn data_dir(dir: &Path) -> Outcome {
    let name = "data dir";
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p.to_path_buf(),
            _ => {
                existing = PathBuf::from(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return fail(name, format!("{} is not a directory", existing.display()), "set --data-dir to a directory");
    }
    if let Some(holder) = crate::instance::holder(dir) {
        return fail(
            name,
            format!("{} is in use by a running musetalk-sidecar ({holder}): `serve` would refuse to start on it", dir.display()),
            "stop that instance, or give this one its own --data-dir (two instances must never share one)",
        );
    }
    let probe = existing.join(format!(".musetalk-sidecar-check-{}", std::process::id()));
    if let Err(e) = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        let uid = nix::unistd::geteuid();
        return fail(name, format!("cannot create a file in {}: {e}", existing.display()), format!("make {} writable by uid {uid}, or set --data-dir to a writable directory", existing.display()));
    }
    let _ = std::fs::remove_file(&probe);
    let state = if existing == dir { format!("{} is writable", dir.display()) } else { format!("{} will be created in {} (writable)", dir.display(), existing.display()) };
    match nix::sys::statvfs::statvfs(&existing) {
        Ok(s) => {
            // fsblkcnt_t/c_ulong are u64 here but u32 on 32-bit targets.
            #[allow(clippy::useless_conversion)]
            let free = u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()));
            if free < LOW_SPACE {
                warn(name, format!("{state}, only {} free", human_bytes(free)), format!("free space or set --data-dir to a larger volume: uploads and outputs of kept jobs live there (at least {} recommended)", human_bytes(LOW_SPACE)))
            } else {
                ok(name, format!("{state}, {} free", human_bytes(free)))
            }
        }
        Err(e) => warn(name, format!("{state}; free space unknown ({e})"), "check the volume's free space by hand (df)"),
    }
}

/// The listener can be bound: a port another process holds makes `serve` fail at start.
fn listen(name: &str, flag: &str, addr: std::net::SocketAddr) -> Outcome {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => ok(name, format!("{addr} is free")),
        Err(e) => fail(
            name,
            format!("cannot listen on {addr}: {e}"),
            format!("stop the process using port {} (`ss -ltnp 'sport = :{}'` names it), or set {flag} to a free address", addr.port(), addr.port()),
        ),
    }
}

/// `host:port` of an OTLP URL (default port from the scheme).
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?.rsplit('@').next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after.strip_prefix(':').map(|p| p.parse().ok()).unwrap_or(Some(default))?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
}

/// TCP connect to the OTLP endpoint within 2 s. Unreachable is a warning: the service
/// runs without it, but its spans are dropped.
async fn otlp(url: &str, protocol: crate::config::OtlpProtocol) -> Outcome {
    let name = "otlp";
    let fix = "start the collector, or correct --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT (OTLP gRPC listens on 4317, OTLP/HTTP on 4318)";
    let Some((host, port)) = host_port(url) else {
        return fail(name, format!("`{url}` has no host"), "set --otlp-endpoint to a URL like http://jaeger:4317");
    };
    let proto = match protocol {
        crate::config::OtlpProtocol::Grpc => "grpc",
        crate::config::OtlpProtocol::HttpProtobuf => "http/protobuf",
    };
    let started = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(_)) => {
            let mismatch = match (protocol, port) {
                (crate::config::OtlpProtocol::Grpc, 4318) => Some("port 4318 is OTLP/HTTP's: use :4317 with grpc, or --otlp-protocol http/protobuf"),
                (crate::config::OtlpProtocol::HttpProtobuf, 4317) => Some("port 4317 is OTLP gRPC's: use :4318 with http/protobuf, or --otlp-protocol grpc"),
                _ => None,
            };
            let detail = format!("{host}:{port} accepts connections ({proto}, {} ms)", started.elapsed().as_millis());
            match mismatch {
                Some(m) => warn(name, format!("{detail}, but the port does not match the protocol"), m),
                None => ok(name, detail),
            }
        }
        Ok(Err(e)) => warn(name, format!("cannot connect to {host}:{port} ({e}): spans will be dropped"), fix),
        Err(_) => warn(name, format!("no connection to {host}:{port} within 2 s: spans will be dropped"), fix),
    }
}

/// Where `program` is: itself when it names a path, else the first executable of that name on PATH.
fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf()).filter(|p| is_executable(p));
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| is_executable(p)))
}

/// `program` as shown in the output: with its resolved path when it was looked up on PATH.
fn shown(program: &Path) -> String {
    match which(program) {
        Some(p) if p != program => format!("{} → {}", program.display(), p.display()),
        _ => program.display().to_string(),
    }
}

/// `--backend command`: the program of `--pipeline-command` can be run.
fn pipeline_program(config: &Config) -> Option<Outcome> {
    let argv = config.pipeline_argv().ok()?;
    let program = Path::new(argv.first()?);
    let name = "pipeline command";
    let on_path = program.components().count() == 1;
    Some(match which(program) {
        Some(_) => ok(name, shown(program)),
        None => fail(
            name,
            format!("`{}` is not an executable file{}", program.display(), if on_path { " on PATH" } else { "" }),
            "install it, or give its full path first in --pipeline-command",
        ),
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The MuseTalk dir: its script, every model file of its layout, the interpreter and its packages.
async fn musetalk(config: &Config, dir: &Path, p: &mut Printer) {
    let download_fix = format!("download MuseTalk's weights into {}/models: run `sh ./download_weights.sh` in {} (MuseTalk README, \"Download weights\")", dir.display(), dir.display());
    if !dir.is_dir() {
        p.print(fail(
            "musetalk dir",
            format!("{} is not a directory", dir.display()),
            "set --musetalk-dir to a checkout of https://github.com/TMElyralab/MuseTalk (the directory holding scripts/ and models/)",
        ));
        return;
    }
    p.print(ok("musetalk dir", dir.display().to_string()));
    for rel in crate::pipeline::musetalk::REQUIRED_FILES {
        let path = dir.join(rel);
        p.print(if path.is_file() {
            ok("musetalk script", path.display().to_string())
        } else {
            fail("musetalk script", format!("{} is missing", path.display()), "set --musetalk-dir to the root of a MuseTalk checkout (git clone https://github.com/TMElyralab/MuseTalk)")
        });
    }

    // The UNet files this set-up loads (--musetalk-unet-*), then the rest of the layout.
    let configured: Vec<PathBuf> = [&config.musetalk_unet_model_path, &config.musetalk_unet_config].into_iter().filter_map(|r| config.musetalk_path(r)).collect();
    let mut listed: Vec<PathBuf> = Vec::new();
    let mut models = Vec::new();
    for (rel, need) in MODEL_LAYOUT {
        let path = dir.join(rel);
        let required = match need {
            Need::Always => true,
            Need::Unet => configured.contains(&path),
            Need::Training => false,
        };
        listed.push(path.clone());
        let why_not = if *need == Need::Training { "training only" } else { "not loaded by this set-up's --musetalk-unet-*" };
        models.push(model_file(rel, &path, required, why_not));
    }
    for path in configured.iter().filter(|c| !listed.contains(c)) {
        models.push(model_file(&path.display().to_string(), path, true, ""));
    }
    // One fix for the whole layout: the same download repairs every file.
    p.print_group(models, download_fix);

    // The interpreter, then the packages MuseTalk imports.
    let python = Path::new(&config.musetalk_python);
    match output_of(python, &["--version"], Some(dir), Duration::from_secs(20)).await {
        Ok(o) if o.status.success() => {
            let v = first_line(if o.stdout.is_empty() { &o.stderr } else { &o.stdout });
            p.print(ok("python", format!("{v} ({})", shown(python))));
        }
        Ok(o) => {
            p.print(fail("python", format!("`{} --version` exited with {}", python.display(), o.status), "set --musetalk-python to the interpreter of MuseTalk's environment"));
            return;
        }
        Err(why) => {
            p.print(fail("python", format!("`{}`: {why}", python.display()), "set --musetalk-python to the interpreter of MuseTalk's environment (e.g. /opt/MuseTalk/.venv/bin/python)"));
            return;
        }
    }
    let modules: Vec<&str> = PYTHON_MODULES.iter().map(|(m, _)| *m).collect();
    let mut args = vec!["-c", IMPORT_SCRIPT];
    args.extend(&modules);
    let out = match output_of(python, &args, Some(dir), Duration::from_secs(180)).await {
        Ok(o) => o,
        Err(why) => {
            p.print(fail("python packages", format!("the import check could not run: {why}"), "run it by hand to see why: python -c \"import torch, diffusers, transformers, omegaconf, cv2, librosa, mmpose\""));
            return;
        }
    };
    let report: serde_json::Value = match serde_json::from_slice(out.stdout.trim_ascii()) {
        Ok(v) => v,
        Err(_) => {
            p.print(fail("python packages", format!("the import check failed: {}", first_line(&out.stderr)), format!("check that {} is a working Python 3 interpreter", python.display())));
            return;
        }
    };
    p.print(python_packages(&report, python, dir));
    if let Some(o) = torch_cuda(&report) {
        p.print(o);
    }
}

/// One model file: present with its size (a warning when too small for weights), or
/// missing (a failure when this set-up loads it). No fix: [`Printer::print_group`] adds one.
fn model_file(rel: &str, path: &Path, required: bool, why_not: &str) -> Outcome {
    let line = |level, detail: String| Outcome { level, name: "model".into(), detail, fix: None };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => line(if required { Level::Fail } else { Level::Ok }, format!("{rel} is not a file")),
        Ok(m) if !required => line(Level::Ok, format!("{rel}  {} ({why_not})", human_bytes(m.len()))),
        Ok(m) => {
            let weights = matches!(path.extension().and_then(|e| e.to_str()), Some("pth" | "bin" | "pt" | "safetensors"));
            if weights && m.len() < TINY_WEIGHTS {
                line(Level::Warn, format!("{rel}  {}: too small for weights (a placeholder or an interrupted download)", human_bytes(m.len())))
            } else {
                line(Level::Ok, format!("{rel}  {}", human_bytes(m.len())))
            }
        }
        Err(_) if required => line(Level::Fail, format!("{rel} is missing")),
        Err(_) => line(Level::Ok, format!("{rel} absent ({why_not})")),
    }
}

/// The import check's verdict, with the install command for what is missing.
fn python_packages(report: &serde_json::Value, python: &Path, dir: &Path) -> Outcome {
    let missing: Vec<(&str, String)> = report["missing"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        return ok("python packages", format!("{} import", PYTHON_MODULES.iter().map(|(m, _)| *m).collect::<Vec<_>>().join(", ")));
    }
    let names: Vec<&str> = PYTHON_MODULES.iter().map(|(m, _)| *m).filter(|m| missing.iter().any(|(k, _)| k == m)).collect();
    let first_error = &missing.iter().find(|(k, _)| *k == names[0]).map(|(_, e)| e.clone()).unwrap_or_default();
    let py = python.display();
    let mm: Vec<&str> = names.iter().copied().filter(|m| m.starts_with("mm")).collect();
    let other = names.len() > mm.len();
    let mut fix = Vec::new();
    if other {
        fix.push(format!(
            "in {}: `{py} -m pip install -r requirements.txt` (install torch first, for your CUDA version, as MuseTalk's README says)",
            dir.display()
        ));
    }
    if !mm.is_empty() {
        fix.push(format!("`{py} -m pip install -U openmim && {py} -m mim install mmengine \"mmcv==2.0.1\" \"mmdet==3.1.0\" \"mmpose==1.1.0\"`"));
    }
    fail("python packages", format!("cannot import {} ({}: {first_error})", names.join(", "), names[0]), fix.join("; then "))
}

/// torch imports but sees no CUDA device: MuseTalk would run on the CPU (very slowly) or fail.
fn torch_cuda(report: &serde_json::Value) -> Option<Outcome> {
    let t = report.get("torch").filter(|t| t.is_object())?;
    if let Some(e) = t["error"].as_str() {
        return Some(warn("torch cuda", format!("torch imports but querying CUDA failed: {e}"), "check the NVIDIA driver and torch's CUDA build"));
    }
    let version = t["version"].as_str().unwrap_or("?");
    Some(if t["available"].as_bool() == Some(true) {
        ok("torch cuda", format!("torch {version} sees {} CUDA device(s)", t["devices"].as_u64().unwrap_or(0)))
    } else {
        warn(
            "torch cuda",
            format!("torch {version} sees no CUDA device: MuseTalk would be very slow or fail"),
            "install a CUDA build of torch matching the driver, and make the GPU visible (docker run --gpus all)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_host_and_port() {
        assert_eq!(host_port("http://jaeger:4317"), Some(("jaeger".into(), 4317)));
        assert_eq!(host_port("http://jaeger:4318/v1/traces"), Some(("jaeger".into(), 4318)));
        assert_eq!(host_port("https://otel.example"), Some(("otel.example".into(), 443)));
        assert_eq!(host_port("http://[::1]:4317"), Some(("::1".into(), 4317)));
        assert_eq!(host_port("http://u:p@h:9"), Some(("h".into(), 9)));
        assert_eq!(host_port("jaeger:4317"), None);
    }

    #[test]
    fn missing_packages_name_the_install_command() {
        let report = serde_json::json!({"missing": {"torch": "ModuleNotFoundError: No module named 'torch'", "mmpose": "ModuleNotFoundError: No module named 'mmpose'"}, "torch": null});
        let o = python_packages(&report, Path::new("python3"), Path::new("/opt/MuseTalk"));
        assert_eq!(o.level, Level::Fail);
        assert!(o.detail.starts_with("cannot import torch, mmpose"), "{}", o.detail);
        let fix = o.fix.unwrap();
        assert!(fix.contains("pip install -r requirements.txt") && fix.contains("/opt/MuseTalk") && fix.contains("mim install"), "{fix}");
        let all = serde_json::json!({"missing": {}, "torch": {"version": "2.0.1", "available": false, "devices": 0}});
        assert_eq!(python_packages(&all, Path::new("python3"), Path::new("/x")).level, Level::Ok);
        assert_eq!(torch_cuda(&all).unwrap().level, Level::Warn);
    }

    #[test]
    fn data_dir_reports_free_space_or_creation() {
        let here = std::env::temp_dir();
        let o = data_dir(&here);
        assert_ne!(o.level, Level::Fail, "{o:?}");
        assert!(o.detail.contains("free"), "{o:?}");
        let o = data_dir(&here.join("not-yet/created"));
        assert!(o.detail.contains("will be created"), "{o:?}");
    }
}
