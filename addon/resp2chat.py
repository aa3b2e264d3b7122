"""resp2chat: serve the OpenAI Responses API from any Chat Completions backend.

    mitmdump -s addon/resp2chat.py --mode reverse:http://127.0.0.1:8000

This file is the mitmproxy side only: options, hooks, commands. Translation lives in the
sans-I/O package ``resp2chat_core`` beside it. Per flow:

- ``request``: ``POST /v1/responses`` is validated and lowered into ``POST {upstream}/chat/completions``
  (the flow's request becomes the chat request, so flow files and server replay see what the
  backend saw); other ``/v1/*`` calls are routed to the upstream; ``/healthz`` is answered here.
- ``responseheaders``: for a streaming client, a stream callable translates the upstream SSE
  chunk by chunk into Responses events; error statuses become ``response.failed`` in that stream.
- ``response``: a non-streaming client gets the finished Response object as one JSON body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs

from resp2chat_core.errors import GatewayError, error_json
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.translator import Translator
from resp2chat_core.turn import Turn, begin_turn

log = logging.getLogger("resp2chat")

DEFAULT_UPSTREAM = "http://127.0.0.1:8000/v1"
DEFAULT_LISTEN = ("127.0.0.1", 4000)
RESPONSES_PATHS = ("/v1/responses", "/responses")
JSON_HEADERS = {"content-type": "application/json"}

# HTTP status for a non-streaming client whose response failed, by error code.
_FAILED_STATUS = {
    "context_length_exceeded": 400,
    "invalid_request_error": 400,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_is_overloaded": 503,
}


class _Upstream:
    """Where chat requests go: scheme, host, port and path prefix (``/v1``, ``/api/v1``…)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise exceptions.OptionsError(f"resp2chat_upstream_base_url: {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")

    def route(self, flow: http.HTTPFlow, path: str) -> None:
        flow.request.scheme, flow.request.host, flow.request.port = self.scheme, self.host, self.port
        flow.request.path = self.prefix + path
        flow.request.headers["host"] = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"


class _SSEStream:
    """The stream callable: one translator per flow; never raises, never returns b"" early."""

    __slots__ = ("translator", "status", "mode", "buffer")

    def __init__(self, translator: Translator, status: int, content_type: str):
        self.translator = translator
        self.status = status
        self.mode = "sse" if status == 200 and "json" not in content_type else "buffer"
        self.buffer = bytearray()

    def __call__(self, data: bytes):
        t = self.translator
        try:
            if self.mode == "sse":
                out = t.feed(data) if data else t.finish()
            elif data:
                if len(self.buffer) < 1 << 20:
                    self.buffer += data
                out = b""
            elif self.status == 200:
                out = t.translate_body(bytes(self.buffer))
            else:
                out = t.fail_upstream(self.status, bytes(self.buffer))
        except BaseException as exc:  # noqa: BLE001 — raising here would hang the client
            out = t.fail("server_error", f"gateway error: {exc!r}")
        # b"" mid-stream would end the client's chunked body early: say "nothing" with [].
        return out or []


class Resp2Chat:
    def __init__(self) -> None:
        self.turns: dict[str, Turn] = {}
        self.upstream: _Upstream | None = None
        self.lowering = LoweringOptions()
        self._rebind = False

    def load(self, loader) -> None:
        loader.add_option("resp2chat_upstream_base_url", str, "",
                          "Chat Completions base URL, e.g. http://127.0.0.1:8000/v1 (may carry a path "
                          "prefix). Empty: the reverse-proxy target plus /v1.")
        loader.add_option("resp2chat_upstream_api_key", str, "",
                          "API key sent upstream as 'Authorization: Bearer …' (never logged or saved).")
        loader.add_option("resp2chat_upstream_model", str, "",
                          "Send this model name upstream whatever the client asks for.")
        loader.add_option("resp2chat_flatten_content", bool, True,
                          "Send text-only message content as a plain string (every chat template accepts it).")
        loader.add_option("resp2chat_forward_client_auth", bool, False,
                          "Forward the client's Authorization header upstream when no upstream key is set.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "resp2chat_upstream_base_url" in updated:
            url = opts.resp2chat_upstream_base_url
            self.upstream = _Upstream(url) if url else None
        if updated & {"resp2chat_upstream_model", "resp2chat_flatten_content"}:
            self.lowering = LoweringOptions(
                flatten_content=opts.resp2chat_flatten_content,
                upstream_model=opts.resp2chat_upstream_model or None,
            )
        if "resp2chat_upstream_base_url" in updated or "mode" in updated:
            self._default_proxy_options()

    def _default_proxy_options(self) -> None:
        """A gateway, not a proxy: lazy upstream connections, loopback port 4000, reverse mode."""
        opts, changes = ctx.options, {}
        if "connection_strategy" not in opts:
            return  # not inside a proxy (unit tests with a bare options manager)
        if opts.connection_strategy != "lazy":
            changes["connection_strategy"] = "lazy"  # eager would reset clients when upstream is down
        if not opts.store_streamed_bodies:
            changes["store_streamed_bodies"] = True  # flow files keep the translated stream
        modes = list(opts.mode)
        if modes == ["regular"]:
            target = urlsplit(opts.resp2chat_upstream_base_url or DEFAULT_UPSTREAM)
            modes = [f"reverse:{target.scheme}://{target.netloc}"]
        # mitmproxy's default listen address (all interfaces, 8080) is a proxy's; a gateway stays
        # on loopback. Scripts load after the servers start, so the address goes into the mode
        # spec (`reverse:URL@host:port`): a changed spec is what makes mitmproxy rebind.
        if len(modes) == 1 and opts.listen_host == "" and opts.listen_port is None:
            spec = mode_specs.ProxyMode.parse(modes[0])
            if spec.custom_listen_host is None and spec.custom_listen_port is None:
                modes = [f"{modes[0]}@{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}"]
        if modes != list(opts.mode):
            changes["mode"] = modes
            self._rebind = True
        if changes:
            opts.update(**changes)

    def running(self) -> None:
        # mitmdump brings its servers up while scripts are still loading, with the options of
        # that moment: if we changed the mode, ask the proxy server to apply it now.
        if self._rebind and (ps := ctx.master.addons.get("proxyserver")):
            self._rebind = False
            asyncio.ensure_future(ps.setup_servers())

    # --- hooks -----------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay:
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if path == "/healthz":
            flow.response = http.Response.make(200, b'{"status":"ok"}', JSON_HEADERS)
        elif path in RESPONSES_PATHS and req.method == "POST":
            self._begin(flow)
        elif path.startswith("/v1/"):
            self._to_upstream(flow, path[3:] + req.path[len(path):])

    def _begin(self, flow: http.HTTPFlow) -> None:
        try:
            turn = begin_turn(flow.request.get_content(strict=False) or b"", self.lowering,
                              "resp_" + uuid.uuid4().hex, int(time.time()))
        except GatewayError as err:
            flow.response = http.Response.make(err.status, json.dumps(err.body()), JSON_HEADERS)
            return
        self.turns[flow.id] = turn
        flow.request.content = turn.chat_body
        flow.request.headers["content-type"] = "application/json"
        flow.request.headers["accept"] = "text/event-stream"
        flow.request.headers["accept-encoding"] = "identity"  # the translator reads raw bytes
        self._to_upstream(flow, "/chat/completions")

    def _to_upstream(self, flow: http.HTTPFlow, path: str) -> None:
        upstream = self.upstream or _reverse_target(flow)
        upstream.route(flow, path)
        key = ctx.options.resp2chat_upstream_api_key
        if key:
            flow.request.headers["authorization"] = f"Bearer {key}"
        elif not ctx.options.resp2chat_forward_client_auth:
            flow.request.headers.pop("authorization", None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        turn = self.turns.get(flow.id)
        if turn is None or not turn.client_stream:
            return
        resp = flow.response
        status, ctype = resp.status_code, resp.headers.get("content-type", "")
        resp.stream = _SSEStream(turn.translator(), status, ctype)
        resp.status_code, resp.reason = 200, "OK"
        for name in ("content-length", "content-encoding", "content-type", "transfer-encoding"):
            resp.headers.pop(name, None)
        resp.headers["content-type"] = "text/event-stream; charset=utf-8"
        resp.headers["cache-control"] = "no-cache"
        if flow.request.http_version == "HTTP/1.1":
            resp.headers["transfer-encoding"] = "chunked"

    def response(self, flow: http.HTTPFlow) -> None:
        turn = self.turns.pop(flow.id, None)
        if turn is None:
            return
        if not turn.client_stream:
            self._answer_whole(flow, turn)
        _redact(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.turns.pop(flow.id, None)
        _redact(flow)

    def _answer_whole(self, flow: http.HTTPFlow, turn: Turn) -> None:
        """A non-streaming client: run the same translation over the whole upstream body."""
        resp = flow.response
        t = turn.translator()
        body = resp.get_content(strict=False) or b""
        if resp.status_code != 200:
            t.fail_upstream(resp.status_code, body)
        elif "json" in resp.headers.get("content-type", ""):
            t.translate_body(body)
        else:
            t.feed(body)
            t.finish()
        result = t.response()
        if result["status"] == "failed":
            err = result["error"]
            status = _FAILED_STATUS.get(err["code"], 502)
            flow.response = http.Response.make(
                status, error_json(err["message"], status_type="upstream_error", code=err["code"]), JSON_HEADERS)
        else:
            flow.response = http.Response.make(200, json.dumps(result, ensure_ascii=False), JSON_HEADERS)


def _reverse_target(flow: http.HTTPFlow) -> _Upstream:
    req = flow.request
    return _Upstream(f"{req.scheme}://{req.host}:{req.port}/v1")


def _redact(flow: http.HTTPFlow) -> None:
    """Flow files (-w) and mitmweb must never show credentials."""
    for name in ("authorization", "x-api-key"):
        if name in flow.request.headers:
            flow.request.headers[name] = "[redacted]"


addons = [Resp2Chat()]
