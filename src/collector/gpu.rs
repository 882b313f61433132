//! GPU source: device figures from a [`GpuDevices`] provider (NVML in production), and
//! the share of GPU memory and SM time that belongs to each registered process tree.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::{Sample, Source, SourceError, SourceName, TreeRegistration};
use crate::metrics::{FGauge, ratio, registered};

/// One GPU's figures; a field is `None` when the driver does not report it (never 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub driver_version: Option<String>,
    /// SM busy share (NVML `utilization.gpu`: time a kernel ran), 0–1.
    pub util_general: Option<f64>,
    pub util_encoder: Option<f64>,
    pub util_decoder: Option<f64>,
    /// Memory-controller busy share (NVML `utilization.memory`), 0–1.
    pub util_memory_bandwidth: Option<f64>,
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    /// NVML's total-energy counter (since the driver loaded; it restarts on a reload).
    pub energy_joules: Option<f64>,
    /// PCIe throughput now (NVML samples it over 20 ms), bytes per second.
    pub pcie_rx_bytes_per_second: Option<f64>,
    pub pcie_tx_bytes_per_second: Option<f64>,
    /// PCIe bytes since the sidecar started: the rates integrated by [`GpuSource`].
    pub pcie_rx_bytes: Option<f64>,
    pub pcie_tx_bytes: Option<f64>,
    /// The link's top speed (max generation × max width), bytes per second each way.
    pub pcie_link_bytes_per_second: Option<f64>,
    pub clock_sm_hertz: Option<f64>,
    pub clock_memory_hertz: Option<f64>,
    pub clock_sm_max_hertz: Option<f64>,
    pub clock_memory_max_hertz: Option<f64>,
    /// NVML's clocks-event (throttle) reason bits; decode with [`ClockReason::active`].
    pub clocks_event_reasons: Option<u64>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// GPM (Hopper and newer), over the interval since the previous sample.
    pub gpm: GpmFigures,
    /// True when the driver reports per-process SM share (then a tree with no entry used none).
    pub process_util_supported: bool,
    /// Processes using this GPU (host pids), with their memory and SM share when known.
    pub processes: Vec<GpuProcess>,
}

/// GPU Performance Monitoring ratios (0–1), each `None` where unsupported.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpmFigures {
    pub sm_active: Option<f64>,
    pub sm_occupancy: Option<f64>,
    pub tensor_active: Option<f64>,
    pub dram_bandwidth: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    pub memory_used: Option<u64>,
    pub sm_util: Option<f64>,
}

/// Why the clocks are below their maximum (NVML `nvmlClocksEventReasons`): the
/// `reason` label of `musetalk_gpu_clocks_event_reasons`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClockReason {
    Idle,
    ApplicationsClocks,
    PowerCap,
    HwSlowdown,
    SyncBoost,
    Thermal,
    HwThermal,
    HwPowerBrake,
    DisplayClocks,
}

impl ClockReason {
    pub const ALL: [ClockReason; 9] = [
        ClockReason::Idle,
        ClockReason::ApplicationsClocks,
        ClockReason::PowerCap,
        ClockReason::HwSlowdown,
        ClockReason::SyncBoost,
        ClockReason::Thermal,
        ClockReason::HwThermal,
        ClockReason::HwPowerBrake,
        ClockReason::DisplayClocks,
    ];

    /// The bit NVML sets (nvml.h `nvmlClocksEventReason*`).
    pub fn bit(self) -> u64 {
        match self {
            ClockReason::Idle => 0x1,
            ClockReason::ApplicationsClocks => 0x2,
            ClockReason::PowerCap => 0x4,
            ClockReason::HwSlowdown => 0x8,
            ClockReason::SyncBoost => 0x10,
            ClockReason::Thermal => 0x20,
            ClockReason::HwThermal => 0x40,
            ClockReason::HwPowerBrake => 0x80,
            ClockReason::DisplayClocks => 0x100,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClockReason::Idle => "idle",
            ClockReason::ApplicationsClocks => "applications_clocks",
            ClockReason::PowerCap => "power_cap",
            ClockReason::HwSlowdown => "hw_slowdown",
            ClockReason::SyncBoost => "sync_boost",
            ClockReason::Thermal => "thermal",
            ClockReason::HwThermal => "hw_thermal",
            ClockReason::HwPowerBrake => "hw_power_brake",
            ClockReason::DisplayClocks => "display_clocks",
        }
    }

    /// Reasons that slow a GPU that has work (idle, a clock setting or sync boost do not).
    pub fn is_throttle(self) -> bool {
        matches!(self, ClockReason::PowerCap | ClockReason::HwSlowdown | ClockReason::Thermal | ClockReason::HwThermal | ClockReason::HwPowerBrake)
    }

    /// The reasons set in `bits`.
    pub fn active(bits: u64) -> impl Iterator<Item = ClockReason> {
        ClockReason::ALL.into_iter().filter(move |r| bits & r.bit() != 0)
    }
}

/// What every GPU series carries: OpenTelemetry's `hw.*` attributes, plus `gpu` (the
/// index, which the dashboards' `gpu` variable selects on).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub hw_type: &'static str,
    pub hw_id: String,
    pub hw_name: String,
    pub hw_model: String,
    pub hw_vendor: &'static str,
    pub hw_driver_version: String,
}

/// [`GpuLabels`] plus one more label (task, direction, error type, clock, reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuTaskLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub hw_gpu_task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuIoLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub network_io_direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuErrorLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuClockLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub clock: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuReasonLabels {
    #[prometheus(flatten)]
    pub gpu: GpuLabels,
    pub reason: &'static str,
}

type FCounter = Counter<f64, AtomicU64>;

/// The GPU source's metric families (OpenTelemetry `hw.*` names where the convention
/// has one, `musetalk_gpu_*` where it has none), defined, registered and published
/// here alone: a new GPU figure is a field of [`GpuSample`], its read in `nvml.rs`, and
/// its family and publish line here.
#[derive(Debug)]
pub struct GpuFamilies {
    utilization: Family<GpuTaskLabels, FGauge>,
    memory_usage: Family<GpuLabels, FGauge>,
    memory_limit: Family<GpuLabels, FGauge>,
    memory_utilization: Family<GpuLabels, FGauge>,
    memory_bandwidth: Family<GpuLabels, FGauge>,
    io: Family<GpuIoLabels, FCounter>,
    energy: Family<GpuLabels, FCounter>,
    power: Family<GpuLabels, FGauge>,
    power_limit: Family<GpuLabels, FGauge>,
    temperature: Family<GpuLabels, FGauge>,
    errors: Family<GpuErrorLabels, Counter>,
    clock: Family<GpuClockLabels, FGauge>,
    clock_max: Family<GpuClockLabels, FGauge>,
    clocks_event_reasons: Family<GpuReasonLabels, Gauge>,
    sm_active: Family<GpuLabels, FGauge>,
    sm_occupancy: Family<GpuLabels, FGauge>,
    tensor_active: Family<GpuLabels, FGauge>,
    dram_bandwidth: Family<GpuLabels, FGauge>,
}

impl GpuFamilies {
    pub fn new(r: &mut Registry) -> Self {
        GpuFamilies {
            utilization: registered(r, "hw_gpu_utilization", "GPU busy share by engine (general = SM, encoder, decoder).", Some(ratio()), Family::default()),
            memory_usage: registered(r, "hw_gpu_memory_usage", "GPU memory used.", Some(Unit::Bytes), Family::default()),
            memory_limit: registered(r, "hw_gpu_memory_limit", "GPU memory total.", Some(Unit::Bytes), Family::default()),
            memory_utilization: registered(r, "hw_gpu_memory_utilization", "GPU memory used / total.", Some(ratio()), Family::default()),
            memory_bandwidth: registered(r, "musetalk_gpu_memory_bandwidth_utilization", "Memory-controller busy share (NVML utilization.memory): how hard the GPU's memory is worked, not how full it is.", Some(ratio()), Family::default()),
            io: registered(r, "hw_gpu_io", "PCIe bytes moved, integrated from NVML's throughput readings.", Some(Unit::Bytes), Family::default()),
            energy: registered(r, "hw_energy", "GPU energy (NVML's counter since the driver loaded).", Some(Unit::Joules), Family::default()),
            power: registered(r, "hw_power", "GPU power draw.", Some(Unit::Other("watts".into())), Family::default()),
            power_limit: registered(r, "musetalk_gpu_power_limit", "Enforced GPU power limit.", Some(Unit::Other("watts".into())), Family::default()),
            temperature: registered(r, "hw_temperature", "GPU core temperature.", Some(Unit::Celsius), Family::default()),
            errors: registered(r, "hw_errors", "GPU memory ECC errors (volatile: since the driver loaded).", None, Family::default()),
            clock: registered(r, "musetalk_gpu_clock", "Current SM and memory clocks.", Some(Unit::Other("hertz".into())), Family::default()),
            clock_max: registered(r, "musetalk_gpu_clock_max", "Maximum SM and memory clocks.", Some(Unit::Other("hertz".into())), Family::default()),
            clocks_event_reasons: registered(r, "musetalk_gpu_clocks_event_reasons", "1 while the reason holds the clocks down (power_cap, thermal, hw_slowdown, sync_boost, idle, ...).", None, Family::default()),
            sm_active: registered(r, "musetalk_gpu_sm_active", "GPM: share of SM cycles with a warp resident (Hopper and newer).", Some(ratio()), Family::default()),
            sm_occupancy: registered(r, "musetalk_gpu_sm_occupancy", "GPM: resident warps / maximum warps (Hopper and newer).", Some(ratio()), Family::default()),
            tensor_active: registered(r, "musetalk_gpu_tensor_active", "GPM: share of cycles a tensor core pipe was busy (Hopper and newer).", Some(ratio()), Family::default()),
            dram_bandwidth: registered(r, "musetalk_gpu_dram_bandwidth_utilization", "GPM: DRAM bandwidth used / peak (Hopper and newer).", Some(ratio()), Family::default()),
        }
    }

    /// Publishes a sample's GPUs. Every family is cleared first, so a GPU that vanished
    /// (or a sample without GPUs: NVML lost) is absent rather than frozen at its last
    /// value; counters are re-set to their totals, which Prometheus sees as continuous.
    pub fn publish(&self, gpus: Option<&[GpuSample]>) {
        self.utilization.clear();
        for fam in [&self.memory_usage, &self.memory_limit, &self.memory_utilization, &self.memory_bandwidth, &self.power, &self.power_limit, &self.temperature, &self.sm_active, &self.sm_occupancy, &self.tensor_active, &self.dram_bandwidth] {
            fam.clear();
        }
        self.io.clear();
        self.energy.clear();
        self.errors.clear();
        self.clock.clear();
        self.clock_max.clear();
        self.clocks_event_reasons.clear();
        for g in gpus.into_iter().flatten() {
            let l = GpuLabels {
                gpu: g.index.to_string(),
                hw_type: "gpu",
                hw_id: g.uuid.clone(),
                hw_name: format!("gpu{}", g.index),
                hw_model: g.name.clone(),
                hw_vendor: "nvidia",
                hw_driver_version: g.driver_version.clone().unwrap_or_default(),
            };
            for (task, v) in [("general", g.util_general), ("encoder", g.util_encoder), ("decoder", g.util_decoder)] {
                if let Some(v) = v {
                    self.utilization.get_or_create(&GpuTaskLabels { gpu: l.clone(), hw_gpu_task: task }).set(v);
                }
            }
            let set = |fam: &Family<GpuLabels, FGauge>, v: Option<f64>| {
                if let Some(v) = v {
                    fam.get_or_create(&l).set(v);
                }
            };
            set(&self.memory_usage, g.memory_used.map(|v| v as f64));
            set(&self.memory_limit, g.memory_total.map(|v| v as f64));
            set(&self.memory_utilization, match (g.memory_used, g.memory_total) {
                (Some(u), Some(t)) if t > 0 => Some(u as f64 / t as f64),
                _ => None,
            });
            set(&self.memory_bandwidth, g.util_memory_bandwidth);
            set(&self.power, g.power_watts);
            set(&self.power_limit, g.power_limit_watts);
            set(&self.temperature, g.temperature_celsius);
            set(&self.sm_active, g.gpm.sm_active);
            set(&self.sm_occupancy, g.gpm.sm_occupancy);
            set(&self.tensor_active, g.gpm.tensor_active);
            set(&self.dram_bandwidth, g.gpm.dram_bandwidth);
            if let Some(j) = g.energy_joules {
                self.energy.get_or_create(&l).inc_by(j);
            }
            for (dir, v) in [("receive", g.pcie_rx_bytes), ("transmit", g.pcie_tx_bytes)] {
                if let Some(v) = v {
                    self.io.get_or_create(&GpuIoLabels { gpu: l.clone(), network_io_direction: dir }).inc_by(v);
                }
            }
            for (kind, v) in [("ecc_corrected", g.ecc_corrected), ("ecc_uncorrected", g.ecc_uncorrected)] {
                if let Some(v) = v {
                    self.errors.get_or_create(&GpuErrorLabels { gpu: l.clone(), error_type: kind }).inc_by(v);
                }
            }
            for (clock, now, max) in [("sm", g.clock_sm_hertz, g.clock_sm_max_hertz), ("memory", g.clock_memory_hertz, g.clock_memory_max_hertz)] {
                let cl = GpuClockLabels { gpu: l.clone(), clock };
                if let Some(v) = now {
                    self.clock.get_or_create(&cl).set(v);
                }
                if let Some(v) = max {
                    self.clock_max.get_or_create(&cl).set(v);
                }
            }
            if let Some(bits) = g.clocks_event_reasons {
                // Every known reason is published (0 or 1), so "for 5m" alerts see it end.
                for reason in ClockReason::ALL {
                    self.clocks_event_reasons.get_or_create(&GpuReasonLabels { gpu: l.clone(), reason: reason.as_str() }).set((bits & reason.bit() != 0) as i64);
                }
            }
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
    /// Per GPU (UUID): when it was last sampled and its PCIe bytes so far (rx, tx).
    pcie: HashMap<String, (Instant, f64, f64)>,
}

impl GpuSource {
    pub fn new(devices: Result<Box<dyn GpuDevices>, String>) -> Self {
        GpuSource { devices, pcie: HashMap::new() }
    }

    /// Integrates PCIe throughput into byte totals: each reading stands for the
    /// interval since the previous sample (NVML offers rates only, not counters).
    fn integrate_pcie(&mut self, at: Instant, gpus: &mut [GpuSample]) {
        for g in gpus.iter_mut() {
            if g.pcie_rx_bytes_per_second.is_none() && g.pcie_tx_bytes_per_second.is_none() {
                continue;
            }
            let e = self.pcie.entry(g.uuid.clone()).or_insert((at, 0.0, 0.0));
            let dt = at.saturating_duration_since(e.0).as_secs_f64();
            e.0 = at;
            e.1 += g.pcie_rx_bytes_per_second.unwrap_or(0.0) * dt;
            e.2 += g.pcie_tx_bytes_per_second.unwrap_or(0.0) * dt;
            g.pcie_rx_bytes = g.pcie_rx_bytes_per_second.map(|_| e.1);
            g.pcie_tx_bytes = g.pcie_tx_bytes_per_second.map(|_| e.2);
        }
        self.pcie.retain(|uuid, _| gpus.iter().any(|g| &g.uuid == uuid));
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
        let mut gpus = devices.sample()?;
        self.integrate_pcie(sample.at, &mut gpus);
        // Attribute per-process GPU memory and SM share to the trees the process source walked.
        for tree in &mut sample.trees {
            let mut mem = None::<u64>;
            let mut util = gpus.iter().any(|g| g.process_util_supported).then_some(0.0);
            tree.gpus.clear();
            for g in &gpus {
                if g.processes.iter().any(|p| tree.pids.contains(&p.pid)) {
                    tree.gpus.push(g.index);
                }
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
    fn pcie_rates_integrate_into_byte_totals() {
        let g = |rx: Option<f64>| GpuSample { uuid: "GPU-a".into(), pcie_rx_bytes_per_second: rx, pcie_tx_bytes_per_second: rx.map(|r| r / 2.0), ..Default::default() };
        let mut src = GpuSource::new(Err("unused".into()));
        let t = Instant::now();
        let mut first = vec![g(Some(1e9))];
        src.integrate_pcie(t, &mut first);
        assert_eq!(first[0].pcie_rx_bytes, Some(0.0), "the first reading starts the count");
        let mut second = vec![g(Some(2e9))];
        src.integrate_pcie(t + std::time::Duration::from_millis(500), &mut second);
        assert_eq!(second[0].pcie_rx_bytes, Some(1e9));
        assert_eq!(second[0].pcie_tx_bytes, Some(5e8));
        let mut unsupported = vec![g(None)];
        src.integrate_pcie(t + std::time::Duration::from_secs(1), &mut unsupported);
        assert_eq!(unsupported[0].pcie_rx_bytes, None, "not reported: absent, not 0");
    }

    #[test]
    fn reasons_decode_from_nvml_bits() {
        let r: Vec<_> = ClockReason::active(0x4 | 0x20 | 0x1).map(ClockReason::as_str).collect();
        assert_eq!(r, vec!["idle", "power_cap", "thermal"]);
        assert!(ClockReason::PowerCap.is_throttle() && !ClockReason::Idle.is_throttle() && !ClockReason::SyncBoost.is_throttle());
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
