"""Our engine's /metrics page, as the gateway's engine-load reader sees it: a renamed gauge on either side
fails here (the reader's list of names is pinned in tests/unit/test_engine_metrics.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # backends.local.metrics imports the engine, which imports torch

from prometheus_client import generate_latest  # noqa: E402

from backends.local.engine.engine import EngineStats  # noqa: E402
from backends.local.metrics import EngineMetrics  # noqa: E402
from gateway.live.engine_load import EngineLoad, engine_load, parse_prometheus  # noqa: E402


def _page(**stats: int) -> str:
    """The /metrics page for an engine at these stats (the rest: idle, 8 KV blocks, all free)."""
    metrics = EngineMetrics()
    fields = dict(
        waiting=0,
        running=0,
        kv_blocks_total=8,
        kv_blocks_free=8,
        preemptions=0,
        prefix_hit_tokens=0,
        drafted_tokens=0,
        accepted_tokens=0,
    )
    snapshot = EngineStats(**(fields | stats))
    metrics.watch(lambda: snapshot)
    return generate_latest(metrics.registry).decode()


def test_the_engine_publishes_what_the_reader_parses() -> None:
    page = _page(waiting=3, running=2, kv_blocks_free=6)
    values = parse_prometheus(page)
    assert set(values) == {
        "switchboard_engine_queue_depth",
        "switchboard_engine_running_requests",
        "switchboard_engine_kv_cache_usage_ratio",
    }
    assert engine_load(values) == EngineLoad(queue_depth=3, running=2, kv_cache_used_frac=0.25)


def test_the_engine_publishes_its_prefill_budget_and_short_prompt_rule() -> None:
    # What calibrate.py records with a measured curve, so the simulator chunks prompts as that engine did.
    page = _page(prefill_tokens_per_step=256, short_prefill_tokens=128)
    assert "switchboard_engine_prefill_tokens_per_step 256.0" in page
    assert "switchboard_engine_short_prefill_tokens 128.0" in page


def test_the_engine_counts_requests_re_queued_for_missing_their_deadline() -> None:
    assert "switchboard_engine_requeued_late_total 3.0" in _page(requeued_late=3)


def test_the_engine_counts_steps_of_short_prompts_alone() -> None:
    assert "switchboard_engine_short_steps_total 5.0" in _page(short_steps=5)
