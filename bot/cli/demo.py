"""`mergebot demo [DIR]`: run the whole pipeline offline on small models it makes (the README's main job)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergebot.cli._output import warn
from mergebot.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline offline on small models it makes",
                       description="Make three small models, merge them with a seed-like dare_ties config, write "
                                   "the model card, license notes and lock file, and show what --push-to would publish.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("mergebot-demo"), help="work directory (default ./mergebot-demo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergebot.demo import run_demo

    result = run_demo(args.dir, progress=sys.stderr.isatty())
    m = result.merge
    warn(m.warnings)
    out = result.out_dir
    print(f"merged {m.stats.tensors} tensors ({human_bytes(m.stats.bytes_written)}) in {m.stats.seconds:.2f} s "
          f"with {m.lock['merge_method']}, seed {m.lock['random_seed']} -> {out}")
    r = result.report
    print(f"license: {r.license}{' (' + r.license_name + ')' if r.license_name else ''}, check: {r.verdict}")
    for reason in r.reasons:
        print(f"  - {reason}")
    if result.check is not None:
        print(result.check.line())
    print("a --push-to ORG/NAME would commit, in one commit:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:40s} {human_bytes(f.stat().st_size):>10s}")
    print(f"model card: {out / 'README.md'}")
    return 0
