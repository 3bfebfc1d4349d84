"""What a check found, the gate's verdict, and the forms it is published in (JSON, model-index, a card table).

The verdict is computed here from the numbers alone (`decide`), so the CLI, the Action and the card can never
disagree about it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mergebot.check.tensors import TensorReport

PASSED, REJECTED = "passed", "rejected"


@dataclass
class ModelScore:
    """Perplexity of one model on the evaluation text. `ratio_basis` is the perplexity used for the gate: the
    model's own when its tokenizer gives the merge's ids, else exp(its summed NLL / the merge's token count),
    i.e. the same text's likelihood spread over the merge's tokens, so different tokenizers still compare."""

    label: str
    perplexity: float
    nll: float
    tokens: int
    seconds: float
    same_tokens_as_merge: bool = True
    ratio_basis: float = math.nan


@dataclass
class Generation:
    prompt: str
    text: str
    tokens: list[int]
    degenerate: str | None = None  # why it looks broken, or None
    # why a degenerate generation is not held against the merge: its parents do no better (every parent loops
    # on this prompt too, or they are at chance level on the evaluation text), so it is no sign of damage
    excused: str | None = None


@dataclass
class EvalTextInfo:
    name: str
    sha256: str
    bytes: int
    sections: list[str]
    chat: str
    windows: int = 0
    truncated: bool = False


@dataclass
class CheckReport:
    verdict: str
    reasons: list[str]
    model: str
    architecture: str
    device: str
    max_perplexity_ratio: float
    tensors: TensorReport
    eval_text: EvalTextInfo | None = None
    merge: ModelScore | None = None
    parents: list[ModelScore] = field(default_factory=list)
    best_parent: str | None = None
    perplexity_ratio: float | None = None
    generations: list[Generation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: tensors, perplexity, generation

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become null (JSON has no NaN or Infinity)."""
        return _finite(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "inf" if x is not None and x > 0 else "n/a"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def decide(report: CheckReport) -> None:
    """Fill `verdict`, `reasons` and the ratio: rejected for a non-finite tensor, a non-finite or too-high
    perplexity (merge over the best parent, when parents were scored), or a degenerate generation that its
    parents do not excuse (`Generation.excused`; with no parents, every degenerate generation counts)."""
    reasons: list[str] = []
    t = report.tensors
    if not t.finite:
        reasons.append(f"{t.non_finite_count} tensor(s) hold NaN or infinite values (first: {t.non_finite[0]})")
    m = report.merge
    if m is not None:
        if not math.isfinite(m.perplexity):
            reasons.append(f"the merge's perplexity is not finite ({_num(m.perplexity)})")
        scored = [p for p in report.parents if math.isfinite(p.ratio_basis) and p.ratio_basis > 0]
        if scored:
            best = min(scored, key=lambda p: p.ratio_basis)
            report.best_parent = best.label
            report.perplexity_ratio = m.perplexity / best.ratio_basis
            if not report.perplexity_ratio <= report.max_perplexity_ratio:
                reasons.append(f"perplexity {_num(m.perplexity)} is {_num(report.perplexity_ratio)}x the best "
                               f"parent's ({best.label}: {_num(best.ratio_basis)}); the gate allows "
                               f"{report.max_perplexity_ratio:g}x")
    for n, g in enumerate(report.generations, 1):
        if g.degenerate and not g.excused:
            reasons.append(f"generation {n} ({g.prompt[:40]!r}) is degenerate: {g.degenerate}")
    report.reasons = reasons
    report.verdict = REJECTED if reasons else PASSED


def model_index(report: CheckReport, model_name: str) -> list[dict[str, Any]]:
    """The card's `model-index` (Hub eval-results metadata): the merge's perplexity on the evaluation text."""
    if report.merge is None or report.eval_text is None or not math.isfinite(report.merge.perplexity):
        return []
    e = report.eval_text
    builtin = e.name.startswith("mergebot built-in")
    return [{
        "name": model_name,
        "results": [{
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": e.name, "type": "mergebot-eval-text" if builtin else "custom",
                        "args": {"sha256": e.sha256, "tokens": report.merge.tokens}},
            "metrics": [{"type": "perplexity", "value": round(report.merge.perplexity, 4), "name": "Perplexity",
                         "verified": False}],
        }],  # no `source`: the Hub requires a URL with its name, and the card itself is where this comes from
    }]


def _cell(text: str) -> str:
    """A label in a Markdown table cell: no line breaks, pipes or HTML."""
    text = " ".join(str(text).split())
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "&#124;"), ("`", "&#96;")):
        text = text.replace(a, b)
    return text[:120]


def markdown(report: CheckReport, merge_label: str = "this merge") -> str:
    """The card's section: merge vs each parent, the text used, the verdict."""
    lines = []
    if report.merge is not None:
        lines += ["| Model | Perplexity | vs best parent | Tokens |", "|:--|--:|--:|--:|"]
        best = next((p for p in report.parents if p.label == report.best_parent), None)

        def vs(score: ModelScore) -> str:
            if best is None or not math.isfinite(best.ratio_basis) or best.ratio_basis <= 0:
                return "-"
            basis = score.perplexity if score is report.merge else score.ratio_basis
            ratio = basis / best.ratio_basis
            return f"{ratio:.2f}x" if math.isfinite(ratio) and ratio < 1e5 else _num(ratio)

        lines.append(f"| **{_cell(merge_label)}** | {_num(report.merge.perplexity)} | {vs(report.merge)} | "
                     f"{report.merge.tokens} |")
        for p in report.parents:
            note = "" if p.same_tokens_as_merge else " (other tokenizer)"
            lines.append(f"| {_cell(p.label)}{note} | {_num(p.perplexity)} | {vs(p)} | {p.tokens} |")
        lines.append("")
    e = report.eval_text
    if e is not None:
        what = ", ".join(e.sections)
        chat = f"; chat rendered with {e.chat}" if e.chat else ""
        cut = " (cut to the token limit)" if e.truncated else ""
        lines.append(f"Evaluation text: {_cell(e.name)}, {e.bytes / 1000:.1f} KB ({_cell(what)}{chat}){cut}, "
                     f"sha256 `{e.sha256[:16]}`.")
    gate = (f"perplexity at most {report.max_perplexity_ratio:g}x the best parent's, " if report.parents else "")
    excused = any(g.degenerate and g.excused for g in report.generations)
    generation = "no degenerate generation its parents do not share" if excused else "no degenerate generation"
    if report.passed:
        lines.append(f"Quality gate: **passed** ({gate}{generation}, all tensors finite).")
    else:
        lines.append("Quality gate: **rejected**: " + "; ".join(_cell(r) for r in report.reasons) + ".")
    return "\n".join(lines) + "\n"
