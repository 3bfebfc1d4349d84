"""mergekit-multi files (merge-semantics.md §5.7): every stage built in dependency order, the intermediates into a
scratch directory beside OUT_DIR that is removed afterwards, so a failure at any stage leaves OUT_DIR untouched
(the final stage is written atomically like any merge).

The published lock lists the leaf parents of every stage (intermediates excluded), so a schedule re-merges the
file when any of them moves; the config hash and `mergekit_config.yml` are the whole file.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergebot.builds.base import Build, BuildResult, ConfigBuild, MergeOptions, ParentSource, PreparedPlan
from mergebot.builds.dense import DenseBuild
from mergebot.builds.moe.write import MoeBuild
from mergebot.config.multi import MultiConfig, Stage
from mergebot.engine.executor import RunStats
from mergebot.io.local import named_models
from mergebot.io.lockfile import Lock, write_lock
from mergebot.io.output import check_target

# the kinds a stage may be (a mergekit-multi file's documents are merges or mergekit-moe configs)
STAGE_BUILDS: dict[str, Callable[[Any], Build]] = {"merge": DenseBuild, "moe": MoeBuild}


def stage_build(stage: Stage) -> Build:
    return STAGE_BUILDS[stage.cfg.kind](stage.cfg)


@dataclass
class MultiResult:
    """The file's result (the last stage's output, in out_dir) and every stage's, in build order."""

    stages: list[BuildResult]
    intermediates: frozenset[str]  # the stages' names: references to them are no parents
    lock: dict[str, Any]

    @property
    def final(self) -> BuildResult:
        return self.stages[-1]

    @property
    def out_dir(self) -> Path | None:
        return self.final.out_dir

    @property
    def stats(self) -> RunStats:
        return self.final.stats

    @property
    def peak_rss_bytes(self) -> int:
        return self.final.peak_rss_bytes

    @property
    def warnings(self) -> list[str]:
        return self.final.warnings

    @property
    def plan_warnings(self) -> list[str]:
        return self.final.plan_warnings

    def parents(self) -> list[ParentSource]:
        """The leaf parents of every stage: an intermediate's licenses are its parents'."""
        out: list[ParentSource] = []
        seen: set[str] = set()
        for result in self.stages:
            skip = self.intermediates | seen
            for p in result.parents():
                if p.key in skip or p.resolved.ref.path in skip:
                    continue
                out.append(p)
                seen.add(p.key)
                if p.adapter is not None:
                    seen.add(str(p.adapter.ref))
        return out


@dataclass
class MultiPlan:
    """Each stage's plan; a stage that reads an earlier one's output is planned when that output exists."""

    sections: list[tuple[Stage, PreparedPlan | None]]
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = []
        for i, (stage, plan) in enumerate(self.sections, 1):
            lines.append(f"== stage {i}/{len(self.sections)}: {stage.name or 'result'} ({stage.cfg.method_name})")
            if plan is None:  # its inputs do not exist yet
                lines.append(f"reads the output of {', '.join(map(repr, stage.needs))} (built first): its tensor "
                             "plan is made once they exist")
            else:
                lines += plan.describe()
        return lines

    def markdown(self, text: Callable[[str], str], code: Callable[[str], str], device: str) -> list[str]:
        lines = []
        for stage, plan in self.sections:
            prefix = (f"stage {code(stage.name or 'result')} ({text(stage.cfg.method_name)}): "
                      if len(self.sections) > 1 else "")
            if plan is None:
                lines.append(prefix + "reads " + ", ".join(code(n) for n in stage.needs)
                             + " (built first); planned when the merge runs")
            else:
                lines += [prefix + line for line in plan.markdown(text, code, device)]
        return lines


@contextmanager
def _scratch(out_dir: Path) -> Iterator[Path]:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stages-", dir=out_dir.parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _lock(mc: MultiConfig, results: list[BuildResult]) -> Lock:
    """The result's lock, with every stage's leaf parents and each stage's method, parents and seed."""
    parents: dict[str, dict[str, Any]] = {}
    stages = []
    for stage, res in zip(mc.stages, results):
        for p in res.lock.get("parents", []):
            if p.get("ref") not in mc.names:
                parents.setdefault(p["ref"], p)
        stages.append({"name": stage.name, "merge_method": res.lock.get("merge_method"),
                       "parents": [p["ref"] for p in res.lock.get("parents", [])],
                       "random_seed": res.lock.get("random_seed")})
    return replace(Lock.of(results[-1].lock), kind="multi", config_sha256=mc.sha256, parents=list(parents.values()),
                   stages=stages)


class MultiBuild(ConfigBuild[MultiConfig]):
    def prepare(self, options: MergeOptions, *, headers_only: bool = False) -> MultiPlan:
        sections: list[tuple[Stage, PreparedPlan | None]] = []
        warnings: list[str] = []
        for stage in self.config.stages:
            plan = None if stage.needs else stage_build(stage).prepare(options, headers_only=headers_only)
            sections.append((stage, plan))
            warnings += plan.warnings if plan is not None else []
        return MultiPlan(sections, warnings)

    def run(self, out_dir: Path, options: MergeOptions) -> MultiResult:
        """Build every stage (intermediates into a scratch dir, the result into out_dir)."""
        mc = self.config
        check_target(out_dir, options.force)
        results: list[BuildResult] = []
        built: dict[str, Path] = {}
        with _scratch(out_dir) as scratch:
            for stage in mc.stages:
                last = stage is mc.final
                target = out_dir if last else scratch / (stage.name or "result")
                with named_models(built):
                    results.append(stage_build(stage).run(target, options if last else replace(options, force=True)))
                if stage.name:
                    built[stage.name] = target
        lock = _lock(mc, results).as_dict()
        write_lock(out_dir, lock)
        return MultiResult(results, frozenset(mc.names), lock)
