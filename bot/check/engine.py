"""`run_check`: the quality check of a merged model against its parents (issue 17), as one function.

Order matters for cost: the architecture is checked first (an unsupported model fails in milliseconds), then the
tensors (one sequential read; a non-finite tensor rejects the merge before any forward pass), then the
perplexity of the merge and of each parent, then a short greedy generation by the merge alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebot.check.decoder import DecoderSpec
from mergebot.check.forward import DEFAULT_BUDGET, LayerwiseModel
from mergebot.check.report import CheckReport, EvalTextInfo, Generation, ModelScore, decide
from mergebot.check.tensors import check_tensors
from mergebot.check.text import DEFAULT_PROMPTS, TextTokenizer, degenerate, load_eval_text, windows
from mergebot.errors import CheckUnsupported, ModelError
from mergebot.io import confine
from mergebot.io.local import read_json_object
from mergebot.io.weights import ModelWeights

# parents whose perplexity is at least vocab ** NEAR_CHANCE remove less than a fifth of a uniform guess's
# uncertainty (a 32k-vocabulary model would score over 4000; real ones score about 10 on prose)
NEAR_CHANCE = 0.8


@dataclass
class CheckOptions:
    """How a check runs. The defaults are the gate's: 1.5x the best parent's perplexity, 3 prompts x 16
    tokens, the built-in text."""

    eval_text: Path | None = None
    max_perplexity_ratio: float = 1.5
    device: str = "auto"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    window: int = 1024  # tokens per evaluated window (also capped by max_position_embeddings)
    max_eval_tokens: int = 4096  # tokens scored per model; a longer text is cut (and the report says so)
    norm_range: tuple[float, float] = (0.1, 10.0)
    budget: int = DEFAULT_BUDGET  # float32 elements per working block
    log: Callable[[str], None] | None = field(default=None, repr=False)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees one, else the CPU; cuda[:N] must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {name}: torch sees no CUDA device")
        try:
            return torch.device(name)
        except RuntimeError:
            raise ModelError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    raise ModelError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)")


def _model_dir(directory: Path, label: str) -> dict:
    """config.json of a model directory that exists and escapes nowhere."""
    if not directory.is_dir():
        raise ModelError(f"{label}: no such directory" if label == str(directory) else
                         f"{label}: {directory}: no such directory")
    confine.audit(directory, label)
    return read_json_object(directory, "config.json", label)


def _stop_ids(directory: Path, config: dict, label: str) -> set[int]:
    """End-of-sequence ids: generation_config.json first (what generate() uses), then config.json."""
    gen = confine.json_object(directory, "generation_config.json", label) or {}
    value = gen.get("eos_token_id", config.get("eos_token_id"))
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


def _perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf past float range, NaN kept (a model whose forward pass produced NaN)."""
    if math.isnan(mean_nll):
        return math.nan
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def _excuse_generations(report: CheckReport, parents: list[tuple[Path, str, dict]], opts: CheckOptions,
                        device: torch.device, vocab: int) -> None:
    """Mark the merge's degenerate generations that its parents do no better on (`Generation.excused`). Parents
    near chance level on the text (cross-entropy at least NEAR_CHANCE of a uniform guess's, e.g. random test
    models; real language models score far below) model nothing their greedy output could be judged by.
    Otherwise each parent continues the flagged prompts, and a prompt every parent loops on too is the family's
    habit (base models often loop under greedy decoding), not damage. The parents generate only when the merge
    degenerated, so a healthy merge costs no extra pass."""
    flagged = [g for g in report.generations if g.degenerate]
    if not flagged or not parents:
        return
    t0 = time.perf_counter()
    best = min((p.ratio_basis for p in report.parents if math.isfinite(p.ratio_basis)), default=math.inf)
    chance = vocab ** NEAR_CHANCE
    if best >= chance:
        for g in flagged:
            g.excused = (f"the parents are near chance level on the evaluation text (best perplexity {best:.4g} >= "
                         f"vocabulary size {vocab} ^ {NEAR_CHANCE:g} = {chance:.4g})")
    else:
        fine: set[str] = set()  # prompts some parent continues well
        for directory, name, cfg in parents:
            prompts = [g.prompt for g in flagged if g.prompt not in fine]
            if not prompts:
                break
            tok = TextTokenizer(directory, name)
            stop = _stop_ids(directory, cfg, name)
            model = LayerwiseModel(directory, name, cfg, device, opts.budget)
            for prompt, ids in zip(prompts, model.greedy([tok.encode(p) for p in prompts], opts.max_new_tokens,
                                                         stop)):
                body = ids[:-1] if ids and ids[-1] in stop else ids
                if degenerate(body, tok.decode(body)) is None:
                    fine.add(prompt)
        for g in flagged:
            if g.prompt not in fine:
                g.excused = "every parent's generation is degenerate on this prompt too"
        report.timings["parents_generation"] = time.perf_counter() - t0
    for n, g in enumerate(report.generations, 1):
        if g.excused:
            report.warnings.append(f"generation {n} is degenerate ({g.degenerate}), not held against the merge: "
                                   f"{g.excused}")


def run_check(out_dir: Path, parents: list[Path], options: CheckOptions | None = None, *,
              labels: list[str] | None = None) -> CheckReport:
    """Check the merge in `out_dir` against `parents` (model directories; `labels` names them in the report,
    default their paths). Raises CheckUnsupported when the merge's architecture is not one the forward pass
    knows (the caller may skip the check), ModelError for unreadable inputs; otherwise returns the report
    with its verdict."""
    opts = options or CheckOptions()
    start = time.perf_counter()
    log = opts.log or (lambda _msg: None)
    out_dir, parents = Path(out_dir), [Path(p) for p in parents]
    labels = list(labels) if labels is not None else [str(p) for p in parents]
    if len(labels) != len(parents):
        raise ValueError("labels must name each parent")
    label = str(out_dir)
    config = _model_dir(out_dir, label)
    spec = DecoderSpec.from_config(config, label)  # unsupported: fail before reading any weight
    device = resolve_device(opts.device)
    parent_configs = [_model_dir(p, lab) for p, lab in zip(parents, labels)]

    merge_w = ModelWeights(out_dir, label)
    parent_w = [ModelWeights(p, lab) for p, lab in zip(parents, labels)]
    tensors = check_tensors(merge_w, parent_w, opts.norm_range)
    del parent_w
    timings = {"tensors": time.perf_counter() - start}
    worst = "-" if tensors.worst_ratio is None else f"{tensors.worst_ratio:.3g}x ({tensors.worst_tensor})"
    log(f"tensors: {tensors.tensors} checked, {tensors.non_finite_count} non-finite, worst norm ratio {worst} "
        f"({timings['tensors']:.1f} s)")
    report = CheckReport(verdict="", reasons=[], model=label, architecture=spec.architecture, device=str(device),
                         max_perplexity_ratio=opts.max_perplexity_ratio, tensors=tensors, timings=timings)
    if tensors.flagged_count:
        first = tensors.flagged[0]
        report.warnings.append(f"{tensors.flagged_count} tensor(s) have a norm outside {opts.norm_range[0]:g}.."
                               f"{opts.norm_range[1]:g}x every parent's (e.g. {first.tensor}: "
                               f"{'inf' if first.ratio is None else f'{first.ratio:.3g}'}x)")
    if not tensors.finite:
        report.warnings.append("perplexity and generation skipped: the merge has non-finite tensors")
        decide(report)
        report.seconds = time.perf_counter() - start
        return report

    text = load_eval_text(opts.eval_text, out_dir)
    info = EvalTextInfo(text.name, text.sha256, text.nbytes, [n for n, _ in text.sections], text.chat)
    report.eval_text = info

    def score(directory: Path, name: str, cfg: dict, model_spec: DecoderSpec) -> tuple[ModelScore, list[list[int]]]:
        t0 = time.perf_counter()
        tok = TextTokenizer(directory, name)
        wins, cut = windows(tok, text, max(2, min(opts.window, model_spec.max_positions)), opts.max_eval_tokens)
        if not wins:
            raise ModelError(f"{name}: the evaluation text gives fewer than 2 tokens")
        model = LayerwiseModel(directory, name, cfg, device, opts.budget)
        nll, n = model.nll(wins)
        info.truncated |= cut
        ppl = _perplexity(nll / n)
        result = ModelScore(name, ppl, nll, n, time.perf_counter() - t0)
        log(f"perplexity of {name}: {ppl:.4g} over {n} tokens ({result.seconds:.1f} s)")
        return result, wins

    report.merge, merge_windows = score(out_dir, label, config, spec)
    report.merge.ratio_basis = report.merge.perplexity
    timings["merge_perplexity"] = report.merge.seconds
    report.eval_text.windows = len(merge_windows)
    scored: list[tuple[Path, str, dict]] = []  # the parents the forward pass can run, for the generation check
    for directory, name, cfg in zip(parents, labels, parent_configs):
        try:
            pspec = DecoderSpec.from_config(cfg, name)
        except CheckUnsupported as e:
            report.warnings.append(f"parent skipped: {e}")
            continue
        result, wins = score(directory, name, cfg, pspec)
        result.same_tokens_as_merge = wins == merge_windows
        result.ratio_basis = (result.perplexity if result.same_tokens_as_merge else
                              _perplexity(result.nll / report.merge.tokens))
        if not result.same_tokens_as_merge:
            report.warnings.append(f"{name}: its tokenizer splits the text differently; compared by the text's "
                                   "likelihood over the merge's token count")
        report.parents.append(result)
        scored.append((directory, name, cfg))
        timings["parents_perplexity"] = timings.get("parents_perplexity", 0.0) + result.seconds
    if report.eval_text.truncated:
        report.warnings.append(f"the evaluation text was cut to {opts.max_eval_tokens} tokens")

    if opts.prompts and opts.max_new_tokens > 0:
        t0 = time.perf_counter()
        tok = TextTokenizer(out_dir, label)
        prompt_ids = [tok.encode(p) for p in opts.prompts]
        model = LayerwiseModel(out_dir, label, config, device, opts.budget)
        stop = _stop_ids(out_dir, config, label)
        outputs = model.greedy(prompt_ids, opts.max_new_tokens, stop)
        for prompt, ids in zip(opts.prompts, outputs):
            body = ids[:-1] if ids and ids[-1] in stop else ids
            text_out = tok.decode(body)
            report.generations.append(Generation(prompt, text_out, ids, degenerate(body, text_out)))
        timings["generation"] = time.perf_counter() - t0
        log(f"generation: {len(outputs)} prompts x {opts.max_new_tokens} tokens ({timings['generation']:.1f} s)")
        _excuse_generations(report, scored, opts, device, spec.vocab)
    decide(report)
    report.seconds = time.perf_counter() - start
    return report
