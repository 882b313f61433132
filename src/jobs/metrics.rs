//! The job runner's metric families: jobs, steps, stages, queue, sizes, exits — declared,
//! named, bucketed and registered here alone.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{
    Buckets, JOB_BUCKETS, ModeLabels, RATIO_BUCKETS, REALTIME_BUCKETS, SIZE_BUCKETS, STEP_BUCKETS, TracedHistogram, ratio, registered,
};

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
/// or a command pipeline's own names capped in count; then the configuration labels of
/// [`LatencyLabels`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub mode: &'static str,
    pub stage: String,
    pub version: String,
    pub fp16: &'static str,
    pub batch_size: &'static str,
    pub worker: String,
}

impl StageLabels {
    pub fn new(stage: String, c: &LatencyLabels) -> Self {
        StageLabels { mode: c.mode, stage, version: c.version.clone(), fp16: c.fp16, batch_size: c.batch_size, worker: c.worker.clone() }
    }
}

/// `musetalk_job_duration_seconds`: the outcome, and the configuration labels of [`LatencyLabels`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobDurationLabels {
    pub mode: &'static str,
    pub backend: &'static str,
    pub outcome: &'static str,
    pub version: String,
    pub fp16: &'static str,
    pub batch_size: &'static str,
    pub worker: String,
}

impl JobDurationLabels {
    pub fn new(backend: &'static str, outcome: &'static str, c: &LatencyLabels) -> Self {
        JobDurationLabels { mode: c.mode, backend, outcome, version: c.version.clone(), fp16: c.fp16, batch_size: c.batch_size, worker: c.worker.clone() }
    }
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

/// Labels that tell realtime configurations apart, bounded: the model version (`v15`,
/// `v1`, or the backend's name when it is not MuseTalk), fp16 on/off, a batch-size bucket,
/// and the worker (`gpu0`…, or `none`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub mode: &'static str,
    pub version: String,
    pub fp16: &'static str,
    pub batch_size: &'static str,
    pub worker: String,
}

/// Every value of the `batch_size` label.
pub const BATCH_BUCKETS: [&str; 6] = ["1-4", "5-8", "9-16", "17-32", "33+", "default"];

/// `batch_size` label: a bucket, never the raw number.
pub fn batch_bucket(n: Option<u32>) -> &'static str {
    BATCH_BUCKETS[match n {
        Some(0..=4) => 0,
        Some(5..=8) => 1,
        Some(9..=16) => 2,
        Some(17..=32) => 3,
        Some(_) => 4,
        None => 5,
    }]
}

/// The job runner's families. Built and registered in one expression each ([`registered`]).
#[derive(Debug)]
pub struct JobFamilies {
    pub jobs: Family<JobLabels, Counter>,
    pub jobs_rejected: Family<RejectLabels, Counter>,
    pub job_duration: Family<JobDurationLabels, TracedHistogram, Buckets>,
    pub step_duration: Family<StepLabels, TracedHistogram, Buckets>,
    pub stage_duration: Family<StageLabels, TracedHistogram, Buckets>,
    pub queue_wait: Family<ModeLabels, Histogram, Buckets>,
    pub jobs_in_flight: Family<ModeLabels, Gauge>,
    pub jobs_queued: Family<ModeLabels, Gauge>,
    pub jobs_capacity: Family<ModeLabels, Gauge>,
    pub input_size: Family<InputLabels, Histogram, Buckets>,
    pub output_size: Family<ModeLabels, Histogram, Buckets>,
    pub output_input_ratio: Family<ModeLabels, Histogram, Buckets>,
    pub subprocess_exits: Family<ExitLabels, Counter>,
    pub realtime_factor: Family<ModeLabels, Histogram, Buckets>,
    pub time_to_first_frame: Family<LatencyLabels, TracedHistogram, Buckets>,
    pub batch_duration: Family<LatencyLabels, TracedHistogram, Buckets>,
    pub time_to_first_byte: Family<LatencyLabels, TracedHistogram, Buckets>,
}

impl JobFamilies {
    pub fn new(r: &mut Registry) -> Self {
        let s = || Some(Unit::Seconds);
        let b = || Some(Unit::Bytes);
        JobFamilies {
            jobs: registered(r, "musetalk_jobs", "Jobs finished, by outcome.", None, Family::default()),
            jobs_rejected: registered(r, "musetalk_jobs_rejected", "Requests refused at admission, before their upload was read: queue full (429) or shutting down (503).", None, Family::default()),
            job_duration: registered(r, "musetalk_job_duration", "Whole-job duration, queue wait included; exemplars carry the trace id.", s(), Buckets::family(JOB_BUCKETS)),
            step_duration: registered(r, "musetalk_step_duration", "Duration of each job step; exemplars carry the trace id.", s(), Buckets::family(STEP_BUCKETS)),
            stage_duration: registered(r, "musetalk_stage_duration", "Duration of each pipeline (MuseTalk) stage; exemplars carry the trace id.", s(), Buckets::family(STEP_BUCKETS)),
            queue_wait: registered(r, "musetalk_queue_wait", "Time a job waited for a run slot.", s(), Buckets::family(JOB_BUCKETS)),
            jobs_in_flight: registered(r, "musetalk_jobs_in_flight", "Jobs running now.", None, Family::default()),
            jobs_queued: registered(r, "musetalk_jobs_queued", "Jobs waiting for a run slot now.", None, Family::default()),
            jobs_capacity: registered(r, "musetalk_jobs_capacity", "Jobs admitted at most at once (run slots + --queue-size); beyond it requests get 429.", None, Family::default()),
            input_size: registered(r, "musetalk_input_size", "Uploaded input file sizes.", b(), Buckets::family(SIZE_BUCKETS)),
            output_size: registered(r, "musetalk_output_size", "Output video sizes.", b(), Buckets::family(SIZE_BUCKETS)),
            output_input_ratio: registered(r, "musetalk_output_input_size", "Output size divided by total input size.", Some(ratio()), Buckets::family(RATIO_BUCKETS)),
            subprocess_exits: registered(r, "musetalk_subprocess_exits", "Pipeline subprocess exits by exit code (or signal).", None, Family::default()),
            realtime_factor: registered(r, "musetalk_realtime_factor", "Output video seconds per second of processing (1 = real time).", None, Buckets::family(REALTIME_BUCKETS)),
            time_to_first_frame: registered(r, "musetalk_time_to_first_frame", "Request accepted to the first output frame ready; exemplars carry the trace id.", s(), Buckets::family(STEP_BUCKETS)),
            batch_duration: registered(r, "musetalk_batch_duration", "One model batch (UNet + VAE decode) as the worker timed it; exemplars carry the trace id.", s(), Buckets::family(STEP_BUCKETS)),
            time_to_first_byte: registered(r, "musetalk_time_to_first_byte", "Request accepted to the first byte of a streamed answer sent; exemplars carry the trace id.", s(), Buckets::family(STEP_BUCKETS)),
        }
    }
}
