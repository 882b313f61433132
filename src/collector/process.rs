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

    /// Root and all descendants with their stat figures, root first. Empty once the root is gone.
    fn walk(&self, root: u32) -> Vec<(u32, PidStat)> {
        let mut out: Vec<(u32, PidStat)> = Vec::new();
        let mut stack = vec![root];
        let mut buf = String::with_capacity(512);
        while let Some(pid) = stack.pop() {
            // A pid is listed twice only in a race with reparenting; keep it once.
            if out.iter().any(|(p, _)| *p == pid) {
                continue;
            }
            // A member may exit between the walk and this read: skip it, its time is in its parent.
            let Some(st) = read_stat(pid, &mut buf) else { continue };
            out.push((pid, st));
            if self.children_files {
                if st.threads <= 1 {
                    // Single-threaded (ffmpeg, shells): one file, no directory listing.
                    push_children(&format!("/proc/{pid}/task/{pid}/children"), &mut stack, &mut buf);
                } else if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                    // Any thread may have forked (Python's subprocess from a worker thread).
                    for task in tasks.flatten() {
                        push_children(&format!("/proc/{pid}/task/{}/children", task.file_name().to_string_lossy()), &mut stack, &mut buf);
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
    pub fn tree_pids(&self, root: u32) -> Vec<u32> {
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
        TreeSample { key: reg.key, mode: reg.mode, pids: alive, cpu_ratio, rss_bytes: rss, gpu_memory_bytes: None, gpu_util: None }
    }
}

/// The figures of `/proc/PID/stat` a tree sample needs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PidStat {
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    rss_pages: u64,
    threads: u64,
}

/// Reads and parses `/proc/PID/stat` into `buf` (reused across calls). Parsed here
/// rather than through `procfs::Process` because this runs for every tree member
/// every sample: one open+read instead of four syscalls and a full parse keeps a
/// sample inside DESIGN.md §9's CPU budget.
fn read_stat(pid: u32, buf: &mut String) -> Option<PidStat> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(format!("/proc/{pid}/stat")).ok()?.read_to_string(buf).ok()?;
    parse_stat(buf)
}

/// Fields after the `comm` (which may contain spaces and parentheses: split after the last `)`).
fn parse_stat(text: &str) -> Option<PidStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest: " S ppid pgrp ..." → field 3 (state) is index 0 here.
    let f: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
    // utime 14, stime 15, cutime 16, cstime 17, num_threads 20, rss 24 (1-based in proc(5)).
    let ticks = [n(11)?, n(12)?, n(13)?, n(14)?].iter().map(|v| (*v).max(0) as u64).sum();
    Some(PidStat { ticks, threads: n(17)?.max(0) as u64, rss_pages: n(21)?.max(0) as u64 })
}

fn push_children(path: &str, stack: &mut Vec<u32>, buf: &mut String) {
    use std::io::Read;
    buf.clear();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.read_to_string(buf).is_ok()
    {
        stack.extend(buf.split_ascii_whitespace().filter_map(|p| p.parse::<u32>().ok()));
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
    fn stat_parsing_handles_odd_command_names() {
        let line = "1234 (we (ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 5 0 12345 1000000 250 18446744073709551615";
        assert_eq!(parse_stat(line), Some(PidStat { ticks: 13, rss_pages: 250, threads: 5 }));
        assert_eq!(parse_stat("garbage"), None);
        let mut buf = String::new();
        let me = read_stat(std::process::id(), &mut buf).unwrap();
        assert!(me.rss_pages > 0 && me.threads >= 1);
    }

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
