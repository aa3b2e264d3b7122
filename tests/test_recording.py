"""Recording (-w), offline replay (--server-replay), the replay cache and `resp2chat analyze`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests
from mitmproxy import http, io
from mitmproxy.test import taddons

from helpers import (ADDON, MITMDUMP, ROOT, MiB, Codex, cli_env, free_port, memory, openai_client, parse_sse, run_cli,
                     read_flows, resp2chat_cli, wait_until)
from recordings import SEAL_KEY
from wsclient import WSClient

RECORDINGS = sorted((ROOT / "recordings").glob("*.mitm"))
DEAD_UPSTREAM = "http://127.0.0.1:9"  # discard port: nothing listens
SECRET_UPSTREAM_KEY = "sk-planted-upstream-7f3a9c"
SECRET_CLIENT_KEY = "sk-planted-client-1b2c3d"


def turns(path: Path) -> list[http.HTTPFlow]:
    return [f for f in read_flows(path) if "resp2chat" in f.metadata]


def strip_ids(raw: bytes) -> str:
    text = raw.decode()
    text = re.sub(r"resp_[0-9a-f]{32}", "resp_X", text)
    text = re.sub(r"(msg|rs|fc|ctc|lsh|ts)_[0-9a-f]{32}_", r"\1_X_", text)
    text = re.sub(r"call_[0-9a-f]{16}_", "call_X_", text)
    return re.sub(r'"(created|completed)_at":\d+', r'"\1_at":0', text)


# --- recording -----------------------------------------------------------------------------


def test_flow_file_holds_both_sides_and_no_secrets(upstream, gateway_factory, tmp_path):
    path = tmp_path / "session.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(path), "--set", f"resp2chat_upstream_api_key={SECRET_UPSTREAM_KEY}")
    client = openai_client(gw, api_key=SECRET_CLIENT_KEY)
    events = list(client.responses.create(model="demo-model", input="record me", stream=True))
    client.responses.create(model="demo-model", input="run: ls", tools=[
        {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}}])
    gw.stop()

    raw = path.read_bytes()
    assert SECRET_UPSTREAM_KEY.encode() not in raw and SECRET_CLIENT_KEY.encode() not in raw
    assert SECRET_UPSTREAM_KEY not in gw.log() and SECRET_CLIENT_KEY not in gw.log()

    streamed, whole = turns(path)
    meta = streamed.metadata["resp2chat"]
    assert json.loads(meta["responses_request"])["input"] == "record me"  # what the client sent
    assert json.loads(streamed.request.content)["messages"][-1]["content"] == "record me"  # what upstream got
    assert "chat.completion.chunk" in meta["upstream_sse"]  # what upstream answered
    recorded = parse_sse(streamed.response.content)  # what the client received
    assert [e["type"] for e in recorded] == [e.type for e in events]
    assert recorded[-1]["response"]["id"] == events[-1].response.id == meta["response_id"]
    assert meta["status"] == "completed" and meta["usage"]["input_tokens"] > 0
    assert re.fullmatch(r"POST /v1/responses → demo-model · completed · in \d+ \(cached \d+\) out \d+ · \d+ ms",
                        streamed.comment)
    assert "1 tool call" in whole.comment
    assert json.loads(whole.response.content)["output"][-1]["type"] == "function_call"
    for flow in (streamed, whole):  # the flow shows the real backend, not the in-process relay
        assert flow.request.url == upstream.base_url + "/chat/completions"
        assert not [h for h in flow.request.headers if h.lower().startswith("x-resp2chat")]


# --- offline replay of the committed recordings ---------------------------------------------


def test_recordings_exist():
    names = {p.stem for p in RECORDINGS}
    assert {"plain-answer", "tool-call-loop", "resumed-session", "image-input"} <= names


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.stem)
def test_recording_replays_offline_with_identical_events(recording, gateway_factory):
    # (compaction items in a recording open with the key it was recorded with: tests/recordings.py)
    gw = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(recording), "--set", f"resp2chat_seal_key={SEAL_KEY}")
    recorded = turns(recording)
    assert recorded
    for flow in recorded:
        if flow.websocket is not None:  # a Responses WebSocket: the same messages get the same messages
            client = WSClient(gw.base_url)
            sent = [m for m in flow.websocket.messages if m.from_client]
            expected = [json.loads(m.content) for m in flow.websocket.messages if not m.from_client]
            got = [event for m in sent for event in client.turn(m.content.decode())]
            client.close()
            assert got == expected and got[-1]["type"] == "response.completed"
            continue
        body = json.loads(flow.metadata["resp2chat"]["responses_request"])
        r = requests.post(gw.base_url + "/responses", json=body, timeout=30)
        assert r.status_code == 200
        assert r.content == flow.response.content  # byte for byte what Codex saw when recorded
        assert parse_sse(r.content)[-1]["type"] == "response.completed"


def test_a_replayed_turn_is_counted_and_stored(upstream, gateway_factory, tmp_path):
    """A turn answered by offline replay is reported like any turn (metrics, access log: replayed,
    upstream server-replay) and stored under the id it answered with; one nothing was recorded
    for is reported too."""
    recording, log_path = tmp_path / "stored.mitm", tmp_path / "access.jsonl"
    body = {"model": "demo-model", "input": "keep me", "stream": True}  # (store: the default)
    live = gateway_factory(upstream.origin, "-w", str(recording), "--set", "resp2chat_max_replay_entries=0")
    recorded = parse_sse(requests.post(live.base_url + "/responses", json=body, timeout=30).content)[-1]
    live.stop()
    gw = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(recording), "--set", f"resp2chat_access_log_path={log_path}")
    r = requests.post(gw.base_url + "/responses", json=body, timeout=30)
    final = parse_sse(r.content)[-1]["response"]
    assert r.status_code == 200 and final == recorded["response"]
    assert requests.get(f"{gw.base_url}/responses/{final['id']}", timeout=30).json()["id"] == final["id"]
    gw.stop()
    # nothing recorded for it: server_replay_extra answers (addons/server_replay.py, not_recorded)
    gw = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(recording), "--set", "server_replay_extra=404",
                         "--set", "server_replay_reuse=true", "--set", f"resp2chat_access_log_path={log_path}")
    missing = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "never recorded"},
                            timeout=30)
    assert missing.status_code == 404
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(x["upstream"], x["status"], x["code"], x["http_status"]) for x in lines] == [
        ("server-replay", "replayed", "", 200), ("server-replay", "failed", "not_recorded", 404)]
    assert lines[0]["output_tokens"] == final["usage"]["output_tokens"]


@pytest.mark.parametrize("where", ["memory", "directory", "redis"])
def test_a_replayed_answer_two_clients_rerun_is_kept_for_each(upstream, gateway_factory, tmp_path, where, request):
    """A replayed answer keeps its recorded response id, so two clients rerunning the same
    recorded turn are answered with the same id. Each stores it as its own owner, on every
    store alike (entries keyed by (owner, id), as in Redis, where each owner's keys are apart):
    bob's rerun neither replaces alice's stored response (before that was fixed, alice's id was a
    404 to her) nor is refused for him (before, the memory and directory stores kept only the first
    owner's: bob's GET was a 404, his continuation ``previous_response_not_found``); bob's DELETE
    removes his alone, and a directory store restarted keeps both apart."""
    recording = tmp_path / "one.mitm"
    body = {"model": "demo-model", "input": "keep me", "stream": True}
    live = gateway_factory(upstream.origin, "-w", str(recording), "--set", "resp2chat_max_replay_entries=0")
    assert requests.post(live.base_url + "/responses", json=body, timeout=30).status_code == 200
    live.stop()
    env = cli_env(tmp_path)
    keys = {name: run_cli(tmp_path, "keys", "add", name).stdout.strip() for name in ("alice", "bob")}
    store = () if where == "memory" else ("--set", f"resp2chat_session_store_dir={tmp_path / 'store'}") \
        if where == "directory" else ("--set", f"resp2chat_state_store_url={request.getfixturevalue('redis_server').url}")
    args = (DEAD_UPSTREAM, "--server-replay", str(recording), "--set", "server_replay_reuse=true", *store)
    gw = gateway_factory(*args, env=env)
    auth = {name: {"authorization": f"Bearer {key}"} for name, key in keys.items()}

    def get(who: str, rid: str) -> requests.Response:
        return requests.get(f"{gw.base_url}/responses/{rid}", headers=auth[who], timeout=30)

    def stored(who: str, rid: str) -> bool:  # (Redis: a response is written a moment after its turn)
        return get(who, rid).status_code == 200

    first = parse_sse(requests.post(gw.base_url + "/responses", json=body, headers=auth["alice"], timeout=30).content)
    rid = first[-1]["response"]["id"]
    wait_until(lambda: stored("alice", rid), 10, "alice's stored")
    assert get("bob", rid).status_code == 404  # (another owner's: unknown)
    again = parse_sse(requests.post(gw.base_url + "/responses", json=body, headers=auth["bob"], timeout=30).content)
    assert again[-1]["response"]["id"] == rid  # (the recorded id, for him too)
    wait_until(lambda: stored("bob", rid), 10, "bob's stored")
    assert get("alice", rid).status_code == 200
    for who in ("alice", "bob"):
        go_on = requests.post(gw.base_url + "/responses", headers=auth[who], timeout=30,
                              json={"model": "demo-model", "input": "and?", "previous_response_id": rid})
        assert go_on.status_code != 400, (who, go_on.text)  # (nothing recorded for it: server_replay_extra's answer)
    if where == "directory":  # a restart reads both back, each its owner's
        gw.stop()
        gw = gateway_factory(*args, env=env)
        assert stored("alice", rid) and stored("bob", rid)
    gone = requests.delete(f"{gw.base_url}/responses/{rid}", headers=auth["bob"], timeout=30)
    assert gone.status_code == 200 and get("bob", rid).status_code == 404
    assert get("alice", rid).status_code == 200  # (his DELETE removed his alone)
    if where == "directory":
        gw.stop()
        gw = gateway_factory(*args, env=env)
        assert stored("alice", rid) and get("bob", rid).status_code == 404


def test_a_replayed_turn_recorded_unfinished_is_counted_replayed(upstream, gateway_factory, tmp_path):
    """A turn recorded unfinished (its client hung up mid-stream, so the recording has no final
    Response) is still answered from the recording, and reported as replayed: something was
    recorded for it, it is not ``not_recorded``."""
    recording, log_path = tmp_path / "unfinished.mitm", tmp_path / "access.jsonl"
    body = {"model": "demo-model", "input": "slow: 150 leave early", "stream": True}
    live = gateway_factory(upstream.origin, "-w", str(recording), "--set", "resp2chat_max_replay_entries=0")
    with requests.post(live.base_url + "/responses", json=body, stream=True, timeout=30) as r:
        seen = b""
        for piece in r.iter_content(None):
            seen += piece
            if b"response.output_text.delta" in seen:
                break  # hang up mid-stream
    wait_until(lambda: "unfinished" in [f.metadata["resp2chat"].get("status") for f in turns(recording)]
               if recording.exists() and recording.stat().st_size else False, timeout=30)
    live.stop()
    [flow] = turns(recording)
    assert "response.completed" not in flow.response.content.decode()
    gw = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(recording), "--set", f"resp2chat_access_log_path={log_path}")
    r = requests.post(gw.base_url + "/responses", json=body, timeout=30)
    assert r.status_code == 200 and r.content == flow.response.content
    gw.stop()
    [line] = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert (line["upstream"], line["status"], line["code"]) == ("server-replay", "replayed", "")


@pytest.mark.parametrize("held", ["turns only", "turns and /healthz"])
@pytest.mark.parametrize("extra", ["404", "kill"])
def test_server_replay_extra_answers_an_unrecorded_turn(upstream, gateway_factory, tmp_path, held, extra):
    """An unrecorded HTTP turn gets server_replay_extra (a status: a not_recorded error, as on a
    WebSocket; kill: killed), whether or not the recording holds flows besides turns (mitmproxy
    applies the extra only while it holds flows: a recording of turns alone, e.g. one made with
    `resp2chat start -- -w`, holds none once the addon took the turns). Never the backend."""
    recording = tmp_path / "live.mitm"
    body = {"model": "demo-model", "input": "recorded", "stream": True}
    live = gateway_factory(upstream.origin, "-w", str(recording), "--set", "resp2chat_max_replay_entries=0")
    recorded = parse_sse(requests.post(live.base_url + "/responses", json=body, timeout=30).content)[-1]["response"]
    live.stop()
    flows = read_flows(recording)
    assert any(f.request.path == "/healthz" for f in flows)  # (start_gateway's probes)
    if held == "turns only":
        flows = [f for f in flows if f.metadata.get("resp2chat", {}).get("responses_request")]
        with recording.open("wb") as fh:
            writer = io.FlowWriter(fh)
            for f in flows:
                writer.add(f)
    assert len(flows) > 1 if held != "turns only" else len(flows) == 1
    gw = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(recording), "--set", f"server_replay_extra={extra}",
                         "--set", "server_replay_reuse=true")
    for stream in (False, True):
        unrecorded = {"model": "demo-model", "input": "unrecorded", "stream": stream}
        if extra == "kill":
            with pytest.raises(requests.ConnectionError):
                requests.post(gw.base_url + "/responses", json=unrecorded, timeout=30)
            continue
        r = requests.post(gw.base_url + "/responses", json=unrecorded, timeout=30)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_recorded" and r.headers["x-request-id"].startswith("req_"), r.text
    # the recorded turn is still answered from the recording
    again = parse_sse(requests.post(gw.base_url + "/responses", json=body, timeout=30).content)[-1]["response"]
    assert again == recorded
    gw.stop()
    assert "Traceback" not in gw.log() and "no recorded answer for req_" in gw.log(), gw.log()


def test_a_turn_replayed_again_and_again_holds_no_more_memory(upstream, gateway_factory, tmp_path):
    """With ``server_replay_reuse`` a recorded turn answers every rerun of it, and the copy handed
    to mitmproxy's replay for each rerun leaves its list again: the gateway's memory stays where
    it was (each copy, ~0.5 MB here, was kept for good: +60 MB in 120 reruns)."""
    recording = tmp_path / "one.mitm"
    body = {"model": "demo-model", "input": "recorded " + "x" * 400_000, "stream": True}
    live = gateway_factory(upstream.origin, "-w", str(recording), "--set", "resp2chat_max_replay_entries=0")
    assert requests.post(live.base_url + "/responses", json=body, timeout=30).status_code == 200
    live.stop()
    gw = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(recording), "--set", "server_replay_reuse=true")

    def rerun(n: int) -> None:
        for _ in range(n):
            r = requests.post(gw.base_url + "/responses", json=body, timeout=30)
            assert r.status_code == 200 and b"response.completed" in r.content

    rerun(20)
    before = memory(gw.proc.pid)["VmRSS"]
    rerun(120)
    assert memory(gw.proc.pid)["VmRSS"] - before < 20 * MiB


@pytest.mark.codex
def test_codex_session_recorded_then_replayed_without_upstream(upstream, gateway_factory, codex_bin, tmp_path):
    # Codex's prompt names its cwd and CODEX_HOME (skill paths): both runs share them.
    path = tmp_path / "live.mitm"
    live = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0")
    first = Codex.at(codex_bin, tmp_path)
    first.configure(live.base_url)
    run1 = first.exec("run: echo replay-me")
    live.stop()
    assert run1.returncode == 0 and "The tool returned: replay-me" in run1.stdout

    # Tool output carries a wall time and a chunk id, so the follow-up request differs byte-wise
    # from the recording: --server-replay alone still answers it (resp2chat_core/replay.py rerun_key).
    replayed = tmp_path / "replayed.mitm"
    offline = gateway_factory(DEAD_UPSTREAM, "--server-replay", str(path), "-w", str(replayed))
    second = Codex.at(codex_bin, tmp_path)
    second.configure(offline.base_url)
    run2 = second.exec("run: echo replay-me")
    assert run2.returncode == 0, run2.output
    assert "The tool returned: replay-me" in run2.stdout
    assert "replay-me" in run2.output  # Codex really ran the replayed tool call again
    offline.stop()
    live, again = turns(path), turns(replayed)
    assert [f.metadata["resp2chat"].get("server_replay") for f in again] == [f.id for f in live]
    assert live[1].request.content != again[1].request.content  # the tool output's wall time differed
    assert [f.response.content for f in again] == [f.response.content for f in live]


def test_client_replay_against_another_backend(upstream, tmp_path):
    """`mitmdump -C` sends a recording's chat requests to a different upstream: run as README
    says (no confdir given: mitmproxy's own in a HOME of its own, made afresh)."""
    recording = ROOT / "recordings" / "tool-call-loop.mitm"
    from resp2chat_io.demo_upstream import serve_in_thread

    other, other_url = serve_in_thread(dialect="ollama")
    try:
        proc = subprocess.run(
            [str(MITMDUMP), "-n", "-s", str(ADDON), "-C", str(recording),
             "--set", f"resp2chat_upstream_base_url={other_url}",
             "--set", "client_replay_concurrency=1", "--listen-port", str(free_port())],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=cli_env(tmp_path))
        got = requests.get(other_url.removesuffix("/v1") + "/_requests", timeout=5).json()
    finally:
        other.shutdown()
    sent = [json.loads(f.request.content) for f in turns(recording)]
    assert proc.returncode == 0 and "Error" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert got == sent, proc.stdout + proc.stderr


# --- replay cache ----------------------------------------------------------------------------


def test_replay_cache_answers_identical_requests_without_upstream(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=2")
    body = {"model": "demo-model", "input": "cache me please", "stream": True}
    upstream.clear()
    first = requests.post(gw.base_url + "/responses", json=body, timeout=30).content
    second = requests.post(gw.base_url + "/responses", json=body, timeout=30).content
    assert len(upstream.requests()) == 1
    assert strip_ids(first) == strip_ids(second)
    assert parse_sse(first)[-1]["response"]["id"] != parse_sse(second)[-1]["response"]["id"]
    fresh = parse_sse(second)[-1]["response"]
    assert fresh["completed_at"] == fresh["created_at"]  # (answered as it was created)
    # the same request without streaming is another request (another answer shape): a miss, then a hit
    whole = requests.post(gw.base_url + "/responses", json={**body, "stream": False}, timeout=30).json()
    again = requests.post(gw.base_url + "/responses", json={**body, "stream": False}, timeout=30).json()
    assert whole["output"][-1]["content"][0]["text"] == "You said: cache me please"
    assert again["output"] == [{**o, "id": o["id"].replace(whole["id"][5:], again["id"][5:])} for o in whole["output"]]
    assert again["id"] != whole["id"] and len(upstream.requests()) == 2
    # FIFO with capacity 2: two more distinct prompts evict the first
    for prompt in ("other one", "another one"):
        requests.post(gw.base_url + "/responses", json={**body, "input": prompt}, timeout=30)
    requests.post(gw.base_url + "/responses", json=body, timeout=30)
    assert len(upstream.requests()) == 5


def test_replay_cache_skips_failures_and_can_be_disabled(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    upstream.clear()
    for _ in range(2):
        requests.post(gw.base_url + "/responses", json={"model": "m", "input": "error: 500 boom", "stream": True}, timeout=30)
    assert len(upstream.requests()) == 2
    off = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0")
    for _ in range(2):
        requests.post(off.base_url + "/responses", json={"model": "m", "input": "no cache"}, timeout=30)
    assert len(upstream.requests()) == 4


def test_replay_cache_preload_from_flow_file(gateway_factory):
    recording = ROOT / "recordings" / "plain-answer.mitm"
    flow = turns(recording)[0]
    gw = gateway_factory(DEAD_UPSTREAM, "--set", f"resp2chat_replay_preload={recording}",
                         "--set", f"resp2chat_upstream_base_url={flow.metadata['resp2chat']['upstream']}",
                         "--set", f"resp2chat_seal_key={SEAL_KEY}")  # (the recording's: its answer holds what it sealed)
    # the cache is keyed on the request's exact bytes: send what Codex sent
    r = requests.post(gw.base_url + "/responses", data=flow.metadata["resp2chat"]["responses_request"].encode(),
                      headers={"content-type": "application/json"}, timeout=30)
    assert strip_ids(r.content) == strip_ids(flow.response.content)
    assert parse_sse(r.content)[-1]["response"]["id"] != flow.metadata["resp2chat"]["response_id"]


# --- analyze ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resumed-session", "tool-call-loop"])
def test_analyze_multi_turn_recordings(name):
    out = resp2chat_cli("analyze", "--json", str(ROOT / "recordings" / f"{name}.mitm"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = report["requests"]
    assert len(rows) >= 2 and all(r["turn"] == i + 1 for i, r in enumerate(rows))
    assert report["summary"]["radix_hit_ratio_later_turns"] >= 0.97
    assert report["summary"]["session_prefix_hit_ratio_later_turns"] >= 0.97
    table = resp2chat_cli("analyze", str(ROOT / "recordings" / f"{name}.mitm")).stdout
    assert "simulated radix cache hit" in table and "1 token = 4 bytes" in table


def test_analyze_reports_first_divergence(tmp_path):
    base = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hi"}]
    log = tmp_path / "upstream.jsonl"
    lines = [
        {"session": "a", "body": {"messages": base}},
        {"session": "a", "body": {"messages": base + [{"role": "assistant", "content": "hello"}]}},
        {"session": "a", "body": {"messages": [{"role": "system", "content": "You are terse."}] + base[1:]}},
    ]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = json.loads(resp2chat_cli("analyze", "--json", str(log)).stdout)
    third = report["requests"][2]
    assert third["divergence"]["segment"] == "messages[0] (system)"
    assert third["divergence"]["previous"].startswith("helpful") and third["divergence"]["current"].startswith("terse")
    assert report["requests"][1]["divergence"] is None


def test_upstream_request_log_feeds_analyze(upstream, gateway_factory, tmp_path):
    log = tmp_path / "up.jsonl"
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_upstream_request_log_path={log}",
                         "--set", "resp2chat_upstream_api_key=sk-never-in-log-123456")
    history = [{"role": "user", "content": "first"}]
    for text in ("second", "third"):
        r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": history}, timeout=30,
                          headers={"session-id": "sess-1"}).json()
        history += [o for o in r["output"]] + [{"role": "user", "content": text}]
    gw.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["session"] for r in records] == ["sess-1", "sess-1"]
    assert "sk-never-in-log" not in log.read_text()
    report = json.loads(resp2chat_cli("analyze", "--json", str(log)).stdout)
    second = report["requests"][1]
    assert second["turn"] == 2 and second["divergence"] is None  # turn 2 extends turn 1


# --- mitmweb contentviews ----------------------------------------------------------------------


def test_contentviews_render_a_recorded_turn():
    from mitmproxy import contentviews

    from resp2chat_io import views

    views.register()
    flow = [f for f in turns(ROOT / "recordings" / "tool-call-loop.mitm")][0]
    with taddons.context():  # contentviews read mitmproxy options
        req = contentviews.prettify_message(flow.request, flow)
        events = contentviews.prettify_message(flow.response, flow)
        up = contentviews.prettify_message(flow.response, flow, view_name="resp2chat upstream")
    assert req.view_name == "resp2chat request"
    assert "== Responses request (from the client) ==" in req.text and "run: echo hello-from-tool" in req.text
    assert "== chat request (to the backend) ==" in req.text and "[0] system:" in req.text
    assert events.view_name == "resp2chat events"
    assert "response.function_call_arguments.delta ×" in events.text
    assert re.search(r"response\.output_item\.done  #1 function_call fc_\w+ exec_command", events.text)
    assert "reasoning: \"Thinking about: run: echo hello-from-tool\"" in up.text
    assert re.search(r'tool_call\[0\]: "exec_command id=\S+ args=\{\\"cmd\\": \\"echo hello-from-tool\\"\}"', up.text)
    assert "finish_reason: tool_calls" in up.text


def test_replay_cache_hit_still_stores_for_previous_response_id(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    upstream.clear()
    first = client.responses.create(model="demo-model", input="remember me")
    hit = client.responses.create(model="demo-model", input="remember me")
    assert len(upstream.requests()) == 1 and hit.id != first.id and hit.output_text == first.output_text
    follow = client.responses.create(model="demo-model", input="and now?", previous_response_id=hit.id)
    assert follow.output_text == "You said: and now?"
    assert upstream.requests()[-1]["messages"][0]["content"] == "remember me"


# --- what offline replay ignores between runs (resp2chat_core/replay.py rerun_key) -------------


def _chat(tool_output: str, date: str = "2026-11-22", user: str = "run: echo hi") -> bytes:
    env = f"<environment_context>\n  <cwd>/w</cwd>\n  <current_date>{date}</current_date>\n</environment_context>"
    return json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": env}, {"role": "user", "content": user},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "exec_command", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": tool_output}], "stream": True}).encode()


def test_rerun_key_ignores_exactly_wall_time_chunk_id_and_date():
    from resp2chat_core.replay import rerun_key

    out = "Chunk ID: {}\nWall time: {} seconds\nProcess exited with code 0\nOriginal token count: 1\nOutput:\nhi\n"
    recorded = rerun_key(_chat(out.format("f0ef16", "0.2428")))
    assert rerun_key(_chat(out.format("1b79c3", "12.5"), date="2027-01-01")) == recorded
    # anything else is compared byte for byte
    for other in (_chat(out.format("f0ef16", "0.2428").replace("code 0", "code 1")),
                  _chat(out.format("f0ef16", "0.2428"), user="run: echo ho"),
                  _chat(out.format("f0ef16", "0.2428") + " "),
                  _chat(out.format("f0ef16", "0.2428")).replace(b'"stream": true', b'"stream": false')):
        assert rerun_key(other) != recorded
    # a wall time the user typed is not tool output: it counts
    assert rerun_key(_chat("x", user="Wall time: 1 seconds")) != rerun_key(_chat("x", user="Wall time: 2 seconds"))


def test_a_turns_recorded_request_is_text_in_every_copy_of_its_flow(tmp_path):
    """The record keeps the client's request as its bytes until the flow's state is copied
    (base.RecordText: no 5 MB string per 2.5 MB turn for a flow nobody writes): a flow
    file, written and read back by mitmproxy, and ``flow.copy()`` hold it as text (UTF-8, a bad
    byte replaced), as they did when the record held the text itself."""
    from mitmproxy import io
    from mitmproxy.test import tflow

    from resp2chat_io.addons.base import META
    from resp2chat_io.addons.http_turns import note_request, request_text

    flow = tflow.tflow(resp=True)
    body = '{"model":"m","input":"caf\u00e9 \u2014 \U0001f600"}'.encode() + b'\xff'
    note_request(flow.metadata.setdefault(META, {}), body)
    text = body.decode("utf-8", "replace")
    assert request_text(flow.metadata[META]) == text
    assert flow.copy().metadata[META]["responses_request"] == text
    path = tmp_path / "flows"
    with path.open("wb") as fh:
        io.FlowWriter(fh).add(flow)
    with path.open("rb") as fh:
        (back,) = list(io.FlowReader(fh).stream())
    assert back.metadata[META]["responses_request"] == text and isinstance(back.metadata[META]["responses_request"], str)
