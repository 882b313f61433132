//! The built-in status page in a REAL browser (Debian's `chromium` driven through
//! `chromium-driver` over WebDriver) against the REAL binary running `preview` jobs:
//! the jobs table with stacked step bars, live progress of a running job, the job
//! detail (report, trace id and links), sparklines that move, keyboard navigation,
//! narrow screens, no console error and no request to another host. Screenshots land in
//! `target/ui-screenshot*.png` (not committed).
//!
//! Also without a browser: every page and fragment is well-formed (parsed as XML), the
//! static page carries the data without JavaScript, links leave only to configured
//! hosts, and the page sits behind the API's bearer auth when auth is on.
//!
//! Needs `chromium`, `chromedriver`, `ffmpeg`, `ffprobe` (`scripts/ensure-deps.sh
//! chromium ffmpeg`); `CHROMIUM` and `CHROMEDRIVER` override where they are found.

mod common;


use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::otlp::OtlpReceiver;
use common::service::{Service, ServiceBuilder};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

const TRACE_UI: &str = "http://jaeger.invalid:16686/trace/{trace_id}";
const GRAFANA: &str = "http://grafana.invalid:3000/d/musetalk-overview";
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Media, made with real ffmpeg once per test binary.

struct Media {
    video: PathBuf,
    audio: PathBuf,
    /// For a job that runs long enough to be watched: 640×360 video, 3 min audio.
    big_video: PathBuf,
    long_audio: PathBuf,
}

fn media() -> &'static Media {
    static MEDIA: OnceLock<Media> = OnceLock::new();
    MEDIA.get_or_init(|| {
        let shared = common::media::media();
        Media {
            video: shared.video.clone(),
            audio: shared.audio.clone(),
            big_video: common::media::video(640, 360, 25, 2),
            long_audio: common::media::sine(220, 180, 16_000),
        }
    })
}

fn form(video: &Path, audio: &Path) -> Form {
    let part = |p: &Path| Part::bytes(std::fs::read(p).unwrap()).file_name(p.file_name().unwrap().to_string_lossy().into_owned());
    Form::new().part("video", part(video)).part("audio", part(audio))
}

/// Runs one job synchronously; returns `(job_id, trace_id)`.
async fn run_job(svc: &Service) -> (String, String) {
    let m = media();
    let r = svc.client().post(svc.url("/v1/inference")).multipart(form(&m.video, &m.audio)).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}\n{}", svc.logs());
    assert_eq!(v["state"], "succeeded", "{v}");
    (v["job_id"].as_str().unwrap().to_string(), v["trace_id"].as_str().unwrap().to_string())
}

// ---------------------------------------------------------------------------------------
// Static checks (no browser).

/// Parses a page or fragment as XML (the page is XHTML-compatible): a well-formedness check.
fn parse_xml(what: &str, html: &str) -> roxmltree::Document<'static> {
    let text: &'static str = Box::leak(html.to_string().into_boxed_str());
    roxmltree::Document::parse_with_options(text, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).unwrap_or_else(|e| panic!("{what} is not well-formed: {e}\n{html}"))
}

/// Every absolute URL in `html` is the service itself, one of the configured links, or
/// the configured OTLP endpoint (named in the health table as text, never requested by the page).
fn assert_no_foreign_urls(what: &str, html: &str, origin: &str, otlp: &str) {
    let allowed = [origin, TRACE_UI.split("{trace_id}").next().unwrap(), GRAFANA, otlp];
    for scheme in ["http://", "https://"] {
        for (i, _) in html.match_indices(scheme) {
            let url: String = html[i..].chars().take_while(|c| !c.is_whitespace() && !"\"'<>`".contains(*c)).collect();
            assert!(allowed.iter().any(|a| url.starts_with(a)), "{what} refers to another host: {url}");
        }
    }
}

async fn get_text(svc: &Service, path: &str, expect: StatusCode) -> (String, reqwest::header::HeaderMap) {
    let r = svc.get(path).await;
    assert_eq!(r.status(), expect, "GET {path}");
    let h = r.headers().clone();
    (r.text().await.unwrap(), h)
}

// ---------------------------------------------------------------------------------------
// The browser: chromedriver in its own process group (killed with its Chromium on drop).

struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

fn find_tool(env: &str, names: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    for n in names {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).chain([PathBuf::from("/usr/bin")]) {
            let p = dir.join(n);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{} not found (set {env}); install it: scripts/ensure-deps.sh chromium (Debian packages chromium, chromium-driver), or run scripts/test.sh", names[0])
}


impl Browser {
    async fn start() -> Browser {
        let chromium = find_tool("CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
        let chromedriver = find_tool("CHROMEDRIVER", &["chromedriver"]);
        let profile = tempfile::Builder::new().prefix("musetalk-ui-chromium-").tempdir().unwrap();
        let log = profile.path().join("chromedriver.log");
        let port = common::free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromedriver.display()));
        let mut b = Browser { client: None, driver, log, _profile: profile };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on {port}: {}", b.driver_log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let user_data = b._profile.path().join("profile");
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            "--disable-default-apps".into(),
            "--no-proxy-server".into(),
            "--window-size=1280,2000".into(),
            format!("--user-data-dir={}", user_data.display()),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps = caps.as_object().unwrap().clone().into_iter().collect();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("WebDriver session: {e}\n{}", b.driver_log()));
        b.client = Some(client);
        b
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.log).map(|l| l.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    async fn js(&self, script: &str) -> Value {
        self.c().execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` (a function body returning a value) until `pred` accepts it.
    async fn wait_js(&self, what: &str, script: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}; last {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The browser's console log since the last call (chromedriver's `se/log`).
    async fn console_log(&self) -> Vec<Value> {
        match self.c().issue_cmd(BrowserLog).await {
            Ok(Value::Array(v)) => v,
            other => panic!("reading the browser log: {other:?}"),
        }
    }

    /// Page-side checks after any page: no error recorded by the page's own hook,
    /// every loaded resource from the service's origin.
    async fn check_page(&self, origin: &str) {
        let errors = self.js("const e = document.getElementById('ui-errors'); return [e.getAttribute('data-count'), e.textContent];").await;
        assert_eq!(errors[0], "0", "page errors: {errors}");
        let urls = self.js("return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name));").await;
        let urls = urls.as_array().unwrap();
        assert!(urls.len() >= 3, "the page, its CSS and its JS at least: {urls:?}");
        for u in urls {
            assert!(u.as_str().unwrap().starts_with(origin), "request to another origin: {u}");
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.c().screenshot().await.unwrap();
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf();
        let path = target.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }

    async fn press(&self, key: Key) {
        self.c().active_element().await.unwrap().send_keys(&key.to_string()).await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium it started.
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// chromedriver's vendor command for the browser (console) log.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }
    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_string()))
    }
}

fn js_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_in_a_real_browser() {
    let receiver = OtlpReceiver::start().await;
    let svc = ServiceBuilder::new()
        .args(["--sample-interval", "200ms", "--trace-ui-url", TRACE_UI, "--otlp-endpoint", &receiver.grpc_endpoint()])
        .env("MUSETALK_SIDECAR_GRAFANA_URL", GRAFANA)
        .start()
        .await;
    svc.wait_ready().await;
    let origin = svc.url("/");
    let otlp = receiver.grpc_endpoint();
    let (id1, trace1) = run_job(&svc).await;
    let (id2, _trace2) = run_job(&svc).await;

    // --- Without a browser: the served page already holds everything static.
    let (html, headers) = get_text(&svc, "/", StatusCode::OK).await;
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(headers["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    let doc = parse_xml("GET /", &html);
    assert_no_foreign_urls("GET /", &html, &origin, &otlp);
    for id in [&id1, &id2] {
        let row = doc.descendants().find(|n| n.attribute("data-job-id") == Some(id.as_str())).unwrap_or_else(|| panic!("no row for {id}:\n{html}"));
        let names: Vec<_> = row.descendants().filter_map(|n| n.attribute("data-name")).collect();
        for step in ["file_processing", "config_creation", "subprocess_execution", "output_discovery", "response_preparation", "video_encoding"] {
            assert!(names.contains(&step), "{id}: no {step} segment in {names:?}");
        }
    }
    assert!(html.contains("data-series=\"cpu\""));
    let (detail, _) = get_text(&svc, &format!("/ui/jobs/{id1}"), StatusCode::OK).await;
    parse_xml("the job page", &detail);
    assert_no_foreign_urls("the job page", &detail, &origin, &otlp);
    for path in ["/ui/partials/jobs", "/ui/partials/health", "/ui/partials/resources", &format!("/ui/partials/jobs/{id2}")] {
        let (frag, _) = get_text(&svc, path, StatusCode::OK).await;
        parse_xml(path, &frag);
        assert_no_foreign_urls(path, &frag, &origin, &otlp);
    }
    let (missing, _) = get_text(&svc, "/ui/jobs/0123456789abcdef", StatusCode::NOT_FOUND).await;
    parse_xml("the not-found page", &missing);
    let (res, _) = get_text(&svc, "/ui/api/resources?seconds=300", StatusCode::OK).await;
    let res: Value = serde_json::from_str(&res).unwrap();
    let cpu = res["series"].as_array().unwrap().iter().find(|s| s["id"] == "cpu").expect("cpu series");
    assert!(!cpu["points"].as_str().unwrap().is_empty(), "{cpu}");
    let gpu_present = res["gpus"].as_u64().unwrap() > 0;
    if gpu_present {
        assert!(html.contains("data-series=\"gpu0_util\""), "a GPU is sampled: its sparklines are shown");
    } else {
        assert!(html.contains("No GPU data") && html.contains("--gpus all"), "a missing GPU is said plainly, with the fix");
    }
    for asset in ["app.js", "style.css", "favicon.svg"] {
        let (body, h) = get_text(&svc, &format!("/ui/static/{asset}"), StatusCode::OK).await;
        assert!(!body.is_empty() && h.contains_key("content-type"));
    }

    // The job's trace is exported; from here on only the browser's requests reach the receiver.
    receiver.wait_for(Duration::from_secs(15), |s| s.iter().any(|s| s.trace_id == trace1 && s.name == "musetalk.job")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    receiver.clear();

    // --- The browser.
    let b = Browser::start().await;
    b.c().goto(&origin).await.unwrap();
    b.wait_js("the page's first live update", "return document.getElementById('live-status').textContent;", |v| v.as_str().is_some_and(|s| s.starts_with("Live: updated"))).await;

    // The jobs table lists both jobs, each with its stacked bar of steps (and its stage).
    for id in [&id1, &id2] {
        let v = b
            .js(&format!(
                "const r = document.querySelector('tr[data-job-id=' + JSON.stringify({}) + ']');
                 if (!r) return null;
                 return {{ state: r.getAttribute('data-state'), segs: Array.from(r.querySelectorAll('svg.bar rect.seg')).map(x => [x.getAttribute('data-name'), parseFloat(x.getAttribute('width'))]), text: r.innerText }};",
                js_str(id)
            ))
            .await;
        assert_eq!(v["state"], "succeeded", "{id}: {v}");
        let segs = v["segs"].as_array().unwrap();
        assert!(segs.len() >= 6, "{id}: steps and a stage: {v}");
        let width: f64 = segs.iter().filter(|s| s[0] != "video_encoding").map(|s| s[1].as_f64().unwrap()).sum();
        assert!(width > 90.0 && width <= 100.01, "{id}: the steps fill the bar ({width}): {v}");
        assert!(v["text"].as_str().unwrap().contains("Bottleneck:"), "{v}");
    }

    // The sparklines move between two reads (the collector samples every 200 ms, the page polls every 2 s).
    let points = "return document.querySelector('svg[data-series=\"cpu\"] polyline').getAttribute('points');";
    let first = b.js(points).await;
    assert!(first.as_str().is_some_and(|p| p.split(' ').count() > 3), "{first}");
    tokio::time::sleep(Duration::from_millis(2600)).await;
    b.wait_js("the CPU sparkline to change", points, |v| v != &first).await;
    let memory = "return document.querySelector('svg[data-series=\"memory\"] polyline').getAttribute('points');";
    let m1 = b.js(memory).await;
    b.wait_js("the memory sparkline to change", memory, |v| v != &m1).await;

    // A running job appears and shows its progress without a reload; cancelled, it says so.
    let m = media();
    let r = svc.client().post(svc.url("/v1/inference")).header("Prefer", "respond-async").multipart(form(&m.big_video, &m.long_audio)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id3 = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();
    let row3 = format!("document.querySelector('tr[data-job-id=' + JSON.stringify({}) + ']')", js_str(&id3));
    let live = b
        .wait_js(
            "the running job with its progress",
            &format!("const r = {row3}; if (!r) return null; const p = r.querySelector('progress'); return {{ state: r.getAttribute('data-state'), value: p && p.value, max: p && p.max, text: r.innerText }};"),
            |v| v["state"] == "running" && v["value"].as_f64().is_some_and(|x| x > 0.0),
        )
        .await;
    assert!(live["text"].as_str().unwrap().contains("video_encoding"), "{live}");
    assert!(live["max"].as_f64().unwrap() >= 4000.0, "{live}");
    let r = svc.client().delete(svc.url(&format!("/v1/jobs/{id3}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    b.wait_js("the cancelled job", &format!("const r = {row3}; return r && r.getAttribute('data-state');"), |v| v == "cancelled").await;
    b.check_page(&origin).await;
    let overview_png = b.screenshot("ui-screenshot.png").await;

    // Keyboard: the first Tab reaches the skip link; Tab reaches the first job's link; Enter opens it.
    b.c().goto(&origin).await.unwrap();
    b.press(Key::Tab).await;
    let first_focus = b.js("return document.activeElement.className;").await;
    assert_eq!(first_focus, "skip", "the first Tab stop is the skip link");
    let target = format!("/ui/jobs/{id1}");
    let mut reached = false;
    for _ in 0..80 {
        b.press(Key::Tab).await;
        if b.js("return document.activeElement.getAttribute('href');").await == target.as_str() {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the link to {target}");
    b.press(Key::Enter).await;
    b.wait_js("the job page", "return location.pathname;", |v| v == target.as_str()).await;

    // The job page: the full report (as the text report), its timings, the trace id and links.
    let text_report = svc.client().get(svc.url(&format!("/v1/jobs/{id1}/report"))).header("Accept", "text/plain").send().await.unwrap().text().await.unwrap();
    let page = b
        .js(
            "return {
               report: document.querySelector('pre.report').textContent,
               trace: document.getElementById('trace-id').textContent,
               links: Array.from(document.querySelectorAll('a')).map(a => [a.textContent, a.getAttribute('href')]),
               timings: Array.from(document.querySelectorAll('tr[data-timing]')).map(r => r.getAttribute('data-timing')),
               resources: document.querySelectorAll('table.resources tbody tr').length,
               refresh: document.getElementById('job').getAttribute('data-refresh'),
             };",
        )
        .await;
    assert_eq!(page["report"].as_str().unwrap(), text_report, "the page shows the text report");
    assert!(text_report.contains(&format!("MuseTalk job {id1}")));
    assert_eq!(page["trace"], trace1.as_str());
    let links = page["links"].as_array().unwrap();
    let href = |text: &str| links.iter().find(|l| l[0].as_str().is_some_and(|t| t.contains(text))).map(|l| l[1].as_str().unwrap().to_string());
    assert_eq!(href("Open the trace").as_deref(), Some(TRACE_UI.replace("{trace_id}", &trace1).as_str()), "{links:?}");
    let grafana = href("dashboard for this job").unwrap_or_else(|| panic!("no Grafana link: {links:?}"));
    assert!(grafana.starts_with(&format!("{GRAFANA}?from=")) && grafana.contains("&to="), "{grafana}");
    assert_eq!(href("Output video").as_deref(), Some(format!("/v1/jobs/{id1}/output").as_str()));
    let timings: Vec<&str> = page["timings"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for t in ["file_processing", "config_creation", "subprocess_execution", "output_discovery", "response_preparation", "video_encoding"] {
        assert!(timings.contains(&t), "no {t} timing: {timings:?}");
    }
    assert!(page["resources"].as_u64().unwrap() >= 2, "the resource window: {page}");
    assert_eq!(page["refresh"], "0", "a finished job's page does not poll");
    b.check_page(&origin).await;
    let job_png = b.screenshot("ui-screenshot-job.png").await;

    // Narrow screens: nothing wider than the viewport.
    b.c().set_window_size(400, 1400).await.unwrap();
    b.c().goto(&origin).await.unwrap();
    b.wait_js("the narrow page", "return document.documentElement.scrollWidth <= window.innerWidth + 1 ? window.innerWidth : false;", |v| v.as_u64().is_some_and(|w| w <= 420)).await;
    b.check_page(&origin).await;
    let narrow_png = b.screenshot("ui-screenshot-narrow.png").await;

    // No console error anywhere along the way (Chromium's own log).
    let log = b.console_log().await;
    let severe: Vec<_> = log.iter().filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING").collect();
    assert!(severe.is_empty(), "browser console errors: {severe:#?}");

    // The page's polling is not traced (its requests carry an unsampled traceparent); the page loads are.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    let route = |s: &common::otlp::ReceivedSpan| s.attr("http.route").and_then(|v| v.as_str()).map(String::from).unwrap_or_default();
    assert!(spans.iter().any(|s| route(s) == "/"), "page loads are traced: {:?}", spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    let polled: Vec<_> = spans.iter().filter(|s| route(s).starts_with("/ui/api/") || route(s).starts_with("/ui/partials/")).map(|s| s.name.clone()).collect();
    assert!(polled.is_empty(), "the page's polling made spans: {polled:?}");

    eprintln!("screenshots: {}, {}, {}", overview_png.display(), job_png.display(), narrow_png.display());
    let client = b.client.as_ref().unwrap().clone();
    client.close().await.ok();
    drop(b);
}

#[tokio::test]
async fn status_page_sits_behind_the_api_auth() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret\n").unwrap();
    let svc = Service::start(["--auth-token-file", tokens.to_str().unwrap()]).await;
    svc.wait_ready().await;
    for path in ["/", "/ui/jobs/x", "/ui/api/resources?seconds=60", "/ui/partials/jobs", "/ui/static/app.js"] {
        let r = svc.get(path).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} without a token");
        let r = svc.client().get(svc.url(path)).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} with a wrong token");
    }
    let r = svc.client().get(svc.url("/")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    parse_xml("GET / with auth", &html);
    assert!(html.contains("bearer tokens are required"), "the health table says auth is on");
    let r = svc.client().get(svc.url("/ui/api/resources?seconds=60")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Health stays open, as before.
    assert_eq!(svc.get("/healthz").await.status(), StatusCode::OK);
}
