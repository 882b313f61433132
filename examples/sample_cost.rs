//! CPU time per collector sample, measured with getrusage, for the side-by-side
//! comparison with `bench/psutil_baseline.py` (same tree: sh → 3 sleeping children).
//!
//! `cargo run --release --example sample_cost -- [samples]`

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use musetalk_sidecar::collector::{Sampler, Source, cpu::CpuSource, memory::MemorySource, process::ProcessSource};
use musetalk_sidecar::metrics::Metrics;

fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn measure(name: &str, sources: Vec<Box<dyn Source>>, root: u32, n: usize) {
    let mut s = Sampler::new(sources, Arc::new(Metrics::new()), 4096, Duration::from_millis(500));
    let _g = s.handle().register_tree(root, "simple");
    s.sample_once();
    let (c0, t0) = (cpu_seconds(), Instant::now());
    for _ in 0..n {
        s.sample_once();
    }
    let (cpu, wall) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
    println!("{name:<28} samples={n} cpu_us_per_sample={:.1} wall_us_per_sample={:.1}", cpu / n as f64 * 1e6, wall / n as f64 * 1e6);
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let mut tree = Command::new("sh").arg("-c").arg("sleep 600 & sleep 600 & sleep 600 & wait").stdin(Stdio::null()).spawn().expect("sh");
    std::thread::sleep(Duration::from_millis(200));
    let root = tree.id();
    measure("cpu+memory+process(tree of 4)", vec![Box::new(CpuSource::new()), Box::new(MemorySource::new()), Box::new(ProcessSource::new())], root, n);
    measure("cpu", vec![Box::new(CpuSource::new())], root, n);
    measure("memory", vec![Box::new(MemorySource::new())], root, n);
    measure("process(tree of 4)", vec![Box::new(ProcessSource::new())], root, n);
    let _ = Command::new("pkill").arg("-P").arg(root.to_string()).status();
    let _ = tree.kill();
    let _ = tree.wait();
}
