"""Build the engine's `Transformer` from a transformers model or its state_dict.

Maps transformers names (`model.layers.3.self_attn.q_proj.weight`) to ours
(`layers.3.attention.q_proj.weight`), stacks q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (rows
concatenated in that order, so the stacked layer's output is the separate outputs side by side), re-ties
lm_head to the embedding when the config says so, converts to the serving dtype (bfloat16 is the faster CPU
choice, float32 the exact one), and by default releases the transformers copy (its tensors move to the
meta device) so only one set of weights stays resident.
Unknown or missing names are an error.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Mapping
from typing import Any

import torch

from backends.local.engine.config import ModelArgs
from backends.local.engine.model import Transformer

_LAYER_RENAMES = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.o_proj": "attention.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "mlp_norm",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Stacked layer -> the separate transformers layers whose rows it holds, in order.
STACKED = {
    "attention.qkv_proj": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.original_inv_freq)$")


def engine_name(hf_name: str) -> str | None:
    """Our parameter name for a transformers one; None for buffers we recompute (RoPE inverse frequencies)."""
    if _IGNORED.search(hf_name):
        return None
    if hf_name in _TOP_RENAMES:
        return _TOP_RENAMES[hf_name]
    match = _LAYER_KEY.match(hf_name)
    if match and match.group(2) in _LAYER_RENAMES:
        layer, module, kind = match.groups()
        return f"layers.{layer}.{_LAYER_RENAMES[module]}.{kind}"
    raise ValueError(f"weight `{hf_name}` has no place in the engine's Llama-family model")


def build_model_from_state_dict(
    args: ModelArgs,
    hf_state: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Our model holding `hf_state`'s weights (transformers names), converted to `dtype` on `device`."""
    state: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_state.items():
        name = engine_name(hf_name)
        if name is not None and not (name == "lm_head.weight" and args.tie_word_embeddings):
            state[name] = tensor.detach().to(device=device, dtype=dtype)
    _stack(state, args.n_layers)
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    if missing := sorted(expected - state.keys()):
        raise ValueError(f"the state_dict lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    if unexpected := sorted(state.keys() - expected):
        raise ValueError(f"the state_dict has weights the model lacks: {', '.join(unexpected[:3])}")
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.tie_lm_head()
    model.init_rope_tables(device, dtype)
    return model.eval().requires_grad_(False)


def _stack(state: dict[str, torch.Tensor], n_layers: int) -> None:
    """Replace each layer's separate q/k/v and gate/up tensors with their row-wise concatenation, in place."""
    for layer in range(n_layers):
        for stacked, parts in STACKED.items():
            for kind in ("weight", "bias"):
                names = [f"layers.{layer}.{part}.{kind}" for part in parts]
                present = [name in state for name in names]
                if not any(present):
                    continue
                if not all(present):
                    missing = names[present.index(False)]
                    raise ValueError(f"the state_dict has some of {stacked}'s parts but lacks `{missing}`")
                state[f"layers.{layer}.{stacked}.{kind}"] = torch.cat([state.pop(name) for name in names])


def build_model(
    hf_model: Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    release_source: bool = True,
) -> Transformer:
    """Our model from a loaded transformers `*ForCausalLM`; with `release_source` its weights move to meta."""
    args = ModelArgs.from_hf_config(hf_model.config)
    model = build_model_from_state_dict(args, hf_model.state_dict(), dtype=dtype, device=device)
    if release_source:
        # Parameters are re-pointed in place, so the transformers module stays valid but holds no memory;
        # our tensors keep theirs (shared storage when no conversion was needed).
        hf_model.to("meta")
        gc.collect()
    return model
