"""The whole job for one config: merge -> license check -> card -> (optional) one Hub commit.

Used by `mergebot merge --push-to`, `mergebot demo` and the GitHub Action, so all three behave alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergebot.builds import build_for
from mergebot.builds.base import BuildResult, MergeOptions
from mergebot.card.licenses import LicenseOverride, LicensePolicy, LicenseReport, analyze
from mergebot.card.render import card_context_from_output, write_card
from mergebot.config.configfile import Config
from mergebot.hub.client import resolve_endpoint, resolve_token
from mergebot.hub.parents import ParentInfo, parent_from_hub, parent_from_local
from mergebot.hub.publish import LicenseGateError, PublishResult, publish


@dataclass
class PipelineResult:
    out_dir: Path
    merge: BuildResult
    report: LicenseReport
    repo_id: str | None
    published: PublishResult | None


def parents_of(result: BuildResult, endpoint: str | None, token: str | None) -> list[ParentInfo]:
    """License metadata of every parent, read where the build found it (local dir or Hub @ sha). For a
    mergekit-multi file, the leaf parents of every stage: an intermediate's licenses are its parents'."""
    out: list[ParentInfo] = []
    for p in result.parents():
        r = p.resolved
        if r.is_hub:
            out.append(parent_from_hub(r.ref.path, revision=r.ref.revision, sha=r.sha, endpoint=endpoint,
                                       token=token, role=p.role, ref=p.key))
        else:
            out.append(parent_from_local(r.directory, ref=p.key, role=p.role))
        adapter = p.adapter
        if adapter is not None:  # a LoRA folded into this parent: its license applies too
            if adapter.is_hub:
                out.append(parent_from_hub(adapter.ref.path, revision=adapter.ref.revision, sha=adapter.sha,
                                           endpoint=endpoint, token=token, role="lora", ref=str(adapter.ref)))
            else:
                out.append(parent_from_local(adapter.directory, ref=str(adapter.ref), role="lora"))
    return out


def license_and_card(result: BuildResult, repo_id: str | None, *, endpoint: str | None = None,
                     token: str | None = None, license_id: str | None = None,
                     template: Path | None = None) -> LicenseReport:
    """Analyse the parents' licenses and write README.md + NOTICE into the finished output directory."""
    assert result.out_dir is not None
    parents = parents_of(result, endpoint, token)
    name = (repo_id or result.out_dir.name).split("/")[-1]
    report = analyze(parents, repo_name=name, policy=LicensePolicy(),
                     override=LicenseOverride(license_id) if license_id else None)
    ctx = card_context_from_output(result.out_dir, parents, report, repo_id)
    write_card(result.out_dir, ctx, template)
    return report


def run(cfg: Config, out_dir: Path, options: MergeOptions, *, push_to: str | None = None,
        private: bool = False, create_pr: bool = False, license_id: str | None = None,
        allow_license_risk: bool = False, template: Path | None = None,
        endpoint: str | None = None) -> PipelineResult:
    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(options.token)
    result = build_for(cfg).run(out_dir, options)
    report = license_and_card(result, push_to or cfg.hub_repo, endpoint=endpoint, token=token,
                              license_id=license_id, template=template)
    published = None
    if push_to:
        if report.verdict == "block" and not allow_license_risk:
            raise LicenseGateError(f"license check blocks publishing {out_dir} to {push_to}: "
                                   + "; ".join(report.reasons) + " (pass --allow-license-risk after a human review)")
        published = publish(out_dir, push_to, token=token, private=private, create_pr=create_pr,
                            endpoint=endpoint, license_report=report, allow_license_risk=allow_license_risk)
    return PipelineResult(out_dir, result, report, push_to, published)
