"""mitmweb / mitmproxy contentviews: both sides of a translated turn, readable.

- "resp2chat request": the client's original Responses request (kept in the flow's metadata)
  above the chat request the backend received (the flow's request body).
- "resp2chat events": the Responses events the client received, delta runs joined.
- "resp2chat upstream": the backend's chat chunks (kept in the flow's metadata), joined likewise.
"""

from __future__ import annotations

import json

from mitmproxy import contentviews

from resp2chat_core.inspect import (
    describe_chat_request, describe_chat_sse, describe_responses_request, describe_responses_sse,
)

META = "resp2chat"


def _meta(metadata: contentviews.Metadata) -> dict:
    flow = metadata.flow
    return (flow.metadata.get(META) or {}) if flow is not None else {}


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
                    describe_responses_request(json.loads(meta["responses_request"])), ""]
        out += ["== chat request (to the backend) ==", describe_chat_request(json.loads(data))]
        return "\n".join(out)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        return 2 if _meta(metadata) and not _is_response(metadata) and data[:1] == b"{" else -1


class EventsView(contentviews.Contentview):
    name = "resp2chat events"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        return describe_responses_sse(data)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
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


VIEWS = (RequestView(), EventsView(), UpstreamView())


def register() -> None:
    for view in VIEWS:
        contentviews.add(view)
