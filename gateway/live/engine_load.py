"""Engine load read from a Prometheus /metrics page: our engine, vLLM and llama.cpp server dialects.

`parse_prometheus` keeps only the series we use, folding label sets into one value per metric (counts are
summed across e.g. vLLM's per-engine series, fractions take the max). It never raises on a bad line: it
skips it. `engine_load` maps any dialect to one `EngineLoad`; a missing or non-finite value is None.
`MetricsPoller` polls one URL in the background and never lets an error end its loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import httpx

from gateway.background import cancel_and_wait

log = logging.getLogger(__name__)


class Fold(StrEnum):
    """How several series of one metric (different labels) become one value."""

    SUM = "sum"
    MAX = "max"


QUEUE_DEPTH = ("switchboard_engine_queue_depth", "vllm:num_requests_waiting", "llamacpp:requests_deferred")
RUNNING = ("switchboard_engine_running_requests", "vllm:num_requests_running", "llamacpp:requests_processing")
KV_CACHE_USED_FRAC = (
    "switchboard_engine_kv_cache_usage_ratio",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "llamacpp:kv_cache_usage_ratio",
)
# vLLM's "_perc" gauges are fractions in [0, 1] despite the name ("1 means 100 percent usage").

WANTED: Mapping[str, Fold] = {
    **{name: Fold.SUM for name in QUEUE_DEPTH + RUNNING},
    **{name: Fold.MAX for name in KV_CACHE_USED_FRAC},
}


@dataclass(frozen=True, slots=True)
class EngineLoad:
    queue_depth: int | None
    running: int | None
    kv_cache_used_frac: float | None


def _split_sample(line: str) -> tuple[str, str] | None:
    """`name{labels} value [timestamp]` -> (name, value text); None for a line that is not a sample."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        end = _labels_end(line, brace)
        if end == -1:
            return None
        name, rest = line[:brace], line[end + 1 :]
    elif space != -1:
        name, rest = line[:space], line[space:]
    else:
        return None
    fields = rest.split()
    return (name, fields[0]) if fields else None


def _labels_end(line: str, start: int) -> int:
    """Index of the `}` closing the label set opened at `start`; label values may hold `}`, `"` (escaped)."""
    quoted = False
    i = start + 1
    while i < len(line):
        ch = line[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return i
        i += 1
    return -1


def parse_prometheus(text: str, wanted: Mapping[str, Fold] = WANTED) -> dict[str, float]:
    """The `wanted` metrics found in `text`, one value each. NaN samples are skipped; +Inf is kept."""
    values: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        split = _split_sample(line)
        if split is None or split[0] not in wanted:
            continue
        name, value_text = split
        try:
            value = float(value_text)
        except ValueError:
            continue
        if math.isnan(value):
            continue
        if name not in values:
            values[name] = value
        elif wanted[name] is Fold.SUM:
            values[name] += value
        else:
            values[name] = max(values[name], value)
    return values


def _first(values: Mapping[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = values.get(name)
        if value is not None and math.isfinite(value):
            return value
    return None


def _count(value: float | None) -> int | None:
    return None if value is None else max(0, round(value))


def engine_load(values: Mapping[str, float]) -> EngineLoad:
    """Map whichever dialect `values` came from; the first name listed in each tuple above wins."""
    kv = _first(values, KV_CACHE_USED_FRAC)
    return EngineLoad(
        queue_depth=_count(_first(values, QUEUE_DEPTH)),
        running=_count(_first(values, RUNNING)),
        kv_cache_used_frac=None if kv is None else min(1.0, max(0.0, kv)),
    )


class MetricsPoller:
    """Every `interval_s`, GET `url`, parse it and hand an `EngineLoad` to `on_reading`. Failures are logged
    (once per outage, not per poll) and the loop goes on; the last reading then expires in the StatsBook."""

    def __init__(
        self,
        url: str,
        interval_s: float,
        on_reading: Callable[[EngineLoad], None],
        *,
        timeout_s: float = 1.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.url = url
        self.interval_s = interval_s
        self._on_reading = on_reading
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=self._timeout)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def poll_once(self) -> EngineLoad:
        """One reading, passed to `on_reading` and returned. Raises httpx errors (the loop catches them)."""
        response = await self._client.get(self.url, timeout=self._timeout)
        response.raise_for_status()
        load = engine_load(parse_prometheus(response.text))
        self._on_reading(load)
        return load

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"metrics-poller {self.url}")

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except httpx.HTTPStatusError as exc:
                self._note_failure(f"HTTP {exc.response.status_code}")
            except httpx.HTTPError as exc:
                self._note_failure(type(exc).__name__)
            except Exception:  # noqa: BLE001 - a background loop, like the engine loop: log, keep polling
                log.exception("metrics poller %s: reading failed", self.url)
                self._failing = True
            else:
                if self._failing:
                    log.info("metrics poller %s: readings resumed", self.url)
                self._failing = False
            await asyncio.sleep(self.interval_s)

    def _note_failure(self, reason: str) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(
            level,
            "metrics poller %s: no reading (%s); retrying every %gs",
            self.url,
            reason,
            self.interval_s,
        )
        self._failing = True

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._owns_client:
            await self._client.aclose()
