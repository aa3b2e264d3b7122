"""The server-side tool loop, sans I/O: tools the gateway runs itself inside one client turn.

Some tools a client offers the model are not the client's to run: ``web_search`` (websearch.py,
with ``brave_api_key``) and hosted ``mcp`` servers (mcp.py, with ``mcp_servers``). Each is a
*tool kind*: it owns some of the functions the model is offered, and says what a call to one of
them is (a step the relay runs: ``websearch.Search``, ``mcp.Call``, ``mcp.Approve``). The loop is
the same for every kind: when the model calls the gateway's functions, the relay runs them and
asks the model again with their results, and the client sees one continuous stream in which each
run is an item of its kind (``web_search_call``, ``mcp_call``…).

Rules of this file:
- Sans-I/O. ``ToolLoop`` says *what* to do next (run these steps, or ``Finish``); the relay
  (resp2chat_io/relay/exchange.py) runs the steps (the HTTP to Brave, the MCP client) and hands
  back what the model reads of each.
- The client's stream stays one stream: within a round ``RoundFilter`` passes on everything the
  model says *except* its calls to the gateway's functions, and holds back what would end the
  stream (the finish reason, usage and ``[DONE]``) until the loop knows whether another round
  follows.
- The filter reads the backend's chunks through ``chatstream.ChunkReader``, the reader the
  translator uses, so both see the same calls, choices and usage. A chunk it holds nothing of
  goes on byte for byte; one it does goes on re-encoded from the reader's deltas without the
  held parts (``chatstream.wire_call`` writes a call so that it reads back under its own key;
  a choice's token ``logprobs`` stay on the text they came with: vLLM sends the last token and
  the finish reason in one chunk), and the translator reads that as it would have read the
  original. The translator's reader keys calls as the filter's does, less the held ones: where
  only a held call told a client's call from the one before it on its index (the same id
  again), that call goes on, every delta of it, under an index of its own (``_wire_key``).
- Whose a call is comes with its name, and some backends send a call's id or arguments first:
  a call's deltas before its name are held until it comes. A held call's go with it; a
  client's go on then, every one (an id alone too: the reader gives the call an id sent before
  its name), in order, right before its naming delta (the translator holds a call's arguments
  until its name anyway, and such a delta settles no text it holds, so it reads the same call). A call whose name never comes
  is none, as the translator reads it (it never opens one, and drops what it held): nothing
  of it goes on, it is no client call (the gateway's calls still run), and the round's
  history leaves it out.
- A round answered with one JSON ``chat.completion`` (a backend that ignored ``stream``) is read
  as its stream would be (``ToolLoop.whole``: ``ChunkReader.body``, the reader's own rule for a
  whole body): the same calls held back, the same end held, the rest passed on in stream form,
  in events each within the bound of one (``max_event``; the body may be 8 × that: ``_encode``).
  An error or garbage body is not the loop's: the translator reads it whole, as any turn's.
- A turn without the gateway's tools never meets this file: the relay makes no loop for it.

Theory of operation::

    prelude ──▶ (mcp: list a server's tools the conversation has not listed; run the calls the
       │          client approved since the last turn) ──▶ their results go into round 1's request
    round 1 ──▶ model calls the gateway's functions ──▶ steps run ──▶ results as tool messages ──▶ round 2 …
       │                                                               (a kind's last round offers
       │                                                                none of its functions)
       ├── no call of the gateway's, or the model also called client tools ──▶ Finish
       └── a call needs the client's approval (mcp) ──▶ the others run, then Finish: the client
           answers with mcp_approval_response in its next turn

Each kind bounds its own rounds (``max_rounds``: ``max_web_search_rounds``, ``max_mcp_rounds``).
The request's ``max_tool_calls`` bounds the calls the loop runs, of all kinds together, the
prelude's approved calls too (OpenAI's:
"any further attempts to call a tool by the model will be ignored"): a round's calls past it are
not run (the model reads ``NOT_RUN`` for each), and once it is spent no round offers the
gateway's functions any more. A call the model makes anyway, once a bound is spent (its kind's
rounds, or ``max_tool_calls``), is still the gateway's: its kind ``refuse``-s it (mcp: a ``Call``
refused with the bound's name, a failed ``mcp_call`` that reaches no server; web search: a failed
``web_search_call`` that searches nothing; never a ``function_call`` of a function the client never
declared): the round's steps run, and when every call of the round was refused the turn ends after
it, ``completed`` (no round after it: the model would only ask again); a round in which another call
ran goes on, the model reading both (each round that runs one spends its kind's rounds: the loop
still ends). A step that runs nothing (``spends`` false: mcp's ``Approve``, a call
that waits for the client's approval) spends none of it: the turn that runs the call, if the client
approves it, counts it then. A call the gateway refuses without running it (mcp's: a tool no listing
offers, or one allowed_tools refuses) spends one, and its round one of its kind's: the bounds are on
what the model asks for, so a model that keeps asking for what it cannot have stops.
Usage of the combined turn, as the client reads it: the last round's prompt (it holds every
earlier round: the context the turn used) plus every round's completion tokens. What the turn
made its backend do is more, every round's prompt again (``Work``, ``ToolLoop.work``): a
client's ``tpm`` spends that (each round's ``total_tokens``; a round without a usage, the one
its client left, by ``usage.estimate`` of its chat request and output), and the metrics count
each round's own usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Protocol

from .chatstream import ChunkReader, wire_call
from .sse import MAX_EVENT
from .usage import call_tokens, summed, to_responses_usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
NOT_RUN = "Not run: this response's max_tool_calls was reached."  # what the model reads of a call past it


def rounds_of(n: int) -> str:
    """How a refusal past a kind's spent rounds names them: "1 round", "5 rounds"."""
    return f"{n} round" if n == 1 else f"{n} rounds"


def _event(obj) -> bytes:
    # (backslashreplace: a lone surrogate, from a backend's "\ud800" escape, goes out as that escape)
    return b"data: " + _dumps(obj).encode("utf-8", "backslashreplace") + b"\n\n"


def _data(payload: str) -> bytes:
    """One event that carries ``payload`` as its data (one ``data:`` line per line of it)."""
    data = payload.encode()
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"data: " + data + b"\n\n"


class ServerTool(Protocol):
    """A kind of tool the gateway runs itself (toolmap.SERVER_KINDS: web search, hosted MCP): the
    functions it owns, and what a call to one is."""

    name: str
    max_rounds: int
    rounds: int  # rounds in which the model called it

    def owns(self, name: str) -> bool: ...

    def function_names(self) -> set[str]: ...

    def step(self, call_id: str, name: str, arguments: str): ...

    def refuse(self, call_id: str, name: str, arguments: str, bound: str):
        """The step of a call past a spent bound (``bound``: the setting's name), which runs
        nothing and tells the client why (a failed ``mcp_call``, a failed ``web_search_call``)."""


@dataclass(frozen=True)
class Finish:
    tail: bytes  # what closes the client's combined stream (finish reason, usage, [DONE])


@dataclass(frozen=True)
class Work:
    """What a turn of the loop made its backend do, every round together (``ToolLoop.work``)."""

    tokens: int  # what tpm spends: each round's total_tokens, else its estimate (0: a round refused)
    usage: dict | None  # the backend's own usages of the rounds, summed (Responses shape; None: none came)


@dataclass
class RoundResult:
    calls: list[tuple[str, str, str]]  # the gateway's calls: (call id, function name, arguments)
    client_calls: bool  # the model also called tools the client runs
    finish_reason: str | None
    usage: dict | None
    assistant: dict  # the round's assistant message (for the next round's history)
    done: bool  # the round ended properly ([DONE] or a finish reason)


class ToolLoop:
    """One turn's rounds. Per round: ``body`` is the chat request to send, ``feed`` filters the
    backend's stream (``whole``: its answer as one JSON body; the loop is the relay call's
    reader, relay/upstream.py ``Reader``), ``end_round(ok)`` says what comes
    next; after a list of steps the caller runs them and hands what the model reads of each to
    ``next_round`` (None for a step that gives the model nothing: an approval request). Before round 1, ``prelude`` steps (if any)
    run and ``begin`` takes their results. A round whose stream holds an SSE event larger than
    ``max_event`` bytes is refused: ``feed`` returns None from then on and ``oversized`` is true
    (the caller stops reading and fails the turn). ``max_calls``: the request's ``max_tool_calls``
    (None: no bound but the rounds')."""

    def __init__(self, body: bytes, kinds: list[ServerTool], max_event: int = MAX_EVENT,
                 max_calls: int | None = None):
        self.body = body
        self.kinds = kinds
        self.max_event = max_event
        self.calls_left = max_calls  # (None: unbounded)
        self._placed: list = []  # for each call of the last round, its step's place (None: past ``max_calls``, not run)
        self._chat: dict | None = None
        self._filter = RoundFilter(self.owns, max_event)
        self._usages: list[dict] = []
        self._result: RoundResult | None = None
        self._steps: list = []
        self._refused = False  # the last round's calls were all refused, past a spent bound (``end_round``): the turn ends
        self._open = True  # a round's request is (about to be) with the backend: ``body``, ``_filter``
        self._spent = 0  # backend tokens of the rounds that ended (``work``)

    @property
    def rounds(self) -> int:
        return max((k.rounds for k in self.kinds), default=0)

    def owns(self, name: str) -> bool:
        """The function is one the gateway runs (the filter holds its calls back). Once its
        kind's rounds or ``max_tool_calls`` are spent (its function is not offered any more), a
        call the model makes anyway is the gateway's still: its kind refuses it (``refuse``: a
        failed item; the turn ends after a round whose calls were all refused: ``end_round``)."""
        return any(kind.owns(name) for kind in self.kinds)

    def _bound(self, kind) -> str | None:
        """Which bound of the turn leaves ``kind`` no call to run any more (the words its
        refusal says), or None."""
        if self.calls_left == 0:
            return "max_tool_calls"
        if kind.rounds >= kind.max_rounds:
            return f"max_{kind.name}_rounds"
        return None

    def _kind(self, name: str):
        return next(k for k in self.kinds if k.owns(name))

    # --- before round 1 ------------------------------------------------------------------------

    def prelude(self) -> list:
        """Steps to run before the first round (mcp: listings, approved calls)."""
        return [step for kind in self.kinds for step in getattr(kind, "prelude", tuple)()]

    def begin(self, results: list) -> None:
        """The prelude's steps ran (``results[i]`` answers ``prelude()[i]``): round 1's request
        takes what they gave. Pure: each candidate upstream's loop takes the same results. The
        prelude's calls (steps with a ``call_id``: mcp's approved calls) are this turn's calls
        too: ``max_tool_calls`` counts them (spent, round 1 offers none of the gateway's functions)."""
        steps = self.prelude()
        if not steps:
            return
        chat = self._chat if self._chat is not None else json.loads(self.body)
        for kind in self.kinds:
            begun = getattr(kind, "begin", None)
            if begun is not None:
                chat = begun(chat, steps, results)
        ran = sum(1 for step in steps if getattr(step, "call_id", None) is not None)
        if self.calls_left is not None and ran:
            self.calls_left = max(0, self.calls_left - ran)
            if self.calls_left == 0:
                chat = without(chat, set().union(*(kind.function_names() for kind in self.kinds)))
        self._chat = chat
        self.body = _dumps(chat).encode()

    # --- a round -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes | None:
        out = self._filter.feed(data)
        return None if self._filter.oversized else out

    def whole(self, body: bytes) -> bytes | None:
        """The round's answer as one JSON body (the backend ignored ``stream``), read as its
        stream would be: what the translator may see of it, in stream form (the end held, as
        ``feed`` holds it). None: it is no completion (an error, garbage): the caller hands it
        to the translator whole, as it is."""
        return self._filter.whole(body)

    @property
    def oversized(self) -> bool:
        return self._filter.oversized

    def work(self, failed: bool = False) -> Work:
        """What the turn's rounds made the backend do so far, the one in flight included (its
        client left, or the turn was stopped, midway). A round's tokens are one call's
        (``usage.call_tokens``): its usage's ``total_tokens``; without one, the estimate of its
        chat request and the output it sent, but 0 for a round that failed without any output.
        ``failed``: the turn ended in an error (the translator's), so did the round in flight
        (the relay leaves a round whose call failed before ``end_round`` once its client has
        the failure)."""
        spent, usages = self._spent, self._usages
        if self._open:
            spent += self._round(self._filter.usage, self._filter.chars, failed)
            if self._filter.usage:
                usages = [*usages, self._filter.usage]
        total = None
        for u in usages:
            total = summed(total, to_responses_usage(u))
        return Work(spent, total)

    def _round(self, usage: dict | None, chars: int, failed: bool) -> int:
        """The backend tokens of the round whose request is ``body`` (``usage.call_tokens``)."""
        return call_tokens(usage, len(self.body), chars, failed)

    def end_round(self, ok: bool) -> tuple[bytes, Finish | list]:
        """(bytes still to pass on from this round, the next step). ``ok``: the backend
        answered 200 and its stream ended properly."""
        tail, result = self._filter.finish()
        self._spent += self._round(result.usage, self._filter.chars, failed=not ok or not result.done)
        self._open = False
        self._filter = RoundFilter(self.owns, self.max_event)
        if result.usage:
            self._usages.append(result.usage)
        if not ok or not result.done:
            # A failed or cut round: let the translator see how it ended (its finish reason if it
            # had one; else none, and the translator reports the stream as cut short) and the
            # usage so far.
            return tail, Finish(final_chunks(result.finish_reason, self._usages) if result.finish_reason
                                else usage_chunk(self._usages))
        if not result.calls or result.client_calls:
            # Nothing for the gateway to run, or the client has tool calls to run first: the turn ends here.
            return tail, Finish(final_chunks(result.finish_reason, self._usages))
        self._result = result
        self._steps, self._placed = [], []
        spent = {kind.name: self._bound(kind) for kind in self.kinds}  # (before this round's calls spend any)
        refused = 0
        for call_id, name, args in result.calls:  # (in order: the calls past max_tool_calls are not run)
            kind = self._kind(name)
            if spent[kind.name] is not None:  # a call past a bound spent before this round: refused
                refused += 1
                self._placed.append(len(self._steps))
                self._steps.append(kind.refuse(call_id, name, args, spent[kind.name]))
                continue
            step = kind.step(call_id, name, args)
            if self.calls_left is not None and getattr(step, "spends", True):
                if self.calls_left == 0:
                    self._placed.append(None)
                    continue
                self.calls_left -= 1
            self._placed.append(len(self._steps))
            self._steps.append(step)
        # every call of the round refused: the turn ends after it (the model would only ask again);
        # one that ran besides: the model reads them all, and the kinds' bounds still end the loop
        self._refused = refused > 0 and refused == len(self._steps)
        return tail, list(self._steps)

    def next_round(self, texts: list) -> Finish | None:
        """The steps of the last ``end_round`` ran: ``texts[i]`` is what the model reads of
        ``steps[i]`` (None: nothing, an approval request). Returns ``Finish`` when the turn ends
        here (a call waits for the client's approval), else None: ``body`` is the next round's."""
        result, self._result = self._result, None
        texts = [NOT_RUN if at is None else texts[at] for at in self._placed]  # (past max_tool_calls: not run)
        used = {self._kind(name).name for _, name, _ in result.calls}
        for kind in self.kinds:
            if kind.name in used:
                kind.rounds += 1
        if self._refused or any(text is None for text in texts):
            # the round's calls were all refused, past a spent bound (the model would only ask again), or the client
            # decides first (mcp_approval_request): the turn ends with this round
            return Finish(final_chunks(result.finish_reason, self._usages))
        if self._chat is None:
            self._chat = json.loads(self.body)
        spent = set()
        for kind in self.kinds:
            if kind.rounds >= kind.max_rounds or self.calls_left == 0:
                spent |= kind.function_names()
        self._chat = next_request(self._chat, result.assistant,
                                  [(call_id, text) for (call_id, _, _), text in zip(result.calls, texts)], spent)
        self.body = _dumps(self._chat).encode()
        self._open = True
        return None


_REASONING, _TEXT, _REFUSAL, _TOOL = range(4)  # the order a delta is read in (chatstream.ChunkReader._delta)
_LOGPROBS = -1  # a choice's logprobs: told right before its first text (chatstream.py), so they
# open a choice of their own, the one that text goes in
_ENVELOPE = len(_event({"object": "chat.completion.chunk", "choices": []}))  # an event's bytes around its choices
_PIECE = 64  # bytes around a piece's value in its event, at most (its choice, key, commas)
_WIDEST = 6  # bytes a character of a string takes in an event, at most (\u001f; a lone surrogate's escape)


def _size(value) -> int:
    return len(_dumps(value).encode("utf-8", "backslashreplace"))


def _cut(pieces: list, room: int):
    """(kind, value, cost) for each piece of ``RoundFilter._pieces`` (a call's as its
    ``tool_calls`` entry: ``chatstream.wire_call``), ``cost`` the bytes it adds to its chunk's
    event at most. A piece that may pass ``room`` is cut into several of its kind, each within
    it, that read back as it: a text, reasoning or refusal longer than what fits whatever its
    characters are (``step``) into parts of that many, a call's arguments that pass it into the
    naming delta and argument deltas of the same call, logprobs that pass it into runs of their
    entries. (An entry of logprobs larger than ``room`` on its own stays whole, and so does a
    call whose id or name takes half of it: the translator refuses its event, as it would the
    backend's.)"""
    step = max(1, (room - _PIECE - 2) // _WIDEST)  # characters of a string that fit, whatever they are
    for i in range(0, len(pieces), 2):
        kind, value = pieces[i], pieces[i + 1]
        if kind == _TOOL:
            key, call_id, name, args = value
            head = max(_size(wire_call(key, call_id, name, "")), _size(wire_call(key, None, None, "")))
            fits = max(1, (room - _PIECE - head) // _WIDEST)
            if args is None or len(args) <= fits or 2 * head > room:  # (an id or name that large: no call to cut)
                parts = [args]
            else:
                parts = [args[at:at + fits] for at in range(0, len(args), fits)]
            for n, part in enumerate(parts):
                entry = wire_call(key, call_id, name, part) if n == 0 else wire_call(key, None, None, part)
                yield kind, entry, _size(entry) + _PIECE
        elif kind == _LOGPROBS:
            size = _size(value)
            if size + _PIECE <= room:
                yield kind, value, size + _PIECE
                continue
            run: list = []
            size = 0
            for entry in value:
                cost = _size(entry) + 1
                if run and size + cost + _PIECE > room:
                    yield kind, run, size + _PIECE
                    run, size = [], 0
                run.append(entry)
                size += cost
            yield kind, run, size + _PIECE
        else:
            for at in range(0, len(value), step):
                part = value[at:at + step]
                yield kind, part, _size(part) + _PIECE


class RoundFilter:
    """One round's backend stream in, what the translator may see of it out (a chatstream sink).
    ``owns(name)``: the function is the gateway's (its calls are held back)."""

    def __init__(self, owns: Callable[[str], bool], max_event: int = MAX_EVENT) -> None:
        self._owns = owns
        self._reader = ChunkReader(self, max_event)
        self._out: list[bytes] = []
        self._held = False  # the payload being read has something held back (or a call to move): re-encode it
        self._pieces: list = []  # its deltas, in order, flat: kind, value, kind, value, …
        self._whole = False  # reading a body that held no SSE event
        self._passthrough = False  # … and it is an error or garbage: the translator reads it as it is
        self._calls: dict = {}  # call key -> [id or None, name ("": none yet), argument pieces]
        self._nameless: dict = {}  # call key -> its deltas before its name: [(id, arguments)], each (held: on_tool)
        self._moved: dict = {}  # call key -> the index it goes on under (``_wire_key``)
        self._taken: set = set()  # … those indexes
        self._last_id: dict = {}  # index -> the id of the last call the translator's reader named on it
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._finish: str | None = None
        self._usage: dict | None = None
        self._done = False
        self.chars = 0  # characters of output the backend sent (text, reasoning, call arguments)

    def feed(self, data: bytes) -> bytes:
        for payload in self._reader.parser.feed(data):
            self._payload(payload)
        return self._flush()

    @property
    def oversized(self) -> bool:
        """An event of the round's stream outgrew the parser's bound (sse.py)."""
        return self._reader.parser.oversized

    def whole(self, body: bytes) -> bytes | None:
        """The round's answer as one JSON body (``ToolLoop.whole``); None: an error or garbage."""
        self._whole, self._held = True, False
        self._pieces.clear()
        self._reader.body(body)
        if self._passthrough:
            return None
        if self._pieces:
            self._out.append(self._encode())
        return self._flush()

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
        # (a call still without a name is none: the translator never opens one, and drops the
        # arguments it held for it; the filter passed nothing of it on. Each call gets an id of its
        # own: a backend that gave two calls one id (or none, and one of its ids is call_ws_<n>)
        # would make two steps, items and tool messages of one id, which the translator and the
        # backend's next request read as one call)
        calls, ids = [], set()
        for n, (call_id, name, pieces) in enumerate(self._calls.values()):
            if not name:
                continue
            call_id = call_id or f"call_ws_{n}"
            while call_id in ids:
                call_id = f"{call_id}_{n}"
            ids.add(call_id)
            calls.append((call_id, name, pieces))
        owned = [(call_id, name, "".join(pieces)) for call_id, name, pieces in calls if self._owns(name)]
        message: dict = {"role": "assistant", "content": "".join(self._content) or None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        message["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": "".join(pieces) or "{}"}}
                                 for call_id, name, pieces in calls]
        return self._flush(), RoundResult(owned, len(owned) < len(calls), self._finish,
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
        """The payload's deltas (without what is held back) as chunks that read back as the same
        deltas in the same order: a new choice (index 0 too) where a delta cannot hold the
        next piece after the last, and one for each ``logprobs`` (the translator reads them
        before the delta of their choice, as the tokens of the text that follows). One chunk,
        unless its event would pass the parser's bound (``max_event``: a whole body's deltas,
        up to 8 × that, come as one payload): then several, each within it, a text, reasoning,
        call's arguments or logprobs too long for one cut into several deltas of their kind
        (``_cut``)."""
        room = self._reader.parser.max_event - _ENVELOPE
        events: list[bytes] = []
        choices: list[dict] = []
        delta: dict = {}
        rank = _TOOL + 1
        size = 0
        for kind, value, cost in _cut(self._pieces, room):
            if choices and size + cost > room:  # a full chunk: the next one begins with a new choice
                events.append(_event({"object": "chat.completion.chunk", "choices": choices}))
                choices, size, rank = [], 0, _TOOL + 1
            size += cost
            if kind == _LOGPROBS:
                delta = {}
                choices.append({"index": 0, "delta": delta, "logprobs": {"content": value}})
                rank = _LOGPROBS
                continue
            if kind < rank or (kind == rank and kind != _TOOL):
                delta = {}
                choices.append({"index": 0, "delta": delta})
            rank = kind
            if kind == _REASONING:
                delta["reasoning_content"] = value
            elif kind == _TEXT:
                delta["content"] = value
            elif kind == _REFUSAL:
                delta["refusal"] = value
            else:
                delta.setdefault("tool_calls", []).append(value)
        events.append(_event({"object": "chat.completion.chunk", "choices": choices}))
        return b"".join(events)

    def _flush(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # --- chatstream.Sink ---------------------------------------------------------------------

    def on_start(self) -> None:
        pass

    @property
    def usage(self) -> dict | None:
        """The round's usage, once it came."""
        return self._usage

    def on_reasoning(self, text: str) -> None:
        self._reasoning.append(text)
        self._pieces += (_REASONING, text)
        self.chars += len(text)

    def on_text(self, text: str) -> None:
        self._content.append(text)
        self._pieces += (_TEXT, text)
        self.chars += len(text)

    def on_refusal(self, text: str) -> None:
        self._content.append(text)  # (the round's history: a refusal is what it said, as lowering.py reads one)
        self._pieces += (_REFUSAL, text)
        self.chars += len(text)

    def on_tool(self, key, call_id: str | None, name: str | None, args: str | None) -> None:
        call = self._calls.get(key)
        new = call is None  # (its first naming delta, below: the one that opens it behind the filter too)
        if new:
            call = self._calls[key] = [call_id, name or "", []]
        elif name and not call[1]:
            call[1], new = name, True
            call[0] = call_id  # (the naming delta's id, as the reader tells it: chatstream.py)
        if args:
            call[2].append(args)
            self.chars += len(args)
        if not call[1]:  # no name yet: whose call it is comes with the name (held till then)
            self._held = True
            self._nameless.setdefault(key, []).append((call_id, args))  # (every one: its id, too, is the call's)
            return
        before = self._nameless.pop(key, None) if new and self._nameless else None
        if self._owns(call[1]):
            self._held = True  # the gateway runs it: the client never sees it (nor what came before its name)
        else:
            wire = self._wire_key(key, call_id, name, new)
            if before:  # its deltas before the name go on now, in order, right before the naming one
                self._held = True
                for early_id, early in before:
                    self._pieces += (_TOOL, (wire, early_id, None, early))
            elif wire is not key:
                self._held = True  # (written again, under its own index)
            self._pieces += (_TOOL, (wire, call_id, name, args))  # (written by _cut: wire_call)

    def _wire_key(self, key, call_id: str | None, name: str | None, new: bool):
        """The key a client call's delta goes on under: its own, or, for a call whose key would
        not read back as it, an index of its own. The reader (chatstream.py) opens a new call
        on an index when a naming delta brings an id other than that of the last named call
        there; behind the filter the held calls are gone, so the translator's reader compares
        with the last *client* call named there (``_last_id`` mirrors that). A call the
        filter's reader opened (after a held call's id) with the id of the client call before
        it on its index would be read as more of that call: it and all its later deltas go on
        under a negative index of its own, one per such call, none a client call of the
        backend's was named on. (No backend should send a negative index; a call of one that
        does, named on an index a moved call took, moves too: else the translator's reader
        would read it, or the moved call's later deltas, as the other call's.)"""
        moved = self._moved.get(key)
        if moved is not None:
            return moved
        if name is None:
            return key  # (only a naming delta may open a call)
        index = key[0] if key.__class__ is tuple else key
        last = self._last_id
        if index in self._taken and new:
            pass  # (a moved call's index: this one moves too)
        elif index not in last or (call_id is not None and last[index] != call_id):
            last[index] = call_id  # the translator's reader opens a call here, as the filter's did (or names its first)
            return key
        elif not new:
            return key
        moved = -1 - len(self._moved)
        while moved in last or moved in self._taken:
            moved -= 1
        self._moved[key] = moved
        self._taken.add(moved)
        return moved

    def on_logprobs(self, entries: list) -> None:
        self._pieces += (_LOGPROBS, entries)  # (a chunk written again keeps them: _encode)

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


def next_request(chat: dict, assistant: dict, results: list[tuple[str, str]], spent: set[str] = frozenset()) -> dict:
    """The chat request for the next round: history + the model's calls + their results.
    ``spent``: functions the model is not offered any more (their kind's last round is over).
    A tool choice that forces a call (``required``, a named function) was the round the model
    chose in: the next one is ``auto`` (forced again, the model could never answer)."""
    messages = list(chat["messages"]) + [assistant] + [
        {"role": "tool", "tool_call_id": call_id, "content": text} for call_id, text in results]
    chat = dict(chat, messages=messages)
    choice = chat.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        chat["tool_choice"] = "auto"
    return without(chat, spent)


def without(chat: dict, names: set[str]) -> dict:
    """``chat`` without the functions ``names`` (and without a tool choice when none is left)."""
    if not names:
        return chat
    tools = [t for t in chat.get("tools") or () if t.get("function", {}).get("name") not in names]
    chat = dict(chat)
    if tools:
        chat["tools"] = tools
    else:
        chat.pop("tools", None)
        chat.pop("tool_choice", None)
        chat.pop("parallel_tool_calls", None)
    return chat


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
