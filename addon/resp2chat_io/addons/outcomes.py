"""Outcomes: how every ``POST /v1/responses`` ended, as one record for metrics and the access log;
and every other request that makes a backend work the gateway refused.

A turn ends in turns.py (a ``finished`` listener: status, usage, the upstream that answered,
time to first token), over HTTP or a Responses WebSocket alike, however it ended: answered, failed
closed (``server_error``), the client gone, answered by offline replay (``replayed``, upstream
``server-replay``). A request answered by the gateway itself ends in ``response``: rejected (4xx:
invalid request, unknown model…), a replay-cache hit, or 503 when the shared state store is down;
so does a turn turns.py could not report (it failed while recording it); a WebSocket message so
answered comes from addons/websocket.py (``emit``). Each becomes one ``Outcome`` for the
``listeners`` (metrics.py, access_log.py); a listener that fails is logged, the others still get
it. Nothing in it is content: no prompt, no answer, no header but the session key.

A request that is not a turn but goes to a backend (``passthrough_paths``: the model list,
embeddings…; ``POST /v1/responses/input_tokens``) ends the same way when the gateway refuses it
(its answer the gateway's, 4xx or 5xx: the gate's 401, a limit's 429, a model the client may not
use, a body it cannot read), as a ``rejected`` outcome (``failed``: a 5xx of its own, such as no
upstream answering the model list) with its ``path`` and ``route`` (the
``passthrough_paths`` entry it matched, or ``POST /v1/responses/input_tokens``: a bounded label).
What the upstream answered is the upstream's (upstreams.py marks the flows it sends there,
``FORWARDED``); a passthrough it served is not reported. One the gateway ended itself once sent
on is (upstreams.py ``ENDED``): its JSON error for a backend that failed before its answer's head
(``failed``: ``upstream_unavailable`` 502, ``upstream_timeout`` 504; ``rejected``:
``invalid_api_key``, its key revoked meanwhile), its 502 for a compressed answer, an answer it
cut because its backend went silent midway (``failed``, ``upstream_timeout``, the head's status). So does an upgrade to the Responses
WebSocket the gateway refused (route ``WEBSOCKET``: the gate's 401, a client's ``max_sockets``
429, the gateway's ``max_websockets`` 503 ``failed``, the transport off…), and a socket the
gateway closed because its key is no longer accepted (addons/websocket.py ``emit``s it once a
socket: ``rejected``, ``invalid_api_key``, HTTP status 101, the upgrade's, and its time open).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

from mitmproxy import http

from resp2chat_core import gate as G
from resp2chat_core.errors import specific_code
from resp2chat_core.labels import shown
from resp2chat_core.turn import session_key

from .base import META, fails_closed, log, request_id
from .turns import NOT_RECORDED, SERVER_REPLAY
from .upstreams import ENDED, FORWARDED, Ended

INPUT_TOKENS = "POST /v1/responses/input_tokens"
WEBSOCKET = "GET /v1/responses"  # an upgrade to the Responses WebSocket, and the socket it opened (a route label)


@dataclass(kw_only=True)
class Outcome:
    """How one request ended (its fields named at every call: several are alike)."""

    request_id: str
    session: str | None
    model: str  # the client's model name ("" when the request could not be read)
    upstream: str  # the upstream that answered (or failed last); "replay-cache"; "" for none
    status: str  # completed | incomplete | failed | unfinished | rejected | replayed
    code: str  # the error code (failed, rejected), the incomplete reason, or ""
    usage: dict | None = None  # the turn's usage, as its client reads it (Responses shape)
    # what the backends reported of it (the metrics count it): its usage, but every round of one
    # the gateway's tool loop ran, summed (each round's prompt again)
    work: dict | None = None
    ttft: float | None = None  # seconds
    took: float = 0.0  # seconds
    http_status: int = 200
    skipped: tuple = ()  # (name, status) of upstreams fallen back from
    client: str = ""  # the configured client that called (clients; "" when the gateway takes no keys)
    mcp_calls: tuple = ()  # (server: its mcp_servers label, outcome) of each MCP call the turn ran
    latency: float | None = None  # seconds from the request to its chat request handed to a backend
    path: str = ""  # a request that is not a turn: its path (bounded); "" for a turn
    route: str = ""  # ... and the passthrough_paths entry it matched, INPUT_TOKENS or WEBSOCKET (a label)
    at: float = field(default_factory=time.time)


@fails_closed
class Outcomes:
    name = "resp2chat_outcomes"

    def __init__(self, gate=None) -> None:
        self.gate = gate  # (its passthrough_paths rules: which requests go to a backend)
        self.listeners: list[Callable[[Outcome], None]] = []
        self._reported: set[str] = set()  # HTTP flows turns.py told us about (until their last hook)

    def finished(self, done) -> None:
        """A turns.py ``finished`` listener."""
        flow, t = done.flow, done.turn.active
        code = done.code
        if not code and t is not None and t.error:
            code = specific_code(t.error)
        elif not code and done.status == "incomplete" and done.final and done.final.get("incomplete_details"):
            code = done.final["incomplete_details"].get("reason") or ""
        status = done.status
        if done.upstream == SERVER_REPLAY and done.code != NOT_RECORDED:  # (answered from a recording)
            status = "replayed"
        if flow.websocket is None:
            self._reported.add(flow.id)
            # (0: the client got no answer)
            http_status = 0 if flow.response is None or flow.error and not done.answer else flow.response.status_code
        else:
            # a WebSocket turn has its own request id (the socket's flow has many) and is a 200 as
            # a streamed HTTP turn would be (the flow's 101 is the socket's)
            http_status = 200
        self.emit(Outcome(request_id=done.turn.ctx.request_id or request_id(flow),
                          session=session_key(done.turn.prompt_cache_key, flow.request.headers),
                          model=done.turn.ctx.model, upstream=done.upstream, status=status, code=code,
                          usage=done.usage, work=done.usage if done.work is None else done.work.usage, ttft=done.ttft, took=done.took, http_status=http_status,
                          skipped=done.skipped, client=done.client.name if done.client is not None else "",
                          mcp_calls=tuple(done.exchange.mcp_calls) if done.exchange is not None else (),
                          latency=done.latency))

    def response(self, flow: http.HTTPFlow) -> None:
        self._local(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._local(flow)

    def _local(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._reported:
            self._reported.discard(flow.id)
            return  # a turn: turns.py reported it (finished)
        req = flow.request
        meta = flow.metadata.get(META) or {}
        turn = bool(meta.get("response_id"))  # (its request is the chat request by now)
        if flow.response is None:
            if meta.get(ENDED) is not None:  # (a passthrough failed before its answer's head: the gateway's error)
                self._other(flow, meta)
            return
        if not turn and (req.method != "POST" or req.path.split("?", 1)[0] not in G.RESPONSES_PATHS):
            self._other(flow, meta)
            return
        # What the request said counts only once the gate let it in (turns.py, the replay cache
        # and the store keep it then, http_turns.note_request): never read from the body of a request
        # the gate refused; and never decoded again here (a refused 30 MB body once is enough).
        known = "responses_request" in meta
        model = meta.get("request_model", "") if known else ""
        pck = meta.get("request_cache_key") if known else None
        resp = flow.response
        took = (resp.timestamp_end or time.time()) - req.timestamp_start
        if meta.get("replay_cache") == "hit":
            status, code, upstream = "replayed", "", "replay-cache"
        else:
            # rejected before it was a turn; or a turn turns.py failed to report (it failed closed
            # while recording it)
            status = ("failed" if resp.status_code >= 400 else "unfinished") if turn else "rejected"
            upstream = meta.get("upstream_name", "") if turn else ""
            code = _error_code(resp)
        self.emit(Outcome(request_id=request_id(flow), session=session_key(pck, req.headers) if known else None,
                          model=model, upstream=upstream, status=status, code=code, took=took,
                          http_status=resp.status_code, client=meta.get("client", "")))

    def _other(self, flow: http.HTTPFlow, meta: dict) -> None:
        """A request that is not a turn: reported when it goes to a backend (a passthrough, the
        token count) and the gateway refused it, or ended it itself once sent on (upstreams.py
        ``ENDED``: its error before the answer's head)."""
        req, resp = flow.request, flow.response
        if flow.is_replay:
            return
        if meta.get(FORWARDED):  # (its path the client's: the request's is the upstream's now)
            ended: Ended | None = meta.get(ENDED)
            if ended is None:
                return  # (the upstream's answer)
            path, status, code, http_status = meta[FORWARDED], ended.status, ended.code, ended.http_status
        else:
            if resp is None or resp.status_code < 400:
                return
            path, code, http_status = req.path.split("?", 1)[0], _error_code(resp), resp.status_code
            status = "rejected" if http_status < 500 else "failed"  # (no upstream answered GET /v1/models)
        upgrade = "websocket" in req.headers.get("upgrade", "").lower() and path in G.RESPONSES_PATHS
        route = WEBSOCKET if upgrade else self._route(req.method, path)
        if route is None:
            return
        end = resp.timestamp_end if resp is not None else None
        self.refused(flow, route, code, http_status, meta.get("client", ""),
                     (end or time.time()) - req.timestamp_start, status, path)

    def refused(self, flow: http.HTTPFlow, route: str, code: str, http_status: int, client: str,
                took: float, status: str = "rejected", path: str | None = None) -> None:
        """A request that was not a turn, refused (or failed) by the gateway: no session, model
        or upstream; its path (``path``, else the request's) cut at ``?`` and bounded (``_other``;
        a WebSocket the gateway closed for its key, ``websocket._close``)."""
        self.emit(Outcome(request_id=request_id(flow), session=None, model="", upstream="", status=status,
                          code=code, took=took, http_status=http_status, client=client,
                          path=shown((flow.request.path if path is None else path).split("?", 1)[0]), route=route))

    def _route(self, method: str, path: str) -> str | None:
        """Which ``passthrough_paths`` entry a request matches (as ``METHOD /path``, ``/path/*``),
        ``INPUT_TOKENS`` for the token count; None: neither (the gateway's own, or no route)."""
        if G.is_input_tokens(method, path):
            return INPUT_TOKENS
        rules = self.gate.rules if self.gate is not None else ()
        if G.route(method, path, rules) is not G.PASSTHROUGH:
            return None
        rule = next(r for r in rules if r.matches_path(path) and r.method in (None, method))
        return f"{rule.method + ' ' if rule.method else ''}{rule.path}{'*' if rule.rest else ''}"

    def emit(self, outcome: Outcome) -> None:
        """Hand ``outcome`` to every listener (also how a request another addon answered itself
        ended: a WebSocket message refused or replayed, addons/websocket.py)."""
        for listener in self.listeners:
            try:
                listener(outcome)
            except Exception as exc:  # noqa: BLE001 — metrics or a log line must not change an answer
                log.warning(f"resp2chat: {getattr(listener, '__qualname__', listener)} failed for "
                            f"{outcome.request_id}: {type(exc).__name__}: {exc}", exc_info=exc)


def _error_code(resp: http.Response) -> str:
    """The ``code`` of an answer's OpenAI error body ("" for none)."""
    try:
        code = (json.loads(resp.content or b"{}").get("error") or {}).get("code") or ""
    except (ValueError, AttributeError, RecursionError):
        code = ""
    return code if isinstance(code, str) else str(code)
