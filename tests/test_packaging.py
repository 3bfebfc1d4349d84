"""The source folder bot/ installs as the import package `mergebot`: every package listed, data files shipped,
nothing named `bot` in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_under_bot_is_listed_as_mergebot() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == {"mergebot": "bot"}
    found = sorted("mergebot" + ("." + ".".join(p.parent.relative_to(ROOT / "bot").parts) if p.parent != ROOT / "bot"
                                 else "") for p in (ROOT / "bot").rglob("__init__.py"))
    assert sorted(tool["packages"]) == found
    assert _pyproject()["project"]["scripts"]["mergebot"].startswith("mergebot.")


def test_wheel_holds_mergebot_its_data_and_no_bot(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("bot", "templates"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("mergebot-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "mergebot" in tops and "bot" not in tops, sorted(tops)
    for want in ("mergebot/cli/main.py", "mergebot/check/data/eval.txt", "mergebot/check/data/chat.json"):
        assert want in names, want
    data = [n for n in names if ".data/data/share/mergebot/templates/" in n]
    assert sorted(n.rsplit("/", 1)[1] for n in data) == ["card.md.j2", "card_moe.md.j2"]
