"""The gate: what every request meets first. ``/healthz``; the gateway key; body size limits;
and no client may address the relay (it serves only the gateway's own requests)."""

from __future__ import annotations

import hmac

from mitmproxy import http

from resp2chat_core.errors import error_json

from .base import Owner, fails_closed

JSON_HEADERS = {"content-type": "application/json"}


@fails_closed
class Gate(Owner):
    name = "resp2chat_gate"
    owner = "gate"

    def __init__(self, source, relay) -> None:
        super().__init__(source)
        self.relay = relay

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Refuse an oversized body before mitmproxy reads it (a lying content-length is caught
        # again in `request`, once the body is in).
        size = flow.request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limit:
            self.too_large(flow)

    @property
    def limit(self) -> int:
        return self.s["max_request_body_mb"] << 20

    def too_large(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(413, error_json(
            f"request body larger than max_request_body_mb ({self.s['max_request_body_mb']} MiB)",
            code="request_too_large"), {**JSON_HEADERS, "connection": "close"})

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        if (req.host, req.port) == self.relay.address and self.relay.port:
            # a client asking mitmproxy (as a forward proxy) for the relay: never
            flow.response = http.Response.make(403, error_json("not a destination", code="forbidden"), JSON_HEADERS)
        elif req.path.split("?", 1)[0] == "/healthz":
            flow.response = http.Response.make(200, b'{"status":"ok"}', JSON_HEADERS)
        elif not self.authorized(req):
            flow.response = http.Response.make(401, error_json(
                "missing or wrong gateway API key (send it as 'Authorization: Bearer …')",
                status_type="authentication_error", code="invalid_api_key"), JSON_HEADERS)
        elif len(req.raw_content or b"") > self.limit:
            self.too_large(flow)

    def authorized(self, req: http.Request) -> bool:
        key = self.s["gateway_api_key"]
        if not key:
            return True
        given = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or req.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), key.encode())
