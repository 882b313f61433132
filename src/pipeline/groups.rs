//! A registry of the process groups the sidecar started, on disk, so a restarted
//! sidecar can kill what a crashed (SIGKILLed, OOM-killed) one left running.
//!
//! Each running group is a file `{data}/run/groups/{pgid}` holding the leader's start
//! time (`/proc/PID/stat` field 22): a recycled pid never matches it, so only our own
//! leftovers are killed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Sets the registry dir and kills the groups an earlier process left. Returns how many.
pub fn init(dir: &Path) -> usize {
    let _ = std::fs::create_dir_all(dir);
    let _ = DIR.set(dir.to_path_buf());
    let mut killed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let pgid: Option<i32> = entry.file_name().to_str().and_then(|n| n.parse().ok());
        let recorded = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u64>().ok());
        if let (Some(pgid), Some(recorded)) = (pgid, recorded)
            && start_time(pgid as u32) == Some(recorded)
            && killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok()
        {
            tracing::warn!(pgid, "killed a pipeline process group left running by an earlier sidecar");
            killed += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// The leader's start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Removes the group's record when the group is gone.
pub struct Tracked(Option<PathBuf>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Records a group whose leader is `pid` (a no-op before [`init`], e.g. in unit tests).
pub fn track(pid: u32) -> Tracked {
    let Some(dir) = DIR.get() else { return Tracked(None) };
    let Some(st) = start_time(pid) else { return Tracked(None) };
    let path = dir.join(pid.to_string());
    match std::fs::write(&path, st.to_string()) {
        Ok(()) => Tracked(Some(path)),
        Err(e) => {
            tracing::warn!(pid, "cannot record the process group in {}: {e}", dir.display());
            Tracked(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_and_of_nothing() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX - 1).is_none());
    }
}
