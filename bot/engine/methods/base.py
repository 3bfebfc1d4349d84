"""What a merge method is: a pure function on tensors plus the parameters it declares.

A method sees one output tensor's inputs (or a contiguous chunk of them, all flattened the same way),
already in the compute dtype and on the compute device. Chunkable methods are either elementwise or
split into `reduce` (additive float64 sums over chunks) and `apply` (elementwise, given the totals), which
lets the executor stream tensors of any size through bounded memory (merge-semantics.md §2.0). The sums
are exact (mergebot.engine.exact), so a result never depends on how the tensor was chunked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mergebot.config.spec import MethodSpec
from mergebot.engine.exact import Sums


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
    def base_at(self) -> int:
        """The base's index, for base-aware methods (the plan always gives those one)."""
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        return self.base

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.xs)) if i != self.base]


@dataclass(frozen=True, kw_only=True)
class MergeMethod(MethodSpec):
    """One registered method: its declaration (mergebot.config.methods) plus its kernel."""

    apply: Callable[[MergeCall, torch.Tensor | None], torch.Tensor]
    reduce: Callable[[MergeCall], Sums] | None = None  # exact sums, added over chunks (mergebot.engine.exact)
    chunkable: bool = True  # False: needs the whole tensor at once
    # Whether this call may be split into chunks, decided from its parameters (None: `chunkable` decides).
    chunkable_when: Callable[[dict[str, Any], list[dict[str, Any]]], bool] | None = None
    uses_rng: bool = False
    fuse: bool = True  # benefits from torch.compile (False: a fast in-place eager form exists)
    whole_max: int = 0  # tensors up to this many elements always come whole, never in chunks

    @classmethod
    def of(cls, spec: MethodSpec, **kernel: Any) -> MergeMethod:
        """The declared method `spec` with its kernel (the fields above)."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec)}, **kernel)

    def chunkable_for(self, shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
        """Whether this call may be split into chunks (a method may decide from its parameters)."""
        return self.chunkable_when(shared, per_input) if self.chunkable_when else self.chunkable

    def merge(self, call: MergeCall) -> torch.Tensor:
        """The whole-tensor result: reduce over the single chunk, then apply."""
        return self.apply(call, self.reduce(call).values() if self.reduce else None)
