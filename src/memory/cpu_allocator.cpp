// libtorch's CPU allocator, replaced: large blocks are kept for reuse and backed by
// transparent huge pages.
//
// libtorch's default CPU allocator hands every tensor to glibc, which maps anything above
// its mmap threshold afresh and unmaps it on free. A training step allocates the same
// activation and gradient sizes every time, so each step pays for faulting in and zeroing
// every page of them again (a quarter of a batch-5 step's time on a 2-core VM, and half of
// prior sampling's). Here a freed large block goes to a free list keyed by its size class
// and the next request of that class takes it back, still mapped; new large blocks are
// aligned to 2 MiB and advised as huge pages, so the first touch costs one fault per
// 2 MiB instead of one per 4 KiB.
//
// Every block carries a 64-byte header that says how to free it, so the raw deleter
// (which oneDNN's scratchpad uses through `raw_allocate`) needs no lookup table.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace {

constexpr std::size_t kHeader = 64;
// Blocks from 64 KiB up are cached: glibc serves smaller ones from its heap, but between
// 64 KiB and its mmap threshold it grows and trims the heap's top every step, faulting the
// same pages in again (4,000-5,000 faults a batch-5 step before these were cached).
constexpr std::size_t kLarge = std::size_t{64} << 10;
// Size classes: 4 KiB steps below 1 MiB, 64 KiB steps above.
constexpr std::size_t kFineClass = std::size_t{4} << 10;
constexpr std::size_t kFineLimit = std::size_t{1} << 20;
constexpr std::size_t kClass = std::size_t{64} << 10;
constexpr std::size_t kHugePage = std::size_t{2} << 20;
constexpr std::uint64_t kMagic = 0x70726f62756e6574ULL;  // "probunet"

struct Header {
  std::uint64_t magic;
  // 0: a small block from posix_memalign; otherwise the size class of a mapped block,
  // which starts at the header and spans exactly that many bytes.
  std::size_t size_class;
};
static_assert(sizeof(Header) <= kHeader, "the header fits its slot");

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

struct Stats {
  std::atomic<std::uint64_t> hits{0};
  std::atomic<std::uint64_t> misses{0};
  std::atomic<std::uint64_t> mapped_bytes{0};
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  explicit CachingCpuAllocator(std::size_t limit) : limit_(limit) {}

  c10::DataPtr allocate(std::size_t n) override {
    void* data = n == 0 ? nullptr : (n < kLarge ? allocate_small(n) : allocate_large(n));
    return {data, data, &raw_delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &raw_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void raw_delete(void* data);

  void release(void* data);
  void empty_cache();

  Stats stats;
  std::atomic<std::uint64_t> cached_bytes{0};

 private:
  static void* with_header(void* block, std::size_t size_class) {
    auto* h = static_cast<Header*>(block);
    h->magic = kMagic;
    h->size_class = size_class;
    return static_cast<char*>(block) + kHeader;
  }

  static void* allocate_small(std::size_t n) {
    void* block = nullptr;
    if (posix_memalign(&block, kHeader, n + kHeader) != 0) {
      throw std::bad_alloc();
    }
    return with_header(block, 0);
  }

  void* allocate_large(std::size_t n) {
    const std::size_t size_class =
        round_up(n + kHeader, n + kHeader < kFineLimit ? kFineClass : kClass);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size_class);
      if (it != free_.end() && !it->second.empty()) {
        void* data = it->second.back();
        it->second.pop_back();
        cached_bytes -= size_class;
        stats.hits++;
        return data;
      }
    }
    stats.misses++;
    if (size_class < kHugePage) {
      // Too small to hold a huge page: map it as it is.
      void* base = map_anonymous(size_class);
      stats.mapped_bytes += size_class;
      return with_header(base, size_class);
    }
    // Over-map by a huge page so the block can start on a 2 MiB boundary, then give
    // the slack back.
    const std::size_t len = size_class + kHugePage;
    void* raw = map_anonymous(len);
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const auto aligned = round_up(start, kHugePage);
    if (aligned > start) {
      munmap(raw, aligned - start);
    }
    const std::size_t tail = start + len - (aligned + size_class);
    if (tail > 0) {
      munmap(reinterpret_cast<void*>(aligned + size_class), tail);
    }
    void* base = reinterpret_cast<void*>(aligned);
    madvise(base, size_class, MADV_HUGEPAGE);
    stats.mapped_bytes += size_class;
    return with_header(base, size_class);
  }

  // Maps `len` fresh bytes; when the kernel refuses, once more after handing the cache
  // back.
  void* map_anonymous(std::size_t len) {
    void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      empty_cache();
      raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (raw == MAP_FAILED) {
        throw std::bad_alloc();
      }
    }
    return raw;
  }

  std::size_t limit_;
  std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
};

CachingCpuAllocator* g_allocator = nullptr;

void unmap(Header* h) {
  g_allocator->stats.mapped_bytes -= h->size_class;
  munmap(h, h->size_class);
}

void CachingCpuAllocator::raw_delete(void* data) {
  if (data == nullptr) {
    return;
  }
  auto* h = reinterpret_cast<Header*>(static_cast<char*>(data) - kHeader);
  if (h->magic != kMagic) {
    std::abort();
  }
  if (h->size_class == 0) {
    std::free(h);
  } else {
    g_allocator->release(data);
  }
}

void CachingCpuAllocator::release(void* data) {
  auto* h = reinterpret_cast<Header*>(static_cast<char*>(data) - kHeader);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_bytes + h->size_class <= limit_) {
      free_[h->size_class].push_back(data);
      cached_bytes += h->size_class;
      return;
    }
  }
  unmap(h);
}

void CachingCpuAllocator::empty_cache() {
  std::vector<void*> blocks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : free_) {
      blocks.insert(blocks.end(), entry.second.begin(), entry.second.end());
      entry.second.clear();
    }
    cached_bytes = 0;
  }
  for (void* data : blocks) {
    unmap(reinterpret_cast<Header*>(static_cast<char*>(data) - kHeader));
  }
}

}  // namespace

extern "C" {

// Installs the allocator for every later CPU tensor (earlier ones keep their deleters).
// Idempotent; `limit_bytes` bounds the bytes kept in free lists.
void probunet_cpu_allocator_install(std::size_t limit_bytes) {
  static std::once_flag once;
  std::call_once(once, [limit_bytes] {
    // Never destroyed: tensors may be freed during static destruction at exit.
    g_allocator = new CachingCpuAllocator(limit_bytes);
    c10::SetCPUAllocator(g_allocator, /*priority=*/100);
  });
}

// Hands every cached block back to the kernel.
void probunet_cpu_allocator_empty_cache() {
  if (g_allocator != nullptr) {
    g_allocator->empty_cache();
  }
}

// hits, misses, bytes mapped (live and cached), bytes cached; zeros when not installed.
void probunet_cpu_allocator_stats(std::uint64_t out[4]) {
  if (g_allocator == nullptr) {
    for (int i = 0; i < 4; ++i) out[i] = 0;
    return;
  }
  out[0] = g_allocator->stats.hits;
  out[1] = g_allocator->stats.misses;
  out[2] = g_allocator->stats.mapped_bytes;
  out[3] = g_allocator->cached_bytes;
}

}  // extern "C"
