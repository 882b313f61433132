//! Every Prometheus metric family of the service, defined, named, described and bucketed here alone.
//!
//! Other modules receive typed handles (`Family<Labels, _>` fields) and never spell a
//! metric name. Names follow DESIGN.md §4: base units, `_total` added to counters by
//! `prometheus-client` itself, unit suffixes added from the registered [`Unit`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// A float gauge (prometheus-client's default gauge is i64).
pub type FGauge = Gauge<f64, AtomicU64>;
/// A histogram whose buckets remember the trace id of their latest observation.
pub type TracedHistogram = HistogramWithExemplars<TraceExemplar>;
/// Constructs a family's histograms with its bucket set.
#[derive(Clone, Copy, Debug)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

impl MetricConstructor<TracedHistogram> for Buckets {
    fn new_metric(&self) -> TracedHistogram {
        HistogramWithExemplars::new(self.0.iter().copied())
    }
}


/// Exemplar labels: the trace id, as Grafana's `exemplarTraceIdDestinations` expects it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

impl TraceExemplar {
    /// `None` for an invalid (all-zero) trace id, so unsampled work leaves no dangling exemplar.
    pub fn new(trace_id: &str) -> Option<Self> {
        (!trace_id.is_empty() && trace_id.bytes().any(|b| b != b'0')).then(|| TraceExemplar { trace_id: trace_id.to_string() })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Buckets for whole jobs: 100 ms … 30 min (video jobs, not HTTP defaults).
pub const JOB_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0];
/// Buckets for steps and stages: some take a millisecond (config_creation), some half an hour.
pub const STEP_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];
/// HTTP requests range from a /metrics scrape to a synchronous 30-minute inference.
pub const HTTP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];
/// Media sizes, 64 KiB … 4 GiB, ×4 per bucket.
pub const SIZE_BUCKETS: &[f64] = &[
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];
/// Output/input size ratio.
pub const RATIO_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0];
/// Output seconds per processing second (1 = real time).
pub const REALTIME_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0];
/// One collector source's sampling cost: microseconds to tens of milliseconds.
pub const SAMPLE_BUCKETS: &[f64] = &[1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05];

impl Buckets {
    /// A family of histograms (or traced histograms) with these buckets.
    pub fn family<L, M>(buckets: &'static [f64]) -> Family<L, M, Buckets>
    where
        L: Clone + std::hash::Hash + Eq,
        Buckets: MetricConstructor<M>,
    {
        Family::new_with_constructor(Buckets(buckets))
    }
}

/// Registers `metric` as `name` (with `unit` when given) and hands it back, so a
/// component declares a family once: its field, built and registered in one expression.
pub fn registered<M>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    match unit {
        Some(u) => r.register_with_unit(name, help, u, metric.clone()),
        None => r.register(name, help, metric.clone()),
    }
    metric
}

/// `ratio`, the unit of shares and ratios (OpenTelemetry's `1`, Prometheus' `_ratio`).
pub fn ratio() -> Unit {
    Unit::Other("ratio".into())
}

/// The sidecar's own process figures, as the process source sampled them last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelfProcess {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
    pub start_time_seconds: f64,
}

/// Encodes `process_*` from the latest sample: a scrape reads, it never collects.
#[derive(Debug, Default)]
struct ProcessCollector {
    latest: Arc<Mutex<Option<SelfProcess>>>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let seconds = Unit::Seconds;
        let bytes = Unit::Bytes;
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor("process_cpu", "Total user and system CPU time spent by the sidecar.", Some(&seconds), cpu.metric_type())?)?;
        let gauges: [(&str, &str, Option<&Unit>, f64); 5] = [
            ("process_resident_memory", "Resident memory size of the sidecar.", Some(&bytes), p.resident_bytes as f64),
            ("process_virtual_memory", "Virtual memory size of the sidecar.", Some(&bytes), p.virtual_bytes as f64),
            ("process_open_fds", "Open file descriptors of the sidecar.", None, p.open_fds as f64),
            ("process_threads", "OS threads of the sidecar.", None, p.threads as f64),
            ("process_start_time", "Start time of the sidecar since the Unix epoch.", Some(&seconds), p.start_time_seconds),
        ];
        for (name, help, unit, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)?;
        }
        if let Some(max) = p.max_fds {
            let g = ConstGauge::new(max as f64);
            g.encode(encoder.encode_descriptor("process_max_fds", "Limit on open file descriptors of the sidecar.", None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Encodes the span exporter's counters (kept in `telemetry`, which starts before the registry).
#[derive(Debug, Default)]
struct TelemetryCollector;

impl Collector for TelemetryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (exported, dropped) = crate::telemetry::export_stats();
        let c = ConstCounter::new(exported);
        c.encode(encoder.encode_descriptor("musetalk_telemetry_spans_exported", "Spans the OTLP exporter delivered.", None, c.metric_type())?)?;
        let c = ConstCounter::new(dropped);
        c.encode(encoder.encode_descriptor("musetalk_telemetry_spans_dropped", "Spans lost because the OTLP export failed or timed out (collector down or slow).", None, c.metric_type())?)?;
        Ok(())
    }
}

/// All metric families. Cheap to share (`Arc<Metrics>`); every handle is internally synchronised.
pub struct Metrics {
    registry: Registry,
    /// Jobs, steps, stages, queue, sizes, exits (`jobs/metrics.rs`).
    pub job: crate::jobs::metrics::JobFamilies,
    /// Realtime workers (`pipeline/worker.rs`).
    pub worker: crate::pipeline::worker::WorkerFamilies,
    /// HTTP server requests (`http/mod.rs`).
    pub http: crate::http::HttpFamilies,
    // Host and GPU (OpenTelemetry semantic-convention names).
    /// The collector sources' own families (each source's file defines, registers and publishes them).
    pub cpu: crate::collector::cpu::CpuFamilies,
    pub memory: crate::collector::memory::MemoryFamilies,
    /// The GPU source's own families (`collector/gpu.rs` defines, registers and publishes them).
    pub gpu: crate::collector::gpu::GpuFamilies,
    // The pipeline's process trees, summed per mode.
    pub pipeline: crate::collector::process::PipelineFamilies,
    /// Collector health (`collector/mod.rs`).
    pub collector: crate::collector::CollectorFamilies,
    /// Python profiles of jobs (`profile/mod.rs`).
    pub profile: crate::profile::ProfileFamilies,
    /// Media probe queries (`pipeline/prober.rs`).
    pub probe: crate::pipeline::prober::ProbeFamilies,
    // The sidecar itself.
    self_process: Arc<Mutex<Option<SelfProcess>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// `Content-Type` of the OpenMetrics exposition (the only one that carries exemplars).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        // Each component registers its own families; the order is the exposition's.
        let job = crate::jobs::metrics::JobFamilies::new(&mut r);
        let worker = crate::pipeline::worker::WorkerFamilies::new(&mut r);
        let http = crate::http::HttpFamilies::new(&mut r);
        let cpu = crate::collector::cpu::CpuFamilies::default();
        let memory = crate::collector::memory::MemoryFamilies::default();
        let gpu = crate::collector::gpu::GpuFamilies::new(&mut r);
        let pipeline = crate::collector::process::PipelineFamilies::default();
        cpu.register(&mut r);
        memory.register(&mut r);
        pipeline.register(&mut r);
        let collector = crate::collector::CollectorFamilies::new(&mut r);
        let profile = crate::profile::ProfileFamilies::new(&mut r);
        let probe = crate::pipeline::prober::ProbeFamilies::new(&mut r);
        let m = Metrics { job, worker, http, cpu, memory, gpu, pipeline, collector, profile, probe, self_process: Arc::default(), registry: Registry::default() };
        r.register(
            "musetalk_sidecar_build",
            "Build information of the sidecar.",
            Info::new(VersionLabels { version: env!("CARGO_PKG_VERSION") }),
        );
        r.register_collector(Box::new(ProcessCollector { latest: m.self_process.clone() }));
        r.register_collector(Box::new(TelemetryCollector));
        Metrics { registry: r, ..m }
    }

    /// Renders the registry. OpenMetrics when `openmetrics` (exemplars included), else text 0.0.4.
    pub fn render(&self, openmetrics: bool) -> (&'static str, String) {
        let mut out = String::with_capacity(32 * 1024);
        if openmetrics {
            // Writing to a String cannot fail; the encoder only returns fmt errors.
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
            (OPENMETRICS_CONTENT_TYPE, out)
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
            (TEXT_CONTENT_TYPE, out)
        }
    }

    /// Publishes the sidecar's own process figures for the next scrape.
    pub fn set_self_process(&self, p: SelfProcess) {
        *self.self_process.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    /// Observes `value` with the trace id as exemplar (when the trace is real).
    pub fn observe_traced<L>(family: &Family<L, TracedHistogram, Buckets>, labels: &L, value: f64, trace_id: &str)
    where
        L: Clone + std::hash::Hash + Eq,
    {
        family.get_or_create(labels).observe(value, TraceExemplar::new(trace_id), Some(SystemTime::now()));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Bounded label value for an exit status: `0`–`255`, `signal_N`, or `other`.
pub fn exit_code_label(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) if (0..=255).contains(&c) => c.to_string(),
        (_, Some(s)) if (1..=64).contains(&s) => format!("signal_{s}"),
        _ => "other".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_exemplars_render() {
        let m = Metrics::new();
        m.job.jobs.get_or_create(&crate::jobs::metrics::JobLabels { mode: "simple", backend: "preview", outcome: "succeeded" }).inc();
        Metrics::observe_traced(&m.job.step_duration, &crate::jobs::metrics::StepLabels { mode: "simple", step: "file_processing" }, 0.02, "4bf92f3577b34da6a3ce929d0e0e4736");
        m.cpu.publish(Some(&crate::collector::CpuSample { per_cpu: vec![0.25], total: 0.25, modes: vec![[0.25, 0.0, 0.0, 0.75, 0.0, 0.0, 0.0]] }));
        m.set_self_process(SelfProcess { cpu_seconds: 1.5, resident_bytes: 1 << 20, max_fds: Some(1024), ..Default::default() });
        let (ct, text) = m.render(false);
        assert_eq!(ct, TEXT_CONTENT_TYPE);
        assert!(text.contains("musetalk_jobs_total{mode=\"simple\",backend=\"preview\",outcome=\"succeeded\"} 1"), "{text}");
        assert!(text.contains("musetalk_step_duration_seconds_bucket{le=\"0.05\",mode=\"simple\",step=\"file_processing\"} 1") || text.contains("musetalk_step_duration_seconds_bucket{mode=\"simple\",step=\"file_processing\",le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("system_cpu_utilization_ratio{cpu_logical_number=\"0\",cpu_mode=\"user\"} 0.25"), "{text}");
        assert!(text.contains("system_cpu_utilization_ratio{cpu_logical_number=\"0\",cpu_mode=\"idle\"} 0.75"), "{text}");
        assert!(text.contains("process_cpu_seconds_total 1.5"), "{text}");
        assert!(text.contains("process_max_fds 1024"), "{text}");
        assert!(text.contains("musetalk_sidecar_build_info{version="), "{text}");
        assert!(!text.contains("trace_id"), "0.0.4 carries no exemplars");
        let (ct, om) = m.render(true);
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(om.contains("# {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.02"), "{om}");
        assert!(om.ends_with("# EOF\n"));
        assert!(!om.contains("hw_gpu_utilization_ratio{"), "no GPU sample: the hw_* families have no series");
    }

    #[test]
    fn unsampled_trace_leaves_no_exemplar() {
        assert!(TraceExemplar::new("00000000000000000000000000000000").is_none());
        assert!(TraceExemplar::new("").is_none());
    }

    #[test]
    fn exit_code_labels_are_bounded() {
        assert_eq!(exit_code_label(Some(0), None), "0");
        assert_eq!(exit_code_label(Some(137), None), "137");
        assert_eq!(exit_code_label(None, Some(9)), "signal_9");
        assert_eq!(exit_code_label(Some(-5), None), "other");
        assert_eq!(exit_code_label(None, None), "other");
    }
}
