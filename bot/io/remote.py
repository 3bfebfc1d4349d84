"""Parents read from the Hub by HTTP range, never downloaded whole (issue 15, `mergebot merge --stream`).

A merge reads each parent tensor once, in the plan's job order. `RemoteWeights` serves those tensors from the
pinned revision's safetensors files: the headers come first (read by range and validated by
`mergebot.io.safetensors.parse_safetensors_header`, exactly as `--dry-run` reads them), then a read-ahead window
of the tensors the plan needs next is fetched by a few parallel range requests. Neighbouring tensors of one
file (norms, biases: many tiny ones) share a request and a tensor larger than a request is split over several,
so latency is paid per tens of MB, not per tensor. A broken response resumes from the first byte it did not
deliver; every response's range and length are checked. Only gaps below GAP_BYTES are read over, so the bytes
fetched stay within a few percent of the tensors used.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mergebot.errors import MergebotError, ModelError
from mergebot.io.weights import ModelWeights, TensorInfo

REQUEST_BYTES = 32 << 20  # one range request: large enough that latency is small beside the transfer
GAP_BYTES = 64 << 10  # neighbours this close share a request (the gap is read and dropped)
AHEAD_BYTES = 256 << 20  # read-ahead window per model: the memory streaming costs
WORKERS = 4  # range requests in flight per model
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass
class FetchStats:
    """What the network did for the reads, for the log and the job summary (shared by every model)."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int, nbytes: int, retries: int) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, a short or broken body)."""


class RangeSource:
    """Byte ranges of one repo's files at one pinned commit, over huggingface_hub's HTTP session."""

    def __init__(self, repo_id: str, revision: str, label: str, *, token: str | None, endpoint: str,
                 stats: FetchStats, attempts: int = 6, backoff: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep):
        self.repo_id, self.revision, self.label, self.token, self.endpoint = repo_id, revision, label, token, endpoint
        self.stats, self.attempts, self.backoff, self.sleep = stats, attempts, backoff, sleep

    def url(self, filename: str) -> str:
        from huggingface_hub.file_download import hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.revision, endpoint=self.endpoint)

    def read_into(self, filename: str, start: int, out: memoryview) -> None:
        """Fill `out` with the file's bytes [start, start + len(out)): retried with backoff, resumed where a
        response broke off, each response's Content-Range checked against what was asked."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session

        url, headers, want = self.url(filename), build_hf_headers(token=self.token), len(out)
        got = retries = requests = 0
        where = f"{self.label}: {filename}"
        while got < want:
            first, last = start + got, start + want - 1
            before = got
            requests += 1
            try:
                with get_session().stream("GET", url, headers={**headers, "range": f"bytes={first}-{last}"},
                                          follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                    if r.status_code == 429 or r.status_code >= 500:
                        raise _Transient(f"HTTP {r.status_code}")
                    if r.status_code != 206:
                        raise ModelError(f"{where}: the Hub answered HTTP {r.status_code} to a range request")
                    m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", "").strip())
                    if m is None or int(m[1]) != first or int(m[2]) > last:
                        raise ModelError(f"{where}: the Hub answered range {r.headers.get('content-range')!r} "
                                         f"to bytes={first}-{last}")
                    for chunk in r.iter_bytes():
                        n = min(len(chunk), want - got)
                        out[got:got + n] = chunk[:n]
                        got += n
                        if got == want:
                            break
                    if got < want and (got == before or got - before < int(m[2]) - first + 1):
                        raise _Transient("short body")  # resumed below from the first missing byte
            except MergebotError:
                raise
            except Exception as e:  # noqa: BLE001 - network faults: retry from the first missing byte
                retries += 1
                if retries >= self.attempts:
                    raise ModelError(f"{where}: range read failed after {retries} tries: {type(e).__name__}: "
                                     f"{str(e)[:200]}") from None
                self.sleep(min(8.0, self.backoff * 2 ** (retries - 1)))
        self.stats.add(requests, want, retries)


@dataclass
class _Request:
    file: str
    start: int
    end: int
    parts: list[tuple[str, int, int]]  # (tensor, offset in the tensor's buffer, offset in the file)


class RemoteWeights(ModelWeights):
    """A Hub model's tensors fetched by range as the plan reaches them (a `TensorReader`): names, dtypes and
    shapes from the validated headers (`mergebot.hub.fetch.hub_headers`), bytes from `source`."""

    def __init__(self, headers: ModelWeights, source: RangeSource, ahead_bytes: int = AHEAD_BYTES,
                 workers: int | None = None):
        super().__init__(headers.directory, headers.label, discover=False)
        self.tensors = headers.tensors
        self.source = source
        self.ahead_bytes = ahead_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers or WORKERS, thread_name_prefix="fetch")
        self._order: list[str] = []
        self._next = 0  # first tensor of the order not yet scheduled
        self._buffers: dict[str, bytearray] = {}
        self._pending: dict[str, list[Future[None]]] = {}
        self._scheduled_bytes = 0
        self._lock = threading.Lock()

    def plan(self, order: list[str]) -> None:
        """The tensors the merge will read from this model, in the order it reads them (the read-ahead)."""
        with self._lock:
            self._order = list(dict.fromkeys(n for n in order if n in self.tensors))
            self._next = 0

    def _schedule(self, must: str | None = None) -> None:
        """Schedule requests for the next tensors of the order until the window is full (and up to `must`)."""
        with self._lock:
            group: list[TensorInfo] = []
            while self._next < len(self._order) and (self._scheduled_bytes < self.ahead_bytes
                                                     or (must is not None and must not in self._buffers)):
                info = self.tensors[self._order[self._next]]
                self._next += 1
                if info.name in self._buffers:
                    continue
                if group and not _neighbours(group[0], group[-1], info):
                    self._submit(group)
                    group = []
                group.append(info)
                self._reserve(info)
            if group:
                self._submit(group)
            if must is not None and must not in self._buffers:  # outside the order (or read again): alone
                self._reserve(self.tensors[must])
                self._submit([self.tensors[must]])

    def _reserve(self, info: TensorInfo) -> None:
        self._buffers[info.name] = bytearray(info.nbytes)
        self._pending[info.name] = []
        self._scheduled_bytes += info.nbytes

    def _submit(self, infos: list[TensorInfo]) -> None:
        for req in _requests(infos):
            fut = self._pool.submit(self._fetch, req, [memoryview(self._buffers[t]) for t, _, _ in req.parts])
            for tensor, _, _ in req.parts:
                self._pending[tensor].append(fut)

    def _fetch(self, req: _Request, buffers: list[memoryview]) -> None:
        if len(req.parts) == 1:  # straight into the tensor's buffer
            _, at, _ = req.parts[0]
            self.source.read_into(req.file, req.start, buffers[0][at:at + req.end - req.start])
            return
        scratch = bytearray(req.end - req.start)
        self.source.read_into(req.file, req.start, memoryview(scratch))
        for (_, at, offset), buf in zip(req.parts, buffers):
            n = len(buf) - at
            buf[at:] = scratch[offset - req.start:offset - req.start + n]

    def get(self, name: str) -> torch.Tensor:
        info = self.header(name)
        if name not in self._buffers:
            self._schedule(must=name)
        for fut in self._pending.get(name, []):
            fut.result()  # a fetch's ModelError is raised here, in the merge's thread
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(self._buffers[name], dtype=info.dtype).reshape(info.shape)

    def prefetch(self, name: str) -> None:
        self._schedule(must=name if name in self.tensors else None)

    def release(self, name: str) -> None:
        with self._lock:
            buf = self._buffers.pop(name, None)
            self._pending.pop(name, None)
            if buf is not None:
                self._scheduled_bytes -= len(buf)
        self._schedule()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _neighbours(first: TensorInfo, prev: TensorInfo, info: TensorInfo) -> bool:
    """Whether `info` can join the request that `first`..`prev` make (same file, close, not too big)."""
    return (info.file == prev.file and 0 <= info.start - prev.end <= GAP_BYTES
            and info.end - first.start <= REQUEST_BYTES)


def _requests(infos: list[TensorInfo]) -> list[_Request]:
    """Range requests for a group of neighbouring tensors: one request, or one big tensor cut in pieces."""
    file = str(infos[0].file)
    if len(infos) > 1 or infos[0].nbytes <= REQUEST_BYTES:
        return [_Request(file, infos[0].start, infos[-1].end, [(i.name, 0, i.start) for i in infos])]
    info = infos[0]
    return [_Request(file, info.start + at, info.start + min(at + REQUEST_BYTES, info.nbytes),
                     [(info.name, at, info.start + at)]) for at in range(0, info.nbytes, REQUEST_BYTES)]
