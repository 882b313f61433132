#!/usr/bin/env bash
# GPU check of musetalk-sidecar on a real NVIDIA GPU (issue 15): one bounded run (≤ 5 min,
# every step under `timeout`) that checks what CI, which has no GPU, cannot.
#
# How to run it:
#   1. Here, on the dev machine:   scripts/gpu-check.sh prepare      (PROFILE=debug for target/debug)
#      builds if needed and fills the git-ignored .gpu-check/ with the service binary, the
#      lib test binary (the #[ignore]d NVML tests), the criterion bench binary of
#      benches/collector.rs and scripts/gpu_load.py; prints its size (< 60 MiB) and the call:
#   2. Through the device tool:    run(command="bash scripts/gpu-check.sh run",
#                                      carry=[".gpu-check"], timeout_s=420)
#      On that machine (python3 with torch, psutil, nvidia-ml-py; no ffmpeg; nothing fetched).
#      Anywhere else: `OUT=dir scripts/gpu-check.sh run` (default OUT: ./gpu-check-out).
#   Knobs: PROFILE=debug|release and SKIP_BENCH=1 (prepare); OUT and BUDGET_S (run: the
#   steps share BUDGET_S seconds, default 285; a step with too little left is skipped).
#
# What `run` does, each step recorded (ok / failed / skipped + why) and the next one run
# whatever the last did:
#   1. nvidia-smi -q and one `--query-gpu` CSV reading (name, driver, memory, clocks, power).
#   2. the #[ignore]d NVML tests: `<lib tests> --ignored --nocapture nvml`.
#   3. the real service (`--backend command --realtime`, the worker = gpu_load.py holding
#      2 GiB and running matmuls), /readyz, then every hw_* and musetalk_gpu_* series of
#      /metrics beside nvidia-smi (and nvidia-ml-py for energy, PCIe and GPM) read at the
#      same moment, and the worker's pid / GPU memory / SM share as nvidia-smi sees them.
#   4. one job with per-stage GPU figures and energy, only where ffmpeg and ffprobe exist
#      (PATH or .gpu-check/bin): uploads are probed with ffprobe. Else "skipped".
#   5. the cost of a GPU sample: the bench's `gpu_sample` (MUSETALK_BENCH_NVML=system), and
#      GPUtil's nvidia-smi query ×20 (mean wall and CPU).
#   6. idle CPU over 20 s: the sidecar at 500 ms sampling beside the old Python monitor
#      (psutil + GPUtil's nvidia-smi every 500 ms), both as % of one core.
#   7. everything started is stopped (trap); exit 0 once the report is written.
#
# Files under $OUT (at most 8):
#   gpu-check.md      the summary a human reads: one line per step, the comparison table
#   gpu-check.json    every figure: per step, its status and readings
#   nvidia-smi-q.txt  the full `nvidia-smi -q`
#   nvml-tests.log    the NVML tests' output (they print the GPU sample)
#   sidecar.log       the service's log (the worker's stderr included)
#   metrics.txt       the /metrics scrape the comparison used
#   bench.log         the criterion output of the gpu_sample benchmark
#   job.json          the job's JSON answer with its report (step 4, when it ran)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GC="$ROOT/.gpu-check"
MAX_BYTES=$((60 * 1024 * 1024))

die() { echo "gpu-check: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------
# prepare (dev machine)
# ---------------------------------------------------------------------------------------

# The executable cargo reports for a JSON message stream on stdin, matching a target kind and name.
artifact() {
    python3 -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and kind in m["target"]["kind"] and m["target"]["name"] == name:
        print(m["executable"])
' "$1" "$2" | tail -n 1
}

prepare() {
    local profile=${PROFILE:-release} rel=() bin libtest bench=""
    case "$profile" in
        release) rel=(--release) ;;
        debug) ;;
        *) die "PROFILE must be release or debug, not $profile" ;;
    esac
    cd "$ROOT" || die "cannot cd to $ROOT"
    echo "== building ($profile)"
    cargo build "${rel[@]}" --bin musetalk-sidecar || die "cargo build failed"
    bin="$ROOT/target/$profile/musetalk-sidecar"
    [[ -x "$bin" ]] || die "$bin is missing"
    libtest=$(cargo test "${rel[@]}" --lib --no-run --message-format=json | artifact lib musetalk_sidecar)
    [[ -n "$libtest" && -x "$libtest" ]] || die "could not find the lib test binary (cargo test ${rel[*]} --lib --no-run)"
    if [[ -f benches/collector.rs && -z "${SKIP_BENCH:-}" ]]; then
        bench=$(cargo bench --bench collector --no-run --message-format=json | artifact bench collector)
        [[ -n "$bench" ]] || echo "warning: no bench executable found; step 5 will skip the bench" >&2
    fi
    rm -rf "$GC"
    mkdir -p "$GC/bin"
    cp "$bin" "$GC/musetalk-sidecar"
    cp "$libtest" "$GC/lib-tests"
    [[ -n "$bench" ]] && cp "$bench" "$GC/collector-bench"
    cp scripts/gpu_load.py "$GC/gpu_load.py"
    # Debug info is most of a Rust binary's size and is not needed to run it.
    local size
    if command -v strip >/dev/null; then
        strip --strip-debug "$GC/musetalk-sidecar" "$GC/lib-tests" ${bench:+"$GC/collector-bench"}
        size=$(du -sb "$GC" | cut -f1)
        ((size < MAX_BYTES)) || strip --strip-all "$GC/musetalk-sidecar" "$GC/lib-tests" ${bench:+"$GC/collector-bench"}
    fi
    {
        echo "profile=$profile"
        echo "git=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
        echo "at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "bench=${bench:+yes}"
    } >"$GC/MANIFEST"
    echo "(optional: static ffmpeg and ffprobe put in .gpu-check/bin enable step 4, the job)" >"$GC/bin/README"
    size=$(du -sb "$GC" | cut -f1)
    ls -l "$GC"
    echo "== .gpu-check: $((size / 1024 / 1024)) MiB ($size bytes; limit 60 MiB)"
    ((size < MAX_BYTES)) || die ".gpu-check is over 60 MiB: the device tool carries 64 MiB with the working tree"
    cat <<'EOF'
== now, through the device tool (one call, ~3-5 min):
   run(command="bash scripts/gpu-check.sh run", carry=[".gpu-check"], timeout_s=420)
EOF
}

# ---------------------------------------------------------------------------------------
# run (GPU machine)
# ---------------------------------------------------------------------------------------

DEADLINE=0 OUT_DIR="" TMP="" STEPS="" PY="" SIDECAR_PID="" WORKER_PID="" PORT="" URL=""

# step_result FILE NAME STATUS REASON: a step's JSON when the step has no richer one.
step_result() { python3 "$PY" step-json "$STEPS/$1" "$2" "$3" "$4"; }

# The run's time budget: every step is bounded by what is left of BUDGET_S (default 285 s;
# stopping and the report take seconds more, so the whole run stays under 5 minutes).
# t N: N seconds, or less if less is left.  enough N FILE NAME: N seconds are left, else the
# step is recorded as skipped.
t() {
    local n=$1 left=$((DEADLINE - SECONDS))
    ((left < n)) && n=$left
    ((n < 1)) && n=1
    echo "$n"
}
enough() {
    (($1 <= DEADLINE - SECONDS)) && return 0
    step_result "$2" "$3" skipped "skipped: less than $1 s of the run's ${BUDGET_S:-285} s budget left"
    return 1
}

# ensure_step RC FILE NAME WHAT: a helper that died (or hit its timeout, 124) before writing
# its step file leaves a "failed" one instead.
ensure_step() {
    [[ -f "$STEPS/$2" ]] && return 0
    local why="$4 (exit $1)"
    (($1 == 124)) && why="$4: timed out"
    step_result "$2" "$3" failed "$why"
}

# Stops what this run started: the service (SIGTERM: it sends its worker `shutdown`), then
# anything left, by pid.
stop_all() {
    local pid
    if [[ -n "$SIDECAR_PID" ]] && kill -0 "$SIDECAR_PID" 2>/dev/null; then
        kill -TERM "$SIDECAR_PID" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$SIDECAR_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$SIDECAR_PID" 2>/dev/null
        wait "$SIDECAR_PID" 2>/dev/null
    fi
    # Whatever the service left (it kills its workers' process groups on shutdown).
    for pid in "$WORKER_PID" $(jobs -p); do
        [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null
    done
    SIDECAR_PID="" WORKER_PID=""
}

cleanup() {
    stop_all
    [[ -n "$TMP" ]] && rm -rf "$TMP"
}

step_nvidia_smi() {
    timeout "$(t 20)" nvidia-smi -q >"$OUT_DIR/nvidia-smi-q.txt" 2>&1 ||
        echo "(nvidia-smi -q failed: exit $?)" >>"$OUT_DIR/nvidia-smi-q.txt"
    timeout "$(t 20)" python3 "$PY" smi-summary "$STEPS/01-nvidia-smi.json"
    ensure_step $? 01-nvidia-smi.json nvidia_smi "nvidia-smi did not answer"
}

step_nvml_tests() {
    if [[ ! -x "$GC/lib-tests" ]]; then
        step_result 02-nvml-tests.json nvml_tests failed "no .gpu-check/lib-tests: run prepare first"
        return
    fi
    enough 10 02-nvml-tests.json nvml_tests || return
    timeout "$(t 45)" "$GC/lib-tests" --ignored --nocapture nvml >"$OUT_DIR/nvml-tests.log" 2>&1
    echo "(exit status $?)" >>"$OUT_DIR/nvml-tests.log"
    python3 "$PY" parse-nvml-tests "$OUT_DIR/nvml-tests.log" "$STEPS/02-nvml-tests.json"
}

start_service() {
    if [[ ! -x "$GC/musetalk-sidecar" ]]; then
        step_result 03-service.json service failed "no .gpu-check/musetalk-sidecar: run prepare first"
        return 1
    fi
    PORT=$(python3 "$PY" free-port) || PORT=18000
    URL="http://127.0.0.1:$PORT"
    local ready
    # --ffmpeg/--ffprobe where step 4 found them; the pipeline gets PATH from the service.
    "$GC/musetalk-sidecar" serve --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" \
        --backend command \
        --pipeline-command "python3 -u $PY pipeline --video {video} --audio {audio} --output {output} --mem-gib 1 --stage-seconds 2" \
        --realtime --worker-command "python3 -u $PY worker --mem-gib 2 --pidfile $TMP/worker.pid" \
        --sample-interval 500ms --shutdown-grace 2s --kill-grace 2s \
        --ffmpeg "${FFMPEG:-ffmpeg}" --ffprobe "${FFPROBE:-ffprobe}" \
        >"$OUT_DIR/sidecar.log" 2>&1 &
    SIDECAR_PID=$!
    ready=$(timeout "$(t 95)" python3 "$PY" wait-ready "$URL/readyz" "$(t 90)" "$SIDECAR_PID")
    local rc=$?
    [[ -f "$TMP/worker.pid" ]] && WORKER_PID=$(<"$TMP/worker.pid")
    if ((rc != 0)) || ! kill -0 "$SIDECAR_PID" 2>/dev/null; then
        step_result 03-service.json service failed "service not ready: $ready (see sidecar.log)"
        return 1
    fi
    local parent
    parent=$(awk '{print $4}' "/proc/$WORKER_PID/stat" 2>/dev/null)
    step_result 03-service.json service ok "pid $SIDECAR_PID on $URL, $ready; worker pid ${WORKER_PID:-unknown} (parent ${parent:-?})"
    return 0
}

step_compare() {
    enough 15 04-compare.json metrics_vs_nvidia_smi || return
    sleep 5 # a few 500 ms samples with the worker's load running
    timeout "$(t 30)" python3 "$PY" compare --metrics-url "$URL/metrics" --worker-pid "${WORKER_PID:-0}" \
        --metrics-out "$OUT_DIR/metrics.txt" "$STEPS/04-compare.json"
    ensure_step $? 04-compare.json metrics_vs_nvidia_smi "the compare helper failed"
}

step_job() {
    local ffmpeg ffprobe
    ffmpeg=$(command -v ffmpeg || true) ffprobe=$(command -v ffprobe || true)
    if [[ -z "$ffmpeg" || -z "$ffprobe" ]]; then
        step_result 05-job.json job skipped "skipped: no ffprobe on this machine (uploads are probed with ffprobe; put static ffmpeg and ffprobe in .gpu-check/bin to run it)"
        return
    fi
    if [[ -z "$URL" ]]; then
        step_result 05-job.json job skipped "skipped: the service did not start"
        return
    fi
    enough 90 05-job.json job || return
    if ! timeout 10 "$ffmpeg" -nostdin -v error -f lavfi -i testsrc=size=256x256:rate=25 -t 2 -pix_fmt yuv420p "$TMP/clip.mp4" ||
        ! timeout 10 "$ffmpeg" -nostdin -v error -f lavfi -i sine=frequency=440:duration=3 "$TMP/voice.wav"; then
        step_result 05-job.json job failed "ffmpeg could not make the test clip"
        return
    fi
    timeout "$(t 60)" python3 "$PY" job --url "$URL" --video "$TMP/clip.mp4" --audio "$TMP/voice.wav" \
        --report-out "$OUT_DIR/job.json" "$STEPS/05-job.json"
    ensure_step $? 05-job.json job "the job helper failed or the job outlasted 60 s"
}

step_sample_cost() {
    if [[ ! -x "$GC/collector-bench" ]]; then
        step_result 06-bench.json sample_cost_bench skipped "skipped: no .gpu-check/collector-bench (prepare found no bench of benches/collector.rs)"
    elif enough 30 06-bench.json sample_cost_bench; then
        MUSETALK_BENCH_NVML=system CRITERION_HOME="$TMP/criterion" \
            timeout "$(t 60)" "$GC/collector-bench" --bench gpu_sample >"$OUT_DIR/bench.log" 2>&1
        echo "(exit status $?)" >>"$OUT_DIR/bench.log"
        python3 "$PY" parse-bench "$OUT_DIR/bench.log" "$STEPS/06-bench.json"
    fi
    enough 5 07-smi-timing.json sample_cost_nvidia_smi || return
    timeout "$(t 30)" python3 "$PY" smi-timing --n 20 "$STEPS/07-smi-timing.json"
    ensure_step $? 07-smi-timing.json sample_cost_nvidia_smi "the timing helper failed"
}

step_idle_cpu() {
    if [[ -z "$SIDECAR_PID" ]] || ! kill -0 "$SIDECAR_PID" 2>/dev/null; then
        step_result 08-idle-cpu.json idle_cpu skipped "skipped: the service is not running"
        return
    fi
    enough 30 08-idle-cpu.json idle_cpu || return
    timeout "$(t 35)" python3 "$PY" idle-cpu --pid "$SIDECAR_PID" --worker-pid "${WORKER_PID:-0}" --seconds 20 "$STEPS/08-idle-cpu.json"
    ensure_step $? 08-idle-cpu.json idle_cpu "the idle-cpu helper failed"
}

run() {
    OUT_DIR=${OUT:-$ROOT/gpu-check-out}
    mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || die "mktemp failed"
    STEPS="$TMP/steps"
    mkdir -p "$STEPS" "$TMP/data"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    # The working tree's helper (it travels with the tree), else the copy prepare made.
    PY="$ROOT/scripts/gpu_load.py"
    [[ -f "$PY" ]] || PY="$GC/gpu_load.py"
    [[ -d "$GC/bin" ]] && PATH="$GC/bin:$PATH"
    chmod +x "$GC"/musetalk-sidecar "$GC"/lib-tests "$GC"/collector-bench "$GC"/bin/* 2>/dev/null
    local started=$SECONDS
    DEADLINE=$((SECONDS + ${BUDGET_S:-285}))
    {
        echo "host=$(uname -n)"
        echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        sed 's/^/prepared_/' "$GC/MANIFEST" 2>/dev/null
        echo "python=$(python3 -c 'import sys; print(sys.version.split()[0])' 2>&1)"
        echo "torch=$(timeout 30 python3 -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -n 1)"
    } >"$STEPS/meta"
    cd "$ROOT" || die "cannot cd to $ROOT"

    echo "== 1. nvidia-smi"; step_nvidia_smi
    echo "== 2. NVML tests"; step_nvml_tests
    echo "== 3. service, /metrics vs nvidia-smi"
    if start_service; then
        step_compare
    else
        step_result 04-compare.json metrics_vs_nvidia_smi skipped "skipped: the service did not start"
    fi
    echo "== 4. one job"; step_job
    echo "== 5. GPU sample cost"; step_sample_cost
    echo "== 6. idle CPU"; step_idle_cpu
    echo "== 7. stopping"
    stop_all
    echo "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ) ($((SECONDS - started)) s)" >>"$STEPS/meta"
    if python3 "$PY" report "$STEPS" "$OUT_DIR/gpu-check.md" "$OUT_DIR/gpu-check.json"; then
        cat "$OUT_DIR/gpu-check.md"
        echo "== report: $OUT_DIR/gpu-check.md, $OUT_DIR/gpu-check.json ($((SECONDS - started)) s)"
        exit 0
    fi
    echo "gpu-check: the report could not be written" >&2
    exit 1
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *)
        sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
