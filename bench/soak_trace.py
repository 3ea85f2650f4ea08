"""Run `switchboard` with tracemalloc on, for the soak's memory hunt: where does the RSS growth come from?

`python -m bench.soak_trace OUT_DIR -- serve --config ...` starts tracemalloc, then the `switchboard` CLI. A
daemon thread wakes every `SOAK_TRACE_EVERY_S` (default 60 s): it appends one line to OUT_DIR/curve.tsv (RSS,
memory tracemalloc sees, pymalloc arenas, live objects by the collector), and from `SOAK_TRACE_BASE_S`
(default 180 s, after warm-up) on it writes OUT_DIR/diff-<t>.txt: the top allocation sites by line and by
traceback that grew since the base snapshot, and the object types whose counts grew. Traced memory flat while
RSS climbs points at the allocator (high-water, fragmentation); traced memory climbing names the lines that
keep it. Bench only: the gateway itself knows nothing of this.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 12
TOP = 40


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _arenas() -> int:
    """pymalloc arenas in use (1 MiB each on this build), from sys._debugmallocstats on stderr (fd 2)."""
    import tempfile

    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        for line in tmp.read().decode(errors="replace").splitlines():
            if "arenas allocated current" in line:
                return int(line.split("=")[1].replace(",", "").strip())
    return -1


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
        + ("fordblks", "keepcost")
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def _glibc_mib() -> tuple[float, float]:
    """glibc malloc (all its arenas): bytes in use (incl. mmapped blocks) and bytes free inside its heaps."""
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


_FILTERS = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    tracemalloc.Filter(False, __file__),
)


def _watch(out: Path, every_s: float, base_s: float) -> None:
    t0 = time.monotonic()
    time.sleep(float(os.environ.get("SOAK_TRACE_START_S", "30")))
    tracing = os.environ.get("SOAK_TRACE_MALLOC", "1") == "1"
    if tracing:  # after start-up: tracing the imports would slow it past the rig's patience
        tracemalloc.start(FRAMES)
    trim_at_s = [float(t) for t in os.environ.get("SOAK_TRACE_TRIM_AT_S", "").split(",") if t]
    base: tracemalloc.Snapshot | None = None
    base_types: collections.Counter[str] = collections.Counter()
    with (out / "curve.tsv").open("w") as curve:
        curve.write(
            "t_s\trss_mib\ttraced_mib\ttraced_peak_mib\tpymalloc_arenas\tglibc_used_mib\tglibc_free_mib\t"
            "gc_objects\n"
        )
        while True:
            time.sleep(every_s)
            t = time.monotonic() - t0
            traced, peak = tracemalloc.get_traced_memory()
            types = _type_counts()
            used, free = _glibc_mib()
            curve.write(
                f"{t:.0f}\t{_rss_mib():.1f}\t{traced / 2**20:.1f}\t{peak / 2**20:.1f}\t{_arenas()}\t"
                f"{used:.1f}\t{free:.1f}\t{sum(types.values())}\n"
            )
            if trim_at_s and t >= trim_at_s[0]:  # how much of the RSS is free memory glibc kept?
                trim_at_s.pop(0)
                before = _rss_mib()
                _LIBC.malloc_trim(0)
                curve.write(f"# malloc_trim(0) at {t:.0f} s: rss {before:.1f} -> {_rss_mib():.1f} MiB\n")
            curve.flush()
            if not tracing or t < base_s:
                continue
            snap = tracemalloc.take_snapshot().filter_traces(_FILTERS)
            if base is None:
                base, base_types = snap, types
                continue
            _write_diff(out / f"diff-{t:.0f}.txt", snap, base, types, base_types)


def _write_diff(
    path: Path,
    snap: tracemalloc.Snapshot,
    base: tracemalloc.Snapshot,
    types: collections.Counter[str],
    base_types: collections.Counter[str],
) -> None:
    with path.open("w") as f:
        f.write("== by line (grown since base) ==\n")
        for stat in snap.compare_to(base, "lineno")[:TOP]:
            f.write(f"{stat}\n")
        f.write("\n== by traceback (top 12 grown) ==\n")
        for stat in snap.compare_to(base, "traceback")[:12]:
            f.write(f"\n{stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks\n")
            f.write("\n".join(stat.traceback.format(limit=FRAMES)) + "\n")
        f.write("\n== object types (count grown since base) ==\n")
        grown = sorted(((n - base_types.get(k, 0), k, n) for k, n in types.items()), reverse=True)
        for d, k, n in grown[:TOP]:
            f.write(f"{d:+8d} {k} (now {n})\n")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rest = sys.argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    every_s = float(os.environ.get("SOAK_TRACE_EVERY_S", "60"))
    base_s = float(os.environ.get("SOAK_TRACE_BASE_S", "180"))
    threading.Thread(target=_watch, args=(out, every_s, base_s), daemon=True, name="soak-trace").start()
    sys.argv = ["switchboard", *rest]
    from gateway.cli import app

    app()


if __name__ == "__main__":
    main()
