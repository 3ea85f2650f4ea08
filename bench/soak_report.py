"""The soak's judgement and its outputs: verdicts against the goals, the PNG of the curves, the markdown.

Warm-up is the first 10% of the run, at most 3 minutes. *Late* is the run's last tenth. RSS: the late median
at most 5% over the median of the tenth right after warm-up. File descriptors, asyncio tasks and threads:
the late median no higher than the maximum seen from warm-up to mid-run (they swing with the requests in
flight and pools grow to their caps, so a level that leaks climbs out of the range it had at mid-run).
Spill file: empty once the run settles; after each injected outage it is replayed (empty again) before the
next one, and no outage leaves a file larger than 1.5x the first one's plus 64 KiB (it does not grow from
outage to outage); without outages it is never written. Ledger: each request id the client saw answered or
left has exactly one row (rows the client has no id for are the timed-out ones), and its status is what
the client saw.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RSS_GROWTH_GOAL = 0.05
WARMUP_SHARE, WARMUP_MAX_S = 0.10, 180.0
WINDOW_SHARE = 0.10
SPILL_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # since the load started
    rss_mib: float
    fds: int
    threads: int
    tasks: int | None  # switchboard_asyncio_tasks from /metrics (None: the scrape failed)
    spill_bytes: int  # the spill file and its `.replaying` twin
    queued: int | None  # switchboard_ledger_queued
    in_flight: int  # the driver's requests not yet finished
    db_down: bool  # an injected database outage is on


@dataclass(frozen=True, slots=True)
class Outage:
    start_s: float
    end_s: float
    peak_bytes: int  # the spill file's size when the database came back
    drained_s: float | None  # from the end of the outage until the file was empty (None: not before the next)


@dataclass
class Outcomes:
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    ids: dict[str, tuple[str, str]] = field(default_factory=dict)  # x-request-id -> (kind, outcome)
    skipped: int = 0  # launches dropped because the driver already had its maximum in flight

    def add(self, kind: str, outcome: str, request_id: str | None) -> None:
        counts = self.by_kind.setdefault(kind, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        if request_id is not None:
            self.ids[request_id] = (kind, outcome)

    def total(self, pred: Callable[[str], bool] = lambda _: True) -> int:
        return sum(n for counts in self.by_kind.values() for o, n in counts.items() if pred(o))


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    met: bool
    detail: str


def warmup_s(duration_s: float) -> float:
    return min(WARMUP_MAX_S, WARMUP_SHARE * duration_s)


def windows(
    samples: Sequence[Sample], duration_s: float, early_end_s: float
) -> tuple[list[Sample], list[Sample]]:
    """(early, late): from warm-up to `early_end_s`, and the run's last tenth (samples under load only)."""
    w = warmup_s(duration_s)
    loaded = [s for s in samples if s.t_s <= duration_s]
    early = [s for s in loaded if w <= s.t_s <= early_end_s]
    late = [s for s in loaded if s.t_s >= duration_s * (1 - WINDOW_SHARE)]
    return early, late


def _level(name: str, early: list[float], late: list[float], unit: str = "") -> Verdict:
    if not early or not late:
        return Verdict(f"no {name} growth", False, "too few samples")
    e_med, e_max, l_med = statistics.median(early), max(early), statistics.median(late)
    return Verdict(
        f"no {name} growth",
        l_med <= e_max,
        f"warm-up to mid-run median {e_med:.0f}{unit} (max {e_max:.0f}), late median {l_med:.0f}{unit}",
    )


def slope_per_hour(samples: Sequence[Sample], value: Callable[[Sample], float]) -> float:
    """Least-squares slope of `value` over time, per hour."""
    if len(samples) < 2:
        return 0.0
    xs, ys = [s.t_s for s in samples], [value(s) for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def spill_verdict(samples: Sequence[Sample], outages: Sequence[Outage], final_bytes: int) -> Verdict:
    name = "spill file bounded"
    if not outages:
        peak = max((s.spill_bytes for s in samples), default=0)
        return Verdict(name, peak == 0 and final_bytes == 0, f"no outage injected; largest size {peak} bytes")
    peaks = [o.peak_bytes for o in outages]
    drained = [o.drained_s for o in outages[:-1]]  # the last one may be cut short by the end of the load
    met = final_bytes == 0 and None not in drained and max(peaks) <= 1.5 * peaks[0] + SPILL_SLACK_BYTES
    shown = [f"{o.peak_bytes / 1024:.0f} KiB" for o in outages]
    times = ["-" if o.drained_s is None else f"{o.drained_s:.1f} s" for o in outages]
    return Verdict(
        name,
        met,
        f"size at the end of each outage: {', '.join(shown)}; replayed (empty) after: {', '.join(times)}; "
        f"{final_bytes} bytes left once the run settled",
    )


def judge(
    samples: Sequence[Sample], duration_s: float, outages: Sequence[Outage], final_spill_bytes: int
) -> list[Verdict]:
    early, late = windows(samples, duration_s, warmup_s(duration_s) + WINDOW_SHARE * duration_s)
    out = []
    if early and late:
        e, lt = statistics.median(s.rss_mib for s in early), statistics.median(s.rss_mib for s in late)
        post = [s for s in samples if warmup_s(duration_s) <= s.t_s <= duration_s]
        trend = slope_per_hour(post, lambda s: s.rss_mib)
        out.append(
            Verdict(
                f"RSS growth after warm-up <= {RSS_GROWTH_GOAL:.0%}",
                lt <= e * (1 + RSS_GROWTH_GOAL),
                f"early median {e:.1f} MiB, late median {lt:.1f} MiB ({(lt / e - 1):+.1%}); "
                f"trend after warm-up {trend:+.1f} MiB/h",
            )
        )
    else:
        out.append(Verdict(f"RSS growth after warm-up <= {RSS_GROWTH_GOAL:.0%}", False, "too few samples"))
    early, late = windows(samples, duration_s, duration_s / 2)
    out.append(_level("file-descriptor", [s.fds for s in early], [s.fds for s in late]))
    tasks_e = [s.tasks for s in early if s.tasks is not None]
    tasks_l = [s.tasks for s in late if s.tasks is not None]
    out.append(_level("asyncio-task", [float(t) for t in tasks_e], [float(t) for t in tasks_l]))
    out.append(_level("thread", [s.threads for s in early], [s.threads for s in late]))
    out.append(spill_verdict(samples, outages, final_spill_bytes))
    return out


@dataclass
class LedgerCheck:
    """The ledger against what the client saw. Keys of the dicts are short readable labels."""

    rows: int = 0
    duplicates: int = 0  # rows beyond the first for one request id
    missing_answered: dict[str, int] = field(default_factory=dict)  # 2xx or a client that left: no row
    missing_refused: dict[str, int] = field(default_factory=dict)  # refused before any row (by design)
    disagree: dict[str, int] = field(default_factory=dict)  # the row's status is not what the client saw
    unmatched: dict[str, int] = field(default_factory=dict)  # rows for ids the client never saw, by status
    no_id: int = 0  # requests without an answer head (timed out, transport errors)

    @property
    def one_row_each(self) -> bool:
        """Every request the client saw answered or left has one row; the rows without an id the client saw
        are no more than the requests that had none."""
        extra = sum(self.unmatched.values())
        return not (self.duplicates or self.missing_answered) and extra <= self.no_id


def _expected(outcome: str) -> tuple[str, int | None]:
    if outcome == "ok":
        return "ok", 200
    if outcome == "disconnected":
        return "client_closed", None
    return "error", int(outcome.removeprefix("http_"))


def check_ledger(outcomes: Outcomes, rows: Sequence[tuple[str, str, int]]) -> LedgerCheck:
    """`rows`: (request_id, status, http_status) of every ledger row written during the run."""
    check = LedgerCheck(rows=len(rows))
    check.no_id = outcomes.total() - len(outcomes.ids)
    by_id: dict[str, tuple[str, int]] = {}
    for rid, status, http in rows:
        if rid in by_id:
            check.duplicates += 1
        by_id[rid] = (status, http)
    for rid, (kind, outcome) in outcomes.ids.items():
        found = by_id.pop(rid, None)
        if found is None:
            into = check.missing_refused if outcome.startswith("http_") else check.missing_answered
            _bump(into, f"{kind}: {outcome}")
            continue
        want_status, want_http = _expected(outcome)
        if found[0] != want_status or (want_http is not None and found[1] != want_http):
            _bump(check.disagree, f"{kind}: client saw {outcome}, row {found[0]} {found[1]}")
    for status, http in by_id.values():
        _bump(check.unmatched, f"{status} {http}")
    return check


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def draw(samples: Sequence[Sample], duration_s: float, outages: Sequence[Outage], path: Path) -> None:
    """Four panels over minutes: RSS, fds and threads, asyncio tasks, spill bytes (with outages shaded)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True)
    minutes = [s.t_s / 60 for s in samples]
    panels: list[tuple[str, list[tuple[str, list[float]]]]] = [
        ("RSS (MiB)", [("gateway RSS", [s.rss_mib for s in samples])]),
        ("count", [("open fds", [float(s.fds) for s in samples]),
                   ("threads", [float(s.threads) for s in samples])]),
        ("count", [("asyncio tasks", [float("nan") if s.tasks is None else s.tasks for s in samples]),
                   ("driver in flight", [float(s.in_flight) for s in samples])]),
        ("KiB", [("spill file", [s.spill_bytes / 1024 for s in samples])]),
    ]  # fmt: skip
    for ax, (ylabel, lines) in zip(axes, panels, strict=True):
        for label, ys in lines:
            ax.plot(minutes, ys, label=label, linewidth=1)
        ax.axvspan(0, warmup_s(duration_s) / 60, color="0.9")
        for o in outages:
            ax.axvspan(o.start_s / 60, o.end_s / 60, color="tab:red", alpha=0.15)
        ax.axvline(duration_s / 60, color="0.5", linestyle="--", linewidth=1)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes (grey: warm-up; red: database outage injected; dashed: load stops)")
    axes[0].set_title("switchboard soak: one gateway process")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def outcome_table(outcomes: Outcomes) -> list[str]:
    """One row per kind: requests sent and their outcomes; unusual outcomes are named in the last column."""
    cols = ["ok", "http_429", "disconnected", "timed_out"]
    lines = [
        "| kind | sent | ok | 429 | client left mid-stream | client timed out | other |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, counts in sorted(outcomes.by_kind.items()):
        other = ", ".join(f"{o} x{n}" for o, n in sorted(counts.items()) if o not in cols) or "-"
        cells = " | ".join(str(counts.get(c, 0)) for c in cols)
        lines.append(f"| {kind} | {sum(counts.values())} | {cells} | {other} |")
    return lines


def update_doc(path: Path, section: str, start: str, end: str, heading: str) -> None:
    """Replace the text between the markers in `path`, or append the section under `heading`."""
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text)
