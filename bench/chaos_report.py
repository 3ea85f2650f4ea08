"""The chaos run's figures: errors by cause per fault, recovery times, and the ledger against the answers.

Windows go by when a request was sent: "during" is [fault start, fault end), "after" is from the fault's end
to the next fault's start (or the end of the run). A failure counts as *on the killed process* when it was
in flight while the process was being killed (sent before the kill step returned, open when the signal went
out): for the engine, a `local` request whose ledger row (if any) names the engine; for the replica, a
request sent to that replica. Recovery: the first second after the fault's
end from which `recover_window_s` whole seconds pass with no other failure (or no more than the warm-up's
rate).
The goal is met when every failure is on a killed process and every answered request has its ledger row.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.chaos_load import Outcome

ENGINE_BACKEND = "engine"


@dataclass
class Fault:
    key: str
    what: str
    start: float = 0.0  # wall clock, when it was injected
    done_at: float = 0.0  # when the injecting step returned (a SIGKILLed process: reaped, surely dead)
    end: float = 0.0  # when it was healed (the killed process restarted, the freeze lifted...)
    back_at: float | None = None  # when the restored part was ready again (engine loaded, replica healthy)


def _through(o: Outcome, fault: Fault) -> bool:
    """`o` was in flight while the process was being killed: sent before it was surely dead (the kill step
    returned) and still open when the signal went out."""
    return o.start <= max(fault.start, fault.done_at) and o.end >= fault.start


@dataclass(frozen=True, slots=True)
class LedgerRow:
    http_status: int
    error_type: str | None
    backend: str | None
    created_at: float  # wall clock


@dataclass
class Report:
    outcomes: list[Outcome]
    faults: list[Fault]
    rows: dict[str, LedgerRow]
    t0: float
    warmup_s: float
    duration_s: float
    recover_window_s: float
    killed_replica: int
    on_killed: dict[int, str] = field(default_factory=dict)  # outcome index -> fault key; see classify()

    def __post_init__(self) -> None:
        self.classify()

    def classify(self) -> None:
        by = {f.key: f for f in self.faults}
        for o in self.outcomes:
            if o.ok:
                continue
            engine, replica = by.get("engine"), by.get("replica")
            if engine and o.model == "local" and _through(o, engine):
                row = self.rows.get(o.request_id)
                if row is None or row.backend == ENGINE_BACKEND:
                    self.on_killed[o.i] = engine.key
            if replica and o.replica == self.killed_replica and _through(o, replica):
                self.on_killed[o.i] = replica.key

    # ---- windows ---------------------------------------------------------------------------------------

    def window(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.start < end]

    def next_start(self, fault: Fault) -> float:
        later = [f.start for f in self.faults if f.start > fault.start]
        return min(later) if later else self.t0 + self.duration_s

    def baseline_rate(self) -> float:
        first = min(f.start for f in self.faults)
        warm = self.window(self.t0, first)
        return sum(not o.ok and o.i not in self.on_killed for o in warm) / len(warm) if warm else 0.0

    def recovery_s(self, fault: Fault) -> float | None:
        """Seconds from the fault's end until `recover_window_s` clean seconds begin; None: not in the gap."""
        end, gap_end = fault.end, self.next_start(fault)
        seconds = max(0, math.floor(gap_end - end))
        buckets = [self.window(end + k, end + k + 1) for k in range(seconds)]
        rate = self.baseline_rate()
        clean = [sum(not o.ok and o.i not in self.on_killed for o in b) <= rate * len(b) for b in buckets]
        need = int(self.recover_window_s)
        for k in range(len(clean) - need + 1):
            if all(clean[k : k + need]):
                return float(k)
        return None

    def back_in_service_s(self, fault: Fault) -> float | None:
        """The restored part serving again, seconds after the fault's end: the engine's first ledger row,
        or the restarted replica's first answer."""
        if fault.key == "engine":
            times = [r.created_at for r in self.rows.values() if r.backend == ENGINE_BACKEND]
        elif fault.key == "replica":
            times = [o.end for o in self.outcomes if o.ok and o.replica == self.killed_replica]
        else:
            return None
        after = [t for t in times if t > fault.end]
        return min(after) - fault.end if after else None

    # ---- the ledger ------------------------------------------------------------------------------------

    def ledger(self) -> dict[str, int]:
        ok = [o for o in self.outcomes if o.ok]
        failed = [o for o in self.outcomes if not o.ok]
        seen = {o.request_id for o in self.outcomes if o.request_id}
        return {
            "answered": len(ok),
            "answered_with_row": sum(o.request_id in self.rows for o in ok),
            "answered_row_not_200": sum(
                o.request_id in self.rows and self.rows[o.request_id].http_status != 200 for o in ok
            ),
            "answered_without_id": sum(not o.request_id for o in ok),
            "failed": len(failed),
            "failed_with_id": sum(bool(o.request_id) for o in failed),
            "failed_with_row": sum(o.request_id in self.rows for o in failed),
            "failed_without_id": sum(not o.request_id for o in failed),
            "rows": len(self.rows),
            "rows_unseen": sum(rid not in seen for rid in self.rows),
        }

    def missing(self) -> list[str]:
        return [o.request_id for o in self.outcomes if o.ok and o.request_id not in self.rows]


# ---- rendering -------------------------------------------------------------------------------------------


def _causes(outcomes: Sequence[Outcome]) -> str:
    counts = Counter(o.cause for o in outcomes if not o.ok)
    return "; ".join(f"{cause}: {n}" for cause, n in counts.most_common()) or "none"


def _pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def _lat(outcomes: Sequence[Outcome]) -> str:
    ms = [(o.end - o.start) * 1000 for o in outcomes if o.ok]
    return f"{_pct(ms, 50):.0f} / {_pct(ms, 99):.0f}" if ms else "n/a"


def _secs(value: float | None, none: str) -> str:
    return none if value is None else f"{value:.1f} s"


def fault_rows(r: Report) -> list[str]:
    lines = [
        "| fault | requests sent during | failed: in flight on the killed process | other failures during "
        "| failures after, to the next fault | recovered after the fault's end | restored part serving "
        "| ok p50 / p99 ms during |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for f in r.faults:
        during = [o for o in r.window(f.start, f.end) if o.i not in r.on_killed]
        after = [o for o in r.window(f.end, r.next_start(f)) if o.i not in r.on_killed]
        killed = [o for o in r.outcomes if r.on_killed.get(o.i) == f.key]
        killed_txt = _causes(killed) if f.key in ("engine", "replica") else "n/a (nothing killed)"
        gap = r.next_start(f) - f.end
        back = r.back_in_service_s(f)
        back_txt = "n/a" if f.key not in ("engine", "replica") else _secs(back, "not in the run")
        lines.append(
            f"| {f.what} ({f.end - f.start:.1f} s) | {len(r.window(f.start, f.end))} | {killed_txt} "
            f"| {_causes(during)} | {_causes(after)} "
            f"| {_secs(r.recovery_s(f), f'not within the {gap:.0f} s gap')} | {back_txt} "
            f"| {_lat(r.window(f.start, f.end))} |"
        )
    return lines


def verdict(r: Report) -> tuple[bool, list[str]]:
    failed = [o for o in r.outcomes if not o.ok]
    stray = [o for o in failed if o.i not in r.on_killed]
    missing = r.missing()
    lines = [
        f"- Failures not on a killed process: {len(stray)}"
        + (f" ({_causes(stray)})" if stray else "")
        + f"; answered requests missing from the ledger: {len(missing)}"
        + (f" (e.g. {', '.join(missing[:3])})" if missing else "")
        + "."
    ]
    for f in r.faults:
        if r.recovery_s(f) is None:
            lines.append(f"- `{f.key}`: failures went on to the next fault (no recovery within its gap).")
    ok = not stray and not missing
    return ok, lines


def _setup(r: Report, meta: dict[str, str]) -> str:
    first = min(f.start for f in r.faults)
    local, stream = float(meta["local_share"]), float(meta["stream_share"])
    return (
        f"Command: `{meta['command']}`. {meta['rate']} requests/s for {meta['duration_s']} s, open loop "
        "(each request is sent on schedule whatever the others do), round-robin over three "
        "`switchboard serve` replicas; a refused connection is retried on the next replica (as a load "
        f"balancer would), nothing else is. {local:.0%} of requests ask for `local` (the bundled engine, "
        f"`engine serve {meta['engine_flags']}`, {meta['engine_timeout_s']} s to its first token, falling "
        "back to a cloud deployment), the rest for `cloud` (deployment `primary`, falling back to "
        "`secondary`; both on the fake provider through litellm, `primary` with a "
        f"{meta['cloud_timeout_s']} s attempt timeout); {stream:.0%} are streams; 8 tokens each. Team "
        "objective `cost` (the engine, then `primary`, first). The replicas share one PostgreSQL schema "
        "(through a TCP proxy the bench cuts) and a private `redis-server` (rate limits with "
        "`limits.fail_open = true`, cache on); breakers, journal and other timeouts are the config "
        "defaults; the load driver is a trusted proxy (exempt from the per-client connection cap, as a "
        "balancer would be). "
        f"Warm-up {first - r.t0:.0f} s, then each fault for {meta['fault_s']} s and a recovery gap before "
        f"the next. Recovery: the first second after the fault's end that starts {r.recover_window_s:g} "
        f"seconds without a failure (warm-up failure rate {r.baseline_rate():.2%})."
    )


def render(r: Report, info: dict[str, str], meta: dict[str, str]) -> str:
    led = r.ledger()
    ok, verdict_lines = verdict(r)
    return "\n".join(
        [
            f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, "
            f"Python {info['python']}), commit {info['commit']}. 1-minute load average "
            f"{meta['load_start']} at the start and {meta['load_end']} at the end: the machine is shared "
            "with other sessions' work, so every process here (three gateways, the engine, the fake "
            "provider, Redis, PostgreSQL, the load driver) competed with it for two cores, and latencies "
            "are far above an idle machine's.",
            "",
            _setup(r, meta),
            "",
            *fault_rows(r),
            "",
            f"- Requests: {len(r.outcomes)}; answered {led['answered']}; lost (no complete answer) "
            f"{led['failed']} ({_causes(r.outcomes)}); of those, in flight on a killed process: "
            f"{len(r.on_killed)}.",
            f"- Ledger: {led['rows']} rows. Answered requests with their row: {led['answered_with_row']} "
            f"of {led['answered']} (rows whose status is not 200: {led['answered_row_not_200']}; answers "
            f"without an `x-request-id`: {led['answered_without_id']}). Failed requests: "
            f"{led['failed_with_id']} carried a request id, {led['failed_with_row']} of them have a row; "
            f"{led['failed_without_id']} got no response at all (no id to look up), against "
            f"{led['rows_unseen']} rows whose id no client saw. Rows by backend: "
            + ", ".join(
                f"{b}: {n}" for b, n in sorted(Counter(x.backend or "none" for x in r.rows.values()).items())
            )
            + ".",
            *verdict_lines,
            f"- Verdict: {'goal met' if ok else '**goal not met**'} (only requests on the killed process "
            "may fail; none missing from the ledger).",
        ]
    )
