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
use prometheus_client::metrics::counter::{ConstCounter, Counter};
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

type HistCtor = Buckets;
type TracedCtor = Buckets;

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
pub struct JobLabels {
    pub mode: &'static str,
    pub backend: &'static str,
    pub outcome: &'static str,
}

/// Why a request was refused before its upload was read: bounded (`queue_full`, `draining`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub mode: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub mode: &'static str,
    pub step: &'static str,
}

/// `stage` comes from a bounded set (see `pipeline::stages`): MuseTalk's stage names,
/// or a command pipeline's own names capped in count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub mode: &'static str,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InputLabels {
    pub mode: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLabels {
    pub backend: &'static str,
    /// Exit code 0–255 as text, `signal_N`, or `other`: bounded.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub http_request_method: String,
    /// The route template (`/v1/jobs/{id}`), never the raw path.
    pub http_route: String,
    pub http_response_status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
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

fn hist(buckets: &'static [f64]) -> HistCtor {
    Buckets(buckets)
}

fn traced(buckets: &'static [f64]) -> TracedCtor {
    Buckets(buckets)
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
    // Jobs (simple and realtime modes).
    pub jobs: Family<JobLabels, Counter>,
    pub jobs_rejected: Family<RejectLabels, Counter>,
    pub job_duration: Family<JobLabels, TracedHistogram, TracedCtor>,
    pub step_duration: Family<StepLabels, TracedHistogram, TracedCtor>,
    pub stage_duration: Family<StageLabels, TracedHistogram, TracedCtor>,
    pub queue_wait: Family<ModeLabels, Histogram, HistCtor>,
    pub jobs_in_flight: Family<ModeLabels, Gauge>,
    pub jobs_queued: Family<ModeLabels, Gauge>,
    pub jobs_capacity: Family<ModeLabels, Gauge>,
    pub input_size: Family<InputLabels, Histogram, HistCtor>,
    pub output_size: Family<ModeLabels, Histogram, HistCtor>,
    pub output_input_ratio: Family<ModeLabels, Histogram, HistCtor>,
    pub subprocess_exits: Family<ExitLabels, Counter>,
    pub realtime_factor: Family<ModeLabels, Histogram, HistCtor>,
    pub worker_up: Family<WorkerLabels, Gauge>,
    pub worker_restarts: Family<WorkerLabels, Counter>,
    // HTTP.
    pub http_duration: Family<HttpLabels, Histogram, HistCtor>,
    // Host and GPU (OpenTelemetry semantic-convention names).
    /// The collector sources' own families (each source's file defines, registers and publishes them).
    pub cpu: crate::collector::cpu::CpuFamilies,
    pub memory: crate::collector::memory::MemoryFamilies,
    /// The GPU source's own families (`collector/gpu.rs` defines, registers and publishes them).
    pub gpu: crate::collector::gpu::GpuFamilies,
    // The pipeline's process trees, summed per mode.
    pub pipeline: crate::collector::process::PipelineFamilies,
    // Collector health.
    pub collector_up: Family<SourceLabels, Gauge>,
    pub collector_sample_duration: Family<SourceLabels, Histogram, HistCtor>,
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
        let ratio = || Unit::Other("ratio".into());
        let m = Metrics {
            jobs: Family::default(),
            jobs_rejected: Family::default(),
            job_duration: Family::new_with_constructor(traced(JOB_BUCKETS)),
            step_duration: Family::new_with_constructor(traced(STEP_BUCKETS)),
            stage_duration: Family::new_with_constructor(traced(STEP_BUCKETS)),
            queue_wait: Family::new_with_constructor(hist(JOB_BUCKETS)),
            jobs_in_flight: Family::default(),
            jobs_queued: Family::default(),
            jobs_capacity: Family::default(),
            input_size: Family::new_with_constructor(hist(SIZE_BUCKETS)),
            output_size: Family::new_with_constructor(hist(SIZE_BUCKETS)),
            output_input_ratio: Family::new_with_constructor(hist(RATIO_BUCKETS)),
            subprocess_exits: Family::default(),
            realtime_factor: Family::new_with_constructor(hist(REALTIME_BUCKETS)),
            worker_up: Family::default(),
            worker_restarts: Family::default(),
            http_duration: Family::new_with_constructor(hist(HTTP_BUCKETS)),
            cpu: Default::default(),
            memory: Default::default(),
            gpu: Default::default(),
            pipeline: Default::default(),
            collector_up: Family::default(),
            collector_sample_duration: Family::new_with_constructor(hist(SAMPLE_BUCKETS)),
            self_process: Arc::default(),
            registry: Registry::default(),
        };
        r.register("musetalk_jobs", "Jobs finished, by outcome.", m.jobs.clone());
        r.register("musetalk_jobs_rejected", "Requests refused at admission, before their upload was read: queue full (429) or shutting down (503).", m.jobs_rejected.clone());
        r.register_with_unit("musetalk_job_duration", "Whole-job duration, queue wait included; exemplars carry the trace id.", Unit::Seconds, m.job_duration.clone());
        r.register_with_unit("musetalk_step_duration", "Duration of each job step; exemplars carry the trace id.", Unit::Seconds, m.step_duration.clone());
        r.register_with_unit("musetalk_stage_duration", "Duration of each pipeline (MuseTalk) stage; exemplars carry the trace id.", Unit::Seconds, m.stage_duration.clone());
        r.register_with_unit("musetalk_queue_wait", "Time a job waited for a run slot.", Unit::Seconds, m.queue_wait.clone());
        r.register("musetalk_jobs_in_flight", "Jobs running now.", m.jobs_in_flight.clone());
        r.register("musetalk_jobs_queued", "Jobs waiting for a run slot now.", m.jobs_queued.clone());
        r.register("musetalk_jobs_capacity", "Jobs admitted at most at once (run slots + --queue-size); beyond it requests get 429.", m.jobs_capacity.clone());
        r.register_with_unit("musetalk_input_size", "Uploaded input file sizes.", Unit::Bytes, m.input_size.clone());
        r.register_with_unit("musetalk_output_size", "Output video sizes.", Unit::Bytes, m.output_size.clone());
        r.register_with_unit("musetalk_output_input_size", "Output size divided by total input size.", ratio(), m.output_input_ratio.clone());
        r.register("musetalk_subprocess_exits", "Pipeline subprocess exits by exit code (or signal).", m.subprocess_exits.clone());
        r.register("musetalk_realtime_factor", "Output video seconds per second of processing (1 = real time).", m.realtime_factor.clone());
        r.register("musetalk_worker_up", "1 while the realtime worker answers, 0 otherwise.", m.worker_up.clone());
        r.register("musetalk_worker_restarts", "Realtime worker restarts.", m.worker_restarts.clone());
        r.register_with_unit("http_server_request_duration", "HTTP server request duration.", Unit::Seconds, m.http_duration.clone());
        m.cpu.register(&mut r);
        m.memory.register(&mut r);
        m.gpu.register(&mut r);
        m.pipeline.register(&mut r);
        r.register("musetalk_collector_up", "1 if the resource source's last sample succeeded.", m.collector_up.clone());
        r.register_with_unit("musetalk_collector_sample_duration", "Time one resource source took to sample.", Unit::Seconds, m.collector_sample_duration.clone());
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
    pub fn observe_traced<L>(family: &Family<L, TracedHistogram, TracedCtor>, labels: &L, value: f64, trace_id: &str)
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
        m.jobs.get_or_create(&JobLabels { mode: "simple", backend: "preview", outcome: "succeeded" }).inc();
        Metrics::observe_traced(&m.step_duration, &StepLabels { mode: "simple", step: "file_processing" }, 0.02, "4bf92f3577b34da6a3ce929d0e0e4736");
        m.cpu.publish(Some(&crate::collector::CpuSample { per_cpu: vec![0.25], total: 0.25 }));
        m.set_self_process(SelfProcess { cpu_seconds: 1.5, resident_bytes: 1 << 20, max_fds: Some(1024), ..Default::default() });
        let (ct, text) = m.render(false);
        assert_eq!(ct, TEXT_CONTENT_TYPE);
        assert!(text.contains("musetalk_jobs_total{mode=\"simple\",backend=\"preview\",outcome=\"succeeded\"} 1"), "{text}");
        assert!(text.contains("musetalk_step_duration_seconds_bucket{le=\"0.05\",mode=\"simple\",step=\"file_processing\"} 1") || text.contains("musetalk_step_duration_seconds_bucket{mode=\"simple\",step=\"file_processing\",le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("system_cpu_utilization_ratio{cpu=\"0\"} 0.25"), "{text}");
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
