"""Scheduled runs decide by content (issue 18): a parent commit that changes what a merge reads re-merges, one
that changes only what the card reads refreshes README.md and NOTICE in one small commit (no download, no
merge, the license check re-run), and anything else leaves the merge repo alone. Against the loopback Hub."""

from __future__ import annotations

import json

import pytest

from mergebot.cli.main import main
from tests.action.support import README, ZERO, act, commits, linear, push, upload_parents

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw:DeprecationWarning")

SCHEDULE = {"schedule": "17 3 * * 1"}


def blobs(hub, repo: str) -> dict[str, str]:
    """path -> blob id (git oid, of the LFS pointer for LFS files) of the repo's head."""
    head = hub.server.repos[repo].commits[hub.server.head(repo)]
    return {p: f.oid for p, f in head.files.items()}


def lock(hub, repo: str) -> dict:
    return json.loads(hub.server.files(repo)["mergebot.lock.json"])


def readme(hub, repo: str) -> str:
    return hub.server.files(repo)["README.md"].decode()


def scheduled(hub, checkout, monkeypatch, capsys, **inputs: str):
    return act(monkeypatch, capsys, checkout.path, "schedule", SCHEDULE, namespace=hub.user, hf_token=hub.token,
               **inputs)


@pytest.fixture
def published(hub, tiny_models, checkout, monkeypatch, capsys):
    """merges/a.yml (tiny-base + tiny-ft1 on the loopback Hub) published to mergebot-test/a."""
    upload_parents(hub, tiny_models)
    base, ft1 = f"{hub.org}/tiny-base", f"{hub.org}/tiny-ft1"
    c1 = checkout.commit({"merges/a.yml": linear(base, ft1)})
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 0, run.stdout
    return f"{hub.user}/a", ft1


def test_lock_records_digests_of_what_the_merge_read(hub, published):
    repo, ft1 = published
    parents = {p["ref"]: p for p in lock(hub, repo)["parents"]}
    files = parents[ft1]["files"]
    parent_head = hub.server.repos[ft1].commits[hub.server.head(ft1)].files
    assert files["model.safetensors"] == parent_head["model.safetensors"].sha256  # LFS: sha256
    assert files["config.json"] == parent_head["config.json"].oid  # regular: git blob id
    assert "README.md" not in files and set(parents[ft1]["card"]) == {"metadata", "files"}
    assert lock(hub, repo)["card_inputs"]["template"] == "builtin"


def test_readme_metadata_edit_is_a_card_only_commit(hub, published, checkout, monkeypatch, capsys):
    repo, ft1 = published
    before, weights_before, n = blobs(hub, repo), len(hub.server.file_gets()), commits(hub, repo)

    # nothing changed: nothing committed
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 0, run.stdout
    assert run.results["merges/a.yml"]["status"] == "up-to-date" and commits(hub, repo) == n
    assert "💤 up-to-date | none |" in run.summary

    # a prose-only README edit moves the parent's commit but changes nothing a merge or a card reads
    hub.server.commit(ft1, {"README.md": (README + "More words.\n").encode()}, message="typo")
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.results["merges/a.yml"]["status"] == "up-to-date" and commits(hub, repo) == n

    # a README front matter edit the card shows (languages): README.md refreshed, weights untouched
    new_sha = hub.server.commit(ft1, {"README.md": README.replace("license:", "language: [fr]\nlicense:").encode()},
                                message="languages")
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 0, run.stdout
    result = run.results["merges/a.yml"]
    assert result["status"] == "card-refreshed" and result["commit"] == hub.server.head(repo)
    assert commits(hub, repo) == n + 1
    after = blobs(hub, repo)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    # NOTICE names the commit the licenses were read from; weights, config, tokenizer: same blobs
    assert changed == {"README.md", "NOTICE", "mergebot.lock.json"}
    assert f"{ft1}@{new_sha}" in hub.server.files(repo)["NOTICE"].decode()
    assert len(hub.server.file_gets()) == weights_before  # no weights downloaded
    assert "language:\n- fr" in readme(hub, repo)
    pin = {p["ref"]: p for p in lock(hub, repo)["parents"]}[ft1]
    assert pin["sha"] != new_sha and pin["card_sha"] == new_sha  # the weights' provenance is the merged commit
    assert "card inputs changed in mergebot-org/tiny-ft1: license metadata" in run.summary
    assert "📇 card-refreshed" in run.summary
    assert hub.server.history(repo)[0].title == "mergebot: refresh the model card (no re-merge)"

    # and the next run finds it up to date
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.results["merges/a.yml"]["status"] == "up-to-date" and commits(hub, repo) == n + 1


def test_parent_license_change_refreshes_the_verdict_or_blocks(hub, published, checkout, monkeypatch, capsys):
    repo, ft1 = published
    n = commits(hub, repo)
    hub.server.commit(ft1, {"README.md": README.replace("apache-2.0", "cc-by-nc-4.0").encode()})
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 0, run.stdout
    r = run.results["merges/a.yml"]
    assert r["status"] == "card-refreshed" and commits(hub, repo) == n + 1
    assert "warn (cc-by-nc-4.0)" in run.summary
    assert "license: cc-by-nc-4.0" in readme(hub, repo)
    assert "cc-by-nc-4.0" in hub.server.files(repo)["NOTICE"].decode()

    # a no-derivatives license now: blocked (strict policy), nothing committed
    hub.server.commit(ft1, {"README.md": README.replace("apache-2.0", "cc-by-nd-4.0").encode()})
    head = hub.server.head(repo)
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 1
    assert run.results["merges/a.yml"]["status"] == "blocked"
    assert hub.server.head(repo) == head
    assert "nothing committed" in run.summary


def test_shard_change_is_a_full_remerge(hub, published, tiny_models, checkout, monkeypatch, capsys):
    repo, ft1 = published
    n, weights_before = commits(hub, repo), len(hub.server.file_gets())
    other = (tiny_models[2] / "model.safetensors").read_bytes()
    new_sha = hub.server.commit(ft1, {"model.safetensors": other}, message="new weights")
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 0, run.stdout
    assert run.results["merges/a.yml"]["status"] == "published" and commits(hub, repo) == n + 1
    assert len(hub.server.file_gets()) > weights_before
    assert {p["ref"]: p["sha"] for p in lock(hub, repo)["parents"]}[ft1] == new_sha
    assert f"weights changed in {ft1} (" in run.summary and "): model.safetensors" in run.summary


def test_old_lock_without_digests_falls_back_to_commits(hub, published, checkout, monkeypatch, capsys):
    repo, ft1 = published
    old = lock(hub, repo)
    for p in old["parents"]:
        p.pop("files", None)
        p.pop("card", None)
    old.pop("card_inputs")
    hub.server.commit(repo, {"mergebot.lock.json": (json.dumps(old, indent=2) + "\n").encode()}, message="old lock")
    n = commits(hub, repo)
    hub.server.commit(ft1, {"README.md": (README + "More words.\n").encode()})
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 0, run.stdout
    assert run.results["merges/a.yml"]["status"] == "published" and commits(hub, repo) == n + 1
    assert "files" in {p["ref"]: p for p in lock(hub, repo)["parents"]}[ft1]  # the re-merge records digests


def test_card_refresh_command_by_hand(hub, published, capsys):
    repo, ft1 = published
    hub.server.commit(ft1, {"README.md": README.replace("apache-2.0", "mit").encode()})
    head = hub.server.head(repo)

    capsys.readouterr()
    assert main(["card", "--refresh", repo, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "+++ b/README.md" in out.out and "would commit: README.md" in out.err
    assert hub.server.head(repo) == head

    assert main(["card", "--refresh", repo]) == 0
    out = capsys.readouterr()
    assert "refreshed: " in out.out and hub.server.head(repo) != head
    assert set(hub.server.history(repo)[0].files) == set(hub.server.history(repo)[1].files)

    assert main(["card", "--refresh", repo]) == 0  # again: nothing to commit
    assert "unchanged: " in capsys.readouterr().out

    assert main(["card", "--refresh", f"{hub.user}/missing"]) != 0
    assert "mergebot-test/missing: cannot read it" in capsys.readouterr().err


def test_new_card_template_is_a_card_input(hub, published, checkout, monkeypatch, capsys):
    """A template change re-renders every card; here the rendered bytes are the same, so only the lock's card
    record is committed and the next run is quiet."""
    from mergebot.hub import digests

    repo, _ = published
    n = commits(hub, repo)

    def newer(template=None):
        return {**digests.card_inputs(template), "template_sha256": "0" * 64}

    monkeypatch.setattr("mergebot.action.staleness.card_inputs", newer)
    monkeypatch.setattr("mergebot.card.refresh.card_inputs", newer)
    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert run.rc == 0, run.stdout
    assert run.results["merges/a.yml"]["status"] == "up-to-date"
    assert "card template changed; card unchanged (card inputs recorded)" in run.summary
    assert commits(hub, repo) == n + 1 and lock(hub, repo)["card_inputs"]["template_sha256"] == "0" * 64
    assert set(hub.server.history(repo)[0].files) == set(hub.server.history(repo)[1].files)

    run = scheduled(hub, checkout, monkeypatch, capsys)
    assert "💤 up-to-date | none |" in run.summary and commits(hub, repo) == n + 1


TEMPLATE = '{% extends "card.md.j2" %}{% block usage %}\nAsk the merges team ({{ ctx.repo_id }}).\n{% endblock %}\n'


def test_card_template_input_renders_every_card_and_a_change_refreshes_them(hub, tiny_models, checkout,
                                                                           monkeypatch, capsys):
    """The Action's `card_template` input: the published card comes from the repository's template; editing the
    template makes the next scheduled run re-render the card without a merge; a template outside the checkout
    is refused before anything runs."""
    upload_parents(hub, tiny_models)
    c1 = checkout.commit({"merges/a.yml": linear(f"{hub.org}/tiny-base", f"{hub.org}/tiny-ft1"),
                          "cards/card.md.j2": TEMPLATE})
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token,
              card_template="cards/card.md.j2")
    assert run.rc == 0, run.stdout
    repo = f"{hub.user}/a"
    assert f"Ask the merges team ({repo})." in readme(hub, repo)
    assert lock(hub, repo)["card_inputs"]["template"] == "custom"
    n = commits(hub, repo)

    run = scheduled(hub, checkout, monkeypatch, capsys, card_template="cards/card.md.j2")
    assert run.rc == 0 and run.results["merges/a.yml"]["status"] == "up-to-date" and commits(hub, repo) == n

    checkout.commit({"cards/card.md.j2": TEMPLATE.replace("Ask the merges team", "Write to the merges team")})
    weights_before = len(hub.server.file_gets())
    run = scheduled(hub, checkout, monkeypatch, capsys, card_template="cards/card.md.j2")
    assert run.rc == 0, run.stdout
    assert run.results["merges/a.yml"]["status"] == "card-refreshed" and commits(hub, repo) == n + 1
    assert f"Write to the merges team ({repo})." in readme(hub, repo)
    assert len(hub.server.file_gets()) == weights_before  # no merge: no weights downloaded

    (checkout.path.parent / "outside.md.j2").write_text(TEMPLATE)
    run = scheduled(hub, checkout, monkeypatch, capsys, card_template="../outside.md.j2")
    assert run.rc == 1 and commits(hub, repo) == n + 1
    errors = [line for line in run.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and "input card_template: '../outside.md.j2'" in errors[0]
