//! The resource collector: samples CPU, memory, process trees and GPUs on its own interval.
//!
//! Each source lives in its own file behind [`Source`] (as node_exporter's collectors
//! do) and fills its part of one [`Sample`]. A dedicated thread samples every
//! `--sample-interval`, publishes gauges, reports per-source health
//! (`musetalk_collector_up`, `musetalk_collector_sample_duration_seconds`) and pushes
//! the sample into a bounded [`ring::Ring`] that answers "average and peak between t0
//! and t1" for per-job reports. A scrape only reads what the last sample published:
//! it never triggers collection. The collector knows nothing of jobs: jobs register
//! process trees by root pid and read windows back.

pub mod cpu;
pub mod gpu;
pub mod insight;
pub mod memory;
pub mod nvml;
pub mod process;
pub mod procfile;
pub mod ring;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::{Buckets, Metrics, SAMPLE_BUCKETS, registered};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
pub use ring::{AvgPeak, GpuWindow, Ring, TreeWindow, Window};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// The collector's health families: whether each source's last sample worked, and its cost.
#[derive(Debug)]
pub struct CollectorFamilies {
    pub up: Family<SourceLabels, Gauge>,
    pub sample_duration: Family<SourceLabels, Histogram, Buckets>,
}

impl CollectorFamilies {
    pub fn new(r: &mut Registry) -> Self {
        CollectorFamilies {
            up: registered(r, "musetalk_collector_up", "1 if the resource source's last sample succeeded.", None, Family::default()),
            sample_duration: registered(r, "musetalk_collector_sample_duration", "Time one resource source took to sample.", Some(Unit::Seconds), Buckets::family(SAMPLE_BUCKETS)),
        }
    }
}

/// The bounded set of sources (the `source` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceName {
    Cpu,
    Memory,
    Process,
    Gpu,
}

impl SourceName {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceName::Cpu => "cpu",
            SourceName::Memory => "memory",
            SourceName::Process => "process",
            SourceName::Gpu => "gpu",
        }
    }
}

/// Why a source produced nothing this time.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot work on this machine (no NVML library, no GPU): "no data", not a fault.
    #[error("no data: {0}")]
    Unavailable(String),
    /// Reading failed this time (a /proc file, an NVML call).
    #[error("{0}")]
    Failed(String),
}

/// One source of resource figures. `collect` fills its part of `sample`; the
/// collector times it and records its health.
pub trait Source: Send {
    fn name(&self) -> SourceName;
    fn collect(&mut self, sample: &mut Sample, trees: &[TreeRegistration]) -> Result<(), SourceError>;
}

/// Host CPU over the last interval: busy share per logical CPU and overall, and each
/// CPU's split by mode (what `system_cpu_utilization_ratio{cpu_mode}` publishes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSample {
    pub per_cpu: Vec<f64>,
    pub total: f64,
    pub modes: Vec<cpu::ModeShares>,
}

/// Host memory in bytes. `used` = total − available, as OpenTelemetry's
/// `system.memory.usage{state="used"}` defines it (MemAvailable: what can be had
/// without swapping); `free`, `cached` and `buffers` are the kernel's own figures, so
/// the states overlap and need not add up to the total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemorySample {
    pub total: u64,
    pub used: u64,
    pub free: u64,
    pub cached: u64,
    pub buffers: u64,
}

pub use gpu::{ClockReason, GpmFigures, GpuProcess, GpuSample};

/// `mode` of a tree registered only for a job's resource window (a shared worker whose
/// figures the pipeline gauges already count under its own registration).
pub const WINDOW_ONLY: &str = "window";

/// A process tree registered by a job or worker: followed from its root every sample.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeRegistration {
    pub key: u64,
    pub root_pid: u32,
    /// `simple` or `realtime`: the `mode` label of the pipeline gauges.
    pub mode: &'static str,
    /// The first CPU delta of the tree is measured from here.
    pub registered_at: Instant,
}

/// What one sample saw of one registered tree.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TreeSample {
    pub key: u64,
    pub mode: &'static str,
    pub pids: Vec<u32>,
    /// Share of all logical CPUs used by the tree over the last interval (0–1).
    pub cpu_ratio: f64,
    pub rss_bytes: u64,
    /// Filled by the GPU source: memory the tree's processes hold on any GPU.
    pub gpu_memory_bytes: Option<u64>,
    /// Filled by the GPU source: SM share of the tree's processes (max over GPUs, 0–1);
    /// 0 when the driver reports per-process shares and the tree has none.
    pub gpu_util: Option<f64>,
    /// Filled by the GPU source: the GPUs (indexes) the tree's processes are on.
    pub gpus: Vec<u32>,
}

/// One sampling round. Sources that failed leave their part `None`.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub wall: SystemTime,
    pub cpu: Option<CpuSample>,
    pub memory: Option<MemorySample>,
    pub gpus: Option<Vec<GpuSample>>,
    pub trees: Vec<TreeSample>,
    pub sidecar: Option<crate::metrics::SelfProcess>,
}

impl Sample {
    pub fn new(at: Instant) -> Self {
        Sample { at, wall: SystemTime::now(), cpu: None, memory: None, gpus: None, trees: Vec::new(), sidecar: None }
    }
}

/// Shared handle: register process trees, query windows, check readiness.
#[derive(Clone)]
pub struct CollectorHandle {
    inner: Arc<Shared>,
}

struct Shared {
    trees: Mutex<HashMap<u64, TreeRegistration>>,
    next_key: AtomicU64,
    ring: RwLock<Ring>,
    has_sample: AtomicBool,
    source_up: Mutex<HashMap<SourceName, bool>>,
    interval: Duration,
}

/// Unregisters its tree when dropped, so a failed job never leaves a tree behind.
#[must_use = "the tree is unregistered when the guard drops"]
pub struct TreeGuard {
    key: u64,
    handle: CollectorHandle,
}

impl TreeGuard {
    pub fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        self.handle.inner.trees.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

impl CollectorHandle {
    fn new(capacity: usize, interval: Duration) -> Self {
        CollectorHandle {
            inner: Arc::new(Shared {
                trees: Mutex::default(),
                next_key: AtomicU64::new(1),
                ring: RwLock::new(Ring::new(capacity).with_interval(interval)),
                has_sample: AtomicBool::new(false),
                source_up: Mutex::default(),
                interval,
            }),
        }
    }

    /// Follows `root_pid` and its descendants from the next sample on.
    pub fn register_tree(&self, root_pid: u32, mode: &'static str) -> TreeGuard {
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        self.inner.trees.lock().unwrap_or_else(|e| e.into_inner()).insert(key, TreeRegistration { key, root_pid, mode, registered_at: Instant::now() });
        TreeGuard { key, handle: self.clone() }
    }

    /// Average and peak of every source between `from` and `to`, and of tree `tree` if given.
    pub fn window(&self, from: Instant, to: Instant, tree: Option<u64>) -> Window {
        self.inner.ring.read().unwrap_or_else(|e| e.into_inner()).window(from, to, tree)
    }

    /// The most recent samples (oldest first), at most `n`.
    pub fn recent(&self, n: usize) -> Vec<Arc<Sample>> {
        self.inner.ring.read().unwrap_or_else(|e| e.into_inner()).recent(n)
    }

    /// True once the first sample is in.
    pub fn has_sample(&self) -> bool {
        self.inner.has_sample.load(Ordering::Acquire)
    }

    /// Health of each source as of its last sample.
    pub fn source_health(&self) -> Vec<(SourceName, bool)> {
        let mut v: Vec<_> = self.inner.source_up.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, *v)).collect();
        v.sort_by_key(|(k, _)| k.as_str());
        v
    }

    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    fn registrations(&self) -> Vec<TreeRegistration> {
        self.inner.trees.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

/// Owns the sources and the sampling thread; [`Collector::stop`] joins it.
pub struct Collector {
    handle: CollectorHandle,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// The sources of this machine: /proc CPU, memory and processes, and NVML when it loads.
    pub fn default_sources() -> Vec<Box<dyn Source>> {
        vec![
            Box::new(cpu::CpuSource::new()),
            Box::new(memory::MemorySource::new()),
            Box::new(process::ProcessSource::new()),
            Box::new(gpu::GpuSource::new(nvml::NvmlDevices::init())),
        ]
    }

    /// Starts sampling on a dedicated thread (sampling must not wait behind busy async workers).
    pub fn start(sources: Vec<Box<dyn Source>>, metrics: Arc<Metrics>, interval: Duration, capacity: usize) -> Collector {
        let handle = CollectorHandle::new(capacity, interval);
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let mut sampler = Sampler { sources, metrics, handle: handle.clone(), logged_down: HashMap::new() };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                let (lock, cvar) = &*stop2;
                let mut next = Instant::now();
                loop {
                    sampler.sample_once();
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        // Fell behind (suspended machine, slow source): skip, don't burst.
                        next = now + interval;
                    }
                    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (guard, _) = cvar
                        .wait_timeout_while(guard, next.saturating_duration_since(Instant::now()), |stopped| !*stopped)
                        .unwrap_or_else(|e| e.into_inner());
                    if *guard {
                        break;
                    }
                }
            })
            .expect("spawning the collector thread");
        Collector { handle, stop, thread: Some(thread) }
    }

    pub fn handle(&self) -> CollectorHandle {
        self.handle.clone()
    }

    /// Stops the sampling thread and waits for it.
    pub fn stop(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sampling loop's state; also driven directly by tests and benchmarks.
pub struct Sampler {
    sources: Vec<Box<dyn Source>>,
    metrics: Arc<Metrics>,
    handle: CollectorHandle,
    logged_down: HashMap<SourceName, bool>,
}

impl Sampler {
    /// A sampler without a thread, for tests and benchmarks.
    pub fn new(sources: Vec<Box<dyn Source>>, metrics: Arc<Metrics>, capacity: usize, interval: Duration) -> Self {
        Sampler { sources, metrics, handle: CollectorHandle::new(capacity, interval), logged_down: HashMap::new() }
    }

    pub fn handle(&self) -> CollectorHandle {
        self.handle.clone()
    }

    /// One round: every source in order (process before gpu: the GPU source attributes
    /// memory to the trees the process source just walked), then publish and store.
    pub fn sample_once(&mut self) -> Arc<Sample> {
        let trees = self.handle.registrations();
        let mut sample = Sample::new(Instant::now());
        for source in &mut self.sources {
            let name = source.name();
            let t0 = Instant::now();
            let result = source.collect(&mut sample, &trees);
            let labels = SourceLabels { source: name.as_str() };
            self.metrics.collector.sample_duration.get_or_create(&labels).observe(t0.elapsed().as_secs_f64());
            let up = result.is_ok();
            self.metrics.collector.up.get_or_create(&labels).set(up as i64);
            self.handle.inner.source_up.lock().unwrap_or_else(|e| e.into_inner()).insert(name, up);
            // Log transitions only: a missing GPU is one line at start, not one per sample.
            let was_down = self.logged_down.get(&name).copied().unwrap_or(false);
            match result {
                Err(e) if !was_down => {
                    match e {
                        SourceError::Unavailable(_) => tracing::info!(source = name.as_str(), "resource source has no data: {e}"),
                        SourceError::Failed(_) => tracing::warn!(source = name.as_str(), "resource source failed: {e}"),
                    }
                    self.logged_down.insert(name, true);
                }
                Ok(()) if was_down => {
                    tracing::info!(source = name.as_str(), "resource source recovered");
                    self.logged_down.insert(name, false);
                }
                _ => {}
            }
        }
        publish(&self.metrics, &sample);
        let sample = Arc::new(sample);
        self.handle.inner.ring.write().unwrap_or_else(|e| e.into_inner()).push(sample.clone());
        self.handle.inner.has_sample.store(true, Ordering::Release);
        sample
    }
}

/// Sets the gauges from a sample. Families of a source that produced nothing are
/// cleared, so a vanished GPU is absent rather than frozen at its last value.
pub fn publish(m: &Metrics, s: &Sample) {
    m.cpu.publish(s.cpu.as_ref());
    m.memory.publish(s.memory.as_ref());
    m.gpu.publish(s.gpus.as_deref());
    m.pipeline.publish(&s.trees, s.gpus.as_deref());
    if let Some(p) = &s.sidecar {
        m.set_self_process(p.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic source: returns scripted results in turn.
    struct Scripted {
        name: SourceName,
        results: Vec<Result<f64, SourceError>>,
    }

    impl Source for Scripted {
        fn name(&self) -> SourceName {
            self.name
        }
        fn collect(&mut self, s: &mut Sample, trees: &[TreeRegistration]) -> Result<(), SourceError> {
            let r = if self.results.is_empty() { Ok(0.5) } else { self.results.remove(0) };
            let v = r?;
            match self.name {
                SourceName::Cpu => s.cpu = Some(CpuSample { per_cpu: vec![v, v], total: v, modes: vec![[v, 0.0, 0.0, 1.0 - v, 0.0, 0.0, 0.0]; 2] }),
                SourceName::Memory => {
                    s.memory = Some(MemorySample { total: 100, used: (v * 100.0) as u64, free: 10, cached: 5, buffers: 1 })
                }
                SourceName::Process => {
                    s.trees = trees
                        .iter()
                        .map(|t| TreeSample { key: t.key, mode: t.mode, pids: vec![t.root_pid], cpu_ratio: v, rss_bytes: 1000, ..Default::default() })
                        .collect()
                }
                SourceName::Gpu => {
                    s.gpus = Some(vec![GpuSample {
                        index: 0,
                        uuid: "GPU-x".into(),
                        name: "Test GPU".into(),
                        driver_version: Some("550.54.15".into()),
                        util_general: Some(v),
                        memory_used: Some(10),
                        memory_total: Some(100),
                        energy_joules: Some(1500.0),
                        clocks_event_reasons: Some(ClockReason::PowerCap.bit()),
                        ..Default::default()
                    }])
                }
            }
            Ok(())
        }
    }

    fn scripted(name: SourceName, results: Vec<Result<f64, SourceError>>) -> Box<dyn Source> {
        Box::new(Scripted { name, results })
    }

    #[test]
    fn source_failure_sets_up_zero_and_recovers() {
        let metrics = Arc::new(Metrics::new());
        let mut s = Sampler::new(
            vec![
                scripted(SourceName::Cpu, vec![Ok(0.2), Err(SourceError::Failed("boom".into())), Ok(0.4)]),
                scripted(SourceName::Gpu, (0..3).map(|_| Err(SourceError::Unavailable("no NVML".into()))).collect()),
            ],
            metrics.clone(),
            16,
            Duration::from_millis(500),
        );
        s.sample_once();
        let text = metrics.render(false).1;
        assert!(text.contains("musetalk_collector_up{source=\"cpu\"} 1"), "{text}");
        assert!(text.contains("musetalk_collector_up{source=\"gpu\"} 0"), "{text}");
        assert!(!text.contains("hw_gpu_utilization_ratio{"), "no GPU: hw_* absent, not zero\n{text}");
        assert!(!text.contains("musetalk_pipeline_gpu_memory_bytes{"), "{text}");
        let second = s.sample_once();
        assert!(second.cpu.is_none());
        assert!(metrics.render(false).1.contains("musetalk_collector_up{source=\"cpu\"} 0"));
        s.sample_once();
        assert!(metrics.render(false).1.contains("musetalk_collector_up{source=\"cpu\"} 1"));
        assert!(metrics.render(false).1.contains("system_cpu_utilization_ratio{cpu_logical_number=\"1\",cpu_mode=\"user\"} 0.4"));
        assert_eq!(s.handle().source_health(), vec![(SourceName::Cpu, true), (SourceName::Gpu, false)]);
    }

    #[test]
    fn gpu_series_disappear_when_the_gpu_does() {
        let metrics = Arc::new(Metrics::new());
        let mut s = Sampler::new(
            vec![scripted(SourceName::Gpu, vec![Ok(0.7), Err(SourceError::Failed("lost".into()))])],
            metrics.clone(),
            16,
            Duration::from_millis(500),
        );
        s.sample_once();
        let text = metrics.render(false).1;
        let l = "gpu=\"0\",hw_type=\"gpu\",hw_id=\"GPU-x\",hw_name=\"gpu0\",hw_model=\"Test GPU\",hw_vendor=\"nvidia\",hw_driver_version=\"550.54.15\"";
        assert!(text.contains(&format!("hw_gpu_utilization_ratio{{{l},hw_gpu_task=\"general\"}} 0.7")), "{text}");
        assert!(text.contains(&format!("hw_gpu_memory_limit_bytes{{{l}}} 100")), "{text}");
        assert!(text.contains(&format!("hw_gpu_memory_utilization_ratio{{{l}}} 0.1")), "used / limit\n{text}");
        assert!(text.contains(&format!("hw_energy_joules_total{{{l}}} 1500")), "{text}");
        assert!(text.contains(&format!("musetalk_gpu_clocks_event_reasons{{{l},reason=\"power_cap\"}} 1")), "{text}");
        assert!(text.contains(&format!("musetalk_gpu_clocks_event_reasons{{{l},reason=\"thermal\"}} 0")), "{text}");
        assert!(!text.contains("hw_gpu_io_bytes_total{"), "PCIe not reported: absent, not 0\n{text}");
        s.sample_once();
        let text = metrics.render(false).1;
        for gone in ["hw_gpu_utilization_ratio{", "hw_energy_joules_total{", "musetalk_gpu_clocks_event_reasons{"] {
            assert!(!text.contains(gone), "a lost GPU's series go: {gone}\n{text}");
        }
    }

    #[test]
    fn trees_are_sampled_while_registered() {
        let metrics = Arc::new(Metrics::new());
        let mut s = Sampler::new(vec![scripted(SourceName::Process, vec![])], metrics.clone(), 16, Duration::from_millis(500));
        let h = s.handle();
        let guard = h.register_tree(4242, "simple");
        let t0 = Instant::now();
        let sample = s.sample_once();
        assert_eq!(sample.trees.len(), 1);
        assert_eq!(sample.trees[0].pids, vec![4242]);
        assert!(metrics.render(false).1.contains("musetalk_pipeline_memory_rss_bytes{mode=\"simple\"} 1000"));
        let w = h.window(t0, Instant::now(), Some(guard.key()));
        assert_eq!(w.tree.unwrap().rss.peak, 1000.0);
        drop(guard);
        assert!(s.sample_once().trees.is_empty());
        assert!(metrics.render(false).1.contains("musetalk_pipeline_memory_rss_bytes{mode=\"simple\"} 0"));
    }

    #[test]
    fn thread_samples_on_its_interval_and_stops() {
        let metrics = Arc::new(Metrics::new());
        let mut c = Collector::start(vec![scripted(SourceName::Cpu, vec![])], metrics, Duration::from_millis(50), 100);
        let h = c.handle();
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.recent(100).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(h.has_sample());
        c.stop();
        let n = h.recent(100).len();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(h.recent(100).len(), n, "no sampling after stop");
        assert!(n >= 3);
    }
}
