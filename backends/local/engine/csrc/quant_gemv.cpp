// Weight-only int4 / int8 linear layers for decode on CPU: y = x @ dequant(W).T for 1 to 32 rows of x.
//
// torch.ops.switchboard.int4_gemv(x, qweight, scales_zeros, group_size) -> y
//   x            (M, K) float32 or bfloat16, contiguous, K % group_size == 0, group_size % 32 == 0
//   qweight      (N, K/2) uint8: per row, blocks of 32 elements in 16 bytes (quant_impl.h)
//   scales_zeros (N, K/group_size, 2) bfloat16: weight = (q - 8) * scale + zero
// torch.ops.switchboard.int8_gemv(x, qweight, scales) -> y
//   qweight (N, K) int8, K % 32 == 0; scales (N,) bfloat16: weight = q * scale
// torch.ops.switchboard.q8_0_gemv(x, qweight, scales) -> y
//   qweight (N, K) int8, K % 32 == 0; scales (N, K/32) float32: weight = q * scale per 32-block (GGUF Q8_0)
// torch.ops.switchboard.int4_dequant(qweight, scales_zeros, group_size, dtype) -> (N, K) weight, for the GEMM
//   that takes larger row counts (prefill), where the weight is reused by every row.
// y is (M, N) in x's dtype. x is quantized per 32-block to int8 once per call (quant_impl.h); the weight is
// streamed once for all rows, split over torch's threads by output rows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <vector>

#include "quant_impl.h"

namespace {

using sb::bf16;
constexpr int64_t kMaxRows = 32;

template <typename T>
struct Acts {  // the call's quantized activations
  std::vector<int8_t> q;
  std::vector<float> d, s;
  sb::QuantActs view;
  Acts(const T* x, int64_t m_rows, int64_t k) : q(m_rows * k), d(m_rows * k / sb::QK), s(m_rows * k / sb::QK) {
    for (int64_t m = 0; m < m_rows; ++m)
      sb::quantize_row_q8(x + m * k, k, q.data() + m * k, d.data() + m * k / sb::QK, s.data() + m * k / sb::QK);
    view = {q.data(), d.data(), s.data(), k};
  }
};

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous (M, K) float32 or bfloat16 tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "takes 1 to ", kMaxRows, " rows of x, got ", x.size(0));
  TORCH_CHECK(k % sb::QK == 0, "K must be a multiple of 32, got ", k);
  TORCH_CHECK(x.device().is_cpu(), "runs on CPU");
}

// Call body(T*, y T*) with x and y as the kernel's element type.
template <typename Body>
at::Tensor with_types(const at::Tensor& x, int64_t n, Body&& body) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.scalar_type() == at::kFloat) {
    body(x.data_ptr<float>(), y.data_ptr<float>());
  } else {
    body(reinterpret_cast<const bf16*>(x.data_ptr<c10::BFloat16>()), reinterpret_cast<bf16*>(y.data_ptr<c10::BFloat16>()));
  }
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& sz, int64_t group) {
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  check_x(x, k);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "qweight must be contiguous uint8");
  TORCH_CHECK(group % sb::QK == 0 && k % group == 0, "group_size must be a multiple of 32 dividing K");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == n &&
                  sz.size(1) == k / group && sz.size(2) == 2,
              "scales_zeros must be a contiguous (N, K/group_size, 2) bfloat16 tensor");
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const bf16* sp = reinterpret_cast<const bf16*>(sz.data_ptr<c10::BFloat16>());
  return with_types(x, n, [&](const auto* xp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const Acts<T> acts(xp, x.size(0), k);
    // Grain 16 rows: a 576-wide layer's 16 rows are 4.6 KB of int4; the 3072-row gate/up splits evenly.
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      sb::by_row_chunks<T>(x.size(0), [&](auto mc, int64_t m0) {
        sb::int4_rows<decltype(mc)::value, T>(acts.view, m0, qp, sp, group, yp, n, begin, end);
      });
    });
  });
}

// int8_gemv and q8_0_gemv: int8 weights (N, K) scaled per row (bf16) or per 32-block (float32).
at::Tensor int8_weights(const at::Tensor& x, const at::Tensor& qweight, const bf16* row_scales,
                        const float* block_scales) {
  const int64_t n = qweight.size(0), k = qweight.size(1);
  const int8_t* qp = qweight.data_ptr<int8_t>();
  return with_types(x, n, [&](const auto* xp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const Acts<T> acts(xp, x.size(0), k);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      sb::by_row_chunks<T>(x.size(0), [&](auto mc, int64_t m0) {
        sb::int8_rows<decltype(mc)::value, T>(acts.view, m0, qp, row_scales, block_scales, yp, n, begin, end);
      });
    });
  });
}

void check_int8_weight(const at::Tensor& x, const at::Tensor& qweight) {
  check_x(x, qweight.size(1));
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "qweight must be contiguous int8");
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_int8_weight(x, qweight);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() == qweight.size(0),
              "scales must be a contiguous (N,) bfloat16 tensor");
  return int8_weights(x, qweight, reinterpret_cast<const bf16*>(scales.data_ptr<c10::BFloat16>()), nullptr);
}

at::Tensor q8_0_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_int8_weight(x, qweight);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == qweight.size(0) && scales.size(1) == qweight.size(1) / sb::QK,
              "scales must be a contiguous (N, K/32) float32 tensor");
  return int8_weights(x, qweight, nullptr, scales.data_ptr<float>());
}

at::Tensor int4_dequant(const at::Tensor& qweight, const at::Tensor& sz, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && sz.is_contiguous() &&
                  sz.scalar_type() == at::kBFloat16,
              "qweight must be contiguous uint8 and scales_zeros contiguous bfloat16");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2, groups = k / group;
  at::Tensor w = at::empty({n, k}, qweight.options().dtype(dtype));
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const bf16* sp = reinterpret_cast<const bf16*>(sz.data_ptr<c10::BFloat16>());
  auto fill = [&](auto* wp) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t b = 0; b < k / sb::QK; ++b) {
          const int64_t g = b * sb::QK / group;
          const float scale = sb::widen(sp[(row * groups + g) * 2]);
          const float offset = sb::widen(sp[(row * groups + g) * 2 + 1]) - 8.f * scale;
          sb::dequant_block(qp + row * (k / 2) + b * 16, scale, offset, wp + row * k + b * sb::QK);
        }
    });
  };
  if (dtype == at::kFloat) {
    fill(w.data_ptr<float>());
  } else {
    fill(reinterpret_cast<bf16*>(w.data_ptr<c10::BFloat16>()));
  }
  return w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales_zeros, int group_size) -> Tensor");
  m.impl("int4_gemv", c10::DispatchKey::CPU, TORCH_FN(int4_gemv));
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.impl("int8_gemv", c10::DispatchKey::CPU, TORCH_FN(int8_gemv));
  m.def("q8_0_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.impl("q8_0_gemv", c10::DispatchKey::CPU, TORCH_FN(q8_0_gemv));
  m.def("int4_dequant(Tensor qweight, Tensor scales_zeros, int group_size, ScalarType dtype) -> Tensor");
  m.impl("int4_dequant", c10::DispatchKey::CPU, TORCH_FN(int4_dequant));
}
