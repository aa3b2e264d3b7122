"""A turn's conversation has the turn before its client sees the turn's end, on any replica: two
real mitmdump replicas sharing a real redis-server, as an agent behind a load balancer meets them
(the OpenAI Agents SDK's ``OpenAIConversationsSession``, or openai SDK code with
``conversation=``): a function call's end on replica A, the tool run in no time, its
``function_call_output`` on replica B at once (no sleep, no wait) with the same conversation,
over HTTP (streamed and not) and the Responses WebSocket; the items listed on the other replica
right after an end. And a conversation's write that fails: the turn ends ``failed`` with the
write's error, never ``completed`` without being in the conversation."""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest
import requests

from helpers import (TERMINAL, free_port, iter_sse, openai_client, parse_sse, start_gateway, terminal, user,
                     wait_until)
from wsclient import WSClient

ROUNDS = 20
TOOL = {"type": "function", "name": "get_weather", "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def request(conv: str, input_: list, stream: bool) -> dict:
    return {"model": "demo-model", "input": input_, "tools": [TOOL], "conversation": conv, "stream": stream}


def http_end(base_url: str, body: dict) -> dict:
    """A turn over HTTP, as a client acting on its end: the Response of the JSON body, or (streamed)
    of the terminal event, read as soon as that event is in (the rest of the body, ``[DONE]`` and
    its end, is not waited for)."""
    if not body["stream"]:
        r = requests.post(base_url + "/responses", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()
    with requests.post(base_url + "/responses", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200, r.text
        for event in iter_sse(r):
            if event["type"] in TERMINAL:
                return event["response"]
    raise AssertionError("no terminal event")


class FarRedis:
    """A replica farther from Redis than the other: a loopback TCP proxy to the redis-server
    whose every piece towards Redis arrives ``delay`` seconds late (in order). Replica A's writes
    then take a few such delays, replica B's reads none: before A's turn could end only after its
    write, B read the conversation without it every time, on every transport."""

    def __init__(self, port: int, delay: float = 0.03) -> None:
        self.target, self.delay = port, delay
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._pipe, "127.0.0.1", self.port))
        started.set()
        self.loop.run_forever()

    async def _pipe(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        late: asyncio.Queue = asyncio.Queue()

        async def towards_redis():
            while data := await reader.read(65536):
                late.put_nowait((self.loop.time() + self.delay, data))
            late.put_nowait((0.0, b""))

        async def deliver():
            while True:
                at, data = await late.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, at - self.loop.time()))
                up_writer.write(data)

        async def back():
            while data := await up_reader.read(65536):
                writer.write(data)

        tasks = [asyncio.ensure_future(t()) for t in (towards_redis, deliver, back)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for t in tasks:
                t.cancel()
            writer.close()
            up_writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def pair(upstream, tmp_path, redis_server):
    far = FarRedis(redis_server.port)
    gateways = [start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={url}")
                for url in (far.url, redis_server.url)]
    yield gateways
    for g in gateways:
        g.stop()
    far.close()


LISTING = requests.Session()  # (kept alive: a list right after an end is asked at once)


def newest(gw, conv: str) -> dict:
    r = LISTING.get(f"{gw.base_url}/conversations/{conv}/items?limit=1", timeout=10)
    assert r.status_code == 200, r.text
    return (r.json()["data"] or [{"call_id": None, "type": "(none: the conversation is empty)"}])[0]


def check_rounds(a, b, turn) -> None:
    """``ROUNDS`` times: a function call's end on ``a``, the newest item listed on ``b`` at once,
    its output at once on ``b``, then the newest item listed on ``a`` at once: ``turn(gw, conv,
    input)`` is the transport's."""
    conv = openai_client(a).conversations.create().id
    for i in range(ROUNDS):
        called = turn(a, conv, [user(f'noreason\ncall: get_weather {{"city": "Paris {i}"}}')])
        assert called["status"] == "completed", called
        call = called["output"][-1]
        assert call["type"] == "function_call" and call["arguments"] == f'{{"city": "Paris {i}"}}', call
        # its items, listed on the other replica right after that end
        listed = newest(b, conv)
        assert listed.get("call_id") == call["call_id"], f"round {i}: {listed}"
        # the tool ran in no time; the next turn goes to the other replica
        answered = turn(b, conv, [{"type": "function_call_output", "call_id": call["call_id"], "output": f"sunny {i}"}])
        assert answered["status"] == "completed", f"round {i}: {answered}"
        assert answered["output"][-1]["content"][0]["text"] == f"The tool returned: sunny {i}"
        # and its items, listed on the first replica right after that end
        last = newest(a, conv)
        assert last["type"] == "message" and last["content"][0]["text"] == f"The tool returned: sunny {i}", \
            f"round {i}: {last}"
    items = requests.get(f"{a.base_url}/conversations/{conv}/items?limit=100&order=asc", timeout=10).json()["data"]
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output", "message"] * ROUNDS


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_function_calls_output_on_the_other_replica_finds_the_call_over_http(pair, upstream, stream):
    a, b = pair
    check_rounds(a, b, lambda gw, conv, input_: http_end(gw.base_url, request(conv, input_, stream)))
    # the backend got each output after its call: nothing orphaned, no history short
    sent = upstream.requests()[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant"] * (ROUNDS - 1) + [
        "user", "assistant", "tool"]


def test_a_function_calls_output_on_the_other_replica_finds_the_call_over_the_websocket(pair):
    a, b = pair
    sockets = {a.base_url: WSClient(a.base_url), b.base_url: WSClient(b.base_url)}

    def turn(gw, conv, input_):
        body = request(conv, input_, False)
        del body["stream"]
        return terminal(sockets[gw.base_url].turn({"type": "response.create", **body}))["response"]

    try:
        check_rounds(a, b, turn)
    finally:
        for ws in sockets.values():
            ws.close()


def test_a_conversation_that_cannot_take_the_turn_fails_it(upstream, tmp_path, redis_server):
    """Redis goes away while a turn streams: its end is ``response.failed`` ``store_unavailable``
    (a JSON client: that 503), never ``completed`` without being in the conversation. A
    conversation deleted meanwhile: ``conversation_not_found``, over the WebSocket too."""
    (gw,) = [start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")]
    try:
        client = openai_client(gw)

        def new_conversation():  # (Redis back, empty: the gateway finds it again by itself)
            try:
                return client.conversations.create().id
            except openai.InternalServerError:
                return None

        for stream in (True, False):
            conv = wait_until(new_conversation, 20, "a conversation made")
            body = request(conv, [user("noreason\nslow: 200\nwords: 12")], stream)
            got: dict = {}

            def ask(body=body, got=got):
                r = requests.post(gw.base_url + "/responses", json=body, timeout=30)
                got.update(status=r.status_code, body=r.content)

            asking = threading.Thread(target=ask)
            asking.start()
            wait_until(lambda: len(upstream.requests()) and upstream.requests()[-1]["messages"][-1]["content"]
                       .endswith("words: 12"), 20, "the turn at its backend")  # (looked up: Redis not needed again)
            redis_server.stop()
            asking.join(30)
            if stream:
                assert got["status"] == 200
                events = parse_sse(got["body"])
                end = terminal(events)
                assert end["type"] == "response.failed" and end["response"]["status"] == "failed", end
                # (errors.response_error: the gateway's own code is the type)
                assert (end["response"]["error"]["code"], end["response"]["error"]["type"]) == ("server_error", "store_unavailable")
                assert "not added to its conversation" in end["response"]["error"]["message"]
                assert end["response"]["completed_at"] is None and end["response"]["output"]  # (what it said, kept)
                assert [e["sequence_number"] for e in events] == list(range(len(events)))
                assert not any(e["type"] == "response.completed" for e in events)
            else:
                assert got["status"] == 503 and json.loads(got["body"])["error"]["code"] == "store_unavailable"
            redis_server.start()
        conv = wait_until(new_conversation, 20, "a conversation made")
        ws = WSClient(gw.base_url)
        try:
            ws.send({"type": "response.create", "model": "demo-model", "conversation": conv,
                     "input": [user("noreason\nslow: 200\nwords: 12")]})
            first = ws.next_message()
            assert first["type"] == "response.created"
            client.conversations.delete(conv)
            events = [first] + ws.events()
            end = terminal(events)
            assert end["type"] == "response.failed" and end["response"]["error"]["type"] == "conversation_not_found"
        finally:
            ws.close()
        # the gateway logged warnings, no ERROR, and serves on
        assert client.responses.create(model="demo-model", input="still here").status == "completed"
    finally:
        gw.stop()


# --- the reader that holds the end (sans-I/O) -------------------------------------------------


def landing_reader(secret: bytes = b"sk-secret-0001"):
    from resp2chat_core.channel import Accepted
    from resp2chat_core.conversations import Landing
    from resp2chat_core.lowering import LoweringOptions
    from resp2chat_core.turn import begin_turn

    turn = begin_turn(json.dumps({"model": "m", "input": "hi"}).encode(), LoweringOptions(), "resp_" + "0" * 32, 1)
    reader = Landing(turn.translator(), 1 << 20, (secret,))
    return reader, reader.apply(Accepted())


def test_the_landing_reader_holds_the_end_until_finish_and_can_make_it_failed():
    from helpers import chat_chunk, chat_sse

    secret = b"sk-secret-0001"
    answer = chat_sse(chat_chunk({"content": "the key is " + secret.decode()}), chat_chunk(finish="stop"))
    for failed in (False, True):
        reader, out = landing_reader(secret)
        out += reader.apply(answer[:40])  # (the end arrives: everything before it goes out, it is held)
        out += reader.apply(answer[40:])
        assert reader.translator.done and reader.holding and b"response.completed" not in out
        assert bytes(reader.sent) == out  # (the held end is not what the client got, yet)
        assert reader.apply(b"data: more\n\n") == b""  # (nothing after the end)
        if failed:
            reader.unland("store_unavailable", "this response was not added to its conversation: down")
        end = reader.finish()
        assert not reader.holding and reader.finish() == b""
        events = parse_sse(out + end)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        last = events[-1]["response"]
        assert secret.decode() not in (out + end).decode() and bytes(reader.sent) == out + end  # (scrubbed, kept)
        if failed:
            assert events[-1]["type"] == "response.failed" and last["status"] == "failed"
            assert last["error"]["type"] == "store_unavailable" and last["completed_at"] is None
            assert last["output"][0]["content"][0]["text"] == "the key is [redacted]"  # (what it said, kept)
            assert reader.translator.response()["status"] == "failed"  # (what the turn's listeners hear)
        else:
            assert events[-1]["type"] == "response.completed" and last["status"] == "completed"


def test_the_landing_reader_completes_what_a_stream_callable_did_not_take():
    """The backend's stream is over before the stream callable took its end (``complete``): all of
    it goes out with the end; a turn that did not complete is never made failed by a write."""
    from helpers import chat_chunk, chat_sse

    reader, out = landing_reader()
    reader.complete([chat_sse(chat_chunk({"content": "late"}), chat_chunk(finish="stop"))])
    assert reader.holding and reader.translator.done
    events = parse_sse(out + reader.finish())
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"][0]["content"][0]["text"] \
        == "late"
    # an incomplete one (its output cut at max_output_tokens) is added as a completed one is: a write
    # that fails makes it failed too (before, it stayed incomplete, and not in its conversation)
    reader, out = landing_reader()
    reader.complete([chat_sse(chat_chunk({"content": "long"}), chat_chunk(finish="length"))])
    assert reader.translator.response()["status"] == "incomplete"
    reader.unland("store_unavailable", "not written")
    events = parse_sse(out + reader.finish())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    last = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and last["error"]["type"] == "store_unavailable", last
    assert last["incomplete_details"] is None and last["output"][0]["content"][0]["text"] == "long"
    reader, out = landing_reader()
    reader.complete([chat_sse(chat_chunk({"content": "cut"}), done=False)])  # (no finish, no [DONE]: failed)
    reader.unland("store_unavailable", "not written")
    events = parse_sse(out + reader.finish())
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["code"] == "server_error"
