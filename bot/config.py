"""The merge config language (merge-semantics.md §1): parse, validate, normalise.

Everything here works on the YAML text alone (no models, no network), so `mergebot validate` can run
in PR checks. Every problem is a ConfigError naming the file, key path, line and reason.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .methods import METHODS, PLANNED, closest
from .methods.base import MergeMethod, Param
from .params import check_setting
from .yamlsafe import YamlDoc, load_yaml

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
}
DTYPE_HINTS = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
               "fp64": "float64", "double": "float64"}

TOP_KEYS = ("merge_method", "models", "slices", "modules", "base_model", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "parameters", "name", "hub_repo")
BUILTIN_CHAT_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral", "exaone")


@dataclass(frozen=True)
class ModelRef:
    """`path[@revision][+lora[@revision]]` or the object form (§1.1)."""

    path: str
    revision: str | None = None
    lora: "ModelRef | None" = None
    override_architecture: str | None = None

    def __str__(self) -> str:
        s = self.path + (f"@{self.revision}" if self.revision else "")
        return s + (f"+{self.lora}" if self.lora else "")

    @property
    def base_key(self) -> tuple[str, str | None]:
        """Identity of the weights to load, without the LoRA."""
        return (self.path, self.revision)


@dataclass
class Source:
    """One input of an output slice: a model, an optional layer range, its own parameters."""

    model: ModelRef
    layer_range: tuple[int, int] | None
    parameters: dict[str, Any]
    path: tuple[Any, ...]  # key path in the YAML, for errors
    is_base: bool = False


@dataclass
class Slice:
    sources: list[Source]
    base_model: ModelRef | None
    parameters: dict[str, Any]
    path: tuple[Any, ...]


@dataclass
class MergeConfig:
    """A validated merge config. `slices` is the normalised form (§1.2); `models:` gives one slice."""

    file: str
    text: str
    doc: YamlDoc
    method: MergeMethod | None  # None while the method's issue has not landed (see `pending`)
    method_name: str
    slices: list[Slice]
    uses_models: bool
    base_model: ModelRef | None
    parameters: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: Any = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    hub_repo: str | None = None
    warnings: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # valid language the engine refuses for now

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def referenced_models(self) -> list[ModelRef]:
        """Every model, in config order, deduplicated (§5.8: config order, never hash order)."""
        seen: dict[str, ModelRef] = {}
        for s in self.slices:
            for src in s.sources:
                seen.setdefault(str(src.model), src.model)
            if s.base_model is not None:
                seen.setdefault(str(s.base_model), s.base_model)
        if self.base_model is not None:
            seen.setdefault(str(self.base_model), self.base_model)
        return list(seen.values())


# ---------------------------------------------------------------------------------------------- refs

def parse_ref_string(doc: YamlDoc, path: tuple[Any, ...], text: str) -> ModelRef:
    if not text.strip():
        raise doc.error(path, "empty model reference")
    parts = text.split("+")
    if len(parts) > 2:
        raise doc.error(path, f"model reference {text!r} has more than one '+' (expected path[@rev][+lora[@rev]])")

    def one(part: str) -> tuple[str, str | None]:
        bits = part.split("@")
        if len(bits) > 2:
            raise doc.error(path, f"model reference {text!r} has more than one '@' in {part!r}")
        if not bits[0].strip() or (len(bits) == 2 and not bits[1].strip()):
            raise doc.error(path, f"model reference {text!r}: empty path or revision")
        return bits[0].strip(), (bits[1].strip() if len(bits) == 2 else None)

    p, rev = one(parts[0])
    lora = None
    if len(parts) == 2:
        lp, lrev = one(parts[1])
        lora = ModelRef(lp, lrev)
    return ModelRef(p, rev, lora)


def parse_ref(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> ModelRef:
    """A model reference: string form, or {model|path, revision, lora, override_architecture}."""
    if isinstance(value, str):
        return parse_ref_string(doc, path, value)
    if isinstance(value, dict):
        known = {"model", "path", "revision", "lora", "override_architecture"}
        extra = set(value) - known
        if extra:
            raise doc.error(path + (sorted(extra)[0],), f"unknown key in a model reference (known: {', '.join(sorted(known))})")
        if "model" in value:
            inner = value["model"]
            if isinstance(inner, str):
                ref = parse_ref_string(doc, path + ("model",), inner)
            elif isinstance(inner, dict):
                ref = parse_ref(doc, path + ("model",), inner)
            else:
                raise doc.error(path + ("model",), f"expected a model path, got {inner!r}")
        elif "path" in value:
            if not isinstance(value["path"], str) or not value["path"].strip():
                raise doc.error(path + ("path",), "expected a non-empty string")
            rev = value.get("revision")
            if rev is not None and not isinstance(rev, str):
                raise doc.error(path + ("revision",), "expected a string (branch, tag or commit sha)")
            ref = ModelRef(value["path"].strip(), rev)
        else:
            raise doc.error(path, "a model reference needs 'model' or 'path'")
        lora = ref.lora
        if value.get("lora") is not None:
            lora = parse_ref(doc, path + ("lora",), value["lora"])
        arch = value.get("override_architecture")
        if arch is not None and not isinstance(arch, str):
            raise doc.error(path + ("override_architecture",), "expected an architecture name such as LlamaForCausalLM")
        return ModelRef(ref.path, ref.revision, lora, arch or ref.override_architecture)
    raise doc.error(path, f"expected a model reference (a Hub repo id or a local path), got {value!r}")


# ------------------------------------------------------------------------------------------- config

def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, None, f"cannot read: {e}") from None
    return parse_config(text, str(path))


def parse_config(text: str, file: str, doc: YamlDoc | None = None) -> MergeConfig:
    doc = doc or load_yaml(text, file)
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error((), "a merge config is a YAML mapping (merge_method:, models: or slices:, ...)")
    if "experts" in data:
        raise ConfigError(file, "experts", doc.line(("experts",)),
                          "this is a mergekit-moe config, not a merge config (bot.configfile.load reads both)")
    warnings: list[str] = []
    pending: list[str] = []
    for key in data:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            warnings.append(f"{file}: {key} (line {doc.line((key,))}): unknown top-level key, ignored"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    # merge_method
    if "merge_method" not in data:
        raise doc.error((), "missing required key 'merge_method'")
    name = data["merge_method"]
    if not isinstance(name, str):
        raise doc.error(("merge_method",), f"expected a method name, got {name!r}")
    method = METHODS.get(name)
    if method is None:
        if name in PLANNED:
            pending.append(f"merge_method {name!r}")
        else:
            hint = closest(name)
            raise doc.error(("merge_method",), f"unknown merge method {name!r}"
                            + (f"; did you mean {hint!r}?" if hint else f"; known: {', '.join(sorted(METHODS))}"))

    present = [k for k in ("models", "slices", "modules") if k in data]
    if len(present) != 1:
        if not present:
            raise doc.error((), "a config needs exactly one of 'models', 'slices' or 'modules'")
        raise doc.error((present[1],), f"use exactly one of 'models', 'slices' or 'modules', not both {present[0]!r} and {present[1]!r}")
    if "modules" in data:
        pending.append("'modules' (multi-module architectures)")

    base_model = parse_ref(doc, ("base_model",), data["base_model"]) if data.get("base_model") is not None else None
    parameters = _mapping(doc, ("parameters",), data.get("parameters"))
    dtype = _dtype(doc, "dtype", data.get("dtype"))
    out_dtype = _dtype(doc, "out_dtype", data.get("out_dtype"))

    slices: list[Slice] = []
    uses_models = "models" in data
    if uses_models:
        slices = [_models_slice(doc, data["models"], base_model)]
    elif "slices" in data:
        slices = _slices(doc, data["slices"], base_model)

    tok_src, tok, chat = _tokenizer_keys(doc, data, pending)
    hub_repo = data.get("hub_repo")
    if hub_repo is not None and (not isinstance(hub_repo, str) or hub_repo.count("/") != 1):
        raise doc.error(("hub_repo",), f"expected a Hub repo id 'owner/name', got {hub_repo!r}")

    cfg = MergeConfig(file=file, text=text, doc=doc, method=method, method_name=name, slices=slices,
                      uses_models=uses_models, base_model=base_model, parameters=parameters, dtype=dtype,
                      out_dtype=out_dtype, tokenizer_source=tok_src, tokenizer=tok, chat_template=chat,
                      hub_repo=hub_repo, warnings=warnings, pending=pending)
    if method is not None:
        _check_method(cfg)
    return cfg


def _mapping(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a mapping of parameter names to values, got {value!r}")
    return value


def _dtype(doc: YamlDoc, key: str, value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise doc.error((key,), f"expected a dtype name ({', '.join(DTYPES)}), got {value!r}")
    name = value.removeprefix("torch.")
    if name not in DTYPES:
        hint = DTYPE_HINTS.get(name) or next(iter(difflib.get_close_matches(name, DTYPES, n=1)), None)
        raise doc.error((key,), f"unknown dtype {value!r} (one of {', '.join(DTYPES)})"
                        + (f"; did you mean {hint!r}?" if hint else ""))
    return DTYPES[name]


def _source(doc: YamlDoc, path: tuple[Any, ...], entry: Any, with_range: bool) -> Source:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        raise doc.error(path, f"expected a mapping with a 'model' key, got {entry!r}")
    if "model" not in entry:
        raise doc.error(path, "missing required key 'model'")
    allowed = {"model", "parameters"} | ({"layer_range"} if with_range else set())
    for key in entry:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            raise doc.error(path + (key,), f"unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    ref = parse_ref(doc, path + ("model",), entry["model"])
    layer_range = None
    if with_range:
        if "layer_range" not in entry:
            raise doc.error(path, "missing required key 'layer_range' ([start, end), end exclusive)")
        lr = entry["layer_range"]
        if (not isinstance(lr, list) or len(lr) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)):
            raise doc.error(path + ("layer_range",), f"expected [start, end] integers, got {lr!r}")
        if lr[0] < 0 or lr[1] <= lr[0]:
            raise doc.error(path + ("layer_range",), f"layer_range {lr} is empty or reversed (need 0 <= start < end; end is exclusive)")
        layer_range = (lr[0], lr[1])
    params = _mapping(doc, path + ("parameters",), entry.get("parameters"))
    return Source(ref, layer_range, params, path)


def _models_slice(doc: YamlDoc, models: Any, base: ModelRef | None) -> Slice:
    if not isinstance(models, list) or not models:
        raise doc.error(("models",), "expected a non-empty list of {model: ..., parameters: ...}")
    sources = [_source(doc, ("models", i), m, with_range=False) for i, m in enumerate(models)]
    return Slice(sources, None, {}, ("models",))


def _slices(doc: YamlDoc, slices: Any, base: ModelRef | None) -> list[Slice]:
    if not isinstance(slices, list) or not slices:
        raise doc.error(("slices",), "expected a non-empty list of {sources: [...]}")
    out = []
    for i, s in enumerate(slices):
        path = ("slices", i)
        if not isinstance(s, dict):
            raise doc.error(path, "expected a mapping with 'sources'")
        for key in s:
            if key not in ("sources", "base_model", "parameters", "residual_weight"):
                raise doc.error(path + (key,), f"unknown key {key!r} in a slice (sources, base_model, parameters)")
        srcs = s.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise doc.error(path + ("sources",), "expected a non-empty list of {model, layer_range}")
        sources = [_source(doc, path + ("sources", j), e, with_range=True) for j, e in enumerate(srcs)]
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
        if len(lengths) > 1:
            raise doc.error(path + ("sources",), f"all sources of a slice must cover the same number of layers, got {sorted(lengths)}")
        sbase = parse_ref(doc, path + ("base_model",), s["base_model"]) if s.get("base_model") is not None else None
        out.append(Slice(sources, sbase, _mapping(doc, path + ("parameters",), s.get("parameters")), path))
    return out


def _tokenizer_keys(doc: YamlDoc, data: dict[str, Any], pending: list[str]) -> tuple[Any, Any, Any]:
    tok_src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    chat = data.get("chat_template")
    if tok_src is not None and tok is not None:
        raise doc.error(("tokenizer",), "use either 'tokenizer_source' (legacy) or 'tokenizer:', not both")
    if tok_src is not None:
        if not isinstance(tok_src, str):
            raise doc.error(("tokenizer_source",), f"expected 'union', 'base' or a model reference, got {tok_src!r}")
        if tok_src not in ("union", "base"):
            parse_ref(doc, ("tokenizer_source",), tok_src.removeprefix("model:"))
    if tok is not None:
        if not isinstance(tok, dict):
            raise doc.error(("tokenizer",), "expected a mapping {source, tokens, pad_to_multiple_of}")
        for key in tok:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                raise doc.error(("tokenizer", key), "unknown key (source, tokens, pad_to_multiple_of)")
        src = tok.get("source", "union")
        if not isinstance(src, str):
            raise doc.error(("tokenizer", "source"), "expected 'union', 'base' or a model reference")
        if src not in ("union", "base"):
            parse_ref(doc, ("tokenizer", "source"), src)
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise doc.error(("tokenizer", "pad_to_multiple_of"), f"expected a positive integer, got {pad!r}")
        tokens = tok.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, dict):
                raise doc.error(("tokenizer", "tokens"), "expected a mapping of token strings to {source, force}")
            for name, spec in tokens.items():
                p = ("tokenizer", "tokens", name)
                if not isinstance(spec, dict):
                    raise doc.error(p, "expected {source: ..., force: bool}")
                if "force" in spec and not isinstance(spec["force"], bool):
                    raise doc.error(p + ("force",), "expected true or false")
                s = spec.get("source")
                if isinstance(s, dict):
                    kind = s.get("kind")
                    if kind not in ("model_token", "zero"):
                        raise doc.error(p + ("source", "kind"), f"expected 'model_token' or 'zero', got {kind!r}")
                    if kind == "model_token":
                        if "model" not in s:
                            raise doc.error(p + ("source",), "model_token needs 'model'")
                        if ("token_id" in s) == ("token" in s):
                            raise doc.error(p + ("source",), "model_token needs exactly one of 'token_id' and 'token'")
                elif s is not None and not isinstance(s, str):
                    raise doc.error(p + ("source",), "expected a model reference or {kind: ...}")
    if chat is not None:
        if not isinstance(chat, str) or not chat.strip():
            raise doc.error(("chat_template",), "expected 'auto', a built-in name or a Jinja template string")
        if chat != "auto" and chat not in BUILTIN_CHAT_TEMPLATES and (len(chat) < 20 or "{" not in chat):
            raise doc.error(("chat_template",), f"invalid chat template {chat!r}: not 'auto', not a built-in "
                            f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) and not a Jinja template")
    return tok_src, tok, chat


# --------------------------------------------------------------------------------- method contract

def slice_inputs(cfg: MergeConfig, s: Slice) -> tuple[list[Source], ModelRef | None]:
    """The inputs of one output slice in config order, the base marked (§1.2 step 2, §2.0)."""
    base = s.base_model or cfg.base_model
    sources = list(s.sources)
    if base is not None:
        matches = [src for src in sources if src.model == base]
        if matches:
            for src in sources:
                src.is_base = False
            matches[0].is_base = True
        elif cfg.uses_models:
            sources.append(Source(base, None, {}, ("base_model",), is_base=True))
    return sources, base


def _check_method(cfg: MergeConfig) -> None:
    method = cfg.method
    assert method is not None
    doc = cfg.doc
    declared = {p.name: p for p in method.params}
    _check_params_block(cfg, ("parameters",), cfg.parameters, declared)
    for s in cfg.slices:
        sources, base = slice_inputs(cfg, s)
        where = s.path if not cfg.uses_models else ("models",)
        if method.base == "required" and base is None:
            raise doc.error(where if cfg.uses_models else s.path,
                            f"merge_method {method.name!r} needs a base_model (none given)")
        if method.base == "required" and not cfg.uses_models and base is not None \
                and not any(src.is_base for src in sources):
            raise doc.error(s.path + ("sources",), f"base_model {base} is not among this slice's sources")
        n = len(sources)
        non_base = [src for src in sources if not src.is_base]
        if method.name == "slerp" and (n != 2 or len(non_base) != 1):
            raise doc.error(where, f"slerp needs exactly two models, the base_model and one other; got {n} input(s)"
                            + (" (the base is listed too)" if n > 2 else ""))
        if n < method.min_inputs:
            raise doc.error(where, f"{method.name} needs at least {method.min_inputs} input model(s), got {n}")
        if method.max_inputs is not None and n > method.max_inputs:
            raise doc.error(where, f"{method.name} takes at most {method.max_inputs} input model(s) per slice, got {n}")
        if len(non_base) < method.min_non_base:
            raise doc.error(where, f"{method.name} needs at least {method.min_non_base} model(s) besides the base")
        if method.max_non_base is not None and len(non_base) > method.max_non_base:
            raise doc.error(where, f"{method.name} takes at most {method.max_non_base} model(s) besides the base")
        if base is not None:
            dups = [src for src in non_base if src.model == base]
            for d in dups:
                cfg.warnings.append(
                    f"{cfg.file}: {_kp(d.path)}: lists the base model {base} again; as a task vector it is zero, "
                    "so this entry changes nothing (mergekit 0.1.5 rejects this config; older versions ran it)")
        _check_params_block(cfg, s.path + ("parameters",), s.parameters, declared)
        for src in sources:
            _check_params_block(cfg, src.path + ("parameters",), src.parameters, declared)
        # Required parameters must be set somewhere for the inputs that need them (§1.3 precedence).
        for p in method.params:
            if not p.required:
                continue
            if p.scope == "shared":
                if p.name not in s.parameters and p.name not in cfg.parameters:
                    raise doc.error(s.path if not cfg.uses_models else ("parameters",),
                                    f"{method.name} needs parameter {p.name!r} (set it under parameters:)")
                continue
            for src in sources:
                if p.scope == "non_base" and src.is_base:
                    continue
                if p.name not in src.parameters and p.name not in s.parameters and p.name not in cfg.parameters:
                    who = "the base model" if src.is_base else f"model {src.model}"
                    raise doc.error(src.path, f"{method.name} needs parameter {p.name!r} for {who} "
                                    "(set it in this entry's parameters: or in the top-level parameters:)")


def _check_params_block(cfg: MergeConfig, path: tuple[Any, ...], block: dict[str, Any],
                        declared: dict[str, Param]) -> None:
    for name, value in block.items():
        param = declared.get(name)
        if param is None:
            hint = difflib.get_close_matches(str(name), declared, n=1)
            msg = (f"{cfg.file}: {_kp(path + (name,))} (line {cfg.doc.line(path + (name,))}): parameter {name!r} is "
                   f"not used by {cfg.method_name}, ignored" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            if msg not in cfg.warnings:
                cfg.warnings.append(msg)
            continue
        check_setting(cfg.doc, path + (name,), value, param)


def _kp(path: tuple[Any, ...]) -> str:
    from .yamlsafe import keypath
    return keypath(path)
