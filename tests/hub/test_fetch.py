"""Model sources: Hub repos pinned to a sha (loopback Hub), .bin checkpoints, missing/mismatched tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
from mergebot.cli.main import main
from mergebot.config.dense import parse_config
from mergebot.errors import ModelError
from mergebot.tinymodels import load_tensors, make_family
from tests.helpers import f64


def _upload(hub, repo_id: str, directory: Path) -> str:
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# tiny\n"
    hub.server.create_repo(repo_id)
    return hub.server.commit(repo_id, files, message="upload")


def _merge(tmp: Path, text: str, name: str = "out", **opts):
    f = tmp / f"{name}.yml"
    f.write_text(text)
    return run_merge(parse_config(text, str(f)), tmp / name, MergeOptions(progress=False, **opts))


def test_hub_parents_are_pinned_to_their_commit(hub, family, tmp_path):
    base, a, _, _ = family
    org = hub.org
    sha_base = _upload(hub, f"{org}/base", base)
    sha_a = _upload(hub, f"{org}/ft", a)
    # a second commit to the base: @<first sha> must still give the first weights
    hub.server.commit(f"{org}/base", {"extra.txt": b"later"}, message="later")
    result = _merge(tmp_path, f"models:\n  - model: {org}/base@{sha_base}\n    parameters: {{weight: 0.5}}\n"
                              f"  - model: {org}/ft\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n")
    parents = {p["ref"]: p for p in result.lock["parents"]}
    assert parents[f"{org}/base@{sha_base}"]["sha"] == sha_base
    assert parents[f"{org}/ft"]["sha"] == sha_a and parents[f"{org}/ft"]["local"] is False
    out, B, A = load_tensors(tmp_path / "out"), f64(base), f64(a)
    for k in B:
        assert torch.allclose(out[k].double(), 0.5 * B[k] + 0.5 * A[k], atol=1e-6)


def test_missing_hub_model_is_a_clear_error(hub, family, tmp_path):
    _, a, _, _ = family
    with pytest.raises(ModelError, match="no-such-org/nothing.*no such model on the Hub"):
        _merge(tmp_path, f"models:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                         "  - model: no-such-org/nothing\n    parameters: {weight: 1}\nmerge_method: linear\n")


@pytest.mark.parametrize("ref", ["org/my model", "org/-bad-", "org/" + "x" * 200])
def test_a_reference_the_hub_cannot_name_is_one_line(hub, family, tmp_path, capsys, ref):
    """A typo that is neither a directory nor a valid repo id (a space, a leading '-', too long) was a
    HFValidationError traceback from the Hub client, for the dry run, the merge and the card alike."""
    _, a, _, _ = family
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {a}\n  - model: {ref}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n")
    for dry in (["--dry-run"], []):
        assert main(["merge", str(cfg), str(tmp_path / "out"), *dry]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {ref}: ") and "no such model on the Hub" in err, err[-2000:]
        assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_bin_checkpoint_is_read_with_weights_only(family, tmp_path):
    base, a, _, _ = family
    binary = tmp_path / "bin_model"
    binary.mkdir()
    for f in a.iterdir():
        if f.suffix != ".safetensors":
            (binary / f.name).write_bytes(f.read_bytes())
    torch.save(load_tensors(a), binary / "pytorch_model.bin")
    _merge(tmp_path, f"models:\n  - model: {base}\n    parameters: {{weight: 0.25}}\n"
                     f"  - model: {binary}\n    parameters: {{weight: 0.75}}\nmerge_method: linear\n")
    out, B, A = load_tensors(tmp_path / "out"), f64(base), f64(a)
    for k in B:
        assert torch.allclose(out[k].double(), 0.25 * B[k] + 0.75 * A[k], atol=1e-6)


def test_pickle_that_is_not_just_weights_is_refused(family, tmp_path):
    base, a, _, _ = family
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((a / "config.json").read_text())

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.embed_tokens.weight": Boom()}, evil / "pytorch_model.bin")
    with pytest.raises(ModelError, match="weights_only"):
        _merge(tmp_path, f"models:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                         f"  - model: {evil}\n    parameters: {{weight: 1}}\nmerge_method: linear\n")


def test_shape_mismatch_and_missing_tensor_name_model_and_tensor(tmp_path):
    (small,) = make_family(tmp_path / "s", 1, hidden=32)
    (wide,) = make_family(tmp_path / "w", 1, hidden=48, heads=4, kv_heads=2)
    with pytest.raises(ModelError, match=r"tensor size mismatch for model.embed_tokens.weight: .*\[64, 32\].*\[64, 48\]"):
        _merge(tmp_path, f"models:\n  - model: {small}\n    parameters: {{weight: 1}}\n"
                         f"  - model: {wide}\n    parameters: {{weight: 1}}\nmerge_method: linear\n")
    (other,) = make_family(tmp_path / "o", 1, hidden=32)
    st = load_tensors(other)
    del st["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file
    save_file(st, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"/o/base: tensor 'model.layers.1.mlp.up_proj.weight' not present"):
        _merge(tmp_path, f"models:\n  - model: {small}\n    parameters: {{weight: 1}}\n"
                         f"  - model: {other}\n    parameters: {{weight: 1}}\nmerge_method: linear\n", name="o2")
    assert not (tmp_path / "o2").exists()


def test_dry_run_prints_resolved_gradients_and_writes_nothing(family, tmp_path, capsys):
    base, a, _, _ = family
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: slerp\nbase_model: {base}\n"
                   "parameters:\n  t: [0, 1]\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in text and "t=0.0" in text
    assert "model.layers.3.self_attn.q_proj.weight" in text and "t=1.0" in text
    assert "model.layers.1.mlp.up_proj.weight" in text and "t=0.33333" in text
    assert "estimated peak working memory" in text
    assert not (tmp_path / "out").exists()


def test_dry_run_lines_cannot_start_a_workflow_command(tmp_path, capsys):
    """The plan quotes tensor names from the parents' headers (a stranger's Hub model): printable, but one named
    `::error::pwned` began a line the runner would obey."""
    from safetensors.torch import load_file, save_file

    a, b = make_family(tmp_path / "fam", 2, seed=5)
    for d in (a, b):
        tensors = load_file(d / "model.safetensors")
        tensors["::error::pwned"] = torch.zeros(2)
        save_file(tensors, d / "model.safetensors")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("::")]
    assert [line for line in lines if line.startswith("> ::error::pwned ")]
    assert any(line.startswith("model.layers.0.self_attn.q_proj.weight ") for line in lines)


def test_merge_push_to_publishes_one_commit_and_it_loads(hub, family, tmp_path):
    """The whole pipeline: merge -> license check -> card -> one Hub commit, read back with the real client."""
    transformers = pytest.importorskip("transformers")
    from huggingface_hub import snapshot_download

    base, a, _, _ = family
    for d in (base, a):
        (d / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: slerp\nbase_model: {base}\n"
                   "parameters: {t: 0.5}\n")
    repo = f"{hub.org}/merged"
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--push-to", repo, "--quiet"]) == 0
    commits = hub.server.history(repo)
    got = Path(snapshot_download(repo, revision=hub.server.head(repo), endpoint=hub.url, token=hub.token,
                                 cache_dir=tmp_path / "dl"))
    assert {"README.md", "NOTICE", "mergebot.lock.json", "mergekit_config.yml", "model.safetensors"} <= {p.name for p in got.iterdir()}
    assert json.loads((got / "mergebot.lock.json").read_text())["merge_method"] == "slerp"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(got))
    assert model.config.num_hidden_layers == 4
    # same merge again: nothing changed, no new commit
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--force", "--push-to", repo, "--quiet"]) == 0
    assert len(hub.server.history(repo)) == len(commits)


def test_parent_license_files_ship_with_the_merge(tmp_path):
    base, a = make_family(tmp_path / "m", 2, seed=4)
    (base / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT ...")
    (base / "USE_POLICY.md").write_text("Acceptable use policy ...")
    _merge(tmp_path, f"models:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                     f"  - model: {a}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n")
    shipped = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / "licenses").rglob("*")
                     if p.is_file())
    assert len(shipped) == 2 and shipped[0].endswith("/LICENSE") and shipped[1].endswith("/USE_POLICY.md")
    assert (tmp_path / "out" / shipped[0]).read_text().startswith("META LLAMA 3")


def test_dry_run_of_hub_models_reads_headers_only(hub, family, tmp_path, capsys):
    base, a, _, _ = family
    _upload(hub, f"{hub.org}/base", base)
    _upload(hub, f"{hub.org}/ft", a)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {hub.org}/base\n  - model: {hub.org}/ft\n    parameters: {{weight: 0.5}}\n"
                   f"merge_method: task_arithmetic\nbase_model: {hub.org}/base\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "model.layers.3.mlp.down_proj.weight" in capsys.readouterr().out
    gets = [(p, status) for p, status, _ in hub.server.file_gets()]
    served = [(p, status) for p, status in gets if status != 302]  # the Hub redirects to its storage host
    assert served and all(status == 206 for _, status in served), gets  # HTTP range requests for the headers
    assert not hub.server.cdn_auth_refused
    assert not list(hub.home.rglob("*.safetensors")), "a dry run must not download tensor data"


def test_moe_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    base, a = make_family(tmp_path / "m", 2, seed=5)
    cfg = tmp_path / "moe.yml"
    cfg.write_text(f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {base}\n  - source_model: {a}\n")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "MixtralForCausalLM, 2 experts" in text and "output:" in text
    assert not (tmp_path / "out").exists()


def test_integer_buffers_are_copied_when_equal_and_refused_when_not(tmp_path):
    from safetensors.torch import save_file
    base, a = make_family(tmp_path / "m", 2, seed=6)
    for d, v in ((base, 7), (a, 7)):
        t = load_tensors(d)
        t["model.position_ids"] = torch.arange(16, dtype=torch.int64) * v
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    text = (f"models:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {a}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n")
    _merge(tmp_path, text)
    assert torch.equal(load_tensors(tmp_path / "out")["model.position_ids"], torch.arange(16) * 7)
    t = load_tensors(a)
    t["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    save_file(t, str(a / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="non-floating buffer 'model.position_ids' differs"):
        _merge(tmp_path, text, name="out2")
    assert not (tmp_path / "out2").exists()


def test_the_fake_hubs_storage_refuses_a_request_that_carries_the_token(hub, family):
    """The check behind every download test: the storage host the Hub redirects LFS files to refuses a request
    with an Authorization header (as pre-signed S3/CAS URLs do), so a client that forwarded the token fails."""
    from huggingface_hub.utils import get_session

    http = get_session()  # huggingface_hub's own HTTP client
    _upload(hub, f"{hub.org}/base", family[0])
    url = f"{hub.url}/{hub.org}/base/resolve/main/model.safetensors"
    first = http.get(url, headers={"Authorization": f"Bearer {hub.token}"}, follow_redirects=False)
    assert first.status_code == 302 and first.headers["X-Linked-Size"]
    location = first.headers["Location"]
    assert location.startswith(hub.server.cdn_url) and hub.server.cdn_url != hub.url  # another origin
    assert http.get(location, headers={"Range": "bytes=0-7"}).status_code == 206
    assert http.get(location, headers={"Authorization": f"Bearer {hub.token}"}).status_code == 400
    assert hub.server.cdn_auth_refused == [location[len(hub.server.cdn_url):]]
