//! The caching CPU allocator through its FFI, in a process of its own so no other test
//! allocates while the counters are read.
use probunet::memory::{empty_cache, install, stats, CpuAllocator};
use tch::{Kind, Tensor};

#[test]
fn freed_large_blocks_are_reused_and_released() {
    let limit = 64 << 20;
    assert_eq!(
        install(CpuAllocator::Caching { limit_bytes: limit }),
        CpuAllocator::Caching { limit_bytes: limit }
    );
    // 4 MiB of float32: a large block.
    let a = Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu));
    assert_eq!(a.sum(Kind::Float).double_value(&[]), (1 << 20) as f64);
    let before = stats();
    assert!(before.mapped_bytes >= 4 << 20, "{before:?}");
    drop(a);
    let freed = stats();
    assert!(freed.cached_bytes >= 4 << 20, "{freed:?}");
    // The same size again comes from the free list, and holds what is written to it.
    let b = Tensor::full([1 << 20], 3.0, (Kind::Float, tch::Device::Cpu));
    let after = stats();
    assert!(after.hits > freed.hits, "{after:?}");
    assert_eq!(b.sum(Kind::Float).double_value(&[]), 3.0 * (1 << 20) as f64);
    drop(b);
    empty_cache();
    assert_eq!(stats().cached_bytes, 0);
    // Small tensors and empty ones go through the same allocator.
    let small = Tensor::arange(10, (Kind::Int64, tch::Device::Cpu));
    assert_eq!(small.sum(Kind::Int64).int64_value(&[]), 45);
    let empty = Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
    assert_eq!(empty.numel(), 0);
}
