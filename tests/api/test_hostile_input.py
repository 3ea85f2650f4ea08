"""Hostile input found by the security review: each case was a 500, a leak or a silent coercion before.

Integers beyond 64 bits gave a 500, lost the ledger row and leaked the team's concurrency slot and budget
reservation; strings and booleans were coerced into numbers and flags. Now each is a 400 naming the field.
Settlement whatever raises after admission: tests/unit/test_pipeline_settlement.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support.api_gateway import Gateway

BIG = 2**64
USER = [{"role": "user", "content": "x"}]
TOOL: dict[str, Any] = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("seed 2^64", {"seed": BIG}, "seed"),
    ("max_tokens 10^40", {"max_tokens": 10**40}, "max_tokens"),
    (
        "huge int in tools",
        {"tools": [{**TOOL, "function": {**TOOL["function"], "parameters": {"maxItems": BIG}}}]},
        "tools.0.function.parameters.maxItems",
    ),
    ("huge int in tool_choice", {"tool_choice": {"type": "function", "n": BIG}}, "tool_choice.n"),
    (
        "huge int in response_format",
        {"response_format": {"type": "json_object", "x": -BIG}},
        "response_format.x",
    ),
    (
        "huge int in a content part",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "n": BIG}]}]},
        "messages.0.content.0.n",
    ),
    ("stream as a string", {"stream": "yes"}, "stream"),
    ("max_tokens as a string", {"max_tokens": "100"}, "max_tokens"),
    ("max_tokens as a bool", {"max_tokens": True}, "max_tokens"),
    ("temperature as a string", {"temperature": "0.5"}, "temperature"),
    ("unknown name in order", {"switchboard": {"order": ["fakeoai", "typo"]}}, "switchboard.order"),
    ("unknown name in only", {"switchboard": {"only": ["nope"]}}, "switchboard.only"),
]


@pytest.mark.parametrize(("name", "extra", "param"), CASES, ids=[c[0] for c in CASES])
def test_hostile_values_are_400_naming_the_field(
    gateway: Gateway, name: str, extra: dict[str, Any], param: str
) -> None:
    body = json.dumps({"model": "fast", "messages": USER, **extra})  # json writes big integers as they are
    resp = httpx.post(gateway.v1 + "/chat/completions", content=body, headers=_auth(gateway.key()))
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"], err


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}
