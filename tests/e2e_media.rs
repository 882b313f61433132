//! Real-world media through the real binary: what browsers, phones and editors produce,
//! made here with ffmpeg — a MediaRecorder webm with no duration anywhere, opus alone,
//! variable frame rate, a rotated phone clip, a portrait still, 10-bit HEVC, 8 kHz mp3,
//! 5.1 flac — each through simple mode and the realtime preview flow. Every job must
//! succeed with an output as long as its audio, in the clip's displayed orientation, with
//! the frame count its report states. Then the preview's bounded-memory render (chunked
//! reverse), and renders that lost frames, which must fail rather than succeed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::media::{file_part, make};
use common::media::real_world::*;
use common::service::{Service, ServiceBuilder};
use reqwest::StatusCode;
use reqwest::multipart::Form;
use serde_json::Value;

/// `(frames, seconds, width, height)` of an output, by ffprobe (frames counted).
fn output_facts(path: &Path) -> (u64, f64, u32, u32) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries", "stream=nb_read_frames,width,height:format=duration", "-of", "json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    (
        s["nb_read_frames"].as_str().unwrap().parse().unwrap(),
        v["format"]["duration"].as_str().unwrap().parse().unwrap(),
        s["width"].as_u64().unwrap() as u32,
        s["height"].as_u64().unwrap() as u32,
    )
}

/// The audio's real length, measured by decoding it (the header may say nothing).
fn decoded_seconds(path: &Path) -> f64 {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "a:0", "-show_entries", "packet=pts_time,duration_time", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .unwrap();
    let (mut first, mut end) = (f64::INFINITY, 0.0f64);
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let mut c = l.split(',');
        let (Some(Ok(p)), d) = (c.next().map(str::parse::<f64>), c.next().and_then(|d| d.parse::<f64>().ok())) else { continue };
        first = first.min(p);
        end = end.max(p + d.unwrap_or(0.0));
    }
    end - first
}

async fn json(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}")))
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Checks one finished job: succeeded, output as long as the audio, orientation, frames.
async fn check_job(svc: &Service, what: &str, body: &Value, audio: &Path, portrait: bool) {
    assert_eq!(body["state"], "succeeded", "{what}: {body}\nlogs:\n{}", svc.logs());
    let out = tempfile::NamedTempFile::with_suffix(".mp4").unwrap();
    let bytes = svc.get(body["output_url"].as_str().unwrap()).await.bytes().await.unwrap();
    std::fs::write(out.path(), &bytes).unwrap();
    let (frames, seconds, w, h) = output_facts(out.path());
    let want = decoded_seconds(audio);
    // One frame (at most 25 fps here) and the AAC encoder's padding.
    assert!((seconds - want).abs() <= 0.09, "{what}: output lasts {seconds} s, the audio {want} s");
    assert_eq!(h > w, portrait, "{what}: output is {w}x{h}, the clip is {}", if portrait { "portrait" } else { "landscape" });
    let report = &body["report"]["media"];
    assert_eq!(report["output_frames"].as_u64(), Some(frames), "{what}: the report's frame count is the output's: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_world_media_succeed_in_both_modes_with_whole_outputs() {
    let svc = ServiceBuilder::new().start().await;
    svc.wait_ready().await;
    // (video, audio, displayed portrait?)
    let cases: Vec<(PathBuf, PathBuf, bool)> = vec![
        (recorder_webm(), recorder_opus(), false),
        (vfr_mkv(), mp3_8k(), false),
        (rotated_mp4(), flac_51(), true),
        (portrait_png(), wav(), true),
        (hevc10_mov(), recorder_opus(), false),
    ];
    for (n, (video, audio, portrait)) in cases.iter().enumerate() {
        let what = format!("simple {} + {}", name_of(video), name_of(audio));
        let form = Form::new().part("video", file_part(video, &name_of(video))).part("audio", file_part(audio, &name_of(audio)));
        let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        check_job(&svc, &what, &body, audio, *portrait).await;

        // The realtime preview flow with the same media.
        let id = format!("media{n}");
        let form = Form::new().part("video", file_part(video, &name_of(video))).text("avatar_id", id.clone());
        let (status, body) = json(svc.client().post(svc.url("/v1/avatars")).multipart(form).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "prepare {}: {body}", name_of(video));
        let deadline = Instant::now() + Duration::from_secs(30);
        let avatar = loop {
            let (_, a) = json(svc.get(&format!("/v1/avatars/{id}")).await).await;
            if a["state"] != "preparing" || Instant::now() > deadline {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(avatar["state"], "ready", "{}: {avatar}", name_of(video));
        if video.extension().is_some_and(|e| e == "png") {
            assert!(avatar["video_seconds"].is_null(), "a still has no duration: {avatar}");
            assert_eq!(avatar["video_frames"], 1, "{avatar}");
        } else {
            assert!(avatar["video_seconds"].as_f64().unwrap() > 1.0, "the clip's real length, measured where the header says none: {avatar}");
        }
        let (w, h) = (avatar["width"].as_u64().unwrap(), avatar["height"].as_u64().unwrap());
        assert_eq!(h > w, *portrait, "{}: the avatar's displayed size: {avatar}", name_of(video));
        let form = Form::new().part("audio", file_part(audio, &name_of(audio)));
        let (status, body) = json(svc.client().post(svc.url(&format!("/v1/avatars/{id}/speak"))).multipart(form).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "speak {}: {body}", name_of(audio));
        check_job(&svc, &format!("realtime {} + {}", name_of(video), name_of(audio)), &body, audio, *portrait).await;
    }
    // The recording's audio track is reported: the avatar made from the webm has one.
    let (_, a) = json(svc.get("/v1/avatars/media0").await).await;
    assert_eq!(a["has_audio"], true, "{a}");
}

/// The variable-frame-rate clip plays at its real speed: its first second is 30 frames,
/// then 10 fps; an output longer than the clip shows the clip's 4 s forward before turning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variable_frame_rate_clip_keeps_its_timing() {
    let svc = ServiceBuilder::new().start().await;
    svc.wait_ready().await;
    let video = vfr_mkv();
    let audio = common::media::sine(440, 6, 16_000);
    let form = Form::new().part("video", file_part(&video, "v.mkv")).part("audio", file_part(&audio, "a.wav"));
    let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!((body["report"]["media"]["video_seconds"].as_f64().unwrap() - 4.0).abs() < 0.15, "the clip lasts 4 s: {body}");
    let out = tempfile::NamedTempFile::with_suffix(".mp4").unwrap();
    std::fs::write(out.path(), svc.get(body["output_url"].as_str().unwrap()).await.bytes().await.unwrap()).unwrap();
    // The frame shown at 3.5 s of the output is the source's frame at 3.5 s (forward
    // part), not one from later in the clip (renumbering at the nominal rate raced ahead).
    let psnr = similarity(out.path(), 3.5, &video, 3.5);
    assert!(psnr > 30.0, "output at 3.5 s is not the source at 3.5 s (PSNR {psnr:.1} dB)");
}

/// PSNR (dB) between the frame of `a` at `ta` and the frame of `b` at `tb`.
fn similarity(a: &Path, ta: f64, b: &Path, tb: f64) -> f64 {
    let out = Command::new("ffmpeg")
        .args(["-v", "info", "-nostats", "-ss", &ta.to_string(), "-i"])
        .arg(a)
        .args(["-ss", &tb.to_string(), "-i"])
        .arg(b)
        .args(["-frames:v", "1", "-lavfi", "[0:v]scale=128:96,format=yuv420p[x];[1:v]scale=128:96,format=yuv420p[y];[x][y]psnr", "-f", "null", "-"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let avg = err.split("average:").nth(1).unwrap_or_else(|| panic!("no PSNR in: {err}"));
    let v = avg.split_whitespace().next().unwrap();
    if v == "inf" { 99.0 } else { v.parse().unwrap() }
}

/// PSNR (dB) between frame `na` of `a` and frame `nb` of `b`, picked by index.
fn frame_psnr(a: &Path, na: u64, b: &Path, nb: u64) -> f64 {
    let graph = format!("[0:v]select=eq(n\\,{na}),setpts=PTS-STARTPTS,format=yuv420p[x];[1:v]select=eq(n\\,{nb}),setpts=PTS-STARTPTS,format=yuv420p[y];[x][y]psnr");
    let out = Command::new("ffmpeg").args(["-v", "info", "-nostats", "-i"]).arg(a).arg("-i").arg(b).args(["-lavfi", &graph, "-frames:v", "1", "-f", "null", "-"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let avg = err.split("average:").nth(1).unwrap_or_else(|| panic!("no PSNR in: {err}"));
    let v = avg.split_whitespace().next().unwrap();
    if v == "inf" { 99.0 } else { v.parse().unwrap() }
}

/// The chunked plan, run for real through `preview-render` with a budget of 12 frames:
/// the clip is reversed in 12-frame chunks, and the output is forward, then backward,
/// then forward again, with every frame there.
#[test]
fn the_chunked_render_plays_forward_then_backward_with_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let video = make("testsrc-160x120-10fps-4s.mp4", &["-f", LAVFI, "-i", "testsrc=size=160x120:rate=10", "-t", "4", "-c:v", "libx264", "-pix_fmt", "yuv420p"]);
    let audio = common::media::sine(440, 10, 16_000);
    let out = dir.path().join("out.mp4");
    let frame = 160 * 120 * 3 / 2;
    let status = common::service::command()
        .args(["preview-render", "--ffmpeg", "ffmpeg", "--video"])
        .arg(&video)
        .arg("--audio")
        .arg(&audio)
        .arg("--out")
        .arg(&out)
        .arg("--work")
        .arg(dir.path())
        .args(["--fps", "10", "--seconds", "10.000", "--video-seconds", "4.000", "--width", "160", "--height", "120", "--budget", &(12 * frame).to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    let (frames, seconds, _, _) = output_facts(&out);
    assert_eq!(frames, 100, "10 s at 10 fps");
    assert!((seconds - 10.0).abs() < 0.1, "{seconds}");
    // Frame by frame: forward 0–39, backward 40–79 (source 39…0), forward again from 80.
    // Neighbouring testsrc frames differ by a few dB only, so each is compared with its
    // mirror and with the frame next to it.
    for (o, src) in [(10, 10), (40, 39), (43, 36), (51, 28), (52, 27), (63, 16), (64, 15), (75, 4), (79, 0), (80, 0), (95, 15)] {
        let right = frame_psnr(&out, o, &video, src);
        let next = frame_psnr(&out, o, &video, if src == 0 { 1 } else { src - 1 });
        assert!(right > 40.0 && right > next + 3.0, "output frame {o} should be source frame {src}: {right:.1} dB (next frame {next:.1} dB)");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).filter(|n| n != "out.mp4").collect();
    assert!(left.is_empty(), "intermediates removed: {left:?}");
}

/// A render that "succeeds" with frames missing — what a decoder out of memory did
/// (ffmpeg dropped 236 frames and still exited 0) — fails the job at output_discovery,
/// naming the cause. The fault is made at the lowest boundary: an ffmpeg that renders,
/// then cuts its output short and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_render_that_lost_frames_fails_instead_of_succeeding() {
    let dir = tempfile::tempdir().unwrap();
    let real = String::from_utf8(Command::new("sh").args(["-c", "command -v ffmpeg"]).output().unwrap().stdout).unwrap();
    let fake = dir.path().join("ffmpeg-losing-frames");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n# Render, then keep only the first second of the result, and report success.\n{real} \"$@\" || exit $?\nfor out; do :; done\ncase \"$out\" in *preview.mp4) {real} -v error -y -i \"$out\" -t 1 -c copy \"$out.cut.mp4\" && mv \"$out.cut.mp4\" \"$out\";; esac\nexit 0\n",
            real = real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let svc = ServiceBuilder::new().arg("--ffmpeg").arg(&fake).start().await;
    svc.wait_ready().await;
    let m = common::media::media();
    let form = Form::new().part("video", file_part(&m.video, "v.mp4")).part("audio", file_part(&m.audio, "a.wav"));
    let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "a damaged output must not succeed: {body}");
    assert_eq!(body["report"]["error"]["step"], "output_discovery", "{body}");
    let msg = body["report"]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("frames") && msg.contains("expected"), "{msg}");
    assert_eq!(body["report"]["outcome"], "failed");
}

/// Under a memory limit too small for the render (`ulimit -v`), the job fails with the
/// pipeline's error; it never ends `succeeded` with a damaged output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limited_render_never_succeeds_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let real = String::from_utf8(Command::new("sh").args(["-c", "command -v ffmpeg"]).output().unwrap().stdout).unwrap();
    let limited = dir.path().join("ffmpeg-limited");
    // 400 MB of address space: `ffmpeg -version` (the readiness probe) runs, but the
    // render's decoder and encoder threads do not all fit (on this 2-core machine the
    // H.264 decoder fails with "no frame!"; elsewhere thread creation may fail first).
    std::fs::write(&limited, format!("#!/bin/sh\nulimit -v 400000\nexec {} \"$@\"\n", real.trim())).unwrap();
    std::fs::set_permissions(&limited, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let svc = ServiceBuilder::new().arg("--ffmpeg").arg(&limited).start().await;
    svc.wait_ready().await;
    let video = common::media::video(640, 480, 25, 4);
    let audio = common::media::sine(440, 6, 16_000);
    let form = Form::new().part("video", file_part(&video, "v.mp4")).part("audio", file_part(&audio, "a.wav"));
    let (status, body) = json(svc.client().post(svc.url("/v1/inference")).multipart(form).send().await.unwrap()).await;
    if status == StatusCode::OK {
        // The limit sufficed after all: then the output must be whole.
        let out = tempfile::NamedTempFile::with_suffix(".mp4").unwrap();
        std::fs::write(out.path(), svc.get(body["output_url"].as_str().unwrap()).await.bytes().await.unwrap()).unwrap();
        let (frames, seconds, _, _) = output_facts(out.path());
        assert_eq!(frames, 150, "{body}");
        assert!((seconds - 6.0).abs() < 0.1);
        eprintln!("the limit sufficed here; the output is whole");
    } else {
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert_eq!(body["report"]["outcome"], "failed", "{body}");
        // ffmpeg either fails (subprocess_execution) or drops frames and exits 0, which
        // the output check catches (output_discovery); never success.
        let step = body["report"]["error"]["step"].as_str().unwrap_or_default();
        assert!(["subprocess_execution", "output_discovery"].contains(&step), "the step that failed is named: {body}");
        let msg = body["report"]["error"]["message"].as_str().unwrap();
        assert!(!msg.is_empty() && !msg.contains("progress=") && !msg.contains("frame="), "the pipeline's own error, not its progress lines: {msg}");
        eprintln!("failed as it should: {msg}");
    }
}
