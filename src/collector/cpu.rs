//! Host CPU source: busy share per logical CPU from `/proc/stat` deltas.

use procfs::{CpuTime, CurrentSI, KernelStats};

use super::{CpuSample, Sample, Source, SourceError, SourceName, TreeRegistration};

/// Keeps the previous counters: utilization is a delta between two samples.
pub struct CpuSource {
    prev: Option<(CpuTime, Vec<CpuTime>)>,
}

impl CpuSource {
    pub fn new() -> Self {
        CpuSource { prev: None }
    }
}

impl Default for CpuSource {
    fn default() -> Self {
        Self::new()
    }
}

/// (busy, total) jiffies. iowait counts as idle, as `top` and node_exporter's mode="idle"+"iowait" do.
fn busy_total(t: &CpuTime) -> (u64, u64) {
    let idle = t.idle + t.iowait.unwrap_or(0);
    let busy = t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0);
    (busy, busy + idle)
}

/// Busy share between two readings, 0–1; 0 when no time passed.
pub fn utilization(prev: &CpuTime, now: &CpuTime) -> f64 {
    share(busy_total(prev), busy_total(now))
}

/// Busy share between two (busy, total) jiffy readings.
pub fn share((b0, t0): (u64, u64), (b1, t1): (u64, u64)) -> f64 {
    let dt = t1.saturating_sub(t0);
    if dt == 0 { 0.0 } else { (b1.saturating_sub(b0) as f64 / dt as f64).clamp(0.0, 1.0) }
}

impl Source for CpuSource {
    fn name(&self) -> SourceName {
        SourceName::Cpu
    }

    fn collect(&mut self, sample: &mut Sample, _: &[TreeRegistration]) -> Result<(), SourceError> {
        let stats = KernelStats::current().map_err(|e| SourceError::Failed(format!("reading /proc/stat: {e}")))?;
        let result = match &self.prev {
            // First round: no interval yet. Report zeros rather than nothing, so the
            // series exist from the first scrape; the next sample has real figures.
            None => CpuSample { per_cpu: vec![0.0; stats.cpu_time.len()], total: 0.0 },
            Some((prev_total, prev_per)) => CpuSample {
                per_cpu: stats.cpu_time.iter().zip(prev_per).map(|(now, prev)| utilization(prev, now)).collect(),
                total: utilization(prev_total, &stats.total),
            },
        };
        sample.cpu = Some(result);
        self.prev = Some((stats.total, stats.cpu_time));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_a_delta_share() {
        assert_eq!(share((100, 200), (150, 300)), 0.5);
        assert_eq!(share((100, 200), (100, 200)), 0.0);
        assert_eq!(share((100, 200), (200, 300)), 1.0);
        assert_eq!(share((100, 200), (90, 300)), 0.0, "a counter going backwards is not negative use");
    }

    #[test]
    fn real_proc_stat_gives_one_value_per_cpu() {
        let mut src = CpuSource::new();
        let mut s = Sample::new(std::time::Instant::now());
        src.collect(&mut s, &[]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        src.collect(&mut s, &[]).unwrap();
        let cpu = s.cpu.unwrap();
        assert_eq!(cpu.per_cpu.len(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(cpu.per_cpu.len()));
        assert!(cpu.per_cpu.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
