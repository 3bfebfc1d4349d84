"""`mergebot check OUT_DIR [--parents ...]`: the quality gate of a merge (issue 17), on its own.

Exit codes (so a workflow can branch without parsing output): 0 passed, 1 rejected, 2 bad input (missing
directory, unreadable model, bad flag), 3 the architecture is not supported by the check yet (skip it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mergebot.action.runner_log import safe_line
from mergebot.errors import CheckUnsupported, MergebotError, ModelError

if TYPE_CHECKING:
    from mergebot.check import CheckReport
    from mergebot.check.gate import GateOptions

EXIT_PASSED, EXIT_REJECTED, EXIT_ERROR, EXIT_UNSUPPORTED = 0, 1, 2, CheckUnsupported.exit_code


class CheckInputError(MergebotError):
    """Anything that stops the check before a verdict: exit 2, apart from a rejection's 1."""

    exit_code = EXIT_ERROR


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help="quality-check a merged model against its parents (perplexity, generation, tensors)",
        description="Check OUT_DIR: every tensor finite and its norm near the parents'; perplexity on a "
                    "built-in multilingual text (or --eval-text) against each parent; a short greedy "
                    "generation. Runs layer by layer from the safetensors files, so memory stays bounded. "
                    "Exit 0 passed, 1 rejected, 2 bad input, 3 architecture not supported by the check yet.")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="the merged model's directory")
    p.add_argument("--parents", nargs="+", default=[], metavar="DIR_OR_REPO",
                   help="parent models to compare with: local directories or Hub ids (org/name[@revision])")
    p.add_argument("--eval-text", type=Path, default=None, metavar="FILE",
                   help="score this UTF-8 text instead of the built-in one")
    p.add_argument("--max-perplexity-ratio", type=float, default=1.5, metavar="X",
                   help="reject when the merge's perplexity exceeds X times the best parent's (default 1.5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when torch sees one)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="tokens generated per prompt (default 16; 0 skips the generation check)")
    p.add_argument("--max-eval-tokens", type=int, default=4096, metavar="N",
                   help="tokens of the evaluation text scored per model (default 4096)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--markdown", action="store_true",
                   help="print the model card's section (table of merge vs parents, text used, verdict) on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def positive_ratio(text: str) -> float:
    """--max-perplexity-ratio: a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def add_gate_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str) -> None:
    """The quality gate's flags of `merge` and `publish` (the gate itself: mergebot.check.gate)."""
    p.add_argument("--check", choices=("auto", "on", "off"), default=default,
                   help="quality check before publishing: perplexity against the parents and a short generation "
                        "(auto: on when publishing; off: publish unchecked, the card says so)")
    p.add_argument("--max-perplexity-ratio", type=positive_ratio, default=1.5, metavar="X",
                   help="the gate rejects a merge whose perplexity exceeds X times the best parent's (default 1.5)")
    p.add_argument("--eval-text", type=Path, default=None, metavar="FILE",
                   help="score this UTF-8 text instead of the built-in multilingual one")


def gate_options(args: argparse.Namespace, publishing: bool, device: str) -> GateOptions | None:
    """What `--check` asks of the pipeline: None when there is nothing to gate (auto without publishing)."""
    from mergebot.check.gate import GateOptions

    if args.check == "auto" and not publishing:
        return None
    log = (lambda msg: print(safe_line(f"check: {msg}"), file=sys.stderr, flush=True)) \
        if not getattr(args, "quiet", False) else None
    return GateOptions(mode="off" if args.check == "off" else "on", max_perplexity_ratio=args.max_perplexity_ratio,
                       eval_text=args.eval_text, device=device, log=log)


def _parent(ref: str) -> tuple[Path, str]:
    """A local directory, or a Hub model downloaded (pinned to a commit) like a merge input."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return local, ref
    from mergebot.config.refs import ModelRef, is_repo_id
    from mergebot.hub.fetch import resolve

    path, _, revision = ref.partition("@")
    if not is_repo_id(path):
        raise ModelError(f"--parents {ref}: no such directory")
    resolved = resolve(ModelRef(path, revision or None))
    return resolved.directory, ref


def _summary(report: CheckReport) -> list[str]:
    lines = [f"check: {report.verdict} ({report.model}, {report.architecture}, {report.device}, "
             f"{report.seconds:.1f} s)"]
    t = report.tensors
    worst = f"{t.worst_ratio:.3g}x ({t.worst_tensor})" if t.worst_ratio is not None else "no parent to compare"
    lines.append(f"  tensors: {t.tensors} checked, {t.non_finite_count} non-finite; worst norm ratio to the "
                 f"nearest parent: {worst}")
    if report.merge is not None:
        lines.append(f"  perplexity: merge {report.merge.perplexity:.4g} ({report.merge.tokens} tokens)")
        for p in report.parents:
            lines.append(f"  perplexity: {p.label} {p.perplexity:.4g}"
                         + ("" if p.same_tokens_as_merge else f" (as the merge's tokens: {p.ratio_basis:.4g})"))
        if report.perplexity_ratio is not None:
            lines.append(f"  ratio to the best parent ({report.best_parent}): {report.perplexity_ratio:.3f}x "
                         f"(gate {report.max_perplexity_ratio:g}x)")
    for g in report.generations:
        flag = f"  [degenerate: {g.degenerate}]" if g.degenerate else ""
        lines.append(f"  generation: {g.prompt[:50]!r} -> {g.text[:80]!r}{flag}")
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  reason: {r}" for r in report.reasons]
    return lines


def run(args: argparse.Namespace) -> int:
    from mergebot.check import CheckOptions, run_check

    if not args.max_perplexity_ratio > 0:
        raise CheckInputError("--max-perplexity-ratio must be a positive number")
    if args.max_new_tokens < 0 or args.max_eval_tokens < 2:
        raise CheckInputError("--max-new-tokens must be >= 0 and --max-eval-tokens >= 2")
    log = None if args.quiet else (lambda msg: print(safe_line(f"check: {msg}"), file=sys.stderr, flush=True))
    opts = CheckOptions(eval_text=args.eval_text, max_perplexity_ratio=args.max_perplexity_ratio,
                        device=args.device, max_new_tokens=args.max_new_tokens,
                        max_eval_tokens=args.max_eval_tokens, log=log)
    try:
        resolved = [_parent(ref) for ref in args.parents]
        report = run_check(args.out_dir, [d for d, _ in resolved], opts, labels=[lab for _, lab in resolved])
    except CheckUnsupported:
        raise
    except MergebotError as e:
        raise CheckInputError(str(e)) from None
    if args.json:
        print(report.to_json())
    elif args.markdown:
        from mergebot.check import markdown

        print(markdown(report), end="")
    else:
        for line in _summary(report):
            print(safe_line(line))
    return EXIT_PASSED if report.passed else EXIT_REJECTED
