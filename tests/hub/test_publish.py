"""Publishing against the loopback FakeHub with the real huggingface_hub client (no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mergebot.card.licenses import LicenseInput, analyze
from mergebot.errors import ModelError
from mergebot.hub.parents import ParentMetadataError, parent_from_hub, parents_from_lock
from mergebot.hub.publish import (
    LicenseGateError,
    PublishAuthError,
    PublishConflict,
    PublishError,
    RetryPolicy,
    publish,
)
from mergebot.io.lockfile import LockFileError, read_lock
from tests.hubserver import Token
from tests.hubserver.client import HubFixture

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw:DeprecationWarning")  # inside the client
FAST = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)
PARENT_SHA = "a" * 40
CONFIG = "models:\n  - model: org/parent-a\n  - model: org/parent-b\nmerge_method: linear\ndtype: float32\n"


def write_tokenizer(directory: Path, vocab_size: int = 64) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(len(special), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 128}))


def make_output(directory: Path, parents: list[dict] | None = None) -> Path:
    """A tiny Llama merge output: weights, config, tokenizer, lock, config copy, README."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=32, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    (directory / "mergekit_config.yml").write_text(CONFIG)
    lock = {
        "mergebot_version": "0.1.0", "config_sha256": hashlib.sha256(CONFIG.encode()).hexdigest(), "kind": "merge",
        "merge_method": "linear", "base_model": None,
        "parents": parents or [
            {"ref": "org/parent-a", "revision": "main", "sha": PARENT_SHA, "local": False, "role": "input"},
            {"ref": "org/parent-b", "revision": None, "sha": "b" * 40, "local": False, "role": "input"}],
        "dtype": "float32", "out_dtype": None, "random_seed": None, "device": "cpu",
        "created": "2026-11-23T03:00:00Z",
    }
    (directory / "mergebot.lock.json").write_text(json.dumps(lock, indent=2))
    (directory / "README.md").write_text("---\nlicense: mit\ntags: [merge, mergekit, mergebot]\n---\n# tiny\n")
    return directory


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per module (transformers import + save), copied per test."""
    return make_output(tmp_path_factory.mktemp("tiny") / "out")


@pytest.fixture
def out_dir(tiny_template: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_template, tmp_path / "out"))


def repo_of(hub: HubFixture, name: str = "tiny-merge") -> str:
    return f"{hub.org}/{name}"


def generate(model_dir: Path | str) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    inputs = tok("w5 w6 w7", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    return out[0].tolist()


# ------------------------------------------------------------------------------------------------ happy path


def test_publish_then_download_load_and_generate(hub: HubFixture, out_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    repo = repo_of(hub)
    result = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert result.changed and result.commit == hub.server.head(repo)
    assert sorted(result.uploaded) == sorted(p.name for p in out_dir.iterdir())
    history = hub.server.history(repo)
    assert len(history) == 2 and history[1].title == "initial commit"  # exactly one commit of ours
    commit = history[0]
    assert hashlib.sha256(CONFIG.encode()).hexdigest()[:12] in commit.title
    assert f"org/parent-a@{PARENT_SHA}" in commit.message and f"org/parent-b@{'b' * 40}" in commit.message
    stored = hub.server.repos[repo].commits[result.commit].files
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs  # both upload paths exercised

    snap = Path(snapshot_download(repo, revision=result.commit, endpoint=hub.url, cache_dir=tmp_path / "cache"))
    for f in out_dir.iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes(), f.name
    assert generate(snap) == generate(out_dir)


def test_republish_unchanged_makes_no_commit(hub: HubFixture, out_dir: Path) -> None:
    repo = repo_of(hub)
    first = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    commits_before = hub.server.count("POST", r"/commit/")
    puts_before = hub.server.count("PUT", r"/__lfs/upload/")
    again = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert not again.changed and again.commit == first.commit == hub.server.head(repo)
    assert again.uploaded == [] and again.deleted == []
    assert hub.server.count("POST", r"/commit/") == commits_before  # no commit request at all
    assert hub.server.count("PUT", r"/__lfs/upload/") == puts_before
    assert hub.server.count("POST", r"/preupload/") == 1
    assert len(hub.server.history(repo)) == 2


def test_changed_and_removed_files_make_one_commit(hub: HubFixture, out_dir: Path) -> None:
    repo = repo_of(hub)
    publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    (out_dir / "generation_config.json").unlink()
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# tiny, second edition\n")
    result = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert result.changed and result.uploaded == ["README.md"] and result.deleted == ["generation_config.json"]
    files = hub.server.files(repo)
    assert "generation_config.json" not in files and ".gitattributes" in files
    assert files["README.md"].endswith(b"second edition\n")
    assert len(hub.server.history(repo)) == 3


def test_create_pr_leaves_main_alone(hub: HubFixture, out_dir: Path) -> None:
    repo = repo_of(hub)
    main_before = publish(out_dir, repo, endpoint=hub.url, retry=FAST).commit
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# proposed\n")
    result = publish(out_dir, repo, endpoint=hub.url, create_pr=True, retry=FAST)
    assert result.changed and result.pr_url and result.pr_url.endswith("/discussions/1")
    assert hub.server.head(repo) == main_before
    assert hub.server.head(repo, "refs/pr/1") == result.commit


# ------------------------------------------------------------------------------------------------ failures


def test_concurrent_commit_is_a_conflict(hub: HubFixture, out_dir: Path) -> None:
    repo = repo_of(hub)
    publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    hub.server.inject_concurrent_commit(repo, {"theirs.txt": b"pushed meanwhile\n"})
    with pytest.raises(PublishConflict, match="changed since it was read") as exc:
        publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    head = hub.server.history(repo)[0]
    assert head.title == "concurrent commit" and head.oid[:12] in str(exc.value)
    files = hub.server.files(repo)
    assert files["theirs.txt"] == b"pushed meanwhile\n" and b"# mine" not in files["README.md"]


def test_one_failed_lfs_upload_is_retried(hub: HubFixture, out_dir: Path) -> None:
    """The client's own backoff retries the PUT (one 500, then success): one commit, weights intact."""
    repo = repo_of(hub)
    hub.server.fail_next_lfs_uploads(1, status=500)
    result = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert result.changed and result.commit == hub.server.head(repo)
    assert hub.server.count("PUT", r"/__lfs/upload/") == 2
    assert hub.server.files(repo)["model.safetensors"] == (out_dir / "model.safetensors").read_bytes()
    assert len(hub.server.history(repo)) == 2


def test_rejected_lfs_upload_fails_cleanly(hub: HubFixture, out_dir: Path) -> None:
    """A non-transient upload failure (400) stops before the commit: the old head is intact."""
    repo = repo_of(hub)
    hub.api().create_repo(repo)
    head = hub.server.head(repo)
    hub.server.fail_next_lfs_uploads(1, status=400)
    with pytest.raises(PublishError, match="HTTP 400") as exc:
        publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert head[:12] in str(exc.value)
    assert hub.server.head(repo) == head and hub.server.count("POST", r"/commit/") == 0


def test_commit_5xx_is_retried(hub: HubFixture, out_dir: Path) -> None:
    repo = repo_of(hub)
    hub.server.fail_next_commit(503)
    result = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert result.changed and result.retries == 1 and result.commit == hub.server.head(repo)
    assert len(hub.server.history(repo)) == 2


def test_lost_commit_response_does_not_commit_twice(hub: HubFixture, out_dir: Path) -> None:
    repo = repo_of(hub)
    hub.server.fail_next_commit(502, after_apply=True)
    result = publish(out_dir, repo, endpoint=hub.url, retry=FAST)
    assert result.changed and result.commit == hub.server.head(repo)
    assert len(hub.server.history(repo)) == 2 and hub.server.count("POST", r"/commit/") == 1


def test_wrong_token_is_an_auth_error_without_the_token(hub: HubFixture, out_dir: Path) -> None:
    secret = "hf_this_is_a_wrong_and_secret_token"
    with pytest.raises(PublishAuthError) as exc:
        publish(out_dir, repo_of(hub), token=secret, endpoint=hub.url, retry=FAST)
    message = str(exc.value)
    assert message.startswith(f"token rejected by {hub.url} for {repo_of(hub)}: HTTP 401")
    assert secret not in message and secret not in repr(exc.value)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    assert repo_of(hub) not in hub.server.repos


def test_read_only_token_is_an_auth_error(hub: HubFixture, out_dir: Path) -> None:
    hub.server.tokens["hf_read_only"] = Token(user=hub.user, write=False, orgs=(hub.org,))
    with pytest.raises(PublishAuthError, match="HTTP 403"):
        publish(out_dir, repo_of(hub), token="hf_read_only", endpoint=hub.url, retry=FAST)


def test_missing_token_is_an_auth_error(hub: HubFixture, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishAuthError, match="no Hugging Face token"):
        publish(out_dir, repo_of(hub), endpoint=hub.url, retry=FAST)
    assert hub.server.requests == []


def test_license_gate(hub: HubFixture, out_dir: Path) -> None:
    blocked = analyze([LicenseInput("a/nd", "cc-by-nd-4.0"), LicenseInput("b/x", "apache-2.0")])
    assert blocked.verdict == "block"
    with pytest.raises(LicenseGateError, match="forbids derivatives"):
        publish(out_dir, repo_of(hub), endpoint=hub.url, license_report=blocked, retry=FAST)
    assert hub.server.requests == []  # refused before any request
    result = publish(out_dir, repo_of(hub), endpoint=hub.url, license_report=blocked, allow_license_risk=True,
                     retry=FAST)
    assert result.changed


def test_bad_arguments(hub: HubFixture, out_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="expected ORG/NAME"):
        publish(out_dir, "no-namespace", endpoint=hub.url)
    with pytest.raises(PublishError, match="does not exist"):
        publish(tmp_path / "nope", repo_of(hub), endpoint=hub.url)
    (out_dir / "mergebot.lock.json").unlink()
    with pytest.raises(LockFileError, match="mergebot.lock.json: missing"):
        publish(out_dir, repo_of(hub), endpoint=hub.url)


@pytest.mark.parametrize(("lock", "reason"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"config_sha256": "x", "merge_method": "linear", "parents": [{"ref": 5}]}', "'ref'"),
    (b'{"config_sha256": "x", "merge_method": "linear", "parents": [{"ref": ""}]}', "'ref'"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (None, "not a regular file"),  # a directory
    ("fifo", "not a regular file"),  # reading it would block forever
], ids=["latin-1", "int ref", "empty ref", "deep", "directory", "fifo"])
def test_a_broken_lock_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], lock: bytes | str | None,
                                   reason: str) -> None:
    """`mergebot publish DIR` reads DIR's lock first: a lock that is not UTF-8, holds a parent whose ref is not
    a string, is a directory or a FIFO was a traceback (or a hang), not one line naming the file."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    path = out / "mergebot.lock.json"
    if lock is None:
        path.mkdir()
    elif lock == "fifo":
        os.mkfifo(path)
    else:
        assert isinstance(lock, bytes)
        path.write_bytes(lock)
    assert cli("publish", str(out), "--repo", "org/x", "--check", "off") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}") and "mergebot.lock.json" in err and reason in err, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(LockFileError, match=reason):  # the card and the gate read it too
        read_lock(out)


# ------------------------------------------------------------------------------------------------ parents + CLI


def seed_parent(hub: HubFixture, repo_id: str, front_matter: str, *, gated: str | bool = False) -> str:
    hub.server.create_repo(repo_id, gated=gated)
    return hub.server.commit(repo_id, {"README.md": f"---\n{front_matter}---\n# parent\n".encode()})


def test_parent_metadata_from_the_hub(hub: HubFixture) -> None:
    sha = seed_parent(hub, "meta/Llama-3-tiny", "license: llama3\nlanguage: [en, de]\npipeline_tag: text-generation\n",
                      gated="manual")
    hub.server.commit("meta/Llama-3-tiny", {"README.md": b"---\nlicense: mit\n---\n"})  # later change: not read
    parent = parent_from_hub("meta/Llama-3-tiny", revision="main", sha=sha, endpoint=hub.url)
    assert (parent.license, parent.languages, parent.sha, parent.gated) == ("llama3", ["en", "de"], sha, "manual")
    assert parent.pipeline_tag == "text-generation" and parent.is_hub
    report = analyze([parent], repo_name="Llama-3-x")
    assert report.license == "llama3" and "gated-parent" in report.codes("warn")


def test_parent_metadata_errors_name_the_repo(hub: HubFixture) -> None:
    with pytest.raises(ParentMetadataError, match="org/missing: repository not found"):
        parent_from_hub("org/missing", endpoint=hub.url)
    seed_parent(hub, "org/present", "license: mit\n")
    with pytest.raises(ParentMetadataError, match=f"org/present@{'c' * 40}: revision"):
        parent_from_hub("org/present", sha="c" * 40, endpoint=hub.url)
    with pytest.raises(ParentMetadataError, match="org/present: cannot reach http://127.0.0.1:9"):
        parent_from_hub("org/present", endpoint="http://127.0.0.1:9")


def test_local_parent_front_matter(tmp_path: Path) -> None:
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: ja\ntags: [x]\n---\n# local\n")
    lock = {"parents": [{"ref": "./local-model", "local": True, "role": "base"}]}
    [parent] = parents_from_lock(lock, base_dir=tmp_path)
    assert (parent.license, parent.languages, parent.is_hub, parent.role) == ("apache-2.0", ["ja"], False, "base")
    # a stranger's broken (or hostile) card is no metadata, an unknown license, not a stopped merge
    for bad in ("---\nlicense: [unclosed\n---\n", "---\nlicense: apache-2.0\n", "---\na: &a [*a]\n---\n",
                "---\nlicense: mit\x00\n---\n"):
        (local / "README.md").write_text(bad)
        [parent] = parents_from_lock(lock, base_dir=tmp_path)
        assert parent.license is None and parent.languages == [], bad


def test_lock_refs_with_revision_resolve_to_the_repo(hub: HubFixture) -> None:
    sha = seed_parent(hub, "org/pinned", "license: apache-2.0\n")
    lock = {"parents": [{"ref": "org/pinned@main", "revision": "main", "sha": sha, "local": False, "role": "base"}]}
    [parent] = parents_from_lock(lock, endpoint=hub.url)
    assert (parent.ref, parent.repo_id, parent.sha, parent.license) == ("org/pinned@main", "org/pinned", sha,
                                                                       "apache-2.0")


def test_looks_local_follows_mergekit() -> None:
    from mergebot.config.refs import looks_local

    assert not looks_local("gpt2") and not looks_local("org/name")
    assert all(looks_local(r) for r in ("./x", "../x", "/abs/x", "~/x", "a/b/c"))


def cli(*argv: str) -> int:
    """`mergebot publish ...` through the same argparse + error guard as mergebot.cli.main, without importing the
    engine's commands (so these tests do not depend on the merge engine's state)."""
    import argparse

    from mergebot.cli import publish as publish_cmd
    from mergebot.cli._errors import run_guarded

    parser = argparse.ArgumentParser(prog="mergebot")
    publish_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return run_guarded(lambda: args.run(args), debug=False)


def _cli_output(tiny_template: Path, tmp_path: Path, hub: HubFixture) -> Path:
    import shutil

    a = seed_parent(hub, "meta/llama3-parent-a", "license: llama3\nlanguage: [en]\n")
    b = seed_parent(hub, "meta/llama3-parent-b", "license: llama3\nlanguage: [en, fr]\n")
    out = Path(shutil.copytree(tiny_template, tmp_path / "cli-out"))
    lock = json.loads((out / "mergebot.lock.json").read_text())
    lock["parents"] = [{"ref": "meta/llama3-parent-a", "revision": "main", "sha": a, "local": False, "role": "input"},
                       {"ref": "meta/llama3-parent-b", "revision": "main", "sha": b, "local": False, "role": "input"}]
    (out / "mergebot.lock.json").write_text(json.dumps(lock))
    return out


def test_cli_publish_end_to_end(hub: HubFixture, tiny_template: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import ModelCard

    out = _cli_output(tiny_template, tmp_path, hub)
    repo = f"{hub.org}/Llama-3-tiny-merge"
    assert cli("publish", str(out), "--repo", repo) == 1  # the parents are cards only: no weights to check against
    assert "error: quality check: parent meta/llama3-parent-a: " in capsys.readouterr().err
    assert repo not in hub.server.repos
    assert cli("publish", str(out), "--repo", repo, "--check", "off") == 0
    captured = capsys.readouterr()
    assert "license: llama3, check: ok" in captured.err and f"published: {hub.url}/{repo} commit" in captured.out
    assert hub.token not in captured.out + captured.err
    files = hub.server.files(repo)
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "llama3" and card.data.base_model == ["meta/llama3-parent-a", "meta/llama3-parent-b"]
    assert card.data.language == ["en", "fr"] and "**Built with Meta Llama 3**" in card.text
    assert b"Meta Llama 3 is licensed under" in files["NOTICE"]

    assert cli("publish", str(out), "--repo", repo, "--check", "off") == 0  # byte-identical card: no commit
    assert "unchanged:" in capsys.readouterr().out
    assert len(hub.server.history(repo)) == 2


def test_cli_refuses_a_blocked_license(hub: HubFixture, tiny_template: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli_output(tiny_template, tmp_path, hub)
    readme = (out / "README.md").read_text()
    repo = f"{hub.org}/tiny-merge"  # Llama 3 parents: the name must begin with "Llama 3"
    assert cli("publish", str(out), "--repo", repo) == 2
    err = capsys.readouterr().err
    assert "check: block" in err and 'must begin with "Llama 3"' in err
    assert repo not in hub.server.repos and (out / "README.md").read_text() == readme

    assert cli("publish", str(out), "--repo", repo, "--allow-license-risk", "--license", "llama3",
               "--check", "off") == 0  # the parents are cards only, without weights to check against
    assert b"License check: **block**" in hub.server.files(repo)["README.md"]


# ------------------------------------------------------------------------------------------------ the fake itself


def test_fake_hub_speaks_the_client_protocol(hub: HubFixture, tmp_path: Path) -> None:
    """The endpoints other tests rely on, through the real client: refs, commits, downloads, privacy, gating."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    api = hub.api()
    assert api.whoami()["name"] == hub.user
    repo = f"{hub.user}/surface"
    api.create_repo(repo, private=True)
    api.create_repo(repo, private=True, exist_ok=True)
    info = api.upload_file(path_or_fileobj=b"\x00" * 1000, path_in_repo="sub/w.bin", repo_id=repo,
                           commit_message="weights")
    assert info.oid == hub.server.head(repo)
    assert api.list_repo_refs(repo).branches[0].target_commit == info.oid
    assert [c.title for c in api.list_repo_commits(repo)] == ["weights", "initial commit"]
    assert api.file_exists(repo, "sub/w.bin") and not api.file_exists(repo, "nope.txt")
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "sub/w.bin"]
    [entry] = api.get_paths_info(repo, ["sub/w.bin"])
    assert entry.lfs.sha256 == hashlib.sha256(b"\x00" * 1000).hexdigest()
    path = hf_hub_download(repo, "sub/w.bin", revision=info.oid, cache_dir=tmp_path / "c", endpoint=hub.url)
    assert Path(path).read_bytes() == b"\x00" * 1000
    assert api.model_info(repo, files_metadata=True).siblings[1].lfs.size == 1000
    assert not HfApi(endpoint=hub.url, token=False).repo_exists(repo)  # private: invisible anonymously

    hub.server.create_repo("someone/gated", gated="auto")
    hub.server.commit("someone/gated", {"config.json": b"{}"})
    with pytest.raises(GatedRepoError):
        hf_hub_download("someone/gated", "config.json", cache_dir=tmp_path / "g", endpoint=hub.url)
    api.delete_repo(repo)
    assert repo not in hub.server.repos
    assert hub.server.unhandled == []


def test_publish_never_follows_a_link_out_of_the_output(hub: HubFixture, tiny_template: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An output directory someone else assembled (downloaded, unpacked) may hold a link to the user's Hub token
    or a linked folder: `mergebot publish` must not upload what lies outside the directory."""
    import os

    out = _cli_output(tiny_template, tmp_path, hub)
    secret = tmp_path / "home" / "token"
    (secret.parent / "folder").mkdir(parents=True)
    secret.write_text("hf_SECRET_outside_the_output\n")
    (secret.parent / "folder" / "id_rsa").write_text("PRIVATE KEY outside the output\n")
    os.symlink(secret, out / "tokenizer.model")
    os.symlink(secret.parent / "folder", out / "extra")
    repo = f"{hub.org}/Llama-3-tiny-merge"
    assert cli("publish", str(out), "--repo", repo, "--check", "off") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: refusing ") and "a symlink that points outside the directory" in err
    assert len(err.splitlines()) == 1 and str(secret.parent) not in err
    assert repo not in hub.server.repos
    os.unlink(out / "tokenizer.model")
    (out / "mergekit_config.yml").unlink()
    os.symlink(secret, out / "mergekit_config.yml")  # the card quotes the config verbatim
    os.unlink(out / "extra")
    readme = (out / "README.md").read_bytes()
    with pytest.raises(ModelError, match="'mergekit_config.yml': a symlink that points outside"):
        publish(out, repo, token=hub.token, endpoint=hub.url, retry=FAST)  # the library call too
    assert cli("publish", str(out), "--repo", repo, "--check", "off") == 1
    assert "'mergekit_config.yml': a symlink" in capsys.readouterr().err
    assert repo not in hub.server.repos and (out / "README.md").read_bytes() == readme
    assert "hf_SECRET" not in (out / "README.md").read_text() and secret.read_text().startswith("hf_SECRET")
    (out / "mergekit_config.yml").unlink()
    os.symlink("config.json", out / "mergekit_config.yml")  # a link inside the directory is fine
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("inside\n")
    os.symlink(out / "notes", out / "linked")
    local = publish(out, repo, token=hub.token, endpoint=hub.url, retry=FAST, allow_license_risk=True)
    assert local.changed and repo in hub.server.repos
