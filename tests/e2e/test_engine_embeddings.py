"""End-to-end: the engine serving the bundled all-MiniLM-L6-v2 at `POST /v1/embeddings`, alone and behind the
gateway, driven by the official `openai` SDK.

The reference is computed here with plain transformers, one text at a time (no padding): `BertModel` over the
files of the bundled zip, extracted by this test, mean-pooled over the tokens and L2-normalised. The engine's
vectors (batched, length-sorted, padded) must agree to cosine >= 0.9999, in input order, float and base64.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.local.build import EngineOptions  # noqa: E402
from backends.local.embedding import Embedder, bundled_archive  # noqa: E402
from backends.local.loader import DEFAULT_MODEL_SPEC, load_model  # noqa: E402
from backends.local.server import create_engine_app  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.http.app import create_app  # noqa: E402
from gateway.store import keys  # noqa: E402
from gateway.store.db import make_engine  # noqa: E402
from tests.support.live import LiveServer  # noqa: E402
from tests.support.usage import wait_for_usage_row  # noqa: E402

pytestmark = pytest.mark.model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "A much longer sentence, so that the batch needs padding: switchboards once connected telephone calls "
    "by hand, with operators plugging cords into jacks all day long.",
    "short",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """Plain transformers over the zip's files: one text at a time, mean over tokens, unit length."""
    directory = tmp_path_factory.mktemp("minilm-ref")
    with zipfile.ZipFile(bundled_archive()) as zipped:
        zipped.extractall(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = transformers.BertModel.from_pretrained(directory, local_files_only=True).eval()
    out = {}
    with torch.no_grad():
        for text in TEXTS:
            encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
            hidden = model(**encoded).last_hidden_state[0]  # (T, H)
            out[text] = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist()
    return out


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    loaded = load_model(DEFAULT_MODEL_SPEC)
    options = EngineOptions(dtype="float32", quant="none", kv_cache_mb=32, max_batch=4)
    app = create_engine_app(loaded, options=options, embedder=Embedder.load("minilm"))
    with LiveServer(app) as server:
        yield server.base_url


def cosine(a: list[float], b: list[float]) -> float:
    va, vb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(torch.dot(va, vb) / (va.norm() * vb.norm()))


def check(got: list[list[float]], texts: list[str], reference: dict[str, list[float]]) -> None:
    assert len(got) == len(texts)
    for vector, text in zip(got, texts, strict=True):
        assert len(vector) == 384
        assert cosine(vector, reference[text]) >= 0.9999


def test_engine_matches_plain_transformers(engine_url: str, reference: dict[str, list[float]]) -> None:
    client = openai.OpenAI(base_url=engine_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    one = client.embeddings.create(model="minilm", input=TEXTS[0])  # the SDK asks base64 and decodes it
    check([one.data[0].embedding], TEXTS[:1], reference)
    many = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    check([d.embedding for d in many.data], TEXTS, reference)
    assert [d.index for d in many.data] == list(range(len(TEXTS)))
    assert many.usage.prompt_tokens > len(TEXTS) * 2  # [CLS] and [SEP] at least
    listed = {m.id for m in client.models.list()}
    assert {"minilm", "all-MiniLM-L6-v2", "smollm2"} <= listed


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "minilm", "input": [1, 2, 3]}, 400, "input"),
        ({"model": "minilm", "input": ""}, 400, "input"),
        ({"model": "minilm", "input": []}, 400, "input"),
        ({"model": "minilm", "input": "x", "dimensions": 64}, 400, "dimensions"),
        ({"model": "minilm", "input": "x", "extra": 1}, 400, "extra"),
        ({"model": "smollm2", "input": "x"}, 404, "model"),
    ],
)
def test_engine_refuses_bad_input(engine_url: str, body: dict[str, Any], status: int, param: str) -> None:
    reply = httpx.post(engine_url + "/v1/embeddings", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def gateway_url(engine_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Any]]:
    tmp = tmp_path_factory.mktemp("gw-minilm")
    config = parse_config(
        {
            "database": {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill"),
                         "flush_interval_s": 0.02},
            "backends": {"engine": {"kind": "openai", "base_url": engine_url + "/v1"}},
            "models": {
                "minilm": {"backend": "engine", "mode": "embedding", "input_usd_per_mtok": "0",
                           "output_usd_per_mtok": "0"},
            },
            "teams": {"demo": {}},
        }
    )  # fmt: skip
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        try:
            key = keys.create_key(db, "demo", name="t", models=None, expires_at=None).plaintext
            yield server.base_url, key, db
        finally:
            db.dispose()


def test_gateway_serves_minilm_from_the_engine(
    gateway_url: tuple[str, str, Any], reference: dict[str, list[float]]
) -> None:
    base_url, key, db = gateway_url
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)
    raw = client.embeddings.with_raw_response.create(model="minilm", input=TEXTS)
    got = raw.parse()
    check([d.embedding for d in got.data], TEXTS, reference)
    assert raw.headers["x-switchboard-backend"] == "engine"
    row = wait_for_usage_row(db, raw.headers["x-request-id"], 10.0)
    assert row["prompt_tokens"] == got.usage.prompt_tokens > 0 and row["status"] == "ok"
    again = client.embeddings.with_raw_response.create(model="minilm", input=TEXTS)
    assert again.headers["x-switchboard-cache"] == "hit"
    assert [d.embedding for d in again.parse().data] == [d.embedding for d in got.data]


def test_extraction_is_cached(tmp_path: Path) -> None:
    first = Embedder.load("minilm", cache_root=tmp_path)
    entries = list((tmp_path / "models").iterdir())
    second = Embedder.load("minilm", cache_root=tmp_path)
    assert list((tmp_path / "models").iterdir()) == entries and len(entries) == 1
    assert first.names == second.names == ("minilm", "all-MiniLM-L6-v2") and first.dimensions == 384
