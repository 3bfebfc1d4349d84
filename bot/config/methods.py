"""Every merge method's declaration (merge-semantics.md §2), in one torch-free table.

The config checker validates parameters against it, the card takes names and paper URLs from it, and the
engine attaches one kernel module to each entry (mergebot.engine.methods refuses to start when an entry has
no kernel or a kernel no entry). The generalised task-arithmetic family (§2.7) is one algorithm whose
variants differ only in the steps they take: they are the rows of FAMILY.
"""

from __future__ import annotations

import difflib
from typing import Any

from mergebot.config.spec import FamilyVariant, MethodSpec, Param
from mergebot.errors import ModelError

# ------------------------------------------------------------------------------------------------------ checks


def check_weight_sum(method: str, key: str, shared: dict[str, Any], weights: list[Any], where: str) -> None:
    """Normalising by Σw = 0 writes inf/NaN tensors (mergekit has no guard, §2.1): refuse it before anything is
    written. A weight of None (at validate time: it depends on a filter) means "not known": nothing to check."""
    if shared.get(key) is not True or not weights or any(w is None for w in weights):
        return
    total = sum(float(w) for w in weights)
    if abs(total) < 1e-8:
        raise ModelError(f"{method}{where}: the weights ({', '.join(f'{float(w):g}' for w in weights)}) sum to "
                         f"{total:g} and {key}: true divides by that sum; use weights that do not cancel, or set "
                         f"{key}: false")


def _linear_check(name: str, shared: dict[str, Any], per_input: list[dict[str, Any]],
                  models: list[str] | None = None) -> None:
    """Plan-time check of one tensor's resolved parameters."""
    check_weight_sum("linear", "normalize", shared, [p.get("weight") for p in per_input],
                     f" (tensor {name!r})" if name else "")


def _multislerp_check(name: str, shared: dict[str, Any], per_input: list[dict[str, Any]],
                      models: list[str] | None = None) -> None:
    """normalize_weights divides by Σw (§2.4); the base has no weight, one model is returned as it is."""
    weights = [p.get("weight") for p in per_input if "weight" in p]
    if len(weights) >= 2:
        check_weight_sum("multislerp", "normalize_weights", shared, weights, f" (tensor {name!r})" if name else "")


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


def _della_check(name: str, shared: dict[str, Any], per_input: list[dict[str, Any]],
                 models: list[str] | None = None) -> None:
    """density ± epsilon of each input: per tensor by the planner, and with `name` "" by `mergebot validate` for
    the values the config alone decides. An input whose density or epsilon is absent or None (at validate time:
    it depends on a filter) is skipped."""
    for j, p in enumerate(per_input):
        if p.get("density") is not None and p.get("epsilon") is not None:
            where = ([f"tensor {name!r}"] if name else []) + ([f"model {models[j]}"] if models else [])
            check_epsilon(float(p["density"]), float(p["epsilon"]), f" ({', '.join(where)})" if where else "")


# ------------------------------------------------------------------------------------------- the family (§2.7)

# name: (pretty name, paper, the variant's steps)
FAMILY: dict[str, tuple[str, str, FamilyVariant]] = {
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089", FamilyVariant(False, None, False, False)),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708", FamilyVariant(True, "magnitude", True, False)),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099", FamilyVariant(True, "random", False, True)),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099", FamilyVariant(False, "random", False, True)),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
                    FamilyVariant(False, "magnitude_outliers", False, False)),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
                         FamilyVariant(True, "magnitude_outliers", False, False)),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617", FamilyVariant(True, "della_magprune", True, True)),
    "della_linear": ("Linear DELLA", "https://arxiv.org/abs/2406.11617",
                     FamilyVariant(False, "della_magprune", False, True)),
}

# parameters a sparsifier adds to the family's own
SPARSIFIER_PARAMS: dict[str, tuple[Param, ...]] = {
    "magnitude_outliers": (Param("gamma", float, "non_base", 0.01),),
    "della_magprune": (Param("epsilon", float, "non_base", 0.15),),
}


def _family_spec(name: str) -> MethodSpec:
    pretty, url, variant = FAMILY[name]
    params = (
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0, lo=0.0, hi=1.0),
        *SPARSIFIER_PARAMS.get(variant.sparsifier or "", ()),
        Param("normalize", bool, "shared", variant.normalize),
        Param("rescale", bool, "shared", variant.rescale),
        Param("int8_mask", bool, "shared", False),  # no numerical effect (§2.7)
        Param("lambda", float, "shared", 1.0),
    )
    return MethodSpec(name, pretty, url, params, base="required", family=variant,
                      validate=_della_check if variant.sparsifier == "della_magprune" else None)


# --------------------------------------------------------------------------------------------------- the table

_OTHERS = (
    MethodSpec("linear", "Linear", "https://arxiv.org/abs/2203.05482",
               (Param("weight", float, "input"), Param("normalize", bool, "shared", True)), base="ignored",
               validate=_linear_check),
    MethodSpec("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", (Param("t", float, "shared"),),
               base="required", min_inputs=2, max_inputs=2, min_non_base=1, max_non_base=1,
               singleton_passthrough=True),
    MethodSpec("nuslerp", "NuSLERP", None,
               (Param("weight", float, "non_base"), Param("nuslerp_flatten", bool, "shared", True),
                Param("nuslerp_row_wise", bool, "shared", False)),
               base="optional", min_inputs=2, max_inputs=3, min_non_base=2, max_non_base=2,
               singleton_passthrough=True),
    MethodSpec("multislerp", "Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
               (Param("weight", float, "non_base"), Param("normalize_weights", bool, "shared", True),
                Param("eps", float, "shared", 1e-8)),
               base="optional", min_inputs=1, min_non_base=1, validate=_multislerp_check),
    MethodSpec("karcher", "Karcher Mean", "https://arxiv.org/abs/2603.04972",
               (Param("max_iter", int, "shared", 10, lo=0, hi=1000), Param("tol", float, "shared", 1e-5)),
               base="ignored", min_inputs=1),
    MethodSpec("passthrough", "Passthrough", None, (Param("scale", float, "input", None),), base="ignored",
               max_inputs=1),
    MethodSpec("model_stock", "Model Stock", "https://arxiv.org/abs/2403.19522",
               (Param("filter_wise", bool, "shared", False),), base="required", min_inputs=3, min_non_base=2,
               optional_policy="base_or_skip"),
    MethodSpec("sce", "SCE", "https://arxiv.org/abs/2408.07990",
               (Param("select_topk", float, "shared", 1.0),
                Param("int8_mask", bool, "shared", False)),  # no numerical effect (§2.8)
               base="required"),
    MethodSpec("ram", "Reinforced Agent Merging", "https://arxiv.org/abs/2601.13572",
               (Param("epsilon", float, "shared", 1e-5),), base="required"),
    MethodSpec("ramplus_tl", "Reinforced Agent Merging Plus (Tensor-Local)", "https://arxiv.org/abs/2601.13572",
               (Param("r", float, "shared", 0.1), Param("alpha", float, "shared", 0.2),
                Param("epsilon", float, "shared", 1e-5)), base="required"),
    MethodSpec("arcee_fusion", "Arcee Fusion", "https://arcee.ai", (), base="required", min_inputs=2, max_inputs=2,
               min_non_base=1, max_non_base=1, singleton_passthrough=True),  # §2.0 PASSTHROUGH_SINGLETON
    MethodSpec("nearswap", "NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
               (Param("t", float, "shared"),), base="required", min_inputs=2, max_inputs=2, min_non_base=1,
               max_non_base=1, optional_policy="passthrough_base_singleton"),
)

SPECS: dict[str, MethodSpec] = {s.name: s for s in _OTHERS} | {name: _family_spec(name) for name in FAMILY}

# Names mergekit 0.1.5 registers (merge-semantics.md §2.0) whose kernels have not landed yet: none left.
PLANNED: tuple[str, ...] = ()


def closest(name: str) -> str | None:
    """The registered (or planned) method name closest to a misspelling."""
    hits = difflib.get_close_matches(name, list(SPECS) + list(PLANNED), n=1, cutoff=0.5)
    return hits[0] if hits else None
