"""The quality gate wired into publishing (issue 17): `merge --push-to`, `publish` and the Action check the merge
before any Hub commit; a broken merge (linear 3/-2) is rejected with its numbers and nothing reaches the Hub; a
normal merge is published with the check's table and model-index in its card and the record in its lock;
`--check off` and streamed outputs skip the check and say so; the Action's `eval_text` stays in the workspace.

The gate's merges are of "counting" models (tests.helpers.counting_tensors), scored on counting text, so a
broken merge shows in the numbers; the random tiny models of the other tests are near chance level and pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergebot.check import CheckOptions, run_check
from mergebot.check.gate import GateOptions, run_gate
from mergebot.cli.main import main
from mergebot.io.lockfile import read_lock
from mergebot.tinymodels import llama_config, save_model
from tests.action.support import README, Checkout, act, push
from tests.helpers import counting_tensors, merge_yaml

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw:DeprecationWarning")


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> dict[str, Path]:
    """Two licensed 'fine-tunes' of one counting base, and an evaluation text of counting runs."""
    root = tmp_path_factory.mktemp("gate")
    cfg = llama_config(vocab=64, hidden=64, inter=96, layers=4, heads=4, kv_heads=2)
    base = counting_tensors(cfg, 0)
    dirs: dict[str, Path] = {}
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        d = save_model(root / f"ft{i}", cfg, {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        (d / "README.md").write_text(README)
        dirs[f"ft{i}"] = d
    text = root / "counting.txt"
    text.write_text("\n".join(" ".join(f"w{3 + (s + i) % 61}" for i in range(40)) for s in (0, 17, 33)) + "\n")
    dirs["text"] = text
    return dirs


def _config(tmp: Path, a: Path | str, b: Path | str, wa: float, wb: float, name: str) -> Path:
    path = tmp / f"{name}.yml"
    path.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {a}\n    parameters: {{weight: {wa}}}\n"
                    f"  - model: {b}\n    parameters: {{weight: {wb}}}\n")
    return path


def _reference(out: Path, counting: dict[str, Path]):
    """What `mergebot check` itself says of the output, with the gate's options (the CLI merges on the CPU)."""
    return run_check(out, [counting["ft1"], counting["ft2"]], CheckOptions(eval_text=counting["text"], device="cpu"),
                     labels=[str(counting["ft1"]), str(counting["ft2"])])


def test_broken_merge_is_rejected_with_its_numbers_and_never_published(hub, counting, tmp_path, capsys):
    repo = f"{hub.user}/broken"
    cfg = _config(tmp_path, counting["ft1"], counting["ft2"], 3, -2, "broken")
    rc = main(["merge", str(cfg), str(tmp_path / "out"), "--push-to", repo, "--eval-text", str(counting["text"]),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert repo not in hub.server.repos  # no repo, no commit: nothing reached the Hub

    ref = _reference(tmp_path / "out", counting)
    assert ref.verdict == "rejected" and ref.perplexity_ratio > 1.5 * 5
    best = next(p for p in ref.parents if p.label == ref.best_parent)
    degenerate = any(g.degenerate and not g.excused for g in ref.generations)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: quality check rejected: merge perplexity {ref.merge.perplexity:.4g}, best parent "
                      f"{best.ratio_basis:.4g} ({best.label}), ratio {ref.perplexity_ratio:.4g} > limit 1.5, "
                      f"degenerate generation: {'yes' if degenerate else 'no'}; not published to {repo}"]

    record = read_lock(tmp_path / "out")["check"]  # the output is kept, with the verdict in its lock and card
    assert record["status"] == "rejected" and record["eval_text"]["name"] == "counting.txt"
    assert record["merge"]["perplexity"] == pytest.approx(ref.merge.perplexity, rel=1e-5)
    assert record["perplexity_ratio"] == pytest.approx(ref.perplexity_ratio, rel=1e-5)
    assert "Quality gate: **rejected**" in (tmp_path / "out" / "README.md").read_text()

    # `mergebot publish` of that output is gated the same way; --check off publishes it, and says so
    assert main(["publish", str(tmp_path / "out"), "--repo", repo, "--eval-text", str(counting["text"]),
                 "--device", "cpu"]) == 1
    assert repo not in hub.server.repos
    assert main(["publish", str(tmp_path / "out"), "--repo", repo, "--check", "off"]) == 0
    files = hub.server.files(repo)
    assert json.loads(files["mergebot.lock.json"])["check"] == {"status": "off", "reason": "turned off"}
    card = files["README.md"].decode()
    assert "Quality check: not run (turned off)." in card and "model-index" not in card


def test_normal_merge_passes_and_its_card_shows_the_check(hub, counting, tmp_path, capsys):
    from huggingface_hub import ModelCard, metadata_load

    repo = f"{hub.user}/good"
    cfg = _config(tmp_path, counting["ft1"], counting["ft2"], 0.5, 0.5, "good")
    rc = main(["merge", str(cfg), str(tmp_path / "out"), "--push-to", repo, "--eval-text", str(counting["text"]),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    ref = _reference(tmp_path / "out", counting)
    assert ref.verdict == "passed" and ref.perplexity_ratio < 1.5
    assert f"quality check passed: merge perplexity {ref.merge.perplexity:.4g}, " in err

    files = hub.server.files(repo)
    lock = json.loads(files["mergebot.lock.json"])["check"]
    assert lock["status"] == "passed" and lock["degenerate_generation"] is False
    assert lock["eval_text"] == {"name": "counting.txt", "builtin": False, "sha256": ref.eval_text.sha256,
                                 "bytes": counting["text"].stat().st_size, "sections": ["custom"], "chat": "",
                                 "truncated": False}
    assert lock["merge"]["perplexity"] == pytest.approx(ref.merge.perplexity, rel=1e-5)
    assert {p["ref"]: p["perplexity"] for p in lock["parents"]} == pytest.approx(
        {p.label: p.perplexity for p in ref.parents}, rel=1e-5)

    text = files["README.md"].decode()
    card = ModelCard(text)  # what the Hub parses: eval results from the model-index
    (result,) = card.data.eval_results
    assert result.task_type == "text-generation" and result.metric_type == "perplexity"
    assert result.dataset_name == "counting.txt"
    assert result.metric_value == pytest.approx(ref.merge.perplexity, rel=1e-4)
    local = tmp_path / "README.md"
    local.write_text(text)
    index = metadata_load(local)["model-index"]
    assert index[0]["name"] == repo
    assert index[0]["results"][0]["metrics"][0]["value"] == pytest.approx(ref.merge.perplexity, rel=1e-4)

    assert "## Evaluation" in text and "Quality gate: **passed**" in text and "counting.txt" in text
    assert f"| **this merge** | {ref.merge.perplexity:.4g} |" in text
    for p in ref.parents:
        assert f"| {p.label} | {p.perplexity:.4g} |" in text

    # republishing the same merge is a no-op: the check's record and the card are the same bytes
    commits = len(hub.server.history(repo))
    assert main(["publish", str(tmp_path / "out"), "--repo", repo, "--eval-text", str(counting["text"]),
                 "--device", "cpu"]) == 0
    assert len(hub.server.history(repo)) == commits


def test_random_tiny_merges_pass_the_default_gate(family, tmp_path):
    """The random tiny models of the other tests are near chance level on the built-in text (perplexity about
    the vocabulary size): their loops under greedy decoding are not held against a merge, and averaging two of
    them stays within 1.5x of the better parent."""
    base, ft1 = family[0], family[1]
    merge_yaml(tmp_path, f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {base}\n"
                         f"    parameters: {{weight: 0.5}}\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n")
    outcome = run_gate(tmp_path / "out", lambda: [(base, "base"), (ft1, "ft1")], GateOptions(device="cpu"))
    assert outcome.status == "passed", outcome.record["reasons"]
    assert outcome.record["eval_text"]["builtin"] and outcome.record["perplexity_ratio"] < 1.5
    report = outcome.report
    assert report is not None and report.merge is not None
    assert report.merge.perplexity > 64 ** 0.8  # the vocabulary is 64: near chance
    assert all(g.excused for g in report.generations if g.degenerate)


def test_off_and_streamed_outputs_record_why_nothing_was_checked(family, tmp_path):
    merge_yaml(tmp_path, f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {family[0]}\n"
                         f"    parameters: {{weight: 0.5}}\n  - model: {family[1]}\n    parameters: {{weight: 0.5}}\n")

    def never() -> list[tuple[Path, str]]:
        raise AssertionError("parents are not looked up when nothing is checked")

    streamed = run_gate(tmp_path / "out", never, GateOptions(mode="streamed"))
    assert streamed.status == "skipped" and streamed.report is None
    assert read_lock(tmp_path / "out")["check"] == {"status": "skipped", "reason": "streamed output"}
    assert streamed.line() == "quality check skipped (streamed output)"
    off = run_gate(tmp_path / "out", never, GateOptions(mode="off"))
    assert not off.rejected and read_lock(tmp_path / "out")["check"]["status"] == "off"
    with pytest.raises(Exception, match="max perplexity ratio"):
        GateOptions(max_perplexity_ratio=math.inf)


# ------------------------------------------------------------------------------------------------ the Action
@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    """The runner's checkout of the user's repository (as in tests/action)."""
    (tmp_path / "ws").mkdir()
    c = Checkout(tmp_path / "ws")
    c.git("init", "-q", "-b", "main")
    return c


def _workspace(checkout: Checkout, counting: dict[str, Path], configs: dict[str, tuple[float, float]]) -> str:
    """The counting parents and the evaluation text committed into the checkout, and one config per entry."""
    import shutil

    for name in ("ft1", "ft2"):
        shutil.copytree(counting[name], checkout.path / "models" / name)
    files = {"evals/counting.txt": counting["text"].read_text()}
    for name, (wa, wb) in configs.items():
        files[f"merges/{name}.yml"] = _config(checkout.path.parent, "./models/ft1", "./models/ft2", wa, wb,
                                              name).read_text()
    return checkout.commit(files)


def test_action_rejects_a_broken_merge_in_summary_and_outputs(hub, counting, checkout, monkeypatch, capsys):
    head = _workspace(checkout, counting, {"good": (0.5, 0.5), "broken": (3, -2)})
    run = act(monkeypatch, capsys, checkout.path, "push", push("0" * 40, head), namespace=hub.user,
              hf_token=hub.token, eval_text="evals/counting.txt", device="cpu")
    assert run.rc == 1, run.stdout  # a rejected merge fails the step, like a blocked one
    good, broken = run.results["merges/good.yml"], run.results["merges/broken.yml"]
    assert good["status"] == "published" and good["check"].startswith("passed: merge perplexity ")
    assert broken["status"] == "rejected" and broken["commit"] is None
    assert f"{hub.user}/broken" not in hub.server.repos
    assert broken["check"].startswith("rejected: merge perplexity ") and "> limit 1.5" in broken["check"]
    assert "| 🚫 rejected |" in run.summary and "rejected: merge perplexity " in run.summary
    assert run.outputs["count"] == "1"

    # the same broken merge with the gate turned off is published (the user's call)
    run = act(monkeypatch, capsys, checkout.path, "push", push("0" * 40, head), namespace=hub.user,
              hf_token=hub.token, check="off", configs="merges/broken.yml", device="cpu")
    assert run.rc == 0, run.stdout
    assert run.results["merges/broken.yml"]["status"] == "published"
    assert run.results["merges/broken.yml"]["check"] == "off (turned off)"


@pytest.mark.parametrize("value", ["../outside.txt", "/etc/hostname", "evals/link.txt"])
def test_action_eval_text_must_stay_in_the_workspace(hub, counting, checkout, monkeypatch, capsys, value):
    head = _workspace(checkout, counting, {"good": (0.5, 0.5)})
    (checkout.path.parent / "outside.txt").write_text("w3 w4 w5\n")
    (checkout.path / "evals" / "link.txt").symlink_to(checkout.path.parent / "outside.txt")
    run = act(monkeypatch, capsys, checkout.path, "push", push("0" * 40, head), namespace=hub.user,
              hf_token=hub.token, eval_text=value)
    assert run.rc == 1
    assert f"{hub.user}/good" not in hub.server.repos  # refused before any merge
    errors = [line for line in run.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and f"input eval_text: {value!r}" in errors[0] and "outside the workspace" in errors[0]


def test_a_license_block_stops_before_the_check_and_keeps_the_card(hub, counting, tmp_path, capsys, monkeypatch):
    # a merge the license check blocks cannot be published: no perplexity run for it (on a 70B merge that is
    # most of an hour), but the card and NOTICE are still written for the human review the error asks for
    import mergebot.check.gate as gate

    nd = tmp_path / "nd"
    nd.mkdir()
    for f in counting["ft2"].iterdir():
        (nd / f.name).write_bytes(f.read_bytes())
    (nd / "README.md").write_text("---\nlicense: cc-by-nd-4.0\n---\n# no derivatives\n")
    calls: list[Path] = []
    monkeypatch.setattr(gate, "run_check", lambda out, *a, **k: calls.append(out))
    repo = f"{hub.user}/blocked"
    cfg = _config(tmp_path, counting["ft1"], nd, 0.5, 0.5, "blocked")
    rc = main(["merge", str(cfg), str(tmp_path / "out"), "--push-to", repo, "--eval-text", str(counting["text"]),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "license check blocks publishing" in err
    assert calls == [] and repo not in hub.server.repos
    card = (tmp_path / "out" / "README.md").read_text()
    assert "cc-by-nd-4.0" in card and (tmp_path / "out" / "NOTICE").is_file()
