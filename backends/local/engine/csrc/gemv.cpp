// Matrix-vector products over bf16 weights for decode on CPU: y = x @ W.T (+ bias) for a few rows of x.
//
// torch.ops.switchboard.bf16_gemv(x, weight, bias) -> y
//   x      (M, K) bfloat16 or float32, contiguous, 1 <= M <= 8 (decode tokens; larger M goes to the GEMM)
//   weight (N, K) bfloat16, contiguous (nn.Linear's own layout, no repacking)
//   bias   (N,) bfloat16 or None
//   y      (M, N) x's dtype: each element one float32 dot product over K, rounded once
//
// A decode step streams every weight once; this reads each weight row once for all M rows of x, several rows
// at a time, split over torch's threads by output rows. float32 x over bf16 weights is the compute mode for
// CPUs without native bf16 arithmetic: bf16 storage halves the bytes, widening is a shift in registers
// (elementwise_impl.h, any ISA). With AVX512-BF16 and bf16 x, `vdpbf16ps` does pairs of products at once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <string>

#include "elementwise_impl.h"

namespace {

using sb::bf16;
constexpr int64_t kMaxRows = 8;

#if defined(__AVX512BF16__) && defined(SB_AVX512)
template <int R>
inline void rows_dot_bf16(const bf16* x, int64_t m_rows, int64_t k, const bf16* w, float out[][kMaxRows]) {
  __m512 acc[R][kMaxRows];
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < m_rows; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * k + i);
    for (int64_t m = 0; m < m_rows; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k + i);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < m_rows; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = i; j < k; ++j) s += sb::widen(x[m * k + j]) * sb::widen(w[r * k + j]);
      out[r][m] = s;
    }
}

void native_bf16(const bf16* x, int64_t m_rows, int64_t k, const bf16* w, const bf16* bias, bf16* y, int64_t n,
                 int64_t begin, int64_t end) {
  float out[4][kMaxRows];
  auto emit = [&](int64_t row, int rows) {
    for (int r = 0; r < rows; ++r)
      for (int64_t m = 0; m < m_rows; ++m)
        y[m * n + row + r] = sb::from_float<bf16>(out[r][m] + (bias ? sb::widen(bias[row + r]) : 0.f));
  };
  int64_t row = begin;
  for (; row + 4 <= end; row += 4) rows_dot_bf16<4>(x, m_rows, k, w + row * k, out), emit(row, 4);
  for (; row < end; ++row) rows_dot_bf16<1>(x, m_rows, k, w + row * k, out), emit(row, 1);
}
#endif

template <typename T>
void run(const T* x, int64_t m_rows, int64_t k, const bf16* w, const bf16* bias, T* y, int64_t n) {
  // Grain: 64 rows (~74 KB of a 576-wide matrix) so small layers stay on one thread.
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
#if defined(__AVX512BF16__) && defined(SB_AVX512)
    if constexpr (std::is_same_v<T, bf16>) {
      native_bf16(x, m_rows, k, w, bias, y, n, begin, end);
      return;
    }
#endif
    int64_t m0 = 0;
    for (; m0 + 2 <= m_rows; m0 += 2) sb::gemv_rows<2>(x + m0 * k, k, w, bias, y + m0 * n, n, begin, end);
    if (m0 < m_rows) sb::gemv_rows<1>(x + m0 * k, k, w, bias, y + m0 * n, n, begin, end);
  });
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be a contiguous (M, K) bfloat16 or float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kBFloat16,
              "weight must be a contiguous (N, K) bfloat16 tensor");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " columns, weight ", weight.size(1));
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "bf16_gemv takes 1 to ", kMaxRows, " rows of x");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "bf16_gemv runs on CPU");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == at::kBFloat16,
                "bias must be a contiguous (N,) bfloat16 tensor");
  }
  const int64_t m_rows = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor y = at::empty({m_rows, n}, x.options());
  const bf16* wp = reinterpret_cast<const bf16*>(weight.data_ptr<c10::BFloat16>());
  const bf16* bp = has_bias ? reinterpret_cast<const bf16*>(bias->data_ptr<c10::BFloat16>()) : nullptr;
  if (x.scalar_type() == at::kFloat) {
    run<float>(x.data_ptr<float>(), m_rows, k, wp, bp, y.data_ptr<float>(), n);
  } else {
    run<bf16>(reinterpret_cast<const bf16*>(x.data_ptr<c10::BFloat16>()), m_rows, k, wp, bp,
              reinterpret_cast<bf16*>(y.data_ptr<c10::BFloat16>()), n);
  }
  return y;
}

std::string kernel_isa() { return sb::isa_name(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("bf16_gemv", c10::DispatchKey::CPU, TORCH_FN(bf16_gemv));
  m.def("kernel_isa() -> str", &kernel_isa);
}
