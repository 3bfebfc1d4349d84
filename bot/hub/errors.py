"""One table from the Hub client's exceptions to mergebot's one-line messages (as huggingface_hub's
`cli/_errors.py` keeps its own).

`kind_of` names what went wrong; MESSAGES says it for each place that asks the Hub something:
* `fetch`: a model's or an adapter's files (mergebot.hub.fetch), `download`: the download itself;
* `parent`: a parent's metadata for the card and the license analysis (mergebot.hub.parents);
* `current`: the commit a parent's revision points at now, for a scheduled re-merge (mergebot.action.staleness).
A None cell lets the exception through. Messages never carry the token or a request's headers.
"""

from __future__ import annotations

from typing import Any, Literal

Kind = Literal["gated", "repo", "revision", "offline", "http", "network", "other"]
Place = Literal["fetch", "download", "parent", "current"]

# transport libraries of huggingface_hub's HTTP client: their errors are the network's, not the Hub's answer
TRANSPORT_MODULES = ("httpx2", "httpcore2", "httpx", "httpcore")

_REACH = "{who}: cannot reach the Hub: {error}"
_DOWNLOAD = "{who}: download failed: {error}"
_CURRENT_MISSING = "parent {repo}: no such model on {endpoint} (or it is private and the token cannot see it)"
_CURRENT = "parent {where}: cannot read its current commit from {endpoint} ({type})"

MESSAGES: dict[Place, dict[Kind, str | None]] = {
    "fetch": {
        "gated": "{who}: gated repo on the Hub: accept its terms on the model page and use a token (HF_TOKEN) of an "
                 "account that has access",
        "repo": "{who}: not a local directory, and no such {noun} on the Hub (or it is private)",
        "revision": "{who}: revision {revision!r} not found on the Hub",
        "offline": _REACH, "http": _REACH, "network": _REACH, "other": None,
    },
    "download": {"gated": _DOWNLOAD, "repo": _DOWNLOAD, "revision": _DOWNLOAD, "offline": _DOWNLOAD,
                 "http": _DOWNLOAD, "network": _DOWNLOAD, "other": None},
    "parent": {
        "gated": "parent {where} is gated on {endpoint}: accept its terms at {endpoint}/{repo} with the account "
                 "whose token mergebot uses",
        "repo": "parent {repo}: repository not found on {endpoint} (or private and the token has no access)",
        "revision": "parent {where}: revision {revision!r} not found on {endpoint}",
        "offline": "parent {where}: HF_HUB_OFFLINE is set, cannot read its metadata",
        "http": "parent {where}: {endpoint} answered HTTP {status}",
        "network": "parent {where}: cannot reach {endpoint} ({type}); check the network or HF_ENDPOINT",
        "other": None,
    },
    "current": {
        "gated": _CURRENT_MISSING, "repo": _CURRENT_MISSING,
        "revision": "parent {where}: revision not found on {endpoint}",
        "offline": _CURRENT, "http": _CURRENT, "network": _CURRENT, "other": _CURRENT,
    },
}


def is_transport(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in TRANSPORT_MODULES


def kind_of(e: BaseException) -> Kind:
    """What went wrong, from the exception huggingface_hub (or its transport) raised."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError too: asked first
        return "gated"
    if isinstance(e, (RepositoryNotFoundError, HFValidationError)):  # an id the Hub cannot hold names no repo
        return "repo"
    if isinstance(e, RevisionNotFoundError):
        return "revision"
    if isinstance(e, OfflineModeIsEnabled):
        return "offline"
    if isinstance(e, HfHubHTTPError):
        return "http"
    if isinstance(e, OSError) or is_transport(e):
        return "network"
    return "other"


def message(place: Place, e: BaseException, **fields: Any) -> str | None:
    """The one-line message for `e` at `place` (None: not one of its failures, let it through). `fields` fill
    the place's templates: who, noun, revision (fetch); where, repo, revision, endpoint (parent, current)."""
    template = MESSAGES[place][kind_of(e)]
    if template is None:
        return None
    response = getattr(e, "response", None)
    status = response.status_code if response is not None else "?"
    first = (str(e).splitlines() or [""])[0]
    return template.format(error=f"{type(e).__name__}: {first}", type=type(e).__name__, status=status, **fields)
