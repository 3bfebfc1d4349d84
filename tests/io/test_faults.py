"""Faults and hostile parent directories, through the real CLI: nothing outside a model directory is read or
published, and a full disk, a read-only target or a cancelled job leaves nothing half-made (issue 12)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
from mergebot.config.dense import load_config
from mergebot.errors import ModelError
from mergebot.io import confine
from mergebot.tinymodels import make_family
from tests.helpers import ROOT, run_cli

SECRET = "hf_THIS_MUST_NEVER_LEAVE_THE_RUNNER"


def _linear(a: Path, b: Path) -> str:
    return (f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n"
            "    parameters: {weight: 0.5}\nmerge_method: linear\n")


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    f = tmp_path / "outside" / "secrets.env"
    f.parent.mkdir()
    f.write_text(f"HF_TOKEN={SECRET}\n")
    return f


@pytest.mark.parametrize("name", ["LICENSE", "tokenizer.json", "config.json", "README.md", "NOTICE",
                                  "generation_config.json"])
def test_symlink_out_of_a_parent_is_refused_and_never_published(tmp_path, secret_file, name):
    a, b = make_family(tmp_path / "fam", 2, seed=3)
    target = b / name
    if target.exists():
        target.unlink()
    target.symlink_to(secret_file)
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    res = run_cli("merge", str(cfg), str(tmp_path / "out"), "--quiet")
    line = _one_line_error(res)
    assert name in line and "outside the model directory" in line
    assert SECRET not in res.stdout + res.stderr and str(secret_file) not in line
    assert _leftovers(tmp_path, "out") == []


def test_symlink_inside_the_model_directory_is_fine(tmp_path):
    a, b = make_family(tmp_path / "fam", 2, seed=3)
    (b / "LICENSE.txt").write_text("Apache-2.0 text")
    (b / "LICENSE").symlink_to(b / "LICENSE.txt")
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    res = run_cli("merge", str(cfg), str(tmp_path / "out"), "--quiet")
    assert res.returncode == 0, res.stderr
    copied = sorted(p.name for p in (tmp_path / "out" / "licenses").rglob("LICENSE*"))
    assert copied == ["LICENSE", "LICENSE.txt"]


def test_a_fifo_in_a_parent_is_refused_not_read(tmp_path):
    a, b = make_family(tmp_path / "fam", 2, seed=3)
    (b / "tokenizer.json").unlink()
    os.mkfifo(b / "tokenizer.json")  # reading it would block forever
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    line = _one_line_error(run_cli("merge", str(cfg), str(tmp_path / "out"), "--quiet"))
    assert "tokenizer.json" in line and "not a regular file" in line


@pytest.mark.parametrize("ref", ["/etc", "~/models/x", "../outside-model", "fam/../../outside-model", "linked/model"])
def test_in_the_action_local_models_stay_inside_the_workspace(tmp_path, ref):
    ws = tmp_path / "ws"
    a, b = make_family(ws / "fam", 2, seed=3)
    make_family(tmp_path / "outside-model-src", 1, seed=4)[0].rename(tmp_path / "outside-model")
    (ws / "linked").mkdir()
    (ws / "linked" / "model").symlink_to(tmp_path / "outside-model")  # a folder in the checkout linking out
    cfg = ws / "m.yml"
    cfg.write_text(_linear(Path("fam") / a.name, Path(ref)))
    token = confine.set_workspace(ws)
    cwd = os.getcwd()
    try:
        os.chdir(ws)
        with pytest.raises(ModelError, match="workspace"):
            run_merge(load_config(str(cfg)), ws / "out", MergeOptions(progress=False))
    finally:
        os.chdir(cwd)
        confine.reset_workspace(token)
    assert not (ws / "out").exists()


def _mount_tmpfs(where: Path, size: str, ro: bool = False) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    where.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    _mount_tmpfs(mnt, "600k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_before_any_data_and_leaves_nothing(tmp_path, small_disk):
    a, b = make_family(tmp_path / "fam", 2, seed=3, hidden=64, inter=128, vocab=512)  # ~1.3 MB of weights
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    line = _one_line_error(run_cli("merge", str(cfg), str(small_disk / "out"), "--quiet"))
    assert "cannot write the output" in line and "no space left" in line
    assert list(small_disk.iterdir()) == []  # no staging directory filling the disk


@pytest.mark.parametrize("spare_pages", [0, 1])
def test_full_disk_after_the_merge_is_one_line_and_leaves_nothing(tmp_path, spare_pages):
    """The merge fits, but the lock's digests or the card (written once OUT_DIR is in place) do not: that was a
    traceback leaving an OUT_DIR with an empty NOTICE or a stray lock temp file, a model that looks finished."""
    a, b = make_family(tmp_path / "fam", 2, seed=3, hidden=64, inter=128, vocab=512)
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    assert run_cli("merge", str(cfg), str(tmp_path / "ref"), "--quiet").returncode == 0
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "ref").iterdir() if p.name not in ("README.md", "NOTICE"))
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, f"{(pages + spare_pages) * 4}k")  # room for the merge, not for the lock rewrite / the card
    try:
        line = _one_line_error(run_cli("merge", str(cfg), str(disk / "out"), "--quiet"))
        assert "cannot write the output" in line and "No space left" in line, line
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_publish_on_a_full_disk_keeps_the_previous_card_and_publishes_nothing(tmp_path):
    """`mergebot publish` rewrites the card of an output that holds a merge: on a full disk that was a traceback
    leaving a truncated README; now one line, the card and NOTICE as they were, nothing sent."""
    a, b = make_family(tmp_path / "fam", 2, seed=3, hidden=64, inter=128, vocab=512)
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    assert run_cli("merge", str(cfg), str(tmp_path / "ref"), "--quiet").returncode == 0
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "ref").iterdir())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, f"{pages * 4}k")  # the output fits exactly, a new card does not
    try:
        shutil.copytree(tmp_path / "ref", disk / "out")
        before = {p.name: p.read_bytes() for p in (disk / "out").iterdir()}
        env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test_not_used"}
        res = run_cli("publish", str(disk / "out"), "--repo", "org/renamed-merge", "--check", "off",
                      "--allow-license-risk", env=env)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]  # after the license warnings
        assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        line = errors[0]
        assert "cannot write the lock or the model card" in line and "No space left" in line and "nothing was published" in line
        assert {p.name: p.read_bytes() for p in (disk / "out").iterdir()} == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "1m", ro=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_target_is_one_line(tmp_path, read_only_dir):
    a, b = make_family(tmp_path / "fam", 2, seed=3)
    cfg = tmp_path / "m.yml"
    cfg.write_text(_linear(a, b))
    line = _one_line_error(run_cli("merge", str(cfg), str(read_only_dir / "out"), "--quiet"))
    assert "cannot write the output" in line and "Read-only" in line


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["parent", "folder of the parents", "folder of the config"])
def test_force_never_replaces_what_the_merge_reads(tmp_path, target):
    """`--force` replaces OUT_DIR: an OUT_DIR that is a parent, or holds the parents or the config (`merge
    m.yml . --force` in the models' folder), would delete them. Refused in one line, nothing touched."""
    models = tmp_path / "models"
    a, b = make_family(models, 2, seed=3)
    cfg = (models if target == "folder of the config" else tmp_path) / "m.yml"
    cfg.write_text(_linear(a, b))
    out = {"parent": a, "folder of the parents": models, "folder of the config": models}[target]
    before = _tree(tmp_path)
    line = _one_line_error(run_cli("merge", str(cfg), str(out), "--force", "--quiet"))
    assert line.startswith(f"error: {out}: ") and "--force would delete" in line, line
    assert _tree(tmp_path) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    inside = a / "merged"  # an OUT_DIR inside a parent replaces nothing the merge reads
    assert run_cli("merge", str(cfg), str(inside), "--quiet").returncode == 0
    assert _tree(a / "merged") and {k: v for k, v in _tree(tmp_path).items() if "/merged/" not in k} == before


def test_sigterm_mid_merge_leaves_nothing(tmp_path):
    # big enough that the merge is still running when the signal arrives
    a, b, c = make_family(tmp_path / "fam", 3, seed=3, hidden=512, inter=2048, vocab=8192, layers=6)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"models:\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {c}\n"
                   f"    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: dare_linear\nbase_model: {a}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergebot.cli.main", "merge", str(cfg), str(out), "--quiet",
                             "--compile", "off"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    staged: list[Path] = []
    while time.time() < deadline and not staged and proc.poll() is None:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.mergebot-")]
        time.sleep(0.02)
    assert staged, "the merge never started staging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert _leftovers(tmp_path, "out") == []


def test_non_finite_output_from_finite_inputs_is_never_written(tmp_path):
    """Values beyond the output dtype's range overflow to inf (validate refuses the other road there, weights
    summing to zero): such tensors must never be written, let alone published."""
    a, b = make_family(tmp_path / "fam", 2, seed=3)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 1000000}}\n  - model: {b}\n"
                   "    parameters: {weight: 1000000}\nmerge_method: linear\nparameters: {normalize: false}\n"
                   "out_dtype: float16\n")
    line = _one_line_error(run_cli("merge", str(cfg), str(tmp_path / "out"), "--quiet"))
    assert "inf or NaN from finite inputs" in line
    assert _leftovers(tmp_path, "out") == []


def test_more_shards_than_open_files_is_one_line_and_leaves_nothing(tmp_path):
    """Every shard of every parent stays mapped, and a map keeps a descriptor: a parent of thousands of shards under
    `ulimit -n` raised OSError EMFILE from mmap, a traceback. Now one line naming the shard and the limit."""
    import resource

    base, ft = make_family(tmp_path / "fam", 2, seed=4, layers=2, shards=21)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {ft}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 24, hard))  # room for some shards, not all 42
    try:
        with pytest.raises(ModelError, match=r"\.safetensors: cannot map it: Too many open files \(each shard of "
                                             r"each parent stays open .* ulimit -n\)"):
            run_merge(load_config(cfg), tmp_path / "out", MergeOptions(progress=False))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.mergebot-*"))
