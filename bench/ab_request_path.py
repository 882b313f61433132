#!/usr/bin/env python3
"""Two builds of the sidecar side by side on the request path (BENCHMARKS.md §4).

Starts both binaries with the `command` backend (`cp {video} {output}`), warms each up
with 3 jobs, then runs N synchronous jobs on each, interleaved (ABBA order), and prints
the p50 of `file_processing` and of everything but the pipeline, with the ratio new/base.

The media are the README quick start's (a 256x256 25 fps 2 s clip, a 3 s sine).

Usage: python3 bench/ab_request_path.py N BASE_BINARY NEW_BINARY
(build the base with `git stash; cargo build --release; cp target/release/musetalk-sidecar /tmp/base-bin`).
BASE_ARGS / NEW_ARGS (environment) add flags to one side, e.g. the same binary twice with
BASE_ARGS='--probe-helper off' (ffprobe per file) against the persistent probe helper.
"""
import json, os, re, shlex, shutil, statistics, subprocess, sys, tempfile, time
def start(binp, tmp, extra):
    log = open(os.path.join(tmp, "log"), "w+")
    p = subprocess.Popen([binp, "--listen", "127.0.0.1:0", "--data-dir", os.path.join(tmp, "data"), "--log-format", "json", "--backend", "command", "--pipeline-command", "cp {video} {output}"] + extra, stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(600):
        log.seek(0); m = re.search(r"listening on http://([0-9.:]+)", log.read())
        if m: return p, m.group(1)
        time.sleep(0.05)
    sys.exit("no start")
def job(addr, v, a):
    out = subprocess.run(["curl", "-s", "-F", f"video=@{v}", "-F", f"audio=@{a}", f"http://{addr}/v1/inference"], capture_output=True, check=True)
    r = json.loads(out.stdout)["report"]
    steps = {s["name"]: s["seconds"] for s in r["steps"]}
    return steps["file_processing"]*1e3, (r["total_seconds"]-steps["subprocess_execution"])*1e3, steps["output_discovery"]*1e3
n = int(sys.argv[1]); bins = {"base": sys.argv[2], "new": sys.argv[3]}
tmp = tempfile.mkdtemp()
v, a = os.path.join(tmp, "v.mp4"), os.path.join(tmp, "a.wav")
subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=256x256:rate=25", "-t", "2", "-pix_fmt", "yuv420p", v], check=True)
subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=3", a], check=True)
svc = {}
for k, b in bins.items():
    d = os.path.join(tmp, k); os.makedirs(d); svc[k] = start(b, d, shlex.split(os.environ.get(k.upper() + "_ARGS", "")))
res = {k: ([], [], []) for k in bins}
for k in bins:
    for _ in range(3): job(svc[k][1], v, a)
for i in range(n):
    for k in (["base", "new"] if i % 2 == 0 else ["new", "base"]):
        for i, x in enumerate(job(svc[k][1], v, a)): res[k][i].append(x)
for k in bins:
    q = statistics.quantiles(res[k][1], n=10)
    print(f"{k:5} file_processing p50 {statistics.median(res[k][0]):7.1f} ms   output_discovery p50 {statistics.median(res[k][2]):6.1f} ms   everything but the pipeline p50 {statistics.median(res[k][1]):7.1f} ms (p10 {q[0]:.1f}, p90 {q[-1]:.1f})  (n={n})")
print(f"ratio new/base: file_processing {statistics.median(res['new'][0])/statistics.median(res['base'][0]):.2f}, all but pipeline {statistics.median(res['new'][1])/statistics.median(res['base'][1]):.2f}")
for k in bins:
    svc[k][0].terminate()
    svc[k][0].wait(timeout=30)
shutil.rmtree(tmp, ignore_errors=True)
