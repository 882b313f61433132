//! musetalk-sidecar: runs the MuseTalk lip-sync pipeline behind HTTP and makes every
//! request observable (OTLP traces, Prometheus metrics with exemplars, per-job reports).
//!
//! Data flows one way: `api → jobs → pipeline`. `collector` samples resources on its
//! own thread and knows nothing of jobs; `metrics` defines every metric family.

pub mod api;
pub mod http;
pub mod cli;
pub mod collector;
pub mod config;
pub mod instance;
pub mod jobs;
pub mod metrics;
pub mod mode;
pub mod pipeline;
pub mod profile;
pub mod telemetry;
pub mod ui;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::collector::Collector;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::telemetry::TelemetryGuard;

/// Why the service could not start or stop cleanly; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Locked(#[from] instance::LockError),
    #[error("cannot create the data dir {path}: {source} (set --data-dir to a writable directory)")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source} (is another process using the port? set --listen)")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Auth(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// Starts everything, serves until SIGTERM/SIGINT (or `shutdown` is cancelled), then
/// shuts down in order: stop accepting, drain jobs, stop the collector, flush spans.
pub async fn run(config: Config, telemetry: TelemetryGuard, shutdown: CancellationToken) -> Result<(), RunError> {
    // Absolute paths from here on: children run in other directories.
    let config = config.resolved()?;
    tracing::info!(data_dir = %config.data_dir.display(), "paths: {}", config.paths_summary());
    std::fs::create_dir_all(&config.data_dir).map_err(|source| RunError::DataDir { path: config.data_dir.clone(), source })?;
    // First, before anything reads or cleans the data dir: a second instance on it must
    // touch nothing of the first's (its running jobs, its stored outputs).
    let _lock = instance::DataDirLock::acquire(&config.data_dir)?;
    std::fs::create_dir_all(config.jobs_dir()).map_err(|source| RunError::DataDir { path: config.data_dir.clone(), source })?;
    let auth = match &config.auth_token_file {
        Some(path) => http::auth::Tokens::load(path).map_err(RunError::Auth)?,
        None => http::auth::Tokens::default(),
    };
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let mut collector = Collector::start(Collector::default_sources(), metrics.clone(), config.sample_interval, config.ring_capacity());
    // Before anything starts a process (worker pools start theirs in build_state): the
    // registry must record them, and must not take them for an earlier run's leftovers.
    let orphans = pipeline::groups::init(&config.data_dir.join("run").join("groups"));
    if orphans > 0 {
        tracing::warn!(groups = orphans, "killed pipeline processes left by an earlier run");
    }
    let state = build_state(config.clone(), metrics, collector.handle(), auth, telemetry.exporting());
    let (jobs, backend, realtime) = (state.jobs.clone(), state.jobs.backend().clone(), state.jobs.realtime().clone());
    let stale = jobs.clean_stale_dirs();
    if stale > 0 {
        tracing::info!(dirs = stale, "removed job directories left by an earlier run");
    }
    let restored = jobs.avatars().restore(&config.avatars_dir());
    if restored != jobs::avatars::Restored::default() {
        tracing::info!(ready = restored.ready, failed = restored.failed, removed = restored.removed, "restored the avatars of an earlier run");
    }
    tokio::spawn(jobs.clone().retention_loop(shutdown.clone()));
    // Cancelled once the jobs have drained: the job list is taken back and the listeners close.
    let drained = CancellationToken::new();
    let published = tokio::spawn(jobs.clone().publish_list_loop(drained.clone()));
    tokio::spawn(probe_backend(backend.clone(), state.backend_status.clone(), shutdown.clone()));
    // Says how uploads will be probed, and has the first helper ready before the first upload.
    let prober = jobs.prober().clone();
    tokio::spawn(async move {
        match prober.describe().await {
            Ok(d) => tracing::info!("media probe: persistent helper {d}"),
            Err(why) => tracing::info!("media probe: {why}"),
        }
    });

    let listener = TcpListener::bind(config.listen).await.map_err(|source| RunError::Bind { addr: config.listen, source })?;
    let local = listener.local_addr().map_err(RunError::Serve)?;
    let mut servers = tokio::task::JoinSet::new();
    // The listeners close once the jobs have drained, not at SIGTERM: behind a routing
    // proxy, a draining replica still answers for the jobs it owns (their status, report,
    // output, events) while readiness and admission already turn new work away.
    let graceful = drained.clone();
    servers.spawn(
        axum::serve(listener, http::app(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>())
            .with_graceful_shutdown(async move { graceful.cancelled().await })
            .into_future(),
    );
    let mut admin_local = None;
    if let Some(addr) = config.admin_listen {
        let admin = TcpListener::bind(addr).await.map_err(|source| RunError::Bind { addr, source })?;
        admin_local = Some(admin.local_addr().map_err(RunError::Serve)?);
        let graceful = drained.clone();
        servers.spawn(
            axum::serve(admin, http::admin_router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>())
                .with_graceful_shutdown(async move { graceful.cancelled().await })
                .into_future(),
        );
    }
    // Before "listening" is said: a SIGTERM that follows that line must find the handlers
    // installed (before them, it would kill the process with no drain and no flush).
    let signals = install_signals();
    tracing::info!(
        addr = %local,
        admin_addr = admin_local.map(|a| a.to_string()).unwrap_or_else(|| "same listener".into()),
        backend = config.backend.as_str(),
        exporting = state.exporting,
        "listening on http://{local}"
    );
    tokio::spawn(watch_signals(signals, shutdown.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutdown: no longer accepting jobs, draining (still answering for the jobs here)");
    state.draining.store(true, Ordering::Release);
    let mut result = Ok(());
    jobs.drain(config.shutdown_grace).await;
    // Then the servers finish their in-flight requests (a synchronous inference request
    // ended with its job).
    tracing::info!("shutdown: jobs drained, closing the listeners");
    drained.cancel();
    let _ = published.await;
    while let Some(r) = servers.join_next().await {
        if let Ok(Err(e)) = r {
            result = Err(RunError::Serve(e));
        }
    }
    tracing::info!("shutdown: stopping realtime workers");
    realtime.shutdown().await;
    tracing::info!("shutdown: stopping the collector");
    tokio::task::spawn_blocking(move || collector.stop()).await.ok();
    tracing::info!("shutdown: flushing telemetry");
    telemetry.shutdown().await;
    result
}

/// What the HTTP layer serves from, built from the config in this one place: the
/// backend, the realtime engine and the job manager, sharing one run budget. `run()`
/// serves it; in-process tests and the fuzz harness drive `http::app` with it. Must be
/// called inside a tokio runtime (worker pools spawn their supervisors).
pub fn build_state(config: Arc<Config>, metrics: Arc<Metrics>, collector: collector::CollectorHandle, auth: http::auth::Tokens, exporting: bool) -> AppState {
    let backend = pipeline::build(&config);
    // One budget for every pipeline run on this host: simple jobs, and realtime jobs of
    // the preview engine (a worker engine's workers are their own budget, one job each).
    let run_slots = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_jobs));
    let realtime = pipeline::realtime::build(&config, metrics.clone(), collector.clone(), run_slots.clone());
    let jobs = jobs::JobManager::new(config.clone(), backend, realtime, metrics.clone(), collector.clone(), run_slots);
    AppState {
        jobs,
        auth,
        config,
        metrics,
        collector,
        backend_status: Arc::new(std::sync::RwLock::new(Err("probing".into()))),
        draining: Arc::new(AtomicBool::new(false)),
        exporting,
    }
}

type Signals = Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>;

/// SIGTERM's and SIGINT's handlers, installed now.
fn install_signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::error!("cannot install signal handlers; stop the service with SIGKILL");
            None
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn watch_signals(signals: Signals, token: CancellationToken) {
    let Some((mut term, mut int)) = signals else { return };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = token.cancelled() => return,
    }
    token.cancel();
}

/// Probes the backend now and, while it is not usable, every 10 s (so installing
/// ffmpeg or mounting the models turns /readyz green without a restart).
async fn probe_backend(backend: Arc<dyn pipeline::Backend>, status: http::BackendStatus, stop: CancellationToken) {
    loop {
        let r = backend.probe().await;
        let ok = r.is_ok();
        match &r {
            Ok(d) => tracing::info!(backend = backend.name(), "backend ready: {d}"),
            Err(e) => tracing::warn!(backend = backend.name(), "backend not ready: {e}"),
        }
        *status.write().unwrap_or_else(|e| e.into_inner()) = r;
        if ok {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
