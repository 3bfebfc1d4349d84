"""`model_stock` (merge-semantics.md §2.10): interpolate between the base and the fine-tunes' average.

Offsets oᵢ = wᵢ − w₀ (w₀ the base); cos = the mean over pairs i<j of clamp(⟨oᵢ,oⱼ⟩/max(‖oᵢ‖‖oⱼ‖, 1e-6), −1, 1);
t = N·cos/(1+(N−1)·cos) with N the number of non-base models, and t = 0 when |1+(N−1)·cos| < 1e-6
(0.1.5's singular guard); out = t·mean(wᵢ) + (1−t)·w₀.

* Default: vectors are the whole flattened tensors; `reduce` sums the offsets' Gram matrix in float64 over
  chunks, `apply` is elementwise, so tensors of any size stream.
* `filter_wise: true`: one t per row (vectors along the last dim; a 1-D tensor is one row), which needs whole
  rows (not chunkable): the method gets the whole tensor and merges it block by block of whole dim-0 slices
  (`_rows`), so memory stays near one block whatever the tensor size.

Optional tensors follow §2.0 BASE_OR_SKIP (its `optional_policy`, mergebot.config.methods): with fewer than 3 inputs the base is
copied when only the base has the tensor, otherwise the tensor is dropped with a warning (the planner's job).
"""

from __future__ import annotations

from typing import Any

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import Sums
from mergebot.engine.fuse import scratch
from mergebot.engine.methods._linalg import gram
from mergebot.engine.methods._rows import map_rows
from mergebot.engine.methods.base import MergeCall, MergeMethod

NORM_EPS = 1e-6
SINGULAR_EPS = 1e-6


def stock_t(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t from the mean pairwise cosine (float64, any shape), with the 0.1.5 guard."""
    denom = 1.0 + (n - 1) * cos
    singular = denom.abs() < SINGULAR_EPS
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denom))


def mean_cos(dots: dict[tuple[int, int], torch.Tensor], sq: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of the clamped cosines, from ⟨oᵢ,oⱼ⟩ and ‖oᵢ‖² (float64, any shape)."""
    norms = [s.clamp(min=0).sqrt() for s in sq]
    cosines = [(dots[(i, j)] / (norms[i] * norms[j]).clamp(min=NORM_EPS)).clamp(-1.0, 1.0) for i, j in dots]
    return torch.stack(cosines).mean(dim=0)


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _split(call: MergeCall, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and the fine-tunes, flat in the compute dtype, of `xs` (flat slices of the inputs)."""
    return xs[call.base_at].reshape(-1).to(call.dtype), [xs[i].reshape(-1).to(call.dtype) for i in call.others]


def _reduce(call: MergeCall) -> Sums:
    if call.shared["filter_wise"]:
        return Sums(0)
    return gram([call.xs[i] for i in call.others], call.dtype, call.xs[call.base_at])


def _mean(ws: list[torch.Tensor]) -> torch.Tensor:
    mean = ws[0]
    for w in ws[1:]:
        mean = mean + w
    return mean / len(ws)


def _interpolate(call: MergeCall, t: float) -> torch.Tensor:
    """t·mean(wᵢ) + (1−t)·w₀ with `_mean`'s roundings (Σwᵢ in order, /N, ·t; w₀·(1−t); then the sum), eager
    and in place in reused buffers; stored into call.out when given."""
    first = call.xs[call.others[0]].reshape(-1)
    acc = scratch("model_stock", first.numel(), call.dtype, first.device)
    base = scratch("model_stock_base", first.numel(), call.dtype, first.device)
    acc.copy_(first)
    for i in call.others[1:]:
        acc.add_(call.xs[i].reshape(-1))
    acc.div_(len(call.others)).mul_(t)
    acc.add_(base.copy_(call.xs[call.base_at].reshape(-1)).mul_(1.0 - t))
    return acc.clone() if call.out is None else call.out.copy_(acc)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    if call.shared["filter_wise"] and len(call.others) >= 2:
        return map_rows(call, lambda xs, shape, s: _filter_wise(call, xs, shape))
    n = len(call.others)
    pairs = _pairs(n)
    if not pairs:  # no fine-tune, or a single one (the contract asks for two): cos is undefined, keep the base
        return call.xs[call.base_at].reshape(-1).to(call.dtype)
    g = totals if totals is not None and totals.numel() else _reduce(call).values()
    cos = mean_cos({(i, j): g[i, j] for i, j in pairs}, [g[i, i] for i in range(n)])
    return _interpolate(call, float(stock_t(cos, n)))


def _filter_wise(call: MergeCall, xs: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """filter_wise on one block of whole rows (vectors along the last dim; below 2-D the block is one row)."""
    w0, ws = _split(call, xs)
    n = len(ws)
    shape = shape if len(shape) >= 2 else (1, -1)
    rows0 = w0.reshape(shape)
    offs = [(w.reshape(shape) - rows0).to(torch.float64) for w in ws]
    pairs = _pairs(n)
    dots = {(i, j): (offs[i] * offs[j]).sum(-1) for i, j in pairs}
    sq = [(o * o).sum(-1) for o in offs]
    t = stock_t(mean_cos(dots, sq), n).to(call.dtype).unsqueeze(-1)
    return (_mean(ws).reshape(shape) * t + rows0 * (1.0 - t)).reshape(-1)


def _chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    return not shared.get("filter_wise", False)


METHOD = MergeMethod.of(SPECS["model_stock"], apply=_apply, reduce=_reduce, chunkable_when=_chunkable_for, fuse=False)
