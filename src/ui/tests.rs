//! Rendering tests with made-up data: well-formed (XML-parseable) markup, accessible
//! structure, no reference to another host, GPU and no-GPU resources, escaping.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::model::{self, Check, Header, Health, JobView, JobsList, Link, Overview};
use super::series;
use super::view;
use crate::collector::{CpuSample, GpuSample, MemorySample, Sample, SourceName};
use crate::jobs::report::Timing;
use crate::jobs::{JobState, Progress};

fn header() -> Header {
    Header {
        version: "0.1.0",
        backend: "preview",
        interval: "500ms".into(),
        links: vec![Link::local("/", "Status"), Link { href: "http://grafana.example:3000/d/x".into(), text: "Grafana".into(), external: true }],
    }
}

fn samples(gpu: bool) -> Vec<Arc<Sample>> {
    let now = SystemTime::now();
    (0..20)
        .map(|i| {
            let mut s = Sample::new(Instant::now());
            s.wall = now - Duration::from_millis(500 * (20 - i));
            s.cpu = Some(CpuSample { per_cpu: vec![0.3; 4], total: 0.1 + i as f64 / 40.0, ..Default::default() });
            s.memory = Some(MemorySample { total: 8 << 30, used: 3 << 30, ..Default::default() });
            if gpu {
                s.gpus = Some(vec![GpuSample {
                    index: 0,
                    name: "NVIDIA H200".into(),
                    util_general: Some(0.5),
                    memory_used: Some(10 << 30),
                    memory_total: Some(141 << 30),
                    temperature_celsius: Some(48.0),
                    ..Default::default()
                }]);
            }
            Arc::new(s)
        })
        .collect()
}

fn t(name: &str, seconds: f64, percent: f64) -> Timing {
    Timing { name: name.into(), seconds, percent, gpu: None }
}

fn job(id: &str, state: JobState) -> JobView {
    let finished = state.is_terminal();
    let steps = vec![t("file_processing", 0.2, 10.0), t("config_creation", 0.01, 0.5), t("subprocess_execution", 1.5, 75.0), t("output_discovery", 0.2, 10.0), t("response_preparation", 0.01, 0.5)];
    let stages = vec![t("video_encoding", 1.4, 93.0)];
    JobView {
        id: id.into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        mode: "simple",
        backend: "preview",
        state,
        created_at: "2026-11-28T10:16:39.123Z".into(),
        stage: (!finished).then(|| "video_encoding".into()),
        progress: (!finished).then_some(Progress { done: 10, total: Some(75) }),
        total_seconds: 2.0,
        queue_seconds: 0.05,
        realtime_factor: finished.then_some(1.5),
        // Markup in data must come out escaped.
        outcome: if finished { "failed: <b>bad & \"worse\"</b> in output_discovery".into() } else { "–".into() },
        worker: None,
        bar: model::bar(&steps, &stages, 0.05, 2.0, !finished),
        steps,
        stages,
        resources: model::resource_rows(&Default::default()),
        resource_note: "3 samples".into(),
        report_text: finished.then(|| "MuseTalk job x — FAILED\nSteps\n  a  <tag> & more\n".into()),
        profile: None,
        trace_link: model::trace_link(Some("http://jaeger.example:16686/trace/{trace_id}"), "4bf92f3577b34da6a3ce929d0e0e4736"),
        grafana_link: None,
        links: vec![Link::local(format!("/v1/jobs/{id}"), "Status (JSON)")],
    }
}

fn overview(gpu: bool, jobs: Vec<JobView>) -> Overview {
    let sources = [(SourceName::Cpu, true), (SourceName::Gpu, gpu)];
    Overview {
        header: header(),
        health: Health {
            ready: true,
            jobs_summary: "1 running".into(),
            checks: vec![Check { key: "source_gpu".into(), name: "Collector: gpu".into(), ok: Some(gpu), status: "x".into(), detail: "d".into(), fix: Some(view::GPU_FIX.into()) }],
        },
        resources: series::build(&samples(gpu), SystemTime::now(), Duration::from_secs(300), Duration::from_millis(500), &sources),
        resources_url: "/ui/api/resources?seconds=300".into(),
        jobs: JobsList { jobs, note: "n".into(), legend_stages: vec!["video_encoding".into()], origin_hint: "http://127.0.0.1:8000".into() },
    }
}

/// Parses as XML (after the HTML doctype) and checks the structure every page needs.
fn check_document(html: &str) -> roxmltree::Document<'_> {
    assert!(html.starts_with("<!DOCTYPE html>"), "{}", &html[..40.min(html.len())]);
    let doc = roxmltree::Document::parse_with_options(html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("not well-formed: {e}\n{html}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "html");
    assert_eq!(root.attribute("lang"), Some("en"));
    let mut ids = std::collections::HashSet::new();
    for n in doc.descendants().filter(|n| n.is_element()) {
        if let Some(id) = n.attribute("id") {
            assert!(ids.insert(id.to_string()), "duplicate id {id}");
        }
        match n.tag_name().name() {
            "a" => assert!(!n.descendants().filter_map(|d| d.text()).collect::<String>().trim().is_empty() || n.attribute("aria-label").is_some(), "a link without text"),
            "svg" if n.attribute("role") == Some("img") => assert!(n.attribute("aria-label").is_some_and(|l| !l.is_empty()), "svg image without a label"),
            "svg" => assert_eq!(n.attribute("aria-hidden"), Some("true"), "decorative svg not hidden"),
            "script" => assert!(n.attribute("src").is_some_and(|s| s.starts_with("/ui/static/")), "inline or foreign script"),
            _ => {}
        }
        for a in n.attributes() {
            let v = a.value();
            if a.name() == "href" || a.name() == "src" {
                assert!(v.starts_with('/') || v.starts_with('#') || n.attribute("rel") == Some("noopener noreferrer"), "{} = {v}: a resource of another origin", a.name());
            }
        }
    }
    assert_eq!(doc.descendants().filter(|n| n.has_tag_name("h1")).count(), 1);
    doc
}

#[test]
fn overview_is_well_formed_and_accessible() {
    let o = overview(false, vec![job("aaaaaaaa11112222", JobState::Failed), job("bbbbbbbb33334444", JobState::Running)]);
    let html = view::overview(&o).into_string();
    let doc = check_document(&html);
    // Both jobs, each with a stacked bar of its steps and stages.
    for (id, state) in [("aaaaaaaa11112222", "failed"), ("bbbbbbbb33334444", "running")] {
        let row = doc.descendants().find(|n| n.attribute("data-job-id") == Some(id)).unwrap_or_else(|| panic!("no row {id}"));
        assert_eq!(row.attribute("data-state"), Some(state));
        let rects: Vec<_> = row.descendants().filter(|n| n.has_tag_name("rect") && n.attribute("class").is_some_and(|c| c.contains("seg"))).collect();
        assert!(rects.len() >= 6, "{id}: {} segments", rects.len());
        assert!(rects.iter().all(|r| r.children().any(|c| c.has_tag_name("title"))), "every segment has a title");
    }
    let running = doc.descendants().find(|n| n.attribute("data-job-id") == Some("bbbbbbbb33334444")).unwrap();
    let progress = running.descendants().find(|n| n.has_tag_name("progress")).expect("a running job shows progress");
    assert_eq!((progress.attribute("value"), progress.attribute("max")), (Some("10"), Some("75")));
    // Data is escaped, never markup.
    assert!(html.contains("&lt;b&gt;bad &amp; &quot;worse&quot;&lt;/b&gt;") || html.contains("&lt;b&gt;bad &amp; \"worse\"&lt;/b&gt;"), "{html}");
    assert!(!html.contains("<b>bad"));
    // No GPU: said plainly, with the fix; no GPU sparkline.
    let nogpu = doc.descendants().find(|n| n.attribute("data-series-missing") == Some("gpu")).expect("no-GPU card");
    assert!(nogpu.descendants().any(|n| n.attribute("href") == Some("#check-source_gpu")), "the card points at the fix");
    let fix = doc.descendants().find(|n| n.attribute("id") == Some("check-source_gpu")).expect("the GPU health row");
    assert!(fix.descendants().filter_map(|n| n.text()).collect::<String>().contains("--gpus all"));
    let details = fix.descendants().find(|n| n.has_tag_name("details")).unwrap();
    assert_eq!(details.attribute("open"), Some("open"), "a problem's fix is shown open");
    assert!(!html.contains("data-series=\"gpu0_util\""));
    for id in ["cpu", "memory", "pipeline_cpu", "pipeline_rss"] {
        let svg = doc.descendants().find(|n| n.attribute("data-series") == Some(id)).unwrap_or_else(|| panic!("no sparkline {id}"));
        let pl = svg.children().find(|c| c.has_tag_name("polyline")).unwrap();
        assert_eq!(pl.attribute("points").unwrap().split(' ').count(), 20);
    }
    // Sections the page refreshes carry their partial and fingerprint.
    for id in ["health", "resources", "jobs"] {
        let s = doc.descendants().find(|n| n.attribute("id") == Some(id)).unwrap();
        assert!(s.attribute("data-partial").is_some_and(|p| p.starts_with("/ui/partials/")));
        assert_eq!(s.attribute("data-fp").map(str::len), Some(16));
    }
}

#[test]
fn gpu_cards_when_a_gpu_is_sampled() {
    let html = view::overview(&overview(true, vec![])).into_string();
    let doc = check_document(&html);
    for id in ["gpu0_util", "gpu0_memory", "gpu0_temperature"] {
        assert!(doc.descendants().any(|n| n.attribute("data-series") == Some(id)), "no {id}");
    }
    assert!(!html.contains("data-series-missing"));
    assert!(html.contains("GPU 0 utilization (NVIDIA H200)"));
    assert!(html.contains("No jobs yet"));
}

#[test]
fn job_page_is_well_formed_with_report_and_trace() {
    let j = job("cccccccc55556666", JobState::Failed);
    let html = view::job_page(&header(), &j).into_string();
    let doc = check_document(&html);
    let pre = doc.descendants().find(|n| n.has_tag_name("pre")).expect("report");
    assert_eq!(pre.text(), j.report_text.as_deref());
    assert!(html.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    let a = doc.descendants().find(|n| n.has_tag_name("a") && n.attribute("href").is_some_and(|h| h.contains("jaeger"))).expect("trace link");
    assert_eq!(a.attribute("href"), Some("http://jaeger.example:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(a.attribute("rel"), Some("noopener noreferrer"));
    let section = doc.descendants().find(|n| n.attribute("id") == Some("job")).unwrap();
    assert_eq!(section.attribute("data-refresh"), Some("0"), "a finished job is not refreshed");
    assert!(doc.descendants().any(|n| n.attribute("data-timing") == Some("video_encoding")));

    let running = job("dddddddd77778888", JobState::Running);
    let html = view::job_page(&header(), &running).into_string();
    let doc = check_document(&html);
    assert!(html.contains("The report is ready when the job ends."));
    let section = doc.descendants().find(|n| n.attribute("id") == Some("job")).unwrap();
    assert_eq!(section.attribute("data-refresh"), Some("2000"));
    assert!(section.attribute("data-partial").is_some_and(|p| p == "/ui/partials/jobs/dddddddd77778888"));

    let html = view::not_found(&header(), "No job `x`").into_string();
    check_document(&html);
}

#[test]
fn fragments_are_well_formed_on_their_own() {
    let o = overview(true, vec![job("eeeeeeee", JobState::Succeeded)]);
    for frag in [view::health_section(&o.health), view::jobs_section(&o.jobs), view::resources_section(&o.resources, &o.resources_url)] {
        let s = frag.into_string();
        roxmltree::Document::parse(&s).unwrap_or_else(|e| panic!("{e}: {s}"));
    }
}

#[test]
fn seconds_read_well() {
    assert_eq!(view::secs(0.1234), "0.123 s");
    assert_eq!(view::secs(12.34), "12.3 s");
    assert_eq!(view::secs(125.0), "2 min 05 s");
    assert_eq!(view::secs(3725.0), "1 h 02 min");
    assert_eq!(view::secs(f64::NAN), "–");
}

#[test]
fn static_assets_are_self_contained() {
    for (name, text) in [("app.js", super::APP_JS), ("style.css", super::STYLE_CSS)] {
        for scheme in ["http://", "https://", "//fonts.", "@import"] {
            assert!(!text.contains(scheme), "{name} refers to {scheme}");
        }
    }
    assert!(!super::STYLE_CSS.contains("url("), "no fonts or images from CSS");
    // The icon's only URL is its XML namespace.
    assert_eq!(super::FAVICON_SVG.matches("http").count(), 1);
    assert!(super::FAVICON_SVG.contains("xmlns=\"http://www.w3.org/2000/svg\""));
}
