"""One place that turns library errors into one line on stderr and an exit code (no traceback)."""

from __future__ import annotations

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
