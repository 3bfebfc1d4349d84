"""Errors a user can act on: each names the file, the key path, the YAML line and the reason."""

from __future__ import annotations

from dataclasses import dataclass


class MergebotError(Exception):
    """Base for every error shown to users as one line (no traceback without --debug)."""

    exit_code = 1


@dataclass
class ConfigError(MergebotError):
    """An invalid merge config: `file: key.path (line N): reason`."""

    file: str
    key: str | None
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file
        if self.key:
            where += f": {self.key}"
        if self.line:
            where += f" (line {self.line})"
        return f"{where}: {self.reason}"


class ModelError(MergebotError):
    """A model that cannot be found, read, or does not fit the merge (missing tensor, shape mismatch)."""


class NotSupportedYet(MergebotError):
    """Valid config language whose engine support has not landed yet."""


class OutputError(MergebotError):
    """The output directory cannot be written as asked (exists without --force, ...)."""


class CheckUnsupported(MergebotError):
    """The model is valid but the check cannot evaluate it (another architecture, another RoPE rule): the caller
    may skip the check. Exit code 3 so a script can tell it from a rejection (1) or bad input (2)."""

    exit_code = 3
