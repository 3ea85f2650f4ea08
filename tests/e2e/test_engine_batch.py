"""End-to-end: a small `/v1/batches` chat batch through the gateway onto the bundled engine running the real
SmolLM2-135M, driven by the official `openai` SDK.

The gateway reads the engine's /metrics for placement, so items run on it while it has room. Greedy answers
are deterministic: each output line, found by its `custom_id`, must carry the answer the engine gives the same
request sent to it directly, and each item leaves exactly one ledger row with the batch's id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.local.build import EngineOptions  # noqa: E402
from backends.local.loader import DEFAULT_MODEL_SPEC, load_model  # noqa: E402
from backends.local.server import create_engine_app  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.http.app import create_app  # noqa: E402
from gateway.store import keys  # noqa: E402
from gateway.store.db import make_engine  # noqa: E402
from tests.support.batch_rig import batch_rows, file_lines, line, submit, wait_final  # noqa: E402
from tests.support.live import LiveServer  # noqa: E402

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What animal says moo?",
]


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    loaded = load_model(DEFAULT_MODEL_SPEC)
    options = EngineOptions(dtype="float32", quant="none", kv_cache_mb=64, max_batch=8)
    app = create_engine_app(loaded, served_names=("smollm2",), options=options)
    with LiveServer(app) as server:
        yield server.base_url


def body(question: str) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 0,
    }


def test_a_chat_batch_completes_on_the_engine_with_one_ledger_row_per_item(
    engine_url: str, tmp_path: Path
) -> None:
    direct = openai.OpenAI(base_url=engine_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = {
        f"q-{i}": direct.chat.completions.create(**body(q)).choices[0].message.content  # type: ignore[call-overload]
        for i, q in enumerate(QUESTIONS)
    }
    config = parse_config(
        {
            "database": {"url": f"sqlite:///{tmp_path}/sb.db", "spill_path": str(tmp_path / "spill.jsonl")},
            "files": {"local_dir": str(tmp_path / "files")},
            "batch": {"poll_s": 0.05, "concurrency": 4},
            "backends": {
                "engine": {
                    "kind": "openai",
                    "base_url": f"{engine_url}/v1",
                    "metrics_url": f"{engine_url}/metrics",
                }
            },
            "models": {"smollm2": {"backend": "engine"}},
            "teams": {"t": {}},
            "routing": {"metrics_poll_s": 0.1},
        }
    )
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        try:
            key = keys.create_key(db, "t", name="e2e", models=None, expires_at=None).plaintext
            sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)
            lines = [line(f"q-{i}", body(q)) for i, q in enumerate(QUESTIONS)]
            created = submit(sdk, lines[::-1])  # any input order: the output is matched by custom_id
            batch, seen = wait_final(sdk, created.id, timeout_s=120)
            assert batch.status == "completed", seen
            assert batch.request_counts is not None
            assert (batch.request_counts.completed, batch.request_counts.failed) == (len(QUESTIONS), 0)
            out = {o["custom_id"]: o for o in file_lines(sdk, batch.output_file_id)}
            assert file_lines(sdk, batch.error_file_id) == []
            rows = batch_rows(db, batch.id, len(QUESTIONS))
        finally:
            db.dispose()
    assert sorted(out) == sorted(want)
    for custom_id, answer in want.items():
        response = out[custom_id]["response"]
        assert response["status_code"] == 200 and out[custom_id]["error"] is None
        assert response["body"]["choices"][0]["message"]["content"] == answer, custom_id
    assert len(rows) == len(QUESTIONS) == len({r["request_id"] for r in rows})
    assert {(r["backend"], r["status"], r["batch_id"]) for r in rows} == {("engine", "ok", batch.id)}
    by_request = {o["response"]["request_id"] for o in out.values()}
    assert by_request == {r["request_id"] for r in rows}
    usage = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out.values())
    assert usage == sum(r["completion_tokens"] for r in rows) > 0
