"""Dense merges (mergekit-yaml configs): config -> resolve models -> plan -> stream-merge -> finished output dir."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebot.builds.base import ConfigBuild, MergeOptions, ParentSource, peak_rss, start, streamed_shards
from mergebot.config.dense import MergeConfig
from mergebot.engine.dtypes import dtype_name, torch_dtype
from mergebot.engine.executor import CHUNK, RunStats, run_plan
from mergebot.engine.plan import Plan, build_plan
from mergebot.errors import NotSupportedYet
from mergebot.hub import fetch
from mergebot.hub.fetch import resolve
from mergebot.io.local import ResolvedModel
from mergebot.io.lockfile import Lock, ParentPin, write_lock
from mergebot.io.output import check_target, copy_parent_licenses, drop_remote_code, staged_output, write_json
from mergebot.io.reader import TensorReader
from mergebot.io.writer import ShardEntry
from mergebot.tokenizer.files import write_tokenizer_files
from mergebot.tokenizer.vocab import OutputVocab, build_output_vocab
from mergebot.units import human_bytes


@dataclass
class MergeResult:
    out_dir: Path | None
    plan: Plan
    stats: RunStats
    peak_rss_bytes: int
    lock: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def plan_warnings(self) -> list[str]:
        return self.plan.warnings

    def parents(self) -> list[ParentSource]:
        base = self.lock.get("base_model")
        return [ParentSource(key, r, "base" if key == base else "input", self.plan.models[key].adapter)
                for key, r in self.plan.resolved.items()]


def refuse_pending(cfg: MergeConfig) -> None:
    if cfg.pending:
        raise NotSupportedYet(f"{cfg.file}: {', '.join(cfg.pending)}: valid config language, but not supported "
                              "by this version of mergebot's engine yet (mergebot validate accepts it)")


def load_models(cfg: MergeConfig, options: MergeOptions,
                headers_only: bool = False) -> tuple[dict[str, ResolvedModel], dict[str, TensorReader]]:
    """Resolve every model and open its tensors (a `model+lora` with the adapter folded in while streaming,
    mergebot.io.lora, §1.1); `headers_only` (dry runs) downloads no tensor data from the Hub."""
    search = [Path(cfg.file).resolve().parent]
    resolved: dict[str, ResolvedModel] = {}
    readers: dict[str, TensorReader] = {}
    stream = None if headers_only else options.stream
    for ref in cfg.referenced_models():
        if stream is not None:  # Hub parents: small files only, tensors by range (mergebot.hub.stream)
            r = resolved[str(ref)] = stream.resolve(ref, search)
            readers[str(ref)] = stream.reader(ref, r)
            continue
        r = resolve(ref, search, token=options.token, download=not headers_only)
        resolved[str(ref)] = r
        readers[str(ref)] = fetch.weights(ref, r, search, headers_only=headers_only, token=options.token)
    return resolved, readers


def settle_tokenizer(cfg: MergeConfig, resolved: dict[str, ResolvedModel], options: MergeOptions | None = None,
                     headers_only: bool = False) -> OutputVocab | None:
    """The output vocabulary when the config asks for the tokenizer path (`tokenizer_source` or `tokenizer:`,
    §4): built from the parents' tokenizer.json files, with each parent's permutation. None otherwise, and
    then parents with different vocabulary sizes stay a "tensor size mismatch" error (§2.0)."""
    return build_output_vocab(cfg, resolved, token=options.token if options else None, download=not headers_only)


def prepare(cfg: MergeConfig, options: MergeOptions, headers_only: bool = False) -> Plan:
    """Validate against the real models (headers only) and build the plan."""
    if any(not p.startswith("tokenizer_source") for p in cfg.pending):
        refuse_pending(cfg)
    resolved, weights = load_models(cfg, options, headers_only)
    vocab = settle_tokenizer(cfg, resolved, options, headers_only)
    refuse_pending(cfg)
    return build_plan(cfg, resolved, weights, vocab=vocab)


def make_lock(cfg: MergeConfig, plan: Plan, seed: int | None, device: torch.device, rng: str = "hash") -> Lock:
    parents = []
    base = str(cfg.base_model) if cfg.base_model else None
    for key, r in plan.resolved.items():
        parents.append(ParentPin(key, r.ref.revision, r.sha, not r.is_hub, "base" if key == base else "input"))
        adapter = plan.models[key].adapter
        if adapter is not None:
            parents.append(ParentPin(str(adapter.ref), adapter.ref.revision, adapter.sha, not adapter.is_hub, "lora",
                                     of=key))
    return Lock(config_sha256=cfg.sha256, kind="merge", merge_method=cfg.method_name, base_model=base,
                parents=[p.as_dict() for p in parents], dtype=cfg.dtype, out_dtype=cfg.out_dtype, random_seed=seed,
                rng=rng if plan.method.uses_rng else None, device=device.type)


def run_merge(cfg: MergeConfig, out_dir: Path, options: MergeOptions) -> MergeResult:
    """Merge into out_dir atomically. Nothing is written before the plan is known to be sound."""
    check_target(out_dir, options.force)
    device = start(options)
    plan = prepare(cfg, options)
    uses_rng = plan.method.uses_rng
    if options.rng == "mergekit" and uses_rng:
        plan.jobs.sort(key=lambda j: j.name)  # mergekit draws in sorted-name order (§2.7)
    seed = options.random_seed if options.random_seed is not None else (secrets.randbits(63) if uses_rng else None)
    entries = [ShardEntry(j.name, j.out_dtype, j.shape, j.nbytes) for j in plan.jobs]
    if options.stream is not None:
        options.stream.plan_reads(plan)  # the read-ahead follows the executor's job order
    reads = [Path(cfg.file)] + [r.directory for r in plan.resolved.values()] + [
        m.adapter.directory for m in plan.models.values() if m.adapter is not None]
    with staged_output(out_dir, options.force, reads) as work:
        with streamed_shards(work, entries, options, plan.total_bytes) as (writer, progress):
            stats = run_plan(plan, writer, load_dtype=torch_dtype(cfg.dtype), seed=seed or 0, device=device,
                             progress=progress, compile=options.compile, rng=options.rng)
        write_json(work / "config.json", plan.out_config)
        plan.warnings.extend(write_tokenizer_files(  # §4.5 / §5.6, then chat_template
            cfg, plan.vocab, plan.resolved[plan.donor].directory, [r.directory for r in plan.resolved.values()],
            work, copy_tokenizer=options.copy_tokenizer))
        plan.warnings.extend(drop_remote_code(work))
        copy_parent_licenses({k: r.directory for k, r in plan.resolved.items()}, work)
        (work / "mergekit_config.yml").write_text(cfg.text, encoding="utf-8")
        lock = make_lock(cfg, plan, seed, device, options.rng).as_dict()
        write_lock(work, lock)
    return MergeResult(out_dir, plan, stats, peak_rss(), lock, cfg.warnings + plan.warnings)


# ------------------------------------------------------------------------------------------------- the Build

@dataclass
class DensePlan:
    """A dense merge's plan as `--dry-run` prints it and the Action's pull-request summary shows it."""

    plan: Plan

    @property
    def warnings(self) -> list[str]:
        return self.plan.warnings

    def describe(self) -> list[str]:
        plan = self.plan
        lines = [f"method: {plan.method.name}    donor (config.json, tokenizer): {plan.donor}"]
        for key, r in plan.resolved.items():
            lines.append(f"  input: {key}  ({'hub @ ' + str(r.sha) if r.is_hub else r.directory})")
        lines.append(f"{'tensor':60s} {'shape':>16s} {'dtype':>9s}  parameters")
        for j in plan.jobs:
            params = dict(j.shared)
            for inp, p in zip(j.inputs, j.per_input):
                for k, v in p.items():
                    params[f"{k}[{inp.model}]"] = round(v, 5) if isinstance(v, float) else v
            desc = "copy" if j.copy else ", ".join(f"{k}={round(v, 5) if isinstance(v, float) else v}"
                                                   for k, v in params.items())
            lines.append(f"{j.name:60s} {str(list(j.shape)):>16s} {dtype_name(j.out_dtype):>9s}  {desc}")
        biggest = max((j.numel for j in plan.jobs), default=0)
        work = min(biggest, CHUNK) * 4 * (max((len(j.inputs) for j in plan.jobs), default=1) + 3)
        lines.append(f"output: {len(plan.jobs)} tensors, {human_bytes(plan.total_bytes)}; reads "
                     f"{human_bytes(plan.input_bytes)}; estimated peak working memory {human_bytes(work + 200e6)}")
        return lines

    def markdown(self, text: Callable[[str], str], code: Callable[[str], str], device: str) -> list[str]:
        plan = self.plan
        return ([f"output: {len(plan.jobs)} tensors, {human_bytes(plan.total_bytes)}; "
                 f"reads {human_bytes(plan.input_bytes)}; device {code(device)}"]
                + [f"note: {text(w)}" for w in plan.warnings])


class DenseBuild(ConfigBuild[MergeConfig]):
    def prepare(self, options: MergeOptions, *, headers_only: bool = False) -> DensePlan:
        return DensePlan(prepare(self.config, options, headers_only=headers_only))

    def run(self, out_dir: Path, options: MergeOptions) -> MergeResult:
        return run_merge(self.config, out_dir, options)
