"""`model+lora` references (merge-semantics.md §1.1): a PEFT LoRA adapter folded into its base while streaming.

mergekit merges the adapter with PEFT `merge_and_unload` into a `--lora-merge-cache` directory first. mergebot
needs neither PEFT nor a cache: `LoraWeights` wraps the base model's `ModelWeights` and, when the executor asks
for an adapted tensor, returns

    W + scale · (B @ A)            (transposed for fan_in_fan_out / GPT-2 Conv1D layers)

with scale = lora_alpha / r, or lora_alpha / √r with `use_rslora` (`rank_pattern`/`alpha_pattern` override r and
alpha per module, matched as PEFT does, within a deadline: mergebot.io.patterns). The fold runs in float32 (float64
for float64 weights) and is cast back to W's dtype once, one tensor at a time; nothing is cached. Also folded, as
`merge_and_unload` does: embedding LoRAs (`lora_embedding_A/B`), LoRA biases (`lora_B.bias`: bias + scale · b) and
full tensors saved with the adapter (`modules_to_save`, trained biases), which replace the base tensor. DoRA and
non-LoRA PEFT types are refused with a clear error. Every check (missing files, targets the model lacks, shapes)
runs when the model is loaded, i.e. before anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebot.config.refs import ModelRef
from mergebot.errors import ModelError
from mergebot.io.filenames import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS
from mergebot.io.local import ResolvedModel, read_json_object
from mergebot.io.patterns import PatternError, first_matches
from mergebot.io.reader import TensorReader
from mergebot.io.weights import ModelWeights, TensorInfo

PREFIX = "base_model.model."
ROW_BLOCK = 1 << 22  # elements of B @ A computed at a time
# transformers `Conv1D` layers store W as (in, out); PEFT switches fan_in_fan_out on for them by itself.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.(?P<adapter>[^.]+))??(?:\.(?P<param>weight|bias))?$")


@dataclass
class _Fold:
    """How one base tensor is changed by the adapter."""

    kind: str  # "linear" | "embedding" | "bias" | "replace"
    a: str = ""  # adapter tensor names
    b: str = ""
    scale: float = 1.0
    transpose: bool = False


def adapter_config(directory: Path, ref: ModelRef) -> dict[str, Any]:
    return read_json_object(directory, ADAPTER_CONFIG, f"LoRA {ref}", ": not a PEFT adapter directory")


def adapter_tensors(adapter: ResolvedModel) -> ModelWeights:
    """The adapter's own tensors, from its directory (safetensors, else a weights_only `.bin`)."""
    label = f"LoRA {adapter.ref}"
    w = ModelWeights(adapter.directory, label, discover=False)
    if (adapter.directory / ADAPTER_SAFETENSORS).exists():
        w.add_safetensors(ADAPTER_SAFETENSORS)
    elif (adapter.directory / ADAPTER_BIN).exists():
        w.add_bin(ADAPTER_BIN)
    else:
        raise ModelError(f"{label}: no {ADAPTER_SAFETENSORS} (or {ADAPTER_BIN}) in {adapter.directory}")
    return w


def _patterns(patterns: dict | None, modules: list[str], where: str, key: str) -> dict[str, Any]:
    """PEFT's `get_pattern_key` for every module at once: the value of the first key k with `(.*\\.)?k$` matching
    the module name, for the modules some key matches; bounded in time (mergebot.io.patterns)."""
    keys = list(patterns or {})
    try:
        hits = first_matches(keys, modules)
    except PatternError as e:
        if e.index is None:
            raise ModelError(f"{where}: adapter_config.json {key}: {e.reason}") from None
        raise ModelError(f"{where}: adapter_config.json {key} key {keys[e.index][:80]!r} is not a valid pattern: "
                         f"{e.reason}") from None
    return {m: (patterns or {})[keys[h]] for m, h in zip(modules, hits) if h is not None}


def _rank(value: Any, where: str, key: str) -> int:
    """A LoRA rank: a positive integer (a zero or negative r would divide by zero or take a root of it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ModelError(f"{where}: adapter_config.json {key} must be a positive integer, not {value!r}")
    return int(value)


def _alpha(value: Any, where: str, key: str) -> float:
    """A LoRA alpha: a finite number (NaN or inf would fold into every adapted tensor silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelError(f"{where}: adapter_config.json {key} must be a finite number, not {value!r}")
    return float(value)


class LoraWeights:
    """A TensorReader: the base model's tensors, adapted ones folded on `get` (§1.1)."""

    def __init__(self, base: TensorReader, adapter: ResolvedModel, adapter_tensors: TensorReader,
                 model_config: dict[str, Any]):
        self.base = base
        self.adapter = adapter
        self.lora = adapter_tensors
        self.label = base.label
        self.directory = base.directory
        self.folds: dict[str, list[_Fold]] = {}
        self._plan(model_config)

    # --------------------------------------------------------------------------------------- TensorReader
    def keys(self) -> Collection[str]:
        return self.base.keys()

    def header(self, name: str) -> TensorInfo:
        return self.base.header(name)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def release(self, name: str) -> None:
        self.base.release(name)
        for f in self.folds.get(name, ()):
            for n in (f.a, f.b):
                if n:
                    self.lora.release(n)

    def get(self, name: str) -> torch.Tensor:
        folds = self.folds.get(name)
        w = self.base.get(name)
        if not folds:
            return w
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        out = w.to(compute, copy=True)
        for f in folds:
            if f.kind == "replace":
                out = self.lora.get(f.a).to(compute, copy=True)
            elif f.kind == "bias":
                out += f.scale * self.lora.get(f.b).to(compute)
            else:
                a = self.lora.get(f.a).to(compute)
                b = self.lora.get(f.b).to(compute)
                step = max(1, ROW_BLOCK // max(1, out.shape[1]))  # bounded temporaries, even for embeddings
                for s in range(0, out.shape[0], step):
                    if f.transpose:  # W = (B @ A)ᵀ, so W[s:e] = (B @ A[:, s:e])ᵀ
                        out[s:s + step] += (b @ a[:, s:s + step]).T * f.scale
                    else:
                        out[s:s + step] += (b[s:s + step] @ a) * f.scale
        return out.to(w.dtype)

    # ------------------------------------------------------------------------------------------ planning
    def _where(self) -> str:
        return f"LoRA {self.adapter.ref} (for {self.base.label})"

    def _plan(self, model_config: dict) -> None:
        cfg = self.adapter.config
        where = self._where()
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise ModelError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LoRA adapters)")
        if cfg.get("use_dora"):
            raise ModelError(f"{where}: DoRA adapters (use_dora: true) are not supported yet")
        for key, what in (("layer_replication", "layer_replication"), ("target_parameters", "LoRA on parameters"),
                          ("alora_invocation_tokens", "activated LoRA"), ("use_qalora", "QALoRA")):
            if cfg.get(key):
                raise ModelError(f"{where}: {what} ({key} in adapter_config.json) is not supported yet")
        r0 = _rank(cfg.get("r", 8), where, "r")
        alpha0 = _alpha(cfg.get("lora_alpha", 8), where, "lora_alpha")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise ModelError(f"{where}: adapter_config.json {key} must be an object, not {type(cfg[key]).__name__}")
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        conv1d_model = model_config.get("model_type") in CONV1D_MODEL_TYPES

        lora_parts: dict[str, dict[str, str]] = {}
        for key in self.lora.keys():
            rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
            rel = rel.replace(".base_layer.", ".")  # save_embedding_layers keeps the wrapped layer's name
            if "lora_magnitude_vector" in rel:
                raise ModelError(f"{where}: DoRA adapters (lora_magnitude_vector) are not supported yet")
            m = _KEY.match(rel)
            if m:
                lora_parts.setdefault(m.group("module"), {})[m.group("kind") + "." + (m.group("param") or "weight")] = key
                continue
            if re.search(r"\.(lora_\w+|trainable_tokens\w*|token_adapter)\b", rel):
                raise ModelError(f"{where}: adapter tensor {key!r} is of a kind mergebot cannot fold")
            # a full tensor saved with the adapter (modules_to_save, trained biases): it replaces the base's
            self._target(rel, key, where, self.lora.header(key).shape)
            self.folds.setdefault(self._known(rel), []).insert(0, _Fold("replace", a=key))

        ranks = _patterns(cfg.get("rank_pattern"), list(lora_parts), where, "rank_pattern")
        alphas = _patterns(cfg.get("alpha_pattern"), list(lora_parts), where, "alpha_pattern")
        for module, parts in lora_parts.items():
            r = ranks.get(module)
            r = r0 if r is None else _rank(r, where, f"rank_pattern.{module}")
            alpha = alphas.get(module)
            alpha = alpha0 if alpha is None else _alpha(alpha, where, f"alpha_pattern.{module}")
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            emb = "lora_embedding_A.weight" in parts or "lora_embedding_B.weight" in parts
            ka, kb = ("lora_embedding_A.weight", "lora_embedding_B.weight") if emb else ("lora_A.weight", "lora_B.weight")
            if ka not in parts or kb not in parts:
                missing = ka if ka not in parts else kb
                raise ModelError(f"{where}: module {module!r} has no {missing.split('.')[0]} tensor")
            a, b = parts[ka], parts[kb]
            sa, sb = self.lora.header(a).shape, self.lora.header(b).shape
            target = module + ".weight"
            wshape = self._target(target, a, where)
            if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
                raise ModelError(f"{where}: {module}: lora A {list(sa)} and B {list(sb)} do not multiply "
                                 "(expected A [r, in], B [out, r])")
            if sa[0] != r:
                raise ModelError(f"{where}: {module}: adapter_config says r={r} but its lora tensors have rank {sa[0]}")
            prod = (sb[0], sa[1])
            if emb:
                transpose = True  # PEFT stores embedding A as [r, vocab], B as [dim, r]
            elif fifo:
                transpose = True
            elif conv1d_model and module.rsplit(".", 1)[-1] in CONV1D_LEAVES:
                transpose = True  # PEFT turns fan_in_fan_out on for Conv1D targets by itself
            else:
                transpose = False
            got = prod[::-1] if transpose else prod
            if tuple(wshape) != got:
                raise ModelError(f"{where}: shape mismatch for {target}: the model has {list(wshape)}, the adapter's "
                                 f"B @ A{'ᵀ' if transpose else ''} gives {list(got)} (is this adapter for another model?)")
            self.folds.setdefault(self._known(target), []).append(
                _Fold("embedding" if emb else "linear", a, b, scale, transpose))
            if "lora_B.bias" in parts:
                bias = module + ".bias"
                bshape = self._target(bias, parts["lora_B.bias"], where)
                if tuple(bshape) != tuple(self.lora.header(parts["lora_B.bias"]).shape):
                    raise ModelError(f"{where}: shape mismatch for {bias}: the model has {list(bshape)}, the "
                                     f"adapter's lora_B.bias has {list(self.lora.header(parts['lora_B.bias']).shape)}")
                self.folds.setdefault(self._known(bias), []).append(_Fold("bias", b=parts["lora_B.bias"], scale=scale))

    def _resolve(self, name: str) -> str | None:
        """The checkpoint's name for a module path: as is, or without/with the base-model prefix (legacy GPT-2
        checkpoints say `h.0.attn.c_attn` where the module path is `transformer.h.0.attn.c_attn`)."""
        for cand in (name, name.split(".", 1)[1] if "." in name else None, "model." + name):
            if cand and cand in self.base.keys():
                return cand
        return None

    def _known(self, name: str) -> str:
        """The checkpoint's name of a module path `_target` has accepted."""
        found = self._resolve(name)
        assert found is not None, name
        return found

    def _target(self, name: str, key: str, where: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        found = self._resolve(name)
        if found is None:
            raise ModelError(f"{where}: the adapter's {key!r} targets tensor {name!r}, which {self.base.label} "
                             "does not have (is this adapter for another model?)")
        wshape = self.base.header(found).shape
        if shape is not None and tuple(shape) != tuple(wshape):
            raise ModelError(f"{where}: shape mismatch for {name}: the model has {list(wshape)}, the adapter's "
                             f"{key!r} has {list(shape)}")
        return wshape
