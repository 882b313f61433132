//! Process source: the sidecar's own `process_*` figures and the registered pipeline process trees.
//!
//! A tree is followed from its root through `/proc/PID/task/TID/children` (no scan of
//! every process on the machine). Its CPU is the delta of
//! Σ(utime + stime + cutime + cstime) over the live members: when a member exits and
//! is reaped, its time moves into its parent's `cutime`, so the sum stays continuous
//! and short-lived children (ffmpeg runs) are still counted.
//!
//! The `/proc/PID/stat` (and single-threaded members' `children`) descriptors are kept
//! open across samples and re-read (see `procfile`): a sample costs reads, not path walks.

use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use procfs::process::{LimitValue, Process};

use procfs::{CurrentSI, KernelStats};

use super::procfile::ProcFile;
use super::{Sample, Source, SourceError, SourceName, TreeRegistration, TreeSample};
use crate::metrics::SelfProcess;

use crate::metrics::{FGauge, ModeLabels};
use crate::mode::Mode;

/// The pipeline's process trees, summed per mode (`musetalk_pipeline_*`), registered and
/// published here.
#[derive(Debug, Default)]
pub struct PipelineFamilies {
    cpu: Family<ModeLabels, FGauge>,
    rss: Family<ModeLabels, FGauge>,
    gpu_memory: Family<ModeLabels, FGauge>,
    gpu_util: Family<ModeLabels, FGauge>,
}

impl PipelineFamilies {
    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit("musetalk_pipeline_cpu_utilization", "CPU share (of all logical CPUs) used by the pipeline's process trees.", Unit::Other("ratio".into()), self.cpu.clone());
        r.register_with_unit("musetalk_pipeline_memory_rss", "Resident memory of the pipeline's process trees.", Unit::Bytes, self.rss.clone());
        r.register_with_unit("musetalk_pipeline_gpu_memory", "GPU memory used by the pipeline's process trees.", Unit::Bytes, self.gpu_memory.clone());
        r.register_with_unit("musetalk_pipeline_gpu_utilization", "SM share used by the pipeline's process trees (NVML per-process utilization; summed over trees).", Unit::Other("ratio".into()), self.gpu_util.clone());
    }

    /// Both modes always present (0 when idle); GPU memory only while a GPU is sampled,
    /// GPU utilization only while the driver reports per-process shares (absent, not 0,
    /// without them).
    pub fn publish(&self, trees: &[super::TreeSample], gpus: Option<&[super::GpuSample]>) {
        let gpu_sampled = gpus.is_some();
        let util_supported = gpus.is_some_and(|g| g.iter().any(|g| g.process_util_supported));
        for mode in Mode::ALL.map(Mode::as_str) {
            let (cpu, rss, gpu) = trees.iter().filter(|t| t.mode == mode).fold((0.0, 0u64, None::<u64>), |(c, r, g), t| {
                (c + t.cpu_ratio, r + t.rss_bytes, match (g, t.gpu_memory_bytes) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                })
            });
            let l = ModeLabels { mode };
            self.cpu.get_or_create(&l).set(cpu);
            self.rss.get_or_create(&l).set(rss as f64);
            if gpu_sampled {
                self.gpu_memory.get_or_create(&l).set(gpu.unwrap_or(0) as f64);
            } else {
                self.gpu_memory.remove(&l);
            }
            if util_supported {
                let util: f64 = trees.iter().filter(|t| t.mode == mode).filter_map(|t| t.gpu_util).sum();
                self.gpu_util.get_or_create(&l).set(util.min(1.0));
            } else {
                self.gpu_util.remove(&l);
            }
        }
    }
}

pub struct ProcessSource {
    me: Option<Process>,
    ticks_per_sec: f64,
    page_size: u64,
    cpus: f64,
    boot_time: f64,
    max_fds: Option<u64>,
    /// Per tree: (tick total, when) of the previous sample.
    prev: HashMap<u64, (u64, Instant)>,
    /// Whether this kernel has `/proc/PID/task/TID/children` (CONFIG_PROC_CHILDREN).
    children_files: bool,
    /// Kept `/proc/PID/stat` descriptors (tree members and the sidecar), by pid.
    stat_files: HashMap<u32, ProcFile>,
    /// Kept `/proc/PID/task/PID/children` descriptors of single-threaded members, by pid.
    child_files: HashMap<u32, ProcFile>,
    /// Pids read during this sample: the kept descriptors are pruned to these, so they
    /// stay as many as the trees have members.
    seen: HashSet<u32>,
    buf: Vec<u8>,
}

impl ProcessSource {
    pub fn new() -> Self {
        let me = Process::myself().ok();
        let max_fds = me.as_ref().and_then(|p| p.limits().ok()).and_then(|l| match l.max_open_files.soft_limit {
            LimitValue::Value(v) => Some(v),
            LimitValue::Unlimited => None,
        });
        let children_files = std::path::Path::new(&format!("/proc/self/task/{}/children", std::process::id())).exists();
        ProcessSource {
            me,
            ticks_per_sec: procfs::ticks_per_second() as f64,
            page_size: procfs::page_size(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64,
            boot_time: KernelStats::current().map(|k| k.btime as f64).unwrap_or(0.0),
            max_fds,
            prev: HashMap::new(),
            children_files,
            stat_files: HashMap::new(),
            child_files: HashMap::new(),
            seen: HashSet::new(),
            buf: Vec::with_capacity(1024),
        }
    }

    fn sidecar(&mut self) -> Result<SelfProcess, SourceError> {
        let stat = self.read_stat(std::process::id()).ok_or_else(|| SourceError::Failed("/proc/self/stat is not readable".into()))?;
        let open_fds = self.me.as_ref().and_then(|me| me.fd_count().ok()).unwrap_or(0) as u64;
        Ok(SelfProcess {
            cpu_seconds: stat.own_ticks as f64 / self.ticks_per_sec,
            resident_bytes: stat.rss_pages * self.page_size,
            virtual_bytes: stat.vsize,
            open_fds,
            max_fds: self.max_fds,
            threads: stat.threads,
            start_time_seconds: self.boot_time + stat.start_ticks as f64 / self.ticks_per_sec,
        })
    }

    /// `/proc/PID/stat` through a kept descriptor, opened on first use. A descriptor
    /// whose process is gone fails: the pid is looked up afresh (it may be reused).
    fn read_stat(&mut self, pid: u32) -> Option<PidStat> {
        self.seen.insert(pid);
        ProcFile::read_keyed(&mut self.stat_files, pid, || format!("/proc/{pid}/stat"), &mut self.buf).ok()?;
        parse_stat(&self.buf)
    }

    /// The children of a single-threaded process, through a kept descriptor.
    fn push_children_of(&mut self, pid: u32, stack: &mut Vec<u32>) {
        if ProcFile::read_keyed(&mut self.child_files, pid, || format!("/proc/{pid}/task/{pid}/children"), &mut self.buf).is_ok() {
            push_pids(&self.buf, stack);
        }
    }

    /// Root and all descendants with their stat figures, root first. Empty once the root is gone.
    fn walk(&mut self, root: u32) -> Vec<(u32, PidStat)> {
        let mut out: Vec<(u32, PidStat)> = Vec::new();
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            // A pid is listed twice only in a race with reparenting; keep it once.
            if out.iter().any(|(p, _)| *p == pid) {
                continue;
            }
            // A member may exit between the walk and this read: skip it, its time is in its parent.
            let Some(st) = self.read_stat(pid) else { continue };
            out.push((pid, st));
            if self.children_files {
                if st.threads <= 1 {
                    // Single-threaded (ffmpeg, shells): one file, no directory listing.
                    self.push_children_of(pid, &mut stack);
                } else if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                    // Any thread may have forked (Python's subprocess from a worker thread).
                    // Threads come and go: these are opened afresh each time, not kept.
                    for task in tasks.flatten() {
                        let path = format!("/proc/{pid}/task/{}/children", task.file_name().to_string_lossy());
                        if let Ok(f) = ProcFile::open(&path)
                            && f.read(&mut self.buf).is_ok()
                        {
                            push_pids(&self.buf, &mut stack);
                        }
                    }
                }
            } else if let Ok(all) = procfs::process::all_processes() {
                // Fallback for kernels without CONFIG_PROC_CHILDREN: a scan per member.
                for p in all.flatten() {
                    if let Ok(st) = p.stat()
                        && st.ppid as u32 == pid
                    {
                        stack.push(p.pid as u32);
                    }
                }
            }
        }
        out
    }

    /// Root and all descendants (pids), root first. Empty once the root is gone.
    pub fn tree_pids(&mut self, root: u32) -> Vec<u32> {
        self.walk(root).into_iter().map(|(p, _)| p).collect()
    }

    fn tree(&mut self, reg: &TreeRegistration, now: Instant) -> TreeSample {
        let members = self.walk(reg.root_pid);
        let ticks: u64 = members.iter().map(|(_, s)| s.ticks).sum();
        let rss: u64 = members.iter().map(|(_, s)| s.rss_pages * self.page_size).sum();
        let alive = members.iter().map(|(p, _)| *p).collect();
        let (prev_ticks, prev_at) = self.prev.get(&reg.key).copied().unwrap_or((0, reg.registered_at));
        let elapsed = now.saturating_duration_since(prev_at).as_secs_f64();
        let cpu_ratio = if elapsed > 0.0 {
            (ticks.saturating_sub(prev_ticks) as f64 / self.ticks_per_sec / elapsed / self.cpus).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.prev.insert(reg.key, (ticks.max(prev_ticks), now));
        TreeSample { key: reg.key, mode: reg.mode, pids: alive, cpu_ratio, rss_bytes: rss, gpu_memory_bytes: None, gpu_util: None, gpus: Vec::new() }
    }
}

/// The figures of `/proc/PID/stat` a sample needs. Parsed by hand rather than through
/// `procfs::Process`, because this runs for every tree member every sample and the
/// full parse cost a large share of DESIGN.md §9's CPU budget.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct PidStat {
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    /// utime + stime: the process itself, without its reaped children.
    own_ticks: u64,
    rss_pages: u64,
    threads: u64,
    /// Start time, in clock ticks after boot.
    start_ticks: u64,
    vsize: u64,
}

/// Fields after the `comm` (which may contain spaces, parentheses and bytes that are not
/// UTF-8: split after the last `)`).
fn parse_stat(text: &[u8]) -> Option<PidStat> {
    let rest = std::str::from_utf8(&text[text.iter().rposition(|b| *b == b')')? + 1..]).ok()?;
    // rest: " S ppid pgrp ..." → field 3 (state) is index 0 here.
    let f: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok()).map(|v| v.max(0) as u64);
    // utime 14, stime 15, cutime 16, cstime 17, num_threads 20, starttime 22, vsize 23,
    // rss 24 (1-based in proc(5)).
    let own_ticks = n(11)? + n(12)?;
    Some(PidStat { ticks: own_ticks + n(13)? + n(14)?, own_ticks, threads: n(17)?, start_ticks: n(19)?, vsize: n(20)?, rss_pages: n(21)? })
}

/// The pids of a `children` file.
fn push_pids(text: &[u8], stack: &mut Vec<u32>) {
    stack.extend(text.split(|b| b.is_ascii_whitespace()).filter_map(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok()));
}

impl Default for ProcessSource {
    fn default() -> Self {
        Self::new()
    }
}

impl Source for ProcessSource {
    fn name(&self) -> SourceName {
        SourceName::Process
    }

    fn collect(&mut self, sample: &mut Sample, trees: &[TreeRegistration]) -> Result<(), SourceError> {
        let now = sample.at;
        sample.trees = trees.iter().map(|reg| self.tree(reg, now)).collect();
        // Forget trees that were unregistered, so `prev` stays bounded.
        self.prev.retain(|k, _| trees.iter().any(|t| t.key == *k));
        let sidecar = self.sidecar();
        // Keep descriptors only for processes read in this sample.
        let seen = std::mem::take(&mut self.seen);
        self.stat_files.retain(|pid, _| seen.contains(pid));
        self.child_files.retain(|pid, _| seen.contains(pid));
        self.seen = seen;
        self.seen.clear();
        sample.sidecar = Some(sidecar?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    #[test]
    fn stat_parsing_handles_odd_command_names() {
        let line = b"1234 (we (ird) \xff name) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 5 0 12345 1000000 250 18446744073709551615";
        assert_eq!(parse_stat(line), Some(PidStat { ticks: 13, own_ticks: 10, rss_pages: 250, threads: 5, start_ticks: 12345, vsize: 1_000_000 }));
        assert_eq!(parse_stat(b"garbage"), None);
        assert_eq!(parse_stat(b"1 (x) S 1 2"), None, "cut short");
        let mut src = ProcessSource::new();
        let me = src.read_stat(std::process::id()).unwrap();
        assert!(me.rss_pages > 0 && me.threads >= 1 && me.vsize > 0);
        let again = src.read_stat(std::process::id()).unwrap();
        assert_eq!(again.start_ticks, me.start_ticks, "the kept descriptor reads the same process");
    }

    #[test]
    fn sidecar_figures_are_plausible() {
        let mut src = ProcessSource::new();
        let p = src.sidecar().unwrap();
        assert!(p.resident_bytes > 0 && p.threads >= 1 && p.open_fds >= 3);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time_seconds > now - 3600.0 && p.start_time_seconds <= now + 1.0, "{p:?}");
    }

    #[test]
    fn follows_a_child_and_its_grandchild_and_counts_their_cpu() {
        // sh → (busy loop child) + sleep grandchild via a subshell.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("sh -c 'sleep 30' & i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; wait")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let root = child.id();
        let mut src = ProcessSource::new();
        let reg = TreeRegistration { key: 1, root_pid: root, mode: "simple", registered_at: Instant::now() };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen = src.tree_pids(root);
            if seen.len() >= 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(seen.len() >= 3, "root, subshell and sleep: {seen:?}");
        assert_eq!(seen[0], root);
        std::thread::sleep(Duration::from_millis(300));
        let t = src.tree(&reg, Instant::now());
        assert!(t.rss_bytes > 0);
        assert!(t.cpu_ratio > 0.0, "the busy loop shows: {t:?}");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(root as i32), nix::sys::signal::Signal::SIGKILL);
        for pid in &seen[1..] {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = child.wait();
        assert!(src.tree_pids(root).is_empty(), "a reaped root leaves an empty tree");
    }
}
