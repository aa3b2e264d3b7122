"""One turn as the relay runs it: one upstream call, or the rounds of a web-search loop.

An ``Exchange`` is made by the addon when it starts a turn (``Turns.start``, for HTTP and the
Responses WebSocket alike) and run by the relay: claimed when mitmproxy's request for it arrives
(server.py), or awaited directly by a socket's turn. Everything it holds came from the gateway's
own configuration and the validated turn: the backend URLs, keys, bodies and headers are never
read from a request.

The turn's upstreams are one tuple of ``routing.Candidate``\\s, index 0 first, each with its own
URL, key, headers, timeouts and body. A candidate's failure before its first byte goes no
further than its ``Attempt`` while another candidate remains; the next one is called
(routing.py's rule). Only the first round of a web-search loop falls back (later rounds follow
what the client already has).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import h11

from resp2chat_core import routing, websearch
from resp2chat_core.channel import Accepted, Channel, Oversized, Rerouted, SearchDone, SearchStarted
from resp2chat_core.routing import Candidate
from resp2chat_core.sse import MAX_EVENT

from .upstream import CallEnd, UpstreamClient

log = logging.getLogger("resp2chat.relay")


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
    model: str = ""  # the client's model name, for the error naming every upstream tried
    max_event: int = MAX_EVENT  # the largest SSE event a backend may send (max_upstream_event_mb): web search reads it
    answered: int = 0  # the index of the candidate that answered (or failed last)
    skipped: list = field(default_factory=list)  # (name, status) of candidates that failed over
    aborted: bool = False  # the addon gave the turn up (``abort``)
    stop: Callable[[], None] | None = None  # set by the relay while it runs the exchange

    @property
    def answering(self) -> Candidate:
        """The candidate that answered the turn (or failed last; the first until one was called)."""
        return self.candidates[self.answered]

    def abort(self) -> None:
        """The turn is given up (its flow failed closed before its answer began): the relay
        cancels the backend call and ends its body at once (server.py)."""
        self.aborted = True
        if self.stop is not None:
            self.stop()


async def run(ex: Exchange, client: UpstreamClient, window: float = 0.0) -> None:
    """Run the exchange's upstream work, its news going into its channel. ``window``: seconds
    between the channel's deliveries at least (``coalesce_ms``; channel.py says when news is
    held); the clock and timer are the loop's, and the timer is gone when this returns: what is
    held then goes at once (``Channel.flush``), so no tick follows the end of the relay's body."""
    channel = ex.channel
    timer: list[asyncio.TimerHandle] = []
    if window > 0:
        loop = asyncio.get_running_loop()
        channel.window, channel.now = window, loop.time
        channel.later = lambda delay: timer.append(loop.call_later(delay, _due, channel, timer))
    try:
        await _run(ex, client)
    finally:
        for handle in timer:
            handle.cancel()
        channel.flush()


def _due(channel: Channel, timer: list) -> None:
    timer.clear()
    channel.due()


async def _run(ex: Exchange, client: UpstreamClient) -> None:
    ex.channel.event(Accepted())
    rounds = ex.search.max_web_search_rounds if ex.search is not None else None
    headers = list(ex.headers)
    if len(ex.candidates) > 1:
        outcome, loop = await _first_answer(ex, client, headers, rounds)
    else:  # (straight into the channel: no Attempt to watch for a failure to fall back from)
        only = ex.candidates[0]
        loop = websearch.SearchLoop(only.body, rounds, ex.max_event) if rounds is not None else None
        outcome = await client.call(only, headers, loop.body if loop else only.body, ex.channel,
                                    loop.feed if loop else None)
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
        if isinstance(step, websearch.Finish):
            ex.channel.data(step.tail)
            return
        texts = []
        for search in step:
            ex.channel.event(SearchStarted(search.call_id, search.query))
            text, sources = await _brave(client, ex.search, search.query)
            texts.append(text)
            ex.channel.event(SearchDone(search.call_id, tuple(sources)))
        loop.next_round(texts)
        outcome = await client.call(to, headers, loop.body, ex.channel, loop.feed)


async def _first_answer(ex: Exchange, client: UpstreamClient, headers: list[tuple[bytes, bytes]],
                        search_rounds: int | None) -> tuple[CallEnd, websearch.SearchLoop | None]:
    """Call the candidates in order until one answers (routing.py's rule); returns the outcome
    and the search loop of the one that answered (web search only)."""
    failed: list[tuple[str, object]] = []
    last = len(ex.candidates) - 1
    for i, to in enumerate(ex.candidates):
        attempt = routing.Attempt(ex.channel, (Rerouted(to.think, i),) if i else ())  # (its think tags, its tools)
        loop = websearch.SearchLoop(to.body, search_rounds, ex.max_event) if search_rounds is not None else None
        ex.answered = i
        outcome = await client.call(to, headers, loop.body if loop else to.body, attempt, loop.feed if loop else None)
        failure = attempt.failure
        if failure is None:
            return outcome, loop
        if routing.falls_back(failure) and i < last:
            failed.append((to.name, failure))
            ex.skipped.append((to.name, failure.status))
            log.warning(f"resp2chat: upstream {to.name} failed before its first byte (HTTP {failure.status}): "
                        f"trying {ex.candidates[i + 1].name} for model {ex.model!r}")
            continue
        if failed and routing.falls_back(failure):
            failure = routing.all_failed(ex.model, failed + [(to.name, failure)])
        ex.channel.event(failure)
        return CallEnd.BROKEN, loop
    raise AssertionError("not reached")


async def _brave(client: UpstreamClient, s: SearchSettings, query: str) -> tuple[str, list[str]]:
    url, headers = websearch.brave_request(s.brave_base_url, s.brave_api_key, query, s.brave_max_results)
    try:
        status, body = await client.get(url, headers)
    except (OSError, asyncio.TimeoutError, h11.ProtocolError) as exc:
        return f"Web search failed: {type(exc).__name__}: {exc}", []
    return websearch.read_brave(query, status, body, s.brave_max_results, s.brave_api_key)
