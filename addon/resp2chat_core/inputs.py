"""A request's input made whole before it is validated: what clients send by reference or sealed.

Rules of this file:
- Pure. The store is reached only through the ``resolve`` callable (item id -> stored item), the
  key only through the ``Sealer``: both are handed in by the caller (turn.py).
- Byte-deterministic like lowering: the same request and the same store give the same items.
  Unsealing is (a sealed string decrypts to one text, whatever its random nonce).
- Errors name the client's input index (``input[3].id``), before any stored history is prepended.

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
- ``conversation`` (the Conversations API) is refused with a 400 saying so: the gateway keeps
  responses, not conversations; ``previous_response_id`` or the full history serve instead.
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


def expand(raw: dict, items: list, resolve: Resolve | None = None,
           sealer: Sealer | None = None) -> tuple[dict, list]:
    """``(raw, items)`` with references resolved, sealed reasoning restored and additional tools
    merged into ``raw["tools"]``; ``items`` is the client's input list (not stored history)."""
    if raw.get("conversation") is not None:
        raise GatewayError(
            "conversation is not supported: this gateway does not implement the Conversations API "
            "(/v1/conversations); send the whole history in input, or continue with previous_response_id",
            param="conversation", code="unsupported_parameter")
    refs = [(i, item.get("id")) for i, item in enumerate(items) if _is_reference(item)]
    extra_tools: list = []
    if not refs and not any(isinstance(item, dict) and item.get("type") in ("reasoning", "additional_tools")
                            for item in items):
        return raw, items  # nothing to do: the common case costs one pass
    out = list(items)
    if refs:
        for i, ref in refs:
            if not isinstance(ref, str) or not ref:
                raise GatewayError(f"input[{i}].id: an item_reference needs the id of an item",
                                   param=f"input[{i}].id", code="invalid_value")
        found = resolve([ref for _, ref in refs]) if resolve is not None else {}
        for i, ref in refs:
            item = found.get(ref)
            if item is None:
                raise GatewayError(
                    f"input[{i}]: item {ref!r} not found (unknown, expired, or its response was not stored)",
                    param=f"input[{i}].id", code="item_not_found")
            out[i] = item
    for i, item in enumerate(out):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "reasoning" and item.get("encrypted_content") is not None and sealer is not None:
            try:
                text = sealer.unseal(REASONING_PURPOSE, item["encrypted_content"])
            except SealError as exc:
                raise GatewayError(
                    f"input[{i}].encrypted_content: {exc} (reasoning this gateway did not seal cannot be "
                    "read back; drop the item or its encrypted_content)",
                    param=f"input[{i}].encrypted_content", code="invalid_encrypted_content") from None
            restored = {k: v for k, v in item.items() if k != "encrypted_content"}
            restored["content"] = [{"type": "reasoning_text", "text": text}]
            out[i] = restored
        elif kind == "additional_tools":
            tools = item.get("tools")
            if not isinstance(tools, list):
                raise GatewayError(f"input[{i}].tools: a list of tools is required",
                                   param=f"input[{i}].tools", code="invalid_value")
            extra_tools.extend(tools)
    raw = {**raw, "input": out}
    if extra_tools:
        own = raw.get("tools")
        raw["tools"] = (own if isinstance(own, list) else []) + extra_tools
    return raw, out
