"""A property hunt of the upstream layer through real gateways and real backends.

Several loopback backends (``Backend``: each records what it received and answers each turn
with the behaviour the test chose for it: an answer, 429 with or without ``Retry-After``, a 5xx,
a 4xx, a reset, a stream cut before or after its first token, a silence past the head deadline,
garbage, a whole JSON answer to a stream request, a 200 carrying an ``error`` object) behind
one gateway with ``upstreams``, every model served by every entry in order. Hypothesis picks the
behaviours; each turn (HTTP streamed, HTTP JSON, the Responses WebSocket) is checked against
README's rule (*Several upstreams with fallbacks*): a fallback exactly when an upstream failed
before its first byte with an unreachable/silent/5xx/429, in order, each at most once, never
after output; one coherent answer the openai SDK's models parse; the final failure the one
that decides (routing.py ``deciding``: a 429, else the first outage); each backend its own model,
key and headers; the access log naming who answered.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    LocalServer, QuietHandler, chat_chunk, check_sdk, free_port, http_chunk, parse_sse, retranslate, scrape,
    send_json, start_gateway, terminal, wait_until,
)
from wsclient import WSClient
from resp2chat_core.errors import RESPONSE_CODES, specific_code

IDLE = 1  # the upstreams' upstream_idle_timeout_secs: "slow" stays silent past it (c's is SLOW_OK)
SLOW_OK = 5  # c's upstream_idle_timeout_secs: it waits for a "slow" answer
DATA = 1  # the upstreams' upstream_data_timeout_secs: "comments" sends only comments past it

# behaviour -> (falls back, what a client sees when it is the last one tried)
FALLS_BACK = {"ok": None, "json": None, "429": True, "429-wait": True, "503": True, "500": True, "reset": True,
              "slow": True, "400": False, "cut-after": False, "cut-before": True, "comments": True, "not-http": True, "json-error": False, "sse-length": None, "garbage": False, "error200": False}
BEHAVIOURS = sorted(FALLS_BACK)


class Backend:
    """A chat backend on loopback: ``plan[text]`` is its behaviour for the turn whose last user
    text is ``text`` (default "ok"); ``calls``: every request it received (body, headers)."""

    def __init__(self, name: str):
        self.name = name
        self.plan: dict[str, str] = {}
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                if outer.plan.get("GET /models") == "slow":
                    time.sleep(IDLE * 3)
                send_json(self, 200, {"object": "list", "data": [{"id": f"m-{outer.name}", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                text = _last_text(body)
                with outer.lock:
                    outer.calls.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "all": [(k.lower(), v) for k, v in self.headers.items()], "text": text})
                outer.answer(self, outer.plan.get(text, "ok"), body)

        self.server = LocalServer(Handler)
        self.base_url = self.server.url + "/v1"

    def calls_for(self, text: str) -> list[dict]:
        with self.lock:
            return [c for c in self.calls if c["text"] == text]

    def words(self, h, body: dict) -> str:
        """What its answer says."""
        return f"answer from {self.name}"

    def answer(self, h, behaviour: str, body: dict) -> None:
        words = self.words(h, body)
        if behaviour in ("429", "429-wait", "503", "500", "400"):
            status = int(behaviour[:3])
            send_json(h, status, {"error": {"message": f"{self.name} says {status}", "type": "x"}},
                      headers={"retry-after": "7" if behaviour == "429-wait" else None})
        elif behaviour == "503-context":  # (an operator's words, and ones that would decide a code)
            send_json(h, 503, {"error": {"message": f"{self.name} says: maximum context length exceeded at "
                                                    "internal 10.1.2.3", "type": "x"}})
        elif behaviour == "not-http":  # (bytes that are no HTTP answer, then the end)
            h.close_connection = True
            h.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            h.wfile.flush()
        elif behaviour == "reset":
            h.close_connection = True
            h.connection.shutdown(2)
        elif behaviour == "slow":  # (then an answer: an upstream whose own idle timeout is longer has it)
            time.sleep(IDLE * 2.5)
            self.answer(h, "ok", body)
        elif behaviour == "json-error":
            send_json(h, 200, {"error": {"message": f"{self.name} failed in a 200", "type": "invalid_request_error"}})
        elif behaviour == "sse-length":  # (a whole SSE body, its length declared: no chunks)
            chunks = [chat_chunk({"role": "assistant", "content": words}), chat_chunk({}, "stop")]
            data = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            h.send_response(200)
            h.send_header("content-type", "text/event-stream")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        elif behaviour == "json" or (behaviour == "ok" and not body.get("stream")):
            send_json(h, 200, {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": words},
                                            "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
        else:
            h.send_response(200)
            h.send_header("content-type", "text/event-stream")
            h.send_header("transfer-encoding", "chunked")
            h.end_headers()

            def event(obj) -> None:
                data = obj if isinstance(obj, bytes) else f"data: {json.dumps(obj)}\n\n".encode()
                h.wfile.write(http_chunk(data))
                h.wfile.flush()

            if behaviour in ("ok", "drip"):
                event(chat_chunk({"role": "assistant", "content": ""}))
                for word in words.split(" "):
                    event(chat_chunk({"content": word + " "}))
                    if behaviour == "drip":  # (a model's slow pace: a client may hang up meanwhile)
                        time.sleep(0.3)
                event(chat_chunk({}, "stop"))
                event(chat_chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}))
                event(b"data: [DONE]\n\n")
            elif behaviour == "cut-after":
                event(chat_chunk({"role": "assistant", "content": "partial "}))
                h.close_connection = True
                return
            elif behaviour == "comments":  # (SSE comments only, past the data timeout: no answer)
                for _ in range(int(DATA * 3 / 0.3)):
                    h.wfile.write(http_chunk(b": keep-alive\n\n"))
                    h.wfile.flush()
                    time.sleep(0.3)
            elif behaviour == "cut-before":  # (its head, then nothing: it closes)
                h.close_connection = True
                return
            elif behaviour == "garbage":
                event(b"data: {this is no json\n\n")
            elif behaviour == "error200":
                event({"error": {"message": f"{self.name} failed inside its stream", "type": "server_error"}})
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()

    def close(self) -> None:
        self.server.close()


def _last_text(body: dict) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            content = m["content"]
            return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    return ""


NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three backends behind one gateway, every model served by each in order a, b, c; each
    entry with its own key, header, model map, max_tokens field and a short idle timeout."""
    tmp = tmp_path_factory.mktemp("fleet")
    backends = {n: Backend(n) for n in NAMES}
    entries = [{"name": n, "base_url": backends[n].base_url, "api_key": f"sk-{n}-0123456789",
                "models": ["*"], "upstream_headers": {"x-which": f"hdr-{n}"},
                "model_map": {"m": f"model-for-{n}"}, "upstream_idle_timeout_secs": SLOW_OK if n == "c" else IDLE,
                "upstream_data_timeout_secs": DATA,
                "keepalive_secs": 1, "max_tokens_field": "max_completion_tokens" if n == "b" else "max_tokens"}
               for n in NAMES]
    log = tmp / "access.jsonl"
    gw = start_gateway("http://127.0.0.1:9", tmp, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", "resp2chat_max_replay_entries=0", "--set", f"resp2chat_access_log_path={log}")
    yield gw, backends, log
    gw.stop()
    for b in backends.values():
        b.close()


def _expected(plan: list[str]) -> tuple[list[str], str]:
    """Which backends a turn asks, in order, and the behaviour that ends it: the answer, or the
    failure the client gets (one that does not fall back; when every one fell back, the one that
    decides: the first rate limit, else the first outage, routing.py ``deciding``)."""
    asked = []
    for name, behaviour in zip(NAMES, plan):
        asked.append(name)
        if name == "c" and behaviour == "slow":  # (its own idle timeout is longer: it answers)
            return asked, "ok"
        if not FALLS_BACK[behaviour]:
            return asked, behaviour
    return asked, next((b for b in plan if b.startswith("429")), plan[0])


# what a JSON client gets when this behaviour ends the turn, or decides its failure (a backend's 5xx is the
# gateway's 502)
STATUS = {"429": 429, "429-wait": 429, "503": 502, "500": 502, "reset": 502, "slow": 502, "400": 400, "comments": 502, "not-http": 502, "cut-before": 502}
# the code a client gets when it ends the turn
CODE = {"429": "rate_limit_exceeded", "429-wait": "rate_limit_exceeded", "503": "server_error", "500": "server_error",
        "reset": "server_error", "slow": "upstream_timeout", "comments": "upstream_timeout", "not-http": "server_error",
        "cut-before": "server_error"}




def _access_line(log, text_id: str, rid: str | None = None) -> dict:
    def find():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if rid is not None and row.get("request_id") == rid:
                return row
        return None
    return wait_until(find, timeout=10, what="the access log line")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=st.lists(st.sampled_from(BEHAVIOURS), min_size=3, max_size=3),
       transport=st.sampled_from(["stream", "json", "ws"]))
def test_fallbacks_follow_the_rule_and_each_upstream_gets_its_own(fleet, plan, transport):
    gw, backends, log = fleet
    text = f"hello {uuid.uuid4().hex[:10]}"
    for name, behaviour in zip(NAMES, plan):
        backends[name].plan[text] = behaviour
    asked, last = _expected(plan)
    body = {"model": "m", "input": text, "max_output_tokens": 40}
    http_status = None
    # (a client's header of a name an upstream's upstream_headers set: the upstream's alone goes)
    mine = {"x-which": "from-the-client", "x-client-note": "kept"}
    if transport == "ws":
        ws = WSClient(gw.base_url, timeout=30, headers=mine)
        try:
            events = ws.turn({"type": "response.create", **body})
        finally:
            ws.close()
        check_sdk(events)
        end = terminal(events)
    elif transport == "stream":
        r = requests.post(gw.base_url + "/responses", json={**body, "stream": True}, timeout=30, headers=mine)
        assert r.status_code == 200, r.text[:300]
        events = parse_sse(r.content)
        check_sdk(events)
        end = terminal(events)
        rid = r.headers.get("x-request-id")
    else:
        r = requests.post(gw.base_url + "/responses", json=body, timeout=30, headers=mine)
        http_status = r.status_code
        end = None
        rid = r.headers.get("x-request-id")
    # each backend asked at most once, in order, exactly those the rule says
    got = {n: backends[n].calls_for(text) for n in NAMES}
    assert [n for n in NAMES if got[n]] == asked, (plan, {n: len(c) for n, c in got.items()})
    # (once each: a reset after the request was written, a pooled connection's too, is no cue to send
    # it again, relay/upstream.py: the backend may be running it)
    assert all(len(got[n]) == 1 for n in asked), (plan, {n: len(c) for n, c in got.items()})
    # each its own model, key, header and lowering, never another's
    for n in asked:
        call = got[n][0]
        assert call["body"]["model"] == f"model-for-{n}"
        assert call["headers"]["authorization"] == f"Bearer sk-{n}-0123456789"
        assert [v for k, v in call["all"] if k == "x-which"] == [f"hdr-{n}"], (n, call["all"])
        assert call["headers"]["x-client-note"] == "kept"
        field = "max_completion_tokens" if n == "b" else "max_tokens"
        assert call["body"][field] == 40 and len([k for k in ("max_tokens", "max_completion_tokens")
                                                   if k in call["body"]]) == 1
    answered = asked[-1]
    if last in ("ok", "json", "sse-length"):
        words = f"answer from {answered}"
        if end is not None:
            assert end["type"] == "response.completed", end
            assert words in json.dumps(end["response"]["output"])
            # no output from an upstream fallen back from
            for n in asked[:-1]:
                assert f"answer from {n}" not in json.dumps(events)
        else:
            assert http_status == 200, r.text[:300]
            assert words in r.text
    else:
        status = STATUS.get(last)
        if end is not None:
            assert end["type"] == "response.failed", (plan, end)
            if last == "cut-after":
                assert any(e["type"] == "response.output_text.delta" for e in events)
            error = end["response"]["error"]
            if last in CODE:  # (a Response's code is one the SDK takes; the gateway's own is its type)
                assert specific_code(error) == CODE[last] and error["code"] in RESPONSE_CODES, (plan, error)
            if len(asked) > 1 and FALLS_BACK[last]:
                assert "every upstream for model 'm' failed" in error["message"], (plan, error)
                assert all(f"{n} (" in error["message"] for n in asked), (plan, error)
            if STATUS.get(last) == 429:  # (the shortest wait: none when one answered without)
                waits = [p == "429-wait" for p in plan[:len(asked)] if p not in ("reset", "slow", "comments", "not-http", "cut-before")]
                assert (error.get("headers") or {}).get("retry-after") == ("7" if all(waits) else None), (plan, error)
        else:
            if status is not None:
                assert http_status == status, (plan, http_status, r.text[:300])
            else:
                assert http_status in (200, 502), (plan, http_status, r.text[:300])
            error = r.json()["error"]
            if last in CODE:
                assert error["code"] == CODE[last], (plan, error)
            if len(asked) > 1 and FALLS_BACK[last]:
                assert "every upstream for model 'm' failed" in error["message"], (plan, error)
            if status == 429:
                waits = [p == "429-wait" for p in plan[:len(asked)] if p not in ("reset", "slow", "comments", "not-http", "cut-before")]
                assert r.headers.get("retry-after") == ("7" if all(waits) else None), (plan, dict(r.headers))
    # a backend's 5xx words are for the operator: never a client's, whoever failed last
    shown = json.dumps(events) if end is not None else r.text
    assert not any(f"{n} says 5" in shown for n in asked), (plan, shown[-600:])
    if transport != "ws":
        row = _access_line(log, text, rid)
        assert row["upstream"] == answered, (plan, row)
        assert [f["upstream"] for f in row.get("fallbacks", [])] == asked[:-1], (plan, row)


def test_metrics_and_the_access_log_name_the_upstream_that_answered(fleet):
    """After the turns above (HTTP and the WebSocket): ``resp2chat_turns_total`` by upstream and
    ``resp2chat_fallbacks_total`` by upstream are what the access log's lines say, turn by turn."""
    gw, backends, log = fleet
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [r for r in rows if "path" not in r]  # (turns: a refused passthrough has its path)
    assert rows, "no turn ran"
    samples = scrape(gw)
    turns, fallbacks = {}, {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == "resp2chat_turns_total":
            turns[labels["upstream"]] = turns.get(labels["upstream"], 0) + value
        elif name == "resp2chat_fallbacks_total":
            fallbacks[labels["upstream"]] = fallbacks.get(labels["upstream"], 0) + value
    logged, fell = {}, {}
    for r in rows:
        logged[r["upstream"] or ""] = logged.get(r["upstream"] or "", 0) + 1
        for f in r.get("fallbacks", ()):
            fell[f["upstream"]] = fell.get(f["upstream"], 0) + 1
    assert {k: v for k, v in turns.items() if v} == logged, (turns, logged)
    assert {k: v for k, v in fallbacks.items() if v} == fell, (fallbacks, fell)


def test_every_upstream_failing_is_named_with_the_deciding_code_and_no_backends_5xx_words(tmp_path):
    """When every upstream failed, the client's one error names each of them and why, in words a
    client may read: a backend's 5xx body is the operator's (errors.py), whichever upstream sent
    it, and its words neither reach the client nor decide the code, which is the deciding failure's
    (routing.py ``deciding``: the 429, else the first outage).
    Before, the reasons were the backends' own words, shown whenever the last failure was a 4xx
    (a 429: an earlier 503's text reached the client, and its "maximum context length" made the
    code ``context_length_exceeded``: Codex would compact instead of retrying), and all withheld
    whenever the last was a 5xx (no upstream named)."""
    first, second = Backend("first"), Backend("second")
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_max_replay_entries=0",
                       "--set", "resp2chat_upstreams=" + json.dumps(
                           [{"name": "first", "base_url": first.base_url}, {"name": "second", "base_url": second.base_url}]))
    try:
        seen = {}
        for last in ("429", "503"):
            text = f"hi {last}"
            first.plan[text], second.plan[text] = "503-context", last
            r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": text, "stream": True}, timeout=30)
            error = terminal(parse_sse(r.content))["response"]["error"]
            j = requests.post(gw.base_url + "/responses", json={"model": "m", "input": text}, timeout=30)
            seen[last] = (error, j.status_code, j.json()["error"])
        for last, code, status in (("429", "rate_limit_exceeded", 429), ("503", "server_error", 502)):
            error, got_status, json_error = seen[last]
            for e in (error, json_error):
                assert e["code"] == code, seen
                assert "every upstream for model 'm' failed" in e["message"], seen
                assert "first (upstream HTTP 503: the upstream failed (the gateway" in e["message"], seen
                assert "context" not in e["message"] and "first says" not in e["message"], seen
            assert got_status == status, seen
        assert "second (upstream HTTP 429: second says 429)" in seen["429"][0]["message"]  # (a 4xx's own words)
        assert "internal 10.1.2.3" in gw.log()  # the operator has the backend's words
    finally:
        gw.stop()
        first.close()
        second.close()


def test_turns_that_fell_back_or_failed_retranslate_and_replay_as_recorded(tmp_path):
    """A recording of turns every behaviour ended or fell back from (``-w`` through a real
    gateway, HTTP streamed and not, the WebSocket) translates again to the very events
    (``resp2chat retranslate``: exit 0), and ``--server-replay`` of it with every backend gone
    answers each HTTP turn with the recorded bytes."""
    backends = {n: Backend(n) for n in NAMES}
    entries = [{"name": n, "base_url": backends[n].base_url, "api_key": f"sk-{n}-0123456789", "models": ["*"],
                "upstream_idle_timeout_secs": IDLE, "max_tokens_field": "max_completion_tokens" if n == "b" else "max_tokens"}
               for n in NAMES]
    flows = tmp_path / "fell-back.mitm"
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", "resp2chat_max_replay_entries=0", "-w", str(flows))
    plans = [[b, "ok", "ok"] for b in BEHAVIOURS if b != "slow"] + [["503", "429-wait", "500"], ["reset", "slow", "429"]]
    recorded = {}
    try:
        for n, plan in enumerate(plans):
            for transport in ("stream", "json", "ws"):
                text = f"turn {n} {transport}"
                for name, behaviour in zip(NAMES, plan):
                    backends[name].plan[text] = behaviour
                body = {"model": "m", "input": text, "max_output_tokens": 40}
                if transport == "ws":
                    ws = WSClient(gw.base_url, timeout=30)
                    try:
                        recorded[(text, transport)] = (200, terminal(ws.turn({"type": "response.create", **body})))
                    finally:
                        ws.close()
                else:
                    r = requests.post(gw.base_url + "/responses", json={**body, "stream": transport == "stream"},
                                      timeout=30)
                    recorded[(text, transport)] = (r.status_code, r.content)
    finally:
        gw.stop()
        for b in backends.values():
            b.close()
    out, results = retranslate(str(flows))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert results and all(r["outcome"] in ("same", "skipped") for r in results), results
    dead = [{**e, "base_url": f"http://127.0.0.1:{free_port()}/v1"} for e in entries]
    offline = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(dead),
                            "--set", "resp2chat_max_replay_entries=0", "--server-replay", str(flows))
    try:
        for (text, transport), (status, content) in recorded.items():
            if transport == "ws":  # (a socket's completed turns replay, over the socket)
                if content["response"]["status"] == "completed":
                    ws = WSClient(offline.base_url, timeout=30)
                    try:
                        again = terminal(ws.turn({"type": "response.create", "model": "m", "input": text,
                                                  "max_output_tokens": 40}))
                    finally:
                        ws.close()
                    assert again == content, (text, again, content)
                continue
            r = requests.post(offline.base_url + "/responses", timeout=30,
                              json={"model": "m", "input": text, "max_output_tokens": 40, "stream": transport == "stream"})
            if status == 200 and transport == "stream":
                assert r.content == content, (text, r.content[-300:], content[-300:])
            elif status == 200:
                assert (r.status_code, r.content) == (status, content), (text, r.status_code, r.content[-300:])
        assert "Traceback" not in offline.log()
    finally:
        offline.stop()


def test_a_clients_header_never_goes_ahead_of_the_operators_of_that_name(tmp_path):
    """``upstream_headers`` the operator set (Azure's ``api-key``, an OpenRouter provider order)
    reach the backend alone, whatever the client sends under those names; the client's other
    headers still go. Before, the client's went first, beside the operator's: a backend reading
    the first value (most do) took the client's key or order."""
    backend = Backend("azure")
    gw = start_gateway(backend.server.url, tmp_path, "--set", "resp2chat_max_replay_entries=0", "--set",
                       "resp2chat_upstream_headers=" + json.dumps({"api-key": "sk-azure-operator-0123456789",
                                                                   "X-Provider-Order": "operator"}))
    try:
        r = requests.post(gw.base_url + "/responses", timeout=30, json={"model": "m", "input": "hi"},
                          headers={"api-key": "sk-client-own-key-0123456789", "x-provider-order": "client",
                                   "x-session-note": "mine"})
        assert r.status_code == 200, r.text
        sent = backend.calls[-1]["all"]
        assert [v for k, v in sent if k == "api-key"] == ["sk-azure-operator-0123456789"], sent
        assert [v for k, v in sent if k == "x-provider-order"] == ["operator"], sent
        assert [v for k, v in sent if k == "x-session-note"] == ["mine"], sent
    finally:
        gw.stop()
        backend.close()


@pytest.mark.parametrize("transport", ["stream", "json", "ws"])
def test_a_client_gone_while_an_upstream_is_silent_is_not_served_by_the_next(fleet, transport):
    """The client hangs up while the first upstream is silent: when that one times out, the turn
    is over; no fallback is asked to answer nobody (it would spend its tokens, and a client's
    ``tpm``, for nothing)."""
    gw, backends, _ = fleet
    text = f"gone {transport} {uuid.uuid4().hex[:8]}"
    backends["a"].plan[text] = "slow"
    body = {"model": "m", "input": text}
    if transport == "ws":
        ws = WSClient(gw.base_url, timeout=30)
        ws.send({"type": "response.create", **body})
        time.sleep(0.3)
        ws.sock.close()
    else:
        try:
            requests.post(gw.base_url + "/responses", json={**body, "stream": transport == "stream"}, timeout=0.3)
        except requests.exceptions.RequestException:  # (it stopped waiting)
            pass
    wait_until(lambda: backends["a"].calls_for(text), 5, "the first upstream asked")
    time.sleep(IDLE * 2.5 + 1)  # (a's silence has run out by now)
    assert backends["b"].calls_for(text) == [] and backends["c"].calls_for(text) == []


@pytest.mark.parametrize("plan, said", [("not-http", "no HTTP response"), ("cut-before", "ended its stream before any data")],
                         ids=["no-http", "cut-before-any-data"])
def test_an_upstream_failing_before_its_first_byte_falls_back_and_is_named(fleet, plan, said):
    """Two ways a backend fails before its first byte, each once taken for an answer that ended
    at once (no fallback, "upstream stream ended before the response was finished"): bytes that
    are no HTTP response (another service on its port, a proxy's garbage), and a 200 head closed
    before any data (vLLM sends its head at once, then prefills: a crash meanwhile). Nothing
    reached the client: the next upstream answers, as after a silence or comments alone; when it
    was the last, the client's error names the failure."""
    gw, backends, _ = fleet
    for stream in (True, False):
        text = f"{plan} {stream} {uuid.uuid4().hex[:8]}"
        backends["a"].plan[text] = plan
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": text, "stream": stream}, timeout=30)
        assert r.status_code == 200 and "answer from b" in r.text, r.text[-500:]
        assert len(backends["b"].calls_for(text)) == 1
        text = f"all {plan} {stream} {uuid.uuid4().hex[:8]}"
        for b in backends.values():
            b.plan[text] = plan
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": text, "stream": stream}, timeout=30)
        error = terminal(parse_sse(r.content))["response"]["error"] if stream else r.json()["error"]
        assert "every upstream for model 'm' failed" in error["message"] and said in error["message"], error


def test_16_turns_at_once_fall_back_each_once_and_answer_whole(fleet):
    """16 turns at once (streamed, JSON, the WebSocket) whose first upstream refuses them: each
    asks a once and b once, and each answer is b's, whole and coherent, under its own id."""
    from concurrent.futures import ThreadPoolExecutor

    gw, backends, _ = fleet
    texts = [f"crowd {i} {uuid.uuid4().hex[:6]}" for i in range(16)]
    for text in texts:
        backends["a"].plan[text], backends["b"].plan[text] = "503", "drip"

    def one(i: int):
        body = {"model": "m", "input": texts[i]}
        if i % 3 == 2:
            ws = WSClient(gw.base_url, timeout=30)
            try:
                events = ws.turn({"type": "response.create", **body})
            finally:
                ws.close()
            return events[-1]["response"]
        r = requests.post(gw.base_url + "/responses", json={**body, "stream": i % 3 == 0}, timeout=60)
        assert r.status_code == 200, r.text[:300]
        if i % 3 == 0:
            events = parse_sse(r.content)
            check_sdk(events)
            return terminal(events)["response"]
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        finals = list(pool.map(one, range(16)))
    assert len({f["id"] for f in finals}) == 16
    for text, final in zip(texts, finals):
        assert final["status"] == "completed" and "answer from b" in json.dumps(final["output"]), final
        assert len(backends["a"].calls_for(text)) == 1 and len(backends["b"].calls_for(text)) == 1
        assert backends["c"].calls_for(text) == []


def test_the_merged_model_list_waits_for_each_upstream_its_own_time(fleet):
    """``GET /v1/models`` asks every upstream; one silent past its own
    ``upstream_idle_timeout_secs`` is left out then, not waited for as long as the top-level
    setting says (60 s here). Before, every upstream's list was waited for the top-level time."""
    gw, backends, _ = fleet
    backends["a"].plan["GET /models"] = "slow"
    try:
        started = time.monotonic()
        r = requests.get(gw.base_url + "/models", timeout=30)
        took = time.monotonic() - started
    finally:
        backends["a"].plan.pop("GET /models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["m-b", "m-c"], r.text
    assert took < IDLE * 3, took
