//! Hostile and broken input, table-driven, against the REAL binary: every case gets a
//! 4xx JSON `{error, detail}` with a stable code, the service keeps serving, and nothing
//! is written outside the job directories (which are removed for refused requests).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::service::{Service, ServiceBuilder};
use reqwest::StatusCode;
use serde_json::Value;

struct Media {
    video: Vec<u8>,
    audio: Vec<u8>,
    silent_video: Vec<u8>,
}

fn media() -> &'static Media {
    static M: OnceLock<Media> = OnceLock::new();
    M.get_or_init(|| {
        let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
        let video = read(common::media::video(64, 64, 10, 1));
        Media { silent_video: video.clone(), video, audio: read(common::media::sine(440, 1, 8000)) }
    })
}

const B: &str = "XyZbOuNdArY";

/// One multipart part, raw: name and filename bytes go out exactly as given.
struct P {
    name: Vec<u8>,
    filename: Option<Vec<u8>>,
    body: Vec<u8>,
}

fn file(name: &str, filename: &str, body: &[u8]) -> P {
    P { name: name.into(), filename: Some(filename.into()), body: body.to_vec() }
}

fn text(name: &str, value: &[u8]) -> P {
    P { name: name.into(), filename: None, body: value.to_vec() }
}

fn encode(parts: &[P]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(format!("--{B}\r\nContent-Disposition: form-data; name=\"").as_bytes());
        out.extend_from_slice(&p.name);
        out.extend_from_slice(b"\"");
        if let Some(f) = &p.filename {
            out.extend_from_slice(b"; filename=\"");
            out.extend_from_slice(f);
            out.extend_from_slice(b"\"\r\nContent-Type: application/octet-stream");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&p.body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{B}--\r\n").as_bytes());
    out
}

fn good() -> Vec<P> {
    vec![file("video", "v.mp4", &media().video), file("audio", "a.wav", &media().audio)]
}

fn with(mut parts: Vec<P>, extra: P) -> Vec<P> {
    parts.push(extra);
    parts
}

enum Req {
    /// POST multipart parts to a path.
    Multipart(&'static str, Vec<P>),
    /// Any method, path, content type and body.
    Raw(&'static str, String, Option<&'static str>, Vec<u8>),
}

struct Case {
    name: &'static str,
    req: Req,
    status: u16,
    code: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

fn case(name: &'static str, req: Req, status: u16, code: &'static str) -> Case {
    Case { name, req, status, code, headers: vec![] }
}

fn cases() -> Vec<Case> {
    let m = media();
    let mp = |p: &'static str, parts| Req::Multipart(p, parts);
    let inf = "/v1/inference";
    let truncated = m.video[..m.video.len() / 3].to_vec();
    let mut corrupt = m.video.clone();
    for b in corrupt.iter_mut().skip(8).step_by(3) {
        *b ^= 0x5a;
    }
    let many_parts: Vec<P> = (0..500).map(|i| text(&format!("f{i}"), b"x")).collect();
    let mut c = vec![
        case("missing video part", mp(inf, vec![file("audio", "a.wav", &m.audio)]), 400, "missing_part"),
        case("missing audio part", mp(inf, vec![file("video", "v.mp4", &m.video)]), 400, "missing_part"),
        case("no parts at all", mp(inf, vec![]), 400, "missing_part"),
        case("duplicate video part", mp(inf, with(good(), file("video", "v2.mp4", &m.video))), 400, "duplicate_part"),
        case("duplicate audio part", mp(inf, with(good(), file("audio", "a2.wav", &m.audio))), 400, "duplicate_part"),
        case("duplicate avatar_id", mp(inf, with(with(good(), text("avatar_id", b"a")), text("avatar_id", b"b"))), 400, "duplicate_part"),
        case("empty video file", mp(inf, vec![file("video", "v.mp4", b""), file("audio", "a.wav", &m.audio)]), 400, "empty_file"),
        case("empty audio file", mp(inf, vec![file("video", "v.mp4", &m.video), file("audio", "a.wav", b"")]), 400, "empty_file"),
        case("truncated mp4", mp(inf, vec![file("video", "v.mp4", &truncated), file("audio", "a.wav", &m.audio)]), 400, "invalid_video"),
        case("corrupt mp4", mp(inf, vec![file("video", "v.mp4", &corrupt), file("audio", "a.wav", &m.audio)]), 400, "invalid_video"),
        case("video that is really text", mp(inf, vec![file("video", "v.mp4", b"this is not a video, just words\n"), file("audio", "a.wav", &m.audio)]), 400, "invalid_video"),
        case("audio with no audio stream", mp(inf, vec![file("video", "v.mp4", &m.video), file("audio", "a.mp4", &m.silent_video)]), 400, "invalid_audio"),
        case("audio that is really text", mp(inf, vec![file("video", "v.mp4", &m.video), file("audio", "a.wav", b"RIFF but not really")]), 400, "invalid_audio"),
        case("video part over the size limit", mp(inf, vec![file("video", "v.mp4", &vec![0u8; 300_000]), file("audio", "a.wav", &m.audio)]), 413, "file_too_large"),
        case("path traversal in avatar_id", mp(inf, with(good(), text("avatar_id", b"../../etc/passwd"))), 400, "invalid_avatar_id"),
        case("NUL byte in avatar_id", mp(inf, with(good(), text("avatar_id", b"ali\0ce"))), 400, "invalid_avatar_id"),
        case("YAML special characters in avatar_id", mp(inf, with(good(), text("avatar_id", b"a: {b: [c]}"))), 400, "invalid_avatar_id"),
        case("non-UTF-8 avatar_id", mp(inf, with(good(), text("avatar_id", b"\xff\xfe\xfd"))), 400, "invalid_utf8"),
        case("over-long avatar_id", mp(inf, with(good(), text("avatar_id", &[b'a'; 300]))), 400, "field_too_long"),
        case("path traversal in a file name (text content)", mp(inf, vec![file("video", "../../../../tmp/evil.mp4", b"words"), file("audio", "a.wav", &m.audio)]), 400, "invalid_video"),
        // Control characters in part headers are a malformed body for the multipart parser.
        case("NUL byte in a file name", mp(inf, vec![file("video", "v\0.mp4", b"words"), file("audio", "a.wav", &m.audio)]), 400, "invalid_multipart"),
        case("newline in a file name", mp(inf, vec![file("video", "x: {y}\n- z.mp4", b"words"), file("audio", "a.wav", &m.audio)]), 400, "invalid_multipart"),
        case("YAML special characters in a file name", mp(inf, vec![file("video", "x: {y} [z] &a *b !c.mp4", b"words"), file("audio", "a.wav", &m.audio)]), 400, "invalid_video"),
        case("negative batch_size", mp(inf, with(good(), text("batch_size", b"-1"))), 400, "invalid_batch_size"),
        case("zero batch_size", mp(inf, with(good(), text("batch_size", b"0"))), 400, "invalid_batch_size"),
        case("absurd batch_size", mp(inf, with(good(), text("batch_size", b"99999999999999999999"))), 400, "invalid_batch_size"),
        case("non-numeric batch_size", mp(inf, with(good(), text("batch_size", b"eight"))), 400, "invalid_batch_size"),
        case("absurd bbox_shift", mp(inf, with(good(), text("bbox_shift", b"1000000000"))), 400, "invalid_bbox_shift"),
        case("float bbox_shift", mp(inf, with(good(), text("bbox_shift", b"1.5"))), 400, "invalid_bbox_shift"),
        case("unknown part", mp(inf, with(good(), text("extra", b"1"))), 400, "unknown_part"),
        case("hundreds of unknown parts", mp(inf, many_parts), 400, "unknown_part"),
        case("wrong method on inference", Req::Raw("GET", inf.into(), None, vec![]), 405, "method_not_allowed"),
        case("wrong method on a job", Req::Raw("PUT", "/v1/jobs/abc".into(), None, vec![]), 405, "method_not_allowed"),
        case("JSON instead of multipart", Req::Raw("POST", inf.into(), Some("application/json"), b"{\"video\":\"v.mp4\"}".to_vec()), 415, "not_multipart"),
        case("multipart without a boundary", Req::Raw("POST", inf.into(), Some("multipart/form-data"), b"--x\r\n".to_vec()), 415, "not_multipart"),
        case("garbage multipart body", Req::Raw("POST", inf.into(), Some("multipart/form-data; boundary=XyZbOuNdArY"), b"--XyZbOuNdArY\r\nno headers here at all".to_vec()), 400, "invalid_multipart"),
        case("job id with traversal", Req::Raw("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd".into(), None, vec![]), 404, "job_not_found"),
        case("job id with a NUL byte", Req::Raw("GET", "/v1/jobs/abc%00def/report".into(), None, vec![]), 404, "job_not_found"),
        case("unknown route", Req::Raw("GET", "/v1/../../etc/passwd".into(), None, vec![]), 404, "route_not_found"),
        case("speak on an avatar id with traversal", Req::Multipart("/v1/avatars/..%2F..%2Fx/speak", vec![file("audio", "a.wav", &m.audio)]), 404, "avatar_not_found"),
        case("avatar without avatar_id", Req::Multipart("/v1/avatars", vec![file("video", "v.mp4", &m.video)]), 400, "missing_part"),
        case("avatar with a traversal id", Req::Multipart("/v1/avatars", vec![file("video", "v.mp4", &m.video), text("avatar_id", b"../x")]), 400, "invalid_avatar_id"),
        case("delete an avatar that does not exist", Req::Raw("DELETE", "/v1/avatars/nobody".into(), None, vec![]), 404, "avatar_not_found"),
    ];
    // A malformed traceparent is ignored as W3C Trace Context requires (a new trace
    // starts); with broken input the request still gets its input error.
    let mut tp = case("malformed traceparent on a broken request", mp(inf, vec![file("audio", "a.wav", &m.audio)]), 400, "missing_part");
    tp.headers.push(("traceparent", "00-zzzz-not-a-trace-01"));
    c.push(tp);
    c
}

fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

async fn send(svc: &Service, c: &Case) -> reqwest::Response {
    let client = svc.client();
    let mut req = match &c.req {
        Req::Multipart(path, parts) => {
            client.post(svc.url(path)).header("content-type", format!("multipart/form-data; boundary={B}")).body(encode(parts))
        }
        Req::Raw(method, path, ct, body) => {
            let mut r = client.request(method.parse().unwrap(), svc.url(path)).body(body.clone());
            if let Some(ct) = ct {
                r = r.header("content-type", *ct);
            }
            r
        }
    };
    for (k, v) in &c.headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_json_4xx_and_leaves_nothing_behind() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let svc = ServiceBuilder::new().data_dir(&data).args(["--max-upload-bytes", "200000"]).start().await;
    svc.wait_ready().await;
    let before: Vec<PathBuf> = tree(outer.path());
    let cases = cases();
    assert!(cases.len() >= 30, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let r = send(&svc, c).await;
        let status = r.status();
        let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = r.text().await.unwrap();
        let json: Option<Value> = serde_json::from_str(&body).ok();
        let ok = status.as_u16() == c.status
            && ct.starts_with("application/json")
            && json.as_ref().is_some_and(|j| j["error"] == c.code && j["detail"].as_str().is_some_and(|d| !d.is_empty()) && j.as_object().unwrap().len() == 2);
        if !ok {
            failures.push(format!("{}: expected {} {}, got {status} [{ct}] {body}", c.name, c.status, c.code));
        }
        // The cause, not only ffmpeg's generic verdict ("Invalid data found…").
        if c.name == "truncated mp4" && !body.contains("moov atom not found") {
            failures.push(format!("{}: the detail hides the cause: {body}", c.name));
        }
        // Every refusal leaves no job dir behind.
        let jobs: Vec<_> = std::fs::read_dir(data.join("jobs")).unwrap().flatten().collect();
        if !jobs.is_empty() {
            failures.push(format!("{}: left {} job dir(s)", c.name, jobs.len()));
            for j in jobs {
                let _ = std::fs::remove_dir_all(j.path());
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    // One log line per refusal: its code, route and client address; never the upload.
    // The line is written as the response goes out: the client may have the last
    // response a moment before the log has its line, so wait (bounded) for it.
    let refused = || svc.log_records().into_iter().filter(|r| r["fields"]["message"].as_str().is_some_and(|m| m.starts_with("request refused"))).collect::<Vec<Value>>();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut refusals = refused();
    while refusals.len() < cases.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        refusals = refused();
    }
    assert_eq!(refusals.len(), cases.len(), "one line per refused request:\n{}", svc.logs());
    for (r, c) in refusals.iter().zip(&cases) {
        assert_eq!(r["fields"]["code"], c.code, "{r}");
        assert!(r["fields"]["client"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{r}");
        assert!(r["fields"]["route"].is_string(), "{r}");
    }
    assert!(!svc.logs().contains("ftyp") && !svc.logs().contains("RIFF"), "upload content reached the logs");
    // Nothing appeared outside the data dir's own folders.
    let after = tree(outer.path());
    let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).filter(|p| !p.starts_with(data.join("jobs")) && !p.starts_with(data.join("avatars"))).collect();
    assert!(new.is_empty(), "files written outside the job dirs: {new:?}");
    assert!(!Path::new("/tmp/evil.mp4").exists());
    // The service keeps serving, and a good request still works (a malformed
    // traceparent on it is ignored: a new trace starts).
    assert_eq!(svc.get("/healthz").await.status(), StatusCode::OK);
    let r = svc
        .client()
        .post(svc.url("/v1/inference"))
        .header("content-type", format!("multipart/form-data; boundary={B}"))
        .header("traceparent", "00-zzzz-not-a-trace-01")
        .body(encode(&good()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
    assert_ne!(v["trace_id"], "00000000000000000000000000000000");
    // No job was counted for refused requests: only the good one.
    let m = svc.get("/metrics").await.text().await.unwrap();
    let jobs: f64 = m.lines().filter(|l| l.starts_with("musetalk_jobs_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
    assert_eq!(jobs, 1.0, "{m}");
}

/// Uploads the fuzzer found that ffprobe accepts but no pipeline can decode (unknown
/// codec, broken mp4, no decodable frame, 0x0 webm, audio shorter than a frame): each is
/// a 4xx naming the part on every upload route, never a job that fails with a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_regressions_are_client_errors_on_every_upload_route() {
    let svc = ServiceBuilder::new().start().await;
    svc.wait_ready().await;
    let prep = encode(&[file("video", "v.mp4", &media().video), text("avatar_id", b"fuzzavatar")]);
    let r = svc.client().post(svc.url("/v1/avatars")).header("content-type", format!("multipart/form-data; boundary={B}")).body(prep).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for _ in 0..200 {
        let v: Value = svc.get("/v1/avatars/fuzzavatar").await.json().await.unwrap();
        if v["state"] == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/multipart_raw");
    let mut failures = Vec::new();
    let mut cases = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let body = std::fs::read(entry.path()).unwrap();
        for route in ["/v1/inference", "/v1/avatars", "/v1/avatars/fuzzavatar/speak"] {
            cases += 1;
            let r = svc.client().post(svc.url(route)).header("content-type", "multipart/form-data; boundary=X").body(body.clone()).send().await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE {
                failures.push(format!("{} on {route}: {status} {text}", entry.file_name().to_string_lossy()));
            }
        }
    }
    assert!(cases >= 18, "the regression inputs are there: {cases}");
    assert!(failures.is_empty(), "{} server errors:\n{}", failures.len(), failures.join("\n"));
}
