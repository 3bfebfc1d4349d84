"""Is requirements/runtime.lock still a lock of pyproject.toml's dependencies (and runtime.in's pins)?

A quick static check (no network; run by scripts/container/test-image.sh before it builds): every requirement
but torch is pinned in the lock, with a version its specifier allows, and every pin carries a sha256 hash.
After a failure, regenerate the lock: bash requirements/lock.sh

    check_lock.py --installed FREEZE_FILE   (`pip list --format=freeze` of a built image)
also checks that the image holds exactly the lock's versions, plus torch, mergebot and pip's own tools.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
UNLOCKED = {"torch"}  # installed by version in the Dockerfile: see lock.sh
TOOLS = {"pip", "wheel"}  # the base image's


def pins(lock_text: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) from a pip-compile --generate-hashes file."""
    out = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock_text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            out[canonicalize_name(m.group(1))] = (m.group(2), block.count("--hash=sha256:"))
    return out


def check_installed(freeze: str, locked: dict[str, tuple[str, int]]) -> list[str]:
    problems = []
    installed = {}
    for line in freeze.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            installed[canonicalize_name(name)] = version
    for name, version in sorted(installed.items()):
        if name in locked and locked[name][0] != version:
            problems.append(f"image has {name}=={version}, the lock {locked[name][0]}")
        elif name not in locked and name not in UNLOCKED | TOOLS | {"mergebot"}:
            problems.append(f"image has {name}=={version}, which is not in the lock")
    problems += [f"{name}=={v}: locked but not in the image" for name, (v, _) in locked.items() if name not in installed]
    return problems


def main() -> int:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    extra = [line.split("#")[0].strip() for line in (ROOT / "requirements/runtime.in").read_text().splitlines()]
    locked = pins((ROOT / "requirements/runtime.lock").read_text())
    problems = []
    for text in deps + [e for e in extra if e]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in UNLOCKED or (req.marker and not req.marker.evaluate()):
            continue
        if name not in locked:
            problems.append(f"{req}: not in the lock")
        elif not req.specifier.contains(locked[name][0], prereleases=True):
            problems.append(f"{req}: the lock has {locked[name][0]}")
    problems += [f"{name}=={v}: no hash" for name, (v, n) in locked.items() if n == 0]
    problems += [f"{name}: must not be in the lock" for name in UNLOCKED & set(locked)]
    if len(sys.argv) == 3 and sys.argv[1] == "--installed":
        problems += check_installed(Path(sys.argv[2]).read_text(), locked)
        if not problems:
            print("the image holds exactly the locked versions (plus torch, mergebot, pip)")
    if problems:
        print("check_lock.py: FAILED (a stale lock is regenerated with: bash requirements/lock.sh)", *problems,
              sep="\n  ", file=sys.stderr)
        return 1
    print(f"requirements/runtime.lock: {len(locked)} pins with hashes; pyproject.toml's dependencies satisfied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
