"""Downloads: resolve (HEAD/GET with ETag, X-Repo-Commit, X-Linked-Etag/-Size) and byte ranges."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from tests.hubserver.state import HubError


class Resolve:
    """Endpoints of _Handler."""

    fake: Any
    headers: Any

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
        if f.lfs and self.fake.lfs_redirect:
            # the Hub's answer for LFS/Xet files, HEAD and GET alike: the metadata headers on a 302 to storage
            where = quote(f"{repo.repo_id}/{path}")  # named in the path only so tests can count by repo and file
            headers["Location"] = f"{self.fake.cdn_url}/__storage/{f.sha256}/{where}?X-Signature=fake"
            self._send(302, b"", headers)
            return
        self._ranged(f.data, headers)

    def storage(self, sha256: str, path: str) -> None:  # noqa: ARG002 - `path` is for the request log
        """The storage host behind `lfs_redirect`: the bytes by content hash, with ranges; pre-signed, so a
        request with an Authorization header is refused as S3 refuses it."""
        if "Authorization" in self.headers:
            self.fake.cdn_auth_refused.append(self.path)
            raise HubError(400, "Only one auth mechanism allowed")
        data = self.fake.lfs_store.get(sha256)
        if data is None:
            raise HubError(404, "NoSuchKey")
        self._ranged(data, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    def _ranged(self, data: bytes, headers: dict[str, str]) -> None:
        """`data`, or the part a Range header asks for (206), with the injected range faults."""
        status, size = 200, len(data)
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None:
                raise HubError(416, f"bad range {rng}")
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
            if start >= size:
                raise HubError(416, "range not satisfiable")
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{min(end, size - 1)}/{size}"
            with self.fake.lock:
                fault = self.fake._range_faults.pop(0) if self.fake._range_faults and self.command == "GET" else None
            if fault is not None and fault[0] == "status":
                raise HubError(fault[1], "injected range failure")
            if fault is not None:  # a connection that breaks mid-body
                self._cut(data, fault[1], headers)
                return
        self._send(status, data, headers, content_type="application/octet-stream")

    def _cut(self, data: bytes, after: int, headers: dict[str, str]) -> None:
        """Announce all of `data`, send `after` bytes of it, close the connection."""
        sent = data[:after]
        self.fake.record(self.command, self.path, 206, len(sent))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(sent)
        self.wfile.flush()
        self.close_connection = True
