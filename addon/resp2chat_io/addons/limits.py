"""Limits: each client's ``rpm``, ``tpm`` and ``max_streams``, across replicas.

The rule is resp2chat_core/limits.py (token buckets, as OpenAI's; turns open at once). Where the
state lives is resp2chat_io/limit_state.py: one ``LimitState``, this process's or Redis's (with
``state_store_url``, shared by every replica; this replica's own while Redis is down), which the
store addon picks when the setting changes (``StoredResponses.limit_state``). Nothing here asks
which.

``admit`` is asked once per turn before anything else is done for it (``Turns.admit``: HTTP and
the WebSocket alike, where every message is asked, a warm-up too; reads never); a turn it
admitted is released when it ends (its backend tokens spent from the token bucket), however it
ends, where it was admitted (its ``Ticket``), once.

A limit bounds everything a client makes a backend do, not only turns: the other requests that
reach a backend (``backend_work``: a passthrough that is not a read, such as ``POST
/v1/embeddings``; ``POST /v1/responses/input_tokens``, which asks the backend's tokenizer) are
asked about here, in ``request``, by the same ``admit`` as a turn, before anything else is done
for them: refused, the same 429 as a turn; admitted, one request (``rpm``), open
(``max_streams``) until its answer has ended or its client went away (``response`` /
``error``), and its backend tokens (``tpm``) are the answer's own JSON ``usage``, read as it
passes (``meter``: upstreams.py runs it on the answer; resp2chat_core/limits.py ``Meter``); an
answer without one spent nothing (an endpoint that reports no tokens: rpm bounds it), one its
client left before its end, by its request's size (``usage.estimate``, as a turn cut short).
Reads (``GET /v1/models``…) are never counted, as reads of stored state are not: they make no
model work, and a client such as Codex lists the models while its turns stream.
"""

from __future__ import annotations

import asyncio

from mitmproxy import http

from resp2chat_core import gate as G
from resp2chat_core import limits as L
from resp2chat_core.clients import ClientSpec
from resp2chat_core import usage as U
from resp2chat_io import limit_state
from resp2chat_io.limit_state import Ticket

from .base import META, fails_closed, refusal
from .gate import PASSTHROUGH

READS = frozenset({"GET", "HEAD", "OPTIONS"})  # a passthrough of these makes no model work: not counted


def _limited(client: ClientSpec | None) -> bool:
    return client is not None and (client.rpm is not None or client.tpm is not None or client.max_streams is not None)


def backend_work(flow: http.HTTPFlow) -> bool:
    """A request, not a turn, that makes a backend work: a passthrough that is not a read, or
    ``POST /v1/responses/input_tokens`` (the backend's tokenizer)."""
    req = flow.request
    if (flow.metadata.get(META) or {}).get(PASSTHROUGH):
        return req.method not in READS
    return G.is_input_tokens(req.method, req.path)


@fails_closed
class Limits:
    name = "resp2chat_limits"

    def __init__(self, store, gate=None) -> None:
        self.store = store  # (store.limit_state: where the limits are counted)
        self.gate = gate  # (who a request's client is, as configured now)
        self._open: dict[str, Ticket] = {}  # turn id -> its ticket, until it is released
        self._work: dict[str, tuple[L.Verdict, L.Meter | None]] = {}  # flow id -> an admitted request's (backend_work)
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
        ticket.release(client.tpm if client is not None and client.identity == ticket.key else None, used)

    def finished(self, done) -> None:
        """A turns.py ``finished`` listener: the turn leaves its client's open turns, its backend
        tokens are spent (by the backend's usage; without one, its ``estimate``: a client that
        hangs up before the last chunk, which brings the usage, still spent what the backend did).
        A turn the gateway's tool loop ran spends every round (``work``), not the usage its
        client reads (the last round's prompt): each round's prompt was the backend's work."""
        used = done.work.tokens if done.work is not None else U.tokens(done.usage)
        self.release(done.client, done.turn_id, done.estimate if used is None else used)

    # --- a request that is not a turn (backend_work) -------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay:
            return
        client = self.gate.client((flow.metadata.get(META) or {}).get("client"))
        if not _limited(client) or not backend_work(flow):  # (most requests: no path parsed)
            return
        verdict = await self.admit(client, flow.id)
        if verdict is None:
            return
        if not verdict.admitted:
            flow.metadata.setdefault(META, {})["status"] = "rejected"
            flow.response = refusal(flow, verdict.error(client.name), verdict.headers)
            return
        self._work[flow.id] = (verdict, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        admitted = self._work.get(flow.id)
        if admitted is not None and flow.response is not None:
            # the client's x-ratelimit-*, as a turn's answer has, and only those: a backend's own
            # (its account's, every client's together) would sit beside them, one answer saying
            # the client's rpm and the upstream key's tokens
            headers = flow.response.headers
            for name in [n for n in headers.keys() if n.lower().startswith("x-ratelimit-")]:
                headers.pop(name, None)
            headers.update(admitted[0].headers)

    def meter(self, flow: http.HTTPFlow) -> L.Meter | None:
        """A backend's answer to an admitted request, about to pass through (upstreams.py): what
        reads its usage on the way (None: not one of those)."""
        admitted = self._work.get(flow.id)
        if admitted is None:
            return None
        meter = L.Meter()
        self._work[flow.id] = (admitted[0], meter)
        return meter

    def response(self, flow: http.HTTPFlow) -> None:
        admitted = self._work.pop(flow.id, None)
        if admitted is not None:
            meter = admitted[1]
            self.release(self.gate.client(flow.metadata[META].get("client")), flow.id,
                         (meter.used or 0) if meter is not None else 0)

    def error(self, flow: http.HTTPFlow) -> None:
        """The client went away (or the backend did): a backend answer it left before its end
        (and its usage) is charged by its request's size."""
        admitted = self._work.pop(flow.id, None)
        if admitted is None:
            return
        meter, resp = admitted[1], flow.response
        used = meter.used if meter is not None else None
        if used is None:
            cut = meter is not None and resp is not None and resp.status_code < 400
            used = U.estimate(len(flow.request.raw_content or b"")) if cut else 0
        self.release(self.gate.client(flow.metadata[META].get("client")), flow.id, used)

    async def _heartbeat(self) -> None:
        """Keep this replica's open turns alive where they have a lease (Redis), so only a dead
        replica's stop counting."""
        while True:
            await asyncio.sleep(limit_state.HEARTBEAT)
            await self.store.limit_state.refresh(list(self._open.values()))
