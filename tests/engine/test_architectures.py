"""Any decoder-only model with config.json + safetensors merges without a hand-written table (§7, issue 3 item 6),
and frankenmerges (§1.2, issue 3 item 2) load back in transformers and generate.

Models are built by transformers itself (tests/archmodels.py), so names, tying and config keys are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergebot.tinymodels import load_tensors
from tests.archmodels import FAMILIES, load_and_generate, make_arch_family
from tests.helpers import f64, merge_yaml, slerp64

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def archs(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("archs")
    return {fam: make_arch_family(root, fam, 3 if fam == "llama" else 2, seed=i + 1) for i, fam in enumerate(FAMILIES)}


def _cfg(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _names(d: Path) -> set[str]:
    return set(load_tensors(d))


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_slerp_ties_of_each_architecture_load_and_generate(family, archs, tmp_path):
    base, ft = archs[family][:2]
    a, b = f64(base), f64(ft)
    names = set(a)
    if family in ("gemma2", "gpt2"):  # tied embeddings: the checkpoint has no lm_head, neither has the merge
        assert "lm_head.weight" not in names

    out = merge_yaml(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.3}}\n"
                               f"  - model: {ft}\n    parameters: {{weight: 0.7}}\n", "lin")
    assert set(out) == names
    for k in names:
        assert torch.allclose(out[k].double(), 0.3 * a[k] + 0.7 * b[k], atol=1e-6), k
    assert _cfg(tmp_path / "lin")["architectures"] == _cfg(base)["architectures"]
    load_and_generate(tmp_path / "lin")

    out = merge_yaml(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\n"
                               "parameters: {t: 0.4}\n", "slerp")
    assert set(out) == names
    for k in names:
        assert torch.allclose(out[k].double(), slerp64(0.4, a[k], b[k]), atol=1e-5), k
    load_and_generate(tmp_path / "slerp")

    out = merge_yaml(tmp_path, f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\n"
                               "    parameters: {weight: 1.0, density: 0.5}\n", "ties")
    assert set(out) == names
    load_and_generate(tmp_path / "ties")


@pytest.mark.parametrize("family", FAMILIES)
def test_passthrough_frankenmerge_of_each_architecture(family, archs, tmp_path):
    """[0,3) of A + [1,4) of B: 6 layers, embeddings from A, final norm (and lm_head) from B (§1.2 step 5)."""
    a_dir, b_dir = archs[family][:2]
    merge_yaml(tmp_path, f"merge_method: passthrough\nslices:\n"
                         f"  - sources: [{{model: {a_dir}, layer_range: [0, 3]}}]\n"
                         f"  - sources: [{{model: {b_dir}, layer_range: [1, 4]}}]\n", "fr")
    out, a, b = load_tensors(tmp_path / "fr"), load_tensors(a_dir), load_tensors(b_dir)
    cfg, src_cfg = _cfg(tmp_path / "fr"), _cfg(a_dir)
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    assert cfg[key] == 6
    if "layer_types" in src_cfg:  # transformers v5 checks len(layer_types) == num_hidden_layers
        lt = src_cfg["layer_types"]
        assert cfg["layer_types"] == lt[0:3] + _cfg(b_dir)["layer_types"][1:4]
    prefix = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(family, "model.layers")
    expect = {}
    for name, t in a.items():
        if f"{prefix}." not in name:
            continue
        i, rest = name[len(prefix) + 1:].split(".", 1)
        i = int(i)
        if i < 3:
            expect[f"{prefix}.{i}.{rest}"] = t
        if i >= 1:
            expect[f"{prefix}.{i + 2}.{rest}"] = b[name]
    for name in a:
        if f"{prefix}." in name:
            continue
        pre = any(h in name for h in ("embed", "wte", "wpe")) and "embed_out" not in name
        expect[name] = a[name] if pre else b[name]
    assert set(out) == set(expect)
    for k, v in expect.items():
        assert torch.equal(out[k], v), k
    load_and_generate(tmp_path / "fr", n_layers=6)


def test_repeated_source_layer_is_its_own_tensor_and_loads(archs, tmp_path):
    import transformers as tr

    (m, _) = archs["qwen2"][:2]
    merge_yaml(tmp_path, f"merge_method: passthrough\nslices:\n"
                         f"  - sources: [{{model: {m}, layer_range: [0, 2]}}]\n"
                         f"  - sources: [{{model: {m}, layer_range: [1, 3]}}]\n", "rep")
    out, src = load_tensors(tmp_path / "rep"), load_tensors(m)
    for suffix in ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "mlp.down_proj.weight"):
        assert torch.equal(out[f"model.layers.1.{suffix}"], src[f"model.layers.1.{suffix}"])
        assert torch.equal(out[f"model.layers.2.{suffix}"], src[f"model.layers.1.{suffix}"])
        assert torch.equal(out[f"model.layers.3.{suffix}"], src[f"model.layers.2.{suffix}"])
    from safetensors import safe_open
    files = sorted((tmp_path / "rep").glob("*.safetensors"))
    spans = set()
    for f in files:  # every tensor has its own bytes in the file (no aliasing)
        with safe_open(str(f), "pt") as st:
            assert len(list(st.keys())) == len(out)
        header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
        for k, v in header.items():
            if k != "__metadata__":
                spans.add((str(f), tuple(v["data_offsets"])))
    assert len(spans) == len(out)
    load_and_generate(tmp_path / "rep", n_layers=4)
    model = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "rep")
    model.save_pretrained(tmp_path / "resaved")  # no shared-storage complaints on the way back out
    assert torch.equal(load_tensors(tmp_path / "resaved")["model.layers.2.self_attn.q_proj.weight"],
                       src["model.layers.1.self_attn.q_proj.weight"])


def test_per_slice_base_and_parameters_with_task_arithmetic(archs, tmp_path):
    """Two slices, each with its own base_model and parameters; t restarts at 0 in each slice (§1.3); per-input
    filters see the *source* tensor name (slice 2 takes source layers 1-2 into output layers 2-3)."""
    m0, m1, m2 = archs["llama"]
    text = f"""merge_method: task_arithmetic
base_model: {m0}
parameters:
  weight: 0.1
slices:
  - sources:
      - {{model: {m0}, layer_range: [0, 2]}}
      - {{model: {m1}, layer_range: [0, 2], parameters: {{weight: [0.2, 0.8]}}}}
      - {{model: {m2}, layer_range: [0, 2]}}
    parameters:
      weight: 0.5
  - sources:
      - {{model: {m1}, layer_range: [1, 3]}}
      - {{model: {m2}, layer_range: [1, 3], parameters: {{weight: [1.0, 0.0]}}}}
      - {{model: {m0}, layer_range: [1, 3]}}
    base_model: {m1}
    parameters:
      weight:
        - {{filter: "layers.1.", value: 0.9}}
        - {{filter: mlp, value: 0.3}}
        - {{value: 0.7}}
      lambda: [0.5, 2.0]
"""
    out = merge_yaml(tmp_path, text, "ta")
    x = [f64(m) for m in (m0, m1, m2)]

    def ta(base, others, lam=1.0):
        return base + lam * sum(w * (o - base) for o, w in others)

    expect = {}
    embed = "model.embed_tokens.weight"
    expect[embed] = ta(x[0][embed], [(x[1][embed], 0.2), (x[2][embed], 0.5)])  # first slice, t = 0
    for k in range(2):  # slice 1: output layers 0,1 <- source 0,1; base m0
        t = k / 1
        for name in x[0]:
            if name.startswith(f"model.layers.{k}."):
                expect[name] = ta(x[0][name], [(x[1][name], 0.2 + 0.6 * t), (x[2][name], 0.5)])
    for k in range(2):  # slice 2: output layers 2,3 <- source 1,2; base m1; lambda is shared: output name, t
        t = k / 1
        lam = 0.5 + 1.5 * t
        for name in x[0]:
            if name.startswith(f"model.layers.{k + 1}."):
                outn = name.replace(f"model.layers.{k + 1}.", f"model.layers.{k + 2}.")
                w0 = 0.9 if f"layers.{k + 1}." == "layers.1." else (0.3 if "mlp" in name else 0.7)
                expect[outn] = ta(x[1][name], [(x[2][name], 1.0 - t), (x[0][name], w0)], lam)
    for name in ("model.norm.weight", "lm_head.weight"):  # last slice, t = 0
        expect[name] = ta(x[1][name], [(x[2][name], 1.0), (x[0][name], 0.7)], 0.5)
    assert set(out) == set(expect)
    for k, v in expect.items():
        assert torch.allclose(out[k].double(), v, atol=2e-6), k
    load_and_generate(tmp_path / "ta", n_layers=4)


def test_a_config_layer_count_off_its_tensors_is_named_in_the_layer_error(tmp_path):
    """A parent whose config.json says 8 layers over tensors of 4 was reported as "must have the same number of
    layers (base: 4, ft: 8)": the weights agree, its config.json does not. The error now says which count is off."""
    from mergebot.errors import ModelError
    from mergebot.tinymodels import make_family

    base, ft = make_family(tmp_path / "fam", 2, seed=1, layers=4)
    cfg = json.loads((ft / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    (ft / "config.json").write_text(json.dumps(cfg))
    text = f"models:\n  - model: {base}\n  - model: {ft}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n"
    with pytest.raises(ModelError, match=rf"same number of layers \({base}: 4, {ft}: 8\); use slices: .*; {ft}: "
                                         r"config.json says num_hidden_layers 8, but its tensors hold 4 layers$"):
        merge_yaml(tmp_path, text)


def test_a_donor_counting_fewer_layers_than_its_tensors_hold_is_warned(tmp_path):
    """A `models:` merge keeps the donor's config.json: counting 2 layers over tensors of 4, the output loads only
    the first 2 (transformers drops the rest as unused weights). Merged as mergekit does, with one warning."""
    from mergebot.builds.base import MergeOptions
    from mergebot.builds.dense import run_merge
    from mergebot.config.dense import parse_config
    from mergebot.tinymodels import make_family

    base, ft = make_family(tmp_path / "fam", 2, seed=1, layers=4)
    for d in (base, ft):
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_hidden_layers"] = 2
        (d / "config.json").write_text(json.dumps(cfg))
    text = f"models:\n  - model: {base}\n  - model: {ft}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n"
    result = run_merge(parse_config(text, str(tmp_path / "m.yml")), tmp_path / "out", MergeOptions(progress=False))
    assert [w for w in result.warnings if "layers" in w] == [
        f"{base}: config.json says num_hidden_layers 2, but the merge writes 4 layers; the output's config.json keeps "
        "2, so transformers loads only the first 2 (more layers in the tensors than counted: extra prediction layers, "
        "or a config.json that does not describe its weights)"]
    assert "model.layers.3.mlp.down_proj.weight" in load_tensors(tmp_path / "out")
