"""The whole job for one config: merge -> license check -> card -> (optional) one Hub commit.

Used by `mergebot merge --push-to`, `mergebot demo` and the GitHub Action, so all three behave alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergebot.card.render import card_context_from_output, write_card
from mergebot.config.dense import MergeConfig
from mergebot.card.licenses import LicenseOverride, LicensePolicy, LicenseReport, analyze
from mergebot.builds.dense import MergeOptions, MergeResult, run_merge
from mergebot.config.moe import MoeConfig
from mergebot.config.multi import MultiConfig
from mergebot.hub.parents import ParentInfo, parent_from_hub, parent_from_local, resolve_endpoint
from mergebot.hub.publish import LicenseGateError, PublishResult, publish, resolve_token


@dataclass
class PipelineResult:
    out_dir: Path
    merge: MergeResult
    report: LicenseReport
    repo_id: str | None
    published: PublishResult | None


def parents_of(results: list[MergeResult], endpoint: str | None, token: str | None,
               intermediates: frozenset[str] = frozenset()) -> list[ParentInfo]:
    """License metadata of every parent, read where the engine found it (local dir or Hub @ sha). For a
    mergekit-multi file, the leaf parents of every stage: an intermediate's licenses are its parents'."""
    out: list[ParentInfo] = []
    seen: set[str] = set()
    for result in results:
        for p in _parents_of_one(result, endpoint, token, intermediates | seen):
            seen.add(p.ref)
            out.append(p)
    return out


def _parents_of_one(result: MergeResult, endpoint: str | None, token: str | None,
                    skip: frozenset[str] | set[str]) -> list[ParentInfo]:
    base = result.lock.get("base_model")
    out = []
    for key, r in result.plan.resolved.items():
        if key in skip or r.ref.path in skip:
            continue
        role = "base" if key == base else "input"
        if r.is_hub:
            out.append(parent_from_hub(r.ref.path, revision=r.ref.revision, sha=r.sha, endpoint=endpoint,
                                       token=token, role=role, ref=key))
        else:
            out.append(parent_from_local(r.directory, ref=key, role=role))
        adapter = getattr(result.plan.models.get(key), "adapter", None) if hasattr(result.plan, "models") else None
        if adapter is not None:  # a LoRA folded into this parent: its license applies too
            if adapter.is_hub:
                out.append(parent_from_hub(adapter.ref.path, revision=adapter.ref.revision, sha=adapter.sha,
                                           endpoint=endpoint, token=token, role="lora", ref=str(adapter.ref)))
            else:
                out.append(parent_from_local(adapter.directory, ref=str(adapter.ref), role="lora"))
    return out


def license_and_card(results: list[MergeResult], repo_id: str | None, *, endpoint: str | None = None,
                     token: str | None = None, license_id: str | None = None, template: Path | None = None,
                     intermediates: frozenset[str] = frozenset()) -> LicenseReport:
    """Analyse the parents' licenses and write README.md + NOTICE into the finished output directory (the
    last result's: a mergekit-multi file's earlier results are its intermediates)."""
    result = results[-1]
    assert result.out_dir is not None
    parents = parents_of(results, endpoint, token, intermediates)
    name = (repo_id or result.out_dir.name).split("/")[-1]
    report = analyze(parents, repo_name=name, policy=LicensePolicy(),
                     override=LicenseOverride(license_id) if license_id else None)
    ctx = card_context_from_output(result.out_dir, parents, report, repo_id)
    write_card(result.out_dir, ctx, template)
    return report


def run(cfg: MergeConfig | MoeConfig | MultiConfig, out_dir: Path, options: MergeOptions, *, push_to: str | None = None,
        private: bool = False, create_pr: bool = False, license_id: str | None = None,
        allow_license_risk: bool = False, template: Path | None = None,
        endpoint: str | None = None) -> PipelineResult:
    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(options.token)
    intermediates: frozenset[str] = frozenset()
    if isinstance(cfg, MultiConfig):
        from mergebot.config.multi import run_multi
        results = run_multi(cfg, out_dir, options)
        intermediates = frozenset(cfg.names)
    elif isinstance(cfg, MoeConfig):
        from mergebot.builds.moe.build import run_moe
        results = [run_moe(cfg, out_dir, options, allow_all_same=options.allow_all_same_experts)]
    else:
        results = [run_merge(cfg, out_dir, options)]
    result = results[-1]
    report = license_and_card(results, push_to or cfg.hub_repo, endpoint=endpoint, token=token,
                              license_id=license_id, template=template, intermediates=intermediates)
    published = None
    if push_to:
        if report.verdict == "block" and not allow_license_risk:
            raise LicenseGateError(f"license check blocks publishing {out_dir} to {push_to}: "
                                   + "; ".join(report.reasons) + " (pass --allow-license-risk after a human review)")
        published = publish(out_dir, push_to, token=token, private=private, create_pr=create_pr,
                            endpoint=endpoint, license_report=report, allow_license_risk=allow_license_risk)
    return PipelineResult(out_dir, result, report, push_to, published)
