"""How the executor runs any method: chunking and whole tensors give the same bytes, bf16 computed in float32,
the counter-based RNG, compiled kernels equal to eager ones, and mergekit's bf16 smoke scenarios."""

from __future__ import annotations

import tempfile

import pytest
import torch

from mergebot.engine import executor, rng
from mergebot.engine.methods import METHODS
from mergebot.tinymodels import load_tensors
from tests.helpers import f64, merge_dare, merge_yaml, models_yaml


def test_chunked_execution_equals_whole_tensor(family, tmp_path, monkeypatch):
    """Chunking (two-pass reduce/apply, index-addressed RNG) must not change the result."""
    monkeypatch.setattr(executor, "CHUNK", 1 << 30)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 1 << 30)
    whole = merge_dare(family, tmp_path, "whole", random_seed=5)
    monkeypatch.setattr(executor, "CHUNK", 64 * 3)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 64 * 3)
    chunked = merge_dare(family, tmp_path, "chunked", random_seed=5)
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], atol=1e-6, rtol=0), k
    # slerp's global norms summed over chunks
    base, a, _, _ = family
    text = f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.3}}\n"
    s_chunked = merge_yaml(tmp_path, text, name="s_chunked")
    monkeypatch.setattr(executor, "CHUNK", 1 << 30)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 1 << 30)
    s_whole = merge_yaml(tmp_path, text, name="s_whole")
    for k in s_whole:
        assert torch.allclose(s_whole[k], s_chunked[k], atol=1e-6, rtol=0), k


def test_bf16_inputs_compute_in_float32_cast_once(family_bf16, tmp_path):
    base, a, b = family_bf16
    X, A, B = f64(base), f64(a), f64(b)
    out = merge_yaml(tmp_path, f"""
models:
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {b}
    parameters: {{weight: 0.75}}
merge_method: linear
""")
    for k in X:
        assert out[k].dtype == torch.bfloat16
        ref = (0.25 * A[k] + 0.75 * B[k]).to(torch.bfloat16)
        assert torch.equal(out[k], ref), k


def test_rng_streams_are_uniform_and_independent():
    n = 1 << 20
    k1, k2 = rng.stream_key(7, "model.layers.0.mlp.up_proj.weight", 1), rng.stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)
    assert k1 != k2
    m1, m2 = rng.keep_mask(0, n, k1, 0.3), rng.keep_mask(0, n, k2, 0.3)
    assert float(m1.float().mean()) == pytest.approx(0.3, abs=0.003)
    assert float((m1 & m2).float().mean()) == pytest.approx(0.09, abs=0.002)  # independent streams
    assert float((m1[1:] & m1[:-1]).float().mean()) == pytest.approx(0.09, abs=0.002)  # no neighbour correlation
    # addressable: any window equals the same slice of the whole stream, also past 2**32
    assert torch.equal(rng.keep_mask(1000, 5000, k1, 0.3), m1[1000:6000])
    big = (1 << 32) - 10
    assert torch.equal(rng.keep_mask(big, 20, k1, 0.5)[10:], rng.keep_mask(big + 10, 10, k1, 0.5))


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties"])
def test_compiled_kernels_equal_eager(family, tmp_path, method):
    """torch.compile'd kernels (used for large merges) give the eager results bit for bit (linear and slerp stay
    eager in every mode: their in-place form is mergekit's fused multiply-add)."""
    pytest.importorskip("torch._inductor")
    from mergebot.engine import fuse
    if not fuse.compiler_available():
        pytest.skip("no C compiler")
    base, a, b, _ = family
    params = {"linear": "{weight: 0.6}", "slerp": "{}", "ties": "{weight: 0.6, density: 0.5}",
              "dare_ties": "{weight: 0.6, density: 0.5}"}[method]
    text = (f"models:\n  - model: {base}\n  - model: {a}\n    parameters: {params}\n"
            f"merge_method: {method}\nbase_model: {base}\nparameters: {{t: 0.4, weight: 0.5}}\n")
    if method == "linear":
        text = text.replace(f"  - model: {base}\n", f"  - model: {base}\n    parameters: {{weight: 0.4}}\n", 1)
    eager = merge_yaml(tmp_path, text, name="eager", random_seed=9, compile="off")
    fused = merge_yaml(tmp_path, text, name="fused", random_seed=9, compile="on")
    for k in eager:
        assert torch.equal(eager[k], fused[k]), k


@pytest.mark.parametrize("method, params", [
    ("nearswap", "parameters: {t: 0.02}\n"),
    ("ram", "parameters: {epsilon: 0.01}\n"),
    ("ramplus_tl", "parameters: {epsilon: 0.01, r: 0.5, alpha: 0.3}\n"),
])
def test_compiled_elementwise_kernels_equal_eager(family, tmp_path, method, params):
    """nearswap's and RAM's kernels (one fused loop each when compiled) give the eager bytes."""
    pytest.importorskip("torch._inductor")
    from mergebot.engine import fuse
    if not fuse.compiler_available():
        pytest.skip("no C compiler")
    base, a, b, _ = family
    others = f"  - model: {a}\n" + ("" if method == "nearswap" else f"  - model: {b}\n")
    text = f"models:\n  - model: {base}\n{others}merge_method: {method}\nbase_model: {base}\n{params}"
    eager = merge_yaml(tmp_path, text, name="eager", compile="off")
    fused = merge_yaml(tmp_path, text, name="fused", compile="on")
    for k in eager:
        assert torch.equal(eager[k], fused[k]), k
    from mergebot.tinymodels import load_tensors
    parent = load_tensors(base)
    assert sum(not torch.equal(eager[k], parent[k].to(eager[k].dtype)) for k in eager) > len(eager) // 2  # not the base


def test_auto_compile_only_for_large_cpu_merges_of_methods_that_gain(monkeypatch, tmp_path):
    """`--compile auto` (mergebot.engine.fuse.configure): never on CUDA (eager beats a cold Triton compile there), never
    for small merges or methods with a fast eager form, never without a C compiler."""
    from mergebot.engine import fuse
    big, small = fuse.AUTO_MIN_ELEMENTS, fuse.AUTO_MIN_ELEMENTS - 1
    monkeypatch.setattr(fuse, "compiler_available", lambda: True)
    assert fuse.configure("auto", big, True, "cpu")
    assert not fuse.configure("auto", big, True, "cuda")
    assert not fuse.configure("auto", small, True, "cpu")
    assert not fuse.configure("auto", big, False, "cpu")
    assert fuse.configure("on", 1, True, "cpu") and not fuse.configure("off", big, True, "cpu")
    assert not fuse.configure("on", big, True, "cuda")  # GPU kernels are eager in every mode
    # methods whose eager form is one in-place pass (linear, slerp) stay eager even with --compile on
    assert not fuse.configure("on", big, False, "cpu")
    # a method this kernel cache never met (a fresh runner): `auto` compiles only merges that repay the compile
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))
    assert not fuse.configure("auto", big, True, "cpu", "dare_ties")
    assert not fuse.configure("auto", fuse.AUTO_COLD_MIN_ELEMENTS - 1, True, "cpu", "dare_ties")
    assert fuse.configure("auto", fuse.AUTO_COLD_MIN_ELEMENTS, True, "cpu", "dare_ties")
    assert fuse.configure("on", 1, True, "cpu", "dare_ties")  # `on` compiles, met or not
    fuse.remember("dare_ties")
    assert fuse.marker("dare_ties").is_file()
    assert str(fuse.marker("dare_ties")).startswith(str(tmp_path / "cold"))
    assert fuse.configure("auto", big, True, "cpu", "dare_ties")  # met: a cache that persists, worth filling
    assert not fuse.configure("auto", big, True, "cpu", "ram")  # per method
    monkeypatch.setattr(fuse, "compiler_available", lambda: False)
    assert not fuse.configure("auto", big, True, "cpu")
    fuse.configure("off", 0)


@pytest.mark.parametrize("start", [0, 5, (1 << 31) - 100, (1 << 32) - 1000, 1 << 32, 3 * (1 << 32) + 12345])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9999, 1.0])
def test_int32_keep_mask_is_the_int64_hash_bit_for_bit(start, p, monkeypatch):
    """mergebot.engine.rng.keep32 (int32 lanes, wrapping products: what the DARE kernels use) draws exactly the bits of
    the reference int64 hash, across the int32 sign boundary and past 2**32, eager and compiled; the numpy form
    too, in its cache-sized steps (made 96 elements here, so ranges take several)."""
    monkeypatch.setattr(rng, "HASH_STEP", 96)
    n, key = 1000, 987654321
    thr = rng.threshold(p)
    stream = rng.Stream32.of(key, start, n, thr)
    ref = rng.hash_u32(torch.arange(n, dtype=torch.int64) + start, key) < thr
    assert torch.equal(rng.keep32(torch.arange(n, dtype=torch.int32), *stream.args()), ref)
    assert ref.float().mean().item() == pytest.approx(p, abs=0.06)
    if stream.cut is not None:  # the in-place form (DELLA's masks), with a cut per element too
        work = (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32))
        out = torch.empty(n, dtype=torch.bool)
        assert torch.equal(rng.keep32_into(rng.offsets32(n, torch.device("cpu")), stream.lo, stream.key, stream.hi,
                                           stream.cut, out, work), ref)
        cuts = torch.full((n,), stream.cut, dtype=torch.int32)
        cuts[::3] = rng._MIN32  # threshold 0: nothing kept there
        got = rng.keep32_into(torch.arange(n, dtype=torch.int32), stream.lo, stream.key, stream.hi, cuts, out, work)
        assert torch.equal(got, ref & (torch.arange(n) % 3 != 0))

        # numpy's uint32 form (eager DARE's flags), over ranges that start anywhere in the chunk
        import numpy as np
        flags = np.empty(n, dtype=np.uint8)
        for a, z in [(0, n), (0, 1), (7, 500), (500, n)]:
            m = z - a
            h, t = np.empty(m, np.uint32), np.empty(m, np.uint32)
            rng.keep_flags_np(a, stream.lo, stream.key, stream.hi, stream.cut, h, t, flags[a:z])
            assert torch.equal(torch.from_numpy(flags[a:z]).bool(), ref[a:z]), (a, z)


def test_int32_keep_mask_compiled_and_chunk_boundary():
    pytest.importorskip("torch._inductor")
    from mergebot.engine import fuse
    if not fuse.compiler_available():
        pytest.skip("no C compiler")
    n, start, key = 5000, (1 << 31) - 2000, 12345
    stream = rng.Stream32.of(key, start, n, rng.threshold(0.4))
    compiled = torch.compile(lambda i, a: rng.keep32(i, *a), dynamic=True)
    ref = rng.hash_u32(torch.arange(n, dtype=torch.int64) + start, key) < rng.threshold(0.4)
    assert torch.equal(compiled(torch.arange(n, dtype=torch.int32), stream.tensors("cpu")), ref)
    assert torch.equal(rng.keep32(torch.arange(n, dtype=torch.int32), *stream.tensors("cpu")), ref)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rng.Stream32.of(key, (1 << 32) - 10, 11, 5)


def test_int32_lane_hash_words_match_the_int64_hash():
    """hash_u32_words (arcee_fusion's sample indices) is hash_u32 of high·2³² + low, bit for bit."""
    low = torch.cat([torch.arange(3000, dtype=torch.int32), torch.arange((1 << 31) - 3000, (1 << 31) - 1,
                                                                      dtype=torch.int32)])
    for key in (0, 12345, 0xFFFFFFFF):
        got = rng.hash_u32_words(low, key, [0, 256, (1 << 32) - 1 - rng.GOLDEN])
        for high, words in zip([0, 256, (1 << 32) - 1 - rng.GOLDEN], got):
            assert torch.equal(words, rng.hash_u32(low.to(torch.int64) + (high << 32), key)), (key, high)


# --------------------------------------------------------------------------------------------------- chunking

@pytest.mark.parametrize("method,params", [
    ("nuslerp", None), ("multislerp", None), ("karcher", None), ("model_stock", None), ("sce", None),
    ("ram", None), ("ramplus_tl", None), ("nearswap", "{t: 0.01}"),
    # whole-tensor modes: the executor must not chunk them
    ("nuslerp", "{nuslerp_flatten: false}"), ("model_stock", "{filter_wise: true}"), ("sce", "{select_topk: 0.5}"),
    ("breadcrumbs", "{density: 0.5, gamma: 0.05}"), ("arcee_fusion", None),
])
def test_chunked_streaming_equals_whole_tensor(family, tmp_path, monkeypatch, method, params):
    """Global reductions summed over chunks (reduce/apply) give the whole-tensor result."""
    base, a, b, c = family
    m = METHODS[method]
    per = "{weight: 0.6}" if m.param("weight") else None
    per2 = "{weight: 0.3}" if m.param("weight") else None
    entries = [(a, per), (b, per2), (c, per2)][:m.max_non_base or 3]
    text = models_yaml(*entries) + f"merge_method: {method}\nbase_model: {base}\n"
    if params:
        text += f"parameters: {params}\n"
    whole = merge_yaml(tmp_path, text, name="whole", random_seed=3)
    monkeypatch.setattr(executor, "CHUNK", 256)
    monkeypatch.setattr(executor, "EAGER_CHUNK", 256)
    chunked = merge_yaml(tmp_path, text, name="chunked", random_seed=3)
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], atol=1e-6, rtol=0), k


# --------------------------------------------------------------------------------------------------- §8 smoke

SMOKE = {  # mergekit's test_basic_merges scenarios for these methods (bf16 models, weights .6/.4)
    "nuslerp": "", "multislerp": "", "karcher": "", "model_stock": "", "model_stock_fw": "{filter_wise: true}",
    "breadcrumbs": "", "breadcrumbs_ties": "", "sce": "{select_topk: 0.5}", "ram": "", "ramplus_tl": "",
    "arcee_fusion": "", "nearswap": "{t: 0.0001}", "della": "{lambda: 0.5}", "della_linear": "",
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_bf16_smoke(family_bf16, tmp_path, name):
    base, a, b = family_bf16
    method = name.removesuffix("_fw")
    m = METHODS[method]
    per = [{}, {}]
    if m.param("weight"):
        per = [{"weight": 0.6}, {"weight": 0.4}]
    if method.startswith("della"):
        for p in per:
            p.update(density=0.66, epsilon=0.05)
    entries = [(a, str(per[0]) if per[0] else None), (b, str(per[1]) if per[1] else None)]
    if method in ("nearswap", "arcee_fusion"):
        entries = entries[:1]
    text = models_yaml(*entries) + f"merge_method: {method}\nbase_model: {base}\n"
    if SMOKE[name]:
        text += f"parameters: {SMOKE[name]}\n"
    out = merge_yaml(tmp_path, text, random_seed=0)
    X = load_tensors(base)
    assert set(out) == set(X)
    for k, v in out.items():
        assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all(), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finiteness_by_exponent_bits_agrees_with_isfinite(dtype):
    # the executor tests stored chunks by their exponent bits (fast); it must say what torch.isfinite says,
    # at the edges too: ±max, -0.0, subnormals, and inf/NaN past the first 1M-element step
    from mergebot.engine.executor import _all_finite

    x = torch.randn(2_100_000, generator=torch.Generator().manual_seed(0)).to(dtype)
    info = torch.finfo(dtype)
    x[:4] = torch.tensor([info.max, -info.max, -0.0, info.tiny / 4], dtype=torch.float64).to(dtype)
    assert _all_finite(x) and bool(torch.isfinite(x).all())
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[2_050_000] = bad
        assert not _all_finite(y) and not bool(torch.isfinite(y).all())


def test_compiled_kernels_serve_any_thread_count_and_portable_isa(monkeypatch):
    """Kernels compiled once (the image's, mergebot.engine.warmup) must serve every thread count, so the thread count
    is read when a kernel runs (Inductor bakes the compiling process's in otherwise: a -j change recompiled); with
    MERGEBOT_PORTABLE_KERNELS on x86 they target x86-64-v2 with AVX2 vectors, not the building machine's CPU.
    scripts/container/test-image.sh checks the effect: a fresh container with another -j compiles nothing."""
    pytest.importorskip("torch._inductor")
    import platform

    import torch._inductor.config as inductor_config

    from mergebot.engine import fuse
    monkeypatch.setattr(inductor_config.cpp, "dynamic_threads", False)
    monkeypatch.setattr(inductor_config.cpp, "march", None)
    monkeypatch.setattr(inductor_config.cpp, "simdlen", None)
    monkeypatch.delenv("MERGEBOT_PORTABLE_KERNELS", raising=False)
    import torch._dynamo
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    assert not fuse.configure("off", 0) and not inductor_config.cpp.dynamic_threads  # eager: Inductor untouched
    assert not resets
    assert fuse.configure("on", 1, True, "cpu")
    assert resets == [1]  # every compiled merge traces as a fresh process does: the graphs the image's cache holds
    assert inductor_config.cpp.dynamic_threads and inductor_config.cpp.march is None  # host: -march=native kept
    monkeypatch.setenv("MERGEBOT_PORTABLE_KERNELS", "1")
    assert fuse.configure("on", 1, True, "cpu")
    if platform.machine() in ("x86_64", "AMD64"):
        assert (inductor_config.cpp.march, inductor_config.cpp.simdlen) == ("x86-64-v2", 256)
    fuse.configure("off", 0)


@pytest.mark.parametrize("env", [None, "relative/kernels"])
def test_inductor_cache_dir_is_torchs(monkeypatch, tmp_path, env):
    """fuse.inductor_cache_dir follows torch's own rule (which it copies to avoid importing torch._inductor)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from mergebot.engine import fuse
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    if env is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", env)
    mine = fuse.inductor_cache_dir()
    assert str(mine) == cache_dir()  # torch's also exports it to the environment: monkeypatch restores that


def test_merges_remember_the_methods_that_compile(family, tmp_path, monkeypatch):
    """A CPU merge of a method that compiles leaves its marker in the kernel cache, compiled or not (`auto`
    compiles it from the next merge on); `--compile off` and methods that never compile leave none."""
    from mergebot.engine import fuse
    base, a, _, _ = family
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    ram = f"models:\n  - model: {base}\n  - model: {a}\nmerge_method: ram\nbase_model: {base}\n"
    ties = ram.replace("merge_method: ram", "merge_method: ties").replace(
        f"  - model: {a}\n", f"  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n")
    merge_yaml(tmp_path, ram, name="off", compile="off")
    merge_yaml(tmp_path, ties, name="ties")
    assert not (tmp_path / "cache").exists()
    merge_yaml(tmp_path, ram, name="auto")  # small: eager, but remembered
    assert fuse.marker("ram").is_file() and "-ram" in fuse.marker("ram").name
    assert sorted(p.name.split("-", 1)[1] for p in fuse.marker("ram").parent.iterdir()) == ["ram"]


def test_warmup_configs_cover_every_method():
    """The image warms every fused method (mergebot.engine.warmup): its table must name every declared method with a
    config that validates, so a new method cannot be left cold by omission."""
    from mergebot.config.dense import parse_config
    from mergebot.config.methods import SPECS
    from mergebot.engine.methods import METHODS
    from mergebot.engine.warmup import CONFIGS, fused_methods
    assert set(CONFIGS) == set(SPECS)
    assert fused_methods() == [m for m in CONFIGS if METHODS[m].fuse] and "dare_ties" in fused_methods()
    for name, text in CONFIGS.items():
        cfg = parse_config(text.format(b="/m/base", x="/m/ft1", y="/m/ft2", h=1, n=2), f"{name}.yml")
        assert cfg.method_name == name and cfg.method is not None


def test_inductor_settings_unknown_to_this_torch_are_dropped(monkeypatch):
    """A kernel's Inductor settings are speed hints: a name the running torch lacks (torch 2.11 has no
    realize_cpu_opcount_threshold) is dropped instead of failing every compiled merge, and known ones, dotted too,
    are kept; the kernel still compiles and gives the eager bytes."""
    from mergebot.engine import fuse
    assert fuse.known_options({"no_such_setting_xyz": 1, "cpp.no_such": 2, "cpp.simdlen": 256,
                               "realize_cpu_opcount_threshold": 100}) == {"cpp.simdlen": 256,
                                                                          "realize_cpu_opcount_threshold": 100}
    assert fuse.known_options(None) is None
    if not fuse.compiler_available():
        pytest.skip("no C compiler")

    @fuse.fusable_with(no_such_setting_xyz=1)
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * 3 + 1

    x = torch.arange(1000, dtype=torch.float32) / 7
    monkeypatch.setitem(fuse._state, "on", True)
    assert torch.equal(scaled(x), x * 3 + 1)
