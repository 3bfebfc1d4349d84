"""Where a model reference's files are when they are local: a directory (or an earlier stage's output).

`ResolvedModel` is what every reference becomes once found, on disk or on the Hub (mergebot.hub.fetch fetches
the others, pinned to a commit sha for the card and the lock file, merge-semantics.md §1.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mergebot.config.refs import ModelRef, is_repo_id
from mergebot.errors import ModelError
from mergebot.io import confine

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")


@dataclass
class ResolvedModel:
    ref: ModelRef
    directory: Path
    is_hub: bool
    sha: str | None  # resolved commit for Hub models
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.ref)


_NAMED: ContextVar[Mapping[str, Path]] = ContextVar("named_models", default=MappingProxyType({}))


@contextmanager
def named_models(mapping: dict[str, Path]) -> Iterator[None]:
    """Within the block, a reference whose path is one of these names means that directory (the outputs of
    earlier merges of a mergekit-multi file, mergebot.builds.multi); names win over directories and repo ids."""
    token = _NAMED.set(dict(mapping))
    try:
        yield
    finally:
        _NAMED.reset(token)


def is_local(ref: ModelRef, search: list[Path]) -> Path | None:
    """The directory `ref` names, if it names one (in the Action: only inside the workspace)."""
    named = _NAMED.get().get(ref.path)
    if named is not None:
        return named
    if confine.workspace() is not None and not is_repo_id(ref.path):
        confine.local_reference(ref.path, str(ref))  # in the Action: inside the workspace, or refused
    p = Path(ref.path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + [d / p for d in search]
    for c in candidates:
        if c.is_dir():
            real = c.resolve()
            ws = confine.workspace()
            if ws is not None and not confine.is_inside(real, ws):  # e.g. a symlinked folder in the checkout
                raise ModelError(f"{ref}: this local directory leads outside the workspace")
            return real
    return None


def read_json_object(directory: Path, name: str, label: str, missing_hint: str = "") -> dict[str, Any]:
    """A JSON object file of a model or adapter directory; every problem names the model and the file."""
    text = confine.read_text(directory, name, label)
    if text is None:
        raise ModelError(f"{label}: no {name} in {directory}{missing_hint}")
    try:
        return confine.parse_object(text, detail=200)
    except confine.NotJsonObject as e:
        raise ModelError(f"{label}: {name} " + ("is not a JSON object" if e.parsed else str(e))) from None


def local_model(ref: ModelRef, directory: Path) -> ResolvedModel:
    """A model directory found on disk: audited (no link out, no special file), its config.json read."""
    if ref.revision:
        raise ModelError(f"{ref}: a revision (@{ref.revision}) only applies to Hub models; {directory} is a local "
                         "directory")
    confine.audit(directory, str(ref))
    return ResolvedModel(ref, directory, False, None, read_json_object(directory, "config.json", str(ref)))
