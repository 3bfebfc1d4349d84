"""How fast this machine moves file bytes the ways the engine does, page cache warm: read(), page faults on a
copy-on-write map (one thread, many threads), bf16 -> float32 conversion straight from the map, and stores into a
shared writable map. A sandbox that makes page faults expensive (gVisor) shows here as a map far slower than
read(), and as faults that do not scale with threads.

Usage: python benchmarks/io_probe.py [--dir DIR] [--gib 1] [--threads 1,4,16]
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BLOCK = 16 << 20
PAGE = mmap.PAGESIZE


def timed(label: str, nbytes: int, fn) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<44} {nbytes / best / 1e9:7.2f} GB/s  ({best:.3f} s)", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/io-probe"))
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--threads", default="1,4,16")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src, dst = args.dir / "src.bin", args.dir / "dst.bin"
    size = int(args.gib * (1 << 30)) // BLOCK * BLOCK
    block = np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8).tobytes()

    def write_file() -> None:
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size // BLOCK):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)

    timed("write() + fsync", size, write_file)
    buf = bytearray(BLOCK)

    def read_file() -> None:
        with open(src, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    timed("read() into one 16 MB buffer", size, read_file)

    def touch(threads: int) -> None:
        with open(src, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        arr = np.frombuffer(mm, dtype=np.uint8)
        step = size // threads // PAGE * PAGE

        def part(arr: np.ndarray, i: int) -> int:
            end = size if i == threads - 1 else (i + 1) * step
            return int(arr[i * step:end:PAGE].sum())  # one byte per page: the cost is the fault

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, [arr] * threads, range(threads)))
        del arr
        mm.close()

    for t in [int(v) for v in args.threads.split(",")]:
        timed(f"copy-on-write map, page faults, {t} thread(s)", size, lambda t=t: touch(t))

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        def convert(threads: int) -> None:
            torch.set_num_threads(threads)
            with open(src, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            out = torch.empty(BLOCK // 2, dtype=torch.float32)
            for off in range(0, size, BLOCK):
                out.copy_(torch.frombuffer(mm, dtype=torch.bfloat16, count=BLOCK // 2, offset=off))
            mm.close()

        for t in [int(v) for v in args.threads.split(",")]:
            timed(f"map -> float32 (torch copy_), {t} thread(s)", size, lambda t=t: convert(t))

    def store() -> None:
        fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            view = np.frombuffer(mm, dtype=np.uint8)
            src_block = np.frombuffer(block, dtype=np.uint8)
            for off in range(0, size, BLOCK):
                view[off:off + BLOCK] = src_block
            del view
            mm.flush()
            mm.close()
            os.fsync(fd)
        finally:
            os.close(fd)

    timed("stores into a shared map + flush + fsync", size, store)
    src.unlink()
    dst.unlink()


if __name__ == "__main__":
    main()
