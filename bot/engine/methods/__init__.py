"""The kernels: every module in this package that defines `METHOD` or `METHODS` is registered.

A method is declared in mergebot.config.methods (its parameters, its contract, its card name: what
`mergebot validate` reads without torch) and computed by one module here; each side refuses to run without
the other. Adding a method: one kernel module (and its test), plus its row in that table.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergebot.config.methods import SPECS
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
            if SPECS.get(method.name) is None:
                raise RuntimeError(f"merge method {method.name!r} has a kernel but no row in mergebot.config.methods")
            table[method.name] = method
    missing = sorted(set(SPECS) - set(table))
    if missing:
        raise RuntimeError(f"merge methods {', '.join(missing)} are declared but have no kernel module")
    return table


METHODS: dict[str, MergeMethod] = _discover()
