"""Streamed Hub -> Hub merges (issue 15) against the loopback Hub, on a disk much smaller than one parent."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergebot.cli.main import main
from mergebot.hub import stream
from mergebot.tinymodels import make_family
from tests.hubserver.client import HubFixture, point_hub_client_at

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw:DeprecationWarning")
SHARD = "1500K"  # output shards of at most 1.5 MB: about 15 of them
DISK = "6M"  # the tmpfs: OUT_DIR, TMPDIR and HF_HOME together, a quarter of one parent


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three ~22 MB float32 Llamas (base + two fine-tunes); the first two saved in two shards."""
    return make_family(tmp_path_factory.mktemp("stream"), 3, seed=7, hidden=256, inter=512, layers=8, vocab=1024,
                       shards=2)


def _tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _disk(hub: HubFixture, directory: Path, monkeypatch: pytest.MonkeyPatch, size: str) -> Iterator[Path]:
    """A tmpfs holding OUT_DIR, TMPDIR and the HF cache (the hub client re-pointed at it)."""
    for disk in _tmpfs(directory, size):
        (disk / "tmp").mkdir()
        (disk / "hf").mkdir()
        monkeypatch.setenv("TMPDIR", str(disk / "tmp"))
        monkeypatch.setattr(tempfile, "tempdir", str(disk / "tmp"))
        point_hub_client_at(monkeypatch, hub.url, hub.token, disk / "hf")
        yield disk


@pytest.fixture
def small_disk(hub: HubFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from _disk(hub, tmp_path / "disk", monkeypatch, DISK)


def _upload(hub: HubFixture, repo_id: str, directory: Path) -> None:
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny\n"
    hub.server.create_repo(repo_id)
    hub.server.commit(repo_id, files, message="upload")


def _config(path: Path, refs: list[str], extra: str = "") -> Path:
    path.write_text(f"models:\n  - model: {refs[0]}\n    parameters: {{weight: 0.5}}\n"
                    f"  - model: {refs[1]}\n    parameters: {{weight: 0.3}}\n"
                    f"  - model: {refs[2]}\n    parameters: {{weight: 0.2}}\nmerge_method: linear\n{extra}")
    return path


@pytest.fixture
def on_hub(hub: HubFixture, parents: list[Path]) -> list[str]:
    refs = [f"{hub.org}/p{i}" for i in range(len(parents))]
    for ref, d in zip(refs, parents):
        _upload(hub, ref, d)
    return refs


def _local_merge(parents: list[Path], tmp: Path) -> Path:
    cfg = _config(tmp / "local.yml", [str(p) for p in parents])
    assert main(["merge", str(cfg), str(tmp / "local"), "--quiet", "--out-shard-size", SHARD]) == 0
    return tmp / "local"


def _tensor_bytes(parents: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for d in parents:
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                total += sum(st.get_tensor(k).nbytes for k in st.keys())
    return total


@pytest.mark.parametrize("storage", [True, False], ids=["redirected-to-storage", "served-by-the-hub"])
def test_streamed_merge_on_a_small_disk_equals_a_local_merge(hub, parents, on_hub, small_disk, tmp_path, capsys,
                                                             storage):
    """As the Hub serves LFS/Xet files (a 302 from resolve to a pre-signed storage URL of another origin, which
    refuses a request carrying the token) and as a mirror that serves them itself."""
    hub.server.lfs_redirect = storage
    repo = f"{hub.org}/merged"
    cfg = _config(tmp_path / "c.yml", on_hub)
    before = len(hub.server.file_gets())
    assert main(["merge", str(cfg), str(small_disk / "out"), "--push-to", repo, "--stream", "--quiet",
                 "--out-shard-size", SHARD]) == 0
    err = capsys.readouterr().err
    assert "streamed: fetched" in err and "peak disk" in err
    assert len(hub.server.history(repo)) == 2  # the repo's creation, then one commit
    assert not hub.server.repos[repo].private  # created private for the run, public once published
    local = _local_merge(parents, tmp_path)
    files = hub.server.files(repo)
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert len(shards) > 5
    for name in shards + ["model.safetensors.index.json"]:
        assert files[name] == (local / name).read_bytes(), name
    # only small files stayed on the disk
    assert not list((small_disk / "out").glob("*.safetensors"))
    # the parents' tensor bytes, give or take the headers: never the whole parents twice
    served = sum(n for _, _, n in hub.server.file_gets()[before:])
    need = _tensor_bytes(parents)
    assert need <= served <= need * 1.03, (served, need)
    redirected = [p for p, status, _ in hub.server.file_gets()[before:] if status == 302]
    assert bool(redirected) == storage and not hub.server.cdn_auth_refused


def test_a_disk_with_room_for_one_shard_holds_one_at_a_time(hub, parents, on_hub, tmp_path, monkeypatch, capsys):
    """The disk holds about one output shard: when the next shard would not fit beside the one still uploading
    (slow uploads here), writing it waits for that upload instead of failing for want of space."""
    real = stream.ShardUploader._upload

    def slow(self, path, name):
        time.sleep(0.2)
        return real(self, path, name)

    monkeypatch.setattr(stream.ShardUploader, "_upload", slow)
    repo = f"{hub.org}/one-shard"
    cfg = _config(tmp_path / "c.yml", on_hub)
    for disk in _disk(hub, tmp_path / "disk", monkeypatch, "2000K"):  # room for one shard (1-1.3 MB here), not two
        assert main(["merge", str(cfg), str(disk / "out"), "--push-to", repo, "--stream", "--quiet",
                     "--out-shard-size", SHARD]) == 0
    err = capsys.readouterr().err
    peak = re.search(r"peak disk ([0-9.]+) (KB|MB)", err)
    assert peak, err
    assert float(peak[1]) * {"KB": 1e3, "MB": 1e6}[peak[2]] <= 1_500_000 + 200_000, err
    local = _local_merge(parents, tmp_path)
    files = hub.server.files(repo)
    for name in sorted(p.name for p in local.glob("*.safetensors")):
        assert files[name] == (local / name).read_bytes(), name


def test_interrupted_streamed_merge_reuploads_only_what_is_missing(hub, on_hub, small_disk, tmp_path,
                                                                   monkeypatch, capsys):
    repo = f"{hub.org}/merged"
    cfg = _config(tmp_path / "c.yml", on_hub)
    args = ["merge", str(cfg), str(small_disk / "out"), "--push-to", repo, "--stream", "--quiet",
            "--out-shard-size", SHARD]
    real = stream.ShardUploader._upload
    calls = []

    def fail_second(self, path, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected: the runner was stopped")
        return real(self, path, name)

    monkeypatch.setattr(stream.ShardUploader, "_upload", fail_second)
    with pytest.raises(RuntimeError, match="injected"):
        main(args)
    head = hub.server.head(repo)
    assert len(hub.server.history(repo)) == 1  # created, never committed to
    assert not (small_disk / "out").exists() and not list(small_disk.glob(".out.mergebot-*"))
    assert hub.server.count("PUT", r"^/__lfs/upload/") == 1
    monkeypatch.setattr(stream.ShardUploader, "_upload", real)
    assert main(args) == 0
    assert "(1 already on the Hub)" in capsys.readouterr().err
    n = len([p for p in hub.server.files(repo) if p.endswith(".safetensors")])
    assert hub.server.count("PUT", r"^/__lfs/upload/") == n  # the first shard was not sent again
    assert hub.server.history(repo)[1].oid == head and len(hub.server.history(repo)) == 2


def test_stream_mode_is_automatic_when_the_disk_is_too_small(hub, on_hub, small_disk, tmp_path, capsys):
    repo = f"{hub.org}/auto"
    cfg = _config(tmp_path / "c.yml", on_hub)
    assert main(["merge", str(cfg), str(small_disk / "out"), "--push-to", repo, "--quiet",
                 "--out-shard-size", SHARD]) == 0
    err = capsys.readouterr().err
    assert "stream mode:" in err and "--stream off" in err
    assert len(hub.server.history(repo)) == 2


@pytest.mark.parametrize("extra, kind, reason", [
    ("tokenizer_source: base\n", "merge", "tokenizer_source/tokenizer: --stream cannot rewrite embeddings"),
    ("", "lora", "--stream cannot fold in LoRA adapters"),
    ("", "push", "--stream needs --push-to"),
])
def test_refused_modes_say_why_in_one_line(hub, on_hub, tmp_path, capsys, extra, kind, reason):
    refs = list(on_hub)
    if kind == "lora":
        refs[1] = refs[1] + "+" + f"{hub.org}/adapter"
    cfg = _config(tmp_path / "c.yml", refs, extra)
    args = ["merge", str(cfg), str(tmp_path / "out"), "--stream", "--quiet"]
    if kind != "push":
        args += ["--push-to", f"{hub.org}/x"]
    assert main(args) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and reason in err[0], err
    assert f"{hub.org}/x" not in hub.server.repos


def test_a_parent_with_only_bin_weights_is_refused_in_one_line(hub, parents, on_hub, tmp_path, capsys):
    """--stream reads safetensors by range: a parent repo holding only .bin weights is refused before anything is
    created or uploaded (fetch.resolve(stream=True))."""
    files = {p.name: p.read_bytes() for p in parents[2].iterdir() if p.is_file() and not p.name.endswith(".safetensors")}
    files["pytorch_model.bin"] = b"not read"
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# bin only\n"
    hub.server.create_repo(f"{hub.org}/binonly")
    hub.server.commit(f"{hub.org}/binonly", files, message="upload")
    cfg = _config(tmp_path / "c.yml", [on_hub[0], on_hub[1], f"{hub.org}/binonly"])
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--stream", "--quiet", "--push-to", f"{hub.org}/x"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{hub.org}/binonly: --stream reads safetensors by range" in err[0], err
    assert f"{hub.org}/x" not in hub.server.repos


def test_moe_and_multi_configs_are_refused_in_stream_mode(tmp_path):
    from mergebot.config.configfile import load

    moe = tmp_path / "moe.yml"
    moe.write_text("base_model: org/base\nexperts:\n  - source_model: org/a\n    positive_prompts: [x]\n"
                   "  - source_model: org/b\n    positive_prompts: [y]\ngate_mode: random\n")
    with pytest.raises(stream.StreamRefused, match="dense merges only"):
        stream.should_stream(load(str(moe)), tmp_path / "out", "on", "org/x", None)


# ------------------------------------------------------------------------------------ range reads, directly

def _remote(hub: HubFixture, ref: str, **source_kw):
    from mergebot.hub.fetch import hub_headers
    from mergebot.io.remote import FetchStats, RangeSource, RemoteWeights

    sha = hub.server.head(ref)
    stats = FetchStats()
    source = RangeSource(ref, sha, ref, token=hub.token, endpoint=hub.url, stats=stats, sleep=lambda s: None,
                         **source_kw)
    return RemoteWeights(hub_headers(ref, sha, ref, hub.token), source), stats


def test_broken_and_failed_ranges_are_resumed_and_retried(hub, parents, on_hub):
    from mergebot.tinymodels import load_tensors

    reader, stats = _remote(hub, on_hub[0])
    expected = load_tensors(parents[0])
    order = sorted(expected, key=lambda k: (str(reader.header(k).file), reader.header(k).start))
    reader.plan(order)
    hub.server.cut_next_ranges(2, after=1000)  # two connections break mid-body
    hub.server.fail_next_ranges(1, status=503)
    try:
        for name in order:
            reader.prefetch(name)
            assert reader.get(name).equal(expected[name]), name
            reader.release(name)
    finally:
        reader.close()
    assert stats.retries >= 2 and stats.bytes == sum(t.nbytes for t in expected.values())


def test_a_range_that_keeps_failing_is_one_line_naming_the_file(hub, on_hub):
    from mergebot.errors import ModelError

    reader, _ = _remote(hub, on_hub[0], attempts=3)
    name = next(iter(reader.keys()))
    hub.server.fail_next_ranges(5, status=503)
    try:
        with pytest.raises(ModelError, match=r"p0: model-0000\d-of-00002.safetensors: range read failed after 3 tries"):
            reader.get(name)
    finally:
        reader.close()
    hub.server._range_faults.clear()


def test_the_job_summary_shows_a_streamed_merge(tmp_path):
    from mergebot.action.report import Result, summary_markdown

    r = Result("merges/a.yml", "org/a", "published", streamed="streamed: fetched 1.0 GB in 40 range requests, "
               "uploaded 500 MB in 2 shards, peak disk 250 MB")
    md = summary_markdown([r], title="mergebot", notes=[], redact=lambda s: s)
    assert "### Streamed merges" in md and "peak disk 250 MB" in md


def test_the_action_streams_by_itself_when_the_runner_disk_is_too_small(hub, on_hub, tmp_path, monkeypatch, capsys):
    from tests.action.support import ZERO, Checkout, act, linear, push

    ws = tmp_path / "ws"
    ws.mkdir()
    checkout = Checkout(ws)
    checkout.git("init", "-q", "-b", "main")
    c1 = checkout.commit({"merges/s.yml": linear(on_hub[0], on_hub[1])})
    monkeypatch.setattr(stream, "free_bytes", lambda directory: 1 << 20)  # a runner with 1 MB free
    run = act(monkeypatch, capsys, ws, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert run.results["merges/s.yml"]["status"] == "published"
    assert "stream mode:" in run.stdout
    assert "### Streamed merges" in run.summary and "peak disk" in run.summary
    assert len(hub.server.history(f"{hub.user}/s")) == 2


def test_a_killed_streamed_merge_leaves_no_commit_and_its_rerun_uploads_only_the_rest(hub, on_hub, small_disk,
                                                                                     tmp_path):
    """The CLI in a subprocess, stopped with SIGTERM (a cancelled job) once its first shard is on the Hub."""
    import os
    import signal
    import sys
    import time

    repo = f"{hub.org}/killed"
    cfg = _config(tmp_path / "c.yml", on_hub)
    cmd = [sys.executable, "-m", "mergebot.cli.main", "merge", str(cfg), str(small_disk / "out"), "--push-to", repo,
           "--stream", "--quiet", "--out-shard-size", SHARD]
    uploads = r"^/__lfs/upload/"
    hub.server.lfs_delay = 0.3
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while hub.server.count("PUT", uploads) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err
    assert len(hub.server.history(repo)) == 1  # created, nothing committed
    assert hub.server.repos[repo].private  # and nothing visible: the new repo stays private until published
    assert not (small_disk / "out").exists() and not list(small_disk.glob(".out.mergebot-*"))
    first = hub.server.count("PUT", uploads)
    hub.server.lfs_delay = 0.0
    done = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shards = [p for p in hub.server.files(repo) if p.endswith(".safetensors")]
    assert first >= 1 and hub.server.count("PUT", uploads) == len(shards)  # nothing uploaded twice
    assert "already on the Hub" in done.stderr
    assert len(hub.server.history(repo)) == 2
    # the re-run cannot tell its own private repo from one made private on purpose: it never widens visibility
    assert hub.server.repos[repo].private and "exists and is private: it stays private" in done.stderr


def test_local_parents_are_read_from_disk_beside_streamed_ones(hub, parents, on_hub, tmp_path):
    repo = f"{hub.org}/mixed"
    cfg = _config(tmp_path / "c.yml", [str(parents[0]), on_hub[1], on_hub[2]])
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--push-to", repo, "--stream", "--quiet",
                 "--out-shard-size", SHARD, "--allow-license-risk"]) == 0  # the local parent has no license
    local = _local_merge(parents, tmp_path)
    files = hub.server.files(repo)
    for shard in local.glob("*.safetensors"):
        assert files[shard.name] == shard.read_bytes(), shard.name
    assert sum(n for _, _, n in hub.server.file_gets(repo=f"{hub.org}/p1")) > 0
    assert sum(n for _, _, n in hub.server.file_gets(repo=f"{hub.org}/p0")) == 0  # the local one's never did


def test_a_repo_that_cannot_be_made_public_is_one_line(hub, on_hub, small_disk, tmp_path, monkeypatch, capsys):
    """Publishing landed but the visibility change failed: the run fails with one line saying the repo stays
    private and what to do, and the commit is there."""
    from huggingface_hub import HfApi

    def refuse(self, *a, **k):
        raise RuntimeError("injected: settings are down")

    monkeypatch.setattr(HfApi, "update_repo_settings", refuse)
    repo = f"{hub.org}/hidden"
    cfg = _config(tmp_path / "c.yml", on_hub)
    assert main(["merge", str(cfg), str(small_disk / "out"), "--push-to", repo, "--stream", "--quiet",
                 "--out-shard-size", SHARD]) != 0
    err = capsys.readouterr().err
    assert f"{repo}: published, but it stays private: making it public failed (RuntimeError)" in err
    assert "injected" not in err and hub.server.repos[repo].private and len(hub.server.history(repo)) == 2
