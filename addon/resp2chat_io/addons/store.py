"""Stored responses: ``previous_response_id``, ``item_reference`` and ``GET``/``DELETE /v1/responses/{id}``.

Owns the store settings (``session_ttl_hours``, ``max_sessions``, ``max_session_memory_mb``,
``session_store_dir``, ``state_store_url``); keeps each completed turn whose request did not say
``store: false`` (a ``finished`` listener of turns.py, and cache hits via ``put``).

Everything stored has an owner (resp2chat_core/owner.py; for a request, ``Upstreams.owner_of``):
``GET``/``DELETE``, ``previous_response_id`` and ``item_reference`` see only their own owner's
responses and items, so another owner's id is exactly an unknown one (404,
``previous_response_not_found``, ``item_not_found``).

``state_store_url`` empty: the store lives in this process (resp2chat_io/store.py). A
``redis://`` URL: it lives in Redis, shared by every replica (resp2chat_io/redis_state.py).
Redis is asked asynchronously: ``request`` fetches the history a ``previous_response_id``
continues from, and the items its ``item_reference`` inputs name, before turns.py lowers the
request (``history`` and ``resolve_items`` then read what was fetched),
and answers ``503 store_unavailable`` when Redis cannot be reached; writes run as tasks. The
WebSocket path awaits ``fetch`` for each message instead (addons/websocket.py). A
response is written when its turn ends, a moment after the client read ``response.completed``:
a client that continues (or GETs it) at once on another replica can ask before the write
landed, so an id Redis does not know yet is looked up again for up to ``FRESH_WAIT`` seconds
before the 400/404.
"""

from __future__ import annotations

import asyncio
import functools
import json

from mitmproxy import http

from resp2chat_core import inputs
from resp2chat_core.errors import GatewayError, error_json
from resp2chat_core.labels import shown
from resp2chat_core.turn import Caps, check_caps
from resp2chat_io import offload
from resp2chat_io.redis_state import RedisResponseStore, RedisState, StateUnavailable, describe
from resp2chat_io.store import ResponseStore

from .base import META, RESPONSES_PATHS, Owner, fails_closed, log
from .turns import note_request

JSON_HEADERS = {"content-type": "application/json"}
PREFIXES = ("/v1/responses/", "/responses/")
CONVERSATIONS = ("/v1/conversations", "/conversations")  # not implemented: answered here, not forwarded
FRESH_WAIT = 2.0  # seconds: how long a just-finished response may take to reach Redis
FRESH_POLL = 0.05


def store_unavailable(why: str) -> GatewayError:
    """``unavailable`` as an error (a WebSocket message's: addons/websocket.py)."""
    return GatewayError(f"{why}: the shared state store (Redis) cannot be reached right now; try again shortly",
                        code="store_unavailable", status=503, type="server_error")


def unavailable(why: str) -> http.Response:
    return http.Response.make(503, error_json(
        f"{why}: the shared state store (Redis) cannot be reached right now; try again shortly",
        status_type="server_error", code="store_unavailable"), {**JSON_HEADERS, "retry-after": "1"})


@fails_closed
class StoredResponses(Owner):
    name = "resp2chat_store"
    owner = "store"
    also_reads = ("seal_key", *Caps.SETTINGS)  # (seal_key: only to warn, replicas sharing state need the same one)

    def __init__(self, source, upstreams) -> None:
        super().__init__(source)
        self.upstreams = upstreams  # whose stored state a request sees: ``upstreams.owner_of(flow)``
        self.store: ResponseStore | RedisResponseStore | None = None
        self.state: RedisState | None = None  # Redis, when state_store_url is set (also the replay cache's)
        self.caps = Caps()  # (what a request may hold: nothing past them is looked up)
        self._config: tuple | None = None
        self._fetched: dict[tuple[str, str], list | None] = {}  # (owner, previous_response_id) -> its items (Redis)
        self._fetched_items: dict[tuple[str, str], dict] = {}  # (owner, item_reference id) -> the item (Redis)
        self._fetching: dict[str, tuple[str, str | None, tuple[str, ...]]] = {}  # flow id -> what it fetched

    def apply(self, updated: set[str]) -> None:
        self.caps = Caps.from_settings(self.s)
        config = tuple(self.s[f.name] for f in self.fields)
        if config != self._config:
            self._config = config
            url = self.s["state_store_url"]
            if self.state is not None and self.state.url != url:
                asyncio.ensure_future(self.state.close())
                self.state = None
            if url:
                if self.state is None:
                    self.state = RedisState(url)
                    log.info(f"resp2chat: stored responses and the replay cache live in {describe(url)}")
                if not self.s["seal_key"]:
                    log.warning("resp2chat: state_store_url is set but seal_key is not: this replica seals "
                                "encrypted_content (reasoning, compaction) with its own per-install key, which "
                                "other replicas cannot open; give every replica the same seal_key")
                self.store = RedisResponseStore(self.state, ttl=self.s["session_ttl_hours"] * 3600,
                                                max_entries=self.s["max_sessions"],
                                                max_bytes=self.s["max_session_memory_mb"] << 20)
            else:
                self.store = ResponseStore.from_settings(self.s)

    @property
    def shared(self) -> bool:
        return self.state is not None

    async def done(self) -> None:
        if self.state is not None:
            await self.state.close()  # (after the writes still running: the replay cache's too)

    def history(self, response_id: str, *, owner: str) -> list | None:
        """The conversation ``owner``'s stored response ``response_id`` ended (None: unknown)."""
        if self.shared:
            return self._fetched.get((owner, response_id))  # fetched by `request` for this flow
        entry = self.store.get(response_id, owner=owner) if self.store is not None else None
        return entry["items"] if entry else None

    def resolve_items(self, item_ids: list[str], *, owner: str) -> dict[str, dict]:
        """``item_reference`` ids -> ``owner``'s stored items (resp2chat_core/inputs.py); missing: absent."""
        if self.shared:
            return {i: self._fetched_items[(owner, i)] for i in item_ids if (owner, i) in self._fetched_items}
        return self.store.resolve_items(item_ids, owner=owner) if self.store is not None else {}

    def put(self, response_id: str, items: list, final: dict, *, owner: str) -> None:
        if self.store is None:
            return
        if not self.shared:
            self.store.put(response_id, items, final, owner=owner)
            return
        self.state.write(f"response {response_id} not stored", self.store.put(response_id, items, final, owner=owner))

    def finished(self, done) -> None:
        if done.status == "completed" and done.turn.store:  # (the final's id: a replayed answer keeps its own)
            self.put(done.final["id"], done.turn.items + done.final["output"], done.final, owner=done.turn.owner)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        path = flow.request.path.split("?", 1)[0]
        if path.startswith(CONVERSATIONS) and path.removeprefix("/v1").split("/")[1] == "conversations":
            flow.response = http.Response.make(404, error_json(
                "the Conversations API is not supported by this gateway: send the whole history in input, "
                "or continue a stored response with previous_response_id", code="unsupported_endpoint"),
                JSON_HEADERS)
            return
        if self.shared and path in RESPONSES_PATHS and flow.request.method == "POST":
            await self._prefetch(flow)
            return
        if not path.startswith(PREFIXES):
            return
        response_id, method = path.rsplit("/", 1)[1], flow.request.method
        owner = self.upstreams.owner_of(flow)
        try:
            found = self.store is not None and method in ("GET", "DELETE")
            entry = await self._get(response_id, owner) if found else None
            if entry is not None and method == "DELETE":
                await self._delete(response_id, owner)
        except StateUnavailable:
            flow.response = unavailable(f"{method} {path}")
            return
        if entry is None:
            status, body = (404, error_json(f"no stored response {shown(response_id)!r}", code="response_not_found")) \
                if method in ("GET", "DELETE") else (405, error_json(f"{method} is not supported here"))
        elif method == "GET":
            status, body = 200, json.dumps(entry["response"], ensure_ascii=False).encode()
        else:
            status, body = 200, json.dumps({"id": response_id, "object": "response", "deleted": True}).encode()
        flow.response = http.Response.make(status, body, JSON_HEADERS)

    async def _get(self, response_id: str, owner: str) -> dict | None:
        return await self._fresh(response_id, owner) if self.shared else self.store.get(response_id, owner=owner)

    async def _fresh(self, response_id: str, owner: str) -> dict | None:
        """From Redis; an id it does not know yet is asked again for up to FRESH_WAIT seconds."""
        entry = await self.store.get(response_id, owner=owner)
        waited = 0.0
        while entry is None and waited < FRESH_WAIT:  # maybe still on its way from another replica
            await asyncio.sleep(FRESH_POLL)
            waited += FRESH_POLL
            entry = await self.store.get(response_id, owner=owner)
        return entry

    async def _delete(self, response_id: str, owner: str) -> bool:
        return await self.store.delete(response_id, owner=owner) if self.shared else \
            self.store.delete(response_id, owner=owner)

    async def fetch(self, previous: str | None, refs, *, owner: str) -> tuple[list | None, dict[str, dict]]:
        """Redis, for a caller that keeps what it fetched itself (a WebSocket message: its socket
        serves one at a time): the history ``previous`` continues (None: unknown) and the items
        the ``refs`` ids name (missing: absent), ``owner``'s. ``StateUnavailable`` when Redis is down."""
        history = None
        if previous is not None:
            entry = await self._fresh(previous, owner)
            history = entry["items"] if entry else None
        return history, await self.store.items(refs, owner=owner)

    async def _prefetch(self, flow: http.HTTPFlow) -> None:
        """Redis: what a request continues from (``previous_response_id``) and refers to
        (``item_reference`` ids), fetched before turns.py lowers it."""
        body = flow.request.get_content(strict=False) or b""
        if b'"previous_response_id"' not in body and b'"id"' not in body:
            return
        try:
            # (a large body off the loop, reduced there to what this needs)
            wanted = await offload.reduce(body, functools.partial(_wanted, caps=self.caps))
        except GatewayError:
            return  # turns.py says what is wrong with it (invalid, or past the caps)
        if wanted is None:
            return
        previous, refs, model, pck = wanted
        owner = self.upstreams.owner_of(flow)
        # registered before the first await: another flow that ends meanwhile must not drop what
        # this one fetches, and what it fetched goes when it ends (``_release``), however it ends
        self._fetching[flow.id] = (owner, previous, refs)
        try:
            history, items = await self.fetch(previous, refs, owner=owner)
        except StateUnavailable:
            what = f"previous_response_id {shown(previous)!r}" if previous is not None else "item_reference"
            flow.response = unavailable(what)  # (its response hook releases what was fetched)
            note_request(flow.metadata.setdefault(META, {}), body,  # (outcomes.py)
                         {"model": model, "prompt_cache_key": pck})
            return
        if previous is not None:
            self._fetched[(owner, previous)] = history
        self._fetched_items.update(((owner, i), item) for i, item in items.items())

    def response(self, flow: http.HTTPFlow) -> None:
        self._release(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._release(flow)

    def _release(self, flow: http.HTTPFlow) -> None:
        fetched = self._fetching.pop(flow.id, None)
        if fetched is None:
            return
        owner, previous, refs = fetched
        still = [(o, p, r) for o, p, r in self._fetching.values() if o == owner]
        if previous is not None and all(previous != p for _, p, _ in still):
            self._fetched.pop((owner, previous), None)
        for item_id in refs:
            if all(item_id not in r for _, _, r in still):
                self._fetched_items.pop((owner, item_id), None)


def _wanted(raw: object, caps: Caps) -> tuple | None:
    """What a request needs from Redis (``previous_response_id``, ``item_reference`` ids; None:
    nothing), and what outcomes.py reports of it (model, prompt_cache_key), should Redis be down.
    ``GatewayError`` past the caps (before its items are walked)."""
    if not isinstance(raw, dict):
        return None
    check_caps(raw, caps)
    previous = raw.get("previous_response_id")
    previous = previous if isinstance(previous, str) and previous else None
    refs = tuple(dict.fromkeys(inputs.reference_ids(raw.get("input"))))
    if previous is None and not refs:
        return None
    return previous, refs, raw.get("model"), raw.get("prompt_cache_key")
