"""Webhooks: /api/settings/webhooks (list, create) and /api/settings/webhooks/{id} (get, update, delete,
enable, disable), with the payloads huggingface_hub 2.4.0 sends and reads: create and update answer
{"webhook": {...}}, the list answers a bare array. Each webhook belongs to the token's user."""

from __future__ import annotations

from typing import Any

from tests.hubserver.state import HubError

DOMAINS = ("repo", "discussion")
WATCH_TYPES = ("user", "org", "model", "dataset", "space", "bucket")


class Webhooks:
    """Endpoints of _Handler; the webhooks live in FakeHub.webhooks (id -> record with its owner)."""

    fake: Any

    def _own_webhook(self, webhook_id: str) -> dict[str, Any]:
        token = self._token(required=True)
        hook = self.fake.webhooks.get(webhook_id)
        if hook is None or hook["owner"] != token.user:
            raise HubError(404, f"Webhook {webhook_id} not found")
        return hook

    @staticmethod
    def _public(hook: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in hook.items() if k != "owner"}

    def _checked(self, body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        watched = body.get("watched")
        if watched is not None or not partial:
            if not isinstance(watched, list) or not watched:
                raise HubError(400, "watched must be a non-empty array")
            for item in watched:
                if not isinstance(item, dict) or item.get("type") not in WATCH_TYPES or not item.get("name"):
                    raise HubError(400, f"invalid watched item: {item!r}")
            out["watched"] = [{"type": i["type"], "name": i["name"]} for i in watched]
        if "domains" in body:
            if not isinstance(body["domains"], list) or not set(body["domains"]) <= set(DOMAINS):
                raise HubError(400, f"invalid domains: {body['domains']!r}")
            out["domains"] = list(body["domains"])
        if "url" in body:
            if not isinstance(body["url"], str) or not body["url"].startswith(("http://", "https://")):
                raise HubError(400, f"invalid url: {body['url']!r}")
            out["url"] = body["url"]
        if "jobSourceId" in body:
            job = next((j for j in self.fake.jobs if j["id"] == body["jobSourceId"]), None)
            if job is None:
                raise HubError(404, f"Job {body['jobSourceId']} not found")
            out["job"] = {"docker_image": job.get("dockerImage"), "command": job.get("command"),
                          "arguments": job.get("arguments") or [], "environment": job.get("environment") or {},
                          "secrets": [], "flavor": job.get("flavor")}
            out["url"] = None
        if "secret" in body:
            out["secret"] = body["secret"]
        return out

    def webhook_list(self) -> None:
        token = self._token(required=True)
        with self.fake.lock:
            hooks = [self._public(h) for h in self.fake.webhooks.values() if h["owner"] == token.user]
        self._json(200, hooks)

    def webhook_create(self) -> None:
        token = self._token(required=True)
        fields = self._checked(self._json_body(), partial=False)
        if not fields.get("url") and not fields.get("job"):
            raise HubError(400, "a webhook needs a url or a jobSourceId")
        with self.fake.lock:
            webhook_id = f"{len(self.fake.webhooks) + 1:024x}"
            hook = {"id": webhook_id, "url": None, "job": None, "domains": list(DOMAINS), "secret": None,
                    "disabled": False, **fields, "owner": token.user}
            self.fake.webhooks[webhook_id] = hook
        self._json(200, {"webhook": self._public(hook)})

    def webhook_get(self, webhook_id: str) -> None:
        with self.fake.lock:
            hook = self._own_webhook(webhook_id)
        self._json(200, {"webhook": self._public(hook)})

    def webhook_update(self, webhook_id: str) -> None:
        fields = self._checked(self._json_body(), partial=True)
        with self.fake.lock:
            hook = self._own_webhook(webhook_id)
            hook.update(fields)
        self._json(200, {"webhook": self._public(hook)})

    def webhook_delete(self, webhook_id: str) -> None:
        with self.fake.lock:
            self._own_webhook(webhook_id)
            del self.fake.webhooks[webhook_id]
        self._json(200, {})

    def webhook_enable(self, webhook_id: str) -> None:
        self._set_disabled(webhook_id, False)

    def webhook_disable(self, webhook_id: str) -> None:
        self._set_disabled(webhook_id, True)

    def _set_disabled(self, webhook_id: str, disabled: bool) -> None:
        with self.fake.lock:
            hook = self._own_webhook(webhook_id)
            hook["disabled"] = disabled
        self._json(200, {"webhook": self._public(hook)})
