"""Every method's declaration: card name and paper, base policy, input counts, defaults, and the contract
checked when the config is read (merge-semantics.md §2.0)."""

from __future__ import annotations

import pytest

from mergebot.config.dense import parse_config
from mergebot.engine.methods import METHODS
from mergebot.errors import ConfigError

NEW = ("nuslerp", "multislerp", "karcher", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl")


# --------------------------------------------------------------------------------------------------- metadata

PRETTY = {
    "nuslerp": ("NuSLERP", None),
    "multislerp": ("Multi-SLERP", "goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "karcher": ("Karcher Mean", "arxiv.org/abs/2603.04972"),
    "model_stock": ("Model Stock", "arxiv.org/abs/2403.19522"),
    "breadcrumbs": ("Model Breadcrumbs", "arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "arxiv.org/abs/2406.11617"),
    "sce": ("SCE", "arxiv.org/abs/2408.07990"),
    "arcee_fusion": ("Arcee Fusion", "arcee.ai"),
    "nearswap": ("NearSwap", "huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "ram": ("Reinforced Agent Merging", "arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("Reinforced Agent Merging Plus (Tensor-Local)", "arxiv.org/abs/2601.13572"),
}


def test_registered_with_card_metadata_and_contracts():
    for name in NEW:
        m = METHODS[name]
        pretty, url = PRETTY[name]
        assert m.pretty == pretty
        assert (m.url is None) if url is None else m.url.rstrip("/").endswith(url), (name, m.url)
    spec = {  # base policy, min_inputs, max_inputs, min_non_base, max_non_base (§2)
        "nuslerp": ("optional", 2, 3, 2, 2), "multislerp": ("optional", 1, None, 1, None),
        "karcher": ("ignored", 1, None, 0, None), "model_stock": ("required", 3, None, 2, None),
        "arcee_fusion": ("required", 2, 2, 1, 1), "nearswap": ("required", 2, 2, 1, 1),
    }
    for name, contract in spec.items():
        m = METHODS[name]
        assert (m.base, m.min_inputs, m.max_inputs, m.min_non_base, m.max_non_base) == contract, name
    for name in ("nuslerp", "arcee_fusion"):
        assert METHODS[name].singleton_passthrough
    for name in ("sce", "ram", "ramplus_tl", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        assert METHODS[name].base == "required"
    defaults = {("della", "epsilon"): 0.15, ("della_linear", "epsilon"): 0.15, ("breadcrumbs", "gamma"): 0.01,
                ("breadcrumbs_ties", "gamma"): 0.01, ("della", "normalize"): True, ("della", "rescale"): True,
                ("della_linear", "normalize"): False, ("della_linear", "rescale"): True,
                ("breadcrumbs", "normalize"): False, ("breadcrumbs", "rescale"): False,
                ("nuslerp", "nuslerp_flatten"): True, ("nuslerp", "nuslerp_row_wise"): False,
                ("multislerp", "normalize_weights"): True, ("multislerp", "eps"): 1e-8,
                ("karcher", "max_iter"): 10, ("karcher", "tol"): 1e-5, ("model_stock", "filter_wise"): False,
                ("sce", "select_topk"): 1.0, ("ram", "epsilon"): 1e-5, ("ramplus_tl", "r"): 0.1,
                ("ramplus_tl", "alpha"): 0.2, ("ramplus_tl", "epsilon"): 1e-5}
    for (name, p), v in defaults.items():
        assert METHODS[name].param(p).default == v, (name, p)
    assert METHODS["nearswap"].param("t").required
    for name in ("della", "breadcrumbs", "nuslerp", "multislerp"):
        assert METHODS[name].param("weight").scope == "non_base"


@pytest.mark.parametrize("text,needle", [
    (("models:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 1}\n"
      "  - model: c\n    parameters: {weight: 1}\nmerge_method: nuslerp\n"), "at most 2"),
    ("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: a\n", "at least 3"),
    ("models:\n  - model: a\nmerge_method: nearswap\nbase_model: b\n", "'t'"),
    ("models:\n  - model: a\n  - model: b\nmerge_method: arcee_fusion\nbase_model: c\n", "at most 2"),
])
def test_contracts_are_checked_when_the_config_is_read(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(text, str(tmp_path / "c.yml"))
