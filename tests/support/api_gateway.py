"""The API tests' live gateway: its config (in front of the loopback fake provider), the `Gateway` handle
tests reach it through, and the keys it uses. The fixtures that start it are in tests/api/conftest.py.
`plant` sends the log scan's planted prompt text (tests/support/logscan.py) down paths that log or fail."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.config import Config, parse_config
from gateway.store import keys
from tests.support import logscan
from tests.support.fake_provider import FakeProvider
from tests.support.usage import wait_for_usage_row

ADMIN_KEY = "admin-" + uuid.uuid4().hex
FAKE_UPSTREAM_KEY = "sk-fake-upstream-" + uuid.uuid4().hex
logscan.register(ADMIN_KEY, "admin key")
logscan.register(FAKE_UPSTREAM_KEY, "upstream API key")

# Upstream model names on the fake provider, one per behaviour, so tests never share knobs.
FAST_MODELS = ("fast", "m429", "m500", "m401", "mhang", "mcut", "mslow")
# Public model name -> upstream model name on the fake, for the tool-call tests: an OpenAI-compatible backend,
# and the cloud OpenAI and Anthropic backends through litellm.
TOOL_UPSTREAMS = {
    "tools-oai": "tools-oai-up",
    "tools-cloud-gpt": "tools-gpt-up",
    "tools-cloud-claude": "tools-claude-up",
}


def gateway_config(fake_root: str, db: dict[str, Any]) -> Config:
    fake_v1 = fake_root + "/v1"
    models: dict[str, Any] = {
        name: {"backend": "fakeoai", "input_usd_per_mtok": "1.5", "output_usd_per_mtok": "6"}
        for name in FAST_MODELS
    }
    models["mhang"]["backend"] = "fakeshort"
    models["notools"] = {"backend": "notools", "upstream_model": "fast"}
    models["cloud-gpt"] = {
        "backend": "cloud_openai",
        "upstream_model": "gpt-4o-mini",
        "input_usd_per_mtok": "0.15",
        "output_usd_per_mtok": "0.60",
    }
    models["cloud-claude"] = {
        "backend": "cloud_anthropic",
        "upstream_model": "claude-haiku-4-5",
    }
    # Tool-call tests (tests/api/test_tool_calls.py) script the fake per upstream model, one per path.
    tool_backends = {
        "tools-oai": "fakeoai",
        "tools-cloud-gpt": "cloud_openai",
        "tools-cloud-claude": "cloud_anthropic",
    }
    for name, backend in tool_backends.items():
        models[name] = {
            "backend": backend,
            "upstream_model": TOOL_UPSTREAMS[name],
            "input_usd_per_mtok": "1",
            "output_usd_per_mtok": "4",
        }
    # Uploaded files go next to the spill file, in the test's temporary directory.
    files = {"local_dir": str(Path(db["spill_path"]).parent / "files")} if "spill_path" in db else {}
    return parse_config(
        {
            "server": {"admin_key_env": "SB_TEST_ADMIN_KEY", "key_cache_ttl_s": 0.5, "max_body_bytes": 65536},
            "files": files,
            "database": {"flush_interval_s": 0.02, "replay_interval_s": 0.2, **db},
            "backends": {
                "fakeoai": {"kind": "openai", "base_url": fake_v1, "api_key_env": "SB_TEST_FAKE_KEY"},
                "fakeshort": {"kind": "openai", "base_url": fake_v1, "timeout_s": 0.5},
                "notools": {
                    "kind": "openai",
                    "base_url": fake_v1,
                    "supports_tools": False,
                    "supports_response_format": False,
                },
                "cloud_openai": {
                    "kind": "cloud",
                    "provider": "openai",
                    "api_base": fake_v1,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
                "cloud_anthropic": {
                    "kind": "cloud",
                    "provider": "anthropic",
                    "api_base": fake_root,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
            },
            "models": models,
            "teams": {
                "alpha": {"models": ["*"]},
                "beta": {"models": ["fast", "cloud-gpt"]},
                "planted": {"models": ["*"]},  # `plant`'s requests, kept out of the tests' teams
            },
            # Error-injection tests fail the same deployments again and again; circuits have their own tests.
            "routing": {"breaker_failures": 1_000_000},
        }
    )


@dataclass
class Gateway:
    base_url: str
    config: Config
    db: Engine
    fake: FakeProvider

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def key(self, team: str = "alpha", **kwargs: Any) -> str:
        kwargs.setdefault("name", "test")
        kwargs.setdefault("models", None)
        kwargs.setdefault("expires_at", None)
        return keys.create_key(self.db, team, **kwargs).plaintext

    def usage_row(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The ledger row for a request, once the writer has flushed it."""
        return wait_for_usage_row(self.db, request_id, timeout_s)

    def count_rows(self, request_id: str) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM usage WHERE request_id = :r"), {"r": request_id}
                ).scalar()
            )


def plant(gw: Gateway) -> None:
    """Requests carrying the planted prompt text through the paths that log or fail: a success, a stream,
    upstream errors, a malformed field, a refused key. Error bodies received are scanned too."""
    key = gw.key("planted", name="logscan")
    unknown_key = keys.generate_key()[0]  # key-shaped, never stored
    chat = {"messages": logscan.planted_messages(), "max_tokens": 8}
    sends: list[tuple[str, dict[str, Any]]] = [
        (key, {**chat, "model": "fast"}),
        (key, {**chat, "model": "fast", "stream": True}),
        (key, {**chat, "model": "cloud-gpt"}),
        (key, {**chat, "model": "m500"}),
        (key, {**chat, "model": "m401"}),
        (key, {**chat, "model": "mcut", "stream": True}),
        (key, {**chat, "model": "fast", "temperature": logscan.PROMPT_MARKER}),
        (key, {**chat, "model": "notools", "tools": [{"type": "function", "function": {"name": "f"}}]}),
        (unknown_key, {**chat, "model": "fast"}),
    ]
    with httpx.Client(base_url=gw.base_url, timeout=30) as client:
        for sent_key, body in sends:
            reply = client.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {sent_key}"}
            )
            if reply.status_code >= 400 or body.get("stream"):
                logscan.observe(
                    f"answer to a planted request to {body['model']} ({reply.status_code})", reply.text
                )
