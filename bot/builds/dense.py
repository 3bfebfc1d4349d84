"""The engine's front door: config -> resolve models -> plan -> stream-merge -> finished output dir."""

from __future__ import annotations

import os
import resource
import secrets
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from mergebot import __version__
from mergebot.config.dense import MergeConfig
from mergebot.errors import MergebotError, NotSupportedYet
from mergebot.engine.executor import RunStats, run_plan
from mergebot.io.weights import ModelWeights
from mergebot.io.output import check_target, copy_parent_licenses, staged_output, write_json
from mergebot.engine.dtypes import torch_dtype
from mergebot.engine.plan import Plan, build_plan
from mergebot.hub.fetch import ResolvedModel, resolve
from mergebot.tokenizer.files import write_tokenizer_files
from mergebot.tokenizer.vocab import OutputVocab, build_output_vocab
from mergebot.io.writer import ShardEntry, ShardedWriter

DEFAULT_SHARD = 5_000_000_000


@dataclass
class MergeOptions:
    out_shard_size: int = DEFAULT_SHARD
    device: str = "cpu"  # auto | cpu | cuda[:N]
    random_seed: int | None = None
    force: bool = False
    copy_tokenizer: bool = True
    progress: bool = True
    token: str | None = field(default=None, repr=False)  # never in a repr, hence never in a log or traceback
    threads: int | None = None
    compile: str = "auto"  # auto | on | off: fuse method kernels with torch.compile (mergebot.engine.fuse)
    allow_all_same_experts: bool = False  # MoE: every expert the same model (only useful with training)
    rng: str = "hash"  # hash (order-independent, mergebot.engine.rng) | mergekit (DARE masks with mergekit 0.1.5's bits)


@dataclass
class MergeResult:
    out_dir: Path | None
    plan: Plan
    stats: RunStats
    peak_rss_bytes: int
    lock: dict
    warnings: list[str] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergebotError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    return dev


def refuse_pending(cfg: MergeConfig) -> None:
    if cfg.pending:
        raise NotSupportedYet(f"{cfg.file}: {', '.join(cfg.pending)}: valid config language, but not supported "
                              "by this version of mergebot's engine yet (mergebot validate accepts it)")


def load_models(cfg: MergeConfig, options: MergeOptions,
                headers_only: bool = False) -> tuple[dict[str, ResolvedModel], dict[str, ModelWeights]]:
    """Resolve every model; `headers_only` (dry runs) downloads no tensor data from the Hub."""
    search = [Path(cfg.file).resolve().parent]
    resolved: dict[str, ResolvedModel] = {}
    weights: dict[str, ModelWeights] = {}
    for ref in cfg.referenced_models():
        r = resolve(ref, search, token=options.token, download=not headers_only)
        resolved[str(ref)] = r
        if r.is_hub and headers_only:
            weights[str(ref)] = ModelWeights.from_hub_headers(ref.path, r.sha or "main", str(ref), options.token,
                                                              os.environ.get("HF_ENDPOINT"))
        else:
            weights[str(ref)] = ModelWeights(r.directory, str(ref))
        if ref.lora is not None:  # `model+lora`: the adapter folded in while streaming (mergebot.io.lora, §1.1)
            from mergebot.io.lora import with_lora
            weights[str(ref)] = with_lora(weights[str(ref)], ref, r.config, search, token=options.token,
                                          headers_only=headers_only)
    return resolved, weights


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


def make_lock(cfg: MergeConfig, plan: Plan, seed: int | None, device: torch.device, rng: str = "hash") -> dict:
    parents = []
    base = str(cfg.base_model) if cfg.base_model else None
    for key, r in plan.resolved.items():
        parents.append({"ref": key, "revision": r.ref.revision, "sha": r.sha, "local": not r.is_hub,
                        "role": "base" if key == base else "input"})
        adapter = getattr(plan.models.get(key), "adapter", None)  # mergebot.io.lora.LoraWeights
        if adapter is not None:
            parents.append({"ref": str(adapter.ref), "revision": adapter.ref.revision, "sha": adapter.sha,
                            "local": not adapter.is_hub, "role": "lora", "of": key})
    return {
        "mergebot_version": __version__,
        "config_sha256": cfg.sha256,
        "kind": "merge",
        "merge_method": cfg.method_name,
        "base_model": base,
        "parents": parents,
        "dtype": cfg.dtype,
        "out_dtype": cfg.out_dtype,
        "random_seed": seed,
        "rng": rng if plan.method.uses_rng else None,
        "device": device.type,
    }  # no timestamp: an unchanged re-merge must give identical files, hence no new Hub commit


def _progress_bar(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr)


@contextmanager
def streamed_shards(work: Path, entries: list[ShardEntry], options: MergeOptions,
                    total: int) -> Iterator[tuple[ShardedWriter, Callable[[int], None] | None]]:
    """The output shards plus a progress callback; closed (fsynced, indexed) on success, aborted on error."""
    bar = _progress_bar(total, options.progress)
    writer = ShardedWriter(work, entries, options.out_shard_size, metadata={"mergebot_version": __version__})
    try:
        yield writer, (bar.update if bar else None)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar:
            bar.close()


def run_merge(cfg: MergeConfig, out_dir: Path, options: MergeOptions) -> MergeResult:
    """Merge into out_dir atomically. Nothing is written before the plan is known to be sound."""
    check_target(out_dir, options.force)
    device = pick_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    plan = prepare(cfg, options)
    uses_rng = plan.method.uses_rng
    if options.rng == "mergekit" and uses_rng:
        plan.jobs.sort(key=lambda j: j.name)  # mergekit draws in sorted-name order (§2.7)
    seed = options.random_seed if options.random_seed is not None else (secrets.randbits(63) if uses_rng else None)
    entries = [ShardEntry(j.name, j.out_dtype, j.shape, j.nbytes) for j in plan.jobs]
    with staged_output(out_dir, options.force) as work:
        with streamed_shards(work, entries, options, plan.total_bytes) as (writer, progress):
            stats = run_plan(plan, writer, load_dtype=torch_dtype(cfg.dtype), seed=seed or 0, device=device,
                             progress=progress, compile=options.compile, rng=options.rng)
        write_json(work / "config.json", plan.out_config)
        plan.warnings.extend(write_tokenizer_files(  # §4.5 / §5.6, then chat_template
            cfg, plan.vocab, plan.resolved[plan.donor].directory, [r.directory for r in plan.resolved.values()],
            work, copy_tokenizer=options.copy_tokenizer))
        copy_parent_licenses({k: r.directory for k, r in plan.resolved.items()}, work)
        (work / "mergekit_config.yml").write_text(cfg.text, encoding="utf-8")
        lock = make_lock(cfg, plan, seed, device, options.rng)
        write_json(work / "mergebot.lock.json", lock)
    peak = peak_rss()
    return MergeResult(out_dir, plan, stats, peak, lock, cfg.warnings + plan.warnings)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM); ru_maxrss would include a forking parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seed_from_env() -> int | None:
    v = os.environ.get("MERGEBOT_RANDOM_SEED")
    return int(v) if v else None
