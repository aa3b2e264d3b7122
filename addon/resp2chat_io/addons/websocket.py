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
- the flow (the upgrade) records every turn in ``flow.metadata["resp2chat"]["turns"]``: the
  message, the chat request, the backend's stream and the events sent; ``flow.comment`` sums
  the socket up; finished turns go to ``Turns.finished`` listeners and the request log.

Owns ``responses_websocket``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from mitmproxy import ctx, http
from mitmproxy.utils import human

from resp2chat_core import websocket as ws
from resp2chat_core.channel import Reader, record_events, scrub
from resp2chat_core.compaction import TRIGGER
from resp2chat_core.errors import GatewayError, error_json
from resp2chat_core.replay import MAX_ENTRY_BYTES
from resp2chat_core.usage import usage_note
from resp2chat_io.relay import Socket
from resp2chat_io.relay.exchange import run
from resp2chat_io.relay.upstream import failure

from .base import META, Owner, fails_closed, show_url
from .raw import RawPrinter
from .turns import RESPONSES_PATHS, Finished, new_response_id

log = logging.getLogger("resp2chat")

JSON_HEADERS = {"content-type": "application/json"}
HANDSHAKE = ("upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
             "sec-websocket-protocol", "content-length", "transfer-encoding", "host")
RECORD_BUDGET = 64 << 20  # turn records kept on one socket's flow; later turns are noted without their bodies
MAX_SENT = 1 << 16  # messages of one turn kept for its record
QUIET_SOCKETS = "!~websocket"  # mitmdump's dumper_filter unless one is set


@dataclass(eq=False)
class Live:
    """One open socket."""

    flow: http.HTTPFlow
    url: str  # what the client asked for (the flow shows it again once the 101 is in)
    upstream_url: str  # the (first) backend's chat completions URL
    headers: list[tuple[bytes, bytes]]  # sent to the backend with each turn (Codex's headers; no credentials)
    client_auth: str | None = None  # the client's Authorization (forward_client_auth; an upstream's key wins)
    conn: ws.Connection = field(default_factory=ws.Connection)
    turns: int = 0
    recorded: int = 0  # bytes of turn records in the flow's metadata
    current: tuple | None = None  # the turn in flight: (_finish's arguments)


@fails_closed
class ResponsesWebSocket(Owner):
    name = "resp2chat_websocket"
    owner = "websocket"
    also_reads = ("max_request_body_mb",)  # a message is a request: the same limit

    def __init__(self, source, upstreams, turns, store, request_log=None, server_replay=None) -> None:
        super().__init__(source)
        self.upstreams, self.relay, self.turns, self.store = upstreams, upstreams.relay, turns, store
        self.request_log, self.server_replay = request_log, server_replay
        self.live: dict[str, Live] = {}

    # --- the upgrade -------------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        # mitmdump prints a line for every WebSocket message: hundreds a turn. Unless told
        # otherwise, it leaves sockets out, and this addon logs one line per turn instead.
        if "dumper_filter" in updated and "dumper_filter" in ctx.options and ctx.options.dumper_filter is None:
            ctx.options.update(dumper_filter=QUIET_SOCKETS)

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
        else:
            self.open(flow)

    @staticmethod
    def refuse(flow: http.HTTPFlow, status: int, message: str, code: str, **headers: str) -> None:
        flow.response = http.Response.make(status, error_json(message, code=code), {**JSON_HEADERS, **headers})

    def open(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        live = Live(flow, req.url, self.upstreams.target(flow).url + "/chat/completions", self.upstream_headers(flow),
                    client_auth=req.headers.get("authorization"))
        sock = Socket(flow.id, secrets.token_urlsafe(24), lambda text, send: self.message(live, text, send))
        meta = flow.metadata.setdefault(META, {})
        meta.update(transport="websocket", upstream=live.upstream_url, turns=[])
        self.live[flow.id] = live  # (websocket_end or error forgets it)
        for name, value in self.relay.expect(sock):
            req.headers[name] = value
        req.scheme, (req.host, req.port) = "http", self.relay.address

    @staticmethod
    def upstream_headers(flow: http.HTTPFlow) -> list[tuple[bytes, bytes]]:
        """What each turn sends the backend besides its body and its upstream's credentials
        (``Turns.plan``): the client's headers (Codex's session headers…), as on the HTTP path."""
        headers = flow.request.headers.copy()
        for name in (*HANDSHAKE, "authorization", "x-api-key"):
            headers.pop(name, None)
        headers["content-type"] = "application/json"
        headers["accept"] = "text/event-stream"
        headers["accept-encoding"] = "identity"  # the translator reads raw bytes
        return [(name.lower(), value) for name, value in headers.fields]

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

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        try:
            self._end(flow)
        except Exception as exc:  # noqa: BLE001 — recording must not break mitmproxy's hook chain
            log.warning(f"resp2chat: recording the WebSocket failed: {type(exc).__name__}: {exc}", exc_info=exc)

    def _end(self, flow: http.HTTPFlow) -> None:
        live = self.live.pop(flow.id, None)
        if live is not None:
            self.relay.forget(flow.id)
            self._show_client_url(flow, live)
            if live.current is not None:  # the client left mid-turn: record it before the flow is saved
                current, live.current = live.current, None
                self._finish(live, *current)

    @staticmethod
    def _show_client_url(flow: http.HTTPFlow, live: Live) -> None:
        """The flow shows what the client asked for, not the relay, and no relay headers."""
        show_url(flow, live.url)

    # --- the messages ------------------------------------------------------------------------

    async def message(self, live: Live, text: str, send) -> None:
        """One client message (the relay calls this in order, one at a time). Fails closed: a bug
        of ours still ends the message with an ``error`` message, and the socket goes on."""
        try:
            await self._message(live, text, send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning(f"resp2chat: a websocket message failed: {type(exc).__name__}: {exc}", exc_info=exc)
            live.current = None
            send([ws.server_error("the gateway failed to handle this message")])

    async def _message(self, live: Live, text: str, send) -> None:
        try:
            if len(text) > self.s["max_request_body_mb"] << 20:  # (characters: at most 4 bytes each)
                raise GatewayError(f"message larger than max_request_body_mb ({self.s['max_request_body_mb']} MiB)",
                                   code="request_too_large", status=413)
            create = ws.read_message(text)
            if create is None:
                return  # response.processed: nothing to say
            response_id, created_at = new_response_id(), int(time.time())
            conversation = live.conn.conversation(create, self.store.history)
            turn = self.turns.parse(create.body, response_id, created_at, live.conn.lookup(self.store.history))
        except GatewayError as err:
            send([ws.error_message(err)])
            self._record(live, {"responses_request": text, "status": "rejected", "error": err.body()["error"]})
            return
        live.turns += 1
        reader = Reader(turn.translator(), MAX_ENTRY_BYTES, self.turns.secrets)
        if ctx.options.resp2chat_raw:
            reader.translator.observer = RawPrinter()
        coalesce, sent = ws.Coalescer(), []

        def out(sse: bytes) -> None:
            """A channel item's events as messages (deltas of one read merged: ws.Coalescer)."""
            messages = coalesce(sse)
            if len(sent) < MAX_SENT:
                sent.extend(messages)
            send([message for _, message in messages])

        if self.server_replay is not None and self.server_replay.active \
                and self._replay(live, text, turn, conversation, send, create.warmup):
            return  # answered from a recording (--server-replay)
        if create.warmup:
            out(reader.apply(ws.Warmup()))
            live.conn.remember(response_id, conversation or [])
            self._finish(live, text, turn, reader, sent, warmup=True)
            return
        plan = self.turns.plan(turn, live.flow, live.client_auth)  # the same routing as over HTTP
        exchange = self.turns.exchange(f"{live.flow.id}:{live.turns}", turn, plan, secret="")
        exchange.channel.push = lambda item: out(reader.apply(item))
        headers = list(live.headers)
        if plan.authorization:
            headers.append((b"authorization", plan.authorization.encode()))
        if plan.affinity:
            headers.append((plan.affinity[0].lower().encode(), plan.affinity[1].encode()))
        if self.request_log is not None:
            self.request_log.write(live.flow, turn, exchange.target.url)
        live.current = (text, turn, reader, sent)
        try:
            await run(exchange, self.relay.client, headers, turn.chat_body)
        except asyncio.CancelledError:  # the socket closed: the backend call is dropped with it
            if live.current is not None:  # (not recorded yet by websocket_end)
                live.current = None
                self._finish(live, text, turn, reader, sent)
            raise
        except Exception as exc:  # noqa: BLE001 — a bug of ours: the turn still ends clearly
            log.warning(f"resp2chat: websocket turn failed: {type(exc).__name__}: {exc}", exc_info=exc)
            out(reader.apply(failure(502, "the gateway's relay failed", "server_error")))
        live.current = None
        out(reader.finish())
        t = reader.translator
        if t.done and t.response()["status"] == "completed" and conversation is not None:
            if conversation and isinstance(conversation[-1], dict) and conversation[-1].get("type") == TRIGGER:
                conversation = conversation[:-1]
            live.conn.remember(response_id, conversation + t.output)
        self._finish(live, text, turn, reader, sent)

    def _replay(self, live: Live, text: str, turn, conversation: list | None, send, warmup: bool = False) -> bool:
        """Offline replay (``--server-replay``): the recorded events of the same turn (or
        warm-up), if any. False: none, and the turn (or warm-up) is served as usual."""
        recorded = self.server_replay.events(turn.chat_body, warmup)
        if recorded is None:
            extra = ctx.options.server_replay_extra
            if extra != "forward" and not warmup:  # as mitmproxy's server replay does for an unmatched request
                status = int(extra) if extra.isdigit() else 502
                send([ws.error_message(GatewayError("no recorded answer for this request (server replay)",
                                                    code="not_recorded", status=status, type="server_error"))])
                self._record(live, {"responses_request": text, "status": "rejected", "server_replay": "not recorded"})
                return True
            return False
        send(ws.messages(recorded))
        final = ws.final_response(recorded) or {}
        if final.get("status") == "completed" and conversation is not None:
            live.conn.remember(final["id"], conversation + final.get("output", []))
        self._record(live, {"responses_request": text, "chat_request": turn.chat_body.decode("utf-8", "replace"),
                            "response_id": final.get("id"), "status": final.get("status", "unfinished"),
                            "usage": final.get("usage"), "warmup": warmup, "server_replay": True,
                            "events": recorded.decode("utf-8", "replace")})
        return True

    def _finish(self, live: Live, text: str, turn, reader: Reader, sent: list, warmup: bool = False) -> None:
        """Record a turn on the flow and tell the listeners (the response store…)."""
        t = reader.translator
        final = t.response() if t.done else None
        status = final["status"] if final else "unfinished"
        record = {"responses_request": text, "response_id": turn.ctx.response_id, "created_at": turn.ctx.created_at,
                  "status": status, "usage": t.usage, "warmup": warmup}
        record["chat_request"] = turn.chat_body.decode("utf-8", "replace")  # (a warm-up's: what replay matches)
        if not warmup:
            record["upstream_sse"] = scrub(bytes(reader.upstream), self.turns.secrets).decode("utf-8", "replace")
            record["gateway_events"] = record_events(reader.gateway, self.turns.secrets)
            record.update(self.turns.recorded_lowering(turn.ctx.model))
        answer = ws.as_sse(sent)  # what the client got (deltas merged as they were sent)
        record["events"] = answer.decode("utf-8", "replace")
        self._record(live, record)
        if not warmup:
            self.turns.notify(Finished(live.flow, turn, status, final, answer, t.usage))

    def _record(self, live: Live, record: dict) -> None:
        flow = live.flow
        size = sum(len(v) for v in record.values() if isinstance(v, str))
        if live.recorded + size > RECORD_BUDGET:
            record = {k: v for k, v in record.items() if k not in ("responses_request", "chat_request",
                                                                    "upstream_sse", "events")}
            record["truncated"] = True
        else:
            live.recorded += size
        turns = flow.metadata[META]["turns"]
        turns.append(record)
        if not record.get("warmup"):  # mitmdump's own output shows sockets quietly (QUIET_SOCKETS): one line a turn
            u = record.get("usage")
            log.info(f"{human.format_address(flow.client_conn.peername)}: WebSocket /v1/responses message "
                     f"{len(turns)} · {record['status']}"
                     + (f" ({record['error'].get('code')})" if record.get("error") else "")
                     + usage_note(u)
                     + (" · server replay" if record.get("server_replay") else ""))
        counts: dict[str, int] = {}
        for r in turns:
            kind = "warm-up" if r.get("warmup") else r["status"]
            counts[kind] = counts.get(kind, 0) + 1
        last = next((r for r in reversed(turns) if r.get("usage")), None)
        u = last["usage"] if last else None
        flow.comment = (
            f"WebSocket /v1/responses · {len(turns)} message{'s' if len(turns) != 1 else ''} ("
            + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"
            + usage_note(u, " · last: ")
        )
