//! Bounded ring buffer of samples, answering "average and peak between t0 and t1".

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::Sample;

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
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct GpuWindow {
    pub index: u32,
    pub name: String,
    pub utilization: Option<AvgPeak>,
    pub memory_used_bytes: Option<AvgPeak>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<AvgPeak>,
    pub power_watts: Option<AvgPeak>,
}

/// One registered process tree over a window.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TreeWindow {
    pub cpu: AvgPeak,
    pub rss: AvgPeak,
    pub gpu_memory: Option<AvgPeak>,
    pub gpu_util: Option<AvgPeak>,
    /// Most processes seen in the tree at once.
    pub max_processes: usize,
}

/// Everything the ring knows about `[from, to]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Window {
    pub samples: usize,
    pub cpu: Option<AvgPeak>,
    pub cpu_count: Option<usize>,
    pub memory_used: Option<AvgPeak>,
    pub memory_total: Option<u64>,
    pub gpus: Vec<GpuWindow>,
    pub tree: Option<TreeWindow>,
}

/// Fixed-capacity FIFO of samples: memory is bounded by `--sample-retention`.
pub struct Ring {
    cap: usize,
    buf: VecDeque<Arc<Sample>>,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Ring { cap: cap.max(1), buf: VecDeque::with_capacity(cap.clamp(1, 4096)) }
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

    /// Samples taken within `[from, to]` (inclusive), aggregated.
    pub fn window(&self, from: Instant, to: Instant, tree: Option<u64>) -> Window {
        // Samples are in time order: binary-search the start instead of scanning.
        let start = self.buf.partition_point(|s| s.at < from);
        let mut w = Window::default();
        let (mut cpu, mut mem) = (Acc::default(), Acc::default());
        let (mut t_cpu, mut t_rss, mut t_gmem, mut t_gutil) = (Acc::default(), Acc::default(), Acc::default(), Acc::default());
        let mut max_procs = 0;
        let mut gpus: Vec<(u32, String, Acc, Acc, Option<u64>, Acc, Acc)> = Vec::new();
        for s in self.buf.range(start..).take_while(|s| s.at <= to) {
            w.samples += 1;
            if let Some(c) = &s.cpu {
                cpu.add(c.total);
                w.cpu_count = Some(c.per_cpu.len());
            }
            if let Some(m) = &s.memory {
                mem.add(m.used as f64);
                w.memory_total = Some(m.total);
            }
            for g in s.gpus.iter().flatten() {
                let slot = match gpus.iter().position(|e| e.0 == g.index) {
                    Some(i) => i,
                    None => {
                        gpus.push((g.index, g.name.clone(), Acc::default(), Acc::default(), None, Acc::default(), Acc::default()));
                        gpus.len() - 1
                    }
                };
                let e = &mut gpus[slot];
                if let Some(v) = g.util_general {
                    e.2.add(v);
                }
                if let Some(v) = g.memory_used {
                    e.3.add(v as f64);
                }
                if g.memory_total.is_some() {
                    e.4 = g.memory_total;
                }
                if let Some(v) = g.temperature_celsius {
                    e.5.add(v);
                }
                if let Some(v) = g.power_watts {
                    e.6.add(v);
                }
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
            }
        }
        w.cpu = cpu.finish();
        w.memory_used = mem.finish();
        w.gpus = gpus
            .into_iter()
            .map(|(index, name, u, m, total, t, p)| GpuWindow {
                index,
                name,
                utilization: u.finish(),
                memory_used_bytes: m.finish(),
                memory_total_bytes: total,
                temperature_celsius: t.finish(),
                power_watts: p.finish(),
            })
            .collect();
        if let (Some(cpu), Some(rss)) = (t_cpu.finish(), t_rss.finish()) {
            w.tree = Some(TreeWindow { cpu, rss, gpu_memory: t_gmem.finish(), gpu_util: t_gutil.finish(), max_processes: max_procs });
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{CpuSample, GpuSample, MemorySample, TreeSample};
    use std::time::Duration;

    fn sample(at: Instant, cpu: f64, mem: u64, tree_rss: Option<u64>) -> Arc<Sample> {
        let mut s = Sample::new(at);
        s.cpu = Some(CpuSample { per_cpu: vec![cpu; 4], total: cpu });
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
