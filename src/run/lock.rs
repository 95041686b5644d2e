//! The run's `.lock`: an exclusive `flock`, held while one process writes into the run,
//! so that two processes never train one run and a dead one (whose lock the kernel
//! released) is told from a running one.
use super::{RunError, LOCK_FILE};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
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

    /// Whether a process holds the lock of the run in `dir` now.
    pub fn is_held(dir: &Path) -> bool {
        dir.join(LOCK_FILE).exists() && matches!(Self::try_acquire(dir), Ok(None))
    }
}
