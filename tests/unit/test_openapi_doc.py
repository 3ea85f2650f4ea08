"""The published OpenAPI document (server.docs): full request schemas, the error envelope, no 422."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.http.app import create_app
from tests.support.api_gateway import gateway_config


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    config = gateway_config("http://127.0.0.1:9", {"url": "sqlite://"})
    config = config.model_copy(update={"server": config.server.model_copy(update={"docs": True})})
    return create_app(config).openapi()


def _ops(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{m.upper()} {p}", op) for p, ops in doc["paths"].items() for m, op in ops.items()]


def test_chat_body_is_the_translators_model(doc: dict[str, Any]) -> None:
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    schema = doc["components"]["schemas"][ref]
    assert {"model", "messages"} <= set(schema["required"])
    assert schema["additionalProperties"] is False  # unknown fields are refused, so the schema says so
    assert schema["properties"]["presence_penalty"]["enum"] == [None, 0]
    assert "fast" in schema["properties"]["model"]["examples"]  # configured models
    answer = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(answer) == {"application/json", "text/event-stream"}


def test_every_operation_documents_the_envelope_and_never_422(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for name, op in _ops(doc):
        assert "422" not in op["responses"], name
        envelope = "ErrorAnswer" if name.startswith("POST /v1/messages") else "ErrorEnvelope"  # Anthropic's
        for status in ("400", "500"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{envelope}"}, name


def test_anthropic_routes_document_anthropics_statuses(doc: dict[str, Any]) -> None:
    messages = doc["paths"]["/v1/messages"]["post"]
    assert "529" in messages["responses"] and "503" not in messages["responses"]
    assert set(messages["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    counted = doc["paths"]["/v1/messages/count_tokens"]["post"]
    body = counted["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert body == "CountTokensBody" and "max_tokens" not in doc["components"]["schemas"][body]["required"]


def test_keys_and_report_parameters_are_typed(doc: dict[str, Any]) -> None:
    security = {name: op.get("security") for name, op in _ops(doc)}
    assert security["POST /v1/chat/completions"] == [{"teamKey": []}]
    assert security["GET /admin/edge/nodes"] == [{"adminKey": []}]
    assert security["GET /healthz"] is None
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/usage"]["get"]["parameters"]}
    assert params["source"]["enum"] == ["auto", "raw", "rollup"]
    assert params["format"]["enum"] == ["json", "csv"]
    assert "team" in params["group_by"]["pattern"]
