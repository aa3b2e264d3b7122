"""Stream translator: chat-completions SSE bytes in, Responses SSE bytes out.

Rules of this file:
- Sans-I/O. ``feed(bytes) -> bytes`` and ``finish() -> bytes`` are the whole interface; the
  caller owns sockets, threads and timers. Nothing here imports mitmproxy.
- Total. Every input, however broken, ends in exactly one terminal event (``response.completed``,
  ``response.incomplete`` or ``response.failed``; ``response.cancelled`` for a background
  response its client cancelled: ``cancel``) and nothing after it; before it, every item the
  stream opened is closed (``_cut``: the final Response's output is the items closed, whatever
  the end), but for tool calls a failure or a cancellation cut (a client would run them).
  ``feed`` never raises for bad upstream data (a raise inside mitmproxy's stream callable hangs
  the client).
- Hot path. ``feed`` runs once per socket read: plain dicts, string-built delta events, one
  ``bytes`` result per call, no pydantic, no re-parsing of earlier bytes.

Theory of operation
-------------------
Upstream chunks carry deltas of four kinds: reasoning, text, refusal, and tool calls (by ``index``). The
Responses stream wants *items*: a reasoning item, a message item, one item per tool call, each
opened (``output_item.added``), filled (delta events) and closed (``output_item.done``), in
output order. So the translator keeps at most one *open kind* of item. A delta of the open kind
extends it; a delta of another kind closes what is open and opens its own item. Tool calls are
the one kind that can hold several items open at once (parallel calls stream by index, and a
backend may interleave them), all closed together when another kind or the end arrives.

A refusal (the backend's ``refusal``: OpenAI's Chat Completions API says one there, not in
``content``) is a message item too, whose content part is ``{"type": "refusal", "refusal"}``,
streamed as ``response.refusal.delta``/``.done``: what the Responses API answers when a model
refuses.

Two state machines, both as tables:

``_PHASES`` — the response as a whole::

    WAITING ──first event──▶ STREAMING ──finish_reason──▶ FINISHING ──[DONE] / end──▶ DONE
       │                        │  ▲ deltas                   │ usage, stray deltas
       └─────── error payload / end of stream / garbage ──────┴────────────▶ DONE (failed)

``_ITEM_TRANSITIONS`` — what an incoming delta does to the open item (below).

Text and reasoning that are only whitespace do not open an item (Qwen-style models emit
"\\n\\n" between thinking and a tool call or the answer); if real text of the same kind follows,
they are prepended to it. An item's text never starts with a line break, wherever the backend
cut it (indentation stays, blank lines go): a streamed answer and the same answer whole read the
same (tests/test_answer_forms.py).

Reading the backend
-------------------
What a backend's chunk says is chatstream.py's: the one reader of chat streams (shared with the
web-search round filter and the contentview) owns every chunk-shape rule, from ``[DONE]`` and
error objects to tool-call keys and usage, and calls this translator's ``on_*`` methods with
normalized deltas. What they become is decided here:

- ``<think>…</think>`` inside text: ``think.ThinkSplitter`` turns the tags into reasoning
  deltas, tags split across chunks included, as the upstream's think mode says (``TurnContext
  .think``; ``rethink`` when a fallback answers). It costs nothing once the think block is over.
- Logprobs (asked for: ``TurnContext.logprobs``): the reader hands a choice's over right before
  its text, so they go on the next text delta (text held back, blank or a possible tag, takes
  them along); what another kind of delta, or the gateway's own item (a search, an MCP call:
  ``_own_item``), finds left is no text's and goes. A content delta
  that ends inside a think block, or right after its closing tag, was no answer text: its
  logprobs go too (``_NO_TEXT_YET``).
- Tool calls: one item per call key; arguments that come before the call's name are held until
  it comes; arguments are normalized once, at the end (``_function_arguments``).
- Endings: ``[DONE]``; or a finish_reason and then the end of the body (no ``[DONE]``: Ollama
  forks, some proxies); ``length``/``max_tokens``/``model_length`` -> ``response.incomplete``
  (the item the model was writing closes ``incomplete``: the spec's item states);
  ``error``/``abort``/``insufficient_system_resource`` -> ``response.failed``. Neither a
  finish_reason nor ``[DONE]`` before the body ends -> ``response.failed`` (cut short); the
  message or reasoning a failure (or a cancellation) stops closes ``incomplete`` as well, a tool
  call it stops stays unclosed (``_cut``), and so does what the output bound stops
  (``_outgrown``: closing it would repeat what is too large).
- Beginnings: ``response.created`` and ``response.in_progress``; a background response
  (``TurnContext.queued``) is created ``queued`` (``response.queued``) before it is in progress.
- Errors in a 200 stream (an error object, an error body served as ``text/event-stream``) ->
  ``response.failed`` with the code Codex acts on (errors.py); a payload or body that cannot be
  read -> ``server_error``, its text for the operator only. A backend's error with a wait
  (``Retry-After``, any code): the error's message ends "Please try again in Ns." and its
  ``headers`` carry ``retry-after``/``retry-after-ms`` (at most ``MAX_TOLD_WAIT``), the two
  places Codex reads a wait in a stream whose HTTP head has gone (limits.py). Those ``headers``
  are the event's alone: the Response object (``response``: stored, a GET's) has the schema's
  ``code`` and ``message``.
- Usage: the backend's last usage object, converted when a Response shows it (usage.py) and
  kept as the backend gave it (``answer_usage``); the client's (``usage``) adds a compaction
  round's summary tokens to it (server-side compaction: compaction.py).

Stateless reasoning: when the request asked for ``include: ["reasoning.encrypted_content"]``
(``TurnContext.encrypted_reasoning``; Codex always does), each reasoning item also carries its
text sealed by ``TurnContext.sealer`` (seal.py, purpose ``reasoning``); inputs.py reads it back
when the client returns the item, so the backend re-reads exactly the reasoning it produced.

The gateway's own events
------------------------
What the gateway itself has to say about a turn never comes through ``feed``: the relay hands it
over as calls (resp2chat_core/channel.py), so no backend can speak for the gateway: ``accepted``
(``response.created`` at once), ``keepalive`` (a ``response.in_progress`` data event while the
backend is silent), ``fail_upstream`` (the backend's HTTP error, or a connect/stall failure ->
``response.failed``), ``translate_json`` (a backend that answered a stream request with one JSON
body), ``search_started``/``search_done`` (a web search the gateway runs: a ``web_search_call``
item, see websearch.py), ``mcp_listing``/``mcp_listed``, ``mcp_calling``/``mcp_called`` and
``mcp_approval`` (hosted MCP tools the gateway runs: ``mcp_list_tools``, ``mcp_call`` and
``mcp_approval_request`` items, see mcp.py), ``compacted`` (server-side compaction's sealed
``compaction`` item, before the answer: compaction.py), ``oversized`` (the relay saw the backend send an SSE event past
``max_upstream_event_mb``; the translator's own parser sees it otherwise: sse.py). A backend chunk shaped like anything else is just an unknown chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from math import isfinite as _isfinite
from enum import Enum
from typing import Callable

from . import mcp, response, websearch
from .chatstream import NOT_OBJECT, ChunkReader
from .errors import gateway_failure, response_error, sanitize, upstream_failure, withheld
from .inputs import REASONING_PURPOSE
from .jsonstring import InputStream
from .limits import MAX_TOLD_WAIT, retry_headers, retry_phrase, retry_seconds
from .seal import Sealer
from .sse import MAX_EVENT
from .think import AFTER, BREAK, REASONING, THINK, THINK_LEAD, WATCH, ThinkSplitter
from .toolmap import ToolMap
from .usage import to_responses_usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dumps_str = json.encoder.encode_basestring  # what _dumps does for a str, without the call around it
_loads = json.loads


class Phase(Enum):
    WAITING = "waiting"  # nothing sent to the client yet
    STREAMING = "streaming"  # response.created sent; deltas flowing
    FINISHING = "finishing"  # finish_reason seen; items closed; waiting for usage / [DONE]
    DONE = "done"  # terminal event sent; everything else is ignored


# (phase, what happened) -> next phase. Anything not listed is ignored in that phase.
_PHASES = {
    (Phase.WAITING, "chunk"): Phase.STREAMING,
    (Phase.WAITING, "finish_reason"): Phase.FINISHING,
    (Phase.WAITING, "done"): Phase.DONE,  # [DONE] with no answer: an empty, completed response
    (Phase.WAITING, "fail"): Phase.DONE,
    (Phase.STREAMING, "chunk"): Phase.STREAMING,
    (Phase.STREAMING, "finish_reason"): Phase.FINISHING,
    (Phase.STREAMING, "done"): Phase.DONE,
    (Phase.STREAMING, "fail"): Phase.DONE,
    (Phase.FINISHING, "chunk"): Phase.FINISHING,
    (Phase.FINISHING, "finish_reason"): Phase.FINISHING,
    (Phase.FINISHING, "done"): Phase.DONE,
    (Phase.FINISHING, "fail"): Phase.DONE,
}


_RUNNING = ("in_progress", "queued")  # a Response's statuses before it ends (no output, usage, error yet)


class Kind(Enum):
    NONE = "none"
    REASONING = "reasoning"
    TEXT = "text"
    REFUSAL = "refusal"
    TOOL = "tool"


# (open kind, incoming delta kind) -> action. "extend": feed the open item(s);
# "switch": close everything open, then open an item for the incoming kind.
_ITEM_TRANSITIONS = {
    (Kind.NONE, Kind.REASONING): "switch",
    (Kind.NONE, Kind.TEXT): "switch",
    (Kind.NONE, Kind.REFUSAL): "switch",
    (Kind.NONE, Kind.TOOL): "switch",
    (Kind.REASONING, Kind.REASONING): "extend",
    (Kind.REASONING, Kind.TEXT): "switch",
    (Kind.REASONING, Kind.REFUSAL): "switch",
    (Kind.REASONING, Kind.TOOL): "switch",
    (Kind.TEXT, Kind.REASONING): "switch",
    (Kind.TEXT, Kind.TEXT): "extend",
    (Kind.TEXT, Kind.REFUSAL): "switch",  # (a message of its own: one part per message item here)
    (Kind.TEXT, Kind.TOOL): "switch",
    (Kind.REFUSAL, Kind.REASONING): "switch",
    (Kind.REFUSAL, Kind.TEXT): "switch",
    (Kind.REFUSAL, Kind.REFUSAL): "extend",
    (Kind.REFUSAL, Kind.TOOL): "switch",
    (Kind.TOOL, Kind.REASONING): "switch",
    (Kind.TOOL, Kind.TEXT): "switch",
    (Kind.TOOL, Kind.REFUSAL): "switch",
    (Kind.TOOL, Kind.TOOL): "extend",  # a new index opens one more tool item beside the others
}

# A message that already says when to try again, as Codex reads it (codex-rs sse/responses_error.rs)
_SAYS_WAIT = re.compile(r"(?i)try again in\s*\d+(?:\.\d+)?\s*(?:s|ms|seconds?)")

# finish_reason -> how the response ends. Absent: completed ("stop", "tool_calls", "eos", …).
_INCOMPLETE_REASONS = {
    "length": "max_output_tokens",
    "max_tokens": "max_output_tokens",  # Anthropic-style gateways
    "model_length": "max_output_tokens",  # Mistral: the context filled up while generating
    "content_filter": "content_filter",
}
# think.py states in which a content delta ends with no answer text of its own (inside the think
# block, or just after its closing tag): the logprobs it came with are reasoning's (``on_text``)
_NO_TEXT_YET = frozenset((THINK, THINK_LEAD, AFTER))
_FAILED_REASONS = frozenset({
    "error",  # OpenRouter / Mistral: the provider failed mid-generation
    "abort",  # sglang / vLLM: the request was aborted server-side
    "insufficient_system_resource",  # DeepSeek: interrupted for lack of capacity; worth a retry
})


@dataclass
class TurnContext:
    """What the translator needs to know about the request it answers."""

    response_id: str
    created_at: int
    model: str  # the model name the client asked for (echoed back)
    tool_map: ToolMap = field(default_factory=ToolMap)
    # request fields echoed into every Response object: JSON members, no braces (response.py;
    # by default, those of a request that says nothing)
    echo_json: str = response.DEFAULT_ECHO_JSON
    think: str = "auto"  # <think> tags in content: "auto" | "open" (template opens it) | "off"; think.py
    sealer: Sealer | None = None  # seals state handed to the client (encrypted_content); seal.py
    encrypted_reasoning: bool = False  # include: ["reasoning.encrypted_content"]: reasoning items carry it sealed
    request_id: str = ""  # the gateway's id for the request: named in failures the client sees
    tool_maps: tuple = ()  # the fallback upstreams' tool maps, in order (routing.py): ``rethink`` takes one
    summary: bool = True  # reasoning as a summary (the request asked for one: reasoning.summary), else as content
    logprobs: bool = False  # output_text parts carry the backend's token logprobs (include, top_logprobs)
    clock: Callable[[], float] | None = None  # the time a response completed at (None: created_at); the caller's
    queued: bool = False  # a background response: created ``queued`` (response.queued), then in_progress


@dataclass
class _Tool:
    output_index: int
    item_id: str
    call_id: str
    chat_name: str
    kind: str  # Target.kind: function | custom | local_shell | tool_search
    name: str
    namespace: str | None
    args: list[str] = field(default_factory=list)
    live: InputStream | None = None  # custom tools: the raw input decoded as the JSON arrives
    streamed: list[str] = field(default_factory=list)  # custom input deltas already sent


OVERSIZED = "upstream_event_too_large"  # the code of a turn whose backend sent an event past max_event
# A turn's output (text, reasoning, tool arguments, as the backend's deltas bring them) is held
# until the turn ends (``output_text.done``, the Response): past OUTPUT_EVENTS × max_event bytes
# of it (32 MiB by default) the turn ends with ``response.failed`` (``upstream_output_too_large``)
# and the backend request is dropped, so that a backend that never stops cannot grow the gateway
# without bound. What is held counts as its characters, DELTA_COST more per delta (a piece of a
# list), ITEM_COST per output item and LOGPROB_COST per token of logprobs: at most ~500k deltas.
OUTPUT_EVENTS = 8
DELTA_COST, ITEM_COST, LOGPROB_COST = 64, 4096, 256
OUTPUT_TOO_LARGE = "upstream_output_too_large"


def output_bound(max_event: int) -> int:
    """The bound of a turn's answer, in bytes, for a backend whose largest event is ``max_event``
    (``max_upstream_event_mb``): OUTPUT_EVENTS × it. The one rule: the output a translator holds,
    and the one whole JSON body of a backend that ignored ``stream`` (relay/upstream.py
    ``max_answer``)."""
    return OUTPUT_EVENTS * max_event


class Translator:
    def __init__(self, ctx: TurnContext, max_event: int = MAX_EVENT):
        """``max_event``: the largest SSE event (or line) the backend may send, in bytes
        (``max_upstream_event_mb``; sse.py)."""
        self.ctx = ctx
        self.phase = Phase.WAITING
        self.open = Kind.NONE
        self.output: list[dict] = []  # finished items, in output order
        self._usage_raw: dict | None = None  # the upstream's usage object, converted when shown
        self._usage: dict | None = None
        self.finish_reason: str | None = None
        self.error: dict | None = None
        self.error_detail: str | None = None  # what the operator gets of a failure (errors.py)
        self.retry_after: str | None = None  # the backend's Retry-After, when its error failed the turn
        self.events = 0  # also the next sequence_number
        self._reader = ChunkReader(self, max_event)  # chatstream.py: the backend's chunks -> the on_* calls below
        self._max_output = output_bound(max_event)
        self._output_size = 0  # what the turn's output holds, as OUTPUT_EVENTS counts it
        self.output_chars = 0  # characters of output the backend sent (text, reasoning, tool arguments)
        self._parser = self._reader.parser
        self._out: list[str] = []  # events not yet encoded
        self._encoded: list[bytes] = []  # what goes before them, encoded (a Response event's echo spliced in)
        # One event per run of deltas (a WebSocket turn sets ``merge``: ``_joins``). The open run:
        # (its first event's place in _out, that event, its item's id, where its delta string
        # starts and ends in it, its text); the texts that joined it (None: none yet)
        self.merge = False
        self._run: tuple | None = None
        self._joined: list[str] | None = None
        self._next_index = 0
        self._suffix = ctx.response_id.removeprefix("resp_")
        self._echo_json = ctx.echo_json
        self._echo: bytes | None = None  # the echo, encoded once a turn (``_emit_response``)
        self._model_json = _dumps(ctx.model)
        self._completed_at: int | None = None
        self._lp: list | None = None  # logprobs of text not yet sent (``on_logprobs``)
        self._item_lp: list = []  # logprobs of the open message's text
        # open items
        self._item_id = ""
        self._item_index = 0
        self._text: list[str] = []
        self._ws: list[str] = []  # leading whitespace held back until real text arrives (its pieces)
        self._ws_kind = Kind.NONE
        self._tools: dict[object, _Tool] = {}  # open tool items by upstream key (index, else id)
        self._running: dict[str, tuple[int, dict]] = {}  # the gateway's tool runs in flight: key -> (index, item)
        self._cited: dict[str, str] = {}  # the sources of the web searches run so far: URL -> title
        self._tool_list: list[_Tool] = []  # open tool items in output order
        self._tool_wait: dict[object, list[str]] = {}  # args seen before the call's name
        self._think = ThinkSplitter(ctx.think) if ctx.think != "off" else None  # None: plain text

    # --- public interface ------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        if self.phase is Phase.DONE:
            return b""
        try:
            for payload in self._parser.feed(data):
                self._payload(payload)
                if self.phase is Phase.DONE:
                    break
            if self._parser.oversized:
                self._oversized(self._parser.max_event)
        except Exception as exc:  # noqa: BLE001 — a bug here must not hang the client
            self._fail("server_error", gateway_failure("translate the upstream stream", self.ctx.request_id),
                       f"{type(exc).__name__}: {exc}")
        return self._flush()

    def finish(self) -> bytes:
        """The upstream body ended (mitmproxy calls the stream callable with b"")."""
        if self.phase is not Phase.DONE:
            try:
                for payload in self._parser.finish():
                    self._payload(payload)
                    if self.phase is Phase.DONE:
                        break
                if self.phase is not Phase.DONE:
                    self._reader.unread()  # a body without one SSE event, read whole
                if self.phase is Phase.FINISHING or (self.phase is Phase.STREAMING and self._saw_done):
                    self._complete()
                elif self.phase is not Phase.DONE:
                    self._fail("server_error", "upstream stream ended before the response was finished")
            except Exception as exc:  # noqa: BLE001
                self._fail("server_error", gateway_failure("finish the response", self.ctx.request_id),
                           f"{type(exc).__name__}: {exc}")
        return self._flush()

    def fail(self, code: str, message: str, detail: str | None = None) -> bytes:
        """Terminate with ``response.failed`` (idempotent); returns pending output. ``detail``
        is for the operator (the log, the flow), never for the client."""
        self._fail(code, message, detail)
        return self._flush()

    def fail_instead(self, code: str, message: str) -> bytes:
        """The ``response.completed`` (or ``response.incomplete``) just emitted (its bytes never
        sent: a conversation's write or a background response's held it, conversations.Landing) is
        taken back, and the response ends ``response.failed`` with ``code`` instead: the same
        sequence number, no ``completed_at`` nor ``incomplete_details``. Returns the failed event;
        nothing when the response did neither."""
        if self.phase is not Phase.DONE or self.error is not None or self.response()["status"] not in (
                "completed", "incomplete"):
            return b""
        self.phase, self.events, self._completed_at = Phase.STREAMING, self.events - 1, None
        return self.fail(code, message)

    def cancel(self) -> bytes:
        """The response was cancelled (a background one: resp2chat_core/background.py): what it
        output so far is closed, the message it was writing ``incomplete`` (``_cut``), and it ends
        with ``response.cancelled``, status ``cancelled`` (idempotent; nothing after another
        terminal event)."""
        if self.phase is not Phase.DONE:
            self._start()
            self._cut()
            self._emit_response("response.cancelled", "cancelled")
            self.phase = Phase.DONE
            self._reader.stopped = True
        return self._flush()

    # --- the gateway's own events (channel.py): calls, never bytes -------------------------

    def accepted(self) -> bytes:
        """The relay took the turn: ``response.created`` now, not after the backend's prefill."""
        if self.phase is not Phase.DONE:
            self._start()
        return self._flush()

    def keepalive(self) -> bytes:
        """The backend is silent: a data event resets the client's idle timer (SSE comments do not)."""
        if self.phase is not Phase.DONE:
            self._start()
            self._emit_response("response.in_progress", "in_progress")
        return self._flush()

    def fail_upstream(self, status: int | None, body: bytes, retry_after: str | None = None,
                      own: bool = False, forwarded: bool = False) -> bytes:
        """An upstream error body (HTTP error or JSON error) -> ``response.failed``. ``own``: the
        relay wrote the body (a failure it observed), not the backend; ``forwarded``: the
        backend was sent the client's own credentials (errors.py ``upstream_failure``)."""
        self._fail_upstream(status, body, retry_after, own, forwarded)
        return self._flush()

    def oversized(self, limit: int) -> bytes:
        """The relay saw the backend send an SSE event larger than ``limit`` bytes (a web-search
        round reads the stream before the translator does): the turn fails as if it were seen here."""
        self._oversized(limit)
        return self._flush()

    def rethink(self, mode: str, alternate: int = 0) -> bytes:
        """Another upstream answers (the ``alternate``-th fallback, routing.py): read ``<think>``
        tags and tool calls its way. Only before any backend byte of the answer was translated
        (the output may hold the compaction item server-side compaction put first)."""
        if self.phase is not Phase.DONE and not self._reader.saw_event and \
                all(item["type"] == "compaction" for item in self.output):
            self.ctx.think = mode
            self._think = ThinkSplitter(mode) if mode != "off" else None
            if isinstance(alternate, int) and 0 < alternate <= len(self.ctx.tool_maps):
                self.ctx.tool_map = self.ctx.tool_maps[alternate - 1]
        return b""

    def translate_json(self, body: bytes) -> bytes:
        """A non-streamed ``chat.completion`` JSON (a backend that ignored ``stream``)."""
        if self.phase is not Phase.DONE:
            self._reader.body(body)
        return self.finish()

    def search_started(self, call_id: str, query: str, refused: bool = False) -> bytes:
        """A web search's item opens: ``…in_progress``, then ``…searching`` (not for one the
        gateway refused: no search runs, ``search_done`` closes it failed)."""
        if self.phase is not Phase.DONE:
            index, item = self._own_item("ws", lambda item_id: websearch.call_item(item_id, query))
            self._running[call_id] = (index, item)
            for event in websearch.STARTED_EVENTS[:1] if refused else websearch.STARTED_EVENTS:
                self._emit(event, output_index=index, item_id=item["id"])
        return self._flush()

    def search_done(self, call_id: str, sources: tuple[tuple[str, str], ...], failed: bool = False) -> bytes:
        """A web search ended with ``sources`` ((URL, title) each): its item closes, and text the
        model writes from now on cites them (``_close_open``: ``url_citation`` annotations).
        ``failed``: no search ran (a call the gateway refused): the item closes failed, with no
        ``response.web_search_call.completed`` (the spec has no event of its own for it)."""
        found = self._running.pop(call_id, None)
        if found is not None and self.phase is not Phase.DONE:
            index, item = found
            for url, title in sources:
                self._cited.setdefault(url, title)
            if not failed:
                self._emit(websearch.DONE_EVENT, output_index=index, item_id=item["id"])
            self._item_done(websearch.call_item(item["id"], item["action"]["query"], sources, failed), index)
        return self._flush()

    def mcp_listing(self, label: str) -> bytes:
        """The gateway lists an MCP server's tools (mcp.py): an ``mcp_list_tools`` item."""
        if self.phase is not Phase.DONE:
            index, item = self._own_item("mcpl", lambda item_id: mcp.list_item(item_id, label, status="in_progress"))
            self._running["list:" + label] = (index, item)
            self._emit(mcp.LIST_EVENTS[0], output_index=index, item_id=item["id"])
        return self._flush()

    def mcp_listed(self, label: str, tools: tuple, error: str | None = None) -> bytes:
        found = self._running.pop("list:" + label, None)
        if found is not None and self.phase is not Phase.DONE:
            index, item = found
            self._emit(mcp.LIST_EVENTS[2 if error is not None else 1], output_index=index, item_id=item["id"])
            self._item_done(mcp.list_item(item["id"], label, tools, error), index)
        return self._flush()

    def mcp_calling(self, call_id: str, label: str, name: str, arguments: str,
                    approval_request_id: str | None = None) -> bytes:
        """The gateway runs an MCP tool: an ``mcp_call`` item, its arguments in one delta."""
        if self.phase is not Phase.DONE:
            index, item = self._own_item("mcp", lambda item_id: mcp.call_item(
                item_id, label, name, "", "in_progress", approval_request_id=approval_request_id))
            self._running[call_id] = (index, {**item, "arguments": arguments})
            ids = {"output_index": index, "item_id": item["id"]}
            self._emit(mcp.CALL_EVENTS[0], **ids)
            self._emit(mcp.CALL_EVENTS[1], **ids, delta=arguments)
            self._emit(mcp.CALL_EVENTS[2], **ids, arguments=arguments)
        return self._flush()

    def mcp_called(self, call_id: str, output: str | None, error: dict | None = None) -> bytes:
        found = self._running.pop(call_id, None)
        if found is not None and self.phase is not Phase.DONE:
            index, item = found
            self._emit(mcp.CALL_EVENTS[4 if error is not None else 3], output_index=index, item_id=item["id"])
            self._item_done(mcp.call_item(item["id"], item["server_label"], item["name"], item["arguments"],
                                          "failed" if error is not None else "completed", output, error,
                                          item["approval_request_id"]), index)
        return self._flush()

    def mcp_approval(self, label: str, name: str, arguments: str) -> bytes:
        """A call waits for the client's approval: an ``mcp_approval_request`` item."""
        if self.phase is not Phase.DONE:
            index, item = self._own_item("mcpr", lambda item_id: mcp.approval_item(item_id, label, name, arguments))
            self._item_done(item, index)
        return self._flush()

    def compacted(self, item: dict, output_tokens: int = 0) -> bytes:
        """The turn's compaction round is over: its ``compaction`` item (output[0]); the
        summary's ``output_tokens`` join the usage the client reads (``usage``)."""
        if self.phase is not Phase.DONE:
            index, done = self._own_item("cmp", lambda item_id: {"id": item_id, **item})
            self._item_done(done, index)
            self.compacted_tokens = output_tokens
        return self._flush()

    def _own_item(self, prefix: str, make) -> tuple[int, dict]:
        """An item of the gateway's own tool runs, opened after what the model said so far."""
        self._start()
        self._close_open()
        self._lp = None  # (logprobs a round ended with and no text took, vLLM's end token: not the next round's)
        index = self._alloc_index()
        item = make(f"{prefix}_{self._suffix}_{index}")
        self._emit("response.output_item.added", output_index=index, item=item)
        return index, item

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def answer_usage(self) -> dict | None:
        """The answer's usage as its backend gave it, in Responses shape (converted once from the
        upstream's last usage object): a compaction round's is not in it."""
        if self._usage is None and self._usage_raw is not None:
            self._usage = to_responses_usage(self._usage_raw)
        return self._usage

    @property
    def usage(self) -> dict | None:
        """The turn's Responses usage as its client reads it: the answer's (``answer_usage``),
        and, after server-side compaction, the summary's output tokens (output of the turn too)."""
        usage = self.answer_usage
        if usage is None or not self.compacted_tokens:
            return usage
        return {**usage, "output_tokens": usage["output_tokens"] + self.compacted_tokens,
                "total_tokens": usage["total_tokens"] + self.compacted_tokens}

    def response(self) -> dict:
        """The Response object as it stands (final once ``done``): what is stored, and a GET
        shows: its ``error`` without the wait ``_fail_upstream`` told (``response.as_stored``)."""
        return response.as_stored(_loads(self._response_json(self.status, self._incomplete)))

    @property
    def status(self) -> str:
        """The Response's status as it stands (``response()["status"]``, without making it)."""
        return self._status or "in_progress"

    # --- upstream events -------------------------------------------------------------------

    _saw_done = False
    WHAT, IN = "answer", ""  # what the output is, in a failure's words (a compaction summary's: compaction.py)
    compacted_tokens = 0  # the compaction round's output tokens (``compacted``)
    observer = None  # optional callable(kind, text) for live display: "reasoning" | "text" | "tool" | "end"
    _status: str | None = None
    _incomplete: dict | None = None

    def _payload(self, payload: str) -> None:
        self._reader.payload(payload)

    # --- what the backend says (chatstream.Sink: the reader calls these) --------------------

    def on_start(self) -> None:
        self._start()

    def on_reasoning(self, text: str) -> None:
        if self._outgrown(len(text)):
            return
        if self._think is not None:
            self._settle_think()  # (held text goes out with its logprobs)
        self._lp = None  # (what is left is no text's: held blank text that is dropped, logprobs alone)
        self._delta(Kind.REASONING, text)

    def on_logprobs(self, entries: list) -> None:
        if self.ctx.logprobs:
            lp = _logprobs(entries)
            self._output_size += LOGPROB_COST * sum(1 + len(e["top_logprobs"]) for e in lp)  # (OUTPUT_EVENTS)
            if lp:
                self._lp = lp if self._lp is None else self._lp + lp

    def on_text(self, text: str) -> None:
        if self._outgrown(len(text)):
            return
        think = self._think
        if think is None or (think.state == WATCH and not think.held and "<" not in text):
            self._delta(Kind.TEXT, text)  # plain text, or text that cannot hold (part of) a tag
            return
        self._think_pieces(think.feed(text))
        if self._lp is not None and think.state in _NO_TEXT_YET:
            self._lp = None  # (this delta's tokens went to reasoning, a tag or dropped blanks: no text's)

    def on_refusal(self, text: str) -> None:
        if self._outgrown(len(text)):
            return
        if self._think is not None:
            self._settle_think()
        self._lp = None  # (logprobs are the output text's)
        self._delta(Kind.REFUSAL, text)

    def on_tool(self, key, call_id: str | None, name: str | None, args: str | None) -> None:
        if self._outgrown(len(args or "")):
            return
        if name is None and (self.open is not Kind.TOOL or key not in self._tools):
            # A delta before its call's name: its arguments wait for it (toolloop.py's filter moves
            # the delta there). Nothing goes out, so it settles no text held before it.
            if args:
                self._tool_wait.setdefault(key, []).append(args)
            return
        if self._think is not None:
            self._settle_think()
        self._lp = None
        tool = self._tools.get(key) if self.open is Kind.TOOL else None
        if tool is None:
            if name is None:  # (its call's item closed as the held text went out: as above)
                if args:
                    self._tool_wait.setdefault(key, []).append(args)
                return
            if _ITEM_TRANSITIONS[(self.open, Kind.TOOL)] == "switch":
                self._close_open()
                self._open_item(Kind.TOOL)
            tool = self._open_tool(key, name, call_id)
            held = self._tool_wait.pop(key, None)
            if held:
                self._tool_args(tool, "".join(held))
        if args:
            self._tool_args(tool, args)

    def on_finish(self, reason: str) -> None:
        if self._think is not None:
            self._think_pieces(self._think.flush())
        if reason in _FAILED_REASONS:
            self._fail("server_error", f"upstream stopped generating{self.IN}: finish_reason {reason!r}")
            return
        self._close_open("incomplete" if reason in _INCOMPLETE_REASONS else "completed")
        self.finish_reason = reason
        self.phase = _PHASES[(self.phase, "finish_reason")]

    def on_usage(self, usage: dict) -> None:
        self._usage_raw, self._usage = usage, None

    def on_error(self, body: bytes) -> None:
        self._fail_upstream(None, body)

    def on_garbage(self, text: str, what: str) -> None:
        if what == NOT_OBJECT:  # (a message that quotes nothing of the backend)
            self._fail("server_error", f"upstream sent {what}", sanitize(text[:2000]))
        else:
            self._fail("server_error", withheld(None, self.ctx.request_id, f"upstream sent {what}"),
                       sanitize(text[:2000]))

    def on_done(self) -> None:
        self._saw_done = True
        if self.phase in (Phase.STREAMING, Phase.FINISHING, Phase.WAITING):
            self._complete()

    # --- think tags, failure, start and end ------------------------------------------------

    def _think_pieces(self, pieces: list[tuple[str, str]]) -> None:
        for kind, text in pieces:
            if kind == BREAK:
                self._break()
            else:
                self._delta(Kind.REASONING if kind == REASONING else Kind.TEXT, text)
        if self._think is not None and self._think.passing:
            self._think = None  # the think block (if any) is over: content is plain text from now on

    def _break(self) -> None:
        """What came as text so far was a think block without its <think> (think.py ``BREAK``):
        the message it opened ends there (a compaction summary drops it: compaction.py)."""
        if self.open is Kind.TEXT:
            self._close_open()

    def _settle_think(self) -> None:
        """Another kind of delta arrives: release held content first, in order."""
        self._think_pieces(self._think.settle())

    def _fail(self, code: str, message: str, detail: str | None = None, cut: bool = True,
              headers: dict | None = None) -> None:
        """``cut``: close what is open (``_cut``); not when the output outgrew its bound.
        ``headers``: when to try again (``_fail_upstream``)."""
        if self.phase is not Phase.DONE:
            self._start()
            if cut:
                self._cut()
            self.error = {**response_error(code, message), **({"headers": headers} if headers else {})}
            self.error_detail = detail
            self._emit_response("response.failed", "failed")
            self.phase = Phase.DONE
            self._reader.stopped = True

    def _oversized(self, limit: int) -> None:
        self._fail(OVERSIZED, f"the upstream sent an SSE event larger than max_upstream_event_mb "
                              f"({limit / (1 << 20):g} MiB){self.IN}: the turn was ended and the upstream request "
                              "dropped")

    def _outgrown(self, chars: int) -> bool:
        """A delta of ``chars`` more characters of output held: past the bound (OUTPUT_EVENTS),
        the turn fails."""
        self.output_chars += chars
        self._output_size += chars + DELTA_COST
        if self._output_size <= self._max_output:
            return False
        # (what is open is not closed: its done events and the failed Response would each repeat
        # the output that is too large to hold, four copies of it: tests/test_hostile_audit.py)
        self._fail(OUTPUT_TOO_LARGE, f"the upstream's {self.WHAT} outgrew {self._max_output / (1 << 20):g} MiB "
                                     f"({OUTPUT_EVENTS} × max_upstream_event_mb): the turn was ended and the "
                                     "upstream request dropped", cut=False)
        return True

    def _fail_upstream(self, status: int | None, body: bytes, retry_after: str | None = None,
                       own: bool = False, forwarded: bool = False) -> None:
        code, message, detail = upstream_failure(status, body, self.ctx.request_id, own, forwarded)
        if self.phase is not Phase.DONE:
            self.retry_after = retry_after
        wait = retry_seconds(retry_after)
        if wait is None:
            return self._fail(code, message, detail)
        if not _SAYS_WAIT.search(message):  # (a backend's own "Please try again in 20s." stays)
            message = message.rstrip()
            message += ("" if message.endswith((".", "!", "?")) else ".") + " " + retry_phrase(wait)
        # (Codex waits as long as the headers say, for any code: never longer than MAX_TOLD_WAIT, the
        # openai SDK's own bound; the words keep the backend's wait, the headers come first for Codex)
        self._fail(code, message, detail, headers=dict(retry_headers(min(wait, MAX_TOLD_WAIT))))

    def _start(self) -> None:
        if self.phase is Phase.WAITING:
            self.phase = Phase.STREAMING
            if self.ctx.queued:  # a background response: created queued, as OpenAI's (then it runs)
                self._emit_response("response.created", "queued")
                self._emit_response("response.queued", "queued")
            else:
                self._emit_response("response.created", "in_progress")
            self._emit_response("response.in_progress", "in_progress")

    def _cut(self) -> None:
        """The response ends before its items did (it failed, or was cancelled): a message or
        reasoning item still open is closed as a finished one is (its ``*.done`` events,
        ``output_item.done``), ``incomplete`` (the spec's item states have no other for an item
        whose sampling stopped; OpenAI's Realtime API closes an interrupted or cancelled
        response's items so), and the gateway's own tool runs in flight end ``incomplete`` (an
        ``mcp_call``) or ``failed`` (a web search, a listing: their only other end). The final
        Response's ``output`` is the items closed.

        Tool calls the model was writing are not closed: a client runs a call when its
        ``output_item.done`` comes, whatever its status (Codex 0.169 does, before it reads the
        ``response.failed`` that follows: tests/test_e2e_codex.py), and a call whose response
        failed may be whole or cut anywhere: it must not run (Codex then retries the turn, and
        the model calls again). They stay added, out of the output, as a failed response's
        unfinished work. Never raises: the terminal event goes whatever state a bug left."""
        try:
            running, self._running = self._running, {}  # (opened before what the model writes now)
            for index, item in sorted(running.values(), key=lambda found: found[0]):
                self._item_done({**item, "status": "incomplete" if item["type"] == "mcp_call" else "failed"}, index)
            if self.open is Kind.TOOL:
                self.open = Kind.NONE
                self._tools.clear()
                self._tool_list.clear()
                self._tool_wait.clear()
            else:
                self._close_open("incomplete")
        except Exception:  # noqa: BLE001 — (a bug in closing: the response still ends)
            self.open = Kind.NONE

    def _complete(self) -> None:
        self._start()
        if self._think is not None:
            self._think_pieces(self._think.flush())
        reason = _INCOMPLETE_REASONS.get(self.finish_reason or "")
        self._close_open("incomplete" if reason else "completed")
        self._ws = []
        if self.observer is not None:
            self.observer("end", "\n")
        if reason:
            self._emit_response("response.incomplete", "incomplete", {"reason": reason})
        else:
            self._emit_response("response.completed", "completed")
        self.phase = Phase.DONE
        self._reader.stopped = True

    # --- items -----------------------------------------------------------------------------

    def _delta(self, kind: Kind, text: str) -> None:
        if self.open is not kind and not text.strip():
            if self._ws_kind is not kind:
                self._ws = []
            self._ws.append(text)  # (pieces: a long run of blank deltas is joined once, not copied at each)
            self._ws_kind = kind
            return
        # (the table says "extend" exactly when the kinds match: skip the lookup then)
        if self.open is not kind:
            # An item's text never starts with a line break, however the backend cut it: keep
            # indentation, drop the blank lines that separate thinking from the answer.
            if self._ws_kind is kind:
                text = "".join(self._ws) + text
            text = text.lstrip("\r\n")
            if _ITEM_TRANSITIONS[(self.open, kind)] == "switch":
                self._close_open()
                self._open_item(kind)
        if self._ws:
            self._ws, self._ws_kind = [], Kind.NONE
        self._text.append(text)
        if self.observer is not None:
            self.observer("reasoning" if kind is Kind.REASONING else "text", text)
        if self._run is not None and (kind is not Kind.TEXT or not self._lp) and self._joins(self._item_id, text):
            return
        delta = _dumps_str(text)
        seq = self.events
        self.events += 1
        if kind is Kind.TEXT:
            lp = "[]"
            if self._lp:  # the logprobs of the tokens this text is made of
                lp = _dumps(self._lp)
                self._item_lp += self._lp
                self._lp = None
            self._out.append(
                'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                f'"sequence_number":{seq},"item_id":"{self._item_id}","output_index":{self._item_index},'
                f'"content_index":0,"delta":{delta},"logprobs":{lp}}}\n\n'
            )
        elif kind is Kind.REFUSAL:
            self._out.append(
                'event: response.refusal.delta\ndata: {"type":"response.refusal.delta",'
                f'"sequence_number":{seq},"item_id":"{self._item_id}","output_index":{self._item_index},'
                f'"content_index":0,"delta":{delta}}}\n\n'
            )
        elif self.ctx.summary:
            self._out.append(
                'event: response.reasoning_summary_text.delta\ndata: {"type":'
                f'"response.reasoning_summary_text.delta","sequence_number":{seq},'
                f'"item_id":"{self._item_id}","output_index":{self._item_index},'
                f'"summary_index":0,"delta":{delta}}}\n\n'
            )
        else:
            self._out.append(
                'event: response.reasoning_text.delta\ndata: {"type":'
                f'"response.reasoning_text.delta","sequence_number":{seq},'
                f'"item_id":"{self._item_id}","output_index":{self._item_index},'
                f'"content_index":0,"delta":{delta}}}\n\n'
            )
        if self.merge and (kind is not Kind.TEXT or lp == "[]"):
            self._open_run(self._item_id, text, len(delta), 15 + len(lp) if kind is Kind.TEXT else 3)

    def _joins(self, item_id: str, text: str) -> bool:
        """With ``merge``: does this delta of ``item_id`` join the open run (its item's last delta,
        with nothing said since)? If not, the run is written (``_seal_run``). mitmproxy runs
        every WebSocket message through its addon chain, so what one delivery brings goes out as
        few messages as it can: a run of deltas is one event, its texts joined (clients join
        deltas anyway), and it takes one sequence number, so they stay contiguous."""
        run, out = self._run, self._out
        if run[2] == item_id and out and out[-1] is run[1] and len(out) - 1 == run[0]:
            if self._joined is None:
                self._joined = [run[5]]
            self._joined.append(text)
            return True
        self._seal_run()
        return False

    def _open_run(self, item_id: str, text: str, size: int, tail: int) -> None:
        """The delta just put in ``_out`` opens a run (``_joins``): its string is the ``size``
        characters before the last ``tail``."""
        if self._run is not None:  # (one that went unjoined: a text delta with logprobs came between)
            self._seal_run()
        at = len(self._out) - 1
        event = self._out[at]
        self._run = (at, event, item_id, len(event) - tail - size, len(event) - tail, text)

    def _seal_run(self) -> None:
        """The open run, written whole where its first delta stands."""
        run, joined, self._run, self._joined = self._run, self._joined, None, None
        if joined is None:
            return
        at, event, _, start, end, _ = run
        out = self._out
        if at < len(out) and out[at] is event:
            out[at] = f'{event[:start]}{_dumps_str("".join(joined))}{event[end:]}'

    def _open_item(self, kind: Kind) -> None:
        self.open = kind
        if kind is Kind.TOOL:
            return  # tool items open one by one in on_tool
        self._item_index = self._alloc_index()
        self._text = []
        if kind is Kind.REFUSAL:
            self._item_id = f"msg_{self._suffix}_{self._item_index}"
            self._emit("response.output_item.added", output_index=self._item_index, item={
                "id": self._item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
            self._emit("response.content_part.added", item_id=self._item_id, output_index=self._item_index,
                       content_index=0, part={"type": "refusal", "refusal": ""})
        elif kind is Kind.TEXT:
            self._item_id = f"msg_{self._suffix}_{self._item_index}"
            self._item_lp = []
            self._emit("response.output_item.added", output_index=self._item_index, item={
                "id": self._item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
            self._emit("response.content_part.added", item_id=self._item_id, output_index=self._item_index,
                       content_index=0, part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        elif self.ctx.summary:
            self._item_id = f"rs_{self._suffix}_{self._item_index}"
            self._emit("response.output_item.added", output_index=self._item_index, item={
                "id": self._item_id, "type": "reasoning", "summary": []})
            self._emit("response.reasoning_summary_part.added", item_id=self._item_id,
                       output_index=self._item_index, summary_index=0, part={"type": "summary_text", "text": ""})
        else:  # the reasoning as the item's content (the request asked for no summary)
            self._item_id = f"rs_{self._suffix}_{self._item_index}"
            self._emit("response.output_item.added", output_index=self._item_index, item={
                "id": self._item_id, "type": "reasoning", "summary": [], "content": []})
            self._emit("response.content_part.added", item_id=self._item_id, output_index=self._item_index,
                       content_index=0, part={"type": "reasoning_text", "text": ""})

    def _close_open(self, status: str = "completed") -> None:
        """Close the open item(s). ``status``: the last one's (``incomplete`` when the response
        is: the item the model was writing when it stopped; the spec: an incomplete item is the
        last one, in an incomplete response); an item before it is ``completed``. A reasoning
        item carries no status."""
        kind, self.open = self.open, Kind.NONE
        if kind is Kind.TEXT:
            text = "".join(self._text)
            lp = self._item_lp
            cited = websearch.citations(text, self._cited) if self._cited else []
            part = {"type": "output_text", "text": text, "annotations": cited, "logprobs": lp}
            ids = {"item_id": self._item_id, "output_index": self._item_index}
            for n, annotation in enumerate(cited):
                self._emit(websearch.ANNOTATION_EVENT, **ids, content_index=0, annotation_index=n,
                           annotation=annotation)
            self._emit("response.output_text.done", **ids, content_index=0, text=text, logprobs=lp)
            self._emit("response.content_part.done", **ids, content_index=0, part=part)
            self._item_done({"id": self._item_id, "type": "message", "status": status,
                             "role": "assistant", "content": [part]})
        elif kind is Kind.REFUSAL:
            text = "".join(self._text)
            part = {"type": "refusal", "refusal": text}
            ids = {"item_id": self._item_id, "output_index": self._item_index}
            self._emit("response.refusal.done", **ids, content_index=0, refusal=text)
            self._emit("response.content_part.done", **ids, content_index=0, part=part)
            self._item_done({"id": self._item_id, "type": "message", "status": status,
                             "role": "assistant", "content": [part]})
        elif kind is Kind.REASONING:
            text = "".join(self._text)
            ids = {"item_id": self._item_id, "output_index": self._item_index}
            if self.ctx.summary:
                part = {"type": "summary_text", "text": text}
                self._emit("response.reasoning_summary_text.done", **ids, summary_index=0, text=text)
                self._emit("response.reasoning_summary_part.done", **ids, summary_index=0, part=part)
                item = {"id": self._item_id, "type": "reasoning", "summary": [part]}
            else:
                part = {"type": "reasoning_text", "text": text}
                self._emit("response.reasoning_text.done", **ids, content_index=0, text=text)
                self._emit("response.content_part.done", **ids, content_index=0, part=part)
                item = {"id": self._item_id, "type": "reasoning", "summary": [], "content": [part]}
            if self.ctx.encrypted_reasoning and self.ctx.sealer is not None:
                # what only this gateway can read back (inputs.py restores it for the backend)
                item["encrypted_content"] = self.ctx.sealer.seal(REASONING_PURPOSE, text)
            self._item_done(item)
        elif kind is Kind.TOOL:
            last = self._tool_list[-1] if self._tool_list else None
            for tool in self._tool_list:  # allocated in output order
                self._close_tool(tool, status if tool is last else "completed")
            self._tools.clear()
            self._tool_list.clear()
            # (``_tool_wait`` stays: arguments before a call's name wait for it across other items)

    def _item_done(self, item: dict, output_index: int | None = None) -> None:
        index = self._item_index if output_index is None else output_index
        self._emit("response.output_item.done", output_index=index, item=item)
        self.output.append(item)

    def _alloc_index(self) -> int:
        self._output_size += ITEM_COST  # (OUTPUT_EVENTS: the next delta past the bound fails the turn)
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    # --- tool calls ------------------------------------------------------------------------

    def _open_tool(self, key, chat_name: str, call_id) -> _Tool:
        target = self.ctx.tool_map.target(chat_name)
        index = self._alloc_index()
        prefix = {"function": "fc", "custom": "ctc", "local_shell": "lsh", "tool_search": "ts"}[target.kind]
        if not call_id or not isinstance(call_id, str):
            call_id = f"call_{self._suffix[:16]}_{index}"
        tool = _Tool(index, f"{prefix}_{self._suffix}_{index}", call_id,
                     chat_name, target.kind, target.name, target.namespace)
        self._tools[key] = tool
        self._tool_list.append(tool)
        if self.observer is not None:
            self.observer("tool", f"\n[{tool.name}] ")
        self._emit("response.output_item.added", output_index=index, item=self._tool_item(tool, "in_progress", ""))
        return tool

    def _tool_args(self, tool: _Tool, args: str) -> None:
        tool.args.append(args)
        if self.observer is not None:
            self.observer("tool", args)
        if tool.kind == "function":  # stream live; local_shell/tool_search need the whole JSON
            if self._run is not None and self._joins(tool.item_id, args):
                return
            seq = self.events
            self.events += 1
            delta = _dumps_str(args)
            self._out.append(
                'event: response.function_call_arguments.delta\ndata: {"type":'
                f'"response.function_call_arguments.delta","sequence_number":{seq},'
                f'"item_id":"{tool.item_id}","output_index":{tool.output_index},"delta":{delta}}}\n\n'
            )
            if self.merge:
                self._open_run(tool.item_id, args, len(delta), 3)
        elif tool.kind == "custom":
            if tool.live is None:
                tool.live = InputStream()
            text = tool.live.feed(args)
            if text:  # apply_patch's patch text, live, as the model writes it
                tool.streamed.append(text)
                if self._run is not None and self._joins(tool.item_id, text):
                    return
                self._emit("response.custom_tool_call_input.delta", item_id=tool.item_id,
                           output_index=tool.output_index, delta=text)
                if self.merge:
                    self._open_run(tool.item_id, text, len(_dumps_str(text)), 3)

    def _close_tool(self, tool: _Tool, status: str = "completed") -> None:
        raw = "".join(tool.args)
        ids = {"item_id": tool.item_id, "output_index": tool.output_index}
        if tool.kind == "function":
            args = _function_arguments(raw)
            self._emit("response.function_call_arguments.done", **ids, name=tool.name, arguments=args)
            item = self._tool_item(tool, status, args)
        elif tool.kind == "custom":
            value = _decode_custom_input(raw)
            sent = "".join(tool.streamed)
            if value.startswith(sent) and len(value) > len(sent):
                # what live decoding could not send (another shape): the rest, in one delta
                rest = value[len(sent):]
                if self._run is None or not self._joins(tool.item_id, rest):
                    self._emit("response.custom_tool_call_input.delta", **ids, delta=rest)
            self._emit("response.custom_tool_call_input.done", **ids, input=value)
            item = self._tool_item(tool, status, value)
        else:
            item = self._tool_item(tool, status, raw)
        self._item_done(item, tool.output_index)

    def _tool_item(self, tool: _Tool, status: str, payload: str) -> dict:
        if tool.kind == "function":
            item = {"id": tool.item_id, "type": "function_call", "status": status, "arguments": payload,
                    "call_id": tool.call_id, "name": tool.name}
        elif tool.kind == "custom":
            item = {"id": tool.item_id, "type": "custom_tool_call", "status": status, "call_id": tool.call_id,
                    "name": tool.name, "input": payload}
        elif tool.kind == "local_shell":
            args = _json_object(payload)
            command = args.get("command")
            if isinstance(command, str):
                command = ["bash", "-lc", command]
            action = {"type": "exec", "command": command if isinstance(command, list) else [],
                      "timeout_ms": args.get("timeout_ms"), "working_directory": args.get("workdir"),
                      "env": {}, "user": None}
            return {"id": tool.item_id, "type": "local_shell_call", "status": status,
                    "call_id": tool.call_id, "action": action}
        else:  # tool_search
            return {"id": tool.item_id, "type": "tool_search_call", "status": status, "call_id": tool.call_id,
                    "execution": "client", "arguments": _json_object(payload)}
        if tool.namespace:
            item["namespace"] = tool.namespace
        return item

    # --- encoding --------------------------------------------------------------------------

    def _emit(self, type_: str, **fields) -> None:
        seq = self.events
        self.events += 1
        body = _dumps(fields)
        self._out.append(f'event: {type_}\ndata: {{"type":"{type_}","sequence_number":{seq},{body[1:]}\n\n')

    def _response_json(self, status: str, incomplete: dict | None = None, echoed: bool = True) -> str:
        """The Response object as it stands (response.py writes every one); without ``echoed``,
        its text up to the echo (no closing brace)."""
        echo = self._echo_json if echoed else None
        if status in _RUNNING:
            return response.response_json(self.ctx.response_id, self.ctx.created_at, status, self._model_json, echo)
        return response.response_json(self.ctx.response_id, self.ctx.created_at, status, self._model_json,
                                      echo, completed_at=self._completed_at, error=self.error or None,
                                      incomplete=incomplete, output_json=_dumps(self.output),
                                      usage=self.usage or None)

    def _emit_response(self, type_: str, status: str, incomplete: dict | None = None) -> None:
        if status not in _RUNNING:
            self._status = status
            self._incomplete = incomplete
            if status == "completed" and self._completed_at is None:
                clock = self.ctx.clock
                self._completed_at = int(clock()) if clock is not None else self.ctx.created_at
        seq = self.events
        self.events += 1
        head = f'event: {type_}\ndata: {{"type":"{type_}","sequence_number":{seq},"response":'
        echoed = self._echo_json
        if not echoed:
            self._out.append(f'{head}{self._response_json(status, incomplete)}}}\n\n')
            return
        # the request's echo (~18 KB for Codex's tools; three events a turn carry it) is encoded
        # once and spliced in as bytes: the same bytes as encoding the whole text
        if self._echo is None:
            self._echo = _encode(echoed)
        if self._run is not None:
            self._seal_run()
        out = self._out
        out.append(head)
        out.append(self._response_json(status, incomplete, echoed=False))
        out.append(",")
        self._encoded.append(_encode("".join(out)))
        self._encoded.append(self._echo)
        out.clear()
        out.append("}}\n\n")

    def _flush(self) -> bytes:
        if self._run is not None:  # (the events go out: a run ends with them)
            self._seal_run()
        out = self._out
        if self._encoded:
            done, self._encoded = self._encoded, []
            if out:
                done.append(_encode("".join(out)))
                out.clear()
            return b"".join(done)
        if not out:
            return b""
        text = "".join(out)
        out.clear()
        return _encode(text)


def _encode(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a backend's "\ud800" escape) in some JSON string
        return text.encode("utf-8", "backslashreplace")  # … goes out as that same escape (character by character)


def _function_arguments(raw: str) -> str:
    """The arguments string Codex will parse as JSON. Deltas went out as they came; the done
    event and the item carry this normalized form:

    - empty, whitespace or ``null`` (zero-argument calls) -> ``{}``: it must still be an object;
    - a JSON *string* holding an object (double-encoded by some servers) -> the object;
    - anything else as it is, invalid JSON included: Codex answers the model with the parse
      error, which lets the model retry; guessing a repair could run a different command.
    """
    text = raw.strip()
    if not text or text == "null":
        return "{}"
    if text[0] == '"':
        try:
            inner = _loads(text)
            if isinstance(inner, str) and isinstance(_loads(inner), dict):
                return inner
        except ValueError:
            pass
    return raw


def _logprob(value) -> float | None:
    """A finite log probability (a backend's -inf as -9999.0, as the API writes it), or None."""
    if value.__class__ not in (int, float):
        return None
    return value if _isfinite(value) else -9999.0 if value < 0 else None


def _token(entry) -> dict | None:
    """A backend's logprob entry (``{"token", "logprob", "bytes"}``) as the Responses API's."""
    if entry.__class__ is not dict:
        return None
    token, logprob = entry.get("token"), _logprob(entry.get("logprob"))
    if token.__class__ is not str or logprob is None:
        return None
    raw = entry.get("bytes")
    if raw.__class__ is not list or not all(b.__class__ is int and 0 <= b < 256 for b in raw):
        raw = list(token.encode("utf-8", "surrogatepass"))
    return {"token": token, "logprob": logprob, "bytes": raw}


def _logprobs(entries: list) -> list[dict]:
    """The backend's ``choices[0].logprobs.content`` as the ``logprobs`` of an ``output_text``
    part: each token with its ``top_logprobs``; entries that are not one are left out."""
    out = []
    for entry in entries:
        lp = _token(entry)
        if lp is None:
            continue
        top = entry.get("top_logprobs")
        lp["top_logprobs"] = [t for t in map(_token, top) if t is not None] if top.__class__ is list else []
        out.append(lp)
    return out


def _json_object(raw: str) -> dict:
    try:
        value = _loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _decode_custom_input(raw: str) -> str:
    """A custom tool's raw input from the one-string-parameter function the model called."""
    try:
        value = _loads(raw)
    except ValueError:
        return raw  # the model wrote the raw input instead of JSON: that *is* the input
    if isinstance(value, dict):
        if isinstance(value.get("input"), str):
            return value["input"]
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
    return value if isinstance(value, str) else raw
