#!/usr/bin/env python3
"""The Python monitor's loop as it ran in production: the same reads every 500 ms.

Per sample: per-CPU utilization, host memory (used/free/cached/buffers/total), and CPU +
RSS of a process tree (its own process, plus the tree under --tree-root when given),
exactly the reads `bench/psutil_baseline.py` does in a tight loop. This one sleeps to a
fixed cadence instead, so its CPU use (read from outside, /proc/PID/task/*/schedstat) is
what the old monitor cost while the service sat idle, comparable with the idle sidecar
sampling at its default 500 ms. Bounded: it exits after --duration seconds (default 600).

Usage: psutil_monitor.py [--interval 0.5] [--duration 600] [--tree-root PID]
On exit (end of duration or SIGTERM) prints `samples=N`.
"""
import argparse
import signal
import sys
import time

import psutil


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--tree-root", type=int, default=None)
    a = ap.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    me = psutil.Process()
    root = psutil.Process(a.tree_root) if a.tree_root else None
    psutil.cpu_percent(percpu=True)
    samples = 0
    t0 = time.monotonic()
    nxt = t0
    while not stop and time.monotonic() - t0 < a.duration:
        per_cpu = psutil.cpu_percent(percpu=True)
        m = psutil.virtual_memory()
        _ = (per_cpu, m.used, m.free, m.cached, m.buffers, m.total)
        tree = [me]
        if root is not None:
            try:
                tree += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        cpu, rss = 0.0, 0
        for p in tree:
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        samples += 1
        nxt += a.interval
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()
    print(f"samples={samples}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
