"""PEFT's `rank_pattern` / `alpha_pattern` keys matched against module names, with a deadline.

PEFT takes each key as a regular expression (`re.match(rf"(.*\\.)?({key})$", module)`, the first key that matches
wins), and so does mergebot (mergebot.io.lora). An adapter is a stranger's file: a key like `([\\w.]+)+!` makes
Python's backtracking `re` take minutes per module name, and `re` has no timeout. Keys that are plain module names
(letters, digits, `_ - .`, anchors: no repetition, so no backtracking beyond the `(.*\\.)?` prefix) are matched
here; any other key set is matched in a child process (`python -E -P` on this file: `re` and `json` only, ~30 ms to
start) that the parent kills at the deadline and that caps its own memory and CPU time.

The protocol: one JSON object on stdin ({keys, modules}), one on stdout: {"hits": [index of the first matching key
or -1, per module]} or {"invalid": key index, "reason": re's message}.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

MATCH_SECONDS = 10.0  # wall time for all keys against all modules (real adapters take milliseconds)
ADDRESS_SPACE = 1 << 30  # the child's virtual memory cap
_PLAIN = re.compile(r"[\w.\-^$]*")


class PatternError(Exception):
    """A key is not a valid pattern (`index`, `reason`), or matching ran out of time (`index` None)."""

    def __init__(self, index: int | None, reason: str):
        super().__init__(reason)
        self.index = index
        self.reason = reason


def _match(keys: list[str], modules: list[str]) -> dict:
    compiled = []
    for i, k in enumerate(keys):
        try:
            compiled.append(re.compile(rf"(.*\.)?({k})$"))
        except re.error as e:
            return {"invalid": i, "reason": str(e)}
    return {"hits": [next((i for i, p in enumerate(compiled) if p.match(m)), -1) for m in modules]}


def first_matches(keys: list[str], modules: list[str]) -> list[int | None]:
    """Per module, the index of the first key that matches it as PEFT matches (None: no key matches); a
    PatternError for an invalid key or when matching takes over MATCH_SECONDS."""
    if not keys or not modules:
        return [None] * len(modules)
    if all(_PLAIN.fullmatch(k) for k in keys):
        reply = _match(keys, modules)
    else:
        reply = _in_child(keys, modules)
    if "invalid" in reply:
        raise PatternError(int(reply["invalid"]), str(reply["reason"]))
    return [None if i < 0 else int(i) for i in reply["hits"]]


def _in_child(keys: list[str], modules: list[str]) -> dict:
    payload = json.dumps({"keys": keys, "modules": modules}).encode()
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
    try:
        done = subprocess.run([sys.executable, "-E", "-P", os.path.abspath(__file__)], input=payload,
                              capture_output=True, timeout=MATCH_SECONDS, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise PatternError(None, f"matching its keys against the module names took over {MATCH_SECONDS:g} s "
                                 "(a pattern that backtracks catastrophically, e.g. a nested repetition like "
                                 "(a+)+?)") from None
    except OSError as e:
        raise PatternError(None, f"could not start the pattern matcher: {e.strerror or e}") from None
    try:
        reply = json.loads(done.stdout.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        reply = None
    if not isinstance(reply, dict) or not ("invalid" in reply or isinstance(reply.get("hits"), list)
                                           and len(reply["hits"]) == len(modules)):
        raise PatternError(None, f"the pattern matcher stopped (exit status {done.returncode}): out of memory "
                                 "or CPU time?")
    return reply


def _child() -> None:
    try:
        import resource

        for what, value in ((resource.RLIMIT_AS, ADDRESS_SPACE), (resource.RLIMIT_CPU, int(MATCH_SECONDS) + 2)):
            try:
                resource.setrlimit(what, (value, value))
            except (ValueError, OSError):
                pass
    except ImportError:  # not POSIX: the parent's deadline still holds
        pass
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    sys.stdout.write(json.dumps(_match(job["keys"], job["modules"])))


if __name__ == "__main__":
    _child()
