"""Parameter resolution, merge-semantics.md §1.3."""

import pytest

from mergebot.config.params import evaluate, interpolate, resolve
from mergebot.config.spec import Param


def test_gradient_over_8_layers_matches_spec_example():
    got = [interpolate([0.3, 0.25, 0.25, 0.15, 0.1], k / 7, float) for k in range(8)]
    assert got == pytest.approx([0.3, 0.27143, 0.25, 0.25, 0.22143, 0.16429, 0.12857, 0.1], abs=5e-6)


def test_gradient_over_32_layers_matches_spec_example():
    got = {k: interpolate([0.3, 0.25, 0.25, 0.15, 0.1], k / 31, float) for k in (0, 8, 16, 24, 31)}
    assert got == pytest.approx({0: 0.3, 8: 0.25, 16: 0.24355, 24: 0.14516, 31: 0.1}, abs=5e-6)


def test_scientific_notation_bool_and_int_gradients():
    assert interpolate(["1e-5", "1e-3"], 0.5, float) == pytest.approx(0.000505)
    assert interpolate([0, 1], 0.5, bool) is False
    assert interpolate([2, 4], 0.5, int) == 3


def test_filters_first_match_and_fallback():
    setting = [{"filter": "self_attn", "value": 1.0}, {"filter": "attn", "value": 2.0}, {"value": 3.0}]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0, float) == 1.0
    assert evaluate(setting, "model.layers.0.cross_attn.q_proj.weight", 0, float) == 2.0
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0, float) == 3.0
    # no fallback: not set at this level
    assert evaluate(setting[:1], "lm_head.weight", 0, float) is None
    # filters are case-sensitive substrings, not globs
    assert evaluate([{"filter": "Self_attn", "value": 1}], "self_attn", 0, float) is None
    assert evaluate([{"filter": "*", "value": 4}], "anything", 0, float) == 4.0


def test_precedence_first_scope_with_a_value_wins():
    p = Param("weight", float, "input")
    source = {"weight": [{"filter": "mlp", "value": 0.9}]}
    slice_ = {"weight": 0.5}
    glob = {"weight": 0.1}
    assert resolve([source, slice_, glob], p, "x.mlp.y", 0) == 0.9
    assert resolve([source, slice_, glob], p, "x.attn.y", 0) == 0.5  # source filter did not match
    assert resolve([{}, {}, glob], p, "x", 0) == 0.1
    assert resolve([{}, {}, {}], Param("normalize", bool, "shared", True), "x", 0) is True
