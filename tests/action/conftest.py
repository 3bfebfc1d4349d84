"""Fixtures of the Action's tests: tiny parents with a license, and the runner's git checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebot.tinymodels import make_family
from tests.action.support import README, Checkout


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = make_family(tmp_path_factory.mktemp("fam"), 3, seed=7, layers=2)
    for d in dirs:
        (d / "README.md").write_text(README)
    return dirs


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    ws = tmp_path / "ws"
    ws.mkdir()
    c = Checkout(ws)
    c.git("init", "-q", "-b", "main")
    return c
