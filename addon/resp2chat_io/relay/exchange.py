"""One turn as the relay runs it: one upstream call, or the rounds of a web-search loop.

An ``Exchange`` is made by the addon when it lowers a turn and claimed by the relay when
mitmproxy's request for it arrives (server.py). Everything it holds came from the gateway's own
configuration and the validated turn: the backend URL is never read from a request.

Several upstreams (resp2chat_core/routing.py): the exchange also holds the model's fallbacks,
each with its own URL, key and body. A candidate's failure before its first byte goes no
further than its ``Attempt`` while another candidate remains; the next one is called. Only the
first round of a web-search loop falls back (later rounds follow what the client already has).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import h11

from resp2chat_core import routing, websearch
from resp2chat_core.channel import Accepted, Channel, Oversized, Rerouted, SearchDone, SearchStarted
from resp2chat_core.sse import MAX_EVENT

from .upstream import Outcome, Target, UpstreamClient

log = logging.getLogger("resp2chat.relay")


@dataclass(frozen=True)
class SearchSettings:
    """The web_search settings a turn runs with (settings.py names)."""

    brave_api_key: str
    brave_base_url: str
    brave_max_results: int
    max_web_search_rounds: int


@dataclass(frozen=True)
class Fallback:
    """A later upstream for this turn's model (routing.py), from the gateway's configuration."""

    name: str
    target: Target  # its chat completions URL
    authorization: bytes | None  # its Authorization header value (None: none is sent)
    body: bytes | None  # its own lowering of the turn (None: the same bytes as the first's)
    think: str  # how its <think> tags are read


@dataclass(eq=False)
class Exchange:
    turn_id: str  # the flow's id: names the exchange in mitmproxy's request to the relay
    secret: str  # per turn, random; mitmproxy's request must carry it (compared in constant time)
    target: Target  # the configured backend's chat completions URL
    channel: Channel = field(default_factory=Channel)
    search: SearchSettings | None = None  # the gateway runs this turn's web searches
    upstream: str = ""  # the first upstream's name (routing.py; "default" with one upstream)
    model: str = ""  # the client's model name, for the error naming every upstream tried
    think: str = "auto"  # the first upstream's think mode (a fallback's may differ)
    fallbacks: tuple[Fallback, ...] = ()
    answered: int = 0  # which candidate answered (or failed last): 0 the first, i the i-th fallback
    skipped: list = field(default_factory=list)  # (name, status) of candidates that failed over
    max_event: int = MAX_EVENT  # the largest SSE event a backend may send (max_upstream_event_mb): web search reads it
    aborted: bool = False  # the addon gave the turn up (``abort``)
    stop: Callable[[], None] | None = None  # set by the relay while it runs the exchange

    def abort(self) -> None:
        """The turn is given up (its flow failed closed before its answer began): the relay
        cancels the backend call and ends its body at once (server.py)."""
        self.aborted = True
        if self.stop is not None:
            self.stop()


async def run(ex: Exchange, client: UpstreamClient, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    ex.channel.event(Accepted())
    rounds = ex.search.max_web_search_rounds if ex.search is not None else None
    if ex.fallbacks:
        outcome, target, headers, loop = await _first_answer(ex, client, headers, body, rounds)
    else:  # (straight into the channel: no Attempt to watch for a failure to fall back from)
        target = ex.target
        loop = websearch.SearchLoop(body, rounds, ex.max_event) if rounds is not None else None
        outcome = await client.call(target, headers, loop.body if loop else body, ex.channel,
                                    loop.feed if loop else None)
    if loop is None:
        return
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
        outcome = await client.call(target, headers, loop.body, ex.channel, loop.feed)


async def _first_answer(ex: Exchange, client: UpstreamClient, headers: list[tuple[bytes, bytes]], body: bytes,
                        search_rounds: int | None):
    """Call the candidates in order until one answers (routing.py's rule); returns the outcome,
    the target and headers that went to the one that answered, and its search loop (web search
    only)."""
    failed: list[tuple[str, object]] = []
    candidates = [(ex.upstream, ex.target, None, body, ex.think)] + [
        (f.name, f.target, f.authorization, f.body if f.body is not None else body, f.think) for f in ex.fallbacks]
    for i, (name, target, auth, cbody, think) in enumerate(candidates):
        last = i == len(candidates) - 1
        sent = headers if i == 0 else _with_authorization(headers, auth)
        attempt = routing.Attempt(ex.channel, (Rerouted(think, i),) if i else ())  # (its think tags, its tools)
        loop = websearch.SearchLoop(cbody, search_rounds, ex.max_event) if search_rounds is not None else None
        ex.answered = i
        outcome = await client.call(target, sent, loop.body if loop else cbody, attempt, loop.feed if loop else None)
        failure = attempt.failure
        if failure is None:
            return outcome, target, sent, loop
        if routing.falls_back(failure) and not last:
            failed.append((name, failure))
            ex.skipped.append((name, failure.status))
            log.warning(f"resp2chat: upstream {name} failed before its first byte (HTTP {failure.status}): "
                        f"trying {candidates[i + 1][0]} for model {ex.model!r}")
            continue
        if failed and routing.falls_back(failure):
            failure = routing.all_failed(ex.model, failed + [(name, failure)])
        ex.channel.event(failure)
        return Outcome.BROKEN, target, sent, loop
    raise AssertionError("not reached")


def _with_authorization(headers: list[tuple[bytes, bytes]], value: bytes | None) -> list[tuple[bytes, bytes]]:
    out = [(n, v) for n, v in headers if n.lower() != b"authorization"]
    return out + [(b"authorization", value)] if value else out


async def _brave(client: UpstreamClient, s: SearchSettings, query: str) -> tuple[str, list[str]]:
    url, headers = websearch.brave_request(s.brave_base_url, s.brave_api_key, query, s.brave_max_results)
    try:
        status, body = await client.get(url, headers)
    except (OSError, asyncio.TimeoutError, h11.ProtocolError) as exc:
        return f"Web search failed: {type(exc).__name__}: {exc}", []
    return websearch.read_brave(query, status, body, s.brave_max_results, s.brave_api_key)
