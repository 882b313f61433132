//! The thin NVML adapter: in-process reads through `nvml-wrapper` (never `nvidia-smi`).
//!
//! Everything here is a direct call into NVML; the logic that uses the figures lives
//! in [`super::gpu`] and is tested with scripted providers. Tests of this file need an
//! NVIDIA GPU and are `#[ignore]`d.

use std::collections::HashMap;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

use super::gpu::GpuDevices;
use super::{GpuProcess, GpuSample, SourceError};

pub struct NvmlDevices {
    nvml: Nvml,
    /// Per device: the last process-utilization timestamp seen (NVML returns samples newer than it).
    last_seen: HashMap<u32, u64>,
}

impl NvmlDevices {
    /// Loads `libnvidia-ml.so.1` and checks there is at least one GPU. `Err` is the
    /// reason there is no GPU data (logged once by the collector).
    pub fn init() -> Result<Box<dyn GpuDevices>, String> {
        let nvml = Nvml::init().map_err(|e| format!("NVML did not load ({e}); install the NVIDIA driver or run with the GPU visible to this container"))?;
        let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
        if count == 0 {
            return Err("NVML loaded but sees no GPU".into());
        }
        Ok(Box::new(NvmlDevices { nvml, last_seen: HashMap::new() }))
    }

    /// Driver version and GPU names, for `check` and the startup log.
    pub fn describe(&self) -> Result<(String, Vec<String>), String> {
        let driver = self.nvml.sys_driver_version().map_err(|e| e.to_string())?;
        let n = self.nvml.device_count().map_err(|e| e.to_string())?;
        let names = (0..n).map(|i| self.nvml.device_by_index(i).and_then(|d| d.name()).unwrap_or_else(|e| format!("GPU {i}: {e}"))).collect();
        Ok((driver, names))
    }
}

impl GpuDevices for NvmlDevices {
    fn sample(&mut self) -> Result<Vec<GpuSample>, SourceError> {
        let n = self.nvml.device_count().map_err(|e| SourceError::Failed(format!("NVML device count: {e}")))?;
        let mut out = Vec::with_capacity(n as usize);
        for index in 0..n {
            let d = self.nvml.device_by_index(index).map_err(|e| SourceError::Failed(format!("NVML device {index}: {e}")))?;
            let util = d.utilization_rates().ok();
            let mem = d.memory_info().ok();
            let mut processes: Vec<GpuProcess> = d
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .chain(d.running_graphics_processes().unwrap_or_default())
                .map(|p| GpuProcess {
                    pid: p.pid,
                    memory_used: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                    sm_util: None,
                })
                .collect();
            // Per-process SM share: not every driver/GPU supports it; absent is fine.
            let since = self.last_seen.get(&index).copied();
            if let Ok(samples) = d.process_utilization_stats(since) {
                for s in samples {
                    self.last_seen.insert(index, s.timestamp.max(since.unwrap_or(0)));
                    let share = s.sm_util as f64 / 100.0;
                    match processes.iter_mut().find(|p| p.pid == s.pid) {
                        Some(p) => p.sm_util = Some(p.sm_util.map_or(share, |x| x.max(share))),
                        None => processes.push(GpuProcess { pid: s.pid, memory_used: None, sm_util: Some(share) }),
                    }
                }
            }
            out.push(GpuSample {
                index,
                uuid: d.uuid().unwrap_or_else(|_| format!("gpu-{index}")),
                name: d.name().unwrap_or_else(|_| "unknown".into()),
                util_general: util.as_ref().map(|u| u.gpu as f64 / 100.0),
                util_encoder: d.encoder_utilization().ok().map(|u| u.utilization as f64 / 100.0),
                util_decoder: d.decoder_utilization().ok().map(|u| u.utilization as f64 / 100.0),
                memory_used: mem.as_ref().map(|m| m.used),
                memory_total: mem.as_ref().map(|m| m.total),
                temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
                power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                processes,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_library_init_says_why() {
        // On a machine with no NVIDIA driver this is the "no GPU" path; with one, init works.
        match NvmlDevices::init() {
            Ok(_) => {}
            Err(why) => assert!(why.contains("NVML") , "{why}"),
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and driver"]
    fn real_gpu_reports_its_figures() {
        let mut d = NvmlDevices::init().expect("NVML loads on a GPU machine");
        let gpus = d.sample().unwrap();
        assert!(!gpus.is_empty());
        for g in &gpus {
            assert!(!g.uuid.is_empty() && !g.name.is_empty());
            assert!(g.memory_total.unwrap() > 0);
            assert!(g.memory_used.unwrap() <= g.memory_total.unwrap());
            let u = g.util_general.unwrap();
            assert!((0.0..=1.0).contains(&u));
            assert!(g.temperature_celsius.unwrap() > 0.0);
            eprintln!("GPU {}: {} {:?}", g.index, g.name, g);
        }
    }
}
