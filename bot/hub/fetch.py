"""Where a model reference's files are: a local directory, or a Hub repo pinned to a commit sha.

Hub models are fetched with huggingface_hub at the requested revision, only the files a merge needs
(safetensors shards + index, or `.bin` when there are no safetensors; json and tokenizer files), and the
resolved commit sha is recorded for the card and the lock file (merge-semantics.md §1.1 Hub download).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mergebot.io import confine
from mergebot.config.refs import ModelRef, is_repo_id
from mergebot.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")


@dataclass
class ResolvedModel:
    ref: ModelRef
    directory: Path
    is_hub: bool
    sha: str | None  # resolved commit for Hub models
    config: dict

    @property
    def label(self) -> str:
        return str(self.ref)


_NAMED: ContextVar[dict[str, Path]] = ContextVar("named_models", default={})


@contextmanager
def named_models(mapping: dict[str, Path]) -> Iterator[None]:
    """Within the block, a reference whose path is one of these names means that directory (the outputs of
    earlier merges of a mergekit-multi file, mergebot.config.multi); names win over directories and repo ids."""
    token = _NAMED.set(dict(mapping))
    try:
        yield
    finally:
        _NAMED.reset(token)


def is_local(ref: ModelRef, search: list[Path]) -> Path | None:
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


def resolve(ref: ModelRef, search: list[Path] | None = None, *, download: bool = True,
            token: str | None = None) -> ResolvedModel:
    """Find a model's files; for Hub models pin the revision to a commit sha and download what is needed."""
    local = is_local(ref, search or [])
    if local is not None:
        if ref.revision:
            raise ModelError(f"{ref}: a revision (@{ref.revision}) only applies to Hub models; {local} is a local directory")
        confine.audit(local, str(ref))
        return ResolvedModel(ref, local, False, None, _read_config(local, str(ref)))
    if not is_repo_id(ref.path):
        raise ModelError(f"{ref}: no such local directory, and not a Hugging Face repo id")
    return _from_hub(ref, download=download, token=token)


def read_json_object(directory: Path, name: str, label: str, missing_hint: str = "") -> dict:
    """A JSON object file of a model or adapter directory; every problem names the model and the file."""
    text = confine.read_text(directory, name, label)
    if text is None:
        raise ModelError(f"{label}: no {name} in {directory}{missing_hint}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{label}: {name} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{label}: {name} is not a JSON object")
    return data


def _read_config(directory: Path, label: str) -> dict:
    return read_json_object(directory, "config.json", label)


def _from_hub(ref: ModelRef, *, download: bool, token: str | None) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    try:
        info = api.model_info(ref.path, revision=ref.revision, files_metadata=False)
    except GatedRepoError:
        raise ModelError(f"{ref}: gated repo on the Hub: accept its terms on the model page and use a token "
                         "(HF_TOKEN) of an account that has access") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{ref}: not a local directory, and no such model on the Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref}: revision {ref.revision!r} not found on the Hub") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"{ref}: cannot reach the Hub: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    sha = info.sha
    names = [s.rfilename for s in (info.siblings or [])]
    weights = ["*.safetensors", "*.safetensors.index.json"] if any(n.endswith(".safetensors") for n in names) \
        else ["*.bin", "*.bin.index.json"]
    patterns = weights + ["*.json", "tokenizer.model", "merges.txt", "*.jinja", "LICENSE*", "LICENCE*", "USE_POLICY*",
                          "NOTICE*"]
    if not download:
        patterns = ["*.json", "*.jinja", "tokenizer.model"]
    try:
        directory = snapshot_download(ref.path, revision=sha, allow_patterns=patterns, token=token,
                                      endpoint=os.environ.get("HF_ENDPOINT"))
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"{ref}: download failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    d = Path(directory)
    confine.audit(d, str(ref))
    return ResolvedModel(ref, d, True, sha, _read_config(d, str(ref)))
