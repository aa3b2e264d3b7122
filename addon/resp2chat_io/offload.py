"""Work too big for mitmproxy's one event loop: a large request body decoded in a worker thread
(and a compressed one inflated there: ``inflate``).

mitmproxy runs every hook of every flow on one asyncio loop: while a hook decodes a 25 MB body,
``/healthz`` and every open stream wait. A body of ``LARGE`` bytes or more is decoded in a worker
thread instead (``loads``), with the decoder's Python-level hooks, so that the thread hands the
GIL back between objects (requestbody.py ``yielding``) and the loop goes on meanwhile. It is
decoded with the prefix cache, as a small body is: the history a long conversation resends is
decoded once (requestbody.py "History decoded once"). A body the cache shares all but less than
``LARGE`` bytes of (a long conversation's next turn) is decoded on the loop: only what is new is
decoded, less work than a small body's, and the hop to the thread and back cost more than that
(a 2.5 MB turn: 0.9 ms at best, 5 ms at the median, waiting for the GIL; 0.5 ms on the loop). What a refused request decoded privately
(``requestbody.Private``: the cache shares nothing of it; the cache keeps only what is cheap to
free) is freed there too, container by container (``discard``): freeing a million items takes
about as long as making them.

One worker: large bodies are decoded one after the other, as they were on the loop, so their
peak memory does not add up. Only decoding moves: checking the caps (turn.py ``check_caps``),
validating and lowering stay on the loop (the lowering caches and the store are not
thread-safe), after the caps bounded what they walk.

What a large body's flow leaves behind is freed here too: a ``gc.collect()`` once ``COLLECT``
bytes of large bodies came in since the last (``_reclaim``, each body counted once, where it is
decoded: ``loads`` or ``reduce``): a finished flow is cyclic garbage holding ~3x its body, which
CPython's own collections, counting objects, leave for hundreds of turns. The collection does
not run in the hook of the body that makes it due: it runs once a turn's request is next
written to a backend (``sent``, called by relay/upstream.py; that body's own turn's, unless
another's went first), so the backend reads and prefills while the gateway collects; a body that reaches no backend through the relay (a refusal, a replay-cache
hit, a passthrough, a conversation's items) leaves it due, and the next large body's ``_reclaim``
runs it. What survives a collection is frozen (``gc.freeze``), so the next ones do not walk the
caches again; every ``FULL``-th unfreezes it first, and so does ``_thaw``, ``THAW_SECS`` after
the last collection (what was frozen then would otherwise be kept however long no large body came).

Limit: CPython's JSON decoder gives the GIL up only at those hooks (objects and numbers); a body
that is nothing but millions of empty arrays still holds the loop for the ~1 s its decoding takes.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from concurrent.futures import ThreadPoolExecutor

from resp2chat_core import requestbody

LARGE = 1 << 20  # bytes: a body this large is decoded off the loop
COLLECT = 16 << 20  # bytes of large bodies between two collections of the garbage (``_reclaim``)
FULL = 4  # every FULL-th of them walks what earlier ones froze as well (``_collect``)
THAW_SECS = 60.0  # seconds after the last collection, what it froze is walked again (``_thaw``)

_worker: ThreadPoolExecutor | None = None
_since = 0  # bytes of large bodies decoded since the last collection
_due = False  # a collection is due: it runs at the next ``sent`` (or the next large body's ``_reclaim``)
_collections = 0  # collections made (``_collect``)
_thawing: asyncio.TimerHandle | None = None  # the ``_thaw`` due after the last collection


def _pool() -> ThreadPoolExecutor:
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resp2chat-decode")
    return _worker


async def loads(body: bytes):
    """``requestbody.loads(body)`` (strict JSON, ``GatewayError`` 400 otherwise), off the loop
    when the body is large."""
    if len(body) < LARGE:
        return requestbody.loads(body)
    _reclaim(len(body))
    value = requestbody.PREFIXES.decode(body, new=LARGE)  # (the history decoded before: what is new is small)
    if value is not None:
        return value
    return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(requestbody.loads, body,
                                                                                       yielding=True))


async def inflate(decode, body: bytes, *args):
    """``decode(body, *args)`` (a compressed request body's: addons/gate.py), in the worker: a
    body of a few KiB may inflate to ``max_request_body_mb`` (~50-100 ms of CPU for 32 MiB of
    zeros), which on the loop held every stream and ``/healthz`` (a client's 12 connections
    sending 32 KiB of gzip each: ``/healthz`` 0.7 s at the median). One worker, one body at a
    time (as for JSON), so what they inflate to at once is one body's, not the sum of all."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(decode, body, *args))


def _reclaim(size: int) -> None:
    """A full collection of the cyclic garbage is due once ``COLLECT`` bytes of large bodies came
    in since the last (it runs at ``sent``). A finished flow is unreachable only through reference
    cycles (mitmproxy's ``HttpStream`` and the layers around it, the turn's ``TurnRun``), so only
    the collector frees it and what it holds: ~3x its body (the body, the request's record, the
    chat body). The collector counts objects, not bytes, and a flow lives through the young
    collections its own turn sets off, so it waits for a full one, which CPython runs once the
    objects promoted come to a quarter of the long-lived ones (the full prefix cache: ~150k
    objects, hundreds of flows). Measured (test_prefix_cache.py, 24 sessions of 1.6 MB): without
    this, one full collection in 48 turns and ~2 MB more in use every turn after it; with it,
    flat. A collection still due when the next large body comes (the last one reached no
    backend) runs here, in that body's hook."""
    global _since, _due
    if _due:
        _collect()
    _since += size
    if _since >= COLLECT:
        _since = 0
        _due = True


def sent() -> None:
    """A turn's request was written to its backend (relay/upstream.py): a collection due runs
    now, after the hook or step that wrote it (``call_soon``), while the backend reads and
    prefills it, not before the request left. (The kernel takes a loopback backend's body at
    once; a remote one's tail still buffered waits for the collection.)"""
    if _due:
        asyncio.get_running_loop().call_soon(_collect)


def _collect() -> None:
    """The collection ``_reclaim`` made due, if it still is. Cost: ~120 ms of CPU over the full
    caches, so what survives one is frozen (the next ones walk only what came since: a few ms)
    and every ``FULL``-th walks it all again (garbage that was alive when frozen, a turn in flight
    then, is freed at most ``FULL`` collections later, or ``THAW_SECS`` after the last when no
    more large bodies come) (docs/performance.md, the prefix cache's memory)."""
    global _due, _collections, _thawing
    if not _due:
        return
    _due = False
    _collections += 1
    if _collections % FULL == 0:
        gc.unfreeze()  # (every FULL-th: what was frozen is looked at again, its garbage freed)
    gc.collect()
    gc.freeze()  # (what survived it, the caches above all, is not walked by the next ones)
    if _thawing is not None:
        _thawing.cancel()
    _thawing = asyncio.get_running_loop().call_later(THAW_SECS, _thaw)


def _thaw() -> None:
    """No large body came for ``THAW_SECS`` after the last collection: what it froze is walked
    again (a socket's flow, a mitmweb flow cleared, an addon graph a reload left: garbage since,
    which no later collection would otherwise see), once."""
    global _thawing
    _thawing = None
    gc.unfreeze()
    gc.collect()


async def reduce(body: bytes, fn, keys: bool = False):
    """``fn`` of the body's JSON value (``GatewayError`` if it has none), for a caller that needs
    only something small of it: a large body is decoded privately, reduced and freed in the
    worker, so nothing of its size reaches the loop. ``keys``: ``fn(value, twice)``, ``twice``
    the keys its top-level object names more than once (``requestbody.loads_keys``)."""
    if len(body) < LARGE:
        return fn(*requestbody.loads_keys(body)) if keys else fn(requestbody.loads(body))
    _reclaim(len(body))
    return await asyncio.get_running_loop().run_in_executor(_pool(), _reduce, body, fn, keys)


def _reduce(body: bytes, fn, keys: bool):
    if keys:
        value, twice = requestbody.loads_keys(body, yielding=True)
        args = (value, twice)
    else:
        value = requestbody.loads_private(body)
        args = (value,)
    try:
        return fn(*args)
    finally:
        _empty(value)


async def discard(value, size: int) -> None:
    """Free what a refused body of ``size`` bytes decoded to privately (``value`` is left empty),
    off the loop when the body was large. The caller keeps no other reference into it. A value
    the prefix cache shares is left as it is (the cache holds it, and keeps only what is cheap
    to free)."""
    if size >= LARGE and (isinstance(value, requestbody.Private) or not isinstance(value, dict)):
        await asyncio.get_running_loop().run_in_executor(_pool(), _empty, value)


def _empty(value) -> None:
    """Empty every container of a decoded JSON value one element at a time: a Python loop, so the
    GIL changes hands while a million items are freed."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, list):
            while v:
                x = v.pop()
                if isinstance(x, (list, dict)):
                    todo.append(x)
        elif isinstance(v, dict):
            while v:
                x = v.popitem()[1]
                if isinstance(x, (list, dict)):
                    todo.append(x)
