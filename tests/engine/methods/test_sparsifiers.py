"""Breadcrumbs and DELLA, the task-arithmetic variants with their own sparsifiers (merge-semantics.md §2.7),
against independent float64 references of the family's tail."""

from __future__ import annotations

import math

import pytest
import torch

from mergebot.engine import executor, rng
from mergebot.engine.methods import METHODS
from mergebot.errors import ConfigError, ModelError
from mergebot.tinymodels import load_tensors
from tests.helpers import close, f64, merge_yaml, models_yaml

# --------------------------------------------------------------------------------------------------- GTA tail

def gta_tail64(base, deltas, weights, consensus, normalize, lam):
    D = [w * d for w, d in zip(weights, deltas)]
    if consensus:
        sgn = torch.where(sum(D) >= 0, 1.0, -1.0).double()
        mixed = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for d, w in zip(D, weights):
            m = (torch.sign(d) == sgn).double()
            mixed = mixed + d * m
            div = div + w * m
        div[div == 0] = 1
    else:
        mixed = sum(D)
        div = sum(weights)
        div = 1.0 if abs(div) < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def l1_rescaled64(d, keep, rescale):
    masked = d * keep
    if not rescale:
        return masked
    before, after = float(d.abs().sum()), float(masked.abs().sum())
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


# --------------------------------------------------------------------------------------------------- breadcrumbs

def outliers64(d, density, gamma):
    n = d.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(d.reshape(-1).abs()).indices  # values are distinct: any sort gives this order
    keep = torch.zeros(n, dtype=torch.float64)
    keep[order[n_bot:n_bot + target]] = 1
    return keep.reshape(d.shape)


@pytest.mark.parametrize("method,rescale", [("breadcrumbs", False), ("breadcrumbs_ties", False),
                                            ("breadcrumbs_ties", True)])
def test_breadcrumbs(family, tmp_path, method, rescale):
    base, a, b, _ = family
    X32, A32, B32 = load_tensors(base), load_tensors(a), load_tensors(b)
    X = f64(base)
    out = merge_yaml(tmp_path, models_yaml((base, None), (a, "{weight: 0.8, density: 0.6, gamma: 0.05}"),
                                       (b, "{weight: 0.5, density: 0.4}"))
                     + f"merge_method: {method}\nbase_model: {base}\n"
                     + f"parameters: {{lambda: 1.3, rescale: {str(rescale).lower()}}}\n")
    ref = {}
    for k in X:
        deltas = []
        for M, dens, gamma in ((A32, 0.6, 0.05), (B32, 0.4, 0.01)):
            d = (M[k] - X32[k]).double()
            deltas.append(l1_rescaled64(d, outliers64(d, dens, gamma), rescale))
        ref[k] = gta_tail64(X[k], deltas, [0.8, 0.5], method == "breadcrumbs_ties", False, 1.3)
    close(out, ref)


def test_breadcrumbs_tiny_tensors_keep_their_largest_entries(family, tmp_path):
    # A norm weight has 32 < 1/gamma elements: int(gamma·n) = 0 outliers, keep the int(density·n) largest
    # (0.1.5; the 0.1.4 snapshot's [n_bot:-0] slice zeroed such tensors).
    base, a, _, _ = family
    X32, A32 = load_tensors(base), load_tensors(a)
    out = merge_yaml(tmp_path, models_yaml((a, "{weight: 1.0, density: 0.5}")) + f"merge_method: breadcrumbs\nbase_model: {base}\n")
    k = "model.layers.1.input_layernorm.weight"
    d = (A32[k] - X32[k]).double()
    got = out[k].double() - X32[k].double()
    kept = got.abs() > 0
    assert int(kept.sum()) == 16
    assert torch.equal(kept, d.abs() >= d.abs().sort(descending=True).values[15])
    q = "model.layers.1.mlp.up_proj.weight"  # 1536 elements: 15 top outliers dropped, then the smallest
    dq = (A32[q] - X32[q]).double().reshape(-1)
    kept = (out[q].double() - X32[q].double()).reshape(-1).abs() > 0
    order = dq.abs().sort(descending=True).indices
    assert not kept[order[:15]].any() and kept[order[15:15 + 768]].all() and int(kept.sum()) == 768


# --------------------------------------------------------------------------------------------------- della

def della_keep64(d32, density, eps, key):
    d = d32.double()
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    rhat = ranks / (n - 1)
    p = ((density - eps) + rhat * 2 * eps).reshape(-1)
    idx = torch.arange(p.numel(), dtype=torch.int64)
    return (rng.hash_u32(idx, key) < (p * 4294967296.0).long()).double().reshape(d.shape)


DELLA_PARAMS = [(0.6, 0.5, 0.2), (0.4, 0.3, 0.1)]  # weight, density, epsilon of ft1 and ft2


def _della_text(family, method):
    base, a, b, _ = family
    (w1, d1, e1), (w2, d2, e2) = DELLA_PARAMS
    return (models_yaml((base, None), (a, f"{{weight: {w1}, density: {d1}, epsilon: {e1}}}"),
                    (b, f"{{weight: {w2}, density: {d2}, epsilon: {e2}}}"))
            + f"merge_method: {method}\nbase_model: {base}\nparameters: {{lambda: 0.9}}\n")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_deterministic_given_the_hash_rng(family, tmp_path, method):
    base, a, b, _ = family
    X32, A32, B32 = load_tensors(base), load_tensors(a), load_tensors(b)
    X = f64(base)
    seed = 1234
    out = merge_yaml(tmp_path, _della_text(family, method), random_seed=seed)
    consensus = normalize = method == "della"
    ref = {}
    for k in X:
        deltas = []
        for pos, (M, (_, dens, eps)) in enumerate(zip((A32, B32), DELLA_PARAMS), start=1):
            d = M[k] - X32[k]
            keep = della_keep64(d, dens, eps, rng.stream_key(seed, k, pos))
            deltas.append(l1_rescaled64(d.double(), keep, True))
        ref[k] = gta_tail64(X[k], deltas, [w for w, _, _ in DELLA_PARAMS], consensus, normalize, 0.9)
    close(out, ref, atol=5e-6)


def test_della_reproducible_across_runs_threads_and_chunk_sizes(family, tmp_path, monkeypatch):
    text = _della_text(family, "della")
    one = merge_yaml(tmp_path, text, name="one", random_seed=42, threads=1)
    two = merge_yaml(tmp_path, text, name="two", random_seed=42, threads=2)
    monkeypatch.setattr(executor, "CHUNK", 256)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 256)
    small = merge_yaml(tmp_path, text, name="small", random_seed=42)
    other = merge_yaml(tmp_path, text, name="other", random_seed=43)
    torch.set_num_threads(2)
    for k in one:
        assert torch.equal(one[k], two[k]) and torch.equal(one[k], small[k]), k
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_della_kept_fraction_follows_the_rank(family, tmp_path):
    base, a, _, _ = family
    X32, A32 = load_tensors(base), load_tensors(a)
    out = merge_yaml(tmp_path, models_yaml((a, "{weight: 1.0, density: 0.5, epsilon: 0.2}"))
                     + f"merge_method: della_linear\nbase_model: {base}\nparameters: {{rescale: false}}\n",
                     random_seed=8)
    stats = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}  # upper half of each row: kept, Σp, Σp(1−p)
    for k in X32:
        d = (A32[k] - X32[k]).double()
        got = out[k].double() - X32[k].double()
        kept = got.abs() > 0
        assert torch.allclose(got[kept], d[kept], atol=1e-7)  # kept entries unscaled (rescale: false)
        rows = d.reshape(1, -1) if d.dim() < 2 else d
        n = rows.shape[1]
        ranks = rows.abs().argsort(dim=1).argsort(dim=1)
        p = 0.3 + ranks.double() / (n - 1) * 0.4  # density − ε + r̂·2ε
        kr = kept.reshape(rows.shape)
        for upper in (True, False):
            sel = ranks >= n // 2 if upper else ranks < n // 2
            stats[upper][0] += int(kr[sel].sum())
            stats[upper][1] += float(p[sel].sum())
            stats[upper][2] += float((p[sel] * (1 - p[sel])).sum())
    for kept, mean, var in stats.values():  # within 4σ of the Bernoulli(p) expectation
        assert abs(kept - mean) < 4 * math.sqrt(var), (kept, mean)
    (k_hi, m_hi, _), (k_lo, m_lo, _) = stats[True], stats[False]
    assert k_hi / m_hi > 0.95 and k_lo / m_lo < 1.05 and k_hi / k_lo > 1.4  # larger changes survive more often


@pytest.mark.parametrize("density,epsilon", [(0.1, 0.15), (0.9, 0.1), (0.5, 0.5)])
def test_della_epsilon_bounds_error(family, tmp_path, density, epsilon):
    base, a, _, _ = family
    text = (models_yaml((a, f"{{weight: 1.0, density: {density}}}"))
            + f"merge_method: della\nbase_model: {base}\nparameters: {{epsilon: {epsilon}}}\n")
    # the config alone decides it: refused when read, pointing at the model's density
    with pytest.raises(ConfigError, match=rf"models\[0\]\.parameters\.density \(line \d+\): della .*epsilon "
                                          f"{epsilon:g} does not fit density {density:g}"):
        merge_yaml(tmp_path, text, random_seed=1)
    # behind a filter only the planner knows the value: refused per tensor, before anything is written
    text = (models_yaml((a, f"{{weight: 1.0, density: [{{filter: mlp, value: {density}}}, {{value: 1}}]}}"))
            + f"merge_method: della\nbase_model: {base}\nparameters: {{epsilon: {epsilon}}}\n")
    with pytest.raises(ModelError, match=f"mlp.*epsilon {epsilon:g} does not fit density {density:g}"):
        merge_yaml(tmp_path, text, name="filtered", random_seed=1)
    assert not (tmp_path / "filtered").exists()
    hook = METHODS["della"].validate
    with pytest.raises(ModelError, match="model.layers.0.mlp.up_proj.weight"):
        hook("model.layers.0.mlp.up_proj.weight", {}, [{}, {"density": density, "epsilon": epsilon}])
    hook("x", {}, [{}, {"density": 1.0, "epsilon": epsilon}])  # density 1 or 0: no sampling, no check
    hook("x", {}, [{}, {"density": 0.0, "epsilon": epsilon}])


def test_della_key_sort_order_is_torchs_stable_descending_sort():
    """DELLA's ranks come from a numpy sort of 64-bit keys (magnitude bits, then the column) on the CPU
    (della.descending_order): the same permutation as torch's stable descending sort, ties in element order, at
    zeros, subnormals, infinities, NaNs, bf16-rounded values that repeat and rows wider than 2**16, whatever the
    number of threads its rows are split across."""
    import torch

    from mergebot.engine.methods.task_arithmetic.della import descending_order
    g = torch.Generator().manual_seed(3)
    rows = [
        (torch.randn(64, 1000, generator=g) * 0.01).to(torch.bfloat16).float().abs(),  # many equal magnitudes
        torch.randn(7, 4099, generator=g).abs(),
        (torch.randn(2, 70000, generator=g) * 0.01).to(torch.bfloat16).float().abs(),  # columns past 16 bits
        torch.tensor([[0.0, 1e-45, 3e-39, float("inf"), 0.0, 1.0, 1e-45, 65504.0, float("inf"), 2.0]]),
        torch.zeros(3, 17),
        torch.tensor([[float("nan"), 0.0, float("nan"), float("inf"), 5.0]] * 3),
    ]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            for mag in rows:
                ref = torch.sort(mag, dim=-1, descending=True, stable=True).indices
                assert torch.equal(descending_order(mag), ref)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("step", [None, 2500])
def test_della_keep_on_the_cpu_is_the_hash_below_the_ranked_threshold(step, monkeypatch):
    """della_keep's CPU form (numpy over ranges of rows in cache-sized steps: key sort, thresholds scattered,
    numpy hash) gives the bits of its definition, hash_u32(start + j) < ⌊p(rank)·2³²⌋ with ranks from torch's
    stable sort, for float32 and float64 deltas, bf16 ties, zeros, −0, NaN and ±inf, a 1-D tensor, rows of one
    element, rows wider than 2**16 and chunk starts past 2**32, at 1-3 threads, in its own steps and in steps
    of a few rows."""
    import torch

    from mergebot.engine.methods.task_arithmetic import della
    if step:
        monkeypatch.setattr(della, "KEEP_STEP", step)
    g = torch.Generator().manual_seed(5)

    def definition(d, shape, density, eps, key, start):
        rows = d.reshape(shape) if len(shape) == 2 else d.reshape(1, -1)
        width = rows.shape[1]
        thr = della._by_rank(width, density, eps, d.device).mul_(4294967296.0).long()
        order = torch.sort(rows.abs().float(), dim=-1, descending=True, stable=True).indices
        cut = torch.empty_like(order).scatter_(-1, order, thr.expand_as(order)).reshape(-1)
        return rng.hash_u32(torch.arange(d.numel(), dtype=torch.int64) + start, key) < cut

    cases = [((64, 1024), torch.float32), ((7, 4099), torch.float64), ((5000,), torch.float32),
             ((3, 1), torch.float32), ((3, 70000), torch.float32)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for shape, dtype in cases:
                d = (torch.randn(shape, generator=g) * 0.01).to(torch.bfloat16).to(dtype).reshape(-1)
                if d.numel() > 100:
                    d[:50] = 0
                    d[60], d[61], d[62], d[63] = float("nan"), -float("inf"), -0.0, float("inf")
                for start in (0, 123456789, (3 << 32) + 17):
                    for density, eps in ((0.5, 0.1), (0.2, 0.15)):
                        got = della.della_keep(d, shape, density, eps, 987, start)
                        assert torch.equal(got, definition(d, shape, density, eps, 987, start)), (shape, n, start)
    finally:
        torch.set_num_threads(threads)


def test_della_batched_l1_sums_are_the_term_by_term_integers(monkeypatch):
    """DELLA's rescale pass sums ‖δᵢ‖₁ and ‖δᵢ⊙keepᵢ‖₁ of all models in one batched call per row block of whole
    exact-sum blocks (exact.partials_of_pairs): the same factors, bit for bit, as l1_partials term by term
    (forced by making no block whole), and both within 1e-12 of a float64 sum."""
    import torch

    from mergebot.engine import exact
    from mergebot.engine.methods._rows import row_blocks
    from mergebot.engine.methods.base import MergeCall
    from mergebot.engine.methods.task_arithmetic import della
    g = torch.Generator().manual_seed(8)
    shape = (96, 2048)  # one row block of three whole exact-sum blocks
    assert [(s, e) for s, e, _ in row_blocks(shape, 96 * 2048, torch.device("cpu"))] == [(0, 3 * exact.BLOCK)]
    xs = [torch.randn(shape, generator=g) * 0.02 for _ in range(3)]
    per_input = [{}, {"density": 0.5, "epsilon": 0.1}, {"density": 0.3, "epsilon": 0.2}]
    call = MergeCall(xs, 0, {"rescale": True}, per_input, shape=shape, keys=[0, 11, 12], name="w")
    batched = della._l1_scales(call, [1, 2])
    monkeypatch.setattr(della, "BLOCK", 3 * exact.BLOCK + 1)  # no block is whole: term by term
    single = della._l1_scales(call, [1, 2])
    assert batched == single
    for i in (1, 2):
        d = (xs[i] - xs[0]).reshape(-1)
        keep = della.della_keep(d, shape, 0.5 if i == 1 else 0.3, 0.1 if i == 1 else 0.2, call.keys[i])
        ref = d.double().abs().sum() / (d.double().abs() * keep).sum()
        assert abs(batched[i] / ref.item() - 1) < 1e-12


@pytest.mark.parametrize("ties", [0, 1, 37, 250, 400])
def test_cut_keeps_the_first_ties_in_element_order_across_chunks(ties):
    """MagnitudeCut.mask chunk by chunk: everything above the cut plus exactly the first `ties` entries equal to
    it, whichever chunk they fall in (chunks where all their ties are kept skip the ranking)."""
    from mergebot.engine.methods._sparsify import MagnitudeCut
    g = torch.Generator().manual_seed(ties)
    bits = torch.randint(0, 8, (1000,), generator=g, dtype=torch.int32)
    cut = MagnitudeCut(above=5, ties=ties, equal=int((bits == 5).sum()))
    eq_at = (bits == 5).nonzero().flatten()
    want = bits > 5
    want[eq_at[:ties]] = True
    for step in (1000, 97, 10):
        seen, parts = 0, []
        for s in range(0, 1000, step):
            m, seen = cut.mask(bits[s:s + step], seen)
            parts.append(m)
        assert torch.equal(torch.cat(parts), want), step


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("how", ["select", "radix"])
def test_radix_cuts_are_the_sorted_kth_pattern(monkeypatch, dtype, threads, how):
    """top_k_cuts over chunks of bf16-derived magnitudes (heavy ties, several cuts whose inner passes count
    different prefixes, on one or more threads), selected in one step from the gathered patterns or by radix
    passes over the chunks (a tensor beyond SELECT_BYTES): `above` is the k-th largest pattern, `ties` how many
    of its equals the cut keeps, `equal` how many there are, as a sort of the whole tensor says."""
    from mergebot.engine.methods import _sparsify
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    if how == "radix":
        monkeypatch.setattr(_sparsify, "SELECT_BYTES", 0)
    g = torch.Generator().manual_seed(threads)
    n = 2 * _sparsify.CHUNK + 12345
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    x = (base.float() + torch.randn(n, generator=g) * 0.002).bfloat16()
    mag = (x.double() - base.double()).abs() if dtype == torch.int64 else (x.float() - base.float()).abs()
    bits = mag.view(dtype)
    ks = [1, 1000, n // 2, n - 7, n // 3, n - 1, 1000]
    cuts = _sparsify.top_k_cuts(lambda s, e: bits[s:e], n, ks, dtype)
    ordered = torch.sort(bits, descending=True).values
    for k, cut in zip(ks, cuts):
        kth = int(ordered[k - 1])
        above_count = int((bits > kth).sum())
        assert (cut.above, cut.ties, cut.equal) == (kth, k - above_count, int((bits == kth).sum())), k
