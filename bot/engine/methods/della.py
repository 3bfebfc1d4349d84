"""`della` and `della_linear` (merge-semantics.md §2.7): task arithmetic with magnitude-ranked sampling.

Presets of the generalised task-arithmetic family, sharing its tail (`task_arithmetic._combine`). Each
δᵢ = xᵢ − base is sparsified by `della_magprune` (`_sparsify_more.della_keep`): per row (along dim 1; a 1-D
tensor is one row) |δ| is ranked ascending, r̂ = rank/(n−1), and every entry is kept with probability
p = (densityᵢ − εᵢ) + r̂·2εᵢ, so larger changes survive more often. density ≥ 1 keeps everything,
density ≤ 0 nothing; otherwise 0 < density − ε and density + ε < 1 are required (mergekit's ValueError,
here a ModelError naming the tensor, the model and the values). With `rescale` (default true) each pruned δᵢ
is multiplied by ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁ (not the paper's 1/p).

| name | consensus | normalize | rescale |
|---|---|---|---|
| della | sum | true | true |
| della_linear | none | false | true |

Randomness (deliberate difference, see the table at the top of merge-semantics.md): the Bernoulli draw of
element j of model position k is `hash_u32(j, stream_key(seed, tensor, k)) < ⌊p·2³²⌋` (mergebot.engine.rng), so the
result depends only on `--random-seed`, the tensor name and the model's position, never on execution order,
thread count or device. mergekit draws from the global torch RNG in sorted-tensor order; its bits are not
reproduced. Ranks are per row, so a tensor is chunked only when nothing is sampled; otherwise the method gets
the whole tensor and walks it in blocks of whole rows (`_rows`): with `rescale` a first pass sums ‖δᵢ‖₁ and
‖δᵢ⊙maskᵢ‖₁ exactly (mergebot.engine.exact), a second draws the masks again (same ranks, same hash) and merges, so memory stays
near one block whatever the tensor size.
"""

from __future__ import annotations

from typing import Any

import torch

from mergebot.errors import ModelError
from mergebot.engine.exact import Sums, partials
from mergebot.engine.methods._rows import map_rows, row_blocks
from mergebot.engine.methods._sparsify_more import della_keep, tensor_label
from mergebot.engine.methods.base import MergeCall, MergeMethod, Param
from mergebot.engine.methods.task_arithmetic import _combine, family_params, rescale_factor


def check_epsilon(density: float, epsilon: float, where: str = "") -> None:
    """mergekit's ValueError as a ModelError: 0 < density − ε and density + ε < 1 when 0 < density < 1."""
    if density >= 1 or density <= 0:
        return
    if density - epsilon <= 0 or density + epsilon >= 1:
        bound = min(density, 1 - density)
        raise ModelError(
            f"della{where}: epsilon {epsilon:g} does not fit density {density:g}: density - epsilon = "
            f"{density - epsilon:g} and density + epsilon = {density + epsilon:g} must both lie strictly between "
            f"0 and 1 (choose epsilon < {bound:g} for this density)")


def validate(name: str, shared: dict[str, Any], per_input: list[dict[str, Any]],
             models: list[str] | None = None) -> None:
    """density ± epsilon of each input (extra["validate"]): per tensor by the planner, and with `name` "" by
    `mergebot validate` for the values the config alone decides. An input whose density or epsilon is absent
    or None (at validate time: it depends on a filter) is skipped."""
    for j, p in enumerate(per_input):
        if p.get("density") is not None and p.get("epsilon") is not None:
            where = ([f"tensor {name!r}"] if name else []) + ([f"model {models[j]}"] if models else [])
            check_epsilon(float(p["density"]), float(p["epsilon"]), f" ({', '.join(where)})" if where else "")


# Keep masks of the first pass, held for the second while they fit (bool, one byte per element): the per-row
# ranking is most of DELLA's time, so this halves it for every tensor below the budget (a 7B model's layers).
MASK_CACHE_BYTES = 256 << 20


def _masked(call: MergeCall, xs: list[torch.Tensor], base: torch.Tensor, i: int, shape: tuple[int, ...],
            s: int, cache: dict[tuple[int, int], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(δᵢ, keepᵢ) of one row block starting at flat offset s; keep None: no sampling (density ≥ 1 or ≤ 0)."""
    p = call.per_input[i]
    density, epsilon = float(p["density"]), float(p["epsilon"])
    d = xs[i].to(call.dtype) - base
    if density <= 0:
        return torch.zeros_like(d), None
    if density >= 1:
        return d, None
    if cache is not None and (s, i) in cache:
        return d, cache.pop((s, i))
    return d, della_keep(d, shape, density, epsilon, call.keys[i], call.start + s)


def _l1_scales(call: MergeCall, sampled: list[int],
               cache: dict[tuple[int, int], torch.Tensor] | None = None) -> dict[int, float]:
    """‖δᵢ‖₁/‖δᵢ⊙keepᵢ‖₁ over the whole tensor (§2.7), 1 where either norm is below 1e-7: the first pass."""
    sums = {i: Sums(2) for i in sampled}
    xs = [x.reshape(-1) for x in call.xs]
    for s, e, shape in row_blocks(call.shape, xs[0].numel(), xs[0].device):
        block = [x[s:e] for x in xs]
        base = block[call.base].to(call.dtype)
        for i in sampled:
            d, keep = _masked(call, block, base, i, shape, s)
            if cache is not None:
                cache[(s, i)] = keep
            sums[i].add(partials([d.abs(), torch.where(keep, d, 0.0).abs()]))
    return {i: rescale_factor(*sums[i].values().tolist()) for i in sampled}


def _make_apply(consensus: bool):
    def apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
        others = call.others
        if not others:
            return call.xs[call.base].reshape(-1).to(call.dtype)
        sampled = []
        for i in others:
            density, epsilon = float(call.per_input[i]["density"]), float(call.per_input[i]["epsilon"])
            if 0 < density < 1:
                check_epsilon(density, epsilon, f"{tensor_label(call)} (input #{i}, the base being #0)")
                sampled.append(i)
        cache = {} if call.xs[call.base].numel() * len(sampled) <= MASK_CACHE_BYTES else None
        scales = _l1_scales(call, sampled, cache) if sampled and call.shared["rescale"] else {}
        weights = [float(call.per_input[i]["weight"]) for i in others]
        normalize, lam = bool(call.shared["normalize"]), float(call.shared["lambda"])

        def block(xs: list[torch.Tensor], shape: tuple[int, ...], s: int) -> torch.Tensor:
            base = xs[call.base].to(call.dtype)
            deltas = []
            for i in others:
                d, keep = _masked(call, xs, base, i, shape, s, cache)
                if keep is not None:
                    d = torch.where(keep, d, 0.0)
                    if scales.get(i, 1.0) != 1.0:
                        d = d * scales[i]
                deltas.append(d)
            return _combine(base, deltas, weights, consensus, normalize, lam, call.out_dtype)

        return map_rows(call, block)
    return apply


def _chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    return all(not 0 < float(p["density"]) < 1 for p in per_input if "density" in p)


def _method(name: str, pretty: str, consensus: bool, normalize: bool) -> MergeMethod:
    return MergeMethod(
        name=name,
        pretty=pretty,
        url="https://arxiv.org/abs/2406.11617",
        params=family_params(normalize, True, Param("epsilon", float, "non_base", 0.15)),
        base="required",
        apply=_make_apply(consensus),
        uses_rng=True,
        extra={"chunkable_for": _chunkable_for, "validate": validate, "sparsifier": "della_magprune",
               "consensus": "sum" if consensus else None},
    )


METHODS = [
    _method("della", "DELLA", consensus=True, normalize=True),
    _method("della_linear", "Linear DELLA", consensus=False, normalize=False),
]
