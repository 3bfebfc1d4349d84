"""Render a stranger's chat template in a child process with a deadline, a memory cap and an output cap.

A parent on the Hub (or a config's `chat_template:`) supplies Jinja that the quality gate renders before every
publish. jinja2's sandbox stops it from reaching Python objects, but not from running 10¹⁰ loop iterations
(`range` is capped at 100,000 items, nesting is not) or building a 10 GB string (`"x" * 10**5 * 10**5`): either
would stall or kill the job in-process. Here it runs in `python -E -P` on this file (no PYTHON* variables, no
script directory on the path; a `pip install --user` jinja2 still found), which imports only jinja2 (no mergebot,
no torch, ~60 ms to start) and gets a minimal environment (no token); the parent kills it at the deadline, and the
child caps its own address space, CPU time and rendered length.

The protocol: one JSON object on stdin ({template, messages, bos_token, eos_token}), one on stdout: {"text": ...}
or {"error": "<exception type>"}.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from typing import Any

RENDER_SECONDS = 10.0  # wall time for one rendering (a real template takes milliseconds)
ADDRESS_SPACE = 1 << 30  # the child's virtual memory cap
MAX_TEXT = 1 << 20  # characters of rendered chat (the built-in exchange renders to ~2 KB)


class RenderError(Exception):
    """The template failed, ran out of time or memory, or rendered too much: `reason` says which (one line)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def render(template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str) -> str:
    """The template rendered as transformers renders chat templates, bounded (module docstring)."""
    payload = json.dumps({"template": template, "messages": messages, "bos_token": bos_token,
                          "eos_token": eos_token})
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
    try:
        done = subprocess.run([sys.executable, "-E", "-P", os.path.abspath(__file__)], input=payload.encode(),
                              capture_output=True, timeout=RENDER_SECONDS, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise RenderError(f"did not finish in {RENDER_SECONDS:g} s") from None
    except OSError as e:
        raise RenderError(f"could not start the renderer: {e.strerror or e}") from None
    try:
        reply = json.loads(done.stdout[: 8 * MAX_TEXT].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        # killed by its own limits (CPU time, memory outside Python's reach) before it could answer
        raise RenderError(f"the renderer stopped (exit status {done.returncode})") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("text", reply.get("error")), str):
        raise RenderError("the renderer gave no answer")
    if "error" in reply:
        raise RenderError(reply["error"])
    return reply["text"]


def sandboxed(template: str) -> Any:
    """The template compiled as transformers compiles chat templates (trim/lstrip blocks, loop controls,
    tojson without HTML escaping, {% generation %} blocks), in jinja2's immutable sandbox."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (training-mask markers): rendered as their body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    # a fixed date: the rendered text (and so the perplexity) must not change from one day to the next
    env.globals["strftime_now"] = lambda fmt: datetime.datetime(2025, 1, 1).strftime(fmt)
    return env.from_string(template)


def _limit() -> None:
    """Cap this (child) process: address space, and CPU time a little past the parent's deadline."""
    try:
        import resource
    except ImportError:  # not POSIX: the parent's deadline still holds
        return
    for what, value in ((resource.RLIMIT_AS, ADDRESS_SPACE), (resource.RLIMIT_CPU, int(RENDER_SECONDS) + 2)):
        try:
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):
            pass


def _child() -> None:
    _limit()
    try:
        job = json.loads(sys.stdin.buffer.read(8 * MAX_TEXT + (1 << 20)).decode("utf-8"))
        text = sandboxed(job["template"]).render(messages=job["messages"], add_generation_prompt=False,
                                                 bos_token=job["bos_token"], eos_token=job["eos_token"])
        reply = ({"text": text} if len(text) <= MAX_TEXT
                 else {"error": f"rendered {len(text):,} characters, more than {MAX_TEXT:,}"})
    except MemoryError:
        reply = {"error": f"ran out of memory (capped at {ADDRESS_SPACE >> 20} MiB)"}
    except RecursionError:
        reply = {"error": "RecursionError"}
    except Exception as e:  # noqa: BLE001 - a stranger's template may fail any way
        reply = {"error": type(e).__name__}
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    _child()
