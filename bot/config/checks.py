"""The method's contract, checked on the config alone (merge-semantics.md §1.3, §2.0): base model, input
counts, required and known parameters, and the numbers the config decides for every tensor (a weight sum
that normalisation would divide by zero, the method's own checks such as della's density ± epsilon).

Only values that do not depend on the tensor name are known here; the planner checks the rest per tensor
(`MethodSpec.validate`).
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any

from mergebot.config.params import UNKNOWN, check_setting, static_value
from mergebot.config.shared import add_warning, warnings_full
from mergebot.config.spec import REQUIRED, Check, Param
from mergebot.config.yamlsafe import keypath, short
from mergebot.errors import ModelError

if TYPE_CHECKING:  # annotations only: mergebot.config.dense calls `check_method` when it has built a config
    from mergebot.config.dense import MergeConfig, Slice, Source

WEIGHT_SUM_EPS = 1e-8  # |Σw| below this cannot be divided by (mergekit's own guard, §2.7 step 5)


# --------------------------------------------------------------------------------- method contract

def check_method(cfg: MergeConfig) -> None:
    """The method's contract: base, input counts, declared and required parameters (§1.3, §2.0)."""
    method = cfg.method
    assert method is not None
    doc = cfg.doc
    declared = {p.name: p for p in method.params}
    _check_params_block(cfg, ("parameters",), cfg.parameters, declared)
    for s in cfg.slices:
        sources, base = cfg.slice_inputs(s)
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
                    f"{cfg.file}: {keypath(d.path)}: lists the base model {base} again; as a task vector it is zero, "
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
                        f"{cfg.file}: {keypath(path + (name,))} (line {cfg.doc.line(path + (name,))}): parameter "
                        f"{short(name)} is not used by {cfg.method_name}, ignored"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            continue
        check_setting(cfg.doc, path + (name,), value, param)


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


def check_static(cfg: MergeConfig) -> None:
    """What the numbers alone decide, before any model is read: a weight sum that normalisation would divide
    by zero, and the method's own per-input checks (della's density ± epsilon). Only values that do not depend
    on the tensor name are known here; the planner checks the rest per tensor (`MethodSpec.validate`)."""
    method = cfg.method
    assert method is not None
    top = [(cfg.parameters, ("parameters",))]
    hook = method.validate
    for i, s in enumerate(cfg.slices):
        sources, _ = cfg.slice_inputs(s)
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


def _run_hook(cfg: MergeConfig, s: Slice, t: float, hook: Check, shared: dict[str, Any],
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
    elif method.family is not None:
        if method.family.consensus:  # per element, and a zero divisor becomes 1 (§2.7 step 4)
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
