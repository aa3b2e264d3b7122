"""The Conversations API (OpenAI's ``/v1/conversations``), sans-I/O: its objects, what its
requests may hold, and a Responses request that names a conversation.

Rules of this file:
- Sans-I/O and pure: resp2chat_io/addons/conversations.py serves the endpoints and the response
  store keeps each conversation (store.py: an entry under its ``conv_…`` id, its items and this
  module's conversation object, owned like a response, bounded and expiring like one).
- A conversation is ``{"id", "object": "conversation", "created_at", "metadata"}`` and its
  items, oldest first, each with an id (listing.py ``with_ids``: its own, else a fresh one). Items are
  Responses input items (validated as a request's ``input`` is: ``new_items``; a ``compaction``
  item as a turn takes one: it must be one the gateway sealed), at most ``MAX_NEW_ITEMS`` per
  request, as OpenAI takes them; an id given twice, or one the conversation holds, is a 400
  (``unique``: OpenAI's ``Duplicate item found``), and so is one no ``…/items/{item_id}`` path
  can name (``addressable``). An ``item_reference`` adds the stored item it names.
- A Responses request with ``conversation`` (an id, or ``{"id": …}``: ``named``) takes the
  conversation's items as its history, and the turn's input and output are appended to it, in
  one write, when it completes (addons/store.py); with ``previous_response_id`` it is a 400
  (turn.py), and so is an input that gives an id twice or one the conversation holds (turn.py
  ``conversation`` asks ``unique``, before the turn runs). That write lands before the client
  can see the turn's end, on any transport: the turn's ``Landing`` reader holds its terminal
  event until then (addons/turns.py ``Turns.land``), and a write that fails ends the turn
  ``failed`` instead (``Landing.unland``).
- ``metadata``: at most 16 string pairs, keys up to 64 characters, values up to 512 (OpenAI's),
  a conversation's and a Responses request's alike (``check_metadata``: turn.py asks it too).
"""

from __future__ import annotations

from . import inputs
from .channel import Reader
from .compaction import open_item
from .errors import GatewayError
from .inputs import COMPACTION, Resolve
from .labels import shown
from .schema import parse_request

ID_PREFIX = "conv_"
MAX_NEW_ITEMS = 20  # items one create or items request may add (OpenAI's)
MAX_METADATA, MAX_KEY, MAX_VALUE = 16, 64, 512


def conversation_object(conversation_id: str, created_at: int, metadata: dict) -> dict:
    return {"id": conversation_id, "object": "conversation", "created_at": created_at, "metadata": metadata}


def deleted(conversation_id: str) -> dict:
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def is_id(value: object) -> bool:
    """Whether ``value`` can name a conversation (the response store's other entries cannot)."""
    return isinstance(value, str) and value.startswith(ID_PREFIX)


def named(raw: dict) -> str | None:
    """The conversation a Responses request names (None: none); ``GatewayError`` for a value that
    names none (neither an id nor ``{"id": …}``)."""
    value = raw.get("conversation")
    if value is None:
        return None
    found = value.get("id") if isinstance(value, dict) else value
    if not isinstance(found, str) or not found:
        raise GatewayError('conversation: a conversation id, or {"id": …}', param="conversation",
                           code="invalid_type")
    return found


def not_found(conversation_id: str, param: str | None = None) -> GatewayError:
    return GatewayError(f"conversation {conversation_id[:100]!r} not found (unknown, expired or deleted)",
                        param=param, code="conversation_not_found", status=404)


def check_metadata(value: object, param: str = "metadata") -> dict:
    """``metadata`` as OpenAI takes it (None: empty); ``GatewayError`` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_KEY and len(v) <= MAX_VALUE
            for k, v in value.items()):
        raise GatewayError(f"{param}: at most {MAX_METADATA} string pairs (keys up to {MAX_KEY} characters, values up "
                           f"to {MAX_VALUE})", param=param, code="invalid_value")
    return value


def required(body: dict, name: str) -> object:
    """A field the request must give (OpenAI's ``missing_required_parameter``): its value."""
    if name not in body:
        raise GatewayError(f"{name}: required", param=name, code="missing_required_parameter")
    return body[name]


def new_items(value: object, param: str = "items", sealer=None, *, some: bool = False,
              resolve: Resolve | None = None) -> list:
    """Items a request adds to a conversation, validated as a Responses request's ``input``
    (the same 400s, named ``items[i]…``); None: none (``some``: at least one is required, as
    ``POST …/items`` requires, whose answer lists them). A ``compaction`` item (the compact
    endpoint's, or one a turn put in a conversation and its items list showed) is taken as a
    turn's input takes it: one ``sealer`` opens (compaction.open_item), else a 400 saying so.
    An ``item_reference`` becomes the item it names (``resolve``: the owner's stored items, as a
    turn's input finds them; inputs.py ``expand``, which says what an unknown one is); the items
    returned are the ones to keep. Every id must be ``addressable``."""
    if some and not value and (value is None or isinstance(value, list)):
        raise GatewayError(f"{param}: 1 to {MAX_NEW_ITEMS} items to add", param=param,
                           code="empty_array" if value == [] else "missing_required_parameter")
    if value is None:
        return []
    if not isinstance(value, list):
        raise GatewayError(f"{param}: a list of items", param=param, code="invalid_type")
    if len(value) > MAX_NEW_ITEMS:
        raise GatewayError(f"{param}: at most {MAX_NEW_ITEMS} items at a time", param=param,
                           code="array_above_max_length")
    if value:
        try:
            if resolve is not None and inputs.reference_ids(value):
                value = inputs.expand({}, value, resolve)[1]
            unique(value, (), param)
            addressable(value, param)
            checked = list(value)
            for i, item in enumerate(value):
                if isinstance(item, dict) and item.get("type") == COMPACTION:
                    open_item(item, i, sealer)
                    checked[i] = {"role": "user", "content": "-"}  # (its place kept: the others' names hold)
            parse_request({"model": "-", "input": checked})
        except GatewayError as err:
            where = (err.param or "input").replace("input", param, 1)
            raise GatewayError(err.message.replace("input", param, 1), param=where, code=err.code) from None
    return value


def addressable(items: list, param: str = "items") -> None:
    """``GatewayError`` for an item a conversation would keep under an id no path can name:
    ``…/items/{item_id}`` is read with the id decoded, so an id holding ``/``, or the whole id
    ``.`` or ``..`` (a path's dot segments), would name another path, or none."""
    for n, item in enumerate(items):
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, str) and ("/" in item_id or item_id in (".", "..")):
            raise GatewayError(f"{param}[{n}].id: {shown(item_id)!r} cannot name a conversation's item (its "
                               "…/items/{item_id} path would be another path): an id may not hold '/' nor be '.' "
                               "or '..'", param=f"{param}[{n}].id", code="invalid_value")


def unique(items: list, held: list, param: str = "items", holder: str = "the conversation") -> None:
    """``GatewayError`` for an item whose ``id`` one before it in ``items`` has, or one of the
    ``held`` items (``holder``'s: the conversation's, or the one a turn goes on from) (OpenAI's
    ``Duplicate item found with id …``): each id names one item, its ``GET``, its ``DELETE``
    and a list's ``after``."""
    kept = {i.get("id") for i in held if isinstance(i, dict) and isinstance(i.get("id"), str)}  # (only a string names one)
    seen: set = set()
    for n, item in enumerate(items):
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, str) and item_id:
            if item_id in seen or item_id in kept:
                where = "an item before it in the request has it" if item_id in seen else f"{holder} holds it"
                raise GatewayError(f"{param}[{n}].id: duplicate item found with id {shown(item_id)!r} ({where}; an id "
                                   "names one item): remove duplicate items and try again", param=f"{param}[{n}].id",
                                   code="invalid_value")
            seen.add(item_id)


class Landing(Reader):
    """The reader of a turn that names a conversation: what the translator says from its
    terminal event on is held (``held``: as the translator said it, not yet scrubbed nor kept in
    ``sent``) until the turn's items are in the conversation, so that nobody who heard of the
    turn's end (the client, and whoever it tells: another replica, a ``GET`` of the items) reads
    the conversation without them. ``complete`` translates what is left once the backend's stream
    ended (held too), ``finish`` lets the end go: every consumer calls it last, once the relay's
    work for the turn (which writes the conversation: addons/turns.py ``Turns.land``) is over.
    A background turn's reader too (addons/background.py ``_end``: its terminal event goes once
    the run is stored, ``Reader.fail_instead`` when the store could not keep it)."""

    __slots__ = ("held", "ahead")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: bytes | None = b""  # the end, held (None: let go)
        self.ahead = b""  # what ``complete`` translated before the end (sent with it)

    @property
    def holding(self) -> bool:
        """The turn's end is held (the stream callable sends its ``[DONE]`` after it, not before)."""
        return bool(self.held)

    def _out(self, out: bytes) -> bytes:
        if out and self.held is not None and (self.held or self.translator.done):
            if self.held:
                self.held += out
                return b""
            cut = terminal_event(out)
            self.held, out = out[cut:], out[:cut]
        return super()._out(out)

    def complete(self, items: list) -> None:
        """The backend's stream is over: ``items`` (what the consumer has not taken yet) and the
        translator's end, translated now; all of it goes out with the end."""
        self.ahead += self.apply_all(items) + super().finish()

    def unland(self, code: str, message: str) -> None:
        """The turn's items could not be written to its conversation: its end, held, becomes
        ``response.failed`` with the write's error (OpenAI: a completed response with a
        conversation is in it, so one that is not in it did not complete)."""
        if self.held:
            self.held = self.translator.fail_instead(code, message) or self.held

    def finish(self) -> bytes:
        out = super().finish()
        ahead, held = self.ahead, self.held or b""
        self.ahead, self.held = b"", None
        return ahead + out + super()._out(held)


def terminal_event(sse: bytes) -> int:
    """Where the last SSE event of the translator's output begins (its terminal one, once it is
    done). An event's data is one line of JSON: a raw blank line only ever separates events."""
    return sse.rfind(b"\n\nevent: ") + 2 if b"\n\nevent: " in sse else 0
