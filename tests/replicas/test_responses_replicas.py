"""`previous_response_id` across replicas: two `switchboard serve` processes share only PostgreSQL.

A response answered by one replica is continued, read back and deleted through the other; nothing but the
SQL store carries the conversation (no Redis here, so nothing else could).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.store import keys
from tests.support import logscan
from tests.support.replica_rig import ADMIN_KEY, ENV
from tests.support.replicas import FakeUpstream, GatewayReplicas, pg_schema
from tests.support.services import PG_URL

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], str, FakeUpstream]]:
    workdir = tmp_path_factory.mktemp("responses-replicas")
    upstream = FakeUpstream(workdir).spawn()
    try:
        upstream.wait_ready()
        with pg_schema(PG_URL, {"alpha": ["*"], "beta": ["*"]}) as (schema, engine):
            config: dict[str, Any] = {
                "server": {"admin_key_env": "SB_REP_ADMIN_KEY"},
                "database": {"url": PG_URL, "schema_name": schema, "auto_migrate": False},
                "backends": {
                    "up": {
                        "kind": "openai",
                        "base_url": upstream.base_url + "/v1",
                        "api_key_env": "SB_REP_UPSTREAM_KEY",
                    }
                },
                "models": {"fast": {"backend": "up", "upstream_model": "fast"}},
                "teams": {"alpha": {}, "beta": {}},
            }
            assert ADMIN_KEY  # registered with the log scan by replica_rig
            replicas = GatewayReplicas(config, workdir, n=2, name="resp", env=ENV).start()
            try:
                key = keys.create_key(engine, "alpha", name="r", models=None, expires_at=None).plaintext
                yield replicas.urls, key, upstream
            finally:
                replicas.stop()
    finally:
        upstream.stop()


def client(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def upstream_bodies(upstream: FakeUpstream, marker: str) -> list[dict[str, Any]]:
    bodies = httpx.get(upstream.base_url + "/_requests", params={"model": "fast"}, timeout=5).json()
    return [entry["body"] for entry in bodies if marker in str(entry["body"])]


def test_a_conversation_continues_on_another_replica(pair: tuple[list[str], str, FakeUpstream]) -> None:
    (one, two), key, upstream = pair
    marker = uuid.uuid4().hex
    first = client(one, key).responses.create(
        model="fast", input=f"remember {marker} {logscan.PROMPT_MARKER}"
    )
    streamed = client(two, key).responses.create(
        model="fast", input=f"what did I say? {marker}", previous_response_id=first.id, stream=True
    )
    events = list(streamed)
    assert events[-1].type == "response.completed"
    second = events[-1].response
    messages = upstream_bodies(upstream, marker)[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == f"remember {marker} {logscan.PROMPT_MARKER}"
    assert messages[1]["content"] == first.output_text
    # The streamed answer was stored by replica two, and replica one reads and deletes it.
    assert client(one, key).responses.retrieve(second.id).output_text == second.output_text
    client(one, key).responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client(two, key).responses.retrieve(second.id)
    with pytest.raises(openai.BadRequestError) as err:
        client(two, key).responses.create(model="fast", input="more", previous_response_id=second.id)
    assert err.value.body["code"] == "previous_response_not_found"
