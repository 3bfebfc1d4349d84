"""What the check's forward pass needs from a decoder's config.json (Llama, Mistral, Qwen2 families), with each
family's defaults filled in and every setting the pass does not implement refused (CheckUnsupported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mergebot.errors import CheckUnsupported, ModelError

# architectures[0] -> family; a config without `architectures` is matched by model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = frozenset(ARCHITECTURES.values())


@dataclass(frozen=True)
class DecoderSpec:
    """What the forward pass needs from config.json, with the families' defaults filled in."""

    architecture: str
    family: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    tied: bool
    max_positions: int
    rope_theta: float
    rope_type: str
    rope: dict = field(default_factory=dict)  # the scaling parameters of `linear` / `llama3`
    windows: tuple[int | None, ...] = ()  # per layer: sliding window size, None = full causal attention

    @classmethod
    def from_config(cls, config: dict, label: str) -> DecoderSpec:
        archs = config.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
        if arch is not None:
            family = ARCHITECTURES.get(arch)
        else:
            family = model_type if model_type in MODEL_TYPES else None
        name = arch or model_type or "unknown architecture"
        if family is None:
            raise CheckUnsupported(f"not supported by the check yet: {name} ({label})")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise CheckUnsupported(f"not supported by the check yet: {name} with hidden_act {act!r} ({label})")

        def num(key: str, default: object = None, kind: type = int):
            value = config.get(key, default)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelError(f"{label}: config.json: {key} is missing or not a number")
            if kind is int and (not float(value).is_integer() or value <= 0):
                raise ModelError(f"{label}: config.json: {key} must be a positive integer, not {value!r}")
            return kind(value)

        hidden, heads = num("hidden_size"), num("num_attention_heads")
        kv_heads = num("num_key_value_heads", heads)
        head_dim = num("head_dim") if config.get("head_dim") is not None else hidden // heads
        if heads % kv_heads:
            raise ModelError(f"{label}: config.json: {heads} attention heads are not a multiple of {kv_heads} "
                             "key/value heads")
        layers = num("num_hidden_layers")
        rope_type, theta, rope = _rope_parameters(config, name, label)
        return cls(architecture=name, family=family, vocab=num("vocab_size"), hidden=hidden,
                   intermediate=num("intermediate_size"), layers=layers, heads=heads, kv_heads=kv_heads,
                   head_dim=int(head_dim), eps=num("rms_norm_eps", 1e-6, float),
                   tied=bool(config.get("tie_word_embeddings", False)),
                   max_positions=num("max_position_embeddings", 2048), rope_theta=theta, rope_type=rope_type,
                   rope=rope, windows=_windows(config, family, layers))

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, computed in float32 as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
        if self.rope_type == "linear":
            return inv / self.rope["factor"]
        if self.rope_type == "llama3":
            factor, low, high = self.rope["factor"], self.rope["low_freq_factor"], self.rope["high_freq_factor"]
            old = self.rope["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old / low, old / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


def _rope_parameters(config: dict, name: str, label: str) -> tuple[str, float, dict]:
    """(rope_type, theta, scaling parameters) from either spelling: transformers 5's `rope_parameters` or the
    older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    merged: dict = {}
    for part in (scaling, params):
        if isinstance(part, dict):
            merged.update(part)
    if any(isinstance(v, dict) for v in merged.values()):
        raise CheckUnsupported(f"not supported by the check yet: {name} with per-layer RoPE parameters ({label})")
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelError(f"{label}: config.json: rope_theta {theta!r} is not a positive number")
    partial = merged.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckUnsupported(f"not supported by the check yet: {name} with partial_rotary_factor {partial} ({label})")
    if rope_type == "default":
        return "default", float(theta), {}
    if rope_type == "linear":
        return "linear", float(theta), {"factor": float(_positive(merged, "factor", label))}
    if rope_type == "llama3":
        rope = {k: float(_positive(merged, k, label)) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        old = merged.get("original_max_position_embeddings", config.get("max_position_embeddings"))
        rope["original_max_position_embeddings"] = float(_positive({"x": old}, "x", label))
        return "llama3", float(theta), rope
    raise CheckUnsupported(f"not supported by the check yet: {name} with rope_type {str(rope_type)[:40]!r} ({label})")


def _positive(d: dict, key: str, label: str) -> float:
    v = d.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ModelError(f"{label}: config.json: RoPE parameter {key} is missing or not a positive number")
    return v


def _windows(config: dict, family: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows: Mistral applies `sliding_window` to every layer; Qwen2 only when
    `use_sliding_window`, to the layers `layer_types` (or `max_window_layers`) marks as sliding."""
    window = config.get("sliding_window")
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    if family == "mistral":
        return (window,) * layers
    if family == "qwen2" and config.get("use_sliding_window") and window is not None:
        types = config.get("layer_types")
        if not (isinstance(types, list) and len(types) == layers):
            start = config.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * layers
