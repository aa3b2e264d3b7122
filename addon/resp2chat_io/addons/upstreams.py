"""Upstreams: where requests go, with which key, over which relay.

- Owns the backend settings: ``upstream_base_url`` (or the ``--mode reverse`` target plus
  ``/v1``; ``demo`` runs the bundled demo upstream), ``upstream_api_key``,
  ``forward_client_auth``, the relay's timeouts (``connect_timeout_secs``,
  ``upstream_idle_timeout_secs``, ``upstream_data_timeout_secs``, ``keepalive_secs``, ``coalesce_ms``;
  mitmproxy's ``ssl_insecure``) and
  ``max_upstream_event_mb``, the largest SSE event a backend may send (each turn's reader of the
  backend's stream is bounded by it: ``Turns`` reads it for a turn's translator and exchange;
  the relay's client reads a chat call's whole 200 JSON body up to ``OUTPUT_EVENTS`` times it,
  the bound of an answer's output: translator.py ``output_bound``; a model list's, a tokenizer's
  up to it: relay/upstream.py ``max_get``).
- ``upstreams``: several named upstreams instead of one, each serving some models, later ones
  the fallbacks of earlier ones (resp2chat_core/routing.py); ``routing_key_header``: the
  session key goes upstream in that header (session affinity behind a router such as smg).
- Runs the relay (resp2chat_io/relay/) for the lifetime of the gateway.
- ``request``: a call the gate let through to the upstream (``passthrough_paths``: the gate
  marks it) goes there with the upstream key and its own ``upstream_headers``, as its turns
  (``authorize``: ``candidate``'s ``Candidate.sent``), the path after ``/v1`` below the
  upstream's base URL (with several upstreams: the first; ``GET /v1/models`` asks them all, each
  with its own key and headers, and merges the lists).
- A turn's way upstream (turns.py, for HTTP and the WebSocket alike): ``candidates`` (each
  upstream serving its model, in order, as a ``routing.Candidate``: URL, key, its own
  ``upstream_headers`` and timeouts, the turn's body for it) and ``headers_for`` (what every
  candidate gets besides: the client's headers without its credentials, hop-by-hop and framing
  headers, and the session's routing key).
- ``responseheaders``: a passthrough answer reaches the client with every configured secret
  scrubbed from its headers and its body (streamed through ``channel.Scrubber``, never held
  whole), and the gateway's request id as ``x-request-id``, as every answer of the gateway's (the
  backend's own, when it sent one, as ``x-upstream-request-id``); it is asked for uncompressed (``accept-encoding: identity``), and one that comes
  compressed all the same is a 502 (a compressed body could hide a secret). For a client with
  limits, its backend's usage is read on the way (``meter``: addons/limits.py counts a
  passthrough that is not a read as a turn is counted). Its body must not stop for
  ``upstream_idle_timeout_secs`` (``_silent``: the answer is cut, its client's connection closed).
- ``error``: a passthrough call that failed before its answer's head (its backend refused the
  connection, closed or reset it before answering, sent a head that does not parse, sent none in
  time: ``connect_timeout_secs`` + ``upstream_idle_timeout_secs`` from its request leaving the
  gateway's hooks, ``_sent``, ``_overdue``, or its key was revoked meanwhile) is answered with the
  gateway's JSON error (``failed_early``: ``upstream_unavailable`` 502, ``upstream_timeout`` 504,
  ``invalid_api_key`` 401) and its request id, in place of mitmproxy's HTML page (sent by
  mitm_head.py ``FAILED``); never the backend's bytes. Being the gateway's own answer, it is in
  the access log and ``resp2chat_refused_requests_total`` (``ENDED``, for outcomes.py), as are
  the 502 for a compressed answer and a cut: for silence (``_silent``), or by the gate once its
  answer's head had gone, its key no longer accepted (gate.py ``stop_passing``: ``rejected``,
  ``invalid_api_key``, the head's status).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from typing import NamedTuple
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy import flow as mitm_flow
from mitmproxy.net.http import http1

from resp2chat_core import clients, content_encoding, routing
from resp2chat_core import owner as owners
from resp2chat_core import settings as S
from resp2chat_core.turn import Turn, session_key
from resp2chat_core.channel import Scrubber, scrub
from resp2chat_core.errors import GatewayError, error_json, sanitize
from resp2chat_core.translator import output_bound
from resp2chat_io import mitm_head, offload
from resp2chat_io.relay import KEY_HEADER, TURN_HEADER, Relay

from .base import JSON_HEADERS, META, Owner, Refusal, fails_closed, refusal, request_id
from .gate import PASSTHROUGH
from .head_deadline import close, stop_flow, writing

# flow.metadata[META] key: a passthrough sent to the upstream (its answer is the upstream's): its
# path as the client sent it (without the query; the request's is the upstream's from then on)
FORWARDED = "forwarded"
# flow.metadata[META] key: a passthrough sent to the upstream that the gateway itself ended (an
# ``Ended``): with its own error before the answer's head (``error``), in place of the answer
# (``responseheaders``: a compressed one), or cut midway (``_silent``: its backend went silent;
# ``error``: the gate cut it, its key revoked)
ENDED = "passthrough_ended"


class Ended(NamedTuple):
    """How the gateway ended a passthrough it had sent on, as outcomes.py reports it."""

    status: str  # failed (an error of the gateway's own, 5xx; a cut), rejected (4xx: a key revoked meanwhile)
    code: str  # the gateway's error code
    http_status: int  # what the client was answered (a cut answer: its head's)


# The header a passthrough answer carries its backend's own ``x-request-id`` in (its
# ``x-request-id`` is the gateway's request id, as every answer's)
UPSTREAM_REQUEST_ID = "x-upstream-request-id"
TIMED_OUT = "passthrough_timed_out"  # flow.metadata[META] key: the seconds a passthrough waited for its head in vain

log = logging.getLogger("resp2chat")


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
    # every secret and what holds some (mcp_servers' headers, clients' plain keys…): ``secrets``,
    # the one list of them, scrubbed from passthrough answers, every flow (redact.py) and what a
    # turn answers, logs and records (turns.py)
    also_reads = tuple(sorted((S.SECRET_FIELDS | S.HOLDS_SECRETS) - {f.name for f in S.owned_by("upstreams")}))
    watches = ("ssl_insecure",)

    def __init__(self, source) -> None:
        super().__init__(source)
        self.relay = Relay()
        self.configured: Upstream | None = None  # None: the reverse-proxy target
        self.demo = None  # the bundled demo upstream server, when upstream_base_url == "demo"
        self.specs: tuple[S.UpstreamSpec, ...] = ()  # several upstreams (empty: one)
        self.endpoints: dict[str, Upstream] = {}  # by upstream name
        self.secrets: tuple[bytes, ...] = ()  # every configured secret (settings.secret_values)
        self.sent: dict[str, str] = {"": ""}  # by upstream name ("": the one): ``_sent``, for the replay key
        # what reads a passthrough answer's usage on its way, for a client with limits
        # (addons/limits.py ``Limits.meter``; None: nothing)
        self.meter = lambda flow: None
        # flow id -> a passthrough call's wait for its backend (``Waits``: the timer that ends it
        # when its answer's head does not come in time, ``_overdue``)
        self.calls: dict[str, Waits] = {}

    def _demo_url(self) -> str:
        if self.demo is None:
            from resp2chat_io.demo_upstream import serve_in_thread

            self.demo, demo_url = serve_in_thread()
            log.info(f"resp2chat: serving the bundled demo upstream at {demo_url}")
        host, port = self.demo.server_address[:2]
        return f"http://{host}:{port}/v1"

    def apply(self, updated: set[str]) -> None:
        url = self.s["upstream_base_url"]
        self.specs = S.parse_upstreams(self.s["upstreams"])
        if self.specs and url:
            raise exceptions.OptionsError("resp2chat: upstream_base_url and upstreams are both set: upstreams "
                                          "lists every upstream (drop upstream_base_url)")
        keys = [k for k in self.s["upstream_headers"] if S.credential_header(k)]
        if self.specs and keys:  # (the top-level ones go to every entry without headers of its own)
            raise exceptions.OptionsError(
                f"resp2chat: upstream_headers: {', '.join(map(repr, keys))} is a credential, and with upstreams the "
                "top-level upstream_headers go to every upstream: set it in the upstream_headers of the entry it "
                "belongs to (upstreams[N].upstream_headers)")
        self.endpoints = {s.name: Upstream(self._demo_url() if s.base_url == "demo" else s.base_url)
                          for s in self.specs}
        self.sent = {"": _sent(self.s["upstream_api_key"], self.s),
                     **{s.name: _sent(s.api_key, s.settings(self.s)) for s in self.specs}}
        if url == "demo":
            url = self._demo_url()
        self.configured = Upstream(url) if url else None
        client = self.relay.client
        # (a turn's calls take their timeouts from their candidate; these are for the rest:
        # web search, GET /models)
        client.connect_timeout = self.s["connect_timeout_secs"] or None
        client.idle_timeout = self.s["upstream_idle_timeout_secs"] or float("inf")
        client.verify_tls = not getattr(ctx.options, "ssl_insecure", False)
        # (a 200 JSON body read whole: a chat call's up to an answer's output bound, translator.py;
        # a model list's, a tokenizer's, a web search's up to the largest event)
        client.max_get = self.s["max_upstream_event_mb"] << 20
        client.max_answer = output_bound(client.max_get)
        self.relay.window = self.s["coalesce_ms"] / 1000  # (each turn's news: resp2chat_core/channel.py)
        self.secrets = S.secret_values(self.s)

    def clients_reloaded(self) -> None:
        """The config file's clients were read again (addons/gate.py): their plain keys are among
        the secrets from now on (scrubbed, refused in a URL), as those a configure reads."""
        self.s["clients"] = self.source.value("clients")
        self.secrets = S.secret_values(self.s)

    def default_url(self) -> str:
        if self.specs:
            return self.endpoints[self.specs[0].name].url
        return self.configured.url if self.configured else S.DEFAULT_UPSTREAM

    def target(self, flow: http.HTTPFlow) -> Upstream:
        if self.specs:
            return self.endpoints[self.specs[0].name]
        return self.configured or reverse_target(flow)

    def endpoint(self, spec: S.UpstreamSpec) -> Upstream:
        return self.endpoints[spec.name]

    def cache_context(self, flow: http.HTTPFlow, url: str | None = None) -> str:
        """What, besides the request, decides which backends may answer and how (the replay
        cache key): each upstream's URL, the models it serves (which one a model goes to, in
        order), and what it is sent besides the request (its key and ``upstream_headers``: an
        account, an OpenRouter provider order; by digest: the context is hashed, and never
        holds a secret itself). ``url``: the one upstream's, as a recorded flow names it."""
        if self.specs:
            return "\n".join(f"{s.name}={self.endpoints[s.name].url} {s.models!r} {self.sent[s.name]}"
                              for s in self.specs)
        return f"{self.target(flow).url if url is None else url} {self.sent['']}"

    def authorization(self, spec: S.UpstreamSpec | None, client: str | None) -> str | None:
        """The Authorization header an upstream gets: its key; else the client's, only with
        ``forward_client_auth`` when the gateway itself has no key; else none."""
        key = spec.api_key if spec is not None else self.s["upstream_api_key"]
        if key:
            return f"Bearer {key}"
        if client and self.s["forward_client_auth"] and not self.s["gateway_api_key"]:
            return client
        return None

    def forwarded(self, headers) -> tuple[bytes, ...]:
        """The credentials a client's request carries when they may reach a backend
        (``forward_client_auth``, the gateway without a key): secrets of that request, scrubbed
        from what it is answered, logged and recorded like the configured ones (a backend may
        repeat them in an error). Empty otherwise."""
        if not self.s["forward_client_auth"] or self.s["gateway_api_key"]:
            return ()
        given = (headers.get("authorization", "").removeprefix("Bearer ").strip(), headers.get("x-api-key", "").strip())
        return tuple(v.encode() for v in dict.fromkeys(given) if len(v) >= S.MIN_SECRET)

    def secrets_for(self, headers) -> tuple[bytes, ...]:
        """Every secret of a request: the configured ones and what it forwards (``forwarded``)."""
        return self.secrets + self.forwarded(headers)

    def owner_of(self, flow: http.HTTPFlow) -> str:
        """Whose stored state a request sees and makes (resp2chat_core/owner.py): decided here
        once, for every path (turns, the WebSocket, GET/DELETE of a stored response, the replay
        cache), from the client's request before its credentials are replaced. A configured
        client (the gate named it: ``clients``) owns its own; when the client's ``Authorization``
        may reach a backend (``authorization``: ``forward_client_auth``, no gateway key, an
        upstream without its own key) the backend decides who the client is, so each credential
        is its own owner (a digest of it); otherwise every client of this gateway is one owner."""
        owner = (flow.metadata.get(META) or {}).get("owner")  # (a configured client's: the gate's ClientSpec.identity)
        if owner is not None:
            return owner
        forwarded = self.s["forward_client_auth"] and not self.s["gateway_api_key"] and (
            any(not s.api_key for s in self.specs) if self.specs else not self.s["upstream_api_key"])
        return owners.of_credential(flow.request.headers.get("authorization")) if forwarded else owners.SHARED

    def authorize(self, flow: http.HTTPFlow, spec: S.UpstreamSpec | None = None) -> routing.Candidate:
        """A passthrough call: it gets its upstream's headers as that upstream's turns get them
        (``candidate``'s ``Candidate.sent``): the upstream key replaces the client's credentials
        (which go upstream only with ``forward_client_auth``, when the gateway itself has no key),
        its own ``upstream_headers`` go alone (a client's header of the same name is not sent
        beside them), and no other header named like a credential goes on (as ``forwarded_header``
        on a turn). Names go lower-case, as a turn's. Returns that upstream as called (its timeouts)."""
        headers = flow.request.headers
        to = self.candidate(spec, flow, headers.get("authorization"))
        common = [(name.lower(), value) for name, value in headers.fields  # (authorization, x-api-key, a proxy's
                  if not S.credential_header(name.decode("latin-1"))]  # credential, a cookie…: named like one)
        headers.fields = tuple(to.sent(common))
        return to

    def candidate(self, spec: S.UpstreamSpec | None, flow: http.HTTPFlow, client_auth: str | None,
                  body: bytes = b"", think: str = "auto") -> routing.Candidate:
        """One upstream as it is called (``spec``; None: the one upstream), with its URL, key,
        own ``upstream_headers`` (the entry's over the top-level ones) and timeouts: a turn's
        candidate (with the turn's ``body`` for it), and what a passthrough call or the merged
        model list sends that upstream (``Candidate.sent``: the one way its headers are made)."""
        if spec is None:
            own, name, url = self.s, "default", self.target(flow).url
        else:
            own, name, url = spec.settings(self.s), spec.name, self.endpoints[spec.name].url
        keyed = spec.api_key if spec is not None else self.s["upstream_api_key"]
        # (without a key of its own, with forward_client_auth: the client's credentials, or none it
        # gave, are what the backend judges: its 401 is the client's, routing.Candidate.forwarded)
        forwarded = not keyed and self.s["forward_client_auth"] and not self.s["gateway_api_key"]
        return routing.Candidate(name, url + routing.CHAT_PATH, body, think,
                                 _bearer(self.authorization(spec, client_auth)),
                                 routing.header_pairs(own["upstream_headers"]), forwarded=bool(forwarded),
                                 **routing.timeouts(own))

    def candidates(self, turn: Turn, flow: http.HTTPFlow, client_auth: str | None) -> tuple[routing.Candidate, ...]:
        """A turn's upstreams in the order they are tried (routing.py's rule), each with its URL,
        key, own headers and timeouts, and the turn's body for it (``Turn.alternates``)."""
        if not self.specs:
            return (self.candidate(None, flow, client_auth, turn.chat_body, turn.ctx.think),)
        specs = routing.candidates(self.specs, turn.ctx.model)
        bodies = [(turn.chat_body, turn.ctx.think)] + [(alt.body or turn.chat_body, alt.think)
                                                        for alt in turn.alternates]
        return tuple(self.candidate(spec, flow, client_auth, body, think)
                     for spec, (body, think) in zip(specs, bodies))

    def headers_for(self, turn: Turn, client) -> tuple[tuple[bytes, bytes], ...]:
        """What every candidate of a turn gets besides its body, key and own headers: the client's
        headers (Codex's session headers…; ``client``: the request's, or a WebSocket's upgrade's)
        without its credentials, hop-by-hop, framing or handshake headers, then the chat request's
        content type, and the session's routing key (``routing_key_header``)."""
        out = [(name.lower().encode(), value.encode("utf-8", "surrogateescape"))
               for name, value in client.items(multi=True) if forwarded_header(name)]
        out += [(b"content-type", b"application/json"), (b"accept", b"text/event-stream"),
                (b"accept-encoding", b"identity")]  # (the translator reads raw bytes)
        affinity = self.routing_key(session_key(turn.prompt_cache_key, client))
        if affinity:
            name = affinity[0].lower().encode()
            out = [(n, v) for n, v in out if n != name] + [(name, affinity[1].encode())]
        return tuple(out)

    def routing_key(self, session: str | None) -> tuple[str, str] | None:
        """(header, value) that keeps a session on one backend replica (``routing_key_header``)."""
        name = self.s["routing_key_header"]
        if not name or not session:
            return None
        if not _HEADER_VALUE.match(session):  # a client's odd key: still one stable value per session
            session = hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return name, session

    async def running(self) -> None:
        if self.relay.server is None:  # (its port may be bound already: a turn during start-up)
            await self.relay.start()

    async def done(self) -> None:
        await self.relay.close()
        if self.demo is not None:
            self.demo.shutdown()
            self.demo.server_close()
            self.demo = None

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response" or not (flow.metadata.get(META) or {}).get(PASSTHROUGH):
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        models = (flow.metadata.get(META) or {}).get("models")  # (a client limited to some models: gate.py)
        if (len(self.specs) > 1 or models) and path == "/v1/models" and req.method == "GET":
            await self.merged_models(flow, models)
            return
        if models and path.startswith("/v1/models/") and not clients.matches(models, path[11:]):
            flow.response = refusal(flow, clients.not_allowed(path[11:]))
            return
        if models and req.method == "POST":  # (embeddings: the backend would serve any model it has)
            try:
                clients.check_model(models, await offload.reduce(req.get_content(strict=False) or b"", _model, keys=True))
            except GatewayError as err:
                flow.response = refusal(flow, err)
                return
        self.target(flow).route(flow, req.path[3:] if path.startswith("/v1/") else req.path)  # (the query kept)
        flow.metadata[META][FORWARDED] = path  # (not refused here: outcomes.py)
        to = self.authorize(flow, self.specs[0] if self.specs else None)  # (its timeouts, as its turns')
        req.headers["accept-encoding"] = "identity"  # (responseheaders reads the answer for secrets)
        if to.idle_timeout < float("inf"):
            self.calls[flow.id] = Waits((to.connect_timeout or 0) + to.idle_timeout, to.idle_timeout)
            mitm_head.LEAVING[flow] = self._sent  # (the head's deadline starts once it left every hook)

    def _sent(self, flow: http.HTTPFlow) -> None:
        """``flow``'s request left every hook for its backend (mitm_head.py ``LEAVING``: as it
        takes its connection; a body mitmproxy streams, an addon's ``request.stream``, at that body's
        end, its connection taken at its head): the wait for its answer's head, the backend's,
        starts now. Not at the gateway's own request hook: a hook after it (an operator's
        addon), an interception in mitmweb, are the gateway's wait, which no backend is to blame
        for (and which stopped the call, untried, as the upstream's ``upstream_timeout``)."""
        waits = self.calls.get(flow.id)
        if waits is not None and waits.timer is None:
            waits.timer = asyncio.get_running_loop().call_later(waits.head, self._overdue, flow)

    def _overdue(self, flow: http.HTTPFlow) -> None:
        """A passthrough call whose answer's head did not come within ``connect_timeout_secs`` +
        ``upstream_idle_timeout_secs`` of its request leaving for its backend (a backend that took
        it and says nothing, or takes no connection) is ended (its backend connection closed, or
        its connect): the client gets a 504 ``upstream_timeout`` (``error``), not mitmproxy's
        ``tcp_timeout`` (600 s) and a closed connection."""
        waits = self.calls.get(flow.id)
        if waits is None:
            return
        waits.timer = None
        if flow.response is None and flow.error is None and flow.live:
            flow.metadata.setdefault(META, {})[TIMED_OUT] = waits.head
            log.info(f"resp2chat: passthrough {request_id(flow)}: no answer from the upstream within {waits.head:g} s")
            stop_flow(flow)

    def _silent(self, flow: http.HTTPFlow) -> None:
        """A passthrough answer whose backend sent nothing of its body for
        ``upstream_idle_timeout_secs`` (its head came: a backend stalled midway) is cut: its client
        connection closed (head_deadline.py ``close``), its backend's with it, as mitmproxy ends
        an answer whose backend broke off: the client reads a body cut short, not its end (the
        backend's connection closed instead would end one that ends with its connection as if
        whole: ``responseheaders`` sends those chunked). The access log and metrics say so
        (``ENDED``: ``failed``, ``upstream_timeout``). A silence while the client has not taken what
        it was sent is the client's (mitmproxy reads the backend only as the client takes its
        answer): the wait starts again. Checked once the wait is up since the last byte: each
        byte only notes its time (``Waits.heard``). The connection closed and the check that its
        client is reading are this call's alone: the gateway's clients speak HTTP/1.1, one request
        at a time on a connection (listen.py turns ``http2`` off: over HTTP/2 one connection would
        carry other calls, and this close would end them too)."""
        waits = self.calls.get(flow.id)
        if waits is None:
            return
        waits.timer = None
        if flow.response is None or flow.error is not None or not flow.live:
            return
        now = time.monotonic()
        if now - waits.last >= waits.idle and writing(flow.client_conn.id):
            waits.last = now  # (the client's wait, not the backend's silence)
        if now - waits.last < waits.idle:
            waits.timer = asyncio.get_running_loop().call_later(waits.last + waits.idle - now, self._silent, flow)
            return
        meta = flow.metadata.setdefault(META, {})
        meta[ENDED] = Ended("failed", "upstream_timeout", flow.response.status_code)
        log.info(f"resp2chat: passthrough {request_id(flow)}: the upstream sent nothing for {waits.idle:g} s "
                 "(upstream_idle_timeout_secs) in the middle of its answer: cut")
        close(flow.client_conn.id, "its passthrough answer's backend went silent")

    def _answered(self, flow: http.HTTPFlow) -> None:
        waits = self.calls.pop(flow.id, None)
        if waits is not None and waits.timer is not None:
            waits.timer.cancel()

    def error(self, flow: http.HTTPFlow) -> None:
        self._answered(flow)
        meta = flow.metadata.get(META) or {}
        if flow.response is not None and flow.error is not None and meta.get(FORWARDED) and not flow.is_replay:
            if meta.get(ENDED) is None and meta.get("closed_by_gateway") == clients.REVOKED:
                # (cut by the gate, its key revoked once the answer's head had gone: gate.py
                # ``stop_passing``; the access log and metrics say so, as of a cut for silence)
                meta[ENDED] = Ended("rejected", clients.REVOKED, flow.response.status_code)
                flow.error.msg = "the API key this request was sent with is no longer accepted: its answer was cut"
            elif meta.get(ENDED) is not None and meta[ENDED].code == "upstream_timeout":
                # (cut by ``_silent``: mitmproxy's words are of a client that went away)
                flow.error.msg = "the upstream sent nothing for upstream_idle_timeout_secs: its answer was cut"
        if flow.response is not None or not meta.get(PASSTHROUGH) or flow.is_replay or flow.error is None:
            return
        stopped = meta.get("closed_by_gateway") or meta.get(TIMED_OUT)  # (by the gate, or _overdue)
        if flow.error.msg == mitm_flow.Error.KILLED_MESSAGE and not stopped:
            return  # (killed by its operator: mitmproxy closes the connection, as asked)
        if flow.error.msg.startswith("Client disconnected"):  # (mitmproxy's words: no one to answer)
            return
        err, rid = failed_early(flow, meta), request_id(flow)
        # (mitmproxy's words, cut where they quote the backend's bytes: a secret all the same is not shown)
        err.message = sanitize(scrub(err.message.encode(), self.secrets_for(flow.request.headers)).decode(
            "utf-8", "replace"))
        log.warning(f"resp2chat: passthrough {rid} failed before its answer: {err.message}")
        meta[ENDED] = Ended("failed" if err.status >= 500 else "rejected", err.code, err.status)  # (outcomes.py)
        body = json.dumps(err.body()).encode()
        mitm_head.FAILED[flow.client_conn] = (flow.request, mitm_head.answer(err.status, body, rid))

    def response(self, flow: http.HTTPFlow) -> None:
        self._answered(flow)  # (an answer a later hook made: no head to wait for)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        waits = self.calls.get(flow.id)
        if waits is not None and waits.timer is not None:
            waits.timer.cancel()  # (the head came: its deadline is over)
            waits.timer = None
        if not self._pass_on(flow, waits):
            self.calls.pop(flow.id, None)  # (no body to wait for: the call's waits are over)

    def _pass_on(self, flow: http.HTTPFlow, waits: Waits | None) -> bool:
        """A passthrough answer's head came: it goes on scrubbed (its body streamed through
        ``Scrubber``), or as the gateway's 502 if compressed. True: its body is to come and
        ``waits`` wait for it (``_silent``)."""
        resp = flow.response
        if resp is None or not (flow.metadata.get(META) or {}).get(PASSTHROUGH) or flow.is_replay == "response" \
                or resp.data.content is not None:
            return False  # (an answer made here, whole: Redact scrubs it)
        secrets = self.secrets_for(flow.request.headers)
        if resp.reason and any(s.decode("latin-1") in resp.reason for s in secrets):  # (the status line too)
            resp.reason = scrub(resp.reason.encode("latin-1"), secrets).decode("latin-1")
        for name, value in resp.headers.items(multi=True):
            if any(s.decode("latin-1") in value for s in secrets):
                resp.headers.set_all(name, [scrub(v.encode("latin-1"), secrets).decode("latin-1")
                                            for v in resp.headers.get_all(name)])
        if content_encoding.codings(resp.headers.get("content-encoding", "")):
            body = error_json(f"the upstream answered {flow.request.path.split('?', 1)[0]} compressed "
                              f"({resp.headers['content-encoding']}) although asked not to: the gateway does not pass on "
                              "what it cannot check for secrets", status_type="upstream_error", code="upstream_encoded")
            flow.response = http.Response.make(502, body, {**JSON_HEADERS, "x-request-id": request_id(flow)})
            flow.response.stream = Refusal(body)
            flow.metadata[META][ENDED] = Ended("failed", "upstream_encoded", 502)
            return False
        # (its request id, as every answer of the gateway's: the one its log lines name; the
        # backend's own, if any, goes on beside it)
        rid, theirs = request_id(flow), resp.headers.get_all("x-request-id")
        if theirs and theirs != [rid]:
            resp.headers.set_all(UPSTREAM_REQUEST_ID, theirs)
        resp.headers["x-request-id"] = rid
        scrubber, meter = Scrubber(secrets), self.meter(flow)
        resp.stream = scrubber if meter is None else lambda data: scrubber(meter(data))
        size = http1.expected_http_body_size(flow.request, resp)  # (0: none; -1: to the connection's end)
        if flow.request.http_version == "HTTP/1.1" and size != 0 and (secrets or size == -1):
            # (a scrubbed body may be longer or shorter than declared; one that ends with its
            # connection could not show its client a cut, ``_silent``: each goes chunked, the
            # latter on a connection that ends with it, as before)
            resp.headers.pop("content-length", None)
            resp.headers["transfer-encoding"] = "chunked"
            if size == -1:
                resp.headers["connection"] = "close"
        if waits is None or size == 0:
            return False
        # the body's bytes must not stop for upstream_idle_timeout_secs (``_silent``)
        waits.last = time.monotonic()
        resp.stream = waits.heard(resp.stream)
        waits.timer = asyncio.get_running_loop().call_later(waits.idle, self._silent, flow)
        return True

    async def merged_models(self, flow: http.HTTPFlow, allowed: tuple[str, ...] | None = None) -> None:
        """``GET /v1/models`` made here: with several upstreams, every upstream's list (the models
        its ``models`` patterns let through), first listing of an id wins; for a client limited to
        some models (``allowed``: its globs), only those. An upstream that does not answer is left
        out (and logged); none answering is a 502."""
        client = flow.request.headers.get("authorization")
        specs = self.specs or (None,)  # (None: the one upstream)

        async def ask(spec: S.UpstreamSpec | None):
            name = spec.name if spec is not None else "default"
            try:
                to = self.candidate(spec, flow, client)  # (its key, own headers and waits, as its turns')
                status, body = await self.relay.client.get(
                    to.base_url + "/models", to.sent([(b"accept", b"application/json")]),
                    connect_timeout=to.connect_timeout, idle_timeout=to.idle_timeout)
                data = json.loads(body) if status == 200 else None
            except Exception as exc:  # noqa: BLE001 - unreachable, not JSON, h11 errors…: that upstream is out
                log.warning(f"resp2chat: GET /models from upstream {name}: {type(exc).__name__}: {exc}")
                return None
            if not isinstance(data, dict) or not isinstance(data.get("data"), list):
                log.warning(f"resp2chat: GET /models from upstream {name}: HTTP {status}, no model list")
                return None
            return [m for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)
                    and (spec is None or spec.serves(m["id"]))
                    and (allowed is None or clients.matches(allowed, m["id"]))]

        answers = await asyncio.gather(*(ask(s) for s in specs))
        if all(a is None for a in answers):
            flow.response = http.Response.make(502, error_json(
                "no upstream answered GET /models (tried " + ", ".join(s.name if s else "default" for s in specs) + ")",
                status_type="upstream_error", code="upstream_unavailable"),
                {**JSON_HEADERS, "x-request-id": request_id(flow)})
            return
        merged, seen = [], set()
        for models in answers:
            for m in models or ():
                if m["id"] not in seen:
                    seen.add(m["id"])
                    merged.append(m)
        flow.response = http.Response.make(200, json.dumps({"object": "list", "data": merged}),
                                           {**JSON_HEADERS, "x-request-id": request_id(flow)})


_HEADER_VALUE = re.compile(r"^[\x21-\x7e]{1,256}$")
# A client's headers that never go upstream with a turn: its credentials, hop-by-hop, framing,
# content negotiation (the gateway's own), a WebSocket's handshake, the relay's.
_NOT_FORWARDED = frozenset({
    "authorization", "x-api-key", "proxy-authorization", "host", "content-length", "transfer-encoding", "connection",
    "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "expect", "content-type", "content-encoding",
    "accept", "accept-encoding", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "sec-websocket-accept", TURN_HEADER, KEY_HEADER})


class Waits:
    """A passthrough call's waits for its backend: ``head``, the seconds its answer's head may
    take from its request leaving the gateway (``connect_timeout_secs`` +
    ``upstream_idle_timeout_secs``), ``idle``, the seconds between two reads of its body
    (``upstream_idle_timeout_secs``), ``last``, the time of the last (``time.monotonic``), and
    the timer running."""

    __slots__ = ("head", "idle", "last", "timer")

    def __init__(self, head: float, idle: float) -> None:
        self.head, self.idle, self.last = head, idle, 0.0
        self.timer: asyncio.TimerHandle | None = None

    def heard(self, stream):
        """``stream`` (an answer's stream function) noting the time of each read."""
        def heard(data: bytes):
            self.last = time.monotonic()
            return stream(data)

        return heard


def forwarded_header(name: str) -> bool:
    """Whether a client's header goes on to a backend (a turn's, a passthrough call's): not a
    hop-by-hop, framing or handshake header, nor a credential — the client's key for the gateway,
    a proxy's, or one named like a credential (``settings.credential_header``: a cookie, the
    session or access token an SSO proxy in front of the gateway adds, another API's key), which
    is its holder's for other services, never a backend's (the backend gets its own key)."""
    return name.lower() not in _NOT_FORWARDED and not S.credential_header(name)


def failed_early(flow: http.HTTPFlow, meta: dict) -> GatewayError:
    """What a client is told of its passthrough call that failed before its answer's head: the
    gateway's words (mitmproxy's, for what it saw of the backend, ``mitm_head.quiet``: never the
    backend's bytes), the codes a turn's failure has."""
    req = flow.request
    origin = f"{req.scheme}://{req.host}:{req.port}"  # (no user info: the gateway's routing, Upstream)
    if meta.get("closed_by_gateway") == clients.REVOKED:
        return GatewayError("the API key this request was sent with is no longer accepted (revoked or changed): "
                            "it was stopped before its answer", type="authentication_error", code=clients.REVOKED,
                            status=401)
    if meta.get(TIMED_OUT):
        what = "sent no answer" if flow.server_conn.timestamp_tcp_setup else "took no connection"
        return GatewayError(f"the upstream {origin} {what} within {meta[TIMED_OUT]:g} s (connect_timeout_secs + "
                            "upstream_idle_timeout_secs)", type="upstream_error", code="upstream_timeout", status=504)
    said = mitm_head.quiet(flow.error.msg) if flow.error else "no answer"
    if flow.server_conn.timestamp_tcp_setup is None:
        return GatewayError(f"cannot connect to the upstream {origin}: {said}", type="upstream_error",
                            code="upstream_unavailable", status=502)
    return GatewayError(f"the upstream {origin} failed before its answer: {said}", type="upstream_error",
                        code="upstream_unavailable", status=502)


def _model(body, twice: frozenset) -> object:
    """The ``model`` a passthrough request's JSON body names (None: none, or not an object). Named
    twice, it is refused: the gateway would check the last, a backend may serve the first."""
    if "model" in twice:
        raise GatewayError("the request body names 'model' more than once: name it once (the gateway checks "
                           "the last, a backend may take the first)", param="model", code="invalid_value")
    return body.get("model") if isinstance(body, dict) else None


def _sent(api_key: str, settings: dict) -> str:
    """A digest of what an upstream is sent besides the request: its key, its extra headers."""
    sent = json.dumps([api_key or "", sorted(settings["upstream_headers"].items())])
    return hashlib.sha256(sent.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _bearer(value: str | None) -> bytes | None:
    return value.encode("utf-8", "surrogateescape") if value else None
