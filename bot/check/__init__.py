"""The quality check of a merge (issue 17): finite tensors with sane norms, perplexity against the parents on a
shipped evaluation text, and a short greedy generation, computed layer by layer with bounded memory.

    report = run_check(out_dir, [parent_dir, ...], CheckOptions(max_perplexity_ratio=1.5))
    report.verdict            # "passed" | "rejected"; report.reasons says why
    report.to_json()          # everything, for the lock file and the job summary
    model_index(report, name) # the card's model-index metadata
    markdown(report)          # the card's table
"""

from mergebot.check.engine import CheckOptions, resolve_device, run_check
from mergebot.check.report import PASSED, REJECTED, CheckReport, ModelScore, markdown, model_index
from mergebot.errors import CheckUnsupported

__all__ = ["CheckOptions", "CheckReport", "CheckUnsupported", "ModelScore", "PASSED", "REJECTED", "markdown",
           "model_index", "resolve_device", "run_check"]
