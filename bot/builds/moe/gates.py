"""Router (gate) vectors of a MoE build (merge-semantics.md §3.4): one [H] vector per layer and expert.

* `random` / `uniform_random` come from mergebot.engine.rng's counter-based hash (Box–Muller for the normal), keyed by
  (seed, expert position), so `--random-seed` reproduces them exactly whatever else changes;
* `cheap_embed` needs only the tokenizer and the embedding rows, no forward pass: it tokenizes with
  transformers' AutoTokenizer when installed (as mergekit does), else with the raw tokenizer.json (the lock
  records which, and a warning says when a model-specific tokenizer class might split prompts differently);
* `hidden` / `hidden_last` / `hidden_avg` run the base model with transformers in bfloat16, as mergekit
  does (same prompt handling, same bf16 arithmetic), so they need the optional `mergebot[moe]` extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebot.config.moe import Expert
from mergebot.engine.rng import hash_u32, stream_key
from mergebot.errors import MergebotError, ModelError
from mergebot.io import confine
from mergebot.io.local import ResolvedModel
from mergebot.io.reader import TensorReader
from mergebot.tokenizer.files import special_token

RANDOM_MODES = ("random", "uniform_random")
HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")
EMBED = "model.embed_tokens.weight"  # mergekit hard-codes this name for cheap_embed
TWO32 = 4294967296.0
NOISE_CHUNK = 1 << 21


@dataclass
class GateVectors:
    """routed: [L, E, H]; shared: [L, S, H] or None (shared experts without prompts in a prompt mode)."""

    routed: torch.Tensor
    shared: torch.Tensor | None
    warnings: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # how prompts were tokenized (cheap_embed, hidden*)


# ------------------------------------------------------------------------------------------- random draws

def normal(seed: int, stream: str, position: int, start: int, count: int) -> torch.Tensor:
    """N(0,1) draws for elements [start, start+count) of one stream: Box–Muller on two keyed hash streams,
    one (u1, u2) pair per two elements (element 2p is r·cos θ, element 2p+1 is r·sin θ of pair p)."""
    if count <= 0:
        return torch.empty(0)
    p0, p1 = start // 2, (start + count + 1) // 2
    pair = torch.arange(p0, p1, dtype=torch.int64)
    h1 = hash_u32(pair, stream_key(seed, stream + "#u1", position))
    h2 = hash_u32(pair, stream_key(seed, stream + "#u2", position))
    r = torch.sqrt(-2.0 * torch.log((h1 + 1).float() * (1.0 / TWO32)))  # u1 in (0, 1]: log is finite
    theta = h2.float() * (2.0 * math.pi / TWO32)
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=1).reshape(-1)
    off = start - 2 * p0
    return z[off:off + count]


def uniform(seed: int, stream: str, position: int, start: int, count: int, low: float, high: float) -> torch.Tensor:
    idx = torch.arange(start, start + count, dtype=torch.int64)
    u = hash_u32(idx, stream_key(seed, stream, position)).double() / TWO32
    return (low + (high - low) * u).float()


def random_gates(mode: str, layers: int, n: int, hidden: int, seed: int, first: int = 0) -> torch.Tensor:
    """[L, n, H] for gate positions first..first+n-1 (routed experts 0..E-1, then shared E..)."""
    out = torch.empty(layers, n, hidden)
    for j in range(n):
        if mode == "random":
            v = normal(seed, "moe.router.random", first + j, 0, layers * hidden)
        else:
            b = 1.0 / math.sqrt(hidden)
            v = uniform(seed, "moe.router.uniform_random", first + j, 0, layers * hidden, -b, b)
        out[:, j] = v.view(layers, hidden)
    return out


# ----------------------------------------------------------------------------------------- tokenization

def _added_token(value: object):
    from tokenizers import AddedToken

    if isinstance(value, dict) and isinstance(value.get("content"), str):
        keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
        return AddedToken(value["content"], **{k: bool(value[k]) for k in keys if k in value})
    if isinstance(value, str) and value:
        return AddedToken(value, normalized=False, special=True)
    return None


def load_tokenizer(directory: Path, label: str):
    """tokenizer.json with the special tokens of tokenizer_config.json registered as whole tokens, as
    transformers' fast tokenizer does at load time (so `<s>` in a prompt is one token, not `<`, `s`, `>`)."""
    f = directory / "tokenizer.json"
    if not f.is_file():
        raise ModelError(f"{label}: gate_mode cheap_embed needs the base's tokenizer.json (not found in {directory})")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(confine.read_text(directory, "tokenizer.json", label) or "")
    cfg: dict = confine.json_object(directory, "tokenizer_config.json", label) or {}
    extra = [_added_token(v) for v in (cfg.get("added_tokens_decoder") or {}).values()]
    specials = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                     "mask_token")] + list(cfg.get("additional_special_tokens") or [])
    extra += [_added_token(v) for v in specials]
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    new = [t for t in extra if t is not None and t.content not in known]
    if new:
        tok.add_special_tokens(new)
    return tok


GENERIC_TOKENIZERS = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


@dataclass
class PromptEncoder:
    """Prompts -> token ids as mergekit's tokenize_prompts makes them (bos *text* + prompt,
    add_special_tokens=False; padding is irrelevant once masked). `impl` is recorded in the lock."""

    encode: Callable[[list[str]], list[list[int]]]
    impl: str
    warning: str | None = None


def prompt_encoder(directory: Path, label: str) -> PromptEncoder:
    """transformers' AutoTokenizer when installed (what mergekit uses: model-specific classes such as v5's
    LlamaTokenizer may rebuild the tokenizer.json pipeline), else the raw tokenizer.json."""
    transformers: Any
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        try:
            hf = transformers.AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as e:
            raise ModelError(f"{label}: cannot load the base's tokenizer for gate_mode cheap_embed: {e}") from None
        bos = hf.bos_token or ""
        return PromptEncoder(lambda ps: [hf(bos + p, add_special_tokens=False)["input_ids"] for p in ps],
                             f"transformers {transformers.__version__}")
    if not (directory / "tokenizer.json").is_file():  # e.g. only a sentencepiece tokenizer.model
        raise ModelError(f"{label}: gate_mode cheap_embed needs the base's tokenizer.json (not in {directory}), "
                         "or transformers to read its other tokenizer files: pip install mergebot[moe]")
    tok = load_tokenizer(directory, label)
    bos = special_token(directory, "bos_token") or ""
    warning = None
    cls = (confine.json_object(directory, "tokenizer_config.json", label) or {}).get("tokenizer_class")
    if cls not in GENERIC_TOKENIZERS:
        warning = (f"{label}: cheap_embed prompts were tokenized with the raw tokenizer.json; transformers' {cls} "
                   "(which mergekit uses) may split them differently: pip install mergebot[moe] for identical gates")
    return PromptEncoder(lambda ps: [e.ids for e in tok.encode_batch([bos + p for p in ps], add_special_tokens=False)],
                         "tokenizers (tokenizer.json)", warning)


# -------------------------------------------------------------------------------------------- cheap_embed

def _normed(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_embed_vector(embed: torch.Tensor, vocab: int, ids: list[list[int]], label: str) -> torch.Tensor:
    """Σ over prompts and tokens of the embedding rows, L2-normalised: [H]."""
    total = torch.zeros(embed.shape[1], dtype=torch.float32)
    for seq in ids:
        if not seq:
            continue
        t = torch.tensor(seq, dtype=torch.int64)
        if int(t.max()) >= vocab:
            raise ModelError(f"{label}: token id {int(t.max())} is outside vocab_size {vocab} (config.json)")
        total += embed.index_select(0, t).float().sum(dim=0)
    return _normed(total)


def cheap_embed_gates(base: ResolvedModel, weights: TensorReader, experts: list[Expert], layers: int
                      ) -> tuple[torch.Tensor, PromptEncoder]:
    if EMBED not in weights.keys():
        raise ModelError(f"{base.label}: gate_mode cheap_embed needs the tensor {EMBED!r}, which the base lacks")
    embed = weights.get(EMBED)
    vocab = int(base.config.get("vocab_size") or embed.shape[0])
    enc = prompt_encoder(base.directory, base.label)
    out = []
    for e in experts:
        v = cheap_embed_vector(embed, vocab, enc.encode(e.positive_prompts), base.label)
        if e.negative_prompts:
            v = _normed(v - cheap_embed_vector(embed, vocab, enc.encode(e.negative_prompts), base.label))
        out.append(v)
    return torch.stack(out).unsqueeze(0).repeat(layers, 1, 1), enc  # the same vector for every layer


# ------------------------------------------------------------------------------------------------ hidden

def _transformers():
    try:
        import transformers
    except ImportError:
        raise MergebotError("gate_mode hidden/hidden_last/hidden_avg runs the base model with transformers, "
                            "which is not installed: pip install mergebot[moe] (or use gate_mode cheap_embed "
                            "or random)") from None
    return transformers


def hidden_gates(base: ResolvedModel, experts: list[Expert], mode: str, device: str) -> torch.Tensor:
    """mergekit's get_hidden_states: bf16 forward pass, hidden_states[:-1], last position (hidden,
    hidden_last) or the mean over every position incl. left padding (hidden_avg), mean over prompts."""
    tr = _transformers()
    try:
        tok = tr.AutoTokenizer.from_pretrained(str(base.directory))
        model = tr.AutoModelForCausalLM.from_pretrained(str(base.directory), dtype=torch.bfloat16)
    except (OSError, ValueError) as e:
        raise ModelError(f"{base.label}: transformers cannot load the base for gate_mode {mode}: {e}") from None
    model.to(device).eval()
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def states(prompts: list[str]) -> torch.Tensor:
        batch = tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
        with torch.no_grad():
            out = model(**batch.to(model.device), output_hidden_states=True, return_dict=True)
        hs = torch.stack(out.hidden_states[:-1])  # (L, batch, seq, H), bf16
        hs = hs.sum(dim=2) / hs.shape[2] if mode == "hidden_avg" else hs[:, :, -1, :]
        return hs.sum(dim=1) / hs.shape[1]

    vecs = []
    for expert in experts:
        hs = states(expert.positive_prompts)
        if expert.negative_prompts:
            hs -= states(expert.negative_prompts)
        hs /= hs.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(hs)
    return torch.stack(vecs, dim=1).float().cpu()  # (L, E, H)


# -------------------------------------------------------------------------------------------------- all

def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose [E, H] gate matrix has condition number > threshold: prompts too alike (§3.4)."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


def compute_gates(mode: str, base: ResolvedModel, weights: TensorReader, experts: list[Expert],
                  shared: list[Expert], *, layers: int, hidden: int, seed: int, device: str = "cpu") -> GateVectors:
    """Gate vectors for the routed experts, and for the shared ones when they have prompts or the mode is
    random/uniform_random (§3.4)."""
    with_prompts = [e for e in shared if e.positive_prompts]
    if with_prompts and len(with_prompts) != len(shared):
        raise ModelError("shared_experts: give prompts to every shared expert or to none")
    gated_shared = shared if (mode in RANDOM_MODES or with_prompts) else []
    need = experts + gated_shared
    warnings: list[str] = []
    tokenizer = None
    if mode in RANDOM_MODES:
        allg = random_gates(mode, layers, len(need), hidden, seed)
    elif mode == "cheap_embed":
        allg, enc = cheap_embed_gates(base, weights, need, layers)
        tokenizer = enc.impl
        warnings += [enc.warning] if enc.warning else []
    elif mode in HIDDEN_MODES:
        allg = hidden_gates(base, need, mode, device)
        tokenizer = f"transformers {_transformers().__version__}"
    else:
        raise MergebotError(f"unknown gate_mode {mode!r}")
    if allg.shape != (layers, len(need), hidden):
        raise ModelError(f"{base.label}: gate vectors have shape {tuple(allg.shape)}, expected "
                         f"{(layers, len(need), hidden)} (num_hidden_layers x experts x hidden_size)")
    bad = degenerate_layers(allg)
    if bad:
        which = "every layer" if len(bad) == layers else "layers " + ", ".join(map(str, bad))
        warnings.append(f"degenerate routing in {which} (gate matrix condition number > 5): the experts' prompts "
                        "may be too similar, and some experts will be underused")
    n = len(experts)
    return GateVectors(allg[:, :n].contiguous(), allg[:, n:].contiguous() if gated_shared else None, warnings,
                       tokenizer)
