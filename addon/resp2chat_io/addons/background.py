"""Background responses (``background: true``): the turn runs in the gateway, off any client
connection; clients poll, cancel and resume it (the rules: resp2chat_core/background.py).

- ``queue``, then ``start`` (HttpTurns, for a ``POST /v1/responses`` with ``background: true``):
  stored at once as ``queued``, with its conversation as every stored response (its input items
  are listed from then on; a store that cannot keep it refuses the request: 413), then the turn's
  exchange runs as a task of its own, awaited
  directly on the relay's upstream client as a WebSocket turn is (its events go to the run's
  ``Log``). The
  client gets that Response as its JSON body, or, streaming, the run's events as they come
  (``feed``: a relay ``Feed``), and may go away: the turn goes on.
- While it runs, the task writes the response again every ``RENEW_SECS`` (``in_progress``,
  with a lease: a replica that dies leaves it to be read as ``failed``; the output so far with
  it, what a cancellation on another replica ends it with): its Response alone, over the
  version it wrote last (store.py ``renew``: its conversation is neither read nor written
  again), which answers with the Response there when another write came in between: a
  cancellation another replica asked for, its end stored elsewhere, or its deletion stops it.
  When it ends, the final Response is stored (any status: the poll must see it), with its
  events when the client streamed, as a renewal that ends it (``renew(…, ended=True)``: its
  output indexed as a ``put``'s; its conversation, stored when it was queued, not sent again); the turn is settled and its listeners hear of it as any
  turn's (metrics, access log, limits, a conversation). Its terminal event reaches a client
  streaming it only once it is stored (its reader holds it: ``conversations.Landing``), and says
  what the store keeps, so its stream and a poll agree. One the store can no longer keep (its
  conversation and output past ``max_session_memory_mb``, at a renewal or at its end) ends
  ``failed`` (``B.TOO_LARGE``), stored without its output, said once in the log (at its end: its
  ``response.completed``, never sent, becomes that ``response.failed``); one that fits but for its
  events is stored without them (a resume is told they were not kept).
- A run lives in the store it was queued in (``Run.home``) to its end: when ``state_store_url``
  changes meanwhile (mitmweb's options, ``--set``), its renewals and its end still go there (its
  client streaming it gets every event; replicas still on that store see it end), never to the
  new store, where it is not (read there as deleted, it stopped). Requests read the new store, as
  for every response stored before the change: a GET, DELETE, cancel or resume of it here is a
  404 where that store does not hold it; when ``state_store_url`` names its Redis again (A, B,
  then A), it is found there: a GET reads it, a DELETE stops it at once, a cancel is asked
  through the store as of another replica's run (it stops at its next renewal), a resume streams
  this gateway's events. A Redis left so is closed once its runs ended, and those still being
  queued there (``queue``'s first write) started and ended (addons/store.py ``_retire``, ``left``).
- ``deleted`` (``DELETE /v1/responses/{id}``, through the store addon): a run of this gateway
  stops at once (its backend call closed); one of another replica at its next renewal.
- A run whose key is revoked meanwhile (or, created on a keyless gateway, once keys are
  needed) stops as every turn in flight of that key does (``Turns.clients_changed``: its
  exchange halted), and is stored ``failed`` with ``invalid_api_key``.
- ``cancel`` (``POST /v1/responses/{id}/cancel``, through the store addon): a run of this
  gateway is stopped at once (its backend call closed: the task is cancelled) and ends
  ``cancelled``; one of another replica is asked to stop through the store (its Response
  alone, written as a renewal is: ``renew``, under the version check), and waited for, its
  status alone read every ``POLL`` (store.py ``status``); one whose replica died, or that did
  not stop within ``CANCEL_WAIT``, is stored ``cancelled`` here, over the version read (a write
  that came in between is read again, never answered over), as a renewal that ends it
  (``renew(…, ended=True)``: its output so far indexed, its conversation not written again).
- ``resume`` (``GET /v1/responses/{id}?stream=true&starting_after=N``, through the store addon;
  ``include`` checked as a GET's): the events after ``N``, from this gateway's run, live (while
  the store holds it: one deleted while it runs is a 404, as a GET of it; the store not
  answering, it is not known deleted), or once it ended, from the store (a run
  of another replica: its events when it ends, read by one follower per response here, which
  every client streaming it shares, reading its status alone until it ended, and which stops
  when the last of them goes away; one that
  ended without events for them ends their streams with what a request for it would get then,
  as an ``error`` event (their 200 went out while it ran): the "not kept" error, the 404 of a
  response deleted meanwhile, ``server_error`` when its replica died (its lease passed: a
  resume asked then is refused with it): ``B.without_events``).

Only a streamed run has events in its ``Log``: one created without ``stream`` is never streamed.
What this gateway holds of them is bounded in bytes (the team shares it):

- A running ``Log`` holds about ``LIVE`` bytes of events (``MAX_EVENTS``, what the store keeps of
  a run). Past it, its front goes, down to its last ``LIVE // 2`` bytes' events, but never what
  a client streaming it has not taken yet: clients streaming it get every event to the end. A
  client that falls ``LAG`` bytes behind and took nothing for ``LAG_SECS`` (it does not read) is
  not waited for: its stream ends
  with an ``error`` event (``stream_lagged``), the log going on without it. A new resume from
  events that went (``starting_after`` before ``Log.gone``) gets the one "not kept" error
  (``B.not_kept``), as a run of more than ``MAX_EVENTS`` gets once it ended (the store keeps
  none of them). The trade-off: a large run can be resumed only from its last ~2 MiB of events
  while it runs, and not at all once it ended (GET it without stream: its Response is whole).
- Runs that ended keep their ``Log`` here for a while (whole, no larger than ``MAX_EVENTS``):
  the last ``KEPT``, ``KEPT_BYTES`` of them at most, the oldest going first; the store keeps
  the rest.
- A client streaming a log is given at most ``PIECE`` bytes of it a tick (``FeedStream``), the
  next piece on a tick of its own, which mitmproxy reads only once the client's socket has taken
  the last one (its ``drain_writers``): what waits for a slow reader is a piece, never the log.
  (Before, each tick copied all it had not sent into the client's write buffer: a keyed client's
  resumes of one 3.9 MB log that read a few bytes every few seconds held ~5.5 MB each, 500 of
  them 2.9 GB.)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from mitmproxy import http

from resp2chat_core import background as B, listing
from resp2chat_core.conversations import terminal_event
from resp2chat_core.errors import GatewayError
from resp2chat_core.sse import DONE
from resp2chat_io.relay import Feed
from resp2chat_io.relay.upstream import failure
from resp2chat_io.store import StateUnavailable

from .base import META, SSE_HEADERS, fails_closed, log, refused_on_failure, request_id, store_unavailable
from .turns import TurnRun

KEPT = 64  # ended runs whose events stay here (to resume from), besides the store
KEPT_BYTES = 4 * B.MAX_EVENTS  # ... and their bytes at most (16 MiB: four of the largest kept), the oldest going first
LIVE = B.MAX_EVENTS  # a running run's events held here (bytes), about: past it, its front goes (``Log``)
LAG = 2 * B.MAX_EVENTS  # a client streaming a run this far behind its events is not waited for (``Log``)
LAG_SECS = 2.0  # ... and then took nothing for this long (a client that reads is handed its next piece sooner)
PIECE = 256 << 10  # bytes of a log a feed hands its client a tick: whole events, up to the one that ends past it
ENDING_TRIES = 8  # writes of a run's end, each over the version read
POLL = 0.25  # seconds between two reads of a run of another replica
CANCEL_WAIT = B.LEASE_SECS + 2 * B.RENEW_SECS  # seconds a cancellation waits for another replica's run to end


@dataclass(eq=False)
class Log:
    """A background response's events, as they come, and who is waiting for more; past ``LIVE``
    bytes, its front goes (see the module's docstring)."""

    sse: bytearray = field(default_factory=bytearray)  # its events from ``base`` on
    base: int = 0  # bytes of its events that went from its front
    gone: int = -1  # the last sequence number among them (-1: none went)
    done: bool = False
    refused: GatewayError | None = None  # a followed one that ended without events for its feeds (``_poll``)
    feeds: dict = field(default_factory=dict)  # relay Feeds streaming it now: their ``FeedStream``
    task: asyncio.Task | None = None  # a followed one's (``Background._follow``): the task reading the store
    later: object = None  # the loop's ``call_later`` (``Background._log``): a lagging feed is looked at again then

    @property
    def size(self) -> int:
        """All its events' bytes, those that went included."""
        return self.base + len(self.sse)

    def add(self, sse: bytes) -> None:
        if sse:
            before = self.size
            self.sse += sse
            if len(self.sse) > LIVE:
                self._drop(before)
            for stream in self.feeds.values():
                stream.poke()

    def _drop(self, before: int) -> None:
        """Its front goes, down to its last ``LIVE // 2`` bytes' whole events, but not what a
        feed has not taken (one that had not taken ``LAG`` bytes of what came ``before`` the
        last events is cut: a turn's last events alone may be larger); in large pieces (each
        copies what stays)."""
        end = self.size
        for feed, stream in list(self.feeds.items()):
            if before - stream.at > LAG and not stream.watched:  # (cut if it takes nothing meanwhile: ``_lagging``)
                if self.later is None:
                    self._lagging(feed, stream, stream.calls)  # (no loop's timer: at once)
                else:
                    stream.watched = True
                    self.later(LAG_SECS, self._lagging, feed, stream, stream.calls)
        cut = min([end - LIVE // 2, *(stream.at for stream in self.feeds.values())]) - self.base
        cut = self.sse.rfind(b"\n\n", 0, cut) + 2  # (after a whole event: a feed's place is one)
        if cut < LIVE // 4:
            return
        self.gone = self.sequence_before(self.base + cut)
        self.sse = self.sse[cut:]  # (what stays, in a buffer of its size: the old one is freed)
        self.base += cut

    def _lagging(self, feed, stream: FeedStream, calls: int) -> None:
        """``stream`` was ``LAG`` behind ``LAG_SECS`` ago: its client took nothing since (it was
        not called: mitmproxy reads its next tick once the client took the last piece), and it is
        still that far behind: it is cut, the log going on without it."""
        stream.watched = False
        if self.feeds.get(feed) is not stream or stream.calls != calls or self.size - stream.at <= LAG:
            return
        del self.feeds[feed]
        stream.lagged(max(self.sequence_before(stream.at), stream.starting_after) + 1)
        feed.end()

    def sequence_before(self, at: int) -> int:
        """The sequence number of the event that ends at ``at`` (-1: none before it)."""
        if at <= self.base:
            return self.gone
        end = at - self.base - 2
        start = self.sse.rfind(b"\n\n", 0, end)
        seq = B.sequence_number(bytes(self.sse[start + 2 if start >= 0 else 0:end]))
        return seq if seq is not None else 1 << 62  # (every event has one: else nothing is resumed from here)

    def end(self) -> None:
        """It ended: each feed's stream ends once it has handed its client all of it (``FeedStream``)."""
        self.done = True
        for stream in self.feeds.values():
            stream.poke()

    def whole(self) -> bytes | None:
        """All its events, none gone (else None)."""
        return None if self.base else bytes(self.sse)


@dataclass(eq=False)
class Run:
    """One background response running in this gateway."""

    response_id: str
    owner: str
    run: TurnRun
    streamed: bool  # the client asked for its events: they are kept, to resume from
    home: object  # the store it was queued in (store.py ``Store``): its renewals and its end go there
    log: Log  # (``Background._log``)
    task: asyncio.Task | None = None
    stopping: str = ""  # why it is being stopped: "cancel" (a client), "shutdown" (the gateway)
    calling: bool = True  # its backend call runs (only then can it be stopped: what follows is its end)
    version: int = 1  # the stored entry's version it last wrote (``queue``'s write is the first)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    terminal: bytes = b""  # its terminal event, held until it is stored (``Background._end``)


@dataclass(frozen=True, slots=True)
class Fed:
    """A flow a ``Feed`` answers (``Background.feed``): the feed, its stream callable, the log it
    reads, and the headers its answer's head gets besides (a new run's x-ratelimit-*)."""

    feed: Feed
    stream: FeedStream
    source: Log
    headers: tuple = ()


class FeedStream:
    """The stream callable of a flow a ``Feed`` answers: at each relay tick, the log's events
    it has not sent yet (those after ``starting_after``), at most ``PIECE`` bytes of them (the
    rest on a tick it asks for: ``feed.wake``); once it has sent all of an ended log,
    ``data: [DONE]``, and the feed ends (the relay ends the body). ``at``: where it is in the log
    (bytes, those gone from its front included)."""

    __slots__ = ("log", "feed", "starting_after", "at", "ended", "cut", "calls", "watched", "asked")

    def __init__(self, log: Log, starting_after: int, feed: Feed) -> None:
        self.log, self.feed, self.starting_after = log, feed, starting_after
        self.at, self.ended, self.cut = log.base, False, b""
        self.calls = 0  # calls so far: mitmproxy reads a tick only once its client took the last piece
        self.watched = False  # found ``LAG`` behind: ``Log._lagging`` looks again
        self.asked = True  # a tick is on its way (the relay sends one as it starts)

    def poke(self) -> None:
        """A tick, unless one is on its way: one at a time, so that mitmproxy, reading many at
        once after its client took the last piece, does not hand it many pieces in a row."""
        if not self.asked and self.feed.wake is not None:
            self.asked = True
            self.feed.wake()

    def __call__(self, data: bytes):
        self.calls += 1
        self.asked = False
        if self.cut:  # (it lagged: its end)
            out, self.cut, self.ended = self.cut + DONE, b"", True
            return out
        if self.ended:
            return []
        log = self.log
        start = self.at - log.base
        end = len(log.sse)
        if data and end - start > PIECE:  # (the body's end, b"": all of it, nothing is lost)
            cut = log.sse.find(b"\n\n", start + PIECE - 2)  # (whole events, the one across PIECE with them)
            end = cut + 2 if cut >= 0 else end
        new = bytes(log.sse[start:end])
        self.at += len(new)
        out = B.after(new, self.starting_after) if new else b""
        if self.at < log.size:
            self.poke()  # (the next piece: mitmproxy reads its tick once the client took this one)
        elif log.done:
            self.ended = True
            if log.refused is not None:  # (it has no events: its client got none)
                out += B.error_event(log.refused, self.starting_after + 1)
            out += DONE
            self.feed.end()
        return out or []

    def lagged(self, sequence_number: int) -> None:
        """Its client fell ``LAG`` behind: its stream ends with an ``error`` event, the log going on without it."""
        self.log = None
        self.cut = B.lagged(sequence_number, LAG)


@fails_closed
class Background:
    name = "resp2chat_background"

    def __init__(self, turns, store, relay) -> None:
        self.turns, self.store, self.relay = turns, store, relay
        self.runs: dict[str, Run] = {}  # running here, by response id
        # being queued here (``queue``'s first write in flight, before ``start``), by response id: the store
        # it goes to, and set once written (``left`` waits for it as for a run)
        self.queuing: dict[str, tuple[object, asyncio.Event]] = {}
        self.kept: OrderedDict[str, Log] = OrderedDict()  # ended here: their events (KEPT, KEPT_BYTES)
        self.kept_bytes = 0
        self.feeds: dict[str, Fed] = {}  # flows a Feed answers, by flow id
        self.following: dict[tuple[str, str], Log] = {}  # runs of other replicas streamed here, by (id, owner)

    @staticmethod
    def _log() -> Log:
        """A log of this gateway (a run's, a followed one's): a lagging feed is looked at again
        ``LAG_SECS`` later, on the loop's timer (``Log._drop``)."""
        return Log(later=asyncio.get_running_loop().call_later)

    # --- a background turn ------------------------------------------------------------------

    async def queue(self, turn) -> tuple[dict, object]:
        """A background turn, stored ``queued`` (before it starts: a poll finds it at once);
        returns that Response and the store it is in (its run's: ``start``). ``store_unavailable``
        when the store cannot take it."""
        queued, home = B.queued(turn.ctx), self.store.store
        # (a store ``state_store_url`` no longer names is not closed under this write: ``left``; its run joins
        # ``runs`` before ``left`` looks again: ``start`` follows this with no await between, HttpTurns)
        self.queuing[turn.ctx.response_id] = home, (written := asyncio.Event())
        try:  # (with its conversation: its input items are listed, and kept by a cancellation elsewhere, from now)
            kept = await self.store.put_now(turn.ctx.response_id, turn.items,
                                            B.running({**queued, B.PRIVATE: {"streamed": turn.client_stream}},
                                                      time.time()), owner=turn.owner, within=home)
        except StateUnavailable:
            raise store_unavailable("background") from None
        finally:
            del self.queuing[turn.ctx.response_id]
            written.set()
        if not kept:  # (it would be polled as unknown: never stored)
            raise GatewayError("background: this response's conversation is larger than the response store keeps "
                               "(max_session_memory_mb, max_sessions), and a background response is read from "
                               "there", param="input", code="conversation_too_large", status=413)
        return queued, home

    def start(self, run: TurnRun, home) -> Run:
        """Run ``run``'s turn (queued in the store ``home``) in the background, off any connection."""
        turn = run.turn
        bg = Run(turn.ctx.response_id, turn.owner, run, turn.client_stream, home, self._log())
        self.runs[bg.response_id] = bg
        bg.task = asyncio.ensure_future(self._run(bg))
        return bg

    async def _run(self, bg: Run) -> None:
        run, reader = bg.run, bg.run.reader
        # (created without stream, it is never streamed: its events are not kept, as a JSON turn's)
        add = bg.log.add if bg.streamed else lambda sse: None
        run.exchange.channel.push = lambda items: add(reader.apply_all(items))
        renew = asyncio.ensure_future(self._renew(bg))
        try:
            try:
                await self.relay.run(run.exchange)
            except asyncio.CancelledError:  # cancelled (or the gateway stops): the backend call is closed
                asyncio.current_task().uncancel()
                if bg.stopping == "shutdown":
                    add(reader.translator.fail(B.DEAD["code"], B.DEAD["message"]))
                elif bg.stopping == "too_large":
                    add(reader.translator.fail(B.TOO_LARGE["code"], B.TOO_LARGE["message"]))
                else:
                    add(reader.translator.cancel())
            except Exception as exc:  # noqa: BLE001 — a bug of ours: the turn still ends clearly
                log.warning(f"resp2chat: background {run.request_id} failed: {type(exc).__name__}: {exc}",
                            exc_info=exc)
                add(reader.apply(failure(502, "the gateway's relay failed", "server_error")))
            bg.calling = False
            # its end (held so far: conversations.Landing): what comes before its terminal event goes
            # now, the terminal event once it is stored (``_end``: it says what the store keeps)
            tail = reader.finish()
            cut = terminal_event(tail)
            add(tail[:cut])
            bg.terminal = tail[cut:]
        finally:
            bg.calling = False
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
        await self._end(bg)

    async def _renew(self, bg: Run) -> None:
        """Every ``RENEW_SECS`` while it runs: store its Response again (``in_progress``, a fresh
        lease, its output so far), over the version it wrote last (store.py ``renew``: its
        conversation is not read nor written again); another write there since (read back, the
        Response alone): a cancellation asked stops it, as its end stored there does (another
        replica took it for dead while this one stalled: as that replica answered it), else it
        is renewed over that one. A renewal larger than the store keeps ends it ``failed``
        (``B.TOO_LARGE``): kept running, it could not be stored, nor read as it ends."""
        private = {"streamed": bg.streamed}
        while True:
            try:
                t = bg.run.reader.translator  # (a running Response's own output is [], as its events carry it:
                # the items finished so far go with it here, what a GET, a cancellation elsewhere and the bound see)
                current = {**t.response(), "output": list(t.output), B.PRIVATE: private}
                renewal = await self.store.renew(bg.response_id, B.running(current, time.time()), owner=bg.owner,
                                                 expect=bg.version, within=bg.home)
                if renewal is None:  # deleted meanwhile (on another replica): it stops, and is not stored again
                    self.stop(bg, "deleted")
                    return
                if renewal.response is not None:  # (another write: as it is now)
                    if B.cancel_asked(renewal.response) or not B.is_running(renewal.response):
                        self.stop(bg, "cancel")
                        return
                    bg.version, private = renewal.version, renewal.response.get(B.PRIVATE) or {}
                    continue  # (renewed over it at once)
                if renewal.too_large:
                    log.warning(f"resp2chat: background {bg.response_id} stopped: its conversation and output "
                                "are larger than the response store keeps (max_session_memory_mb); it ends failed "
                                f"({B.TOO_LARGE['code']})")
                    self.stop(bg, "too_large")
                    return
                bg.version = renewal.version
            except StateUnavailable as exc:
                log.warning(f"resp2chat: background {bg.response_id}: {exc}")
            await asyncio.sleep(B.RENEW_SECS)

    def stop(self, bg: Run, why: str) -> None:
        if bg.calling and not bg.stopping and bg.task is not None and not bg.task.done():
            bg.stopping = why
            bg.task.cancel()

    async def _end(self, bg: Run) -> None:
        """It ended: stored as it ended (over the version it wrote last, or what is there: not if
        deleted meanwhile, nor once another replica ended it, ``_renew``), settled, its listeners
        told; its events kept here a while (those of a response stored so). Its terminal event
        (``bg.terminal``) reaches its client only then, and says what the store keeps: a client
        told ``completed`` finds it so (its stream and a poll agree). Larger than the store keeps
        with its events, it is stored without them (a resume is told they were not kept); larger
        without them, ``failed`` without its output (``B.too_large``), its client told
        ``response.failed`` instead of ``response.completed``."""
        run, t = bg.run, bg.run.reader.translator
        final = t.response()
        whole = bg.log.whole() if bg.streamed else None  # (None for a streamed one: its front went)
        events = whole + bg.terminal if whole is not None else None
        stored = B.ended(final, None) if not bg.streamed else B.ended(final, events or b"", whole=events is not None)
        elsewhere, shrunk, unkept = False, False, False
        try:
            # (its Response and output alone, as a renewal that ends it: store.py ``renew(…, ended=True)``, its
            # output indexed as a put's; its conversation, stored when it was queued, is neither encoded nor sent
            # again. Over what is there: a cancellation may have come in between)
            for _ in range(ENDING_TRIES):
                renewal = await self.store.renew(bg.response_id, stored, owner=bg.owner, expect=bg.version,
                                                 ended=True, within=bg.home)
                if renewal is None:  # (deleted meanwhile: not stored again)
                    break
                if renewal.renewed:
                    bg.version = renewal.version
                    break
                if renewal.response is not None:  # (another write: ended there, or a cancellation asked)
                    elsewhere = not B.is_running(renewal.response)
                    if elsewhere:
                        break
                elif B.stored_events(stored) is not None:  # (larger than it keeps)
                    log.warning(f"resp2chat: background {bg.response_id} with its events is larger than the response "
                                "store keeps (max_session_memory_mb): stored without them (a resume is told they "
                                "were not kept)")
                    stored, unkept = B.ended(final, b"", whole=False), True
                elif not shrunk:
                    if bg.stopping != "too_large":  # (else ``_renew`` said so)
                        log.warning(f"resp2chat: background {bg.response_id} is larger than the response store keeps "
                                    f"(max_session_memory_mb): stored failed ({B.TOO_LARGE['code']}), without its "
                                    "output")
                    stored, shrunk = B.too_large(stored), True
                    # (its client hears so: a completed one's end, never sent, becomes response.failed)
                    bg.terminal = bg.run.reader.fail_instead(B.TOO_LARGE["code"], B.TOO_LARGE["message"]) or bg.terminal
                bg.version = renewal.version
            else:
                log.warning(f"resp2chat: background {bg.response_id} not stored as it ended: it will read as failed")
        except StateUnavailable as exc:
            log.warning(f"resp2chat: background {bg.response_id} not stored: {exc}")
        finally:
            self.runs.pop(bg.response_id, None)
            if bg.streamed:
                bg.log.add(bg.terminal)
            if events is not None and len(events) <= B.MAX_EVENTS and not elsewhere and not shrunk and not unkept:
                self.keep(bg.response_id, bg.log)  # (as stored: its log is ``events``, its terminal event added)
            bg.log.end()
            bg.ended.set()
        # (what the client got: its events (those still here, when their front went), or the Response queued)
        answer = bytes(bg.log.sse) if bg.streamed else run.flow.response.content if run.flow.response else b""
        done, record = self.turns.settle(run, answer)
        run.flow.metadata.setdefault(META, {}).update(record)  # (the creating flow, for whoever still holds it)
        self.turns.ended(done, run.exchange.turn_id)

    def keep(self, response_id: str, ended: Log) -> None:
        """An ended run's log, kept here: the last ``KEPT``, ``KEPT_BYTES`` of them at most."""
        self.kept[response_id] = ended
        self.kept_bytes += len(ended.sse)
        while self.kept and (len(self.kept) > KEPT or self.kept_bytes > KEPT_BYTES):
            self.kept_bytes -= len(self.kept.popitem(last=False)[1].sse)

    async def left(self, store) -> None:
        """Until no run here lives in ``store``, nor is being queued there (one ``state_store_url`` no
        longer names: addons/store.py closes it then)."""
        while waits := [bg.ended for bg in self.runs.values() if bg.home is store] + \
                [written for home, written in self.queuing.values() if home is store]:
            await asyncio.gather(*(event.wait() for event in waits))

    async def done(self) -> None:
        """The gateway stops: what still runs ends ``failed`` (and is stored so), not in_progress;
        the followers of other replicas' runs stop."""
        for followed in list(self.following.values()):
            self._unfollow(followed)
        runs = list(self.runs.values())
        for bg in runs:
            self.stop(bg, "shutdown")
        await asyncio.gather(*(bg.ended.wait() for bg in runs), return_exceptions=True)

    # --- POST /v1/responses/{id}/cancel -----------------------------------------------------------

    async def cancel(self, response_id: str, owner: str) -> dict:
        """Cancel a background response (``GatewayError``: none such, or not a background one);
        returns it as it ended."""
        bg = self.runs.get(response_id)
        # (one queued in a store state_store_url no longer names is not in the one requests read: unknown, as a
        # GET of it says; it runs on to its end)
        if bg is not None and bg.owner == owner and bg.home is self.store.store:
            self.stop(bg, "cancel")
            await bg.ended.wait()
        deadline = time.monotonic() + CANCEL_WAIT
        while True:
            entry = await self.store.get(response_id, owner)
            if entry is None:
                raise B.not_found(response_id)
            response = entry["response"]
            if not response.get("background"):
                raise GatewayError("only a background response can be cancelled", param="response_id",
                                   code="invalid_value")
            now = time.time()
            if not B.is_running(response):
                return B.public(response)
            if B.is_dead(response, now) or time.monotonic() > deadline:  # nobody runs it: it ends here
                ended = B.cancelled_here(response)
                # (its Response alone, as a renewal that ends it: its output indexed as a put's, its
                # conversation neither encoded nor sent again)
                renewal = await self.store.renew(response_id, ended, owner=owner, expect=entry["version"], ended=True)
                if renewal is not None and renewal.too_large:  # (the store's bounds shrank since it ran)
                    ended = B.too_large(ended)
                    renewal = await self.store.renew(response_id, ended, owner=owner, expect=entry["version"],
                                                     ended=True)
                if renewal is not None and renewal.renewed:
                    return B.public(ended)
                # (another write came in between (a GET stored it failed, its run ended), or it is gone: read again)
            elif not B.cancel_asked(response):  # another replica runs it: asked there, at its next renewal
                # (its Response alone, as a renewal: the conversation is neither encoded nor sent again; another
                # write in between, or none there any more: read again)
                await self.store.renew(response_id, B.ask_cancel(response), owner=owner, expect=entry["version"])
            await self._until_changed(response_id, owner, deadline)

    async def _until_changed(self, response_id: str, owner: str, deadline: float) -> None:
        """Wait, for a cancellation of a response another replica runs, until there is something
        to do: it ended, died or is gone, no cancellation is asked of it (the ask lost to another
        write), or ``deadline`` (monotonic) passed. Every ``POLL`` its status alone is read (store.py
        ``status``: a few dozen bytes), not its entry (its conversation and output)."""
        while True:
            await asyncio.sleep(POLL)
            status = await self.store.status(response_id, owner)
            if status is None or not B.is_running(status) or B.is_dead(status, time.time()) or \
                    not B.cancel_asked(status) or time.monotonic() > deadline:
                return

    # --- GET /v1/responses/{id}?stream=true -----------------------------------------------------

    async def resume(self, flow: http.HTTPFlow, response_id: str, owner: str) -> None:
        """Stream a background response's events after ``starting_after`` (the flow is answered:
        a refusal, or a ``Feed``)."""
        with refused_on_failure(flow, f"GET {flow.request.path.split('?', 1)[0]}"):
            after = B.starting_after(flow.request.query)
            listing.include_query(flow.request.query)  # (a value the API does not define: a 400, as a GET's)
            bg = self.runs.get(response_id)
            source = bg.log if bg is not None and bg.owner == owner else None
            if source is not None and await self._deleted(response_id, owner):
                raise B.not_found(response_id)  # (deleted while it runs: gone, as for a GET)
            if source is not None and not bg.streamed:
                raise not_streamed()
            if source is not None and after < source.gone:  # (its events from there went: it runs on)
                raise B.not_kept()
            if source is None:
                entry = await self.store.get(response_id, owner)
                if entry is None:
                    raise B.not_found(response_id)
                response = entry["response"]
                if not response.get("background") or not (response.get(B.PRIVATE) or {}).get("streamed") and \
                        B.stored_events(response) is None:
                    raise not_streamed()
                kept, now = self.kept.get(response_id), time.time()
                if kept is None and (not B.is_running(response) or B.is_dead(response, now)) and \
                        B.stored_events(response) is None:
                    raise B.without_events(response_id, response, now)  # (not kept, or its replica died)
                source = kept if kept is not None else self._follow(response_id, owner, response)
        if flow.response is not None:
            return
        self.feed(flow, source, after)
        flow.metadata[META]["background_resume"] = True  # (its flow keeps none of the log: mitm_head.py ``_unkept``)

    async def _deleted(self, response_id: str, owner: str) -> bool:
        """Whether a run of this gateway was deleted (the store does not hold it: its status, not
        its entry, is read); the store unreachable: not known deleted (its log here has its events)."""
        try:
            return await self.store.status(response_id, owner) is None
        except StateUnavailable as exc:
            log.warning(f"resp2chat: resuming background {response_id} from this gateway's events: {exc}")
            return False

    def deleted(self, response_id: str, owner: str) -> None:
        """A background response was deleted (``DELETE /v1/responses/{id}``): its run here, if it
        runs here, stops (its backend call closed); one of another replica stops at its next
        renewal (``_renew``: the entry is gone)."""
        bg = self.runs.get(response_id)
        if bg is not None and bg.owner == owner:
            self.stop(bg, "deleted")

    def _follow(self, response_id: str, owner: str, response: dict) -> Log:
        """A log of a response that runs (or ran) on another replica: its events once it ends
        (the store holds them then). While it runs, one task per response polls the store for
        every client streaming it here (``following``); it stops when the run ends or the last
        of them goes (``_forget``)."""
        if not B.is_running(response):
            followed = self._log()
            followed.add(B.stored_events(response))
            followed.done = True
            return followed
        key = (response_id, owner)
        followed = self.following.get(key)
        if followed is None:
            followed = self.following[key] = self._log()
            followed.task = asyncio.ensure_future(self._poll(key, followed))
        return followed

    async def _poll(self, key: tuple[str, str], followed: Log) -> None:
        """Every ``POLL``: the followed response's status (store.py ``status``: not its entry),
        until it ended (or is dead, or gone); then its entry, once."""
        response_id, owner = key
        try:
            while True:
                await asyncio.sleep(POLL)
                status = await self.store.status(response_id, owner)
                if status is not None and B.is_running(status) and not B.is_dead(status, time.time()):
                    continue
                entry = await self.store.get(response_id, owner) if status is not None else None
                response, now = entry["response"] if entry else None, time.time()
                if response is None or not B.is_running(response) or B.is_dead(response, now):
                    events = B.stored_events(response) if response else None
                    if events is None:  # (deleted, dead, or its events not kept: as a request now is answered)
                        followed.refused = B.without_events(response_id, response, now)
                    followed.add(events or b"")
                    break
        except StateUnavailable as exc:
            log.warning(f"resp2chat: following background {response_id}: {exc}")
        finally:
            if self.following.get(key) is followed:
                del self.following[key]
            followed.end()

    def _unfollow(self, followed: Log) -> None:
        """Nobody streams ``followed`` here any more: its task stops (a client that comes later
        gets a follower of its own)."""
        for key, log_ in list(self.following.items()):
            if log_ is followed:
                del self.following[key]
        if followed.task is not None:
            followed.task.cancel()

    def feed(self, flow: http.HTTPFlow, source: Log, starting_after: int, headers: tuple = ()) -> None:
        """Answer ``flow`` with ``source``'s events after ``starting_after``, as they come: a
        relay ``Feed`` (the relay answers, ticking; ``responseheaders`` sets the stream callable,
        and ``headers``: the client's x-ratelimit-* when it creates the run, as any turn's head)."""
        feed = Feed(flow.id, secrets.token_urlsafe(24))
        stream = FeedStream(source, starting_after, feed)  # (an ended log: it ends the feed once it sent all of it)
        source.feeds[feed] = stream
        self.feeds[flow.id] = Fed(feed, stream, source, headers)
        req = flow.request
        for name, value in self.relay.expect(feed):
            req.headers[name] = value
        req.scheme, (req.host, req.port) = "http", self.relay.address
        flow.metadata.setdefault(META, {})["background_stream"] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        found = self.feeds.get(flow.id)
        if found is None or flow.response is None:
            return
        resp = flow.response
        resp.stream = found.stream
        resp.status_code, resp.reason = 200, "OK"
        for name in ("content-length", "content-encoding", "content-type", "transfer-encoding"):
            resp.headers.pop(name, None)
        resp.headers.update(SSE_HEADERS)
        resp.headers["x-request-id"] = request_id(flow)
        resp.headers.update(found.headers)
        if flow.request.http_version == "HTTP/1.1":
            resp.headers["transfer-encoding"] = "chunked"

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def _forget(self, flow: http.HTTPFlow) -> None:
        found = self.feeds.pop(flow.id, None)
        if found is not None:
            source = found.source
            source.feeds.pop(found.feed, None)
            self.relay.forget(flow.id)
            if not source.feeds and source.task is not None and not source.done:
                self._unfollow(source)


def not_streamed() -> GatewayError:
    return GatewayError("only a background response created with stream: true can be streamed again", param="stream",
                        code="invalid_value")
