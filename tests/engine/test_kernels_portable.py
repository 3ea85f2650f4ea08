"""The C++ kernels' portable paths: the same sources built without AVX-512, checked against torch.

The engine builds with `-march=native`; on a CPU without AVX-512 (or without AVX512-BF16) the kernels take
their scalar loops. This machine has both, so the suite builds the sources a second time with those
instruction sets switched off, in a child process (one process can register the `switchboard` op library
only once), into the test cache, and checks every op there against torch's own arithmetic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # builds the kernels again, in a child process

from backends.local.engine.kernels import kernels_dir, kernels_disabled  # noqa: E402

CSRC = Path(__file__).resolve().parents[2] / "backends" / "local" / "engine" / "csrc"

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    from torch.utils import cpp_extension

    csrc, build = Path(sys.argv[1]), Path(sys.argv[2])
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="switchboard_kernels_portable",
        sources=[str(p) for p in sorted(csrc.glob("*.cpp"))],
        extra_cflags=["-O3", "-march=native", "-mno-avx512f", "-fopenmp", "-ffp-contract=off"],
        build_directory=str(build),
        is_python_module=False,
    )
    ops = torch.ops.switchboard
    g = torch.Generator().manual_seed(0)

    for k, n in ((576, 960), (100, 37)):
        for rows in (1, 2, 5):
            w = torch.randn(n, k, generator=g).bfloat16()
            x = torch.randn(rows, k, generator=g).bfloat16()
            b = torch.randn(n, generator=g).bfloat16()
            want = F.linear(x.float(), w.float(), b.float())
            got = ops.bf16_gemv(x, w, b).float()
            assert (got - want).abs().max() <= want.abs().max() * 2**-8 + 1e-2, ("gemv", k, n, rows)

    k_cache = torch.randn(40, 16, 3, 64, generator=g)
    v_cache = torch.randn(40, 16, 3, 64, generator=g)
    table = torch.randperm(40, generator=g)[:20].view(2, 10).contiguous()
    q = torch.randn(2, 9, 64, generator=g)
    seqs, keys_seen = torch.tensor([0, 1]), torch.tensor([150, 77])
    out = ops.paged_attention(q, k_cache, v_cache, table, seqs, keys_seen, 0.125)
    for row, keys in ((0, 150), (1, 77)):
        k = k_cache[table[row]].flatten(0, 1)[:keys].repeat_interleave(3, dim=1)
        v = v_cache[table[row]].flatten(0, 1)[:keys].repeat_interleave(3, dim=1)
        probs = (torch.einsum("hd,lhd->hl", q[row], k) * 0.125).softmax(-1)
        assert (out[row] - torch.einsum("hl,lhd->hd", probs, v)).abs().max() < 1e-5, ("paged", row)

    x = torch.randn(3, 576, generator=g).bfloat16()
    weight = torch.randn(576, generator=g).bfloat16()
    want = weight * F.rms_norm(x.float(), (576,), eps=1e-5).to(torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), want), "rms_norm"
    print("portable kernels ok")
    """
)


def test_portable_kernel_paths_match_torch() -> None:
    if kernels_disabled():
        pytest.skip("SWITCHBOARD_KERNELS=off")
    build = kernels_dir() / "portable-check"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(CSRC), str(build)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "portable kernels ok" in done.stdout
