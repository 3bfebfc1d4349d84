"""Optional kernel fusion: method kernels run eagerly, or compiled by torch.compile (inductor) into one loop.

Eager torch makes one memory pass per operation; a DARE-TIES kernel has ~20 of them, which is what made
naive merges 10-30x slower than the I/O floor (performance-notes.md). Compiled, the same Python function
becomes one fused C++/Triton loop. Results are bit-identical to eager for our integer RNG and within float32
rounding otherwise (tests check both). `auto` compiles only for large merges: compiling costs seconds the
first time (cached on disk after that), more than tiny merges take.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch


class Kernel(Protocol):
    """A fusable kernel: the function as written, callable with `out=`; `eager` is the uncompiled function."""

    eager: Callable[..., torch.Tensor]

    def __call__(self, *args: Any, out: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor: ...


_state = {"on": False}
AUTO_MIN_ELEMENTS = 200_000_000
# `auto` for a method this kernel cache has never met (`marker`): a fresh machine, runner or container without
# mergebot's image, where compiling the method's kernels costs 17-35 s on 2 cores while its eager form loses
# 2-4.4 s per 1e9 elements read against them (dare_ties of three 0.86B models, 2.5e9 elements: eager 20.6-21 s,
# compiled 9.6-15.8 s warm and 27-50 s cold, 2026-11-27 and 28 on this drifting VM). A cold compile thus
# repays itself within the merge from 4e9-17e9 elements read; 8e9 (three 2.7B models) splits the difference, and
# the point moves up on more cores, where the eager passes gain threads and the compile does not (and with faster
# eager forms: eager DARE and RAM have since got 1.3-2x faster, so the break-even is now higher). Once the method
# has run here (`remember`), the cache is a machine's that persists: `auto` compiles from then on, at
# AUTO_MIN_ELEMENTS, and the compile is paid once.
AUTO_COLD_MIN_ELEMENTS = 8_000_000_000


def compiler_available() -> bool:
    """Whether Inductor's C++ compiler is here (a slim image has none: kernels then stay eager)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++") if c)


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels: torch._inductor.runtime.cache_dir_utils.cache_dir's rule, without
    importing torch._inductor (1 s here) for a merge that may not compile (tests compare the two)."""
    where = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if where is None:
        try:
            user = getpass.getuser()
        except (KeyError, ModuleNotFoundError, OSError):
            getuid = getattr(os, "getuid", None)
            user = f"uid_{getuid()}" if callable(getuid) else "unknown_user"
        where = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return Path(os.path.abspath(where))


def marker(kernels: str) -> Path:
    """The file that says this method (`kernels`: its name) has run with this kernel cache and this torch, for
    this kind of build (portable or native), so `auto` compiles it: written after every CPU merge of a method
    that compiles (`remember`), including the image's warm-up. Removing the cache removes it."""
    portable = "-portable" if os.environ.get("MERGEBOT_PORTABLE_KERNELS") == "1" else ""
    return inductor_cache_dir() / "mergebot-seen" / f"{torch.__version__}-{kernels}{portable}"


def remember(kernels: str) -> None:
    """Record that `kernels` ran with this cache (best effort: a read-only cache stays unmet)."""
    try:
        path = marker(kernels)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass


def configure(mode: str, total_elements: int, benefits: bool = True, device: str = "cpu",
              kernels: str | None = None) -> bool:
    """mode: on | off | auto. Returns whether kernels will be compiled. `benefits`: the method's eager form
    is slow (many passes, e.g. DARE's hash RNG); methods with a fast in-place eager form say False, since
    loading compiled kernels costs seconds per process even with a warm cache, and stay eager in every mode.
    `kernels`: the method's name, to look for its `marker`; without one (the method never ran with this cache),
    `auto` compiles only merges large enough to repay a cold compile (AUTO_COLD_MIN_ELEMENTS).

    `auto` never compiles for CUDA: on a GPU the eager passes run at device-memory speed, far above the
    host-to-device copies that bound the merge. Measured on an H100, dare_ties of three 1.1B-parameter
    models: engine 5.8 s eager, 11 s compiled with a warm Triton cache, 50 s with a cold one (every fresh
    runner or container)."""
    if device != "cpu":
        # GPU kernels stay eager in every mode: Triton's compiled division rounds differently from eager
        # CUDA (measured on an H200: compiled TIES differed from eager in the last bit), and eager already
        # runs at device-memory speed, far above the host-to-device copies that bound the merge
        on = False
    elif mode == "off" or not benefits:
        # a method without the benefit has one in-place eager form (linear, slerp: fused multiply-adds, as
        # mergekit computes them) and keeps it even with --compile on, so its bytes never depend on the mode
        on = False
    elif mode == "on":
        on = True
    else:
        least = AUTO_MIN_ELEMENTS if kernels is None or marker(kernels).exists() else AUTO_COLD_MIN_ELEMENTS
        on = device == "cpu" and total_elements >= least and compiler_available()
    _state["on"] = on
    if on:
        # each merge compiles as a fresh process would: which graphs Dynamo makes depends on the calls it saw
        # before (a kernel shared by two methods is recompiled with other guards for the second), and a
        # fresh process's graphs are the ones the image's cache holds (mergebot.engine.warmup); an Action run
        # merging several configs in one process would otherwise compile again from its second config on
        import torch._dynamo
        torch._dynamo.reset()
        # Triton fuses a*b + c into an FMA unless told to emulate eager's roundings: compiled CUDA kernels
        # must give the eager bytes (the C++ backend already builds with -ffp-contract=off)
        import torch._inductor.config as inductor_config
        inductor_config.emulate_precision_casts = True
        # kernels read the thread count when they run instead of baking in the compiling process's: one compiled
        # kernel (e.g. the image's, mergebot.engine.warmup) serves every -j and core count without a recompile
        inductor_config.cpp.dynamic_threads = True
        if os.environ.get("MERGEBOT_PORTABLE_KERNELS") == "1" and platform.machine() in ("x86_64", "AMD64"):
            # the image's prebuilt kernels (mergebot.engine.warmup) must run on any runner's CPU: not -march=native
            # (the build machine's; a kernel with its AVX-512 would crash on a runner without) but x86-64-v2, with
            # AVX2 vectors: found in the cache, and safe, on every x86 GitHub runner
            inductor_config.cpp.march = "x86-64-v2"
            inductor_config.cpp.simdlen = 256
    return on


def enabled() -> bool:
    return _state["on"]


def fusable_with(**inductor: Any) -> Callable[[Callable[..., torch.Tensor]], Kernel]:
    """`fusable`, with Inductor settings for this kernel alone (they are part of its cache key)."""
    return functools.partial(fusable, inductor=inductor)


def fusable(fn: Callable[..., torch.Tensor], inductor: dict[str, Any] | None = None) -> Kernel:
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
            compiled[key] = torch.compile(into if key else fn, dynamic=True, options=known_options(inductor))
        return compiled[key](*args, **kwargs) if out is None else compiled[key](out, *args, **kwargs)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return cast(Kernel, wrapper)


def known_options(inductor: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Inductor settings this torch knows: a setting is a speed hint, and torch.compile raises on a name its
    version lacks (torch 2.11 has no realize_cpu_opcount_threshold), which failed every compiled merge there."""
    if not inductor:
        return inductor
    import torch._inductor.config as inductor_config

    def known(name: str) -> bool:
        node: Any = inductor_config
        for part in name.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    return {k: v for k, v in inductor.items() if known(k)}


_scratch: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}


def scratch(tag: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable work buffer of n elements: eager kernels write into it in place, so no pass allocates
    (fresh allocations of chunk-sized tensors cost page faults that dominate simple merges)."""
    key = (tag, dtype, str(device))
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = _scratch[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]
