"""One turn as the relay runs it: one upstream call, or the rounds of the server-side tool loop.

An ``Exchange`` is made by the addon when it starts a turn (``Turns.start``, for HTTP and the
Responses WebSocket alike) and run by the relay: an HTTP turn's as soon as every request hook
has run (server.py ``begin``), mitmproxy's request for it then claiming the run under way, or
awaited directly by a socket's turn. Everything it holds came from the gateway's
own configuration and the validated turn: the backend URLs, keys, bodies and headers are never
read from a request.

The turn's upstreams are one tuple of ``routing.Candidate``\\s, index 0 first, each with its own
URL, key, headers, timeouts and body. A candidate's failure before its first byte goes no
further than its ``Attempt`` while another candidate remains; the next one is called
(routing.py's rule). One walk of the candidates does this (``_walk``), for every call of a turn
that may fall back: a compaction round's summary request, and the answer's first round. Only
the first round of a tool loop falls back (later rounds follow what the client already has).
A call that answered commits its ``Attempt`` (its ``Rerouted`` goes) even if it passed nothing
on. The summary passes nothing on, so its ``Attempt`` holds a failure at any point of it: a
summary that fails midway (a silence; a cut, or a stream ended with neither a finish reason nor
[DONE], which ``_compact`` makes a 502 failure) falls back too, nothing of it having reached the
client. What its reader finds is no summary (``SummaryReader.failure``: the backend's error
object, garbage, a finish reason of failure, an event or an output past the bounds) is such a
failure too: it falls back while another candidate remains, and when the last fails too the turn
fails as an answer's would (``routing.all_failed``); so does a backend's ``context_length_exceeded``, as an answer's
does (routing.py ``falls_back``: the next may hold more). A compaction turn (Codex's trigger, the compact
endpoint) is that summary call alone: its answer is the item (``Summarized``).

The tool loop (resp2chat_core/toolloop.py: web search, hosted MCP tools) is decided in the core;
each round's answer goes through it (the call's reader, upstream.py ``Reader``: ``ToolLoop.feed``,
a stream; ``ToolLoop.whole``, a backend's whole JSON answer, ``stream`` ignored, read as its stream
would be), and here its steps run:
``_run_steps`` runs a round's steps (Brave searches, MCP listings and calls: mcp.py, over one
session per server for the whole turn: ``mcp.Sessions``) at once, at most
``PARALLEL_STEPS``, and tells the client through the channel (``SearchStarted``… ``McpCalled``)
in the order the model asked, whatever order they end in; while the client waits for them, a
``Keepalive`` every ``keepalive_secs`` (the upstream's), as during a backend's long prefill.
A turn without the gateway's tools makes no loop: one call, its bytes straight into the channel.

Server-side compaction (``Exchange.compaction``: compaction.py ``ServerCompaction``) is one round
before all that: the summary request (each candidate its own), through the walk as the answer's
call, read whole and never passed on (``SummaryReader``), its sealed item told to the client
(``Compacted``: output[0]; a backend's whole JSON answer to it, ``stream`` ignored, is read by
the same reader: its ``whole``, as the loop's); then every candidate's body is the answer round's (the compacted
conversation), and the turn runs as any other, its walk starting from the candidate that wrote
the summary (the ones before it failed a moment ago; it has just read the head of the prompt
the answer starts with: its KV cache holds it). The failures of both walks make one error when
every candidate failed (``routing.all_failed``), and the turn's record its ``skipped``. What
each summary call made its backend do, a failed one's too, is ``Exchange.compaction_work``
(compaction.py ``ServerCompaction.work``: what ``tpm`` spends besides the answer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import h11

from resp2chat_core import mcp, routing, websearch
from resp2chat_core.channel import (
    Accepted, Channel, Compacted, Keepalive, McpApproval, McpCalled, McpCalling, McpListed, McpListing, Oversized,
    Rerouted, SearchDone, SearchStarted, Stopped, Summarized, UpstreamFailed,
)
from resp2chat_core.compaction import NO_SEAL, NO_SUMMARY, ServerCompaction
from resp2chat_core.labels import shown
from resp2chat_core.routing import Candidate
from resp2chat_core.sse import MAX_EVENT
from resp2chat_core.toolloop import Finish, ToolLoop, Work

from . import mcp as mcp_client
from .upstream import CallEnd, TooLarge, UpstreamClient, failure

log = logging.getLogger("resp2chat.relay")
PARALLEL_STEPS = 4  # steps of one round (the model's calls, the prelude's listings) that run at once at most


@dataclass(frozen=True)
class SearchSettings:
    """The web_search settings a turn runs with (settings.py names)."""

    brave_api_key: str
    brave_base_url: str
    brave_max_results: int
    max_web_search_rounds: int


@dataclass(eq=False)
class Exchange:
    """A turn's upstream work: what the relay needs to run it, and what it learnt doing so."""

    turn_id: str  # names the exchange in mitmproxy's request to the relay (the HTTP flow's id)
    secret: str  # per turn, random; mitmproxy's request must carry it (compared in constant time)
    candidates: tuple[Candidate, ...]  # in the order they are tried: [0] first, the rest its fallbacks
    headers: tuple[tuple[bytes, bytes], ...] = ()  # what every candidate gets besides its own (the client's, affinity)
    channel: Channel = field(default_factory=Channel)
    search: SearchSettings | None = None  # the gateway runs this turn's web searches
    mcp: mcp.McpTurn | None = None  # the gateway runs this turn's hosted MCP tools (its servers, listings, approvals)
    max_mcp_rounds: int = 0  # rounds of MCP calls at most (max_mcp_rounds)
    max_tool_calls: int | None = None  # the request's: calls the tool loop runs at most, of all kinds together
    mcp_calls: list = field(default_factory=list)  # (server, outcome) of each MCP call run: metrics count them
    model: str = ""  # the client's model name, for the error naming every upstream tried
    max_event: int = MAX_EVENT  # the largest SSE event a backend may send (max_upstream_event_mb): web search reads it
    answered: int = 0  # the index of the candidate that answered (or failed last)
    skipped: list = field(default_factory=list)  # (name, status) of candidates that failed over
    aborted: bool = False  # the addon gave the turn up (``abort``)
    stop: Callable[[], None] | None = None  # set by the relay while it runs the exchange
    # its run, started by the relay before mitmproxy's request for it arrived (server.py ``begin``);
    # None: it starts when that request claims it
    task: asyncio.Future | None = None
    # awaited once the upstream work is over, before ``run`` returns (so before the relay's body
    # ends): a turn that names a conversation writes it there, before its client can see its end
    # (addons/turns.py ``Turns.land``); None: nothing to wait for
    ending: Callable[[], Awaitable[None]] | None = None
    # its upstream work while ``run`` runs it (the call, or the tool loop's rounds and steps): what
    # ``halt`` cancels; and the event the turn was halted with (None: it was not)
    work: asyncio.Task | None = None
    halted: Stopped | None = None
    # the tool loop of the candidate answering (or being asked), once its first round is sent: what
    # its rounds made the backend do (``ToolLoop.work``: what tpm spends); None: no loop
    loop: ToolLoop | None = None
    # server-side compaction: its round runs first (``_compact``); and what that round made the
    # backend do (tpm spends it besides the answer's; None: it did not run)
    compaction: ServerCompaction | None = None
    compaction_work: Work | None = None
    # (candidate index, body) of each chat request the turn's walks sent, in order, once it ran a
    # compaction round (the summary's, then the answer's first round; the request log writes them)
    sent: list = field(default_factory=list)

    def mcp_server(self, label: str) -> str:
        """The operator's name (mcp_servers label) of the server a request's label binds to."""
        found = next((s for s in self.mcp.servers if s.label == label), None) if self.mcp else None
        return found.spec.label if found else ""

    @property
    def answering(self) -> Candidate:
        """The candidate that answered the turn (or failed last; the first until one was called)."""
        return self.candidates[self.answered]

    def halt(self, event: Stopped) -> bool:
        """Stop the turn now, whichever transport carries it (addons/turns.py ``Turns.clients_changed``:
        its key was revoked): ``event`` goes into the channel, so the client's stream (or JSON
        body, or socket) ends with it, and the upstream work is cancelled (the backend call is
        closed, no further tool round or step runs); ``run`` then returns as after any end, so the
        transport finishes the turn as usual. One not running yet never calls a backend. False:
        nothing to stop (its upstream work is over, or it was halted already)."""
        if self.halted is not None or (self.work is not None and self.work.done()):
            return False
        self.halted = event
        self.channel.event(event)
        if self.work is not None:
            self.work.cancel()
        return True

    def abort(self) -> None:
        """The turn is given up (its flow failed closed before its answer began): the relay
        cancels the backend call and ends its body at once (server.py)."""
        self.aborted = True
        if self.stop is not None:
            self.stop()


def _loop(ex: Exchange, body: bytes) -> ToolLoop | None:
    """The tool loop of one candidate's rounds (None: the turn has none of the gateway's tools)."""
    kinds: list = []
    if ex.search is not None:
        kinds.append(websearch.WebSearchTools(ex.search.max_web_search_rounds))
    if ex.mcp is not None:
        kinds.append(mcp.McpTools(ex.mcp, ex.max_mcp_rounds))
    return ToolLoop(body, kinds, ex.max_event, ex.max_tool_calls) if kinds else None


async def run(ex: Exchange, client: UpstreamClient, window: float = 0.0) -> None:
    """Run the exchange's upstream work, its news going into its channel. ``window``: seconds
    between the channel's deliveries at least (``coalesce_ms``; channel.py says when news is
    held); the clock and timer are the loop's (``_Window``), and the timer is gone when this
    returns: what is held then goes at once (``Channel.flush``), so no tick follows the end of the
    relay's body."""
    channel = ex.channel
    timer = _Window(channel, window) if window > 0 else None
    try:
        if ex.halted is None:  # (halted before it ran: it never calls a backend)
            # (eager: up to its first wait now, as the relay begins a turn: server.py ``begin``)
            ex.work = asyncio.Task(_run(ex, client), loop=asyncio.get_running_loop(), eager_start=True)
            ex.work.add_done_callback(_retrieved)
            try:
                await ex.work
            except asyncio.CancelledError:
                if ex.halted is None or asyncio.current_task().cancelling():
                    raise  # (cancelled from outside: the client went away, the turn was given up)
                # halted (``Exchange.halt``): its event is in the channel; the turn ends as usual
    finally:
        if timer is not None:
            timer.close()
        channel.flush()
    if ex.ending is not None:
        await ex.ending()


def _retrieved(work: asyncio.Task) -> None:
    """A turn's work that failed as its run was being cancelled leaves no unretrieved exception
    (asyncio would log it as an ERROR); ``run`` raises it otherwise."""
    if not work.cancelled():
        work.exception()


class _Window:
    """The channel's clock and timer (``Channel.now``, ``later``, ``due``), and how the backend
    is read while a stream is faster than the window.

    A held delivery goes ``window`` after the last one, and whatever the backend sends meanwhile
    rides on it: there is no need to hear each token as it arrives. So once news is held, the
    backend's socket stops waking the loop for every read (``defer``: the kernel keeps the
    bytes), and the timer reads what is there (``drain``) just before the held delivery goes.
    While each drain finds news, the stream is still faster than the window: the timer stays
    armed one window after each delivery and the socket stays deferred, so a steady stream
    costs one loop wake-up per delivery instead of one per token. A drain that finds nothing
    ends it (``listen``): the next news wakes the loop at once again. Nothing waits longer than
    a window for it, the end of the answer included."""

    __slots__ = ("channel", "window", "loop", "handle", "held")

    def __init__(self, channel: Channel, window: float) -> None:
        self.channel, self.window = channel, window
        self.loop = asyncio.get_running_loop()
        self.handle: asyncio.TimerHandle | None = None
        self.held = False
        channel.window, channel.now, channel.later = window, self.loop.time, self.later

    def later(self, delay: float) -> None:
        """The channel holds news for ``delay`` seconds."""
        self.held = True
        if self.handle is None:
            self.handle = self.loop.call_later(delay, self._due)

    def _due(self) -> None:
        self.handle = None
        channel, reads = self.channel, self.channel.reads
        heard = reads is not None and reads.drain()  # (first: it rides on the held delivery)
        if self.held:
            self.held = False
            channel.due()
        if self.handle is not None or channel.later is None or reads is None or channel.reads is not reads:
            return  # (held again by what the drain brought; the run ended; no stream being read)
        if not reads.deferred:
            if not reads.defer():  # a held delivery went and the stream goes on: from now on, read per window
                return
        elif not heard:
            reads.listen()  # nothing came for a whole window: every read wakes the loop again
            return
        now = self.loop.time()
        at = channel.last + self.window  # a window after the delivery that just went…
        if at <= now:
            at = now + self.window  # …or from now, when none went (the last tick not taken yet: a slow client)
        self.handle = self.loop.call_at(at, self._due)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def _run(ex: Exchange, client: UpstreamClient) -> None:
    ex.channel.event(Accepted())
    if ex.search is None and ex.mcp is None:
        await _rounds(ex, client, None)
        return
    sessions = mcp_client.Sessions()  # (the turn's MCP sessions: closed when it ends, however it ends)
    try:
        await _rounds(ex, client, sessions)
    finally:
        sessions.close()


async def _rounds(ex: Exchange, client: UpstreamClient, sessions: mcp_client.Sessions | None) -> None:
    """The turn's upstream calls: one, or (``sessions``: a turn with the gateway's tools) the
    tool loop's rounds and steps; a compaction round before them (``_compact``)."""
    headers = list(ex.headers)
    failed: list[tuple[str, UpstreamFailed]] = []  # the candidates fallen back from (``_walk``), the summary's too
    if ex.compaction is not None and not await _compact(ex, client, headers, failed):
        return
    looped = sessions is not None
    prelude: list = []
    if looped:  # before round 1 (mcp: listings, approved calls), once for every candidate
        steps = _loop(ex, ex.candidates[0].body).prelude()
        prelude = await _run_steps(ex, client, steps, sessions) if steps else []
        if ex.channel.closed:
            return
    if len(ex.candidates) > 1:
        # (from the candidate that wrote the summary, when one did: ``_compact``)
        outcome, loop = await _first_answer(ex, client, headers, looped, prelude, ex.answered, failed)
    else:  # (straight into the channel: no Attempt to watch for a failure to fall back from)
        only = ex.candidates[0]
        loop = ex.loop = _loop(ex, only.body) if looped else None
        if loop is not None:
            loop.begin(prelude)
        body = loop.body if loop else only.body
        if ex.compaction is not None:
            ex.sent.append((0, body))
        outcome = await client.call(only, headers, body, ex.channel, loop)
    if loop is None:
        return
    to = ex.answering
    while True:
        if loop.oversized:  # (the call stopped reading at once: upstream.py)
            ex.channel.event(Oversized(loop.max_event))
            return
        if ex.channel.closed:
            return  # the client has the turn's end already: no more rounds
        tail, step = loop.end_round(outcome.answered)
        ex.channel.data(tail)
        if isinstance(step, Finish):
            ex.channel.data(step.tail)
            return
        texts = await _run_steps(ex, client, step, sessions)
        if ex.channel.closed:
            return
        end = loop.next_round(texts)
        if end is not None:  # (a call waits for the client's approval)
            ex.channel.data(end.tail)
            return
        outcome = await client.call(to, headers, loop.body, ex.channel, loop)


async def _compact(ex: Exchange, client: UpstreamClient, headers: list[tuple[bytes, bytes]],
                   failed: list[tuple[str, UpstreamFailed]]) -> bool:
    """The compaction round (compaction.py): the summary request, through the turn's one walk of
    its candidates (``_walk``: the first, then its fallbacks, as the answer), its summary sealed
    into the item the client hears first, every candidate's body then the answer round's; the
    answer then starts from the candidate that wrote the summary (``ex.answered``): those before
    it failed a moment ago, and it has just read the conversation's head the answer's prompt
    begins with. A compaction turn (``plan.answer`` None: Codex's trigger, the compact endpoint)
    is this round alone: its answer is the sealed item with the backend's usage (``Summarized``).
    False: the turn is over (its failure, or a compaction turn's answer, is in the channel)."""
    plan = ex.compaction
    reader = plan.reader(ex.max_event)
    calls: list = []  # (index, reader, failed) of each candidate's summary call: ``ServerCompaction.work``

    async def call(i: int, to: Candidate, attempt: routing.Attempt) -> CallEnd:
        nonlocal reader
        reader = plan.reader(ex.max_event, to.think)  # (a fresh one for each candidate: nothing of a failed one's)
        # (the summary streams to nobody: the client hears keepalives meanwhile, as while steps run;
        # a backend that ignored ``stream``: its whole JSON is the summary too, never the turn's answer)
        ex.sent.append((i, plan.summary(i)))
        task = asyncio.ensure_future(client.call(to, headers, plan.summary(i), attempt, reader))
        try:
            await _kept_alive(ex, task, to.keepalive)
        finally:
            task.cancel()
        outcome = task.result()
        reader.finish()
        if reader.failure is not None and attempt.failure is None:
            # what came is no summary (the backend's error object in its stream, garbage, a finish
            # reason of failure, an event or an output past the gateway's bounds): nothing of it
            # reached the client, so a failure before the turn's first output, as a cut (below)
            attempt.event(reader.failure)
        elif reader.failure is None and not reader.ended and attempt.failure is None and not ex.channel.closed:
            # (cut short: the backend closed midway, or its stream ended with neither a finish reason nor
            # [DONE], as an answer's would fail; a failure of the summary, as a silence, that falls back)
            attempt.event(failure(502, f"the upstream {to.name} cut the compaction summary short",
                                  "upstream_unavailable"))
        calls.append((i, reader, attempt.failure is not None or reader.failure is not None or not outcome.answered))
        return outcome

    outcome = await _walk(ex, 0, failed, call, "writing the compaction summary")
    ex.compaction_work = plan.work(calls)  # (a call that failed midway, fallen back from, spent tokens too)
    if outcome is None or ex.channel.closed:
        return False
    summary = reader.text()
    if not summary or plan.sealer is None:
        why = NO_SEAL if plan.sealer is None and summary else NO_SUMMARY
        ex.channel.event(failure(502, why, "server_error", "server_error"))
        return False
    if plan.answer is None:  # (a compaction turn: the summary is its answer)
        ex.channel.event(Summarized(plan.item(summary), reader.chat_usage, reader.sse))
        return False
    ex.channel.event(Compacted(plan.item(summary), reader.output_tokens(), reader.sse))
    bodies = plan.answer(summary)
    ex.candidates = tuple(dataclasses.replace(to, body=body or bodies[0])
                          for to, body in zip(ex.candidates, bodies))
    return True


async def _run_steps(ex: Exchange, client: UpstreamClient, steps: list, sessions: mcp_client.Sessions) -> list:
    """Run one round's steps (or the prelude's) at once, at most ``PARALLEL_STEPS``: each is
    told to the client as it starts, all in the order the model asked, and as it ends, in the
    same order (one that ends before an earlier one waits to be told): the items, the events and
    the turn's record come out the same whatever the timing. While the client waits, a
    ``Keepalive`` every ``keepalive`` seconds of the upstream's. Returns what the model reads
    of each (a listing: its tools, or None when it failed; an approval request: None)."""
    if ex.channel.closed:  # the client went away or the turn ended: nothing runs
        return [None] * len(steps)
    for step in steps:
        _started(ex, step)
    bound = asyncio.Semaphore(PARALLEL_STEPS)
    tasks = [asyncio.ensure_future(_bounded(bound, _step(ex, client, sessions, step))) for step in steps]
    every = ex.answering.keepalive
    out: list = []
    try:
        for step, task in zip(steps, tasks):
            await _kept_alive(ex, task, every)
            out.append(_ended(ex, step, task.result()))
    finally:
        for task in tasks:  # (the turn was cancelled, or a step failed: the others stop)
            task.cancel()
            task.add_done_callback(mcp_client.retrieve)
    return out


async def _kept_alive(ex: Exchange, task: asyncio.Future, every: float) -> None:
    """Wait for ``task``, the client told every ``every`` seconds that the turn is alive."""
    while not task.done():
        await asyncio.wait((task,), timeout=every if every != float("inf") else None)
        if not task.done():
            ex.channel.event(Keepalive())  # (a data event: Codex's idle timer ignores SSE comments)


async def _bounded(bound: asyncio.Semaphore, work):
    async with bound:
        return await work


def _started(ex: Exchange, step) -> None:
    """A step begins: its item opens (an approval request is whole at once)."""
    if isinstance(step, websearch.Search):
        ex.channel.event(SearchStarted(step.call_id, step.query, step.refused is not None))
    elif isinstance(step, mcp.ListTools):
        ex.channel.event(McpListing(step.server.label))
    elif isinstance(step, mcp.Call):
        ex.channel.event(McpCalling(step.call_id, step.label, step.name, step.arguments, step.approval_request_id))
    elif isinstance(step, mcp.Approve):
        ex.channel.event(McpApproval(step.label, step.name, step.arguments))
        ex.mcp_calls.append((ex.mcp_server(step.label), "approval_requested"))
    else:
        raise AssertionError(f"no runner for {step!r}")


async def _step(ex: Exchange, client: UpstreamClient, sessions: mcp_client.Sessions, step):
    """Run one step: what it found (``_ended`` tells it)."""
    if isinstance(step, websearch.Search):
        return (step.refused, []) if step.refused is not None else await _brave(client, ex.search, step.query)
    if isinstance(step, mcp.ListTools):
        return await mcp_client.list_tools(step.server, sessions)
    if isinstance(step, mcp.Call):
        if step.server is None or step.refused is not None:
            return None, {"type": "mcp_protocol_error", "code": -32602, "message": step.refused
                          or f"this request has no mcp tool with server_label {step.label!r}"}
        return await mcp_client.call_tool(step.server, step.name, step.arguments, sessions)
    return None  # (an approval request: nothing runs)


def _ended(ex: Exchange, step, found):
    """A step ended: its item closes; what the model reads of it."""
    if isinstance(step, websearch.Search):
        text, sources = found
        ex.channel.event(SearchDone(step.call_id, tuple(sources), step.refused is not None))
        return text
    if isinstance(step, mcp.ListTools):
        tools, error = found
        if error is not None:
            log.warning(f"resp2chat: listing the tools of MCP server {step.server.spec.label} failed: {shown(error)}")
        ex.channel.event(McpListed(step.server.label, _json(list(tools or ())), error))
        return tools
    if isinstance(step, mcp.Call):
        output, error = found
        outcome = "completed" if error is None else "timeout" if error.get("code") == mcp_client.TIMED_OUT \
            else "failed"
        ex.mcp_calls.append((step.server.spec.label if step.server else "", outcome))
        ex.channel.event(McpCalled(step.call_id, output, _json(error) if error is not None else None))
        return mcp.result_text(output, error)
    return None


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


async def _first_answer(ex: Exchange, client: UpstreamClient, headers: list[tuple[bytes, bytes]], looped: bool,
                        prelude: list, start: int, failed: list) -> tuple[CallEnd, ToolLoop | None]:
    """The answer's call, through the candidates from ``start`` on (``_walk``); returns the
    outcome and the tool loop of the one that answered (a turn with the gateway's tools only)."""

    async def call(i: int, to: Candidate, attempt: routing.Attempt) -> CallEnd:
        loop = ex.loop = _loop(ex, to.body) if looped else None  # (its think tags, its tools)
        if loop is not None:
            loop.begin(prelude)
        body = loop.body if loop else to.body
        if ex.compaction is not None:
            ex.sent.append((i, body))
        # (an answer that ends empty, with another candidate after it: a failure before the first byte)
        return await client.call(to, headers, body, attempt, loop, fall_back=i < len(ex.candidates) - 1)

    outcome = await _walk(ex, start, failed, call, "before its first byte")
    return outcome or CallEnd.BROKEN, ex.loop


async def _walk(ex: Exchange, start: int, failed: list[tuple[str, UpstreamFailed]],
                call: Callable[[int, Candidate, routing.Attempt], Awaitable[CallEnd]], when: str) -> CallEnd | None:
    """The turn's one walk of its candidates, for every backend call that may fall back (the
    summary's, the answer's first round): from ``start`` on, in order, each called through an
    ``Attempt`` (``call(index, candidate, attempt)``), until one answers (routing.py's rule:
    ``falls_back``, before its first byte; the summary's, at any point of it: it passes nothing
    on). The one that answered is committed (``Attempt.release``: its ``Rerouted`` goes before
    anything the caller tells the client next). ``failed``: (name, failure) of the candidates fallen
    back from in this turn, this walk's added: when the last fails too, one failure names them
    all, with the shortest Retry-After (``routing.all_failed``). ``when``: the log's words for
    when a candidate fallen back from failed ("before its first byte"). Returns the outcome of the one
    that answered (``ex.answered``: its index); None: the turn failed (its failure is in the
    channel)."""
    last = len(ex.candidates) - 1
    for i in range(start, last + 1):
        to = ex.candidates[i]
        attempt = routing.Attempt(ex.channel, (Rerouted(to.think, i),) if i else ())
        ex.answered = i
        outcome = await call(i, to, attempt)
        failure = attempt.failure
        if failure is None:
            attempt.release()  # (one that passed nothing on, the summary: its Rerouted goes now)
            return outcome
        if routing.falls_back(failure) and i < last:
            failed.append((to.name, failure))
            ex.skipped.append((to.name, failure.status))
            refused = " refused the gateway's key: check its api_key;" if routing.kind(failure) == "refused_key" else ""
            log.warning(f"resp2chat: upstream {to.name} failed {when} (HTTP {failure.status}):{refused} "
                        f"trying {ex.candidates[i + 1].name} for model {ex.model!r}")
            continue
        if failed and routing.falls_back(failure):
            failure = routing.all_failed(ex.model, failed + [(to.name, failure)])
        ex.channel.event(failure)
        return None
    raise AssertionError("not reached")


async def _brave(client: UpstreamClient, s: SearchSettings, query: str) -> tuple[str, list[str]]:
    url, headers = websearch.brave_request(s.brave_base_url, s.brave_api_key, query, s.brave_max_results)
    try:
        status, body = await client.get(url, headers)
    except (OSError, asyncio.TimeoutError, h11.ProtocolError, TooLarge) as exc:
        return f"Web search failed: {type(exc).__name__}: {exc}", []
    return websearch.read_brave(query, status, body, s.brave_max_results, s.brave_api_key)
