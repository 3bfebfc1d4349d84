"""A merge's plan and license verdict without merging: what a pull request check shows.

Parents' metadata is read (Hub: model info at the requested revision; local: README front matter) and the
license analysis runs exactly as before a publish. The tensor-level plan needs the weights' headers, so it is
built only when every parent is a local directory: Hub weights are downloaded by a real merge, never by a PR.
The plan's lines are job-summary Markdown; every value in them that a config or a parent supplied (refs,
licenses, stage names, warnings) is escaped with `runner_log.md_code`/`md_text` as the line is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergebot.action.runner_log import md_code, md_text
from mergebot.builds import build_for
from mergebot.builds.base import MergeOptions
from mergebot.card.licenses import LicensePolicy, LicenseReport, analyze
from mergebot.config.configfile import Config
from mergebot.errors import MergebotError
from mergebot.hub.parents import ParentInfo, parent_from_hub, parent_from_local
from mergebot.io.local import is_local


@dataclass
class DryRunPlan:
    lines: list[str] = field(default_factory=list)  # Markdown list items for the summary (values escaped)
    report: LicenseReport | None = None
    problems: list[str] = field(default_factory=list)  # what would make the real merge fail


def read_parents(cfg: Config, *, endpoint: str,
                 token: str | None) -> list[ParentInfo]:
    base = str(cfg.base_model) if cfg.base_model else None
    search = [Path(cfg.file).resolve().parent]
    out = []
    for ref in cfg.referenced_models():
        role = "base" if str(ref) == base else "input"
        local = is_local(ref, search)
        if local is not None:
            out.append(parent_from_local(local, ref=str(ref), role=role))
        else:
            out.append(parent_from_hub(ref.path, revision=ref.revision, endpoint=endpoint, token=token or None,
                                       role=role, ref=str(ref)))
    return out


def dry_run(cfg: Config, repo: str, *, endpoint: str, token: str | None,
            device: str = "cpu") -> DryRunPlan:
    plan = DryRunPlan()
    plan.lines.append(f"method {md_code(cfg.method_name)} → {md_code(repo)}")
    try:
        parents = read_parents(cfg, endpoint=endpoint, token=token)
    except MergebotError as e:
        plan.problems.append(str(e))
        return plan
    for p in parents:
        where = f"Hub @ {md_code(p.sha[:12])}" if p.is_hub and p.sha else "local directory"
        plan.lines.append(f"parent {md_code(p.ref)} ({md_text(p.role)}): {where}, "
                          f"license {md_code(p.license or 'missing')}")
    plan.report = analyze(parents, repo_name=repo.split("/")[-1], policy=LicensePolicy())
    r = plan.report
    plan.lines.append(f"license: {md_code(r.license)}" + (f" ({md_text(r.license_name)})" if r.license_name else "")
                      + f", verdict **{md_text(r.verdict)}**")
    plan.lines += [f"license: {md_text(reason)}" for reason in r.reasons]
    # headers only: Hub parents are read with HTTP range requests, no tensor data is downloaded
    options = MergeOptions(device="cpu", progress=False, token=token)
    try:
        plan.lines += build_for(cfg).prepare(options, headers_only=True).markdown(md_text, md_code, device)
    except MergebotError as e:
        plan.problems.append(str(e))
    return plan
