"""The MoE build (mergekit-moe, merge-semantics.md §3): gate vectors first, then the output streamed: base tensors
copied, and each expert's gate/up/down rows written straight into their slice of the fused
`experts.gate_up_proj` / `experts.down_proj` in the mmap'd output shard, one expert tensor at a time, so memory
stays near one expert matrix whatever the number of experts.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebot.builds.base import ConfigBuild, MergeOptions, ParentSource, peak_rss, start, streamed_shards
from mergebot.builds.moe import layout as L
from mergebot.builds.moe.gates import NOISE_CHUNK, GateVectors, compute_gates, normal
from mergebot.builds.moe.plan import MoePlan, prepare_moe
from mergebot.config.moe import Expert, MoeConfig
from mergebot.engine.dtypes import dtype_name
from mergebot.engine.executor import RunStats
from mergebot.errors import ModelError
from mergebot.io.lockfile import Lock, ParentPin, write_lock
from mergebot.io.output import check_target, drop_remote_code, staged_output, write_json
from mergebot.io.writer import ShardedWriter, ShardEntry
from mergebot.tokenizer.files import write_moe_tokenizer


@dataclass
class MoeResult:
    out_dir: Path | None
    plan: MoePlan
    stats: RunStats
    peak_rss_bytes: int
    lock: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    gates: GateVectors | None = None

    @property
    def plan_warnings(self) -> list[str]:
        return self.plan.warnings

    def parents(self) -> list[ParentSource]:
        base = self.lock.get("base_model")
        return [ParentSource(key, r, "base" if key == base else "input") for key, r in self.plan.resolved.items()]


# --------------------------------------------------------------------------------------------- writing

def write_expert(dest: torch.Tensor, src: torch.Tensor, expert: Expert, *, residual: bool, seed: int,
                 slot: int, source: str) -> None:
    """dest ← (src + N(0,1)·noise_scale) · residual_scale (down_proj only), in row chunks (§3.5)."""
    noise = expert.noise_scale
    scale = expert.residual_scale if residual else None
    if not noise and scale is None:
        dest.copy_(src)
        return
    rows, cols = src.shape
    step = max(1, NOISE_CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        x = src[r:r + step].float()
        if noise:
            x = x + normal(seed, "moe.noise:" + source, slot, r * cols, x.numel()).view_as(x) * noise
        if scale is not None:
            x = x * scale
        dest[r:r + step].copy_(x)


def write_tensors(plan: MoePlan, writer: ShardedWriter, gates: GateVectors, seed: int,
                  progress: Any = None) -> RunStats:
    stats = RunStats()
    start = time.perf_counter()
    cfg, I = plan.cfg, plan.intermediate
    bw = plan.weights[plan.base]
    E = len(cfg.experts)
    slots = [(e, plan.weights[str(e.source_model)]) for e in cfg.experts]
    shared = [(e, plan.weights[str(e.source_model)]) for e in cfg.shared_experts]
    for t in plan.tensors:
        dest = writer.view(t.name)
        if t.kind == "copy":
            dest.copy_(bw.get(t.source).reshape(-1))
            bw.release(t.source)
        elif t.kind == "zeros":
            dest.zero_()
        elif t.kind == "router":
            dest.copy_(gates.routed[t.layer].reshape(-1))
        elif t.kind == "shared_router":
            if gates.shared is None:
                raise ModelError(f"{t.name}: the shared expert has no gate vector (give it positive_prompts)")
            dest.copy_(gates.shared[t.layer, 0].reshape(-1))
        elif t.kind in ("gate_up", "down"):
            out = dest.view(t.shape)
            parts = (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))) if t.kind == "gate_up" \
                else (("down_proj", slice(None)),)
            for _expert, w in slots:
                for proj, _ in parts:
                    w.prefetch(L.mlp_source(t.layer, proj))
            for e, (expert, w) in enumerate(slots):
                for proj, rows in parts:
                    src = L.mlp_source(t.layer, proj)
                    write_expert(out[e, rows], w.get(src), expert, residual=proj == "down_proj", seed=seed,
                                 slot=e, source=src)
                    w.release(src)
        elif t.kind == "shared":
            expert, w = shared[0]
            src = L.mlp_source(t.layer, t.source)
            write_expert(dest.view(t.shape), w.get(src), expert, residual=t.source == "down_proj", seed=seed,
                         slot=E, source=src)
            w.release(src)
        else:  # pragma: no cover
            raise AssertionError(t.kind)
        writer.done(t.name)
        nbytes = dest.numel() * dest.element_size()
        stats.tensors += 1
        stats.bytes_written += nbytes
        if progress:
            progress(nbytes)
    stats.seconds = time.perf_counter() - start
    return stats


def make_moe_lock(plan: MoePlan, seed: int | None, device: torch.device, gates: GateVectors | None = None) -> Lock:
    """The dense merge's record, kind "moe", with the MoE's own keys after the common ones."""
    cfg = plan.cfg
    parents = [ParentPin(key, r.ref.revision, r.sha, not r.is_hub, plan.roles[key]).as_dict()
               for key, r in plan.resolved.items()]
    return Lock(config_sha256=cfg.sha256, kind="moe", merge_method="moe", base_model=plan.base, parents=parents,
                dtype=cfg.dtype, out_dtype=dtype_name(plan.out_dtype), random_seed=seed, device=device.type,
                details={"architecture": plan.arch.class_name, "gate_mode": cfg.gate_mode,
                         "experts_per_token": cfg.experts_per_token,
                         "experts": [str(e.source_model) for e in cfg.experts],
                         "shared_experts": [str(e.source_model) for e in cfg.shared_experts],
                         "gate_tokenizer": gates.tokenizer if gates else None})


def run_moe(cfg: MoeConfig, out_dir: Path, options: MergeOptions, *, allow_all_same: bool = False) -> MoeResult:
    """Build the MoE into out_dir atomically (staged beside it; an existing out_dir only with options.force)."""
    out_dir = Path(out_dir)
    check_target(out_dir, options.force)
    device = start(options)
    plan = prepare_moe(cfg, options, allow_all_same=allow_all_same)
    seed = options.random_seed if options.random_seed is not None else (
        secrets.randbits(63) if plan.uses_rng else None)
    base = plan.resolved[plan.base]
    gates = compute_gates(cfg.gate_mode, base, plan.weights[plan.base], cfg.experts, cfg.shared_experts,
                          layers=plan.layers, hidden=plan.hidden, seed=seed or 0, device=str(device))
    entries = [ShardEntry(t.name, plan.out_dtype, t.shape, t.numel * torch.empty(0, dtype=plan.out_dtype).element_size())
               for t in plan.tensors]
    reads = [Path(cfg.file)] + [r.directory for r in plan.resolved.values()]
    with staged_output(out_dir, options.force, reads) as work:
        with streamed_shards(work, entries, options, plan.total_bytes) as (writer, progress):
            stats = write_tensors(plan, writer, gates, seed or 0, progress)
        write_json(work / "config.json", plan.out_config)
        write_moe_tokenizer(base.directory, plan.resolved[plan.tokenizer_donor].directory, work,
                            options.copy_tokenizer)
        plan.warnings.extend(drop_remote_code(work))
        (work / "mergekit_moe_config.yml").write_text(cfg.text, encoding="utf-8")
        lock = make_moe_lock(plan, seed, device, gates).as_dict()
        write_lock(work, lock)
    return MoeResult(out_dir, plan, stats, peak_rss(), lock, cfg.warnings + plan.warnings + gates.warnings, gates)


# ------------------------------------------------------------------------------------------------- the Build

class MoeBuild(ConfigBuild[MoeConfig]):
    def prepare(self, options: MergeOptions, *, headers_only: bool = False) -> MoePlan:
        """The MoE's plan; it reads its parents' files in full (the gates need the base's weights later)."""
        return prepare_moe(self.config, options, allow_all_same=options.allow_all_same_experts)

    def run(self, out_dir: Path, options: MergeOptions) -> MoeResult:
        return run_moe(self.config, out_dir, options, allow_all_same=options.allow_all_same_experts)
