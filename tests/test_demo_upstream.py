"""The scripted demo upstream, over real HTTP on a loopback ephemeral port."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from helpers import parse_chat_sse
from resp2chat_io import demo_upstream
from resp2chat_io.demo_upstream import serve_in_thread

DIALECTS = ["vllm", "ollama", "llamacpp", "deepseek"]
EXEC_TOOL = {"type": "function", "function": {"name": "exec_command", "parameters": {"type": "object"}}}
SHELL_TOOL = {"type": "function", "function": {"name": "local_shell", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def base():
    server, url = serve_in_thread()
    yield url
    server.shutdown()
    server.server_close()


def chat(base, content=None, *, messages=None, dialect=None, stream=True, **extra):
    body = {"model": "m1", "messages": messages or [{"role": "user", "content": content}], "stream": stream, **extra}
    headers = {"x-demo-dialect": dialect} if dialect else {}
    return requests.post(f"{base}/chat/completions", json=body, headers=headers, timeout=10)


def events(resp):
    """Every SSE event must be `data: <json>` or `data: [DONE]` (helpers.parse_chat_sse)."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return parse_chat_sse(resp.content)


def assemble(evts):
    r = {"reasoning": "", "content": "", "calls": {}, "finish": None, "usage": None}
    for e in evts:
        if e == "[DONE]":
            continue
        if e.get("usage"):
            r["usage"] = e["usage"]
        for ch in e["choices"]:
            d = ch["delta"]
            r["reasoning"] += d.get("reasoning_content") or d.get("reasoning") or ""
            r["content"] += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                call = r["calls"].setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.get("id") or call["id"]
                call["name"] += tc.get("function", {}).get("name") or ""
                call["arguments"] += tc.get("function", {}).get("arguments") or ""
            r["finish"] = ch.get("finish_reason") or r["finish"]
    return r


def test_models_and_health(base):
    models = requests.get(f"{base}/models", timeout=5).json()
    assert models == {"object": "list", "data": [{"id": "demo-model", "object": "model",
                                                  "owned_by": "resp2chat-demo", "max_model_len": 131072}]}
    root = base.removesuffix("/v1")
    for path in ("/health", "/healthz"):
        assert requests.get(root + path, timeout=5).json() == {"status": "ok"}
    missing = requests.get(f"{base}/nope", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    # one model, as a client asks for it before using it (the gateway passes GET /v1/models/{id} on)
    assert requests.get(f"{base}/models/demo-model", timeout=5).json() == models["data"][0]
    other = requests.get(f"{base}/models/other%2Fmodel", timeout=5)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found", other.text
    assert "'other/model'" in other.json()["error"]["message"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_default_answer_streams_in_each_dialect(base, dialect):
    evts = events(chat(base, "hi\nhello there", dialect=dialect))
    assert evts[-1] == "[DONE]"
    r = assemble(evts)
    assert r["reasoning"] == "Thinking about: hello there"
    assert r["content"] == "You said: hello there"
    assert r["finish"] == "stop"
    assert all(e["model"] == "m1" and e["id"].startswith("chatcmpl-") for e in evts[:-1])
    first = evts[0]["choices"][0]["delta"]
    if dialect == "ollama":
        assert "reasoning" in first and first["role"] == "assistant"  # no role-only chunk
    else:
        assert first == {"role": "assistant", "content": ""}
        assert "reasoning_content" in evts[1]["choices"][0]["delta"]
        assert evts[1]["choices"][0]["delta"]["reasoning_content"] == "Thinking "  # one word per chunk


@pytest.mark.parametrize("dialect", DIALECTS)
def test_run_directive_becomes_exec_command(base, dialect):
    r = assemble(events(chat(base, "noreason\nrun: ls -la 'my dir'", tools=[EXEC_TOOL], dialect=dialect)))
    assert r["reasoning"] == ""
    assert list(r["calls"]) == [0]
    call = r["calls"][0]
    assert call["name"] == "exec_command" and call["id"]
    assert json.loads(call["arguments"]) == {"cmd": "ls -la 'my dir'"}
    assert r["finish"] == ("stop" if dialect == "ollama" else "tool_calls")


def test_run_directive_falls_back_to_local_shell_then_text(base):
    r = assemble(events(chat(base, "run: echo hi", tools=[SHELL_TOOL])))
    assert json.loads(r["calls"][0]["arguments"]) == {"command": ["bash", "-lc", "echo hi"]}
    r = assemble(events(chat(base, "run: echo hi")))
    assert not r["calls"] and r["content"] == "You said: run: echo hi"
    r = assemble(events(chat(base, "run: echo hi", tools=[EXEC_TOOL], tool_choice="none")))
    assert not r["calls"] and r["finish"] == "stop"


def test_vllm_arguments_arrive_in_small_deltas(base):
    evts = events(chat(base, 'call: big {"text": "' + "x" * 50 + '"}'))
    pieces = [tc["function"]["arguments"] for e in evts[:-1] for ch in e["choices"]
              for tc in ch["delta"].get("tool_calls") or [] if "id" not in tc]
    assert len(pieces) > 5 and all(0 < len(p) <= 8 for p in pieces)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_parallel_call_lines(base, dialect):
    text = 'noreason\ncall: get_weather {"city": "Paris"}\ncall: get_time {"tz": "UTC"}'
    r = assemble(events(chat(base, text, dialect=dialect)))
    assert [c["name"] for c in r["calls"].values()] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in r["calls"].values()] == [{"city": "Paris"}, {"tz": "UTC"}]
    assert len({c["id"] for c in r["calls"].values()}) == 2


@pytest.mark.parametrize("dialect", DIALECTS)
def test_usage_only_when_include_usage(base, dialect):
    without = events(chat(base, "hello", dialect=dialect))
    assert not any("usage" in e for e in without[:-1])
    evts = events(chat(base, "hello", dialect=dialect, stream_options={"include_usage": True}))
    assert evts[-1] == "[DONE]"
    last = evts[-2]
    usage = last["usage"]
    if dialect == "ollama":  # on the finish chunk itself
        assert last["choices"][0]["finish_reason"] == "stop"
    else:
        assert last["choices"] == []
    # reasoning "Thinking about: hello" (3 words) + text "You said: hello" (3 words)
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    if dialect in ("vllm", "deepseek"):
        assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
    if dialect == "llamacpp":
        assert last["timings"]["predicted_n"] == 6
    if dialect == "deepseek":
        assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]


def test_cached_tokens_grow_on_repeated_and_extended_prompt(base):
    history = [{"role": "system", "content": f"{uuid.uuid4()} " + "be brief. " * 200},
               {"role": "user", "content": "first question"}]

    def usage(messages):
        return chat(base, messages=messages, stream=False).json()["usage"]

    first = usage(history)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    again = usage(history)["prompt_tokens_details"]["cached_tokens"]
    assert again > 0 and again % 16 == 0 and again <= first["prompt_tokens"]
    history += [{"role": "assistant", "content": "answer " * 100}, {"role": "user", "content": "more"}]
    extended = usage(history)
    assert extended["prompt_tokens_details"]["cached_tokens"] >= again
    history[-1]["content"] = "more, please"
    assert usage(history)["prompt_tokens_details"]["cached_tokens"] > again


def test_error_directive(base):
    resp = chat(base, "please\nerror: 429 slow down")
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "2"
    assert resp.json()["error"]["message"] == "slow down"
    resp = chat(base, "error: 503 overloaded", stream=False)
    assert resp.status_code == 503
    assert resp.json()["error"] == {"message": "overloaded", "type": "server_error", "param": None, "code": None}


def test_midstream_error_and_truncate(base):
    evts = events(chat(base, "midstream-error"))
    assert evts[-1] == {"error": {"message": "upstream exploded", "type": "server_error", "code": 500}}
    assert "[DONE]" not in evts
    evts = events(chat(base, "truncate"))
    assert "[DONE]" not in evts and assemble(evts)["finish"] is None and assemble(evts)["content"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "hi"}], None),  # with a dotted tool name, below
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "out"}],
     "messages[1]"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_b", "content": "out"}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "messages[1].role"),
    ([{"role": "developer", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}], "messages[0].content[0].type"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "ns.f", "arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([], "messages"),
])
def test_validation_errors(base, messages, param):
    extra = {}
    if param is None:
        extra["tools"] = [{"type": "function", "function": {"name": "mcp.server.tool", "parameters": {}}}]
        param = "tools[0].function.name"
    resp = requests.post(f"{base}/chat/completions", json={"model": "m", "messages": messages, **extra}, timeout=5)
    assert resp.status_code == 400
    body = resp.json()
    assert body["object"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert resp.headers["Content-Type"] == "application/json"


def test_malformed_tools_and_body(base):
    bad = requests.post(f"{base}/chat/completions", data=b"{not json", timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    resp = chat(base, "hi", tools=[{"type": "function", "name": "flat_responses_style", "parameters": {}}])
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools[0]"


def test_context_overflow_uses_vllm_wording():
    server, url = serve_in_thread(max_context=100)
    try:
        resp = chat(url, "x" * 1000)
        n = -(-len(json.dumps([[], [{"role": "user", "content": "x" * 1000}]], separators=(",", ":"))) // 4)
        assert resp.status_code == 400
        assert resp.json()["error"] == {
            "message": f"This model's maximum context length is 100 tokens. However, you requested {n} tokens "
                       "in the messages, Please reduce the length of the messages.",
            "type": "BadRequestError", "param": None, "code": 400}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_non_streaming_answer(base, dialect):
    resp = chat(base, "hello", stream=False, dialect=dialect)
    assert resp.status_code == 200 and resp.headers["Content-Length"]
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "m1"
    choice = body["choices"][0]
    msg = choice["message"]
    assert msg["content"] == "You said: hello" and choice["finish_reason"] == "stop"
    assert msg["reasoning" if dialect == "ollama" else "reasoning_content"] == "Thinking about: hello"
    assert body["usage"]["completion_tokens"] == 6


def test_non_streaming_tool_call(base):
    msg = chat(base, "run: pwd", stream=False, tools=[EXEC_TOOL]).json()["choices"][0]["message"]
    assert msg["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        ("exec_command", {"cmd": "pwd"})]


def test_other_answers(base):
    tool_turn = [{"role": "user", "content": "noreason\nrun: ls"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function", "function": {"name": "exec_command", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt\n"}]
    r = assemble(events(chat(base, messages=tool_turn)))
    assert r["content"] == "The tool returned: b.txt" and r["reasoning"] == ""  # noreason carries over
    assert assemble(events(chat(base, "noreason\nwords: 5")))["content"] == "word0 word1 word2 word3 word4"
    assert json.loads(assemble(events(chat(base, "json\nhi")))["content"]) == {"answer": "You said: hi"}
    r = assemble(events(chat(base, "length")))
    assert r["finish"] == "length"
    images = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]
    assert assemble(events(chat(base, images)))["content"] == "You said: look (I see 1 image(s))"
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert assemble(events(chat(base, messages=prefill)))["content"] == "Hello from the demo upstream."


def test_max_tokens_cuts_with_length(base):
    r = assemble(events(chat(base, "noreason\nwords: 50", max_tokens=10)))
    assert r["content"].split() == [f"word{i}" for i in range(10)] and r["finish"] == "length"


def test_requests_are_recorded(base):
    assert requests.delete(f"{base.removesuffix('/v1')}/_requests", timeout=5).status_code == 200
    chat(base, "recorded one")
    chat(base, messages=[{"role": "system", "content": "x"}, {"role": "system", "content": "y"}])  # invalid too
    got = requests.get(f"{base.removesuffix('/v1')}/_requests", timeout=5).json()
    assert [b["messages"][0]["content"] for b in got] == ["recorded one", "x"]
    requests.delete(f"{base.removesuffix('/v1')}/_requests", timeout=5)
    assert requests.get(f"{base.removesuffix('/v1')}/_requests", timeout=5).json() == []


def test_keep_alive_and_chunked_framing(base):
    with requests.Session() as s:
        for _ in range(3):
            resp = s.post(f"{base}/chat/completions", timeout=5,
                          json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert resp.headers["Transfer-Encoding"] == "chunked" and resp.text.endswith("data: [DONE]\n\n")


def test_main_cli_prints_url_logs_and_stops_on_sigterm(tmp_path):
    log = tmp_path / "requests.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(demo_upstream.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "resp2chat_io.demo_upstream", "--port", "0",
                             "--dialect", "ollama", "--log", str(log)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("demo upstream listening on http://127.0.0.1:") and line.endswith("/v1")
        url = line.rsplit(" ", 1)[1]
        assert assemble(events(chat(url, "hi")))["content"] == "You said: hi"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert json.loads(log.read_text())["messages"][0]["content"] == "hi"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
