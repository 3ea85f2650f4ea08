"""Values that cross the engine's parts: what the scheduler asks the runner to compute in one step.

Pure Python (no torch), so the scheduler stays torch-free. A step is a list of `SeqChunk`s packed into one
forward pass: each chunk is some of one sequence's tokens at known positions, with the KV-cache blocks that
hold (and will hold) that sequence's keys and values. Invariant: for every chunk, positions
`start_pos .. start_pos + len(token_ids) - 1` fit in `len(block_table) * block_size` slots.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SeqChunk:
    seq_id: int
    token_ids: tuple[
        int, ...
    ]  # new tokens whose K/V this step writes (prefill chunk, 1 decode token, or drafts)
    start_pos: int  # position of token_ids[0]; tokens before it are already in the cache
    block_table: tuple[int, ...]  # physical block ids, in logical order
    num_logits: int = 1  # logits wanted for the last n tokens (0: a prefill chunk that is not the last)
    prefill: bool = False  # prompt tokens (the scheduler's prefill chunks), not decode tokens or drafts


@dataclass(frozen=True, slots=True)
class StepPlan:
    chunks: tuple[SeqChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
