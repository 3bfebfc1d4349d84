"""Writes tests/data/mergekit_goldens.json: mergekit 0.1.5's own outputs on formula-made inputs, for the cases
where mergebot follows its arithmetic or its tie order (karcher near convergence, equal magnitudes at TIES and
breadcrumbs cuts, SCE's top-k). Not part of the suite: run it with mergekit installed, commit the JSON.

Usage: /path/to/mergekit-venv/bin/python benchmarks/mergekit_goldens.py

Karcher's float32 iteration calls torch.dot, which is MKL's sdot on the CPU: MKL picks its kernel by CPU, and on
some CPUs (seen on a Sapphire Rapids VM) its summation order differs in the last bit from others'. Both
mergekit and mergebot call it, so they agree on any one machine, but recorded numbers hold only on MKL's
path that recorded them: the goldens are made, and checked, with MKL_CBWR=COMPATIBLE (its reproducible path,
the same on every x86 CPU), set here before torch loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "COMPATIBLE")  # before torch loads MKL (see above)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "mergekit_goldens.json"


def inputs(case: str, n: int, k: int) -> list[torch.Tensor]:
    """Deterministic float32 inputs (no RNG): see tests/test_mergekit_goldens.py, which rebuilds them."""
    i = torch.arange(n, dtype=torch.float64)
    out = []
    for m in range(k):
        if case == "near_one":  # layernorm-like: all near 1.0, the first two identical
            v = 1.0 + 1e-3 * torch.sin(i * 0.7 + (0 if m < 2 else 1.3)) * (1 if m < 2 else 1.01)
        elif case == "plain":
            v = 0.05 * torch.sin(i * (0.37 + 0.05 * m)) + 0.01 * m
        else:  # "ties": bf16-rounded values, so deltas repeat and cuts meet equal magnitudes
            v = (0.02 * torch.round(8 * torch.sin(i * (0.9 + 0.2 * m)))).to(torch.bfloat16).double()
        out.append(v.float())
    return out


def main() -> None:
    from mergekit.merge_methods.karcher import karcher_merge_tensors
    from mergekit.sparsify import magnitude, magnitude_outliers

    cases = []
    for case in ("near_one", "plain"):
        for n in (7, 64, 896, 4096):
            xs = inputs(case, n, 3)
            got = karcher_merge_tensors(xs, [1 / 3] * 3)
            cases.append({"kind": "karcher", "case": case, "n": n, "out": got.tolist()})
    for n in (12, 200, 3000):
        base, *others = inputs("ties", n, 3)
        for density in (0.3, 0.55):
            cases.append({"kind": "magnitude", "n": n, "density": density,
                          "out": [magnitude(x - base, density).tolist() for x in others]})
            cases.append({"kind": "outliers", "n": n, "density": density, "gamma": 0.05,
                          "out": [magnitude_outliers(x - base, density, gamma=0.05).tolist() for x in others]})
    OUT.write_text(json.dumps({"source": "mergekit 0.1.5, torch " + torch.__version__, "cases": cases}) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
