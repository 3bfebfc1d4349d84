"""The merge config language (merge-semantics.md §1): parse, validate, normalise.

Everything here works on the YAML text alone (no models, no network, no torch), so `mergebot validate` can
run in PR checks. Every problem is a ConfigError naming the file, key path, line and reason.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mergebot.config.checks import check_method, check_static
from mergebot.config.methods import PLANNED, SPECS, closest
from mergebot.config.refs import ModelRef, parse_ref, unique
from mergebot.config.shared import kind_name, mapping, tokenizer_keys, unknown_keys
from mergebot.config.spec import DTYPE_NAMES, MethodSpec
from mergebot.config.yamlsafe import YamlDoc, load_yaml, read_text, short
from mergebot.errors import ConfigError

DTYPE_HINTS = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
               "fp64": "float64", "double": "float64"}
TOP_KEYS = ("merge_method", "models", "slices", "modules", "base_model", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "parameters", "name", "hub_repo")
MAX_LAYERS = 10_000  # a layer index, and the output layers of all slices together (real models: < 200)


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

    kind: ClassVar[str] = "merge"

    file: str
    text: str
    doc: YamlDoc
    method: MethodSpec | None  # None while the method's kernel has not landed (see `pending`)
    method_name: str
    slices: list[Slice]
    uses_models: bool
    base_model: ModelRef | None
    parameters: dict[str, Any]
    dtype: str | None  # a name of DTYPE_NAMES
    out_dtype: str | None
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
        return unique([ref for s in self.slices for ref in [src.model for src in s.sources] + [s.base_model]]
                      + [self.base_model])

    def label(self) -> str:
        return self.method_name

    def model_count(self) -> int:
        return len(self.referenced_models())

    def slice_inputs(self, s: Slice) -> tuple[list[Source], ModelRef | None]:
        """The inputs of one output slice in config order, the base marked (§1.2 step 2, §2.0)."""
        base = s.base_model or self.base_model
        sources = list(s.sources)
        if base is not None:
            matches = [src for src in sources if src.model == base]
            if matches:
                for src in sources:
                    src.is_base = False
                matches[0].is_base = True
            elif self.uses_models:
                sources.append(Source(base, None, {}, ("base_model",), is_base=True))
        return sources, base



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
                            + kind_name(data))
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
    method = SPECS.get(name)
    if method is None:
        if name in PLANNED:
            pending.append(f"merge_method {name!r}")
        else:
            hint = closest(name)
            raise doc.error(("merge_method",), f"unknown merge method {name!r}"
                            + (f"; did you mean {hint!r}?" if hint else f"; known: {', '.join(sorted(SPECS))}"))

    present = [k for k in ("models", "slices", "modules") if k in data]
    if len(present) != 1:
        if not present:
            raise doc.error((), "a config needs exactly one of 'models', 'slices' or 'modules'")
        raise doc.error((present[1],), f"use exactly one of 'models', 'slices' or 'modules', not both {present[0]!r} and {present[1]!r}")
    if "modules" in data:
        pending.append("'modules' (multi-module architectures)")

    base_model = parse_ref(doc, ("base_model",), data["base_model"]) if data.get("base_model") is not None else None
    parameters = mapping(doc, ("parameters",), data.get("parameters"))
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
    listed = [src.model for s in slices for src in s.sources] + [s.base_model for s in slices if s.base_model]
    names: list[ModelRef] | None = listed
    if "modules" in data:  # not parsed yet (pending): a tokenizer source cannot be checked against its models
        names = None
    else:
        names = listed + ([base_model] if base_model else [])
    tok_src, tok, chat = tokenizer_keys(doc, data, pending, names)
    hub_repo = data.get("hub_repo")
    if hub_repo is not None and (not isinstance(hub_repo, str) or hub_repo.count("/") != 1):
        raise doc.error(("hub_repo",), f"expected a Hub repo id 'owner/name', got {short(hub_repo)}")

    cfg = MergeConfig(file=file, text=text, doc=doc, method=method, method_name=name, slices=slices,
                      uses_models=uses_models, base_model=base_model, parameters=parameters, dtype=dtype,
                      out_dtype=out_dtype, tokenizer_source=tok_src, tokenizer=tok, chat_template=chat,
                      hub_repo=hub_repo, warnings=warnings, pending=pending)
    if method is not None:
        check_method(cfg)
        check_static(cfg)
    return cfg



def _dtype(doc: YamlDoc, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise doc.error((key,), f"expected a dtype name ({', '.join(DTYPE_NAMES)}), got {short(value)}")
    name = value.removeprefix("torch.")
    if name not in DTYPE_NAMES:
        hint = DTYPE_HINTS.get(name) or next(iter(difflib.get_close_matches(name, DTYPE_NAMES, n=1)), None)
        raise doc.error((key,), f"unknown dtype {value!r} (one of {', '.join(DTYPE_NAMES)})"
                        + (f"; did you mean {hint!r}?" if hint else ""))
    return name


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
    params = mapping(doc, path + ("parameters",), entry.get("parameters"))
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
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sources if src.layer_range}
        if len(lengths) > 1:
            raise doc.error(path + ("sources",), f"all sources of a slice must cover the same number of layers, got {sorted(lengths)}")
        sbase = parse_ref(doc, path + ("base_model",), s["base_model"]) if s.get("base_model") is not None else None
        out.append(Slice(sources, sbase, mapping(doc, path + ("parameters",), s.get("parameters")), path))
    return out


