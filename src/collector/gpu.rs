//! GPU source: device figures from a [`GpuDevices`] provider (NVML in production), and
//! the share of GPU memory and SM time that belongs to each registered process tree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::{Sample, Source, SourceError, SourceName, TreeRegistration};
use crate::metrics::FGauge;

/// One GPU's figures; a field is `None` when the driver does not report it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub util_general: Option<f64>,
    pub util_encoder: Option<f64>,
    pub util_decoder: Option<f64>,
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    /// Processes using this GPU (host pids), with their memory and SM share when known.
    pub processes: Vec<GpuProcess>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    pub memory_used: Option<u64>,
    pub sm_util: Option<f64>,
}

/// Every `hw_*` GPU series carries the device's index, UUID and model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub hw_id: String,
    pub hw_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuTaskLabels {
    pub gpu: String,
    pub hw_id: String,
    pub hw_model: String,
    pub hw_gpu_task: &'static str,
}

/// The GPU source's metric families (OpenTelemetry `hw.gpu.*` names), defined,
/// registered and published here alone: a new GPU figure is a field here, its
/// registration line and its publish line — plus its read in `nvml.rs`.
#[derive(Debug, Default)]
pub struct GpuFamilies {
    utilization: Family<GpuTaskLabels, FGauge>,
    memory_usage: Family<GpuLabels, FGauge>,
    memory_limit: Family<GpuLabels, FGauge>,
    temperature: Family<GpuLabels, FGauge>,
    power: Family<GpuLabels, FGauge>,
}

impl GpuFamilies {
    pub fn register(&self, r: &mut Registry) {
        let ratio = || Unit::Other("ratio".into());
        r.register_with_unit("hw_gpu_utilization", "GPU busy share by engine (general = SM, encoder, decoder).", ratio(), self.utilization.clone());
        r.register_with_unit("hw_gpu_memory_usage", "GPU memory used.", Unit::Bytes, self.memory_usage.clone());
        r.register_with_unit("hw_gpu_memory_limit", "GPU memory total.", Unit::Bytes, self.memory_limit.clone());
        r.register_with_unit("hw_temperature", "GPU core temperature.", Unit::Celsius, self.temperature.clone());
        r.register_with_unit("hw_power", "GPU power draw.", Unit::Other("watts".into()), self.power.clone());
    }

    /// Publishes a sample's GPUs. Every family is cleared first, so a GPU that vanished
    /// (or a sample without GPUs: NVML lost) is absent rather than frozen at its last value.
    pub fn publish(&self, gpus: Option<&[GpuSample]>) {
        self.utilization.clear();
        self.memory_usage.clear();
        self.memory_limit.clear();
        self.temperature.clear();
        self.power.clear();
        for g in gpus.into_iter().flatten() {
            let l = GpuLabels { gpu: g.index.to_string(), hw_id: g.uuid.clone(), hw_model: g.name.clone() };
            for (task, v) in [("general", g.util_general), ("encoder", g.util_encoder), ("decoder", g.util_decoder)] {
                if let Some(v) = v {
                    let tl = GpuTaskLabels { gpu: l.gpu.clone(), hw_id: l.hw_id.clone(), hw_model: l.hw_model.clone(), hw_gpu_task: task };
                    self.utilization.get_or_create(&tl).set(v);
                }
            }
            let set = |fam: &Family<GpuLabels, FGauge>, v: Option<f64>| {
                if let Some(v) = v {
                    fam.get_or_create(&l).set(v);
                }
            };
            set(&self.memory_usage, g.memory_used.map(|v| v as f64));
            set(&self.memory_limit, g.memory_total.map(|v| v as f64));
            set(&self.temperature, g.temperature_celsius);
            set(&self.power, g.power_watts);
        }
    }
}

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
