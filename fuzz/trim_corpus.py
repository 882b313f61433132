#!/usr/bin/env python3
"""Trims a corpus to at most N files that keep the most edge coverage (greedy set cover).

    python3 fuzz/trim_corpus.py TARGET_BINARY IN_DIR OUT_DIR [--max-files 40] [--max-bytes 61440] [--keep GLOB]

`cargo fuzz cmin` keeps every file with a feature no other file has, which for these
targets is hundreds of files; this keeps the committed corpus to a few dozen. It runs the
fuzz binary in libFuzzer's merge mode with `-use_counters=0` (edges only) to learn which
edges each file covers, then picks files by most new edges (smaller first on ties) until
nothing is gained or a cap is hit. Files matching --keep (e.g. 'seed-*', the hand-written
seeds) are always kept and counted first. OUT_DIR is replaced. Environment variables
(FUZZ_KNOWN_BUGS, ...) pass through to the target.
"""
import argparse
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--max-files", type=int, default=40)
    ap.add_argument("--max-bytes", type=int, default=60 * 1024)
    ap.add_argument("--keep", default=None, help="glob of file names always kept")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "control")
        merged = os.path.join(tmp, "merged")
        os.mkdir(merged)
        cmd = [a.binary, "-merge=1", "-use_counters=0", f"-merge_control_file={control}", "-max_len=4096", "-timeout=60", "-rss_limit_mb=4096", merged, a.input]
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            sys.exit(f"merge failed ({r.returncode})")
        with open(control) as f:
            lines = f.read().splitlines()
    n = int(lines[0])
    files = lines[2:2 + n]
    cov = {}
    for line in lines[2 + n:]:
        parts = line.split()
        if parts and parts[0] == "COV":
            cov[int(parts[1])] = set(map(int, parts[2:]))
    every = set().union(*cov.values()) if cov else set()
    size = {i: os.path.getsize(files[i]) for i in cov}

    chosen, covered, total_bytes = [], set(), 0
    if a.keep:
        for i in sorted(cov):
            if fnmatch.fnmatch(os.path.basename(files[i]), a.keep):
                chosen.append(i)
                covered |= cov[i]
                total_bytes += size[i]
    left = set(cov) - set(chosen)
    while left and len(chosen) < a.max_files:
        best = max(left, key=lambda i: (len(cov[i] - covered), -size[i]))
        gain = len(cov[best] - covered)
        if gain == 0 or total_bytes + size[best] > a.max_bytes:
            break
        chosen.append(best)
        covered |= cov[best]
        total_bytes += size[best]
        left.discard(best)

    if os.path.isdir(a.output):
        shutil.rmtree(a.output)
    os.makedirs(a.output)
    for i in chosen:
        name = os.path.basename(files[i])
        if not (a.keep and fnmatch.fnmatch(name, a.keep)):
            with open(files[i], "rb") as f:
                name = hashlib.sha1(f.read()).hexdigest()
        shutil.copyfile(files[i], os.path.join(a.output, name))
    print(f"{len(chosen)} files, {total_bytes} bytes, {len(covered)}/{len(every)} edges ({100 * len(covered) / max(1, len(every)):.1f}%) of {len(cov)} input files")


if __name__ == "__main__":
    main()
