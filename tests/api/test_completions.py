"""Legacy `/v1/completions` through a live gateway, driven by the official `openai` SDK.

OpenAI-compatible backends get the prompt as it is (POST .../completions); cloud backends through litellm get
its chat translation. Bad input gets OpenAI's envelope with the field named.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.api_gateway import Gateway


def client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key=gw.key(), max_retries=0, timeout=20)


def last_sent(gw: Gateway, upstream_model: str) -> dict[str, Any]:
    return gw.fake.received(upstream_model)[-1]


def test_prompt_goes_as_it_is_to_an_openai_compatible_server(gateway: Gateway) -> None:
    raw = client(gateway).completions.with_raw_response.create(
        model="fast", prompt="Once upon a time", max_tokens=5
    )
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.model == "fast"
    assert completion.choices[0].text == "tok0 tok1 tok2 tok3 tok4"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    sent = last_sent(gateway, "fast")
    assert sent["path"].endswith("/v1/completions")
    assert sent["body"]["prompt"] == "Once upon a time" and "messages" not in sent["body"]
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert row["status"] == "ok" and row["completion_tokens"] == 5 and row["cost_micro_usd"] > 0
    assert row["endpoint"] == "completions"


def test_max_tokens_defaults_to_16_as_openai_does(gateway: Gateway) -> None:
    client(gateway).completions.create(model="fast", prompt="Count")
    assert last_sent(gateway, "fast")["body"]["max_tokens"] == 16


def test_stream_matches_the_whole_answer_and_reports_usage(gateway: Gateway) -> None:
    c = client(gateway)
    whole = c.completions.create(model="fast", prompt="Stream me", max_tokens=6, temperature=0.5)
    events = list(
        c.completions.create(
            model="fast",
            prompt="Stream me",
            max_tokens=6,
            temperature=0.5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == whole.choices[0].text
    finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finishes == ["length"]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 6
    assert all(e.object == "text_completion" for e in events)


def test_cloud_backend_gets_the_chat_translation(gateway: Gateway) -> None:
    completion = client(gateway).completions.create(model="cloud-gpt", prompt="Translate me", max_tokens=3)
    assert completion.choices[0].text == "tok0 tok1 tok2"
    sent = last_sent(gateway, "gpt-4o-mini")
    assert sent["path"].endswith("/chat/completions")
    assert sent["body"]["messages"] == [{"role": "user", "content": "Translate me"}]


def test_cloud_stream_through_litellm(gateway: Gateway) -> None:
    events = list(
        client(gateway).completions.create(model="cloud-gpt", prompt="Hi", max_tokens=4, stream=True)
    )
    assert "".join(e.choices[0].text for e in events if e.choices) == "tok0 tok1 tok2 tok3"


def test_upstream_failure_is_an_openai_error_with_one_ledger_row(gateway: Gateway) -> None:
    gateway.fake.configure("m500", fail_status=500)
    with pytest.raises(openai.APIStatusError) as info:
        client(gateway).completions.create(model="m500", prompt="fail please")
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "upstream_unavailable"
    assert info.value.response is not None
    request_id = info.value.response.headers["x-request-id"]
    assert gateway.usage_row(request_id)["status"] == "error" and gateway.count_rows(request_id) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 2}, "logprobs"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({}, "prompt"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(gateway: Gateway, body: dict[str, Any], param: str) -> None:
    reply = httpx.post(
        gateway.v1 + "/completions",
        json={"model": "fast", **body},
        headers={"authorization": f"Bearer {gateway.key()}"},
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"] or "prompt" in error["message"]


def test_sdk_gets_bad_request_error(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).completions.create(model="fast", prompt="x", extra_body={"echo": True})
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "echo"


def test_malformed_json_is_a_400(gateway: Gateway) -> None:
    reply = httpx.post(
        gateway.v1 + "/completions",
        content=b'{"model": "fast", "prompt": ',
        headers={"authorization": f"Bearer {gateway.key()}", "content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_planted_pii_in_a_prompt_never_reaches_an_external_backend(gateway: Gateway) -> None:
    """`cloud-gpt` is served only by an external cloud: an e-mail address in the prompt raises the floor
    above it, and the request fails closed instead of going out."""
    secret = uuid.uuid4().hex
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client(gateway).completions.create(
                model="cloud-gpt", prompt=f"write to jane.doe@example.com about {secret}", stream=stream
            )
        body = err.value.body
        assert isinstance(body, dict) and body["code"] == "no_eligible_deployment"
        assert secret not in body["message"] and "jane.doe" not in body["message"]
    assert not any(secret in json.dumps(r["body"]) for r in gateway.fake.received("gpt-4o-mini"))
    client(gateway).completions.create(model="fast", prompt=f"internal: jane.doe@example.com {secret}")
    assert any(secret in json.dumps(r["body"]) for r in gateway.fake.received("fast"))
