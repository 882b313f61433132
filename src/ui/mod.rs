//! The built-in status page: `GET /` (health, live resources, recent jobs with their
//! step breakdown) and `GET /ui/jobs/{id}` (one job: report, step and stage timings,
//! resource window, trace id and links), served from the binary itself.
//!
//! No front-end build, no CDN, no external font or script: the HTML is rendered on the
//! server (maud), the CSS, a little plain JavaScript and the icon are compiled in. The
//! static parts read without JavaScript; with it, the page polls
//! `/ui/api/resources?seconds=300` (sparklines) and `/ui/partials/*` (sections,
//! replaced only when their fingerprint changed). A Content-Security-Policy of
//! `'self'` only makes "no request to another host" a browser-enforced fact.
//!
//! Routes sit behind the same bearer-token check as `/v1/*` when auth is on.
//!
//! The Grafana link comes from `MUSETALK_SIDECAR_GRAFANA_URL` until the config has a
//! `--grafana-url` flag.

mod model;
mod series;
mod view;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use maud::Markup;

use crate::http::AppState;
use crate::collector::SourceName;
use crate::jobs::{Job, JobState};
use model::{Check, Header, Health, JobView, JobsList, Link, Overview};

/// Environment variable of the Grafana dashboard URL (until `--grafana-url` exists).
/// Jobs listed on the overview (newest first).
const MAX_LISTED_JOBS: usize = 50;
/// The sparklines' default and largest window.
const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// Settings of the page (from `Config`).
#[derive(Clone, Debug, Default)]
pub struct UiConfig {
    /// Grafana dashboard URL (optionally with `{from}`, `{to}`, `{trace_id}`).
    pub grafana_url: Option<String>,
}

/// The page's routes, with the API's bearer-token check when auth is on.
pub fn routes(state: &AppState) -> Router<AppState> {
    let ui = Arc::new(UiConfig { grafana_url: state.config.grafana_url.clone() });
    Router::new()
        .route("/", get(overview))
        .route("/ui", get(overview))
        .route("/ui/", get(overview))
        .route("/ui/jobs/{id}", get(job_page))
        .route("/ui/partials/health", get(health_partial))
        .route("/ui/partials/resources", get(resources_partial))
        .route("/ui/partials/jobs", get(jobs_partial))
        .route("/ui/partials/jobs/{id}", get(job_partial))
        .route("/ui/api/resources", get(resources_json))
        .route("/ui/static/{file}", get(static_file))
        .layer(Extension(ui))
        .layer(middleware::from_fn(security_headers))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::http::auth::require_bearer))
}

/// Everything the page loads comes from this origin; nothing is framed or sent elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Links to Jaeger/Grafana do not carry the page's URL (job ids) along.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    r
}

fn html(m: Markup) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], m.0).into_response()
}

// ---------------------------------------------------------------------------------------
// Handlers.

async fn overview(State(st): State<AppState>, Extension(ui): Extension<Arc<UiConfig>>, headers: HeaderMap) -> Response {
    let o = Overview {
        header: header_of(&st, &ui),
        health: health(&st, &ui),
        resources: resources(&st, DEFAULT_WINDOW),
        resources_url: format!("/ui/api/resources?seconds={}", DEFAULT_WINDOW.as_secs()),
        jobs: jobs_list(&st, &ui, &headers),
    };
    html(view::overview(&o))
}

async fn job_page(State(st): State<AppState>, Extension(ui): Extension<Arc<UiConfig>>, UrlPath(id): UrlPath<String>) -> Response {
    let header = header_of(&st, &ui);
    match st.jobs.get(&id) {
        Some(job) => html(view::job_page(&header, &job_view(&st, &ui, &job, true))),
        None => (StatusCode::NOT_FOUND, html(view::not_found(&header, &format!("No job `{id}`: finished jobs are kept for --job-retention (and at most --max-retained-jobs).")))).into_response(),
    }
}

async fn health_partial(State(st): State<AppState>, Extension(ui): Extension<Arc<UiConfig>>) -> Response {
    html(view::health_section(&health(&st, &ui)))
}

async fn resources_partial(State(st): State<AppState>) -> Response {
    html(view::resources_section(&resources(&st, DEFAULT_WINDOW), &format!("/ui/api/resources?seconds={}", DEFAULT_WINDOW.as_secs())))
}

async fn jobs_partial(State(st): State<AppState>, Extension(ui): Extension<Arc<UiConfig>>, headers: HeaderMap) -> Response {
    html(view::jobs_section(&jobs_list(&st, &ui, &headers)))
}

async fn job_partial(State(st): State<AppState>, Extension(ui): Extension<Arc<UiConfig>>, UrlPath(id): UrlPath<String>) -> Response {
    match st.jobs.get(&id) {
        Some(job) => html(view::job_section(&job_view(&st, &ui, &job, true))),
        None => crate::http::ApiError::not_found("job_not_found", format!("no job `{id}`")).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct WindowQuery {
    seconds: Option<u64>,
}

/// `GET /ui/api/resources?seconds=300`: the sparkline series over the last `seconds`.
async fn resources_json(State(st): State<AppState>, Query(q): Query<WindowQuery>) -> Response {
    let window = q.seconds.map(Duration::from_secs).unwrap_or(DEFAULT_WINDOW).clamp(Duration::from_secs(10), MAX_WINDOW);
    Json(resources(&st, window)).into_response()
}

const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");
const FAVICON_SVG: &str = include_str!("static/favicon.svg");

async fn static_file(UrlPath(file): UrlPath<String>) -> Response {
    let (body, ctype) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "favicon.svg" => (FAVICON_SVG, "image/svg+xml"),
        _ => return crate::http::ApiError::not_found("not_found", format!("no static file `{file}`")).into_response(),
    };
    // Compiled into the binary and versioned in the URL (`?v=`): cacheable for a day.
    ([(header::CONTENT_TYPE, ctype), (header::CACHE_CONTROL, "public, max-age=86400")], body).into_response()
}

// ---------------------------------------------------------------------------------------
// Reading the service's state into view models.

fn header_of(st: &AppState, ui: &UiConfig) -> Header {
    let mut links = vec![Link::local("/", "Status"), Link::local("/v1/jobs", "Jobs (JSON)"), Link::local("/openapi.json", "API (OpenAPI)"), Link::local("/readyz", "Readiness")];
    if st.config.admin_listen.is_none() {
        links.push(Link::local("/metrics", "Metrics"));
    }
    if let Some(href) = ui.grafana_url.as_deref().and_then(|g| model::grafana_href(g, None, None)) {
        links.push(Link { href, text: "Grafana".into(), external: true });
    }
    Header { version: env!("CARGO_PKG_VERSION"), backend: st.config.backend.as_str(), interval: humantime::format_duration(st.collector.interval()).to_string(), links }
}

fn resources(st: &AppState, window: Duration) -> series::Resources {
    let interval = st.collector.interval().max(Duration::from_millis(1));
    let n = (window.as_nanos() / interval.as_nanos()) as usize + 2;
    let samples = st.collector.recent(n);
    series::build(&samples, SystemTime::now(), window, interval, &st.collector.source_health())
}

fn health(st: &AppState, ui: &UiConfig) -> Health {
    let readiness = st.readiness();
    let mut checks: Vec<Check> = readiness
        .checks
        .iter()
        .map(|c| Check {
            key: c.name.as_str().to_string(),
            name: c.name.label().into(),
            ok: Some(c.ok),
            status: if c.ok { "ok".into() } else { "not ready".into() },
            detail: c.detail.clone(),
            fix: None,
        })
        .collect();

    let last = st.collector.recent(1).pop();
    let sources = st.collector.source_health();
    if sources.is_empty() {
        checks.push(Check { key: "source_none".into(), name: "Collector sources".into(), ok: None, status: "waiting".into(), detail: "no sample taken yet".into(), fix: None });
    }
    for (name, up) in sources {
        let mut c = Check { key: format!("source_{}", name.as_str()), name: format!("Collector: {}", name.as_str()), ok: Some(up), status: if up { "up".into() } else { "down".into() }, detail: String::new(), fix: None };
        let s = last.as_deref();
        match name {
            // Only facts that rarely change: the section is re-rendered when its text changes.
            SourceName::Cpu => {
                c.detail = match s.and_then(|s| s.cpu.as_ref()) {
                    Some(cpu) => format!("host CPU from /proc/stat: {} logical CPUs", cpu.per_cpu.len()),
                    None => "/proc/stat could not be read".into(),
                }
            }
            SourceName::Memory => {
                c.detail = match s.and_then(|s| s.memory.as_ref()) {
                    Some(m) => format!("host memory from /proc/meminfo: {} in all", series::bytes(m.total)),
                    None => "/proc/meminfo could not be read".into(),
                }
            }
            SourceName::Process => {
                c.detail = if up { "pipeline process trees (CPU, RSS) from /proc".into() } else { "process trees could not be read from /proc".into() }
            }
            SourceName::Gpu => match s.and_then(|s| s.gpus.as_ref()) {
                Some(g) if up && !g.is_empty() => {
                    let names: Vec<String> = g.iter().map(|g| format!("GPU {} {}", g.index, g.name)).collect();
                    c.detail = format!("{} NVIDIA GPU(s) via NVML: {}", g.len(), names.join(", "));
                }
                _ => {
                    c.ok = Some(false);
                    c.status = "no GPU".into();
                    c.detail = "No NVIDIA GPU data: NVML is not loaded or reports no GPU. GPU series and the GPU figures of reports are absent.".into();
                    c.fix = Some(view::GPU_FIX.into());
                }
            },
        }
        checks.push(c);
    }

    let otlp = match (&st.config.otlp_endpoint, st.exporting) {
        (Some(e), true) => Check {
            key: "otlp".into(),
            name: "Trace export (OTLP)".into(),
            ok: Some(true),
            status: "configured".into(),
            detail: format!("spans are exported to {e} over {}", serde_json::to_value(st.config.otlp_protocol).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()),
            fix: None,
        },
        (_, true) => Check { key: "otlp".into(), name: "Trace export (OTLP)".into(), ok: Some(true), status: "configured".into(), detail: "spans are exported (endpoint from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)".into(), fix: None },
        (_, false) => Check {
            key: "otlp".into(),
            name: "Trace export (OTLP)".into(),
            ok: None,
            status: "not configured".into(),
            detail: "spans are not exported; trace ids still exist for reports, exemplars and the pipeline's TRACEPARENT".into(),
            fix: Some("set --otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), e.g. http://jaeger:4317".into()),
        },
    };
    checks.push(otlp);
    checks.push(match &st.config.trace_ui_url {
        Some(u) => Check { key: "trace_ui".into(), name: "Trace links".into(), ok: Some(true), status: "configured".into(), detail: u.clone(), fix: None },
        None => Check {
            key: "trace_ui".into(),
            name: "Trace links".into(),
            ok: None,
            status: "not configured".into(),
            detail: "job pages show the trace id without a link".into(),
            fix: Some("set --trace-ui-url, e.g. http://jaeger:16686/trace/{trace_id}".into()),
        },
    });
    checks.push(match &ui.grafana_url {
        Some(u) => Check { key: "grafana".into(), name: "Grafana link".into(), ok: Some(true), status: "configured".into(), detail: u.clone(), fix: None },
        None => Check {
            key: "grafana".into(),
            name: "Grafana link".into(),
            ok: None,
            status: "not configured".into(),
            detail: "no dashboard link".into(),
            fix: Some("set --grafana-url (MUSETALK_SIDECAR_GRAFANA_URL) to the overview dashboard's URL, e.g. http://grafana:3000/d/musetalk-overview".to_string()),
        },
    });
    let rt = st.jobs.realtime();
    if !readiness.checks.iter().any(|c| c.name == crate::http::Check::RealtimeWorkers) {
        let (ok, status, detail) = match (rt.enabled(), rt.readiness()) {
            (false, r) => (None, "off".to_string(), r.err().unwrap_or_else(|| "realtime mode is off".into())),
            (true, Ok(d)) => (Some(true), "ok".to_string(), format!("{} engine: {d}", rt.name())),
            (true, Err(e)) => (Some(false), "not ready".to_string(), format!("{} engine: {e}", rt.name())),
        };
        checks.push(Check { key: "realtime".into(), name: "Realtime mode".into(), ok, status, detail, fix: None });
    }
    checks.push(if st.auth.is_enabled() {
        Check { key: "auth".into(), name: "Auth".into(), ok: Some(true), status: "on".into(), detail: "bearer tokens are required on /v1/* and on this page".into(), fix: None }
    } else {
        Check {
            key: "auth".into(),
            name: "Auth".into(),
            ok: None,
            status: "off".into(),
            detail: "anyone who can reach this port can submit jobs and read this page".into(),
            fix: Some("set --auth-token-file to require bearer tokens".into()),
        }
    });

    let jobs = st.jobs.list();
    let count = |f: &dyn Fn(JobState) -> bool| jobs.iter().filter(|j| f(j.state())).count();
    let running = count(&|s| s == JobState::Running);
    let queued = count(&|s| matches!(s, JobState::Queued | JobState::Receiving));
    let finished = count(&|s| s.is_terminal());
    Health { ready: readiness.ready, jobs_summary: format!("{running} running, {queued} queued or uploading, {finished} finished jobs kept."), checks }
}

fn jobs_list(st: &AppState, ui: &UiConfig, headers: &HeaderMap) -> JobsList {
    let all = st.jobs.list();
    let jobs: Vec<JobView> = all.iter().take(MAX_LISTED_JOBS).map(|j| job_view(st, ui, j, false)).collect();
    let mut legend_stages: Vec<String> = Vec::new();
    for s in jobs.iter().flat_map(|j| j.stages.iter()) {
        if legend_stages.len() < 12 && !legend_stages.contains(&s.name) {
            legend_stages.push(s.name.clone());
        }
    }
    let note = if all.len() > jobs.len() {
        format!("The newest {} of {} kept jobs; all of them at /v1/jobs.", jobs.len(), all.len())
    } else {
        format!("{} kept job(s), newest first. Each bar is one job's total time split by step; the thin row under the execution step shows its stages.", all.len())
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| h.bytes().all(|b| b.is_ascii_graphic())).unwrap_or("localhost:8000");
    JobsList { jobs, note, legend_stages, origin_hint: format!("http://{host}") }
}

/// One job as the page shows it; `detail` adds what only its own page needs (the text
/// report, the resource window), which the jobs table leaves out.
fn job_view(st: &AppState, ui: &UiConfig, job: &Job, detail: bool) -> JobView {
    let status = job.status();
    let report = job.report().filter(|_| status.state.is_terminal());
    let running = !status.state.is_terminal();
    let (total, queue, steps, stages) = match &report {
        Some(r) => (r.total_seconds, r.queue_seconds, r.steps.clone(), r.stages.clone()),
        None => (status.elapsed_seconds, 0.0, status.steps.clone(), Vec::new()),
    };
    let bar = model::bar(&steps, &stages, queue, total, running);
    let outcome = match (&report, &status.error) {
        (Some(r), _) => match &r.error {
            Some(e) => format!("{}: {} in {}", r.outcome, truncate(&e.message, 300), e.step),
            None => r.outcome.clone(),
        },
        (None, Some(e)) => truncate(e, 300),
        (None, None) => "–".into(),
    };
    let (window, resource_note) = match &report {
        _ if !detail => (Default::default(), String::new()),
        Some(r) => {
            let w = r.resources.clone();
            let note = format!(
                "{} samples{}; host figures over the whole job, pipeline figures over its execution step.",
                w.samples,
                w.cpu_count.map(|c| format!(", {c} CPUs")).unwrap_or_default()
            );
            (w, note)
        }
        None => {
            let w = st.collector.window(job.created_at, Instant::now(), None);
            let note = format!("{} samples so far (host figures; the pipeline's own figures come with the report).", w.samples);
            (w, note)
        }
    };
    let created_ms = series::unix_ms(job.created);
    let end_ms = created_ms + (status.elapsed_seconds * 1000.0) as i64;
    let grafana_link = ui
        .grafana_url
        .as_deref()
        .and_then(|g| model::grafana_href(g, Some((created_ms - 60_000, end_ms + 60_000)), Some(&job.trace_id)))
        .map(|href| Link { href, text: "Open the dashboard for this job's time range".into(), external: true });
    let mut links = vec![
        Link::local(format!("/v1/jobs/{}", job.id), "Status (JSON)"),
        Link::local(format!("/v1/jobs/{}/events", job.id), "Events (SSE)"),
    ];
    if report.is_some() {
        links.push(Link::local(format!("/v1/jobs/{}/report", job.id), "Report (JSON)"));
    }
    if status.state == JobState::Succeeded && job.output().is_some() {
        links.push(Link::local(format!("/v1/jobs/{}/output", job.id), "Output video"));
    }
    JobView {
        id: job.id.clone(),
        trace_id: job.trace_id.clone(),
        mode: job.mode.as_str(),
        backend: job.backend,
        state: status.state,
        created_at: status.created_at.clone(),
        stage: status.stage.clone(),
        progress: status.progress.clone(),
        total_seconds: total,
        queue_seconds: queue,
        realtime_factor: report.as_ref().and_then(|r| r.media.realtime_factor),
        outcome,
        worker: report.as_ref().and_then(|r| r.worker.clone()),
        bar,
        steps,
        stages,
        resources: model::resource_rows(&window),
        resource_note,
        report_text: report.as_ref().filter(|_| detail).map(|r| r.to_text()),
        profile: report.as_ref().filter(|_| detail).and_then(|r| r.profile.clone()),
        trace_link: model::trace_link(st.config.trace_ui_url.as_deref(), &job.trace_id),
        grafana_link,
        links,
    }
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests;
