"""Tool calls end to end through the chat completions API, with the official `openai` SDK.

The fake provider is scripted to answer with tool calls (tests/support/fake_provider.py: `tool_calls`), in
OpenAI's wire format behind an OpenAI-compatible backend and behind litellm's openai provider, and in
Anthropic's behind litellm's anthropic provider. Each call must reach the client with its id, name and
arguments intact, streamed (arguments in pieces, accumulated by index as SDK users do) or not; the client then
sends the results back and the fake's final answer names each result's call id and digest. Peers lose data
exactly here (LiteLLM #25836, #25561: streamed arguments dropped; #21744: a malformed call became `stop`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from openai import OpenAI

from tests.support.api_gateway import TOOL_UPSTREAMS, Gateway
from tests.support.fake_tools import digest

MODELS = tuple(TOOL_UPSTREAMS)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a zone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]
WEATHER = ("get_weather", '{"city": "Zürich", "days": [1, 2], "detail": {"wind": true, "note": "a \\"b\\""}}')
TIME = ("get_time", '{"tz":"Europe/Paris"}')
MALFORMED = ("get_weather", '{"city": "Par')


@dataclass
class Reply:
    """What an SDK user ends up with: the assistant message's parts, however they arrived."""

    content: str | None
    calls: list[dict[str, str]]
    finish_reason: str | None
    request_id: str
    cache: str
    pieces: dict[int, int] = field(default_factory=dict)  # streamed: argument pieces per call index


def client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0, timeout=20)


def ask(sdk: OpenAI, model: str, messages: list[dict[str, Any]], *, stream: bool, **extra: Any) -> Reply:
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=messages, tools=TOOLS, stream=stream, **extra
    )
    request_id, cache = raw.headers["x-request-id"], raw.headers.get("x-switchboard-cache", "")
    if not stream:
        choice = raw.parse().choices[0]
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or ()
            if c.type == "function"
        ]
        return Reply(choice.message.content, calls, choice.finish_reason, request_id, cache)
    text: list[str] = []
    by_index: dict[int, dict[str, str]] = {}
    pieces: dict[int, int] = {}
    finish: str | None = None
    for chunk in raw.parse():
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or ():
                call = by_index.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                if part.function is not None:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
                    pieces[part.index] = pieces.get(part.index, 0) + bool(part.function.arguments)
    calls = [by_index[i] for i in sorted(by_index)]
    return Reply("".join(text) or None, calls, finish, request_id, cache, pieces)


def script(gw: Gateway, model: str, *calls: tuple[str, str], **knobs: Any) -> str:
    upstream = TOOL_UPSTREAMS[model]
    gw.fake.forget(upstream)  # no knob left over from another module's tests of the same upstream
    gw.fake.configure(upstream, tool_calls=calls, tool_arg_pieces=4, **knobs)
    return upstream


def question() -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What should I pack? {uuid.uuid4().hex}"}]


def assert_intact(reply: Reply, sent: list[dict[str, str]], *, byte_exact: bool) -> None:
    assert reply.finish_reason == "tool_calls"
    assert [(c["id"], c["name"]) for c in reply.calls] == [(c["id"], c["name"]) for c in sent]
    for got, want in zip(reply.calls, sent, strict=True):
        assert json.loads(got["arguments"]) == json.loads(want["arguments"])
        if byte_exact:
            assert got["arguments"] == want["arguments"]


def byte_exact(model: str, stream: bool) -> bool:
    """litellm rebuilds a non-streamed Anthropic call's arguments with json.dumps (same JSON, other spacing);
    every other path carries the upstream's text unchanged."""
    return stream or model != "tools-cloud-claude"


def follow_up(messages: list[dict[str, Any]], reply: Reply, results: list[str]) -> list[dict[str, Any]]:
    """The conversation with the assistant's calls and one tool result per call, as an SDK user sends it."""
    assistant = {
        "role": "assistant",
        "content": reply.content,
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in reply.calls
        ],
    }
    tool_messages = [
        {"role": "tool", "tool_call_id": c["id"], "content": result}
        for c, result in zip(reply.calls, results, strict=True)
    ]
    return [*messages, assistant, *tool_messages]


def assert_row(gw: Gateway, reply: Reply, model: str, *, stream: bool) -> None:
    row = gw.usage_row(reply.request_id)
    assert gw.count_rows(reply.request_id) == 1
    assert row["requested_model"] == model and row["served_model"]
    assert row["status"] == "ok" and row["http_status"] == 200 and row["error_type"] is None
    assert bool(row["stream"]) is stream and row["completion_tokens"] > 0 and row["cost_micro_usd"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_single_call_round_trip(gateway: Gateway, model: str, stream: bool) -> None:
    upstream = script(gateway, model, WEATHER)
    sdk, messages = client(gateway), question()
    reply = ask(sdk, model, messages, stream=stream)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert sent[0]["id"].startswith("toolu_" if model == "tools-cloud-claude" else "call_")
    assert_intact(reply, sent, byte_exact=byte_exact(model, stream))
    if stream:
        assert reply.pieces[0] >= 2  # the arguments were streamed through, not gathered into one delta
    assert_row(gateway, reply, model, stream=stream)

    result = '{"temp_c": 21, "sky": "clear"}'
    final = ask(sdk, model, follow_up(messages, reply, [result]), stream=stream)
    assert final.finish_reason == "stop" and not final.calls
    assert final.content == f"saw {sent[0]['id']}={digest(result)}"
    assert_row(gateway, final, model, stream=stream)
    # The upstream received the result under the same call id, in its own wire format.
    back = gateway.fake.requests(upstream)[-1]["messages"]
    assert sent[0]["id"] in json.dumps(back)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_parallel_calls_with_text_round_trip(gateway: Gateway, model: str, stream: bool) -> None:
    upstream = script(gateway, model, WEATHER, TIME, tool_interleave=True, tool_text="Checking both.")
    sdk, messages = client(gateway), question()
    reply = ask(sdk, model, messages, stream=stream)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert len(sent) == 2
    assert_intact(reply, sent, byte_exact=byte_exact(model, stream))
    assert reply.content == "Checking both."
    if stream:
        assert all(reply.pieces[i] >= 2 for i in (0, 1))

    results = ["sunny", "14:05"]
    final = ask(sdk, model, follow_up(messages, reply, results), stream=stream)
    assert final.finish_reason == "stop"
    assert final.content == "saw " + " ".join(
        f"{c['id']}={digest(r)}" for c, r in zip(sent, results, strict=True)
    )


# A non-streamed Anthropic tool_use carries `input` as a JSON object: only its stream can be malformed.
MALFORMED_PATHS = [(m, s) for m in MODELS for s in (False, True) if s or m != "tools-cloud-claude"]


@pytest.mark.parametrize(("model", "stream"), MALFORMED_PATHS)
def test_malformed_call_is_surfaced_not_stopped(gateway: Gateway, model: str, stream: bool) -> None:
    upstream = script(gateway, model, MALFORMED)
    reply = ask(client(gateway), model, question(), stream=stream)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert reply.finish_reason == "tool_calls"
    assert reply.calls == sent  # the raw text, for the client to judge; not dropped, repaired or `stop`
    assert_row(gateway, reply, model, stream=stream)


@pytest.mark.parametrize("model", MODELS)
def test_cached_streamed_call_replays_intact(gateway: Gateway, model: str) -> None:
    upstream = script(gateway, model, WEATHER, TIME)
    sdk, messages = client(gateway), question()
    before = len(gateway.fake.requests(upstream))
    first = ask(sdk, model, messages, stream=True, temperature=0)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    replayed = ask(sdk, model, messages, stream=True, temperature=0)
    whole = ask(sdk, model, messages, stream=False, temperature=0)
    assert (first.cache, replayed.cache, whole.cache) == ("miss", "hit", "hit")
    assert len(gateway.fake.requests(upstream)) == before + 1  # the hits never reached the backend
    for reply in (first, replayed, whole):
        assert_intact(reply, sent, byte_exact=True)
    assert replayed.pieces == first.pieces  # the stored deltas, replayed as they came
    row = gateway.usage_row(replayed.request_id)
    assert row["cache_hit"] is True or row["cache_hit"] == 1


@pytest.mark.parametrize("model", MODELS)
def test_call_without_arguments_keeps_an_arguments_string(gateway: Gateway, model: str) -> None:
    """A call to a tool without parameters streams no argument text; served whole (here from the cached
    stream) it must still carry the arguments string clients json.loads."""
    upstream = script(gateway, model, ("get_time", ""))
    sdk, messages = client(gateway), question()
    streamed = ask(sdk, model, messages, stream=True, temperature=0)
    whole = ask(sdk, model, messages, stream=False, temperature=0)
    assert (streamed.cache, whole.cache) == ("miss", "hit")
    expected = "{}" if model == "tools-cloud-claude" else ""  # Anthropic's empty input is the object {}
    for reply in (streamed, whole):
        assert reply.finish_reason == "tool_calls"
        assert reply.calls == [{**gateway.fake.sent_tool_calls(upstream)[-1][0], "arguments": expected}]


@pytest.mark.parametrize("model", ["tools-oai", "tools-cloud-gpt"])
def test_calls_in_the_finishing_chunk_are_kept(gateway: Gateway, model: str) -> None:
    """Some OpenAI-compatible servers send the calls whole in the chunk that carries finish_reason."""
    upstream = script(gateway, model, WEATHER, TIME, tool_with_finish=True)
    reply = ask(client(gateway), model, question(), stream=True)
    assert_intact(reply, gateway.fake.sent_tool_calls(upstream)[-1], byte_exact=True)
