"""Tiny seeded Llama/Mistral-shaped models: real safetensors + config.json + tokenizer.json.

Used by `mergebot demo` (no network needed) and by the tests. A "fine-tune" is a base plus seeded noise, as real merges are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIAL = ["<unk>", "<s>", "</s>"]


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + [f"w{i}" for i in range(len(SPECIAL), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 128}))


def llama_config(*, vocab: int = 64, hidden: int = 32, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 inter: int = 48, family: str = "llama", tie: bool = False, dtype: str = "float32") -> dict:
    cfg = {
        "architectures": ["MistralForCausalLM" if family == "mistral" else "LlamaForCausalLM"],
        "model_type": family, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie,
        "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0, "hidden_act": "silu",
    }
    if family == "mistral":
        cfg["sliding_window"] = None
    return cfg


def llama_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    t = {"model.embed_tokens.weight": r(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = r(h, h)
        t[p + "self_attn.k_proj.weight"] = r(kv, h)
        t[p + "self_attn.v_proj.weight"] = r(kv, h)
        t[p + "self_attn.o_proj.weight"] = r(h, h)
        t[p + "mlp.gate_proj.weight"] = r(inter, h)
        t[p + "mlp.up_proj.weight"] = r(inter, h)
        t[p + "mlp.down_proj.weight"] = r(h, inter)
        t[p + "input_layernorm.weight"] = 1 + r(h)
        t[p + "post_attention_layernorm.weight"] = 1 + r(h)
    t["model.norm.weight"] = 1 + r(h)
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = r(v, h)
    return t


def save_model(directory: Path, cfg: dict, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
               shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    cfg = dict(cfg, torch_dtype=str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tokenizer(directory, cfg["vocab_size"])
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            part = names[s * per:(s + 1) * per]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def make_family(root: Path, n: int = 3, *, seed: int = 0, noise: float = 0.02, dtype: torch.dtype = torch.float32,
                shards: int = 1, **cfg_kw) -> list[Path]:
    """A base model and n-1 'fine-tunes' (base + seeded noise), as directories under root."""
    cfg = llama_config(**cfg_kw)
    base = llama_tensors(cfg, seed)
    out = [save_model(root / "base", cfg, base, dtype=dtype, shards=shards)]
    for i in range(1, n):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        ft = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in base.items()}
        out.append(save_model(root / f"ft{i}", cfg, ft, dtype=dtype, shards=shards))
    return out


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out
