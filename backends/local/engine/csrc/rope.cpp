// Rotary embeddings and the KV-cache write of one layer, in one call.
//
// torch.ops.switchboard.rope_write(qkv, cos, sin, slots, k_cache, v_cache, n_heads) -> q
//   qkv     (T, H + 2*Hkv, D) float32 or bfloat16: the stacked projection's output, heads contiguous
//   cos/sin (T, D/2) same dtype, contiguous: the tables' rows at each token's position
//   slots   (T,) int64: flat cache slot (block * block_size + offset) of each token
//   k/v_cache (N, block_size, Hkv, D) contiguous, qkv's dtype or bfloat16 under float32 qkv: rotated keys and
//             the values are written at the slots (rounded to the cache's dtype after the rotation)
//   q       (T, H, D) contiguous: the rotated query heads
// Each rotated element is rounded exactly as the torch path (`model.apply_rope`) rounds it: the two products,
// then their sum, each to the tensor dtype (the library is built with -ffp-contract=off, so float32 sums are
// never fused into an FMA that torch would not do). The rotation is elementwise_impl.h's `rope_rotate`.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "elementwise_impl.h"

namespace {

// The torch element type's storage as the kernel bodies' type (c10::BFloat16 and sb::bf16 are both 16 bits).
template <typename T, typename S>
T* as(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<S>());
}

template <typename T, typename S, typename C = T, typename SC = S>
void run(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
         at::Tensor& k_cache, at::Tensor& v_cache, int64_t n_heads, at::Tensor& q) {
  const int64_t num_tokens = qkv.size(0), head_dim = qkv.size(2), half = head_dim / 2;
  const int64_t n_kv = k_cache.size(2), row_stride = qkv.stride(0);
  const T* src = as<T, S>(qkv);
  const T* cp = as<T, S>(cos);
  const T* sp = as<T, S>(sin);
  const int64_t* slot = slots.data_ptr<int64_t>();
  C* kp = as<C, SC>(k_cache);
  C* vp = as<C, SC>(v_cache);
  T* qp = as<T, S>(q);
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = src + t * row_stride;
      const T* c = cp + t * half;
      const T* s = sp + t * half;
      for (int64_t h = 0; h < n_heads; ++h) sb::rope_rotate(row + h * head_dim, c, s, qp + (t * n_heads + h) * head_dim, half);
      C* k_dst = kp + slot[t] * n_kv * head_dim;
      for (int64_t h = 0; h < n_kv; ++h) sb::rope_rotate(row + (n_heads + h) * head_dim, c, s, k_dst + h * head_dim, half);
      const T* v_src = row + (n_heads + n_kv) * head_dim;
      C* v_dst = vp + slot[t] * n_kv * head_dim;
      if constexpr (std::is_same_v<T, C>) {
        std::memcpy(v_dst, v_src, n_kv * head_dim * sizeof(T));
      } else {
        sb::convert_row(v_src, v_dst, n_kv * head_dim);
      }
    }
  });
}

at::Tensor rope_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                      at::Tensor k_cache, at::Tensor v_cache, int64_t n_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1 && qkv.stride(1) == qkv.size(2),
              "qkv must be (T, heads, D) with contiguous heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be contiguous (blocks, block_size, kv_heads, head_dim) tensors");
  const int64_t n_kv = k_cache.size(2), head_dim = qkv.size(2);
  TORCH_CHECK(qkv.size(1) == n_heads + 2 * n_kv && k_cache.size(3) == head_dim && head_dim % 2 == 0,
              "qkv holds ", qkv.size(1), " heads; expected n_heads + 2 * kv_heads = ", n_heads + 2 * n_kv);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(0) == qkv.size(0) && cos.size(1) == head_dim / 2,
              "cos and sin must be contiguous (T, D/2) tensors");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == qkv.size(0),
              "slots must be a contiguous int64 tensor with one entry per token");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == sin.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "qkv, cos and sin must share a dtype, and so must the caches");
  const bool mixed = k_cache.scalar_type() != qkv.scalar_type();
  TORCH_CHECK(!mixed || (qkv.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16),
              "the caches must have qkv's dtype, or be bfloat16 under float32 qkv");
  TORCH_CHECK(qkv.device().is_cpu(), "rope_write runs on CPU");
  at::Tensor q = at::empty({qkv.size(0), n_heads, head_dim}, qkv.options());
  if (mixed) {
    run<float, float, sb::bf16, c10::BFloat16>(qkv, cos, sin, slots, k_cache, v_cache, n_heads, q);
  } else if (qkv.scalar_type() == at::kFloat) {
    run<float, float>(qkv, cos, sin, slots, k_cache, v_cache, n_heads, q);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    run<sb::bf16, c10::BFloat16>(qkv, cos, sin, slots, k_cache, v_cache, n_heads, q);
  } else {
    TORCH_CHECK(false, "rope_write supports float32 and bfloat16, not ", qkv.scalar_type());
  }
  return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("rope_write(Tensor qkv, Tensor cos, Tensor sin, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int n_heads) -> Tensor");
  m.impl("rope_write", c10::DispatchKey::CPU, TORCH_FN(rope_write));
}
