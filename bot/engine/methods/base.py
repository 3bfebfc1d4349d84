"""What a merge method is: a pure function on tensors plus the parameters it declares.

A method sees one output tensor's inputs (or a contiguous chunk of them, all flattened the same way),
already in the compute dtype and on the compute device. Chunkable methods are either elementwise or
split into `reduce` (additive float64 sums over chunks) and `apply` (elementwise, given the totals), which
lets the executor stream tensors of any size through bounded memory (merge-semantics.md §2.0). The sums
are exact (mergebot.engine.exact), so a result never depends on how the tensor was chunked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from mergebot.engine.exact import Sums

REQUIRED = object()  # sentinel: parameter has no default

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored", "forbidden"]


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


@dataclass
class MergeCall:
    """Inputs of one merge call. `xs` are in config order, the base first for base-aware methods."""

    xs: list[torch.Tensor]
    base: int | None  # index of the base in xs, or None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]  # one dict per entry of xs (base: only scope=input params)
    dtype: torch.dtype = torch.float32  # compute dtype: float32, or float64 for float64 inputs
    out_dtype: torch.dtype = torch.float32  # a kernel may cast its result itself (fused), or leave it
    start: int = 0  # element offset of this chunk in the flattened tensor (addresses the RNG)
    keys: list[int] = field(default_factory=list)  # RNG stream key per entry of xs (mergebot.engine.rng)
    out: torch.Tensor | None = None  # flat destination (out_dtype) a kernel may store into directly
    shape: tuple[int, ...] = ()  # the tensor's real shape when xs hold the whole tensor (flat chunk otherwise)
    name: str = ""  # output tensor name, for error messages
    rng: str = "hash"  # "hash" (mergebot.engine.rng) or "mergekit": torch's global RNG in mergekit's draw order (DARE)

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.xs)) if i != self.base]


@dataclass(frozen=True)
class MergeMethod:
    """One registered method: metadata for cards and checks, plus its kernel."""

    name: str
    pretty: str
    url: str | None
    params: tuple[Param, ...]
    base: BasePolicy
    apply: Callable[[MergeCall, torch.Tensor | None], torch.Tensor]
    reduce: Callable[[MergeCall], Sums] | None = None  # exact sums, added over chunks (mergebot.engine.exact)
    chunkable: bool = True  # False: needs the whole tensor at once
    uses_rng: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    singleton_passthrough: bool = False  # §2.0 PASSTHROUGH_SINGLETON for optional tensors
    fuse: bool = True  # benefits from torch.compile (False: a fast in-place eager form exists)
    whole_max: int = 0  # tensors up to this many elements always come whole, never in chunks
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def chunkable_for(self, shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
        """Whether this call may be split into chunks (a method may decide from its parameters)."""
        hook = self.extra.get("chunkable_for")
        return hook(shared, per_input) if hook else self.chunkable

    def merge(self, call: MergeCall) -> torch.Tensor:
        """The whole-tensor result: reduce over the single chunk, then apply."""
        return self.apply(call, self.reduce(call).values() if self.reduce else None)
