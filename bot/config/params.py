"""Parameter values (merge-semantics.md §1.3): scalars, gradients, filter conditionals, precedence.

`check_setting` validates a raw YAML value against a declared Param when the config is read (type, declared
bounds, finiteness and a sane magnitude, gradient length); `evaluate` resolves it for one tensor at interpolation
position t; `static_value` resolves it at t for every tensor at once, when filters do not make it depend on the
tensor name (what `mergebot validate` can check without models).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from mergebot.config.spec import Param
from mergebot.config.yamlsafe import YamlDoc, short

# Numbers no merge needs, refused when the config is read: a weight of 1e300 overflows every tensor, an
# integer beyond this loops or allocates without end. Parameters with declared bounds use those instead.
MAX_MAGNITUDE = 1e6
MAX_GRADIENT = 1024  # values in one gradient (one per layer is already more than anyone writes)
MAX_CONDITIONALS = 1024  # {filter, value} entries in one list
UNKNOWN = object()  # static_value: depends on the tensor name

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ValueTypeError(ValueError):
    pass


def coerce(value: Any, ptype: type) -> Any:
    """Lax validation as pydantic does it: '1e-5' is a float, 1 is a bool, 2.7 is not an int."""
    if ptype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueTypeError(f"expected a boolean, got {short(value)}")
    if ptype is float:
        if isinstance(value, bool):
            raise ValueTypeError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:
                raise ValueTypeError("number too large") from None
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        raise ValueTypeError(f"expected a number, got {short(value)}")
    if ptype is int:
        if isinstance(value, bool):
            raise ValueTypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and len(value) <= 40:  # int() of thousands of digits raises (or is slow)
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueTypeError(f"expected an integer, got {short(value)}")
    if ptype is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueTypeError(f"expected a string, got {short(value)}")
    raise TypeError(ptype)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def _is_conditional(v: Any) -> bool:
    return isinstance(v, dict) and "value" in v


def check_setting(doc: YamlDoc, path: tuple[Any, ...], value: Any, param: Param) -> None:
    """Raise a ConfigError (file, key path, line) if `value` cannot be a setting of `param`."""
    if isinstance(value, dict):
        _check_conditional(doc, path, value, param)
        return
    if isinstance(value, list):
        if not value:
            return  # an empty list means "not set here"
        if all(_is_conditional(v) for v in value):
            if len(value) > MAX_CONDITIONALS:
                raise doc.error(path, f"{param.name}: {len(value)} conditionals (at most {MAX_CONDITIONALS})")
            for i, v in enumerate(value):
                _check_conditional(doc, path + (i,), v, param)
            return
        _check_length(doc, path, value, param)
        for i, v in enumerate(value):
            if isinstance(v, dict):
                raise doc.error(path + (i,), "a list mixes conditionals ({filter, value}) and plain values")
            _check_scalar(doc, path + (i,), v, param)
        return
    _check_scalar(doc, path, value, param)


def _check_conditional(doc: YamlDoc, path: tuple[Any, ...], cond: dict[str, Any], param: Param) -> None:
    unknown = set(cond) - {"filter", "value"}
    if unknown:
        raise doc.error(path + (min(unknown, key=str),), "a conditional has only 'filter' and 'value' keys")
    if "value" not in cond:
        raise doc.error(path, "a conditional needs a 'value'")
    flt = cond.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise doc.error(path + ("filter",), f"filter must be a string (a substring of tensor names), got {flt!r}")
    value = cond["value"]
    if isinstance(value, list):
        if not value:
            raise doc.error(path + ("value",), "an empty gradient")
        _check_length(doc, path + ("value",), value, param)
        for i, v in enumerate(value):
            _check_scalar(doc, path + ("value", i), v, param)
    elif isinstance(value, dict):
        raise doc.error(path + ("value",), "a conditional's value must be a scalar or a gradient list")
    else:
        _check_scalar(doc, path + ("value",), value, param)


def _check_length(doc: YamlDoc, path: tuple[Any, ...], value: list[Any], param: Param) -> None:
    if len(value) > MAX_GRADIENT:
        raise doc.error(path, f"{param.name}: a gradient of {len(value):,} values (at most {MAX_GRADIENT}: values "
                              "are spread over the layers)")


def _check_scalar(doc: YamlDoc, path: tuple[Any, ...], value: Any, param: Param) -> None:
    if not _is_scalar(value):
        raise doc.error(path, f"{param.name}: expected a scalar, got {short(value)}")
    try:
        v = coerce(value, param.type)
    except ValueTypeError as e:
        raise doc.error(path, f"{param.name}: {e}") from None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and not math.isfinite(v):
            raise doc.error(path, f"{param.name} must be a finite number, got {v!r}")
        lo, hi = param.lo, param.hi
        if lo is not None or hi is not None:
            if lo is not None and v < lo or hi is not None and v > hi:
                raise doc.error(path, f"{param.name} must be within [{_bound(lo, '-inf')}, {_bound(hi, 'inf')}], "
                                      f"got {short(v)}")
        elif abs(v) > MAX_MAGNITUDE:
            raise doc.error(path, f"{param.name} {short(v)} is out of range (|{param.name}| <= {MAX_MAGNITUDE:g})")


def _bound(b: float | None, none: str) -> str:
    return none if b is None else f"{b:g}"


def interpolate(values: list[Any], t: float, ptype: type) -> Any:
    """Gradient value at t ∈ [0, 1] (§1.3 step 3)."""
    vals = [coerce(v, ptype) for v in values]
    k = len(vals)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
    if not numeric:
        return vals[int(t * (k - 1))]
    s = t * (k - 1)
    i0 = int(s)
    i1 = min(k - 1, i0 + 1)
    f = s - i0
    return coerce((1 - f) * vals[i0] + f * vals[i1], ptype)


def filter_matches(flt: str | None, tensor: str) -> bool:
    """Plain, case-sensitive substring; null, '*' and '' match everything (§1.3 step 4)."""
    return flt is None or flt == "*" or flt in tensor


def _unpack(setting: Any) -> tuple[list[dict[str, Any]] | None, Any]:
    """One scope's setting as (its conditionals, None) or (None, a scalar or gradient); (None, None) when it is
    not set at this level (null, an empty list)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None, None
        if all(_is_conditional(c) for c in setting):
            return setting, None
    return None, setting


def _plain(value: Any, t: float, ptype: type) -> Any:
    if value is None:
        return None
    return interpolate(value, t, ptype) if isinstance(value, list) else coerce(value, ptype)


def evaluate(setting: Any, tensor: str, t: float, ptype: type) -> Any:
    """Resolve one scope's setting for one tensor; None means "not set at this level"."""
    conditionals, plain = _unpack(setting)
    if conditionals is None:
        return _plain(plain, t, ptype)
    for cond in conditionals:
        if filter_matches(cond.get("filter"), tensor):
            return evaluate(cond["value"], tensor, t, ptype)
    return None


def static_value(setting: Any, t: float, ptype: type) -> Any:
    """A (validated) setting's value at t for every tensor: None when not set at this level, UNKNOWN when a
    filter makes it depend on the tensor name (the first conditional decides for the tensors it matches)."""
    conditionals, plain = _unpack(setting)
    if conditionals is None:
        return _plain(plain, t, ptype)
    if conditionals[0].get("filter") in (None, "*", ""):
        return static_value(conditionals[0]["value"], t, ptype)
    return UNKNOWN


def resolve(scopes: Iterable[dict[str, Any] | None], param: Param, tensor: str, t: float) -> Any:
    """First scope that yields a value wins; else the default; REQUIRED if none (caller raises)."""
    for scope in scopes:
        if scope and param.name in scope:
            v = evaluate(scope[param.name], tensor, t, param.type)
            if v is not None:
                return v
    return param.default
