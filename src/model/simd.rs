//! What probunet's own CPU kernels share: the vector unit they may use, sixteen floats in
//! its registers, and libtorch's intra-op threads to run on.
use std::ffi::c_void;

/// Channels go in lanes of 16 floats: one AVX-512 register, two AVX2 ones.
pub const LANES: usize = 16;
pub type Lane = [f32; LANES];

/// `out`'s buffer, written by the threads of [`parallel_for`] in disjoint ranges.
pub struct SharedOut(pub *mut f32);
// SAFETY: the threads write disjoint ranges (see `decode`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The `i`th float; a method, so closures capture the whole (Sync) wrapper.
    pub fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Whether autograd records operations now (false inside `tch::no_grad`): a kernel of
/// ours records nothing, so it may serve only where nothing would be recorded.
pub fn grad_enabled() -> bool {
    // SAFETY: plain FFI into intraop.cpp, which only reads the thread's grad mode.
    unsafe { probunet_grad_enabled() != 0 }
}

/// What intraop.cpp calls back: a context and a range.
type Body = extern "C" fn(*mut c_void, i64, i64);

extern "C" {
    fn probunet_grad_enabled() -> i32;
    fn probunet_parallel_for(n: i64, body: Body, context: *mut c_void) -> i32;
}

/// Runs `body` over ranges covering `0..n` on libtorch's intra-op threads (intraop.cpp),
/// so it takes the cores those threads hold rather than competing with them.
pub fn parallel_for(n: usize, body: &(dyn Fn(usize, usize) + Sync)) -> Result<(), ()> {
    extern "C" fn call(context: *mut c_void, begin: i64, end: i64) {
        // SAFETY: `context` is the `&&dyn Fn` passed below, alive for the whole call.
        let body = unsafe { &*(context as *const &(dyn Fn(usize, usize) + Sync)) };
        body(begin as usize, end as usize);
    }
    let mut body = body;
    let context = &mut body as *mut &(dyn Fn(usize, usize) + Sync) as *mut c_void;
    // SAFETY: plain FFI; `call` matches the callback's type and catches nothing, but a
    // panic in an `extern "C"` function aborts rather than unwinding into C++.
    match unsafe { probunet_parallel_for(n as i64, call, context) } {
        0 => Ok(()),
        _ => Err(()),
    }
}

/// The vector unit the kernel runs on: the widest this CPU offers and oneDNN is allowed
/// (`ONEDNN_MAX_CPU_ISA` caps both alike, so a capped machine measures as the CPU it
/// stands in for). Only [`Isa::available`] makes one, so holding an `Isa` proves the CPU
/// has that unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(pub(super) Unit);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Avx512,
    Avx2,
}

impl Isa {
    /// `None` where the CPU has neither (fcomb then stays with libtorch).
    pub fn available() -> Option<Isa> {
        static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *ISA.get_or_init(detect)
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Isa> {
    let allowed = crate::sys::cpu_capability();
    let fma = is_x86_feature_detected!("fma");
    if allowed == "AVX512" && fma && is_x86_feature_detected!("avx512f") {
        Some(Isa(Unit::Avx512))
    } else if allowed != "other" && fma && is_x86_feature_detected!("avx2") {
        Some(Isa(Unit::Avx2))
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Isa> {
    None
}

/// Sixteen floats in the registers of one vector unit. Every method is `unsafe`: it may
/// only run on a CPU with that unit (inside the matching `#[target_feature]` function).
pub trait Vector: Copy {
    unsafe fn load(lane: &Lane) -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// `self * x + acc`
    unsafe fn mul_add(self, x: Self, acc: Self) -> Self;
    unsafe fn add(self, other: Self) -> Self;
    unsafe fn sub(self, other: Self) -> Self;
    unsafe fn relu(self) -> Self;
    unsafe fn store(self, lane: &mut Lane);
    unsafe fn sum(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{Lane, Vector};
    use std::arch::x86_64::*;

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub struct Zmm(__m512);

    impl Vector for Zmm {
        #[inline(always)]
        unsafe fn load(lane: &Lane) -> Self {
            Zmm(_mm512_loadu_ps(lane.as_ptr()))
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Zmm(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn mul_add(self, x: Self, acc: Self) -> Self {
            Zmm(_mm512_fmadd_ps(self.0, x.0, acc.0))
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            Zmm(_mm512_add_ps(self.0, other.0))
        }
        #[inline(always)]
        unsafe fn sub(self, other: Self) -> Self {
            Zmm(_mm512_sub_ps(self.0, other.0))
        }
        #[inline(always)]
        unsafe fn relu(self) -> Self {
            Zmm(_mm512_max_ps(self.0, _mm512_setzero_ps()))
        }
        #[inline(always)]
        unsafe fn store(self, lane: &mut Lane) {
            _mm512_storeu_ps(lane.as_mut_ptr(), self.0)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self.0)
        }
    }

    /// Two AVX2 registers.
    #[derive(Clone, Copy)]
    pub struct Ymm2(__m256, __m256);

    impl Vector for Ymm2 {
        #[inline(always)]
        unsafe fn load(lane: &Lane) -> Self {
            Ymm2(
                _mm256_loadu_ps(lane.as_ptr()),
                _mm256_loadu_ps(lane.as_ptr().add(8)),
            )
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Ymm2(_mm256_set1_ps(x), _mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn mul_add(self, x: Self, acc: Self) -> Self {
            Ymm2(
                _mm256_fmadd_ps(self.0, x.0, acc.0),
                _mm256_fmadd_ps(self.1, x.1, acc.1),
            )
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            Ymm2(
                _mm256_add_ps(self.0, other.0),
                _mm256_add_ps(self.1, other.1),
            )
        }
        #[inline(always)]
        unsafe fn sub(self, other: Self) -> Self {
            Ymm2(
                _mm256_sub_ps(self.0, other.0),
                _mm256_sub_ps(self.1, other.1),
            )
        }
        #[inline(always)]
        unsafe fn relu(self) -> Self {
            let zero = _mm256_setzero_ps();
            Ymm2(_mm256_max_ps(self.0, zero), _mm256_max_ps(self.1, zero))
        }
        #[inline(always)]
        unsafe fn store(self, lane: &mut Lane) {
            _mm256_storeu_ps(lane.as_mut_ptr(), self.0);
            _mm256_storeu_ps(lane.as_mut_ptr().add(8), self.1);
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let mut v = [0.0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), _mm256_add_ps(self.0, self.1));
            v.iter().sum()
        }
    }
}

/// Every vector unit this CPU has, whatever `ONEDNN_MAX_CPU_ISA` says: kernels' tests
/// run on each.
#[cfg(test)]
pub fn units() -> Vec<Isa> {
    let mut units = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx512f") {
            units.push(Isa(Unit::Avx512));
        }
        if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2") {
            units.push(Isa(Unit::Avx2));
        }
    }
    units
}

/// The largest `|out - expected|` over `scale(expected)`, element by element: how far a
/// kernel's result is from its reference.
#[cfg(test)]
pub fn worst_error(out: &[f32], expected: &[f32], scale: impl Fn(f32) -> f32) -> f32 {
    assert_eq!(out.len(), expected.len());
    out.iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs() / scale(*b))
        .fold(0.0, f32::max)
}

/// Small, varied values, the same on every run: kernels' test inputs.
#[cfg(test)]
pub fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 211) as f32 / 211.0 - 0.45)
        .collect()
}
