"""Quality-check benchmark (issue 17): the check's wall time and peak memory beside the merge's own time.

Reuses bench_merge's cached bf16 Llama-shaped models (benchmarks/.cache; ~1.1B parameters, or ~0.3B with
--small), merges ft1 and ft2 linearly (0.5/0.5) once, then runs `mergebot check OUT --parents ft1 ft2` in a
subprocess, sampling its RssAnon and VmHWM every 20 ms. The check scores the built-in evaluation text with the
merge and both parents and generates 3 x 16 tokens with the merge. Prints one table row per run.
Usage: python benchmarks/bench_check.py [--small] [--device cpu|cuda|auto] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge import CONFIGS, make_models, run_merge, settle  # noqa: E402


def run_check(out: Path, parents: list[Path], device: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mergebot.cli.main", "check", str(out), "--parents", *map(str, parents), "--device", device,
           "--json", "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_hwm = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):
                    peak_hwm = max(peak_hwm, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out_text, err = proc.communicate()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"check failed ({proc.returncode}):\n{err}")
    report = json.loads(out_text)
    return {"wall_s": wall, "peak_anon_bytes": peak_anon, "peak_rss_bytes": peak_hwm, "verdict": report["verdict"],
            "timings": report["timings"], "tokens": report["merge"]["tokens"],
            "perplexity": report["merge"]["perplexity"], "ratio": report["perplexity_ratio"],
            "device": report["device"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="~0.3B models instead of ~1.1B")
    ap.add_argument("--shape", default=None, help="a bench_merge shape (e.g. 0.86b from bench_methods; overrides --small)")
    ap.add_argument("--device", default="cpu", help="the check's --device (default cpu)")
    ap.add_argument("--repeat", type=int, default=1, help="check runs; the median is reported")
    ap.add_argument("--args", default="", help="more `mergebot check` flags, e.g. '--max-new-tokens 8'")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache", help="where the benchmark models live")
    ap.add_argument("--results", type=Path, default=None, help="also write the rows here as JSON")
    args = ap.parse_args()
    shape = args.shape or ("small" if args.small else "1b")
    base, a, b = make_models(args.cache, shape)
    scratch = args.cache / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    cfg = scratch / "check-linear.yml"
    cfg.write_text(CONFIGS["linear"].format(base=base, a=a, b=b))
    out = scratch / "check-merge"
    settle()
    merge = run_merge(cfg, out)
    runs = []
    for _ in range(args.repeat):
        settle()
        runs.append(run_check(out, [a, b], args.device, args.args.split()))
    res = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    t = res["timings"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    row = {"shape": shape, "model_bytes": size, "merge": merge, **res, "wall_runs_s": [r["wall_s"] for r in runs]}
    print(f"check {shape:5s} on {res['device']:6s} wall {res['wall_s']:6.1f} s (tensors {t.get('tensors', 0):5.1f}, "
          f"merge ppl {t.get('merge_perplexity', 0):5.1f}, 2 parents ppl {t.get('parents_perplexity', 0):5.1f}, "
          f"generation {t.get('generation', 0):5.1f})  {res['tokens']} tokens  "
          f"peak anon {res['peak_anon_bytes'] / 1e9:5.2f} GB  peak RSS {res['peak_rss_bytes'] / 1e9:5.2f} GB  "
          f"model {size / 1e9:.2f} GB bf16 | merge wall {merge['wall_s']:5.1f} s, peak anon "
          f"{merge['peak_anon_bytes'] / 1e9:4.2f} GB | verdict {res['verdict']} (ratio {res['ratio']:.3f})"
          + (f"  [walls {', '.join(f'{w:.1f}' for w in row['wall_runs_s'])}; median "
             f"{statistics.median(row['wall_runs_s']):.1f}]" if len(runs) > 1 else ""), flush=True)
    if args.results:
        args.results.write_text(json.dumps([row], indent=2) + "\n")


if __name__ == "__main__":
    main()
