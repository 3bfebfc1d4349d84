"""The output directory: assembled beside OUT_DIR, moved into place only when complete.

An interrupted run leaves only a `.OUT_DIR.mergebot-*` work directory (never something that looks like
a finished model); an existing OUT_DIR is replaced only with --force, and then only after the new one is
complete (merge-semantics.md §5.4, §5.6 for the files copied from the donor).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergebot.errors import OutputError
from mergebot.io import confine
from mergebot.io.local import TOKENIZER_FILES

DONOR_FILES = TOKENIZER_FILES + ("generation_config.json", "preprocessor_config.json")


def check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            return
        raise OutputError(f"{out_dir} already exists; pass --force to replace it (it is kept until the new merge is complete)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a directory")


# errors that can only come from writing the output: each becomes one line naming OUT_DIR
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _write_error(out_dir: Path, e: OSError) -> OutputError:
    return OutputError(f"{out_dir}: cannot write the output: {e.strerror or e}")


def check_not_read(out_dir: Path, reads: Iterable[Path]) -> None:
    """Replacing OUT_DIR deletes everything under it: refuse an OUT_DIR that is, or holds, a parent directory
    or the config the merge reads (`merge m.yml . --force` in the models' folder would delete them)."""
    target = out_dir.resolve()
    for path in reads:
        if confine.is_inside(path.resolve(), target):
            raise OutputError(f"{out_dir}: --force would delete {path}, which this merge reads; choose another "
                              "OUT_DIR")


@contextmanager
def staged_output(out_dir: Path, force: bool, reads: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a work directory beside out_dir; on success it atomically becomes out_dir. Any failure, a full
    disk, Ctrl-C or SIGTERM included, removes the work directory: nothing half-made stays behind. `reads`: the
    parent directories and the config, which an existing out_dir must not hold (`check_not_read`)."""
    out_dir = out_dir.resolve()
    check_target(out_dir, force)
    if out_dir.exists():
        check_not_read(out_dir, reads)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.mergebot-", dir=out_dir.parent))
    except OSError as e:
        raise _write_error(out_dir, e) from None
    try:
        yield work
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        if e.errno in WRITE_ERRNOS or (e.filename and str(e.filename).startswith(str(work))):
            raise _write_error(out_dir, e) from None
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        _fsync_dir(work)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, trash / "old")
            os.rename(work, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(work, out_dir)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise _write_error(out_dir, e) from None
    _fsync_dir(out_dir.parent)


@contextmanager
def finishing(out_dir: Path) -> Iterator[None]:
    """Files written into OUT_DIR once it is in place (the lock's digests, the card): a full disk there would
    leave a model without its card or NOTICE that looks finished, so OUT_DIR is removed and the error is one
    line, as when the disk fills during the merge."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        shutil.rmtree(out_dir, ignore_errors=True)
        raise _write_error(out_dir, e) from None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_donor_files(donor_dir: Path, work: Path, only: tuple[str, ...] | None = None,
                     warnings: list[str] | None = None) -> list[str]:
    """Tokenizer and generation files copied verbatim from the donor (§5.6), regular files inside its
    directory only (mergebot.io.confine). A `.json` file that is not a JSON object (not UTF-8, not JSON, nested
    too deep, a list) is left out with a warning: copied, it was published as part of a model nothing can load."""
    copied = []
    label = f"tokenizer donor {donor_dir.name}"
    for name in only or DONOR_FILES:
        data = confine.read_bytes(donor_dir, name, label)
        if data is None:
            continue
        reason = _not_json_object(data) if name.endswith(".json") else None
        if reason is not None:
            if warnings is not None:
                warnings.append(f"{label}: {name} {reason}; not copied to the output")
            continue
        (work / name).write_bytes(data)
        copied.append(name)
    return copied


def _not_json_object(data: bytes) -> str | None:
    """Why `data` is not a JSON object (None: it is one)."""
    try:
        confine.parse_object(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except confine.NotJsonObject as e:
        return str(e)
    return None


LICENSE_PATTERNS = ("LICENSE*", "LICENCE*", "USE_POLICY*", "NOTICE*")


def copy_parent_licenses(parents: dict[str, Path], work: Path) -> list[str]:
    """Each parent's LICENSE / USE_POLICY / NOTICE files, kept under licenses/<parent>/ (licenses rule 5):
    community licenses require shipping them with derivatives."""
    copied = []
    for ref, directory in parents.items():
        label = "".join(c if c.isalnum() or c in "-_." else "_" for c in ref.strip("./")) or "parent"
        for pattern in LICENSE_PATTERNS:
            for src in sorted(directory.glob(pattern)):
                if src.is_symlink() and not confine.is_inside(src.resolve(), confine.root_of(directory)):
                    continue  # never publish what a parent links to outside itself (the audit refuses those)
                big = not src.is_file() or src.stat().st_size >= 10_000_000
                data = None if big else confine.read_bytes(directory, src.name, ref)
                if data is not None:
                    dest = work / "licenses" / label / src.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(data)
                    copied.append(str(dest.relative_to(work)))
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def drop_remote_code(work: Path) -> list[str]:
    """Remove `auto_map` from the output's tokenizer_config.json (copied from the donor); returns warnings. The
    plans already leave it out of config.json (bot/engine/plan.py, bot/builds/moe/layout.py).

    No parent's Python files are copied, so an inherited auto_map can only name code elsewhere: its
    `repo--module.Class` form makes transformers download and run another Hub repo's code under
    trust_remote_code, in a model published under the merger's name."""
    f = work / "tokenizer_config.json"
    if not f.is_file():
        return []
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep for json: no reader loads it
        return []
    if not isinstance(data, dict) or "auto_map" not in data:
        return []
    del data["auto_map"]
    write_json(f, data)
    return [f"{f.name}: auto_map (remote code) dropped; merges never carry a parent's custom code"]
