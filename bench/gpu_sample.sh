#!/usr/bin/env bash
# The GPU sample's cost (DESIGN.md §9: ≤ 2 ms CPU per sample of one GPU, every NVML field,
# with registered trees) without a GPU: benches/collector.rs's `gpu_sample` against the
# fake libnvidia-ml.so.1 of the tests, scripted as one H100 with every field supported
# (GPM, per-process SM samples) and the benchmark's 4-process tree on the GPU.
#
#   bash bench/gpu_sample.sh
#
# The fake answers from memory, so this measures the sidecar's side (nvml-wrapper, our
# reads, the tree attribution, publishing): a real driver adds its own ioctl time, which
# scripts/gpu-check.sh measures on a lent GPU (MUSETALK_BENCH_NVML=system).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cc -shared -fPIC -O2 -o "$work/libnvidia-ml.so.1" tests/fixtures/fake_nvml/fake_nvml.c -lpthread -lm
cat >"$work/script" <<'SCRIPT'
driver 550.54.15
gpu 0 uuid=GPU-0b8f1c2d-fake-h100 name="NVIDIA H100 80GB HBM3" util=93 mem_util=38 enc=0 dec=4 mem_total=85520809984 mem_used=21474836480 temp=61 power_mw=412000 power_limit_mw=700000 energy_mj=5000000 pcie_rx_kbps=2048000 pcie_tx_kbps=1024000 pcie_gen=5 pcie_width=16 clock_sm=1755 clock_mem=2619 clock_sm_max=1980 clock_mem_max=2619 reasons=0x4 ecc_corr=3 ecc_uncorr=0 gpm=1 gpm_sm=88 gpm_occ=52 gpm_tensor=61 gpm_dram=35 proc_util=1
SCRIPT
# When the benchmark has started its tree, put every process of it on the GPU (by pid:
# the fake's command-line matching scans /proc, which would be the fake's cost, not ours).
(
    while [ ! -s "$work/tree" ]; do sleep 0.05; done
    root=$(cat "$work/tree")
    for pid in $root $(cat /proc/"$root"/task/*/children 2>/dev/null); do
        echo "process 0 pid=$pid mem=1073741824 sm=40"
    done >>"$work/script"
) &
MUSETALK_BENCH_NVML="$work/libnvidia-ml.so.1" FAKE_NVML_SCRIPT="$work/script" MUSETALK_BENCH_TREE_PIDS="$work/tree" \
    cargo bench --bench collector -- gpu_sample
