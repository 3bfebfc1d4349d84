"""Publishing a merge output directory to the Hugging Face Hub as one atomic commit.

Why this shape:
- one `create_commit` with every file (and deletions of files no longer produced) so `main` never shows a
  half-updated model (`upload_folder` with hf_xet may split large folders into several commits, doc §2.1);
- `parent_commit=<head read before>` so a concurrent push makes the Hub answer 412 instead of silently
  interleaving; we raise `PublishConflict` and leave the other commit as head;
- the local files are compared with the remote head first (sha256 for LFS files, git blob sha1 for the rest,
  from the tree listing), so republishing an unchanged merge makes no commit at all;
- connection errors and 5xx are retried with backoff; a commit whose response was lost is recognised by the
  head having moved to a tree equal to ours, so a retry never commits twice;
- the token is never printed nor put into an exception message (messages are scrubbed of it, and chained
  library exceptions are dropped for auth errors).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mergebot.card.licenses import LicenseReport
from mergebot.errors import MergebotError
from mergebot.hub.client import client, resolve_endpoint, resolve_token
from mergebot.hub.errors import is_transport
from mergebot.io import confine
from mergebot.io.lockfile import LOCK_FILE, read_lock

T = TypeVar("T")
PRESERVED_REMOTE = frozenset({".gitattributes"})  # never deleted even though the engine does not write it
SKIP_DIRS = frozenset({".git", ".cache", "__pycache__"})  # local bookkeeping, never published


class PublishError(MergebotError):
    """Publishing failed; the remote head is unchanged unless the message says otherwise."""


class PublishConflict(PublishError):
    """Someone else committed to the branch between our read of its head and our commit."""

    exit_code = 4


class PublishAuthError(PublishError):
    """The Hub rejected the token (401/403) or no token is available."""

    exit_code = 3


class LicenseGateError(PublishError):
    """The license analysis says `block` and the user did not accept the risk."""

    exit_code = 2


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for transient failures (connection errors, 429, 5xx); delays double up to `max_delay`."""

    attempts: int = 4
    base_delay: float = 1.0
    max_delay: float = 8.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * (2 ** attempt))


@dataclass
class PublishResult:
    repo_id: str
    changed: bool
    commit: str  # the new commit, or the unchanged head
    commit_url: str | None = None
    pr_url: str | None = None
    uploaded: list[str] = field(default_factory=list)  # paths added or modified
    deleted: list[str] = field(default_factory=list)
    endpoint: str = ""
    retries: int = 0  # transient failures that were retried

    @property
    def repo_url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"


@dataclass
class LocalFile:
    path: str  # POSIX path in the repo
    abspath: Path
    size: int
    _sha256: str | None = None
    _git_oid: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.abspath, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    @property
    def git_oid(self) -> str:
        if self._git_oid is None:
            h = hashlib.sha1(b"blob %d\x00" % self.size)
            with open(self.abspath, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._git_oid = h.hexdigest()
        return self._git_oid


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    git_oid: str
    lfs_sha256: str | None


def local_files(out_dir: Path) -> dict[str, LocalFile]:
    """Every regular file under out_dir (recursively), minus local bookkeeping directories."""
    out: dict[str, LocalFile] = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        out[rel.as_posix()] = LocalFile(rel.as_posix(), path, path.stat().st_size)
    return out


def is_unchanged(local: LocalFile, remote: RemoteFile) -> bool:
    """Equal content, judged the way the Hub stores the file: sha256 for LFS, git blob sha1 otherwise."""
    if local.size != remote.size:
        return False
    if remote.lfs_sha256 is not None:
        return local.sha256 == remote.lfs_sha256
    return local.git_oid == remote.git_oid


def plan_changes(local: dict[str, LocalFile], remote: dict[str, RemoteFile]) -> tuple[list[str], list[str]]:
    """(paths to upload because new or different, remote paths to delete)."""
    uploads = [p for p, f in local.items() if p not in remote or not is_unchanged(f, remote[p])]
    deletes = [p for p in remote if p not in local and p not in PRESERVED_REMOTE]
    return uploads, deletes


def commit_message(lock: dict[str, Any]) -> tuple[str, str]:
    """(summary, description): the summary names the config hash, the description every parent's sha."""
    summary = f"mergebot: {lock.get('merge_method') or lock.get('kind', 'merge')} merge, config sha256 " \
              f"{str(lock['config_sha256'])[:12]}"
    lines = [f"config_sha256: {lock['config_sha256']}", "parents:"]
    for p in lock["parents"]:
        pin = p.get("sha") or ("local" if p.get("local") else (p.get("revision") or "unpinned"))
        lines.append(f"- {p['ref']}@{pin}" + (f" ({p['role']})" if p.get("role") else ""))
    lines.append(f"mergebot {lock.get('mergebot_version', 'unknown')}")
    return summary, "\n".join(lines)


class Publisher:
    """One publish call: the HfApi, the token to scrub, and the retry bookkeeping."""

    def __init__(self, api: Any, token: str, endpoint: str, repo_id: str, retry: RetryPolicy):
        self.api, self.token, self.endpoint, self.repo_id, self.retry = api, token, endpoint, repo_id, retry
        self.retries = 0

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    @staticmethod
    def http_error(e: BaseException) -> Any:
        """The HfHubHTTPError behind `e` (the client wraps LFS upload errors in RuntimeError), if any."""
        from huggingface_hub.errors import HfHubHTTPError

        seen: set[int] = set()
        cur: BaseException | None = e
        while cur is not None and id(cur) not in seen:
            if isinstance(cur, HfHubHTTPError):
                return cur
            seen.add(id(cur))
            cur = cur.__cause__ or cur.__context__
        return None

    def describe(self, e: BaseException) -> str:
        http = self.http_error(e)
        if http is not None:
            status = http.response.status_code if http.response is not None else "?"
            server = getattr(http, "server_message", None) or str(http).strip().splitlines()[0]
            prefix = f"{e}: " if http is not e else ""
            return self.scrub(f"{prefix}HTTP {status}: {server}")
        return self.scrub(f"{type(e).__name__}: {e}")

    def status(self, e: BaseException) -> int | None:
        http = self.http_error(e)
        return http.response.status_code if http is not None and http.response is not None else None

    def transient(self, e: BaseException) -> bool:
        status = self.status(e)
        if status is not None:
            return status == 429 or status >= 500
        cur: BaseException | None = e
        while cur is not None:
            if is_transport(cur) or isinstance(cur, (ConnectionError, TimeoutError)):
                return True
            cur = cur.__cause__
        return False

    def translate(self, e: BaseException, what: str) -> PublishError | None:
        """Map a library error to ours (None: not ours to map)."""
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        # only the Hub's own answers speak about the token; a 403 from a storage upload URL (wrapped by the
        # client in a RuntimeError) is an upload failure, not an auth failure
        status = self.status(e) if self.http_error(e) is e else None
        if isinstance(e, GatedRepoError):
            return PublishError(f"{what}: {self.repo_id} on {self.endpoint} is gated and this token has no access")
        if status in (401, 403) and not isinstance(e, RepositoryNotFoundError):
            return PublishAuthError(f"token rejected by {self.endpoint} for {self.repo_id}: {self.describe(e)}")
        if isinstance(e, RepositoryNotFoundError):
            return PublishAuthError(
                f"{what}: {self.repo_id} not found on {self.endpoint}, or the token cannot see it ({self.describe(e)})")
        return None

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures; other errors become PublishError subclasses."""
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except PublishError:
                raise
            except Exception as e:
                mapped = self.translate(e, what)
                if mapped is not None:
                    raise mapped from None  # the library's message may echo request details: keep it out
                if self.transient(e) and attempt + 1 < self.retry.attempts:
                    self.retries += 1
                    self.retry.sleep(self.retry.delay(attempt))
                    continue
                raise PublishError(f"{what} failed for {self.repo_id} on {self.endpoint}: {self.describe(e)}") from e
        raise AssertionError("unreachable")

    def head(self, revision: str) -> str:
        info = self.call(f"reading the head of {revision}",
                         lambda: self.api.repo_info(self.repo_id, revision=revision, token=self.token))
        if not info.sha:
            raise PublishError(f"{self.endpoint} returned no commit sha for {self.repo_id}@{revision}")
        return info.sha

    def remote_files(self, sha: str) -> dict[str, RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        entries = self.call("listing the remote files", lambda: list(
            self.api.list_repo_tree(self.repo_id, revision=sha, recursive=True, token=self.token)))
        out: dict[str, RemoteFile] = {}
        for e in entries:
            if isinstance(e, RepoFile):
                out[e.path] = RemoteFile(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None)
        return out


def publish(
    out_dir: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    revision: str = "main",
    endpoint: str | None = None,
    license_report: LicenseReport | None = None,
    allow_license_risk: bool = False,
    retry: RetryPolicy = RetryPolicy(),
    api: Any = None,
    preuploaded: Sequence[Any] = (),
) -> PublishResult:
    """Publish every file of `out_dir` to `repo_id` in one commit on `revision` (or one PR with `create_pr`).

    `license_report` is the gate: a `block` verdict refuses to publish unless `allow_license_risk`.
    Returns `changed=False` and the current head when the remote already holds exactly these files.
    `preuploaded`: files already on the Hub's LFS storage and no longer on disk (mergebot.hub.stream.Uploaded:
    path, size, sha256, the uploaded CommitOperationAdd), committed with the others.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise PublishError(f"{out_dir}: output directory does not exist")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PublishError(f"--repo {repo_id!r}: expected ORG/NAME")
    if license_report is not None and license_report.verdict == "block" and not allow_license_risk:
        raise LicenseGateError(
            f"license check blocks publishing {out_dir} to {repo_id}:\n  "
            + "\n  ".join(r for r in license_report.reasons if r.startswith("block"))
            + "\nfix the parents or the name, or pass --allow-license-risk after a human review")
    confine.audit_tree(out_dir, str(out_dir))  # nothing a link leads to outside OUT_DIR is uploaded
    lock = read_lock(out_dir)
    files = local_files(out_dir)
    streamed = {u.path: u.operation for u in preuploaded}
    for u in preuploaded:  # compared by sha256 and size like any LFS file; never read from disk
        files[u.path] = LocalFile(u.path, out_dir / u.path, u.size, _sha256=u.sha256)
    if LOCK_FILE not in files:
        raise PublishError(f"{out_dir}: {LOCK_FILE} must be published with the weights")

    endpoint = resolve_endpoint(endpoint)
    resolved = resolve_token(token)
    if not resolved:
        raise PublishAuthError(
            f"no Hugging Face token for {endpoint}: pass --token, set HF_TOKEN, or run `hf auth login`")
    hf = api or client(endpoint, resolved)
    pub = Publisher(hf, resolved, endpoint, repo_id, retry)

    pub.call("creating the repo", lambda: hf.create_repo(repo_id, private=private, exist_ok=True, token=resolved))
    head = pub.head(revision)
    remote = pub.remote_files(head)
    uploads, deletes = plan_changes(files, remote)
    if not uploads and not deletes:
        return PublishResult(repo_id, changed=False, commit=head, endpoint=endpoint, retries=pub.retries)

    summary, description = commit_message(lock)

    def operations() -> list[Any]:
        # fresh objects per attempt: the client mutates them; sha256 is passed in so files are hashed once
        ops: list[Any] = []
        for f in files.values():
            if f.path in streamed:  # uploaded already: the client only names it in the commit
                ops.append(streamed[f.path])
                continue
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.abspath))
            op.upload_info.sha256 = bytes.fromhex(f.sha256)
            ops.append(op)
        ops.extend(CommitOperationDelete(path_in_repo=p, is_folder=False) for p in deletes)
        return ops

    def landed() -> str | None:
        """After a lost response: the new head, if it holds exactly our files on top of `head`."""
        now = pub.head(revision)
        if now == head:
            return None
        after = pub.remote_files(now)
        still_up, still_del = plan_changes(files, after)
        if still_up or still_del:
            raise PublishConflict(
                f"{repo_id}@{revision} moved from {head[:12]} to {now[:12]} while publishing; "
                "someone else committed: re-run to publish on top of it")
        return now

    for attempt in range(retry.attempts):
        try:
            info = hf.create_commit(
                repo_id, operations(), commit_message=summary, commit_description=description, token=resolved,
                revision=revision, create_pr=create_pr, parent_commit=head,
            )
            break
        except Exception as e:
            status = pub.status(e)
            if status in (409, 412):
                now = pub.head(revision)
                raise PublishConflict(
                    f"{repo_id}@{revision} changed since it was read (expected head {head[:12]}, now {now[:12]}): "
                    "someone else committed; nothing was published, re-run to publish on top of it") from None
            mapped = pub.translate(e, "committing")
            if mapped is not None:
                raise mapped from None
            if not pub.transient(e) or attempt + 1 == retry.attempts:
                raise PublishError(
                    f"commit to {repo_id}@{revision} on {endpoint} failed: {pub.describe(e)}; "
                    f"the head is still {head[:12]} unless a later read says otherwise") from e
            pub.retries += 1
            retry.sleep(retry.delay(attempt))
            if not create_pr:
                new_head = landed()
                if new_head is not None:  # our commit went through; only its response was lost
                    return PublishResult(repo_id, True, new_head, f"{endpoint}/{repo_id}/commit/{new_head}", None,
                                         uploads, deletes, endpoint, pub.retries)
    return PublishResult(
        repo_id, changed=True, commit=info.oid, commit_url=info.commit_url, pr_url=info.pr_url,
        uploaded=uploads, deleted=deletes, endpoint=endpoint, retries=pub.retries,
    )
