"""Items as the API lists them: ``GET /v1/responses/{id}/input_items`` and the Conversations API's
items (conversations.py), with OpenAI's list shape and cursor pagination; and the output items of
a stored response as ``GET /v1/responses/{id}`` shows them (its ``include``, the same rules).

Rules of this file:
- Sans-I/O and pure: the stores hand in the items, this file decides what a page of them is.
- One shape for every list: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``;
  ``after`` (an item id: the page starts after it, in the chosen order; one that names no item
  is a 400 naming ``after``; ids are unique in a list, were one there twice ``after`` names its
  last place, so that walking the pages always ends), ``limit`` (1 to 100, in ASCII digits,
  default 20), ``order`` (``asc`` | ``desc``, default ``desc``: newest first, as OpenAI's), and
  ``include`` (what items show beyond the default: ``reasoning.encrypted_content``; the other
  values the API defines are accepted and change nothing here). A bad value is a 400 naming it.
- An item is listed with an ``id`` (one the client gave it, else, none or a null or ``""``
  one, ``listed_ids`` gives it one, the same each time) and, for a message, its ``type`` and
  ``status`` and its content as parts (a string becomes one ``input_text`` or, for the
  assistant, ``output_text`` part); any other item without a ``status`` (a client's input:
  a function call or its output, one of a type the spec does not define, Codex's
  ``additional_tools``; the spec requires a ``status`` of each) is ``completed``, but for the
  types the spec lists without one (``UNSTATUSED``: reasoning, compaction).
- A content part is listed with the fields the API's objects require of it even where the
  client's input left them out (``LISTED_PARTS``: an ``input_image``'s ``detail``, ``auto``, the
  API's default, and ``image_url``, null with a ``file_id``; an ``output_text``'s
  ``annotations``, none): openai-python's ``ResponseInputImage``/``ResponseOutputText`` and the
  Open Responses spec require them. In a message's content and in a tool output's parts.
- A reasoning item shows its ``encrypted_content`` only when ``include`` asks for it: the
  gateway's seal of its text (seal.py, as the turn that made it would have sealed it), whether
  the stored conversation holds it sealed or opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import GatewayError
from .inputs import INCLUDE_REASONING, REASONING_PURPOSE
from .schema import INCLUDES as _INCLUDES
from .seal import Sealer

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
UNSTATUSED = ("reasoning", "compaction")  # the item types the spec lists without a status
ORDERS = ("asc", "desc")
ENCRYPTED = INCLUDE_REASONING
INCLUDES = frozenset(_INCLUDES)  # (the item lists' include values are a turn's: schema.py)


@dataclass(frozen=True)
class Page:
    """What a list request asks for."""

    after: str | None = None
    limit: int = DEFAULT_LIMIT
    order: str = "desc"
    include: frozenset = frozenset()


def _get_all(query):
    return query.get_all if hasattr(query, "get_all") else (lambda k: list(query.get(k) or ()))


def include_query(query) -> frozenset:
    """A request's ``include`` (``include=a,b``, ``include=a&include=b`` or ``include[]=a``):
    what items show beyond the default (``as_listed``); ``GatewayError`` names a value the API
    does not define. ``query`` as ``page_query`` takes it."""
    get_all = _get_all(query)
    include = [v for value in get_all("include") + get_all("include[]") for v in value.split(",") if v]
    for value in include:
        if value not in INCLUDES:
            raise GatewayError(f"include: {value[:100]!r} is not one of {', '.join(sorted(INCLUDES))}",
                               param="include", code="invalid_value")
    return frozenset(include)


def page_query(query) -> Page:
    """A list request's query (``query.get(name)``, ``query.get_all(name)``: mitmproxy's
    ``MultiDictView`` or a dict of lists) as a ``Page``; ``GatewayError`` names a bad value."""
    get_all = _get_all(query)
    one = {k: (get_all(k) or [None])[-1] for k in ("after", "limit", "order")}
    limit = DEFAULT_LIMIT
    if one["limit"] is not None:
        digits = re.fullmatch(r"0*([1-9][0-9]{0,2})", one["limit"])  # (ASCII, and never too long for int)
        if digits is None or int(digits[1]) > MAX_LIMIT:
            raise GatewayError(f"limit: an integer from 1 to {MAX_LIMIT}", param="limit", code="invalid_value")
        limit = int(digits[1])
    order = one["order"] if one["order"] is not None else "desc"
    if order not in ORDERS:
        raise GatewayError("order: asc or desc", param="order", code="invalid_value")
    return Page(one["after"] or None, limit, order, include_query(query))


def with_ids(items: list, make_id) -> list:
    """``items`` each with an ``id``: its own, else (none, null or ``""``) ``make_id(kind,
    index)`` (``kind``: ``msg`` for a message, ``item`` otherwise; ``index``: its place in
    ``items``)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and not (isinstance(item.get("id"), str) and item["id"]):
            made = make_id("msg" if item.get("type", "message") == "message" else "item", i)
            item = {"id": made, **{k: v for k, v in item.items() if k != "id"}}
        out.append(item)
    return out


def listed_ids(items: list, prefix: str) -> list[dict]:
    """``with_ids`` with ``{kind}_{prefix}_in{index}``: the same every time the same items are
    listed (a stored response's input items), and never one of its output items' ids
    (``{kind}_{prefix}_{index}``, translator.py)."""
    return with_ids(items, lambda kind, i: f"{kind}_{prefix}_in{i}")


# a part type -> the fields a client may leave out that a listed part carries, with their default
LISTED_PARTS = {"input_image": {"image_url": None, "detail": "auto"}, "output_text": {"annotations": []}}
TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")


def _listed_parts(parts):
    """``parts`` (a message's content, a tool output's) with the fields ``LISTED_PARTS`` names."""
    if not isinstance(parts, list):
        return parts
    out = []
    for part in parts:
        defaults = LISTED_PARTS.get(part.get("type")) if isinstance(part, dict) else None
        missing = {k: list(v) if isinstance(v, list) else v for k, v in (defaults or {}).items()
                   if part.get(k) is None and (k not in part or v is not None)}
        out.append({**part, **missing} if missing else part)
    return out


def as_listed(item, include: frozenset = frozenset(), sealer: Sealer | None = None) -> dict:
    """One item as a list (or a single-item GET) shows it (the module's rules)."""
    if not isinstance(item, dict):
        return item
    if item.get("type", "message") == "message" and "role" in item:
        content = item.get("content")
        if isinstance(content, str):
            kind = "output_text" if item.get("role") == "assistant" else "input_text"
            content = [{"type": kind, "text": content}]
        item = {**item, "type": "message", "status": item.get("status") or "completed",
                "content": _listed_parts(content)}
    elif item.get("type") in TOOL_OUTPUTS and isinstance(item.get("output"), list):
        item = {**item, "output": _listed_parts(item["output"])}
    if not item.get("status") and item.get("type") not in UNSTATUSED:
        item = {**item, "status": "completed"}  # (a client's own, as its input had it: OpenAI lists it so)
    if item.get("type") == "reasoning":
        if ENCRYPTED not in include:
            item = {k: v for k, v in item.items() if k != "encrypted_content"}
        elif not item.get("encrypted_content") and sealer is not None:
            parts = item.get("content") or item.get("summary") or []
            text = "\n\n".join(p.get("text") or "" for p in parts if isinstance(p, dict))
            item = {**item, "encrypted_content": sealer.seal(REASONING_PURPOSE, text)}
    return item


def page(items: list[dict], p: Page, sealer: Sealer | None = None) -> dict:
    """A page of ``items`` (oldest first, each with an id), as the list object."""
    ordered = items if p.order == "asc" else items[::-1]
    start = 0
    if p.after is not None:
        # (its last place: were an id in the list twice, the walk still goes on, and ends)
        at = next((i for i in range(len(ordered) - 1, -1, -1) if ordered[i].get("id") == p.after), None)
        if at is None:
            raise GatewayError(f"after: no item {p.after[:100]!r} in this list", param="after", code="invalid_value")
        start = at + 1
    data = [as_listed(item, p.include, sealer) for item in ordered[start:start + p.limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + p.limit < len(ordered)}
