"""Golden values: the published bits of every random draw. A change to the hash RNG, the stream keys or the
DARE/DELLA kernels changes every mask a published merge was built with, so it must fail here, loudly, and be
a deliberate, documented decision (new literals, a note in the README).

The inputs are a formula (no torch RNG, whose draws could change between torch versions), and the results are
literal digests: no code under test computes its own expectation.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from mergebot.engine import rng
from mergebot.tinymodels import llama_config, llama_tensors, load_tensors, save_model
from tests.helpers import merge_yaml

KEY = rng.stream_key(42, "model.layers.0.mlp.up_proj.weight", 1)


def test_stream_key_and_first_hash_values():
    assert KEY == GOLDEN_KEY
    assert rng.stream_key(0, "", 0) == GOLDEN_KEY_ZERO
    assert rng.stream_key(1 << 40, "lm_head.weight", 3) == GOLDEN_KEY_WIDE  # seeds past 32 bits reach the key
    assert rng.hash_u32(torch.arange(8), KEY).tolist() == GOLDEN_HASHES
    # past 2**32: the high index word enters the hash
    assert rng.hash_u32(torch.tensor([1 << 32, (1 << 32) + 1]), KEY).tolist() == GOLDEN_HASHES_HIGH
    # the int32 kernel form keeps exactly the same entries
    idx = torch.arange(4096, dtype=torch.int32)
    s = rng.Stream32.of(KEY, 0, 4096, rng.threshold(0.3))
    assert torch.equal(rng.keep32(idx, *s.args()), rng.keep_mask(0, 4096, KEY, 0.3))
    assert int(rng.keep_mask(0, 4096, KEY, 0.3).sum()) == GOLDEN_KEPT_OF_4096


def _formula_family(root: Path) -> list[Path]:
    """base and two fine-tunes whose values are sines of the element index (bf16, so deltas repeat)."""
    cfg = llama_config(vocab=64, hidden=32, layers=2, inter=48)
    shapes = {k: v.shape for k, v in llama_tensors(cfg, 0).items()}
    dirs = []
    for m in range(3):
        tensors = {}
        for j, (name, shape) in enumerate(sorted(shapes.items())):
            i = torch.arange(math.prod(shape), dtype=torch.float64)
            v = 0.05 * torch.sin(i * (0.37 + 0.011 * j)) + (0.004 * m) * torch.cos(i * (1.3 + 0.1 * m) + j)
            tensors[name] = (v + (1.0 if name.endswith("norm.weight") else 0.0)).reshape(shape).float()
        dirs.append(save_model(root / f"m{m}", cfg, tensors, dtype=torch.bfloat16))
    return dirs


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_dare_and_della_results_are_pinned(tmp_path):
    base, x, y = _formula_family(tmp_path)
    base_up = load_tensors(base)["model.layers.0.mlp.up_proj.weight"]
    per = "{weight: 0.6, density: 0.4, epsilon: 0.1}"
    got = {}
    for method in ("dare_ties", "della"):
        text = (f"models:\n  - model: {x}\n    parameters: {per}\n  - model: {y}\n    parameters: {per}\n"
                f"merge_method: {method}\nbase_model: {base}\n")
        out = merge_yaml(tmp_path, text, name=method, random_seed=1234)
        # entries where every delta was dropped (or voted down) keep the base's value
        unchanged = float((out["model.layers.0.mlp.up_proj.weight"] == base_up).float().mean())
        got[method] = (_digest(out), round(unchanged, 4))
    assert got == {"dare_ties": GOLDEN_DARE, "della": GOLDEN_DELLA}


# ---- the literals: computed once (mergebot 0.1.0, exact L1 sums); changing them changes published merges ----
GOLDEN_KEY = 37840708
GOLDEN_KEY_ZERO = 2077607535
GOLDEN_KEY_WIDE = 2420487515
GOLDEN_HASHES = [3359495919, 3021158131, 215159814, 607452534, 973090278, 2766548786, 224412959, 1044148719]
GOLDEN_HASHES_HIGH = [265937965, 1168398695]
GOLDEN_KEPT_OF_4096 = 1212
GOLDEN_DARE = ("108fabe092f5efe34102879d0f88ec32ef0a95be94cfa8c91d6467be709b744c", 0.3633)
GOLDEN_DELLA = ("228ad47ce5493d617dc36d79f8ea3458b0180d4c43d2a8f0be139b94a4ff2535", 0.3626)
