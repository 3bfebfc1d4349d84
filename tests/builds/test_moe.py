"""The MoE builder (merge-semantics.md §3): tiny Llama / Qwen3 models in, Mixtral / Qwen2-MoE / Qwen3-MoE out,
checked by loading the output with transformers and against independent computations of the gate vectors."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mergebot.builds.base import MergeOptions
from mergebot.builds.moe import layout as L
from mergebot.builds.moe.gates import normal
from mergebot.builds.moe.plan import ALLOW_SAME_FLAG, prepare_moe
from mergebot.builds.moe.write import run_moe
from mergebot.config.configfile import load
from mergebot.errors import (
    ConfigError,
    MergebotError,
    ModelError,
    NotSupportedYet,
    OutputError,
)
from mergebot.tinymodels import load_tensors, make_family, write_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
SEED_002 = ROOT / "examples/merges/002_moe_random.yml"
DIMS = {"vocab": 64, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "inter": 48}
I, H, NL = DIMS["inter"], DIMS["hidden"], DIMS["layers"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> list[Path]:
    """base, ft1, ft2: float32 Llama, 2 layers."""
    return make_family(tmp_path_factory.mktemp("moe_fam"), 3, seed=11, noise=0.05, **DIMS)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> list[Path]:
    """Two tiny dense Qwen3 models (head_dim 16 != hidden/heads, to check it is carried)."""
    root = tmp_path_factory.mktemp("qwen3")
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                                   eos_token_id=2)
    out = []
    for i in range(2):
        torch.manual_seed(100 + i)
        m = transformers.Qwen3ForCausalLM(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
        d = root / f"q{i}"
        m.save_pretrained(d)
        write_tokenizer(d, 64)
        out.append(d)
    return out


def build(tmp: Path, text: str, name: str = "out", *, allow_all_same: bool = False, **opts):
    f = tmp / f"{name}.yml"
    f.write_text(text)
    cfg = load(f)
    return run_moe(cfg, tmp / name, MergeOptions(progress=False, **opts), allow_all_same=allow_all_same)


def expert_yaml(paths: list[Path], prompts: list[list[str]] | None = None, extra: list[str] | None = None) -> str:
    lines = []
    for i, p in enumerate(paths):
        lines.append(f"  - source_model: {p}")
        if prompts is not None:
            lines.append(f"    positive_prompts: {json.dumps(prompts[i])}")
        for e in (extra[i] if extra else "").splitlines():
            lines.append(f"    {e}")
    return "experts:\n" + "\n".join(lines) + "\n"


def load_hf(d: Path):
    m, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return m.eval()


def logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()


IDS = [[1, 5, 9, 13, 40, 2], [1, 60, 61, 3, 7, 8]]


# ------------------------------------------------------------------------------------------------ seed 002

def test_seed_002_as_mixtral(fam, tmp_path):
    text = SEED_002.read_text()
    text = text.replace("./ELYZA-japanese-Llama-2-13b-instruct", str(fam[0])).replace(
        "./ELYZA-japanese-Llama-2-13b", str(fam[1]))
    res = build(tmp_path, text, random_seed=7)
    out = tmp_path / "out"
    m = load_hf(out)
    assert type(m).__name__ == "MixtralForCausalLM"
    assert m.config.num_local_experts == 2 and m.config.num_experts_per_tok == 2 and m.config.sliding_window is None
    assert m.dtype == torch.bfloat16
    gen = m.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["dtype"] == "bfloat16" and cfg["rope_theta"] == 10000.0 and cfg["sliding_window"] is None
    assert (out / "mergekit_moe_config.yml").read_text() == text
    assert not (out / "README.md").exists()
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["pad_token"] == "<s>" and transformers.AutoTokenizer.from_pretrained(out).pad_token_id == 1
    lock = json.loads((out / "mergebot.lock.json").read_text())
    assert lock["kind"] == "moe" and lock["merge_method"] == "moe" and lock["random_seed"] == 7
    assert [p["role"] for p in lock["parents"]] == ["base", "expert"]
    assert lock["base_model"] == str(fam[0]) and lock["out_dtype"] == "bfloat16"
    assert res.lock == lock and res.stats.tensors == len(load_tensors(out))

    # tensor layout: fused slices hold each expert's own weights; the rest is the base's (all cast to bf16)
    t = load_tensors(out)
    src = [load_tensors(fam[0]), load_tensors(fam[1])]
    for layer in range(NL):
        gu, dn = t[L.experts_gate_up(layer)], t[L.experts_down(layer)]
        assert gu.shape == (2, 2 * I, H) and dn.shape == (2, H, I) and t[L.router(layer)].shape == (2, H)
        for e in range(2):
            s = src[e]
            assert torch.equal(gu[e, :I], s[L.mlp_source(layer, "gate_proj")].bfloat16())
            assert torch.equal(gu[e, I:], s[L.mlp_source(layer, "up_proj")].bfloat16())
            assert torch.equal(dn[e], s[L.mlp_source(layer, "down_proj")].bfloat16())
    for name, v in src[0].items():
        if ".mlp." not in name:
            assert torch.equal(t[name], v.bfloat16()), name
    assert all(v.dtype == torch.bfloat16 for v in t.values())


def test_layout_equals_transformers_conversion_of_legacy_names(fam, tmp_path):
    """Our fused tensors == what transformers' `mixtral` conversion mapping makes of mergekit ≤0.1.4's
    `block_sparse_moe.experts.{e}.w1/w2/w3` checkpoint of the same model."""
    from safetensors.torch import save_file

    build(tmp_path, f"base_model: {fam[0]}\ngate_mode: random\n" + expert_yaml(fam), random_seed=3)
    ours = load_tensors(tmp_path / "out")
    legacy = {}
    for name, v in ours.items():
        if ".mlp.experts." in name:
            continue
        legacy[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
    for layer in range(NL):
        gu, dn = ours[L.experts_gate_up(layer)], ours[L.experts_down(layer)]
        for e in range(len(fam)):
            names = L.legacy_mixtral_names(layer, e)
            legacy[names["gate_proj"]] = gu[e, :I].clone()
            legacy[names["up_proj"]] = gu[e, I:].clone()
            legacy[names["down_proj"]] = dn[e].clone()
    d = tmp_path / "legacy"
    d.mkdir()
    save_file(legacy, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((tmp_path / "out" / "config.json").read_text())
    converted = load_hf(d).state_dict()
    assert set(converted) == set(ours)
    for name, v in ours.items():
        assert torch.equal(converted[name], v), name


# ---------------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("gate_mode", ["cheap_embed", "random"])
def test_same_dense_experts_give_the_dense_logits(fam, tmp_path, gate_mode):
    """Every expert = the base: whatever the routing, the top-k weights sum to 1, so the MoE is the dense model."""
    prompts = [["w5 w6"], ["w20 w21"], ["w50"]] if gate_mode != "random" else None
    text = f"base_model: {fam[0]}\ngate_mode: {gate_mode}\ndtype: float32\n" + expert_yaml([fam[0]] * 3, prompts)
    if gate_mode != "random":
        with pytest.raises(ConfigError, match=ALLOW_SAME_FLAG):
            build(tmp_path, text, "refused")
    build(tmp_path, text, allow_all_same=True, random_seed=1)
    moe, dense = load_hf(tmp_path / "out"), load_hf(fam[0])
    assert type(dense).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(moe, IDS), logits(dense, IDS), atol=2e-5, rtol=1e-5)


def test_qwen3_moe_from_qwen3(qwen3, tmp_path):
    text = f"base_model: {qwen3[0]}\ngate_mode: random\n" + expert_yaml([qwen3[0]] * 2)
    build(tmp_path, text, random_seed=2)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 2 and cfg["head_dim"] == 16
    assert cfg["moe_intermediate_size"] == 48 and cfg["norm_topk_prob"] is True
    moe, dense = load_hf(tmp_path / "out"), load_hf(qwen3[0])
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(logits(moe, IDS), logits(dense, IDS), atol=2e-5, rtol=1e-5)
    # different qwen3 experts also build (Llama ones cannot: test_wrong_model_types_for_the_architecture)
    build(tmp_path, f"base_model: {qwen3[0]}\ngate_mode: random\n" + expert_yaml(qwen3), "two", random_seed=2)
    assert type(load_hf(tmp_path / "two")).__name__ == "Qwen3MoeForCausalLM"


# ------------------------------------------------------------------------------------------------ gates

def mergekit_tokenize(tok, prompts):
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)


def hf_tokenizer(d: Path):
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    return tok


def test_cheap_embed_gates_match_an_independent_computation(fam, tmp_path):
    pos = [["w5 w6 w7", "w9 w3"], ["w40 w41 w42 w43 w44"], ["w60", "w61 w62"]]
    neg = [["w10"], [], ["w5 w6", "w33"]]
    extra = [f"negative_prompts: {json.dumps(n)}" if n else "" for n in neg]
    text = f"base_model: {fam[0]}\ngate_mode: cheap_embed\ndtype: float32\n" + expert_yaml(fam, pos, extra)
    build(tmp_path, text)
    routers = load_tensors(tmp_path / "out")

    tok = hf_tokenizer(fam[0])
    embed = load_tensors(fam[0])["model.embed_tokens.weight"]

    def cheap(prompts):  # mergekit's get_cheap_embedding, one-hot and all
        b = mergekit_tokenize(tok, prompts)
        assert (b.input_ids[b.attention_mask.bool()] == 1).sum() == len(prompts)  # "<s>" is one token
        h = F.one_hot(b.input_ids, num_classes=64).float() @ embed.float()
        v = (h * b.attention_mask.unsqueeze(-1)).sum(dim=1).sum(dim=0)
        return v / v.norm().clamp(min=1e-8)

    want = []
    for p, n in zip(pos, neg):
        v = cheap(p)
        if n:
            v = v - cheap(n)
            v = v / v.norm().clamp(min=1e-8)
        want.append(v)
    want = torch.stack(want)
    for layer in range(NL):  # the same vector for every layer
        torch.testing.assert_close(routers[L.router(layer)], want, atol=1e-6, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "mergebot.lock.json").read_text())["gate_tokenizer"].startswith("transformers")


def test_cheap_embed_without_transformers(fam, tmp_path, monkeypatch):
    """No transformers: the raw tokenizer.json, with the special tokens registered as transformers does."""
    text = f"base_model: {fam[0]}\ngate_mode: cheap_embed\n" + expert_yaml(fam[:2], [["w5 w6"], ["w7", "w8 w9"]])
    with_tr = build(tmp_path, text, "a")
    monkeypatch.setitem(sys.modules, "transformers", None)
    without = build(tmp_path, text, "b")
    assert without.lock["gate_tokenizer"] == "tokenizers (tokenizer.json)"
    assert torch.allclose(with_tr.gates.routed, without.gates.routed, atol=1e-6)
    assert not any("tokenized with the raw" in w for w in without.warnings)
    # a model-specific tokenizer class may tokenize differently in transformers: say so
    import shutil
    llama_tok = tmp_path / "lt"
    shutil.copytree(fam[0], llama_tok)
    tc = json.loads((llama_tok / "tokenizer_config.json").read_text())
    (llama_tok / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": "LlamaTokenizer"}))
    res = build(tmp_path, text.replace(f"base_model: {fam[0]}", f"base_model: {llama_tok}"), "c")
    assert any("LlamaTokenizer" in w and "mergebot[moe]" in w for w in res.warnings)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates_match_an_independent_computation(fam, tmp_path, mode):
    pos = [["w5 w6 w7", "w9"], ["w40 w41 w42 w43 w44", "w12 w13"], ["w60"]]
    neg = [[], ["w7 w8 w9"], []]
    extra = [f"negative_prompts: {json.dumps(n)}" if n else "" for n in neg]
    text = f"base_model: {fam[0]}\ngate_mode: {mode}\ndtype: float32\n" + expert_yaml(fam, pos, extra)
    res = build(tmp_path, text)
    routers = load_tensors(tmp_path / "out")

    tok = hf_tokenizer(fam[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(fam[0], dtype=torch.bfloat16).eval()

    def states(prompts, exact):
        with torch.no_grad():
            out = model(**mergekit_tokenize(tok, prompts), output_hidden_states=True)
        hs = torch.stack(out.hidden_states[:-1])  # (L, B, T, H): inputs of layers 0..L-1, bf16
        if not exact:
            hs = hs.float()
        hs = hs.sum(dim=2) / hs.shape[2] if mode == "hidden_avg" else hs[:, :, -1]  # avg incl. left padding
        return hs.sum(dim=1) / hs.shape[1]

    for exact in (True, False):  # mergekit's bf16 arithmetic exactly; and float32 within bf16 precision
        for e, (p, n) in enumerate(zip(pos, neg)):
            v = states(p, exact)
            if n:
                v -= states(n, exact)
            v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
            got = torch.stack([routers[L.router(layer)][e] for layer in range(NL)])
            if exact:
                assert torch.equal(got, v.float())
            else:
                torch.testing.assert_close(got, v, atol=2e-2, rtol=2e-2)
    assert res.gates.routed.shape == (NL, 3, H)
    layer0 = routers[L.router(0)]  # hidden_states[0] is the embedding output: not all equal across layers
    assert not torch.allclose(layer0, routers[L.router(1)])


def test_hidden_gates_need_transformers(fam, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    text = f"base_model: {fam[0]}\ngate_mode: hidden\n" + expert_yaml(fam[:2], [["w5"], ["w6"]])
    with pytest.raises(MergebotError, match=r"pip install mergebot\[moe\]"):
        build(tmp_path, text)
    assert not (tmp_path / "out").exists()


def test_random_gates_are_reproducible_from_the_seed(fam, tmp_path):
    text = f"base_model: {fam[0]}\ngate_mode: random\n" + expert_yaml(fam)
    build(tmp_path, text, "a", random_seed=42)
    build(tmp_path, text, "b", random_seed=42)
    build(tmp_path, text, "c", random_seed=43)
    a, b, c = (tmp_path / n / "model.safetensors" for n in "abc")
    assert a.read_bytes() == b.read_bytes()
    ta, tc = load_tensors(a.parent), load_tensors(c.parent)
    assert not torch.equal(ta[L.router(0)], tc[L.router(0)])
    assert torch.equal(ta[L.experts_gate_up(0)], tc[L.experts_gate_up(0)])
    # gate_mode random: unscaled N(0,1); uniform_random: U(-1/sqrt(H), 1/sqrt(H))
    z = normal(42, "test", 0, 0, 200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and torch.equal(z[1000:2000], normal(42, "test", 0, 1000, 1000))
    uni = f"base_model: {fam[0]}\ngate_mode: uniform_random\n" + expert_yaml(fam, [["w5"], ["w6"], ["w7"]])
    build(tmp_path, uni, "u", random_seed=42)
    u = torch.stack([load_tensors(tmp_path / "u")[L.router(layer)] for layer in range(NL)])
    bound = 1 / H ** 0.5
    assert u.abs().max() <= bound and u.abs().max() > bound / 2 and u.std() > bound / 3


def test_noise_and_residual_scale(fam, tmp_path):
    extra = ["noise_scale: 0.01", "residual_scale: 0.5", "noise_scale: 0.01\nresidual_scale: 2.0"]
    text = f"base_model: {fam[0]}\ngate_mode: random\ndtype: float32\n" + expert_yaml(fam, None, extra)
    res = build(tmp_path, text, "a", random_seed=9)
    build(tmp_path, text, "b", random_seed=9)
    t = load_tensors(tmp_path / "a")
    assert t[L.experts_gate_up(0)].equal(load_tensors(tmp_path / "b")[L.experts_gate_up(0)])
    assert res.lock["random_seed"] == 9
    src = [load_tensors(p) for p in fam]
    for layer in range(NL):
        gu, dn = t[L.experts_gate_up(layer)], t[L.experts_down(layer)]
        g = [s[L.mlp_source(layer, "gate_proj")] for s in src]
        d = [s[L.mlp_source(layer, "down_proj")] for s in src]
        # expert 0: noise only (down_proj not scaled)
        diff = gu[0, :I] - g[0]
        assert 0.008 < diff.std() < 0.012 and abs(diff.mean()) < 0.002
        assert 0.008 < (dn[0] - d[0]).std() < 0.012
        # expert 1: residual_scale only: down_proj scaled exactly, gate/up untouched
        assert torch.equal(gu[1, :I], g[1]) and torch.allclose(dn[1], d[1] * 0.5)
        # expert 2: noise, then down_proj x2
        assert 0.016 < (dn[2] - 2 * d[2]).std() < 0.024
        assert 0.008 < (gu[2, :I] - g[2]).std() < 0.012
        # different experts/tensors draw different noise
        assert not torch.allclose(gu[0, :I] - g[0], gu[2, :I] - g[2])


# ------------------------------------------------------------------------------------------ Qwen2-MoE

def test_qwen2_moe_with_one_shared_expert(fam, tmp_path):
    text = (f"base_model: {fam[0]}\ngate_mode: cheap_embed\ndtype: float32\n"
            + expert_yaml(fam[1:], [["w5 w6"], ["w30 w31"]])
            + f"shared_experts:\n  - source_model: {fam[0]}\n    positive_prompts: [\"w50 w51\"]\n"
              "    residual_scale: 0.5\n")
    res = build(tmp_path, text)
    assert res.plan.arch is L.QWEN2_MOE
    out = tmp_path / "out"
    m = load_hf(out)
    assert type(m).__name__ == "Qwen2MoeForCausalLM"
    assert m.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 2 and cfg["shared_expert_intermediate_size"] == I == cfg["moe_intermediate_size"]
    assert cfg["norm_topk_prob"] is True and cfg["use_sliding_window"] is False and cfg["decoder_sparse_step"] == 1
    t = load_tensors(out)
    base = load_tensors(fam[0])
    for layer in range(NL):
        for p in "qkv":
            b = t[f"model.layers.{layer}.self_attn.{p}_proj.bias"]
            assert b.shape == (base[f"model.layers.{layer}.self_attn.{p}_proj.weight"].shape[0],) and not b.any()
        assert torch.equal(t[L.shared_expert(L.QWEN2_MOE, layer, "gate_proj")], base[L.mlp_source(layer, "gate_proj")])
        assert torch.allclose(t[L.shared_expert(L.QWEN2_MOE, layer, "down_proj")],
                              0.5 * base[L.mlp_source(layer, "down_proj")])
        sg = t[L.shared_router(layer)]
        assert sg.shape == (1, H) and torch.allclose(sg, res.gates.shared[layer])
        assert torch.allclose(sg.norm(), torch.tensor(1.0))
    # random gates: the shared expert needs no prompts (then DeepSeek MoE would come first: ask for qwen)
    rnd = (f"base_model: {fam[0]}\narchitecture: qwen\ngate_mode: random\n" + expert_yaml(fam[1:])
           + f"shared_experts:\n  - source_model: {fam[2]}\n")
    res = build(tmp_path, rnd, "rnd", random_seed=4)
    assert type(load_hf(tmp_path / "rnd")).__name__ == "Qwen2MoeForCausalLM"
    assert res.gates.shared.shape == (NL, 1, H) and res.lock["parents"][-1]["role"] == "expert"
    # the same experts with `architecture: mixtral` cannot take a shared expert
    with pytest.raises(ModelError, match="Mixtral has no shared experts"):
        build(tmp_path, text.replace("gate_mode:", "architecture: mixtral\ngate_mode:"), "mx")


def test_shared_expert_without_prompts_selects_deepseek_which_is_refused(fam, tmp_path):
    text = (f"base_model: {fam[0]}\ngate_mode: cheap_embed\n" + expert_yaml(fam[1:], [["w5"], ["w6"]])
            + f"shared_experts:\n  - source_model: {fam[0]}\n")
    with pytest.raises(NotSupportedYet, match="DeepSeek MoE"):
        build(tmp_path, text)


# ------------------------------------------------------------------------------------------------ errors

def test_mismatched_expert_shapes_name_model_and_tensor(fam, tmp_path):
    other = make_family(tmp_path / "wide", 1, seed=5, **{**DIMS, "inter": 64})[0]
    text = f"base_model: {fam[0]}\ngate_mode: random\n" + expert_yaml([fam[1], other])
    with pytest.raises(ModelError, match=r"wide/base: expert tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                         r"shape \[64, 32\], but the base .* needs \[48, 32\]"):
        build(tmp_path, text)
    deep = make_family(tmp_path / "deep", 1, seed=5, **{**DIMS, "layers": 3})[0]
    with pytest.raises(ModelError, match="has 3 layers but the base"):
        build(tmp_path, f"base_model: {fam[0]}\ngate_mode: random\n" + expert_yaml([fam[1], deep]))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.mergebot-*"))


def test_wrong_model_types_for_the_architecture(fam, qwen3, tmp_path):
    with pytest.raises(ModelError, match=r"Qwen3 MoE needs qwen3 models, not .*\(llama\)"):
        build(tmp_path, f"base_model: {fam[0]}\narchitecture: qwen3\ngate_mode: random\n" + expert_yaml(fam))
    mistral = make_family(tmp_path / "mis", 1, seed=5, family="mistral", **DIMS)[0]
    with pytest.raises(ModelError, match="same model_type"):
        build(tmp_path, f"base_model: {fam[0]}\ngate_mode: random\n" + expert_yaml([fam[1], mistral]))
    with pytest.raises(ModelError, match="needs qwen3 models"):
        build(tmp_path, f"base_model: {qwen3[0]}\ngate_mode: random\n" + expert_yaml([qwen3[1], fam[1]]))


def test_config_level_errors(fam, tmp_path):
    base = f"base_model: {fam[0]}\n"
    cases = {
        "experts: []\n": "non-empty list of experts",
        "gate_mode: hiddn\n" + expert_yaml(fam[:2], [["a"], ["b"]]): "did you mean 'hidden'",
        "experts_per_token: 3\n" + expert_yaml(fam[:2], [["a"], ["b"]]): "only 2 experts",
        "gate_mode: cheap_embed\n" + expert_yaml(fam[:2]): "needs positive_prompts",
        "gate_mode: uniform_random\n" + expert_yaml(fam[:2]): "needs positive_prompts",
    }
    for i, (body, msg) in enumerate(cases.items()):
        with pytest.raises(ConfigError, match=msg):
            build(tmp_path, base + body, f"c{i}")
    # the same rules hold for a MoeConfig built in code; the all-same refusal names the flag and the line
    f = tmp_path / "ok.yml"
    f.write_text(base + "gate_mode: cheap_embed\n" + expert_yaml([fam[1]] * 2, [["w5"], ["w6"]]))
    cfg = load(f)
    with pytest.raises(ConfigError, match=r"experts \(line 3\): every expert is the same model .*" + ALLOW_SAME_FLAG):
        run_moe(cfg, tmp_path / "o", MergeOptions(progress=False))
    for bad, msg in (({"experts": []}, "at least one expert"), ({"experts_per_token": 0}, ">= 1"),
                     ({"experts_per_token": 3}, "only 2 experts")):
        with pytest.raises(ConfigError, match=msg):
            run_moe(dataclasses.replace(cfg, **bad), tmp_path / "o", MergeOptions(progress=False))
    assert not (tmp_path / "o").exists()


def test_force_semantics_sharding_and_dry_run_plan(fam, tmp_path):
    text = f"base_model: {fam[0]}\ngate_mode: random\n" + expert_yaml(fam[:2])
    build(tmp_path, text, random_seed=1)
    with pytest.raises(OutputError, match="--force"):
        build(tmp_path, text, random_seed=1)
    one = load_tensors(tmp_path / "out")
    res = build(tmp_path, text, random_seed=1, force=True, out_shard_size=40_000)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(one) and list(index["weight_map"]) == sorted(one)
    assert all(torch.equal(v, one[k]) for k, v in load_tensors(out).items())
    load_hf(out)
    plan = prepare_moe(res.plan.cfg, MergeOptions(progress=False))
    lines = plan.describe()
    assert "MixtralForCausalLM" in lines[0] and any(str(fam[1]) in x for x in lines)
    assert plan.total_bytes == sum(v.numel() * v.element_size() for v in one.values())


def test_dense_defaults_table_matches_transformers():
    """moe_layout fills keys a dense config.json may omit with the dense class's default (the MoE class's
    default differs, e.g. Mixtral's rope_theta 1e6)."""
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    for mt, defaults in L.DENSE_DEFAULTS.items():
        c = classes[mt]()
        for k, v in defaults.items():
            got = c.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(c, k)
            assert got == v, (mt, k, got, v)


def test_moe_tokenizer_config_never_inherits_auto_map(tmp_path):
    """config.json already dropped auto_map; the donor's tokenizer_config.json was copied with it."""
    models = make_family(tmp_path / "fam", 2, seed=13, noise=0.05, **DIMS)
    tc = models[0] / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "auto_map": {"AutoTokenizer": ["evil/code--t.T", None]}}))
    res = build(tmp_path, f"base_model: {models[0]}\ngate_mode: random\n" + expert_yaml(models), random_seed=1)
    assert "auto_map" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "tokenizer_config.json: auto_map (remote code) dropped; merges never carry a parent's custom code" \
        in res.warnings
