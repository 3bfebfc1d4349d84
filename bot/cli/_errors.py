"""One place that turns library errors into one line on stderr and an exit code (no traceback)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from ..errors import MergebotError


def run_guarded(fn: Callable[[], int], debug: bool) -> int:
    try:
        return fn()
    except MergebotError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output directory", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mergebot merge --dry-run ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
