"""Shared state in Redis (or Valkey): stored responses and the replay cache, for replicas.

With ``state_store_url`` set, every gateway replica keeps what ``previous_response_id`` (and
item references) continue from, and the replay cache, in one Redis through the ``redis`` client
library (``redis.asyncio`` on mitmproxy's event loop), so any replica continues any
conversation.

Keys (``resp2chat:`` prefix; one Redis database per gateway fleet, chosen by the URL's ``/db``).
What a client stores lives under its owner's namespace ``{ns}`` (resp2chat_core/owner.py): empty
for the one owner of a single-key gateway (the keys as they always were), ``owner:{owner}:``
otherwise, so another owner's id is exactly a key that does not exist:

| key | type | what |
| --- | --- | --- |
| ``resp2chat:{ns}response:{id}`` | hash | ``data``: the entry JSON (items + Response, as store.py keeps it; a conversation's, under its ``conv_…`` id); ``v``: its version (store.py: a write may name the version it replaces); ``s``: its Response's brief (resp2chat_core/background.py ``brief``: status, lease, a cancellation asked; what store.py ``status`` reads), ``sv``: the version it is of; ``items``: the ids of the items it holds (below); ``d:{item_id}``: each one's digest (store.py ``item_digest``); ``in``, ``r``: where its input items end and its Response starts in the JSON (store.py ``encode_entry``). A running background response renewed (``renew``) has its JSON in two fields instead of ``data``: ``head`` (up to ``in``) and ``tail`` (the rest, which a renewal writes). Expires after ``session_ttl_hours`` |
| ``resp2chat:{ns}item:{item_id}`` | string | the id of the newest stored response of that owner holding the item unchanged, for an item the gateway produced (a response's output; never a client's input): item references. Same expiry; when that response goes, the newest other holder (below) takes over with its expiry, none: the key goes |
| ``resp2chat:{ns}holders:{item_id}`` | sorted set | every stored response of that owner holding the item unchanged, by time (store.py: the item lives while one of them does); emptied when the item is produced again otherwise. Same expiry |
| ``resp2chat:{ns}deleted:{id}`` | string | a tombstone: ``DELETE`` removed that entry (store.py ``deleted``: a WebSocket's memory is not continued from it). Expires after ``session_ttl_hours`` |
| ``resp2chat:entries`` | sorted set | ``{ns}{id}`` of every owner's entries by the time they were stored (Redis's clock): what expires first |
| ``resp2chat:entries:sizes`` / ``:bytes`` | hash / integer | each entry's size (by ``{ns}{id}``) and their sum: ``max_session_memory_mb`` |
| ``resp2chat:{ns}owned`` | sorted set | the owner's own entries (``{ns}{id}``) by time: which of its entries is oldest |
| ``resp2chat:owners:count`` / ``:size`` | sorted sets | every owner holding an entry, scored by its entries / its bytes; its member: the time of its oldest entry (``%017.6f``), a bar, its ``{ns}``, so owners holding alike sort oldest first: who loses an entry past a cap |
| ``resp2chat:owners:bytes`` | hash | ``{ns}`` -> the bytes that owner holds |
| ``resp2chat:owners:kinds`` | hash | ``n``, ``b``: the entries and bytes every forwarded credential's owner (``auth-…``) holds together; ``at``: when they were last counted from the owners' shares (Redis's clock; again an hour later) |
| ``resp2chat:responses``, ``:sizes``, ``:bytes`` | | the index of the version before shares (as ``entries``): read only to move its entries in (below) |
| ``resp2chat:replay:{sha256}`` | string | a replay-cache entry (resp2chat_core/replay.py ``pack``), at most 4 MiB; the key's digest covers the owner (replay.py ``replay_key``) |
| ``resp2chat:replays`` | sorted set | replay keys in the order they came: ``max_replay_entries`` (FIFO) |

Bounds: each write runs one Lua script (atomic: a replica killed mid-write leaves either the
whole entry or nothing) that first drops entries past their time, then, until the count
(``max_sessions``) and byte (``max_session_memory_mb``) caps hold again, the oldest entry of the
owner holding the most (resp2chat_core/shares.py: the rule, and ``Shares`` the same in memory;
never the entry being written): one bound over every owner's entries, and one owner's writes
push out its own entries once it holds the most. A write costs O(log n) more than before: a few
sorted-set updates for its owner's place, one or two lookups per eviction. Keys also carry
Redis expiries, so nothing outlives its time even if no replica writes again.

Who fills the store (/metrics, ``RedisResponseStore.figures``): one MULTI of O(1) reads per
scrape (the index's count and bytes, ``owners:kinds``, and each configured client's and the
shared owner's ``owned`` count and ``owners:bytes`` field): O(clients), whatever the entries and
owners. The script keeps ``owners:kinds`` as each entry is counted; it counts it again from the
owners' shares (O(owners)) on the first write after an upgrade and then hourly.

Upgrade: entries the version before wrote (indexed in ``resp2chat:responses``, with no shares)
stay readable as they are (their hashes did not change); each write moves up to 64 of them,
oldest first, into ``entries`` and their owners' shares, and trims those not moved in yet first
when over a cap (as that version did). A replica of that version still running meanwhile writes
there and is moved in the same way; its deletes leave only a count that the next eviction or
expiry drops. An entry a renewal split into ``head`` and ``tail`` has no ``data``: a replica of a
version before renewals reads it as unknown until the run's end writes it whole again; one it
wrote (no ``in``) is renewed by a whole ``put``. An entry written before versions (no ``v``) is
version 1 to every read (``get``, ``status``) and write (``put``, ``renew``).

Redis unreachable: ``StateUnavailable`` is raised for what needs it (the addons answer 503 for
``previous_response_id`` and ``GET /v1/responses/{id}``; plain turns go on: a replay lookup is a
miss, a response that cannot be stored is logged). After a failure, calls fail at once for a
short back-off instead of waiting on a dead server each time; the next call after it tries
again, so recovery is automatic when Redis returns. Redis reachable but refusing a command (an
error reply: ``OOM`` past ``maxmemory``, ``READONLY`` on a replica, ``NOPERM`` from an ACL) is
``StateUnavailable`` too, without the back-off. Writes run as store.py's ``Writes`` (never
raising: a write that fails is a warning; the store addon waits for them before ``close``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import urlsplit

from resp2chat_core import owner as owners
from resp2chat_core.background import brief
from resp2chat_io.store import (Figures, Renewal, ReplayCounts, StateUnavailable, encode_entry, entry_tail, held_items,
                                input_count, item_digest, output_items, pick, valid_id, valid_item_id)

log = logging.getLogger("resp2chat")

KEY_ROOT = "resp2chat:"
CONNECT_TIMEOUT = 1.0  # seconds: Redis is expected close by
IO_TIMEOUT = 3.0
BACKOFF = (0.5, 5.0)  # seconds without calls after a failure: first, and at most (doubling)


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    where = parts.hostname or parts.path
    return f"{parts.scheme}://{where}" + (f":{parts.port}" if parts.port else "") + (
        parts.path if parts.hostname and parts.path else "")


# What every script below starts with (``prefix`` is ARGV[1]): an entry's accounting, its owner's
# place among the owners (resp2chat_core/shares.py: the owner holding the most loses its oldest
# entry past a cap), one entry gone, entries of the version before shares moved in.
_DROP = """
local prefix = ARGV[1]
local idx, sizes, total = prefix .. 'entries', prefix .. 'entries:sizes', prefix .. 'entries:bytes'
local legacy, legacy_sizes, legacy_total = prefix .. 'responses', prefix .. 'responses:sizes', prefix .. 'responses:bytes'
local by_count, by_bytes, owner_bytes = prefix .. 'owners:count', prefix .. 'owners:size', prefix .. 'owners:bytes'
local kinds = prefix .. 'owners:kinds'
local old_left = redis.call('EXISTS', legacy) == 1  -- entries of the version before not moved in yet
local kinds_checked = false
local function forwarded(ns) return string.sub(ns, 1, 11) == 'owner:auth-' end
-- the forwarded credentials' owners' entries and bytes together (metrics), counted again from the
-- owners' shares when missing (the version before kept none) or an hour old (a replica of that
-- version still writing meanwhile left them off): once per script, before it changes anything
local function kinds_fresh()
  if kinds_checked then return end
  kinds_checked = true
  local now = tonumber(redis.call('TIME')[1])
  if now - tonumber(redis.call('HGET', kinds, 'at') or '0') < 3600 then return end
  local n, b, all = 0, 0, redis.call('HGETALL', owner_bytes)
  for i = 1, #all, 2 do
    if forwarded(all[i]) then
      n, b = n + redis.call('ZCARD', prefix .. all[i] .. 'owned'), b + tonumber(all[i + 1])
    end
  end
  redis.call('HSET', kinds, 'n', n, 'b', b, 'at', now)
end
local function split(member)
  local ns, rid = string.match(member, '^(owner:[^:]*:)(.*)$')
  if ns then return ns, rid end
  return '', member
end
-- an owner's member in the owners' sets: its oldest entry's time, written so that an older one
-- sorts after (the sets are read from their end: most held, then oldest), then its namespace
local function place_at(at, ns)
  return string.format('%017.6f', 1e10 - at) .. '|' .. ns
end
-- an owner's member now, its oldest entry and that entry's time (nil: it holds nothing)
local function place(ns)
  local oldest = redis.call('ZRANGE', prefix .. ns .. 'owned', 0, 0, 'WITHSCORES')
  if oldest[1] == nil then return nil end
  local at = tonumber(oldest[2])
  return place_at(at, ns), oldest[1], at
end
-- an entry counted at time ``at`` with ``size`` bytes (size nil: no longer counted), everywhere;
-- returns the size it was counted with (nil: none)
local function account(member, at, size)
  local old = redis.call('HGET', sizes, member)
  local ns = split(member)
  local owned = prefix .. ns .. 'owned'
  if not old and not size then
    if not redis.call('ZSCORE', owned, member) then return nil end
    -- among its owner's entries without a size: Redis lost a key of the index (an eviction
    -- policy, a DEL). It leaves them all the same, or the caps' loop would pick it forever
    old = '0'
  end
  kinds_fresh()
  if forwarded(ns) then
    local more, grown = (size and 1 or 0) - (old and 1 or 0), (size or 0) - tonumber(old or 0)
    if more ~= 0 then redis.call('HINCRBY', kinds, 'n', more) end
    if grown ~= 0 then redis.call('HINCRBY', kinds, 'b', grown) end
  end
  local before, oldest, oldest_at = place(ns)
  local held = 0
  if old then
    redis.call('HDEL', sizes, member)
    redis.call('DECRBY', total, old)
    redis.call('ZREM', idx, member)
    redis.call('ZREM', owned, member)
    held = redis.call('HINCRBY', owner_bytes, ns, 0 - tonumber(old))  -- (not -0: no integer to Redis)
  end
  if size then
    redis.call('HSET', sizes, member, size)
    redis.call('INCRBY', total, size)
    redis.call('ZADD', idx, at, member)
    redis.call('ZADD', owned, at, member)
    held = redis.call('HINCRBY', owner_bytes, ns, size)
  end
  local after = before
  if not before or (old and member == oldest) or (size and at < oldest_at) then after = place(ns) end
  if after == before then  -- (its oldest entry is the same: its counts change in place)
    local more = (size and 1 or 0) - (old and 1 or 0)
    if more ~= 0 then redis.call('ZINCRBY', by_count, more, before) end
    redis.call('ZADD', by_bytes, held, before)
    return old
  end
  if before then
    redis.call('ZREM', by_count, before)
    redis.call('ZREM', by_bytes, before)
  end
  if after then
    redis.call('ZADD', by_count, redis.call('ZCARD', owned), after)
    redis.call('ZADD', by_bytes, held, after)
  else
    redis.call('HDEL', owner_bytes, ns)
  end
  return old
end
-- an entry of the version before's index: its size there (nil: none), forgotten there
local function legacy_size(member)
  local size = redis.call('HGET', legacy_sizes, member)
  if size then
    redis.call('HDEL', legacy_sizes, member)
    redis.call('DECRBY', legacy_total, size)
  end
  return size
end
-- that index emptied: its counts go too (only once every member it had is out: a batch that
-- empties it still reads each one's size)
local function legacy_emptied()
  if redis.call('ZCARD', legacy) == 0 then
    redis.call('DEL', legacy_total, legacy_sizes)
    old_left = false
  end
end
-- one response gone (by its member of the index, ``{ns}{id}``): its hash, the item keys that still
-- point at it, its accounting (an entry of the version before too)
local function drop(member)
  local ns, rid = split(member)
  local key = prefix .. ns .. 'response:' .. rid
  local ids = redis.call('HGET', key, 'items')
  if ids then
    for iid in string.gmatch(ids, '%S+') do
      local ikey, hkey = prefix .. ns .. 'item:' .. iid, prefix .. ns .. 'holders:' .. iid
      redis.call('ZREM', hkey, rid)
      if redis.call('GET', ikey) == rid then
        -- the newest holder goes: the newest other one still holding it takes over, with its expiry
        local digest, next_holder = redis.call('HGET', key, 'd:' .. iid), nil
        for _, h in ipairs(redis.call('ZREVRANGE', hkey, 0, -1)) do
          if redis.call('HGET', prefix .. ns .. 'response:' .. h, 'd:' .. iid) == digest then
            next_holder = h
            break
          end
          redis.call('ZREM', hkey, h)  -- (gone meanwhile: a key Redis expired)
        end
        local left = next_holder and redis.call('PTTL', prefix .. ns .. 'response:' .. next_holder) or -1
        if left > 0 then
          redis.call('SET', ikey, next_holder, 'PX', left)
        else
          redis.call('DEL', ikey, hkey)
        end
      end
    end
  end
  redis.call('DEL', key)
  local freed = account(member, nil, nil)
  if old_left and redis.call('ZREM', legacy, member) == 1 then
    legacy_size(member)
    legacy_emptied()
  end
  return freed
end
-- entries the version before wrote (one index of every owner's, by time; a replica of that version
-- still running writes there too): at most ``n`` of the oldest join their owners' shares, with the
-- time they were stored (those not moved in yet are trimmed first past a cap, oldest first, as
-- that version did)
local function migrate(n)
  if not old_left then return end
  local popped = redis.call('ZPOPMIN', legacy, n)
  for i = 1, #popped, 2 do
    local member = popped[i]
    local size = legacy_size(member)
    local ns, rid = split(member)
    if size and redis.call('EXISTS', prefix .. ns .. 'response:' .. rid) == 1 then
      account(member, tonumber(popped[i + 1]), tonumber(size))
    end
  end
  legacy_emptied()  -- (after the batch: ZPOPMIN may have taken the last of them at once)
end
-- the entry to evict past a cap (``set``: the owners by count, or by bytes): the oldest of the
-- owner holding the most (of equals, the one whose oldest entry is oldest), never ``keep`` (then
-- the next owner: only the writer's one entry can be ``keep``)
local function victim(set, keep)
  for _, at in ipairs(redis.call('ZREVRANGE', set, 0, 1)) do
    for _, member in ipairs(redis.call('ZRANGE', prefix .. string.match(at, '|(.*)$') .. 'owned', 0, 1)) do
      if member ~= keep then return member end
    end
  end
  return nil
end
-- what an entry holds indexed (``held``: item ids; ``digests``: each one's), the entry ``id`` (its hash
-- ``key``) their newest holder: an item produced again otherwise than its holders hold it, they hold it
-- no more
local function hold(key, ns, id, held, digests, now, ttl)
  for _, iid in ipairs(held) do
    local holder = redis.call('GET', prefix .. ns .. 'item:' .. iid)
    if not holder or redis.call('HGET', prefix .. ns .. 'response:' .. holder, 'd:' .. iid) ~= digests[iid] then
      redis.call('DEL', prefix .. ns .. 'holders:' .. iid)
    end
  end
  for _, iid in ipairs(held) do
    local hkey = prefix .. ns .. 'holders:' .. iid
    redis.call('HSET', key, 'd:' .. iid, digests[iid])
    redis.call('SET', prefix .. ns .. 'item:' .. iid, id, 'EX', ttl)
    redis.call('ZADD', hkey, now, id)
    redis.call('EXPIRE', hkey, ttl)
  end
end
-- (entries, bytes) the store holds
local function held_now()
  local n, b = redis.call('ZCARD', idx), tonumber(redis.call('GET', total) or '0')
  if old_left then
    n, b = n + redis.call('ZCARD', legacy), b + tonumber(redis.call('GET', legacy_total) or '0')
  end
  return n, b
end
"""

# Past the caps, what a write evicts (the entries of the version before not moved in yet first, then
# the oldest of the owner holding the most; never ``member``): {count, bytes} after
_EVICT = """
local n, b = held_now()
while n > max_n or b > max_b do
  -- entries of the version before not moved in yet go first (they are the oldest), then shares
  local gone = old_left and redis.call('ZRANGE', legacy, 0, 0)[1] or victim(n > max_n and by_count or by_bytes, member)
  if gone == nil then break end
  local freed = drop(gone)
  if freed and not old_left then n, b = n - 1, b - tonumber(freed) else n, b = held_now() end
end
return {n, b}
"""

# ARGV: prefix, the response's member ({ns}{id}), its entry, the items it produced ("id digest …"),
# the other items of its conversation with an id ("id digest …": held if produced before, unchanged),
# ttl, max_sessions, max bytes, the version it replaces ("": any), where in the entry its input items end
# and its Response starts (store.py ``encode_entry``), its Response's brief (store.py ``status``: the
# fields ``s``, and ``sv`` the version it is of). Returns {count, bytes} ({-1, 0}: another version is there)
_PUT_RESPONSE = _DROP + """
local member, data, produced, others = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, max_n, max_b = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ns, id = split(member)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
migrate(64)  -- (bounded: a store the version before filled moves in over a few writes)
for _, old in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', now - ttl)) do drop(old) end
if old_left then
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', legacy, '-inf', now - ttl)) do drop(old) end
end
local key = prefix .. ns .. 'response:' .. id
-- (0: none there; an entry without ``v``, written before versions, is version 1, as ``get`` reads it)
local version = tonumber(redis.call('HGET', key, 'v') or (redis.call('EXISTS', key) == 1 and '1' or '0'))
if ARGV[9] ~= '' and tonumber(ARGV[9]) ~= version then return {-1, 0} end
if version > 0 then drop(member) end  -- (the version it replaces; a new entry has nothing to drop)
local held, digests = {}, {}
for iid, digest in string.gmatch(produced, '(%S+) (%S+)') do
  held[#held + 1], digests[iid] = iid, digest
end
for iid, digest in string.gmatch(others, '(%S+) (%S+)') do
  if not digests[iid] then
    local holder = redis.call('GET', prefix .. ns .. 'item:' .. iid)
    if holder and redis.call('HGET', prefix .. ns .. 'response:' .. holder, 'd:' .. iid) == digest then
      held[#held + 1], digests[iid] = iid, digest
    end
  end
end
redis.call('HSET', key, 'data', data, 'items', table.concat(held, ' '), 'v', version + 1, 'in', ARGV[10], 'r', ARGV[11],
           's', ARGV[12], 'sv', version + 1)
hold(key, ns, id, held, digests, now, ttl)
redis.call('EXPIRE', key, ttl)
account(member, now, #data)
""" + _EVICT

# A running response's Response written again (store.py ``ResponseStore.renew``), its input items left
# where they are: a renewed entry is two fields, ``head`` (the entry's bytes up to its input items' end,
# its ``in``) and ``tail`` (the rest: its output items, then its Response), which a renewal alone
# writes (its first one splits ``data`` so, once: Lua copies a large string at ~5 ms/MB); the items it
# holds stay as they were, but for a renewal that ends it (store.py ``renew``'s ``ended``), which indexes
# the items its Response produced as a put does, and holds again what it held (its conversation's items:
# an item's key expires with its newest holder's write; they live as long as it from its end, as after a
# put of its end). ARGV: prefix, member, the new tail (without the comma after input items), the version it
# replaces, ttl, max_sessions, max bytes, where the Response starts in that tail, its Response's brief (as a
# put's), the items it produced ("id digest …"; "": none indexed).
# Returns {1, new version, count, bytes}; {0}: no such entry; {-1, version, the stored Response's JSON}:
# another version is there; {-2, version, the entry}: written by a version of the gateway without
# ``in`` (the caller puts it whole); {-3, version}: larger than the store keeps
_RENEW_RESPONSE = _DROP + """
local member, rest, expect = ARGV[2], ARGV[3], tonumber(ARGV[4])
local ttl, max_n, max_b, at = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ns, id = split(member)
local key = prefix .. ns .. 'response:' .. id
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, old in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', now - ttl)) do drop(old) end
if redis.call('EXISTS', key) == 0 then return {0} end
local found = redis.call('HMGET', key, 'v', 'in', 'r', 'tail')
local version, cut, r, tail = tonumber(found[1] or '1'), tonumber(found[2]), tonumber(found[3]), found[4]
if not cut or not r then return {-2, version, redis.call('HGET', key, 'data')} end
if version ~= expect then
  if tail then return {-1, version, string.sub(tail, r - cut + 1, -2)} end
  return {-1, version, string.sub(redis.call('HGET', key, 'data'), r + 1, -2)}
end
if cut > 10 and string.sub(rest, 1, 1) ~= ']' then  -- (after input items: a comma before the output's)
  rest, at = ',' .. rest, at + 1
end
if cut + #rest > max_b then return {-3, version} end
if not tail then
  redis.call('HSET', key, 'head', string.sub(redis.call('HGET', key, 'data'), 1, cut))
  redis.call('HDEL', key, 'data')
end
redis.call('HSET', key, 'tail', rest, 'v', version + 1, 'r', cut + at, 's', ARGV[9], 'sv', version + 1)
redis.call('EXPIRE', key, ttl)
if ARGV[10] ~= '' then
  -- (what it held, its conversation's items, held again from now, as a put's end held them: an item's key
  -- expires with its newest holder's write)
  -- (what it held already, held again from now: its conversation's items, as a put's end held them)
  local ids, held, digests, has = redis.call('HGET', key, 'items') or '', {}, {}, {}
  for iid in string.gmatch(ids, '%S+') do
    local digest = redis.call('HGET', key, 'd:' .. iid)
    has[iid] = true
    if digest then held[#held + 1], digests[iid] = iid, digest end
  end
  for iid, digest in string.gmatch(ARGV[10], '(%S+) (%S+)') do
    if not has[iid] then
      ids, has[iid] = ids == '' and iid or ids .. ' ' .. iid, true
    end
    if not digests[iid] then held[#held + 1] = iid end
    digests[iid] = digest
  end
  redis.call('HSET', key, 'items', ids)
  hold(key, ns, id, held, digests, now, ttl)
end
account(member, now, cut + #rest)
local counts = (function()
""" + _EVICT + """
end)()
return {1, version + 1, counts[1], counts[2]}
"""

_DROP_RESPONSE = _DROP + """
local ns, rid = split(ARGV[2])
local existed = redis.call('EXISTS', prefix .. ns .. 'response:' .. rid)
drop(ARGV[2])
if existed == 1 and tonumber(ARGV[3]) > 0 then
  redis.call('SET', prefix .. ns .. 'deleted:' .. rid, '1', 'EX', ARGV[3])
end
return existed
"""

_PUT_REPLAY = """
local prefix, key, data, cap = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local idx = prefix .. 'replays'
local t = redis.call('TIME')
redis.call('SET', prefix .. 'replay:' .. key, data)
redis.call('ZADD', idx, tonumber(t[1]) + tonumber(t[2]) / 1000000, key)
while redis.call('ZCARD', idx) > cap do
  local oldest = redis.call('ZPOPMIN', idx)
  redis.call('DEL', prefix .. 'replay:' .. oldest[1])
end
return redis.call('ZCARD', idx)
"""


class RedisState:
    """One Redis connection pool for the gateway, and whether Redis is reachable."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis  # the redis client library (PyPI `redis`)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.url = url
        self.where = describe(url)
        # One retry on a fresh connection: after Redis restarted, pooled connections are dead.
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=IO_TIMEOUT,
                                              retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self._scripts = {name: self.client.register_script(text) for name, text in
                         (("put_response", _PUT_RESPONSE), ("renew_response", _RENEW_RESPONSE),
                          ("drop_response", _DROP_RESPONSE),
                          ("put_replay", _PUT_REPLAY))}
        self.up = True
        self.closed = False  # (state_store_url changed: what still holds this one gets StateUnavailable)
        self.errors = 0  # failed calls (metrics)
        self._down_until = 0.0
        self._backoff = BACKOFF[0]
        self._refusal = ""  # the last error reply logged (each different one once, until a call succeeds)

    async def call(self, what: str, make):
        """Run ``await make(client)``; ``StateUnavailable`` if Redis is down (or was a moment ago)
        or refuses the command."""
        import redis.exceptions as rex

        if self.closed:  # (a call now would open a connection nobody closes)
            raise StateUnavailable(f"the state store ({self.where}) is no longer this gateway's")
        if not self.up and time.monotonic() < self._down_until:
            raise StateUnavailable(f"the state store ({self.where}) is unreachable")
        try:
            result = await make(self.client)
        except (rex.ConnectionError, rex.TimeoutError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            if self.up:
                log.warning(f"resp2chat: state store {self.where} unreachable ({what}): {type(exc).__name__}: {exc}")
            else:
                self._backoff = min(self._backoff * 2, BACKOFF[1])
            self.up, self._down_until = False, time.monotonic() + self._backoff
            raise StateUnavailable(f"the state store ({self.where}) is unreachable") from None
        except rex.RedisError as exc:  # an error reply (OOM, READONLY, NOPERM…): reachable, but no use now
            self.errors += 1
            refusal = f"{type(exc).__name__}: {exc}"
            if refusal != self._refusal:
                self._refusal = refusal
                log.warning(f"resp2chat: state store {self.where} refused ({what}): {refusal}")
            raise StateUnavailable(f"the state store ({self.where}) refused {what}: {refusal}") from None
        if not self.up:
            log.warning(f"resp2chat: state store {self.where} reachable again")
            self.up, self._backoff = True, BACKOFF[0]
        self._refusal = ""
        return result

    def script(self, name: str):
        return self._scripts[name]

    def script_from(self, text: str):
        """A Lua script of another module (its text is its name), registered once."""
        found = self._scripts.get(text)
        if found is None:
            found = self._scripts[text] = self.client.register_script(text)
        return found

    async def close(self) -> None:
        self.closed = True
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001 - closing a pool to a dead server
            pass


def namespace(owner: str) -> str:
    """Where an owner's keys live, after the prefix (see the key table): ``""`` for the one owner
    of a single-key gateway."""
    return f"owner:{owners.check(owner)}:" if owner else ""


def _pairs(found) -> str:
    """(id, item) pairs as ``"id digest …"`` (only ids that can be the gateway's: no spaces)."""
    return " ".join(dict.fromkeys(f"{iid} {item_digest(item)}" for iid, item in found if valid_item_id(iid)))


def _item_ids(items: list, response: dict) -> tuple[str, str]:
    """For ``put``: the items a response produced, and the other items of its conversation with
    an id (each may be one produced earlier, held unchanged), as ``_pairs``."""
    produced = output_items(response)
    return _pairs(produced.items()), _pairs(held_items(items, produced))


def _brief(response: dict) -> bytes:
    """A Response's brief (resp2chat_core/background.py ``brief``), as the field ``s`` keeps it."""
    return json.dumps(brief(response), separators=(",", ":")).encode()


def _joined(parts) -> bytes | None:
    """A renewed entry's JSON, from its ``head`` and ``tail`` (``_RENEW_RESPONSE``); None: none."""
    head, tail = parts
    return head + tail if head is not None and tail is not None else None


class RedisResponseStore:
    """Stored responses in Redis: store.py's ``Store``. A response is written when its turn ends,
    a moment after the client read ``response.completed``: a client that continues (or GETs it)
    at once on another replica can ask before the write landed, so an id Redis does not know
    yet is looked up again for up to ``fresh_wait`` seconds (the store addon's lookup)."""

    fresh_wait = 2.0

    def __init__(self, state: RedisState, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        self.state, self.ttl, self.max_entries, self.max_bytes = state, int(ttl), max_entries, max_bytes
        self.count = 0  # entries and bytes after this replica's last write (len; /metrics reads figures)
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    def rebound(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        """New bounds (an option set while it runs): the next write keeps to them."""
        self.ttl, self.max_entries, self.max_bytes = int(ttl), max_entries, max_bytes

    async def put(self, response_id: str, items: list, response: dict, *, owner: str = owners.SHARED,
                  expect: int | None = None) -> bool:
        return bool(await self._put(response_id, items, response, owner, expect))

    async def _put(self, response_id: str, items: list, response: dict, owner: str, expect: int | None) -> bool | None:
        """``put``, telling why it did not write: None, the store's bounds refuse the entry (past
        ``max_bytes``, or a store that keeps nothing); False, another version is there."""
        data, cut, at = encode_entry(items, response)
        if len(data) > self.max_bytes or self.ttl <= 0 or self.max_entries <= 0:
            return None
        script = self.state.script("put_response")
        produced, others = _item_ids(items, response)
        member = namespace(owner) + response_id
        count, size = await self.state.call("store a response", lambda c: script(args=[
            KEY_ROOT, member, data, produced, others, self.ttl, self.max_entries, self.max_bytes,
            "" if expect is None else expect, cut, at, _brief(response)]))
        if count < 0:
            return False  # (another version: the caller reads it again)
        self.count, self.bytes = count, size
        return True

    async def renew(self, response_id: str, response: dict, *, owner: str = owners.SHARED,
                    expect: int, ended: bool = False) -> Renewal | None:
        """store.py ``ResponseStore.renew``, in one script: only the entry's bytes after its input
        items go to Redis and back (its output so far, its Response); ``ended``: with the ids and
        digests of the items it produced, indexed there."""
        if not valid_id(response_id):
            return None
        output = response.get("output")
        # (whether the entry has input items, and so a comma before its output's, is Redis's to know)
        rest, at = entry_tail(False, output if isinstance(output, list) else [], response)
        script = self.state.script("renew_response")
        member = namespace(owner) + response_id
        produced = _pairs(output_items(response).items()) if ended else ""
        found = await self.state.call("renew a stored response", lambda c: script(args=[
            KEY_ROOT, member, rest, expect, self.ttl, self.max_entries, self.max_bytes, at, _brief(response), produced]))
        if found[0] == 1:
            self.count, self.bytes = found[2], found[3]
            return Renewal(found[1])
        if found[0] == 0:
            return None
        if found[0] == -1:
            return Renewal(found[1], json.loads(found[2]))
        if found[0] == -3:
            return Renewal(found[1], too_large=True)
        entry = json.loads(found[2])  # (-2: written whole by a gateway of the version before)
        if found[1] != expect:
            return Renewal(found[1], entry["response"])
        items = entry["items"]
        whole = items[:input_count(items, entry["response"])] + (output if isinstance(output, list) else [])
        written = await self._put(response_id, whole, response, owner, expect)
        if written:
            return Renewal(expect + 1)
        if written is None:
            return Renewal(expect, too_large=True)  # (what ``put`` refused, not a version: no read again)
        return await self.renew(response_id, response, owner=owner, expect=expect, ended=ended)  # (another version)

    async def figures(self, asked) -> Figures:
        """``Figures`` of the whole shared store (every replica's writes), read in one MULTI of
        O(1) commands: the index's count and bytes (with the version before's not moved in
        yet), each owner's ``owned`` count and ``owners:bytes`` field, ``owners:kinds``.
        Entries past their time count until the next write drops them."""
        asked = sorted({*asked, owners.SHARED})

        async def read(c):
            pipe = c.pipeline(transaction=True)
            for key in ("entries", "responses"):
                pipe.zcard(KEY_ROOT + key).get(f"{KEY_ROOT}{key}:bytes")
            pipe.hmget(KEY_ROOT + "owners:kinds", ["n", "b"])
            for owner in asked:
                ns = namespace(owner)
                pipe.zcard(f"{KEY_ROOT}{ns}owned").hget(KEY_ROOT + "owners:bytes", ns)
            return await pipe.execute()
        n, b, legacy_n, legacy_b, (fn, fb), *held = await self.state.call("read the store's figures", read)
        return ((n + legacy_n, int(b or 0) + int(legacy_b or 0)),
                {o: (held[2 * i], int(held[2 * i + 1] or 0)) for i, o in enumerate(asked)},
                (max(int(fn or 0), 0), max(int(fb or 0), 0)))

    async def get(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None:
        if not valid_id(response_id):
            return None  # (a client's id that names no key of ours: another owner's namespace is out of reach)
        key = f"{KEY_ROOT}{namespace(owner)}response:{response_id}"
        data, version, *parts = await self.state.call("read a stored response",
                                                      lambda c: c.hmget(key, ["data", "v", "head", "tail"]))
        data = data or _joined(parts)
        return {**json.loads(data), "version": int(version or 1)} if data else None

    async def status(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None:
        """store.py ``ResponseStore.status``: the fields ``v``, ``s`` and ``sv`` of its hash, one
        round trip of a few dozen bytes. An entry whose brief is not of its version (written by a
        version of the gateway before briefs, or renewed by one since), or that has no version
        (written before versions: version 1, as ``get`` reads it), is read whole instead, as is
        an id none is stored under (one more small round trip, once: a poll of it stops)."""
        if not valid_id(response_id):
            return None
        key = f"{KEY_ROOT}{namespace(owner)}response:{response_id}"
        version, found, of = await self.state.call("read a stored response's status",
                                                   lambda c: c.hmget(key, ["v", "s", "sv"]))
        if version is not None and found is not None and of == version:
            return {**json.loads(found), "version": int(version)}
        entry = await self.get(response_id, owner=owner)
        return None if entry is None else {**brief(entry["response"]), "version": entry["version"]}

    async def delete(self, response_id: str, *, owner: str = owners.SHARED) -> bool:
        if not valid_id(response_id):
            return False
        script = self.state.script("drop_response")
        member = namespace(owner) + response_id
        return bool(await self.state.call("delete a stored response",
                                          lambda c: script(args=[KEY_ROOT, member, self.ttl])))

    async def deleted(self, response_id: str, *, owner: str = owners.SHARED) -> bool:
        """store.py ``ResponseStore.deleted``: its tombstone's ``EXISTS``, one round trip."""
        if not valid_id(response_id):
            return False
        key = f"{KEY_ROOT}{namespace(owner)}deleted:{response_id}"
        return bool(await self.state.call("ask whether a response was deleted", lambda c: c.exists(key)))

    async def items(self, item_ids, *, owner: str = owners.SHARED) -> dict[str, dict]:
        """``item_reference`` ids -> the owner's stored items, as the gateway produced them
        (missing: absent), as store.ResponseStore's ``items``: where they are in one round
        trip, each response holding some read and decoded once however many it serves."""
        ids = list(dict.fromkeys(i for i in item_ids if valid_item_id(i)))
        if not ids:
            return {}
        ns = namespace(owner)
        holders = await self.state.call("look up items", lambda c: c.mget([f"{KEY_ROOT}{ns}item:{i}" for i in ids]))
        by_response: dict[str, list[str]] = {}
        for item_id, holder in zip(ids, holders):
            if holder:
                by_response.setdefault(holder.decode(), []).append(item_id)
        found: dict[str, dict] = {}
        for response_id, wanted in by_response.items():
            key = f"{KEY_ROOT}{ns}response:{response_id}"
            data, head, tail, *digests = await self.state.call(
                "read a stored response", lambda c, key=key, wanted=wanted: c.hmget(
                    key, ["data", "head", "tail", *(f"d:{i}" for i in wanted)]))
            data = data or _joined((head, tail))
            if data:
                found.update(pick(json.loads(data), {i: d.decode() for i, d in zip(wanted, digests) if d}))
        return {i: found[i] for i in ids if i in found}


class RedisReplayCache(ReplayCounts):
    """The replay cache in Redis: store.py's ``Replays``."""

    def __init__(self, state: RedisState, capacity: int) -> None:
        self.state, self.capacity = state, capacity
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def resize(self, capacity: int) -> None:
        self.capacity = capacity  # the next put trims to it

    async def get(self, key: str) -> bytes | None:
        try:
            found = await self.state.call("replay cache lookup", lambda c: c.get(f"{KEY_ROOT}replay:{key}"))
        except StateUnavailable:
            found = None  # a miss: the backend answers
        return self.counted(found)

    async def put(self, key: str, entry: bytes) -> bool:
        if not self.takes(entry):
            return False
        script = self.state.script("put_replay")
        self.count = await self.state.call("replay cache write", lambda c: script(args=[KEY_ROOT, key, entry, self.capacity]))
        return True
