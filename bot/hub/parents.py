"""Reading the parents' metadata (license, languages, pipeline tag) for the card and the license analysis.

A parent is either a local model directory, whose `README.md` front matter we parse, or a Hub repo, whose
`model_info` we read at the pinned sha recorded in `mergebot.lock.json` (so the card describes exactly the
weights that were merged, not whatever the repo holds today).

A parent's card is a stranger's file: it is read through mergebot.io.confine (a README that points outside the model
directory is refused, never read) and its front matter parsed by the bounded loader of mergebot.config.yamlsafe. Front
matter that cannot be parsed (broken YAML, an alias bomb, binary junk) counts as no metadata, i.e. an unknown
license for the analysis to flag, rather than stopping the merge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot.config.refs import looks_local, split_ref
from mergebot.config.yamlsafe import load_front_matter
from mergebot.errors import ConfigError, MergebotError, ModelError
from mergebot.hub import errors
from mergebot.hub.client import client, resolve_endpoint
from mergebot.io import confine


class ParentMetadataError(MergebotError):
    """A parent's metadata cannot be read (missing repo, network down, bad README)."""


class GatedParentError(ParentMetadataError):
    """A gated parent the token has no access to."""


@dataclass
class ParentInfo:
    ref: str  # as written in the config: "org/name" or "./local/dir"
    is_hub: bool
    revision: str | None  # what the config asked for ("main", a tag, a sha) or None
    sha: str | None  # resolved commit for Hub parents, None for local ones
    license: str | None
    license_name: str | None
    license_link: str | None
    languages: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=list)
    gated: bool | str = False  # "auto" | "manual" | False, as the Hub reports it
    base_models: list[str] = field(default_factory=list)  # the parent's own declared `base_model`
    role: str | None = None  # "base" | "input" | "expert", from the lock

    @property
    def repo_id(self) -> str:
        """The path or Hub id without `@revision` / `+lora` (what `base_model` and links need)."""
        return split_ref(self.ref)[0]


MAX_METADATA_TEXT = 300  # one value quoted from a parent's card (a license name, a link, a language)


def _plain(value: Any) -> str | None:
    """A parent's metadata value as our card and NOTICE may quote it: a string (or number), one line, no control
    characters, cut. A stranger's card could otherwise write headings, links or escape sequences into ours; a
    mapping or list where a string belongs is no value."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return text[:MAX_METADATA_TEXT] or None


def _as_list(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t for t in (_plain(v) for v in items) if t is not None]


def _license_value(value: Any) -> str | None:
    """`license:` may be a string or (rarely) a list; keep lists of one, leave the rest to the analysis."""
    items = _as_list(value)
    if len(items) == 1:
        return items[0]
    return None if not items else ",".join(items)


def front_matter(text: str, label: str) -> dict[str, Any]:
    """The YAML mapping between a card's leading `---` lines; {} when there is none or it cannot be parsed."""
    text = text.lstrip("\ufeff")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:  # never closed: no front matter
        return {}
    try:
        return load_front_matter("\n".join(lines[1:end]), label)
    except ConfigError:
        return {}


def read_front_matter(directory: Path, label: str) -> dict[str, Any]:
    """Front matter of `directory`/README.md ({} without one), read only if it is a regular file inside the
    directory (a ModelError names a README that points elsewhere)."""
    if confine.inside(directory, "README.md", label) is None:  # refuses a README that escapes (ModelError)
        return {}
    try:
        data = confine.read_bytes(directory, "README.md", label)
    except ModelError:  # larger than any card, or swapped for a link since: no metadata, nothing read
        return {}
    except OSError as e:
        raise ParentMetadataError(f"{label}: README.md: cannot read: {e.strerror or e}") from e
    if data is None:
        return {}
    return front_matter(data.decode("utf-8", errors="replace"), f"{label}: README.md")


def _from_metadata(ref: str, meta: dict[str, Any], **extra: Any) -> ParentInfo:
    tags = _as_list(meta.get("tags"))
    return ParentInfo(
        ref=ref,
        license=_license_value(meta.get("license")),
        license_name=_plain(meta.get("license_name")),
        license_link=_plain(meta.get("license_link")),
        languages=_as_list(meta.get("language")),
        pipeline_tag=_plain(meta.get("pipeline_tag")),
        tags=tags,
        base_models=_as_list(meta.get("base_model")),
        **extra,
    )


def parent_from_local(path: Path | str, *, ref: str | None = None, role: str | None = None) -> ParentInfo:
    """Metadata of a local model directory from its README.md front matter (missing README -> unknown license)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ParentMetadataError(f"{ref or path}: local parent directory {directory} does not exist")
    meta = read_front_matter(directory, ref or str(path))
    return _from_metadata(ref or str(path), meta, is_hub=False, revision=None, sha=None, role=role)


def parent_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    sha: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    role: str | None = None,
    ref: str | None = None,
) -> ParentInfo:
    """Metadata of a Hub parent at its pinned sha (or `revision` when not pinned yet).

    `ref` is the parent as the config wrote it (default: `repo_id`); it names the parent in cards and reports.
    """
    endpoint = resolve_endpoint(endpoint)
    at = sha or revision
    where = f"{repo_id}@{at}" if at else repo_id
    try:
        info = client(endpoint, token).model_info(repo_id, revision=at)
    except Exception as e:
        msg = errors.message("parent", e, where=where, repo=repo_id, revision=at, endpoint=endpoint)
        if msg is None:
            raise
        raise (GatedParentError if errors.kind_of(e) == "gated" else ParentMetadataError)(msg) from e
    card = info.card_data.to_dict() if info.card_data is not None else {}
    parent = _from_metadata(ref or repo_id, card, is_hub=True, revision=revision, sha=sha or info.sha, role=role)
    parent.gated = info.gated or False
    for tag in info.tags or []:  # the Hub's tags include `license:<id>` even when card data lacks it
        if tag not in parent.tags:
            parent.tags.append(tag)
    if parent.license is None:
        from_tags = [t.split(":", 1)[1] for t in parent.tags if t.startswith("license:")]
        if len(from_tags) == 1:
            parent.license = from_tags[0]
    if parent.pipeline_tag is None:
        parent.pipeline_tag = info.pipeline_tag
    return parent


def parents_from_lock(
    lock: dict[str, Any],
    *,
    base_dir: Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> list[ParentInfo]:
    """Metadata of every parent the lock lists; local refs are resolved against `base_dir` (default: cwd)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out: list[ParentInfo] = []
    for entry in lock["parents"]:
        ref = entry["ref"]
        path_or_id, ref_revision, _lora = split_ref(ref)
        local = entry.get("local")
        if local is None:
            local = looks_local(path_or_id)
        if local:
            path = Path(path_or_id).expanduser()
            out.append(parent_from_local(path if path.is_absolute() else base / path, ref=ref, role=entry.get("role")))
        else:
            out.append(parent_from_hub(path_or_id, revision=entry.get("revision") or ref_revision, sha=entry.get("sha"),
                                       endpoint=endpoint, token=token, role=entry.get("role"), ref=ref))
    return out


def union_languages(parents: Iterable[ParentInfo]) -> list[str]:
    """Languages of all parents, first-seen order."""
    seen: dict[str, None] = {}
    for p in parents:
        for lang in p.languages:
            seen.setdefault(lang, None)
    return list(seen)
