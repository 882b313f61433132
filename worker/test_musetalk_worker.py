"""Protocol tests of the real MuseTalk worker, with its models class replaced by a fake.

The fake (FakeModels) stands in for MuseTalkModels at the one boundary the worker has:
MuseTalk's weights are not available here. Everything else is real: the Worker class,
the stage/progress/result/error events, the blending thread, ffmpeg encoding and muxing
(tiny PPM frames), and, in the subprocess tests, main()'s stdout redirection.

Run from the repository root (stdlib only; needs ffmpeg and ffprobe on PATH):
    python3 -m unittest -v worker/test_musetalk_worker.py
"""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import wave

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import musetalk_worker as mw  # noqa: E402

HAVE_FFMPEG = bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
PREPARE_STAGES = ["frame_extraction", "face_detection", "latent_encoding", "mask_generation"]
INFER_STAGES = ["audio_features", "unet_inference", "blending", "video_encoding", "audio_mux"]


# --------------------------------------------------------------------------------------
# The fake models: same interface as MuseTalkModels, stdlib only.
# A "video" is a JSON file {"frames": N, "no_face_at": K|null}; audio is a real WAV.
# Faults: the `fail` attribute (or FAKE_FAIL in the environment): "load", "batch:K",
# "blend:K", "exit" (audio_chunks calls sys.exit like MuseTalk's get_whisper_chunk);
# each fires once. FAKE_NOISE=1 adds raw writes to fd 1 (subprocess tests).
# --------------------------------------------------------------------------------------

def write_ppm(path, rgb, size=16):
    with open(path, "wb") as handle:
        handle.write(b"P6\n%d %d\n255\n" % (size, size))
        handle.write(bytes(rgb) * (size * size))


class FakeModels:
    frame_ext = "ppm"

    def __init__(self):
        self.fail = os.environ.get("FAKE_FAIL", "")
        self.calls = []

    def load(self, args):
        # Noise on every path to fd 1: Python's stdout, a raw write, a child process.
        print("fake: loading models via print()")
        if os.environ.get("FAKE_NOISE"):  # subprocess tests only: fd 1 is the test's own
            sys.stdout.flush()
            os.write(1, b"fake: raw write on fd 1\n")
            subprocess.run(["sh", "-c", "echo fake: child process writing to its stdout"])
        self.calls.append(("load", args.version))
        if self.fail == "load":
            raise RuntimeError("weights not found (fake)")
        return {"name": "fake", "version": "test", "device": "cpu"}

    def extract_frames(self, video_path, full_imgs_dir):
        with open(video_path, encoding="utf-8") as handle:
            self.spec = json.load(handle)
        os.makedirs(full_imgs_dir, exist_ok=True)
        paths = []
        for i in range(self.spec["frames"]):
            path = os.path.join(full_imgs_dir, "%08d.ppm" % i)
            write_ppm(path, (i * 40 % 256, 80, 160))
            paths.append(path)
        self.calls.append(("extract_frames", video_path, len(paths)))
        return paths

    def landmarks(self, paths, bbox_shift):
        self.calls.append(("landmarks", len(paths), bbox_shift))
        if self.spec.get("no_face_at") is not None:
            raise mw.RequestError("no face detected in frame %d" % self.spec["no_face_at"])
        return [[0, 0, 8, 8] for _ in paths], ["frame%d" % i for i in range(len(paths))]

    def encode_latents(self, coords, frames):
        self.calls.append(("encode_latents", len(frames)))
        return coords, ["latent:%s" % f for f in frames]

    def prepare_masks(self, frames, coords):
        self.calls.append(("prepare_masks", len(frames)))
        return ["mask:%s" % f for f in frames], [[0, 0, 16, 16] for _ in frames]

    def save_material(self, avatar_dir, material):
        with open(os.path.join(avatar_dir, "fake_material.json"), "w") as handle:
            json.dump([material.frames, material.coords, material.latents, material.masks,
                       material.mask_coords], handle)
        self.calls.append(("save_material", len(material)))

    def load_material(self, avatar_dir):
        with open(os.path.join(avatar_dir, mw.AVATAR_INFO)) as handle:
            info = json.load(handle)
        with open(os.path.join(avatar_dir, "fake_material.json")) as handle:
            parts = json.load(handle)
        self.calls.append(("load_material", avatar_dir))
        return mw.Material(*parts, info=info)

    def audio_chunks(self, audio_path, fps):
        if self.fail == "exit":
            self.fail = ""  # one-shot
            sys.exit()  # what MuseTalk's get_whisper_chunk does on a bad shape
        with wave.open(audio_path) as wav:
            seconds = wav.getnframes() / float(wav.getframerate())
        self.calls.append(("audio_chunks", fps))
        return list(range(int(math.floor(seconds * fps))))

    def generate_batches(self, chunks, latents, batch_size):
        self.calls.append(("generate_batches", len(chunks), batch_size))
        for number, start in enumerate(range(0, len(chunks), batch_size)):
            print("fake: batch %d (print to stdout)" % number)
            if self.fail == "batch:%d" % number:
                self.fail = ""  # one-shot
                raise RuntimeError("CUDA out of memory (fake)")
            yield [(i * 9 % 256, 200, 60) for i in chunks[start:start + batch_size]]

    def blend(self, material, idx, face):
        if self.fail == "blend:%d" % idx:
            self.fail = ""  # one-shot
            raise ValueError("bad face box (fake)")
        return face

    def write_frame(self, path, frame):
        write_ppm(path, frame)

    def after_error(self, exc):
        self.calls.append(("after_error", type(exc).__name__))
        return False


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def make_wav(path, seconds, rate=16000):
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"\x00\x00" * int(rate * seconds))


def ffprobe_json(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of",
                          "json", path], check=True, stdout=subprocess.PIPE).stdout
    return json.loads(out)


def worker_args(**overrides):
    args = mw.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


class Base(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="musetalk-worker-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.video = os.path.join(self.tmp, "source.json")
        with open(self.video, "w") as handle:
            json.dump({"frames": 5, "no_face_at": None}, handle)
        self.avatar_dir = os.path.join(self.tmp, "avatars", "alice")
        os.makedirs(self.avatar_dir)
        self.audio = os.path.join(self.tmp, "clip.wav")
        make_wav(self.audio, 1.0)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def prepare_request(self, rid="p1", **extra):
        request = {"id": rid, "op": "prepare", "traceparent": TRACEPARENT, "avatar_id": "alice",
                   "video_path": self.video, "avatar_dir": self.avatar_dir, "bbox_shift": 0}
        request.update(extra)
        return request

    def infer_request(self, rid="i1", **extra):
        request = {"id": rid, "op": "infer", "traceparent": TRACEPARENT, "avatar_id": "alice",
                   "avatar_dir": self.avatar_dir, "audio_path": self.audio,
                   "output_path": self.path("jobs", rid, "result", "output.mp4"),
                   "fps": 25, "batch_size": 4}
        request.update(extra)
        return request

    def serve(self, requests, models=None, args=None):
        """Runs Worker.serve in-process; returns (exit status, events, models)."""
        models = models or FakeModels()
        lines = [r if isinstance(r, str) else json.dumps(r) for r in requests]
        stdin = io.StringIO("".join(line + "\n" for line in lines))
        out = io.StringIO()
        worker = mw.Worker(models, args or worker_args())
        logs = io.StringIO()
        with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
            status = worker.serve(stdin, out)
        self.logs = logs.getvalue()
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        return status, events, models

    def of(self, events, rid):
        return [e for e in events if e.get("id") == rid]

    def assert_stages(self, events, rid, names):
        stage_events = [e for e in self.of(events, rid) if e["event"].startswith("stage_")]
        expected = []
        for name in names:
            expected += [("stage_start", name), ("stage_end", name)]
        self.assertEqual([(e["event"], e["name"]) for e in stage_events], expected)
        times = [e["t"] for e in stage_events]
        self.assertEqual(times, sorted(times), "t must be monotonic")
        for e in stage_events:
            self.assertEqual(e["traceparent"], TRACEPARENT)
            self.assertIsInstance(e["t"], float)


# --------------------------------------------------------------------------------------
# in-process protocol tests
# --------------------------------------------------------------------------------------

class ProtocolTests(Base):
    def test_ready_is_first_and_eof_exits_zero(self):
        status, events, _ = self.serve([])
        self.assertEqual(status, 0)
        self.assertEqual(len(events), 1)
        ready = events[0]
        self.assertEqual(ready["event"], "ready")
        self.assertEqual(ready["worker"]["name"], "fake")
        self.assertEqual(ready["worker"]["batch_size"], 20)
        self.assertEqual(ready["worker"]["fps"], 25)
        self.assertIn("pid", ready["worker"])
        self.assertIsInstance(ready["load_seconds"], float)

    def test_prepare(self):
        status, events, models = self.serve([self.prepare_request(bbox_shift=-7)])
        self.assertEqual(status, 0)
        self.assertEqual(events[0]["event"], "ready")
        self.assert_stages(events, "p1", PREPARE_STAGES)
        mine = self.of(events, "p1")
        self.assertEqual(mine[-1], {"event": "result", "id": "p1", "frames": 5})
        self.assertIn(("landmarks", 5, -7), models.calls)
        self.assertIn(("save_material", 10), models.calls, "cycle = forward + reversed")
        with open(os.path.join(self.avatar_dir, mw.AVATAR_INFO)) as handle:
            info = json.load(handle)
        self.assertEqual(info["frames"], 5)
        self.assertEqual(info["avatar_id"], "alice")
        self.assertEqual(len(os.listdir(os.path.join(self.avatar_dir, mw.FULL_IMGS))), 5)

    @unittest.skipUnless(HAVE_FFMPEG, "needs ffmpeg and ffprobe")
    def test_infer(self):
        status, events, models = self.serve([self.prepare_request(), self.infer_request()])
        self.assertEqual(status, 0)
        self.assert_stages(events, "i1", INFER_STAGES)
        mine = self.of(events, "i1")
        progress = [e for e in mine if e["event"] == "progress"]
        self.assertEqual([(p["done"], p["total"]) for p in progress],
                         [(n, 7) for n in range(1, 8)], "25 frames in batches of 4")
        # progress comes between unet_inference's start and end
        names = [(e["event"], e.get("name")) for e in mine]
        first = names.index(("progress", None))
        self.assertLess(names.index(("stage_start", "unet_inference")), first)
        self.assertLess(first + 6, names.index(("stage_end", "unet_inference")))
        result = mine[-1]
        self.assertEqual(result["event"], "result")
        output = self.path("jobs", "i1", "result", "output.mp4")
        self.assertEqual(result["output"], output)
        self.assertEqual(result["frames"], 25)
        self.assertAlmostEqual(result["seconds"], 1.0, delta=0.05)
        probe = ffprobe_json(output)
        video = [s for s in probe["streams"] if s["codec_type"] == "video"]
        audio = [s for s in probe["streams"] if s["codec_type"] == "audio"]
        self.assertEqual(video[0]["codec_name"], "h264")
        self.assertEqual(video[0]["pix_fmt"], "yuv420p")
        self.assertEqual(int(video[0]["nb_frames"]), 25)
        self.assertEqual(audio[0]["codec_name"], "aac")
        # the material came from memory (prepared by this worker), temp files are gone
        self.assertNotIn("load_material", [c[0] for c in models.calls])
        self.assertEqual(os.listdir(os.path.dirname(output)), ["output.mp4"])

    @unittest.skipUnless(HAVE_FFMPEG, "needs ffmpeg and ffprobe")
    def test_infer_streamed_writes_fragments_as_frames_are_blended(self):
        request = self.infer_request()
        request["stream"] = True
        status, events, _ = self.serve([self.prepare_request(), request])
        self.assertEqual(status, 0)
        # Protocol 2 says it streams.
        self.assertEqual((events[0]["protocol"], events[0]["capabilities"]), (2, ["stream"]))
        mine = self.of(events, "i1")
        # The encoder runs alongside the blending: no separate audio_mux stage.
        self.assert_stages(events, "i1", ["audio_features", "unet_inference", "blending", "video_encoding"])
        batches = [e for e in mine if e["event"] == "batch"]
        self.assertEqual([b["index"] for b in batches], list(range(7)))
        self.assertEqual(sum(b["frames"] for b in batches), 25)
        self.assertEqual(len([e for e in mine if e["event"] == "first_frame"]), 1)
        result = mine[-1]
        self.assertEqual((result["event"], result["frames"]), ("result", 25))
        self.assertAlmostEqual(result["seconds"], 1.0, delta=0.1)
        output = self.path("jobs", "i1", "result", "output.mp4")
        with open(output, "rb") as handle:
            self.assertIn(b"moof", handle.read(), "a fragmented MP4")
        probe = ffprobe_json(output)
        kinds = sorted(s["codec_type"] for s in probe["streams"])
        self.assertEqual(kinds, ["audio", "video"])
        decode = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", output, "-f", "null", "-"],
                                capture_output=True)
        self.assertEqual(decode.returncode, 0, decode.stderr)
        self.assertEqual(os.listdir(os.path.dirname(output)), ["output.mp4"])

    @unittest.skipUnless(HAVE_FFMPEG, "needs ffmpeg and ffprobe")
    def test_infer_defaults_and_material_from_disk(self):
        self.serve([self.prepare_request()])
        request = self.infer_request()
        del request["fps"], request["batch_size"]
        make_wav(self.audio, 2.0)
        status, events, models = self.serve([request])  # a fresh worker: reads the disk
        progress = [e for e in self.of(events, "i1") if e["event"] == "progress"]
        self.assertEqual([(p["done"], p["total"]) for p in progress], [(1, 3), (2, 3), (3, 3)])
        self.assertIn(("load_material", self.avatar_dir), models.calls)
        self.assertIn(("generate_batches", 50, 20), models.calls)
        self.assertIn(("audio_chunks", 25), models.calls)
        self.assertEqual(self.of(events, "i1")[-1]["frames"], 50)

    def test_infer_unprepared_avatar_is_an_error_and_worker_goes_on(self):
        status, events, _ = self.serve([self.infer_request("i0"), self.prepare_request("p2")])
        self.assertEqual(self.of(events, "i0"),
                         [{"event": "error", "id": "i0", "message":
                           "avatar is not prepared: %s is missing"
                           % os.path.join(self.avatar_dir, mw.AVATAR_INFO)}])
        self.assertEqual(self.of(events, "p2")[-1]["event"], "result")

    def test_prepare_error_ends_stage_then_error(self):
        with open(self.video, "w") as handle:
            json.dump({"frames": 3, "no_face_at": 0}, handle)
        status, events, _ = self.serve([self.prepare_request("p1")])
        mine = self.of(events, "p1")
        self.assertEqual([(e["event"], e.get("name")) for e in mine], [
            ("stage_start", "frame_extraction"), ("stage_end", "frame_extraction"),
            ("stage_start", "face_detection"), ("stage_end", "face_detection"),
            ("error", None)])
        self.assertEqual(mine[-1]["message"], "no face detected in frame 0")
        self.assertFalse(os.path.exists(os.path.join(self.avatar_dir, mw.AVATAR_INFO)))

    @unittest.skipUnless(HAVE_FFMPEG, "needs ffmpeg and ffprobe")
    def test_model_exception_is_an_error_and_worker_goes_on(self):
        models = FakeModels()
        models.fail = "batch:2"
        status, events, _ = self.serve(
            [self.prepare_request(), self.infer_request("bad"), self.infer_request("good")],
            models=models)
        bad = self.of(events, "bad")
        self.assertEqual(bad[-1], {"event": "error", "id": "bad",
                                   "message": "RuntimeError: CUDA out of memory (fake)"})
        self.assertEqual([e["done"] for e in bad if e["event"] == "progress"], [1, 2])
        self.assertEqual(bad[-2], dict(bad[-2], event="stage_end", name="unet_inference"))
        self.assertIn(("after_error", "RuntimeError"), models.calls)
        # the next request works (the fault was in batch 2 of the first request only)
        self.assertEqual(self.of(events, "good")[-1]["event"], "result")
        self.assertFalse(os.path.exists(self.path("jobs", "bad", "result", "output.mp4")))
        self.assertEqual(os.listdir(self.path("jobs", "bad", "result")), [],
                         "temporary frames are removed on failure")

    @unittest.skipUnless(HAVE_FFMPEG, "needs ffmpeg and ffprobe")
    def test_blend_failure_is_an_error(self):
        models = FakeModels()
        models.fail = "blend:5"
        status, events, _ = self.serve([self.prepare_request(), self.infer_request("b")],
                                       models=models)
        self.assertEqual(self.of(events, "b")[-1],
                         {"event": "error", "id": "b", "message": "ValueError: bad face box (fake)"})

    def test_sys_exit_inside_models_is_an_error_not_an_exit(self):
        models = FakeModels()
        models.fail = "exit"
        status, events, _ = self.serve(
            [self.prepare_request(), self.infer_request("x"), self.prepare_request("after")],
            models=models)
        self.assertEqual(status, 0)
        self.assertEqual(self.of(events, "x")[-1]["event"], "error")
        self.assertEqual(self.of(events, "after")[-1]["event"], "result")

    def test_unknown_op(self):
        status, events, _ = self.serve([{"id": "u1", "op": "dance"}, self.prepare_request()])
        self.assertEqual(self.of(events, "u1"),
                         [{"event": "error", "id": "u1", "message": "unknown op: 'dance'"}])
        self.assertEqual(self.of(events, "p1")[-1]["event"], "result")

    def test_malformed_lines_get_error_with_null_id(self):
        status, events, _ = self.serve(
            ["{not json", "[1, 2]", '{"op": "prepare"}', "", self.prepare_request()])
        errors = [e for e in events if e["event"] == "error"]
        self.assertEqual(len(errors), 3)
        for error in errors:
            self.assertIsNone(error["id"])
            self.assertTrue(error["message"].startswith("malformed request"), error)
        self.assertEqual(self.of(events, "p1")[-1]["event"], "result")

    def test_bad_fields(self):
        status, events, _ = self.serve([
            self.prepare_request("a", video_path=None),
            self.prepare_request("b", video_path=self.path("missing.mp4")),
            self.infer_request("c", batch_size=0),
            self.infer_request("d", fps="fast"),
            self.infer_request("e", audio_path=self.path("missing.wav")),
        ])
        messages = {e["id"]: e["message"] for e in events if e["event"] == "error"}
        self.assertEqual(messages["a"], "`video_path` is required (a path)")
        self.assertTrue(messages["b"].startswith("video not found"))
        self.assertIn("`batch_size` must be a positive integer", messages["c"])
        self.assertIn("`fps` must be a positive integer", messages["d"])
        self.assertTrue(messages["e"].startswith("audio not found"))
        self.assertEqual([e["event"] for e in events], ["ready"] + ["error"] * 5)

    def test_shutdown_exits_zero_and_reads_no_further(self):
        status, events, models = self.serve(
            [{"id": "s", "op": "shutdown"}, self.prepare_request()])
        self.assertEqual(status, 0)
        self.assertEqual([e["event"] for e in events], ["ready"])
        self.assertNotIn("extract_frames", [c[0] for c in models.calls])

    def test_parse_args_defaults(self):
        args = mw.parse_args([])
        self.assertEqual((args.batch_size, args.fps, args.version, args.gpu_id), (20, 25, "v15", 0))
        self.assertEqual(args.unet_model_path, "./models/musetalkV15/unet.pth")
        self.assertEqual(args.unet_config, "./models/musetalkV15/musetalk.json")
        v1 = mw.parse_args(["--version", "v1"])
        self.assertEqual(v1.unet_model_path, "./models/musetalk/pytorch_model.bin")
        self.assertEqual((args.extra_margin, args.parsing_mode, args.left_cheek_width,
                          args.right_cheek_width, args.dtype), (10, "jaw", 90, 90, "float16"))


# --------------------------------------------------------------------------------------
# subprocess tests: main() with its real fd handling
# --------------------------------------------------------------------------------------

LAUNCHER = (
    "import sys; sys.path[:0] = [%r]; "
    "import musetalk_worker, test_musetalk_worker as t; "
    "sys.exit(musetalk_worker.main(sys.argv[1:], models_factory=t.FakeModels))" % HERE
)


class SubprocessTests(Base):
    def run_worker(self, requests, env=None, timeout=60):
        full_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", FAKE_NOISE="1")
        full_env.update(env or {})
        stdin = "".join(json.dumps(r) + "\n" for r in requests)
        proc = subprocess.run([sys.executable, "-c", LAUNCHER], input=stdin.encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                              timeout=timeout)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    @unittest.skipUnless(HAVE_FFMPEG, "needs ffmpeg and ffprobe")
    def test_stdout_carries_only_protocol_lines(self):
        rc, out, err = self.run_worker([self.prepare_request(), self.infer_request(),
                                        {"id": "s", "op": "shutdown"}])
        self.assertEqual(rc, 0, err)
        lines = out.splitlines()
        self.assertTrue(lines)
        for line in lines:
            event = json.loads(line)  # every line is JSON ...
            self.assertIsInstance(event, dict)
            self.assertIn(event["event"], {"ready", "stage_start", "stage_end", "progress",
                                           "batch", "first_frame", "result",
                                           "error"})  # ... and a protocol event
        events = [json.loads(line) for line in lines]
        self.assertEqual(events[0]["event"], "ready")
        self.assertEqual([e["event"] for e in events if e["event"] in ("result", "error")],
                         ["result", "result"])
        # the noise went to stderr
        for noise in ("fake: loading models via print()", "fake: raw write on fd 1",
                      "fake: child process writing to its stdout", "fake: batch 0"):
            self.assertIn(noise, err)
            self.assertNotIn(noise, out)
        self.assertTrue(os.path.exists(self.path("jobs", "i1", "result", "output.mp4")))

    def test_eof_exits_zero(self):
        rc, out, err = self.run_worker([])
        self.assertEqual(rc, 0, err)
        self.assertEqual([json.loads(line)["event"] for line in out.splitlines()], ["ready"])

    def test_load_failure_exits_non_zero_without_ready(self):
        rc, out, err = self.run_worker([], env={"FAKE_FAIL": "load"})
        self.assertEqual(rc, mw.EXIT_LOAD_FAILED)
        self.assertEqual(out, "")
        self.assertIn("weights not found (fake)", err)

    def test_protocol_module_imports_without_heavy_modules(self):
        code = ("import sys; sys.path.insert(0, %r); import musetalk_worker; "
                "heavy = [m for m in ('torch', 'numpy', 'cv2', 'musetalk') if m in sys.modules]; "
                "print(heavy)" % HERE)
        out = subprocess.run([sys.executable, "-c", code], check=True,
                             stdout=subprocess.PIPE).stdout.decode().strip()
        self.assertEqual(out, "[]")


if __name__ == "__main__":
    unittest.main()
