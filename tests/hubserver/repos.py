"""Repos and commits: whoami, create/delete, validate-yaml, model info, refs, tree, paths-info, the commit
log and NDJSON commits with the `parentCommit` check (412 when stale, as the Hub)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any
from urllib.parse import parse_qs

from tests.hubserver.state import Commit, HubError, StoredFile, front_matter


class Repos:
    """Endpoints of _Handler (which provides fake, query, raw_body and the plumbing)."""

    fake: Any
    query: dict[str, list[str]]
    raw_body: bytes

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

    def repo_settings(self, ns: str, name: str) -> None:
        """PUT /api/models/{ns}/{name}/settings: visibility ("private"/"public", or the older `private` flag) and
        gating, by a token that may write the namespace (what HfApi.update_repo_settings sends)."""
        token = self._token()
        self._can_write(ns, token)
        body = self._json_body()
        with self.fake.lock:
            repo = self.fake._repo(f"{ns}/{name}")
            if body.get("visibility") in ("private", "public"):
                repo.private = body["visibility"] == "private"
            elif isinstance(body.get("private"), bool):
                repo.private = body["private"]
            if "gated" in body:
                repo.gated = body["gated"]
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
