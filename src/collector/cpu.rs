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

/// `system.cpu.utilization` attributes: `cpu.logical_number`, `cpu.mode`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CpuLabels {
    pub cpu_logical_number: String,
    pub cpu_mode: &'static str,
}

/// The `cpu.mode` values we split `/proc/stat` into (OpenTelemetry's names; `interrupt`
/// is irq + softirq, guest time is already inside user/nice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    User,
    Nice,
    System,
    Idle,
    Iowait,
    Interrupt,
    Steal,
}

impl CpuMode {
    pub const ALL: [CpuMode; 7] = [CpuMode::User, CpuMode::Nice, CpuMode::System, CpuMode::Idle, CpuMode::Iowait, CpuMode::Interrupt, CpuMode::Steal];

    pub fn as_str(self) -> &'static str {
        match self {
            CpuMode::User => "user",
            CpuMode::Nice => "nice",
            CpuMode::System => "system",
            CpuMode::Idle => "idle",
            CpuMode::Iowait => "iowait",
            CpuMode::Interrupt => "interrupt",
            CpuMode::Steal => "steal",
        }
    }

    /// Idle and iowait are time the CPU could have run something: not busy, as `top`
    /// and node_exporter count them.
    pub fn is_busy(self) -> bool {
        !matches!(self, CpuMode::Idle | CpuMode::Iowait)
    }
}

/// Jiffies of one `cpu` line, in [`CpuMode::ALL`] order.
pub type ModeJiffies = [u64; 7];

/// Share of each mode over the last interval, in [`CpuMode::ALL`] order (sums to 1).
pub type ModeShares = [f64; 7];

/// The CPU source's family (`system.cpu.utilization`), registered and published here.
#[derive(Debug, Default)]
pub struct CpuFamilies {
    utilization: Family<CpuLabels, FGauge>,
}

impl CpuFamilies {
    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit("system_cpu_utilization", "Share of each logical CPU's time spent in each mode over the last sample interval (modes of one CPU sum to 1).", Unit::Other("ratio".into()), self.utilization.clone());
    }

    /// A sample without CPU figures leaves the last ones (the host's CPUs do not vanish).
    pub fn publish(&self, cpu: Option<&CpuSample>) {
        for (i, shares) in cpu.into_iter().flat_map(|c| c.modes.iter().enumerate()) {
            for (mode, v) in CpuMode::ALL.iter().zip(shares) {
                self.utilization.get_or_create(&CpuLabels { cpu_logical_number: i.to_string(), cpu_mode: mode.as_str() }).set(*v);
            }
        }
    }
}

/// Keeps the previous counters: utilization is a delta between two samples.
#[derive(Default)]
pub struct CpuSource {
    file: Option<ProcFile>,
    buf: Vec<u8>,
    /// The `cpu` line, then one per logical CPU, of the previous sample.
    prev: Option<(ModeJiffies, Vec<ModeJiffies>)>,
}

impl CpuSource {
    pub fn new() -> Self {
        CpuSource::default()
    }
}

/// Share of each mode between two readings (each 0–1, summing to 1); all zero when no
/// time passed. A counter that went backwards (CPU hot-unplug) counts as no time.
pub fn shares(prev: &ModeJiffies, now: &ModeJiffies) -> ModeShares {
    // An array, not a Vec: this runs for every CPU on every sample.
    let d: ModeJiffies = std::array::from_fn(|i| now[i].saturating_sub(prev[i]));
    let total: u64 = d.iter().sum();
    let mut out = [0.0; 7];
    if total > 0 {
        for (o, v) in out.iter_mut().zip(&d) {
            *o = *v as f64 / total as f64;
        }
    }
    out
}

/// Busy share (every mode but idle and iowait) of a mode split.
pub fn busy(shares: &ModeShares) -> f64 {
    CpuMode::ALL.iter().zip(shares).filter(|(m, _)| m.is_busy()).map(|(_, v)| v).sum::<f64>().clamp(0.0, 1.0)
}

/// The `cpu` and `cpuN` lines of `/proc/stat` as jiffies per mode.
pub fn parse_stat(text: &[u8]) -> Option<(ModeJiffies, Vec<ModeJiffies>)> {
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
        // user nice system idle [iowait irq softirq steal guest guest_nice]: old kernels
        // stop at idle; guest time is already counted in user and nice.
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        if v.len() < 4 {
            return None;
        }
        let jiffies = [at(0), at(1), at(2), at(3), at(4), at(5) + at(6), at(7)];
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
            None => CpuSample { per_cpu: vec![0.0; per_cpu.len()], total: 0.0, modes: vec![[0.0; 7]; per_cpu.len()] },
            Some((prev_total, prev_per)) => {
                let modes: Vec<ModeShares> = per_cpu.iter().zip(prev_per).map(|(now, prev)| shares(prev, now)).collect();
                CpuSample { per_cpu: modes.iter().map(busy).collect(), total: busy(&shares(prev_total, &total)), modes }
            }
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
    fn utilization_is_a_delta_share_per_mode() {
        let prev = [100, 0, 50, 800, 10, 5, 0];
        let now = [140, 0, 70, 830, 20, 5, 0];
        let m = shares(&prev, &now);
        assert_eq!(m, [0.4, 0.0, 0.2, 0.3, 0.1, 0.0, 0.0], "{m:?}");
        assert!((m.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((busy(&m) - 0.6).abs() < 1e-12, "iowait and idle are not busy");
        assert_eq!(shares(&prev, &prev), [0.0; 7], "no time passed");
        assert_eq!(busy(&shares(&now, &prev)), 0.0, "a counter going backwards is not negative use");
    }

    #[test]
    fn parses_the_cpu_lines_only() {
        let text = b"cpu  100 5 50 800 10 1 2 3 0 0\ncpu0 60 5 20 400 5 1 1 2 0 0\ncpu1 40 0 30 400 5 0 1 1 0 0\nintr 123 4 5\nctxt 99\n";
        let (total, per) = parse_stat(text).unwrap();
        assert_eq!(total, [100, 5, 50, 800, 10, 3, 3], "interrupt = irq + softirq");
        assert_eq!(per, vec![[60, 5, 20, 400, 5, 2, 2], [40, 0, 30, 400, 5, 1, 1]]);
        // A 2.4-era kernel's four fields still parse; garbage does not.
        assert_eq!(parse_stat(b"cpu  1 2 3 4\ncpu0 1 2 3 4\n").unwrap().0, [1, 2, 3, 4, 0, 0, 0]);
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
