"""The entry point pauses the garbage collector through start-up and freezes what exists when the merge
starts (mergebot.startup: ~0.5 s of every command's wall time on 2 cores); in-process callers get their
collector back as it was, and library callers never see it touched."""

from __future__ import annotations

import gc

import pytest

from mergebot import startup
from mergebot.cli.main import main
from mergebot.tinymodels import make_family
from tests.helpers import merge_yaml


@pytest.fixture()
def pair(tmp_path):
    base, ft = make_family(tmp_path / "fam", 2, seed=3)
    return (f"models:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {ft}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\n")


@pytest.fixture()
def spy(monkeypatch):
    seen: list[tuple[bool, int]] = []
    real = startup.settle

    def settle() -> None:
        seen.append((gc.isenabled(), gc.get_freeze_count()))
        real()
        seen.append((gc.isenabled(), gc.get_freeze_count()))

    monkeypatch.setattr(startup, "settle", settle)
    return seen


def test_entry_point_pauses_until_the_merge_then_gives_the_collector_back(tmp_path, pair, spy):
    cfg = tmp_path / "m.yml"
    cfg.write_text(pair)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 0
    assert spy[0] == (False, 0)  # paused through start-up, nothing frozen yet
    assert spy[1][0] and spy[1][1] > 10_000  # collecting again, torch's objects frozen
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_library_callers_keep_their_collector(tmp_path, pair, spy):
    gc.disable()
    try:
        merge_yaml(tmp_path, pair)
        assert spy == [(False, 0), (False, 0)]  # settle outside the entry point changes nothing
    finally:
        gc.enable()
    merge_yaml(tmp_path, pair, name="again")
    assert spy[2:] == [(True, 0), (True, 0)] and gc.get_freeze_count() == 0


@pytest.mark.parametrize("given, seen", [(None, startup.SPINCOUNT), ("5", "5")])
def test_the_console_script_shortens_openmps_idle_spin_unless_the_user_set_it(given, seen):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads: the console script sets it before anything imports
    torch (DELLA's threaded sorts and the file readers need the cores OpenMP's idle workers spin on); a value in
    the environment wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    probe = ("import os, sys\nsys.argv = ['mergebot', '--version']\nfrom mergebot.cli.main import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", seen]


def _console_probe(tail: str, **popen) -> list[str]:
    """Run the console script's `main()` (as `mergebot --version`) in a fresh interpreter, then `tail`."""
    import subprocess
    import sys

    probe = ("import os, sys\nsys.argv = ['mergebot', '--version']\nfrom mergebot import startup\n"
             "from mergebot.cli.main import main\ncalls = []\nmemory = startup.memory\n"
             "startup.memory = lambda: calls.append(memory()) or calls[-1]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n" + tail)
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          **popen).stdout.split()


def test_the_console_script_fixes_glibc_mallocs_thresholds():
    """The console script fixes glibc's mmap/trim thresholds (chunk-sized temporaries come back from the heap
    instead of fresh zeroed pages: SCE's page faults 2.1M -> 0.35M); an in-process call leaves the caller's
    allocator alone, and a user's GLIBC_TUNABLES for malloc wins."""
    import os
    import platform

    glibc = platform.libc_ver()[0] == "glibc"  # an independent check of the C library
    assert _console_probe("print(calls)")[-1] == f"[{glibc}]"
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}
    assert _console_probe("print(calls)", env=env)[-1] == "[False]"
    assert startup.memory() is glibc  # this (pytest) process: mallopt accepted both values


def test_the_console_script_raises_the_open_file_limit_to_the_hard_limit():
    """Every shard of every parent stays mapped, one descriptor each: a 1024 soft limit stopped merges of parents
    with thousands of shards that the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("hard open-file limit too low to lower the soft one below it")
    want = startup.FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, startup.FILES_CAP)
    seen = _console_probe("import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert int(seen[-1]) == want
