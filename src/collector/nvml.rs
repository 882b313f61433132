//! The thin NVML adapter: in-process reads through `nvml-wrapper` (never `nvidia-smi`).
//!
//! Everything here is a direct call into NVML; the logic that uses the figures lives
//! in [`super::gpu`] and is tested with scripted providers. Tests of this file need an
//! NVIDIA GPU and are `#[ignore]`d.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;

use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, GpmSample, Nvml};

use super::gpu::GpuDevices;
use super::{GpmFigures, GpuProcess, GpuSample, SourceError};

/// A per-sample NVML read that a device may not support. One `NotSupported` answer
/// and it is never asked again on that device: absent, not 0, and no wasted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Field {
    Utilization,
    Encoder,
    Decoder,
    Memory,
    Temperature,
    Power,
    PowerLimit,
    Energy,
    PcieRx,
    PcieTx,
    ClockSm,
    ClockMemory,
    Reasons,
    EccCorrected,
    EccUncorrected,
    Compute,
    Graphics,
    ProcessUtil,
}

/// What never changes on a device, read once; and what a device told us it cannot do.
struct DeviceState {
    uuid: String,
    name: String,
    clock_sm_max: Option<f64>,
    clock_memory_max: Option<f64>,
    pcie_link: Option<f64>,
    gpm: bool,
    /// The previous GPM sample: GPM metrics are the difference of two samples.
    gpm_prev: Option<GpmSample<'static>>,
    unsupported: HashSet<Field>,
    /// The last process-utilization timestamp seen (NVML returns samples newer than it).
    last_seen: Option<u64>,
}

impl DeviceState {
    fn read(d: &Device<'static>, index: u32) -> Self {
        let mhz = |c| d.max_clock_info(c).ok().map(|v| v as f64 * 1e6);
        // Per lane and direction, after line coding: gen1/2 8b/10b, gen3+ 128b/130b.
        let lane = |generation: u32| match generation {
            1 => Some(250e6),
            2 => Some(500e6),
            3 => Some(984.6e6),
            4 => Some(1969.2e6),
            5 => Some(3938.5e6),
            6 => Some(7563e6),
            _ => None,
        };
        let pcie_link = match (d.max_pcie_link_gen(), d.max_pcie_link_width()) {
            (Ok(g), Ok(w)) if w > 0 => lane(g).map(|b| b * w as f64),
            _ => None,
        };
        DeviceState {
            uuid: d.uuid().unwrap_or_else(|_| format!("gpu-{index}")),
            name: d.name().unwrap_or_else(|_| "unknown".into()),
            clock_sm_max: mhz(Clock::SM),
            clock_memory_max: mhz(Clock::Memory),
            pcie_link,
            gpm: d.gpm_support().unwrap_or(false),
            gpm_prev: None,
            unsupported: HashSet::new(),
            last_seen: None,
        }
    }

    /// `call`, unless the device said before that it cannot answer it.
    fn ask<T>(&mut self, field: Field, call: impl FnOnce() -> Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
        if self.unsupported.contains(&field) {
            return Ok(None);
        }
        match call() {
            Ok(v) => Ok(Some(v)),
            Err(NvmlError::NotSupported) | Err(NvmlError::FunctionNotFound) => {
                self.unsupported.insert(field);
                Ok(None)
            }
            // A device that fell off the bus: the caller drops it from this sample.
            Err(e @ NvmlError::GpuLost) => Err(e),
            Err(_) => Ok(None),
        }
    }
}

pub struct NvmlDevices {
    /// Leaked once per process: GPM samples borrow the library handle for their whole life.
    nvml: &'static Nvml,
    driver: Option<String>,
    devices: HashMap<u32, DeviceState>,
}

impl NvmlDevices {
    /// Loads `libnvidia-ml.so.1` and checks there is at least one GPU. `Err` is the
    /// reason there is no GPU data (logged once by the collector).
    pub fn init() -> Result<Box<dyn GpuDevices>, String> {
        Self::open(None).map(|d| Box::new(d) as Box<dyn GpuDevices>)
    }

    /// Loads NVML from `lib` (a path) or, when `None`, from the loader's search path.
    pub fn open(lib: Option<&OsStr>) -> Result<NvmlDevices, String> {
        let mut b = Nvml::builder();
        if let Some(lib) = lib {
            b.lib_path(lib);
        }
        let nvml = b.init().map_err(|e| format!("NVML did not load ({e}); install the NVIDIA driver or run with the GPU visible to this container"))?;
        let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
        if count == 0 {
            return Err("NVML loaded but sees no GPU".into());
        }
        let driver = nvml.sys_driver_version().ok();
        Ok(NvmlDevices { nvml: Box::leak(Box::new(nvml)), driver, devices: HashMap::new() })
    }

    /// Driver version and GPU names, for `check` and the startup log.
    pub fn describe(&self) -> Result<(String, Vec<String>), String> {
        let driver = self.nvml.sys_driver_version().map_err(|e| e.to_string())?;
        let n = self.nvml.device_count().map_err(|e| e.to_string())?;
        let names = (0..n).map(|i| self.nvml.device_by_index(i).and_then(|d| d.name()).unwrap_or_else(|e| format!("GPU {i}: {e}"))).collect();
        Ok((driver, names))
    }

    fn sample_device(&mut self, index: u32) -> Result<GpuSample, NvmlError> {
        let nvml = self.nvml;
        let d = nvml.device_by_index(index)?;
        let st = self.devices.entry(index).or_insert_with(|| DeviceState::read(&d, index));
        let util = st.ask(Field::Utilization, || d.utilization_rates())?;
        let mem = st.ask(Field::Memory, || d.memory_info())?;
        let pct = |v: u32| v as f64 / 100.0;
        let mut processes: Vec<GpuProcess> = st
            .ask(Field::Compute, || d.running_compute_processes())?
            .unwrap_or_default()
            .into_iter()
            .chain(st.ask(Field::Graphics, || d.running_graphics_processes())?.unwrap_or_default())
            .map(|p| GpuProcess {
                pid: p.pid,
                memory_used: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
                sm_util: None,
            })
            .collect();
        // Per-process SM share: NotFound means "supported, no process ran a kernel since".
        let since = st.last_seen;
        let process_util = st.ask(Field::ProcessUtil, || match d.process_utilization_stats(since) {
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            r => r,
        })?;
        let process_util_supported = process_util.is_some();
        for s in process_util.into_iter().flatten() {
            st.last_seen = Some(s.timestamp.max(st.last_seen.unwrap_or(0)));
            let share = pct(s.sm_util);
            match processes.iter_mut().find(|p| p.pid == s.pid) {
                Some(p) => p.sm_util = Some(p.sm_util.map_or(share, |x| x.max(share))),
                None => processes.push(GpuProcess { pid: s.pid, memory_used: None, sm_util: Some(share) }),
            }
        }
        let gpm = if st.gpm { gpm_figures(nvml, &d, &mut st.gpm_prev) } else { GpmFigures::default() };
        let hz = |v: Option<u32>| v.map(|mhz| mhz as f64 * 1e6);
        let kbps = |v: Option<u32>| v.map(|kb| kb as f64 * 1024.0);
        Ok(GpuSample {
            index,
            uuid: st.uuid.clone(),
            name: st.name.clone(),
            driver_version: self.driver.clone(),
            util_general: util.as_ref().map(|u| pct(u.gpu)),
            util_memory_bandwidth: util.as_ref().map(|u| pct(u.memory)),
            util_encoder: st.ask(Field::Encoder, || d.encoder_utilization())?.map(|u| pct(u.utilization)),
            util_decoder: st.ask(Field::Decoder, || d.decoder_utilization())?.map(|u| pct(u.utilization)),
            memory_used: mem.as_ref().map(|m| m.used),
            memory_total: mem.as_ref().map(|m| m.total),
            temperature_celsius: st.ask(Field::Temperature, || d.temperature(TemperatureSensor::Gpu))?.map(f64::from),
            power_watts: st.ask(Field::Power, || d.power_usage())?.map(|mw| mw as f64 / 1000.0),
            power_limit_watts: st.ask(Field::PowerLimit, || d.enforced_power_limit())?.map(|mw| mw as f64 / 1000.0),
            energy_joules: st.ask(Field::Energy, || d.total_energy_consumption())?.map(|mj| mj as f64 / 1000.0),
            pcie_rx_bytes_per_second: kbps(st.ask(Field::PcieRx, || d.pcie_throughput(PcieUtilCounter::Receive))?),
            pcie_tx_bytes_per_second: kbps(st.ask(Field::PcieTx, || d.pcie_throughput(PcieUtilCounter::Send))?),
            pcie_rx_bytes: None,
            pcie_tx_bytes: None,
            pcie_link_bytes_per_second: st.pcie_link,
            clock_sm_hertz: hz(st.ask(Field::ClockSm, || d.clock_info(Clock::SM))?),
            clock_memory_hertz: hz(st.ask(Field::ClockMemory, || d.clock_info(Clock::Memory))?),
            clock_sm_max_hertz: st.clock_sm_max,
            clock_memory_max_hertz: st.clock_memory_max,
            clocks_event_reasons: st.ask(Field::Reasons, || d.current_throttle_reasons())?.map(|r| r.bits()),
            ecc_corrected: st.ask(Field::EccCorrected, || d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile))?,
            ecc_uncorrected: st.ask(Field::EccUncorrected, || d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile))?,
            gpm,
            process_util_supported,
            processes,
        })
    }
}

/// GPM ratios between the previous sample and now (none on the first sample).
fn gpm_figures(nvml: &'static Nvml, d: &Device<'static>, prev: &mut Option<GpmSample<'static>>) -> GpmFigures {
    let Ok(now) = d.gpm_sample() else {
        return GpmFigures::default();
    };
    let mut out = GpmFigures::default();
    if let Some(before) = prev.as_ref() {
        const IDS: [GpmMetricId; 4] = [GpmMetricId::SmUtil, GpmMetricId::SmOccupancy, GpmMetricId::AnyTensorUtil, GpmMetricId::DramBwUtil];
        if let Ok(values) = nvml_wrapper::gpm::gpm_metrics_get(nvml, before, &now, &IDS) {
            // NVML answers these in percent.
            let v: Vec<Option<f64>> = values.into_iter().map(|r| r.ok().map(|m| (m.value / 100.0).clamp(0.0, 1.0))).collect();
            out = GpmFigures { sm_active: v[0], sm_occupancy: v[1], tensor_active: v[2], dram_bandwidth: v[3] };
        }
    }
    *prev = Some(now);
    out
}

impl GpuDevices for NvmlDevices {
    fn sample(&mut self) -> Result<Vec<GpuSample>, SourceError> {
        let n = self.nvml.device_count().map_err(|e| SourceError::Failed(format!("NVML device count: {e}")))?;
        let mut out = Vec::with_capacity(n as usize);
        for index in 0..n {
            match self.sample_device(index) {
                Ok(g) => out.push(g),
                // A lost GPU is absent from this sample; its static facts are read
                // again if it comes back (it may be another board).
                Err(_) => {
                    self.devices.remove(&index);
                }
            }
        }
        self.devices.retain(|i, _| *i < n);
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
            assert!(g.driver_version.is_some());
            assert!((0.0..=1.0).contains(&u));
            assert!(g.temperature_celsius.unwrap() > 0.0);
            eprintln!("GPU {}: {} {:?}", g.index, g.name, g);
        }
    }
}
