//! Resource series for the status page: the collector's recent samples turned into
//! sparkline points (inline SVG polylines) and current/peak values.
//!
//! Pure functions of the samples and the clock, so they are tested with made-up samples.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::collector::{Sample, SourceName, WINDOW_ONLY};

/// The sparkline's SVG user space (`viewBox="0 0 WIDTH HEIGHT"`).
pub const WIDTH: f64 = 300.0;
pub const HEIGHT: f64 = 48.0;
/// Vertical padding so a flat line at 0 % or 100 % stays visible.
const PAD: f64 = 2.0;
/// The shortest time a sparkline spans.
const MIN_SPAN: Duration = Duration::from_secs(60);
/// Most points drawn per sparkline (one per horizontal unit); more samples are averaged.
const MAX_POINTS: usize = WIDTH as usize;

/// How a series' values read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// 0–100.
    Percent,
    Bytes,
    Celsius,
    Watts,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        // Sums of CPU shares can come out a hair below zero: never print "-0.0 %".
        // (`+ 0.0` turns -0.0 into 0.0: `max` may return either zero.)
        let v = if v.is_finite() { v.max(0.0) + 0.0 } else { 0.0 };
        match self {
            Unit::Percent => format!("{v:.1} %"),
            Unit::Bytes => bytes(v as u64),
            Unit::Celsius => format!("{v:.0} °C"),
            Unit::Watts => format!("{v:.0} W"),
        }
    }
}

/// Bytes in binary units, as the text report writes them.
pub fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", U[i]) }
}

/// One sparkline.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    /// Stable key (`cpu`, `memory`, `pipeline_cpu`, `pipeline_rss`, `gpu0_util`, …): the
    /// page finds its `<svg data-series=…>` by it.
    pub id: String,
    pub label: String,
    pub unit: Unit,
    /// The top of the chart (100 for percentages, the memory size for bytes).
    pub max: f64,
    /// The newest value, if any sample in the window had one.
    pub last: Option<f64>,
    pub last_text: String,
    pub peak: Option<f64>,
    pub peak_text: String,
    /// `points` of the polyline, in the `0 0 WIDTH HEIGHT` user space (x = time).
    pub points: String,
    /// `[unix_ms, value]` pairs as drawn (averaged when there are more samples than points).
    pub values: Vec<(i64, f64)>,
}

/// Health of one collector source.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub name: &'static str,
    pub up: bool,
}

/// What `/ui/api/resources` answers and the resources section draws.
#[derive(Clone, Debug, Serialize)]
pub struct Resources {
    /// The window asked for.
    pub seconds: u64,
    /// The time the sparklines span: the window, or less (at least a minute) while the
    /// ring buffer holds less history, so a freshly started service draws full lines.
    pub span_seconds: u64,
    pub now_ms: i64,
    pub interval_ms: u64,
    /// Samples in the window.
    pub samples: usize,
    pub series: Vec<Series>,
    /// GPUs seen in the window (0: none, or no NVML).
    pub gpus: usize,
    pub sources: Vec<SourceStatus>,
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Builds every series from `samples` (oldest first) over the `window` that ends at `now`.
pub fn build(samples: &[Arc<Sample>], now: SystemTime, window: Duration, interval: Duration, sources: &[(SourceName, bool)]) -> Resources {
    let requested = window;
    let from = now.checked_sub(window).unwrap_or(UNIX_EPOCH);
    let in_window: Vec<&Sample> = samples.iter().map(|s| s.as_ref()).filter(|s| s.wall >= from && s.wall <= now + Duration::from_secs(1)).collect();
    let history = in_window.first().and_then(|s| now.duration_since(s.wall).ok()).unwrap_or_default();
    let span = Duration::from_secs(history.as_secs() + 1).clamp(MIN_SPAN.min(window), window);
    let (window, from) = (span, now.checked_sub(span).unwrap_or(UNIX_EPOCH));
    let mem_total = in_window.iter().rev().find_map(|s| s.memory.as_ref().map(|m| m.total as f64)).unwrap_or(0.0);

    let mut series = vec![
        make("cpu", "Host CPU", Unit::Percent, 100.0, &in_window, from, window, |s| s.cpu.as_ref().map(|c| c.total * 100.0)),
        make("memory", "Host memory used", Unit::Bytes, mem_total, &in_window, from, window, |s| s.memory.as_ref().map(|m| m.used as f64)),
        make("pipeline_cpu", "Pipeline CPU (all jobs and workers)", Unit::Percent, 100.0, &in_window, from, window, |s| {
            s.cpu.as_ref()?;
            Some(s.trees.iter().filter(|t| t.mode != WINDOW_ONLY).map(|t| t.cpu_ratio).sum::<f64>() * 100.0)
        }),
        make("pipeline_rss", "Pipeline memory (RSS)", Unit::Bytes, mem_total, &in_window, from, window, |s| {
            s.memory.as_ref()?;
            Some(s.trees.iter().filter(|t| t.mode != WINDOW_ONLY).map(|t| t.rss_bytes as f64).sum())
        }),
    ];

    // GPUs seen in the window, by index, with their latest name and memory size.
    let mut gpus: Vec<(u32, String, Option<u64>)> = Vec::new();
    for s in &in_window {
        for g in s.gpus.iter().flatten() {
            match gpus.iter_mut().find(|e| e.0 == g.index) {
                Some(e) => {
                    e.1 = g.name.clone();
                    if g.memory_total.is_some() {
                        e.2 = g.memory_total;
                    }
                }
                None => gpus.push((g.index, g.name.clone(), g.memory_total)),
            }
        }
    }
    gpus.sort_by_key(|g| g.0);
    for (index, name, mem_total) in &gpus {
        let i = *index;
        let gpu = move |s: &Sample| s.gpus.as_ref()?.iter().find(|g| g.index == i).cloned();
        let label = |what: &str| if name.is_empty() { format!("GPU {i} {what}") } else { format!("GPU {i} {what} ({name})") };
        series.push(make(&format!("gpu{i}_util"), &label("utilization"), Unit::Percent, 100.0, &in_window, from, window, |s| gpu(s)?.util_general.map(|v| v * 100.0)));
        let mem_max = mem_total.map(|m| m as f64).unwrap_or(0.0);
        series.push(make(&format!("gpu{i}_memory"), &label("memory used"), Unit::Bytes, mem_max, &in_window, from, window, |s| gpu(s)?.memory_used.map(|v| v as f64)));
        series.push(make(&format!("gpu{i}_temperature"), &label("temperature"), Unit::Celsius, 100.0, &in_window, from, window, |s| gpu(s)?.temperature_celsius));
    }

    Resources {
        seconds: requested.as_secs(),
        span_seconds: span.as_secs(),
        now_ms: unix_ms(now),
        interval_ms: interval.as_millis() as u64,
        samples: in_window.len(),
        series,
        gpus: gpus.len(),
        sources: sources.iter().map(|(n, up)| SourceStatus { name: n.as_str(), up: *up }).collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn make(id: &str, label: &str, unit: Unit, max: f64, samples: &[&Sample], from: SystemTime, window: Duration, value: impl Fn(&Sample) -> Option<f64>) -> Series {
    let raw: Vec<(i64, f64)> = samples.iter().filter_map(|s| value(s).filter(|v| v.is_finite()).map(|v| (unix_ms(s.wall), v))).collect();
    let last = raw.last().map(|p| p.1);
    let peak = raw.iter().map(|p| p.1).reduce(f64::max);
    // A scale that always holds the data (a temperature over 100 °C, memory total unknown).
    let max = if max > 0.0 { max.max(peak.unwrap_or(0.0)) } else { peak.unwrap_or(0.0).max(1.0) };
    let values = downsample(&raw, MAX_POINTS);
    let points = polyline(&values, unix_ms(from), window.as_millis().max(1) as f64, max);
    Series {
        id: id.to_string(),
        label: label.to_string(),
        unit,
        max,
        last,
        last_text: last.map(|v| unit.format(v)).unwrap_or_else(|| "no data".into()),
        peak,
        peak_text: peak.map(|v| unit.format(v)).unwrap_or_else(|| "no data".into()),
        points,
        values,
    }
}

/// At most `n` points: consecutive samples averaged in equal groups (time and value).
pub fn downsample(raw: &[(i64, f64)], n: usize) -> Vec<(i64, f64)> {
    if raw.len() <= n || n == 0 {
        return raw.to_vec();
    }
    let group = raw.len().div_ceil(n);
    raw.chunks(group)
        .map(|c| {
            let k = c.len() as f64;
            let t = c.iter().map(|p| p.0 as f64).sum::<f64>() / k;
            (t.round() as i64, c.iter().map(|p| p.1).sum::<f64>() / k)
        })
        .collect()
}

/// The polyline `points` for `values` over `[from_ms, from_ms + span_ms]`, 0…`max` upward.
pub fn polyline(values: &[(i64, f64)], from_ms: i64, span_ms: f64, max: f64) -> String {
    let mut s = String::with_capacity(values.len() * 10);
    for (t, v) in values {
        let x = (((*t - from_ms) as f64) / span_ms * WIDTH).clamp(0.0, WIDTH);
        let ratio = if max > 0.0 { (v / max).clamp(0.0, 1.0) } else { 0.0 };
        let y = HEIGHT - PAD - ratio * (HEIGHT - 2.0 * PAD);
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!("{x:.1},{y:.1}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{CpuSample, GpuSample, MemorySample, TreeSample};
    use std::time::Instant;

    fn sample(wall: SystemTime, cpu: f64, gpu: Option<f64>) -> Arc<Sample> {
        let mut s = Sample::new(Instant::now());
        s.wall = wall;
        s.cpu = Some(CpuSample { per_cpu: vec![cpu; 2], total: cpu, ..Default::default() });
        s.memory = Some(MemorySample { total: 1000, used: 250, ..Default::default() });
        s.trees = vec![
            TreeSample { key: 1, mode: "simple", cpu_ratio: 0.25, rss_bytes: 100, ..Default::default() },
            TreeSample { key: 2, mode: WINDOW_ONLY, cpu_ratio: 0.5, rss_bytes: 900, ..Default::default() },
        ];
        if let Some(u) = gpu {
            s.gpus = Some(vec![GpuSample {
                index: 0,
                name: "Test GPU".into(),
                util_general: Some(u),
                memory_used: Some(4 << 30),
                memory_total: Some(16 << 30),
                temperature_celsius: Some(61.0),
                ..Default::default()
            }]);
        }
        Arc::new(s)
    }

    #[test]
    fn series_without_gpu() {
        let now = SystemTime::now();
        let samples: Vec<_> = (0..10).map(|i| sample(now - Duration::from_secs(10 - i), i as f64 / 10.0, None)).collect();
        // An old sample outside the window is left out.
        let mut all = vec![sample(now - Duration::from_secs(400), 1.0, None)];
        all.extend(samples);
        let r = build(&all, now, Duration::from_secs(300), Duration::from_millis(500), &[(SourceName::Gpu, false)]);
        assert_eq!(r.samples, 10);
        assert_eq!(r.gpus, 0);
        let ids: Vec<_> = r.series.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["cpu", "memory", "pipeline_cpu", "pipeline_rss"]);
        let cpu = &r.series[0];
        assert_eq!(cpu.last_text, "90.0 %");
        assert_eq!(cpu.peak, Some(90.0));
        assert_eq!(cpu.points.split(' ').count(), 10);
        // 10 s of history: the lines span the shortest span, a minute. The newest sample
        // is 1 s before now: 5 units from the right edge; 90 % high.
        assert_eq!((r.seconds, r.span_seconds), (300, 60));
        let (x, y) = cpu.points.rsplit(' ').next().unwrap().split_once(',').unwrap();
        assert!((x.parse::<f64>().unwrap() - 295.0).abs() < 0.2, "{x}");
        assert!((y.parse::<f64>().unwrap() - (HEIGHT - PAD - 0.9 * (HEIGHT - 2.0 * PAD))).abs() < 0.1, "{y}");
        // Window-only trees (a shared worker registered again for a job) are not counted twice.
        assert_eq!(r.series[2].last, Some(25.0));
        assert_eq!(r.series[3].last_text, "100 B");
        assert_eq!(r.series[1].max, 1000.0);
        assert_eq!(r.sources[0].name, "gpu");
    }

    #[test]
    fn gpu_series_when_present() {
        let now = SystemTime::now();
        let samples: Vec<_> = (0..5).map(|i| sample(now - Duration::from_secs(5 - i), 0.5, Some(0.2 * i as f64))).collect();
        let r = build(&samples, now, Duration::from_secs(60), Duration::from_millis(500), &[]);
        assert_eq!(r.gpus, 1);
        let ids: Vec<_> = r.series.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["cpu", "memory", "pipeline_cpu", "pipeline_rss", "gpu0_util", "gpu0_memory", "gpu0_temperature"]);
        assert_eq!(r.series[4].last_text, "80.0 %");
        assert_eq!(r.series[4].label, "GPU 0 utilization (Test GPU)");
        assert_eq!(r.series[5].last_text, "4.0 GiB");
        assert_eq!(r.series[5].max, (16u64 << 30) as f64);
        assert_eq!(r.series[6].last_text, "61 °C");
    }

    #[test]
    fn empty_window_and_downsampling() {
        let r = build(&[], SystemTime::now(), Duration::from_secs(300), Duration::from_millis(500), &[]);
        assert!(r.series.iter().all(|s| s.points.is_empty() && s.last.is_none() && s.last_text == "no data"));
        let raw: Vec<(i64, f64)> = (0..1000).map(|i| (i, i as f64)).collect();
        let d = downsample(&raw, 300);
        assert!(d.len() <= 300 && d.len() >= 250, "{}", d.len());
        assert_eq!(d[0], (2, 1.5)); // groups of 4: the mean of 0..=3 (t 1.5 rounds to 2)
        assert_eq!(downsample(&raw[..3], 300).len(), 3);
        assert_eq!(polyline(&[(0, 0.0), (1000, 200.0)], 0, 1000.0, 100.0), format!("0.0,{:.1} 300.0,{:.1}", HEIGHT - PAD, PAD));
    }
}
