"""The whole job for one config: merge -> quality check -> license check -> card -> (optional) one Hub commit.

Used by `mergebot merge --push-to`, `mergebot demo` and the GitHub Action, so all three behave alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergebot.builds import build_for
from mergebot.builds.base import BuildResult, MergeOptions
from mergebot.card.licenses import LicenseOverride, LicensePolicy, LicenseReport, analyze
from mergebot.card.render import card_context_from_output, write_card
from mergebot.check.gate import GateOptions, GateOutcome, raise_if_rejected, run_gate
from mergebot.config.configfile import Config
from mergebot.errors import ModelError
from mergebot.hub.client import resolve_endpoint, resolve_token
from mergebot.hub.digests import record_digests
from mergebot.hub.parents import ParentInfo, parent_from_hub, parent_from_local
from mergebot.hub.publish import LicenseGateError, PublishResult, publish
from mergebot.hub.stream import StreamStats, open_session
from mergebot.io.output import finishing


@dataclass
class PipelineResult:
    out_dir: Path
    merge: BuildResult
    report: LicenseReport
    repo_id: str | None
    published: PublishResult | None
    streamed: StreamStats | None = None  # a streamed merge's traffic and peak disk (mergebot.hub.stream)
    check: GateOutcome | None = None  # the quality gate's outcome; None when no check was asked for


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


def check_parents(result: BuildResult) -> list[tuple[Path, str]]:
    """(directory, ref) of each parent the quality check compares the merge with. A parent with a LoRA folded
    in is left out: its directory holds the model without the adapter, which is not what the merge read."""
    return [(p.resolved.directory, p.key) for p in result.parents() if p.adapter is None]


def lock_check_parents(lock: dict[str, Any], base_dir: Path | None, token: str | None) -> list[tuple[Path, str]]:
    """(directory, ref) of each parent a lock lists, for checking an existing output (`mergebot publish`): local
    paths against `base_dir` (default: cwd), Hub parents downloaded at the recorded commit. LoRA entries and
    parents with a LoRA folded in are left out, as in `check_parents`."""
    from mergebot.config.refs import ModelRef, looks_local, split_ref
    from mergebot.hub.fetch import resolve

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out: list[tuple[Path, str]] = []
    for entry in lock["parents"]:
        ref = str(entry["ref"])
        path, revision, lora = split_ref(ref)
        if lora or entry.get("role") == "lora":
            continue
        local = entry.get("local")
        if local if local is not None else looks_local(path):
            d = Path(path).expanduser()
            out.append((d if d.is_absolute() else base / d, ref))
        else:
            try:
                directory = resolve(ModelRef(path, entry.get("sha") or revision), token=token).directory
            except ModelError as e:
                raise ModelError(f"quality check: parent {ref}: {e} (the check compares the merge with its "
                                 "parents' weights; --check off skips it)") from None
            out.append((directory, ref))
    return out


def license_check(result: BuildResult, repo_id: str | None, *, endpoint: str | None = None,
                  token: str | None = None, license_id: str | None = None) -> tuple[list[ParentInfo], LicenseReport]:
    """The parents' license metadata and the analysis of it, for the card and the publish gate."""
    assert result.out_dir is not None
    parents = parents_of(result, endpoint, token)
    name = (repo_id or result.out_dir.name).split("/")[-1]
    return parents, analyze(parents, repo_name=name, policy=LicensePolicy(),
                            override=LicenseOverride(license_id) if license_id else None)


def write_output_card(result: BuildResult, parents: list[ParentInfo], report: LicenseReport, repo_id: str | None,
                      template: Path | None = None) -> None:
    """README.md + NOTICE into the finished output directory (after the check: the card shows its result)."""
    assert result.out_dir is not None
    write_card(result.out_dir, card_context_from_output(result.out_dir, parents, report, repo_id), template)


def run(cfg: Config, out_dir: Path, options: MergeOptions, *, push_to: str | None = None,
        private: bool = False, create_pr: bool = False, license_id: str | None = None,
        allow_license_risk: bool = False, template: Path | None = None,
        endpoint: str | None = None, stream: str = "auto", check: GateOptions | None = None) -> PipelineResult:
    """`stream`: auto | on | off, whether Hub parents are read by range and shards uploaded as they finish.
    `check`: the quality gate; by default on when publishing, none otherwise. It runs before the card is written
    (the card shows it) and a rejection raises QualityGateError before any Hub commit. A streamed output is never
    whole on disk, so its check is recorded as skipped."""
    if check is None and push_to:
        check = GateOptions(device=options.device)
    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(options.token)
    session = open_session(cfg, out_dir, stream, push_to, token, endpoint=endpoint, private=private,
                           create_pr=create_pr)
    if session is not None:
        options = replace(options, stream=session)
    try:
        result = build_for(cfg).run(out_dir, options)
        preuploaded = session.finish(out_dir) if session is not None else []
    finally:
        if session is not None:
            session.close()
    # the digests of what the merge read from each Hub parent: scheduled runs compare content, not commits
    with finishing(out_dir):
        record_digests(out_dir, endpoint=endpoint, token=token, template=template)
    repo_id = push_to or cfg.hub_repo
    parents, report = license_check(result, repo_id, endpoint=endpoint, token=token, license_id=license_id)
    published = None
    if push_to and report.verdict == "block" and not allow_license_risk:
        # before the quality check: a merge that cannot be published is not worth a perplexity run
        with finishing(out_dir):
            write_output_card(result, parents, report, repo_id, template)
        raise LicenseGateError(f"license check blocks publishing {out_dir} to {push_to}: "
                               + "; ".join(report.reasons) + " (pass --allow-license-risk after a human review)")
    outcome = None
    if check is not None:
        if session is not None and check.mode != "off":
            check = replace(check, mode="streamed")
        outcome = run_gate(out_dir, lambda: check_parents(result), check)
    with finishing(out_dir):
        write_output_card(result, parents, report, repo_id, template)
    if outcome is not None:
        raise_if_rejected(outcome, push_to)
    if push_to:
        published = publish(out_dir, push_to, token=token, private=private, create_pr=create_pr,
                            endpoint=endpoint, license_report=report, allow_license_risk=allow_license_risk,
                            preuploaded=preuploaded)
        if session is not None:
            session.reveal()
    return PipelineResult(out_dir, result, report, push_to, published, session.stats if session else None, outcome)
