"""From a validated config and the models' headers to a list of output tensors to compute.

This is merge-semantics.md §1.2 (normalisation into per-layer work) and §1.3 (parameter resolution):
pre-weights from the first slice, each slice's layers renumbered, post-weights from the last slice,
parameters resolved per tensor with filters, gradients and precedence. No tensor data is read here, so
the whole output (names, shapes, dtypes, sizes) is known before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mergebot.config.dense import MergeConfig, Slice, Source
from mergebot.config.params import resolve
from mergebot.config.refs import ModelRef
from mergebot.config.spec import REQUIRED
from mergebot.config.yamlsafe import keypath
from mergebot.engine import architecture as arch
from mergebot.engine.dtypes import dtype_name, torch_dtype
from mergebot.engine.methods import METHODS
from mergebot.engine.methods.base import MergeMethod
from mergebot.errors import ConfigError, ModelError
from mergebot.io.local import ResolvedModel
from mergebot.io.reader import TensorReader
from mergebot.tokenizer.align import plan_alignment
from mergebot.tokenizer.vocab import config_vocab_size, set_vocab_size


@dataclass
class Input:
    model: str  # key into Plan.models
    tensor: str  # source tensor name
    position: int  # position of the source in its slice, config order (seeds the RNG)
    is_base: bool


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    inputs: list[Input]
    base: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    t: float
    copy: bool = False  # a single input copied (or a non-floating buffer)
    align: Any = None  # mergebot.tokenizer.vocab.Alignment: inputs laid out in the output vocabulary first (§4.3)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class Plan:
    method: MergeMethod
    jobs: list[TensorJob]
    models: dict[str, TensorReader]
    resolved: dict[str, ResolvedModel]
    donor: str
    out_config: dict
    warnings: list[str] = field(default_factory=list)
    vocab: Any = None  # mergebot.tokenizer.vocab.OutputVocab when the tokenizer path is active (§4)

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    @property
    def input_bytes(self) -> int:
        seen = set()
        total = 0
        for j in self.jobs:
            for i in j.inputs:
                if (i.model, i.tensor) not in seen:
                    seen.add((i.model, i.tensor))
                    total += self.models[i.model].header(i.tensor).nbytes
        return total


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def build_plan(cfg: MergeConfig, resolved: dict[str, ResolvedModel], weights: dict[str, TensorReader], *,
               vocab: Any = None) -> Plan:
    method = METHODS[cfg.method_name]
    donor_ref = cfg.base_model or cfg.referenced_models()[0]
    donor = str(donor_ref)
    layouts = {key: arch.infer_layout(list(w.keys()), resolved[key].config) for key, w in weights.items()}
    layout = layouts[donor]
    if vocab is None:  # the donor's config.json becomes the output's: a vocab_size of "64" or true cannot load
        config_vocab_size(resolved[donor].config, donor)
    warnings: list[str] = []

    slices: list[tuple[Slice, list[Source], ModelRef | None, list[tuple[int, int]]]] = []
    for s in cfg.slices:
        sources, base = cfg.slice_inputs(s)
        ranges = []
        for src in sources:
            mlay = layouts[str(src.model)]
            if src.layer_range is None:
                ranges.append((0, mlay.num_layers))
            else:
                a, b = src.layer_range
                if b > mlay.num_layers:
                    raise ConfigError(cfg.file, keypath(src.path + ("layer_range",)), cfg.doc.line(src.path + ("layer_range",)),
                                      f"layer_range [{a}, {b}] is out of range: {src.model} has {mlay.num_layers} layers")
                ranges.append((a, b))
        lengths = {b - a for a, b in ranges}
        if len(lengths) > 1:
            detail = ", ".join(f"{src.model}: {b - a}" for src, (a, b) in zip(sources, ranges))
            raise ModelError(f"{cfg.file}: the models of a merge must have the same number of layers ({detail}); "
                             "use slices: with layer_range to pick matching ranges"
                             + _layer_count_mismatch(sources, layouts, resolved))
        slices.append((s, sources, base, ranges))

    jobs: list[TensorJob] = []
    first, last = slices[0], slices[-1]
    configs = {key: r.config for key, r in resolved.items()}
    checked = (configs, donor)
    for name in layout.pre:
        jobs.extend(_job(cfg, method, weights, first, name, lambda r, n=name: n, 0.0, name, warnings,
                         vocab=vocab, checked=checked))
    out_index = 0
    layer_sources: list[tuple[dict, int]] = []  # per output layer: (config of its first source, source index)
    for s, sources, base, ranges in slices:
        length = ranges[0][1] - ranges[0][0]
        for k in range(length):
            t = 1.0 if length == 1 else k / (length - 1)
            # the tensors of the first source's layer (layers may differ within a model, e.g. Gemma3)
            suffixes = layouts[str(sources[0].model)].layers_by_index.get(ranges[0][0] + k) or layout.layer_suffixes
            for suffix in suffixes:
                out_name = layout.layer_name(out_index, suffix)
                jobs.extend(_job(cfg, method, weights, (s, sources, base, ranges), out_name,
                                 lambda r, suffix=suffix, k=k: layout.layer_name(r[0] + k, suffix), t, None,
                                 warnings, vocab=vocab))
            layer_sources.append((resolved[str(sources[0].model)].config, ranges[0][0] + k))
            out_index += 1
    for name in layout.post:
        jobs.extend(_job(cfg, method, weights, last, name, lambda r, n=name: n, 0.0, name, warnings,
                         vocab=vocab, checked=checked))

    out_config = dict(resolved[donor].config)
    if out_config.pop("auto_map", None) is not None:  # no parent code is copied: it could only name another repo's
        warnings.append("config.json: auto_map (remote code) dropped; merges never carry a parent's custom code")
    out_dtype = torch_dtype(cfg.out_dtype or cfg.dtype) or (jobs[0].out_dtype if jobs else torch.float32)
    out_config["torch_dtype"] = dtype_name(out_dtype)
    if "dtype" in out_config:
        out_config["dtype"] = dtype_name(out_dtype)
    if not cfg.uses_models:
        if not arch.set_layer_count(out_config, out_index):
            warnings.append("config.json has no layer-count key; left unchanged")
        arch.remap_layer_lists(out_config, layer_sources)  # e.g. layer_types must follow their layers
    else:
        said = arch.layer_count(out_config)
        if said is not None and out_index > said:  # models: keeps the donor's count, which misses some layers
            warnings.append(f"{donor}: config.json says {arch.layer_count_key(out_config)} {said}, but the merge "
                            f"writes {out_index} layers; the output's config.json keeps {said}, so transformers "
                            f"loads only the first {said} (more layers in the tensors than counted: extra "
                            "prediction layers, or a config.json that does not describe its weights)")
    if vocab is not None:  # §4.5: the vocabulary size is the output tokenizer's, padded
        set_vocab_size(out_config, vocab.padded)
        warnings = vocab.warnings + warnings
    return Plan(method, jobs, weights, resolved, donor, out_config, warnings, vocab=vocab)


def _layer_count_mismatch(sources: list[Source], layouts: dict[str, arch.Layout],
                          resolved: dict[str, ResolvedModel]) -> str:
    """Where a model's config.json counts other layers than its tensors hold (its count is the larger of the two),
    say so: the "different number of layers" is then that config.json's, not the weights'."""
    notes = []
    for src in sources:
        key = str(src.model)
        lay, said = layouts[key], arch.layer_count(resolved[key].config)
        held = max(lay.layers_by_index) + 1 if lay.layers_by_index else 0
        if said is not None and said != held:
            notes.append(f"; {key}: config.json says {arch.layer_count_key(resolved[key].config)} {said}, but its "
                         f"tensors hold {held} layers")
    return "".join(dict.fromkeys(notes))


def _lookup(w: TensorReader, name: str) -> str | None:
    if name in w.keys():
        return name
    for alt in arch.TIED_FALLBACK.get(name, ()):
        if alt in w.keys():
            return alt
    return None


def _vocab_rows(inputs: list[Input], shapes: list[tuple[int, ...]], vocab: Any, configs: dict[str, dict], donor: str,
                warnings: list[str]) -> None:
    """An embedding or output head whose rows are some inputs' vocab_size but not another's: that model's
    config.json does not describe its weights. Refused where it matters: the shapes differ (it was "tensor size
    mismatch ... set tokenizer_source", the wrong hint), the tokenizer path sizes its alignment by that vocab_size,
    or the model is the donor of the output's config.json; a warning otherwise (a non-donor's shapes agree and its
    config is not used: mergekit merges it too)."""
    sizes = [vocab.models[i.model].size if vocab is not None else arch.vocab_size(configs[i.model]) for i in inputs]
    fits = [n is not None and arch.is_vocab_tensor(i.tensor, s, {"vocab_size": n})
            for i, s, n in zip(inputs, shapes, sizes)]
    if not any(fits):
        return
    for i, s, n, fit in zip(inputs, shapes, sizes, fits):
        if fit or n is None:
            continue
        rows = s[0] if s else 0
        if arch.vocab_size(configs[i.model]) is None:
            msg = (f"{i.model}: config.json has no vocab_size, and its {i.tensor} has {rows} rows, not the {n} tokens "
                   f"of its tokenizer: add vocab_size: {rows} to its config.json")
        else:
            msg = (f"{i.model}: config.json: vocab_size is {n}, but its {i.tensor} has {rows} rows (a model's "
                   "vocab_size must be the row count of its embeddings; its config.json does not describe its weights)")
        if vocab is not None or i.model == donor or len(set(shapes)) > 1:
            raise ModelError(msg)
        if not any(w.startswith(f"{i.model}: config.json") and "vocab_size" in w for w in warnings):
            warnings.append(f"{msg}; merged by its rows, which match the other models'")  # once, not per head


def _job(cfg: MergeConfig, method: MergeMethod, weights: dict[str, TensorReader], sl, out_name: str,
         source_name, t: float, fixed: str | None, warnings: list[str], vocab: Any = None,
         checked: tuple[dict[str, dict], str] | None = None) -> list[TensorJob]:
    s, sources, base, ranges = sl
    order = list(range(len(sources)))
    if method.base != "ignored":
        order.sort(key=lambda i: not sources[i].is_base)  # base first, others in config order (§2.0)
    inputs: list[Input] = []
    srcs: list[Source] = []
    for i in order:
        src = sources[i]
        w = weights[str(src.model)]
        wanted = source_name(ranges[i])
        found = _lookup(w, wanted)
        if found is None:
            if wanted == "lm_head.weight" or fixed is not None and not w.keys():
                continue
            if fixed is not None and wanted not in weights[str(sources[0].model)].keys():
                continue
            raise ModelError(f"{src.model}: tensor {wanted!r} not present (needed for output tensor {out_name!r})")
        inputs.append(Input(str(src.model), found, i, src.is_base))
        srcs.append(src)
    if not inputs:
        return []
    infos = [weights[i.model].header(i.tensor) for i in inputs]
    shapes = {inf.shape for inf in infos}
    if fixed is not None and checked is not None:  # embeddings and heads: every model's vocab_size fits its rows
        _vocab_rows(inputs, [inf.shape for inf in infos], vocab, *checked, warnings)
    is_vocab, align = False, None
    if vocab is not None:  # vocabulary-indexed: only the non-vocab dims must match (§2.0, §4.3)
        is_vocab, align = plan_alignment(vocab, out_name, [i.model for i in inputs], [i.tensor for i in inputs],
                                         [inf.shape for inf in infos], next((j for j, i in enumerate(inputs)
                                                                             if i.is_base), None), warnings)
    if len(shapes) > 1 and not is_vocab:
        detail = ", ".join(f"{i.model}: {list(inf.shape)}" for i, inf in zip(inputs, infos))
        raise ModelError(f"tensor size mismatch for {out_name}: {detail}"
                         + (" (the vocabularies differ: set tokenizer_source: union, base or a model, or a "
                            "tokenizer: section, to align them)"
                            if "embed" in out_name or "lm_head" in out_name else ""))
    in_dtypes = [torch_dtype(cfg.dtype) or inf.dtype for inf in infos]
    promoted = _promote(in_dtypes)
    shape = (vocab.padded, *infos[0].shape[1:]) if is_vocab else infos[0].shape
    if is_vocab and not promoted.is_floating_point:
        raise ModelError(f"{out_name}: a non-floating vocabulary-indexed tensor cannot be aligned to a new vocabulary")
    if not promoted.is_floating_point:  # integer buffers: copied, and every input must agree (§2.0)
        return [TensorJob(out_name, shape, promoted, promoted, inputs, None, {}, [{}] * len(inputs), t, copy=True,
                          align=align)]
    compute = torch.float64 if promoted == torch.float64 else torch.float32
    out_dtype = torch_dtype(cfg.out_dtype) or promoted
    base_idx = next((j for j, i in enumerate(inputs) if i.is_base), None)
    if method.base == "required" and base_idx is None:
        if method.singleton_passthrough and len(inputs) == 1:
            return [TensorJob(out_name, shape, out_dtype, compute, inputs, None, {}, [{}], t, copy=True, align=align)]
        raise ModelError(f"the base model is missing tensor {out_name!r}, which {method.name} needs")
    if method.name != "passthrough" and len(inputs) == 1 and method.singleton_passthrough:
        return [TensorJob(out_name, shape, out_dtype, compute, inputs, None, {}, [{}], t, copy=True, align=align)]
    policy = method.optional_policy  # §2.0 optional-tensor policies
    if policy == "passthrough_base_singleton" and len(inputs) == 1 and base_idx == 0:
        return [TensorJob(out_name, shape, out_dtype, compute, inputs, None, {}, [{}], t, copy=True, align=align)]
    if policy == "base_or_skip" and len(inputs) < method.min_inputs:
        if len(inputs) == 1 and base_idx == 0:
            return [TensorJob(out_name, shape, out_dtype, compute, inputs, None, {}, [{}], t, copy=True, align=align)]
        warnings.append(f"{out_name}: only {len(inputs)} model(s) have it, {method.name} needs "
                        f"{method.min_inputs}: left out of the output")
        return []

    shared: dict[str, Any] = {}
    per_input: list[dict[str, Any]] = [{} for _ in inputs]
    for p in method.params:
        if p.scope == "shared":
            v = resolve([s.parameters, cfg.parameters], p, out_name, t)
            if v is REQUIRED:
                raise ModelError(f"missing required parameter {p.name!r} for tensor {out_name!r} "
                                 "(no filter matched it; add a fallback entry without 'filter')")
            shared[p.name] = v
            continue
        for j, (inp, src) in enumerate(zip(inputs, srcs)):
            if p.scope == "non_base" and inp.is_base:
                continue
            v = resolve([src.parameters, s.parameters, cfg.parameters], p, inp.tensor, t)
            if v is REQUIRED:
                raise ModelError(f"missing required parameter {p.name!r} for {src.model}, tensor {inp.tensor!r} "
                                 "(no filter matched it; add a fallback entry without 'filter')")
            per_input[j][p.name] = v
    check = method.validate
    if check is not None:  # method-specific parameter checks, before anything is written
        check(out_name, shared, per_input, models=[i.model for i in inputs])
    return [TensorJob(out_name, shape, out_dtype, compute, inputs, base_idx, shared, per_input, t, align=align)]
