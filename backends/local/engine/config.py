"""`ModelArgs`: the shape of a Llama-family decoder (Llama, SmolLM, Qwen2, Mistral), from its HF config.

Pure Python (no torch). `from_hf_config` accepts both the transformers 5 `rope_parameters` dict and the older
`rope_theta` + `rope_scaling` attributes. Anything the engine cannot reproduce exactly (another activation,
an unsupported RoPE scaling, alternating sliding-window layers) is refused with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The config describes a model this engine cannot run exactly; the message names the field."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "linear" (all frequencies / factor) or "llama3" (banded)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelArgs:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections have a bias, o_proj does not
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # attention is exact only while a context fits in the window
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads "
                f"({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def max_seq_len(self) -> int:
        """Longest context the engine reproduces exactly."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelArgs:
        """Read a transformers `PretrainedConfig` (LlamaConfig, Qwen2Config, MistralConfig)."""
        model_type = str(getattr(config, "model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type `{model_type}` is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(
                f"hidden_act `{act}` is not supported; the engine's MLP is SwiGLU (silu)"
            )
        n_heads = int(config.num_attention_heads)
        theta, scaling = _read_rope(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        qwen2 = model_type == "qwen2"
        return cls(
            vocab_size=int(config.vocab_size),
            dim=int(config.hidden_size),
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // n_heads),
            intermediate_size=int(config.intermediate_size),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if qwen2 else attention_bias,
            o_bias=False if qwen2 else attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            max_position_embeddings=int(config.max_position_embeddings),
            sliding_window=_read_sliding_window(config, model_type),
            model_type=model_type,
        )


def _read_rope(config: Any) -> tuple[float, RopeScaling | None]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_parameters.rope_type `{kind}` is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("rope_parameters.partial_rotary_factor other than 1.0 is not supported")
    if kind == "default":
        return float(theta), None
    factor = float(params["factor"])
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=factor)
    original = params.get("original_max_position_embeddings", config.max_position_embeddings)
    return float(theta), RopeScaling(
        kind="llama3",
        factor=factor,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def _read_sliding_window(config: Any, model_type: str) -> int | None:
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2":
        if not getattr(config, "use_sliding_window", False):
            return None
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "sliding_attention" for t in layer_types):
            raise UnsupportedModelError(
                "qwen2 configs mixing sliding and full attention layers are not supported"
            )
    return int(window) if window else None
