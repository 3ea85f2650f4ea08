"""The fake provider's tool-call wire shapes (tests/support/fake_wire.py, fake_tools.py), read back as a
client would: the other tests trust them to say exactly what they were scripted to say."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.support import fake_tools, fake_wire

TOOLS = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]
CALLS = (("f", '{"a": [1, 2], "b": "xyz"}'), ("g", '{"tz":"UTC"}'))
ASK = {"model": "m", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS}


def answer(body: dict[str, Any] = ASK, **kwargs: Any) -> fake_wire.Answer:
    return fake_wire.make_answer(body, 8, tool_calls=CALLS, nonce="n", **kwargs)


def sse_payloads(events: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for event in events:
        data = event.split(b"data: ", 1)[1].strip()
        if data != b"[DONE]":
            out.append(orjson.loads(data))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100])
def test_split_pieces_rejoin(n: int) -> None:
    text = '{"city": "Zürich"}'
    pieces = fake_tools.split_pieces(text, n)
    assert "".join(pieces) == text and len(pieces) == min(n, len(text)) and all(pieces)
    assert fake_tools.split_pieces("", n) == []


def test_calls_only_when_the_request_offers_tools() -> None:
    assert answer().stop_kind == "tool_calls" and [c.name for c in answer().tool_calls] == ["f", "g"]
    no_tools = {k: v for k, v in ASK.items() if k != "tools"}
    assert answer(no_tools).tool_calls == () and answer(no_tools).stop_kind == "stop"
    ids = [c.id for c in answer(id_prefix="toolu_").tool_calls]
    assert all(i.startswith("toolu_") for i in ids) and len(set(ids)) == 2


@pytest.mark.parametrize("interleave", [False, True])
def test_openai_stream_carries_each_call_in_pieces(interleave: bool) -> None:
    said = answer(tool_text="hi there")
    chunks = sse_payloads(fake_wire.openai_stream_events("m", said, 0, False, interleave=interleave))
    parts = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls", ())]
    order = [p["index"] for p in parts]
    assert order == ([0, 1, 0, 1, 0, 1, 0, 1] if interleave else [0, 0, 0, 0, 1, 1, 1, 1])
    for index, (name, arguments) in enumerate(CALLS):
        mine = [p for p in parts if p["index"] == index]
        assert mine[0]["function"] == {"name": name, "arguments": ""} and mine[0]["id"].startswith("call_")
        assert "".join(p["function"]["arguments"] for p in mine) == arguments
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hi there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_stream_has_a_block_per_call() -> None:
    said = answer(tool_text="hi", id_prefix="toolu_")
    events = sse_payloads(fake_wire.anthropic_stream_events("m", said, arg_pieces=3))
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    for start, call in zip(starts[1:], said.tool_calls, strict=True):
        assert start["content_block"] == {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        deltas = [
            e["delta"]["partial_json"]
            for e in events
            if e["type"] == "content_block_delta" and e["index"] == start["index"]
        ]
        assert len(deltas) == 3 and "".join(deltas) == call.arguments
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    whole = orjson.loads(fake_wire.anthropic_message("m", said))
    assert [b["type"] for b in whole["content"]] == ["text", "tool_use", "tool_use"]
    assert whole["content"][1]["input"] == orjson.loads(CALLS[0][1])


def test_tool_results_are_echoed_with_their_digest() -> None:
    openai_body = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": []},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
        ],
        "tools": TOOLS,
    }
    anthropic_body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "14:05"},
                ],
            }
        ],
        "tools": TOOLS,
    }
    want = f"saw call_1={fake_tools.digest('sunny')} call_2={fake_tools.digest('14:05')}"
    for body in (openai_body, anthropic_body):
        said = answer(body)
        assert said.text == want and said.stop_kind == "stop" and said.tool_calls == ()
