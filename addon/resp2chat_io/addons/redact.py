"""Last in line: flow files (-w), mitmweb and clients never see a credential.

- the request's ``authorization``/``x-api-key`` become ``[redacted]`` in the flow (the upstream key
  the gateway put there, or a client's);
- every configured secret (settings.secret_values), and the client's own credential when the
  request forwards it (``forward_client_auth``: Upstreams.forwarded), is scrubbed from every header of the flow and
  from an answer's body: a body the gateway made or holds whole is scrubbed before it goes out; a
  streamed one was scrubbed as it went (turns: channel.Reader; passthrough: channel.Scrubber),
  and what the flow keeps of it is scrubbed again here.
"""

from __future__ import annotations

from mitmproxy import http

from resp2chat_core.channel import scrub

from .base import fails_closed


@fails_closed
class Redact:
    name = "resp2chat_redact"

    def __init__(self, upstreams) -> None:
        self.upstreams = upstreams  # .secrets_for: every configured secret, and what a request forwards

    def response(self, flow: http.HTTPFlow) -> None:
        redact(flow, self.upstreams.secrets_for(flow.request.headers))

    def error(self, flow: http.HTTPFlow) -> None:
        redact(flow, self.upstreams.secrets_for(flow.request.headers))


def redact(flow: http.HTTPFlow, secrets: tuple[bytes, ...] = ()) -> None:
    for name in ("authorization", "x-api-key"):
        if name in flow.request.headers:
            flow.request.headers[name] = "[redacted]"
    if not secrets:
        return
    scrub_headers(flow.request.headers, secrets)
    resp = flow.response
    if resp is not None:
        scrub_headers(resp.headers, secrets)
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
