"""A hostile-input audit of the gateway (issue: robustness as a team shares it): what a client or
a backend sends that the other tests did not try, through real mitmdump gateways, real sockets
and small real backends that misbehave on purpose. Each test here failed on the code before
its fix (the commit that added it says which)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
import requests

from helpers import (
    ADDON, DONE, MITMDUMP, LocalServer, MiB, Peak, QuietHandler, chat_event, free_port, gateway_env, http_chunk,
    iter_sse, parse_sse, send_json, send_sse, start_sse, tool_call, wait_until,
)
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.turn import begin_turn
from wsclient import WSClient

# --- a backend that misbehaves ------------------------------------------------------------------

PIECE = 256 << 10
ANSWER = chat_event({"content": "hello"}) + chat_event(finish="stop") + DONE


class Babbler(QuietHandler):
    """A chat backend whose answer is valid but never ends, as fast as it is read, by model:
    ``text``, ``reasoning``, ``args`` (one tool call's arguments), ``blank`` (deltas of 100
    spaces), ``tiny`` (deltas of one character), ``calls`` (a new tool call in each chunk),
    ``switch`` (text and reasoning by turns, an item each); ``ok``: a short answer. ``calls``:
    per call, the bytes sent and whether the gateway cut it (``cut``)."""

    calls: list[dict] = []

    def do_POST(self):
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        call = {"model": model, "sent": 0, "cut": False}
        type(self).calls.append(call)
        start_sse(self)
        delta = {"text": {"content": "x" * 1000}, "reasoning": {"reasoning_content": "x" * 1000},
                 "args": {"tool_calls": [tool_call(0, args="x" * 1000)]},
                 "blank": {"content": " " * 100}, "tiny": {"content": "x"}, "calls": {},
                 "switch": {}}.get(model)
        try:
            if delta is None:
                self.wfile.write(http_chunk(ANSWER) + b"0\r\n\r\n")
                return
            if model == "args":
                self.wfile.write(http_chunk(chat_event({"tool_calls": [tool_call(0, "call_1", "f", "")]})))
            event = chat_event(delta)
            piece = http_chunk(event * (PIECE // len(event)))
            n = 0
            while call["sent"] < 1024 * MiB:  # (a bound for the test's own sake: the gateway must cut long before)
                if model == "calls":
                    piece = http_chunk(b"".join(chat_event({"tool_calls": [tool_call(i, f"call_{i}", "f", "{}")]})
                                                for i in range(n, n + 1000)))
                    n += 1000
                elif model == "switch":
                    piece = http_chunk((chat_event({"content": "x"}) + chat_event({"reasoning_content": "y"})) * 1000)
                self.wfile.write(piece)
                call["sent"] += len(piece)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            call["cut"] = True
            self.close_connection = True


def _babbling_turn(gw, model: str, limit: int) -> tuple[list[dict], int]:
    """A streamed turn of ``model``: its events, read until the terminal one or until the client
    got ``limit`` bytes (then the stream is dropped: the gateway did not end it)."""
    body = {"model": model, "input": "hi", "stream": True,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    raw = bytearray()
    events = []
    with requests.post(gw.base_url + "/responses", json=body, stream=True, timeout=60) as r:
        for event in iter_sse(r, raw):
            events.append(event)
            if event.get("type") in ("response.completed", "response.failed", "response.incomplete") \
                    or len(raw) > limit:
                break
    return events, len(raw)


def test_a_backend_answer_that_never_ends_is_cut_with_memory_bounded(gateway_factory):
    """A backend whose valid answer (text, reasoning, tool arguments, blank or one-character deltas,
    a new tool call or item in each chunk) never ends: the translator holds a turn's output until
    its end, so before the fix the gateway grew without bound (1.3 GiB in 20 s of text; ~5 KiB a
    tool call), never ending the stream. Now, past 8 × max_upstream_event_mb of output held
    (8 MiB with 1, counting each delta and item's own cost), the turn ends with one
    ``response.failed`` (``upstream_output_too_large``), the backend call is cut, and the gateway's
    peak stays within tens of MiB of where it was (measured: 0-62 MiB)."""
    with LocalServer(Babbler) as backend:
        Babbler.calls = []
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_upstream_event_mb=1")
        assert _babbling_turn(gw, "ok", MiB)[0][-1]["type"] == "response.completed"  # (warm: imports, pools)
        for model in ("text", "reasoning", "args", "blank", "tiny", "calls", "switch"):
            peak = Peak(gw.proc.pid)
            events, got = _babbling_turn(gw, model, 96 * MiB)
            last = events[-1]
            assert last["type"] == "response.failed", (model, got >> 20, last["type"])
            assert (last["response"]["error"]["code"], last["response"]["error"]["type"]) == \
                ("server_error", "upstream_output_too_large"), last
            assert "8 MiB" in last["response"]["error"]["message"], last
            assert peak.grown < 96 * MiB, f"{model}: the gateway grew {peak.grown / MiB:.0f} MiB"
            call = Babbler.calls[-1]
            wait_until(lambda: call["cut"], what=f"the {model} call cut")  # noqa: B023
            assert call["sent"] < 128 * MiB, call
        assert _babbling_turn(gw, "ok", MiB)[0][-1]["type"] == "response.completed"  # (and it goes on)


def test_a_run_of_blank_deltas_is_read_in_linear_time():
    """A backend that answers with blank deltas (a model writing newlines, one token each) before
    anything else: the think-tag splitter (the default ``auto``) and the translator hold the
    whitespace until text comes. They held it as one string copied again at each delta: 320k
    deltas (~30 MB from the backend) took ~20 s of the event loop, every other turn stalled
    meanwhile. Now the pieces are joined once; the text keeps them."""
    n = 320_000
    for think in ("auto", "open", "off"):
        turn = begin_turn(json.dumps({"model": "m", "input": "hi"}).encode(),
                          LoweringOptions(think_tags={"*": think}), "resp_0123456789abcdef", 1)
        t = turn.translator()
        batch = chat_event({"content": " "}) * 1000
        started = time.monotonic()
        for _ in range(n // 1000):
            t.feed(batch)
            assert time.monotonic() - started < 10, f"{think}: re-copying the held whitespace at every delta"
        t.feed(chat_event({"content": "</think>x" if think == "open" else "x"}) + chat_event(finish="stop") + DONE)
        assert time.monotonic() - started < 10, think
        assert t.response()["status"] == "completed", think
        if think == "off":  # (spaces kept: indentation)
            assert t.response()["output"][-1]["content"][0]["text"] == " " * n + "x"


def test_a_long_run_of_blank_deltas_does_not_stall_the_gateway(gateway_factory):
    """The same through a real gateway: while a backend streams blank deltas, /healthz and another
    turn answer within a second, and the blank turn ends at the output bound."""
    with LocalServer(Babbler) as backend:
        Babbler.calls = []
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_upstream_event_mb=1")
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(turn=_babbling_turn(gw, "blank", 96 * MiB)))
        worker.start()
        while worker.is_alive():
            started = time.monotonic()
            assert requests.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=10).status_code == 200
            assert time.monotonic() - started < 1, "the gateway stalled"
            worker.join(0.05)
        events, _ = result["turn"]
        assert events[-1]["type"] == "response.failed", events[-1]


# --- a backend's unpaired surrogate escape ------------------------------------------------------

LONE = b'data: {"choices":[{"index":0,"delta":{"content":"a\\ud800b \\ud83d\\ude00"}}]}\n\n'


class Surrogates(QuietHandler):
    """A chat backend whose answer (``text``) or 400 error (``error``) holds an unpaired
    ``\\ud800`` escape beside a well-formed pair: valid JSON, yet no Unicode text."""

    def do_POST(self):
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        if model == "error":  # (json.dumps writes the lone "\udc00" as that escape)
            send_json(self, 400, {"error": {"message": "bad \udc00 input", "type": "invalid_request_error"}})
        else:
            send_sse(self, LONE + chat_event(finish="stop") + DONE)


def test_a_backends_lone_surrogate_is_replaced_and_the_turn_kept(gateway_factory):
    """The unpaired escape made a whole (non-streamed) answer a 500 (UnicodeEncodeError in the
    gateway, a traceback in its log) and a streamed one unstored ("not stored:
    UnicodeEncodeError": its previous_response_id then unknown). Now it is U+FFFD, as a
    backend's invalid UTF-8 bytes are: both answers complete, are stored and continue."""
    with LocalServer(Surrogates) as backend:
        gw = gateway_factory(backend.url)
        for stream in (False, True):
            r = requests.post(gw.base_url + "/responses", json={"model": "text", "input": "hi", "stream": stream},
                              timeout=30)
            assert r.status_code == 200, r.text
            r.content.decode("utf-8")  # (strict UTF-8)
            response = json.loads(r.content) if not stream else \
                [e for e in parse_sse(r.content) if e["type"] == "response.completed"][0]["response"]
            assert response["status"] == "completed", response
            assert response["output"][0]["content"][0]["text"] == "a\ufffdb \U0001F600"
            stored = requests.get(gw.base_url + "/responses/" + response["id"], timeout=10)
            assert stored.status_code == 200, (stream, stored.text)
            again = requests.post(gw.base_url + "/responses", timeout=30,
                                  json={"model": "text", "input": "more", "previous_response_id": response["id"]})
            assert again.status_code == 200, again.text
        r = requests.post(gw.base_url + "/responses", json={"model": "error", "input": "hi"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"] == "upstream HTTP 400: bad \ufffd input", r.text
        log = gw.log()
        assert "Traceback" not in log and "not stored" not in log, log[-3000:]


# --- credentials in a configured URL ------------------------------------------------------------


def test_a_base_url_carrying_credentials_is_refused_at_start_and_never_shown(tmp_path):
    """``upstream_base_url`` (or an ``upstreams`` entry's ``base_url``) with ``user:password@`` or
    a ``?key=`` query: neither was sent as it is (the userinfo went into the backend's Host
    header; the query ended up before ``/chat/completions``), and the password was in every
    client's ``cannot connect to the upstream http://alice:pw…@…`` (502 and response.failed),
    the log and the flows; the query key in the log and flows. Now the gateway does not start,
    and its refusal names the setting without the secret."""
    secret = "pw-planted-SECRET-0451"
    port = free_port()
    for url in (f"http://alice:{secret}@127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/v1?key={secret}"):
        for how, named in (("top", "upstream_base_url"), ("entry", "upstreams[0] ('a').base_url")):
            value = url if how == "top" else json.dumps([{"name": "a", "base_url": url}])
            setting = "upstream_base_url" if how == "top" else "upstreams"
            args = [str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{free_port()}",
                    "--set", f"confdir={tmp_path / 'conf'}", "--set", f"resp2chat_{setting}={value}"]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=gateway_env(), cwd=tmp_path)
            out = proc.stdout + proc.stderr
            assert proc.returncode != 0 and named in out and "upstream_api_key" in out, (url, how, out[-2000:])
            assert secret not in out, out[-2000:]


# --- a client that stops reading ----------------------------------------------------------------

CAROL = "carol-key-0123456789abcdef"


def test_a_client_that_stops_reading_is_closed_and_its_turn_ends(gateway_factory):
    """A client that stops reading its stream without closing its socket (a frozen process, on
    purpose): the relay pauses the backend once 1 MiB waits, so nothing grows, but nothing ended
    either: the turn, the backend's request and the client's ``max_streams`` slot were held for
    as long as the socket lived (checked for 30 s). Now a client that takes none of its waiting
    answer for ``header_timeout_secs`` is closed, as if it had gone: the backend call is cut and
    the slot is free again. Over HTTP and the WebSocket."""
    with LocalServer(Babbler) as backend:
        Babbler.calls = []
        carol = json.dumps([{"name": "carol", "key": CAROL, "max_streams": 1}])
        gw = gateway_factory(backend.url, "--set", f"resp2chat_clients={carol}",
                             "--set", "resp2chat_header_timeout_secs=2")
        auth = {"authorization": f"Bearer {CAROL}"}

        def ok() -> bool:
            r = requests.post(gw.base_url + "/responses", json={"model": "ok", "input": "hi"}, headers=auth, timeout=30)
            assert r.status_code in (200, 429), r.text
            return r.status_code == 200

        assert ok()
        body = json.dumps({"model": "text", "input": "hi", "stream": True}).encode()
        stalled = socket.create_connection(("127.0.0.1", gw.port))
        stalled.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                        b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s" % (CAROL.encode(), len(body), body))
        call = wait_until(lambda: next((c for c in Babbler.calls if c["model"] == "text"), None))
        assert not ok()  # (its turn is open: carol's one slot is taken)
        wait_until(lambda: call["cut"], 30, "the stalled client's backend call cut")
        wait_until(ok, 10, "carol's slot free again")
        stalled.close()

        ws = WSClient(gw.base_url, headers=auth)
        ws.send({"type": "response.create", "model": "text", "input": "hi"})  # (and nothing read)
        call = wait_until(lambda: next((c for c in Babbler.calls[2:] if c["model"] == "text"), None))
        wait_until(lambda: call["cut"], 30, "the stalled socket's backend call cut")
        wait_until(ok, 10, "carol's slot free again")
        ws.sock.close()


# --- a backend that sends only comments ------------------------------------------------------------


class Commenter(QuietHandler):
    """A chat backend that answers 200 at once and then sends SSE comments (``: keep-alive``)
    every 0.1 s, by model: ``comments`` forever (until the gateway hangs up; 60 s at most, for
    the test's own sake), ``queued`` for 2 s (a request waiting in OpenRouter's queue), then a
    short answer; ``silent`` sends nothing at all for 2 s (a slow prefill), then the answer;
    ``late`` is ``comments`` after 0.5 s of silence. ``calls``: per call, whether the gateway cut it (``cut``)."""

    calls: list[dict] = []

    def do_POST(self):
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        call = {"model": model, "cut": False}
        type(self).calls.append(call)
        start_sse(self)
        until = time.monotonic() + (2 if model == "queued" else 60)
        try:
            if model == "silent":
                time.sleep(2)  # (the backend's prefill: no byte, not even a comment)
            if model == "late":
                time.sleep(0.5)  # (the gateway waits on the backend meanwhile: then the comments begin)
            while model != "silent" and time.monotonic() < until:
                self.wfile.write(http_chunk(b": keep-alive\n\n"))
                self.wfile.flush()
                time.sleep(0.1)  # (the backend's pace, not a wait)
            self.wfile.write(http_chunk(ANSWER) + b"0\r\n\r\n")
        except OSError:
            call["cut"] = True
            self.close_connection = True


def test_a_silent_prefill_is_bounded_by_the_idle_timeout_only(gateway_factory):
    """``upstream_data_timeout_secs`` bounds a stream of comments, not silence: a backend that
    sends nothing while it prefills is the idle timeout's to bound, and with that at 0 (no
    limit) a prefill longer than the data timeout is answered. (Before, the data timeout fired
    on silence too, saying "only SSE comments" when none had come.)"""
    with LocalServer(Commenter) as backend:
        Commenter.calls = []
        gw = gateway_factory(backend.url, "--set", "resp2chat_upstream_idle_timeout_secs=0",
                             "--set", "resp2chat_upstream_data_timeout_secs=1")
        r = requests.post(gw.base_url + "/responses", json={"model": "silent", "input": "hi"}, timeout=20)
        assert r.status_code == 200, r.text
        body = r.json()
        text = "".join(p["text"] for item in body["output"] if item["type"] == "message" for p in item["content"])
        assert body["status"] == "completed" and text == "hello", body


def test_a_backend_that_sends_only_comments_fails_the_turn_and_frees_its_slot(gateway_factory):
    """A backend that answers 200 and then only ``: keep-alive`` comments held the turn, its
    backend call, the client's ``max_streams`` slot and the client for as long as it went on:
    every comment counted as progress for ``upstream_idle_timeout_secs``. Now comments keep the
    connection (a 2 s queue outlives the 1 s idle timeout, and is answered), but no data for
    ``upstream_data_timeout_secs`` ends the turn with ``response.failed`` (code
    ``upstream_timeout``), the backend call cut and the slot free: over HTTP and the WebSocket.
    While only comments come, the client hears ``keepalive_secs`` events (before, none came
    after the first comment: a Codex waiting on a queued request heard nothing)."""
    with LocalServer(Commenter) as backend:
        Commenter.calls = []
        carol = json.dumps([{"name": "carol", "key": CAROL, "max_streams": 1}])
        gw = gateway_factory(backend.url, "--set", f"resp2chat_clients={carol}",
                             "--set", "resp2chat_upstream_idle_timeout_secs=1",
                             "--set", "resp2chat_upstream_data_timeout_secs=4", "--set", "resp2chat_keepalive_secs=1")
        auth = {"authorization": f"Bearer {CAROL}"}

        def streamed(model: str) -> list[dict]:
            with requests.post(gw.base_url + "/responses", json={"model": model, "input": "hi", "stream": True},
                               headers=auth, stream=True, timeout=20) as r:
                assert r.status_code == 200, r.text
                return list(iter_sse(r))

        queued = streamed("queued")
        types = [e["type"] for e in queued]
        assert types[-1] == "response.completed", types
        assert "".join(e["delta"] for e in queued if e["type"] == "response.output_text.delta") == "hello"
        waited = types[:types.index("response.output_item.added")]  # created, in_progress, then keepalives
        assert waited.count("response.in_progress") >= 2, types

        failed = streamed("comments")
        assert failed[-1]["type"] == "response.failed", [e["type"] for e in failed]
        error = failed[-1]["response"]["error"]
        assert (error["code"], error["type"]) == ("server_error", "upstream_timeout"), error
        assert "sent no data for 4 s" in error["message"], error
        assert [e["type"] for e in failed].count("response.in_progress") >= 3  # keepalives while comments came
        wait_until(lambda: Commenter.calls[-1]["cut"], 10, "the backend call cut")
        ok = requests.post(gw.base_url + "/responses", json={"model": "queued", "input": "hi"}, headers=auth,
                           timeout=20)
        assert ok.status_code == 200, ok.text  # carol's one slot is free again

        ws = WSClient(gw.base_url, headers=auth, timeout=20)
        try:
            events = ws.turn({"type": "response.create", "model": "comments", "input": "hi"})
        finally:
            ws.close()
        assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
        assert events[-1]["response"]["error"]["type"] == "upstream_timeout"
        wait_until(lambda: Commenter.calls[-1]["cut"], 10, "the socket turn's backend call cut")
        ok = requests.post(gw.base_url + "/responses", json={"model": "queued", "input": "hi"}, headers=auth,
                           timeout=20)
        assert ok.status_code == 200, ok.text


def test_comments_that_begin_while_the_gateway_waits_are_bounded_too(gateway_factory):
    """The data rule applies once comments come; the relay's wait for the backend was armed before
    they did (for the idle rule, or the keepalive), and nothing re-armed it: comments that began
    after a moment of silence were bounded by the idle timeout (60 s by default), with it at 0
    and no keepalives, never. Now no wait outlasts the data rule's time (so it fires at most that late)."""
    with LocalServer(Commenter) as backend:
        Commenter.calls = []
        gw = gateway_factory(backend.url, "--set", "resp2chat_upstream_idle_timeout_secs=0",
                             "--set", "resp2chat_upstream_data_timeout_secs=1", "--set", "resp2chat_keepalive_secs=0")
        r = requests.post(gw.base_url + "/responses", json={"model": "late", "input": "hi"}, timeout=20)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_timeout", r.text
        assert "sent no data for 1 s" in r.json()["error"]["message"]
        wait_until(lambda: Commenter.calls[-1]["cut"], 10, "the backend call cut")


def test_a_backend_that_sends_only_comments_falls_back_to_the_next_upstream(gateway_factory, upstream):
    """A backend that answers 200 and then only comments (a request stuck in OpenRouter's queue)
    has answered nothing: when ``upstream_data_timeout_secs`` runs out, the next upstream for the
    model is tried, as for a backend silent before its first byte. (Before, the comments went
    into the turn's stream as its first bytes, so the turn was the first upstream's and failed.)
    Over HTTP (streamed and not) and the WebSocket."""
    with LocalServer(Commenter) as backend:
        Commenter.calls = []
        entries = [{"name": "stuck", "base_url": backend.url, "models": ["comments"],
                    "upstream_data_timeout_secs": 1},
                   {"name": "demo", "base_url": upstream.base_url, "models": ["comments"]}]
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_upstreams=" + json.dumps(entries),
                             "--set", "resp2chat_keepalive_secs=0", "--set", "resp2chat_max_replay_entries=0")
        with requests.post(gw.base_url + "/responses", json={"model": "comments", "input": "hi", "stream": True},
                           stream=True, timeout=30) as r:
            events = list(iter_sse(r))
        assert events[-1]["type"] == "response.completed", [e["type"] for e in events]
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "You said: hi"
        assert "upstream stuck failed before its first byte (HTTP 504)" in gw.log()
        wait_until(lambda: Commenter.calls[-1]["cut"], 10, "the stuck backend call cut")
        whole = requests.post(gw.base_url + "/responses", json={"model": "comments", "input": "again"}, timeout=30)
        assert whole.status_code == 200 and whole.json()["output"][-1]["content"][0]["text"] == "You said: again"
        ws = WSClient(gw.base_url, timeout=30)
        try:
            events = ws.turn({"type": "response.create", "model": "comments", "input": "socket"})
        finally:
            ws.close()
        assert events[-1]["type"] == "response.completed", [e["type"] for e in events]
        assert len(Commenter.calls) == 3


# --- numbers without bound ---------------------------------------------------------------------------

SHELL_CALL = {"type": "local_shell_call", "call_id": "c1", "status": "completed",
              "action": {"type": "exec", "command": ["ls"], "timeout_ms": 1000}}


def _with_timeout(ms) -> dict:
    call = {**SHELL_CALL, "action": {**SHELL_CALL["action"], "timeout_ms": ms}}
    return {"input": [call, {"type": "local_shell_call_output", "call_id": "c1", "output": "a"}]}


@pytest.mark.parametrize("fields,param,code", [
    ({"max_output_tokens": 10**400}, "max_output_tokens", "integer_above_max_value"),
    ({"max_output_tokens": 2**31}, "max_output_tokens", "integer_above_max_value"),
    ({"max_output_tokens": -1}, "max_output_tokens", "integer_below_min_value"),
    ({"max_tool_calls": 10**400}, "max_tool_calls", "integer_above_max_value"),
    ({"max_tool_calls": 2**63}, "max_tool_calls", "integer_above_max_value"),
    ({"top_logprobs": 10**400}, "top_logprobs", "integer_above_max_value"),
    (_with_timeout(10**30), "input[0].action.timeout_ms", "integer_above_max_value"),
    (_with_timeout(-5), "input[0].action.timeout_ms", "integer_below_min_value"),
], ids=["tokens-1e400", "tokens-2^31", "tokens-negative", "calls-1e400", "calls-2^63", "logprobs-1e400",
        "shell-timeout-1e30", "shell-timeout-negative"])
def test_integers_no_backend_takes_are_400s_naming_the_field(gateway, upstream, fields, param, code):
    """A JSON number has no bound: ``max_output_tokens: 10**400`` (or ``max_tool_calls``, a
    history call's ``timeout_ms``) went to the backend as it was, to fail there or overflow. Now
    the schema bounds every integer field a request may carry (a count: a signed 32-bit one; a
    duration in ms: a signed 64-bit one; none negative): a 400 naming the field with OpenAI's
    code, and the backend never asked. Over HTTP and the WebSocket."""
    upstream.clear()
    body = {"model": "demo-model", "input": "hi", **fields}
    r = requests.post(gateway.base_url + "/responses", data=json.dumps(body), timeout=30,
                      headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and (error["param"], error["code"]) == (param, code), r.text
    assert error["type"] == "invalid_request_error" and param in error["message"] and r.headers["x-request-id"]
    ws = WSClient(gateway.base_url, timeout=30)
    try:
        event = ws.turn({"type": "response.create", **body})[-1]
    finally:
        ws.close()
    assert event["type"] == "error" and (event["error"]["param"], event["error"]["code"]) == (param, code), event
    assert upstream.requests() == []


def test_the_largest_counts_still_reach_the_backend(gateway, upstream):
    upstream.clear()
    r = requests.post(gateway.base_url + "/responses", timeout=30, json={
        "model": "demo-model", "max_output_tokens": 2**31 - 1, **_with_timeout(2**63 - 1)})
    assert r.status_code == 200, r.text
    chat = upstream.requests()[-1]
    assert chat["max_tokens"] == 2**31 - 1
    assert json.loads(chat["messages"][0]["tool_calls"][0]["function"]["arguments"])["timeout_ms"] == 2**63 - 1


# --- a request head without bound -----------------------------------------------------------------


def _head_answer(gw, head: bytes, more: bytes = b"", pieces: int = 0) -> bytes:
    """Send ``head``, then ``pieces`` times ``more`` (as fast as the gateway takes them, until it
    closes), and read the gateway's answer (its head and ``content-length`` bytes, or until it
    closes)."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    try:
        sock.sendall(head)
        for _ in range(pieces):
            sock.sendall(more)
    except OSError:
        pass  # (closed while we were still sending: what is read below says why)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
            head, _, rest = got.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), None)
            if length is not None and len(rest) >= length:
                break
    except OSError:
        pass
    sock.close()
    return got


def _refused_431(got: bytes) -> None:
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), got[:300]
    assert b"x-request-id: req_" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large", body


def test_a_request_head_is_bounded_while_it_arrives(upstream, gateway_factory):
    """mitmproxy gathers a request head until its blank line without limit, before any hook: a
    client without the key made the gateway hold 64 MiB of one header line (+64 MiB RSS; 200 MiB
    in 0.3 s), and a whole head past 64 KiB was a 502 HTML page without a request id (the relay
    could not read it). Now past 32 KiB the client gets a 431 (the gateway's JSON, a request id)
    and the connection ends; a head of 16 KiB is served."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_gateway_api_key=sk-gateway-key-0123456789")
    start = b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    peak = Peak(gw.proc.pid)
    _refused_431(_head_answer(gw, start + b"x-long: ", b"a" * MiB, 64))
    assert peak.grown < 16 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    body = json.dumps({"model": "demo-model", "input": "hi"}).encode()
    auth = b"authorization: Bearer sk-gateway-key-0123456789\r\n"
    for size in (40, 100):  # (whole, in one or two reads)
        _refused_431(_head_answer(gw, start + auth + b"x-long: %s\r\ncontent-length: %d\r\n\r\n%s"
                                  % (b"a" * (size << 10), len(body), body)))
    got = _head_answer(gw, start + auth + b"connection: close\r\nx-long: %s\r\ncontent-length: %d\r\n\r\n%s"
                       % (b"a" * (16 << 10), len(body), body))
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    assert requests.get(gw.base_url.removesuffix("/v1") + "/healthz", timeout=10).status_code == 200


# --- what a client sends while its request is answered -------------------------------------------


def _read_all(sock: socket.socket, into: bytearray) -> None:
    try:
        while chunk := sock.recv(65536):
            into += chunk
    except OSError:
        pass


def test_bytes_sent_while_a_turn_is_answered_are_bounded(upstream, gateway_factory):
    """mitmproxy kept whatever a client sent after its request while that request was answered
    (its HTTP/1 ``wait`` state: ``self.buf += data``), without bound: 128 MiB of junk sent during
    a streamed turn were held (+128 MiB RSS). Now past 64 KiB it is dropped as it comes: the
    turn's answer arrives whole, then the gateway closes the connection (the junk is never read as
    a request)."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0")
    body = json.dumps({"model": "demo-model", "input": "slow: 100\nwords: 12", "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    got = bytearray()
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: sock.recv(1, socket.MSG_PEEK), what="the answer's head")
    reader = threading.Thread(target=_read_all, args=(sock, got), daemon=True)
    reader.start()
    peak = Peak(gw.proc.pid)
    junk = b"x" * MiB
    try:
        for _ in range(128):
            sock.sendall(junk)
    except OSError:
        pass
    reader.join(30)
    assert not reader.is_alive(), "the gateway did not close the connection after the answer"
    assert peak.grown < 24 * MiB, f"the gateway grew {peak.grown / MiB:.0f} MiB"
    head, _, rest = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), got[:300]
    assert b"transfer-encoding: chunked" in head.lower(), head
    assert rest.endswith(b"\r\n0\r\n\r\n"), rest[-300:]  # (the answer whole, and nothing after it)
    events = parse_sse(b"".join(rest.split(b"\r\n")[1::2]))
    assert events[-1]["type"] == "response.completed", events[-1]
    sock.close()


def test_a_few_pipelined_requests_are_all_answered(upstream, gateway_factory):
    """HTTP/1.1 pipelining of a few small requests still works with the bound above: three GETs
    sent at once get three answers, in order, on the one connection."""
    gw = gateway_factory(upstream.origin)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    get = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n%s\r\n"
    sock.sendall(get % b"" + get % b"" + get % b"connection: close\r\n")
    got = bytearray()
    _read_all(sock, got)
    sock.close()
    answers = bytes(got).split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3, got
    assert all(a.startswith(b"200") and a.endswith(b'{"status":"ok"}') for a in answers), got


def test_a_head_answer_has_no_body(upstream, gateway_factory):
    """mitmproxy wrote the body of a gateway-built answer to a HEAD (``/healthz``'s, the 405 of
    an API endpoint, a 404), so a keep-alive client read it as its next answer. Now a HEAD's
    answer is its head alone (its content-length that of the body a GET gets): HEAD then GET on
    one connection are two clean answers."""
    gw = gateway_factory(upstream.origin)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock.sendall(b"HEAD /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
                 b"HEAD /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
                 b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
    got = bytearray()
    _read_all(sock, got)
    sock.close()
    first, _, rest = bytes(got).partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), got
    assert b"content-length: 15" in first.lower(), first
    second, _, rest = rest.partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 "), got  # (the 405 of an API endpoint, or the gate's refusal)
    third, _, body = rest.partition(b"\r\n\r\n")
    assert third.startswith(b"HTTP/1.1 200"), got
    assert body == b'{"status":"ok"}', got
