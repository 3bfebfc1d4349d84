"""Optional kernel fusion: method kernels run eagerly, or compiled by torch.compile (inductor) into one loop.

Eager torch makes one memory pass per operation; a DARE-TIES kernel has ~20 of them, which is what made
naive merges 10-30x slower than the I/O floor (performance-notes.md). Compiled, the same Python function
becomes one fused C++/Triton loop. Results are bit-identical to eager for our integer RNG and within float32
rounding otherwise (tests check both). `auto` compiles only for large merges: compiling costs seconds the
first time (cached on disk after that), more than tiny merges take.
"""

from __future__ import annotations

import functools
import shutil
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_state = {"on": False}
AUTO_MIN_ELEMENTS = 200_000_000


def compiler_available() -> bool:
    return shutil.which("gcc") is not None or shutil.which("cc") is not None or torch.cuda.is_available()


def configure(mode: str, total_elements: int) -> bool:
    """mode: on | off | auto. Returns whether kernels will be compiled."""
    if mode == "off":
        on = False
    elif mode == "on":
        on = True
    else:
        on = total_elements >= AUTO_MIN_ELEMENTS and compiler_available()
    _state["on"] = on
    return on


def enabled() -> bool:
    return _state["on"]


def fusable(fn: F) -> F:
    """Mark a pure tensor kernel; it runs compiled (dynamic shapes, no recompiles per size) when enabled.

    Called with `out=`, the result is stored into `out` (e.g. the output file's mapped pages); compiled,
    that store is part of the same fused loop, so no intermediate result tensor is ever allocated.
    """
    compiled: dict[bool, Callable] = {}

    def into(out: torch.Tensor, *args, **kwargs):
        out.copy_(fn(*args, **kwargs))
        return out

    @functools.wraps(fn)
    def wrapper(*args, out: torch.Tensor | None = None, **kwargs):
        if not _state["on"]:
            return fn(*args, **kwargs) if out is None else into(out, *args, **kwargs)
        key = out is not None
        if key not in compiled:
            compiled[key] = torch.compile(into if key else fn, dynamic=True)
        return compiled[key](*args, **kwargs) if out is None else compiled[key](out, *args, **kwargs)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
