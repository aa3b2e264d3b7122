"""Several upstreams through a real mitmdump: routing by model, fallbacks before the first byte
(never after), one error naming every upstream tried, per-upstream lowering, the flow showing the
upstream that answered, merged /v1/models, the routing-key header, invalid entries at start-up."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import requests

from helpers import (
    ADDON, MITMDUMP, LocalServer, QuietHandler, Upstream, answers, free_port, openai_client, parse_sse, read_flows,
    retranslate, send_json, start_gateway, stop_process, wait_until,
)
from resp2chat_io.demo_upstream import serve_in_thread
from wsclient import WSClient


class Refusing:
    """A real HTTP backend that answers every chat request with one status (and counts them);
    ``retry_after``: its ``Retry-After`` header."""

    def __init__(self, status: int, message: str = "busy", models: tuple[str, ...] = ("other-model",),
                 retry_after: str | None = None, code: str | None = None):
        self.calls: list[dict] = []
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                send_json(self, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.calls.append({"body": json.loads(body), "authorization": self.headers.get("authorization")})
                send_json(self, status, {"error": {"message": message, "type": "server_error", "code": code}},
                          headers={"retry-after": retry_after})

        self.server = LocalServer(Handler)
        self.base_url = self.server.url + "/v1"

    def close(self):
        self.server.close()


@pytest.fixture
def demo_pair():
    """Two scripted upstreams (each records what it got)."""
    pair = [Upstream(url, server) for server, url in (serve_in_thread() for _ in range(2))]
    yield pair
    for up in pair:
        up.server.shutdown()
        up.server.server_close()


def gateway_with(tmp_path, entries, *extra):
    return start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                         "--set", "resp2chat_max_replay_entries=0", *extra)


def test_fallback_on_refused_and_5xx_with_own_key_body_and_flow(tmp_path, demo_pair):
    busy = Refusing(503)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    flows = tmp_path / "flows.mitm"
    entries = [{"name": "dead", "base_url": dead, "api_key": "sk-dead-000000"},
               {"name": "busy", "base_url": busy.base_url, "api_key": "sk-busy-111111"},
               {"name": "good", "base_url": demo_pair[0].base_url, "api_key": "sk-good-222222",
                "max_tokens_field": "max_completion_tokens"}]
    gw = gateway_with(tmp_path, entries, "-w", str(flows))
    try:
        client = openai_client(gw, api_key="client-key")
        with client.responses.stream(model="demo-model", input="hello there", max_output_tokens=50) as stream:
            events = [e.type for e in stream]
            final = stream.get_final_response()
        assert final.output_text == "You said: hello there" and events[-1] == "response.completed"
        assert events.count("response.created") == 1  # one stream, whatever happened before
        # busy got its own key and the primary's body; good its own key and its own lowering
        assert busy.calls[0]["authorization"] == "Bearer sk-busy-111111"
        assert busy.calls[0]["body"]["max_tokens"] == 50
        got = demo_pair[0].requests()[-1]
        assert got["max_completion_tokens"] == 50 and "max_tokens" not in got
    finally:
        gw.stop()
        busy.close()
    flow = next(f for f in read_flows(flows) if f.request.path.endswith("/chat/completions"))
    # the flow shows the upstream that answered and what it got; no key anywhere
    assert flow.request.url == demo_pair[0].base_url + "/chat/completions"
    assert json.loads(flow.request.content)["max_completion_tokens"] == 50
    assert flow.metadata["resp2chat"]["upstream_name"] == "good"
    assert flow.metadata["resp2chat"]["fallbacks"] == [{"upstream": "dead", "status": 502},
                                                       {"upstream": "busy", "status": 503}]
    assert "via good (after dead, busy)" in flow.comment
    assert b"sk-good" not in flows.read_bytes()


def test_no_fallback_after_the_first_byte_nor_for_a_4xx(tmp_path, demo_pair):
    entries = [{"name": "a", "base_url": demo_pair[0].base_url}, {"name": "b", "base_url": demo_pair[1].base_url}]
    gw = gateway_with(tmp_path, entries)
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "midstream-error",
                                                            "stream": True}, timeout=30)
        events = parse_sse(r.content)
        assert events[-1]["type"] == "response.failed"
        assert any(e["type"] == "response.output_text.delta" for e in events)  # it had started
        r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "error: 400 bad thing"},
                          timeout=30)
        assert r.status_code == 400 and "bad thing" in r.json()["error"]["message"]
        assert demo_pair[1].requests() == []  # b was never asked
        assert len(demo_pair[0].requests()) == 2
    finally:
        gw.stop()


TOO_LONG = "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens."


@pytest.mark.parametrize("code", [None, "context_length_exceeded"])
def test_a_conversation_too_long_for_one_upstream_falls_back_to_the_next(tmp_path, demo_pair, code):
    """A backend's 400 "maximum context length" (``context_length_exceeded``, in its words or its
    code) before the first byte of an ordinary turn's answer falls back: the next upstream may
    have a larger context window. The client gets the next one's answer (JSON, a stream, the
    WebSocket); every upstream too short: a 400 ``context_length_exceeded`` (the code Codex stops
    or compacts on) naming each, over HTTP JSON and in ``response.failed``. Another 400 still
    does not fall back."""
    short, shorter = Refusing(400, TOO_LONG, code=code), Refusing(400, TOO_LONG.replace("4096", "2048"), code=code)
    gw = gateway_with(tmp_path, [{"name": "short", "base_url": short.base_url, "models": ["m", "s"]},
                                 {"name": "long", "base_url": demo_pair[0].base_url, "models": ["m"]},
                                 {"name": "shorter", "base_url": shorter.base_url, "models": ["s"]}])
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hello there"}, timeout=30)
        assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "You said: hello there", r.text
        raw = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hello again", "stream": True},
                            timeout=30)
        events = parse_sse(raw.content)
        assert events[-1]["type"] == "response.completed", events[-1]
        assert events[-1]["response"]["output"][-1]["content"][0]["text"] == "You said: hello again"
        ws = WSClient(gw.base_url)
        done = ws.turn({"type": "response.create", "model": "m", "input": "and once more"})
        ws.close()
        assert done[-1]["type"] == "response.completed", done[-1]
        assert len(short.calls) == 3 and len(demo_pair[0].requests()) == 3
        assert "upstream short failed before its first byte (HTTP 400)" in gw.log()

        # every upstream too short: the code Codex acts on, the 400, each named
        r = requests.post(gw.base_url + "/responses", json={"model": "s", "input": "hi"}, timeout=30)
        raw = requests.post(gw.base_url + "/responses", json={"model": "s", "input": "hi", "stream": True},
                            timeout=30)
        end = parse_sse(raw.content)[-1]
        assert r.status_code == 400 and raw.status_code == 200, (r.text, raw.text)
        assert end["type"] == "response.failed", end
        for error in (r.json()["error"], end["response"]["error"]):
            assert error["code"] == "context_length_exceeded", error
            assert error["message"].startswith("every upstream for model 's' failed: short (upstream HTTP 400: "
                                               "This model's maximum context length is 4096"), error
            assert "shorter (upstream HTTP 400: This model's maximum context length is 2048" in error["message"]
        assert len(shorter.calls) == 2 and len(short.calls) == 5
    finally:
        gw.stop()
        short.close()
        shorter.close()


def test_an_upstream_that_refuses_the_gateways_key_falls_back_and_all_refusing_is_a_502(tmp_path, demo_pair):
    """A backend's 401/403 refused the key the gateway sent it (errors.py ``KEY_REFUSED``): the
    next upstream, with its own key, answers the turn (streamed or not); every upstream refusing is
    a 502 ``upstream_key_refused`` (``server_error`` in a stream) naming each and the cause, never
    a backend's words (they may echo the key: the log has them, scrubbed). A 403 about what the
    request says (a moderation flag) is the request's: the 400, no fallback."""
    echoed = "sk-stale-0123456789abcdef"
    stale = Refusing(401, f"Incorrect API key provided: {echoed}", code="invalid_api_key")
    denied = Refusing(403, "Project does not have access to model m")
    flagged = Refusing(403, "m requires moderation on OpenRouter. Your input was flagged")
    gw = gateway_with(tmp_path, [
        {"name": "stale", "base_url": stale.base_url, "api_key": echoed, "models": ["m", "n"]},
        {"name": "good", "base_url": demo_pair[0].base_url, "api_key": "sk-good-222222", "models": ["m"]},
        {"name": "denied", "base_url": denied.base_url, "api_key": "sk-denied-33333", "models": ["n"]},
        {"name": "flagged", "base_url": flagged.base_url, "models": ["f"]},
        {"name": "spare", "base_url": demo_pair[1].base_url, "models": ["f"]}])
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hello there"}, timeout=30)
        assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "You said: hello there", r.text
        events = parse_sse(requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi", "stream": True},
                                         timeout=30).content)
        assert events[-1]["type"] == "response.completed", events[-1]
        assert len(stale.calls) == 2 and stale.calls[0]["authorization"] == f"Bearer {echoed}"
        assert "upstream stale failed before its first byte (HTTP 401): refused the gateway's key" in gw.log()

        # every upstream refused its key: the gateway's failure, named, in both shapes
        r = requests.post(gw.base_url + "/responses", json={"model": "n", "input": "hi"}, timeout=30)
        events = parse_sse(requests.post(gw.base_url + "/responses", json={"model": "n", "input": "hi", "stream": True},
                                         timeout=30).content)
        assert events[-1]["type"] == "response.failed", events[-1]
        streamed = events[-1]["response"]["error"]
        assert (r.status_code, r.json()["error"]["type"]) == (502, "upstream_error"), r.text
        assert (r.json()["error"]["code"], streamed["code"], streamed["type"]) == (
            "upstream_key_refused", "server_error", "upstream_key_refused"), (r.text, streamed)
        for error in (r.json()["error"], streamed):
            assert error["message"].startswith("every upstream for model 'n' failed: stale (upstream HTTP 401: the "
                                               "upstream refused the gateway's credentials"), error
            assert "denied (upstream HTTP 403: the upstream refused the gateway's credentials" in error["message"]
            assert "Incorrect API key" not in error["message"] and "access to model" not in error["message"]
        assert echoed not in r.text + json.dumps(events) + gw.log()
        assert "Incorrect API key provided: sk-[redacted]" in gw.log() and "does not have access to model m" in gw.log()

        # a 403 about what the request says: the client's, no fallback
        r = requests.post(gw.base_url + "/responses", json={"model": "f", "input": "hi"}, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_prompt"), r.text
        assert "Your input was flagged" in r.json()["error"]["message"] and demo_pair[1].requests() == []
    finally:
        gw.stop()
        for up in (stale, denied, flagged):
            up.close()


def test_all_upstreams_down_is_one_clear_error_naming_them(tmp_path):
    busy = Refusing(429, "slow down")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = gateway_with(tmp_path, [{"name": "dead", "base_url": dead}, {"name": "limited", "base_url": busy.base_url}])
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi", "stream": True}, timeout=30)
        failed = parse_sse(r.content)[-1]
        assert failed["type"] == "response.failed"
        error = failed["response"]["error"]
        assert error["code"] == "rate_limit_exceeded"  # the 429 decides (routing.py deciding): Codex waits and retries
        assert "every upstream for model 'm' failed" in error["message"]
        assert "dead (" in error["message"] and "limited (upstream HTTP 429: slow down)" in error["message"]
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, timeout=30)
        assert r.status_code == 429 and "every upstream" in r.json()["error"]["message"]
    finally:
        gw.stop()
        busy.close()


def test_upstreams_failing_differently_give_the_client_the_failure_it_can_act_on(tmp_path):
    """Every upstream failed, each its own way (routing.py ``deciding``): a rate limit and then an
    outage is the 429 (the client waits and retries), with the shortest wait they gave, not the
    outage's 5xx it got before because that upstream came last; an outage and then a conversation
    too long is the outage (a retry may be answered), not the 400 ``context_length_exceeded`` that
    would have Codex stop or compact, with the outage's wait (the conversation too long says
    nothing of when: ``routing.CURABLE``). Each upstream is named, over HTTP JSON and in a stream."""
    limited, busy = Refusing(429, "slow down", retry_after="3"), Refusing(503, "overloaded", retry_after="9")
    short = Refusing(400, TOO_LONG)
    gw = gateway_with(tmp_path, [{"name": "limited", "base_url": limited.base_url, "models": ["m"]},
                                 {"name": "busy", "base_url": busy.base_url, "models": ["m", "t"]},
                                 {"name": "short", "base_url": short.base_url, "models": ["t"]}])
    try:
        for model, status, code, wait in (("m", 429, "rate_limit_exceeded", "3"), ("t", 502, "server_error", "9")):
            r = requests.post(gw.base_url + "/responses", json={"model": model, "input": "hi"}, timeout=30)
            raw = requests.post(gw.base_url + "/responses", json={"model": model, "input": "hi", "stream": True},
                                timeout=30)
            end = parse_sse(raw.content)[-1]
            assert end["type"] == "response.failed", end
            assert (r.status_code, r.headers.get("retry-after")) == (status, wait), (model, r.status_code, r.text)
            for error in (r.json()["error"], end["response"]["error"]):
                assert error["code"] == code, (model, error)
                assert error["message"].startswith(f"every upstream for model {model!r} failed: "), error
            assert (end["response"]["error"].get("headers") or {}).get("retry-after") == wait, end["response"]["error"]
        assert len(limited.calls) == 2 and len(busy.calls) == 4 and len(short.calls) == 2
    finally:
        gw.stop()
        for up in (limited, busy, short):
            up.close()


def test_a_backends_retry_after_reaches_a_json_client_the_shortest_of_several(tmp_path):
    """The openai SDK waits as ``retry-after``/``retry-after-ms`` say: a backend's wait is passed
    on (a 503's too, a 502 here), an HTTP date as the seconds until then; when every upstream
    failed, the shortest wait any gave (a retry goes through them all again), and none when one
    of them gave none (a plain 504: it may be ready at once, the client backs off by itself; the
    429 before it still decides the status)."""
    slow, soon = Refusing(429, "slow down", retry_after="30"), Refusing(429, "slow down", retry_after="7")
    busy, dated = Refusing(503, retry_after="5"), Refusing(503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    plain = Refusing(504)
    gw = gateway_with(tmp_path, [{"name": "soon", "base_url": soon.base_url, "models": ["m", "n"]},
                                 {"name": "slow", "base_url": slow.base_url, "models": ["m"]},  # (the last: 30)
                                 {"name": "busy", "base_url": busy.base_url, "models": ["b"]},
                                 {"name": "dated", "base_url": dated.base_url, "models": ["d"]},
                                 {"name": "plain", "base_url": plain.base_url, "models": ["n"]}])
    try:
        waits = {}
        for model in ("m", "b", "d", "n"):
            r = requests.post(gw.base_url + "/responses", json={"model": model, "input": "hi"}, timeout=30)
            waits[model] = (r.status_code, r.headers.get("retry-after"), r.headers.get("retry-after-ms"))
        assert waits == {"m": (429, "7", "7000"), "b": (502, "5", "5000"), "d": (502, "1", "1"),
                         "n": (429, None, None)}, waits  # (the 429 decides: routing.py deciding)
        assert len(slow.calls) == 1 and len(soon.calls) == 2 and len(plain.calls) == 1
    finally:
        gw.stop()
        for up in (slow, soon, busy, dated, plain):
            up.close()


def test_a_backends_wait_reaches_a_stream_client_inside_response_failed(tmp_path):
    """A streaming client has its 200 and the SSE head before the backend answers (the gateway
    sends them at once, then keepalives while the backend prefills): the wait a backend's 429 or
    503 gave (``Retry-After``) can only reach it inside ``response.failed``, the two ways Codex
    0.169 reads one there (codex-rs sse/responses_error.rs): ``error.headers`` (``retry-after``,
    whole seconds; read for any code) and, for ``rate_limit_exceeded``, the message ending "Please
    try again in Ns." (OpenAI's words). Every upstream failing: the shortest wait. A WebSocket turn
    gets the same event. Before, a 5xx's wait reached no stream client at all, a 429's only as
    "(try again in Ns)" in the text."""
    slow, busy = Refusing(429, "slow down", retry_after="3"), Refusing(503, retry_after="1.5")
    worse = Refusing(503, retry_after="30")
    gw = gateway_with(tmp_path, [{"name": "slow", "base_url": slow.base_url, "models": ["m"]},
                                 {"name": "busy", "base_url": busy.base_url, "models": ["b"]},
                                 {"name": "worse", "base_url": worse.base_url, "models": ["f"]},
                                 {"name": "slow-too", "base_url": slow.base_url, "models": ["f"]}])
    try:
        errors = {}
        for model in ("m", "b", "f"):
            raw = requests.post(gw.base_url + "/responses", json={"model": model, "input": "hi", "stream": True},
                                timeout=30)
            assert raw.status_code == 200, raw.text
            end = parse_sse(raw.content)[-1]
            assert end["type"] == "response.failed", end
            errors[model] = end["response"]["error"]
        m, b, f = errors["m"], errors["b"], errors["f"]
        assert m == {"code": "rate_limit_exceeded", "message": "upstream HTTP 429: slow down. Please try again in 3s.",
                     "headers": {"retry-after": "3", "retry-after-ms": "3000"}}, m
        assert b["code"] == "server_error" and b["message"].endswith("the gateway's log has the details). "
                                                                      "Please try again in 1.5s."), b
        assert b["headers"] == {"retry-after": "2", "retry-after-ms": "1500"}, b  # (Codex reads whole seconds)
        assert f["code"] == "rate_limit_exceeded" and "every upstream for model 'f' failed" in f["message"], f
        assert f["message"].endswith("Please try again in 3s.") and f["headers"]["retry-after"] == "3", f
        ws = WSClient(gw.base_url)
        events = ws.turn({"type": "response.create", "model": "b", "input": "hi"})
        ws.close()
        assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["headers"] == b["headers"]
        # a JSON client has the wait in its headers, as before, and the same words
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, timeout=30)
        assert (r.status_code, r.headers["retry-after"], r.json()["error"]["message"]) == (429, "3", m["message"])
    finally:
        gw.stop()
        for up in (slow, busy, worse):
            up.close()


def test_an_offline_replay_of_a_failed_stream_stores_it_without_its_wait(tmp_path):
    """A recorded ``response.failed`` replayed offline (``--server-replay``) reaches the client as
    recorded, its wait included; the Response stored for it, which a GET shows, has the schema's
    error fields alone, as a live turn's has (the wait is out of date once it went out)."""
    busy, flows = Refusing(503, retry_after="3"), tmp_path / "failed.mitm"
    body = {"model": "b", "input": "hi", "stream": True}
    gw = gateway_with(tmp_path, [{"name": "busy", "base_url": busy.base_url, "models": ["b"]}], "-w", str(flows))
    try:
        live = requests.post(gw.base_url + "/responses", json=body, timeout=30)
    finally:
        gw.stop()
        busy.close()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    offline = gateway_with(tmp_path, [{"name": "busy", "base_url": dead, "models": ["b"]}], "--server-replay", str(flows))
    try:
        again = requests.post(offline.base_url + "/responses", json=body, timeout=30)
        assert again.status_code == 200 and again.content == live.content
        failed = parse_sse(again.content)[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["headers"]["retry-after"] == "3", failed
        stored = requests.get(f"{offline.base_url}/responses/{failed['id']}", timeout=30).json()
        assert stored["status"] == "failed", stored
        assert stored["error"] == {"code": failed["error"]["code"], "message": failed["error"]["message"]}, stored
    finally:
        offline.stop()


@pytest.mark.parametrize("answer", ["fastapi", "html", "go", "llamacpp"])
def test_a_base_url_without_v1_is_named_in_the_404s_error(tmp_path, answer):
    """The commonest set-up mistake, a base URL without its ``/v1``: the backend answers the chat
    request with a 404 (vLLM's FastAPI: ``{"detail": "Not Found"}``; another server: an HTML
    page; Go's router, Ollama's: ``404 page not found`` as plain text; llama.cpp: a JSON error
    "File Not Found"). The client's error says where to look (before: "upstream HTTP 404: Not
    Found", code invalid_prompt, nothing more). A 404 about a model (Ollama's "model not found")
    is left as it is (and any other 404 an API wrote: the next test)."""

    class NoV1(QuietHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            if answer == "html":
                self.send_error(404)
            elif answer == "go":
                self.send_response(404)
                self.send_header("content-type", "text/plain; charset=utf-8")
                self.send_header("content-length", "18")
                self.end_headers()
                self.wfile.write(b"404 page not found")
            elif answer == "llamacpp":
                send_json(self, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
            else:
                send_json(self, 404, {"detail": "Not Found"})

    with LocalServer(NoV1) as server:
        ollama = Refusing(404, 'model "m2" not found, try pulling it first')
        gw = gateway_with(tmp_path, [{"name": "local", "base_url": server.url, "models": ["m"]},
                                     {"name": "ollama", "base_url": ollama.base_url, "models": ["m2"]}])
        try:
            for stream in (False, True):
                r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi", "stream": stream},
                                  timeout=30)
                error = parse_sse(r.content)[-1]["response"]["error"] if stream else r.json()["error"]
                assert (r.status_code, error["code"]) == (200 if stream else 400, "invalid_prompt"), r.text
                assert error["message"].startswith("upstream HTTP 404: ") and (
                    "is the gateway's upstream base URL right? Most servers want it to end in /v1" in error["message"]), error
            r = requests.post(gw.base_url + "/responses", json={"model": "m2", "input": "hi"}, timeout=30)
            assert r.json()["error"]["message"] == 'upstream HTTP 404: model "m2" not found, try pulling it first', r.text
        finally:
            gw.stop()
            ollama.close()


def test_a_404_an_api_wrote_is_not_taken_for_a_wrong_base_url(tmp_path):
    """OpenRouter answers a request no provider of its model can serve (tools, here) with a 404
    and its reason: that is the client's error as the backend wrote it, without the hint of a
    base URL missing its ``/v1`` (before: every 404 not naming "model" got it, sending the
    operator after a base URL that was right)."""
    reason = ("No endpoints found that support tool use. To learn more about provider routing, visit: "
              "https://openrouter.ai/docs/provider-routing")

    class OpenRouter(QuietHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            send_json(self, 404, {"error": {"message": reason, "code": 404}})

    with LocalServer(OpenRouter) as server:
        gw = gateway_with(tmp_path, [{"name": "openrouter", "base_url": server.url + "/api/v1", "models": ["*"]}])
        try:
            turn = {"model": "qwen/qwen3-coder", "input": "hi",
                    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]}
            for stream in (False, True):
                r = requests.post(gw.base_url + "/responses", json={**turn, "stream": stream}, timeout=30)
                error = parse_sse(r.content)[-1]["response"]["error"] if stream else r.json()["error"]
                assert (r.status_code, error["code"]) == (200 if stream else 400, "invalid_prompt"), r.text
                assert error["message"] == f"upstream HTTP 404: {reason}", error
                assert "/v1" not in error["message"].removesuffix(reason), error
        finally:
            gw.stop()


def test_models_route_by_glob_and_models_list_merges(tmp_path, demo_pair):
    other = Refusing(500, models=("qwen3-coder", "demo-model", "not-routed"))
    entries = [{"name": "qwen", "base_url": other.base_url, "models": ["qwen*", "demo-*"]},
               {"name": "demo", "base_url": demo_pair[0].base_url, "models": ["demo-*"],
                "model_map": {"demo-x": "demo-model"}},
               {"name": "gone", "base_url": f"http://127.0.0.1:{free_port()}/v1"}]
    gw = gateway_with(tmp_path, entries)
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "demo-x", "input": "hi"}, timeout=30)
        assert r.status_code == 200, r.text  # qwen failed (500) -> demo, with demo's own model_map
        assert other.calls[-1]["body"]["model"] == "demo-x" and demo_pair[0].requests()[-1]["model"] == "demo-model"
        r = requests.post(gw.base_url + "/responses", json={"model": "llama", "input": "hi"}, timeout=30)
        assert r.status_code == 502 and "cannot connect" in r.json()["error"]["message"]  # only "gone" ("*"): down
        r = requests.get(gw.base_url + "/models", timeout=30)
        ids = [m["id"] for m in r.json()["data"]]
        assert ids == ["qwen3-coder", "demo-model"], ids  # merged, first wins, not-routed filtered out
    finally:
        gw.stop()
        other.close()


def test_unknown_model_and_routing_key_header(tmp_path, demo_pair):
    gw = gateway_with(tmp_path, [{"name": "demo", "base_url": demo_pair[0].base_url, "models": ["demo-*"]}],
                      "--set", "resp2chat_routing_key_header=x-smg-routing-key")
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "gpt-5", "input": "hi"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "demo: demo-*" in r.json()["error"]["message"]
    finally:
        gw.stop()
    # the header reaches the backend: a recording backend (the demo upstream does not keep headers)
    got: list[dict] = []

    class Recorder(QuietHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            got.append(dict(self.headers))
            send_json(self, 500, {"error": {"message": "recorded"}})

    server = LocalServer(Recorder)
    gw = start_gateway(server.url, tmp_path, "--set", "resp2chat_routing_key_header=x-smg-routing-key",
                       "--set", "resp2chat_max_replay_entries=0")
    try:
        requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi", "prompt_cache_key": "conv-1"})
        requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"},
                      headers={"session-id": "codex-session-9"})
        requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi", "prompt_cache_key": "ü" * 5})
        keys = [{k.lower(): v for k, v in h.items()}.get("x-smg-routing-key") for h in got]
        assert keys[:2] == ["conv-1", "codex-session-9"]
        assert len(keys[2]) == 32 and keys[2].isalnum()  # not a valid header value as is: hashed, stable
    finally:
        gw.stop()
        server.close()


@pytest.mark.parametrize("value,named", [
    ('[{"name": "a", "base_url": "http://x/v1"}, {"name": "b"}]', "upstreams[1] ('b').base_url"),
    ('[{"name": "a", "base_url": "http://x/v1", "max_tokens_field": "n"}]', "upstreams[0] ('a').max_tokens_field"),
])
def test_invalid_entries_stop_start_up_naming_entry_and_field(tmp_path, value, named):
    port = free_port()
    for how in ("set", "env"):
        args = [str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
                "--set", f"confdir={tmp_path / 'conf'}"]
        env = None
        if how == "set":
            args += ["--set", f"resp2chat_upstreams={value}"]
        else:
            env = {**os.environ, "RESP2CHAT_UPSTREAMS": value}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode != 0
        assert named in proc.stdout + proc.stderr, (how, proc.stdout[-2000:], proc.stderr[-2000:])


def test_a_credential_header_at_the_top_with_upstreams_stops_start_up(tmp_path):
    """``upstream_headers`` named like a credential (Azure's ``api-key``) are a key. With
    ``upstreams``, the top-level ones go to every entry without headers of its own, a fallback at
    another provider too: such a header at the top stops start-up naming it (never its value); on
    its entry it reaches that upstream only (test_upstream_transport.py). Before, the gateway
    started and sent it to every upstream."""
    secret = "azure-secret-0123456789"
    entries = [{"name": "azure", "base_url": "http://127.0.0.1:9/v1"},
               {"name": "other", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-other-0123456789"}]
    port = free_port()
    args = [str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
            "--set", f"confdir={tmp_path / 'conf'}", "--set", "resp2chat_upstreams=" + json.dumps(entries)]
    env = {**os.environ, "RESP2CHAT_UPSTREAM_HEADERS": json.dumps({"api-key": secret, "x-title": "team"})}
    log = tmp_path / "refused.log"
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: proc.poll() is not None or answers(f"http://127.0.0.1:{port}/healthz"), 60,
                   "the gateway stopped or serving")
        exited = proc.poll()
    finally:
        stop_process(proc)
    out = log.read_text()
    assert exited not in (None, 0) and "upstream_headers: 'api-key' is a credential" in out, out[-2000:]
    assert "upstreams[N].upstream_headers" in out and secret not in out
    # headers that are no credential stay defaults for every upstream
    gateway_with(tmp_path, entries, "--set", "resp2chat_upstream_headers=" + json.dumps({"x-title": "team"})).stop()


def test_a_fallback_reads_think_tags_its_own_way(tmp_path, demo_pair):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    body = {"model": "demo-model", "input": "hello", "stream": True}
    think = {"x-demo-dialect": "think"}  # the scripted upstream puts <think>…</think> in content
    gw = gateway_with(tmp_path, [{"name": "dead", "base_url": dead},  # think_tags: auto (split them)
                                 {"name": "raw", "base_url": demo_pair[0].base_url, "think_tags": {"*": "off"}}])
    try:
        events = parse_sse(requests.post(gw.base_url + "/responses", json=body, headers=think, timeout=30).content)
        final = events[-1]["response"]
        assert [o["type"] for o in final["output"]] == ["message"]  # "off": the tags stay text
        assert "<think>" in final["output"][0]["content"][0]["text"]
    finally:
        gw.stop()
    gw = gateway_with(tmp_path, [{"name": "split", "base_url": demo_pair[0].base_url}])
    try:  # the same answer from an upstream with the default (auto): reasoning + message
        events = parse_sse(requests.post(gw.base_url + "/responses", json=body, headers=think, timeout=30).content)
        assert [o["type"] for o in events[-1]["response"]["output"]] == ["reasoning", "message"]
    finally:
        gw.stop()


def test_a_fallback_translates_with_its_own_tools_and_is_recorded_as_it_answered(tmp_path, demo_pair):
    """The first upstream drops apply_patch (its tool_denylist), the fallback that answers keeps it:
    its call comes back as the custom tool call it is, not as a function call. The flow, the
    request log and the record say which upstream answered with what it got; offline replay files
    the turn under the first upstream's chat request (what a rerun lowers first); `resp2chat
    retranslate` translates it again the same (with the fallback's tools)."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    entries = [{"name": "dead", "base_url": dead, "tool_denylist": ["apply_patch"]},
               {"name": "good", "base_url": demo_pair[0].base_url}]
    flows, log = tmp_path / "flows.mitm", tmp_path / "up.jsonl"
    body = {"model": "demo-model", "stream": True, "input": 'call: apply_patch {"input": "*** Begin Patch"}',
            "tools": [{"type": "custom", "name": "apply_patch", "description": "edit files"}]}
    gw = gateway_with(tmp_path, entries, "-w", str(flows), "--set", f"resp2chat_upstream_request_log_path={log}")
    try:
        answer = requests.post(gw.base_url + "/responses", json=body, timeout=30)
        call = parse_sse(answer.content)[-1]["response"]["output"][-1]
        assert (call["type"], call["name"], call["input"]) == ("custom_tool_call", "apply_patch", "*** Begin Patch")
        assert [t["function"]["name"] for t in demo_pair[0].requests()[-1]["tools"]] == ["apply_patch"]
    finally:
        gw.stop()
    flow = next(f for f in read_flows(flows) if f.request.path.endswith("/chat/completions"))
    meta = flow.metadata["resp2chat"]
    assert flow.request.url == demo_pair[0].base_url + "/chat/completions" and meta["upstream_name"] == "good"
    assert meta["upstream"] == demo_pair[0].base_url  # (its base URL, as a socket turn's record has it)
    assert "tools" in json.loads(flow.request.content) and "tools" not in json.loads(meta["chat_request"])
    assert meta["lowering"]["tool_denylist"] == ["apply_patch"] and meta["lowering_fallbacks"][0]["tool_denylist"] == []
    assert [e[1:] for e in meta["gateway_events"] if e[1] == "Rerouted"] == [["Rerouted", {"think": "auto", "alternate": 1}]]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["upstream"], x["url"], "tools" in x["body"]) for x in lines] == [
        ("dead", dead + "/chat/completions", False), ("good", demo_pair[0].base_url + "/chat/completions", True)]
    out, results = retranslate(str(flows))
    assert out.returncode == 0 and [r["outcome"] for r in results] == ["same"], out.stdout
    # offline, with both upstreams gone: the rerun lowers the first upstream's request, as live
    offline = gateway_with(tmp_path, [{**entries[0]}, {"name": "good", "base_url": dead}], "--server-replay", str(flows))
    try:
        again = requests.post(offline.base_url + "/responses", json=body, timeout=30)
        assert again.status_code == 200 and again.content == answer.content
    finally:
        offline.stop()
