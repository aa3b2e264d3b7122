"""Upstreams: where requests go, with which key, over which relay.

- Owns the backend settings: ``upstream_base_url`` (or the ``--mode reverse`` target plus
  ``/v1``; ``demo`` runs the bundled demo upstream), ``upstream_api_key``,
  ``forward_client_auth`` and the relay's timeouts (``connect_timeout_secs``,
  ``upstream_idle_timeout_secs``, ``keepalive_secs``; mitmproxy's ``ssl_insecure``).
- Runs the relay (resp2chat_io/relay/) for the lifetime of the gateway.
- ``request``: any other ``/v1/*`` call (``GET /v1/models``…) goes to the upstream with the
  upstream key. Turns (turns.py) ask ``target`` and ``authorize`` for theirs.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import ctx, http

from resp2chat_io.relay import Relay

from .base import Owner, fails_closed

log = logging.getLogger("resp2chat")

DEFAULT_UPSTREAM = "http://127.0.0.1:8000/v1"


class Upstream:
    """A chat backend base URL: scheme, host, port and path prefix (``/v1``, ``/api/v1``…)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")

    @property
    def host_header(self) -> str:
        return self.host if self.port in (80, 443) else f"{self.host}:{self.port}"

    def route(self, flow: http.HTTPFlow, path: str) -> None:
        flow.request.scheme, flow.request.host, flow.request.port = self.scheme, self.host, self.port
        flow.request.path = self.prefix + path
        flow.request.headers["host"] = self.host_header


def reverse_target(flow: http.HTTPFlow) -> Upstream:
    req = flow.request
    return Upstream(f"{req.scheme}://{req.host}:{req.port}/v1")


@fails_closed
class Upstreams(Owner):
    name = "resp2chat_upstreams"
    owner = "upstreams"
    also_reads = ("gateway_api_key",)
    watches = ("ssl_insecure",)

    def __init__(self, source) -> None:
        super().__init__(source)
        self.relay = Relay()
        self.configured: Upstream | None = None  # None: the reverse-proxy target
        self.demo = None  # the bundled demo upstream server, when upstream_base_url == "demo"

    def apply(self, updated: set[str]) -> None:
        url = self.s["upstream_base_url"]
        if url == "demo":
            if self.demo is None:
                from resp2chat_io.demo_upstream import serve_in_thread

                self.demo, demo_url = serve_in_thread()
                log.info(f"resp2chat: serving the bundled demo upstream at {demo_url}")
            host, port = self.demo.server_address[:2]
            url = f"http://{host}:{port}/v1"
        self.configured = Upstream(url) if url else None
        client = self.relay.client
        client.connect_timeout = self.s["connect_timeout_secs"] or None
        client.idle_timeout = self.s["upstream_idle_timeout_secs"] or float("inf")
        client.keepalive = self.s["keepalive_secs"] or float("inf")
        client.verify_tls = not getattr(ctx.options, "ssl_insecure", False)

    def default_url(self) -> str:
        return self.configured.url if self.configured else DEFAULT_UPSTREAM

    def target(self, flow: http.HTTPFlow) -> Upstream:
        return self.configured or reverse_target(flow)

    def authorize(self, flow: http.HTTPFlow) -> None:
        """The upstream key replaces the client's credentials (which go upstream only with
        ``forward_client_auth``, when the gateway itself has no key)."""
        headers = flow.request.headers
        if self.s["upstream_api_key"]:
            headers["authorization"] = f"Bearer {self.s['upstream_api_key']}"
        elif not self.s["forward_client_auth"] or self.s["gateway_api_key"]:
            headers.pop("authorization", None)
        headers.pop("x-api-key", None)

    async def running(self) -> None:
        if self.relay.server is None:  # (its port may be bound already: a turn during start-up)
            await self.relay.start()

    async def done(self) -> None:
        await self.relay.close()
        if self.demo is not None:
            self.demo.shutdown()
            self.demo.server_close()
            self.demo = None

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if path.startswith("/v1/") and (req.host, req.port) != self.relay.address:  # (turns.py routed its own)
            self.target(flow).route(flow, path[3:] + req.path[len(path):])
            self.authorize(flow)
