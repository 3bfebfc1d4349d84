"""mergebot.engine.exact: order-free sums against math.fsum (the correctly rounded sum of the same floats), the
same integers however a tensor is cut into aligned chunks, and the two shortcuts methods use (`nonneg`, `bound`)."""

from __future__ import annotations

import math

import pytest
import torch

from mergebot.engine import exact
from mergebot.engine.exact import Sums, partials


def _terms(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # magnitudes over ~30 binades and both signs, plus exact zeros: what deltas and products look like
    a = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 10, (n,), generator=g))
    a[::7] = 0.0
    return [a.float(), a.float().abs(), (a * a).float()]


def _fsum(t: torch.Tensor) -> float:
    return math.fsum(t.double().tolist())


@pytest.mark.parametrize("n", [1, 1000, exact.BLOCK, 3 * exact.BLOCK + 17])
def test_sums_match_fsum(n):
    terms = _terms(n, n)
    got = Sums.of(partials(terms, nonneg=[False, True, True])).values()
    for t, v in zip(terms, got.tolist()):
        ref = _fsum(t)
        scale = math.fsum(t.double().abs().tolist()) or 1.0
        assert abs(v - ref) <= 2.0 ** -40 * scale, (n, v, ref)


def test_nonneg_and_signed_paths_give_the_same_integers():
    t = _terms(2 * exact.BLOCK + 5, 3)[1]  # |a|: never negative
    assert torch.equal(partials([t], nonneg=True), partials([t]))


def test_same_integers_for_any_aligned_chunking():
    terms = _terms(5 * exact.BLOCK + 123, 4)
    whole = Sums.of(partials(terms))
    cuts = [0, exact.BLOCK, 3 * exact.BLOCK, terms[0].numel()]
    pieces = Sums(len(terms))
    for s, e in reversed(list(zip(cuts, cuts[1:]))):  # any order
        pieces.add(partials([t[s:e] for t in terms]))
    assert pieces.ints == whole.ints


def test_bound_term_is_exact_within_its_bounds_quantum_and_deterministic():
    """A masked copy summed with its whole term's exponent (DARE's L1 sums): still within fsum's error bound
    (taken on the bounding term), identical integers on every call and for every aligned chunking."""
    d = _terms(4 * exact.BLOCK + 9, 5)[1]
    keep = torch.rand(d.numel(), generator=torch.Generator().manual_seed(6)) < 0.3
    kept = torch.where(keep, d, 0.0)
    got = partials([d, kept], nonneg=True, bound=[None, 0])
    assert torch.equal(got[1, 0], got[0, 0])  # the kept term uses the whole term's exponents
    total = Sums.of(got).values().tolist()
    assert abs(total[1] - _fsum(kept)) <= 2.0 ** -40 * _fsum(d)
    assert abs(total[0] - _fsum(d)) <= 2.0 ** -40 * _fsum(d)
    half = 2 * exact.BLOCK
    pieces = Sums(2)
    pieces.add(partials([d[half:], kept[half:]], nonneg=True, bound=[None, 0]))
    pieces.add(partials([d[:half], kept[:half]], nonneg=True, bound=[None, 0]))
    assert pieces.ints == Sums.of(got).ints


def test_non_finite_terms_give_nan_and_bad_bounds_are_refused():
    t = torch.ones(exact.BLOCK + 3)
    t[5] = math.inf
    assert math.isnan(float(Sums.of(partials([t])).values()[0]))
    with pytest.raises(ValueError, match="earlier term"):
        partials([t, t], bound=[None, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_rows_give_partials_integers(dtype):
    """partials_of_rows (the eager Gram matrix's form) must give partials' integers: squares first, then
    signed terms; a non-finite row is flagged like partials flags it."""
    a, b, _ = _terms(3 * exact.BLOCK, 11)
    a, b = a.to(dtype), b.to(dtype) - 0.5
    terms = [a * a, b * b, a * b, -a]
    flags = [True, True, False, False]
    rows = torch.stack(terms)
    assert torch.equal(exact.partials_of_rows(rows, nonneg_rows=2), partials(terms, nonneg=flags))
    rows[3, 5] = math.inf
    got = Sums.of(exact.partials_of_rows(rows, nonneg_rows=2)).values()
    assert math.isnan(got[3]) and not math.isnan(got[2])
    with pytest.raises(ValueError, match="multiple"):
        exact.partials_of_rows(rows[:, :-1].contiguous())



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_give_the_bounded_partials_integers(dtype):
    """partials_of_pairs (eager DARE's L1 sums) must give partials' integers with each odd term bounded by the
    even one before it: masked copies, a block of zeros, a tiny and a huge scale, and non-finite blocks (an inf
    in a whole term marks its kept copy too, as partials does)."""
    a, b, c = _terms(3 * exact.BLOCK, 12)
    whole = [a.to(dtype).abs(), (b.to(dtype) * 1e-30).abs(), (c.to(dtype) * 1e20).abs()]
    whole[0][exact.BLOCK:2 * exact.BLOCK] = 0
    terms = []
    for t in whole:
        terms += [t, t * (torch.rand(t.shape, generator=torch.Generator().manual_seed(3)) < 0.4)]
    bound = [None if k % 2 == 0 else k - 1 for k in range(len(terms))]
    rows = torch.stack(terms)
    assert torch.equal(exact.partials_of_pairs(rows), partials(terms, nonneg=True, bound=bound))
    rows[2, 7] = math.inf
    rows[4, 2 * exact.BLOCK + 9] = math.nan
    want = partials(list(rows), nonneg=True, bound=bound)
    assert torch.equal(exact.partials_of_pairs(rows), want)
    got = Sums.of(want).values()
    assert [math.isnan(v) for v in got.tolist()] == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="whole"):
        exact.partials_of_pairs(rows[:, :-1].contiguous())
    with pytest.raises(ValueError, match="even"):
        exact.partials_of_pairs(rows[:5])

@pytest.mark.parametrize("n", [5, 3 * exact.BLOCK + 17])
def test_gram_of_offsets_against_float64_and_any_slicing(n, monkeypatch):
    """The eager Gram matrix of offsets from a base: float64's within rounding, and the same integers
    whatever slice size it walks the tensors in (ragged ends included)."""
    from mergebot.engine.methods import _linalg
    g = torch.Generator().manual_seed(n)
    xs = [(torch.randn(n, generator=g) * 0.02).bfloat16() for _ in range(3)]
    got = _linalg.gram(xs[1:], torch.float32, xs[0])
    vs = [x.double() - xs[0].double() for x in xs[1:]]
    ref = torch.tensor([[float((u * v).sum()) for v in vs] for u in vs], dtype=torch.float64)
    assert torch.allclose(got.values(), ref, rtol=1e-6, atol=0)
    monkeypatch.setattr(_linalg, "GRAM_BLOCK", exact.BLOCK)
    assert _linalg.gram(xs[1:], torch.float32, xs[0]).ints == got.ints
