"""Hostile config files (issue 12): any bytes give a config or exactly one error line naming the file.

Through the real CLI: `mergebot validate` and `mergebot merge` on deep nesting, huge numbers, NUL and control
characters, invalid UTF-8, a 50 MB file, alias bombs, non-finite and cancelling weights, out-of-range parameters
and binary junk exit 1 with one stderr line and write nothing. A hypothesis fuzz test then mutates the valid
corpus (byte edits, random YAML structure, random values at random key paths) and checks the loaders in process
(many examples) and the CLI (a few). Runs in well under a minute: the CLI is a subprocess that imports torch.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergebot.config import configfile
from mergebot.config import dense as config
from mergebot.config.yamlsafe import MAX_BYTES
from mergebot.errors import ConfigError, MergebotError
from mergebot.hub.parents import front_matter
from tests.helpers import CORPUS, SEED_CONFIGS, run_cli

LINEAR = "merge_method: linear\nmodels:\n  - model: org/a\n    parameters: {{weight: {a}}}\n" \
         "  - model: org/b\n    parameters: {{weight: {b}}}\n"


def _laughs() -> bytes:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return ("\n".join(lines) + "\nmerge_method: linear\n").encode()


def _merge_key_bomb() -> bytes:
    """Each map merges the previous one twice: PyYAML's own flattening doubles a list per level."""
    text = "m0: &m0 {a: 1}\n" + "".join(f"m{k}: &m{k}\n  <<: [*m{k - 1}, *m{k - 1}]\n  k{k}: 1\n" for k in range(1, 60))
    return text.encode()


# (id, file bytes (or a function making them), fragments the one error line must hold, also run `merge`).
# Every case is validated; the list is merged too (a CLI run costs seconds of torch import, and merge
# reads configs with the very same loader: the test checks its line is validate's).
CASES: list[tuple[str, bytes | Callable[[], bytes], list[str], bool]] = [
    ("deep lists", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", ["(line 1)", "nested more than 100 levels"], True),
    ("deep maps", b"{a: " * 5000 + b"1" + b"}" * 5000 + b"\n", ["nested more than 100 levels"], False),
    ("deep block lists", b"merge_method: linear\nmodels:\n  " + b"- " * 5000 + b"x\n",
     ["(line 3)", "nested more than 100 levels"], False),
    ("5000-digit int", LINEAR.format(a="9" * 5000, b=1).encode(),
     ["models[0].parameters.weight (line 4)", "too large"], True),
    ("huge hex int", LINEAR.format(a="0x" + "f" * 20000, b=1).encode(), ["models[0].parameters.weight", "too large"],
     False),
    ("NUL", b"merge_method: linear\x00\nmodels: []\n", ["(line 1)", "NUL byte", "column 21"], True),
    ("control character", b"merge_method: linear\nmodels:\n  - model: org/\x1ba\n", ["(line 3)", "U+001B"], False),
    ("C1 control character", "merge_method: linear\u0085\u0090\n".encode(), ["(line 1)", "U+0090"], False),
    ("invalid UTF-8", b"merge_method: linear\nmodels:\n  - model: org/\xc3\x28a\n", ["(line 3)", "not UTF-8"], True),
    ("UTF-16", "merge_method: linear\n".encode("utf-16"), ["UTF-16"], False),
    ("50 MB", lambda: b"# " + b"x" * (50 << 20) + b"\nmerge_method: linear\n", [f"at most {MAX_BYTES:,} bytes"],
     True),
    ("alias bomb", _laughs(), ["alias bomb"], True),
    ("merge-key bomb", _merge_key_bomb(), ["alias bomb"], False),
    ("recursive alias", b"a: &a [*a]\n", ["recursive alias"], False),
    ("bad !!int", b"merge_method: !!int abc\n", ["merge_method (line 1)", "ValueError"], False),
    ("unknown tag", b"merge_method: !!python/object:os.system ls\n", ["(line 1)", "YAML error"], False),
    (".nan weight", LINEAR.format(a=".nan", b=1).encode(), ["models[0].parameters.weight (line 4)", "finite"], True),
    (".inf weight in a gradient", LINEAR.format(a="[0.5, -.inf]", b=1).encode(),
     ["models[0].parameters.weight[1] (line 4)", "finite"], False),
    ("absurd weight", LINEAR.format(a="1.0e300", b=1).encode(), ["models[0].parameters.weight", "out of range"],
     False),
    ("zero-sum weights under normalize", LINEAR.format(a=0.5, b=-0.5).encode(),
     ["models[0].parameters.weight (line 4)", "sum to 0", "normalize"], True),
    ("zero-sum gradient at the last layer", LINEAR.format(a="[1, 0.25]", b="[0.5, -0.25]").encode(),
     ["sum to 0", "t = 1"], False),
    ("della epsilon out of range", b"merge_method: della\nbase_model: org/base\nparameters: {epsilon: 0.3}\n"
     b"models:\n  - model: org/a\n    parameters: {weight: 1, density: 0.2}\n",
     ["models[0].parameters.density (line 6)", "epsilon 0.3 does not fit density 0.2"], True),
    ("tokenizer_source: unoin", (LINEAR.format(a=1, b=1) + "tokenizer_source: unoin\n").encode(),
     ["tokenizer_source (line 7)", "did you mean 'union'?"], True),
    ("tokenizer.source elsewhere", (LINEAR.format(a=1, b=1) + "tokenizer:\n  source: org/c\n").encode(),
     ["tokenizer.source (line 8)", "nor one of this config's models"], False),
    ("pad_to_multiple_of: 1e12", (LINEAR.format(a=1, b=1) + "tokenizer:\n  pad_to_multiple_of: 1e12\n").encode(),
     ["tokenizer.pad_to_multiple_of (line 8)", "positive integer"], True),
    ("pad_to_multiple_of 10^12", (LINEAR.format(a=1, b=1) + "tokenizer:\n  pad_to_multiple_of: 1000000000000\n")
     .encode(), ["tokenizer.pad_to_multiple_of (line 8)", "too large"], False),
    ("tokenizer.tokens null key", (LINEAR.format(a=1, b=1) + "tokenizer:\n  tokens:\n    ~: {}\n").encode(),
     ["tokenizer.tokens.None (line 9)", "expected a token string as the key, got None"], False),
    ("tokenizer.tokens empty key", (LINEAR.format(a=1, b=1) + "tokenizer:\n  tokens:\n    '': {}\n").encode(),
     ["tokenizer.tokens.'' (line 9)", "expected a token string as the key, got ''"], False),
    ("huge layer_range", b"merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n"
     b"        layer_range: [0, 1000000000000000000000000000000]\n", ["layer_range[1] (line 5)", "too large"], True),
    ("layer_range beyond any model", b"merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n"
     b"        layer_range: [0, 1000000]\n", ["layer_range (line 5)", "out of bounds"], False),
    ("karcher max_iter", b"merge_method: karcher\nparameters: {max_iter: 100000000}\nmodels: [org/a, org/b]\n",
     ["parameters.max_iter (line 2)", "within [0, 1000]"], False),
    ("gradient too long", LINEAR.format(a="[" + ", ".join(["0.5"] * 2000) + "]", b=1).encode(),
     ["models[0].parameters.weight", "at most 1024"], False),
    ("MoE experts_per_token", b"base_model: org/a\ngate_mode: random\nexperts_per_token: 1000000\n"
     b"experts:\n  - source_model: org/b\n  - source_model: org/c\n", ["experts_per_token (line 3)"], False),
    ("MoE .inf noise", b"base_model: org/a\ngate_mode: random\nexperts:\n  - source_model: org/b\n"
     b"    noise_scale: .inf\n", ["experts[0].noise_scale (line 5)", "finite"], False),
    ("MoE tokenizer typo", b"base_model: org/a\ngate_mode: random\ntokenizer_source: bsae\nexperts:\n"
     b"  - source_model: org/b\n  - source_model: org/c\n", ["tokenizer_source (line 3)", "did you mean 'base'?"],
     False),
    ("multi: deep second document", b"name: one\n" + LINEAR.format(a=1, b=1).encode() + b"---\na: "
     + b"[" * 3000 + b"]" * 3000 + b"\n", ["(line 9)", "nested more than 100 levels"], False),
    ("multi: .nan in a stage", LINEAR.format(a=1, b=1).encode() + b"name: one\n---\n"
     + LINEAR.format(a=1, b=".nan").replace("org/a", "one").encode(),
     ["models[1].parameters.weight (line 14)", "finite"], False),
    ("multi: name escapes", b"name: ../../x\n" + LINEAR.format(a=1, b=1).encode() + b"---\n"
     + LINEAR.format(a=1, b=1).replace("org/a", "../../x").encode(), ["name (line 1)", "not a plain name"], False),
    ("model name with a newline", b'merge_method: linear\nmodels:\n  - model: "org/a\\nb"\n',
     ["models[0].model (line 3)", "non-printing"], False),
    ("a list at top level", b"- merge_method: linear\n- models: []\n", ["(line 1)", "YAML mapping", "list"], True),
    ("empty file", b"", ["empty config"], True),
    ("only a comment", b"# nothing here\n", ["empty config"], False),
    ("binary garbage", random.Random(12).randbytes(4096), [], True),
    ("binary garbage that is UTF-8", bytes(random.Random(7).choices(range(32, 127), k=3000)) + b"\n:\n- [\n", [],
     False),
]


def _write(tmp: Path, i: int, data: bytes | Callable[[], bytes]) -> Path:
    path = tmp / f"case{i:02d}.yml"
    path.write_bytes(data() if callable(data) else data)
    return path


def _one_error_line(stderr: str, start: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: {start}"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Any]:
    """Every case validated in one CLI run (each file gets its own line), and merged one CLI run per case."""
    tmp = tmp_path_factory.mktemp("hostile")
    paths = [_write(tmp, i, data) for i, (_, data, _, _) in enumerate(CASES)]
    fifo = tmp / "fifo.yml"
    os.mkfifo(fifo)
    validate = run_cli("validate", *map(str, paths), str(fifo), str(tmp))

    def merge(i: int) -> subprocess.CompletedProcess:
        return run_cli("merge", str(paths[i]), str(tmp / f"out{i:02d}"), "--quiet")

    wanted = [i for i, case in enumerate(CASES) if case[3]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        merges = dict(zip(wanted, pool.map(merge, wanted)))
    return {"tmp": tmp, "paths": paths, "validate": validate, "merges": merges, "fifo": fifo}


def test_validate_gives_one_line_per_hostile_file(hostile):
    res = hostile["validate"]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    targets = hostile["paths"] + [hostile["fifo"], hostile["tmp"]]
    assert len(lines) == len(targets), res.stderr[-3000:]
    for line, path in zip(lines, targets):
        assert line.startswith(f"error: {path}"), (line, path)
    assert "not a regular file" in lines[-2] and "is a directory" in lines[-1]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_hostile_config_is_one_line(hostile, i):
    _, _, fragments, merged = CASES[i]
    path = hostile["paths"][i]
    line = next(ln for ln in hostile["validate"].stderr.splitlines() if ln.startswith(f"error: {path}"))
    for frag in fragments:
        assert frag in line, (frag, line)
    assert len(line) < 1000, line
    if merged:
        res = hostile["merges"][i]
        assert res.returncode in (1, 2), (res.returncode, res.stderr[-3000:])
        assert _one_error_line(res.stderr, str(path)) == line  # merge reads configs with the same loader
        out = hostile["tmp"] / f"out{i:02d}"
        assert not out.exists()
        assert not [p for p in hostile["tmp"].iterdir() if p.name.startswith(f".{out.name}")]


def test_validate_never_echoes_a_file_name_raw(tmp_path):
    """`mergebot validate merges/*.yml` is a pull-request check: a file name a contributor chose (git allows
    newlines and escape characters in them) must not start a workflow command or an ANSI sequence in the log."""
    good = tmp_path / "ok\n::error::pwned\x1b[2J.yml"
    good.write_text(LINEAR.format(a=1, b=1))
    bad = tmp_path / "bad\r\n::warning::pwned2.yml"
    bad.write_text("merge_method: bogus\n")
    res = run_cli("validate", str(good), str(bad))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    out, err = res.stdout.splitlines(), res.stderr.splitlines()
    assert out == [f"ok: {tmp_path}/ok\\n::error::pwned\\x1b[2J.yml: linear, 2 model(s)"]
    assert err == [f"error: {tmp_path}/bad\\r\\n::warning::pwned2.yml: merge_method (line 1): unknown merge method "
                   + err[0].split("unknown merge method ", 1)[1]]
    assert "\x1b" not in res.stdout + res.stderr and "\r" not in res.stdout + res.stderr


def test_valid_corpus_still_loads():
    files = sorted(CORPUS.glob("*.yml")) + sorted(SEED_CONFIGS.glob("*.yml"))
    assert len(files) >= 15
    for f in files:
        configfile.load(f)


def test_yaml_merge_keys_still_work_and_explicit_keys_win(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text("common: &c {weight: 0.5, density: 0.5}\nmerge_method: ties\nbase_model: org/base\nmodels:\n"
                 "  - model: org/a\n    parameters:\n      <<: *c\n  - model: org/b\n    parameters:\n"
                 "      <<: *c\n      weight: 0.25\n")
    cfg = configfile.load(f)
    assert [s.parameters for s in cfg.slices[0].sources] == [{"weight": 0.5, "density": 0.5},
                                                             {"weight": 0.25, "density": 0.5}]


def test_hostile_parent_card_is_no_metadata():
    assert front_matter("---\nlicense: mit\nlicense: apache-2.0\n---\n", "p") == {"license": "apache-2.0"}
    bomb = _laughs().decode().replace("merge_method: linear\n", "")
    for text in ("---\n" + bomb + "---\n", "---\n" + "[" * 5000 + "\n---\n", "---\nlicense: \x00\n---\n",
                 "---\n- a list\n---\n", "---\nlicense: [mit\n---\n", "---\nlicense: mit\n"):
        assert front_matter(text, "p") == {}, text[:40]


# ------------------------------------------------------------------------------------------------- fuzzing

SEEDS = [f.read_bytes() for f in sorted(CORPUS.glob("*.yml")) + sorted(SEED_CONFIGS.glob("*.yml"))]
SINGLE = [yaml.safe_load(s) for s in SEEDS if b"\n---" not in s]
TOKENS = [b"\x00", b"\xff", b"\xc3", b"\t", b"\n", b"\r", b"---\n", b"&x ", b"*x", b"<<: *x\n", b"[", b"]", b"{", b"}",
          b": ", b"- ", b"? ", b"!!int ", b"!!float ", b"!!binary ", b"!!set ", b"!x ", b".nan", b"-.inf", b"'", b'"',
          b"#", b"|", b"%YAML 1.1\n", b"\xef\xbb\xbf", b"9" * 60, b"0x" + b"f" * 40, b"1e400", b"1:2:3",
          b"2001-13-40", b"\x1b", b"\xe2\x80\xa8", b"  ", b"null", b"~"]
RANDOM = os.environ.get("MERGEBOT_FUZZ_RANDOM") is not None  # CI runs the same examples every time

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                    st.sampled_from(["union", "base", "linear", "ties", "della", "org/a", "mlp", "*", "", "1e-5"]))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                                                                      kids, max_size=4)), max_leaves=24)


@st.composite
def byte_edits(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        chunk = draw(st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=6)))
        if op == "insert":
            data[pos:pos] = chunk
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        elif op == "replace":
            data[pos:pos + len(chunk)] = chunk
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 30))] * draw(st.integers(2, 50))
    return bytes(data)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def value_edits(draw) -> bytes:
    """A valid config with a random value put at a random key path (or under a new key there)."""
    doc = draw(st.sampled_from(SINGLE))
    doc = yaml.safe_load(yaml.safe_dump(doc))  # a private copy
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        new = draw(values)
        if not path:
            doc = new
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if isinstance(parent, dict) and draw(st.booleans()):
            parent[draw(st.sampled_from(["parameters", "weight", "density", "epsilon", "t", "layer_range",
                                         "tokenizer", "pad_to_multiple_of", "experts", "name", "x"]))] = new
        else:
            parent[path[-1]] = new
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode()


structures = values.map(lambda v: yaml.safe_dump(v).encode())
any_config = st.one_of(byte_edits(), value_edits(), structures)


def _check_total(path: Path) -> None:
    """Both loaders: a config, or a MergebotError whose text is one line naming the file (never a bug's)."""
    for load in (configfile.load, config.load_config):
        try:
            load(path)
        except MergebotError as e:
            msg = str(e)
            assert msg and len(msg.splitlines()) == 1 and len(msg) < 2000, msg[:3000]
            assert "internal error" not in msg, msg
            if isinstance(e, ConfigError):
                assert msg.startswith(str(path)), msg


FUZZ = dict(deadline=None, database=None, derandomize=not RANDOM, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@settings(max_examples=2000 if RANDOM else 600, **FUZZ)
@given(data=any_config)
def test_fuzz_loaders_are_total(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yml"
        path.write_bytes(data)
        _check_total(path)


@settings(max_examples=1, **FUZZ)
@given(batch=st.lists(any_config, min_size=6, max_size=6))
def test_fuzz_cli_exits_cleanly(batch):
    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / f"f{i}.yml" for i in range(len(batch))]
        for p, data in zip(paths, batch):
            p.write_bytes(data)
        res = run_cli("validate", *map(str, paths))
        assert res.returncode in (0, 1, 2) and "Traceback" not in res.stderr, res.stderr[-3000:]
        errors = [ln for ln in res.stderr.splitlines() if not ln.startswith("warning: ")]
        ok = [ln for ln in res.stdout.splitlines() if ln.startswith("ok: ")]
        assert len(errors) + len(ok) == len(paths), (res.stdout[-2000:], res.stderr[-2000:])
        for p in paths:  # each file: one "ok" line or one "error" line, never more
            assert sum(ln.startswith(f"error: {p}") for ln in errors) + sum(ln.startswith(f"ok: {p}") for ln in ok) == 1
        assert res.returncode == (1 if errors else 0)


def test_zero_weight_sum_behind_a_filter_is_refused_before_writing(family, tmp_path):
    """Validate cannot know a filtered weight; the planner refuses the tensors it hits (no inf/NaN written)."""
    _, a, b, _ = family
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n"
            "    parameters:\n      weight: [{filter: mlp, value: -1}, {value: 1}]\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    assert configfile.load(cfg).method_name == "linear"  # valid language
    res = run_cli("merge", str(cfg), str(tmp_path / "out"), "--quiet")
    assert res.returncode == 1
    line = _one_error_line(res.stderr, "linear")
    assert "mlp" in line and "sum to 0" in line, line
    assert not (tmp_path / "out").exists()
