// Autocast kernels of the MLP family (torchvision's csrc/ops/autocast pattern):
// under autocast, gelu_mlp runs in autocast's dtype, as nn.Linear does, its
// float32 weights cast through autocast's cache (once per autocast region).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace sit_ext::autocast {
namespace {

using at::Tensor;

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor, Tensor> gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                            const Tensor& w2, const std::optional<Tensor>& b2) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sit_ext::gelu_mlp", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const std::optional<Tensor>&)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  std::optional<Tensor> b2_cast;
  if (b2.has_value() && b2->defined()) b2_cast = cast(*b2);
  return op.call(cast(x), cast(w1), cast(b1), cast(w2), b2_cast);
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, AutocastCPU, m) { m.impl("gelu_mlp", &gelu_mlp<c10::DeviceType::CPU>); }

TORCH_LIBRARY_IMPL(sit_ext, AutocastCUDA, m) {
  m.impl("gelu_mlp", &gelu_mlp<c10::DeviceType::CUDA>);
}

}  // namespace sit_ext::autocast
