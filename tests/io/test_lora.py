"""`model+lora` refs (§1.1, issue 3 item 5): a PEFT adapter folded into its base while streaming.

The expected values are folded by hand here, in float64 (W + scale·(B @ A)), independently of mergebot.io.lora; when peft
is installed the result is also checked against PEFT's own `merge_and_unload`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import prepare, run_merge
from mergebot.config.dense import parse_config
from mergebot.errors import ModelError
from mergebot.tinymodels import load_tensors
from tests.helpers import f64

PFX = "base_model.model."


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
           "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}
    cfg.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return directory


def lora_tensors(model: Path, modules=("self_attn.q_proj", "self_attn.v_proj"), r=4, seed=0, layers=range(4),
                 ranks: dict[str, int] | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    w = load_tensors(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        for m in modules:
            name = f"model.layers.{i}.{m}"
            rr = next((v for k, v in (ranks or {}).items() if name.endswith(k)), r)
            o, n = w[name + ".weight"].shape
            out[f"{PFX}{name}.lora_A.weight"] = (torch.randn(rr, n, generator=g) * 0.3).to(dtype)
            out[f"{PFX}{name}.lora_B.weight"] = (torch.randn(o, rr, generator=g) * 0.3).to(dtype)
    return out


def fold64(model: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT merge_and_unload by hand, in float64 (linear layers, no fan_in_fan_out)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = f64(model)
    lt = {k: v.double() for k, v in load_tensors_file(adapter / "adapter_model.safetensors").items()}
    for key in lt:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PFX):-len(".lora_A.weight")]
        a, b = lt[key], lt[key.replace("lora_A", "lora_B")]
        r = next((v for k, v in cfg.get("rank_pattern", {}).items() if module.endswith(k)), cfg["r"])
        alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if module.endswith(k)), cfg["lora_alpha"])
        assert a.shape[0] == r
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        w[module + ".weight"] = w[module + ".weight"] + scale * (b @ a)
    return w


def load_tensors_file(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(f))


def _run(tmp: Path, text: str, name: str = "out", **opts):
    f = tmp / f"{name}.yml"
    f.write_text(text)
    return run_merge(parse_config(text, str(f)), tmp / name, MergeOptions(progress=False, **opts))


def _one(ref: str) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {ref}\n    parameters: {{weight: 1.0}}\n"


# ------------------------------------------------------------------------------------------------ values

def test_lora_folded_merge_equals_hand_fold(family, tmp_path):
    base, ft1 = family[0], family[1]
    ad = write_adapter(tmp_path / "ad", lora_tensors(base, seed=3))
    res = _run(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}+{ad}\n    parameters: {{weight: 0.6}}\n"
                         f"  - model: {ft1}\n    parameters: {{weight: 0.4}}\n")
    out, want, other = f64(tmp_path / "out"), fold64(base, ad), f64(ft1)
    assert set(out) == set(want)
    for k in want:
        assert torch.allclose(out[k], 0.6 * want[k] + 0.4 * other[k], atol=1e-6, rtol=0), k
    lora = [p for p in res.lock["parents"] if p["role"] == "lora"]
    assert lora == [{"ref": str(ad), "revision": None, "sha": None, "local": True, "role": "lora",
                     "of": f"{base}+{ad}"}]
    on_disk = json.loads((tmp_path / "out" / "mergebot.lock.json").read_text())
    assert any(p["role"] == "lora" for p in on_disk["parents"])


def test_rslora_rank_and_alpha_patterns_object_form(family, tmp_path, monkeypatch):
    import mergebot.io.lora
    monkeypatch.setattr(mergebot.io.lora, "ROW_BLOCK", 40)  # B @ A computed a few rows at a time
    base = family[0]
    t = lora_tensors(base, seed=4, modules=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"),
                     ranks={"v_proj": 2})
    ad = write_adapter(tmp_path / "ad", t, r=4, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 2},
                       alpha_pattern={"layers.1.self_attn.q_proj": 3},
                       target_modules=["q_proj", "v_proj", "down_proj"])
    _run(tmp_path, f"merge_method: linear\nmodels:\n  - model: {{path: {base}, lora: {{path: {ad}}}}}\n"
                   "    parameters: {weight: 1.0}\n")
    out, want, orig = f64(tmp_path / "out"), fold64(base, ad), f64(base)
    for k in want:
        assert torch.allclose(out[k], want[k], atol=1e-6, rtol=0), k
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], orig["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(out["model.layers.0.mlp.down_proj.weight"], orig["model.layers.0.mlp.down_proj.weight"])


def test_bf16_base_is_folded_in_float32_and_cast_once(family_bf16, tmp_path):
    base = family_bf16[0]  # bf16, two shards
    ad = write_adapter(tmp_path / "ad", lora_tensors(base, seed=5, dtype=torch.bfloat16))
    _run(tmp_path, _one(f"{base}+{ad}"))
    got = load_tensors(tmp_path / "out")
    want = fold64(base, ad)
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16
        # one rounding of the exact value to bf16: within half an ulp (relative 2^-9), plus float32 noise
        assert torch.allclose(got[k].double(), v, rtol=2 ** -8, atol=1e-6), k


# ------------------------------------------------------------------------------------------------- Hub

def test_hub_adapter_is_pinned_and_listed_in_the_lock(hub, family, tmp_path):
    base = family[0]
    ad = write_adapter(tmp_path / "ad", lora_tensors(base, seed=6))
    repo = f"{hub.org}/tiny-lora"
    hub.server.create_repo(repo)
    sha = hub.server.commit(repo, {p.name: p.read_bytes() for p in ad.iterdir()}, message="adapter")
    res = _run(tmp_path, _one(f"{base}+{repo}"))
    out, want = f64(tmp_path / "out"), fold64(base, ad)
    for k in want:
        assert torch.allclose(out[k], want[k], atol=1e-6, rtol=0), k
    lora = [p for p in res.lock["parents"] if p["role"] == "lora"]
    assert lora == [{"ref": repo, "revision": None, "sha": sha, "local": False, "role": "lora",
                     "of": f"{base}+{repo}"}]

    # a dry run reads the adapter's safetensors header only
    f = tmp_path / "dry.yml"
    f.write_text(_one(f"{base}+{repo}@{sha}"))
    plan = prepare(parse_config(f.read_text(), str(f)), MergeOptions(progress=False), headers_only=True)
    assert plan.models[f"{base}+{repo}@{sha}"].adapter.sha == sha


def test_hub_repo_that_is_not_an_adapter(hub, family, tmp_path):
    repo = f"{hub.org}/not-an-adapter"
    hub.server.create_repo(repo)
    hub.server.commit(repo, {"README.md": b"# nothing\n"})
    with pytest.raises(ModelError, match=rf"LoRA {repo}: .*no adapter_config.json"):
        _run(tmp_path, _one(f"{family[0]}+{repo}"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- errors

def test_missing_adapter_files(family, tmp_path):
    base = family[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no adapter_config.json .*not a PEFT adapter"):
        _run(tmp_path, _one(f"{base}+{empty}"))
    ad = write_adapter(tmp_path / "ad", lora_tensors(base))
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no adapter_model.safetensors"):
        _run(tmp_path, _one(f"{base}+{ad}"))
    with pytest.raises(ModelError, match=r"no such local directory"):
        _run(tmp_path, _one(f"{base}+./nowhere/at/all"))
    assert not (tmp_path / "out").exists()


def test_adapter_targeting_a_tensor_the_model_lacks(family, tmp_path):
    base = family[0]
    t = lora_tensors(base, layers=range(4))
    t[f"{PFX}model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    t[f"{PFX}model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    ad = write_adapter(tmp_path / "far", t)
    with pytest.raises(ModelError, match=rf"LoRA {ad} .*targets tensor 'model.layers.7.self_attn.q_proj.weight'"):
        _run(tmp_path, _one(f"{base}+{ad}"))
    assert not (tmp_path / "out").exists()


def test_adapter_shape_mismatch(family, tmp_path):
    base = family[0]
    t = lora_tensors(base)
    t[f"{PFX}model.layers.2.self_attn.v_proj.lora_A.weight"] = torch.zeros(4, 24)  # hidden is 32
    ad = write_adapter(tmp_path / "bad", t)
    with pytest.raises(ModelError, match=rf"LoRA {ad} .*shape mismatch for model.layers.2.self_attn.v_proj.weight"):
        _run(tmp_path, _one(f"{base}+{ad}"))
    t = lora_tensors(base, r=4)
    ad2 = write_adapter(tmp_path / "rank", t, r=8)
    with pytest.raises(ModelError, match=r"r=8 but its lora tensors have rank 4"):
        _run(tmp_path, _one(f"{base}+{ad2}"))


def test_dora_and_other_peft_types_are_refused(family, tmp_path):
    base = family[0]
    ad = write_adapter(tmp_path / "dora", lora_tensors(base), use_dora=True)
    with pytest.raises(ModelError, match="DoRA"):
        _run(tmp_path, _one(f"{base}+{ad}"))
    ad = write_adapter(tmp_path / "ia3", lora_tensors(base), peft_type="IA3")
    with pytest.raises(ModelError, match="peft_type 'IA3'"):
        _run(tmp_path, _one(f"{base}+{ad}"))


# ------------------------------------------------------------------------------------ PEFT cross-check

def _peft_case(tmp: Path, base: Path, name: str, **lora_kw):
    peft = pytest.importorskip("peft")
    import transformers as tr

    torch.manual_seed(11)
    model = tr.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kw))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:  # trained copies replace the base's tensor
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ad = tmp / name
    pm.save_pretrained(ad)
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return ad, merged


def test_matches_peft_merge_and_unload_llama(family, tmp_path):
    base = family[0]
    ad, merged = _peft_case(tmp_path, base, "peft_llama", r=4, lora_alpha=16, use_rslora=True,
                            target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"],
                            rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 5},
                            modules_to_save=["lm_head"])
    _run(tmp_path, _one(f"{base}+{ad}"))
    out = load_tensors(tmp_path / "out")
    orig = load_tensors(base)
    assert set(out) == set(orig)
    changed = 0
    for k, v in out.items():
        assert torch.allclose(v, merged[k], atol=1e-6, rtol=0), k
        changed += not torch.equal(v, orig[k])
    assert changed == 4 * 4 + 2  # q, v, o, down in 4 layers, embed_tokens, lm_head


def test_matches_peft_merge_and_unload_gpt2_conv1d(tmp_path, monkeypatch):
    """GPT-2's Conv1D layers store W as [in, out] (fan_in_fan_out), with LoRA biases; also a legacy checkpoint
    without the `transformer.` prefix, and an adapter_config that says fan_in_fan_out: false (PEFT flips it)."""
    import mergebot.io.lora
    from tests.archmodels import make_arch_family

    monkeypatch.setattr(mergebot.io.lora, "ROW_BLOCK", 100)
    (base,) = make_arch_family(tmp_path / "m", "gpt2", 1, seed=9)
    ad, merged = _peft_case(tmp_path, base, "peft_gpt2", r=4, lora_alpha=8, fan_in_fan_out=True,
                            target_modules=["c_attn", "c_proj", "c_fc"], lora_bias=True)
    _run(tmp_path, _one(f"{base}+{ad}"))
    out = load_tensors(tmp_path / "out")
    for k, v in out.items():
        assert torch.allclose(v, merged[k], atol=1e-6, rtol=0), k
    assert not torch.equal(out["transformer.h.0.attn.c_attn.bias"], load_tensors(base)["transformer.h.0.attn.c_attn.bias"])

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    save_file({k.removeprefix("transformer."): v for k, v in load_tensors(base).items()},
              str(legacy / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, fan_in_fan_out=False)))
    _run(tmp_path, _one(f"{legacy}+{ad}"), "out_legacy")
    out = load_tensors(tmp_path / "out_legacy")
    assert "h.0.attn.c_attn.weight" in out
    for k, v in out.items():
        assert torch.allclose(v, merged["transformer." + k], atol=1e-6, rtol=0), k


@pytest.mark.parametrize("config, message", [
    ({"r": 0}, r"adapter_config.json r must be a positive integer, not 0"),
    ({"r": -4, "use_rslora": True}, r"adapter_config.json r must be a positive integer, not -4"),
    ({"r": "4"}, r"adapter_config.json r must be a positive integer, not '4'"),
    ({"lora_alpha": float("nan")}, r"adapter_config.json lora_alpha must be a finite number, not nan"),
    ({"lora_alpha": float("inf")}, r"adapter_config.json lora_alpha must be a finite number, not inf"),
    ({"lora_alpha": "8"}, r"adapter_config.json lora_alpha must be a finite number, not '8'"),
    ({"rank_pattern": ["v_proj"]}, r"adapter_config.json rank_pattern must be an object, not list"),
    ({"rank_pattern": {"(": 2}}, r"adapter_config.json rank_pattern key '\(' is not a valid pattern"),
    ({"alpha_pattern": {"v_proj": float("nan")}},
     r"adapter_config.json alpha_pattern.model.layers.0.self_attn.v_proj must be a finite number, not nan"),
])
def test_hostile_rank_and_alpha_are_one_line_errors(family, tmp_path, config, message):
    """r 0 / negative / a string used to raise ZeroDivisionError, ValueError or TypeError (a traceback), and a NaN
    or inf lora_alpha was folded into every adapted tensor: a merge of NaNs that succeeded."""
    base = family[0]
    ad = write_adapter(tmp_path / "ad", lora_tensors(base), **config)
    with pytest.raises(ModelError, match=rf"LoRA {ad} .*{message}"):
        _run(tmp_path, _one(f"{base}+{ad}"))
    assert not (tmp_path / "out").exists()


def test_zero_alpha_in_alpha_pattern_is_kept(family, tmp_path):
    """PEFT takes a pattern's value as is: alpha 0 for v_proj leaves v_proj unchanged (it was replaced by lora_alpha)."""
    base = family[0]
    ad = write_adapter(tmp_path / "ad", lora_tensors(base), alpha_pattern={"v_proj": 0})
    _run(tmp_path, _one(f"{base}+{ad}"))
    out, w = f64(tmp_path / "out"), f64(base)
    for i in range(4):
        assert torch.equal(out[f"model.layers.{i}.self_attn.v_proj.weight"], w[f"model.layers.{i}.self_attn.v_proj.weight"])
        assert not torch.equal(out[f"model.layers.{i}.self_attn.q_proj.weight"],
                               w[f"model.layers.{i}.self_attn.q_proj.weight"])


def test_catastrophic_rank_pattern_is_cut_off(family, tmp_path, monkeypatch):
    """A rank_pattern key is a regex matched as PEFT does; `([\\w.]+)+!` backtracks exponentially on a module name
    (minutes for `model.layers.0.self_attn.q_proj`). It used to stall the merge with no bound; now matching runs
    in a child process killed at a deadline, and the merge fails with one line naming the file and key."""
    import time

    from mergebot.io import patterns
    monkeypatch.setattr(patterns, "MATCH_SECONDS", 3.0)
    base = family[0]
    ad = write_adapter(tmp_path / "ad", lora_tensors(base), rank_pattern={"v_proj": 4, r"([\w.]+)+!": 2})
    start = time.monotonic()
    with pytest.raises(ModelError, match=rf"LoRA {ad} .*adapter_config.json rank_pattern: matching its keys .* took "
                                         r"over 3 s"):
        _run(tmp_path, _one(f"{base}+{ad}"))
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


def test_regex_rank_pattern_keys_still_match_as_peft(family, tmp_path):
    """Keys with regex syntax (matched in the child process) give PEFT's answer: the first key that matches."""
    base = family[0]
    t = lora_tensors(base, seed=5, ranks={"layers.1.self_attn.v_proj": 2, "layers.2.self_attn.v_proj": 2})
    ad = write_adapter(tmp_path / "ad", t, rank_pattern={r"layers\.[12]\.self_attn\.v_proj": 2, "v_proj": 4})
    _run(tmp_path, _one(f"{base}+{ad}"))  # a wrong rank would be refused: the tensors have rank 2 there
    out, w = f64(tmp_path / "out"), f64(base)
    for i, r in ((0, 4), (1, 2), (2, 2), (3, 4)):
        m = f"model.layers.{i}.self_attn.v_proj"
        a, b = t[f"{PFX}{m}.lora_A.weight"].double(), t[f"{PFX}{m}.lora_B.weight"].double()
        assert torch.allclose(out[m + ".weight"], w[m + ".weight"] + 8 / r * (b @ a), atol=1e-6, rtol=0), m
