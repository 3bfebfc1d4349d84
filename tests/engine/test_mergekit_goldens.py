"""mergekit 0.1.5's own numbers (tests/data/mergekit_goldens.json, written by benchmarks/mergekit_goldens.py
with mergekit installed) where mergebot must land on them exactly: karcher's float32 iteration near
convergence (inputs near 1.0, two of them identical), and which of several equal magnitudes a TIES or
breadcrumbs cut keeps (bf16-valued deltas merged in float32, as with `dtype: float32`)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.mergekit_goldens import inputs
from mergebot.engine.methods import METHODS
from mergebot.engine.methods.base import MergeCall
from tests.helpers import ROOT

GOLDENS = json.loads((ROOT / "tests" / "data" / "mergekit_goldens.json").read_text())["cases"]


def _cases(kind: str) -> list[dict]:
    return [c for c in GOLDENS if c["kind"] == kind]


@pytest.mark.parametrize("case", _cases("karcher"), ids=lambda c: f"{c['case']}-{c['n']}")
def test_karcher_lands_on_mergekits_numbers(case):
    xs = inputs(case["case"], case["n"], 3)
    call = MergeCall(xs, None, {"max_iter": 10, "tol": 1e-5}, [{}] * 3, shape=(case["n"],))
    got = METHODS["karcher"].merge(call)
    want = torch.tensor(case["out"], dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), float((got - want).abs().max())
    assert torch.equal(got, want)  # its own arithmetic: bit for bit


@pytest.mark.parametrize("kind,method", [("magnitude", "ties"), ("outliers", "breadcrumbs")])
def test_equal_magnitudes_at_a_cut_are_chosen_as_mergekit_chooses(kind, method):
    checked_ties = 0
    for case in _cases(kind):
        base, *others = inputs("ties", case["n"], 3)
        for x, want_delta in zip(others, case["out"]):
            per = {"weight": 1.0, "density": case["density"], "gamma": case.get("gamma", 0.01)}
            shared = {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False}
            call = MergeCall([base, x], 0, shared, [{}, per], shape=(case["n"],))
            got = METHODS[method].merge(call)
            want = base + torch.tensor(want_delta, dtype=torch.float32)
            assert torch.equal(got, want), (case["n"], case["density"])
            d, kept = (x - base).abs(), torch.tensor(want_delta) != 0
            cut = float(d[kept].min()) if kept.any() else 0.0  # the smallest kept magnitude
            checked_ties += cut > 0 and bool(((d == cut) & ~kept).any())  # an equal one was dropped
    assert checked_ties >= 3  # the data really puts equal magnitudes on both sides of cuts
