"""The model card (README.md) and NOTICE of a merge, rendered from the output directory and the license report.

The card is rendered with Jinja2 from `templates/card.md.j2` (dense) or `templates/card_moe.md.j2` (MoE), or a
user template. Front matter is built here as a dict and dumped with PyYAML, not templated, so it is always valid
YAML; the rendered card is then parsed with huggingface_hub's `ModelCard` so a bad user template fails here, not
on the Hub. Everything comes from `mergebot.lock.json` and the environment, never from the clock, so rendering
twice gives the same bytes (an unchanged merge republishes as a no-op).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.sandbox
import yaml

from mergebot.card.licenses import LicenseReport, render_notice
from mergebot.config.methods import SPECS
from mergebot.config.refs import split_ref
from mergebot.config.yamlsafe import load_yaml
from mergebot.errors import ConfigError, MergebotError
from mergebot.hub.parents import ParentInfo, union_languages
from mergebot.io.confine import is_inside
from mergebot.io.lockfile import read_lock


def _templates_dir() -> Path:
    """templates/ beside the package (source checkout, editable install), else the copy a wheel installs
    under <prefix>/share/mergebot/templates (pyproject data-files)."""
    here = Path(__file__).resolve().parents[2] / "templates"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "mergebot" / "templates"


TEMPLATES_DIR = _templates_dir()
DENSE_TEMPLATE = "card.md.j2"
MOE_TEMPLATE = "card_moe.md.j2"
CONFIG_FILES = ("mergekit_config.yml", "mergekit_moe_config.yml")
HUB_URL = "https://huggingface.co"
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"

# The card's name and link of every method: the methods' own declarations (mergebot.config.methods), and the
# MoE builder's.
METHOD_INFO: dict[str, tuple[str, str | None]] = {name: (spec.pretty, spec.url) for name, spec in SPECS.items()}
METHOD_INFO["moe"] = ("Mixture of Experts (mergekit-moe)", None)


class CardError(MergebotError):
    """The card cannot be rendered or its metadata would be rejected by the Hub."""


def method_info(name: str) -> tuple[str, str | None]:
    """(pretty name, URL) of a method; its own name and no link for one mergebot does not know."""
    return METHOD_INFO.get(name, (name, None))


@dataclass
class CardParent:
    ref: str
    is_hub: bool
    role: str | None
    revision: str | None
    sha: str | None
    license: str  # label, e.g. "llama3" or "other (qwen)"
    license_link: str | None
    url: str | None = None  # Hub page, None for local parents
    tree_url: str | None = None  # Hub page at the pinned sha
    repo_id: str = ""  # `ref` without `@revision` / `+lora`: the Hub id (or the local path)


@dataclass
class Provenance:
    mergebot_version: str
    created: str
    config_sha256: str
    dtype: str | None = None
    out_dtype: str | None = None
    device: str | None = None
    random_seed: int | None = None
    github_server_url: str | None = None
    github_repository: str | None = None
    github_sha: str | None = None
    github_run_id: str | None = None

    @property
    def repository_url(self) -> str | None:
        if not self.github_repository:
            return None
        return f"{(self.github_server_url or 'https://github.com').rstrip('/')}/{self.github_repository}"

    @property
    def commit_url(self) -> str | None:
        return f"{self.repository_url}/commit/{self.github_sha}" if self.repository_url and self.github_sha else None

    @property
    def run_url(self) -> str | None:
        if self.repository_url and self.github_run_id:
            return f"{self.repository_url}/actions/runs/{self.github_run_id}"
        return None


@dataclass
class MoeDetails:
    gate_mode: str | None
    experts_per_token: int
    architecture: str | None
    num_experts: int


@dataclass
class CardContext:
    """Everything a card template may use. User templates get it as `ctx` (plus `front_matter`, `fence`)."""

    name: str
    repo_id: str | None
    kind: Literal["merge", "moe"]
    merge_method: str
    method_pretty: str
    method_url: str | None
    base_model: str | None
    parents: list[CardParent]
    config_yaml: str
    config_file: str
    license: LicenseReport
    provenance: Provenance
    languages: list[str] = field(default_factory=list)
    pipeline_tag: str = "text-generation"
    moe: MoeDetails | None = None
    hub_url: str = HUB_URL
    extra_tags: list[str] = field(default_factory=list)
    check: dict[str, Any] | None = None  # the lock's quality-check record (mergebot.check.gate), None: never run

    @property
    def base_model_ids(self) -> list[str]:
        """Hub ids of all parents, deduplicated, config order (local paths cannot be linked by the Hub)."""
        seen: dict[str, None] = {}
        for p in self.parents:
            if p.is_hub:
                seen.setdefault(p.repo_id or p.ref, None)
        return list(seen)

    @property
    def tags(self) -> list[str]:
        tags = ["merge", "mergekit", "mergebot"] + (["moe"] if self.kind == "moe" else [])
        for t in self.extra_tags:
            if t not in tags:
                tags.append(t)
        return tags

    @property
    def usage_id(self) -> str:
        return self.repo_id or self.name

    @property
    def base_parent(self) -> CardParent | None:
        return next((p for p in self.parents if p.role == "base"), None) if self.base_model else None

    @property
    def other_parents(self) -> list[CardParent]:
        return [p for p in self.parents if p.role != "base"]

    @property
    def check_markdown(self) -> str:
        """The evaluation section: merge vs each parent, the text used, the gate's verdict."""
        from mergebot.check.gate import card_markdown  # torch-free callers render cards without a check

        return card_markdown(self.check)

    def front_matter(self) -> dict[str, Any]:
        """Card metadata (doc §6 recommended front matter); `base_model*` omitted when no parent is on the Hub."""
        fm: dict[str, Any] = {}
        if self.base_model_ids:
            fm["base_model"] = self.base_model_ids
            fm["base_model_relation"] = "merge"
        fm["library_name"] = "transformers"
        fm["license"] = self.license.license
        if self.license.license_name:
            fm["license_name"] = self.license.license_name
        if self.license.license_link:
            fm["license_link"] = self.license.license_link
        if self.languages:
            fm["language"] = list(self.languages)
        fm["pipeline_tag"] = self.pipeline_tag
        fm["tags"] = self.tags
        if self.check:
            from mergebot.check.gate import card_model_index

            index = card_model_index(self.check, self.usage_id)
            if index:  # the Hub shows it as the card's evaluation results
                fm["model-index"] = index
        return fm


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside `text`, so the config cannot close it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _cell(value: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _read_config(out_dir: Path) -> tuple[str, str]:
    for name in CONFIG_FILES:
        path = out_dir / name
        if path.is_file():
            return name, path.read_text(encoding="utf-8")
    raise CardError(f"{out_dir}: no {' or '.join(CONFIG_FILES)} (the merge config is copied there by the engine)")


def _moe_details(config_text: str, config_file: str, num_experts: int) -> MoeDetails:
    try:  # the bounded loader: a card refresh reads this file back from the Hub, where anyone with write access put it
        cfg = load_yaml(config_text, config_file).data or {}
    except ConfigError as e:
        raise CardError(f"{config_file}: not valid YAML: {e.reason}") from None
    if not isinstance(cfg, dict):
        raise CardError(f"{config_file}: must be a mapping")
    experts = cfg.get("experts")
    return MoeDetails(
        gate_mode=cfg.get("gate_mode", "hidden"),
        experts_per_token=int(cfg.get("experts_per_token") or 2),
        architecture=cfg.get("architecture"),
        num_experts=len(experts) if isinstance(experts, list) else num_experts,
    )


def card_context_from_output(
    out_dir: Path,
    parents: list[ParentInfo],
    report: LicenseReport,
    repo_id: str | None,
    *,
    env: Mapping[str, str] | None = None,
    hub_url: str = HUB_URL,
) -> CardContext:
    """Build the card context from the engine's output directory (lock + config) and the parents' metadata.

    GitHub provenance comes from the lock's optional `github` object (recorded at merge time) or else from the
    `GITHUB_*` environment of the publishing run.
    """
    out_dir = Path(out_dir)
    lock = read_lock(out_dir)
    env = os.environ if env is None else env
    config_file, config_text = _read_config(out_dir)
    if not config_text.endswith("\n"):
        config_text += "\n"
    info_by_ref = {p.ref: p for p in parents}
    hub_url = hub_url.rstrip("/")
    license_by_ref = {c.ref: c for c in report.parents}

    card_parents: list[CardParent] = []
    for entry in lock["parents"]:
        ref = entry["ref"]
        parent_id = split_ref(ref)[0]
        info = info_by_ref.get(ref)
        is_hub = not entry.get("local", False) if "local" in entry else (info.is_hub if info else True)
        sha = entry.get("sha") or (info.sha if info else None)
        classified = license_by_ref.get(ref)
        card_parents.append(CardParent(
            ref=ref,
            is_hub=is_hub,
            role=entry.get("role"),
            revision=entry.get("revision"),
            sha=sha,
            license=classified.label if classified else (info.license if info and info.license else "missing"),
            license_link=classified.link if classified else (info.license_link if info else None),
            url=f"{hub_url}/{parent_id}" if is_hub else None,
            tree_url=f"{hub_url}/{parent_id}/tree/{sha}" if is_hub and sha else None,
            repo_id=parent_id,
        ))

    kind: Literal["merge", "moe"] = "moe" if lock.get("kind") == "moe" else "merge"
    method = "moe" if kind == "moe" and not lock.get("merge_method") else str(lock["merge_method"])
    pretty, url = method_info(method)
    gh: dict[str, Any] = lock["github"] if isinstance(lock.get("github"), dict) else {}
    provenance = Provenance(
        mergebot_version=str(lock.get("mergebot_version") or _own_version()),
        created=str(lock.get("created") or "unknown"),
        config_sha256=str(lock["config_sha256"]),
        dtype=lock.get("dtype"),
        out_dtype=lock.get("out_dtype"),
        device=lock.get("device"),
        random_seed=lock.get("random_seed"),
        github_server_url=gh.get("server_url") or env.get("GITHUB_SERVER_URL"),
        github_repository=gh.get("repository") or env.get("GITHUB_REPOSITORY"),
        github_sha=gh.get("sha") or env.get("GITHUB_SHA"),
        github_run_id=str(gh.get("run_id") or env.get("GITHUB_RUN_ID") or "") or None,
    )
    pipeline_tags = [p.pipeline_tag for p in parents if p.pipeline_tag]
    name = repo_id.split("/")[-1] if repo_id else out_dir.resolve().name
    return CardContext(
        name=name,
        repo_id=repo_id,
        kind=kind,
        merge_method=method,
        method_pretty=pretty,
        method_url=url,
        base_model=lock.get("base_model"),
        parents=card_parents,
        config_yaml=config_text,
        config_file=config_file,
        license=report,
        provenance=provenance,
        languages=union_languages(parents),
        # parents agree in practice; the first declared tag wins, text-generation when none declares one
        pipeline_tag=pipeline_tags[0] if pipeline_tags else "text-generation",
        moe=_moe_details(config_text, config_file, len(card_parents)) if kind == "moe" else None,
        hub_url=hub_url,
        check=lock["check"] if isinstance(lock.get("check"), dict) else None,
    )


def _own_version() -> str:
    try:
        from mergebot import __version__
    except ImportError:
        return "unknown"
    return __version__


class _ConfinedLoader(jinja2.FileSystemLoader):
    """Templates only from inside its directories once links are resolved: an `{% include %}` of a link that
    leads out of the template's directory is not found (Jinja2 itself refuses '..' but follows links)."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        source, filename, uptodate = super().get_source(environment, template)
        real = Path(filename).resolve()
        if not any(is_inside(real, Path(d).resolve()) for d in self.searchpath):
            raise jinja2.TemplateNotFound(template)
        return source, filename, uptodate


def _environment(extra_dir: Path | None) -> jinja2.Environment:
    """The built-in templates, then a user template's directory (for its includes). A user template runs sandboxed: it is a
    file anyone who can push to the repository may edit, and an unsandboxed Jinja2 template can reach Python
    (`''.__class__.__mro__`...) in a job that holds a write token."""
    search = [str(TEMPLATES_DIR)] + ([str(extra_dir)] if extra_dir else [])  # built-in names always mean built-ins
    kind = jinja2.sandbox.SandboxedEnvironment if extra_dir else jinja2.Environment
    env = kind(
        loader=_ConfinedLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["cell"] = _cell
    env.filters["fence"] = _fence
    return env


def render_card(ctx: CardContext, template_path: Path | None = None) -> str:
    """The card text. A user template may `{% extends "card.md.j2" %}` and override its blocks."""
    if template_path is not None:
        template_path = Path(template_path)
        if not template_path.is_file():
            raise CardError(f"{template_path}: card template not found")
        env = _environment(template_path.resolve().parent)
        name = template_path.name
    else:
        env = _environment(None)
        name = MOE_TEMPLATE if ctx.kind == "moe" else DENSE_TEMPLATE
    front_matter = yaml.safe_dump(ctx.front_matter(), sort_keys=False, allow_unicode=True, default_flow_style=False)
    where = template_path or TEMPLATES_DIR / name
    try:
        # a user template is read as given, not looked up by name: one named card.md.j2 that extends
        # "card.md.j2" gets the built-in one, not itself (which recursed until Python's stack ran out)
        template = (env.from_string(template_path.read_text(encoding="utf-8")) if template_path is not None
                    else env.get_template(name))
        text = template.render(ctx=ctx, front_matter=front_matter)
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"{where}: cannot read the card template ({type(e).__name__})") from e
    except jinja2.TemplateError as e:
        line = getattr(e, "lineno", None)
        raise CardError(f"{where}{f' line {line}' if line else ''}: {type(e).__name__}: {e}") from e
    _check_metadata(text, where)
    return text


# huggingface_hub.repocard.REGEX_YAML_BLOCK: where the Hub client finds a card's front matter
_FRONT_MATTER = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def _check_metadata(text: str, where: Path) -> None:
    """Parse the card as the Hub client does (`ModelCard(text)`: its front-matter pattern, a YAML mapping, then
    ModelCardData), the YAML read by mergebot's bounded loader; fail with the template's name instead of a Hub 400
    later. Its steps, not ModelCard itself: importing huggingface_hub.repocard loads the whole Hub API (~0.2 s of
    every merge); tests compare the two."""
    from huggingface_hub.repocard_data import ModelCardData

    if not text.startswith("---\n"):
        raise CardError(f"{where}: the card must start with a '---' front matter block")
    match = _FRONT_MATTER.search(text)
    try:
        # the bounded loader (a user template may write an alias bomb), as strict as safe_load or stricter
        data = load_yaml(match.group(2), f"{where} (front matter)").data if match else {}
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError("repo card metadata block should be a dict")
        card = ModelCardData(**data)
    except Exception as e:  # ConfigError from the loader, ValueError from the block or from ModelCardData
        raise CardError(f"{where}: rendered card metadata is invalid: {e}") from e
    if not card.to_dict().get("license"):
        raise CardError(f"{where}: rendered card metadata has no `license`")


def write_card(out_dir: Path, ctx: CardContext, template_path: Path | None = None) -> Path:
    """Write README.md (and the NOTICE file the license section links to) into the output directory. Both are
    written beside their targets first and renamed over them only once both are whole: a full disk (OSError)
    leaves the previous card and NOTICE as they were, never a truncated one (`mergebot publish` rewrites the
    card of an output that already holds a merge)."""
    out_dir = Path(out_dir)
    texts = {"README.md": render_card(ctx, template_path), "NOTICE": render_notice(ctx.license, model_name=ctx.name)}
    temps = {name: out_dir / f".{name}.mergebot-tmp" for name in texts}
    try:
        for name, text in texts.items():
            temps[name].write_text(text, encoding="utf-8")
        for name, tmp in temps.items():
            os.replace(tmp, out_dir / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return out_dir / "README.md"
