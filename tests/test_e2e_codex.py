"""End to end: the real Codex CLI (the Makefile's CODEX_VER) -> real mitmdump + addon -> the
scripted chat upstream.

Each test runs `codex exec` headless (see helpers.Codex) and checks both what a user sees
(Codex's stdout/stderr, files in the workdir) and what the chat backend received.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import pytest

from helpers import (NAME_RE, Codex, LocalServer, QuietHandler, chat_chunk, chat_sse, send_json, send_sse,
                     tool_call_chunk, tool_names, write_png)

pytestmark = pytest.mark.codex

SYSTEM_PROMPT_START = "You are a coding agent running in the Codex CLI"


# --- helpers ---------------------------------------------------------------------------------


def diag(run, gateway) -> str:
    """Context for a failed assertion: what Codex printed and the end of the mitmdump log."""
    return (f"\n--- codex exit {run.returncode}\n--- stdout:\n{run.stdout[-3000:]}\n--- stderr:\n"
            f"{run.stderr[-3000:]}\n--- mitmdump log (tail):\n{gateway.log()[-3000:]}")


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False)


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def set_retries(codex, *, stream: int, request: int = 0) -> None:
    """Rewrite the retry settings in the CODEX_HOME config that the fixture wrote."""
    cfg = codex.home / "config.toml"
    text = cfg.read_text()
    assert "stream_max_retries = 0" in text and "request_max_retries = 0" in text, text
    cfg.write_text(text.replace("stream_max_retries = 0", f"stream_max_retries = {stream}")
                       .replace("request_max_retries = 0", f"request_max_retries = {request}"))


# --- 1. plain answer -------------------------------------------------------------------------


def test_plain_answer(codex, upstream, gateway):
    upstream.clear()
    run = codex.exec("say hi")
    assert run.returncode == 0, diag(run, gateway)
    assert "You said: say hi" in run.stdout, diag(run, gateway)

    reqs = upstream.requests()
    assert len(reqs) == 1, f"expected one chat request, got {len(reqs)}" + diag(run, gateway)
    body = reqs[0]
    msgs = body["messages"]

    # Codex's developer prompt becomes the one leading system message.
    assert msgs[0]["role"] == "system"
    assert SYSTEM_PROMPT_START in text_of(msgs[0]["content"])
    assert [m["role"] for m in msgs].count("system") == 1
    assert msgs[-1]["role"] == "user" and text_of(msgs[-1]["content"]).strip() == "say hi"
    assert any("<environment_context>" in text_of(m["content"]) for m in msgs if m["role"] == "user")

    # Tools: plain chat functions with names strict backends accept; namespaces flattened.
    names = tool_names(body)
    assert all(t["type"] == "function" and isinstance(t["function"].get("parameters"), dict)
               for t in body["tools"]), body["tools"]
    assert "exec_command" in names, names
    bad = [n for n in names if not NAME_RE.match(n)]
    assert not bad, f"tool names invalid for chat backends: {bad}"
    assert len(names) == len(set(names)), f"duplicate tool names: {names}"
    assert any(n.startswith("multi_agent_v1") and n != "multi_agent_v1" for n in names), \
        f"multi_agent_v1 namespace tools missing (not flattened?): {names}"

    assert body["stream"] is True
    assert body.get("stream_options", {}).get("include_usage") is True, body.get("stream_options")
    assert body["model"] == "demo-model"


# --- 2. a tool call really executed ----------------------------------------------------------


def test_tool_call_executed_and_result_sent_back(codex, upstream, gateway):
    marker = f"resp2chat-{uuid.uuid4().hex}"
    command = f"echo {marker}"
    upstream.clear()
    run = codex.exec(f"please run this\nrun: {command}")
    assert run.returncode == 0, diag(run, gateway)

    # Codex itself shows the command it ran and the command's output.
    assert command in run.output, diag(run, gateway)
    assert re.search(rf"^{marker}$", run.output, re.M), "command output not shown" + diag(run, gateway)

    reqs = upstream.requests()
    assert len(reqs) == 2, f"expected tool-call request + follow-up, got {len(reqs)}" + diag(run, gateway)
    first, second = reqs
    prev = first["messages"]
    msgs = second["messages"]
    # The follow-up resends the first request unchanged, then the call and its result.
    assert [dumps(m) for m in msgs[:len(prev)]] == [dumps(m) for m in prev], "history prefix changed"
    assert dumps(second["tools"]) == dumps(first["tools"]), "tool list changed between requests"
    assert len(msgs) == len(prev) + 2, [m["role"] for m in msgs]

    call_msg, tool_msg = msgs[len(prev)], msgs[len(prev) + 1]
    assert call_msg["role"] == "assistant", call_msg
    calls = call_msg.get("tool_calls") or []
    assert len(calls) == 1, call_msg
    call = calls[0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "exec_command"
    args = json.loads(call["function"]["arguments"])
    assert args.get("cmd") == command, args
    assert call.get("id")

    assert tool_msg["role"] == "tool", tool_msg
    assert tool_msg["tool_call_id"] == call["id"]
    result = text_of(tool_msg["content"])
    # The real command output (not just the echoed command text) reached the backend.
    assert re.search(rf"^{marker}$", result, re.M), result
    assert "exited with code 0" in result, result

    assert f"The tool returned: {marker}" in run.stdout, diag(run, gateway)


# --- 3. a tool call that writes a file -------------------------------------------------------


def test_tool_call_writes_file(codex, upstream, gateway):
    target = codex.workdir / "made-by-codex.txt"
    assert not target.exists()
    upstream.clear()
    run = codex.exec("run: echo hi > made-by-codex.txt")
    assert run.returncode == 0, diag(run, gateway)
    assert target.exists(), "the command did not run in the workdir" + diag(run, gateway)
    assert target.read_text() == "hi\n"
    # One call, one follow-up with the (empty-output) result, then Codex's final answer.
    reqs = upstream.requests()
    assert len(reqs) == 2, diag(run, gateway)
    assert reqs[1]["messages"][-1]["role"] == "tool"
    assert "The tool returned:" in run.stdout, diag(run, gateway)


# --- 4. resume: prefix stability across turns ------------------------------------------------


def test_resume_keeps_prefix_stable(codex, upstream, gateway):
    upstream.clear()
    first = codex.exec("hello there")
    assert first.returncode == 0, diag(first, gateway)
    assert "You said: hello there" in first.stdout, diag(first, gateway)
    reqs = upstream.requests()
    assert len(reqs) == 1, diag(first, gateway)
    prev = reqs[0]

    upstream.clear()
    run = codex.exec("resume", "--last", "and now summarize")
    assert run.returncode == 0, diag(run, gateway)
    assert "You said: and now summarize" in run.stdout, diag(run, gateway)
    reqs = upstream.requests()
    assert len(reqs) == 1, diag(run, gateway)
    body = reqs[0]
    msgs, old = body["messages"], prev["messages"]

    # System prompt and the first user messages are byte-identical (KV/prefix caches hit).
    assert dumps(msgs[0]) == dumps(old[0]), "system message changed on resume"
    first_users = [i for i, m in enumerate(old) if m["role"] == "user"]
    for i in first_users:
        assert dumps(msgs[i]) == dumps(old[i]), f"user message {i} changed on resume"
    # The whole previous request is an exact prefix of the resumed one ...
    assert [dumps(m) for m in msgs[:len(old)]] == [dumps(m) for m in old], "history prefix changed on resume"
    assert dumps(body["tools"]) == dumps(prev["tools"]), "tool list changed on resume"
    # ... followed by the earlier assistant answer, then the new prompt.
    answer = msgs[len(old)]
    assert answer["role"] == "assistant", answer
    assert text_of(answer["content"]).strip() == "You said: hello there", answer
    assert not answer.get("tool_calls")
    assert msgs[-1]["role"] == "user" and text_of(msgs[-1]["content"]).strip() == "and now summarize"
    assert len(msgs) == len(old) + 2, [m["role"] for m in msgs]


# --- 5. image input --------------------------------------------------------------------------


def test_image_input(codex, upstream, gateway, tmp_path):
    png = tmp_path / "red.png"
    data = write_png(png)
    upstream.clear()
    run = codex.exec("--image", str(png), "--", "what color is this")
    assert run.returncode == 0, diag(run, gateway)
    assert "(I see 1 image(s))" in run.stdout, diag(run, gateway)

    reqs = upstream.requests()
    assert len(reqs) == 1, diag(run, gateway)
    last = reqs[0]["messages"][-1]
    assert last["role"] == "user"
    parts = last["content"]
    assert isinstance(parts, list), parts
    images = [p for p in parts if p.get("type") == "image_url"]
    assert len(images) == 1, parts
    url = images[0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:80]
    sent = base64.b64decode(url[len(prefix):], validate=True)
    assert sent.startswith(b"\x89PNG\r\n\x1a\n")
    assert sent == data, "image bytes changed on the way"
    assert any(p.get("type") == "text" and "what color is this" in p["text"] for p in parts), parts


# --- 6. failed upstream turns ----------------------------------------------------------------


def _failing_exec(codex, prompt):
    start = time.monotonic()
    run = codex.exec(prompt, timeout=90)  # TimeoutExpired (a hang) fails the test
    return run, time.monotonic() - start


def test_upstream_400_fails_the_turn(codex, upstream, gateway):
    upstream.clear()
    run, elapsed = _failing_exec(codex, "error: 400 something is wrong")
    assert run.returncode != 0, diag(run, gateway)
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert "something is wrong" in run.output, diag(run, gateway)
    assert "400" in run.output, diag(run, gateway)
    assert "You said" not in run.stdout
    assert len(upstream.requests()) == 1


def test_upstream_429_fails_the_turn_as_rate_limit(codex, upstream, gateway):
    upstream.clear()
    run, elapsed = _failing_exec(codex, "error: 429 slow down")
    assert run.returncode != 0, diag(run, gateway)
    assert elapsed < 60, f"took {elapsed:.0f}s"
    # Codex reports it as a rate limit, with the backend's message.
    assert "rate limit" in run.output.lower(), diag(run, gateway)
    assert "slow down" in run.output, diag(run, gateway)
    assert "You said" not in run.stdout
    assert len(upstream.requests()) == 1


def test_upstream_429_is_retried_when_retries_allowed(codex, upstream, gateway):
    """429 must be mapped to something Codex retries (a raw HTTP 429 is fatal for Codex)."""
    set_retries(codex, stream=2)
    upstream.clear()
    run, _ = _failing_exec(codex, "error: 429 slow down")
    assert run.returncode != 0, diag(run, gateway)
    assert len(upstream.requests()) == 3, diag(run, gateway)
    assert "slow down" in run.output, diag(run, gateway)


def test_upstream_400_is_not_retried(codex, upstream, gateway):
    """A 400 is deterministic: resending the same body cannot succeed, so Codex must not retry it
    even when retries are allowed (WIRE.md: HTTP 400 is fatal for Codex)."""
    set_retries(codex, stream=2)
    upstream.clear()
    run, _ = _failing_exec(codex, "error: 400 something is wrong")
    assert run.returncode != 0, diag(run, gateway)
    assert "something is wrong" in run.output, diag(run, gateway)
    n = len(upstream.requests())
    assert n == 1, f"a 400 from upstream was sent {n} times (Codex retried it)" + diag(run, gateway)
    assert "Reconnecting" not in run.output, diag(run, gateway)


def test_upstream_503_is_retried(codex, upstream, gateway):
    """A 502/503/504 from a chat backend is transient (model loading, queue full): Codex should
    retry it like it retries a 5xx of its own, and not tell the user to switch models."""
    set_retries(codex, stream=2)
    upstream.clear()
    run, _ = _failing_exec(codex, "error: 503 busy")
    assert run.returncode != 0, diag(run, gateway)
    n = len(upstream.requests())
    assert n == 3, f"a 503 from upstream was sent {n} time(s), expected 1 + 2 retries" + diag(run, gateway)
    assert "busy" in run.output, diag(run, gateway)


# --- a failed response's tool call is not run ----------------------------------------------------


class CallThenFail(QuietHandler):
    """A backend that streams one whole ``exec_command`` call (touching ``MARK``), then an error
    event: the response fails after the call's arguments, before its finish."""

    mark = ""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        send_sse(self, chat_sse(tool_call_chunk(0, "call_1", "exec_command",
                                                json.dumps({"cmd": f"touch {type(self).mark}"})),
                                {"error": {"message": "boom", "type": "server_error", "code": 500}}, done=False))


def test_a_call_in_a_response_that_failed_is_not_run(codex_bin, tmp_path, gateway_factory):
    """The translator closes what a failed response left open (Open Responses' item states)
    but for a tool call: Codex runs a call as soon as its ``output_item.done`` comes, whatever
    its status, before it reads the ``response.failed`` that follows. A call whose response
    failed must not run (it may be cut anywhere; Codex retries the turn and the model calls
    again): closed ``incomplete``, this command ran."""
    CallThenFail.mark = str(tmp_path / "ran")
    with LocalServer(CallThenFail) as backend:
        codex = Codex.at(codex_bin, tmp_path)
        codex.configure(gateway_factory(backend.url).base_url)
        run = codex.exec("go", timeout=90)
    assert run.returncode != 0 and "upstream" in run.output, run.output
    assert not (tmp_path / "ran").exists(), "the call of a failed response was run"


# --- a backend's wait reaches Codex inside the stream --------------------------------------------


class BusyOnce(QuietHandler):
    """A backend whose first answer is a 503 with ``Retry-After: 3`` (after a short prefill, the
    client's SSE head already sent), then answers; the time of each request in ``at``."""

    at: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        type(self).at.append(time.monotonic())
        if len(type(self).at) == 1:
            time.sleep(0.3)
            send_json(self, 503, {"error": {"message": "loading the model", "type": "server_error"}},
                      headers={"retry-after": "3"})
            return
        send_sse(self, chat_sse(chat_chunk({"content": "served after the wait"}), chat_chunk(finish="stop")))


def test_codex_waits_as_a_backends_503_retry_after_says(codex_bin, tmp_path, gateway_factory):
    """A streaming turn has its 200 before the backend answers: a backend's 503 with
    ``Retry-After: 3`` reaches Codex inside ``response.failed`` (``error.headers``, which Codex
    0.169 reads for any code), and Codex waits that long before its retry, which is served.
    Before, the wait reached it nowhere: it retried after its own backoff (~0.2 s)."""
    BusyOnce.at = []
    with LocalServer(BusyOnce) as backend:
        codex = Codex.at(codex_bin, tmp_path)
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        codex.configure(gw.base_url)
        set_retries(codex, stream=1)
        run = codex.exec("hello", timeout=90)
    assert run.returncode == 0 and "served after the wait" in run.stdout, diag(run, gw)
    assert len(BusyOnce.at) == 2, BusyOnce.at
    waited = BusyOnce.at[1] - BusyOnce.at[0] - 0.3  # (the 503 came 0.3 s after the first request)
    assert 2.7 <= waited <= 6, f"Codex retried {waited:.2f} s after the 503's Retry-After: 3" + diag(run, gw)
