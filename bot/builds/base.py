"""What every build is and gives back, and what builds share: options, the device, the streamed shards.

A `Build` turns one validated config into a finished output directory: a dense merge (builds.dense), a
mergekit-moe build (builds.moe) or a mergekit-multi file (builds.multi). Callers (the pipeline, `mergebot merge`,
the Action's dry run) hold a Build and never ask which kind it is.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch

from mergebot import __version__
from mergebot.config.configfile import Config
from mergebot.config.refs import ModelRef
from mergebot.engine.executor import RunStats
from mergebot.errors import MergebotError
from mergebot.io.local import ResolvedModel
from mergebot.io.writer import ShardedWriter, ShardEntry

if TYPE_CHECKING:
    from mergebot.hub.stream import StreamSession

DEFAULT_SHARD = 5_000_000_000


@dataclass
class MergeOptions:
    out_shard_size: int = DEFAULT_SHARD
    device: str = "cpu"  # auto | cpu | cuda[:N]
    random_seed: int | None = None
    force: bool = False
    copy_tokenizer: bool = True
    progress: bool = True
    token: str | None = field(default=None, repr=False)  # never in a repr, hence never in a log or traceback
    threads: int | None = None
    compile: str = "auto"  # auto | on | off: fuse method kernels with torch.compile (mergebot.engine.fuse)
    allow_all_same_experts: bool = False  # MoE: every expert the same model (only useful with training)
    rng: str = "hash"  # hash (order-independent, mergebot.engine.rng) | mergekit (DARE masks with mergekit's bits)
    stream: StreamSession | None = field(default=None, repr=False)  # Hub -> Hub by range (mergebot.hub.stream)


@dataclass(frozen=True)
class ParentSource:
    """A parent as the build found it, for the card and the license analysis."""

    key: str  # the reference as the config wrote it
    resolved: ResolvedModel
    role: str  # base | input
    adapter: ResolvedModel | None = None  # a LoRA folded into it (its license applies too)


class PreparedPlan(Protocol):
    """What a build will write, known before anything is: for `--dry-run` and the Action's pull-request plan."""

    @property
    def warnings(self) -> list[str]: ...

    def describe(self) -> list[str]: ...  # plain lines for a terminal

    def markdown(self, text: Callable[[str], str], code: Callable[[str], str], device: str) -> list[str]:
        """Job-summary lines; every value a config or a parent supplied goes through `text`/`code` (escaping)."""
        ...


class BuildResult(Protocol):
    @property
    def out_dir(self) -> Path | None: ...

    @property
    def stats(self) -> RunStats: ...

    @property
    def peak_rss_bytes(self) -> int: ...

    @property
    def lock(self) -> dict[str, Any]: ...  # what mergebot.lock.json holds

    @property
    def warnings(self) -> list[str]: ...  # the config's and the build's

    @property
    def plan_warnings(self) -> list[str]: ...  # the build's own (the config's were shown when it was read)

    def parents(self) -> list[ParentSource]: ...  # every leaf parent, config order


C = TypeVar("C", bound=Config)


@dataclass
class ConfigBuild(Generic[C]):
    """What every build holds: its config, whose models it reads."""

    config: C

    def referenced_models(self) -> list[ModelRef]:
        return self.config.referenced_models()


class Build(Protocol):
    @property
    def config(self) -> Config: ...

    def referenced_models(self) -> list[ModelRef]: ...

    def prepare(self, options: MergeOptions, *, headers_only: bool = False) -> PreparedPlan: ...

    def run(self, out_dir: Path, options: MergeOptions) -> BuildResult: ...


# --------------------------------------------------------------------------------------- shared by the builds

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergebotError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    return dev


def start(options: MergeOptions) -> torch.device:
    """The device, and torch's CPU threads as asked."""
    device = pick_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    return device


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr)


@contextmanager
def streamed_shards(work: Path, entries: list[ShardEntry], options: MergeOptions,
                    total: int) -> Iterator[tuple[ShardedWriter, Callable[[int], None] | None]]:
    """The output shards plus a progress callback; closed (fsynced, indexed) on success, aborted on error."""
    bar = _progress_bar(total, options.progress)
    meta = {"mergebot_version": __version__}
    writer = (options.stream.writer(work, entries, options.out_shard_size, meta) if options.stream is not None
              else ShardedWriter(work, entries, options.out_shard_size, metadata=meta))
    try:
        yield writer, (bar.update if bar else None)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar:
            bar.close()


def peak_rss() -> int:
    """This process's peak resident set (VmHWM); ru_maxrss would include a forking parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seed_from_env() -> int | None:
    v = os.environ.get("MERGEBOT_RANDOM_SEED")
    return int(v) if v else None
