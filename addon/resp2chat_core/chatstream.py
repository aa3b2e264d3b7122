"""The one reader of a backend's chat stream: chat-completion chunks in, normalized deltas out.

Rules of this file:
- The only code that looks inside a backend's chunk. The translator (translator.py), the
  tool loop's round filter (toolloop.py) and the contentview (inspect.py) read every chat
  stream through ``ChunkReader`` and never decide a chunk-shape question themselves, so they
  cannot disagree about one.
- A visitor. The reader calls ``Sink`` methods (``on_text``, ``on_tool``, …) in stream order,
  with plain values: no delta objects, no copies of the decoded JSON. It keeps what the rules
  below need across chunks (which calls have a name and an id, whether usage came, the learnt
  envelope) and nothing else.
- Total. Any bytes, however broken, end in sink calls, never in an exception: a payload that is
  no JSON is ``on_garbage``, an error object is ``on_error``. Sans-I/O: no sockets, no clock.
- Hot path. ``payload`` runs once per chunk of every stream: one JSON decode (of the delta
  alone, once the envelope is learnt, see ``_learn``), dict lookups, the sink calls.

Dialects (tests/fixtures/dialects/ holds one recorded-shape stream per rule below)
-------------------------------------------------------------------------------------
- Payloads: ``[DONE]`` ends the stream (``on_done``). An event with empty data is a keep-alive,
  no event. A payload that is no JSON but has several lines (a server that forgot the blank line
  between events) is read line by line, ``data:`` prefixes taken off. Otherwise no JSON, or JSON
  that is not an object: ``on_garbage``. ``{"error": …}`` and vLLM's ``{"object": "error", …}``:
  ``on_error`` with the payload's bytes.
- Choices: the one with ``index`` 0; an absent or ``null`` index means 0. Other indexes are
  ignored (n > 1 is never requested; a backend that sends them anyway is read as n = 1). What
  the choice says is its ``delta``, or its ``message`` where it has no delta (a whole
  ``chat.completion``, in a body or as an event).
- Reasoning: ``delta.reasoning_content`` (DeepSeek, sglang, llama.cpp, LM Studio, older vLLM),
  else ``delta.reasoning`` (vLLM >= 0.10, Ollama, OpenRouter, Groq), or Mistral's content parts
  ``{"type": "thinking", "thinking": [{"type": "text", "text": …}]}``: ``on_reasoning``.
  ``<think>`` tags inside content are not a chunk shape: the translator splits them (think.py),
  as the upstream's think mode says.
- Content: a string, or a list of parts (strings, ``{"type": "text", "text": …}``, Mistral's
  thinking parts, in order): ``on_text``. Empty text is no delta.
- Refusal: ``delta.refusal`` (``message.refusal`` of a whole completion; OpenAI's, Azure's and
  the providers OpenRouter passes it on from), a non-empty string, read after the content:
  ``on_refusal``.
- Tool calls: each entry of ``delta.tool_calls`` is one ``on_tool(key, call_id, name, args)``.
  The *call key* says which call a delta belongs to: the entry's ``index``, else its ``id``
  (Mistral and Ollama send whole calls without index), else its position in the list. The
  first delta of a key names the call (id, name), later ones append argument text (vLLM,
  sglang, llama.cpp, LM Studio, DeepSeek, OpenRouter); or each call comes whole in one delta
  (Ollama, Mistral, Kimi/Groq), possibly with a ``finish_reason`` of ``stop``. A new id with a
  name on a key whose call already has a name is a new call (servers that number every call 0):
  it gets a key of its own, ``(index, n)``, and later deltas of that index belong to it.
  A call's id is its naming delta's; a naming delta without one is told the first id an earlier
  delta of its key gave (an id sent before the name: the call's, as every consumer reads it).
  ``call_id`` and ``name`` are non-empty strings or None; ``args`` is a string or None:
  arguments sent as a JSON value (some servers send parsed objects) are encoded once, with the
  compact encoder. Arguments are passed on as they come; what a finished call's arguments mean
  is the consumer's business (the translator's ``_function_arguments``).
- Logprobs: the choice's ``logprobs.content`` (a list of ``{"token", "logprob", "bytes",
  "top_logprobs"}``: OpenAI, vLLM, llama.cpp when the request asked for ``logprobs``) are the
  tokens of that choice's text: ``on_logprobs`` right before its first ``on_text`` (after its
  reasoning: a whole message, or a chunk, may hold both); a choice with no text (reasoning
  alone, a refusal, tool calls: a backend's reasoning tokens) has none, so they never reach a
  later chunk's text. A choice that says nothing but logprobs (no delta, or an empty one) has
  them told before the text that follows. A chunk with logprobs is never learnt as an envelope
  (they differ from chunk to chunk).
- ``finish_reason``: a non-empty string, lowercased: ``on_finish``, after that choice's delta.
- Usage, in all its places (usage.py): a chunk's ``usage`` or Groq's ``x_groq.usage``
  (``find_usage``), read before the chunk's choices, each one replacing the last; Kimi's
  per-choice ``usage`` on the finish chunk, counted only when no usage came before: ``on_usage``.
- Whole bodies: a backend that answered a stream request with one JSON body, or a body that held
  no SSE event at all (``SSEParser.stray``: a JSON completion or error served as
  ``text/event-stream``, an HTML error page). ``body`` reads it: a ``chat.completion`` is read
  as one chunk, then ``on_done``; an error object, or JSON that is no object, is ``on_error``;
  no JSON is ``on_garbage`` (``NOT_SSE``). ``unread`` reads the stray lines so once the body
  ended, if no event came.

The envelope fast path (``_learn``): backends repeat everything around a chunk's delta (id,
object, created, model, index, logprobs…) byte for byte. Once a plain delta chunk has been
decoded whole, a payload with the same bytes before and after one JSON value is that chunk with
another delta, and only the delta is decoded: a third of the work.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from .sse import MAX_EVENT, SSEParser
from .usage import find_usage

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_raw_decode = json.JSONDecoder().raw_decode

# A lone surrogate: a backend's unpaired ``\ud800`` escape (a pair is one character once decoded).
# It is no Unicode text: nothing made of it could be encoded as UTF-8 (the Response, the store's
# record, a whole answer failed on it). It becomes U+FFFD, as a backend's invalid UTF-8 bytes do
# (sse.py decodes with "replace"). Only a payload that holds such an escape is walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _whole(value):
    """``value`` with every lone surrogate in its strings (keys too) made U+FFFD."""
    cls = value.__class__
    if cls is str:
        return LONE_SURROGATE.sub("\ufffd", value)
    if cls is dict:
        return {_whole(k): _whole(v) for k, v in value.items()}
    if cls is list:
        return [_whole(v) for v in value]
    return value


def _loads(text: str | bytes):
    """``json.loads``, lone surrogates made U+FFFD. ValueError for JSON nested deeper than the
    decoder (or ``_whole``) recurses: no JSON this reader can read, as any other it cannot decode."""
    try:
        value = json.loads(text)
        if _SURROGATE_ESCAPE.search(text if text.__class__ is str else text.decode("utf-8", "replace")):
            value = _whole(value)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return value


_NO_FUNCTION: dict = {}  # (read only) the function of a tool call that has none
_UNHASHABLE = (list, dict)

# what ``on_garbage`` reports: "upstream sent …"
NOT_JSON = "an event that is not JSON"
NOT_OBJECT = "an event that is not a JSON object"
NOT_SSE = "a body that is neither SSE nor JSON"


class Sink(Protocol):
    """What a stream's reader tells its consumer, in stream order."""

    def on_start(self) -> None:
        """The first chunk (a JSON object) arrived: the backend is answering. Once."""

    def on_reasoning(self, text: str) -> None:
        """Reasoning text (non-empty)."""

    def on_text(self, text: str) -> None:
        """Answer text (non-empty; ``<think>`` tags in it are left as they are)."""

    def on_refusal(self, text: str) -> None:
        """The model's refusal text (non-empty): what it says instead of an answer."""

    def on_logprobs(self, entries: list) -> None:
        """The choice's ``logprobs.content`` (non-empty list, as the backend sent it): the tokens
        of the text that follows (right before the choice's first ``on_text``; never for a
        choice without text)."""

    def on_tool(self, key, call_id: str | None, name: str | None, args: str | None) -> None:
        """A tool-call delta. ``key`` (hashable) is the same for every delta of one call."""

    def on_finish(self, reason: str) -> None:
        """The choice's ``finish_reason`` (lowercased)."""

    def on_usage(self, usage: dict) -> None:
        """The backend's usage object (usage.py reads it); a later one replaces it."""

    def on_error(self, body: bytes) -> None:
        """An error object inside the stream, or an error body (errors.upstream_failure)."""

    def on_garbage(self, text: str, what: str) -> None:
        """A payload or body that cannot be read; ``what`` is NOT_JSON, NOT_OBJECT or NOT_SSE."""

    def on_done(self) -> None:
        """``[DONE]``, or the end of a whole body."""


class ChunkReader:
    """Reads one backend stream (or body) into ``sink`` calls. ``feed``/``finish`` take bytes;
    a consumer that keeps its own loop over ``parser`` calls ``payload`` per event and
    ``unread`` at the end. A sink that wants nothing more sets ``stopped``."""

    __slots__ = ("sink", "parser", "saw_event", "stopped", "hits", "misses", "_envelope", "_usage_seen",
                 "_keys", "_named", "_early")

    def __init__(self, sink: Sink, max_event: int = MAX_EVENT) -> None:
        self.sink = sink
        self.parser = SSEParser(max_event)  # (max_event: sse.py, the max_upstream_event_mb setting)
        self.saw_event = False  # a chunk (a JSON object) arrived: the body is SSE
        self.stopped = False  # the sink wants no more calls (read by the loops inside one payload)
        self.hits = self.misses = 0  # the envelope fast path: payloads it decoded; envelopes that never hit
        self._envelope: tuple[str, str] | None = None  # the bytes around a learnt chunk's delta
        self._usage_seen = False
        self._keys: dict = {}  # raw call key -> the key of its current call (only after a reuse)
        self._named: dict = {}  # call key -> the id of its call (as its first delta with a name was told)
        self._early: dict = {}  # call key not named yet -> the first id one of its deltas gave

    # --- bytes ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        for payload in self.parser.feed(data):
            if self.stopped:
                return
            self.payload(payload)

    def finish(self) -> None:
        """The body ended: its last event, then a body that held no SSE event, read whole."""
        for payload in self.parser.finish():
            if self.stopped:
                return
            self.payload(payload)
        self.unread()

    def unread(self) -> bytes | None:
        """After the last event: if no SSE event came but the body held other lines, read those
        as one whole body (``body``); returns that body (None: nothing was read)."""
        stray = self.parser.stray
        if self.saw_event or not stray or self.stopped:
            return None
        self.parser.stray = None
        whole = b"\n".join(stray)
        self.body(whole)
        return whole

    # --- one event -----------------------------------------------------------------------------

    def payload(self, payload: str) -> None:
        """One SSE event's data."""
        env = self._envelope
        if env is not None and payload.startswith(env[0]) and payload.endswith(env[1]):
            # Same envelope as an earlier plain delta chunk: decode only the delta (see _learn).
            try:
                delta, end = _raw_decode(payload, len(env[0]))
                if end == len(payload) - len(env[1]) and delta.__class__ is dict and _SURROGATE_ESCAPE.search(payload):
                    delta = _whole(delta)
            except (ValueError, RecursionError):  # (nested too deeply: the slow path says garbage)
                delta, end = None, 0
            if end == len(payload) - len(env[1]) and delta.__class__ is dict:
                self.hits += 1
                if delta:
                    self._delta(delta)
                return
        if payload == "[DONE]" or (payload[:1] in ("[", " ") and payload.strip() == "[DONE]"):
            self.sink.on_done()
            return
        try:
            chunk = _loads(payload)
        except ValueError:
            lines = payload.split("\n")
            if len(lines) > 1:  # events without the blank line between them: each line on its own
                for line in lines:
                    if self.stopped:
                        return
                    self.payload(line.removeprefix("data:").strip())
            elif payload.strip():
                self.sink.on_garbage(payload, NOT_JSON)
            return  # an event with empty data (a keep-alive) is no event
        if chunk.__class__ is not dict:
            self.sink.on_garbage(payload, NOT_OBJECT)
            return
        if not self.saw_event:
            self.saw_event = True
            self.parser.stray = None  # SSE after all: stop keeping non-SSE lines
            self.sink.on_start()
        if chunk.get("error") or chunk.get("object") == "error":
            self.sink.on_error(payload.encode())
            return
        self._chunk(chunk, payload)

    def body(self, body: bytes) -> None:
        """A whole body: a non-streamed ``chat.completion``, or an error."""
        try:
            data = _loads(body)
        except ValueError:
            self.sink.on_garbage(body.decode("utf-8", "replace"), NOT_SSE)
            return
        if not isinstance(data, dict) or data.get("error") or data.get("object") == "error":
            self.sink.on_error(body)
            return
        if not self.saw_event:
            self.saw_event = True
            self.sink.on_start()
        self._chunk(data, None)
        if not self.stopped:
            self.sink.on_done()

    # --- inside a chunk ------------------------------------------------------------------------

    def _chunk(self, chunk: dict, payload: str | None) -> None:
        sink = self.sink
        usage = find_usage(chunk)
        if usage is not None:
            self._usage_seen = True
            sink.on_usage(usage)
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or (choice.get("index") or 0) != 0:
                continue  # n > 1 is never requested: the first choice is the answer
            logprobs = choice.get("logprobs")
            delta = choice.get("delta")
            if delta is None:
                delta = choice.get("message")  # a whole chat.completion
            if logprobs:
                content = logprobs.get("content") if logprobs.__class__ is dict else None
                logprobs = content if content and content.__class__ is list else None
                if logprobs is not None and not delta:
                    sink.on_logprobs(logprobs)  # (a choice of logprobs alone: the text that follows is theirs)
                    logprobs = None
            if delta and isinstance(delta, dict):
                if payload is not None and usage is None and len(choices) == 1 and not choice.get("finish_reason") \
                        and not choice.get("usage") and not logprobs:
                    self._learn(payload, delta)
                self._delta(delta, logprobs)
            reason = choice.get("finish_reason")
            if reason and isinstance(reason, str):
                per_choice = choice.get("usage")
                if not self._usage_seen and isinstance(per_choice, dict) and per_choice:
                    self._usage_seen = True  # Moonshot/Kimi: usage in the finishing choice
                    sink.on_usage(per_choice)
                sink.on_finish(reason.lower())
                if self.stopped:
                    return

    def _delta(self, delta: dict, logprobs: list | None = None) -> None:
        """``logprobs``: the choice's ``logprobs.content``, told right before its first text (none:
        they are no text's)."""
        sink = self.sink
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and reasoning.__class__ is str:
            sink.on_reasoning(reasoning)
        content = delta.get("content")
        if content:
            if content.__class__ is str:
                if logprobs is not None:
                    sink.on_logprobs(logprobs)
                sink.on_text(content)
            elif content.__class__ is list:
                self._parts(content, logprobs)
        refusal = delta.get("refusal")
        if refusal and refusal.__class__ is str:
            sink.on_refusal(refusal)
        calls = delta.get("tool_calls")
        if calls and calls.__class__ is list:
            for pos, call in enumerate(calls):
                if call.__class__ is dict:
                    self._call(pos, call)

    def _parts(self, parts: list, logprobs: list | None) -> None:
        """Content as a list of parts: Mistral's ``{"type": "thinking", "thinking": [{"type":
        "text", "text": …}]}`` reasoning and ``{"type": "text", "text": …}`` text, in order
        (``logprobs`` before the first text)."""
        sink = self.sink
        for part in parts:
            if part.__class__ is str:
                text = part
            elif part.__class__ is not dict:
                continue
            elif part.get("type") == "thinking":
                thinking = part.get("thinking")
                for piece in thinking if isinstance(thinking, list) else [thinking]:
                    text = piece.get("text") if isinstance(piece, dict) else piece
                    if text and isinstance(text, str):
                        sink.on_reasoning(text)
                continue
            else:
                text = part.get("text")
            if text and isinstance(text, str):
                if logprobs is not None:
                    sink.on_logprobs(logprobs)
                    logprobs = None
                sink.on_text(text)

    def _call(self, pos: int, call: dict) -> None:
        fn = call.get("function")
        if fn.__class__ is not dict:
            fn = _NO_FUNCTION
        args = fn.get("arguments")
        if args is not None and args.__class__ is not str:
            args = _dumps(args)  # parsed arguments (Ollama-style objects): encoded once
        name = fn.get("name")
        if not name or name.__class__ is not str:
            name = None
        call_id = call.get("id")
        if not call_id or call_id.__class__ is not str:
            call_id = None
        raw = call.get("index")
        if raw is None or raw.__class__ in _UNHASHABLE:
            raw = call_id if call_id is not None else pos
        key = self._keys.get(raw, raw) if self._keys else raw
        if name is not None:
            named = self._named
            if key not in named:
                early = self._early.pop(key, None) if self._early else None
                if call_id is None:
                    call_id = early  # (the id its key's deltas before the name gave)
                named[key] = call_id
            elif call_id is not None and named[key] != call_id:
                key = self._keys[raw] = (raw, len(named))  # a new call that reuses a known index
                named[key] = call_id
        elif call_id is not None and key not in self._named and key not in self._early:
            self._early[key] = call_id  # a call's id before its name: the call's, if the name comes without one
        self.sink.on_tool(key, call_id, name, args)

    def _learn(self, payload: str, delta: dict) -> None:
        """Remember the bytes around the delta of a plain delta chunk (one choice, no finish
        reason, no usage). Backends repeat that envelope byte for byte (id, model, created…), so
        a later payload that starts and ends with the same bytes, with one whole JSON value in
        between, is the same chunk with another delta: ``payload`` then decodes just that value.
        A backend whose envelope changes every chunk stops being learnt."""
        if self.hits == 0 and self._envelope is not None:
            self.misses += 1  # the last envelope never matched again
        self.hits = 0
        if self.misses > 8:
            self._envelope = None
            return
        at = payload.find('"delta":')
        if at < 0 or payload.find('"delta":', at + 8) >= 0:
            return
        start = at + 8
        while payload[start:start + 1] in (" ", "\t", "\n", "\r"):
            start += 1
        try:
            value, end = _raw_decode(payload, start)
            # The literal key found must be the one decoding keeps: put a probe value in its place
            # (a duplicate "delta" key later on, or one spelled with escapes, would win instead).
            probe = _loads(payload[:start] + '{"\\u0000":0}' + payload[end:])
            kept = probe["choices"][0]["delta"]
        except (ValueError, LookupError, TypeError, RecursionError):
            return
        if value == delta and kept == {"\x00": 0}:
            self._envelope = (payload[:start], payload[end:])


def wire_call(key, call_id: str | None, name: str | None, args: str | None) -> dict:
    """A ``tool_calls`` entry that a reader reads back as this ``on_tool`` delta, under the same
    key (toolloop.py's round filter re-encodes the chunks it changes with it)."""
    if key.__class__ is tuple:
        entry = {"index": key[0]}  # a reused index: the new id (on the naming delta) makes the new call
    elif call_id is not None and key == call_id:
        entry = {}  # keyed by its id
    else:
        entry = {"index": key}
    if call_id is not None:
        entry["id"] = call_id
    fn = {}
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    entry["function"] = fn
    return entry
