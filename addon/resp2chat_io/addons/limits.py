"""Limits: each client's ``rpm``, ``tpm`` and ``max_streams``, across replicas.

The rule is resp2chat_core/limits.py (token buckets, as OpenAI's; turns open at once). Where the
state lives is resp2chat_io/limit_state.py: one ``LimitState``, this process's or Redis's (with
``state_store_url``, shared by every replica; this replica's own while Redis is down), which the
store addon picks when the setting changes (``StoredResponses.limit_state``). Nothing here asks
which.

``admit`` is asked once per turn before anything else is done for it (``Turns.admit``: HTTP and
the WebSocket alike, reads never); a turn it admitted is released when it ends (its backend
tokens spent from the token bucket), however it ends, where it was admitted (its ``Ticket``),
once.
"""

from __future__ import annotations

import asyncio

from resp2chat_core import limits as L
from resp2chat_core.clients import ClientSpec
from resp2chat_io import limit_state
from resp2chat_io.limit_state import Ticket


def _limited(client: ClientSpec | None) -> bool:
    return client is not None and (client.rpm is not None or client.tpm is not None or client.max_streams is not None)


class Limits:
    name = "resp2chat_limits"

    def __init__(self, store) -> None:
        self.store = store  # (store.limit_state: where the limits are counted)
        self._open: dict[str, Ticket] = {}  # turn id -> its ticket, until it is released
        self._beat: asyncio.Task | None = None

    def running(self) -> None:
        if self._beat is None:
            self._beat = asyncio.ensure_future(self._heartbeat())

    def done(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    # --- a turn ------------------------------------------------------------------------------

    async def admit(self, client: ClientSpec | None, turn_id: str) -> L.Verdict | None:
        """Whether ``client`` may start a turn now (None: it has no limits). An admitted turn
        counts as open until ``release``."""
        if not _limited(client):
            return None
        verdict, ticket = await self.store.limit_state.admit(client, turn_id)
        if ticket is not None:
            self._open[turn_id] = ticket
        return verdict

    def release(self, client: ClientSpec | None, turn_id: str, used: int = 0) -> None:
        """A turn ``admit`` admitted is over: it no longer counts as open, and its backend
        tokens (``used``) are taken from the client's token bucket. Again: nothing."""
        ticket = self._open.pop(turn_id, None)
        if ticket is None:
            return
        ticket.release(client.tpm if client is not None and client.name == ticket.client else None, used)

    def finished(self, done) -> None:
        """A turns.py ``finished`` listener: the turn leaves its client's open turns, its backend
        tokens are spent (by the backend's usage; without one, its ``estimate``: a client that
        hangs up before the last chunk, which brings the usage, still spent what the backend did)."""
        u = done.usage or {}
        used = (u.get("input_tokens") or 0) + (u.get("output_tokens") or 0) if u else done.estimate
        self.release(done.client, done.turn_id, used if isinstance(used, int) else 0)

    async def _heartbeat(self) -> None:
        """Keep this replica's open turns alive where they have a lease (Redis), so only a dead
        replica's stop counting."""
        while True:
            await asyncio.sleep(limit_state.HEARTBEAT)
            await self.store.limit_state.refresh(list(self._open.values()))
