//! The persistent probe helper (`musetalk-probe-helper`) against ffprobe, file for file:
//! real-world media, broken files and the fuzzer's regressions must get the same facts
//! and the same verdicts from both. Then what a helper does wrong: one that aborts on a
//! crafted file, one that hangs, one that cannot start — each answered clearly, the
//! next probe served, and through the real binary the service alive.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::media::{file_part, media, real_world};
use common::prometheus::sample;
use common::service::{ServiceBuilder, json};
use musetalk_sidecar::pipeline::media::{self, MediaInfo, ProbeError};
use musetalk_sidecar::pipeline::prober::Prober;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};

const HELPER: &str = env!("CARGO_BIN_EXE_musetalk-probe-helper");

fn ffprobe() -> Prober {
    Prober::ffprobe(Path::new("ffprobe"), Duration::from_secs(30))
}

fn helper() -> Prober {
    Prober::helper(Path::new(HELPER), Path::new("/nonexistent/ffprobe"), Duration::from_secs(30))
}

/// What a job would learn of a file, as comparable text: the three probes the service
/// runs (an upload's video and audio checks, an output's headers).
async fn facts(p: &Prober, path: &Path) -> Vec<String> {
    let show = |r: Result<MediaInfo, ProbeError>| match r {
        Ok(mut m) => {
            // ffprobe prints times with 6 decimals; the helper keeps them whole.
            m.duration_secs = (m.duration_secs * 1e4).round() / 1e4;
            format!("{m:?}")
        }
        Err(e) => format!("{e}"),
    };
    vec![show(media::probe_decoding(p, path, true).await), show(media::probe_decoding(p, path, false).await), show(media::probe(p, path).await)]
}

/// The file parts of a fuzzer's multipart body (boundary `X`).
fn file_parts(body: &[u8]) -> Vec<Vec<u8>> {
    let delim = b"\r\n--X";
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(delim.len()).position(|w| w == delim) {
        let part = &rest[..at];
        if let Some(h) = part.windows(4).position(|w| w == b"\r\n\r\n")
            && part[..h].windows(9).any(|w| w == b"filename=")
        {
            parts.push(part[h + 4..].to_vec());
        }
        rest = &rest[at + delim.len()..];
    }
    parts
}

/// Broken variants of the standard clip, as uploads arrive broken.
fn broken(dir: &Path) -> Vec<(String, PathBuf)> {
    let video = std::fs::read(&media().video).unwrap();
    let mut out = Vec::new();
    let mut put = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        out.push((name.to_string(), p));
    };
    put("truncated.mp4", video[..video.len() / 3].to_vec());
    let mut xored = video.clone();
    xored.iter_mut().skip(8).step_by(3).for_each(|b| *b ^= 0x5a);
    put("corrupt.mp4", xored);
    let mut garbage = video.clone();
    let mdat = garbage.windows(4).position(|w| w == b"mdat").unwrap();
    let end = (mdat + 4096).min(garbage.len());
    garbage[mdat + 8..end].iter_mut().for_each(|b| *b = 0xff);
    put("mdat-garbage.mp4", garbage);
    put("text.mp4", b"this is not a video, just words\n".to_vec());
    put("empty.mp4", Vec::new());
    put("riff-lie.wav", b"RIFF but not really".to_vec());
    put("m3u8-to-elsewhere.m3u8", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n".to_vec());
    // A playlist of another job's upload (a local file with a media extension).
    let other = media().video.display().to_string();
    put("m3u8-to-another-upload.m3u8", format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{other}\n#EXT-X-ENDLIST\n").into_bytes());
    put("ffconcat-to-another-upload.txt", format!("ffconcat version 1.0\nfile '{other}'\n").into_bytes());
    put("m3u8-over-http.m3u8", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n".to_vec());
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/multipart_raw");
    for entry in std::fs::read_dir(&fuzz).unwrap().flatten() {
        for (i, part) in file_parts(&std::fs::read(entry.path()).unwrap()).into_iter().enumerate() {
            put(&format!("fuzz-{}-{i}", entry.file_name().to_string_lossy()), part);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helper_says_what_ffprobe_says_about_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<(String, PathBuf)> = real_world::all().into_iter().map(|(n, p)| (n.to_string(), p)).collect();
    files.push(("standard clip".into(), media().video.clone()));
    files.push(("standard audio".into(), media().audio.clone()));
    let broken = broken(dir.path());
    assert!(broken.len() >= 13, "the fuzz regressions are there: {}", broken.len());
    files.extend(broken);
    let (ffprobe, helper) = (ffprobe(), helper());
    assert!(helper.describe().await.is_ok_and(|d| d.contains("libavformat")), "{:?}", helper.describe().await);
    let mut differ = Vec::new();
    let (mut refused, mut accepted) = (0, 0);
    for (name, path) in &files {
        let (a, b) = (facts(&ffprobe, path).await, facts(&helper, path).await);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            // Where ffprobe exits 1 saying nothing, the helper says which decoder failed.
            let same = a == b || (a.ends_with("ffprobe failed") && b.contains("Could not open codec for input stream"));
            if a != b {
                eprintln!("{name}: ffprobe `{a}`, helper `{b}`");
            }
            if !same {
                differ.push(format!("{name} [{}]:\n  ffprobe: {a}\n  helper:  {b}", ["decode video", "decode audio", "headers"][i]));
            }
            if a.starts_with("MediaInfo") { accepted += 1 } else { refused += 1 }
        }
    }
    eprintln!("{} files, {accepted} answers accepted, {refused} refused, {} differ", files.len(), differ.len());
    assert!(differ.is_empty(), "{} of {} answers differ:\n{}", differ.len(), files.len() * 3, differ.join("\n"));
    assert!(accepted >= 20 && refused >= 20, "both verdicts were tested: {accepted} accepted, {refused} refused");
    // Lists of other files are refused (ffconcat refuses absolute paths by itself).
    for (list, says) in [("m3u8-to-another-upload.m3u8", "refers to other files"), ("ffconcat-to-another-upload.txt", "Unsafe file name")] {
        let path = dir.path().join(list);
        match media::probe_decoding(&helper, &path, true).await {
            Err(ProbeError::Unreadable(why)) => assert!(why.contains(says), "{list}: {why}"),
            other => panic!("{list} was taken as media: {other:?}"),
        }
    }
}

/// A helper that is the real one, except on a file that begins with `ABORT-MARKER` (it
/// aborts, as a decoder bug would) or `HANG-MARKER` (it never answers).
fn misbehaving_helper(dir: &Path) -> PathBuf {
    let script = dir.join("misbehaving-helper");
    std::fs::write(
        &script,
        format!(
            r#"#!/usr/bin/env python3
import json, os, resource, subprocess, sys, time
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort ends at once, however cores are collected
real = subprocess.Popen([{HELPER:?}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
sys.stdout.write(real.stdout.readline()); sys.stdout.flush()
for line in sys.stdin:
    with open(json.loads(line)["path"], "rb") as f:
        head = f.read(16)
    if head.startswith(b"ABORT-MARKER"):
        os.abort()
    if head.startswith(b"HANG-MARKER"):
        time.sleep(3600)
    real.stdin.write(line); real.stdin.flush()
    sys.stdout.write(real.stdout.readline()); sys.stdout.flush()
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_or_a_hang_refuses_that_file_and_the_next_probe_gets_a_new_helper() {
    let dir = tempfile::tempdir().unwrap();
    let script = misbehaving_helper(dir.path());
    let (abort, hang) = (dir.path().join("abort.mp4"), dir.path().join("hang.mp4"));
    std::fs::write(&abort, b"ABORT-MARKER and then some bytes").unwrap();
    std::fs::write(&hang, b"HANG-MARKER and then some bytes").unwrap();
    let prober = Prober::helper(&script, Path::new("/nonexistent/ffprobe"), Duration::from_secs(2));
    let good = &media().video;

    assert!(media::probe_decoding(&prober, good, true).await.unwrap().has_video);
    match media::probe_decoding(&prober, &abort, true).await {
        Err(ProbeError::Crashed(how)) => assert!(how.contains("SIGABRT"), "{how}"),
        other => panic!("a helper that aborted: {other:?}"),
    }
    assert!(media::probe_decoding(&prober, good, true).await.unwrap().has_video, "a new helper answers after the crash");

    let started = Instant::now();
    match media::probe_decoding(&prober, &hang, true).await {
        Err(ProbeError::Timeout(limit)) => assert_eq!(limit, Duration::from_secs(2)),
        other => panic!("a helper that hangs: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20), "bounded by --probe-timeout: {:?}", started.elapsed());
    assert!(media::probe_decoding(&prober, good, true).await.unwrap().has_video, "a new helper answers after the hang");

    // Concurrent probes while one helper crashes: only the crafted file is refused.
    let probes = (0..6).map(|i| {
        let (prober, path) = (prober.clone(), if i == 3 { abort.clone() } else { good.clone() });
        tokio::spawn(async move { media::probe_decoding(&prober, &path, true).await.map(|m| m.has_video) })
    });
    let results: Vec<_> = futures::future::join_all(probes).await.into_iter().map(Result::unwrap).collect();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(i == 3, r.is_err(), "probe {i}: {r:?}");
    }
}

#[tokio::test]
async fn a_helper_that_cannot_start_leaves_the_probing_to_ffprobe() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("helper-without-its-libraries");
    std::fs::write(&broken, "#!/bin/sh\necho 'error while loading shared libraries: libavformat.so.59' >&2\nexit 127\n").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    for program in [broken.as_path(), Path::new("/nonexistent/musetalk-probe-helper")] {
        let prober = Prober::helper(program, Path::new("ffprobe"), Duration::from_secs(30));
        let info = media::probe_decoding(&prober, &media().video, true).await.unwrap();
        assert!(info.has_video && info.frames == Some(50), "{info:?}");
        let why = prober.describe().await.unwrap_err();
        assert!(why.contains("ffprobe runs once per file"), "{why}");
    }
    // One that starts but dies on every file (an FFmpeg it was not built for): files ffprobe
    // reads are not refused for it, and after three such deaths helpers are set aside.
    let dies = dir.path().join("helper-that-dies-on-everything");
    std::fs::write(&dies, "#!/bin/sh\necho '{\"protocol\":1,\"ffmpeg\":\"libavformat 0.0.0\"}'\nread -r line\nkill -SEGV $$\n").unwrap();
    std::fs::set_permissions(&dies, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prober = Prober::helper(&dies, Path::new("ffprobe"), Duration::from_secs(30));
    for _ in 0..4 {
        assert!(media::probe_decoding(&prober, &media().video, true).await.unwrap().has_video);
    }
    let why = prober.describe().await.unwrap_err();
    assert!(why.contains("3 probe helpers in a row died on files ffprobe reads"), "{why}");
}

/// Through the real binary: the crafted upload gets a 400 naming the part, the service
/// stays up, and the next job succeeds on a new helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_refuses_a_file_that_crashes_its_helper_and_serves_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let script = misbehaving_helper(dir.path());
    let svc = ServiceBuilder::new().arg("--probe-helper").arg(&script).arg("--probe-timeout").arg("2s").start().await;
    svc.wait_ready().await;
    let form = |video: Part| Form::new().part("video", video).part("audio", file_part(&media().audio, "a.wav"));
    for (marker, says) in [("ABORT-MARKER", "crashed the media reader"), ("HANG-MARKER", "could not be read within 2 s")] {
        let crafted = Part::bytes(format!("{marker} crafted").into_bytes()).file_name("v.mp4");
        let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form(crafted)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "invalid_video", "{body}");
        assert!(body["detail"].as_str().unwrap().contains(says), "{body}");
        let good = file_part(&media().video, "v.mp4");
        let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form(good)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["state"], "succeeded", "{body}");
    }
    assert!(svc.try_exit_status().is_none(), "the service is up");
    let metrics = svc.metrics_text().await;
    let count = |result: &str| sample(&metrics, &format!(r#"musetalk_media_probes_total{{via="helper",result="{result}"}}"#)).unwrap_or(-1.0);
    assert_eq!((count("crashed"), count("timeout")), (1.0, 1.0), "{metrics}");
    assert!(count("ok") >= 6.0, "two jobs' uploads and outputs: {metrics}");
    assert_eq!(sample(&metrics, r#"musetalk_media_probes_total{via="ffprobe",result="ok"}"#), Some(0.0), "no probe fell back to ffprobe");
    assert!(svc.logs().contains("the probe helper died reading a file"), "the crash is in the log");
    let jobs = std::fs::read_dir(svc.data_dir().join("jobs")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(jobs, 2, "the refused uploads left nothing behind");
}
