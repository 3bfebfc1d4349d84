"""Tiny models of real architectures, built by transformers itself, so tensor names, tied weights and config.json
keys are exactly what the Hub's checkpoints have (Qwen2 q/k/v biases, Gemma2's four norms per layer and tied
embeddings, GPT-2's `transformer.h.N.attn.c_attn` Conv1D layout with `n_layer`, Mistral/Llama).

transformers is a test dependency only; mergebot never imports it at runtime.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergebot.tinymodels import write_tokenizer

VOCAB = 64
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def arch_config(family: str, layers: int = 4):
    import transformers as tr

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **TOKENS)
    if family == "llama":
        return tr.LlamaConfig(**common)
    if family == "mistral":
        return tr.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tr.Qwen2Config(**common)
    if family == "gemma2":
        return tr.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    if family == "gpt2":
        return tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128, **TOKENS)
    if family == "gpt_neox":  # output head named embed_out: a post-weight despite the "embed" in its name
        return tr.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=128, **TOKENS)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox")


def _randomize(model: torch.nn.Module, seed: int, scale: float, add: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):  # tied parameters are listed once
            noise = torch.randn(p.shape, generator=g) * scale
            if add:
                p.add_(noise)
            else:
                p.copy_(noise)


def make_arch_family(root: Path, family: str, n: int = 2, *, seed: int = 0, noise: float = 0.02,
                     layers: int = 4) -> list[Path]:
    """A base and n-1 fine-tunes (base + seeded noise on every parameter, biases and norms included)."""
    import transformers as tr

    model = tr.AutoModelForCausalLM.from_config(arch_config(family, layers))
    model.eval()
    _randomize(model, seed, 0.1, add=False)  # biases and norms non-zero too, so merges of them are tested
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for i in range(n):
        if i:
            model.load_state_dict(base_state)
            _randomize(model, seed * 1000 + i, noise, add=True)
        d = root / (f"{family}_base" if i == 0 else f"{family}_ft{i}")
        model.save_pretrained(d, safe_serialization=True)
        write_tokenizer(d, VOCAB)
        out.append(d)
    return out


def load_and_generate(directory: Path, n_layers: int | None = None) -> list[int]:
    """Load with transformers (strictly: no missing or unexpected tensors) and greedy-generate a few tokens."""
    import transformers as tr

    model, info = tr.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{directory}: {bad}"
    if n_layers is not None:
        assert model.config.num_hidden_layers == n_layers
    # the tiny WordLevel tokenizer directly: AutoTokenizer would pick the family's class by model_type
    tok = tr.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ids = tok("w3 w4 w5", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] == ids.shape[1] + 4
    return out[0].tolist()
