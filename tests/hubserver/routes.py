"""Which endpoint answers which request: literal segments, `{x}` captures one, `{x*}` the rest."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
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


ROUTES = [
    Route("POST", ("api", "jobs", "{ns}"), "job_create"),  # HF Jobs (run_job)
    Route("GET", ("api", "settings", "webhooks"), "webhook_list"),
    Route("POST", ("api", "settings", "webhooks"), "webhook_create"),
    Route("GET", ("api", "settings", "webhooks", "{webhook_id}"), "webhook_get"),
    Route("POST", ("api", "settings", "webhooks", "{webhook_id}"), "webhook_update"),
    Route("DELETE", ("api", "settings", "webhooks", "{webhook_id}"), "webhook_delete"),
    Route("POST", ("api", "settings", "webhooks", "{webhook_id}", "enable"), "webhook_enable"),
    Route("POST", ("api", "settings", "webhooks", "{webhook_id}", "disable"), "webhook_disable"),
    Route("GET", ("api", "whoami-v2"), "whoami"),
    Route("GET", ("api", "agent-harnesses"), "agent_harnesses"),
    Route("POST", ("api", "repos", "create"), "repo_create"),
    Route("DELETE", ("api", "repos", "delete"), "repo_delete"),
    Route("POST", ("api", "validate-yaml"), "validate_yaml"),
    Route("GET", ("api", "models", "{ns}", "{name}"), "model_info"),
    Route("GET", ("api", "models", "{ns}", "{name}", "revision", "{rev}"), "model_info"),
    Route("GET", ("api", "models", "{ns}", "{name}", "refs"), "refs"),
    Route("PUT", ("api", "models", "{ns}", "{name}", "settings"), "repo_settings"),  # update_repo_settings
    Route("GET", ("api", "models", "{ns}", "{name}", "tree", "{rev}"), "tree"),
    Route("GET", ("api", "models", "{ns}", "{name}", "tree", "{rev}", "{path*}"), "tree"),
    Route("POST", ("api", "models", "{ns}", "{name}", "paths-info", "{rev}"), "paths_info"),
    Route("GET", ("api", "models", "{ns}", "{name}", "commits", "{rev}"), "commits"),
    Route("POST", ("api", "models", "{ns}", "{name}", "preupload", "{rev}"), "preupload"),
    Route("POST", ("api", "models", "{ns}", "{name}", "commit", "{rev}"), "commit"),
    Route("POST", ("{ns}", "{name.git}", "info", "lfs", "objects", "batch"), "lfs_batch"),
    Route("PUT", ("__lfs", "upload", "{oid}", "{size}"), "lfs_upload"),
    Route("POST", ("__lfs", "verify", "{ns}", "{name}"), "lfs_verify"),
    Route("GET", ("{ns}", "{name}", "resolve", "{rev}", "{path*}"), "resolve"),
    Route("GET", ("__storage", "{sha256}", "{path*}"), "storage"),  # where `lfs_redirect` sends resolve
]
