"""The typed, in-process link from the upstream relay to one turn's translator.

Rules of this file:
- Backend bytes are only ever backend data. What the *gateway* has to say about a turn (it has
  started, the backend is silent, the backend failed, a web search or an MCP call runs) travels as the objects
  below, never as bytes: nothing a backend sends can be mistaken for them.
- Sans-I/O. The relay (resp2chat_io/relay/) produces, the stream callable consumes; both run on
  mitmproxy's event loop, so there are no locks. ``wake`` and ``on_take`` are the only hooks
  into the outside world, and neither is called re-entrantly.

Theory of operation
-------------------
mitmproxy calls a flow's stream callable only when bytes arrive on the flow's server connection
(mitmproxy issue #8103: an addon cannot write into a live stream). So the relay answers
mitmproxy's request with a body of *ticks* whose content means nothing: a tick only makes
mitmproxy call the callable, which then ``take``\\ s everything queued in this channel, in order.
At most one tick is in flight (``_woken``): items that arrive before the callable ran ride on the
same tick, so under load one mitmproxy pass serves many backend reads. Flow control is explicit:
``size`` is the backend bytes waiting here; the relay stops reading the backend past a limit and
``on_take`` tells it to read again.

A consumer that needs no ticks sets ``push`` instead: items go to it as a list, at once, nothing
queues (a client that did not ask for a stream gets one JSON body at the end, so nothing needs to
reach mitmproxy before then; the WebSocket transport sends each event as a message).

Time-based coalescing (``window``, the ``coalesce_ms`` setting): every delivery costs one
mitmproxy pass (a tick) or one round of WebSocket messages through mitmproxy's addon chain, and
a model streaming 20-100 tokens a second sends one token per read, so one pass per token. Once
the consumer has sent its first events made from backend data (``started``: the first token
never waits), deliveries are at most one per ``window`` seconds: news that comes sooner after
the last delivery is held until ``window`` after it (the relay's clock and timer: ``now``,
``later``, then ``due``), and whatever arrives meanwhile rides on the same delivery. So a stream
faster than one token per ``window`` has its tokens delivered together, ``window`` apart (at 50
tokens/s and a 40 ms window, two per pass: each waits 20 ms on average, the gaps the client sees
are 40 ms instead of 20); a slower one is never held. Nothing waits longer than ``window``:
keepalives and failures ride on the held delivery, and when the relay's work ends (``flush``),
what is held goes at once (a push consumer gets it; a tick consumer's last call, at the end of
the relay's body, takes it: a timer never ticks after the body ended). While news is held the
relay need not hear each token as it comes: a stream that goes on past a held delivery is read
once per window (``reads``, relay/exchange.py ``_Window``), so its end, like its tokens, may
wait up to a window; a burst that ends within its first window is not held.

``Reader`` is the consumer's half: it applies items to a translator and keeps both sides' bytes
for the flow record and the replay cache, and where among the backend's bytes each of the
gateway's own events came (``gateway``), so a recording can be translated again exactly
(``record_events`` / ``rebuild_event``; ``resp2chat retranslate``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Callable, Union, get_args


@dataclass(frozen=True, slots=True)
class Accepted:
    """The relay took the turn: the client may hear ``response.created`` now."""

    def apply(self, t) -> bytes:
        return t.accepted()


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The backend is still silent (a long prefill): keep the client's idle timer alive."""

    def apply(self, t) -> bytes:
        return t.keepalive()


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The backend answered with an error status, could not be reached, or went silent.
    ``body`` is the backend's own error body, or an OpenAI-style error the relay wrote (``own``:
    the gateway's wording, shown to the client; a backend's 5xx words are not, errors.py).
    ``forwarded``: the backend was sent the client's own credentials (routing.py
    ``Candidate.forwarded``): a 401/403 refused those, not the gateway's key (errors.py
    ``KEY_REFUSED``)."""

    status: int
    body: bytes
    retry_after: str | None = None
    own: bool = False
    forwarded: bool = False

    def apply(self, t) -> bytes:
        return t.fail_upstream(self.status, self.body, self.retry_after, self.own, self.forwarded)


@dataclass(frozen=True, slots=True)
class UpstreamJSON:
    """The backend ignored ``stream: true`` and answered with one JSON body (in a tool loop's
    round, only one that is no completion: the loop reads a completion, ``ToolLoop.whole``; never
    in the compaction summary's call: its reader reads it, ``SummaryReader.whole``)."""

    body: bytes

    def apply(self, t) -> bytes:
        return t.translate_json(self.body)


@dataclass(frozen=True, slots=True)
class SearchStarted:
    """The gateway runs a web search the model asked for (websearch.py)."""

    call_id: str
    query: str
    refused: bool = False  # the gateway refused the call (past a spent bound): no search runs

    def apply(self, t) -> bytes:
        return t.search_started(self.call_id, self.query, bool(self.refused))


@dataclass(frozen=True, slots=True)
class SearchDone:
    call_id: str
    sources: tuple[tuple[str, str], ...]  # (URL, title) each: websearch.read_brave's
    failed: bool = False  # no search ran: the gateway refused the call (past a spent bound)

    def apply(self, t) -> bytes:
        return t.search_done(self.call_id, self.sources, bool(self.failed))


@dataclass(frozen=True, slots=True)
class McpListing:
    """The gateway lists an MCP server's tools (mcp.py): an ``mcp_list_tools`` item opens."""

    label: str

    def apply(self, t) -> bytes:
        return t.mcp_listing(self.label)


@dataclass(frozen=True, slots=True)
class McpListed:
    label: str
    tools: str  # the listing's tools, the allowed ones (mcp.listed_tool dicts), as JSON: a record keeps their order
    error: str | None = None  # the listing failed: why (the server's words, bounded)

    def apply(self, t) -> bytes:
        return t.mcp_listed(self.label, json.loads(self.tools), self.error)


@dataclass(frozen=True, slots=True)
class McpCalling:
    """The gateway runs an MCP tool the model called (or the client approved): an ``mcp_call`` item."""

    call_id: str
    label: str
    name: str
    arguments: str
    approval_request_id: str | None = None

    def apply(self, t) -> bytes:
        return t.mcp_calling(self.call_id, self.label, self.name, self.arguments, self.approval_request_id)


@dataclass(frozen=True, slots=True)
class McpCalled:
    call_id: str
    output: str | None
    error: str | None = None  # the call failed: its error object as JSON (mcp_protocol_error, mcp_tool_execution_error, http_error)

    def apply(self, t) -> bytes:
        return t.mcp_called(self.call_id, self.output, json.loads(self.error) if self.error is not None else None)


@dataclass(frozen=True, slots=True)
class McpApproval:
    """A call the model made waits for the client's approval: an ``mcp_approval_request`` item."""

    label: str
    name: str
    arguments: str

    def apply(self, t) -> bytes:
        return t.mcp_approval(self.label, self.name, self.arguments)


@dataclass(frozen=True, slots=True)
class Rerouted:
    """A fallback upstream answers this turn (routing.py), the ``alternate``-th (1: the first
    fallback): the translator reads ``<think>`` tags its way (its ``think_tags``) and its tool
    calls with its tool map (its ``tool_denylist``…). Sent before its first byte, so nothing was
    translated yet."""

    think: str
    alternate: int = 0

    def apply(self, t) -> bytes:
        return t.rethink(self.think, self.alternate)


@dataclass(frozen=True, slots=True)
class Oversized:
    """The backend sent an SSE event (or line) larger than ``limit`` bytes (``max_upstream_event_mb``),
    seen by the relay (a web-search round reads the stream before the translator does): the turn
    fails, and the relay has stopped reading the backend."""

    limit: int

    def apply(self, t) -> bytes:
        return t.oversized(self.limit)


@dataclass(frozen=True, slots=True)
class Stopped:
    """The gateway stopped the turn while it ran (``Exchange.halt``: its key was revoked): it
    fails with ``code`` now, what it was writing closed as any failure closes it (``Translator._cut``);
    the relay has dropped the backend call and runs no more tool rounds."""

    code: str
    message: str

    def apply(self, t) -> bytes:
        return t.fail(self.code, self.message)


@dataclass(frozen=True, slots=True)
class Compacted:
    """The turn's compaction round wrote its summary (server-side compaction: compaction.py):
    ``item`` is the sealed compaction item, the output's first; ``output_tokens``, the summary's
    (the client's usage counts them); ``sse``, what the backend sent of the summary, for the
    flow's record (``record_events``: the turn's ``upstream_sse`` is its answer's alone)."""

    item: dict
    output_tokens: int = 0
    sse: bytes = b""  # the summary's backend stream, as it came (compaction.py ``SummaryReader.sse``): for the flow record

    def apply(self, t) -> bytes:
        return t.compacted(self.item, self.output_tokens)


@dataclass(frozen=True, slots=True)
class Summarized:
    """A compaction turn's summary, read whole by the relay (Codex's trigger, the compact endpoint:
    compaction.py): ``item`` is its sealed compaction item, the turn's answer; ``usage``, the
    backend's usage object as it gave it (None: none); ``sse``, the summary's backend stream."""

    item: dict
    usage: dict | None = None
    sse: bytes = b""  # the summary's backend stream, as it came (``Compacted.sse``)

    def apply(self, t) -> bytes:
        return t.summarized(self.item, self.usage)


Event = Union[Accepted, Keepalive, UpstreamFailed, UpstreamJSON, SearchStarted, SearchDone, McpListing, McpListed,
              McpCalling, McpCalled, McpApproval, Rerouted, Oversized, Stopped, Compacted, Summarized]
Item = Union[bytes, Event]


class Channel:
    __slots__ = ("_items", "size", "_woken", "wake", "on_take", "push", "closed", "window", "later", "now", "last",
                 "started", "reads", "sent")

    def __init__(self, push: Callable[[list[Item]], None] | None = None) -> None:
        self._items: list[Item] = []
        self.size = 0  # backend bytes queued, not yet taken
        self._woken = False  # a tick is on its way to the consumer (or held: ``window``)
        self.wake: Callable[[], None] | None = None  # set by the relay: send one tick
        self.on_take: Callable[[], None] | None = None  # set by the relay: resume reading
        self.push = push  # a consumer that takes items at once, as a list (no ticks)
        # Set by the consumer (``Reader``) once its translator sent the turn's terminal event:
        # more backend data is waste, and the relay stops reading the backend at the next (a
        # backend's last bytes, the end of its body, still arrive: its connection is reused).
        self.closed = False
        self.window = 0.0  # seconds between deliveries at least, once started (0: every news at once)
        self.later: Callable[[float], None] | None = None  # set by the relay: call ``due`` in that many seconds
        self.now: Callable[[], float] | None = None  # set by the relay: its clock (seconds)
        self.last = float("-inf")  # when the last delivery went (``now``)
        self.started = False  # set by the consumer (``Reader``): its first events from backend data left
        # Set by the relay while it reads a backend stream (relay/upstream.py ``_BodyPump``): how
        # that stream is read while news is held (``defer``: not at every arrival; ``drain``:
        # read what is there now, before a held delivery goes; ``listen``: at every arrival again).
        self.reads = None
        # Set by the relay when it handed the turn's first chat request to a backend's connection
        # (its monotonic clock, seconds): what the gateway itself took before a backend could
        # start ends there (the gateway's latency: addons/metrics.py, the access log).
        self.sent: float | None = None

    # --- producer (the relay) ----------------------------------------------------------------

    def data(self, chunk: bytes) -> None:
        if chunk:
            self._items.append(chunk)
            self.size += len(chunk)
            self._signal()

    def event(self, event: Event) -> None:
        self._items.append(event)
        self._signal()

    def _signal(self) -> None:
        if self._woken:
            return  # (it rides on the tick on its way, or held)
        if self.push is None and self.wake is None:
            return  # (the relay's body ended: the consumer's last call takes it)
        self._woken = True
        if self.started and self.window and self.later is not None:
            wait = self.last + self.window - self.now()
            if wait > 0:
                self.later(wait)  # held: what comes meanwhile rides on the same delivery
                return
        self._deliver()

    def _deliver(self) -> None:
        if self.now is not None:
            self.last = self.now()
        if self.push is not None:
            self.push(self.take())
        elif self.wake is not None:
            self.wake()
        else:
            self._woken = False

    def attach(self, wake: Callable[[], None]) -> None:
        """The relay serves the consumer from now on (``wake``: one tick). News that came before
        (the producer ran before the relay could tick: server.py ``begin``) gets its tick now."""
        self.wake = wake
        if self._items:
            self._signal()

    def due(self) -> None:
        """The window ran out (the relay's timer): what is held goes now."""
        if self._woken and self._items:
            self._deliver()

    def flush(self) -> None:
        """The relay's work for the turn ended: nothing is held any longer. A push consumer gets
        what was held now; a tick consumer's last call (the end of the relay's body) takes it."""
        self.later = None
        if self.push is not None and self._items:
            self.push(self.take())

    # --- consumer (the stream callable) ------------------------------------------------------

    def take(self) -> list[Item]:
        items, self._items = self._items, []
        self.size = 0
        self._woken = False
        if self.on_take is not None:
            self.on_take()
        return items

    def give_back(self, items: list[Item]) -> None:
        """The consumer took more than it handles in this call: ``items`` go back in front of
        whatever came since, and one more tick is asked for (without ``wake``, the relay's body
        has ended: the consumer's last call takes them)."""
        if items:
            self._items[:0] = items
            self.size += sum(len(item) for item in items if item.__class__ is bytes)
            self._signal()


class Reader:
    """Applies channel items to one translator and keeps what both sides said (up to ``cap``
    bytes each): the backend's bytes for the flow record, the client's for the replay cache.
    ``secrets`` (the configured keys) are scrubbed from what the client gets: a backend that
    echoes a key must not show it. Once the translator is done, the ``channel`` it reads is
    ``closed``: the relay stops reading the backend."""

    __slots__ = ("translator", "_upstream", "upstream_size", "_sent", "sent_size", "cap", "secrets", "on_first",
                 "started", "gateway", "channel")

    def __init__(self, translator, cap: int, secrets: tuple[bytes, ...] = (), channel: Channel | None = None) -> None:
        self.translator = translator
        self.channel = channel
        # what both sides said, as pieces (joined once, at the end: a growing buffer would be
        # copied again each time it outgrew its allocation)
        self._upstream: list[bytes] = []
        self.upstream_size = 0
        self._sent: list[bytes] = []
        self.sent_size = 0
        self.cap = cap
        self.secrets = secrets
        # called once, when the first events made from backend data leave (time to first
        # token: the metrics addon sets it; the core reads no clock; a compaction turn's, its
        # summary the relay read whole: ``Summarized``)
        self.on_first: Callable[[], None] | None = None
        self.started = False  # the first events made from backend data left
        self.gateway: list[tuple[int, Event]] = []  # (backend bytes before it, event)

    def apply(self, item: Item) -> bytes:
        if item.__class__ is bytes:
            room = self.cap - self.upstream_size
            if room > 0:
                piece = item if len(item) <= room else item[:room]
                self._upstream.append(piece)
                self.upstream_size += len(piece)
            out = self._out(self.translator.feed(item))
            if out and not self.started:
                self._first()
        else:
            if len(self.gateway) < 4096:
                self.gateway.append((self.upstream_size, item))
            out = self._out(item.apply(self.translator))
            if out and not self.started and item.__class__ is Summarized:  # (the backend's summary, read whole)
                self._first()
        if self.channel is not None and self.translator.done:
            self.channel.closed = True
        return out

    def _first(self) -> None:
        self.started = True
        if self.channel is not None:
            self.channel.started = True  # from now on news may be held (Channel.window)
        if self.on_first is not None:
            self.on_first()

    def apply_all(self, items: list[Item]) -> bytes:
        """``apply`` of each item, in order: what a push consumer does with what the channel hands it.
        A translator that merges runs of deltas (``Translator.merge``) reads the backend's bytes
        in a row as one, so that a run goes on across them."""
        if len(items) == 1:
            return self.apply(items[0])
        if self.translator.merge:
            items = _bytes_joined(items)
        return b"".join([self.apply(item) for item in items])

    def finish(self) -> bytes:
        return self._out(self.translator.finish())

    def fail(self, code: str, message: str, detail: str | None = None) -> bytes:
        return self._out(self.translator.fail(code, message, detail))

    def fail_instead(self, code: str, message: str) -> bytes:
        """The ``response.completed`` (or ``.incomplete``) the translator said, never sent, taken
        back: its ``response.failed`` instead (``Translator.fail_instead``), as the client gets it."""
        return self._out(self.translator.fail_instead(code, message))

    def _out(self, out: bytes) -> bytes:
        if out:
            if self.secrets:
                out = scrub(out, self.secrets)
            room = self.cap - self.sent_size
            if room > 0:
                piece = out if len(out) <= room else out[:room]
                self._sent.append(piece)
                self.sent_size += len(piece)
        return out

    @property
    def upstream(self) -> bytes:
        """The backend's bytes (up to ``cap``)."""
        return b"".join(self._upstream)

    @property
    def sent(self) -> bytes:
        """What the client got (up to ``cap``)."""
        return b"".join(self._sent)


def _bytes_joined(items: list[Item]) -> list[Item]:
    """``items`` with each row of backend bytes as one."""
    out: list = []
    for item in items:
        if item.__class__ is bytes and out and out[-1].__class__ is list:
            out[-1].append(item)
        else:
            out.append([item] if item.__class__ is bytes else item)
    return [b"".join(item) if item.__class__ is list else item for item in out]


def scrub(data: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """``data`` with each of ``secrets`` replaced by ``[redacted]``: as its bytes, and as a JSON
    string may write it (``_spellings``: a backend's JSON answer that repeats a key, PHP's
    ``\\/``, .NET's ``\\u002B``, which its client's parser reads back as the key) or Python's
    ``repr`` inside a longer string (an error's text that quotes it: an httpx, requests or MCP
    SDK exception, ``\\\\`` for a backslash, ``\\'`` for a quote), and JSON's spelling of that
    (such a text in a Python backend's JSON error: ``\\\\'``). The longest
    first (``longest_first``): one secret inside another (an upstream key and a header value
    that begins with it) would otherwise leave the longer one's rest."""
    for secret in longest_first(tuple(secrets)) if len(secrets) > 1 else secrets:
        if secret in data:
            data = data.replace(secret, b"[redacted]")
        if b"\\" in data:
            anchor = _anchor(secret)
            if anchor is not None and anchor in data:  # (before the pattern: it costs ~25 ms a KiB of secret to make)
                clean, found = _spellings(secret).subn(b"[redacted]", data)
                data = clean if found else data  # (the same object when nothing was found: redact.py)
    return data


def longest_first(secrets: tuple) -> tuple:
    """``secrets`` (bytes or str), the longest first: what replaces them one by one (``scrub``,
    gate.py ``without_credentials``) must meet one that holds another before the other. Not
    cached: they are a client's credentials too (what it presented, what it forwards, its MCP
    headers), which a cache would keep after the request (the config holds only client keys'
    hashes); a sort of a few is cheaper than the rest of a scrub."""
    return tuple(sorted(secrets, key=len, reverse=True))


@functools.lru_cache(maxsize=256)
def _anchor(secret: bytes) -> bytes | None:
    """A part of ``secret`` every spelling of it (``_spellings``) holds as is: its longest run of
    ASCII letters and digits, which neither JSON nor Python escapes (``b""`` when it has none); or
    None when only its bytes spell it (letters and digits alone, or not UTF-8). Cheap: what is
    scrubbed is looked for it before the pattern is made."""
    try:
        text = secret.decode()
    except UnicodeDecodeError:
        return None
    if text.isascii() and text.isalnum():
        return None
    return max(re.findall(r"[A-Za-z0-9]+", text), key=len, default="").encode()


@functools.lru_cache(maxsize=256)
def _spellings(secret: bytes) -> re.Pattern:
    """A pattern of the spellings of ``secret`` (one ``_anchor`` is not None for): each of its
    characters other than ASCII letters and digits as it is, as JSON may write it (``\\uXXXX`` in
    either case, a ``/`` also ``\\/``, ``json.dumps``'s short escapes: ``\\"``, ``\\\\``, ``\\t``…), as
    Python's ``repr`` does inside a longer string (``_python``) or as JSON writes that (a Python
    backend's error text in a JSON answer: ``\\\\'`` for a quote, ``\\\\\\\\`` for a backslash, ``\\\\t``
    for a tab). A character no escape changes (most of a key's: ``-``, ``_``, ``.``) is matched as
    it is: a secret of such characters costs what it did before these spellings. Made only when
    needed (what is scrubbed holds a backslash and the anchor): its compiling takes ~25 ms a KiB
    of secret."""
    parts = []
    for c in secret.decode():
        if c.isascii() and c.isalnum():
            parts.append(re.escape(c.encode()))
            continue
        units = [br"\\u" + "".join(f"[{h.lower()}{h.upper()}]" if h.isalpha() else h for h in f"{u:04x}").encode()
                 for u in _utf16(c)]
        forms = [re.escape(c.encode()), b"".join(units)]  # (a surrogate pair: both escapes in a row)
        python = _python(c)
        for other in ("\\/" if c == "/" else "", json.dumps(c, ensure_ascii=False)[1:-1], python,
                      json.dumps(python, ensure_ascii=False)[1:-1]):
            if other and other != c and re.escape(other.encode()) not in forms:
                forms.append(re.escape(other.encode()))
        parts.append(b"(?:" + b"|".join(forms) + b")")
    return re.compile(b"".join(parts))


def _python(c: str) -> str:
    """One character as ``repr`` writes it inside a longer string: a backslash doubled, ``'``
    escaped (the text around it held both quotes; in one that held only ``'``, Python quotes with
    ``"``, and it is as it is), a control or unprintable character as ``\\t``, ``\\x7f``, ``\\u200b``."""
    return repr("'\"" + c)[4:-1]


def _utf16(c: str) -> list[int]:
    """The UTF-16 code units of one character (JSON's ``\\u`` escapes)."""
    units = c.encode("utf-16-be")
    return [int.from_bytes(units[i:i + 2], "big") for i in range(0, len(units), 2)]


def scrub_keep(secrets: tuple[bytes, ...]) -> int:
    """The longest any of ``secrets`` may be spelled (``scrub``), in bytes: 6 a byte of it. A JSON
    escape is 6 bytes (12 for a character past U+FFFF, 4 bytes plain), Python's at most 4 for a
    character of 1 or 2 bytes (``\\x7f``), 6 for one of 2 or 3 (``\\u200b``), 10 for one of 4
    (``\\U000e0001``); JSON's of Python's a byte more for each backslash Python wrote (4 for a
    backslash, 5 for ``\\\\x7f``, 7 for ``\\\\u0378``, a character of 2 bytes, 11 for one of 4)."""
    return max((len(s) if _anchor(s) is None else 6 * len(s) for s in secrets), default=1)


class Scrubber:
    """``scrub`` for a body that passes in pieces (mitmproxy's stream callable: a passthrough
    answer): it holds back the last bytes of what it has seen, one less than the longest spelling
    of a secret (``scrub_keep``), so a secret split between two pieces is still found; ``b""``
    (the end) lets the rest go. Returns a list of pieces, never an empty piece (mitmproxy would
    send it as the end of a chunked body).

    What it holds back is held as it came, not yet scrubbed, and what goes is cut where no
    spelling of a secret begins before the cut and ends after it (``_clear``): so what goes is
    scrubbed as the whole body would be. (Scrubbing all it had seen before cutting replaced a
    secret inside another, longer one still coming, an upstream key at the start of a header
    value: the longer one's rest went out with the next piece.)"""

    __slots__ = ("secrets", "keep", "tail")

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        self.secrets = secrets
        self.keep = scrub_keep(secrets) - 1
        self.tail = b""

    def __call__(self, data: bytes) -> list[bytes]:
        if not data:
            out, self.tail = scrub(self.tail, self.secrets), b""
        else:
            buf = self.tail + data
            cut = self._clear(buf, len(buf) - self.keep)
            out, self.tail = scrub(buf[:cut], self.secrets) if cut > 0 else b"", buf[max(cut, 0):]
        return [out] if out else []

    def _clear(self, buf: bytes, cut: int) -> int:
        """``cut`` moved back until no spelling of a secret (``scrub``'s) in ``buf`` begins
        before it and ends after it."""
        moved = True
        while moved and cut > 0:
            moved = False
            for secret in self.secrets:
                at = buf.find(secret, max(cut - len(secret) + 1, 0), cut + len(secret) - 1)
                if 0 <= at < cut:
                    cut, moved = at, True
                anchor = _anchor(secret)
                reach = 6 * len(secret)  # (the longest a spelling of it may be: scrub_keep)
                low = max(cut - reach, 0)  # (a spelling across the cut lies in buf[low:cut + reach], its anchor too)
                if anchor is not None and buf.find(b"\\", low, cut + reach) >= 0 and buf.find(anchor, low, cut + reach) >= 0:
                    spellings = _spellings(secret)
                    for at in range(low, cut):
                        found = spellings.match(buf, at)
                        if found is not None and found.end() > cut:
                            cut, moved = at, True
                            break
        return cut


EVENTS = {cls.__name__: cls for cls in get_args(Event)}


def record_events(gateway: list[tuple[int, object]], secrets: tuple[bytes, ...] = ()) -> list:
    """A turn's gateway events for its flow record: ``[offset, name, fields]`` each, JSON-safe
    (bytes as text, secrets scrubbed)."""
    out = []
    for at, item in gateway:
        fields = {}
        for f in dataclasses.fields(item) if dataclasses.is_dataclass(item) else ():
            value = getattr(item, f.name)
            if isinstance(value, bytes):
                value = scrub(value, secrets).decode("utf-8", "replace")
            elif isinstance(value, tuple):
                value = list(value)
            fields[f.name] = value
        out.append([at, type(item).__name__, fields])
    return out


def rebuild_event(name: str, fields: dict) -> Event | None:
    """An event from its record (None: not one of this file's)."""
    cls = EVENTS.get(name)
    if cls is None:
        return None
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = fields.get(f.name)
        if f.type in ("bytes",) and isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
