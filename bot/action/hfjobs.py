"""Scale out on Hugging Face Jobs: one Job per config to merge, running mergebot's container image.

For users without GPU runners (issue 6 item 6). Each Job gets the config text and its target repo as
environment variables and the token as an encrypted secret, then runs `mergebot merge ... --push-to`. A Job
has no checkout of the repository, so configs whose parents are local directories cannot run there: they
are refused before anything is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergebot.config.configfile import load
from mergebot.errors import MergebotError
from mergebot.hub.client import client
from mergebot.io.local import is_local

JOB_SCRIPT = ('printf "%s" "$MERGEBOT_CONFIG" > /tmp/merge.yml && '
              'exec mergebot merge /tmp/merge.yml /tmp/out --device auto --quiet --push-to "$MERGEBOT_REPO"')


@dataclass
class SubmittedJob:
    config: str
    repo: str
    job_id: str
    url: str


def job_spec(config_path: Path, repo: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of the Job that merges one config."""
    return ["bash", "-c", JOB_SCRIPT], {"MERGEBOT_CONFIG": config_path.read_text(encoding="utf-8"),
                                        "MERGEBOT_REPO": repo}


def submit(items: list[dict], workspace: Path, *, image: str, flavor: str, token: str | None,
           endpoint: str | None, namespace: str | None = None, timeout: str | None = None) -> list[SubmittedJob]:
    """Submit one Job per planned item ({config, repo}); invalid or local-parent configs are refused first."""
    runnable = []
    for it in items:
        if it.get("reason", "").startswith("invalid") or not it.get("repo"):
            raise MergebotError(f"{it['config']}: not submitted to HF Jobs: {it.get('reason')}")
        path = workspace / it["config"]
        cfg = load(path)
        local = [str(r) for r in cfg.referenced_models() if is_local(r, [path.parent]) is not None]
        if local:
            raise MergebotError(f"{it['config']}: parents {', '.join(local)} are local directories, which an HF Job "
                                "cannot see; publish them to the Hub or merge on your own runner")
        runnable.append((it, path))
    api = client(endpoint, token)
    out = []
    for it, path in runnable:
        command, env = job_spec(path, it["repo"])
        info = api.run_job(image=image, command=command, env=env, secrets={"HF_TOKEN": token} if token else None,
                           flavor=flavor, timeout=timeout, namespace=namespace,
                           labels={"mergebot-config": Path(it["config"]).name[:60]})
        out.append(SubmittedJob(it["config"], it["repo"], info.id, info.url))
    return out
