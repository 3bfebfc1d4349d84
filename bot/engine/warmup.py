"""Compile the fused kernels ahead of time, so a fresh container's first merge runs at warm speed (issue 13).

Every GitHub Action run starts a fresh container, where Inductor would compile each fused kernel again
(15-30 s per method on 2 cores). The image build runs `python -m mergebot.engine.warmup` instead: it merges
small synthetic Llama-shaped parents with each fused method and leaves the compiled kernels in
TORCHINDUCTOR_CACHE_DIR, baked into the image.

One warm-up serves every model size, thread count and CPU of the same ISA: kernels are compiled with dynamic
shapes (the parents' tensors cover each size branch the kernels have: below one exact-sum block, whole
blocks, a remainder, more than one executor chunk), with the thread count read at run time
(`fuse.configure` sets Inductor's dynamic_threads) and, in the image, a pinned -march and vector ISA
(MERGEBOT_PORTABLE_KERNELS, set by the Dockerfile). Each merge traces its kernels as a fresh process would
(`fuse.configure` resets Dynamo), so the graphs compiled here, several methods in one process, are the ones a
single merge looks up. `--expect-warm` checks all this: it fails when the merges compiled anything.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# {b}: base, {x}, {y}: the two fine-tunes; {n}: their layer count, {h}: half of it. Parameters as users
# write them; every method of mergekit 0.1.5
# (benchmarks/bench_methods.py runs the same configs).
CONFIGS = {
    "linear": "models:\n  - model: {x}\n    parameters: {{weight: 0.5}}\n  - model: {y}\n    parameters: {{weight: 0.5}}\n"
              "merge_method: linear\n",
    "slerp": "models:\n  - model: {b}\n  - model: {x}\nmerge_method: slerp\nbase_model: {b}\nparameters:\n  t: [0, 0.5, 1]\n",
    "nuslerp": "models:\n  - model: {x}\n    parameters: {{weight: 0.6}}\n  - model: {y}\n    parameters: {{weight: 0.4}}\n"
               "merge_method: nuslerp\nbase_model: {b}\n",
    "multislerp": "models:\n  - model: {x}\n    parameters: {{weight: 0.5}}\n  - model: {y}\n    parameters: {{weight: 0.5}}\n"
                  "merge_method: multislerp\nbase_model: {b}\n",
    "karcher": "models:\n  - model: {b}\n  - model: {x}\n  - model: {y}\nmerge_method: karcher\n",
    "passthrough": "slices:\n  - sources:\n      - model: {b}\n        layer_range: [0, {h}]\n  - sources:\n"
                   "      - model: {x}\n        layer_range: [{h}, {n}]\nmerge_method: passthrough\n",
    "model_stock": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: model_stock\nbase_model: {b}\n",
    "task_arithmetic": "models:\n  - model: {x}\n    parameters: {{weight: 0.6}}\n  - model: {y}\n"
                       "    parameters: {{weight: 0.4}}\nmerge_method: task_arithmetic\nbase_model: {b}\n",
    "ties": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {y}\n"
            "    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\nbase_model: {b}\n",
    "dare_ties": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {y}\n"
                 "    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: dare_ties\nbase_model: {b}\n",
    "dare_linear": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {y}\n"
                   "    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: dare_linear\nbase_model: {b}\n",
    "breadcrumbs": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.8, gamma: 0.01}}\n  - model: {y}\n"
                   "    parameters: {{weight: 0.5, density: 0.8, gamma: 0.01}}\nmerge_method: breadcrumbs\n"
                   "base_model: {b}\n",
    "breadcrumbs_ties": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.8, gamma: 0.01}}\n"
                        "  - model: {y}\n    parameters: {{weight: 0.5, density: 0.8, gamma: 0.01}}\n"
                        "merge_method: breadcrumbs_ties\nbase_model: {b}\n",
    "della": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n  - model: {y}\n"
             "    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\nmerge_method: della\nbase_model: {b}\n",
    "della_linear": "models:\n  - model: {x}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n  - model: {y}\n"
                    "    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\nmerge_method: della_linear\n"
                    "base_model: {b}\n",
    "sce": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: sce\nbase_model: {b}\nparameters: {{select_topk: 0.5}}\n",
    "ram": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: ram\nbase_model: {b}\nparameters: {{epsilon: 0.001}}\n",
    "ramplus_tl": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: ramplus_tl\nbase_model: {b}\n"
                  "parameters: {{epsilon: 0.001}}\n",
    "nearswap": "models:\n  - model: {b}\n  - model: {x}\nmerge_method: nearswap\nbase_model: {b}\nparameters: {{t: 0.001}}\n",
    "arcee_fusion": "models:\n  - model: {b}\n  - model: {x}\nmerge_method: arcee_fusion\nbase_model: {b}\n",
}

# 2 layers, hidden 576: an 18.4M-element embedding (more than one 16M executor chunk, whose first chunk is whole
# exact-sum blocks), 331776-element projections (blocks plus a remainder) and 576-element norms (under a block)
SHAPE: dict[str, Any] = dict(vocab=32000, hidden=576, inter=1536, layers=2, heads=9, kv_heads=3)
DTYPES = ("bfloat16", "float16", "float32")


def fused_methods() -> list[str]:
    """The methods whose kernels are compiled (the others run one in-place eager form in every mode)."""
    from mergebot.engine.methods import METHODS
    return [name for name in CONFIGS if METHODS[name].fuse]


def _kernel_files(cache: Path) -> set[Path]:
    return {p for p in cache.rglob("*") if p.suffix in (".so", ".cpp") or "fxgraph" in p.parts} if cache.is_dir() else set()


def warm(methods: list[str], dtypes: list[str], threads: int | None = None, log=print) -> list[Path]:
    """Merge synthetic parents with each method in each parent dtype (kernels compiled on); returns the kernel
    files this added to the cache."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from mergebot.cli.main import main as mergebot
    from mergebot.tinymodels import llama_config, llama_tensors, save_model

    cache = Path(cache_dir())
    before = _kernel_files(cache)
    cfg = llama_config(**SHAPE)
    with tempfile.TemporaryDirectory(prefix="mergebot-warmup-") as tmp:
        root = Path(tmp)
        base = llama_tensors(cfg, 0)
        parents = {"b": base}
        for i, key in enumerate(("x", "y"), 1):
            g = torch.Generator().manual_seed(i)
            parents[key] = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for dtype in dtypes:
            dirs = {k: save_model(root / dtype / k, cfg, t, dtype=getattr(torch, dtype), shards=2)
                    for k, t in parents.items()}
            for name in methods:
                t0 = time.perf_counter()
                config = root / f"{name}-{dtype}.yml"
                config.write_text(CONFIGS[name].format(h=SHAPE["layers"] // 2, n=SHAPE["layers"],
                                                     **{k: str(d) for k, d in dirs.items()}))
                argv = ["merge", str(config), str(root / "out"), "--compile", "on", "--quiet", "--force"]
                if threads:
                    argv += ["-j", str(threads)]
                rc = mergebot(argv)
                if rc:
                    raise SystemExit(f"warmup: merging {name} ({dtype}) failed (exit {rc})")
                log(f"warmup: {name:17} {dtype:9} {time.perf_counter() - t0:6.1f} s")
    return sorted(_kernel_files(cache) - before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mergebot.engine.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="all", help="comma-separated, or all (default): every fused method")
    ap.add_argument("--dtypes", default="bfloat16", help=f"parent dtypes, comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument("-j", "--threads", type=int, default=None, help="torch CPU threads for the merges")
    ap.add_argument("--expect-warm", action="store_true",
                    help="fail when any kernel had to be compiled (the cache should have held them all)")
    args = ap.parse_args(argv)
    fused = fused_methods()
    methods = fused if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CONFIGS]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if unknown or bad:
        ap.error(f"unknown method(s) {unknown} or dtype(s) {bad}")
    t0 = time.perf_counter()
    added = warm(methods, dtypes, args.threads)
    print(f"warmup: {len(methods)} method(s) x {len(dtypes)} dtype(s) in {time.perf_counter() - t0:.1f} s, "
          f"{len(added)} kernel file(s) added to the cache")
    if args.expect_warm and added:
        print("warmup: FAILED: kernels were compiled although the cache should have held them:", file=sys.stderr)
        for p in added[:20]:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
