"""Recordings as regression data: a recorded turn translated again, by the current code.

Offline replay hands back the recorded events verbatim, so it only guards lowering: a translator
that emitted junk would still replay its old, good events. This file runs a recorded turn
through the current code instead and says where the result differs from what the client got:

- lowering: the recorded Responses request lowered again must give the recorded chat request,
  byte for byte (when the request stands alone: a request that continues a response of the same
  recording, or refers to its items, is resolved against that recording, as the gateway did). With
  several upstreams, the record holds each candidate's options (``lowering``, then
  ``lowering_fallbacks``) and the chat request of the first; a fallback that answered is in the
  gateway's events (``Rerouted``) and is translated with its own tool map, as it was;
- translation: the recorded backend stream, with the gateway's own events at the places where
  they came (``channel.record_events``: accepted, keepalives, failures, searches, MCP listings,
  calls and approval requests), through the
  current translator, must give the recorded events, byte for byte.

Sealed strings (seal.py) are random each time they are made: both sides show them as the text
they open to (``<sealed compaction: …>``), or ``<sealed>`` without the key that made them.

Sans-I/O: the records are the dicts flows keep in ``metadata["resp2chat"]`` (turns.py for an
HTTP turn, addons/websocket.py for each turn of a socket); resp2chat_io/retranslate.py reads
the flow files and prints the result (``resp2chat retranslate``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field

from . import compaction, inputs, mcp, websocket
from .channel import Reader, rebuild_event
from .errors import GatewayError, error_json, specific_code
from .lowering import LoweringOptions
from .seal import SEALED_PREFIX, Sealer, SealError
from .sse import DONE
from .turn import Found, begin_turn, wanted

_SEALED = re.compile(re.escape(SEALED_PREFIX) + r"[A-Za-z0-9_-]+")
_CREATED = re.compile(rb'"created_at":(\d+)')
_COMPLETED = re.compile(rb'"completed_at": ?(\d+)')  # (an SSE answer's compact JSON, or a JSON body's)
PURPOSES = (compaction.PURPOSE, inputs.REASONING_PURPOSE)


def lowering_record(opts: LoweringOptions) -> dict:
    """The lowering options a turn ran with, JSON-safe, for its flow record."""
    out = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


def lowering_options(record: dict | None) -> LoweringOptions:
    """The options back from ``lowering_record`` (defaults for what is not recorded)."""
    if not isinstance(record, dict):
        return LoweringOptions()
    names = {f.name: f for f in dataclasses.fields(LoweringOptions)}
    kwargs = {}
    for name, value in record.items():
        if name in names:
            kwargs[name] = frozenset(value) if isinstance(getattr(LoweringOptions(), name), frozenset) else value
    return LoweringOptions(**kwargs)


@dataclass
class Result:
    where: str
    outcome: str  # "same" | "differs" | "skipped"
    details: list[str] = field(default_factory=list)  # diff lines, or why it was skipped
    events: int = 0  # events compared


class History:
    """The conversations a recording's responses ended (request items, then the recorded output),
    so a turn that continues one (``previous_response_id``) is lowered as the gateway did."""

    def __init__(self) -> None:
        self.responses: dict[str, list] = {}

    def conversation(self, request: dict) -> list | None:
        create = websocket.Create(request, warmup=False)
        items = inputs.as_items(request.get("input"))
        if items is None or create.previous is None:
            return items
        earlier = self.responses.get(create.previous)
        return None if earlier is None else earlier + items

    def items(self, item_ids: list[str]) -> dict[str, dict]:
        """``item_reference`` ids -> the items of the recording's responses that hold them (the
        newest first, as the store keeps them)."""
        found: dict[str, dict] = {}
        wanted = set(item_ids)
        for conversation in reversed(list(self.responses.values())):
            for item in conversation:
                if isinstance(item, dict) and item.get("id") in wanted and item["id"] not in found:
                    found[item["id"]] = item
        return found

    def remember(self, response_id: str | None, conversation: list | None, events: bytes) -> None:
        final = websocket.final_response(events)
        if response_id and conversation is not None and final and final.get("status") == "completed":
            self.responses[response_id] = compaction.untriggered(conversation) + list(final.get("output") or ())


def check_turn(where: str, record: dict, history: History, sealer: Sealer | None,
               *, answer: bytes | None = None, stream: bool = True) -> Result:
    """One recorded turn. ``record``: a flow's turn record (``responses_request``,
    ``chat_request``, ``upstream_sse``, ``response_id``, …); ``answer``: what the client got
    (default: the record's ``events``: a socket's turn, whose deltas went out merged as each
    backend read brought them, so both sides are compared with every run of deltas merged);
    ``stream``: whether that was SSE or one JSON body."""
    merged = answer is None
    answer = (record.get("events") or "").encode() if answer is None else answer
    try:
        request = json.loads(record["responses_request"])
    except (KeyError, ValueError):
        return Result(where, "skipped", ["no Responses request recorded"])
    warmup = bool(record.get("warmup"))
    if record.get("truncated") or ("upstream_sse" not in record and not warmup):
        return Result(where, "skipped", ["the recording kept no backend stream for this turn"])
    request = {k: v for k, v in request.items() if k not in websocket.NOT_REQUEST}
    conversation = history.conversation(request)
    response_id = record.get("response_id") or "resp_recorded"
    created = record.get("created_at")
    if not isinstance(created, int):
        found = _CREATED.search(answer)
        created = int(found[1]) if found else 0
    candidates = [lowering_options(record.get("lowering"))] + [
        lowering_options(r) for r in record.get("lowering_fallbacks") or ()]
    try:
        previous, refs = wanted(request)
        found = Found(history.responses.get(previous) if previous else None, history.items(list(refs)))
        turn = begin_turn(request, candidates[0], response_id, created, found, sealer=sealer,
                          route=(lambda model: candidates) if len(candidates) > 1 else None,
                          mcp_servers=mcp.recorded_servers(request))
    except GatewayError as err:
        history.remember(response_id, conversation, answer)
        why = {"previous_response_not_found": "it continues a response this recording does not hold",
               "item_not_found": "it refers to items this recording does not hold",
               "invalid_encrypted_content": "it holds sealed items this key cannot open (--seal-key: the key "
                                            "that recorded it)"}.get(err.code)
        if why:
            return Result(where, "skipped", [f"cannot lower it again: {why}"])
        return Result(where, "differs", [f"the recorded request is now refused: {err}"])
    request_id = record.get("request_id")
    if isinstance(request_id, str):  # (named in the failures the client saw: the gateway's own, a withheld 5xx)
        turn.ctx.request_id = request_id
    completed = _COMPLETED.findall(answer)
    if completed:  # (when the recorded turn completed: the core reads no clock, the gateway's was then)
        turn.ctx.clock = lambda: int(completed[-1])
    details: list[str] = []
    chat = record.get("chat_request")
    if isinstance(chat, str) and turn.chat_body != chat.encode():
        details += ["lowering differs (recorded chat request, then now):"] + _diff(
            _pretty(chat.encode()), _pretty(turn.chat_body))
    if warmup:  # answered without the backend (websocket.py)
        again = Reader(turn.translator(), 0).apply(websocket.Warmup())
    else:
        again = translate(turn, record.get("upstream_sse", "").encode(), record.get("gateway_events"), stream)
    if merged:
        answer, again = websocket.canonical(answer), websocket.canonical(again)
    old, new = _events(answer, sealer), _events(again, sealer)
    if old != new:
        details += ["translation differs (recorded events, then now):"] + _diff(old, new)
    history.remember(response_id, conversation, answer)
    return Result(where, "differs" if details else "same", details, len(old))


def translate(turn, upstream: bytes, gateway_events: list | None, stream: bool = True) -> bytes:
    """What the current translator makes of a recorded backend stream: the gateway's events at
    their recorded places (only ``Accepted`` first if none were recorded), then the end."""
    reader = Reader(turn.translator(), len(upstream) + 1)
    out = bytearray()
    at = 0
    for offset, name, fields in gateway_events if gateway_events is not None else [[0, "Accepted", {}]]:
        event = rebuild_event(name, fields)
        if event is None:
            continue
        if offset > at:
            out += reader.apply(upstream[at:offset])
            at = offset
        out += reader.apply(event)
    if at < len(upstream):
        out += reader.apply(upstream[at:])
    out += reader.finish()
    if stream:
        return bytes(out)
    result = reader.translator.response()  # as turns.py answers a client that did not stream
    if result["status"] == "failed":
        return error_json(result["error"]["message"], status_type="upstream_error", code=specific_code(result["error"]))
    return json.dumps(result, ensure_ascii=False).encode()


def _events(answer: bytes, sealer: Sealer | None) -> list[str]:
    """One line per event (the data of each SSE event, or the one JSON body), sealed strings
    shown as what they open to. An HTTP stream's ``data: [DONE]`` is no event (the HTTP
    transport adds it: addons/http_turns.py)."""
    answer = answer.removesuffix(DONE)
    text = answer.decode("utf-8", "replace")
    lines = websocket.messages(answer) if "\n\n" in text or text.startswith("event:") else [text]
    return [_SEALED.sub(lambda m: _opened(m.group(0), sealer), line) for line in lines]


def _opened(token: str, sealer: Sealer | None) -> str:
    if sealer is not None:
        for purpose in PURPOSES:
            try:
                return f"<sealed {purpose}: {json.dumps(sealer.unseal(purpose, token), ensure_ascii=False)}>"
            except SealError:
                continue
    return "<sealed>"


def _pretty(chat: bytes) -> list[str]:
    try:
        return json.dumps(json.loads(chat), indent=1, ensure_ascii=False).splitlines()
    except ValueError:
        return chat.decode("utf-8", "replace").splitlines()


def _diff(old: list[str], new: list[str], limit: int = 60) -> list[str]:
    lines = list(difflib.unified_diff(old, new, "recorded", "now", n=1, lineterm=""))
    return lines[:limit] + ([f"… {len(lines) - limit} more diff lines"] if len(lines) > limit else [])


def turns_of(meta: dict, response: bytes | None, stream: bool) -> list[tuple[str, dict, bytes | None, bool]]:
    """A flow's recorded turns: (name, record, answer, streamed)."""
    if meta.get("transport") == "websocket":
        return [(f"turn {n}", t, None, True) for n, t in enumerate(meta.get("turns") or (), 1)
                if t.get("status") != "rejected"]
    if meta.get("responses_request") and response is not None and not meta.get("replay_cache") \
            and not meta.get("server_replay") and meta.get("status") != "rejected":
        return [("turn", meta, response, stream)]
    return []
