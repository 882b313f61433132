//! Benchmarks of the two hot paths DESIGN.md §9 budgets: one collector sample and a `/metrics` render.
//!
//! `cargo bench --bench collector`. Figures go to BENCHMARKS.md.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use musetalk_sidecar::collector::{Collector, Sampler, cpu::CpuSource, memory::MemorySource, process::ProcessSource};
use musetalk_sidecar::jobs::metrics::{JobLabels, StageLabels, StepLabels};
use musetalk_sidecar::metrics::Metrics;

/// A process tree of 4: sh → 3 sleeping children, like a pipeline with helpers.
fn spawn_tree() -> std::process::Child {
    Command::new("sh").arg("-c").arg("sleep 600 & sleep 600 & sleep 600 & wait").stdin(Stdio::null()).spawn().expect("sh")
}

fn sample(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new());
    let mut sampler = Sampler::new(
        vec![Box::new(CpuSource::new()), Box::new(MemorySource::new()), Box::new(ProcessSource::new())],
        metrics,
        4096,
        Duration::from_millis(500),
    );
    let mut tree = spawn_tree();
    std::thread::sleep(Duration::from_millis(200));
    let _guard = sampler.handle().register_tree(tree.id(), "simple");
    c.bench_function("collector_sample_cpu_mem_process_tree4", |b| b.iter(|| sampler.sample_once()));
    // The default sources as the service runs them (GPU: "no data" here without NVML).
    let mut full = Sampler::new(Collector::default_sources(), Arc::new(Metrics::new()), 4096, Duration::from_millis(500));
    c.bench_function("collector_sample_default_sources", |b| b.iter(|| full.sample_once()));
    let _ = Command::new("pkill").arg("-P").arg(tree.id().to_string()).status();
    let _ = tree.kill();
    let _ = tree.wait();
}

/// ~500 series: 9 CPUs × 7 modes, the job/step/stage histograms for both modes, HTTP routes.
fn populated_metrics() -> Metrics {
    let m = Metrics::new();
    let mut s = Sampler::new(vec![Box::new(CpuSource::new()), Box::new(MemorySource::new()), Box::new(ProcessSource::new())], Arc::new(Metrics::new()), 4, Duration::from_millis(500));
    let sample = s.sample_once();
    musetalk_sidecar::collector::publish(&m, &sample);
    m.cpu.publish(Some(&musetalk_sidecar::collector::CpuSample { per_cpu: vec![0.5; 9], total: 0.5, modes: vec![[0.3, 0.0, 0.2, 0.4, 0.05, 0.03, 0.02]; 9] }));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    for mode in ["simple", "realtime"] {
        for outcome in ["succeeded", "failed"] {
            let l = JobLabels { mode, backend: "musetalk", outcome };
            m.job.jobs.get_or_create(&l).inc();
            Metrics::observe_traced(&m.job.job_duration, &l, 12.0, trace);
        }
        for step in ["file_processing", "queue_wait", "config_creation", "subprocess_execution", "output_discovery", "response_preparation"] {
            Metrics::observe_traced(&m.job.step_duration, &StepLabels { mode, step }, 1.0, trace);
        }
        for stage in ["model_loading", "face_detection", "unet_inference", "blending"] {
            Metrics::observe_traced(&m.job.stage_duration, &StageLabels { mode, stage: stage.into() }, 2.0, trace);
        }
    }
    m
}

fn render(c: &mut Criterion) {
    let m = populated_metrics();
    let (_, text) = m.render(false);
    let series = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    eprintln!("rendering {series} series ({} bytes)", text.len());
    c.bench_function("metrics_render_text_0_0_4", |b| b.iter(|| m.render(false)));
    c.bench_function("metrics_render_openmetrics", |b| b.iter(|| m.render(true)));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(50);
    targets = sample, render
}
criterion_main!(benches);
