"""The FakeHub: the in-memory Hub (state.py), what tests read and inject directly, and its HTTP server."""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from tests.hubserver.state import (
    DEFAULT_GITATTRIBUTES,
    LFS_EXTENSIONS,
    Commit,
    HubError,
    Repo,
    StoredFile,
    Token,
    now,
)


class FakeHub:
    """The in-memory Hub plus its HTTP server. Thread-safe: one lock around all state."""

    def __init__(self, tokens: dict[str, str | Token] | None = None, lfs_threshold: int = 10 * 1024 * 1024):
        self.tokens: dict[str, Token] = {
            k: (v if isinstance(v, Token) else Token(user=v)) for k, v in (tokens or {}).items()
        }
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.sent: list[tuple[str, str, int]] = []  # (method, path, body bytes sent): what a client downloaded
        self.log: list[tuple[str, str, int, int]] = []  # (method, path, status, body bytes), one per answer
        self.jobs: list[dict[str, Any]] = []  # HF Jobs submitted (POST /api/jobs/{ns})
        self.webhooks: dict[str, dict[str, Any]] = {}  # id -> webhook (with its "owner"), /api/settings/webhooks
        self.unhandled: list[tuple[str, str]] = []
        self.crashes: list[str] = []  # handler exceptions (FakeHub bugs), answered with 500
        self.lock = threading.RLock()
        self._counter = itertools.count(1)
        self._lfs_failures: list[int] = []  # statuses for the next LFS uploads
        self.lfs_delay = 0.0  # seconds each LFS upload waits before it is stored
        self._range_faults: list[tuple[str, int]] = []  # ("status", code) | ("cut", bytes) for the next range GETs
        self._commit_failures: list[tuple[int, bool]] = []  # (status, apply the commit before failing)
        self._before_commit: list[Callable[[], None]] = []
        # As the Hub does for LFS/Xet files: resolve answers 302 to a storage host of another origin (here a
        # second port) that serves the bytes and ranges and refuses requests carrying an Authorization header
        # (S3/CAS-bridge pre-signed URLs answer 400 to a second auth mechanism).
        self.lfs_redirect = True
        self.cdn_auth_refused: list[str] = []  # storage requests that came with an Authorization header
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        from tests.hubserver.handler import (
            _Handler,  # the handler reads the FakeHub: built once both exist
        )

        hub = self

        class Handler(_Handler):
            fake = hub

        for _ in range(2):  # the Hub, then its storage host (another origin)
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
            self._servers.append(server)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, method: str, path: str, status: int, sent: int) -> None:
        """One answer, in `requests`, `sent` and `log` together."""
        with self.lock:
            self.requests.append((method, path, status))
            self.sent.append((method, path, sent))
            self.log.append((method, path, status, sent))

    # ------------------------------------------------------------------ direct state access for tests
    def create_repo(self, repo_id: str, *, private: bool = False, gated: str | bool = False,
                    author: str = "system") -> Repo:
        with self.lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id=repo_id, private=private, gated=gated, created_at=now())
            self.repos[repo_id] = repo
            self._make_commit(repo, None, {".gitattributes": StoredFile(DEFAULT_GITATTRIBUTES, lfs=False)},
                              "initial commit", "", author, ref="main")
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, message: str = "direct commit",
               deletes: tuple[str, ...] = (), ref: str = "main", author: str = "someone-else") -> str:
        """Commit straight into the state (seeding parents, or a concurrent push from someone else)."""
        with self.lock:
            repo = self._repo(repo_id)
            parent = repo.refs[ref]
            tree = dict(repo.commits[parent].files)
            for path in deletes:
                tree.pop(path, None)
            for path, data in files.items():
                tree[path] = StoredFile(data, lfs=self._is_lfs(path, len(data)))
                if tree[path].lfs:
                    self.lfs_store[tree[path].sha256] = data
            return self._make_commit(repo, parent, tree, message, "", author, ref=ref).oid

    def head(self, repo_id: str, ref: str = "main") -> str:
        with self.lock:
            return self._repo(repo_id).refs[ref]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self._repo(repo_id)
            return {p: f.data for p, f in repo.commits[self._resolve(repo, rev)].files.items()}

    def history(self, repo_id: str, ref: str = "main") -> list[Commit]:
        """Commits reachable from `ref`, newest first."""
        with self.lock:
            repo = self._repo(repo_id)
            out, oid = [], repo.refs[ref]
            while oid is not None:
                out.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return out

    def bytes_sent(self, method: str, pattern: str) -> int:
        """Body bytes answered to requests matching `method` and the regex `pattern` on the path."""
        return sum(n for m, p, n in self.sent if m == method and re.search(pattern, p))

    def file_gets(self, repo: str = "[^/]+/[^/]+", file: str = r"[^?]*\.safetensors") -> list[tuple[str, int, int]]:
        """(path, status, body bytes) of each GET of a file of `repo` (regexes), from the Hub (resolve) or from
        its storage host (`lfs_redirect`)."""
        pattern = re.compile(rf"^/(?:{repo})/resolve/[^/]+/(?:{file})(?:\?.*)?$|^/__storage/[^/]+/(?:{repo})/(?:{file})\?")
        with self.lock:
            return [(p, status, n) for m, p, status, n in self.log if m == "GET" and pattern.search(p)]

    def count(self, method: str, pattern: str) -> int:
        """How many requests matched `method` and the regex `pattern` on the path."""
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    # ------------------------------------------------------------------ fault injection
    def fail_next_lfs_uploads(self, times: int = 1, status: int = 500) -> None:
        """The next `times` LFS PUTs answer `status` (the body is read and dropped)."""
        with self.lock:
            self._lfs_failures.extend([status] * times)

    def fail_next_ranges(self, times: int = 1, status: int = 503) -> None:
        """The next `times` range GETs of resolve answer `status`."""
        with self.lock:
            self._range_faults.extend([("status", status)] * times)

    def cut_next_ranges(self, times: int = 1, after: int = 1000) -> None:
        """The next `times` range GETs announce their full length but send only `after` bytes, then close."""
        with self.lock:
            self._range_faults.extend([("cut", after)] * times)

    def fail_next_commit(self, status: int = 500, *, after_apply: bool = False) -> None:
        """The next commit request answers `status`; with `after_apply` the commit lands first (lost response)."""
        with self.lock:
            self._commit_failures.append((status, after_apply))

    def inject_concurrent_commit(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main",
                                 message: str = "concurrent commit") -> None:
        """Just before the next commit request is applied, someone else pushes `files` to `ref`."""
        with self.lock:
            self._before_commit.append(lambda: self.commit(repo_id, files, message=message, ref=ref))

    # ------------------------------------------------------------------ internals
    def _is_lfs(self, path: str, size: int) -> bool:
        return size > 0 and (size >= self.lfs_threshold or path.lower().endswith(LFS_EXTENSIONS))

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> str:
        if rev in repo.refs:
            return repo.refs[rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _make_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], title: str,
                     message: str, author: str, ref: str) -> Commit:
        n = next(self._counter)
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{n}\n" + "\n".join(f"{p}:{f.oid}" for p, f in sorted(files.items()))
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, parent, title, message, author, now(), files)
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit
