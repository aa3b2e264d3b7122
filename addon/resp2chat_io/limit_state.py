"""Where the clients' limits are counted: this process, or Redis for every replica. One interface.

The rule is resp2chat_core/limits.py (token buckets, as OpenAI's; turns open at once); the
limits addon (addons/limits.py) asks it through ``LimitState``, whichever holds the state. The
store addon picks one when ``state_store_url`` changes (addons/store.py ``limit_state``):

- ``LocalLimits``: in this process.
- ``RedisLimits``: in Redis, shared by every replica, each decision one Lua script (atomic: two
  replicas cannot both take the last token). ``resp2chat:limits:{identity}`` (the client's
  ``ClientSpec.identity``: a name revoked and added again starts afresh, a rotated key does
  not) is a hash of the two
  buckets' levels and times (Redis's clock), kept an hour after the client's last request, or
  until a debt of tokens has refilled if that is later (an expired key is full buckets); ``…:streams`` a sorted set of the client's open
  turns, scored by their last heartbeat: a replica refreshes its open turns every ``HEARTBEAT``
  seconds (and the set's expiry with them: a turn outlives the admission that set it), so the
  turns of a replica that died stop counting after ``LEASE``. Redis down
  (``StateUnavailable``): the decision falls back to this replica's own state, a
  ``LocalLimits`` (plain turns go on, as everywhere else; the log says Redis is down), until
  Redis answers again.

``admit`` gives each admitted turn a ``Ticket``: where it was admitted, and so where it is
released (``Ticket.release``: it leaves its client's open turns, its backend tokens are spent),
whatever Redis did in between: a turn the fallback admitted is released here, one Redis admitted
is released in Redis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from resp2chat_core import limits as L
from resp2chat_core.clients import ClientSpec
from resp2chat_io.redis_state import KEY_ROOT, RedisState
from resp2chat_io.store import StateUnavailable, Writes

log = logging.getLogger("resp2chat")

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
local ttl = 3600  -- (past a debt's refill: a turn may spend many minutes of tpm, and an expired key is full)
if tpm > 0 then
  redis.call('HSET', key, 't', tostring(tl), 'tt', tostring(now))
  ttl = math.max(ttl, math.ceil((tpm - tl) * 60 / tpm) + 60)
end
redis.call('EXPIRE', key, ttl)
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
  redis.call('EXPIRE', key, math.max(3600, math.ceil((tpm - l + used) * 60 / tpm) + 60))
end
return 1
"""

_HEARTBEAT = """
local key, lease = KEYS[1], tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do redis.call('ZADD', key, 'XX', now, ARGV[i]) end
redis.call('EXPIRE', key, math.ceil(lease * 2))  -- (none: nothing is made)
return 1
"""


@dataclass(eq=False)
class Ticket:
    """A turn ``admit`` admitted, and the state that admitted it (``home``): it is released
    there."""

    client: str  # the client's name (what a log line says)
    key: str  # what its counts are kept under: the client's identity (``ClientSpec.identity``)
    turn_id: str
    streamed: bool  # counted among its client's open turns (it has max_streams)
    home: "LocalLimits | RedisLimits"

    def release(self, tpm: int | None, used: int) -> None:
        """The turn is over: it no longer counts as open, and its backend tokens (``used``) are
        taken from its client's token bucket (``tpm``: the client's limit now; None: none)."""
        self.home.release(self, tpm, used)


class LimitState(Protocol):
    """Where the clients' limits are counted (asynchronous; never raises ``StateUnavailable``)."""

    async def admit(self, client: ClientSpec, turn_id: str) -> tuple[L.Verdict, Ticket | None]:
        """Whether ``client`` (it has limits) may start a turn now, and, admitted, its ticket."""
        ...

    async def refresh(self, tickets: Iterable[Ticket]) -> None:
        """Keep this replica's open turns among ``tickets`` alive where their lease runs out (a
        heartbeat, every ``HEARTBEAT`` seconds)."""
        ...


@dataclass
class _Client:
    """One client's state in this process."""

    requests: L.Bucket | None = None
    tokens: L.Bucket | None = None
    open: set = field(default_factory=set)


class LocalLimits:
    """The limits counted in this process: ``LimitState``."""

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}

    async def admit(self, client: ClientSpec, turn_id: str) -> tuple[L.Verdict, Ticket | None]:
        now = time.monotonic()
        local = self._clients.setdefault(client.identity, _Client())
        if client.rpm is not None:
            local.requests = local.requests or L.Bucket.full(client.rpm, now)
            local.requests.capacity = client.rpm  # (a reloaded limit applies at once)
        if client.tpm is not None:
            local.tokens = local.tokens or L.Bucket.full(client.tpm, now)
            local.tokens.capacity = client.tpm
        verdict = L.decide(now, client.rpm, local.requests if client.rpm is not None else None, client.tpm,
                           local.tokens if client.tpm is not None else None, len(local.open), client.max_streams)
        if not verdict.admitted:
            return verdict, None
        if client.max_streams is not None:
            local.open.add(turn_id)
        return verdict, Ticket(client.name, client.identity, turn_id, client.max_streams is not None, self)

    def release(self, ticket: Ticket, tpm: int | None, used: int) -> None:
        local = self._clients.setdefault(ticket.key, _Client())
        local.open.discard(ticket.turn_id)
        if tpm is not None and used > 0:
            local.tokens = local.tokens or L.Bucket.full(tpm, time.monotonic())
            local.tokens.capacity = tpm
            L.spend(time.monotonic(), local.tokens, used)

    async def refresh(self, tickets: Iterable[Ticket]) -> None:
        pass  # (nothing here runs out)


class RedisLimits:
    """The limits counted in Redis for every replica, this replica's ``local`` while Redis is
    down: ``LimitState``. A turn's end is counted as one of ``writes`` (never waited for)."""

    def __init__(self, state: RedisState, local: LocalLimits, writes: Writes) -> None:
        self.state, self.local, self.writes = state, local, writes

    async def admit(self, client: ClientSpec, turn_id: str) -> tuple[L.Verdict, Ticket | None]:
        script = self.state.script_from(_ADMIT)
        try:
            why, rl, tl, now, _open = await self.state.call("check a client's limits", lambda c: script(args=[
                KEY_ROOT, client.identity, client.rpm or 0, client.tpm or 0, client.max_streams or 0, turn_id, LEASE]))
        except StateUnavailable:  # (logged by RedisState) this replica decides alone until Redis is back
            return await self.local.admit(client, turn_id)
        now = float(now)
        requests = L.Bucket(client.rpm, float(rl), now) if client.rpm is not None else None
        tokens = L.Bucket(client.tpm, float(tl), now) if client.tpm is not None else None
        why = why.decode() if isinstance(why, bytes) else why
        verdict = L.verdict(why, client.rpm, requests, client.tpm, tokens)
        return verdict, (Ticket(client.name, client.identity, turn_id, client.max_streams is not None, self)
                         if verdict.admitted else None)

    def release(self, ticket: Ticket, tpm: int | None, used: int) -> None:
        if not (ticket.streamed or (tpm is not None and used > 0)):
            return  # (nothing to count in Redis: no Redis round trip)
        script = self.state.script_from(_END)
        name, key, turn_id = ticket.client, ticket.key, ticket.turn_id
        self.writes.start(f"the end of turn {turn_id} not counted for client {name!r}", self.state.call(
            "count a turn's end", lambda c: script(args=[KEY_ROOT, key, turn_id, tpm or 0, used])))

    async def refresh(self, tickets: Iterable[Ticket]) -> None:
        by_client: dict[str, list[str]] = {}
        for ticket in tickets:
            if ticket.home is self and ticket.streamed:
                by_client.setdefault(ticket.key, []).append(ticket.turn_id)
        script = self.state.script_from(_HEARTBEAT)
        for who, turns in by_client.items():
            key = f"{KEY_ROOT}limits:{who}:streams"
            try:
                await self.state.call("refresh open turns", lambda c, key=key, turns=turns: script(keys=[key],
                                                                                              args=[LEASE, *turns]))
            except StateUnavailable:
                break
            except Exception as exc:  # noqa: BLE001 — a heartbeat must not die
                log.warning(f"resp2chat: refreshing open turns failed: {type(exc).__name__}: {exc}")
