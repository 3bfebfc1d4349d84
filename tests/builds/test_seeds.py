"""The published seed configs, re-pointed at tiny local models, merge and the result generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
from mergebot.config.dense import parse_config
from mergebot.tinymodels import make_family
from tests.helpers import SEED_CONFIGS

SEEDS = SEED_CONFIGS


def repoint(text: str, mapping: dict[str, Path]) -> str:
    for name, path in mapping.items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", str(path), text)
    return text


def generate(out: Path) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("w5 w6 w7", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert gen.shape[1] == ids.shape[1] + 4
    return gen


@pytest.mark.parametrize("seed_file,family,names", [
    ("000_linear.yml", "llama", ["nvidia/Llama3-ChatQA-1.5-8B", "shenzhi-wang/Llama3-8B-Chinese-Chat"]),
    ("001_dare_ties_gradients.yml", "llama", ["tokyotech-llm/Swallow-70b-instruct-hf", "allenai/tulu-2-dpo-70b"]),
    ("003_dare_ties_int8.yml", "llama", ["meta-llama/Meta-Llama-3-8B-Instruct", "NousResearch/Hermes-2-Pro-Llama-3-8B",
                                        "aaditya/Llama3-OpenBioLLM-8B"]),
    ("004_slerp_gradients.yml", "mistral", ["chihoonlee10/T3Q-DPO-Mistral-7B", "MatthieuJ/ING_2003M2_SLERP"]),
])
def test_seed_config_merges_and_generates(tmp_path, seed_file, family, names):
    dirs = make_family(tmp_path / "models", len(names), seed=7, dtype=torch.bfloat16, family=family, layers=5)
    # tiny models have 5 layers; a 32-layer slice becomes the whole tiny model
    text = repoint((SEEDS / seed_file).read_text(), dict(zip(names, dirs))).replace("[0, 32]", "[0, 5]")
    cfg_path = tmp_path / seed_file
    cfg_path.write_text(text)
    cfg = parse_config(text, str(cfg_path))
    result = run_merge(cfg, tmp_path / "out", MergeOptions(progress=False, random_seed=1))
    out = tmp_path / "out"
    assert (out / "mergekit_config.yml").read_text() == text
    assert result.lock["config_sha256"] == cfg.sha256
    if seed_file.startswith("003"):
        assert any("changes nothing" in w for w in result.warnings)
    generate(out)
