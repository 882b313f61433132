//! GPU source: device figures from a [`GpuDevices`] provider (NVML in production), and
//! the share of GPU memory and SM time that belongs to each registered process tree.

use super::{GpuSample, Sample, Source, SourceError, SourceName, TreeRegistration};

/// Whatever can report GPUs. The real one is [`super::nvml::NvmlDevices`]; tests script one.
pub trait GpuDevices: Send {
    fn sample(&mut self) -> Result<Vec<GpuSample>, SourceError>;
}

/// No provider (NVML did not load): every sample is "no data", with the reason.
pub struct GpuSource {
    devices: Result<Box<dyn GpuDevices>, String>,
}

impl GpuSource {
    pub fn new(devices: Result<Box<dyn GpuDevices>, String>) -> Self {
        GpuSource { devices }
    }
}

impl Source for GpuSource {
    fn name(&self) -> SourceName {
        SourceName::Gpu
    }

    fn collect(&mut self, sample: &mut Sample, _: &[TreeRegistration]) -> Result<(), SourceError> {
        let devices = match &mut self.devices {
            Ok(d) => d,
            Err(why) => return Err(SourceError::Unavailable(why.clone())),
        };
        let gpus = devices.sample()?;
        // Attribute per-process GPU memory and SM share to the trees the process source walked.
        for tree in &mut sample.trees {
            let mut mem = None::<u64>;
            let mut util = None::<f64>;
            for g in &gpus {
                for p in g.processes.iter().filter(|p| tree.pids.contains(&p.pid)) {
                    if let Some(m) = p.memory_used {
                        mem = Some(mem.unwrap_or(0) + m);
                    }
                    if let Some(u) = p.sm_util {
                        util = Some(util.map_or(u, |x: f64| x.max(u)));
                    }
                }
            }
            // The tree runs, the GPU is there: no process entry means it holds no GPU memory.
            tree.gpu_memory_bytes = Some(mem.unwrap_or(0));
            tree.gpu_util = util;
        }
        sample.gpus = Some(gpus);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{GpuProcess, TreeSample};

    struct Fake(Vec<GpuSample>);
    impl GpuDevices for Fake {
        fn sample(&mut self) -> Result<Vec<GpuSample>, SourceError> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn tree_gets_the_gpu_memory_of_its_processes() {
        let gpu = |index, procs: Vec<GpuProcess>| GpuSample { index, processes: procs, ..Default::default() };
        let mut src = GpuSource::new(Ok(Box::new(Fake(vec![
            gpu(0, vec![GpuProcess { pid: 10, memory_used: Some(100), sm_util: Some(0.5) }, GpuProcess { pid: 99, memory_used: Some(7), sm_util: None }]),
            gpu(1, vec![GpuProcess { pid: 11, memory_used: Some(50), sm_util: Some(0.8) }]),
        ]))));
        let mut s = Sample::new(std::time::Instant::now());
        s.trees = vec![
            TreeSample { key: 1, mode: "simple", pids: vec![10, 11], ..Default::default() },
            TreeSample { key: 2, mode: "realtime", pids: vec![12], ..Default::default() },
        ];
        src.collect(&mut s, &[]).unwrap();
        assert_eq!(s.trees[0].gpu_memory_bytes, Some(150));
        assert_eq!(s.trees[0].gpu_util, Some(0.8));
        assert_eq!(s.trees[1].gpu_memory_bytes, Some(0));
        assert_eq!(s.gpus.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn no_provider_is_no_data() {
        let mut src = GpuSource::new(Err("libnvidia-ml.so.1: cannot open shared object file".into()));
        let mut s = Sample::new(std::time::Instant::now());
        let err = src.collect(&mut s, &[]).unwrap_err();
        assert!(matches!(err, SourceError::Unavailable(_)));
        assert!(s.gpus.is_none());
    }
}
