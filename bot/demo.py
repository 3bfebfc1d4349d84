"""`mergebot demo`: the whole pipeline offline, on small models it makes itself.

Three Llama-shaped models (a base and two "fine-tunes") with license front matter, a config in the style
of seed 001 (dare_ties with per-filter gradients), then merge -> quality check -> license check -> card -> the
list of files a `--push-to` would commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergebot.builds.base import MergeOptions
from mergebot.check.gate import GateOptions
from mergebot.config.dense import load_config
from mergebot.pipeline import PipelineResult, run
from mergebot.tinymodels import make_family

LICENSES = ("apache-2.0", "apache-2.0", "mit")

CONFIG = """\
# A mergebot demo: DARE-TIES of two fine-tunes onto their base, with per-filter layer gradients.
models:
  - model: models/base
  - model: models/ft1
    parameters:
      density: 0.6
      weight:
        - filter: mlp
          value: [0.7, 0.5, 0.3]
        - filter: self_attn
          value: [0.3, 0.5, 0.7]
        - value: 0.5
  - model: models/ft2
    parameters:
      density: 0.5
      weight: 0.4
merge_method: dare_ties
base_model: models/base
dtype: bfloat16
"""


def make_workspace(root: Path) -> Path:
    """Models and config under root (idempotent); returns the config path."""
    models = root / "models"
    if not (models / "ft2" / "config.json").exists():
        dirs = make_family(models, 3, seed=2024, dtype=torch.bfloat16, vocab=256, hidden=64, inter=128,
                           layers=6, heads=4, kv_heads=2)
        for d, lic in zip(dirs, LICENSES):
            (d / "README.md").write_text(f"---\nlicense: {lic}\nlanguage:\n- en\npipeline_tag: text-generation\n---\n"
                                         f"# {d.name}\nA tiny demo model made by mergebot.\n")
    cfg = root / "merge.yml"
    cfg.write_text(CONFIG)
    return cfg


def run_demo(root: Path, *, progress: bool = True) -> PipelineResult:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = make_workspace(root)
    cfg = load_config(cfg_path)
    cwd = os.getcwd()
    os.chdir(root)  # the config's model paths are relative to it, as a user's would be
    try:
        # the quality gate a --push-to would run, so the demo's card shows the evaluation table too
        return run(cfg, root / "out", MergeOptions(random_seed=42, force=True, progress=progress),
                   check=GateOptions(device="cpu"))
    finally:
        os.chdir(cwd)
