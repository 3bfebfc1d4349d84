"""Downloads: resolve (HEAD/GET with ETag, X-Repo-Commit, X-Linked-Etag/-Size) and byte ranges."""

from __future__ import annotations

import re
from typing import Any

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
        self.fake.requests.append((self.command, self.path, 206))
        self.fake.sent.append((self.command, self.path, len(sent)))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(sent)
        self.wfile.flush()
        self.close_connection = True
