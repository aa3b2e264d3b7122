"""A request's input made whole before it is validated: what clients send by reference or sealed.

Rules of this file:
- Pure. The store is reached only through the ``resolve`` callable (item id -> stored item), the
  key only through the ``Sealer``: both are handed in by the caller (turn.py).
- Byte-deterministic like lowering: the same request and the same store give the same items.
  Unsealing is (a sealed string decrypts to one text, whatever its random nonce).
- The whole conversation is made whole: the history ``previous_response_id`` puts in front
  (``earlier``) as well as the new input, so what an earlier turn delivered (its
  ``additional_tools``, its sealed reasoning) still counts when the conversation goes on.
- Errors name the client's input index (``input[3].id``), not counting the history in front;
  an item of that history is named by its place in it (``previous_response_id``).

What it does, in input order:

- ``{"type": "item_reference", "id": …}`` (also the bare ``{"id": …}`` the API accepts) becomes
  the item it names, from the response store: an item a response the gateway stored produced
  (its output; store.py keeps an index item id -> item that lives and dies with the responses
  holding it unchanged; a client's own input item is never one: it cannot redefine an id). The
  Vercel AI SDK sends every earlier assistant message and reasoning item this way while ``store``
  is on (its default). Unknown or expired -> 400 ``item_not_found``.
- A ``reasoning`` item whose ``encrypted_content`` this gateway sealed (``include:
  ["reasoning.encrypted_content"]``, purpose ``reasoning``) gets its reasoning text back as
  ``content`` (``reasoning_text``), which lowering puts in the assistant message's reasoning field:
  the backend re-reads exactly the reasoning it produced, whatever the client did to the summary.
  Not sealed by this gateway, altered, or sealed under another key -> 400 ``invalid_encrypted_content``.
- ``additional_tools`` input items (newer Codex delivers tools that way) add their tools to the
  request's ``tools``, in input order; the item itself lowers to nothing (lowering skips it).
- A ``conversation``'s items (conversations.py), like a previous response's conversation, go in
  front (``earlier``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from .errors import GatewayError
from .seal import SealError, Sealer

REASONING_PURPOSE = "reasoning"  # what the translator seals reasoning text for
INCLUDE_REASONING = "reasoning.encrypted_content"  # the `include` value that asks for it
COMPACTION = "compaction"  # Codex's sealed summary item (compaction.py)
COMPACTION_TRIGGER = "compaction_trigger"  # the item that asks for one (compaction.py)

Resolve = Callable[[list[str]], dict[str, dict]]  # item ids -> the stored items found (missing: absent)


def as_items(value: object) -> list | None:
    """A request's ``input`` as items: a string is one user message, a list is itself, none is
    none (``[]``: optional, as in the API; the request goes on from what it names, or its
    instructions); anything else is None (validation names it)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if isinstance(value, list) else None


def wants_sealed_reasoning(raw: dict) -> bool:
    include = raw.get("include")
    return isinstance(include, list) and INCLUDE_REASONING in include


def _is_reference(item: object) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "id" in item and "role" not in item and "content" not in item)


class Ids:
    """A set of ids held as frozensets, each less than half the size of the one before: adding a
    few ids (a conversation that goes on by a few items a turn) costs O(those ids) amortized
    O(log n) an id, not a copy of every id held; a lookup looks in at most log2(n) layers.
    Immutable; equal to another holding the same ids, however layered."""

    __slots__ = ("_layers",)

    def __init__(self, layers: tuple = ()):
        self._layers = layers

    def __contains__(self, item_id: object) -> bool:
        return any(item_id in layer for layer in self._layers)

    def __iter__(self):
        for layer in self._layers:
            yield from layer

    def __len__(self) -> int:
        return sum(map(len, self._layers))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ids) and len(self) == len(other) and all(i in other for i in self)

    def __hash__(self) -> int:
        return hash(frozenset(self))

    def __repr__(self) -> str:
        return f"Ids({sorted(self)!r})"

    def plus(self, new: set) -> Ids:
        if not new:
            return self
        layers, last = self._layers, frozenset(new)
        while layers and 2 * len(last) >= len(layers[-1]):
            last = layers[-1] | last
            layers = layers[:-1]
        return Ids(layers + (last,))


class Facts(NamedTuple):
    """What the walks of a request's items outside the caches ask of them (``check_caps``,
    ``reference_ids``, ``expand``, ``compaction.prepare``, turn.py's ids given twice), found in
    one pass (``FACTS``)."""

    parts: int = 0  # content parts: the lengths of the items' content, output and summary lists
    more_tools: bool = False  # an additional_tools item
    refs: tuple = ()  # (index, id) of each reference
    work: bool = False  # an item ``expand`` changes or reads (reasoning, additional_tools)
    compaction: tuple = ()  # the indices of compaction items and triggers
    ids: Ids = Ids()  # the ids the items (not references) have
    twice: tuple = ()  # the indices of items whose id one before them has (conversations.unique says so)


def parts_of(item: dict) -> int:
    """The content parts an input item holds (its ``content``, ``output`` or ``summary`` lists),
    as ``max_content_parts`` counts them."""
    n = 0
    for key in ("content", "output", "summary"):
        value = item.get(key)
        if isinstance(value, list):
            n += len(value)
    return n


def _walk(items: list, start: int, facts: Facts) -> Facts:
    """``facts`` (of ``items[:start]``) with ``items[start:]``'s added."""
    parts, more_tools, work = facts.parts, facts.more_tools, facts.work
    refs, compaction, twice = list(facts.refs), list(facts.compaction), list(facts.twice)
    ids, new = facts.ids, set()
    for i in range(start, len(items)):
        item = items[i]
        if not isinstance(item, dict):
            continue
        parts += parts_of(item)
        kind = item.get("type")
        if (kind is None or kind == "item_reference") and _is_reference(item):
            refs.append((i, item.get("id")))
            continue
        item_id = item.get("id")
        if isinstance(item_id, str) and item_id:
            if item_id in new or item_id in ids:
                twice.append(i)
            else:
                new.add(item_id)
        if kind == "reasoning":
            work = True
        elif kind == "additional_tools":
            work = more_tools = True
        elif kind == COMPACTION or kind == COMPACTION_TRIGGER:
            compaction.append(i)
    return Facts(parts, more_tools, tuple(refs), work, tuple(compaction), ids.plus(new), tuple(twice))


class ItemFacts:
    """``Facts`` of the input lists walked last, so that a list that goes on from one is walked
    only past it: Codex resends its whole history every HTTP turn, and these walks were ~1 µs an
    item each (2–3 ms a turn at 3,000 items). The history's items are the same objects from turn
    to turn (requestbody.py decodes the shared part of a body once; a socket remembers its
    conversation), so comparing with a kept list is one C-speed pass (a list compares its items
    by identity first; items that are equal without being the same object have the same facts
    too: facts are the items' own, the same whoever sent them). One turn's check, lookup,
    expansion and compaction ask of the same list: three of the four find it whole. Items are
    read, never changed (as schema.ItemMemo and the prefix cache already require). Bounded:
    ``runs`` lists (one that
    goes on from a kept one replaces it), of ``MIN_ITEMS`` to ``MAX_ITEMS`` items (a shorter list
    is walked in less time than it takes to keep it; a longer one is walked whole each time, as
    before the memo)."""

    MIN_ITEMS = 32
    MAX_ITEMS = 50_000

    def __init__(self, runs: int = 8):
        self.max_runs = runs
        self._runs: list[tuple[list, Facts]] = []  # (a copy of a list walked, its facts), oldest first

    def clear(self) -> None:
        self._runs = []

    def of(self, items: list) -> Facts:
        if len(items) < self.MIN_ITEMS:
            return _walk(items, 0, Facts())
        base, start, extends = Facts(), 0, None
        for run in reversed(self._runs):
            was, facts = run
            n = len(was)
            if start < n <= len(items) and items[n - 1] is was[n - 1] and items[:n] == was:
                if n == len(items):
                    return facts
                base, start, extends = facts, n, run
        facts = _walk(items, start, base)
        if len(items) > self.MAX_ITEMS:
            return facts
        runs = self._runs
        if extends is not None:
            runs.remove(extends)
        runs.append((items[:], facts))
        del runs[:-self.max_runs]
        return facts


FACTS = ItemFacts()  # one per process, like requestbody.PREFIXES: facts are the items' own


def facts(items: object) -> Facts:
    """The ``Facts`` of an input list (``FACTS``); of nothing for anything else."""
    return FACTS.of(items) if isinstance(items, list) else Facts()


def where(i: int, before: int, field: str) -> tuple[str, str]:
    """How ``field`` of item ``i`` of a conversation whose first ``before`` items are the stored
    conversation a request continues is named in an error: (the message's words, ``param``). An
    item of the client's own input by its place there (``input[3].id`` in both: the message
    points where ``param`` does), one of the stored conversation as the previous response's
    (the client never sent it). The one rule of every input item's error (``expand``,
    compaction.py ``prepare``)."""
    if i >= before:
        return f"input[{i - before}].{field}", f"input[{i - before}].{field}"
    return f"item {i} of the conversation previous_response_id continues ({field})", "previous_response_id"


def reference_ids(items: object) -> list[str]:
    """The ids an input list refers to (for a store that must fetch them before ``expand``)."""
    return [ref for _, ref in facts(items).refs if isinstance(ref, str) and ref]


def expand(raw: dict, items: list, resolve: Resolve | None = None,
           sealer: Sealer | None = None, earlier: list | None = None) -> tuple[dict, list]:
    """``(raw, items)`` with references resolved, sealed reasoning restored and additional tools
    merged into ``raw["tools"]``, in conversation order. ``items`` is the client's input list;
    ``earlier``, the stored conversation a ``previous_response_id`` continues: it goes in front
    (``raw["input"]`` and the items returned are then the whole conversation)."""
    before = len(earlier) if earlier else 0
    whole = earlier + items if earlier else items
    known = facts(whole)
    refs = known.refs
    extra_tools: list = []
    if not refs and not known.work:
        return ({**raw, "input": whole} if earlier else raw), whole  # nothing to do: the common case (FACTS)
    out = list(whole)
    if refs:
        for i, ref in refs:
            if not isinstance(ref, str) or not ref:
                name, param = where(i, before, "id")
                raise GatewayError(f"{name}: an item_reference needs the id of an item", param=param,
                                   code="invalid_value")
        found = resolve([ref for _, ref in refs]) if resolve is not None else {}
        for i, ref in refs:
            item = found.get(ref)
            if item is None:
                name, param = where(i, before, "id")
                raise GatewayError(
                    f"{name.removesuffix('.id')}: item {ref!r} not found (unknown, expired, or its response was not "
                    "stored)", param=param, code="item_not_found")
            out[i] = item
    for i, item in enumerate(out):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "reasoning" and item.get("encrypted_content") is not None and sealer is not None:
            try:
                text = sealer.unseal(REASONING_PURPOSE, item["encrypted_content"])
            except SealError as exc:
                name, param = where(i, before, "encrypted_content")
                raise GatewayError(
                    f"{name}: {exc} (reasoning this gateway did not seal cannot be read back; drop the item or "
                    "its encrypted_content)", param=param, code="invalid_encrypted_content") from None
            restored = {k: v for k, v in item.items() if k != "encrypted_content"}
            restored["content"] = [{"type": "reasoning_text", "text": text}]
            out[i] = restored
        elif kind == "additional_tools":
            tools = item.get("tools")
            if not isinstance(tools, list):
                name, param = where(i, before, "tools")
                raise GatewayError(f"{name}: a list of tools is required", param=param, code="invalid_value")
            extra_tools.extend(tools)
    raw = {**raw, "input": out}
    if extra_tools:
        own = raw.get("tools")
        raw["tools"] = (own if isinstance(own, list) else []) + extra_tools
    return raw, out
