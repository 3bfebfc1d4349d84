"""A Hub-compatible HTTP server on 127.0.0.1 for offline tests with the real huggingface_hub client.

It implements what huggingface_hub 2.4.0 calls with `HF_HUB_DISABLE_XET=1` (hub-action-cards-licenses.md
§3.2-§3.3): whoami, repo create/delete, model info, refs, tree, commits, preupload, the LFS batch API with basic
transfer + verify, NDJSON commits with the `parentCommit` check (412 when stale, as the Hub), validate-yaml,
resolve (HEAD/GET with ETag, X-Repo-Commit, X-Linked-Etag/-Size and Range; LFS files by a 302 to a storage host
on a second port that refuses the token, as the Hub sends Xet/LFS files to pre-signed URLs) and paths-info. State lives in
memory: repos -> refs -> commits -> {path: file}. Fault hooks let tests fail an LFS upload, fail a commit, or
slip a concurrent commit in just before the next commit request is applied.

Usage:
    with FakeHub(tokens={"hf_test": "alice"}) as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("alice/x")

Layout: state.py (repos, commits, files, errors), server.py (FakeHub: state access, fault injection, the
server), handler.py (request plumbing, auth, dispatch over routes.py), and the endpoints by area: repos.py (repos
and commits), lfs.py (preupload and LFS), resolve.py (downloads and ranges), jobs.py (HF Jobs), webhooks.py
(webhooks).
"""

from tests.hubserver.handler import _Handler
from tests.hubserver.server import FakeHub
from tests.hubserver.state import (
    Commit,
    HubError,
    Repo,
    StoredFile,
    Token,
    front_matter,
    git_blob_oid,
)

__all__ = ["FakeHub", "Token", "HubError", "StoredFile", "Commit", "Repo", "git_blob_oid", "front_matter", "_Handler"]
