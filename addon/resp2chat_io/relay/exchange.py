"""One turn as the relay runs it: one upstream call, or the rounds of a web-search loop.

An ``Exchange`` is made by the addon when it lowers a turn and claimed by the relay when
mitmproxy's request for it arrives (server.py). Everything it holds came from the gateway's own
configuration and the validated turn: the backend URL is never read from a request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h11

from resp2chat_core import websearch
from resp2chat_core.channel import Accepted, Channel, SearchDone, SearchStarted

from .upstream import Target, UpstreamClient


@dataclass(frozen=True)
class SearchSettings:
    """The web_search settings a turn runs with (settings.py names)."""

    brave_api_key: str
    brave_base_url: str
    brave_max_results: int
    max_web_search_rounds: int


@dataclass(eq=False)
class Exchange:
    turn_id: str  # the flow's id: names the exchange in mitmproxy's request to the relay
    secret: str  # per turn, random; mitmproxy's request must carry it (compared in constant time)
    target: Target  # the configured backend's chat completions URL
    channel: Channel = field(default_factory=Channel)
    search: SearchSettings | None = None  # the gateway runs this turn's web searches


async def run(ex: Exchange, client: UpstreamClient, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    ex.channel.event(Accepted())
    if ex.search is None:
        await client.call(ex.target, headers, body, ex.channel)
        return
    loop = websearch.SearchLoop(body, ex.search.max_web_search_rounds)
    while True:
        outcome = await client.call(ex.target, headers, loop.body, ex.channel, loop.feed)
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


async def _brave(client: UpstreamClient, s: SearchSettings, query: str) -> tuple[str, list[str]]:
    url, headers = websearch.brave_request(s.brave_base_url, s.brave_api_key, query, s.brave_max_results)
    try:
        status, body = await client.get(url, headers)
    except (OSError, asyncio.TimeoutError, h11.ProtocolError) as exc:
        return f"Web search failed: {type(exc).__name__}: {exc}", []
    return websearch.read_brave(query, status, body, s.brave_max_results, s.brave_api_key)
