//! Sizes checked before they are allocated. Every size that input decides (a model's
//! filters, a store's shape, eval's sample count) goes through [`Need::fits_memory`] or
//! [`Need::fits_disk`] first, so an absurd value is an error naming it, the bytes it asks
//! for and the limit, never an abort inside libtorch or a capacity overflow.
//!
//! Sizes are counted in `u128` with saturating products, so no input can overflow them.

use std::fmt;
use std::path::{Path, PathBuf};

/// Overrides the memory limit (MiB) for tests and for machines shared with other jobs.
pub const MEMORY_LIMIT_ENV: &str = "PROBUNET_MEMORY_LIMIT_MIB";

/// A byte count, printed the way people read sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u128);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

/// The product of `factors`, saturating instead of overflowing.
pub fn product(factors: &[u64]) -> u128 {
    factors
        .iter()
        .fold(1u128, |acc, &f| acc.saturating_mul(u128::from(f)))
}

/// What a request needs, described in the words of the input that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// What asks, e.g. `model.filters = [8, 100000000]`.
    pub what: String,
    pub bytes: u128,
}

/// Which limit a request was held against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// Memory this process may use: `MemAvailable`, or [`MEMORY_LIMIT_ENV`].
    Memory { bytes: u64, source: &'static str },
    /// Free space on the file system holding `path`.
    Disk { bytes: u64, path: PathBuf },
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Memory { bytes, source } => write!(
                f,
                "the {} of memory available ({source})",
                Bytes(u128::from(*bytes))
            ),
            Limit::Disk { bytes, path } => write!(
                f,
                "the {} free on the disk holding {}",
                Bytes(u128::from(*bytes)),
                path.display()
            ),
        }
    }
}

/// A request larger than what the machine has (boxed: errors stay small on the happy path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} needs about {}, more than {}", .0.need.what, Bytes(.0.need.bytes), .0.limit)]
pub struct TooLarge(Box<Refusal>);

/// What was asked and the limit it was held against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub need: Need,
    pub limit: Limit,
}

impl TooLarge {
    pub fn refusal(&self) -> &Refusal {
        &self.0
    }

    /// The same refusal, said as asked for by `who` (a spec key or a flag), which the
    /// caller knows and the size check does not.
    pub fn asked_by(mut self, who: &str) -> TooLarge {
        self.0.need.what = format!("{who}: {}", self.0.need.what);
        self
    }
}

impl Need {
    pub fn new(what: impl Into<String>, bytes: u128) -> Self {
        Self {
            what: what.into(),
            bytes,
        }
    }

    /// Refuses a request larger than the memory this process may use.
    pub fn fits_memory(self) -> Result<(), TooLarge> {
        self.fits(memory_limit())
    }

    /// Refuses a request larger than the free space where `dir` (or its nearest existing
    /// ancestor) lives. Where the file system cannot be asked, the write itself will say.
    pub fn fits_disk(self, dir: &Path) -> Result<(), TooLarge> {
        match free_disk(dir) {
            Some(limit) => self.fits(limit),
            None => Ok(()),
        }
    }

    fn fits(self, limit: Limit) -> Result<(), TooLarge> {
        let bytes = match &limit {
            Limit::Memory { bytes, .. } | Limit::Disk { bytes, .. } => *bytes,
        };
        if self.bytes > u128::from(bytes) {
            Err(TooLarge(Box::new(Refusal { need: self, limit })))
        } else {
            Ok(())
        }
    }
}

/// [`MEMORY_LIMIT_ENV`] when set to a number, else the kernel's `MemAvailable`, else (no
/// `/proc`) no limit.
pub fn memory_limit() -> Limit {
    let from_env = std::env::var(MEMORY_LIMIT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(mib) = from_env {
        return Limit::Memory {
            bytes: mib.saturating_mul(1 << 20),
            source: MEMORY_LIMIT_ENV,
        };
    }
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available(&text));
    Limit::Memory {
        bytes: available.unwrap_or(u64::MAX),
        source: "MemAvailable in /proc/meminfo",
    }
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo`.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Free space for an unprivileged writer on the file system of `dir`'s nearest existing
/// ancestor.
fn free_disk(dir: &Path) -> Option<Limit> {
    use std::os::unix::ffi::OsStrExt;
    // A relative path's last ancestor is "", the working folder.
    let existing = dir
        .ancestors()
        .find(|p| p.as_os_str().is_empty() || p.exists())?;
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type; read only on success.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some(Limit::Disk {
        bytes: (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64),
        path: existing.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        assert_eq!(Bytes(512).to_string(), "512 bytes");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(Bytes(u128::MAX).to_string(), "295147905179352825856.0 EiB");
    }

    #[test]
    fn products_saturate_instead_of_overflowing() {
        assert_eq!(product(&[2, 3, 4]), 24);
        assert_eq!(product(&[u64::MAX, u64::MAX, 2]), u128::MAX);
    }

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(text), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_request_over_the_limit_names_itself_and_the_limit() {
        let limit = Limit::Memory {
            bytes: 1 << 30,
            source: MEMORY_LIMIT_ENV,
        };
        let need = Need::new("data.synthetic.size = 65536", 16 << 30);
        let err = need.clone().fits(limit.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "data.synthetic.size = 65536 needs about 16.0 GiB, more than the 1.0 GiB of \
             memory available (PROBUNET_MEMORY_LIMIT_MIB)"
        );
        assert!(Need::new("small", 1 << 20).fits(limit).is_ok());
    }

    #[test]
    fn disk_space_is_asked_of_the_nearest_existing_folder() {
        let dir = std::env::temp_dir().join("probunet-budget-test/not/yet/made");
        let Some(Limit::Disk { bytes, path }) = free_disk(&dir) else {
            panic!("statvfs answers for the temporary folder");
        };
        assert!(bytes > 0);
        assert!(path.exists(), "{}", path.display());
        let err = Need::new("a store of u64::MAX items", u128::MAX)
            .fits_disk(&dir)
            .unwrap_err();
        assert!(
            err.to_string().contains("free on the disk holding"),
            "{err}"
        );
        let relative = Path::new("no-such-folder/store");
        assert!(
            matches!(free_disk(relative), Some(Limit::Disk { path, .. }) if path == Path::new("."))
        );
    }
}
