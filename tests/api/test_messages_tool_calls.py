"""Tool calls end to end through Anthropic's Messages API, with the official `anthropic` SDK.

The fake provider is scripted to answer with tool calls (tests/support/fake_provider.py: `tool_calls`) behind
an OpenAI-compatible backend, litellm's openai provider and litellm's anthropic provider. A Messages client
must receive each call as a `tool_use` block with its id, name and input intact: whole, as raw events
(`content_block_start`, `input_json_delta` pieces, `content_block_stop`), and through the SDK's
`messages.stream(...)` helper, which reassembles the pieces. It then sends `tool_result` blocks back and the
fake's answer names each result's call id and digest. Peers lose data here (LiteLLM #25836, #25561: streamed
arguments dropped; #21744: a malformed call became `stop`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pytest
from anthropic.types import Message

from tests.support.api_gateway import TOOL_UPSTREAMS, Gateway
from tests.support.fake_tools import digest

MODELS = tuple(TOOL_UPSTREAMS)
MODES = ("whole", "events", "helper")  # create(); create(stream=True) read event by event; stream() helper
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {
        "name": "get_time",
        "description": "Local time in a zone",
        "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
]
WEATHER = ("get_weather", '{"city": "Zürich", "days": [1, 2], "detail": {"wind": true, "note": "a \\"b\\""}}')
TIME = ("get_time", '{"tz":"Europe/Paris"}')
MALFORMED = ("get_weather", '{"city": "Par')


@dataclass
class Turn:
    """What a Messages client ends up with, however it read the answer."""

    message: Message
    request_id: str
    calls: list[dict[str, Any]]  # {"id", "name", "input"}, in block order
    raw_inputs: dict[str, str] = field(default_factory=dict)  # streamed: the partial_json pieces, joined
    pieces: dict[str, int] = field(default_factory=dict)  # streamed: input_json_delta events per call id

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.message.content if b.type == "text")


def client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=gw.key(), max_retries=0, timeout=20)


def calls_of(message: Message) -> list[dict[str, Any]]:
    return [{"id": b.id, "name": b.name, "input": b.input} for b in message.content if b.type == "tool_use"]


def from_events(events: list[Any], request_id: str) -> Turn:
    """The answer as a client reading raw events assembles it, checked against the SDK's own snapshot."""
    assert [e.type for e in events[:1]] == ["message_start"] and events[-1].type == "message_stop"
    started: dict[int, Any] = {}
    stopped: list[int] = []
    partial: dict[int, list[str]] = {}
    text: dict[int, str] = {}
    for event in events:
        if event.type == "content_block_start":
            assert event.index == len(started) and (not started or max(started) in stopped)  # one at a time
            started[event.index] = event.content_block
        elif event.type == "content_block_delta":
            assert event.index in started and event.index not in stopped
            if event.delta.type == "input_json_delta":
                partial.setdefault(event.index, []).append(event.delta.partial_json)
            elif event.delta.type == "text_delta":
                text[event.index] = text.get(event.index, "") + event.delta.text
        elif event.type == "content_block_stop":
            stopped.append(event.index)
    assert stopped == sorted(started)
    (delta,) = [e for e in events if e.type == "message_delta"]
    content: list[dict[str, Any]] = []
    raw_inputs, pieces = {}, {}
    for index, block in sorted(started.items()):
        if block.type == "text":
            content.append({"type": "text", "text": text.get(index, "")})
            continue
        assert block.type == "tool_use" and block.input == {}
        raw = "".join(partial.get(index, []))
        raw_inputs[block.id], pieces[block.id] = raw, len(partial.get(index, []))
        content.append(
            {"type": "tool_use", "id": block.id, "name": block.name, "input": json.loads(raw or "{}")}
        )
    start = events[0].message
    usage = {"input_tokens": delta.usage.input_tokens or 0, "output_tokens": delta.usage.output_tokens}
    message = Message.model_validate(
        {
            **start.model_dump(),
            "content": content,
            "stop_reason": delta.delta.stop_reason,
            "usage": usage,
        }
    )
    return Turn(message, request_id, calls_of(message), raw_inputs, pieces)


def ask(sdk: anthropic.Anthropic, model: str, messages: list[Any], *, mode: str) -> Turn:
    params: dict[str, Any] = {"model": model, "max_tokens": 200, "tools": TOOLS, "messages": messages}
    if mode == "whole":
        raw = sdk.messages.with_raw_response.create(**params)
        message = raw.parse()
        return Turn(message, raw.headers["x-request-id"], calls_of(message))
    if mode == "events":
        raw = sdk.messages.with_raw_response.create(**params, stream=True)
        return from_events(list(raw.parse()), raw.headers["x-request-id"])
    with sdk.messages.stream(**params) as stream:
        counted: dict[int, int] = {}
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                counted[event.index] = counted.get(event.index, 0) + 1
        message = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    pieces = {message.content[i].id: n for i, n in counted.items()}  # type: ignore[union-attr]
    return Turn(message, request_id, calls_of(message), pieces=pieces)


def script(gw: Gateway, model: str, *calls: tuple[str, str], **knobs: Any) -> str:
    upstream = TOOL_UPSTREAMS[model]
    defaults = {"tool_arg_pieces": 4, "tool_interleave": False, "tool_with_finish": False, "tool_text": ""}
    gw.fake.configure(upstream, tool_calls=calls, **{**defaults, "cut_after_chunks": None, **knobs})
    return upstream


def question() -> list[Any]:
    return [{"role": "user", "content": f"What should I pack? {uuid.uuid4().hex}"}]


def assert_intact(turn: Turn, sent: list[dict[str, str]]) -> None:
    assert turn.message.stop_reason == "tool_use"
    assert [(c["id"], c["name"]) for c in turn.calls] == [(c["id"], c["name"]) for c in sent]
    assert [c["input"] for c in turn.calls] == [json.loads(c["arguments"]) for c in sent]
    for call in sent:  # raw events carry the upstream's text itself, in pieces
        if turn.raw_inputs:
            assert turn.raw_inputs[call["id"]] == call["arguments"]
        if turn.pieces:
            assert turn.pieces[call["id"]] >= 2


def follow_up(asked: list[Any], turn: Turn, results: list[Any]) -> list[Any]:
    blocks = [
        {"type": "tool_result", "tool_use_id": c["id"], "content": result}
        for c, result in zip(turn.calls, results, strict=True)
    ]
    return [
        *asked,
        {"role": "assistant", "content": turn.message.content},
        {"role": "user", "content": blocks},
    ]


def saw(sent: list[dict[str, str]], results: list[str]) -> str:
    return "saw " + " ".join(f"{c['id']}={digest(r)}" for c, r in zip(sent, results, strict=True))


def assert_answer(turn: Turn, expected: str) -> None:
    assert turn.message.stop_reason == "end_turn" and not turn.calls
    assert [b.type for b in turn.message.content] == ["text"] and turn.text == expected


def assert_row(gw: Gateway, turn: Turn, model: str, *, stream: bool) -> None:
    row = gw.usage_row(turn.request_id)
    assert gw.count_rows(turn.request_id) == 1
    assert row["endpoint"] == "messages" and row["requested_model"] == model and row["served_model"]
    assert row["status"] == "ok" and row["http_status"] == 200 and row["error_type"] is None
    assert bool(row["stream"]) is stream and row["completion_tokens"] > 0 and row["cost_micro_usd"] > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_single_call_round_trip(gateway: Gateway, model: str, mode: str) -> None:
    upstream = script(gateway, model, WEATHER)
    sdk, asked = client(gateway), question()
    turn = ask(sdk, model, asked, mode=mode)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert sent[0]["id"].startswith("toolu_" if model == "tools-cloud-claude" else "call_")
    assert_intact(turn, sent)
    assert [b.type for b in turn.message.content] == ["tool_use"]
    assert_row(gateway, turn, model, stream=mode != "whole")

    results = ['{"temp_c": 21, "sky": "clear"}']
    final = ask(sdk, model, follow_up(asked, turn, results), mode=mode)
    assert_answer(final, saw(sent, results))
    assert_row(gateway, final, model, stream=mode != "whole")
    # The upstream received the call and its result under the same id, in its own wire format.
    back = json.dumps(gateway.fake.requests(upstream)[-1]["messages"])
    assert back.count(sent[0]["id"]) == 2


@pytest.mark.parametrize("interleave", [False, True], ids=["sequential", "interleaved"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_parallel_calls_with_text_round_trip(
    gateway: Gateway, model: str, mode: str, interleave: bool
) -> None:
    """Two calls after some text; with `interleaved` the OpenAI upstreams' argument deltas take turns, which
    Anthropic's one-block-at-a-time events cannot show: each call must still be one block, input whole."""
    upstream = script(gateway, model, WEATHER, TIME, tool_interleave=interleave, tool_text="Checking both.")
    sdk, asked = client(gateway), question()
    turn = ask(sdk, model, asked, mode=mode)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert_intact(turn, sent)
    assert [b.type for b in turn.message.content] == ["text", "tool_use", "tool_use"]
    assert turn.text == "Checking both."

    results = ["sunny", "14:05"]
    final = ask(sdk, model, follow_up(asked, turn, results), mode=mode)
    assert_answer(final, saw(sent, results))


@pytest.mark.parametrize("model", MODELS)
def test_results_in_any_order_and_errors_keep_their_ids(gateway: Gateway, model: str) -> None:
    upstream = script(gateway, model, WEATHER, TIME)
    sdk, asked = client(gateway), question()
    turn = ask(sdk, model, asked, mode="helper")
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    blocks = [
        {"type": "tool_result", "tool_use_id": sent[1]["id"], "content": [{"type": "text", "text": "14:05"}]},
        {"type": "tool_result", "tool_use_id": sent[0]["id"], "content": "no such city", "is_error": True},
    ]
    messages = [
        *asked,
        {"role": "assistant", "content": turn.message.content},
        {"role": "user", "content": blocks},
    ]
    final = ask(sdk, model, messages, mode="whole")
    # A chat tool message has no error flag: the text carries it (anthropic_messages.TOOL_ERROR_PREFIX).
    assert_answer(
        final, f"saw {sent[1]['id']}={digest('14:05')} {sent[0]['id']}={digest('[tool error] no such city')}"
    )


# A non-streamed Anthropic tool_use carries `input` as a JSON object: only its stream can be malformed.
MALFORMED_PATHS = [(m, s) for m in MODELS for s in MODES if s != "whole" or m != "tools-cloud-claude"]


@pytest.mark.parametrize(("model", "mode"), MALFORMED_PATHS)
def test_malformed_call_is_an_error_not_a_turn(gateway: Gateway, model: str, mode: str) -> None:
    """A tool_use block's input must be a JSON object, so arguments that are not one cannot be passed on raw:
    the client gets an Anthropic error naming the problem (a 502 before the answer started, an `error` event
    after), never `end_turn` text or a tool_use with its input quietly emptied or repaired."""
    script(gateway, model, MALFORMED)
    with pytest.raises(anthropic.APIStatusError) as refused:
        ask(client(gateway), model, question(), mode=mode)
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert (
        "tool `get_weather`" in body["error"]["message"] and "not a JSON object" in body["error"]["message"]
    )
    assert refused.value.status_code == (502 if mode == "whole" else 200)  # a stream's error is an event
    if mode == "whole":  # the row says what the client got, and still charges what the backend produced
        row = gateway.usage_row(refused.value.response.headers["x-request-id"])
        assert (row["status"], row["http_status"]) == ("error", 502)
        assert row["backend"] and row["completion_tokens"] > 0


@pytest.mark.parametrize("model", ["tools-oai", "tools-cloud-gpt"])
@pytest.mark.parametrize("mode", ["events", "helper"])
def test_calls_in_the_finishing_chunk_are_kept(gateway: Gateway, model: str, mode: str) -> None:
    """Some OpenAI-compatible servers send the calls whole in the chunk that carries finish_reason."""
    upstream = script(gateway, model, WEATHER, TIME, tool_with_finish=True)
    turn = ask(client(gateway), model, question(), mode=mode)
    turn.pieces = {}  # whole calls: one piece each
    assert_intact(turn, gateway.fake.sent_tool_calls(upstream)[-1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_call_without_arguments_has_an_empty_input(gateway: Gateway, model: str, mode: str) -> None:
    upstream = script(gateway, model, ("get_time", ""))
    turn = ask(client(gateway), model, question(), mode=mode)
    (call,) = gateway.fake.sent_tool_calls(upstream)[-1]
    assert turn.message.stop_reason == "tool_use"
    assert turn.calls == [{"id": call["id"], "name": "get_time", "input": {}}]
