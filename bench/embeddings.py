"""Texts per second of the engine's bundled embedding model (all-MiniLM-L6-v2) beside plain transformers.

Both sides run the same texts on the same weights with `--threads` torch threads (default 2), at batch 1 and
batch 32: the engine's `Embedder.embed` (tokenized once, length-sorted batches, mean pool, L2 norm) and the
plain transformers loop a user would write (tokenize each batch in input order with padding, `BertModel`,
mean pool, normalise). Each cell is the median of `--repeats` timed passes after one warm-up pass, the two
sides' passes alternating; both sides' vectors are checked to agree (cosine >= 0.9999) before timing.
Run: python -m bench.embeddings [--threads 2] [--repeats 5] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.routing import update_section

PROSE = (
    "the gateway routes each request to a backend that may serve it under the team's privacy floor while "
    "limits budgets and the cache apply to every endpoint and one ledger row records the tokens and cost of "
    "what was served embeddings map text to vectors so similar texts land close together"
)
WORDS = PROSE.split(" ")


def make_texts(n: int, seed: int = 7) -> list[str]:
    """Sentences of 4 to 120 words (a spread like real documents' chunks), fixed by the seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120))) for _ in range(n)]


def plain_embed(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int) -> list[list[float]]:
    import torch

    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out += torch.nn.functional.normalize(mean, dim=1).tolist()
    return out


def paired_rates(
    ours: Callable[[], object], plain: Callable[[], object], n_texts: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Texts/s of each pass of each side; passes alternate, so load from elsewhere falls on both alike."""
    ours(), plain()  # warm-up: first calls build oneDNN kernels for each new shape
    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, out in ((ours, rates[0]), (plain, rates[1])):
            started = time.perf_counter()
            run()
            out.append(n_texts / (time.perf_counter() - started))
    return rates


def agree(a: list[list[float]], b: list[list[float]]) -> float:
    import torch

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(torch.nn.functional.cosine_similarity(ta, tb, dim=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--texts", type=int, default=256, help="per pass at batch 32 (batch 1: a quarter)")
    parser.add_argument("--out", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, BertModel

    from backends.local.embedding import Embedder, resolve_embedding_spec
    from bench.overhead import machine_info

    info, load = machine_info(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    engine = Embedder.load("minilm")
    directory, _ = resolve_embedding_spec("minilm")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = BertModel.from_pretrained(directory, local_files_only=True).eval()
    rows = []
    for batch, n in ((1, max(1, args.texts // 4)), (32, args.texts)):
        texts = make_texts(n)
        cosine = agree(engine.embed(texts, batch).vectors, plain_embed(model, tokenizer, texts, batch))
        assert cosine >= 0.9999, f"engine and plain transformers disagree (min cosine {cosine:.6f})"
        ours, plain = paired_rates(
            lambda t=texts, b=batch: engine.embed(t, b),  # type: ignore[misc]
            lambda t=texts, b=batch: plain_embed(model, tokenizer, t, b),  # type: ignore[misc]
            n,
            args.repeats,
        )
        mine, theirs = statistics.median(ours), statistics.median(plain)
        rows.append(
            f"| {batch} | {n} | **{mine:.1f}** | **{theirs:.1f}** | {mine / theirs:.2f}x | "
            f"{max(ours):.1f} | {max(plain):.1f} | {cosine:.6f} |"
        )
    out = f" --out {args.out}" if args.out else ""
    body = "\n".join(
        [
            f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
            f"{info['python']}), commit {info['commit']}; 1-minute load average {load:.2f} at "
            f"the start; torch {torch.__version__}, {args.threads} torch threads, float32.",
            "",
            f"Command: `python -m bench.embeddings --threads {args.threads} --repeats {args.repeats} "
            f"--texts {args.texts}{out}`. Texts: 4 to 120 words each, fixed seed. Each cell: median of "
            f"{args.repeats} passes after one warm-up pass, the two sides alternating.",
            "",
            "| batch | texts | engine texts/s (median) | plain transformers texts/s (median) | engine / plain"
            " | engine best | plain best | min cosine |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(body)
    if args.out:
        update_section(args.out, "bench/embeddings", "Embeddings: bundled MiniLM (`bench/embeddings`)", body)


if __name__ == "__main__":
    main()
