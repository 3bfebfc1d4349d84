"""The quality check of issue 17: layer-by-layer perplexity and greedy generation equal transformers' on tiny
Llama / Mistral / Qwen2 models; the gate rejects a broken merge (3/-2 linear) and a non-finite tensor and passes
a normal one; memory stays bounded (subprocess RssAnon) on a model many times larger than one layer; the CLI's
exit codes, one-line errors and JSON.

Random tiny models predict noise and greedy-decode into loops, so the gate tests use "counting" models built
here: orthonormal embeddings and an LM head that maps token t to t+1, with small random layers on top. They
have a low perplexity on counting text and continue "w10 w11 w12" with w13 w14 ..., so a merge that breaks
them shows in both numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebot.check import (
    CheckOptions,
    CheckUnsupported,
    markdown,
    model_index,
    run_check,
)
from mergebot.check.forward import LayerwiseModel
from mergebot.check.text import degenerate, load_eval_text
from mergebot.cli.main import main
from mergebot.tinymodels import llama_config, make_family, save_model, write_tokenizer
from tests.helpers import counting_tensors as _counting
from tests.helpers import merge_yaml

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- equivalence
def _qwen2(root: Path, tie: bool, window: bool) -> Path:
    """A Qwen2 model built by transformers (q/k/v biases, optional tied embeddings and sliding-window layers),
    every parameter random so the biases and norms matter."""
    import transformers as tr

    cfg = tr.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, use_sliding_window=window, sliding_window=8, max_window_layers=1,
                         bos_token_id=1, eos_token_id=2, rope_theta=1000.0)
    torch.manual_seed(7)
    model = tr.Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    d = root / f"qwen2-tie{tie}-win{window}"
    model.save_pretrained(d)
    return d


def _llama3_rope(root: Path) -> Path:
    """Llama with llama3-style rope scaling, written in the older `rope_theta` + `rope_scaling` spelling."""
    cfg = llama_config(vocab=96, layers=2)
    cfg.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    from mergebot.tinymodels import llama_tensors
    return save_model(root / "llama3", cfg, llama_tensors(cfg, 5))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check-equiv")
    models = {
        "llama": make_family(root / "llama", 1, seed=3, vocab=96)[0],
        "llama-tied": make_family(root / "llama-tied", 1, seed=4, vocab=96, tie=True)[0],
        "mistral-window": make_family(root / "mistral", 1, seed=5, vocab=96, family="mistral")[0],
        "llama3-rope": _llama3_rope(root),
        # bf16 weights in two shards: the converted-copy path (scratch buffers) and the sharded index
        "llama-bf16-sharded": make_family(root / "bf16", 1, seed=6, vocab=96, dtype=torch.bfloat16, shards=2)[0],
    }
    cfg_file = models["mistral-window"] / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), sliding_window=8)))
    models["qwen2"] = _qwen2(root, tie=False, window=False)
    models["qwen2-tied-window"] = _qwen2(root, tie=True, window=True)
    return models


def _ids(n: int, seed: int, vocab: int = 96) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral-window", "llama3-rope", "llama-bf16-sharded",
                                  "qwen2", "qwen2-tied-window"])
def test_perplexity_and_greedy_generation_equal_transformers(tiny_models, name):
    import transformers as tr

    d = tiny_models[name]
    ref = tr.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    windows = [_ids(40, 1), _ids(23, 2)]
    with torch.no_grad():
        losses = [ref(torch.tensor([w]), labels=torch.tensor([w])).loss.double().item() for w in windows]
    expect = math.exp(sum(loss * (len(w) - 1) for loss, w in zip(losses, windows)) / sum(len(w) - 1 for w in windows))
    prompts = [_ids(5, 3), _ids(9, 4)]
    with torch.no_grad():
        generated = [ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
                     for p in prompts]
    cfg = json.loads((d / "config.json").read_text())
    # a large budget (one block per matrix) and a tiny one (every chunked path: MLP slices, query blocks,
    # vocabulary chunks, token blocks) must both give transformers' numbers
    for budget in (1 << 24, 1 << 12):
        model = LayerwiseModel(d, name, cfg, torch.device("cpu"), budget)
        nll, n = model.nll(windows)
        assert n == 61
        assert math.exp(nll / n) == pytest.approx(expect, rel=1e-4), budget
        # one window alone against transformers' exp(loss) directly
        nll1, n1 = model.nll(windows[:1])
        assert math.exp(nll1 / n1) == pytest.approx(math.exp(losses[0]), rel=1e-4)
        assert model.greedy(prompts, 16, {2}) == generated, budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_cuda_gives_the_cpu_numbers(tiny_models, counting, tmp_path):
    for name in ("llama", "llama-bf16-sharded", "qwen2-tied-window"):
        d = tiny_models[name]
        cfg = json.loads((d / "config.json").read_text())
        windows, prompts = [_ids(40, 1), _ids(23, 2)], [_ids(5, 3), _ids(9, 4)]
        cpu = LayerwiseModel(d, name, cfg, torch.device("cpu"))
        for budget in (1 << 24, 1 << 12):
            gpu = LayerwiseModel(d, name, cfg, torch.device("cuda"), budget)
            assert gpu.nll(windows)[0] == pytest.approx(cpu.nll(windows)[0], rel=1e-5), (name, budget)
            assert gpu.greedy(prompts, 16, {2}) == cpu.greedy(prompts, 16, {2}), (name, budget)
    good = _linear(tmp_path, counting["ft1"], counting["ft2"], 0.5, 0.5, "good")
    on_cpu = run_check(good, [counting["ft1"]], _opts(counting))
    on_gpu = run_check(good, [counting["ft1"]], _opts(counting, device="cuda"))
    assert on_gpu.device.startswith("cuda") and on_gpu.verdict == on_cpu.verdict == "passed"
    assert on_gpu.merge.perplexity == pytest.approx(on_cpu.merge.perplexity, rel=1e-5)
    assert [g.tokens for g in on_gpu.generations] == [g.tokens for g in on_cpu.generations]


# ------------------------------------------------------------------------------------------------ the gate
@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> dict[str, Path]:
    """Two 'fine-tunes' of one counting base, an evaluation text of counting runs, and prompts that count."""
    root = tmp_path_factory.mktemp("check-gate")
    cfg = llama_config(vocab=64, hidden=64, inter=96, layers=4, heads=4, kv_heads=2)
    base = _counting(cfg, 0)
    dirs = {}
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        dirs[f"ft{i}"] = save_model(root / f"ft{i}", cfg, {k: v + 0.02 * torch.randn(v.shape, generator=g)
                                                          for k, v in base.items()})
    text = root / "counting.txt"
    text.write_text("\n".join(" ".join(f"w{3 + (s + i) % 61}" for i in range(40)) for s in (0, 17, 33)) + "\n")
    dirs["text"] = text
    dirs["root"] = root
    return dirs


def _opts(counting: dict[str, Path], device: str = "cpu", **kw) -> CheckOptions:
    return CheckOptions(eval_text=counting["text"], device=device, prompts=("w10 w11 w12", "w30 w31", "w47"), **kw)


def _linear(tmp: Path, a: Path, b: Path, wa: float, wb: float, name: str) -> Path:
    merge_yaml(tmp, f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {wa}}}\n"
                    f"  - model: {b}\n    parameters: {{weight: {wb}}}\n", name)
    return tmp / name


def test_normal_merge_passes_and_broken_linear_merge_is_rejected(counting, tmp_path):
    a, b = counting["ft1"], counting["ft2"]
    good = run_check(_linear(tmp_path, a, b, 0.5, 0.5, "good"), [a, b], _opts(counting), labels=["ft1", "ft2"])
    assert good.verdict == "passed", good.reasons
    assert good.perplexity_ratio < 1.5 and good.merge.perplexity < 5
    assert [g.text for g in good.generations][0].startswith("w13 w14 w15")
    assert not any(g.degenerate for g in good.generations)
    assert good.tensors.finite and good.tensors.compared == good.tensors.tensors
    assert 0.7 < good.tensors.worst_ratio < 1.1  # averaging two noisy copies shrinks the noise a little

    bad = run_check(_linear(tmp_path, a, b, 3, -2, "bad"), [a, b], _opts(counting), labels=["ft1", "ft2"])
    assert bad.verdict == "rejected"
    assert bad.perplexity_ratio > 1.5 * 5  # far beyond the gate, not a borderline case
    assert any("the gate allows 1.5x" in r for r in bad.reasons), bad.reasons
    assert bad.best_parent in ("ft1", "ft2")
    data = json.loads(bad.to_json())
    assert data["verdict"] == "rejected" and data["perplexity_ratio"] == pytest.approx(bad.perplexity_ratio)

    # without parents only finiteness and generation count: the good merge passes, perplexity is reported
    alone = run_check(tmp_path / "good", [], _opts(counting))
    assert alone.verdict == "passed" and alone.perplexity_ratio is None and alone.merge.perplexity < 5

    # what the card gets
    index = model_index(good, "org/good-merge")
    result = index[0]["results"][0]
    assert index[0]["name"] == "org/good-merge" and result["task"]["type"] == "text-generation"
    assert result["metrics"][0]["type"] == "perplexity"
    assert result["metrics"][0]["value"] == pytest.approx(good.merge.perplexity, rel=1e-4)
    table = markdown(good)
    assert "| **this merge** |" in table and "| ft1 |" in table and "| ft2 |" in table
    assert "Quality gate: **passed**" in table and "counting.txt" in table
    assert "Quality gate: **rejected**" in markdown(bad)


def test_non_finite_tensor_is_rejected_and_norm_outliers_are_flagged(counting, tmp_path, capsys):
    from mergebot.tinymodels import load_tensors

    tensors = load_tensors(counting["ft1"])
    cfg = json.loads((counting["ft1"] / "config.json").read_text())
    broken = dict(tensors)
    broken["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    broken["model.layers.1.mlp.up_proj.weight"][3, 5] = math.inf
    broken["model.layers.2.self_attn.v_proj.weight"] = tensors["model.layers.2.self_attn.v_proj.weight"] * 30
    d = save_model(tmp_path / "inf", cfg, broken)
    report = run_check(d, [counting["ft1"], counting["ft2"]], _opts(counting))
    assert report.verdict == "rejected"
    assert report.tensors.non_finite == ["model.layers.1.mlp.up_proj.weight"]
    assert report.merge is None and not report.generations  # no forward pass over a broken model
    assert "NaN or infinite" in report.reasons[0]
    flagged = {f.tensor: f.ratio for f in report.tensors.flagged}
    assert flagged.keys() == {"model.layers.2.self_attn.v_proj.weight"}
    assert flagged["model.layers.2.self_attn.v_proj.weight"] == pytest.approx(30, rel=0.05)
    assert report.tensors.worst_tensor == "model.layers.2.self_attn.v_proj.weight"

    assert main(["check", str(d), "--parents", str(counting["ft1"]), "--json", "--quiet"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "rejected" and data["tensors"]["non_finite_count"] == 1


def test_parent_with_another_tokenizer_is_compared_over_the_merges_tokens(counting, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    other = tmp_path / "other-tokenizer"
    shutil.copytree(counting["ft1"], other)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(63, 2, -1)]  # same words, other ids
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(other / "tokenizer.json"))
    report = run_check(counting["ft1"], [other, counting["ft2"]], _opts(counting, max_new_tokens=0))
    shuffled, same = report.parents
    assert not shuffled.same_tokens_as_merge and same.same_tokens_as_merge
    assert shuffled.tokens == report.merge.tokens and shuffled.ratio_basis == pytest.approx(shuffled.perplexity)
    assert any("splits the text differently" in w for w in report.warnings)
    assert report.best_parent == str(counting["ft2"]) and report.verdict == "passed"
    assert "(other tokenizer)" in markdown(report)


def test_unsupported_rope_and_architectures_are_refused_by_name():
    from mergebot.check.decoder import DecoderSpec

    cfg = llama_config()
    assert DecoderSpec.from_config(cfg, "m").rope_type == "default"
    for change, word in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                         ({"hidden_act": "gelu"}, "gelu"), ({"architectures": ["Gemma2ForCausalLM"]}, "Gemma2"),
                         ({"partial_rotary_factor": 0.5}, "partial_rotary_factor")):
        with pytest.raises(CheckUnsupported, match=f"not supported by the check yet: .*{word}"):
            DecoderSpec.from_config({**cfg, **change}, "m")


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_exit_codes_and_one_line_errors(counting, tmp_path, capsys):
    good = _linear(tmp_path, counting["ft1"], counting["ft2"], 0.5, 0.5, "good")
    args = ["check", str(good), "--parents", str(counting["ft1"]), str(counting["ft2"]), "--eval-text",
            str(counting["text"]), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.startswith("check: passed") and "ratio to the best parent" in out.out
    assert "check: perplexity of" in out.err  # progress on stderr
    assert main(args + ["--markdown", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("| Model | Perplexity |") and "Quality gate: **passed**" in out.out and not out.err

    assert main(args + ["--json", "--max-perplexity-ratio", "0.5"]) == 1  # the same merge, a stricter gate
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "rejected" and data["max_perplexity_ratio"] == 0.5
    assert {"merge", "parents", "generations", "tensors", "eval_text", "reasons"} <= data.keys()

    assert main(["check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such directory" in err

    assert main(["check", str(good), "--parents", str(tmp_path / "missing-parent")]) == 2
    assert "no such directory" in capsys.readouterr().err

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert main(["check", str(gpt2)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not supported by the check yet: GPT2LMHeadModel" in err
    with pytest.raises(CheckUnsupported):
        run_check(gpt2, [])


# -------------------------------------------------------------------------------------------------- text
def test_chat_rendered_with_the_models_template_in_a_sandbox(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    write_tokenizer(d, 64)
    cfg_file = d / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                                "{{ eos_token }}{% endfor %}")
    cfg_file.write_text(json.dumps(tok_cfg))
    text = load_eval_text(None, d)
    names = [n for n, _ in text.sections]
    assert {"prose-en", "prose-fr", "prose-zh", "code-python", "chat"} <= set(names)
    chat = dict(text.sections)["chat"]
    assert chat.startswith("<s><|user|>I have a small balcony") and "</s><|assistant|>" in chat
    assert text.chat == "the model's chat template" and 3000 < text.nbytes < 8000

    # a template reaching for Python internals is stopped by the sandbox; the text falls back to plain lines
    (d / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    text = load_eval_text(None, d)
    assert dict(text.sections)["chat"].startswith("User: I have a small balcony")
    assert text.chat.startswith("plain (the chat template failed")


@pytest.mark.parametrize("template,reason", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x", "did not finish in 2 s"),
    ('{{ "x" * 100000 * 100000 }}', "ran out of memory"),
    ('{% for i in range(100000) %}{{ "abcdefghij" * 20 }}{% endfor %}', "more than 1,048,576"),
])
def test_a_chat_template_that_would_hang_or_exhaust_memory_falls_back_in_bounded_time(tmp_path, monkeypatch,
                                                                                      template, reason):
    """A parent's template runs in a child with a deadline, a memory cap and an output cap: the gate goes on."""
    from mergebot.check import chat_render
    monkeypatch.setattr(chat_render, "RENDER_SECONDS", 2.0)
    d = tmp_path / "m"
    d.mkdir()
    write_tokenizer(d, 64)
    (d / "chat_template.jinja").write_text(template)
    t0 = time.monotonic()
    text = load_eval_text(None, d)
    assert time.monotonic() - t0 < 15
    assert dict(text.sections)["chat"].startswith("User: I have a small balcony")
    assert text.chat.startswith("plain (the chat template failed: ") and reason in text.chat, text.chat


def test_degenerate_generations():
    assert degenerate([], "") == "empty continuation"
    assert degenerate([5, 6], "  \n") == "empty continuation"
    assert "fills" in degenerate([7] * 12 + [1, 2, 3, 4], "x")
    assert "repetitive" in degenerate([1, 2, 3] * 5 + [1], "x")
    assert degenerate(list(range(16)), "x") is None
    assert degenerate([1, 2, 3, 4, 5, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14], "x") is None  # one repeated pair


# ------------------------------------------------------------------------------------------------ memory
def _big_model(directory: Path, layers: int, hidden: int, inter: int) -> int:
    """A bf16 Llama model written one layer per shard; returns its float32 size in bytes."""
    directory.mkdir()
    cfg = llama_config(vocab=256, hidden=hidden, inter=inter, layers=layers, heads=8, kv_heads=8)
    (directory / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="bfloat16")))
    write_tokenizer(directory, 256)
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    ones = torch.ones(hidden, dtype=torch.bfloat16)
    square = {n: r(hidden, hidden) for n in "qkvo"}  # every layer gets the same values: writing is the cost
    mlp = {"gate": r(inter, hidden), "up": r(inter, hidden), "down": r(hidden, inter)}

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {**{p + f"self_attn.{n}_proj.weight": t for n, t in square.items()},
                **{p + f"mlp.{n}_proj.weight": t for n, t in mlp.items()},
                p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones.clone()}

    weight_map, total = {}, 0
    for n in range(layers + 1):
        shard = layer(n - 1) if n else {"model.embed_tokens.weight": r(256, hidden), "lm_head.weight": r(256, hidden),
                                        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 4 for t in shard.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def test_memory_stays_bounded_on_a_model_many_times_larger_than_a_layer(tmp_path):
    f32_bytes = _big_model(tmp_path / "big", layers=16, hidden=1024, inter=4096)  # 1.07 GB in float32
    layer_bytes = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4
    assert f32_bytes > 15 * layer_bytes
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 250 + 3}" for i in range(48)))
    # what the interpreter with torch and the check's imports holds before any model is read (it differs by
    # torch build: ~150 MB here, ~270 MB with a CUDA torch)
    baseline, _, _ = _peak_anon([sys.executable, "-c", "import torch, mergebot.check.engine, mergebot.cli.check"])
    peak, out, err = _peak_anon([sys.executable, "-m", "mergebot.cli.main", "check", str(tmp_path / "big"), "--device",
                                 "cpu", "--eval-text", str(text), "--max-new-tokens", "1", "--json", "--quiet"])
    report = json.loads(out)  # (exit code 0 or 1: the verdict; a failure prints no JSON)
    assert report["merge"]["tokens"] == 47 and report["tensors"]["tensors"] == 16 * 9 + 3
    # the model is 1.07 GB in float32 and 0.54 GB on disk: a pass that loaded it would exceed this bound, a
    # layer-streaming one stays far below
    print(f"peak RssAnon {peak / 1e6:.0f} MB ({baseline / 1e6:.0f} MB before any model) for a "
          f"{f32_bytes / 1e9:.2f} GB (float32) model")
    assert 0 < peak - baseline < f32_bytes / 4


def _peak_anon(cmd: list[str]) -> tuple[int, str, str]:
    """Run cmd from the repository root; (peak RssAnon in bytes, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.01)
    out, err = proc.communicate()
    return peak, out, err
