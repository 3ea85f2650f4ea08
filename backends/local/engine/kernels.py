"""The engine's C++ CPU kernels, compiled on first use and cached: `kernel_op(name)`, `attach_cpu_kernels`.

`csrc/*.cpp` register `torch.ops.switchboard.paged_attention` (decode attention over the paged cache, in
place), `torch.ops.switchboard.bf16_gemv` (bf16 matrix-vector products for a few rows) and
`torch.ops.switchboard.rms_norm` (transformers' RMSNorm in one call) and `torch.ops.switchboard.rope_write`
(RoPE on q and k plus the K/V cache write of one layer). They are built as
one library with torch's own extension builder (g++ and ninja, `-O3 -march=native`, torch's OpenMP pool
through `at::parallel_for`) into `$SWITCHBOARD_CACHE_DIR/kernels/<torch version>-<source hash>/` (default
`~/.cache/switchboard/kernels`), so a changed source or torch never reuses a stale build. The first build
takes 10-60 s on 2 cores, later loads a fraction of a second. `-march=native` ties a build to the CPU it was
made on; the directory is per machine like the rest of the cache.

Invariant: a failed build is logged once with the reason and the fix, and `kernel_op()` returns None, so
the engine falls back to torch's own ops (gather + SDPA, the GEMM); it never fails a request for want of a
kernel. Set `SWITCHBOARD_KERNELS=off` to skip the build altogether.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("switchboard.engine")

KERNELS_ENV = "SWITCHBOARD_KERNELS"  # "off" disables the C++ kernels
# "avx2" builds without AVX-512 (with ATEN_CPU_CAPABILITY=avx2 for torch: how an AVX2-only CPU runs), "scalar"
# the reference loops; default "native" (-march=native, the widest the CPU has).
ISA_ENV = "SWITCHBOARD_KERNEL_ISA"
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "scalar": ["-DSB_FORCE_SCALAR"]}
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("paged_attention.cpp", "gemv.cpp", "rms_norm.cpp", "rope.cpp", "quant_gemv.cpp")
_HEADERS = ("simd.h", "elementwise_impl.h", "attention_impl.h", "quant_impl.h")
# what the sources register
OP_NAMES = (
    "paged_attention", "bf16_gemv", "rms_norm", "rope_write", "int4_gemv", "int8_gemv", "q8_0_gemv",
    "int4_dequant", "int4_tile_rows", "int4_tile_pack", "q8_0_tile_rows", "q8_0_tile_pack",
)  # fmt: skip
_LIBRARY = "switchboard_kernels"
_LIBRARY_FILE = f"{_LIBRARY}.so"  # what torch's builder writes in the build directory
_BUILT_MARKER = "switchboard-built.json"  # the flags of a build that loaded: written last
_STALE_LOCK_S = 600.0  # torch's build lock left by a process killed mid-build (a build takes ~10-60 s)
_lock = threading.Lock()
_ops: dict[str, Any] = {}  # op name -> op, filled once the library loaded
_built: list[bool] = []  # [] until the first call, then [whether the library loaded]


def kernels_dir() -> Path:
    from backends.local.model_cache import default_cache_root

    return default_cache_root() / "kernels"


def kernel_isa_setting() -> str:
    isa = os.environ.get(ISA_ENV, "native").lower() or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa} is unknown; use one of {', '.join(ISA_FLAGS)}")
    return isa


def kernels_disabled() -> bool:
    return os.environ.get(KERNELS_ENV, "").lower() in ("off", "0", "false", "no")


def source_digest() -> str:
    """A hash of every kernel source and header: a changed file never reuses a stale build or choice."""
    paths = [_CSRC / name for name in (*_SOURCES, *_HEADERS)]
    return hashlib.sha256(b"".join(path.read_bytes() for path in paths)).hexdigest()[:12]


def build_directory() -> Path:
    """Where this torch, these sources and `SWITCHBOARD_KERNEL_ISA` build the library."""
    import torch

    isa = kernel_isa_setting()
    suffix = "" if isa == "native" else f"-{isa}"
    return kernels_dir() / f"{torch.__version__}-{source_digest()}{suffix}".replace("+", "_")


def built_marker() -> Path:
    """The file a build that loaded leaves in `build_directory()`: the compiler flags it used."""
    return build_directory() / _BUILT_MARKER


def _build() -> bool:
    import torch

    if kernels_disabled():
        log.info("C++ kernels disabled by %s; the engine uses torch's own ops", KERNELS_ENV)
        return False
    sources = [_CSRC / name for name in _SOURCES]
    isa = kernel_isa_setting()
    build_dir = build_directory()
    # -ffp-contract=off: no FMA torch would not do, so rope/norm round exactly as the torch path.
    cflags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", *ISA_FLAGS[isa]]
    marker = build_dir / _BUILT_MARKER
    try:
        if _read_marker(marker) == cflags:
            # built before with these flags (the directory's name carries torch's version and the sources'
            # hash): load it as it is, without torch's builder, which reruns ninja and keeps setuptools
            # imported (~4 MB resident for the engine's life)
            torch.ops.load_library(str(build_dir / _LIBRARY_FILE))
        else:
            from torch.utils import cpp_extension

            build_dir.mkdir(parents=True, exist_ok=True)
            marker.unlink(missing_ok=True)
            _prepare_build(build_dir)
            cpp_extension.load(
                name=_LIBRARY,
                sources=[str(path) for path in sources],
                extra_cflags=cflags,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
            marker.write_text(json.dumps(cflags))
    except Exception as exc:  # noqa: BLE001 - any build failure means: fall back, and say why
        log.warning(
            "the engine's C++ kernels did not build (%s: %s); decode uses torch's own ops instead (slower). "
            "They need g++ and ninja (`pip install ninja`); set %s=off to skip the build",
            type(exc).__name__,
            str(exc).splitlines()[0][:300] if str(exc) else "",
            KERNELS_ENV,
        )
        return False
    _ops.update({name: getattr(torch.ops.switchboard, name) for name in OP_NAMES})
    log.info("C++ kernels: %s paths (%s=%s)", torch.ops.switchboard.kernel_isa(), ISA_ENV, isa)
    return True


def _read_marker(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _prepare_build(build_dir: Path) -> None:
    """Find the `ninja` that `pip install ninja` put beside this interpreter, and clear a dead build's lock.

    torch serialises builds of one directory with a lock file and waits for it to vanish; a process killed
    mid-build leaves it behind, and every later start would wait forever.
    """
    if shutil.which("ninja") is None:
        beside = Path(sys.executable).parent
        if (beside / "ninja").exists():
            os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            log.warning("removed a stale kernel build lock (%s)", lock)
    except FileNotFoundError:
        pass


def _loaded() -> bool:
    if _built:  # the hot path: every layer of every step asks
        return _built[0]
    with _lock:
        if not _built:
            _built.append(_build())
        return _built[0]


def kernel_isa() -> str:
    """The vector paths the loaded kernels run ("avx512+vnni+bf16", "avx2+fma", "neon", "scalar") or "off"."""
    if not _loaded():
        return "off"
    import torch

    return str(torch.ops.switchboard.kernel_isa())


def kernel_op(name: str) -> Callable[..., Any] | None:
    """`torch.ops.switchboard.<name>` (one of `OP_NAMES`), building the kernels on the first call; None
    without them."""
    return _ops[name] if _loaded() else None


def attach_cpu_kernels(model: Any) -> int:
    """Give a CPU float32/bf16 `Transformer` the kernels (norms, RoPE + KV write, bf16 GEMV) and its layers
    their decode closures (`fused.py`); modules changed.

    Attention's `paged` kernel is the runner's choice (`--attn`), not the model's. Without the kernels: 0.
    """
    if not _loaded():
        return 0
    from backends.local.engine.fused import fuse_decode
    from backends.local.engine.linear_kernels import use_gemv_kernel
    from backends.local.engine.model import use_cpu_kernels

    count = use_cpu_kernels(model, norm=_ops["rms_norm"], rope=_ops["rope_write"])
    if not count:
        return count
    count += use_gemv_kernel(model)
    return count + fuse_decode(model)  # last: it binds the projections as they now are
