"""`mergebot watch`: one Hub webhook per Hub parent of the configured merges, against the loopback Hub; running it
again creates nothing, and a webhook whose watched list or settings drifted is updated in place."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebot.cli.main import main
from mergebot.hub.webhooks import WebhookError, ensure_webhooks

TARGET = "https://relay.example.com/hooks/mergebot"


def write_configs(ws: Path, org: str) -> None:
    (ws / "merges").mkdir(parents=True)
    (ws / "models" / "local").mkdir(parents=True)
    (ws / "merges" / "a.yml").write_text(
        f"models:\n  - model: {org}/base\n  - model: {org}/ft1\nmerge_method: slerp\nbase_model: {org}/base\n"
        "parameters:\n  t: 0.5\n")
    (ws / "merges" / "b.yml").write_text(
        f"models:\n  - model: {org}/base\n    parameters: {{weight: 0.5}}\n  - model: {org}/ft2+{org}/lora\n"
        "    parameters: {weight: 0.3}\n  - model: ./models/local\n    parameters: {weight: 0.2}\n"
        "merge_method: linear\n")


def watch(capsys: pytest.CaptureFixture, ws: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["watch", "--target", TARGET, "--workspace", str(ws), *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def watched(hub) -> dict[str, dict]:
    return {h["watched"][0]["name"]: h for h in hub.server.webhooks.values()}


def test_watch_registers_one_webhook_per_hub_parent_once(hub, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    write_configs(ws, hub.org)
    monkeypatch.setenv("MERGEBOT_WEBHOOK_SECRET", "s3cret")

    rc, out = watch(capsys, ws)
    assert rc == 0, out
    parents = {f"{hub.org}/{n}" for n in ("base", "ft1", "ft2", "lora")}
    hooks = watched(hub)
    assert set(hooks) == parents  # the local parent has no webhook
    for h in hooks.values():
        assert h["url"] == TARGET and h["domains"] == ["repo"] and h["secret"] == "s3cret"
        assert h["watched"] == [{"type": "model", "name": h["watched"][0]["name"]}]
    assert out.count("create: ") == 4

    rc, out = watch(capsys, ws)  # again: nothing new
    assert rc == 0, out
    assert len(hub.server.webhooks) == 4 and hub.server.count("POST", r"/api/settings/webhooks$") == 4
    assert out.count("ok: ") == 4 and "create" not in out

    # someone widened one webhook's watched list and disabled it: it is narrowed and enabled, not duplicated
    hid = hooks[f"{hub.org}/ft1"]["id"]
    hub.server.webhooks[hid].update(watched=[{"type": "model", "name": f"{hub.org}/ft1"},
                                             {"type": "model", "name": "someone/else"}], disabled=True)
    rc, out = watch(capsys, ws)
    assert rc == 0, out
    assert f"update: {hub.org}/ft1" in out and len(hub.server.webhooks) == 4
    assert hub.server.webhooks[hid]["watched"] == [{"type": "model", "name": f"{hub.org}/ft1"}]
    assert hub.server.webhooks[hid]["disabled"] is False


def test_watch_prunes_webhooks_of_parents_no_longer_configured(hub, tmp_path, capsys):
    ws = tmp_path / "ws"
    write_configs(ws, hub.org)
    assert watch(capsys, ws)[0] == 0
    (ws / "merges" / "b.yml").unlink()

    rc, out = watch(capsys, ws, "--dry-run")
    assert rc == 0 and out.count("unused: webhook") == 2 and len(hub.server.webhooks) == 4

    rc, out = watch(capsys, ws, "--prune")
    assert rc == 0, out
    assert set(watched(hub)) == {f"{hub.org}/base", f"{hub.org}/ft1"}
    assert out.count("deleted: webhook") == 2


def test_other_webhooks_of_the_user_are_left_alone(hub):
    api = hub.api()
    other = api.create_webhook(url="https://elsewhere.example/x", watched=[{"type": "model", "name": "a/b"}],
                               domains=["repo", "discussion"])
    done = ensure_webhooks(api, ["a/b"], TARGET, prune=True)
    assert done.created == ["a/b"] and done.pruned == []
    assert api.get_webhook(other.id).url == "https://elsewhere.example/x"
    with pytest.raises(WebhookError, match="expected an http"):
        ensure_webhooks(api, ["a/b"], "relay.example.com")
