"""The one place where the Action writes to the runner: log lines, workflow commands, job summary, outputs.

Everything in a run's log is read by the runner: a line that starts with `::` (after leading blanks) is a
workflow command, and `::error::…` or `::add-mask::…` from a config's file name, a Hub id or an exception
message would be obeyed. Configs come from anyone who can push, so every text that reaches the runner from
here is made safe for where it lands:

- workflow-command data escapes `%`, CR and LF (`%25`, `%0D`, `%0A`); properties also `:` and `,`
  (`%3A`, `%2C`); other control characters are shown escaped;
- any other log line is one line: control characters (newlines, ANSI escapes, bidi overrides, bytes of a
  file name that is not UTF-8) are shown as `\\n`, `\\x1b`, `\\u202e`…, long values are cut, and a line
  that would still start with `::` or `##[` gets a `> ` in front;
- job-summary Markdown shows user text as text: HTML and Markdown punctuation become character references;
- step outputs use a random heredoc delimiter that does not occur in the value.

Secrets are replaced by `***` before any escaping (escaping would change how they are spelled).
"""

from __future__ import annotations

import secrets as _secrets
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

MAX_VALUE = 300  # a file name, repo id or ref shown inside a line
MAX_MESSAGE = 1000  # one message (an error, a warning, a note)
MAX_TRACEBACK_FRAMES = 25

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# user text never sits in an attribute, so quotes stay; Markdown punctuation goes so it cannot format or link
_MD = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "`": "&#96;", "*": "&#42;", "_": "&#95;",
       "[": "&#91;", "]": "&#93;", "\\": "&#92;", "~": "&#126;", "#": "&#35;", "!": "&#33;"}


# ------------------------------------------------------------------------------------------------ plain text

def _escaped_char(c: str) -> str | None:
    """How `c` is shown in a log line, or None when it is shown as itself."""
    o = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
        return f"\\x{o:02x}"
    if c in _BIDI or c in "\u2028\u2029" or 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return None


def has_control(text: str) -> bool:
    """True when `text` holds a character `one_line` would escape (a refused config file name)."""
    return any(_escaped_char(c) is not None for c in text)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:max(limit - 1, 0)] + "…"


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """`text` as one printable line: control characters escaped, at most `limit` characters."""
    s = _safe_str(text)
    return truncate("".join(_escaped_char(c) or c for c in s), limit)


def display_name(path: str) -> str:
    """A file name as annotations, the summary and outputs show it (escaped, at most MAX_VALUE)."""
    return one_line(path, MAX_VALUE)


def safe_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """A log line that the runner cannot read as a command."""
    s = one_line(text, limit)
    return "> " + s if s.lstrip().startswith(("::", "##[")) else s


def _safe_str(value: object) -> str:
    """str(value), even for exceptions whose __str__ fails or says nothing (MemoryError)."""
    try:
        s = value if isinstance(value, str) else str(value)
    except Exception:  # a hostile or broken __str__
        s = f"<unprintable {type(value).__name__}>"
    return s


def exception_message(e: BaseException, limit: int = MAX_MESSAGE) -> str:
    """`Type: message` on one line, for an unexpected exception."""
    text = _safe_str(e)
    return one_line(f"{type(e).__name__}: {text}" if text else type(e).__name__, limit)


# ------------------------------------------------------------------------------------------ workflow commands

def escape_data(text: object) -> str:
    """Workflow-command data: the runner turns %25/%0D/%0A back into %, CR, LF; other controls shown escaped."""
    s = _safe_str(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return "".join(_escaped_char(c) or c for c in s)


def escape_property(text: object) -> str:
    """A workflow-command property value (file=, title=): data escaping plus `:` and `,`."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, data: object = "", **props: object) -> str:
    """`::name k=v,…::data`; `name` is ours (never user text), props and data are escaped."""
    items = [f"{k}={escape_property(v)}" for k, v in props.items() if v is not None and v != ""]
    return f"::{name}{' ' + ','.join(items) if items else ''}::{escape_data(data)}"


def annotation(level: str, message: object, *, file: str | None = None, line: int | None = None,
               title: str | None = None) -> str:
    """`::error file=…,line=…,title=…::message` (level: error | warning | notice); message cut at MAX_MESSAGE."""
    props: dict[str, object] = {}
    if file:
        props["file"] = truncate(file, MAX_VALUE)
    if line:
        props["line"] = int(line)
    if title:
        props["title"] = truncate(title, MAX_VALUE)
    return command(level, truncate(_safe_str(message), MAX_MESSAGE), **props)


# ------------------------------------------------------------------------------------------ job summary

def md_text(text: object, limit: int = MAX_MESSAGE) -> str:
    """User text inside job-summary Markdown (a table cell, a list item, HTML): shown, never markup."""
    return "".join(_MD.get(c, c) for c in one_line(text, limit))


def md_code(text: object, limit: int = MAX_VALUE) -> str:
    """User text in monospace; `<code>` with character references, because a backtick span cannot hold `|`."""
    return f"<code>{md_text(text, limit)}</code>"


# ------------------------------------------------------------------------------------------ step outputs

def format_output(name: str, value: str) -> str:
    """One `$GITHUB_OUTPUT` entry; multiline values use a random delimiter that cannot occur in them."""
    if "\n" not in value and "\r" not in value:
        return f"{name}={value}\n"
    delim = f"ghadelimiter_{_secrets.token_hex(8)}"
    while delim in value:
        delim = f"ghadelimiter_{_secrets.token_hex(8)}"
    return f"{name}<<{delim}\n{value}\n{delim}\n"


def write_outputs(path: str | Path | None, outputs: dict[str, str]) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for name, value in outputs.items():
            f.write(format_output(name, value))


def append_summary(path: str | Path | None, markdown: str) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown)


# ------------------------------------------------------------------------------------------ the log

class RunnerLog:
    """Writes the run's log: secrets replaced, workspace paths shortened, every line made safe.

    `secrets` are replaced before escaping; `workspace` is cut from absolute paths so messages show the
    path the repository shows."""

    def __init__(self, out: TextIO | None = None, *, secrets: Iterable[str | None] = (),
                 workspace: Path | None = None):
        self.out = out or sys.stdout
        self.secrets = [s for s in secrets if s]
        self.workspace = str(workspace) if workspace is not None else None

    def redact(self, text: object) -> str:
        s = _safe_str(text)
        for secret in self.secrets:
            for form in {secret, one_line(secret, len(secret) * 6), md_text(secret, len(secret) * 8)}:
                s = s.replace(form, "***")
        if self.workspace:
            s = s.replace(self.workspace + "/", "")
        return s

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def line(self, text: object, limit: int = MAX_MESSAGE) -> None:
        """A plain log line that may hold user text."""
        self._print(safe_line(self.redact(text), limit))

    def markdown(self, text: str) -> None:
        """Already escaped Markdown (the summary shown on a terminal), line by line."""
        for line in self.redact(text).split("\n"):
            self._print(safe_line(line, max(len(line), 1) * 10))

    def annotate(self, level: str, message: object, *, file: str | None = None, line: int | None = None,
                 title: str | None = None) -> None:
        self._print(annotation(level, self.redact(message), file=file, line=line, title=title))

    def group(self, title: object) -> None:
        self._print(command("group", one_line(self.redact(title), MAX_VALUE)))

    def endgroup(self) -> None:
        self._print("::endgroup::")

    def mask(self, value: str | None) -> None:
        """Ask the runner to hide `value` in all later output (each line of a multiline secret separately)."""
        if not value:
            return
        if value not in self.secrets:
            self.secrets.append(value)
        for part in value.splitlines():
            if part.strip():
                self._print(command("add-mask", part))

    def traceback(self, e: BaseException) -> None:
        """Where an unexpected exception came from: frames of our code, messages one line each."""
        for line in traceback_lines(e):
            self.line(line)


def traceback_lines(e: BaseException) -> list[str]:
    """The chain of `e` as log lines: frame lines as Python prints them, each message on one line."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(chain) < 5:
        chain.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    lines: list[str] = []
    for exc in reversed(chain):
        if lines:
            lines.append("(which led to)")
        lines.append("Traceback (most recent call last):")
        for frame in traceback.format_tb(exc.__traceback__, limit=-MAX_TRACEBACK_FRAMES):
            lines += [part for part in frame.rstrip("\n").split("\n")]
        lines.append(exception_message(exc))
    return lines
