// Paged attention for short query chunks (decode tokens, speculative drafts) on CPU, reading K/V in place.
//
// torch.ops.switchboard.paged_attention(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale) -> out
//   q            (T, H, D)        float32 or bfloat16; rows may be strided, the last dim contiguous
//   k/v_cache    (N, bs, Hkv, D)  q's dtype, or bfloat16 under float32 q; contiguous: one layer's block pool
//   block_tables (S, nb) int64    blocks of each sequence, in position order
//   token_seq    (T,) int64       which block-table row query row t belongs to
//   token_keys   (T,) int64       how many leading positions query row t sees (causal limit, >= 1)
//   out          (T, H, D)        q's dtype
//
// Each (query row, KV head) pair is one task: the n_rep query heads that share the KV head are scored against
// every visible key in one pass over K (so GQA reads each key once), softmax in float32, then one pass over V.
// Arithmetic is float32 throughout; bf16 inputs are widened exactly (a 16-bit shift). The task body is
// attention_impl.h's, one vector path for AVX-512, AVX2+FMA and NEON plus the scalar reference. The engine gathers no
// blocks and builds no mask: the work is O(visible keys), where the gather-then-SDPA path copies every block
// of the batch's longest context for every sequence and layer.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "attention_impl.h"

namespace {

template <typename T, typename S>
T* as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<S>());
}

template <typename T, typename S, typename C = T, typename SC = S>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_keys,
         double scale, at::Tensor& out) {
  const int64_t num_tokens = q.size(0), n_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), n_kv = k_cache.size(2);
  const int64_t n_rep = n_heads / n_kv, max_blocks = block_tables.size(1);
  const int64_t q_tok_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t pos_stride = n_kv * head_dim, block_stride = block_size * pos_stride;
  const T* q_ptr = as<T, S>(q);
  const C* k_ptr = as<C, SC>(k_cache);
  const C* v_ptr = as<C, SC>(v_cache);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq_of = token_seq.data_ptr<int64_t>();
  const int64_t* keys_of = token_keys.data_ptr<int64_t>();
  T* out_ptr = as<T, S>(out);
  const sb::PagedLayout lay{block_size, pos_stride, block_stride, head_dim * static_cast<int64_t>(sizeof(C))};
  const float fscale = static_cast<float>(scale);
  const bool vec = sb::attend_vec_fits(head_dim, n_rep);

  at::parallel_for(0, num_tokens * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / n_kv, kvh = task % n_kv;
      const T* q_row = q_ptr + t * q_tok_stride + kvh * n_rep * q_head_stride;
      const int64_t* table = tables + seq_of[t] * max_blocks;
      T* dst = out_ptr + (t * n_heads + kvh * n_rep) * head_dim;
      if (vec) {
        sb::attend_vec(q_row, q_head_stride, k_ptr, v_ptr, table, keys_of[t], kvh, n_rep, head_dim, lay, fscale,
                       scores, dst);
      } else {
        sb::attend_scalar(q_row, q_head_stride, k_ptr, v_ptr, table, keys_of[t], kvh, n_rep, head_dim, lay, fscale,
                          scores, dst);
      }
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
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a dtype");
  const bool mixed = q.scalar_type() != k_cache.scalar_type();
  TORCH_CHECK(!mixed || (q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16),
              "the caches must have q's dtype, or be bfloat16 under float32 q");
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
  if (mixed) {
    run<float, float, sb::bf16, c10::BFloat16>(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale, out);
  } else if (q.scalar_type() == at::kFloat) {
    run<float, float>(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    run<sb::bf16, c10::BFloat16>(q, k_cache, v_cache, block_tables, token_seq, token_keys, scale, out);
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
