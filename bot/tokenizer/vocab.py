"""The output vocabulary of a merge and the alignment of vocabulary-indexed tensors (merge-semantics.md §4).

Active iff the config sets `tokenizer_source` or a `tokenizer:` section. Works on each model's `tokenizer.json`
with the `tokenizers` library (no transformers at runtime):

* §4.1 build the output tokenizer: the base's tokenizer stripped to the base config's vocab_size; `base` is
  that, `<model>` is that model's tokenizer unmodified, `union` appends every other model's tokens as added
  tokens (ids after the base's, in insertion order). Models are walked base first, then in config order, and
  each model's tokens in id order: never hash order (mergekit walks `get_vocab()` of a Rust HashMap).
  Then the `tokenizer.tokens` extras, then `pad_to_multiple_of`.
* §4.2 per-model permutations: output id -> that model's row, or -1.
* §4.3/§4.4 per output tensor (embeddings, lm_head, vocab biases): mergebot.tokenizer.align.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebot.config.dense import MergeConfig
from mergebot.config.refs import ModelRef, RefSyntaxError, parse_ref_text
from mergebot.errors import ModelError
from mergebot.hub.fetch import resolve
from mergebot.io import confine
from mergebot.io.local import ResolvedModel, is_local

# ------------------------------------------------------------------------------------------ data types


@dataclass
class ModelVocab:
    """One model's view of the vocabulary: token -> its row, and how many rows hold tokens."""

    key: str
    vocab: dict[str, int]  # incl. added tokens; the base's is the stripped one
    size: int  # config vocab size, else the number of tokens (§4.2)
    union_size: int  # config vocab size, else the tokenizer's size without added tokens (§4.1 union)
    added: dict[int, Any]  # id -> tokenizers.AddedToken
    from_base: bool = False  # its tokenizer could not be read: the base's vocabulary is assumed


@dataclass
class TokenSpec:
    """One `tokenizer.tokens` entry (§4.4)."""

    token: str
    kind: str  # "default" | "model" | "model_token" | "zero"
    model: str | None = None  # model key
    token_id: int | None = None
    source_token: str | None = None
    force: bool = False


@dataclass
class OutputVocab:
    tokenizer: Any  # tokenizers.Tokenizer
    source: str  # "union" | "base" | "model"
    donor_dir: Path  # whose tokenizer_config.json / special tokens the output keeps
    vocab: dict[str, int]
    size: int  # V
    padded: int  # V_padded
    base: str  # model key of the tokenizer base
    models: dict[str, ModelVocab]
    perms: dict[str, torch.Tensor]  # model key -> long[V]: row in that model, -1 where it lacks the token
    tokens: list[TokenSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)



# ------------------------------------------------------------------------------------------ tokenizers


def _tokenizers():
    import tokenizers

    return tokenizers


def _read_json(path: Path) -> dict | None:
    return confine.json_object(path.parent, path.name, f"model {path.parent.name}")


class BrokenTokenizerJson(ModelError):
    """A tokenizer.json that is there but is not a JSON object (a refused link or FIFO stays a plain ModelError)."""


def load_tokenizer_json(directory: Path, label: str) -> dict | None:
    """A model's tokenizer.json: None when absent; a ModelError naming it when it is there but not a JSON object
    (read as absent, a tokenizer.json of 100,000 nested `[` was reported as "has none")."""
    text = confine.read_text(directory, "tokenizer.json", label)
    if text is None:
        return None
    try:
        return confine.parse_object(text, detail=120)
    except confine.NotJsonObject as e:
        raise BrokenTokenizerJson(f"{label}: tokenizer.json {e}") from None


def _from_json(data: dict, label: str):
    try:
        return _tokenizers().Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001 - any parse failure of a user's tokenizer.json
        raise ModelError(f"{label}: tokenizer.json cannot be read by the tokenizers library: {e}") from None


def check_added_ids(tok: Any, data: dict, label: str) -> None:
    """Refuse a tokenizer.json whose `added_tokens` ids are not the ids the tokenizers library gives them.

    The library ignores those ids and numbers added tokens after `model.vocab` (whose size counts distinct ids), so
    a vocab with duplicate ids or gaps moves them: the rows of the model would then be aligned to other tokens."""
    for a in data.get("added_tokens") or []:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str):
            continue
        got = tok.token_to_id(a["content"])
        if got is not None and a.get("id") != got:
            raise ModelError(f"{label}: tokenizer.json added_tokens: {a['content']!r} has id {a.get('id')!r}, but the "
                             f"tokenizers library reads it as id {got} (duplicate ids or gaps in model.vocab?)")


def strip_tokenizer_json(data: dict, limit: int) -> tuple[dict, int]:
    """Remove tokens with id >= limit (§4.1 step 1), their BPE merges too. Returns (data, removed count).

    mergekit can strip only BPE tokenizers (it raises for others); removing a tail of ids is as simple for
    WordLevel, WordPiece and Unigram, so those are stripped as well."""
    model = data.get("model") or {}
    vocab = model.get("vocab")
    removed: set[str] = set()
    if isinstance(vocab, dict):
        removed = {t for t, i in vocab.items() if i >= limit}
        if removed:
            model["vocab"] = {t: i for t, i in vocab.items() if i < limit}
    elif isinstance(vocab, list):  # Unigram: the id is the position
        removed = {p[0] for p in vocab[limit:]}
        model["vocab"] = vocab[:limit]
    added = data.get("added_tokens") or []
    removed |= {a["content"] for a in added if a.get("id", 0) >= limit}
    data["added_tokens"] = [a for a in added if a.get("id", 0) < limit]
    if removed and model.get("type") == "BPE" and isinstance(model.get("merges"), list):
        kept = model["vocab"]

        def ok(m: Any) -> bool:
            a, b = m.split(" ", 1) if isinstance(m, str) else (m[0], m[1])
            return a in kept and b in kept and (a + b) in kept

        model["merges"] = [m for m in model["merges"] if ok(m)]
    return data, len(removed)


def _added_key(t: Any) -> tuple:
    return (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special)


def config_vocab_size(config: dict, key: str) -> int | None:
    """config.json's vocab_size (or its text_config's), None when absent. On the tokenizer path it cuts the base
    tokenizer and sizes every permutation, so anything but a positive integer is refused (a vocab_size of -5
    stripped every token: an output with an empty tokenizer and vocab_size 0)."""
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    if v is None:
        return None
    if type(v) is not int or v < 1:
        raise ModelError(f"{key}: config.json: vocab_size {str(v)[:40]!r} is not a positive integer")
    return v


def _model_vocab(key: str, tok: Any, config: dict, from_base: bool = False) -> ModelVocab:
    vocab = tok.get_vocab(with_added_tokens=True)
    cfg_size = config_vocab_size(config, key)
    return ModelVocab(key, vocab, cfg_size if cfg_size is not None else len(vocab),
                      cfg_size if cfg_size is not None else tok.get_vocab_size(with_added_tokens=False),
                      dict(tok.get_added_tokens_decoder()), from_base)


def _match_model(text: str, resolved: dict[str, ResolvedModel], search: list[Path]) -> str | None:
    """The key of a merged model named by `text` (same spelling, or the same local directory)."""
    text = text.removeprefix("model:")
    if text in resolved:
        return text
    try:
        key = str(parse_ref_text(text))
    except RefSyntaxError:
        return None
    if key in resolved:
        return key
    local = is_local(ModelRef(text), search)
    if local is not None:
        for k, r in resolved.items():
            if not r.is_hub and r.directory == local:
                return k
    return None


# ----------------------------------------------------------------------------------------- building


def tokenizer_settings(cfg: MergeConfig) -> tuple[str, str | None, dict, int | None] | None:
    """(source kind, model text, tokens, pad_to_multiple_of), or None when the tokenizer path is off (§4)."""
    if cfg.tokenizer_source is not None:
        src = str(cfg.tokenizer_source)
        tokens: dict = {}
        pad = None
    elif cfg.tokenizer is not None:
        src = str(cfg.tokenizer.get("source", "union"))
        tokens = cfg.tokenizer.get("tokens") or {}
        pad = cfg.tokenizer.get("pad_to_multiple_of")
    else:
        return None
    if src in ("union", "base"):
        return src, None, tokens, pad
    return "model", src.removeprefix("model:"), tokens, pad


def build_output_vocab(cfg: MergeConfig, resolved: dict[str, ResolvedModel], *, token: str | None = None,
                       download: bool = True) -> OutputVocab | None:
    """§4.1 and §4.2: the output tokenizer, V, V_padded and every model's permutation."""
    settings = tokenizer_settings(cfg)
    if settings is None:
        return None
    kind, model_text, tokens_cfg, pad = settings
    search = [Path(cfg.file).resolve().parent]
    warnings: list[str] = []
    refs = cfg.referenced_models()
    base_key = str(cfg.base_model) if cfg.base_model is not None else str(refs[0])
    order = [base_key] + [str(r) for r in refs if str(r) != base_key]

    # §4.1 step 1: the stripped base
    rb = resolved[base_key]
    data = load_tokenizer_json(rb.directory, base_key)
    if data is None:
        raise ModelError(f"{base_key}: the tokenizer path (tokenizer_source / tokenizer:) needs the base model's "
                         f"tokenizer.json, and {rb.directory} has none (mergebot reads tokenizers without "
                         "transformers; save the tokenizer as a fast tokenizer to get one)")
    check_added_ids(_from_json(data, base_key), data, base_key)  # also: malformed before it is stripped
    base_limit = config_vocab_size(rb.config, base_key)
    if base_limit is not None:
        data, n = strip_tokenizer_json(data, base_limit)
        if n:
            warnings.append(f"{base_key}: {n} tokenizer token(s) with id >= vocab_size {base_limit} (config.json) "
                            "removed from the base tokenizer (§4.1)")
    base_tok = _from_json(data, base_key)
    models: dict[str, ModelVocab] = {base_key: _model_vocab(base_key, base_tok, rb.config)}

    # §4.1 step 2: the other models' tokenizers
    for key in order[1:]:
        r = resolved[key]
        try:
            d = load_tokenizer_json(r.directory, key)
        except BrokenTokenizerJson as e:
            warnings.append(f"{e}; assuming it has the base model's vocabulary ({base_key})")
            models[key] = _model_vocab(key, base_tok, r.config, from_base=True)
            continue
        if d is None:
            if (r.directory / "tokenizer.model").is_file():
                raise ModelError(f"{key}: has tokenizer.model but no tokenizer.json; mergebot builds merged "
                                 "vocabularies from tokenizer.json (save the tokenizer as a fast tokenizer)")
            warnings.append(f"{key}: no tokenizer.json; assuming it has the base model's vocabulary ({base_key})")
            mv = _model_vocab(key, base_tok, r.config, from_base=True)
        else:
            try:
                tok = _from_json(d, key)
            except ModelError as e:
                warnings.append(f"{e}; assuming it has the base model's vocabulary ({base_key})")
                mv = _model_vocab(key, base_tok, r.config, from_base=True)
            else:
                check_added_ids(tok, d, key)
                mv = _model_vocab(key, tok, r.config)
        models[key] = mv

    # §4.1 step 3
    donor_dir = rb.directory
    if kind == "base":
        out = base_tok
    elif kind == "union":
        out = _union(base_tok, [models[k] for k in order], warnings)
    else:
        assert model_text is not None
        mkey = _match_model(model_text, resolved, search)
        if mkey is not None:
            mdir = resolved[mkey].directory
        else:
            try:
                ref = parse_ref_text(model_text)
            except RefSyntaxError as e:
                raise ModelError(f"{cfg.file}: tokenizer source {model_text!r}: {e}") from None
            mdir = resolve(ref, search, token=token, download=download).directory
        md = load_tokenizer_json(mdir, model_text)
        if md is None:
            raise ModelError(f"{cfg.file}: tokenizer source {model_text!r} has no tokenizer.json in {mdir}")
        out = _from_json(md, model_text)
        check_added_ids(out, md, model_text)
        donor_dir = mdir

    # §4.1 step 4: tokens named under tokenizer.tokens that the vocabulary lacks
    specs = _token_specs(tokens_cfg, resolved, search, cfg.file)
    present = out.get_vocab(with_added_tokens=True)
    extra = [s.token for s in specs if s.token not in present]
    if extra:
        out.add_tokens(extra)

    # §4.1 step 5
    vocab = out.get_vocab(with_added_tokens=True)
    size = max(len(vocab), max(vocab.values(), default=-1) + 1)
    padded = size
    if pad and size % pad:
        padded = (size // pad + 1) * pad

    # §4.2
    perms: dict[str, torch.Tensor] = {}
    tokens_by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    for key in order:
        mv = models[key]
        p = torch.full((size,), -1, dtype=torch.long)
        ids, rows = [], []
        for tok, new_id in tokens_by_id:
            old = mv.vocab.get(tok)
            if old is not None and old < mv.size:
                ids.append(new_id)
                rows.append(old)
        if ids:
            p[torch.tensor(ids, dtype=torch.long)] = torch.tensor(rows, dtype=torch.long)
        perms[key] = p
    return OutputVocab(out, kind, donor_dir, vocab, size, padded, base_key, models, perms, specs, warnings)


def _union(base_tok: Any, walk: list[ModelVocab], warnings: list[str]):
    """§4.1 step 3, `union`: ordinary tokens of every model, then added tokens (first settings win)."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    differing: list[str] = []
    for mv in walk:
        added_here = {t.content for t in mv.added.values()}
        skipped = 0
        for tok, idx in sorted(mv.vocab.items(), key=lambda kv: kv[1]):
            if idx >= mv.union_size:
                skipped += 1
                continue
            if tok not in added_here:
                ordinary.setdefault(tok)
        for idx, at in sorted(mv.added.items()):
            if idx >= mv.union_size:
                continue
            prev = added.get(at.content)
            if prev is None:
                added[at.content] = at
            elif _added_key(prev) != _added_key(at) and at.content not in differing:
                differing.append(at.content)
        if skipped and not mv.from_base:
            warnings.append(f"{mv.key}: {skipped} tokenizer token(s) with id >= vocab_size {mv.union_size} left out "
                            "of the union")
    if differing:
        warnings.append(f"added token(s) {', '.join(map(repr, differing[:5]))}{' ...' if len(differing) > 5 else ''} "
                        "have different settings in different models; the first model's settings are used")
    out = _tokenizers().Tokenizer.from_str(base_tok.to_str())
    present = out.get_vocab(with_added_tokens=True)
    new = [t for t in ordinary if t not in present and t not in added]
    if new:
        out.add_tokens(new)  # as atomic added tokens (normalized, not special), not as BPE merges
    present = out.get_vocab(with_added_tokens=True)
    more = [at for content, at in added.items() if content not in present]
    if more:
        out.add_tokens(more)
    return out


def _token_specs(tokens_cfg: dict, resolved: dict[str, ResolvedModel], search: list[Path], file: str) -> list[TokenSpec]:
    specs = []
    for name, spec in (tokens_cfg or {}).items():
        spec = spec or {}
        src = spec.get("source")
        force = bool(spec.get("force", False))
        token = str(name)

        def key_of(text: Any, token: str = token) -> str:
            k = _match_model(str(text), resolved, search)
            if k is None:
                raise ModelError(f"{file}: tokenizer.tokens.{token}: model {text!r} is not one of the merged models")
            return k

        if src is None:
            specs.append(TokenSpec(token, "default", force=force))
        elif isinstance(src, str):
            specs.append(TokenSpec(token, "model", key_of(src), force=force))
        elif src.get("kind") == "zero":
            specs.append(TokenSpec(token, "zero", force=force))
        else:
            tid = src.get("token_id")
            specs.append(TokenSpec(token, "model_token", key_of(src["model"]),
                                   int(tid) if tid is not None else None,
                                   None if src.get("token") is None else str(src["token"]), force))
    return specs


def set_vocab_size(config: dict, n: int) -> None:
    """§4.5: config.<vocab_size key> = V_padded."""
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict) \
            and "vocab_size" in config["text_config"]:
        config["text_config"]["vocab_size"] = n
    else:
        config["vocab_size"] = n
