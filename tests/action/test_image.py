"""action.yml is a composite action over prebuilt images (issue 13): scripts/action/prepare.sh writes the Docker
action it runs, pointing at ghcr.io/<repo>:<ref>-<variant> when that image exists, else at a copy of the
Dockerfile (the CPU copy defaulting to CPU wheels). Run with a stand-in `docker` whose `manifest inspect`
succeeds or fails, as the registry would answer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

ACTION = yaml.safe_load((ROOT / "action.yml").read_text())


def _prepare(tmp: Path, variant: str, image_exists: bool, ref: str = "0123abc", repo: str = "Org/MergeBot",
             gpu: bool = False) -> tuple[subprocess.CompletedProcess, Path, dict]:
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "docker").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp}/docker.log\nexit {0 if image_exists else 1}\n")
    (fake / "docker").chmod(0o755)
    if gpu:
        (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
        (fake / "nvidia-smi").chmod(0o755)
    ws = tmp / "ws"
    ws.mkdir(exist_ok=True)
    out = tmp / "github_output"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "ACTION_PATH": str(ROOT), "ACTION_REPOSITORY": repo,
           "ACTION_REF": ref, "VARIANT": variant, "GITHUB_WORKSPACE": str(ws), "GITHUB_OUTPUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "scripts/action/prepare.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    gen = ws / ".github/.tmp/.generated-actions/mergebot"
    meta = yaml.safe_load((gen / "action.yml").read_text()) if (gen / "action.yml").exists() else {}
    return done, gen, meta


def test_composite_runs_the_generated_action_with_every_input():
    steps = ACTION["runs"]["steps"]
    assert ACTION["runs"]["using"] == "composite"
    run = next(s for s in steps if s.get("id") == "run")
    assert run["uses"] == "./.github/.tmp/.generated-actions/mergebot"
    assert set(run["with"]) == set(ACTION["inputs"]) - {"image"}
    assert all(v == f"${{{{ inputs.{k} }}}}" for k, v in run["with"].items())
    assert {k: v["value"] for k, v in ACTION["outputs"].items()} == {
        "results": "${{ steps.run.outputs.results }}", "count": "${{ steps.run.outputs.count }}"}


@pytest.mark.parametrize("variant,gpu,want", [("cpu", False, "cpu"), ("cuda", False, "cuda"), ("auto", False, "cpu"),
                                              ("auto", True, "cuda")])
def test_prebuilt_image_of_the_pinned_ref(tmp_path, variant, gpu, want):
    done, gen, meta = _prepare(tmp_path, variant, image_exists=True, gpu=gpu)
    assert done.returncode == 0, done.stderr
    assert meta["runs"] == {"using": "docker", "image": f"docker://ghcr.io/org/mergebot:0123abc-{want}"}
    assert set(meta["inputs"]) == set(ACTION["inputs"]) - {"image"} and set(meta["outputs"]) == {"results", "count"}
    assert not (gen / "Dockerfile").exists()  # nothing to build
    assert (tmp_path / "github_output").read_text() == f"image=docker://ghcr.io/org/mergebot:0123abc-{want}\n"


def test_no_image_for_the_ref_builds_the_dockerfile_with_cpu_wheels(tmp_path):
    done, gen, meta = _prepare(tmp_path, "cpu", image_exists=False, ref="feature/x")
    assert done.returncode == 0, done.stderr
    assert "manifest inspect ghcr.io/org/mergebot:feature-x-cpu" in (tmp_path / "docker.log").read_text()
    assert meta["runs"] == {"using": "docker", "image": "Dockerfile"}
    dockerfile = (gen / "Dockerfile").read_text()
    assert "ARG TORCH_VERSION=2.13.0+cpu\n" in dockerfile
    assert "ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu\n" in dockerfile
    # built for one run: no ahead-of-time kernels for every method (the release images have them)
    assert "ARG WARM_METHODS=none\n" in dockerfile and "ARG WARM_METHODS=all" not in dockerfile
    assert "ARG WARM_METHODS=all\n" in (ROOT / "Dockerfile").read_text()
    for part in ("bot/cli/main.py", "pyproject.toml", "requirements/runtime.lock", "templates/card.md.j2"):
        assert (gen / part).is_file(), part
    # the CUDA fallback keeps the default (CUDA) build
    done, gen, _ = _prepare(tmp_path, "cuda", image_exists=False)
    assert "ARG TORCH_VERSION=2.13.0\n" in (gen / "Dockerfile").read_text()


def test_build_and_bad_variant(tmp_path):
    done, _, meta = _prepare(tmp_path, "build", image_exists=True)
    assert done.returncode == 0 and meta["runs"]["image"] == "Dockerfile"
    assert not (tmp_path / "docker.log").exists()  # no registry lookup asked for
    done, _, _ = _prepare(tmp_path, "gpu\n::error::x", image_exists=True)
    assert done.returncode == 1 and done.stdout.startswith("::error title=mergebot::input image:")
    assert "\n::error::x" not in done.stdout
