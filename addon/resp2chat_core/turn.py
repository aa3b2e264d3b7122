"""One Responses turn, from request bytes to a ready translator: the core's front door.

``begin_turn`` does everything that happens once per request (decode, validate, lower, prepare
the fields echoed into Response objects), so the per-chunk path has nothing left to decide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from .errors import GatewayError
from .lowering import LoweringOptions, lower
from .schema import parse_request
from .translator import Translator, TurnContext

# Request fields a Response object echoes back, with the API's defaults when absent.
_ECHO_DEFAULTS = (
    ("instructions", None),
    ("max_output_tokens", None),
    ("parallel_tool_calls", True),
    ("previous_response_id", None),
    ("reasoning", None),
    ("store", False),
    ("temperature", None),
    ("text", {"format": {"type": "text"}}),
    ("tool_choice", "auto"),
    ("tools", []),
    ("top_p", None),
    ("truncation", "disabled"),
    ("metadata", {}),
)


def echo_fields(raw: dict) -> dict:
    echo = {}
    for key, default in _ECHO_DEFAULTS:
        value = raw.get(key)
        echo[key] = default if value is None else value
    return echo


@dataclass
class Turn:
    """What outlives the request hook. Not the decoded request nor the lowered chat dict: a turn
    lives as long as its stream, and with many streams open their ~100 KB each add up."""

    chat_body: bytes  # the chat request, encoded (what goes upstream)
    client_stream: bool  # what the *client* asked for; upstream is always streamed
    ctx: TurnContext
    web_search: bool = False  # the request has a web_search tool: the gateway runs its searches
    active: Translator | None = None  # the translator answering this turn, once there is one
    items: list = field(default_factory=list)  # the whole conversation as input items (kept only to store)
    store: bool = False  # the client wants this response kept (`store` not false)

    def translator(self) -> Translator:
        self.active = Translator(self.ctx)
        return self.active


def decode_body(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError("request body must be a JSON object", code="invalid_json")
    return data


def begin_turn(body: bytes, opts: LoweringOptions, response_id: str, created_at: int,
               history: Callable[[str], list | None] | None = None) -> Turn:
    """Raise ``GatewayError`` for a request the gateway cannot serve.

    ``history(previous_response_id)`` returns the stored conversation a request continues
    (None when unknown): it is put in front of the new input, as if the client had sent it all.
    """
    raw = decode_body(body)
    echo = echo_fields(raw)
    items = raw.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    previous = raw.get("previous_response_id")
    if isinstance(previous, str) and previous and isinstance(items, list):
        earlier = history(previous) if history else None
        if earlier is None:
            raise GatewayError(f"previous response {previous!r} not found (unknown, expired or not stored)",
                               param="previous_response_id", code="previous_response_not_found")
        items = earlier + items
        raw = {**raw, "input": items, "previous_response_id": None}
    req = parse_request(raw)
    lowered = lower(req, opts)
    ctx = TurnContext(response_id=response_id, created_at=created_at, model=req.model,
                      tool_map=lowered.tool_map, echo=echo,
                      think=opts.think_mode(lowered.chat["model"]))
    store = raw.get("store") is not False
    return Turn(lowered.body, lowered.client_stream, ctx,
                web_search=any(t.kind == "web_search" for t in lowered.tool_map.targets.values()),
                items=items if store and isinstance(items, list) else [], store=store)
