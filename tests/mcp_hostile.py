"""A misbehaving MCP server (streamable HTTP, spoken by hand: the SDK's own server cannot be made
to break the protocol) for the hosted MCP tests: ``Hostile`` served by ``helpers.LocalServer``,
one behaviour per path, ``/<mode>/mcp``. ``initialize`` and the notifications are answered
properly in every mode; what a mode changes is ``tools/list`` or ``tools/call`` of its tool ``say``
(its tool ``small`` answers "said", after 0.5 s, in every mode that lists it):

    ok          one tool ``say`` that answers "said"
    echo_auth   ``say``'s description and result repeat the headers the server got
    hang        a call is never answered (the connection is held until the client leaves)
    drip        a call's SSE stream sends a comment every 0.1 s and never its result
    garbage     a call is answered 200 application/json with bytes that are not JSON
    echo_garbage  the same, the values of the headers x-client-key and x-operator-key
    straddle    a call's result has the value of x-client-key across its first 64 KiB, the
                description of ``say`` across its first 4096 characters, a call of its tool ``err``
                fails with it across the first 2000 characters of the error the gateway writes
    wrong_id    a call is answered with a JSON-RPC id it did not have
    cut         a call's SSE stream is cut mid-event
    cut_json    a call's JSON answer is cut short
    huge        a call is answered with a body past the gateway's 8 MiB bound
    fat_pages   ``tools/list`` pages for ever: each page 7 tools of 1 MiB (a long description,
                a long schema)
    empty_pages ``tools/list`` pages for ever: each page no tool
    empty_tail  ``tools/list``'s first page lists ``say`` and ``small``, and names a next page: it, and
                every one after, lists no tool and names a next one
    bad_list    ``tools/list`` is answered with a JSON-RPC error (its message: two lines)
    redirect    every request is answered 307 to ``ok`` at another origin (localhost for 127.0.0.1)
    hang_init   nothing is answered (the session never opens)
    mixed       a call of a tool named as a mode misbehaves as that mode's ``say`` (``small``: answers)
    legacy      the older HTTP+SSE transport (``/legacy/sse``): a call answers 900 KiB of text
    retry0      the server-to-client stream (a GET) is answered ``retry: 0`` and closed at once
    resume0     a call's SSE answer (and each GET that resumes it) is an event id, ``retry: 0``, and
                its end: never the result
    refuse400   a session (an mcp-session-id); a call of ``say`` is answered HTTP 400 with a JSON-RPC
                error naming its id (the server read it and refused it)
    proxy400    a session; a call of ``say`` is answered HTTP 400 text/html, no JSON-RPC (a proxy's: the
                gateway takes it for a session the server does not know); of its tool ``cut``, after
                0.5 s, as ``cut``'s
    one_conn    a session; every answer but the listing's closes its connection, and the server stops
                listening (it takes no new connection) before it answers ``tools/list``: a round's first
                call runs on the listing's kept-alive connection (``say``: answers "said" after 1 s),
                the others cannot connect (one ``Hostile`` server per such test)
    paged404    a session; ``tools/list`` pages: its first page lists ``small``, its second ``say``; a
                call is answered, and from then on the server does not know the session: every
                request of it is answered 404, a JSON-RPC error with no id (a server that restarted)
    paged_err   a session; ``tools/list`` pages as ``paged404``'s; once a call of the session is answered,
                every ``tools/list`` of it is answered with a JSON-RPC error
    paged_hang  the same, every ``tools/list`` after a call is never answered
    schema      ``say`` and ``good`` declare an output schema (an object with an integer ``n``):
                ``say`` answers structured content that breaks it (``n`` a string), ``good`` content
                that keeps it (``n``: 7), ``echo`` ``n`` the value of x-client-key after 50 a's and a ``"``; ``unschema``'s
                schema is not a JSON Schema (its ``n`` of type 5)

``Hostile.calls`` counts the ``tools/call`` requests by mode (for the tests that check what ran),
``Hostile.gets`` the GET requests (a server-to-client stream asked for), ``Hostile.inits`` the
``initialize`` requests (the sessions opened), ``Hostile.runs`` the calls by (mode, tool),
``Hostile.forgotten`` the sessions a ``paged404`` server no longer knows, ``Hostile.called`` the sessions
of ``paged_err`` and ``paged_hang`` a call was answered on."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections import Counter

from helpers import QuietHandler

HOLD = 20  # seconds a hanging answer holds its connection at most (a test's bound: never a leak)


def _tool(name: str = "say", description: str = "says something") -> dict:
    return {"name": name, "description": description, "inputSchema": {"type": "object", "properties": {}}}


class Hostile(QuietHandler):
    calls: Counter = Counter()
    gets: Counter = Counter()
    inits: Counter = Counter()
    runs: Counter = Counter()
    forgotten: set = set()
    called: set = set()
    seen_headers: list[dict] = []

    def _json(self, obj, status: int = 200, headers: dict | None = None, kind: str = "application/json") -> None:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        if (headers or {}).get("connection") == "close":
            self.close_connection = True
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _sse_head(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.close_connection = True
        self.end_headers()

    def _hold(self, write=None) -> None:
        end = time.monotonic() + HOLD
        try:
            while time.monotonic() < end:
                if write is not None:
                    write()
                time.sleep(0.1)
        except OSError:
            pass
        self.close_connection = True

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # (the gateway left: what a test of a hanging server makes it do)
            pass

    def do_GET(self):
        if self.path.startswith("/legacy/sse"):
            return self._legacy_stream()
        mode = self.path.strip("/").split("/")[0]
        type(self).gets[mode] += 1
        if mode == "resume0" and self.headers.get("last-event-id"):
            return self._resume0()
        if mode == "retry0":  # (reconnect at once, says the server, and ends the stream)
            self._sse_head()
            self.wfile.write(b"retry: 0\n\n")
            return
        self.send_response(405)  # (streamable HTTP's optional server-to-client stream: not offered)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_DELETE(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    # the older HTTP+SSE transport: a GET stream that carries every answer, messages POSTed
    streams: dict[str, queue.Queue] = {}

    def _legacy_stream(self) -> None:
        sid = uuid.uuid4().hex
        answers = type(self).streams[sid] = queue.Queue()
        self._sse_head()
        try:
            self.wfile.write(f"event: endpoint\ndata: /legacy/messages?session_id={sid}\n\n".encode())
            self.wfile.flush()
            end = time.monotonic() + HOLD
            while time.monotonic() < end:
                try:
                    answer = answers.get(timeout=0.1)
                except queue.Empty:
                    continue
                self.wfile.write(b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n")
                self.wfile.flush()
        except OSError:
            pass
        finally:
            type(self).streams.pop(sid, None)

    def do_POST(self):
        mode = self.path.strip("/").split("/")[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        type(self).seen_headers.append(headers)
        message = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        method, rid = message.get("method"), message.get("id")
        if mode == "legacy":  # (every answer on the session's stream; a call's: 900 KiB of text)
            answers = type(self).streams[self.path.rsplit("=", 1)[1]]
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            if method == "initialize":
                answers.put({"jsonrpc": "2.0", "id": rid, "result": {
                    "protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
                    "serverInfo": {"name": "hostile", "version": "1"}}})
            elif method == "tools/list":
                answers.put({"jsonrpc": "2.0", "id": rid, "result": {"tools": [_tool("say")]}})
            elif method == "tools/call":
                type(self).calls[mode] += 1
                answers.put({"jsonrpc": "2.0", "id": rid, "result": {"content": [
                    {"type": "text", "text": "x" * (900 << 10)}]}})
            return
        if mode == "paged404" and headers.get("mcp-session-id") in type(self).forgotten:
            return self._json({"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": "Session not found"}},
                              404)
        if rid is None:  # a notification
            self.send_response(202)
            self.send_header("content-length", "0")
            if mode == "one_conn":
                self.send_header("connection", "close")
                self.close_connection = True
            self.end_headers()
            return
        if mode == "redirect":  # (every request: to the ok server's path)
            self.send_response(307)
            host = self.headers.get("host", "")
            other = host.replace("127.0.0.1", "localhost") if host.startswith("127.") else host  # (another origin)
            self.send_header("location", f"http://{other}" + self.path.replace("/redirect/", "/ok/"))
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if mode == "hang_init":
            self._hold()
            return
        if method == "initialize":  # (retry0: a session, which the server-to-client stream needs)
            type(self).inits[mode] += 1
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {
                "protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "hostile", "version": "1"}}},
                headers={"mcp-session-id": uuid.uuid4().hex, **({"connection": "close"} if mode == "one_conn" else {})}
                if mode in ("retry0", "resume0", "refuse400", "proxy400", "one_conn", "paged404", "paged_err",
                            "paged_hang") else None)
        if method == "tools/list":
            if mode == "one_conn":  # (no new connection from now on: refused)
                self.server.shutdown()
                self.server.socket.close()
            return self._list(mode, rid, message.get("params") or {}, headers)
        if method == "tools/call":
            type(self).calls[mode] += 1
            type(self).runs[mode, (message.get("params") or {}).get("name")] += 1
            if mode == "paged404":  # (before it answers: the session is forgotten once the call is answered)
                type(self).forgotten.add(headers.get("mcp-session-id"))
            if mode in ("paged_err", "paged_hang"):  # (its listings fail from now on)
                type(self).called.add(headers.get("mcp-session-id"))
            return self._call(mode, rid, (message.get("params") or {}).get("name"), headers)
        self._json({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no such method"}})

    def _list(self, mode: str, rid, params: dict, headers: dict) -> None:
        if mode == "fat_pages":
            n = int(params.get("cursor") or 0)
            fat = [{**_tool(f"t{n}_{i}", "d" * (1 << 19)), "inputSchema": {"type": "object", "properties": {
                "x": {"type": "string", "description": "s" * (1 << 19)}}}} for i in range(7)]
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {"tools": fat, "nextCursor": str(n + 1)}})
        if mode == "empty_pages" or mode == "empty_tail" and params.get("cursor"):
            n = int(params.get("cursor") or 0)
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {"tools": [], "nextCursor": str(n + 1)}})
        if mode == "bad_list":
            return self._json({"jsonrpc": "2.0", "id": rid, "error": {
                "code": -32000, "message": "no listing\n[00:00:00.000] resp2chat: forged"}})
        if mode in ("paged_err", "paged_hang") and headers.get("mcp-session-id") in type(self).called:
            if mode == "paged_hang":
                return self._hold()
            return self._json({"jsonrpc": "2.0", "id": rid, "error": {"code": -32603, "message": "the listing broke"}})
        if mode in ("paged404", "paged_err", "paged_hang"):
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {"tools": [_tool("say")]} if params.get("cursor")
                               else {"tools": [_tool("small")], "nextCursor": "2"}})
        if mode == "schema":
            typed = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {"tools": [
                {**_tool(name), "outputSchema": typed} for name in ("say", "good", "echo")]
                + [{**_tool("unschema"), "outputSchema": {"type": "object", "properties": {"n": {"type": 5}}}}]}})
        description = "says something"
        if mode == "echo_auth":
            description = "headers: " + json.dumps(headers)
        if mode == "straddle":  # (across the 4096 characters kept of a description)
            description = "a" * (4096 - 16) + str(headers.get("x-client-key"))
        tools = [_tool("say", description), _tool("small")] + ([_tool("err")] if mode == "straddle" else []) \
            + ([_tool("cut")] if mode == "proxy400" else [])
        return self._json({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools, **(
            {"nextCursor": "1"} if mode == "empty_tail" else {})}})

    def _resume0(self) -> None:
        self._sse_head()
        self.wfile.write(b"event: message\nid: e1\nretry: 0\ndata: \n\n")

    def _call(self, mode: str, rid, name: str, headers: dict) -> None:
        text = "said"
        if mode == "mixed":  # (the tool's name is the mode: ``small``, or another mode's misbehaviour)
            mode = name
        if mode == "proxy400" and name == "cut":
            time.sleep(0.5)
            mode = "cut"
        if name == "small":
            time.sleep(0.5)
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": text}]}})
        if mode == "schema":
            n = {"good": 7, "echo": "a" * 50 + " \" " + str(headers.get("x-client-key"))}.get(name, "seven")
            return self._json({"jsonrpc": "2.0", "id": rid, "result": {
                "content": [{"type": "text", "text": json.dumps({"n": n})}], "structuredContent": {"n": n}}})
        if mode == "hang":
            self._hold()
            return
        if mode == "drip":
            self._sse_head()
            self._hold(lambda: (self.wfile.write(b": ping\n\n"), self.wfile.flush()))
            return
        if mode == "garbage":
            return self._json(b"<html>not json{{{")
        if mode == "resume0":
            return self._resume0()
        if mode == "refuse400":
            return self._json({"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "refused: bad say"}}, 400)
        if mode == "proxy400":
            return self._json(b"<html>400 Bad Request</html>", 400, kind="text/html")
        if mode == "one_conn":
            time.sleep(1)
        if mode == "echo_garbage":  # (not JSON, with the headers the server got)
            return self._json(f"{headers.get('x-client-key')} {headers.get('x-operator-key')}".encode())
        if mode == "wrong_id":
            return self._json({"jsonrpc": "2.0", "id": f"{rid}-not", "result": {"content": []}})
        if mode == "cut":
            self._sse_head()
            self.wfile.write(b'event: message\ndata: {"jsonrpc": "2.0", "id": ' + json.dumps(rid).encode()
                             + b', "result": {"content": [{"type": "text", "te')
            self.wfile.flush()
            return
        if mode == "cut_json":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "1000")
            self.send_header("connection", "close")
            self.close_connection = True
            self.end_headers()
            self.wfile.write(b'{"jsonrpc": "2.0", "id": ' + json.dumps(rid).encode() + b', "resu')
            return
        if mode == "huge":
            chunk = "x" * (1 << 20)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("connection", "close")
            self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(b'{"jsonrpc": "2.0", "id": ' + json.dumps(rid).encode()
                                 + b', "result": {"content": [{"type": "text", "text": "')
                for _ in range(12):
                    self.wfile.write(chunk.encode())
                self.wfile.write(b'"}]}}')
            except OSError:
                pass
            return
        if mode == "echo_auth":
            text = "headers: " + json.dumps(headers)
        if mode == "straddle" and name == "err":  # (across the 2000 characters kept of an error, its prefix
            prefix = len("MCP server straddle: MCPError: ")  # as the gateway writes it)
            return self._json({"jsonrpc": "2.0", "id": rid, "error": {
                "code": -32000, "message": "e" * (2000 - prefix - 16) + str(headers.get("x-client-key"))}})
        if mode == "straddle":  # (the client's header across the 64 KiB the gateway keeps of a result)
            text = "a" * ((64 << 10) - 16) + str(headers.get("x-client-key")) + "b" * 100
        self._json({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": text}]}})
