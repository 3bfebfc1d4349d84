"""The action's inputs, read from the `INPUT_*` environment GitHub sets for a container action.

GitHub upper-cases an input id and keeps hyphens (`hf-token` -> `INPUT_HF-TOKEN`), so both spellings are read.
Every value arrives as a string; booleans and choices are checked here so a typo fails with the input's name
instead of silently meaning "false".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mergebot.errors import MergebotError

DEFAULT_CONFIGS = "merges/**/*.y*ml"
MODES = ("auto", "all", "changed", "stale", "dry-run")
LICENSE_POLICIES = ("strict", "warn")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off", "")


class ActionInputError(MergebotError):
    """An action input has a value the action cannot use."""


@dataclass
class ActionInputs:
    """What the workflow asked for. `token` is kept out of repr so it cannot end up in a log by accident."""

    configs: list[str] = field(default_factory=lambda: [DEFAULT_CONFIGS])
    namespace: str | None = None
    token: str | None = field(default=None, repr=False)
    mode: str = "auto"
    device: str = "auto"
    private: bool = False
    license_policy: str = "strict"
    force: bool = False


def input_value(env: Mapping[str, str], name: str) -> str | None:
    """`INPUT_<NAME>` as GitHub spells it (hyphens kept), else the underscore spelling; None when unset/blank."""
    upper = name.upper().replace(" ", "_")
    for key in (f"INPUT_{upper}", f"INPUT_{upper.replace('-', '_')}", f"INPUT_{upper.replace('_', '-')}"):
        value = env.get(key)
        if value is not None and value.strip():
            return value.strip()
    return None


def parse_bool(name: str, value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ActionInputError(f"input {name}: {value!r} is not a boolean (use 'true' or 'false')")


def parse_choice(name: str, value: str | None, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    v = value.strip().lower()
    if v not in choices:
        raise ActionInputError(f"input {name}: {value!r} is not one of {', '.join(choices)}")
    return v


def split_patterns(value: str | None) -> list[str]:
    """Config globs or paths separated by newlines, commas or spaces (a YAML block list works too)."""
    if value is None:
        return [DEFAULT_CONFIGS]
    items = [p.strip().lstrip("-").strip() for p in re.split(r"[,\s]+", value)]
    return [p for p in items if p] or [DEFAULT_CONFIGS]


def check_namespace(value: str | None) -> str | None:
    if value is None:
        return None
    ns = value.strip().strip("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", ns):
        raise ActionInputError(f"input namespace: {value!r} is not a Hub user or organization name")
    return ns


def read_inputs(env: Mapping[str, str] | None = None) -> ActionInputs:
    """The inputs from the environment; the token falls back to HF_TOKEN (e.g. set with `env:` in the step)."""
    env = os.environ if env is None else env
    token = input_value(env, "hf_token") or (env.get("HF_TOKEN") or "").strip() or None
    return ActionInputs(
        configs=split_patterns(input_value(env, "configs")),
        namespace=check_namespace(input_value(env, "namespace")),
        token=token,
        mode=parse_choice("mode", input_value(env, "mode"), MODES, "auto"),
        device=(input_value(env, "device") or "auto"),
        private=parse_bool("private", input_value(env, "private")),
        license_policy=parse_choice("license_policy", input_value(env, "license_policy"), LICENSE_POLICIES,
                                    "strict"),
        force=parse_bool("force", input_value(env, "force")),
    )
