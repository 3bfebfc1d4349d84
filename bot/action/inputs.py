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
from pathlib import Path

from mergebot.errors import MergebotError
from mergebot.io.confine import is_inside

DEFAULT_CONFIGS = "merges/**/*.y*ml"
MODES = ("auto", "all", "changed", "stale", "dry-run")
LICENSE_POLICIES = ("strict", "warn")
CHECK_CHOICES = ("on", "off")
STREAM_CHOICES = ("auto", "on", "off")
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
    check: str = "on"  # on | off: the quality gate before every publish
    max_perplexity_ratio: float = 1.5
    eval_text: str | None = None  # a path in the repository (confined to the workspace when the run starts)
    stream: str = "auto"  # auto | on | off: Hub parents by range, shards uploaded as they finish (mergebot.hub.stream)
    card_template: str | None = None  # a Jinja2 card template in the repository (confined like eval_text)


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


def parse_ratio(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        ratio = float(value)
    except ValueError:
        ratio = float("nan")
    if not (0 < ratio < float("inf")):
        raise ActionInputError(f"input {name}: {value!r} is not a positive number")
    return ratio


def workspace_file(name: str, value: str, workspace: Path) -> Path:
    """A file input (`eval_text`, `card_template`) as a file of the checkout, confined like config files: a
    relative path whose real location (links followed) lies inside the workspace, naming a regular file.
    Returns it relative to the workspace (mergebot.check.text resolves eval_text against the workspace)."""
    if value.startswith("~") or Path(value).is_absolute():
        raise ActionInputError(f"input {name}: {value[:200]!r} is outside the workspace: give a path relative to "
                               "the repository")
    root = workspace.resolve()
    real = (root / value).resolve()
    if not is_inside(real, root):
        raise ActionInputError(f"input {name}: {value[:200]!r} leads outside the workspace (a symbolic link "
                               "or '..'): it is read only from inside the repository")
    if not real.is_file():
        raise ActionInputError(f"input {name}: {value[:200]!r}: no such file in the repository")
    return Path(value)


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
        check=parse_choice("check", input_value(env, "check"), CHECK_CHOICES, "on"),
        max_perplexity_ratio=parse_ratio("max_perplexity_ratio", input_value(env, "max_perplexity_ratio"), 1.5),
        eval_text=input_value(env, "eval_text"),
        stream=parse_choice("stream", input_value(env, "stream") or env.get("MERGEBOT_STREAM"), STREAM_CHOICES,
                            "auto"),
        card_template=input_value(env, "card_template"),
    )
