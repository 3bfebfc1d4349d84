"""One request to the FakeHub: plumbing (bodies, answers, errors), auth, and the route table's dispatch; the
endpoints live by area in repos.py, lfs.py, resolve.py and jobs.py."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hubserver.jobs import Jobs
from tests.hubserver.lfs import Lfs
from tests.hubserver.repos import Repos
from tests.hubserver.resolve import Resolve
from tests.hubserver.routes import ROUTES
from tests.hubserver.server import FakeHub
from tests.hubserver.state import HubError, Repo, Token
from tests.hubserver.webhooks import Webhooks


class _Handler(Repos, Lfs, Resolve, Jobs, Webhooks, BaseHTTPRequestHandler):
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
        self.fake.record(self.command, self.path, status, 0 if self.command == "HEAD" else len(body))
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
            for route in ROUTES:
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
