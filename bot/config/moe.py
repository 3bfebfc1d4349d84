"""mergekit-moe configs (merge-semantics.md §3.1, §3.2): parse and validate, with no models and no network.

The builder is mergebot.builds.moe; this module is what `mergebot validate` needs.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mergebot.config.params import MAX_MAGNITUDE
from mergebot.config.refs import ModelRef, parse_ref, unique
from mergebot.config.shared import check_tokenizer_source, unknown_keys
from mergebot.config.spec import DTYPE_NAMES
from mergebot.config.yamlsafe import YamlDoc, short

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
ARCHITECTURES = ("mixtral", "deepseek", "qwen", "qwen3")
TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
            "tokenizer_source", "tokenizer", "chat_template", "hub_repo", "name")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
MAX_EXPERTS = 256  # routed experts (mergekit-moe configs use 2 to 16)
MAX_PROMPTS = 256  # prompts in one list: they run through the base model as one padded batch
MAX_PROMPT_CHARS = 4096  # characters of one prompt


@dataclass
class Expert:
    source_model: ModelRef
    positive_prompts: list[str]
    negative_prompts: list[str]
    noise_scale: float | None
    residual_scale: float | None


@dataclass
class MoeConfig:
    """A validated mergekit-moe config (§3.1)."""

    kind: ClassVar[str] = "moe"
    file: str
    text: str
    base_model: ModelRef
    experts: list[Expert]
    gate_mode: str
    experts_per_token: int
    shared_experts: list[Expert]
    dtype: str | None
    architecture: str | None
    hub_repo: str | None = None
    warnings: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    doc: YamlDoc | None = None
    method_name: str = "moe"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def referenced_models(self) -> list[ModelRef]:
        """Base, experts and shared experts, in config order, deduplicated."""
        return unique([self.base_model] + [e.source_model for e in self.experts + self.shared_experts])

    def label(self) -> str:
        return f"moe ({self.gate_mode} gates)"

    def model_count(self) -> int:
        """The base and the routed experts (a shared expert is not counted)."""
        return len({str(e.source_model) for e in self.experts} | {str(self.base_model)})


def _strings(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise doc.error(path, "expected a list of prompt strings")
    if len(value) > MAX_PROMPTS:
        raise doc.error(path, f"{len(value):,} prompts (at most {MAX_PROMPTS}: they run through the base model "
                              "as one batch)")
    for i, v in enumerate(value):
        if len(v) > MAX_PROMPT_CHARS:
            raise doc.error(path + (i,), f"a prompt of {len(v):,} characters (at most {MAX_PROMPT_CHARS:,})")
    return value


def _number(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise doc.error(path, f"expected a number, got {short(value)}")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise doc.error(path, f"expected a finite number of magnitude at most {MAX_MAGNITUDE:g}, got {short(value)}")
    return float(value)


def _expert(doc: YamlDoc, path: tuple[Any, ...], e: Any) -> Expert:
    if not isinstance(e, dict):
        raise doc.error(path, "expected a mapping with 'source_model'")
    for key in e:
        if key not in EXPERT_KEYS:
            hint = difflib.get_close_matches(str(key), EXPERT_KEYS, n=1)
            raise doc.error(path + (key,),
                            f"unknown key {short(key)}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if "source_model" not in e:
        raise doc.error(path, "missing required key 'source_model'")
    return Expert(parse_ref(doc, path + ("source_model",), e["source_model"]),
                  _strings(doc, path + ("positive_prompts",), e.get("positive_prompts")),
                  _strings(doc, path + ("negative_prompts",), e.get("negative_prompts")),
                  _number(doc, path + ("noise_scale",), e.get("noise_scale")),
                  _number(doc, path + ("residual_scale",), e.get("residual_scale")))


def parse_moe(doc: YamlDoc, text: str) -> MoeConfig:
    data = doc.data
    warnings: list[str] = []
    unknown_keys(doc, TOP_KEYS, warnings)
    if data.get("base_model") is None:
        raise doc.error((), "a MoE config needs 'base_model' (the donor of everything except the MLPs)")
    base = parse_ref(doc, ("base_model",), data["base_model"])
    experts_raw = data.get("experts")
    if not isinstance(experts_raw, list) or not experts_raw:
        raise doc.error(("experts",), "expected a non-empty list of experts ({source_model, positive_prompts})")
    if len(experts_raw) > MAX_EXPERTS:
        raise doc.error(("experts",), f"{len(experts_raw):,} experts (at most {MAX_EXPERTS})")
    experts = [_expert(doc, ("experts", i), e) for i, e in enumerate(experts_raw)]
    gate = data.get("gate_mode", "hidden")
    if gate not in GATE_MODES:
        hint = difflib.get_close_matches(str(gate), GATE_MODES, n=1)
        raise doc.error(("gate_mode",), f"unknown gate_mode {short(gate)} (one of {', '.join(GATE_MODES)})"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise doc.error(("experts_per_token",), f"expected an integer >= 1, got {short(k)}")
    if k > len(experts):
        raise doc.error(("experts_per_token",), f"experts_per_token is {k} but there are only {len(experts)} experts")
    shared_raw = data.get("shared_experts") or []
    if not isinstance(shared_raw, list):
        raise doc.error(("shared_experts",), "expected a list of experts")
    shared = [_expert(doc, ("shared_experts", i), e) for i, e in enumerate(shared_raw)]
    if len(shared) > 1:
        raise doc.error(("shared_experts",), "at most one shared expert is supported")
    if gate != "random":  # §3.2: uniform_random still needs prompts
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise doc.error(("experts", i), f"gate_mode {gate!r} needs positive_prompts for every expert "
                                "(only gate_mode: random works without prompts)")
        prompt_sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in experts}
        if len(experts) > 1 and len(prompt_sets) == 1:
            raise doc.error(("experts",), "every expert has the same prompts: the router could not tell them apart")
    dtype = data.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPE_NAMES):
        raise doc.error(("dtype",), f"unknown dtype {short(dtype)} (one of {', '.join(DTYPE_NAMES)})")
    arch = data.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not any(a.startswith(arch.lower()) for a in ARCHITECTURES)):
        raise doc.error(("architecture",),
                        f"unknown architecture {short(arch)} (a prefix of {', '.join(ARCHITECTURES)})")
    tok = data.get("tokenizer_source")
    if tok is not None:
        check_tokenizer_source(doc, ("tokenizer_source",), tok,
                               [base] + [e.source_model for e in experts + shared])
    if len({str(e.source_model) for e in experts}) == 1 and len(experts) > 1:
        warnings.append(f"{doc.file}: experts: every expert is the same model; this is only useful with training"
                        + ("" if gate == "random" else " (merge needs --i-understand-this-is-not-useful-without-training)"))
    hub_repo = data.get("hub_repo")
    return MoeConfig(doc.file, text, base, experts, gate, k, shared, dtype, arch,
                     hub_repo if isinstance(hub_repo, str) else None, warnings, doc=doc)
