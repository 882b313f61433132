//! One instance per data dir: an exclusive `flock` on `{data}/run/lock`, taken before anything touches the data dir and held for the process's life.
//!
//! Start-up clean-up kills the process groups recorded under `run/groups` and removes
//! job dirs; run by a second instance it would destroy the first's running jobs and
//! stored outputs. The lock is the first thing `run()` does, so a second `serve` on the
//! same data dir exits at once and touches nothing. `flock` locks die with the process
//! (crash, SIGKILL, OOM kill included), so a stale lock can never block a restart.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Holds the data dir's lock until dropped (at the end of the process).
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the data dir {dir} is in use by another musetalk-sidecar ({holder}); stop it, or give this instance its own --data-dir")]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock the data dir ({path}): {source} (set --data-dir to a writable local directory)")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The lock file of a data dir.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("lock")
}

impl DataDirLock {
    /// Takes the lock without waiting and writes this process's pid into the file (for
    /// the error the next instance prints).
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = lock_path(data_dir);
        let io = |source| LockError::Io { path: path.clone(), source };
        std::fs::create_dir_all(path.parent().unwrap_or(data_dir)).map_err(io)?;
        // Opened without truncating: the holder's pid must survive a refused attempt.
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        // `check` ([`holder`]) holds a shared lock for a moment: a few short retries tell
        // that apart from a running instance, which holds it for its life.
        let mut tries = 0;
        let mut lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if tries < 4 => {
                    tries += 1;
                    file = f;
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut pid = String::new();
                    let _ = f.read_to_string(&mut pid);
                    let holder = match pid.trim() {
                        "" => "pid unknown".to_string(),
                        p => format!("pid {p}"),
                    };
                    return Err(LockError::Held { dir: data_dir.to_path_buf(), holder });
                }
                Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
            }
        };
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        writeln!(&mut *lock, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds `data_dir`'s lock (`pid N`), if a live process does (for `check`). Creates
/// and writes nothing: a missing lock file means nobody holds it.
pub fn holder(data_dir: &Path) -> Option<String> {
    let file = std::fs::OpenOptions::new().read(true).open(lock_path(data_dir)).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Some(format!("pid {}", pid.trim()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_data_dir_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(first.path()).unwrap().trim(), std::process::id().to_string());
        // flock is per open file description: a second open in this process conflicts too.
        match DataDirLock::acquire(dir.path()) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, format!("pid {}", std::process::id())),
            other => panic!("second lock taken: {other:?}"),
        }
        assert_eq!(holder(dir.path()), Some(format!("pid {}", std::process::id())));
        assert_eq!(std::fs::read_to_string(first.path()).unwrap().trim(), std::process::id().to_string(), "a refused attempt leaves the holder's pid");
        drop(first);
        assert_eq!(holder(dir.path()), None);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        drop(again);
        let fresh = tempfile::tempdir().unwrap();
        assert_eq!(holder(fresh.path()), None);
        assert!(!lock_path(fresh.path()).exists(), "probing creates nothing");
    }
}
