"""The quality gate between a merge and its publication (issue 17): run the check, record it in the lock, say
in one line what it found, and stop a rejected merge before any Hub commit.

The lock's `check` record is the one source of the card's table and model-index (`report_from_record`), so a
card re-rendered later from the lock alone shows the same numbers. It holds no path, time or device: an unchanged
re-merge must give identical files (no new Hub commit), and numbers are rounded to 6 significant digits so float
noise of another machine does not count as a change either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergebot.check.engine import CheckOptions, run_check
from mergebot.check.report import (
    PASSED,
    REJECTED,
    CheckReport,
    EvalTextInfo,
    Generation,
    ModelScore,
    markdown,
    model_index,
)
from mergebot.check.tensors import TensorReport
from mergebot.check.text import BUILTIN_NAME
from mergebot.errors import CheckUnsupported, MergebotError
from mergebot.io.lockfile import read_lock, write_lock

CheckMode = Literal["on", "off", "streamed"]
CHECK_MODES: tuple[str, ...] = ("on", "off", "streamed")
SKIPPED, OFF = "skipped", "off"
DEFAULT_MAX_RATIO = 1.5


class QualityGateError(MergebotError):
    """The check rejected the merge: nothing was published. Carries the outcome for the job summary."""

    def __init__(self, message: str, outcome: GateOutcome):
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class GateOptions:
    """How the pipeline gates a publish. `mode`: on (check, publish only when it passes), off (no check, the lock
    says so), streamed (the output was uploaded shard by shard and is never whole on disk, so nothing can be
    checked: recorded as skipped)."""

    mode: CheckMode = "on"
    max_perplexity_ratio: float = DEFAULT_MAX_RATIO
    eval_text: Path | None = None
    device: str = "auto"
    log: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in CHECK_MODES:
            raise MergebotError(f"check mode {self.mode!r}: not one of {', '.join(CHECK_MODES)}")
        if not (isinstance(self.max_perplexity_ratio, (int, float)) and self.max_perplexity_ratio > 0
                and math.isfinite(self.max_perplexity_ratio)):
            raise MergebotError(f"max perplexity ratio {self.max_perplexity_ratio!r}: must be a positive number")


@dataclass
class GateOutcome:
    """What the gate decided: passed | rejected | skipped | off, the lock record, and the report when a check
    ran (None when it did not)."""

    status: str
    record: dict[str, Any]
    report: CheckReport | None = None

    @property
    def rejected(self) -> bool:
        return self.status == REJECTED

    def line(self) -> str:
        return summary_line(self.record)


def _round(x: float | None) -> float | None:
    """6 significant digits; None for a non-finite number (JSON has no NaN or Infinity)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def record_of(report: CheckReport) -> dict[str, Any]:
    """The lock's `check` record of a finished check: verdict, perplexities, ratio, text and its sha256."""
    e = report.eval_text
    degenerate = [g for g in report.generations if g.degenerate and not g.excused]
    return {
        "status": report.verdict,
        "max_perplexity_ratio": report.max_perplexity_ratio,
        "eval_text": None if e is None else {"name": e.name, "builtin": e.name == BUILTIN_NAME, "sha256": e.sha256,
                                             "bytes": e.bytes, "sections": list(e.sections), "chat": e.chat,
                                             "truncated": e.truncated},
        "merge": None if report.merge is None else {"perplexity": _round(report.merge.perplexity),
                                                    "tokens": report.merge.tokens},
        "parents": [{"ref": p.label, "perplexity": _round(p.perplexity), "ratio_basis": _round(p.ratio_basis),
                     "tokens": p.tokens, "same_tokens_as_merge": p.same_tokens_as_merge} for p in report.parents],
        "best_parent": report.best_parent,
        "perplexity_ratio": _round(report.perplexity_ratio),
        "degenerate_generation": bool(degenerate),
        "generations": [{"prompt": g.prompt, "degenerate": g.degenerate, "excused": g.excused}
                        for g in report.generations],
        "non_finite_tensors": report.tensors.non_finite_count,
        "reasons": list(report.reasons),
        "warnings": list(report.warnings),
    }


def _num(value: Any) -> float:
    """A recorded number back as a float: None (a non-finite value) reads as infinity."""
    return math.inf if value is None else float(value)


def report_from_record(record: dict[str, Any]) -> CheckReport | None:
    """The report a lock record describes, enough for the card's table and model-index (`markdown`,
    `model_index`); None for a check that did not run."""
    if record.get("status") not in (PASSED, REJECTED):
        return None
    e, m = record.get("eval_text"), record.get("merge")
    merge = None if m is None else ModelScore("this merge", _num(m["perplexity"]), math.nan, int(m["tokens"]), 0.0,
                                              ratio_basis=_num(m["perplexity"]))
    return CheckReport(
        verdict=record["status"], reasons=list(record.get("reasons", [])), model="", architecture="", device="",
        max_perplexity_ratio=float(record["max_perplexity_ratio"]), tensors=TensorReport(),
        eval_text=None if e is None else EvalTextInfo(e["name"], e["sha256"], int(e["bytes"]), list(e["sections"]),
                                                      e.get("chat", ""), truncated=bool(e.get("truncated"))),
        merge=merge,
        parents=[ModelScore(p["ref"], _num(p["perplexity"]), math.nan, int(p["tokens"]), 0.0,
                            bool(p.get("same_tokens_as_merge", True)), _num(p["ratio_basis"]))
                 for p in record.get("parents", [])],
        best_parent=record.get("best_parent"),
        perplexity_ratio=record.get("perplexity_ratio"),
        generations=[Generation(g["prompt"], "", [], g.get("degenerate"), g.get("excused"))
                     for g in record.get("generations", [])],
    )


def card_markdown(record: dict[str, Any] | None) -> str:
    """The card's quality section: the table and verdict of a check, or one line saying why none ran."""
    if record is None:
        return ""
    report = report_from_record(record)
    if report is None:
        why = record.get("reason") or record.get("status")
        return f"Quality check: not run ({why}).\n"
    return markdown(report)


def card_model_index(record: dict[str, Any] | None, name: str) -> list[dict[str, Any]]:
    """The card's `model-index` (Hub eval results): the merge's perplexity, when a check measured it."""
    report = report_from_record(record) if record else None
    return model_index(report, name) if report is not None else []


def _fmt(x: Any) -> str:
    return "inf" if x is None else f"{x:.4g}"


def summary_line(record: dict[str, Any]) -> str:
    """One line with the numbers: `quality check rejected: merge perplexity 53.3, best parent 46.1 (org/a), ratio 1.16
    > limit 1.5, degenerate generation: no`."""
    status = record.get("status")
    if status not in (PASSED, REJECTED):
        return f"quality check {status}" + (f" ({record['reason']})" if record.get("reason") else "")
    parts = []
    merge = record.get("merge")
    if merge is not None:
        parts.append(f"merge perplexity {_fmt(merge['perplexity'])}")
    best = next((p for p in record.get("parents", []) if p["ref"] == record.get("best_parent")), None)
    if best is not None:
        ratio, limit = record.get("perplexity_ratio"), record["max_perplexity_ratio"]
        ok = ratio is not None and ratio <= limit
        parts.append(f"best parent {_fmt(best['ratio_basis'])} ({best['ref']})")
        parts.append(f"ratio {_fmt(ratio)} {'<=' if ok else '>'} limit {limit:g}")
    elif merge is not None:
        parts.append("no parent to compare with")
    if record.get("non_finite_tensors"):
        parts.append(f"{record['non_finite_tensors']} non-finite tensor(s)")
    parts.append(f"degenerate generation: {'yes' if record.get('degenerate_generation') else 'no'}")
    return f"quality check {status}: " + ", ".join(parts)


def _parents(parents: list[tuple[Path, str]]) -> tuple[list[Path], list[str]]:
    """Each parent directory once (a model listed twice, or the base also listed as an input)."""
    seen: dict[Path, str] = {}
    for directory, label in parents:
        seen.setdefault(Path(directory).resolve(), label)
    return list(seen), list(seen.values())


def run_gate(out_dir: Path, parents: Callable[[], list[tuple[Path, str]]], options: GateOptions) -> GateOutcome:
    """Check `out_dir` against its parents (`parents()`: (directory, label) pairs, called only when a check runs,
    so a publish that checks nothing downloads nothing), and record the outcome in the output's lock. An
    architecture the check does not know is skipped, not rejected: the gate cannot judge it."""
    if options.mode == "off":
        outcome = GateOutcome(OFF, {"status": OFF, "reason": "turned off"})
    elif options.mode == "streamed":
        outcome = GateOutcome(SKIPPED, {"status": SKIPPED, "reason": "streamed output"})
    else:
        opts = CheckOptions(eval_text=options.eval_text, max_perplexity_ratio=options.max_perplexity_ratio,
                            device=options.device, log=options.log)
        try:
            from mergebot.check.decoder import DecoderSpec
            from mergebot.io.local import read_json_object

            DecoderSpec.from_config(read_json_object(Path(out_dir), "config.json", str(out_dir)), str(out_dir))
            dirs, labels = _parents(parents())
            report = run_check(out_dir, dirs, opts, labels=labels)
        except CheckUnsupported as e:
            outcome = GateOutcome(SKIPPED, {"status": SKIPPED, "reason": f"not supported: {e}"})
        else:
            outcome = GateOutcome(report.verdict, record_of(report), report)
    write_lock(Path(out_dir), dict(read_lock(out_dir), check=outcome.record))
    return outcome


def raise_if_rejected(outcome: GateOutcome, target: str | None) -> None:
    """The gate itself: a rejected merge stops here, before any Hub commit."""
    if outcome.rejected:
        where = f"; not published to {target}" if target else ""
        raise QualityGateError(f"{outcome.line()}{where}", outcome)
