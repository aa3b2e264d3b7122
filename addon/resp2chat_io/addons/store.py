"""Stored responses: ``previous_response_id``, ``item_reference`` and ``GET``/``DELETE /v1/responses/{id}``.

Owns the store settings (``session_ttl_hours``, ``max_sessions``, ``max_session_memory_mb``,
``session_store_dir``); keeps each completed turn whose request did not say ``store: false``
(a ``finished`` listener of turns.py, and cache hits via ``put``).
"""

from __future__ import annotations

import json

from mitmproxy import http

from resp2chat_core.errors import error_json
from resp2chat_io.store import ResponseStore

from .base import Owner, fails_closed

JSON_HEADERS = {"content-type": "application/json"}
PREFIXES = ("/v1/responses/", "/responses/")
CONVERSATIONS = ("/v1/conversations", "/conversations")  # not implemented: answered here, not forwarded


@fails_closed
class StoredResponses(Owner):
    name = "resp2chat_store"
    owner = "store"

    def __init__(self, source) -> None:
        super().__init__(source)
        self.store: ResponseStore | None = None
        self._config: tuple | None = None

    def apply(self, updated: set[str]) -> None:
        config = tuple(self.s[f.name] for f in self.fields)
        if config != self._config:
            self._config = config
            self.store = ResponseStore.from_settings(self.s)

    def history(self, response_id: str) -> list | None:
        entry = self.store.get(response_id) if self.store else None
        return entry["items"] if entry else None

    def resolve_items(self, item_ids: list[str]) -> dict[str, dict]:
        """``item_reference`` ids -> the stored items (resp2chat_core/inputs.py); missing: absent."""
        return self.store.resolve_items(item_ids) if self.store else {}

    def put(self, response_id: str, items: list, final: dict) -> None:
        if self.store is not None:
            self.store.put(response_id, items, final)

    def finished(self, done) -> None:
        if done.status == "completed" and done.turn.store:
            self.put(done.turn.ctx.response_id, done.turn.items + done.final["output"], done.final)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        path = flow.request.path.split("?", 1)[0]
        if path.startswith(CONVERSATIONS) and path.removeprefix("/v1").split("/")[1] == "conversations":
            flow.response = http.Response.make(404, error_json(
                "the Conversations API is not supported by this gateway: send the whole history in input, "
                "or continue a stored response with previous_response_id", code="unsupported_endpoint"),
                JSON_HEADERS)
            return
        if not path.startswith(PREFIXES):
            return
        response_id, method = path.rsplit("/", 1)[1], flow.request.method
        entry = self.store.get(response_id) if self.store and method in ("GET", "DELETE") else None
        if entry is None:
            status, body = (404, error_json(f"no stored response {response_id!r}", code="response_not_found")) \
                if method in ("GET", "DELETE") else (405, error_json(f"{method} is not supported here"))
        elif method == "GET":
            status, body = 200, json.dumps(entry["response"], ensure_ascii=False).encode()
        else:
            self.store.delete(response_id)
            status, body = 200, json.dumps({"id": response_id, "object": "response", "deleted": True}).encode()
        flow.response = http.Response.make(status, body, JSON_HEADERS)
