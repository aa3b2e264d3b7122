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
  the item it names, from the response store: outputs and inputs of responses the gateway
  stored (store.py keeps an index item id -> item that lives and dies with its response). The
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

from typing import Callable

from .errors import GatewayError
from .seal import SealError, Sealer

REASONING_PURPOSE = "reasoning"  # what the translator seals reasoning text for
INCLUDE_REASONING = "reasoning.encrypted_content"  # the `include` value that asks for it

Resolve = Callable[[list[str]], dict[str, dict]]  # item ids -> the stored items found (missing: absent)


def wants_sealed_reasoning(raw: dict) -> bool:
    include = raw.get("include")
    return isinstance(include, list) and INCLUDE_REASONING in include


def _is_reference(item: object) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "id" in item and "role" not in item and "content" not in item)


def reference_ids(items: object) -> list[str]:
    """The ids an input list refers to (for a store that must fetch them before ``expand``)."""
    if not isinstance(items, list):
        return []
    return [i["id"] for i in items if _is_reference(i) and isinstance(i.get("id"), str) and i["id"]]


def expand(raw: dict, items: list, resolve: Resolve | None = None,
           sealer: Sealer | None = None, earlier: list | None = None) -> tuple[dict, list]:
    """``(raw, items)`` with references resolved, sealed reasoning restored and additional tools
    merged into ``raw["tools"]``, in conversation order. ``items`` is the client's input list;
    ``earlier``, the stored conversation a ``previous_response_id`` continues: it goes in front
    (``raw["input"]`` and the items returned are then the whole conversation)."""
    before = len(earlier) if earlier else 0
    whole = earlier + items if earlier else items

    def where(i: int, field: str) -> tuple[str, str]:
        """How item ``i`` of the whole conversation is named: (in a message, param)."""
        if i >= before:
            return f"input[{i - before}].{field}", f"input[{i - before}].{field}"
        return f"item {i} of the conversation previous_response_id continues ({field})", "previous_response_id"

    refs = [(i, item.get("id")) for i, item in enumerate(whole) if _is_reference(item)]
    extra_tools: list = []
    if not refs and not any(isinstance(item, dict) and item.get("type") in ("reasoning", "additional_tools")
                            for item in whole):
        return ({**raw, "input": whole} if earlier else raw), whole  # nothing to do: the common case costs one pass
    out = list(whole)
    if refs:
        for i, ref in refs:
            if not isinstance(ref, str) or not ref:
                name, param = where(i, "id")
                raise GatewayError(f"{name}: an item_reference needs the id of an item", param=param,
                                   code="invalid_value")
        found = resolve([ref for _, ref in refs]) if resolve is not None else {}
        for i, ref in refs:
            item = found.get(ref)
            if item is None:
                name, param = where(i, "id")
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
                name, param = where(i, "encrypted_content")
                raise GatewayError(
                    f"{name}: {exc} (reasoning this gateway did not seal cannot be read back; drop the item or "
                    "its encrypted_content)", param=param, code="invalid_encrypted_content") from None
            restored = {k: v for k, v in item.items() if k != "encrypted_content"}
            restored["content"] = [{"type": "reasoning_text", "text": text}]
            out[i] = restored
        elif kind == "additional_tools":
            tools = item.get("tools")
            if not isinstance(tools, list):
                name, param = where(i, "tools")
                raise GatewayError(f"{name}: a list of tools is required", param=param, code="invalid_value")
            extra_tools.extend(tools)
    raw = {**raw, "input": out}
    if extra_tools:
        own = raw.get("tools")
        raw["tools"] = (own if isinstance(own, list) else []) + extra_tools
    return raw, out
