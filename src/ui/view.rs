//! The status page's HTML (maud): pure functions of view models, no state, no I/O.
//!
//! The markup is also well-formed XML (void elements self-closed, every attribute with
//! a value, no entity but the five XML ones), so tests parse it with an XML parser.
//! Colour is never the only carrier of meaning: states have text, bars have titles and
//! a written bottleneck, sparklines have their current and peak values as text.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::model::{Bar, Check, Header, Health, JobView, JobsList, Link, Overview, ResourceRow, Segment};
use super::series::{self, Resources, Series};
use crate::jobs::{JobState, Step};
use crate::jobs::report::Timing;

/// The status page's own segment for the part of a running job not yet timed.
const IN_PROGRESS: &str = "in_progress";

/// Colour class of a step segment.
pub fn step_class(name: &str) -> String {
    // Colours follow `Step`'s names (style.css has a class per step); anything else is `seg-other`.
    if Step::from_name(name).is_some() || name == IN_PROGRESS { format!("seg seg-{name}") } else { "seg seg-other".into() }
}

/// Colour class of a stage segment: stable per stage name (8 colours).
pub fn stage_class(name: &str) -> String {
    let h = name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("seg stage-{}", h % 8)
}

/// `<tag a="v"/>`: a void element written the XML way (maud writes `<meta …>`).
fn void(tag: &str, attrs: &[(&str, &str)]) -> PreEscaped<String> {
    let mut s = format!("<{tag}");
    for (k, v) in attrs {
        s.push_str(&format!(" {k}=\"{}\"", escape(v)));
    }
    s.push_str("/>");
    PreEscaped(s)
}

fn escape(v: &str) -> String {
    v.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// 64-bit FNV-1a of the rendered markup: the page replaces a section only when it changed.
fn fingerprint(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// Seconds for people: `0.123 s`, `12.3 s`, `2 min 05 s`, `1 h 02 min`.
pub fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "–".into();
    }
    if s < 10.0 {
        format!("{s:.3} s")
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0).floor(), (s % 60.0).floor())
    } else {
        format!("{} h {:02} min", (s / 3600.0).floor(), ((s % 3600.0) / 60.0).floor())
    }
}

fn pct(p: f64) -> String {
    format!("{p:.1} %")
}

/// `HH:MM:SS` of an RFC 3339 time (UTC), or the text as is.
fn clock(rfc3339: &str) -> &str {
    rfc3339.get(11..19).unwrap_or(rfc3339)
}

fn state_badge(state: JobState) -> Markup {
    let (sym, class) = match state {
        JobState::Succeeded => ("✓", "ok"),
        JobState::Failed | JobState::TimedOut => ("✗", "bad"),
        JobState::Cancelled => ("■", "muted"),
        JobState::Running => ("▶", "live"),
        JobState::Queued | JobState::Receiving => ("…", "live"),
    };
    html! { span class={ "badge " (class) } { span aria-hidden="true" { (sym) " " } (state.as_str()) } }
}

fn ok_badge(ok: Option<bool>, yes: &str, no: &str) -> Markup {
    match ok {
        Some(true) => html! { span.badge.ok { span aria-hidden="true" { "✓ " } (yes) } },
        Some(false) => html! { span.badge.bad { span aria-hidden="true" { "✗ " } (no) } },
        None => html! { span.badge.muted { span aria-hidden="true" { "– " } (no) } },
    }
}

fn link(l: &Link) -> Markup {
    html! { a href=(l.href) rel=[l.external.then_some("noopener noreferrer")] { (l.text) } }
}

/// The whole document around `content`.
fn page(title: &str, page_kind: &str, header: &Header, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                (void("meta", &[("charset", "utf-8")]))
                (void("meta", &[("name", "viewport"), ("content", "width=device-width, initial-scale=1")]))
                title { (title) }
                (void("link", &[("rel", "stylesheet"), ("href", &asset("style.css"))]))
                (void("link", &[("rel", "icon"), ("type", "image/svg+xml"), ("href", &asset("favicon.svg"))]))
                script src=(asset("app.js")) defer="defer" {}
            }
            body data-page=(page_kind) {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    div.brand {
                        p.name { a href="/" { "musetalk-sidecar" } }
                        p.sub { "v" (header.version) " · " (header.backend) " backend · sampling every " (header.interval) }
                    }
                    nav aria-label="Service links" {
                        ul {
                            @for l in &header.links {
                                li { (link(l)) }
                            }
                        }
                    }
                }
                main #main tabindex="-1" { (content) }
                footer {
                    p #live-status { "Live updates need JavaScript; this is the page as it was served." }
                    p #ui-errors.errors role="alert" data-count="0" hidden="hidden" {}
                }
            }
        }
    }
}

/// `/ui/static/NAME?v=VERSION` (the version busts caches after an upgrade).
pub fn asset(name: &str) -> String {
    format!("/ui/static/{name}?v={}", env!("CARGO_PKG_VERSION"))
}

/// A section that the page refreshes from `partial` every `refresh_ms`, replacing it
/// only when its fingerprint changed.
fn live_section(id: &str, heading: &str, partial: &str, refresh_ms: u32, resources_url: Option<&str>, inner: Markup) -> Markup {
    let fp = fingerprint(&inner.0);
    let hid = format!("{id}-h");
    html! {
        section id=(id) aria-labelledby=(hid) data-partial=(partial) data-refresh=(refresh_ms) data-fp=(fp) data-resources=[resources_url] {
            h2 id=(hid) tabindex="-1" { (heading) }
            (inner)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Overview: health, resources, recent jobs.

pub fn overview(o: &Overview) -> Markup {
    let content = html! {
        h1 { "Service status" }
        (health_section(&o.health))
        (resources_section(&o.resources, &o.resources_url))
        (jobs_section(&o.jobs))
    };
    page("musetalk-sidecar — status", "overview", &o.header, content)
}

pub fn health_section(h: &Health) -> Markup {
    let inner = html! {
        p.overall {
            (ok_badge(Some(h.ready), "Ready: accepting jobs", "Not ready"))
            " " (h.jobs_summary)
        }
        div.table-wrap role="region" aria-label="Health checks" tabindex="0" {
            table.health {
                thead { tr { th scope="col" { "Check" } th scope="col" { "Status" } th scope="col" { "Detail" } } }
                tbody {
                    @for c in &h.checks { (check_row(c)) }
                }
            }
        }
    };
    live_section("health", "Health", "/ui/partials/health", 10_000, None, inner)
}

fn check_row(c: &Check) -> Markup {
    html! {
        tr #(format!("check-{}", c.key)) data-check=(c.key) {
            th scope="row" { (c.name) }
            td data-label="Status" { (ok_badge(c.ok, &c.status, &c.status)) }
            td data-label="Detail" {
                (c.detail)
                @if let Some(fix) = &c.fix {
                    // Open when it is a problem; a click away when merely not configured.
                    details.fix open=[(c.ok == Some(false)).then_some("open")] {
                        summary { "How to fix" }
                        p { (fix) }
                    }
                }
            }
        }
    }
}

/// `45 s`, `5 min`.
fn span_text(seconds: u64) -> String {
    if seconds < 120 { format!("{seconds} s") } else { format!("{} min", seconds / 60) }
}

pub fn resources_section(r: &Resources, url: &str) -> Markup {
    let span = span_text(r.span_seconds);
    let inner = html! {
        p.sub {
            "The last " (span) " (" (r.samples) " samples from the collector's ring buffer, up to " (span_text(r.seconds)) "); redrawn every 2 s."
        }
        div.cards {
            @for s in &r.series { (spark_card(s, &span)) }
            @if r.gpus == 0 {
                div.card.nogpu data-series-missing="gpu" {
                    h3 { "GPU" }
                    p { strong { "No GPU data" } ": no NVIDIA GPU or NVML on this host, so no GPU utilization, memory or temperature. "
                        a href="#check-source_gpu" { "How to fix" } }
                }
            }
        }
    };
    live_section("resources", "Resources", "/ui/partials/resources", 0, Some(url), inner)
}

/// What to do when the GPU source has no data.
pub const GPU_FIX: &str = "on a GPU host install the NVIDIA driver (it provides libnvidia-ml.so.1) and check it with `nvidia-smi`; in Docker run the container with `--gpus all` (NVIDIA Container Toolkit); on Kubernetes request `nvidia.com/gpu`. `musetalk-sidecar check` says what is missing. CPU and memory are sampled either way.";

fn spark_card(s: &Series, span: &str) -> Markup {
    let view_box = format!("0 0 {} {}", series::WIDTH, series::HEIGHT);
    let aria = format!("{} over the last {span}", s.label);
    html! {
        div.card {
            h3 { (s.label) }
            p.value { span data-series-last=(s.id) { (s.last_text) } }
            svg.spark viewBox=(view_box) preserveAspectRatio="none" role="img" aria-label=(aria) data-series=(s.id) focusable="false" {
                polyline points=(s.points) {}
            }
            p.scale { "peak " span data-series-peak=(s.id) { (s.peak_text) } " · scale 0–" (s.unit.format(s.max)) }
        }
    }
}

pub fn jobs_section(o: &JobsList) -> Markup {
    let inner = html! {
        p.sub { (o.note) }
        (legend(&o.legend_stages))
        div.table-wrap role="region" aria-label="Recent jobs" tabindex="0" {
            table.jobs {
                thead {
                    tr {
                        th scope="col" { "Job" }
                        th scope="col" { "Created (UTC)" }
                        th scope="col" { "Mode" }
                        th scope="col" { "Backend" }
                        th scope="col" { "State" }
                        th scope="col" { "Total" }
                        th scope="col" { abbr title="output seconds per second of processing" { "RTF" } }
                        th scope="col" { "Outcome" }
                        th scope="col" { "Where the time went" }
                    }
                }
                tbody {
                    @for j in &o.jobs { (job_row(j)) }
                    @if o.jobs.is_empty() {
                        tr.empty {
                            td colspan="9" {
                                "No jobs yet. Submit one with "
                                code { "curl -F video=@clip.mp4 -F audio=@voice.wav " (o.origin_hint) "/v1/inference" }
                            }
                        }
                    }
                }
            }
        }
    };
    live_section("jobs", "Recent jobs", "/ui/partials/jobs", 2_000, None, inner)
}

fn legend(stages: &[String]) -> Markup {
    html! {
        ul.legend aria-label="Colours of the steps" {
            @for s in Step::ALL.iter().filter(|s| !s.is_realtime_only()).map(|s| s.as_str()).chain([IN_PROGRESS]) {
                li { (swatch(&step_class(s))) (s.replace('_', " ")) }
            }
            @for s in stages {
                li.stage { (swatch(&stage_class(s))) "stage: " (s.replace('_', " ")) }
            }
        }
    }
}

fn swatch(class: &str) -> Markup {
    html! { svg.swatch viewBox="0 0 10 10" aria-hidden="true" focusable="false" { rect class=(class) x="0" y="0" width="10" height="10" {} } }
}

fn job_row(j: &JobView) -> Markup {
    let href = format!("/ui/jobs/{}", j.id);
    html! {
        tr data-job-id=(j.id) data-state=(j.state.as_str()) {
            td data-label="Job" { a href=(href) aria-label={ "Job " (j.id) } { code { (j.id.get(..8).unwrap_or(&j.id)) } } }
            td data-label="Created" { time datetime=(j.created_at) title=(j.created_at) { (clock(&j.created_at)) } }
            td data-label="Mode" { (j.mode) }
            td data-label="Backend" { (j.backend) }
            td data-label="State" {
                (state_badge(j.state))
                (progress(j))
            }
            td.num data-label="Total" { (secs(j.total_seconds)) }
            td.num data-label="RTF" { @if let Some(r) = j.realtime_factor { (format!("{r:.2}×")) } @else { "–" } }
            td data-label="Outcome" { (j.outcome) }
            td.steps data-label="Steps" { (bar(&j.bar, "bar")) span.bottleneck { (j.bar.summary) } }
        }
    }
}

fn progress(j: &JobView) -> Markup {
    html! {
        @if !j.state.is_terminal() {
            span.progress {
                @if let Some(stage) = &j.stage { " " (stage) }
                @if let Some(p) = &j.progress {
                    @if let Some(total) = p.total.filter(|t| *t > 0) {
                        " " progress max=(total) value=(p.done.min(total)) aria-label=(format!("{} progress", j.stage.as_deref().unwrap_or("job"))) {}
                        " " (p.done) "/" (total)
                    } @else {
                        " " (p.done) " done"
                    }
                }
            }
        }
    }
}

/// The stacked bar: steps on the top row, the execution step's stages under it.
fn bar(b: &Bar, class: &str) -> Markup {
    html! {
        svg class=(class) viewBox="0 0 100 14" preserveAspectRatio="none" role="img" aria-label=(b.summary) focusable="false" {
            rect.track x="0" y="0" width="100" height="9" {}
            @for s in &b.segments { (segment(s)) }
        }
    }
}

fn segment(s: &Segment) -> Markup {
    let (y, h) = if s.row == 0 { ("0", "9") } else { ("10", "4") };
    html! {
        rect class=(s.class) x=(format!("{:.3}", s.x)) y=(y) width=(format!("{:.3}", s.w)) height=(h) data-name=(s.name) {
            title { (s.name) " " (secs(s.seconds)) " (" (pct(s.percent)) ")" }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Job detail.

pub fn job_page(header: &Header, j: &JobView) -> Markup {
    let content = html! {
        p.crumbs { a href="/" { "← Service status" } }
        h1 { "Job " code { (j.id) } }
        (job_section(j))
    };
    page(&format!("Job {} — musetalk-sidecar", j.id.get(..8).unwrap_or(&j.id)), "job", header, content)
}

pub fn job_section(j: &JobView) -> Markup {
    let partial = format!("/ui/partials/jobs/{}", j.id);
    // A finished job does not change: the page stops refreshing it.
    let refresh = if j.state.is_terminal() { 0 } else { 2_000 };
    let inner = html! {
        dl.facts {
            dt { "State" } dd { (state_badge(j.state)) (progress(j)) }
            dt { "Outcome" } dd { (j.outcome) }
            dt { "Mode, backend" } dd { (j.mode) ", " (j.backend) @if let Some(w) = &j.worker { " (worker " (w) ")" } }
            dt { "Created" } dd { time datetime=(j.created_at) { (j.created_at) } }
            dt { "Total" } dd { (secs(j.total_seconds)) @if j.queue_seconds > 0.0 { " (queue " (secs(j.queue_seconds)) ")" } }
            dt { "Realtime factor" } dd { @if let Some(r) = j.realtime_factor { (format!("{r:.2}")) " (output seconds per second of processing)" } @else { "–" } }
            dt { "Trace id" } dd {
                code #trace-id { (j.trace_id) }
                @if let Some(l) = &j.trace_link { " " (link(l)) }
                @else { " " span.muted { "(set --trace-ui-url to link it to Jaeger or Tempo)" } }
            }
            @if let Some(l) = &j.grafana_link { dt { "Dashboard" } dd { (link(l)) } }
            dt { "Data" } dd.links {
                @for l in &j.links { (link(l)) " " }
            }
        }
        section.block aria-labelledby="steps-h" {
            h3 #steps-h { "Where the time went" }
            (bar(&j.bar, "bar big"))
            p.bottleneck { (j.bar.summary) }
            (timing_table("Steps", "share of the job's total time", &j.steps))
            @if !j.stages.is_empty() {
                (timing_table("Stages", "share of the execution step", &j.stages))
            }
        }
        section.block aria-labelledby="res-h" {
            h3 #res-h { "Resources during the job" }
            p.sub { (j.resource_note) }
            @if j.resources.is_empty() {
                p { "No samples in the job's time range." }
            } @else {
                div.table-wrap role="region" aria-label="Resources during the job" tabindex="0" {
                    table.resources {
                        thead { tr { th scope="col" { "Figure" } th scope="col" { "Average" } th scope="col" { "Peak" } } }
                        tbody {
                            @for r in &j.resources { (resource_row(r)) }
                        }
                    }
                }
            }
        }
        @if let Some(p) = &j.profile {
            (profile_section(p))
        }
        section.block aria-labelledby="report-h" {
            h3 #report-h { "Report" }
            @if let Some(text) = &j.report_text {
                pre.report tabindex="0" aria-label="Text report" { (text) }
            } @else {
                p { "The report is ready when the job ends." }
            }
        }
    };
    live_section("job", "Details", &partial, refresh, None, inner)
}

/// The job's Python profile: the flamegraph (an image from the sidecar itself, so the
/// page's `img-src 'self'` allows it) and, per stage, where its Python time went.
fn profile_section(p: &crate::profile::ProfileReport) -> Markup {
    let functions = |fs: &[crate::profile::trace::FunctionShare]| {
        html! {
            @for (i, f) in fs.iter().enumerate() {
                @if i > 0 { ", " }
                (format!("{:.0}% ", f.percent)) code { (f.function) } span.muted { " (" (f.file) ")" }
            }
        }
    };
    html! {
        section.block aria-labelledby="profile-h" {
            h3 #profile-h { "Python profile" }
            @match (&p.url, &p.unavailable) {
                (Some(url), _) => {
                    p.sub {
                        "py-spy at " (p.rate_hz) " Hz, " (p.samples) " samples. "
                        a href=(url) { "speedscope JSON" } " (open it in speedscope), "
                        a href=(format!("{url}?format=svg")) { "flamegraph" } ", "
                        a href=(format!("{url}?format=collapsed")) { "collapsed stacks" } "."
                    }
                    img.flamegraph src=(format!("{url}?format=svg")) alt="Flamegraph of the job's Python stacks (py-spy)" loading="lazy";
                    @if p.stages.iter().any(|s| !s.profile.top_self.is_empty()) {
                        div.table-wrap role="region" aria-label="Top functions per stage" tabindex="0" {
                            table.profile {
                                caption { "Per stage: the functions holding its Python time (own time, then with callees)" }
                                thead { tr { th scope="col" { "Stage" } th scope="col" { "Own time" } th scope="col" { "Total time" } } }
                                tbody {
                                    @for s in &p.stages {
                                        @if !s.profile.top_self.is_empty() {
                                            tr data-stage=(s.stage) {
                                                th scope="row" { (s.stage) }
                                                td { (functions(&s.profile.top_self)) }
                                                td { (functions(&s.profile.top_total)) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                (None, why) => {
                    p { strong { "No profile" } ": " (why.as_deref().unwrap_or("not taken")) }
                }
            }
        }
    }
}

fn timing_table(caption: &str, share: &str, rows: &[Timing]) -> Markup {
    // Stages on a GPU host carry their window's GPU figures and a verdict (README "GPU verdicts").
    let gpu = rows.iter().any(|t| t.gpu.is_some());
    html! {
        div.table-wrap role="region" aria-label=(caption) tabindex="0" {
            table.timings {
                caption { (caption) }
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Time" } th scope="col" { "Share" }
                    @if gpu { th scope="col" { "GPU SM avg" } th scope="col" { "Energy" } th scope="col" { "Verdict" } }
                } }
                tbody {
                    @for t in rows {
                        tr data-timing=(t.name) {
                            th scope="row" { (t.name) }
                            td.num { (secs(t.seconds)) }
                            td.num { @if t.percent > 0.0 { (pct(t.percent)) } @else { "–" } }
                            @if gpu {
                                @match &t.gpu {
                                    Some(g) => {
                                        td.num { (pct(g.sm.avg * 100.0)) }
                                        td.num { @if let Some(j) = g.energy_joules { (format!("{j:.1} J")) } @else { "–" } }
                                        td { span.verdict data-verdict=(g.verdict.as_str()) title=(verdict_title(g)) { (g.verdict.as_str()) } }
                                    }
                                    None => { td.num { "–" } td.num { "–" } td { "–" } }
                                }
                            }
                        }
                    }
                }
            }
            p.sub { "Share: " (share) "." }
        }
    }
}

/// The figures behind a verdict, as its tooltip.
fn verdict_title(g: &crate::collector::insight::StageGpu) -> String {
    let mut t = format!("SM {:.0}% avg, {:.0}% peak", g.sm.avg * 100.0, g.sm.peak * 100.0);
    if let Some(m) = g.memory_bandwidth {
        t.push_str(&format!("; memory bandwidth {:.0}%", m.avg * 100.0));
    }
    if let Some(c) = g.pipeline_cpu_cores {
        t.push_str(&format!("; pipeline CPU {c:.2} cores"));
    }
    if !g.throttle_reasons.is_empty() {
        t.push_str(&format!("; throttled by {}", g.throttle_reasons.join(", ")));
    }
    t
}

fn resource_row(r: &ResourceRow) -> Markup {
    html! { tr { th scope="row" { (r.name) } td.num { (r.avg) } td.num { (r.peak) } } }
}

/// A plain error page (unknown job), in the page's layout.
pub fn not_found(header: &Header, what: &str) -> Markup {
    let content = html! {
        h1 { "Not found" }
        p { (what) }
        p { a href="/" { "Back to the service status" } }
    };
    page("Not found — musetalk-sidecar", "error", header, content)
}
