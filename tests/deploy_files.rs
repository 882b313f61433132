//! The deploy files (DESIGN.md §7) parse and reference only images, ports, paths and
//! endpoints that exist: `prometheus.yml` and the alert rules (promtool check config,
//! check rules and the rule unit tests), the Grafana provisioning, `deploy/Dockerfile`,
//! `deploy/docker-compose.yml` (+ the GPU override) and the Kubernetes manifests under
//! `deploy/k8s/` (the generated ones in sync with their sources), and every sidecar
//! setting these files pass is accepted by the real binary.
//!
//! No container engine and no cluster is available to the tests: nothing here builds
//! an image or applies a manifest. What can be proven without them is: YAML/JSON parse,
//! every file a mount/COPY/provider/kustomization names exists, ports and service names
//! agree across files and with the sidecar's defaults, probes hit /healthz and /readyz,
//! env var names are ones `musetalk-sidecar --help` (or OpenTelemetry) defines and the
//! binary starts with exactly those settings, third-party images are pinned.
//!
//! Needs `promtool` (Debian `prometheus`), `ffmpeg` and `python3` with PyYAML.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::prometheus::promtool;
use common::service::ServiceBuilder;
use serde_yaml_ng::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The sidecar's port (`--listen 0.0.0.0:8000` by default).
const SIDECAR_PORT: u16 = 8000;
/// OpenTelemetry variables the sidecar honours (README.md, Configuration).
const OTEL_VARS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];
/// Well-known ports of the third-party images the compose file runs.
const IMAGE_PORTS: &[(&str, &[u16])] = &[
    ("prom/prometheus", &[9090]),
    ("grafana/grafana", &[3000]),
    (
        "jaegertracing/all-in-one",
        &[16686, 4317, 4318, 14268, 14269],
    ),
];

fn repo(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"))
}

/// Every document of a (possibly multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `host:port` of an `http://host:port/…` URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let hp = rest.split('/').next().unwrap();
    let (h, p) = hp
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url}: no port"));
    (
        h.to_string(),
        p.parse().unwrap_or_else(|_| panic!("{url}: bad port")),
    )
}

fn humantime_secs(v: &str) -> u64 {
    humantime::parse_duration(v)
        .unwrap_or_else(|e| panic!("{v:?}: {e}"))
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// The binary's own settings, from `--help`.

struct Help {
    envs: BTreeSet<String>,
    text: String,
}

fn help() -> Help {
    let out = common::service::command()
        .arg("--help")
        .output()
        .expect("run musetalk-sidecar --help");
    assert!(out.status.success(), "--help failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let envs = text
        .split("[env: ")
        .skip(1)
        .map(|r| r.split(['=', ']']).next().unwrap().to_string())
        .collect();
    Help { envs, text }
}

impl Help {
    /// The `[default: …]` of `flag`.
    fn default_of(&self, flag: &str) -> String {
        let at = self
            .text
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("--help has no {flag}"));
        let rest = &self.text[at..];
        let next_flag = rest[2..]
            .find("\n      --")
            .map(|i| i + 2)
            .unwrap_or(rest.len());
        let section = &rest[..next_flag];
        section
            .split("[default: ")
            .nth(1)
            .unwrap_or_else(|| panic!("{flag} has no default:\n{section}"))
            .split(']')
            .next()
            .unwrap()
            .to_string()
    }

    fn check_env_name(&self, name: &str, helpers: &BTreeSet<String>, at: &str) {
        let ok = self.envs.contains(name)
            || OTEL_VARS.contains(&name)
            || name.starts_with("OTEL_BSP_")
            || helpers.contains(name);
        assert!(
            ok,
            "{at}: environment variable {name} is not a setting of musetalk-sidecar (--help lists {:?}) nor a documented OTEL_* variable",
            self.envs
        );
    }
}

// ---------------------------------------------------------------------------------------
// Dockerfile.

struct Stage {
    name: String,
    image: String,
    lines: Vec<String>,
}

/// The Dockerfile's stages with `ARG` defaults substituted into `FROM`, continuation
/// lines joined, comments dropped.
fn dockerfile() -> (BTreeMap<String, String>, Vec<Stage>) {
    let text = read("deploy/Dockerfile");
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    let mut args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (instr, rest) = l.split_once(' ').unwrap_or((&l, ""));
        match instr.to_ascii_uppercase().as_str() {
            "ARG" if stages.is_empty() => {
                let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                args.insert(k.trim().to_string(), v.trim().to_string());
            }
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let mut image = words[0].to_string();
                for (k, v) in &args {
                    image = image.replace(&format!("${{{k}}}"), v);
                }
                assert!(
                    words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                    "FROM without a stage name: {l}"
                );
                stages.push(Stage {
                    name: words[2].to_string(),
                    image,
                    lines: Vec::new(),
                });
            }
            _ => stages
                .last_mut()
                .expect("instruction before FROM")
                .lines
                .push(l.clone()),
        }
    }
    (args, stages)
}

impl Stage {
    fn instr<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.lines
            .iter()
            .filter_map(move |l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
    }

    /// `ENV K=V K=V` pairs.
    fn env(&self) -> Vec<(String, String)> {
        self.instr("ENV")
            .flat_map(|r| {
                r.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }
}

#[test]
fn dockerfile_builds_slim_non_root_images_with_ffmpeg() {
    let (_, stages) = dockerfile();
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["build", "musetalk", "runtime"],
        "stages (runtime last: the default target)"
    );
    let stage = |n: &str| stages.iter().find(|s| s.name == n).unwrap();

    // Builder: rust:1.95-bookworm (at least Cargo.toml's rust-version), locked release build.
    let build = stage("build");
    let cargo: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let msrv = cargo["package"]["rust-version"].as_str().unwrap();
    assert_eq!(
        build.image,
        format!("rust:{msrv}-bookworm"),
        "builder image"
    );
    let run = build.instr("RUN").collect::<Vec<_>>().join("\n");
    let bin = cargo["bin"][0]["name"].as_str().unwrap();
    assert!(
        run.contains(&format!("cargo build --release --locked --bin {bin}")),
        "{run}"
    );
    assert!(run.contains(&format!("/out/{bin}")), "{run}");
    // The probe helper is built and installed beside it (the runtime image copies it).
    let helper = cargo["bin"][1]["name"].as_str().unwrap();
    assert!(run.contains(&format!("--bin {helper}")) && run.contains(&format!("/out/{helper}")), "{run}");
    // COPY sources exist and pass Dockerfile.dockerignore.
    let ignore = read("deploy/Dockerfile.dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        "Dockerfile.dockerignore starts from excluding everything (target/ is GBs)"
    );
    for copy in stages
        .iter()
        .flat_map(|st| st.instr("COPY"))
        .filter(|c| !c.starts_with("--from="))
    {
        let words: Vec<&str> = copy.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            assert!(repo(src).exists(), "COPY {src}: not in the repository");
            assert!(
                allowed.contains(&src.trim_end_matches('/')),
                "COPY {src}: excluded by deploy/Dockerfile.dockerignore"
            );
        }
    }
    for p in ["src/main.rs", "Cargo.lock", "benches"] {
        assert!(repo(p).exists(), "{p}");
    }
    // Cargo checks that every target Cargo.toml declares exists, even for `--bin`: each
    // must be in the build context.
    for (kind, dir) in [
        ("bench", "benches"),
        ("example", "examples"),
        ("test", "tests"),
        ("bin", "src/bin"),
    ] {
        for t in cargo
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let name = t["name"].as_str().unwrap();
            let path = t
                .get("path")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("{dir}/{name}.rs"));
            assert!(
                repo(&path).is_file(),
                "Cargo.toml's {kind} {name}: {path} does not exist"
            );
            assert!(
                allowed
                    .iter()
                    .any(|a| path == *a || path.starts_with(&format!("{a}/"))),
                "Cargo.toml's {kind} {name} ({path}) is not COPYed into the build stage (deploy/Dockerfile and deploy/Dockerfile.dockerignore)"
            );
        }
    }

    assert_eq!(stage("runtime").image, "debian:bookworm-slim");
    assert!(
        stage("musetalk").image.starts_with("nvidia/cuda:")
            && stage("musetalk").image.contains("ubuntu22.04"),
        "{}",
        stage("musetalk").image
    );
    for st in [stage("runtime"), stage("musetalk")] {
        let n = &st.name;
        let run = st.instr("RUN").collect::<Vec<_>>().join("\n");
        for pkg in ["ffmpeg", "tini", "curl"] {
            assert!(
                run.contains(&format!(" {pkg} ")) || run.contains(&format!(" {pkg}\n")),
                "{n}: apt-get install {pkg}:\n{run}"
            );
        }
        assert!(
            run.contains("rm -rf /var/lib/apt/lists/*"),
            "{n}: slim: drop apt lists"
        );
        assert!(
            run.contains("useradd --system --uid 10001"),
            "{n}: a non-root user 10001"
        );
        let user: Vec<&str> = st.instr("USER").collect();
        assert_eq!(user, ["10001:10001"], "{n}: runs as the non-root user");
        assert_eq!(
            st.instr("EXPOSE").collect::<Vec<_>>(),
            [SIDECAR_PORT.to_string()],
            "{n}"
        );
        let hc: Vec<&str> = st.instr("HEALTHCHECK").collect();
        assert!(
            hc.len() == 1 && hc[0].contains(&format!("http://127.0.0.1:{SIDECAR_PORT}/healthz")),
            "{n}: HEALTHCHECK on /healthz: {hc:?}"
        );
        let copy: Vec<&str> = st
            .instr("COPY")
            .filter(|c| c.starts_with("--from="))
            .collect();
        // The probe helper goes next to the sidecar where the image's FFmpeg is the one it
        // was linked against (bookworm's), not into the Ubuntu-based MuseTalk image.
        let mut expected = vec![format!("--from=build /out/{bin} /usr/local/bin/{bin}")];
        if n == "runtime" {
            let helper = cargo["bin"][1]["name"].as_str().unwrap();
            expected.push(format!("--from=build /out/{helper} /usr/local/bin/{helper}"));
        }
        assert_eq!(copy, expected, "{n}");
        let entry: Vec<&str> = st.instr("ENTRYPOINT").collect();
        assert_eq!(
            entry,
            [format!(r#"["/usr/bin/tini", "--", "{bin}"]"#)],
            "{n}"
        );
        let env: BTreeMap<String, String> = st.env().into_iter().collect();
        assert_eq!(
            env.get("MUSETALK_SIDECAR_LISTEN").map(String::as_str),
            Some("0.0.0.0:8000"),
            "{n}"
        );
    }
    // The MuseTalk image: code cloned where the backend looks, weights left to a mount.
    let mt = stage("musetalk");
    let env: BTreeMap<String, String> = mt.env().into_iter().collect();
    assert_eq!(env["MUSETALK_SIDECAR_BACKEND"], "musetalk");
    let dir = &env["MUSETALK_SIDECAR_MUSETALK_DIR"];
    let run = mt.instr("RUN").collect::<Vec<_>>().join("\n");
    assert!(
        run.contains(&format!("git clone \"${{MUSETALK_REPO}}\" {dir}")),
        "{run}"
    );
    assert!(
        !run.contains("download_weights") && !mt.instr("COPY").any(|c| c.contains("models")),
        "weights are mounted, never baked"
    );
    assert_eq!(
        env["MUSETALK_SIDECAR_MUSETALK_PYTHON"],
        "/opt/venv/bin/python"
    );
    assert!(run.contains("python3 -m venv /opt/venv"), "{run}");
    // Realtime mode's worker script is in the image, where the setting points.
    let script = &env["MUSETALK_SIDECAR_MUSETALK_WORKER_SCRIPT"];
    assert!(
        mt.instr("COPY")
            .any(|c| c == format!("worker/musetalk_worker.py {script}")),
        "the musetalk image must COPY worker/musetalk_worker.py to {script}"
    );
}

// ---------------------------------------------------------------------------------------
// docker compose.

/// A short-syntax volume: `(source, target, read_only)`.
fn volumes(svc: &Value) -> Vec<(String, String, bool)> {
    strs(&svc["volumes"])
        .into_iter()
        .map(|v| {
            // The source may be `${VAR:?message}`, which holds colons.
            let (src, rest) = if v.starts_with("${") {
                let end = v.find('}').unwrap() + 1;
                (v[..end].to_string(), v[end + 1..].to_string())
            } else {
                let (a, b) = v.split_once(':').unwrap();
                (a.to_string(), b.to_string())
            };
            let (target, ro) = match rest.split_once(':') {
                Some((t, mode)) => (t.to_string(), mode == "ro"),
                None => (rest, false),
            };
            (src, target, ro)
        })
        .collect()
}

/// The host path (in the repo) a container path of `svc` comes from, through its bind mounts.
fn host_path_of(svc: &Value, container_path: &str) -> Option<PathBuf> {
    volumes(svc)
        .into_iter()
        .filter(|(src, _, _)| src.starts_with('.'))
        .find_map(|(src, target, _)| {
            let rest = container_path.strip_prefix(&target)?;
            let host = repo("deploy").join(&src);
            if rest.is_empty() {
                Some(host)
            } else {
                rest.starts_with('/')
                    .then(|| host.join(rest.trim_start_matches('/')))
            }
        })
}

fn published(svc: &Value) -> Vec<(u16, u16)> {
    strs(&svc["ports"])
        .into_iter()
        .map(|p| {
            let (h, c) = p
                .split_once(':')
                .unwrap_or_else(|| panic!("port {p}: publish as HOST:CONTAINER"));
            (h.parse().unwrap(), c.parse().unwrap())
        })
        .collect()
}

fn env_map(svc: &Value) -> BTreeMap<String, String> {
    svc["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        s(k).to_string(),
                        v.as_str().map(str::to_string).unwrap_or_else(|| {
                            serde_yaml_ng::to_string(v).unwrap().trim().to_string()
                        }),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_references_only_what_exists() {
    let compose = yaml("deploy/docker-compose.yml");
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(s).collect();
    assert_eq!(
        names,
        BTreeSet::from(["sidecar", "prometheus", "grafana", "jaeger"])
    );
    let svc = |n: &str| &compose["services"][n];
    let (_, stages) = dockerfile();
    let named_volumes: BTreeSet<&str> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(s).collect())
        .unwrap_or_default();

    for (name, def) in services {
        let name = s(name);
        let image = s(&def["image"]);
        let (repo_name, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name}: pin the image tag: {image}"));
        assert!(
            tag != "latest"
                && (tag.starts_with(|c: char| c.is_ascii_digit()) || tag.starts_with('v')),
            "{name}: pin a version, not {image}"
        );
        if name == "sidecar" {
            assert_eq!(repo_name, "musetalk-sidecar");
            assert_eq!(
                tag, VERSION,
                "the sidecar image is tagged with Cargo.toml's version"
            );
        } else {
            assert!(
                IMAGE_PORTS.iter().any(|(i, _)| *i == repo_name),
                "{name}: unexpected image {image}"
            );
            assert!(def.get("build").is_none());
        }
        for d in strs(&def["depends_on"]) {
            assert!(
                names.contains(d.as_str()),
                "{name} depends on unknown service {d}"
            );
        }
        // Every bind mount exists; named volumes are declared.
        for (src, target, _) in volumes(def) {
            if src.starts_with('.') {
                let host = repo("deploy").join(&src);
                assert!(
                    host.exists(),
                    "{name}: mount source {src} ({}) does not exist",
                    host.display()
                );
                assert!(target.starts_with('/'), "{name}: {target}");
            } else {
                assert!(
                    named_volumes.contains(src.as_str()),
                    "{name}: volume {src} is not declared under volumes:"
                );
            }
        }
        // Published ports are the container ports the image really listens on.
        for (host, container) in published(def) {
            assert_eq!(
                host, container,
                "{name}: publish on the same port ({host}:{container})"
            );
            let known: &[u16] = if name == "sidecar" {
                &[SIDECAR_PORT]
            } else {
                IMAGE_PORTS.iter().find(|(i, _)| *i == repo_name).unwrap().1
            };
            assert!(
                known.contains(&container),
                "{name}: {image} does not listen on {container}"
            );
        }
    }

    // The sidecar: built from deploy/Dockerfile's slim target, listening on 8000.
    let sc = svc("sidecar");
    assert_eq!(s(&sc["build"]["context"]), "..");
    let dockerfile_path = repo("deploy")
        .join("..")
        .join(s(&sc["build"]["dockerfile"]));
    assert!(dockerfile_path.is_file(), "{}", dockerfile_path.display());
    assert_eq!(s(&sc["build"]["target"]), "runtime");
    assert!(stages.iter().any(|st| st.name == "runtime"));
    assert_eq!(published(sc), [(SIDECAR_PORT, SIDECAR_PORT)]);
    let env = env_map(sc);
    assert_eq!(
        env["MUSETALK_SIDECAR_LISTEN"],
        format!("0.0.0.0:{SIDECAR_PORT}")
    );
    let help = help();
    assert!(
        humantime_secs(s(&sc["stop_grace_period"]))
            > humantime_secs(&help.default_of("--shutdown-grace")),
        "stop_grace_period must exceed --shutdown-grace"
    );
    // Spans go to a compose service that listens on that port with that protocol.
    let (host, port) = host_port(&env["OTEL_EXPORTER_OTLP_ENDPOINT"]);
    assert!(
        names.contains(host.as_str()),
        "OTLP endpoint host {host} is not a service"
    );
    let jaeger = svc(&host);
    assert!(
        published(jaeger).iter().any(|(_, c)| *c == port),
        "{host} does not expose {port}"
    );
    assert_eq!(
        (port, env["OTEL_EXPORTER_OTLP_PROTOCOL"].as_str()),
        (4317, "grpc"),
        "4317 is OTLP gRPC"
    );
    assert_eq!(
        env_map(jaeger)
            .get("COLLECTOR_OTLP_ENABLED")
            .map(String::as_str),
        Some("true")
    );
    let ui = &env["MUSETALK_SIDECAR_TRACE_UI_URL"];
    assert!(
        ui.starts_with("http://localhost:16686/trace/") && ui.contains("{trace_id}"),
        "{ui}"
    );

    // Prometheus: the repo's prometheus.yml with exemplar storage, its rule files reachable.
    let prom = svc("prometheus");
    let cmd = strs(&prom["command"]);
    assert!(
        cmd.contains(&"--enable-feature=exemplar-storage".to_string()),
        "{cmd:?}"
    );
    let cfg_path = cmd
        .iter()
        .find_map(|c| c.strip_prefix("--config.file="))
        .expect("--config.file");
    let host_cfg = host_path_of(prom, cfg_path).expect("the config file is mounted");
    assert_eq!(
        host_cfg.canonicalize().unwrap(),
        repo("prometheus.yml").canonicalize().unwrap(),
        "compose runs the repository's prometheus.yml"
    );
    let pcfg = yaml("prometheus.yml");
    for rule in strs(&pcfg["rule_files"]) {
        let in_container = format!("{}/{rule}", Path::new(cfg_path).parent().unwrap().display());
        let host = host_path_of(prom, &in_container)
            .unwrap_or_else(|| panic!("rule file {in_container} is not mounted"));
        assert_eq!(
            host.canonicalize().unwrap(),
            repo(&rule).canonicalize().unwrap(),
            "rule file {rule}"
        );
    }
    let target = &strs(&pcfg["scrape_configs"][0]["static_configs"][0]["targets"])[0];
    let (thost, tport) = host_port(target);
    assert_eq!(
        (thost.as_str(), tport),
        ("sidecar", SIDECAR_PORT),
        "prometheus.yml scrapes the compose sidecar"
    );

    // Grafana: provisioning and dashboards mounted where the provider looks.
    let graf = svc("grafana");
    let prov = host_path_of(graf, "/etc/grafana/provisioning").expect("provisioning mounted");
    assert_eq!(
        prov.canonicalize().unwrap(),
        repo("deploy/grafana/provisioning").canonicalize().unwrap()
    );
    let provider = yaml("deploy/grafana/provisioning/dashboards/dashboards.yml");
    let dash_path = s(&provider["providers"][0]["options"]["path"]);
    let host = host_path_of(graf, dash_path).expect("the dashboards provider path is mounted");
    assert_eq!(
        host.canonicalize().unwrap(),
        repo("dashboards").canonicalize().unwrap()
    );
    let home = &env_map(graf)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"];
    assert!(
        host_path_of(graf, home).is_some_and(|p| p.is_file()),
        "home dashboard {home} is not a mounted file"
    );

    // The GPU override.
    let gpu = yaml("deploy/docker-compose.gpu.yml");
    let over = gpu["services"].as_mapping().unwrap();
    assert_eq!(over.keys().map(s).collect::<Vec<_>>(), ["sidecar"]);
    let g = &gpu["services"]["sidecar"];
    assert_eq!(s(&g["build"]["target"]), "musetalk");
    assert!(stages.iter().any(|st| st.name == "musetalk"));
    assert_eq!(
        s(&g["image"]),
        format!("musetalk-sidecar:{VERSION}-musetalk")
    );
    let genv = env_map(g);
    let vols = volumes(g);
    assert_eq!(vols.len(), 1, "{vols:?}");
    let (src, target, ro) = &vols[0];
    assert!(
        src.starts_with("${MUSETALK_MODELS_DIR:?"),
        "the weights' host dir is a required variable: {src}"
    );
    assert_eq!(
        target,
        &format!("{}/models", genv["MUSETALK_SIDECAR_MUSETALK_DIR"]),
        "mounted where MuseTalk looks for models/"
    );
    assert!(ro, "weights are mounted read-only");
    let dev = &g["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(
        (s(&dev["driver"]), strs(&dev["capabilities"])),
        ("nvidia", vec!["gpu".to_string()])
    );
    assert!(
        humantime_secs(s(&g["stop_grace_period"]))
            > humantime_secs(&genv["MUSETALK_SIDECAR_SHUTDOWN_GRACE"])
    );
}

// ---------------------------------------------------------------------------------------
// Grafana provisioning.

#[test]
fn grafana_provisioning_links_exemplars_to_jaeger() {
    let ds = yaml("deploy/grafana/provisioning/datasources/datasources.yml");
    let list = ds["datasources"].as_sequence().unwrap();
    let by_type = |t: &str| {
        list.iter()
            .find(|d| d["type"] == t)
            .unwrap_or_else(|| panic!("no {t} datasource"))
    };
    let prom = by_type("prometheus");
    let jaeger = by_type("jaeger");
    assert_eq!(
        s(&prom["uid"]),
        "prometheus",
        "the dashboards' datasource variable defaults to uid `prometheus`"
    );
    assert_eq!(prom["isDefault"], true);
    let dest = &prom["jsonData"]["exemplarTraceIdDestinations"][0];
    assert_eq!(
        s(&dest["datasourceUid"]),
        s(&jaeger["uid"]),
        "exemplars open their trace in the Jaeger datasource"
    );
    assert_eq!(
        s(&dest["name"]),
        "trace_id",
        "the exemplar label the sidecar writes (tests/e2e_dashboards.rs reads stored exemplars by it)"
    );

    let compose = yaml("deploy/docker-compose.yml");
    for (d, port) in [(prom, 9090), (jaeger, 16686)] {
        let (host, p) = host_port(s(&d["url"]));
        let svc = &compose["services"][host.as_str()];
        assert!(
            svc.is_mapping(),
            "datasource url {} names no compose service",
            s(&d["url"])
        );
        assert_eq!(p, port);
        assert!(
            published(svc).iter().any(|(_, c)| *c == p),
            "{host} does not expose {p}"
        );
    }
    let scrape = s(&yaml("prometheus.yml")["global"]["scrape_interval"]).to_string();
    assert_eq!(
        s(&prom["jsonData"]["timeInterval"]),
        scrape,
        "Grafana's timeInterval = prometheus.yml's scrape_interval ($__rate_interval is built on it)"
    );

    let provider = yaml("deploy/grafana/provisioning/dashboards/dashboards.yml");
    let p = &provider["providers"][0];
    assert_eq!(s(&p["type"]), "file");
    assert!(s(&p["options"]["path"]).starts_with('/'));
}

// ---------------------------------------------------------------------------------------
// Prometheus config and rules.

#[test]
fn promtool_checks_config_rules_and_rule_unit_tests() {
    let cfg = repo("prometheus.yml");
    let (ok, out) = promtool(&["check", "config", cfg.to_str().unwrap()], None);
    assert!(ok, "promtool check config prometheus.yml:\n{out}");
    let rules = repo("deploy/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
    let tests = repo("deploy/prometheus/alerts.test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(
        ok,
        "promtool test rules deploy/prometheus/alerts.test.yml:\n{out}"
    );

    // prometheus.yml: the sidecar job, named as the rules and the k8s Service expect.
    let p = yaml("prometheus.yml");
    let job = &p["scrape_configs"][0];
    assert_eq!(s(&job["job_name"]), "musetalk-sidecar");
    assert_eq!(
        job.get("metrics_path").map(s).unwrap_or("/metrics"),
        "/metrics"
    );
    if let Some(protocols) = job
        .get("scrape_protocols")
        .or(p["global"].get("scrape_protocols"))
    {
        assert!(
            strs(protocols)
                .first()
                .is_some_and(|f| f.starts_with("OpenMetrics")),
            "exemplars need OpenMetrics first: {protocols:?}"
        );
    }
    assert!(
        read("prometheus.yml").contains("--enable-feature=exemplar-storage"),
        "document the flag exemplars need"
    );

    // Every alert is unit-tested firing, and quiet; each has a severity and a text.
    let a = yaml("deploy/prometheus/alerts.yml");
    let t = yaml("deploy/prometheus/alerts.test.yml");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in t["tests"].as_sequence().unwrap() {
        for art in case["alert_rule_test"].as_sequence().unwrap() {
            let name = s(&art["alertname"]).to_string();
            if art["exp_alerts"]
                .as_sequence()
                .is_some_and(|e| !e.is_empty())
            {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let mut alerts = Vec::new();
    for g in a["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = s(&r["alert"]).to_string();
            assert!(
                matches!(s(&r["labels"]["severity"]), "critical" | "warning"),
                "{name}: severity"
            );
            for k in ["summary", "description"] {
                assert!(
                    r["annotations"][k].as_str().is_some_and(|v| !v.is_empty()),
                    "{name}: annotation {k}"
                );
            }
            assert!(
                fires.contains(&name),
                "{name}: no promtool test case where it fires (deploy/prometheus/alerts.test.yml)"
            );
            assert!(
                quiet.contains(&name),
                "{name}: no promtool test case where it stays quiet"
            );
            alerts.push(name);
        }
    }
    for required in [
        "MuseTalkGpuTemperatureHigh",
        "MuseTalkGpuMemoryNearLimit",
        "MuseTalkJobErrorRatioHigh",
        "MuseTalkStepP95Regression",
        "MuseTalkQueueSaturated",
        "MuseTalkQueueNearlyFull",
        "MuseTalkCollectorSourceDown",
        "MuseTalkWorkerRestarting",
    ] {
        assert!(
            alerts.iter().any(|a| a == required),
            "alert {required} is missing"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Generated Kubernetes files.

#[test]
fn generated_k8s_files_are_in_sync() {
    // Run the generator on a copy of its inputs and compare byte for byte.
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for dir in ["scripts", "dashboards", "deploy/prometheus", "deploy/k8s", "deploy/proxy"] {
        std::fs::create_dir_all(t.join(dir)).unwrap();
    }
    std::fs::copy(repo("scripts/gen-k8s.sh"), t.join("scripts/gen-k8s.sh")).unwrap();
    std::fs::copy(repo("deploy/proxy/nginx.conf.in"), t.join("deploy/proxy/nginx.conf.in")).unwrap();
    std::fs::copy(
        repo("deploy/prometheus/alerts.yml"),
        t.join("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let mut jsons = BTreeSet::new();
    for e in std::fs::read_dir(repo("dashboards")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            std::fs::copy(e.path(), t.join("dashboards").join(&name)).unwrap();
            jsons.insert(name);
        }
    }
    let out = Command::new("bash")
        .arg(t.join("scripts/gen-k8s.sh"))
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "scripts/gen-k8s.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "deploy/k8s/dashboards-configmap.yaml",
        "deploy/k8s/prometheusrule.yaml",
        "deploy/k8s/router.yaml",
    ] {
        let want = std::fs::read_to_string(t.join(f)).unwrap();
        let have = read(f);
        assert!(
            have == want,
            "{f} is out of date: run scripts/gen-k8s.sh (it is generated from dashboards/*.json, deploy/prometheus/alerts.yml and deploy/proxy/nginx.conf.in)"
        );
    }

    // And what they hold: exactly the dashboards' JSON, exactly the rules.
    let cm = yaml("deploy/k8s/dashboards-configmap.yaml");
    let data = cm["data"].as_mapping().unwrap();
    let keys: BTreeSet<String> = data.keys().map(|k| s(k).to_string()).collect();
    assert_eq!(
        keys, jsons,
        "the ConfigMap holds every dashboards/*.json and nothing else: run scripts/gen-k8s.sh"
    );
    for k in &keys {
        assert!(
            s(&cm["data"][k.as_str()]) == read(&format!("dashboards/{k}")),
            "{k} differs from dashboards/{k}: run scripts/gen-k8s.sh"
        );
    }
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let size = read("deploy/k8s/dashboards-configmap.yaml").len();
    assert!(
        size < 256 * 1024,
        "the dashboards ConfigMap is {size} bytes: past 256 KiB `kubectl apply` (client side) cannot store it; split it or use --server-side"
    );
    let pr = yaml("deploy/k8s/prometheusrule.yaml");
    assert_eq!(
        pr["spec"],
        yaml("deploy/prometheus/alerts.yml"),
        "PrometheusRule spec differs from alerts.yml: run scripts/gen-k8s.sh"
    );
    // promtool accepts what the operator will load.
    let spec = t.join("spec.yml");
    std::fs::write(&spec, serde_yaml_ng::to_string(&pr["spec"]).unwrap()).unwrap();
    let (ok, out) = promtool(&["check", "rules", spec.to_str().unwrap()], None);
    assert!(ok, "promtool check rules (PrometheusRule spec):\n{out}");
}

// ---------------------------------------------------------------------------------------
// Kubernetes manifests.

struct K8s {
    /// `(file relative to deploy/k8s, document)`.
    docs: Vec<(String, Value)>,
}

impl K8s {
    fn load() -> K8s {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    out.push(p);
                }
            }
        }
        let base = repo("deploy/k8s");
        let mut files = Vec::new();
        walk(&base, &mut files);
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            let rel = f.strip_prefix(&base).unwrap().display().to_string();
            for d in yaml_docs(&f) {
                docs.push((rel.clone(), d));
            }
        }
        K8s { docs }
    }

    fn manifests(&self) -> impl Iterator<Item = &(String, Value)> {
        self.docs
            .iter()
            .filter(|(f, _)| !f.ends_with("kustomization.yaml") && !f.ends_with("-values.yaml"))
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.manifests()
            .map(|(_, d)| d)
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} under deploy/k8s"))
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (s(k).to_string(), s(v).to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// `(name, value)` of a container's env, `valueFrom` entries with an empty value.
fn container_env(c: &Value) -> Vec<(String, Option<String>)> {
    c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                s(&e["name"]).to_string(),
                e["value"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn kubernetes_manifests_reference_only_what_exists() {
    let k = K8s::load();
    for (f, d) in k.manifests() {
        assert!(
            d["apiVersion"].is_string()
                && d["kind"].is_string()
                && d["metadata"]["name"].is_string(),
            "{f}: apiVersion, kind and metadata.name"
        );
    }

    // Kustomizations: every resource exists; no manifest is left out of the base.
    let base = yaml("deploy/k8s/kustomization.yaml");
    let resources = strs(&base["resources"]);
    for r in &resources {
        assert!(
            repo("deploy/k8s").join(r).is_file(),
            "kustomization resource {r} does not exist"
        );
    }
    for e in std::fs::read_dir(repo("deploy/k8s")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                resources.contains(&name),
                "deploy/k8s/{name} is not listed in kustomization.yaml"
            );
        }
    }
    let scaling = yaml("deploy/k8s/scaling/kustomization.yaml");
    for r in strs(&scaling["resources"]) {
        let p = repo("deploy/k8s/scaling").join(&r);
        assert!(
            p.is_file() || p.join("kustomization.yaml").is_file(),
            "scaling resource {r} does not exist"
        );
    }

    // The Deployment.
    let dep = k.get("StatefulSet", "musetalk-sidecar");
    let pod = &dep["spec"]["template"];
    let pod_labels = labels(&pod["metadata"]["labels"]);
    assert!(
        subset(
            &labels(&dep["spec"]["selector"]["matchLabels"]),
            &pod_labels
        ),
        "selector matches the pod template"
    );
    let c = &pod["spec"]["containers"][0];
    let image = s(&c["image"]);
    let img = &base["images"][0];
    assert_eq!(
        format!("{}:{}", s(&img["name"]), s(&img["newTag"])),
        image,
        "kustomization images: retags the Deployment's image"
    );
    assert_eq!(
        image,
        format!("musetalk-sidecar:{VERSION}-musetalk"),
        "the Dockerfile's musetalk target, tagged as compose's GPU override tags it"
    );
    let ports: BTreeMap<String, u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                s(&p["name"]).to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports.get("http"), Some(&(SIDECAR_PORT as u64)));
    let env = container_env(c);
    let envm: BTreeMap<String, String> = env
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
        .collect();
    assert_eq!(
        envm["MUSETALK_SIDECAR_LISTEN"],
        format!("0.0.0.0:{SIDECAR_PORT}")
    );
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let g = &c[probe]["httpGet"];
        assert_eq!(s(&g["path"]), path, "{probe}");
        assert!(
            ports.contains_key(s(&g["port"])),
            "{probe} port {:?} is not a container port",
            g["port"]
        );
    }
    let gpu_limit = c["resources"]["limits"]["nvidia.com/gpu"]
        .as_u64()
        .expect("limits nvidia.com/gpu");
    assert!(gpu_limit >= 1);
    if let Some(req) = c["resources"]["requests"].get("nvidia.com/gpu") {
        assert_eq!(
            req.as_u64(),
            Some(gpu_limit),
            "extended resources: requests = limits"
        );
    }
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > humantime_secs(&envm["MUSETALK_SIDECAR_SHUTDOWN_GRACE"]),
        "terminationGracePeriodSeconds must exceed MUSETALK_SIDECAR_SHUTDOWN_GRACE"
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["spec"]["securityContext"]["runAsUser"].as_u64(),
        Some(10001),
        "the Dockerfile's user"
    );
    // Volumes: every mount has a volume; claims and ConfigMaps exist.
    let mut vols: BTreeMap<String, &Value> = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (s(&v["name"]).to_string(), v))
        .collect();
    // A StatefulSet's per-pod claims.
    for t in dep["spec"]["volumeClaimTemplates"].as_sequence().into_iter().flatten() {
        vols.insert(s(&t["metadata"]["name"]).to_string(), t);
    }
    let mut mounts = BTreeMap::new();
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let name = s(&m["name"]);
        let v = vols
            .get(name)
            .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            k.get("PersistentVolumeClaim", claim);
        }
        if let Some(cm) = v["configMap"]["name"].as_str() {
            k.get("ConfigMap", cm);
        }
        mounts.insert(
            s(&m["mountPath"]).to_string(),
            (name.to_string(), m["readOnly"] == true),
        );
    }
    let models = format!("{}/models", envm["MUSETALK_SIDECAR_MUSETALK_DIR"]);
    assert!(
        mounts.get(&models).is_some_and(|(_, ro)| *ro),
        "the weights are mounted read-only at {models}: {mounts:?}"
    );
    assert!(
        mounts.contains_key(&envm["MUSETALK_SIDECAR_DATA_DIR"]),
        "the data dir is a volume"
    );
    // $(VAR) references are defined earlier.
    for (i, (name, value)) in env.iter().enumerate() {
        for r in value.as_deref().unwrap_or_default().split("$(").skip(1) {
            let var = r.split(')').next().unwrap();
            assert!(
                env[..i].iter().any(|(n, _)| n == var),
                "{name} uses $({var}) before it is defined"
            );
        }
    }
    // Spans go to a Service of these manifests, on its OTLP gRPC port.
    let (host, port) = host_port(&envm["OTEL_EXPORTER_OTLP_ENDPOINT"]);
    let otel_svc = k.get("Service", &host);
    let sp = otel_svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_u64() == Some(port as u64))
        .unwrap_or_else(|| panic!("Service {host} has no port {port}"));
    assert_eq!(
        (s(&sp["name"]), envm["OTEL_EXPORTER_OTLP_PROTOCOL"].as_str()),
        ("otlp-grpc", "grpc")
    );

    // Services select pods that have the named target ports.
    for (f, svc) in k.manifests().filter(|(_, d)| d["kind"] == "Service") {
        let sel = labels(&svc["spec"]["selector"]);
        let deps: Vec<&Value> = k
            .manifests()
            .map(|(_, d)| d)
            .filter(|d| {
                (d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
                    && subset(&sel, &labels(&d["spec"]["template"]["metadata"]["labels"]))
            })
            .collect();
        assert_eq!(
            deps.len(),
            1,
            "{f}: Service {:?} selects {} Deployments",
            svc["metadata"]["name"],
            deps.len()
        );
        let cports: BTreeSet<String> = deps[0]["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|c| {
                c["ports"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|p| s(&p["name"]).to_string())
            })
            .collect();
        for p in svc["spec"]["ports"].as_sequence().unwrap() {
            assert!(
                cports.contains(s(&p["targetPort"])),
                "{f}: targetPort {:?} is no container port of the selected pods ({cports:?})",
                p["targetPort"]
            );
        }
    }
    // The sidecar Service: port 8000, named like prometheus.yml's job (job label = Service name).
    let svc = k.get("Service", "musetalk-sidecar");
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_u64(),
        Some(SIDECAR_PORT as u64)
    );
    assert_eq!(
        s(&yaml("prometheus.yml")["scrape_configs"][0]["job_name"]),
        "musetalk-sidecar"
    );
    // ServiceMonitor → that Service and port, /metrics.
    let sm = k.get("ServiceMonitor", "musetalk-sidecar");
    assert!(
        subset(
            &labels(&sm["spec"]["selector"]["matchLabels"]),
            &labels(&svc["metadata"]["labels"])
        ),
        "ServiceMonitor selects the sidecar Service"
    );
    let scraped: Vec<&Value> = k.manifests().map(|(_, d)| d).filter(|d| d["kind"] == "Service" && subset(&labels(&sm["spec"]["selector"]["matchLabels"]), &labels(&d["metadata"]["labels"]))).collect();
    assert_eq!(scraped.len(), 1, "the ServiceMonitor selects one Service: each pod scraped once");
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(s(&ep["port"]), s(&svc["spec"]["ports"][0]["name"]));
    assert_eq!(s(&ep["path"]), "/metrics");

    // The OTel Collector gateway: valid pipelines, ports as the Service and probes say.
    let occm = k.get("ConfigMap", "otel-collector");
    let ocfg: Value =
        serde_yaml_ng::from_str(s(&occm["data"]["config.yaml"])).expect("collector config parses");
    for (kind, list) in [
        ("receivers", "receivers"),
        ("processors", "processors"),
        ("exporters", "exporters"),
    ] {
        for (pname, pipe) in ocfg["service"]["pipelines"].as_mapping().unwrap() {
            for comp in strs(&pipe[list]) {
                assert!(
                    ocfg[kind].get(comp.as_str()).is_some(),
                    "pipeline {:?} uses undefined {kind} {comp}",
                    pname
                );
            }
        }
    }
    for ext in strs(&ocfg["service"]["extensions"]) {
        assert!(
            ocfg["extensions"].get(ext.as_str()).is_some(),
            "undefined extension {ext}"
        );
    }
    let ocdep = k.get("Deployment", "otel-collector");
    let occ = &ocdep["spec"]["template"]["spec"]["containers"][0];
    assert!(
        s(&occ["image"]).starts_with("otel/opentelemetry-collector-contrib:0."),
        "pinned collector image"
    );
    let ocports: BTreeMap<String, u64> = occ["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                s(&p["name"]).to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    for (proto, name) in [("grpc", "otlp-grpc"), ("http", "otlp-http")] {
        let (_, p) = host_port(s(
            &ocfg["receivers"]["otlp"]["protocols"][proto]["endpoint"],
        ));
        assert_eq!(
            ocports.get(name),
            Some(&(p as u64)),
            "collector {proto} receiver port"
        );
    }
    let (_, hp) = host_port(s(&ocfg["extensions"]["health_check"]["endpoint"]));
    assert_eq!(ocports.get("health"), Some(&(hp as u64)));
    let conf_mount = s(&occ["volumeMounts"][0]["mountPath"]);
    assert!(
        strs(&occ["args"]).contains(&format!("--config={conf_mount}/config.yaml")),
        "the collector reads the mounted config"
    );

    // HPA on the queue metric, served by prometheus-adapter.
    let hpa = k.get("HorizontalPodAutoscaler", "musetalk-sidecar");
    let target = &hpa["spec"]["scaleTargetRef"];
    k.get(s(&target["kind"]), s(&target["name"]));
    let metric = s(&hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]);
    let adapter = yaml("deploy/k8s/scaling/prometheus-adapter-values.yaml");
    let rule = adapter["rules"]["custom"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["name"]["as"] == metric)
        .unwrap_or_else(|| panic!("prometheus-adapter serves no {metric}"));
    let series = s(&rule["seriesQuery"])
        .split('{')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        series, "musetalk_jobs_queued",
        "the HPA scales on the queue metric"
    );
    assert!(labels(&svc["metadata"]["labels"]).contains_key("app.kubernetes.io/name"));

    // kube-prometheus-stack: exemplars, our selectors, remote write, dashboards, Jaeger.
    let kps = yaml("deploy/k8s/scaling/kube-prometheus-stack-values.yaml");
    let ps = &kps["prometheus"]["prometheusSpec"];
    assert!(strs(&ps["enableFeatures"]).contains(&"exemplar-storage".to_string()));
    assert!(
        subset(
            &labels(&ps["serviceMonitorSelector"]["matchLabels"]),
            &labels(&sm["metadata"]["labels"])
        ),
        "its Prometheus selects the ServiceMonitor"
    );
    let rule_cr = k.get("PrometheusRule", "musetalk-sidecar");
    assert!(
        subset(
            &labels(&ps["ruleSelector"]["matchLabels"]),
            &labels(&rule_cr["metadata"]["labels"])
        ),
        "its Prometheus selects the PrometheusRule"
    );
    let rw = &ps["remoteWrite"][0];
    assert!(
        s(&rw["url"]).ends_with("/api/v1/push") && rw["sendExemplars"] == true,
        "remote write to a long-term store, exemplars included"
    );
    let dash = &kps["grafana"]["sidecar"]["dashboards"];
    let cm = k.get("ConfigMap", "musetalk-dashboards");
    assert_eq!(
        cm["metadata"]["labels"][s(&dash["label"])],
        dash["labelValue"],
        "Grafana's sidecar picks up the dashboards ConfigMap"
    );
    assert!(
        cm["metadata"]["annotations"]
            .get(s(&dash["folderAnnotation"]))
            .is_some()
    );
    let dest = &kps["grafana"]["sidecar"]["datasources"]["exemplarTraceIdDestinations"];
    let jaeger = kps["grafana"]["additionalDataSources"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "jaeger")
        .expect("a Jaeger datasource");
    assert_eq!(dest["datasourceUid"], jaeger["uid"]);
    assert_eq!(s(&dest["traceIdLabelName"]), "trace_id");
    assert_eq!(s(&jaeger["url"]).rsplit_once(':').unwrap().1, "16686");

    // Third-party images are pinned.
    for (f, d) in k.manifests() {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let image = s(&c["image"]);
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(!tag.is_empty() && tag != "latest", "{f}: pin {image}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The settings the deploy files pass are real and the binary starts with them.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_settings_are_accepted_by_the_real_binary() {
    let help = help();
    let (_, stages) = dockerfile();
    // The image's own ENV, as far as it configures the sidecar (PATH and friends stay out).
    let image_env = |stage: &str| -> Vec<(String, String)> {
        stages
            .iter()
            .find(|s| s.name == stage)
            .unwrap()
            .env()
            .into_iter()
            .filter(|(k, _)| k.starts_with("MUSETALK_SIDECAR_") || k.starts_with("OTEL_"))
            .collect()
    };
    let compose = yaml("deploy/docker-compose.yml");
    let gpu = yaml("deploy/docker-compose.gpu.yml");
    let k = K8s::load();
    let dep = k.get("StatefulSet", "musetalk-sidecar");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];

    // (where, env as the container sees it: image ENV, then the file's own)
    let mut sets: Vec<(&str, Vec<(String, String)>)> = Vec::new();
    let mut compose_env = image_env("runtime");
    compose_env.extend(env_map(&compose["services"]["sidecar"]));
    sets.push(("docker-compose.yml (runtime image)", compose_env.clone()));
    let mut gpu_env = image_env("musetalk");
    gpu_env.extend(env_map(&compose["services"]["sidecar"]));
    gpu_env.extend(env_map(&gpu["services"]["sidecar"]));
    sets.push(("docker-compose.gpu.yml (musetalk image)", gpu_env));
    let k8s_env_raw = container_env(c);
    let helpers: BTreeSet<String> = k8s_env_raw
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| n.clone())
        .collect();
    let mut k8s_env = image_env("musetalk");
    for (name, value) in &k8s_env_raw {
        // Kubernetes expands $(VAR) from earlier entries; fieldRef values stand in here.
        let mut v = value
            .clone()
            // (a DNS label, as a pod's name is: MUSETALK_SIDECAR_INSTANCE_NAME is one)
            .unwrap_or_else(|| format!("{}-value", name.to_ascii_lowercase().replace('_', "-")));
        for h in &helpers {
            v = v.replace(
                &format!("$({h})"),
                &format!("{}-value", h.to_ascii_lowercase()),
            );
        }
        k8s_env.push((name.clone(), v));
    }
    sets.push(("k8s/deployment.yaml (musetalk image)", k8s_env));

    for (at, env) in &sets {
        let mut b = ServiceBuilder::new();
        for (name, value) in env {
            help.check_env_name(name, &helpers, at);
            // Paths of the image that do not exist here: the fixture MuseTalk tree and the
            // python3 on PATH stand in. Listen address and data dir come from the builder's flags.
            let value = match name.as_str() {
                "MUSETALK_SIDECAR_MUSETALK_DIR" => {
                    repo("tests/fixtures/musetalk").display().to_string()
                }
                "MUSETALK_SIDECAR_MUSETALK_PYTHON" => "python3".to_string(),
                "MUSETALK_SIDECAR_MUSETALK_WORKER_SCRIPT" => {
                    repo("worker/musetalk_worker.py").display().to_string()
                }
                _ => value.clone(),
            };
            b = b.env(name, value);
        }
        let svc = b.start().await;
        let ready = svc.wait_ready().await;
        let backend = env
            .iter()
            .rev()
            .find(|(k, _)| k == "MUSETALK_SIDECAR_BACKEND")
            .map(|(_, v)| v.as_str())
            .unwrap_or("preview");
        let listening = svc
            .wait_for_log("listening on http://", Duration::from_secs(5))
            .await;
        assert!(
            listening.contains(&format!("\"backend\":\"{backend}\"")),
            "{at}: the binary did not take MUSETALK_SIDECAR_BACKEND={backend}: {listening}"
        );
        assert_eq!(ready["ready"], true, "{at}: {ready}");
        // The HPA's metric is on /metrics from the start.
        if at.starts_with("k8s") {
            let text = svc.metrics_text().await;
            assert!(
                text.lines().any(|l| l.starts_with("musetalk_jobs_queued{")),
                "musetalk_jobs_queued (the HPA metric) is not on /metrics:\n{text}"
            );
        }
    }
}

/// The Kubernetes router is the shipped nginx configuration and agrees with the pods it
/// routes to: the headless Service it names gives the StatefulSet's pods their names,
/// which are their `--instance-name`s; the port is theirs; avatars are on a
/// ReadWriteMany claim every pod mounts at `--shared-dir`; and nginx accepts the file.
#[test]
fn k8s_router_agrees_with_the_sidecar_pods() {
    let k = K8s::load();
    let sts = k.get("StatefulSet", "musetalk-sidecar");
    let headless = s(&sts["spec"]["serviceName"]).to_string();
    let svc = k.get("Service", &headless);
    assert_eq!(s(&svc["spec"]["clusterIP"]), "None", "{headless} is headless");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], Value::Bool(true), "a draining pod still answers for its jobs");
    assert!(subset(&labels(&svc["spec"]["selector"]), &labels(&sts["spec"]["template"]["metadata"]["labels"])));
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let env: BTreeMap<String, &Value> = c["env"].as_sequence().unwrap().iter().map(|e| (s(&e["name"]).to_string(), e)).collect();
    assert_eq!(s(&env["MUSETALK_SIDECAR_INSTANCE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]), "metadata.name", "the pod's name is its instance name");
    let shared = s(&env["MUSETALK_SIDECAR_SHARED_DIR"]["value"]);
    let mount = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| s(&m["mountPath"]) == shared).expect("the shared dir is a mount");
    let vol = sts["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    let pvc = k.get("PersistentVolumeClaim", s(&vol["persistentVolumeClaim"]["claimName"]));
    assert!(pvc["spec"]["accessModes"].as_sequence().unwrap().iter().any(|m| m == "ReadWriteMany"), "pods on several nodes share it");
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();

    let cm = k.get("ConfigMap", "musetalk-router");
    let conf = s(&cm["data"]["nginx.conf.template"]);
    assert!(conf.contains(&format!("${{pod}}.{headless}.${{POD_NAMESPACE}}.svc.cluster.local:{port}")), "owners go to their pod's DNS name: {conf}");
    let sidecar_svc = k.get("Service", "musetalk-sidecar");
    assert!(conf.contains(&format!("server musetalk-sidecar:{};", sidecar_svc["spec"]["ports"][0]["port"].as_u64().unwrap())), "new work goes to the Service");
    let router = k.get("Deployment", "musetalk-router");
    let rc = &router["spec"]["template"]["spec"]["containers"][0];
    assert!(conf.contains(&format!("listen {};", rc["ports"][0]["containerPort"].as_u64().unwrap())));
    assert_eq!(s(&k.get("HorizontalPodAutoscaler", "musetalk-sidecar")["spec"]["scaleTargetRef"]["kind"]), "StatefulSet");

    // nginx accepts it, once the image's envsubst and the cluster's DNS names are stood in for.
    let nginx = ["nginx", "/usr/sbin/nginx"].into_iter().find(|n| Command::new(n).arg("-v").output().is_ok());
    let Some(nginx) = nginx else {
        panic!("nginx is needed (scripts/ensure-deps.sh nginx)");
    };
    let tmp = tempfile::tempdir().unwrap();
    let local = conf
        .replace("${POD_NAMESPACE}", "default")
        .replace("resolver kube-dns.kube-system.svc.cluster.local", "resolver 127.0.0.1")
        .replace("server musetalk-sidecar:", "server 127.0.0.1:")
        .replace("/tmp/", &format!("{}/", tmp.path().display()));
    std::fs::write(tmp.path().join("nginx.conf"), local).unwrap();
    let out = Command::new(nginx).args(["-t", "-q", "-e"]).arg(tmp.path().join("error.log")).arg("-p").arg(tmp.path()).arg("-c").arg(tmp.path().join("nginx.conf")).output().unwrap();
    assert!(out.status.success(), "nginx -t: {}", String::from_utf8_lossy(&out.stderr));
}
