"""Checks every C++ kernel of one build variant against a float64 torch reference; run as a child process.

`python tests/engine/kernel_check.py VARIANT BUILD_DIR`: VARIANT is `native` (the engine's own cached build,
`-march=native`), `avx2` (the same sources with AVX-512 switched off: the AVX2+FMA paths) or `scalar`
(`-DSB_FORCE_SCALAR`: the reference loops). One process can register the `switchboard` library only once,
hence a process per variant. Prints `kernels ok: <variant> <isa>` when every check passed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

CSRC = Path(__file__).resolve().parents[2] / "backends" / "local" / "engine" / "csrc"
FLAGS = {"avx2": ["-mno-avx512f"], "scalar": ["-DSB_FORCE_SCALAR"]}


def load_ops(variant: str, build: Path):  # noqa: ANN201 - torch's op namespace
    if variant == "native":
        from backends.local.engine.kernels import kernel_op

        assert kernel_op("bf16_gemv") is not None, "the engine's kernels did not build"
        return torch.ops.switchboard
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"switchboard_kernels_{variant}",
        sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", *FLAGS[variant]],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.switchboard


def close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rel: float, what: object) -> None:
    err = ((got.double() - want) / (scale + 1e-30)).abs().max().item()
    assert err <= rel, (what, err)


def quantize_acts(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> the int8-per-32-block activations the int kernels multiply by, as float64."""
    xf = x.float().reshape(x.shape[0], -1, 32)
    d = xf.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xf * inv).double() * d.double()).reshape(x.shape)


def check_gemv(ops, g: torch.Generator) -> None:  # noqa: ANN001
    for k, n in ((576, 960), (100, 37), (64, 48), (33, 17)):
        for rows in (1, 2, 3, 5, 8):
            w = torch.randn(n, k, generator=g).bfloat16()
            b = torch.randn(n, generator=g).bfloat16()
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k, generator=g).to(dtype)
                want = F.linear(x.double(), w.double(), b.double())
                scale = x.double().abs() @ w.double().abs().T + 1
                got = ops.bf16_gemv(x, w, b)
                assert got.dtype == dtype
                close(
                    got, want, scale, 2**-7 if dtype == torch.bfloat16 else 1e-5, ("gemv", k, n, rows, dtype)
                )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8: per 32-block, byte j = q[j] | q[j + 16] << 4 (quant_impl.h)."""
    blocks = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def check_int(ops, g: torch.Generator) -> None:  # noqa: ANN001
    for k, n, group in ((576, 960, 32), (64, 16, 32), (96, 37, 32), (256, 48, 64), (256, 33, 128)):
        q = torch.randint(0, 16, (n, k), generator=g)
        sz = torch.stack(
            [torch.rand(n, k // group, generator=g) / 8, torch.randn(n, k // group, generator=g) / 4], -1
        )
        sz = sz.bfloat16().contiguous()
        w4 = ((q.double() - 8).reshape(n, -1, group) * sz[..., :1].double() + sz[..., 1:].double()).reshape(
            n, k
        )
        packed = pack_int4(q)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.allclose(
                ops.int4_dequant(packed, sz, group, dtype).double(), w4, rtol=2**-7, atol=1e-6
            )
        q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s8 = (torch.rand(n, generator=g) / 64).bfloat16()
        w8 = q8.double() * s8.double()[:, None]
        d8 = torch.rand(n, k // 32, generator=g) / 64  # Q8_0: a float32 scale per 32-block of each row
        w8_0 = (q8.double().reshape(n, -1, 32) * d8.double()[..., None]).reshape(n, k)
        tiled4, tiled8 = tiled_weights(ops, packed, sz, group, q8, d8)
        for rows in (1, 2, 3, 4, 5, 8, 17, 32):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k, generator=g).to(dtype)
                xq = quantize_acts(x)
                calls = [
                    ("int4", ops.int4_gemv, (packed, sz, group), w4),
                    ("int8", ops.int8_gemv, (q8, s8), w8),
                    ("q8_0", ops.q8_0_gemv, (q8, d8), w8_0),
                ]
                if tiled4 is not None:
                    calls.append(("int4 tiled", ops.int4_gemv, (*tiled4, group), w4))
                if tiled8 is not None:
                    calls.append(("q8_0 tiled", ops.q8_0_gemv, tiled8, w8_0))
                for name, op, weight, w in calls:
                    got = op(x, *weight)
                    # Each row of x computes alone as it does in a batch: answers never depend on the batch.
                    alone = op(x[-1:].contiguous(), *weight)
                    assert torch.equal(alone, got[-1:]), (name, "batch", k, n, rows)
                    assert got.dtype == dtype and got.shape == (rows, n)
                    scale = xq.abs() @ w.abs().T + 1e-3
                    # Against the quantized activations: float32 summation (and a bf16 output) only.
                    close(
                        got,
                        xq @ w.T,
                        scale,
                        2**-8 if dtype == torch.bfloat16 else 1e-5,
                        (name, k, n, rows, dtype),
                    )
                    # Against float64 x: the activation quantization's error (half a step per block).
                    close(
                        got,
                        x.double() @ w.T,
                        x.double().abs() @ w.abs().T + 1e-3,
                        2**-6,
                        (name, "x", k, n, rows),
                    )


def tiled_weights(ops, packed, sz, group, q8, d8):  # noqa: ANN001, ANN201
    """The int4 and Q8_0 weights in this build's tiles (None where it reads rows only, or N does not tile).

    The packing is portable: every build packs, and dequantizes a tiled int4 weight to exactly the row
    layout's values (checked here with tiles of 8 where the build itself keeps rows)."""
    n = packed.shape[0]
    rows4, rows8 = ops.int4_tile_rows(), ops.q8_0_tile_rows()
    if n % 8 == 0:
        wt, st = ops.int4_tile_pack(packed, sz, rows4 or 8)
        assert wt.shape == packed.shape and st.shape == (n // (rows4 or 8), sz.shape[1], 2, rows4 or 8)
        for dtype in (torch.float32, torch.bfloat16):
            rows_layout = ops.int4_dequant(packed, sz, group, dtype)
            assert torch.equal(ops.int4_dequant(wt, st, group, dtype), rows_layout)
    tiled4 = ops.int4_tile_pack(packed, sz, rows4) if rows4 and n % rows4 == 0 else None
    tiled8 = ops.q8_0_tile_pack(q8, d8, rows8) if rows8 and n % rows8 == 0 else None
    if tiled8 is not None:  # the stored bytes are the values + 128, four of a row's bytes at a time
        values = (tiled8[0].reshape(n // rows8, -1, 8, rows8, 4) ^ 0x80).view(torch.int8)
        assert torch.equal(values.permute(0, 3, 1, 2, 4).reshape(q8.shape), q8)
    return tiled4, tiled8


def check_attention(ops, g: torch.Generator) -> None:  # noqa: ANN001
    # (query dtype, cache dtype): the engine's three, bf16 cache under float32 compute included.
    pairs = (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    )
    for head_dim, n_kv, rep in ((64, 3, 3), (40, 2, 2), (24, 1, 5)):
        for dtype, cache_dtype in pairs:
            k_cache = torch.randn(40, 16, n_kv, head_dim, generator=g).to(cache_dtype)
            v_cache = torch.randn(40, 16, n_kv, head_dim, generator=g).to(cache_dtype)
            table = torch.randperm(40, generator=g)[:20].view(2, 10).contiguous()
            q = torch.randn(3, n_kv * rep, head_dim, generator=g).to(dtype)
            seqs, seen = torch.tensor([0, 1, 1]), torch.tensor([150, 77, 1])
            out = ops.paged_attention(q, k_cache, v_cache, table, seqs, seen, 0.125)
            for row in range(3):
                keys = int(seen[row])
                kk = k_cache[table[seqs[row]]].flatten(0, 1)[:keys].double().repeat_interleave(rep, dim=1)
                vv = v_cache[table[seqs[row]]].flatten(0, 1)[:keys].double().repeat_interleave(rep, dim=1)
                probs = (torch.einsum("hd,lhd->hl", q[row].double(), kk) * 0.125).softmax(-1)
                want = torch.einsum("hl,lhd->hd", probs, vv)
                tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
                close(
                    out[row], want, want.abs().amax() + 1, tol, ("paged", head_dim, dtype, cache_dtype, row)
                )


def check_norm_rope(ops, g: torch.Generator) -> None:  # noqa: ANN001
    for dim in (576, 37):
        x = torch.randn(3, dim, generator=g).bfloat16()
        weight = torch.randn(dim, generator=g).bfloat16()
        want = weight * F.rms_norm(x.float(), (dim,), eps=1e-5).to(torch.bfloat16)
        assert torch.equal(ops.rms_norm(x, weight, 1e-5), want), ("rms_norm", dim)
        xf, wf = x.float(), weight.float()
        close(
            ops.rms_norm(xf, wf, 1e-5),
            wf.double() * F.rms_norm(xf.double(), (dim,), eps=1e-5),
            1,
            1e-5,
            "norm",
        )
    for dtype, cache_dtype in (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ):
        for head_dim in (64, 36):
            n_heads, n_kv, tokens, half = 9, 3, 5, head_dim // 2
            qkv = torch.randn(tokens, n_heads + 2 * n_kv, head_dim, generator=g).to(dtype)
            angles = torch.rand(tokens, half, generator=g) * 6
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            k_cache = torch.zeros(4, 16, n_kv, head_dim, dtype=cache_dtype)
            v_cache = torch.zeros_like(k_cache)
            slots = torch.tensor([3, 17, 18, 40, 63])
            q = ops.rope_write(qkv, cos, sin, slots, k_cache, v_cache, n_heads)
            c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
            heads = qkv[:, : n_heads + n_kv]
            rotated = (
                heads * c + torch.cat([-heads[..., half:], heads[..., :half]], -1) * s
            )  # torch's rounding
            assert torch.equal(q, rotated[:, :n_heads]), ("rope q", dtype, head_dim)
            # The cache holds the rotated key and the value rounded once to its dtype (as `.to` rounds).
            want_k, want_v = rotated[:, n_heads:].to(cache_dtype), qkv[:, n_heads + n_kv :].to(cache_dtype)
            assert torch.equal(k_cache.flatten(0, 1)[slots], want_k), ("rope k", dtype, cache_dtype, head_dim)
            assert torch.equal(v_cache.flatten(0, 1)[slots], want_v), ("rope v", dtype, cache_dtype)


def main() -> None:
    variant, build = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(2)
    ops = load_ops(variant, build)
    g = torch.Generator().manual_seed(0)
    check_gemv(ops, g)
    check_int(ops, g)
    check_attention(ops, g)
    check_norm_rope(ops, g)
    print("kernels ok:", variant, ops.kernel_isa())


if __name__ == "__main__":
    main()
