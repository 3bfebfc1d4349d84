"""mergekit-multi files (merge-semantics.md §5.7): parsing, build order, results equal to the stages run one by
one, the lock and card of the result, and failures that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergebot.builds.base import MergeOptions
from mergebot.config.configfile import load
from mergebot.config.multi import MultiConfig
from mergebot.errors import ConfigError, MergebotError
from mergebot.pipeline import run as pipeline_run
from mergebot.tinymodels import load_tensors
from tests.helpers import CORPUS, merge_yaml, run_cli


def stages_text(base: Path, a: Path, b: Path, c: Path) -> str:
    return (f"name: first\nmerge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  weight: 0.5\n"
            f"---\nname: second\nmerge_method: slerp\nbase_model: first\nmodels:\n  - model: first\n"
            f"  - model: {c}\nparameters:\n  t: 0.3\n"
            f"---\n# the result: no name\nmerge_method: ties\nbase_model: {base}\nmodels:\n  - model: second\n"
            f"    parameters: {{density: 0.6, weight: 0.5}}\n  - model: {a}\n"
            f"    parameters: {{density: 0.8, weight: 0.5}}\n")


def write(tmp: Path, text: str, name: str = "multi.yml") -> Path:
    f = tmp / name
    f.write_text(text)
    return f


@pytest.mark.parametrize("example,order,leaves", [
    ("008_mk_mega_multidoc.yml", ["gradient-slerp", "gradient-slerp-ties"], 4),
    ("010_mk_doc_multimerge.yml", ["first-merge", "second-merge", None], 4),
])
def test_mergekit_examples_parse_in_dependency_order(example, order, leaves):
    cfg = load(CORPUS / example)
    assert isinstance(cfg, MultiConfig)
    assert [s.name for s in cfg.stages] == order
    assert len(cfg.referenced_models()) == leaves
    assert not any(r.path in cfg.names for r in cfg.referenced_models())
    r = run_cli("validate", str(CORPUS / example))
    assert r.returncode == 0 and f"{len(order)} merges" in r.stdout, r.stderr


def test_result_equals_the_stages_merged_one_by_one(family, tmp_path):
    base, a, b, c = family
    out = tmp_path / "out"
    res = pipeline_run(load(write(tmp_path, stages_text(base, a, b, c))), out, MergeOptions(progress=False))
    got = load_tensors(out)

    first = tmp_path / "first"
    merge_yaml(tmp_path, f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  weight: 0.5\n",
               name="first")
    merge_yaml(tmp_path, f"merge_method: slerp\nbase_model: {first}\nmodels:\n  - model: {first}\n  - model: {c}\n"
                         "parameters:\n  t: 0.3\n", name="second")
    want = merge_yaml(tmp_path, f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tmp_path / 'second'}\n"
                                f"    parameters: {{density: 0.6, weight: 0.5}}\n  - model: {a}\n"
                                f"    parameters: {{density: 0.8, weight: 0.5}}\n", name="third")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    lock = json.loads((out / "mergebot.lock.json").read_text())
    assert lock["kind"] == "multi" and lock["merge_method"] == "ties"
    assert [p["ref"] for p in lock["parents"]] == [str(a), str(b), str(c), str(base)]
    assert [s["name"] for s in lock["stages"]] == ["first", "second", None]
    assert lock["config_sha256"] == load(tmp_path / "multi.yml").sha256
    assert (out / "mergekit_config.yml").read_text() == (tmp_path / "multi.yml").read_text()
    assert "a merge of 4 " in (out / "README.md").read_text()
    assert res.merge.out_dir == out and res.merge.lock["kind"] == "multi"
    assert not [p for p in tmp_path.iterdir() if ".stages-" in p.name]  # the scratch dir is gone


def _doc(model: str, name: str | None = None, method: str = "passthrough") -> str:
    return (f"name: {name}\n" if name else "") + f"merge_method: {method}\nmodels: [{{model: {model}}}]\n"


@pytest.mark.parametrize("text,fragment", [
    (_doc("x", "a") + "---\n" + _doc("a", "a"), "already used by document 1"),
    (_doc("a") + "---\n" + _doc("b"), "more than one merge without a `name:`"),
    (_doc("b", "a") + "---\n" + _doc("a", "b") + "---\n" + _doc("a"), "cycle"),
    (_doc("x", "a") + "---\n" + _doc("y", "b"), "needs one result"),
    ("name: [1]\n" + _doc("x") + "---\n" + _doc("y"), "expected a merge name"),
    (_doc("x", "a") + "---\n" + _doc("a@v1"), "has no revisions"),
    (_doc("x", "a", "linera") + "---\n" + _doc("a"), "did you mean 'linear'"),
])
def test_bad_multi_files_name_file_line_and_reason(tmp_path, text, fragment):
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(f)
    assert fragment in str(e.value) and str(f) in str(e.value) and "line" in str(e.value)
    r = run_cli("validate", str(f))
    assert r.returncode == 1 and fragment in r.stderr and "Traceback" not in r.stderr


def test_a_failing_stage_leaves_no_output_and_no_scratch(family, tmp_path):
    base, a, b, _ = family
    text = (f"name: first\nmerge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  weight: 0.5\n"
            f"---\nmerge_method: slerp\nbase_model: first\nmodels:\n  - model: first\n  - model: {tmp_path / 'nope'}\n"
            "parameters:\n  t: 0.3\n")
    out = tmp_path / "out"
    with pytest.raises(MergebotError, match="nope"):
        pipeline_run(load(write(tmp_path, text)), out, MergeOptions(progress=False))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".stages-" in p.name]
    # an existing OUT_DIR is refused before any stage is built
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("merge", str(tmp_path / "multi.yml"), str(out))
    assert r.returncode != 0 and "--force" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
