"""The batch tests' live gateway config and helpers: upload a JSONL file, create a batch, poll it to the end
and read its output and error files back, all through the official `openai` SDK."""

from __future__ import annotations

import time
from typing import Any

import openai
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.config import Config, parse_config

PII = "Mail jane.doe@example.com the figures"  # the email detector fires on it
FINAL = ("completed", "failed", "expired", "cancelled")


def batch_config(fake_root: str, db: dict[str, Any], files_dir: str, **batch: Any) -> Config:
    fake_v1 = fake_root + "/v1"
    price = {"input_usd_per_mtok": "2", "output_usd_per_mtok": "8"}
    cheap = {"batch_input_usd_per_mtok": "1", "batch_output_usd_per_mtok": "4"}
    return parse_config(
        {
            "server": {"key_cache_ttl_s": 0.5, "metrics_public": True},
            "files": {"local_dir": files_dir},
            "database": {"flush_interval_s": 0.02, "replay_interval_s": 0.2, **db},
            "batch": {"poll_s": 0.05, "lease_s": 5, "concurrency": 8, **batch},
            "backends": {
                "selfhosted": {"kind": "openai", "base_url": fake_v1, "api_key_env": "SB_TEST_FAKE_KEY"},
                "cloud": {
                    "kind": "cloud",
                    "provider": "openai",
                    "api_base": fake_v1,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
            },
            "models": {
                "chat": {"backend": "selfhosted", "upstream_model": "b-chat", **price, **cheap},
                "slow": {"backend": "selfhosted", "upstream_model": "b-slow", **price},
                "emb": {"backend": "selfhosted", "upstream_model": "b-emb", "mode": "embedding", **price},
                "gpt": {"backend": "cloud", "upstream_model": "b-gpt", **price, **cheap},
                "mixed": {
                    "deployments": [
                        {"backend": "selfhosted", "upstream_model": "b-mixed-local", **price},
                        {"backend": "cloud", "upstream_model": "b-mixed-cloud", **price, **cheap},
                    ]
                },
            },
            "teams": {
                "alpha": {"models": ["*"]},
                "beta": {"models": ["*"]},
                "broke": {"models": ["*"], "budgets": [{"period": "day", "usd": "0.0005"}]},
            },
            "routing": {"breaker_failures": 1_000_000},
        }
    )


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_line(i: int, model: str = "chat", content: str | None = None, **extra: Any) -> dict[str, Any]:
    text = content if content is not None else f"question number {i}"
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": i % 5 + 1, **extra}
    return line(f"req-{i}", body)


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)


def submit(sdk: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions") -> Any:
    uploaded = sdk.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    return sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"job": "test"},
    )


def wait_final(sdk: openai.OpenAI, batch_id: str, timeout_s: float = 60.0) -> tuple[Any, list[str]]:
    """The batch once it reached a final state, and every status seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in FINAL:
            return batch, seen
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish in {timeout_s} s; statuses: {seen}")


def file_lines(sdk: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in sdk.files.content(file_id).content.splitlines() if x.strip()]


def batch_rows(db: Engine, batch_id: str, expected: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The ledger rows of a batch, once `expected` of them are written."""
    deadline = time.monotonic() + timeout_s
    while True:
        with db.connect() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    sa.text("SELECT * FROM usage WHERE batch_id = :b"), {"b": batch_id}
                ).mappings()
            ]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
