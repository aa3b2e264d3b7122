"""The Responses WebSocket transport, sans-I/O: its messages and what one connection remembers.

Rules of this file:
- Sans-I/O. The relay (resp2chat_io/relay/websocket.py) owns the socket and its frames, the
  addon (resp2chat_io/addons/websocket.py) runs the turns; this file reads client messages,
  writes server messages and keeps a connection's conversation. No mitmproxy, no sockets.
- A turn over a socket is a turn: the same request lowers to the same chat bytes as over HTTP
  (``begin_turn``), and the client gets the same events, each event one text message.
- Bad input never closes the connection: it is an ``error`` message, and the next
  ``response.create`` is served as if nothing happened. A message is read with the HTTP body's
  strict parser (requestbody.py): what one transport refuses, the other refuses alike. (What
  does close it is the gateway's: a key no longer accepted, an ``error`` then close code 1008:
  resp2chat_io/addons/websocket.py.)

Theory of operation (the contract, from codex-rs ``responses_websocket.rs`` and ``client.rs``,
checked against the real Codex CLI 0.169.0; docs/codex.md has the details)::

    client ── GET /v1/responses, Upgrade: websocket ──▶ 101 (the relay terminates the socket)
    client ── {"type": "response.create", <a Responses request>} ──▶ a turn
    gateway ─ {"type": "response.created", …} … {"type": "response.completed", …}: the data of
              each SSE event, one message each, in order
    client ── {"type": "response.create", "previous_response_id": <the last response>,
               "input": [only what is new]} ──▶ the connection's memory supplies the rest
    client ── {"type": "response.create", "generate": false, …} (a warm-up) ──▶
              response.created + response.completed with no output; nothing goes to the backend,
              but the request is remembered as if answered (the next one continues it)
    client ── {"type": "response.processed", "response_id": …} ──▶ (an acknowledgement: silence)
    anything else ──▶ {"type": "error", "status": 400, "error": {message, type, param, code}}
              (a refusal that knows when to try again, a client's limit: "headers": {retry-after, …})

A continued request is resolved against this connection's own recent responses first (Codex
sends ``store: false``: nothing is in the response store), then against the response store.
``Connection.keep`` bounds the memory (Codex only ever continues its last response), and
``max_bytes`` its size (the addon's: ``max_request_body_mb``, what one message may carry). A
continuation that fails (refused, or its turn failed) drops the response it continued from the
memory (``forget``, as the Open Responses spec says): continuing from it again is
``previous_response_not_found``, unless the response store holds it. A response the store was
asked to keep too (``store`` not false) and that a ``DELETE`` removed since, on any replica, is
not continued from the memory either (``Connection.stored``; the store addon asks the store
whether it was deleted: one small read per such continuation, none for ``store: false``). The memory
keeps conversations as the response store does, made whole (``Connection.conversation``).
How many connections are open at once is bounded too (``no_room``: a client's ``max_sockets``,
the gateway's ``max_websockets``): past either, the upgrade is refused and the client uses HTTP.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from . import inputs, requestbody
from .errors import GatewayError
from .limits import retry_headers
from .response import as_stored
from .seal import Sealer
from .sse import DONE

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # as the translator writes

CREATE = "response.create"
PROCESSED = "response.processed"
NOT_REQUEST = ("type", "generate")  # message keys that are the transport's, not the request's


@dataclass
class Create:
    """A ``response.create``: the Responses request it carries, and whether to generate."""

    body: dict
    warmup: bool  # generate: false — answer at once, remember, do not ask the backend

    @property
    def previous(self) -> str | None:
        previous = self.body.get("previous_response_id")
        return previous if isinstance(previous, str) and previous else None


def read_message(message: str | bytes) -> Create | None:
    """A client message -> a ``Create``, or None for an acknowledgement that needs no answer.
    ``GatewayError`` for anything else (it becomes an ``error`` message).

    Read exactly as an HTTP body is (requestbody.py: strict UTF-8, finite numbers, no lone
    surrogates; the same 400 ``invalid_json`` with the byte offset): a message is a request."""
    if isinstance(message, str):  # (surrogatepass: a lone surrogate fails UTF-8 decoding, with its offset)
        message = message.encode("utf-8", "surrogatepass")
    return parse_message(requestbody.loads(message))


def parse_message(data: object) -> Create | None:
    """``read_message`` of a message already decoded (with requestbody.py: a large one is decoded
    off the event loop, resp2chat_io/offload.py)."""
    if not isinstance(data, dict):
        raise GatewayError("request body must be a JSON object", code="invalid_json")
    kind = data.get("type")
    if kind == PROCESSED:
        return None
    if kind != CREATE:
        raise GatewayError(f"unsupported message type {kind!r}: send {{\"type\": \"response.create\", …}}",
                           param="type", code="unsupported_message_type")
    generate = data.get("generate", True)
    if not isinstance(generate, bool):
        raise GatewayError("generate: expected true or false", param="generate", code="invalid_value")
    items = data.get("input")
    if not generate and isinstance(items, list) and items and isinstance(items[-1], dict) \
            and items[-1].get("type") == inputs.COMPACTION_TRIGGER:
        # (a warm-up asks no backend: no summary to answer with, and a continuation would not remember the trigger)
        raise GatewayError("generate: false cannot carry a compaction_trigger (a warm-up asks no backend, and a "
                           "compaction turn's answer is the summary the backend writes): send it with generate: true",
                           param="generate", code="unsupported_parameter")
    return Create({k: v for k, v in data.items() if k not in NOT_REQUEST}, warmup=not generate)


@dataclass(frozen=True, slots=True)
class Warmup:
    """A channel-style event (channel.py): a warm-up's whole answer, the response opened and
    completed with no output, without the backend."""

    def apply(self, t) -> bytes:
        return t.accepted() + t.feed(b"data: [DONE]\n\n")


SOCKET_RETRY = 1.0  # seconds a refused upgrade is told to wait (a socket closes when its session ends: unknown)


def no_room(open_sockets: int, max_sockets: int, client: str | None = None, client_sockets: int = 0,
            client_max: int | None = None) -> GatewayError | None:
    """The refusal of a new socket's upgrade, or None: room for it. ``client_sockets`` of its
    client's are open (``client_max``: its ``max_sockets``, None: no limit) and ``open_sockets``
    in all (``max_sockets``: the gateway's ``max_websockets``, 0: no cap). The client's own limit
    is a ``429 rate_limit_exceeded`` (its doing); the gateway's bound a ``503 server_overloaded``
    (the replica's memory, filled by everyone: not this client's fault, and its HTTP turns are
    still served). Either way the client may use HTTP (Codex falls back to it)."""
    if client_max is not None and client_sockets >= client_max:
        return GatewayError(f"rate limit reached for client {client!r}: Responses WebSockets open at once "
                            f"(max_sockets {client_max}); close one, or use HTTP (POST /v1/responses)",
                            code="rate_limit_exceeded", status=429, type="sockets")
    if max_sockets and open_sockets >= max_sockets:
        return GatewayError(f"this gateway has as many Responses WebSockets open as it serves at once "
                            f"(max_websockets {max_sockets}); try again later, or use HTTP (POST /v1/responses)",
                            code="server_overloaded", status=503, type="server_error")
    return None


def error_message(err: GatewayError) -> str:
    """The ``error`` message Codex reads as the HTTP error it would have got (status and body),
    with the ``headers`` that say when to try again when the refusal knows (``retry-after``:
    codex-rs reads them there, ``WrappedWebsocketErrorEvent``)."""
    wait = {"headers": dict(retry_headers(err.retry_after))} if err.retry_after is not None else {}
    return json.dumps({"type": "error", "status": err.status, **err.body(), **wait}, ensure_ascii=False)


def events(sse: bytes) -> list[tuple[str, bytes]]:
    """The translator's SSE events -> (event type, message) each, the message being the event's
    ``data`` (a WebSocket turn's translator merges runs of deltas itself: ``Translator.merge``)."""
    out = []
    for block in sse.split(b"\n\n"):
        if block:
            head, sep, data = block.partition(b"\ndata: ")
            if not sep:  # (no event line)
                head, data = b"", block.removeprefix(b"data: ")
            out.append((head[7:].decode("ascii", "replace") if head.startswith(b"event: ") else "", data))
    return out


def messages(sse: bytes) -> list[str]:
    """The translator's SSE events -> one message text each: the ``data`` of every event."""
    return [data.decode("utf-8", "replace") for _, data in events(sse)]


DELTAS = frozenset({"response.output_text.delta", "response.reasoning_summary_text.delta",
                    "response.reasoning_text.delta", "response.function_call_arguments.delta",
                    "response.custom_tool_call_input.delta", "response.refusal.delta"})


class Coalescer:
    """Events -> messages, consecutive deltas of one item merged into one: what ``canonical``
    makes of a socket turn's record, so that two chunkings of one answer compare equal.

    A live socket turn's messages are merged so already: its translator writes each run of
    deltas one delivery brings as one delta (``Translator.merge``: mitmproxy runs every
    WebSocket message through its whole addon chain, so what one delivery brings goes out as few
    messages as it can). This does the same after the fact, on the events as written: the
    deltas of one item in a row become one delta with their texts joined, and sequence numbers
    move down to stay contiguous (tests/test_websocket.py checks the two agree on random
    answers and deliveries). Clients join deltas anyway: the texts are the same.

    Done on the bytes, as the translator wrote them, split as the socket splits them (``events``;
    no decoding, no encoding: a Codex turn's three Response events echo ~18 KB of its request). A
    delta's ``"delta"`` string follows its ids, and two deltas whose text is the same but for the
    sequence number and that string merge by joining the string's contents (JSON string escapes
    never span the quotes; UTF-8 is cut only between characters, as every byte cut here is
    ASCII). A delta that does not read so (not the translator's) is left as it is. (Off the live
    path since the translator merges: the plain comparison of each delta's key, not the in-place
    reading it had while it ran on every socket delivery.)
    """

    __slots__ = ("shift",)

    def __init__(self) -> None:
        self.shift = 0  # events merged away so far: later sequence numbers move down by this

    def __call__(self, sse: bytes) -> list[tuple[str, bytes]]:
        """(event type, message) for each message."""
        out: list = []  # (kind, message), or (kind, [message through the delta's opening quote, [its contents…], the rest])
        last = None  # the key of out[-1] when it is a delta that may grow
        pieces: list[bytes] = []  # out[-1]'s delta string contents, then
        shift = self.shift
        for kind, data in events(sse):
            seq = _SEQ.search(data)
            if kind in DELTAS and seq is not None and (at := data.find(_DELTA, seq.end())) >= 0:
                start = at + len(_DELTA)
                string = _STRING.match(data, start)
                if string is not None:
                    end = string.end()  # just past the delta string's closing quote
                    key = (kind, data[:seq.start()], data[seq.end():at], data[end:])  # (all but the number and the string)
                    if key == last:
                        pieces.append(data[start:end - 1])
                        shift += 1
                        continue
                    pieces = [data[start:end - 1]]
                    before = data[:start] if not shift else \
                        b"%s%d%s" % (data[:seq.start(1)], int(seq[1]) - shift, data[seq.end(1):start])
                    out.append((kind, [before, pieces, data[end - 1:]]))
                    last = key
                    continue
            if seq is not None and shift:
                data = b"%s%d%s" % (data[:seq.start(1)], int(seq[1]) - shift, data[seq.end(1):])
            out.append((kind, data))
            last = None
        self.shift = shift
        return [(kind, m if m.__class__ is bytes else m[0] + b"".join(m[1]) + m[2]) for kind, m in out]


_SEQ = re.compile(rb',"sequence_number":(\d+)')
_DELTA = b',"delta":"'  # (a delta's string follows its ids: the translator writes it so)
_STRING = re.compile(rb'[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*"')  # a JSON string's contents and its closing quote


def as_sse(sent: list[tuple[str, bytes]]) -> bytes:
    """Messages back as the SSE events they were (flow records, replay over HTTP)."""
    return b"".join(b"event: %s\ndata: %s\n\n" % (kind.encode(), message) for kind, message in sent)


def canonical(sse: bytes) -> bytes:
    """A turn's events with every run of deltas merged: what two chunkings of the same answer
    share (``resp2chat retranslate`` compares socket turns so)."""
    return as_sse(Coalescer()(sse))


def final_response(sse: bytes) -> dict | None:
    """The Response object of a stream's last event (its terminal event; an HTTP stream's
    ``data: [DONE]`` after it, sse.DONE, is not an event), as it is stored (``response.as_stored``:
    a recorded ``response.failed``'s wait is the event's alone)."""
    end = len(sse) - len(DONE) if sse.endswith(DONE) else len(sse)
    at = sse.rfind(b"data: ", 0, end)
    try:
        event = json.loads(sse[at + 6:end]) if at >= 0 else None
    except ValueError:
        return None
    response = event.get("response") if isinstance(event, dict) else None
    return as_stored(response) if isinstance(response, dict) else None


class Connection:
    """What one socket remembers: for each of its last ``keep`` responses, the whole conversation
    it ended (its request's items, then its output), so a request can continue it; and of them
    at most ``max_bytes`` (None: no bound), counted by the size ``remember`` is given for each
    (the addon: its lowered chat request and its output, about its bytes as JSON). Past it the
    oldest are forgotten; a conversation larger than that alone is not remembered, and the
    others stay. Either way, continuing a forgotten one is ``previous_response_not_found``
    (unless the response store holds it), as the Open Responses spec says of an evicted id.
    Counted per conversation, though a chain's share their items: a bound on what is held,
    whatever the client sends (a chain of warm-ups, each adding a message's worth, grew it
    without end)."""

    def __init__(self, keep: int = 4, max_bytes: int | None = None) -> None:
        self.keep, self.max_bytes = keep, max_bytes
        # id -> (conversation, its size, whether the response store was asked to keep it too)
        self._responses: OrderedDict[str, tuple[list, int, bool]] = OrderedDict()
        self.bytes = 0  # the sizes remembered, together

    def __len__(self) -> int:
        return len(self._responses)

    def history(self, response_id: str) -> list | None:
        found = self._responses.get(response_id)
        return found[0] if found is not None else None

    def stored(self, response_id: str) -> bool:
        """Whether ``response_id`` is remembered as one the response store keeps too (its request
        did not say ``store: false``): a ``DELETE`` over HTTP may have removed it since, which
        the memory does not hear of (the store addon asks the store: ``deleted``)."""
        found = self._responses.get(response_id)
        return found is not None and found[2]

    def lookup(self, stored: Callable[[str], list | None] | None) -> Callable[[str], list | None]:
        """``begin_turn``'s history: this connection's responses, then the response store."""
        def history(response_id: str) -> list | None:
            found = self.history(response_id)
            return found if found is not None or stored is None else stored(response_id)
        return history

    def conversation(self, create: Create, stored: Callable[[str], list | None] | None,
                     resolve: inputs.Resolve | None = None, sealer: Sealer | None = None) -> list | None:
        """The whole conversation a request holds, as the response store keeps one: the one it
        continues, then its new input made whole (``inputs.expand``: references resolved, sealed
        reasoning opened, ``additional_tools`` items kept), so that what a later request continues
        from memory needs nothing the store may have lost since. Called once the request lowered
        (``begin_turn`` expanded the same input: this cannot fail then)."""
        items = inputs.as_items(create.body.get("input"))
        if items is None:
            return None
        items = inputs.expand(create.body, items, resolve, sealer)[1]
        if create.previous is None:
            return items
        earlier = self.lookup(stored)(create.previous)
        return None if earlier is None else earlier + items

    def forget(self, response_id: str) -> None:
        """A continuation of ``response_id`` failed (4xx or 5xx): the connection drops it, so
        continuing from it again is ``previous_response_not_found`` (the spec's rule)."""
        found = self._responses.pop(response_id, None)
        if found is not None:
            self.bytes -= found[1]

    def remember(self, response_id: str, items: list, size: int = 0, stored: bool = False) -> bool:
        """Keep ``items``, the conversation ``response_id`` ended (``size``: its bytes, about;
        ``stored``: the response store was asked to keep it too). False: larger than
        ``max_bytes`` alone, not kept."""
        self.forget(response_id)
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        self._responses[response_id] = (items, size, stored)
        self.bytes += size
        while len(self._responses) > self.keep or (self.max_bytes is not None and self.bytes > self.max_bytes):
            self.bytes -= self._responses.popitem(last=False)[1][1]
        return True
