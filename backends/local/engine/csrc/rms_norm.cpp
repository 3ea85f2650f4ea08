// RMSNorm as transformers' Llama computes it, in one call: weight * to_dtype(x * rsqrt(mean(x^2) + eps)).
//
// torch.ops.switchboard.rms_norm(x, weight, eps) -> y
//   x      (T, D) float32 or bfloat16, contiguous
//   weight (D,) same dtype
//   y      (T, D) x's dtype
// The normalisation runs in float32 and is rounded to x's dtype before the weight multiplies it, and the
// product is rounded again: the same two roundings as transformers' bf16 path (exact no-ops in float32).
// A decode step calls this 61 times for SmolLM2; torch's composite path dispatched ~8 ops per call.
// The row body is elementwise_impl.h's, vectorised for the ISA the build targets.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "elementwise_impl.h"

namespace {

template <typename T>
void run(const T* x, const T* w, T* y, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) sb::rms_norm_row(x + r * dim, w, y + r * dim, dim, eps);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (T, D) tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "weight must be a contiguous (D,) tensor");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm runs on CPU");
  at::Tensor y = at::empty_like(x);
  const float feps = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    run<float>(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), feps);
  } else if (x.scalar_type() == at::kBFloat16) {
    using sb::bf16;
    run<bf16>(reinterpret_cast<const bf16*>(x.data_ptr<c10::BFloat16>()),
              reinterpret_cast<const bf16*>(weight.data_ptr<c10::BFloat16>()),
              reinterpret_cast<bf16*>(y.data_ptr<c10::BFloat16>()), x.size(0), x.size(1), feps);
  } else {
    TORCH_CHECK(false, "rms_norm supports float32 and bfloat16, not ", x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
}
