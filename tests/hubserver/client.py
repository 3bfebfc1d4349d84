"""Pointing the real huggingface_hub client at a FakeHub on 127.0.0.1 (the `hub` fixture of tests/conftest.py).

How the endpoint is set (huggingface_hub 2.4.0 reads its environment once, at import, into
`huggingface_hub.constants`, and the library is already imported by the time a fixture runs):
- the environment gets HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_TOKEN, HF_HUB_OFFLINE=0, HF_HOME=<tmp> (for
  subprocesses and for mergebot, which reads HF_ENDPOINT at call time);
- the already-imported constants are patched too: ENDPOINT and HUGGINGFACE_CO_URL_TEMPLATE (default endpoint
  of HfApi/hf_hub_download/snapshot_download and of `ModelCard.validate`), HF_URL_HOSTS (hosts that receive
  the auth header), HF_HUB_DISABLE_XET (checked at call time by `is_xet_available`: with hf_xet installed
  uploads would otherwise go through Xet, which cannot be faked), HF_HUB_OFFLINE, and every path derived from
  HF_HOME (cache, token file, agent-harness cache), so nothing touches ~/.cache/huggingface.
Code under test should still pass `endpoint=hub.url` explicitly where it can; the patches cover library
calls that take no endpoint argument. monkeypatch undoes everything after each test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hubserver.server import FakeHub

TEST_TOKEN = "hf_mergebot_test_token_0123456789"
TEST_USER = "mergebot-test"
TEST_ORG = "mergebot-org"


@dataclass
class HubFixture:
    server: FakeHub
    url: str
    token: str
    user: str
    org: str
    home: Path

    def api(self, token: str | None = None) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=token or self.token)


def point_hub_client_at(monkeypatch: pytest.MonkeyPatch, url: str, token: str, home: Path) -> None:
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY")])))
    monkeypatch.setenv("no_proxy", ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("no_proxy")])))

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {urlsplit(url).hostname}))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    old_home = constants.HF_HOME
    for name, value in list(vars(constants).items()):
        if name.isupper() and isinstance(value, str) and value.startswith(old_home):
            monkeypatch.setattr(constants, name, str(home) + value[len(old_home):])
