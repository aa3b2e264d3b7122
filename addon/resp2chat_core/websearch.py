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
from dataclasses import dataclass, field
from urllib.parse import urlencode

from .sse import MAX_EVENT, SSEParser
from .usage import find_usage

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
    return b"data: " + _dumps(obj).encode() + b"\n\n"


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
        self._filter = RoundFilter(SSEParser(max_event))
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
        self._filter = RoundFilter(SSEParser(self.max_event))
        if not ok or not result.done:
            # A failed or cut round: let the translator see how it ended (its finish reason if it
            # had one; else nothing, and the translator reports the stream as cut short).
            return tail, Finish(final_chunks(result.finish_reason, []) if result.finish_reason else b"")
        if result.usage:
            self._usages.append(result.usage)
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


@dataclass
class RoundFilter:
    _parser: SSEParser = field(default_factory=SSEParser)
    _calls: dict = field(default_factory=dict)  # index -> {"id", "name", "arguments"}
    _content: list = field(default_factory=list)
    _reasoning: list = field(default_factory=list)
    _finish: str | None = None
    _usage: dict | None = None
    _done: bool = False

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._payload(p) for p in self._parser.feed(data))

    @property
    def oversized(self) -> bool:
        """An event of the round's stream outgrew the parser's bound (sse.py)."""
        return self._parser.oversized

    def finish(self) -> tuple[bytes, RoundResult]:
        tail = b"".join(self._payload(p) for p in self._parser.finish())
        calls = [self._calls[k] for k in sorted(self._calls, key=str)]
        searches = []
        for c in calls:
            if c["name"] == NAME:
                try:
                    query = json.loads(c["arguments"] or "{}").get("query", "")
                except (ValueError, AttributeError):
                    query = c["arguments"]
                searches.append(Search(c["id"], str(query)))
        message: dict = {"role": "assistant", "content": "".join(self._content) or None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"] or "{}"}} for c in calls]
        return tail, RoundResult(searches, any(c["name"] != NAME for c in calls), self._finish,
                                 self._usage, message, self._done or self._finish is not None)

    def _payload(self, payload: str) -> bytes:
        if payload == "[DONE]":
            self._done = True
            return b""
        try:
            chunk = json.loads(payload)
        except ValueError:
            return b"data: " + payload.encode() + b"\n\n"  # not ours to judge: the translator will
        if not isinstance(chunk, dict) or "error" in chunk or not isinstance(chunk.get("choices", []), list):
            return b"data: " + payload.encode() + b"\n\n"
        changed = False
        usage = find_usage(chunk)
        if usage is not None:
            self._usage = usage
            chunk.pop("usage", None)
            chunk.pop("x_groq", None)
            changed = True
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self._content.append(delta["content"])
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str):
                self._reasoning.append(reasoning)
            calls = delta.get("tool_calls")
            if isinstance(calls, list) and calls:
                kept = [c for pos, c in enumerate(calls) if isinstance(c, dict) and not self._is_search(pos, c)]
                if len(kept) != len(calls):
                    changed = True
                    if kept:
                        delta["tool_calls"] = kept
                    else:
                        delta.pop("tool_calls")
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                choice["finish_reason"] = None
                changed = True
        if not changed:
            return b"data: " + payload.encode() + b"\n\n"
        if not chunk.get("choices") or all(not (c.get("delta") or {}) for c in chunk["choices"] if isinstance(c, dict)):
            return b""  # nothing left to say
        return _event(chunk)

    def _is_search(self, pos: int, call: dict) -> bool:
        key = call.get("index", call.get("id") or pos)
        fn = call.get("function") or {}
        entry = self._calls.get(key)
        if entry is None:
            entry = self._calls[key] = {"id": call.get("id") or f"call_ws_{len(self._calls)}",
                                        "name": fn.get("name") or "", "arguments": ""}
        elif fn.get("name") and not entry["name"]:
            entry["name"] = fn["name"]
        args = fn.get("arguments")
        if isinstance(args, dict):
            args = json.dumps(args)
        if isinstance(args, str):
            entry["arguments"] += args
        return entry["name"] == NAME


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
    """What closes the combined stream: the last finish reason, one usage, [DONE]."""
    out = _event({"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason or "stop"}]})
    if usages:
        last = dict(usages[-1])
        completion = sum(u.get("completion_tokens") or 0 for u in usages if isinstance(u, dict))
        last["completion_tokens"] = completion
        last["total_tokens"] = (last.get("prompt_tokens") or 0) + completion
        out += _event({"object": "chat.completion.chunk", "choices": [], "usage": last})
    return out + b"data: [DONE]\n\n"


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
