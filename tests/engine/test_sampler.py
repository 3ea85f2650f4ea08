"""Sampler: greedy is argmax, seeds reproduce, top-p keeps the right nucleus, temperature scales.

Pure functions on made-up logits; no model.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.local.engine.sampler import (  # noqa: E402
    apply_temperature,
    draw_uniform,
    greedy,
    log_probabilities,
    make_generator,
    probabilities,
    residual_probabilities,
    sample,
    sample_from_probs,
    top_p_filter,
)


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, [0.0] * 4, [1.0] * 4, [None] * 4), logits.argmax(-1))


def test_greedy_rows_mixed_with_sampled_rows_stay_argmax() -> None:
    logits = _logits()
    gens = [make_generator(i) for i in range(4)]
    for _ in range(20):
        out = sample(logits, [0.0, 1.5, 0.0, 1.5], [1.0, 0.9, 1.0, 1.0], gens)
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_same_seed_same_tokens() -> None:
    logits = _logits()

    def run(seed: int) -> list[list[int]]:
        gens = [make_generator(seed + i) for i in range(4)]
        return [sample(logits, [1.0] * 4, [0.95] * 4, gens).tolist() for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_request_draws_the_same_tokens_whatever_its_batch() -> None:
    logits = _logits(rows=3)
    alone_gen = make_generator(42)
    alone = [int(sample(logits[1:2], [0.8], [0.9], [alone_gen])[0]) for _ in range(25)]
    gens = [make_generator(1), make_generator(42), make_generator(3)]
    batched = [int(sample(logits, [1.0, 0.8, 0.0], [1.0, 0.9, 1.0], gens)[1]) for _ in range(25)]
    assert alone == batched


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    kept = top_p_filter(probs, [0.75])
    assert torch.allclose(kept, torch.tensor([[0.0, 0.625, 0.0, 0.375, 0.0]]))
    assert torch.allclose(top_p_filter(probs, [0.85]), torch.tensor([[0.1, 0.5, 0, 0.3, 0]]) / 0.9)
    assert torch.equal(top_p_filter(probs, [1.0]), probs)
    only_top = top_p_filter(probs, [0.01])  # the most likely token always survives
    assert torch.equal(only_top, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]))


def _sort_whole_vocabulary(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """The rule by a full sort of every row (what `top_p_filter` did before ranking candidates first)."""
    limit = torch.tensor(top_p)[:, None]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < limit) | (limit >= 1.0)
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def test_top_p_ranks_candidates_first_and_sorts_whole_rows_only_where_the_nucleus_reaches_past_them() -> None:
    # A vocabulary of 49,152 like SmolLM2's: peaked rows (temperature 0.2, the model card's) keep a few
    # tokens; flat rows (temperature 5) need more than the 64 candidates and take the full sort; a top_p 1
    # row in the same batch is unchanged. Every row matches sorting the whole vocabulary.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 49_152, generator=gen) * 3
    temperature = [0.2, 0.2, 5.0, 5.0, 1.0, 0.7]
    top_p = [0.9, 0.5, 0.9, 0.999, 1.0, 0.95]
    probs = torch.softmax(apply_temperature(logits, temperature), dim=-1)
    ours = top_p_filter(probs, top_p)
    assert torch.equal(ours > 0, _sort_whole_vocabulary(probs, top_p) > 0)
    assert torch.allclose(ours, _sort_whole_vocabulary(probs, top_p), atol=1e-7)
    kept = (ours > 0).sum(dim=-1).tolist()
    assert kept[0] < 64 and kept[2] > 64 and kept[4] == 49_152  # both paths ran
    # unchanged but for renormalising (a batched sum rounds apart from a row's own on some SIMD widths)
    assert torch.allclose(ours[4], probs[4] / probs[4].sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9, 0.99])
def test_top_p_support_matches_transformers(top_p: float) -> None:
    logits = _logits(rows=8, vocab=200, seed=3)
    ours = probabilities(logits, [1.0] * 8, [top_p] * 8) > 0
    warped = transformers.TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    assert torch.equal(ours, torch.isfinite(warped))


def test_sampled_tokens_stay_inside_the_nucleus() -> None:
    logits = _logits(rows=2, vocab=30)
    allowed = probabilities(logits, [1.0, 1.0], [0.6, 0.6]) > 0
    gens = [make_generator(0), make_generator(1)]
    for _ in range(200):
        out = sample(logits, [1.0, 1.0], [0.6, 0.6], gens)
        assert allowed[0, out[0]] and allowed[1, out[1]]


def test_temperature_scales_logits() -> None:
    logits = _logits(rows=3)
    scaled = apply_temperature(logits, [0.5, 2.0, 0.0])
    assert torch.allclose(scaled[0], logits[0] * 2) and torch.allclose(scaled[1], logits[1] / 2)
    assert torch.equal(scaled[2], logits[2])  # greedy rows are not scaled
    probs = probabilities(logits, [0.5, 2.0, 0.0], [1.0] * 3)
    assert torch.allclose(probs[0], torch.softmax(logits[0] / 0.5, -1))
    assert torch.allclose(probs[1], torch.softmax(logits[1] / 2.0, -1))
    assert probs[2].max() == 1.0 and probs[2].argmax() == logits[2].argmax()
    # Lower temperature concentrates mass on the top token.
    assert probs[0].max() > torch.softmax(logits[0], -1).max()


def test_sample_frequencies_follow_probabilities() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    expected = torch.softmax(logits[0], -1)
    gen = make_generator(123)
    n = 4000
    counts = torch.bincount(torch.cat([sample(logits, [1.0], [1.0], [gen]) for _ in range(n)]), minlength=4)
    # Each frequency within 4.5 standard deviations of its expectation.
    for c, p in zip(counts.tolist(), expected.tolist(), strict=True):
        assert abs(c / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)


def test_inverse_cdf_never_picks_a_zero_probability_token() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    uniform = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 - 1e-7])
    assert sample_from_probs(probs, uniform).tolist() == [1, 1, 3, 3, 3]


def test_draws_come_from_each_generator() -> None:
    a = draw_uniform([make_generator(5), make_generator(6)])
    b = draw_uniform([make_generator(5), make_generator(6)])
    assert torch.equal(a, b) and a.shape == (2,) and bool(((a >= 0) & (a < 1)).all())


def test_log_probabilities_and_residual() -> None:
    logits = _logits(rows=2)
    assert torch.allclose(log_probabilities(logits).exp().sum(-1), torch.ones(2))
    target = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    draft = torch.tensor([[0.2, 0.6, 0.2], [0.2, 0.3, 0.5]])
    residual = residual_probabilities(target, draft)
    assert torch.allclose(residual[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(residual[1], target[1])  # identical distributions: fall back to the target


def test_sampling_without_a_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="no generator"):
        sample(_logits(rows=1), [1.0], [1.0], [None])
