"""Differential check against mergekit 0.1.5 on the same tiny seeded models (not part of the test suite).

Usage: python benchmarks/compare_mergekit.py --mergekit /path/to/venv/bin/mergekit-yaml
Runs each config through mergekit-yaml and `mergebot merge`, and prints the largest absolute difference per
method (float32 inputs: mergebot must match within float32 rounding; bf16 inputs show the effect of
mergebot's float32 math where mergekit computes in bf16).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergebot.tinymodels import load_tensors, make_family  # noqa: E402

CONFIGS = {
    "linear": "models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
              "merge_method: linear\n",
    "linear_gradient_filters": "models:\n  - model: {a}\n    parameters:\n      weight:\n        - filter: mlp\n"
              "          value: [0.1, 0.9]\n        - value: 0.5\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
              "merge_method: linear\nparameters: {{normalize: false}}\n",
    "slerp": "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 6]\n      - model: {a}\n"
             "        layer_range: [0, 6]\nmerge_method: slerp\nbase_model: {base}\nparameters:\n  t:\n"
             "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
             "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n",
    "task_arithmetic": "models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
                       "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 1.2}}\n",
    "ties": "models:\n  - model: {a}\n    parameters: {{weight: 1.0, density: [1, 0.7, 0.1]}}\n  - model: {b}\n"
            "    parameters: {{weight: [0, 0.3, 0.7, 1], density: 0.5}}\nmerge_method: ties\nbase_model: {base}\n"
            "parameters: {{normalize: true, int8_mask: true}}\n",
    "dare_ties_density1": "models:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 1.0}}\n  - model: {b}\n"
                          "    parameters: {{weight: 0.5, density: 1.0}}\nmerge_method: dare_ties\nbase_model: {base}\n",
    "nuslerp": "models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
               "merge_method: nuslerp\nbase_model: {base}\n",
    "nuslerp_rowwise": "models:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n"
                       "merge_method: nuslerp\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
    "multislerp": "models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
                  "merge_method: multislerp\nbase_model: {base}\n",
    "karcher": "models:\n  - model: {base}\n  - model: {a}\n  - model: {b}\nmerge_method: karcher\n",
    "model_stock": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: model_stock\nbase_model: {base}\n",
    "model_stock_filter_wise": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: model_stock\nbase_model: {base}\n"
                               "parameters: {{filter_wise: true}}\n",
    "breadcrumbs_ties": "models:\n  - model: {a}\n    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}\n  - model: {b}\n"
                        "    parameters: {{weight: 0.4, density: 0.7}}\nmerge_method: breadcrumbs_ties\nbase_model: {base}\n",
    "sce": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\n",
    "ram": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: ram\nbase_model: {base}\nparameters: {{epsilon: 0.01}}\n",
    "ramplus_tl": "models:\n  - model: {a}\n  - model: {b}\nmerge_method: ramplus_tl\nbase_model: {base}\n"
                  "parameters: {{epsilon: 0.01}}\n",
    "nearswap": "models:\n  - model: {base}\n  - model: {a}\nmerge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.01}}\n",
    "arcee_fusion": "models:\n  - model: {base}\n  - model: {a}\nmerge_method: arcee_fusion\nbase_model: {base}\n",
    "passthrough_stack": "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 4]\n  - sources:\n"
                         "      - model: {a}\n        layer_range: [2, 6]\nmerge_method: passthrough\n",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", required=True, help="path to mergekit-yaml (mergekit 0.1.5)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--config-dtype", default=None, choices=["float32", "float64"],
                    help="append `dtype: X` to every config: bf16-valued models merged in float32 by both tools, "
                         "where equal magnitudes at cuts are common (the tie-order check)")
    ap.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mb-vs-mk-"))
    dtype = getattr(torch, args.dtype)
    base, a, b = make_family(tmp / "models", 3, seed=11, dtype=dtype, layers=6, hidden=64, inter=96, vocab=128)
    print(f"{'config':26s} {'max |mergebot - mergekit|':>26s} {'max |value|':>12s}  tensors")
    for name, text in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        cfg = tmp / f"{name}.yml"
        cfg.write_text(text.format(base=base, a=a, b=b) + (f"dtype: {args.config_dtype}\n" if args.config_dtype else ""))
        mk, mb = tmp / f"mk-{name}", tmp / f"mb-{name}"
        r1 = subprocess.run([args.mergekit, str(cfg), str(mk), "--random-seed", "1"], capture_output=True, text=True)
        r2 = subprocess.run([sys.executable, "-m", "mergebot.cli.main", "merge", str(cfg), str(mb), "--quiet"],
                            capture_output=True, text=True, cwd=ROOT)
        if r1.returncode or r2.returncode:
            print(f"{name:26s} failed: mergekit rc={r1.returncode} {r1.stderr[-300:]!r} mergebot rc={r2.returncode} {r2.stderr[-300:]!r}")
            continue
        x, y = load_tensors(mk), load_tensors(mb)
        if set(x) != set(y):
            print(f"{name:26s} tensor names differ: {sorted(set(x) ^ set(y))[:4]}")
            continue
        diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
        same = sum(torch.equal(x[k], y[k]) for k in x)
        mag = max(float(x[k].double().abs().max()) for k in x)
        print(f"{name:26s} {diff:26.3g} {mag:12.3g}  {same}/{len(x)} bit-identical")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
