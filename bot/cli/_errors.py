"""One place that turns library errors into one line on stderr and an exit code (no traceback).

The line is made safe (`runner_log.safe_line`): messages carry file names and Hub ids from configs, and in a
workflow a newline or a leading `::` in them would be read by the runner as a command."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from mergebot.action.runner_log import safe_line
from mergebot.errors import MergebotError


def run_guarded(fn: Callable[[], int], debug: bool) -> int:
    try:
        return fn()
    except MergebotError as e:
        if debug:
            traceback.print_exc()
        print(safe_line(f"error: {e}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output directory", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mergebot merge --dry-run ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
