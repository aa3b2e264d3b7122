"""Issue 21: what a client can hold on the gateway's own port without sending a request.

mitmproxy holds a client connection until 600 s of silence (``tcp_timeout``), and any byte
resets that: a client sending half a request head, or a byte now and then, was held as long as
it liked, unauthenticated. ``header_timeout_secs`` (resp2chat_io/addons/head_deadline.py) closes
a connection that has not sent a whole head within it of connecting, or of its previous answer's
end; a request under way and a WebSocket are never cut by it, but a request body arriving slower
than ``MIN_BODY_RATE`` over the last ``header_timeout_secs`` is. Everything here runs through a real
mitmdump with a short deadline (``LIMIT``) and real clients; the time that must pass is measured
by a control connection that the gateway closes, never by a sleep.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from resp2chat_core.gate import BodyBudget, answers_overloaded, client_answers_overloaded
from resp2chat_core.head_deadline import MAX_WAITING, MIN_BODY_RATE, BodyRate, HeadDeadline
from resp2chat_io.demo_upstream import serve_in_thread

from helpers import (KiB, Codex, Peak, Upstream, cli_env, memory, open_fds, openai_client, read_flows, start_mitmweb_gateway,
                     stream_turn, terminal, wait_until)
from wsclient import WSClient

LIMIT = 2  # header_timeout_secs of the gateways here
DEADLINE = {"RESP2CHAT_HEADER_TIMEOUT_SECS": str(LIMIT)}
HALF_HEAD = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: appl"


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", env=DEADLINE)


def held(gw) -> int:
    """Client connections the gateway holds open: established TCP sockets on its port."""
    count = 0
    for line in Path(f"/proc/{gw.proc.pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == gw.port and fields[3] == "01":
            count += 1
    return count


def connect(gw, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def closed(sock: socket.socket) -> bool:
    """The gateway closed ``sock`` (it reads its end, or a reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def answer(sock: socket.socket) -> bytes:
    """One whole answer with a content-length, read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1 << 16)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(1 << 16)
    return head + b"\r\n\r\n" + body


def lifetimes(socks: list[tuple[socket.socket, float]], timeout: float = LIMIT + 10) -> list[float]:
    """How long after its connect each socket was closed by the gateway (polled until all were)."""
    took: dict[int, float] = {}
    wait_until(lambda: [took.setdefault(i, time.monotonic() - at) for i, (s, at) in enumerate(socks)
                        if i not in took and closed(s)] is not None and len(took) == len(socks),
               timeout=timeout, what=f"{len(socks)} connections closed")
    return list(took.values())


def deadline_passed(gw) -> socket.socket:
    """A control connection with half a head: once the gateway closed it, ``LIMIT`` seconds
    passed for every connection that started waiting before it (waits on that, no sleep)."""
    control = connect(gw, HALF_HEAD)
    wait_until(lambda: closed(control), timeout=LIMIT + 10, what="the control connection closed")
    return control


def test_half_heads_are_closed_at_the_deadline_and_memory_comes_back(gw):
    """500 connections each with half a request head: the gateway holds them (no key needed),
    answers /healthz meanwhile, closes every one at the deadline (not before), and its sockets
    come back to where they were. Before the deadline existed they
    were held 600 s (3000 of them: +60 MB)."""
    n = 500
    pid = gw.proc.pid
    assert terminal(stream_turn(gw, {"model": "demo-model", "input": "hi"}))["response"]["status"] == "completed"
    fds = open_fds(pid)
    peak = Peak(pid)
    socks = [(connect(gw, HALF_HEAD), time.monotonic()) for _ in range(n)]
    t = time.monotonic()
    assert requests.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - t < 1
    took = lifetimes(socks)
    grown = peak.grown
    assert LIMIT <= min(took) and max(took) < LIMIT + 3, (min(took), max(took))
    socks = [s for s, _ in socks]
    for s in socks:
        s.close()
    wait_until(lambda: held(gw) == 0 and open_fds(pid) <= fds + 2, what="the gateway's sockets back")
    # (~20 KiB each while held; what Python frees its allocator keeps for reuse, as after as many
    # ordinary requests: RSS does not fall back, the sockets and their buffers are gone)
    assert grown < 16 << 20, f"{grown >> 10} KiB for {n} connections"
    assert "Traceback" not in gw.log()


def test_a_trickled_head_is_closed_at_the_deadline_despite_its_bytes(gw):
    """A head sent a byte at a time, every 0.25 s (each byte would reset mitmproxy's own
    tcp_timeout): closed once ``LIMIT`` seconds passed since the connect, not later."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nx-slow: " + b"a" * 1000
    sock = connect(gw)
    start = time.monotonic()
    sent = 0
    while True:
        try:
            sock.sendall(head[sent:sent + 1])
        except OSError:
            break
        sent += 1
        if closed(sock) or time.monotonic() - start > LIMIT + 10:
            break
        wait_until(lambda: time.monotonic() - start >= sent * 0.25, what="the next byte's time")
    took = time.monotonic() - start
    assert closed(sock), f"still open after {took:.1f} s and {sent} bytes"
    assert LIMIT <= took < LIMIT + 2, took
    assert sent >= LIMIT / 0.25 - 1


def test_an_idle_keep_alive_connection_is_closed_and_clients_reconnect(gw, upstream):
    """A keep-alive connection idle past the deadline after an answer is closed (no answer
    written into it); the openai SDK and requests, whose pooled connection that was, open a new
    one without an error. Each answer restarts the clock: a connection asking again within the
    deadline stays open."""
    raw = connect(gw)
    start = time.monotonic()
    for _ in range(3):  # three answers, each well within the deadline of the one before
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer(raw).startswith(b"HTTP/1.1 200")
        wait_until(lambda: time.monotonic() - start >= LIMIT * 0.6 * (_ + 1), what="most of a deadline")
    assert not closed(raw)  # (open for 1.8 deadlines by now: each answer restarted its clock)
    wait_until(lambda: closed(raw), timeout=LIMIT + 10, what="the idle keep-alive connection closed")
    assert raw.recv(1) == b""  # closed without an answer (no 408 written into it)

    client = openai_client(gw)
    session = requests.Session()
    first = client.responses.create(model="demo-model", input="first")
    assert session.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5).status_code == 200
    assert held(gw) == 2
    deadline_passed(gw)
    wait_until(lambda: held(gw) == 0, what="both pooled connections closed by the gateway")
    second = client.responses.create(model="demo-model", input="second", previous_response_id=first.id)
    assert second.status == "completed" and "second" in second.output_text
    assert session.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in gw.log()


def post_head(length: int) -> bytes:
    return (b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % length)


def test_a_request_under_way_is_never_cut(gw):
    """Past the head, the head deadline does not apply: a body uploaded slowly (3× the minimum
    rate, ``MIN_BODY_RATE``) for three deadlines and a streamed turn that lasts two deadlines are
    answered whole. (A body slower than the minimum rate is cut: the test below.)"""
    body = json.dumps({"model": "demo-model", "input": "slowly uploaded " + "x" * (9 * LIMIT * MIN_BODY_RATE)}).encode()
    sock = connect(gw, post_head(len(body)))
    start = time.monotonic()
    rate, chunk = 3 * MIN_BODY_RATE, 4096
    for i in range(0, len(body), chunk):  # the body over 3 deadlines, 4 KiB at a time
        wait_until(lambda: time.monotonic() - start >= i / rate, what="the next chunk's time")
        sock.sendall(body[i:i + chunk])
    got = answer(sock)
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    assert json.loads(got.partition(b"\r\n\r\n")[2])["status"] == "completed"
    assert time.monotonic() - start >= 3 * LIMIT - 1

    start = time.monotonic()
    events = stream_turn(gw, {"model": "demo-model", "input": "slow: 250\nwords: 30"})  # ~8 s of tokens
    assert terminal(events)["response"]["status"] == "completed"
    assert time.monotonic() - start >= 2 * LIMIT


def stall_bodies(gw, n: int, sent: int) -> list[float]:
    """``n`` heads declaring 3 × ``sent`` bytes of body, ``sent`` of it at once, then a byte every
    0.5 s on each: how long after the stall began each was closed (or the ones still open after
    ``LIMIT + 10`` seconds fail)."""
    socks = [connect(gw, post_head(3 * sent)) for _ in range(n)]
    for sock in socks:
        sock.sendall(b"x" * sent)
    stalled = time.monotonic()
    open_, took = list(socks), []
    while open_ and time.monotonic() - stalled < LIMIT + 10:
        for sock in list(open_):
            try:
                sock.sendall(b"x")
            except OSError:
                pass
            if closed(sock):
                open_.remove(sock)
                took.append(time.monotonic() - stalled)
        tick = int((time.monotonic() - stalled) / 0.5) + 1
        wait_until(lambda: time.monotonic() - stalled >= 0.5 * tick, what="the next byte's time")
    assert not open_, f"{len(open_)} of {n} stalling bodies still open after {time.monotonic() - stalled:.1f} s"
    for sock in socks:
        sock.close()
    return took


def test_a_stalling_body_is_closed_and_its_bytes_let_go(gw):
    """Heads that declare 24 MiB of body, 8 MiB of it sent at once, then a byte every 0.5 s (each
    would reset mitmproxy's tcp_timeout): each is closed about ``LIMIT`` seconds after its body
    stalled (its rate over the last ``LIMIT`` seconds fell below ``MIN_BODY_RATE``), and the
    gateway lets their bytes go: a second round of them holds no more than the first did. Before
    the rule they were held as long as the client liked (12 such, 16 MiB each: +231 MiB, all open
    after 40 s), the head deadline stopping at the head."""
    n, sent = 4, 8 << 20
    pid = gw.proc.pid
    assert terminal(stream_turn(gw, {"model": "demo-model", "input": "hi"}))["response"]["status"] == "completed"
    before = memory(pid)["VmRSS"]
    for round_ in range(2):
        peak = Peak(pid)
        took = stall_bodies(gw, n, sent)
        assert LIMIT - 1 <= min(took) and max(took) < LIMIT + 4, took
        grown = memory(pid)["VmHWM"] - before
        assert grown < 3 * n * sent, f"{grown >> 20} MiB for {n} bodies of {sent >> 20} MiB"  # (mitmproxy copies them)
        if round_ == 0:
            first = grown
            assert peak.grown > n * sent // 2  # (it did hold them while they came)
    # (what Python frees its allocator keeps for reuse: RSS need not fall, but the second
    # round's bodies reuse the first's memory, which they could not if it were still held)
    assert grown < first + n * sent // 4, f"{first >> 20} MiB, then {grown >> 20} MiB"
    assert requests.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in gw.log()


def test_an_idle_websocket_is_not_closed(gw):
    """An upgraded connection has no head deadline: a socket idle for longer than one (a control
    connection opened after it was closed meanwhile) still carries turns."""
    ws = WSClient(gw.base_url)
    first = ws.turn({"type": "response.create", "model": "demo-model", "input": "before the idle"})
    assert first[-1]["type"] == "response.completed"
    deadline_passed(gw)
    deadline_passed(gw)
    again = ws.turn({"type": "response.create", "model": "demo-model", "input": "after the idle",
                     "previous_response_id": first[-1]["response"]["id"]})
    assert again[-1]["type"] == "response.completed", again[-1]
    ws.close()


@pytest.mark.codex
def test_codex_keeps_its_websocket_through_a_long_tool_run(codex_bin, upstream, gateway_factory, tmp_path):
    """Codex's built-in provider on a gateway with a 2 s head deadline: its WebSocket stays open
    while Codex runs a command for longer than that (no message on the socket meanwhile) and
    while a slow answer streams; one socket, no fallback to HTTP, no reconnect."""
    path = tmp_path / "codex.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(path), env=DEADLINE)
    cx = Codex.at(codex_bin, tmp_path)
    cx.configure_builtin(gw.base_url)
    run = cx.exec("run: sleep 5 && echo awake-after-the-idle")
    assert run.returncode == 0, run.output
    assert "The tool returned: awake-after-the-idle" in run.output
    assert not [m for m in ("Falling back from WebSockets", "Reconnecting", "failed to connect") if m in run.output]
    gw.stop()
    sockets = [f for f in read_flows(path) if f.websocket is not None]
    assert len(sockets) == 1
    turns = [t for t in sockets[0].metadata["resp2chat"]["turns"] if not t["warmup"]]
    assert [t["status"] for t in turns] == ["completed", "completed"]


def test_at_most_max_waiting_connections_wait_for_a_head(upstream, gateway_factory):
    """Past ``MAX_WAITING`` connections without a head, a new one has the oldest waiting one
    closed at once (long before the deadline): a flood of them holds a bounded number of sockets."""
    gw = gateway_factory(upstream.origin)  # (the default deadline: 30 s)
    socks = [connect(gw, HALF_HEAD) for _ in range(MAX_WAITING)]
    wait_until(lambda: held(gw) == MAX_WAITING, what=f"the gateway holding {MAX_WAITING} half heads")
    assert not any(closed(s) for s in socks)
    newest = connect(gw, HALF_HEAD)
    wait_until(lambda: closed(socks[0]), what="the oldest closed")
    assert not any(closed(s) for s in socks[1:]) and not closed(newest)
    assert requests.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5).status_code == 200  # (it too evicts one)
    for s in [*socks, newest]:
        s.close()


# --- the rule alone (resp2chat_core/head_deadline.py) ------------------------------------------


def test_the_rule_waits_from_connect_and_from_each_answers_end():
    clock = HeadDeadline(limit=10, cap=100)
    clock.connected("a", 0)
    clock.connected("b", 5)
    assert clock.overdue(9.9) == [] and clock.overdue(10) == ["a"] and clock.overdue(15) == ["a", "b"]
    clock.head("a", "r1")  # a head is in: no deadline while its answer runs, however long
    assert clock.overdue(1000) == ["b"] and len(clock) == 1
    clock.head("a", "r2")  # (two in flight, as HTTP/2 could)
    clock.ended("a", "r1", 1000)
    assert clock.overdue(2000) == ["b"]
    clock.ended("a", "r2", 1001)  # the last answer ended: waits from there
    assert clock.overdue(1010) == ["b"] and clock.overdue(1011) == ["b", "a"]
    clock.waiting("a", 1011)  # (still writing: its clock starts again)
    assert clock.overdue(1020) == ["b"]
    clock.gone("b")
    assert clock.overdue(5000) == ["a"] and "b" not in clock
    clock.ended("b", "r9", 5000)  # (a hook after the close: nothing comes back)
    clock.head("b", "r9")
    assert "b" not in clock and clock.overdue(9000) == ["a"]
    clock.limit = 0  # no deadline
    assert clock.overdue(10 ** 9) == []


def test_the_rule_closes_the_oldest_waiting_past_the_cap():
    clock = HeadDeadline(limit=10, cap=2)
    assert clock.connected("a", 0) == [] and clock.connected("b", 1) == []
    clock.head("a", "r")  # busy: does not count
    assert clock.connected("c", 2) == []
    assert clock.connected("d", 3) == ["b"] and "b" not in clock
    clock.ended("a", "r", 4)  # waits again, the newest
    assert clock.connected("e", 5) == ["c", "d"]
    assert len(clock) == 2 and clock.overdue(100) == ["a", "e"]


def test_the_body_rule_wants_the_rate_over_each_window_not_since_the_head():
    rule = BodyRate(window=10, rate=100)
    assert not any(rule.sample("a", 0, 90 * t, t) for t in range(1, 10))  # (within the first window)
    assert rule.sample("a", 0, 900, 10)  # 90 B/s over the first 10 s
    rule = BodyRate(window=10, rate=100)
    assert not any(rule.sample("b", 0, 10_000 * t, t) for t in range(1, 11))  # a fast start...
    assert not any(rule.sample("b", 0, 100_000 + t, 10 + t) for t in range(1, 10))  # (its bytes in the window)
    assert rule.sample("b", 0, 100_010, 20)  # ...then a stall: 10 bytes over the last 10 s
    assert not rule.sample("b", 30, 0, 31)  # a new body on the connection starts afresh
    rule = BodyRate(window=10, rate=100)
    assert not any(rule.sample("c", 0, 101 * t, t) for t in range(1, 100))  # a slow honest one, never
    rule.window = 0
    assert not rule.sample("c", 0, 0, 1000)  # 0: no bound
    rule = BodyRate(window=10, rate=100)
    rule.sample("d", 0, 0, 5)
    rule.keep({"e"})
    assert not rule.sample("d", 0, 0, 9)  # (forgotten: its clock starts again at its head's time)
    assert rule.sample("d", 0, 0, 10)


def test_the_body_rule_with_no_rate_bounds_nothing():
    rule = BodyRate(window=10, rate=0)  # (min_request_body_rate_kb 0)
    assert not any(rule.sample("a", 0, 0, t) for t in range(1, 100))
    rule.rate = 100  # (changed: applies at once)
    assert rule.sample("a", 0, 0, 100)


# --- how many bodies arrive at once (max_request_bodies_mb) ----------------------------------


def test_the_body_budget_counts_declared_sizes_until_each_body_is_in():
    budget = BodyBudget(cap=100)
    took = budget.take  # (None: taken; else the refusal)
    assert took("r1", "c1", 60) is None and took("r2", "c2", 40) is None and budget.held == 100  # (up to the cap)
    assert took("r3", "c3", 1).code == "server_overloaded" and budget.held == 100 and len(budget) == 2  # (past it)
    assert took("r4", "c4", 0) is None  # (no body: no share)
    budget.give_back("r1")
    budget.give_back("r1")  # (twice: nothing more)
    assert budget.held == 40 and took("r3", "c3", 60) is None and took("r5", "c5", 1) is not None
    assert took("r3", "c3", 60) is None and budget.held == 100  # (taken again by the same request: counted once)
    budget.gone("c3")
    budget.gone("c3")
    assert budget.held == 40 and len(budget) == 1
    budget.give_back("r2")
    assert budget.held == 0 and took("big", "c6", 500) is None  # (one body always, when none other arrives)
    assert took("r7", "c7", 1) is not None
    budget.cap = 0  # (no cap: still counted, never refused)
    assert took("r7", "c7", 10**9) is None and budget.held == 500 + 10**9
    budget.gone("c6")
    budget.gone("c7")
    assert budget.held == 0 and len(budget) == 0


def test_one_client_holds_at_most_half_of_the_body_budget():
    """One key's bodies arriving at once take at most half of ``max_request_bodies_mb``: past it
    its next is refused (429, its own limit) while another client's still gets in; a client with
    none arriving always gets one in; what it gives back is its share again."""
    budget = BodyBudget(cap=100)
    assert budget.take("a1", "ca", 30, "alice") is None and budget.take("a2", "ca", 20, "alice") is None
    refused = budget.take("a3", "cb", 1, "alice")
    assert (refused.status, refused.code) == (429, "rate_limit_exceeded") and "try again in 1s" in refused.message
    assert budget.take("b1", "cc", 50, "bob") is None and budget.held == 100  # (the other half: bob's)
    assert budget.take("c1", "cd", 1, "carol").code == "server_overloaded"  # (all of it held)
    budget.give_back("b1")
    budget.gone("ca")
    assert budget.take("big", "ce", 60, "carol") is None  # (none of hers arriving: one body, past her half)
    assert budget.take("c2", "ce", 1, "carol").code == "rate_limit_exceeded"
    assert budget.take("a4", "cf", 40, "alice") is None and budget.held == 100
    budget.give_back("a4")
    budget.give_back("big")
    assert budget.held == 0 and budget.take("x", "cg", 60, None) is None  # (no client: no share)
    assert budget.take("y", "ch", 40, None) is None



def test_the_answers_budget_refuses_a_read_past_it_and_counts_a_paid_answer_always():
    """The same budget for the gateway's own large answers waiting (``max_answers_waiting_mb``):
    a read past it gets its own 503 (``answers_overloaded``, naming the setting); an answer the
    client paid for (``must``) is counted whatever is held; a connection's share (``on``) goes
    with it."""
    budget = BodyBudget(cap=100, overloaded=answers_overloaded)
    assert budget.take("read1", "c1", 70) is None and budget.on("c1") == 70
    refused = budget.take("read2", "c2", 40)
    assert (refused.status, refused.code, refused.retry_after) == (503, "server_overloaded", 1)
    assert "max_answers_waiting_mb" in refused.message and refused.param == "max_answers_waiting_mb"
    assert budget.take("turn", "c2", 40, must=True) is None and budget.held == 110  # (paid for: let out)
    assert budget.take("turn2", "c1", 500, must=True) is None and budget.on("c1") == 570
    assert budget.take("read3", "c3", 1) is not None
    budget.gone("c1")
    assert budget.held == 40 and budget.on("c1") == 0 and budget.take("read3", "c3", 60) is None
    budget.give_back("turn")
    budget.give_back("read3")
    assert budget.held == 0 and budget.take("huge", "c4", 10**6) is None  # (one always, when none other waits)
    # a client past its half is told of the answers' share, not of request bodies (the re-read)
    shared = BodyBudget(cap=100, overloaded=answers_overloaded, share_overloaded=client_answers_overloaded)
    assert shared.take("a", "c1", 30, "alice") is None
    mine = shared.take("b", "c2", 30, "alice")
    assert (mine.status, mine.code, mine.param) == (429, "rate_limit_exceeded", "max_answers_waiting_mb"), mine
    assert "max_request_bodies_mb" not in mine.message and "answers" in mine.message, mine.message


def test_the_rate_rule_on_an_answer_counts_the_bytes_taken():
    """``BodyRate`` on an answer: what the client took (the answer's size less what still waits)
    over each window; a fast start does not pay for a stall after it, a steady reader above the
    rate is never cut, and a new answer on the connection (a new ``since``) starts afresh."""
    size = 10_000
    rule = BodyRate(window=10, rate=100)  # (1000 bytes a window)
    assert not rule.sample("c", 0, size - 4000, 5)  # (the kernel took 6000 at once)
    assert not rule.sample("c", 0, size - 4000, 10)  # (6000 over the first window)
    assert rule.sample("c", 0, size - 3990, 16)  # (10 bytes over the last 10 s: cut)
    steady = BodyRate(window=10, rate=100)
    assert not any(steady.sample("d", 0, t * 150, t) for t in range(1, 60))  # (150 a second, above the rate)
    assert not rule.sample("c", 100, 0, 101)  # (a new answer: its own first window)


BODIES_LIMIT = {**DEADLINE, "RESP2CHAT_MAX_REQUEST_BODY_MB": "4"}
MiB = 1 << 20


def head_expecting(length: int) -> bytes:
    """A turn's head declaring ``length`` bytes of body, sent only once the gateway says so
    (``expect: 100-continue``: it answers ``100`` once the body is let in, else its refusal)."""
    return post_head(length).replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n")


def first_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """The status, header fields and body (an interim ``100`` has none) of the next answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(1 << 16)
        assert got, f"closed before an answer: {data!r}"
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    fields = {k.strip().lower().decode(): v.strip().decode()
              for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    if status == 100:
        return status, fields, b""
    while len(rest) < int(fields["content-length"]):
        rest += sock.recv(1 << 16)
    return status, fields, rest


def slow_bodies(gw, n: int, size: int, sent: int) -> tuple[list[socket.socket], list, int]:
    """``n`` connections, one after the other, each with a head declaring ``size`` bytes of body
    (``head_expecting``): each one let in sends ``sent`` bytes of it at once, then all of them
    trickle the rest at three times ``MIN_BODY_RATE`` (above the minimum with room for a loaded
    machine: never cut) until two deadlines passed.
    Returns the ones let in (still open), the refusals (status, fields, JSON)
    and the gateway's peak memory meanwhile above where it was."""
    peak = Peak(gw.proc.pid)
    admitted, refused = [], []
    for _ in range(n):
        sock = connect(gw, head_expecting(size))
        status, fields, body = first_answer(sock)
        if status == 100:
            sock.sendall(b"x" * sent)
            admitted.append(sock)
        else:
            refused.append((status, fields, json.loads(body)))
            sock.close()
    start, chunk = time.monotonic(), 512
    rate = 3 * MIN_BODY_RATE
    given = 0
    while time.monotonic() - start < 2 * LIMIT + 0.5:
        due = int((time.monotonic() - start) * rate) - given  # (catching up after a slow turn of the machine)
        if due >= chunk:
            for sock in admitted:
                sock.sendall(b"x" * due)
            given += due
        time.sleep(0.05)
    assert not [s for s in admitted if closed(s)], "a body above the minimum rate was cut"
    return admitted, refused, peak.grown


def test_one_clients_slow_uploads_leave_the_others_half_of_the_budget(upstream, gateway_factory):
    """Two keyed clients, ``max_request_bodies_mb`` 8: alice's bodies arriving at once hold at most
    4 MiB (her half): her second 3 MiB body is refused at its head (429 ``rate_limit_exceeded``,
    ``retry-after``: her own limit, as the SDKs and Codex wait it out), while bob's gets in. Before,
    alice alone could take the whole budget and every other client got 503s until her uploads ended."""
    clients = [{"name": "alice", "key": "alice-key-0123456789abcdef"}, {"name": "bob", "key": "bob-key-0123456789abcdef"}]
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={**BODIES_LIMIT, "RESP2CHAT_MAX_REQUEST_BODIES_MB": "8",
                              "RESP2CHAT_CLIENTS": json.dumps(clients)})

    def head(who: int) -> bytes:
        return head_expecting(3 * MiB).replace(b"\r\n\r\n", b"\r\nauthorization: Bearer %s\r\n\r\n"
                                                % clients[who]["key"].encode())

    socks = [connect(gw, head(0))]
    try:
        assert first_answer(socks[0])[0] == 100
        socks.append(connect(gw, head(0)))
        status, fields, body = first_answer(socks[-1])
        body = json.loads(body)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", (status, body)
        assert fields["retry-after"] == "1" and "max_request_bodies_mb" in body["error"]["message"]
        socks.append(connect(gw, head(1)))
        assert first_answer(socks[-1])[0] == 100  # (bob: the other half is his)
        socks.append(connect(gw, head(1)))
        status, _, body = first_answer(socks[-1])
        assert status == 503 and json.loads(body)["error"]["code"] == "server_overloaded"  # (6 of 8 MiB held: all clients' room)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("cap_mb", [16, 0], ids=["capped", "no-cap"])
def test_slow_bodies_arriving_together_hold_at_most_max_request_bodies_mb(upstream, gateway_factory, cap_mb):
    """24 connections each declaring a 4 MiB body (``max_request_body_mb`` 4), sending 3.75 MiB of
    it at once then the rest just above the minimum rate, for two deadlines (the rate rule holds
    none of them: each is an honest slow upload). With ``max_request_bodies_mb`` 16, four are let
    in and the others refused at the head, their bodies unread: ``503 server_overloaded`` with
    ``retry-after``; the gateway's peak memory grows by about the cap. Once the four go, their
    share comes back: a body of the whole cap is let in. Without a cap (0, as before it existed)
    all 24 are let in and held: the gateway's memory grows past the bound by about 90 MiB (the
    ``no-cap`` case: what the ``capped`` one would measure without the budget)."""
    n, size, sent = 24, 4 * MiB, 4 * MiB - 256 * KiB
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={**BODIES_LIMIT, "RESP2CHAT_MAX_REQUEST_BODIES_MB": str(cap_mb)})
    assert terminal(stream_turn(gw, {"model": "demo-model", "input": "hi"}))["response"]["status"] == "completed"
    bound = 16 * MiB
    admitted, refused, grown = slow_bodies(gw, n, size, sent)
    try:
        if not cap_mb:
            assert len(admitted) == n and not refused
            assert grown > bound + 32 * MiB, f"{grown >> 20} MiB for {n} bodies of {sent >> 20} MiB"
            return
        # (4 bodies of 3.75 MiB: 15 MiB; what mitmproxy's buffers and the refusals add is small)
        assert grown < bound + 12 * MiB, f"{grown >> 20} MiB with max_request_bodies_mb {cap_mb}"
        assert len(admitted) == 4 and len(refused) == n - 4, (len(admitted), len(refused))
        for status, fields, body in refused:
            assert status == 503 and fields["retry-after"] == "1" and fields.get("retry-after-ms") == "1000"
            assert body["error"]["code"] == "server_overloaded" and "max_request_bodies_mb" in body["error"]["message"]
            assert fields["x-request-id"] and fields["connection"] == "close"
    finally:
        for sock in admitted:
            sock.close()
    # their shares come back with their connections: four bodies again, not one more
    def let_in() -> socket.socket | None:
        sock = connect(gw, head_expecting(size))
        if first_answer(sock)[0] == 100:
            return sock
        sock.close()
        return None

    again = [wait_until(let_in, what="a body let in again once the others went")]
    try:
        again += [let_in() for _ in range(4)]
        assert [s is not None for s in again] == [True] * 4 + [False]
    finally:
        for sock in again:
            if sock is not None:
                sock.close()
    assert "Traceback" not in gw.log()


def test_min_request_body_rate_kb_changed_while_the_gateway_runs(upstream, tmp_path):
    """``min_request_body_rate_kb`` set in mitmweb's options editor applies to the bodies arriving
    from then on: at 64 KiB/s a body arriving at 16 KiB/s (four times the default minimum, never
    cut by it: ``test_a_request_under_way_is_never_cut``) is cut about a deadline after its head;
    at 0 a body that stops coming altogether is held (no minimum rate), and answered once the
    rest of it comes."""
    gw, put = start_mitmweb_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                                    env={**cli_env(tmp_path), **DEADLINE})
    try:
        assert put(resp2chat_min_request_body_rate_kb=64).status_code == 200
        body = json.dumps({"model": "demo-model", "input": "x" * (64 * LIMIT * KiB)}).encode()
        sock = connect(gw, post_head(len(body)))
        start, rate, sent = time.monotonic(), 4 * MIN_BODY_RATE, 0
        while not closed(sock) and time.monotonic() - start < LIMIT + 6:
            due = min(int((time.monotonic() - start) * rate), len(body) - 1)
            if due > sent:
                try:
                    sock.sendall(body[sent:due])
                except OSError:
                    break
                sent = due
            time.sleep(0.05)
        took = time.monotonic() - start
        assert LIMIT - 1 <= took < LIMIT + 4, f"cut after {took:.1f} s ({sent} bytes sent)"
        sock.close()

        assert put(resp2chat_min_request_body_rate_kb=0).status_code == 200
        body = json.dumps({"model": "demo-model", "input": "stalled then whole"}).encode()
        sock = connect(gw, post_head(len(body)) + body[:10])
        deadline_passed(gw)  # (both opened after the body stalled: two deadlines without a byte of it)
        deadline_passed(gw)
        assert not closed(sock)
        sock.sendall(body[10:])
        got = answer(sock)
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        done = json.loads(got.partition(b"\r\n\r\n")[2])
        assert done["status"] == "completed" and "stalled then whole" in json.dumps(done["output"])
        sock.close()
        assert "Traceback" not in gw.log() and "Addon error" not in gw.log()
    finally:
        gw.stop()


# --- honest large uploads are never refused for room -------------------------------------------


@pytest.fixture
def wide_upstream():
    """The demo backend with a context that takes a 2.5 MB Codex history (~640k tokens)."""
    server, base_url = serve_in_thread(max_context=4 << 20)
    yield Upstream(base_url, server)
    server.shutdown()
    server.server_close()


def long_history(tag: str, size: int = 2_500_000) -> list[dict]:
    """A Codex-like conversation of about ``size`` bytes of JSON: question/answer pairs, then a question."""
    items, total, k = [], 0, 0
    while total < size:
        pair = [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": f"{tag} question {k} " + "q" * 900}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a" * 1000}]}]
        items += pair
        total += len(json.dumps(pair))
        k += 1
    return items + [{"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": f"{tag}: and now?"}]}]


def test_honest_large_uploads_at_once_are_never_refused(wide_upstream, gateway_factory):
    """8 Codex histories of 2.5 MB sent at once at loopback speed (the openai SDK, no retries)
    through a gateway with the default ``max_request_bodies_mb``: every one is answered. With a
    cap of 8 MiB, three such bodies arriving at once (7.2 MiB) are all let in, a fourth is not,
    and the three are answered once whole."""
    import concurrent.futures

    gw = gateway_factory(wide_upstream.origin, "--set", "resp2chat_max_replay_entries=0")
    client = openai_client(gw, timeout=120)
    histories = [long_history(f"session {i}") for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(histories)) as pool:
        done = list(pool.map(lambda h: client.responses.create(model="demo-model", input=h), histories))
    assert [r.status for r in done] == ["completed"] * len(histories)

    gw = gateway_factory(wide_upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_MAX_REQUEST_BODIES_MB": "8"})
    bodies = [json.dumps({"model": "demo-model", "input": long_history(f"held {i}")}).encode() for i in range(4)]
    socks = [connect(gw, head_expecting(len(b))) for b in bodies[:3]]
    assert [first_answer(s)[0] for s in socks] == [100, 100, 100]
    for sock, body in zip(socks, bodies):
        sock.sendall(body[:len(body) // 2])
    fourth = connect(gw, head_expecting(len(bodies[3])))
    assert first_answer(fourth)[0] == 503
    fourth.close()
    for sock, body in zip(socks, bodies):
        sock.sendall(body[len(body) // 2:])
    for sock in socks:
        got = answer(sock)
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        sock.close()


def test_the_openai_sdk_retries_a_body_refused_for_room_and_gets_through(wide_upstream, gateway_factory):
    """A 2.5 MB upload that finds the bodies arriving at the cap (``max_request_bodies_mb`` 4,
    one arriving): the openai SDK reads the early 503 while it sends, waits its ``retry-after``
    and tries again; once the other body is in, its retry is answered."""
    import httpx

    gw = gateway_factory(wide_upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_MAX_REQUEST_BODIES_MB": "4"})
    held = json.dumps({"model": "demo-model", "input": long_history("held")}).encode()
    sock = connect(gw, head_expecting(len(held)))
    assert first_answer(sock)[0] == 100
    sock.sendall(held[:len(held) // 2])
    statuses: list[int] = []
    seen = httpx.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]})
    client = openai_client(gw, max_retries=3, timeout=120, http_client=seen)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(client.responses.create(model="demo-model",
                                                                                     input=long_history("retried"))))
    worker.start()
    try:
        wait_until(lambda: 503 in statuses, what="the SDK's first attempt refused")
        sock.sendall(held[len(held) // 2:])
        got = answer(sock)
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
    finally:
        sock.close()
        worker.join(60)
    assert result and result[0].status == "completed"
    assert statuses[0] == 503 and statuses[-1] == 200, statuses


def test_codex_retries_a_turn_refused_for_room_and_gets_through(codex_bin, upstream, gateway_factory, tmp_path):
    """Codex over HTTP with its own retries (``request_max_retries`` 4, its default) meets a
    gateway whose bodies arriving are at ``max_request_bodies_mb`` (1 MiB, one arriving): its turn
    is refused with the 503, and once the other body's connection is gone its retry is served."""
    log = tmp_path / "access.log"
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         "--set", f"resp2chat_access_log_path={log}", env={"RESP2CHAT_MAX_REQUEST_BODIES_MB": "1"})
    sock = connect(gw, head_expecting(MiB))
    assert first_answer(sock)[0] == 100
    sock.sendall(b"x" * 1000)
    cx = Codex.at(codex_bin, tmp_path)
    cx.configure(gw.base_url)
    config = cx.home / "config.toml"
    config.write_text(config.read_text().replace("request_max_retries = 0", "request_max_retries = 4"))
    runs: list = []
    worker = threading.Thread(target=lambda: runs.append(cx.exec("hello through a full gateway")))
    worker.start()
    try:
        wait_until(lambda: log.exists() and "server_overloaded" in log.read_text(), timeout=60,
                   what="Codex's first attempt refused for room")
    finally:
        sock.close()
        worker.join(150)
    assert runs and runs[0].returncode == 0, runs[0].output if runs else "no run"
    assert "You said: hello through a full gateway" in runs[0].output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["http_status"], x["code"]) for x in lines][0] == (503, "server_overloaded")
    assert lines[-1]["status"] == "completed"


# --- the gateway's own large answers, waiting for slow readers -----------------------------------

PAGE_ITEMS, PAGE_TEXT = 4, 3900 * KiB  # a conversation whose items page is about 15 MiB


def large_conversation(gw) -> tuple[str, int]:
    """A conversation of ``PAGE_ITEMS`` messages of ``PAGE_TEXT`` each: its id and the size of its
    items page (``GET /v1/conversations/{id}/items``)."""
    items = [{"type": "message", "role": "user", "content": f"{i}" * PAGE_TEXT} for i in range(PAGE_ITEMS)]
    made = requests.post(f"{gw.base_url}/conversations", json={"items": items}, timeout=60)
    assert made.status_code == 200, made.text
    conv = made.json()["id"]
    page = requests.get(f"{gw.base_url}/conversations/{conv}/items", timeout=60)
    assert page.status_code == 200 and len(page.json()["data"]) == PAGE_ITEMS
    return conv, len(page.content)


def items_get(conv: str) -> bytes:
    return f"GET /v1/conversations/{conv}/items HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def trickler(gw, conv: str) -> tuple[socket.socket, int, dict]:
    """A raw-socket reader of the items page with a small receive buffer (the kernel takes little
    of the answer for it): its socket, and the status and header fields of its answer (what it
    read of the body: ``fields["read"]``)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(items_get(conv))
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(256)
        assert got, f"closed before an answer: {data!r}"
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    fields = {k.strip().lower().decode(): v.strip().decode()
              for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    return sock, int(head.split(b" ")[1]), {**fields, "read": rest}


def trickle(socks: list[socket.socket], stop: threading.Event, cut: dict) -> None:
    """Read 256 bytes of each socket every 0.25 s (1 KiB/s: a few bytes every few seconds, in
    effect, against a minimum of 4 KiB/s) until ``stop``; ``cut``: socket index -> when the
    gateway closed it (monotonic)."""
    while not stop.is_set():
        for i, sock in enumerate(socks):
            if i in cut:
                continue
            sock.setblocking(False)
            try:
                sock.recv(256)
            except (BlockingIOError, OSError):
                pass
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1:  # (no longer ESTABLISHED: closed
                cut[i] = time.monotonic()  # or reset by the gateway, whatever its receive buffer still holds)
        time.sleep(0.25)


@pytest.mark.parametrize("cap_mb", [48, 0], ids=["capped", "no-cap"])
def test_slow_readers_of_large_answers_hold_at_most_max_answers_waiting_mb(upstream, gateway_factory, cap_mb):
    """The red team's finding: clients GET a large page of the gateway's own (a conversation's
    items, ~15 MiB here) and read it a few bytes at a time. Each answer waited whole in the
    gateway's memory for as long as its client trickled (``Stalls`` never cut them: what waits
    changes). With ``max_answers_waiting_mb`` 48, three are let out and the other seven refused
    at once with ``503 server_overloaded`` and ``retry-after``; the gateway's memory grows by about
    the cap; the tricklers are closed within a few seconds (they take their answer slower than
    ``min_request_body_rate_kb``: the rate rule), after which their share is back and a normal client's read goes through. Without a cap (0, as before it
    existed) all ten are let out and held, never cut: the memory grows by over 100 MiB (the kernel's send buffers take a few MiB of
    each; the ``capped`` case measured 354 MiB before the budget)."""
    n, limit = 10, 5  # (header_timeout_secs: longer than opening ten readers takes on a loaded machine, or
    # the first are cut, their share back, before the last open; the trickling starts with the first)
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_HEADER_TIMEOUT_SECS": str(limit), "RESP2CHAT_MAX_ANSWERS_WAITING_MB": str(cap_mb)})
    conv, size = large_conversation(gw)
    assert 15 * MiB < size < 16 * MiB, size
    base = memory(gw.proc.pid)["VmRSS"]
    stop, cut, trickling, readers = threading.Event(), {}, [], []
    worker = threading.Thread(target=trickle, args=(trickling, stop, cut))
    worker.start()
    try:
        for _ in range(n):
            readers.append(trickler(gw, conv))
            if readers[-1][1] == 200:
                trickling.append(readers[-1][0])
        time.sleep(1.5)  # (a sweep: what the refused reads left is collected)
        grown = memory(gw.proc.pid)["VmRSS"] - base
        statuses = [status for _, status, _ in readers]
        if not cap_mb:
            assert statuses == [200] * n
            # (10 × 15 MiB, less what the kernel's send buffers took of each: 125–160 MiB measured;
            # well past the capped case's bound below, 48 + 40)
            assert grown > 100 * MiB, f"{grown >> 20} MiB held for {n} slow readers"
            return
        assert grown < cap_mb * MiB + 40 * MiB, f"{grown >> 20} MiB held with max_answers_waiting_mb {cap_mb}"
        assert statuses == [200] * 3 + [503] * (n - 3), statuses
        for sock, status, fields in readers[3:]:
            assert fields["retry-after"] == "1" and fields.get("retry-after-ms") == "1000"
            body = json.loads(answer_body(sock, fields))
            assert body["error"]["code"] == "server_overloaded" and "max_answers_waiting_mb" in body["error"]["message"]
        wait_until(lambda: len(cut) == 3, timeout=3 * limit + 2, what="the tricklers closed")
        page = requests.get(f"{gw.base_url}/conversations/{conv}/items", timeout=30)
        assert page.status_code == 200 and len(page.content) == size
    finally:
        stop.set()
        worker.join(5)
        for sock, _, _ in readers:
            sock.close()
    assert "Traceback" not in gw.log()


def answer_body(sock: socket.socket, fields: dict) -> bytes:
    """The rest of an answer whose head ``trickler`` read (its body, by its content-length)."""
    sock.setblocking(True)
    body = fields["read"]
    while len(body) < int(fields["content-length"]):
        got = sock.recv(1 << 16)
        if not got:
            break
        body += got
    return body[:int(fields["content-length"])]


def test_large_answers_read_one_after_another_on_a_keep_alive_connection_all_go_out(upstream, gateway_factory):
    """A client reading large pages one after another on one keep-alive connection (the SDKs'
    pagination): each answer's share of ``max_answers_waiting_mb`` (32 MiB here: two pages) is
    given back once it is out, before the next is counted; none is refused."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={**DEADLINE, "RESP2CHAT_MAX_ANSWERS_WAITING_MB": "32"})
    conv, size = large_conversation(gw)
    with requests.Session() as session:
        got = [session.get(f"{gw.base_url}/conversations/{conv}/items", timeout=30) for _ in range(6)]
    assert [(r.status_code, len(r.content)) for r in got] == [(200, size)] * 6
    assert "Traceback" not in gw.log()


def test_a_reader_taking_a_large_answer_below_the_minimum_rate_is_reset(upstream, gateway_factory):
    """A client that keeps taking its large answer, but slower than ``min_request_body_rate_kb``
    over each ``header_timeout_secs``, is reset (``BodyRate`` on the bytes taken), its answer
    dropped: here 1 MiB every half second (what waits in the gateway moves each time: ``Stalls``
    never cuts it) against a minimum of 8 MiB/s (on loopback the kernel takes a few MiB at once:
    the rate is raised to make the 15 MiB page a slow read). Before, it read the whole page."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={**DEADLINE, "RESP2CHAT_MIN_REQUEST_BODY_RATE_KB": "8192"})
    conv, size = large_conversation(gw)
    sock = connect(gw, items_get(conv))
    took, reset, started = 0, False, time.monotonic()
    try:
        while took < size + 256 and time.monotonic() - started < 5 * LIMIT:
            chunk = 0
            while chunk < MiB:
                try:
                    got = sock.recv(MiB - chunk)
                except ConnectionResetError:
                    got = b""
                if not got:
                    reset = True
                    break
                chunk += len(got)
            took += chunk
            if reset:
                break
            time.sleep(0.5)
    finally:
        sock.close()
    assert reset and took < size, (reset, took >> 20, size >> 20)
    assert time.monotonic() - started < 3 * LIMIT + 2
    # (a normal read goes through: its share was given back with the connection)
    page = requests.get(f"{gw.base_url}/conversations/{conv}/items", timeout=30)
    assert page.status_code == 200 and len(page.content) == size
    assert "Traceback" not in gw.log()


def test_a_turns_answer_is_never_refused_for_room_but_a_read_is(upstream, gateway_factory):
    """With ``max_answers_waiting_mb`` taken (a reader holds a 15 MiB page, one answer always let
    out, against a cap of 15), a non-streamed turn's large Response, which the client paid the
    backend for, goes out (counted: a cap it would pass refuses it if it were a read), but a read
    of it, stored, is refused (503, retry-after) until the holder goes."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_HEADER_TIMEOUT_SECS": "30", "RESP2CHAT_MAX_ANSWERS_WAITING_MB": "15"})
    conv, size = large_conversation(gw)
    words = "words: 20000"  # (~130 KiB of answer: counted)
    holder, status, _ = trickler(gw, conv)
    try:
        assert status == 200  # (one always let out, though past the cap)
        first = requests.post(f"{gw.base_url}/responses", json={"model": "demo-model", "input": words}, timeout=60)
        assert first.status_code == 200 and first.json()["status"] == "completed" and len(first.content) > 128 * KiB
        read = requests.get(f"{gw.base_url}/responses/{first.json()['id']}", timeout=30)
        assert read.status_code == 503 and read.json()["error"]["code"] == "server_overloaded"
        assert read.headers["retry-after"] == "1"
    finally:
        holder.close()
    # (its share given back with its connection: the read goes through)
    wait_until(lambda: requests.get(f"{gw.base_url}/responses/{first.json()['id']}", timeout=30).status_code == 200,
               what="the read let out once the holder went")
    assert "Traceback" not in gw.log()


def test_a_built_answer_leaves_no_cycle_holding_it():
    """mitmproxy's type check of a new message's optional fields raised a ``TypeError`` it kept in
    a local: a cycle, whose traceback kept the frames that made the answer (its dict, text and
    bytes) until a cycle collection (+45 MiB for each 15 MiB page read). Patched
    (``mitm_typecheck``), making an answer leaves nothing for the collector; the checks are the
    same."""
    import gc
    import typing
    from mitmproxy.utils import typecheck
    from resp2chat_io import mitm_typecheck
    from resp2chat_io.addons.base import json_response

    mitm_typecheck.install()
    gc.collect()
    gc.disable()
    try:
        json_response(200, {"data": ["x" * MiB]})
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert typecheck.check_option_type is mitm_typecheck.check_option_type

    def verdict(check, value, typeinfo) -> str:
        try:
            check("field", value, typeinfo)
        except TypeError as err:
            return str(err)
        return "ok"

    for value, typeinfo, ok in [(b"", bytes | None, True), (None, bytes | None, True), ("s", bytes | None, False),
                                (1, float, True), ((1, "a"), tuple[int, str], True), ((1, 2), tuple[int, str], False),
                                ((1,), tuple[int, str], False), (["a"], typing.Sequence[str], True),
                                ([1], typing.Sequence[str], False), ("a", typing.Optional[str], True),
                                (1, typing.Any, True), (1.5, int, False), (None, typing.Union[int, str], False)]:
        got = verdict(mitm_typecheck.check_option_type, value, typeinfo)
        assert (got == "ok") == ok and got == verdict(mitm_typecheck._original, value, typeinfo), (value, typeinfo, got)


def small_page(gw, text: int = 60_000) -> tuple[str, int]:
    """A conversation of one message of ``text`` characters (60 000: its items page just under
    ``SMALL_ANSWER``, 64 KiB): its id and the page's size."""
    made = requests.post(f"{gw.base_url}/conversations",
                         json={"items": [{"type": "message", "role": "user", "content": "x" * text}]}, timeout=30)
    conv = made.json()["id"]
    page = requests.get(f"{gw.base_url}/conversations/{conv}/items", timeout=30)
    assert page.status_code == 200
    return conv, len(page.content)


def test_pipelined_small_answers_are_counted_in_max_answers_waiting_mb(upstream, gateway_factory):
    """The reviewer's finding: answers under 64 KiB were never counted, and mitmproxy answers each
    pipelined request as soon as the last answer is written, read or not: 2000 pipelined GETs of a
    60 KiB page on one unread socket held +113 MiB, never refused nor cut. Now a small answer behind
    another still waiting is counted: past ``max_answers_waiting_mb`` (2 here) the pipelined reads
    are refused (503), and so is another client's read, until the holder is cut (it reads nothing:
    ``Stalls``) and its share is back."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={**DEADLINE, "RESP2CHAT_MAX_ANSWERS_WAITING_MB": "2"})
    conv, size = small_page(gw)
    other, _ = small_page(gw, 100_000)  # (a page over 64 KiB: counted, on any connection)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
    sock.connect(("127.0.0.1", gw.port))
    try:
        sock.sendall(items_get(conv) * 200)
        time.sleep(1)  # (the pipelined reads answered, as far as they go)
        read = requests.get(f"{gw.base_url}/conversations/{other}/items", timeout=30)
        assert read.status_code == 503 and read.json()["error"]["code"] == "server_overloaded", read.status_code
        wait_until(lambda: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1,  # (ESTABLISHED no more)
                   timeout=3 * LIMIT + 2, what="the pipeliner cut")
    finally:
        sock.close()
    wait_until(lambda: requests.get(f"{gw.base_url}/conversations/{other}/items", timeout=30).status_code == 200,
               what="the read let out once the pipeliner went")
    assert "Traceback" not in gw.log()


def test_a_reader_taking_its_answer_above_the_rate_is_not_cut_while_the_kernel_queue_drains(upstream, gateway_factory):
    """On loopback the kernel's send queue takes a few MiB of an answer: a client reading it well
    above ``min_request_body_rate_kb`` (256 KiB/s against 4) drains only that queue for seconds,
    asyncio's write buffer unmoved. Sampling that buffer alone, ``Stalls`` reset it as one that
    "took none of its answer". What waits is now both (``TIOCOUTQ``): it reads on."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", env=DEADLINE)
    conv, size = large_conversation(gw)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(items_get(conv))
    took, started = 0, time.monotonic()
    try:
        while time.monotonic() - started < 3 * LIMIT + 1:
            chunk = 0
            while chunk < 64 * KiB:
                got = sock.recv(64 * KiB - chunk)  # (a reset raises: the test fails)
                assert got, f"closed after {took + chunk} bytes"
                chunk += len(got)
            took += chunk
            time.sleep(0.25)
        assert not closed(sock)
    finally:
        sock.close()
    assert took < size  # (still reading: a slow read, not a whole one)
    assert "Traceback" not in gw.log()


def test_one_client_holds_at_most_half_of_the_answers_budget(upstream, gateway_factory):
    """Two keyed clients, ``max_answers_waiting_mb`` 4: alice, holding a 1.5 MiB page unread, is
    refused a second (429 ``rate_limit_exceeded``: past her half, as with request bodies), while
    bob's read of his own goes out. Before, one client could take the whole budget."""
    clients = [{"name": "alice", "key": "alice-key-0123456789abcdef"}, {"name": "bob", "key": "bob-key-0123456789abcdef"}]
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_HEADER_TIMEOUT_SECS": "30", "RESP2CHAT_MAX_ANSWERS_WAITING_MB": "4",
                              "RESP2CHAT_CLIENTS": json.dumps(clients)})
    auth = [{"authorization": f"Bearer {c['key']}"} for c in clients]
    convs = []
    for who in (0, 1):
        made = requests.post(f"{gw.base_url}/conversations", headers=auth[who], timeout=30,
                             json={"items": [{"type": "message", "role": "user", "content": "x" * (1536 * KiB)}]})
        assert made.status_code == 200, made.text
        convs.append(made.json()["id"])
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
    holder.settimeout(10)
    holder.connect(("127.0.0.1", gw.port))
    try:
        holder.sendall(items_get(convs[0]).replace(b"\r\n\r\n", b"\r\nauthorization: %s\r\n\r\n"
                                                   % auth[0]["authorization"].encode()))
        assert holder.recv(64).startswith(b"HTTP/1.1 200")
        second = requests.get(f"{gw.base_url}/conversations/{convs[0]}/items", headers=auth[0], timeout=30)
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded", second.status_code
        assert second.json()["error"]["param"] == "max_answers_waiting_mb", second.text  # (not request bodies')
        assert second.headers["retry-after"] == "1"
        other = requests.get(f"{gw.base_url}/conversations/{convs[1]}/items", headers=auth[1], timeout=30)
        assert other.status_code == 200  # (bob: the other half is his)
    finally:
        holder.close()
    assert "Traceback" not in gw.log()


def test_adding_items_is_refused_before_it_adds_them_while_the_answers_budget_is_taken(upstream, gateway_factory):
    """``POST /v1/conversations/{id}/items`` answers with every item it added: a gzip'd body of a
    few KiB, MiB of answer, and it was counted as a paid-for answer, never refused (12 of them held
    past ``max_answers_waiting_mb``). Refusing its answer would be too late (the items are in; the
    retry adds them twice): it is refused before, while the answers waiting hold the budget
    (503 ``server_overloaded``, nothing added), and goes through once they are out."""
    import gzip
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_HEADER_TIMEOUT_SECS": "30", "RESP2CHAT_MAX_ANSWERS_WAITING_MB": "2"})
    held_conv, _ = small_page(gw, 3 * MiB)
    target = requests.post(f"{gw.base_url}/conversations", json={}, timeout=30).json()["id"]
    body = gzip.compress(json.dumps({"items": [{"type": "message", "role": "user", "content": "y" * MiB}]}).encode())
    assert len(body) < 16 * KiB

    def add() -> requests.Response:
        return requests.post(f"{gw.base_url}/conversations/{target}/items", data=body, timeout=30,
                             headers={"content-type": "application/json", "content-encoding": "gzip"})

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
    holder.settimeout(10)
    holder.connect(("127.0.0.1", gw.port))
    try:
        holder.sendall(items_get(held_conv))
        assert holder.recv(64).startswith(b"HTTP/1.1 200")  # (one always let out: 3 MiB against 2)
        refused = add()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_overloaded", refused.status_code
        assert refused.headers["retry-after"] == "1"
    finally:
        holder.close()
    wait_until(lambda: add().status_code == 200, what="the items added once the holder went")
    page = requests.get(f"{gw.base_url}/conversations/{target}/items", timeout=30)
    assert page.status_code == 200 and len(page.json()["data"]) == 1  # (added once: the refusal added nothing)
    assert "Traceback" not in gw.log()
