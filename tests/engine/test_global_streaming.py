"""Global selections in bounded memory (merge-semantics.md §2.7 `magnitude_outliers`, §2.8 sce select_topk).

breadcrumbs and sce's top-k are global over a tensor; the methods now walk the whole tensor in chunks of
`_sparsify.CHUNK` with exact radix cuts instead of sorting it. The references here are the previous
whole-tensor implementations (a stable sort, ties to earlier elements; torch.var): any chunking must give
the same masks, hence the same outputs (bit for bit without rescale, within float64 summation order of
the global L1/τ² sums otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergebot.engine.methods import METHODS, _sparsify
from mergebot.engine.methods.base import MergeCall
from mergebot.engine.methods.sce import _variance_bits, matrix_weights
from mergebot.engine.methods.task_arithmetic.combine import combine as _combine
from mergebot.engine.methods.task_arithmetic.outliers import outlier_band
from mergebot.tinymodels import llama_config, load_tensors, save_model
from tests.helpers import ROOT, merge_yaml

CHUNKS = [7, 100, 1 << 20]


# ------------------------------------------------------------------------------------------ whole-tensor refs

def top_k_ref(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, ties to earlier elements (the previous `topk_mask`)."""
    n = values.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(values.reshape(-1), descending=True, stable=True).indices[:max(0, k)]] = True
    return keep


def outlier_ref(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """The previous `outlier_mask`: ascending |δ| positions [n_bot, n_bot + target)."""
    if density >= 1:
        return None
    n = d.numel()
    target = max(0, int(density * n))
    n_bot = max(0, n - target - int(gamma * n))
    keep = torch.zeros(n, dtype=torch.bool)
    if target > 0:
        skip = n - n_bot - target
        keep[torch.sort(d.reshape(-1).abs().float(), descending=True, stable=True).indices[skip:skip + target]] = True
    return keep


def breadcrumbs_ref(call: MergeCall, consensus: bool) -> torch.Tensor:
    """The previous whole-tensor breadcrumbs apply."""
    b = call.xs[0].reshape(-1).to(call.dtype)
    deltas, weights = [], []
    for x, p in zip(call.xs[1:], call.per_input[1:]):
        d = x.reshape(-1).to(call.dtype) - b
        keep = outlier_ref(d, p["density"], p["gamma"])
        if keep is not None:
            masked = torch.where(keep, d, 0.0)
            before, after = float(d.abs().sum(dtype=torch.float64)), float(masked.abs().sum(dtype=torch.float64))
            if call.shared["rescale"] and before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
            d = masked
        deltas.append(d)
        weights.append(p["weight"])
    return _combine(b, deltas, weights, consensus, call.shared["normalize"], call.shared["lambda"],
                    call.dtype).to(call.out_dtype)


def sce_ref(call: MergeCall) -> torch.Tensor:
    """The previous whole-tensor sce apply (select_topk < 1)."""
    topk = call.shared["select_topk"]
    base = call.xs[0].reshape(-1).to(call.dtype)
    taus = [x.reshape(-1).to(call.dtype) - base for x in call.xs[1:]]
    if topk <= 0:
        taus = [torch.zeros_like(t) for t in taus]
    else:
        var = torch.var(torch.stack(taus), dim=0, unbiased=False)
        keep = top_k_ref(var.abs(), int(torch.count_nonzero(var) * topk))
        taus = [torch.where(keep, t, 0.0) for t in taus]
    sums = [float(t.to(torch.float64).square().sum()) for t in taus]
    weights = matrix_weights(sums, float(base.numel()))
    total = sum(taus[1:], taus[0])
    sign = torch.where(total >= 0, 1.0, -1.0).to(call.dtype)
    mixed, div = torch.zeros_like(base), torch.zeros_like(base)
    for t, w in zip(taus, weights):
        agree = torch.sign(t) == sign
        mixed = mixed + torch.where(agree, t * w, 0.0)
        div = div + torch.where(agree, w, 0.0)
    return (base + mixed / div.clamp(min=1e-6)).to(call.out_dtype)


def _chunked_mask(cuts, bits: torch.Tensor, chunk: int, band: bool = False) -> torch.Tensor:
    parts, seen = [], [0, 0]
    for s in range(0, bits.numel(), chunk):
        b = bits[s:s + chunk]
        m0, seen[0] = cuts[0].mask(b, seen[0])
        if band:
            m1, seen[1] = cuts[1].mask(b, seen[1])
            m0 = m0 & ~m1
        parts.append(m0)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _tied(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values with many exact ties (like bf16 deltas) and some zeros."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 7, (n,), generator=g).to(dtype) / 4) * (1 + 1e-3 * torch.randint(0, 2, (n,), generator=g))


# ------------------------------------------------------------------------------------------------ the cuts

@pytest.mark.parametrize("chunk", CHUNKS)
def test_top_k_cuts_are_a_stable_sort_in_any_chunking(monkeypatch, chunk):
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    for n, dtype, bits_dtype in ((3001, torch.float32, torch.int32), (1999, torch.float64, torch.int64), (1, torch.float32, torch.int32)):
        v = _tied(n, n, dtype).abs()
        v[::97] = torch.rand(v[::97].shape, dtype=dtype) * 1e-30  # tiny values: low bits matter
        bits = v.view(bits_dtype)
        ks = [-1, 0, 1, n // 3, n // 2, n - 1, n, n + 5]
        cuts = _sparsify.top_k_cuts(lambda s, e, bits=bits: bits[s:e], n, ks, bits_dtype)
        for k, cut in zip(ks, cuts):
            got = _chunked_mask([cut], bits, chunk)
            assert int(got.sum()) == min(n, max(0, k))
            assert torch.equal(got, top_k_ref(v, k)), (n, dtype, k)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_outlier_band_matches_a_whole_tensor_sort(monkeypatch, chunk):
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    for n in (1, 32, 999, 3001):
        d = _tied(n, n)
        bits = _sparsify.magnitude_bits(d)
        # int(gamma·n) == 0, fewer top outliers than asked (gamma too large), nothing kept, the usual case
        for density, gamma in ((0.5, 0.0001), (0.9, 0.3), (0.0, 0.1), (0.6, 0.05), (0.4, 0.01), (0.999, 0.5)):
            band = outlier_band(lambda s, e, bits=bits: bits[s:e], n, density, gamma)
            assert torch.equal(_chunked_mask(band, bits, chunk, band=True), outlier_ref(d, density, gamma)), \
                (n, density, gamma)


def test_variance_is_torch_var_in_any_chunking():
    # sce's variance is written out elementwise; it must be torch.var's bits (the previous selection's)
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        for models in (1, 2, 3, 5):
            taus = [(torch.randn(4099, generator=g) * torch.rand(4099, generator=g) * 3).to(dtype)
                    for _ in range(models)]
            taus[0][:50] = 0
            ref = torch.var(torch.stack(taus), dim=0, unbiased=False).abs()
            ref_bits = ref.view(torch.int32 if dtype == torch.float32 else torch.int64)
            for chunk in (4099, 100, 7):
                got = torch.cat([_variance_bits([t[s:s + chunk] for t in taus]) for s in range(0, 4099, chunk)])
                assert torch.equal(got, ref_bits), (dtype, models, chunk)


# ---------------------------------------------------------------------------------- methods on whole tensors

def _same(got: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if exact:
        assert torch.equal(got, ref)
    else:  # only the global float64 sums' order differs: far below what one mask difference would change
        rtol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(ref.dtype, 2 ** -7)
        assert torch.allclose(got.double(), ref.double(), rtol=rtol, atol=1e-9)


def _tensors(request, fam: str, models: int) -> tuple[list[dict[str, torch.Tensor]], torch.dtype]:
    dirs = request.getfixturevalue(fam)
    ts = [load_tensors(d) for d in dirs[:models]]
    if fam == "family64":
        ts = [{k: v.double() for k, v in t.items()} for t in ts]
    return ts, ts[0][next(iter(ts[0]))].dtype


@pytest.fixture
def family64(family):
    return family


BREADCRUMB_PARAMS = [  # (density, gamma) per non-base model
    ((0.6, 0.05), (0.4, 0.01)),
    ((0.5, 0.001), (0.9, 0.3)),  # int(gamma·n) == 0 for n < 1000; fewer top outliers than gamma asks
    ((0.0, 0.1), (1.0, 0.01)),  # nothing kept; not pruned
]


@pytest.mark.parametrize("chunk", [100, 1 << 20])
@pytest.mark.parametrize("method,rescale", [("breadcrumbs", False), ("breadcrumbs_ties", False),
                                            ("breadcrumbs_ties", True), ("breadcrumbs", True)])
@pytest.mark.parametrize("fam", ["family", "family_bf16", "family64"])
def test_breadcrumbs_streams_like_the_whole_tensor(request, monkeypatch, fam, method, rescale, chunk):
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    (X, A, B), dtype = _tensors(request, fam, 3)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    shared = {"rescale": rescale, "normalize": False, "lambda": 1.3, "int8_mask": False}
    for params in BREADCRUMB_PARAMS:
        per = [{}] + [{"weight": w, "density": d, "gamma": g} for w, (d, g) in zip((0.8, 0.5), params)]
        for k in X:
            call = MergeCall([X[k], A[k], B[k]], 0, shared, per, dtype=compute, out_dtype=dtype, shape=tuple(X[k].shape))
            got = METHODS[method].merge(call)
            exact = not rescale or chunk >= X[k].numel()
            _same(got, breadcrumbs_ref(call, method == "breadcrumbs_ties"), exact)


@pytest.mark.parametrize("chunk", [100, 1 << 20])
@pytest.mark.parametrize("topk", [0.3, 0.7, 0.0])
@pytest.mark.parametrize("fam", ["family", "family_bf16", "family64"])
def test_sce_selection_streams_like_the_whole_tensor(request, monkeypatch, fam, topk, chunk):
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    ts, dtype = _tensors(request, fam, 4)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    shared = {"select_topk": topk, "int8_mask": False}
    for k in ts[0]:
        call = MergeCall([t[k] for t in ts], 0, shared, [{}] * len(ts), dtype=compute, out_dtype=dtype)
        # float64 sums: ours are exact sums of terms cut at 2^-46 of their block's largest, the reference
        # torch's float64 sum: equal to ~1e-14, not bit for bit
        _same(METHODS["sce"].merge(call), sce_ref(call), exact=chunk >= ts[0][k].numel() and dtype != torch.float64)


# ------------------------------------------------------------------------------------------ the whole pipeline

def _yaml(base: Path, others: list[Path], method: str, per: str, params: str) -> str:
    lines = ["models:"] + [f"  - model: {m}\n    parameters: {per}" if per else f"  - model: {m}" for m in others]
    return "\n".join(lines) + f"\nmerge_method: {method}\nbase_model: {base}\nparameters: {params}\n"


@pytest.mark.parametrize("method,per,params", [
    ("breadcrumbs_ties", "{weight: 0.6, density: 0.5, gamma: 0.05}", "{rescale: false}"),
    ("breadcrumbs", "{weight: 0.6, density: 0.3, gamma: 0.01}", "{lambda: 0.9}"),
    ("sce", None, "{select_topk: 0.3}"),
])
def test_pipeline_results_do_not_depend_on_the_chunk(family_bf16, tmp_path, monkeypatch, method, per, params):
    base, a, b = family_bf16  # bf16 deltas: many exact ties at the cuts
    text = _yaml(base, [a, b], method, per, params)
    whole = merge_yaml(tmp_path, text, name="whole")
    monkeypatch.setattr(_sparsify, "CHUNK", 100)
    chunked = merge_yaml(tmp_path, text, name="chunked")
    assert set(whole) == set(chunked)
    for k in whole:
        if method != "sce" or whole[k].numel() <= 100:
            assert torch.equal(whole[k], chunked[k]), k
        else:  # Σ τ² summed per chunk: the weights may move in their last float64 bits
            assert torch.allclose(whole[k].float(), chunked[k].float(), rtol=2 ** -7, atol=0), k


# ----------------------------------------------------------------------------------------------------- memory

MEASURE = r"""
import sys, threading, time
from pathlib import Path
from mergebot.config.dense import load_config
from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge

def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon'):
            return int(line.split()[1]) * 1024

def peak_growth(cfg, out):
    start, peak, stop = anon(), [0], []
    def sample():
        while not stop:
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    run_merge(load_config(cfg), Path(out), MergeOptions(progress=False))
    stop.append(1)
    t.join()
    return max(peak[0], anon()) - start

run_merge(load_config(sys.argv[1]), Path(sys.argv[2]) / 'warm', MergeOptions(progress=False))  # imports, pools
print(*(peak_growth(c, Path(sys.argv[2]) / f'out{i}') for i, c in enumerate(sys.argv[3:])))
"""


def test_global_selections_hold_chunks_not_tensors(tmp_path):
    # One 16M-element float32 tensor (64 MB) per model. Before streaming, breadcrumbs_ties grew anonymous
    # memory by ~750 MB here and sce by ~580 MB (sorts: values + int64 indices, whole-tensor deltas); now a
    # few 1M-element chunks. Anonymous memory only: the mmap'd inputs and output are file pages. glibc's
    # dynamic mmap threshold would keep freed chunk buffers on the heap and blur the measure, so it is fixed.
    cfg = llama_config(vocab=65536, hidden=256, layers=1, heads=4, kv_heads=4, inter=32, tie=True)
    g = torch.Generator().manual_seed(0)
    from mergebot.tinymodels import llama_tensors
    base = llama_tensors(cfg | {"vocab_size": 1}, 0)
    base["model.embed_tokens.weight"] = torch.randn(65536, 256, generator=g) * 0.1
    dirs = []
    for i in range(3):
        t = base if i == 0 else {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        dirs.append(save_model(tmp_path / f"m{i}", cfg, t))
    size = base["model.embed_tokens.weight"].numel() * 4
    warm = tmp_path / "warm.yml"
    warm.write_text(_yaml(dirs[0], dirs[1:], "task_arithmetic", "{weight: 0.5}", "{}"))
    bc = tmp_path / "bc.yml"
    bc.write_text(_yaml(dirs[0], dirs[1:], "breadcrumbs_ties", "{weight: 0.5, density: 0.5, gamma: 0.01}",
                        "{rescale: true}"))
    sce = tmp_path / "sce.yml"
    sce.write_text(_yaml(dirs[0], dirs[1:], "sce", None, "{select_topk: 0.5}"))
    # MERGEBOT_TIE_SORT_MAX=0: the streaming selection alone, keeping nothing between passes (MERGEBOT_KEEP_BYTES
    # 0), or keeping no more than a budget smaller than the tensor's deltas (32 MB). By default a float32 tensor
    # whose cut meets equal magnitudes (16M random float32 values share mantissas) is also sorted once as
    # mergekit sorts it (_sparsify.PARITY_MAX_ELEMS): about 28 bytes per element while it sorts, measured below;
    # and the first pass's deltas or variances (64-128 MB here) are kept for the next passes.
    for limit, keep, bound in (("0", "0", size * 1.5), ("0", str(size // 2), size * 1.5),
                               (str(1 << 24), str(512 << 20), size * 8)):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MERGEBOT_TIE_SORT_MAX=limit, MERGEBOT_KEEP_BYTES=keep)
        outs = tmp_path / f"limit{limit}-{keep}"
        outs.mkdir()
        r = subprocess.run([sys.executable, "-c", MEASURE, str(warm), str(outs), str(bc), str(sce)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env, check=False)
        assert r.returncode == 0, r.stderr
        growth = [int(v) for v in r.stdout.split()]
        assert size == 1 << 26
        assert all(gr < bound for gr in growth), (limit, growth, size)
