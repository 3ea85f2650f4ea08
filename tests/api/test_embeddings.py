"""`POST /v1/embeddings` through the shared pipeline, driven by the official `openai` SDK.

Two backends: the loopback fake reached through litellm (`cloud`) and the same fake as an OpenAI-compatible
server (`openai`, the pooled transport). Checked: strings and lists, float and base64 (the SDK's default),
cache hits, the ledger row, `dimensions`, the model's mode, privacy floors (planted PII never reaches the
external deployment), and bad input answered 400 in the OpenAI envelope.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.config import parse_config
from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import FAKE_UPSTREAM_KEY, Gateway
from tests.support.fake_provider import FakeProvider
from tests.support.fake_wire import fake_vector
from tests.support.live import LiveServer

PII = "Send the invoice to jane.doe@example.com before Friday"  # the email detector fires on it


def _config(fake_root: str, db: dict[str, Any]) -> Any:
    fake_v1 = fake_root + "/v1"
    price = {"input_usd_per_mtok": "100", "output_usd_per_mtok": "0"}
    return parse_config(
        {
            "database": {"flush_interval_s": 0.02, "replay_interval_s": 0.2, **db},
            "backends": {
                "fakeoai": {"kind": "openai", "base_url": fake_v1, "api_key_env": "SB_TEST_FAKE_KEY"},
                "cloud_openai": {
                    "kind": "cloud",
                    "provider": "openai",
                    "api_base": fake_v1,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
            },
            "models": {
                "emb": {
                    "backend": "fakeoai",
                    "upstream_model": "emb-oai",
                    "mode": "embedding",
                    "supports_dimensions": True,
                    **price,
                },
                "cloud-emb": {
                    "backend": "cloud_openai",
                    "upstream_model": "emb-cloud",
                    "mode": "embedding",
                    **price,
                },
                "mixed-emb": {
                    "mode": "embedding",
                    "deployments": [
                        {"backend": "cloud_openai", "upstream_model": "emb-mixed-cloud", **price},
                        {
                            "backend": "fakeoai",
                            "upstream_model": "emb-mixed-internal",
                            "input_usd_per_mtok": "90000",
                            "output_usd_per_mtok": "0",
                        },
                    ],
                },
                "fast": {"backend": "fakeoai", **price},
            },
            "teams": {"alpha": {"models": ["*"]}},
        }
    )


@pytest.fixture(scope="module")
def emb_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    tmp = tmp_path_factory.mktemp("emb")
    config = _config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill")})
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def client(emb_gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=emb_gateway.v1, api_key=emb_gateway.key(), max_retries=0, timeout=30)


UPSTREAM = {"emb": "emb-oai", "cloud-emb": "emb-cloud"}


@pytest.mark.parametrize("model", ["emb", "cloud-emb"])
def test_string_and_list_in_base64_and_float(client: openai.OpenAI, fake: FakeProvider, model: str) -> None:
    one = client.embeddings.create(model=model, input=f"hello embeddings {model}")  # SDK asks base64
    assert len(one.data) == 1 and one.data[0].index == 0
    assert one.data[0].embedding == fake_vector(f"hello embeddings {model}")
    assert one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens
    texts = [f"first {model}", f"second text {model}", f"third {model}"]
    many = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    assert [d.embedding for d in many.data] == [fake_vector(t) for t in texts]
    sent = fake.requests(UPSTREAM[model])[-1]
    assert sent["input"] == texts and sent["encoding_format"] == "float"  # backends always ask for floats


def test_wire_shapes_of_float_and_base64(emb_gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {emb_gateway.key()}"}
    for fmt in ("float", "base64"):
        reply = httpx.post(
            emb_gateway.v1 + "/embeddings",
            json={"model": "emb", "input": ["wire shape"], "encoding_format": fmt},
            headers=headers,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == "emb"
        item = body["data"][0]
        assert item["object"] == "embedding" and item["index"] == 0
        if fmt == "float":
            assert item["embedding"] == fake_vector("wire shape")
        else:
            raw = base64.b64decode(item["embedding"])
            assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == fake_vector("wire shape")


def test_cache_hit_and_ledger_row(emb_gateway: Gateway, client: openai.OpenAI, fake: FakeProvider) -> None:
    texts = ["cache me once", "and me too"]
    first = client.embeddings.with_raw_response.create(model="emb", input=texts)
    assert first.headers["x-switchboard-cache"] == "miss"
    assert first.headers["x-switchboard-backend"] == "fakeoai"
    sent = len(fake.requests("emb-oai"))
    again = client.embeddings.with_raw_response.create(model="emb", input=texts)
    assert again.headers["x-switchboard-cache"] == "hit"
    assert len(fake.requests("emb-oai")) == sent  # the upstream was not asked again
    assert [d.embedding for d in again.parse().data] == [d.embedding for d in first.parse().data]
    row = emb_gateway.usage_row(first.headers["x-request-id"])
    usage = first.parse().usage
    assert row["prompt_tokens"] == usage.prompt_tokens > 0 and row["completion_tokens"] == 0
    assert row["status"] == "ok" and row["requested_model"] == "emb" and row["backend"] == "fakeoai"
    assert row["cost_micro_usd"] == usage.prompt_tokens * 100  # 100 USD per million tokens
    assert row.get("endpoint", "embeddings") == "embeddings"  # the column arrives with the ledger change
    hit = emb_gateway.usage_row(again.headers["x-request-id"])
    assert hit["cache_hit"] and hit["cost_micro_usd"] == 0 and hit["cost_saved_micro_usd"] > 0
    assert emb_gateway.count_rows(first.headers["x-request-id"]) == 1


def test_token_arrays_reach_an_internal_backend(client: openai.OpenAI, fake: FakeProvider) -> None:
    got = client.embeddings.create(model="emb", input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert [d.embedding for d in got.data] == [fake_vector([1, 2, 3]), fake_vector([4, 5])]
    assert fake.requests("emb-oai")[-1]["input"] == [[1, 2, 3], [4, 5]]
    single = client.embeddings.create(model="emb", input=[7, 8, 9], encoding_format="float")
    assert single.data[0].embedding == fake_vector([7, 8, 9])


def test_dimensions_only_where_supported(client: openai.OpenAI, fake: FakeProvider) -> None:
    got = client.embeddings.create(model="emb", input="short please", dimensions=4)
    assert len(got.data[0].embedding) == 4 and fake.requests("emb-oai")[-1]["dimensions"] == 4
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="cloud-emb", input="short please", dimensions=4)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "models.cloud-emb.supports_dimensions" in info.value.body["message"]  # type: ignore[index]


def test_model_mode_is_enforced_both_ways(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert 'models.emb.mode = "embedding"' in chat.value.body["message"]  # type: ignore[index]
    assert "/v1/embeddings" in chat.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as emb:
        client.embeddings.create(model="fast", input="hello")
    assert "models.fast.mode" in emb.value.body["message"]  # type: ignore[index]
    assert emb.value.body["param"] == "model"  # type: ignore[index]


def test_sensitive_input_never_reaches_the_external_deployment(
    client: openai.OpenAI, fake: FakeProvider
) -> None:
    plain = client.embeddings.with_raw_response.create(model="mixed-emb", input="nothing private here")
    assert plain.headers["x-switchboard-backend"] == "cloud_openai"  # the external one wins on cost
    before = len(fake.requests("emb-mixed-cloud"))
    private = client.embeddings.with_raw_response.create(model="mixed-emb", input=["fine", PII])
    assert private.headers["x-switchboard-backend"] == "fakeoai"  # raised to internal
    assert len(private.parse().data) == 2
    assert len(fake.requests("emb-mixed-cloud")) == before
    assert all(PII not in str(body) for body in fake.requests("emb-mixed-cloud"))
    assert fake.requests("emb-mixed-internal")[-1]["input"] == ["fine", PII]
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="cloud-emb", input=PII)
    assert "privacy floor `internal`" in refused.value.body["message"]  # type: ignore[index]
    assert PII not in str(refused.value.body)
    assert all(PII not in str(body) for body in fake.requests("emb-cloud"))
    with pytest.raises(openai.BadRequestError) as opaque:  # token ids cannot be scanned: not external
        client.embeddings.create(model="cloud-emb", input=[[11, 12, 13]])
    assert "token-id input cannot be scanned" in opaque.value.body["message"]  # type: ignore[index]


BAD_BODIES: list[tuple[dict[str, Any], str | None]] = [
    ({"model": "emb", "input": ""}, "input"),
    ({"model": "emb", "input": []}, "input"),
    ({"model": "emb", "input": ["ok", ""]}, "input.1"),
    ({"model": "emb", "input": [[]]}, "input.0"),
    ({"model": "emb", "input": ["a", 1]}, "input"),
    ({"model": "emb", "input": [[1, "x"]]}, "input.0"),
    ({"model": "emb", "input": [-1]}, "input"),
    ({"model": "emb", "input": [True]}, "input"),
    ({"model": "emb", "input": {"text": "x"}}, "input"),
    ({"model": "emb", "input": ["x"] * 2049}, "input"),
    ({"model": "emb"}, "input"),
    ({"input": "x"}, "model"),
    ({"model": "emb", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "emb", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "emb", "input": "x", "dimensions": "4"}, "dimensions"),
    ({"model": "emb", "input": "x", "stream": True}, "stream"),
    ({"model": "emb", "input": "x", "temperature": 0}, "temperature"),
    ({"model": "emb", "input": "x", "user": 5}, "user"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_input_is_a_400_in_the_openai_envelope(
    emb_gateway: Gateway, body: dict[str, Any], param: str | None
) -> None:
    reply = httpx.post(
        emb_gateway.v1 + "/embeddings", json=body, headers={"authorization": f"Bearer {emb_gateway.key()}"}
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and error["code"]


def test_not_json_and_unknown_model(emb_gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {emb_gateway.key()}", "content-type": "application/json"}
    for raw in (b"", b"{not json", b"[1, 2]"):
        reply = httpx.post(emb_gateway.v1 + "/embeddings", content=raw, headers=headers)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    url = emb_gateway.v1 + "/embeddings"
    unknown = httpx.post(url, json={"model": "nope", "input": "x"}, headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_token_limits_count_embedding_inputs(emb_gateway: Gateway) -> None:
    key = emb_gateway.key(limit_tokens=60)
    client = openai.OpenAI(base_url=emb_gateway.v1, api_key=key, max_retries=0, timeout=30)
    text = "tokens are counted for embeddings too " * 4  # about 40 tokens by the fake's count
    first = client.embeddings.create(model="emb", input=text, encoding_format="float")
    assert first.usage.prompt_tokens >= 30
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="emb", input=text + "again", encoding_format="float")
    assert info.value.response.headers["x-ratelimit-remaining-tokens"] is not None


def test_a_failing_deployment_falls_back_like_chat(client: openai.OpenAI, fake: FakeProvider) -> None:
    fake.configure("emb-mixed-cloud", fail_status=503, fail_times=1)
    raw = client.embeddings.with_raw_response.create(model="mixed-emb", input="fall back please")
    assert raw.headers["x-switchboard-backend"] == "fakeoai"  # the cloud deployment failed first
    assert raw.parse().data[0].embedding == fake_vector("fall back please")
    assert fake.requests("emb-mixed-cloud")[-1]["input"] == ["fall back please"]
