"""Replay cache: completed answers keyed by the SHA-256 of the exact client request.

An identical request (same bytes, same upstream, same settings) is answered from memory with the
very answer the client got the first time, its response id and ``created_at`` swapped for fresh
ones (item and call ids derive from the response id, so they change with it). Only answers that
completed are kept. FIFO with a fixed number of entries and a per-entry size cap, so memory is
bounded whatever the traffic.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

MAX_ENTRY_BYTES = 4 << 20


def replay_key(context: str, request_body: bytes) -> str:
    """``context``: what else decides the answer (upstream URL, effective lowering settings)."""
    return hashlib.sha256(context.encode() + b"\n" + request_body).hexdigest()


def pack(response_id: str, created_at: int, body: bytes, *, stream: bool, store: bool) -> bytes:
    """An entry: the answer, and what a hit needs to know without parsing the request again."""
    return f"{response_id} {created_at} {int(stream)} {int(store)}\n".encode() + body


def entry_flags(entry: bytes) -> tuple[bool, bool]:
    """(the client streamed, the client wants the response stored) of an entry's request."""
    fields = entry[:entry.index(b"\n")].split(b" ")
    return fields[2] == b"1", fields[3] == b"1"


def unpack_fresh(entry: bytes, response_id: str, created_at: int) -> bytes:
    """The stored answer under a new response id and creation time."""
    head, _, body = entry.partition(b"\n")
    old_id, old_created = head.decode().split(" ")[:2]
    old, new = old_id.removeprefix("resp_").encode(), response_id.removeprefix("resp_").encode()
    body = body.replace(old, new).replace(old[:16], new[:16])  # item ids, then generated call ids
    return body.replace(b'"created_at":%s' % old_created.encode(), b'"created_at":%d' % created_at)


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
