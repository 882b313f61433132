#!/usr/bin/env python3
"""What a py-spy profile costs a job (DESIGN.md §9: wall-time ratio <= 1.05 at the default rate).

    python3 bench/profile_overhead.py [--pairs 8] [--busy 3] [--binary target/release/musetalk-sidecar]

1. Job wall time with and without `profile=true`, interleaved (off, on, off, on, ...) on one
   running service: the MuseTalk fixture backend with MUSETALK_FIXTURE_BUSY seconds of
   Python CPU work per job (what a profile samples). The figure is the job's
   `subprocess_execution` step (the pipeline; everything else is the same either way),
   median of each arm and the ratio of medians.
2. py-spy's own CPU per profiled second: the same Python work run bare and under
   `py-spy record --rate 100 --idle --subprocesses --format chrometrace` (as the sidecar
   runs it), children's CPU from getrusage; (profiled - bare) / wall seconds profiled.

Needs ffmpeg, py-spy and a built binary (cargo build --release).
"""
import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loopback import multipart, start_service  # noqa: E402


def job(base, video, audio, profile):
    fields = {"profile": "true"} if profile else {}
    body, ctype = multipart(fields, {"video": video, "audio": audio})
    req = urllib.request.Request(base + "/v1/inference", data=body, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=300) as r:
        report = json.load(r)["report"]
    step = next(s for s in report["steps"] if s["name"] == "subprocess_execution")
    if profile and not (report.get("profile") or {}).get("url"):
        sys.exit("profile not taken: %s" % report.get("profile"))
    return step["seconds"]


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def py_spy_cpu(py_spy, busy, runs=3):
    work = "import time\nend=time.time()+%s\nwhile time.time()<end: sum(range(300))\n" % busy
    out = tempfile.mkdtemp()
    bare, prof, walls = [], [], []
    for i in range(runs):
        c0 = children_cpu()
        subprocess.run([sys.executable, "-c", work], check=True)
        bare.append(children_cpu() - c0)
        c0, w0 = children_cpu(), time.time()
        subprocess.run([py_spy, "record", "--rate", "100", "--idle", "--subprocesses", "--format", "chrometrace",
                        "--output", os.path.join(out, "t%d.json" % i), "--", sys.executable, "-c", work],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.time() - w0)
        prof.append(children_cpu() - c0)
    shutil.rmtree(out)
    extra = statistics.median(p - b for p, b in zip(prof, bare))
    return extra, statistics.median(walls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--busy", type=float, default=3.0)
    ap.add_argument("--binary", default=os.path.join(REPO, "target/release/musetalk-sidecar"))
    a = ap.parse_args()
    py_spy = shutil.which("py-spy") or sys.exit("py-spy not on PATH (python3 -m pip install py-spy)")
    tmp = tempfile.mkdtemp(prefix="profile-bench-")
    video, audio = os.path.join(tmp, "v.mp4"), os.path.join(tmp, "a.wav")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-t", "2",
                    "-pix_fmt", "yuv420p", video], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=3", audio], check=True)
    svc, base = start_service([a.binary, "serve", "--backend", "musetalk", "--musetalk-python", sys.executable,
                               "--musetalk-dir", os.path.join(REPO, "tests/fixtures/musetalk"), "--py-spy", py_spy,
                               "--pipeline-env", "PYTHONDONTWRITEBYTECODE=1,MUSETALK_FIXTURE_BUSY=%s" % a.busy],
                              os.path.join(tmp, "data"))
    try:
        job(base, video, audio, False)  # warm-up (page cache, Python imports)
        off, on = [], []
        for i in range(a.pairs):
            # Alternate which arm goes first, so drift hits both alike.
            order = [False, True] if i % 2 == 0 else [True, False]
            for p in order:
                (on if p else off).append(job(base, video, audio, p))
        m_off, m_on = statistics.median(off), statistics.median(on)
        print("pipeline wall, %d pairs, %.1f s of Python work per job:" % (a.pairs, a.busy))
        print("  without profile: median %.3f s  [%s]" % (m_off, " ".join("%.3f" % v for v in off)))
        print("  with profile:    median %.3f s  [%s]" % (m_on, " ".join("%.3f" % v for v in on)))
        print("  ratio (with / without): %.3f" % (m_on / m_off))
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    extra, wall = py_spy_cpu(py_spy, a.busy)
    print("py-spy's own CPU at 100 Hz: %.3f s over %.2f s profiled = %.1f%% of one core" % (extra, wall, extra / wall * 100))


if __name__ == "__main__":
    main()
