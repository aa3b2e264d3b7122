"""The replay cache: an identical request is answered at once, without the backend.

Owns ``max_replay_entries`` (0: off) and ``resp2chat_replay_preload`` (fill it from a flow file).
What an entry and its key are is resp2chat_core/replay.py (the key: ``Turns.replay_key``); the
entries live in this process (store.py ``ReplayEntries``) or, with ``state_store_url``, in Redis,
shared by every replica (redis_state.py ``RedisReplayCache``): one asynchronous interface
(store.py ``Replays``), made by the store addon when ``state_store_url`` changes
(``StoredResponses.replay_cache``; nothing here asks which). A lookup Redis cannot answer is a
miss, a write it cannot take is dropped (a warning). The HTTP
transport (http_turns.py) asks ``get`` before a request is lowered and answers a hit;
completed turns come in as a ``finished`` listener.

An answer is served only to its owner (``Upstreams.owner_of``: the key covers it): with
``forward_client_auth`` a request with another credential, or none, is the backend's to judge,
never a hit. Preloaded answers belong to the single-key owner; an answer holding what another
seal key sealed (a recording of another install) is not preloaded.
"""

from __future__ import annotations

import json
import re

from mitmproxy import ctx, exceptions, http

from resp2chat_core import compaction, mcp, owner as owners
from resp2chat_core.inputs import REASONING_PURPOSE
from resp2chat_core.replay import opens_here, pack
from resp2chat_io import flowfile
from resp2chat_io.store import Replays

from .base import META, Owner, fails_closed, log


@fails_closed
class ReplayCache(Owner):
    name = "resp2chat_replay"
    owner = "replay"
    also_reads = ("state_store_url",)  # (the store addon makes the cache where it says)

    def __init__(self, source, upstreams, turns, store) -> None:
        super().__init__(source)
        self.upstreams, self.turns, self.store = upstreams, turns, store
        self._running = False

    def load(self, loader) -> None:
        super().load(loader)
        loader.add_option("resp2chat_replay_preload", str, "",
                          "Flow file whose completed resp2chat turns preload the replay cache.")

    def configure(self, updated: set[str]) -> None:
        super().configure(updated)
        if "resp2chat_replay_preload" in updated and ctx.options.resp2chat_replay_preload and self._running:
            self._preload(ctx.options.resp2chat_replay_preload)

    def running(self) -> None:
        # (at start, once every addon is configured: the keys need the lowering settings)
        self._running = True
        if ctx.options.resp2chat_replay_preload:
            try:
                self._preload(ctx.options.resp2chat_replay_preload)
            except exceptions.OptionsError as exc:  # (start-up stops on it, saying why: no traceback)
                log.error(str(exc))

    def apply(self, updated: set[str]) -> None:
        self.cache.resize(self.s["max_replay_entries"])  # (after the store addon's configure: a new one too)

    @property
    def cache(self) -> Replays:
        return self.store.replay_cache

    @property
    def enabled(self) -> bool:
        return self.cache.capacity > 0

    async def get(self, key: str) -> bytes | None:
        return await self.cache.get(key)

    def finished(self, done) -> None:
        key = done.flow.metadata[META].get("replay_key")
        # (a turn with hosted MCP tools ran them: answering it again without running them would
        # skip their effects, and an approval would never be asked again)
        if done.status == "completed" and key and done.answer and done.turn.mcp is None:
            t = done.turn
            entry = pack(t.ctx.response_id, t.ctx.created_at, done.answer, stream=t.client_stream, store=t.store)
            self.store.writes.start("replay cache entry not kept", self.cache.put(key, entry))

    def _preload(self, path: str) -> None:
        try:
            flows, cut = flowfile.read(path)
        except (OSError, exceptions.FlowReadException) as exc:
            raise exceptions.OptionsError(f"resp2chat_replay_preload: cannot read {path}: {exc}") from None
        if cut is not None:  # (a recording cut short: its whole flows are as good as ever)
            log.warning(f"resp2chat: replay cache preload: {cut}")
        loaded = unread = 0
        for f in flows:
            meta = f.metadata.get(META) if isinstance(f, http.HTTPFlow) else None
            if not isinstance(meta, dict) or meta.get("status") != "completed" or not f.response:
                unread += meta is not None and not isinstance(meta, dict)
                continue
            # (its own times, as response.py writes them: an SSE answer's compact JSON, a JSON body's)
            created = re.search(rb'"created_at": ?(\d+)', f.response.content or b"")
            try:
                request = json.loads(meta["responses_request"]) if created and meta.get("response_id") else {}
            except (ValueError, TypeError):  # (a record no gateway wrote: edited)
                request = None
            if not isinstance(request, dict) or not isinstance(meta.get("response_id", ""), str):
                unread += 1
                continue
            # (as ``finished`` keeps no MCP turn; an answer sealed under another key is not this gateway's)
            if request and not mcp.mcp_tools(request.get("tools")) and opens_here(
                    f.response.content, self.turns.sealer.unseal, (REASONING_PURPOSE, compaction.PURPOSE)):
                upstream = meta.get("upstream", "")
                key = self.turns.replay_key(
                    self.upstreams.cache_context(f, None if self.upstreams.specs else
                                                 upstream if isinstance(upstream, str) else ""),
                    meta["responses_request"].encode(), owners.SHARED)
                entry = pack(meta["response_id"], int(created[1]), f.response.content,
                             stream=request.get("stream") is True, store=request.get("store") is not False)
                self.store.writes.start("replay cache entry not preloaded", self.cache.put(key, entry))
                loaded += 1  # (in Redis: as the loop runs; counted as kept)
        if unread:
            log.warning(f"resp2chat: replay cache preload: {unread} turns of {path} left out: their record is not "
                        "what the gateway writes (edited?)")
        log.info(f"resp2chat: replay cache preloaded with {loaded} answers from {path}")
