"""What the simulated fleet is made of: engine boxes on a measured step-time curve, edge nodes, the cloud.

An owned box runs the bundled engine's scheduler as a fluid: each step decodes one token for every running
stream and computes up to `max_prefill_tokens` prompt tokens, and lasts `a + b * streams + c * prompt
tokens + d * the decoding streams' context tokens + e * the prompt tokens' positions` ms (attention: a
decoding stream reads its whole context, a prompt token every token before it). a to e come from
`bench/data/routing_eval_curve.json` (measured on this machine by `python -m bench.routing_eval.calibrate`),
so aggregate tok/s against concurrency and TTFT against the queue follow from the engine's own behaviour.
Owned boxes and edge nodes cost a fixed amount per hour; the cloud charges its list price per token and has
no queue.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from routing.privacy import PrivacyTier

CURVE_PATH = Path(__file__).resolve().parents[1] / "data" / "routing_eval_curve.json"
DEFAULT_KV_TOKENS = 23_296  # a curve file without its engine's KV size (measured before calibrate read it)


@dataclass(frozen=True, slots=True)
class StepModel:
    """The engine scheduler's step time; see the module docstring."""

    step_base_ms: float
    step_ms_per_stream: float
    prefill_ms_per_token: float
    max_batch: int = 8
    max_prefill_tokens: int = 256  # the engine's `--max-prefill-tokens` (its default on CPU)
    block_size: int = 16
    source: str = ""
    # The engine's KV cache in tokens: 512 MiB (its default) at 22.5 KiB a token (SmolLM2-135M in bf16); a
    # curve measured by calibrate.py says what its engine had (float32 compute: half as many).
    kv_tokens: int = 23_296  # DEFAULT_KV_TOKENS
    prefix_caching: bool = True  # the engine's default (`--no-prefix-cache`: False)
    # Each decoding stream's attention reads its whole context every step: this much more per context token
    # (prompt and tokens so far). 0 for a curve measured before calibrate.py measured it.
    decode_ms_per_context_token: float = 0.0
    # A prompt token computed attends to every token before it in its sequence (cached or not): this much
    # more per such token, so a prompt's prefill grows as its square and a warm turn's short tail costs
    # more a token than a fresh short prompt. 0 for a curve measured before calibrate.py fitted it.
    prefill_ms_per_context_token: float = 0.0
    # The engine's `--short-prefill-tokens`: prompts with at most this many tokens left compute ahead of
    # longer ones' chunks, within half of `max_prefill_tokens` a step. 0: oldest first.
    short_prefill_tokens: int = 128

    def step_ms(
        self,
        decoding: int,
        prefill_tokens: float,
        context_tokens: float = 0.0,
        prefill_context: float = 0.0,
    ) -> float:
        """One step's time: `decoding` streams, whose contexts hold `context_tokens` in all, each decode a
        token, and `prefill_tokens` prompt tokens are computed, which have `prefill_context` tokens before
        them in all (each token's position in its prompt, summed)."""
        return (
            self.step_base_ms
            + self.step_ms_per_stream * decoding
            + self.prefill_ms_per_token * prefill_tokens
            + self.decode_ms_per_context_token * context_tokens
            + self.prefill_ms_per_context_token * prefill_context
        )

    def prompt_ms(self, tokens: float, start: float = 0.0) -> float:
        """What computing `tokens` prompt tokens from position `start` adds to the steps (ms; the steps' own
        overhead, a + b x streams, not included)."""
        before = positions(tokens, start)
        return self.prefill_ms_per_token * tokens + self.prefill_ms_per_context_token * before

    def full_batch_ms_per_token(self, prompt_tokens: float, output_tokens: float) -> float:
        """Box ms per output token of one stream at full batch, for requests of this shape: its share of a
        step, where every stream's context averages the prompt and half the output."""
        n = self.max_batch
        return self.step_ms(n, 0, n * (prompt_tokens + output_tokens / 2)) / n

    def aggregate_tok_s(self, streams: int) -> float:
        return 1000 * streams / self.step_ms(streams, 0)

    def scaled(self, factor: float, max_batch: int) -> StepModel:
        """The same engine on a box `factor` times slower (an edge node)."""
        return StepModel(
            self.step_base_ms * factor, self.step_ms_per_stream * factor, self.prefill_ms_per_token * factor,
            max_batch, self.max_prefill_tokens, self.block_size, f"{self.source}, x{factor:g} slower",
            self.kv_tokens, self.prefix_caching, self.decode_ms_per_context_token * factor,
            self.prefill_ms_per_context_token * factor, self.short_prefill_tokens,
        )  # fmt: skip


def positions(tokens: float, start: float) -> float:
    """The tokens before each of `tokens` prompt tokens computed from position `start`, summed (what
    `StepModel.prefill_ms_per_context_token` is charged on)."""
    return tokens * (start + tokens / 2)


def load_curve(path: Path = CURVE_PATH) -> StepModel:
    data = json.loads(path.read_text())
    return StepModel(
        float(data["step_base_ms"]),
        float(data["step_ms_per_stream"]),
        float(data["prefill_ms_per_token"]),
        source=f"{data['engine']}, measured {data['measured']} (load {data['load_average']})",
        kv_tokens=int(data.get("kv_tokens", DEFAULT_KV_TOKENS)),
        decode_ms_per_context_token=float(data.get("decode_ms_per_context_token", 0.0)),
        prefill_ms_per_context_token=float(data.get("prefill_ms_per_context_token", 0.0)),
        # What its engine ran with (a curve measured before calibrate.py read them: the defaults of then).
        max_prefill_tokens=int(data.get("max_prefill_tokens", 512)),
        short_prefill_tokens=int(data.get("short_prefill_tokens", 128)),
    )


@dataclass(frozen=True, slots=True)
class CloudModel:
    """A hosted model: list price per token, lognormal TTFT, per-stream decode rate; unlimited capacity."""

    name: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    ttft_median_ms: float
    ttft_sigma: float
    decode_tok_s: float
    decode_sigma: float
    tier: PrivacyTier = PrivacyTier.EXTERNAL

    def sample(self, rng: random.Random) -> tuple[float, float]:
        """(TTFT s, per-stream decode tok/s) of one request."""
        ttft = self.ttft_median_ms * math.exp(rng.gauss(0, self.ttft_sigma)) / 1000
        return ttft, self.decode_tok_s * math.exp(rng.gauss(0, self.decode_sigma))

    def cost_usd(self, prompt_tokens: int, output_tokens: int) -> Decimal:
        return (prompt_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 10**6


# A small hosted chat model at its list price (gpt-4o-mini: 0.15 / 0.60 USD per Mtok); latency as seen
# from a European office (TTFT median 500 ms, p95 ~1 s), 70 tok/s per stream.
CLOUD = CloudModel("cloud-mini", Decimal("0.15"), Decimal("0.60"), 500, 0.4, 70, 0.2)


@dataclass(frozen=True, slots=True)
class BoxSpec:
    name: str
    tier: PrivacyTier
    kind: str  # local | edge
    model: StepModel
    usd_per_hour: Decimal


@dataclass(frozen=True, slots=True)
class Fleet:
    boxes: tuple[BoxSpec, ...]  # owned engine replicas and edge nodes
    cloud: CloudModel
    label: str  # e.g. "60% of mean load (6 boxes)"

    @property
    def owned(self) -> tuple[BoxSpec, ...]:
        return tuple(b for b in self.boxes if b.kind == "local")

    @property
    def edges(self) -> tuple[BoxSpec, ...]:
        return tuple(b for b in self.boxes if b.kind == "edge")

    def fixed_usd(self, duration_s: float) -> Decimal:
        return sum((b.usd_per_hour for b in self.boxes), Decimal(0)) * Decimal(duration_s) / 3600


# A box of 1 vCPU running the engine (about what one compute-optimised vCPU lists at per hour), and an edge
# node half as fast, already paid for on site.
BOX_USD_PER_HOUR = Decimal("0.05")
EDGE_USD_PER_HOUR = Decimal("0.02")
EDGE_NODES = 2


def box_capacity_tok_s(model: StepModel, prompt_tokens: float, output_tokens: float) -> float:
    """Output tok/s one box sustains at full batch for requests of this mean shape (prefill included)."""
    decode_s = output_tokens * model.full_batch_ms_per_token(prompt_tokens, output_tokens) / 1000
    prefill_s = model.prompt_ms(prompt_tokens) / 1000
    return output_tokens / (decode_s + prefill_s)


def make_fleet(model: StepModel, owned_boxes: int, label: str, cloud: CloudModel = CLOUD) -> Fleet:
    boxes = [
        BoxSpec(f"engine-{i}", PrivacyTier.INTERNAL, "local", model, BOX_USD_PER_HOUR)
        for i in range(owned_boxes)
    ]
    edge_model = model.scaled(2.0, max_batch=4)
    boxes += [
        BoxSpec(f"edge-{i}", PrivacyTier.EDGE, "edge", edge_model, EDGE_USD_PER_HOUR)
        for i in range(EDGE_NODES)
    ]
    return Fleet(tuple(boxes), cloud, label)
