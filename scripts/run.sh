#!/usr/bin/env bash
# Runs the service (release build) with its embedded defaults: the ffmpeg preview
# backend on 0.0.0.0:8000. Extra arguments go to `musetalk-sidecar serve`, e.g.
#   scripts/run.sh --listen 127.0.0.1:8000 --otlp-endpoint http://localhost:4317
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-deps.sh ffmpeg ffmpeg-dev
# py-spy is optional (per-job Python profiles): the service runs without it and says why.
scripts/ensure-deps.sh py-spy || printf '==> py-spy not installed: jobs run without profiles\n'
# The persistent media probe the service starts (next to its binary): no ffprobe per upload.
cargo build --release --bin musetalk-probe-helper
exec cargo run --release -- serve "$@"
