"""Running without the Hub token: pull-request events.

`pull_request_target` runs with the base repository's secrets while its configs come from the fork that
opened the pull request; `pull_request` never needs a token (nothing is published from a PR). On both, the
Action treats the token as absent: it passes none to Hub calls, and for the duration of the run it removes
every credential huggingface_hub would pick up on its own (HF_TOKEN, the stored login, OIDC Trusted
Publishing) from the process and from the environment of anything it starts. Public parents still resolve;
a private or gated parent fails that config's plan, which is the price of not lending the token to a fork.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# what huggingface_hub or a child process could authenticate with (the action input too: GitHub passes it
# to the container as INPUT_HF_TOKEN / INPUT_HF-TOKEN)
CREDENTIAL_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN",
                  "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL", "INPUT_HF_TOKEN",
                  "INPUT_HF-TOKEN")
# replaced while the credentials are gone: no implicit token, and a token file that reads as empty
NEUTRAL_ENV = {"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_TOKEN_PATH": os.devnull,
               "HF_STORED_TOKENS_PATH": os.devnull}
_CONSTANTS = {"HF_HUB_DISABLE_IMPLICIT_TOKEN": True, "HF_TOKEN_PATH": os.devnull,
              "HF_STORED_TOKENS_PATH": os.devnull}


def has_credentials(env: Mapping[str, str]) -> bool:
    return any((env.get(k) or "").strip() for k in CREDENTIAL_ENV)


def token_note(event_name: str) -> str:
    return (f"{event_name}: the Hugging Face token is not used (a pull request's configs come from its author, "
            "and pull_request_target would lend them the base repository's secrets); Hub parents are read "
            "anonymously and nothing is published")


@contextmanager
def without_hub_credentials() -> Iterator[None]:
    """No Hub credential in `os.environ` nor in huggingface_hub's already-read constants until the block
    ends; everything is put back afterwards (the in-process tests and `mergebot plan` share the process)."""
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in (*CREDENTIAL_ENV, *NEUTRAL_ENV)}
    saved_constants = {k: getattr(constants, k) for k in _CONSTANTS if hasattr(constants, k)}
    try:
        for k in CREDENTIAL_ENV:
            os.environ.pop(k, None)
        os.environ.update(NEUTRAL_ENV)
        for k in saved_constants:
            setattr(constants, k, _CONSTANTS[k])
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k, v in saved_constants.items():
            setattr(constants, k, v)
