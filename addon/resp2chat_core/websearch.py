"""Web search run by the gateway: the tool, the loop and its events, sans I/O.

When ``brave_api_key`` is set, a client's ``web_search`` tool is offered to the model as the
function ``web_search(query)`` (``TOOL``). When the model calls it, the gateway searches and asks
the model again with the results, up to ``max_web_search_rounds`` rounds, and the client sees
one continuous stream in which each search is a ``web_search_call`` item.

Rules of this file:
- Sans-I/O: ``SearchLoop`` says *what* to do next (``Search`` these queries, or ``Finish``);
  the relay (resp2chat_io/relay/exchange.py) does the HTTP. ``brave_request`` and
  ``read_brave`` are the two ends of a Brave Search call.
- The client's stream stays one stream: within a round ``RoundFilter`` passes on everything the
  model says *except* its ``web_search`` calls, and holds back what would end the stream (the
  finish reason, usage and ``[DONE]``) until the loop knows whether another round follows.
- The filter reads the backend's chunks through ``chatstream.ChunkReader``, the reader the
  translator uses, so both see the same calls, choices and usage. A chunk it holds nothing of
  goes on byte for byte; one it does goes on re-encoded from the reader's deltas without the
  held parts (``chatstream.wire_call`` writes a call so that it reads back under its own key),
  and the translator reads that as it would have read the original.

Theory of operation::

    round 1 ──▶ model calls web_search(q…) ──▶ Search(q…) ──▶ results as tool messages ──▶ round 2 …
       │                                                                        (the last round has
       └── no search, or the model also called client tools ──▶ Finish        no web_search tool)

Usage of the combined turn: the last round's prompt (it holds every earlier round: the context
the turn used) plus every round's completion tokens.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from .chatstream import ChunkReader, wire_call
from .sse import MAX_EVENT

NAME = "web_search"  # the function offered to the model
PARAMETERS = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "What to search the web for."}},
    "required": ["query"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {
    "name": NAME, "description": "Search the web. Returns the top results: title, URL and a snippet each.",
    "parameters": PARAMETERS}}

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _event(obj) -> bytes:
    # (backslashreplace: a lone surrogate, from a backend's "\ud800" escape, goes out as that escape)
    return b"data: " + _dumps(obj).encode("utf-8", "backslashreplace") + b"\n\n"


def _data(payload: str) -> bytes:
    """One event that carries ``payload`` as its data (one ``data:`` line per line of it)."""
    data = payload.encode()
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"data: " + data + b"\n\n"


# --- the loop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    call_id: str
    query: str


@dataclass(frozen=True)
class Finish:
    tail: bytes  # what closes the client's combined stream (finish reason, usage, [DONE])


@dataclass
class RoundResult:
    searches: list[Search]
    client_calls: bool  # the model also called tools the client runs
    finish_reason: str | None
    usage: dict | None
    assistant: dict  # the round's assistant message (for the next round's history)
    done: bool  # the round ended properly ([DONE] or a finish reason)


class SearchLoop:
    """One turn's rounds. Per round: ``body`` is the chat request to send, ``feed`` filters the
    backend's stream, ``end_round(ok)`` says what comes next; after ``Search`` steps the
    caller runs the searches and hands their texts to ``next_round``. A round whose stream
    holds an SSE event larger than ``max_event`` bytes is refused: ``feed`` returns None from
    then on and ``oversized`` is true (the caller stops reading and fails the turn)."""

    def __init__(self, body: bytes, max_rounds: int, max_event: int = MAX_EVENT):
        self.body = body
        self.max_rounds = max_rounds
        self.max_event = max_event
        self.rounds = 0
        self._chat: dict | None = None
        self._filter = RoundFilter(max_event)
        self._usages: list[dict] = []
        self._result: RoundResult | None = None

    def feed(self, data: bytes) -> bytes | None:
        out = self._filter.feed(data)
        return None if self._filter.oversized else out

    @property
    def oversized(self) -> bool:
        return self._filter.oversized

    def end_round(self, ok: bool) -> tuple[bytes, Finish | list[Search]]:
        """(bytes still to pass on from this round, the next step). ``ok``: the backend
        answered 200 and its stream ended properly."""
        tail, result = self._filter.finish()
        self._filter = RoundFilter(self.max_event)
        if result.usage:
            self._usages.append(result.usage)
        if not ok or not result.done:
            # A failed or cut round: let the translator see how it ended (its finish reason if it
            # had one; else none, and the translator reports the stream as cut short) and the
            # usage so far.
            return tail, Finish(final_chunks(result.finish_reason, self._usages) if result.finish_reason
                                else usage_chunk(self._usages))
        if not result.searches or result.client_calls:
            # Nothing to search, or the client has tool calls to run first: the turn ends here.
            return tail, Finish(final_chunks(result.finish_reason, self._usages))
        self._result = result
        return tail, result.searches

    def next_round(self, texts: list[str]) -> None:
        """The searches of the last ``end_round`` ran: ``texts[i]`` answers ``searches[i]``."""
        result, self._result = self._result, None
        self.rounds += 1
        if self._chat is None:
            self._chat = json.loads(self.body)
        self._chat = next_request(self._chat, result.assistant,
                                  [(s.call_id, text) for s, text in zip(result.searches, texts)],
                                  self.rounds >= self.max_rounds)
        self.body = _dumps(self._chat).encode()


_REASONING, _TEXT, _TOOL = range(3)  # the order a delta is read in (chatstream.ChunkReader._delta)


class RoundFilter:
    """One round's backend stream in, what the translator may see of it out (a chatstream sink)."""

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._reader = ChunkReader(self, max_event)
        self._out: list[bytes] = []
        self._held = False  # the payload being read has something held back: re-encode it
        self._pieces: list = []  # its deltas, in order, flat: kind, value, kind, value, …
        self._whole = False  # reading a body that held no SSE event
        self._passthrough = False  # … and it is an error or garbage: the translator reads it as it is
        self._calls: dict = {}  # call key -> [id, name, argument pieces]
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._finish: str | None = None
        self._usage: dict | None = None
        self._done = False

    def feed(self, data: bytes) -> bytes:
        for payload in self._reader.parser.feed(data):
            self._payload(payload)
        return self._flush()

    @property
    def oversized(self) -> bool:
        """An event of the round's stream outgrew the parser's bound (sse.py)."""
        return self._reader.parser.oversized

    def finish(self) -> tuple[bytes, RoundResult]:
        for payload in self._reader.parser.finish():
            self._payload(payload)
        self._whole, self._held = True, False
        self._pieces.clear()
        body = self._reader.unread()
        if body is not None:
            if self._passthrough:
                self._out.append(body + b"\n")  # the same stray lines: the translator reads them whole too
            elif self._pieces:
                self._out.append(self._encode())
        calls = list(self._calls.values())
        searches = []
        for call_id, name, pieces in calls:
            if name == NAME:
                args = "".join(pieces)
                try:
                    query = json.loads(args or "{}").get("query", "")
                except (ValueError, AttributeError):
                    query = args
                searches.append(Search(call_id, str(query)))
        message: dict = {"role": "assistant", "content": "".join(self._content) or None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        message["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": "".join(pieces) or "{}"}}
                                 for call_id, name, pieces in calls]
        return self._flush(), RoundResult(searches, any(c[1] != NAME for c in calls), self._finish,
                                          self._usage, message, self._done or self._finish is not None)

    def _payload(self, payload: str) -> None:
        self._held = False
        if self._pieces:
            self._pieces.clear()
        self._reader.payload(payload)
        if not self._held:
            self._out.append(_data(payload))  # as the backend sent it
        elif self._pieces:
            self._out.append(self._encode())  # what is left of it

    def _encode(self) -> bytes:
        """The payload's deltas (without what is held back) as one chunk that reads back as the
        same deltas in the same order: a new choice (index 0 too) where a delta cannot hold the
        next piece after the last."""
        choices: list[dict] = []
        delta: dict = {}
        rank = _TOOL + 1
        pieces = self._pieces
        for i in range(0, len(pieces), 2):
            kind, value = pieces[i], pieces[i + 1]
            if kind < rank or (kind == rank and kind != _TOOL):
                delta = {}
                choices.append({"index": 0, "delta": delta})
            rank = kind
            if kind == _REASONING:
                delta["reasoning_content"] = value
            elif kind == _TEXT:
                delta["content"] = value
            else:
                delta.setdefault("tool_calls", []).append(value)
        return _event({"object": "chat.completion.chunk", "choices": choices})

    def _flush(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # --- chatstream.Sink ---------------------------------------------------------------------

    def on_start(self) -> None:
        pass

    def on_reasoning(self, text: str) -> None:
        self._reasoning.append(text)
        self._pieces += (_REASONING, text)

    def on_text(self, text: str) -> None:
        self._content.append(text)
        self._pieces += (_TEXT, text)

    def on_tool(self, key, call_id: str | None, name: str | None, args: str | None) -> None:
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = [call_id or f"call_ws_{len(self._calls)}", name or "", []]
        elif name and not call[1]:
            call[1] = name
        if args:
            call[2].append(args)
        if call[1] == NAME:
            self._held = True  # the gateway runs it: the client never sees it
        else:
            self._pieces += (_TOOL, wire_call(key, call_id, name, args))

    def on_logprobs(self, entries: list) -> None:
        pass  # (what tokens the text is made of: nothing to do here)

    def on_finish(self, reason: str) -> None:
        self._finish = reason
        self._held = True

    def on_usage(self, usage: dict) -> None:
        self._usage = usage
        self._held = True

    def on_error(self, body: bytes) -> None:
        self._passthrough = self._whole  # (an event goes on as it is: not held)

    def on_garbage(self, text: str, what: str) -> None:
        self._passthrough = self._whole

    def on_done(self) -> None:
        self._done = True
        self._held = True


def next_request(chat: dict, assistant: dict, results: list[tuple[str, str]], last_round: bool) -> dict:
    """The chat request for the next round: history + the model's calls + the search results."""
    messages = list(chat["messages"]) + [assistant] + [
        {"role": "tool", "tool_call_id": call_id, "content": text} for call_id, text in results]
    nxt = {**chat, "messages": messages}
    if last_round:  # no more searches: the model must answer with what it has
        tools = [t for t in chat.get("tools") or () if t.get("function", {}).get("name") != NAME]
        if tools:
            nxt["tools"] = tools
        else:
            nxt.pop("tools", None)
            nxt.pop("tool_choice", None)
            nxt.pop("parallel_tool_calls", None)
    return nxt


def final_chunks(finish_reason: str | None, usages: list[dict]) -> bytes:
    """What closes the combined stream: the last finish reason, one usage, [DONE]. The usage
    rides on the finish chunk (read before its finish reason, so a turn that fails there still
    reports it) and in a usage chunk of its own after it, as an ``include_usage`` stream ends."""
    finish = {"object": "chat.completion.chunk",
              "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason or "stop"}]}
    usage = _combined(usages)
    if usage is None:
        return _event(finish) + b"data: [DONE]\n\n"
    return _event({**finish, "usage": usage}) + usage_chunk(usages) + b"data: [DONE]\n\n"


def usage_chunk(usages: list[dict]) -> bytes:
    """The turn's usage as a chunk of its own (b"" for none)."""
    usage = _combined(usages)
    return b"" if usage is None else _event({"object": "chat.completion.chunk", "choices": [], "usage": usage})


def _combined(usages: list[dict]) -> dict | None:
    """One usage for the rounds: the backend's own for one round; for several, the last
    round's prompt (it holds every earlier round: the context the turn used) plus every
    round's completion tokens."""
    if len(usages) <= 1:
        return usages[0] if usages else None
    last = dict(usages[-1])
    completion = sum(u.get("completion_tokens") or 0 for u in usages if isinstance(u, dict))
    last["completion_tokens"] = completion
    last["total_tokens"] = (last.get("prompt_tokens") or 0) + completion
    return last


# --- Brave Search ----------------------------------------------------------------------------


def brave_request(base_url: str, api_key: str, query: str, count: int) -> tuple[str, list[tuple[bytes, bytes]]]:
    """(URL, headers) of one Brave Search call."""
    url = base_url.rstrip("/") + "/res/v1/web/search?" + urlencode({"q": query, "count": count})
    return url, [(b"accept", b"application/json"), (b"x-subscription-token", api_key.encode())]


def read_brave(query: str, status: int, body: bytes, limit: int, api_key: str) -> tuple[str, list[str]]:
    """A Brave answer -> (text for the model, source URLs). A failure is text the model can read,
    not a failed turn."""
    if status != 200:
        message = body.decode("utf-8", "replace")[:300]
        if api_key:
            message = message.replace(api_key, "[redacted]")
        return f"Web search failed (HTTP {status}): {message}", []
    try:
        data = json.loads(body)
    except ValueError as exc:
        return f"Web search failed: the answer is not JSON: {exc}", []
    return format_results(query, data, limit)


_TAG = re.compile(r"<[^>]+>")


def format_results(query: str, data: dict, limit: int) -> tuple[str, list[str]]:
    """Brave Search JSON -> (tool message text, source URLs)."""
    results = ((data.get("web") or {}).get("results") or [])[:limit] if isinstance(data, dict) else []
    if not results:
        return f"No web results for: {query}", []
    lines, urls = [f"Web search results for: {query}", ""], []
    for i, r in enumerate(results, 1):
        title = html.unescape(_TAG.sub("", str(r.get("title", ""))))
        snippet = html.unescape(_TAG.sub("", str(r.get("description", ""))))
        url = str(r.get("url", ""))
        urls.append(url)
        lines += [f"{i}. {title}", f"   {url}", f"   {snippet}"]
    return "\n".join(lines), urls


# --- the client's events ---------------------------------------------------------------------


def call_item(item_id: str, query: str, sources: tuple[str, ...] | None = None) -> dict:
    """The ``web_search_call`` item: in progress (no sources yet) or completed."""
    action: dict = {"type": "search", "query": query}
    if sources is None:
        return {"id": item_id, "type": "web_search_call", "status": "in_progress", "action": action}
    action["sources"] = [{"type": "url", "url": u} for u in sources if isinstance(u, str)]
    return {"id": item_id, "type": "web_search_call", "status": "completed", "action": action}


STARTED_EVENTS = ("response.web_search_call.in_progress", "response.web_search_call.searching")
DONE_EVENT = "response.web_search_call.completed"
