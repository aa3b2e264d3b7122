"""The mitmproxy addons' hooks on the production path: mitmproxy's own test context (taddons,
tflow), the real relay, a real backend on loopback.

``Mitm.run`` does for one flow what mitmproxy's proxy core does: the request hooks; unless an
addon answered, the request as mitmproxy assembles it to wherever the flow now points (the
relay), the response head, the responseheaders hooks, each body chunk through the flow's stream
callable, then the response hooks. Everything between is the gateway's own code.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import exceptions, hooks, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.net.http.http1 import assemble_request
from mitmproxy.test import taddons, tflow

from mitmproxy.proxy.layers.http import (
    HttpErrorHook, HttpRequestHeadersHook, HttpRequestHook, HttpResponseHeadersHook, HttpResponseHook,
)

from helpers import DONE, chat_chunk, chat_event, chat_sse, codex_fixture, http_chunk, parse_sse
from redis_server import RedisServer
from resp2chat_io.addons import build

SECRET = "sk-upstream-secret"


class Backend:
    """A chat backend on loopback that answers every request with ``status``/``ctype`` and the
    body in ``pieces`` (one chunked-encoding chunk each), and remembers what it was sent."""

    def __init__(self):
        self.status, self.ctype, self.pieces, self.delay = 200, "text/event-stream", [chat_event(finish="stop")], 0.0
        self.seen: list[tuple[bytes, bytes]] = []  # (head, body)
        self.server = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"content-length")), b"0"))
                body = await reader.readexactly(length)
                self.seen.append((head, body))
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"
                             % (self.status, self.ctype.encode()))
                for piece in self.pieces:
                    writer.write(http_chunk(piece))
                    await writer.drain()
                    await asyncio.sleep(self.delay)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


class Mitm:
    """The gateway's addons in a taddons context, with a mitmproxy-like flow driver."""

    def __init__(self, tctx, addons):
        self.tctx, self.addons = tctx, addons
        self.by_name = {a.name: a for a in addons}

    def __getitem__(self, name: str):
        return self.by_name["resp2chat_" + name]

    async def hook(self, hook) -> None:
        await self.tctx.master.addons.handle_lifecycle(hook)

    async def run(self, flow: http.HTTPFlow, *, hang_up_after_completed: bool = False) -> list:
        """One flow through the hooks and the real relay; the stream callable's results."""
        await self.hook(HttpRequestHeadersHook(flow))
        if flow.response is None:
            await self.hook(HttpRequestHook(flow))
        if flow.response is not None:
            await self.hook(HttpResponseHook(flow))
            return []
        reader, writer = await asyncio.open_connection(flow.request.host, flow.request.port)
        self.sent = assemble_request(flow.request)  # (what went to the relay)
        writer.write(self.sent)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k: v for k, v in (x.split(": ", 1) for x in lines[1:] if x)}
        flow.response = http.Response.make(status, b"", headers)
        await self.hook(HttpResponseHeadersHook(flow))
        results, body = [], bytearray()
        stream = flow.response.stream
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = (await reader.readexactly(size + 2))[:-2] if size else b""
            if size == 0:
                await reader.readuntil(b"\r\n")
            if callable(stream):
                results.append(stream(data))
                out = b"".join(r if isinstance(r, bytes) else b"".join(r) for r in results)
                if hang_up_after_completed and b"response.completed" in out:
                    writer.close()
                    flow.error = tflow.terr("Client disconnected.")
                    await self.hook(HttpErrorHook(flow))
                    return results
            else:
                body += data
            if size == 0:
                break
        writer.close()
        if callable(stream):
            flow.response.data.content = b"".join(r if isinstance(r, bytes) else b"".join(r) for r in results)
        else:
            flow.response.content = bytes(body)
        await self.hook(HttpResponseHook(flow))
        return results


@pytest.fixture
async def backend():
    b = Backend()
    await b.start()
    yield b
    b.server.close()


@pytest.fixture
async def gw(backend):
    """The gateway's addons, configured and running, reverse-proxying to ``backend``."""
    addons = build()
    with taddons.context(*addons) as tctx:  # (no Proxyserver: nothing may bind a port)
        tctx.master.addons.trigger(hooks.ConfigureHook(set(tctx.options.keys())))
        # the replay cache would answer repeated requests without the backend: tested on its own
        tctx.options.update(resp2chat_max_replay_entries=0)
        await tctx.master.addons.trigger_event(hooks.RunningHook())
        yield Mitm(tctx, addons)
        await tctx.master.addons.trigger_event(hooks.DoneHook())


def request_flow(method: str, url: str, body: bytes = b"", headers=None) -> http.HTTPFlow:
    """A flow as a client's request makes it (its Host header is the URL's)."""
    f = tflow.tflow()
    f.request = http.Request.make(method, url, body, {"host": url.split("/")[2], **(headers or {})})
    return f


def responses_flow(body: dict | bytes, backend_url: str, path="/v1/responses", headers=None) -> http.HTTPFlow:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request_flow("POST", f"{backend_url}{path}", raw, {"content-type": "application/json", **(headers or {})})


def events_of(results: list) -> list[dict]:
    """The events of what the stream callable returned, read strictly (helpers.parse_sse)."""
    return parse_sse(b"".join(r if isinstance(r, bytes) else b"".join(r) for r in results))


async def test_a_turn_goes_through_the_relay_and_the_flow_shows_the_backend(gw, backend):
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    backend.pieces = [chat_event({"content": "Hel"}), chat_event({"content": "lo"}), chat_event(finish="stop"), DONE]
    await gw.hook(HttpRequestHook(f))
    relay = gw["upstreams"].relay
    assert (f.request.host, f.request.port) == relay.address  # the hop (see relay/server.py)
    f2 = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    results = await gw.run(f2)
    head, body = backend.seen[-1]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1")
    assert b"x-resp2chat" not in head.lower()  # the relay's own headers stop at the relay
    chat = json.loads(body)
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert [e["type"] for e in events_of(results)][-1] == "response.completed"
    # the request crossed the hop without its body (the relay sends the exchange's own:
    # http_turns.BodyAside); the flow has it again, as the backend got it
    assert gw.sent.endswith(b"\r\n\r\n") and b"content-length: 0\r\n" in gw.sent.lower()
    assert f2.request.content == body and f2.request.headers["content-length"] == str(len(body))
    # the flow (mitmweb, flow files) shows the real backend, and no relay headers
    assert f2.request.url == backend.url + "/v1/chat/completions"
    assert not [n for n in f2.request.headers if n.lower().startswith("x-resp2chat")]
    assert f2.comment.startswith("POST /v1/responses → m · completed")
    relay.forget(f.id)


async def test_upstream_base_url_with_path_prefix_and_key(gw, backend):
    gw.tctx.options.update(resp2chat_upstream_base_url=backend.url + "/api/v1", resp2chat_upstream_api_key=SECRET)
    f = responses_flow({"model": "m", "input": "hi"}, "http://127.0.0.1:8000", headers={"authorization": "Bearer sk-client"})
    await gw.run(f)
    head, _ = backend.seen[-1]
    assert head.startswith(b"POST /api/v1/chat/completions ")
    assert b"authorization: Bearer " + SECRET.encode() in head
    assert f.request.url == backend.url + "/api/v1/chat/completions"
    m = request_flow("GET", "http://127.0.0.1:8000/v1/models?x=1")
    await gw.hook(HttpRequestHeadersHook(m))
    await gw.hook(HttpRequestHook(m))
    assert m.request.url == backend.url + "/api/v1/models?x=1"


async def test_client_authorization_dropped_unless_forwarding(gw, backend):
    await gw.run(responses_flow({"model": "m", "input": "hi"}, backend.url, headers={"authorization": "Bearer sk-client"}))
    assert b"sk-client" not in backend.seen[-1][0]
    gw.tctx.options.update(resp2chat_forward_client_auth=True)
    await gw.run(responses_flow({"model": "m", "input": "hi"}, backend.url, headers={"authorization": "Bearer sk-client"}))
    assert b"authorization: Bearer sk-client" in backend.seen[-1][0]


async def test_saved_flows_never_hold_credentials(gw, backend):
    gw.tctx.options.update(resp2chat_upstream_api_key=SECRET)
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    backend.pieces = [chat_event({"content": "the key is " + SECRET}), chat_event(finish="stop")]
    results = await gw.run(f)
    assert SECRET.encode() in b"".join(b for b, _ in backend.seen)  # it went upstream…
    state = json.dumps(f.get_state(), default=str)
    assert SECRET not in state  # …but neither the flow nor what the client got holds it
    assert SECRET not in json.dumps(events_of(results))


async def test_bad_request_answered_locally(gw, backend):
    f = responses_flow({"model": "m", "input": [{"type": "nope"}]}, backend.url)
    await gw.run(f)
    assert f.response.status_code == 400
    assert json.loads(f.response.content)["error"]["param"] == "input[0].type"
    assert f.id not in gw["http_turns"].live and backend.seen == [] and gw["upstreams"].relay.expected == 0


async def test_healthz_answered_locally(gw, backend):
    f = request_flow("GET", backend.url + "/healthz")
    await gw.run(f)
    assert f.response.status_code == 200 and backend.seen == []


async def test_no_client_can_address_the_relay(gw, backend):
    """In a forward-proxy mode a client could name any host: never the relay's address."""
    relay = gw["upstreams"].relay
    f = request_flow("POST", f"http://127.0.0.1:{relay.port}/v1/chat/completions", b"{}")
    await gw.run(f)
    assert f.response.status_code == 403 and relay.refused == 0 and backend.seen == []


async def test_stream_callable_translates_and_fixes_headers(gw, backend):
    backend.pieces = [chat_event({"content": "Hel"})[:10], chat_event({"content": "Hel"})[10:], b": keep-alive\n\n",
                      chat_event(finish="stop"), DONE]
    backend.delay = 0.02  # (a backend's pace: most pieces get a tick of their own)
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    results = await gw.run(f)
    assert f.response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in f.response.headers
    assert f.response.headers["transfer-encoding"] == "chunked"
    # nothing to say mid-stream must be [], never b"" (b"" ends the client's body early): a
    # tick with nothing queued, whatever ticks the relay's timing gave
    assert all(r != b"" for r in results) and f.response.stream(b".") == []
    events = events_of(results)
    assert [e["type"] for e in events].count("response.completed") == 1
    assert any(e.get("delta") == "Hel" for e in events)


async def test_stream_callable_never_raises(gw, backend, monkeypatch):
    from resp2chat_core.translator import Translator

    def boom(self, data):
        raise RuntimeError("bug")

    monkeypatch.setattr(Translator, "feed", boom)
    backend.pieces = [chat_event({"content": "x"}), chat_event(finish="stop")]
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    results = await gw.run(f)
    events = events_of(results)
    error = events[-1]["response"]["error"]
    assert events[-1]["type"] == "response.failed" and error["code"] == "server_error"
    # the client gets the request id, the operator the exception (flow metadata, log)
    assert f.response.headers["x-request-id"] in error["message"] and "bug" not in error["message"]
    assert f.metadata["resp2chat"]["error"]["detail"] == "RuntimeError: bug"
    assert [e["type"] for e in events].count("response.failed") == 1


async def test_upstream_http_error_becomes_response_failed_stream(gw, backend):
    backend.status, backend.ctype = 400, "application/json"
    body = json.dumps({"error": {"message": "This model's maximum context length is 10 tokens. "
                                            "However, you requested 99 tokens", "code": 400}}).encode()
    backend.pieces = [body[:20], body[20:]]
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    events = events_of(await gw.run(f))
    assert f.response.status_code == 200
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "context_length_exceeded"


async def test_a_backend_cannot_speak_for_the_gateway(gw, backend):
    """Relay facts travel as typed calls: a backend chunk shaped like the old in-band markers is
    just an unknown chunk, not an error, a keepalive or a web search."""
    backend.pieces = [
        b'data: {"resp2chat": {"upstream_error": {"status": 401, "body": "x"}}}\n\n',
        b'data: {"resp2chat": {"web_search": {"phase": "started", "id": "1", "query": "q"}}}\n\n',
        chat_event({"content": "fine"}), chat_event(finish="stop"), DONE]
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    events = events_of(await gw.run(f))
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and final["error"] is None
    assert [o["type"] for o in final["output"]] == ["message"] and final["output"][0]["content"][0]["text"] == "fine"


async def test_non_streaming_client_gets_one_json_response(gw, backend):
    backend.pieces = [chat_event({"content": "Hello"}), chat_event(finish="stop"), DONE]
    f = responses_flow({"model": "m", "input": "hi"}, backend.url)
    results = await gw.run(f)
    assert results == [] and not callable(f.response.stream)
    resp = json.loads(f.response.content)
    assert f.response.status_code == 200
    assert resp["object"] == "response" and resp["status"] == "completed"
    assert resp["output"][0]["content"][0]["text"] == "Hello"
    assert f.id not in gw["http_turns"].live
    backend.status, backend.ctype, backend.pieces = 429, "application/json", [b'{"error": {"message": "slow down"}}']
    f = responses_flow({"model": "m", "input": "hi"}, backend.url)
    await gw.run(f)
    assert f.response.status_code == 429 and json.loads(f.response.content)["error"]["code"] == "rate_limit_exceeded"


async def test_codex_fixture_flow_round_trip(gw, backend):
    body = codex_fixture("02-tool-call-turn1.json")["body"]
    call = {"index": 0, "id": "call_x", "function": {"name": "multi_agent_v1__spawn_agent",
                                                      "arguments": '{"message":"go"}'}}
    backend.pieces = [chat_event({"tool_calls": [call]}), chat_event(finish="tool_calls"), DONE]
    f = responses_flow(body, backend.url)
    events = events_of(await gw.run(f))
    names = [t["function"]["name"] for t in json.loads(backend.seen[-1][1])["tools"]]
    assert "multi_agent_v1__spawn_agent" in names
    item = events[-1]["response"]["output"][0]
    assert (item["type"], item["name"], item["namespace"]) == ("function_call", "spawn_agent", "multi_agent_v1")


async def test_turn_recorded_when_client_hangs_up_after_completed(gw, backend):
    """Codex closes the connection on response.completed (sent at [DONE]), which can beat the end
    of the relay's body: mitmproxy then calls `error`, not `response`. Seen with llama-server."""
    usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 8}}
    answer = chat_event({"content": "Hi"}) + chat_event(finish="stop") + chat_sse(chat_chunk(choices=[], usage=usage))
    backend.pieces = [answer, b": the body goes on a little\n\n"]
    backend.delay = 0.2
    f = responses_flow({"model": "m", "input": "hi", "stream": True}, backend.url)
    results = await gw.run(f, hang_up_after_completed=True)
    out = b"".join(r if isinstance(r, bytes) else b"".join(r) for r in results)
    meta = f.metadata["resp2chat"]
    assert f.error is not None and f.id not in gw["http_turns"].live
    assert meta["status"] == "completed"
    assert meta["usage"]["input_tokens"] == 9 and meta["usage"]["input_tokens_details"]["cached_tokens"] == 8
    assert "[DONE]" in meta["upstream_sse"]
    # the flow file keeps what the client got (mitmproxy stores a streamed body only at its end,
    # which never came): server replay of this recording must answer in full
    assert f.response.raw_content == out
    assert f.request.url == backend.url + "/v1/chat/completions"


async def test_configure_acts_on_what_changed(gw, backend, tmp_path):
    store_before = gw["store"].store
    relay_client = gw["upstreams"].relay.client
    assert relay_client.verify_tls is True
    gw.tctx.options.update(ssl_insecure=True)  # a live change reaches the relay
    assert relay_client.verify_tls is False
    gw.tctx.options.update(resp2chat_max_replay_entries=7)
    assert gw["replay"].cache.capacity == 7 and gw["store"].store is store_before  # the store was not rebuilt
    gw.tctx.options.update(resp2chat_session_ttl_hours=1)  # a bound: the same store (what it holds kept), bound anew
    assert gw["store"].store is store_before and store_before.ttl == 3600
    gw.tctx.options.update(resp2chat_session_store_dir=str(tmp_path / "store"))  # another place: another store
    assert gw["store"].store is not store_before and gw["store"].store.dir == tmp_path / "store"


async def test_a_bound_set_at_run_time_keeps_the_redis_store(gw, redis_server, tmp_path):
    """With ``state_store_url``, a bound set while the gateway runs keeps the same store (its
    counts, its connection pool) under the new bound, as the memory store does (``rebound``):
    its next write keeps to it; so does ``session_store_dir`` (the memory store's copy). Another
    URL makes another."""
    gw.tctx.options.update(resp2chat_state_store_url=redis_server.url)
    store, state = gw["store"].store, gw["store"].state
    for n in (1, 2):
        assert await store.put(f"resp_bound0000{n}", [{"role": "user", "content": f"hi {n}"}], {"id": "r"})
    gw.tctx.options.update(resp2chat_max_sessions=1, resp2chat_session_ttl_hours=2)
    assert gw["store"].store is store and gw["store"].state is state and (store.max_entries, store.ttl) == (1, 7200)
    assert len(store) == 2  # (what it counted: one made anew counts nothing until it writes)
    assert await store.put("resp_bound00003", [], {"id": "r"}) and len(store) == 1
    gw.tctx.options.update(resp2chat_session_store_dir=str(tmp_path / "store"))  # (the memory store's: Redis's the same)
    assert gw["store"].store is store and gw["store"].state is state
    with RedisServer(tmp_path / "other") as other:
        gw.tctx.options.update(resp2chat_state_store_url=other.url)
        assert gw["store"].store is not store and gw["store"].state is not state


def test_gateway_defaults_loopback_4000_lazy():
    with taddons.context(Proxyserver(), *build()) as tctx:
        tctx.master.addons.trigger(hooks.ConfigureHook(set(tctx.options.keys())))  # what mitmproxy's script loader does
        opts = tctx.options
        assert opts.connection_strategy == "lazy"
        assert opts.store_streamed_bodies is True
        assert opts.mode == ["reverse:http://127.0.0.1:8000@127.0.0.1:4000"]


def test_explicit_listen_address_is_respected():
    with taddons.context(Proxyserver(), *build()) as tctx:
        tctx.options.update(mode=["reverse:http://10.0.0.5:9000"], listen_port=5555)
        assert tctx.options.mode == ["reverse:http://10.0.0.5:9000@127.0.0.1:5555"]
        tctx.options.update(mode=["reverse:http://10.0.0.5:9000@127.0.0.1:6000"])
        assert tctx.options.mode == ["reverse:http://10.0.0.5:9000@127.0.0.1:6000"]


def test_binding_beyond_loopback_needs_gateway_key():
    with taddons.context(Proxyserver(), *build()) as tctx:
        with pytest.raises(exceptions.OptionsError, match="gateway_api_key"):
            tctx.options.update(mode=["reverse:http://10.0.0.5:9000@0.0.0.0:4000"])
        tctx.options.update(mode=["reverse:http://10.0.0.5:9000@0.0.0.0:4000"], resp2chat_gateway_api_key="gw-key")


async def test_gateway_key_is_required_and_not_forwarded(gw, backend):
    gw.tctx.options.update(resp2chat_gateway_api_key="gw-key")
    f = responses_flow({"model": "m", "input": "hi"}, backend.url)
    await gw.run(f)
    assert f.response.status_code == 401 and backend.seen == []
    f = responses_flow({"model": "m", "input": "hi"}, backend.url, headers={"authorization": "Bearer gw-key"})
    await gw.run(f)
    assert f.response.status_code == 200 and b"gw-key" not in backend.seen[-1][0]


async def test_an_unexpected_exception_fails_closed(gw, backend, monkeypatch):
    """A bug in a hook must not let mitmproxy forward the untouched request (fail open)."""
    def boom(*a, **k):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "planted")

    monkeypatch.setattr(gw["turns"], "lower", boom)
    f = responses_flow({"model": "m", "input": "hi"}, backend.url)
    await gw.run(f)
    err = json.loads(f.response.content)["error"]
    assert f.response.status_code == 500 and err["code"] == "server_error"
    assert f.response.headers["x-request-id"] in err["message"] and "planted" not in err["message"]
    assert backend.seen == [] and gw["upstreams"].relay.expected == 0


def test_first_backend_bytes_are_sliced_once():
    """A backend whose first read carries a long answer: the first tick translates about
    FIRST_SLICE bytes of it (the first text delta goes out at once) and asks for one more tick
    for the rest; what the client gets is byte for byte the unsliced translation."""
    from resp2chat_core.channel import Accepted, Channel, Reader
    from resp2chat_core.lowering import LoweringOptions
    from resp2chat_core.turn import begin_turn
    from resp2chat_io.addons.http_turns import FIRST_SLICE, TurnStream

    answer = chat_event({"role": "assistant", "content": ""})
    answer += b"".join(chat_event({"content": f"w{i} "}) for i in range(300))
    later = chat_event({"content": "late"}) + chat_event(finish="stop") + DONE
    assert len(answer) > 4 * FIRST_SLICE

    def stream() -> tuple[Channel, TurnStream, list]:
        turn = begin_turn(json.dumps({"model": "m", "input": "hi", "stream": True}).encode(), LoweringOptions(),
                          "resp_1", 1)
        ticks = []
        ch = Channel()
        ch.wake = lambda: ticks.append(1)
        return ch, TurnStream(Reader(turn.translator(), 1 << 20), ch), ticks

    def out(result) -> bytes:
        return result if isinstance(result, bytes) else b"".join(result)

    ch, s, ticks = stream()
    ch.event(Accepted())
    ch.data(answer[:100])  # a first small read and a large one, taken by the same tick
    ch.data(answer[100:])
    first = out(s(b"."))
    assert ticks == [1, 1] and b"response.output_text.delta" in first and len(first) < 4 * FIRST_SLICE
    rest = out(s(b"."))
    assert ticks == [1, 1] and ch.size == 0 and b"w299" in rest
    ch.data(later)
    assert ticks == [1, 1, 1]
    late = out(s(b".")) + out(s(b""))

    whole_ch, whole, _ = stream()
    whole_ch.event(Accepted())
    whole_ch.data(answer)
    whole.sliced = True  # (translated in one go)
    whole_out = out(whole(b"."))
    whole_ch.data(later)
    assert first + rest + late == whole_out + out(whole(b".")) + out(whole(b""))
    assert late.count(b"event: response.completed\n") == 1
