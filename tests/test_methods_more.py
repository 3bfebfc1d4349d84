"""The methods of issue 3 (merge-semantics.md §2.3–§2.12) through the whole pipeline.

Every expected value comes from an independent float64 reference written here from the spec; the modules'
own functions are never used to compute one. Deltas that feed magnitude orders are taken as float32
differences (as mergekit and mergebot compute them) so that rank ties cannot differ.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergebot.engine import executor, rng
from mergebot.config.dense import parse_config
from mergebot.errors import ConfigError, ModelError
from mergebot.engine.methods import METHODS
from mergebot.engine.methods.base import MergeCall
from tests.helpers import f64, merge_yaml, models_yaml
from tests.tiny import llama_config, llama_tensors, load_tensors, make_family, save_model

ATOL = 2e-6

NEW = ("nuslerp", "multislerp", "karcher", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl")


def _close(out, ref, atol=ATOL):
    assert set(out) == set(ref)
    for k in ref:
        assert torch.isfinite(out[k]).all(), k
    worst = max(float((out[k].double() - ref[k]).abs().max()) for k in ref)
    assert worst < atol, worst


def _f32(d: Path) -> dict[str, torch.Tensor]:
    return load_tensors(d)


def _save(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    return save_model(root / name, llama_config(), tensors)


_models = models_yaml


# --------------------------------------------------------------------------------------------------- metadata

PRETTY = {
    "nuslerp": ("NuSLERP", None),
    "multislerp": ("Multi-SLERP", "goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "karcher": ("Karcher Mean", "arxiv.org/abs/2603.04972"),
    "model_stock": ("Model Stock", "arxiv.org/abs/2403.19522"),
    "breadcrumbs": ("Model Breadcrumbs", "arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "arxiv.org/abs/2406.11617"),
    "sce": ("SCE", "arxiv.org/abs/2408.07990"),
    "arcee_fusion": ("Arcee Fusion", "arcee.ai"),
    "nearswap": ("NearSwap", "huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "ram": ("Reinforced Agent Merging", "arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("Reinforced Agent Merging Plus (Tensor-Local)", "arxiv.org/abs/2601.13572"),
}


def test_registered_with_card_metadata_and_contracts():
    for name in NEW:
        m = METHODS[name]
        pretty, url = PRETTY[name]
        assert m.pretty == pretty
        assert (m.url is None) if url is None else m.url.rstrip("/").endswith(url), (name, m.url)
    spec = {  # base policy, min_inputs, max_inputs, min_non_base, max_non_base (§2)
        "nuslerp": ("optional", 2, 3, 2, 2), "multislerp": ("optional", 1, None, 1, None),
        "karcher": ("ignored", 1, None, 0, None), "model_stock": ("required", 3, None, 2, None),
        "arcee_fusion": ("required", 2, 2, 1, 1), "nearswap": ("required", 2, 2, 1, 1),
    }
    for name, contract in spec.items():
        m = METHODS[name]
        assert (m.base, m.min_inputs, m.max_inputs, m.min_non_base, m.max_non_base) == contract, name
    for name in ("nuslerp", "arcee_fusion"):
        assert METHODS[name].singleton_passthrough
    for name in ("sce", "ram", "ramplus_tl", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        assert METHODS[name].base == "required"
    defaults = {("della", "epsilon"): 0.15, ("della_linear", "epsilon"): 0.15, ("breadcrumbs", "gamma"): 0.01,
                ("breadcrumbs_ties", "gamma"): 0.01, ("della", "normalize"): True, ("della", "rescale"): True,
                ("della_linear", "normalize"): False, ("della_linear", "rescale"): True,
                ("breadcrumbs", "normalize"): False, ("breadcrumbs", "rescale"): False,
                ("nuslerp", "nuslerp_flatten"): True, ("nuslerp", "nuslerp_row_wise"): False,
                ("multislerp", "normalize_weights"): True, ("multislerp", "eps"): 1e-8,
                ("karcher", "max_iter"): 10, ("karcher", "tol"): 1e-5, ("model_stock", "filter_wise"): False,
                ("sce", "select_topk"): 1.0, ("ram", "epsilon"): 1e-5, ("ramplus_tl", "r"): 0.1,
                ("ramplus_tl", "alpha"): 0.2, ("ramplus_tl", "epsilon"): 1e-5}
    for (name, p), v in defaults.items():
        assert METHODS[name].param(p).default == v, (name, p)
    assert METHODS["nearswap"].param("t").required
    for name in ("della", "breadcrumbs", "nuslerp", "multislerp"):
        assert METHODS[name].param("weight").scope == "non_base"


@pytest.mark.parametrize("text,needle", [
    (("models:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 1}\n"
      "  - model: c\n    parameters: {weight: 1}\nmerge_method: nuslerp\n"), "at most 2"),
    ("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: a\n", "at least 3"),
    ("models:\n  - model: a\nmerge_method: nearswap\nbase_model: b\n", "'t'"),
    ("models:\n  - model: a\n  - model: b\nmerge_method: arcee_fusion\nbase_model: c\n", "at most 2"),
])
def test_contracts_are_checked_when_the_config_is_read(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(text, str(tmp_path / "c.yml"))


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
    text = _models((a, "{weight: 0.7}"), (b, "{weight: 0.3}")) + "merge_method: nuslerp\n"
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
    _close(out, ref)
    if not flatten:  # the modes differ on matrices: the test would not notice a swapped flag otherwise
        other = nuslerp64(t, A["lm_head.weight"], B["lm_head.weight"], False, not row_wise)
        if not with_base:
            assert float((out["lm_head.weight"].double() - other).abs().max()) > 1e-5


def test_nuslerp_weights_summing_to_zero_use_t_half(family, tmp_path):
    _, a, b, _ = family
    A, B = f64(a), f64(b)
    out = merge_yaml(tmp_path, _models((a, "{weight: 0.5}"), (b, "{weight: -0.5}")) + "merge_method: nuslerp\n")
    _close(out, {k: nuslerp64(0.5, A[k], B[k], True, False) for k in A})


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
    p1 = _save(tmp_path, "x", x)
    p2 = _save(tmp_path, "two_x", {k: 2 * v for k, v in x.items()})
    p3 = _save(tmp_path, "minus_x", {k: -v for k, v in x.items()})
    p4 = _save(tmp_path, "mixed", mixed)
    X = f64(p1)
    for other, factor in ((p2, 2.0), (p3, -1.0)):
        out = merge_yaml(tmp_path, _models((p1, "{weight: 0.6}"), (other, "{weight: 0.4}")) + "merge_method: nuslerp\n",
                         name=f"flat{factor}")
        _close(out, {k: 0.6 * X[k] + 0.4 * factor * X[k] for k in X})  # (1−t)v0 + t·v1, t = 0.4
    out = merge_yaml(tmp_path, _models((p1, "{weight: 0.6}"), (p4, "{weight: 0.4}"))
                     + "merge_method: nuslerp\nparameters: {nuslerp_flatten: false}\n", name="rows")
    M = f64(p4)
    _close(out, {k: nuslerp64(0.4, X[k], M[k], False, False) for k in X})
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
    text = _models((a, "{weight: 0.5}"), (b, "{weight: 0.3}"), (c, "{weight: 0.4}")) + "merge_method: multislerp\n"
    if with_base:
        text += f"base_model: {base}\n"
    out = merge_yaml(tmp_path, text)
    ref = {}
    for k in X:
        if with_base:
            ref[k] = X[k] + multislerp64([A[k] - X[k], B[k] - X[k], C[k] - X[k]], [0.5, 0.3, 0.4])
        else:
            ref[k] = multislerp64([A[k], B[k], C[k]], [0.5, 0.3, 0.4])
    _close(out, ref)
    raw = merge_yaml(tmp_path, text + "parameters: {normalize_weights: false}\n", name="raw")
    for k in X:
        vs = [A[k] - X[k], B[k] - X[k], C[k] - X[k]] if with_base else [A[k], B[k], C[k]]
        ref[k] = (X[k] if with_base else 0) + multislerp64(vs, [0.5, 0.3, 0.4], normalize=False)
    _close(raw, ref)


def test_multislerp_single_model_and_antipodal_inputs(family, tmp_path):
    base, a, _, _ = family
    out = merge_yaml(tmp_path, _models((a, "{weight: 0.3}")) + f"merge_method: multislerp\nbase_model: {base}\n")
    A = _f32(a)
    assert all(torch.equal(out[k], A[k]) for k in A)
    x = llama_tensors(llama_config(), 5)
    p1, p2 = _save(tmp_path, "x", x), _save(tmp_path, "neg", {k: -v for k, v in x.items()})
    p3 = _save(tmp_path, "zero", {k: torch.zeros_like(v) for k, v in x.items()})
    out = merge_yaml(tmp_path, _models((p1, "{weight: 1}"), (p2, "{weight: 1}")) + "merge_method: multislerp\n",
                     name="pair")
    assert all(float(v.abs().max()) == 0 for v in out.values())  # two inputs: linear fallback, w₁v₁ + w₂v₂
    with pytest.raises(ModelError, match="weighted sum"):
        merge_yaml(tmp_path, _models((p1, "{weight: 1}"), (p2, "{weight: 1}"), (p3, "{weight: 1}"))
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
    out = merge_yaml(tmp_path, _models((a, None), (b, None), (c, None)) + "merge_method: karcher\n")
    _close(out, {k: karcher64([A[k], B[k], C[k]]) for k in X})
    out = merge_yaml(tmp_path, _models((a, None), (b, None)) + f"merge_method: karcher\nbase_model: {base}\n"
                     + "parameters: {max_iter: 3, tol: 1e-6}\n", name="b")
    _close(out, {k: karcher64([A[k], B[k], X[k]], 3, 1e-6) for k in X})


def test_karcher_zero_tensor_input_shrinks_the_norm(family, tmp_path):
    _, a, b, _ = family
    A, B = f64(a), f64(b)
    z = _save(tmp_path, "zero", {k: torch.zeros_like(v) for k, v in _f32(a).items()})
    out = merge_yaml(tmp_path, _models((a, None), (z, None), (b, None)) + "merge_method: karcher\n")
    ref = {k: karcher64([A[k], torch.zeros_like(A[k]), B[k]]) for k in A}
    _close(out, ref)
    two = {k: karcher64([A[k], B[k]]) for k in A}
    for k in A:  # the zero input is out of the mean but in the scale: (N−1)/N of the two-input result
        assert torch.allclose(ref[k], two[k] * 2 / 3, atol=1e-9)


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
    out = merge_yaml(tmp_path, _models((base, None), (a, None), (b, None), (c, None))
                     + f"merge_method: model_stock\nbase_model: {base}\n"
                     + f"parameters: {{filter_wise: {str(filter_wise).lower()}}}\n")
    _close(out, {k: model_stock64(X[k], [A[k], B[k], C[k]], filter_wise) for k in X})


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_singular_guard(tmp_path, filter_wise):
    # Exactly opposite offsets (values on a 2⁻¹⁰ grid, so base ± d is exact): cos = −1, 1 + (N−1)cos = 0 → t = 0.
    x = {k: torch.round(v * 1024) / 1024 for k, v in llama_tensors(llama_config(), 6).items()}
    g = torch.Generator().manual_seed(7)
    d = {k: torch.round(torch.randn(v.shape, generator=g) * 20) / 1024 for k, v in x.items()}
    p0 = _save(tmp_path, "base", x)
    p1 = _save(tmp_path, "plus", {k: x[k] + d[k] for k in x})
    p2 = _save(tmp_path, "minus", {k: x[k] - d[k] for k in x})
    out = merge_yaml(tmp_path, _models((p1, None), (p2, None)) + f"merge_method: model_stock\nbase_model: {p0}\n"
                     + f"parameters: {{filter_wise: {str(filter_wise).lower()}}}\n")
    for k, v in x.items():
        assert torch.equal(out[k], v), k


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
    X32, A32, B32 = _f32(base), _f32(a), _f32(b)
    X = f64(base)
    out = merge_yaml(tmp_path, _models((base, None), (a, "{weight: 0.8, density: 0.6, gamma: 0.05}"),
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
    _close(out, ref)


def test_breadcrumbs_tiny_tensors_keep_their_largest_entries(family, tmp_path):
    # A norm weight has 32 < 1/gamma elements: int(gamma·n) = 0 outliers, keep the int(density·n) largest
    # (0.1.5; the 0.1.4 snapshot's [n_bot:-0] slice zeroed such tensors).
    base, a, _, _ = family
    X32, A32 = _f32(base), _f32(a)
    out = merge_yaml(tmp_path, _models((a, "{weight: 1.0, density: 0.5}")) + f"merge_method: breadcrumbs\nbase_model: {base}\n")
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
    return (_models((base, None), (a, f"{{weight: {w1}, density: {d1}, epsilon: {e1}}}"),
                    (b, f"{{weight: {w2}, density: {d2}, epsilon: {e2}}}"))
            + f"merge_method: {method}\nbase_model: {base}\nparameters: {{lambda: 0.9}}\n")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_deterministic_given_the_hash_rng(family, tmp_path, method):
    base, a, b, _ = family
    X32, A32, B32 = _f32(base), _f32(a), _f32(b)
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
    _close(out, ref, atol=5e-6)


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
    X32, A32 = _f32(base), _f32(a)
    out = merge_yaml(tmp_path, _models((a, "{weight: 1.0, density: 0.5, epsilon: 0.2}"))
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
    text = (_models((a, f"{{weight: 1.0, density: {density}}}"))
            + f"merge_method: della\nbase_model: {base}\nparameters: {{epsilon: {epsilon}}}\n")
    # the config alone decides it: refused when read, pointing at the model's density
    with pytest.raises(ConfigError, match=rf"models\[0\]\.parameters\.density \(line \d+\): della .*epsilon "
                                          f"{epsilon:g} does not fit density {density:g}"):
        merge_yaml(tmp_path, text, random_seed=1)
    # behind a filter only the planner knows the value: refused per tensor, before anything is written
    text = (_models((a, f"{{weight: 1.0, density: [{{filter: mlp, value: {density}}}, {{value: 1}}]}}"))
            + f"merge_method: della\nbase_model: {base}\nparameters: {{epsilon: {epsilon}}}\n")
    with pytest.raises(ModelError, match=f"mlp.*epsilon {epsilon:g} does not fit density {density:g}"):
        merge_yaml(tmp_path, text, name="filtered", random_seed=1)
    assert not (tmp_path / "filtered").exists()
    hook = METHODS["della"].validate
    with pytest.raises(ModelError, match="model.layers.0.mlp.up_proj.weight"):
        hook("model.layers.0.mlp.up_proj.weight", {}, [{}, {"density": density, "epsilon": epsilon}])
    hook("x", {}, [{}, {"density": 1.0, "epsilon": epsilon}])  # density 1 or 0: no sampling, no check
    hook("x", {}, [{}, {"density": 0.0, "epsilon": epsilon}])


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
    X32 = _f32(base)
    Ms = [_f32(m) for m in (a, b, c)]
    X = f64(base)
    out = merge_yaml(tmp_path, _models((a, None), (b, None), (c, None))
                     + f"merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: {topk}}}\n")
    _close(out, {k: sce64(X[k], [M[k] for M in Ms], X32[k], topk) for k in X})
    if topk <= 0:
        assert all(torch.equal(out[k], X32[k]) for k in X32)


def test_sce_tiny_task_vectors_get_uniform_weights(tmp_path):
    base, a, b = make_family(tmp_path / "fam", 3, seed=9, noise=1e-4)  # mean τ² ≈ 1e-8: below the 1e-6 guard
    X32, A32, B32 = _f32(base), _f32(a), _f32(b)
    X = f64(base)
    out = merge_yaml(tmp_path, _models((a, None), (b, None)) + f"merge_method: sce\nbase_model: {base}\n")
    _close(out, {k: sce64(X[k], [A32[k], B32[k]], X32[k], 1.0) for k in X}, atol=1e-7)


# --------------------------------------------------------------------------------------------------- ram

@pytest.fixture(scope="module")
def sparse_family(tmp_path_factory) -> list[Path]:
    """base + 3 fine-tunes each changing a random half of the entries: unique and shared positions."""
    root = tmp_path_factory.mktemp("sparse")
    x = llama_tensors(llama_config(), 11)
    out = [_save(root, "base", x)]
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.5)
              for k, v in x.items()}
        out.append(_save(root, f"ft{i}", ft))
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
    X32 = _f32(base)
    Ms = [_f32(m) for m in fts]
    X = f64(base)
    params = "{r: 0.2, alpha: 10.0}" if method == "ramplus_tl" else "{epsilon: 1e-5}"
    out = merge_yaml(tmp_path, _models(*((m, None) for m in fts))
                     + f"merge_method: {method}\nbase_model: {base}\nparameters: {params}\n")
    plus = (0.2, 10.0) if method == "ramplus_tl" else None
    _close(out, {k: ram64(X[k], [(M[k] - X32[k]).double() for M in Ms], 1e-5, plus) for k in X})
    if method == "ramplus_tl":  # λ > 1 here (ρ ≈ 3), so the unique entries differ from plain ram
        plain = {k: ram64(X[k], [(M[k] - X32[k]).double() for M in Ms], 1e-5) for k in X}
        assert max(float((out[k].double() - plain[k]).abs().max()) for k in X) > 1e-3
    out = merge_yaml(tmp_path, _models(*((m, None) for m in fts))
                     + f"merge_method: {method}\nbase_model: {base}\n", name="defaults")
    plus = (0.1, 0.2) if method == "ramplus_tl" else None
    _close(out, {k: ram64(X[k], [(M[k] - X32[k]).double() for M in Ms], 1e-5, plus) for k in X})


# --------------------------------------------------------------------------------------------------- nearswap

@pytest.mark.parametrize("t", [0.01, 0.0])
def test_nearswap(family, tmp_path, t):
    base, a, _, _ = family
    X, A = f64(base), f64(a)
    out = merge_yaml(tmp_path, _models((a, None)) + f"merge_method: nearswap\nbase_model: {base}\nparameters: {{t: {t}}}\n")
    ref = {}
    for k in X:
        w = (t / (X[k] - A[k]).abs().clamp(min=1e-6)).clamp(0, 1)
        ref[k] = w * A[k] + (1 - w) * X[k]
    _close(out, ref)
    if t == 0:
        assert all(torch.equal(out[k].double(), X[k]) for k in X)
    else:  # both regimes occur: some entries swapped for the other model's, some moved by t
        k = "model.layers.0.mlp.up_proj.weight"
        gap = (X[k] - A[k]).abs()
        assert bool((gap < t).any()) and bool((gap > t).any())


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
    out = merge_yaml(tmp_path, _models((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n")
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
    text = _models((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n"
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


# --------------------------------------------------------------------------------------------------- chunking

@pytest.mark.parametrize("method,params", [
    ("nuslerp", None), ("multislerp", None), ("karcher", None), ("model_stock", None), ("sce", None),
    ("ram", None), ("ramplus_tl", None), ("nearswap", "{t: 0.01}"),
    # whole-tensor modes: the executor must not chunk them
    ("nuslerp", "{nuslerp_flatten: false}"), ("model_stock", "{filter_wise: true}"), ("sce", "{select_topk: 0.5}"),
    ("breadcrumbs", "{density: 0.5, gamma: 0.05}"), ("arcee_fusion", None),
])
def test_chunked_streaming_equals_whole_tensor(family, tmp_path, monkeypatch, method, params):
    """Global reductions summed over chunks (reduce/apply) give the whole-tensor result."""
    base, a, b, c = family
    m = METHODS[method]
    per = "{weight: 0.6}" if m.param("weight") else None
    per2 = "{weight: 0.3}" if m.param("weight") else None
    entries = [(a, per), (b, per2), (c, per2)][:m.max_non_base or 3]
    text = _models(*entries) + f"merge_method: {method}\nbase_model: {base}\n"
    if params:
        text += f"parameters: {params}\n"
    whole = merge_yaml(tmp_path, text, name="whole", random_seed=3)
    monkeypatch.setattr(executor, "CHUNK", 256)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 256)
    chunked = merge_yaml(tmp_path, text, name="chunked", random_seed=3)
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], atol=1e-6, rtol=0), k


# --------------------------------------------------------------------------------------------------- §8 smoke

SMOKE = {  # mergekit's test_basic_merges scenarios for these methods (bf16 models, weights .6/.4)
    "nuslerp": "", "multislerp": "", "karcher": "", "model_stock": "", "model_stock_fw": "{filter_wise: true}",
    "breadcrumbs": "", "breadcrumbs_ties": "", "sce": "{select_topk: 0.5}", "ram": "", "ramplus_tl": "",
    "arcee_fusion": "", "nearswap": "{t: 0.0001}", "della": "{lambda: 0.5}", "della_linear": "",
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_bf16_smoke(family_bf16, tmp_path, name):
    base, a, b = family_bf16
    method = name.removesuffix("_fw")
    m = METHODS[method]
    per = [{}, {}]
    if m.param("weight"):
        per = [{"weight": 0.6}, {"weight": 0.4}]
    if method.startswith("della"):
        for p in per:
            p.update(density=0.66, epsilon=0.05)
    entries = [(a, str(per[0]) if per[0] else None), (b, str(per[1]) if per[1] else None)]
    if method in ("nearswap", "arcee_fusion"):
        entries = entries[:1]
    text = _models(*entries) + f"merge_method: {method}\nbase_model: {base}\n"
    if SMOKE[name]:
        text += f"parameters: {SMOKE[name]}\n"
    out = merge_yaml(tmp_path, text, random_seed=0)
    X = _f32(base)
    assert set(out) == set(X)
    for k, v in out.items():
        assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all(), k
