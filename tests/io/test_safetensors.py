"""Hostile parent files: every malformed safetensors header, escaping shard index and non-dict `.bin` is one
error line naming the file and the reason, through the CLI and the loader, and nothing is written.

The validator must be at least as strict as the reference (the Rust `safetensors` crate behind the
`safetensors` package): the fuzz test checks that whatever the loader accepts, the reference accepts too and
both read the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load
from safetensors.torch import save as reference_save

from mergebot.cli.main import main
from mergebot.errors import MergebotError, ModelError
from mergebot.io.safetensors import ST_DTYPES, read_safetensors_header
from mergebot.io.weights import ModelWeights
from tests.helpers import run_cli

ST = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- file surgery

def split(path: Path) -> tuple[dict, bytes]:
    """(header as parsed, data section) of a valid safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict | bytes, data: bytes, n: int | None = None) -> bytes:
    """A file from a header (dict or raw bytes), the data, and optionally a lying length prefix."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def edit(path: Path, fn: Callable[[dict], None]) -> None:
    header, data = split(path)
    fn(header)
    path.write_bytes(join(header, data))


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def nth(header: dict, i: int) -> dict:
    """The entry of the i-th tensor in file order."""
    return header[by_offset(header)[i]]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ the hostile cases
# Each case damages a copy of a valid tiny model and returns (the file the error must name, reason regex).

def span_smaller_than_shape(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        nth(h, 0)["shape"][0] += 1
    edit(d / ST, fn)
    return ST, r"span \d+ bytes, but F32 \[\d+, \d+\] takes \d+"


def overlapping_offsets(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        names = by_offset(h)
        size = {k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0] for k in names}
        first = next(a for a in names if any(size[b] == size[a] for b in names if b != a))
        later = next(b for b in names[names.index(first) + 1:] if size[b] == size[first])
        h[later]["data_offsets"] = list(h[first]["data_offsets"])
    edit(d / ST, fn)
    return ST, r"overlaps tensor"


def gap_between_tensors(d: Path) -> tuple[str, str]:
    header, data = split(d / ST)
    names = by_offset(header)
    cut = header[names[0]]["data_offsets"][1]
    for k in names[1:]:
        header[k]["data_offsets"] = [o + 4 for o in header[k]["data_offsets"]]
    (d / ST).write_bytes(join(header, data[:cut] + b"\0" * 4 + data[cut:]))
    return ST, r"bytes \d+\.\.\d+ of the data, before tensor .* belong to no tensor"


def wrong_dtype_for_size(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        nth(h, 1)["dtype"] = "F16"
    edit(d / ST, fn)
    return ST, r"span \d+ bytes, but F16 .* takes"


def negative_offsets(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        nth(h, 0)["data_offsets"][0] = -8
    edit(d / ST, fn)
    return ST, r"data_offsets \[-8, \d+\] is not \[begin, end\] of non-negative integers"


def begin_after_end(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        nth(h, 1)["data_offsets"].reverse()
    edit(d / ST, fn)
    return ST, r"begin after they end"


def end_past_file(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        nth(h, -1)["data_offsets"][1] += 4
    edit(d / ST, fn)
    return ST, r"run past the end of the file"


def truncated_file(d: Path) -> tuple[str, str]:
    raw = (d / ST).read_bytes()
    (d / ST).write_bytes(raw[:-100])
    return ST, r"run past the end of the file"


def header_length_past_file(d: Path) -> tuple[str, str]:
    raw = (d / ST).read_bytes()
    (d / ST).write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return ST, r"header length \d+ runs past the end of the file"


def list_header(d: Path) -> tuple[str, str]:
    (d / ST).write_bytes(join(b"[1, 2, 3]", b""))
    return ST, r"not a JSON object"


def missing_data_offsets(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        del nth(h, 0)["data_offsets"]
    edit(d / ST, fn)
    return ST, r"missing data_offsets"


def _shape(value: list) -> Callable[[Path], tuple[str, str]]:
    def case(d: Path) -> tuple[str, str]:
        def fn(h: dict) -> None:
            nth(h, 0)["shape"] = value
        edit(d / ST, fn)
        return ST, r"shape .*(not a list of non-negative integers|too many elements)"
    return case


def unknown_dtype(d: Path) -> tuple[str, str]:
    def fn(h: dict) -> None:
        nth(h, 0)["dtype"] = "F33"
    edit(d / ST, fn)
    return ST, r"unknown or unsupported dtype 'F33'"


def duplicate_keys(d: Path) -> tuple[str, str]:
    header, data = split(d / ST)
    name = by_offset(header)[0]
    text = json.dumps(header)
    entry = f'"{name}": {json.dumps(header[name])}'
    assert entry in text
    (d / ST).write_bytes(join(text.replace(entry, f"{entry}, {entry}").encode(), data))
    return ST, r"duplicate key"


def non_utf8_header(d: Path) -> tuple[str, str]:
    header, data = split(d / ST)
    text = json.dumps(header).encode()
    i = text.index(by_offset(header)[0].encode())
    (d / ST).write_bytes(join(text[:i] + b"\xff" + text[i + 1:], data))
    return ST, r"not UTF-8"


def index_parent_dir(d: Path) -> tuple[str, str]:
    edit_index(d, "../x.safetensors")
    return INDEX, r"'\.\./x\.safetensors', not a plain relative file name"


def index_absolute(d: Path) -> tuple[str, str]:
    edit_index(d, "/etc/passwd")
    return INDEX, r"'/etc/passwd', not a plain relative file name"


def edit_index(d: Path, file: str) -> None:
    index = json.loads((d / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = file
    (d / INDEX).write_text(json.dumps(index))


def symlink_shard_outside(d: Path) -> tuple[str, str]:
    shard = json.loads((d / INDEX).read_text())["weight_map"]
    shard = sorted(set(shard.values()))[0]
    outside = d.parent / f"{d.name}-outside.safetensors"
    (d / shard).rename(outside)
    os.symlink(outside, d / shard)
    return shard, r"points outside the model directory"


def _bin(obj: Any, reason: str) -> Callable[[Path], tuple[str, str]]:
    def case(d: Path) -> tuple[str, str]:
        (d / ST).unlink()
        torch.save(obj, d / "pytorch_model.bin")
        return "pytorch_model.bin", reason
    return case


ZEROS = torch.zeros(2)
HEADER_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "span_smaller_than_shape": span_smaller_than_shape,
    "overlapping_offsets": overlapping_offsets,
    "gap_between_tensors": gap_between_tensors,
    "wrong_dtype_for_size": wrong_dtype_for_size,
    "negative_offsets": negative_offsets,
    "begin_after_end": begin_after_end,
    "end_past_file": end_past_file,
    "truncated_file": truncated_file,
    "header_length_past_file": header_length_past_file,
    "list_header": list_header,
    "missing_data_offsets": missing_data_offsets,
    "negative_shape": _shape([-1, 32]),
    "huge_shape": _shape([2**40, 2**40]),
    "bool_shape": _shape([True, 32]),
    "float_shape": _shape([64.0, 32]),
    "unknown_dtype": unknown_dtype,
    "duplicate_keys": duplicate_keys,
    "non_utf8_header": non_utf8_header,
    "bin_list": _bin([ZEROS, ZEROS], r"the pickle holds type list, not a dict"),
    "bin_nested_dict": _bin({"model.embed_tokens.weight": {"inner": ZEROS}}, r"holds type dict, not a tensor"),
    "bin_int": _bin(7, r"the pickle holds type int, not a dict"),
}
SHARDED_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "index_parent_dir": index_parent_dir,
    "index_absolute": index_absolute,
    "symlink_shard_outside": symlink_shard_outside,
}
ALL_CASES = {**HEADER_CASES, **SHARDED_CASES}


def hostile_model(case: str, family: list[Path], family_bf16: list[Path], tmp: Path) -> tuple[Path, Path, str, str]:
    """(damaged model directory, its valid partner, file the error must name, reason regex)."""
    fam = family_bf16 if case in SHARDED_CASES else family
    d = copy_model(fam[1], tmp / "models" / "bad")
    file, reason = ALL_CASES[case](d)
    return d, fam[0], file, reason


def merge_config(tmp: Path, base: Path, other: Path | str) -> Path:
    cfg = tmp / "merge.yml"
    cfg.write_text(f"models:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {other}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n")
    return cfg


def assert_refused(rc: int, stderr: str, out: Path, file: str, reason: str) -> None:
    """Exit 1, one error line naming the file and the reason, no traceback, nothing written."""
    lines = stderr.splitlines()
    assert rc == 1, stderr
    assert len(lines) == 1 and lines[0].strip(), stderr
    assert "Traceback" not in stderr
    assert file in lines[0] and re.search(reason, lines[0]), lines[0]
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


# -------------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", list(ALL_CASES))
def test_hostile_file_is_one_error_line_and_nothing_written(case, family, family_bf16, tmp_path, capsys):
    """Every case in-process, through the CLI entry point and through the loader."""
    d, base, file, reason = hostile_model(case, family, family_bf16, tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["merge", str(merge_config(tmp_path, base, d)), str(out), "--quiet"])
    assert_refused(rc, capsys.readouterr().err, out, file, reason)
    with pytest.raises(ModelError) as e:
        ModelWeights(d, "bad")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad: ") and file in msg and re.search(reason, msg), msg
    assert "-outside" not in msg  # never where a symlink points


# one per kind of check (a subprocess costs ~3 s of torch import; every case runs in-process above)
CLI_CASES = ["overlapping_offsets", "duplicate_keys", "index_parent_dir", "symlink_shard_outside", "bin_nested_dict"]


def test_hostile_files_through_the_real_cli(family, family_bf16, tmp_path):
    """A subprocess per case (python -m mergebot.cli.main): the exit code and stderr users see; two at a time."""
    jobs = []
    for case in CLI_CASES:
        root = tmp_path / case
        root.mkdir()
        d, base, file, reason = hostile_model(case, family, family_bf16, root)
        jobs.append((root / "out", merge_config(root, base, d), file, reason))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: run_cli("merge", str(j[1]), str(j[0]), "--quiet"), jobs))
    for (out, _, file, reason), r in zip(jobs, results):
        assert_refused(r.returncode, r.stderr, out, file, reason)


@pytest.mark.parametrize("fam", ["family", "family_bf16"])
def test_valid_models_still_merge(fam, request, tmp_path, capsys):
    models = request.getfixturevalue(fam)
    out = tmp_path / "out"
    assert main(["merge", str(merge_config(tmp_path, models[0], models[1])), str(out), "--quiet"]) == 0
    merged = ModelWeights(out, "out")
    a, b = ModelWeights(models[0], "a"), ModelWeights(models[1], "b")
    assert set(merged.tensors) == set(a.tensors)
    k = "model.embed_tokens.weight"
    want = (0.5 * a.get(k).double() + 0.5 * b.get(k).double()).to(a.get(k).dtype)
    assert torch.allclose(merged.get(k).double(), want.double(), atol=1e-2)


def _upload(hub, repo_id: str, directory: Path, replace: dict[str, bytes] | None = None) -> None:
    hub.server.create_repo(repo_id)
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    hub.server.commit(repo_id, {**files, **(replace or {})}, message="upload")


def test_hub_headers_of_a_dry_run_go_through_the_same_validator(hub, family, family_bf16, tmp_path, capsys):
    """--dry-run reads Hub headers by HTTP range requests: the same checks, the same one line."""
    base, a = family[0], family[1]
    header, data = split(a / ST)
    names = by_offset(header)
    cut = header[names[0]]["data_offsets"][1]
    for k in names[1:]:
        header[k]["data_offsets"] = [o + 4 for o in header[k]["data_offsets"]]
    _upload(hub, f"{hub.org}/gap", a, {ST: join(header, data[:cut] + bytes(4) + data[cut:])})
    index = json.loads((family_bf16[1] / INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../x.safetensors"
    _upload(hub, f"{hub.org}/escape", family_bf16[1], {INDEX: json.dumps(index).encode()})
    header, data = split(a / ST)
    padded = json.dumps(header).encode() + b" " * 150_000  # past the first range request: a second one
    _upload(hub, f"{hub.org}/padded", a, {ST: join(padded, data)})
    for repo, file, reason in [("gap", ST, r"invalid safetensors header: bytes \d+\.\.\d+ of the data"),
                               ("escape", INDEX, r"invalid index: .*'\.\./x\.safetensors', not a plain relative"),
                               ("padded", None, None)]:
        out = tmp_path / f"out-{repo}"
        cfg = merge_config(tmp_path, base, f"{hub.org}/{repo}")
        capsys.readouterr()
        rc = main(["merge", str(cfg), str(out), "--dry-run", "--quiet"])
        # huggingface_hub's own "Fetching N files" bars (config and tokenizer downloads) ignore --quiet: not ours
        err = "".join(ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines(keepends=True)
                      if ln.strip() and not ln.startswith("Fetching "))
        if file is None:
            assert rc == 0, err
            continue
        assert_refused(rc, err, out, file, reason)
        assert err.startswith(f"error: {hub.org}/{repo}: {file}: ")
    gets = [r for r in hub.server.file_gets(repo=f"{hub.org}/padded") if r[1] != 302]  # 302: to storage
    assert len(gets) == 2 and all(status == 206 for _, status, _ in gets), gets  # header only, in two ranges
    assert not list(hub.home.rglob("*.safetensors")), "a dry run downloads no tensor data"


def test_symlinked_shard_inside_the_directory_is_fine(family_bf16, tmp_path):
    """Confinement is about where a file really lies: a symlink to a file inside the model directory (as in
    Hugging Face cache snapshots) is read."""
    d = copy_model(family_bf16[0], tmp_path / "m")
    shard = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))[0]
    (d / "blobs").mkdir()
    (d / shard).rename(d / "blobs" / "x")
    os.symlink(Path("blobs") / "x", d / shard)
    w, ref = ModelWeights(d, "m"), ModelWeights(family_bf16[0], "ref")
    assert all(torch.equal(w.get(k), ref.get(k)) for k in ref.tensors)


EDGE_CASES = {
    "shorter_than_prefix": (b"\x01\x02\x03", r"fewer than the 8-byte header length"),
    "header_length_zero": (struct.pack("<Q", 0) + b"{}", r"header length is 0"),
    "header_length_huge": (struct.pack("<Q", 2**63) + b"{}", r"above the 100000000-byte limit"),
    "nan_in_header": (join(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', b""),
                      r"NaN is not JSON"),
    "extra_field": (join(b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "x": 1}}', b"\0" * 4),
                    r"unexpected field 'x'"),
    "rank_9": (join(b'{"a": {"dtype": "U8", "shape": [1,1,1,1,1,1,1,1,1], "data_offsets": [0, 1]}}', b"\0"),
               r"9 dimensions"),
    "metadata_not_strings": (join(b'{"__metadata__": {"k": 1}}', b""), r"__metadata__ .* not an object of strings"),
    "trailing_data": (join(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0\0"),
                      r"the tensors cover 1 of the 2 data bytes"),
    "empty_name": (join(b'{"": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"), r"empty tensor name"),
    "control_char_name": (join(b'{"a\\nb": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"),
                          r"control characters"),
    "entry_not_object": (join(b'{"a": [1, 2]}', b""), r"entry is \[1, 2\], not an object"),
    "huge_echo_is_clipped": (join(b'{"a": {"dtype": "' + b"X" * 5000 + b'", "shape": [], "data_offsets": [0, 0]}}',
                                  b""), r"unknown or unsupported dtype 'XXX+\.\.\.$"),
    "deep_nesting": (join(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""), r"not JSON"),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_header_edge_cases_in_the_loader(case, tmp_path):
    raw, reason = EDGE_CASES[case]
    (tmp_path / ST).write_bytes(raw)
    with pytest.raises(ModelError) as e:
        ModelWeights(tmp_path, "m")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and msg.startswith(f"m: {ST}: invalid safetensors header: "), msg
    assert re.search(reason, msg), msg


def test_empty_header_object_is_valid_and_bin_index_is_confined(tmp_path):
    (tmp_path / ST).write_bytes(join(b"{}      ", b""))  # the reference's serialization of no tensors
    assert read_safetensors_header(tmp_path / ST)[0] == []
    d = tmp_path / "bin"
    d.mkdir()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../../x.bin"}}))
    with pytest.raises(ModelError, match=r"pytorch_model.bin.index.json: invalid index: .*not a plain relative"):
        ModelWeights(d, "b")


# ------------------------------------------------------------------------------------------------- fuzz

def _valid_file() -> bytes:
    """A small file written by the reference: four tensors of different dtypes, with metadata."""
    g = torch.Generator().manual_seed(0)
    return reference_save({
        "w": torch.randn(2, 3, generator=g),
        "b": torch.randn(4, generator=g).to(torch.bfloat16),
        "i": torch.tensor([7, -1], dtype=torch.int64),
        "u": torch.tensor([1, 2, 3], dtype=torch.uint8),
    }, metadata={"format": "pt"})


VALID = _valid_file()
NAMES = ["w", "b", "i", "u", "__metadata__"]
FIELDS = ["dtype", "shape", "data_offsets"]
DTYPES = sorted(ST_DTYPES) + ["U16", "F4", "f32", ""]

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10, 200), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=6), st.sampled_from(DTYPES))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                          max_leaves=8)
small = st.integers(0, 120)
header_op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(NAMES), st.sampled_from(FIELDS), json_value),
    st.tuples(st.just("del"), st.sampled_from(NAMES), st.sampled_from(FIELDS + [None])),
    st.tuples(st.just("offsets"), st.sampled_from(NAMES), st.lists(small, min_size=2, max_size=2)),
    st.tuples(st.just("shape"), st.sampled_from(NAMES), st.lists(st.integers(0, 8), max_size=3)),
    st.tuples(st.just("dtype"), st.sampled_from(NAMES), st.sampled_from(DTYPES)),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.text(max_size=5)),
    st.tuples(st.just("entry"), st.sampled_from(NAMES), json_value),
    st.tuples(st.just("same_size"), st.sampled_from(NAMES)),  # keeps the file valid: both outcomes get tested
)
SAME_SIZE = {"F32": "I32", "I32": "F32", "BF16": "F16", "F16": "I16", "I16": "BF16", "I64": "F64", "F64": "I64",
             "U8": "I8", "I8": "BOOL", "BOOL": "U8"}
byte_op = st.one_of(
    st.none(),
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID))),
    st.tuples(st.just("append"), st.binary(max_size=16)),
    st.tuples(st.just("prefix"), st.integers(0, 2**64 - 1)),
)


def apply_ops(header: dict, ops: list[tuple], names: dict[str, str] | None = None) -> None:
    """JSON edits of a header; `names` maps the fuzz tensor names onto the header's own."""
    for op in ops:
        kind, name = op[0], (names or {}).get(op[1], op[1])
        entry = header.get(name)
        if kind == "entry":
            header[name] = op[2]
        elif kind == "rename" and name in header:
            header[op[2]] = header.pop(name)
        elif kind == "del" and op[2] is None:
            header.pop(name, None)
        elif isinstance(entry, dict) and kind == "set":
            entry[op[2]] = op[3]
        elif isinstance(entry, dict) and kind == "del":
            entry.pop(op[2], None)
        elif kind == "same_size" and isinstance(entry, dict) and str(entry.get("dtype")) in SAME_SIZE:
            entry["dtype"] = SAME_SIZE[entry["dtype"]]
            if isinstance(entry.get("shape"), list):
                entry["shape"].reverse()
        elif isinstance(entry, dict) and kind in ("offsets", "shape", "dtype"):
            entry["data_offsets" if kind == "offsets" else kind] = op[2]


def apply_bytes(raw: bytes, last: tuple | None) -> bytes:
    if last is None:
        return raw
    if last[0] == "flip":
        return raw[:last[1]] + bytes([last[2]]) + raw[last[1] + 1:]
    if last[0] == "truncate":
        return raw[:last[1]]
    if last[0] == "append":
        return raw + last[1]
    return struct.pack("<Q", last[1]) + raw[8:]


def mutate(ops: list[tuple], last: tuple | None) -> bytes:
    """VALID with its header edited and re-serialized, then maybe one raw byte edit."""
    (n,) = struct.unpack("<Q", VALID[:8])
    header = json.loads(VALID[8:8 + n])
    apply_ops(header, ops)
    return apply_bytes(join(header, VALID[8 + n:]), last)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_outcome(raw: bytes, directory: Path) -> None:
    """A one-line ModelError naming the file, or tensors that equal their bytes and what the reference reads."""
    tmp = directory / "tmp"
    tmp.write_bytes(raw)
    os.replace(tmp, directory / ST)  # a new inode: earlier maps keep their own pages
    try:
        w = ModelWeights(directory, "fuzz")
    except MergebotError as e:
        msg = str(e)
        assert msg and "\n" not in msg and msg.startswith(f"fuzz: {ST}: "), msg
        return
    entries, start, size = read_safetensors_header(directory / ST)
    assert size == len(raw)
    reference = reference_load(raw)  # at least as strict as the reference: what we accept, it accepts
    assert set(reference) == set(w.tensors)
    for e in entries:
        got = w.get(e.name)
        assert tuple(got.shape) == e.shape and got.dtype == ST_DTYPES[e.dtype]
        assert tensor_bytes(got) == raw[start + e.begin:start + e.end] == tensor_bytes(reference[e.name])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(header_op, max_size=3), last=byte_op)
def test_fuzzed_headers_in_the_loader(ops, last, fuzz_dir):
    check_outcome(mutate(ops, last), fuzz_dir)


def test_fuzz_reaches_both_outcomes(tmp_path):
    """The fuzz edits reach valid files as well as invalid ones (else the test above proves little)."""
    check_outcome(mutate([("dtype", "b", "F16")], None), tmp_path)  # same size: still valid
    assert ModelWeights(tmp_path, "f").tensors["b"].dtype == torch.float16
    check_outcome(mutate([("shape", "w", [3, 2])], None), tmp_path)
    assert ModelWeights(tmp_path, "f").tensors["w"].shape == (3, 2)
    check_outcome(mutate([("offsets", "w", [0, 20])], None), tmp_path)
    with pytest.raises(ModelError):
        ModelWeights(tmp_path, "f")


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(header_op, min_size=1, max_size=2), last=byte_op)
def test_fuzzed_parent_through_the_cli(ops, last, family, tmp_path_factory):
    """A few fuzzed parents through the real CLI: exit 0 with an output, or exit 1 with one line and nothing
    written. The tiny model's own header is mutated, with the fuzz tensor names mapped onto its tensors."""
    root = tmp_path_factory.mktemp("cli-fuzz")
    d = copy_model(family[1], root / "m")
    header, data = split(d / ST)
    apply_ops(header, ops, dict(zip(["w", "b", "i", "u"], by_offset(header))))
    (d / ST).write_bytes(apply_bytes(join(header, data), last))
    out = root / "out"
    r = run_cli("merge", str(merge_config(root, family[0], d)), str(out), "--quiet")
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        assert (out / ST).exists()
    else:
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(".out")]
