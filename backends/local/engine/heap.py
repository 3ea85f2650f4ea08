"""Handing freed memory back to the system (`malloc_trim`), for the build and for an engine gone idle.

glibc keeps what `free` returns in its arenas: after a layer-by-layer build, autotune's candidates, warm-up,
or a burst of steps (each engine thread's arena holds up to twice its largest freed temporary, by glibc's
dynamic thresholds), idle RSS would keep all of it. Elsewhere than glibc there is nothing to call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)


def trim_heap() -> None:
    """Return every arena's free pages to the system: ~10 ms when there is much to hand back, ~0 after."""
    if _trim is not None:
        _trim(0)
