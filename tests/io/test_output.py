"""Output files, shards, safe writes, interruption and memory (issue: engine core items 5, 7, 8)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergebot.tinymodels import llama_config, load_tensors, make_family, save_model
from tests.helpers import ROOT, run_cli


def test_sharded_output_with_index_loads_in_transformers(family_bf16, tmp_path):
    base, a, b = family_bf16
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
                   "merge_method: linear\nout_dtype: float16\n")
    out = tmp_path / "out"
    r = run_cli("merge", str(cfg), str(out), "--out-shard-size", "20K")
    assert r.returncode == 0, r.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = load_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for s in shards:  # data bytes per shard within the limit (a single bigger tensor gets its own shard)
        with safe_open(str(s), "pt") as st:
            sizes = [st.get_tensor(k).numel() * 2 for k in st.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert all(t.dtype == torch.float16 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "mergekit_config.yml", "mergebot.lock.json"):
        assert (out / f).exists(), f
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float16


@pytest.mark.parametrize("size", ["inf", "1e400B", "nan", "0", "-5M", "abc"])
def test_absurd_out_shard_size_is_a_usage_error(family, tmp_path, size):
    """`inf` was an OverflowError traceback; 0 or a negative size silently wrote one shard per tensor."""
    base, a, _, _ = family
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n")
    r = run_cli("merge", str(cfg), str(tmp_path / "out"), f"--out-shard-size={size}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("mergebot merge: error: argument --out-shard-size: ")
    assert not (tmp_path / "out").exists()


def test_frankenmerge_slices_update_layer_count(family, tmp_path):
    base, a, _, _ = family
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 3]\n"
                   f"  - sources:\n      - model: {a}\n        layer_range: [1, 4]\nmerge_method: passthrough\n")
    out = tmp_path / "out"
    r = run_cli("merge", str(cfg), str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    o, B, A = load_tensors(out), load_tensors(base), load_tensors(a)
    assert torch.equal(o["model.layers.2.mlp.up_proj.weight"], B["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(o["model.layers.3.mlp.up_proj.weight"], A["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(o["model.embed_tokens.weight"], B["model.embed_tokens.weight"])
    assert torch.equal(o["lm_head.weight"], A["lm_head.weight"])


def _big_models(root: Path, n_layers: int, hidden: int) -> list[Path]:
    return make_family(root, 3, seed=3, dtype=torch.bfloat16, vocab=256, hidden=hidden, inter=hidden * 2,
                       heads=8, kv_heads=8, layers=n_layers)


def test_interrupted_merge_leaves_no_output_and_rerun_succeeds(tmp_path):
    base, a, b = _big_models(tmp_path / "m", 24, 512)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                   f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: dare_ties\nbase_model: {base}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mergebot.cli.main", "merge", str(cfg), str(out), "--random-seed", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait until the work directory has data, then kill hard (no cleanup handlers run)
    deadline = time.time() + 60
    while time.time() < deadline:
        work = [p for p in tmp_path.iterdir() if p.name.startswith(".out.mergebot-")]
        if work and any(f.stat().st_size > 4096 for f in work[0].glob("*.safetensors")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed merge must not leave something that looks like a finished model"
    r = run_cli("merge", str(cfg), str(out), "--random-seed", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


MEASURE = r"""
import resource, sys, os
from pathlib import Path
import torch
from mergebot.config.dense import load_config
from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
torch.ones(1) + 1
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
before = rss()
cfg = load_config(sys.argv[1])
run_merge(cfg, Path(sys.argv[2]), MergeOptions(progress=False, random_seed=0))
print(before, rss())
"""


def test_memory_stays_flat_when_shards_are_much_larger_than_tensors(tmp_path):
    # 3 models, each one ~100 MB shard of ~1 MB tensors: RSS growth must stay far below a shard's size.
    cfg_ = llama_config(vocab=512, hidden=512, inter=512, heads=8, kv_heads=8, layers=28)
    dirs = []
    for i in range(3):
        from mergebot.tinymodels import llama_tensors
        t = llama_tensors(cfg_, i)
        dirs.append(save_model(tmp_path / f"m{i}", cfg_, t, dtype=torch.float32))
    size = (dirs[0] / "model.safetensors").stat().st_size
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {dirs[0]}\n  - model: {dirs[1]}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
                   f"  - model: {dirs[2]}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
                   f"merge_method: dare_ties\nbase_model: {dirs[0]}\n")
    r = subprocess.run([sys.executable, "-c", MEASURE, str(cfg), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after = map(int, r.stdout.split())
    growth = after - before
    assert size > 90e6
    assert growth < size * 0.5, (growth, size)


def _with_auto_map(models: list[Path]) -> None:
    for d in models:
        for name, value in (("config.json", {"AutoModelForCausalLM": "evil/code--modeling_evil.Evil"}),
                            ("tokenizer_config.json", {"AutoTokenizer": ["evil/code--tok.EvilTokenizer", None]})):
            data = json.loads((d / name).read_text())
            data["auto_map"] = value
            (d / name).write_text(json.dumps(data))


def test_output_never_inherits_auto_map(tmp_path):
    """A parent's `auto_map` was copied into the output's config.json and tokenizer_config.json: with
    trust_remote_code, transformers then runs code from the repo it names, under the merger's name."""
    base, a = make_family(tmp_path / "fam", 2, seed=5)
    _with_auto_map([base, a])
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n")
    dry = run_cli("merge", str(cfg), str(tmp_path / "out"), "--dry-run")
    assert dry.returncode == 0 and "config.json: auto_map (remote code) dropped" in dry.stderr, dry.stderr
    r = run_cli("merge", str(cfg), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((tmp_path / "out" / name).read_text()), name
        assert f"{name}: auto_map (remote code) dropped" in r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
