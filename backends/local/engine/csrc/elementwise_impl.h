// Torch-free bodies of the row kernels (RMSNorm, RoPE rotation, bf16-weight GEMV), written once over simd.h.
//
// T is float or sb::bf16. Rounding follows the torch path element for element: RMSNorm rounds the normalised
// row to T before the weight multiplies it, RoPE rounds each product and then their sum (no FMA: the library
// is built with -ffp-contract=off and these bodies call vmul/vsub, never vfma).
#pragma once

#include <type_traits>

#include "simd.h"

namespace sb {

// v rounded to T and widened back (an exact no-op for float).
template <typename T> inline vf round_to(vf v);
template <> inline vf round_to<float>(vf v) { return v; }
template <> inline vf round_to<bf16>(vf v) {
  bf16 tmp[W];
  vstore(tmp, v);
  return vload(tmp);
}

// y = w * T(x * rsqrt(mean(x^2) + eps)), one row of `dim`.
template <typename T>
inline void rms_norm_row(const T* x, const T* w, T* y, int64_t dim, float eps) {
  int64_t i = 0;
  vf acc = vzero();
  for (; i + W <= dim; i += W) {
    const vf v = vload(x + i);
    acc = vfma(v, v, acc);
  }
  float sum = vsum(acc);
  for (; i < dim; ++i) sum += widen(x[i]) * widen(x[i]);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
  const vf vinv = vset(inv);
  for (i = 0; i + W <= dim; i += W) vstore(y + i, vmul(vload(w + i), round_to<T>(vmul(vload(x + i), vinv))));
  for (; i < dim; ++i) {
    const float normed = widen(from_float<T>(widen(x[i]) * inv));
    y[i] = from_float<T>(widen(w[i]) * normed);
  }
}

// dst = rotate_half RoPE of src (head_dim = 2 * half): each product and the sum rounded to T, the sum then
// stored as D (a bf16 KV cache under float32 compute: the torch path's rotation in T, then `.to(D)`). D is T,
// or bf16 under float T, so one rounding of the float sum to D is both.
template <typename T, typename D = T>
inline void rope_rotate(const T* src, const T* c, const T* s, D* dst, int64_t half) {
  static_assert(std::is_same_v<T, D> || std::is_same_v<T, float>, "D is T, or T is float");
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    const vf x1 = vload(src + i), x2 = vload(src + i + half), ci = vload(c + i), si = vload(s + i);
    vstore(dst + i, vsub(round_to<T>(vmul(x1, ci)), round_to<T>(vmul(x2, si))));
    vstore(dst + i + half, vadd(round_to<T>(vmul(x2, ci)), round_to<T>(vmul(x1, si))));
  }
  for (; i < half; ++i) {
    const float x1 = widen(src[i]), x2 = widen(src[i + half]), ci = widen(c[i]), si = widen(s[i]);
    dst[i] = from_float<D>(widen(from_float<T>(x1 * ci)) - widen(from_float<T>(x2 * si)));
    dst[i + half] = from_float<D>(widen(from_float<T>(x2 * ci)) + widen(from_float<T>(x1 * si)));
  }
}

// dst = src, element by element, stored as D (the V rows of a cache whose dtype differs from the compute's).
template <typename T, typename D>
inline void convert_row(const T* src, D* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = from_float<D>(widen(src[i]));
}

// out[r][m] = x[m] . w[r] for R weight rows (bf16) and MC rows of x (T), float32 accumulation.
template <int R, int MC, typename T>
inline void gemv_block(const T* x, int64_t k, const bf16* w, float out[R][MC]) {
  vf acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = vzero();
  int64_t i = 0;
  for (; i + W <= k; i += W) {
    vf wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + r * k + i);
    for (int m = 0; m < MC; ++m) {
      const vf xv = vload(x + m * k + i);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(xv, wv[r], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) {
      float s = vsum(acc[r][m]);
      for (int64_t j = i; j < k; ++j) s += widen(x[m * k + j]) * widen(w[r * k + j]);
      out[r][m] = s;
    }
}

// y[m, row] for rows [begin, end) of an (N, K) bf16 weight and MC rows of x; y row stride n.
template <int MC, typename T>
inline void gemv_rows(const T* x, int64_t k, const bf16* w, const bf16* bias, T* y, int64_t n, int64_t begin,
                      int64_t end) {
  constexpr int R = (W >= 8 && MC <= 2) ? 4 : 2;  // keep R * MC accumulators within the register file
  float out[R][MC];
  int64_t row = begin;
  for (; row + R <= end; row += R) {
    gemv_block<R, MC>(x, k, w + row * k, out);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m)
        y[m * n + row + r] = from_float<T>(out[r][m] + (bias ? widen(bias[row + r]) : 0.f));
  }
  for (; row < end; ++row) {
    float one[1][MC];
    gemv_block<1, MC>(x, k, w + row * k, one);
    for (int m = 0; m < MC; ++m) y[m * n + row] = from_float<T>(one[0][m] + (bias ? widen(bias[row]) : 0.f));
  }
}

}  // namespace sb
