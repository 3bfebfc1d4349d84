"""The method table: every module in this package that defines `METHOD` or `METHODS` is registered.

Adding a method means adding one module (and its test); nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from mergebot.engine.methods.base import MergeMethod


def _discover() -> dict[str, MergeMethod]:
    table: dict[str, MergeMethod] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = list(getattr(module, "METHODS", ()))
        if hasattr(module, "METHOD"):
            found.append(module.METHOD)
        for method in found:
            if method.name in table:
                raise RuntimeError(f"merge method {method.name!r} registered twice")
            table[method.name] = method
    return table


METHODS: dict[str, MergeMethod] = _discover()

# Names mergekit 0.1.5 registers (merge-semantics.md §2.0) whose modules have not landed yet: none left.
PLANNED: tuple[str, ...] = ()


def closest(name: str) -> str | None:
    """The registered (or planned) method name closest to a misspelling."""
    hits = difflib.get_close_matches(name, list(METHODS) + list(PLANNED), n=1, cutoff=0.5)
    return hits[0] if hits else None
