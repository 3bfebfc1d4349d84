"""`mergebot validate` (a PR check, an editor hook) reads the config language alone: it loads neither torch nor
the Hub client, nor any kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import sys
from mergebot.cli.main import main
code = main(["validate", *sys.argv[1:]])
heavy = sorted(m for m in ("torch", "huggingface_hub", "mergebot.engine", "mergebot.builds") if m in sys.modules)
print("loaded:", ",".join(heavy) or "-")
sys.exit(code)
"""


def test_validate_imports_no_torch() -> None:
    configs = sorted(str(p) for p in (ROOT / "examples" / "merges").glob("*.yml"))
    configs += sorted(str(p) for p in (ROOT / "tests" / "data" / "mergekit-examples").glob("*.yml"))
    done = subprocess.run([sys.executable, "-c", PROBE, *configs], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ok: ") == len(configs)
    assert "loaded: -" in done.stdout, done.stdout


def test_help_imports_no_torch() -> None:
    probe = "import sys\nfrom mergebot.cli.main import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
