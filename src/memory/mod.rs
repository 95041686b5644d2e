//! CPU memory for libtorch: a caching, huge-page-backed allocator in place of glibc's.
//!
//! libtorch's default CPU allocator gives every large tensor a fresh mapping and unmaps it
//! on free, so each training step faults in and zeroes all its activations and gradients
//! again. [`install`] replaces it with the allocator in `cpu_allocator.cpp`, which keeps
//! freed large blocks (up to a limit) for the next request of the same size class and backs
//! new ones with transparent huge pages. The binary installs it at start-up;
//! `PROBUNET_CPU_ALLOCATOR=system` keeps libtorch's own (for comparisons), and
//! `PROBUNET_CPU_CACHE_MIB` sets how much freed memory may be kept.

use std::sync::OnceLock;

extern "C" {
    fn probunet_cpu_allocator_install(limit_bytes: usize);
    fn probunet_cpu_allocator_empty_cache();
    fn probunet_cpu_allocator_stats(out: *mut u64);
}

/// Freed memory kept for reuse unless `PROBUNET_CPU_CACHE_MIB` says otherwise.
pub const DEFAULT_CACHE_MIB: usize = 1024;

/// Which CPU allocator libtorch uses in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAllocator {
    /// Ours, keeping at most this many bytes of freed blocks.
    Caching { limit_bytes: usize },
    /// libtorch's default (glibc malloc).
    System,
}

/// What the environment asks for; a value that cannot be read is an error naming it.
pub fn from_env() -> Result<CpuAllocator, String> {
    match std::env::var("PROBUNET_CPU_ALLOCATOR").as_deref() {
        Ok("system") => return Ok(CpuAllocator::System),
        Ok("caching") | Err(_) => {}
        Ok(other) => {
            return Err(format!(
                "PROBUNET_CPU_ALLOCATOR={other:?}: expected \"caching\" or \"system\""
            ))
        }
    }
    let mib = match std::env::var("PROBUNET_CPU_CACHE_MIB") {
        Ok(v) => v
            .parse::<usize>()
            .map_err(|_| format!("PROBUNET_CPU_CACHE_MIB={v:?}: expected a whole number of MiB"))?,
        Err(_) => DEFAULT_CACHE_MIB,
    };
    Ok(CpuAllocator::Caching {
        limit_bytes: mib << 20,
    })
}

static INSTALLED: OnceLock<CpuAllocator> = OnceLock::new();

/// Makes `choice` libtorch's CPU allocator for every tensor allocated from now on. The first
/// call decides; later calls return what it chose.
pub fn install(choice: CpuAllocator) -> CpuAllocator {
    *INSTALLED.get_or_init(|| {
        if let CpuAllocator::Caching { limit_bytes } = choice {
            // SAFETY: plain FFI into cpu_allocator.cpp; it installs at most once.
            unsafe { probunet_cpu_allocator_install(limit_bytes) };
        }
        choice
    })
}

/// The allocator in use (`None` before [`install`]).
pub fn installed() -> Option<CpuAllocator> {
    INSTALLED.get().copied()
}

/// Hands every cached block back to the kernel (a no-op under the system allocator).
pub fn empty_cache() {
    // SAFETY: plain FFI; a no-op when nothing is installed.
    unsafe { probunet_cpu_allocator_empty_cache() }
}

/// Counters of the caching allocator (all zero under the system allocator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Large requests served from the free lists.
    pub hits: u64,
    /// Large requests that mapped new memory.
    pub misses: u64,
    /// Bytes of large blocks mapped now, in use or cached.
    pub mapped_bytes: u64,
    /// Bytes of large blocks freed and kept for reuse.
    pub cached_bytes: u64,
}

pub fn stats() -> Stats {
    let mut out = [0u64; 4];
    // SAFETY: the C side writes exactly four u64s.
    unsafe { probunet_cpu_allocator_stats(out.as_mut_ptr()) };
    Stats {
        hits: out[0],
        misses: out[1],
        mapped_bytes: out[2],
        cached_bytes: out[3],
    }
}
