"""The Responses WebSocket transport: ``ws://…/v1/responses``, as Codex speaks it.

- ``request``: an upgrade at /v1/responses (``responses_websocket`` on) is registered with the
  relay as a ``Socket`` and pointed at it; the relay answers ``101`` and hands this addon each
  client message (resp2chat_io/relay/websocket.py says why the relay terminates the socket).
  Off: ``426`` at once (Codex then uses HTTP, without retrying). An upgrade anywhere else:
  ``404``; a plain ``GET /v1/responses``: ``405``. None of them reaches the backend.
- each ``response.create`` is a turn (resp2chat_core/websocket.py): lowered as on the HTTP path
  (``Turns.parse``: the same chat bytes), sent to the backend by the relay (an ``Exchange``),
  its events sent back one message each; ``previous_response_id`` continues a response of this
  connection; a warm-up (``generate: false``) is answered at once, without the backend.
- every client message is a request against its client's limits (``Turns.admit``, the HTTP
  rule), admitted before it is read: a client past them costs no decoding, and a warm-up counts
  too (one request for ``rpm``, open while it is answered; no backend tokens). What the socket
  remembers is bounded: ``max_request_body_mb`` of it (``remembered``, ws.Connection).
- how many sockets are open is bounded, on this replica (their memory is its): a client's
  ``max_sockets`` (``429 rate_limit_exceeded``) and the gateway's ``max_websockets`` (``503
  server_overloaded``), both with ``retry-after``; past either, the upgrade is refused before the
  relay takes it (``_no_room``; Codex then uses HTTP). A socket counts from its upgrade until it
  is refused, fails or ends (``_end``: the only way out of ``live``). A refused upgrade is a
  refused request in the metrics and the access log (outcomes.py, route ``GET /v1/responses``).
- a socket whose key is no longer accepted (revoked, rotated, or none once the gateway takes
  keys: ``Gate.accepts``; a client's ``models`` changed is not that) is closed by the gateway
  when it hears of the change (``clients_changed``), without waiting for the client: an
  ``error`` message (401 ``invalid_api_key``, what a message on it is refused with), then a
  close frame, 1008 (policy violation: RFC 6455's code for "refused by the endpoint's policy",
  what auth failures close with; 1011 would say the gateway failed, 4xxx codes no client
  knows). A turn in flight on it first ends as every turn of that key does (Turns.clients_changed:
  ``response.failed``, ``invalid_api_key``); the close follows it (``message``). A message that
  comes first is refused, and the socket closed after it. The relay ends it then
  (``Socket.close``), and mitmproxy's ``websocket_end`` takes it out of ``live``: its memory
  and its slot of ``max_websockets`` are free. The close is counted once, as a refused upgrade
  is (``Outcomes.emit``: ``invalid_api_key``, HTTP status 101).
- the flow (the upgrade) records every turn in ``flow.metadata["resp2chat"]["turns"]``: the
  message, the chat request, the backend's stream and the events sent; ``flow.comment`` sums
  the socket up; finished turns go to ``Turns.finished`` listeners and the request log.
- a long socket is not held in memory: its flow keeps its first turn records (``MAX_RECORDS``,
  bodies up to ``RECORD_BUDGET``) and its first messages in ``flow.websocket.messages``
  (``MAX_MESSAGES``, ``MESSAGE_BUDGET``: mitmproxy would keep every one); later ones are counted
  in the metadata (``turns_dropped``, ``messages_dropped``), and that is what a flow file keeps.
- ``KeepUpgrades`` (added after mitmproxy's own server replay): ``server_replay_extra`` (kill,
  a status) never stops a socket's upgrade; its unrecorded turns get the extra instead.

Owns ``responses_websocket`` and ``max_websockets``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from mitmproxy import ctx, http
from mitmproxy.flow import Error
from mitmproxy.utils import human

from resp2chat_core import mcp, websocket as ws
from resp2chat_core.clients import REVOKED, ClientSpec, no_longer_accepted
from resp2chat_core.channel import Reader
from resp2chat_core.errors import GatewayError, gateway_failure, specific_code
from resp2chat_core.gate import RESPONSES_PATHS
from resp2chat_core.labels import shown
from resp2chat_core.limits import retry_headers
from resp2chat_core.replay import MAX_ENTRY_BYTES
from resp2chat_core.response import CONTINUABLE
from resp2chat_core.turn import Turn, session_key
from resp2chat_core.usage import usage_note
from resp2chat_io import mitm_websocket, offload
from resp2chat_io.relay import Socket
from resp2chat_io.relay.upstream import failure

from .base import META, Owner, RecordText, fails_closed, log, refusal, request_id, show_url
from .redact import UNREAD_MCP, may_hold_mcp
from .outcomes import WEBSOCKET, Outcome
from .server_replay import not_recorded
from .turns import UNRECORDED, Finished, TurnRun
RECORD_BUDGET = 64 << 20  # turn records kept on one socket's flow (``recorded_size``); later turns are noted without their bodies
MAX_RECORDS = 1024  # turn records kept on one socket's flow; later turns are only counted
MESSAGE_BUDGET = 16 << 20  # bytes of messages one socket's flow keeps in flow.websocket.messages (the first ones)
MAX_MESSAGES = 4096  # messages one socket's flow keeps (the first ones); later ones are only counted
MAX_SENT = 1 << 16  # messages of one turn kept for its record
REFUSED_KEPT = 4096  # characters of a refused message its record keeps (what it was, not all of it)
QUIET_SOCKETS = "!~websocket"  # mitmdump's dumper_filter unless one is set


@dataclass(eq=False)
class OpenSocket:
    """One open socket."""

    flow: http.HTTPFlow  # its upgrade
    sock: Socket  # its relay side (``sock.send`` answers the client)
    url: str  # what the client asked for (the flow shows it again once the 101 is in)
    owner: str  # whose stored state its turns read and write (Upstreams.owner_of, decided at the upgrade)
    headers: http.Headers  # the upgrade's, as the client sent them (its turns' client headers; the flow's get redacted)
    client: str | None = None  # the client the gate named at the upgrade (clients), checked again at each message
    spec: ClientSpec | None = None  # (that client then: a key revoked or given anew since is refused)
    conn: ws.Connection = field(default_factory=ws.Connection)  # (``open``: at most max_message bytes of it)
    messages: int = 0  # client messages so far (each gets its own request id: request_id(flow)_n)
    turns: int = 0
    recorded: int = 0  # what the turn records in the flow's metadata hold (``recorded_size``)
    records: int = 0  # turn records made (the flow keeps the first MAX_RECORDS)
    counts: dict = field(default_factory=dict)  # records by status ("warm-up" for warm-ups), for the comment
    usage: dict | None = None  # the last record's usage that had one
    current: Message | None = None  # the message whose turn is in flight
    kept: int = 0  # messages kept in flow.websocket.messages, and their bytes
    kept_bytes: int = 0
    dropped: int = 0  # messages not kept, and their bytes
    dropped_bytes: int = 0
    passing: object = None  # the newest message, not to be kept: it leaves the list at the next one's hook

    @property
    def closing(self) -> bool:
        """The gateway closed it (``sock.closing``: its key no longer accepted, ``_close``; a
        message too big, the relay's 1009), waiting for it to end: nothing more is served."""
        return self.sock.closing is not None


@dataclass(eq=False)
class Message:
    """One client message being served."""

    text: str  # as received (a binary one decoded leniently: for the record only)
    request_id: str  # in failures the client sees, the log, metrics and the access log
    started: float  # time.monotonic() when it arrived
    request: dict | None = None  # the Responses request it carries, once read
    turn: Turn | None = None  # its turn, once lowered
    run: TurnRun | None = None  # its turn in flight (a warm-up has none: no backend)
    sent: list = field(default_factory=list)  # (event type, message) as sent, for the record
    refused: str | None = None  # the code it was refused with (``_refuse``)


def remembered(turn: Turn, output: list = ()) -> int:
    """What a conversation the socket remembers is counted as (ws.Connection's ``max_bytes``): its
    lowered chat request, which carries all of it (no work: the bytes are made), and its output."""
    return len(turn.chat_body) + (len(json.dumps(output, ensure_ascii=False)) if output else 0)


def recorded_size(value) -> int:
    """What a turn record (or a value in it) counts for ``RECORD_BUDGET``: the characters of its
    text, at any depth (``gateway_events``' fields too: a compaction item, ``Compacted.item``,
    holds its whole summary sealed), a ``RecordText``'s bytes; a number or the like, its digits."""
    if isinstance(value, (str, RecordText)):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + recorded_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(recorded_size(v) for v in value)
    return len(str(value))


@fails_closed
class ResponsesWebSocket(Owner):
    name = "resp2chat_websocket"
    owner = "websocket"
    also_reads = ("max_request_body_mb",)  # a message is a request: the same limit

    def __init__(self, source, upstreams, turns, gate, server_replay=None, outcomes=None) -> None:
        super().__init__(source)
        self.upstreams, self.relay, self.turns, self.gate = upstreams, upstreams.relay, turns, gate
        self.server_replay, self.outcomes = server_replay, outcomes
        self.live: dict[str, OpenSocket] = {}
        self.by_client: dict[str, OpenSocket] = {}  # the same, by the client connection's id
        mitm_websocket.install()  # a client message is bounded while mitmproxy reads it (see there)
        mitm_websocket.refused = self.oversized

    # --- the upgrade -------------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        # mitmdump prints a line for every WebSocket message: hundreds a turn. Unless told
        # otherwise, it leaves sockets out, and this addon logs one line per turn instead.
        if "dumper_filter" in updated and "dumper_filter" in ctx.options and ctx.options.dumper_filter is None:
            ctx.options.update(dumper_filter=QUIET_SOCKETS)

    def apply(self, updated: set[str]) -> None:
        mitm_websocket.limit = self.max_message

    @property
    def max_message(self) -> int:
        """Bytes a client message may have: a message is a request (``max_request_body_mb``)."""
        return self.s["max_request_body_mb"] << 20

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if "websocket" not in req.headers.get("upgrade", "").lower():
            if path in RESPONSES_PATHS and req.method == "GET":
                self.refuse(flow, 405, "GET /v1/responses is only the Responses WebSocket (an upgrade); "
                            "POST /v1/responses creates a response", "method_not_allowed", allow="POST")
            return
        if path not in RESPONSES_PATHS:
            self.refuse(flow, 404, f"no WebSocket is served at {path}: the Responses WebSocket is /v1/responses",
                        "websocket_not_supported")
        elif not self.s["responses_websocket"]:
            self.refuse(flow, 426, "the Responses WebSocket transport is off on this gateway "
                        "(responses_websocket: false): use HTTP (POST /v1/responses)", "websocket_disabled")
        elif req.method != "GET" or req.headers.get("sec-websocket-version") != "13" \
                or not req.headers.get("sec-websocket-key"):
            self.refuse(flow, 400, "not a WebSocket upgrade: GET with Sec-WebSocket-Version: 13 and a "
                        "Sec-WebSocket-Key", "invalid_websocket_upgrade")
        elif (full := self._no_room(flow)) is not None:
            flow.response = refusal(flow, full, retry_headers(ws.SOCKET_RETRY))
        else:
            self.open(flow)

    def _no_room(self, flow: http.HTTPFlow) -> GatewayError | None:
        """Past its client's ``max_sockets`` or the gateway's ``max_websockets`` (``ws.no_room``),
        counted on this replica (what a socket holds is its memory): the sockets in ``live``, from
        their upgrade until it is refused, fails or the socket ends (``_end``). A client's count is
        of its identity's sockets whose key is still accepted (a revoked or rotated key's socket
        serves it no more, and holds no slot of the new key; it counts for the gateway until it
        has ended: the gateway closes it, ``clients_changed``)."""
        spec = self.gate.callers.get(flow.id)
        limit = spec.max_sockets if spec is not None else None
        mine = 0 if limit is None else sum(
            1 for live in self.live.values()
            if live.spec is not None and live.spec.identity == spec.identity and self.gate.accepts(live.spec))
        return ws.no_room(len(self.live), self.s["max_websockets"], spec.name if spec else None, mine, limit)

    @staticmethod
    def refuse(flow: http.HTTPFlow, status: int, message: str, code: str, **headers: str) -> None:
        flow.response = refusal(flow, GatewayError(message, code=code, status=status),
                                tuple((k.replace("_", "-"), v) for k, v in headers.items()))

    def open(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        sock = Socket(flow.id, secrets.token_urlsafe(24), lambda text, send: self.message(live, text, send),
                      self.max_message)
        name = flow.metadata.get(META, {}).get("client")
        live = OpenSocket(flow, sock, req.url, self.upstreams.owner_of(flow), req.headers.copy(), name,
                          self.gate.callers.get(flow.id), ws.Connection(max_bytes=self.max_message))
        meta = flow.metadata.setdefault(META, {})
        meta.update(transport="websocket", turns=[])  # (each turn records its upstream: _finish)
        self.live[flow.id] = self.by_client[flow.client_conn.id] = live  # (websocket_end or error forgets it)
        for name, value in self.relay.expect(sock):
            req.headers[name] = value
        req.scheme, (req.host, req.port) = "http", self.relay.address

    def running(self) -> None:
        if ctx.master is not None and ctx.master.addons.get(KeepUpgrades.name) is None:
            ctx.master.addons.add(KeepUpgrades(self))  # after mitmproxy's server replay: see there

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        live = self.live.get(flow.id)
        if live is not None:
            self._show_client_url(flow, live)

    def response(self, flow: http.HTTPFlow) -> None:
        live = self.live.get(flow.id)
        if live is not None and flow.response.status_code != 101:
            self._end(flow)  # the relay did not take it: no socket follows

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """mitmproxy keeps every message of a socket in ``flow.websocket.messages``: this socket's
        flow keeps its first ones (``MAX_MESSAGES``, ``MESSAGE_BUDGET``). A later one stays last
        in the list while its hooks run (addons after this one read it there, mitmdump's output
        too) and leaves it when the next one comes, or when the socket ends; it is counted in
        ``metadata["resp2chat"]["messages_dropped"]``."""
        live = self.live.get(flow.id)
        if live is None or flow.websocket is None:
            return
        try:
            self._keep(flow, live)
        except Exception as exc:  # noqa: BLE001 — a hook of mitmproxy's WebSocket layer: never raise into it
            log.warning(f"resp2chat: keeping a WebSocket message failed: {type(exc).__name__}: {exc}", exc_info=exc)

    def _keep(self, flow: http.HTTPFlow, live: OpenSocket) -> None:
        messages = flow.websocket.messages
        self._let_pass(live, messages)
        size = len(messages[-1].content) if messages else 0
        if not live.dropped and live.kept < MAX_MESSAGES and live.kept_bytes + size <= MESSAGE_BUDGET:
            live.kept += 1
            live.kept_bytes += size
            return
        live.passing = messages[-1]
        live.dropped += 1
        live.dropped_bytes += size
        flow.metadata[META]["messages_dropped"] = {"count": live.dropped, "bytes": live.dropped_bytes}

    @staticmethod
    def _let_pass(live: OpenSocket, messages: list) -> None:
        """The message not kept leaves the list (it is near its end: mitmproxy only appends)."""
        passing, live.passing = live.passing, None
        if passing is not None:
            for i in range(len(messages) - 1, max(len(messages) - 4, -1), -1):
                if messages[i] is passing:
                    del messages[i]
                    return

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        try:
            live = self.live.get(flow.id)
            if live is not None and flow.websocket is not None:
                self._let_pass(live, flow.websocket.messages)  # (before the flow is saved: mitmproxy's save comes after)
            self._end(flow)
        except Exception as exc:  # noqa: BLE001 — recording must not break mitmproxy's hook chain
            log.warning(f"resp2chat: recording the WebSocket failed: {type(exc).__name__}: {exc}", exc_info=exc)

    def _end(self, flow: http.HTTPFlow) -> None:
        live = self.live.pop(flow.id, None)
        if live is not None:
            self.by_client.pop(flow.client_conn.id, None)
            self.relay.forget(flow.id)
            self._show_client_url(flow, live)
            m = live.current
            if m is not None and self._settled(live, m):  # the client left mid-turn: record it before the flow is saved
                self._finish(live, m)

    @staticmethod
    def _show_client_url(flow: http.HTTPFlow, live: OpenSocket) -> None:
        """The flow shows what the client asked for, not the relay, and no relay headers."""
        show_url(flow, live.url)

    # --- the messages ------------------------------------------------------------------------

    def oversized(self, client) -> None:
        """mitmproxy refused a message of this client while it arrived (larger than
        max_request_body_mb: resp2chat_io/mitm_websocket.py, which drops the rest of it): the
        client hears it now, as an ``error`` like any refused message, and the socket goes on."""
        live = self.by_client.get(client.id)
        if live is None or live.sock.send is None:
            return
        try:
            live.messages += 1
            m = Message("", f"{request_id(live.flow)}_{live.messages}", time.monotonic())
            self._refuse(live, m, self._too_large(), live.sock.send, oversized=True)
        except Exception as exc:  # noqa: BLE001 — called from mitmproxy's WebSocket layer: never raise into it
            log.warning(f"resp2chat: refusing an oversized WebSocket message failed: {type(exc).__name__}: {exc}",
                        exc_info=exc)

    def clients_changed(self, accepts) -> None:
        """The clients were reloaded (Gate.changed; ``accepts``: is the key a socket was opened
        with still accepted?): a socket whose key is not is closed now (``_close``); one with a
        turn in flight once that turn has ended (it was stopped: Turns.clients_changed), at the
        end of its message (``message``)."""
        for live in list(self.live.values()):
            if live.current is None and not accepts(live.spec):
                self._close(live)

    def _close(self, live: OpenSocket, told: bool = False) -> None:
        """Close a socket whose key is no longer accepted: the client hears why (unless ``told``:
        the message it just sent was refused for it), then a close frame (1008: the module says
        why); the relay ends it, and ``websocket_end`` takes it out of ``live``. One the gateway
        closes already (the relay's 1009) is let end so."""
        if live.closing:
            return
        err = no_longer_accepted()
        live.sock.close(1008, "API key no longer accepted", [] if told else [ws.error_message(err)])
        live.conn = ws.Connection(max_bytes=0)  # (what it remembers is let go now, not at its end)
        live.flow.metadata[META]["closed_by_gateway"] = err.code
        who = f"client {live.client!r}" if live.client is not None else "a socket without a key"
        log.info(f"resp2chat: WebSocket {request_id(live.flow)} of {who} closed: its key is no longer accepted")
        if self.outcomes is not None:  # (metrics and the access log: the socket refused, as a refused upgrade)
            self.outcomes.refused(live.flow, WEBSOCKET, err.code or "", 101, live.client or "",
                                  time.time() - live.flow.request.timestamp_start)

    def _client(self, live: OpenSocket):
        """The socket's client as configured now: a key revoked (or changed) since the upgrade
        is refused, as a new request with it would be, and so is a socket opened without a key
        once the gateway takes keys (``keys add`` since); the socket is closed after it
        (``message``), if ``clients_changed`` has not closed it already."""
        if not self.gate.accepts(live.spec):
            raise no_longer_accepted()
        return self.gate.client(live.client)  # (as configured now: its limits reloaded; None: no keys)

    def _too_large(self) -> GatewayError:
        return GatewayError(f"message larger than max_request_body_mb ({self.s['max_request_body_mb']} MiB)",
                            code="request_too_large", status=413)

    async def message(self, live: OpenSocket, message: str | bytes, send) -> None:
        """One client message (the relay calls this in order, one at a time). Fails closed: a bug
        of ours still ends the message with an ``error`` message naming its request id (the
        details go to the log), and the socket goes on."""
        live.messages += 1
        m = Message(message if isinstance(message, str) else message.decode("utf-8", "replace"),
                    f"{request_id(live.flow)}_{live.messages}", time.monotonic())
        try:
            await self._message(live, m, message, send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning(f"resp2chat: websocket message {m.request_id} failed: {type(exc).__name__}: {exc}",
                        exc_info=exc)
            self._settled(live, m)
            self._refuse(live, m, GatewayError(gateway_failure("handle this message", m.request_id),
                                               code="server_error", status=500, type="server_error"), send)
        if not live.closing and not self.gate.accepts(live.spec):  # (its key went while it was served)
            self._close(live, told=m.refused == REVOKED)

    async def _message(self, live: OpenSocket, m: Message, message: str | bytes, send) -> None:
        """One message: turns.py's steps, as for an HTTP request (the same chat bytes), with this
        socket's memory asked first for what it continues; the events sent one message each."""
        # read as an HTTP body is (requestbody.py); a lone surrogate then fails as invalid UTF-8
        body = message if isinstance(message, bytes) else message.encode("utf-8", "surrogatepass")
        data = create = None
        turns = self.turns
        turn_id = f"{live.flow.id}:{live.messages}"
        client = verdict = None
        try:
            if len(body) > self.max_message:  # (mitmproxy refuses one first: ``oversized``)
                raise self._too_large()
            client = self._client(live)
            # every message is a request, admitted before it is read, as an HTTP body is
            # (http_turns.py): a client past its limits costs no decoding. A warm-up too: it asks
            # no backend, but the socket remembers what it carries (rpm bounds how fast)
            verdict = await turns.admit(client, turn_id)
            if verdict is not None and not verdict.admitted:
                raise verdict.error(client.name)
            data = await turns.decode(body)  # (a large message off the loop, as an HTTP body)
            create = ws.parse_message(data)
            if create is None:
                return  # response.processed: nothing to say (its request given back below, spent)
            m.request = turns.check(create.body, client)
            self._redact(live, m, mcp.redact_text(m.text, create.body))
            if create.body.get("background") is True:  # (it outlives its connection: HTTP's, polled)
                raise GatewayError("background responses are created over HTTP (POST /v1/responses), not on the "
                                   "WebSocket", param="background", code="unsupported_parameter")
            found = await turns.lookup(create.body, live.owner, live.conn)
            m.turn = turns.lower(create.body, found, owner=live.owner, request_id=m.request_id,
                                 keep_items=True)  # (the socket remembers its conversation)
        except GatewayError as err:
            if create is not None and create.previous is not None:
                live.conn.forget(create.previous)  # (a failed continuation evicts what it continued)
            if m.request is None and may_hold_mcp(body):  # refused before its tools were read (or before it was)
                self._redact(live, m, UNREAD_MCP)
            turns.release(client, turn_id)  # (before the client hears of it: below, again, is nothing)
            self._refuse(live, m, err, send)
            m.request = None
            await offload.discard(data, len(body))
        else:
            await self._serve(live, m, create, client, verdict, turn_id, send)
        finally:
            if m.run is None:  # no run of its own (refused, replayed, a warm-up, failed before one): the open
                turns.release(client, turn_id)  # turn its client was admitted for, if any, given back

    async def _serve(self, live: OpenSocket, m: Message, create, client, verdict, turn_id: str, send) -> None:
        """A lowered message served: from a recording, a warm-up's answer, or its turn run."""
        turns, turn = self.turns, m.turn
        sent = m.sent

        def out(sse: bytes) -> None:
            """A delivery's events as messages (its runs of deltas merged: ``Translator.merge``)."""
            messages = ws.events(sse)
            if len(sent) < MAX_SENT:
                sent.extend(messages)
            send([message for _, message in messages])

        if live.closing:
            return  # (its key went while it was read: the socket is closing, nothing more is served)
        if self.server_replay is not None and self.server_replay.active \
                and self._replay(live, m, send, create.warmup, client, turn_id):
            return  # answered from a recording (--server-replay)
        if create.warmup:
            reader = Reader(turn.translator(turns.max_event), MAX_ENTRY_BYTES, self.upstreams.secrets_for(live.headers))
            out(reader.apply(ws.Warmup()))
            live.conn.remember(turn.ctx.response_id, turn.items, remembered(turn))
            self._warmed(live, m, reader)
            return
        live.turns += 1
        m.run = run = turns.start(turn, live.flow, turn_id=turn_id, started=m.started, client_headers=live.headers,
                                  secret="", client=client, limits=verdict.headers if verdict is not None else ())
        run.reader.translator.merge = True
        run.exchange.channel.push = lambda items: out(run.reader.apply_all(items))  # (several: held together)
        live.current = m
        try:
            await self.relay.run(run.exchange)
        except asyncio.CancelledError:  # the socket closed: the backend call is dropped with it
            if self._settled(live, m):  # (not recorded yet by websocket_end)
                self._finish(live, m)
            raise
        except Exception as exc:  # noqa: BLE001 — a bug of ours: the turn still ends clearly
            log.warning(f"resp2chat: websocket turn {m.request_id} failed: {type(exc).__name__}: {exc}", exc_info=exc)
            out(run.reader.apply(failure(502, "the gateway's relay failed", "server_error")))
        if not self._settled(live, m):
            return  # the socket ended meanwhile: websocket_end recorded the turn
        out(run.reader.finish())
        done = self._finish(live, m)
        if done.status in CONTINUABLE:
            output = run.reader.translator.output
            live.conn.remember(turn.ctx.response_id, turn.items + output, remembered(turn, output), stored=turn.store)
        elif done.status == "failed" and create.previous is not None:
            live.conn.forget(create.previous)  # (as a refused continuation: ws.Connection.forget)

    @staticmethod
    def _redact(live: OpenSocket, m: Message, text: str) -> None:
        """The message without what its mcp tools carry for their servers (mcp.redact_text), in
        its record and in the messages the flow keeps: never recorded."""
        if text == m.text:
            return
        messages = live.flow.websocket.messages if live.flow.websocket is not None else []
        for kept in messages[-1:-9:-1]:  # (it is among the last: the relay hands messages on in order)
            if kept.from_client and kept.content.decode("utf-8", "replace") == m.text:
                kept.content = text.encode()
                break
        m.text = text

    @staticmethod
    def _settled(live: OpenSocket, m: Message) -> bool:
        """The turn ``m`` leaves the socket (True: it was in flight; False: already settled)."""
        if live.current is not m:
            return False
        live.current = None
        return True

    def _refuse(self, live: OpenSocket, m: Message, err: GatewayError, send, **note) -> None:
        """A message the gateway answers itself with an ``error``: sent, recorded, counted."""
        send([ws.error_message(err)])
        m.refused = err.code
        if len(m.text) > REFUSED_KEPT:
            note["responses_request_chars"] = len(m.text)
        self._record(live, {"responses_request": m.text[:REFUSED_KEPT], "request_id": m.request_id,
                            "status": "rejected", "error": err.body()["error"], **note})
        self._refused(live, m, err.code or "", err.status)

    def _refused(self, live: OpenSocket, m: Message, code: str, http_status: int) -> None:
        """A message refused (no turn) for metrics and the access log, as outcomes.py counts a
        refused HTTP request."""
        if self.outcomes is None:
            return
        raw = m.request or {}
        model = raw.get("model") if isinstance(raw.get("model"), str) else ""
        self.outcomes.emit(Outcome(request_id=m.request_id,
                                   session=session_key(raw.get("prompt_cache_key"), live.flow.request.headers),
                                   model=model, upstream="", status="rejected", code=code,
                                   took=time.monotonic() - m.started, http_status=http_status,
                                   client=live.client or ""))

    def _replay(self, live: OpenSocket, m: Message, send, warmup: bool, client, turn_id: str) -> bool:
        """Offline replay (``--server-replay``): the recorded events of the same turn (or
        warm-up), if any. False: none, and the turn (or warm-up) is served as usual. A replayed
        turn ends as an HTTP one does (``Turns.replayed``: its listeners hear of it)."""
        turn = m.turn
        events = self.server_replay.events(turn.chat_body, warmup)
        if events is None:
            extra = "kill" if ctx.options.server_replay_kill_extra else ctx.options.server_replay_extra
            refused = None if warmup else not_recorded(extra)  # (as for an HTTP turn: server_replay.py)
            if refused is not None:
                self._refuse(live, m, refused, send, server_replay=UNRECORDED)
                return True
            return False
        send(ws.messages(events))
        final = ws.final_response(events) or {}
        if final.get("status") in CONTINUABLE:
            output = final.get("output") or []
            live.conn.remember(final["id"], turn.items + output, remembered(turn, output))
        self._record(live, {"responses_request": m.text, "request_id": m.request_id,
                            "chat_request": RecordText(turn.chat_body),
                            "response_id": final.get("id"), "status": final.get("status", "unfinished"),
                            "usage": final.get("usage"), "warmup": warmup, "server_replay": True,
                            "events": RecordText(events)})
        if not warmup:
            self.turns.replayed(live.flow, turn, final or None, events, recorded=True, started=m.started,
                                client=client, turn_id=turn_id)
        return True

    def _warmed(self, live: OpenSocket, m: Message, reader: Reader) -> None:
        """Record a warm-up (answered without the backend: no turn; its request was admitted like any)."""
        turn, t = m.turn, reader.translator
        self._record(live, {"responses_request": m.text, "request_id": m.request_id,
                            "response_id": turn.ctx.response_id, "created_at": turn.ctx.created_at,
                            "status": t.response()["status"] if t.done else "unfinished", "usage": t.usage,
                            "warmup": True, "chat_request": RecordText(turn.chat_body),
                            "events": RecordText(ws.as_sse(m.sent))})  # (what replay matches)

    def _finish(self, live: OpenSocket, m: Message) -> Finished:
        """Record a turn on the flow and tell the listeners (the response store, metrics and the
        access log…): ``Turns.settle`` and ``ended``, as for an HTTP turn. Returns what they were
        told."""
        run = m.run
        answer = ws.as_sse(m.sent)  # what the client got (deltas merged as they were sent)
        done, record = self.turns.settle(run, answer)
        turn = m.turn
        self._record(live, {"responses_request": m.text, "request_id": m.request_id,
                            "response_id": turn.ctx.response_id, "warmup": False,
                            "upstream": run.answering.base_url, "upstream_name": done.upstream,
                            "chat_request": RecordText(turn.chat_body), **record,
                            "events": RecordText(answer)})
        self.turns.ended(done, run.exchange.turn_id)
        return done

    def _record(self, live: OpenSocket, record: dict) -> None:
        flow = live.flow
        meta = flow.metadata[META]
        live.records += 1
        if live.records > MAX_RECORDS:
            meta["turns_dropped"] = live.records - MAX_RECORDS
        else:
            size = recorded_size(record)
            if live.recorded + size > RECORD_BUDGET:
                record = {k: v for k, v in record.items() if k not in ("responses_request", "chat_request",
                                                                        "upstream_sse", "events", "gateway_events")}
                record["truncated"] = True
            else:
                live.recorded += size
            meta["turns"].append(record)
        kind = "warm-up" if record.get("warmup") else record["status"]
        live.counts[kind] = live.counts.get(kind, 0) + 1
        if record.get("usage"):
            live.usage = record["usage"]
        if not record.get("warmup"):  # mitmdump's own output shows sockets quietly (QUIET_SOCKETS): one line a turn
            u = record.get("usage")
            log.info(f"{human.format_address(flow.client_conn.peername)}: WebSocket /v1/responses message "
                     f"{live.records} ({record.get('request_id')}) · {record['status']}"
                     + (f" ({shown(specific_code(record['error']))})" if record.get("error") else "")
                     + usage_note(u)
                     + (" · server replay" if record.get("server_replay") else ""))
        n = live.records
        flow.comment = (
            f"WebSocket /v1/responses · {n} message{'s' if n != 1 else ''} ("
            + ", ".join(f"{count} {kind}" for kind, count in live.counts.items()) + ")"
            + usage_note(live.usage, " · last: ")
        )


@fails_closed
class KeepUpgrades:
    """The socket's upgrade under ``--server-replay`` with ``server_replay_extra`` other than
    ``forward``: mitmproxy's server replay kills it (or answers it with the status), as it does any
    request it holds no recording for, and none can answer an upgrade (an addon cannot make the
    ``101``: relay/websocket.py). The socket is the gateway's own (its turns are answered from
    the recordings, or get the extra as an ``error`` message: ``_replay``). So this addon, added
    at the end of the addon chain at ``running`` (after mitmproxy's ``ServerPlayback``), takes
    that verdict off an upgrade this gateway serves, and the upgrade goes on to the relay; and
    ``SocketMisses`` keeps mitmproxy's warning about it out of the log."""

    name = "resp2chat_websocket_keep_upgrades"

    def __init__(self, sockets: ResponsesWebSocket) -> None:
        self.sockets = sockets
        logging.getLogger().addFilter(SocketMisses(sockets))  # (mitmproxy logs it on the root logger)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.id not in self.sockets.live or flow.websocket is not None:
            return
        if flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE:  # (Flow.kill, undone)
            flow.error, flow.live = None, True
        if flow.is_replay == "response":
            flow.response, flow.is_replay = None, None


class SocketMisses(logging.Filter):
    """Drops mitmproxy's "server_playback: killed (or returned N) non-replay request" for an upgrade
    on its way to the relay (``KeepUpgrades`` lets it through): the relay's address is ours alone."""

    def __init__(self, sockets: ResponsesWebSocket) -> None:
        super().__init__()
        self.sockets = sockets

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith("server_playback: ") \
                or "non-replay request" not in record.msg:
            return True
        port = self.sockets.relay.port
        url = record.msg.rsplit(" ", 1)[-1]
        return not (port and url.startswith(f"http://127.0.0.1:{port}/")
                    and url.split("?", 1)[0].endswith(RESPONSES_PATHS))
