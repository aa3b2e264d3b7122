"""Which stored entry goes when the response store is over a cap: one owner's writes push out their
own entries, not everyone's.

Rules of this file:
- Sans-I/O: the store in memory (resp2chat_io/store.py ``ResponseStore``, with its directory copy)
  keeps its owners' shares here; Redis keeps the same rule in its Lua script
  (resp2chat_io/redis_state.py ``_PUT_RESPONSE``). tests/test_store_shares.py runs one sequence of
  writes through both and compares what each kept.
- The rule (``victim``): over ``max_sessions``, the owner holding the MOST entries loses its
  oldest entry; over ``max_session_memory_mb``, the owner holding the most BYTES does. Of owners
  holding as much, the one whose oldest entry is oldest (so owners holding alike go oldest-first,
  as the store did before it had owners). The entry being written is never its own victim (a
  store over its bytes with one owner's one large entry trims the others; an entry larger than
  the whole store is not taken at all, before this).
- So an owner keeps what it stored while it holds no more than anyone else: a runaway writer
  evicts only itself once it is the largest, and an owner with little state keeps it. Expiry
  (``session_ttl_hours``) stays global and oldest-first: it is time, not a share.
- Entries without an owner (a keyless gateway, one gateway key) are one owner
  (resp2chat_core/owner.py ``SHARED``).

What /metrics shows of who fills the store (``by_client``): each configured client's entries and
bytes under its name, the rest lumped by kind (owner.py ``kind``): never an owner, so a label is
bounded by the ``clients`` setting and names no credential. The shared owner and each client are
read by owner (``held``); ``Shares`` keeps only the forwarded credentials' total as it goes
(``forwarded_held``; Redis: the ``owners:kinds`` hash its script keeps), so the figures cost
O(clients).

Costs: ``add`` and ``victim`` are O(log n) in the owners (a heap per measure whose stale entries
are put right when they come up, rebuilt when they outnumber the live ones: amortized), ``remove``
O(1); O(1) in an owner's entries (kept in insertion order).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable

from .owner import SHARED, kind

FORMER = "former"  # a client's identity no configured client has now (revoked, or its id changed)

COUNT, BYTES = 0, 1  # the measures: which cap is over


class Shares:
    """Each owner's entries (oldest first, with their sizes) and what the owner holds in all."""

    def __init__(self) -> None:
        self._owned: dict[str, OrderedDict[str, tuple[float, int]]] = {}  # owner -> id -> (stored at, bytes)
        self._bytes: dict[str, int] = {}
        # per measure, a heap of (-held, oldest entry's time, owner). Each owner holding anything
        # has its key there, or one that ranks it higher (it held more, or older, when pushed):
        # such a stale one is put right when it comes up (``victim``), so a removal pushes nothing
        self._heaps: tuple[list, list] = ([], [])
        self._pushed: tuple[dict, dict] = ({}, {})  # per measure: owner -> the newest key pushed for it
        self._forwarded = [0, 0]  # [entries, bytes] every forwarded credential's owner holds (metrics)

    def __len__(self) -> int:  # (owners holding anything)
        return len(self._owned)

    def held(self, owner: str) -> tuple[int, int]:
        """(entries, bytes) ``owner`` holds."""
        return len(self._owned.get(owner, ())), self._bytes.get(owner, 0)

    def forwarded_held(self) -> tuple[int, int]:
        """(entries, bytes) every forwarded credential's owner (owner.py ``kind``) holds together."""
        return self._forwarded[0], self._forwarded[1]

    def _count(self, owner: str, entries: int, size: int) -> None:
        if kind(owner) == "forwarded":
            self._forwarded[0] += entries
            self._forwarded[1] += size

    def add(self, owner: str, entry_id: str, at: float, size: int) -> None:
        """``owner``'s entry ``entry_id`` stored at ``at`` (the newest: entries come in time order)."""
        owned = self._owned.get(owner)
        if owned is None:
            owned = self._owned[owner] = OrderedDict()
            self._bytes[owner] = 0
        owned[entry_id] = (at, size)
        self._bytes[owner] += size
        self._count(owner, 1, size)
        for measure in (COUNT, BYTES):  # (it ranks higher now: its key goes in)
            self._push(owner, measure)

    def remove(self, owner: str, entry_id: str) -> None:
        owned = self._owned.get(owner)
        if owned is None or entry_id not in owned:
            return
        _, size = owned.pop(entry_id)
        self._bytes[owner] -= size
        self._count(owner, -1, -size)
        if not owned:
            del self._owned[owner], self._bytes[owner], self._pushed[COUNT][owner], self._pushed[BYTES][owner]

    def victim(self, measure: int, keep: tuple[str, str] | None = None) -> tuple[str, str] | None:
        """(owner, entry id) to evict when the cap of ``measure`` (``COUNT``, ``BYTES``) is over:
        the oldest entry of the owner holding the most, not ``keep`` (the entry being written, by
        (owner, entry id): another owner's entry of the same id is another entry)."""
        heap, passed, found = self._heaps[measure], [], None
        while heap and found is None:
            top = heapq.heappop(heap)
            owner = top[2]
            if owner not in self._owned:
                continue
            if top != self._key(owner, measure):  # (stale: it ranks lower now)
                self._push(owner, measure)
                continue
            passed.append(top)
            found = next(((owner, eid) for eid in self._owned[owner] if (owner, eid) != keep), None)
        for top in passed:
            heapq.heappush(heap, top)
        return found

    def _push(self, owner: str, measure: int) -> None:
        """``owner``'s key into the heap, unless it is there already."""
        key, heap, pushed = self._key(owner, measure), self._heaps[measure], self._pushed[measure]
        if pushed.get(owner) == key:
            return
        pushed[owner] = key
        heapq.heappush(heap, key)
        if len(heap) > 4 * len(self._owned) + 64:  # mostly stale: rebuilt
            pushed.clear()
            pushed.update((o, self._key(o, measure)) for o in self._owned)
            heap[:] = pushed.values()
            heapq.heapify(heap)

    def _key(self, owner: str, measure: int) -> tuple:
        owned = self._owned[owner]
        return (-len(owned) if measure == COUNT else -self._bytes[owner], next(iter(owned.values()))[0], owner)


def by_client(total: tuple[int, int], held: dict[str, tuple[int, int]], forwarded: tuple[int, int],
              clients: Iterable[tuple[str, str]]) -> list[tuple[str, str, int, int]]:
    """Who fills the store, as /metrics shows it: ``(client, kind, entries, bytes)`` rows whose
    sums are ``total``. ``clients``: each configured client's (name, owner) (``gateway_api_key``'s
    ``default`` client's owner is ``SHARED``: it is the shared row); ``held``: what those owners and
    ``SHARED`` hold; ``forwarded``: what every ``auth-…`` owner holds together. A configured
    client is its row by name (kind ``client``); the rest are ``("", kind)``: ``shared``,
    ``forwarded``, and ``former`` (clients' identities no configured client has now, and what
    is not counted by owner: the rest of ``total``)."""
    rows, seen = [], set()
    for name, owner in clients:
        if owner != SHARED and owner not in seen:  # (owners are unique per client: clients.py)
            seen.add(owner)
            rows.append((name, "client", *held.get(owner, (0, 0))))
    rows += [("", "shared", *held.get(SHARED, (0, 0))), ("", "forwarded", *forwarded)]
    rest = (total[0] - sum(r[2] for r in rows), total[1] - sum(r[3] for r in rows))
    rows.append(("", FORMER, max(rest[0], 0), max(rest[1], 0)))  # (a moment between two reads: never below 0)
    return rows
