//! Re-readable `/proc` files: opened once, read again from offset 0 at every sample.
//!
//! Opening a `/proc` path walks it (pid lookup, dentries) on every call. A kept
//! descriptor read with `pread` from offset 0 makes the kernel generate the content
//! afresh (seq_file restarts at offset 0), for the cost of the read alone. A kept
//! `/proc/PID/...` descriptor stays bound to that process: once it exits, reads fail
//! (ESRCH) rather than returning the figures of a process that reused its pid.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct ProcFile {
    file: File,
}

impl ProcFile {
    pub fn open(path: impl AsRef<Path>) -> io::Result<ProcFile> {
        Ok(ProcFile { file: File::open(path)? })
    }

    /// Reads `path` through the descriptor kept in `slot`, opening it on first use. A
    /// failed read empties the slot, so the next call opens the file afresh.
    pub fn read_kept(slot: &mut Option<ProcFile>, path: &str, buf: &mut Vec<u8>) -> io::Result<()> {
        let file = match slot {
            Some(f) => f,
            None => slot.insert(ProcFile::open(path)?),
        };
        let read = file.read(buf);
        if read.is_err() {
            *slot = None;
        }
        read
    }

    /// [`read_kept`](Self::read_kept) for descriptors kept by key (a pid): the entry is
    /// (re)opened from `path()` when missing or failing, and removed when that fails too.
    pub fn read_keyed<K: Hash + Eq>(files: &mut HashMap<K, ProcFile>, key: K, path: impl FnOnce() -> String, buf: &mut Vec<u8>) -> io::Result<()> {
        if files.get(&key).is_some_and(|f| f.read(buf).is_ok()) {
            return Ok(());
        }
        let opened = ProcFile::open(path()).and_then(|f| f.read(buf).map(|()| f));
        match opened {
            Ok(f) => {
                files.insert(key, f);
                Ok(())
            }
            Err(e) => {
                files.remove(&key);
                Err(e)
            }
        }
    }

    /// The whole current content, into `buf` (cleared first; its capacity is kept
    /// across calls, so a steady-state read allocates nothing).
    pub fn read(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        loop {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(4096);
            }
            let len = buf.len();
            buf.resize(buf.capacity(), 0);
            match self.file.read_at(&mut buf[len..], len as u64) {
                Ok(0) => {
                    buf.truncate(len);
                    return Ok(());
                }
                Ok(n) => buf.truncate(len + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(len),
                Err(e) => {
                    buf.truncate(len);
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rereads_see_fresh_content_and_whole_files() {
        // /proc/self/stat changes between reads (CPU time, at least the utime of a busy loop).
        let f = ProcFile::open("/proc/self/stat").unwrap();
        let mut a = Vec::new();
        f.read(&mut a).unwrap();
        let stop = std::time::Instant::now() + std::time::Duration::from_millis(50);
        while std::time::Instant::now() < stop {
            std::hint::black_box(0);
        }
        let mut b = Vec::new();
        f.read(&mut b).unwrap();
        assert!(a.ends_with(b"\n") && b.ends_with(b"\n"));
        assert_ne!(a, b, "a second read through the same descriptor is a fresh reading");
        // Longer than one read: all of it, every entry whole (each ends with VmFlags).
        let mut m = Vec::with_capacity(8);
        ProcFile::open("/proc/self/smaps").unwrap().read(&mut m).unwrap();
        let text = String::from_utf8_lossy(&m);
        assert!(m.len() > 16_384, "{}", m.len());
        assert!(text.contains("[stack]") && text.ends_with('\n') && text.lines().last().unwrap().starts_with("VmFlags:"), "{text}");
    }

    #[test]
    fn a_kept_descriptor_fails_once_its_process_is_gone() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let f = ProcFile::open(format!("/proc/{}/stat", child.id())).unwrap();
        let mut buf = Vec::new();
        f.read(&mut buf).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(f.read(&mut buf).is_err(), "read after exit: {}", String::from_utf8_lossy(&buf));
    }
}
