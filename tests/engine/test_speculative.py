"""Speculative decoding: greedy output equals plain decoding in every mode, and accept/reject keeps p.

Modes run on tiny random models through the real engine loop: prompt lookup, a draft model (another tiny
random model with the same vocabulary) and the int4 self-draft. The accept/reject rule is checked
statistically on a 6-token vocabulary with fixed p and q and seeded generators. The `model` test reports
prompt lookup's speedup on the real SmolLM2 (it asserts identical output and acceptance, never a time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.local.engine.engine import DraftQuery, Engine, Proposer  # noqa: E402
from backends.local.engine.model import Transformer  # noqa: E402
from backends.local.engine.runner import build_runner  # noqa: E402
from backends.local.engine.sampler import make_generator, probabilities  # noqa: E402
from backends.local.engine.scheduler import SamplingParams  # noqa: E402
from backends.local.engine.speculative import (  # noqa: E402
    DraftLength,
    DraftModelProposer,
    NgramProposer,
    build_proposer,
    lookup_ngram,
    self_draft_model,
    verify_greedy,
    verify_sampled,
)
from backends.local.engine.weights import build_model  # noqa: E402
from backends.local.metrics import EngineMetrics  # noqa: E402
from tests.support.tiny_engine import (  # noqa: E402
    EOS,
    collect,
    greedy,
    make_engine,
    prompt,
    running,
    solo,
)
from tests.support.tiny_models import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    return build_model(tiny_hf_model("llama"), dtype=torch.float32, release_source=False)


def repetitive(seed: int, n: int) -> list[int]:
    """A prompt that repeats a short phrase with variations, so prompt lookup has something to find."""
    phrase = prompt(seed, 5)
    return [(t + (i // 15)) % EOS for i, t in enumerate(phrase * (n // 5 + 1))][:n]


LOAD = [(repetitive(i, 12 + 3 * i), 14 + i) for i in range(3)] + [(prompt(9, 10), 12)]


def make_proposer(kind: str, target: Transformer) -> Proposer:
    if kind == "ngram":
        return NgramProposer(lengths=DraftLength(max_len=4))
    if kind == "self":
        drafter = self_draft_model(target)
    elif kind == "draft":
        drafter = build_model(tiny_hf_model("qwen2", seed=1), dtype=torch.float32, release_source=False)
    else:  # "copy": the target itself, fp32, through the proposer's own cache: every draft must be accepted
        drafter = build_model(tiny_hf_model("llama"), dtype=torch.float32, release_source=False)
    return DraftModelProposer(build_runner(drafter, kv_cache_mb=1.0, block_size=4))


@pytest.mark.parametrize("kind", ["ngram", "draft", "self", "copy"])
async def test_greedy_speculation_equals_plain_decoding(tiny_model: Transformer, kind: str) -> None:
    expected = [await solo(tiny_model, ids, greedy(n)) for ids, n in LOAD]
    engine = make_engine(tiny_model, num_blocks=64, spec=4, proposer=make_proposer(kind, tiny_model))
    async with running(engine):
        results = await asyncio.gather(*(collect(engine.submit(ids, greedy(n))) for ids, n in LOAD))
        stats = engine.stats()
    assert [tokens for tokens, _ in results] == expected
    assert stats.drafted_tokens > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    if kind in ("self", "copy"):
        assert stats.accepted_tokens > 0
    if kind == "copy":
        assert stats.accepted_tokens == stats.drafted_tokens


async def test_seeded_sampling_with_drafts_is_reproducible(tiny_model: Transformer) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    outputs = []
    for _ in range(2):
        engine = make_engine(tiny_model, num_blocks=32, spec=4, proposer=make_proposer("self", tiny_model))
        async with running(engine):
            tokens, _ = await collect(engine.submit(repetitive(1, 20), params))
        outputs.append(tokens)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 16


async def test_metrics_report_the_acceptance_ratio(tiny_model: Transformer) -> None:
    engine = make_engine(tiny_model, num_blocks=32, spec=4, proposer=make_proposer("copy", tiny_model))
    metrics = EngineMetrics()
    metrics.watch(engine.stats)
    async with running(engine):
        await collect(engine.submit(prompt(2, 8), greedy(12)))
        stats = engine.stats()
    ratio = metrics.registry.get_sample_value("switchboard_engine_spec_acceptance_ratio")
    assert stats.drafted_tokens > 0
    assert ratio == pytest.approx(stats.accepted_tokens / stats.drafted_tokens) and ratio > 0.9


# -- accept / reject -----------------------------------------------------------------------------------------

P = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
Q = torch.tensor([0.30, 0.10, 0.25, 0.05, 0.10, 0.20])
SAMPLES = 40_000


def total_variation(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_5DOF_999 = 20.5  # the 99.9% quantile of chi-square with 5 degrees of freedom


@pytest.mark.slow  # a chi-square test over many samples: 4-5 s each
@pytest.mark.parametrize("point_mass", [False, True], ids=["draft-q", "point-mass-q"])
def test_accept_reject_keeps_the_target_distribution(point_mass: bool) -> None:
    draw, verify = make_generator(11), make_generator(12)
    p2 = torch.tensor([0.4, 0.1, 0.1, 0.1, 0.1, 0.2])  # the target after the first position
    first, second = torch.zeros(6), torch.zeros(6)
    accepted = 0
    drawn = torch.multinomial(Q, 2 * SAMPLES, replacement=True, generator=draw).view(SAMPLES, 2).tolist()
    for drafts in drawn:
        if point_mass:
            drafts = [1 if drafts[0] < 3 else 4, drafts[1]]  # deterministic in a random context
        out = verify_sampled(
            drafts, torch.stack([P, p2, P]), None if point_mass else torch.stack([Q, Q]), verify
        )
        first[out[0]] += 1
        accepted += out[0] == drafts[0]
        if len(out) > 1:
            second[out[1]] += 1
    assert total_variation(first, P) < 0.01 and chi_square(first, P) < CHI2_5DOF_999
    assert total_variation(second, p2) < 0.02 and chi_square(second, p2) < CHI2_5DOF_999
    if not point_mass:  # the rule's acceptance rate is sum(min(p, q))
        assert accepted / SAMPLES == pytest.approx(float(torch.minimum(P, Q).sum()), abs=0.01)


def test_sampled_verification_of_greedy_rows_is_greedy_verification() -> None:
    logits = torch.randn(4, 16, generator=make_generator(3))
    target = probabilities(logits, [0.0] * 4, [1.0] * 4)
    argmax = logits.argmax(-1).tolist()
    for drafts in (
        [argmax[0], argmax[1], argmax[2]],
        [argmax[0], (argmax[1] + 1) % 16, argmax[2]],
        [5, 5, 5],
    ):
        want = verify_greedy(drafts, argmax)
        assert verify_sampled(drafts, target, None, make_generator(0)) == want
    assert verify_greedy([1, 2], [1, 2, 3]) == [1, 2, 3] and verify_greedy([1, 2], [1, 4, 3]) == [1, 4]


# -- proposers -----------------------------------------------------------------------------------------------


def test_lookup_ngram_takes_the_longest_latest_match() -> None:
    assert lookup_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3], 3) == (7, 8, 2)  # "2 3" last seen before "7 8"
    assert lookup_ngram([5, 6, 1, 2, 3, 4, 9, 2, 3], 2) == (4, 9)
    assert lookup_ngram([1, 2, 3, 4], 3) == ()
    assert lookup_ngram([4, 4], 5) == (4,)
    assert lookup_ngram([1, 2, 1], 0) == ()


def query(tokens: Sequence[int], room: int = 8) -> DraftQuery:
    return DraftQuery(1, tuple(tokens), room)


def test_draft_length_grows_with_acceptance_and_shrinks_without() -> None:
    lengths = DraftLength(max_len=6, probe_every=4)
    tokens: list[int] = list(range(10))
    seen = []

    def step(agree: bool) -> None:
        k = lengths.limit(query(tokens))
        seen.append(k)
        drafts = tuple(range(100, 100 + k))
        lengths.proposed(query(tokens), drafts)
        tokens.extend([*drafts, 7] if agree else [8])

    for i in range(22):  # the target agrees with every draft, then with none
        step(agree=i < 6)
    assert seen[:6] == sorted(seen[:6]) and seen[5] == 6
    fall = seen[6 : seen.index(0)]
    assert fall == sorted(fall, reverse=True) and fall[-1] == 1  # down by one, to nothing
    quiet = seen[seen.index(0) :]
    assert set(quiet) == {0, 1} and quiet.count(1) >= 2  # no drafts, but a 1-token probe every 4th step
    assert all(quiet[j] == 0 for j in range(1, len(quiet)) if quiet[j - 1] == 1)  # failed probes stop
    assert lengths.accepted == sum(seen[:6]) and lengths.drafted == sum(seen[:-1])
    for _ in range(12):  # drafts agree again: accepted probes bring drafting back
        step(agree=True)
    assert seen[-1] >= 2
    assert lengths.limit(query(tokens, room=0)) == 0
    lengths.release(1)
    assert lengths.length(1) is None


def test_build_proposer_kinds(tiny_model: Transformer) -> None:
    assert isinstance(build_proposer("ngram", target=tiny_model), NgramProposer)
    assert isinstance(build_proposer("self", target=tiny_model, kv_cache_mb=1.0), DraftModelProposer)
    with pytest.raises(ValueError, match="--draft-model"):
        build_proposer("draft", target=tiny_model)
    with pytest.raises(ValueError, match="unknown"):
        build_proposer("medusa", target=tiny_model)


# -- the real model ------------------------------------------------------------------------------------------

EXTRACTION = """Extract every order id and its total from the log below, one per line as `id: total`.

2024-03-01 09:12:44 INFO order_id=A-10294 customer=ruth.banks total=129.99 currency=EUR status=paid
2024-03-01 09:15:02 INFO order_id=A-10295 customer=li.wen total=15.00 currency=EUR status=paid
2024-03-01 09:17:31 WARN order_id=A-10296 customer=omar.haddad total=342.10 currency=EUR status=pending
2024-03-01 09:20:55 INFO order_id=A-10297 customer=sofia.marin total=78.45 currency=EUR status=paid
2024-03-01 09:24:13 INFO order_id=A-10298 customer=ken.ito total=5.99 currency=EUR status=refunded
"""
CHAT = "Write a short friendly paragraph about why people enjoy walking in the park in autumn."


async def timed_generation(loaded: Any, spec: str, prompt_ids: list[int], max_tokens: int) -> Any:
    from backends.local.build import EngineOptions, build_engine_parts

    options = EngineOptions(spec=spec, dtype="float32", quant="none", kv_cache_mb=128.0, num_spec_tokens=6)
    parts = build_engine_parts(loaded, options)
    engine = Engine(
        parts.runner, parts.scheduler, stop_token_ids=parts.stop_token_ids, proposer=parts.proposer
    )
    async with running(engine):
        await collect(engine.submit(prompt_ids[:8], greedy(2)))  # warm up
        started = time.perf_counter()
        tokens, _ = await collect(engine.submit(prompt_ids, greedy(max_tokens)))
        elapsed_s = time.perf_counter() - started
        stats = engine.stats()
    return tokens, elapsed_s, stats


@pytest.mark.model
@pytest.mark.parametrize("text", [EXTRACTION, CHAT], ids=["extraction", "chat"])
async def test_prompt_lookup_on_smollm2_matches_plain_decoding(smollm2: Any, text: str) -> None:
    messages = [{"role": "user", "content": text}]
    text_in = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(smollm2.tokenizer(text_in, add_special_tokens=False)["input_ids"])
    plain, plain_s, _ = await timed_generation(smollm2, "none", ids, 96)
    spec, spec_s, stats = await timed_generation(smollm2, "ngram", ids, 96)
    assert spec == plain
    if text is EXTRACTION:
        assert stats.accepted_tokens > 0
    name = "extraction" if text is EXTRACTION else "chat"
    print(
        f"\nngram ({name}): {len(plain)} tokens, plain {plain_s:.2f} s, "
        f"speculative {spec_s:.2f} s, speedup {plain_s / spec_s:.2f}x, "
        f"acceptance {stats.accepted_tokens}/{stats.drafted_tokens}"
    )
