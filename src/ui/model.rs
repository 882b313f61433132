//! View models of the status page and the pure functions that build them (stacked
//! bars, resource rows, links). Reading the service's state happens in `mod.rs`.

use crate::collector::{AvgPeak, Window};
use crate::jobs::report::Timing;
use crate::jobs::{JobState, Progress};

use super::series::{Resources, Unit};

#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub href: String,
    pub text: String,
    /// Leaves the service (Jaeger, Grafana): `rel="noopener noreferrer"`.
    pub external: bool,
}

impl Link {
    pub fn local(href: impl Into<String>, text: impl Into<String>) -> Self {
        Link { href: href.into(), text: text.into(), external: false }
    }
}

/// The top of every page.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: &'static str,
    pub backend: &'static str,
    pub interval: String,
    pub links: Vec<Link>,
}

/// One row of the health table. `ok`: `Some(true)` fine, `Some(false)` a problem,
/// `None` not configured / not applicable.
#[derive(Clone, Debug)]
pub struct Check {
    pub key: String,
    pub name: String,
    pub ok: Option<bool>,
    pub status: String,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Health {
    pub ready: bool,
    pub jobs_summary: String,
    pub checks: Vec<Check>,
}

/// One rectangle of a stacked bar, in percent of the bar's width.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub name: String,
    pub seconds: f64,
    /// Share of the job's total time.
    pub percent: f64,
    pub x: f64,
    pub w: f64,
    pub class: String,
    /// 0: steps, 1: stages (under the execution step).
    pub row: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub segments: Vec<Segment>,
    /// The bar in words (its `aria-label`, and printed beside it).
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResourceRow {
    pub name: String,
    pub avg: String,
    pub peak: String,
}

#[derive(Clone, Debug)]
pub struct JobView {
    pub id: String,
    pub trace_id: String,
    pub mode: &'static str,
    pub backend: &'static str,
    pub state: JobState,
    pub created_at: String,
    pub stage: Option<String>,
    pub progress: Option<Progress>,
    pub total_seconds: f64,
    pub queue_seconds: f64,
    pub realtime_factor: Option<f64>,
    pub outcome: String,
    pub worker: Option<String>,
    pub bar: Bar,
    pub steps: Vec<Timing>,
    pub stages: Vec<Timing>,
    pub resources: Vec<ResourceRow>,
    pub resource_note: String,
    /// The text report (`Report::to_text`), once the job has ended.
    pub report_text: Option<String>,
    /// The job's Python profile (taken, or why not), when it was profiled.
    pub profile: Option<crate::profile::ProfileReport>,
    pub trace_link: Option<Link>,
    pub grafana_link: Option<Link>,
    pub links: Vec<Link>,
}

#[derive(Clone, Debug)]
pub struct JobsList {
    pub jobs: Vec<JobView>,
    pub note: String,
    /// Stage names seen in the listed jobs, for the colour legend.
    pub legend_stages: Vec<String>,
    /// `http://host:port` as the browser reached the service (for the curl hint).
    pub origin_hint: String,
}

#[derive(Clone, Debug)]
pub struct Overview {
    pub header: Header,
    pub health: Health,
    pub resources: Resources,
    pub resources_url: String,
    pub jobs: JobsList,
}

/// A step whose time is the pipeline's own run (its stages are drawn under it).
fn is_execution(name: &str) -> bool {
    crate::jobs::Step::from_name(name).is_some_and(crate::jobs::Step::is_execution)
}

/// The stacked bar of a job: its steps in order (with `queue_wait` after
/// `file_processing`), the stages of the execution step on a second row, and for a job
/// still running an `in_progress` segment up to `elapsed`. Widths are shares of the
/// job's total time, so the longest segment is the bottleneck.
pub fn bar(steps: &[Timing], stages: &[Timing], queue_seconds: f64, total: f64, running: bool) -> Bar {
    let mut parts: Vec<(String, f64)> = Vec::new();
    for t in steps {
        parts.push((t.name.clone(), t.seconds.max(0.0)));
        if t.name == "file_processing" && queue_seconds > 0.0005 {
            parts.push(("queue_wait".into(), queue_seconds));
        }
    }
    if queue_seconds > 0.0005 && !parts.iter().any(|p| p.0 == "queue_wait") {
        parts.insert(0, ("queue_wait".into(), queue_seconds));
    }
    let known: f64 = parts.iter().map(|p| p.1).sum();
    if running && total > known {
        parts.push(("in_progress".into(), total - known));
    }
    let scale = total.max(parts.iter().map(|p| p.1).sum::<f64>());
    let share = |s: f64| if scale > 0.0 { s / scale * 100.0 } else { 0.0 };
    let mut segments = Vec::new();
    let mut x = 0.0;
    let mut exec_at = None;
    for (name, s) in &parts {
        let w = share(*s);
        if is_execution(name) {
            exec_at = Some((x, w));
        }
        segments.push(Segment { name: name.clone(), seconds: *s, percent: w, x, w, class: super::view::step_class(name), row: 0 });
        x += w;
    }
    if let Some((x0, w0)) = exec_at {
        let mut x = x0;
        for t in stages {
            let w = share(t.seconds).min(x0 + w0 - x).max(0.0);
            segments.push(Segment { name: t.name.clone(), seconds: t.seconds, percent: share(t.seconds), x, w, class: super::view::stage_class(&t.name), row: 1 });
            x += w;
        }
    }
    let summary = match parts.iter().filter(|p| p.0 != "in_progress").max_by(|a, b| a.1.total_cmp(&b.1)) {
        _ if running => match parts.last() {
            Some((n, s)) if n == "in_progress" => format!("Running: {} so far, {} in the current step", super::view::secs(total), super::view::secs(*s)),
            _ => format!("Running: {} so far", super::view::secs(total)),
        },
        Some((name, s)) => {
            let mut t = format!("Bottleneck: {name} {:.1} %", share(*s));
            if is_execution(name)
                && let Some(st) = stages.iter().max_by(|a, b| a.seconds.total_cmp(&b.seconds))
            {
                t.push_str(&format!(" (slowest stage {} {:.1} %)", st.name, share(st.seconds)));
            }
            t
        }
        None => "No step timings".into(),
    };
    Bar { segments, summary }
}

/// The job's resource window as table rows (host figures, its process tree, each GPU).
pub fn resource_rows(w: &Window) -> Vec<ResourceRow> {
    let mut rows = Vec::new();
    let mut add = |name: String, v: &Option<AvgPeak>, unit: Unit, scale: f64| {
        if let Some(v) = v {
            rows.push(ResourceRow { name, avg: unit.format(v.avg * scale), peak: unit.format(v.peak * scale) });
        }
    };
    add("Host CPU".into(), &w.cpu, Unit::Percent, 100.0);
    let mem = match w.memory_total {
        Some(t) => format!("Host memory used (of {})", super::series::bytes(t)),
        None => "Host memory used".into(),
    };
    add(mem, &w.memory_used, Unit::Bytes, 1.0);
    if let Some(t) = &w.tree {
        add(format!("Pipeline CPU (up to {} processes)", t.max_processes), &Some(t.cpu), Unit::Percent, 100.0);
        add("Pipeline memory (RSS)".into(), &Some(t.rss), Unit::Bytes, 1.0);
        add("Pipeline GPU memory".into(), &t.gpu_memory, Unit::Bytes, 1.0);
        add("Pipeline GPU utilization".into(), &t.gpu_util, Unit::Percent, 100.0);
    }
    for g in &w.gpus {
        let n = if g.name.is_empty() { format!("GPU {}", g.index) } else { format!("GPU {} ({})", g.index, g.name) };
        add(format!("{n} utilization"), &g.utilization, Unit::Percent, 100.0);
        let mem = match g.memory_total_bytes {
            Some(t) => format!("{n} memory used (of {})", super::series::bytes(t)),
            None => format!("{n} memory used"),
        };
        add(mem, &g.memory_used_bytes, Unit::Bytes, 1.0);
        add(format!("{n} temperature"), &g.temperature_celsius, Unit::Celsius, 1.0);
        add(format!("{n} power"), &g.power_watts, Unit::Watts, 1.0);
    }
    rows
}

/// Only plain web links are rendered as links (a configured `javascript:` is not).
pub fn is_web_url(u: &str) -> bool {
    let l = u.trim_start().to_ascii_lowercase();
    (l.starts_with("http://") || l.starts_with("https://")) && !u.chars().any(char::is_whitespace)
}

/// The trace UI link of `trace_id` from a `{trace_id}` template.
pub fn trace_link(template: Option<&str>, trace_id: &str) -> Option<Link> {
    let t = template?;
    let href = t.replace("{trace_id}", trace_id);
    (is_web_url(&href) && trace_id.bytes().any(|b| b != b'0')).then(|| Link { href, text: "Open the trace".into(), external: true })
}

/// The Grafana dashboard link. `{from}`/`{to}` in the URL are replaced (epoch ms, or
/// `now-1h`/`now` without a range); otherwise `from`/`to` are appended when a range
/// is given. `{trace_id}` is replaced too.
pub fn grafana_href(template: &str, range: Option<(i64, i64)>, trace_id: Option<&str>) -> Option<String> {
    let (from, to) = match range {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => ("now-1h".to_string(), "now".to_string()),
    };
    let mut href = template.replace("{trace_id}", trace_id.unwrap_or(""));
    if href.contains("{from}") || href.contains("{to}") {
        href = href.replace("{from}", &from).replace("{to}", &to);
    } else if range.is_some() {
        let (base, frag) = match href.split_once('#') {
            Some((b, f)) => (b.to_string(), format!("#{f}")),
            None => (href.clone(), String::new()),
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        href = format!("{base}{sep}from={from}&to={to}{frag}");
    }
    is_web_url(&href).then_some(href)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{GpuWindow, TreeWindow};

    fn t(name: &str, seconds: f64) -> Timing {
        Timing { name: name.into(), seconds, percent: 0.0, gpu: None }
    }

    #[test]
    fn bar_of_a_finished_job() {
        let steps = [t("file_processing", 1.0), t("config_creation", 0.5), t("subprocess_execution", 6.0), t("output_discovery", 1.0), t("response_preparation", 0.5)];
        let stages = [t("model_loading", 2.0), t("unet_inference", 3.0)];
        let b = bar(&steps, &stages, 1.0, 10.0, false);
        let names: Vec<_> = b.segments.iter().map(|s| (s.name.as_str(), s.row)).collect();
        assert_eq!(
            names,
            [
                ("file_processing", 0),
                ("queue_wait", 0),
                ("config_creation", 0),
                ("subprocess_execution", 0),
                ("output_discovery", 0),
                ("response_preparation", 0),
                ("model_loading", 1),
                ("unet_inference", 1)
            ]
        );
        let exec = &b.segments[3];
        assert_eq!((exec.x, exec.w), (25.0, 60.0));
        // Stages start under the execution step.
        assert_eq!((b.segments[6].x, b.segments[6].w), (25.0, 20.0));
        assert_eq!((b.segments[7].x, b.segments[7].w), (45.0, 30.0));
        assert_eq!(b.summary, "Bottleneck: subprocess_execution 60.0 % (slowest stage unet_inference 30.0 %)");
        assert!(b.segments.iter().all(|s| s.x + s.w <= 100.0 + 1e-9));
        assert!(exec.class.contains("seg-subprocess_execution"));
    }

    #[test]
    fn bar_of_a_running_job_and_edge_cases() {
        let b = bar(&[t("file_processing", 1.0), t("config_creation", 1.0)], &[], 0.0, 4.0, true);
        let last = b.segments.last().unwrap();
        assert_eq!((last.name.as_str(), last.x, last.w), ("in_progress", 50.0, 50.0));
        assert!(b.summary.starts_with("Running: 4.000 s so far"), "{}", b.summary);
        // Steps longer than the total (clock skew) never overflow the bar.
        let b = bar(&[t("a", 3.0), t("b", 3.0)], &[], 0.0, 4.0, false);
        assert!((b.segments.iter().map(|s| s.w).sum::<f64>() - 100.0).abs() < 1e-9);
        assert!(b.segments[0].class.contains("seg-other"));
        let b = bar(&[], &[], 0.0, 0.0, false);
        assert!(b.segments.is_empty());
        assert_eq!(b.summary, "No step timings");
        // Stages that add up to more than their step are clipped to it.
        let b = bar(&[t("inference", 1.0)], &[t("x", 0.8), t("y", 0.8)], 0.0, 1.0, false);
        assert!((b.segments[2].x + b.segments[2].w - 100.0).abs() < 1e-9);
    }

    #[test]
    fn links() {
        assert_eq!(
            trace_link(Some("http://jaeger:16686/trace/{trace_id}"), "4bf92f3577b34da6a3ce929d0e0e4736").unwrap().href,
            "http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(trace_link(Some("javascript:alert(1)//{trace_id}"), "ab").is_none());
        assert!(trace_link(Some("http://j/{trace_id}"), "00000000000000000000000000000000").is_none());
        assert!(trace_link(None, "ab").is_none());
        assert_eq!(grafana_href("http://g:3000/d/x?orgId=1", Some((1, 2)), None).unwrap(), "http://g:3000/d/x?orgId=1&from=1&to=2");
        assert_eq!(grafana_href("http://g:3000/d/x", Some((1, 2)), None).unwrap(), "http://g:3000/d/x?from=1&to=2");
        assert_eq!(grafana_href("http://g:3000/d/x#p", Some((1, 2)), None).unwrap(), "http://g:3000/d/x?from=1&to=2#p");
        assert_eq!(grafana_href("http://g/d/x?from={from}&to={to}", None, None).unwrap(), "http://g/d/x?from=now-1h&to=now");
        assert_eq!(grafana_href("http://g/d/x", None, None).unwrap(), "http://g/d/x");
        assert!(grafana_href("file:///etc/passwd", None, None).is_none());
    }

    #[test]
    fn resource_rows_cover_host_tree_and_gpus() {
        let ap = |avg, peak| Some(AvgPeak { avg, peak, samples: 3 });
        let w = Window {
            samples: 3,
            seconds: 1.5,
            cpu: ap(0.25, 0.5),
            cpu_count: Some(4),
            memory_used: ap(1024.0, 2048.0),
            memory_total: Some(4096),
            gpus: vec![GpuWindow {
                index: 0,
                name: "H200".into(),
                utilization: ap(0.5, 0.9),
                memory_used_bytes: ap(1e9, 2e9),
                memory_total_bytes: Some(141 << 30),
                temperature_celsius: ap(40.0, 55.0),
                power_watts: None,
                ..Default::default()
            }],
            tree: Some(TreeWindow { cpu: AvgPeak { avg: 0.1, peak: 0.2, samples: 3 }, rss: AvgPeak { avg: 100.0, peak: 200.0, samples: 3 }, gpu_memory: None, gpu_util: None, max_processes: 2, gpus: vec![] }),
        };
        let rows = resource_rows(&w);
        let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Host CPU",
                "Host memory used (of 4.0 KiB)",
                "Pipeline CPU (up to 2 processes)",
                "Pipeline memory (RSS)",
                "GPU 0 (H200) utilization",
                "GPU 0 (H200) memory used (of 141.0 GiB)",
                "GPU 0 (H200) temperature"
            ]
        );
        assert_eq!((rows[0].avg.as_str(), rows[0].peak.as_str()), ("25.0 %", "50.0 %"));
        assert_eq!(rows[6].peak, "55 °C");
        assert!(resource_rows(&Window::default()).is_empty());
    }
}
