"""What the addon hands to mitmproxy, kept out of the addon so that it stays options and hooks:
upstream routing, the stream callable, the --raw printer, credential redaction."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from mitmproxy import http

from resp2chat_io.relay import TARGET_HEADER, WEB_SEARCH_HEADER
from resp2chat_core.replay import MAX_ENTRY_BYTES
from resp2chat_core.translator import Translator

# HTTP status for a non-streaming client whose response failed, by error code.
FAILED_STATUS = {
    "context_length_exceeded": 400,
    "invalid_prompt": 400,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
}


class Upstream:
    """Where chat requests go: scheme, host, port and path prefix (``/v1``, ``/api/v1``…)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")

    def route(self, flow: http.HTTPFlow, path: str) -> None:
        flow.request.scheme, flow.request.host, flow.request.port = self.scheme, self.host, self.port
        flow.request.path = self.prefix + path
        flow.request.headers["host"] = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"


class SSEStream:
    """The stream callable: one translator per flow; never raises, never returns b"" early.

    It also keeps both sides' bytes (up to a cap): flow files record the upstream's, and the
    replay cache answers identical requests with the client's.
    """

    __slots__ = ("translator", "status", "mode", "buffer", "sent", "secrets")

    def __init__(self, translator: Translator, status: int, content_type: str, secrets: tuple[bytes, ...] = ()):
        self.translator = translator
        self.status = status
        self.mode = "sse" if status == 200 and "json" not in content_type else "buffer"
        self.buffer = bytearray()  # what the upstream sent (recorded in flow metadata)
        self.sent = bytearray()  # what the client got (what the replay cache answers with)
        self.secrets = secrets

    def __call__(self, data: bytes):
        t = self.translator
        try:
            if data and len(self.buffer) < MAX_ENTRY_BYTES:
                self.buffer += data
            if self.mode == "sse":
                out = t.feed(data) if data else t.finish()
            elif data:
                out = b""
            elif self.status == 200:
                out = t.translate_body(bytes(self.buffer))
            else:
                out = t.fail_upstream(self.status, bytes(self.buffer))
        except BaseException as exc:  # noqa: BLE001 — raising here would hang the client
            out = t.fail("server_error", f"gateway error: {exc!r}")
        if self.secrets and out:
            out = scrub(out, self.secrets)  # a backend that echoes our key must not show it
        if out and len(self.sent) < MAX_ENTRY_BYTES:
            self.sent += out
        # b"" mid-stream would end the client's chunked body early: say "nothing" with [].
        return out or []


class RawPrinter:
    """`resp2chat start --raw`: the model's deltas on stdout as they arrive."""

    _STYLE = {"reasoning": "\x1b[2;3m", "tool": "\x1b[36m"}  # dim italic thinking, cyan tool calls

    def __init__(self) -> None:
        self.last = "end"

    def __call__(self, kind: str, text: str) -> None:
        if kind != self.last and self.last not in ("end", "tool") and kind != "end":
            sys.stdout.write("\n")
        self.last = kind
        style = self._STYLE.get(kind)
        sys.stdout.write(f"{style}{text}\x1b[0m" if style else text)
        sys.stdout.flush()


def scrub(data: bytes, secrets: tuple[bytes, ...]) -> bytes:
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, b"[redacted]")
    return data


def reverse_target(flow: http.HTTPFlow) -> Upstream:
    req = flow.request
    return Upstream(f"{req.scheme}://{req.host}:{req.port}/v1")


def session_key(flow: http.HTTPFlow) -> str | None:
    h = flow.request.headers
    return h.get("session-id") or h.get("thread-id") or None


def redact(flow: http.HTTPFlow) -> None:
    """Flow files (-w) and mitmweb must never show credentials."""
    for name in ("authorization", "x-api-key"):
        if name in flow.request.headers:
            flow.request.headers[name] = "[redacted]"
    flow.request.headers.pop(TARGET_HEADER, None)  # served its purpose; a URL may hold userinfo
    flow.request.headers.pop(WEB_SEARCH_HEADER, None)
