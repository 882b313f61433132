//! Host CPU source: busy share per logical CPU from `/proc/stat` deltas.
//!
//! `/proc/stat` stays open and its `cpu` lines are parsed by hand (see `procfile`): the
//! rest of the file (interrupt counts, hundreds of numbers) is never parsed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::procfile::ProcFile;
use super::{CpuSample, Sample, Source, SourceError, SourceName, TreeRegistration};
use crate::metrics::FGauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CpuLabels {
    pub cpu: String,
}

/// The CPU source's family (`system.cpu.utilization`), registered and published here.
#[derive(Debug, Default)]
pub struct CpuFamilies {
    utilization: Family<CpuLabels, FGauge>,
}

impl CpuFamilies {
    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit("system_cpu_utilization", "Busy share of each logical CPU over the last sample interval.", Unit::Other("ratio".into()), self.utilization.clone());
    }

    /// A sample without CPU figures leaves the last ones (the host's CPUs do not vanish).
    pub fn publish(&self, cpu: Option<&CpuSample>) {
        for (i, v) in cpu.into_iter().flat_map(|c| c.per_cpu.iter().enumerate()) {
            self.utilization.get_or_create(&CpuLabels { cpu: i.to_string() }).set(*v);
        }
    }
}

/// (busy, total) jiffies of one CPU line.
type Jiffies = (u64, u64);

/// Keeps the previous counters: utilization is a delta between two samples.
#[derive(Default)]
pub struct CpuSource {
    file: Option<ProcFile>,
    buf: Vec<u8>,
    /// The `cpu` line, then one per logical CPU, of the previous sample.
    prev: Option<(Jiffies, Vec<Jiffies>)>,
}

impl CpuSource {
    pub fn new() -> Self {
        CpuSource::default()
    }
}

/// Busy share between two (busy, total) jiffy readings, 0–1; 0 when no time passed.
pub fn share((b0, t0): Jiffies, (b1, t1): Jiffies) -> f64 {
    let dt = t1.saturating_sub(t0);
    if dt == 0 { 0.0 } else { (b1.saturating_sub(b0) as f64 / dt as f64).clamp(0.0, 1.0) }
}

/// The `cpu` and `cpuN` lines of `/proc/stat` as (busy, total): iowait counts as idle,
/// as `top` and node_exporter's mode="idle"+"iowait" do; guest time is already in user.
pub fn parse_stat(text: &[u8]) -> Option<(Jiffies, Vec<Jiffies>)> {
    let mut total = None;
    let mut per_cpu = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(b"cpu") else {
            // The cpu lines come first; nothing after them is needed.
            if total.is_some() {
                break;
            }
            continue;
        };
        let line = std::str::from_utf8(rest).ok()?;
        let mut fields = line.split_ascii_whitespace();
        let label = if line.starts_with(' ') { "" } else { fields.next()? };
        let v: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle [iowait irq softirq steal ...]: old kernels stop at idle.
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        if v.len() < 4 {
            return None;
        }
        let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
        let jiffies = (busy, busy + at(3) + at(4));
        if label.is_empty() {
            total = Some(jiffies);
        } else {
            per_cpu.push(jiffies);
        }
    }
    Some((total?, per_cpu))
}

impl Source for CpuSource {
    fn name(&self) -> SourceName {
        SourceName::Cpu
    }

    fn collect(&mut self, sample: &mut Sample, _: &[TreeRegistration]) -> Result<(), SourceError> {
        ProcFile::read_kept(&mut self.file, "/proc/stat", &mut self.buf).map_err(|e| SourceError::Failed(format!("reading /proc/stat: {e}")))?;
        let (total, per_cpu) = parse_stat(&self.buf).ok_or_else(|| SourceError::Failed("/proc/stat has no readable cpu lines".into()))?;
        let result = match &self.prev {
            // First round: no interval yet. Report zeros rather than nothing, so the
            // series exist from the first scrape; the next sample has real figures.
            None => CpuSample { per_cpu: vec![0.0; per_cpu.len()], total: 0.0 },
            Some((prev_total, prev_per)) => CpuSample {
                per_cpu: per_cpu.iter().zip(prev_per).map(|(now, prev)| share(*prev, *now)).collect(),
                total: share(*prev_total, total),
            },
        };
        sample.cpu = Some(result);
        self.prev = Some((total, per_cpu));
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
    fn parses_the_cpu_lines_only() {
        let text = b"cpu  100 5 50 800 10 1 2 3 0 0\ncpu0 60 5 20 400 5 1 1 2 0 0\ncpu1 40 0 30 400 5 0 1 1 0 0\nintr 123 4 5\nctxt 99\n";
        let (total, per) = parse_stat(text).unwrap();
        assert_eq!(total, (161, 971), "busy = user+nice+system+irq+softirq+steal; idle adds iowait");
        assert_eq!(per, vec![(89, 494), (72, 477)]);
        // A 2.4-era kernel's four fields still parse; garbage does not.
        assert_eq!(parse_stat(b"cpu  1 2 3 4\ncpu0 1 2 3 4\n").unwrap().0, (6, 10));
        assert!(parse_stat(b"cpu  1 x 3 4\n").is_none());
        assert!(parse_stat(b"intr 1\n").is_none());
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
