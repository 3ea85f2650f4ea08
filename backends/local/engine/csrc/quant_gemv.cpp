// Weight-only int4 / int8 linear layers for decode on CPU: y = x @ dequant(W).T for 1 to 32 rows of x.
//
// torch.ops.switchboard.int4_gemv(x, qweight, scales_zeros, group_size) -> y
//   x            (M, K) float32 or bfloat16, contiguous, K % group_size == 0, group_size % 32 == 0
//   qweight      (N, K/2) uint8: per row, blocks of 32 elements in 16 bytes (quant_impl.h), or tiled
//   scales_zeros (N, K/group_size, 2) bfloat16: weight = (q - 8) * scale + zero; or, tiled,
//                (N/T, K/group_size, 2, T) from int4_tile_pack
// torch.ops.switchboard.int4_tile_rows() -> T: the tile height int4_gemv is fastest with on this build (the
//   vector width on x86: 16 with AVX-512, 8 with AVX2), 0 where it keeps the row layout (NEON, scalar)
// torch.ops.switchboard.int4_tile_pack(qweight, scales_zeros, rows) -> (qweight, scales_zeros), tiled: the same
//   bytes and scales, reordered (quant_impl.h, "Tiled int4"); N % rows == 0
// torch.ops.switchboard.int8_gemv(x, qweight, scales) -> y
//   qweight (N, K) int8, K % 32 == 0; scales (N,) bfloat16: weight = q * scale
// torch.ops.switchboard.q8_0_gemv(x, qweight, scales) -> y
//   qweight (N, K) int8, K % 32 == 0; scales (N, K/32) float32: weight = q * scale per 32-block (GGUF Q8_0);
//   or tiled: qweight (N, K) uint8 and scales (N/T, K/32, T) from q8_0_tile_pack
// torch.ops.switchboard.q8_0_tile_rows() -> T, q8_0_tile_pack(q, scales, rows) -> (qweight, scales): as int4's,
//   for Q8_0 (x86 with VNNI or AVX2; quant_impl.h, "Tiled Q8_0")
// torch.ops.switchboard.int4_dequant(qweight, scales_zeros, group_size, dtype) -> (N, K) weight, either layout:
//   the values int4_gemv multiplies by, for checks and tools (the engine's layers call int4_gemv at every row
//   count, in 32-row calls).
// y is (M, N) in x's dtype. x is quantized per 32-block to int8 once per call (quant_impl.h); the weight is
// streamed once for all rows, split over torch's threads by output rows (by tiles when tiled).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "quant_impl.h"

namespace {

using sb::bf16;
constexpr int64_t kMaxRows = 32;

template <typename T>
struct Acts {  // the call's quantized activations (every element written before it is read: no zeroing)
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, s;
  sb::QuantActs view;
  Acts(const T* x, int64_t m_rows, int64_t k)
      : q(new int8_t[m_rows * k]), d(new float[m_rows * k / sb::QK]), s(new float[m_rows * k / sb::QK]) {
    for (int64_t m = 0; m < m_rows; ++m)
      sb::quantize_row_q8(x + m * k, k, q.get() + m * k, d.get() + m * k / sb::QK, s.get() + m * k / sb::QK);
    view = {q.get(), d.get(), s.get(), k};
  }
};

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous (M, K) float32 or bfloat16 tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "takes 1 to ", kMaxRows, " rows of x, got ", x.size(0));
  TORCH_CHECK(k % sb::QK == 0, "K must be a multiple of 32, got ", k);
  TORCH_CHECK(x.device().is_cpu(), "runs on CPU");
}

// Call body(T*, y T*) with x and y as the kernel's element type.
template <typename Body>
at::Tensor with_types(const at::Tensor& x, int64_t n, Body&& body) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.scalar_type() == at::kFloat) {
    body(x.data_ptr<float>(), y.data_ptr<float>());
  } else {
    body(reinterpret_cast<const bf16*>(x.data_ptr<c10::BFloat16>()), reinterpret_cast<bf16*>(y.data_ptr<c10::BFloat16>()));
  }
  return y;
}

#if defined(SB_AVX512) || defined(SB_AVX2)
// y for a tiled weight: tiles of `tile` rows split over torch's threads; tile_fn(acts, m_rows, t, y) computes
// y[.., t * tile .. (t + 1) * tile) for all rows of x (int4_tile, q8_0_tile).
template <typename TileFn>
at::Tensor over_tiles(const at::Tensor& x, int64_t n, int64_t k, int64_t tile, TileFn&& tile_fn) {
  return with_types(x, n, [&](const auto* xp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const Acts<T> acts(xp, x.size(0), k);
    at::parallel_for(0, n / tile, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        tile_fn(acts.view, x.size(0), t, yp);
    });
  });
}
#endif

// Rows of `row_bytes` bytes reordered into tiles of `rows` rows: per tile, 4-byte word w of every row, row r
// at w * rows * 4 + r * 4 (quant_impl.h, "Tiled int4" and "Tiled Q8_0"), each byte ^ `flip`.
void tile_words(const uint8_t* src, uint8_t* dst, int64_t n, int64_t row_bytes, int64_t rows, uint8_t flip) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / rows, r = row % rows;
      for (int64_t i = 0; i < row_bytes; ++i)
        dst[t * rows * row_bytes + (i / 4) * rows * 4 + r * 4 + i % 4] = src[row * row_bytes + i] ^ flip;
    }
  });
}

// The tile height of a tiled scales_zeros (N/T, G, 2, T), 0 for the row layout (N, G, 2); checks either.
int64_t check_int4(const at::Tensor& qweight, const at::Tensor& sz, int64_t group) {
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2,
              "qweight must be a contiguous (N, K/2) uint8 tensor");
  TORCH_CHECK(group > 0 && group % sb::QK == 0 && k % group == 0, "group_size must be a multiple of 32 dividing K");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous(), "scales_zeros must be contiguous bfloat16");
  if (sz.dim() == 4) {
    const int64_t t = sz.size(3);
    TORCH_CHECK(t > 0 && n % t == 0 && sz.size(0) == n / t && sz.size(1) == k / group && sz.size(2) == 2,
                "tiled scales_zeros must be (N/T, K/group_size, 2, T), as int4_tile_pack makes them");
    return t;
  }
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == n && sz.size(1) == k / group && sz.size(2) == 2,
              "scales_zeros must be a (N, K/group_size, 2) bfloat16 tensor");
  return 0;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& sz, int64_t group) {
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  check_x(x, k);
  const int64_t tile = check_int4(qweight, sz, group);
  TORCH_CHECK(tile == 0 || tile == sb::TILE, "a weight tiled by ", tile, " rows; this build's int4_gemv reads ",
              sb::TILE ? "tiles of " + std::to_string(sb::TILE) + " rows" : std::string("the row layout only"));
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const bf16* sp = reinterpret_cast<const bf16*>(sz.data_ptr<c10::BFloat16>());
#if defined(SB_AVX512) || defined(SB_AVX2)
  if (tile) {
    const int64_t tile_bytes = tile * k / 2, tile_scales = tile * 2 * (k / group);
    return over_tiles(x, n, k, tile, [&](const sb::QuantActs& acts, int64_t m_rows, int64_t t, auto* yp) {
      sb::int4_tile(acts, m_rows, qp + t * tile_bytes, sp + t * tile_scales, group / sb::QK, yp, n, t * tile);
    });
  }
#endif
  return with_types(x, n, [&](const auto* xp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const Acts<T> acts(xp, x.size(0), k);
    // Grain 16 rows: a 576-wide layer's 16 rows are 4.6 KB of int4; the 3072-row gate/up splits evenly.
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      sb::by_row_chunks<T>(x.size(0), [&](auto mc, int64_t m0) {
        sb::int4_rows<decltype(mc)::value, T>(acts.view, m0, qp, sp, group, yp, n, begin, end);
      });
    });
  });
}

// int8_gemv and q8_0_gemv: int8 weights (N, K) scaled per row (bf16) or per 32-block (float32).
at::Tensor int8_weights(const at::Tensor& x, const at::Tensor& qweight, const bf16* row_scales,
                        const float* block_scales) {
  const int64_t n = qweight.size(0), k = qweight.size(1);
  const int8_t* qp = qweight.data_ptr<int8_t>();
  return with_types(x, n, [&](const auto* xp, auto* yp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const Acts<T> acts(xp, x.size(0), k);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      sb::by_row_chunks<T>(x.size(0), [&](auto mc, int64_t m0) {
        sb::int8_rows<decltype(mc)::value, T>(acts.view, m0, qp, row_scales, block_scales, yp, n, begin, end);
      });
    });
  });
}

void check_int8_weight(const at::Tensor& x, const at::Tensor& qweight) {
  check_x(x, qweight.size(1));
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "qweight must be contiguous int8");
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_int8_weight(x, qweight);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() == qweight.size(0),
              "scales must be a contiguous (N,) bfloat16 tensor");
  return int8_weights(x, qweight, reinterpret_cast<const bf16*>(scales.data_ptr<c10::BFloat16>()), nullptr);
}

at::Tensor q8_0_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  if (scales.dim() == 3) {  // tiled (q8_0_tile_pack)
    const int64_t n = qweight.size(0), k = qweight.size(1), tile = scales.size(2);
    check_x(x, k);
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "tiled qweight must be contiguous uint8");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && tile > 0 && n % tile == 0 &&
                    scales.size(0) == n / tile && scales.size(1) == k / sb::QK,
                "tiled scales must be a contiguous (N/T, K/32, T) float32 tensor, as q8_0_tile_pack makes them");
    TORCH_CHECK(tile == sb::Q8_TILE, "a Q8_0 weight tiled by ", tile, " rows; this build reads ", sb::Q8_TILE);
#if defined(SB_TILE_VNNI) || defined(SB_AVX2)
    const uint8_t* qp = qweight.data_ptr<uint8_t>();
    const float* sp = scales.data_ptr<float>();
    return over_tiles(x, n, k, tile, [&](const sb::QuantActs& acts, int64_t m_rows, int64_t t, auto* yp) {
      sb::q8_0_tile(acts, m_rows, qp + t * tile * k, sp + t * tile * (k / sb::QK), yp, n, t * tile);
    });
#endif
  }
  check_int8_weight(x, qweight);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == qweight.size(0) && scales.size(1) == qweight.size(1) / sb::QK,
              "scales must be a contiguous (N, K/32) float32 tensor");
  return int8_weights(x, qweight, nullptr, scales.data_ptr<float>());
}

at::Tensor int4_dequant(const at::Tensor& qweight, const at::Tensor& sz, int64_t group, at::ScalarType dtype) {
  const int64_t tile = check_int4(qweight, sz, group);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2, groups = k / group;
  at::Tensor w = at::empty({n, k}, qweight.options().dtype(dtype));
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const bf16* sp = reinterpret_cast<const bf16*>(sz.data_ptr<c10::BFloat16>());
  auto fill = [&](auto* wp) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      uint8_t block[16];
      for (int64_t row = begin; row < end; ++row)
        for (int64_t b = 0; b < k / sb::QK; ++b) {
          const int64_t g = b * sb::QK / group;
          const uint8_t* src = qp + row * (k / 2) + b * 16;
          const bf16* s = sp + (row * groups + g) * 2;  // scale, zero
          int64_t stride = 1;
          if (tile) {  // row's block: 4-byte words 4 * tile bytes apart; its scale and zero tile apart
            const int64_t t = row / tile, r = row % tile;
            const uint8_t* words = qp + t * tile * (k / 2) + b * tile * 16 + r * 4;
            for (int j = 0; j < 4; ++j) std::memcpy(block + 4 * j, words + j * tile * 4, 4);
            src = block;
            s = sp + (t * groups + g) * 2 * tile + r;
            stride = tile;
          }
          const float scale = sb::widen(s[0]);
          const float offset = sb::widen(s[stride]) - 8.f * scale;
          sb::dequant_block(src, scale, offset, wp + row * k + b * sb::QK);
        }
    });
  };
  if (dtype == at::kFloat) {
    fill(w.data_ptr<float>());
  } else {
    fill(reinterpret_cast<bf16*>(w.data_ptr<c10::BFloat16>()));
  }
  return w;
}

int64_t int4_tile_rows() { return sb::TILE; }
int64_t q8_0_tile_rows() { return sb::Q8_TILE; }

std::tuple<at::Tensor, at::Tensor> q8_0_tile_pack(const at::Tensor& q, const at::Tensor& scales, int64_t rows) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) % sb::QK == 0,
              "q must be a contiguous (N, K) int8 tensor, K % 32 == 0");
  TORCH_CHECK(rows > 0 && q.size(0) % rows == 0, "rows must divide N");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == q.size(0) && scales.size(1) == q.size(1) / sb::QK,
              "scales must be a contiguous (N, K/32) float32 tensor");
  const int64_t n = q.size(0), k = q.size(1), blocks = k / sb::QK;
  at::Tensor wt = at::empty({n, k}, q.options().dtype(at::kByte));
  at::Tensor st = at::empty({n / rows, blocks, rows}, scales.options());
  tile_words(reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>()), wt.data_ptr<uint8_t>(), n, k, rows, 0x80);
  const float* sp = scales.data_ptr<float>();
  float* tp = st.data_ptr<float>();
  for (int64_t row = 0; row < n; ++row)
    for (int64_t b = 0; b < blocks; ++b) tp[((row / rows) * blocks + b) * rows + row % rows] = sp[row * blocks + b];
  return {wt, st};
}

std::tuple<at::Tensor, at::Tensor> int4_tile_pack(const at::Tensor& qweight, const at::Tensor& sz, int64_t rows) {
  TORCH_CHECK(rows > 0 && rows % 4 == 0 && qweight.dim() == 2 && qweight.size(0) % rows == 0,
              "rows must be a positive multiple of 4 dividing N");
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == qweight.size(0) && sz.size(2) == 2,
              "scales_zeros must be (N, K/group_size, 2), the row layout");
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2, groups = sz.size(1);
  check_int4(qweight, sz, k / groups);
  at::Tensor wt = at::empty(qweight.sizes(), qweight.options());
  at::Tensor st = at::empty({n / rows, groups, 2, rows}, sz.options());
  tile_words(qweight.data_ptr<uint8_t>(), wt.data_ptr<uint8_t>(), n, k / 2, rows, 0);
  const c10::BFloat16* sp = sz.data_ptr<c10::BFloat16>();
  c10::BFloat16* tp = st.data_ptr<c10::BFloat16>();
  for (int64_t row = 0; row < n; ++row)
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < 2; ++i)
        tp[(((row / rows) * groups + g) * 2 + i) * rows + row % rows] = sp[(row * groups + g) * 2 + i];
  return {wt, st};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchboard, m) {
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales_zeros, int group_size) -> Tensor");
  m.impl("int4_gemv", c10::DispatchKey::CPU, TORCH_FN(int4_gemv));
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.impl("int8_gemv", c10::DispatchKey::CPU, TORCH_FN(int8_gemv));
  m.def("q8_0_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.impl("q8_0_gemv", c10::DispatchKey::CPU, TORCH_FN(q8_0_gemv));
  m.def("int4_dequant(Tensor qweight, Tensor scales_zeros, int group_size, ScalarType dtype) -> Tensor");
  m.impl("int4_dequant", c10::DispatchKey::CPU, TORCH_FN(int4_dequant));
  m.def("int4_tile_rows() -> int", &int4_tile_rows);
  m.def("int4_tile_pack(Tensor qweight, Tensor scales_zeros, int rows) -> (Tensor, Tensor)");
  m.def("q8_0_tile_rows() -> int", &q8_0_tile_rows);
  m.def("q8_0_tile_pack(Tensor q, Tensor scales, int rows) -> (Tensor, Tensor)");
  m.impl("q8_0_tile_pack", c10::DispatchKey::CPU, TORCH_FN(q8_0_tile_pack));
  m.impl("int4_tile_pack", c10::DispatchKey::CPU, TORCH_FN(int4_tile_pack));
}
