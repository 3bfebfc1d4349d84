"""`mergebot`: argparse front end; each command lives in its own module with add_parser/run."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from mergebot import __version__, startup
from mergebot.cli._errors import run_guarded

COMMANDS = ("merge", "validate", "publish", "plan", "action", "demo", "check", "card", "watch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergebot",
        description="Merge open LLMs from mergekit-style YAML, write the model card, publish to the Hub.")
    parser.add_argument("--version", action="version", version=f"mergebot {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue  # command not landed yet
            raise
        module.add_parser(sub)
    return parser


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (what a cancelled GitHub job or `docker stop` sends) unwinds like Ctrl-C: every context manager
    on the way out removes what it staged, so a cancelled merge leaves nothing half-made."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The console script (argv None: the process ends after it), or an in-process call with its arguments,
    which gets its garbage collector back as it was (mergebot.startup)."""
    collecting = startup.hold()
    if argv is None:
        startup.threads()
        startup.memory()
        startup.files()
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help()
            return 2
        return run_guarded(lambda: args.run(args), args.debug)
    finally:
        if argv is not None:
            startup.restore(collecting)
        else:
            startup.exiting()


if __name__ == "__main__":
    sys.exit(main())
