"""A Hub-compatible HTTP server on 127.0.0.1 for offline tests with the real huggingface_hub client.

It implements what huggingface_hub 2.4.0 calls with `HF_HUB_DISABLE_XET=1` (hub-action-cards-licenses.md
§3.2-§3.3): whoami, repo create/delete, model info, refs, tree, commits, preupload, the LFS batch API with basic
transfer + verify, NDJSON commits with the `parentCommit` check (412 when stale, as the Hub), validate-yaml,
resolve (HEAD/GET with ETag, X-Repo-Commit, X-Linked-Etag/-Size and Range) and paths-info. State lives in
memory: repos -> refs -> commits -> {path: file}. Fault hooks let tests fail an LFS upload, fail a commit, or
slip a concurrent commit in just before the next commit request is applied.

Usage:
    with FakeHub(tokens={"hf_test": "alice"}) as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("alice/x")
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".gguf", ".model",
                  ".zip", ".tar", ".gz", ".npy", ".npz", ".pkl")
DEFAULT_GITATTRIBUTES = b"".join(
    f"*{ext} filter=lfs diff=lfs merge=lfs -text\n".encode() for ext in LFS_EXTENSIONS
)
POINTER_SIZE_HINT = 134


def git_blob_oid(data: bytes) -> str:
    """Git's blob id: sha1 of 'blob <size>\\0' + content (what the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def oid(self) -> str:
        """Git blob oid: of the pointer file for LFS files, of the content otherwise."""
        return git_blob_oid(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: str | bool = False  # "auto" | "manual" | False
    gated_allowed: set[str] = field(default_factory=set)  # users who accepted the terms
    refs: dict[str, str] = field(default_factory=dict)  # "main" or "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = ""
    pr_count: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class Token:
    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()


class HubError(Exception):
    """An HTTP error answer: status, message, optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def front_matter(text: str) -> dict[str, Any]:
    """README front matter as the Hub parses it for `cardData` (raises HubError 400 on invalid YAML)."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise HubError(400, "front matter is not closed")
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        raise HubError(400, f"Error parsing YAML metadata: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HubError(400, "YAML metadata must be a mapping")
    return data


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
        self.jobs: list[dict[str, Any]] = []  # HF Jobs submitted (POST /api/jobs/{ns})
        self.unhandled: list[tuple[str, str]] = []
        self.crashes: list[str] = []  # handler exceptions (FakeHub bugs), answered with 500
        self.lock = threading.RLock()
        self._counter = itertools.count(1)
        self._lfs_failures: list[int] = []  # statuses for the next LFS uploads
        self._commit_failures: list[tuple[int, bool]] = []  # (status, apply the commit before failing)
        self._before_commit: list[Callable[[], None]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct state access for tests
    def create_repo(self, repo_id: str, *, private: bool = False, gated: str | bool = False,
                    author: str = "system") -> Repo:
        with self.lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id=repo_id, private=private, gated=gated, created_at=_now())
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

    def count(self, method: str, pattern: str) -> int:
        """How many requests matched `method` and the regex `pattern` on the path."""
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    # ------------------------------------------------------------------ fault injection
    def fail_next_lfs_uploads(self, times: int = 1, status: int = 500) -> None:
        """The next `times` LFS PUTs answer `status` (the body is read and dropped)."""
        with self.lock:
            self._lfs_failures.extend([status] * times)

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
        commit = Commit(oid, parent, title, message, author, _now(), files)
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the FakeHub; every answer has a Content-Length so keep-alive works."""

    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read hub.requests instead
        pass

    # ---------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        # recorded before the answer leaves: a client that got it may look at `requests` at once
        self.fake.requests.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message, **err.extra}, headers)

    def _dispatch(self) -> None:
        self.raw_body = self._body() if self.command in ("POST", "PUT", "DELETE", "PATCH") else b""
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            for route in _ROUTES:
                if route.method == self.command or (route.method == "GET" and self.command == "HEAD"):
                    params = route.match(segments)
                    if params is not None:
                        getattr(self, route.handler)(**params)
                        return
            self.fake.unhandled.append((self.command, self.path))
            raise HubError(404, f"FakeHub does not implement {self.command} {split.path}")
        except HubError as e:
            self._error(e)
        except Exception as e:  # a FakeHub bug: answer 500 (the client may retry) and keep it for the test
            self.fake.crashes.append(f"{self.command} {self.path}: {type(e).__name__}: {e}")
            self._error(HubError(500, f"FakeHub crashed: {type(e).__name__}: {e}"))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _dispatch

    # ---------------------------------------------------------------- auth
    def _token(self, required: bool = False) -> Token | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            if required:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        token = self.fake.tokens.get(header[len("Bearer "):].strip())
        if token is None:  # same text as the Hub: the client reads it as an auth error, not RepoNotFound
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _can_read(self, repo: Repo, token: Token | None) -> None:
        if repo.private and (token is None or repo.namespace not in (token.user, *token.orgs)):
            raise HubError(404, f"Repository Not Found: {repo.repo_id}", "RepoNotFound")

    def _can_write(self, namespace: str, token: Token | None) -> Token:
        if token is None:
            raise HubError(401, "You must be authenticated to write")
        if not token.write or namespace not in (token.user, *token.orgs):
            raise HubError(403, f"You don't have the rights to write to {namespace}")
        return token

    def _read_repo(self, ns: str, name: str) -> Repo:
        token = self._token()
        repo = self.fake._repo(f"{ns}/{name}")
        self._can_read(repo, token)
        return repo

    def _json_body(self) -> Any:
        try:
            return json.loads(self.raw_body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"invalid JSON body: {e}") from e

    # ---------------------------------------------------------------- endpoints
    def whoami(self) -> None:
        token = self._token(required=True)
        assert token is not None
        self._json(200, {
            "type": "user", "id": token.user, "name": token.user, "fullname": token.user,
            "orgs": [{"name": o, "type": "org"} for o in token.orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "test", "role": "write" if token.write else "read"}},
        })

    def agent_harnesses(self) -> None:
        raise HubError(404, "not on this hub")

    def repo_create(self) -> None:
        token = self._token()
        body = self._json_body()
        if body.get("type", "model") not in ("model", None):
            raise HubError(400, "FakeHub only hosts model repos")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise HubError(400, f"invalid repo name: {name!r}")
        namespace = body.get("organization") or (token.user if token else None)
        if namespace is None:
            raise HubError(401, "You must be authenticated to create a repo")
        self._can_write(namespace, token)
        repo_id = f"{namespace}/{name}"
        url = f"{self.fake.url}/{repo_id}"
        with self.fake.lock:
            if repo_id in self.fake.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            private = bool(body.get("private")) or body.get("visibility") == "private"
            self.fake.create_repo(repo_id, private=private, author=token.user if token else "system")
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def repo_delete(self) -> None:
        token = self._token()
        body = self._json_body()
        namespace = body.get("organization") or (token.user if token else "")
        self._can_write(namespace, token)
        with self.fake.lock:
            self.fake._repo(f"{namespace}/{body.get('name')}")
            del self.fake.repos[f"{namespace}/{body.get('name')}"]
        self._json(200, {})

    def validate_yaml(self) -> None:
        body = self._json_body()
        try:
            meta = front_matter(body.get("content") or "")
        except HubError as e:
            self._json(400, {"errors": [{"message": e.message}], "warnings": []})
            return
        errors = []
        if "license" in meta and not isinstance(meta["license"], (str, list)):
            errors.append({"message": '"license" must be a string'})
        base = meta.get("base_model")
        if base is not None and not (isinstance(base, str) or (isinstance(base, list)
                                                                and all(isinstance(b, str) for b in base))):
            errors.append({"message": '"base_model" must be a string or a list of strings'})
        if "tags" in meta and not isinstance(meta["tags"], list):
            errors.append({"message": '"tags" must be an array'})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _siblings(self, commit: Commit, blobs: bool) -> list[dict[str, Any]]:
        out = []
        for path, f in sorted(commit.files.items()):
            item: dict[str, Any] = {"rfilename": path}
            if blobs:
                item.update(size=f.size, blobId=f.oid)
                if f.lfs:
                    item["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.pointer)}
            out.append(item)
        return out

    def model_info(self, ns: str, name: str, rev: str = "main") -> None:
        repo = self._read_repo(ns, name)
        with self.fake.lock:
            commit = repo.commits[self.fake._resolve(repo, rev)]
        readme = commit.files.get("README.md")
        try:
            card = front_matter(readme.data.decode("utf-8", "replace")) if readme else {}
        except HubError:
            card = {}
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        lic = card.get("license")
        if isinstance(lic, str):
            tags.append(f"license:{lic}")
        blobs = self.query.get("blobs", ["false"])[0] in ("true", "1", "True")
        self._json(200, {
            "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
            "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
            "tags": tags, "pipeline_tag": card.get("pipeline_tag"), "library_name": card.get("library_name"),
            "cardData": card or None, "siblings": self._siblings(commit, blobs),
        })

    def refs(self, ns: str, name: str) -> None:
        repo = self._read_repo(ns, name)
        with self.fake.lock:
            branches = [{"name": r, "ref": f"refs/heads/{r}", "targetCommit": oid}
                        for r, oid in repo.refs.items() if not r.startswith("refs/")]
            prs = [{"name": r, "ref": r, "targetCommit": oid} for r, oid in repo.refs.items() if r.startswith("refs/pr/")]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs"):
            out["pullRequests"] = prs
        self._json(200, out)

    def tree(self, ns: str, name: str, rev: str, path: str = "") -> None:
        repo = self._read_repo(ns, name)
        with self.fake.lock:
            commit = repo.commits[self.fake._resolve(repo, rev)]
        recursive = self.query.get("recursive", ["false"])[0] in ("true", "1", "True")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            if path.strip("/") in commit.files:
                prefix = ""
            else:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for p, f in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # directories on the way
                if not recursive and depth > 1:
                    break
                d = prefix + "/".join(parts[:depth])
                entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d,
                                       "size": 0})
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
                if f.lfs:
                    item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                entries[p] = item
        self._json(200, list(entries.values()))

    def paths_info(self, ns: str, name: str, rev: str) -> None:
        repo = self._read_repo(ns, name)
        form = parse_qs(self.raw_body.decode())
        if not form and self.raw_body.startswith(b"{"):
            form = {k: (v if isinstance(v, list) else [v]) for k, v in self._json_body().items()}
        with self.fake.lock:
            commit = repo.commits[self.fake._resolve(repo, rev)]
        out = []
        for p in form.get("paths", []):
            f = commit.files.get(p)
            if f is not None:
                item: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
                if f.lfs:
                    item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                out.append(item)
            elif any(q.startswith(p.rstrip("/") + "/") for q in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p})
        self._json(200, out)

    def commits(self, ns: str, name: str, rev: str) -> None:
        repo = self._read_repo(ns, name)
        with self.fake.lock:
            oid: str | None = self.fake._resolve(repo, rev)
            items = []
            while oid is not None:
                c = repo.commits[oid]
                items.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                              "authors": [{"user": c.author}]})
                oid = c.parent
        self._json(200, items)

    def preupload(self, ns: str, name: str, rev: str) -> None:
        token = self._token()
        repo = self.fake._repo(f"{ns}/{name}")
        self._can_read(repo, token)
        self._can_write(repo.namespace, token)
        with self.fake.lock:
            commit = repo.commits[self.fake._resolve(repo, rev)]
        out = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            mode = "lfs" if self.fake._is_lfs(path, size) else "regular"
            remote = commit.files.get(path)
            oid = None
            if remote is not None:
                oid = remote.sha256 if mode == "lfs" else git_blob_oid(remote.data)
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": commit.oid})

    def lfs_batch(self, ns: str, name: str) -> None:
        token = self._token()
        repo = self.fake._repo(f"{ns}/{name}")
        self._can_read(repo, token)
        body = self._json_body()
        if body.get("operation") == "upload":
            self._can_write(repo.namespace, token)
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with self.fake.lock:
                present = oid in self.fake.lfs_store
            if not present:
                entry["actions"] = {
                    "upload": {"href": f"{self.fake.url}/__lfs/upload/{oid}/{size}", "header": {}},
                    "verify": {"href": f"{self.fake.url}/__lfs/verify/{ns}/{name}", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str, size: str) -> None:
        with self.fake.lock:
            failure = self.fake._lfs_failures.pop(0) if self.fake._lfs_failures else None
        if failure is not None:
            raise HubError(failure, "injected LFS upload failure")
        data = self.raw_body
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its oid/size")
        with self.fake.lock:
            self.fake.lfs_store[oid] = data
        self._send(200, b"", content_type="text/plain")

    def lfs_verify(self, ns: str, name: str) -> None:
        body = self._json_body()
        with self.fake.lock:
            data = self.fake.lfs_store.get(body.get("oid", ""))
        if data is None or len(data) != int(body.get("size", -1)):
            raise HubError(404, f"LFS object {body.get('oid')} not found")
        self._json(200, {"success": True})

    def commit(self, ns: str, name: str, rev: str) -> None:
        token = self._token()
        repo_id = f"{ns}/{name}"
        repo = self.fake._repo(repo_id)
        self._can_read(repo, token)
        token = self._can_write(repo.namespace, token)
        lines = [json.loads(line) for line in self.raw_body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        with self.fake.lock:
            hooks, self.fake._before_commit = self.fake._before_commit, []
        for hook in hooks:
            hook()
        with self.fake.lock:
            failure = self.fake._commit_failures.pop(0) if self.fake._commit_failures else None
            if rev not in repo.refs:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.refs[rev]
            parent_commit = header.get("parentCommit")
            if create_pr:
                start = self.fake._resolve(repo, parent_commit) if parent_commit else head
            else:
                start = head
                if parent_commit and not head.startswith(parent_commit):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[start].files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    tree[path] = StoredFile(data, lfs=False)
                elif key == "lfsFile":
                    data = self.fake.lfs_store.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS file {path} ({value['oid']}) was not uploaded")
                    tree[path] = StoredFile(data, lfs=True)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                else:
                    raise HubError(400, f"unknown NDJSON key {key!r}")
            if failure is not None and not failure[1]:
                raise HubError(failure[0], "injected commit failure")
            pr_url = None
            if create_pr:
                repo.pr_count += 1
                ref = f"refs/pr/{repo.pr_count}"
                pr_url = f"{self.fake.url}/{repo_id}/discussions/{repo.pr_count}"
            else:
                ref = rev
            repo.refs.setdefault(ref, start)
            new = self.fake._make_commit(repo, start, tree, header.get("summary", ""), header.get("description", ""),
                                         token.user, ref=ref)
            if failure is not None:
                raise HubError(failure[0], "injected failure after the commit was applied")
        self._json(200, {"success": True, "commitOid": new.oid, "commitUrl": f"{self.fake.url}/{repo_id}/commit/{new.oid}",
                         "commitMessage": new.title, "hookOutput": "", "pullRequestUrl": pr_url})

    def resolve(self, ns: str, name: str, rev: str, path: str) -> None:
        token = self._token()
        repo = self.fake._repo(f"{ns}/{name}")
        self._can_read(repo, token)
        if repo.gated and (token is None or (token.user not in repo.gated_allowed and repo.namespace != token.user)):
            raise HubError(403, f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                                "authenticated to access it. Please log in.", "GatedRepo")
        with self.fake.lock:
            oid = self.fake._resolve(repo, rev)
            f = repo.commits[oid].files.get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": oid, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        data, status = f.data, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None:
                raise HubError(416, f"bad range {rng}")
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else f.size - 1
            if start >= f.size:
                raise HubError(416, "range not satisfiable")
            data, status = f.data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{min(end, f.size - 1)}/{f.size}"
        self._send(status, data, headers, content_type="application/octet-stream")


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: tuple[str, ...]  # literal segments, "{x}" captures one, "{x*}" captures the rest (joined)
    handler: str

    def match(self, segments: list[str]) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for i, pat in enumerate(self.pattern):
            if pat.endswith("*}"):
                rest = segments[i:]
                if not rest or not all(rest):
                    return None
                out[pat[1:-2]] = "/".join(rest)
                return out
            if i >= len(segments):
                return None
            seg = segments[i]
            if pat.startswith("{"):
                if pat == "{name.git}":
                    if not seg.endswith(".git"):
                        return None
                    out["name"] = seg[:-4]
                else:
                    if not seg:
                        return None
                    out[pat[1:-1]] = seg
            elif pat != seg:
                return None
        return out if len(segments) == len(self.pattern) else None



def _job_create(self, ns: str) -> None:
    """HF Jobs: POST /api/jobs/{namespace} with a job spec; recorded in FakeHub.jobs, answered as SCHEDULING."""
    token = self._token(required=True)
    if ns != token.user and ns not in token.orgs:
        raise HubError(403, f"cannot run jobs in {ns}")
    spec = self._json_body()
    job_id = f"job{len(self.fake.jobs) + 1:04d}"
    self.fake.jobs.append({"id": job_id, "namespace": ns, **spec})
    self._json(200, {"id": job_id, "createdAt": _now(), "dockerImage": spec.get("dockerImage"),
                     "command": spec.get("command"), "arguments": spec.get("arguments"),
                     "environment": spec.get("environment"), "flavor": spec.get("flavor"),
                     "labels": spec.get("labels"), "owner": {"id": ns, "name": ns, "type": "user"},
                     "status": {"stage": "SCHEDULING", "message": None}})


_Handler.job_create = _job_create  # type: ignore[attr-defined]

_ROUTES = [
    _Route("POST", ("api", "jobs", "{ns}"), "job_create"),  # HF Jobs (run_job), see _Handler.job_create
    _Route("GET", ("api", "whoami-v2"), "whoami"),
    _Route("GET", ("api", "agent-harnesses"), "agent_harnesses"),
    _Route("POST", ("api", "repos", "create"), "repo_create"),
    _Route("DELETE", ("api", "repos", "delete"), "repo_delete"),
    _Route("POST", ("api", "validate-yaml"), "validate_yaml"),
    _Route("GET", ("api", "models", "{ns}", "{name}"), "model_info"),
    _Route("GET", ("api", "models", "{ns}", "{name}", "revision", "{rev}"), "model_info"),
    _Route("GET", ("api", "models", "{ns}", "{name}", "refs"), "refs"),
    _Route("GET", ("api", "models", "{ns}", "{name}", "tree", "{rev}"), "tree"),
    _Route("GET", ("api", "models", "{ns}", "{name}", "tree", "{rev}", "{path*}"), "tree"),
    _Route("POST", ("api", "models", "{ns}", "{name}", "paths-info", "{rev}"), "paths_info"),
    _Route("GET", ("api", "models", "{ns}", "{name}", "commits", "{rev}"), "commits"),
    _Route("POST", ("api", "models", "{ns}", "{name}", "preupload", "{rev}"), "preupload"),
    _Route("POST", ("api", "models", "{ns}", "{name}", "commit", "{rev}"), "commit"),
    _Route("POST", ("{ns}", "{name.git}", "info", "lfs", "objects", "batch"), "lfs_batch"),
    _Route("PUT", ("__lfs", "upload", "{oid}", "{size}"), "lfs_upload"),
    _Route("POST", ("__lfs", "verify", "{ns}", "{name}"), "lfs_verify"),
    _Route("GET", ("{ns}", "{name}", "resolve", "{rev}", "{path*}"), "resolve"),
]

__all__ = ["FakeHub", "Token", "HubError", "StoredFile", "Commit", "Repo", "git_blob_oid", "front_matter"]
