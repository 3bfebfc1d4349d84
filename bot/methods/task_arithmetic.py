"""The generalised task-arithmetic family (merge-semantics.md §2.7): one kernel, several presets.

δᵢ = xᵢ − base; optional sparsify (magnitude top-k or DARE Bernoulli, with L1 rescale); weighted
deltas Dᵢ = wᵢ·δᵢ; optional sign consensus ("sum"); optional normalisation by the weights that voted;
out = base + λ·mixed. Computed in float32 (float64 for float64 inputs) and cast once by the executor.

DARE's rescale matches the L1 norm of the whole tensor (not the paper's 1/p), so it is a two-phase
method: `reduce` sums ‖δᵢ‖₁ and ‖δᵢ⊙maskᵢ‖₁ over chunks, `apply` uses the totals. The masks come from
`call.noise`, which the executor seeds per (seed, tensor, model position, block): the same bits whatever
the chunking, thread count or device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import _sparsify
from .base import MergeCall, MergeMethod, Param

RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class Preset:
    consensus: Literal["sum", None]
    sparsifier: Literal["magnitude", "random", None]
    normalize: bool
    rescale: bool


def _delta(call: MergeCall, i: int) -> torch.Tensor:
    base = call.xs[call.base]
    return torch.sub(call.xs[i].to(call.dtype), base.to(call.dtype))


def _sparse_delta(preset: Preset, call: MergeCall, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(δᵢ before sparsifying, δᵢ after) for one non-base input."""
    delta = _delta(call, i)
    density = float(call.per_input[i]["density"])
    if preset.sparsifier is None or density >= 1:
        return delta, delta
    if preset.sparsifier == "magnitude":
        return delta, _sparsify.magnitude(delta, density)
    assert call.noise is not None
    keep = _sparsify.bernoulli_keep(call.noise(i).to(delta.device), density)
    return delta, delta * keep


def _make(preset: Preset):
    def reduce(call: MergeCall) -> torch.Tensor:
        if not call.shared["rescale"]:
            return torch.zeros(0, dtype=torch.float64)
        sums = []
        for i in call.others:
            full, kept = _sparse_delta(preset, call, i)
            sums += [full.abs().sum(dtype=torch.float64), kept.abs().sum(dtype=torch.float64)]
        return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)

    def apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
        base = call.xs[call.base].to(call.dtype)
        weighted: list[torch.Tensor] = []
        weights: list[float] = []
        for j, i in enumerate(call.others):
            _, delta = _sparse_delta(preset, call, i)
            if totals is not None and totals.numel():
                l1, l1_kept = float(totals[2 * j]), float(totals[2 * j + 1])
                if l1 >= RESCALE_EPS and l1_kept >= RESCALE_EPS:
                    delta = delta * (l1 / l1_kept)
            w = float(call.per_input[i]["weight"])
            weighted.append(delta * w if delta.data_ptr() == call.xs[i].data_ptr() else delta.mul_(w))
            weights.append(w)
        if not weighted:
            return base.clone()
        if preset.consensus == "sum":
            total = torch.stack(weighted).sum(dim=0) if len(weighted) > 1 else weighted[0].clone()
            sign = torch.where(total >= 0, 1.0, -1.0).to(call.dtype)
            mixed = torch.zeros_like(base)
            div = torch.zeros_like(base)
            for d, w in zip(weighted, weights):
                agree = torch.sign(d) == sign
                mixed.add_(d * agree)
                div.add_(agree.to(call.dtype), alpha=w)
            div[div == 0] = 1
        else:
            mixed = weighted[0]
            for d in weighted[1:]:
                mixed.add_(d)
            div = sum(weights)
            if abs(div) < 1e-8:
                div = 1.0
        if call.shared["normalize"]:
            mixed.div_(div)
        lam = float(call.shared["lambda"])
        if lam != 1.0:
            mixed.mul_(lam)
        return mixed.add_(base)

    return reduce, apply


def _preset_method(name: str, pretty: str, url: str, preset: Preset) -> MergeMethod:
    reduce, apply = _make(preset)
    needs_totals = preset.sparsifier is not None

    def chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
        if preset.sparsifier != "magnitude":
            return True
        # Magnitude top-k is global over the tensor: chunk only when nothing is pruned.
        return all(float(p.get("density", 1.0)) >= 1 for p in per_input if "density" in p)

    return MergeMethod(
        name=name,
        pretty=pretty,
        url=url,
        params=(
            Param("weight", float, "non_base"),
            Param("density", float, "non_base", 1.0, lo=0.0, hi=1.0),
            Param("normalize", bool, "shared", preset.normalize),
            Param("rescale", bool, "shared", preset.rescale),
            Param("int8_mask", bool, "shared", False),  # no numerical effect (§2.7)
            Param("lambda", float, "shared", 1.0),
        ),
        base="required",
        apply=apply,
        reduce=reduce if needs_totals else None,
        uses_rng=preset.sparsifier == "random",
        extra={"chunkable_for": chunkable_for, "preset": preset},
    )


METHODS = [
    _preset_method("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                   Preset(None, None, False, False)),
    _preset_method("ties", "TIES", "https://arxiv.org/abs/2306.01708", Preset("sum", "magnitude", True, False)),
    _preset_method("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099", Preset("sum", "random", False, True)),
    _preset_method("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099", Preset(None, "random", False, True)),
]
