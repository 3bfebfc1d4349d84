"""Uploads: preupload (regular or LFS per file), the LFS batch API with basic transfer, upload and verify."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from tests.hubserver.state import HubError, git_blob_oid


class Lfs:
    """Endpoints of _Handler."""

    fake: Any
    raw_body: bytes

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
        if self.fake.lfs_delay:  # a slow upload link: lets a test stop a client half-way through
            time.sleep(self.fake.lfs_delay)
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
