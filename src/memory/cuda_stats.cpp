// Peak CUDA memory as libtorch's caching allocator counts it (what PyTorch reports as
// torch.cuda.max_memory_allocated), reached through c10's device-allocator interface so
// that no CUDA header is needed. tch exposes none of this.

#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>
#include <exception>

namespace {

c10::DeviceAllocator* cuda_allocator() {
  return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

// Writes the peak bytes allocated on `device` since the last reset; 0 on success, -1 where
// libtorch cannot say (no CUDA device, no CUDA allocator).
int probunet_cuda_peak_allocated(int device, std::int64_t* out) {
  try {
    auto* allocator = cuda_allocator();
    if (!allocator->initialized()) {
      return -1;
    }
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *out = stats.allocated_bytes[static_cast<std::size_t>(
                                     c10::CachingAllocator::StatType::AGGREGATE)]
               .peak;
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// Starts a new peak on `device`; 0 on success, -1 where libtorch cannot.
int probunet_cuda_reset_peak(int device) {
  try {
    auto* allocator = cuda_allocator();
    if (!allocator->initialized()) {
      return -1;
    }
    allocator->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

}  // extern "C"
