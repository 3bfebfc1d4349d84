"""`mergebot plan --backend hf-jobs`: one HF Job per config to merge, submitted with the real client."""

from __future__ import annotations

from mergebot.cli.main import main
from tests.action.support import PARENTS, ZERO, github_env, linear, push, upload_parents


def test_plan_submits_one_job_per_config_with_the_token_as_secret(hub, tiny_models, checkout, monkeypatch, capsys,
                                                                     tmp_path):
    upload_parents(hub, tiny_models)
    base, ft1, ft2 = (f"{hub.org}/{n}" for n in PARENTS)
    c1 = checkout.commit({"merges/a.yml": linear(base, ft1), "merges/b.yml": linear(base, ft2)})
    github_env(monkeypatch, checkout.path, tmp_path / "gh", "push", push(ZERO, c1), namespace=hub.user,
               hf_token=hub.token)
    monkeypatch.chdir(checkout.path)
    rc = main(["plan", "--backend", "hf-jobs", "--image", "ghcr.io/acme/mergebot:1", "--flavor", "a10g-large"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    jobs = hub.server.jobs
    assert len(jobs) == 2 and out.out.count("submitted:") == 2
    env = {j["environment"]["MERGEBOT_REPO"]: j for j in jobs}
    assert set(env) == {f"{hub.user}/a", f"{hub.user}/b"}
    job = env[f"{hub.user}/a"]
    assert job["flavor"] == "a10g-large" and job["dockerImage"] == "ghcr.io/acme/mergebot:1"
    assert job["environment"]["MERGEBOT_CONFIG"] == (checkout.path / "merges/a.yml").read_text()
    assert "mergebot merge /tmp/merge.yml" in " ".join(job["command"] + (job.get("arguments") or []))
    assert hub.token not in str(job.get("environment")) and "HF_TOKEN" in str(job.get("secrets"))
    printed = [line for line in (out.out + out.err).splitlines() if hub.token in line]
    assert printed == [f"::add-mask::{hub.token}"]  # only the runner's masking command ever sees it


def test_local_parents_are_refused_before_anything_is_submitted(hub, tiny_models, checkout, monkeypatch, capsys,
                                                                tmp_path):
    c1 = checkout.commit({"merges/a.yml": linear(str(tiny_models[0]), str(tiny_models[1]))})
    github_env(monkeypatch, checkout.path, tmp_path / "gh", "push", push(ZERO, c1), namespace=hub.user,
               hf_token=hub.token)
    monkeypatch.chdir(checkout.path)
    rc = main(["plan", "--backend", "hf-jobs", "--image", "img"])
    assert rc != 0 and "local directories" in capsys.readouterr().err
    assert hub.server.jobs == []
