"""Stored responses: ``previous_response_id``, ``item_reference`` and ``GET``/``DELETE /v1/responses/{id}``
(a GET's ``include`` decides what its output items show, as an item list's: listing.py ``as_listed``).

Owns the store settings (``session_ttl_hours``, ``max_sessions``, ``max_session_memory_mb``,
``session_store_dir``, ``state_store_url``); keeps each completed or incomplete turn whose request
did not say ``store: false`` (a ``finished`` listener of turns.py, and cache hits via ``put``).

``state_store_url`` empty: the store lives in this process (resp2chat_io/store.py
``ResponseStore``). A ``redis://`` URL: it lives in Redis, shared by every replica
(resp2chat_io/redis_state.py). Either way it is one interface (store.py ``Store``),
asynchronous, and nothing here asks which: ``lookup`` is the one lookup every turn makes before
it is lowered (HTTP and WebSocket alike: turns.py), ``put`` runs through ``Writes`` (at once
for memory, as a task for Redis), and a response id the store does not know yet is asked again
for up to the store's ``fresh_wait`` (another replica wrote it a moment ago) before it is unknown.
Redis down: ``store_unavailable`` (503) for what needs it. The other addons (background.py,
conversations.py) reach the store through this one alone: ``get``, ``status``, and the store's
own writes passed through (``put_now``, ``renew``, ``delete``). A background run writes to the
store it was queued in (``within``) to its end, when ``state_store_url`` changes meanwhile
(addons/background.py); a Redis left behind is closed once its runs ended (``_retire``).

Everything stored has an owner (resp2chat_core/owner.py; for a request, ``Upstreams.owner_of``):
``GET``/``DELETE``, ``previous_response_id`` and ``item_reference`` see only their own owner's
responses and items, so another owner's id is exactly an unknown one (404,
``previous_response_not_found``, ``item_not_found``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from mitmproxy import http

from resp2chat_core import background as B, conversations, gate as G, listing, owner as owners
from resp2chat_core.errors import GatewayError
from resp2chat_core.labels import shown
from resp2chat_core.response import CONTINUABLE, STORED
from resp2chat_core.shares import by_client
from resp2chat_core.turn import Found
from resp2chat_io.limit_state import LimitState, LocalLimits, RedisLimits
from resp2chat_io.redis_state import RedisReplayCache, RedisResponseStore, RedisState, describe
from resp2chat_io.store import (Renewal, ReplayEntries, Replays, ResponseStore, StateUnavailable, Store, Writes,
                                input_count)

from .base import Owner, fails_closed, json_response, log, refused_on_failure, refusal, store_unavailable

FRESH_POLL = 0.05  # seconds between two asks for an id not known yet
APPEND_TRIES = 16  # writes of a conversation's change, each over the version it read
APPEND_WAIT, APPEND_WAIT_MAX = 0.002, 0.1  # seconds: after a lost race, a random wait up to this, doubled each time


def failed_previous(response_id: str) -> GatewayError:
    """A ``previous_response_id`` that names a failed response: it is kept (a GET shows its error)
    but not gone on from. The code a client recovers with (Codex sends the whole history again),
    as the Open Responses spec says of a WebSocket continuation that failed."""
    return GatewayError(f"previous response {shown(response_id)!r} failed: a failed response cannot be continued "
                        "(send its input again, without previous_response_id)", param="previous_response_id",
                        code="previous_response_not_found")


def new_item_id(kind: str, _index: int = 0) -> str:
    """An id for an item a conversation keeps (``msg`` or ``item``), as OpenAI's look (listing.py
    ``with_ids``)."""
    return f"{kind}_{uuid.uuid4().hex}"


@fails_closed
class StoredResponses(Owner):
    name = "resp2chat_store"
    owner = "store"
    also_reads = ("seal_key",)  # (only to warn: replicas sharing state need the same one)

    def __init__(self, source, upstreams) -> None:
        super().__init__(source)
        self.upstreams = upstreams  # whose stored state a request sees: ``upstreams.owner_of(flow)``
        self.store: Store | None = None
        self.state: RedisState | None = None  # Redis, when state_store_url is set
        self.writes = Writes()  # the store's writes, the replay cache's and the limits'
        # What else lives where the stored responses do, made when that changes (state_store_url):
        # the replay cache (its capacity is addons/replay.py's) and the clients' limits (this
        # process's own, kept across changes: while Redis is down it decides).
        self._local_limits = LocalLimits()
        self.replay_cache: Replays = ReplayEntries(0)
        self.limit_state: LimitState = self._local_limits
        self.sealer = None  # the gateway's (Turns.sealer, set by build()): sealed reasoning in item lists
        self.background = None  # addons/background.py (set by build()): cancel, resume
        self._config: tuple | None = None
        self._retiring: dict[RedisState, asyncio.Future] = {}  # Redis left behind, closed once its runs end

    def apply(self, updated: set[str]) -> None:
        config = tuple(self.s[f.name] for f in self.fields)
        if config == self._config:
            return
        before = dict(zip((f.name for f in self.fields), self._config or ()))
        self._config = config
        url = self.s["state_store_url"]
        if (self.store is not None and before.get("state_store_url") == url
                and (url or before.get("session_store_dir") == self.s["session_store_dir"])):
            # only a bound changed (an option set while it runs; with Redis, session_store_dir too: it
            # is the memory store's): the same store under the new bounds (past them, its oldest go);
            # one made anew would have started empty (memory), or lost the counts it had (Redis), and
            # be another than the one a background run lives in (``Run.home``: ``_retire``)
            self.store.rebound(ttl=self.s["session_ttl_hours"] * 3600, max_entries=self.s["max_sessions"],
                               max_bytes=self.s["max_session_memory_mb"] << 20)
            return
        if self.state is not None and self.state.url != url:
            self._retire(self.state, self.store)
            self.state = None
            self.replay_cache, self.limit_state = ReplayEntries(0), self._local_limits
        if url:
            if self.state is None:
                self.state = RedisState(url)
                self.replay_cache = RedisReplayCache(self.state, 0)
                self.limit_state = RedisLimits(self.state, self._local_limits, self.writes)
                log.info(f"resp2chat: stored responses, the replay cache and the clients' limits live in "
                         f"{describe(url)}")
            if not self.s["seal_key"]:
                log.warning("resp2chat: state_store_url is set but seal_key is not: this replica seals "
                            "encrypted_content (reasoning, compaction) with its own per-install key, which "
                            "other replicas cannot open; give every replica the same seal_key")
            self.store = RedisResponseStore(self.state, ttl=self.s["session_ttl_hours"] * 3600,
                                            max_entries=self.s["max_sessions"],
                                            max_bytes=self.s["max_session_memory_mb"] << 20)
        else:
            self.store = ResponseStore.from_settings(self.s)

    def _retire(self, state: RedisState, store: Store | None) -> None:
        """``state_store_url`` changed: the Redis it named is closed once no background run of
        this gateway lives in it any more, nor is being queued there (``store``: each runs to its
        end in the store it was queued in, addons/background.py ``left``)."""
        async def close() -> None:
            try:
                if self.background is not None and store is not None:
                    await self.background.left(store)
            finally:
                self._retiring.pop(state, None)
                await state.close()
        self._retiring[state] = asyncio.ensure_future(close())

    async def who_fills(self, clients) -> list[tuple[str, str, int, int]] | None:
        """What /metrics shows of the store (metrics.py): ``(client, kind, entries, bytes)`` rows
        (resp2chat_core/shares.py ``by_client``) for ``clients``, each configured client's
        (name, owner); with Redis the whole shared store, read now (one round trip: redis_state.py
        ``figures``). None: no store yet, or Redis did not answer."""
        if self.store is None:
            return None
        try:
            total, held, forwarded = await self.store.figures([owner for _, owner in clients])
        except StateUnavailable:
            return None
        return by_client(total, held, forwarded, clients)

    def state_gauges(self) -> tuple[bool | None, int]:
        """Whether the shared state store answers (None: there is none) and its failed calls."""
        state = self.state
        return (state.up, state.errors) if state is not None else (None, 0)

    async def done(self) -> None:
        await self.writes.flush()  # (the replay cache's too)
        for state, closing in list(self._retiring.items()):  # (closed now: its runs ended, Background.done came first)
            closing.cancel()
            await asyncio.gather(closing, return_exceptions=True)
            await state.close()  # (here: a task cancelled before its first step never runs its ``finally``)
        if self.state is not None:
            await self.state.close()

    # --- what a turn refers to -------------------------------------------------------------------

    async def lookup(self, previous: str | None, refs: tuple[str, ...], *, owner: str,
                     memory=None, kind: str = "response") -> Found:
        """The one lookup of a turn, before it is lowered (turns.py ``Turns.lookup``):
        ``previous``'s conversation (a response's; ``kind`` ``conversation``: a conversation's
        items) and the items ``refs`` name, ``owner``'s. ``memory`` (a WebSocket's
        ``Connection``) is asked first for a previous response. ``store_unavailable`` (a
        ``GatewayError``) when the store cannot be reached."""
        earlier = memory.history(previous) if memory is not None and previous is not None and kind == "response" \
            else None
        if earlier is not None and memory.stored(previous) and await self._deleted(previous, owner):
            return Found()  # (deleted over HTTP since, on any replica: unknown, as it is there)
        try:
            if previous is not None and earlier is None:
                if kind == "conversation":  # (this gateway's appends to it land first: read your own turns)
                    await self.writes.landed()
                entry = await self.get(previous, owner, kind)
                if entry is not None and B.is_running(entry["response"]):
                    raise GatewayError(f"previous response {shown(previous)!r} is a background response that has not "
                                       "ended: continue it once it has", param="previous_response_id",
                                       code="previous_response_in_progress")
                if entry is not None and entry["response"].get("status") == "failed":
                    raise failed_previous(previous)
                earlier = entry["items"] if entry else None
            items = await self.store.items(refs, owner=owner) if refs else {}
        except StateUnavailable:
            raise store_unavailable(f"previous_response_id {shown(previous)!r}" if previous is not None
                                    else "item_reference") from None
        return Found(earlier, items)

    async def _deleted(self, response_id: str, owner: str) -> bool:
        """Whether a stored response a WebSocket remembers was deleted since (the store's
        tombstone: one small read per continuation of a response it stored, instead of none;
        the memory still spares reading and decoding the conversation). The store unreachable:
        not known deleted, the memory answers (as for a turn with ``store: false``)."""
        try:
            return await self.store.deleted(response_id, owner=owner)
        except StateUnavailable:
            return False

    async def get(self, response_id: str, owner: str, kind: str = "response") -> dict | None:
        """A stored entry of this ``kind`` (``response``, or ``conversation``: what its object
        is), ``StateUnavailable`` when the store is down; a response id the store does not know yet
        is asked again for up to its ``fresh_wait`` (it may be on its way: a response is stored
        after its client saw it; a conversation is in the store before its create answers)."""
        entry = await self.store.get(response_id, owner=owner)
        waited = 0.0
        while entry is None and kind == "response" and waited < self.store.fresh_wait:
            await asyncio.sleep(FRESH_POLL)
            waited += FRESH_POLL
            entry = await self.store.get(response_id, owner=owner)
        return entry if entry is not None and entry["response"].get("object") == kind else None

    async def status(self, response_id: str, owner: str) -> dict | None:
        """A stored response's status alone (store.py ``status``: its brief and version, a few
        dozen bytes, not its entry), ``StateUnavailable`` when the store is down. What polls
        read: an id the store does not know is None at once (``get`` waits for it)."""
        return await self.store.status(response_id, owner=owner)

    # --- the store's writes, passed through (so its other addons reach the store through this one) --
    # (``put_now``, not ``put``: this addon's ``put`` is a turn's write started in the background,
    # that returns nothing; this one is the store's own, awaited, and says whether it was kept)

    async def put_now(self, response_id: str, items: list, response: dict, *, owner: str = owners.SHARED,
                      expect: int | None = None, within: Store | None = None) -> bool:
        """store.py ``put``: False when not kept (another version than ``expect``, or too large);
        ``within``: that store (a background run's, ``Background.queue``), not the current one."""
        return await (within or self.store).put(response_id, items, response, owner=owner, expect=expect)

    async def renew(self, response_id: str, response: dict, *, owner: str = owners.SHARED,
                    expect: int, ended: bool = False, within: Store | None = None) -> Renewal | None:
        """store.py ``renew``: None when there is no such entry (deleted, expired, another owner's);
        ``within``: that store (a background run's own: the one it was queued in)."""
        return await (within or self.store).renew(response_id, response, owner=owner, expect=expect, ended=ended)

    async def delete(self, response_id: str, *, owner: str = owners.SHARED) -> bool:
        """store.py ``delete``: whether there was such an entry to delete."""
        return await self.store.delete(response_id, owner=owner)

    def put(self, response_id: str, items: list, final: dict, *, owner: str) -> None:
        self.writes.start(f"response {response_id} not stored", self._put(response_id, items, final, owner))

    async def _put(self, response_id: str, items: list, final: dict, owner: str) -> None:
        """A turn's response stored after its client had it whole (not a background one's: that
        one's client hears what was stored, addons/background.py). Refused (larger than the store
        keeps), it is not kept: its client keeps its answer, a GET of it is the 404 of a response
        the store does not hold, a continuation ``previous_response_not_found``; the log says why."""
        if not await self.store.put(response_id, items, final, owner=owner) and self.s["max_sessions"] > 0 \
                and self.s["session_ttl_hours"] > 0:
            log.warning(f"resp2chat: response {response_id} not stored: the response store refused it (larger than "
                        "it keeps, max_session_memory_mb): a GET of it is a 404, "
                        "previous_response_id on it a 400 previous_response_not_found")

    def finished(self, done) -> None:
        turn = done.turn
        if done.status in STORED and turn.store and not turn.background and (
                done.status != "failed" or done.final is not None and (turn.client_stream or done.flow.websocket)):
            # (the final's id: a replayed answer keeps its own; a background response is stored by
            # addons/background.py, as it ended. A failed one as OpenAI keeps it, when its client saw its id:
            # a stream's, a socket's; a JSON answer's failure is an error body alone, whose response none can ask for)
            self.put(done.final["id"], turn.items + done.final["output"], done.final, owner=turn.owner)
        if done.status in CONTINUABLE and turn.conversation is not None and not done.landed:  # its new items join
            # it, in one write (a turn the relay ran wrote them before its end: Turns.land; an answer from
            # --server-replay did not)
            added = turn.items[turn.continued:] + done.final["output"]
            self.writes.start(f"conversation {shown(turn.conversation)} not updated",
                              self.append(turn.conversation, added, turn.owner))

    async def append(self, conversation_id: str, items: list, owner: str, check=None) -> list:
        """Items join a conversation, in one write; returns them with their ids (the ones they
        lack, made here). Each must be one its items path can name (``conversations.addressable``,
        whoever writes: a turn's, a replayed answer's, ``…/items``), and ``check(items, held)`` may
        refuse them against the items the conversation holds (raises). ``rewrite``'s errors."""
        items = listing.with_ids(items, new_item_id)
        conversations.addressable(items)  # (before anything is read: a replayed answer's output was never checked)

        def joined(held: list, obj: dict):
            if check is not None:
                check(items, held)
            return held + items, obj, items
        return await self.rewrite(conversation_id, owner, joined)

    async def rewrite(self, conversation_id: str, owner: str, change):
        """A conversation changed in one write over the version it was read from (another write
        in between, on any replica: read again, change again, after a random wait that grows
        with each lost race, so that many writers at once spread out and all land). ``change(items,
        object)`` gives ``(items, object, result)``; returns ``result``. ``conversations.not_found``
        when it is gone; a ``GatewayError`` when the store would not keep it (too large), or it
        changed too often meanwhile."""
        tried = None
        for n in range(APPEND_TRIES):
            if n:
                await asyncio.sleep(random.uniform(0, min(APPEND_WAIT_MAX, APPEND_WAIT * 2 ** n)))
            entry = await self.get(conversation_id, owner, "conversation")
            if entry is None:
                raise conversations.not_found(conversation_id)
            if entry["version"] == tried:  # (not another write: the store would not keep it)
                raise GatewayError(f"conversation {shown(conversation_id)!r} would be larger than the store keeps "
                                   "(max_session_memory_mb)", param="items", code="conversation_too_large",
                                   status=413)
            items, obj, result = change(entry["items"], entry["response"])
            if await self.store.put(conversation_id, items, obj, owner=owner, expect=entry["version"]):
                return result
            tried = entry["version"]
        raise GatewayError(f"conversation {shown(conversation_id)!r} changed too often to be written: try again",
                           code="conversation_busy", status=409)

    # --- GET/DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items ----------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        path = flow.request.path.split("?", 1)[0]
        found = G.endpoint(path)  # (the gate let only its methods through)
        if found is None or found[0] != "responses" or found[1] not in ("/{id}", "/{id}/input_items", "/{id}/cancel"):
            return
        (response_id,), method = G.path_ids(path), flow.request.method
        owner = self.upstreams.owner_of(flow)
        if found[1] == "/{id}/cancel":
            return await self._cancel(flow, response_id, owner)
        if method == "GET" and found[1] == "/{id}" and flow.request.query.get("stream") in ("true", "1"):
            return await self.background.resume(flow, response_id, owner)
        with refused_on_failure(flow, f"{method} {path}"):
            page = listing.page_query(flow.request.query) if found[1] == "/{id}/input_items" else None
            include = listing.include_query(flow.request.query) if found[1] == "/{id}" and method == "GET" else None
            entry = await self.get(response_id, owner)
            if entry is not None and method == "DELETE":
                await self.store.delete(response_id, owner=owner)
                self.background.deleted(response_id, owner)  # (a background run here stops)
        if flow.response is not None:
            return
        if entry is None:  # (a conversation's id is no response's: ``get``'s kind)
            flow.response = refusal(flow, B.not_found(response_id))
        elif page is not None:
            flow.response = self.input_items(flow, entry, page, self.sealer)
        elif method == "GET":
            response = await self.seen(response_id, entry, owner)
            output = [listing.as_listed(item, include, self.sealer) for item in response.get("output") or ()]
            flow.response = json_response(200, {**response, "output": output})
        else:
            flow.response = json_response(200, {"id": response_id, "object": "response", "deleted": True})

    async def seen(self, response_id: str, entry: dict, owner: str) -> dict:
        """A stored Response as a client sees it: a background one whose gateway died is
        ``failed`` (and stored so, over what was read, as a renewal that ends it: its output so far
        indexed, its conversation not written again), never ``in_progress`` forever."""
        response = entry["response"]
        if B.is_dead(response, time.time()):
            response = B.dead(response)
            self.writes.start(f"response {response_id} not stored", self.store.renew(
                response_id, response, owner=owner, expect=entry["version"], ended=True))
        return B.public(response)

    async def _cancel(self, flow: http.HTTPFlow, response_id: str, owner: str) -> None:
        with refused_on_failure(flow, f"POST /v1/responses/{response_id}/cancel"):
            flow.response = json_response(200, await self.background.cancel(response_id, owner))

    @staticmethod
    def input_items(flow: http.HTTPFlow, entry: dict, page: listing.Page, sealer) -> http.Response:
        """A stored response's input items (its whole conversation before its output), a page of
        them (listing.py); ids the items lack are given from the response's id."""
        items, response = entry["items"], entry["response"]
        items = items[:input_count(items, response)]
        try:
            return json_response(200, listing.page(listing.listed_ids(items, response["id"].removeprefix("resp_")),
                                                   page, sealer))
        except GatewayError as err:
            return refusal(flow, err)
