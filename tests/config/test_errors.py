"""Bad configs: one line naming file, key path, line and reason; non-zero exit; nothing written."""

from __future__ import annotations

import pytest

from tests.helpers import SEED_CONFIGS, run_cli

GOOD_MODELS = "models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"

BAD = [
    ("unknown method", "merge_method: lienar\n" + GOOD_MODELS, ["merge_method (line 1)", "unknown merge method 'lienar'", "did you mean 'linear'"]),
    ("missing method", GOOD_MODELS, ["missing required key 'merge_method'"]),
    ("both models and slices", "merge_method: linear\n" + GOOD_MODELS + "slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n",
     ["slices", "not both 'models' and 'slices'"]),
    ("neither", "merge_method: linear\n", ["exactly one of 'models', 'slices'"]),
    ("yaml syntax", "merge_method: linear\nmodels: [\n  - model: x\n", ["YAML syntax error", "(line"]),
    ("duplicate key", "merge_method: linear\nmerge_method: slerp\n" + GOOD_MODELS, ["merge_method (line 2)", "duplicate key"]),
    ("density out of range", "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters:\n      weight: 1\n      density: 1.5\n",
     ["models[0].parameters.density (line 7)", "within [0, 1]"]),
    ("density in gradient out of range", "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters:\n      weight: 1\n      density: [0.5, -0.1]\n",
     ["models[0].parameters.density[1]", "within [0, 1]"]),
    ("wrong type in conditional", "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight:\n        - filter: mlp\n          value: heavy\n        - value: 1\n",
     ["models[0].parameters.weight[0].value", "expected a number"]),
    ("weight gradient element wrong", "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: [0.1, 0.2, x]\n",
     ["models[0].parameters.weight[2]", "expected a number"]),
    ("slerp three models", "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n  - model: {base}\n  - model: {a}\n  - model: {b}\n",
     ["slerp needs exactly two models"]),
    ("slerp without base", "merge_method: slerp\nparameters: {{t: 0.5}}\nmodels:\n  - model: {a}\n  - model: {b}\n",
     ["needs a base_model"]),
    ("ties without base", "merge_method: ties\n" + GOOD_MODELS, ["'ties' needs a base_model"]),
    ("reversed layer_range", "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [3, 1]\n",
     ["slices[0].sources[0].layer_range (line 5)", "empty or reversed"]),
    ("layer_range out of range", "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 9]\n",
     ["slices[0].sources[0].layer_range", "out of range", "has 4 layers"]),
    ("missing weight", "merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
     ["models[0]", "needs parameter 'weight'"]),
    ("bad dtype", "merge_method: linear\ndtype: bf16\n" + GOOD_MODELS, ["dtype (line 2)", "unknown dtype 'bf16'", "did you mean 'bfloat16'"]),
    ("alias bomb", "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
     ["anchor/alias bomb"]),
    ("two plus in ref", "merge_method: linear\nmodels:\n  - model: a+b+c\n    parameters: {{weight: 1}}\n",
     ["models[0].model", "more than one '+'"]),
    ("not a mapping", "- just\n- a list\n", ["a merge config is a YAML mapping"]),
    ("missing model", "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: ./does-not-exist\n    parameters: {{weight: 1}}\n",
     ["./does-not-exist", "no such local directory"]),
    ("unknown key in source", "merge_method: linear\nmodels:\n  - model: {a}\n    paramters: {{weight: 1}}\n",
     ["models[0].paramters", "did you mean 'parameters'"]),
    ("filter not a string", "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight:\n        - filter: 3\n          value: 1\n",
     ["models[0].parameters.weight[0].filter", "filter must be a string"]),
]


@pytest.mark.parametrize("name,text,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_clear_line_and_writes_nothing(family, tmp_path, name, text, fragments):
    base, a, b, _ = family
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text.format(base=base, a=a, b=b))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli("merge", str(cfg), str(out), "--force")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ")
    assert str(cfg) in last or "does-not-exist" in last
    for frag in fragments:
        assert frag in last, (frag, last)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".mergebot-" in p.name]


def test_validate_needs_no_models_and_names_pending_features(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text("merge_method: dare_ties\nbase_model: org/base\nmodules:\n  text: {models: [{model: org/a}]}\n"
                    "tokenizer_source: union\n")
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: dare_ties\nmodels:\n  - model: org/a\n")
    r = run_cli("validate", str(good))
    assert r.returncode == 0, r.stderr
    assert "'modules'" in r.stdout and "not supported yet" in r.stdout
    r = run_cli("validate", str(good), str(bad))
    assert r.returncode == 1
    assert "bad.yml" in r.stderr and "needs a base_model" in r.stderr


def test_existing_out_dir_is_not_overwritten_without_force(family, tmp_path):
    base, a, b, _ = family
    cfg = tmp_path / "c.yml"
    cfg.write_text(GOOD_MODELS.format(a=a, b=b) + "merge_method: linear\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli("merge", str(cfg), str(out))
    assert r.returncode != 0 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"
    r = run_cli("merge", str(cfg), str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


MOE_BAD = [
    ("zero experts", "base_model: a\nexperts: []\ngate_mode: random\n", "experts (line 2): expected a non-empty list"),
    ("too many per token", "base_model: a\ngate_mode: random\nexperts_per_token: 3\nexperts:\n  - source_model: b\n  - source_model: c\n",
     "experts_per_token (line 3): experts_per_token is 3 but there are only 2 experts"),
    ("unknown gate", "base_model: a\ngate_mode: hiden\nexperts:\n  - source_model: b\n", "did you mean 'hidden'"),
    ("missing prompts", "base_model: a\ngate_mode: cheap_embed\nexperts:\n  - source_model: b\n    positive_prompts: [x]\n  - source_model: c\n",
     "experts[1] (line 6): gate_mode 'cheap_embed' needs positive_prompts"),
]


@pytest.mark.parametrize("name,text,fragment", MOE_BAD, ids=[m[0] for m in MOE_BAD])
def test_bad_moe_configs(tmp_path, name, text, fragment):
    cfg = tmp_path / "moe.yml"
    cfg.write_text(text)
    r = run_cli("validate", str(cfg))
    assert r.returncode == 1
    assert fragment in r.stderr, r.stderr


def test_seed_moe_config_is_valid_language_and_merge_names_the_missing_model(tmp_path):
    seed = SEED_CONFIGS / "002_moe_random.yml"
    r = run_cli("validate", str(seed))
    assert r.returncode == 0 and "moe (random gates)" in r.stdout and "not supported yet" not in r.stdout
    r = run_cli("merge", str(seed), str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode != 0 and "ELYZA-japanese-Llama-2-13b-instruct" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_multi_document_file_is_named_as_such(tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text("merge_method: passthrough\nmodels: [{model: a}]\n---\nmerge_method: passthrough\n"
                   "models: [{model: b}]\n")
    r = run_cli("validate", str(cfg))
    assert r.returncode == 1 and "(line 4)" in r.stderr and "mergekit-multi" in r.stderr
    assert "more than one merge without a `name:`" in r.stderr
