// Paged attention for short query chunks (decode tokens, speculative drafts) on CPU, reading K/V in place.
//
// torch.ops.switchboard.paged_attention(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale) -> out
//   q            (T, H, D)        float32 or bfloat16; rows may be strided, the last dim contiguous
//   k/v_cache    (N, bs, Hkv, D)  same dtype, contiguous: the engine's block pool for one layer
//   block_tables (S, nb) int64    blocks of each sequence, in position order
//   token_seq    (T,) int64       which block-table row query row t belongs to
//   token_keys   (T,) int64       how many leading positions query row t sees (causal limit, >= 1)
//   out          (T, H, D)        q's dtype
//
// Each (query row, KV head) pair is one task: the n_rep query heads that share the KV head are scored against
// every visible key in one pass over K (so GQA reads each key once), softmax in float32, then one pass over V.
// Arithmetic is float32 throughout; bf16 inputs are widened exactly (a 16-bit shift). The engine gathers no
// blocks and builds no mask: the work is O(visible keys), where the gather-then-SDPA path copies every block
// of the batch's longest context for every sequence and layer.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__AVX512F__)
// 16 lanes widened to float32: bf16 is the top half of a float, so widening is a 16-bit shift.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), sum);
  acc = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) acc += a[i] * widen(b[i]);
  return acc;
}

template <typename T>
inline void axpy(float w, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(w);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wv, load16(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * widen(x[i]);
}

#if defined(__AVX512F__)
// e^x for x <= 0 (scores minus their row maximum): 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with
// 2^f by its degree-7 Taylor polynomial (relative error ~1e-7, float32's own rounding).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t kMaxRep = 16;    // query heads per KV head the vector path handles (GQA groups are smaller)
constexpr int64_t kMaxChunks = 16; // head_dim / 16: up to head_dim 256

// One task: the n_rep query heads of one query row sharing KV head `kvh`, against `n_keys` positions.
template <typename T>
void attend_vec(const T* q_row, int64_t q_head_stride, const T* k_ptr, const T* v_ptr, const int64_t* table,
                int64_t n_keys, int64_t kvh, int64_t n_rep, int64_t chunks, int64_t block_size,
                int64_t pos_stride, int64_t block_stride, float scale, std::vector<float>& scores, T* dst) {
  const int64_t head_dim = chunks * 16;
  __m512 qv[kMaxRep][kMaxChunks];
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t c = 0; c < chunks; ++c)
      qv[r][c] = _mm512_mul_ps(load16(q_row + r * q_head_stride + c * 16), _mm512_set1_ps(scale));
  const int64_t padded = (n_keys + 15) / 16 * 16;
  scores.resize(n_rep * padded);
  float best[kMaxRep];
  for (int64_t r = 0; r < n_rep; ++r) best[r] = -std::numeric_limits<float>::infinity();
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const T* key = k_ptr + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kvh * head_dim;
    __m512 kv[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) kv[c] = load16(key + c * 16);
    for (int64_t r = 0; r < n_rep; ++r) {
      __m512 sum = _mm512_mul_ps(qv[r][0], kv[0]);
      for (int64_t c = 1; c < chunks; ++c) sum = _mm512_fmadd_ps(qv[r][c], kv[c], sum);
      const float s = _mm512_reduce_add_ps(sum);
      scores[r * padded + pos] = s;
      best[r] = std::max(best[r], s);
    }
  }
  float inv_total[kMaxRep];
  for (int64_t r = 0; r < n_rep; ++r) {
    float* row = scores.data() + r * padded;
    for (int64_t pos = n_keys; pos < padded; ++pos) row[pos] = -std::numeric_limits<float>::infinity();
    const __m512 top = _mm512_set1_ps(best[r]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t pos = 0; pos < padded; pos += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + pos), top));
      _mm512_storeu_ps(row + pos, e);
      total = _mm512_add_ps(total, e);
    }
    inv_total[r] = 1.f / _mm512_reduce_add_ps(total);
  }
  __m512 acc[kMaxRep][kMaxChunks];
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t c = 0; c < chunks; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const T* value = v_ptr + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kvh * head_dim;
    __m512 vv[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) vv[c] = load16(value + c * 16);
    for (int64_t r = 0; r < n_rep; ++r) {
      const __m512 w = _mm512_set1_ps(scores[r * padded + pos]);
      for (int64_t c = 0; c < chunks; ++c) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]);
    }
  }
  alignas(64) float tmp[16];
  for (int64_t r = 0; r < n_rep; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_total[r]);
    for (int64_t c = 0; c < chunks; ++c) {
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[r][c], inv));
      T* out = dst + r * head_dim + c * 16;
      for (int64_t i = 0; i < 16; ++i) out[i] = static_cast<T>(tmp[i]);
    }
  }
}
#endif

// The portable path: same arithmetic, one lane at a time.
template <typename T>
void attend_scalar(const T* q_row, int64_t q_head_stride, const T* k_ptr, const T* v_ptr, const int64_t* table,
                   int64_t n_keys, int64_t kvh, int64_t n_rep, int64_t head_dim, int64_t block_size,
                   int64_t pos_stride, int64_t block_stride, float scale, std::vector<float>& scores, T* dst) {
  std::vector<float> qf(n_rep * head_dim), acc(n_rep * head_dim, 0.f), best(n_rep), total(n_rep, 0.f);
  for (int64_t r = 0; r < n_rep; ++r) {
    load_row(q_row + r * q_head_stride, qf.data() + r * head_dim, head_dim);
    for (int64_t d = 0; d < head_dim; ++d) qf[r * head_dim + d] *= scale;
    best[r] = -std::numeric_limits<float>::infinity();
  }
  scores.resize(n_rep * n_keys);
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const T* key = k_ptr + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kvh * head_dim;
    for (int64_t r = 0; r < n_rep; ++r) {
      const float s = dot(qf.data() + r * head_dim, key, head_dim);
      scores[r * n_keys + pos] = s;
      best[r] = std::max(best[r], s);
    }
  }
  for (int64_t r = 0; r < n_rep; ++r) {
    for (int64_t pos = 0; pos < n_keys; ++pos) {
      scores[r * n_keys + pos] = std::exp(scores[r * n_keys + pos] - best[r]);
      total[r] += scores[r * n_keys + pos];
    }
  }
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const T* value = v_ptr + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kvh * head_dim;
    for (int64_t r = 0; r < n_rep; ++r) axpy(scores[r * n_keys + pos], value, acc.data() + r * head_dim, head_dim);
  }
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t d = 0; d < head_dim; ++d) dst[r * head_dim + d] = static_cast<T>(acc[r * head_dim + d] / total[r]);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_keys,
         double scale, at::Tensor& out) {
  const int64_t num_tokens = q.size(0), n_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), n_kv = k_cache.size(2);
  const int64_t n_rep = n_heads / n_kv, max_blocks = block_tables.size(1);
  const int64_t q_tok_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t pos_stride = n_kv * head_dim, block_stride = block_size * pos_stride;
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq_of = token_seq.data_ptr<int64_t>();
  const int64_t* keys_of = token_keys.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
#if defined(__AVX512F__)
  const bool vec = head_dim % 16 == 0 && head_dim / 16 <= kMaxChunks && n_rep <= kMaxRep;
#endif

  at::parallel_for(0, num_tokens * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / n_kv, kvh = task % n_kv;
      const T* q_row = q_ptr + t * q_tok_stride + kvh * n_rep * q_head_stride;
      const int64_t* table = tables + seq_of[t] * max_blocks;
      T* dst = out_ptr + (t * n_heads + kvh * n_rep) * head_dim;
#if defined(__AVX512F__)
      if (vec) {
        attend_vec(q_row, q_head_stride, k_ptr, v_ptr, table, keys_of[t], kvh, n_rep, head_dim / 16, block_size,
                   pos_stride, block_stride, fscale, scores, dst);
        continue;
      }
#endif
      attend_scalar(q_row, q_head_stride, k_ptr, v_ptr, table, keys_of[t], kvh, n_rep, head_dim, block_size,
                    pos_stride, block_stride, fscale, scores, dst);
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq,
                           const at::Tensor& token_keys, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be (T, H, D) with a contiguous last dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous (blocks, block_size, kv_heads, head_dim)");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "q heads must be a multiple of the cache's kv heads, with the same head_dim");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block_tables must be a contiguous (S, nb) int64 tensor");
  TORCH_CHECK(token_seq.scalar_type() == at::kLong && token_keys.scalar_type() == at::kLong &&
                  token_seq.is_contiguous() && token_keys.is_contiguous() &&
                  token_seq.numel() == q.size(0) && token_keys.numel() == q.size(0),
              "token_seq and token_keys must be contiguous int64 tensors with one entry per query row");
  TORCH_CHECK(q.device().is_cpu(), "paged_attention runs on CPU");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale, out);
  } else {
    TORCH_CHECK(false, "paged_attention supports float32 and bfloat16, not ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(switchboard, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor token_seq, "
        "Tensor token_keys, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
}
