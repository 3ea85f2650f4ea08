// Torch-free bodies of the weight-only int4 / int8 matrix-vector kernels for decode (1 to 32 rows of x).
//
// Activations are quantized per block of 32 to int8 (scale d = max|x| / 127, and s = d * sum(q) kept for the
// int4 zero point), and each block's dot product is done in integers, as llama.cpp pairs its 4-bit blocks
// with 8-bit activation blocks: x86 `maddubs`+`madd` (AVX2) or `vpdpbusd` (AVX512-VNNI), NEON `sdot` or
// widening multiplies, plain C++ as the reference. Every variant computes the same integer sums, so they
// differ only by float32 summation order.
//   int4 block: 16 bytes; byte j holds element j (low nibble) and element j + 16 (high nibble), values 0..15,
//               weight = (q - 8) * scale + zero per group (scale/zero bf16, (N, K/group, 2)), group % 32 == 0.
//   int8 row:   K int8 in [-127, 127] and one bf16 scale per output row.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace sb {

constexpr int64_t QK = 32;  // activation block

#if defined(SB_AVX512) || defined(SB_AVX2)
using facc = __m256;
inline facc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(facc v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256i dot_u8s8(__m256i u, __m256i s) {  // 8 int32 sums of 4 products each
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
struct Q4 {
  __m256i q;  // 32 unsigned nibbles in element order
};
inline Q4 load_q4(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return {_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m), _mm_and_si128(raw, m))};
}
inline facc acc_q4(facc acc, const Q4& w, const int8_t* x, float scale) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w.q, xv)), _mm256_set1_ps(scale), acc);
}
struct Q8 {
  __m256i magnitude, sign;  // |w| (unsigned operand) and w (its signs move onto x)
};
inline Q8 load_q8(const int8_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_abs_epi8(w), w};
}
inline facc acc_q8(facc acc, const Q8& w, const int8_t* x, float scale) {
  const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), w.sign);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w.magnitude, xv)), _mm256_set1_ps(scale), acc);
}
#elif defined(SB_NEON)
using facc = float32x4_t;
inline facc acc_zero() { return vdupq_n_f32(0.f); }
inline float acc_sum(facc v) { return vaddvq_f32(v); }
inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, a, b);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
  const int16x8_t hi = vmull_high_s8(a, b);
  return vaddq_s32(acc, vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}
struct Q4 {
  int8x16_t lo, hi;
};
inline Q4 load_q4(const uint8_t* p) {
  const uint8x16_t raw = vld1q_u8(p);
  return {vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(raw, 4))};
}
inline facc acc_q4(facc acc, const Q4& w, const int8_t* x, float scale) {
  const int32x4_t d = dot16(dot16(vdupq_n_s32(0), w.lo, vld1q_s8(x)), w.hi, vld1q_s8(x + 16));
  return vfmaq_f32(acc, vcvtq_f32_s32(d), vdupq_n_f32(scale));
}
struct Q8 {
  int8x16_t lo, hi;
};
inline Q8 load_q8(const int8_t* p) { return {vld1q_s8(p), vld1q_s8(p + 16)}; }
inline facc acc_q8(facc acc, const Q8& w, const int8_t* x, float scale) {
  const int32x4_t d = dot16(dot16(vdupq_n_s32(0), w.lo, vld1q_s8(x)), w.hi, vld1q_s8(x + 16));
  return vfmaq_f32(acc, vcvtq_f32_s32(d), vdupq_n_f32(scale));
}
#else
using facc = float;
inline facc acc_zero() { return 0.f; }
inline float acc_sum(facc v) { return v; }
struct Q4 {
  uint8_t q[QK];
};
inline Q4 load_q4(const uint8_t* p) {
  Q4 w;
  for (int j = 0; j < 16; ++j) {
    w.q[j] = p[j] & 0x0F;
    w.q[j + 16] = p[j] >> 4;
  }
  return w;
}
inline facc acc_q4(facc acc, const Q4& w, const int8_t* x, float scale) {
  int32_t d = 0;
  for (int j = 0; j < QK; ++j) d += static_cast<int32_t>(w.q[j]) * x[j];
  return acc + static_cast<float>(d) * scale;
}
struct Q8 {
  const int8_t* w;
};
inline Q8 load_q8(const int8_t* p) { return {p}; }
inline facc acc_q8(facc acc, const Q8& w, const int8_t* x, float scale) {
  int32_t d = 0;
  for (int j = 0; j < QK; ++j) d += static_cast<int32_t>(w.w[j]) * x[j];
  return acc + static_cast<float>(d) * scale;
}
#endif

// One row of x (K, K % 32 == 0) -> q (K) int8, d and s (K/32): x ~= q * d per block, s = d * sum(q).
// x86 does it in vectors (a 32-row call of a 1536-wide layer spent ~45 us here, serially, in the scalar
// loop: ~3 ms of a 32-row decode step); the same operations per element, so q, d and s are the same bits.
#if defined(SB_AVX512) || defined(SB_AVX2)
#if defined(SB_AVX512)
inline vf vabs(vf v) { return _mm512_abs_ps(v); }
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
// 32 integral floats in [-127, 127] (2 vectors) -> 32 int8 at q; returns their sum.
inline int32_t store_q8(const vf* r, int8_t* q) {
  const __m512i a = _mm512_cvtps_epi32(r[0]), b = _mm512_cvtps_epi32(r[1]);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(a));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(b));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}
#else
inline vf vabs(vf v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline float vhmax(vf v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
// 32 integral floats in [-127, 127] (4 vectors) -> 32 int8 at q; returns their sum. The packs work within
// 128-bit lanes, so the 4-byte groups come out in the order 0 2 4 6 1 3 5 7 and one permute restores it.
inline int32_t store_q8(const vf* r, int8_t* q) {
  const __m256i i0 = _mm256_cvtps_epi32(r[0]), i1 = _mm256_cvtps_epi32(r[1]);
  const __m256i i2 = _mm256_cvtps_epi32(r[2]), i3 = _mm256_cvtps_epi32(r[3]);
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}
#endif
#endif

template <typename T>
inline void quantize_row_q8(const T* x, int64_t k, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const T* xb = x + b * QK;
#if defined(SB_AVX512) || defined(SB_AVX2)
    vf v[QK / W];
    vf top = vzero();
    for (int j = 0; j < QK / W; ++j) {
      v[j] = vload(xb + j * W);
      top = vmax(vabs(v[j]), top);  // a NaN |x| keeps the maximum so far, as std::max(amax, NaN) does
    }
    const float amax = vhmax(top);
#else
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(widen(xb[j])));
#endif
    const float scale = amax / 127.f;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
#if defined(SB_AVX512) || defined(SB_AVX2)
    vf r[QK / W];
    for (int j = 0; j < QK / W; ++j) r[j] = vround(vmul(v[j], vset(inv)));
    sum = store_q8(r, q + b * QK);
#else
    for (int j = 0; j < QK; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(widen(xb[j]) * inv));
      q[b * QK + j] = static_cast<int8_t>(v);
      sum += v;
    }
#endif
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
}

struct QuantActs {  // M rows of quantized activations
  const int8_t* q;   // (M, K)
  const float* d;    // (M, K/32)
  const float* s;    // (M, K/32)
  int64_t k;
};

#if defined(SB_AVX512) || defined(SB_AVX2)
// Group 32 on x86, eight blocks at a time: their (scale, zero) pairs widen in one load and the per-block
// scale products are one vector, so the block loop is integer dots and FMAs with no scalar work.
// Returns the first block it did not do.
template <int MC>
inline int64_t int4_g32_x86(const QuantActs& a, int64_t m0, const uint8_t* wrow, const bf16* srow, facc acc[MC],
                            facc zacc[MC]) {
  const int64_t k = a.k, blocks = k / QK;
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(srow + 2 * b));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF0000u)));
    const __m256 offset = _mm256_sub_ps(zero, _mm256_mul_ps(_mm256_set1_ps(8.f), scale));
    __m256 cs[MC];
    for (int m = 0; m < MC; ++m) {
      const int64_t xm = (m0 + m) * blocks + b;
      cs[m] = _mm256_mul_ps(scale, _mm256_loadu_ps(a.d + xm));
      zacc[m] = _mm256_fmadd_ps(offset, _mm256_loadu_ps(a.s + xm), zacc[m]);
    }
    for (int j = 0; j < 8; ++j) {
      const Q4 w = load_q4(wrow + (b + j) * (QK / 2));
      const __m256i lane = _mm256_set1_epi32(j);
      for (int m = 0; m < MC; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + (m0 + m) * k + (b + j) * QK));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w.q, xv)), _mm256_permutevar8x32_ps(cs[m], lane), acc[m]);
      }
    }
  }
  return b;
}
#endif

// Dispatch M rows in register-sized chunks of up to 4 (8, tried for the tiled kernels with AVX-512's 32
// registers, was slower: docs/ENGINE.md).
template <typename T, typename Rows>
inline void by_row_chunks(int64_t m_rows, Rows&& rows) {
  int64_t m0 = 0;
  for (; m0 + 4 <= m_rows; m0 += 4) rows(std::integral_constant<int, 4>{}, m0);
  switch (m_rows - m0) {
    case 3: rows(std::integral_constant<int, 3>{}, m0); break;
    case 2: rows(std::integral_constant<int, 2>{}, m0); break;
    case 1: rows(std::integral_constant<int, 1>{}, m0); break;
    default: break;
  }
}

// Tiled int4 (x86): TILE = W weight rows at a time, one per int32 lane of a vector. `int4_tile_pack` lays the
// rows out so that a block's values of all TILE rows are 4 vectors: per 32-block b, word j (0..3) of the tile
// holds bytes 4j..4j+3 of each row's block (values 4j.. in the low nibbles, 16+4j.. in the high ones), row r in
// lane r. Each row of x meets them with its 4-byte groups broadcast, so one integer dot instruction serves TILE
// weight rows, and a block costs one conversion and two FMAs per row of x for all of them (the row layout pays
// a conversion, a permute and an FMA per weight row and block). Scales tiled alike: (N/TILE, G, 2, TILE) bf16.
#if defined(SB_AVX512) || defined(SB_AVX2)
constexpr int64_t TILE = W;
#if defined(SB_AVX512)
using vi = __m512i;
inline vi iload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline vi inibbles(vi raw, int shift) { return _mm512_and_si512(_mm512_srli_epi16(raw, shift), _mm512_set1_epi8(0x0F)); }
inline vi ibcast(int32_t v) { return _mm512_set1_epi32(v); }
inline vf itof(vi v) { return _mm512_cvtepi32_ps(v); }
inline vi izero() { return _mm512_setzero_si512(); }
inline vi iadd32(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vi iadd16(vi a, vi b) { return _mm512_add_epi16(a, b); }
inline vi imaddubs(vi u, vi s) { return _mm512_maddubs_epi16(u, s); }
inline vi ipairs(vi t) { return _mm512_madd_epi16(t, _mm512_set1_epi16(1)); }
#if defined(__AVX512VNNI__)
#define SB_TILE_VNNI 1
inline vi idot(vi acc, vi u, vi s) { return _mm512_dpbusd_epi32(acc, u, s); }
#endif
#else
using vi = __m256i;
inline vi iload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi inibbles(vi raw, int shift) { return _mm256_and_si256(_mm256_srli_epi16(raw, shift), _mm256_set1_epi8(0x0F)); }
inline vi ibcast(int32_t v) { return _mm256_set1_epi32(v); }
inline vf itof(vi v) { return _mm256_cvtepi32_ps(v); }
inline vi izero() { return _mm256_setzero_si256(); }
inline vi iadd32(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi iadd16(vi a, vi b) { return _mm256_add_epi16(a, b); }
inline vi imaddubs(vi u, vi s) { return _mm256_maddubs_epi16(u, s); }
inline vi ipairs(vi t) { return _mm256_madd_epi16(t, _mm256_set1_epi16(1)); }
#endif

inline vi bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return ibcast(v);
}

// One block of a tile (w: 8 vectors of 4 bytes a row, for bytes 0..15 then 16..31 of the block: int4's low
// and high nibbles, or Q8_0's words in order) against 32 int8 values of x: the TILE rows' integer dot
// products, lane r for row r. Without VNNI the int16 sums hold only for int4's values (0..15).
inline vi tile_dot(const vi* w, const int8_t* x) {
#if defined(SB_TILE_VNNI)
  vi lo = idot(izero(), w[0], bcast4(x)), hi = idot(izero(), w[4], bcast4(x + 16));
  for (int j = 1; j < 4; ++j) {
    lo = idot(lo, w[j], bcast4(x + 4 * j));
    hi = idot(hi, w[4 + j], bcast4(x + 16 + 4 * j));
  }
  return iadd32(lo, hi);
#else
  // int16 pair sums: each |q x + q' x'| <= 2 * 15 * 127, so eight of them fit (30480 < 32767).
  vi t = imaddubs(w[0], bcast4(x));
  for (int j = 1; j < 8; ++j) t = iadd16(t, imaddubs(w[j], bcast4(x + 4 * (j % 4) + 16 * (j / 4))));
  return ipairs(t);
#endif
}

// An int4 tile's block b as tile_dot takes it (w: 8 vectors), with its scale and offset (weight = q * scale +
// offset).
inline void int4_block(const uint8_t* wt, const bf16* st, int64_t per_group, int64_t b, vi* w, vf& scale,
                       vf& offset) {
  const bf16* sg = st + (b / per_group) * 2 * TILE;
  scale = vload(sg);
  offset = vsub(vload(sg + TILE), vmul(vset(8.f), scale));
  for (int j = 0; j < 4; ++j) {
    const vi raw = iload(wt + (b * 4 + j) * TILE * 4);
    w[j] = inibbles(raw, 0);
    w[4 + j] = inibbles(raw, 4);
  }
}

struct Int4Block {  // int4_block's outputs, kept (int4_tile's buffer)
  vi w[8];
  vf scale, offset;
};

// y[m, row0 .. row0 + TILE) for MC rows of x from m0; wt and st: the tile's bytes and scales, or with Ready,
// `ready`: its blocks already unpacked (int4_tile).
template <int MC, bool Ready, typename T>
inline void int4_chunk(const QuantActs& a, int64_t m0, const uint8_t* wt, const bf16* st, int64_t per_group,
                       const Int4Block* ready, T* y, int64_t n, int64_t row0) {
  const int64_t k = a.k, blocks = k / QK;
  vf acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = vzero();
  for (int64_t b = 0; b < blocks; ++b) {
    vi w_[8];
    vf scale_, offset_;
    if constexpr (!Ready) int4_block(wt, st, per_group, b, w_, scale_, offset_);
    const vi* w = Ready ? ready[b].w : w_;
    const vf scale = Ready ? ready[b].scale : scale_, offset = Ready ? ready[b].offset : offset_;
    for (int m = 0; m < MC; ++m) {
      const int64_t xm = (m0 + m) * blocks + b;
      const vf dot = itof(tile_dot(w, a.q + (m0 + m) * k + b * QK));
      acc[m] = vfma(dot, vmul(scale, vset(a.d[xm])), acc[m]);
      acc[m] = vfma(offset, vset(a.s[xm]), acc[m]);
    }
  }
  for (int m = 0; m < MC; ++m) vstore(y + (m0 + m) * n + row0, acc[m]);
}

// int4_tile's rows when there are more than 4 (more than one chunk): the tile's blocks are unpacked once,
// into a per-thread buffer every chunk reads (a 32-row call unpacked each block 8 times). Its own function:
// inlined into int4_tile, it made the one-row path a quarter slower (AVX-512, 1.2 -> 1.5 ms for the model's
// int4 layers).
template <typename T>
__attribute__((noinline)) void int4_tile_reused(const QuantActs& a, int64_t m_rows, const uint8_t* wt,
                                                const bf16* st, int64_t per_group, T* y, int64_t n, int64_t row0) {
  thread_local std::vector<Int4Block> ready;
  ready.resize(a.k / QK);
  for (int64_t b = 0; b < a.k / QK; ++b) int4_block(wt, st, per_group, b, ready[b].w, ready[b].scale, ready[b].offset);
  by_row_chunks<T>(m_rows, [&](auto mc, int64_t m0) {
    int4_chunk<decltype(mc)::value, true>(a, m0, wt, st, per_group, ready.data(), y, n, row0);
  });
}

// One tile against all m_rows rows of x, in chunks of up to 4 rows. Each row of x meets the same values in
// the same order on either path: results do not depend on the batch.
template <typename T>
inline void int4_tile(const QuantActs& a, int64_t m_rows, const uint8_t* wt, const bf16* st, int64_t per_group,
                      T* y, int64_t n, int64_t row0) {
  if (m_rows > 8) return int4_tile_reused(a, m_rows, wt, st, per_group, y, n, row0);
  by_row_chunks<T>(m_rows, [&](auto mc, int64_t m0) {
    int4_chunk<decltype(mc)::value, false>(a, m0, wt, st, per_group, nullptr, y, n, row0);
  });
}
#else
constexpr int64_t TILE = 0;  // the row layout only
#endif

// Tiled Q8_0 (GGUF's int8 blocks with a float32 scale each), for the tied lm_head: per 32-block b, word j
// (0..7) of the tile holds bytes 4j..4j+3 of each row's block, row r in lane r, stored as w ^ 0x80 (w + 128,
// unsigned); scales (N/TILE, K/32, TILE) float32. With VNNI the unsigned weights meet x's signed bytes in one
// instruction and the +128 comes off with x's block sum (QuantActs::s), as int4's -8 does; without it the
// weight's sign moves onto x (AVX2's maddubs takes one unsigned operand) and the products are exact.
#if defined(SB_TILE_VNNI) || defined(SB_AVX2)
constexpr int64_t Q8_TILE = TILE;

template <int MC, typename T>
inline void q8_0_chunk(const QuantActs& a, int64_t m0, const uint8_t* wt, const float* st, T* y, int64_t n,
                       int64_t row0) {
  const int64_t k = a.k, blocks = k / QK;
  vf acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = vzero();
  for (int64_t b = 0; b < blocks; ++b) {
    const vf scale = vload(st + b * TILE);
    vi w[8];
    for (int j = 0; j < 8; ++j) w[j] = iload(wt + (b * 8 + j) * TILE * 4);
#if defined(SB_TILE_VNNI)
    const vf offset = vmul(vset(-128.f), scale);
    for (int m = 0; m < MC; ++m) {
      const int64_t xm = (m0 + m) * blocks + b;
      acc[m] = vfma(itof(tile_dot(w, a.q + (m0 + m) * k + b * QK)), vmul(scale, vset(a.d[xm])), acc[m]);
      acc[m] = vfma(offset, vset(a.s[xm]), acc[m]);
    }
#else
    vi mag[8];
    for (int j = 0; j < 8; ++j) {
      w[j] = _mm256_xor_si256(w[j], _mm256_set1_epi8(static_cast<char>(0x80)));  // back to signed
      mag[j] = _mm256_abs_epi8(w[j]);
    }
    for (int m = 0; m < MC; ++m) {
      const int64_t xm = (m0 + m) * blocks + b;
      const int8_t* x = a.q + (m0 + m) * k + b * QK;
      vi sum = izero();
      for (int j = 0; j < 8; ++j)  // |w| * (x with w's sign): each int16 pair sum <= 2 * 127 * 127
        sum = iadd32(sum, ipairs(imaddubs(mag[j], _mm256_sign_epi8(bcast4(x + 4 * j), w[j]))));
      acc[m] = vfma(itof(sum), vmul(scale, vset(a.d[xm])), acc[m]);
    }
#endif
  }
  for (int m = 0; m < MC; ++m) vstore(y + (m0 + m) * n + row0, acc[m]);
}

// One tile against all m_rows rows of x, in chunks of up to 4 rows. Unlike int4's, the blocks are prepared
// again per chunk: reading them back from a buffer was slower than the xor and abs (docs/ENGINE.md).
template <typename T>
inline void q8_0_tile(const QuantActs& a, int64_t m_rows, const uint8_t* wt, const float* st, T* y, int64_t n,
                      int64_t row0) {
  by_row_chunks<T>(m_rows, [&](auto mc, int64_t m0) { q8_0_chunk<decltype(mc)::value>(a, m0, wt, st, y, n, row0); });
}
#else
constexpr int64_t Q8_TILE = 0;
#endif

// y[m, row] = x[m] . dequant(W[row]) for rows [begin, end) and MC rows of x starting at m0; y row stride n.
// Two blocks per iteration into separate accumulators: one chain of dependent FMAs per block would bound the
// loop by the FMA latency, not by the weight stream.
template <int MC, typename T>
inline void int4_rows(const QuantActs& a, int64_t m0, const uint8_t* qw, const bf16* sz, int64_t group,
                      T* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t k = a.k, blocks = k / QK, per_group = group / QK;
  for (int64_t row = begin; row < end; ++row) {
    const uint8_t* wrow = qw + row * (k / 2);
    const bf16* srow = sz + row * (k / group) * 2;
    facc acc[2][MC];
    float zero_sum[2][MC];
    for (int m = 0; m < MC; ++m) acc[0][m] = acc[1][m] = acc_zero(), zero_sum[0][m] = zero_sum[1][m] = 0.f;
    auto step = [&](int lane, int64_t b) {
      const int64_t g = b / per_group;
      const float scale = widen(srow[2 * g]);
      const float offset = widen(srow[2 * g + 1]) - 8.f * scale;  // weight = q * scale + offset
      const Q4 w = load_q4(wrow + b * (QK / 2));
      for (int m = 0; m < MC; ++m) {
        const int64_t xm = (m0 + m) * blocks + b;
        acc[lane][m] = acc_q4(acc[lane][m], w, a.q + (m0 + m) * k + b * QK, scale * a.d[xm]);
        zero_sum[lane][m] += offset * a.s[xm];
      }
    };
    int64_t b = 0;
#if defined(SB_AVX512) || defined(SB_AVX2)
    if (group == QK) {
      facc zacc[MC];
      for (int m = 0; m < MC; ++m) zacc[m] = acc_zero();
      b = int4_g32_x86<MC>(a, m0, wrow, srow, acc[0], zacc);
      for (int m = 0; m < MC; ++m) zero_sum[1][m] = acc_sum(zacc[m]);
    }
#endif
    for (; b + 2 <= blocks; b += 2) step(0, b), step(1, b + 1);
    if (b < blocks) step(0, b);
    for (int m = 0; m < MC; ++m)
      y[(m0 + m) * n + row] =
          from_float<T>(acc_sum(acc[0][m]) + acc_sum(acc[1][m]) + (zero_sum[0][m] + zero_sum[1][m]));
  }
}

// Rows [begin, end) of y for int8 weights (N, K): scaled per row by bf16 `scales` (int8_gemv), or, where
// `block_scales` is given, per 32-block by its float32 (N, K/32) values, a GGUF's Q8_0 (q8_0_gemv).
template <int MC, typename T>
inline void int8_rows(const QuantActs& a, int64_t m0, const int8_t* qw, const bf16* scales,
                      const float* block_scales, T* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t k = a.k, blocks = k / QK;
  for (int64_t row = begin; row < end; ++row) {
    const int8_t* wrow = qw + row * k;
    const float* brow = block_scales ? block_scales + row * blocks : nullptr;
    facc acc[2][MC];
    for (int m = 0; m < MC; ++m) acc[0][m] = acc[1][m] = acc_zero();
    auto step = [&](int lane, int64_t b) {
      const Q8 w = load_q8(wrow + b * QK);
      const float ws = brow ? brow[b] : 1.f;  // x 1 is exact: per-row weights compute as they always did
      for (int m = 0; m < MC; ++m)
        acc[lane][m] = acc_q8(acc[lane][m], w, a.q + (m0 + m) * k + b * QK, a.d[(m0 + m) * blocks + b] * ws);
    };
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) step(0, b), step(1, b + 1);
    if (b < blocks) step(0, b);
    const float scale = brow ? 1.f : widen(scales[row]);
    for (int m = 0; m < MC; ++m) y[(m0 + m) * n + row] = from_float<T>((acc_sum(acc[0][m]) + acc_sum(acc[1][m])) * scale);
  }
}

// One 32-element block of int4 weights out in T: dst[j] = q[j] * scale + offset (offset folds the -8 and the
// zero point), q[0..15] the low nibbles of src's 16 bytes and q[16..31] the high ones.
template <typename T>
inline void dequant_block(const uint8_t* src, float scale, float offset, T* dst) {
  const vf vs = vset(scale), vo = vset(offset);
  for (int j = 0; j < 16; j += W) {
    vstore(dst + j, vfma(vload_nib(src + j, 0), vs, vo));
    vstore(dst + 16 + j, vfma(vload_nib(src + j, 4), vs, vo));
  }
}

}  // namespace sb
