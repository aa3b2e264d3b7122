"""Web search run by the gateway: one tool kind of the server-side tool loop, sans I/O.

When ``brave_api_key`` is set, a client's ``web_search`` tool is offered to the model as the
function ``web_search(query)`` (``TOOL``). When the model calls it, the gateway searches and asks
the model again with the results, up to ``max_web_search_rounds`` rounds, and the client sees
one continuous stream in which each search is a ``web_search_call`` item. The loop, its round
filter and how the stream stays one are toolloop.py's, shared with hosted MCP tools (mcp.py).

Rules of this file:
- Sans-I/O: ``WebSearchTools`` (the kind) turns the model's call into a ``Search`` step; the relay
  (resp2chat_io/relay/exchange.py) does the HTTP. ``brave_request`` and ``read_brave`` are the
  two ends of a Brave Search call; what the model reads of it is ``read_brave``'s text (a failed
  search too: a failure is text the model can read, not a failed turn).

Theory of operation::

    round 1 ──▶ model calls web_search(q…) ──▶ Search(q…) ──▶ results as tool messages ──▶ round 2 …
       │                                                                        (the last round has
       └── no search, or the model also called client tools ──▶ Finish        no web_search tool)
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from .sse import MAX_EVENT
from .toolloop import ToolLoop, rounds_of

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


@dataclass(frozen=True)
class Search:
    call_id: str
    query: str
    refused: str | None = None  # a call past a spent bound (``refuse``): why; no search runs, its item fails


class WebSearchTools:
    """The loop's web_search kind for one turn (toolloop.py)."""

    name = NAME

    def __init__(self, max_rounds: int):
        self.max_rounds = max_rounds
        self.rounds = 0

    @staticmethod
    def owns(name: str) -> bool:
        return name == NAME

    @staticmethod
    def function_names() -> set[str]:
        return {NAME}

    def refuse(self, call_id: str, name: str, arguments: str, bound: str) -> Search:
        """A call the model made once ``bound`` (``max_tool_calls``, ``max_web_search_rounds``) was
        spent, its function no longer offered: a ``Search`` refused with why, a failed
        ``web_search_call`` that searches nothing (never a function_call of a function the client
        did not declare); the turn ends after its round unless another call of it ran (toolloop.py)."""
        why = ("Not run: this response's max_tool_calls was reached, and the model searched the web anyway"
               if bound == "max_tool_calls" else
               f"Not run: the {rounds_of(self.max_rounds)} of web searches this gateway runs in one response "
               f"(max_web_search_rounds) were spent, and the model searched the web anyway")
        return Search(call_id, self.step(call_id, name, arguments).query, refused=why)

    @staticmethod
    def step(call_id: str, name: str, arguments: str) -> Search:
        """The model's call: its arguments' ``query`` (none, or null: no query; not a string: its
        JSON); arguments that are no JSON object (or nested deeper than the decoder goes) are the
        query as they are."""
        try:
            args = json.loads(arguments or "{}")
        except (ValueError, RecursionError):
            args = None
        if not isinstance(args, dict):
            return Search(call_id, arguments)
        query = args.get("query")
        return Search(call_id, query if isinstance(query, str) else "" if query is None
                      else json.dumps(query, ensure_ascii=False))


def SearchLoop(body: bytes, max_rounds: int, max_event: int = MAX_EVENT,  # noqa: N802
               max_calls: int | None = None) -> ToolLoop:
    """A tool loop whose only kind is web search."""
    return ToolLoop(body, [WebSearchTools(max_rounds)], max_event, max_calls)


# --- Brave Search ----------------------------------------------------------------------------


def brave_request(base_url: str, api_key: str, query: str, count: int) -> tuple[str, list[tuple[bytes, bytes]]]:
    """(URL, headers) of one Brave Search call."""
    url = base_url.rstrip("/") + "/res/v1/web/search?" + urlencode({"q": query, "count": count})
    return url, [(b"accept", b"application/json"), (b"x-subscription-token", api_key.encode())]


Source = tuple[str, str]  # a result the model read: (URL, title)


def read_brave(query: str, status: int, body: bytes, limit: int, api_key: str) -> tuple[str, list[Source]]:
    """A Brave answer -> (text for the model, its sources). A failure is text the model can
    read, not a failed turn."""
    if status != 200:
        message = body.decode("utf-8", "replace")[:300]
        if api_key:
            message = message.replace(api_key, "[redacted]")
        return f"Web search failed (HTTP {status}): {message}", []
    try:
        data = json.loads(body)
    except ValueError as exc:
        return f"Web search failed: the answer is not JSON: {exc}", []
    except RecursionError:
        return "Web search failed: the answer is JSON nested too deeply", []
    return format_results(query, data, limit)


_TAG = re.compile(r"<[^>]+>")


def _plain(value) -> str:
    """A result's title or snippet: its tags out, its entities decoded ("" for one that is no string)."""
    return html.unescape(_TAG.sub("", value)) if isinstance(value, str) else ""


def format_results(query: str, data, limit: int) -> tuple[str, list[Source]]:
    """Brave Search JSON -> (tool message text, sources: (URL, title) each). An answer of
    another shape is read as far as it is one: a ``web.results`` that is no list is none, a
    result that is no object is left out, and so is a field that is no string (a result without
    a URL is no source)."""
    web = data.get("web") if isinstance(data, dict) else None
    results = web.get("results") if isinstance(web, dict) else None
    results = [r for r in results if isinstance(r, dict)][:limit] if isinstance(results, list) else []
    if not results:
        return f"No web results for: {query}", []
    lines, urls = [f"Web search results for: {query}", ""], []
    for i, r in enumerate(results, 1):
        url = r.get("url") if isinstance(r.get("url"), str) else ""
        title = _plain(r.get("title"))
        if url:
            urls.append((url, title))
        lines += [f"{i}. {title}", f"   {url}", f"   {_plain(r.get('description'))}"]
    return "\n".join(lines), urls


# --- the client's events ---------------------------------------------------------------------


def call_item(item_id: str, query: str, sources: tuple[Source, ...] | None = None, failed: bool = False) -> dict:
    """The ``web_search_call`` item: in progress (no sources yet), completed, or failed (a call
    the gateway refused: no search ran)."""
    action: dict = {"type": "search", "query": query}
    if sources is None or failed:
        status = "failed" if failed else "in_progress"
        return {"id": item_id, "type": "web_search_call", "status": status, "action": action}
    action["sources"] = [{"type": "url", "url": url} for url, _ in sources]
    return {"id": item_id, "type": "web_search_call", "status": "completed", "action": action}


_URL_GOES_ON = re.compile(r"[A-Za-z0-9/_~%?#=&+@-]")  # (a URL's next character: the text names a longer one)
ANNOTATION_EVENT = "response.output_text.annotation.added"


def citations(text: str, sources: dict[str, str]) -> list[dict]:
    """The ``url_citation`` annotations of a message's text: each place it names a source's URL
    as a whole (not the start of a longer one; a sentence's full stop after it is no part of
    it), with that source's title, in text order. ``sources``: URL -> title, of every search
    the turn ran before; indices count the text's characters."""
    found: list[tuple[int, int, str]] = []
    taken: set[int] = set()
    for url in sorted(sources, key=len, reverse=True):  # (a longer URL first: a shorter one inside is no citation)
        at = text.find(url)
        while at != -1:
            end = at + len(url)
            if at not in taken and not (end < len(text) and _URL_GOES_ON.match(text, end)):
                found.append((at, end, url))
                taken.update(range(at, end))
            at = text.find(url, end)
    return [{"type": "url_citation", "start_index": a, "end_index": b, "url": url, "title": sources[url]}
            for a, b, url in sorted(found)]


STARTED_EVENTS = ("response.web_search_call.in_progress", "response.web_search_call.searching")
DONE_EVENT = "response.web_search_call.completed"
