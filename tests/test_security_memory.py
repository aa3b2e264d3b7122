"""Issue 21, track B: what a backend or a client can make the gateway hold, and for how long.

Every test goes through a real mitmdump (HTTP and the Responses WebSocket) and measures the
gateway process's memory (``/proc/PID/status``: VmHWM, the peak, reset before the part measured
by writing 5 to ``/proc/PID/clear_refs``). The backends here are small real HTTP servers that
misbehave on purpose (``Hostile``): a line that never ends, an event that never ends, a stream
that goes on after its ``[DONE]``, a backend that stalls.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from helpers import (
    DONE, LocalServer, MiB, Peak, QuietHandler, chat_event, http_chunk, listening_ports, memory, read_flows,
    stream_turn, terminal, user, wait_until,
)
from wsclient import WSClient

# --- a backend that misbehaves ----------------------------------------------------------------


ANSWER = chat_event({"content": "hello"}) + chat_event(finish="stop") + DONE
PIECE = 256 << 10


class Hostile(QuietHandler):
    """A chat backend whose answer depends on the model asked for:

    - ``ok``: a short answer
    - ``line``: ``data: `` and then 64 MiB without a line end
    - ``lines``: ``data:`` lines without the blank line that ends an event, 64 MiB of them
    - ``after-done``: a short answer, its ``[DONE]``, then 256 MiB more events
    - ``stall``: the head, then nothing until ``release`` is set, then a short answer
    - ``unchunked``: a stream without chunked coding (its end is the connection's), 256 MiB of events
    - ``error-flood``: a 500 whose body goes on for 256 MiB

    Each call is noted in ``calls``: how many body bytes went out, and whether the gateway
    closed the connection before the backend was done (``cut``)."""

    calls: list[dict] = []
    release = threading.Event()

    def do_POST(self):
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        call = {"model": model, "sent": 0, "cut": False, "done": False, "at": time.monotonic()}
        type(self).calls.append(call)
        chunked = model != "unchunked"
        self.send_response(500 if model == "error-flood" else 200)
        self.send_header("content-type", "application/json" if model == "error-flood" else "text/event-stream")
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.flush()

        def send(data: bytes) -> None:
            self.wfile.write(http_chunk(data) if chunked else data)
            call["sent"] += len(data)
            call["at"] = time.monotonic()

        try:
            if model == "stall":
                type(self).release.wait(120)
            if model in ("ok", "stall", "after-done"):
                send(ANSWER)
            if model == "line":
                send(b'data: {"choices":[{"index":0,"delta":{"content":"')
                for _ in range(64 * MiB // PIECE):
                    send(b"x" * PIECE)
            elif model == "lines":
                for _ in range(64 * MiB // PIECE):
                    send((b"data: " + b"y" * 1000 + b"\n") * (PIECE // 1007))
            elif model in ("after-done", "unchunked"):
                more = chat_event({"content": "more"}) * (PIECE // len(chat_event({"content": "more"})))
                for _ in range(256 * MiB // PIECE):
                    send(more)
            elif model == "error-flood":
                send(b'{"error": {"message": "' + b"e" * PIECE)
                for _ in range(256 * MiB // PIECE):
                    send(b"e" * PIECE)
            if not chunked:
                call["done"] = True
                self.close_connection = True
                return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            call["done"] = True
        except OSError:
            call["cut"] = True
            self.close_connection = True


@pytest.fixture
def hostile():
    Hostile.calls, Hostile.release = [], threading.Event()
    with LocalServer(Hostile) as server:
        yield server
        Hostile.release.set()


def _post(gw, body: dict) -> list[dict]:
    """A streamed turn of the question "hi" (a hostile backend takes long to misbehave)."""
    return stream_turn(gw, {"input": "hi", **body}, timeout=120)


def _oversized(response: dict) -> None:
    assert response["status"] == "failed", response
    error = response["error"]
    assert (error["code"], error["type"]) == ("server_error", "upstream_event_too_large"), error
    assert "max_upstream_event_mb (4 MiB)" in error["message"], error


def _backend_stopped(model: str) -> dict:
    """The backend's call for ``model`` was cut by the gateway long before the backend was done."""
    call = [c for c in Hostile.calls if c["model"] == model][-1]
    wait_until(lambda: call["cut"] or call["done"], what=f"the {model} call ending")
    assert call["cut"] and not call["done"], call
    return call


# --- finding 5: a backend's line or event without end --------------------------------------------


@pytest.mark.parametrize("model", ["line", "lines"])
def test_a_backend_event_without_end_fails_the_turn_holding_little(hostile, gateway_factory, model):
    """64 MiB of one line (or of one event's data lines): the turn ends with one response.failed
    naming max_upstream_event_mb, the gateway holds a few MiB at most meanwhile (it grew by
    ~180 MiB, copying the held line again at every read), the backend call is dropped, and the
    gateway answers meanwhile."""
    gw = gateway_factory(hostile.url)
    assert terminal(_post(gw, {"model": "ok"}))["response"]["status"] == "completed"  # (warm: imports, pools)
    peak = Peak(gw.proc.pid)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(events=_post(gw, {"model": model})))
    worker.start()
    while worker.is_alive():  # the gateway keeps serving while the hostile turn runs
        started = time.monotonic()
        assert requests.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
        assert terminal(_post(gw, {"model": "ok"}))["response"]["status"] == "completed"
        worker.join(0.05)
    assert peak.grown < 40 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    _oversized(terminal(result["events"])["response"])
    assert _backend_stopped(model)["sent"] < 40 * MiB


def test_a_web_search_round_with_a_line_without_end_fails_the_same(hostile, gateway_factory):
    """With the gateway's web search on, a round's stream is read by the search loop before the
    translator: the same bound, the same failure."""
    gw = gateway_factory(hostile.url, "--set", "resp2chat_brave_api_key=test-brave-key",
                         "--set", "resp2chat_brave_base_url=http://127.0.0.1:9")
    search = {"tools": [{"type": "web_search"}]}
    assert terminal(_post(gw, {"model": "ok", **search}))["response"]["status"] == "completed"
    peak = Peak(gw.proc.pid)
    events = _post(gw, {"model": "line", **search})
    assert peak.grown < 40 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    _oversized(terminal(events)["response"])
    assert _backend_stopped("line")["sent"] < 40 * MiB


def test_a_backend_line_without_end_on_the_websocket(hostile, gateway_factory):
    gw = gateway_factory(hostile.url)
    client = WSClient(gw.base_url)
    end = terminal(client.turn({"type": "response.create", "model": "ok", "input": "hi"}))
    assert end["response"]["status"] == "completed"
    peak = Peak(gw.proc.pid)
    events = client.turn({"type": "response.create", "model": "line", "input": "hi"})
    assert peak.grown < 40 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    _oversized(terminal(events)["response"])
    assert _backend_stopped("line")["sent"] < 40 * MiB
    # the socket goes on
    end = terminal(client.turn({"type": "response.create", "model": "ok", "input": "again"}))
    assert end["response"]["status"] == "completed"
    client.close()


# --- finding 5: a turn that is over costs nothing more ------------------------------------------


def test_a_backend_that_goes_on_after_done_is_cut_and_the_client_stream_ends(hostile, gateway_factory):
    """The answer is complete at [DONE]; the backend sends 256 MiB more: the client's stream ends
    with the answer and the gateway stops reading (it read all of it before, and the client's
    stream lasted as long)."""
    gw = gateway_factory(hostile.url)
    response = terminal(_post(gw, {"model": "after-done"}))["response"]
    assert response["status"] == "completed" and response["output"][0]["content"][0]["text"] == "hello"
    assert _backend_stopped("after-done")["sent"] < 64 * MiB
    client = WSClient(gw.base_url)
    response = terminal(client.turn({"type": "response.create", "model": "after-done", "input": "hi"}))["response"]
    assert response["status"] == "completed" and response["output"][0]["content"][0]["text"] == "hello"
    assert _backend_stopped("after-done")["sent"] < 64 * MiB
    end = terminal(client.turn({"type": "response.create", "model": "ok", "input": "again"}))
    assert end["response"]["status"] == "completed"
    client.close()


def test_an_unchunked_stream_to_a_slow_client_is_read_no_faster_than_it_is_taken(hostile, gateway_factory):
    """A backend that streams without chunked coding (its body ends with its connection), and a
    client that reads nothing: the relay pauses the backend once FULL bytes wait for the client,
    as it does for a chunked stream (it read on into memory: +256 MiB)."""
    gw = gateway_factory(hostile.url)
    assert terminal(_post(gw, {"model": "ok"}))["response"]["status"] == "completed"
    peak = Peak(gw.proc.pid)
    with requests.post(gw.base_url + "/responses", json={"model": "unchunked", "input": "hi", "stream": True},
                       stream=True, timeout=60) as r:
        assert r.status_code == 200
        call = wait_until(lambda: next((c for c in Hostile.calls if c["model"] == "unchunked"), None))
        # the backend sent all of it, or could send nothing more for 3 s (pushed back)
        wait_until(lambda: call["done"] or time.monotonic() - call["at"] > 3, timeout=120,
                   what="the backend sending everything, or being made to wait")
        assert peak.grown < 64 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
        assert not call["done"]
    wait_until(lambda: call["cut"], what="the backend call dropped with the client")


def test_an_error_body_is_not_read_past_what_is_kept(hostile, gateway_factory):
    """A backend's 500 whose body never ends: the relay keeps its first MiB, reports the failure
    and drops the call (it read all 256 MiB, to throw it away)."""
    gw = gateway_factory(hostile.url)
    error = terminal(_post(gw, {"model": "error-flood"}))["response"]["error"]
    assert error["code"] == "server_error" and "upstream HTTP 500" in error["message"]
    assert _backend_stopped("error-flood")["sent"] < 64 * MiB


# --- the relay: half-sent requests ----------------------------------------------------------------


def test_the_relay_closes_a_connection_that_sends_half_a_request(upstream, gateway_factory):
    """Any local process can open the relay's loopback port: one that sends half a head, or
    nothing, is closed after the relay's deadline (10 s), not held forever."""
    gw = gateway_factory(upstream.origin)
    [relay] = listening_ports(gw.proc.pid) - {gw.port}
    half = socket.create_connection(("127.0.0.1", relay))
    half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-le")
    silent = socket.create_connection(("127.0.0.1", relay))
    started = time.monotonic()
    for sock in (half, silent):
        sock.settimeout(60)  # (the wait is the relay's: recv returns b"" once it closed the connection)
        assert sock.recv(1) == b""
        sock.close()
    assert time.monotonic() - started < 30
    assert terminal(_post(gw, {"model": "demo-model"}))["response"]["status"] == "completed"  # the gateway goes on


# --- finding 6: the Responses WebSocket ---------------------------------------------------------


def _sender(client: WSClient, messages: list[bytes]) -> tuple[threading.Thread, dict]:
    """Send ``messages`` (encoded frames) in 1 MiB pieces from a thread; ``progress`` says how
    far it got and when it last got further."""
    progress = {"sent": 0, "at": time.monotonic(), "error": None}

    def run():
        try:
            for data in messages:
                for i in range(0, len(data), MiB):
                    client.sock.sendall(data[i:i + MiB])
                    progress["sent"] += len(data[i:i + MiB])
                    progress["at"] = time.monotonic()
        except OSError as exc:
            progress["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, progress


def _frame(client: WSClient, text: str) -> bytes:
    import wsproto.events as E

    return client.ws.send(E.TextMessage(data=text))


def test_messages_behind_a_stalled_turn_are_not_read_past_a_bound(hostile, gateway_factory):
    """A turn stalls at the backend; the client sends 10 × 20 MB behind it. The relay stops
    reading the socket once a message's worth waits (mitmproxy, then the client's TCP, push back)
    instead of holding all of them (+550 MB). Nothing is lost: once the turn ends, every message
    is answered, in order."""
    gw = gateway_factory(hostile.url)
    client = WSClient(gw.base_url, timeout=120)
    end = terminal(client.turn({"type": "response.create", "model": "ok", "input": "hi"}))
    assert end["response"]["status"] == "completed"
    peak = Peak(gw.proc.pid)
    client.send({"type": "response.create", "model": "stall", "input": "hi"})
    wait_until(lambda: any(c["model"] == "stall" for c in Hostile.calls), what="the stalled turn reaching the backend")
    frame = _frame(client, "z" * (20 * MiB))  # (no JSON: each gets an error once its turn comes)
    thread, progress = _sender(client, [frame] * 10)
    # all of it sent (nothing pushed back), or nothing more taken for 3 s (pushed back)
    wait_until(lambda: not thread.is_alive() or time.monotonic() - progress["at"] > 3, timeout=120,
               what="the client sending everything, or being made to wait")
    pushed_back = thread.is_alive()
    Hostile.release.set()
    thread.join(120)
    assert progress["error"] is None and progress["sent"] == 10 * len(frame)
    assert terminal(client.events())["response"]["status"] == "completed"
    errors = [client.next_message() for _ in range(10)]
    assert [e["error"]["code"] for e in errors] == ["invalid_json"] * 10
    client.close()
    # a few copies of one message in flight (mitmproxy decodes, re-encodes and masks each), however many wait
    assert peak.grown < 256 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    assert pushed_back


def test_a_long_socket_is_not_held_in_memory(upstream, gateway_factory):
    """300 MB of messages on one socket (each refused: no JSON): mitmproxy would keep every one
    in flow.websocket.messages (+290 MB); the socket's flow keeps its first ones."""
    gw = gateway_factory(upstream.origin)
    client = WSClient(gw.base_url, timeout=120)
    end = terminal(client.turn({"type": "response.create", "model": "demo-model", "input": "hi"}))
    assert end["response"]["status"] == "completed"
    peak = Peak(gw.proc.pid)
    frame = _frame(client, "q" * (100 << 10))
    thread, progress = _sender(client, [frame] * 3000)
    for _ in range(3000):
        assert client.next_message()["error"]["code"] == "invalid_json"
    thread.join(60)
    assert progress["error"] is None
    end = terminal(client.turn({"type": "response.create", "model": "demo-model", "input": "and?"}))
    assert end["response"]["status"] == "completed"
    client.close()
    assert peak.grown < 120 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"


def test_what_a_long_sockets_flow_file_keeps(upstream, gateway_factory, tmp_path):
    """The flow file of a socket with 2500 refused messages and a turn: its first 4096 messages
    and 1024 turn records, and how many of each it left out."""
    flows = tmp_path / "socket.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(flows))
    client = WSClient(gw.base_url)
    for _ in range(2500):
        client.send("nope")
    for _ in range(2500):
        assert client.next_message()["error"]["code"] == "invalid_json"
    end = terminal(client.turn({"type": "response.create", "model": "demo-model", "input": "hi"}))
    assert end["response"]["status"] == "completed"
    client.close()
    wait_until(lambda: "WebSocket /v1/responses message 2501" in gw.log(), what="the last turn recorded")
    gw.stop()
    [flow] = [f for f in read_flows(flows) if f.websocket]
    meta = flow.metadata["resp2chat"]
    messages = flow.websocket.messages
    sent = 2501 + 2500 + len([e for e in meta["turns"][-1:]])  # (at least: the turn's events are more than one)
    assert len(messages) == 4096 and meta["messages_dropped"]["count"] >= sent - 4096
    assert messages[0].from_client and messages[0].content == b"nope"  # the first ones
    assert len(meta["turns"]) == 1024 and meta["turns_dropped"] == 2501 - 1024
    assert flow.comment.startswith("WebSocket /v1/responses · 2501 messages (2500 rejected, 1 completed)")


def test_warm_ups_chained_on_a_socket_hold_at_most_a_messages_worth(upstream, gateway_factory):
    """``generate: false`` warm-ups ask no backend, and each continuing the one before adds a
    message's worth (3 MiB of input, max_request_body_mb 4) to the conversation the socket
    remembers. It remembers at most max_request_body_mb of it (ws.Connection): a conversation
    larger than that is answered but not remembered, so continuing it is
    ``previous_response_not_found`` (a client sending them starts a new chain). Before, the
    socket held every chain whole, without end: 24 such warm-ups, +72 MiB. Measured once the
    flow's records and messages (their own budgets) and the gateway's caches are full."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=4",
                         "--set", "resp2chat_max_replay_entries=0")
    client = WSClient(gw.base_url, timeout=120)
    chunk = "x" * (3 * MiB)
    chain = {"previous": None}

    def warm(i: int) -> str:
        """A warm-up continuing the last one while it can."""
        msg = {"type": "response.create", "model": "demo-model", "input": [user(f"{i}{chunk}")], "generate": False}
        if chain["previous"]:
            msg["previous_response_id"] = chain["previous"]
        end = client.turn(msg)[-1]
        chain["previous"] = end["response"]["id"] if end["type"] == "response.completed" else None
        return end["type"] if end["type"] != "error" else end["error"]["code"]

    first = [warm(i) for i in range(24)]
    # a chain goes on while it fits: 3 MiB remembered, 6 MiB answered and not, its continuation refused
    assert first[:4] == ["response.completed", "response.completed", "previous_response_not_found",
                         "response.completed"], first
    time.sleep(1)
    base = memory(gw.proc.pid)["VmRSS"]
    for i in range(24, 48):
        warm(i)
    time.sleep(1)
    grown = memory(gw.proc.pid)["VmRSS"] - base
    client.close()
    assert grown < 40 * MiB, f"24 more chained warm-ups made the gateway hold {grown / MiB:.0f} MiB more"


def test_a_message_over_the_body_limit_is_refused_while_it_arrives(upstream, gateway_factory):
    """max_request_body_mb = 4: a 40 MB message is answered with the 413 error while the client
    is still sending it (it took ~9 s of buffering and copying before, and 64 MiB was the
    relay's own limit), the gateway holds about the limit of it, and the socket goes on; a
    message just under the limit is served."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=4")
    client = WSClient(gw.base_url, timeout=120)
    end = terminal(client.turn({"type": "response.create", "model": "demo-model", "input": "hi"}))
    assert end["response"]["status"] == "completed"
    peak = Peak(gw.proc.pid)
    big = _frame(client, json.dumps({"type": "response.create", "model": "demo-model", "input": "x" * (40 * MiB)}))
    thread, progress = _sender(client, [big])
    error = client.next_message()
    finished = not thread.is_alive() and progress["sent"] == len(big)
    assert error["type"] == "error" and error["status"] == 413 and error["error"]["code"] == "request_too_large"
    assert "max_request_body_mb (4 MiB)" in error["error"]["message"]
    assert not finished, "answered only once the client had sent all of it"
    thread.join(60)
    assert progress["error"] is None and progress["sent"] == len(big)  # (the rest was read, and dropped)
    assert peak.grown < 24 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    # (a warm-up: read, validated and lowered like a turn, answered without the backend)
    under = {"type": "response.create", "model": "demo-model", "input": "y" * (4 * MiB - 4096), "generate": False}
    assert terminal(client.turn(under))["response"]["status"] == "completed"
    client.close()


def test_a_message_in_many_small_frames_is_bounded_the_same(upstream, gateway_factory):
    """The same bound whatever the framing: a 40 MiB message in 4000-byte frames (a limit of
    4 MiB) is refused while it arrives and the socket goes on; a message in more frames than
    mitm_websocket.MAX_FRAGMENTS (each costs memory of its own) ends the socket with 1009."""
    import wsproto.events as E

    from resp2chat_io.mitm_websocket import MAX_FRAGMENTS

    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=4")
    client = WSClient(gw.base_url, timeout=120)
    assert terminal(client.turn({"type": "response.create", "model": "demo-model", "input": "hi"}))["response"][
        "status"] == "completed"
    peak = Peak(gw.proc.pid)
    piece = "x" * 4000
    frames = [client.ws.send(E.TextMessage(data=piece, message_finished=False)) for _ in range(40 * MiB // 4000)]
    frames.append(client.ws.send(E.TextMessage(data=piece, message_finished=True)))
    message = b"".join(frames)
    thread, progress = _sender(client, [message])
    error = client.next_message()
    assert not (not thread.is_alive() and progress["sent"] == len(message)), "answered only at the end"
    assert error["status"] == 413 and error["error"]["code"] == "request_too_large", error
    thread.join(60)
    end = terminal(client.turn({"type": "response.create", "model": "demo-model", "input": "and?"}))
    assert end["response"]["status"] == "completed"
    assert peak.grown < 24 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    tiny = [client.ws.send(E.TextMessage(data="y", message_finished=False)) for _ in range(MAX_FRAGMENTS + 100)]
    thread, _ = _sender(client, [b"".join(tiny)])
    closed = None
    while closed is None:
        for event in client._read():
            if isinstance(event, E.CloseConnection):
                closed = event.code
    assert closed == 1009
    thread.join(60)
    client.sock.close()
    assert requests.get(gw.base_url.removesuffix("/v1") + "/healthz", timeout=5).status_code == 200


# --- compressed request bodies -------------------------------------------------------------------


def test_compressed_bombs_are_inflated_off_the_loop_and_a_get_carries_no_body(upstream, gateway_factory):
    """A compressed request body of a few KiB may inflate to ``max_request_body_mb``: 32 KiB of
    gzip, 32 MiB of zeros, ~50-100 ms of CPU each. It was inflated in the gate's ``request``
    hook, on the event loop, for any method and path: a keyed client's few connections sending
    it in a loop held every stream and ``/healthz`` (12 of them: 0.7 s at the median). Now it is
    inflated in the worker (offload.py ``inflate``), one at a time, while the loop serves the
    others; and a GET or HEAD with a body is refused at its head, its body unread (no endpoint
    reads one)."""
    import gzip

    gw = gateway_factory(upstream.origin, "--set", "flow_detail=0")
    bomb = gzip.compress(b"\0" * (31 << 20), 9)
    assert len(bomb) < 64 << 10
    head = {"content-type": "application/json", "content-encoding": "gzip"}
    r = requests.get(gw.base_url + "/models", data=bomb, headers=head, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body", r.text[:300]
    assert "GET request carries no body" in r.json()["error"]["message"]
    stop, sent = threading.Event(), []

    def flood() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                answer = s.post(gw.base_url + "/responses", data=bomb, headers=head, timeout=60)
                assert answer.status_code == 400, answer.text[:300]  # (zeros: not JSON)
                sent.append(1)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    waits = []
    try:
        wait_until(lambda: len(sent) >= 4, 60, "the flood under way")
        with requests.Session() as s:
            for _ in range(40):
                started = time.monotonic()
                assert s.get(gw.base_url.removesuffix("/v1") + "/healthz", timeout=30).status_code == 200
                waits.append(time.monotonic() - started)
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    waits.sort()
    assert len(sent) >= 8, sent
    # (on the loop, eight such clients held /healthz for ~0.5 s at the median; off it, a few ms)
    assert waits[len(waits) // 2] < 0.1, waits
    r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, timeout=30)
    assert r.status_code == 200, r.text[:300]


def test_a_small_compressed_turn_waits_for_no_large_inflation(upstream, gateway_factory):
    """A compressed body that inflates to less than ``offload.LARGE`` is inflated on the loop
    (addons/gate.py ``decode``), not in the one worker: a client's small gzip'd turn is not
    queued behind other clients' large inflations (bombs refused once they pass
    ``max_request_body_mb``, ~55 ms of the worker each, six at a time). Compared with a bomb's
    own time under that flood (the worker's line), not with an absolute time: through the worker,
    a small turn took about as long as a bomb; on the loop, a small part of it."""
    import gzip
    import statistics

    from resp2chat_io.offload import LARGE

    gw = gateway_factory(upstream.origin, "--set", "flow_detail=0", "--set", "resp2chat_max_replay_entries=0")
    bomb = gzip.compress(b"\0" * (40 << 20), 9)  # (inflated to the 32 MiB limit, in the worker: a 413)
    head = {"content-type": "application/json", "content-encoding": "gzip"}
    small = gzip.compress(json.dumps({"model": "m", "input": "hi"}).encode())
    assert len(small) < LARGE
    stop, bombs, odd = threading.Event(), [], []  # bombs: (sent, answered) of each 413; odd: any other answer

    def flood() -> None:  # (no assert here: it would end this thread alone, and the flood with it, unseen)
        with requests.Session() as s:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answer = s.post(gw.base_url + "/responses", data=bomb, headers=head, timeout=60)
                except requests.RequestException as exc:
                    odd.append(repr(exc))
                    return
                if answer.status_code != 413:
                    odd.append((answer.status_code, answer.text[:300]))
                    return
                bombs.append((started, time.monotonic()))

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    turns = []
    try:
        wait_until(lambda: len(bombs) >= 12 or odd, 60, "the flood under way")
        began = time.monotonic()
        with requests.Session() as s:
            # (12 small turns at least, and until six bombs were sent and answered since the first of them:
            # the flood went on all along; one that stopped stops this within 30 s)
            while len(turns) < 12 or sum(sent > began for sent, _ in bombs) < 6:
                assert not odd and time.monotonic() < began + 30, ("the flood stopped", odd[:3], len(turns))
                started = time.monotonic()
                r = s.post(gw.base_url + "/responses", data=small, headers=head, timeout=30)
                turns.append(time.monotonic() - started)
                assert r.status_code == 200 and r.json()["status"] == "completed", r.text[:300]
                time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not odd, odd[:3]  # (every bomb a 413 until the end)
    waited, took = statistics.median(b - a for a, b in bombs[12:] or bombs), statistics.median(turns)
    assert took < waited / 3, (took, waited, turns)
