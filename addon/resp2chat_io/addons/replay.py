"""The replay cache: an identical request is answered at once, without the backend.

Owns ``max_replay_entries`` (0: off) and ``resp2chat_replay_preload`` (fill it from a flow file).
The cache itself (key, entries, fresh ids) is resp2chat_core/replay.py. ``request`` answers hits
before turns.py lowers anything; completed turns come in as a ``finished`` listener. With
``state_store_url`` the entries live in Redis, shared by every replica (redis_state.py): a lookup
Redis cannot answer is a miss, a write it cannot take is dropped.

An answer is served only to its owner (``Upstreams.owner_of``: the key covers it): with
``forward_client_auth`` a request with another credential, or none, is the backend's to judge,
never a hit. Preloaded answers belong to the single-key owner.
"""

from __future__ import annotations

import json
import os
import re
import time

from mitmproxy import ctx, exceptions, http

from resp2chat_core import owner as owners
from resp2chat_core.errors import GatewayError
from resp2chat_core.replay import ReplayCache as Cache, entry_flags, pack, replay_key, unpack_fresh
from resp2chat_core.websocket import final_response
from resp2chat_io import offload
from resp2chat_io.redis_state import RedisReplayCache

from .base import META, RESPONSES_PATHS, Owner, fails_closed, log, request_id
from .turns import new_response_id, note_request


@fails_closed
class ReplayCache(Owner):
    name = "resp2chat_replay"
    owner = "replay"
    also_reads = ("state_store_url",)  # (the store addon makes the Redis connection)

    def __init__(self, source, upstreams, turns, store) -> None:
        super().__init__(source)
        self.upstreams, self.turns, self.store = upstreams, turns, store
        self.cache: Cache | RedisReplayCache = Cache(0)

    def load(self, loader) -> None:
        super().load(loader)
        loader.add_option("resp2chat_replay_preload", str, "",
                          "Flow file whose completed resp2chat turns preload the replay cache.")

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        if "resp2chat_replay_preload" in updated and ctx.options.resp2chat_replay_preload:
            self._preload(ctx.options.resp2chat_replay_preload)

    def apply(self, updated: set[str]) -> None:
        state = self.store.state
        if state is not None and getattr(self.cache, "state", None) is not state:
            self.cache = RedisReplayCache(state, self.s["max_replay_entries"])
        elif state is None and isinstance(self.cache, RedisReplayCache):
            self.cache = Cache(self.s["max_replay_entries"])
        self.cache.resize(self.s["max_replay_entries"])

    def key(self, upstream_url: str, body: bytes, owner: str) -> str:
        # the same request with other settings, another upstream or another seal key (an answer
        # holds what it sealed: after a key change, or on a replica with another key, the client
        # could not send it back), or from another owner: another answer
        return replay_key(f"{upstream_url}\n{self.turns.lowering_repr}\nseal {self.turns.seal_id()}", body, owner)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response" or self.cache.capacity <= 0:
            return
        if flow.request.method != "POST" or flow.request.path.split("?", 1)[0] not in RESPONSES_PATHS:
            return
        if getattr(ctx.options, "server_replay", None):
            return  # server replay answers after this hook and would overwrite a cache answer
        body = flow.request.get_content(strict=False) or b""
        owner = self.upstreams.owner_of(flow)
        key = self.key(self.upstreams.cache_context(flow), body, owner)
        flow.metadata.setdefault(META, {})["replay_key"] = key
        entry = await self.cache.get(key) if isinstance(self.cache, RedisReplayCache) else self.cache.get(key)
        if entry is None:
            return
        stream, store = entry_flags(entry)
        response_id, created_at = new_response_id(), int(time.time())
        turn = None
        try:
            raw = await offload.loads(body)  # (for its model in the metrics; a large one off the loop)
            if store:  # a hit whose response must be stored (previous_response_id works after hits)
                turn = self.turns.parse(raw, response_id, created_at, owner)
        except GatewayError:
            return  # not answerable any more (e.g. its previous response expired): turns.py says why
        answer = unpack_fresh(entry, response_id, created_at)
        ctype = "text/event-stream; charset=utf-8" if stream else "application/json"
        flow.response = http.Response.make(200, answer, {"content-type": ctype, "cache-control": "no-cache",
                                                         "x-request-id": request_id(flow)})
        flow.metadata[META].update(replay_cache="hit", response_id=response_id, status="completed")
        note_request(flow.metadata[META], body, raw)
        flow.comment = f"replay cache hit · {response_id}"
        if turn is not None:
            final = final_response(answer) if stream else json.loads(answer)
            self.store.put(response_id, turn.items + final["output"], final, owner=owner)

    def finished(self, done) -> None:
        key = done.flow.metadata[META].get("replay_key")
        if done.status == "completed" and key and done.answer:
            t = done.turn
            entry = pack(t.ctx.response_id, t.ctx.created_at, done.answer, stream=t.client_stream, store=t.store)
            self._put(key, entry, "replay cache entry not kept")

    def _put(self, key: str, entry: bytes, lost: str) -> bool:
        """Keep an entry: in memory at once; in Redis as a write task (a failure is a warning
        naming what was ``lost``), counted as kept."""
        if isinstance(self.cache, RedisReplayCache):
            self.cache.state.write(lost, self.cache.put(key, entry))
            return True
        return self.cache.put(key, entry)

    async def done(self) -> None:
        if isinstance(self.cache, RedisReplayCache):
            await self.cache.state.flush()  # (the store's done closes the connection after them)

    def _preload(self, path: str) -> None:
        from mitmproxy import io

        try:
            with open(os.path.expanduser(path), "rb") as fh:
                flows = list(io.FlowReader(fh).stream())
        except (OSError, exceptions.FlowReadException) as exc:
            raise exceptions.OptionsError(f"resp2chat_replay_preload: cannot read {path}: {exc}") from None
        loaded = 0
        for f in flows:
            meta = f.metadata.get(META) or {}
            if isinstance(f, http.HTTPFlow) and meta.get("status") == "completed" and f.response:
                created = re.search(rb'"created_at":(\d+)', f.response.content or b"")
                if created and meta.get("response_id"):
                    request = json.loads(meta["responses_request"])
                    key = self.key(self.upstreams.cache_context(f) if self.upstreams.specs else meta.get("upstream", ""),
                                   meta["responses_request"].encode(), owners.SHARED)
                    entry = pack(meta["response_id"], int(created[1]), f.response.content,
                                 stream=request.get("stream") is True, store=request.get("store") is not False)
                    loaded += self._put(key, entry, "replay cache entry not preloaded")  # (Redis: as the loop runs)
        log.info(f"resp2chat: replay cache preloaded with {loaded} answers from {path}")
