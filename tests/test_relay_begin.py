"""An HTTP turn's backend call begins when the request hooks end (relay/server.py ``begin``, from
http_turns.BodyAside), not when mitmproxy's request reaches the relay (issue 22: added TTFT); and
never for a flow that may still not go there (intercepted, killed), nor without bound for one
whose request never comes.

Real mitmdumps: tests/relay_probe.py (before the gateway's script) holds up or refuses mitmproxy's
connection to the relay and reports what the relay holds; tests/late_hooks.py (after it)
intercepts or kills a turn in its request hook, as a user's script or mitmweb does.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from helpers import (LocalServer, QuietHandler, chat_chunk, chat_sse, parse_sse, post_turn, send_sse,
                     stream_until_gone, start_gateway, start_sse, terminal, wait_until)

HERE = Path(__file__).parent
PROBE, LATE = str(HERE / "relay_probe.py"), str(HERE / "late_hooks.py")
TURN = {"model": "m", "input": "hi", "stream": True}


class Backend(QuietHandler):
    """Notes when each request arrived (time.monotonic); answers at once, or (``endless``) streams
    until its client goes away, noting when."""

    arrived: list[float] = []
    closed: list[float] = []
    endless = False

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        type(self).arrived.append(time.monotonic())
        if not type(self).endless:
            send_sse(self, chat_sse(chat_chunk({"content": "hello"}, "stop")))
            return
        start_sse(self)
        stream_until_gone(self)
        type(self).closed.append(time.monotonic())


@pytest.fixture
def backend():
    Backend.arrived, Backend.closed, Backend.endless = [], [], False
    with LocalServer(Backend) as server:
        yield server


@pytest.fixture
def gateway(tmp_path, backend):
    """A gateway to ``backend`` between the two test scripts, with the probe's ``options``."""
    started = []

    def make(*options: str):
        gw = start_gateway(backend.url, tmp_path, "-s", LATE, *(a for o in options for a in ("--set", o)),
                           scripts_first=(PROBE,))
        started.append(gw)
        return gw
    yield make
    for gw in started:
        gw.stop()


def relay(gw) -> dict:
    return requests.get(f"http://127.0.0.1:{gw.port}/_probe/relay", timeout=5).json()


def probe(gw, command: str) -> None:
    assert requests.post(f"http://127.0.0.1:{gw.port}/_probe/{command}", timeout=5).status_code == 200


def in_background(gw, body: dict, headers: dict | None = None) -> dict:
    """POST a turn from a thread (it may be held): ``out["response"]`` or ``out["error"]`` when it ends."""
    out: dict = {}

    def go():
        try:
            out["response"] = post_turn(gw, body, headers, timeout=60)
        except requests.RequestException as exc:
            out["error"] = exc
    out["thread"] = threading.Thread(target=go, daemon=True)
    out["thread"].start()
    return out


def test_the_backend_gets_the_turn_before_mitmproxy_reaches_the_relay(gateway):
    """mitmproxy's connection to the relay is held 0.3 s in its server_connect hook: the backend
    has the turn's request before that ends (it began with the request hooks' end)."""
    gw = gateway("probe_connect_delay=0.3")
    r = post_turn(gw, TURN)
    assert r.status_code == 200 and terminal(parse_sse(r.content))["type"] == "response.completed"
    assert "hello" in r.text
    [(began, ended)] = relay(gw)["connects"]  # (one connection to the relay: this turn's)
    [arrived] = Backend.arrived
    assert began <= arrived < ended, f"the backend got the turn {arrived - began:.3f} s into a 0.3 s hold"
    state = relay(gw)
    assert (state["active"], state["expected"], state["unclaimed"]) == (0, 0, 0)


def test_a_non_streaming_turn_begins_early_too(gateway):
    gw = gateway("probe_connect_delay=0.3")
    r = post_turn(gw, {**TURN, "stream": False})
    assert r.status_code == 200 and r.json()["status"] == "completed" and "hello" in r.text
    [(began, ended)] = relay(gw)["connects"]
    [arrived] = Backend.arrived
    assert began <= arrived < ended


def test_an_intercepted_turn_never_reaches_the_backend_and_killing_it_leaves_nothing(gateway):
    """A flow intercepted after the gateway made its turn (mitmweb's intercept, a script) may
    still be changed or killed: its backend call waits for mitmproxy's request, as before. Killed,
    nothing of it is left in the relay; resumed, it is answered."""
    gw = gateway()
    held = in_background(gw, TURN, {"x-probe": "hold"})
    wait_until(lambda: relay(gw)["expected"] == 1, what="the turn registered and held")
    time.sleep(0.3)  # (what must not happen: a backend call while it is held; nothing to wait for)
    assert Backend.arrived == [] and relay(gw)["unclaimed"] == 0
    probe(gw, "kill")
    held["thread"].join(30)
    assert "response" not in held or held["response"].status_code >= 500  # (mitmproxy's answer to a killed flow)
    wait_until(lambda: relay(gw)["expected"] == 0, what="the killed turn forgotten")
    state = relay(gw)
    assert (state["active"], state["unclaimed"]) == (0, 0) and Backend.arrived == []
    # resumed, it goes on as any turn
    held = in_background(gw, TURN, {"x-probe": "hold"})
    wait_until(lambda: relay(gw)["expected"] == 1, what="the second turn registered and held")
    assert Backend.arrived == []
    probe(gw, "resume")
    held["thread"].join(30)
    r = held["response"]
    assert r.status_code == 200 and terminal(parse_sse(r.content))["type"] == "response.completed"
    assert len(Backend.arrived) == 1


def test_a_turn_killed_by_a_later_script_never_reaches_the_backend(gateway):
    gw = gateway()
    with pytest.raises(requests.RequestException):
        r = post_turn(gw, TURN, {"x-probe": "kill"}, timeout=30)
        assert r.status_code < 500, r.status_code  # (mitmproxy answers a killed flow, or hangs up)
        raise requests.ConnectionError("answered")
    wait_until(lambda: relay(gw)["expected"] == 0, what="the killed turn forgotten")
    state = relay(gw)
    assert (state["active"], state["unclaimed"]) == (0, 0) and Backend.arrived == []
    assert post_turn(gw, TURN).status_code == 200 and len(Backend.arrived) == 1  # (the next one goes)


def test_a_turn_that_never_reaches_the_relay_has_its_backend_call_cancelled(gateway):
    """mitmproxy cannot connect to the relay (refused in server_connect, after 0.5 s: the backend
    call is under way by then): the flow ends with an error, and the backend call begun for it is
    dropped (``Relay.forget``)."""
    Backend.endless = True
    gw = gateway("probe_connect_refuse=true", "probe_connect_delay=0.5")
    r = post_turn(gw, TURN, timeout=30)
    assert r.status_code == 502
    [arrived] = Backend.arrived  # (it had begun)
    wait_until(lambda: Backend.closed, timeout=10, what="the backend call dropped")
    state = relay(gw)
    assert (state["active"], state["expected"], state["unclaimed"]) == (0, 0, 0)


def test_a_begun_turn_not_claimed_in_time_is_dropped_and_fails_clearly(gateway):
    """mitmproxy's connection to the relay is held (3 s) past the relay's deadline (1 s here):
    the backend call is dropped at the deadline, and the turn, once its request arrives, ends
    with response.failed instead of hanging or going upstream again."""
    Backend.endless = True
    gw = gateway("probe_connect_delay=3", "probe_request_deadline=1")
    turn = in_background(gw, TURN)
    wait_until(lambda: not turn["thread"].is_alive(), timeout=20, what="the turn's end")
    r = turn["response"]
    [(began, ended)] = relay(gw)["connects"]
    [arrived] = Backend.arrived
    [closed] = Backend.closed
    assert began <= arrived < closed < ended  # dropped while mitmproxy was still on its way
    assert closed - arrived < 2.5
    assert r.status_code == 200
    end = terminal(parse_sse(r.content))
    assert end["type"] == "response.failed", end
    assert "relay" in end["response"]["error"]["message"]
    state = relay(gw)
    assert (state["active"], state["expected"], state["unclaimed"]) == (0, 0, 0)
    assert len(Backend.arrived) == 1  # (not called again)
    assert "did not reach the relay within 1 s" in gw.log()
