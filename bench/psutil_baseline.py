#!/usr/bin/env python3
"""The Python monitor's sampling loop, as a baseline: CPU per core + memory + a process tree.

Measures CPU time (user+sys of this process) per sample, the figure our collector is
compared with in BENCHMARKS.md. Usage: psutil_baseline.py [samples] (default 2000).
"""
import os
import resource
import subprocess
import sys
import time

import psutil


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    # The same tree as the Rust bench: sh -> 3 sleeping children.
    root = subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600 & sleep 600 & wait"])
    time.sleep(0.2)
    proc = psutil.Process(root.pid)
    psutil.cpu_percent(percpu=True)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(n):
        psutil.cpu_percent(percpu=True)
        m = psutil.virtual_memory()
        _ = (m.used, m.free, m.cached, m.buffers, m.total)
        tree = [proc] + proc.children(recursive=True)
        cpu = 0.0
        rss = 0
        for p in tree:
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for c in proc.children(recursive=True):
        c.kill()
    root.kill()
    print(f"psutil samples={n} cpu_us_per_sample={cpu_s / n * 1e6:.1f} wall_us_per_sample={wall / n * 1e6:.1f} tree={len(tree)}")


if __name__ == "__main__":
    main()
