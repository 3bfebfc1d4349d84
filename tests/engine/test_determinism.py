"""README promise: identical bytes whatever the thread count, chunk size or compile mode, for every method that
reduces over a tensor (DARE/DELLA's L1 rescale, slerp's norms, Gram matrices, counts, variances, cuts).

Each setting runs the real CLI (`mergebot merge`) in its own process, so OMP_NUM_THREADS really sets torch's
thread pool and nothing is shared between settings; the tensors are several times the chunk size the
settings force (MERGEBOT_CHUNK_ELEMS), so chunked reductions and compiled kernels both engage.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergebot.tinymodels import make_family
from tests.helpers import ROOT

# One YAML per method family that reduces; {b} is the base, {x} and {y} the fine-tunes.
CONFIGS = {
    "dare_ties": "models:\n  - model: {x}\n    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {y}\n"
                 "    parameters: {{weight: 0.5, density: 0.7}}\nmerge_method: dare_ties\nbase_model: {b}\n",
    "dare_linear": "models:\n  - model: {x}\n    parameters: {{weight: 0.6, density: 0.3}}\n  - model: {y}\n"
                   "    parameters: {{weight: 0.4, density: 0.5}}\nmerge_method: dare_linear\nbase_model: {b}\n",
    "della": "models:\n  - model: {x}\n    parameters: {{weight: 0.6, density: 0.4, epsilon: 0.1}}\n  - model: {y}\n"
             "    parameters: {{weight: 0.5, density: 0.6, epsilon: 0.2}}\nmerge_method: della\nbase_model: {b}\n",
    "ties": "models:\n  - model: {x}\n    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {y}\n"
            "    parameters: {{weight: 0.5, density: 0.7}}\nmerge_method: ties\nbase_model: {b}\n"
            "parameters: {{rescale: true}}\n",
    "breadcrumbs": "models:\n  - model: {x}\n    parameters: {{weight: 0.6, density: 0.8, gamma: 0.02}}\n  - model: {y}\n"
                   "    parameters: {{weight: 0.5, density: 0.7}}\nmerge_method: breadcrumbs_ties\nbase_model: {b}\n"
                   "parameters: {{rescale: true}}\n",
    "slerp": "models:\n  - model: {b}\n  - model: {x}\nmerge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.3}}\n",
    "nuslerp": "models:\n  - model: {x}\n    parameters: {{weight: 0.7}}\n  - model: {y}\n    parameters: {{weight: 0.3}}\n"
               "merge_method: nuslerp\nbase_model: {b}\n",
    "multislerp": "models:\n  - model: {x}\n    parameters: {{weight: 0.5}}\n  - model: {y}\n"
                  "    parameters: {{weight: 0.5}}\nmerge_method: multislerp\nbase_model: {b}\n",
    "karcher": "models:\n  - model: {b}\n  - model: {x}\n  - model: {y}\nmerge_method: karcher\n",
    "model_stock": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: model_stock\nbase_model: {b}\n",
    "sce": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: sce\nbase_model: {b}\nparameters: {{select_topk: 0.6}}\n",
    "ramplus_tl": "models:\n  - model: {x}\n  - model: {y}\nmerge_method: ramplus_tl\nbase_model: {b}\n"
                  "parameters: {{epsilon: 0.01}}\n",
}

DRIVER = """
import sys
from mergebot.cli.main import main
for cfg, out in zip(sys.argv[2::2], sys.argv[3::2]):
    rc = main(["merge", cfg, out, "--random-seed", "7", "--compile", sys.argv[1], "--quiet"])
    if rc:
        sys.exit(rc)
"""

# (threads, chunk elements or None for the defaults, compile): the defaults hand these tensors over whole;
# 65536 and 131072 cut the largest into 8 and 4 chunks.
SETTINGS = [(1, None, "off"), (2, 65536, "off"), (3, 131072, "off")]
COMPILED = [(1, None, "on"), (4, 65536, "on")]


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> list[Path]:
    # bf16 (deltas repeat, so magnitude cuts have ties); embedding 2048 x 256 = 8 exact-sum blocks
    return make_family(tmp_path_factory.mktemp("wide"), 3, seed=5, dtype=torch.bfloat16, layers=2, hidden=256,
                       inter=768, vocab=2048, heads=4, kv_heads=2)


def _run(tmp: Path, family: list[Path], names: list[str], threads: int, chunk: int | None, compile: str) -> dict:
    b, x, y = family
    tag = f"t{threads}-c{chunk}-{compile}"
    args = []
    for name in names:
        cfg = tmp / f"{name}.yml"
        cfg.write_text(CONFIGS[name].format(b=b, x=x, y=y))
        args += [str(cfg), str(tmp / tag / name)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("MERGEBOT_CHUNK_ELEMS", None)
    if chunk:
        env["MERGEBOT_CHUNK_ELEMS"] = str(chunk)
    done = subprocess.run([sys.executable, "-c", DRIVER, compile, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {name: hashlib.sha256((tmp / tag / name / "model.safetensors").read_bytes()).hexdigest() for name in names}


def test_every_reducing_method_same_bytes_across_threads_and_chunks(wide_family, tmp_path):
    names = list(CONFIGS)
    runs = [_run(tmp_path, wide_family, names, *s) for s in SETTINGS]
    for name in names:
        digests = {s: r[name] for s, r in zip(SETTINGS, runs)}
        assert len(set(digests.values())) == 1, (name, digests)


def test_compiled_kernels_same_bytes_as_eager(wide_family, tmp_path):
    """The fused (torch.compile) kernels against the eager ones, at two thread counts and chunkings."""
    pytest.importorskip("torch._inductor")
    from mergebot.engine import fuse
    if not fuse.compiler_available():
        pytest.skip("no C compiler: torch.compile cannot build CPU kernels here")
    names = ["dare_ties", "ties", "slerp"]
    eager = _run(tmp_path, wide_family, names, 2, 65536, "off")
    for setting in COMPILED:
        assert _run(tmp_path, wide_family, names, *setting) == eager, setting
