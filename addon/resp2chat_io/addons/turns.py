"""Turns: one turn's way from a request to its recorded end, whichever transport carries it.

Both transports drive the same steps, in this order (docs/architecture.md has the picture):

- ``decode`` / ``check``: a request body (or a WebSocket message) read as strict JSON, a large
  one off the event loop (offload.py), then the caps (``max_input_items``…) before anything
  walks its items;
- ``lookup``: the one asynchronous lookup of what the request refers to (a WebSocket's memory
  first, then the response store: addons/store.py), owner-scoped;
- ``lower``: the request made whole and lowered (resp2chat_core/turn.py ``begin_turn``, pure);
- ``start``: a ``TurnRun`` — the turn, its ``Exchange`` (its upstream ``Candidate``\\s, the
  headers every one of them gets), the ``Reader`` that translates for the client, its timings;
  the ``started`` listeners hear of it (the request log, ``--raw`` output: one that fails,
  fails the turn, before anything went upstream); this is the one place that counts the turns
  in flight (``in_flight``), so it is here that the turns of a key revoked meanwhile stop
  (``clients_changed``: both transports and background responses alike);
- the transport runs it: HTTP through the relay (addons/http.py), a socket's turn awaited
  directly (addons/websocket.py); a turn that names a conversation writes it at the end of that
  run, before its client can see its end (``land``);
- ``settle``: its end as one record (``Finished``, and what the flow keeps); ``ended`` tells the
  ``finished`` listeners (the response store, the replay cache, outcomes -> metrics and the
  access log, the request log's fallbacks).

Owns the lowering settings (model names, params, tool denylist, think tags…) and reads the caps
and ``max_upstream_event_mb``; what a turn scrubs from what it answers and records is
``Upstreams.secrets_for`` (every configured secret, and a credential the request forwards).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from mitmproxy import ctx, exceptions, http

from resp2chat_core import settings as S
from resp2chat_core.channel import Reader, Stopped, record_events, scrub
from resp2chat_core.clients import REVOKED, STOPPED, ClientSpec, allows_model, not_allowed
from resp2chat_core.conversations import Landing, named, unique
from resp2chat_core.errors import GatewayError, gateway_failure, specific_code
from resp2chat_core.labels import shown
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.usage import call_tokens, summed
from resp2chat_core.replay import MAX_ENTRY_BYTES, replay_key
from resp2chat_core.requestbody import body_digest
from resp2chat_core.response import CONTINUABLE
from resp2chat_core.retranslate import lowering_record
from resp2chat_core.routing import Candidate, candidates
from resp2chat_core.seal import Sealer
from resp2chat_core.toolloop import Work
from resp2chat_core.turn import Caps, Found, ToolsCache, Turn, begin_turn, check_caps, conversation, wanted
from resp2chat_io import keys, offload
from resp2chat_io.relay import Exchange
from resp2chat_io.store import StateUnavailable

from .base import Owner, log, store_unavailable

SERVER_REPLAY = "server-replay"  # the upstream of a turn answered from a recording (Finished.upstream)
NOT_RECORDED = "not_recorded"  # the code of a turn offline replay had no recording for
UNRECORDED = "not recorded"  # its flow's meta["server_replay"] (else: where its recorded answer came from)


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


@dataclass(eq=False)
class TurnRun:
    """One turn from ``Turns.start`` to ``Turns.ended``, over HTTP or a WebSocket alike."""

    turn: Turn
    exchange: Exchange  # its upstream work: the candidates, the channel, which one answered
    reader: Reader  # the channel's items translated for the client (what both sides said, kept)
    flow: http.HTTPFlow  # the HTTP turn's own flow, or the WebSocket's upgrade flow
    started: float  # time.monotonic() when its request arrived
    client: ClientSpec | None = None  # who called (clients; None: the gateway takes no keys)
    limits: tuple[tuple[str, str], ...] = ()  # the client's rate-limit headers when it was admitted
    first: float | None = None  # time.monotonic() when the first event made from backend data left
    secrets: tuple[bytes, ...] = ()  # scrubbed from what it answers, logs and records (Turns.start)
    landed: bool = False  # its conversation's write was made before its end (Turns.land)

    @property
    def request_id(self) -> str:
        return self.turn.ctx.request_id

    @property
    def answering(self) -> Candidate:
        """The upstream that answered (or failed last)."""
        return self.exchange.answering


@dataclass(kw_only=True)
class Finished:
    """A turn that ended, as the ``finished`` listeners hear of it."""

    flow: http.HTTPFlow
    turn: Turn
    status: str  # completed | incomplete | failed | unfinished
    response: dict | Callable[[], dict] | None  # the final Response object, or what makes it (``final``)
    answer: bytes  # what the client got (SSE, or the JSON body)
    usage: dict | None = None
    upstream: str = ""  # the name of the upstream that answered (or failed last): "default" with one
    ttft: float | None = None  # seconds from the request to the first backend-made event
    took: float = 0.0  # seconds from the request to the end of the turn
    latency: float | None = None  # seconds from the request to its chat request handed to a backend (None: none was)
    skipped: tuple = ()  # (name, status) of upstreams that failed before it and were fallen back from
    code: str = ""  # the error code when the client's answer is not the translator's (server_error:
    # the turn failed closed; NOT_RECORDED: offline replay had no answer), or a replayed answer's
    exchange: Exchange | None = None  # its upstream work: the candidates, which answered
    client: ClientSpec | None = None  # who called
    turn_id: str = ""  # its id in Turns.in_flight (and the client's open turns: addons/limits.py)
    # backend tokens it spent by usage.estimate (its chat request, the output the backend sent),
    # for a turn that reached a backend and did not fail before any output: what tpm takes when
    # the backend's usage never came (the client left before the last chunk, a cancellation, a
    # backend that dropped or stalled midway); 0 otherwise (a backend that refused the request
    # spent nothing)
    estimate: int = 0
    # a turn the gateway's tool loop ran (web search, hosted MCP): what all of its rounds made the
    # backend do (resp2chat_core/toolloop.py ``Work``: the tokens tpm spends, the backend's own
    # usages summed), where ``usage`` is the turn's as its client reads it; None: one backend call
    work: Work | None = None
    landed: bool = False  # its conversation has its items already (Turns.land), or is being given them

    @functools.cached_property
    def final(self) -> dict | None:
        """The final Response object, made when first read (the translator's: its JSON with the
        request's echo, decoded; ~0.2 ms a Codex turn that most turns' listeners never read)."""
        return self.response() if callable(self.response) else self.response


class Turns(Owner):
    name = "resp2chat_turns"
    owner = "lowering"
    # brave_api_key: a web_search tool is the gateway's; upstreams: each one's lowering; the caps:
    # checked before a request is validated; max_upstream_event_mb: bounds each turn's reading of
    # the backend's stream. (The secrets a turn scrubs: Upstreams.secrets_for, their one source.)
    also_reads = ("brave_api_key", "upstreams", *Caps.SETTINGS, "max_upstream_event_mb")

    def __init__(self, source, upstreams, search, store, limits, hosted=None) -> None:
        super().__init__(source)
        self.upstreams, self.search, self.store, self.limits, self.hosted = upstreams, search, store, limits, hosted
        self.in_flight: dict[str, TurnRun] = {}  # the turns in flight, both transports, by turn id
        # is the key a turn was let in with still accepted? (Gate.accepts, wired by addons.build; None: always)
        self.accepts: Callable[[ClientSpec | None], bool] | None = None
        self.started: list[Callable[[TurnRun], None]] = []
        self.finished: list[Callable[[Finished], None]] = []
        self.lowering = LoweringOptions()
        self.lowering_repr = repr(self.lowering)  # part of the replay cache key
        self.lowering_record = lowering_record(self.lowering)  # in each flow: `resp2chat retranslate` reads it
        self.lowering_records: dict[str, dict] = {}  # the same, by upstream (several upstreams)
        self.tools_cache = ToolsCache()
        self.caps = Caps()
        self.max_event = S.BY_NAME["max_upstream_event_mb"].default << 20  # bytes
        self.specs: tuple[S.UpstreamSpec, ...] = ()  # several upstreams (routing.py)
        self.lowering_by_upstream: dict[str, LoweringOptions] = {}
        self._seal_key: bytes | None = None
        self._seal_id: str | None = None
        self.sealer = Sealer(self.seal_key)

    def apply(self, updated: set[str]) -> None:
        web_search = bool(self.s["brave_api_key"])
        self.lowering = LoweringOptions.from_settings(self.s, web_search=web_search)
        self.specs = S.parse_upstreams(self.s["upstreams"])
        self.lowering_by_upstream = {s.name: LoweringOptions.from_settings(s.settings(self.s), web_search=web_search)
                                     for s in self.specs}
        self.lowering_repr = repr(self.lowering) + "".join(
            f"\n{name}: {opts!r}" for name, opts in self.lowering_by_upstream.items())
        self.lowering_record = lowering_record(self.lowering)
        self.lowering_records = {name: lowering_record(opts) for name, opts in self.lowering_by_upstream.items()}
        self.caps = Caps.from_settings(self.s)
        self.max_event = self.s["max_upstream_event_mb"] << 20
        if self._seal_key is not None and S.BY_NAME["seal_key"].option not in updated:
            return  # (the key in use stays: another setting changed)
        self._seal_key = self._seal_id = None
        if not ctx.options.server:
            return  # (reading flows, serving none: `mitmdump -n -r`; no key made until a turn needs one)
        try:  # now, not at the first turn: a key it cannot make stops the start, saying why
            self.seal_key()
        except (OSError, keys.KeyFileError) as exc:
            why = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
            raise exceptions.OptionsError(
                f"resp2chat: seal_key is not set and the gateway's own seal key ({keys.key_path()}) cannot be "
                f"made or read: {why}. Set seal_key (a long random secret, the same on every replica), or let "
                f"this user write {keys.key_path().parent}") from None

    def seal_key(self) -> bytes:
        """The key for resp2chat_core/seal.py (when ``seal_key`` is unset, the install's: made at
        the start of a gateway that serves, ``apply``; by a flow reader's first turn)."""
        if self._seal_key is None:
            self._seal_key = keys.seal_key(self.s["seal_key"])
        return self._seal_key

    def seal_id(self) -> str:
        """Which seal key this gateway seals with, as a one-way fingerprint (not the key): part of
        the replay cache's key, since an answer holds what it sealed (encrypted_content) and only
        that key opens it again."""
        if self._seal_id is None:
            self._seal_id = hashlib.sha256(b"resp2chat seal key id\n" + self.seal_key()).hexdigest()[:16]
        return self._seal_id

    def replay_key(self, upstreams: str, body: bytes, owner: str) -> str:
        """The replay cache's key of a request body: the same request with other settings,
        other upstreams or another seal key (an answer holds what it sealed: after a key change,
        or on a replica with another key, the client could not send it back), or from another
        owner, is another answer."""
        return replay_key(f"{upstreams}\n{self.lowering_repr}\nseal {self.seal_id()}", body_digest(body), owner)

    # --- a request, up to its turn ------------------------------------------------------------

    @staticmethod
    async def decode(body: bytes) -> object:
        """A request body (or a WebSocket message) as its JSON value, strictly (requestbody.py:
        ``GatewayError`` 400 with the byte offset); a large one decoded off the event loop."""
        return await offload.loads(body)

    async def admit(self, client: ClientSpec | None, turn_id: str):
        """A turn's first step, before its body is even read: within its client's limits
        (addons/limits.py)? ``None``: the client has none; else a ``Verdict`` (a refused one:
        ``verdict.error``, 429; an admitted one is released when the turn ends, ``ended``, or
        by ``release`` if it never becomes one)."""
        return await self.limits.admit(client, turn_id)

    def release(self, client: ClientSpec | None, turn_id: str) -> None:
        """An admitted request that did not become a turn (refused, answered from the cache)."""
        self.limits.release(client, turn_id)

    def check(self, raw: object, client: ClientSpec | None = None) -> dict:
        """A decoded request as the request object, within the caps (``GatewayError`` otherwise),
        before anything walks its items; a model the client may not use is one that does not
        exist (404 ``model_not_found``)."""
        if not isinstance(raw, dict):
            raise GatewayError("request body must be a JSON object", code="invalid_json")
        check_caps(raw, self.caps)
        model = raw.get("model")
        if client is not None and isinstance(model, str) and not allows_model(client, model):
            raise not_allowed(model)
        return raw

    async def lookup(self, raw: dict, owner: str, memory=None) -> Found:
        """What the request refers to (its previous response or the conversation it names, item
        references), ``owner``'s: a WebSocket's ``memory`` first, then the response store.
        ``GatewayError`` 503 when the store cannot be reached."""
        previous, refs = wanted(raw)
        if previous is None and not refs:
            return Found()
        kind = "conversation" if named(raw) is not None else "response"
        return await self.store.lookup(previous, refs, owner=owner, memory=memory, kind=kind)

    def lower(self, raw: dict, found: Found, *, owner: str, request_id: str, keep_items: bool = False) -> Turn:
        """The turn of a checked request (``GatewayError`` for one the gateway cannot serve):
        made whole with what ``lookup`` found, validated and lowered for each of its upstreams."""
        turn = begin_turn(raw, self.lowering, new_response_id(), int(time.time()), found,
                          tools_cache=self.tools_cache, sealer=self.sealer,
                          route=self.route if self.specs else None, keep_items=keep_items,
                          mcp_servers=self.hosted.specs if self.hosted is not None else ())
        turn.owner, turn.ctx.request_id = owner, request_id  # (the request id: named in the failures the client sees)
        turn.ctx.clock = time.time  # (completed_at: the core reads no clock)
        return turn

    def conversation(self, raw: dict, found: Found) -> tuple[list, bool]:
        """A request's whole conversation as a stored response keeps it, without lowering it (a
        replay-cache hit stores its answer after it), and whether it is a compaction request
        (Codex's ``compaction_trigger``): ``GatewayError`` like ``lower``."""
        _, items, summarize = conversation(raw, found, self.sealer)
        return items or [], summarize

    def route(self, model: str) -> list[LoweringOptions]:
        """Several upstreams: the lowering options of each one serving ``model``, in order."""
        return [self.lowering_by_upstream[s.name] for s in candidates(self.specs, model)]

    def recorded_lowering(self, model: str) -> dict:
        """The lowering options a turn for ``model`` ran with, for its record (``resp2chat
        retranslate`` lowers it again with them): its first upstream's (``lowering``) and, with
        fallbacks, theirs in order (``lowering_fallbacks``)."""
        try:
            names = [s.name for s in candidates(self.specs, model)] if self.specs else []
        except GatewayError:
            names = []
        if not names:
            return {"lowering": self.lowering_record}
        found = {"lowering": self.lowering_records[names[0]]}
        if len(names) > 1:
            found["lowering_fallbacks"] = [self.lowering_records[n] for n in names[1:]]
        return found

    # --- a turn, from its start to its end ----------------------------------------------------

    def start(self, turn: Turn, flow: http.HTTPFlow, *, turn_id: str, started: float, client_headers,
              secret: str | None = None, client: ClientSpec | None = None, limits: tuple = ()) -> TurnRun:
        """The turn in flight: its exchange (the candidates that serve its model, in order, and
        the headers each gets besides its own: the client's headers, the routing key), its
        reader, its timings. ``client_headers``: the request's (HTTP) or the upgrade's (a
        WebSocket). ``secret``: the exchange's, for the relay (None: a fresh one)."""
        exchange = Exchange(turn_id, secrets.token_urlsafe(24) if secret is None else secret,
                            self.upstreams.candidates(turn, flow, client_headers.get("authorization")),
                            self.upstreams.headers_for(turn, client_headers),
                            search=self.search.settings if turn.web_search else None,
                            mcp=turn.mcp, max_mcp_rounds=self.hosted.max_rounds if turn.mcp is not None else 0,
                            max_tool_calls=turn.max_tool_calls, model=turn.ctx.model, max_event=self.max_event,
                            compaction=turn.server_compaction)
        # the configured secrets, and the client's credential when it goes to the backend (a
        # backend may repeat it: upstreams.forwarded)
        hidden = self.upstreams.secrets_for(client_headers)
        # (its end held until it is in the conversation; a background one's, until it is stored: background.py)
        reader = Reader if turn.conversation is None and not turn.background else Landing
        run = TurnRun(turn, exchange, reader(turn.translator(self.max_event), MAX_ENTRY_BYTES, hidden,
                                             exchange.channel), flow, started, client, limits, secrets=hidden)
        if turn.conversation is not None:
            exchange.ending = lambda: self.land(run)
        run.reader.on_first = lambda: setattr(run, "first", time.monotonic())
        for listener in self.started:  # (one that fails fails the turn: nothing unrecorded goes upstream)
            listener(run)
        self.in_flight[turn_id] = run
        if self.accepts is not None and not self.accepts(client):
            # its key was checked before the steps that wait (its limits in Redis, the lookup, a large
            # body's decoding, a background response's queueing): a reload meanwhile found it nowhere
            # in flight (``clients_changed``). It stops now, as it would have then; it calls no backend.
            self._stop(run)
        return run

    def clients_changed(self, accepts: Callable[[ClientSpec | None], bool]) -> None:
        """The clients were reloaded (addons/gate.py; ``accepts``: is the key a turn was let in
        with still accepted?). Every turn in flight whose key is not — revoked, given to its name
        anew, or none once the gateway takes keys — stops now (``Exchange.halt``): its backend
        call is closed, its tool loop runs no further round or step, and it fails with
        ``invalid_api_key``, what it was writing closed ``incomplete`` as any failure closes it.
        Its transport ends it as usual: an HTTP stream with that ``response.failed``, a JSON
        answer with a 401, a WebSocket turn likewise (then the socket is closed: its own
        listener, ResponsesWebSocket.clients_changed), a background response stored ``failed``.
        Every replica reading the file stops its own."""
        for run in list(self.in_flight.values()):
            if not accepts(run.client):
                self._stop(run)

    @staticmethod
    def _stop(run: TurnRun) -> None:
        """Stop a turn whose key is no longer accepted (``clients_changed``)."""
        if run.exchange.halt(Stopped(REVOKED, STOPPED)):
            who = f"client {run.client.name!r}" if run.client is not None else "a request without a key"
            log.info(f"resp2chat: {run.request_id} of {who} stopped: its key is no longer accepted")

    def settle(self, run: TurnRun, answer: bytes, failed_in: str | None = None) -> tuple[Finished, dict]:
        """A turn that ended: the ``Finished`` its listeners get (``ended``) and its record (what
        the flow keeps of it: the backend's stream and the gateway's own events for ``resp2chat
        retranslate``, status, usage, error, fallbacks). A failure goes to the log with the
        turn's request id and its detail (the upstream's own words, or our exception), which the
        client never sees. ``answer``: what the client got. ``failed_in``: the hook that failed
        closed (the client's answer is its 500, whatever the backend said)."""
        turn, reader, ex = run.turn, run.reader, run.exchange
        t = reader.translator
        final = t.response if t.done and failed_in is None else None
        status = "failed" if failed_in is not None else t.status if final else "unfinished"
        code = "server_error" if failed_in is not None else ""
        record = {"upstream_sse": scrub(reader.upstream, run.secrets).decode("utf-8", "replace"),
                  "created_at": turn.ctx.created_at, **self.recorded_lowering(turn.ctx.model),
                  "gateway_events": record_events(reader.gateway, run.secrets), "status": status}
        if failed_in is not None:
            record["error"] = {"code": code, "message": "the gateway failed to handle this request",
                               "detail": f"failed closed in {failed_in}"}
        elif t.error:
            # the failure as the operator sees it: the upstream's own words, or our exception
            detail = scrub((t.error_detail or t.error["message"]).encode(), run.secrets).decode()
            message = scrub(t.error["message"].encode(), run.secrets).decode()  # (what the client got: scrubbed too)
            record["error"] = {**t.error, "message": message, "detail": detail}
            log.warning(f"resp2chat: {run.request_id} failed ({specific_code(t.error)}): {detail}")
        record["usage"] = t.usage
        if ex.skipped:
            record["fallbacks"] = [{"upstream": n, "status": st} for n, st in ex.skipped]
        done = Finished(flow=run.flow, turn=turn, status=status, response=final, answer=answer, usage=t.usage,
                        upstream=run.answering.name, ttft=None if run.first is None else run.first - run.started,
                        took=time.monotonic() - run.started, skipped=tuple(ex.skipped), code=code, exchange=ex,
                        latency=None if ex.channel.sent is None else ex.channel.sent - run.started,
                        client=run.client, turn_id=ex.turn_id, landed=run.landed,
                        estimate=0 if ex.channel.sent is None else
                        call_tokens(None, len(turn.chat_body), t.output_chars, t.error is not None),
                        work=_work(ex, t, turn) if ex.channel.sent is not None else Work(0, None))
        return done, record

    async def land(self, run: TurnRun) -> None:
        """A turn that names a conversation, its backend's stream over (the exchange's ``ending``:
        relay/exchange.py ``run``, before the relay's body ends or a socket's turn goes on): its
        reader (``conversations.Landing``) holds its end; a completed (or incomplete) turn's input
        and output are written to the conversation now, in one write (``StoredResponses.append``),
        so the client hears of its end only once they are there, and whoever it tells (another replica, a
        ``GET`` of the items) reads them. A write that fails (the store down, the conversation
        gone, too large, changed too often) ends the turn ``failed`` with the write's error
        instead: a completed response with a conversation is in it (OpenAI's). Never raises but
        for a cancellation (the client went away), which leaves the write running."""
        reader, turn = run.reader, run.turn
        try:
            reader.complete(run.exchange.channel.take())  # (what a stream callable has not taken yet)
            t = reader.translator
            if t.error is not None or t.response()["status"] not in CONTINUABLE:
                return  # (a failed turn adds nothing; an incomplete one is the client's to go on from)
            own = turn.items[turn.continued:]
            added = own + t.output
            # (its input's ids were checked against the conversation as the turn began: turn.py; a
            # turn that ran meanwhile may have given one of them, and then this one does not land)
            check = functools.partial(_unique_input, len(own)) if any(
                isinstance(i, dict) and i.get("id") for i in own) else None
            write = asyncio.ensure_future(self.store.append(turn.conversation, added, turn.owner, check=check))
            write.add_done_callback(_retrieve)
            run.landed = True
            await asyncio.shield(write)  # (cancelled: the client left, the write still lands)
        except asyncio.CancelledError:
            raise
        except StateUnavailable:
            err = store_unavailable(f"conversation {shown(turn.conversation)!r}")
        except GatewayError as exc:
            err = exc
        except Exception as exc:  # noqa: BLE001 — a bug of ours: the turn still ends clearly
            log.warning(f"resp2chat: writing the conversation of {run.request_id} failed: {type(exc).__name__}: "
                        f"{exc}", exc_info=exc)
            err = GatewayError(gateway_failure("add this response to its conversation", run.request_id),
                               code="server_error", status=500, type="server_error")
        else:
            return
        reader.unland(err.code or "server_error", f"this response was not added to its conversation: {err.message}")

    def replayed(self, flow: http.HTTPFlow, turn: Turn, final: dict | None, answer: bytes, *, recorded: bool,
                 started: float, client: ClientSpec | None, turn_id: str) -> Finished:
        """A turn answered by offline replay (``--server-replay``), over either transport:
        ``recorded`` says whether anything was recorded for it (False: ``not_recorded``), ``final``
        is the recorded final Response (None also when the recording ended before one: its client
        hung up mid-stream, and the turn is ``unfinished``). Its listeners hear of it as of any
        turn (``ended``): its client's open turn is released, the store keeps a completed answer,
        metrics and the access log count a recorded one ``replayed``."""
        status = final.get("status", "unfinished") if final else "unfinished" if recorded else "failed"
        code = "" if recorded else NOT_RECORDED
        if final and (final.get("error") or final.get("incomplete_details")):
            code = specific_code(final.get("error") or {}) or (final.get("incomplete_details") or {}).get("reason") or ""
        done = Finished(flow=flow, turn=turn, status=status, response=final, answer=answer,
                        usage=(final or {}).get("usage"), upstream=SERVER_REPLAY, took=time.monotonic() - started,
                        code=code, client=client, turn_id=turn_id)
        self.ended(done, turn_id)
        return done

    def ended(self, done: Finished, turn_id: str | None = None) -> None:
        """A turn is over (``turn_id``: its run leaves ``in_flight``): the ``finished`` listeners
        hear of it. One that fails is logged and the others still hear of the turn (what the
        client got is settled by now)."""
        if turn_id is not None:
            self.in_flight.pop(turn_id, None)
        for listener in self.finished:
            self._tell(listener, done, done.turn.ctx.request_id)

    @staticmethod
    def _tell(listener, what, rid: str) -> None:
        try:
            listener(what)
        except Exception as exc:  # noqa: BLE001
            log.warning(f"resp2chat: recording {rid} failed in {getattr(listener, '__qualname__', listener)}: "
                        f"{type(exc).__name__}: {exc}", exc_info=exc)

    def failed_stream(self, run: TurnRun, exc: BaseException) -> bytes:
        """The gateway's own failure while a turn streams: its one ``response.failed`` (the
        exception goes to the log, never to the client)."""
        log.warning(f"resp2chat: the stream of {run.request_id} failed: {type(exc).__name__}: {exc}", exc_info=exc)
        return run.reader.fail("server_error", gateway_failure("stream this response", run.request_id),
                               f"{type(exc).__name__}: {exc}")


def _work(ex: Exchange, t, turn: Turn) -> Work | None:
    """What a turn's backend did, for ``tpm`` (limits.py) and the metrics (None: its usage says
    it): the tool loop's rounds (``ToolLoop.work``), and a compaction round's besides the
    answer's (compaction.py: the client's usage counts only the summary's output of that round);
    a compaction turn's is its round's alone (its summary calls: the answer is the summary)."""
    extra = ex.compaction_work
    if turn.compaction:
        return extra
    work = ex.loop.work(t.error is not None) if ex.loop is not None else None
    if extra is None:
        return work
    if work is None:  # (the answer round's own: its usage as the backend gave it)
        usage = t.answer_usage
        work = Work(call_tokens(usage, len(ex.answering.body), t.output_chars, t.error is not None), usage)
    return Work(work.tokens + extra.tokens, summed(work.usage, extra.usage))


def _unique_input(n: int, items: list, held: list) -> None:
    """A conversation turn's write: the first ``n`` of ``items`` (its input; its output's ids are
    new) may give no id the conversation holds (``conversations.unique``, as the turn began)."""
    unique(items[:n], held, "input")


def _retrieve(task: asyncio.Task) -> None:
    """A conversation's write that nobody awaits any more (its turn's client left) leaves no
    unretrieved exception behind (asyncio would log it as an ERROR)."""
    if not task.cancelled():
        task.exception()
