//! `GET /openapi.json` against the REAL binary: the document is OpenAPI 3.1, it describes
//! exactly the routes the router serves, and real responses (a real `preview` job on
//! ffmpeg-made media, avatars, errors, probes) validate against the schemas it declares
//! for their route and status, checked with the `jsonschema` crate (draft 2020-12).
//!
//! Validation is strict: besides types and required fields, every object in a response
//! must declare all the properties it carries (`unevaluatedProperties: false` is added to
//! the document's schemas before validating), so an undocumented field fails too.
//!
//! Needs `ffmpeg` and `ffprobe` on PATH.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::media::{file_part, hold_upload, media};
use common::service::{Service, ServiceBuilder};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use reqwest::multipart::Form;
use serde_json::{Value, json};

/// Routes the router serves that are deliberately NOT in the OpenAPI document: the HTML
/// status page for people (`src/ui`, merged into the router by `app()`), not an API.
/// `/` and every path under `/ui` are excluded; nothing else may be missing.
fn is_excluded_ui_route(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn job_form() -> Form {
    Form::new().part("video", file_part(&media().video, "v.mp4")).part("audio", file_part(&media().audio, "a.wav"))
}

// ---------------------------------------------------------------------------------------
// The document and strict schema validation.

const OPERATION_KEYS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

struct Doc(Value);

/// A real response, checked against the document.
struct Checked {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    json: Option<Value>,
}

impl Doc {
    async fn fetch(svc: &Service) -> Doc {
        let r = svc.get("/openapi.json").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(essence(r.headers()), "application/json");
        let doc: Value = r.json().await.expect("/openapi.json is JSON");
        Doc(doc)
    }

    /// `(METHOD, path)` of every operation in the document.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let paths = self.0["paths"].as_object().expect("paths");
        paths
            .iter()
            .flat_map(|(p, item)| {
                OPERATION_KEYS.iter().filter(|m| item.get(**m).is_some()).map(move |m| (m.to_uppercase(), p.clone()))
            })
            .collect()
    }

    fn operation(&self, method: &str, path: &str) -> &Value {
        let op = &self.0["paths"][path][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is not in the document");
        op
    }

    fn response(&self, method: &str, path: &str, status: StatusCode) -> &Value {
        let r = &self.operation(method, path)["responses"][status.as_str()];
        assert!(r.is_object(), "{method} {path} answered {status}, which the document does not list for it");
        r
    }

    /// A validator for `schema` (a schema taken from this document): its
    /// `#/components/schemas/X` refs point at `$defs`, and every object is closed.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut defs = self.0["components"]["schemas"].clone();
        retarget_refs(&mut defs);
        let mut allof_targets = BTreeSet::new();
        collect_allof_targets(&defs, &mut allof_targets);
        for (name, def) in defs.as_object_mut().unwrap() {
            close_objects(def, allof_targets.contains(name));
        }
        let mut root = schema.clone();
        retarget_refs(&mut root);
        close_objects(&mut root, false);
        let root_obj = root.as_object_mut().expect("a schema object");
        root_obj.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
        root_obj.insert("$defs".into(), defs);
        jsonschema::meta::validate(&root).unwrap_or_else(|e| panic!("not a valid draft 2020-12 schema ({e}): {root}"));
        jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&root).unwrap_or_else(|e| panic!("schema does not compile ({e}): {root}"))
    }

    fn component_validator(&self, name: &str) -> jsonschema::Validator {
        assert!(self.0["components"]["schemas"][name].is_object(), "no component schema {name}");
        self.validator(&json!({ "$ref": format!("#/components/schemas/{name}") }))
    }

    /// Reads the response and checks it against the document's entry for
    /// `method path` and its status: the status is listed, the content type is one the
    /// document gives, the documented headers are there, a JSON body validates against
    /// the declared schema, and an error's stable code is named in the description.
    async fn check(&self, method: &str, path: &str, r: reqwest::Response) -> Checked {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let doc_resp = self.response(method, path, status);
        let what = format!("{method} {path} → {status}");
        for (name, _) in doc_resp["headers"].as_object().into_iter().flatten() {
            assert!(headers.contains_key(name.as_str()), "{what}: documented header {name} is missing; headers {headers:?}");
        }
        let content = doc_resp["content"].as_object();
        let Some(content) = content.filter(|c| !c.is_empty()) else {
            assert!(text.is_empty(), "{what}: the document gives no body, but one came: {text}");
            return Checked { status, headers, text, json: None };
        };
        let ct = essence(&headers);
        let media = content
            .iter()
            .find(|(k, _)| k.split(';').next().unwrap().trim() == ct)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{what}: content type {ct:?} is not among the documented {:?}", content.keys().collect::<Vec<_>>()));
        let mut json = None;
        if ct == "application/json" {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
            let schema = media.get("schema").unwrap_or_else(|| panic!("{what}: JSON without a schema"));
            assert_valid(&self.validator(schema), &v, &what);
            if status.as_u16() >= 400
                && let Some(code) = v["error"].as_str()
            {
                let description = doc_resp["description"].as_str().unwrap_or_default();
                assert!(description.contains(&format!("`{code}`")), "{what}: error code `{code}` is not listed in the response's description {description:?}");
            }
            json = Some(v);
        } else if let Some(schema) = media.get("schema") {
            // Text and binary bodies are described as strings.
            let resolved = if let Some(r) = schema["$ref"].as_str() { &self.0["components"]["schemas"][r.rsplit('/').next().unwrap()] } else { schema };
            assert_eq!(resolved["type"], "string", "{what}: non-JSON body described as {schema}");
        }
        Checked { status, headers, text, json }
    }
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{what}: the body does not match its documented schema:\n  {}\nbody: {instance:#}", errors.join("\n  "));
}

/// The media type of a response without parameters.
fn essence(headers: &HeaderMap) -> String {
    headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().split(';').next().unwrap().trim().to_ascii_lowercase()
}

/// `#/components/schemas/X` → `#/$defs/X`.
fn retarget_refs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "$ref"
                    && let Some(r) = child.as_str()
                {
                    *child = json!(r.replace("#/components/schemas/", "#/$defs/"));
                } else {
                    retarget_refs(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(retarget_refs),
        _ => {}
    }
}

/// Names of the `$defs` that some `allOf` uses directly as one of its parts (flattened
/// structs): those must stay open, their `allOf` parent closes over all the parts.
fn collect_allof_targets(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(parts) = m.get("allOf").and_then(Value::as_array) {
                for p in parts {
                    if let Some(r) = p["$ref"].as_str() {
                        out.insert(r.rsplit('/').next().unwrap().to_string());
                    }
                }
            }
            m.values().for_each(|c| collect_allof_targets(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| collect_allof_targets(c, out)),
        _ => {}
    }
}

/// Adds `unevaluatedProperties: false` to every schema that describes an object (its own
/// `properties`, or a `$ref`/`allOf`/`oneOf`/`anyOf` that does), except direct `allOf`
/// parts (`open`): an object with a property its schema does not declare fails.
fn close_objects(v: &mut Value, open: bool) {
    let Value::Object(m) = v else { return };
    for (k, child) in m.iter_mut() {
        match k.as_str() {
            "allOf" => child.as_array_mut().into_iter().flatten().for_each(|c| close_objects(c, true)),
            "oneOf" | "anyOf" | "prefixItems" => child.as_array_mut().into_iter().flatten().for_each(|c| close_objects(c, false)),
            "properties" | "patternProperties" | "$defs" => child.as_object_mut().into_iter().flatten().for_each(|(_, c)| close_objects(c, false)),
            "items" | "additionalProperties" | "not" | "contains" => close_objects(child, false),
            _ => {}
        }
    }
    let describes_object = ["properties", "$ref", "allOf", "oneOf", "anyOf"].iter().any(|k| m.contains_key(*k));
    if !open && describes_object {
        m.insert("unevaluatedProperties".into(), json!(false));
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

async fn started(builder: ServiceBuilder) -> (Service, Doc) {
    let svc = builder.start().await;
    svc.wait_ready().await;
    let doc = Doc::fetch(&svc).await;
    (svc, doc)
}

/// Polls `GET /v1/jobs/{id}` (checked each time) until the job has ended.
async fn wait_finished(svc: &Service, doc: &Doc, id: &str) -> Value {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let c = doc.check("GET", "/v1/jobs/{id}", svc.get(&format!("/v1/jobs/{id}")).await).await;
        assert_eq!(c.status, StatusCode::OK, "{}", c.text);
        let v = c.json.unwrap();
        if ["succeeded", "failed", "cancelled", "timed_out"].contains(&v["state"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} did not end; last {v}; logs:\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(event, data)` of a complete Server-Sent Events body.
fn sse_events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = String::from("message");
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
                }
            }
            (!data.is_empty()).then(|| (event, data.join("\n")))
        })
        .collect()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_is_openapi_31_and_covers_exactly_the_routes() {
    let (svc, doc) = started(ServiceBuilder::new()).await;
    let version = doc.0["openapi"].as_str().expect("`openapi` field");
    assert!(version.starts_with("3.1"), "openapi = {version}");
    assert!(doc.0["info"]["title"].is_string() && doc.0["info"]["version"].is_string());

    // Every component schema is valid JSON Schema 2020-12 (checked inside `validator`).
    for name in doc.0["components"]["schemas"].as_object().unwrap().keys() {
        doc.component_validator(name);
    }

    // The document and the router's route table (the list the router is built from) agree.
    let table: BTreeSet<(String, String)> = musetalk_sidecar::api::route_table().into_iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert!(table.iter().all(|(_, p)| !is_excluded_ui_route(p)), "the route table holds only API, admin and doc routes");
    let documented = doc.operations();
    assert!(documented.iter().all(|(_, p)| !is_excluded_ui_route(p)), "UI pages are not API routes: {documented:?}");
    let missing: Vec<_> = table.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&table).collect();
    assert!(missing.is_empty() && extra.is_empty(), "routed but undocumented: {missing:?}; documented but not routed: {extra:?}");
    for (m, p) in &documented {
        let op = doc.operation(m, p);
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{m} {p} documents no response");
        // Every documented error status has a JSON ErrorBody-compatible schema, except the
        // empty 416 of a byte range and /readyz's 503 (its body is the readiness report).
        for (status, resp) in op["responses"].as_object().unwrap() {
            let code: u16 = status.parse().unwrap();
            if code < 400 || (code == 416 && p.ends_with("/output")) || (code == 503 && p == "/readyz") {
                continue;
            }
            let schema = &resp["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "{m} {p} {status}: no JSON error schema");
            let v = doc.validator(schema);
            let sample = json!({"error": "some_code", "detail": "text"});
            let text = serde_json::to_string(schema).unwrap();
            assert!(v.is_valid(&sample) || text.contains("JobFailure"), "{m} {p} {status}: an ErrorBody does not validate against {schema}");
        }
        let security = &op["security"];
        if p.starts_with("/v1/") {
            assert_eq!(security, &json!([{}, {"bearer": []}]), "{m} {p}: bearer auth, optional");
            assert!(op["responses"]["401"].is_object(), "{m} {p}: 401 documented");
        } else {
            assert!(security.is_null(), "{m} {p} is open");
        }
    }
    assert_eq!(doc.0["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    // The live router serves each route of the table: probe it with an unknown id and no
    // body; whatever it answers must be documented (and validate), never "no such route".
    for (m, p) in &table {
        let url = svc.url(&p.replace("{id}", "openapi-probe-unknown"));
        let req = svc.client().request(reqwest::Method::from_bytes(m.as_bytes()).unwrap(), &url);
        let r = req.send().await.unwrap();
        assert_ne!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{m} {p}: the router does not serve this method");
        let c = doc.check(m, p, r).await;
        if let Some(v) = &c.json {
            assert_ne!(v["error"], "route_not_found", "{m} {p}: the router does not serve this path");
        }
    }
    // The probes are meaningful: an unrouted path and an unrouted method are refused.
    let r = svc.get("/v1/no-such-route").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "route_not_found");
    let r = svc.client().put(svc.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_responses_validate_against_their_schemas() {
    let (svc, doc) = started(ServiceBuilder::new()).await;
    let c = svc.client();

    // Probes.
    let ready = doc.check("GET", "/readyz", svc.get("/readyz").await).await;
    assert_eq!(ready.status, StatusCode::OK);
    let health = doc.check("GET", "/healthz", svc.get("/healthz").await).await;
    assert_eq!(health.json.unwrap(), json!({"status": "ok"}));

    // A real synchronous preview job.
    let r = c.post(svc.url("/v1/inference")).multipart(job_form()).send().await.unwrap();
    let done = doc.check("POST", "/v1/inference", r).await;
    assert_eq!(done.status, StatusCode::OK, "{}; logs:\n{}", done.text, svc.logs());
    let body = done.json.unwrap();
    let id = body["job_id"].as_str().unwrap().to_string();
    assert!(body["report"].is_object(), "{body}");

    // The strictness is real: a body that differs from the schema fails it.
    let v = doc.validator(&doc.response("POST", "/v1/inference", StatusCode::OK)["content"]["application/json"]["schema"]);
    assert!(v.is_valid(&body));
    for broken in [
        json!({"state": 42}),
        json!({"surprise": "an undocumented field"}),
        json!({"report": {"resources": {"samples": "many"}}}),
        json!({"report": {"steps": [{"name": "x", "seconds": 1.0, "percent": 1.0, "extra": true}]}}),
    ] {
        let mut b = body.clone();
        merge(&mut b, &broken);
        assert!(!v.is_valid(&b), "a response changed by {broken} still validates");
    }
    let mut b = body.clone();
    b.as_object_mut().unwrap().remove("job_id");
    assert!(!v.is_valid(&b), "a response without job_id still validates");

    let status = doc.check("GET", "/v1/jobs/{id}", svc.get(&format!("/v1/jobs/{id}")).await).await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.json.unwrap()["state"], "succeeded");
    let report = doc.check("GET", "/v1/jobs/{id}/report", svc.get(&format!("/v1/jobs/{id}/report")).await).await;
    assert_eq!(report.status, StatusCode::OK);
    assert_eq!(report.json.unwrap()["job_id"], id.as_str());
    let text = doc.check("GET", "/v1/jobs/{id}/report", c.get(svc.url(&format!("/v1/jobs/{id}/report"))).header("Accept", "text/plain").send().await.unwrap()).await;
    assert_eq!(essence(&text.headers), "text/plain");
    assert!(text.text.starts_with("MuseTalk job "), "{}", text.text);
    let list = doc.check("GET", "/v1/jobs", svc.get("/v1/jobs").await).await;
    assert_eq!(list.json.unwrap().as_array().unwrap().len(), 1);

    // The output: whole, and a byte range.
    let out = doc.check("GET", "/v1/jobs/{id}/output", svc.get(&format!("/v1/jobs/{id}/output")).await).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(essence(&out.headers), "video/mp4");
    let part = c.get(svc.url(&format!("/v1/jobs/{id}/output"))).header("Range", "bytes=0-99").send().await.unwrap();
    let part = doc.check("GET", "/v1/jobs/{id}/output", part).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);

    // Events of a finished job: `status` (a JobStatus) then `done` (a JobEvent).
    let ev = doc.check("GET", "/v1/jobs/{id}/events", svc.get(&format!("/v1/jobs/{id}/events")).await).await;
    assert_eq!(essence(&ev.headers), "text/event-stream");
    let events = sse_events(&ev.text);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["status", "done"], "{}", ev.text);
    let (job_status, job_event) = (doc.component_validator("JobStatus"), doc.component_validator("JobEvent"));
    for (name, data) in &events {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_valid(if name == "status" { &job_status } else { &job_event }, &v, &format!("SSE `{name}` event"));
    }

    // Cancelling a finished job is refused.
    let r = c.delete(svc.url(&format!("/v1/jobs/{id}"))).send().await.unwrap();
    let refused = doc.check("DELETE", "/v1/jobs/{id}", r).await;
    assert_eq!((refused.status, refused.json.unwrap()["error"].clone()), (StatusCode::CONFLICT, json!("job_finished")));

    // An asynchronous job, cancelled at once (or refused if it already ended), and the
    // events of a live job (every event validates, whatever arrives).
    let r = c.post(svc.url("/v1/inference")).header("Prefer", "respond-async").multipart(job_form()).send().await.unwrap();
    let accepted = doc.check("POST", "/v1/inference", r).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text);
    let async_id = accepted.json.unwrap()["job_id"].as_str().unwrap().to_string();
    assert_eq!(accepted.headers["location"], format!("/v1/jobs/{async_id}").as_str());
    let live = tokio::spawn({
        let (c, url) = (c.clone(), svc.url(&format!("/v1/jobs/{async_id}/events")));
        async move { c.get(url).send().await.unwrap() }
    });
    let early = doc.check("GET", "/v1/jobs/{id}/report", svc.get(&format!("/v1/jobs/{async_id}/report")).await).await;
    assert!([StatusCode::OK, StatusCode::CONFLICT].contains(&early.status), "{}", early.text);
    let r = c.delete(svc.url(&format!("/v1/jobs/{async_id}"))).send().await.unwrap();
    let cancelled = doc.check("DELETE", "/v1/jobs/{id}", r).await;
    assert!([StatusCode::OK, StatusCode::CONFLICT].contains(&cancelled.status), "{}", cancelled.text);
    wait_finished(&svc, &doc, &async_id).await;
    let live = doc.check("GET", "/v1/jobs/{id}/events", live.await.unwrap()).await;
    let events = sse_events(&live.text);
    assert_eq!(events.first().map(|e| e.0.as_str()), Some("status"), "{}", live.text);
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("done"), "{}", live.text);
    for (name, data) in &events {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_valid(if name == "status" { &job_status } else { &job_event }, &v, &format!("SSE `{name}` event"));
        if name != "status" {
            assert_eq!(v["type"], name.as_str(), "the event name is the payload's type");
        }
    }
    if cancelled.status == StatusCode::OK {
        let gone = doc.check("GET", "/v1/jobs/{id}/output", svc.get(&format!("/v1/jobs/{async_id}/output")).await).await;
        assert_eq!(gone.json.unwrap()["error"], "no_output");
    }

    // Error bodies.
    let e = doc.check("GET", "/v1/jobs/{id}", svc.get("/v1/jobs/nope").await).await;
    assert_eq!((e.status, e.json.unwrap()["error"].clone()), (StatusCode::NOT_FOUND, json!("job_not_found")));
    let only_video = Form::new().part("video", file_part(&media().video, "v.mp4"));
    let e = doc.check("POST", "/v1/inference", c.post(svc.url("/v1/inference")).multipart(only_video).send().await.unwrap()).await;
    assert_eq!((e.status, e.json.unwrap()["error"].clone()), (StatusCode::BAD_REQUEST, json!("missing_part")));
    let bad = job_form().text("bbox_shift", "999");
    let e = doc.check("POST", "/v1/inference", c.post(svc.url("/v1/inference")).multipart(bad).send().await.unwrap()).await;
    assert_eq!((e.status, e.json.unwrap()["error"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_bbox_shift")));
    let e = doc.check("POST", "/v1/inference", c.post(svc.url("/v1/inference")).body("x").send().await.unwrap()).await;
    assert_eq!((e.status, e.json.unwrap()["error"].clone()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!("not_multipart")));

    // Avatars (realtime mode; `preview` serves it without workers).
    let form = Form::new().part("video", file_part(&media().video, "v.mp4")).text("avatar_id", "alice");
    let prepared = doc.check("POST", "/v1/avatars", c.post(svc.url("/v1/avatars")).multipart(form).send().await.unwrap()).await;
    assert_eq!(prepared.status, StatusCode::ACCEPTED, "{}", prepared.text);
    let prep_job = prepared.json.unwrap()["job_id"].as_str().unwrap().to_string();
    assert_eq!(prepared.headers["location"], format!("/v1/jobs/{prep_job}").as_str());
    let form = Form::new().part("video", file_part(&media().video, "v.mp4")).text("avatar_id", "alice");
    let e = doc.check("POST", "/v1/avatars", c.post(svc.url("/v1/avatars")).multipart(form).send().await.unwrap()).await;
    assert_eq!(e.json.unwrap()["error"], "avatar_exists");
    let avatars = doc.check("GET", "/v1/avatars", svc.get("/v1/avatars").await).await;
    assert_eq!(avatars.json.unwrap().as_array().unwrap().len(), 1);
    wait_finished(&svc, &doc, &prep_job).await;
    let alice = doc.check("GET", "/v1/avatars/{id}", svc.get("/v1/avatars/alice").await).await;
    assert_eq!(alice.json.unwrap()["state"], "ready");
    let form = Form::new().part("audio", file_part(&media().audio, "a.wav"));
    let spoken = doc.check("POST", "/v1/avatars/{id}/speak", c.post(svc.url("/v1/avatars/alice/speak")).multipart(form).send().await.unwrap()).await;
    assert_eq!(spoken.status, StatusCode::OK, "{}", spoken.text);
    let form = Form::new().part("audio", file_part(&media().audio, "a.wav"));
    let e = doc.check("POST", "/v1/avatars/{id}/speak", c.post(svc.url("/v1/avatars/bob/speak")).multipart(form).send().await.unwrap()).await;
    assert_eq!(e.json.unwrap()["error"], "avatar_not_found");
    let removed = doc.check("DELETE", "/v1/avatars/{id}", c.delete(svc.url("/v1/avatars/alice")).send().await.unwrap()).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    let e = doc.check("GET", "/v1/avatars/{id}", svc.get("/v1/avatars/alice").await).await;
    assert_eq!(e.json.unwrap()["error"], "avatar_not_found");

    // Metrics, in both formats.
    let m = doc.check("GET", "/metrics", svc.get("/metrics").await).await;
    assert_eq!(essence(&m.headers), "text/plain");
    let r = c.get(svc.url("/metrics")).header("Accept", "application/openmetrics-text; version=1.0.0").send().await.unwrap();
    let m = doc.check("GET", "/metrics", r).await;
    assert_eq!(essence(&m.headers), "application/openmetrics-text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_and_unauthorized_validate() {
    // No queue place beyond the one run slot: one held upload fills the service.
    let (svc, doc) = started(ServiceBuilder::new().args(["--max-concurrent-jobs", "1", "--queue-size", "0"])).await;
    let held = hold_upload(&svc);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&svc.get("/metrics").await.text().await.unwrap(), r#"musetalk_jobs_queued{mode="simple"}"#) != Some(1.0) {
        assert!(Instant::now() < deadline, "the held upload was not admitted; logs:\n{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = svc.client().post(svc.url("/v1/inference")).multipart(job_form()).send().await.unwrap();
    let full = doc.check("POST", "/v1/inference", r).await;
    assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS, "{}", full.text);
    assert_eq!(full.json.unwrap()["error"], "queue_full");
    assert!(full.headers["retry-after"].to_str().unwrap().parse::<u64>().is_ok());
    let finished = doc.check("POST", "/v1/inference", held.release().await.unwrap().unwrap()).await;
    assert_eq!(finished.status, StatusCode::OK, "{}", finished.text);

    // With --auth-token-file, /v1/* answers the documented 401; the document stays open.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret\n").unwrap();
    let svc = ServiceBuilder::new().arg("--auth-token-file").arg(&tokens).start().await;
    svc.wait_ready().await;
    let doc = Doc::fetch(&svc).await;
    let denied = doc.check("GET", "/v1/jobs", svc.get("/v1/jobs").await).await;
    assert_eq!((denied.status, denied.json.unwrap()["error"].clone()), (StatusCode::UNAUTHORIZED, json!("unauthorized")));
    let r = svc.client().get(svc.url("/v1/jobs")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(doc.check("GET", "/v1/jobs", r).await.status, StatusCode::OK);
}

/// Deep-merges `patch` into `v` (objects merge, arrays and scalars replace; arrays of
/// objects merge element-wise).
fn merge(v: &mut Value, patch: &Value) {
    match (v, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, pv) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), pv);
            }
        }
        (Value::Array(a), Value::Array(b)) if b.iter().all(Value::is_object) && !a.is_empty() => {
            for (x, pv) in a.iter_mut().zip(b) {
                merge(x, pv);
            }
        }
        (slot, pv) => *slot = pv.clone(),
    }
}
