"""Fail closed: a failure at any stage of a turn, injected into a real mitmdump (tests/faults.py),
never lets a request go anywhere unhandled, never shows a client internals, and never stops the
gateway — not even while it is still starting up.

Before the backend is called, a failure is a 500 ``server_error`` naming the request id and the
backend receives nothing. Once a stream has started, it is exactly one ``response.failed``.
Either way the exception's text (planted with a password and an internal address) goes to the
gateway's log, never to the client, and the next turn is served as usual.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import requests

from helpers import Endless, parse_sse, start_gateway, terminal, wait_until

FAULTS = str(Path(__file__).with_name("faults.py"))
PLANTED = "hunter2"  # faults.PLANTED: "password=hunter2 at 10.0.0.7"
INTERNAL = "10.0.0.7"

# stages where the request has not gone to the backend yet (turns.py `request` and before)
BEFORE_BACKEND = ["gate", "replay", "decode", "validation", "lowering", "store", "routing", "recording"]


class Faults:
    def __init__(self, gw, upstream, access_log: Path | None = None):
        self.gw, self.upstream, self.access_log = gw, upstream, access_log
        self.n = 0

    def inject(self, stage: str | None) -> None:
        path = f"/_faults/inject/{stage}" if stage else "/_faults/clear"
        assert requests.post(f"http://127.0.0.1:{self.gw.port}{path}", timeout=10).text == "ok"

    def post(self, body: dict, **kw) -> requests.Response:
        self.n += 1  # a new prompt each time: the replay cache must not answer it
        body = {"model": "demo-model", "input": f"turn {self.n}", **body}
        return requests.post(self.gw.base_url + "/responses", json=body, timeout=60, **kw)

    def backend_count(self) -> int:
        return len(self.upstream.requests())

    def outcomes(self, n: int) -> list[dict]:
        """The access log once it has ``n`` lines (one per POST /v1/responses, however it ended)."""
        def lines():
            found = [json.loads(line) for line in self.access_log.read_text().splitlines()] \
                if self.access_log.exists() else []
            return found if len(found) >= n else None
        found = wait_until(lines, what=f"{n} access log lines")
        assert len(found) == n, found
        return found


def assert_server_error(r: requests.Response) -> None:
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "server_error" and err["type"] == "server_error"
    assert r.headers["x-request-id"] in err["message"]
    assert PLANTED not in r.text and INTERNAL not in r.text


def assert_failed_stream(r: requests.Response) -> dict:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text[:300]
    end = terminal(parse_sse(r.content))
    assert end["type"] == "response.failed"
    err = end["response"]["error"]
    assert err["code"] == "server_error" and r.headers["x-request-id"] in err["message"]
    assert PLANTED not in r.text and INTERNAL not in r.text
    return err


def assert_served(f: Faults) -> None:
    f.inject(None)
    r = f.post({"stream": True})
    assert r.status_code == 200 and parse_sse(r.content)[-1]["type"] == "response.completed"


@pytest.fixture
def faulty(upstream, tmp_path):
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_upstream_request_log_path={tmp_path / 'up.jsonl'}",
                       "--set", f"resp2chat_access_log_path={tmp_path / 'access.jsonl'}", scripts_first=(FAULTS,))
    yield Faults(gw, upstream, tmp_path / "access.jsonl")
    gw.stop()


def assert_reported(f: Faults, status: str, code: str = "server_error", http_status: int = 500) -> dict:
    """The request just made is in the access log (so in the metrics) as it ended."""
    line = f.outcomes(f.n)[-1]
    assert (line["status"], line["code"], line["http_status"]) == (status, code, http_status), line
    return line


def test_a_failure_at_any_stage_before_the_backend_is_a_500_and_nothing_goes_upstream(faulty):
    f = faulty
    stored = f.post({}).json()["id"]  # for the store stage: a request that continues it reads the store
    for stage in BEFORE_BACKEND:
        for stream in (True, False):
            f.inject(stage)
            before = f.backend_count()
            extra = {"previous_response_id": stored} if stage == "store" else {}
            r = f.post({"stream": stream, **extra})
            assert_server_error(r)
            assert f.backend_count() == before, f"{stage}: the backend was called"
            assert f"injected failure at {stage}: password=hunter2" in f.gw.log()  # the operator sees it
            # counted: a turn once it was lowered (routing, recording), else a request refused
            assert_reported(f, "failed" if stage in ("routing", "recording") else "rejected")
        assert_served(f)


def test_a_failure_in_the_relay_ends_the_turn_cleanly_and_nothing_goes_upstream(faulty):
    f = faulty
    for stage in ("relay", "upstream_client"):
        f.inject(stage)
        before = f.backend_count()
        err = assert_failed_stream(f.post({"stream": True}))
        assert "relay failed" in err["message"]
        whole = f.post({})
        assert whole.status_code == 502 and whole.json()["error"]["code"] == "server_error"
        assert PLANTED not in whole.text and whole.headers["x-request-id"] in whole.text
        assert f.backend_count() == before
        assert f"injected failure at {stage}" in f.gw.log()
        assert_served(f)


def test_a_failure_while_streaming_is_one_response_failed(faulty):
    f = faulty
    for stage, what in (("stream_callable", "stream this response"), ("translator", "translate the upstream stream")):
        f.inject(stage)
        err = assert_failed_stream(f.post({"stream": True}))
        assert what in err["message"]
        assert f"injected failure at {stage}" in f.gw.log()
        assert_served(f)
    f.inject("translator")
    whole = f.post({})
    assert whole.status_code == 502 and PLANTED not in whole.text
    assert whole.headers["x-request-id"] in whole.json()["error"]["message"]


def test_a_failure_after_the_backend_answered_never_reaches_the_client(faulty):
    f = faulty
    # the response head: the stream has not started, so the client gets the 500
    f.inject("response_headers")
    assert_server_error(f.post({"stream": True}))
    assert_reported(f, "failed")
    assert_server_error(f.post({}))
    assert_reported(f, "failed")
    # building a non-streaming answer, or recording a finished turn
    for stage in ("answer", "finished"):
        f.inject(stage)
        assert_server_error(f.post({}))
        assert_reported(f, "failed")
    # a streaming client already has its whole answer when the turn is recorded
    f.inject("finished")
    r = f.post({"stream": True})
    assert parse_sse(r.content)[-1]["type"] == "response.completed"
    assert_served(f)


def test_a_failure_at_the_response_head_answers_at_once_and_gives_the_backend_call_up(endless, tmp_path):
    """The relay has answered and the backend call is under way: a failure in ``responseheaders``
    is the 500 now (not once the backend is done: this one never is), and the backend call is
    given up (dropped before it started, or hung up on)."""
    gw = start_gateway(endless.url, tmp_path, "--set", f"resp2chat_access_log_path={tmp_path / 'access.jsonl'}",
                       scripts_first=(FAULTS,))
    try:
        f = Faults(gw, None, tmp_path / "access.jsonl")
        f.inject("response_head")
        for stream in (True, False):
            assert_server_error(f.post({"stream": stream}))
            wait_until(lambda: len(Endless.closed) == len(Endless.started), what="the backend call being given up")
            assert "injected failure at response_head: password=hunter2" in gw.log()
            assert_reported(f, "failed")
    finally:
        gw.stop()


def test_a_failing_listener_changes_no_answer_and_the_others_still_hear_of_the_turn(faulty):
    """The replay cache's listener fails: the answer is the turn's, the response store still
    keeps it, the access log still has it. Then the metrics' listener fails: likewise."""
    f = faulty
    f.inject("listener")
    r = f.post({})
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text[:300]
    assert_reported(f, "completed", "", 200)
    assert "injected failure at listener" in f.gw.log()
    f.inject("metrics")
    follow = f.post({"previous_response_id": r.json()["id"], "stream": True})  # the store kept it
    assert parse_sse(follow.content)[-1]["type"] == "response.completed"
    assert [m["content"] for m in f.upstream.requests()[-1]["messages"]][-1] == f"turn {f.n}"
    assert len(f.upstream.requests()[-1]["messages"]) == 3
    assert_reported(f, "completed", "", 200)
    assert "injected failure at metrics" in f.gw.log()
    assert_served(f)


def test_a_client_gone_before_its_answer_is_counted(faulty, upstream):
    """A client that did not stream hangs up while the backend still generates: the turn is in
    the access log as unfinished (mitmproxy's error hook, no stream)."""
    f = faulty
    f.n += 1
    before = f.backend_count()
    body = json.dumps({"model": "demo-model", "input": "words: 200\nslow: 20"}).encode()
    with socket.create_connection(("127.0.0.1", f.gw.port), timeout=30) as s:
        s.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: f.backend_count() > before, what="the backend call")
    line = f.outcomes(f.n)[-1]
    assert (line["status"], line["model"], line["http_status"]) == ("unfinished", "demo-model", 0), line


# --- start-up ----------------------------------------------------------------------------------


def _started(gw) -> str | None:
    """'finished' once mitmproxy's start-up check is over, 'exited' if it stopped the process."""
    if gw.proc.poll() is not None:
        return "exited"
    return "finished" if "faults: start-up finished" in gw.log() else None


@pytest.mark.parametrize("hold", ["before-the-gateway-runs", "after-the-gateway-runs"])
def test_requests_during_start_up_cannot_stop_the_gateway(upstream, tmp_path, hold):
    """mitmdump listens before its addons' `running` hooks have run, and its `errorcheck` exits
    on any ERROR logged until they all have. tests/faults.py holds start-up open in that window:
    before the gateway's own `running` (its relay is not serving yet) or after it."""
    first = (FAULTS,) if hold.startswith("before") else ()
    last = () if first else ("-s", FAULTS)
    gw = start_gateway(upstream.origin, tmp_path, *last, "--set", "faults_hold_startup=true", scripts_first=first)
    try:
        f = Faults(gw, upstream)
        wait_until(lambda: "faults: holding start-up" in gw.log(), what="start-up held open")
        # failures in the request hooks: each gets its 500, and nothing is logged as an error
        for stage in ("decode", "lowering", "routing"):
            f.inject(stage)
            assert_server_error(f.post({"stream": True}))
        f.inject(None)
        # bytes that are not HTTP, and a body that is not UTF-8
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
            s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            s.recv(65536)
        bad = requests.post(gw.base_url + "/responses", data=b'{"model":"m","input":"\xed\xa0\x80"}', timeout=30,
                            headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        # a turn that starts now is answered once the gateway runs (before: it waits for the relay)
        answers = {}
        waiting = threading.Thread(target=lambda: answers.update(r=f.post({"stream": True})))
        waiting.start()
        if hold.startswith("after"):  # the relay runs: a failure inside it, during start-up
            waiting.join(60)
            f.inject("relay")
            assert_failed_stream(f.post({"stream": True}))
            f.inject(None)
        assert requests.post(f"http://127.0.0.1:{gw.port}/_faults/release", timeout=10).text == "ok"
        assert wait_until(lambda: _started(gw), what="the end of start-up") == "finished", gw.log()[-3000:]
        waiting.join(60)
        assert answers["r"].status_code == 200, answers["r"].text[:300]
        assert parse_sse(answers["r"].content)[-1]["type"] == "response.completed"
        assert_served(f)
        assert gw.proc.poll() is None and "logged during startup" not in gw.log()
    finally:
        gw.stop()
