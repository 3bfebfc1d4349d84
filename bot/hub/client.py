"""The one way mergebot reaches the Hub: the endpoint, the token and the client.

huggingface_hub reads `HF_ENDPOINT` once, at import; mergebot reads it when it is asked (`resolve_endpoint`), so a
workflow step or a test can point a running process elsewhere. The token is an explicit one, else `HF_TOKEN`,
else huggingface_hub's stored login. huggingface_hub itself is imported only when a call needs it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mergebot import __version__

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def resolve_endpoint(explicit: str | None = None) -> str:
    """Explicit endpoint, else `HF_ENDPOINT` read now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (explicit or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(explicit: str | None = None) -> str | None:
    """Explicit token, else HF_TOKEN, else huggingface_hub's stored login (or OIDC when configured)."""
    if explicit:
        return explicit
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    from huggingface_hub import get_token

    return get_token()


def client(endpoint: str | None = None, token: str | bool | None = None) -> HfApi:
    """An HfApi for `endpoint` (default: `resolve_endpoint()`), identifying itself as mergebot. `token` None lets
    huggingface_hub find one, False sends none."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=resolve_endpoint(endpoint), token=token, library_name="mergebot",
                 library_version=__version__)
