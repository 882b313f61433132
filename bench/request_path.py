#!/usr/bin/env python3
"""Request-path benchmarks (DESIGN.md §9): orchestration overhead per job and a 1 GiB upload.

Starts the release binary with a trivial `command` backend (`cp {video} {output}`), runs
sequential jobs and splits each report into the pipeline (subprocess_execution) and
everything else, then uploads 1 GiB and compares it with `dd` writing the same file to
the same disk, reading the service's peak RSS (VmHWM) before and after.

Usage: cargo build --release && python3 bench/request_path.py [jobs=40]
(bench/compare.sh runs the same measurements, interleaved with the alternatives, in one go.)
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "musetalk-sidecar")


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                yield line.split(":")[0], int(line.split()[1])


def start(tmp, *args):
    log = open(os.path.join(tmp, "service.log"), "w+")
    p = subprocess.Popen([BIN, "--listen", "127.0.0.1:0", "--data-dir", os.path.join(tmp, "data"), "--log-format", "json", *args],
                         stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 30
    while time.time() < deadline:
        log.seek(0)
        m = re.search(r"listening on http://([0-9.:]+)", log.read())
        if m:
            return p, m.group(1)
        time.sleep(0.05)
    p.kill()
    sys.exit("service did not start")


def curl_job(addr, video, audio):
    out = subprocess.run(["curl", "-s", "-F", f"video=@{video}", "-F", f"audio=@{audio}", f"http://{addr}/v1/inference"], capture_output=True, check=True)
    return json.loads(out.stdout)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main():
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    tmp = tempfile.mkdtemp(prefix="mts-bench-")
    try:
        v, a = os.path.join(tmp, "v.mp4"), os.path.join(tmp, "a.wav")
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=128x128:rate=25", "-t", "1", "-pix_fmt", "yuv420p", v], check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", a], check=True)
        p, addr = start(tmp, "--backend", "command", "--pipeline-command", "cp {video} {output}")
        try:
            for _ in range(3):
                curl_job(addr, v, a)  # warm-up
            overhead, orchestration, probes, pipeline, totals, fp, od = [], [], [], [], [], [], []
            for _ in range(jobs):
                r = curl_job(addr, v, a)["report"]
                steps = {s["name"]: s["seconds"] for s in r["steps"]}
                total = r["total_seconds"]
                pipe = steps["subprocess_execution"]
                # The probes: 2 ffprobe runs (inputs, in parallel, each decoding the start of its stream) in file_processing, 1 on the output.
                totals.append(total * 1e3)
                pipeline.append(pipe * 1e3)
                overhead.append((total - pipe) * 1e3)
                orchestration.append((steps["config_creation"] + steps["response_preparation"] + r["queue_seconds"] + (pipe - r["subprocess"]["seconds"])) * 1e3)
                probes.append((steps["file_processing"] + steps["output_discovery"]) * 1e3)
                fp.append(steps["file_processing"] * 1e3)
                od.append(steps["output_discovery"] * 1e3)
            print(f"jobs={jobs} (command backend: cp), milliseconds, p50 [min–max]")
            for name, xs in [("total job", totals), ("pipeline (subprocess_execution)", pipeline), ("everything but the pipeline", overhead),
                             ("  of which upload + ffprobe validation", probes), ("    file_processing (upload, 2 ffprobe in parallel)", fp), ("    output_discovery (1 ffprobe)", od),
                             ("  of which orchestration (queue, config, spawn/wait, report)", orchestration)]:
                print(f"  {name:<62} {statistics.median(xs):8.2f}  [{min(xs):.2f}–{max(xs):.2f}]  p99 {pct(xs, 0.99):.2f}")

            big = os.path.join(tmp, "big.mp4")
            subprocess.run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", "count=1024", "status=none"], check=True)
            def dd(n):
                # `sync` first so neither this nor the upload pays for the other's writeback.
                subprocess.run(["sync"], check=True)
                raw = os.path.join(tmp, "data", f"raw{n}.bin")
                t0 = time.perf_counter()
                subprocess.run(["dd", f"if={big}", f"of={raw}", "bs=1M", "status=none"], check=True)
                dt = time.perf_counter() - t0
                os.remove(raw)
                return dt
            # Idle first: CPU ticks over 20 s of sampling at 500 ms, and RSS.
            def threads_ns():
                # Per-thread CPU in ns (/proc/PID/task/*/schedstat): /proc/PID/stat counts
                # 10 ms clock ticks, too coarse for ~0.05 % of a core over 20 s.
                out = {}
                for tid in os.listdir(f"/proc/{p.pid}/task"):
                    try:
                        with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                            out[tid] = int(f.read().split()[0])
                    except FileNotFoundError:
                        pass
                return out
            t0, c0 = time.perf_counter(), threads_ns()
            time.sleep(20)
            idle_cpu = sum(v - c0.get(t, 0) for t, v in threads_ns().items()) / 1e9 / (time.perf_counter() - t0) * 100
            rss = dict(hwm_kib(p.pid))["VmRSS"] / 1024
            print(f"idle after {jobs + 3} jobs: RSS {rss:.1f} MiB, CPU {idle_cpu:.3f} % of one core (20 s, sampling every 500 ms)")
            # A gigabyte written and thrown away first: on a VM whose memory is faulted in
            # lazily, the first writer of 1 GiB of page cache pays for it, whichever tool it is
            # (without this, dd measured 3.8 s here and the upload looked 2.4x faster than dd).
            dd(0)
            raw1 = dd(1)
            before = dict(hwm_kib(p.pid))
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-F", f"video=@{big}", "-F", f"audio=@{a}", f"http://{addr}/v1/inference"], capture_output=True)
            up = time.perf_counter() - t0
            after = dict(hwm_kib(p.pid))
            raw = statistics.median([raw1, dd(2), dd(3)])
            print(f"1 GiB upload: HTTP {out.stdout.decode()} (rejected as not a video after the full upload) in {up:.2f} s = {1024 / up:.0f} MiB/s; "
                  f"dd to the same disk (median of 3, one before, two after) {raw:.2f} s = {1024 / raw:.0f} MiB/s; upload/dd throughput ratio {raw / up:.2f}")
            print(f"  peak RSS (VmHWM) {before['VmHWM'] / 1024:.1f} MiB -> {after['VmHWM'] / 1024:.1f} MiB: growth {(after['VmHWM'] - before['VmHWM']) / 1024:.1f} MiB")
        finally:
            p.terminate()
            p.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
