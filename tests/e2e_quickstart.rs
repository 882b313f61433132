//! The README's quick start, run as written: every line of its `quickstart` block,
//! with the real ffmpeg, the real curl and the real CLI, against the real binary on
//! its defaults (the relative `./data` data dir included) in a fresh working directory.
//!
//! The lines are read from README.md itself, so the README and this test cannot drift:
//! a line this test does not know how to run fails it. The one change made to a line
//! is the address: `localhost:8000` becomes the test service's port. `JOB_ID` becomes
//! the id the inference line answered, as a reader would paste it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::service::{BIN, Service, ServiceBuilder};
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// One frame of the README's 25 fps clip: the output may differ from the audio by this.
const FRAME: f64 = 1.0 / 25.0;

/// The shell lines of README.md between `<!-- quickstart:begin -->` and `<!-- quickstart:end -->`,
/// split as a shell would (comments dropped).
fn quickstart_lines() -> Vec<(String, Vec<String>)> {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let begin = readme.find("<!-- quickstart:begin -->").expect("README.md has no <!-- quickstart:begin --> marker");
    let end = readme.find("<!-- quickstart:end -->").expect("README.md has no <!-- quickstart:end --> marker");
    let mut lines = Vec::new();
    let mut in_code = false;
    for line in readme[begin..end].lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        let argv = shell_words::split(line).unwrap_or_else(|e| panic!("README quick start line {line:?}: {e}"));
        if !argv.is_empty() {
            lines.push((line.to_string(), argv));
        }
    }
    assert!(lines.len() >= 6, "the quick start block lost its lines: {lines:?}");
    lines
}

/// The arguments `scripts/run.sh` gives the binary: it must still be `serve` with the
/// user's extra arguments and nothing else, or this test no longer runs what it runs.
fn run_sh_serves_with_defaults() {
    let script = std::fs::read_to_string(Path::new(REPO).join("scripts/run.sh")).unwrap();
    let exec = script.lines().find(|l| l.trim_start().starts_with("exec ")).expect("scripts/run.sh has no exec line");
    assert_eq!(
        exec.trim(),
        r#"exec cargo run --release -- serve "$@""#,
        "scripts/run.sh runs the service differently now: make this test start it the same way"
    );
}

struct Ran {
    line: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn show(&self) -> String {
        format!("`{}` exited {:?}\n--- stdout\n{}\n--- stderr\n{}", self.line, self.code, self.stdout, self.stderr)
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.show()))
    }
}

/// A reader's terminal: a directory of their own, typing the README's lines.
struct Terminal {
    dir: PathBuf,
    address: String,
    job_id: Option<String>,
}

impl Terminal {
    async fn type_line(&self, line: &str, argv: &[String]) -> Ran {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                let a = a.replace("localhost:8000", &self.address);
                match &self.job_id {
                    Some(id) => a.replace("JOB_ID", id),
                    None => a,
                }
            })
            .collect();
        let mut cmd = match argv[0].as_str() {
            "ffmpeg" | "curl" => tokio::process::Command::new(&argv[0]),
            // What `scripts/run.sh` built (`cargo run --release`); here the test's build.
            "target/release/musetalk-sidecar" => {
                let mut c = tokio::process::Command::new(BIN);
                // Its default server is 127.0.0.1:8000; the test's service is elsewhere.
                c.env("MUSETALK_SIDECAR_SERVER", format!("http://{}", self.address)).env("NO_COLOR", "1");
                c
            }
            other => panic!("the README quick start runs `{other}`, which this test does not know how to run: {line}"),
        };
        let out = cmd.args(&argv[1..]).current_dir(&self.dir).stdin(std::process::Stdio::null()).output().await.unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
        Ran {
            line: line.to_string(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Requires `path` to be a playable H.264 video as long as `audio` (±1 frame).
fn plays_as_long_as(path: &Path, audio: &Path, what: &str) {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries", "stream=codec_name", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: ffprobe cannot read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "h264", "{what}: no H.264 video stream");
    // Decodes to the end without an error.
    let decode = std::process::Command::new("ffmpeg").args(["-v", "error", "-xerror", "-i"]).arg(path).args(["-f", "null", "-"]).output().unwrap();
    assert!(decode.status.success() && decode.stderr.is_empty(), "{what}: does not decode: {}", String::from_utf8_lossy(&decode.stderr));
    let (got, want) = (common::media::duration(path), common::media::duration(audio));
    assert!((got - want).abs() <= FRAME + 1e-6, "{what}: lasts {got} s, the audio {want} s");
}

/// Types every quick-start line in a fresh directory against `svc`, checking what each one
/// promises; then requires that every promise was checked.
async fn follow_the_quick_start(svc: &Service) {
    let dir = tempfile::Builder::new().prefix("musetalk-reader-").tempdir().unwrap();
    let mut term = Terminal { dir: dir.path().to_path_buf(), address: svc.addr().to_string(), job_id: None };
    let voice = term.dir.join("voice.wav");
    let mut seen: Vec<&str> = Vec::new();
    for (line, argv) in quickstart_lines() {
        let mut ran = term.type_line(&line, &argv).await;
        let logs = || svc.logs();
        // What the line does (its comment aside).
        let words = argv.join(" ");
        let is = |needle: &str| words.contains(needle);
        if argv[0] == "ffmpeg" {
            assert_eq!(ran.code, Some(0), "{}", ran.show());
            let out = term.dir.join(argv.last().unwrap());
            assert!(out.is_file(), "{} made no {}", line, out.display());
            continue;
        }
        if argv[0] == "curl" && is("/v1/avatars/alice") && !is("speak") && !is("-F") {
            // "repeat until then": the reader polls the avatar until it is ready.
            let deadline = Instant::now() + Duration::from_secs(60);
            while ran.json()["state"] == "preparing" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                ran = term.type_line(&line, &argv).await;
            }
        }
        assert_eq!(ran.code, Some(0), "{}\nservice logs:\n{}", ran.show(), logs());
        if is("/v1/inference") {
            let v = ran.json();
            assert_eq!(v["state"], "succeeded", "{}\nservice logs:\n{}", ran.show(), logs());
            term.job_id = Some(v["job_id"].as_str().unwrap().to_string());
            seen.push("inference");
        } else if is("/report") {
            assert!(ran.stdout.contains("SUCCEEDED"), "{}", ran.show());
            assert!(ran.stdout.contains(term.job_id.as_deref().unwrap()), "{}", ran.show());
            seen.push("report");
        } else if is("-o out.mp4") {
            plays_as_long_as(&term.dir.join("out.mp4"), &voice, &line);
            seen.push("output");
        } else if is("/metrics") {
            assert!(ran.stdout.contains(r#"musetalk_jobs_total{mode="simple",backend="preview",outcome="succeeded"} 1"#), "{}", ran.show());
            seen.push("metrics");
        } else if is("avatar_id=alice") {
            let v = ran.json();
            assert_eq!(v["avatar"]["avatar_id"], "alice", "{}", ran.show());
            seen.push("prepare");
        } else if is("/speak") {
            let v = ran.json();
            assert_eq!(v["state"], "succeeded", "{}\nservice logs:\n{}", ran.show(), logs());
            let url = format!("http://{}{}", term.address, v["output_url"].as_str().unwrap());
            let bytes = svc.client().get(&url).send().await.unwrap().bytes().await.unwrap();
            let spoken = term.dir.join("spoken.mp4");
            std::fs::write(&spoken, &bytes).unwrap();
            plays_as_long_as(&spoken, &voice, &line);
            seen.push("speak");
        } else if is("/v1/avatars/alice") {
            assert_eq!(ran.json()["state"], "ready", "{}\nservice logs:\n{}", ran.show(), logs());
            seen.push("avatar ready");
        } else if argv[0] == "target/release/musetalk-sidecar" && argv[1] == "infer" {
            assert!(ran.stdout.contains("SUCCEEDED"), "{}", ran.show());
            plays_as_long_as(&term.dir.join("clip_voice.mp4"), &voice, &line);
            seen.push("infer");
        }
    }
    for promise in ["inference", "report", "output", "metrics", "prepare", "avatar ready", "speak", "infer"] {
        assert!(seen.contains(&promise), "the quick start no longer shows `{promise}` (checked: {seen:?})");
    }
}

/// As `scripts/run.sh` starts it: `serve` and nothing else (the port aside), in a fresh
/// working directory, so the data dir is the relative default `./data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_works_on_the_defaults() {
    run_sh_serves_with_defaults();
    let svc = ServiceBuilder::new().bare().start().await;
    svc.wait_ready().await;
    follow_the_quick_start(&svc).await;
    assert!(svc.data_dir().join("jobs").is_dir(), "the jobs live under the default ./data of the service's directory");
}

/// A relative `--data-dir` given by hand, the service started in another directory than
/// the one the reader's files are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_works_with_a_relative_data_dir_from_another_directory() {
    let svc = ServiceBuilder::new().bare().args(["--data-dir", "data"]).start().await;
    svc.wait_ready().await;
    follow_the_quick_start(&svc).await;
    assert!(svc.data_dir().join("avatars").join("alice").is_dir(), "the avatar lives under the service's data/");
}
