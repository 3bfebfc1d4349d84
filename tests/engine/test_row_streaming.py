"""Methods that need whole rows stream them in row blocks (bot/methods/_rows.py): DELLA (merge-semantics.md
§2.7), row-wise nuslerp (§2.3) and filter_wise model_stock (§2.10) give the same bytes block by block as over
the whole tensor at once, and their memory stays near one block whatever the tensor size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergebot.engine import exact
from mergebot.engine.methods import METHODS, _rows
from mergebot.engine.methods.base import MergeCall
from mergebot.tinymodels import load_tensors, make_family
from tests.helpers import ROOT, merge_yaml, models_yaml

TINY = 100  # elements per block: 3 rows of the tiny models' 32-wide matrices, 2 of their 48-wide ones
WHOLE = 1 << 40


_models = models_yaml


def _configs(base: Path, a: Path, b: Path, c: Path | None = None) -> dict[str, str]:
    della = _models((base, None), (a, "{weight: 0.6, density: 0.5, epsilon: 0.2}"),
                    (b, "{weight: 0.4, density: 0.3, epsilon: 0.1}"))
    mixed = _models((base, None), (a, "{weight: 0.6, density: 0.5, epsilon: 0.2}"), (b, "{weight: 0.4, density: 1.0}"))
    if c is not None:
        mixed += f"  - model: {c}\n    parameters: {{weight: 0.3, density: 0.0}}\n"
    pair = _models((a, "{weight: 0.7}"), (b, "{weight: 0.3}")) + "merge_method: nuslerp\n"
    return {
        "della": della + f"merge_method: della\nbase_model: {base}\nparameters: {{lambda: 0.9}}\n",
        "della_linear": della + f"merge_method: della_linear\nbase_model: {base}\n",
        "della_no_rescale": della + f"merge_method: della\nbase_model: {base}\nparameters: {{rescale: false}}\n",
        "della_density_0_and_1": mixed + f"merge_method: della\nbase_model: {base}\n",
        "nuslerp_rows": pair + "parameters: {nuslerp_flatten: false}\n",
        "nuslerp_rows_base": pair + f"base_model: {base}\nparameters: {{nuslerp_flatten: false}}\n",
        "nuslerp_columns": pair + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
        "nuslerp_columns_base": pair + f"base_model: {base}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
        "model_stock_filter_wise": _models((base, None), (a, None), (b, None))
                                   + f"merge_method: model_stock\nbase_model: {base}\nparameters: {{filter_wise: true}}\n",
    }


def _streamed_and_whole(tmp_path: Path, monkeypatch, text: str) -> tuple[dict, dict]:
    monkeypatch.setattr(exact, "BLOCK", 16)  # exact sums' blocks small enough for tiny row blocks to align
    monkeypatch.setattr(_rows, "ROW_BLOCK_ELEMS", TINY)
    small = merge_yaml(tmp_path, text, name="small", random_seed=11)
    monkeypatch.setattr(_rows, "ROW_BLOCK_ELEMS", WHOLE)
    whole = merge_yaml(tmp_path, text, name="whole", random_seed=11)
    return small, whole


@pytest.mark.parametrize("case", list(_configs(*[Path(p) for p in "wxyz"])))
def test_row_blocks_give_the_whole_tensor_result(family, tmp_path, monkeypatch, case):
    small, whole = _streamed_and_whole(tmp_path, monkeypatch, _configs(*family)[case])
    assert small.keys() == whole.keys()
    for k in whole:
        assert torch.equal(small[k], whole[k]), (k, float((small[k] - whole[k]).abs().max()))


def test_della_bf16_row_blocks_give_the_whole_tensor_result(family_bf16, tmp_path, monkeypatch):
    base, a, b = family_bf16
    small, whole = _streamed_and_whole(tmp_path, monkeypatch, _configs(base, a, b)["della"])
    for k in whole:
        assert whole[k].dtype == torch.bfloat16
        assert torch.equal(small[k], whole[k]), k


def test_row_blocks_cut_whole_dim0_slices(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("meta")  # any non-CPU device takes the GPU block size
    monkeypatch.setattr(_rows, "ROW_BLOCK_ELEMS", 100)
    monkeypatch.setattr(exact, "BLOCK", 32)
    blocks = _rows.row_blocks((64, 32), 64 * 32, cpu)
    assert [(s, e) for s, e, _ in blocks[:2]] == [(0, 96), (96, 192)] and blocks[-1] == (2016, 2048, (1, 32))
    assert all(shape == ((e - s) // 32, 32) for s, e, shape in blocks)
    # rows of 300: 8 of them make a whole number of exact-sum blocks (2400 = 75 x 32), so blocks are 8 rows
    assert _rows.row_blocks((16, 300), 4800, cpu)[:2] == [(0, 2400, (8, 300)), (2400, 4800, (8, 300))]
    # the exact sums' blocks therefore never straddle a row block, on any device
    for shape in [(64, 32), (16, 300), (40, 24)]:
        n = shape[0] * shape[1]
        for dev in (cpu, gpu):
            assert all(s % 32 == 0 for s, _, _ in _rows.row_blocks(shape, n, dev)), (shape, dev)
    # rows that need too many slices to align (odd widths): the CPU's blocks on every device
    monkeypatch.setattr(_rows, "ALIGNED_MAX_ELEMS", 1000)
    assert _rows.row_blocks((4, 301), 1204, cpu) == _rows.row_blocks((4, 301), 1204, gpu)
    assert _rows.row_blocks((4, 301), 1204, cpu)[1] == (301, 602, (1, 301))  # a row wider than a block: one row
    assert _rows.row_blocks((5, 4, 6), 120, cpu) == [(0, 96, (4, 4, 6)), (96, 120, (1, 4, 6))]
    assert _rows.row_blocks((1000,), 1000, cpu) == [(0, 1000, (1000,))]  # below 2-D: one row, never cut
    assert _rows.row_blocks((), 1, cpu) == [(0, 1, (1,))]


CALLS = {
    "della": ({"rescale": True, "normalize": True, "lambda": 1.0},
              [{}, {"weight": 0.6, "density": 0.5, "epsilon": 0.2}, {"weight": 0.4, "density": 0.4, "epsilon": 0.3}]),
    "nuslerp": ({"nuslerp_flatten": False, "nuslerp_row_wise": False}, [{}, {"weight": 0.6}, {"weight": 0.4}]),
    "nuslerp_columns": ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{}, {"weight": 0.6}, {"weight": 0.4}]),
    "model_stock": ({"filter_wise": True}, [{}, {}, {}]),
}


@pytest.mark.parametrize("case", list(CALLS))
@pytest.mark.parametrize("shape", [(5, 4, 6), (7, 9), (13,)])
def test_row_blocks_of_any_rank_with_and_without_a_destination(monkeypatch, case, shape):
    """Direct calls: a 3-D tensor (DELLA ranks along dim 1, nuslerp/model_stock vectors along the last dim or
    dim 0), a matrix and a vector; into the executor's destination (`out`, returned as is) or a new tensor."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=g).reshape(-1) for _ in range(3)]
    shared, per_input = CALLS[case]
    method = METHODS[case.removesuffix("_columns")]

    monkeypatch.setattr(exact, "BLOCK", 2)  # row blocks of one or two rows still align with the exact sums

    def run(limit: int, out: torch.Tensor | None) -> torch.Tensor:
        monkeypatch.setattr(_rows, "ROW_BLOCK_ELEMS", limit)
        return method.merge(MergeCall(list(xs), 0, shared, per_input, keys=[5, 6, 7], out=out, shape=shape))

    whole = run(WHOLE, None).reshape(-1)
    dest = torch.full((xs[0].numel(),), float("nan"))
    small = run(1, dest)
    if len(shape) >= 2 or case == "model_stock":  # nuslerp takes a vector as one flat vector, not row by row
        assert small.data_ptr() == dest.data_ptr()
    assert torch.equal(small.reshape(-1), whole)
    assert not torch.equal(whole, xs[0])


MEASURE = r"""
import sys, threading, time
from pathlib import Path
import torch
from mergebot.config.dense import load_config
from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
from mergebot.engine.methods.task_arithmetic import della
della.MASK_CACHE_BYTES = 0  # the streaming bound itself; the mask cache trades up to 256 MB for half the time
torch.ones(1) + 1

def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon'):
            return int(line.split()[1]) * 1024

for cfg in sys.argv[1:]:
    peak, done = [0], []
    def poll():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    before = anon()
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        run_merge(load_config(cfg), Path(cfg).with_suffix(''), MergeOptions(progress=False, random_seed=0))
    finally:
        done.append(1)
        thread.join()
    print(max(peak[0], anon()) - before)
"""


def test_memory_stays_near_a_row_block_for_a_big_tensor(tmp_path):
    """One 8M-element float32 matrix (32 MB per model; its float32 copies for all three inputs would be 96 MB,
    several times that with DELLA's ranks): the anonymous memory a merge adds, sampled while it runs (file
    pages of the mapped inputs and output are not anonymous), stays below 1.5 times one input's size."""
    base, a, b = make_family(tmp_path / "m", 3, seed=4, vocab=8192, hidden=1024, inter=16, heads=8, kv_heads=8,
                             layers=1, tie=True)
    size = 8192 * 1024 * 4
    configs = {name: text for name, text in _configs(base, a, b).items()
               if name in ("della", "nuslerp_columns_base", "model_stock_filter_wise")}
    # arcee_fusion also holds its 1M-entry quantile sample and the int64 hash temporaries that draw it: 100-130 MB
    # (129 MB seen under a loaded xdist run), a constant whatever the tensor size (the whole-tensor code needed
    # ~6 float32 copies of it)
    configs["arcee_fusion"] = _models((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n"
    paths = []
    for name, text in configs.items():
        paths.append(tmp_path / f"{name}.yml")
        paths[-1].write_text(text)
    r = subprocess.run([sys.executable, "-c", MEASURE, *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    growth = dict(zip(configs, map(int, r.stdout.split())))
    assert len(growth) == 4
    print({name: round(g / 2**20, 1) for name, g in growth.items()})
    for name, g in growth.items():
        assert g < 1.5 * size + (160 << 20 if name == "arcee_fusion" else 0), (name, g / 2**20)


def test_della_mask_cache_changes_no_bit(family, tmp_path, monkeypatch):
    """DELLA keeps the first pass's masks for the second while they fit (della.MASK_CACHE_BYTES); without the
    cache it draws them again: the same bytes either way."""
    from mergebot.engine.methods.task_arithmetic import della
    base, a, b, _ = family
    text = _configs(base, a, b)["della"]
    cached = merge_yaml(tmp_path, text, name="cached", random_seed=3)
    monkeypatch.setattr(della, "MASK_CACHE_BYTES", 0)
    drawn = merge_yaml(tmp_path, text, name="drawn", random_seed=3)
    assert all(torch.equal(cached[k], drawn[k]) for k in cached)


def test_della_mask_cache_holds_cpu_masks_as_bits():
    """On the CPU the cache holds a mask as bits (8 elements per byte of the budget: a 0.86B model's embedding and
    head fit, which as bytes were ranked twice); taken back it is the same mask, whatever n mod 8."""
    from mergebot.engine.methods.task_arithmetic import della
    g = torch.Generator().manual_seed(0)
    cache = della._mask_cache(1 << 20, 2, torch.device("cpu"))
    assert cache is not None
    for n in (1, 7, 8, 13, 4099):
        keep = torch.rand(n, generator=g) < 0.3
        cache.put((n, 0), keep)
        assert cache[(n, 0)][0].nbytes == (n + 7) // 8
        back = cache.take((n, 0))
        assert back.dtype == torch.bool and torch.equal(back, keep) and (n, 0) not in cache
    limit = della.MASK_CACHE_BYTES
    assert della._mask_cache(limit * 4, 2, torch.device("cpu")) is not None
    assert della._mask_cache(limit * 4 + 1, 2, torch.device("cpu")) is None
    assert della._mask_cache(limit // 2 + 1, 2, torch.device("meta")) is None  # a device's masks stay bytes


def test_arcee_fusion_streamed_equals_whole_tensor(family, tmp_path, monkeypatch):
    """arcee_fusion above QUANTILE_SAMPLE_SIZE streams row blocks (per-row KL, sampled importances gathered at
    their indices): the same bytes as computing the whole importance tensor and sampling it."""
    from mergebot.engine.methods import arcee_fusion
    base, a, _, _ = family
    text = _models((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n"
    monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE_SIZE", 300)  # tiny tensors take the large-tensor paths
    monkeypatch.setattr(_rows, "ROW_BLOCK_ELEMS", 100)
    streamed = merge_yaml(tmp_path, text, name="streamed", random_seed=5)
    monkeypatch.setattr(arcee_fusion, "_streamed", arcee_fusion._whole)
    whole = merge_yaml(tmp_path, text, name="whole", random_seed=5)
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    base_t = load_tensors(base)
    assert any(not torch.equal(whole[k], base_t[k]) for k in whole)  # something was merged


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "sce"])
def test_whole_tensor_selections_keep_their_first_pass_in_buffers_reused_between_tensors(family, tmp_path, monkeypatch,
                                                                                         method):
    """TIES and breadcrumbs keep their deltas, SCE its variance bits, between passes (README: in buffers reused from
    tensor to tensor): fresh ones cost a zeroed page per 4 KB for every tensor, ~1.6M page faults per 0.86B TIES
    merge. Every tensor after the largest one so far writes into the same memory."""
    from mergebot.engine import fuse
    from mergebot.engine.methods import sce
    from mergebot.engine.methods.task_arithmetic import combine

    base, a, b, _ = family
    seen: list[tuple[int, int]] = []  # (elements, address) of each tensor's kept buffer
    held: list[torch.Tensor] = []  # and the buffer itself: a freed one's address could be handed out again
    if method == "sce":
        real = fuse.scratch

        def spy(tag, n, dtype, device):
            buf = real(tag, n, dtype, device)
            if tag == "sce_kept":
                seen.append((n, buf.data_ptr()))
                held.append(buf)
            return buf

        monkeypatch.setattr(sce, "scratch", spy)
        params, extra = "{weight: 0.5}", "parameters: {select_topk: 0.5}\n"
    else:
        of = combine.FlatDeltas.of.__func__

        def spy_of(cls, call, keep=False):
            flat = of(cls, call, keep)
            if flat.kept:
                seen.append((flat.n, flat.kept[0].data_ptr()))
                held.append(flat.kept[0])
            return flat

        monkeypatch.setattr(combine.FlatDeltas, "of", classmethod(spy_of))
        params, extra = "{weight: 0.5, density: 0.5}", ""
    text = _models((base, None), (a, params), (b, params)) + f"merge_method: {method}\nbase_model: {base}\n" + extra
    merge_yaml(tmp_path, text, random_seed=1)
    assert len(seen) > 10
    largest, address = 0, None
    for n, ptr in seen:
        if n > largest:  # a larger tensor than any before may need a larger buffer
            largest, address = n, ptr
        assert ptr == address, (n, largest)
