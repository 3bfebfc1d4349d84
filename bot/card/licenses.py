"""License analysis of a merge: which license the merged weights inherit, and what that obliges us to do.

Pure and table-driven (hub-action-cards-licenses.md §5): no network, no files. Input is the parents' declared
license metadata; output is a `LicenseReport` the card, the NOTICE file and the publish gate all read, so the
three can never disagree. The texts summarise licenses for a bot's checks; they are not legal advice, and every
line links the original.

Rules (doc §5.3), in the order they are applied:
- no-derivatives parent -> block (a merge is an adaptation);
- share-alike parents must all share one license, which becomes the output; mixing it with a non-commercial
  (when it is itself commercial) or a community/RAIL license -> block (it cannot be relicensed);
- unknown or missing license -> block, unless the policy allows unknowns or the parent was reviewed (then warn);
- permissive parents only -> the most demanding permissive license among them;
- permissive + one restrictive (community or non-commercial) license -> that license, with all its obligations;
- two or more different restrictive licenses -> `other` + `license_name: composite`, every notice shipped,
  block unless the policy allows composites (manual approval);
- non-commercial anywhere -> warn; Llama 2/3 mixed with parents outside that family -> warn ("may not be used
  to improve any other large language model"); gated parents -> warn; AI2 ImpACT parents -> warn;
- Llama 3 ancestry -> the model name must begin with "Llama 3" (`^llama[-_ ]?3`), Llama 3.1+ -> with "Llama":
  a violation blocks, an unknown name is listed as an obligation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mergebot.card.license_table import LicenseClass, LicenseSpec, lookup, norm

Verdict = Literal["ok", "warn", "block"]
Level = Literal["info", "warn", "block"]

COMPOSITE_NAME = "composite"
COMPOSITE_LINK = "NOTICE"  # the NOTICE file written next to the card lists every parent license


class ParentLike(Protocol):
    """What analysis needs of a parent; `mergebot.hub.parents.ParentInfo` and `LicenseInput` both fit."""

    ref: str
    license: str | None
    license_name: str | None
    license_link: str | None


@dataclass
class LicenseInput:
    """A parent's declared license metadata, for callers that do not have a `ParentInfo`."""

    ref: str
    license: str | None
    license_name: str | None = None
    license_link: str | None = None
    tags: list[str] = field(default_factory=list)
    gated: bool | str = False
    sha: str | None = None
    is_hub: bool = True


@dataclass(frozen=True)
class LicensePolicy:
    """Human decisions the analysis may not take alone (doc §5.3 rule 6: fail closed)."""

    allow_unknown: bool = False  # unknown/missing license -> warn instead of block
    allow_composite: bool = False  # several restrictive licenses -> warn instead of block
    reviewed_refs: frozenset[str] = frozenset()  # parents whose unknown license a human has checked


@dataclass(frozen=True)
class LicenseOverride:
    """The user's `--license` choice; it changes what the card declares, never what is permitted."""

    license: str
    license_name: str | None = None
    license_link: str | None = None


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str


@dataclass
class ClassifiedParent:
    ref: str
    declared: str  # what the parent declared, e.g. "llama3" or "other (qwen)" or "missing"
    spec: LicenseSpec | None  # None when unknown
    klass: LicenseClass
    link: str | None
    sha: str | None = None
    is_hub: bool = True
    gated: bool | str = False
    declared_name: str | None = None  # `license_name` as the parent wrote it

    @property
    def key(self) -> str:
        return self.spec.key if self.spec else f"unknown:{self.declared}"

    @property
    def label(self) -> str:
        """Short text for tables: the Hub id, or `other (slug)`."""
        return self.declared


@dataclass
class LicenseReport:
    license: str
    license_name: str | None
    license_link: str | None
    obligations: list[str]
    notice_lines: list[str]
    verdict: Verdict
    reasons: list[str]
    overridden: bool = False
    computed_license: str | None = None  # before any override
    built_with: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational findings
    findings: list[Finding] = field(default_factory=list)
    parents: list[ClassifiedParent] = field(default_factory=list)

    def codes(self, level: Level | None = None) -> set[str]:
        return {f.code for f in self.findings if level is None or f.level == level}



def _license_from_tags(tags: Iterable[str] | None) -> str | None:
    found = [t.split(":", 1)[1] for t in (tags or []) if isinstance(t, str) and t.startswith("license:")]
    return found[0].lower() if len(found) == 1 else None



def classify(parent: ParentLike) -> ClassifiedParent:
    """Classify one parent from `license`, `license_name`, or a lone `license:<id>` tag."""
    lic = norm(parent.license) or _license_from_tags(getattr(parent, "tags", None))
    name = norm(parent.license_name)
    spec = lookup(lic, name)
    if lic is None:
        declared = "missing"
    elif lic == "other":
        declared = f"other ({name})" if name else "other"
    else:
        declared = lic
    link = parent.license_link or (spec.link if spec else None)
    return ClassifiedParent(
        ref=parent.ref,
        declared=declared,
        spec=spec,
        klass=spec.klass if spec else LicenseClass.UNKNOWN,
        link=link,
        sha=getattr(parent, "sha", None),
        is_hub=getattr(parent, "is_hub", True),
        gated=getattr(parent, "gated", False) or False,
        declared_name=parent.license_name,
    )


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def analyze(
    parents: Sequence[ParentLike],
    *,
    repo_name: str | None = None,
    policy: LicensePolicy = LicensePolicy(),
    override: LicenseOverride | None = None,
) -> LicenseReport:
    """Compute the merge's license, obligations and verdict from its parents (config order, deduplicated).

    `repo_name` is the published model name (the part after `org/`); when given, naming rules are checked.
    """
    if not parents:
        raise ValueError("license analysis needs at least one parent")
    classified: list[ClassifiedParent] = []
    seen_refs: set[str] = set()
    for p in parents:
        if p.ref in seen_refs:
            continue
        seen_refs.add(p.ref)
        classified.append(classify(p))

    findings: list[Finding] = []

    def add(level: Level, code: str, message: str) -> None:
        findings.append(Finding(level, code, message))

    known = [c for c in classified if c.spec is not None]
    by_class: dict[LicenseClass, list[ClassifiedParent]] = {k: [] for k in LicenseClass}
    for c in classified:
        by_class[c.klass].append(c)

    # -- blocks that no output license can fix
    for c in by_class[LicenseClass.NO_DERIVATIVES]:
        add("block", "no-derivatives",
            f"{c.ref} is under {c.declared}, which forbids derivatives; a merge is an adaptation of its weights")
    for c in by_class[LicenseClass.UNKNOWN]:
        reviewed = c.ref in policy.reviewed_refs
        level: Level = "warn" if (policy.allow_unknown or reviewed) else "block"
        how = "reviewed by a human" if reviewed else ("allowed by policy" if policy.allow_unknown else
                                                      "treat it as all rights reserved; review it and allow it")
        add(level, "unknown-license",
            f"{c.ref} has an unknown or unrecognised license ({c.declared}): {how}")

    # -- output license
    share_alike = [c for c in known if c.spec.share_alike]  # type: ignore[union-attr]
    restrictive = [c for c in known if c.klass in (LicenseClass.COMMUNITY, LicenseClass.NON_COMMERCIAL)
                   and not c.spec.share_alike]  # type: ignore[union-attr]
    non_commercial = [c for c in known if not c.spec.commercial]  # type: ignore[union-attr]
    composite = False
    out_spec: LicenseSpec | None = None

    if share_alike:
        sa_keys = _unique(c.key for c in share_alike)
        if len(sa_keys) > 1:
            add("block", "share-alike-conflict",
                "share-alike licenses cannot be combined: " + ", ".join(f"{c.ref} ({c.declared})" for c in share_alike))
        out_spec = share_alike[0].spec
        assert out_spec is not None
        if out_spec.commercial and non_commercial:
            add("block", "share-alike-non-commercial",
                f"{share_alike[0].ref} ({out_spec.key}) requires the merge to be {out_spec.key}, which allows "
                "commercial use, but " + ", ".join(f"{c.ref} ({c.declared})" for c in non_commercial)
                + " forbids it")
        community = [c for c in restrictive if c.klass == LicenseClass.COMMUNITY]
        if community:
            add("block", "share-alike-community",
                f"{share_alike[0].ref} ({out_spec.key}) requires share-alike, which cannot carry the use "
                "restrictions of " + ", ".join(f"{c.ref} ({c.declared})" for c in community))
        # CC BY-NC parents fit under CC BY-NC-SA; research licenses cannot be folded into a CC license.
        other_nc = [c for c in restrictive if c.klass == LicenseClass.NON_COMMERCIAL and not c.key.startswith("cc-")]
        if other_nc and not out_spec.commercial:
            add("block", "share-alike-conflict",
                f"{out_spec.key} share-alike cannot also carry " + ", ".join(c.declared for c in other_nc))
    else:
        restrictive_keys = _unique(c.key for c in restrictive)
        if len(restrictive_keys) == 1:
            out_spec = restrictive[0].spec
        elif len(restrictive_keys) > 1:
            composite = True
            add("warn" if policy.allow_composite else "block", "composite-license",
                "parents carry different restrictive licenses ("
                + ", ".join(f"{c.ref}: {c.declared}" for c in restrictive)
                + "); the merge is published as `other`/composite with every license and notice, "
                "which needs manual approval")
        else:
            permissive = [c for c in known if c.klass == LicenseClass.PERMISSIVE]
            if permissive:
                out_spec = max(permissive, key=lambda c: c.spec.rank).spec  # type: ignore[union-attr]
                assert out_spec is not None  # permissive parents have a known spec
                keys = _unique(c.key for c in permissive)
                if len(keys) > 1:
                    add("info", "mixed-permissive",
                        f"permissive parents ({', '.join(keys)}): the merge is published under {out_spec.key}; "
                        "the other parents' notices are kept in NOTICE")

    if composite:
        license_id, license_name, license_link = "other", COMPOSITE_NAME, COMPOSITE_LINK
    elif out_spec is not None:
        license_id = out_spec.hub_id
        license_name, license_link = None, None
        if out_spec.hub_id == "other":  # keep the parent's own slug and link, as the Hub's filters group by them
            source = next(c for c in known if c.spec is out_spec)
            license_name = source.declared_name or out_spec.license_name
            license_link = source.link or out_spec.link
    else:
        license_id, license_name, license_link = "unknown", None, None

    # -- warnings that ride along with any output
    if non_commercial:
        add("warn", "non-commercial",
            "non-commercial parent(s) " + ", ".join(f"{c.ref} ({c.declared})" for c in non_commercial)
            + ": the merge may not be used commercially")
    warned: set[str] = set()
    for c in known:
        spec = c.spec
        assert spec is not None
        if spec.key in warned:
            continue
        warned.add(spec.key)
        if spec.improve_clause:
            outsiders = [o for o in classified if o.spec is None or o.spec.family != spec.family]
            if outsiders:
                add("warn", "improve-other-llms",
                    f"{c.ref} ({spec.key}) may not be used to improve any large language model other than "
                    f"{spec.title.split(' Community')[0]} or its derivatives, and it is merged with "
                    + ", ".join(f"{o.ref} ({o.declared})" for o in outsiders))
        if spec.warning:
            refs = ", ".join(o.ref for o in known if o.spec is spec)
            add("warn", "license-warning", f"{refs} {spec.warning}")
    for c in classified:
        if c.gated:
            add("warn", "gated-parent",
                f"{c.ref} is gated (access terms apply); consider gating the merge too "
                "(HfApi.update_repo_settings(repo_id, gated='auto'))")

    # -- naming rules of the Llama licenses
    obligations: list[str] = []
    rules = _unique(c.spec.name_rule for c in known if c.spec and c.spec.name_rule)
    for rule in rules:
        owner = next(c for c in known if c.spec and c.spec.name_rule == rule)
        assert owner.spec is not None
        if repo_name is None:
            continue
        if not re.match(rule, repo_name, flags=re.IGNORECASE):
            add("block", "naming",
                f"{owner.ref} is under {owner.spec.key}: {owner.spec.name_rule_text}; "
                f"{repo_name!r} does not (rename the repo)")

    # -- obligations, notices, attribution lines (deduplicated, parents' order)
    for c in known:
        obligations.extend(c.spec.obligations)  # type: ignore[union-attr]
    if composite:
        obligations.append("Ship every parent license listed in NOTICE with the model and follow each of them.")
    notice_lines = _unique(c.spec.notice for c in known if c.spec and c.spec.notice)
    built_with = _unique(c.spec.built_with for c in known if c.spec and c.spec.built_with)
    obligations = _unique(obligations)

    computed = license_id
    overridden = False
    if override is not None:
        overridden = True
        if (override.license, override.license_name) != (license_id, license_name):
            add("warn", "override",
                f"license overridden by the user: computed {license_id}"
                + (f" ({license_name})" if license_name else "")
                + f", declared {override.license}" + (f" ({override.license_name})" if override.license_name else "")
                + "; the parents' obligations still apply")
        license_id = override.license
        license_name = override.license_name
        license_link = override.license_link

    levels = {f.level for f in findings}
    verdict: Verdict = "block" if "block" in levels else ("warn" if "warn" in levels else "ok")
    return LicenseReport(
        license=license_id,
        license_name=license_name,
        license_link=license_link,
        obligations=obligations,
        notice_lines=notice_lines,
        verdict=verdict,
        reasons=[f"{f.level}: {f.message}" for f in findings if f.level != "info"],
        overridden=overridden,
        computed_license=computed,
        built_with=built_with,
        notes=[f.message for f in findings if f.level == "info"],
        findings=findings,
        parents=classified,
    )


def render_notice(report: LicenseReport, *, model_name: str | None = None) -> str:
    """Text of the NOTICE file shipped with the merge: required notices, then every parent's license."""
    title = model_name or "This model"
    lines = [f"NOTICE for {title}", "",
             f"{title} is a merge of the models listed below; their licenses apply to it.", ""]
    if report.notice_lines:
        lines.extend(report.notice_lines)
        lines.append("")
    if report.built_with:
        lines.extend(report.built_with)
        lines.append("")
    lines.append("Parents:")
    for c in report.parents:
        pin = f"@{c.sha}" if c.sha else (" (local)" if not c.is_hub else "")
        link = f" <{c.link}>" if c.link else ""
        title_text = c.spec.title if c.spec else "unknown license"
        lines.append(f"- {c.ref}{pin}: {c.declared} — {title_text}{link}")
    lines.append("")
    lines.append(f"Declared license of the merge: {report.license}"
                 + (f" ({report.license_name})" if report.license_name else "")
                 + (" [set by the user]" if report.overridden else ""))
    return "\n".join(lines) + "\n"
