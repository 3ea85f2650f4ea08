"""The Responses stream's item bookkeeping (gateway/translate/responses_stream.py), fed chat chunks by hand:
parallel calls whose deltas take turns land in their own items, and a stream that fails early reports what
its deltas carried."""

from __future__ import annotations

import json
from typing import Any

from backends.base import StreamChunk
from gateway.translate.responses_stream import StreamEvents


def call_delta(index: int, arguments: str, *, call_id: str = "", name: str = "") -> StreamChunk:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return StreamChunk(delta={"tool_calls": [call]})


def payloads(raw: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(event.split(b"\ndata: ", 1)[1]) for event in raw]


def feed(events: StreamEvents) -> list[dict[str, Any]]:
    chunks = [
        StreamChunk(delta={"role": "assistant", "content": "Checking."}),
        call_delta(0, "", call_id="call_a", name="get_weather"),
        call_delta(1, '{"tz":', call_id="call_b", name="get_time"),
        call_delta(0, '{"city": "Par'),
        call_delta(1, '"UTC"}'),
    ]
    return payloads([piece for chunk in chunks for piece in events.chunk(chunk)])


def test_interleaved_calls_keep_their_own_items_and_arguments() -> None:
    events = StreamEvents("r1")
    sent = feed(events)
    added = [e for e in sent if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "message"),
        (1, "function_call"),
        (2, "function_call"),
    ]
    assert [(e["item"]["call_id"], e["item"]["name"]) for e in added[1:]] == [
        ("call_a", "get_weather"),
        ("call_b", "get_time"),
    ]
    deltas = [
        (e["output_index"], e["delta"]) for e in sent if e["type"] == "response.function_call_arguments.delta"
    ]
    assert deltas == [(2, '{"tz":'), (1, '{"city": "Par'), (2, '"UTC"}')]

    done = payloads(events.finish(incomplete=False))
    assert [e["sequence_number"] for e in sent + done] == list(range(len(sent) + len(done)))
    arguments = {e["output_index"]: e["arguments"] for e in done if e["type"].endswith("arguments.done")}
    assert arguments == {1: '{"city": "Par', 2: '{"tz":"UTC"}'}
    assert [item["status"] for item in events.output] == ["completed"] * 3
    assert events.partial_output() == events.output


def test_a_stream_that_fails_early_reports_what_its_deltas_carried() -> None:
    events = StreamEvents("r2")
    feed(events)
    partial = events.partial_output()
    assert [item["status"] for item in partial] == ["incomplete"] * 3
    assert partial[0]["content"][0]["text"] == "Checking."
    assert [(i["call_id"], i["arguments"]) for i in partial[1:]] == [
        ("call_a", '{"city": "Par'),
        ("call_b", '{"tz":"UTC"}'),
    ]
    # The items the stream goes on with are untouched by the snapshot.
    assert [item["status"] for item in events.output] == ["in_progress"] * 3
    assert events.output[1]["arguments"] == ""
