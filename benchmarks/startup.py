"""Time outside the merge loop (issue 16's goal: under 1 s beyond `import torch`).

Alternates, --repeat times: `python -c "import torch"` (a bare interpreter importing torch), `mergebot --version`,
and a small linear merge (`mergebot merge`, generated ~0.3 GB models cached under benchmarks/.cache/small when
bench_merge.py made them, else three tiny ones made here), reading the merge's own loop time from its last line
("merged ... in X s"). Reports the medians and wall − loop − import torch: what start-up, the header reads,
planning, card, license check and the output's fsync cost beyond the import. Usage:
python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"startup: {' '.join(cmd[:3])} failed: {done.stderr[-500:]}")
    return wall, done.stdout + done.stderr


def _models(scratch: Path) -> list[Path]:
    small = HERE / ".cache" / "small"
    names = ["base", "ft1", "ft2"]
    if all((small / n / "config.json").is_file() for n in names):
        return [small / n for n in names]
    import torch

    from mergebot.tinymodels import make_family  # Llama-shaped safetensors models

    return make_family(scratch / "models", 3, seed=1, dtype=torch.bfloat16, layers=4, hidden=512, inter=1536,
                       vocab=8192)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    mergebot = shutil.which("mergebot") or sys.exit("startup: no `mergebot` on PATH (pip install -e .)")
    with tempfile.TemporaryDirectory(prefix="mb-startup-") as tmp:
        scratch = Path(tmp)
        base, x, y = _models(scratch)
        cfg = scratch / "linear.yml"
        cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {x}\n    parameters: {{weight: 0.5}}\n"
                       f"  - model: {y}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n")
        rows: dict[str, list[float]] = {"import torch": [], "mergebot --version": [], "merge wall": [],
                                        "merge loop": []}
        for _ in range(args.repeat):
            rows["import torch"].append(_timed([sys.executable, "-c", "import torch"])[0])
            rows["mergebot --version"].append(_timed([mergebot, "--version"])[0])
            wall, out = _timed([mergebot, "merge", str(cfg), str(scratch / "out"), "--force", "--compile", "off"])
            loop = re.search(r"merged .* in ([0-9.]+) s", out)
            if loop is None:
                sys.exit(f"startup: no 'merged ... in X s' line in the merge's output: {out[-300:]}")
            rows["merge wall"].append(wall)
            rows["merge loop"].append(float(loop.group(1)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in rows.items():
        print(f"{k:20s} median {med[k]:6.2f} s   runs {' '.join(f'{t:.2f}' for t in v)}")
    outside = med["merge wall"] - med["merge loop"]
    print(f"outside the loop     {outside:6.2f} s, beyond import torch {outside - med['import torch']:+.2f} s")


if __name__ == "__main__":
    main()
