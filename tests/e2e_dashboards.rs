//! The Grafana dashboards, `prometheus.yml` and the alert rules, proven against a REAL
//! Prometheus (DESIGN.md §7, §8): the Debian `prometheus` server runs the repository's
//! `prometheus.yml` (only the target, the intervals and the rule path rewritten for the
//! test), scrapes the real binary while real jobs run through it (the `musetalk` backend
//! against the fixture MuseTalk tree in simple mode, the fixture realtime worker in
//! realtime mode, with the OTLP receiver taking the spans), and then **every panel query
//! of every dashboard** is evaluated through Prometheus' HTTP API with the Grafana
//! variables substituted (mode `simple`, mode `realtime`, and All). A panel whose query
//! returns nothing fails the test, GPU panels included: the service loads the fake
//! `libnvidia-ml.so.1` (tests/common/nvml.rs), so the whole GPU path runs without a GPU.
//!
//! Needs `prometheus`, `promtool`, `ffmpeg`, `ffprobe` and `python3` with PyYAML
//! (scripts/test.sh installs them). One service and one Prometheus; about 30 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::media::{HeldUpload, file_part, hold_upload};
use common::nvml::{FIXTURE_PROCS, FakeNvml, H100};
use common::otlp::OtlpReceiver;
use common::prometheus::promtool;
use common::service::{Service, ServiceBuilder};
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn repo(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

/// What Grafana's `$__rate_interval` becomes in the test. Grafana makes it at least four
/// scrape intervals; the test scrapes every second and runs its jobs within a minute or
/// so, so a 2-minute window holds all of them.
const RATE_INTERVAL: &str = "2m";
/// What `$__range` (the dashboard's time range) becomes.
const RANGE: &str = "10m";
/// The histogram families whose buckets carry trace-id exemplars (src/metrics.rs).
const TRACED_FAMILIES: &[&str] = &[
    "musetalk_time_to_first_frame_seconds",
    "musetalk_batch_duration_seconds",
    "musetalk_time_to_first_byte_seconds",
    "musetalk_job_duration_seconds",
    "musetalk_step_duration_seconds",
    "musetalk_stage_duration_seconds",
];
/// Series Prometheus makes itself (not on /metrics).
const SYNTHETIC_SERIES: &[&str] = &["up"];

// ---------------------------------------------------------------------------------------
// The GPU: the fake NVML (tests/fixtures/fake_nvml) stands in for the driver, so every
// GPU panel must return data like any other; there are no exceptions to "every panel
// returns data".


// ---------------------------------------------------------------------------------------
// Dashboards.

struct Dashboard {
    file: String,
    uid: String,
    json: Value,
}

struct Target {
    ref_id: String,
    expr: String,
    exemplar: bool,
}

struct Panel {
    title: String,
    json: Value,
    targets: Vec<Target>,
}

fn dashboards() -> Vec<Dashboard> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("dashboards"))
        .expect("dashboards/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "dashboards/ should hold the overview and resources dashboards: {files:?}"
    );
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            let uid = json["uid"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no uid", path.display()))
                .to_string();
            Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                uid,
                json,
            }
        })
        .collect()
}

/// Every panel that is not a row, rows' nested panels included.
fn panels(d: &Dashboard) -> Vec<Panel> {
    fn walk(list: &Value, out: &mut Vec<Panel>) {
        for p in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            if p["type"] == "row" {
                walk(&p["panels"], out);
                continue;
            }
            let targets = p["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|t| Target {
                    ref_id: t["refId"].as_str().unwrap_or_default().to_string(),
                    expr: t["expr"].as_str().unwrap_or_default().to_string(),
                    exemplar: t["exemplar"].as_bool().unwrap_or(false),
                })
                .collect();
            out.push(Panel {
                title: p["title"].as_str().unwrap_or_default().to_string(),
                json: p.clone(),
                targets,
            });
        }
    }
    let mut out = Vec::new();
    walk(&d.json["panels"], &mut out);
    out
}

/// Every panel object, rows and their nested panels included.
fn all_panel_json(list: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push(p);
        if p["type"] == "row" {
            out.extend(all_panel_json(&p["panels"]));
        }
    }
    out
}

fn variables(d: &Dashboard) -> Vec<Value> {
    d.json["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// A small PromQL scanner: enough to list the vector selectors (metric + matchers) of the
// expressions used here, skipping functions, aggregations, label lists and literals.

#[derive(Debug)]
struct Selector {
    metric: String,
    /// `(label, op, value)` of the `{…}` matchers.
    matchers: Vec<(String, String, String)>,
    /// The text inside `[…]` right after the selector (a range), if any.
    range: Option<String>,
}

const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const NOT_METRICS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

fn skip_string(c: &[char], mut i: usize) -> usize {
    let q = c[i];
    i += 1;
    while i < c.len() && c[i] != q {
        if c[i] == '\\' && q != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// From an opening `open` at `i`, the index after its matching `close` (strings skipped).
fn skip_group(c: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                i = skip_string(c, i);
                continue;
            }
            ch if ch == open => depth += 1,
            ch if ch == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    c.len()
}

fn parse_matchers(text: &str) -> Vec<(String, String, String)> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        while i < c.len() && (c[i].is_whitespace() || c[i] == ',') {
            i += 1;
        }
        if i >= c.len() {
            break;
        }
        let start = i;
        while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        let label: String = c[start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < c.len() && matches!(c[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = c[op_start..i].iter().collect();
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        assert!(
            i < c.len() && matches!(c[i], '"' | '\'' | '`'),
            "cannot parse matchers `{text}` at {i}"
        );
        let end = skip_string(&c, i);
        let value: String = c[i + 1..end - 1].iter().collect();
        out.push((label, op, value));
        i = end;
    }
    out
}

fn selectors(expr: &str) -> Vec<Selector> {
    let c: Vec<char> = expr.chars().collect();
    let mut out: Vec<Selector> = Vec::new();
    let mut i = 0;
    let skip_ws = |mut j: usize| {
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < c.len() {
        let ch = c[i];
        if matches!(ch, '"' | '\'' | '`') {
            i = skip_string(&c, i);
        } else if ch == '{' {
            panic!("`{expr}`: a selector without a metric name; name the metric");
        } else if ch == '[' {
            i = skip_group(&c, i, '[', ']');
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let j = skip_ws(i);
            let next = c.get(j).copied();
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                if next == Some('(') {
                    i = skip_group(&c, j, '(', ')');
                }
            } else if NOT_METRICS.contains(&word.as_str()) || next == Some('(') {
                // An operator, an aggregation or a function.
            } else {
                let mut matchers = Vec::new();
                if next == Some('{') {
                    let end = skip_group(&c, j, '{', '}');
                    matchers = parse_matchers(&c[j + 1..end - 1].iter().collect::<String>());
                    i = end;
                }
                let k = skip_ws(i);
                let range = (c.get(k) == Some(&'[')).then(|| {
                    let end = skip_group(&c, k, '[', ']');
                    c[k + 1..end - 1].iter().collect::<String>()
                });
                out.push(Selector {
                    metric: word,
                    matchers,
                    range,
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `[…]` range in `expr` (after selectors and subqueries alike).
fn ranges(expr: &str) -> Vec<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if matches!(c[i], '"' | '\'' | '`') {
            i = skip_string(&c, i);
        } else if c[i] == '[' {
            let end = skip_group(&c, i, '[', ']');
            out.push(c[i + 1..end - 1].iter().collect());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

fn has_matcher(s: &Selector, label: &str, op: &str, value: &str) -> bool {
    s.matchers
        .iter()
        .any(|(l, o, v)| l == label && o == op && v == value)
}

// ---------------------------------------------------------------------------------------
// Grafana variable substitution, as Grafana's Prometheus datasource does it.

struct Vars {
    instance: String,
    mode: String,
    gpu: String,
}

/// A single value of a multi-value variable used in `=~`: regex-escaped, with the
/// backslashes doubled for the PromQL string (Grafana's `prometheusSpecialRegexEscape`).
fn grafana_regex_escape(v: &str) -> String {
    let mut out = String::new();
    for ch in v.chars() {
        if "\\^$*+?.()|{}[]".contains(ch) {
            out.push_str("\\\\");
        }
        out.push(ch);
    }
    out
}

fn substitute(expr: &str, vars: &Vars) -> String {
    let mut s = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE);
    for (name, value) in [
        ("instance", &vars.instance),
        ("mode", &vars.mode),
        ("gpu", &vars.gpu),
    ] {
        s = s
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !s.contains('$'),
        "`{expr}` uses a variable or macro the test does not know (only $instance, $mode, $gpu, $__rate_interval, $__range): `{s}`"
    );
    s
}

// ---------------------------------------------------------------------------------------
// 1. Static checks of the dashboard JSON (no services).

#[test]
fn dashboards_are_well_formed() {
    let ds = dashboards();
    let mut uids = BTreeSet::new();
    for d in &ds {
        let text = std::fs::read_to_string(repo("dashboards").join(&d.file)).unwrap();
        assert!(
            text.ends_with("}\n"),
            "{}: end the file with exactly one newline (the k8s ConfigMap keeps it verbatim)",
            d.file
        );
        assert!(
            uids.insert(d.uid.clone()),
            "duplicate dashboard uid {}",
            d.uid
        );
        assert!(
            d.json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{}: no title",
            d.file
        );
        assert!(
            d.json["id"].is_null(),
            "{}: `id` must be null in a provisioned dashboard",
            d.file
        );
        assert!(
            d.json["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{}: schemaVersion",
            d.file
        );
        assert!(
            d.json["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "musetalk")),
            "{}: tag `musetalk` (the dashboards link each other by it)",
            d.file
        );

        // Variables: datasource, instance, mode, gpu.
        let vars = variables(d);
        let var = |name: &str| {
            vars.iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{}: no `{name}` variable", d.file))
                .clone()
        };
        let dsv = var("datasource");
        assert_eq!(
            (dsv["type"].as_str(), dsv["query"].as_str()),
            (Some("datasource"), Some("prometheus")),
            "{}: {dsv}",
            d.file
        );
        assert_eq!(
            dsv["current"]["value"], "prometheus",
            "{}: the datasource variable defaults to the provisioned uid `prometheus`",
            d.file
        );
        for name in ["instance", "gpu"] {
            let v = var(name);
            assert_eq!(v["type"], "query", "{}: {v}", d.file);
            assert_eq!(
                v["datasource"]["uid"], "${datasource}",
                "{}: {name} queries the selected datasource",
                d.file
            );
            assert!(
                v["definition"]
                    .as_str()
                    .is_some_and(|q| q.starts_with("label_values(")),
                "{}: {v}",
                d.file
            );
            assert_eq!(v["query"]["query"], v["definition"], "{}: {name}", d.file);
        }
        let mode = var("mode");
        let opts: Vec<&str> = mode["options"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["value"].as_str())
            .collect();
        assert!(
            opts.contains(&"simple") && opts.contains(&"realtime"),
            "{}: mode options {opts:?}",
            d.file
        );
        for name in ["instance", "mode", "gpu"] {
            let v = var(name);
            assert!(
                v["includeAll"] == true && v["multi"] == true && v["allValue"] == ".*",
                "{}: `{name}` must be multi-value with All = `.*` (queries use =~): {v}",
                d.file
            );
        }

        // Panels.
        let ps = panels(d);
        assert!(!ps.is_empty(), "{}: no panels", d.file);
        let mut ids = BTreeSet::new();
        let mut titles = BTreeSet::new();
        let mut rects: Vec<(String, i64, i64, i64, i64)> = Vec::new();
        let mut used_vars = BTreeSet::new();
        for p in all_panel_json(&d.json["panels"]) {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: panel without id: {}", d.file, p["title"]));
            assert!(ids.insert(id), "{}: duplicate panel id {id}", d.file);
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_i64().unwrap(),
                g["y"].as_i64().unwrap(),
                g["w"].as_i64().unwrap(),
                g["h"].as_i64().unwrap(),
            );
            assert!(
                x >= 0 && w > 0 && x + w <= 24 && h > 0,
                "{}: panel {} gridPos {g}",
                d.file,
                p["title"]
            );
            for (other, ox, oy, ow, oh) in &rects {
                let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
                assert!(
                    !overlap,
                    "{}: panel {} overlaps {other}",
                    d.file, p["title"]
                );
            }
            rects.push((p["title"].to_string(), x, y, w, h));
        }
        for p in &ps {
            let at = format!("{} / {}", d.file, p.title);
            assert!(!p.title.is_empty(), "{}: a panel has no title", d.file);
            assert!(
                titles.insert(p.title.clone()),
                "{}: two panels titled {:?} (exceptions are keyed by title)",
                d.file,
                p.title
            );
            assert!(
                p.json["description"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{at}: describe what the panel shows"
            );
            assert_eq!(
                p.json["datasource"]["uid"], "${datasource}",
                "{at}: panels use the `datasource` variable"
            );
            assert!(!p.targets.is_empty(), "{at}: no queries");
            let mut refs = BTreeSet::new();
            for (t, tj) in p.targets.iter().zip(p.json["targets"].as_array().unwrap()) {
                assert!(!t.expr.is_empty(), "{at}: target {} has no expr", t.ref_id);
                assert!(
                    refs.insert(t.ref_id.clone()) && !t.ref_id.is_empty(),
                    "{at}: refIds must be unique"
                );
                assert_eq!(
                    tj["datasource"]["uid"], "${datasource}",
                    "{at}/{}",
                    t.ref_id
                );
                for r in ranges(&t.expr) {
                    assert!(
                        r == "$__rate_interval" || r == "$__range",
                        "{at}: range `[{r}]` in `{}`: use [$__rate_interval] (or [$__range] for whole-range stats) so Grafana fits it to the scrape interval",
                        t.expr
                    );
                }
                let n_quantiles = t.expr.matches("histogram_quantile(").count();
                assert_eq!(
                    n_quantiles,
                    t.expr.matches("sum by (le").count(),
                    "{at}: histogram_quantile over `sum by (le, …) (rate(X_bucket[$__rate_interval]))`: `{}`",
                    t.expr
                );
                for s in selectors(&t.expr) {
                    assert!(
                        has_matcher(&s, "instance", "=~", "$instance"),
                        "{at}: `{}` lacks instance=~\"$instance\" in `{}`",
                        s.metric,
                        t.expr
                    );
                    if s.metric.starts_with("hw_") {
                        assert!(
                            has_matcher(&s, "gpu", "=~", "$gpu"),
                            "{at}: `{}` lacks gpu=~\"$gpu\" in `{}`",
                            s.metric,
                            t.expr
                        );
                    }
                }
                for v in ["instance", "mode", "gpu"] {
                    if t.expr.contains(&format!("${v}")) {
                        used_vars.insert(v);
                    }
                }
            }
            // Latency panels over traced histograms show their exemplars.
            let traced = p.targets.iter().any(|t| {
                t.expr.contains("histogram_quantile(")
                    && TRACED_FAMILIES
                        .iter()
                        .any(|f| t.expr.contains(&format!("{f}_bucket")))
            });
            if traced {
                assert!(
                    p.targets.iter().any(|t| t.exemplar),
                    "{at}: a latency panel over a traced histogram must have a target with \"exemplar\": true"
                );
            }
            for t in &p.targets {
                if t.exemplar {
                    assert!(
                        TRACED_FAMILIES
                            .iter()
                            .any(|f| t.expr.contains(&format!("{f}_bucket"))),
                        "{at}: exemplars on a family without them: `{}`",
                        t.expr
                    );
                }
            }
        }
        for v in ["instance", "mode", "gpu"] {
            assert!(
                used_vars.contains(v),
                "{}: the `{v}` variable is used by no panel",
                d.file
            );
        }
    }
}

#[test]
fn promql_scanner_finds_selectors() {
    let s = selectors(
        r#"(sum by (step) (rate(a_sum{instance=~"$instance", mode=~"x|y"}[$__rate_interval])) or label_replace(sum(rate(b{q="}"}[5m] offset 30m)), "step", "queue_wait", "", "")) / on () group_left () sum(c) and on (instance, job) d{instance=~"$instance"} > 1e9"#,
    );
    let names: Vec<&str> = s.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["a_sum", "b", "c", "d"]);
    assert!(has_matcher(&s[0], "instance", "=~", "$instance"));
    assert_eq!(s[0].matchers[1], ("mode".into(), "=~".into(), "x|y".into()));
    assert_eq!(s[1].matchers[0].2, "}");
    assert_eq!(s[1].range.as_deref(), Some("5m"));
    assert_eq!(
        ranges("rate(x[1m]) + max_over_time(y[1h:5m])"),
        ["1m", "1h:5m"]
    );
    let vars = Vars {
        instance: grafana_regex_escape("127.0.0.1:80"),
        mode: ".*".into(),
        gpu: ".*".into(),
    };
    assert_eq!(
        substitute(r#"up{instance=~"$instance"}[$__rate_interval]"#, &vars),
        r#"up{instance=~"127\\.0\\.0\\.1:80"}[2m]"#
    );
}

// ---------------------------------------------------------------------------------------
// The repository's prometheus.yml, run by the real Prometheus.


/// prometheus.yml with only what a test must change: the sidecar target (the compose
/// service `sidecar:8000` → the test's port), 1 s intervals, and the rule file paths made
/// absolute. Everything else (job name, metrics path, rule files) is the repository's.
fn test_config(scraped: &[SocketAddr]) -> String {
    let text = std::fs::read_to_string(repo("prometheus.yml"))
        .expect("prometheus.yml at the repository root");
    let mut cfg: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).expect("prometheus.yml parses");
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        cfg["global"][key] = "1s".into();
    }
    let rules = cfg["rule_files"]
        .as_sequence_mut()
        .expect("prometheus.yml loads rule_files");
    for r in rules.iter_mut() {
        let rel = r.as_str().unwrap().to_string();
        assert!(
            repo(&rel).is_file(),
            "prometheus.yml rule file {rel} does not exist (paths are relative to prometheus.yml)"
        );
        *r = repo(&rel).display().to_string().into();
    }
    let jobs = cfg["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs");
    assert_eq!(
        jobs.len(),
        1,
        "prometheus.yml scrapes one job, the sidecar; teach this test about any new one"
    );
    let job = &mut jobs[0];
    assert_eq!(job["job_name"], "musetalk-sidecar");
    for key in ["scrape_interval", "scrape_timeout"] {
        if job.get(key).is_some() {
            job[key] = "1s".into();
        }
    }
    let statics = job["static_configs"]
        .as_sequence_mut()
        .expect("static_configs");
    assert_eq!(statics.len(), 1);
    let targets = statics[0]["targets"].as_sequence_mut().unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(
        targets[0], "sidecar:8000",
        "the compose service name and the sidecar's default port"
    );
    *targets = scraped.iter().map(|t| t.to_string().into()).collect();
    serde_yaml_ng::to_string(&cfg).unwrap()
}

struct RepoPrometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl RepoPrometheus {
    async fn start(targets: &[SocketAddr]) -> RepoPrometheus {
        let dir = tempfile::Builder::new()
            .prefix("musetalk-dash-prom-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, test_config(targets)).unwrap();
        let (ok, out) = promtool(&["check", "config", config.to_str().unwrap()], None);
        assert!(
            ok,
            "promtool check config (rewritten prometheus.yml):\n{out}"
        );
        let client = common::service::client();
        let log_path = dir.path().join("prometheus.log");
        let mut last = String::new();
        for _ in 0..3 {
            let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
            let log = std::fs::File::create(&log_path).unwrap();
            // The flags the README documents, plus a private TSDB and port.
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg("--enable-feature=exemplar-storage")
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run prometheus ({e}): apt-get install prometheus (scripts/test.sh does)"));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(r) = client
                    .get(format!("http://{addr}/-/ready"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    && r.status().is_success()
                {
                    return RepoPrometheus {
                        child,
                        addr,
                        dir,
                        client,
                    };
                }
                if child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                    last = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("Prometheus did not become ready; log:\n{last}");
    }

    /// Started against `svc`, once its first scrape succeeded; with the `instance` label it scrapes under.
    async fn scraping(svc: &Service) -> (RepoPrometheus, String) {
        let prom = RepoPrometheus::start(&[svc.metrics_addr()]).await;
        let instance = svc.metrics_addr().to_string();
        prom.wait_value(&format!(r#"up{{job="musetalk-sidecar", instance="{instance}"}}"#), Duration::from_secs(20), |v| v == 1.0).await;
        (prom, instance)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path with query parameters; returns the whole JSON answer.
    async fn get(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut url = reqwest::Url::parse(&format!("http://{}{path}", self.addr)).unwrap();
        url.query_pairs_mut().extend_pairs(params);
        let r = self
            .client
            .get(url.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body = r.text().await.unwrap_or_default();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    /// An instant query: `Ok(result)` when Prometheus accepts it, `Err(error)` otherwise.
    async fn try_query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let v = self.get("/api/v1/query", &[("query", promql)]).await;
        if v["status"] == "success" {
            Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    async fn query(&self, promql: &str) -> Vec<Value> {
        self.try_query(promql)
            .await
            .unwrap_or_else(|e| panic!("`{promql}` refused: {e}"))
    }

    async fn value(&self, promql: &str) -> Option<f64> {
        self.query(promql).await.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Polls `promql` every 200 ms until its first value satisfies `ok`.
    async fn wait_value(&self, promql: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.value(promql).await;
            if let Some(v) = v
                && ok(v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "`{promql}` not as expected within {timeout:?} (last: {v:?}); Prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for RepoPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// At least one sample of an instant-query result is a finite number.
fn has_finite(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

// ---------------------------------------------------------------------------------------
// Media and jobs.

struct Media {
    /// 2 s, 128×128, 25 fps H.264.
    video: PathBuf,
    /// 3 s sine: a job that succeeds.
    audio: PathBuf,
    /// 16×16: too small for a face, so MuseTalk fails the task (no face found → `division
    /// by zero`, exit code 0): a job that fails. (Audio shorter than a frame no longer
    /// reaches MuseTalk: the upload check refuses it with a 400.)
    tiny_video: PathBuf,
}

fn media() -> &'static Media {
    static MEDIA: OnceLock<Media> = OnceLock::new();
    MEDIA.get_or_init(|| {
        let shared = common::media::media();
        Media { video: shared.video.clone(), audio: shared.audio.clone(), tiny_video: common::media::video(16, 16, 25, 2) }
    })
}

async fn submit(svc: &Service, video: &Path, audio: &Path) -> (StatusCode, Value) {
    let form = Form::new()
        .part("video", file_part(video, "v.mp4"))
        .part("audio", file_part(audio, "a.wav"));
    let r = svc
        .client()
        .post(svc.url("/v1/inference"))
        .multipart(form)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/inference: {e}; logs:\n{}", svc.logs()));
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}")),
    )
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}")),
    )
}

/// `POST /v1/avatars`: realtime mode's preparation job (202).
async fn prepare_avatar(svc: &Service, id: &str) -> (StatusCode, Value) {
    let form = Form::new()
        .part("video", file_part(&media().video, "v.mp4"))
        .text("avatar_id", id.to_string());
    json_of(
        svc.client()
            .post(svc.url("/v1/avatars"))
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// `POST /v1/avatars/{id}/speak`: a realtime job, answered when done.
async fn speak(svc: &Service, id: &str) -> (StatusCode, Value) {
    let form = Form::new().part("audio", file_part(&media().audio, "a.wav"));
    let url = svc.url(&format!("/v1/avatars/{id}/speak"));
    json_of(svc.client().post(url).multipart(form).send().await.unwrap()).await
}

/// Waits (30 s) until the crashed realtime worker was restarted and is up again.
async fn wait_worker_back(svc: &Service) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = svc.metrics_text().await;
        let value = |series: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
        };
        let restarted =
            value(r#"musetalk_worker_restarts_total{worker="gpu0"}"#).is_some_and(|v| v >= 1.0);
        if restarted && value(r#"musetalk_worker_up{worker="gpu0"}"#) == Some(1.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the realtime worker did not come back; logs:\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sample names on a text-format /metrics page.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Label names each exposed sample name carries.
fn exposed_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap().to_string();
        let entry = out.entry(name).or_default();
        if let Some(inner) = l
            .split_once('{')
            .and_then(|(_, r)| r.rsplit_once('}'))
            .map(|(i, _)| i)
        {
            for (label, _, _) in parse_matchers(inner) {
                entry.insert(label);
            }
        }
    }
    out
}

/// Metric names of README.md's "Metrics reference" table (the documented contract).
fn documented_names() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let section = readme
        .split("## Metrics reference")
        .nth(1)
        .expect("README.md has a Metrics reference section");
    let table = section.split("\n## ").next().unwrap();
    let mut out = BTreeSet::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap();
        for name in first.split('`').skip(1).step_by(2) {
            out.insert(name.to_string());
        }
    }
    out
}

fn base_name(sample: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| sample.strip_suffix(s))
        .unwrap_or(sample)
}

/// `(alert name, expr)` of every rule in deploy/prometheus/alerts.yml.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out = Vec::new();
    for g in v["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap()
                .to_string();
            out.push((name, r["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// What evaluating every panel and variable of the dashboards found.
struct Evaluation {
    checked: usize,
    with_data: usize,
    failures: Vec<String>,
    waived: BTreeSet<String>,
}

impl Evaluation {
    fn assert_clean(&self, prom: &RepoPrometheus) {
        assert!(
            self.failures.is_empty(),
            "{} of {} panel queries failed:\n{}\nPrometheus log:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n"),
            prom.log()
        );
        eprintln!(
            "{} of {} panel query evaluations returned a finite value; waived here: {:#?}",
            self.with_data, self.checked, self.waived
        );
    }
}

/// Evaluates every panel query of `ds` with the variables substituted three ways (this
/// instance with mode `simple`, then `realtime`, then All) and every variable query. A
/// query Prometheus refuses always fails; one without a finite value fails unless
/// `waive_panel(uid, panel)` / `waive_variable(name)` gives the reason it may be empty here.
async fn evaluate_dashboards(
    prom: &RepoPrometheus,
    ds: &[Dashboard],
    instance: &str,
    waive_panel: &dyn Fn(&str, &Panel) -> Option<String>,
    waive_variable: &dyn Fn(&str) -> Option<String>,
) -> Evaluation {
    let one = |mode: &str| Vars {
        instance: grafana_regex_escape(instance),
        mode: mode.into(),
        gpu: ".*".into(),
    };
    let all = Vars {
        instance: ".*".into(),
        mode: ".*".into(),
        gpu: ".*".into(),
    };
    let var_sets = [one("simple"), one("realtime"), all];
    let all = &var_sets[2];
    let mut e = Evaluation {
        checked: 0,
        with_data: 0,
        failures: Vec::new(),
        waived: BTreeSet::new(),
    };
    for d in ds {
        for p in panels(d) {
            let waiver = waive_panel(&d.uid, &p);
            for t in &p.targets {
                for vars in &var_sets {
                    let q = substitute(&t.expr, vars);
                    e.checked += 1;
                    match prom.try_query(&q).await {
                        Err(err) => e.failures.push(format!(
                            "{} / {} / {}: Prometheus refuses `{q}`: {err}",
                            d.file, p.title, t.ref_id
                        )),
                        Ok(r) if has_finite(&r) => e.with_data += 1,
                        Ok(r) => match &waiver {
                            Some(why) => {
                                e.waived.insert(format!("{} / {} ({why})", d.file, p.title));
                            }
                            None => e.failures.push(format!(
                                "{} / {} / {}: no finite value: `{q}` → {}",
                                d.file,
                                p.title,
                                t.ref_id,
                                Value::Array(r)
                            )),
                        },
                    }
                }
            }
        }
        for v in variables(d) {
            let Some(def) = v["definition"].as_str() else {
                continue;
            };
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap();
            let (sel, label) = inner.rsplit_once(',').unwrap();
            let q = format!("group by ({}) ({})", label.trim(), substitute(sel, all));
            let name = v["name"].as_str().unwrap();
            match prom.try_query(&q).await {
                Err(err) => e.failures.push(format!(
                    "{} / variable {name}: Prometheus refuses `{q}`: {err}",
                    d.file
                )),
                Ok(r) if !r.is_empty() => {
                    if name == "instance" {
                        assert!(
                            r.iter().any(|s| s["metric"]["instance"] == instance),
                            "the instance variable does not offer {instance}: {r:?}"
                        );
                    }
                }
                Ok(_) => match waive_variable(name) {
                    Some(why) => {
                        e.waived.insert(format!("{} / variable {name} ({why})", d.file));
                    }
                    None => e.failures.push(format!(
                        "{} / variable {name}: `{q}` returns nothing",
                        d.file
                    )),
                },
            }
        }
    }
    e
}

// ---------------------------------------------------------------------------------------
// 2. The end-to-end proof.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_returns_data_from_the_real_prometheus() {
    let t_start = unix_now();
    let m = media();
    let receiver = OtlpReceiver::start().await;
    let fixture = repo("tests/fixtures/musetalk");
    // Realtime: one persistent fixture worker that crashes on its first infer (a failed
    // realtime job and a worker restart), then serves.
    let worker_state = tempfile::tempdir().unwrap();
    let nvml = FakeNvml::new(&H100.replace("{procs}", FIXTURE_PROCS));
    let svc = nvml.apply(ServiceBuilder::new())
        .args(["--backend", "musetalk", "--musetalk-python", "python3"])
        .arg("--musetalk-dir")
        .arg(&fixture)
        .arg("--realtime")
        .arg("--worker-command")
        .arg(format!(
            "python3 -u {}",
            repo("tests/fixtures/worker/fixture_worker.py").display()
        ))
        .arg("--pipeline-env")
        // The MuseTalk fixture sleeps per UNet batch (1 s over the job's batches), as a model
        // does: its per-batch tqdm steps (stderr) then reach the parser after the "Starting
        // inference" marker (stdout) they belong to, even on a loaded machine where the two
        // pipes' readers run tens of ms apart.
        .arg(format!(
            "PYTHONDONTWRITEBYTECODE=1,FIXTURE_WORKER_MODE=crash_once,FIXTURE_WORKER_STATE_DIR={},MUSETALK_FIXTURE_MODE=slow,MUSETALK_FIXTURE_SLEEP=1",
            worker_state.path().display()
        ))
        // One run slot and one queue place: two held uploads fill the service.
        .args([
            "--max-concurrent-jobs",
            "1",
            "--queue-size",
            "1",
            "--sample-interval",
            "200ms",
        ])
        .args(["--otlp-endpoint", &receiver.grpc_endpoint()])
        .start()
        .await;
    svc.wait_ready().await;
    let (prom, instance) = RepoPrometheus::scraping(&svc).await;

    // Jobs one after another: succeeded, failed, succeeded, failed, succeeded. Waiting for
    // Prometheus to see each one puts a scrape between them, so every counter and bucket
    // has an increase inside the rate window (a series' first sample is no increase).
    let plan = [
        (&m.video, StatusCode::OK),
        (&m.tiny_video, StatusCode::INTERNAL_SERVER_ERROR),
        (&m.video, StatusCode::OK),
        (&m.tiny_video, StatusCode::INTERNAL_SERVER_ERROR),
        (&m.video, StatusCode::OK),
    ];
    let mut trace_ids = BTreeSet::new();
    for (n, (video, want)) in plan.iter().enumerate() {
        let (status, body) = submit(&svc, video, &m.audio).await;
        assert_eq!(status, *want, "{body}; logs:\n{}", svc.logs());
        if *want != StatusCode::OK {
            assert_eq!(body["error"], "job_failed", "{body}");
        }
        trace_ids.insert(body["trace_id"].as_str().unwrap().to_string());
        prom.wait_value("sum(musetalk_jobs_total)", Duration::from_secs(20), |v| {
            v == (n + 1) as f64
        })
        .await;
    }

    // Saturation: two held uploads take the run slot's and the queue's places; two more
    // requests get 429, a scrape apart so the rejection counter increases in the window.
    let held = [hold_upload(&svc), hold_upload(&svc)];
    prom.wait_value("sum(musetalk_jobs_queued)", Duration::from_secs(20), |v| {
        v == 2.0
    })
    .await;
    let rejected = r#"sum(musetalk_jobs_rejected_total{reason="queue_full"})"#;
    for n in 1..=2 {
        let (status, body) = submit(&svc, &m.video, &m.audio).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"], "queue_full", "{body}");
        prom.wait_value(rejected, Duration::from_secs(20), |v| v == n as f64)
            .await;
    }
    let running: Vec<_> = held.into_iter().map(HeldUpload::release).collect();
    for r in running {
        let r = r
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("held upload: {e}; logs:\n{}", svc.logs()));
        let status = r.status();
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        trace_ids.insert(body["trace_id"].as_str().unwrap().to_string());
    }
    prom.wait_value("sum(musetalk_jobs_total)", Duration::from_secs(20), |v| {
        v == 7.0
    })
    .await;
    prom.wait_value(
        r#"sum(musetalk_queue_wait_seconds_count{mode="simple"})"#,
        Duration::from_secs(20),
        |v| v >= 7.0,
    )
    .await;

    // Realtime mode: prepare an avatar, then speak: the first infer crashes the worker
    // (failed job, restart), the next two succeed. A scrape between each, as above.
    let realtime_jobs = r#"sum(musetalk_jobs_total{mode="realtime"})"#;
    let (status, body) = prepare_avatar(&svc, "dash").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    trace_ids.insert(body["trace_id"].as_str().unwrap().to_string());
    prom.wait_value(realtime_jobs, Duration::from_secs(60), |v| v == 1.0)
        .await;
    for (n, want) in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::OK,
        StatusCode::OK,
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = speak(&svc, "dash").await;
        assert_eq!(status, want, "{body}; logs:\n{}", svc.logs());
        if let Some(t) = body["trace_id"].as_str() {
            trace_ids.insert(t.to_string());
        }
        prom.wait_value(realtime_jobs, Duration::from_secs(20), |v| {
            v == (n + 2) as f64
        })
        .await;
        if want != StatusCode::OK {
            wait_worker_back(&svc).await;
        }
    }
    prom.wait_value(
        r#"sum(musetalk_worker_restarts_total)"#,
        Duration::from_secs(20),
        |v| v >= 1.0,
    )
    .await;

    // The GPU source read the fake NVML.
    assert_eq!(
        prom.value(r#"max(musetalk_collector_up{source="gpu"})"#).await,
        Some(1.0),
        "the GPU source did not load the fake NVML; logs:\n{}",
        svc.logs()
    );

    let metrics_text = svc.metrics_text().await;
    let exposed = exposed_names(&metrics_text);
    let labels = exposed_labels(&metrics_text);
    let documented = documented_names();

    // ---- Every metric name of the dashboards and rules exists on /metrics.
    let ds = dashboards();
    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for d in &ds {
        for p in panels(d) {
            for t in &p.targets {
                for s in selectors(&t.expr) {
                    used.entry(s.metric.clone())
                        .or_insert_with(|| format!("{} / {}", d.file, p.title));
                    // Families that carry `mode` are filtered by the mode variable.
                    if labels.get(&s.metric).is_some_and(|l| l.contains("mode")) {
                        assert!(
                            has_matcher(&s, "mode", "=~", "$mode"),
                            "{} / {}: `{}` has a mode label but no mode=~\"$mode\": `{}`",
                            d.file,
                            p.title,
                            s.metric,
                            t.expr
                        );
                    }
                    // Every matcher names a label the series really has.
                    if let Some(have) = labels.get(&s.metric) {
                        for (l, _, _) in &s.matchers {
                            assert!(
                                l == "instance" || l == "job" || have.contains(l),
                                "{} / {}: `{}` has no label `{l}` on /metrics (it has {have:?})",
                                d.file,
                                p.title,
                                s.metric
                            );
                        }
                    }
                }
            }
        }
        for v in variables(d) {
            if let Some(q) = v["definition"].as_str() {
                for s in selectors(
                    q.trim_start_matches("label_values(")
                        .trim_end_matches(')')
                        .rsplit_once(',')
                        .unwrap()
                        .0,
                ) {
                    used.entry(s.metric)
                        .or_insert_with(|| format!("{} / variable {}", d.file, v["name"]));
                }
            }
        }
    }
    for (name, expr) in alert_rules() {
        for s in selectors(&expr) {
            used.entry(s.metric)
                .or_insert_with(|| format!("alert {name}"));
        }
    }
    // ... and is in README.md's metrics reference, GPU families included.
    for (metric, at) in &used {
        assert!(
            SYNTHETIC_SERIES.contains(&metric.as_str()) || documented.contains(metric) || documented.contains(base_name(metric)),
            "{at} uses `{metric}`, which README.md's metrics reference does not list"
        );
    }
    for (metric, at) in &used {
        if exposed.contains(metric) || SYNTHETIC_SERIES.contains(&metric.as_str()) {
            continue;
        }
        panic!(
            "{at} uses `{metric}`, which is not on /metrics after real jobs:\n{}",
            exposed.iter().cloned().collect::<Vec<_>>().join("\n")
        );
    }

    // ---- Every panel query returns data (variables substituted two ways: one instance
    // and mode picked, and All).
    let picked = Vars {
        instance: grafana_regex_escape(&instance),
        mode: "simple".into(),
        gpu: ".*".into(),
    };
    let eval = evaluate_dashboards(&prom, &ds, &instance, &|_, _| None, &|_| None).await;
    eval.assert_clean(&prom);

    // ---- Exemplars: Prometheus stored the scraped exemplars, Grafana's exemplar query of
    // every exemplar-enabled panel finds some, and each trace id is a trace the OTLP
    // receiver got.
    // The label Grafana reads the trace id from (deploy/grafana/provisioning).
    let provisioning: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo(
            "deploy/grafana/provisioning/datasources/datasources.yml",
        ))
        .unwrap(),
    )
    .unwrap();
    let prom_ds = provisioning["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "prometheus")
        .expect("a prometheus datasource");
    let trace_label = prom_ds["jsonData"]["exemplarTraceIdDestinations"][0]["name"]
        .as_str()
        .expect("exemplarTraceIdDestinations[0].name")
        .to_string();
    let (start, end) = (
        format!("{}", t_start - 60.0),
        format!("{}", unix_now() + 60.0),
    );
    let mut exemplar_ids = BTreeSet::new();
    let mut queries: Vec<(String, String)> = vec![(
        "musetalk_step_duration_seconds_bucket".into(),
        "musetalk_step_duration_seconds_bucket".into(),
    )];
    for d in &ds {
        for p in panels(d) {
            for t in p.targets.iter().filter(|t| t.exemplar) {
                queries.push((
                    format!("{} / {}", d.file, p.title),
                    substitute(&t.expr, &picked),
                ));
            }
        }
    }
    for (what, q) in &queries {
        let v = prom
            .get(
                "/api/v1/query_exemplars",
                &[("query", q.as_str()), ("start", &start), ("end", &end)],
            )
            .await;
        assert_eq!(v["status"], "success", "{what}: query_exemplars `{q}`: {v}");
        let ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|series| series["exemplars"].as_array().cloned().unwrap_or_default())
            .map(|e| e["labels"][trace_label.as_str()].as_str().map(str::to_string).unwrap_or_else(|| panic!("{what}: exemplar without the `{trace_label}` label Grafana links by: {e}")))
            .collect();
        assert!(
            !ids.is_empty(),
            "{what}: Prometheus has no exemplar for `{q}` (is --enable-feature=exemplar-storage on, and the scrape OpenMetrics?): {v}"
        );
        exemplar_ids.extend(ids);
    }
    assert!(
        exemplar_ids.iter().all(|id| trace_ids.contains(id)),
        "exemplar trace ids {exemplar_ids:?} are not all jobs' trace ids {trace_ids:?}"
    );
    let want = exemplar_ids.clone();
    receiver
        .wait_for(Duration::from_secs(15), |spans| {
            want.iter()
                .all(|id| spans.iter().any(|s| &s.trace_id == id))
        })
        .await;

    // ---- The alert rules run against the real series: all healthy, the expected ones
    // pending (2 of 7 simple jobs failed; 2 requests got 429), the GPU source alert quiet on a
    // machine without a GPU.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rules = prom.get("/api/v1/rules", &[]).await;
        let mut names = BTreeSet::new();
        let mut unhealthy = Vec::new();
        for g in rules["data"]["groups"].as_array().unwrap() {
            for r in g["rules"].as_array().unwrap() {
                names.insert(r["name"].as_str().unwrap().to_string());
                if r["health"] != "ok" && r["health"] != "unknown" {
                    unhealthy.push(format!("{}: {} {}", r["name"], r["health"], r["lastError"]));
                }
            }
        }
        assert!(
            unhealthy.is_empty(),
            "rules failing on real series: {unhealthy:?}"
        );
        let expected: BTreeSet<String> = alert_rules().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names, expected,
            "Prometheus did not load deploy/prometheus/alerts.yml through prometheus.yml"
        );
        let alerts = prom.get("/api/v1/alerts", &[]).await;
        let active: BTreeMap<String, String> = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_string(),
                    a["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            !active.contains_key("MuseTalkCollectorSourceDown"),
            "the collector alert must stay quiet here: {active:?}"
        );
        assert!(!active.contains_key("MuseTalkSidecarDown"), "{active:?}");
        if active.contains_key("MuseTalkJobErrorRatioHigh")
            && active.contains_key("MuseTalkQueueSaturated")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MuseTalkJobErrorRatioHigh and MuseTalkQueueSaturated should be pending after 2 failed jobs and 2 rejections: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Zero reads as zero: a service on the default backend that has run only successful jobs
/// (simple and realtime, no worker configured) gives every panel a finite value — the
/// error ratio, the 429 rate, the exits by code read 0 or their real figure, never "No
/// data" — except the GPU panels where there is no GPU and the worker panels, there being
/// no worker. The series of known label sets exist from start-up, before any job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_service_reads_zero_where_nothing_went_wrong() {
    let m = media();
    let nvml = FakeNvml::new(&H100.replace("{procs}", ""));
    let svc = nvml.apply(ServiceBuilder::new())
        .args(["--sample-interval", "200ms"])
        .start()
        .await;
    svc.wait_ready().await;

    // Before any job: the zero series are there.
    let fresh = svc.metrics_text().await;
    for mode in ["simple", "realtime"] {
        for outcome in ["succeeded", "failed", "cancelled", "timed_out"] {
            let series = format!(
                r#"musetalk_jobs_total{{mode="{mode}",backend="preview",outcome="{outcome}"}} 0"#
            );
            assert!(fresh.contains(&series), "no `{series}` at start-up:\n{fresh}");
        }
        for reason in ["queue_full", "draining"] {
            let series = format!(r#"musetalk_jobs_rejected_total{{mode="{mode}",reason="{reason}"}} 0"#);
            assert!(fresh.contains(&series), "no `{series}` at start-up:\n{fresh}");
        }
    }

    let (prom, instance) = RepoPrometheus::scraping(&svc).await;
    // Successful jobs only, a scrape apart (so every counter increases inside the window):
    // two simple jobs, an avatar preparation, two speaks.
    let finished = |n: usize| {
        let prom = &prom;
        async move {
            prom.wait_value("sum(musetalk_jobs_total)", Duration::from_secs(30), |v| v == n as f64)
                .await
        }
    };
    for n in 1..=2 {
        let (status, body) = submit(&svc, &m.video, &m.audio).await;
        assert_eq!(status, StatusCode::OK, "{body}; logs:\n{}", svc.logs());
        finished(n).await;
    }
    let (status, body) = prepare_avatar(&svc, "healthy").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    finished(3).await;
    for n in 4..=5 {
        let (status, body) = speak(&svc, "healthy").await;
        assert_eq!(status, StatusCode::OK, "{body}; logs:\n{}", svc.logs());
        finished(n).await;
    }
    prom.wait_value(
        r#"sum(musetalk_jobs_total{outcome="succeeded"})"#,
        Duration::from_secs(5),
        |v| v == 5.0,
    )
    .await;

    // A panel about workers: every family it reads is `musetalk_worker_*`.
    let about_workers = |p: &Panel| {
        p.targets.iter().all(|t| {
            selectors(&t.expr)
                .iter()
                .all(|s| s.metric.starts_with("musetalk_worker_"))
        })
    };
    // A panel about model batches: only workers running a model report them.
    let about_batches = |p: &Panel| p.targets.iter().all(|t| selectors(&t.expr).iter().all(|s| s.metric.starts_with("musetalk_batch_duration")));
    let eval = evaluate_dashboards(
        &prom,
        &dashboards(),
        &instance,
        &|_, p| {
            if about_workers(p) {
                Some("no realtime worker configured".into())
            } else if about_batches(p) {
                Some("the preview engine runs no model batches".into())
            } else {
                None
            }
        },
        &|_| None,
    )
    .await;
    eval.assert_clean(&prom);
    let worker_waivers = eval.waived.iter().filter(|w| w.contains("no realtime worker")).count();
    assert!(worker_waivers <= 2, "only the two worker panels may be waived for the missing worker: {:#?}", eval.waived);
    let batch_waivers = eval.waived.iter().filter(|w| w.contains("no model batches")).count();
    assert!(batch_waivers <= 1, "only the batch panel may be waived for the preview engine: {:#?}", eval.waived);
}

// ---------------------------------------------------------------------------------------
// 3. Past one pod: three replicas behind the proxy, one Prometheus scraping all three.

/// Whether `expr` keeps the `instance` label on purpose (`by (…, instance, …)`).
fn groups_by_instance(expr: &str) -> bool {
    expr.match_indices("by (").any(|(i, _)| expr[i + 4..].split(')').next().is_some_and(|g| g.split(',').any(|l| l.trim() == "instance")))
}

/// The cluster's totals on every dashboard: with the `instance` variable on All (Grafana
/// sends `(a|b|c)`), a panel gives one series per group, not one per replica, unless it
/// is a per-replica panel on purpose (grouped by instance, its legend naming it); the
/// job counts and the success ratio are the cluster's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_give_cluster_totals_over_three_replicas() {
    use common::cluster::{Cluster, owner};
    let c = Cluster::up(&["--queue-size".into(), "16".into()]).await;
    let addrs: Vec<SocketAddr> = c.addrs.values().copied().collect();
    let prom = RepoPrometheus::start(&addrs).await;
    // Every replica scraped once before the jobs: rate() then sees them counted.
    prom.wait_value("count(up == 1)", Duration::from_secs(30), |v| v == 3.0).await;
    let mut owners = BTreeSet::new();
    let mut jobs = 0;
    while jobs < 9 || owners.len() < 3 {
        let id = c.submit().await;
        assert_eq!(c.wait_job(&id).await["state"], "succeeded");
        owners.insert(owner(&id));
        jobs += 1;
    }
    let instances: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let all = format!("({})", instances.iter().map(|i| grafana_regex_escape(i)).collect::<Vec<_>>().join("|"));
    let total = format!(r#"sum(musetalk_jobs_total{{instance=~"{all}", outcome="succeeded"}})"#);
    prom.wait_value(&total, Duration::from_secs(30), |v| v == jobs as f64).await;
    let offered: BTreeSet<String> = prom.query("group by (instance) (musetalk_sidecar_build_info)").await.iter().map(|s| s["metric"]["instance"].as_str().unwrap().to_string()).collect();
    assert_eq!(offered, instances.iter().cloned().collect(), "the instance variable offers every replica");

    let vars = Vars { instance: all.clone(), mode: ".*".into(), gpu: ".*".into() };
    let mut per_replica = Vec::new();
    let (mut checked, mut with_data) = (0, 0);
    for d in dashboards() {
        for p in panels(&d) {
            for t in &p.targets {
                let q = substitute(&t.expr, &vars);
                let r = prom.query(&q).await;
                checked += 1;
                with_data += usize::from(has_finite(&r));
                // A per-replica panel says so in its legend (`{{instance}}`).
                let legend = p.json["targets"].as_array().into_iter().flatten().find(|x| x["refId"] == t.ref_id.as_str()).and_then(|x| x["legendFormat"].as_str()).unwrap_or("");
                let per_instance = groups_by_instance(&t.expr) || legend.contains("{{instance}}");
                if !per_instance && r.iter().any(|s| s["metric"].get("instance").is_some()) {
                    per_replica.push(format!("{} / {}: `{}` gives a series per replica", d.file, p.title, t.expr));
                }
            }
        }
    }
    assert!(checked > 50 && with_data * 2 > checked, "{checked} queries, {with_data} with data: the rule above is only as good as the data it sees");
    assert!(per_replica.is_empty(), "panels that do not sum over the replicas:\n{}", per_replica.join("\n"));
    // The cluster's figures, through the panels' own queries.
    let overview = dashboards().into_iter().find(|d| d.file.contains("overview")).expect("the overview dashboard");
    let panel = |title: &str| panels(&overview).into_iter().find(|p| p.title == title).unwrap_or_else(|| panic!("no panel {title}"));
    let ratio = substitute(&panel("Success ratio (dashboard range)").targets[0].expr, &vars);
    // Once the scrapes after the last job are in (rate needs two of each replica's).
    prom.wait_value(&ratio, Duration::from_secs(30), |v| v == 1.0).await;
    let by_outcome = prom.query(&substitute(&panel("Jobs finished by outcome").targets[0].expr, &vars)).await;
    let succeeded: Vec<&Value> = by_outcome.iter().filter(|s| s["metric"]["outcome"] == "succeeded").collect();
    assert_eq!(succeeded.len(), 1, "one cluster series: {by_outcome:?}");
}
