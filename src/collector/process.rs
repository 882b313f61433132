//! Process source: the sidecar's own `process_*` figures and the registered pipeline process trees.
//!
//! A tree is followed from its root through `/proc/PID/task/TID/children` (no scan of
//! every process on the machine). Its CPU is the delta of
//! Σ(utime + stime + cutime + cstime) over the live members: when a member exits and
//! is reaped, its time moves into its parent's `cutime`, so the sum stays continuous
//! and short-lived children (ffmpeg runs) are still counted.

use std::collections::HashMap;
use std::time::Instant;

use procfs::process::{LimitValue, Process};
use procfs::{CurrentSI, KernelStats};

use super::{Sample, Source, SourceError, SourceName, TreeRegistration, TreeSample};
use crate::metrics::SelfProcess;

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
        }
    }

    fn sidecar(&self) -> Result<SelfProcess, SourceError> {
        let me = self.me.as_ref().ok_or_else(|| SourceError::Failed("/proc/self is not readable".into()))?;
        let stat = me.stat().map_err(|e| SourceError::Failed(format!("reading /proc/self/stat: {e}")))?;
        Ok(SelfProcess {
            cpu_seconds: (stat.utime + stat.stime) as f64 / self.ticks_per_sec,
            resident_bytes: stat.rss * self.page_size,
            virtual_bytes: stat.vsize,
            open_fds: me.fd_count().unwrap_or(0) as u64,
            max_fds: self.max_fds,
            threads: stat.num_threads.max(0) as u64,
            start_time_seconds: self.boot_time + stat.starttime as f64 / self.ticks_per_sec,
        })
    }

    /// Root and all descendants (pids), root first. Empty once the root is gone.
    pub fn tree_pids(&self, root: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            // A pid is listed twice only in a race with reparenting; keep it once.
            if out.contains(&pid) {
                continue;
            }
            if self.children_files {
                let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
                out.push(pid);
                for task in tasks.flatten() {
                    let path = task.path().join("children");
                    if let Ok(text) = std::fs::read_to_string(path) {
                        stack.extend(text.split_ascii_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                    }
                }
            } else {
                // Fallback for kernels without CONFIG_PROC_CHILDREN: one scan per level.
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                out.push(pid);
                if let Ok(all) = procfs::process::all_processes() {
                    for p in all.flatten() {
                        if let Ok(st) = p.stat()
                            && st.ppid as u32 == pid
                        {
                            stack.push(p.pid as u32);
                        }
                    }
                }
            }
        }
        out
    }

    fn tree(&mut self, reg: &TreeRegistration, now: Instant) -> TreeSample {
        let pids = self.tree_pids(reg.root_pid);
        let (mut ticks, mut rss) = (0u64, 0u64);
        let mut alive = Vec::with_capacity(pids.len());
        for pid in pids {
            // A member may exit between the walk and this read: skip it, its time is in its parent.
            if let Ok(st) = Process::new(pid as i32).and_then(|p| p.stat()) {
                ticks += st.utime + st.stime + st.cutime.max(0) as u64 + st.cstime.max(0) as u64;
                rss += st.rss * self.page_size;
                alive.push(pid);
            }
        }
        let (prev_ticks, prev_at) = self.prev.get(&reg.key).copied().unwrap_or((0, reg.registered_at));
        let elapsed = now.saturating_duration_since(prev_at).as_secs_f64();
        let cpu_ratio = if elapsed > 0.0 {
            (ticks.saturating_sub(prev_ticks) as f64 / self.ticks_per_sec / elapsed / self.cpus).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.prev.insert(reg.key, (ticks.max(prev_ticks), now));
        TreeSample { key: reg.key, mode: reg.mode, pids: alive, cpu_ratio, rss_bytes: rss, gpu_memory_bytes: None, gpu_util: None }
    }
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
        sample.sidecar = Some(self.sidecar()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    #[test]
    fn sidecar_figures_are_plausible() {
        let src = ProcessSource::new();
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
