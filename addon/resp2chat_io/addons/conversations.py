"""The Conversations API, with OpenAI's shapes (resp2chat_core/conversations.py says what they are):

| request | answer |
| --- | --- |
| ``POST /v1/conversations`` ``{metadata, items}`` | the conversation object |
| ``GET /v1/conversations/{id}`` | the conversation object |
| ``POST /v1/conversations/{id}`` ``{metadata}`` | the conversation, its metadata replaced (``metadata`` required: null clears it) |
| ``DELETE /v1/conversations/{id}`` | ``{id, object: "conversation.deleted", deleted: true}`` |
| ``GET /v1/conversations/{id}/items`` (``after``, ``limit``, ``order``, ``include``) | a list of its items (listing.py) |
| ``POST /v1/conversations/{id}/items`` ``{items}`` (``include``) | a list of the items added (1 to 20: required), with their ids |
| ``GET /v1/conversations/{id}/items/{item_id}`` (``include``) | the item |
| ``DELETE /v1/conversations/{id}/items/{item_id}`` | the conversation object |

A conversation lives in the response store (addons/store.py: memory with its directory copy, or
Redis, as a ``conv_…`` entry), owned by the client that made it (``Upstreams.owner_of``: another
owner's conversation is an unknown one, 404 ``conversation_not_found``), bounded and expiring as
stored responses are. Every change is one write over the version it read (``StoredResponses
.rewrite``), so changes from several requests or replicas at once all land. A Responses request
that names the conversation (``conversation``) reads and extends it through the same store
(turn.py, ``StoredResponses.finished``).
"""

from __future__ import annotations

import time
import uuid

from mitmproxy import http

from resp2chat_core import conversations as C
from resp2chat_core import gate as G
from resp2chat_core import inputs
from resp2chat_core import listing
from resp2chat_core.errors import GatewayError
from resp2chat_core.labels import shown
from resp2chat_io import offload

from .base import fails_closed, json_response, refused_on_failure, request_id
from .store import new_item_id


@fails_closed
class Conversations:
    name = "resp2chat_conversations"

    def __init__(self, store, upstreams) -> None:
        self.store, self.upstreams = store, upstreams

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        found = G.endpoint(path)  # (the gate let only its methods through)
        if found is None or found[0] != "conversations":
            return
        with refused_on_failure(flow, f"{req.method} {path}"):
            body = await self._body(req) if req.method == "POST" else {}
            answer = await self.answer(found[1], req.method, G.path_ids(path), body, req.query,
                                       self.upstreams.owner_of(flow))
        if flow.response is not None:
            return
        flow.response = json_response(200, answer, x_request_id=request_id(flow))

    @staticmethod
    async def _body(req: http.Request) -> dict:
        data = await offload.loads(req.get_content(strict=False) or b"{}")
        if not isinstance(data, dict):
            raise GatewayError("request body must be a JSON object", code="invalid_json")
        return data

    async def _references(self, body: dict, owner: str):
        """The stored items (``owner``'s) that ``body``'s items refer to, as a turn finds them."""
        refs = tuple(dict.fromkeys(inputs.reference_ids(body.get("items"))))
        found = (await self.store.lookup(None, refs, owner=owner)).items if refs else {}
        return lambda ids: {i: found[i] for i in ids if i in found}

    async def answer(self, shape: str, method: str, ids: list[str], body: dict, query, owner: str) -> dict:
        """What one request of the API answers (``GatewayError``: its refusal)."""
        store = self.store
        if shape == "":  # POST: a new conversation
            metadata = C.check_metadata(body.get("metadata"))
            items = listing.with_ids(C.new_items(body.get("items"), sealer=store.sealer,
                                                 resolve=await self._references(body, owner)), new_item_id)
            obj = C.conversation_object(C.ID_PREFIX + uuid.uuid4().hex, int(time.time()), metadata)
            if not await store.put_now(obj["id"], items, obj, owner=owner):
                raise GatewayError("the conversation is larger than the store keeps (max_session_memory_mb)",
                                   param="items", code="conversation_too_large", status=413)
            return obj
        conversation_id = ids[0]
        if not C.is_id(conversation_id):
            raise C.not_found(conversation_id)
        if shape == "/{id}" and method == "POST":
            metadata = C.check_metadata(C.required(body, "metadata"))  # (OpenAI requires it: none never erases it)
            return await store.rewrite(conversation_id, owner, lambda items, obj: (
                items, {**obj, "metadata": metadata}, {**obj, "metadata": metadata}))
        if shape == "/{id}/items" and method == "POST":
            include = listing.include_query(query)  # (its only query, as OpenAI's)
            items = C.new_items(body.get("items"), sealer=store.sealer, some=True,
                                resolve=await self._references(body, owner))
            added = await store.append(conversation_id, items, owner, check=C.unique)  # (an id it holds: a 400)
            return listing.page(added, listing.Page(limit=len(added), order="asc", include=include), store.sealer)
        if shape == "/{id}/items/{id}" and method == "DELETE":
            item_id = ids[1]

            def without(items: list, obj: dict):
                kept = [i for i in items if not (isinstance(i, dict) and i.get("id") == item_id)]
                if len(kept) == len(items):
                    raise item_not_found(item_id)
                return kept, obj, obj
            return await store.rewrite(conversation_id, owner, without)
        entry = await store.get(conversation_id, owner, "conversation")  # (the rest only read)
        if entry is None:
            raise C.not_found(conversation_id)
        if method == "DELETE":  # /{id}
            await store.delete(conversation_id, owner=owner)
            return C.deleted(conversation_id)
        if shape == "/{id}":
            return entry["response"]
        if shape == "/{id}/items":
            return listing.page(entry["items"], listing.page_query(query), store.sealer)
        include = listing.include_query(query)  # (an item's only query, as OpenAI's)
        item = next((i for i in entry["items"] if isinstance(i, dict) and i.get("id") == ids[1]), None)
        if item is None:
            raise item_not_found(ids[1])
        return listing.as_listed(item, include, store.sealer)


def item_not_found(item_id: str) -> GatewayError:
    return GatewayError(f"no item {shown(item_id)!r} in this conversation", param="item_id", code="item_not_found",
                        status=404)
