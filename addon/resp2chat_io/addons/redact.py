"""Last in line: flow files (-w) and mitmweb never show credentials."""

from __future__ import annotations

from mitmproxy import http

from .base import fails_closed


@fails_closed
class Redact:
    name = "resp2chat_redact"

    def response(self, flow: http.HTTPFlow) -> None:
        redact(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        redact(flow)


def redact(flow: http.HTTPFlow) -> None:
    for name in ("authorization", "x-api-key"):
        if name in flow.request.headers:
            flow.request.headers[name] = "[redacted]"
