"""Whose stored state is whose: the owner of a turn, of the response it stores, of its cached answer.

Rules of this file:
- Sans-I/O. An owner is a short opaque string; which one a request has is decided in one place
  (``Upstreams.owner_of`` in resp2chat_io/addons/upstreams.py: a configured client's identity, which
  the gate put in the flow's metadata, else from the request as the client sent it), for every path that reads or writes stored state (``POST /v1/responses``, the Responses
  WebSocket, ``GET``/``DELETE /v1/responses/{id}``, the Redis prefetch, the replay cache).
- Another owner's response id, item id or cached answer is exactly an unknown one: the stores
  (store.py, redis_state.py) and the replay cache look up only within the owner.
- An owner never holds a credential: a forwarded ``Authorization`` becomes a digest of it.

Owners:

- ``SHARED`` (``""``): one gateway key, or none: every client is one owner, as before owners.
- ``forward_client_auth``: the backend decides who a client is by the ``Authorization`` the
  gateway forwards, so each credential is its own owner, ``auth-`` + 32 hex digits of its
  SHA-256 (``of_credential``); no credential is one owner too, told apart from every key.
- A configured client (``clients``): its identity's (``of_client``): ``id.`` + the ``id`` its
  entry has (``resp2chat keys add`` writes a random one, ``keys rotate`` keeps it), so a name
  revoked and added again for someone else owns nothing of its former holder's; an entry
  without an ``id`` (written by hand, or before ids) is ``client.`` + its name, as before.
  The two never meet (``id.…``, ``client.…``), whatever the names and ids. The
  ``default`` client (``gateway_api_key``) is ``SHARED``, so one gateway key keeps the owner it
  always had; a client named ``default`` with an id is that id's, as any other.

Kinds (``kind``): ``shared``, ``forwarded`` (``auth-…``), ``client`` (``id.…``, ``client.…``):
what /metrics may show of an owner it does not name (a configured client's owner is shown by
its name; metrics.py, shares.py ``by_client``), never the owner itself.
"""

from __future__ import annotations

import hashlib
import re

SHARED = ""
# safe as a Redis key part (no ':', no space) and a label; as long as ``client.`` and the longest
# name a client may have (64: labels.OPERATOR_NAME; a bound of 64 here failed such a client at
# every request)
_VALID = re.compile(r"[A-Za-z0-9_.-]{0,71}")


def of_credential(authorization: str | None) -> str:
    """The owner of a request whose credential the backend judges: a digest, never the credential."""
    digest = hashlib.sha256(b"resp2chat owner\n" + (authorization or "").encode("utf-8", "surrogateescape"))
    return "auth-" + digest.hexdigest()[:32]


def of_client(name: str, ident: str | None = None) -> str:
    """The owner of a configured client's requests: its identity ``ident`` (clients.py ``id``:
    letters, digits, ``_ -``), else its name (letters, digits, ``_ . -``); ``default`` without an
    id (``gateway_api_key``'s) is ``SHARED``. An id comes first whatever the name: a ``default``
    that ``keys add`` wrote (a gateway without ``gateway_api_key``), revoked and added again for
    someone else, owns nothing of its former holder's, nor what was stored while no key was needed."""
    if ident:
        return check("id." + ident)
    return SHARED if name == "default" else check("client." + name)


def kind(owner: str) -> str:
    """``shared``, ``forwarded`` (a credential's digest) or ``client`` (a client's identity)."""
    return "shared" if owner == SHARED else "forwarded" if owner.startswith("auth-") else "client"


def check(owner: str) -> str:
    """``owner``, or ``ValueError`` if it is not one (a bug: owners come from this module)."""
    if not isinstance(owner, str) or not _VALID.fullmatch(owner):
        raise ValueError(f"not an owner: {owner!r:.80}")
    return owner
