"""Pure sampling functions over a batch of logits (N, vocab); randomness only from explicit generators.

Each request owns a CPU `torch.Generator` seeded from its seed (`make_generator`) and each sampled token
consumes exactly one uniform draw from it (`draw_uniform`), so a seeded request yields the same tokens
whichever requests share its batch. A temperature <= 0 means greedy. `probabilities` is the exact
distribution `sample` draws from (temperature, then top-p), which speculative accept/reject compares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for one request; the caller picks a fresh seed when the request gave none."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N,) long: the most likely token of each row (lowest id on ties, as argmax)."""
    return logits.argmax(dim=-1)


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N, V) float32 log-softmax, before temperature or top-p."""
    return torch.log_softmax(logits.float(), dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: Sequence[float]) -> torch.Tensor:
    """(N, V) float32 logits divided by each row's temperature; greedy rows (<= 0) are left unscaled."""
    t = torch.tensor([x if x > 0 else 1.0 for x in temperature], dtype=torch.float32, device=logits.device)
    return logits.float() / t[:, None]


# The most likely tokens `top_p_filter` ranks first; a row whose nucleus reaches past them is sorted whole.
TOP_P_CANDIDATES = 64


def top_p_filter(probs: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Keep each row's smallest most-likely set whose mass reaches top_p, renormalised (N, V).

    A token survives when the mass of the tokens ranked strictly above it is < top_p (so the first always
    does); this is transformers' TopPLogitsWarper rule. Rows with top_p >= 1 are unchanged.
    Ranks only the `TOP_P_CANDIDATES` most likely tokens (`topk`) where their mass reaches top_p, which is
    the same set: every token after them has at least that mass ranked above it. Sorting the whole vocabulary
    (49,152 ids for SmolLM2) took ~4 ms a row on one core, as long as a decode step of the 135M model.
    """
    if all(p >= 1.0 for p in top_p):
        return probs
    limit = torch.tensor(top_p, dtype=probs.dtype, device=probs.device)[:, None]
    top, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    kept = _nucleus(probs, top, order, limit)
    whole = (limit >= 1.0).squeeze(-1)  # unchanged rows
    # The nucleus reaches past the candidates (their cumulative mass, as `_nucleus` sums it, stays short).
    beyond = (top.cumsum(dim=-1)[:, -1:] < limit).squeeze(-1) & ~whole
    if bool(whole.any()):
        kept[whole] = probs[whole]
    if bool(beyond.any()):
        ranked, ids = probs[beyond].sort(dim=-1, descending=True)
        kept[beyond] = _nucleus(probs[beyond], ranked, ids, limit[beyond])
    return kept / kept.sum(dim=-1, keepdim=True)


def _nucleus(
    probs: torch.Tensor, ranked: torch.Tensor, ids: torch.Tensor, limit: torch.Tensor
) -> torch.Tensor:
    """The kept mass of `probs` (N, V), not renormalised, from each row's most likely probabilities in
    descending order (`ranked`) and their ids: a token stays while the mass ranked above it is < `limit`."""
    keep = (ranked.cumsum(dim=-1) - ranked) < limit
    keep[:, 0] = True
    return torch.zeros_like(probs).scatter_(-1, ids, ranked * keep)


def probabilities(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float]) -> torch.Tensor:
    """(N, V) float32: the distribution each row samples from; greedy rows are one-hot at the argmax."""
    probs = top_p_filter(torch.softmax(apply_temperature(logits, temperature), dim=-1), top_p)
    greedy_rows = [i for i, t in enumerate(temperature) if t <= 0]
    if greedy_rows:
        rows = torch.tensor(greedy_rows, dtype=torch.long, device=logits.device)
        one_hot = torch.zeros(len(greedy_rows), logits.shape[-1], dtype=probs.dtype, device=probs.device)
        one_hot.scatter_(-1, greedy(logits.index_select(0, rows))[:, None], 1.0)
        probs = probs.index_copy(0, rows, one_hot)
    return probs


def residual_probabilities(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """norm(max(target - draft, 0)) per row: where to resample after a rejected draft token."""
    residual = (target - draft).clamp_(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    # A zero residual means target == draft, which is never rejected; fall back to the target there.
    return torch.where(total > 0, residual / total.clamp(min=1e-30), target)


def draw_uniform(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(N,) float32 in [0, 1) on CPU: one draw from each row's generator."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(N, V) probabilities, (N,) uniforms -> (N,) long by inverse CDF; zero-probability ids never appear."""
    cdf = probs.float().cumsum(dim=-1)
    # Scaling by the row total keeps the draw below the last cumulative value despite rounding.
    target = uniform.to(cdf.device)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


def sample(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """(N, V) -> (N,) long. Greedy rows (temperature <= 0) may pass None and consume no draw."""
    if all(t <= 0 for t in temperature):
        return greedy(logits)
    probs = probabilities(logits, temperature, top_p)
    uniform = torch.zeros(len(generators), dtype=torch.float32)
    drawing = [i for i, (t, g) in enumerate(zip(temperature, generators, strict=True)) if t > 0]
    for i in drawing:
        g = generators[i]
        if g is None:
            raise ValueError(f"row {i} samples (temperature {temperature[i]}) but has no generator")
        uniform[i] = torch.rand(1, generator=g)
    return sample_from_probs(probs, uniform)
