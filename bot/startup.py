"""The garbage collector while a command starts up: paused, then frozen (issue 16, time outside the merge loop).

Importing torch allocates ~1M Python objects; each automatic collection of the oldest generation walks all of
them again (0.3 s of `import torch` on 2 cores), and so does the full collection at interpreter exit (~0.4 s
after a merge). `mergebot`'s entry point pauses collection (`hold`) until the merge starts (`settle`), which
moves everything alive then into the permanent generation (`gc.freeze`): the modules, never garbage, are
walked by no later collection. Reference counting frees everything else as before; only cyclic garbage made
during start-up waits for the next collection. `mergebot action` settles once its imports are done (a run may
only publish); the other commands that never merge are short and keep the collector paused until they exit.

The console script also shortens OpenMP's idle spin before torch loads (`threads`, below), fixes glibc
malloc's thresholds (`memory`) and raises its open-file limit to the hard limit (`files`)."""

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


# glibc malloc's thresholds, fixed for the console script's process (`memory`). By default they adapt: a freed
# block above the mmap threshold raises it to that block's size (up to 32 MB) and the trim threshold to twice
# that, so whether a merge's chunk-sized temporaries (1M elements: 4 MB) come back from the heap or from fresh
# pages, one page fault and one zeroed 4 KB page each, depends on which big buffer was freed last. Measured on the
# 0.86B SCE benchmark at one thread: 2.1M page faults and 8.3 s of system time by default, 0.35M and 4.9 s
# with blocks up to 32 MB served from the heap and freed memory kept. The multi-pass methods' larger buffers are
# reused by name (mergebot.engine.fuse.scratch), so they fault once per merge, not once per tensor.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the most glibc's own dynamic threshold reaches on 64-bit
TRIM_THRESHOLD = 1 << 30


def memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (MMAP_THRESHOLD, TRIM_THRESHOLD); False where the C
    library is not glibc (musl's mallopt does nothing) or a user set GLIBC_TUNABLES for malloc."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
        libc = ""
    if not libc.startswith("glibc") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


FILES_CAP = 1 << 20  # the soft open-file limit `files` asks for at most (Linux's default nr_open)


def files() -> int:
    """Raise this process's soft limit on open files to its hard limit (at most FILES_CAP); returns the soft
    limit now. Every shard of every parent stays mapped while a merge runs and each map keeps a descriptor, so a
    merge of parents with thousands of shards ran out of a 1024 soft limit (common default) that the hard limit
    (often 524288, and 1048576 in Docker) would have allowed."""
    try:
        import resource
    except ImportError:  # not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, FILES_CAP)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft



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
