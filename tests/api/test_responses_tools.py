"""`/v1/responses` function tools, `text.format`, privacy, the context check and teams that keep nothing.

Tool calls come from an in-process `ScriptedBackend` (tests/support/scripted.py) put in place of the
configured backend `scripted` once the live gateway has started: the whole pipeline runs, and the backend
shows exactly which chat request the Responses request became. Everything else is the fake provider.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from gateway.config import parse_config
from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support import logscan
from tests.support.api_gateway import FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.scripted import ScriptedBackend

CALL = {"id": "call_w3ather", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
ARGUMENTS = '{"city": "Paris", "unit": "celsius", "note": "ünïcode \\"quoted\\""}'
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
EMAIL = "jane.doe@example.com"


@dataclass
class Rig:
    gw: Gateway
    backend: ScriptedBackend  # answers model `scripted`

    def client(self, team: str = "alpha") -> OpenAI:
        return OpenAI(base_url=self.gw.v1, api_key=self.gw.key(team), max_retries=0, timeout=20)

    def answer(self, outcome: Any) -> None:
        self.backend.outcome = outcome
        self.backend.requests.clear()


@pytest.fixture(scope="module")
def rig(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    tmp = tmp_path_factory.mktemp("responses-tools")
    base = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")})
    raw = base.model_dump(mode="json")
    raw["backends"]["scripted"] = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}  # replaced below
    raw["models"]["scripted"] = {"backend": "scripted"}
    raw["models"]["tiny"] = {"backend": "fakeoai", "upstream_model": "fast", "context_tokens": 400}
    raw["teams"]["quiet"] = {"store_responses": False}
    config = parse_config(raw)
    app = create_app(config)
    with LiveServer(app) as server:
        backends = app.state.services.backends  # the dispatcher reads this very mapping
        configured = backends["scripted"]
        backend = backends["scripted"] = ScriptedBackend("scripted", "unused")
        engine = make_engine(config.database.url)
        try:
            yield Rig(Gateway(server.base_url, config, engine, fake), backend)
        finally:
            backends["scripted"] = configured  # closed with the app, as it was built
            engine.dispose()


def tool_call(arguments: str = ARGUMENTS) -> dict[str, Any]:
    return {
        "content": None,
        "tool_calls": [{**CALL, "function": {**CALL["function"], "arguments": arguments}}],
    }


def test_a_tool_call_arrives_intact_and_its_output_goes_back_as_a_tool_message(rig: Rig) -> None:
    oai = rig.client()
    rig.answer(tool_call())
    first = oai.responses.create(
        model="scripted",
        input="weather in Paris?",
        tools=[WEATHER],
        tool_choice="auto",  # type: ignore[list-item]
    )
    (call,) = first.output
    assert call.type == "function_call" and first.status == "completed"
    assert (call.call_id, call.name, call.arguments) == ("call_w3ather", "get_weather", ARGUMENTS)
    (sent,) = rig.backend.requests
    assert sent.tools == (
        {
            "type": "function",
            "function": {k: v for k, v in WEATHER.items() if k != "type"},
        },
    )
    assert sent.tool_choice == "auto"

    rig.answer("It is sunny.")
    output = {"type": "function_call_output", "call_id": "call_w3ather", "output": '{"sky": "sunny"}'}
    second = oai.responses.create(
        model="scripted",
        input=[output],
        previous_response_id=first.id,
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert second.output_text == "It is sunny."
    (sent,) = rig.backend.requests
    assert list(sent.messages) == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call()["tool_calls"][0]]},
        {"role": "tool", "tool_call_id": "call_w3ather", "content": '{"sky": "sunny"}'},
    ]

    # Without stored state: the client sends the whole conversation as items (the SDK's own types).
    rig.answer("Still sunny.")
    items: list[Any] = [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        output,
    ]
    oai.responses.create(model="scripted", input=items, store=False, instructions="be terse")
    (sent,) = rig.backend.requests
    assert list(sent.messages)[0] == {"role": "system", "content": "be terse"}
    assert list(sent.messages)[1:] == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call()["tool_calls"][0]]},
        {"role": "tool", "tool_call_id": "call_w3ather", "content": '{"sky": "sunny"}'},
    ]


def test_a_streamed_tool_call_sends_argument_deltas(rig: Rig) -> None:
    oai = rig.client()
    rig.answer(tool_call())
    events = list(oai.responses.create(model="scripted", input="weather?", tools=[WEATHER], stream=True))  # type: ignore[list-item]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call"
    assert (added.item.call_id, added.item.name) == ("call_w3ather", "get_weather")
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) == 2 and "".join(deltas) == ARGUMENTS
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == ARGUMENTS
    final = events[-1]
    assert final.type == "response.completed"
    (item,) = final.response.output
    assert item.type == "function_call" and item.arguments == ARGUMENTS and item.call_id == "call_w3ather"
    # The SDK's accumulator, and the stored copy, agree with the events.
    rig.answer(tool_call())
    with oai.responses.stream(model="scripted", input="weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        accumulated = stream.get_final_response()
    (call,) = accumulated.output
    assert call.type == "function_call" and call.arguments == ARGUMENTS and call.name == "get_weather"
    stored = oai.responses.retrieve(accumulated.id)
    assert stored.output[0].type == "function_call" and stored.output[0].arguments == ARGUMENTS


class Forecast(BaseModel):
    city: str
    celsius: int


def test_text_format_json_schema_becomes_response_format(rig: Rig) -> None:
    oai = rig.client()
    rig.answer('{"city": "Paris", "celsius": 21}')
    parsed = oai.responses.parse(model="scripted", input="forecast as JSON", text_format=Forecast)
    assert parsed.output_parsed == Forecast(city="Paris", celsius=21)
    (sent,) = rig.backend.requests
    assert sent.response_format is not None and sent.response_format["type"] == "json_schema"
    spec = sent.response_format["json_schema"]
    assert spec["name"] == "Forecast" and spec["strict"] is True
    assert set(spec["schema"]["properties"]) == {"city", "celsius"}
    rig.answer("{}")
    oai.responses.create(model="scripted", input="json", text={"format": {"type": "json_object"}})
    assert rig.backend.requests[0].response_format == {"type": "json_object"}


def test_input_over_the_context_size_gets_the_context_error(rig: Rig) -> None:
    long_input = "word " * 400  # ~500 tokens against a 400-token window
    with pytest.raises(openai.BadRequestError) as err:
        rig.client().responses.create(model="tiny", input=long_input, max_output_tokens=16)
    body = err.value.body
    assert body["code"] == "no_eligible_deployment" and "context_tokens" in body["message"]
    # A conversation grows past the window through previous_response_id just the same.
    half = "word " * 180  # ~230 tokens: fits once, not twice
    first = rig.client().responses.create(model="tiny", input=half, max_output_tokens=16)
    with pytest.raises(openai.BadRequestError) as grown:
        rig.client().responses.create(
            model="tiny", input=half, max_output_tokens=16, previous_response_id=first.id
        )
    assert grown.value.body["code"] == "no_eligible_deployment"


def test_planted_pii_never_reaches_an_external_backend(rig: Rig) -> None:
    """`cloud-gpt` is served only by an external cloud backend: sensitive data raises team alpha's floor above
    it, wherever in the request the data sits, including turns loaded through previous_response_id."""
    oai = rig.client()
    secret = uuid.uuid4().hex
    earlier = oai.responses.create(model="fast", input=f"mail {EMAIL} about {secret}")  # internal: allowed
    cases: list[dict[str, Any]] = [
        {"input": f"write to {EMAIL} {secret}"},
        {"input": f"summarise {secret}", "instructions": f"reply to {EMAIL}"},
        {"input": [{"type": "function_call_output", "call_id": "c1", "output": f"{EMAIL} {secret}"}]},
        {"input": f"and now? {secret}", "previous_response_id": earlier.id},
        {"input": f"go {secret}", "tools": [{**WEATHER, "description": f"mail {EMAIL}"}]},
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as err:
            oai.responses.create(model="cloud-gpt", **case)
        assert err.value.body["code"] == "no_eligible_deployment"
        assert "privacy floor `internal`" in err.value.body["message"]
        assert secret not in err.value.body["message"] and EMAIL not in err.value.body["message"]
    assert not any(secret in json.dumps(body) for body in rig.gw.fake.requests("gpt-4o-mini"))
    plain = oai.responses.create(model="cloud-gpt", input=f"nothing sensitive {secret}")
    assert plain.status == "completed"  # the external backend is up: only the data kept it away
    assert any(secret in json.dumps(body) for body in rig.gw.fake.requests("gpt-4o-mini"))


def test_a_team_that_keeps_nothing(rig: Rig) -> None:
    quiet = rig.client("quiet")
    resp = quiet.responses.create(model="fast", input=f"not kept {logscan.PROMPT_MARKER}")
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        quiet.responses.retrieve(resp.id)
    with pytest.raises(openai.BadRequestError) as err:
        quiet.responses.create(model="fast", input="keep this", store=True)
    body = err.value.body
    assert body["param"] == "store" and "teams.quiet.store_responses" in body["message"]
    with rig.gw.db.connect() as conn:
        from sqlalchemy import text

        kept = conn.execute(text("SELECT count(*) FROM responses WHERE team = 'quiet'")).scalar_one()
    assert kept == 0


def test_a_backend_failing_mid_stream_ends_in_response_failed(rig: Rig) -> None:
    from gateway.errors import BackendUnavailable

    rig.gw.fake.configure("mcut", cut_after_chunks=3, n_tokens=20)  # the upstream hangs up mid-answer
    events = list(rig.client().responses.create(model="mcut", input="hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.code == "server_error"
    assert "response.completed" not in {e.type for e in events}
    assert any(e.type == "response.output_text.delta" for e in events)  # it did start
    row = rig.gw.usage_row(failed.response.id.removeprefix("resp_"))
    assert row["status"] == "error" and row["stream"]

    rig.answer(BackendUnavailable("scripted backend down"))
    with pytest.raises(openai.APIStatusError) as err:  # fails before the first chunk: an HTTP error
        rig.client().responses.create(model="scripted", input="hi", stream=True)
    assert err.value.status_code == 503 and err.value.body["code"] == "upstream_unavailable"
