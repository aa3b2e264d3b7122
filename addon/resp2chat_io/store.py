"""Stored responses for ``previous_response_id``: bounded in time, count and memory.

A response is stored when its request did not say ``store: false`` (Codex always does, so a
Codex gateway stores nothing). An entry is the conversation as Responses input items — the
history the request started from, its own input, then its output — plus the Response object
for ``GET /v1/responses/{id}``. Entries expire after ``ttl`` seconds (oldest first); beyond ``max_entries`` or
``max_bytes`` the owner holding the most loses its oldest (resp2chat_core/shares.py: one owner's
writes push out its own entries, not everyone's). With a directory, entries are also written there (one
0600 JSON file each, directory 0700, with its version and the items it holds; a running
background response's renewals beside it, ``renew``; ``{id}@{owner}.json`` but for the shared owner's)
and read back after a restart, answering as before it.

Every entry has an owner (resp2chat_core/owner.py): ``get``, ``delete`` and ``items``
see only the caller's, so another owner's response or item is exactly an unknown one. Entries
are keyed by (owner, id), on every store alike (Redis: a namespace per owner): two owners' entries
of one id (a replayed answer keeps its recorded id) are two entries, each its owner's alone.

Items are found by id too (``item_reference``), but only items the gateway itself produced: an
index (owner, item id) -> the item's digest as the gateway output it, and the stored responses of
that owner whose conversation holds it unchanged. A response's own output items start an entry;
a later response holding one of them with the same digest (continued with
``previous_response_id``, or resolved from a reference) becomes a holder too, so the item outlives
the response that made it. What clients put in their input is never indexed: an input item
reusing another response's item id (altered or not) cannot change what that id resolves to. The
index lives and dies with its holders (``put`` adds a response's ids, dropping it, by expiry,
eviction or ``delete``, removes them; a restart rebuilds it from the directory).

A conversation of the Conversations API (addons/conversations.py) is an entry too, under its
``conv_…`` id: its items, and the conversation object in place of the Response; the same
bounds, expiry, owner and interface hold (the addons tell the two kinds apart by their ids). Each
entry has a version, counted up by every ``put``: ``put(…, expect=version)`` writes only over
that very version (``get`` gives it), so two turns appending to one conversation at once, on
any replicas, cannot lose one another's items.

The store interface (``Store``) is asynchronous, whatever holds the entries: this memory store
(with its directory copy), and Redis (redis_state.py ``RedisResponseStore``) for replicas. Its
methods take an ``owner`` and answer for that owner only. ``fresh_wait``: how long an id the
store does not know yet may still be on its way (another replica wrote it a moment ago): 0 here.
``Writes`` runs the writes of either without making a request wait for them.

``deleted``: whether a ``delete`` removed an id (a tombstone, for ``ttl``; the memory store
keeps as many as it keeps entries): a WebSocket's memory asks it before continuing a stored
response from there (one lookup, not a read of the entry).

``renew``: a running background response's Response written again every 2 s (its lease, its
output so far: addons/background.py) under the version check, its conversation neither decoded
nor encoded (a 2.5 MB conversation's ``get`` and ``put`` took ~30 ms of the event loop, each
time). An entry's JSON is its input items, then its output items, then its Response
(``encode_entry``): a renewal keeps the bytes of the first part and writes the rest. A renewal
that ends it (``ended``: its end on the replica that ran it, or a cancellation or a death stored
by another one) indexes its output as a ``put`` would, still without its conversation.

``status``: what a poll of a running background response reads (a cancellation waiting for
another replica to stop it, a resume following it there): its Response's ``brief``
(resp2chat_core/background.py: status, lease, cancellation asked), kept beside the entry by
every ``put`` and ``renew`` (Redis: the fields ``s`` and ``sv``), with its version: a few dozen
bytes, however large its conversation and output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Protocol

from resp2chat_core import owner as owners
from resp2chat_core.background import brief
from resp2chat_core.shares import BYTES, COUNT, Shares
from resp2chat_core.replay import MAX_ENTRY_BYTES

_ID = re.compile(r"^(resp|conv)_[A-Za-z0-9]{8,64}$")  # the directory copy's files
_RESPONSE_ID = re.compile(r"(resp|conv)_[A-Za-z0-9]{1,64}")  # what an entry id the gateway made can look like
_ITEM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # what an item id the gateway produced can look like


def valid_id(response_id: object) -> bool:
    """Whether a client's response (or conversation) id can be one the gateway made (others are
    unknown at once)."""
    return isinstance(response_id, str) and bool(_RESPONSE_ID.fullmatch(response_id))


def valid_item_id(item_id: object) -> bool:
    """Whether a client's item id can be one the gateway produced (others are unknown at once)."""
    return isinstance(item_id, str) and bool(_ITEM_ID.fullmatch(item_id))


def item_digest(item: dict) -> str:
    """An item's fingerprint, the same however its keys are ordered or it was stored (memory,
    disk, Redis): a holder of an item id must hold the very item the gateway produced."""
    text = json.dumps(item, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def output_items(response: dict) -> dict[str, dict]:
    """The items a stored Response produced, by id: the only ones ``item_reference`` may name."""
    output = response.get("output") if isinstance(response, dict) else None
    return {i["id"]: i for i in output or () if isinstance(i, dict) and isinstance(i.get("id"), str) and i["id"]}


def held_items(items: list, produced: dict[str, dict]) -> list[tuple[str, dict]]:
    """(id, item) of a conversation's items with an id that it did not produce itself: each may
    be an item produced earlier, held unchanged (or a client's copy: the digest tells)."""
    return [(item["id"], item) for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)
            and item["id"] and item["id"] not in produced]


log = logging.getLogger("resp2chat")


class StateUnavailable(Exception):
    """The store cannot be reached (or refuses) right now: Redis is down, or was a moment ago."""


Figures = tuple[tuple[int, int], dict[str, tuple[int, int]], tuple[int, int]]
"""What /metrics shows of who fills a store (resp2chat_core/shares.py ``by_client``): (entries,
bytes) of the whole store, of each owner asked (and ``SHARED``), and of every forwarded
credential's owner together (owner.py ``kind``)."""


class Renewal(NamedTuple):
    """What ``renew`` did: written (``renewed``: ``version`` is the entry's new one), or not:
    another version is there (``response``: the stored Response, read without its
    conversation; ``version``: that version's), or the entry would be larger than the store
    keeps (``too_large``)."""

    version: int
    response: dict | None = None
    too_large: bool = False

    @property
    def renewed(self) -> bool:
        return self.response is None and not self.too_large


def _dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def input_count(items: list, response: dict) -> int:
    """How many of an entry's ``items`` are its input: those before its Response's ``output`` (a
    stored response's conversation ends with its output; a conversation's entry has none)."""
    output = response.get("output") if isinstance(response, dict) else None
    return max(len(items) - (len(output) if isinstance(output, list) else 0), 0)


def encode_entry(items: list, response: dict) -> tuple[bytes, int, int]:
    """An entry's JSON (``{"items": …, "response": …}``, the same bytes however it is written),
    and where in it its input items end (``input_count``) and its Response starts (``renew``
    keeps the first part and writes the rest)."""
    cut = input_count(items, response)
    given = _dumps(items[:cut])
    tail, at = entry_tail(cut > 0, items[cut:], response)
    head = len(given) + 8  # (b'{"items":' and the input items without their "]")
    return b"".join((b'{"items":', memoryview(given)[:-1], tail)), head, head + at


def entry_tail(after_input: bool, output: list, response: dict) -> tuple[bytes, int]:
    """An entry's JSON after its input items (``encode_entry``): its output items, then its
    Response; and where the Response starts in it."""
    out = _dumps(output)[1:]  # (the list without its "[")
    if after_input and output:
        out = b"," + out
    out += b',"response":'
    return out + _dumps(response) + b"}", len(out)


class Store(Protocol):
    """Stored responses, as every backing store offers them (asynchronous; per owner)."""

    fresh_wait: float  # seconds an id not (yet) known may still be on its way from another replica

    async def put(self, response_id: str, items: list, response: dict, *, owner: str = owners.SHARED,
                  expect: int | None = None) -> bool: ...

    async def get(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None: ...  # with its "version"

    # a running response's Response written again, its conversation as it was: ``ResponseStore.renew``
    async def renew(self, response_id: str, response: dict, *, owner: str = owners.SHARED,
                    expect: int, ended: bool = False) -> Renewal | None: ...

    # its Response's brief (background.py ``brief``: status, lease) with its "version": ``ResponseStore.status``
    async def status(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None: ...

    def rebound(self, *, ttl: float, max_entries: int, max_bytes: int) -> None: ...  # new bounds, same entries

    async def delete(self, response_id: str, *, owner: str = owners.SHARED) -> bool: ...

    # whether a DELETE removed it (for ``ttl``; a WebSocket's memory asks before continuing one): ``deleted``
    async def deleted(self, response_id: str, *, owner: str = owners.SHARED) -> bool: ...

    async def items(self, item_ids, *, owner: str = owners.SHARED) -> dict[str, dict]: ...

    async def figures(self, asked) -> Figures: ...  # who fills it (metrics): StateUnavailable when down

    def __len__(self) -> int: ...


class Writes:
    """Writes that run without making a request wait: started at once (``asyncio.Task`` with
    ``eager_start``: a write that needs no I/O, the memory store's, is done when ``start``
    returns, so the next request sees it), the rest as tasks. They never raise: a write that
    fails is a warning naming what was lost (a task's exception would be logged as an ERROR,
    which stops a gateway that is still starting). ``flush`` waits for those still running."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()

    def start(self, what: str, write) -> None:
        task = asyncio.Task(self._guard(what, write), loop=asyncio.get_running_loop(), eager_start=True)
        if not task.done():
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    @staticmethod
    async def _guard(what: str, write) -> None:
        try:
            await write
        except StateUnavailable as exc:
            log.warning(f"resp2chat: {what}: {exc}")
        except Exception as exc:  # noqa: BLE001 — a bug of ours: still no task exception
            log.warning(f"resp2chat: {what}: {type(exc).__name__}: {exc}", exc_info=exc)

    async def landed(self) -> None:
        """Wait for the writes running now (not those started meanwhile)."""
        if self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    async def flush(self) -> None:
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


Key = tuple[str, str]
"""An entry of the memory store: (owner, id). Each owner's ids are apart, as Redis's keys are (a
replayed answer keeps its recorded id: two clients rerunning one recorded turn each keep it)."""


class ResponseStore:
    """The store in this process's memory (and a directory, when given): ``Store``. Its entries
    are keyed by (owner, id) (``Key``); in the directory, one owner's file is ``{id}@{owner}.json``
    (the shared owner's ``{id}.json``, as every file was named before owners were apart: a file so
    named of another owner is renamed when read back)."""

    fresh_wait = 0.0  # (what this process wrote, it knows at once)

    def __init__(self, *, ttl: float, max_entries: int, max_bytes: int, directory: str | None = None, clock=time.time):
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self.clock = clock
        self.dir = Path(directory).expanduser() if directory else None
        # (owner, id) -> (stored at, JSON); a renewed entry's JSON is a bytearray (``renew`` writes its end in place)
        self._entries: OrderedDict[Key, tuple[float, bytes | bytearray]] = OrderedDict()
        self._item_ids: dict[Key, tuple[str, ...]] = {}  # (owner, response id) -> the item ids it holds
        # (owner, item id) -> (its digest as produced, the ids of that owner's responses holding it unchanged,
        # oldest first)
        self._items: dict[tuple[str, str], tuple[str, list[str]]] = {}
        self._deleted: OrderedDict[Key, float] = OrderedDict()  # (owner, id) -> when deleted (``deleted``)
        self._versions: dict[Key, int] = {}  # (owner, id) -> its version (the puts and renewals it has had)
        # (owner, id) -> where its input items end and its Response starts in its JSON (``encode_entry``),
        # and the version its directory file has (a renewal's is beside it: ``renew``)
        self._parts: dict[Key, tuple[int, int, int]] = {}
        self._briefs: dict[Key, dict] = {}  # (owner, id) -> its Response's brief (``status``)
        self._shares = Shares()  # each owner's entries: who loses one past a cap
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

    def rebound(self, *, ttl: float, max_entries: int, max_bytes: int) -> None:
        """New bounds (an option set while it runs): the same entries, past them its oldest go
        (at the next call)."""
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes

    async def put(self, response_id: str, items: list, response: dict, *, owner: str = owners.SHARED,
                  expect: int | None = None) -> bool:
        """Keep a response: ``items`` its whole conversation (inputs, then output), ``response``
        the Response object (its ``output`` are the items it produced). ``expect``: only over
        that version of the entry (``get``'s ``version``; 0: none). False: not kept (another
        version, or larger than the whole store). Another owner's entry of the same id is
        another entry (a replayed answer keeps its recorded id)."""
        key = (owners.check(owner), response_id)
        self._evict()
        version = self._versions.get(key, 0) if key in self._entries else 0
        if expect is not None and expect != version:
            return False
        data, cut, at = encode_entry(items, response)
        if len(data) > self.max_bytes or self.max_entries <= 0:
            return False  # larger than the whole store: keeping it would evict everything else
        self._drop(key)
        now = self.clock()
        self._keep(key, now, data, (cut, at, version + 1))
        held = self._index(key, items, response)
        self._versions[key] = version + 1
        self._briefs[key] = brief(response)
        if self.dir:  # (its version and what it holds, digests: as they were after a restart)
            head = json.dumps({"stored_at": now, "owner": owner, "version": version + 1, "held": held}).encode()[:-1]
            _write_private(self._path(key, ".json"), head + b',"entry":' + data + b"}")
            self._path(key, ".renewal").unlink(missing_ok=True)  # (it renewed the file replaced)
        self._evict(keep=key)
        return True

    async def renew(self, response_id: str, response: dict, *, owner: str = owners.SHARED,
                    expect: int, ended: bool = False) -> Renewal | None:
        """A running response written again (background.py: its status, lease and output so far):
        ``response`` replaces the stored Response, and its ``output`` the output after the
        conversation's input items, which are neither decoded nor encoded again. Only over
        version ``expect``; None: no such entry (deleted, expired, another owner's).

        The items it produced are not indexed for ``item_reference`` (its end does that): the
        response is not over. ``ended``: it is over (the replica that ran it ends it, or one that
        did not: cancelled, or failed once its own died), and its output items are indexed as a
        ``put`` indexes them (those of its conversation it holds were indexed when it was put;
        Redis holds them again from then, as a ``put`` would);
        it is not renewed again after. The directory copy: the Response beside the entry's file
        (``{id}.renewal``, naming the version of the file it renews), which a restart reads over
        that file's and a later ``put`` removes."""
        key = (owners.check(owner), response_id)
        self._evict()
        found = self._entries.get(key)
        if found is None:
            return None
        version, (cut, at, base), data = self._versions.get(key, 1), self._parts[key], found[1]
        if version != expect:
            return Renewal(version, json.loads(data[at:-1]))
        output = response.get("output")
        tail, tail_at = entry_tail(cut > len(b'{"items":['), output if isinstance(output, list) else [], response)
        if cut + len(tail) > self.max_bytes:
            return Renewal(version, too_large=True)
        now = self.clock()
        del self._entries[key]
        self._shares.remove(owner, response_id)
        self.bytes -= len(data)
        # (in place: its input items' bytes are not copied, but once, a put's bytes becoming a bytearray)
        renewed = data if isinstance(data, bytearray) else bytearray(data)
        del renewed[cut:]
        renewed += tail
        self._keep(key, now, renewed, (cut, cut + tail_at, base))
        self._versions[key] = version + 1
        self._briefs[key] = brief(response)
        if ended:
            self._index_output(key, response)
        if self.dir:
            _write_private(self._path(key, ".renewal"), _dumps(
                {"base": base, "version": version + 1, "stored_at": now, "response": response}))
        self._evict(keep=key)
        return Renewal(version + 1)

    async def get(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None:
        if not valid_id(response_id):
            return None
        self._evict()
        key = (owner, response_id)
        found = self._entries.get(key)
        if not found:
            return None
        return {**json.loads(found[1]), "version": self._versions.get(key, 1)}

    async def status(self, response_id: str, *, owner: str = owners.SHARED) -> dict | None:
        """The entry's Response's ``brief`` (status, lease, cancellation asked) and its
        ``version``, without reading the entry; None: no such entry."""
        if not valid_id(response_id):
            return None
        self._evict()
        key = (owner, response_id)
        found = self._briefs.get(key) if key in self._entries else None
        return None if found is None else {**found, "version": self._versions.get(key, 1)}

    async def delete(self, response_id: str, *, owner: str = owners.SHARED) -> bool:
        key = (owner, response_id)
        if not self._drop(key):
            return False
        self._deleted[key] = self.clock()
        while len(self._deleted) > max(self.max_entries, 1):  # (as many as it keeps entries)
            self._deleted.popitem(last=False)
        return True

    async def deleted(self, response_id: str, *, owner: str = owners.SHARED) -> bool:
        """Whether a ``delete`` removed it, within ``ttl`` (a tombstone: what expired or was
        evicted was not deleted). A WebSocket's memory keeps what its turns stored
        (resp2chat_core/websocket.py ``Connection``) and asks this before continuing one, so a
        response deleted over HTTP is not continued from there: one lookup, not a read."""
        cutoff = self.clock() - self.ttl
        while self._deleted and next(iter(self._deleted.values())) < cutoff:
            self._deleted.popitem(last=False)
        return (owner, response_id) in self._deleted

    async def items(self, item_ids, *, owner: str = owners.SHARED) -> dict[str, dict]:
        """The owner's items with these ids, as the gateway produced them (from the newest live
        response holding each); ids not found are absent. Each response's entry is decoded once
        however many it serves."""
        self._evict()
        by_response: dict[str, dict[str, str]] = {}
        for item_id in dict.fromkeys(i for i in item_ids if valid_item_id(i)):
            found = self._items.get((owner, item_id))
            if found and found[1]:
                by_response.setdefault(found[1][-1], {})[item_id] = found[0]
        return {item_id: item for response_id, wanted in by_response.items()
                for item_id, item in pick(json.loads(self._entries[(owner, response_id)][1]), wanted).items()}

    async def figures(self, asked) -> Figures:
        """``Figures`` from what the store keeps as it goes (its owners' shares): O(owners asked)."""
        self._evict()  # (what expired is not counted)
        return ((len(self._entries), self.bytes), {o: self._shares.held(o) for o in {*asked, owners.SHARED}},
                self._shares.forwarded_held())

    def _index(self, key: Key, items: list, response: dict, was_held: dict[str, str] | None = None) -> dict[str, str]:
        """Index what the entry holds: the items its response produced, and those of its
        conversation it holds unchanged (``was_held``, read back from the directory: what it held
        when written, though the response that produced one may be gone since). Returns them
        (id -> digest)."""
        owner, response_id = key
        held: dict[str, str] = {}
        for item_id, item in output_items(response).items():
            held[item_id] = item_digest(item)
        for item_id, digest in (was_held or {}).items():
            held.setdefault(item_id, digest)
        for item_id, digest in held.items():
            found = self._items.get((owner, item_id))
            if found is None or found[0] != digest:
                found = self._items[(owner, item_id)] = (digest, [])
            found[1].append(response_id)
        for item_id, item in held_items(items, held):
            found = self._items.get((owner, item_id))
            if found is not None and item_id not in held and item_digest(item) == found[0]:
                found[1].append(response_id)
                held[item_id] = found[0]
        self._item_ids[key] = tuple(held)
        return held

    def _index_output(self, key: Key, response: dict) -> None:
        """Index the items a renewed response produced (``renew``'s ``ended``), besides what it
        holds already: as ``_index`` indexes a put's."""
        owner, response_id = key
        held = dict.fromkeys(self._item_ids.get(key, ()))
        for item_id, item in output_items(response).items():
            digest = item_digest(item)
            found = self._items.get((owner, item_id))
            if found is None or found[0] != digest:
                found = self._items[(owner, item_id)] = (digest, [])
            if response_id not in found[1]:
                found[1].append(response_id)
            held[item_id] = None
        self._item_ids[key] = tuple(held)

    def _unindex(self, key: Key) -> None:
        owner, response_id = key
        for item_id in self._item_ids.pop(key, ()):
            found = self._items.get((owner, item_id))
            if found is not None and response_id in found[1]:
                found[1].remove(response_id)
                if not found[1]:
                    del self._items[(owner, item_id)]

    def _keep(self, key: Key, now: float, data: bytes, parts: tuple[int, int, int]) -> None:
        self._entries[key] = (now, data)
        self._parts[key] = parts
        self._shares.add(*key, now, len(data))
        self.bytes += len(data)

    def _drop(self, key: Key) -> bool:
        found = self._entries.pop(key, None)
        if found is None:
            return False
        self._versions.pop(key, None)
        self._parts.pop(key, None)
        self._briefs.pop(key, None)
        self._unindex(key)
        self._shares.remove(*key)
        self.bytes -= len(found[1])
        if self.dir:
            self._path(key, ".json").unlink(missing_ok=True)
            self._path(key, ".renewal").unlink(missing_ok=True)
        return True

    def _evict(self, keep: Key | None = None) -> None:
        """Drop what expired (oldest first), then, while over a cap, the oldest entry of the owner
        holding the most (shares.py): never ``keep``, the entry just written."""
        cutoff = self.clock() - self.ttl
        while self._entries:
            oldest, (stored_at, _) = next(iter(self._entries.items()))
            if stored_at >= cutoff:
                break
            self._drop(oldest)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            found = self._shares.victim(COUNT if len(self._entries) > self.max_entries else BYTES, keep)
            if found is None:
                break
            self._drop(found)

    def _path(self, key: Key, suffix: str) -> Path:
        """An entry's file in the directory (``.json``), or its renewal's (``.renewal``)."""
        owner, response_id = key
        return self.dir / f"{response_id}{'@' + owner if owner else ''}{suffix}"

    def _load_dir(self) -> None:
        found = []
        for path in list(self.dir.glob("*_*.json")):  # (resp_… and conv_…: _ID; a list: some are renamed)
            response_id, at, named = path.stem.partition("@")
            if not _ID.match(response_id):
                continue
            try:
                record = json.loads(path.read_bytes())
                held = record.get("held") or {}  # (a file written before these two: none, version 1)
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in held.items()):
                    raise ValueError("held")
                owner = owners.check(record.get("owner", owners.SHARED))
                if owner != named and (at or self._path((owner, response_id), ".json").exists()):
                    raise ValueError("owner")  # (not the owner its name says; or named so before, and there twice)
                key = (owner, response_id)
                if path != self._path(key, ".json"):  # (named as before owners were apart: renamed to its name)
                    if path.with_suffix(".renewal").exists():
                        os.replace(path.with_suffix(".renewal"), self._path(key, ".renewal"))
                    os.replace(path, self._path(key, ".json"))
                stored_at, entry, base = float(record["stored_at"]), record["entry"], int(record.get("version", 1))
                items, response, version = entry["items"], entry["response"], base
                renewed = self._renewal(key, base)
                if renewed is not None:  # (a running response renewed since: its Response, over the file's)
                    new_output = renewed["response"].get("output")
                    items = items[:input_count(items, response)] + (new_output if isinstance(new_output, list) else [])
                    response, version = renewed["response"], int(renewed["version"])
                    stored_at = max(stored_at, float(renewed["stored_at"]))
                if not isinstance(items, list) or not isinstance(response, dict):
                    raise ValueError("entry")
                found.append((stored_at, key, items, response, version, base, held))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                path.unlink(missing_ok=True)  # a torn or foreign file: not ours to keep
                path.with_suffix(".renewal").unlink(missing_ok=True)
        for path in self.dir.glob("*_*.renewal"):  # (one whose entry's file is gone: a drop torn in between)
            if not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)
        for stored_at, key, items, response, version, base, held in sorted(found, key=lambda f: f[:2]):
            data, cut, at = encode_entry(items, response)  # (shares rebuilt too)
            self._keep(key, stored_at, data, (cut, at, base))
            self._versions[key] = version
            self._briefs[key] = brief(response)
            self._index(key, items, response, held)
        self._evict()

    def _renewal(self, key: Key, base: int) -> dict | None:
        """The renewal beside an entry's file (``renew``), if it renews that very file (a ``put``
        after it, torn before it removed the renewal, wrote another: that one is gone)."""
        path = self._path(key, ".renewal")
        try:
            renewed = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            renewed = None
        if not isinstance(renewed, dict) or renewed.get("base") != base or not isinstance(renewed.get("response"), dict):
            path.unlink(missing_ok=True)
            return None
        return renewed


def pick(entry: dict, wanted: dict[str, str]) -> dict[str, dict]:
    """From a stored entry, the items ``wanted`` names (item id -> digest): for each id, the one
    copy in the conversation that is the item as produced (a client may have sent an altered
    copy under the same id alongside it)."""
    found: dict[str, dict] = {}
    for item in entry.get("items", ()):
        iid = item.get("id") if isinstance(item, dict) else None
        if isinstance(iid, str) and iid in wanted and iid not in found and item_digest(item) == wanted[iid]:
            found[iid] = item
    return found


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


class Replays(Protocol):
    """The replay cache's entries, as every backing holds them (asynchronous): this process's
    ``ReplayEntries``, or Redis's (redis_state.py ``RedisReplayCache``). The store addon makes
    the one ``state_store_url`` says (``StoredResponses.replay_cache``)."""

    capacity: int  # entries at most (0: off)
    hits: int
    misses: int

    async def get(self, key: str) -> bytes | None: ...  # None: a miss (Redis down too)

    async def put(self, key: str, entry: bytes) -> bool: ...  # False: not taken (off, too large)

    def resize(self, capacity: int) -> None: ...

    def __len__(self) -> int: ...


class ReplayCounts:
    """What every replay cache shares (this one, redis_state.py ``RedisReplayCache``): its hits
    and misses, and which entries it takes at all."""

    capacity: int
    hits = misses = 0

    def counted(self, found: bytes | None) -> bytes | None:
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def takes(self, entry: bytes) -> bool:
        return self.capacity > 0 and len(entry) <= MAX_ENTRY_BYTES


class ReplayEntries(ReplayCounts):
    """The replay cache in this process's memory (resp2chat_core/replay.py says what an entry
    is): FIFO, ``capacity`` entries of at most ``MAX_ENTRY_BYTES``: ``Replays``."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        return self.counted(self._entries.get(key))

    async def put(self, key: str, entry: bytes) -> bool:
        if not self.takes(entry):
            return False
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return True

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self._entries) > max(capacity, 0):
            self._entries.popitem(last=False)
