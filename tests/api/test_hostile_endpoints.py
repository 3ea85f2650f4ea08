"""The security review's hostile-input and detector-evasion cases, on every endpoint besides chat.

Each API forwards its own fields: a value hidden by an evasion (fullwidth characters, zero-width joiners,
entities, base64 inside percent-encoding...) must be caught wherever the endpoint puts it, so the request
fails closed before the external-only model `cloud-gpt` / `cloud-claude` sees it. Integers beyond 64 bits
are a 400 in the endpoint's own envelope, never a 500.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.api_gateway import Gateway
from tests.support.privacy_corpus_v2 import evasions

BIG = 2**64
HI = {"role": "user", "content": "hi"}


def tool_use(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": "t1", "name": "f", "input": arguments}


def _evasive_texts() -> list[tuple[str, str]]:
    out = []
    for case in evasions():
        users = [m for m in case.messages if m.get("role") == "user"]
        if len(users) == 1 and isinstance(users[0]["content"], str):
            out.append((case.label, str(users[0]["content"])))
    return out


EVASIVE = _evasive_texts()
Body = Callable[[str], tuple[str, dict[str, Any], dict[str, str]]]

# endpoint -> (path, body carrying the text in one of the endpoint's own fields, extra headers)
CARRIERS: dict[str, Body] = {
    "completions/prompt": lambda t: ("/v1/completions", {"model": "cloud-gpt", "prompt": t}, {}),
    "responses/input": lambda t: ("/v1/responses", {"model": "cloud-gpt", "input": t, "store": False}, {}),
    "responses/instructions": lambda t: (
        "/v1/responses",
        {"model": "cloud-gpt", "input": "hi", "instructions": t, "store": False},
        {},
    ),
    "responses/function_call_output": lambda t: (
        "/v1/responses",
        {
            "model": "cloud-gpt",
            "store": False,
            "input": [
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": t},
            ],
        },
        {},
    ),
    "messages/system": lambda t: (
        "/v1/messages",
        {"model": "cloud-claude", "max_tokens": 8, "system": t, "messages": [HI]},
        {"anthropic-version": "2023-06-01"},
    ),
    "messages/tool_result": lambda t: (
        "/v1/messages",
        {
            "model": "cloud-claude",
            "max_tokens": 8,
            "messages": [
                {"role": "user", "content": "look it up"},
                {"role": "assistant", "content": [tool_use({})]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": t}]},
            ],
        },
        {"anthropic-version": "2023-06-01"},
    ),
}


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
def test_evasive_sensitive_data_never_leaves_on_any_endpoint(gateway: Gateway, carrier: str) -> None:
    key = gateway.key()
    marker = uuid.uuid4().hex
    missed = []
    with httpx.Client(base_url=gateway.base_url, timeout=20) as client:
        for label, text in EVASIVE:
            path, body, headers = CARRIERS[carrier](f"{text} ref {marker}")
            reply = client.post(path, json=body, headers={"authorization": f"Bearer {key}", **headers})
            if reply.status_code == 200:
                missed.append(label)
            else:
                assert reply.status_code in (400, 403), (label, reply.status_code, reply.text)
                assert marker not in reply.text
    assert not missed, f"{carrier}: sent out {missed}"
    for upstream in ("gpt-4o-mini", "claude-haiku-4-5"):
        assert not any(marker in json.dumps(r["body"]) for r in gateway.fake.received(upstream))


HUGE: list[tuple[str, str, dict[str, Any], dict[str, str], str]] = [
    ("completions seed", "/v1/completions", {"model": "fast", "prompt": "x", "seed": BIG}, {}, "seed"),
    (
        "completions max_tokens",
        "/v1/completions",
        {"model": "fast", "prompt": "x", "max_tokens": 10**40},
        {},
        "max_tokens",
    ),
    (
        "responses max_output_tokens",
        "/v1/responses",
        {"model": "fast", "input": "x", "max_output_tokens": 10**40},
        {},
        "max_output_tokens",
    ),
    (
        "responses tool schema",
        "/v1/responses",
        {
            "model": "fast",
            "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"maxItems": BIG}}],
        },
        {},
        "tools",
    ),
    (
        "messages max_tokens",
        "/v1/messages",
        {"model": "fast", "max_tokens": 10**40, "messages": [{"role": "user", "content": "x"}]},
        {"anthropic-version": "2023-06-01"},
        "max_tokens",
    ),
    (
        "messages tool input",
        "/v1/messages",
        {
            "model": "fast",
            "max_tokens": 8,
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [tool_use({"n": BIG})]},
            ],
        },
        {"anthropic-version": "2023-06-01"},
        "messages",
    ),
]


@pytest.mark.parametrize(("name", "path", "body", "headers", "param"), HUGE, ids=[h[0] for h in HUGE])
def test_integers_beyond_64_bits_are_400_in_the_endpoints_envelope(
    gateway: Gateway, name: str, path: str, body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    reply = httpx.post(
        gateway.base_url + path,
        content=json.dumps(body),
        headers={"authorization": f"Bearer {gateway.key()}", "content-type": "application/json", **headers},
        timeout=20,
    )
    assert reply.status_code == 400, reply.text
    got = reply.json()
    if path == "/v1/messages":
        assert got["type"] == "error" and got["error"]["type"] == "invalid_request_error"
        assert param in got["error"]["message"]
    else:
        assert got["error"]["type"] == "invalid_request_error"
        assert (got["error"]["param"] or "").startswith(param), got
