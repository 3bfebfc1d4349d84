"""How OpenMP's idle spin (GOMP_SPINCOUNT) changes DELLA's ranking, whose numpy key sorts run in threads of
their own between torch ops (della.descending_order): each setting in a fresh process, as libgomp reads it once
when torch loads. Reports ns per ranked element, best and median of several rounds.

Usage: python benchmarks/spin_probe.py [--spins default,10000,1000] [--rows 2048] [--cols 5632] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import statistics, sys, time, torch
from mergebot.engine.methods.task_arithmetic.della import descending_order
rows, cols, rounds = (int(a) for a in sys.argv[1:4])
g = torch.Generator().manual_seed(0)
base = torch.randn(rows, cols, generator=g).mul_(0.02).bfloat16()
ft = (base.float() + torch.randn(rows, cols, generator=g).mul_(0.002)).bfloat16()
mag = (ft.float() - base.float()).abs()  # a fine-tune's delta as DELLA ranks it: float32 of bf16 differences
step = max(1, (1 << 18) // cols)  # DELLA's row blocks (_rows.ROW_BLOCK_ELEMS)
times = []
for _ in range(rounds):
    start = time.perf_counter()
    for s in range(0, rows, step):
        block = mag[s:s + step]
        out = torch.empty(block.shape, dtype=torch.int32)
        out.scatter_(-1, descending_order(block), 7)  # what della does with the order, then more torch work
        block.mul(2).add_(1)
    times.append(time.perf_counter() - start)
print(f"{min(times) / mag.numel() * 1e9:.2f} {statistics.median(times) / mag.numel() * 1e9:.2f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spins", default="default,10000,1000")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=5632)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"DELLA ranking of a {args.rows}x{args.cols} float32 delta, {os.cpu_count()} CPUs; ns/element")
    for spin in args.spins.split(","):
        env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
        if spin != "default":
            env["GOMP_SPINCOUNT"] = spin
        r = subprocess.run([sys.executable, "-c", CHILD, str(args.rows), str(args.cols), str(args.rounds)],
                           env=env, capture_output=True, text=True, check=True)
        best, median = r.stdout.split()
        print(f"GOMP_SPINCOUNT={spin:<8} best {best:>6}  median {median:>6}", flush=True)


if __name__ == "__main__":
    main()
