#!/usr/bin/env python3
"""Realtime latency: time to first frame, and streamed vs non-streamed time to first byte.

    python3 bench/latency.py [--runs 6] [--binary target/release/musetalk-sidecar]

Two services on loopback, one after the other: the preview engine (the default) and the
fixture worker (tests/fixtures/worker, protocol 2, FIXTURE_WORKER_BATCH_SLEEP=0.1 s per
batch of 8 frames: a stand-in for a model whose batches take 100 ms). For each, an avatar
is prepared from a 2 s 320x240 clip, then speaks of a 3 s clip alternate non-streamed and
streamed (`stream=true`). Reported, median of the runs:
- time to first frame: the report's `latency.time_to_first_frame_seconds`;
- time to first byte, client side: request sent -> first body byte received (the upload is
  on loopback and small, so this is the service's answer latency);
- the same from the report (`time_to_first_byte_seconds`, streamed only);
- total: request sent -> last byte.
Needs ffmpeg and a built binary.
"""
import argparse
import json
import os
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


def post(base, path, fields, files):
    body, ctype = multipart(fields, files)
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": ctype})
    t0 = time.monotonic()
    r = urllib.request.urlopen(req, timeout=300)
    first = None
    chunks = []
    while True:
        b = r.read1(65536)
        if not b:
            break
        if first is None:
            first = time.monotonic() - t0
        chunks.append(b)
    total = time.monotonic() - t0
    return r, b"".join(chunks), first, total


def get_json(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.load(r)


def measure(name, argv, tmp, video, audio, runs):
    svc, base = start_service(argv, os.path.join(tmp, name))
    try:
        post(base, "/v1/avatars", {"avatar_id": "b"}, {"video": video})
        for _ in range(300):
            if get_json(base, "/v1/avatars/b")["state"] == "ready":
                break
            time.sleep(0.1)
        rows = {False: [], True: []}
        for i in range(runs * 2 + 1):
            stream = i % 2 == 1
            fields = {"batch_size": "8"}
            if stream:
                fields["stream"] = "true"
            r, body, first, total = post(base, "/v1/avatars/b/speak", fields, {"audio": audio})
            if i == 0:
                continue  # warm-up
            job = r.headers.get("Content-Location", "").rsplit("/", 1)[-1] if stream else json.loads(body)["job_id"]
            lat = get_json(base, "/v1/jobs/%s/report" % job)["latency"]
            rows[stream].append((lat.get("time_to_first_frame_seconds"), first, lat.get("time_to_first_byte_seconds"), total))
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=30)
    med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else None
    fmt = lambda v: "-" if v is None else "%.3f" % v
    print("%s (%d runs each, median, seconds):" % (name, runs))
    print("  %-13s %10s %14s %14s %8s" % ("answer", "TTFF", "TTFB client", "TTFB report", "total"))
    for stream in (False, True):
        cols = list(zip(*rows[stream]))
        print("  %-13s %10s %14s %14s %8s" % ("streamed" if stream else "non-streamed", *(fmt(med(c)) for c in cols)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--binary", default=os.path.join(REPO, "target/release/musetalk-sidecar"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="latency-bench-")
    try:
        video, audio = os.path.join(tmp, "v.mp4"), os.path.join(tmp, "a.wav")
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-t", "2",
                        "-pix_fmt", "yuv420p", video], check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=3", audio], check=True)
        measure("preview engine", [a.binary, "serve"], tmp, video, audio, a.runs)
        worker = "%s -u %s" % (sys.executable, os.path.join(REPO, "tests/fixtures/worker/fixture_worker.py"))
        measure("fixture worker (0.1 s per batch of 8)", [a.binary, "serve", "--backend", "musetalk", "--musetalk-python", sys.executable,
                 "--musetalk-dir", os.path.join(REPO, "tests/fixtures/musetalk"), "--realtime", "--worker-command", worker,
                 "--pipeline-env", "PYTHONDONTWRITEBYTECODE=1,FIXTURE_WORKER_BATCH_SLEEP=0.1"], tmp, video, audio, a.runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
