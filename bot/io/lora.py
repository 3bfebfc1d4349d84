"""`model+lora` references (merge-semantics.md §1.1): a PEFT LoRA adapter folded into its base while streaming.

mergekit merges the adapter with PEFT `merge_and_unload` into a `--lora-merge-cache` directory first. mergebot
needs neither PEFT nor a cache: `LoraWeights` wraps the base model's `ModelWeights` and, when the executor asks
for an adapted tensor, returns

    W + scale · (B @ A)            (transposed for fan_in_fan_out / GPT-2 Conv1D layers)

with scale = lora_alpha / r, or lora_alpha / √r with `use_rslora` (`rank_pattern`/`alpha_pattern` override r and
alpha per module, matched as PEFT does). The fold runs in float32 (float64 for float64 weights) and is cast back
to W's dtype once, one tensor at a time; nothing is cached. Also folded, as `merge_and_unload` does:
embedding LoRAs (`lora_embedding_A/B`), LoRA biases (`lora_B.bias`: bias + scale · b) and full tensors saved with
the adapter (`modules_to_save`, trained biases), which replace the base tensor. DoRA and non-LoRA PEFT types are
refused with a clear error. Every check (missing files, targets the model lacks, shapes) runs when the model is
loaded, i.e. before anything is written.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergebot.config.refs import ModelRef, is_repo_id
from mergebot.errors import ModelError
from mergebot.io.weights import ModelWeights, TensorInfo, load_bin_tensors
from mergebot.hub.fetch import ResolvedModel, is_local, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
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
    a: str | None = None  # adapter tensor names
    b: str | None = None
    scale: float = 1.0
    transpose: bool = False


def resolve_adapter(ref: ModelRef, search: list[Path] | None = None, *, download: bool = True,
                    token: str | None = None) -> ResolvedModel:
    """Find a PEFT adapter: a local directory, or a Hub repo pinned to a commit sha (only the adapter files).

    `ResolvedModel.config` holds adapter_config.json (adapters have no config.json, which `sources.resolve`
    requires, hence this sibling of it)."""
    local = is_local(ref, search or [])
    if local is not None:
        if ref.revision:
            raise ModelError(f"LoRA {ref}: a revision (@{ref.revision}) only applies to Hub repos; "
                             f"{local} is a local directory")
        return ResolvedModel(ref, local, False, None, _adapter_config(local, ref))
    if not is_repo_id(ref.path):
        raise ModelError(f"LoRA {ref}: no such local directory, and not a Hugging Face repo id")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = os.environ.get("HF_ENDPOINT")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(ref.path, revision=ref.revision, files_metadata=False)
    except GatedRepoError:
        raise ModelError(f"LoRA {ref}: gated repo on the Hub: accept its terms and use a token with access") from None
    except RepositoryNotFoundError:
        raise ModelError(f"LoRA {ref}: not a local directory, and no such repo on the Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelError(f"LoRA {ref}: revision {ref.revision!r} not found on the Hub") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"LoRA {ref}: cannot reach the Hub: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    names = {s.rfilename for s in (info.siblings or [])}
    if ADAPTER_CONFIG not in names:
        raise ModelError(f"LoRA {ref}: the Hub repo has no {ADAPTER_CONFIG}: not a PEFT adapter")
    if ADAPTER_SAFETENSORS not in names and ADAPTER_BIN not in names:
        raise ModelError(f"LoRA {ref}: the Hub repo has no {ADAPTER_SAFETENSORS} (or {ADAPTER_BIN})")
    patterns = [ADAPTER_CONFIG]
    if download:
        patterns.append(ADAPTER_SAFETENSORS if ADAPTER_SAFETENSORS in names else ADAPTER_BIN)
    try:
        d = Path(snapshot_download(ref.path, revision=info.sha, allow_patterns=patterns, token=token,
                                   endpoint=endpoint))
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"LoRA {ref}: download failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return ResolvedModel(ref, d, True, info.sha, _adapter_config(d, ref))


def _adapter_config(directory: Path, ref: ModelRef) -> dict:
    return read_json_object(directory, ADAPTER_CONFIG, f"LoRA {ref}", ": not a PEFT adapter directory")


def _adapter_tensors(adapter: ResolvedModel, *, headers_only: bool, token: str | None) -> ModelWeights:
    label = f"LoRA {adapter.ref}"
    w = ModelWeights(adapter.directory, label, discover=False)
    if adapter.is_hub and headers_only:  # dry run: the header via HTTP range requests, no tensor data
        w.add_hub_safetensors(adapter.ref.path, ADAPTER_SAFETENSORS, adapter.sha, token, os.environ.get("HF_ENDPOINT"))
        return w
    st, binf = adapter.directory / ADAPTER_SAFETENSORS, adapter.directory / ADAPTER_BIN
    if st.exists():
        w._add_safetensors(st)
    elif binf.exists():
        real, w._bin = load_bin_tensors(adapter.directory, ADAPTER_BIN, label)  # weights_only, flat dict only
        for k, v in w._bin.items():
            w.tensors[k] = TensorInfo(k, v.dtype, tuple(v.shape), real, 0, v.numel() * v.element_size())
    else:
        raise ModelError(f"{label}: no {ADAPTER_SAFETENSORS} (or {ADAPTER_BIN}) in {adapter.directory}")
    return w


def _pattern(patterns: dict, module: str):
    """PEFT's `get_pattern_key`: the first key k with `(.*\\.)?k$` matching the module name."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return None


class LoraWeights:
    """A `ModelWeights` look-alike: the base model's tensors, adapted ones folded on `get` (§1.1)."""

    def __init__(self, base: ModelWeights, adapter: ResolvedModel, adapter_tensors: ModelWeights, model_config: dict):
        self.base = base
        self.adapter = adapter
        self.lora = adapter_tensors
        self.label = base.label
        self.directory = base.directory
        self.tensors = base.tensors
        self.folds: dict[str, list[_Fold]] = {}
        self._plan(model_config)

    # --------------------------------------------------------------------------------- ModelWeights API
    def has(self, name: str) -> bool:
        return self.base.has(name)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

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
        r0 = cfg.get("r", 8)
        alpha0 = cfg.get("lora_alpha", 8)
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        conv1d_model = model_config.get("model_type") in CONV1D_MODEL_TYPES

        lora_parts: dict[str, dict[str, str]] = {}
        for key in self.lora.tensors:
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
            self._target(rel, key, where, self.lora.info(key).shape)
            self.folds.setdefault(self._resolve(rel), []).insert(0, _Fold("replace", a=key))

        for module, parts in lora_parts.items():
            r = _pattern(cfg.get("rank_pattern"), module) or r0
            alpha = _pattern(cfg.get("alpha_pattern"), module) or alpha0
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            emb = "lora_embedding_A.weight" in parts or "lora_embedding_B.weight" in parts
            ka, kb = ("lora_embedding_A.weight", "lora_embedding_B.weight") if emb else ("lora_A.weight", "lora_B.weight")
            if ka not in parts or kb not in parts:
                missing = ka if ka not in parts else kb
                raise ModelError(f"{where}: module {module!r} has no {missing.split('.')[0]} tensor")
            a, b = parts[ka], parts[kb]
            sa, sb = self.lora.info(a).shape, self.lora.info(b).shape
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
            self.folds.setdefault(self._resolve(target), []).append(
                _Fold("embedding" if emb else "linear", a, b, scale, transpose))
            if "lora_B.bias" in parts:
                bias = module + ".bias"
                bshape = self._target(bias, parts["lora_B.bias"], where)
                if tuple(bshape) != tuple(self.lora.info(parts["lora_B.bias"]).shape):
                    raise ModelError(f"{where}: shape mismatch for {bias}: the model has {list(bshape)}, the "
                                     f"adapter's lora_B.bias has {list(self.lora.info(parts['lora_B.bias']).shape)}")
                self.folds.setdefault(self._resolve(bias), []).append(_Fold("bias", b=parts["lora_B.bias"], scale=scale))

    def _resolve(self, name: str) -> str | None:
        """The checkpoint's name for a module path: as is, or without/with the base-model prefix (legacy GPT-2
        checkpoints say `h.0.attn.c_attn` where the module path is `transformer.h.0.attn.c_attn`)."""
        for cand in (name, name.split(".", 1)[1] if "." in name else None, "model." + name):
            if cand and self.base.has(cand):
                return cand
        return None

    def _target(self, name: str, key: str, where: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        found = self._resolve(name)
        if found is None:
            raise ModelError(f"{where}: the adapter's {key!r} targets tensor {name!r}, which {self.base.label} "
                             "does not have (is this adapter for another model?)")
        wshape = self.base.info(found).shape
        if shape is not None and tuple(shape) != tuple(wshape):
            raise ModelError(f"{where}: shape mismatch for {name}: the model has {list(wshape)}, the adapter's "
                             f"{key!r} has {list(shape)}")
        return wshape


def with_lora(base: ModelWeights, ref: ModelRef, model_config: dict, search: list[Path] | None = None, *,
              token: str | None = None, headers_only: bool = False) -> LoraWeights:
    """The `+lora` part of `ref` folded over `base` (the weights of `ref` without its LoRA)."""
    assert ref.lora is not None
    adapter = resolve_adapter(ref.lora, search, download=not headers_only, token=token)
    tensors = _adapter_tensors(adapter, headers_only=headers_only, token=token)
    return LoraWeights(base, adapter, tensors, model_config)
