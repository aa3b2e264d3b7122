"""Replay cache: completed upstream answers keyed by the SHA-256 of the exact chat request.

An identical request (same lowered bytes, same upstream) is answered from memory: the stored
upstream SSE is translated again by a fresh translator, so the client gets fresh response and
item ids and otherwise the very same events. Only answers that completed are kept. FIFO with a
fixed number of entries and a per-entry size cap, so memory is bounded whatever the traffic.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

MAX_ENTRY_BYTES = 4 << 20


def replay_key(upstream_url: str, chat_body: bytes) -> str:
    return hashlib.sha256(upstream_url.encode() + b"\n" + chat_body).hexdigest()


class ReplayCache:
    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, upstream_sse: bytes) -> bool:
        if self.capacity <= 0 or len(upstream_sse) > MAX_ENTRY_BYTES:
            return False
        self._entries[key] = upstream_sse
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return True

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self._entries) > max(capacity, 0):
            self._entries.popitem(last=False)
