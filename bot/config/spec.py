"""What a merge method declares, without its kernel: parameters, base policy, input counts, checks.

The config checker (`mergebot validate`) and the card read these declarations; the engine attaches a kernel
to each (mergebot.engine.methods.base.MergeMethod is a MethodSpec plus its tensor functions). Nothing here
imports torch: dtypes are names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# The dtypes a config may name (`dtype:`, `out_dtype:`); the engine maps them to torch dtypes.
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64", "int64")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # sentinel: the parameter has no default

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored", "forbidden"]
# §2.0 optional-tensor policies the planner applies beyond the default (every input must have the tensor):
# base_or_skip: with fewer than min_inputs models, a tensor only the base has is copied, others left out;
# passthrough_base_singleton: a tensor only the base has is copied from it.
OptionalPolicy = Literal["base_or_skip", "passthrough_base_singleton"]
Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]

# check(tensor name or "" at validate time, shared values, per-input values, model names): raises ModelError
Check = Callable[..., None]


@dataclass(frozen=True)
class Param:
    """A declared parameter (§1.3): its type drives validation and gradient interpolation."""

    name: str
    type: type  # float | int | bool | str
    scope: Scope
    default: Any = REQUIRED
    lo: float | None = None  # inclusive bounds for numeric values
    hi: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class FamilyVariant:
    """One member of the generalised task-arithmetic family (§2.7): which steps of the one algorithm it takes."""

    consensus: bool  # TIES sign election ("sum")
    sparsifier: Sparsifier | None
    normalize: bool  # default of `normalize`
    rescale: bool  # default of `rescale`


@dataclass(frozen=True)
class MethodSpec:
    """One method's declaration: metadata for cards, the parameter contract, the input-count contract."""

    name: str
    pretty: str
    url: str | None
    params: tuple[Param, ...]
    base: BasePolicy
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    singleton_passthrough: bool = False  # §2.0 PASSTHROUGH_SINGLETON for optional tensors
    optional_policy: OptionalPolicy | None = None
    # The method's own check of resolved values: per tensor by the planner, and by `mergebot validate` for what
    # the config alone decides (values a filter decides are None there).
    validate: Check | None = None
    family: FamilyVariant | None = None  # a task-arithmetic variant

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
