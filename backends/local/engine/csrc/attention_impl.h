// Torch-free body of paged decode attention: one (query row, KV head) task, written once over simd.h.
//
// The n_rep query heads sharing KV head `kvh` are scored against every visible key in one pass over K (GQA
// reads each key once), softmax in float32, then one pass over V. Queries and output are T, the cache C: T, or
// bf16 under float32 queries (a 16-bit KV cache for float32 compute), widened exactly as it is read.
// `attend_scalar` is the reference loop and the fallback for head sizes the vector path does not take.
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace sb {

constexpr int64_t kMaxRep = 16;          // query heads per KV head the vector path handles
constexpr int64_t kMaxChunks = 256 / W;  // head_dim / W: up to head_dim 256

struct PagedLayout {
  int64_t block_size, pos_stride, block_stride;  // elements
  int64_t row_bytes;                             // one head's row: head_dim elements of the cache
  template <typename T>
  const T* row(const T* base, const int64_t* table, int64_t pos, int64_t kvh, int64_t head_dim) const {
    return base + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kvh * head_dim;
  }
};

// Positions 0, 1, 2, ... of one sequence's head in the paged cache, in order, without a division per key.
// Given `also` (the pass over K, with V's pool), it also asks for the K and V rows kAhead positions on: a
// head's row is 1 of n_kv rows of every position, a stride the hardware prefetcher followed too late
// (docs/ENGINE.md), and the V rows are then warm for the second pass.
template <typename T>
struct PagedCursor {
  static constexpr int64_t kAhead = 8;
  const T* base;
  const int64_t* table;
  const PagedLayout& lay;
  int64_t head_offset, n_keys;
  const T* also = nullptr;  // V's pool during the pass over K: prefetch both there; none in the pass over V
  int64_t block = 0, offset = 0, pos = 0;
  const T* at = base + table[0] * lay.block_stride + head_offset;
  const T* next() {  // the next position's row (a block's entry is read when its first position is)
    if (offset == lay.block_size) {
      offset = 0;
      at = base + table[++block] * lay.block_stride + head_offset;
    }
    if (also && pos + kAhead < n_keys) {
      int64_t to = offset + kAhead, hop = 0;
      for (; to >= lay.block_size; to -= lay.block_size) ++hop;
      const int64_t place = table[block + hop] * lay.block_stride + head_offset + to * lay.pos_stride;
      for (int64_t b = 0; b < lay.row_bytes; b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(base + place) + b);
        __builtin_prefetch(reinterpret_cast<const char*>(also + place) + b);
      }
    }
    const T* row = at;
    at += lay.pos_stride;
    ++offset;
    ++pos;
    return row;
  }
};

inline bool attend_vec_fits(int64_t head_dim, int64_t n_rep) {
  return head_dim % W == 0 && head_dim / W <= kMaxChunks && n_rep <= kMaxRep;
}

// CH and NR: head_dim / W and n_rep as compile-time constants (0: read at run time). The common shapes get
// their own copies (attend_vec below): with the loop bounds known, the loops unroll and the query and
// accumulator vectors stay in registers where they fit.
template <int64_t CH, int64_t NR, typename T, typename C>
void attend_vec_shaped(const T* q_row, int64_t q_head_stride, const C* k_ptr, const C* v_ptr,
                       const int64_t* table, int64_t n_keys, int64_t kvh, int64_t n_rep_, int64_t head_dim,
                       const PagedLayout& lay, float scale, std::vector<float>& scores, T* dst) {
  const int64_t chunks = CH ? CH : head_dim / W, n_rep = NR ? NR : n_rep_;
  vf qv[NR ? NR : kMaxRep][CH ? CH : kMaxChunks];
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t c = 0; c < chunks; ++c) qv[r][c] = vmul(vload(q_row + r * q_head_stride + c * W), vset(scale));
  const int64_t padded = (n_keys + W - 1) / W * W;
  scores.resize(n_rep * padded);
  float best[NR ? NR : kMaxRep];
  for (int64_t r = 0; r < n_rep; ++r) best[r] = -std::numeric_limits<float>::infinity();
  PagedCursor<C> keys{k_ptr, table, lay, kvh * head_dim, n_keys, v_ptr};
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const C* key = keys.next();
    vf kv[CH ? CH : kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) kv[c] = vload(key + c * W);
    for (int64_t r = 0; r < n_rep; ++r) {
      vf sum = vmul(qv[r][0], kv[0]);
      for (int64_t c = 1; c < chunks; ++c) sum = vfma(qv[r][c], kv[c], sum);
      const float s = vsum(sum);
      scores[r * padded + pos] = s;
      best[r] = std::max(best[r], s);
    }
  }
  float inv_total[NR ? NR : kMaxRep];
  for (int64_t r = 0; r < n_rep; ++r) {
    float* row = scores.data() + r * padded;
    for (int64_t pos = n_keys; pos < padded; ++pos) row[pos] = -std::numeric_limits<float>::infinity();
    const vf top = vset(best[r]);
    vf total = vzero();
    for (int64_t pos = 0; pos < padded; pos += W) {
      const vf e = vexp_nonpositive(vsub(vload(row + pos), top));
      vstore(row + pos, e);
      total = vadd(total, e);
    }
    inv_total[r] = 1.f / vsum(total);
  }
  vf acc[NR ? NR : kMaxRep][CH ? CH : kMaxChunks];
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t c = 0; c < chunks; ++c) acc[r][c] = vzero();
  PagedCursor<C> values{v_ptr, table, lay, kvh * head_dim, n_keys};
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const C* value = values.next();
    vf vv[CH ? CH : kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) vv[c] = vload(value + c * W);
    for (int64_t r = 0; r < n_rep; ++r) {
      const vf w = vset(scores[r * padded + pos]);
      for (int64_t c = 0; c < chunks; ++c) acc[r][c] = vfma(w, vv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < n_rep; ++r) {
    const vf inv = vset(inv_total[r]);
    for (int64_t c = 0; c < chunks; ++c) vstore(dst + r * head_dim + c * W, vmul(acc[r][c], inv));
  }
}

template <typename T, typename C = T>
void attend_vec(const T* q_row, int64_t q_head_stride, const C* k_ptr, const C* v_ptr, const int64_t* table,
                int64_t n_keys, int64_t kvh, int64_t n_rep, int64_t head_dim, const PagedLayout& lay,
                float scale, std::vector<float>& scores, T* dst) {
  auto shaped = [&](auto ch, auto nr) {
    attend_vec_shaped<decltype(ch)::value, decltype(nr)::value>(q_row, q_head_stride, k_ptr, v_ptr, table, n_keys,
                                                                kvh, n_rep, head_dim, lay, scale, scores, dst);
  };
  using C64 = std::integral_constant<int64_t, 64 / W>;
  using C128 = std::integral_constant<int64_t, 128 / W>;
  using R3 = std::integral_constant<int64_t, 3>;
  using R4 = std::integral_constant<int64_t, 4>;
  using Any = std::integral_constant<int64_t, 0>;  // read at run time
  if (head_dim == 64 && n_rep == 3) return shaped(C64{}, R3{});  // SmolLM2-135M (9 query heads over 3 KV heads)
  if (head_dim == 64 && n_rep == 4) return shaped(C64{}, R4{});
  if (head_dim == 128 && n_rep == 4) return shaped(C128{}, R4{});
  shaped(Any{}, Any{});
}

// The reference: the same arithmetic one lane at a time, with libm's exp.
template <typename T, typename C = T>
void attend_scalar(const T* q_row, int64_t q_head_stride, const C* k_ptr, const C* v_ptr, const int64_t* table,
                   int64_t n_keys, int64_t kvh, int64_t n_rep, int64_t head_dim, const PagedLayout& lay,
                   float scale, std::vector<float>& scores, T* dst) {
  std::vector<float> qf(n_rep * head_dim), acc(n_rep * head_dim, 0.f), best(n_rep), total(n_rep, 0.f);
  for (int64_t r = 0; r < n_rep; ++r) {
    for (int64_t d = 0; d < head_dim; ++d) qf[r * head_dim + d] = widen(q_row[r * q_head_stride + d]) * scale;
    best[r] = -std::numeric_limits<float>::infinity();
  }
  scores.resize(n_rep * n_keys);
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const C* key = lay.row(k_ptr, table, pos, kvh, head_dim);
    for (int64_t r = 0; r < n_rep; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) s += qf[r * head_dim + d] * widen(key[d]);
      scores[r * n_keys + pos] = s;
      best[r] = std::max(best[r], s);
    }
  }
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t pos = 0; pos < n_keys; ++pos) {
      scores[r * n_keys + pos] = std::exp(scores[r * n_keys + pos] - best[r]);
      total[r] += scores[r * n_keys + pos];
    }
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const C* value = lay.row(v_ptr, table, pos, kvh, head_dim);
    for (int64_t r = 0; r < n_rep; ++r)
      for (int64_t d = 0; d < head_dim; ++d) acc[r * head_dim + d] += scores[r * n_keys + pos] * widen(value[d]);
  }
  for (int64_t r = 0; r < n_rep; ++r)
    for (int64_t d = 0; d < head_dim; ++d) dst[r * head_dim + d] = from_float<T>(acc[r * head_dim + d] / total[r]);
}

}  // namespace sb
