"""The real Codex CLI (the Makefile's CODEX_VER) on its built-in provider (``openai_base_url``),
and on a custom provider with ``supports_websockets = true``, through a real mitmdump: the
Responses WebSocket transport, remote compaction, and the refusal when the transport is off."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests

from resp2chat_core.compaction import COMPACTION_PROMPT, SUMMARY_PREFIX

from helpers import (
    Codex, LocalServer, QuietHandler, chat_chunk, chat_sse, logged_bodies, openai_client, read_flows, resp2chat_cli,
    send_json, send_sse,
)
from wsclient import WSClient

pytestmark = pytest.mark.codex

FALLBACK = ("Falling back from WebSockets", "failed to connect to Responses WebSocket", "Reconnecting")


@pytest.fixture
def cx(codex_bin, tmp_path) -> Codex:
    return Codex.at(codex_bin, tmp_path)


def ok(run) -> str:
    assert run.returncode == 0, run.output
    return run.output


def test_builtin_provider_speaks_websocket_multi_turn_with_tools_and_resume(upstream, gateway_factory, cx, tmp_path):
    path, access = tmp_path / "session.mitm", tmp_path / "access.jsonl"
    gw = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0",
                         "--set", f"resp2chat_access_log_path={access}")
    cx.configure_builtin(gw.base_url)
    upstream.clear()
    first = ok(cx.exec("run: echo hello-over-the-socket"))
    assert "The tool returned: hello-over-the-socket" in first
    again = ok(cx.exec("resume", "--last", "and once more"))
    assert "You said: and once more" in again
    for output in (first, again):
        assert not [m for m in FALLBACK if m in output], output
    gw.stop()
    recorded = read_flows(path)
    sockets = [f for f in recorded if f.websocket is not None]
    assert len(sockets) == 2 and not [f for f in recorded if f.request.method == "POST"]  # no HTTP turn at all
    turns = [t for f in sockets for t in f.metadata["resp2chat"]["turns"]]
    real = [t for t in turns if not t["warmup"]]
    assert [t["status"] for t in real] == ["completed"] * 3 and any(t["warmup"] for t in turns)
    # after its first message, Codex sends only what is new: the connection supplies the rest
    continued = [json.loads(t["responses_request"]) for t in real]
    assert all(c.get("previous_response_id") for c in continued)
    assert [json.loads(t["chat_request"]) for t in real] == upstream.requests()
    assert upstream.requests()[1]["messages"][-1]["role"] == "tool"  # the tool output came back over the socket
    assert "You said: and once more" in sockets[1].websocket.messages[-1].content.decode()
    # each socket turn is in the access log as an HTTP turn is: its own request id, the upstream,
    # TTFT and duration, Codex's session (warm-ups are not turns)
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert [(x["status"], x["upstream"], x["http_status"]) for x in lines] == [("completed", "default", 200)] * 3
    assert [x["request_id"] for x in lines] == [t["request_id"] for t in real] and len({t["request_id"] for t in real}) == 3
    assert all(0 < x["ttft_ms"] <= x["total_ms"] and x["output_tokens"] > 0 for x in lines)
    assert len({x["session"] for x in lines}) == 1 and lines[0]["session"]
    # resp2chat analyze reads a socket's turns like HTTP turns: one session whose prompt only grows
    analyzed = resp2chat_cli("analyze", "--json", str(path))
    assert analyzed.returncode == 0, analyzed.stderr
    report = json.loads(analyzed.stdout)
    assert report["summary"]["requests"] == 3 and report["summary"]["sessions"] == 1
    assert report["summary"]["session_prefix_hit_ratio_later_turns"] >= 0.97


def test_builtin_provider_with_the_gateway_key_in_codex_api_key(upstream, gateway_factory, cx, tmp_path):
    path = tmp_path / "session.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_gateway_api_key=gw-key-7c1e9a")
    cx.configure_builtin(gw.base_url)
    refused = cx.exec("who am i")  # no key: the upgrade and the HTTP fallback both get 401
    assert refused.returncode != 0 and "401" in refused.output
    cx.env["CODEX_API_KEY"] = "gw-key-7c1e9a"
    assert "You said: with the key" in ok(cx.exec("with the key"))
    gw.stop()
    assert [f.response.status_code for f in read_flows(path) if f.websocket is not None] == [101]
    assert b"gw-key-7c1e9a" not in path.read_bytes()


def test_custom_provider_with_supports_websockets(upstream, gateway_factory, cx, tmp_path):
    path = tmp_path / "session.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0")
    cx.configure(gw.base_url)
    with (cx.home / "config.toml").open("a") as fh:
        fh.write("supports_websockets = true\n")
    output = ok(cx.exec("run: echo custom-socket"))
    again = ok(cx.exec("resume", "--last", "custom again"))
    assert "The tool returned: custom-socket" in output and "You said: custom again" in again
    assert not [m for m in FALLBACK if m in output + again]
    gw.stop()
    sockets = [f for f in read_flows(path) if f.websocket is not None]
    assert [[t["status"] for t in f.metadata["resp2chat"]["turns"] if not t["warmup"]] for f in sockets] == \
        [["completed"] * 2, ["completed"]]
    assert not [f for f in read_flows(path) if f.request.method == "POST"]


def normalized_bodies(log: Path) -> list[str]:
    """A Codex session's chat requests with what differs between two runs of it blanked: the
    wall time and chunk id of tool output, and the demo backend's random tool-call ids."""
    out = []
    for body in (raw.decode() for raw in logged_bodies(log)):
        body = re.sub(r"Wall time: [0-9.]+ seconds", "Wall time: _", body)
        body = re.sub(r"Chunk ID: [0-9a-f]+", "Chunk ID: _", body)
        out.append(re.sub(r"chatcmpl-tool-[0-9a-f]+", "call", body))
    return out


def test_a_codex_session_lowers_to_the_same_bytes_over_websocket_and_http(upstream, gateway_factory, cx, tmp_path):
    logs = {}
    for transport in ("websocket", "http"):
        log = tmp_path / f"{transport}.jsonl"
        gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                             "--set", f"resp2chat_upstream_request_log_path={log}",
                             "--set", f"resp2chat_responses_websocket={'true' if transport == 'websocket' else 'false'}")
        cx.configure_builtin(gw.base_url)  # the same CODEX_HOME and cwd: Codex's prompt names both
        ok(cx.exec("run: echo same-bytes"))
        ok(cx.exec("resume", "--last", "and then?"))
        gw.stop()
        logs[transport] = normalized_bodies(log)
    assert len(logs["websocket"]) == 3
    assert logs["websocket"] == logs["http"]


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_remote_compaction_over_several_resumes(transport, upstream, gateway_factory, cx):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         "--set", f"resp2chat_responses_websocket={'true' if transport == 'websocket' else 'false'}")
    cx.configure_builtin(gw.base_url, extra="model_auto_compact_token_limit = 50\n")
    upstream.clear()
    runs = [cx.exec("run: echo first"), cx.exec("resume", "--last", "second question"),
            cx.exec("resume", "--last", "third question")]
    for run in runs:
        output = ok(run)
        assert "context compacted" in output and "Error running remote compact task" not in output, output
    assert "You said: third question" in runs[-1].output
    sent = upstream.requests()
    summaries = [i for i, body in enumerate(sent) if body["messages"][-1]["content"] == COMPACTION_PROMPT]
    assert len(summaries) >= 3  # each run compacted (the limit is tiny): the summary request reached the backend
    for i in summaries:
        assert sent[i]["tool_choice"] == "none" and sent[i]["tools"]  # same tools (prefix), no calls
        later = sent[i + 1]["messages"]  # the next request carries the summary the backend wrote
        assert {"role": "user", "content": SUMMARY_PREFIX + "You said: Write the summary now."} in later
    assert sent[-1]["messages"][-1] == {"role": "user", "content": "third question"}


def test_websocket_off_codex_falls_back_at_once(upstream, gateway_factory, cx, tmp_path):
    path = tmp_path / "session.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_responses_websocket=false")
    cx.configure_builtin(gw.base_url)
    output = ok(cx.exec("say hi"))
    assert "You said: say hi" in output and "Reconnecting" not in output and "Falling back" not in output
    gw.stop()
    upgrades = [f for f in read_flows(path) if f.request.method == "GET" and f.request.path == "/v1/responses"]
    assert [f.response.status_code for f in upgrades] == [426]  # one refusal, no retry, nothing forwarded
    assert json.loads(upgrades[0].response.content)["error"]["code"] == "websocket_disabled"


@pytest.mark.parametrize("full", ["client", "gateway"])
def test_codex_refused_a_socket_past_the_caps_falls_back_to_http(full, upstream, gateway_factory, cx, tmp_path):
    """A client at its max_sockets (429) or a gateway at max_websockets (503) refuses the
    upgrade; Codex falls back to HTTP and the turn is served. (Before, the socket was taken.)"""
    path, key = tmp_path / "session.mitm", "carol-key-0123456789abcdef"
    if full == "client":
        gw = gateway_factory(upstream.origin, "-w", str(path), env={
            "RESP2CHAT_CLIENTS": json.dumps([{"name": "carol", "key": key, "max_sockets": 1}])})
        cx.env["CODEX_API_KEY"] = key
    else:
        gw = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_websockets=1")
    held = WSClient(gw.base_url, headers={"authorization": f"Bearer {key}"})  # (the one socket there is room for)
    cx.configure_builtin(gw.base_url)
    output = ok(cx.exec("say hi"))
    held.close()
    assert "You said: say hi" in output and "Falling back from WebSockets" in output, output
    gw.stop()
    flows = read_flows(path)
    upgrades = [f for f in flows if f.request.method == "GET" and f.request.path == "/v1/responses"]
    status, code = (429, "rate_limit_exceeded") if full == "client" else (503, "server_overloaded")
    refused = [f for f in upgrades if f.websocket is None]
    assert refused and {f.response.status_code for f in refused} == {status}
    assert {json.loads(f.response.content)["error"]["code"] for f in refused} == {code}
    assert len(upgrades) == len(refused) + 1  # (the one held) nothing else opened
    assert [f.response.status_code for f in flows if f.request.method == "POST"] == [200]  # the turn, over HTTP


def test_codex_waits_as_a_sockets_rate_limit_error_says_then_its_turn_is_served(upstream, gateway_factory, cx,
                                                                                 tmp_path):
    """A client at its rpm on the socket gets an ``error`` message, 429 ``rate_limit_exceeded``,
    whose ``headers`` say ``retry-after``: Codex 0.169 reads a socket's error as the HTTP error of
    that status with those headers, waits that long and tries again, and the turn is served. Before,
    the error carried no wait: Codex stopped at once ("exceeded retry limit, last status: 429 Too
    Many Requests"). rpm 4, a request every 15 s (rpm 1 made it a minute's wait), three of them
    taken over HTTP just before: Codex's warm-up takes the last one, its turn is refused for what is
    left of the 15 s, and refused once alone (a try before the wait told would be refused again)."""
    rpm, path, key = 4, tmp_path / "session.mitm", "carol-key-0123456789abcdef"
    gw = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0", env={
        "RESP2CHAT_CLIENTS": json.dumps([{"name": "carol", "key": key, "rpm": rpm}])})
    cx.env["CODEX_API_KEY"] = key
    cx.configure_builtin(gw.base_url)
    http = openai_client(gw, api_key=key)
    for n in range(rpm - 1):
        http.responses.create(model="demo-model", input=f"take {n}", store=False)
    started = time.monotonic()
    output = ok(cx.exec("say hi", timeout=150))
    took = time.monotonic() - started
    assert "You said: say hi" in output, output
    gw.stop()
    turns = [t for f in read_flows(path) if f.websocket for t in f.metadata["resp2chat"]["turns"]]
    # (two completed alone: Codex took over 15 s to reach its turn, and the bucket had refilled)
    assert [t["status"] for t in turns] == ["completed", "rejected", "completed"], turns  # warm-up, refused, served
    assert turns[1]["error"]["code"] == "rate_limit_exceeded"
    told = int(re.search(r"Please try again in (\d+)s\.$", turns[1]["error"]["message"])[1])
    assert 1 <= told <= 60 / rpm and told - 1 <= took <= told + 45, (told, took, output)


def test_a_websocket_session_replays_offline_to_a_rerun_over_either_transport(upstream, gateway_factory, cx, tmp_path):
    """Recorded over the socket, rerun with --server-replay alone and no backend: the tool runs
    again (so its output's wall time differs) and every turn is still answered."""
    path = tmp_path / "session.mitm"
    live = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0")
    cx.configure_builtin(live.base_url)
    assert "The tool returned: replay-me" in ok(cx.exec("run: echo replay-me"))
    assert requests.get(live.base_url + "/models", timeout=10).ok  # a flow that is no turn (mitmproxy replays it)
    live.stop()
    # (server_replay_extra=kill: nothing unrecorded goes anywhere, and the socket still opens)
    for transport, extra in (("websocket", "forward"), ("websocket", "kill"), ("http", "forward")):
        replayed = tmp_path / f"replayed-{transport}-{extra}.mitm"
        offline = gateway_factory("http://127.0.0.1:9", "--server-replay", str(path), "-w", str(replayed),
                                  "--set", f"server_replay_extra={extra}",
                                  "--set", f"resp2chat_responses_websocket={'true' if transport == 'websocket' else 'false'}")
        cx.configure_builtin(offline.base_url)
        output = ok(cx.exec("run: echo replay-me"))
        assert "The tool returned: replay-me" in output and "stream disconnected" not in output, output
        if transport == "websocket":
            assert not [m for m in FALLBACK if m in output], output
        offline.stop()
        again = read_flows(replayed)
        if transport == "websocket":
            [sock] = [f for f in again if f.websocket is not None]
            answered = [t for t in sock.metadata["resp2chat"]["turns"] if not t["warmup"]]
            assert [t.get("server_replay") for t in answered] == [True, True]
            [recorded] = [f for f in read_flows(path) if f.websocket is not None]
            recorded_turns = [t for t in recorded.metadata["resp2chat"]["turns"] if not t["warmup"]]
            assert answered[1]["chat_request"] != recorded_turns[1]["chat_request"]  # the wall time differed
            assert [t["events"] for t in answered] == [t["events"] for t in recorded_turns]
        else:  # the socket's recording answers HTTP turns as well: the match is on the chat request
            posts = [f for f in again if f.request.method == "POST"]
            assert len(posts) == 2 and all(f.metadata["resp2chat"].get("server_replay") for f in posts)


class _SummariesFailMidway(QuietHandler):
    """The first of two upstreams: it answers Codex's turns (by the demo backend's words, which it
    asks), and fails every summary in its stream, after some text (its error object). ``summaries``:
    the summary requests it got."""

    origin = ""
    summaries = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if json.loads(body)["messages"][-1]["content"] == COMPACTION_PROMPT:
            type(self).summaries += 1
            send_sse(self, chat_sse(chat_chunk({"role": "assistant", "content": "Goal: half a summary"}),
                                    {"error": {"message": "overloaded", "type": "server_error"}}, done=False))
            return
        answer = requests.post(self.origin + "/chat/completions", data=body, timeout=60,
                               headers={"content-type": "application/json"})
        send_sse(self, answer.content)


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_remote_compaction_a_backend_fails_midway_is_written_by_the_next_upstream(transport, upstream,
                                                                                   gateway_factory, cx):
    """The real Codex's remote compaction, over either transport, with two upstreams: the first fails
    each summary in its stream; the next writes it and Codex goes on from it. Before, Codex printed
    "Error running remote compact task" and the turn failed."""
    first = type("First", (_SummariesFailMidway,), {"origin": upstream.base_url, "summaries": 0})
    with LocalServer(first) as backend:
        entries = [{"name": "first", "base_url": backend.url + "/v1"},
                   {"name": "second", "base_url": upstream.base_url}]
        socket = "true" if transport == "websocket" else "false"
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_upstreams=" + json.dumps(entries),
                             "--set", f"resp2chat_responses_websocket={socket}")
        cx.configure_builtin(gw.base_url, extra="model_auto_compact_token_limit = 50\n")
        upstream.clear()
        runs = [cx.exec("run: echo first"), cx.exec("resume", "--last", "second question")]
        for run in runs:
            output = ok(run)
            assert "context compacted" in output and "Error running remote compact task" not in output, output
        assert "You said: second question" in runs[-1].output
        assert first.summaries >= 1
        sent = upstream.requests()
        summaries = [i for i, body in enumerate(sent) if body["messages"][-1]["content"] == COMPACTION_PROMPT]
        assert len(summaries) == first.summaries  # (each written by the second)
        assert {"role": "user", "content": SUMMARY_PREFIX + "You said: Write the summary now."} in sent[-1]["messages"]


class _TooLongToSummarize(_SummariesFailMidway):
    """Like ``_SummariesFailMidway``, but it finds every summary request too long for its context
    (a 400 ``context_length_exceeded``, as vLLM words it)."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        if json.loads(body)["messages"][-1]["content"] == COMPACTION_PROMPT:
            type(self).summaries += 1
            send_json(self, 400, {"error": {"message": "This model's maximum context length is 4096 tokens. However, "
                                            "your messages resulted in 9000 tokens.", "type": "BadRequestError",
                                            "code": 400}})
            return
        answer = requests.post(self.origin + "/chat/completions", data=body, timeout=60,
                               headers={"content-type": "application/json"})
        send_sse(self, answer.content)


def test_remote_compaction_too_long_for_every_upstream_stops_codex_with_the_context_window_error(
        upstream, gateway_factory, cx):
    """Both upstreams find the conversation too long to summarize: each is asked (the next may hold
    more), then Codex gets ``context_length_exceeded`` and says so, without retrying the compaction (a
    ``server_error`` it retries). Before, the first's 400 was the client's: the second was never asked."""
    first = type("First", (_TooLongToSummarize,), {"origin": upstream.base_url, "summaries": 0})
    second = type("Second", (_TooLongToSummarize,), {"origin": upstream.base_url, "summaries": 0})
    with LocalServer(first) as a, LocalServer(second) as b:
        entries = [{"name": "first", "base_url": a.url + "/v1"}, {"name": "second", "base_url": b.url + "/v1"}]
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_upstreams=" + json.dumps(entries))
        cx.configure_builtin(gw.base_url, extra="model_auto_compact_token_limit = 50\n")
        run = cx.exec("run: echo first")  # (it compacts after the tool call, in the turn)
    assert run.returncode != 0 and "ran out of room in the model's context window" in run.output, run.output
    assert first.summaries == second.summaries == 1  # (each asked once; Codex retried nothing)
