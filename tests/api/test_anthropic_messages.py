"""Anthropic's Messages API through a live gateway, driven by the official `anthropic` SDK.

Answers, streams (text and tool calls), the tool_result round trip as the backend receives it, prompt
caching headers and `cache_control` reaching the fake Anthropic upstream through litellm, one ledger row per
request, and the privacy floor holding for data in a tool result.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import anthropic
import httpx
import pytest

from tests.support import logscan
from tests.support.api_gateway import TOOL_UPSTREAMS, Gateway
from tests.support.fake_tools import TOOL_ARGUMENTS, TOOL_TRIGGER, digest

HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER = {
    "name": "get_weather",
    "description": "the weather in a city",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
}
CLAUDE_UPSTREAM = "claude-haiku-4-5"  # cloud-claude's upstream model on the fake


def sdk(gw: Gateway, key: str, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20, **kwargs)


def x_api_key_client(gw: Gateway, key: str) -> anthropic.Anthropic:
    """What Claude Code and older SDKs send: the key in `x-api-key`, no Authorization header."""
    return anthropic.Anthropic(
        base_url=gw.base_url, api_key=None, auth_token=None, default_headers={"x-api-key": key}, max_retries=0
    )


def sse_events(gw: Gateway, key: str, body: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """(event name, data) of every SSE event, checking each has its `event:` line; and the request id."""
    with httpx.stream(
        "POST", gw.base_url + "/v1/messages", json={**body, "stream": True}, headers={"x-api-key": key}
    ) as response:
        assert response.status_code == 200
        text = response.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][len("data: ") :])
        assert data["type"] == lines[0][len("event: ") :]
        events.append((data["type"], data))
    return events, response.headers["x-request-id"]


def test_create_answers_with_each_auth_style(gateway: Gateway) -> None:
    key = gateway.key()
    clients = {
        "api_key": sdk(gateway, key),
        "auth_token": anthropic.Anthropic(
            base_url=gateway.base_url, api_key=None, auth_token=key, max_retries=0
        ),
        "x-api-key": x_api_key_client(gateway, key),
    }
    for style, client in clients.items():
        raw = client.messages.with_raw_response.create(model="fast", max_tokens=50, messages=HELLO)
        sent = raw.http_request.headers
        assert ("authorization" in sent) == (style != "x-api-key"), style
        message = raw.parse()
        assert message.type == "message" and message.role == "assistant" and message.model == "fast"
        assert message.content[0].type == "text" and message.content[0].text.startswith("tok0")
        assert message.stop_reason == "end_turn" and message.stop_sequence is None
        assert message.usage.input_tokens > 0 and message.usage.output_tokens == 8
        assert message.id == f"msg_{raw.headers['x-request-id']}"


def test_max_tokens_stops_as_max_tokens(gateway: Gateway) -> None:
    message = sdk(gateway, gateway.key()).messages.create(model="fast", max_tokens=3, messages=HELLO)
    assert message.stop_reason == "max_tokens" and message.content[0].text == "tok0 tok1 tok2"
    sent = gateway.fake.requests("fast")[-1]
    assert sent["max_tokens"] == 3


def test_parameters_reach_the_backend_as_chat(gateway: Gateway) -> None:
    sdk(gateway, gateway.key()).messages.create(
        model="fast",
        max_tokens=9,
        system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": " and kind"}],
        messages=HELLO,
        stop_sequences=["END"],
        metadata={"user_id": "u-42"},
        extra_body={"temperature": 0.5, "top_p": 0.9},  # this SDK release no longer names them
    )
    sent = gateway.fake.requests("fast")[-1]
    assert sent["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": " and kind"}],
    }
    assert sent["messages"][1] == HELLO[0]
    assert (sent["temperature"], sent["top_p"], sent["stop"], sent["user"]) == (0.5, 0.9, ["END"], "u-42")


def test_stream_text_and_final_message(gateway: Gateway) -> None:
    client = sdk(gateway, gateway.key())
    with client.messages.stream(model="fast", max_tokens=50, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 8


def test_stream_events_in_order_each_named(gateway: Gateway) -> None:
    events, _ = sse_events(gateway, gateway.key(), {"model": "fast", "max_tokens": 4, "messages": HELLO})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[3:7] == ["content_block_delta"] * 4
    assert names[7:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["delta"]["type"] == "text_delta" for _, data in events[3:7])
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 4


TOOLS = [
    WEATHER,
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}},
]
CALLS = (
    ("get_weather", '{"location": "Zürich", "days": [1, 2], "detail": {"wind": true, "note": "a \\"b\\""}}'),
    ("get_time", '{"tz":"Europe/Paris"}'),
)


def script(gw: Gateway, model: str, *calls: tuple[str, str], text: str = "") -> str:
    """The upstream of `model` answers every request offering tools with `calls` (every tool knob set)."""
    upstream = TOOL_UPSTREAMS[model]
    gw.fake.configure(
        upstream,
        tool_calls=calls,
        tool_arg_pieces=4,
        tool_interleave=False,
        tool_with_finish=False,
        tool_text=text,
    )
    return upstream


def ask() -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What should I pack? {uuid.uuid4().hex}"}]


@pytest.mark.parametrize("model", list(TOOL_UPSTREAMS))
def test_tool_use_arrives_intact_whole_and_streamed(gateway: Gateway, model: str) -> None:
    upstream = script(gateway, model, *CALLS, text="Checking.")
    client = sdk(gateway, gateway.key())
    message = client.messages.create(model=model, max_tokens=50, tools=TOOLS, messages=ask())
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Checking."
    uses = message.content[1:]
    assert [(u.type, u.id, u.name) for u in uses] == [("tool_use", c["id"], c["name"]) for c in sent]
    assert [u.input for u in uses] == [json.loads(c["arguments"]) for c in sent]  # type: ignore[union-attr]

    events, _ = sse_events(
        gateway, gateway.key(), {"model": model, "max_tokens": 50, "tools": TOOLS, "messages": ask()}
    )
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    starts = [d for n, d in events if n == "content_block_start"]
    assert [b["content_block"]["type"] for b in starts] == ["text", "tool_use", "tool_use"]
    assert [(b["content_block"]["id"], b["content_block"]["name"]) for b in starts[1:]] == [
        (c["id"], c["name"]) for c in sent
    ]
    for block, call in zip(starts[1:], sent, strict=True):
        pieces = [
            d["delta"]["partial_json"]
            for n, d in events
            if n == "content_block_delta" and d["index"] == block["index"]
        ]
        assert (
            len(pieces) > 1 and "".join(pieces) == call["arguments"]
        )  # as the upstream sent them, in pieces
    assert [d for n, d in events if n == "message_delta"][0]["delta"]["stop_reason"] == "tool_use"
    with client.messages.stream(model=model, max_tokens=50, tools=TOOLS, messages=ask()) as stream:
        final = stream.get_final_message()
    sent = gateway.fake.sent_tool_calls(upstream)[-1]
    assert [(b.id, b.input) for b in final.content[1:]] == [  # type: ignore[union-attr]
        (c["id"], json.loads(c["arguments"])) for c in sent
    ]


@pytest.mark.parametrize("model", list(TOOL_UPSTREAMS))
def test_tool_result_round_trip(gateway: Gateway, model: str) -> None:
    upstream = script(gateway, model, *CALLS)
    client = sdk(gateway, gateway.key())
    question = ask()
    call = client.messages.create(model=model, max_tokens=50, tools=TOOLS, messages=question)
    ids = [block.id for block in call.content if block.type == "tool_use"]
    results = [
        {"type": "tool_result", "tool_use_id": ids[0], "content": "18 degrees"},
        {
            "type": "tool_result",
            "tool_use_id": ids[1],
            "content": [{"type": "text", "text": "10:00"}],
            "is_error": True,
        },
    ]
    follow_up = [
        *question,
        {"role": "assistant", "content": call.content},
        {"role": "user", "content": results},
    ]
    answer = client.messages.create(model=model, max_tokens=50, tools=TOOLS, messages=follow_up)
    # The fake answers "saw <call id>=<digest of the result text>" for the tool results it received.
    assert answer.content[0].type == "text"
    assert (
        answer.content[0].text
        == f"saw {ids[0]}={digest('18 degrees')} {ids[1]}={digest('[tool error] 10:00')}"
    )
    if model == "tools-oai":  # an OpenAI-compatible upstream sees the chat messages themselves
        sent = gateway.fake.requests(upstream)[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
        assert [c["id"] for c in sent[1]["tool_calls"]] == ids and sent[1]["content"] is None
        assert sent[2] == {"role": "tool", "tool_call_id": ids[0], "content": "18 degrees"}
        assert sent[3]["content"] == [
            {"type": "text", "text": "[tool error] "},
            {"type": "text", "text": "10:00"},
        ]


def test_malformed_tool_arguments_are_a_backend_error(gateway: Gateway) -> None:
    script(gateway, "tools-oai", ("get_weather", '{"location": "Par'))
    with pytest.raises(anthropic.InternalServerError) as info:
        sdk(gateway, gateway.key()).messages.create(
            model="tools-oai", max_tokens=50, tools=TOOLS, messages=ask()
        )
    assert info.value.status_code == 502 and "not a JSON object" in info.value.message


def test_call_tool_trigger_on_a_plain_backend(gateway: Gateway) -> None:
    ask_tool = [{"role": "user", "content": f"{TOOL_TRIGGER}: weather in Paris?"}]
    message = sdk(gateway, gateway.key()).messages.create(
        model="fast", max_tokens=50, tools=[WEATHER], messages=ask_tool
    )
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == TOOL_ARGUMENTS
    sent = gateway.fake.requests("fast")[-1]
    function = {
        "name": "get_weather",
        "description": WEATHER["description"],
        "parameters": WEATHER["input_schema"],
    }
    assert sent["tools"] == [{"type": "function", "function": function}]


def test_cloud_anthropic_keeps_version_beta_and_cache_control(gateway: Gateway) -> None:
    beta = "prompt-caching-2024-07-31,fine-grained-tool-streaming-2025-05-14"
    client = sdk(gateway, gateway.key(), default_headers={"anthropic-beta": beta})
    cached = {"type": "ephemeral"}
    messages = [
        {"role": "user", "content": "What is the weather?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny", "cache_control": cached}
            ],
        },
    ]
    message = client.messages.create(
        model="cloud-claude",
        max_tokens=20,
        system=[{"type": "text", "text": "a long stable preamble", "cache_control": cached}],
        tools=[{**WEATHER, "cache_control": cached}],
        messages=messages,
    )
    assert message.model == "cloud-claude" and message.content[0].text == f"saw toolu_1={digest('sunny')}"
    got = gateway.fake.received(CLAUDE_UPSTREAM)[-1]
    assert got["path"] == "/v1/messages"
    # litellm writes the upstream body and reads the answer, so the version it speaks is the one sent (the
    # SDK's own, e.g. 2026-10-21, would misstate the body's format); betas it knows for anthropic pass.
    assert got["headers"]["anthropic-version"] == "2023-06-01"
    assert set(got["headers"]["anthropic-beta"].split(",")) == set(beta.split(","))
    body = got["body"]
    assert body["system"] == [{"type": "text", "text": "a long stable preamble", "cache_control": cached}]
    assert body["tools"][0]["cache_control"] == cached
    result = body["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
    assert result["content"] == [{"type": "text", "text": "sunny", "cache_control": cached}]
    # An OpenAI-compatible backend gets none of Anthropic's headers.
    sdk(gateway, gateway.key(), default_headers={"anthropic-beta": beta}).messages.create(
        model="fast", max_tokens=5, messages=HELLO
    )
    assert "anthropic-beta" not in gateway.fake.received("fast")[-1]["headers"]


def test_one_ledger_row_per_request(gateway: Gateway) -> None:
    client = sdk(gateway, gateway.key())
    plain = client.messages.with_raw_response.create(model="fast", max_tokens=5, messages=HELLO)
    _, streamed = sse_events(gateway, gateway.key(), {"model": "fast", "max_tokens": 5, "messages": HELLO})
    for request_id, stream in ((plain.headers["x-request-id"], False), (streamed, True)):
        row = gateway.usage_row(request_id)
        assert row["status"] == "ok" and row["stream"] == stream and row["requested_model"] == "fast"
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 5
        assert gateway.count_rows(request_id) == 1
        assert row["endpoint"] == "messages"


def test_pii_in_a_tool_result_never_reaches_the_cloud(gateway: Gateway) -> None:
    secret = uuid.uuid4().hex
    client = sdk(gateway, gateway.key())

    def conversation(result: str) -> list[dict[str, Any]]:
        use = {"type": "tool_use", "id": "toolu_7", "name": "lookup", "input": {"q": secret}}
        return [
            {"role": "user", "content": f"look up {secret}"},
            {"role": "assistant", "content": [use]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_7", "content": result}],
            },
        ]

    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    allowed = client.messages.create(
        model="cloud-claude", max_tokens=5, tools=tools, messages=conversation("ok")
    )
    assert allowed.content[0].type == "text"  # without the PII the cloud serves it
    before = len(gateway.fake.requests(CLAUDE_UPSTREAM))
    for result in (f"{secret} card 4111 1111 1111 1111", f"{secret} mail jane.doe@example.com"):
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.with_raw_response.create(
                model="cloud-claude", max_tokens=5, tools=tools, messages=conversation(result)
            )
        assert "privacy floor `internal`" in info.value.message
        row = gateway.usage_row(info.value.response.headers["x-request-id"])
        assert row["privacy_class"].startswith("internal:") and row["backend"] is None
    with pytest.raises(anthropic.BadRequestError):  # a card number shaped like a beta name, in the header
        sdk(
            gateway, gateway.key(), default_headers={"anthropic-beta": "4111-1111-1111-1111"}
        ).messages.create(model="cloud-claude", max_tokens=5, messages=[{"role": "user", "content": secret}])
    assert len(gateway.fake.requests(CLAUDE_UPSTREAM)) == before


def test_planted_prompt_text_stays_out_of_logs_and_errors(gateway: Gateway) -> None:
    """The log scan (tests/support/logscan.py) checks what these paths log and answer."""
    key = gateway.key("planted", name="logscan-messages")
    gateway.fake.configure("m500", fail_status=500)
    gateway.fake.configure("mcut", cut_after_chunks=2, n_tokens=20)
    planted = [{"role": "user", "content": [{"type": "text", "text": f"{logscan.PROMPT_MARKER} hello"}]}]
    bodies = [
        {"model": "fast", "max_tokens": 8, "messages": planted},
        {"model": "fast", "max_tokens": 8, "messages": planted, "stream": True},
        {"model": "cloud-claude", "max_tokens": 8, "messages": planted},
        {"model": "m500", "max_tokens": 8, "messages": planted},
        {"model": "mcut", "max_tokens": 8, "messages": planted, "stream": True},
        {"model": "fast", "max_tokens": logscan.PROMPT_MARKER, "messages": planted},
        {
            "model": "fast",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": logscan.PROMPT_MARKER}]}],
        },
    ]
    for body in bodies:
        reply = httpx.post(
            gateway.base_url + "/v1/messages", json=body, headers={"x-api-key": key}, timeout=30
        )
        logscan.observe(f"answer to a planted Messages request to {body['model']}", reply.text)
        assert reply.status_code < 500 or reply.json()["type"] == "error"
