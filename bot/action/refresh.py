"""The Action's card-only refresh: a scheduled run found a config whose weights are up to date but whose card
inputs changed (mergebot.action.staleness), so README.md and NOTICE are re-rendered and committed without a
merge (mergebot.card.refresh). The license policy applies as to a merge: `strict` blocks on a `block` verdict,
`warn` publishes it flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergebot.action.select import ConfigEntry
from mergebot.card.refresh import refresh_card
from mergebot.hub.publish import LicenseGateError

if TYPE_CHECKING:
    from mergebot.action.report import Result
    from mergebot.action.run import Runner

CARD_REFRESHED = "card-refreshed"


def refresh_in_action(runner: Runner, entry: ConfigEntry, result: Result) -> Result:
    """Refresh `entry`'s card on its target repo and fill `result` (status card-refreshed, up-to-date when
    the rendered card is the published one, blocked on a blocking license verdict)."""
    assert entry.cfg is not None and entry.repo is not None
    warn = runner.inputs.license_policy == "warn"
    try:
        done = refresh_card(entry.repo, endpoint=runner.endpoint, token=runner.inputs.token,
                            allow_license_risk=warn, search=[Path(entry.cfg.file).resolve().parent],
                            template=runner.template)
    except LicenseGateError as e:
        result.license = "block"
        return runner.fail(result, str(e), status="blocked")
    report = done.report
    result.license = f"{report.verdict} ({report.license})"
    if report.verdict == "block":
        runner.log.annotate("warning", runner.clean("card refreshed although the license check says block "
                                                    "(license_policy: warn): " + "; ".join(report.reasons)),
                            file=entry.path)
    result.commit = done.commit or done.head
    result.link = f"{done.endpoint}/{entry.repo}/commit/{result.commit}"
    if done.card_changed:
        result.status = CARD_REFRESHED
    else:
        result.status = "up-to-date"
        result.parents_changed += "; card unchanged" + (" (card inputs recorded)" if done.commit else "")
    return result
