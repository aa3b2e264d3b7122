"""Turns: ``POST /v1/responses`` from request to recorded answer.

- ``request``: decode, validate and lower the request (resp2chat_core/turn.py); the flow's
  request becomes the chat request the backend receives (so flow files and server replay see
  it), routed to the configured upstream; an ``Exchange`` is registered with the relay and the
  flow is pointed at the relay with that exchange's name and secret.
- ``responseheaders``: the request has gone out: the flow shows the real upstream URL again.
  A streaming client gets the stream callable (``TurnStream``), which takes the turn's news
  from the exchange's channel at each relay tick and answers with Responses events.
- ``response`` / ``error``: a non-streaming client gets the finished Response as one JSON body
  (or an HTTP error); the turn is recorded (flow metadata, comment) and announced to
  ``finished`` listeners (replay cache, response store).

Owns the lowering settings (model names, params, tool denylist, think tags…).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from mitmproxy import http

from resp2chat_core import routing
from resp2chat_core import settings as S
from resp2chat_core.channel import Reader, record_events, scrub
from resp2chat_core.errors import GatewayError, error_json, gateway_failure
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.replay import MAX_ENTRY_BYTES
from resp2chat_core.retranslate import lowering_record
from resp2chat_core.seal import Sealer
from resp2chat_core.turn import ToolsCache, Turn, begin_turn, session_key
from resp2chat_core.usage import usage_note
from resp2chat_core.websocket import final_response
from resp2chat_io import keys
from resp2chat_io.relay import Exchange, Target
from resp2chat_io.relay.exchange import Fallback

from .base import ABANDON, META, RESPONSES_PATHS, Owner, fails_closed, log, request_id, show_url
from .upstreams import Upstream

SERVER_REPLAY = "server-replay"  # the upstream of a turn answered from a recording (Finished.upstream)
JSON_HEADERS = {"content-type": "application/json"}

# HTTP status for a non-streaming client whose response failed, by error code.
FAILED_STATUS = {
    "context_length_exceeded": 400,
    "invalid_prompt": 400,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
}


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


@dataclass(eq=False)
class Live:
    """A turn between its ``request`` and its ``response``/``error`` hook."""

    turn: Turn
    exchange: Exchange
    reader: Reader
    upstream_url: str  # the backend URL the chat request goes to (what the flow shows)
    client_path: str  # what the client asked for (/v1/responses)
    started: float = 0.0  # time.monotonic() at the request hook
    first: float | None = None  # time.monotonic() when the first backend-made event left


@dataclass(frozen=True)
class Plan:
    """Where one turn goes: ``Turns.plan``."""

    upstream: Upstream  # the first upstream serving the model
    spec: object | None  # its entry in ``upstreams`` (None: the one-upstream setup)
    name: str  # its name ("default" in the one-upstream setup)
    authorization: str | None  # the Authorization header it gets (None: none)
    affinity: tuple[str, str] | None  # the routing-key header (routing_key_header), if any
    fallbacks: tuple  # the later upstreams (relay/exchange.py Fallback)


@dataclass
class Finished:
    """A recorded turn, as ``finished`` listeners get it."""

    flow: http.HTTPFlow
    turn: Turn
    status: str  # completed | incomplete | failed | unfinished
    final: dict | None  # the final Response object
    answer: bytes  # what the client got (SSE, or the JSON body)
    usage: dict | None = None
    upstream: str = ""  # the name of the upstream that answered (or failed last): "default" with one
    ttft: float | None = None  # seconds from the request to the first backend-made event
    took: float = 0.0  # seconds from the request to the end of the turn
    skipped: tuple = ()  # (name, status) of upstreams that failed before it and were fallen back from
    code: str = ""  # the error code when the client's answer is not the translator's (server_error:
    # the turn failed closed; not_recorded: offline replay had no answer), or a replayed answer's
    exchange: Exchange | None = None  # its upstream work: which candidate answered, the fallbacks sent


def settle(flow: http.HTTPFlow, turn: Turn, reader: Reader, answer: bytes, *, upstream: str, started: float,
           first: float | None, skipped: tuple, secrets: tuple[bytes, ...], lowering: dict,
           failed_in: str | None = None, exchange: Exchange | None = None) -> tuple[Finished, dict]:
    """A turn that ended, HTTP or WebSocket alike: the ``Finished`` its listeners get and its
    record (what the flow keeps of it: the backend's stream and the gateway's own events for
    ``resp2chat retranslate``, status, usage, error, fallbacks). A failure goes to the log with
    the turn's request id and its detail (the upstream's own words, or our exception), which the
    client never sees. ``started``/``first``: ``time.monotonic()`` at the request and at the
    first event made from backend data. ``lowering``: ``Turns.recorded_lowering``'s record.
    ``failed_in``: the hook that failed closed (the client's answer is its 500, whatever the
    backend said)."""
    t = reader.translator
    final = t.response() if t.done and failed_in is None else None
    status = "failed" if failed_in is not None else final["status"] if final else "unfinished"
    code = "server_error" if failed_in is not None else ""
    record = {"upstream_sse": scrub(bytes(reader.upstream), secrets).decode("utf-8", "replace"),
              "created_at": turn.ctx.created_at, **lowering,
              "gateway_events": record_events(reader.gateway, secrets), "status": status}
    if failed_in is not None:
        record["error"] = {"code": code, "message": "the gateway failed to handle this request",
                           "detail": f"failed closed in {failed_in}"}
    elif t.error:
        # the failure as the operator sees it: the upstream's own words, or our exception
        detail = scrub((t.error_detail or t.error["message"]).encode(), secrets).decode()
        record["error"] = {**t.error, "detail": detail}
        log.warning(f"resp2chat: {turn.ctx.request_id} failed ({t.error['code']}): {detail}")
    record["usage"] = t.usage
    if skipped:
        record["fallbacks"] = [{"upstream": n, "status": st} for n, st in skipped]
    done = Finished(flow, turn, status, final, answer, t.usage, upstream,
                    None if first is None else first - started, time.monotonic() - started, tuple(skipped),
                    code, exchange)
    return done, record


FIRST_SLICE = 2048  # backend bytes translated before the first tick's answer goes out (TurnStream)


class TurnStream:
    """The stream callable: at each relay tick, what the channel holds, translated. Never
    raises (a raise here hangs the client), never returns b"" early (that ends the body). A
    failure of its own ends the stream with ``response.failed`` naming the request id; the
    exception goes to the log.

    The first backend bytes of a turn are sliced: a fast backend's first read can carry its
    whole answer (hundreds of chunks, ~0.5 ms to translate), and nothing of it would leave
    before all of it was translated. So the first tick with backend data translates about
    ``FIRST_SLICE`` bytes of it (up to an event boundary) and gives the rest back to the
    channel, which asks for one more tick: the first tokens go out at once, the rest a pass
    later. Once per turn, so a turn costs at most one extra mitmproxy pass."""

    __slots__ = ("reader", "channel", "rid", "sliced")

    def __init__(self, reader: Reader, channel, rid: str = "") -> None:
        self.reader, self.channel, self.rid = reader, channel, rid
        self.sliced = False  # the first backend bytes were seen (sliced or not)

    def __call__(self, data: bytes):
        reader = self.reader
        try:
            items = self.channel.take()
            if not self.sliced and data:
                items = self._first_slice(items)
            if len(items) == 1:
                out = reader.apply(items[0])
            else:
                out = b"".join([reader.apply(item) for item in items])
            if not data:  # the relay's body ended: so did the turn
                out += reader.finish()
        except BaseException as exc:  # noqa: BLE001
            log.warning(f"resp2chat: the stream of {self.rid} failed: {type(exc).__name__}: {exc}", exc_info=exc)
            try:
                out = reader.fail("server_error", gateway_failure("stream this response", self.rid),
                                  f"{type(exc).__name__}: {exc}")
            except BaseException:  # noqa: BLE001 — the translator itself is broken: end the body
                out = b""
        return out or []

    def _first_slice(self, items: list) -> list:
        """The items to translate now, the first backend bytes cut after ``FIRST_SLICE`` bytes
        at an event boundary; what follows goes back to the channel."""
        seen = 0
        for i, item in enumerate(items):
            if item.__class__ is not bytes:
                continue
            self.sliced = True
            if seen + len(item) > FIRST_SLICE:
                cut = item.find(b"\n\n", max(FIRST_SLICE - seen, 0)) + 2
                if 1 < cut < len(item):
                    self.channel.give_back([item[cut:], *items[i + 1:]])
                    return [*items[:i], item[:cut]]
                if i + 1 < len(items):
                    self.channel.give_back(items[i + 1:])
                    return items[:i + 1]
                return items
            seen += len(item)
        return items


@fails_closed
class Turns(Owner):
    name = "resp2chat_turns"
    owner = "lowering"
    also_reads = tuple(sorted(S.SECRET_FIELDS | S.HOLDS_SECRETS)) + ("routing_key_header",)  # secrets: scrubbed

    def __init__(self, source, upstreams, search, store) -> None:
        super().__init__(source)
        self.upstreams, self.relay, self.search, self.store = upstreams, upstreams.relay, search, store
        self.live: dict[str, Live] = {}
        self.lowering = LoweringOptions()
        self.lowering_repr = repr(self.lowering)  # part of the replay cache key
        self.lowering_record = lowering_record(self.lowering)  # in each flow: `resp2chat retranslate` reads it
        self.lowering_records: dict[str, dict] = {}  # the same, by upstream (several upstreams)
        self.tools_cache = ToolsCache()
        self.secrets: tuple[bytes, ...] = ()
        self.specs: tuple[routing.UpstreamSpec, ...] = ()  # several upstreams (routing.py)
        self.lowering_by_upstream: dict[str, LoweringOptions] = {}
        self.finished: list[Callable[[Finished], None]] = []
        self.socket_turns = 0  # turns in flight on Responses WebSockets (addons/websocket.py): not in `live`
        self._seal_key: bytes | None = None
        self._seal_id: str | None = None
        self.sealer = Sealer(self.seal_key)

    def apply(self, updated: set[str]) -> None:
        web_search = bool(self.s["brave_api_key"])
        self.lowering = LoweringOptions.from_settings(self.s, web_search=web_search)
        self.specs = routing.parse_upstreams(self.s["upstreams"])
        self.lowering_by_upstream = {s.name: LoweringOptions.from_settings(s.settings(self.s), web_search=web_search)
                                     for s in self.specs}
        self.lowering_repr = repr(self.lowering) + "".join(
            f"\n{name}: {opts!r}" for name, opts in self.lowering_by_upstream.items())
        self.lowering_record = lowering_record(self.lowering)
        self.lowering_records = {name: lowering_record(opts) for name, opts in self.lowering_by_upstream.items()}
        self.secrets = S.secret_values(self.s)
        self._seal_key = self._seal_id = None

    def seal_key(self) -> bytes:
        """The key for resp2chat_core/seal.py (made on first use when ``seal_key`` is unset)."""
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

    # --- request ---------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if path in RESPONSES_PATHS and req.method == "POST":
            self.begin(flow, path)

    def parse(self, body: bytes | dict, response_id: str, created_at: int, history=None, resolve=None) -> Turn:
        """Decode, validate and lower; ``GatewayError`` for a request the gateway cannot serve.
        ``history``: where ``previous_response_id`` is looked up, ``resolve``: where
        ``item_reference`` ids are (default: the response store, both)."""
        return begin_turn(body, self.lowering, response_id, created_at, history or self.store.history,
                          self.tools_cache, self.sealer, resolve=resolve or self.store.resolve_items,
                          route=self.route if self.specs else None)

    def recorded_lowering(self, model: str) -> dict:
        """The lowering options a turn for ``model`` ran with, for its record (``resp2chat
        retranslate`` lowers it again with them): its first upstream's (``lowering``) and, with
        fallbacks, theirs in order (``lowering_fallbacks``)."""
        try:
            names = [s.name for s in routing.candidates(self.specs, model)] if self.specs else []
        except GatewayError:
            names = []
        if not names:
            return {"lowering": self.lowering_record}
        found = {"lowering": self.lowering_records[names[0]]}
        if len(names) > 1:
            found["lowering_fallbacks"] = [self.lowering_records[n] for n in names[1:]]
        return found

    def route(self, model: str) -> list[LoweringOptions]:
        """Several upstreams: the lowering options of each one serving ``model``, in order."""
        return [self.lowering_by_upstream[s.name] for s in routing.candidates(self.specs, model)]

    def begin(self, flow: http.HTTPFlow, client_path: str) -> None:
        body = flow.request.get_content(strict=False) or b""
        meta = flow.metadata.setdefault(META, {})
        meta["responses_request"] = body.decode("utf-8", "replace")
        try:
            turn = self.parse(body, new_response_id(), int(time.time()))
        except GatewayError as err:
            meta["status"] = "rejected"
            flow.response = http.Response.make(err.status, json.dumps(err.body()),
                                               {**JSON_HEADERS, "x-request-id": request_id(flow)})
            return
        turn.ctx.request_id = request_id(flow)  # named in the failures the client sees
        req = flow.request
        plan = self.plan(turn, flow, req.headers.get("authorization"))
        meta["response_id"] = turn.ctx.response_id
        meta["upstream"] = plan.upstream.url
        meta["upstream_name"] = plan.name
        req.content = turn.chat_body
        req.headers["content-type"] = "application/json"
        req.headers["accept"] = "text/event-stream"
        req.headers["accept-encoding"] = "identity"  # the translator reads raw bytes
        plan.upstream.route(flow, "/chat/completions")
        self.upstreams.authorize(flow, plan.spec)
        if plan.affinity:
            req.headers[plan.affinity[0]] = plan.affinity[1]
        url = req.url
        exchange = self.exchange(flow.id, turn, plan)
        reader = Reader(turn.translator(), MAX_ENTRY_BYTES, self.secrets)
        if not turn.client_stream:
            exchange.channel.push = reader.apply  # one JSON body at the end: nothing to tick
        live = Live(turn, exchange, reader, url, client_path, time.monotonic())
        reader.on_first = lambda: setattr(live, "first", time.monotonic())
        self.live[flow.id] = live  # (_end forgets it)
        ABANDON[flow.id] = exchange.abort  # failing closed at the response head gives the backend call up
        # To the relay (see resp2chat_io/relay/server.py for why turns take this hop); the flow
        # shows the upstream again once the request is out (responseheaders).
        for name, value in self.relay.expect(exchange):
            req.headers[name] = value
        req.scheme, (req.host, req.port) = "http", self.relay.address

    def plan(self, turn: Turn, flow: http.HTTPFlow, client_auth: str | None) -> "Plan":
        """Where a turn goes (HTTP and WebSocket alike): the first upstream serving its model,
        with its key, the session's routing key, and the later ones as fallbacks."""
        specs = routing.candidates(self.specs, turn.ctx.model) if self.specs else ()
        spec = specs[0] if specs else None
        upstream = self.upstreams.endpoint(spec) if spec else self.upstreams.target(flow)
        fallbacks = tuple(
            Fallback(alt.name, Target(self.upstreams.endpoint(alt).url + "/chat/completions"),
                     (auth.encode() if (auth := self.upstreams.authorization(alt, client_auth)) else None),
                     alt_body, think)
            for alt, (alt_body, think, _tools) in zip(specs[1:], turn.alternates))
        return Plan(upstream, spec, spec.name if spec else "default",
                    self.upstreams.authorization(spec, client_auth),
                    self.upstreams.routing_key(session_key(turn.prompt_cache_key, flow.request.headers)), fallbacks)

    def exchange(self, turn_id: str, turn: Turn, plan: "Plan", secret: str | None = None) -> Exchange:
        return Exchange(turn_id, secrets.token_urlsafe(24) if secret is None else secret,
                        Target(plan.upstream.url + "/chat/completions"),
                        search=self.search.settings if turn.web_search else None,
                        upstream=plan.name, model=turn.ctx.model, think=turn.ctx.think, fallbacks=plan.fallbacks)

    # --- response --------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        live = self.live.get(flow.id)
        if live is None or flow.is_replay == "response":
            return
        if "failed_in" in flow.metadata[META]:
            self._end(flow)  # an earlier hook failed (base.fail_closed answered): the turn ends here
            self._record(flow, live, failed=True)
            return
        self._answer_head(flow, live)

    def _answer_head(self, flow: http.HTTPFlow, live: Live) -> None:
        """The relay answered: the flow shows the upstream again, and a streaming client gets
        the stream callable."""
        self._show_upstream(flow, live)
        if not live.turn.client_stream:
            return
        resp = flow.response
        resp.stream = TurnStream(live.reader, live.exchange.channel, live.turn.ctx.request_id)
        resp.status_code, resp.reason = 200, "OK"
        for name in ("content-length", "content-encoding", "content-type", "transfer-encoding"):
            resp.headers.pop(name, None)
        resp.headers["content-type"] = "text/event-stream; charset=utf-8"
        resp.headers["cache-control"] = "no-cache"
        resp.headers["x-request-id"] = live.turn.ctx.request_id
        if flow.request.http_version == "HTTP/1.1":
            resp.headers["transfer-encoding"] = "chunked"

    def response(self, flow: http.HTTPFlow) -> None:
        live = self._end(flow)
        if live is None:
            return
        if flow.is_replay == "response":
            self._replayed(flow, live)
            return
        if "failed_in" in flow.metadata[META] and not isinstance(flow.response.stream, TurnStream):
            self._record(flow, live, failed=True)  # the answer is base.fail_closed's 500
            return
        if not live.turn.client_stream:
            self._answer_whole(flow, live)
        self._record(flow, live)

    def error(self, flow: http.HTTPFlow) -> None:
        live = self._end(flow)
        if live is None:
            return
        streamed = flow.response is not None and isinstance(flow.response.stream, TurnStream)
        # Codex hangs up as soon as it has response.completed, which the translator sends at the
        # backend's [DONE], a moment before the relay's body ends: mitmproxy then reports
        # "Client disconnected" instead of a response. The turn happened all the same: record it.
        if streamed and not flow.response.raw_content:  # mitmproxy stores a streamed body only at its end
            flow.response.raw_content = bytes(live.reader.sent)
        # Otherwise the client got nothing (it went away first, or the relay failed): recorded as
        # it stood (unfinished, unless the backend had finished).
        self._record(flow, live, failed="failed_in" in flow.metadata[META] and not streamed,
                     answer=None if streamed else b"")

    def _end(self, flow: http.HTTPFlow) -> Live | None:
        live = self.live.pop(flow.id, None)
        if live is not None:
            ABANDON.pop(flow.id, None)
            self.relay.forget(flow.id)  # when the relay never saw it (server replay, an error)
            self._show_upstream(flow, live)
        return live

    @staticmethod
    def _show_upstream(flow: http.HTTPFlow, live: Live) -> None:
        """The flow shows the backend's URL, not the relay's, and no relay headers; when a
        fallback answered, its URL and the body it got (the first upstream's body stays in the
        record as ``chat_request``: offline replay matches a rerun on it, as it is what a rerun
        lowers first)."""
        req = flow.request
        show_url(flow, live.upstream_url)
        ex = live.exchange
        if ex.answered and live.upstream_url != ex.fallbacks[ex.answered - 1].target.url:
            fb = ex.fallbacks[ex.answered - 1]
            live.upstream_url = req.url = fb.target.url
            meta = flow.metadata[META]
            if fb.body is not None:
                meta["chat_request"] = live.turn.chat_body.decode("utf-8", "replace")
                req.content = fb.body
            meta["upstream"], meta["upstream_name"] = fb.target.url.removesuffix("/chat/completions"), fb.name

    def _answer_whole(self, flow: http.HTTPFlow, live: Live) -> None:
        """A non-streaming client: the same translation, finished, as one JSON body."""
        live.reader.finish()
        result = live.reader.translator.response()
        if result["status"] == "failed":
            err = result["error"]
            status = FAILED_STATUS.get(err["code"], 502)
            body = error_json(err["message"], status_type="upstream_error", code=err["code"])
        else:
            status, body = 200, json.dumps(result, ensure_ascii=False).encode()
        flow.response = http.Response.make(status, scrub(body, self.secrets),
                                           {**JSON_HEADERS, "x-request-id": live.turn.ctx.request_id})

    def _record(self, flow: http.HTTPFlow, live: Live, failed: bool = False, answer: bytes | None = None) -> None:
        """Flow metadata (saved with -w), a one-line comment (shown in mitmweb), listeners.
        ``failed``: the client's answer is base.fail_closed's 500, whatever the backend said.
        ``answer``: what the client got, when it is not the usual (the stream, or the body)."""
        turn, t, reader = live.turn, live.reader.translator, live.reader
        meta = flow.metadata[META]
        ex = live.exchange
        name = meta.get("upstream_name", "default")
        if answer is None:
            answer = bytes(reader.sent) if turn.client_stream and not failed else flow.response.content
        done, record = settle(flow, turn, reader, answer, upstream=name, started=live.started, first=live.first,
                              skipped=ex.skipped, secrets=self.secrets, lowering=self.recorded_lowering(turn.ctx.model),
                              failed_in=meta.get("failed_in") if failed else None, exchange=ex)
        meta.update(record)
        status, code = done.status, done.code
        calls = sum(1 for item in t.output if item["type"] not in ("message", "reasoning", "compaction"))
        u = t.usage or {}
        took = ((flow.response.timestamp_end if flow.response else None) or time.time()) - flow.request.timestamp_start
        flow.comment = (
            f"{flow.request.method} {live.client_path} → {turn.ctx.model} · {status}"
            + (f" ({code or t.error['code']})" if code or t.error else "")
            + (f" · via {name}" + (f" (after {', '.join(n for n, _ in ex.skipped)})" if ex.skipped else "")
               if self.specs else "")
            + usage_note(u)
            + (f" · {calls} tool call{'s' if calls != 1 else ''}" if calls else "")
            + (" · compaction" if turn.compaction else "")
            + f" · {took * 1000:.0f} ms"
        )
        self.notify(done)

    def _replayed(self, flow: http.HTTPFlow, live: Live) -> None:
        """A turn answered by offline replay (``--server-replay``): its recorded answer, or the
        answer ``server_replay_extra`` gives a turn nothing was recorded for."""
        meta = flow.metadata[META]
        body = flow.response.content or b""
        final = None
        if meta.get("server_replay"):  # (addons/server_replay.py: where the answer was recorded)
            if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
                final = final_response(body)
            else:
                try:
                    final = json.loads(body)
                except (ValueError, RecursionError):
                    final = None
            final = final if isinstance(final, dict) and isinstance(final.get("output"), list) else None
        status = final.get("status", "unfinished") if final else "failed"
        code = "" if final else "not_recorded"
        if final and (final.get("error") or final.get("incomplete_details")):
            code = (final.get("error") or {}).get("code") or (final.get("incomplete_details") or {}).get("reason") or ""
        meta["status"] = status
        self.notify(Finished(flow, live.turn, status, final, body, (final or {}).get("usage"), SERVER_REPLAY,
                             None, time.monotonic() - live.started, (), code))

    def notify(self, done: Finished) -> None:
        """Tell the ``finished`` listeners; one that fails is logged and the others still hear
        of the turn (what the client got is settled by now)."""
        for listener in self.finished:
            try:
                listener(done)
            except Exception as exc:  # noqa: BLE001
                log.warning(f"resp2chat: recording {done.turn.ctx.request_id} failed in "
                            f"{getattr(listener, '__qualname__', listener)}: {type(exc).__name__}: {exc}",
                            exc_info=exc)
