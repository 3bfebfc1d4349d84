"""Shared output helpers of the commands: warnings on stderr, one safe line each."""

from __future__ import annotations

import sys

from mergebot.action.runner_log import safe_line


def warn(lines: list[str]) -> None:
    """Each warning on one safe line: they quote config values, which may hold newlines or `::`."""
    for line in lines:
        print(safe_line(f"warning: {line}"), file=sys.stderr)
