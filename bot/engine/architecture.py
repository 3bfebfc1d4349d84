"""What a checkpoint's tensor names and config.json say about its layout, for any decoder-only model.

No hand-written table per family: the layer index is the first `.<digits>.` in a name (the most common
prefix wins), the layer count key is whichever of the usual keys config.json has, and vocabulary-indexed
tensors are those whose first axis equals the vocab size (merge-semantics.md §7, auto-inference).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
POST_HINTS = ("lm_head", "embed_out")  # output heads, even when named like an embedding (GPT-NeoX embed_out)
TIED_FALLBACK = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed.weight")}


@dataclass(frozen=True)
class Layout:
    layer_prefix: str | None  # e.g. "model.layers"
    num_layers: int
    pre: tuple[str, ...]  # non-layer tensors before the layers (embeddings): t = 0, first slice
    layer_suffixes: tuple[str, ...]  # "self_attn.q_proj.weight", ... in first-seen order
    post: tuple[str, ...]  # non-layer tensors after the layers (final norm, lm_head): t = 0, last slice
    layers_by_index: dict[int, tuple[str, ...]]

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{index}.{suffix}"


def split_layer(name: str, prefix: str | None) -> tuple[int, str] | None:
    m = LAYER_RE.match(name)
    if m and m.group(1) == prefix:
        return int(m.group(2)), m.group(3)
    return None


def infer_layout(names: list[str], config: dict) -> Layout:
    prefixes = Counter(m.group(1) for n in names if (m := LAYER_RE.match(n)))
    prefix = prefixes.most_common(1)[0][0] if prefixes else None
    layers: dict[int, list[str]] = {}
    pre: list[str] = []
    post: list[str] = []
    for n in names:
        hit = split_layer(n, prefix)
        if hit:
            layers.setdefault(hit[0], []).append(hit[1])
        elif any(h in n for h in PRE_HINTS) and not any(h in n for h in POST_HINTS):
            pre.append(n)
        else:
            post.append(n)
    num = max(layers) + 1 if layers else 0
    cfg_layers = layer_count(config)
    if cfg_layers is not None and layers and cfg_layers != num:
        num = max(num, cfg_layers)
    suffixes: list[str] = []
    for i in sorted(layers):
        for s in layers[i]:
            if s not in suffixes:
                suffixes.append(s)
    return Layout(prefix, num, tuple(pre), tuple(suffixes), tuple(post),
                  {i: tuple(v) for i, v in layers.items()})


def layer_count_key(config: dict) -> str | None:
    for k in LAYER_COUNT_KEYS:
        if isinstance(config.get(k), int):
            return k
    text = config.get("text_config")
    if isinstance(text, dict):
        for k in LAYER_COUNT_KEYS:
            if isinstance(text.get(k), int):
                return f"text_config.{k}"
    return None


def layer_count(config: dict) -> int | None:
    key = layer_count_key(config)
    if key is None:
        return None
    if key.startswith("text_config."):
        return config["text_config"][key.split(".", 1)[1]]
    return config[key]


def set_layer_count(config: dict, n: int) -> bool:
    key = layer_count_key(config)
    if key is None:
        return False
    if key.startswith("text_config."):
        config["text_config"][key.split(".", 1)[1]] = n
    else:
        config[key] = n
    return True


# config.json lists with one entry per layer (transformers v5 checks len(layer_types) == num_hidden_layers)
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "activation_sparsity_pattern", "block_types")


def remap_layer_lists(config: dict, sources: list[tuple[dict, int]]) -> None:
    """Rebuild per-layer config lists for a sliced output: output layer j takes entry i of the list in the config
    of the model its layers come from, `sources[j] = (that config, i)`. A list is touched only when every source
    config has it with one entry per layer (mergekit 0.1.5 only rewrites the layer count, which transformers v5
    then refuses to load for Gemma2/Qwen2-style `layer_types`)."""
    key = layer_count_key(config)
    nested = key is not None and key.startswith("text_config.")
    holder = config["text_config"] if nested else config
    for name in PER_LAYER_KEYS:
        if not isinstance(holder.get(name), list):
            continue
        new = []
        for src, i in sources:
            h = src.get("text_config") if nested else src
            lst = h.get(name) if isinstance(h, dict) else None
            if not isinstance(lst, list) or len(lst) != layer_count(src) or i >= len(lst):
                break
            new.append(lst[i])
        else:
            holder[name] = new


def vocab_size(config: dict) -> int | None:
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v if isinstance(v, int) else None


def is_vocab_tensor(name: str, shape: tuple[int, ...], config: dict) -> bool:
    v = vocab_size(config)
    return bool(shape) and v is not None and shape[0] == v and ("embed" in name or "lm_head" in name or "wte" in name
                                                                 or "output" in name)
