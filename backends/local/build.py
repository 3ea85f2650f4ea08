"""Assemble a running engine from a loaded transformers model and the `engine serve` options.

Stages: our model from the transformers weights (dtype, device), optional quantization, a KV cache sized by
`kv_cache_mb`, the runner, the scheduler over the cache's blocks, the speculative proposer. Each stage is
logged with its time and the process's memory; a stage still running after a few seconds logs that it is.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from backends.local.engine.engine import NoProposer, Proposer
from backends.local.engine.heap import trim_heap
from backends.local.engine.kv_cache import BlockAllocator, cache_dtype_fits
from backends.local.engine.scheduler import DEFAULT_DEADLINE_MS, Scheduler, SchedulerConfig
from backends.local.loader import LoadedModel, current_rss_mb

log = logging.getLogger(__name__)
T = TypeVar("T")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
QUANT_MODES = ("auto", "none", "int8", "int4")
KV_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLS = ("auto", "sdpa", "eager", "flash", "paged")  # attention.ATTN_CHOICES, without torch
SPEC_KINDS = ("none", "draft", "self", "ngram")


CPU_PREFILL_TOKENS = 256  # `--max-prefill-tokens` by default on CPU (`default_prefill_tokens`)
DEVICE_PREFILL_TOKENS = 512  # and on CUDA


@dataclass(frozen=True, slots=True)
class EngineOptions:
    device: str = "cpu"
    dtype: str = "auto"  # timed on this machine at first start (autotune.py); cached
    quant: str = "auto"
    attn: str = "auto"
    spec: str = "none"
    draft_model: str | None = None
    num_spec_tokens: int = 4  # draft slots per decode when `spec` is not "none"
    max_batch: int = 32
    kv_cache_mb: float = 512.0
    kv_dtype: str = "auto"  # the KV cache's dtype: `kv_cache_dtype`
    threads: int | None = None
    block_size: int = 16
    max_prefill_tokens: int | None = None  # None: `default_prefill_tokens(device)`
    short_prefill_tokens: int = 128  # interactive prompts this short go ahead of long ones' chunks
    default_deadline_ms: float = DEFAULT_DEADLINE_MS  # when a request naming no deadline is due (EDF)
    batch_rows_beside_interactive: int | None = None  # batch rows per step beside interactive work
    prefix_cache: bool = True  # keep finished requests' full prompt blocks cached (evictable) for reuse
    release_source: bool = False  # free the transformers weights once converted (the server does)
    warm_up: bool = True  # run every prefill/decode shape and the sampler once before reporting ready

    def __post_init__(self) -> None:
        for name, allowed in (
            ("device", DEVICES),
            ("dtype", DTYPES),
            ("quant", QUANT_MODES),
            ("kv_dtype", KV_DTYPES),
            ("attn", ATTN_IMPLS),
            ("spec", SPEC_KINDS),
        ):
            if getattr(self, name) not in allowed:
                flag, value = name.replace("_", "-"), getattr(self, name)
                raise ValueError(f"--{flag} `{value}` is unknown; use one of {', '.join(allowed)}")
        if self.spec == "draft" and not self.draft_model:
            raise ValueError(
                "--spec draft needs --draft-model (a GGUF file, HF directory or pkg:PACKAGE/FILE)"
            )
        if self.batch_rows_beside_interactive is not None and self.batch_rows_beside_interactive < 0:
            raise ValueError(
                f"--batch-rows-beside-interactive must be 0 or more, got {self.batch_rows_beside_interactive}"
            )
        if self.short_prefill_tokens < 0:
            raise ValueError(f"--short-prefill-tokens must be 0 or more, got {self.short_prefill_tokens}")
        if not 0 < self.default_deadline_ms < float("inf"):
            raise ValueError(f"--default-deadline-ms must be positive, got {self.default_deadline_ms}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"--max-prefill-tokens must be at least 1, got {self.max_prefill_tokens}")
        if self.kv_cache_mb <= 0:
            raise ValueError(f"--kv-cache-mb must be positive, got {self.kv_cache_mb}")
        if self.dtype != "auto":  # refused before the model loads (an `auto` dtype: once resolved)
            kv_cache_dtype(self.kv_dtype, self.dtype, self.device)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed per step: `max_prefill_tokens`, or the device's default."""
        return self.max_prefill_tokens or default_prefill_tokens(self.device)


def default_prefill_tokens(device: str) -> int:
    """`--max-prefill-tokens` when not given: 256 on CPU, 512 elsewhere. A step lasts as long as its prompt
    tokens take, and every decoding stream and waiting question waits it out: on a CPU, 512 tokens at ~1,000
    tokens of context are a 1-2 s step (docs/ENGINE.md, "The scheduler"); 256 halves that and computes a long
    prompt no slower (a chunk's attention covers its whole key range, so smaller chunks waste less of it),
    while half of it, what short prompts may take, still holds an agent's next turn."""
    return CPU_PREFILL_TOKENS if device == "cpu" else DEVICE_PREFILL_TOKENS


@dataclass(frozen=True, slots=True)
class BuiltEngine:
    """Everything `Engine(...)` takes, plus what the server needs to know about the model."""

    runner: Any  # ModelRunner
    scheduler: Scheduler
    proposer: Proposer
    stop_token_ids: tuple[int, ...]
    context_tokens: int
    vocab_size: int
    dtype: str = "float32"  # what `auto` resolved to
    quant: str = "none"
    autotune: Any = None  # autotune.Choice when dtype or quant was `auto` on CPU


@contextmanager
def stage(name: str, *, every_s: float = 5.0) -> Iterator[None]:
    """Log a load stage's duration and RSS; while it runs, a heartbeat every `every_s` shows progress."""
    started_s = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(every_s):
            log.info("%s: still running (%.0f s)", name, time.perf_counter() - started_s)

    ticker = threading.Thread(target=heartbeat, name="switchboard-load-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    log.info("%s: %.1f s (RSS %.0f MB)", name, time.perf_counter() - started_s, current_rss_mb())


def stop_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("model has no end-of-sequence token; set generation_config.eos_token_id")
    return tuple(ids)


def available_cores() -> int:
    """Cores this process may run on: the engine thread's default torch thread count.

    Explicit, because a thread started after `build.one_compute_thread()` would inherit its one thread.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def one_compute_thread() -> None:
    """Give the calling thread one torch compute thread; call it on every thread that loads or builds.

    torch's intra-op threads are OpenMP teams, one per calling thread, and libgomp throttles its workers'
    spin-wait to almost nothing once it manages more threads than there are cores. If the loading thread
    ever ran a 2-thread team, the engine thread's own team (the one that matters) sleeps and wakes through
    the kernel at every parallel region: on 2 cores, int4 decode measured 8.1 ms per step with the engine
    thread the only team and 16-21 ms with a second team alive (docs/ENGINE.md).
    """
    import torch

    torch.set_num_threads(1)


def build_engine_parts(loaded: LoadedModel, options: EngineOptions) -> BuiltEngine:
    """Convert, quantize and size everything; the caller wraps the parts in an `Engine`."""
    import torch

    from backends.local.engine.kernels import attach_cpu_kernels
    from backends.local.engine.runner import build_runner

    if options.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    options, choice = resolve_auto(loaded, options)
    # Compute threads belong to the engine thread (`Engine(threads=...)`), not this one: `one_compute_thread`.
    what = f"{options.dtype} on {options.device}" + (f", {options.quant}" if options.quant != "none" else "")
    with stage(f"engine model ({what}, layer by layer)"):
        # Group size 32: on SmolLM2 (itself a Q4_1 GGUF, blocks of 32) it costs no perplexity, while 128
        # costs +87% (docs/BENCHMARKS.md, bench/quant). GGUF Q4 blocks are taken as they are (assemble.py).
        model, manifest = assemble_engine_model(loaded, options.dtype, options.quant, device=options.device)
        if options.release_source:
            release(loaded)
    if options.quant != "none":
        log.info(
            "quantized: %s; weights %.0f -> %.0f MB",
            manifest.scheme_counts(),
            manifest.bytes_before / 2**20,
            manifest.bytes_after / 2**20,
        )
    kv_dtype = kv_cache_dtype(options.kv_dtype, options.dtype, options.device)
    with stage(f"KV cache ({options.kv_cache_mb:.0f} MB, {kv_dtype})"):
        runner = build_runner(
            model,
            kv_cache_mb=options.kv_cache_mb,
            block_size=options.block_size,
            attn_impl=options.attn,
            kv_dtype=getattr(torch, kv_dtype),
        )
    cache = runner.kv_cache
    bf16 = ", prompt chunks in bf16" if runner.prefill_dtype else ""
    log.info("attention: %s (--attn %s%s)", runner.attn_impl, options.attn, bf16)
    log.info(
        "memory: weights %.1f MB + KV cache %.1f MB = %.1f MB (RSS %.0f MB)",
        manifest.bytes_after / 2**20,
        cache.num_bytes / 2**20,
        (manifest.bytes_after + cache.num_bytes) / 2**20,
        current_rss_mb(),
    )
    log.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %.0f MB, %s)",
        cache.num_blocks,
        cache.block_size,
        cache.num_blocks * cache.block_size,
        cache.num_bytes / 2**20,
        cache.dtype,
    )
    proposer = _proposer(options, model)  # before the GEMV swap: a self-draft copies and quantizes nn.Linear
    if options.device == "cpu":
        # RMSNorm, RoPE + KV write, and for bf16 the GEMV of decode rows: C++ kernels (docs/ENGINE.md).
        log.info("C++ CPU kernels on %d modules", attach_cpu_kernels(model))
    if options.warm_up:
        from backends.local.warmup import warm_up

        threads = options.threads or available_cores()
        with stage("warm-up (prefill and decode shapes, sampler)"):
            in_thread(
                lambda: warm_up(
                    runner, max_batch=options.max_batch, max_prefill_tokens=options.prefill_tokens
                ),
                threads,
            )
    trim_heap()
    config = SchedulerConfig(
        max_batch=options.max_batch,
        max_prefill_tokens=options.prefill_tokens,
        short_prefill_tokens=options.short_prefill_tokens,
        default_deadline_ms=options.default_deadline_ms,
        block_size=options.block_size,
        num_spec_tokens=0 if isinstance(proposer, NoProposer) else options.num_spec_tokens,
        batch_rows_beside_interactive=options.batch_rows_beside_interactive,
        prefix_caching=options.prefix_cache,
    )
    return BuiltEngine(
        runner=runner,
        scheduler=Scheduler(config, BlockAllocator(cache.num_blocks)),
        proposer=proposer,
        stop_token_ids=stops,
        context_tokens=runner.max_seq_len,
        vocab_size=runner.vocab_size,
        dtype=options.dtype,
        quant=options.quant,
        autotune=choice,
    )


def assemble_engine_model(loaded: LoadedModel, dtype: str, quant: str, *, device: str = "cpu") -> Any:
    """(our model, its QuantManifest) from `loaded`'s weights, built and quantized one layer at a time."""
    import torch

    from backends.local.engine.assemble import StateDictSource, assemble_model
    from backends.local.engine.config import ModelArgs

    args = ModelArgs.from_hf_config(loaded.model.config)
    source = loaded.weights or StateDictSource(loaded.model.state_dict())
    torch_dtype = getattr(torch, dtype)
    return assemble_model(args, source, dtype=torch_dtype, device=device, quant=quant, group_size=32)


def release(loaded: LoadedModel) -> None:
    """Free the source weights once the engine's model holds its own: the transformers model's tensors move
    to the meta device (the module stays valid, holding nothing); a GGUF's mapping is closed."""
    import gc

    loaded.model.to("meta")
    if loaded.weights is not None:
        loaded.weights.close()
    gc.collect()
    trim_heap()


def in_thread(fn: Callable[[], T], threads: int) -> T:
    """Run `fn` on a short-lived thread with `threads` torch threads, and return its result.

    Timing and warm-up need the engine's thread count, but an OpenMP team left on this (loading) thread
    would slow the engine thread's team for good (see `one_compute_thread`); a team dies with its thread.
    The caller's thread count is set again afterwards: ATen keeps the last `torch.set_num_threads` process
    wide, and a thread that has not asked for its count yet takes that one up the first time it does, so a
    loading thread that had only set its one thread built the model on the worker's two, and that team
    stayed beside the engine's (measured 2026-12-05: a cached autotune lookup before the build made every
    later decode step 2.4x slower, 5.0 -> 11.8 ms; served, 65-78 instead of 150-170 tok/s).
    """
    import torch

    caller_threads = torch.get_num_threads()
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        torch.set_num_threads(threads)
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=body, name="switchboard-engine-tune")
    worker.start()
    worker.join()
    torch.set_num_threads(caller_threads)
    if errors:
        raise errors[0]
    return result[0]


def kv_cache_dtype(kv_dtype: str, dtype: str, device: str) -> str:
    """The KV cache's dtype for compute `dtype` (resolved, not `auto`) on `device`.

    `auto`: bfloat16 under float32 compute on CPU, else the compute dtype. A float32 engine (what autotune
    picks where the CPU has no native bf16) then holds twice the tokens in its `--kv-cache-mb`, as llama.cpp's
    16-bit cache does; keys and values are rounded once when written and widened exactly when read, and
    attention still computes in float32. An explicit `--kv-dtype` must be the compute dtype, or bfloat16 under
    float32 on CPU (what the C++ kernels read)."""
    if kv_dtype == "auto":
        return "bfloat16" if device == "cpu" and dtype == "float32" else dtype
    if not cache_dtype_fits(kv_dtype, dtype, device):
        raise ValueError(
            f"--kv-dtype {kv_dtype} with --dtype {dtype} on {device}: the KV cache takes the compute dtype, "
            "or bfloat16 under float32 on CPU; use --kv-dtype auto"
        )
    return kv_dtype


def resolve_auto(loaded: LoadedModel, options: EngineOptions) -> tuple[EngineOptions, Any]:
    """Replace `auto` dtype/quant: timed candidates on CPU (autotune.py), bf16 and no quantization on CUDA."""
    if "auto" not in (options.dtype, options.quant):
        return options, None
    if options.device != "cpu":
        dtype = "bfloat16" if options.dtype == "auto" else options.dtype
        return replace(options, dtype=dtype, quant="none" if options.quant == "auto" else options.quant), None
    from backends.local import autotune
    from backends.local.engine.kernels import kernel_isa

    threads = options.threads or available_cores()
    with stage("autotune (dtype, quant)"):
        choice = in_thread(
            lambda: autotune.choose(loaded, dtype=options.dtype, quant=options.quant, threads=threads),
            threads,
        )
    log.info(
        "autotune (%s, kernels %s, %d threads; %s): dtype %s, quant %s",
        "cached" if choice.cached else "timed now",
        kernel_isa(),
        threads,
        autotune.cache_path(),
        choice.dtype,
        choice.quant,
    )
    for line in choice.rows():
        log.info("  %s", line)
    return replace(options, dtype=choice.dtype, quant=choice.quant), choice


def _proposer(options: EngineOptions, model: Any) -> Proposer:
    """The speculative-decoding seam: `backends.local.engine.speculative.build_proposer` when asked for."""
    if options.spec == "none":
        return NoProposer()
    module = "backends.local.engine.speculative"
    try:
        speculative = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise ValueError(f"--spec {options.spec} is not available in this build; use --spec none") from exc
    with stage(f"speculative proposer ({options.spec})"):
        from backends.local.loader import load_model

        proposer: Proposer = speculative.build_proposer(
            options.spec,
            target=model,
            draft_model=options.draft_model,
            load_draft=load_model,
            device=options.device,
        )
    return proposer
