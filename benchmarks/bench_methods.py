"""Every merge method, cold and warm, beside mergekit 0.1.5 and the I/O bound (issue 16's table).

Three ~0.86B-parameter bf16 Llama-shaped models (two shards each; generated once under benchmarks/.cache). For
each method, in one run of this script:
  * mergebot with a **cold** compile cache (a fresh TORCHINDUCTOR_CACHE_DIR, as on a fresh runner or
    container) and then **warm** (same cache again). `--compile auto` compiles a method's kernels only once
    the cache has met the method (mergebot.engine.fuse.marker): the cold run of a method that compiles runs
    eager, so one more run (`first_compile_s`, the one-off cost on a machine that keeps its cache) fills the
    cache before the warm run;
  * mergekit 0.1.5 on the same YAML (`--mergekit PATH/TO/mergekit-yaml`), CPU;
  * the I/O bound: read every input byte once + write and fsync an output-sized file, taken as the best of
    several runs spread over the whole script (a single run swings 3x on a shared VM);
  * peak anonymous memory of each merge (RssAnon sampled every 20 ms).
Prints one table, writes benchmarks/results.json (or --results). Usage:
    python benchmarks/bench_methods.py [--methods linear,slerp,...] [--mergekit .../mergekit-yaml] [--shape 0.86b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_merge import SHAPES, io_bound, make_models, run_merge, settle  # noqa: E402
from mergebot.engine.warmup import CONFIGS as METHODS  # noqa: E402  (every method, as users write it)

# which inputs a method reads (for the I/O bound): the base and one fine-tune, or all three
TWO_INPUTS = {"slerp", "nearswap", "arcee_fusion", "passthrough"}


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def marker_in(cache: Path, name: str) -> bool:
    """Whether a merge left `name`'s marker in this kernel cache (mergebot.engine.fuse.marker)."""
    seen = cache / "mergebot-seen"
    return seen.is_dir() and any(p.name.split("-", 1)[-1] in (name, f"{name}-portable") for p in seen.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="0.86b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml of mergekit 0.1.5, run beside each method")
    ap.add_argument("--bound-runs", type=int, default=3, help="I/O bound runs per method (the best is kept)")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--args", default="", help="more mergebot merge flags")
    ap.add_argument("--update", action="store_true",
                    help="keep the other methods' rows already in --results (each row says when it was measured)")
    ap.add_argument("--markdown", action="store_true", help="print --results as the README's table and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.results.read_text())["rows"]))
        return
    b, x, y = make_models(args.cache, args.shape)
    work = args.cache / "methods"
    work.mkdir(parents=True, exist_ok=True)
    kept = []
    before: dict[str, dict] = {}  # earlier rows of the methods measured now: their mergekit figures, if not rerun
    if args.update and args.results.exists():
        earlier = json.loads(args.results.read_text())
        kept = [dict(r, when=r.get("when", earlier["when"])) for r in earlier["rows"]
                if r["method"] not in args.methods.split(",")]
        before = {r["method"]: r for r in earlier["rows"] if r["method"] in args.methods.split(",")}
    rows: list[dict] = []
    bounds: dict[int, list[float]] = {2: [], 3: []}  # by the number of inputs read
    header = (f"{'method':17s} {'cold s':>7s} {'warm s':>7s} {'loop s':>7s} {'bound s':>7s} {'cold/bd':>7s} "
              f"{'warm/bd':>7s} {'anon GB':>7s} {'mergekit s':>10s} {'vs mk':>6s} {'mk anon GB':>10s}")
    print(header, flush=True)
    for name in args.methods.split(","):
        cfg = work / f"{name}.yml"
        layers = SHAPES[args.shape]["layers"]
        cfg.write_text(METHODS[name].format(b=b, x=x, y=y, h=layers // 2, n=layers))
        out = work / "out"
        extra = args.args.split()
        cold_dir = Path(tempfile.mkdtemp(prefix="inductor-cold-"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cold_dir)  # inherited by the merge subprocess
        settle()
        cold = run_merge(cfg, out, extra=extra)
        size = output_bytes(out)
        first_compile = None
        if marker_in(cold_dir, name):  # the method compiles here from the next run on: fill the cache
            settle()
            first_compile = run_merge(cfg, out, extra=extra)
        settle()
        warm = run_merge(cfg, out, extra=extra)  # the cache the earlier runs filled
        shutil.rmtree(cold_dir, ignore_errors=True)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        inputs = [b, x] if name in TWO_INPUTS else [b, x, y]
        for _ in range(args.bound_runs):
            settle()
            bounds[len(inputs)].append(io_bound(inputs, size, work))
        bound = min(bounds[len(inputs)])  # the best so far: the disk's speed drifts between runs
        mk = None
        if args.mergekit:
            settle()
            try:
                mk = run_merge(cfg, work / "mk-out", mergekit=args.mergekit)
            except SystemExit as e:  # a method mergekit fails on is a row, not the end of the table
                print(f"  mergekit failed on {name}: {str(e)[-200:]}", flush=True)
            shutil.rmtree(work / "mk-out", ignore_errors=True)
        row = {"method": name, "when": time.strftime("%Y-%m-%d %H:%M"),
               "shape": args.shape, "inputs": len(inputs), "cold_s": cold["wall_s"], "warm_s": warm["wall_s"],
               "first_compile_s": first_compile and first_compile["wall_s"],
               "loop_s": warm["engine_s"], "io_bound_s": bound, "bytes_written": size,
               "cold_ratio": cold["wall_s"] / bound, "warm_ratio": warm["wall_s"] / bound,
               "peak_anon_bytes": max(cold["peak_anon_bytes"], warm["peak_anon_bytes"]),
               "mergekit_s": mk["wall_s"] if mk else None,
               "mergekit_peak_anon_bytes": mk["peak_anon_bytes"] if mk else None}
        old = before.get(name)
        if mk is None and old and old.get("mergekit_s"):  # --update without --mergekit: keep mergekit's earlier
            row.update(mergekit_s=old["mergekit_s"], mergekit_peak_anon_bytes=old.get("mergekit_peak_anon_bytes"),
                       mergekit_when=old.get("mergekit_when", old.get("when")))  # figure, saying when it was taken
        rows.append(row)
        mk_s = f"{row['mergekit_s']:10.1f}" if row["mergekit_s"] else f"{'-':>10s}"
        vs = f"{warm['wall_s'] / row['mergekit_s']:6.2f}" if row["mergekit_s"] else f"{'-':>6s}"
        mk_anon = (f"{row['mergekit_peak_anon_bytes'] / 1e9:10.2f}" if row["mergekit_peak_anon_bytes"] is not None
                   else f"{'-':>10s}")
        print(f"{name:17s} {cold['wall_s']:7.1f} {warm['wall_s']:7.1f} {warm['engine_s'] or 0:7.1f} {bound:7.2f} "
              f"{row['cold_ratio']:7.2f} {row['warm_ratio']:7.2f} {row['peak_anon_bytes'] / 1e9:7.2f} {mk_s} {vs} "
              f"{mk_anon}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        save(args.results, rows, bounds, kept)  # after every row: a run cut short still leaves what it measured
    for k, runs in bounds.items():
        if runs:
            print(f"I/O bound, {k} inputs: best of {len(runs)} runs = {min(runs):.2f} s (runs ranged "
                  f"{min(runs):.2f}-{max(runs):.2f} s)", flush=True)


def markdown(rows: list[dict]) -> str:
    """The README's performance table."""
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"
    out = ["| method | measured | cold | warm | merge loop | I/O bound | warm / bound | mergekit 0.1.5 | warm / mergekit "
           "| peak anon (mergekit) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mk = r.get("mergekit_s")
        mk_anon = r.get("mergekit_peak_anon_bytes")
        vs = f"{r['warm_s'] / mk:.2f}x" if mk else "-"
        mk_mem = f"{mk_anon / 1e9:.2f} GB" if mk_anon is not None else "-"
        mk_when = f" ({r['mergekit_when']})" if r.get("mergekit_when") else ""  # mergekit measured in an earlier run
        cold = s(r['cold_s']) + (f" (first compile {s(r['first_compile_s'])})" if r.get("first_compile_s") else "")
        out.append(f"| {r['method']} | {r.get('when', '-')} | {cold} | {s(r['warm_s'])} | {s(r.get('loop_s'))} "
                   f"| {r['io_bound_s']:.2f} s | {r['warm_ratio']:.1f}x | {s(mk)}{mk_when} | {vs} "
                   f"| {r['peak_anon_bytes'] / 1e9:.2f} GB ({mk_mem}) |")
    return "\n".join(out)


def save(path: Path, rows: list[dict], bounds: dict[int, list[float]], kept: list[dict] = ()) -> None:
    """Every ratio against the best bound so far for its number of inputs, then the JSON file (`kept`: rows of
    an earlier run, left as they were measured)."""
    for row in rows:
        row["io_bound_s"] = min(bounds[row["inputs"]])
        row["cold_ratio"] = row["cold_s"] / row["io_bound_s"]
        row["warm_ratio"] = row["warm_s"] / row["io_bound_s"]
    order = list(METHODS)
    every = sorted([*kept, *rows], key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    path.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "rows": every}, indent=1) + "\n")


if __name__ == "__main__":
    main()
