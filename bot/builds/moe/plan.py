"""The MoE plan (mergekit-moe, merge-semantics.md §3): everything that can be checked from headers before anything is
written (rules of §3.2, architecture of §3.3, every expert tensor's presence and shape), and the output laid out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebot.builds.base import MergeOptions
from mergebot.builds.moe import layout as L
from mergebot.config.moe import Expert, MoeConfig
from mergebot.config.refs import ModelRef, parse_ref
from mergebot.config.yamlsafe import keypath, load_yaml
from mergebot.engine.dtypes import TORCH_DTYPES, dtype_name
from mergebot.errors import ConfigError, ModelError, NotSupportedYet
from mergebot.hub.fetch import resolve
from mergebot.io.local import ResolvedModel
from mergebot.io.reader import TensorReader
from mergebot.io.weights import ModelWeights
from mergebot.tokenizer.files import tokenizer_identity
from mergebot.units import human_bytes

ALLOW_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


@dataclass
class OutTensor:
    """One output tensor and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    kind: str              # copy | zeros | router | shared_router | gate_up | down | shared
    layer: int = -1
    source: str = ""  # copy: base tensor; shared: MLP projection name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MoePlan:
    cfg: MoeConfig
    arch: L.MoeArch
    resolved: dict[str, ResolvedModel]   # every parent once, config order (base, experts, shared, tokenizer)
    weights: dict[str, TensorReader]
    base: str
    roles: dict[str, str]                # parent -> base | expert | shared_expert | tokenizer
    tensors: list[OutTensor]
    out_dtype: torch.dtype
    out_config: dict
    layers: int
    hidden: int
    intermediate: int
    tokenizer_donor: str
    uses_rng: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        size = torch.empty(0, dtype=self.out_dtype).element_size()
        return sum(t.numel for t in self.tensors) * size

    def describe(self) -> list[str]:
        """Human-readable plan lines (for --dry-run)."""
        c = self.cfg
        lines = [f"MoE: {self.arch.class_name}, {len(c.experts)} experts ({c.experts_per_token} per token)"
                 + (f" + {len(c.shared_experts)} shared" if c.shared_experts else "")
                 + f", gate_mode {c.gate_mode}, dtype {dtype_name(self.out_dtype)}",
                 f"  base (everything but the MLPs): {self.base}"]
        for i, e in enumerate(c.experts):
            lines.append(f"  expert {i}: {e.source_model}" + _expert_extras(e))
        for e in c.shared_experts:
            lines.append(f"  shared expert: {e.source_model}" + _expert_extras(e))
        lines.append(f"  output: {len(self.tensors)} tensors, {self.total_bytes} bytes")
        return lines

    def markdown(self, text: Callable[[str], str], code: Callable[[str], str], device: str) -> list[str]:
        return ([f"output: {text(self.arch.class_name)} with {len(self.cfg.experts)} experts, "
                 f"{human_bytes(self.total_bytes)}; device {code(device)}"]
                + [f"note: {text(w)}" for w in self.warnings])



def _expert_extras(e: Expert) -> str:
    bits = []
    if e.noise_scale is not None:
        bits.append(f"noise_scale={e.noise_scale}")
    if e.residual_scale is not None:
        bits.append(f"residual_scale={e.residual_scale}")
    return f" ({', '.join(bits)})" if bits else ""


# ------------------------------------------------------------------------------------------------ rules

def check_rules(cfg: MoeConfig, allow_all_same: bool) -> None:
    """§3.2 again (a MoeConfig may be built in code), plus the all-same-experts acknowledgement."""
    try:
        doc = load_yaml(cfg.text, cfg.file) if cfg.text else None
    except ConfigError:
        doc = None

    def err(path: tuple, reason: str) -> ConfigError:
        if doc is not None:
            return doc.error(path, reason)
        return ConfigError(cfg.file, keypath(path), None, reason)

    if not cfg.experts:
        raise err(("experts",), "a MoE needs at least one expert")
    if cfg.experts_per_token < 1:
        raise err(("experts_per_token",), f"expected an integer >= 1, got {cfg.experts_per_token}")
    if cfg.experts_per_token > len(cfg.experts):
        raise err(("experts_per_token",), f"experts_per_token is {cfg.experts_per_token} but there are only "
                                       f"{len(cfg.experts)} experts")
    if len(cfg.shared_experts) > 1:
        raise err(("shared_experts",), "at most one shared expert is supported")
    for e in cfg.experts + cfg.shared_experts:
        if e.source_model.lora is not None:
            raise NotSupportedYet(f"{cfg.file}: {e.source_model}: LoRA-applied experts are not supported yet")
    if cfg.gate_mode == "random":
        return  # mergekit's is_bad_config stops here: random gates need no prompts, and may repeat a model
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise err(("experts", i), f"gate_mode {cfg.gate_mode!r} needs positive_prompts for every expert")
    sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in cfg.experts}
    if len(cfg.experts) > 1 and len(sets) == 1:
        raise err(("experts",), "every expert has the same prompts: the router could not tell them apart")
    if len({str(e.source_model) for e in cfg.experts}) == 1 and not allow_all_same:
        raise err(("experts",), f"every expert is the same model ({cfg.experts[0].source_model}): the MoE would cost "
                             "more and answer exactly like it; if you will train it, pass " + ALLOW_SAME_FLAG)


# -------------------------------------------------------------------------------------------- tokenizer

def _tokenizer_ref(cfg: MoeConfig) -> tuple[str, ModelRef | None]:
    """('base' | 'union' | 'model', ref): tokenizer_source as written, incl. the legacy `model:<ref>`."""
    doc = load_yaml(cfg.text, cfg.file)
    data = doc.data if isinstance(doc.data, dict) else {}
    value = data.get("tokenizer_source")
    if value is None or value == "base":
        return "base", None
    if value == "union":
        return "union", None
    return "model", parse_ref(doc, ("tokenizer_source",), str(value).removeprefix("model:"))


# ------------------------------------------------------------------------------------------------ plan

def _resolve_all(cfg: MoeConfig, options: MergeOptions, tok_ref: ModelRef | None
                 ) -> tuple[dict[str, ResolvedModel], dict[str, TensorReader], dict[str, str]]:
    search = [Path(cfg.file).resolve().parent]
    refs: list[tuple[ModelRef, str]] = [(cfg.base_model, "base")]
    refs += [(e.source_model, "expert") for e in cfg.experts]
    refs += [(e.source_model, "shared_expert") for e in cfg.shared_experts]
    if tok_ref is not None:
        refs.append((tok_ref, "tokenizer"))
    resolved: dict[str, ResolvedModel] = {}
    weights: dict[str, TensorReader] = {}
    roles: dict[str, str] = {}
    for ref, role in refs:
        key = str(ref)
        if key in resolved:
            continue
        resolved[key] = resolve(ref, search, token=options.token)
        roles[key] = role
        if role != "tokenizer":
            weights[key] = ModelWeights(resolved[key].directory, key)
    return resolved, weights, roles


def _dim(cfg: dict, key: str, label: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelError(f"{label}: config.json has no valid {key!r} (got {v!r})")
    return v


def _out_dtype(cfg: MoeConfig, base: ResolvedModel, bw: TensorReader) -> torch.dtype:
    """Config `dtype`, else the base config's torch_dtype (v5: dtype), else the base's embedding dtype."""
    name = cfg.dtype or base.config.get("torch_dtype") or base.config.get("dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in TORCH_DTYPES:
        d = TORCH_DTYPES[name.removeprefix("torch.")]
    else:
        d = next((t.dtype for t in map(bw.header, bw.keys()) if t.dtype.is_floating_point), torch.float32)
    if not d.is_floating_point:
        raise ConfigError(cfg.file, "dtype", None, f"a MoE's dtype must be a float type, not {dtype_name(d)}")
    return d


def _check_expert(label: str, role: str, w: TensorReader, r: ResolvedModel, layers: int, hidden: int, inter: int,
                  base: str) -> None:
    n = r.config.get("num_hidden_layers")
    if isinstance(n, int) and n != layers:
        raise ModelError(f"{label}: {role} has {n} layers but the base {base} has {layers}; every expert must have "
                         "the base's layer count")
    want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for layer in range(layers):
        for proj, shape in want.items():
            name = L.mlp_source(layer, proj)
            if name not in w.keys():
                raise ModelError(f"{label}: {role} tensor {name!r} not found (an expert must be a dense "
                                 f"{layers}-layer model with gate/up/down_proj MLPs)")
            info = w.header(name)
            if info.shape != shape:
                raise ModelError(f"{label}: {role} tensor {name!r} has shape {list(info.shape)}, but the base "
                                 f"{base} needs {list(shape)} (hidden_size {hidden}, intermediate_size {inter})")
            if not info.dtype.is_floating_point:
                raise ModelError(f"{label}: {role} tensor {name!r} has dtype {dtype_name(info.dtype)}, not a float")
    extra = sorted(n for n in w.keys() if L.is_mlp(n) and not any(n.endswith(f".mlp.{p}.weight") for p in want))
    if extra:
        raise ModelError(f"{label}: {role} tensor {extra[0]!r} has no place in the MoE's experts "
                         "(only gate_proj/up_proj/down_proj weights, no MLP biases)")


def _layout(plan_arch: L.MoeArch, cfg: MoeConfig, bw: TensorReader, base_cfg: dict, base: str,
            layers: int, hidden: int, inter: int) -> list[OutTensor]:
    kept = L.kept_pattern(plan_arch, base_cfg)
    out: list[OutTensor] = []
    for name in bw.keys():
        if L.is_mlp(name) or L.IGNORED.search(name):
            continue
        if not kept.fullmatch(name):
            raise ModelError(f"{base}: base tensor {name!r} has no place in a {plan_arch.class_name} "
                             f"(it would be an unexpected key; e.g. Mixtral attention has no biases)")
        out.append(OutTensor(name, bw.header(name).shape, "copy", source=name))
    if "model.embed_tokens.weight" not in bw.keys():
        raise ModelError(f"{base}: base tensor 'model.embed_tokens.weight' not found")
    if "lm_head.weight" not in bw.keys() and not base_cfg.get("tie_word_embeddings"):
        raise ModelError(f"{base}: base has no 'lm_head.weight' and tie_word_embeddings is not true")
    names = set(bw.keys())
    for bias, weight in L.zero_biases(plan_arch, layers, names):
        if weight not in names:
            raise ModelError(f"{base}: base tensor {weight!r} not found")
        out.append(OutTensor(bias, (bw.header(weight).shape[0],), "zeros"))
    E = len(cfg.experts)
    for layer in range(layers):
        out.append(OutTensor(L.router(layer), (E, hidden), "router", layer))
        out.append(OutTensor(L.experts_gate_up(layer), (E, 2 * inter, hidden), "gate_up", layer))
        out.append(OutTensor(L.experts_down(layer), (E, hidden, inter), "down", layer))
        if cfg.shared_experts:
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):
                out.append(OutTensor(L.shared_expert(plan_arch, layer, proj), shape, "shared", layer, proj))
            if plan_arch is L.QWEN2_MOE:
                out.append(OutTensor(L.shared_router(layer), (1, hidden), "shared_router", layer))
    return sorted(out, key=lambda t: t.name)


def prepare_moe(cfg: MoeConfig, options: MergeOptions, *, allow_all_same: bool = False) -> MoePlan:
    """Validate the config against the real models (headers and config.json only) and lay out the output."""
    check_rules(cfg, allow_all_same)
    tok_kind, tok_ref = _tokenizer_ref(cfg)
    resolved, weights, roles = _resolve_all(cfg, options, tok_ref)
    base = str(cfg.base_model)
    rb, bw = resolved[base], weights[base]

    def model_type(ref: object) -> str:
        r = resolved[str(ref)]
        t = r.config.get("model_type")
        if not isinstance(t, str):
            raise ModelError(f"{r.label}: config.json has no model_type")
        return t

    arch, warnings = L.select_arch(cfg, model_type)
    layers = _dim(rb.config, "num_hidden_layers", base)
    hidden = _dim(rb.config, "hidden_size", base)
    inter = _dim(rb.config, "intermediate_size", base)
    _dim(rb.config, "num_attention_heads", base)
    seen = set()
    for role, experts in (("expert", cfg.experts), ("shared expert", cfg.shared_experts)):
        for e in experts:
            key = str(e.source_model)
            if (key, role) not in seen:
                seen.add((key, role))
                _check_expert(key, role, weights[key], resolved[key], layers, hidden, inter, base)
    tensors = _layout(arch, cfg, bw, rb.config, base, layers, hidden, inter)
    out_dtype = _out_dtype(cfg, rb, bw)
    out_config = L.out_config(arch, rb.config, len(cfg.experts), cfg.experts_per_token, dtype_name(out_dtype))

    donor = base
    if tok_kind == "model":
        donor = str(tok_ref)
        dv, bv = resolved[donor].config.get("vocab_size"), rb.config.get("vocab_size")
        if dv is not None and bv is not None and dv != bv:
            raise ModelError(f"{cfg.file}: tokenizer_source {donor} has vocab_size {dv} but the base {base} has {bv}; "
                             "a MoE keeps the base's embeddings, so its tokenizer must match them")
    elif tok_kind == "union":
        ids = {tokenizer_identity(resolved[k].directory) for k in weights}
        if len(ids) != 1 or None in ids:
            raise NotSupportedYet(f"{cfg.file}: tokenizer_source: union with differing vocabularies (a MoE keeps "
                                  "the base's embeddings; use tokenizer_source: base)")
        warnings.append(f"{cfg.file}: tokenizer_source: union: every model has the same vocabulary, so the output "
                        "keeps the base's tokenizer")
    doc = load_yaml(cfg.text, cfg.file)
    data = doc.data if isinstance(doc.data, dict) else {}
    for key in ("tokenizer", "chat_template"):
        if data.get(key) is not None:
            warnings.append(f"{cfg.file}: {key}: not applied by the MoE builder (mergekit-moe ignores it too); "
                            "the output keeps the tokenizer files of " + donor)
    E = len(cfg.experts)
    if E & (E - 1):
        warnings.append(f"{cfg.file}: {E} experts is not a power of two: the model will not be usable in llama.cpp")
    uses_rng = cfg.gate_mode in ("random", "uniform_random") or any(
        e.noise_scale for e in cfg.experts + cfg.shared_experts)
    return MoePlan(cfg, arch, resolved, weights, base, roles, tensors, out_dtype, out_config, layers, hidden, inter,
                   donor, uses_rng, warnings)
