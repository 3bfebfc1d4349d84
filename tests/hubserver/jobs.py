"""HF Jobs: POST /api/jobs/{namespace} (run_job)."""

from __future__ import annotations

from typing import Any

from tests.hubserver.state import HubError, now


class Jobs:
    """Endpoints of _Handler."""

    fake: Any

    def job_create(self, ns: str) -> None:
        """HF Jobs: POST /api/jobs/{namespace} with a job spec; recorded in FakeHub.jobs, answered as SCHEDULING."""
        token = self._token(required=True)
        if ns != token.user and ns not in token.orgs:
            raise HubError(403, f"cannot run jobs in {ns}")
        spec = self._json_body()
        job_id = f"job{len(self.fake.jobs) + 1:04d}"
        self.fake.jobs.append({"id": job_id, "namespace": ns, **spec})
        self._json(200, {"id": job_id, "createdAt": now(), "dockerImage": spec.get("dockerImage"),
                         "command": spec.get("command"), "arguments": spec.get("arguments"),
                         "environment": spec.get("environment"), "flavor": spec.get("flavor"),
                         "labels": spec.get("labels"), "owner": {"id": ns, "name": ns, "type": "user"},
                         "status": {"stage": "SCHEDULING", "message": None}})
