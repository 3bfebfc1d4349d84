"""mergekit 0.1.5's own numbers (tests/data/mergekit_goldens.json, written by benchmarks/mergekit_goldens.py
with mergekit installed) where mergebot must land on them exactly: karcher's float32 iteration near
convergence (inputs near 1.0, two of them identical), and which of several equal magnitudes a TIES or
breadcrumbs cut keeps (bf16-valued deltas merged in float32, as with `dtype: float32`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.mergekit_goldens import inputs
from mergebot.engine.methods import METHODS
from mergebot.engine.methods.base import MergeCall
from tests.helpers import ROOT

GOLDENS = json.loads((ROOT / "tests" / "data" / "mergekit_goldens.json").read_text())["cases"]


def _cases(kind: str) -> list[dict]:
    return [c for c in GOLDENS if c["kind"] == kind]


KARCHER = """
import json, sys
import torch
from benchmarks.mergekit_goldens import inputs
from mergebot.engine.methods import METHODS
from mergebot.engine.methods.base import MergeCall
outs = []
for case, n in json.loads(sys.argv[1]):
    call = MergeCall(inputs(case, n, 3), None, {"max_iter": 10, "tol": 1e-5}, [{}] * 3, shape=(n,))
    outs.append(METHODS["karcher"].merge(call).tolist())
print(json.dumps(outs))
"""


def test_karcher_lands_on_mergekits_numbers():
    """Near convergence karcher follows mergekit's float32 arithmetic op for op, so it lands on mergekit's own
    numbers bit for bit. Its dot products are MKL's, whose kernel (and last bit) depends on the CPU; the goldens
    were recorded on MKL's reproducible path (benchmarks/mergekit_goldens.py), so the merges run in a process
    on that path too (MKL_CBWR=COMPATIBLE, which MKL reads once, when it loads)."""
    cases = _cases("karcher")
    env = dict(os.environ, MKL_CBWR="COMPATIBLE")
    r = subprocess.run([sys.executable, "-c", KARCHER, json.dumps([[c["case"], c["n"]] for c in cases])], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    for case, out in zip(cases, json.loads(r.stdout)):
        got, want = torch.tensor(out, dtype=torch.float32), torch.tensor(case["out"], dtype=torch.float32)
        label = f"{case['case']}-{case['n']}"
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (label, float((got - want).abs().max()))
        assert torch.equal(got, want), label  # its own arithmetic: bit for bit


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
