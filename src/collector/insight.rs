//! What a stage's resource window says about it: its GPU figures and a one-word verdict.
//!
//! The collector's [`Window`] holds raw averages per GPU; a stage wants one answer:
//! how busy the GPU(s) its pipeline ran on were, what moved over PCIe, the energy, and
//! *why* it took as long as it did. The rule is deliberately simple and documented
//! (README "GPU verdicts"), so a user can check it against the figures beside it.

use serde::Serialize;

use super::{AvgPeak, GpuWindow, Window};

/// Why a stage took its time, from its GPU and pipeline-CPU figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The SMs were busy most of the time: the GPU's compute is the limit.
    GpuBound,
    /// The GPU's memory was the busiest part (bandwidth, not capacity).
    MemoryBound,
    /// PCIe carried at least half of what the link can while the SMs waited.
    TransferBound,
    /// The GPU mostly waited while the pipeline's CPU worked (Python, decoding, copies).
    CpuBound,
    /// A throttle reason (power cap, thermal, HW slowdown) held the clocks down.
    Throttled,
    /// Neither the GPU nor the pipeline's CPU did much (waiting on disk, a lock, a sleep).
    Idle,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::GpuBound => "gpu-bound",
            Verdict::MemoryBound => "memory-bound",
            Verdict::TransferBound => "transfer-bound",
            Verdict::CpuBound => "cpu-bound",
            Verdict::Throttled => "throttled",
            Verdict::Idle => "idle",
        }
    }
}

/// The figures the verdict is decided from (each 0–1 unless said).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VerdictInputs {
    /// SM busy share: GPM SM-active where the GPU has it, else NVML utilization.gpu.
    pub sm: f64,
    /// Memory bandwidth share: GPM DRAM bandwidth, else the memory controller's busy share.
    pub memory_bandwidth: Option<f64>,
    /// PCIe bytes per second in the busier direction / the link's top speed.
    pub pcie: Option<f64>,
    /// Share of samples with a throttle reason active.
    pub throttled: Option<f64>,
    /// The pipeline tree's CPU, in cores (1.0 = one core busy all the time).
    pub cpu_cores: Option<f64>,
}

/// Thresholds of the rule, named so the README and the tests say the same thing.
pub const SM_BUSY: f64 = 0.7;
pub const SM_WAITING: f64 = 0.4;
pub const SM_IDLE: f64 = 0.1;
pub const MEMORY_BUSY: f64 = 0.6;
pub const PCIE_BUSY: f64 = 0.5;
pub const THROTTLED_SHARE: f64 = 0.5;
pub const CPU_BUSY_CORES: f64 = 0.5;

/// The rule, first match wins:
/// 1. `throttled`: a throttle reason in ≥ half the samples while the SMs worked (≥ 30 %);
/// 2. `memory-bound`: memory bandwidth ≥ 60 % and at least the SM share;
/// 3. `gpu-bound`: SMs ≥ 70 %;
/// 4. `transfer-bound`: PCIe ≥ 50 % of the link in one direction;
/// 5. `idle`: SMs < 10 % and the pipeline's CPU < half a core;
/// 6. `cpu-bound`: SMs < 40 % (the GPU waits, and nothing above explains it), or the
///    pipeline's CPU ≥ half a core with the SMs below 70 %;
/// 7. otherwise `gpu-bound` (the SMs are the busiest thing we can see).
pub fn verdict(i: &VerdictInputs) -> Verdict {
    let cpu = i.cpu_cores.unwrap_or(0.0);
    if i.throttled.is_some_and(|t| t >= THROTTLED_SHARE) && i.sm >= 0.3 {
        Verdict::Throttled
    } else if i.memory_bandwidth.is_some_and(|m| m >= MEMORY_BUSY && m >= i.sm) {
        Verdict::MemoryBound
    } else if i.sm >= SM_BUSY {
        Verdict::GpuBound
    } else if i.pcie.is_some_and(|p| p >= PCIE_BUSY) {
        Verdict::TransferBound
    } else if i.sm < SM_IDLE && cpu < CPU_BUSY_CORES {
        Verdict::Idle
    } else if i.sm < SM_WAITING || cpu >= CPU_BUSY_CORES {
        Verdict::CpuBound
    } else {
        Verdict::GpuBound
    }
}

/// A stage's GPU figures over its own window (the GPUs its pipeline ran on; all GPUs
/// when the driver does not say which processes use which GPU).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StageGpu {
    /// SM busy share (GPM SM-active where available), of the busiest GPU.
    pub sm: AvgPeak,
    pub memory_bandwidth: Option<AvgPeak>,
    pub tensor_active: Option<AvgPeak>,
    pub pcie_rx_bytes: Option<f64>,
    pub pcie_tx_bytes: Option<f64>,
    /// Average power draw, summed over the GPUs.
    pub power_watts: Option<f64>,
    pub energy_joules: Option<f64>,
    pub throttle_reasons: Vec<String>,
    /// The pipeline tree's CPU over the window, in cores.
    pub pipeline_cpu_cores: Option<f64>,
    pub verdict: Verdict,
}

/// The GPUs the window's pipeline tree was seen on; all of them when unknown.
fn pipeline_gpus(w: &Window) -> impl Iterator<Item = &GpuWindow> {
    let tree_gpus = w.tree.as_ref().map(|t| t.gpus.as_slice()).unwrap_or(&[]);
    w.gpus.iter().filter(move |g| tree_gpus.is_empty() || tree_gpus.contains(&g.index))
}

/// The stage figures of `w`, or `None` without GPU data.
pub fn stage_gpu(w: &Window) -> Option<StageGpu> {
    let gpus: Vec<&GpuWindow> = pipeline_gpus(w).collect();
    let busiest = |get: &dyn Fn(&GpuWindow) -> Option<AvgPeak>| gpus.iter().filter_map(|g| get(g)).max_by(|a, b| a.avg.total_cmp(&b.avg));
    let sm = busiest(&|g| g.sm_active.or(g.utilization))?;
    let memory_bandwidth = busiest(&|g| g.dram_bandwidth.or(g.memory_bandwidth));
    let sum = |get: &dyn Fn(&GpuWindow) -> Option<f64>| gpus.iter().filter_map(|g| get(g)).fold(None, |acc: Option<f64>, v| Some(acc.unwrap_or(0.0) + v));
    let pcie = gpus
        .iter()
        .filter_map(|g| {
            let link = g.pcie_link_bytes_per_second.filter(|l| *l > 0.0)?;
            let moved = g.pcie_rx_bytes.unwrap_or(0.0).max(g.pcie_tx_bytes.unwrap_or(0.0));
            (w.seconds > 0.0).then(|| moved / w.seconds / link)
        })
        .max_by(f64::total_cmp);
    let mut reasons: Vec<String> = Vec::new();
    for r in gpus.iter().flat_map(|g| g.throttle_reasons.iter()) {
        if !reasons.contains(r) {
            reasons.push(r.clone());
        }
    }
    let cpu_cores = w.tree.as_ref().map(|t| t.cpu.avg * w.cpu_count.unwrap_or(1) as f64);
    let inputs = VerdictInputs {
        sm: sm.avg,
        memory_bandwidth: memory_bandwidth.map(|m| m.avg),
        pcie,
        throttled: gpus.iter().filter_map(|g| g.throttled_share).max_by(f64::total_cmp),
        cpu_cores,
    };
    Some(StageGpu {
        sm,
        memory_bandwidth,
        tensor_active: busiest(&|g| g.tensor_active),
        pcie_rx_bytes: sum(&|g| g.pcie_rx_bytes),
        pcie_tx_bytes: sum(&|g| g.pcie_tx_bytes),
        power_watts: sum(&|g| g.power_watts.map(|p| p.avg)),
        energy_joules: sum(&|g| g.energy_joules),
        throttle_reasons: reasons,
        pipeline_cpu_cores: cpu_cores,
        verdict: verdict(&inputs),
    })
}

/// Energy of a whole window over the GPUs its pipeline ran on (all GPUs when unknown).
pub fn energy_joules(w: &Window) -> Option<f64> {
    pipeline_gpus(w).filter_map(|g| g.energy_joules).fold(None, |acc, v| Some(acc.unwrap_or(0.0) + v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::TreeWindow;

    fn v(sm: f64) -> VerdictInputs {
        VerdictInputs { sm, ..Default::default() }
    }

    #[test]
    fn the_rule_in_order() {
        assert_eq!(verdict(&v(0.95)), Verdict::GpuBound);
        assert_eq!(verdict(&VerdictInputs { memory_bandwidth: Some(0.8), ..v(0.6) }), Verdict::MemoryBound);
        assert_eq!(verdict(&VerdictInputs { memory_bandwidth: Some(0.65), ..v(0.9) }), Verdict::GpuBound, "SMs busier than memory");
        assert_eq!(verdict(&VerdictInputs { throttled: Some(0.8), ..v(0.9) }), Verdict::Throttled);
        assert_eq!(verdict(&VerdictInputs { throttled: Some(0.8), ..v(0.05) }), Verdict::Idle, "an idle GPU drops its clocks: not throttling");
        assert_eq!(verdict(&VerdictInputs { throttled: Some(0.2), ..v(0.9) }), Verdict::GpuBound, "a moment of power cap is not the story");
        assert_eq!(verdict(&VerdictInputs { pcie: Some(0.7), ..v(0.3) }), Verdict::TransferBound);
        assert_eq!(verdict(&VerdictInputs { pcie: Some(0.7), ..v(0.85) }), Verdict::GpuBound);
        assert_eq!(verdict(&VerdictInputs { cpu_cores: Some(1.0), ..v(0.2) }), Verdict::CpuBound);
        assert_eq!(verdict(&VerdictInputs { cpu_cores: Some(1.0), ..v(0.05) }), Verdict::CpuBound, "Python busy, GPU idle");
        assert_eq!(verdict(&VerdictInputs { cpu_cores: Some(0.1), ..v(0.05) }), Verdict::Idle);
        assert_eq!(verdict(&VerdictInputs { cpu_cores: Some(0.9), ..v(0.55) }), Verdict::CpuBound);
        assert_eq!(verdict(&VerdictInputs { cpu_cores: Some(0.1), ..v(0.55) }), Verdict::GpuBound);
        assert_eq!(verdict(&v(0.3)), Verdict::CpuBound, "the GPU waits and nothing else explains it");
    }

    #[test]
    fn stage_figures_follow_the_pipelines_gpu() {
        let ap = |avg: f64| Some(AvgPeak { avg, peak: avg, samples: 4 });
        let w = Window {
            samples: 4,
            seconds: 2.0,
            cpu_count: Some(8),
            gpus: vec![
                GpuWindow { index: 0, utilization: ap(0.1), power_watts: ap(60.0), energy_joules: Some(120.0), ..Default::default() },
                GpuWindow {
                    index: 1,
                    utilization: ap(0.5),
                    sm_active: ap(0.9),
                    dram_bandwidth: ap(0.3),
                    pcie_rx_bytes: Some(4e9),
                    pcie_tx_bytes: Some(1e9),
                    pcie_link_bytes_per_second: Some(32e9),
                    power_watts: ap(400.0),
                    energy_joules: Some(800.0),
                    throttle_reasons: vec!["power_cap".into()],
                    throttled_share: Some(0.25),
                    ..Default::default()
                },
            ],
            tree: Some(TreeWindow { cpu: AvgPeak { avg: 0.125, peak: 0.2, samples: 4 }, gpus: vec![1], ..Default::default() }),
            ..Default::default()
        };
        let g = stage_gpu(&w).unwrap();
        assert_eq!(g.sm.avg, 0.9, "GPM SM-active preferred over utilization.gpu");
        assert_eq!(g.energy_joules, Some(800.0), "only the pipeline's GPU");
        assert_eq!(g.pcie_rx_bytes, Some(4e9));
        assert_eq!(g.pipeline_cpu_cores, Some(1.0));
        assert_eq!(g.throttle_reasons, vec!["power_cap"]);
        assert_eq!(g.verdict, Verdict::GpuBound);
        assert_eq!(energy_joules(&w), Some(800.0));
        let mut all = w.clone();
        all.tree = None;
        assert_eq!(energy_joules(&all), Some(920.0), "no attribution: every GPU");
        assert!(stage_gpu(&Window::default()).is_none(), "no GPU: no figures, no verdict");
    }
}
