"""Linear, SLERP, NuSLERP, Multi-SLERP, Karcher and NearSwap through the whole pipeline, against independent
float64 references written from the spec (merge-semantics.md §2.1-§2.5, §2.12)."""

from __future__ import annotations

import math

import pytest
import torch

from mergebot.config.params import interpolate
from mergebot.errors import ModelError
from mergebot.tinymodels import llama_config, llama_tensors, load_tensors
from tests.helpers import close, f64, merge_yaml, models_yaml, save_llama, slerp64


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
    close(out, {k: (A[k] + 0.3 * B[k] + 0.5 * C[k]) / 1.8 for k in A})
    out = merge_yaml(tmp_path, text + "parameters: {normalize: false}\n", name="raw")
    close(out, {k: A[k] + 0.3 * B[k] + 0.5 * C[k] for k in A})


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
    close(out, ref)


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
    close(out, ref)
    # t=0 gives the base exactly, t=1 the other model
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"].double(), X["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"].double(), Y["model.layers.3.self_attn.q_proj.weight"])


def test_slerp_colinear_falls_back_to_lerp():
    from mergebot.engine.methods.slerp import coefficients
    assert coefficients(0.3, 4.0, 16.0, 8.0) == pytest.approx((0.7, 0.3))


# --------------------------------------------------------------------------------------------------- nuslerp

def nuslerp64(t, v0, v1, flatten, row_wise):
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    # c = ⟨û0,û1⟩ with û = v/max(‖v‖, 1e-7); written as ⟨a,b⟩/√(‖a‖²‖b‖²) so that exactly parallel or
    # antipodal rows give exactly ±1 (the colinear bound 1e-16 is below float64 resolution otherwise)
    aa, bb = (a * a).sum(-1, keepdim=True), (b * b).sum(-1, keepdim=True)
    tiny = (aa.sqrt() < 1e-7) | (bb.sqrt() < 1e-7)
    c = ((a * b).sum(-1, keepdim=True)
         / torch.where(tiny, aa.sqrt().clamp(min=1e-7) * bb.sqrt().clamp(min=1e-7), (aa * bb).sqrt())).clamp(-1, 1)
    th = torch.acos(c)
    lerp = (1 - t) * a + t * b
    res = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.sin(th)
    res = torch.where(1 - c * c <= 1e-16, lerp, res)
    if not flatten and v0.dim() >= 2 and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (True, True), (False, False), (False, True)])
def test_nuslerp_modes(family, tmp_path, with_base, flatten, row_wise):
    base, a, b, _ = family
    X, A, B = f64(base), f64(a), f64(b)
    text = models_yaml((a, "{weight: 0.7}"), (b, "{weight: 0.3}")) + "merge_method: nuslerp\n"
    text += f"parameters: {{nuslerp_flatten: {str(flatten).lower()}, nuslerp_row_wise: {str(row_wise).lower()}}}\n"
    if with_base:
        text += f"base_model: {base}\n"
    out = merge_yaml(tmp_path, text)
    t = 0.3 / (0.7 + 0.3)  # t = w2/(w1+w2): the second model's share
    ref = {}
    for k in X:
        if with_base:
            ref[k] = X[k] + nuslerp64(t, A[k] - X[k], B[k] - X[k], flatten, row_wise)
        else:
            ref[k] = nuslerp64(t, A[k], B[k], flatten, row_wise)
    close(out, ref)
    if not flatten:  # the modes differ on matrices: the test would not notice a swapped flag otherwise
        other = nuslerp64(t, A["lm_head.weight"], B["lm_head.weight"], False, not row_wise)
        if not with_base:
            assert float((out["lm_head.weight"].double() - other).abs().max()) > 1e-5


def test_nuslerp_weights_summing_to_zero_use_t_half(family, tmp_path):
    _, a, b, _ = family
    A, B = f64(a), f64(b)
    out = merge_yaml(tmp_path, models_yaml((a, "{weight: 0.5}"), (b, "{weight: -0.5}")) + "merge_method: nuslerp\n")
    close(out, {k: nuslerp64(0.5, A[k], B[k], True, False) for k in A})


def test_nuslerp_colinear_and_antipodal_fall_back_to_lerp(tmp_path):
    x = llama_tensors(llama_config(), 3)
    g = torch.Generator().manual_seed(4)
    mixed = {}
    for k, v in x.items():  # rows alternate: exactly colinear (2x), exactly antipodal (-x), or unrelated
        r = torch.randn(v.shape, generator=g) * 0.1
        if v.dim() == 2:
            sel = (torch.arange(v.shape[0]) % 3).unsqueeze(-1)
            mixed[k] = torch.where(sel == 0, 2 * v, torch.where(sel == 1, -v, r))
        else:
            mixed[k] = 2 * v
    p1 = save_llama(tmp_path, "x", x)
    p2 = save_llama(tmp_path, "two_x", {k: 2 * v for k, v in x.items()})
    p3 = save_llama(tmp_path, "minus_x", {k: -v for k, v in x.items()})
    p4 = save_llama(tmp_path, "mixed", mixed)
    X = f64(p1)
    for other, factor in ((p2, 2.0), (p3, -1.0)):
        out = merge_yaml(tmp_path, models_yaml((p1, "{weight: 0.6}"), (other, "{weight: 0.4}")) + "merge_method: nuslerp\n",
                         name=f"flat{factor}")
        close(out, {k: 0.6 * X[k] + 0.4 * factor * X[k] for k in X})  # (1−t)v0 + t·v1, t = 0.4
    out = merge_yaml(tmp_path, models_yaml((p1, "{weight: 0.6}"), (p4, "{weight: 0.4}"))
                     + "merge_method: nuslerp\nparameters: {nuslerp_flatten: false}\n", name="rows")
    M = f64(p4)
    close(out, {k: nuslerp64(0.4, X[k], M[k], False, False) for k in X})
    q = out["model.layers.0.self_attn.q_proj.weight"].double()
    xq = X["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(q[0], 0.6 * xq[0] + 0.8 * xq[0], atol=1e-6)  # colinear row: lerp
    assert torch.allclose(q[1], 0.6 * xq[1] - 0.4 * xq[1], atol=1e-6)  # antipodal row: lerp, not 0/0


# --------------------------------------------------------------------------------------------------- multislerp

def multislerp64(vs, w, normalize=True, eps=1e-8):
    shape = vs[0].shape
    V = torch.stack([v.reshape(-1) for v in vs])
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    n = V.norm(dim=-1, keepdim=True)
    U = V / (n + eps)
    m = (U * w[:, None]).sum(0)
    if m.norm() < eps:
        assert len(vs) == 2
        return (w[0] * V[0] + w[1] * V[1]).reshape(shape)
    m = m / m.norm()
    tang = U - (U @ m)[:, None] * m
    T = (tang * w[:, None]).sum(0)
    r = T.norm() + eps
    return ((m * torch.cos(r) + T * torch.sin(r) / r) * (n.squeeze(-1) * w).sum()).reshape(shape)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_with_and_without_base(family, tmp_path, with_base):
    base, a, b, c = family
    X, A, B, C = f64(base), f64(a), f64(b), f64(c)
    text = models_yaml((a, "{weight: 0.5}"), (b, "{weight: 0.3}"), (c, "{weight: 0.4}")) + "merge_method: multislerp\n"
    if with_base:
        text += f"base_model: {base}\n"
    out = merge_yaml(tmp_path, text)
    ref = {}
    for k in X:
        if with_base:
            ref[k] = X[k] + multislerp64([A[k] - X[k], B[k] - X[k], C[k] - X[k]], [0.5, 0.3, 0.4])
        else:
            ref[k] = multislerp64([A[k], B[k], C[k]], [0.5, 0.3, 0.4])
    close(out, ref)
    raw = merge_yaml(tmp_path, text + "parameters: {normalize_weights: false}\n", name="raw")
    for k in X:
        vs = [A[k] - X[k], B[k] - X[k], C[k] - X[k]] if with_base else [A[k], B[k], C[k]]
        ref[k] = (X[k] if with_base else 0) + multislerp64(vs, [0.5, 0.3, 0.4], normalize=False)
    close(raw, ref)


def test_multislerp_single_model_and_antipodal_inputs(family, tmp_path):
    base, a, _, _ = family
    out = merge_yaml(tmp_path, models_yaml((a, "{weight: 0.3}")) + f"merge_method: multislerp\nbase_model: {base}\n")
    A = load_tensors(a)
    assert all(torch.equal(out[k], A[k]) for k in A)
    x = llama_tensors(llama_config(), 5)
    p1, p2 = save_llama(tmp_path, "x", x), save_llama(tmp_path, "neg", {k: -v for k, v in x.items()})
    p3 = save_llama(tmp_path, "zero", {k: torch.zeros_like(v) for k, v in x.items()})
    out = merge_yaml(tmp_path, models_yaml((p1, "{weight: 1}"), (p2, "{weight: 1}")) + "merge_method: multislerp\n",
                     name="pair")
    assert all(float(v.abs().max()) == 0 for v in out.values())  # two inputs: linear fallback, w₁v₁ + w₂v₂
    with pytest.raises(ModelError, match="weighted sum"):
        merge_yaml(tmp_path, models_yaml((p1, "{weight: 1}"), (p2, "{weight: 1}"), (p3, "{weight: 1}"))
                   + "merge_method: multislerp\n", name="three")


# --------------------------------------------------------------------------------------------------- karcher

def karcher64(xs, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0]
    alphas = [1 / len(xs)] * len(xs)
    norms = [float(x.norm()) for x in xs]
    units = [x / nrm if nrm > 0 else torch.zeros_like(x) for x, nrm in zip(xs, norms)]
    valid = [i for i, nrm in enumerate(norms) if nrm > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    s = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / s for i in valid}
    m = sum(a[i] * units[i] for i in valid)
    m = units[valid[0]].clone() if float(m.norm()) < tol else m / m.norm()
    for _ in range(max_iter):
        T = torch.zeros_like(m)
        for i in valid:
            c = float((m * units[i]).sum().clamp(-1, 1))
            th = math.acos(c)
            if th < tol:
                continue
            T = T + a[i] * (th / math.sin(th)) * (units[i] - c * m)
        tn = float(T.norm())
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * T / tn
        if float(m.norm()) > tol:
            m = m / m.norm()
    return sum(al * nrm for al, nrm in zip(alphas, norms)) * m


def test_karcher_base_is_just_another_input(family, tmp_path):
    base, a, b, c = family
    X, A, B, C = f64(base), f64(a), f64(b), f64(c)
    out = merge_yaml(tmp_path, models_yaml((a, None), (b, None), (c, None)) + "merge_method: karcher\n")
    close(out, {k: karcher64([A[k], B[k], C[k]]) for k in X})
    out = merge_yaml(tmp_path, models_yaml((a, None), (b, None)) + f"merge_method: karcher\nbase_model: {base}\n"
                     + "parameters: {max_iter: 3, tol: 1e-6}\n", name="b")
    close(out, {k: karcher64([A[k], B[k], X[k]], 3, 1e-6) for k in X})


def test_karcher_zero_tensor_input_shrinks_the_norm(family, tmp_path):
    _, a, b, _ = family
    A, B = f64(a), f64(b)
    z = save_llama(tmp_path, "zero", {k: torch.zeros_like(v) for k, v in load_tensors(a).items()})
    out = merge_yaml(tmp_path, models_yaml((a, None), (z, None), (b, None)) + "merge_method: karcher\n")
    ref = {k: karcher64([A[k], torch.zeros_like(A[k]), B[k]]) for k in A}
    close(out, ref)
    two = {k: karcher64([A[k], B[k]]) for k in A}
    for k in A:  # the zero input is out of the mean but in the scale: (N−1)/N of the two-input result
        assert torch.allclose(ref[k], two[k] * 2 / 3, atol=1e-9)


# --------------------------------------------------------------------------------------------------- nearswap

@pytest.mark.parametrize("t", [0.01, 0.0])
def test_nearswap(family, tmp_path, t):
    base, a, _, _ = family
    X, A = f64(base), f64(a)
    out = merge_yaml(tmp_path, models_yaml((a, None)) + f"merge_method: nearswap\nbase_model: {base}\nparameters: {{t: {t}}}\n")
    ref = {}
    for k in X:
        w = (t / (X[k] - A[k]).abs().clamp(min=1e-6)).clamp(0, 1)
        ref[k] = w * A[k] + (1 - w) * X[k]
    close(out, ref)
    if t == 0:
        assert all(torch.equal(out[k].double(), X[k]) for k in X)
    else:  # both regimes occur: some entries swapped for the other model's, some moved by t
        k = "model.layers.0.mlp.up_proj.weight"
        gap = (X[k] - A[k]).abs()
        assert bool((gap < t).any()) and bool((gap > t).any())
