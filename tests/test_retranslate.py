"""Recordings as regression data: ``resp2chat retranslate`` lowers and translates every recorded
turn again with the current code and diffs against the recording (resp2chat_core/retranslate.py).
Offline replay hands back recorded events verbatim, so only this notices a translator change."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from mitmproxy import io

from helpers import (
    ROOT, LocalServer, QuietHandler, chat_chunk, chat_sse, parse_sse, read_flows, retranslate, send_sse, stream_turn,
)
from recordings import SEAL_KEY
from wsclient import WSClient

RECORDINGS = sorted((ROOT / "recordings").glob("*.mitm"))


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.stem)
def test_every_recording_translates_again_to_the_same_events(recording):
    out, results = retranslate("--seal-key", SEAL_KEY, str(recording))
    assert out.returncode == 0, out.stdout + out.stderr
    assert results and all(r["outcome"] == "same" for r in results), out.stdout  # every turn checked
    assert all(r["events"] > 0 for r in results)


def rewrite(src: Path, dst: Path, change) -> None:
    recorded = read_flows(src)
    for f in recorded:
        change(f)
    with dst.open("wb") as fh:
        writer = io.FlowWriter(fh)
        for f in recorded:
            writer.add(f)


def test_a_translator_change_shows_up_as_a_diff(upstream, gateway_factory, tmp_path):
    source = tmp_path / "session.mitm"  # a text turn and a tool-call turn, recorded now
    gw = gateway_factory(upstream.origin, "-w", str(source), "--set", "resp2chat_max_replay_entries=0")
    tools = [{"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}}]
    for text in ("say hi", "run: echo hello"):
        requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": text, "tools": tools,
                                                        "stream": True}, timeout=30)
    gw.stop()
    out, results = retranslate(str(source))
    assert out.returncode == 0 and [r["outcome"] for r in results] == ["same", "same"], out.stdout

    def events(f):  # what a changed translator would now make differently from the recording
        if f.response is not None and b"response.output_text.delta" in (f.response.content or b""):
            f.response.content = f.response.content.replace(b'"delta":"You ', b'"delta":"We ', 1)

    rewrite(source, tmp_path / "events.mitm", events)
    out, results = retranslate(str(tmp_path / "events.mitm"))
    assert out.returncode == 1 and [r["outcome"] for r in results] == ["differs", "same"], out.stdout
    assert "translation differs" in out.stdout
    assert '-{"type":"response.output_text.delta"' in out.stdout and '"delta":"We "' in out.stdout

    def chat(f):  # a lowering change: the backend would now get other bytes
        if f.request.method == "POST":
            f.request.content = f.request.content.replace(b'"stream":true', b'"stream":true,"x":1')

    rewrite(source, tmp_path / "chat.mitm", chat)
    out, results = retranslate(str(tmp_path / "chat.mitm"))
    assert out.returncode == 1 and "lowering differs" in out.stdout and '- "x": 1,' in out.stdout


def test_item_references_resolve_against_the_recording(upstream, gateway_factory, tmp_path):
    """A turn that refers to an item of an earlier response (item_reference, as the Vercel AI SDK
    sends) is lowered again against the recording, as the gateway lowered it against its store."""
    source = tmp_path / "refs.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(source), "--set", "resp2chat_max_replay_entries=0")
    first = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "remember me",
                                                            "stream": True}, timeout=30)
    said = parse_sse(first.content)[-1]["response"]["output"][-1]["id"]
    second = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "stream": True, "input": [
        {"role": "user", "content": "remember me"}, {"type": "item_reference", "id": said},
        {"role": "user", "content": "and now?"}]}, timeout=30)
    assert parse_sse(second.content)[-1]["type"] == "response.completed"
    gw.stop()
    out, results = retranslate(str(source))
    assert out.returncode == 0 and [r["outcome"] for r in results] == ["same", "same"], out.stdout


class Slow(QuietHandler):
    """A backend whose prefill takes longer than keepalive_secs: the gateway speaks meanwhile."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        time.sleep(1.3)  # (the gateway sends a keepalive after 1 s: that is what is recorded)
        body = chat_sse(chat_chunk({"content": "late but here"}), chat_chunk(finish="stop"),
                        chat_chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}))
        send_sse(self, body)


def test_the_gateways_own_events_are_recorded_and_translated_again_in_place(upstream, gateway_factory, tmp_path):
    path = tmp_path / "live.mitm"
    with LocalServer(Slow) as slow:
        gw = gateway_factory(slow.url, "-w", str(path),
                             "--set", "resp2chat_keepalive_secs=1", "--set", "resp2chat_max_replay_entries=0")
        late = stream_turn(gw, {"model": "m", "input": "hi"})
        client = WSClient(gw.base_url)
        over_socket = client.turn({"type": "response.create", "model": "m", "input": "hi"})
        client.close()
        failing = gateway_factory(upstream.origin, "-w", str(tmp_path / "failed.mitm"))
        failed = requests.post(failing.base_url + "/responses", json={"model": "m", "input": "error: 429 slow down"},
                               timeout=30)
        gw.stop()
        failing.stop()
    assert [e["type"] for e in late][:3] == ["response.created", "response.in_progress", "response.in_progress"]
    assert [e["type"] for e in over_socket][:3] == ["response.created", "response.in_progress", "response.in_progress"]
    assert failed.status_code == 429
    recorded = [f for f in read_flows(path) if "resp2chat" in f.metadata]
    kinds = [name for _, name, _ in recorded[0].metadata["resp2chat"]["gateway_events"]]
    assert kinds[0] == "Accepted" and "Keepalive" in kinds
    socket_turn = recorded[1].metadata["resp2chat"]["turns"][0]
    assert "Keepalive" in [name for _, name, _ in socket_turn["gateway_events"]]
    [failure] = [f for f in read_flows(tmp_path / "failed.mitm") if "resp2chat" in f.metadata]
    assert [name for _, name, _ in failure.metadata["resp2chat"]["gateway_events"]] == ["Accepted", "UpstreamFailed"]
    out, results = retranslate(str(path), str(tmp_path / "failed.mitm"))
    assert out.returncode == 0 and [r["outcome"] for r in results] == ["same"] * 3, out.stdout
    # without the recorded keepalive the events could not be made again: the record is what makes it exact
    del recorded[0].metadata["resp2chat"]["gateway_events"]
    rewrite(path, tmp_path / "no-events.mitm", lambda f: f.metadata.get("resp2chat", {}).pop("gateway_events", None))
    out, results = retranslate(str(tmp_path / "no-events.mitm"))
    assert out.returncode == 1 and results[0]["outcome"] == "differs"
