"""Vocabulary-indexed tensors in the output vocabulary (merge-semantics.md §4.3, §4.4).

Per output tensor (embeddings, lm_head, vocab biases) an `Alignment` is planned from the output vocabulary's
permutations alone (mergebot.tokenizer.vocab: which rows are each model's own, which take a default row and from
where); the executor then builds one aligned [V_padded, ...] copy per input with `align_inputs` before the
method runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergebot.engine import architecture as arch
from mergebot.errors import ModelError
from mergebot.tokenizer.vocab import OutputVocab, TokenSpec


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
                row = ov.models[spec.model].vocab.get(spec.source_token or "", -1)
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
