#!/usr/bin/env bash
# Runs every test: unit, integration and end-to-end (the real binary, real ffmpeg,
# a real Prometheus, an in-process OTLP receiver). Tests marked #[ignore] need an
# NVIDIA GPU and stay ignored. Extra arguments go to `cargo test`.
#
# On a fresh Debian machine with only Rust, missing system tools (ffmpeg, ffprobe, FFmpeg's
# -dev packages and libclang for the probe helper's build, nginx for the multi-replica tests,
# prometheus, promtool, python3-yaml, chromium and chromedriver for the status page's
# browser test, curl for the README's quick start, py-spy for the profiling tests) are
# installed when running as root (py-spy with pip); otherwise the command to install them
# is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    printf 'cargo not found: install Rust (https://rustup.rs) first\n' >&2
    exit 1
fi

say "checking system tools"
scripts/ensure-deps.sh ffmpeg ffmpeg-dev prometheus python3-yaml chromium curl py-spy nginx

say "cargo test --all-targets $*"
status=0
cargo test --all-targets "$@" || status=$?
if [ "$status" -eq 0 ]; then
    say "all tests passed"
else
    say "tests failed (cargo test exit status $status)"
fi
exit "$status"
