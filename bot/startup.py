"""The garbage collector while a command starts up: paused, then frozen (issue 16, time outside the merge loop).

Importing torch allocates ~1M Python objects; each automatic collection of the oldest generation walks all of
them again (0.3 s of `import torch` on 2 cores), and so does the full collection at interpreter exit (~0.4 s
after a merge). `mergebot`'s entry point pauses collection (`hold`) until the merge starts (`settle`), which
moves everything alive then into the permanent generation (`gc.freeze`): the modules, never garbage, are
walked by no later collection. Reference counting frees everything else as before; only cyclic garbage made
during start-up waits for the next collection. `mergebot action` settles once its imports are done (a run may
only publish); the other commands that never merge are short and keep the collector paused until they exit.

The console script also shortens OpenMP's idle spin before torch loads (`threads`, below)."""

from __future__ import annotations

import gc
import os
import sys

_held = False

# OpenMP's idle wait before a worker thread sleeps, in spins (GNU libgomp, which torch's CPU wheels ship, reads
# it once when torch loads; 300000 by default). A torch op's workers spin that long after every parallel
# region, on the very cores (or hyper-thread siblings) that numpy's threaded sorts and the file readers need
# next. benchmarks/spin_probe.py, DELLA's ranking on 2 vCPUs: 21.5 ns/element at the default, 11.8 at 10000,
# 8.6 at 1000; whole 0.86B merges of linear, TIES, dare_ties and DELLA ran as fast at 1000 as at 10000.
SPINCOUNT = "10000"


def threads() -> None:
    """Set the OpenMP spin wait for this process (the console script's, before torch loads; a value the user
    set wins). In-process callers that have already imported torch keep theirs."""
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)


def hold() -> bool:
    """Pause automatic collection; returns whether it was enabled (for `restore`)."""
    global _held
    was = gc.isenabled()
    gc.disable()
    _held = True
    return was


def settle() -> None:
    """Start-up is over (the merge is about to run): freeze what exists and collect again. No-op unless held,
    so library callers (tests, `run_merge` from Python) keep their collector as they set it."""
    global _held
    if _held:
        _held = False
        gc.freeze()
        gc.enable()


def restore(was: bool) -> None:
    """For an in-process caller of the entry point: its collector as it was, frozen objects included."""
    global _held
    _held = False
    gc.unfreeze()
    if was:
        gc.enable()
    else:
        gc.disable()


def exiting() -> None:
    """The process is about to end: freeze everything, so that the interpreter's full collection at exit
    walks nothing (the operating system frees the memory anyway)."""
    gc.freeze()
