//! Host memory source: `/proc/meminfo`, split the way `free(1)` splits it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::procfile::ProcFile;
use super::{MemorySample, Sample, Source, SourceError, SourceName, TreeRegistration};
use crate::metrics::FGauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemoryStateLabels {
    pub system_memory_state: &'static str,
}

/// The memory source's families (`system.memory.*`), registered and published here.
#[derive(Debug, Default)]
pub struct MemoryFamilies {
    usage: Family<MemoryStateLabels, FGauge>,
    limit: FGauge,
}

impl MemoryFamilies {
    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit("system_memory_usage", "Host memory by state.", Unit::Bytes, self.usage.clone());
        r.register_with_unit("system_memory_limit", "Total host memory.", Unit::Bytes, self.limit.clone());
    }

    pub fn publish(&self, mem: Option<&MemorySample>) {
        if let Some(mem) = mem {
            for (state, v) in [("used", mem.used), ("free", mem.free), ("cached", mem.cached), ("buffers", mem.buffers)] {
                self.usage.get_or_create(&MemoryStateLabels { system_memory_state: state }).set(v as f64);
            }
            self.limit.set(mem.total as f64);
        }
    }
}

/// Keeps `/proc/meminfo` open: each sample is one read (see `procfile`).
#[derive(Default)]
pub struct MemorySource {
    file: Option<ProcFile>,
    buf: Vec<u8>,
}

impl MemorySource {
    pub fn new() -> MemorySource {
        MemorySource::default()
    }
}

/// Parses the six `/proc/meminfo` lines we publish. Hand-parsed rather than through
/// `procfs::Meminfo` (which parses all ~50 lines into a map): this runs every sample
/// and the full parse was a third of the sampling budget (DESIGN.md §9).
/// `cached` includes reclaimable slab, as procps does; `used` = total − MemAvailable
/// (OpenTelemetry's definition). Kernels before 3.14 have no MemAvailable: there the
/// estimate is free + buffers + cached, as procps falls back to.
pub fn parse_meminfo(text: &str) -> Option<MemorySample> {
    let (mut total, mut free, mut buffers, mut cached, mut available, mut sreclaim) = (None, None, None, None, None, 0u64);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemFree" => &mut free,
            "Buffers" => &mut buffers,
            "Cached" => &mut cached,
            "MemAvailable" => &mut available,
            "SReclaimable" => {
                sreclaim = kib(rest).unwrap_or(0);
                continue;
            }
            _ => continue,
        };
        *slot = kib(rest);
    }
    let (total, free, buffers) = (total?, free?, buffers.unwrap_or(0));
    let cached = cached.unwrap_or(0) + sreclaim;
    let available = available.unwrap_or(free + buffers + cached);
    let used = total.saturating_sub(available);
    Some(MemorySample { total, used, free, cached, buffers })
}

/// `   1234 kB` → bytes.
fn kib(v: &str) -> Option<u64> {
    v.split_ascii_whitespace().next()?.parse::<u64>().ok().map(|k| k * 1024)
}

impl Source for MemorySource {
    fn name(&self) -> SourceName {
        SourceName::Memory
    }

    fn collect(&mut self, sample: &mut Sample, _: &[TreeRegistration]) -> Result<(), SourceError> {
        ProcFile::read_kept(&mut self.file, "/proc/meminfo", &mut self.buf).map_err(|e| SourceError::Failed(format!("reading /proc/meminfo: {e}")))?;
        let text = std::str::from_utf8(&self.buf).map_err(|e| SourceError::Failed(format!("/proc/meminfo is not text: {e}")))?;
        sample.memory = Some(parse_meminfo(text).ok_or_else(|| SourceError::Failed("/proc/meminfo lacks MemTotal/MemFree".into()))?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_free_uses() {
        let m = parse_meminfo("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    500 kB\nBuffers:          10 kB\nCached:          200 kB\nSReclaimable:     40 kB\n").unwrap();
        assert_eq!(m, MemorySample { total: 1024000, free: 102400, buffers: 10240, cached: 245760, used: 512000 }, "used = total - MemAvailable");
        let old = parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n").unwrap();
        assert_eq!(old.used, 690 * 1024, "no MemAvailable (kernel < 3.14): free + buffers + cached");
        assert!(parse_meminfo("Buffers: 1 kB\n").is_none());
    }

    #[test]
    fn real_meminfo_adds_up() {
        let mut s = super::super::Sample::new(std::time::Instant::now());
        MemorySource::new().collect(&mut s, &[]).unwrap();
        let m = s.memory.unwrap();
        assert!(m.total > 0);
        assert!(m.used <= m.total && m.free <= m.total);
    }
}
