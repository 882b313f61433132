//! Host memory source: `/proc/meminfo`, split the way `free(1)` splits it.

use procfs::{Current, Meminfo};

use super::{MemorySample, Sample, Source, SourceError, SourceName, TreeRegistration};

pub struct MemorySource;

/// `cached` includes reclaimable slab, as procps does; `used` is what is left.
pub fn from_meminfo(m: &Meminfo) -> MemorySample {
    let cached = m.cached + m.s_reclaimable.unwrap_or(0);
    let used = m.mem_total.saturating_sub(m.mem_free + m.buffers + cached);
    MemorySample { total: m.mem_total, used, free: m.mem_free, cached, buffers: m.buffers }
}

impl Source for MemorySource {
    fn name(&self) -> SourceName {
        SourceName::Memory
    }

    fn collect(&mut self, sample: &mut Sample, _: &[TreeRegistration]) -> Result<(), SourceError> {
        let m = Meminfo::current().map_err(|e| SourceError::Failed(format!("reading /proc/meminfo: {e}")))?;
        sample.memory = Some(from_meminfo(&m));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_meminfo_adds_up() {
        let mut s = super::super::Sample::new(std::time::Instant::now());
        MemorySource.collect(&mut s, &[]).unwrap();
        let m = s.memory.unwrap();
        assert!(m.total > 0);
        assert_eq!(m.used + m.free + m.buffers + m.cached, m.total);
    }
}
