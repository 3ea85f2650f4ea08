"""Ledger rows written through the live gateway, checked field by field, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time
from decimal import Decimal

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai import OpenAI

from tests.support.api_gateway import Gateway

HELLO = [{"role": "user", "content": "Count to three"}]


def cost(prompt: int, completion: int, price_in: str, price_out: str) -> int:
    exact = prompt * Decimal(price_in) + completion * Decimal(price_out)
    return int(exact.to_integral_value(rounding="ROUND_HALF_UP"))


def test_row_for_completion(any_gateway: Gateway) -> None:
    gw = any_gateway
    from gateway.store import keys

    created = keys.create_key(gw.db, "alpha", name="ledger", models=None, expires_at=None)
    before = dt.datetime.now(dt.UTC)
    raw = OpenAI(
        base_url=gw.v1, api_key=created.plaintext, max_retries=0
    ).chat.completions.with_raw_response.create(model="fast", messages=HELLO)
    completion = raw.parse()
    row = gw.usage_row(raw.headers["x-request-id"])
    assert completion.usage is not None
    assert row["team"] == "alpha" and row["key_id"] == created.key_id
    assert row["endpoint"] == "chat.completions"
    assert row["requested_model"] == "fast" and row["backend"] == "fakeoai" and row["served_model"] == "fast"
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    assert row["completion_tokens"] == completion.usage.completion_tokens
    assert row["cost_micro_usd"] == cost(row["prompt_tokens"], row["completion_tokens"], "1.5", "6")
    assert row["cost_micro_usd"] > 0
    assert row["status"] == "ok" and row["http_status"] == 200 and row["error_type"] is None
    assert row["stream"] is False or row["stream"] == 0
    assert not row["cache_hit"] and row["privacy_class"] == "external" and row["route_reason"]
    assert row["attempts"] == 1
    ranked = json.loads(row["route_candidates"])
    assert [c["deployment"] for c in ranked] == ["fast@fakeoai"]
    assert set(ranked[0]) == {
        "deployment", "backend", "ttft_ms", "latency_ms", "cost_usd", "score", "slo_met", "usd_per_hour",
        "affinity",
    }  # fmt: skip
    assert 0 < row["latency_ms"] < 10_000 and row["ttft_ms"] is None
    assert before - dt.timedelta(seconds=1) <= row["created_at"] <= dt.datetime.now(dt.UTC)


def test_row_for_stream_has_ttft_and_usage(any_gateway: Gateway) -> None:
    gw = any_gateway
    gw.fake.configure("mslow", ttft_ms=50, tokens_per_s=200, n_tokens=10)
    raw = OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0).chat.completions.with_raw_response.create(
        model="mslow", messages=HELLO, stream=True
    )
    list(raw.parse())
    row = gw.usage_row(raw.headers["x-request-id"])
    assert row["stream"] and row["status"] == "ok"
    assert row["completion_tokens"] == 10
    assert 50 <= row["ttft_ms"] <= row["latency_ms"]
    assert row["latency_ms"] >= 50 + 9 * 5 * 0.9


def test_row_for_upstream_error(any_gateway: Gateway) -> None:
    gw = any_gateway
    gw.fake.configure("m500", fail_status=500)
    sdk = OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        sdk.chat.completions.create(model="m500", messages=HELLO)
    row = gw.usage_row(info.value.response.headers["x-request-id"])
    assert row["status"] == "error" and row["http_status"] == 503
    assert row["error_type"] == "upstream_unavailable" and row["backend"] == "fakeoai"
    assert row["cost_micro_usd"] == 0 and row["prompt_tokens"] == 0


def test_row_for_refused_model_and_none_for_bad_key(any_gateway: Gateway) -> None:
    gw = any_gateway
    resp = httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "nope", "messages": HELLO},
        headers={"authorization": f"Bearer {gw.key('beta')}"},
    )
    assert resp.status_code == 404
    row = gw.usage_row(resp.headers["x-request-id"])
    assert row["status"] == "error" and row["error_type"] == "model_not_found" and row["backend"] is None
    assert row["endpoint"] == "chat.completions"  # refused before routing: still the endpoint called
    resp = httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "fast", "messages": HELLO},
        headers={"authorization": "Bearer sk-sb-" + "y" * 43},
    )
    assert resp.status_code == 401
    time.sleep(0.2)
    assert gw.count_rows(resp.headers["x-request-id"]) == 0


def test_client_disconnect_mid_stream_is_recorded(any_gateway: Gateway) -> None:
    gw = any_gateway
    gw.fake.configure("mslow", ttft_ms=10, tokens_per_s=20, n_tokens=200)
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        json={"model": "mslow", "messages": HELLO, "stream": True},
        headers={"authorization": f"Bearer {gw.key()}"},
    ) as resp:
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break
    row = gw.usage_row(request_id)
    assert row["status"] == "client_closed" and row["http_status"] == 499
    assert gw.count_rows(request_id) == 1


def test_a_cut_stream_is_charged_for_what_was_produced(any_gateway: Gateway) -> None:
    """A stream the client leaves after some tokens: its row counts them (and the prompt) and charges them,
    or repeated cuts would be free output no budget sees."""
    gw = any_gateway
    gw.fake.configure("mslow", ttft_ms=10, tokens_per_s=50, n_tokens=400)
    read = 0
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        json={"model": "mslow", "messages": HELLO, "stream": True},
        headers={"authorization": f"Bearer {gw.key()}"},
    ) as resp:
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                read += 1
                if read == 10:
                    break
    row = gw.usage_row(request_id)
    assert row["status"] == "client_closed" and gw.count_rows(request_id) == 1
    assert 10 <= row["completion_tokens"] < 400  # what was produced before the cut, not all nor none
    assert row["prompt_tokens"] > 0
    assert row["cost_micro_usd"] == cost(row["prompt_tokens"], row["completion_tokens"], "1.5", "6")


def test_a_non_streamed_client_that_gives_up_cancels_the_upstream(any_gateway: Gateway) -> None:
    """The client times out: the gateway notices the disconnect, cancels the attempt (the upstream sees its
    connection close) and records client_closed, not an answer nobody received."""
    from gateway.store import keys

    gw = any_gateway
    gw.fake.configure("mslow", ttft_ms=3000, tokens_per_s=0, n_tokens=8)
    key = keys.create_key(gw.db, "alpha", name="gives-up", models=None, expires_at=None)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.v1 + "/chat/completions",
            json={"model": "mslow", "messages": HELLO},
            headers={"authorization": f"Bearer {key.plaintext}"},
            timeout=httpx.Timeout(10, read=0.5),
        )
    row = None
    deadline = time.monotonic() + 10
    while row is None and time.monotonic() < deadline:
        with gw.db.connect() as conn:
            row = conn.execute(
                sa.text("SELECT status, http_status FROM usage WHERE key_id = :k"), {"k": key.key_id}
            ).first()
        if row is None:
            time.sleep(0.05)
    # Recorded before the upstream's 3 s answer would have come: the attempt was cancelled, not awaited.
    assert time.monotonic() - started < 2.5
    assert row is not None and (row.status, row.http_status) == ("client_closed", 499)
    gw.fake.configure("mslow", ttft_ms=0)


def test_cloud_rows_price_from_config_and_from_litellm_map(gateway: Gateway) -> None:
    sdk = OpenAI(base_url=gateway.v1, api_key=gateway.key(), max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(model="cloud-gpt", messages=HELLO)
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert row["backend"] == "cloud_openai"
    assert row["cost_micro_usd"] == cost(row["prompt_tokens"], row["completion_tokens"], "0.15", "0.60")
    raw = sdk.chat.completions.with_raw_response.create(model="cloud-claude", messages=HELLO)
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert row["backend"] == "cloud_anthropic" and row["completion_tokens"] > 0
    # claude-haiku-4-5 in litellm's local map: 1 / 5 USD per Mtok
    assert row["cost_micro_usd"] == cost(row["prompt_tokens"], row["completion_tokens"], "1", "5")
