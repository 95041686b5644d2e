// libtorch's intra-op thread pool, lent to probunet's own CPU kernels.
//
// A kernel of ours that started threads of its own would compete for the cores with
// libtorch's OpenMP workers, which spin for a while after each parallel region; running
// it through at::parallel_for puts it on those very threads, as many as
// torch.set_num_threads allows.

#include <ATen/Parallel.h>

#include <cstdint>

extern "C" int probunet_parallel_for(int64_t n, void (*body)(void *, int64_t, int64_t),
                                     void *context) {
  try {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(context, begin, end); });
    return 0;
  } catch (...) {
    return 1;
  }
}

// Whether autograd records operations now (false inside tch::no_grad): probunet's own
// kernels record nothing, so they serve only where nothing is recorded.
#include <ATen/core/grad_mode.h>

extern "C" int probunet_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }
