"""The edge protocol's frames: every frame survives encode -> decode, and every malformed frame is refused
with a `FrameError` naming the field, never echoing a value (frames carry prompt text)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from backends.base import Usage
from backends.edge import wire

FRAMES: list[wire.Frame] = [
    wire.Hello(
        node_id="plant7-a",
        models=("smollm2", "SmolLM2-135M-Instruct"),
        labels={"site": "plant-7", "region": "eu"},
        capacity=wire.Capacity(max_batch=8, kv_cache_mb=64.0),
        tokens_per_s=41.5,
        usd_per_hour=0.0,
        version="0.1.0",
    ),
    wire.Welcome(node_id="plant7-a", labels={"site": "plant-7"}, heartbeat_s=2.0),
    wire.Welcome(node_id="plant7-a", labels={}),
    wire.Heartbeat(in_flight=2, queue_depth=1, kv_used_frac=0.25, tokens_per_s=38.0),
    wire.Request(
        id="req-1.1",
        model="smollm2",
        messages=({"role": "user", "content": [{"type": "text", "text": "hi"}]},),
        max_tokens=8,
        temperature=0.0,
        top_p=0.9,
        stop=("\n\n",),
        seed=7,
        deadline_ms=2500.0,
    ),
    wire.Request(id="req-2.1", model="smollm2", messages=({"role": "user", "content": "hi"},)),
    wire.Chunk(id="req-1.1", content="Par"),
    wire.Chunk(id="req-1.1", content=""),
    wire.Done(id="req-1.1", finish_reason="length", usage=Usage(prompt_tokens=12, completion_tokens=8)),
    wire.Error(id="req-1.1", status=503, code="node_busy", message="edge node holds its limit"),
    wire.Cancel(id="req-1.1"),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.type)
def test_every_frame_survives_a_round_trip(frame: wire.Frame) -> None:
    text = wire.encode(frame)
    assert isinstance(text, str)  # sent as a WebSocket text frame
    assert orjson.loads(text)["type"] == frame.type
    assert wire.decode(text) == frame
    assert wire.decode(text.encode()) == frame


def test_chunk_and_done_have_the_documented_wire_shape() -> None:
    assert orjson.loads(wire.encode(wire.Chunk("r", "hi"))) == {
        "type": "chunk",
        "id": "r",
        "delta": {"content": "hi"},
    }
    done = orjson.loads(wire.encode(wire.Done("r", "stop", Usage(3, 4))))
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}


def test_optional_fields_take_their_defaults_and_unknown_fields_are_ignored() -> None:
    hello = wire.decode(
        orjson.dumps(
            {
                "type": "hello",
                "node_id": "n",
                "models": ["m"],
                "capacity": {"max_batch": 1, "kv_cache_mb": 64},
                "tokens_per_s": 0,
                "added_in_a_later_version": True,
            }
        )
    )
    assert hello == wire.Hello("n", ("m",), {}, wire.Capacity(1, 64.0), 0.0, 0.0, "", wire.PROTOCOL_VERSION)
    request = wire.decode('{"type": "request", "id": "r", "model": "m", "messages": [{}], "stop": null}')
    assert request == wire.Request("r", "m", ({},))


def _hello(**changes: Any) -> dict[str, Any]:
    base = orjson.loads(wire.encode(FRAMES[0]))
    return {**base, **changes}


def _request(**changes: Any) -> dict[str, Any]:
    base = orjson.loads(wire.encode(FRAMES[4]))
    return {**base, **changes}


MALFORMED: list[tuple[Any, str]] = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"node_id": "n"}, "unknown or missing `type`"),
    ({"type": "hi"}, "unknown or missing `type`"),
    (_hello(node_id=""), "`node_id` must be a non-empty string"),
    (_hello(models=[]), "`models` must be a non-empty list"),
    (_hello(models=["a", 3]), "`models`"),
    (_hello(labels={"site": 7}), "`labels`"),
    (_hello(labels=["site"]), "`labels`"),
    (_hello(capacity=None), "`capacity` must be an object"),
    (_hello(capacity={"max_batch": 0, "kv_cache_mb": 1}), "`hello.capacity` frame: field `max_batch`"),
    (_hello(tokens_per_s=-1), "`tokens_per_s` must be a number >= 0"),
    (_hello(tokens_per_s="fast"), "`tokens_per_s`"),
    (_hello(protocol=0), "`protocol`"),
    ({"type": "welcome", "node_id": "n", "labels": {}, "heartbeat_s": 0}, "`heartbeat_s` must be a positive"),
    (
        {"type": "heartbeat", "in_flight": True, "queue_depth": 0, "kv_used_frac": 0, "tokens_per_s": 1},
        "in_flight",
    ),
    (
        {"type": "heartbeat", "in_flight": 0, "queue_depth": -1, "kv_used_frac": 0, "tokens_per_s": 1},
        "queue_depth",
    ),
    (
        {"type": "heartbeat", "in_flight": 0, "queue_depth": 0, "kv_used_frac": 1.5, "tokens_per_s": 1},
        "in [0, 1]",
    ),
    (_request(deadline_ms=0), "`deadline_ms` must be a number >= 1.0"),
    (_request(deadline_ms="soon"), "`deadline_ms`"),
    (_request(id=None), "`id` must be a non-empty string"),
    (_request(messages=[]), "`messages` must be a non-empty list"),
    (_request(messages="secret prompt"), "`messages`"),
    (_request(max_tokens=0), "`max_tokens` must be an integer >= 1"),
    (_request(max_tokens=1.5), "`max_tokens`"),
    (_request(temperature="hot"), "`temperature`"),
    (_request(stop="\n"), "`stop` must be a list"),
    (_request(seed="7"), "`seed` must be an integer"),
    ({"type": "chunk", "id": "r", "delta": "text"}, "`delta` must be an object"),
    ({"type": "chunk", "id": "r", "delta": {"content": 5}}, "`content` must be a string"),
    ({"type": "done", "id": "r", "finish_reason": "stop"}, "`usage` must be an object"),
    (
        {"type": "done", "id": "r", "finish_reason": "stop", "usage": {"prompt_tokens": 1}},
        "completion_tokens",
    ),
    (
        {"type": "error", "id": "r", "status": 42, "code": "x", "message": "m"},
        "`status` must be an integer >= 100",
    ),
    ({"type": "error", "id": "r", "status": 500, "code": "", "message": "m"}, "`code`"),
    ({"type": "cancel"}, "`cancel` frame: field `id`"),
]


@pytest.mark.parametrize(("raw", "expected"), MALFORMED)
def test_malformed_frames_are_refused_naming_the_field(raw: Any, expected: str) -> None:
    data = raw if isinstance(raw, str) else orjson.dumps(raw)
    with pytest.raises(wire.FrameError) as caught:
        wire.decode(data)
    assert expected in str(caught.value)
    assert "secret prompt" not in str(caught.value)


def test_frames_from_the_wrong_side_are_refused() -> None:
    welcome = wire.encode(FRAMES[1])
    assert wire.decode(welcome, allowed=wire.GATEWAY_FRAMES) == FRAMES[1]
    with pytest.raises(wire.FrameError, match="unexpected `welcome` frame"):
        wire.decode(welcome, allowed=wire.NODE_FRAMES)
    with pytest.raises(wire.FrameError, match="unexpected `request` frame"):
        wire.decode(wire.encode(FRAMES[4]), allowed=(wire.Hello,))


def test_close_codes_are_the_documented_ones() -> None:
    assert (wire.CloseCode.BAD_HELLO, wire.CloseCode.UNAUTHORIZED, wire.CloseCode.DUPLICATE_NODE) == (
        4400,
        4401,
        4409,
    )
    assert wire.CONNECT_PATH == "/v1/edge/connect"
