from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import make_family

pytest_plugins = ["tests.conftest_hub"]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SEED_CONFIGS = ROOT / "examples" / "merges"  # the five published merges' configs, byte for byte
CORPUS = DATA / "mergekit-examples"  # mergekit's own example configs (tests/data/README.md)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> list[Path]:
    """base, ft1, ft2, ft3: float32 Llama-shaped, 4 layers."""
    return make_family(tmp_path_factory.mktemp("family"), 4, seed=1)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> list[Path]:
    return make_family(tmp_path_factory.mktemp("family_bf16"), 3, seed=2, dtype=torch.bfloat16, shards=2)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergebot.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
