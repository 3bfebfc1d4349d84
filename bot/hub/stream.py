"""Streamed Hub -> Hub merges (issue 15): parents read by HTTP range, output shards uploaded as they finish.

A `StreamSession` is what a dense merge holds instead of local parents and a local output: Hub parents are
resolved to their pinned commit with only their small files downloaded (config, tokenizer, licenses), their
tensors read by range (mergebot.io.remote); every finished output shard is pre-uploaded to the target repo's
LFS storage (huggingface_hub's `preupload_lfs_files`, made for files generated on the fly) on a background
thread and deleted, so the disk holds the shard being written plus at most the one being uploaded. Nothing
reaches the repo before mergebot.hub.publish makes its one commit (guarded by the parent commit) with the
pre-uploaded shards and the small files, so an interrupted run leaves the repo's history untouched. LFS objects
are addressed by content and the merge's bytes are the same every time, so a re-run uploads only the shards the
Hub does not have yet.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebot.config.configfile import Config
from mergebot.config.refs import ModelRef, is_repo_id
from mergebot.errors import MergebotError
from mergebot.hub.client import client, resolve_endpoint
from mergebot.io.local import ResolvedModel, is_local
from mergebot.io.remote import REQUEST_BYTES, FetchStats, RangeSource, RemoteWeights
from mergebot.io.shardstream import StreamingShardWriter
from mergebot.io.writer import ShardEntry

if TYPE_CHECKING:
    from mergebot.engine.plan import Plan
    from mergebot.io.reader import TensorReader

log = logging.getLogger("mergebot.stream")
MODES = ("auto", "on", "off")
READ_AHEAD = 512 << 20  # parent bytes held in memory ahead of the compute, all Hub parents together


class StreamRefused(MergebotError):
    """This config cannot be merged in stream mode (the message says why, in one line)."""


@dataclass
class Uploaded:
    """A shard that is on the Hub's storage but in no commit yet."""

    path: str  # path in the repo
    size: int
    sha256: str
    operation: Any  # the CommitOperationAdd that preupload_lfs_files marked as uploaded


@dataclass
class StreamStats:
    """What a streamed merge moved, for the log and the Action's job summary."""

    fetched: FetchStats = field(default_factory=FetchStats)
    shards: int = 0
    uploaded_bytes: int = 0  # bytes of shards the Hub did not have yet
    skipped_shards: int = 0  # shards the Hub already had (a re-run after an interruption)
    disk: int = 0  # output bytes on disk now
    peak_disk: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def disk_add(self, n: int) -> None:
        with self.lock:
            self.disk += n
            self.peak_disk = max(self.peak_disk, self.disk)

    def line(self) -> str:
        from mergebot.units import human_bytes

        return (f"streamed: fetched {human_bytes(self.fetched.bytes)} in {self.fetched.requests} range requests"
                f"{f' ({self.fetched.retries} retried)' if self.fetched.retries else ''}, uploaded "
                f"{human_bytes(self.uploaded_bytes)} in {self.shards - self.skipped_shards} shards"
                f"{f' ({self.skipped_shards} already on the Hub)' if self.skipped_shards else ''}, "
                f"peak disk {human_bytes(self.peak_disk)}")


# ------------------------------------------------------------------------------------------ the decision

def refusal(cfg: Config) -> str | None:
    """Why `cfg` cannot stream (one line), or None."""
    from mergebot.config.dense import MergeConfig

    if not isinstance(cfg, MergeConfig):
        return f"{cfg.file}: --stream supports dense merges only, not {cfg.kind} configs"
    for ref in cfg.referenced_models():
        if ref.lora is not None:
            return f"{cfg.file}: {ref}: --stream cannot fold in LoRA adapters (merge without --stream)"
    if cfg.tokenizer_source is not None or cfg.tokenizer is not None:
        return (f"{cfg.file}: tokenizer_source/tokenizer: --stream cannot rewrite embeddings for a merged "
                "vocabulary (merge without --stream)")
    return None


def _hub_parents(cfg: Config) -> list[ModelRef]:
    search = [Path(cfg.file).resolve().parent]
    return [r for r in cfg.referenced_models() if is_local(r, search) is None and is_repo_id(r.path)]


def parents_bytes(refs: list[ModelRef], token: str | None) -> list[int]:
    """Each Hub parent's safetensors bytes at its revision (listing metadata only)."""
    api = client(token=token)
    out = []
    for ref in refs:
        info = api.model_info(ref.path, revision=ref.revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in (info.siblings or [])}
        st = [n for n in sizes if n.endswith(".safetensors")]
        if not st:  # auto mode then merges as usual: ranges are read from safetensors only
            raise StreamRefused(f"{ref}: --stream reads safetensors by range; this repo has only .bin weights")
        out.append(sum(sizes[n] for n in st))
    return out


def free_bytes(directory: Path) -> int:
    """Free space where OUT_DIR will be (its nearest existing ancestor)."""
    d = directory.resolve()
    while not d.exists() and d != d.parent:
        d = d.parent
    return shutil.disk_usage(d).free


def should_stream(cfg: Config, out_dir: Path, mode: str, push_to: str | None, token: str | None,
                  say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> bool:
    """`on`: stream or refuse (one line); `off`: never; `auto`: when the parents are on the Hub, the output goes
    there too, the config can stream and the free space at OUT_DIR is less than the parents plus the output."""
    if mode not in MODES:
        raise MergebotError(f"--stream {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return False
    why = refusal(cfg)
    if mode == "on":
        if not push_to:
            raise StreamRefused("--stream needs --push-to ORG/NAME: the shards go to the Hub as they finish")
        if why:
            raise StreamRefused(why)
        return True
    if not push_to or why:
        return False
    try:
        hub = _hub_parents(cfg)
        sizes = parents_bytes(hub, token) if hub else []
    except Exception:  # noqa: BLE001 - cannot size the parents: the normal path reports the real error
        return False
    if not sizes:
        return False
    need, free = sum(sizes) + max(sizes), free_bytes(out_dir)
    if free >= need:
        return False
    from mergebot.units import human_bytes

    say(f"stream mode: {human_bytes(free)} free at {out_dir} < {human_bytes(need)} for the parents and the "
        "output; reading parents by range and uploading shards as they finish (--stream off to refuse)")
    return True


# ------------------------------------------------------------------------------------------ the session

class ShardUploader:
    """Pre-uploads finished shard files one after another on a background thread, then deletes them."""

    def __init__(self, api: Any, repo_id: str, token: str, endpoint: str, stats: StreamStats,
                 create_pr: bool = False):
        self.api, self.repo_id, self.token, self.endpoint = api, repo_id, token, endpoint
        self.stats, self.create_pr = stats, create_pr
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-upload")
        self._futures: list[Future[Uploaded]] = []

    def submit(self, path: Path, name: str) -> None:
        """Queue a finished shard; first waits for the previous upload, so the disk holds at most that one and
        the shard being written (its failure is raised here, stopping the merge early)."""
        self.results()
        self._futures.append(self._pool.submit(self._upload, path, name))

    def make_room(self, directory: Path, size: int) -> None:
        """Before a new shard file of `size` bytes: when the disk could not hold it beside the shard still
        uploading (and some slack), wait for that upload, so a small disk holds one shard at a time; with room,
        writing the next shard overlaps the upload."""
        if self._futures and not self._futures[-1].done() and free_bytes(directory) < size + min(64 << 20, size // 8):
            log.info("%s: waiting for the last upload before writing the next shard (disk nearly full)", self.repo_id)
            self.results()

    def _upload(self, path: Path, name: str) -> Uploaded:
        from huggingface_hub import CommitOperationAdd

        from mergebot.hub.publish import Publisher, RetryPolicy

        size = path.stat().st_size
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))  # hashes the file (sha256)
        sha = op.upload_info.sha256.hex()
        pub = Publisher(self.api, self.token, self.endpoint, self.repo_id, RetryPolicy())
        present = self._on_hub(op)
        pub.call(f"uploading {name}", lambda: self.api.preupload_lfs_files(
            self.repo_id, [op], token=self.token, create_pr=self.create_pr))
        path.unlink()
        with self.stats.lock:
            self.stats.shards += 1
            self.stats.disk -= size
            if present:
                self.stats.skipped_shards += 1
            else:
                self.stats.uploaded_bytes += size
        log.info("%s: %s %s", self.repo_id, "already on the Hub:" if present else "uploaded", name)
        return Uploaded(name, size, sha, op)

    def _on_hub(self, op: Any) -> bool:
        """Whether the Hub's LFS storage already holds this content (asked for the stats only: the client's own
        LFS batch call skips such uploads either way)."""
        from huggingface_hub.lfs import post_lfs_batch_info

        try:
            actions, _, _ = post_lfs_batch_info([op.upload_info], token=self.token, repo_type="model",
                                                repo_id=self.repo_id, endpoint=self.endpoint)
            return bool(actions) and all(not a.get("actions") for a in actions)
        except Exception:  # noqa: BLE001 - the upload that follows reports real failures
            return False

    def results(self) -> list[Uploaded]:
        """Every upload, in order; the first failure is raised here."""
        return [f.result() for f in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class StreamSession:
    """One streamed merge into `repo_id`: how parents are resolved and read, and where the shards go."""

    def __init__(self, repo_id: str, token: str | None, *, endpoint: str | None = None, private: bool = False,
                 create_pr: bool = False, ahead_bytes: int = READ_AHEAD):
        if not token:
            raise MergebotError(f"--stream to {repo_id}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
        self.repo_id, self.token, self.endpoint = repo_id, token, resolve_endpoint(endpoint)
        self.private, self.create_pr, self.ahead_bytes = private, create_pr, ahead_bytes
        self.api = client(self.endpoint, token)
        self.stats = StreamStats()
        self.readers: list[RemoteWeights] = []
        self.uploader: ShardUploader | None = None
        self.hidden = False  # created private by this run, to be made public once published (`reveal`)

    # -------------------------------------------------------------------- parents
    def resolve(self, ref: ModelRef, search: list[Path]) -> ResolvedModel:
        """A parent with its small files only (json, tokenizer, licenses): the weights stay on the Hub."""
        from mergebot.hub import fetch

        return fetch.resolve(ref, search, token=self.token, stream=True)

    def reader(self, ref: ModelRef, resolved: ResolvedModel) -> TensorReader:
        """Hub parents by range (headers validated as a dry run's are); local ones as always."""
        from mergebot.hub.fetch import hub_headers
        from mergebot.io.weights import ModelWeights

        if not resolved.is_hub:
            return ModelWeights(resolved.directory, str(ref))
        headers = hub_headers(ref.path, resolved.sha or "main", str(ref), self.token)
        source = RangeSource(ref.path, resolved.sha or "main", str(ref), token=self.token, endpoint=self.endpoint,
                             stats=self.stats.fetched)
        reader = RemoteWeights(headers, source)
        self.readers.append(reader)
        return reader

    def plan_reads(self, plan: Plan) -> None:
        """Tell each remote parent the order the executor will read its tensors (the read-ahead follows it)."""
        orders: dict[str, list[str]] = {}
        for job in plan.jobs:
            for inp in job.inputs:
                orders.setdefault(inp.model, []).append(inp.tensor)
        remote = {k: r for k, r in plan.models.items() if isinstance(r, RemoteWeights)}
        for key, reader in remote.items():  # the memory budget shared, each window at least one request
            reader.ahead_bytes = max(REQUEST_BYTES, self.ahead_bytes // len(remote))
            reader.plan(orders.get(key, []))

    # -------------------------------------------------------------------- output
    def writer(self, work: Path, entries: list[ShardEntry], max_shard_bytes: int,
               metadata: dict | None = None) -> StreamingShardWriter:
        """The output shards, each uploaded and deleted once finished (the repo is created first if needed)."""
        self._create_repo()
        self.uploader = ShardUploader(self.api, self.repo_id, self.token, self.endpoint, self.stats, self.create_pr)
        return StreamingShardWriter(work, entries, max_shard_bytes, self.uploader.submit, metadata,
                                    on_create=self.stats.disk_add, on_close=self.uploader.results,
                                    before_create=self.uploader.make_room)

    def _create_repo(self) -> None:
        """The repo, created if needed before the first shard goes up. A repo that does not exist yet is created
        private even when it is to be public, and made public only once the publish commit has landed (`reveal`):
        a run interrupted before that leaves nothing visible, only an empty private repo holding the uploaded
        shards, which a re-run resumes into. An existing repo keeps its visibility."""
        from huggingface_hub.errors import RepositoryNotFoundError

        if not self.private:
            try:
                if self.api.repo_info(self.repo_id, token=self.token).private:
                    log.warning("%s exists and is private: it stays private (publishing never changes an existing "
                                "repo's visibility)", self.repo_id)
            except RepositoryNotFoundError:
                self.api.create_repo(self.repo_id, private=True, exist_ok=True, token=self.token)
                self.hidden = True
                log.info("%s: created private until the merge is published", self.repo_id)
                return
        self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, token=self.token)

    def reveal(self) -> None:
        """After the publish commit: make public the repo `_create_repo` created private for this run."""
        if not self.hidden:
            return
        try:
            self.api.update_repo_settings(self.repo_id, private=False, token=self.token)
        except Exception as e:  # noqa: BLE001 - any failure gets the same one-line instruction
            raise MergebotError(f"{self.repo_id}: published, but it stays private: making it public failed "
                                f"({type(e).__name__}); make it public in its settings on the Hub") from e
        self.hidden = False
        log.info("%s: now public", self.repo_id)

    def finish(self, out_dir: Path) -> list[Uploaded]:
        """After the merge: wait for every shard's upload (the first failure is raised here) and log the traffic."""
        done = self.uploader.results() if self.uploader is not None else []
        self.note_disk(out_dir)
        log.info("%s", self.stats.line())
        return done

    def note_disk(self, directory: Path) -> None:
        """Count the small files written beside the shards into the peak."""
        small = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        with self.stats.lock:
            self.stats.peak_disk = max(self.stats.peak_disk, self.stats.disk + small)

    def close(self) -> None:
        for r in self.readers:
            r.close()
        if self.uploader is not None:
            self.uploader.close()


def open_session(cfg: Config, out_dir: Path, mode: str, push_to: str | None, token: str | None, *,
                 endpoint: str | None = None, private: bool = False, create_pr: bool = False,
                 say: Callable[[str], None] | None = None) -> StreamSession | None:
    """The session of a streamed merge when `mode` (auto | on | off) and the situation call for one."""
    if not should_stream(cfg, out_dir, mode, push_to, token, **({"say": say} if say else {})):
        return None
    assert push_to is not None
    return StreamSession(push_to, token, endpoint=endpoint, private=private, create_pr=create_pr)


def stream_mode_default() -> str:
    """MERGEBOT_STREAM (auto | on | off) for the Action and scripts; `auto` when unset."""
    return os.environ.get("MERGEBOT_STREAM", "auto").strip().lower() or "auto"
