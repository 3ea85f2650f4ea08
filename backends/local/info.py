"""What `switchboard engine info` shows: this machine as the engine sees it, and the autotune's choice.

Nothing here loads a model or times anything: the CPU and its vector flags, torch's own ISA, the C++ kernels
(building them on first use, as `engine serve` would), and the autotune cache entry that `engine serve
--dtype auto --quant auto` would reuse for this model and thread count, with the table that justified it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.local import autotune

# The flags that decide the engine's paths, in the order people look for them.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve",
              "bf16", "i8mm")  # fmt: skip


@dataclass(frozen=True, slots=True)
class EngineInfo:
    cpu: str
    isa_flags: tuple[str, ...]
    native_bf16: bool
    torch_version: str
    torch_isa: str
    threads: int
    kernels: str  # the loaded kernels' vector paths, or "off"
    kernel_setting: str  # SWITCHBOARD_KERNEL_ISA
    model: str
    autotune_key: str
    choice: autotune.Choice | None

    def as_json(self) -> dict[str, Any]:
        choice = None
        if self.choice is not None:
            choice = {
                "dtype": self.choice.dtype,
                "quant": self.choice.quant,
                "table": [
                    {
                        "dtype": t.dtype,
                        "quant": t.quant,
                        "decode1_ms": t.decode1_ms,
                        "decode8_ms": t.decode8_ms,
                        "prefill_ms": t.prefill_ms,
                    }
                    for t in self.choice.table
                ],
            }
        return {
            "cpu": self.cpu,
            "isa_flags": list(self.isa_flags),
            "native_bf16": self.native_bf16,
            "torch": {"version": self.torch_version, "cpu_capability": self.torch_isa},
            "threads": self.threads,
            "kernels": {"paths": self.kernels, "setting": self.kernel_setting},
            "model": self.model,
            "autotune": {"key": self.autotune_key, "cache": str(autotune.cache_path()), "choice": choice},
        }


def engine_info(model_spec: str, threads: int | None) -> EngineInfo:
    import torch

    from backends.local.build import available_cores
    from backends.local.engine.kernels import kernel_isa, kernel_isa_setting
    from backends.local.loader import resolve_spec

    cpu, flags = autotune.cpu_description()
    n_threads = threads or available_cores()
    name = resolve_spec(model_spec).name
    key = autotune.cache_key(name, n_threads, dtype="auto", quant="auto")
    return EngineInfo(
        cpu=cpu,
        isa_flags=tuple(f for f in _ISA_FLAGS if f in flags),
        native_bf16=autotune.native_bf16(flags),
        torch_version=torch.__version__,
        torch_isa=str(torch.backends.cpu.get_cpu_capability()),
        threads=n_threads,
        kernels=kernel_isa(),
        kernel_setting=kernel_isa_setting(),
        model=name,
        autotune_key=key,
        choice=autotune.read_cached(key),
    )


def render(info: EngineInfo) -> list[str]:
    lines = [
        f"CPU            {info.cpu}",
        f"ISA flags      {' '.join(info.isa_flags) or 'none of note'}",
        f"native bf16    {'yes' if info.native_bf16 else 'no (bf16 compute is not a candidate)'}",
        f"torch          {info.torch_version}, ATen CPU capability {info.torch_isa}",
        f"threads        {info.threads}",
        f"C++ kernels    {info.kernels} (SWITCHBOARD_KERNEL_ISA={info.kernel_setting})",
        f"model          {info.model}",
        f"autotune cache {autotune.cache_path()} (key {info.autotune_key})",
    ]
    if info.choice is None:
        lines.append(
            "choice         not timed yet for this model, machine and thread count: the first "
            "`switchboard engine serve` with --dtype auto --quant auto times the candidates and caches it"
        )
    else:
        lines.append(f"choice         {info.choice.dtype} compute, {info.choice.quant} weights; timed:")
        lines += [f"  {row}" for row in info.choice.rows()]
    return lines
