"""Stored responses for ``previous_response_id``: bounded in time, count and memory.

A response is stored when its request did not say ``store: false`` (Codex always does, so a
Codex gateway stores nothing). An entry is the conversation as Responses input items — the
history the request started from, its own input, then its output — plus the Response object
for ``GET /v1/responses/{id}``. Entries expire after ``ttl`` seconds; beyond ``max_entries`` or
``max_bytes`` the oldest go first. With a directory, entries are also written there (one
0600 JSON file each, directory 0700) and read back after a restart.

Items are found by id too (``item_reference``): an index item id -> the stored responses whose
conversation holds an item with that id, which lives and dies with them (``put`` adds a
response's ids, dropping it, by expiry, eviction or ``delete``, removes them; a restart rebuilds it
from the directory). The interface is what another backing store has to offer: ``put``, ``get``,
``delete``, ``resolve_items``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

_ID = re.compile(r"^resp_[A-Za-z0-9]{8,64}$")


class ResponseStore:
    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int, directory: str | None = None, clock=time.time):
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self.clock = clock
        self.dir = Path(directory).expanduser() if directory else None
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # id -> (stored at, JSON)
        self._item_ids: dict[str, tuple[str, ...]] = {}  # response id -> the item ids it holds
        self._items: dict[str, list[str]] = {}  # item id -> response ids holding it, oldest first
        self.bytes = 0
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.dir, 0o700)
            self._load_dir()

    @classmethod
    def from_settings(cls, values: dict) -> "ResponseStore":
        """From the store settings (settings.py names; hours and MiB become seconds and bytes)."""
        return cls(ttl=values["session_ttl_hours"] * 3600, max_entries=values["max_sessions"],
                   max_bytes=values["max_session_memory_mb"] << 20, directory=values["session_store_dir"] or None)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, items: list, response: dict) -> None:
        data = json.dumps({"items": items, "response": response}, ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) > self.max_bytes:
            return  # larger than the whole store: keeping it would evict everything else
        self._drop(response_id)
        now = self.clock()
        self._entries[response_id] = (now, data)
        self.bytes += len(data)
        self._index(response_id, items)
        if self.dir:
            _write_private(self.dir / f"{response_id}.json", json.dumps({"stored_at": now}).encode()[:-1]
                           + b',"entry":' + data + b"}")
        self._evict()

    def get(self, response_id: str) -> dict | None:
        self._evict()
        found = self._entries.get(response_id)
        return json.loads(found[1]) if found else None

    def delete(self, response_id: str) -> bool:
        return self._drop(response_id)

    def resolve_items(self, item_ids: list[str]) -> dict[str, dict]:
        """The stored items with these ids (as in the newest live response holding each); ids
        not found are absent. Each response's entry is decoded once however many it serves."""
        self._evict()
        by_response: dict[str, list[str]] = {}
        for item_id in dict.fromkeys(item_ids):
            holders = self._items.get(item_id)
            if holders:
                by_response.setdefault(holders[-1], []).append(item_id)
        found: dict[str, dict] = {}
        for response_id, wanted in by_response.items():
            want = set(wanted)
            for item in json.loads(self._entries[response_id][1])["items"]:
                if isinstance(item, dict) and item.get("id") in want:
                    found[item["id"]] = item
        return found

    def _index(self, response_id: str, items: list) -> None:
        ids = tuple(dict.fromkeys(i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)))
        self._item_ids[response_id] = ids
        for item_id in ids:
            self._items.setdefault(item_id, []).append(response_id)

    def _unindex(self, response_id: str) -> None:
        for item_id in self._item_ids.pop(response_id, ()):
            holders = self._items.get(item_id)
            if holders is not None:
                holders.remove(response_id)
                if not holders:
                    del self._items[item_id]

    def _drop(self, response_id: str) -> bool:
        found = self._entries.pop(response_id, None)
        if found is None:
            return False
        self._unindex(response_id)
        self.bytes -= len(found[1])
        if self.dir:
            (self.dir / f"{response_id}.json").unlink(missing_ok=True)
        return True

    def _evict(self) -> None:
        cutoff = self.clock() - self.ttl
        while self._entries:
            oldest_id, (stored_at, _) = next(iter(self._entries.items()))
            if stored_at < cutoff or len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(oldest_id)
            else:
                break

    def _load_dir(self) -> None:
        found = []
        for path in self.dir.glob("resp_*.json"):
            if not _ID.match(path.stem):
                continue
            try:
                record = json.loads(path.read_bytes())
                found.append((float(record["stored_at"]), path.stem,
                              json.dumps(record["entry"], ensure_ascii=False, separators=(",", ":")).encode()))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # a torn or foreign file: not ours to keep
        for stored_at, rid, data in sorted(found):
            self._entries[rid] = (stored_at, data)
            self.bytes += len(data)
            self._index(rid, json.loads(data)["items"])
        self._evict()


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
