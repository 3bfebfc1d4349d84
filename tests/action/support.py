"""What the Action's test modules share: the runner's workspace (a git checkout), parents on the loopback Hub,
event payloads and the runner's files, and one run of `mergebot action` as GitHub drives it. The fixtures built
on these are in tests/action/conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mergebot.cli.main import main
from tests.hubserver.client import HubFixture

ROOT = Path(__file__).resolve().parents[2]
ZERO = "0" * 40
README = "---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny parent\n"
PARENTS = ("tiny-base", "tiny-ft1", "tiny-ft2")


def linear(a: str, b: str, extra: str = "") -> str:
    return (f"models:\n  - model: {a}\n    parameters:\n      weight: 0.5\n  - model: {b}\n    parameters:\n"
            f"      weight: 0.5\nmerge_method: linear\ndtype: float32\n{extra}")


@dataclass
class Checkout:
    """A git repository standing in for the workflow's `actions/checkout` of the user's repo."""

    path: Path

    def git(self, *args: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c",
                               "commit.gpgsign=false", *args], cwd=self.path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        for name, text in files.items():
            p = self.path / name
            if text is None:
                p.unlink()
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")


def local_parents(checkout: Checkout, models: list[Path]) -> list[str]:
    """The parents copied into the checkout, as the relative references a config names them by: in the
    Action, local models are read only inside the workspace (mergebot.io.confine.set_workspace)."""
    refs = []
    for name, d in zip(PARENTS, models, strict=True):
        shutil.copytree(d, checkout.path / "models" / name, dirs_exist_ok=True)
        refs.append(f"./models/{name}")
    return refs


def upload_parents(hub: HubFixture, models: list[Path]) -> dict[str, str]:
    """The models as Hub repos mergebot-org/tiny-*; returns repo id -> head sha."""
    out = {}
    for name, d in zip(PARENTS, models, strict=True):
        repo = f"{hub.org}/{name}"
        hub.server.create_repo(repo)
        out[repo] = hub.server.commit(repo, {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()},
                                      message="upload")
    return out


@dataclass
class Run:
    rc: int
    outputs: dict[str, str]
    summary: str
    stdout: str

    @property
    def results(self) -> dict[str, dict]:
        return {r["config"]: r for r in json.loads(self.outputs["results"])}


def parse_outputs(text: str) -> dict[str, str]:
    out, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and "=" not in line.split("<<")[0]:
            name, delim = line.split("<<", 1)
            j = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:j])
            i = j + 1
        else:
            name, _, value = line.partition("=")
            out[name] = value
            i += 1
    return out


def github_env(monkeypatch: pytest.MonkeyPatch, ws: Path, tmp: Path, event: str, payload: dict,
               **inputs: str) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "event.json").write_text(json.dumps(payload))
    output, summary = tmp / "output", tmp / "summary.md"
    output.write_text("")
    summary.write_text("")
    for k in list(os.environ):
        if k.startswith("INPUT_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_EVENT_NAME", event)
    monkeypatch.setenv("GITHUB_EVENT_PATH", str(tmp / "event.json"))
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ws))
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("RUNNER_TEMP", str(tmp))
    for name, value in inputs.items():
        monkeypatch.setenv(f"INPUT_{name.upper()}", value)
    return output, summary


_runs = iter(range(1000))


def act(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, ws: Path, event: str, payload: dict,
        **inputs: str) -> Run:
    """`mergebot action` in-process, as the container entrypoint would run it."""
    tmp = ws.parent / f"run{next(_runs)}"
    output, summary = github_env(monkeypatch, ws, tmp, event, payload, **inputs)
    monkeypatch.chdir(ws)
    capsys.readouterr()
    rc = main(["action"])
    captured = capsys.readouterr()
    return Run(rc, parse_outputs(output.read_text()), summary.read_text(), captured.out + captured.err)


def push(before: str, after: str) -> dict:
    return {"ref": "refs/heads/main", "before": before, "after": after, "forced": False}


def commits(hub: HubFixture, repo: str) -> int:
    return len(hub.server.history(repo)) if repo in hub.server.repos else 0


# ---------------------------------------------------------------------------------------------- scenarios
