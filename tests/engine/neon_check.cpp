// The kernel bodies' NEON paths against double-precision loops, without torch: cross-compiled for aarch64
// and run under qemu-user by test_kernels_neon.py. Prints "neon ok <isa>" or the first mismatch.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention_impl.h"
#include "elementwise_impl.h"
#include "quant_impl.h"

using namespace sb;
static std::mt19937 rng(0);
static float randn() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

static int fail(const char* what, double got, double want) {
  std::printf("FAIL %s got %g want %g\n", what, got, want);
  return 1;
}

static int check_gemv() {
  const int k = 100, n = 37, m_rows = 2;
  std::vector<float> x(m_rows * k);
  std::vector<bf16> w(n * k), y(m_rows * n);
  std::vector<float> yf(m_rows * n);
  for (auto& v : x) v = randn();
  for (auto& v : w) v = from_float<bf16>(randn());
  gemv_rows<2>(x.data(), k, w.data(), nullptr, yf.data(), n, 0, n);
  for (int m = 0; m < m_rows; ++m)
    for (int r = 0; r < n; ++r) {
      double want = 0, mag = 1;
      for (int j = 0; j < k; ++j) want += double(x[m * k + j]) * widen(w[r * k + j]), mag += std::fabs(x[m * k + j]);
      if (std::fabs(yf[m * n + r] - want) > 1e-5 * mag * 4) return fail("gemv", yf[m * n + r], want);
    }
  return 0;
}

static int check_int4() {
  const int k = 128, n = 19, group = 64, m_rows = 5, groups = k / group;
  std::vector<uint8_t> q(n * k), packed(n * k / 2);
  std::vector<bf16> sz(n * groups * 2);
  for (auto& v : q) v = rng() % 16;
  for (auto& v : sz) v = from_float<bf16>(randn() / 8);
  for (int r = 0; r < n; ++r)
    for (int b = 0; b < k / 32; ++b)
      for (int j = 0; j < 16; ++j) packed[r * k / 2 + b * 16 + j] = q[r * k + b * 32 + j] | (q[r * k + b * 32 + 16 + j] << 4);
  std::vector<float> x(m_rows * k), y(m_rows * n);
  for (auto& v : x) v = randn();
  std::vector<int8_t> xq(m_rows * k);
  std::vector<float> d(m_rows * k / 32), s(m_rows * k / 32);
  for (int m = 0; m < m_rows; ++m) quantize_row_q8(x.data() + m * k, k, xq.data() + m * k, d.data() + m * k / 32, s.data() + m * k / 32);
  const QuantActs acts{xq.data(), d.data(), s.data(), k};
  by_row_chunks<float>(m_rows, [&](auto mc, int64_t m0) {
    int4_rows<decltype(mc)::value, float>(acts, m0, packed.data(), sz.data(), group, y.data(), n, 0, n);
  });
  for (int m = 0; m < m_rows; ++m)
    for (int r = 0; r < n; ++r) {
      double want = 0, mag = 1e-3;
      for (int j = 0; j < k; ++j) {
        const int g = j / group;
        const double wv = (double(q[r * k + j]) - 8) * widen(sz[(r * groups + g) * 2]) + widen(sz[(r * groups + g) * 2 + 1]);
        const double xv = double(xq[m * k + j]) * d[m * k / 32 + j / 32];
        want += wv * xv, mag += std::fabs(wv * xv);
      }
      if (std::fabs(y[m * n + r] - want) > 1e-5 * mag) return fail("int4", y[m * n + r], want);
    }
  std::vector<int8_t> w8(n * k);
  std::vector<bf16> s8(n);
  for (auto& v : w8) v = int8_t(int(rng() % 255) - 127);
  for (auto& v : s8) v = from_float<bf16>(0.01f);
  by_row_chunks<float>(m_rows, [&](auto mc, int64_t m0) {
    int8_rows<decltype(mc)::value, float>(acts, m0, w8.data(), s8.data(), nullptr, y.data(), n, 0, n);
  });
  for (int m = 0; m < m_rows; ++m)
    for (int r = 0; r < n; ++r) {
      double want = 0, mag = 1e-3;
      for (int j = 0; j < k; ++j) {
        const double p = double(w8[r * k + j]) * widen(s8[r]) * double(xq[m * k + j]) * d[m * k / 32 + j / 32];
        want += p, mag += std::fabs(p);
      }
      if (std::fabs(y[m * n + r] - want) > 1e-5 * mag) return fail("int8", y[m * n + r], want);
    }
  std::vector<float> blocks(n * k / 32);  // Q8_0: a scale per 32-block of each row
  for (auto& v : blocks) v = 0.001f * float(1 + rng() % 100);
  by_row_chunks<float>(m_rows, [&](auto mc, int64_t m0) {
    int8_rows<decltype(mc)::value, float>(acts, m0, w8.data(), nullptr, blocks.data(), y.data(), n, 0, n);
  });
  for (int m = 0; m < m_rows; ++m)
    for (int r = 0; r < n; ++r) {
      double want = 0, mag = 1e-3;
      for (int j = 0; j < k; ++j) {
        const double p = double(w8[r * k + j]) * blocks[r * k / 32 + j / 32] * double(xq[m * k + j]) *
                         d[m * k / 32 + j / 32];
        want += p, mag += std::fabs(p);
      }
      if (std::fabs(y[m * n + r] - want) > 1e-5 * mag) return fail("q8_0", y[m * n + r], want);
    }
  return 0;
}

static int check_dequant() {
  uint8_t src[16];
  for (int j = 0; j < 16; ++j) src[j] = static_cast<uint8_t>(rng() & 0xFF);
  float out[QK];
  bf16 outb[QK];
  dequant_block(src, 0.25f, -2.f, out);
  dequant_block(src, 0.25f, -2.f, outb);
  for (int j = 0; j < QK; ++j) {
    const double want = ((j < 16 ? src[j] & 0x0F : src[j - 16] >> 4) * 0.25) - 2.0;
    if (out[j] != want) return fail("dequant f32", out[j], want);
    if (widen(outb[j]) != want) return fail("dequant bf16", widen(outb[j]), want);
  }
  return 0;
}

static int check_attention_norm_rope() {
  const int head_dim = 64, n_rep = 3, n_keys = 37, bs = 16;
  std::vector<float> q(n_rep * head_dim), kc(3 * bs * head_dim), vc(3 * bs * head_dim), out(n_rep * head_dim), ref(n_rep * head_dim);
  for (auto* v : {&q, &kc, &vc})
    for (auto& e : *v) e = randn();
  const int64_t table[3] = {2, 0, 1};
  const PagedLayout lay{bs, head_dim, bs * head_dim, head_dim * 4};
  std::vector<float> scores;
  attend_vec(q.data(), head_dim, kc.data(), vc.data(), table, n_keys, 0, n_rep, head_dim, lay, 0.125f, scores, out.data());
  attend_scalar(q.data(), head_dim, kc.data(), vc.data(), table, n_keys, 0, n_rep, head_dim, lay, 0.125f, scores, ref.data());
  for (int i = 0; i < n_rep * head_dim; ++i)
    if (std::fabs(out[i] - ref[i]) > 1e-5) return fail("attention", out[i], ref[i]);
  std::vector<bf16> x(70), w(70), y(70);
  for (int i = 0; i < 70; ++i) x[i] = from_float<bf16>(randn()), w[i] = from_float<bf16>(randn());
  rms_norm_row(x.data(), w.data(), y.data(), 70, 1e-5f);
  double ss = 0;
  for (auto v : x) ss += double(widen(v)) * widen(v);
  const float inv = 1.f / std::sqrt(float(ss / 70) + 1e-5f);
  for (int i = 0; i < 70; ++i) {
    const float want = widen(from_float<bf16>(widen(w[i]) * widen(from_float<bf16>(widen(x[i]) * inv))));
    if (widen(y[i]) != want) return fail("rms_norm", widen(y[i]), want);
  }
  std::vector<bf16> src(36), c(18), s(18), dst(36);
  for (auto& v : src) v = from_float<bf16>(randn());
  for (int i = 0; i < 18; ++i) c[i] = from_float<bf16>(std::cos(0.3f * i)), s[i] = from_float<bf16>(std::sin(0.3f * i));
  rope_rotate(src.data(), c.data(), s.data(), dst.data(), 18);
  for (int i = 0; i < 18; ++i) {
    const float a = widen(from_float<bf16>(widen(src[i]) * widen(c[i]))), b = widen(from_float<bf16>(widen(src[i + 18]) * widen(s[i])));
    if (widen(dst[i]) != widen(from_float<bf16>(a - b))) return fail("rope", widen(dst[i]), a - b);
  }
  return 0;
}

int main() {
  if (check_gemv() || check_int4() || check_dequant() || check_attention_norm_rope()) return 1;
  std::printf("neon ok %s\n", isa_name());
  return 0;
}
