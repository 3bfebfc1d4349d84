"""`mergebot merge CONFIG OUT_DIR`: run a merge (mergekit-yaml's flags accepted, so commands port as-is)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mergebot.action.runner_log import safe_line
from mergebot.cli._output import warn
from mergebot.cli.check import add_gate_arguments, gate_options
from mergebot.config.configfile import load
from mergebot.units import human_bytes, parse_size

if TYPE_CHECKING:
    from mergebot.builds.base import MergeOptions


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models as a YAML config says",
                       description="Merge the models named in CONFIG into OUT_DIR (safetensors, config.json, "
                                   "tokenizer, mergekit_config.yml, mergebot.lock.json). OUT_DIR appears only "
                                   "when the merge is complete.")
    p.add_argument("config", metavar="CONFIG", help="mergekit-style merge YAML")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output directory")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda[:N] (default cpu; auto picks CUDA when torch sees one)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit-yaml flag)")
    p.add_argument("--random-seed", type=int, default=None,
                   help="seed for DARE masks: the same seed gives identical bytes whatever the order, threads or device")
    p.add_argument("--rng", choices=("hash", "mergekit"), default="hash",
                   help="DARE randomness: hash (default; identical whatever the order, chunking, threads or device) "
                        "or mergekit (torch's global RNG in mergekit 0.1.5's draw order: its masks, bit for bit, on CPU)")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                   help="max bytes per output shard, with K/M/B suffixes (decimal; default 5B = 5e9 bytes)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR (only once the new merge is complete)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, resolve models (headers only), print the plan; write nothing")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the donor's tokenizer files (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy the tokenizer")
    p.add_argument("--allow-crimes", action="store_true", help="accepted for mergekit compatibility (architectures "
                   "are inferred from tensor names; shapes must still match)")
    p.add_argument("--lazy-unpickle", action="store_true",
                   help="accepted for mergekit compatibility: .bin files are always read with torch.load(weights_only=True, mmap=True)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="fuse each method's math into one loop with torch.compile: auto (default) does it for "
                        "merges of over 200M input elements when a C compiler or GPU is present")
    p.add_argument("-j", "--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--token", default=None,
                   help="deprecated: other processes can read a command line; set HF_TOKEN instead (default: "
                        "HF_TOKEN or login)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="MoE configs: allow every expert to be the same model (mergekit-moe's flag)")
    hub = p.add_argument_group("card and publishing")
    hub.add_argument("--push-to", metavar="ORG/NAME", default=None,
                     help="after the merge, publish OUT_DIR to this Hub repo in one commit (no commit if unchanged)")
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    hub.add_argument("--license", default=None, metavar="ID", help="declare this license instead of the computed one")
    hub.add_argument("--allow-license-risk", action="store_true",
                     help="publish even when the license check says block (after a human review)")
    hub.add_argument("--stream", nargs="?", const="on", default=None, choices=("auto", "on", "off"),
                     help="with --push-to: read Hub parents by HTTP range and upload each output shard as it "
                          "finishes (never the whole parents on disk); auto (default, or MERGEBOT_STREAM) streams "
                          "when OUT_DIR has less free space than the parents plus the output")
    hub.add_argument("--card-template", type=Path, default=None, metavar="PATH", help="your own Jinja2 card template")
    add_gate_arguments(hub, "auto")
    p.set_defaults(run=run)


def options_from(args: argparse.Namespace) -> MergeOptions:
    from mergebot.builds.base import MergeOptions

    return MergeOptions(out_shard_size=args.out_shard_size, device="cuda" if args.cuda else args.device,
                        random_seed=args.random_seed, force=args.force, copy_tokenizer=args.copy_tokenizer,
                        progress=not args.quiet, token=args.token, threads=args.num_threads,
                        compile=args.compile, rng=args.rng, allow_all_same_experts=args.allow_all_same)


TOKEN_FLAG_WARNING = ("--token puts the token on the command line, where other processes and shell history can "
                      "read it; set HF_TOKEN in the environment instead")


def run(args: argparse.Namespace) -> int:
    if args.token:  # still accepted, for scripts written against older versions
        warn([TOKEN_FLAG_WARNING])
    if args.quiet:  # huggingface_hub's own download bars too
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    cfg = load(args.config)
    warn(cfg.warnings)
    opts = options_from(args)
    if args.dry_run:  # headers only: no tensor data is downloaded, nothing is written
        from mergebot.builds import build_for

        plan = build_for(cfg).prepare(opts, headers_only=True)
        warn(plan.warnings)
        # tensor names come from the parents' headers: printable, but one may start with `::` (a workflow command)
        print("\n".join(safe_line(line, 10 * len(line) + 1) for line in plan.describe()))
        return 0
    from mergebot import pipeline
    from mergebot.hub.stream import stream_mode_default

    done = pipeline.run(cfg, args.out_dir, opts, push_to=args.push_to, private=args.private,
                        create_pr=args.create_pr, license_id=args.license,
                        allow_license_risk=args.allow_license_risk, template=args.card_template,
                        stream=args.stream or stream_mode_default(),
                        check=gate_options(args, args.push_to is not None, opts.device))
    result = done.merge
    if done.check is not None:
        print(done.check.line(), file=sys.stderr)
    warn(result.plan_warnings)
    report = done.report
    print(f"license: {report.license}, check: {report.verdict}", file=sys.stderr)
    warn(report.reasons if report.verdict != "ok" else [])
    if done.published is not None:
        pub = done.published
        print(("unchanged: " if not pub.changed else "published: ") + f"{pub.repo_url} @ {pub.commit}", file=sys.stderr)
    if done.streamed is not None:
        print(done.streamed.line(), file=sys.stderr)
    s = result.stats
    print(f"merged {s.tensors} tensors, {human_bytes(s.bytes_written)} in {s.seconds:.2f} s, "
          f"peak RSS {human_bytes(result.peak_rss_bytes)}{' (fused kernels)' if s.compiled else ''} -> {args.out_dir}",
          file=sys.stderr)
    return 0
