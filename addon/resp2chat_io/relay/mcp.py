"""The gateway's MCP client: a turn's sessions with the servers the operator allows, their
listings and tool calls.

The tool loop (resp2chat_core/toolloop.py, mcp.py) decides what runs; this file runs it with the
official MCP SDK (``mcp`` on PyPI: streamable HTTP, or the older HTTP+SSE transport with an
entry's ``transport: sse``), on mitmproxy's event loop: the SDK's anyio
runs on asyncio there (anyio's asyncio backend), so a slow server costs a waiting task, never a
blocked loop.

Sessions: a turn talks to each server over one session (``Sessions``: connect and initialize
once, at the turn's first step on it), which its listing and every call of every round share,
at once when the model asks for several (JSON-RPC requests of one session run side by side),
and which closes when the turn ends: nothing of a server outlives its turn, and a cancelled turn
closes it. The SDK checks a call's result against the tool's output schema, which it takes from
the session's ``tools/list``: a session lists its server's tools once (``Sessions.tools``: the
listing step's first page, or one before the first call of a turn that lists nothing), not once
per call, and the check never lists them itself (``_check_listed_only``: a tool the session did
not list goes unchecked; that listing's failing after a call the server ran lost its result).
So a turn costs a server one initialize, at most one ``tools/list`` (more pages when the server
pages), and its calls. Each step (opening the session included) is whole under the
server's ``timeout_secs`` (``anyio.fail_after``). A session that dies within the turn (its server
went away, or restarted and no longer knows it) is opened again by the next step; a step that
failed on it runs once more on the new one, within the same bound (``Sessions._again``), if none
of its calls ran: a listing; a call whose ``tools/call`` did not run (the connection could not be
made, or the server did not know the session: ``Health.unrun``, by JSON-RPC id; ``_Step.calls``).
A call whose ``tools/call`` the server may have got never does, whatever became of the round's
other requests or of its step's after it, a tool with side effects would run twice; and the dead
session stays open until the steps on it end (one the server runs gets its answer; a request that
could not connect fails alone: ``_unconnected``). The session never asks for the server-to-client
stream (``_Bounded``): the gateway takes no request of a server's and reads no notification.

Bounds: time (``timeout_secs``: the step fails with that said), pages of a listing (``mcp.MAX_PAGES``,
``mcp.MAX_EMPTY_PAGES`` in a row without a tool: a cursor that never ends), what the server sends (``MAX_BODY``
bytes per HTTP answer: its stream is cut there; an SSE answer ``MAX_EVENT`` bytes per event, the
SDK's own bound, however long the stream: the older transport's lasts the session), what is
kept of a result (``max_output_kb``: mcp.output_text) and of a listing (``mcp.MAX_LISTED`` tools,
``mcp.MAX_LISTING`` bytes).
A failing server fails its step, never the turn: a listing gives the client an
``mcp_list_tools`` item with ``error`` and the model no tools of it; a call an ``mcp_call`` item
with ``error``, and the model reads why.

Allowed tools: before a call, ``allowed_tools`` (the operator's, the request's) is checked again
against the server's own listing (``_refused``): a tool allowed as read-only must be so there,
whatever listing the conversation holds (a stateless input's is the client's word).

Secrets: the headers a server gets (the operator's ``headers``, a client's ``headers`` and
``authorization``) go to that server only, are never logged, and are scrubbed from what the server
sends back (``Server.secrets``: from a result, an error, a listing) before it reaches the model, the
client or a record.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import re
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import httpx2

from resp2chat_core import mcp
from resp2chat_core.channel import scrub

MAX_BODY = 8 << 20  # bytes of one HTTP answer of an MCP server (a listing, a result) read at most
MAX_EVENT = 1 << 20  # bytes of one event of an SSE answer (the SDK bounds it; the older transport: its default, the same)
MAX_ERROR = 2000  # characters of a server's error kept (for the item, the model, the log)
TIMED_OUT = -32001  # the error code of a step past timeout_secs (the MCP SDK's own for a request timeout)
RESUME_EVERY = 1.0  # seconds between two resumptions of a session's answers at least (the SDK's default retry)
MAX_ERROR_BODY = 64 << 10  # bytes of a 400 or 404 answer read to tell a lost session from a refused request


class _Warnings(logging.Filter):
    """The SDK's and httpx2's log records as a gateway logs a turn's trouble: an error becomes a
    warning (nothing a request does may log an ERROR: mitmproxy's errorcheck), the chatter below
    a warning (each HTTP request of a session) goes, and so does a record's traceback: its
    exception may quote what the server answered (a parse error quotes the body), which may
    repeat the headers the server got (secrets); the step's failure is logged by the gateway,
    scrubbed (``_why``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = record.stack_info = None
        return record.levelno >= logging.WARNING


_QUIET = ("mcp", "mcp_types", "httpx2", "httpcore2", "httpcore")


def _quiet() -> None:
    """``_Warnings`` on every logger of the SDK and its HTTP client (a logger's filter sees only
    its own records: each gets one), below a warning level for the rest."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".", 1)[0] in _QUIET \
                and not any(isinstance(f, _Warnings) for f in logger.filters):
            logger.addFilter(_Warnings())


class Unread(httpx2.StreamError):
    """An answer not read whole: past ``MAX_BODY``, or cut short (the server's connection broke).
    A ``StreamError``: the SDK fails the one message whose answer it is, with this said (a
    transport error, ``ReadError``, would end the session: every other call on it, running or to
    come, would fail with "Connection closed")."""


class _Capped(httpx2.AsyncByteStream):
    def __init__(self, inner, limit: int) -> None:
        self.inner, self.limit = inner, limit

    async def __aiter__(self):
        seen = 0
        try:
            async for chunk in self.inner:
                seen += len(chunk)
                if seen > self.limit:
                    raise Unread(f"the MCP server's answer is larger than {self.limit >> 20} MiB")
                yield chunk
        except httpx2.TransportError as exc:
            raise Unread(f"the MCP server's answer was cut short ({type(exc).__name__}: {exc})") from exc

    async def aclose(self) -> None:
        await self.inner.aclose()


class Health:
    """How a session's HTTP went (its ``_Bounded`` transport tells): ``dead`` once a request of
    it failed in a way that ends the session (the SDK ends it on any transport error: a server
    that went away; or the server no longer knows the session: it restarted); ``unrun``: the
    JSON-RPC ids of its requests that failed so without running (the connection could not be
    made, or the server refused it for the session it does not know). A step whose every
    ``tools/call`` is one of them (a listing: none) may run again, once, on a new session
    (``Sessions._again``); a step whose ``tools/call`` the server may have got never does (a tool
    with side effects would run twice), also when another request of the session, at once, or of
    the step after its call, ended the session without running. A request that opens the session
    (``_OPENING``) breaks nothing: the session is not one yet."""

    def __init__(self) -> None:
        self.dead = False
        self.unrun: set = set()

    def broke(self, rid, unrun: bool) -> None:
        self.dead = True
        if unrun and rid is not None:
            self.unrun.add(rid)


class _Step:
    """A step's own requests on a session: ``calls``, the JSON-RPC ids of the ``tools/call``
    requests it sent (what may not run twice; a listing may: it changes nothing). Not only the
    last request it sent: the SDK may send more of the same step after a call (a listing, and the
    call once more, after a call the server refused for a stale listing: ``HEADER_MISMATCH``), and
    their failing says nothing of the call. The SDK sends a
    request in the context of the task that asks for it (``ContextSendStream``), so the transport
    finds the step there (``_STEP``) and tells it."""

    def __init__(self) -> None:
        self.calls: set = set()


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("resp2chat_mcp_step", default=None)


def _rpc(request) -> tuple:
    """The JSON-RPC id and method of a POSTed request (None for the id: a notification, or not
    JSON-RPC)."""
    try:
        message = json.loads(request.content)
    except (ValueError, RecursionError, httpx2.RequestNotRead):
        return None, None
    if not isinstance(message, dict):
        return None, None
    rid = message.get("id")
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None, message.get("method")


class _Bounded(httpx2.AsyncBaseTransport):
    """httpx2's transport, each answer's body read up to ``MAX_BODY`` bytes; but an SSE stream,
    whose every event the SDK bounds itself (``MAX_EVENT``): it is not one answer but many (the
    older transport's carries every answer of the session).

    ``health``: what becomes of the session (``Health``). ``streamable``: a streamable HTTP
    session, whose optional server-to-client stream (a GET without ``Last-Event-ID``) is answered
    405 here, never asked of the server: the gateway takes no request of a server's (it offers no
    sampling, elicitation or roots) and reads no notification, and a server that ends that stream
    at once, ``retry: 0``, had the SDK open it again as fast as it could for the whole turn. (A
    GET with ``Last-Event-ID`` resumes a call's answer: it goes to the server, ``RESUME_EVERY``
    seconds after the one before at the soonest, whatever ``retry`` the server asked for: a server
    that ends each resumption at once with ``retry: 0`` had the SDK ask ~300 times a second until
    the call's ``timeout_secs``.) The ``DELETE`` that ends a session that is dead already is not
    sent either."""

    def __init__(self, health: Health | None = None, streamable: bool = False) -> None:
        self.inner = httpx2.AsyncHTTPTransport(trust_env=False)
        self.health, self.streamable = health, streamable
        self.resumed = -math.inf  # (when the last resumption was asked: anyio's clock)

    async def handle_async_request(self, request):
        if self.streamable and request.method == "GET":
            if "last-event-id" not in request.headers:
                return httpx2.Response(405, request=request)
            wait = self.resumed + RESUME_EVERY - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
            self.resumed = anyio.current_time()
        if self.health is not None and self.health.dead and request.method == "DELETE":
            return httpx2.Response(204, request=request)  # (a session that ended is not ended again: its server is
            # gone, or no longer knows it)
        rid, method = _rpc(request) if request.method == "POST" else (None, None)
        step = _STEP.get()
        if step is not None and rid is not None and method == "tools/call":
            step.calls.add(rid)
        try:
            response = await self.inner.handle_async_request(request)
        except httpx2.TransportError as exc:
            unsent = isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout))
            if self.health is not None and method not in _OPENING:  # (a request that could not connect was
                self.health.broke(rid, unsent)  # not sent; one that opens the session fails its opening)
            if unsent and self.streamable and rid is not None and method != "initialize":
                return _unconnected(request, rid, exc)  # (the SDK fails that request alone)
            raise  # (the SDK ends the session: every request on it fails)
        if not response.headers.get("content-type", "").lower().startswith("text/event-stream"):
            response.stream = _Capped(response.stream, MAX_BODY)
            if self.health is not None and response.status_code in (400, 404) and request.method == "POST" \
                    and "mcp-session-id" in request.headers:
                body = await _read(response, MAX_ERROR_BODY)
                if not _answers(body, request):  # the server does not know the session (a 404, the spec's; a
                    self.health.broke(rid, True)  # 400, many servers'): it ran nothing
                response.stream = httpx2.ByteStream(body)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


_OPENING = ("initialize", "server/discover")  # the requests that open a session: before it is one, the
# session is not ``Health.broke`` by their failing (it fails to open, or, a ``server/discover`` that could not
# connect answered ``_unconnected``, the SDK falls back to ``initialize``, and a session that opens is whole)


def _unconnected(request, rid, exc: Exception) -> httpx2.Response:
    """A request of a session that could not connect, answered here with a JSON-RPC error naming
    it (503): the SDK fails that request alone, where a transport error would end the session
    and fail every other request on it, one the server has and may answer included."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return httpx2.Response(503, request=request, json={"jsonrpc": "2.0", "id": rid, "error": {
        "code": -32000, "message": f"could not connect to the server ({text})"}})


async def _read(response, limit: int) -> bytes:
    """The answer's body, up to ``limit`` bytes (b"" for one that breaks or is larger)."""
    body = bytearray()
    try:
        async for chunk in response.stream:
            body += chunk
            if len(body) > limit:
                return b""
    except (httpx2.HTTPError, httpx2.StreamError):  # (Unread: cut short)
        return b""
    finally:
        await response.stream.aclose()
    return bytes(body)


def _answers(body: bytes, sent) -> bool:
    """Is ``body`` a JSON-RPC answer (an error) to the request ``sent`` (httpx2's), by its id: the
    server read the request, and refused it (the session goes on)?"""
    try:
        answer, request = json.loads(body), json.loads(sent.content)
    except (ValueError, RecursionError, httpx2.RequestNotRead):  # (RecursionError: JSON nested too deep)
        return False
    return isinstance(answer, dict) and isinstance(request, dict) and answer.get("id") is not None \
        and answer.get("id") == request.get("id")


@asynccontextmanager
async def _session(server: mcp.Server, health: Health):
    """One short MCP session with ``server``: connected and initialized, closed on the way out;
    ``health`` says how its HTTP goes."""
    from mcp.client import Client  # (the SDK is imported on a gateway's first MCP step, not at its start)
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import Implementation

    _quiet()  # (each time: the SDK makes some of its loggers as it goes)
    timeout = server.spec.timeout_secs
    sse = server.spec.transport == "sse"
    async with AsyncExitStack() as stack:
        if sse:  # the older transport: the SDK makes its client with ours
            transport = sse_client(server.spec.url, headers=server.headers(), timeout=timeout,
                                   sse_read_timeout=timeout,
                                   httpx_client_factory=lambda **kw: _http(**kw, transport=_Bounded(health)))
        else:
            http = await stack.enter_async_context(_http(server.headers(), httpx2.Timeout(timeout),
                                                         transport=_Bounded(health, streamable=True)))
            transport = streamable_http_client(server.spec.url, http_client=http, max_sse_event_size=MAX_EVENT)
        client = await stack.enter_async_context(Client(
            transport, cache=None, client_info=Implementation(name="resp2chat", version="1"),
            read_timeout_seconds=timeout, mode="legacy" if sse else "auto"))
        _check_listed_only(client.session)
        yield client


def _check_listed_only(session) -> None:
    """The SDK's session (``ClientSession``), whose check of a call's result against the tool's
    output schema (``validate_tool_result``, which ``call_tool`` runs once the server answered)
    runs only for a tool the session has listed: it never lists the tools itself.

    The SDK's check, for a tool its session's listings lack (one on a page after the first the
    session asked, a tool of a session whose listing failed, one no page lists), sends a
    ``tools/list`` first; and that request's failing (the server restarted and no longer knows the
    session: a 404; it fails its listings; it does not answer within ``timeout_secs``) failed the
    call: a call the server ran, its side effects done, reached the model as failed, its result
    lost. Checked here only against what the session listed, a call the server ran always ends
    with its result (or its tool error); a result that breaks the output schema of a tool listed
    still fails (``_schema_error`` says why, and that the server ran it: it broke its own contract).

    Why this and not the alternatives: sending the ``tools/call`` ourselves (``send_request``)
    would leave the SDK's call path, which does more than send it (the ``Mcp-Name`` and
    ``Mcp-Param-*`` headers, a call the server refuses for a stale listing, ``HEADER_MISMATCH``, sent
    again after a listing, input-required rounds, extension results); listing every page once per
    session would cost every server every page of its tools each turn, and would still leave the
    SDK listing after a call when the listing failed, was cut (``mcp.MAX_LISTED``, ``_paged_out``)
    or lacks the tool. The SDK's listing after a call asked its first page only, so a tool on a
    later page was never checked by it either: no check is lost but those of a session whose own
    listing failed. (What the session listed: the SDK's own ``_tool_output_schemas``, every page it
    absorbed, a private name of mcp 2.3's: a later SDK without it has no result checked, never one
    lost; tests/test_mcp_hostile.py's output schema test fails then.)"""
    check = session.validate_tool_result

    async def validate_tool_result(name: str, result) -> None:
        if name not in getattr(session, "_tool_output_schemas", ()):
            return
        try:
            await check(name, result)
        except RuntimeError as exc:
            raise _schema_error(name, exc) from None

    session.validate_tool_result = validate_tool_result


def _schema_error(name: str, exc: RuntimeError) -> Exception:
    """The SDK's error for a result that breaks its tool's output schema (or a schema that is not
    one) as the call's: the schema error's own line (jsonschema's ``message``, where in the
    result: ``json_path``), said to be a call the server ran (the model is not to take it for one
    that did not run). Not the SDK's text, which adds the schema and the result's part pretty-
    printed, a long string split across lines: a secret the server repeats there, split, is not
    whole for ``_why`` to scrub."""
    cause = exc.__cause__ or exc.__context__
    message = getattr(cause, "message", None)
    if not isinstance(message, str):
        return exc  # (no structured content quoted: a result without any, a $ref that does not resolve)
    path = getattr(cause, "json_path", None)
    where = f" (at {path})" if isinstance(path, str) and path != "$" else ""
    what = "the tool's output schema is not a JSON Schema" if type(cause).__name__ == "SchemaError" \
        else "its result breaks the tool's output schema"
    return OutputSchemaError(f"the server ran the call, but {what}: tool {name}: {message}{where}")


class OutputSchemaError(RuntimeError):
    """A call's result that breaks its tool's output schema (``_schema_error``)."""


def _http(headers=None, timeout=None, auth=None, transport=None) -> httpx2.AsyncClient:
    """The HTTP client a step talks to its server with: answers bounded (``_Bounded``), no proxy
    from the environment (the configured URL is where it goes), redirects the SDK's rule."""
    return httpx2.AsyncClient(headers=headers, timeout=timeout, auth=auth, transport=transport or _Bounded(),
                              trust_env=False)


_HELD: set[asyncio.Task] = set()  # the tasks holding sessions open (a strong reference until they end)


def retrieve(future: asyncio.Future) -> None:
    """(A future nobody may wait for any more: its exception is not "never retrieved".)"""
    if not future.cancelled():
        future.exception()


class _Held:
    """One server's session of a turn, held open by a task of its own (anyio's scopes are left in
    the task that entered them): connected and initialized within the server's ``timeout_secs``,
    then open until ``stop``. ``health``: how its HTTP goes (``Health``)."""

    def __init__(self, server: mcp.Server) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future = loop.create_future()  # the SDK's client, once initialized
        self.ready.add_done_callback(retrieve)
        self.stop = asyncio.Event()
        self.health = Health()
        self.steps = 0  # the steps on it now
        self.retired = False  # a new session took its place: it ends once no step is on it
        self.listing: asyncio.Future | None = None  # the session's tools/list (its first page)
        self.task = loop.create_task(self._hold(server))
        _HELD.add(self.task)
        self.task.add_done_callback(_HELD.discard)

    async def _hold(self, server: mcp.Server) -> None:
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + server.spec.timeout_secs) as scope:
                async with _session(server, self.health) as client:
                    scope.deadline = math.inf  # (the bound is on connecting; each step has its own)
                    self.ready.set_result(client)
                    await self.stop.wait()
            if not self.ready.done():
                self.ready.set_exception(TimeoutError())
        except BaseException as exc:  # noqa: BLE001 — a session that fails fails the steps on it, not the turn
            if not self.ready.done():
                self.ready.set_exception(exc if isinstance(exc, Exception) else ConnectionError(type(exc).__name__))
            if isinstance(exc, asyncio.CancelledError):
                raise

    @property
    def ended(self) -> bool:
        """The session is no more: it failed or ended, or its HTTP broke (``Health.dead``)."""
        return self.task.done() or self.health.dead

    def lost_unrun(self, step: _Step | None) -> bool:
        """The session opened, then ended, and none of ``step``'s calls ran: each ``tools/call`` it
        sent is one of ``Health.unrun`` (or it sent none: a listing, a call that failed before it
        was sent): the step, failed on it, may run again on a new one. (A listing's request the
        server may have got does not count: a step's own listing, a page, the SDK's after a call,
        the session's one listing, ``_Held.listing``, which another step may have sent.)"""
        return self.health.dead and (step is None or step.calls <= self.health.unrun) \
            and self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None


class Sessions:
    """A turn's MCP sessions: one per server (by the request's label for it), opened by the
    turn's first step on it, shared by the steps after (at once too), closed by ``close`` when
    the turn ends. A session that failed or ended (its server went away, or restarted and no
    longer knows it) is opened again by the next step; a step that failed as its session ended,
    none of its calls run (``_Held.lost_unrun``), runs again, once, on a new one (``_again``): a
    server restarted between two steps of a turn costs them a new session, nothing more. An ended
    session is left (``stop``) once no step is on it (``_Held.steps``), or when the turn ends."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._retired: list[_Held] = []  # (sessions that ended, a new one in their place)

    def _get(self, server: mcp.Server) -> _Held:
        held = self._held.get(server.label)
        if held is None or held.ended:
            if held is not None:  # (an ended session's task leaves it once no step is on it: a step's
                held.retired = True  # request the server has may still be answered, the session's other requests
                self._retired.append(held)  # having failed: one that could not connect, one its server refused)
                if not held.steps:
                    held.stop.set()
            held = self._held[server.label] = _Held(server)
        return held

    async def _again(self, server: mcp.Server, step):
        """``step(held)`` on the server's session; once more on a new session if it failed as
        the session it ran on ended without running any of its calls (``_Held.lost_unrun``: the
        step's ``tools/call`` requests are told to it, ``_STEP``)."""
        for again in (False, True):
            held, mine = self._get(server), _Step()
            token = _STEP.set(mine)
            held.steps += 1
            try:
                return await step(held)
            except Exception:
                if again or not held.lost_unrun(mine):
                    raise
            finally:
                _STEP.reset(token)
                held.steps -= 1
                if held.retired and not held.steps:
                    held.stop.set()

    async def client(self, server: mcp.Server):
        """The SDK's client of the server's session (opened now if need be)."""
        return await asyncio.shield(self._get(server).ready)

    async def tools(self, server: mcp.Server, held: _Held | None = None):
        """The first page of the server's ``tools/list``, asked once per session (again only if
        it failed): the listing step's, and what the SDK checks call results against (with any
        page after it a step asked: ``_check_listed_only``)."""
        held = held or self._get(server)
        client = await asyncio.shield(held.ready)
        if held.listing is None or (held.listing.done() and (held.listing.cancelled() or held.listing.exception())):
            held.listing = asyncio.ensure_future(client.list_tools())
            held.listing.add_done_callback(retrieve)
        return await asyncio.shield(held.listing)

    def close(self) -> None:
        """The turn ended: every session closes (its task leaves it: the SDK ends the session)."""
        for held in (*self._held.values(), *self._retired):
            held.stop.set()
        self._held.clear()
        self._retired.clear()


async def list_tools(server: mcp.Server, sessions: Sessions) -> tuple[tuple[dict, ...] | None, str | None]:
    """The server's tools the request allows (``mcp.listed_tool`` dicts), or (None, why it failed):
    at most ``mcp.MAX_LISTED`` listed and ``mcp.MAX_LISTING`` bytes of allowed tools kept (the
    pages after are not asked for), at most ``mcp.MAX_PAGES`` pages, ``mcp.MAX_EMPTY_PAGES`` of them
    in a row without a tool (``_paged_out``), the server's secrets scrubbed from them (``_scrubbed``)."""
    secrets = server.secrets()

    async def listing(held: _Held) -> tuple[dict, ...]:
        listed, seen, size = [], 0, 0
        page = await sessions.tools(server, held)
        pages = [len(page.tools)]  # (the tools of each page asked)
        while True:
            for tool in page.tools[:mcp.MAX_LISTED - seen]:
                annotations = tool.annotations.model_dump(by_alias=True, exclude_none=True) \
                    if tool.annotations else None
                found = mcp.listed_tool(*_scrubbed([tool.name, tool.description, tool.input_schema, annotations],
                                                   secrets))  # (before its description is cut)
                if server.allows(found["name"], mcp.read_only(found)):
                    size += len(_encode(found))
                    if size > mcp.MAX_LISTING:
                        break
                    listed.append(found)
            seen += len(page.tools)
            if not page.next_cursor or seen >= mcp.MAX_LISTED or size > mcp.MAX_LISTING:
                break
            if _paged_out(pages):
                if not seen:
                    raise PagedOut(f"tools/list sent {len(pages)} pages without a tool, each naming a next one (a "
                                   "cursor that never ends): the listing stops there")
                break
            page = await (await asyncio.shield(held.ready)).list_tools(cursor=page.next_cursor)
            pages.append(len(page.tools))
        return tuple(listed)

    try:
        with anyio.fail_after(server.spec.timeout_secs):
            return await sessions._again(server, listing), None
    except PagedOut as exc:
        return None, f"MCP server {server.spec.label}: {exc}"
    except BaseException as exc:  # noqa: BLE001 — anything a server does fails its listing, not the turn
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            raise
        return None, _why(server, exc)


class PagedOut(Exception):
    """A listing that ends in no tool: its server paged ``mcp.MAX_EMPTY_PAGES`` times in a row
    (or ``mcp.MAX_PAGES`` times) without one."""


def _paged_out(pages: list[int]) -> bool:
    """Are no more pages of a listing to be asked for (``pages``: the tools of each page so far)?
    After ``mcp.MAX_PAGES`` pages, or ``mcp.MAX_EMPTY_PAGES`` in a row without a tool: a server
    whose cursor never ends."""
    empty = len(pages) - next((i + 1 for i in range(len(pages) - 1, -1, -1) if pages[i]), 0)
    return len(pages) >= mcp.MAX_PAGES or empty >= mcp.MAX_EMPTY_PAGES


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _scrubbed(value, secrets: tuple[bytes, ...]):
    """``value`` (a listed tool, a result's content: JSON values) with ``secrets`` scrubbed from
    each string of it."""
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub(value.encode("utf-8", "surrogatepass"), secrets).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_scrubbed(k, secrets): _scrubbed(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, secrets) for v in value]
    return value


async def call_tool(server: mcp.Server, name: str, arguments: str,
                    sessions: Sessions) -> tuple[str | None, dict | None]:
    """Run ``name`` with ``arguments`` (JSON text): (its output, None) or (None, its error as an
    ``mcp_call`` item holds it)."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError as exc:
        return None, {"type": "mcp_protocol_error", "code": -32602,
                      "message": f"the model's arguments are not JSON: {exc}"}
    if not isinstance(args, dict):
        return None, {"type": "mcp_protocol_error", "code": -32602,
                      "message": "the model's arguments are not a JSON object"}
    limit = server.spec.max_output_kb << 10

    async def call(held: _Held):
        client = await asyncio.shield(held.ready)
        try:  # (the session's one listing, before its calls: the output schemas results are checked against)
            page = await sessions.tools(server, held)
        except Exception:  # noqa: BLE001 — not the call's (its result goes unchecked), unless the session is lost
            if held.lost_unrun(_STEP.get()):
                raise
            page = None
        refused = await _refused(server, name, page, client)
        if refused is not None:
            return refused
        return await client.call_tool(name, args)

    try:
        with anyio.fail_after(server.spec.timeout_secs):
            result = await sessions._again(server, call)
            if isinstance(result, str):
                return None, {"type": "mcp_protocol_error", "code": -32602, "message": result}
    except BaseException as exc:  # noqa: BLE001 — anything a server does fails its call, not the turn
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            raise
        code = TIMED_OUT if isinstance(exc, TimeoutError) else getattr(exc, "code", None)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int):
            return None, {"type": "http_error", "code": status, "message": _why(server, exc)}
        return None, {"type": "mcp_protocol_error", "code": code if isinstance(code, int) else -32603,
                      "message": _why(server, exc)}
    secrets = server.secrets()  # (scrubbed before the output is cut: a secret across the cut stays whole)
    content = [_scrubbed(block.model_dump(by_alias=True, exclude_none=True), secrets) for block in result.content or ()]
    output = mcp.output_text(content, _scrubbed(result.structured_content, secrets), limit)
    if result.is_error:
        return None, {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": output}]}
    return output, None


async def _refused(server: mcp.Server, name: str, page, client) -> str | None:
    """Why ``allowed_tools`` (the operator's, the request's) refuses the call, or None. A tool
    allowed as read-only is so by the server's own listing (``readOnlyHint``), not the one the
    conversation holds: that one may be the client's word (an ``mcp_list_tools`` item of a
    stateless input). Not found (or the listing failed): not read-only."""
    if server.allows(name, False):
        return None
    found, seen, pages = None, 0, [len(page.tools)] if page is not None else []
    while page is not None and found is None:
        found = next((t for t in page.tools if t.name == name), None)
        seen += len(page.tools)
        if found is not None or not page.next_cursor or seen >= mcp.MAX_LISTED or _paged_out(pages):
            break
        page = await client.list_tools(cursor=page.next_cursor)
        pages.append(len(page.tools))
    annotations = found.annotations.model_dump(by_alias=True, exclude_none=True) \
        if found is not None and found.annotations else None
    if server.allows(name, mcp.read_only({"annotations": annotations})):
        return None
    return (f"MCP server {server.spec.label}: {name[:200]!r} is not a tool allowed_tools (the request's or the "
            "operator's) allows: the server does not list it as read-only")


# what a validation error (pydantic's) quotes of its input: of the server's answer, cut in the middle,
# so a secret it repeats is not whole there and scrubbing would not find it
_EXCERPT = re.compile(r"input_value=.{0,160}, input_type=")  # (bounded: pydantic's excerpt is ~50 characters)
_URL = re.compile(r"for url '[^']*'")  # (httpx's HTTPStatusError names the URL it asked: the operator's, a secret in it)


def _why(server: mcp.Server, exc: BaseException) -> str:
    """A failure as the item, the model and the log may show it: no header of the server's, no
    excerpt of its answer (``_EXCERPT``), not its configured url (the client is not shown where
    the server is, nor a key its url may hold: its label names it)."""
    if isinstance(exc, TimeoutError):
        return f"the MCP server {server.spec.label} did not answer within {server.spec.timeout_secs} s (timeout_secs)"
    inner = _innermost(exc)
    text = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
    text = _EXCERPT.sub("input_value=…, input_type=", text[:MAX_ERROR << 4]).replace(server.spec.url, "its url")
    text = f"MCP server {server.spec.label}: {_URL.sub('for its url', text)}"
    secrets = server.secrets()  # (scrubbed before it is cut: a secret across the cut stays whole)
    return _scrubbed(text, secrets)[:MAX_ERROR]


def _innermost(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (anyio's task groups wrap what failed)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
