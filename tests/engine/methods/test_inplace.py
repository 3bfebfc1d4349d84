"""The eager in-place forms (reused buffers, one pass per operation) give the bytes of the formulas as written,
which are what the GPU runs (out of place) and what compiled kernels fuse: a reordered or fused operation
here would change the published bytes with the device, so every form is compared bit for bit."""

from __future__ import annotations

import pytest
import torch

from mergebot.engine.methods import _linalg, model_stock, nearswap
from mergebot.engine.methods.base import MergeCall
from mergebot.engine.methods.task_arithmetic.combine import Mix, combine, combine_into, kernel_masked, weighted_deltas_into

N = 4099  # not a multiple of any block or vector width


def _inputs(k: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g, dtype=torch.float64) * 0.05
    xs = [base + torch.randn(N, generator=g, dtype=torch.float64) * 0.01 * (i + 1) for i in range(k)]
    xs[0][::13] = base[::13]  # equal values: zero deltas and distances
    return [t.to(dtype) for t in [base, *xs]]


STORED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("with_base", [True, False])
def test_lincomb_in_place_is_the_formula(stored, dtype, with_base):
    base, *xs = _inputs(3, stored, 1)
    coeffs = [0.37, -1.25, 2.0 / 3.0]
    b = base.to(dtype)
    vs = [x.to(dtype) - b if with_base else x.to(dtype) for x in xs]
    want = vs[0] * coeffs[0]
    for v, c in zip(vs[1:], coeffs[1:]):
        want = want + v * c
    if with_base:
        want = b + want
    got = _linalg.lincomb(xs, coeffs, dtype, base if with_base else None)
    assert torch.equal(got, want)
    out = torch.empty(N, dtype=stored)
    _linalg.lincomb(xs, coeffs, dtype, base if with_base else None, out=out)
    assert torch.equal(out, want.to(stored))


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("t", [0.0, 0.31, 1.7])
def test_model_stock_interpolation_in_place_is_the_formula(stored, dtype, t):
    base, *xs = _inputs(3, stored, 2)
    call = MergeCall([base, *xs], 0, {"filter_wise": False}, [{}] * 4, dtype=dtype, out_dtype=stored)
    ws = [x.to(dtype) for x in xs]
    want = model_stock._mean(ws) * t + base.to(dtype) * (1.0 - t)
    assert torch.equal(model_stock._interpolate(call, t), want)


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.02, 5.0])
def test_nearswap_in_place_is_the_kernel(stored, dtype, t):
    base, x = _inputs(1, stored, 3)
    out = torch.empty(N, dtype=stored)
    nearswap._into(base, x, t, dtype, out)
    assert torch.equal(out, nearswap._kernel.eager(base, x, t, dtype, stored))


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (True, 0.7), (False, 1.3)])
def test_task_arithmetic_in_place_is_the_kernel(stored, dtype, normalize, lam):
    base, *xs = _inputs(3, stored, 4)
    mix = Mix([0.6, -0.25, 0.4], False, normalize, lam)
    out = torch.empty(N, dtype=stored)
    weighted_deltas_into(base, xs, mix, dtype, out)
    want = kernel_masked.eager(base, xs, [None] * 3, [1.0] * 3, mix.weights, False, normalize, lam, dtype, stored)
    assert torch.equal(out, want)


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("lambdas", [[1.0, 1.0, 1.0], [1.3, 0.8, 1.0]])
@pytest.mark.parametrize("piece", [1 << 18, 1000])
def test_ram_in_place_is_the_kernel(monkeypatch, stored, dtype, lambdas, piece):
    """RAM's in-place form, in one piece or five, with NaN and infinite deltas (never active: NaN; always: inf)."""
    from mergebot.engine.methods import ram
    monkeypatch.setattr(ram._InPlace, "PIECE", piece)
    base, *xs = _inputs(3, stored, 5)
    xs[1][7], xs[2][8] = float("nan"), float("inf")
    eps = 0.01
    form = ram._InPlace(base, xs, eps, dtype)
    counts = form.counts()
    out = torch.empty(N, dtype=stored)
    form.merge(lambdas, out)
    assert torch.equal(out, ram._kernel.eager(base, xs, eps, lambdas, dtype, stored))
    assert counts == ram._count_kernel.eager(base, xs, eps, dtype).tolist()
    assert 0 < sum(counts[0::2]) and 0 < sum(counts[1::2])  # shared and unique positions both occur


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("consensus,normalize,lam", [(True, True, 1.0), (True, False, 0.7), (False, True, 1.0),
                                                     (False, False, 1.3)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_combine_in_place_is_combine(stored, dtype, consensus, normalize, lam, k):
    """DELLA's merge pass and the eager masked kernel: the same bytes as `combine`, with zero deltas (no vote),
    opposite deltas that cancel (total 0 votes +), negative weights and weights that are not float32 values."""
    base, *xs = _inputs(k, stored, 6)
    b = base.to(dtype)
    deltas = [x.to(dtype) - b for x in xs]
    deltas[0][5::17] = -deltas[-1][5::17] if k > 1 else 0.0
    deltas[-1][7::19] = 0.0
    weights = [0.6, -0.25, 1.0 / 3.0][:k]
    want = combine(b, deltas, weights, consensus, normalize, lam, stored)
    out = torch.empty(N, dtype=stored)
    assert torch.equal(combine_into(b, [d.clone() for d in deltas], weights, consensus, normalize, lam, out), want)


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("ends", [[0, 0], [1500, N], [N, 7]])
def test_ties_merge_in_place_is_the_kernel(stored, dtype, consensus, ends):
    """TIES' merge pass without compiled kernels: the fused kernel's bytes, with cuts that fall on equal
    magnitudes (ties kept up to each `end`), one model unpruned, and rescales."""
    from mergebot.engine.methods.task_arithmetic import magnitude
    base, *xs = _inputs(2, stored, 7)
    b = base.to(dtype)
    mags = [(x.to(dtype) - b).abs().to(torch.float32) for x in xs]
    aboves = [mags[0].median().view(torch.int32).reshape(()), None]  # an element's value: the cut has ties
    mix = Mix([0.7, -0.4], consensus, True, 0.9)
    scales = [1.37, 1.0]
    want = magnitude._kernel_magnitude.eager(base, xs, aboves, [torch.tensor(e, dtype=torch.int32) for e in ends],
                                             scales, mix.weights, consensus, True, 0.9, dtype, stored)
    out = torch.empty(N, dtype=stored)
    assert torch.equal(magnitude._magnitude_into(base, xs, aboves, ends, scales, mix, dtype, out), want)
    aboves[1] = mags[1].quantile(0.3).view(torch.int32).reshape(())  # both pruned
    want = magnitude._kernel_magnitude.eager(base, xs, aboves, [torch.tensor(e, dtype=torch.int32) for e in ends],
                                             scales, mix.weights, consensus, True, 0.9, dtype, stored)
    assert torch.equal(magnitude._magnitude_into(base, xs, aboves, ends, scales, mix, dtype, out), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_unless_is_where(dtype):
    """The integer-mask form of where(keep, d, 0.0) keeps -0.0, inf, NaN and subnormals bit for bit and drops to
    +0.0, from a bool mask or an all-ones/zero integer mask."""
    from mergebot.engine.methods.task_arithmetic.combine import bits_of, zero_unless
    d = torch.tensor([1.5, -0.0, float("inf"), float("-inf"), float("nan"), 1e-310, -2.0, 3.0] * 9, dtype=dtype)
    keep = torch.arange(d.numel()) % 3 != 1
    want = torch.where(keep, d, 0.0)
    got = zero_unless(d.clone(), keep)
    assert torch.equal(bits_of(got), bits_of(want))
    mask = keep.to(bits_of(d).dtype).neg_()
    assert torch.equal(bits_of(zero_unless(d.clone(), mask)), bits_of(want))


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("k", [1, 3])
def test_sce_merge_in_place_is_the_formula(stored, dtype, k):
    """SCE's sign election and ω-weighted mean without bool tensors: `_merge`'s bytes, with zero τ (no vote),
    τ that cancel, and positions where no τ agrees (the divisor's clamp)."""
    from mergebot.engine.methods import sce
    base, *xs = _inputs(k, stored, 8)
    b = base.to(dtype)
    taus = [x.to(dtype) - b for x in xs]
    if k > 1:
        taus[1][3::11] = -taus[0][3::11]
    weights = [0.5, 0.2, 0.3][:k]
    want = sce._merge(b, taus, weights)
    out = torch.empty(N, dtype=dtype)
    sce._merge_into(b, [t.clone() for t in taus], weights, out)
    assert torch.equal(out, want)


@pytest.mark.parametrize("stored,dtype", STORED)
@pytest.mark.parametrize("start", [0, (1 << 31) - 70000, 5 * (1 << 32) + 3])
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("threads,keep", [(None, True), (1, False), (3, True)])
def test_dare_in_place_is_the_kernel(monkeypatch, stored, dtype, start, consensus, threads, keep):
    """DARE without compiled kernels: the L1 sums' integers and the merged bytes of the kernels (whose compiled
    form tests/engine/test_execution.py checks), over several 256K-element pieces of a chunk that starts where the
    int32 index wraps or past 2**32, densities that keep nothing, some or all, and a rescale factor; the keep
    flags hashed over one range per thread (1 or 3), and kept from the sums to the merge or (keep=False: over
    budget) hashed again."""
    from mergebot.engine import rng
    from mergebot.engine.methods import _sparsify
    from mergebot.engine.methods.task_arithmetic import dare
    if threads:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    if not keep:
        monkeypatch.setattr(_sparsify, "KEEP_BYTES", 0)
    g = torch.Generator().manual_seed(9)
    n = 3 * dare.PIECE + 4099  # three 256K+ ranges at 3 threads
    base = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(stored)
    xs = [(base.double() + torch.randn(n, generator=g, dtype=torch.float64) * 0.01).to(stored) for _ in range(3)]
    per_input = [{}] + [{"density": d} for d in (0.3, 1.0, 0.0)]
    call = MergeCall([base, *xs], 0, {}, per_input, dtype=dtype, out_dtype=stored, start=start,
                     keys=[0, 11, 22, 33])
    streams = dare._streams(call)
    assert torch.equal(dare._Eager(call).l1_sums(), dare._l1_sums.eager(base, xs, streams, dtype))
    mix = Mix([0.5, 0.3, -0.2], consensus, True, 1.0)
    scales = [1.7, 1.0, 1.0]
    want = dare._kernel_random.eager(base, xs, streams, scales, mix.weights, consensus, True, 1.0, dtype, stored)
    out = torch.empty(n, dtype=stored)
    assert len(dare._FLAGS) == (2 if keep else 0)  # densities 0.3 and 0.0 (1.0 keeps all: no hash)
    assert torch.equal(dare._Eager(call).merge(scales, mix, out), want)
    assert not dare._FLAGS  # the merge took them
    mask = rng.keep32_mask_into(torch.arange(n, dtype=torch.int32), *rng.Stream32.of(11, start, n, 1 << 31).args(),
                                torch.empty(n, dtype=torch.int32), (torch.empty(n, dtype=torch.int32),
                                                                    torch.empty(n, dtype=torch.int32)),
                                torch.empty(n, dtype=torch.int64))
    assert torch.equal(mask == -1, rng.hash_u32(torch.arange(n, dtype=torch.int64) + start, 11) < (1 << 31))


@pytest.mark.parametrize("width", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", [1, 700, 2047, 4098, 4099])
@pytest.mark.parametrize("select_bytes", [0, 1 << 20])
def test_integer_keep_mask_is_the_cuts_bool_mask(monkeypatch, width, k, select_bytes):
    """`MagnitudeCut.tie_end` + `keep_into` (integer masks, no running count) keep exactly the entries the
    bool form with its running tie count keeps, chunk by chunk, including cuts among many equal patterns, with
    cuts from radix passes or from one selection over the gathered patterns."""
    from mergebot.engine.methods import _sparsify
    monkeypatch.setattr(_sparsify, "CHUNK", 512)
    monkeypatch.setattr(_sparsify, "SELECT_BYTES", select_bytes)
    g = torch.Generator().manual_seed(k)
    bits = torch.randint(0, 40, (N,), generator=g).to(width) * 1000003  # ~100 equal patterns per value
    bits[::7] = 0
    cut = _sparsify.top_k_cuts(lambda s, e: bits[s:e], N, [k], width)[0]
    end = cut.tie_end(lambda s, e: bits[s:e], N)
    seen = 0
    for s in range(0, N, 512):
        want, seen = cut.mask(bits[s:s + 512], seen)
        got = cut.keep_into(bits[s:s + 512], s, end, torch.empty_like(bits[s:s + 512]))
        assert torch.equal(got, -want.to(width)), s
    assert int(cut.keep_into(bits, 0, end, bits.clone()).ne(0).sum()) == min(k, N)
