"""Last in line: flow files (-w), mitmweb and clients never see a credential.

- the request's ``authorization``/``x-api-key`` become ``[redacted]`` in the flow (the upstream key
  the gateway put there, or a client's), and so does every header named like a credential
  (``settings.credential_header``: ``proxy-authorization``, a cookie, an SSO proxy's token);
- every configured secret (settings.secret_values), and the client's own credential when the
  request forwards it (``forward_client_auth``: Upstreams.forwarded), is scrubbed from every header of the flow and
  from an answer's body: a body the gateway made or holds whole is scrubbed before it goes out; a
  streamed one was scrubbed as it went (turns: channel.Reader; passthrough: channel.Scrubber),
  and what the flow keeps of it is scrubbed again here;
- a Responses request (a turn, ``/compact``, ``/input_tokens``) that was refused or answered
  before its body was read (its key, its limits, a body that does not parse or decode) keeps none
  of its body when it may carry what an ``mcp`` tool holds for its server (``unread``): a body read
  whole was made text without those secrets where it was read (``meta["read"]``; http_turns.py
  ``note_request``, input_tokens.py), one refused first is not decoded here either (a client
  past its limits costs no decoding).
"""

from __future__ import annotations

from mitmproxy import http

from resp2chat_core import gate as G
from resp2chat_core import settings as S
from resp2chat_core.channel import scrub

from .base import META, fails_closed

UNREAD_MCP = "[not kept: refused before it was read, and it may carry what an mcp tool holds for its server]"
BODIES = ("", "/compact", "/input_tokens")  # the Responses endpoints whose body is a request (G.endpoint)


def may_hold_mcp(body: bytes) -> bool:
    """Whether a body not read may hold an ``mcp`` tool's secrets: the word ``"mcp"``, or a JSON
    escape (which could spell it)."""
    return b'"mcp"' in body or b"\\u" in body


def unread(flow: http.HTTPFlow) -> None:
    """A Responses request whose body was not read (``meta["read"]`` unset) keeps none of it in
    the flow when it may hold an ``mcp`` tool's secrets: the word ``"mcp"``, a JSON escape (which
    could spell it), or a compressed body (which could hide either)."""
    req, meta = flow.request, flow.metadata.get(META) or {}
    if req.method != "POST" or meta.get("read") or not req.raw_content:
        return
    found = G.endpoint(req.path.split("?", 1)[0])
    if found is None or found[0] != "responses" or found[1] not in BODIES:
        return
    body = req.raw_content
    if may_hold_mcp(body) or req.headers.get("content-encoding", "identity") != "identity":
        if "responses_request" in meta:
            meta["responses_request"] = UNREAD_MCP
        req.headers.pop("content-encoding", None)
        req.content = UNREAD_MCP.encode()


@fails_closed
class Redact:
    name = "resp2chat_redact"

    def __init__(self, upstreams) -> None:
        self.upstreams = upstreams  # .secrets_for: every configured secret, and what a request forwards

    def response(self, flow: http.HTTPFlow) -> None:
        unread(flow)
        redact(flow, self.upstreams.secrets_for(flow.request.headers))

    def error(self, flow: http.HTTPFlow) -> None:
        unread(flow)
        redact(flow, self.upstreams.secrets_for(flow.request.headers))


def redact(flow: http.HTTPFlow, secrets: tuple[bytes, ...] = ()) -> None:
    for name in set(flow.request.headers.keys()):
        if S.credential_header(name):  # (authorization, x-api-key, a cookie, an SSO proxy's token…)
            flow.request.headers[name] = "[redacted]"
    if not secrets:
        return
    scrub_headers(flow.request.headers, secrets)
    resp = flow.response
    if resp is not None:
        scrub_headers(resp.headers, secrets)
        if resp.reason:  # (a backend's status line: its reason phrase may repeat a key too)
            resp.reason = scrub(resp.reason.encode("latin-1", "replace"), secrets).decode("latin-1")
        if resp.raw_content and "content-encoding" not in resp.headers:
            body = scrub(resp.raw_content, secrets)
            if body is not resp.raw_content:
                resp.raw_content = body
                if not resp.stream and "content-length" in resp.headers:
                    resp.headers["content-length"] = str(len(body))


def scrub_headers(headers: http.Headers, secrets: tuple[bytes, ...]) -> None:
    for name in set(headers.keys()):
        values = headers.get_all(name)
        if any(s.decode("latin-1") in v for v in values for s in secrets):
            headers.set_all(name, [scrub(v.encode("latin-1"), secrets).decode("latin-1") for v in values])
