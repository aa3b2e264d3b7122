"""mitmweb / mitmproxy contentviews: both sides of a translated turn, readable.

- "resp2chat request": the client's original Responses request (kept in the flow's metadata)
  above the chat request the backend received (the flow's request body).
- "resp2chat events": the Responses events the client received, delta runs joined.
- "resp2chat upstream": the backend's chat chunks (kept in the flow's metadata), joined likewise.
- "resp2chat message": a message of the Responses WebSocket: a client's ``response.create`` (and
  the chat request the backend got for it), or one event the gateway sent.
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
    return (flow.metadata.get(META) or {}) if flow is not None else {}


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
                    describe_responses_request(json.loads(str(meta["responses_request"]))), ""]
        out += ["== chat request (to the backend) ==", describe_chat_request(json.loads(data))]
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
        return describe_chat_sse(raw.encode() if isinstance(raw, str) else raw)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if b"chat.completion.chunk" in data[:4096]:
            return 2
        return 1 if _is_response(metadata) and _meta(metadata).get("upstream_sse") else -1


class SocketMessageView(contentviews.Contentview):
    name = "resp2chat message"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        if not metadata.websocket_message.from_client:
            return describe_responses_sse(b"data: " + data + b"\n\n")
        text = data.decode("utf-8", "replace")
        turn = next((t for t in _meta(metadata).get("turns") or () if t.get("responses_request") == text), None)
        refused = ["", f"== refused: {turn['error'].get('code')}: {turn['error'].get('message')} =="] \
            if turn and turn.get("error") else []
        try:
            body = json.loads(data)
        except ValueError:
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
            out += ["", "== chat request (to the backend) ==", describe_chat_request(json.loads(str(turn["chat_request"])))]
        return "\n".join(out + refused)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        return 3 if _is_socket_message(metadata) and _meta(metadata).get("transport") == "websocket" else -1


VIEWS = (RequestView(), EventsView(), UpstreamView(), SocketMessageView())


def register() -> None:
    for view in VIEWS:
        contentviews.add(view)
