"""Tokenizer handling (merge-semantics.md §4, §5.6): the output vocabulary, the alignment of embeddings and
lm_head rule by rule, `tokens:` overrides, padding, sources, the legacy spellings, chat templates.

Three tiny Llama models with different tokenizers (WordLevel tokenizer.json, made with `tokenizers`):
* A (the base): <unk> <s> </s> w3 .. w63 (64 rows)
* B: A's 64 tokens, then `w_new` (ordinary, id 64), `<|im_start|>` and `<|im_end|>` (added, special) (67 rows)
* C: A's tokens without `w63`; `w_new` takes id 63 (64 rows)
Every expectation below is computed here, independently, from the parents' own rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mergebot.builds.base import MergeOptions
from mergebot.builds.dense import run_merge
from mergebot.config.dense import parse_config
from mergebot.errors import ModelError
from mergebot.tinymodels import llama_config, llama_tensors, load_tensors, save_model
from tests.helpers import SEED_CONFIGS

SPECIAL = ["<unk>", "<s>", "</s>"]
A_TOKENS = SPECIAL + [f"w{i}" for i in range(3, 64)]
B_TOKENS = A_TOKENS + ["w_new"]
B_ADDED = ["<|im_start|>", "<|im_end|>"]
C_TOKENS = A_TOKENS[:63] + ["w_new"]
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TEMPLATE_X = "{% for m in messages %}X {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TEMPLATE_Y = "{% for m in messages %}Y {{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"


def write_tok(directory: Path, tokens: list[str], added: list[str] = (), extra_config: dict | None = None) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 128}
    cfg.update(extra_config or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_model(directory: Path, tokens: list[str], added: list[str], tensors: dict, *, dtype=torch.float32,
               template: str | None = None, layers: int = 2) -> Path:
    cfg = llama_config(vocab=len(tokens) + len(added), layers=layers)
    save_model(directory, cfg, tensors, dtype=dtype)
    write_tok(directory, tokens, added, {"chat_template": template} if template else None)
    return directory


@pytest.fixture(scope="module")
def abc(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab_models")
    base = llama_tensors(llama_config(vocab=64, layers=2), 11)
    g = torch.Generator().manual_seed(12)

    def ft(rows: int) -> dict:
        out = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for k in (EMB, HEAD):
            extra = rows - out[k].shape[0]
            if extra > 0:
                out[k] = torch.cat([out[k], 0.1 * torch.randn(extra, out[k].shape[1], generator=g)])
        return out

    c = ft(64)
    c[EMB][63] = 0.1 * torch.randn(c[EMB].shape[1], generator=g)  # row 63 is w_new in C
    return {
        "A": make_model(root / "A", A_TOKENS, [], base, template=TEMPLATE_X),
        "B": make_model(root / "B", B_TOKENS, B_ADDED, ft(67), template=TEMPLATE_Y),
        "C": make_model(root / "C", C_TOKENS, [], c, template=TEMPLATE_X),
    }


def merge(tmp: Path, text: str, name: str = "out", **opts):
    f = tmp / f"{name}.yml"
    f.write_text(text)
    cfg = parse_config(text, str(f))
    result = run_merge(cfg, tmp / name, MergeOptions(progress=False, **opts))
    return load_tensors(tmp / name), result


def linear3(m: dict[str, Path], extra: str) -> str:
    return (f"merge_method: linear\nbase_model: {m['A']}\nmodels:\n"
            f"  - model: {m['A']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {m['B']}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {m['C']}\n    parameters: {{weight: 0.2}}\n" + extra)


def parents(m: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: load_tensors(v) for k, v in m.items()}


def out_ids(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), atol=2e-6, rtol=0)


def generate(out: Path, text: str = "w5 w6 <|im_start|> w_new") -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert gen.shape[1] == ids.shape[1] + 4


# ------------------------------------------------------------------------------------------------ union

def test_union_rows_follow_the_default_rules(abc, tmp_path):
    got, _ = merge(tmp_path, linear3(abc, "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"))
    out = tmp_path / "out"
    ids = out_ids(out)
    # §4.1: the base's ids, then B's ordinary token, then the added tokens, in walk order
    assert {t: ids[t] for t in ("w63", "w_new", "<|im_start|>", "<|im_end|>")} == \
        {"w63": 63, "w_new": 64, "<|im_start|>": 65, "<|im_end|>": 66}
    assert len(ids) == 67
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72  # 67 padded to a multiple of 8
    assert (out / "generation_config.json").exists()  # kept, unlike mergekit (§4.5): the base ids do not move
    P = parents(abc)
    w = {"A": 0.5, "B": 0.3, "C": 0.2}
    for name in (EMB, HEAD):
        a, b, c = P["A"][name], P["B"][name], P["C"][name]
        assert got[name].shape == (72, a.shape[1])
        # every model has w3..w62: the linear merge of the three own rows
        assert close(got[name][3:63], 0.5 * a[3:63] + 0.3 * b[3:63] + 0.2 * c[3:63])
        # w63: A and B have it, C does not; the base has it -> C takes A's row (rule 3)
        rows = {"A": a[63], "B": b[63], "C": a[63]}
        assert close(got[name][63], sum(w[k] * rows[k] for k in w))
        # w_new: B (64) and C (63) have it, the base does not -> A takes their mean (rule 4)
        rows = {"A": (b[64] + c[63]) / 2, "B": b[64], "C": c[63]}
        assert close(got[name][64], sum(w[k] * rows[k] for k in w))
        # <|im_start|>, <|im_end|>: only B has them -> B's row exactly, in every input (rule 1)
        assert close(got[name][65], b[65]) and close(got[name][66], b[66])
        # padding rows 67..71: each model's mean of its first 67 aligned rows, merged
        aligned = {
            "A": torch.cat([a[:64], ((b[64] + c[63]) / 2)[None], b[65:67]]),
            "B": b[:67],
            "C": torch.cat([c[:63], a[63:64], c[63:64], b[65:67]]),
        }
        pad = sum(w[k] * aligned[k].double().mean(0) for k in w)
        for r in range(67, 72):
            assert close(got[name][r], pad)
    from tokenizers import Tokenizer

    enc = Tokenizer.from_file(str(out / "tokenizer.json")).encode("w5 <|im_start|>w_new<|im_end|> w63")
    assert enc.ids == [5, 65, 64, 66, 63]
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w5 <|im_start|> w_new").input_ids == [5, 65, 64]
    assert tok.convert_ids_to_tokens(66) == "<|im_end|>" and tok.eos_token == "</s>"
    generate(out)


def test_differing_vocabularies_without_a_tokenizer_section_are_an_error(abc, tmp_path):
    with pytest.raises(ModelError, match="tensor size mismatch for model.embed_tokens.weight"):
        merge(tmp_path, linear3(abc, ""))



def _with_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("extra", ["", "tokenizer_source: union\n", "tokenizer_source: base\n"])
def test_vocab_size_that_is_not_the_embedding_rows_is_named(abc, tmp_path, extra):
    """B's config says vocab_size 100 for its 67 embedding rows. The error was "tensor size mismatch ... set
    tokenizer_source", also when tokenizer_source was set: the wrong direction. It now names B's config.json."""
    bad = _with_config(abc["B"], tmp_path / "B_cfg", vocab_size=100)
    with pytest.raises(ModelError, match=rf"^{bad}: config.json: vocab_size is 100, but its model.embed_tokens.weight "
                                         r"has 67 rows"):
        merge(tmp_path, _pair(abc["A"], bad).replace("tokenizer_source: union\n", extra))
    assert not (tmp_path / "out").exists()


def test_vocab_size_smaller_than_the_rows_is_not_merged_silently(abc, tmp_path):
    """A's config says vocab_size 32 for its 64 rows: with tokenizer_source: base the tokenizer was cut to 32 tokens
    and config.json said 32, while the 64-row embeddings were merged unaligned (an output that cannot load)."""
    bad = _with_config(abc["A"], tmp_path / "A_cfg", vocab_size=32)
    other = _with_config(abc["A"], tmp_path / "A2")
    with pytest.raises(ModelError, match=rf"^{bad}: config.json: vocab_size is 32, but its model.embed_tokens.weight"):
        merge(tmp_path, _pair(bad, other).replace("union", "base"))


def test_a_non_donor_vocab_size_off_its_equal_rows_is_a_warning(abc, tmp_path):
    """Without the tokenizer path a non-donor's config.json is not used, and its rows match the donor's: mergekit
    merges it, and so does mergebot, with one warning naming that config.json (the donor's, A's, is right)."""
    sloppy = _with_config(abc["A"], tmp_path / "A_sloppy", vocab_size=32)
    text = _pair(abc["A"], sloppy).replace("tokenizer_source: union\n", "")
    out, result = merge(tmp_path, text)
    assert [w for w in result.warnings if "vocab_size" in w] == [
        f"{sloppy}: config.json: vocab_size is 32, but its model.embed_tokens.weight has 64 rows (a model's vocab_size "
        "must be the row count of its embeddings; its config.json does not describe its weights); merged by its "
        "rows, which match the other models'"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64
    assert out["model.embed_tokens.weight"].shape[0] == 64
    with pytest.raises(ModelError, match=rf"^{sloppy}: config.json: vocab_size is 32"):  # as the donor: refused
        merge(tmp_path, _pair(sloppy, abc["A"]).replace("tokenizer_source: union\n", ""), name="out2")


def test_donor_json_files_that_are_not_json_objects_are_left_out_with_a_warning(abc, tmp_path):
    """A donor's generation_config.json that is a list, a tokenizer_config.json that is not UTF-8 or nested past
    json's limit were copied verbatim and published: an output transformers cannot load. Now each is left out
    with one warning naming it; the donor's good files are still copied byte for byte."""
    import shutil

    bad = tmp_path / "A_bad"
    shutil.copytree(abc["A"], bad)
    (bad / "generation_config.json").write_text("[1, 2]")
    (bad / "tokenizer_config.json").write_bytes(b'{"model_max_length": "\xff"}')
    (bad / "special_tokens_map.json").write_text("[" * 100_000)
    text = _pair(bad, _with_config(abc["A"], tmp_path / "A2")).replace("tokenizer_source: union\n", "")
    _, result = merge(tmp_path, text)
    label = f"tokenizer donor {bad.name}"
    assert [w for w in result.warnings if w.startswith(label)] == [
        f"{label}: tokenizer_config.json is not UTF-8 text; not copied to the output",
        f"{label}: special_tokens_map.json is not valid JSON; not copied to the output",
        f"{label}: generation_config.json is a JSON list, not an object; not copied to the output"]
    out = tmp_path / "out"
    assert not any((out / n).exists() for n in ("generation_config.json", "tokenizer_config.json",
                                                "special_tokens_map.json"))
    assert (out / "tokenizer.json").read_bytes() == (bad / "tokenizer.json").read_bytes()


def test_the_tokenizer_paths_donor_is_named_in_its_file_errors(abc, tmp_path):
    """On the tokenizer path a broken donor tokenizer_config.json said "tokenizer donor: ... is not UTF-8 text",
    naming no model."""
    import shutil

    bad = tmp_path / "A_bad"
    shutil.copytree(abc["A"], bad)
    (bad / "tokenizer_config.json").write_bytes(b'{"x": "\xff"}')
    with pytest.raises(ModelError, match=r"^tokenizer donor A_bad: tokenizer_config.json is not UTF-8 text$"):
        merge(tmp_path, _pair(bad, abc["B"]))


@pytest.mark.parametrize("value", [-5, True, "64", 64.0])
def test_a_donor_vocab_size_that_is_not_a_positive_integer_without_the_tokenizer_path(abc, tmp_path, value):
    """Without the tokenizer path the donor's config.json is the output's: a vocab_size of "64" or true was copied
    into a model that cannot load. A non-donor's is not used, and merges."""
    bad = _with_config(abc["A"], tmp_path / "A_cfg", vocab_size=value)
    good = _with_config(abc["A"], tmp_path / "A2")
    plain = _pair(bad, good).replace("tokenizer_source: union\n", "")
    with pytest.raises(ModelError, match=rf"^{bad}: config.json: vocab_size '{value}' is not a positive integer"):
        merge(tmp_path, plain)
    assert not (tmp_path / "out").exists()
    merge(tmp_path, _pair(good, bad).replace("tokenizer_source: union\n", ""), name="out2")


@pytest.mark.parametrize("value", [-5, 0, True, "64", 64.0])
def test_vocab_size_that_is_not_a_positive_integer_on_the_tokenizer_path(abc, tmp_path, value):
    """vocab_size -5 stripped every token of the base tokenizer: an output with an empty tokenizer and vocab_size 0."""
    bad = _with_config(abc["A"], tmp_path / "A_cfg", vocab_size=value)
    with pytest.raises(ModelError, match=rf"^{bad}: config.json: vocab_size '{value}' is not a positive integer"):
        merge(tmp_path, _pair(bad, abc["B"]))
    assert not (tmp_path / "out").exists()

def test_legacy_union_with_the_same_vocabulary_changes_nothing(tmp_path):
    """Parents sharing one vocabulary: the union is that vocabulary and no row moves."""
    from mergebot.tinymodels import make_family

    base, ft = make_family(tmp_path / "fam", 2, seed=3, layers=2)
    got, _ = merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                             f"  - model: {ft}\n    parameters: {{weight: 1}}\ntokenizer_source: union\n")
    pb, pf = load_tensors(base), load_tensors(ft)
    assert got[EMB].shape == pb[EMB].shape
    assert close(got[EMB], (pb[EMB] + pf[EMB]) / 2)
    assert out_ids(tmp_path / "out") == out_ids(base)


# --------------------------------------------------------------------------------------------- overrides

def test_token_overrides_and_pad_to_multiple_of(abc, tmp_path):
    A, B, C = abc["A"], abc["B"], abc["C"]
    extra = (
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 5\n  tokens:\n"
        f"    w_new:\n      source: {C}\n"
        f"    <|im_start|>:\n      source: {{kind: model_token, model: {A}, token_id: 5}}\n"
        f"    <|im_end|>:\n      source: {{kind: model_token, model: {C}, token: w7}}\n"
        "    w63:\n      source: {kind: zero}\n"
        f"    w10:\n      source: {B}\n      force: true\n"
        "    w11:\n      source: {kind: zero}\n      force: true\n"
        f"    <extra>:\n      source: {{kind: model_token, model: {B}, token_id: 3}}\n"
        "    <nowhere>: {}\n"
    )
    got, result = merge(tmp_path, linear3(abc, extra))
    out = tmp_path / "out"
    ids = out_ids(out)
    assert ids["<extra>"] == 67 and ids["<nowhere>"] == 68  # §4.1 step 4: appended, in config order
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 70  # 69 padded to a multiple of 5
    assert any("<nowhere>" in w and "zero rows" in w for w in result.warnings)
    P = parents(abc)
    w = {"A": 0.5, "B": 0.3, "C": 0.2}

    def expect(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w[k] * rows[k] for k in w)

    for name in (EMB, HEAD):
        a, b, c = P["A"][name], P["B"][name], P["C"][name]
        g = got[name]
        assert g.shape == (70, a.shape[1])
        # a model ref: A lacks w_new and takes C's row for it (not the B/C mean of rule 4)
        assert close(g[64], expect({"A": c[63], "B": b[64], "C": c[63]}))
        # model_token by id: A's original row 5 for A and C (who lack it); B keeps its own
        assert close(g[65], expect({"A": a[5], "B": b[65], "C": a[5]}))
        # model_token by token: C's row of 'w7'
        assert close(g[66], expect({"A": c[7], "B": b[66], "C": c[7]}))
        # zero: C lacks w63 and gets zeros; A and B keep their own (no force)
        assert close(g[63], expect({"A": a[63], "B": b[63], "C": torch.zeros_like(a[63])}))
        # force with a model: every model uses B's w10 row -> B's row
        assert close(g[10], b[10])
        # force with zero: zero everywhere
        assert close(g[11], torch.zeros_like(a[11]))
        # a new token with a model_token source: both-missing -> B's row 3 everywhere
        assert close(g[67], b[3])
        # a new token in no model, no source: zero rows
        assert close(g[68], torch.zeros_like(a[0]))
        # untouched tokens: own rows
        assert close(g[20], expect({"A": a[20], "B": b[20], "C": c[20]}))
        # padding row 69: per-model mean of its 69 aligned rows, merged
        z = torch.zeros_like(a[0])
        aligned = {
            "A": torch.cat([a[:10], b[10:11], z[None], a[12:64], c[63:64], a[5:6], c[7:8], b[3:4], z[None]]),
            "B": torch.cat([b[:10], b[10:11], z[None], b[12:67], b[3:4], z[None]]),
            "C": torch.cat([c[:10], b[10:11], z[None], c[12:63], z[None], c[63:64], a[5:6], c[7:8], b[3:4], z[None]]),
        }
        assert all(v.shape[0] == 69 for v in aligned.values())
        assert close(g[69], sum(w[k] * aligned[k].double().mean(0) for k in w))


def test_token_override_errors(abc, tmp_path):
    A, C = abc["A"], abc["C"]
    # a model ref source that lacks the token (A has no <|im_start|>)
    with pytest.raises(ModelError, match="does not have the token"):
        merge(tmp_path, linear3(abc, f"tokenizer:\n  tokens:\n    <|im_start|>:\n      source: {A}\n"), "e1")
    # a model that is not part of the merge
    with pytest.raises(ModelError, match="not one of the merged models"):
        merge(tmp_path, linear3(abc, "tokenizer:\n  tokens:\n    w_new:\n      source: org/elsewhere\n"), "e2")
    with pytest.raises(ModelError, match="out of range"):
        merge(tmp_path, linear3(abc, "tokenizer:\n  tokens:\n    w_new:\n      source: "
                                     f"{{kind: model_token, model: {C}, token_id: 99}}\n"), "e3")


# ----------------------------------------------------------------------------------------------- sources

def test_source_base_keeps_the_base_vocabulary(abc, tmp_path):
    got, _ = merge(tmp_path, linear3(abc, "tokenizer_source: base\n"))
    out = tmp_path / "out"
    assert out_ids(out) == out_ids(abc["A"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    P = parents(abc)
    for name in (EMB, HEAD):
        a, b, c = P["A"][name], P["B"][name], P["C"][name]
        assert got[name].shape == a.shape  # B's extra rows are dropped
        assert close(got[name][:63], 0.5 * a[:63] + 0.3 * b[:63] + 0.2 * c[:63])
        assert close(got[name][63], 0.5 * a[63] + 0.3 * b[63] + 0.2 * a[63])  # C lacks w63: the base's row
    generate(out, "w5 w6")


def test_base_tokenizer_is_stripped_to_the_config_vocab_size(abc, tmp_path):
    """§4.1 step 1: tokens with id >= the base config's vocab_size are removed."""
    import shutil

    base = tmp_path / "A_big_tok"
    shutil.copytree(abc["A"], base)
    write_tok(base, A_TOKENS + ["w_unused"], ["<|pad_x|>"])  # ids 64, 65: beyond vocab_size 64
    _, result = merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                                  f"  - model: {abc['C']}\n    parameters: {{weight: 1}}\ntokenizer_source: base\n")
    ids = out_ids(tmp_path / "out")
    assert "w_unused" not in ids and "<|pad_x|>" not in ids and len(ids) == 64
    assert any("removed from the base tokenizer" in w for w in result.warnings)


@pytest.mark.parametrize("spelling", ["{B}", "model:{B}"])
def test_source_model_and_legacy_spelling(abc, tmp_path, spelling):
    got, _ = merge(tmp_path, linear3(abc, "tokenizer_source: " + spelling.format(B=abc["B"]) + "\n"))
    out = tmp_path / "out"
    assert out_ids(out) == out_ids(abc["B"])  # that model's tokenizer, unmodified
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 67
    P = parents(abc)
    for name in (EMB, HEAD):
        a, b, c = P["A"][name], P["B"][name], P["C"][name]
        g = got[name]
        assert g.shape == b.shape
        assert close(g[64], 0.5 * (b[64] + c[63]) / 2 + 0.3 * b[64] + 0.2 * c[63])  # w_new: mean for A
        assert close(g[65:67], b[65:67])  # only in B
        assert close(g[63], 0.5 * a[63] + 0.3 * b[63] + 0.2 * a[63])  # w63: C takes the base's row
    generate(out)


def test_tokenizer_section_with_a_model_source(abc, tmp_path):
    got, _ = merge(tmp_path, linear3(abc, f"tokenizer:\n  source: {abc['B']}\n"), "s1")
    ref, _ = merge(tmp_path, linear3(abc, f"tokenizer_source: {abc['B']}\n"), "s2")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------- seed

def test_seed_dare_ties_gradients_with_differing_vocabularies(tmp_path):
    """Seed 001 (filters + gradients + tokenizer_source: union) on two tiny Llamas whose vocabularies differ."""
    base_t = llama_tensors(llama_config(vocab=64, layers=5), 21)
    g = torch.Generator().manual_seed(22)
    other = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base_t.items()}
    for k in (EMB, HEAD):
        other[k] = torch.cat([other[k], 0.1 * torch.randn(3, other[k].shape[1], generator=g)])
    a = make_model(tmp_path / "swallow", A_TOKENS, [], base_t, dtype=torch.bfloat16, layers=5)
    b = make_model(tmp_path / "tulu", B_TOKENS, B_ADDED, other, dtype=torch.bfloat16, layers=5)
    text = (SEED_CONFIGS / "001_dare_ties_gradients.yml").read_text()
    for name, path in {"tokyotech-llm/Swallow-70b-instruct-hf": a, "allenai/tulu-2-dpo-70b": b}.items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", str(path), text)
    assert "tokenizer_source: union" in text
    got, _ = merge(tmp_path, text, random_seed=1)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 67
    pb = load_tensors(b)
    assert got[EMB].shape == (67, 32) and got[EMB].dtype == torch.bfloat16
    # density 1: a token only the fine-tune has is its row in the base's aligned input too, so the task
    # vector is zero there and the output is exactly that row
    assert torch.equal(got[EMB][64:67], pb[EMB][64:67]) and torch.equal(got[HEAD][64:67], pb[HEAD][64:67])
    generate(out)


# ------------------------------------------------------------------------------------------ chat template

def _chat(out: Path) -> str:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_chat_template_builtin_chatml_with_union(abc, tmp_path):
    merge(tmp_path, linear3(abc, "tokenizer_source: union\nchat_template: chatml\n"))
    out = tmp_path / "out"
    assert _chat(out) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_chat_template_literal_without_tokenizer_section(tmp_path):
    from mergebot.tinymodels import make_family

    base, ft = make_family(tmp_path / "fam", 2, seed=4, layers=2)
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
    merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                    f"  - model: {ft}\n    parameters: {{weight: 1}}\nchat_template: \"{literal}\"\n")
    out = tmp_path / "out"
    assert _chat(out) == "[user] hi|"
    assert (out / "chat_template.jinja").read_text() == literal
    assert (out / "generation_config.json").exists()  # kept, unlike mergekit, which re-saves the tokenizer without it


# README "Where mergebot deliberately differs": the built-in names are mergebot's own templates, not mergekit's
# .jinja files (which put a newline after each llama3 turn, indent exaone, and so on)
BUILTIN_PROMPTS = {
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
              "\n\nyo<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] hi [/INST] yo</s>[INST] again [/INST]",
    "exaone": "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]yo[|endofturn|]\n[|user|]again\n[|assistant|]",
    "alpaca": "<s>### Instruction:\nhi\n\n### Response:\nyo</s>\n\n### Instruction:\nagain\n\n### Response:\n",
    "chatml": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
              "<|im_start|>assistant\n",
}


def test_chat_template_builtins_render_mergebots_prompts(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mergebot.tinymodels import make_family

    base, ft = make_family(tmp_path / "fam", 2, seed=4, layers=2)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    for name, want in BUILTIN_PROMPTS.items():
        merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                        f"  - model: {ft}\n    parameters: {{weight: 1}}\nchat_template: {name}\n", name=name)
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want, name


def test_chat_template_auto_picks_the_most_common(abc, tmp_path):
    # A and C have template X, B has Y: X wins (with B first in config order, so order alone would pick Y)
    text = (f"merge_method: linear\nmodels:\n  - model: {abc['B']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {abc['A']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {abc['C']}\n    parameters: {{weight: 1}}\n"
            "tokenizer_source: union\nchat_template: auto\n")
    merge(tmp_path, text)
    assert _chat(tmp_path / "out") == "X user: hi\n"


# ------------------------------------------------------------------------------------------ hostile files

def _edited(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    edit(data)
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def _pair(a: Path, b: Path) -> str:
    return (f"merge_method: linear\nbase_model: {a}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\ntokenizer_source: union\n")


def test_base_tokenizer_with_a_string_id_is_a_one_line_error(abc, tmp_path):
    """The base's tokenizer.json was stripped before the tokenizers library read it: a string id was a TypeError."""
    bad = _edited(abc["A"], tmp_path / "A_bad", lambda d: d["model"]["vocab"].update({"zz": "5"}))
    with pytest.raises(ModelError, match=rf"^{bad}: tokenizer.json cannot be read by the tokenizers library: "
                                         r"invalid type: string \"5\", expected u32"):
        merge(tmp_path, _pair(bad, abc["B"]))
    assert not (tmp_path / "out").exists()


def test_added_token_ids_the_library_moves_are_refused(abc, tmp_path):
    """A duplicate id in B's model.vocab makes the tokenizers library number <|im_start|> 66, not the 65 of the file
    (and of B's embedding rows): <|im_start|> took the row of <|im_end|>, and <|im_end|> was dropped, silently."""
    bad = _edited(abc["B"], tmp_path / "B_dup", lambda d: d["model"]["vocab"].update({"dupe": 5}))
    with pytest.raises(ModelError, match=rf"^{bad}: tokenizer.json added_tokens: '<\|im_start\|>' has id 65, but the "
                                         r"tokenizers library reads it as id 66"):
        merge(tmp_path, _pair(abc["A"], bad))
    assert not (tmp_path / "out").exists()


def _copy_with(src: Path, dst: Path, name: str, text: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / name).write_text(text)
    return dst


@pytest.mark.parametrize("extra", ["", "chat_template: chatml\n"])
def test_donor_tokenizer_config_nested_too_deep_is_no_traceback(abc, tmp_path, extra):
    """A donor tokenizer_config.json of 100,000 nested `[` is copied as is; reading the copy back (auto_map removal,
    then the chat template) raised RecursionError: a traceback after the merge, and no output."""
    deep = _copy_with(abc["A"], tmp_path / "A_deep", "tokenizer_config.json", "[" * 100_000 + "]" * 100_000)
    merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {deep}\n    parameters: {{weight: 1}}\n" + extra)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_chat_template_list_with_unhashable_names_is_skipped(abc, tmp_path):
    """`chat_template: auto` reads each parent's list of named templates; a `name` that is a list or an object
    (not hashable) raised TypeError, a traceback. Such entries are now skipped like any malformed entry."""
    cfg = json.loads((abc["A"] / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": ["default"], "template": TEMPLATE_Y}, {"name": {"a": 1}, "template": "x"},
                            {"name": "default", "template": TEMPLATE_X}]
    odd = _copy_with(abc["A"], tmp_path / "A_odd", "tokenizer_config.json", json.dumps(cfg))
    merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {odd}\n    parameters: {{weight: 1}}\n"
                    "chat_template: auto\n")
    assert _chat(tmp_path / "out") == "X user: hi\n"


@pytest.mark.parametrize("text, reason", [("[" * 100_000 + "]" * 100_000, "is not valid JSON: maximum recursion depth"),
                                          ("[1]", "is a JSON list, not an object")])
def test_base_tokenizer_json_that_is_not_an_object_is_named(abc, tmp_path, text, reason):
    """A base tokenizer.json nested 100,000 deep (or a list) was read as absent: "needs the base model's
    tokenizer.json, and ... has none", about a file that is there. Another parent's falls back with a warning."""
    bad = _copy_with(abc["A"], tmp_path / "A_bad", "tokenizer.json", text)
    with pytest.raises(ModelError, match=rf"^{bad}: tokenizer.json {re.escape(reason)}"):
        merge(tmp_path, _pair(bad, abc["B"]))
    other = _copy_with(abc["A"], tmp_path / "A_other", "tokenizer.json", text)
    _, result = merge(tmp_path, _pair(abc["A"], other), name="out2")
    assert any(w.startswith(f"{other}: tokenizer.json {reason}") and "assuming it has the base model's vocabulary" in w
               for w in result.plan.warnings), result.plan.warnings
