#!/usr/bin/env bash
# Runs the service (release build) with its embedded defaults: the ffmpeg preview
# backend on 0.0.0.0:8000. Extra arguments go to `musetalk-sidecar serve`, e.g.
#   scripts/run.sh --listen 127.0.0.1:8000 --otlp-endpoint http://localhost:4317
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-deps.sh ffmpeg
exec cargo run --release -- serve "$@"
