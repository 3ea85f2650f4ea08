"""`/v1/responses` with the official `openai` SDK against a live gateway in front of the fake provider:
whole and streamed answers, conversation state (`previous_response_id`, retrieve, input items, delete),
team scoping, the ledger, and refusals in OpenAI's envelope. SQLite and PostgreSQL alike (`any_gateway`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support import logscan
from tests.support.api_gateway import Gateway

FAKE_TEXT = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"  # the fake provider's answer for model `fast`


def client(gw: Gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=20)


def sent_upstream(gw: Gateway, marker: str) -> list[dict[str, Any]]:
    """The chat bodies the fake provider received (model `fast`) that carry `marker`."""
    return [body for body in gw.fake.requests("fast") if marker in json.dumps(body)]


def test_create_answers_with_an_output_message_usage_and_one_ledger_row(any_gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    raw = client(any_gateway, any_gateway.key()).responses.with_raw_response.create(
        model="fast", input=f"hello {marker}", instructions="answer briefly", max_output_tokens=64
    )
    resp = raw.parse()
    assert resp.id == "resp_" + raw.headers["x-request-id"] and resp.object == "response"
    assert resp.status == "completed" and resp.model == "fast" and resp.store is True
    assert resp.output_text == FAKE_TEXT
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert resp.usage is not None and resp.usage.output_tokens == 8 and resp.usage.input_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    (upstream,) = sent_upstream(any_gateway, marker)
    assert upstream["messages"] == [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": f"hello {marker}"},
    ]
    assert upstream["max_tokens"] == 64
    row = any_gateway.usage_row(raw.headers["x-request-id"])
    assert any_gateway.count_rows(raw.headers["x-request-id"]) == 1
    assert row["status"] == "ok" and row["completion_tokens"] == 8 and not row["stream"]
    assert row["endpoint"] == "responses"


def test_stream_events_are_typed_ordered_and_add_up(any_gateway: Gateway) -> None:
    oai = client(any_gateway, any_gateway.key())
    events = list(oai.responses.create(model="fast", input="stream please", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))  # strictly increasing, from 0
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    completed = events[-1]
    assert completed.type == "response.completed"
    assert deltas == done.text == completed.response.output_text == FAKE_TEXT
    assert completed.response.usage is not None and completed.response.usage.output_tokens == 8
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    row = any_gateway.usage_row(completed.response.id.removeprefix("resp_"))
    assert row["stream"] and row["status"] == "ok"
    # The SDK's own accumulator reads the same stream into the final response.
    with oai.responses.stream(model="fast", input="stream again") as stream:
        final = stream.get_final_response()
    assert final.output_text == FAKE_TEXT and final.status == "completed"
    assert oai.responses.retrieve(final.id).output_text == FAKE_TEXT  # a stream is stored too


def test_previous_response_carries_the_conversation(any_gateway: Gateway) -> None:
    oai = client(any_gateway, any_gateway.key())
    marker = uuid.uuid4().hex
    first = oai.responses.create(
        model="fast", input=f"my name is {marker} {logscan.PROMPT_MARKER}", instructions="first rules"
    )
    second = oai.responses.create(
        model="fast", input=f"what is my name? {marker}", previous_response_id=first.id, instructions="new"
    )
    assert second.previous_response_id == first.id and second.output_text == FAKE_TEXT
    upstream = sent_upstream(any_gateway, marker)[-1]
    # OpenAI's semantics: the earlier turns and answer are carried, the earlier instructions are not.
    assert upstream["messages"] == [
        {"role": "system", "content": "new"},
        {"role": "user", "content": f"my name is {marker} {logscan.PROMPT_MARKER}"},
        {"role": "assistant", "content": FAKE_TEXT},
        {"role": "user", "content": f"what is my name? {marker}"},
    ]
    third = oai.responses.create(model="fast", input=f"and again {marker}", previous_response_id=second.id)
    assert len(sent_upstream(any_gateway, marker)[-1]["messages"]) == 5  # three turns, two answers

    got = oai.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == FAKE_TEXT and got.usage == first.usage
    items = oai.responses.input_items.list(second.id)
    (item,) = items.data
    assert item.type == "message" and item.role == "user" and item.id.startswith("msg_")
    assert item.content[0].text == f"what is my name? {marker}"

    deleted = oai.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError) as gone:
        oai.responses.retrieve(first.id)
    assert gone.value.body["code"] == "not_found" and gone.value.body["param"] == "response_id"
    with pytest.raises(openai.BadRequestError) as chained:
        oai.responses.create(model="fast", input="more", previous_response_id=first.id)
    body = chained.value.body
    assert body["code"] == "previous_response_not_found" and body["param"] == "previous_response_id"
    assert oai.responses.retrieve(third.id).previous_response_id == second.id  # the rest is untouched


def test_another_teams_response_is_not_found(any_gateway: Gateway) -> None:
    mine = client(any_gateway, any_gateway.key("alpha"))
    theirs = client(any_gateway, any_gateway.key("beta"))
    resp = mine.responses.create(model="fast", input=f"private {logscan.PROMPT_MARKER}")
    for action in (
        lambda: theirs.responses.retrieve(resp.id),
        lambda: theirs.responses.delete(resp.id),
        lambda: theirs.responses.input_items.list(resp.id),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            action()
        assert err.value.status_code == 404 and err.value.body["type"] == "invalid_request_error"
        logscan.observe("another team's 404", json.dumps(err.value.body))
    with pytest.raises(openai.BadRequestError) as chained:
        theirs.responses.create(model="fast", input="hi", previous_response_id=resp.id)
    assert chained.value.body["code"] == "previous_response_not_found"
    assert mine.responses.retrieve(resp.id).id == resp.id  # still there for its own team


def test_store_false_keeps_nothing(any_gateway: Gateway) -> None:
    oai = client(any_gateway, any_gateway.key())
    resp = oai.responses.create(model="fast", input="forget me", store=False)
    assert resp.store is False and resp.output_text == FAKE_TEXT
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(resp.id)
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="fast", input="more", previous_response_id=resp.id)


def test_input_items_pages(gateway: Gateway) -> None:
    oai = client(gateway, gateway.key())
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    resp = oai.responses.create(model="fast", input=turns)  # type: ignore[arg-type]
    newest = oai.responses.input_items.list(resp.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["turn 4", "turn 3"] and newest.has_more
    rest = oai.responses.input_items.list(resp.id, order="asc", after=newest.data[0].id)
    assert rest.data == []
    oldest = oai.responses.input_items.list(resp.id, order="asc", limit=10)
    assert [i.content[0].text for i in oldest.data] == [f"turn {i}" for i in range(5)]
    assert oldest.has_more is False


def post(gw: Gateway, key: str, body: Any, *, raw: bytes | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(gw.v1 + "/responses", content=content, headers=headers, timeout=20)


BAD_BODIES: list[tuple[str, Any, str | None, str]] = [
    ("temperature as text", {"temperature": "hot"}, "temperature", "invalid_request"),
    ("stream as text", {"stream": "yes"}, "stream", "invalid_request"),
    ("input as a number", {"input": 5}, "input", "invalid_request"),
    ("missing model", {"model": None}, "model", "invalid_request"),
    ("unknown field", {"frobnicate": 1}, "frobnicate", "unsupported_parameter"),
    ("web_search tool", {"tools": [{"type": "web_search"}]}, "tools.0.type", "unsupported_parameter"),
    ("file_search tool", {"tools": [{"type": "file_search"}]}, "tools.0.type", "unsupported_parameter"),
    ("background", {"background": True}, "background", "unsupported_parameter"),
    ("include", {"include": ["reasoning.encrypted_content"]}, "include", "unsupported_parameter"),
    ("reasoning", {"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
    (
        "image input",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        "input.0.content.0.type",
        "unsupported_parameter",
    ),
    (
        "item without call_id",
        {"input": [{"type": "function_call_output", "output": "x"}]},
        "input.0.call_id",
        "invalid_request",
    ),  # fmt: skip
    (
        "unknown previous",
        {"previous_response_id": "resp_" + "0" * 32},
        "previous_response_id",
        "previous_response_not_found",
    ),  # fmt: skip
    (
        "huge integer",
        {"tools": [{"type": "function", "name": "f", "parameters": {"maximum": 2**70}}]},
        "tools.0.parameters.maximum",
        "invalid_request",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("case", "change", "param", "code"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_is_a_400_in_openais_envelope(
    gateway: Gateway, case: str, change: dict[str, Any], param: str | None, code: str
) -> None:
    body = {"model": "fast", "input": f"hi {logscan.PROMPT_MARKER}", **change}
    body = {k: v for k, v in body.items() if v is not None}
    reply = post(gateway, gateway.key(), body)
    logscan.observe(f"responses 400 ({case})", reply.text)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert logscan.PROMPT_MARKER not in error["message"]


def test_malformed_json_and_empty_body(gateway: Gateway) -> None:
    for raw in (b'{"model": "fast", "input": ', b"", b"[1, 2]"):
        reply = post(gateway, gateway.key(), None, raw=raw)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_request", reply.text
    no_key = httpx.post(gateway.v1 + "/responses", json={"model": "fast", "input": "hi"}, timeout=20)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    anonymous = httpx.get(gateway.v1 + "/responses/resp_x", timeout=20)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
