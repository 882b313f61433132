//! Benchmarks of the two hot paths DESIGN.md §9 budgets: one collector sample and a `/metrics` render.
//!
//! `cargo bench --bench collector`. Figures go to BENCHMARKS.md.
//!
//! `gpu_sample` (DESIGN.md §9: one GPU sample, every NVML field, with registered trees,
//! ≤ 2 ms CPU) runs when `MUSETALK_BENCH_NVML` names the library: `system` (the driver's,
//! on a GPU machine: scripts/gpu-check.sh) or a path (the fake NVML of the tests:
//! bench/gpu_sample.sh builds and scripts it). Without it the benchmark says why and skips.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use musetalk_sidecar::collector::gpu::GpuSource;
use musetalk_sidecar::collector::nvml::NvmlDevices;
use musetalk_sidecar::collector::{Collector, Sampler, cpu::CpuSource, memory::MemorySource, process::ProcessSource};
use musetalk_sidecar::jobs::metrics::{JobDurationLabels, JobLabels, LatencyLabels, StageLabels, StepLabels};
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
        let config = LatencyLabels { mode, version: "v15".into(), fp16: "true", batch_size: "5-8", worker: if mode == "realtime" { "gpu0".into() } else { "none".into() } };
        for outcome in ["succeeded", "failed"] {
            let l = JobLabels { mode, backend: "musetalk", outcome };
            m.job.jobs.get_or_create(&l).inc();
            Metrics::observe_traced(&m.job.job_duration, &JobDurationLabels::new("musetalk", outcome, &config), 12.0, trace);
        }
        for step in ["file_processing", "queue_wait", "config_creation", "subprocess_execution", "output_discovery", "response_preparation"] {
            Metrics::observe_traced(&m.job.step_duration, &StepLabels { mode, step }, 1.0, trace);
        }
        for stage in ["model_loading", "face_detection", "unet_inference", "blending"] {
            Metrics::observe_traced(&m.job.stage_duration, &StageLabels::new(stage.into(), &config), 2.0, trace);
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

/// This thread's CPU time (user + system): the budget is CPU, not wall time.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU per call of `f`, over `n` calls.
fn cpu_per_call(n: u32, mut f: impl FnMut()) -> Duration {
    let start = thread_cpu();
    for _ in 0..n {
        f();
    }
    (thread_cpu() - start) / n
}

/// GPUtil's one query per sample (GPUtil/GPUtil.py): a process start each time. Wall and
/// CPU (the child's, from getrusage) per call; `nvidia-smi` where there is one, else
/// `true`, the cost of any process start (a lower bound for nvidia-smi).
fn spawn_cost(n: u32) -> (String, Duration, Duration) {
    let smi = Command::new("nvidia-smi").arg("-L").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    let (prog, args): (&str, Vec<&str>) = if smi {
        ("nvidia-smi", vec!["--query-gpu=index,uuid,utilization.gpu,memory.total,memory.used,memory.free,driver_version,name,gpu_serial,display_active,display_mode,temperature.gpu", "--format=csv,noheader,nounits"])
    } else {
        ("true", vec![])
    };
    let children = || {
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct it is given.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
        Duration::new((r.ru_utime.tv_sec + r.ru_stime.tv_sec) as u64, ((r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1000) as u32 % 2_000_000_000)
    };
    let (c0, w0) = (children(), std::time::Instant::now());
    for _ in 0..n {
        Command::new(prog).args(&args).stdout(Stdio::null()).status().expect("spawn");
    }
    let label = if smi { "nvidia-smi --query-gpu (GPUtil's query)".to_string() } else { "a process start (`true`; no nvidia-smi here: a lower bound)".to_string() };
    (label, w0.elapsed() / n, children().saturating_sub(c0) / n)
}

fn gpu_sample(c: &mut Criterion) {
    let lib = match std::env::var("MUSETALK_BENCH_NVML") {
        Ok(v) => v,
        Err(_) => {
            eprintln!("gpu_sample: skipped (set MUSETALK_BENCH_NVML=system on a GPU machine, or run bench/gpu_sample.sh for the fake NVML)");
            return;
        }
    };
    let open = || if lib == "system" { NvmlDevices::open(None) } else { NvmlDevices::open(Some(std::ffi::OsStr::new(&lib))) };
    let devices = match open() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_sample: skipped: {e}");
            return;
        }
    };
    let mut tree = spawn_tree();
    std::thread::sleep(Duration::from_millis(200));
    // With the fake, the script may list the tree's processes (bench/gpu_sample.sh reads
    // this file to put them on the GPU).
    if let Ok(path) = std::env::var("MUSETALK_BENCH_TREE_PIDS") {
        std::fs::write(path, tree.id().to_string()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let with_gpu = |d: NvmlDevices| {
        let s = Sampler::new(vec![Box::new(ProcessSource::new()), Box::new(GpuSource::new(Ok(Box::new(d))))], Arc::new(Metrics::new()), 4096, Duration::from_millis(500));
        let g = s.handle().register_tree(tree.id(), "simple");
        (s, g)
    };
    let (mut gpu, _g1) = with_gpu(devices);
    let mut process_only = Sampler::new(vec![Box::new(ProcessSource::new())], Arc::new(Metrics::new()), 4096, Duration::from_millis(500));
    let _g2 = process_only.handle().register_tree(tree.id(), "simple");
    let first = gpu.sample_once();
    let gpus = first.gpus.as_ref().map_or(0, Vec::len);
    let fields = first.gpus.as_ref().and_then(|g| g.first()).map(|g| format!("{g:?}")).unwrap_or_default();
    eprintln!("gpu_sample: {gpus} GPU(s) through {lib}; first GPU: {fields}");
    let n = 2000;
    let both = cpu_per_call(n, || {
        gpu.sample_once();
    });
    let process = cpu_per_call(n, || {
        process_only.sample_once();
    });
    eprintln!(
        "gpu_sample CPU per sample: process tree + GPU {:.1} µs, process tree alone {:.1} µs, GPU share {:.1} µs ({gpus} GPU(s), {n} samples)",
        both.as_secs_f64() * 1e6,
        process.as_secs_f64() * 1e6,
        (both.as_secs_f64() - process.as_secs_f64()) * 1e6
    );
    let (label, wall, cpu) = spawn_cost(20);
    eprintln!("gpu_sample baseline: {label}: {:.2} ms wall, {:.2} ms CPU per query", wall.as_secs_f64() * 1e3, cpu.as_secs_f64() * 1e3);
    c.bench_function("gpu_sample_process_tree_and_gpu", |b| b.iter(|| gpu.sample_once()));
    c.bench_function("gpu_sample_process_tree_alone", |b| b.iter(|| process_only.sample_once()));
    let _ = Command::new("pkill").arg("-P").arg(tree.id().to_string()).status();
    let _ = tree.kill();
    let _ = tree.wait();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(50);
    targets = sample, render, gpu_sample
}
criterion_main!(benches);
