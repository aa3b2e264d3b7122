"""Limits: each client's ``rpm``, ``tpm`` and ``max_streams``, across replicas.

The rule is resp2chat_core/limits.py (token buckets, as OpenAI's; turns open at once). Where the
state lives:

- ``state_store_url`` set: in Redis, shared by every replica, each decision one Lua script
  (atomic: two replicas cannot both take the last token). ``resp2chat:limits:{client}`` is a
  hash of the two buckets' levels and times (Redis's clock); ``…:streams`` a sorted set of the
  client's open turns, scored by their last heartbeat: a replica refreshes its open turns every
  ``HEARTBEAT`` seconds, so the turns of a replica that died stop counting after ``LEASE``.
  Redis down: the decision falls back to this replica's own state (plain turns go on, as
  everywhere else; the log says Redis is down).
- otherwise: in this process.

``admit`` is asked once per turn before anything else is done for it (``Turns.admit``: HTTP and
the WebSocket alike, reads never); a turn it admitted is released when it ends (its backend
tokens spent from the token bucket), however it ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from resp2chat_core import limits as L
from resp2chat_core.clients import ClientSpec
from resp2chat_io.redis_state import PREFIX
from resp2chat_io.store import StateUnavailable

from .base import log

HEARTBEAT = 20.0  # seconds between two refreshes of this replica's open turns in Redis
LEASE = 90.0  # seconds after its last refresh an open turn stops counting (its replica is gone)

_ADMIT = """
local prefix, client = ARGV[1], ARGV[2]
local rpm, tpm, maxs = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local turn, lease = ARGV[6], tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = prefix .. 'limits:' .. client
local function level(lf, tf, cap)
  local v = redis.call('HMGET', key, lf, tf)
  local l, at = tonumber(v[1]), tonumber(v[2])
  if l == nil or at == nil then return cap end
  l = l + math.max(0, now - at) * cap / 60
  if l > cap then l = cap end
  return l
end
local rl, tl = -1, -1
if rpm > 0 then rl = level('r', 'rt', rpm) end
if tpm > 0 then tl = level('t', 'tt', tpm) end
local streams = key .. ':streams'
local open = 0
if maxs > 0 then
  redis.call('ZREMRANGEBYSCORE', streams, '-inf', now - lease)
  open = redis.call('ZCARD', streams)
end
local why = ''
if rpm > 0 and rl < 1 then why = 'requests'
elseif tpm > 0 and tl <= 0 then why = 'tokens'
elseif maxs > 0 and open >= maxs then why = 'streams' end
if why == '' then
  if rpm > 0 then rl = rl - 1 end
  if maxs > 0 then
    redis.call('ZADD', streams, now, turn)
    redis.call('EXPIRE', streams, math.ceil(lease * 2))
  end
end
if rpm > 0 then redis.call('HSET', key, 'r', tostring(rl), 'rt', tostring(now)) end
if tpm > 0 then redis.call('HSET', key, 't', tostring(tl), 'tt', tostring(now)) end
redis.call('EXPIRE', key, 3600)
return {why, tostring(rl), tostring(tl), tostring(now), open}
"""

_END = """
local prefix, client, turn = ARGV[1], ARGV[2], ARGV[3]
local tpm, used = tonumber(ARGV[4]), tonumber(ARGV[5])
local key = prefix .. 'limits:' .. client
redis.call('ZREM', key .. ':streams', turn)
if tpm > 0 and used > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local v = redis.call('HMGET', key, 't', 'tt')
  local l, at = tonumber(v[1]), tonumber(v[2])
  if l == nil or at == nil then l = tpm else
    l = l + math.max(0, now - at) * tpm / 60
    if l > tpm then l = tpm end
  end
  redis.call('HSET', key, 't', tostring(l - used), 'tt', tostring(now))
  redis.call('EXPIRE', key, 3600)
end
return 1
"""

_HEARTBEAT = """
local key, now_ignored = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do redis.call('ZADD', key, 'XX', now, ARGV[i]) end
return 1
"""


@dataclass
class _Local:
    """One client's state in this process."""

    requests: L.Bucket | None = None
    tokens: L.Bucket | None = None
    open: set = field(default_factory=set)


def _limited(client: ClientSpec | None) -> bool:
    return client is not None and (client.rpm is not None or client.tpm is not None or client.max_streams is not None)


class Limits:
    name = "resp2chat_limits"

    def __init__(self, store) -> None:
        self.store = store  # (store.state: Redis, when state_store_url is set)
        self._local: dict[str, _Local] = {}
        # turn id -> (client name, where: "redis" | "local", counted among its open turns: max_streams)
        self._open: dict[str, tuple[str, str, bool]] = {}
        self._beat: asyncio.Task | None = None

    def running(self) -> None:
        if self._beat is None:
            self._beat = asyncio.ensure_future(self._heartbeat())

    def done(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    # --- a turn ------------------------------------------------------------------------------

    async def admit(self, client: ClientSpec | None, turn_id: str) -> L.Verdict | None:
        """Whether ``client`` may start a turn now (None: it has no limits). An admitted turn
        counts as open until ``release``."""
        if not _limited(client):
            return None
        state = self.store.state
        if state is not None:
            try:
                verdict = await self._admit_redis(state, client, turn_id)
                if verdict.admitted:
                    self._open[turn_id] = (client.name, "redis", client.max_streams is not None)
                return verdict
            except StateUnavailable:
                pass  # (logged by RedisState) this replica decides alone until Redis is back
        verdict = self._admit_local(client, turn_id, time.monotonic())
        if verdict.admitted:
            self._open[turn_id] = (client.name, "local", client.max_streams is not None)
        return verdict

    def release(self, client: ClientSpec | None, turn_id: str, used: int = 0) -> None:
        """A turn ``admit`` admitted is over: it no longer counts as open, and its backend
        tokens (``used``) are taken from the client's token bucket."""
        name, where, streamed = self._open.pop(turn_id, (None, None, False))
        if name is None:
            return
        tpm = client.tpm if client is not None and client.name == name else None
        if where == "local":
            local = self._local.setdefault(name, _Local())
            local.open.discard(turn_id)
            if tpm is not None and used > 0:
                local.tokens = local.tokens or L.Bucket.full(tpm, time.monotonic())
                local.tokens.capacity = tpm
                L.spend(time.monotonic(), local.tokens, used)
            return
        state = self.store.state
        if state is None or not (streamed or (tpm is not None and used > 0)):
            return  # (nothing to count in Redis: no Redis round trip)
        script = state.script_from(_END)
        self.store.writes.start(f"the end of turn {turn_id} not counted for client {name!r}", state.call(
            "count a turn's end", lambda c: script(args=[PREFIX, name, turn_id, tpm or 0, used])))

    def finished(self, done) -> None:
        """A turns.py ``finished`` listener: the turn leaves its client's open turns, its backend
        tokens are spent."""
        u = done.usage or {}
        used = (u.get("input_tokens") or 0) + (u.get("output_tokens") or 0)
        self.release(done.client, done.turn_id, used if isinstance(used, int) else 0)

    # --- where the state lives -------------------------------------------------------------------

    def _admit_local(self, client: ClientSpec, turn_id: str, now: float) -> L.Verdict:
        local = self._local.setdefault(client.name, _Local())
        if client.rpm is not None:
            local.requests = local.requests or L.Bucket.full(client.rpm, now)
            local.requests.capacity = client.rpm  # (a reloaded limit applies at once)
        if client.tpm is not None:
            local.tokens = local.tokens or L.Bucket.full(client.tpm, now)
            local.tokens.capacity = client.tpm
        verdict = L.decide(now, client.rpm, local.requests if client.rpm is not None else None, client.tpm,
                           local.tokens if client.tpm is not None else None, len(local.open), client.max_streams)
        if verdict.admitted and client.max_streams is not None:
            local.open.add(turn_id)
        return verdict

    async def _admit_redis(self, state, client: ClientSpec, turn_id: str) -> L.Verdict:
        script = state.script_from(_ADMIT)
        why, rl, tl, now, _open = await state.call("check a client's limits", lambda c: script(args=[
            PREFIX, client.name, client.rpm or 0, client.tpm or 0, client.max_streams or 0, turn_id, LEASE]))
        now = float(now)
        requests = L.Bucket(client.rpm, float(rl), now) if client.rpm is not None else None
        tokens = L.Bucket(client.tpm, float(tl), now) if client.tpm is not None else None
        why = why.decode() if isinstance(why, bytes) else why
        return L.verdict(why, client.rpm, requests, client.tpm, tokens)

    async def _heartbeat(self) -> None:
        """Keep this replica's open turns in Redis alive (their lease), so only a dead replica's
        stop counting."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            state = self.store.state
            if state is None:
                continue
            by_client: dict[str, list[str]] = {}
            for turn_id, (name, where, streamed) in list(self._open.items()):
                if where == "redis" and streamed:
                    by_client.setdefault(name, []).append(turn_id)
            script = state.script_from(_HEARTBEAT)
            for name, turns in by_client.items():
                key = f"{PREFIX}limits:{name}:streams"
                try:
                    await state.call("refresh open turns", lambda c, key=key, turns=turns: script(keys=[key],
                                                                                                  args=[0, *turns]))
                except StateUnavailable:
                    break
                except Exception as exc:  # noqa: BLE001 — a heartbeat must not die
                    log.warning(f"resp2chat: refreshing open turns failed: {type(exc).__name__}: {exc}")
