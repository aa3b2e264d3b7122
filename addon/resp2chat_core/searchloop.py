"""The gateway-side web-search loop, sans I/O: filter one upstream round, build the next.

When the gateway runs ``web_search`` itself, one client turn may take several upstream rounds:
the model calls ``web_search``, the gateway searches, appends the results as tool messages and
asks again. The client must see one continuous stream: so within a round ``RoundFilter``
forwards everything the model says *except* the ``web_search`` calls (the client gets
``web_search_call`` items instead), and holds back what would end the stream — the finish
reason, usage and ``[DONE]`` — until the loop knows whether another round follows.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field

from .sse import SSEParser
from .toolmap import WEB_SEARCH_NAME
from .usage import find_usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _event(obj) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


@dataclass
class RoundResult:
    searches: list[dict]  # [{"id", "query", "arguments"}]
    client_calls: bool  # the model also called tools the client runs
    finish_reason: str | None
    usage: dict | None
    assistant: dict  # the round's assistant message (for the next round's history)
    done: bool  # the round ended properly ([DONE] or a finish reason)


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

    def finish(self) -> tuple[bytes, RoundResult]:
        tail = b"".join(self._payload(p) for p in self._parser.finish())
        calls = [self._calls[k] for k in sorted(self._calls, key=str)]
        searches = []
        for c in calls:
            if c["name"] == WEB_SEARCH_NAME:
                try:
                    query = json.loads(c["arguments"] or "{}").get("query", "")
                except (ValueError, AttributeError):
                    query = c["arguments"]
                searches.append({"id": c["id"], "query": str(query), "arguments": c["arguments"] or "{}"})
        message: dict = {"role": "assistant", "content": "".join(self._content) or None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"] or "{}"}} for c in calls]
        return tail, RoundResult(searches, any(c["name"] != WEB_SEARCH_NAME for c in calls), self._finish,
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
        return entry["name"] == WEB_SEARCH_NAME


def next_request(chat: dict, assistant: dict, results: list[tuple[str, str]], last_round: bool) -> dict:
    """The chat request for the next round: history + the model's calls + the search results."""
    messages = list(chat["messages"]) + [assistant] + [
        {"role": "tool", "tool_call_id": call_id, "content": text} for call_id, text in results]
    nxt = {**chat, "messages": messages}
    if last_round:  # no more searches: the model must answer with what it has
        tools = [t for t in chat.get("tools") or () if t.get("function", {}).get("name") != WEB_SEARCH_NAME]
        if tools:
            nxt["tools"] = tools
        else:
            nxt.pop("tools", None)
            nxt.pop("tool_choice", None)
            nxt.pop("parallel_tool_calls", None)
    return nxt


def final_chunks(finish_reason: str | None, usages: list[dict]) -> bytes:
    """What closes the combined stream: the last finish reason, one usage, [DONE].

    Usage: the last round's prompt (it holds every earlier round: that is the context the turn
    used), and the completion tokens of all rounds.
    """
    out = _event({"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason or "stop"}]})
    if usages:
        last = dict(usages[-1])
        completion = sum(u.get("completion_tokens") or 0 for u in usages if isinstance(u, dict))
        last["completion_tokens"] = completion
        last["total_tokens"] = (last.get("prompt_tokens") or 0) + completion
        out += _event({"object": "chat.completion.chunk", "choices": [], "usage": last})
    return out + b"data: [DONE]\n\n"


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
