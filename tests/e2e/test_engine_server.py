"""End-to-end: the bundled engine server running the real SmolLM2-135M, driven by the official `openai` SDK.

The model loads once per module and the server runs under uvicorn in a background thread on a pre-bound
loopback socket; the continuous-batching engine runs in float32 (so greedy output equals transformers')
with a small KV cache, so an oversized request meets the cache limit before the context limit.
Completions are kept short so the module stays around a minute on two cores, after the model load.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
uvicorn = pytest.importorskip("uvicorn")

from backends.local.build import EngineOptions  # noqa: E402
from backends.local.loader import DEFAULT_MODEL_SPEC, LoadedModel, load_model  # noqa: E402
from backends.local.server import create_engine_app  # noqa: E402
from backends.local.wire import encode_chat  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.http.app import create_app  # noqa: E402
from gateway.live.engine_load import engine_load, parse_prometheus  # noqa: E402
from gateway.store import keys  # noqa: E402
from gateway.store.db import make_engine  # noqa: E402
from tests.support.live import LiveServer  # noqa: E402
from tests.support.usage import wait_for_usage_row  # noqa: E402

pytestmark = pytest.mark.model

KV_CACHE_MB = 128  # float32 SmolLM2: 45 KiB per token, so 182 blocks of 16 = 2912 tokens

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
LONG_ANSWER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Count from 1 to 500, separated by commas."}
]


@dataclass(frozen=True, slots=True)
class RunningEngine:
    base_url: str
    loaded: LoadedModel


@pytest.fixture(scope="module")
def engine() -> Iterator[RunningEngine]:
    loaded = load_model(DEFAULT_MODEL_SPEC)
    # Pinned (not auto): greedy output is compared with float32 transformers token for token, so the KV
    # cache is float32 too (`auto` would store it in bf16).
    options = EngineOptions(
        dtype="float32",
        quant="none",
        kv_dtype="float32",
        kv_cache_mb=KV_CACHE_MB,
        max_batch=16,
        max_prefill_tokens=256,
    )
    app = create_engine_app(loaded, served_names=("smollm2", "SmolLM2-135M-Instruct"), options=options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline_s = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline_s, "engine server did not start"
        time.sleep(0.05)
    yield RunningEngine(base_url=f"http://127.0.0.1:{port}", loaded=loaded)
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def client(engine: RunningEngine) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _metric(engine: RunningEngine, line_prefix: str) -> float:
    text = httpx.get(f"{engine.base_url}/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)]
    return values[0] if values else 0.0


def test_health_and_models(engine: RunningEngine, client: openai.OpenAI) -> None:
    assert httpx.get(f"{engine.base_url}/health").status_code == 200
    assert {m.id for m in client.models.list()} == {"smollm2", "SmolLM2-135M-Instruct"}


def test_chat_returns_answer_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert reply.model == "smollm2"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 12


def test_batch_priority_requests_get_the_same_greedy_answer(client: openai.OpenAI) -> None:
    # x-switchboard-priority: batch (what the gateway sends for /v1/batches items) only changes the order.
    ask = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    usual = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    behind = client.chat.completions.create(**ask, extra_headers={"x-switchboard-priority": "batch"})  # type: ignore[call-overload]
    assert behind.choices[0].message.content == usual.choices[0].message.content


def test_a_deadline_changes_the_order_not_the_answer(engine: RunningEngine, client: openai.OpenAI) -> None:
    # x-switchboard-deadline-ms (what the gateway sends: the team's TTFT SLO) orders the engine's queue.
    ask = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    usual = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    due = client.chat.completions.create(**ask, extra_headers={"x-switchboard-deadline-ms": "2500"})  # type: ignore[call-overload]
    assert due.choices[0].message.content == usual.choices[0].message.content
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    url = f"{engine.base_url}/v1/completions"
    texts = [
        httpx.post(url, json=body, headers=h).json()["choices"][0]["text"]
        for h in ({}, {"x-switchboard-deadline-ms": "1500.5", "x-switchboard-priority": "batch"})
    ]
    assert texts[0] == texts[1]


def test_first_tokens_past_their_deadline_are_counted(engine: RunningEngine, client: openai.OpenAI) -> None:
    name = "switchboard_engine_late_first_tokens_total"
    before = _metric(engine, name)
    ask = {"model": "smollm2", "messages": QUESTION, "max_tokens": 2, "temperature": 0}
    client.chat.completions.create(**ask, extra_headers={"x-switchboard-deadline-ms": "1"})  # type: ignore[call-overload]
    assert _metric(engine, name) == before + 1  # no prefill takes under a millisecond
    client.chat.completions.create(**ask, extra_headers={"x-switchboard-deadline-ms": "60000"})  # type: ignore[call-overload]
    client.chat.completions.create(**ask)  # type: ignore[call-overload]  # the default: 10 s
    assert _metric(engine, name) == before + 1


@pytest.mark.parametrize("value", ["0", "0.5", "-5", "soon", "nan", "inf", "1e12"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_deadline_is_400_naming_the_header(engine: RunningEngine, value: str, path: str) -> None:
    body = {"model": "smollm2", "max_tokens": 2}
    body |= {"messages": QUESTION} if "chat" in path else {"prompt": "hi"}
    response = httpx.post(engine.base_url + path, json=body, headers={"x-switchboard-deadline-ms": value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "x-switchboard-deadline-ms" and error["code"] == "invalid_deadline"
    assert "milliseconds" in error["message"]


def test_greedy_matches_transformers_generate(engine: RunningEngine, client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write one sentence about the sea."}
    ]
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24, temperature=0
    )
    tokenizer, model = engine.loaded.tokenizer, engine.loaded.model
    prompt_ids = torch.tensor([encode_chat(tokenizer, messages)])  # (1, T)
    with torch.inference_mode():
        reference = model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, max_new_tokens=24
        )
    new_ids = reference[0, prompt_ids.shape[1] :].tolist()
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt_ids.shape[1]
    assert reply.usage.completion_tokens == len(new_ids)
    assert reply.choices[0].message.content == tokenizer.decode(new_ids, skip_special_tokens=True)


def test_stream_with_usage_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=LONG_ANSWER, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_stop_string_ends_generation(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model="smollm2", messages=LONG_ANSWER, max_tokens=16, temperature=0)
    full = free.choices[0].message.content or ""
    assert "\n3" in full  # a two-character stop string that spans tokens
    reply = client.chat.completions.create(
        model="smollm2", messages=LONG_ANSWER, max_tokens=16, temperature=0, stop=["\n3", "never"]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full.split("\n3", 1)[0]


async def test_seed_makes_sampling_reproducible(engine: RunningEngine) -> None:
    client = openai.AsyncOpenAI(base_url=f"{engine.base_url}/v1", api_key="unused", max_retries=0)
    texts = []
    for _ in range(2):
        reply = await client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=16, temperature=0.8, seed=1234
        )
        texts.append(reply.choices[0].message.content)
    await client.close()
    assert texts[0] and texts[0] == texts[1]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=QUESTION, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"response_format": {"type": "json_object"}},
        {"temperature": 7},
    ],
    ids=["n2", "tools", "response_format", "bad_temperature"],
)
def test_unsupported_or_bad_input_is_400(client: openai.OpenAI, extra: dict[str, object]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, **extra)  # type: ignore[call-overload]
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}


def test_malformed_json_is_400(engine: RunningEngine) -> None:
    response = httpx.post(f"{engine.base_url}/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def _wait_until_idle(engine: RunningEngine, cancelled_before: float) -> None:
    deadline_s = time.monotonic() + 30  # generous: CPU generation slows a lot on a loaded machine
    while time.monotonic() < deadline_s:
        cancelled = _metric(engine, 'switchboard_engine_requests_total{outcome="cancelled"}')
        if cancelled > cancelled_before and _metric(engine, "switchboard_engine_running_requests") == 0:
            return
        time.sleep(0.05)
    running = _metric(engine, "switchboard_engine_running_requests")
    queued = _metric(engine, "switchboard_engine_queue_depth")
    raise AssertionError(
        f"the abandoned request kept the worker busy (cancelled {cancelled_before} -> {cancelled}, "
        f"running {running}, queued {queued})"
    )


def test_stream_disconnect_frees_worker(engine: RunningEngine, client: openai.OpenAI) -> None:
    cancelled_before = _metric(engine, 'switchboard_engine_requests_total{outcome="cancelled"}')
    body = {"model": "smollm2", "messages": LONG_ANSWER, "max_tokens": 2000, "temperature": 0, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{engine.base_url}/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    _wait_until_idle(engine, cancelled_before)
    started_s = time.monotonic()
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert time.monotonic() - started_s < 10


def test_non_stream_disconnect_frees_worker(engine: RunningEngine) -> None:
    cancelled_before = _metric(engine, 'switchboard_engine_requests_total{outcome="cancelled"}')
    # Greedy "count to 500" ends early once the model is warm; a long story keeps the worker busy for seconds.
    story = [{"role": "user", "content": "Write a very long story about a dragon, at least 2000 words."}]
    body = {"model": "smollm2", "messages": story, "max_tokens": 2000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine.base_url}/v1/chat/completions", json=body, timeout=0.3)
    _wait_until_idle(engine, cancelled_before)


def test_metrics_count_tokens(engine: RunningEngine) -> None:
    assert _metric(engine, "switchboard_engine_prompt_tokens_total") > 0
    assert _metric(engine, "switchboard_engine_completion_tokens_total") > 0
    assert _metric(engine, "switchboard_engine_queue_depth") == 0


def _reference(engine: RunningEngine, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation: what the engine must reproduce token for token."""
    ids = torch.tensor([prompt_ids])  # (1, T)
    with torch.inference_mode():
        out = engine.loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
    return out[0, ids.shape[1] :].tolist()


def test_completions_text_and_token_prompts_match_transformers(
    engine: RunningEngine, client: openai.OpenAI
) -> None:
    tokenizer = engine.loaded.tokenizer
    prompt = "The three primary colours are"
    prompt_ids = tokenizer.encode(prompt)
    expected = tokenizer.decode(_reference(engine, prompt_ids, 12), skip_special_tokens=True)
    by_text = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    by_ids = client.completions.create(model="smollm2", prompt=prompt_ids, max_tokens=12, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_text.usage is not None and by_text.usage.prompt_tokens == len(prompt_ids)
    assert by_text.usage.completion_tokens == 12 and by_text.choices[0].finish_reason == "length"


def test_completions_stream_matches_non_stream(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    whole = client.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_without_max_tokens_stop_at_16(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens <= 16


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [5, 10**9]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ],
    ids=["two_prompts", "bad_token_id", "empty", "echo", "logprobs"],
)
def test_completions_bad_input_is_400(engine: RunningEngine, extra: dict[str, object], param: str) -> None:
    response = httpx.post(f"{engine.base_url}/v1/completions", json={"model": "smollm2", **extra})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_request_larger_than_the_kv_cache_is_400_naming_the_flag(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=5000)
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "context_length_exceeded"
    assert "--kv-cache-mb" in body["message"] and body["param"] == "max_tokens"


async def test_concurrent_requests_are_batched_and_match_their_solo_answers(engine: RunningEngine) -> None:
    topics = ["the sea", "a cat", "winter", "bread", "a train", "the moon"]
    client = openai.AsyncOpenAI(
        base_url=f"{engine.base_url}/v1", api_key="unused", max_retries=0, timeout=120
    )

    async def ask(topic: str) -> str:
        reply = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
            max_tokens=16,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    solo = [await ask(t) for t in topics]
    together = await asyncio.gather(*(ask(t) for t in topics))
    await client.close()
    assert list(together) == solo


def test_metrics_expose_load_latency_and_the_gateway_can_read_them(engine: RunningEngine) -> None:
    text = httpx.get(f"{engine.base_url}/metrics").text
    for name in (
        "switchboard_engine_time_to_first_token_seconds_count",
        "switchboard_engine_inter_token_latency_seconds_count",
        "switchboard_engine_prompt_tokens_total",
        "switchboard_engine_completion_tokens_total",
    ):
        assert _metric(engine, name) > 0, name
    total = _metric(engine, "switchboard_engine_kv_blocks_total")
    assert total == KV_CACHE_MB * 2**20 // (
        2 * 30 * 16 * 3 * 64 * 4
    )  # layers, block, kv heads, head dim, fp32
    assert _metric(engine, "switchboard_engine_kv_blocks_free") == total
    assert _metric(engine, "switchboard_engine_kv_blocks_used") == 0
    assert "switchboard_engine_spec_acceptance_ratio" in text
    assert "switchboard_engine_preemptions_total" in text
    load = engine_load(parse_prometheus(text))
    assert load.queue_depth == 0 and load.running == 0


def test_gateway_passes_legacy_completions_through_to_the_engine(
    engine: RunningEngine, client: openai.OpenAI, tmp_path: Path
) -> None:
    """`/v1/completions` through the gateway reaches the engine's own completions endpoint: the raw prompt,
    no chat template, so greedy output equals the engine's answer to the same prompt sent directly."""
    config = parse_config(
        {
            "database": {"url": f"sqlite:///{tmp_path}/sb.db", "spill_path": str(tmp_path / "spill.jsonl")},
            "backends": {"engine": {"kind": "openai", "base_url": f"{engine.base_url}/v1"}},
            "models": {"smollm2": {"backend": "engine"}},
            "teams": {"t": {}},
        }
    )
    prompt = "The capital of France is"
    direct = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        key = keys.create_key(db, "t", name="e2e", models=None, expires_at=None).plaintext
        via = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)
        raw = via.completions.with_raw_response.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0
        )
        reply = raw.parse()
        streamed = via.completions.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        text = "".join(e.choices[0].text for e in streamed if e.choices)
        row = wait_for_usage_row(db, raw.headers["x-request-id"], 10)
        db.dispose()
    assert reply.choices[0].text == direct.choices[0].text
    assert text == direct.choices[0].text
    assert reply.usage is not None and direct.usage is not None
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens  # no chat template around the prompt
    assert row["prompt_tokens"] == direct.usage.prompt_tokens and row["status"] == "ok"


def test_a_gateway_client_that_gives_up_stops_the_engine(engine: RunningEngine, tmp_path: Path) -> None:
    """A non-streamed request through the gateway whose client times out: the gateway notices the
    disconnect and cancels its upstream call, the engine sees its connection close and aborts the
    generation (its KV blocks freed), and the ledger row says client_closed, not ok."""
    config = parse_config(
        {
            "database": {"url": f"sqlite:///{tmp_path}/sb.db", "spill_path": str(tmp_path / "spill.jsonl")},
            "backends": {"engine": {"kind": "openai", "base_url": f"{engine.base_url}/v1"}},
            "models": {"smollm2": {"backend": "engine"}},
            "teams": {"t": {}},
        }
    )
    cancelled_before = _metric(engine, 'switchboard_engine_requests_total{outcome="cancelled"}')
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        key = keys.create_key(db, "t", name="gives-up", models=None, expires_at=None)
        body = {"model": "smollm2", "messages": LONG_ANSWER, "max_tokens": 2000, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.base_url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key.plaintext}"},
                timeout=httpx.Timeout(30, read=1.0),
            )
        _wait_until_idle(engine, cancelled_before)
        assert _metric(engine, "switchboard_engine_kv_blocks_used") == 0
        deadline_s = time.monotonic() + 10
        row = None
        while row is None and time.monotonic() < deadline_s:
            with db.connect() as conn:
                row = conn.execute(
                    sa.text("SELECT status, http_status FROM usage WHERE key_id = :k"), {"k": key.key_id}
                ).first()
            time.sleep(0.05)
        db.dispose()
    assert row is not None and (row.status, row.http_status) == ("client_closed", 499)


CONVERSATION: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_tokenize_counts_what_a_chat_completion_reports(engine: RunningEngine, client: openai.OpenAI) -> None:
    """vLLM's `POST /tokenize`: the chat template of chat completions, so `count` is their prompt_tokens."""
    tokenize = f"{engine.base_url}/tokenize"
    reply = client.chat.completions.create(model="smollm2", messages=CONVERSATION, max_tokens=1)
    counted = httpx.post(
        tokenize, json={"model": "smollm2", "messages": CONVERSATION, "add_generation_prompt": True}
    ).json()
    assert reply.usage is not None and counted["count"] == reply.usage.prompt_tokens
    assert counted["tokens"] == encode_chat(engine.loaded.tokenizer, CONVERSATION)
    assert counted["max_model_len"] > counted["count"]  # the context the engine serves
    bare = httpx.post(tokenize, json={"messages": CONVERSATION, "add_generation_prompt": False}).json()
    assert 0 < bare["count"] < counted["count"] and bare["tokens"] == counted["tokens"][: bare["count"]]
    text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=1)
    prompt = httpx.post(tokenize, json={"model": "smollm2", "prompt": "The capital of France is"}).json()
    assert text.usage is not None and prompt["count"] == text.usage.prompt_tokens


def test_tokenize_refuses_what_it_cannot_count(engine: RunningEngine) -> None:
    tokenize = f"{engine.base_url}/tokenize"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = {
        "tools": {"model": "smollm2", "messages": QUESTION, "tools": [tool]},
        "messages": {"model": "smollm2", "messages": QUESTION, "prompt": "both"},
        "messages.0.role": {"messages": [{"role": "robot", "content": "hi"}]},
        "add_special_tokens": {"messages": QUESTION, "add_special_tokens": True},
    }
    for param, body in cases.items():
        reply = httpx.post(tokenize, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (param, reply.text)
    unknown = httpx.post(tokenize, json={"model": "gpt-9", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_gateway_counts_tokens_with_the_engines_tokenizer(engine: RunningEngine, tmp_path: Path) -> None:
    """`count_tokens` through a gateway in front of the engine: the engine's tokenizer counts, and the count
    equals the input_tokens the gateway's `/v1/messages` reports for the same conversation."""
    anthropic = pytest.importorskip("anthropic")
    config = parse_config(
        {
            "database": {"url": f"sqlite:///{tmp_path}/sb.db", "spill_path": str(tmp_path / "spill.jsonl")},
            "backends": {"engine": {"kind": "openai", "base_url": f"{engine.base_url}/v1"}},
            "models": {"smollm2": {"backend": "engine"}},
            "teams": {"t": {}},
        }
    )
    system, turns = CONVERSATION[0]["content"], CONVERSATION[1:]
    tools = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        key = keys.create_key(db, "t", name="e2e", models=None, expires_at=None).plaintext
        db.dispose()
        client = anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)
        raw = client.messages.with_raw_response.count_tokens(model="smollm2", system=system, messages=turns)
        answer = client.messages.create(model="smollm2", max_tokens=1, system=system, messages=turns)
        with_tools = client.messages.with_raw_response.count_tokens(
            model="smollm2", system=system, messages=turns, tools=tools
        )
    assert raw.headers["x-switchboard-token-count"] == "tokenizer"
    assert raw.headers["x-switchboard-backend"] == "engine"
    assert raw.parse().input_tokens == answer.usage.input_tokens
    # The engine's template has no place for tools (it refuses them), so a count with tools is the estimate.
    assert with_tools.headers["x-switchboard-token-count"] == "estimate"
