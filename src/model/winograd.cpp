// Winograd 3x3 convolutions inside autograd, for training on the CPU.
//
// The forward pass, the input's gradient (a convolution of the output's gradient with the
// filters transposed and turned half a circle) and the weight's gradient run probunet's
// Winograd kernels (src/model/winograd/); the bias's gradient is a sum over libtorch.
// Only libtorch can add a node to its autograd graph, so the node is made here.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

// The kernel (src/model/winograd.rs, handed over with each call so no link order matters):
// out = conv3x3(input) (+ bias), channels-last float32, with the filters `weight`
// [outputs, inputs, 3, 3], or with those of the input's gradient when `transposed` (then
// `weight` is [inputs, outputs, 3, 3]). 0 on success.
typedef int (*Kernel)(const float *input, int64_t n, int64_t h, int64_t w, int64_t inputs,
                      const float *weight, const float *bias, int64_t outputs, int transposed,
                      float *out);

// The weight's gradient (src/model/winograd/weight.rs): out [outputs, inputs, 3, 3] from
// channels-last float32 `input` [n, h, w, inputs] and `grad` [n, h, w, outputs]. 0 on
// success.
typedef int (*WeightKernel)(const float *input, const float *grad, int64_t n, int64_t h,
                            int64_t w, int64_t inputs, int64_t outputs, float *out);

namespace {

std::string &last_error() {
  thread_local std::string message;
  return message;
}

at::Tensor winograd(Kernel kernel, const at::Tensor &input, const at::Tensor &weight,
                    const at::Tensor &bias, bool transposed) {
  auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  auto filters = weight.contiguous();
  const int64_t outputs = transposed ? filters.size(1) : filters.size(0);
  auto out = at::empty({x.size(0), outputs, x.size(2), x.size(3)},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  const int rc = kernel(
      x.const_data_ptr<float>(), x.size(0), x.size(2), x.size(3), x.size(1),
      filters.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
      outputs, transposed ? 1 : 0, out.mutable_data_ptr<float>());
  TORCH_CHECK(rc == 0, "probunet's Winograd convolution refused a ", x.sizes(), " input");
  return out;
}

// The gradients of input, weight and bias (undefined where not wanted or without a bias).
torch::autograd::tensor_list gradients(torch::autograd::AutogradContext *ctx,
                                       const at::Tensor &grad_output, bool bias) {
  const auto saved = ctx->get_saved_variables();
  const auto &input = saved[0];
  const auto &weight = saved[1];
  const auto kernel = reinterpret_cast<Kernel>(ctx->saved_data["kernel"].toInt());
  auto grad = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_input, grad_weight, grad_bias;
  // needs_input_grad counts tensor arguments only.
  if (ctx->needs_input_grad(0)) {
    grad_input = winograd(kernel, grad, weight, at::Tensor(), true);
  }
  if (ctx->needs_input_grad(1)) {
    const auto weight_kernel =
        reinterpret_cast<WeightKernel>(ctx->saved_data["weight_kernel"].toInt());
    auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
    grad_weight = at::empty(weight.sizes(), weight.options());
    const int rc = weight_kernel(x.const_data_ptr<float>(), grad.const_data_ptr<float>(),
                                 x.size(0), x.size(2), x.size(3), x.size(1), grad.size(1),
                                 grad_weight.mutable_data_ptr<float>());
    TORCH_CHECK(rc == 0, "probunet's Winograd weight gradient refused a ", x.sizes(),
                " input");
  }
  if (bias && ctx->needs_input_grad(2)) {
    grad_bias = grad.sum({0, 2, 3});
  }
  return {grad_input, grad_weight, grad_bias};
}

// autograd takes no undefined tensor as an argument, so a convolution without a bias
// (the second half of a split one) is a node of its own kind.
struct WinogradConv : public torch::autograd::Function<WinogradConv> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, int64_t kernel,
                            int64_t weight_kernel, const at::Tensor &input,
                            const at::Tensor &weight, const at::Tensor &bias) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["weight_kernel"] = weight_kernel;
    return winograd(reinterpret_cast<Kernel>(kernel), input, weight, bias, false);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext *ctx,
                                               torch::autograd::tensor_list grads) {
    auto g = gradients(ctx, grads[0], true);
    // One per argument after ctx: none for the two kernels.
    return {at::Tensor(), at::Tensor(), g[0], g[1], g[2]};
  }
};

struct WinogradConvNoBias : public torch::autograd::Function<WinogradConvNoBias> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, int64_t kernel,
                            int64_t weight_kernel, const at::Tensor &input,
                            const at::Tensor &weight) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["weight_kernel"] = weight_kernel;
    return winograd(reinterpret_cast<Kernel>(kernel), input, weight, at::Tensor(), false);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext *ctx,
                                               torch::autograd::tensor_list grads) {
    auto g = gradients(ctx, grads[0], false);
    return {at::Tensor(), at::Tensor(), g[0], g[1]};
  }
};

} // namespace

// conv3x3(input, weight) + bias (bias may be null) by `kernel`, as an autograd node whose
// weight gradient `weight_kernel` computes; the result is a new tensor in *out. 0 on
// success.
extern "C" int probunet_winograd_autograd(Kernel kernel, WeightKernel weight_kernel,
                                          const at::Tensor *input, const at::Tensor *weight,
                                          const at::Tensor *bias, at::Tensor **out) {
  try {
    const auto k = reinterpret_cast<int64_t>(kernel);
    const auto wk = reinterpret_cast<int64_t>(weight_kernel);
    *out = new at::Tensor(bias != nullptr ? WinogradConv::apply(k, wk, *input, *weight, *bias)
                                          : WinogradConvNoBias::apply(k, wk, *input, *weight));
    return 0;
  } catch (const std::exception &e) {
    last_error() = e.what();
    return 1;
  }
}

// The message of this thread's last failed probunet_winograd_autograd, copied into `buffer`
// (`size` bytes, NUL-terminated, cut short if need be).
extern "C" void probunet_winograd_error(char *buffer, size_t size) {
  if (size == 0) {
    return;
  }
  const std::string &message = last_error();
  const size_t n = std::min(size - 1, message.size());
  std::memcpy(buffer, message.data(), n);
  buffer[n] = 0;
}
