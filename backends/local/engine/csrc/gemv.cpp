// bf16 matrix-vector products for decode on CPU: y = x @ W.T (+ bias) for a few rows of x.
//
// torch.ops.switchboard.bf16_gemv(x, weight, bias) -> y
//   x      (M, K) bfloat16, contiguous, M small (decode tokens; the caller sends larger M to the GEMM)
//   weight (N, K) bfloat16, contiguous (nn.Linear's own layout, no repacking)
//   bias   (N,) bfloat16 or None
//   y      (M, N) bfloat16: each element one float32 dot product over K, rounded once
//
// A 135M model's decode step is ~270 MB of bf16 weights read once; oneDNN's GEMM path for M = 1 reached about
// half the machine's read bandwidth here. This streams each weight row once for all M rows of x, with
// AVX512-BF16 dot products (vdpbf16ps: pairs of bf16 products summed into float32 lanes), 4 rows at a time,
// split over torch's threads by output rows. Without AVX512-BF16 the same loop widens bf16 to float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // rows of x per call; more go to the GEMM

inline float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint16_t narrow(float f) { return c10::BFloat16(f).x; }  // round to nearest even

#if defined(__AVX512BF16__)
// acc[m][r] += x[m] . w[r] over 32-element chunks, for R weight rows at once.
template <int R>
inline void rows_dot(const uint16_t* x, int64_t m_rows, int64_t k, const uint16_t* w, int64_t k_stride,
                     float out[][kMaxRows]) {
  __m512 acc[R][kMaxRows];
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < m_rows; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * k_stride + i);
    for (int64_t m = 0; m < m_rows; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k + i);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t m = 0; m < m_rows; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = i; j < k; ++j) s += widen(x[m * k + j]) * widen(w[r * k_stride + j]);
      out[r][m] = s;
    }
  }
}
#endif

inline void row_dot_scalar(const uint16_t* x, int64_t m_rows, int64_t k, const uint16_t* w, float* out) {
  for (int64_t m = 0; m < m_rows; ++m) {
    float s = 0.f;
    for (int64_t j = 0; j < k; ++j) s += widen(x[m * k + j]) * widen(w[j]);
    out[m] = s;
  }
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be a contiguous (M, K) bfloat16 tensor");
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
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
  const uint16_t* bp = has_bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr<c10::BFloat16>()) : nullptr;
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());

  // Grain: 64 rows (~74 KB of a 576-wide matrix) so small layers stay on one thread.
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    float out[4][kMaxRows];
    int64_t row = begin;
#if defined(__AVX512BF16__)
    for (; row + 4 <= end; row += 4) {
      rows_dot<4>(xp, m_rows, k, wp + row * k, k, out);
      for (int r = 0; r < 4; ++r)
        for (int64_t m = 0; m < m_rows; ++m)
          yp[m * n + row + r] = narrow(out[r][m] + (bp ? widen(bp[row + r]) : 0.f));
    }
    for (; row < end; ++row) {
      rows_dot<1>(xp, m_rows, k, wp + row * k, k, out);
      for (int64_t m = 0; m < m_rows; ++m) yp[m * n + row] = narrow(out[0][m] + (bp ? widen(bp[row]) : 0.f));
    }
#else
    for (; row < end; ++row) {
      row_dot_scalar(xp, m_rows, k, wp + row * k, out[0]);
      for (int64_t m = 0; m < m_rows; ++m) yp[m * n + row] = narrow(out[0][m] + (bp ? widen(bp[row]) : 0.f));
    }
#endif
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("bf16_gemv", c10::DispatchKey::CPU, TORCH_FN(bf16_gemv));
}
