"""The merge config language (merge-semantics.md §1): parse, validate, normalise.

Everything here works on the YAML text alone (no models, no network), so `mergebot validate` can run
in PR checks. Every problem is a ConfigError naming the file, key path, line and reason.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebot.errors import ConfigError, ModelError
from mergebot.engine.methods import METHODS, PLANNED, closest
from mergebot.engine.methods.base import REQUIRED, MergeMethod, Param
from mergebot.config.params import UNKNOWN, check_setting, static_value
from mergebot.config.yamlsafe import YamlDoc, keypath, load_yaml, read_text, short

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
MAX_LAYERS = 10_000  # a layer index, and the output layers of all slices together (real models: < 200)
MAX_PAD_MULTIPLE = 1024  # tokenizer.pad_to_multiple_of: real values are 8 to 256; 1e12 would allocate terabytes
WEIGHT_SUM_EPS = 1e-8  # |Σw| below this cannot be divided by (mergekit's own guard, §2.7 step 5)
MAX_REF_CHARS = 4096  # a model reference (a path is at most 4096 bytes on Linux)
MAX_WARNINGS = 50  # per config: 20,000 unknown keys must not print 20,000 lines


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

def _plain_text(doc: YamlDoc, path: tuple[Any, ...], text: str, what: str) -> None:
    """Names that end up in paths, URLs and one-line messages: printable and of sane length."""
    if len(text) > MAX_REF_CHARS:
        raise doc.error(path, f"{what} of {len(text):,} characters is too long (at most {MAX_REF_CHARS:,})")
    if not text.isprintable():
        raise doc.error(path, f"{what} {short(text)} contains a control or non-printing character")


def parse_ref_string(doc: YamlDoc, path: tuple[Any, ...], text: str) -> ModelRef:
    _plain_text(doc, path, text, "model reference")
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
            raise doc.error(path + (min(extra, key=str),),
                            f"unknown key in a model reference (known: {', '.join(sorted(known))})")
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
            _plain_text(doc, path + ("path",), value["path"], "model path")
            rev = value.get("revision")
            if rev is not None and not isinstance(rev, str):
                raise doc.error(path + ("revision",), "expected a string (branch, tag or commit sha)")
            if rev is not None:
                _plain_text(doc, path + ("revision",), rev, "revision")
            ref = ModelRef(value["path"].strip(), rev)
        else:
            raise doc.error(path, "a model reference needs 'model' or 'path'")
        lora = ref.lora
        if value.get("lora") is not None:
            lora = parse_ref(doc, path + ("lora",), value["lora"])
        arch = value.get("override_architecture")
        if arch is not None and (not isinstance(arch, str) or not arch.isidentifier()):
            raise doc.error(path + ("override_architecture",), "expected an architecture name such as LlamaForCausalLM")
        return ModelRef(ref.path, ref.revision, lora, arch or ref.override_architecture)
    raise doc.error(path, f"expected a model reference (a Hub repo id or a local path), got {value!r}")


# ------------------------------------------------------------------------------------------- config

def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge config file (bounded read, strict UTF-8: mergebot.config.yamlsafe)."""
    return parse_config(read_text(path), str(path))


def parse_config(text: str, file: str, doc: YamlDoc | None = None) -> MergeConfig:
    doc = doc or load_yaml(text, file)
    data = doc.data
    if data is None:
        raise doc.error((), "empty config: a merge config is a YAML mapping (merge_method:, models: or slices:, ...)")
    if not isinstance(data, dict):
        raise doc.error((), "a merge config is a YAML mapping (merge_method:, models: or slices:, ...), got a "
                            + _kind(data))
    if "experts" in data:
        raise ConfigError(file, "experts", doc.line(("experts",)),
                          "this is a mergekit-moe config, not a merge config (mergebot.config.configfile.load reads both)")
    warnings: list[str] = []
    pending: list[str] = []
    unknown_keys(doc, TOP_KEYS, warnings)

    # merge_method
    if "merge_method" not in data:
        raise doc.error((), "missing required key 'merge_method'")
    name = data["merge_method"]
    if not isinstance(name, str):
        raise doc.error(("merge_method",), f"expected a method name, got {short(name)}")
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

    if slices and sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices
                      if s.sources[0].layer_range) > MAX_LAYERS:
        raise doc.error(("slices",), f"the slices make more than {MAX_LAYERS:,} output layers")
    names: list[ModelRef] | None = [src.model for s in slices for src in s.sources]
    names += [s.base_model for s in slices if s.base_model]
    if "modules" in data:  # not parsed yet (pending): a tokenizer source cannot be checked against its models
        names = None
    else:
        names += [base_model] if base_model else []
    tok_src, tok, chat = _tokenizer_keys(doc, data, pending, names)
    hub_repo = data.get("hub_repo")
    if hub_repo is not None and (not isinstance(hub_repo, str) or hub_repo.count("/") != 1):
        raise doc.error(("hub_repo",), f"expected a Hub repo id 'owner/name', got {short(hub_repo)}")

    cfg = MergeConfig(file=file, text=text, doc=doc, method=method, method_name=name, slices=slices,
                      uses_models=uses_models, base_model=base_model, parameters=parameters, dtype=dtype,
                      out_dtype=out_dtype, tokenizer_source=tok_src, tokenizer=tok, chat_template=chat,
                      hub_repo=hub_repo, warnings=warnings, pending=pending)
    if method is not None:
        _check_method(cfg)
        _check_static(cfg)
    return cfg


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value),
                                                                                            type(value).__name__)


def warnings_full(warnings: list[str], file: str) -> bool:
    """True once MAX_WARNINGS are held (callers stop building messages); the first time, one line says so."""
    if len(warnings) < MAX_WARNINGS:
        return False
    if len(warnings) == MAX_WARNINGS:
        warnings.append(f"{file}: more warnings not shown")
    return True


def add_warning(warnings: list[str], file: str, msg: str) -> None:
    """Append `msg` once, up to MAX_WARNINGS."""
    if not warnings_full(warnings, file) and msg not in warnings:
        warnings.append(msg)


def unknown_keys(doc: YamlDoc, known: tuple[str, ...], warnings: list[str]) -> None:
    """A warning per unknown top-level key (mergekit ignores them), with a hint when one is close."""
    for key in doc.data:
        if key in known:
            continue
        if warnings_full(warnings, doc.file):
            return
        hint = difflib.get_close_matches(str(key), known, n=1)
        add_warning(warnings, doc.file, f"{doc.file}: {keypath((key,))} (line {doc.line((key,))}): unknown "
                    "top-level key, ignored" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _mapping(doc: YamlDoc, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a mapping of parameter names to values, got {short(value)}")
    return value


def _dtype(doc: YamlDoc, key: str, value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise doc.error((key,), f"expected a dtype name ({', '.join(DTYPES)}), got {short(value)}")
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
        raise doc.error(path, f"expected a mapping with a 'model' key, got {short(entry)}")
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
            raise doc.error(path + ("layer_range",), f"expected [start, end] integers, got {short(lr)}")
        if lr[0] < 0 or lr[1] <= lr[0]:
            raise doc.error(path + ("layer_range",), f"layer_range {lr} is empty or reversed (need 0 <= start < end; end is exclusive)")
        if lr[1] > MAX_LAYERS:
            raise doc.error(path + ("layer_range",), f"layer_range {lr} is out of bounds: no model has more than "
                                                     f"{MAX_LAYERS:,} layers")
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


def check_tokenizer_source(doc: YamlDoc, path: tuple[Any, ...], value: Any, models: list[ModelRef] | None) -> None:
    """`base`, `union` or one of the config's own models (legacy `model:` prefix allowed); `models` None: not
    known yet (a `modules:` config), only the reference syntax is checked.

    mergekit takes any other string for a Hub repo id and fails only while merging (`unoin`), or fetches the
    tokenizer of a model the merge does not use; here it is a one-line error at validate time, with a hint when
    the value is close to a valid choice."""
    if not isinstance(value, str):
        raise doc.error(path, f"expected 'union', 'base' or one of the config's models, got {short(value)}")
    if value in ("union", "base"):
        return
    ref = parse_ref(doc, path, value.removeprefix("model:"))
    if models is None:
        return
    known = {m.path: m for m in models}
    if ref.path in known or os.path.normpath(ref.path) in {os.path.normpath(p) for p in known}:
        return
    choices = ["union", "base", *known]
    hint = difflib.get_close_matches(value.removeprefix("model:"), choices, n=1, cutoff=0.6)
    listed = ", ".join(repr(c) for c in choices[:6]) + (", ..." if len(choices) > 6 else "")
    raise doc.error(path, f"tokenizer source {short(value)} is neither 'base', 'union' nor one of this config's "
                          "models" + (f"; did you mean {hint[0]!r}?" if hint else f" ({listed})"))


def _tokenizer_keys(doc: YamlDoc, data: dict[str, Any], pending: list[str],
                    models: list[ModelRef] | None) -> tuple[Any, Any, Any]:
    tok_src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    chat = data.get("chat_template")
    if tok_src is not None and tok is not None:
        raise doc.error(("tokenizer",), "use either 'tokenizer_source' (legacy) or 'tokenizer:', not both")
    if tok_src is not None:
        check_tokenizer_source(doc, ("tokenizer_source",), tok_src, models)
    if tok is not None:
        if not isinstance(tok, dict):
            raise doc.error(("tokenizer",), "expected a mapping {source, tokens, pad_to_multiple_of}")
        for key in tok:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                raise doc.error(("tokenizer", key), "unknown key (source, tokens, pad_to_multiple_of)")
        check_tokenizer_source(doc, ("tokenizer", "source"), tok.get("source", "union"), models)
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise doc.error(("tokenizer", "pad_to_multiple_of"), f"expected a positive integer, got {short(pad)}")
        if pad is not None and pad > MAX_PAD_MULTIPLE:
            raise doc.error(("tokenizer", "pad_to_multiple_of"), f"pad_to_multiple_of {pad} is too large (at most "
                            f"{MAX_PAD_MULTIPLE}; the vocabulary is padded up to a multiple of it)")
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
                        tid = s.get("token_id")
                        if "token_id" in s and (not isinstance(tid, int) or isinstance(tid, bool)
                                                or not 0 <= tid < 1 << 31):
                            raise doc.error(p + ("source", "token_id"),
                                            f"expected a token id (an integer from 0 to 2^31 - 1), got {short(tid)}")
                elif s is not None and not isinstance(s, str):
                    raise doc.error(p + ("source",), "expected a model reference or {kind: ...}")
    if chat is not None:
        if not isinstance(chat, str) or not chat.strip():
            raise doc.error(("chat_template",), "expected 'auto', a built-in name or a Jinja template string")
        if chat != "auto" and chat not in BUILTIN_CHAT_TEMPLATES and (len(chat) < 20 or "{" not in chat):
            raise doc.error(("chat_template",), f"invalid chat template {short(chat)}: not 'auto', not a built-in "
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
                add_warning(cfg.warnings, cfg.file,
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
            if warnings_full(cfg.warnings, cfg.file):
                continue
            hint = difflib.get_close_matches(str(name), declared, n=1)
            add_warning(cfg.warnings, cfg.file,
                        f"{cfg.file}: {_kp(path + (name,))} (line {cfg.doc.line(path + (name,))}): parameter "
                        f"{short(name)} is not used by {cfg.method_name}, ignored"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            continue
        check_setting(cfg.doc, path + (name,), value, param)


def _kp(path: tuple[Any, ...]) -> str:
    from mergebot.config.yamlsafe import keypath
    return keypath(path)


# ------------------------------------------------------------------------------ numbers at validate time

def _static(cfg: MergeConfig, scopes: list[tuple[dict[str, Any], tuple[Any, ...]]], param: Param,
            t: float) -> tuple[Any, tuple[Any, ...] | None]:
    """(value, key path that set it) of `param` at t for every tensor, by §1.3 precedence; (UNKNOWN, path)
    when a filter makes it depend on the tensor, (default, None) when no scope sets it."""
    for block, path in scopes:
        if param.name in block:
            v = static_value(block[param.name], t, param.type)
            if v is UNKNOWN:
                return UNKNOWN, path + (param.name,)
            if v is not None:
                return v, path + (param.name,)
    return (UNKNOWN if param.default is REQUIRED else param.default), None


def _points(cfg: MergeConfig, i: int, s: Slice) -> list[float]:
    """Interpolation positions certainly evaluated for slice i (§1.3): its last layer (t = 1) always; t = 0 for
    its first layer when it has two or more, and for the embeddings and final norm (first and last slice)."""
    lr = s.sources[0].layer_range
    layers = lr[1] - lr[0] if lr else 2
    return [0.0, 1.0] if (cfg.uses_models or layers >= 2 or i in (0, len(cfg.slices) - 1)) else [1.0]


def _check_static(cfg: MergeConfig) -> None:
    """What the numbers alone decide, before any model is read: a weight sum that normalisation would divide
    by zero, and the method's own per-input checks (della's density ± epsilon). Only values that do not depend
    on the tensor name are known here; the planner checks the rest per tensor (`extra["validate"]`)."""
    method = cfg.method
    assert method is not None
    top = [(cfg.parameters, ("parameters",))]
    hook = method.extra.get("validate")
    for i, s in enumerate(cfg.slices):
        sources, _ = slice_inputs(cfg, s)
        shared_scopes = [(s.parameters, s.path + ("parameters",))] + top
        for t in _points(cfg, i, s):
            shared = {}
            for p in method.params:
                if p.scope == "shared":
                    v, _ = _static(cfg, shared_scopes, p, t)
                    if v is not UNKNOWN:
                        shared[p.name] = v
            rows: list[tuple[Source, dict[str, Any], dict[str, tuple[Any, ...] | None]]] = []
            for src in sources:
                scopes = [(src.parameters, src.path + ("parameters",))] + shared_scopes
                values: dict[str, Any] = {}
                paths: dict[str, tuple[Any, ...] | None] = {}
                for p in method.params:
                    if p.scope == "shared" or (p.scope == "non_base" and src.is_base):
                        continue
                    v, where = _static(cfg, scopes, p, t)
                    values[p.name] = None if v is UNKNOWN else v  # None: a hook cannot know it here
                    paths[p.name] = where
                rows.append((src, values, paths))
            _check_weight_sum(cfg, s, t, shared, rows)
            if hook is not None:
                _run_hook(cfg, s, t, hook, shared, rows)


def _run_hook(cfg: MergeConfig, s: Slice, t: float, hook: Any, shared: dict[str, Any],
              rows: list[tuple[Source, dict[str, Any], dict[str, Any]]]) -> None:
    """The method's own check on what the config decides; the error points at the input that fails alone,
    else at the slice."""
    models = [str(r[0].model) for r in rows]
    try:
        hook("", shared, [r[1] for r in rows], models=models)
        return
    except ModelError as e:
        error = e
    where: tuple[Any, ...] = s.path if not cfg.uses_models else ("models",)
    paths: dict[str, Any] = {}
    for j, (src, values, own) in enumerate(rows):
        alone: list[dict[str, Any]] = [{} for _ in rows]
        alone[j] = values
        try:
            hook("", shared, alone, models=models)
        except ModelError as e:
            error, paths = e, own
            # the most specific key the message names (a model's own density before a global epsilon)
            named = [w for name, w in own.items() if w is not None and name in str(e)]
            where = max(named, key=len) if named else src.path
            break
    raise cfg.doc.error(where, str(error) + _at(cfg, t, paths)) from None


def _at(cfg: MergeConfig, t: float, paths: dict[str, Any]) -> str:
    """Where a gradient was read, when one was: the first or the last layer."""
    if not any(w is not None and isinstance(_value_at(cfg, w), list) for w in paths.values()):
        return ""
    return " (at the first layer, t = 0)" if t == 0 else " (at the last layer, t = 1)"


def _value_at(cfg: MergeConfig, path: tuple[Any, ...]) -> Any:
    node: Any = cfg.doc.data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _check_weight_sum(cfg: MergeConfig, s: Slice, t: float, shared: dict[str, Any],
                      rows: list[tuple[Source, dict[str, Any], dict[str, Any]]]) -> None:
    """Normalisation divides by Σw (§2.1 linear, §2.4 multislerp): a sum of zero gives inf/NaN tensors, so it
    is refused. The task-arithmetic family without consensus skips the division when |Σw| < 1e-8 (§2.7 step 5):
    legal, but rarely what was meant, so a warning."""
    method = cfg.method
    assert method is not None
    name = method.name
    if name == "linear":
        normalize, inputs = shared.get("normalize"), rows
    elif name == "multislerp":
        normalize, inputs = shared.get("normalize_weights"), [r for r in rows if not r[0].is_base]
        if len(inputs) < 2:  # a single model is returned as it is
            return
    elif method.param("lambda") is not None and method.param("normalize") is not None:
        preset = method.extra.get("preset")
        consensus = preset.consensus if preset is not None else method.extra.get("consensus")
        if consensus is not None:  # per element, and a zero divisor becomes 1 (§2.7 step 4)
            return
        normalize, inputs = shared.get("normalize"), [r for r in rows if not r[0].is_base]
    else:
        return
    if normalize is not True or not inputs or any(r[1].get("weight") is None for r in inputs):
        return
    weights = [float(r[1]["weight"]) for r in inputs]
    total = math.fsum(weights)
    if abs(total) >= WEIGHT_SUM_EPS:
        return
    paths = {f"w{k}": r[2]["weight"] for k, r in enumerate(inputs)}
    where = next((w for w in paths.values() if w is not None), s.path)
    listed = ", ".join(f"{w:g}" for w in weights)
    if name in ("linear", "multislerp"):
        key = "normalize" if name == "linear" else "normalize_weights"
        raise cfg.doc.error(where, f"{name}: the weights ({listed}) sum to {total:g}{_at(cfg, t, paths)}, and "
                                   f"{key}: true divides by that sum (every tensor would be inf or NaN); use "
                                   f"weights that do not cancel, or set {key}: false")
    msg = (f"{cfg.file}: {keypath(where)} (line {cfg.doc.line(where)}): the weights ({listed}) sum to {total:g}"
           f"{_at(cfg, t, paths)}, so normalize: true is skipped ({name} divides by 1 when |sum| < 1e-8)")
    add_warning(cfg.warnings, cfg.file, msg)
