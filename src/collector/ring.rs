//! Bounded ring buffer of samples, answering "average and peak between t0 and t1".

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ClockReason, GpuSample, Sample};

/// Average and peak of one figure over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AvgPeak {
    pub avg: f64,
    pub peak: f64,
    pub samples: usize,
}

#[derive(Default)]
struct Acc {
    sum: f64,
    peak: f64,
    n: usize,
}

impl Acc {
    fn add(&mut self, v: f64) {
        if self.n == 0 || v > self.peak {
            self.peak = v;
        }
        self.sum += v;
        self.n += 1;
    }
    fn finish(&self) -> Option<AvgPeak> {
        (self.n > 0).then(|| AvgPeak { avg: self.sum / self.n as f64, peak: self.peak, samples: self.n })
    }
}

/// One GPU over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct GpuWindow {
    pub index: u32,
    pub name: String,
    /// SM busy share (NVML utilization.gpu), 0–1.
    pub utilization: Option<AvgPeak>,
    /// Memory-controller busy share (NVML utilization.memory), 0–1.
    pub memory_bandwidth: Option<AvgPeak>,
    pub memory_used_bytes: Option<AvgPeak>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<AvgPeak>,
    pub power_watts: Option<AvgPeak>,
    /// GPM (Hopper and newer), 0–1.
    pub sm_active: Option<AvgPeak>,
    pub tensor_active: Option<AvgPeak>,
    pub dram_bandwidth: Option<AvgPeak>,
    /// PCIe bytes moved in the window (pro-rated from the samples around it).
    pub pcie_rx_bytes: Option<f64>,
    pub pcie_tx_bytes: Option<f64>,
    /// The link's top speed each way, bytes per second.
    pub pcie_link_bytes_per_second: Option<f64>,
    /// Energy in the window: NVML's counter (pro-rated), or average power × duration
    /// when the counter is not reported or only one sample is there.
    pub energy_joules: Option<f64>,
    /// Clock-event reasons that slow a busy GPU (power_cap, thermal, …) seen in the window.
    pub throttle_reasons: Vec<String>,
    /// Share of the window's samples with one of them active, 0–1.
    pub throttled_share: Option<f64>,
}

/// One registered process tree over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TreeWindow {
    pub cpu: AvgPeak,
    pub rss: AvgPeak,
    pub gpu_memory: Option<AvgPeak>,
    pub gpu_util: Option<AvgPeak>,
    /// Most processes seen in the tree at once.
    pub max_processes: usize,
    /// The GPUs (indexes) the tree's processes were seen on.
    pub gpus: Vec<u32>,
}

/// Everything the ring knows about `[from, to]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Window {
    pub samples: usize,
    /// Length of the window, seconds.
    pub seconds: f64,
    pub cpu: Option<AvgPeak>,
    pub cpu_count: Option<usize>,
    pub memory_used: Option<AvgPeak>,
    pub memory_total: Option<u64>,
    pub gpus: Vec<GpuWindow>,
    pub tree: Option<TreeWindow>,
}

/// One GPU's accumulators over a window, by name (what used to be a positional tuple).
#[derive(Default)]
struct GpuAcc {
    index: u32,
    name: String,
    util: Acc,
    memory_bandwidth: Acc,
    memory: Acc,
    memory_total: Option<u64>,
    temperature: Acc,
    power: Acc,
    sm_active: Acc,
    tensor_active: Acc,
    dram_bandwidth: Acc,
    link: Option<f64>,
    reasons_known: usize,
    throttled: usize,
    reasons: Vec<ClockReason>,
}

impl GpuAcc {
    fn add(&mut self, g: &GpuSample) {
        let opt = |acc: &mut Acc, v: Option<f64>| {
            if let Some(v) = v {
                acc.add(v)
            }
        };
        opt(&mut self.util, g.util_general);
        opt(&mut self.memory_bandwidth, g.util_memory_bandwidth);
        opt(&mut self.memory, g.memory_used.map(|v| v as f64));
        opt(&mut self.temperature, g.temperature_celsius);
        opt(&mut self.power, g.power_watts);
        opt(&mut self.sm_active, g.gpm.sm_active);
        opt(&mut self.tensor_active, g.gpm.tensor_active);
        opt(&mut self.dram_bandwidth, g.gpm.dram_bandwidth);
        self.memory_total = g.memory_total.or(self.memory_total);
        self.link = g.pcie_link_bytes_per_second.or(self.link);
        if let Some(bits) = g.clocks_event_reasons {
            self.reasons_known += 1;
            let mut throttled = false;
            for r in ClockReason::active(bits).filter(|r| r.is_throttle()) {
                throttled = true;
                if !self.reasons.contains(&r) {
                    self.reasons.push(r);
                }
            }
            self.throttled += throttled as usize;
        }
    }
}

/// The increase of a counter over time-ordered readings; a drop is a reset (driver
/// reload, wrap) after which the new reading is what accumulated since, as Prometheus'
/// `increase()` counts it. With the readings' first and last instants.
fn increase(readings: impl Iterator<Item = (Instant, f64)>) -> Option<(f64, Instant, Instant)> {
    let mut acc: Option<(f64, Instant, Instant, f64)> = None;
    for (at, v) in readings {
        acc = Some(match acc {
            None => (0.0, at, at, v),
            Some((sum, first, _, prev)) => (sum + if v >= prev { v - prev } else { v }, first, at, v),
        });
    }
    acc.map(|(sum, first, last, _)| (sum, first, last))
}

/// Fixed-capacity FIFO of samples: memory is bounded by `--sample-retention`.
pub struct Ring {
    cap: usize,
    buf: VecDeque<Arc<Sample>>,
    /// How far from a sample-less window a sample may be and still stand in for it
    /// (one sample interval: further away, it says nothing about the window).
    near: Duration,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Ring { cap: cap.max(1), buf: VecDeque::with_capacity(cap.clamp(1, 4096)), near: Duration::from_secs(1) }
    }

    /// Sets how far a stand-in sample may be from a window with no sample of its own.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.near = interval;
        self
    }

    pub fn push(&mut self, s: Arc<Sample>) {
        if self.buf.len() == self.cap {
            self.buf.pop_front();
        }
        self.buf.push_back(s);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn recent(&self, n: usize) -> Vec<Arc<Sample>> {
        self.buf.iter().skip(self.buf.len().saturating_sub(n)).cloned().collect()
    }

    /// Samples taken within `[from, to]` (inclusive), aggregated. A window shorter
    /// than the sample interval holds no sample: the one right after it (whose
    /// NVML averages cover it) stands in. Counters (energy, PCIe bytes) are read from
    /// the samples around the window and pro-rated to its length.
    pub fn window(&self, from: Instant, to: Instant, tree: Option<u64>) -> Window {
        // Samples are in time order: binary-search the ends instead of scanning.
        let start = self.buf.partition_point(|s| s.at < from);
        let end = self.buf.partition_point(|s| s.at <= to).max(start);
        let mut w = Window { samples: end - start, seconds: to.saturating_duration_since(from).as_secs_f64(), ..Window::default() };
        let inside: Vec<&Arc<Sample>> = if start < end {
            self.buf.range(start..end).collect()
        } else {
            let after = self.buf.get(end).filter(|s| s.at.saturating_duration_since(to) <= self.near);
            let before = || start.checked_sub(1).and_then(|i| self.buf.get(i)).filter(|s| from.saturating_duration_since(s.at) <= self.near);
            after.or_else(before).into_iter().collect()
        };
        let (mut cpu, mut mem) = (Acc::default(), Acc::default());
        let (mut t_cpu, mut t_rss, mut t_gmem, mut t_gutil) = (Acc::default(), Acc::default(), Acc::default(), Acc::default());
        let mut max_procs = 0;
        let mut tree_gpus: Vec<u32> = Vec::new();
        let mut gpus: Vec<GpuAcc> = Vec::new();
        for s in &inside {
            if let Some(c) = &s.cpu {
                cpu.add(c.total);
                w.cpu_count = Some(c.per_cpu.len());
            }
            if let Some(m) = &s.memory {
                mem.add(m.used as f64);
                w.memory_total = Some(m.total);
            }
            for g in s.gpus.iter().flatten() {
                let slot = match gpus.iter().position(|e| e.index == g.index) {
                    Some(i) => i,
                    None => {
                        gpus.push(GpuAcc { index: g.index, name: g.name.clone(), ..GpuAcc::default() });
                        gpus.len() - 1
                    }
                };
                gpus[slot].add(g);
            }
            if let Some(key) = tree
                && let Some(t) = s.trees.iter().find(|t| t.key == key)
            {
                t_cpu.add(t.cpu_ratio);
                t_rss.add(t.rss_bytes as f64);
                if let Some(v) = t.gpu_memory_bytes {
                    t_gmem.add(v as f64);
                }
                if let Some(v) = t.gpu_util {
                    t_gutil.add(v);
                }
                max_procs = max_procs.max(t.pids.len());
                for i in &t.gpus {
                    if !tree_gpus.contains(i) {
                        tree_gpus.push(*i);
                    }
                }
            }
        }
        // Counters: from the last sample at or before `from` to the first at or after `to`.
        let lo = start.saturating_sub(1);
        let hi = (end + 1).min(self.buf.len());
        let bracket: Vec<&Arc<Sample>> = self.buf.range(lo..hi).collect();
        let prorate = |r: Option<(f64, Instant, Instant)>| {
            r.and_then(|(v, a, b)| {
                let span = b.saturating_duration_since(a).as_secs_f64();
                (span > 0.0).then(|| v * w.seconds / span)
            })
        };
        w.cpu = cpu.finish();
        w.memory_used = mem.finish();
        w.gpus = gpus
            .into_iter()
            .map(|a| {
                let series = |get: fn(&GpuSample) -> Option<f64>| {
                    increase(bracket.iter().filter_map(|s| s.gpus.iter().flatten().find(|g| g.index == a.index).and_then(get).map(|v| (s.at, v))))
                };
                let power = a.power.finish();
                let energy = prorate(series(|g| g.energy_joules)).or_else(|| power.map(|p| p.avg * w.seconds));
                GpuWindow {
                    index: a.index,
                    name: a.name,
                    utilization: a.util.finish(),
                    memory_bandwidth: a.memory_bandwidth.finish(),
                    memory_used_bytes: a.memory.finish(),
                    memory_total_bytes: a.memory_total,
                    temperature_celsius: a.temperature.finish(),
                    power_watts: power,
                    sm_active: a.sm_active.finish(),
                    tensor_active: a.tensor_active.finish(),
                    dram_bandwidth: a.dram_bandwidth.finish(),
                    pcie_rx_bytes: prorate(series(|g| g.pcie_rx_bytes)),
                    pcie_tx_bytes: prorate(series(|g| g.pcie_tx_bytes)),
                    pcie_link_bytes_per_second: a.link,
                    energy_joules: energy,
                    throttle_reasons: a.reasons.iter().map(|r| r.as_str().to_string()).collect(),
                    throttled_share: (a.reasons_known > 0).then(|| a.throttled as f64 / a.reasons_known as f64),
                }
            })
            .collect();
        if let (Some(cpu), Some(rss)) = (t_cpu.finish(), t_rss.finish()) {
            w.tree = Some(TreeWindow { cpu, rss, gpu_memory: t_gmem.finish(), gpu_util: t_gutil.finish(), max_processes: max_procs, gpus: tree_gpus });
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{CpuSample, GpuSample, MemorySample, TreeSample};

    fn sample(at: Instant, cpu: f64, mem: u64, tree_rss: Option<u64>) -> Arc<Sample> {
        let mut s = Sample::new(at);
        s.cpu = Some(CpuSample { per_cpu: vec![cpu; 4], total: cpu, ..Default::default() });
        s.memory = Some(MemorySample { total: 1000, used: mem, ..Default::default() });
        s.gpus = Some(vec![GpuSample { index: 0, util_general: Some(cpu), memory_used: Some(mem), memory_total: Some(2000), ..Default::default() }]);
        if let Some(rss) = tree_rss {
            s.trees.push(TreeSample { key: 7, mode: "simple", pids: vec![1, 2, 3], cpu_ratio: cpu / 2.0, rss_bytes: rss, ..Default::default() });
        }
        Arc::new(s)
    }

    #[test]
    fn window_average_and_peak() {
        let t = Instant::now();
        let mut r = Ring::new(100);
        for (i, (cpu, mem, tree)) in [(0.1, 100, None), (0.5, 300, Some(10)), (0.9, 200, Some(30)), (0.3, 400, None)].into_iter().enumerate() {
            r.push(sample(t + Duration::from_secs(i as u64), cpu, mem, tree));
        }
        let w = r.window(t + Duration::from_secs(1), t + Duration::from_secs(2), Some(7));
        assert_eq!(w.samples, 2);
        let cpu = w.cpu.unwrap();
        assert!((cpu.avg - 0.7).abs() < 1e-9 && cpu.peak == 0.9);
        assert_eq!(w.memory_used.unwrap(), AvgPeak { avg: 250.0, peak: 300.0, samples: 2 });
        assert_eq!(w.cpu_count, Some(4));
        assert_eq!(w.gpus.len(), 1);
        assert_eq!(w.gpus[0].memory_total_bytes, Some(2000));
        let tree = w.tree.unwrap();
        assert_eq!(tree.rss, AvgPeak { avg: 20.0, peak: 30.0, samples: 2 });
        assert_eq!(tree.max_processes, 3);
        // The whole range, no tree.
        let all = r.window(t, t + Duration::from_secs(10), None);
        assert_eq!(all.samples, 4);
        assert!(all.tree.is_none());
        // An empty range.
        let none = r.window(t + Duration::from_secs(20), t + Duration::from_secs(30), Some(7));
        assert_eq!(none.samples, 0);
        assert!(none.cpu.is_none());
    }

    fn gpu_at(at: Instant, util: f64, energy: f64, pcie_rx: f64, reasons: u64) -> Arc<Sample> {
        let mut s = Sample::new(at);
        s.gpus = Some(vec![GpuSample {
            index: 0,
            util_general: Some(util),
            power_watts: Some(100.0),
            energy_joules: Some(energy),
            pcie_rx_bytes: Some(pcie_rx),
            clocks_event_reasons: Some(reasons),
            ..Default::default()
        }]);
        Arc::new(s)
    }

    #[test]
    fn gpu_counters_are_prorated_and_survive_a_reset() {
        let t = Instant::now();
        let s = |i: u64| t + Duration::from_millis(500 * i);
        let mut r = Ring::new(100).with_interval(Duration::from_millis(500));
        let power_cap = ClockReason::PowerCap.bit();
        // 200 J/s (ten times the power gauge, so the counter is visibly what is used);
        // the counter resets to 0 between the 3rd and 4th sample (driver reload).
        for (i, e) in [(0, 1000.0), (1, 1100.0), (2, 1200.0), (3, 100.0), (4, 200.0)] {
            r.push(gpu_at(s(i), 0.2 * i as f64, e, 1e9 * i as f64, if i >= 3 { power_cap | ClockReason::Idle.bit() } else { 0 }));
        }
        let w = r.window(s(1), s(4), None);
        let g = &w.gpus[0];
        // From the sample at 1 to the one at 4: +100, +100, reset (+100 since), +100.
        assert!((g.energy_joules.unwrap() - 300.0).abs() < 1e-6, "{g:?}");
        assert!((g.pcie_rx_bytes.unwrap() - 3e9).abs() < 1.0);
        assert_eq!(g.throttle_reasons, vec!["power_cap"], "idle is not a throttle reason");
        assert_eq!(g.throttled_share, Some(0.5));
        // Half an interval inside two samples: pro-rated to its length (100 J/0.5 s × 0.25 s).
        let half = r.window(s(1) + Duration::from_millis(125), s(1) + Duration::from_millis(375), None);
        assert_eq!(half.samples, 0);
        let g = &half.gpus[0];
        assert!((g.energy_joules.unwrap() - 50.0).abs() < 1e-6, "{g:?}");
        assert_eq!(g.utilization.unwrap().avg, 0.4, "the next sample stands in for a window without one");
        // Far from every sample: nothing, not a stale reading.
        assert!(r.window(s(20), s(21), None).gpus.is_empty());
    }

    #[test]
    fn ring_is_bounded_and_drops_oldest() {
        let t = Instant::now();
        let mut r = Ring::new(3);
        for i in 0..10 {
            r.push(sample(t + Duration::from_millis(i), i as f64, 0, None));
        }
        assert_eq!(r.len(), 3);
        let cpus: Vec<f64> = r.recent(10).iter().map(|s| s.cpu.as_ref().unwrap().total).collect();
        assert_eq!(cpus, vec![7.0, 8.0, 9.0]);
        assert_eq!(r.recent(1).len(), 1);
    }
}
