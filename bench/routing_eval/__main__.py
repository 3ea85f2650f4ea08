"""`python -m bench.routing_eval`: every policy, every fleet size, each workload; tables for BENCHMARKS.md.

Run: `python -m bench.routing_eval [--minutes 20] [--load-boxes 10] [--seed 7]
[--box measured|decode-bound|both] [--out docs/BENCHMARKS.md]`.
The live check against real engines: `python -m bench.routing_eval.live`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from bench.routing import update_section
from bench.routing_eval.fleet import (
    BOX_USD_PER_HOUR,
    CLOUD,
    EDGE_NODES,
    EDGE_USD_PER_HOUR,
    StepModel,
    load_curve,
)
from bench.routing_eval.report import goals, must_stay_line, run_workload, table
from bench.routing_eval.workload import SENSITIVE_SHARE, TEAMS, WORKLOADS, Request

DECODE_BOUND_PREFILL_FACTOR = 20  # the decode-bound variant: prefill this many times cheaper than measured


def models(which: str) -> dict[str, StepModel]:
    measured = load_curve()
    cheap = dataclasses.replace(
        measured,
        prefill_ms_per_token=measured.prefill_ms_per_token / DECODE_BOUND_PREFILL_FACTOR,
        prefill_ms_per_context_token=measured.prefill_ms_per_context_token / DECODE_BOUND_PREFILL_FACTOR,
        source=f"{measured.source}; prefill {DECODE_BOUND_PREFILL_FACTOR}x cheaper (assumed, not measured)",
    )
    both = {"measured": measured, "decode-bound": cheap}
    return both if which == "both" else {which: both[which]}


def _setup(args: argparse.Namespace, boxes: dict[str, StepModel]) -> list[str]:
    from bench.overhead import machine_info

    info = machine_info()
    out = f" --out {args.out}" if args.out else ""
    command = (
        f"python -m bench.routing_eval --minutes {args.minutes:g} --load-boxes {args.load_boxes:g} "
        f"--seed {args.seed} --box {args.box}{out}"
    )
    lines = [
        f"Simulated {info['date']} on {info['nproc']} x {info['cpu']} (Python {info['python']}), commit "
        f"{info['commit']}; 1-minute load average {os.getloadavg()[0]:.2f} at the start (the simulation's "
        "figures do not depend on it; the measured curve does).",
        "",
        f"Command: `{command}`. Each policy runs on the same trace; `switchboard` is the real "
        "`routing.scoring.choose` over a `RoutingSnapshot` of the simulated fleet's live stats "
        "(`bench/routing_eval/switchboard.py`).",
        "",
        "Fleet. Owned engine boxes run the bundled engine's step model (`step ms = a + b x streams + c x "
        "prompt tokens + d x the decoding streams' context tokens + e x the prompt tokens' positions`, 8 "
        f"slots, {next(iter(boxes.values())).max_prefill_tokens} prompt tokens per step, "
        "the engine's prefix cache: blocks shared "
        "with running requests and kept after a request ends, LRU within the engine's KV cache "
        f"({next(iter(boxes.values())).kv_tokens} tokens); an agent "
        "turn extends its previous turn's prompt and answer; the queue and prefill chunks earliest deadline "
        "first with the deadlines `switchboard` sends, its teams' SLOs, as the engine orders them (one that "
        "missed its deadline before its first token steps back as if due the engine's default after it), "
        "and in arrival order for the other policies, which send none) "
        f"at {BOX_USD_PER_HOUR} USD/h each; {EDGE_NODES} edge nodes (2x slower, "
        f"4 slots) at "
        f"{EDGE_USD_PER_HOUR} USD/h; the cloud `{CLOUD.name}` at {CLOUD.input_usd_per_mtok} / "
        f"{CLOUD.output_usd_per_mtok} USD per Mtok in / out, TTFT lognormal "
        f"(median {CLOUD.ttft_median_ms:.0f} ms), {CLOUD.decode_tok_s:.0f} tok/s per stream, no queue.",
        "",
        "| box model | a ms | b ms per stream | c ms per prompt token | d µs per context token "
        "| e µs per position | 1 / 8 streams tok/s | source |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in boxes.items():
        lines.append(
            f"| {name} | {m.step_base_ms:.1f} | {m.step_ms_per_stream:.2f} | {m.prefill_ms_per_token:.3f} | "
            f"{1000 * m.decode_ms_per_context_token:.2f} | {1000 * m.prefill_ms_per_context_token:.2f} | "
            f"{m.aggregate_tok_s(1):.0f} / "
            f"{m.aggregate_tok_s(8):.0f} | {m.source} |"
        )
    lines += [
        "",
        "| team | floor | objective | SLO p95 TTFT ms | SLO p95 e2e ms | first token's deadline ms "
        "| max_tokens |",
        "|---|---|---|---:|---:|---:|---:|",
        *(
            f"| {t.name} | {t.floor} | {t.objective} | {t.slo_p95_ttft_ms or '-'} | "
            f"{t.slo_p95_e2e_ms or '-'} | {'-' if t.max_ttft_ms is None else f'{t.max_ttft_ms:.0f}'} | "
            f"{t.max_tokens} |"
            for t in TEAMS
        ),
        "",
        "Switchboard's teams carry a first token's deadline (`teams.X.max_ttft_ms`, twice the p95 TTFT "
        "target): a request that may not leave, predicted past it on every box it may use, is refused at "
        "once (503) rather than queued; a refusal counts as an SLO violation and as infinitely late in its "
        "team's p95. The other policies queue or fall back as they do.",
    ]
    return lines


def _trace_line(name: str, trace: list[Request], minutes: float) -> str:
    n = max(1, len(trace))
    planted = sum(1 for r in trace if r.planted)
    stay = sum(1 for r in trace if r.floor.rank <= 1)
    agents = sum(1 for r in trace if r.session >= 0)
    prompt = sorted(r.prompt_tokens for r in trace)
    output = sorted(r.output_tokens for r in trace)
    return (
        f"Workload `{name}` ({WORKLOADS[name].description}): {len(trace)} requests over {minutes:g} min; "
        f"{100 * planted / n:.0f}% with planted sensitive data (goal {SENSITIVE_SHARE:.0%}), "
        f"{100 * stay / n:.0f}% whose floor (from the real detectors and team floors) keeps them on owned "
        f"or edge capacity; {100 * agents / n:.0f}% agent turns; prompt tokens p50 {prompt[n // 2]} / p99 "
        f"{prompt[n * 99 // 100]}, output tokens p50 {output[n // 2]} / p99 {output[n * 99 // 100]}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--load-boxes", type=float, default=10, help="mean load, in boxes of the box model")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--box", choices=("measured", "decode-bound", "both"), default="both")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--out", type=Path, help="write the result into this markdown file's section")
    args = parser.parse_args(argv)
    boxes = models(args.box)
    lines = _setup(args, boxes)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for name in names:
        for box_name, model in boxes.items():
            trace, runs, wall_s = run_workload(
                name, model, load_boxes=args.load_boxes, minutes=args.minutes, seed=args.seed
            )
            lines += [
                "",
                f"#### `{name}` on {box_name} boxes",
                "",
                _trace_line(name, trace, args.minutes) + f" Simulated in {wall_s:.0f} s.",
                "",
                *table(runs),
                "",
                must_stay_line(trace, model, args.minutes * 60, runs),
                "",
                "Goals:",
                "",
                *goals(runs),
            ]
            print("\n".join(lines[-len(runs) - 10 :]), flush=True)
    text = "\n".join(lines)
    if args.out:
        update_section(args.out, "bench/routing_eval", "Routing evaluation (`bench/routing_eval`)", text)
    else:
        print(text)
    sys.exit(0)


if __name__ == "__main__":
    main()
