"""Experiment (bench only): large bodies decoded with the prefix cache too.

    .venv/bin/python bench/run.py --paths direct passthrough resp2chat --phases c1 --extra long \\
        --no-replay --interleave 0 --ab bench/experiments/shared_offload.py

resp2chat_io/offload.py decodes a body of 1 MB or more (``LARGE``) in its worker thread, and
empties what it decoded once it is done with it (``_empty``: a refused body, the Redis prefetch).
So such a decode must be private (requestbody.py: ``yielding`` decodes never use the cache):
every turn of a session past 1 MB decodes its whole body again in the worker (~5 ms at 2.5 MB)
and finds its items' models by their marshal bytes (~2 ms), not by identity.

This wrapper decodes large bodies in the worker with the cache (``requestbody.loads``: the
history comes from the cache, the rest is decoded) and never empties a value (``discard`` does
nothing). Not for production as it stands: a refused large body's values are then left to the
garbage collector on the loop, and the Redis prefetch (``offload.reduce``) still empties what it
decodes, which the cache may share. What offload.py would need: ``loads`` with the cache in the
worker (the traced decode hands the GIL over between items); ``discard`` and ``reduce`` emptying
only what a private decode made (``reduce`` can decode privately: it needs a few fields).
"""

import asyncio

import resp2chat
from resp2chat_core import requestbody
from resp2chat_io import offload


async def loads(body: bytes):
    if len(body) < offload.LARGE:
        return requestbody.loads(body)
    return await asyncio.get_running_loop().run_in_executor(offload._pool(), requestbody.loads, body)


async def discard(value, size: int) -> None:
    return None


offload.loads, offload.discard = loads, discard
addons = resp2chat.addons
