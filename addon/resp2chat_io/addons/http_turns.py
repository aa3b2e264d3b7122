"""The HTTP transport: ``POST /v1/responses`` from request to recorded answer.

It drives turns.py's steps for one HTTP flow (the WebSocket transport, websocket.py, drives the
same steps for each message of a socket):

- ``request``: the replay cache is asked first (an identical request is answered at once, its
  answer stored if the client wants it stored; addons/replay.py); otherwise the request is
  decoded, checked, looked up and lowered (``Turns``), the turn is started, and the flow's
  request becomes the chat request the first upstream gets (so flow files and offline replay
  see it), pointed at the relay with the exchange's name and secret (relay/server.py says why
  turns take this hop). The relay sends the exchange's own body upstream, so the request crosses
  the hop without it: ``BodyAside``, last in the addon chain (every other addon's request hook,
  mitmproxy's server replay included, saw the chat body), leaves it out, and the flow has it
  back once the request is out (a 2.5 MB conversation is not copied through mitmproxy's HTTP/1
  writer and the relay's reader on its way to the first token).
- ``responseheaders``: the request has gone out: the flow shows the upstream again. A
  streaming client gets the stream callable (``TurnStream``), which takes the turn's news from
  the exchange's channel at each relay tick and answers with Responses events.
- ``response`` / ``error``: a non-streaming client gets the finished Response as one JSON body
  (or an HTTP error, with the backend's ``Retry-After`` when it gave one: ``retry-after`` and
  ``retry-after-ms``, as the gateway's own 429s have them); the turn is settled (flow metadata, comment) and ended (its listeners).
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from mitmproxy import ctx, http

from resp2chat_core import compaction, mcp
from resp2chat_core.channel import Reader, scrub
from resp2chat_core.conversations import named
from resp2chat_core.errors import GatewayError, error_json, gateway_failure, specific_code
from resp2chat_core.gate import RESPONSES_PATHS
from resp2chat_core.labels import shown
from resp2chat_core.limits import retry_headers, retry_seconds
from resp2chat_core.replay import entry_flags, unpack_fresh
from resp2chat_core.sse import DONE
from resp2chat_core.turn import wanted
from resp2chat_core.usage import usage_note
from resp2chat_core.websocket import final_response
from resp2chat_io import offload

from .base import (ABANDON, JSON_HEADERS, META, SSE_HEADERS, TURN_HEADER, RecordText, Refusal,
                   fails_closed, json_response, log, refusal, request_id, show_url)
from .head_deadline import KEPT
from .turns import UNRECORDED, TurnRun, new_response_id

# HTTP status and error type for a non-streaming client whose response failed, by error code
# (another code: 502, upstream_error).
FAILED = {
    "context_length_exceeded": (400, "upstream_error"),
    "invalid_prompt": (400, "upstream_error"),
    "rate_limit_exceeded": (429, "upstream_error"),
    "invalid_api_key": (401, "authentication_error"),  # its key was revoked while it ran (Turns.clients_changed)
    "insufficient_quota": (429, "upstream_error"),
    "upstream_key_refused": (502, "upstream_error"),  # the backend refused the gateway's own key: the operator's (errors.py)
    # a completed turn its conversation could not take (Turns.land): the write's own status
    "store_unavailable": (503, "server_error"),
    "conversation_not_found": (404, "invalid_request_error"),
    "conversation_too_large": (413, "invalid_request_error"),
    "conversation_busy": (409, "invalid_request_error"),
    "invalid_value": (400, "invalid_request_error"),  # an input id another turn gave it meanwhile (as at the start)
}
COMPACT_PATHS = tuple(p + "/compact" for p in RESPONSES_PATHS)  # POST /v1/responses/compact
FIRST_SLICE = 2048  # backend bytes translated before the first tick's answer goes out (TurnStream)
HOP_KEPT = frozenset({"connection", "keep-alive"})  # the client's, on the flow's request: its connection's fate


def request_text(meta: dict) -> str:
    """The record's ``responses_request`` as text ("" when it has none)."""
    text = meta.get("responses_request")
    return str(text) if text is not None else ""


def note_request(meta: dict, body: bytes | None, raw: object = None) -> None:
    """Keep what outcomes.py reports of a request the gate let in, so that it never decodes a
    body again: its text (the flow's record; ``body``, when given: a ``RecordText``, text when
    a flow file is written) and, once decoded (``raw``), its model and ``prompt_cache_key``; a
    request whose mcp tools carry secrets for their servers is made text at once, without them
    (mcp.redact_text: never recorded)."""
    if body is not None:
        meta["responses_request"] = RecordText(body)
    if isinstance(raw, dict):
        meta["read"] = True  # (its mcp tools' secrets dealt with here: redact.unread leaves it be)
        if mcp.client_secrets(raw):
            meta["responses_request"] = mcp.redact_text(request_text(meta), raw)
        model, pck = raw.get("model"), raw.get("prompt_cache_key")
        meta["request_model"] = model if isinstance(model, str) else ""
        if isinstance(pck, str) and pck:
            meta["request_cache_key"] = pck


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

    __slots__ = ("reader", "channel", "rid", "sliced", "ended")

    def __init__(self, reader: Reader, channel, rid: str = "") -> None:
        self.reader, self.channel, self.rid = reader, channel, rid
        self.sliced = False  # the first backend bytes were seen (sliced or not)
        self.ended = False  # the stream's data: [DONE] went out (after the terminal event)

    def __call__(self, data: bytes):
        reader = self.reader
        try:
            items = self.channel.take()
            if not self.sliced and data:
                items = self._first_slice(items)
            out = reader.apply_all(items)
            if not data:  # the relay's body ended: so did the turn
                out += reader.finish()
        except BaseException as exc:  # noqa: BLE001
            log.warning(f"resp2chat: the stream of {self.rid} failed: {type(exc).__name__}: {exc}", exc_info=exc)
            try:
                out = reader.fail("server_error", gateway_failure("stream this response", self.rid),
                                  f"{type(exc).__name__}: {exc}")
            except BaseException:  # noqa: BLE001 — the translator itself is broken: end the body
                out = b""
        if not self.ended and reader.translator.done and not getattr(reader, "holding", False):  # (an end
            # held, conversations.Landing: after it)
            self.ended = True
            out += DONE  # (sse.DONE: after the terminal event, the stream's own end)
        return out or []

    @property
    def answer(self) -> bytes:
        """What the client got: the translator's events, then the stream's end once it went out
        (what a flow file, the replay cache and ``Finished.answer`` keep)."""
        return self.reader.sent + (DONE if self.ended else b"")

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
class HttpTurns:
    name = "resp2chat_http_turns"

    def __init__(self, turns, upstreams, replay, store, gate, background) -> None:
        self.turns, self.upstreams, self.replay, self.store, self.gate = turns, upstreams, replay, store, gate
        self.background = background  # (addons/background.py: background: true)
        self.relay = upstreams.relay
        self.live: dict[str, TurnRun] = {}  # this transport's turns, by flow id (the same runs as in Turns.in_flight)
        self.aside: set[str] = set()  # flows whose request went to the relay without its body (BodyAside)

    # --- request -------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        compact = path in COMPACT_PATHS  # POST /v1/responses/compact: a remote-compaction turn (compaction.py)
        if req.method != "POST" or path not in RESPONSES_PATHS and not compact:
            return
        started = time.monotonic()
        body = req.get_content(strict=False) or b""
        meta = flow.metadata.setdefault(META, {})
        note_request(meta, body)
        meta["client_path"] = path
        try:
            client = self.gate.caller(flow)  # (its key still accepted, now its body is in)
        except GatewayError as err:
            meta["status"] = "rejected"
            flow.response = refusal(flow, err)
            return
        verdict = await self.turns.admit(client, flow.id)  # (the client's limits: before anything else)
        limits = verdict.headers if verdict is not None else ()
        if verdict is not None and not verdict.admitted:
            meta["status"] = "rejected"
            flow.response = refusal(flow, verdict.error(client.name), verdict.headers)
            return
        owner = self.upstreams.owner_of(flow)  # (before the client's credentials are left behind below)
        raw = data = None
        try:
            data = await self.turns.decode(body)
            # (the cache keys /v1/responses: after the decode, which kept what hashes a long body's
            # history once: requestbody.body_digest)
            hit = None if compact else await self._cached(flow, body, owner)
            raw = self.turns.check(data, client)
            note_request(meta, None, raw)
            if compact:
                raw = compaction.compact_request(raw)
            if named(raw) is not None or raw.get("background") is True:  # a conversation changes between two
                hit = None  # identical requests, a background response is its own: never from (nor into) the cache
                meta.pop("replay_key", None)
            found = await self.turns.lookup(raw, owner)
            if hit is not None and self._answer_hit(flow, hit, raw, found, owner, limits):
                self.turns.release(client, flow.id)
                return
            turn = self.turns.lower(raw, found, owner=owner, request_id=request_id(flow), keep_items=compact)
            meta["response_id"] = turn.ctx.response_id  # (a turn from now on: outcomes.py)
            queued, home = await self.background.queue(turn) if turn.background else (None, None)  # (stored first)
            run = self.turns.start(turn, flow, turn_id=flow.id, started=started, client_headers=req.headers,
                                   client=client, limits=limits)
        except GatewayError as err:
            meta["status"] = "rejected"
            flow.response = refusal(flow, err, limits)
            self.turns.release(client, flow.id)
            if isinstance(raw, dict) and mcp.client_secrets(raw):  # (the flow keeps the request it refused; one
                req.content = meta["responses_request"].encode()  # refused before it was read: redact.unread)
            await offload.discard(data, len(body))
            return
        except BaseException:
            self.turns.release(client, flow.id)  # (it fails closed: base.py)
            raise
        if queued is not None:  # it runs in the gateway: the client gets it queued, or its events as they come
            bg = self.background.start(run, home)
            if turn.client_stream:
                self.background.feed(flow, bg.log, -1, limits)  # (x-ratelimit-*, as any turn's head)
            else:
                flow.response = json_response(200, queued, x_request_id=run.request_id)
                flow.response.headers.update(limits)
            return
        self.live[flow.id] = run  # (``_end`` forgets it)
        ex = run.exchange
        first = ex.candidates[0]
        meta.update(upstream=first.base_url, upstream_name=first.name)
        if not turn.client_stream:
            ex.channel.push = run.reader.apply_all  # one JSON body at the end: nothing to tick
        ABANDON[flow.id] = ex.abort  # failing closed at the response head gives the backend call up
        # The flow's request is what the first upstream gets (its key redacted when saved:
        # redact.py), sent to the relay, which runs the exchange; the flow shows the upstream's
        # URL again once the request is out (responseheaders).
        # (the client's connection headers stay: mitmproxy reads them for the client's side)
        kept = [(n.encode(), v.encode()) for n, v in req.headers.items(multi=True) if n.lower() in HOP_KEPT]
        req.url = first.url
        req.headers = http.Headers([*kept, *first.sent([*ex.headers, (b"host", urlsplit(first.url).netloc.encode())])])
        req.content = first.body
        for name, value in self.relay.expect(ex):
            req.headers[name] = value
        req.scheme, (req.host, req.port) = "http", self.relay.address

    async def _cached(self, flow: http.HTTPFlow, body: bytes, owner: str) -> bytes | None:
        """The replay cache's entry for this very request (None: none, or the cache is off)."""
        if not self.replay.enabled or getattr(ctx.options, "server_replay", None):
            return None  # (server replay answers after this hook and would overwrite a cache answer)
        key = self.turns.replay_key(self.upstreams.cache_context(flow), body, owner)
        flow.metadata[META]["replay_key"] = key
        return await self.replay.get(key)

    def _answer_hit(self, flow: http.HTTPFlow, entry: bytes, raw: dict, found, owner: str, limits: tuple) -> bool:
        """A replay-cache hit answers at once, under a fresh response id; stored when the client
        wants it stored (its conversation made whole, not lowered; also when it refers to stored
        state, to know it is still there). False: the request cannot be answered any more (its
        previous response, or an item it references, expired or was deleted): it goes on as a
        turn, which says why, as a miss would."""
        stream, store = entry_flags(entry)
        try:
            items, summarize = self.turns.conversation(raw, found) if store or wanted(raw) != (None, ()) \
                else (None, False)
        except GatewayError:
            return False
        items = items if store else None
        response_id, created_at = new_response_id(), int(time.time())
        answer = unpack_fresh(entry, response_id, created_at)
        headers = SSE_HEADERS if stream else {**JSON_HEADERS, "cache-control": "no-cache"}
        flow.response = http.Response.make(200, answer, {**headers, "x-request-id": request_id(flow)})
        flow.response.headers.update(limits)
        flow.metadata[META].update(replay_cache="hit", response_id=response_id, status="completed")
        flow.metadata[META][KEPT] = True  # (a turn's answer, stored: counted in max_answers_waiting_mb, never refused)
        flow.comment = f"replay cache hit · {response_id}"
        if items is not None:
            final = final_response(answer) if stream else json.loads(answer)
            if summarize or final["output"] and final["output"][0].get("type") == compaction.ITEM:
                # (Codex's compaction request, or a turn that compacted its conversation first,
                # server-side: the user messages, what its miss stored, turn.py begin_turn)
                items = compaction.users(items)
            self.store.put(response_id, items + final["output"], final, owner=owner)
        return True

    def running(self) -> None:
        if ctx.master is not None and ctx.master.addons.get(BodyAside.name) is None:
            ctx.master.addons.add(BodyAside(self))  # last: see there

    def done(self) -> None:
        for run in self.live.values():  # (mitmproxy saves unfinished flows at its end: as they were)
            self._show_upstream(run.flow, run)

    # --- response ------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        run = self.live.get(flow.id)
        if run is None or flow.is_replay == "response":
            return
        if "failed_in" in flow.metadata[META]:
            self._end(flow)  # an earlier hook failed (base.fail_closed answered): the turn ends here
            self._record(flow, run, failed=True)
            return
        self._answer_head(flow, run)

    def _answer_head(self, flow: http.HTTPFlow, run: TurnRun) -> None:
        """The relay answered: the flow shows the upstream again, and a streaming client gets
        the stream callable."""
        self._show_upstream(flow, run)
        if not run.turn.client_stream:
            return
        resp = flow.response
        resp.stream = TurnStream(run.reader, run.exchange.channel, run.request_id)
        resp.status_code, resp.reason = 200, "OK"
        for name in ("content-length", "content-encoding", "content-type", "transfer-encoding"):
            resp.headers.pop(name, None)
        resp.headers.update(SSE_HEADERS)
        resp.headers["x-request-id"] = run.request_id
        resp.headers.update(run.limits)  # (x-ratelimit-*: the client's limits when it was admitted)
        if flow.request.http_version == "HTTP/1.1":
            resp.headers["transfer-encoding"] = "chunked"

    def response(self, flow: http.HTTPFlow) -> None:
        run = self._end(flow)
        if run is None:
            return
        if flow.is_replay == "response":
            self._replayed(flow, run)
            return
        if "failed_in" in flow.metadata[META] and not isinstance(flow.response.stream, TurnStream):
            self._record(flow, run, failed=True)  # the answer is base.fail_closed's 500
            return
        if not run.turn.client_stream:
            self._answer_whole(flow, run)
        self._record(flow, run)

    def error(self, flow: http.HTTPFlow) -> None:
        run = self._end(flow)
        if run is None:
            return
        streamed = flow.response is not None and isinstance(flow.response.stream, TurnStream)
        # Codex hangs up as soon as it has response.completed, which the translator sends at the
        # backend's [DONE], a moment before the relay's body ends: mitmproxy then reports
        # "Client disconnected" instead of a response. The turn happened all the same: record it.
        if streamed and not flow.response.raw_content:  # mitmproxy stores a streamed body only at its end
            flow.response.raw_content = flow.response.stream.answer
        # A turn that failed closed at its response head sent its 500 at once: the client may
        # have read it and hung up before the relay's body ended. Otherwise the client got
        # nothing (it went away first, or the relay failed): recorded as it stood (unfinished,
        # unless the backend had finished).
        refused = flow.response.stream if flow.response is not None and isinstance(flow.response.stream, Refusal) \
            else None
        self._record(flow, run, failed="failed_in" in flow.metadata[META] and not streamed,
                     answer=None if streamed else (refused.sent if refused is not None else b""))

    def _end(self, flow: http.HTTPFlow) -> TurnRun | None:
        run = self.live.pop(flow.id, None)
        if run is not None:
            ABANDON.pop(flow.id, None)
            self.relay.forget(flow.id)  # when the relay never saw it (server replay, an error)
            self._show_upstream(flow, run)
        return run

    def _show_upstream(self, flow: http.HTTPFlow, run: TurnRun) -> None:
        """The flow shows the backend's URL, not the relay's, no relay headers, and the chat body
        again (``BodyAside``); when a fallback answered, its URL and the body it got (the first
        upstream's body stays in the record as ``chat_request``: offline replay matches a rerun
        on it, as it is what a rerun lowers first)."""
        ex = run.exchange
        show_url(flow, ex.candidates[0].url)
        answered = ex.answering
        meta = flow.metadata[META]
        req = flow.request
        if ex.answered and meta.get("upstream_name") != answered.name:
            req.url = answered.url
            meta["chat_request"] = RecordText(run.turn.chat_body)
            req.content = answered.body
            meta["upstream"], meta["upstream_name"] = answered.base_url, answered.name
        elif flow.id in self.aside:
            req.content = ex.candidates[0].body
        self.aside.discard(flow.id)

    def _answer_whole(self, flow: http.HTTPFlow, run: TurnRun) -> None:
        """A non-streaming client: the same translation, finished, as one JSON body."""
        run.reader.finish()
        translator = run.reader.translator
        result = translator.response()
        wait = None
        if result["status"] == "failed":
            err = result["error"]
            code = specific_code(err)  # (errors.py response_error: the HTTP body keeps it)
            status, kind = FAILED.get(code, (502, "upstream_error"))
            body = error_json(err["message"], status_type=kind,
                              code=code)
            wait = retry_seconds(translator.retry_after)  # the backend's: the SDK's retry waits as it asked
        else:
            if flow.metadata[META].get("client_path") in COMPACT_PATHS:  # the endpoint's own answer
                result = compaction.compacted(result, run.turn.items)
            status, body = 200, json.dumps(result, ensure_ascii=False).encode()
        flow.response = json_response(status, scrub(body, run.secrets), x_request_id=run.request_id)
        flow.metadata[META][KEPT] = True  # (paid for: counted in max_answers_waiting_mb, never refused)
        flow.response.headers.update(run.limits)
        if wait is not None:
            flow.response.headers.update(retry_headers(wait))

    def _record(self, flow: http.HTTPFlow, run: TurnRun, failed: bool = False, answer: bytes | None = None) -> None:
        """Flow metadata (saved with -w), a one-line comment (shown in mitmweb), listeners.
        ``failed``: the client's answer is base.fail_closed's 500, whatever the backend said.
        ``answer``: what the client got, when it is not the usual (the stream, or the body)."""
        turn, t = run.turn, run.reader.translator
        meta = flow.metadata[META]
        if answer is None:
            answer = flow.response.stream.answer if turn.client_stream and not failed else flow.response.content
        done, record = self.turns.settle(run, answer, meta.get("failed_in") if failed else None)
        meta.update(record)
        ex = run.exchange
        calls = sum(1 for item in t.output if item["type"] not in ("message", "reasoning", "compaction"))
        took = ((flow.response.timestamp_end if flow.response else None) or time.time()) - flow.request.timestamp_start
        path = flow.metadata[META].get("client_path", "/v1/responses")
        flow.comment = (
            f"POST {path} → {shown(turn.ctx.model)} · {done.status}"
            + (f" ({done.code or specific_code(t.error)})" if done.code or t.error else "")
            + (f" · via {done.upstream}" + (f" (after {', '.join(n for n, _ in ex.skipped)})" if ex.skipped else "")
               if self.turns.specs else "")
            + usage_note(t.usage or {})
            + (f" · {calls} tool call{'s' if calls != 1 else ''}" if calls else "")
            + (" · compaction" if turn.compaction else "")
            + f" · {took * 1000:.0f} ms"
        )
        self.turns.ended(done, flow.id)

    def _replayed(self, flow: http.HTTPFlow, run: TurnRun) -> None:
        """A turn answered by offline replay (``--server-replay``): its recorded answer, or the
        answer ``server_replay_extra`` gives a turn nothing was recorded for."""
        meta = flow.metadata[META]
        body = flow.response.content or b""
        final = None
        recorded = meta.get("server_replay") not in (None, UNRECORDED)  # (server_replay.py: where it was recorded)
        if recorded:
            if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
                final = final_response(body)
            else:
                try:
                    final = json.loads(body)
                except (ValueError, RecursionError):
                    final = None
            final = final if isinstance(final, dict) and isinstance(final.get("output"), list) else None
        done = self.turns.replayed(flow, run.turn, final, body, recorded=recorded,
                                   started=run.started, client=run.client, turn_id=flow.id)
        meta["status"] = done.status


@fails_closed
class BodyAside:
    """Last in the addon chain (added at ``running``, after mitmproxy's server replay and every
    script): a turn's request leaves for the relay without its body. The relay never reads it
    (it sends the exchange's own: relay/server.py), so mitmproxy need not write the chat body
    there nor the relay read it: for a long conversation that is megabytes copied twice before
    the first token. Every addon before this one saw the body (server replay matches on it,
    scripts may read it); ``HttpTurns._show_upstream`` puts it back once the request is out (the
    relay's answer head, or the flow's end, whichever comes first), so flow files and mitmweb
    show it as before.

    Being last, it also knows the request goes to the relay: the relay begins the turn's backend
    call now (``Relay.begin``), while mitmproxy dispatches, connects and sends the request that
    then claims it, not after. Not for a flow held by mitmweb's intercept (it may yet be changed
    or killed, and a killed flow must never have reached a backend) nor for one killed."""

    name = "resp2chat_body_aside"

    def __init__(self, turns: HttpTurns) -> None:
        self.turns = turns

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or flow.id not in self.turns.live \
                or flow.request.headers.get(TURN_HEADER) is None:
            return  # (answered meanwhile, or not on its way to the relay)
        self.turns.aside.add(flow.id)
        flow.request.content = b""
        if flow.live and not flow.intercepted and (flow.request.host, flow.request.port) == self.turns.relay.address:
            self.turns.relay.begin(flow.id)
