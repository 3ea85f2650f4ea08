"""Tool calls end to end through the Responses API, with the official `openai` SDK.

The fake provider is scripted to answer with tool calls (tests/support/fake_provider.py: `tool_calls`) behind
an OpenAI-compatible backend, litellm's openai provider and litellm's anthropic provider. A Responses client
must receive each call as a `function_call` item with its call_id, name and arguments intact: whole, as typed
events read one by one (`output_item.added`, argument deltas, `.done`, `output_item.done`), and through the
SDK's `responses.stream(...)` helper. It then sends `function_call_output` items back, chained with
`previous_response_id` or statelessly with the whole item list, and the fake's answer names each result's call
id and digest. Peers lose data here (LiteLLM #25836, #25561: streamed arguments dropped; #21744: a malformed
call became `stop`).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent

from tests.support.api_gateway import TOOL_UPSTREAMS, Gateway
from tests.support.fake_tools import digest

MODELS = tuple(TOOL_UPSTREAMS)
MODES = ("whole", "events", "helper")  # create(); create(stream=True) read event by event; stream() helper
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {
        "type": "function",
        "name": "get_time",
        "description": "Local time in a zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
]
WEATHER = ("get_weather", '{"city": "Zürich", "days": [1, 2], "detail": {"wind": true, "note": "a \\"b\\""}}')
TIME = ("get_time", '{"tz":"Europe/Paris"}')
MALFORMED = ("get_weather", '{"city": "Par')


@dataclass
class Turn:
    """What a Responses client ends up with, however it read the answer."""

    response: Response
    calls: list[dict[str, str]]  # {"id": call_id, "name", "arguments"}, in output order
    text: str
    pieces: dict[str, int] = field(default_factory=dict)  # streamed: argument deltas per call_id

    @property
    def request_id(self) -> str:
        return self.response.id.removeprefix("resp_")


def client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0, timeout=20)


def calls_of(response: Response) -> list[dict[str, str]]:
    return [
        {"id": item.call_id, "name": item.name, "arguments": item.arguments}
        for item in response.output
        if item.type == "function_call"
    ]


def from_events(events: list[ResponseStreamEvent]) -> Turn:
    """The answer as a client reading the typed events one by one assembles it, checked against the
    `response.completed` event's own output."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    added: dict[int, Any] = {}
    done: dict[int, Any] = {}
    arguments: dict[int, str] = {}
    arguments_done: dict[int, str] = {}
    pieces: Counter[int] = Counter()
    text = []
    for event in events:
        if event.type == "response.output_item.added":
            assert event.output_index not in added
            added[event.output_index] = event.item
            if event.item.type == "function_call":
                assert event.item.arguments == "" and event.item.status == "in_progress"
        elif event.type == "response.function_call_arguments.delta":
            assert event.output_index not in done and event.item_id == added[event.output_index].id
            arguments[event.output_index] = arguments.get(event.output_index, "") + event.delta
            pieces[event.output_index] += 1
        elif event.type == "response.function_call_arguments.done":
            arguments_done[event.output_index] = event.arguments
        elif event.type == "response.output_item.done":
            done[event.output_index] = event.item
        elif event.type == "response.output_text.delta":
            text.append(event.delta)
    final = events[-1].response  # type: ignore[union-attr]
    assert sorted(added) == sorted(done) == list(range(len(final.output)))
    calls = []
    for index, item in sorted(added.items()):
        if item.type != "function_call":
            continue
        whole = arguments.get(index, "")
        end = done[index]
        # The client knows whom it calls from the first event; the end repeats it with the arguments.
        assert (end.id, end.call_id, end.name, end.arguments) == (item.id, item.call_id, item.name, whole)
        assert arguments_done[index] == whole and end.status == "completed"
        calls.append({"id": item.call_id, "name": item.name, "arguments": whole})
    assert calls_of(final) == calls
    by_id = {added[i].call_id: n for i, n in pieces.items()}
    return Turn(final, calls, "".join(text), by_id)


def ask(sdk: OpenAI, model: str, items: str | list[Any], *, mode: str, **extra: Any) -> Turn:
    if mode == "whole":
        raw = sdk.responses.with_raw_response.create(model=model, input=items, tools=TOOLS, **extra)
        response = raw.parse()
        assert raw.headers["x-request-id"] == response.id.removeprefix("resp_")
        return Turn(response, calls_of(response), response.output_text)
    if mode == "events":
        stream = sdk.responses.create(model=model, input=items, tools=TOOLS, stream=True, **extra)
        return from_events(list(stream))
    with sdk.responses.stream(model=model, input=items, tools=TOOLS, **extra) as events:
        deltas: Counter[str] = Counter(
            e.item_id for e in events if e.type == "response.function_call_arguments.delta"
        )
        response = events.get_final_response()
    calls = calls_of(response)
    item_ids = {item.id: item.call_id for item in response.output if item.type == "function_call"}
    return Turn(response, calls, response.output_text, {item_ids[i]: n for i, n in deltas.items()})


def script(gw: Gateway, model: str, *calls: tuple[str, str], **knobs: Any) -> str:
    upstream = TOOL_UPSTREAMS[model]
    defaults = {"tool_arg_pieces": 4, "tool_interleave": False, "tool_with_finish": False, "tool_text": ""}
    knobs = {**defaults, "cut_after_chunks": None, **knobs}  # a model's knobs persist between tests
    gw.fake.configure(upstream, tool_calls=calls, **knobs)
    return upstream


def question() -> list[Any]:
    return [{"role": "user", "content": f"What should I pack? {uuid.uuid4().hex}"}]


def byte_exact(model: str, mode: str) -> bool:
    """litellm rebuilds a non-streamed Anthropic call's arguments with json.dumps (same JSON, other spacing);
    every other path carries the upstream's text unchanged."""
    return mode != "whole" or model != "tools-cloud-claude"


def assert_intact(turn: Turn, sent: list[dict[str, str]], *, exact: bool) -> None:
    assert turn.response.status == "completed" and turn.response.error is None
    assert [(c["id"], c["name"]) for c in turn.calls] == [(c["id"], c["name"]) for c in sent]
    for got, want in zip(turn.calls, sent, strict=True):
        assert json.loads(got["arguments"]) == json.loads(want["arguments"])
        if exact:
            assert got["arguments"] == want["arguments"]


def outputs(turn: Turn, results: list[str]) -> list[Any]:
    return [
        {"type": "function_call_output", "call_id": c["id"], "output": result}
        for c, result in zip(turn.calls, results, strict=True)
    ]


def saw(sent: list[dict[str, str]], results: list[str]) -> str:
    return "saw " + " ".join(f"{c['id']}={digest(r)}" for c, r in zip(sent, results, strict=True))


def assert_answer(turn: Turn, expected: str) -> None:
    assert turn.response.status == "completed" and not turn.calls
    (item,) = turn.response.output
    assert item.type == "message" and turn.response.output_text == expected
    assert turn.text == expected  # streamed: the text deltas, joined


def assert_row(gw: Gateway, turn: Turn, model: str, *, stream: bool) -> None:
    row = gw.usage_row(turn.request_id)
    assert gw.count_rows(turn.request_id) == 1
    assert row["endpoint"] == "responses" and row["requested_model"] == model and row["served_model"]
    assert row["status"] == "ok" and row["http_status"] == 200 and row["error_type"] is None
    assert bool(row["stream"]) is stream and row["completion_tokens"] > 0 and row["cost_micro_usd"] > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_single_call_round_trip_with_previous_response_id(gateway: Gateway, model: str, mode: str) -> None:
    upstream = script(gateway, model, WEATHER)
    sdk = client(gateway)
    turn = ask(sdk, model, question(), mode=mode)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert sent[0]["id"].startswith("toolu_" if model == "tools-cloud-claude" else "call_")
    assert_intact(turn, sent, exact=byte_exact(model, mode))
    assert [item.type for item in turn.response.output] == ["function_call"]
    if mode != "whole":
        assert turn.pieces[sent[0]["id"]] >= 2  # streamed through in pieces, not gathered into one delta
    assert_row(gateway, turn, model, stream=mode != "whole")

    results = ['{"temp_c": 21, "sky": "clear"}']
    final = ask(sdk, model, outputs(turn, results), mode=mode, previous_response_id=turn.response.id)
    assert final.response.previous_response_id == turn.response.id
    assert_answer(final, saw(sent, results))
    assert_row(gateway, final, model, stream=mode != "whole")
    # The upstream received the stored call and its result under the same id, in its own wire format.
    back = json.dumps(gateway.fake.requests(upstream)[-1]["messages"])
    assert back.count(sent[0]["id"]) == 2 and "What should I pack?" in back


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_parallel_calls_with_text_stateless_round_trip(gateway: Gateway, model: str, mode: str) -> None:
    upstream = script(gateway, model, WEATHER, TIME, tool_interleave=True, tool_text="Checking both.")
    sdk, asked = client(gateway), question()
    turn = ask(sdk, model, asked, mode=mode, store=False)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert len(sent) == 2
    assert_intact(turn, sent, exact=byte_exact(model, mode))
    assert [item.type for item in turn.response.output] == ["message", "function_call", "function_call"]
    assert turn.response.output_text == "Checking both."
    if mode != "whole":
        assert turn.text == "Checking both."
        assert all(turn.pieces[c["id"]] >= 2 for c in sent)
    assert len({item.id for item in turn.response.output}) == 3

    # No stored state: the client sends the conversation back, the answer's own items included.
    results = ["sunny", "14:05"]
    items = [*asked, *turn.response.output, *outputs(turn, results)]
    final = ask(sdk, model, items, mode=mode, store=False)
    assert final.response.previous_response_id is None
    assert_answer(final, saw(sent, results))
    assert_row(gateway, final, model, stream=mode != "whole")
    back = json.dumps(gateway.fake.requests(upstream)[-1]["messages"])
    assert all(back.count(c["id"]) == 2 for c in sent) and "Checking both." in back


@pytest.mark.parametrize("model", MODELS)
def test_parallel_calls_chained_streamed_with_results_in_any_order(gateway: Gateway, model: str) -> None:
    """Results may come back in another order than the calls; each keeps its own call id."""
    upstream = script(gateway, model, WEATHER, TIME)
    sdk = client(gateway)
    turn = ask(sdk, model, question(), mode="events")
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert_intact(turn, sent, exact=True)
    results = ["sunny", "14:05"]
    back = list(reversed(outputs(turn, results)))
    final = ask(sdk, model, back, mode="events", previous_response_id=turn.response.id)
    expected = "saw " + " ".join(f"{o['call_id']}={digest(o['output'])}" for o in back)
    assert_answer(final, expected)


# A non-streamed Anthropic tool_use carries `input` as a JSON object: only its stream can be malformed.
MALFORMED_PATHS = [(m, s) for m in MODELS for s in MODES if s != "whole" or m != "tools-cloud-claude"]


@pytest.mark.parametrize(("model", "mode"), MALFORMED_PATHS)
def test_malformed_call_is_surfaced_as_a_function_call(gateway: Gateway, model: str, mode: str) -> None:
    upstream = script(gateway, model, MALFORMED)
    sdk = client(gateway)
    turn = ask(sdk, model, question(), mode=mode)
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    # The raw text, for the client to judge: not dropped, repaired, or turned into a plain text answer.
    assert turn.response.status == "completed"
    assert [item.type for item in turn.response.output] == ["function_call"]
    assert turn.calls == sent and turn.response.output_text == ""
    assert_row(gateway, turn, model, stream=mode != "whole")
    # The client may answer it (here with an error for the model), and the conversation goes on.
    results = ["error: arguments are not valid JSON"]
    follow = outputs(turn, results)
    if model != "tools-cloud-claude":
        final = ask(sdk, model, follow, mode=mode, previous_response_id=turn.response.id)
        assert_answer(final, saw(sent, results))
        return
    # Anthropic takes a call's input as a JSON object only: the stored call cannot be sent back, and the
    # client is told so in the Responses envelope (not a 500, not a silently repaired call).
    with pytest.raises(openai.BadRequestError) as refused:
        ask(sdk, model, follow, mode=mode, previous_response_id=turn.response.id)
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert "get_weather" in error["message"] and "arguments" in error["message"]
    row = gateway.usage_row(refused.value.response.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["http_status"]) == ("responses", "error", 400)


@pytest.mark.parametrize("model", ["tools-oai", "tools-cloud-gpt"])
@pytest.mark.parametrize("mode", ["events", "helper"])
def test_calls_in_the_finishing_chunk_are_kept(gateway: Gateway, model: str, mode: str) -> None:
    """Some OpenAI-compatible servers send the calls whole in the chunk that carries finish_reason."""
    upstream = script(gateway, model, WEATHER, TIME, tool_with_finish=True)
    turn = ask(client(gateway), model, question(), mode=mode)
    assert_intact(turn, gateway.fake.sent_tool_calls(upstream)[-1], exact=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODELS)
def test_call_without_arguments_keeps_an_arguments_string(gateway: Gateway, model: str, mode: str) -> None:
    upstream = script(gateway, model, ("get_time", ""))
    turn = ask(client(gateway), model, question(), mode=mode)
    expected = "{}" if model == "tools-cloud-claude" else ""  # Anthropic's empty input is the object {}
    assert turn.calls == [{**gateway.fake.sent_tool_calls(upstream)[-1][0], "arguments": expected}]


@pytest.mark.parametrize("model", MODELS)
def test_a_stored_streamed_call_reads_back_like_a_whole_one(gateway: Gateway, model: str) -> None:
    """GET /v1/responses/{id} of a streamed answer returns the same function_call items the stream ended
    with, and its input items are the question that was asked."""
    upstream = script(gateway, model, WEATHER, TIME, tool_interleave=True)
    sdk, asked = client(gateway), question()
    turn = ask(sdk, model, asked, mode="events")
    stored = sdk.responses.retrieve(turn.response.id)
    assert calls_of(stored) == turn.calls
    assert_intact(Turn(stored, calls_of(stored), ""), gateway.fake.sent_tool_calls(upstream)[-1], exact=True)
    (first,) = sdk.responses.input_items.list(turn.response.id).data
    assert first.type == "message" and first.content[0].text == asked[0]["content"]  # type: ignore[union-attr]


@pytest.mark.parametrize("model", MODELS)
def test_cached_streamed_calls_replay_intact(gateway: Gateway, model: str) -> None:
    """A cacheable request's streamed calls, kept by the cache, come back intact streamed and whole."""
    upstream = script(gateway, model, WEATHER, TIME, tool_interleave=True)
    sdk, asked = client(gateway), question()
    before = len(gateway.fake.requests(upstream))
    turns = [ask(sdk, model, asked, mode=mode, temperature=0, store=False) for mode in MODES[1:] + MODES[:1]]
    assert len(gateway.fake.requests(upstream)) == before + 1  # the hits never reached the backend
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    for turn, hit in zip(turns, (False, True, True), strict=True):
        assert_intact(turn, sent, exact=True)
        row = gateway.usage_row(turn.request_id)
        assert bool(row["cache_hit"]) is hit and row["endpoint"] == "responses"
    assert turns[1].pieces == turns[0].pieces  # the stored deltas, replayed as they came


@pytest.mark.parametrize("model", MODELS)
def test_a_call_cut_mid_arguments_fails_with_what_was_streamed(gateway: Gateway, model: str) -> None:
    """The upstream hangs up inside a call's arguments: the stream ends in `response.failed` (never a
    completed call with truncated arguments), and its output holds the arguments streamed so far."""
    upstream = script(gateway, model, WEATHER, tool_arg_pieces=8, cut_after_chunks=5)
    events = list(client(gateway).responses.create(model=model, input=question(), tools=TOOLS, stream=True))
    sent = gateway.fake.sent_tool_calls(upstream)[-1][0]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert not {"response.completed", "response.function_call_arguments.done"} & {e.type for e in events}
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed and sent["arguments"].startswith(streamed) and streamed != sent["arguments"]
    (item,) = failed.response.output
    assert item.type == "function_call" and item.status == "incomplete"
    assert (item.call_id, item.name, item.arguments) == (sent["id"], sent["name"], streamed)
    row = gateway.usage_row(failed.response.id.removeprefix("resp_"))
    assert (row["endpoint"], row["status"], bool(row["stream"])) == ("responses", "error", True)
    assert gateway.count_rows(failed.response.id.removeprefix("resp_")) == 1
