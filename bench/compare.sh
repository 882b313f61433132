#!/usr/bin/env bash
# Side-by-side benchmarks (BENCHMARKS.md): installs what is missing, builds the release
# binary and the `sample_cost` example, then runs bench/compare.py, which prints Markdown
# tables and writes them to target/bench-results.md (raw figures: target/bench-results.json).
#
#   bash bench/compare.sh              # full run of the working tree, bounded to 9 minutes after the build
#   bash bench/compare.sh --rev HEAD   # the same for a committed revision, built apart from the working
#                                      # tree (git archive into target/bench-rev, own target dir)
#   bash bench/compare.sh --quick      # smoke run (~1.5 min), figures not for BENCHMARKS.md
#
# Never part of the test command. Needs: ffmpeg, curl, python3 with psutil, node_exporter.
# node_exporter is taken from PATH, else the Debian package is downloaded and unpacked
# under target/bench-tools (not installed: installing it starts a system service
# listening on every interface; here it only ever listens on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else echo "run as root or do: $*" >&2; return 1; fi; }

missing=()
for tool in ffmpeg ffprobe curl python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sed 's/ffprobe/ffmpeg/' | sort -u | tr '\n' ' ')
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs
fi
if ! python3 -c 'import psutil' 2>/dev/null; then
  python3 -m pip install -q psutil 2>/dev/null \
    || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-psutil
fi

NE=$(command -v prometheus-node-exporter || command -v node_exporter || true)
if [ -z "$NE" ]; then
  NE=target/bench-tools/usr/bin/prometheus-node-exporter
  if [ ! -x "$NE" ]; then
    mkdir -p target/bench-tools
    (cd target/bench-tools && rm -f prometheus-node-exporter_*.deb && apt-get download prometheus-node-exporter >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download prometheus-node-exporter >/dev/null; })
    dpkg-deb -x target/bench-tools/prometheus-node-exporter_*.deb target/bench-tools
  fi
fi
NE=$(readlink -f "$NE")

rev=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rev) rev=$2; shift 2 ;;
    --rev=*) rev=${1#--rev=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$rev" ]; then
  sha=$(git rev-parse --verify "$rev^{commit}")
  src="$PWD/target/bench-rev/src-$sha"
  tgt="$PWD/target/bench-rev/target"
  [ -d "$src" ] || { mkdir -p "$src" && git archive "$sha" | tar -x -C "$src"; }
  # Seed the separate target dir with the working tree's compiled dependencies (only the
  # crate itself is rebuilt then, instead of every dependency).
  [ -d "$tgt/release" ] || [ ! -d target/release ] || { mkdir -p "$tgt" && cp -a target/release "$tgt/"; }
  (cd "$src" && CARGO_TARGET_DIR="$tgt" cargo build --release --quiet --bin musetalk-sidecar --example sample_cost)
  export MTS_BENCH_TARGET_DIR="$tgt" MTS_BENCH_REV="commit $(git rev-parse --short "$sha")"
else
  cargo build --release --quiet --bin musetalk-sidecar --example sample_cost
fi
t1=$(date +%s)
echo "setup and build: $((t1 - t0)) s" >&2

timeout -k 10 540 python3 bench/compare.py --node-exporter "$NE" --out target/bench-results.md ${args[@]+"${args[@]}"}
t2=$(date +%s)
echo "benchmarks: $((t2 - t1)) s; total: $((t2 - t0)) s; tables in target/bench-results.md" >&2
