"""The gate: what every request meets first, decided at its head (resp2chat_core/gate.py has the
rules), HTTP and the Responses WebSocket's upgrade alike.

In order: a key in the URL (refused, and redacted from the flow: ``without_credentials``);
``/healthz``; HTTPS only when ``tls_cert_file`` is set; the ``Host`` (one of the
gateway's names: ``public_hosts``) and the ``Origin`` (``allowed_origins``, whose CORS preflights
the gate answers); a path that names a gateway endpoint in disguise; the gateway key; whether
anyone serves the path and method (the gateway, or the upstream through ``passthrough_paths``);
a turn's content type; the body's declared size (``max_request_body_mb``; a body of unknown
length, chunked, is refused with 411); room for that body among those arriving at once, all
clients together (``max_request_bodies_mb``, resp2chat_core/gate.py ``BodyBudget``: its declared
size counted from the head until the body is in, else a 503 with retry-after). A request let
in has the client's credentials taken off when they were the gateway key (they never leave the
gateway) and is sent on in origin form.
A GET or HEAD that declares a body is a 400 (``invalid_body``) at its head, its body unread, on
every path (``/healthz`` aside: answered before), an operator's ``passthrough_paths`` included.
Kept so on purpose: no endpoint of the gateway, and none of the backends it fronts (OpenAI's,
llama.cpp, vLLM, Ollama), reads one (RFC 9110: a GET's content has no defined meaning); a
backend, or a proxy before it, that ignores a GET's ``content-length`` would read the body as
the next request on the connection: bytes a client wrote, reaching the backend past the gate
(``passthrough_paths``, ``model_map``, the clients' limits; a keyless local backend serves
them). Trade-off: a backend endpoint that does take a GET body cannot be passed through
(expose it as a POST); the body budget would bound its size, not this risk.
Once the body is in, a compressed one is decoded (bounded by the same limit:
resp2chat_core/content_encoding.py), so every later hook reads plain JSON.

**Refusing at the head without reading the body.** mitmproxy reads a request's whole body
after the ``requestheaders`` hook even when an addon has answered there: it sends the answer
only after the ``request`` hook. Its own ``body_size_limit`` stops early, but answers with its
HTML page and runs before this hook. So a refusal whose body is small (at most
``READ_REFUSED``, declared) is answered as usual; any other is answered by the relay
(resp2chat_io/relay/server.py ``HeadRefusal``): the request is pointed at it with a body callable
that drops every byte (``Unread``), the relay sends the JSON refusal at once
(``connection: close``), and once ``READ_REFUSED`` bytes of body went by the relay ends its
connection, which makes mitmproxy close the client's. Trade-off: the client gets its 401/411/413
while it may still be sending, then the connection ends (HTTP clients read an early answer:
curl, httpx, urllib3); the gateway holds no body and reads at most ``READ_REFUSED`` of it,
whatever an addon after the gate makes of ``request.stream`` (mitm_head.py ``_refusal_stands``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Callable

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import http1

from resp2chat_core import content_encoding
from resp2chat_core import gate as G
from resp2chat_core import settings as S
from resp2chat_core.clients import ClientSpec, ClientTable, accepted, no_longer_accepted, parse_clients
from resp2chat_core.errors import GatewayError
from resp2chat_core.limits import retry_headers
from resp2chat_io import mitm_head, offload
from resp2chat_io.config import FileWatch, config_path, load_settings
from resp2chat_io.relay import TURN_HEADER, HeadRefusal

from .base import JSON_HEADERS, META, Owner, fails_closed, log, request_id, show_url
from .head_deadline import stop_flow

RELOAD_EVERY = 1.0  # seconds between two looks at the config file (a revoked key is refused within that)
READ_REFUSED = 64 << 10  # body bytes read at most of a request refused at its head
PASSTHROUGH = "passthrough"  # flow.metadata[META] key: the upstream serves this request (addons/upstreams.py)
SHARE = "share"  # flow.metadata[META] key: whose share of a budget the request takes (BodyBudget ``who``: head_deadline.py too)
CREDENTIALS = ("authorization", "x-api-key")
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~ ,-]{0,1000}$")


@dataclass(eq=False)
class Refused:
    """A request refused at its head and answered by the relay (its body unread)."""

    url: str  # what the client asked for (the flow shows it again)
    response: http.Response


class Unread:
    """The body callable of a request refused at its head: every byte dropped; past ``budget``
    the relay ends the connection (``HeadRefusal.close``)."""

    __slots__ = ("answer", "left")

    def __init__(self, answer: HeadRefusal, budget: int) -> None:
        self.answer, self.left = answer, budget

    def __call__(self, data: bytes):
        self.left -= len(data)
        if self.left < 0:
            self.answer.close()
        return []


@fails_closed
class Gate(Owner):
    name = "resp2chat_gate"
    owner = "gate"
    also_reads = ("bind_addr", "tls_cert_file")

    def __init__(self, source, upstreams) -> None:
        super().__init__(source)
        self.upstreams = upstreams  # .secrets: every configured secret (a key in a URL)
        self.relay = upstreams.relay
        self.rules = G.parse_passthrough(self.s["passthrough_paths"])
        self.refused: dict[str, Refused] = {}  # flow id -> refused at its head, answered by the relay
        self.clients = ClientTable()
        self.bodies = G.BodyBudget(self.s["max_request_bodies_mb"] << 20)  # the bodies arriving at once
        self.keyed = False  # the gateway takes keys: once so, no reload of the file makes it open
        # the client each request in progress was let in as, by flow id (until its response or
        # error): its key, not only its name, which a reload may give to another key meanwhile
        self.callers: dict[str, ClientSpec] = {}
        # the passthrough requests in progress (until their response or error), by flow id: a key
        # no longer accepted has them cut (``stop_passing``), as its turns stop
        self.passing: dict[str, http.HTTPFlow] = {}
        self._watch: asyncio.Task | None = None
        # told of every changed clients list (``changed``: the file reloaded, or the option set; with
        # ``accepts``, the rule from now on): the turns in flight of a key no longer accepted stop
        # (Turns.clients_changed)
        self.reloaded: list[Callable[[Callable[[ClientSpec | None], bool]], None]] = []

    def apply(self, updated: set[str]) -> None:
        self.rules = G.parse_passthrough(self.s["passthrough_paths"])
        self.bodies.cap = self.s["max_request_bodies_mb"] << 20  # (the bodies arriving keep their share)
        # `clients` with gateway_api_key (its `default` client): an invalid pair stops start-up
        try:
            table = ClientTable(parse_clients(self.s["clients"], self.s["gateway_api_key"]))
        except S.SettingsError as exc:
            raise exceptions.OptionsError(f"resp2chat: {exc}") from None
        self.changed(table)

    @property
    def limit(self) -> int:
        return self.s["max_request_body_mb"] << 20

    # --- the head ---------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        path = req.path.split("?", 1)[0]
        if flow.is_replay == "request":
            # client replay (mitmdump -C): the operator's recorded chat requests, not a client's;
            # they go to the configured upstream (addons/upstreams.py)
            flow.metadata.setdefault(META, {})[PASSTHROUGH] = True
            return
        if (req.host, req.port) == self.relay.address and self.relay.port:
            # a client asking mitmproxy (as a forward proxy) for the relay: never
            return self.refuse(flow, GatewayError("not a destination", code="forbidden", status=403))
        presented = [v for v in (req.headers.get("authorization", "").removeprefix("Bearer ").strip(),
                                 req.headers.get("x-api-key", "")) if len(v) >= S.MIN_SECRET]
        target = G.without_credentials(req.path, [s.decode() for s in self.upstreams.secrets] + presented)
        if target is not None:
            req.path = target  # (what the flow, the log and mitmweb show of it)
            return self.refuse(flow, GatewayError(
                "the request URL carries a credential: send keys only as 'Authorization: Bearer …' (or x-api-key), "
                "never in the URL", param="url", code="credential_in_url"))
        if G.head_size(req.method, req.path, req.headers.fields) > G.MAX_HEAD:
            return self.refuse(flow, G.head_too_large())  # (a longer one that came in pieces: mitm_head.py)
        if path == G.HEALTHZ and req.method in ("GET", "HEAD"):
            return self.answer(flow, 200, b'{"status":"ok"}', JSON_HEADERS)
        if self.s["tls_cert_file"] and not flow.client_conn.tls_established:
            return self.refuse(flow, GatewayError(
                "this gateway serves HTTPS only (tls_cert_file is set): use https://", param="tls_cert_file",
                code="https_required", status=400))
        hosts = [req.host_header] + ([req.authority] if req.authority and not req.is_http2 else [])
        err = (G.host_refusal(hosts, S.parse_bind(self.s["bind_addr"])[0], self.s["public_hosts"])
               or G.origin_refusal(req.headers.get("origin"), self.s["allowed_origins"],
                                   req.headers.get("sec-fetch-site")))
        if err:
            return self.refuse(flow, err)
        if not req.is_http2:
            req.authority = ""  # origin form to whoever gets it (an absolute URL never reaches a backend)
        if req.method == "OPTIONS" and "origin" in req.headers and "access-control-request-method" in req.headers:
            return self.preflight(flow, path)
        if G.disguised(path):
            # /v1/%72esponses, /v1//responses, /v1/./responses…: a backend that decodes the path
            # would serve its own /v1/responses past everything the gateway checks
            return self.refuse(flow, GatewayError(
                "the request path names a gateway endpoint in another spelling: use the plain path",
                param="path", code="invalid_path"))
        client = self.identify(req)
        if client is False:
            return self.refuse(flow, GatewayError(
                "missing or wrong API key (send the gateway's key, or your client key, as 'Authorization: Bearer …')",
                type="authentication_error", code="invalid_api_key", status=401))
        where = G.route(req.method, path, self.rules)
        if isinstance(where, GatewayError):
            return self.refuse(flow, where)
        if G.takes_json(req.method, path) and (err := G.content_type_refusal(req.headers.get("content-type"))):
            return self.refuse(flow, err)
        size = self.declared(req)
        if size is None:
            return self.refuse(flow, GatewayError(
                "a request body needs a content-length (the gateway does not take chunked request bodies)",
                param="content-length", code="length_required", status=411))
        if size > self.limit:
            return self.too_large(flow)
        if size and req.method in ("GET", "HEAD"):
            # (no endpoint reads one, a passthrough path's neither: it would be read, and inflated when
            # compressed, for nothing, and go to a backend that may take it for the next request: the
            # module's docstring)
            return self.refuse(flow, GatewayError(f"a {req.method} request carries no body", param="body",
                                                  code="invalid_body"))
        # (a client's share only where there are others: a gateway of one key may use it all)
        who = client.identity if client is not None and len(self.clients) > 1 else None
        if (err := self.bodies.take(flow.id, flow.client_conn.id, size, who)) is not None:
            return self.refuse(flow, err)
        meta = flow.metadata.setdefault(META, {})
        if who is not None:
            meta[SHARE] = who  # (its answer's share of max_answers_waiting_mb too)
        if where is G.PASSTHROUGH:
            meta[PASSTHROUGH] = True
            self.passing[flow.id] = flow
        if client is not None:
            self.callers[flow.id] = client
            meta["client"] = client.name  # (the name: who called, in the flow, the metrics, the access log)
            meta["owner"] = client.identity  # (whose stored state: Upstreams.owner_of; its limits are too)
            if client.models != ("*",):
                meta["models"] = list(client.models)  # (its view of GET /v1/models: upstreams.py)
            for name in CREDENTIALS:  # the gateway's keys: they never leave the gateway
                req.headers.pop(name, None)

    @staticmethod
    def declared(req: http.Request) -> int | None:
        """The body size the head declares (None: unknown, chunked)."""
        try:
            return http1.expected_http_body_size(req)
        except ValueError:
            return None

    def refuse(self, flow: http.HTTPFlow, err: GatewayError) -> None:
        headers = {**JSON_HEADERS, "x-request-id": request_id(flow)}
        if isinstance(err, G.NotAllowed):
            headers["allow"] = err.allow
        if err.retry_after is not None:
            headers.update(retry_headers(err.retry_after))
        self.answer(flow, err.status, json.dumps(err.body()).encode(), headers)

    def too_large(self, flow: http.HTTPFlow, decoded: bool = False) -> None:
        self.refuse(flow, GatewayError(
            f"request body larger than max_request_body_mb ({self.s['max_request_body_mb']} MiB)"
            + (" once decoded" if decoded else ""), param="max_request_body_mb", code="request_too_large", status=413))

    def answer(self, flow: http.HTTPFlow, status: int, body: bytes, headers: dict) -> None:
        """Answer now. At the head (the body not read yet): at once if the body to come is small
        (mitmproxy reads it first), else through the relay, the body unread (the module's
        docstring)."""
        req = flow.request
        size = self.declared(req) if req.data.content is None else 0
        if size is not None and size <= READ_REFUSED:
            flow.response = http.Response.make(status, body, headers)
            return
        answer = HeadRefusal(flow.id, secrets.token_urlsafe(24), status,
                        [(k.encode(), v.encode()) for k, v in headers.items()], body)
        self.refused[flow.id] = Refused(req.url, http.Response.make(status, body, {**headers, "connection": "close"}))
        for name, value in self.relay.expect(answer):
            req.headers[name] = value
        req.headers.pop("transfer-encoding", None)
        req.headers.pop("expect", None)  # no "100 Continue": the client need not send the body at all
        req.headers["content-length"] = "0"  # (what the relay gets: nothing)
        req.scheme, (req.host, req.port) = "http", self.relay.address
        req.stream = mitm_head.REFUSED[flow] = Unread(answer, READ_REFUSED)  # (it stands: an addon after may not read it)
        flow.metadata.setdefault(META, {})["refused"] = "at the head; body not read"

    def preflight(self, flow: http.HTTPFlow, path: str) -> None:
        """A browser's CORS preflight from an allowed origin (``allowed_origins``)."""
        req = flow.request
        method = req.headers["access-control-request-method"].strip()
        where = G.route(method, path, self.rules)
        if isinstance(where, GatewayError):
            return self.refuse(flow, where)
        headers = {"access-control-allow-methods": method, "access-control-max-age": "600"}
        wanted = req.headers.get("access-control-request-headers", "")
        if wanted and _HEADER_LIST.match(wanted):
            headers["access-control-allow-headers"] = wanted
        self.answer(flow, 204, b"", headers)

    # --- the body ---------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        self.bodies.give_back(flow.id)  # (its body is in: what holds it now is the request's)
        refused = self.refused.get(flow.id)
        if refused is not None:  # the relay answers it; later hooks must leave it alone
            if flow.response is None:
                flow.response = refused.response.copy()
            return
        if flow.response or flow.is_replay == "response":
            return
        if not flow.is_replay and not self.accepts(self.callers.get(flow.id)):
            # its key revoked or rotated while its body came in (or none, keys needed since): every
            # request, not only a turn (HttpTurns asks again, ``caller``, as it starts one)
            flow.metadata.setdefault(META, {})["status"] = "rejected"
            return self.refuse(flow, no_longer_accepted())
        req = flow.request
        if len(req.raw_content or b"") > self.limit:
            self.too_large(flow)
        elif "content-encoding" in req.headers:
            await self.decode(flow)

    async def decode(self, flow: http.HTTPFlow) -> None:
        """A compressed body becomes the plain body (no ``content-encoding``), or a clear error:
        on the loop up to ``offload.LARGE`` bytes (a small one waits for no other body), larger
        off it, in the worker (offload.py ``inflate``: one that may inflate to the limit holds up
        no stream)."""
        req = flow.request
        header = req.headers.get("content-encoding", "")
        small = min(self.limit, offload.LARGE)
        try:
            try:
                body = content_encoding.decode(req.raw_content, header, small) if req.raw_content else b""
            except content_encoding.TooLarge:
                if small >= self.limit:
                    raise
                body = await offload.inflate(content_encoding.decode, req.raw_content, header, self.limit)
        except content_encoding.TooLarge:
            self.too_large(flow, decoded=True)
            return
        except content_encoding.Unsupported as exc:
            self.refuse(flow, GatewayError(
                f"content-encoding {str(exc)!r} is not supported (supported: {', '.join(content_encoding.SUPPORTED)})",
                param="content-encoding", code="unsupported_content_encoding", status=415))
            return
        except content_encoding.BadBody as exc:
            self.refuse(flow, GatewayError(f"request body is {exc} (content-encoding: {header})",
                                           param="content-encoding", code="invalid_body"))
            return
        del req.headers["content-encoding"]
        req.content = body  # (no content-encoding left: stored as is, content-length updated)

    # --- the answer -------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        refused = self.refused.get(flow.id)
        if refused is not None:
            show_url(flow, refused.url)

    def cors(self, flow: http.HTTPFlow) -> None:
        """An answer to an allowed origin's page says so (Egress calls it, after every addon)."""
        origin = flow.request.headers.get("origin")
        if origin is not None and flow.response is not None and G.origin_allowed(origin, self.s["allowed_origins"]):
            h = flow.response.headers
            h["access-control-allow-origin"] = origin
            h["access-control-expose-headers"] = "x-request-id"
            h["vary"] = "Origin"

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        self.bodies.give_back(flow.id)  # (its body never came whole: the client went, or it was cut)
        self.callers.pop(flow.id, None)
        self.passing.pop(flow.id, None)
        refused = self.refused.pop(flow.id, None)
        if refused is not None:
            self.relay.forget(flow.id)  # (never claimed: the client left first)
            show_url(flow, refused.url)

    def client_disconnected(self, client) -> None:
        self.bodies.gone(client.id)  # (a body cut with its connection, whatever hook its flow had)

    def identify(self, req: http.Request):
        """Who is calling: the client whose key the request presents (``Authorization: Bearer …``
        or ``x-api-key``), None when the gateway takes no keys, False for a missing or unknown key
        (every key, when the last client was revoked from the file: ``keyed``).
        The key is hashed once and the digest looked up (clients.py): no key is compared byte by
        byte, and only digests are kept."""
        if not len(self.clients):
            return False if self.keyed else None
        given = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or req.headers.get("x-api-key", "")
        return (self.clients.lookup(given) if given else None) or False

    def accepts(self, client: ClientSpec | None) -> bool:
        """Is the key a request was let in with (``client``: the one it named then; None: no
        key, the gateway took none) still accepted? (clients.py ``accepted``: a key revoked or
        given anew, or no key once the gateway takes keys, is not.)"""
        return accepted(self.clients, self.keyed, client)

    def caller(self, flow: http.HTTPFlow) -> ClientSpec | None:
        """The client a request was let in as, as configured now (its limits reloaded; None: the
        gateway took no keys); ``GatewayError`` 401 when its key is no longer accepted: revoked or
        rotated while its body came in, or none since keys are needed."""
        spec = self.callers.get(flow.id)
        if not self.accepts(spec):
            raise no_longer_accepted()
        return self.clients.named(spec.name) if spec is not None else None

    def client(self, name: str | None) -> ClientSpec | None:
        """The client of that name as configured now (None: none, or no longer: revoked)."""
        return self.clients.named(name) if name else None

    # --- a changed clients list, without a restart ---------------------------------------------

    async def running(self) -> None:
        self._watch = asyncio.ensure_future(self._watch_clients())

    async def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _watch_clients(self) -> None:
        """``resp2chat keys add``/``revoke`` (or any edit) change the config file's ``clients``:
        the gate reads them again within ``RELOAD_EVERY`` seconds of the change (a changed file's
        stat: config.FileWatch), so a revoked key is refused on every replica reading that file,
        no restart. The environment's and ``--set``'s ``clients`` win over the file's, as at
        start: then the file's changes do not count."""
        watch = FileWatch(config_path())
        while True:
            await asyncio.sleep(RELOAD_EVERY)
            try:
                if watch.changed():
                    self._reload()
            except Exception as exc:  # noqa: BLE001 — a bad edit: keep the clients we have, say why
                log.warning(f"resp2chat: the config file's clients were not reloaded: {exc}")

    def changed(self, table: ClientTable) -> None:
        """The clients from now on, whichever way they changed (the watched file, or ``clients``
        set while the gateway runs: mitmweb's options, ``--set`` of a console): the turns in
        flight of a key no longer accepted stop, alike (``reloaded``'s listeners). Once it has
        taken keys the gateway stays keyed until it restarts: revoking the last key (a leaked
        one) refuses everyone, it does not open a gateway that ``keys add`` locked."""
        before, self.clients, self.keyed = self.clients, table, self.keyed or len(table) > 0
        if table != before:
            for listener in self.reloaded:
                listener(self.accepts)
            self.stop_passing()

    def stop_passing(self) -> None:
        """The passthrough requests in progress of a key no longer accepted end now
        (head_deadline.stop_flow: their backend connections are closed; no error can follow an
        answer's head already sent, a streamed chat completion, embeddings coming in pieces: the
        client sees the answer cut), and whatever they held (limits.py: the slot) is given back,
        as when a client goes away. Before, such a stream went on to its end, however long,
        after the key was revoked."""
        for flow_id, flow in list(self.passing.items()):
            if flow.request.timestamp_end is None:
                continue  # (its body still coming: ``request`` refuses it with a 401 once it is in)
            spec = self.callers.get(flow_id)
            if not self.accepts(spec):
                self.passing.pop(flow_id, None)
                flow.metadata.setdefault(META, {})["closed_by_gateway"] = "invalid_api_key"
                who = f"client {spec.name!r}" if spec is not None else "a request without a key"
                log.info(f"resp2chat: passthrough {request_id(flow)} of {who} stopped: its key is no longer accepted")
                stop_flow(flow)

    def _reload(self) -> None:
        fixed = getattr(ctx.options, "resp2chat_clients", "") or "RESP2CHAT_CLIENTS" in os.environ
        try:
            values = load_settings().values
        except Exception:
            if fixed:
                return  # (the file's clients are not this gateway's, its other settings are read at start)
            raise
        if values["gateway_api_key"] != self.s["gateway_api_key"] and not ctx.options.resp2chat_gateway_api_key:
            log.warning("resp2chat: gateway_api_key changed in the config file: it is read at start only, so this "
                        "gateway still takes the key it started with until it is restarted (a key that changes "
                        "without a restart is a client's: clients, resp2chat keys)")
        if fixed:
            return  # --set / the environment decide, not the file
        table = ClientTable(parse_clients(values["clients"], self.s["gateway_api_key"]))
        if table != self.clients:
            self.source.reloaded("clients", values["clients"])  # (what a later configure reads too)
            self.upstreams.clients_reloaded()  # (a plain key among them is a secret from now on)
            self.changed(table)
            log.info(f"resp2chat: clients reloaded from the config file: {', '.join(table.names) or 'none'}")
            if not len(table) and self.keyed:
                log.warning("resp2chat: the config file lists no client any more: every request is refused until "
                            "one is added (a gateway that started with keys does not become open by an edit)")


@fails_closed
class Egress:
    """The gate's other end, after every other addon.

    - ``request``: a request goes on only where the gateway sent it — to the relay (a turn, a
      socket, a refusal) or to the upstream (``passthrough_paths``) — or with an answer. Anything
      else (a path some addon let through unanswered: a bug) is a 404 and reaches no backend.
    - ``responseheaders``/``response``: the answer to an allowed origin's page carries its CORS
      headers, whichever addon made it (a stream's go out with its head; a whole body's may be
      replaced until the ``response`` hook)."""

    name = "resp2chat_egress"

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        if flow.request.headers.get(TURN_HEADER) is not None or (flow.metadata.get(META) or {}).get(PASSTHROUGH):
            return
        flow.response = http.Response.make(404, json.dumps(GatewayError(
            f"{flow.request.path.split('?', 1)[0][:200]} is not served by this gateway",
            code="unknown_path", status=404).body()).encode(), {**JSON_HEADERS, "x-request-id": request_id(flow)})

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.gate.cors(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.gate.cors(flow)
