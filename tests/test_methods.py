"""Every core method through the whole pipeline, against independent float64 references (§2.1, §2.2, §2.7)."""

from __future__ import annotations

import pytest
import torch

from mergebot.engine import executor, rng
from mergebot.config.params import interpolate
from tests.helpers import f64, merge_yaml, slerp64, ties64

ATOL = 2e-6


def _close(out, ref, atol=ATOL):
    assert set(out) == set(ref)
    worst = max(float((out[k].double() - ref[k]).abs().max()) for k in ref)
    assert worst < atol, worst


def test_linear_normalized_and_not(family, tmp_path):
    base, a, b, c = family
    A, B, C = f64(a), f64(b), f64(c)
    text = f"""
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.5}}
merge_method: linear
"""
    out = merge_yaml(tmp_path, text)
    _close(out, {k: (A[k] + 0.3 * B[k] + 0.5 * C[k]) / 1.8 for k in A})
    out = merge_yaml(tmp_path, text + "parameters: {normalize: false}\n", name="raw")
    _close(out, {k: A[k] + 0.3 * B[k] + 0.5 * C[k] for k in A})


def test_linear_filter_gradient_weights(family, tmp_path):
    _, a, b, _ = family
    A, B = f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {a}
    parameters:
      weight:
        - filter: mlp
          value: [0.0, 1.0]
        - value: 0.5
  - model: {b}
    parameters: {{weight: 0.5}}
merge_method: linear
parameters: {{normalize: false}}
""")
    ref = {}
    for k in A:
        if ".mlp." in k:
            layer = int(k.split(".")[2])
            w = interpolate([0.0, 1.0], layer / 3, float)
        else:
            w = 0.5
        ref[k] = w * A[k] + 0.5 * B[k]
    _close(out, ref)


def test_slerp_gradients_filters_and_t_zero_for_embeddings(family, tmp_path):
    base, a, _, _ = family
    X, Y = f64(base), f64(a)
    out = merge_yaml(tmp_path, f"""
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""")
    ref = {}
    for k in X:
        parts = k.split(".")
        t_pos = int(parts[2]) / 3 if parts[1] == "layers" else 0.0
        if "self_attn" in k:
            t = interpolate([0, 0.5, 0.3, 0.7, 1], t_pos, float)
        elif "mlp" in k:
            t = interpolate([1, 0.5, 0.7, 0.3, 0], t_pos, float)
        else:
            t = 0.5
        ref[k] = slerp64(t, X[k], Y[k])
    _close(out, ref)
    # t=0 gives the base exactly, t=1 the other model
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"].double(), X["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"].double(), Y["model.layers.3.self_attn.q_proj.weight"])


def test_slerp_colinear_falls_back_to_lerp():
    from mergebot.engine.methods.slerp import coefficients
    assert coefficients(0.3, 4.0, 16.0, 8.0) == pytest.approx((0.7, 0.3))


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
    _close(out, {k: X[k] + 1.5 * (0.7 * (A[k] - X[k]) - 0.2 * (B[k] - X[k])) for k in X})


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
    _close(out, ref, atol=5e-6)


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
    _close(out, {k: ties64(X[k], [A[k], B[k]], [0.5, 0.4], normalize=False) for k in X})


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


def _dare(family, tmp_path, name, **opts):
    base, a, b, _ = family
    return merge_yaml(tmp_path, f"""
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.4}}
merge_method: dare_ties
base_model: {base}
dtype: float32
""", name=name, **opts)


def test_dare_same_seed_same_bytes_across_threads(family, tmp_path):
    one = _dare(family, tmp_path, "one", random_seed=42, threads=1)
    two = _dare(family, tmp_path, "two", random_seed=42, threads=2)
    other = _dare(family, tmp_path, "other", random_seed=43)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    torch.set_num_threads(2)


def test_chunked_execution_equals_whole_tensor(family, tmp_path, monkeypatch):
    """Chunking (two-pass reduce/apply, index-addressed RNG) must not change the result."""
    monkeypatch.setattr(executor, "CHUNK", 1 << 30)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 1 << 30)
    whole = _dare(family, tmp_path, "whole", random_seed=5)
    monkeypatch.setattr(executor, "CHUNK", 64 * 3)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 64 * 3)
    chunked = _dare(family, tmp_path, "chunked", random_seed=5)
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], atol=1e-6, rtol=0), k
    # slerp's global norms summed over chunks
    base, a, _, _ = family
    text = f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.3}}\n"
    s_chunked = merge_yaml(tmp_path, text, name="s_chunked")
    monkeypatch.setattr(executor, "CHUNK", 1 << 30)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 1 << 30)
    s_whole = merge_yaml(tmp_path, text, name="s_whole")
    for k in s_whole:
        assert torch.allclose(s_whole[k], s_chunked[k], atol=1e-6, rtol=0), k


def test_bf16_inputs_compute_in_float32_cast_once(family_bf16, tmp_path):
    base, a, b = family_bf16
    X, A, B = f64(base), f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {b}
    parameters: {{weight: 0.75}}
merge_method: linear
""")
    for k in X:
        assert out[k].dtype == torch.bfloat16
        ref = (0.25 * A[k] + 0.75 * B[k]).to(torch.bfloat16)
        assert torch.equal(out[k], ref), k


def test_rng_streams_are_uniform_and_independent():
    n = 1 << 20
    k1, k2 = rng.stream_key(7, "model.layers.0.mlp.up_proj.weight", 1), rng.stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)
    assert k1 != k2
    m1, m2 = rng.keep_mask(0, n, k1, 0.3), rng.keep_mask(0, n, k2, 0.3)
    assert float(m1.float().mean()) == pytest.approx(0.3, abs=0.003)
    assert float((m1 & m2).float().mean()) == pytest.approx(0.09, abs=0.002)  # independent streams
    assert float((m1[1:] & m1[:-1]).float().mean()) == pytest.approx(0.09, abs=0.002)  # no neighbour correlation
    # addressable: any window equals the same slice of the whole stream, also past 2**32
    assert torch.equal(rng.keep_mask(1000, 5000, k1, 0.3), m1[1000:6000])
    big = (1 << 32) - 10
    assert torch.equal(rng.keep_mask(big, 20, k1, 0.5)[10:], rng.keep_mask(big + 10, 10, k1, 0.5))


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties"])
def test_compiled_kernels_equal_eager(family, tmp_path, method):
    """torch.compile'd kernels (used for large merges) give the eager results bit for bit (linear and slerp stay
    eager in every mode: their in-place form is mergekit's fused multiply-add)."""
    pytest.importorskip("torch._inductor")
    from mergebot.engine import fuse
    if not fuse.compiler_available():
        pytest.skip("no C compiler")
    base, a, b, _ = family
    params = {"linear": "{weight: 0.6}", "slerp": "{}", "ties": "{weight: 0.6, density: 0.5}",
              "dare_ties": "{weight: 0.6, density: 0.5}"}[method]
    text = (f"models:\n  - model: {base}\n  - model: {a}\n    parameters: {params}\n"
            f"merge_method: {method}\nbase_model: {base}\nparameters: {{t: 0.4, weight: 0.5}}\n")
    if method == "linear":
        text = text.replace(f"  - model: {base}\n", f"  - model: {base}\n    parameters: {{weight: 0.4}}\n", 1)
    eager = merge_yaml(tmp_path, text, name="eager", random_seed=9, compile="off")
    fused = merge_yaml(tmp_path, text, name="fused", random_seed=9, compile="on")
    for k in eager:
        assert torch.equal(eager[k], fused[k]), k


def test_auto_compile_only_for_large_cpu_merges_of_methods_that_gain(monkeypatch):
    """`--compile auto` (mergebot.engine.fuse.configure): never on CUDA (eager beats a cold Triton compile there), never
    for small merges or methods with a fast eager form, never without a C compiler."""
    from mergebot.engine import fuse
    big, small = fuse.AUTO_MIN_ELEMENTS, fuse.AUTO_MIN_ELEMENTS - 1
    monkeypatch.setattr(fuse, "compiler_available", lambda: True)
    assert fuse.configure("auto", big, True, "cpu")
    assert not fuse.configure("auto", big, True, "cuda")
    assert not fuse.configure("auto", small, True, "cpu")
    assert not fuse.configure("auto", big, False, "cpu")
    assert fuse.configure("on", 1, True, "cpu") and not fuse.configure("off", big, True, "cpu")
    assert not fuse.configure("on", big, True, "cuda")  # GPU kernels are eager in every mode
    # methods whose eager form is one in-place pass (linear, slerp) stay eager even with --compile on
    assert not fuse.configure("on", big, False, "cpu")
    monkeypatch.setattr(fuse, "compiler_available", lambda: False)
    assert not fuse.configure("auto", big, True, "cpu")
    fuse.configure("off", 0)


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


@pytest.mark.parametrize("start", [0, 5, (1 << 31) - 100, (1 << 32) - 1000, 1 << 32, 3 * (1 << 32) + 12345])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9999, 1.0])
def test_int32_keep_mask_is_the_int64_hash_bit_for_bit(start, p):
    """mergebot.engine.rng.keep32 (int32 lanes, wrapping products: what the DARE kernels use) draws exactly the bits of
    the reference int64 hash, across the int32 sign boundary and past 2**32, eager and compiled."""
    n, key = 1000, 987654321
    thr = rng.threshold(p)
    stream = rng.Stream32.of(key, start, n, thr)
    ref = rng.hash_u32(torch.arange(n, dtype=torch.int64) + start, key) < thr
    assert torch.equal(rng.keep32(torch.arange(n, dtype=torch.int32), *stream.args()), ref)
    assert ref.float().mean().item() == pytest.approx(p, abs=0.06)


def test_int32_keep_mask_compiled_and_chunk_boundary():
    pytest.importorskip("torch._inductor")
    from mergebot.engine import fuse
    if not fuse.compiler_available():
        pytest.skip("no C compiler")
    n, start, key = 5000, (1 << 31) - 2000, 12345
    stream = rng.Stream32.of(key, start, n, rng.threshold(0.4))
    compiled = torch.compile(lambda i, a: rng.keep32(i, *a), dynamic=True)
    ref = rng.hash_u32(torch.arange(n, dtype=torch.int64) + start, key) < rng.threshold(0.4)
    assert torch.equal(compiled(torch.arange(n, dtype=torch.int32), stream.tensors("cpu")), ref)
    assert torch.equal(rng.keep32(torch.arange(n, dtype=torch.int32), *stream.tensors("cpu")), ref)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rng.Stream32.of(key, (1 << 32) - 10, 11, 5)


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
