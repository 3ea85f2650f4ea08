"""The engine's C++ CPU kernels, compiled on first use and cached: `paged_attention_op()`.

`csrc/paged_attention.cpp` registers `torch.ops.switchboard.paged_attention`. It is built with torch's own
extension builder (g++ and ninja, `-O3 -march=native`, torch's OpenMP pool through `at::parallel_for`) into
`$SWITCHBOARD_CACHE_DIR/kernels/<torch version>-<source hash>/` (default `~/.cache/switchboard/kernels`), so a
changed source or torch never reuses a stale build; the first build takes about a minute on 2 cores, later
loads a fraction of a second. `-march=native` ties a build to the CPU it was made on; the directory is per
machine like the rest of the cache.

Invariant: a failed build is logged once with the reason and the fix, and `paged_attention_op()` returns None,
so the engine falls back to the gather + SDPA path; it never fails a request for want of a kernel.
Set `SWITCHBOARD_KERNELS=off` to skip the build altogether.
"""

from __future__ import annotations

import hashlib
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
_SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp"
_STALE_LOCK_S = 600.0  # torch's build lock left by a process killed mid-build (a build takes ~10-60 s)
_lock = threading.Lock()
_state: dict[str, Any] = {}


def kernels_dir() -> Path:
    from backends.local.model_cache import default_cache_root

    return default_cache_root() / "kernels"


def _build() -> Callable[..., Any] | None:
    import torch

    if os.environ.get(KERNELS_ENV, "").lower() in ("off", "0", "false", "no"):
        log.info("C++ kernels disabled by %s; attention uses gather + SDPA", KERNELS_ENV)
        return None
    source = _SOURCE.read_bytes()
    tag = f"{torch.__version__}-{hashlib.sha256(source).hexdigest()[:12]}".replace("+", "_")
    build_dir = kernels_dir() / tag
    try:
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        _prepare_build(build_dir)
        cpp_extension.load(
            name="switchboard_kernels",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: fall back, and say why
        log.warning(
            "the C++ paged-attention kernel did not build (%s: %s); decode attention falls back to gather + "
            "SDPA. It needs g++ and ninja (`pip install ninja`); set %s=off to skip the build",
            type(exc).__name__,
            str(exc).splitlines()[0][:300] if str(exc) else "",
            KERNELS_ENV,
        )
        return None
    return torch.ops.switchboard.paged_attention


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


def paged_attention_op() -> Callable[..., Any] | None:
    """`torch.ops.switchboard.paged_attention`, building it on the first call; None if it cannot be built."""
    if "op" in _state:  # the hot path: every layer of every step asks
        return _state["op"]
    with _lock:
        if "op" not in _state:
            _state["op"] = _build()
        return _state["op"]
