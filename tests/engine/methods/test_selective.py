"""Model Stock, SCE, RAM and Arcee Fusion through the whole pipeline, against independent float64 references
(merge-semantics.md §2.8-§2.11)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergebot.engine.methods import METHODS
from mergebot.engine.methods.base import MergeCall
from mergebot.tinymodels import llama_config, llama_tensors, load_tensors, make_family
from tests.helpers import ATOL, assert_same_bytes_kept_chunked_recomputed, close, f64, merge_yaml, models_yaml, save_llama

# --------------------------------------------------------------------------------------------------- model_stock

def model_stock64(w0, ws, filter_wise):
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            nrm = offs[i].norm(dim=-1) * offs[j].norm(dim=-1)
            cos.append(((offs[i] * offs[j]).sum(-1) / nrm.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), n * cos / denom)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(family, tmp_path, filter_wise):
    base, a, b, c = family
    X, A, B, C = f64(base), f64(a), f64(b), f64(c)
    out = merge_yaml(tmp_path, models_yaml((base, None), (a, None), (b, None), (c, None))
                     + f"merge_method: model_stock\nbase_model: {base}\n"
                     + f"parameters: {{filter_wise: {str(filter_wise).lower()}}}\n")
    close(out, {k: model_stock64(X[k], [A[k], B[k], C[k]], filter_wise) for k in X})


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_singular_guard(tmp_path, filter_wise):
    # Exactly opposite offsets (values on a 2⁻¹⁰ grid, so base ± d is exact): cos = −1, 1 + (N−1)cos = 0 → t = 0.
    x = {k: torch.round(v * 1024) / 1024 for k, v in llama_tensors(llama_config(), 6).items()}
    g = torch.Generator().manual_seed(7)
    d = {k: torch.round(torch.randn(v.shape, generator=g) * 20) / 1024 for k, v in x.items()}
    p0 = save_llama(tmp_path, "base", x)
    p1 = save_llama(tmp_path, "plus", {k: x[k] + d[k] for k in x})
    p2 = save_llama(tmp_path, "minus", {k: x[k] - d[k] for k in x})
    out = merge_yaml(tmp_path, models_yaml((p1, None), (p2, None)) + f"merge_method: model_stock\nbase_model: {p0}\n"
                     + f"parameters: {{filter_wise: {str(filter_wise).lower()}}}\n")
    for k, v in x.items():
        assert torch.equal(out[k], v), k


# --------------------------------------------------------------------------------------------------- sce

def sce64(base, xs32, base32, topk):
    taus = [(x - base32).double() for x in xs32]
    if topk < 1:
        if topk <= 0:
            taus = [torch.zeros_like(t) for t in taus]
        else:
            var = torch.stack([t.float() for t in taus]).var(dim=0, unbiased=False)  # float32 as computed
            k = int(torch.count_nonzero(var) * topk)
            keep = torch.zeros(var.numel(), dtype=torch.float64)
            keep[var.reshape(-1).abs().sort(descending=True).indices[:k]] = 1
            taus = [t * keep.reshape(t.shape) for t in taus]
    means = [float((t * t).mean()) for t in taus]
    s = sum(means)
    w = [1 / len(taus)] * len(taus) if s < 1e-6 else [m / s for m in means]
    sgn = torch.where(sum(taus) >= 0, 1.0, -1.0).double()
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for t, wi in zip(taus, w):
        m = (torch.sign(t) == sgn).double()
        num = num + t * wi * m
        den = den + wi * m
    return base + num / den.clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.0])
def test_sce(family, tmp_path, topk):
    base, a, b, c = family
    X32 = load_tensors(base)
    Ms = [load_tensors(m) for m in (a, b, c)]
    X = f64(base)
    out = merge_yaml(tmp_path, models_yaml((a, None), (b, None), (c, None))
                     + f"merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: {topk}}}\n")
    close(out, {k: sce64(X[k], [M[k] for M in Ms], X32[k], topk) for k in X})
    if topk <= 0:
        assert all(torch.equal(out[k], X32[k]) for k in X32)


def test_sce_selection_same_bits_with_and_without_kept_variance(family, tmp_path, monkeypatch):
    """The variance bits kept between passes (_sparsify.KEEP_BYTES) and the ones computed again in each pass of
    a tensor too large to keep give the same merge, chunk by chunk (small _sparsify.CHUNK) as whole."""
    base, a, b, c = family
    text = (models_yaml((a, None), (b, None), (c, None))
            + f"merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.4}}\n")
    assert_same_bytes_kept_chunked_recomputed(tmp_path, text, monkeypatch, 96)


def test_sce_tiny_task_vectors_get_uniform_weights(tmp_path):
    base, a, b = make_family(tmp_path / "fam", 3, seed=9, noise=1e-4)  # mean τ² ≈ 1e-8: below the 1e-6 guard
    X32, A32, B32 = load_tensors(base), load_tensors(a), load_tensors(b)
    X = f64(base)
    out = merge_yaml(tmp_path, models_yaml((a, None), (b, None)) + f"merge_method: sce\nbase_model: {base}\n")
    close(out, {k: sce64(X[k], [A32[k], B32[k]], X32[k], 1.0) for k in X}, atol=1e-7)


# --------------------------------------------------------------------------------------------------- ram

@pytest.fixture(scope="module")
def sparse_family(tmp_path_factory) -> list[Path]:
    """base + 3 fine-tunes each changing a random half of the entries: unique and shared positions."""
    root = tmp_path_factory.mktemp("sparse")
    x = llama_tensors(llama_config(), 11)
    out = [save_llama(root, "base", x)]
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.5)
              for k, v in x.items()}
        out.append(save_llama(root, f"ft{i}", ft))
    return out


def ram64(base, taus, eps, plus=None):
    active = [(t.abs() > eps).double() for t in taus]
    c = sum(active)
    unique, shared = (c == 1).double(), (c > 1).double()
    lams = [1.0] * len(taus)
    if plus is not None:
        r, alpha = plus
        lams = []
        for a in active:
            rho = float((a * shared).sum()) / max(float((a * unique).sum()), eps)
            lams.append(1 + r * min(max(rho, 0.0), alpha))
    out = base.clone()
    for t, a, lam in zip(taus, active, lams):
        out = out + t * a * unique * lam + t * a * shared / c.clamp(min=1)
    return out


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram(sparse_family, tmp_path, method):
    base, *fts = sparse_family
    X32 = load_tensors(base)
    Ms = [load_tensors(m) for m in fts]
    X = f64(base)
    params = "{r: 0.2, alpha: 10.0}" if method == "ramplus_tl" else "{epsilon: 1e-5}"
    out = merge_yaml(tmp_path, models_yaml(*((m, None) for m in fts))
                     + f"merge_method: {method}\nbase_model: {base}\nparameters: {params}\n")
    plus = (0.2, 10.0) if method == "ramplus_tl" else None
    close(out, {k: ram64(X[k], [(M[k] - X32[k]).double() for M in Ms], 1e-5, plus) for k in X})
    if method == "ramplus_tl":  # λ > 1 here (ρ ≈ 3), so the unique entries differ from plain ram
        plain = {k: ram64(X[k], [(M[k] - X32[k]).double() for M in Ms], 1e-5) for k in X}
        assert max(float((out[k].double() - plain[k]).abs().max()) for k in X) > 1e-3
    out = merge_yaml(tmp_path, models_yaml(*((m, None) for m in fts))
                     + f"merge_method: {method}\nbase_model: {base}\n", name="defaults")
    plus = (0.1, 0.2) if method == "ramplus_tl" else None
    close(out, {k: ram64(X[k], [(M[k] - X32[k]).double() for M in Ms], 1e-5, plus) for k in X})


# --------------------------------------------------------------------------------------------------- arcee_fusion

def fusion64(base, x):
    rows_x = x if x.dim() >= 1 else x.reshape(1)
    p = torch.softmax(rows_x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    imp = (x - base).abs() * kl
    s = imp.reshape(-1).sort().values
    n = s.numel()
    thr = s[int(0.5 * (n - 1))] + 1.5 * (s[int(0.75 * (n - 1))] - s[int(0.25 * (n - 1))])
    return base + (x - base) * (imp >= thr), imp, thr


def test_arcee_fusion(family, tmp_path):
    base, a, _, _ = family
    X, A = f64(base), f64(a)
    out = merge_yaml(tmp_path, models_yaml((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n")
    total = changed = mismatched = 0
    for k in X:
        ref, imp, thr = fusion64(X[k], A[k])
        got = out[k].double()
        bad = (got - ref).abs() > ATOL
        # The KL of two close softmaxes loses ~3 digits in float32 (as in mergekit, which computes it in the
        # input dtype): an entry may land on the other side of the threshold only when it is that close to it.
        assert not bad.any() or bool(((imp[bad] - thr).abs() <= 5e-3 * thr).all()), k
        mismatched += int(bad.sum())
        total += got.numel()
        changed += int(((got - X[k]).abs() > 0).sum())
    assert 0 < changed < total
    assert mismatched <= total // 5000


def test_arcee_fusion_quantiles_are_lower_order_statistics():
    # One row: KL is a single positive factor, so importance ∝ |Δ|. Sorted |Δ| = 0..10 plus 13.9:
    # lower order statistics (n = 12) give Q1, median, Q3 = 2, 5, 8 → threshold 14, so 13.9 is dropped;
    # torch.quantile's interpolation (2.75, 5.5, 8.25 → 13.75) would keep it.
    x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13.9]) * 0.01
    base = torch.zeros(12)
    call = MergeCall([base, x], 0, {}, [{}, {}], shape=(12,), keys=[1, 2])
    out = METHODS["arcee_fusion"].merge(call)
    assert torch.equal(out.reshape(-1), base)
    x2 = torch.cat([x[:-1], torch.tensor([0.1401])])
    out2 = METHODS["arcee_fusion"].merge(MergeCall([base, x2], 0, {}, [{}, {}], shape=(12,), keys=[1, 2]))
    assert out2.reshape(-1)[-1] == x2[-1] and bool((out2.reshape(-1)[:-1] == 0).all())


def test_arcee_fusion_sampled_quantiles_are_reproducible(family, tmp_path, monkeypatch):
    from mergebot.engine.methods import arcee_fusion
    base, a, _, _ = family
    text = models_yaml((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n"
    exact = merge_yaml(tmp_path, text, name="exact", random_seed=1)
    monkeypatch.setattr(arcee_fusion, "QUANTILE_SAMPLE_SIZE", 400)  # sample every tensor above 400 elements
    one = merge_yaml(tmp_path, text, name="one", random_seed=1, threads=1)
    two = merge_yaml(tmp_path, text, name="two", random_seed=1, threads=2)
    torch.set_num_threads(2)
    differs = 0
    for k in exact:
        assert torch.equal(one[k], two[k]), k
        if exact[k].numel() <= 400:
            assert torch.equal(one[k], exact[k]), k
        differs += int((one[k] != exact[k]).sum())
    total = sum(v.numel() for v in exact.values())
    assert differs / total < 0.05  # a sampled threshold moves the cut only slightly


@pytest.mark.parametrize("shape", [(7, 33), (3, 4, 50), (129,), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arcee_row_kl_in_place_is_the_formula_bit_for_bit(shape, dtype):
    """The in-place KL (reused buffers) has the bytes of the formula written with torch's functions."""
    from mergebot.engine.methods import arcee_fusion
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g, dtype=dtype)
    x = (base + 0.3 * torch.randn(shape, generator=g, dtype=dtype)).to(torch.bfloat16)
    p = torch.softmax(x.to(dtype), dim=-1) + arcee_fusion.KL_EPS
    q = torch.softmax(base, dim=-1) + arcee_fusion.KL_EPS
    want = (p * torch.log(p / q)).sum(dim=-1, keepdim=True).reshape(-1, 1)
    got = arcee_fusion.row_kl(x.reshape(-1), base.reshape(-1), shape, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_arcee_sample_indices_are_the_hash_draws_sorted():
    """The CPU's numpy draw is the 63-bit hash index of the definition (hash_u32 of j and of j + 2⁴⁰), sorted."""
    from mergebot.engine import rng
    from mergebot.engine.methods import arcee_fusion
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 600,000 draws: two ranges hashed side by side
    try:
        for n, key, count in ((1_000_003, 7, 600_000), ((1 << 40) + 17, 0xFFFFFFFF, 5000), (3, 0, 5000)):
            j = torch.arange(count, dtype=torch.int64)
            hi, lo = rng.hash_u32(j, key), rng.hash_u32(j + (1 << 40), key)
            want = torch.sort(((hi << 31) | (lo >> 1)) % n).values
            assert torch.equal(arcee_fusion.sample_indices(n, count, key, torch.device("cpu")), want), (n, key)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [1, 2, 5, 12, 1001, 200_003])
def test_arcee_threshold_is_the_sorted_order_statistics(n):
    """The partial sort gives a full sort's lower order statistics, ties and NaN (ordered last) included."""
    from mergebot.engine.methods import arcee_fusion
    g = torch.Generator().manual_seed(n)
    for values in (torch.randint(0, 7, (n,), generator=g).float(), torch.rand(n, generator=g, dtype=torch.float64)):
        if n > 4:
            values[::3] = math.nan
        o = torch.sort(values).values
        want = o[(n - 1) // 2] + 1.5 * (o[3 * (n - 1) // 4] - o[(n - 1) // 4])
        got = arcee_fusion.threshold(values, None)
        assert got.dtype == values.dtype and torch.equal(got, want) or (got.isnan() and want.isnan())
