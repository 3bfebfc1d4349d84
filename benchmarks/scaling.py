"""Thread scaling of one merge on this machine: the same merge at several OMP_NUM_THREADS settings, eager and
compiled, and at several GOMP_SPINCOUNT settings (libgomp's default 300000 vs mergebot's 10000, mergebot.startup),
reporting wall and merge-loop time. With --profile, py-spy samples the largest setting's merge
(native frames included) into a collapsed-stack file, to see what does not scale.

Usage: python benchmarks/scaling.py [--shape small|1b] [--threads 2,4,8,16] [--spins 300000,10000] [--method dare_ties]
       [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_merge import CONFIGS, ROOT, make_models, run_merge  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small")
    ap.add_argument("--threads", default="2,4,8,16")
    ap.add_argument("--method", default="dare_ties")
    ap.add_argument("--compile", default="off,on", help="compile modes to run (on: one warm-up run first)")
    ap.add_argument("--spins", default="10000", help="GOMP_SPINCOUNT values to run (300000: libgomp's default)")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy output directory for the last setting")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (native unwinding of many "
                    "threads slows the merge: use a low rate on many cores)")
    ap.add_argument("--profile-timeout", type=float, default=None, help="stop the profiled run after this many seconds")
    args = ap.parse_args()
    base, a, b = make_models(args.cache, args.shape)
    cfg = args.cache / f"{args.method}.yml"
    cfg.write_text(CONFIGS[args.method].format(base=base, a=a, b=b))
    out = args.cache / "out"
    print(f"{'threads':>7} {'compile':>7} {'spin':>7} {'wall s':>8} {'loop s':>8}", flush=True)
    for mode in args.compile.split(","):
        if mode == "on":  # compile once so the timed runs read a warm cache
            run_merge(cfg, out, extra=["--compile", "on"])
        for t in [int(v) for v in args.threads.split(",")]:
            for spin in args.spins.split(","):
                os.environ["OMP_NUM_THREADS"], os.environ["GOMP_SPINCOUNT"] = str(t), spin
                r = run_merge(cfg, out, extra=["--compile", mode])
                print(f"{t:7d} {mode:>7} {spin:>7} {r['wall_s']:8.2f} {r['engine_s'] or float('nan'):8.2f}", flush=True)
    os.environ.pop("GOMP_SPINCOUNT", None)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        t = max(int(v) for v in args.threads.split(","))
        os.environ["OMP_NUM_THREADS"] = str(t)
        shutil.rmtree(out, ignore_errors=True)
        mode = args.compile.split(",")[0]
        cmd = ["py-spy", "record", "--native", "--rate", str(args.profile_rate), "--format", "raw", "--threads", "-o",
               str(args.profile / f"pyspy-{args.method}-{t}t-{mode}.txt"), "--", sys.executable, "-m", "mergebot.cli.main",
               "merge", str(cfg), str(out), "--quiet", "--compile", mode, "--random-seed", "1"]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.profile_timeout)
        except subprocess.TimeoutExpired:
            print(f"profile stopped after {args.profile_timeout} s", flush=True)
            return
        print(f"profiled {t} threads ({mode}) in {time.perf_counter() - start:.1f} s: rc {done.returncode}",
              done.stderr[-500:], flush=True)


if __name__ == "__main__":
    main()
