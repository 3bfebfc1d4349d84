"""What many test modules share (never fixtures: those live in conftest.py): paths, the CLI in a subprocess,
merges from YAML text, and the independent float64 references of the methods."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
from mergebot.config.dense import parse_config
from mergebot.tinymodels import llama_config, load_tensors, save_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SEED_CONFIGS = ROOT / "examples" / "merges"  # the five published merges' configs, byte for byte
CORPUS = DATA / "mergekit-examples"  # mergekit's own example configs (tests/data/README.md)
ATOL = 2e-6


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergebot.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def close(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    """Every tensor finite and within `atol` of the float64 reference."""
    assert set(out) == set(ref)
    for k in ref:
        assert torch.isfinite(out[k]).all(), k
    worst = max(float((out[k].double() - ref[k]).abs().max()) for k in ref)
    assert worst < atol, worst


def save_llama(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A model directory `root/name` of the default tiny Llama config holding `tensors`."""
    return save_model(root / name, llama_config(), tensors)


def merge_yaml(tmp: Path, text: str, name: str = "out", **opts) -> dict[str, torch.Tensor]:
    cfg_file = tmp / f"{name}.yml"
    cfg_file.write_text(text)
    cfg = parse_config(text, str(cfg_file))
    run_merge(cfg, tmp / name, MergeOptions(progress=False, **opts))
    return load_tensors(tmp / name)


def f64(d: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_tensors(d).items()}


def slerp64(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Independent float64 slerp of whole flattened tensors (§2.2)."""
    na, nb = a.norm().item(), b.norm().item()
    na = 1.0 if na <= 1e-8 else na
    nb = 1.0 if nb <= 1e-8 else nb
    d = max(-1.0, min(1.0, float((a.flatten() / na) @ (b.flatten() / nb))))
    if abs(d) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(d)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def ties64(base, xs, ws, normalize=True, lam=1.0, densities=None):
    """Independent float64 TIES (§2.7) with magnitude top-k pruning."""
    deltas = []
    for x, dens in zip(xs, densities or [1.0] * len(xs)):
        d = (x - base).flatten()
        if dens < 1:
            k = max(1, int(dens * d.numel()))
            thr = d.abs().sort(descending=True).values[k - 1]
            d = torch.where(d.abs() >= thr, d, torch.zeros_like(d))
        deltas.append(d.reshape(base.shape))
    D = [w * d for w, d in zip(ws, deltas)]
    total = sum(D)
    sgn = torch.where(total >= 0, 1.0, -1.0).double()
    mixed = torch.zeros_like(base)
    div = torch.zeros_like(base)
    for d, w in zip(D, ws):
        m = (torch.sign(d) == sgn).double()
        mixed += d * m
        div += w * m
    div[div == 0] = 1
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def models_yaml(*entries: tuple[Path, str | None]) -> str:
    """A `models:` list: one entry per (path, inline parameters or None)."""
    lines = ["models:"]
    for path, params in entries:
        lines.append(f"  - model: {path}")
        if params:
            lines.append(f"    parameters: {params}")
    return "\n".join(lines) + "\n"


def merge_dare(family: list[Path], tmp_path: Path, name: str, **opts) -> dict[str, torch.Tensor]:
    """dare_ties of three models of `family` (weights .6/.4, densities .5/.4), float32."""
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


def counting_tensors(cfg: dict, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A Llama model that counts: orthonormal embeddings and an LM head mapping token t to t+1, small random
    layers on top. Low perplexity on counting text, and it continues "w10 w11 w12" with w13 w14 ..., so a merge
    that breaks it shows in both numbers of the quality check (random tiny models predict noise)."""
    g = torch.Generator().manual_seed(seed)
    v, h, inter = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    emb = torch.linalg.qr(torch.randn(h, h, generator=g))[0][:v]
    t = {"model.embed_tokens.weight": emb.clone(), "lm_head.weight": 8 * emb.roll(1, 0),
         "model.norm.weight": torch.ones(h)}

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.k_proj.weight": r(kv, h),
                  p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, h),
                  p + "mlp.gate_proj.weight": r(inter, h), p + "mlp.up_proj.weight": r(inter, h),
                  p + "mlp.down_proj.weight": r(h, inter), p + "input_layernorm.weight": torch.ones(h),
                  p + "post_attention_layernorm.weight": torch.ones(h)})
    return t


def assert_same_bytes_kept_chunked_recomputed(tmp: Path, text: str, monkeypatch, chunk: int) -> None:
    """A whole-tensor selection gives the same bytes with what it keeps between passes (_sparsify.KEEP_BYTES),
    in small chunks (_sparsify.CHUNK), and with nothing kept (recomputed in every pass)."""
    from mergebot.engine.methods import _sparsify
    kept = merge_yaml(tmp, text, name="kept")
    monkeypatch.setattr(_sparsify, "CHUNK", chunk)
    chunked = merge_yaml(tmp, text, name="chunked")
    monkeypatch.setattr(_sparsify, "KEEP_BYTES", 0)
    again = merge_yaml(tmp, text, name="again")
    assert kept.keys() == again.keys()
    assert all(torch.equal(kept[k], chunked[k]) and torch.equal(kept[k], again[k]) for k in kept)
