"""The gate: what every request meets first. ``/healthz``; the gateway key; body size limits;
compressed bodies decoded (``content-encoding``, bounded by the same limit once decoded:
resp2chat_core/content_encoding.py), so every later hook reads plain JSON; and no client may
address the relay (it serves only the gateway's own requests)."""

from __future__ import annotations

import hmac
import posixpath
from urllib.parse import unquote

from mitmproxy import exceptions, http

from resp2chat_core import content_encoding
from resp2chat_core import settings as S
from resp2chat_core.clients import ClientTable, parse_clients
from resp2chat_core.errors import error_json

from .base import Owner, fails_closed, request_id

JSON_HEADERS = {"content-type": "application/json"}


GATEWAY_PATHS = ("/v1/responses", "/responses", "/v1/conversations", "/conversations", "/healthz", "/metrics")


def disguised(path: str) -> bool:
    """A path that only once percent-decoded and normalised names one the gateway answers itself:
    it must not reach a backend as it is."""
    normal = posixpath.normpath(unquote(path)) if path else path
    normal = "/" + normal.lstrip("/")
    if normal == path:
        return False
    return any(normal == p or normal.startswith(p + "/") for p in GATEWAY_PATHS)


@fails_closed
class Gate(Owner):
    name = "resp2chat_gate"
    owner = "gate"

    def __init__(self, source, relay) -> None:
        super().__init__(source)
        self.relay = relay
        self.clients = ClientTable()

    def apply(self, updated: set[str]) -> None:
        # `clients` with gateway_api_key (its `default` client): an invalid pair stops start-up
        try:
            self.clients = ClientTable(parse_clients(self.s["clients"], self.s["gateway_api_key"]))
        except S.SettingsError as exc:
            raise exceptions.OptionsError(f"resp2chat: {exc}") from None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Refuse an oversized body before mitmproxy reads it (a lying content-length is caught
        # again in `request`, once the body is in).
        size = flow.request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limit:
            self.too_large(flow)
            self.name_it(flow)

    @property
    def limit(self) -> int:
        return self.s["max_request_body_mb"] << 20

    def too_large(self, flow: http.HTTPFlow, decoded: bool = False) -> None:
        flow.response = http.Response.make(413, error_json(
            f"request body larger than max_request_body_mb ({self.s['max_request_body_mb']} MiB)"
            + (" once decoded" if decoded else ""),
            code="request_too_large"), {**JSON_HEADERS, "connection": "close"})

    def decode(self, flow: http.HTTPFlow) -> None:
        """A compressed body becomes the plain body (no ``content-encoding``), or a clear error."""
        req = flow.request
        header = req.headers.get("content-encoding", "")
        try:
            body = content_encoding.decode(req.raw_content or b"", header, self.limit) if req.raw_content else b""
        except content_encoding.TooLarge:
            self.too_large(flow, decoded=True)
            return
        except content_encoding.Unsupported as exc:
            flow.response = http.Response.make(415, error_json(
                f"content-encoding {str(exc)!r} is not supported (supported: {', '.join(content_encoding.SUPPORTED)})",
                param="content-encoding", code="unsupported_content_encoding"), JSON_HEADERS)
            return
        except content_encoding.BadBody as exc:
            flow.response = http.Response.make(400, error_json(
                f"request body is {exc} (content-encoding: {header})", param="content-encoding",
                code="invalid_body"), JSON_HEADERS)
            return
        del req.headers["content-encoding"]
        req.content = body  # (no content-encoding left: stored as is, content-length updated)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        if (req.host, req.port) == self.relay.address and self.relay.port:
            # a client asking mitmproxy (as a forward proxy) for the relay: never
            flow.response = http.Response.make(403, error_json("not a destination", code="forbidden"), JSON_HEADERS)
        elif disguised(req.path.split("?", 1)[0]):
            # /v1/%72esponses, /v1//responses, /v1/./responses…: a backend that decodes the path
            # would serve its own /v1/responses past everything the gateway checks
            flow.response = http.Response.make(400, error_json(
                "the request path names a gateway endpoint in another spelling: use the plain path",
                param="path", code="invalid_path"), JSON_HEADERS)
        elif req.path.split("?", 1)[0] == "/healthz":
            flow.response = http.Response.make(200, b'{"status":"ok"}', JSON_HEADERS)
        elif not self.authorized(req):
            flow.response = http.Response.make(401, error_json(
                "missing or wrong gateway API key (send it as 'Authorization: Bearer …')",
                status_type="authentication_error", code="invalid_api_key"), JSON_HEADERS)
        elif len(req.raw_content or b"") > self.limit:
            self.too_large(flow)
        elif "content-encoding" in req.headers:
            self.decode(flow)
        self.name_it(flow)

    @staticmethod
    def name_it(flow: http.HTTPFlow) -> None:
        """A refusal carries the gateway's request id, as every answer of a turn does (the
        operator finds it in the flow and the access log)."""
        if flow.response is not None and flow.response.status_code >= 400:
            flow.response.headers["x-request-id"] = request_id(flow)

    def authorized(self, req: http.Request) -> bool:
        key = self.s["gateway_api_key"]
        if not key:
            return True
        given = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or req.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), key.encode())
