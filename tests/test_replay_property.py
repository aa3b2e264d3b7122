"""A property hunt of the replay cache (README *Replay cache*) through a real gateway and real
backends: a sequence of requests from two owners (``forward_client_auth``: each credential is
its own), for two models routed to other upstreams, streamed or not, some answered with a
failure or a cut, some cut by the client; a request is answered from the cache exactly when the
same owner sent the same request before and it completed, and then with that very answer (the
backend's words for that owner and model, never another's); 16 identical requests at once are
16 coherent answers.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (RESP2CHAT, check_stream, cli_env, free_port, parse_sse, resp2chat_cli, scrape, start_gateway,
                     stop_process, wait_http, wait_until)
from mitmproxy import http as mhttp
from wsclient import WSClient
from test_upstreams_property import Backend

OWNERS = ("Bearer sk-owner-one-0123456789", "Bearer sk-owner-two-0123456789")
FAILURES = ("500", "cut-after", "garbage", "error200", "400")


class Counting(Backend):
    """A ``Backend`` whose answer names what it got: its own name, the call's number, the model
    and the credential's end, so an answer shows whose it was."""

    def words(self, h, body):
        return f"{self.name} call {len(self.calls)} for {body['model']} by {h.headers.get('authorization', '')[-6:]}"


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cached")
    a, b = Counting("a"), Counting("b")
    entries = [{"name": "a", "base_url": a.base_url, "models": ["m1"], "model_map": {"m1": "up-m1"}},
               {"name": "b", "base_url": b.base_url, "models": ["*"]}]
    gw = start_gateway("http://127.0.0.1:9", tmp, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", "resp2chat_forward_client_auth=true")
    yield gw, {"a": a, "b": b}
    gw.stop()
    a.close()
    b.close()


def _ask(gw, owner: str, model: str, text: str, stream: bool) -> tuple[int, str, dict | None]:
    """(status, the answer's text, its terminal response) of one request."""
    r = requests.post(gw.base_url + "/responses", timeout=30, headers={"authorization": owner},
                      json={"model": model, "input": text, "stream": stream})
    if stream:
        assert r.status_code == 200, r.text[:300]
        events = parse_sse(r.content)
        check_stream(r.content, events[0]["response"]["id"])
        end = events[-1]["response"]
        return 200, "".join(p.get("text", "") for o in end["output"] for p in o.get("content", [])), end
    if r.status_code != 200:
        return r.status_code, r.text, None
    body = r.json()
    return 200, "".join(p.get("text", "") for o in body["output"] for p in o.get("content", [])), body


REQUESTS = st.tuples(st.sampled_from(range(len(OWNERS))), st.sampled_from(["m1", "m2"]),
                     st.sampled_from(["t1", "t2"]), st.booleans(), st.sampled_from(("ok",) * 4 + FAILURES))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(sequence=st.lists(REQUESTS, min_size=2, max_size=8))
def test_a_hit_is_the_same_owners_same_request_that_completed(cached, sequence):
    gw, backends = cached
    salt = uuid.uuid4().hex[:8]
    kept: dict[tuple, str] = {}  # (owner, model, text, stream) -> the answer the cache holds
    start = _entries(gw)
    for owner, model, text, stream, behaviour in sequence:
        text = f"{text} {salt}"
        key = (owner, model, text, stream)
        for b in backends.values():
            b.plan[text] = behaviour
        before = {n: len(b.calls_for(text)) for n, b in backends.items()}
        status, said, _ = _ask(gw, OWNERS[owner], model, text, stream)
        asked = sum(len(b.calls_for(text)) - before[n] for n, b in backends.items())
        if key in kept:
            assert asked == 0 and status == 200 and said == kept[key], (sequence, key, said, kept[key])
            continue
        assert asked == (2 if model == "m1" and behaviour == "500" else 1), (sequence, key, asked)  # (a, then b)
        if behaviour == "ok":
            where = "a" if model == "m1" else "b"
            assert said.startswith(f"{where} call ") and said.endswith(
                f"for {'up-m1' if model == 'm1' else model} by {OWNERS[owner][-6:]} "), (sequence, key, said)
            kept[key] = said
            # (kept as the turn ends, just after its last byte went)
            wait_until(lambda: _entries(gw) >= start + len(kept), 5, "the entry kept")


def _entries(gw) -> float:
    return scrape(gw).get(("resp2chat_replay_cache_entries", ()), 0)


def test_16_identical_requests_at_once_are_16_coherent_answers_then_one_hit(cached):
    gw, backends = cached
    text = f"together {uuid.uuid4().hex[:8]}"
    backends["b"].plan[text] = "drip"  # (slow enough that all 16 are in flight together)
    start = _entries(gw)
    barrier = threading.Barrier(16)

    def one(stream: bool):
        barrier.wait()
        return _ask(gw, OWNERS[0], "m2", text, stream)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, [i % 2 == 0 for i in range(16)]))
    ids = {end["id"] for _, _, end in answers}
    assert len(ids) == 16 and all(status == 200 and end["status"] == "completed" for status, _, end in answers)
    calls = len(backends["b"].calls_for(text))
    assert 2 <= calls <= 16  # (every miss asks: the cache coalesces nothing)
    for status, said, end in answers:  # each the answer of one call, whole
        assert said.startswith("b call ") and said.endswith(f"for m2 by {OWNERS[0][-6:]} "), said
    wait_until(lambda: _entries(gw) >= start + 1, 5, "an entry kept")
    # each of the two requests (streamed, not) is answered from the cache now, with one of the answers
    for stream in (True, False):
        status, said, end = _ask(gw, OWNERS[0], "m2", text, stream)
        assert status == 200 and end["id"] not in ids and said in {s for _, s, _ in answers}
    assert len(backends["b"].calls_for(text)) == calls


def test_an_answer_the_client_hung_up_on_is_not_kept(cached):
    """A streamed answer the client stopped reading midway is no completed answer: the same
    request later reaches the backend again and gets a whole one."""
    gw, backends = cached
    text = f"hang up {uuid.uuid4().hex[:8]}"
    backends["b"].plan[text] = "drip"
    with requests.post(gw.base_url + "/responses", timeout=30, stream=True, headers={"authorization": OWNERS[0]},
                       json={"model": "m2", "input": text, "stream": True}) as r:
        for line in r.iter_lines():
            if b"output_text.delta" in line:
                break
    time.sleep(2)  # (the backend's answer would have ended meanwhile)
    backends["b"].plan[text] = "ok"
    status, said, end = _ask(gw, OWNERS[0], "m2", text, True)
    assert status == 200 and end["status"] == "completed" and said.endswith(f"by {OWNERS[0][-6:]} ")
    assert len(backends["b"].calls_for(text)) == 2


# --- recorded flows, truncated or edited: replay, preload, retranslate, analyze ----------------

TURNS = [("hello 0", True), ("hello 1", False), ("hello 2", True)]  # (input, stream) of the HTTP turns


@pytest.fixture(scope="module")
def recorded(upstream, tmp_path_factory):
    """A real session recorded through a gateway (``-w``): three HTTP turns, a WebSocket of two;
    the file, and the answers the clients got."""
    tmp = tmp_path_factory.mktemp("recorded")
    flows = tmp / "session.mitm"
    gw = start_gateway(upstream.origin, tmp, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0")
    try:
        answers = [requests.post(gw.base_url + "/responses", timeout=30,
                                 json={"model": "demo-model", "input": text, "stream": stream}).content
                   for text, stream in TURNS]
        ws = WSClient(gw.base_url)
        for text in ("ws hello", "ws again"):
            assert ws.turn({"type": "response.create", "model": "demo-model", "input": text})[-1]["type"] == \
                "response.completed"
        ws.close()
    finally:
        gw.stop()
    return flows, answers


def _edited(src, dst, edit) -> None:
    """``src``'s flows with ``edit(meta, flow)`` applied to each turn's record, written to ``dst``."""
    from mitmproxy import io

    with src.open("rb") as fh:
        flows = list(io.FlowReader(fh).stream())
    for f in flows:
        meta = f.metadata.get("resp2chat")
        if isinstance(f, mhttp.HTTPFlow) and meta:
            edit(meta, f)
    with dst.open("wb") as fh:
        writer = io.FlowWriter(fh)
        for f in flows:
            writer.add(f)


def _ws(meta) -> bool:
    return meta.get("transport") == "websocket"


# what a hand (or a tool) may have done to a recording: each breaks the WebSocket's turns or the
# HTTP turns' records, never both, so the rest still replays
EDITS = {
    "turns not a list": lambda m, f: _ws(m) and m.update(turns="garbage"),
    "turns not records": lambda m, f: _ws(m) and m.update(turns=[5, None]),
    "a turn's chat request not text": lambda m, f: _ws(m) and [t.update(chat_request=7) for t in m["turns"]],
    "a turn's events not text": lambda m, f: _ws(m) and [t.update(events=7) for t in m["turns"]],
    "the record not an object": lambda m, f: _ws(m) and f.metadata.update(resp2chat=[1, 2]),
    "the chat request not text": lambda m, f: not _ws(m) and "hello 1" in m.get("responses_request", "") and
    m.update(chat_request=7),
    "the request not JSON": lambda m, f: not _ws(m) and "hello 1" in m.get("responses_request", "") and
    m.update(responses_request="{not json"),
    "the request not text": lambda m, f: not _ws(m) and "hello 1" in m.get("responses_request", "") and
    m.update(responses_request=5),
}


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out, out[-2000:]


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_recording_replays_what_it_can_and_the_cli_reads_it(recorded, tmp_path, edit):
    """An edited flow file: the CLI's retranslate and analyze say what they cannot read (no
    traceback); ``--server-replay`` starts and replays every turn whose record is whole, byte for
    byte; ``resp2chat_replay_preload`` starts."""
    flows, answers = recorded
    path = tmp_path / "edited.mitm"
    _edited(flows, path, EDITS[edit])
    for command in ("retranslate", "analyze"):
        out = resp2chat_cli(command, str(path), timeout=60)
        _no_traceback(out.stdout + out.stderr)
    # (the preload runs at the start of a replaying gateway too)
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--server-replay", str(path),
                       "--set", f"resp2chat_replay_preload={path}")
    try:
        for (text, stream), answer in zip(TURNS, answers):
            if "request" in edit and text == "hello 1":
                continue
            r = requests.post(gw.base_url + "/responses", timeout=30,
                              json={"model": "demo-model", "input": text, "stream": stream})
            assert r.status_code == 200 and r.content == answer, (text, r.text[:300])
        _no_traceback(gw.log())
    finally:
        gw.stop()


def test_a_preloaded_json_answer_is_served_as_a_streamed_one_is(upstream, recorded, tmp_path):
    """``resp2chat_replay_preload`` fills the cache with every completed turn of the file, a
    JSON answer too: a gateway on the same upstream answers the recorded requests without it.
    Before, a JSON answer (its ``"created_at": N`` has a space) was never preloaded."""
    flows, answers = recorded
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_replay_preload={flows}")
    try:
        before = len(upstream.requests())
        for (text, stream), answer in zip(TURNS, answers):
            r = requests.post(gw.base_url + "/responses", timeout=30,
                              json={"model": "demo-model", "input": text, "stream": stream})
            assert r.status_code == 200 and "You said: " + text in r.text
            assert len(r.content) == len(answer) and r.content != answer  # (the same answer under a fresh id)
        assert len(upstream.requests()) == before, "a preloaded answer went to the backend"
    finally:
        gw.stop()


def _flow_ends(path) -> list[tuple[int, str]]:
    """Where each flow of a flow file ends (its byte offset), and its Responses request."""
    from mitmproxy import io

    ends = []
    with path.open("rb") as fh:
        for f in io.FlowReader(fh).stream():
            ends.append((fh.tell(), str((f.metadata.get("resp2chat") or {}).get("responses_request") or "")))
    return ends


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.floats(0.0, 0.999))
def test_a_truncated_recording_is_read_up_to_the_cut_never_a_traceback(recorded, tmp_path_factory, cut):
    """A flow file cut anywhere (a gateway killed while writing it): retranslate and analyze read
    it up to the cut or say they cannot, ``resp2chat_replay_preload`` starts (a cut before the
    first whole flow: it refuses to start saying why), ``--server-replay`` given to mitmdump itself
    starts or refuses saying why (mitmproxy reads it before the gateway loads: ``resp2chat start``
    hands it the whole flows, the next test), none with a traceback, none hanging."""
    flows, _ = recorded
    data = flows.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "cut.mitm"
    path.write_bytes(data[:int(len(data) * cut)])
    whole = _flow_ends(flows)[0][0] <= len(path.read_bytes())
    for command in ("retranslate", "analyze"):
        out = resp2chat_cli(command, str(path), timeout=60)
        _no_traceback(out.stdout + out.stderr)
        if out.returncode:
            assert str(path) in out.stdout + out.stderr and "cannot read" in out.stdout + out.stderr, out
        if command == "analyze" and whole:
            assert out.returncode == 0, out.stderr
    for option in (("--server-replay", str(path)), ("--set", f"resp2chat_replay_preload={path}")):
        try:
            gw = start_gateway("http://127.0.0.1:9", path.parent, *option)
        except RuntimeError as exc:  # (refused to start: saying why)
            assert not whole or option[0] == "--server-replay", str(exc)[-2000:]
            _no_traceback(str(exc))
            continue
        gw.stop()


def test_a_recording_cut_in_a_flow_replays_the_flows_before_it(recorded, tmp_path):
    """A real recording cut in the middle of its third flow: ``analyze`` reads the two whole turns
    before the cut and warns where the file stops (byte, count); ``resp2chat start -- --server-replay``
    replays those two byte for byte (mitmproxy's own replay, which reads the file before the
    gateway loads, gets a copy of the whole flows) and ``resp2chat_replay_preload`` loads them,
    each warning the same. Before, each refused the whole file ("Invalid data format."): the
    gateway did not start."""
    flows, answers = recorded
    ends = _flow_ends(flows)
    third = next(i for i, (_, request) in enumerate(ends) if '"hello 2"' in request)
    data = flows.read_bytes()
    at = (ends[third - 1][0] + ends[third][0]) // 2  # (in the middle of the third turn's flow)
    path = tmp_path / "cut.mitm"
    path.write_bytes(data[:at])
    said = f"{path}: cut short or unreadable from byte {ends[third - 1][0]} of {at}"
    out = resp2chat_cli("analyze", "--json", str(path), timeout=60)
    assert out.returncode == 0, out.stderr
    assert said in out.stderr and f"the {third} whole flows before it were read" in out.stderr, out.stderr
    assert len(json.loads(out.stdout)["requests"]) == 2, out.stdout[:500]

    port = free_port()
    log = tmp_path / "start.log"
    proc = subprocess.Popen([str(RESP2CHAT), "start", "--", "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
                             "--server-replay", str(path), "--set", f"resp2chat_replay_preload={path}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=cli_env(tmp_path), cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        for (text, stream), answer in zip(TURNS[:2], answers):
            r = requests.post(f"http://127.0.0.1:{port}/v1/responses", timeout=30,
                              json={"model": "demo-model", "input": text, "stream": stream})
            assert r.status_code == 200 and r.content == answer, (text, r.text[:300])
        said_log = log.read_text()
        assert f"server replay: {said}" in said_log, said_log[-3000:]
        assert f"replay cache preload: {said}" in said_log, said_log[-3000:]
        _no_traceback(said_log)
    finally:
        stop_process(proc)
