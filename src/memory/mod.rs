//! CPU memory for libtorch: a caching, huge-page-backed allocator in place of glibc's.
//!
//! libtorch's default CPU allocator gives every large tensor a fresh mapping and unmaps it
//! on free, so each training step faults in and zeroes all its activations and gradients
//! again. [`install`] replaces it with the allocator in `cpu_allocator.cpp`, which keeps
//! freed large blocks (up to a limit) for the next request of the same size class and backs
//! new ones with transparent huge pages. The binary installs it at start-up;
//! `PROBUNET_CPU_ALLOCATOR=system` keeps libtorch's own (for comparisons), and
//! `PROBUNET_CPU_CACHE_MIB` sets how much freed memory may be kept.

pub mod budget;

use std::sync::OnceLock;

extern "C" {
    fn probunet_cpu_allocator_install(limit_bytes: usize);
    fn probunet_cpu_allocator_empty_cache();
    fn probunet_cpu_allocator_stats(out: *mut u64);
    fn probunet_cuda_peak_allocated(device: i32, out: *mut i64) -> i32;
    fn probunet_cuda_reset_peak(device: i32) -> i32;
}

/// Peak bytes libtorch's CUDA caching allocator has handed out on `device` since the last
/// [`reset_cuda_peak`] (PyTorch's `torch.cuda.max_memory_allocated`); `None` where there is
/// no CUDA device to ask.
pub fn cuda_peak_allocated(device: usize) -> Option<u64> {
    let mut out = 0i64;
    // SAFETY: plain FFI (cuda_stats.cpp); it writes one i64 and catches libtorch's errors.
    let ok = unsafe { probunet_cuda_peak_allocated(device as i32, &mut out) } == 0;
    ok.then_some(out.max(0) as u64)
}

/// Starts a new peak for [`cuda_peak_allocated`]; `false` where there is no CUDA device.
pub fn reset_cuda_peak(device: usize) -> bool {
    // SAFETY: plain FFI (cuda_stats.cpp); it catches libtorch's errors.
    unsafe { probunet_cuda_reset_peak(device as i32) == 0 }
}

/// Freed memory kept for reuse unless `PROBUNET_CPU_CACHE_MIB` says otherwise. 256 MiB
/// holds what a batch-5 step reuses; at batch 32, 1024 MiB kept 480 MiB more at the peak for
/// no speed that could be told from noise (docs/performance.md, AVX2, 2026-12-02).
pub const DEFAULT_CACHE_MIB: usize = 256;

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
    choose(
        std::env::var("PROBUNET_CPU_ALLOCATOR").ok().as_deref(),
        std::env::var("PROBUNET_CPU_CACHE_MIB").ok().as_deref(),
    )
}

/// The allocator for the values of `PROBUNET_CPU_ALLOCATOR` and `PROBUNET_CPU_CACHE_MIB`.
fn choose(allocator: Option<&str>, cache_mib: Option<&str>) -> Result<CpuAllocator, String> {
    match allocator {
        Some("system") => return Ok(CpuAllocator::System),
        Some("caching") | None => {}
        Some(other) => {
            return Err(format!(
                "PROBUNET_CPU_ALLOCATOR={other:?}: expected \"caching\" or \"system\""
            ))
        }
    }
    let mib = match cache_mib {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|&mib| mib <= 1 << 30)
            .ok_or_else(|| {
                format!("PROBUNET_CPU_CACHE_MIB={v:?}: expected a whole number of MiB")
            })?,
        None => DEFAULT_CACHE_MIB,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_statistics_answer_none_without_a_cuda_device() {
        if tch::Cuda::is_available() {
            let before = cuda_peak_allocated(0).expect("a CUDA device answers");
            assert!(reset_cuda_peak(0));
            let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
            let peak = cuda_peak_allocated(0).expect("a CUDA device answers");
            assert!(peak >= 4 << 20, "{peak} after {before}");
            drop(t);
        } else {
            assert_eq!(cuda_peak_allocated(0), None);
            assert!(!reset_cuda_peak(0));
        }
    }

    #[test]
    fn the_environment_chooses_the_allocator_and_bad_values_are_named() {
        let caching = |mib: usize| CpuAllocator::Caching {
            limit_bytes: mib << 20,
        };
        assert_eq!(choose(None, None), Ok(caching(DEFAULT_CACHE_MIB)));
        assert_eq!(choose(Some("caching"), Some("64")), Ok(caching(64)));
        assert_eq!(choose(Some("caching"), Some("0")), Ok(caching(0)));
        assert_eq!(
            choose(Some("system"), Some("junk")),
            Ok(CpuAllocator::System)
        );
        let err = choose(Some("jemalloc"), None).unwrap_err();
        assert!(err.contains("PROBUNET_CPU_ALLOCATOR=\"jemalloc\""), "{err}");
        for bad in ["-1", "1.5", "lots", "99999999999999"] {
            let err = choose(None, Some(bad)).unwrap_err();
            assert!(
                err.contains(&format!("PROBUNET_CPU_CACHE_MIB=\"{bad}\"")),
                "{err}"
            );
        }
    }
}
