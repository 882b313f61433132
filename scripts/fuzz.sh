#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time and fails if one crashes.
#
#   scripts/fuzz.sh [seconds-per-target=60] [target...]
#
# Targets (fuzz/fuzz_targets/): stage_parser (LineSplitter + MuseTalk/JSON/ffmpeg stage
# parsers), worker_event (realtime worker protocol decoder), multipart_raw and
# multipart_parts (the real router's multipart uploads; need ffmpeg + ffprobe).
#
# Seeds are read from fuzz/corpus/<target> (committed, small) and fuzz/regressions/<target>
# (inputs of bugs found earlier: an open or returning bug fails the run); what fuzzing finds goes to
# fuzz/target/corpus/<target> (ignored, kept between runs; fuzz/README.md says how to
# refresh the committed corpus from it). A crash, timeout or OOM leaves its input under
# fuzz/artifacts/<target>/ and makes the script exit 1, printing the path.
#
# FUZZ_KNOWN_BUGS=name,... tolerates known bugs (fuzz/README.md, fuzz/regressions/) so
# fuzzing can go past them; FUZZ_STATS=1 prints the multipart targets' response counts.
#
# cargo-fuzz needs nightly compiler flags: it runs on the default (stable) toolchain
# with RUSTC_BOOTSTRAP=1. Set FUZZ_TOOLCHAIN=nightly to use a nightly toolchain instead.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

secs=${1:-60}
shift || true
case "$secs" in
    '' | *[!0-9]*) printf 'usage: %s [seconds-per-target=60] [target...]\n' "$0" >&2; exit 2 ;;
esac

if ! command -v cargo >/dev/null 2>&1; then
    printf 'cargo not found: install Rust (https://rustup.rs) first\n' >&2
    exit 1
fi
toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=("+${FUZZ_TOOLCHAIN}")
else
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
for tool in ffmpeg ffprobe; do
    command -v "$tool" >/dev/null 2>&1 || say "warning: $tool not found: the multipart targets only reach the early refusals"
done

cd fuzz
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi

# Debug assertions on: an arithmetic overflow is a finding too.
build_flags=(--release --debug-assertions)
say "building ${targets[*]}"
cargo "${toolchain[@]}" fuzz build "${build_flags[@]}"

failed=()
for t in "${targets[@]}"; do
    seeds="corpus/$t"
    work="target/corpus/$t"
    mkdir -p "$seeds" "$work" "artifacts/$t"
    opts=(-max_total_time="$secs" -max_len=4096 -timeout=60 -rss_limit_mb=4096 -print_final_stats=1)
    [ -f "dict/$t.dict" ] && opts+=(-dict="dict/$t.dict")
    before=$(find "artifacts/$t" -type f | sort)
    say "fuzzing $t for ${secs}s (seeds: fuzz/$seeds)"
    # The full libFuzzer log goes to fuzz/target/<target>.log; progress and panics are shown.
    set +e
    dirs=("$work" "$seeds")
    # Regressions run first, with the corpus: a bug that is back (or still open) fails here.
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    cargo "${toolchain[@]}" fuzz run "${build_flags[@]}" "$t" "${dirs[@]}" -- "${opts[@]}" 2>&1 |
        tee "target/$t.log" |
        awk '/panicked at/ { n = 3 } n > 0 { print substr($0, 1, 400); n--; fflush(); next }
             /^#[0-9]+[ \t]+(INITED|DONE)|^stat::|^SUMMARY|^fuzz harness|^  \/v1\/|^    first detail/ { print; fflush() }'
    status=${PIPESTATUS[0]}
    set -e
    after=$(find "artifacts/$t" -type f | sort)
    new=$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed '/^$/d')
    if [ "$status" -ne 0 ] || [ -n "$new" ]; then
        say "$t FAILED (exit $status); full log: fuzz/target/$t.log"
        for a in $new; do
            say "  artifact: fuzz/$a"
            say "  reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $t $a)"
        done
        failed+=("$t")
    else
        say "$t: no crash in ${secs}s"
    fi
done

# Data dirs of multipart harness processes that died without cleaning up.
for d in "${TMPDIR:-/tmp}"/musetalk-fuzz-*; do
    [ -d "$d" ] || continue
    pid=${d##*-}
    kill -0 "$pid" 2>/dev/null || rm -rf -- "$d"
done

if [ "${#failed[@]}" -gt 0 ]; then
    say "crashes found in: ${failed[*]}"
    exit 1
fi
say "all ${#targets[@]} targets ran ${secs}s without a crash"
