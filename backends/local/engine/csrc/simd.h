// One float32 vector type per ISA, so each kernel body is written once: AVX-512 (16 lanes), AVX2+FMA (8),
// Arm NEON (4), or plain C++ (1 lane, the scalar reference). The build picks the widest the compiler targets
// (`-march=native`); tests build the same sources with narrower flags to run each variant on one machine.
//
// Torch-free on purpose: the kernel bodies (`*_impl.h`) include only this, so the NEON build is checked by a
// cross compiler and an emulator without torch for aarch64.
//
// bf16 is the top half of a float32: widening is a 16-bit shift; narrowing rounds to nearest even and maps NaN
// to 0x7FC0, exactly as c10::BFloat16 does, so vector and scalar paths round alike.
// Why not at::vec::Vectorized: its ISA is chosen by torch's own CPU_CAPABILITY macros, not by the flags of an
// extension build, and its headers alone took most of a 2-core build's time; these ~20 operations are enough.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(SB_FORCE_SCALAR)
#define SB_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && !defined(SB_FORCE_SCALAR)
#define SB_AVX2 1
#include <immintrin.h>
#elif defined(__ARM_NEON) && !defined(SB_FORCE_SCALAR)
#define SB_NEON 1
#include <arm_neon.h>
#endif

namespace sb {

struct bf16 {
  uint16_t x;
};

inline float widen(float v) { return v; }
inline float widen(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline uint16_t narrow_bits(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16 from_float<bf16>(float f) { return bf16{narrow_bits(f)}; }

// The name of the variant this translation unit was compiled for (reported by kernel_isa()).
#if defined(SB_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
inline const char* isa_name() { return "avx512+vnni+bf16"; }
#elif defined(SB_AVX512) && defined(__AVX512VNNI__)
inline const char* isa_name() { return "avx512+vnni"; }
#elif defined(SB_AVX512)
inline const char* isa_name() { return "avx512"; }
#elif defined(SB_AVX2)
inline const char* isa_name() { return "avx2+fma"; }
#elif defined(SB_NEON) && defined(__ARM_FEATURE_DOTPROD)
inline const char* isa_name() { return "neon+dotprod"; }
#elif defined(SB_NEON)
inline const char* isa_name() { return "neon"; }
#else
inline const char* isa_name() { return "scalar"; }
#endif

#if defined(SB_AVX512)
constexpr int W = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// W 4-bit values as floats: the low (shift 0) or high (shift 4) nibbles of the W bytes at p.
inline vf vload_nib(const uint8_t* p, int shift) {
  const __m128i raw = _mm_srli_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), shift);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, _mm_set1_epi8(0x0F))));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstore(bf16* p, vf v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vround(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#elif defined(SB_AVX2)
constexpr int W = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float v) { return _mm256_set1_ps(v); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vf vload_nib(const uint8_t* p, int shift) {
  const __m128i raw = _mm_srli_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), shift);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(raw, _mm_set1_epi8(0x0F))));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstore(bf16* p, vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // 32 -> 16 bits: packus works within 128-bit lanes, so gather the two low quarters afterwards.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#elif defined(SB_NEON)
constexpr int W = 4;
using vf = float32x4_t;
inline vf vzero() { return vdupq_n_f32(0.f); }
inline vf vset(float v) { return vdupq_n_f32(v); }
inline vf vload(const float* p) { return vld1q_f32(p); }
inline vf vload(const bf16* p) {
  return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))), 16));
}
inline vf vload_nib(const uint8_t* p, int shift) {
  uint32_t four;
  std::memcpy(&four, p, sizeof(four));
  const uint8x8_t raw = vshl_u8(vreinterpret_u8_u32(vdup_n_u32(four)), vdup_n_s8(static_cast<int8_t>(-shift)));
  return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vand_u8(raw, vdup_n_u8(0x0F))))));
}
inline void vstore(float* p, vf v) { vst1q_f32(p, v); }
inline void vstore(bf16* p, vf v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7FFF))), 16);
  r = vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7FC0));
  vst1_u16(reinterpret_cast<uint16_t*>(p), vmovn_u32(r));
}
inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
inline float vsum(vf v) { return vaddvq_f32(v); }
inline vf vround(vf v) { return vrndnq_f32(v); }
inline vf vpow2i(vf n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
#else
constexpr int W = 1;
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vset(float v) { return v; }
inline vf vload(const float* p) { return *p; }
inline vf vload(const bf16* p) { return widen(*p); }
inline vf vload_nib(const uint8_t* p, int shift) { return static_cast<float>((*p >> shift) & 0x0F); }
inline void vstore(float* p, vf v) { *p = v; }
inline void vstore(bf16* p, vf v) { p->x = narrow_bits(v); }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float vsum(vf v) { return v; }
inline vf vround(vf v) { return std::nearbyint(v); }
inline vf vpow2i(vf n) { return std::ldexp(1.f, static_cast<int>(n)); }
#endif

// e^x for x <= 0 (scores minus their row maximum): 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with
// 2^f by its degree-7 Taylor polynomial (relative error ~1e-7, float32's own rounding).
inline vf vexp_nonpositive(vf x) {
  x = vmax(x, vset(-87.f));
  const vf t = vmul(x, vset(1.4426950408889634f));
  const vf n = vround(t);
  const vf f = vsub(t, n);
  vf p = vset(1.525273380405984e-05f);
  p = vfma(p, f, vset(1.5403530393381606e-04f));
  p = vfma(p, f, vset(1.3333558146428443e-03f));
  p = vfma(p, f, vset(9.618129107628477e-03f));
  p = vfma(p, f, vset(5.550410866482158e-02f));
  p = vfma(p, f, vset(0.2402265069591007f));
  p = vfma(p, f, vset(0.6931471805599453f));
  p = vfma(p, f, vset(1.f));
  return vmul(p, vpow2i(n));
}

}  // namespace sb
