"""The CUDA path (`--device cuda|auto`, issue #2 item 5): every method gives on the GPU what it gives on the CPU.

Skipped where torch sees no CUDA device (CI has none); run on a GPU runner with `python -m pytest tests/test_cuda.py`.
Deterministic methods must agree with the CPU result within float32 rounding; random methods draw their masks from
the counter-based RNG (mergebot.engine.rng), so the kept entries must be the same ones on both devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergebot.engine import exact, executor
from mergebot.tinymodels import load_tensors
from tests.helpers import merge_yaml, models_yaml, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


_models = models_yaml


def _configs(family: list[Path]) -> dict[str, str]:
    base, a, b, c = family
    three = _models((a, "{weight: 0.5, density: 0.6}"), (b, "{weight: 0.3, density: 0.5}"),
                    (c, "{weight: 0.4, density: 0.7}"))
    return {
        "linear": _models((a, "{weight: [0.2, 0.8]}"), (b, "{weight: 0.5}")) + "merge_method: linear\n",
        "slerp": _models((base, None), (a, None)) + f"merge_method: slerp\nbase_model: {base}\n"
                 "parameters: {t: [0, 0.5, 1]}\n",
        "task_arithmetic": three + f"merge_method: task_arithmetic\nbase_model: {base}\n",
        "ties": three + f"merge_method: ties\nbase_model: {base}\n",
        "dare_ties": three + f"merge_method: dare_ties\nbase_model: {base}\n",
        "dare_linear": three + f"merge_method: dare_linear\nbase_model: {base}\n",
        "breadcrumbs_ties": _models((a, "{weight: 0.5, density: 0.8, gamma: 0.05}"),
                                    (b, "{weight: 0.5, density: 0.7, gamma: 0.02}"))
                            + f"merge_method: breadcrumbs_ties\nbase_model: {base}\n",
        "della": three + f"merge_method: della\nbase_model: {base}\nparameters: {{epsilon: 0.1}}\n",
        "sce": three + f"merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\n",
        "model_stock": _models((a, None), (b, None)) + f"merge_method: model_stock\nbase_model: {base}\n",
        "nuslerp": _models((a, "{weight: 0.7}"), (b, "{weight: 0.3}")) + "merge_method: nuslerp\n",
        "nuslerp_rows": _models((a, "{weight: 0.7}"), (b, "{weight: 0.3}"))
                        + f"merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false}}\n",
        "multislerp": _models((a, "{weight: 0.5}"), (b, "{weight: 0.3}"), (c, "{weight: 0.4}"))
                      + "merge_method: multislerp\n",
        "karcher": _models((a, None), (b, None), (c, None)) + "merge_method: karcher\n",
        "nearswap": _models((a, None)) + f"merge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.001}}\n",
        "arcee_fusion": _models((a, None)) + f"merge_method: arcee_fusion\nbase_model: {base}\n",
        "ram": _models((a, None), (b, None)) + f"merge_method: ram\nbase_model: {base}\n",
        "passthrough": f"slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
                       f"  - sources:\n      - model: {b}\n        layer_range: [1, 4]\nmerge_method: passthrough\n",
    }


RANDOM = {"dare_ties", "dare_linear", "della"}
# Methods that keep or drop each entry by comparing a computed score with a computed threshold (arcee_fusion's
# softmax-KL importance against median + 1.5 IQR): exp/log differ by an ulp between CPU and GPU libraries, so an
# entry lying on the threshold may flip. Everything else must agree, and a flipped entry is one model's value.
THRESHOLDED = {"arcee_fusion"}


@pytest.mark.parametrize("method", list(_configs([Path(p) for p in "wxyz"])))
def test_cuda_equals_cpu(family, tmp_path, method):
    text = _configs(family)[method]
    cpu = merge_yaml(tmp_path, text, name="cpu", random_seed=7, device="cpu")
    gpu = merge_yaml(tmp_path, text, name="gpu", random_seed=7, device="cuda")
    assert cpu.keys() == gpu.keys()
    flipped = total = 0
    base, other = load_tensors(family[0]), load_tensors(family[1])
    for k in cpu:
        assert cpu[k].dtype == gpu[k].dtype and cpu[k].shape == gpu[k].shape, k
        close = torch.isclose(cpu[k], gpu[k], rtol=2e-5, atol=2e-6)
        if method in THRESHOLDED:
            for got in (cpu[k][~close], gpu[k][~close]):
                assert torch.all(torch.isclose(got, base[k][~close], atol=1e-6)
                                 | torch.isclose(got, other[k][~close], atol=1e-6)), k
            flipped += int((~close).sum())
            total += close.numel()
            continue
        assert close.all(), (k, (cpu[k] - gpu[k]).abs().max().item())
        if method in RANDOM:  # the same entries dropped on both devices (counter-based RNG, mergebot.engine.rng)
            assert torch.equal(cpu[k] == 0, gpu[k] == 0), k
    assert flipped <= total * 1e-3, f"{flipped} of {total} entries differ"


# Elementwise IEEE operations (no transcendental per element) and exact global sums (mergebot.engine.exact): the GPU must
# give the CPU's bytes, not just close numbers (measured on an H200). Not linear: it keeps mergekit's own
# per-device arithmetic (an alpha-add on the CPU), bit-identical to mergekit on each device but one rounding
# apart between CPU and GPU.
SAME_BYTES = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "breadcrumbs_ties", "slerp",
              "nuslerp", "multislerp", "model_stock", "karcher", "ram", "passthrough"}


@pytest.mark.parametrize("method", sorted(SAME_BYTES))
def test_cuda_same_bytes_as_cpu(family, tmp_path, method):
    text = _configs(family)[method]
    cpu = merge_yaml(tmp_path, text, name="cpu", random_seed=7, device="cpu")
    gpu = merge_yaml(tmp_path, text, name="gpu", random_seed=7, device="cuda")
    differ = [k for k in cpu if not torch.equal(cpu[k], gpu[k])]
    assert not differ, (len(differ), differ[:3])


@pytest.mark.parametrize("method", ["slerp", "dare_ties", "ties", "linear"])
def test_cuda_chunked_two_phase_equals_whole(family, tmp_path, monkeypatch, method):
    """Chunked execution on the GPU (slerp's norms and DARE's L1 sums reduced across chunks on the device)."""
    text = _configs(family)[method]
    monkeypatch.setattr(exact, "BLOCK", 64)  # chunks of 3 exact-sum blocks
    whole = merge_yaml(tmp_path, text, name="whole", random_seed=3, device="cuda")
    monkeypatch.setattr(executor, "CUDA_CHUNK", 64 * 3)
    chunked = merge_yaml(tmp_path, text, name="chunked", random_seed=3, device="cuda")
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k


@pytest.mark.parametrize("method", ["dare_ties", "linear", "slerp", "ties"])
def test_cuda_compiled_kernels_equal_eager(family, tmp_path, method):
    """`--compile on` with a GPU runs eagerly (Triton's compiled division rounded TIES differently on an H200):
    the same bytes either way."""
    text = _configs(family)[method]
    eager = merge_yaml(tmp_path, text, name="eager", random_seed=5, device="cuda", compile="off")
    fused = merge_yaml(tmp_path, text, name="fused", random_seed=5, device="cuda", compile="on")
    for k in eager:
        assert torch.equal(eager[k], fused[k]), k


def test_cuda_bf16_sharded_output_and_lock(family_bf16, tmp_path):
    base, a, b = family_bf16
    text = (_models((a, "{weight: 0.6, density: 0.5}"), (b, "{weight: 0.4, density: 0.5}"))
            + f"merge_method: dare_ties\nbase_model: {base}\ndtype: bfloat16\n")
    cpu = merge_yaml(tmp_path, text, name="cpu", random_seed=11, device="cpu", out_shard_size=20_000)
    gpu = merge_yaml(tmp_path, text, name="gpu", random_seed=11, device="cuda", out_shard_size=20_000)
    for k in cpu:
        assert gpu[k].dtype == torch.bfloat16
        # float32 math cast once to bf16: at most one bf16 ulp apart where rounding of the sum differs
        diff = (cpu[k].float() - gpu[k].float()).abs()
        assert (diff <= cpu[k].float().abs() * 2 ** -7 + 1e-6).all(), k
    assert len(list((tmp_path / "gpu").glob("model-*.safetensors"))) > 1
    lock = json.loads((tmp_path / "gpu" / "mergebot.lock.json").read_text())
    assert lock["device"] == "cuda"


def test_cli_device_auto_and_cuda_flag_use_the_gpu(family, tmp_path):
    base, a, _, _ = family
    cfg = tmp_path / "m.yml"
    cfg.write_text(_configs(family)["slerp"])
    for name, flags in [("auto", ["--device", "auto"]), ("flag", ["--cuda"])]:
        res = run_cli("merge", str(cfg), str(tmp_path / name), "--quiet", *flags)
        assert res.returncode == 0, res.stderr
        assert json.loads((tmp_path / name / "mergebot.lock.json").read_text())["device"] == "cuda"
    ref = merge_yaml(tmp_path, _configs(family)["slerp"], name="cpu", device="cpu")
    got = load_tensors(tmp_path / "auto")
    for k in ref:
        assert torch.allclose(ref[k], got[k], rtol=2e-5, atol=2e-6), k


@pytest.mark.parametrize("mode", ["hidden", "random"])
def test_cuda_moe_equals_cpu(tmp_path, mode):
    """MoE build on the GPU: hidden-state gates run the base model there; random gates come from mergebot.engine.rng."""
    pytest.importorskip("transformers")
    from mergebot.tinymodels import make_family
    from tests.builds.test_moe import DIMS, build, expert_yaml

    fam = make_family(tmp_path / "fam", 3, seed=11, noise=0.05, **DIMS)
    text = (f"base_model: {fam[0]}\ngate_mode: {mode}\ndtype: float32\n"
            + expert_yaml(fam, [["w5 w6 w7", "w9"], ["w40 w41"], ["w60"]]))
    build(tmp_path, text, "cpu", random_seed=4, device="cpu")
    build(tmp_path, text, "gpu", random_seed=4, device="cuda")
    cpu, gpu = load_tensors(tmp_path / "cpu"), load_tensors(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        # hidden gates: the base model's bf16 forward pass on each device (different kernels), normalised
        tol = 3e-2 if mode == "hidden" and "gate.weight" in k else 1e-6
        assert torch.allclose(cpu[k], gpu[k], rtol=tol, atol=tol), (k, (cpu[k] - gpu[k]).abs().max().item())
