"""Output architectures of a MoE build (merge-semantics.md §3.3, §3.5): which one, its config, its tensor names.

The tensor layout written is the one the installed transformers (v5) loads *natively*, with no checkpoint
conversion: Mixtral and Qwen3-MoE (and the routed experts of Qwen2-MoE) keep their experts fused,
`mlp.experts.gate_up_proj` [E, 2I, H] (expert e's gate_proj rows [0, I), its up_proj rows [I, 2I)) and
`mlp.experts.down_proj` [E, H, I]; the router is `mlp.gate.weight` [E, H]. This is exactly what transformers'
own conversion mapping makes of mergekit's per-expert names (`block_sparse_moe.experts.{e}.w1|w3|w2`), so the
files load without "missing/unexpected keys" and each expert slice can be written straight into place.

Config dicts are built without transformers (it is only an optional runtime extra): the base config.json
is carried over, and the few defaults that differ between the dense and the MoE config classes (a Llama
config.json without `rope_theta` means 10000, a Mixtral one 1e6) are filled in explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mergebot.config.moe import MoeConfig
from mergebot.errors import ModelError, NotSupportedYet


@dataclass(frozen=True)
class MoeArch:
    key: str                       # our id, and the output model_type
    name: str                      # mergekit's name: the `architecture:` prefix is matched against it
    class_name: str                # config.json architectures[0]
    model_types: tuple[str, ...]   # accepted input model types
    shared_module: str | None      # where a shared expert goes (None: no shared experts)
    supported: bool = True         # DeepSeek MoE needs remote code: selected as mergekit does, then refused


MIXTRAL = MoeArch("mixtral", "Mixtral", "MixtralForCausalLM", ("llama", "mistral"), None)
DEEPSEEK = MoeArch("deepseek", "DeepSeek MoE", "DeepseekForCausalLM", ("llama", "mistral"), "shared_experts",
                   supported=False)
QWEN2_MOE = MoeArch("qwen2_moe", "Qwen MoE", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), "shared_expert")
QWEN3_MOE = MoeArch("qwen3_moe", "Qwen3 MoE", "Qwen3MoeForCausalLM", ("qwen3",), None)
CANDIDATES = (MIXTRAL, DEEPSEEK, QWEN2_MOE, QWEN3_MOE)  # mergekit's order (§3.3)


def why_not(arch: MoeArch, cfg: MoeConfig, model_type: Callable[[object], str]) -> str | None:
    """mergekit's `supports_config`: None if `arch` can take this config, else the reason it cannot."""
    shared = cfg.shared_experts
    refs = [cfg.base_model] + [e.source_model for e in cfg.experts]
    if arch is MIXTRAL or arch is QWEN3_MOE:
        if shared:
            return f"{arch.name} has no shared experts"
    elif arch is DEEPSEEK:
        if len(shared) > 1:
            return "DeepSeek MoE takes at most one shared expert"
        if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
            return "DeepSeek MoE does not gate its shared expert (it must have no prompts)"
        refs += [e.source_model for e in shared]
    elif arch is QWEN2_MOE:
        if len(shared) != 1:
            return "Qwen MoE needs exactly one shared expert"
        if cfg.gate_mode != "random" and not shared[0].positive_prompts:
            return "Qwen MoE needs positive_prompts for its shared expert (unless gate_mode: random)"
        refs += [e.source_model for e in shared]
    types = {str(r): model_type(r) for r in refs}
    if arch is QWEN3_MOE:
        bad = [f"{r} ({t})" for r, t in types.items() if t != "qwen3"]
        return f"Qwen3 MoE needs qwen3 models, not {', '.join(bad)}" if bad else None
    if len(set(types.values())) != 1:
        return f"{arch.name} needs every model to have the same model_type: " + \
            ", ".join(f"{r}: {t}" for r, t in types.items())
    t = next(iter(types.values()))
    if t not in arch.model_types:
        return f"{arch.name} takes {'/'.join(arch.model_types)} models, not {t}"
    return None


def select_arch(cfg: MoeConfig, model_type: Callable[[object], str]) -> tuple[MoeArch, list[str]]:
    """§3.3: filter by the `architecture` prefix, then by support; Mixtral wins, else the first left."""
    cands = list(CANDIDATES)
    if cfg.architecture:
        cands = [a for a in cands if a.name.lower().startswith(cfg.architecture.lower())]
        if not cands:
            raise ModelError(f"{cfg.file}: architecture: {cfg.architecture!r} matches no output architecture "
                             f"({', '.join(a.name for a in CANDIDATES)})")
    reasons = {a.name: why_not(a, cfg, model_type) for a in cands}
    ok = [a for a in cands if reasons[a.name] is None]
    if not ok:
        raise ModelError(f"{cfg.file}: no MoE output architecture fits these models: "
                         + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    notes = []
    chosen = MIXTRAL if MIXTRAL in ok else ok[0]
    if chosen is not MIXTRAL and len(ok) > 1:
        notes.append(f"{cfg.file}: several MoE output architectures fit ({', '.join(a.name for a in ok)}); "
                     f"using {chosen.name} (set architecture: to choose)")
    if not chosen.supported:
        raise NotSupportedYet(f"{cfg.file}: the models and experts fit only {chosen.name} output"
                              + (f" among {', '.join(a.name for a in ok)}" if len(ok) > 1 else "")
                              + ", which needs remote code (deepseek-moe modeling files) that mergebot does not "
                              "write; give the shared expert prompts and set architecture: qwen for Qwen2-MoE")
    return chosen, notes


# --------------------------------------------------------------------------------------------- config

# Defaults of the dense config classes for keys whose default differs in the MoE class (transformers 5.23;
# tests/test_moe.py checks this table against the installed transformers).
DENSE_DEFAULTS: dict[str, dict] = {
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32},
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128},
}
DROP_KEYS = ("architectures", "model_type", "auto_map", "_name_or_path", "transformers_version", "torch_dtype",
             "dtype")


def out_config(arch: MoeArch, base_cfg: dict, n_experts: int, experts_per_token: int, dtype: str) -> dict:
    """config.json of the MoE: the base's, with the MoE keys of §3.3 (and `dtype`, the v5 key)."""
    src_type = base_cfg.get("model_type", "llama")
    out = {k: v for k, v in base_cfg.items() if k not in DROP_KEYS}
    for k, v in DENSE_DEFAULTS.get(src_type, {}).items():
        if k == "rope_theta" and ("rope_parameters" in out or "rope_theta" in out):
            continue
        out.setdefault(k, v)
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    head = {"architectures": [arch.class_name], "model_type": arch.key}
    inter = out["intermediate_size"]
    if arch is MIXTRAL:
        out.update(num_local_experts=n_experts, num_experts_per_tok=experts_per_token, sliding_window=None,
                   output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
        out.pop("use_sliding_window", None)
        out.pop("max_window_layers", None)
        out.pop("layer_types", None)
    elif arch is QWEN2_MOE:
        out.update(num_experts=n_experts, num_experts_per_tok=experts_per_token, decoder_sparse_step=1,
                   norm_topk_prob=True, sliding_window=None, use_sliding_window=False, mlp_only_layers=[],
                   shared_expert_intermediate_size=inter, moe_intermediate_size=inter,
                   output_router_logits=False, router_aux_loss_coef=0.001)
        out.pop("layer_types", None)
    elif arch is QWEN3_MOE:
        out.update(num_experts=n_experts, num_experts_per_tok=experts_per_token, decoder_sparse_step=1,
                   norm_topk_prob=True, moe_intermediate_size=inter, mlp_only_layers=[],
                   output_router_logits=False, router_aux_loss_coef=0.001)
    else:  # pragma: no cover - refused in select_arch
        raise NotSupportedYet(f"{arch.name} output")
    out["dtype"] = dtype
    return {**head, **out}


# --------------------------------------------------------------------------------------------- tensors

MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_COMMON = (r"model\.embed_tokens\.weight", r"model\.norm\.weight", r"lm_head\.weight",
           r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
           r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
_EXTRA = {
    "mixtral": (),
    "qwen2_moe": (r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias",),
    "qwen3_moe": (r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight",),
}
_QWEN3_BIAS = r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias"


def mlp_source(layer: int, proj: str) -> str:
    """A dense model's MLP tensor: the experts' source."""
    return f"model.layers.{layer}.mlp.{proj}.weight"


def is_mlp(name: str) -> bool:
    return ".mlp." in name


def kept_pattern(arch: MoeArch, base_cfg: dict) -> re.Pattern:
    """Non-MLP tensor names the output class has (anything else in the base would be an unexpected key)."""
    pats = _COMMON + _EXTRA[arch.key]
    if arch is QWEN3_MOE and base_cfg.get("attention_bias"):
        pats += (_QWEN3_BIAS,)
    return re.compile("|".join(f"(?:{p})" for p in pats))


def zero_biases(arch: MoeArch, layers: int, base_names: set[str]) -> list[tuple[str, str]]:
    """Qwen2-MoE attention always has q/k/v biases: (bias name, weight it is sized from) for those the base
    (Llama/Mistral) lacks; they are written as zeros (§3.5)."""
    if arch is not QWEN2_MOE:
        return []
    out = []
    for layer in range(layers):
        for p in "qkv":
            w = f"model.layers.{layer}.self_attn.{p}_proj.weight"
            b = f"model.layers.{layer}.self_attn.{p}_proj.bias"
            if b not in base_names:
                out.append((b, w))
    return out


def router(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def experts_gate_up(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts.gate_up_proj"


def experts_down(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts.down_proj"


def shared_expert(arch: MoeArch, layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{arch.shared_module}.{proj}.weight"


def shared_router(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def legacy_mixtral_names(layer: int, expert: int) -> dict[str, str]:
    """mergekit ≤ 0.1.4's per-expert Mixtral names (w1 = gate, w2 = down, w3 = up): for checks only."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    return {"gate_proj": p + "w1.weight", "down_proj": p + "w2.weight", "up_proj": p + "w3.weight"}
