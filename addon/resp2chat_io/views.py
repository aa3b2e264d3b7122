"""mitmweb / mitmproxy contentviews: both sides of a translated turn, readable.

- "resp2chat request": the client's original Responses request (kept in the flow's metadata)
  above the chat request the backend received (the flow's request body).
- "resp2chat events": the Responses events the client received, delta runs joined.
- "resp2chat upstream": the backend's chat chunks (kept in the flow's metadata), joined likewise.
- "resp2chat message": a message of the Responses WebSocket: a client's ``response.create`` (and
  the chat request the backend got for it), or one event the gateway sent.

Each renders whatever the flow holds (a refused request that is no JSON or no request, a record
of another version), chosen automatically or by name for any message: resp2chat_core/inspect.py
is total, and so is what reads the flow here.
"""

from __future__ import annotations

import json

from mitmproxy import contentviews

from resp2chat_io import META
from resp2chat_core.inspect import (
    describe_chat_request, describe_chat_sse, describe_responses_request, describe_responses_sse,
)


def _meta(metadata: contentviews.Metadata) -> dict:
    flow = metadata.flow
    meta = flow.metadata.get(META) if flow is not None else None
    return meta if isinstance(meta, dict) else {}


NOT_JSON = object()


def _json(text: str | bytes):
    """The JSON value of a body or record; ``NOT_JSON`` for one that is no JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return NOT_JSON


def _request(text: str | bytes, describe) -> str:
    body = _json(text)
    return describe(body) if body is not NOT_JSON else f"(not JSON) {text[:200]!r}"


def _is_socket_message(metadata: contentviews.Metadata) -> bool:
    return metadata.websocket_message is not None


def _is_response(metadata: contentviews.Metadata) -> bool:
    flow = metadata.flow
    return flow is not None and getattr(flow, "response", None) is metadata.http_message


class RequestView(contentviews.Contentview):
    name = "resp2chat request"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        meta = _meta(metadata)
        out = []
        if meta.get("responses_request"):
            out += ["== Responses request (from the client) ==",
                    _request(str(meta["responses_request"]), describe_responses_request), ""]
        out += ["== chat request (to the backend) ==", _request(data, describe_chat_request)]
        return "\n".join(out)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if _is_socket_message(metadata):
            return -1
        return 2 if _meta(metadata) and not _is_response(metadata) and data[:1] == b"{" else -1


class EventsView(contentviews.Contentview):
    name = "resp2chat events"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        return describe_responses_sse(data)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if _is_socket_message(metadata):
            return -1
        return 2 if b'"type":"response.' in data[:4096] else -1


class UpstreamView(contentviews.Contentview):
    name = "resp2chat upstream"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        raw = _meta(metadata).get("upstream_sse")
        if raw is None:  # a plain chat stream (e.g. client replay of a recording)
            return describe_chat_sse(data)
        return describe_chat_sse(raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "replace"))

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if b"chat.completion.chunk" in data[:4096]:
            return 2
        return 1 if _is_response(metadata) and _meta(metadata).get("upstream_sse") else -1


class SocketMessageView(contentviews.Contentview):
    name = "resp2chat message"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        message = metadata.websocket_message
        if message is None:  # (chosen by name for an HTTP body: a request, or a stream of events)
            return describe_responses_sse(data) if _is_response(metadata) else \
                _request(data, describe_responses_request)
        if not message.from_client:
            return describe_responses_sse(b"data: " + data + b"\n\n")
        text = data.decode("utf-8", "replace")
        turns = _meta(metadata).get("turns")
        turn = next((t for t in turns if isinstance(t, dict) and t.get("responses_request") == text), None) \
            if isinstance(turns, list) else None
        error = turn.get("error") if turn else None
        refused = ["", f"== refused: {error.get('code')}: {error.get('message')} =="] \
            if isinstance(error, dict) else ["", f"== refused: {error} =="] if error else []
        body = _json(data)
        if body is NOT_JSON:
            return "\n".join([f"(not JSON) {data[:200]!r}", *refused])
        if not isinstance(body, dict):
            return "\n".join([f"(not an object) {data[:200]!r}", *refused])
        head = f"== {body.get('type')} (from the client)"
        if body.get("previous_response_id"):
            head += f", continuing {body['previous_response_id']} with only the new input"
        if body.get("generate") is False:
            head += ", a warm-up (answered without the backend)"
        out = [head + " ==", describe_responses_request(body)]
        if turn and turn.get("chat_request") and not turn.get("warmup"):
            out += ["", "== chat request (to the backend) ==", _request(str(turn["chat_request"]), describe_chat_request)]
        return "\n".join(out + refused)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        return 3 if _is_socket_message(metadata) and _meta(metadata).get("transport") == "websocket" else -1


VIEWS = (RequestView(), EventsView(), UpstreamView(), SocketMessageView())


def register() -> None:
    for view in VIEWS:
        contentviews.add(view)
