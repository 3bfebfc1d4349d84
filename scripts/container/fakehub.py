"""The loopback Hub (tests/hubserver.py) as a process, for scripts/container/test-image.sh.

    FAKEHUB_TOKEN=hf_x python scripts/container/fakehub.py --user U --url-file F --state-file S

Serves on 127.0.0.1 (a free port), writes its URL to --url-file once it listens, and on SIGTERM/SIGINT writes
what it holds to --state-file as JSON: {"repos": {repo_id: {"head", "commits", "files": {path: size}}},
"crashes", "unhandled", "requests"} -- then exits. The token comes from the environment, not the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.hubserver import FakeHub, Token  # noqa: E402


def state(hub: FakeHub) -> dict:
    with hub.lock:
        repos = {
            repo_id: {"head": hub.head(repo_id), "commits": len(hub.history(repo_id)),
                      "files": {path: len(data) for path, data in sorted(hub.files(repo_id).items())}}
            for repo_id in sorted(hub.repos) if "main" in hub.repos[repo_id].refs
        }
        return {"repos": repos, "crashes": list(hub.crashes), "unhandled": [list(u) for u in hub.unhandled],
                "requests": len(hub.requests)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--user", required=True)
    p.add_argument("--org", default="mergebot-ci-org")
    p.add_argument("--url-file", type=Path, required=True)
    p.add_argument("--state-file", type=Path, required=True)
    args = p.parse_args()
    token = os.environ["FAKEHUB_TOKEN"]

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    hub = FakeHub(tokens={token: Token(user=args.user, orgs=(args.org,))}).start()
    try:
        tmp = args.url_file.with_suffix(".tmp")
        tmp.write_text(hub.url + "\n")
        tmp.replace(args.url_file)  # appears whole: the caller polls for it
        while not stop.wait(0.5):
            pass
        args.state_file.write_text(json.dumps(state(hub), indent=2) + "\n")
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
