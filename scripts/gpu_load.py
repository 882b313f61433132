#!/usr/bin/env python3
"""GPU load and measuring helpers for scripts/gpu-check.sh (run on a lent NVIDIA GPU machine).

Loads (what the sidecar serves and measures):

  worker   [--mem-gib N] [--matrix N] [--pidfile P]
           A realtime worker speaking docs/worker-protocol.md. Once started it holds N GiB
           of GPU memory (torch) and keeps the SMs busy with matmuls in a background thread
           until `shutdown`, EOF on stdin or SIGTERM. SIGUSR1 pauses the matmuls (memory
           stays held), SIGUSR2 resumes them. `prepare` and `infer` run GPU stages
           (`unet_inference`: matmuls, `blending`: device copies) and need ffmpeg for the mp4
           `infer` writes; without ffmpeg they answer `error`.
  pipeline --video V --audio A --output O [--mem-gib N] [--stage-seconds S]
           A `--backend command` pipeline: JSON stage lines on stdout, one stage per kind of
           GPU work (`gpu_alloc`, `matmul` gpu-bound, `device_copy` memory-bound,
           `pcie_copy` transfer-bound, `cpu_work` cpu-bound), then `video_encoding` with
           ffmpeg (the video looped to the audio's length and muxed with it) and `result`.
  burn     [--mem-gib N] [--seconds S]
           The same load standalone, for a manual look with nvidia-smi.

  Without torch or CUDA each load says so on stderr once ("no GPU load: ...") and does a
  CPU no-op instead (sleeps), so the whole path can be tested on a machine with no GPU.

Old monitor (the Python monitor this service replaced), as a load to measure:

  old-monitor [--interval 0.5] [--seconds 20] [--json P]
           every interval: psutil.cpu_percent(percpu=True), psutil.virtual_memory() and
           GPUtil's one nvidia-smi call; reports its own CPU (self + children) as % of a core.

Check helpers (each writes one JSON "step" file that `report` merges):

  free-port | wait-ready URL SECONDS | step-json FILE NAME STATUS REASON
  smi-summary FILE | parse-nvml-tests LOG FILE | parse-bench LOG FILE
  compare --metrics-url U --sidecar-pid P --worker-pid W --metrics-out M FILE
  smi-timing [--n 20] FILE | idle-cpu --pid P --seconds S --worker-pid W FILE
  job --url U --video V --audio A --report-out R FILE | report STEPDIR MD JSON

Only the standard library, plus torch (loads), psutil (old-monitor) and nvidia-ml-py
(`compare`: energy, PCIe and GPM references nvidia-smi does not print) where present.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

# ---------------------------------------------------------------------------------------
# GPU load (torch), degrading to a CPU no-op
# ---------------------------------------------------------------------------------------


def log(message):
    sys.stderr.write("gpu_load[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


class Gpu:
    """torch on cuda:0, or None with the reason it is absent."""

    def __init__(self):
        self.torch = None
        self.why_not = None
        try:
            import torch  # noqa: PLC0415 - optional
        except Exception as exc:  # noqa: BLE001 - any import failure means no GPU load
            self.why_not = "torch is not importable (%s: %s)" % (type(exc).__name__, exc)
            return
        if not torch.cuda.is_available():
            self.why_not = "torch %s sees no CUDA device" % torch.__version__
            return
        self.torch = torch

    @property
    def ok(self):
        return self.torch is not None

    def describe(self):
        if not self.ok:
            return {"device": "cpu", "load": "none", "why": self.why_not}
        t = self.torch
        return {"device": "cuda:0", "load": "matmul", "torch": t.__version__,
                "gpu": t.cuda.get_device_name(0)}


class Load:
    """Holds `mem_gib` of GPU memory and runs matmuls in a thread until stopped."""

    def __init__(self, gpu, mem_gib, matrix=8192):
        self.gpu = gpu
        self.mem_gib = mem_gib
        self.matrix = matrix
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.buf = None
        self.thread = None
        self.iterations = 0
        if not gpu.ok:
            log("no GPU load: %s; a CPU no-op instead (holds no GPU memory)" % gpu.why_not)
            return
        t = gpu.torch
        self.buf = t.empty(int(mem_gib * (1 << 30)), dtype=t.uint8, device="cuda")
        self.buf.fill_(1)  # touch it: the memory is really committed
        t.cuda.synchronize()
        log("holding %.2f GiB on %s" % (mem_gib, t.cuda.get_device_name(0)))

    def start(self):
        self.thread = threading.Thread(target=self._run, name="matmul", daemon=True)
        self.thread.start()

    def _run(self):
        if not self.gpu.ok:
            while not self.stop.wait(0.5):
                pass
            return
        t = self.gpu.torch
        n = self.matrix
        a = t.randn(n, n, device="cuda", dtype=t.bfloat16)
        b = t.randn(n, n, device="cuda", dtype=t.bfloat16)
        while not self.stop.is_set():
            if not self.running.is_set():
                self.running.wait(0.2)
                continue
            for _ in range(4):
                a @ b  # noqa: B018 - the work is the point
            t.cuda.synchronize()  # bounded queue: pausing takes effect within ~10 ms
            self.iterations += 4

    def pause(self, *_):
        self.running.clear()
        log("matmuls paused (memory still held)")

    def resume(self, *_):
        self.running.set()
        log("matmuls resumed")

    def close(self):
        self.stop.set()
        self.running.set()
        if self.thread:
            self.thread.join(timeout=5)
        self.buf = None


def gpu_stage(gpu, kind, seconds, mem_gib=1.0):
    """One stage's worth of a given kind of work for `seconds`; a sleep without a GPU."""
    end = time.monotonic() + seconds
    if kind == "cpu_work":
        x = 0
        while time.monotonic() < end:
            x = (x * 31 + 7) % 1000003
        return
    if not gpu.ok:
        time.sleep(seconds)
        return
    t = gpu.torch
    if kind == "matmul":
        a = t.randn(8192, 8192, device="cuda", dtype=t.bfloat16)
        b = t.randn(8192, 8192, device="cuda", dtype=t.bfloat16)
        while time.monotonic() < end:
            for _ in range(4):
                a @ b  # noqa: B018
            t.cuda.synchronize()
    elif kind == "device_copy":
        n = int(mem_gib * (1 << 30)) // 2
        src = t.empty(n, dtype=t.uint8, device="cuda")
        dst = t.empty_like(src)
        while time.monotonic() < end:
            for _ in range(8):
                dst.copy_(src)
            t.cuda.synchronize()
    elif kind == "pcie_copy":
        host = t.empty(256 << 20, dtype=t.uint8).pin_memory()
        dev = t.empty(256 << 20, dtype=t.uint8, device="cuda")
        while time.monotonic() < end:
            for _ in range(4):
                dev.copy_(host, non_blocking=True)
            t.cuda.synchronize()
    else:
        time.sleep(seconds)


def run_ffmpeg(args):
    ffmpeg = os.environ.get("FFMPEG") or shutil.which("ffmpeg")
    if not ffmpeg:
        raise RuntimeError("no ffmpeg on PATH: cannot write the mp4")
    proc = subprocess.run([ffmpeg, "-nostdin", "-y", "-v", "error"] + args,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError("ffmpeg failed: %s" % proc.stderr.decode("utf-8", "replace")[-400:])


def loop_and_mux(video, audio, output):
    """The video (or image) looped to the audio's length, muxed with it (H.264 + AAC)."""
    run_ffmpeg(["-stream_loop", "-1", "-i", video, "-i", audio, "-map", "0:v:0", "-map", "1:a:0",
                "-shortest", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-movflags", "+faststart", output])


def media_seconds(path):
    """The duration ffprobe gives (0.0 without ffprobe)."""
    ffprobe = os.environ.get("FFPROBE") or shutil.which("ffprobe")
    if not ffprobe:
        return 0.0
    p = subprocess.run([ffprobe, "-v", "error", "-show_entries", "format=duration", "-of", "default=nw=1:nk=1", path],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        return round(float(p.stdout.strip()), 3)
    except ValueError:
        return 0.0


# ---- worker (docs/worker-protocol.md) -------------------------------------------------


def cmd_worker(args):
    # Protocol hygiene: a private copy of fd 1 for events; fd 1 (print, children) → stderr.
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    started = time.monotonic()
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as fh:
            fh.write("%d\n" % os.getpid())
        os.replace(args.pidfile + ".tmp", args.pidfile)
    gpu = Gpu()
    load = Load(gpu, args.mem_gib, args.matrix)
    signal.signal(signal.SIGUSR1, load.pause)
    signal.signal(signal.SIGUSR2, load.resume)
    signal.signal(signal.SIGTERM, lambda *_: (load.close(), os._exit(0)))
    load.start()

    def emit(event, **fields):
        fields["event"] = event
        proto.write(json.dumps(fields) + "\n")
        proto.flush()

    def stage(rid, name, tp, work):
        emit("stage_start", id=rid, name=name, t=time.monotonic(), traceparent=tp)
        try:
            return work()
        finally:
            emit("stage_end", id=rid, name=name, t=time.monotonic(), traceparent=tp)

    info = {"name": "gpu_load", "version": "1", "pid": os.getpid(), "mem_gib": args.mem_gib,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")}
    info.update(gpu.describe())
    emit("ready", worker=info, load_seconds=round(time.monotonic() - started, 3))
    log("ready: %s" % json.dumps(info))
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                req = json.loads(line)
            except ValueError as exc:
                emit("error", id=None, message="malformed request: %s" % exc)
                continue
            if not isinstance(req, dict):
                emit("error", id=None, message="malformed request: not a JSON object")
                continue
            op, rid, tp = req.get("op"), req.get("id"), req.get("traceparent")
            if op == "shutdown":
                break
            if not isinstance(rid, str) or not rid:
                emit("error", id=None, message="malformed request: missing string `id`")
                continue
            try:
                if op == "prepare":
                    avatar_dir = req["avatar_dir"]
                    os.makedirs(avatar_dir, exist_ok=True)
                    stage(rid, "latent_encoding", tp, lambda: gpu_stage(gpu, "matmul", 1.0))
                    with open(os.path.join(avatar_dir, "avatar_info.json"), "w") as fh:
                        json.dump({"video_path": req["video_path"], "by": "gpu_load"}, fh)
                    emit("result", id=rid, frames=1)
                elif op == "infer":
                    info_path = os.path.join(req["avatar_dir"], "avatar_info.json")
                    if not os.path.exists(info_path):
                        raise RuntimeError("avatar is not prepared: %s is missing" % info_path)
                    with open(info_path) as fh:
                        video = json.load(fh)["video_path"]
                    stage(rid, "unet_inference", tp, lambda: gpu_stage(gpu, "matmul", 2.0))
                    stage(rid, "blending", tp, lambda: gpu_stage(gpu, "device_copy", 1.0))
                    out = req["output_path"]
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    stage(rid, "video_encoding", tp, lambda: loop_and_mux(video, req["audio_path"], out))
                    seconds = media_seconds(out)
                    emit("result", id=rid, output=out, frames=int(seconds * req.get("fps", 25)), seconds=seconds)
                else:
                    emit("error", id=rid, message="unknown op: %r" % (op,))
            except Exception as exc:  # noqa: BLE001 - the worker stays usable
                log("%s failed: %r" % (rid, exc))
                emit("error", id=rid, message="%s: %s" % (type(exc).__name__, exc))
    except BrokenPipeError:
        pass
    log("stopping after %d matmul iterations" % load.iterations)
    load.close()
    return 0


# ---- pipeline (--backend command) -----------------------------------------------------


def cmd_pipeline(args):
    gpu = Gpu()
    if not gpu.ok:
        log("no GPU load: %s; the GPU stages are sleeps" % gpu.why_not)

    def event(**fields):
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    hold = None
    try:
        s = args.stage_seconds
        for name, kind in (("gpu_alloc", "alloc"), ("matmul", "matmul"), ("device_copy", "device_copy"),
                           ("pcie_copy", "pcie_copy"), ("cpu_work", "cpu_work")):
            event(event="stage_start", name=name)
            if kind == "alloc":
                if gpu.ok:
                    hold = gpu.torch.empty(int(args.mem_gib * (1 << 30)), dtype=gpu.torch.uint8, device="cuda")
                    hold.fill_(1)
                    gpu.torch.cuda.synchronize()
                else:
                    time.sleep(0.2)
            else:
                gpu_stage(gpu, kind, s, args.mem_gib)
            event(event="stage_end", name=name)
        event(event="stage_start", name="video_encoding")
        loop_and_mux(args.video, args.audio, args.output)
        event(event="stage_end", name="video_encoding")
    except Exception as exc:  # noqa: BLE001 - reported to the sidecar
        event(event="error", message="%s: %s" % (type(exc).__name__, exc))
        return 1
    finally:
        hold = None  # noqa: F841
    event(event="result", output=args.output)
    return 0


def cmd_burn(args):
    gpu = Gpu()
    load = Load(gpu, args.mem_gib, args.matrix)
    load.start()
    signal.signal(signal.SIGTERM, lambda *_: load.stop.set())
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not load.stop.is_set():
        time.sleep(0.2)
    load.close()
    log("burn done: %d matmul iterations" % load.iterations)
    return 0


# ---------------------------------------------------------------------------------------
# The old Python monitor, as a load to measure
# ---------------------------------------------------------------------------------------

# Exactly the query GPUtil.getGPUs() runs, once per sample.
GPUTIL_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,utilization.gpu,memory.total,memory.used,"
                "memory.free,driver_version,name,gpu_serial,display_active,display_mode,"
                "temperature.gpu", "--format=csv,noheader,nounits"]


def cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def cmd_old_monitor(args):
    try:
        import psutil  # noqa: PLC0415 - optional
    except ImportError as exc:
        result = {"status": "failed", "reason": "psutil is not installed (%s)" % exc}
        write_json(args.json, result) if args.json else print(json.dumps(result))
        return 1
    psutil.cpu_percent(percpu=True)
    self0, child0 = cpu_seconds()
    t0 = time.monotonic()
    samples, smi_fail, smi_wall = 0, 0, 0.0
    next_at = t0
    while time.monotonic() - t0 < args.seconds:
        psutil.cpu_percent(percpu=True)
        psutil.virtual_memory()
        s = time.monotonic()
        try:
            p = subprocess.Popen(GPUTIL_QUERY, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            p.communicate()
            smi_fail += p.returncode != 0
        except OSError:
            smi_fail += 1
        smi_wall += time.monotonic() - s
        samples += 1
        next_at += args.interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    wall = time.monotonic() - t0
    self1, child1 = cpu_seconds()
    result = {"status": "ok", "samples": samples, "interval_s": args.interval, "wall_s": round(wall, 3),
              "cpu_self_s": round(self1 - self0, 4), "cpu_children_s": round(child1 - child0, 4),
              "cpu_pct_of_core": round(100 * ((self1 - self0) + (child1 - child0)) / wall, 3),
              "nvidia_smi_failures": smi_fail,
              "nvidia_smi_mean_wall_ms": round(1000 * smi_wall / max(samples, 1), 2)}
    write_json(args.json, result) if args.json else print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------
# Check helpers
# ---------------------------------------------------------------------------------------


def write_json(path, data):
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(path + ".tmp", path)


def http(url, data=None, headers=None, timeout=10):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def cmd_free_port(_):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def alive(pid):
    """pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_wait_ready(args):
    deadline, last = time.monotonic() + args.seconds, "no answer"
    while time.monotonic() < deadline:
        if args.pid and not alive(args.pid):
            print("the service exited before it was ready (last answer: %s)" % last)
            return 1
        try:
            status, body = http(args.url, timeout=2)
            if status == 200:
                print("ready after %.1f s" % (args.seconds - (deadline - time.monotonic())))
                return 0
            last = "%d %s" % (status, body.decode("utf-8", "replace")[:600])
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    print("not ready within %d s: %s" % (args.seconds, last))
    return 1


def cmd_step_json(args):
    write_json(args.file, {"step": args.name, "status": args.status, "reason": args.reason})
    return 0


def smi(args, timeout=15):
    """(returncode, stdout, stderr, wall seconds) of nvidia-smi ARGS."""
    t = time.monotonic()
    try:
        p = subprocess.run(["nvidia-smi"] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"), time.monotonic() - t
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, "", str(exc), time.monotonic() - t


def smi_value(text):
    text = text.strip()
    if not text or text.startswith("[") or text in ("N/A", "Not Supported"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


# The nvidia-smi fields the sidecar's series are compared with (the driver may lack some:
# the list is filtered against `nvidia-smi --help-query-gpu` first, one query then reads all).
SMI_FIELDS = [
    "index", "name", "uuid", "driver_version", "pci.bus_id", "utilization.gpu", "utilization.memory",
    "utilization.encoder", "utilization.decoder", "memory.total", "memory.used", "memory.reserved",
    "memory.free", "temperature.gpu", "power.draw", "power.draw.instant", "power.draw.average",
    "power.limit", "enforced.power.limit", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
    "clocks_event_reasons.active", "clocks_throttle_reasons.active", "pcie.link.gen.current",
    "pcie.link.gen.max", "pcie.link.width.current", "pcie.link.width.max",
    "ecc.errors.corrected.volatile.total", "ecc.errors.uncorrected.volatile.total", "pstate",
    "persistence_mode", "compute_mode",
]


def smi_fields():
    rc, out, err, _ = smi(["--help-query-gpu"])
    if rc != 0:
        return [f for f in SMI_FIELDS if f != "clocks_throttle_reasons.active"]
    known = set(re.findall(r'"([a-z0-9_.]+)"', out))
    fields = [f for f in SMI_FIELDS if f in known]
    # An unexpected help format: the fields every driver of the last years knows.
    return fields if "memory.used" in fields else [
        "index", "name", "uuid", "driver_version", "utilization.gpu", "utilization.memory", "memory.total", "memory.used",
        "memory.free", "temperature.gpu", "power.draw", "enforced.power.limit", "clocks.sm", "clocks.mem", "clocks.max.sm",
        "clocks.max.mem"]


def smi_query(fields):
    rc, out, err, wall = smi(["--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"])
    if rc != 0:
        return {"error": (err or out).strip()[:300]}, wall
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        rows.append({f: smi_value(v) for f, v in zip(fields, parts)})
    return {"gpus": rows}, wall


def cmd_smi_summary(args):
    fields = smi_fields()
    q, wall = smi_query(fields)
    rc, out, err, _ = smi(["--query-gpu=" + ",".join(fields), "--format=csv"])
    data = {"step": "nvidia_smi", "status": "ok" if "gpus" in q else "failed",
            "reason": q.get("error", ""), "fields": fields, "query_wall_ms": round(wall * 1000, 1),
            "csv": out.strip() or err.strip()}
    data.update(q)
    write_json(args.file, data)
    return 0 if "gpus" in q else 1


def cmd_parse_nvml_tests(args):
    text = open(args.log, errors="replace").read()
    m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
    ran = re.findall(r"^test (\S+) \.\.\. (\w+)", text, re.M)
    gpus = [line for line in text.splitlines() if line.startswith("GPU ")]
    if not m:
        status, reason = "failed", "no test result line (see nvml-tests.log)"
    else:
        res, passed, failed, _ = m[-1]
        status = "ok" if res == "ok" and int(passed) > 0 else "failed"
        reason = "%s passed, %s failed" % (passed, failed) if int(passed) + int(failed) else "no test matched `nvml`"
    write_json(args.file, {"step": "nvml_tests", "status": status, "reason": reason,
                           "tests": [{"name": n, "result": r} for n, r in ran], "gpu_lines": gpus})
    return 0


def parse_criterion(text):
    """{benchmark: {low, mid, high in seconds}} from criterion's `time: [a b c]` lines."""
    units = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(\S[^\s]*)\s+time:\s+\[(.*)\]", line)
        if m or re.match(r"^\S", line):
            name = m.group(1) if m else line.split()[0]
        m2 = re.search(r"time:\s+\[([\d.]+) (\S+) ([\d.]+) (\S+) ([\d.]+) (\S+)\]", line)
        if m2 and name:
            v = m2.groups()
            out[name] = {k: float(v[i]) * units.get(v[i + 1], float("nan"))
                         for k, i in (("low_s", 0), ("mid_s", 2), ("high_s", 4))}
    return out


def cmd_parse_bench(args):
    text = open(args.log, errors="replace").read()
    found = parse_criterion(text)
    gpu = {k: v for k, v in found.items() if "gpu_sample" in k}
    if gpu:
        status, reason = "ok", ""
    else:
        status, reason = "failed", "no `gpu_sample` benchmark result in the bench output (see bench.log)"
    notes = [l.strip() for l in text.splitlines() if l.startswith("gpu_sample") and ":" in l and "time:" not in l]
    write_json(args.file, {"step": "sample_cost_bench", "status": status, "reason": reason,
                           "benchmarks": gpu, "notes": notes, "all": found})
    return 0


# ---- /metrics parsing -----------------------------------------------------------------

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    series = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        series.append((m.group(1), labels, value))
    return series


def pick(series, name, **labels):
    for n, l, v in series:
        if n == name and all(l.get(k) == w for k, w in labels.items()):
            return v
    return None


# ---- references nvidia-smi cannot give: nvidia-ml-py ----------------------------------

REASON_BITS = {"idle": 0x1, "applications_clocks": 0x2, "power_cap": 0x4, "hw_slowdown": 0x8,
               "sync_boost": 0x10, "thermal": 0x20, "hw_thermal": 0x40, "hw_power_brake": 0x80,
               "display_clocks": 0x100}
GPM_IDS = {"musetalk_gpu_sm_active_ratio": 2, "musetalk_gpu_sm_occupancy_ratio": 3,
           "musetalk_gpu_tensor_active_ratio": 5, "musetalk_gpu_dram_bandwidth_utilization_ratio": 10}


def pynvml_reading(window=1.0):
    """Energy (J), PCIe throughput (B/s) and GPM ratios of GPU 0 over `window` s."""
    try:
        import pynvml  # noqa: PLC0415 - nvidia-ml-py, optional
    except ImportError as exc:
        return {"error": "nvidia-ml-py is not installed (%s)" % exc}
    out = {}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        try:
            out["energy_j"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0
            out["energy_t"] = time.time()
        except pynvml.NVMLError as exc:
            out["energy_error"] = str(exc)
        for key, counter in (("pcie_rx_bps", 1), ("pcie_tx_bps", 0)):  # NVML_PCIE_UTIL_{RX,TX}_BYTES
            try:
                out[key] = pynvml.nvmlDeviceGetPcieThroughput(h, counter) * 1024.0
            except pynvml.NVMLError as exc:
                out[key + "_error"] = str(exc)
        try:
            s1, s2 = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
            pynvml.nvmlGpmSampleGet(h, s1)
            time.sleep(window)
            pynvml.nvmlGpmSampleGet(h, s2)
            mg = pynvml.c_nvmlGpmMetricsGet_t()
            mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(GPM_IDS)
            mg.sample1, mg.sample2 = s1, s2
            for i, mid in enumerate(GPM_IDS.values()):
                mg.metrics[i].metricId = mid
            pynvml.nvmlGpmMetricsGet(mg)
            out["gpm"] = {name: mg.metrics[i].value / 100.0 for i, name in enumerate(GPM_IDS)}
            pynvml.nvmlGpmSampleFree(s1)
            pynvml.nvmlGpmSampleFree(s2)
        except Exception as exc:  # noqa: BLE001 - GPM is Hopper+, and pynvml versions differ
            out["gpm_error"] = "%s: %s" % (type(exc).__name__, exc)
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001
        out["error"] = "%s: %s" % (type(exc).__name__, exc)
    return out


def compute_apps():
    rc, out, err, _ = smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    if rc != 0:
        return {"error": (err or out).strip()[:300]}
    apps = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            apps.append({"pid": int(parts[0]), "used_memory_mib": smi_value(parts[1])})
    return {"apps": apps}


def pmon():
    """{pid: sm %} from one `nvidia-smi pmon -c 1 -s u` (None where it prints `-`)."""
    rc, out, err, _ = smi(["pmon", "-c", "1", "-s", "u"])
    if rc != 0:
        return {"error": (err or out).strip()[:300]}
    header, procs = None, {}
    for line in out.splitlines():
        if line.startswith("#"):
            if header is None:
                header = line.lstrip("#").split()
            continue
        parts = line.split()
        if header and len(parts) >= len(header) and parts[header.index("pid")].isdigit():
            row = dict(zip(header, parts))
            procs[int(row["pid"])] = smi_value(row.get("sm", "-").replace("-", ""))
    return {"procs": procs, "raw": out.strip()[-800:]}


def dmon_gpm():
    """One `nvidia-smi dmon --gpm-metrics 2,3,5,10 -c 1` line: the last 4 columns."""
    rc, out, err, _ = smi(["dmon", "--gpm-metrics", "2,3,5,10", "-c", "1"])
    if rc != 0:
        return {"error": (err or out).strip()[:300]}
    rows = [l.split() for l in out.splitlines() if l.strip() and not l.startswith("#")]
    res = {"raw": out.strip()[-800:]}
    if rows and len(rows[-1]) >= 4:
        res["gpm"] = {name: (smi_value(v) / 100.0 if isinstance(smi_value(v), float) else None)
                      for name, v in zip(GPM_IDS, rows[-1][-4:])}
    return res


def in_parallel(**calls):
    results, threads = {}, []
    for key, fn in calls.items():
        def run(key=key, fn=fn):
            try:
                results[key] = fn()
            except Exception as exc:  # noqa: BLE001
                results[key] = {"error": "%s: %s" % (type(exc).__name__, exc)}
        th = threading.Thread(target=run)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout=30)
    return results


def verdict(sidecar, ref, tol_abs=None, tol_rel=None):
    if sidecar is None and ref is None:
        return "both absent"
    if sidecar is None:
        return "sidecar absent"
    if ref is None:
        return "no reference"
    diff = abs(sidecar - ref)
    ok = (tol_abs is not None and diff <= tol_abs) or (tol_rel is not None and diff <= tol_rel * max(abs(ref), 1e-9))
    return "match" if ok else "DIFFERS"


def scrape(url):
    """(status, text, the time halfway through the request)."""
    t0 = time.time()
    status, body = http(url, timeout=10)
    return status, body.decode("utf-8", "replace"), (t0 + time.time()) / 2


def cmd_compare(args):
    base = args.metrics_url
    fields = smi_fields()
    # One moment: the scrape, nvidia-smi's readings and NVML's (energy, PCIe, GPM) together.
    # The sidecar's figures are its last sample (≤ one interval old); NVML's own averages
    # cover ~1 s: dynamic figures are compared within a tolerance.
    snap = in_parallel(metrics=lambda: scrape(base), smi=lambda: smi_query(fields)[0],
                       apps=compute_apps, pmon=pmon, nvml=lambda: pynvml_reading(1.0), dmon=dmon_gpm)
    time.sleep(2.0)
    later = in_parallel(metrics=lambda: scrape(base), nvml=lambda: pynvml_reading(0.0))
    status, text, t1 = snap["metrics"] if isinstance(snap["metrics"], tuple) else (0, "", 0.0)
    with open(args.metrics_out, "w") as fh:
        fh.write(text)
    s1 = parse_metrics(text)
    _, text2, t2 = later["metrics"] if isinstance(later["metrics"], tuple) else (0, "", 0.0)
    s2 = parse_metrics(text2)
    dt = t2 - t1  # between the two scrapes: the counters' rates (± one sample interval)
    gpu = (snap["smi"].get("gpus") or [{}])[0]
    nv, nv2 = snap["nvml"], later["nvml"]
    rows = []

    def row(series, sidecar, ref, source, tol_abs=None, tol_rel=None, unit=""):
        rows.append({"series": series, "sidecar": sidecar, "reference": ref, "source": source, "unit": unit,
                     "verdict": verdict(sidecar, ref, tol_abs, tol_rel)})

    def g(name, **labels):
        return pick(s1, name, gpu="0", **labels)

    def f(key, scale=1.0):
        v = gpu.get(key)
        return v * scale if isinstance(v, float) else None

    MiB = float(1 << 20)
    for task, key in (("general", "utilization.gpu"), ("encoder", "utilization.encoder"), ("decoder", "utilization.decoder")):
        row('hw_gpu_utilization_ratio{hw_gpu_task="%s"}' % task, g("hw_gpu_utilization_ratio", hw_gpu_task=task),
            f(key, 0.01), "nvidia-smi " + key, tol_abs=0.15)
    row("musetalk_gpu_memory_bandwidth_utilization_ratio", g("musetalk_gpu_memory_bandwidth_utilization_ratio"),
        f("utilization.memory", 0.01), "nvidia-smi utilization.memory", tol_abs=0.15)
    used = g("hw_gpu_memory_usage_bytes")
    row("hw_gpu_memory_usage_bytes", used, f("memory.used", MiB), "nvidia-smi memory.used", tol_abs=64 * MiB, unit="B")
    if f("memory.reserved") is not None:
        row("hw_gpu_memory_usage_bytes (vs used+reserved)", used,
            f("memory.used", MiB) + f("memory.reserved", MiB) if f("memory.used") is not None else None,
            "nvidia-smi memory.used + memory.reserved", tol_abs=64 * MiB, unit="B")
    row("hw_gpu_memory_limit_bytes", g("hw_gpu_memory_limit_bytes"), f("memory.total", MiB), "nvidia-smi memory.total",
        tol_abs=1 * MiB, unit="B")
    ratio = f("memory.used") / f("memory.total") if f("memory.used") is not None and f("memory.total") else None
    row("hw_gpu_memory_utilization_ratio", g("hw_gpu_memory_utilization_ratio"), ratio,
        "nvidia-smi memory.used / memory.total", tol_abs=0.01)
    row("hw_temperature_celsius", g("hw_temperature_celsius"), f("temperature.gpu"), "nvidia-smi temperature.gpu",
        tol_abs=3, unit="°C")
    pkey = "power.draw.instant" if f("power.draw.instant") is not None else "power.draw"
    row("hw_power_watts", g("hw_power_watts"), f(pkey), "nvidia-smi " + pkey, tol_rel=0.2, tol_abs=15, unit="W")
    row("musetalk_gpu_power_limit_watts", g("musetalk_gpu_power_limit_watts"), f("enforced.power.limit"),
        "nvidia-smi enforced.power.limit", tol_abs=1, unit="W")
    for clock, key, maxkey in (("sm", "clocks.sm", "clocks.max.sm"), ("memory", "clocks.mem", "clocks.max.mem")):
        row('musetalk_gpu_clock_hertz{clock="%s"}' % clock, g("musetalk_gpu_clock_hertz", clock=clock),
            f(key, 1e6), "nvidia-smi " + key, tol_rel=0.1, unit="Hz")
        row('musetalk_gpu_clock_max_hertz{clock="%s"}' % clock, g("musetalk_gpu_clock_max_hertz", clock=clock),
            f(maxkey, 1e6), "nvidia-smi " + maxkey, tol_abs=1e6, unit="Hz")
    rkey = "clocks_event_reasons.active" if "clocks_event_reasons.active" in gpu else "clocks_throttle_reasons.active"
    bits = gpu.get(rkey)
    bits = int(bits, 16) if isinstance(bits, str) and bits.startswith("0x") else None
    for reason, bit in REASON_BITS.items():
        row('musetalk_gpu_clocks_event_reasons{reason="%s"}' % reason, g("musetalk_gpu_clocks_event_reasons", reason=reason),
            (1.0 if bits & bit else 0.0) if bits is not None else None, "nvidia-smi %s & 0x%x" % (rkey, bit), tol_abs=0)
    e1 = g("hw_energy_joules_total")
    row("hw_energy_joules_total", e1, nv.get("energy_j"), "nvidia-ml-py TotalEnergyConsumption" +
        ("" if "energy_j" in nv else " (%s)" % nv.get("error", nv.get("energy_error", "?"))), tol_rel=0.01, unit="J")
    e2 = pick(s2, "hw_energy_joules_total", gpu="0")
    if e1 is not None and e2 is not None and "energy_j" in nv2 and "energy_j" in nv and dt > 0:
        ndt = nv2["energy_t"] - nv["energy_t"]
        row("rate(hw_energy_joules_total) over %.1f s" % dt, (e2 - e1) / dt,
            (nv2["energy_j"] - nv["energy_j"]) / ndt if ndt > 0 else None, "nvidia-ml-py energy delta", tol_rel=0.25, unit="W")
    for direction, key in (("receive", "pcie_rx_bps"), ("transmit", "pcie_tx_bps")):
        a, b = pick(s1, "hw_gpu_io_bytes_total", gpu="0", network_io_direction=direction), \
            pick(s2, "hw_gpu_io_bytes_total", gpu="0", network_io_direction=direction)
        row('rate(hw_gpu_io_bytes_total{network_io_direction="%s"})' % direction,
            (b - a) / dt if a is not None and b is not None and dt > 0 else None, nv.get(key),
            "nvidia-ml-py PcieThroughput" + ("" if key in nv else " (%s)" % nv.get("error", nv.get(key + "_error", "?"))),
            tol_rel=0.5, tol_abs=50e6, unit="B/s")
    for etype, key in (("ecc_corrected", "ecc.errors.corrected.volatile.total"),
                       ("ecc_uncorrected", "ecc.errors.uncorrected.volatile.total")):
        row('hw_errors_total{error_type="%s"}' % etype, g("hw_errors_total", error_type=etype), f(key),
            "nvidia-smi " + key, tol_abs=0)
    gpm_ref = nv.get("gpm") or {}
    dmon = (snap["dmon"] or {}).get("gpm") or {}
    for name in GPM_IDS:
        if name in gpm_ref:
            ref, src = gpm_ref[name], "nvidia-ml-py GPM metric %d" % GPM_IDS[name]
        else:
            ref, src = dmon.get(name), "nvidia-smi dmon --gpm-metrics %d" % GPM_IDS[name] + (
                "" if name in dmon else " (%s; %s)" % (nv.get("gpm_error", "?"), (snap["dmon"] or {}).get("error", "no value")))
        row(name, g(name), ref, src, tol_abs=0.15)
    # Every other hw_*/musetalk_gpu_* series of GPU 0, so nothing the sidecar exports is missed.
    compared = {r["series"].split("{")[0] for r in rows}
    others = sorted({"%s%s" % (n, "{%s}" % ",".join('%s="%s"' % kv for kv in sorted(l.items())
                                                     if kv[0] not in ("gpu", "hw_type", "hw_id", "hw_name", "hw_model", "hw_vendor", "hw_driver_version")))
                     for n, l, _ in s1 if (n.startswith("hw_") or n.startswith("musetalk_gpu_")) and n not in compared
                     and not n.startswith("hw_gpu_io_bytes_total")})
    # The worker's process: its pid in nvidia-smi's compute apps, its memory and SM share.
    apps = snap["apps"].get("apps", [])
    wpid = args.worker_pid
    app = next((a for a in apps if a["pid"] == wpid), None)
    pm = snap["pmon"].get("procs", {})
    proc_rows = {
        "worker_pid": wpid,
        "compute_apps": apps, "compute_apps_error": snap["apps"].get("error"),
        "pid_match": app is not None,
        "pmon_error": snap["pmon"].get("error"), "pmon_raw": snap["pmon"].get("raw"),
    }
    row('musetalk_pipeline_gpu_memory_bytes{mode="realtime"}', pick(s1, "musetalk_pipeline_gpu_memory_bytes", mode="realtime"),
        app["used_memory_mib"] * MiB if app and isinstance(app["used_memory_mib"], float) else None,
        "nvidia-smi --query-compute-apps used_memory of pid %s%s" % (wpid, "" if app else " (pid not listed)"),
        tol_abs=16 * MiB, unit="B")
    sm = pm.get(wpid)
    row('musetalk_pipeline_gpu_utilization_ratio{mode="realtime"}', pick(s1, "musetalk_pipeline_gpu_utilization_ratio", mode="realtime"),
        sm / 100.0 if isinstance(sm, float) else None, "nvidia-smi pmon sm%% of pid %s" % wpid, tol_abs=0.2)
    up = pick(s1, "musetalk_collector_up", source="gpu")
    result = {"step": "metrics_vs_nvidia_smi", "status": "ok" if status == 200 and up == 1 else "failed",
              "reason": "" if status == 200 and up == 1 else "scrape %s, musetalk_collector_up{source=\"gpu\"} = %s" % (status, up),
              "rows": rows, "uncompared_series": others, "process": proc_rows,
              "differs": [r["series"] for r in rows if r["verdict"] in ("DIFFERS", "sidecar absent")],
              "nvidia_smi_raw": gpu, "nvml_reference": {k: v for k, v in nv.items() if k != "energy_t"},
              "dmon": snap["dmon"]}
    write_json(args.file, result)
    return 0


def cmd_smi_timing(args):
    walls, cpus, fails = [], [], 0
    for _ in range(args.n):
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(GPUTIL_QUERY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=15)
            fails += p.returncode != 0
        except (OSError, subprocess.TimeoutExpired):
            fails += 1
        walls.append(time.perf_counter() - t0)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime))
    n = len(walls)
    write_json(args.file, {"step": "sample_cost_nvidia_smi", "status": "ok" if fails < n else "failed",
                           "reason": "%d of %d calls failed" % (fails, n) if fails else "",
                           "query": " ".join(GPUTIL_QUERY), "calls": n,
                           "mean_wall_ms": round(1000 * sum(walls) / n, 3), "max_wall_ms": round(1000 * max(walls), 3),
                           "mean_cpu_ms": round(1000 * sum(cpus) / n, 3)})
    return 0


def proc_cpu_seconds(pid):
    """utime + stime of the whole process (every thread), in seconds."""
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmd_idle_cpu(args):
    if args.worker_pid:
        try:
            os.kill(args.worker_pid, signal.SIGUSR1)  # pause the worker's matmuls: an idle GPU too
        except OSError:
            pass
    time.sleep(1.0)
    mon_json = args.file + ".monitor.json"
    mon = subprocess.Popen([sys.executable, os.path.abspath(__file__), "old-monitor", "--interval", "0.5",
                            "--seconds", str(args.seconds), "--json", mon_json])
    c0, t0 = proc_cpu_seconds(args.pid), time.monotonic()
    try:
        mon.wait(timeout=args.seconds + 30)
    except subprocess.TimeoutExpired:
        mon.kill()
        mon.wait()
    c1, t1 = proc_cpu_seconds(args.pid), time.monotonic()
    if args.worker_pid:
        try:
            os.kill(args.worker_pid, signal.SIGUSR2)
        except OSError:
            pass
    try:
        old = json.load(open(mon_json))
        os.remove(mon_json)
    except (OSError, ValueError) as exc:
        old = {"status": "failed", "reason": "old monitor wrote no result (%s)" % exc}
    sidecar = {"cpu_s": round(c1 - c0, 4), "wall_s": round(t1 - t0, 3), "cpu_pct_of_core": round(100 * (c1 - c0) / (t1 - t0), 3)}
    write_json(args.file, {"step": "idle_cpu", "status": "ok" if old.get("status") == "ok" else "failed",
                           "reason": old.get("reason", ""), "sidecar": sidecar, "old_monitor": old,
                           "worker_paused": bool(args.worker_pid)})
    return 0


def multipart(fields):
    boundary = uuid.uuid4().hex
    body = b""
    for name, (filename, data) in fields.items():
        body += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n" % (boundary, name, filename)).encode()
        body += data + b"\r\n"
    body += ("--%s--\r\n" % boundary).encode()
    return body, "multipart/form-data; boundary=%s" % boundary


def cmd_job(args):
    body, ctype = multipart({"video": ("clip.mp4", open(args.video, "rb").read()),
                             "audio": ("voice.wav", open(args.audio, "rb").read())})
    status, resp = http(args.url.rstrip("/") + "/v1/inference", data=body, headers={"Content-Type": ctype}, timeout=120)
    try:
        doc = json.loads(resp)
    except ValueError:
        doc = {"raw": resp.decode("utf-8", "replace")[:2000]}
    write_json(args.report_out, doc)
    report = doc.get("report") or {}
    stages = [{"name": s.get("name"), "seconds": s.get("seconds", s.get("duration_seconds")), "gpu": s.get("gpu")}
              for s in report.get("stages", []) if isinstance(s, dict)]
    write_json(args.file, {"step": "job", "status": "ok" if status == 200 else "failed",
                           "reason": "" if status == 200 else "POST /v1/inference answered %d: %s" % (status, doc.get("error", "")),
                           "job_id": doc.get("job_id"), "stages": stages,
                           "gpu_energy": report.get("gpu_energy"), "report_file": os.path.basename(args.report_out)})
    return 0


# ---- the report -----------------------------------------------------------------------


def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        if unit == "B" or unit == "B/s":
            return "%.1f MiB%s" % (v / (1 << 20), "/s" if unit == "B/s" else "")
        if unit == "Hz":
            return "%.0f MHz" % (v / 1e6)
        return ("%.4g" % v) + ((" " + unit) if unit else "")
    return str(v)


def cmd_report(args):
    steps = []
    for name in sorted(os.listdir(args.stepdir)):
        if name.endswith(".json"):
            try:
                steps.append(json.load(open(os.path.join(args.stepdir, name))))
            except (OSError, ValueError) as exc:
                steps.append({"step": name, "status": "failed", "reason": "unreadable step file: %s" % exc})
    meta = {}
    if os.path.exists(os.path.join(args.stepdir, "meta")):
        for line in open(os.path.join(args.stepdir, "meta")):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                meta[k] = v
    doc = {"meta": meta, "steps": steps}
    write_json(args.json, doc)
    md = ["# GPU check of musetalk-sidecar", ""]
    for k, v in meta.items():
        md.append("- %s: %s" % (k, v))
    md += ["", "| step | status | note |", "|---|---|---|"]
    for s in steps:
        md.append("| %s | %s | %s |" % (s.get("step"), s.get("status"), (s.get("reason") or "").replace("|", "/")))
    for s in steps:
        md += ["", "## %s (%s)" % (s.get("step"), s.get("status"))]
        if s.get("reason"):
            md.append("%s" % s["reason"])
        st = s.get("step")
        if st == "nvidia_smi" and s.get("gpus"):
            g = s["gpus"][0]
            md.append("")
            for k in ("name", "driver_version", "memory.total", "memory.used", "clocks.sm", "clocks.max.sm",
                      "clocks.mem", "power.draw", "enforced.power.limit", "temperature.gpu", "pcie.link.gen.max",
                      "pcie.link.width.max", "pstate", "persistence_mode"):
                if k in g:
                    md.append("- %s: %s" % (k, g[k]))
            md.append("- one `--query-gpu` call: %s ms" % s.get("query_wall_ms"))
        elif st == "nvml_tests":
            md += [""] + ["- %s: %s" % (t["name"], t["result"]) for t in s.get("tests", [])]
            md += ["- `%s`" % line[:300] for line in s.get("gpu_lines", [])]
        elif st == "metrics_vs_nvidia_smi":
            md += ["", "| series | sidecar | reference | source | verdict |", "|---|---|---|---|---|"]
            for r in s.get("rows", []):
                md.append("| `%s` | %s | %s | %s | %s |" % (r["series"], fmt(r["sidecar"], r["unit"]),
                                                          fmt(r["reference"], r["unit"]), r["source"], r["verdict"]))
            p = s.get("process", {})
            md += ["", "- worker pid %s listed by `nvidia-smi --query-compute-apps`: %s (apps: %s)" % (
                p.get("worker_pid"), "yes" if p.get("pid_match") else "NO",
                ", ".join("%s: %s MiB" % (a["pid"], a["used_memory_mib"]) for a in p.get("compute_apps", [])) or p.get("compute_apps_error") or "none")]
            if s.get("uncompared_series"):
                md.append("- series with no reference here: %s" % ", ".join("`%s`" % x for x in s["uncompared_series"]))
            if s.get("differs"):
                md.append("- **differ or absent**: %s" % ", ".join("`%s`" % x for x in s["differs"]))
        elif st == "job":
            md.append("")
            for stg in s.get("stages", []):
                md.append("- %s: %s" % (stg.get("name"), json.dumps(stg.get("gpu"))[:400]))
            if s.get("gpu_energy") is not None:
                md.append("- gpu_energy: %s" % json.dumps(s["gpu_energy"]))
        elif st == "sample_cost_bench":
            md.append("")
            for k, v in s.get("benchmarks", {}).items():
                md.append("- %s: %.1f µs (%.1f–%.1f)" % (k, v["mid_s"] * 1e6, v["low_s"] * 1e6, v["high_s"] * 1e6))
            md += ["- `%s`" % n[:400] for n in s.get("notes", [])]
        elif st == "sample_cost_nvidia_smi" and s.get("calls"):
            md += ["", "- GPUtil's query ×%d: mean wall %.1f ms (max %.1f), mean CPU %.1f ms (children user+sys)" % (
                s["calls"], s["mean_wall_ms"], s["max_wall_ms"], s["mean_cpu_ms"])]
        elif st == "idle_cpu" and s.get("sidecar"):
            o = s.get("old_monitor", {})
            md += ["", "- sidecar (500 ms sampling, no job%s): %.3f %% of one core over %.1f s" % (
                ", worker's matmuls paused" if s.get("worker_paused") else "", s["sidecar"]["cpu_pct_of_core"], s["sidecar"]["wall_s"])]
            if o.get("status") == "ok":
                md.append("- old monitor loop (psutil + GPUtil's nvidia-smi, 500 ms), same time: %.3f %% of one core "
                          "(self %.3f s + nvidia-smi children %.3f s over %.1f s, %d samples, nvidia-smi %.1f ms each%s)" % (
                              o["cpu_pct_of_core"], o["cpu_self_s"], o["cpu_children_s"], o["wall_s"], o["samples"],
                              o["nvidia_smi_mean_wall_ms"],
                              ", **%d nvidia-smi calls failed**" % o["nvidia_smi_failures"] if o.get("nvidia_smi_failures") else ""))
            else:
                md.append("- old monitor: %s" % o.get("reason"))
        elif st == "service" and s.get("detail"):
            md += ["", "```", s["detail"][-1500:], "```"]
    with open(args.md, "w") as fh:
        fh.write("\n".join(md) + "\n")
    return 0


# ---------------------------------------------------------------------------------------


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--mem-gib", type=float, default=2.0)
    w.add_argument("--matrix", type=int, default=8192)
    w.add_argument("--pidfile")
    pl = sub.add_parser("pipeline")
    for a in ("--video", "--audio", "--output"):
        pl.add_argument(a, required=True)
    pl.add_argument("--mem-gib", type=float, default=1.0)
    pl.add_argument("--stage-seconds", type=float, default=2.0)
    b = sub.add_parser("burn")
    b.add_argument("--mem-gib", type=float, default=2.0)
    b.add_argument("--matrix", type=int, default=8192)
    b.add_argument("--seconds", type=float, default=30.0)
    m = sub.add_parser("old-monitor")
    m.add_argument("--interval", type=float, default=0.5)
    m.add_argument("--seconds", type=float, default=20.0)
    m.add_argument("--json")
    sub.add_parser("free-port")
    wr = sub.add_parser("wait-ready")
    wr.add_argument("url")
    wr.add_argument("seconds", type=int)
    wr.add_argument("pid", type=int, nargs="?", default=0)
    sj = sub.add_parser("step-json")
    for a in ("file", "name", "status", "reason"):
        sj.add_argument(a)
    ss = sub.add_parser("smi-summary")
    ss.add_argument("file")
    for name in ("parse-nvml-tests", "parse-bench"):
        x = sub.add_parser(name)
        x.add_argument("log")
        x.add_argument("file")
    c = sub.add_parser("compare")
    c.add_argument("--metrics-url", required=True)
    c.add_argument("--worker-pid", type=int, default=0)
    c.add_argument("--metrics-out", required=True)
    c.add_argument("file")
    t = sub.add_parser("smi-timing")
    t.add_argument("--n", type=int, default=20)
    t.add_argument("file")
    i = sub.add_parser("idle-cpu")
    i.add_argument("--pid", type=int, required=True)
    i.add_argument("--worker-pid", type=int, default=0)
    i.add_argument("--seconds", type=float, default=20.0)
    i.add_argument("file")
    j = sub.add_parser("job")
    for a in ("--url", "--video", "--audio", "--report-out"):
        j.add_argument(a, required=True)
    j.add_argument("file")
    r = sub.add_parser("report")
    for a in ("stepdir", "md", "json"):
        r.add_argument(a)
    args = p.parse_args(argv)
    handler = {"worker": cmd_worker, "pipeline": cmd_pipeline, "burn": cmd_burn, "old-monitor": cmd_old_monitor,
               "free-port": cmd_free_port, "wait-ready": cmd_wait_ready, "step-json": cmd_step_json,
               "smi-summary": cmd_smi_summary, "parse-nvml-tests": cmd_parse_nvml_tests,
               "parse-bench": cmd_parse_bench, "compare": cmd_compare, "smi-timing": cmd_smi_timing,
               "idle-cpu": cmd_idle_cpu, "job": cmd_job, "report": cmd_report}[args.cmd]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
