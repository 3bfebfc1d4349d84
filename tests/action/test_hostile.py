"""The Action against hostile configs (issue 12): whoever can push a config must not be able to write workflow
commands, Markdown or HTML into the run, stop the other configs, read files outside the checkout, or make a
pull request's run use the Hub token. Same harness as tests/test_action.py: a real git checkout, event payload
files, GITHUB_OUTPUT / GITHUB_STEP_SUMMARY, and the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mergebot.action import events as events_module
from mergebot.action.runner_log import (
    annotation,
    command,
    escape_data,
    escape_property,
    exception_message,
    md_code,
    md_text,
    one_line,
    safe_line,
    traceback_lines,
)
from mergebot.builds.base import MergeOptions
from mergebot.cli.main import main
from mergebot.io.confine import workspace as confined_workspace
from tests import hubserver
from tests.action.support import (
    ROOT,
    ZERO,
    act,
    github_env,
    linear,
    local_parents,
    parse_outputs,
    push,
    upload_parents,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw:DeprecationWarning")

OUR_COMMANDS = ("group", "endgroup", "error", "warning", "notice", "add-mask")
IMG = "<img src=x onerror=alert(1)>"


def commands_in(log: str) -> list[str]:
    """Every line the runner would read as a workflow command (it trims leading blanks first)."""
    return [line for line in log.split("\n") if line.lstrip().startswith("::")]


def assert_no_forged_commands(log: str) -> None:
    for line in commands_in(log):
        name = line.lstrip()[2:].split("::", 1)[0].split(" ", 1)[0]
        assert name in OUR_COMMANDS, line
        assert "pwned" not in name, line
    assert not any(line.lstrip().startswith("::error::pwned") for line in log.split("\n"))
    assert not [line for line in log.split("\n") if "pwned" in line and "\r" in line]


# ---------------------------------------------------------------------------------------------- units

def test_runner_text_is_escaped_in_one_place():
    assert escape_data("50%\r\nnext") == "50%25%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    assert command("error", "x\n::error::pwned", file="m/a,b.yml", title="t: u") == \
        "::error file=m/a%2Cb.yml,title=t%3A u::x%0A::error::pwned"
    assert annotation("warning", "é " + "x" * 5000).endswith("…") and len(annotation("notice", "y" * 5000)) < 1100
    assert escape_data("\x1b[31mred") == "\\x1b[31mred"  # ANSI escapes are shown, not obeyed

    assert one_line("a\nb\rc\td\x00e\x1b\u202efg\u2028") == "a\\nb\\rc\\td\\x00e\\x1b\\u202efg\\u2028"
    assert one_line("bad\udcff.yml") == "bad\\xff.yml"  # a byte that is not UTF-8, as os.fsdecode keeps it
    assert one_line("z" * 400, 300) == "z" * 299 + "…"
    for forged in ("::error::pwned", "  ::add-mask::x", "##[error]pwned"):
        assert safe_line(forged).startswith("> ")
    assert safe_line("failed: x\n::error::pwned") == "failed: x\\n::error::pwned"

    assert md_text(IMG) == "&lt;img src=x onerror=alert(1)&gt;"
    assert md_text("a|b\nc") == "a&#124;b&#92;nc" and md_text("[x](javascript:1) `y` *z*") == \
        "&#91;x&#93;(javascript:1) &#96;y&#96; &#42;z&#42;"
    assert md_code("a & b") == "<code>a &amp; b</code>"

    class Hostile(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert exception_message(Hostile()) == "Hostile: <unprintable Hostile>"
    assert exception_message(MemoryError()) == "MemoryError"
    try:
        try:
            raise ValueError("repo id 'org/x\n::error::pwned'")
        except ValueError as inner:
            raise RuntimeError("wrapped\r\n::warning::pwned") from inner
    except RuntimeError as e:
        lines = traceback_lines(e)
    assert not [line for line in lines if "\n" in line or "\r" in line]
    assert "ValueError: repo id 'org/x\\n::error::pwned'" in lines
    assert all(not safe_line(line).lstrip().startswith("::") for line in lines)


def test_merge_options_repr_hides_the_token_and_the_token_flag_warns(tiny_models, tmp_path, capsys):
    assert "hf_secret" not in repr(MergeOptions(token="hf_secret"))
    assert "hf_secret" not in str(MergeOptions(token="hf_secret"))
    base, ft1, _ = (str(d) for d in tiny_models)
    cfg = tmp_path / "m.yml"
    cfg.write_text(linear(base, ft1))
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run", "--token", "hf_flag_secret_9"]) == 0
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if "--token" in line]
    assert len(warning) == 1 and "HF_TOKEN" in warning[0] and "other processes" in warning[0]
    assert "hf_flag_secret_9" not in out.out + out.err


# ---------------------------------------------------------------------------------------------- the Action

def test_hostile_file_names_and_hub_ids_never_reach_the_log_raw(hub, tiny_models, checkout, monkeypatch,
                                                                tmp_path):
    """The real entrypoint in a child process (real stdout encoding): file names with a newline, `%0A`, HTML,
    bytes that are not UTF-8, and Hub ids with a newline."""
    base, ft1, _ = local_parents(checkout, tiny_models)
    c1 = checkout.commit({
        "merges/x\n::error::pwned.yml": linear(base, ft1),
        "merges/y%0A::error::pwned2.yml": linear(base, ft1),
        f"merges/{IMG}.yml": linear(base, ft1),
        "merges/hubid.yml": linear(base, ft1, 'hub_repo: "mergebot-test/x\\n::error::pwned3"\n'),
        "merges/parent.yml": linear(base, '"mergebot-org/p\\n::error::pwned4"'),
        "merges/good.yml": linear(base, ft1),
    })
    raw = os.fsencode(checkout.path / "merges") + b"/latin\xff.yml"
    with open(raw, "w") as f:
        f.write(linear(base, ft1))
    output, summary = github_env(monkeypatch, checkout.path, tmp_path / "gh", "push", push(ZERO, c1),
                                 namespace=hub.user, hf_token=hub.token)
    done = subprocess.run([sys.executable, "-m", "mergebot.cli.main", "action"], cwd=checkout.path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"},
                          capture_output=True, timeout=600)
    log = done.stdout.decode("utf-8") + "\n" + done.stderr.decode("utf-8")  # strict: nothing undecodable
    assert done.returncode == 1, log
    assert_no_forged_commands(log)
    for line in commands_in(log):  # the literal `%0A` of a name never reaches the runner as a line feed
        assert "%0A::error::pwned2" not in line and "%0A%3A%3Aerror" not in line, line
    assert "%250A" in log

    results = {r["config"]: r for r in json.loads(parse_outputs(output.read_text())["results"])}
    assert results["merges/good.yml"]["status"] == "published", log
    assert results["merges/x\\n::error::pwned.yml"]["status"] == "failed"
    assert results["merges/latin\\xff.yml"]["status"] == "failed"
    assert {results[k]["status"] for k in results if k != "merges/good.yml"} == {"failed"}
    assert len(results) == 7
    assert "refusing this file name: it holds control characters" in log

    md = summary.read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert not [line for line in md.split("\n") if line.startswith("::")]
    assert "\n::error::pwned" not in md and "pwned3\n" not in md
    assert hub.token not in log.replace(f"::add-mask::{hub.token}", "") and hub.token not in md
    assert f"{hub.user}/good" in hub.server.repos and len(hub.server.repos) == 1


def test_one_hostile_config_fails_alone(hub, tiny_models, checkout, monkeypatch, capsys):
    """YAML nested thousands deep (RecursionError in a recursive parser), binary garbage and a FIFO next to a
    good config: the good one is published, each bad one is its own one-line failure, the report is written."""
    base, ft1, _ = local_parents(checkout, tiny_models)
    c1 = checkout.commit({"merges/deep.yml": "a: " + "[" * 20000 + "]" * 20000 + "\n",
                          "merges/good.yml": linear(base, ft1)})
    (checkout.path / "merges" / "garbage.yml").write_bytes(bytes(range(256)) * 8 + b"\n::error::pwned\n")
    os.mkfifo(checkout.path / "merges" / "fifo.yml")  # reading it would block the run forever

    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)

    assert run.rc == 1, run.stdout
    assert {k: v["status"] for k, v in run.results.items()} == {
        "merges/deep.yml": "failed", "merges/fifo.yml": "failed", "merges/garbage.yml": "failed",
        "merges/good.yml": "published"}
    assert run.outputs["count"] == "1"
    assert f"{hub.user}/good" in hub.server.repos
    assert "not a regular file" in run.stdout
    assert_no_forged_commands(run.stdout)
    errors = [line for line in run.stdout.split("\n") if line.startswith("::error ")]
    assert len(errors) == 3 and all(len(line) < 1200 for line in errors)
    assert "| <code>merges/good.yml</code> | <code>mergebot-test/good</code> | ✅ published |" in run.summary
    assert run.summary.count("❌ failed") == 3


def test_any_exception_in_one_config_is_only_that_configs_failure(hub, tiny_models, checkout, monkeypatch,
                                                                   capsys):
    """Faults of any type from any stage (loading, staleness, merge/publish) each fail their own config."""
    base, ft1, _ = local_parents(checkout, tiny_models)
    names = ("load", "stale", "value", "memory", "good")
    c1 = checkout.commit({f"merges/{n}.yml": linear(base, ft1, f"# {n}\n") for n in names})
    import mergebot.action.run as run_module
    import mergebot.action.select as select_module

    real_load, real_check = select_module.load, run_module.StalenessChecker.check
    real_pipeline = run_module.pipeline_run

    def load(path):
        if Path(path).name == "load.yml":
            raise RecursionError("maximum recursion depth exceeded\n::error::pwned")
        return real_load(path)

    def check(self, cfg, repo):
        if repo.endswith("/stale"):
            raise KeyError("parents\n::error::pwned")
        return real_check(self, cfg, repo)

    def pipeline(cfg, out, options, *, push_to, **kw):
        if push_to.endswith("/value"):
            raise ValueError("card\n::error::pwned")
        if push_to.endswith("/memory"):
            raise MemoryError()
        warnings.warn("the Hub says\n::error::pwned", UserWarning, stacklevel=2)  # e.g. validate-yaml's warnings on a card
        return real_pipeline(cfg, out, options, push_to=push_to, **kw)

    monkeypatch.setattr(select_module, "load", load)
    monkeypatch.setattr(run_module.StalenessChecker, "check", check)
    monkeypatch.setattr(run_module, "pipeline_run", pipeline)
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)

    assert run.rc == 1
    status = {k.removeprefix("merges/").removesuffix(".yml"): v["status"] for k, v in run.results.items()}
    assert status == {"load": "failed", "stale": "failed", "value": "failed", "memory": "failed", "good": "published"}
    assert "RecursionError: maximum recursion depth exceeded\\n::error::pwned" in run.stdout
    assert "KeyError: 'parents\\n::error::pwned'" in run.stdout and "ValueError: card\\n" in run.stdout
    assert "::error file=merges/memory.yml,title=mergebot%3A failed::MemoryError" in run.stdout
    assert run.outputs["count"] == "1" and run.summary.count("❌ failed") == 4
    assert "warning: UserWarning: the Hub says\\n::error::pwned" in run.stdout
    assert_no_forged_commands(run.stdout)


def test_configs_outside_the_workspace_are_refused(hub, tiny_models, checkout, monkeypatch, capsys, tmp_path):
    """A config that links out, a linked directory, absolute and climbing patterns: refused by name; what lies
    outside is never read, so it is never shown."""
    secret = "hf_leaked_SECRET_7f3a"
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.yml").write_text(f"{secret}: 1\nmerge_method: linear\n")
    (outside / "dir" / "other.yml").write_text(f"{secret}: 2\n")
    base, ft1, _ = local_parents(checkout, tiny_models)
    (checkout.path / "merges").mkdir()
    os.symlink(outside / "secret.yml", checkout.path / "merges" / "leak.yml")
    os.symlink(outside / "dir", checkout.path / "merges" / "linked")
    os.symlink("../../outside/secret.yml", checkout.path / "merges" / "relative.yml")
    c1 = checkout.commit({"merges/good.yml": linear(base, ft1)})
    configs = f"merges/**/*.y*ml, {outside}/*.yml, ../outside/*.yml, ~/x.yml, merges/../../outside/secret.yml"

    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token,
              configs=configs)

    assert run.rc == 1, run.stdout
    status = {k: v["status"] for k, v in run.results.items()}
    assert status.pop("merges/good.yml") == "published"
    assert set(status) == {"merges/leak.yml", "merges/relative.yml", f"{outside}/*.yml", "../outside/*.yml",
                           "~/x.yml", "merges/../../outside/secret.yml"}
    assert set(status.values()) == {"failed"}
    assert "merges/linked/other.yml" not in run.results  # a linked directory is not walked
    assert run.stdout.count("leads outside the workspace") >= 2 and "is outside the workspace" in run.stdout
    for text in (run.stdout, run.summary, json.dumps(run.outputs)):
        assert secret not in text and str(outside / "secret.yml") not in text
    assert confined_workspace() is None  # the workspace bound lasts for the run only


def test_the_workspace_bounds_model_references_during_the_run(hub, checkout, monkeypatch, capsys):
    seen: list[Path | None] = []

    def spy(entry, selection, checker):
        seen.append(confined_workspace())
        raise RuntimeError("stop here")

    c1 = checkout.commit({"merges/a.yml": linear("x/a", "x/b")})
    monkeypatch.setattr("mergebot.action.run.decide", spy)
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert seen == [checkout.path.resolve()] and confined_workspace() is None
    assert run.results["merges/a.yml"]["status"] == "failed" and "RuntimeError: stop here" in run.summary


@pytest.mark.parametrize("event", ["pull_request_target", "pull_request"])
def test_pull_request_runs_never_use_the_token(event, hub, tiny_models, checkout, monkeypatch, capsys):
    """Fork configs with the base repository's secrets: the Hub sees no Authorization header, nothing is
    published, and git runs without the token in its environment."""
    upload_parents(hub, tiny_models)
    base, ft1 = f"{hub.org}/tiny-base", f"{hub.org}/tiny-ft1"
    c1 = checkout.commit({"README.md": "repo\n"})
    checkout.git("checkout", "-q", "-b", "feature")
    c2 = checkout.commit({"merges/a.yml": linear(base, ft1)})
    auth: list[str] = []
    for name in ("do_GET", "do_HEAD", "do_POST", "do_PUT"):
        original = getattr(hubserver._Handler, name)

        def recording(self, _original=original):
            auth.append(self.headers.get("Authorization") or "")
            return _original(self)

        monkeypatch.setattr(hubserver._Handler, name, recording)
    child_env: list[bool] = []
    real_run = subprocess.run

    def spy_run(*args, **kwargs):
        child_env.append(any(k in os.environ for k in ("HF_TOKEN", "INPUT_HF_TOKEN")))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(events_module.subprocess, "run", spy_run)
    parents = set(hub.server.repos)
    assert os.environ.get("HF_TOKEN") == hub.token
    payload = {"pull_request": {"number": 9, "base": {"sha": c1, "ref": "main"}, "head": {"sha": c2}}}

    run = act(monkeypatch, capsys, checkout.path, event, payload, namespace=hub.user, hf_token=hub.token)

    assert run.rc == 0, run.stdout
    assert run.results["merges/a.yml"]["status"] == "planned"
    assert auth and not any(auth), auth  # the parents were read, anonymously
    assert set(hub.server.repos) == parents and hub.server.count("POST", r"/commit/|/repos/create") == 0
    assert child_env and not any(child_env)
    assert "the Hugging Face token is not used" in run.summary
    assert os.environ.get("HF_TOKEN") == hub.token  # put back after the run
    from huggingface_hub import constants
    assert not constants.HF_HUB_DISABLE_IMPLICIT_TOKEN


def test_a_failed_selection_still_writes_the_report(hub, checkout, monkeypatch, capsys):
    c1 = checkout.commit({"merges/a.yml": linear("x/a", "x/b")})

    def broken(event, inputs):
        raise RuntimeError("selection broke\n::error::pwned")

    monkeypatch.setattr("mergebot.action.run.select", broken)
    run = act(monkeypatch, capsys, checkout.path, "push", push(ZERO, c1), namespace=hub.user, hf_token=hub.token)
    assert run.rc == 1
    assert json.loads(run.outputs["results"]) == [] and run.outputs["count"] == "0"
    assert "selecting the configs failed: RuntimeError: selection broke\\n::error::pwned" in run.stdout
    assert "selecting the configs failed" in run.summary and "(stopped)" in run.summary
    assert_no_forged_commands(run.stdout)

    # an unreadable event payload stops the run before any selection: same report shape
    tmp = checkout.path.parent / "badevent"
    output, summary = github_env(monkeypatch, checkout.path, tmp, "push", {}, namespace="org")
    (tmp / "event.json").write_text("{not json\n::error::pwned")
    monkeypatch.chdir(checkout.path)
    capsys.readouterr()
    assert main(["action"]) == 1
    log = capsys.readouterr()
    assert_no_forged_commands(log.out + log.err)
    assert "bad input" in log.out and "cannot read the event payload" in summary.read_text()
    assert parse_outputs(output.read_text()) == {"results": "[]", "count": "0"}


def test_config_names_with_shell_metacharacters_are_refused(tmp_path):
    """Names reach the `results` output, which a workflow may paste into a `run:` script."""
    from mergebot.action.select import check_file

    (tmp_path / "merges").mkdir()
    for name in ("a$(id).yml", "b`x`.yml", "c;rm.yml", "d'q'.yml", "e|f.yml"):
        (tmp_path / "merges" / name).write_text("merge_method: linear\n")
        assert "refusing this file name" in check_file(tmp_path, f"merges/{name}"), name
    (tmp_path / "merges" / "ok_name-1.0+v2.yml").write_text("merge_method: linear\n")
    assert check_file(tmp_path, "merges/ok_name-1.0+v2.yml") is None


@pytest.mark.parametrize("name", ["merges/my model.yml", "merges/q,merges/b.yml", "merges/tab\u3000x.yml"])
def test_a_config_the_configs_input_cannot_name_is_refused(tmp_path, name):
    """examples/workflows/matrix-gpu.yml hands each planned `config` back as the `configs` input, which splits on
    commas and blanks: `merges/my model.yml` was planned, then its job found no such file, and
    `merges/q,merges/b.yml` ran merges/b.yml (another repo's config, outside its concurrency group)."""
    from mergebot.action.inputs import split_patterns
    from mergebot.action.select import check_file, discover

    for path in (name, "merges/b.yml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("merge_method: linear\n")
    assert discover(tmp_path, split_patterns("merges/b.yml"))[0] == ["merges/b.yml"]
    refused = check_file(tmp_path, name)
    assert refused is not None and "refusing this file name" in refused, (refused, discover(tmp_path, split_patterns(name)))
    assert "\n" not in refused


@pytest.mark.parametrize("name", ["merges/q,merges/b.yml", "merges/my model.yml", "-merges/b.yml", "merges/a\nmerges/b.yml"])
def test_plan_hands_the_matrix_no_name_that_splits_into_another_config(tmp_path, name):
    """`mergebot plan` lists an invalid config so its matrix job fails visibly; a name the `configs` input would
    split is handed over as a `#` name that matches nothing, never as pieces that name merges/b.yml."""
    from mergebot.action.inputs import split_patterns
    from mergebot.action.select import check_file, discover
    from mergebot.cli.plan import matrix_name

    (tmp_path / "merges").mkdir()
    (tmp_path / "merges" / "b.yml").write_text("merge_method: linear\n")
    assert discover(tmp_path, split_patterns(name))[0] == ["merges/b.yml"] or name.startswith("merges/my")
    handed = matrix_name(name)
    assert split_patterns(handed) == [handed] and handed.startswith("#refused:")
    found, missing, _ = discover(tmp_path, split_patterns(handed))
    assert found == [] and len(missing) == 1 and missing[0].error
    assert matrix_name("merges/b.yml") == "merges/b.yml" and check_file(tmp_path, "merges/b.yml") is None
