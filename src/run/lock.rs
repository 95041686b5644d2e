//! The run's `.lock`: an exclusive `flock`, held while one process writes into the run,
//! so that two processes never train one run and a dead one (whose lock the kernel
//! released) is told from a running one.
use super::{RunError, LOCK_FILE};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// The lock of the run in `dir`, or `None` when another process holds it.
    pub fn try_acquire(dir: &Path) -> Result<Option<RunLock>, RunError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RunError::io(&path, e))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(RunLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(RunError::io(&path, err))
        }
    }

    /// Whether a process holds the lock of the run in `dir` now. Read from the kernel's
    /// lock table where there is one, so that looking never takes the lock: a `probunet
    /// runs` that took it for an instant would make a `train --resume` starting in that
    /// instant fail.
    pub fn is_held(dir: &Path) -> bool {
        let path = dir.join(LOCK_FILE);
        let Ok(metadata) = std::fs::metadata(&path) else {
            return false;
        };
        match std::fs::read_to_string("/proc/locks") {
            Ok(table) => holds_flock(&table, metadata.dev(), metadata.ino()),
            Err(_) => matches!(Self::try_acquire(dir), Ok(None)),
        }
    }
}

/// Whether `/proc/locks` (its text) lists a flock on the file with this device and inode.
fn holds_flock(table: &str, dev: u64, ino: u64) -> bool {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let file = format!("{major:02x}:{minor:02x}:{ino}");
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `1: FLOCK  ADVISORY  WRITE 4242 fd:00:1234 0 EOF`; a blocked waiter's line
        // starts with `->` and shifts the fields by one.
        let fields = match fields.get(1) {
            Some(&"->") => &fields[1..],
            _ => &fields[..],
        };
        fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&file.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_seen_in_the_kernels_table_without_taking_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!RunLock::is_held(dir.path()));
        let lock = RunLock::try_acquire(dir.path()).unwrap().unwrap();
        assert!(RunLock::is_held(dir.path()));
        // Looking did not take it: it is still ours, and free once dropped.
        assert!(RunLock::try_acquire(dir.path()).unwrap().is_none());
        drop(lock);
        assert!(!RunLock::is_held(dir.path()));
        let table = "1: FLOCK  ADVISORY  WRITE 4242 fd:00:1234 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 77 fd:00:99 0 EOF\n";
        let dev = libc::makedev(0xfd, 0);
        assert!(holds_flock(table, dev, 1234));
        assert!(!holds_flock(table, dev, 99));
    }
}
