//! The per-job report: what the old Python monitor printed, per job, as JSON or text.

use serde::Serialize;

use crate::collector::insight::StageGpu;
use crate::collector::{AvgPeak, Window};

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Timing {
    pub name: String,
    pub seconds: f64,
    /// Share of the job's total time (steps) or of the execution step (stages), 0–100.
    pub percent: f64,
    /// Stages only, on a host with a GPU: the GPU figures of the stage's own window and
    /// its verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<StageGpu>,
}

/// The GPU energy a job used (the GPUs its pipeline ran on).
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct GpuEnergy {
    pub joules: f64,
    /// Joules per second of output video: what one second of lip-sync costs.
    pub per_output_second: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Subprocess {
    pub pid: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub seconds: f64,
    pub percent: f64,
    pub command: String,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Files {
    pub video_bytes: u64,
    pub audio_bytes: u64,
    pub output_bytes: Option<u64>,
    /// Output size / (video + audio size).
    pub output_input_ratio: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Media {
    pub video_seconds: f64,
    pub audio_seconds: f64,
    pub output_seconds: Option<f64>,
    /// Frames of the output video (its header's count, or its packets counted).
    pub output_frames: Option<u64>,
    pub input_frames: Option<u64>,
    /// Output seconds per second of processing (1 = real time).
    pub realtime_factor: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Bottleneck {
    pub step: String,
    pub percent: f64,
    /// The slowest stage inside the execution step, when stages were reported.
    pub stage: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorInfo {
    pub step: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Report {
    pub job_id: String,
    pub trace_id: String,
    pub trace_url: Option<String>,
    pub mode: String,
    pub backend: String,
    pub outcome: String,
    pub error: Option<ErrorInfo>,
    pub created_at: String,
    pub total_seconds: f64,
    pub queue_seconds: f64,
    pub steps: Vec<Timing>,
    pub stages: Vec<Timing>,
    pub bottleneck: Option<Bottleneck>,
    /// The realtime worker that served the job.
    pub worker: Option<String>,
    pub subprocess: Option<Subprocess>,
    pub files: Files,
    pub media: Media,
    pub resources: Window,
    /// Absent without GPU data.
    pub gpu_energy: Option<GpuEnergy>,
    /// Latency (time to first frame, per-batch, time to first byte of a streamed answer)
    /// and the configuration labels its metrics carry.
    pub latency: Latency,
    /// The job's Python profile (py-spy), when it was profiled; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::profile::ProfileReport>,
}

/// What realtime users judge a job by, and the labels that tell configurations apart.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Latency {
    /// Request accepted → the first output frame ready (the engine's own report of it).
    pub time_to_first_frame_seconds: Option<f64>,
    /// Request accepted → the first byte of a streamed answer sent (`stream=true`).
    pub time_to_first_byte_seconds: Option<f64>,
    /// The model's batches (UNet + VAE decode) as the worker timed them.
    pub batches: Option<BatchLatency>,
    /// `v15`, `v1`, or the backend's name when it is not MuseTalk.
    pub version: String,
    pub fp16: bool,
    /// `1-4`, `5-8`, `9-16`, `17-32`, `33+` or `default`.
    pub batch_size: String,
    /// The realtime worker, or `none`.
    pub worker: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct BatchLatency {
    pub count: u64,
    pub first_seconds: f64,
    pub mean_seconds: f64,
    pub max_seconds: f64,
}

impl Latency {
    pub fn from_live(l: &super::Live, created: std::time::SystemTime, labels: super::metrics::LatencyLabels) -> Self {
        let batches = (!l.batches.is_empty()).then(|| BatchLatency {
            count: l.batches.len() as u64,
            first_seconds: l.batches[0],
            mean_seconds: l.batches.iter().sum::<f64>() / l.batches.len() as f64,
            max_seconds: l.batches.iter().cloned().fold(0.0, f64::max),
        });
        Latency {
            time_to_first_frame_seconds: l.first_frame.and_then(|t| t.duration_since(created).ok()).map(|d| d.as_secs_f64()),
            time_to_first_byte_seconds: l.first_byte_seconds,
            batches,
            version: labels.version,
            fp16: labels.fp16 == "true",
            batch_size: labels.batch_size.to_string(),
            worker: labels.worker,
        }
    }

    /// The metric labels of this job's latency figures, from the report's words (the
    /// runner passes the labels it made them from; this checks they round-trip).
    #[cfg(test)]
    pub fn labels(&self, mode: &'static str) -> super::metrics::LatencyLabels {
        let bucket = super::metrics::BATCH_BUCKETS.into_iter().find(|b| *b == self.batch_size).unwrap_or("default");
        super::metrics::LatencyLabels { mode, version: self.version.clone(), fp16: if self.fp16 { "true" } else { "false" }, batch_size: bucket, worker: self.worker.clone() }
    }
}

/// Fills `percent` from seconds against `total`.
pub fn timings(items: &[(String, f64)], total: f64) -> Vec<Timing> {
    items.iter().map(|(name, s)| Timing { name: name.clone(), seconds: *s, percent: if total > 0.0 { s / total * 100.0 } else { 0.0 }, gpu: None }).collect()
}

/// The step with the largest share, and the slowest stage.
pub fn bottleneck(steps: &[Timing], stages: &[Timing]) -> Option<Bottleneck> {
    let top = steps.iter().max_by(|a, b| a.seconds.total_cmp(&b.seconds))?;
    let stage = stages.iter().max_by(|a, b| a.seconds.total_cmp(&b.seconds)).map(|s| s.name.clone());
    Some(Bottleneck { step: top.name.clone(), percent: top.percent, stage })
}

fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", U[i]) }
}

fn joules(j: f64) -> String {
    if j >= 10_000.0 { format!("{:.1} kJ", j / 1000.0) } else { format!("{j:.1} J") }
}

fn bar(percent: f64, width: usize) -> String {
    let filled = ((percent / 100.0) * width as f64).round().clamp(0.0, width as f64) as usize;
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

fn avg_peak(label: &str, v: &Option<AvgPeak>, fmt: impl Fn(f64) -> String) -> String {
    match v {
        Some(v) => format!("  {label:<26} avg {:>10}   peak {:>10}\n", fmt(v.avg), fmt(v.peak)),
        None => format!("  {label:<26} not sampled\n"),
    }
}

/// The profile's part of the text report: where to get it, then per stage "… of which
/// 48 % in `conv2d`": the stage's share first, then the functions holding its Python time.
fn profile_text(p: &crate::profile::ProfileReport, stages: &[Timing]) -> String {
    let mut s = String::new();
    let (Some(url), None) = (&p.url, &p.unavailable) else {
        s.push_str(&format!("\nProfile: none — {}\n", p.unavailable.as_deref().unwrap_or("not taken")));
        return s;
    };
    s.push_str(&format!("\nProfile (py-spy, {} Hz, {} samples): {url}  (?format=svg, ?format=collapsed)\n", p.rate_hz, p.samples));
    let list = |fs: &[crate::profile::trace::FunctionShare]| fs.iter().take(3).map(|f| format!("{:.0}% {} ({})", f.percent, f.function, f.file)).collect::<Vec<_>>().join(", ");
    for st in &p.stages {
        if st.profile.top_self.is_empty() {
            continue;
        }
        let share = stages.iter().find(|t| t.name == st.stage).map(|t| format!("{:.0}%", t.percent)).unwrap_or_default();
        s.push_str(&format!("  {:<26} {:>4} of which {}\n", st.stage, share, list(&st.profile.top_self)));
        s.push_str(&format!("  {:<26} {:>4} in total {}\n", "", "", list(&st.profile.top_total)));
    }
    s
}

impl Report {
    /// The console report: the layout is stable (golden-tested).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("MuseTalk job {} — {} ({} backend, {} mode)\n", self.job_id, self.outcome.to_uppercase(), self.backend, self.mode));
        if let Some(e) = &self.error {
            s.push_str(&format!("Error in {}: {}\n", e.step, e.message));
        }
        s.push_str(&format!("Trace: {}", self.trace_id));
        if let Some(u) = &self.trace_url {
            s.push_str(&format!("  {u}"));
        }
        s.push_str(&format!("\nStarted: {}\nTotal: {:.3} s (queue {:.3} s)\n\nSteps\n", self.created_at, self.total_seconds, self.queue_seconds));
        for t in &self.steps {
            s.push_str(&format!("  {:<26} {:>9.3} s {:>6.1}%  {}\n", t.name, t.seconds, t.percent, bar(t.percent, 20)));
        }
        if !self.stages.is_empty() {
            s.push_str("\nStages (share of execution)\n");
            for t in &self.stages {
                s.push_str(&format!("  {:<26} {:>9.3} s {:>6.1}%  {}", t.name, t.seconds, t.percent, bar(t.percent, 20)));
                if let Some(g) = &t.gpu {
                    s.push_str(&format!("  {}", g.verdict.as_str()));
                }
                s.push('\n');
            }
            if self.stages.iter().any(|t| t.gpu.is_some()) {
                // The header uses the rows' own widths, so the columns line up.
                s.push_str(&format!("\nGPU per stage{:<16}{:>5} / {:<4} {:>6}  {:>6}  {:>9} / {:<9} {:>6}  {:>8}  {}\n", "", "SM avg", "peak", "mem bw", "tensor", "PCIe rx", "tx", "power", "energy", "throttle"));
                for t in &self.stages {
                    let Some(g) = &t.gpu else { continue };
                    let pct = |v: Option<f64>| v.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_else(|| "-".into());
                    let b = |v: Option<f64>| v.map(|v| bytes(v as u64)).unwrap_or_else(|| "-".into());
                    s.push_str(&format!(
                        "  {:<26} {:>5} / {:<4} {:>6}  {:>6}  {:>9} / {:<9} {:>6}  {:>8}  {}\n",
                        t.name,
                        pct(Some(g.sm.avg)),
                        pct(Some(g.sm.peak)),
                        pct(g.memory_bandwidth.map(|m| m.avg)),
                        pct(g.tensor_active.map(|m| m.avg)),
                        b(g.pcie_rx_bytes),
                        b(g.pcie_tx_bytes),
                        g.power_watts.map(|p| format!("{p:.0} W")).unwrap_or_else(|| "-".into()),
                        g.energy_joules.map(joules).unwrap_or_else(|| "-".into()),
                        if g.throttle_reasons.is_empty() { "none".to_string() } else { g.throttle_reasons.join(",") },
                    ));
                }
            }
        }
        let l = &self.latency;
        if l.time_to_first_frame_seconds.is_some() || l.time_to_first_byte_seconds.is_some() || l.batches.is_some() {
            let mut parts = Vec::new();
            if let Some(t) = l.time_to_first_frame_seconds {
                parts.push(format!("first frame {t:.3} s"));
            }
            if let Some(t) = l.time_to_first_byte_seconds {
                parts.push(format!("first byte {t:.3} s"));
            }
            if let Some(b) = &l.batches {
                parts.push(format!("{} batches: first {:.3} s, mean {:.3} s, max {:.3} s", b.count, b.first_seconds, b.mean_seconds, b.max_seconds));
            }
            s.push_str(&format!("\nLatency: {}  ({} {}, fp16 {}, batch {}, worker {})\n", parts.join(", "), self.backend, l.version, l.fp16, l.batch_size, l.worker));
        }
        if let Some(p) = &self.profile {
            s.push_str(&profile_text(p, &self.stages));
        }
        if let Some(b) = &self.bottleneck {
            s.push_str(&format!("\nBottleneck: {} ({:.1}% of total)", b.step, b.percent));
            if let Some(st) = &b.stage {
                s.push_str(&format!(", slowest stage {st}"));
            }
            s.push('\n');
        }
        if let Some(w) = &self.worker {
            s.push_str(&format!("\nWorker: {w}\n"));
        }
        if let Some(p) = &self.subprocess {
            let status = match (p.exit_code, p.signal) {
                (Some(c), _) => format!("return code {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "no status".into(),
            };
            s.push_str(&format!("\nSubprocess\n  pid {}, {status}, {:.3} s ({:.1}% of total)\n  {}\n", p.pid, p.seconds, p.percent, p.command));
        }
        s.push_str("\nFiles\n");
        s.push_str(&format!("  {:<26} {}\n  {:<26} {}\n", "input video", bytes(self.files.video_bytes), "input audio", bytes(self.files.audio_bytes)));
        match (self.files.output_bytes, self.files.output_input_ratio) {
            (Some(o), Some(r)) => s.push_str(&format!("  {:<26} {} (output/input {:.2})\n", "output video", bytes(o), r)),
            _ => s.push_str(&format!("  {:<26} none\n", "output video")),
        }
        s.push_str(&format!("\nMedia\n  audio {:.2} s, video {:.2} s", self.media.audio_seconds, self.media.video_seconds));
        if let Some(o) = self.media.output_seconds {
            s.push_str(&format!(", output {o:.2} s"));
        }
        if let Some(r) = self.media.realtime_factor {
            s.push_str(&format!(", realtime factor {r:.2}"));
        }
        s.push_str("\n\nResources");
        let r = &self.resources;
        s.push_str(&format!(" ({} samples{})\n", r.samples, r.cpu_count.map(|c| format!(", {c} CPUs")).unwrap_or_default()));
        s.push_str(&avg_peak("host CPU", &r.cpu, |v| format!("{:.1}%", v * 100.0)));
        s.push_str(&avg_peak("host memory used", &r.memory_used, |v| bytes(v as u64)));
        if let Some(t) = &r.tree {
            s.push_str(&avg_peak("pipeline CPU", &Some(t.cpu), |v| format!("{:.1}%", v * 100.0)));
            s.push_str(&avg_peak("pipeline RSS", &Some(t.rss), |v| bytes(v as u64)));
            if t.gpu_memory.is_some() {
                s.push_str(&avg_peak("pipeline GPU memory", &t.gpu_memory, |v| bytes(v as u64)));
            }
        }
        if r.gpus.is_empty() {
            s.push_str("  GPU                        no data (no NVIDIA GPU/NVML on this host)\n");
        }
        for g in &r.gpus {
            s.push_str(&avg_peak(&format!("GPU {} utilization", g.index), &g.utilization, |v| format!("{:.1}%", v * 100.0)));
            s.push_str(&avg_peak(&format!("GPU {} memory", g.index), &g.memory_used_bytes, |v| bytes(v as u64)));
        }
        if let Some(e) = &self.gpu_energy {
            s.push_str(&format!("  {:<26} {}", "GPU energy", joules(e.joules)));
            if let Some(p) = e.per_output_second {
                s.push_str(&format!(" ({} per output second)", joules(p)));
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_and_bottleneck() {
        let steps = timings(&[("a".into(), 1.0), ("b".into(), 3.0)], 4.0);
        assert_eq!(steps[1].percent, 75.0);
        let stages = timings(&[("x".into(), 0.5), ("y".into(), 2.5)], 3.0);
        let b = bottleneck(&steps, &stages).unwrap();
        assert_eq!((b.step.as_str(), b.percent, b.stage.as_deref()), ("b", 75.0, Some("y")));
        assert!(bottleneck(&[], &[]).is_none());
        assert_eq!(timings(&[("a".into(), 1.0)], 0.0)[0].percent, 0.0);
    }

    #[test]
    fn latency_from_what_the_job_saw() {
        use super::super::metrics::{LatencyLabels, batch_bucket};
        let created = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100);
        let live = super::super::Live { first_frame: Some(created + std::time::Duration::from_millis(750)), batches: vec![0.4, 0.1, 0.1], first_byte_seconds: Some(0.8), ..Default::default() };
        let labels = LatencyLabels { mode: "realtime", version: "v15".into(), fp16: "true", batch_size: batch_bucket(Some(8)), worker: "gpu0".into() };
        let l = Latency::from_live(&live, created, labels.clone());
        assert_eq!(l.time_to_first_frame_seconds, Some(0.75));
        assert_eq!(l.time_to_first_byte_seconds, Some(0.8));
        let b = l.batches.as_ref().unwrap();
        assert_eq!((b.count, b.first_seconds, b.max_seconds), (3, 0.4, 0.4));
        assert!((b.mean_seconds - 0.2).abs() < 1e-9);
        // The report's fields give back the metric labels.
        assert_eq!(l.labels("realtime"), labels);
        // Nothing seen: nothing claimed.
        let none = Latency::from_live(&Default::default(), created, labels);
        assert_eq!((none.time_to_first_frame_seconds, none.batches), (None, None));
        assert_eq!([None, Some(1), Some(4), Some(5), Some(16), Some(17), Some(33), Some(256)].map(batch_bucket), ["default", "1-4", "1-4", "5-8", "9-16", "17-32", "33+", "33+"]);
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
