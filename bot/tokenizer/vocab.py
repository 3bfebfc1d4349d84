"""The output vocabulary of a merge and the alignment of vocabulary-indexed tensors (merge-semantics.md §4).

Active iff the config sets `tokenizer_source` or a `tokenizer:` section. Works on each model's `tokenizer.json`
with the `tokenizers` library (no transformers at runtime):

* §4.1 build the output tokenizer: the base's tokenizer stripped to the base config's vocab_size; `base` is
  that, `<model>` is that model's tokenizer unmodified, `union` appends every other model's tokens as added
  tokens (ids after the base's, in insertion order). Models are walked base first, then in config order, and
  each model's tokens in id order: never hash order (mergekit walks `get_vocab()` of a Rust HashMap).
  Then the `tokenizer.tokens` extras, then `pad_to_multiple_of`.
* §4.2 per-model permutations: output id -> that model's row, or -1.
* §4.3/§4.4 per output tensor (embeddings, lm_head, vocab biases): an `Alignment` planned from the
  permutations alone (which rows are each model's own, which take a default row and from where); the
  executor then builds one aligned [V_padded, ...] copy per input with `align_inputs` before the method runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebot.engine import architecture as arch
from mergebot.io import confine
from mergebot.config.dense import MergeConfig
from mergebot.config.refs import ModelRef, RefSyntaxError, parse_ref_text
from mergebot.errors import ModelError
from mergebot.hub.fetch import ResolvedModel, is_local, resolve

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


@dataclass
class Alignment:
    """How one vocabulary-indexed tensor's inputs are laid out in the output vocabulary (§4.3).

    Per input i: row t of the aligned matrix is the input's own row `perms[i][t]` where that is >= 0, else
    the default row `dpos[t]`. Default rows are sums of source rows (`terms[i]`: positions in the default
    table, rows of input i) divided by `divisor`, computed in float32 (float64 for float64 inputs)."""

    size: int
    padded: int
    perms: list[torch.Tensor]
    dpos: torch.Tensor  # long[V]: index into the default table, -1 where no default row is needed
    count: int  # number of default rows
    terms: list[tuple[torch.Tensor, torch.Tensor]]
    divisor: torch.Tensor  # float64[count]


# ------------------------------------------------------------------------------------------ tokenizers


def _tokenizers():
    import tokenizers

    return tokenizers


def _read_json(path: Path) -> dict | None:
    return confine.json_object(path.parent, path.name, f"model {path.parent.name}")


def load_tokenizer_json(directory: Path) -> dict | None:
    return confine.json_object(directory, "tokenizer.json", f"model {directory.name}")


def _from_json(data: dict, label: str):
    try:
        return _tokenizers().Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001 - any parse failure of a user's tokenizer.json
        raise ModelError(f"{label}: tokenizer.json cannot be read by the tokenizers library: {e}") from None


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


def _model_vocab(key: str, tok: Any, config: dict, from_base: bool = False) -> ModelVocab:
    vocab = tok.get_vocab(with_added_tokens=True)
    cfg_size = arch.vocab_size(config)
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
    data = load_tokenizer_json(rb.directory)
    if data is None:
        raise ModelError(f"{base_key}: the tokenizer path (tokenizer_source / tokenizer:) needs the base model's "
                         f"tokenizer.json, and {rb.directory} has none (mergebot reads tokenizers without "
                         "transformers; save the tokenizer as a fast tokenizer to get one)")
    base_limit = arch.vocab_size(rb.config)
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
        d = load_tokenizer_json(r.directory)
        if d is None:
            if (r.directory / "tokenizer.model").is_file():
                raise ModelError(f"{key}: has tokenizer.model but no tokenizer.json; mergebot builds merged "
                                 "vocabularies from tokenizer.json (save the tokenizer as a fast tokenizer)")
            warnings.append(f"{key}: no tokenizer.json; assuming it has the base model's vocabulary ({base_key})")
            mv = _model_vocab(key, base_tok, r.config, from_base=True)
        else:
            try:
                mv = _model_vocab(key, _from_json(d, key), r.config)
            except ModelError as e:
                warnings.append(f"{e}; assuming it has the base model's vocabulary ({base_key})")
                mv = _model_vocab(key, base_tok, r.config, from_base=True)
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
        md = load_tokenizer_json(mdir)
        if md is None:
            raise ModelError(f"{cfg.file}: tokenizer source {model_text!r} has no tokenizer.json in {mdir}")
        out = _from_json(md, model_text)
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


# ----------------------------------------------------------------------------------------- alignment


def plan_alignment(ov: OutputVocab, out_name: str, models: list[str], tensors: list[str],
                   shapes: list[tuple[int, ...]], base_index: int | None,
                   warnings: list[str]) -> tuple[bool, Alignment | None]:
    """(is this a vocabulary-indexed tensor, its alignment or None when every input is already aligned)."""
    rows = [ov.models[m].size for m in models]
    if not all(arch.is_vocab_tensor(t, s, {"vocab_size": r}) for t, s, r in zip(tensors, shapes, rows)):
        return False, None
    rest = {s[1:] for s in shapes}
    if len(rest) > 1:
        detail = ", ".join(f"{m}: {list(s)}" for m, s in zip(models, shapes))
        raise ModelError(f"tensor size mismatch for {out_name}: {detail}")
    V = ov.size
    n = len(models)
    own = [ov.perms[m] for m in models]
    has = torch.stack([p >= 0 for p in own]) if n else torch.zeros((0, V), dtype=torch.bool)
    count = has.sum(0)
    forced = torch.zeros(V, dtype=torch.bool)
    explicit: dict[int, TokenSpec] = {}
    for spec in ov.tokens:
        tid = ov.vocab.get(spec.token)
        if tid is None:
            continue
        if spec.force:
            forced[tid] = True
        if spec.kind != "default":
            explicit[tid] = spec
    need = (count < n) | forced
    perms = [torch.where(forced, torch.full_like(p, -1), p) for p in own]
    identity = not bool(need.any()) and V == ov.padded and all(
        s[0] == V and bool((p == torch.arange(V)).all()) for p, s in zip(perms, shapes))
    if identity:
        return True, None

    need_ids = need.nonzero().squeeze(1)
    dpos = torch.full((V,), -1, dtype=torch.long)
    dpos[need_ids] = torch.arange(len(need_ids))
    divisor = torch.ones(len(need_ids), dtype=torch.float64)
    pos_terms: list[list[torch.Tensor]] = [[] for _ in range(n)]
    row_terms: list[list[torch.Tensor]] = [[] for _ in range(n)]

    # the tokens: config (§4.4), for the tokens that need a default row
    rule = need.clone()
    for tid, spec in explicit.items():
        if not bool(need[tid]):
            continue
        rule[tid] = False
        if spec.kind == "zero":
            continue
        if spec.model not in models:
            raise ModelError(f"tokenizer.tokens.{spec.token}: the source model {spec.model} has no {out_name} "
                             "among this tensor's inputs")
        j = models.index(spec.model)
        if spec.kind == "model":
            row = int(own[j][tid])
            if row < 0:
                raise ModelError(f"tokenizer.tokens.{spec.token}: model {spec.model} does not have the token "
                                 f"{spec.token!r}")
        else:
            if spec.token_id is not None:
                row = spec.token_id
            else:
                row = ov.models[spec.model].vocab.get(spec.source_token, -1)
                if row < 0:
                    raise ModelError(f"tokenizer.tokens.{spec.token}: token {spec.source_token!r} not found in "
                                     f"model {spec.model}")
            if not 0 <= row < shapes[j][0]:
                raise ModelError(f"tokenizer.tokens.{spec.token}: token id {row} is out of range for model "
                                 f"{spec.model} ({out_name} has {shapes[j][0]} rows)")
        pos_terms[j].append(dpos[tid:tid + 1])
        row_terms[j].append(torch.tensor([row], dtype=torch.long))

    # the default rules (§4.3), in order
    single = rule & (count == 1)
    zero = rule & (count == 0)
    base_has = torch.zeros(V, dtype=torch.bool) if base_index is None else has[base_index]
    from_base = rule & (count >= 2) & base_has
    mean = rule & (count >= 2) & ~base_has
    for i in range(n):
        sel = (single & has[i]) | (mean & has[i])
        if i == base_index:
            sel = sel | from_base
        ids = sel.nonzero().squeeze(1)
        pos_terms[i].append(dpos[ids])
        row_terms[i].append(own[i][ids])
    mids = mean.nonzero().squeeze(1)
    divisor[dpos[mids]] = count[mids].to(torch.float64)
    if bool(zero.any()):
        inv = {v: k for k, v in ov.vocab.items()}
        names = [inv.get(int(t), f"#{int(t)}") for t in zero.nonzero().squeeze(1)[:5]]
        warnings.append(f"{out_name}: {int(zero.sum())} token(s) in no model ({', '.join(map(repr, names))}"
                        f"{' ...' if int(zero.sum()) > 5 else ''}): zero rows (§4.3)")
    terms = [(torch.cat(p), torch.cat(r)) for p, r in zip(pos_terms, row_terms)]
    return True, Alignment(V, ov.padded, perms, dpos, len(need_ids), terms, divisor)


def align_inputs(al: Alignment, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One aligned [V_padded, ...] copy per input (§4.3): own rows, default rows, padding = mean of the first V."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rest = tuple(xs[0].shape[1:])
    table = torch.zeros((al.count, *rest), dtype=acc)
    for x, (pos, rows) in zip(xs, al.terms):
        if len(pos):
            table.index_add_(0, pos, x.index_select(0, rows).to(acc))
    if al.count:
        table /= al.divisor.to(acc).view(-1, *([1] * len(rest)))
    out = []
    for x, p in zip(xs, al.perms):
        y = torch.empty((al.padded, *rest), dtype=dtype)
        head = y[:al.size]
        if x.dtype == dtype:
            torch.index_select(x, 0, p.clamp(min=0), out=head)
        else:
            head.copy_(x.index_select(0, p.clamp(min=0)))
        miss = (p < 0).nonzero().squeeze(1)
        if len(miss):
            head[miss] = table[al.dpos[miss]].to(dtype)
        if al.padded > al.size:
            y[al.size:] = head.to(acc).mean(0).to(dtype)
        out.append(y)
    return out
