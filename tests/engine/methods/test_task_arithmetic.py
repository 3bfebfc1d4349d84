"""Task arithmetic, TIES and DARE through the whole pipeline, against independent float64 references
(merge-semantics.md §2.7): pruning cuts, rescale, seeds and mergekit's own draw order."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_same_bytes_kept_chunked_recomputed, close, f64, merge_dare, merge_yaml, ties64


def test_task_arithmetic_with_lambda(family, tmp_path):
    base, a, b, _ = family
    X, A, B = f64(base), f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: -0.2}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 1.5}}
""")
    close(out, {k: X[k] + 1.5 * (0.7 * (A[k] - X[k]) - 0.2 * (B[k] - X[k])) for k in X})


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_pruning(family, tmp_path, normalize):
    base, a, b, c = family
    X, A, B, C = f64(base), f64(a), f64(b), f64(c)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {c}
    parameters: {{weight: 0.3, density: 1.0}}
merge_method: ties
base_model: {base}
parameters: {{normalize: {str(normalize).lower()}, int8_mask: true}}
""")
    ref = {k: ties64(X[k], [A[k], B[k], C[k]], [1.0, 0.6, 0.3], normalize, densities=[0.5, 0.7, 1.0]) for k in X}
    close(out, ref, atol=5e-6)


def test_dare_ties_density_one_is_ties_without_pruning(family, tmp_path):
    base, a, b, _ = family
    X, A, B = f64(base), f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.5, density: 1.0}}
  - model: {b}
    parameters: {{weight: 0.4, density: 1.0}}
merge_method: dare_ties
base_model: {base}
""", random_seed=3)
    close(out, {k: ties64(X[k], [A[k], B[k]], [0.5, 0.4], normalize=False) for k in X})


def test_dare_linear_keeps_density_and_rescales_l1(family, tmp_path):
    base, a, _, _ = family
    X, A = f64(base), f64(a)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.3}}
merge_method: dare_linear
base_model: {base}
parameters: {{normalize: false}}
""", random_seed=11)
    kept = total = 0
    for k in X:
        d = A[k] - X[k]
        o = out[k].double() - X[k]
        nz = o.abs() > 0
        kept += int(nz.sum())
        total += d.numel()
        # every kept entry is the original delta times one factor per tensor: ||δ||₁ / ||δ⊙mask||₁
        factor = float(d.abs().sum() / d[nz].abs().sum())
        assert torch.allclose(o[nz], d[nz] * factor, atol=1e-6, rtol=1e-5), k
        assert float(o.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-5)
    assert kept / total == pytest.approx(0.3, abs=0.02)


def test_dare_same_seed_same_bytes_across_threads(family, tmp_path):
    one = merge_dare(family, tmp_path, "one", random_seed=42, threads=1)
    two = merge_dare(family, tmp_path, "two", random_seed=42, threads=2)
    other = merge_dare(family, tmp_path, "other", random_seed=43)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    torch.set_num_threads(2)


def _mergekit_k_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """Reference: mergekit 0.1.5's `magnitude` selection, argsort(|d| in float32, descending)[:k] (its tie order,
    which mergebot follows when mergekit computes in float32, e.g. with `dtype: float32`)."""
    flat = d.flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat.abs().float(), descending=True)[:max(1, int(density * flat.numel()))]] = True
    return keep.reshape(d.shape)


def _exact_k_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """Reference: the k largest |d|, ties broken by element order (stable sort on -|d|)."""
    flat = d.flatten()
    k = max(1, int(density * flat.numel()))
    order = torch.sort(-flat.abs().float(), stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(d.shape)


@pytest.mark.parametrize("chunk", [1 << 22, 100])
def test_magnitude_cut_is_exact_k_with_ties_in_any_chunking(monkeypatch, chunk):
    from mergebot.engine.methods import _sparsify
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    d = (torch.randint(-6, 7, (3001,), generator=g).float() / 4)  # many exact ties, like bf16 deltas
    for density in (0.01, 0.3, 0.5, 0.77, 0.999):
        cut = _sparsify.magnitude_cut(lambda s, e: _sparsify.magnitude_bits(d[s:e]), d.numel(), density)
        seen, parts = 0, []
        for s in range(0, d.numel(), chunk):
            m, seen = cut.mask(_sparsify.magnitude_bits(d[s:s + chunk]), seen)
            parts.append(m)
        got = torch.cat(parts)
        assert int(got.sum()) == max(1, int(density * d.numel()))
        assert torch.equal(got, _exact_k_mask(d, density)), density


def test_ties_on_bf16_with_rescale_and_chunking(family_bf16, tmp_path, monkeypatch):
    from mergebot.engine.methods import _sparsify
    monkeypatch.setattr(_sparsify, "CHUNK", 128)
    base, a, b = family_bf16
    X, A, B = f64(base), f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.6}}
merge_method: ties
base_model: {base}
dtype: float32
parameters: {{rescale: true}}
""")
    for k in X:
        deltas = []
        for M, dens in ((A, 0.4), (B, 0.6)):
            d = (M[k] - X[k]).float().double()
            m = _mergekit_k_mask(d.float(), dens)  # `dtype: float32`: mergekit's precision, so its tie order
            kept = torch.where(m, d, 0.0)
            l1, l1k = float(d.abs().sum()), float(kept.abs().sum())
            deltas.append(kept * (l1 / l1k if l1 >= 1e-7 and l1k >= 1e-7 else 1.0))
        ref = ties64(X[k], [X[k] + deltas[0], X[k] + deltas[1]], [0.7, 0.5], normalize=True)
        assert torch.allclose(out[k].double(), ref, atol=2e-6), k


def test_dare_mergekit_rng_mode_reproduces_mergekits_draw_order(family, tmp_path):
    """--rng mergekit: torch.manual_seed(seed), tensors in sorted-name order, one bernoulli per non-base model
    in config order (merge-semantics §2.7); the reference below draws the same way, independently."""
    base, a, b, _ = family
    X, A, B = f64(base), f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.3}}
merge_method: dare_ties
base_model: {base}
""", random_seed=7, rng="mergekit")
    torch.manual_seed(7)
    for k in sorted(X):
        deltas = []
        for M, dens in ((A, 0.5), (B, 0.3)):
            d = M[k] - X[k]
            keep = torch.bernoulli(torch.full(d.shape, dens, dtype=torch.float32)) > 0
            kept = torch.where(keep, d, 0.0)
            l1, l1k = float(d.abs().sum()), float(kept.abs().sum())
            deltas.append(kept * (l1 / l1k if l1 >= 1e-7 and l1k >= 1e-7 else 1.0))
        ref = ties64(X[k], [X[k] + deltas[0], X[k] + deltas[1]], [0.6, 0.4], normalize=False)
        assert torch.allclose(out[k].double(), ref, atol=2e-6), k


@pytest.mark.parametrize("chunk", [64, 1000])
def test_ties_chunked_with_ties_at_the_cut_equals_whole_tensor(family_bf16, tmp_path, monkeypatch, chunk):
    """bf16 deltas repeat, so the magnitude cut has many tied entries spread over chunks: the fused pass
    (bits > cut, or == cut before the last kept tie) keeps exactly the entries the whole-tensor mask keeps."""
    from mergebot.engine.methods import _sparsify
    base, a, b = family_bf16
    text = (f"models:\n  - model: {base}\n  - model: {a}\n    parameters: {{weight: 0.6, density: 0.37}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.61}}\nmerge_method: ties\n"
            f"base_model: {base}\ndtype: float32\n")
    whole = merge_yaml(tmp_path, text, name="whole")
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    chunked = merge_yaml(tmp_path, text, name="chunked")
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("method,extra", [("ties", ""), ("breadcrumbs", ", gamma: 0.05"),
                                          ("breadcrumbs_ties", ", gamma: 0.05")])
@pytest.mark.parametrize("rescale", [False, True])
def test_kept_deltas_give_the_same_bytes(family_bf16, tmp_path, monkeypatch, method, extra, rescale):
    """The deltas a selection keeps between its passes (_sparsify.KEEP_BYTES), read back and finally
    overwritten by the merge, give the bytes of deltas computed again in every pass, chunked or whole."""
    base, a, b = family_bf16
    text = (f"models:\n  - model: {base}\n  - model: {a}\n    parameters: {{weight: 0.6, density: 0.37{extra}}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.61{extra}}}\nmerge_method: {method}\n"
            f"base_model: {base}\nparameters: {{rescale: {str(rescale).lower()}}}\n")
    assert_same_bytes_kept_chunked_recomputed(tmp_path, text, monkeypatch, 100)
