"""The fixtures every test module may use: tiny model families, and the loopback Hub with the real
huggingface_hub client pointed at it (tests/hubserver). Plain helpers are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mergebot.tinymodels import make_family
from tests.hubserver.client import (
    TEST_ORG,
    TEST_TOKEN,
    TEST_USER,
    HubFixture,
    point_hub_client_at,
)
from tests.hubserver.server import FakeHub
from tests.hubserver.state import Token


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> list[Path]:
    """base, ft1, ft2, ft3: float32 Llama-shaped, 4 layers."""
    return make_family(tmp_path_factory.mktemp("family"), 4, seed=1)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> list[Path]:
    return make_family(tmp_path_factory.mktemp("family_bf16"), 3, seed=2, dtype=torch.bfloat16, shards=2)


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """A bare FakeHub (no environment changes) with the test token of TEST_USER (member of TEST_ORG)."""
    server = FakeHub(tokens={TEST_TOKEN: Token(user=TEST_USER, orgs=(TEST_ORG,))}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub(fake_hub: FakeHub, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[HubFixture]:
    """A FakeHub with huggingface_hub (env + imported constants) pointed at it and a private HF_HOME."""
    from huggingface_hub import close_session

    home = tmp_path_factory.mktemp("hf_home")
    point_hub_client_at(monkeypatch, fake_hub.url, TEST_TOKEN, home)
    close_session()  # drop pooled connections of an earlier server
    try:
        yield HubFixture(server=fake_hub, url=fake_hub.url, token=TEST_TOKEN, user=TEST_USER, org=TEST_ORG,
                         home=home)
    finally:
        close_session()
        assert not fake_hub.crashes, f"FakeHub handler crashed: {fake_hub.crashes}"
