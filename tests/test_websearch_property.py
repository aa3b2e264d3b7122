"""The gateway's web-search loop (websearch.py, toolloop.py), property-tested.

Random backend rounds, in every chunk shape the one reader (chatstream.py) accepts (index null
or absent, calls keyed by id, arguments as JSON objects, both reasoning fields, content parts,
usage-only chunks, empty choices, comments, ids given twice, calls never named, truncated
streams, any split of the bytes), and random search answers (results of any shape, errors,
garbage, a connection closed):

- in process, the loop and a real translator as the relay drives them (exchange.py ``_rounds``):
  the client's stream is a valid Responses stream (``helpers.check_stream``: contiguous sequence
  numbers, every item added is done, in output order, the output is the items done); each search
  run is one completed ``web_search_call`` with its query; rounds and calls stay within
  ``max_web_search_rounds`` and ``max_tool_calls``; the turn always ends;
- through a real mitmdump with a scripted backend and a local search server: streamed HTTP,
  whole HTTP and the WebSocket make the same chat requests, the same searches and the same
  Response, which is what the store keeps.
"""

from __future__ import annotations

import json
import re
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from helpers import (CREATED, RESP_ID, LocalServer, QuietHandler, chat_chunk, chat_sse, check_stream, post_turn,
                     send_cut, send_json, send_sse, start_gateway)
from resp2chat_core import toolloop, websearch
from resp2chat_core import websocket as ws
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.turn import begin_turn
from test_inspect_property import VALUES
from test_transports_property import _renamed, _same
from wsclient import WSClient

EXEC = {"type": "function", "name": "exec", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}
KEY = "brave-key-0123456789"

# --- a backend's rounds ------------------------------------------------------------------------

_PIECES = st.text(alphabet='ab é😀"\\\n', min_size=1, max_size=6)
_QUERIES = st.sampled_from(['{"query": "mitm"}', '{"query": "é😀 q"}', {"query": "obj"}, '{"query": null}', "",
                            '{"query"', ': "split"}', "[1]", '"x"'])


@st.composite
def rounds(draw) -> tuple[bytes, bool]:
    """One round's answer: (the backend's bytes, whether the stream ended properly)."""
    def chunk(delta: dict, finish: str | None = None) -> dict:
        choice = {"delta": delta, "finish_reason": finish}
        index = draw(st.sampled_from([0, None, "none"]))
        if index != "none":
            choice["index"] = index
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}

    chunks: list = []
    for piece in draw(st.lists(_PIECES, max_size=2)):
        chunks.append(chunk({draw(st.sampled_from(["reasoning_content", "reasoning"])): piece}))
    for piece in draw(st.lists(_PIECES, max_size=3)):
        chunks.append(chunk({"content": draw(st.sampled_from([piece, [{"type": "text", "text": piece}]]))}))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        call: dict = {"type": "function", "function": {}}
        index = draw(st.sampled_from([0, 1, 2, None]))
        if index is not None:
            call["index"] = index
        call_id = draw(st.sampled_from([None, "call_a", "call_b", "call_c"]))
        if call_id:
            call["id"] = call_id
        name = draw(st.sampled_from([None, "web_search", "web_search", "web_search", "exec"]))
        if name:
            call["function"]["name"] = name
        args = draw(st.none() | _QUERIES)
        if args is not None:
            call["function"]["arguments"] = args
        chunks.append(chunk({"tool_calls": [call]}))
    chunks.append(chunk({}, draw(st.sampled_from(["tool_calls", "stop", "length"]))))
    for at in sorted(draw(st.lists(st.integers(0, len(chunks)), max_size=2)), reverse=True):
        chunks.insert(at, draw(st.sampled_from([
            {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                                         "total_tokens": 7}},
            {"object": "chat.completion.chunk", "choices": []}, ": keep-alive"])))
    raw = b"".join((c.encode() + b"\n\n") if isinstance(c, str) else chat_sse(c, done=False) for c in chunks)
    raw += b"data: [DONE]\n\n"
    if draw(st.integers(0, 7)) == 0:  # (cut short: the backend closed midway)
        return raw[:draw(st.integers(0, len(raw) - 1))], False
    return raw, True


def _searching(query: str) -> bytes:
    """A backend round that searches once (its round after the script ran out: every round does)."""
    return chat_sse(chat_chunk({"tool_calls": [{"index": 0, "id": "call_z", "type": "function",
                                                "function": {"name": "web_search", "arguments": json.dumps(
                                                    {"query": query})}}]}), chat_chunk(finish="tool_calls"))


# --- a search server's answers -----------------------------------------------------------------

_RESULT = st.fixed_dictionaries({}, optional={
    "title": st.sampled_from(["<b>T</b> &amp; é", "", None, 3]), "url": st.sampled_from(["https://x/1", "", None, 7]),
    "description": st.sampled_from(["d", "<i>😀</i>", None])})


@st.composite
def searches(draw) -> tuple[int, bytes]:
    """A search server's answer: (status, body); status 0: it closes the connection unanswered."""
    form = draw(st.sampled_from(["results"] * 3 + ["json", "shape", "status", "garbage", "close"]))
    if form == "results":
        return 200, json.dumps({"web": {"results": draw(st.lists(_RESULT | VALUES, max_size=6))}}).encode()
    if form == "json":
        return 200, json.dumps(draw(VALUES)).encode()
    if form == "shape":
        return 200, json.dumps({"web": draw(VALUES)}).encode()
    if form == "status":
        return draw(st.sampled_from([401, 429, 500])), b'{"error": "quota for ' + KEY.encode() + b'"}'
    if form == "garbage":
        return 200, draw(st.sampled_from([b"<html>", b"", b"[" * 50_000, b"\xff\xfe"]))
    return 0, b""


def test_any_search_answer_is_text_the_model_reads():
    """``read_brave`` makes text and source URLs of any answer: results that are no objects,
    a ``web`` or ``results`` of another type, fields of another type, JSON nested too deep.
    Before: AttributeError, TypeError or RecursionError out of the search step (the relay then
    failed the turn: "the gateway's relay failed"), where README says a search failure is a tool
    result the model can read."""
    for body in ({"web": {"results": [1, "x", None]}}, {"web": []}, {"web": {"results": {"a": 1}}},
                 {"web": {"results": [{"title": None, "url": None, "description": None}]}}, {"web": "x"}, [1],
                 {"web": {"results": [{"url": 5}, {"url": "https://ok"}]}}):
        text, urls = websearch.read_brave("q", 200, json.dumps(body).encode(), 5, KEY)
        assert isinstance(text, str) and all(isinstance(u, str) and u and isinstance(t, str) for u, t in urls), \
            (body, urls)
        assert "None" not in text, text
    text, urls = websearch.read_brave("q", 200, b"[" * 100_000, 5, KEY)
    assert text.startswith("Web search failed") and urls == []
    assert websearch.read_brave("q", 200, json.dumps({"web": {"results": [{"url": 5}, {"url": "https://ok"}]}})
                                .encode(), 5, KEY)[1] == [("https://ok", "")]


def test_a_query_that_is_no_string():
    """The model's arguments: a null query is no query (before: the gateway searched for
    "None"); arguments nested too deep are the raw text (before: RecursionError)."""
    assert websearch.WebSearchTools.step("c", "web_search", '{"query": null}') == websearch.Search("c", "")
    deep = "[" * 100_000
    assert websearch.WebSearchTools.step("c", "web_search", deep) == websearch.Search("c", deep)


# --- in process: the loop and a translator, as the relay drives them ----------------------------


def _run(script: list[tuple[bytes, bool]], answers: list[tuple[int, bytes]], max_rounds: int,
         max_calls: int | None, cuts: list[int]) -> tuple[bytes, list, int]:
    """A turn as exchange.py ``_rounds`` runs it, searches answered with ``answers`` in turn
    (status 0: a connection closed, as ``_brave`` words it): (the client's stream, the searches
    run (round, call id, query), the rounds the backend answered)."""
    body = {"model": "m", "input": "x", "stream": True, "tools": [{"type": "web_search"}, EXEC]}
    if max_calls is not None:
        body["max_tool_calls"] = max_calls
    turn = begin_turn(json.dumps(body).encode(), LoweringOptions(web_search=True), RESP_ID, CREATED)
    tr = turn.translator()
    loop = websearch.SearchLoop(turn.chat_body, max_rounds, max_calls=max_calls)
    out, ran, n = tr.accepted(), [], 0
    while True:
        raw, ok = script[n] if n < len(script) else (_searching(f"again {n}"), True)
        n += 1
        assert n <= max_rounds + 1, "more rounds than max_web_search_rounds allows"
        at = 0
        for cut in sorted(c % (len(raw) + 1) for c in cuts) + [len(raw)]:
            out += tr.feed(loop.feed(raw[at:cut]))
            at = cut
        tail, step = loop.end_round(ok)
        out += tr.feed(tail)
        if isinstance(step, toolloop.Finish):
            out += tr.feed(step.tail)
            break
        for s in step:
            out += tr.search_started(s.call_id, s.query, s.refused is not None)
        texts = []
        for s in step:
            if s.refused is not None:  # past a spent bound: no search, a failed item
                out += tr.search_done(s.call_id, (), True)
                texts.append(s.refused)
                continue
            status, answer = answers[sum(s.query.encode()) % len(answers)]
            text, urls = websearch.read_brave(s.query, status, answer, 3, KEY) if status else \
                ("Web search failed: ConnectionResetError", [])
            ran.append((n, s.call_id, s.query))
            out += tr.search_done(s.call_id, tuple(urls))
            texts.append(text)
        end = loop.next_round(texts)
        if isinstance(end, toolloop.Finish):  # (a call past a spent bound was refused: the turn ends)
            assert any(s.refused is not None for s in step)
            out += tr.feed(end.tail)
            break
        assert end is None
    return out + tr.finish(), ran, n


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(script=st.lists(rounds(), min_size=1, max_size=4), answers=st.lists(searches(), min_size=1, max_size=3),
       max_rounds=st.integers(1, 3), max_calls=st.none() | st.integers(1, 3),
       cuts=st.lists(st.integers(0, 1 << 12), max_size=5))
@example(script=[(chat_sse(*[chat_chunk({"tool_calls": [{"index": i, "id": "call_a", "type": "function", "function": {
    "name": "web_search", "arguments": '{"query": "q%d"}' % i}}]}) for i in (0, 1)], chat_chunk(finish="tool_calls")),
    True), (chat_sse(chat_chunk({"content": "done"}), chat_chunk(finish="stop")), True)],
    answers=[(200, b'{"web": {"results": [{"url": "https://x"}]}}')], max_rounds=2, max_calls=None, cuts=[])
def test_property_the_search_loop_is_one_valid_stream(script, answers, max_rounds, max_calls, cuts):
    """(The example: two searches with one id, as a backend that gives every call the same id.
    Before: the translator keyed the running searches by id, so the first search's item was
    added and never done, nor in the output; and the next round's request had two tool messages
    for one call id.)"""
    out, ran, n = _run(script, answers, max_rounds, max_calls, cuts)
    events = check_stream(out, RESP_ID)
    end = events[-1]["response"]
    items = [o for o in end["output"] if o["type"] == "web_search_call" and o["status"] != "failed"]
    assert [(o["status"], o["action"]["query"]) for o in items] == [("completed", q) for _, _, q in ran]
    assert not any(o["type"] == "function_call" and o["name"] == "web_search" for o in end["output"])
    assert len({o["id"] for o in items}) == len(items)
    assert len(set((k, call_id) for k, call_id, _ in ran)) == len(ran), ran  # (a round's searches: an id each)
    if max_calls is not None:
        assert len(ran) <= max_calls
    for o in items:
        assert all(s["url"] for s in o["action"]["sources"]) and len(o["action"]["sources"]) <= 3


# --- through a real gateway, on every transport --------------------------------------------------


class Backend(QuietHandler):
    """Answers round k of a turn (k: the web_search calls answered in the request so far,
    counted by the assistant messages that carry them) with ``script[k]``; past the script, a
    round that searches again."""

    script: list = []
    received: list[bytes] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with Backend.lock:
            Backend.received.append(body)
        k = sum(1 for m in json.loads(body)["messages"] if m.get("role") == "assistant" and m.get("tool_calls"))
        raw, ok = Backend.script[k] if k < len(Backend.script) else (_searching(f"again {k}"), True)
        (send_sse if ok else send_cut)(self, raw)


class Search(QuietHandler):
    answers: list = [(200, b"{}")]
    queries: list[str] = []

    def do_GET(self) -> None:
        with Backend.lock:
            Search.queries.append(parse_qs(urlsplit(self.path).query).get("q", [""])[0])
            # (by its query: a round's searches run at once, in any order)
            status, body = Search.answers[sum(Search.queries[-1].encode()) % len(Search.answers)]
        if status == 0:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        send_json(self, status, body)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("websearch-property")
    with LocalServer(Backend) as backend, LocalServer(Search) as search:
        gw = start_gateway(backend.url, tmp, "--set", "resp2chat_max_replay_entries=0",
                           "--set", "resp2chat_brave_max_results=3", "--set", "resp2chat_max_web_search_rounds=2",
                           env={"RESP2CHAT_BRAVE_API_KEY": KEY, "RESP2CHAT_BRAVE_BASE_URL": search.url})
        try:
            yield gw
        finally:
            gw.stop()


def _turn(gw, transport: str, body: dict) -> tuple[dict, bytes | None, list[bytes], list[str]]:
    """One turn over ``transport``: (its final Response, its events (None: a whole answer), the
    chat requests the backend got, the searches run)."""
    Backend.received.clear()
    Search.queries.clear()
    if transport == "ws":
        sock = WSClient(gw.base_url)
        try:
            messages = sock.turn({"type": "response.create", **body})
        finally:
            sock.close()
        sse = ws.as_sse([(m["type"], json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode())
                         for m in messages])
        final, events = messages[-1]["response"], sse
    else:
        r = post_turn(gw, {**body, "stream": transport == "http-stream"})
        if transport == "http-stream":
            assert r.status_code == 200, r.text[:300]
            events = r.content.removesuffix(b"data: [DONE]\n\n")
            final = json.loads(events[events.rfind(b"data: ") + 6:])["response"]
        elif r.status_code != 200:  # (a failed turn's whole answer is its error: http_turns.py)
            final, events = {"status": "failed", "error": {"code": r.json()["error"]["code"]}}, None
        else:
            final, events = r.json(), None
    return final, events, list(Backend.received), list(Search.queries)


# (each example runs three turns through the gateway: no shrinking; a failure shows its example whole)
@settings(max_examples=60, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(script=st.lists(rounds(), min_size=1, max_size=3), answers=st.lists(searches(), min_size=1, max_size=3),
       max_calls=st.none() | st.integers(1, 2), store=st.booleans())
@example(script=[(chat_sse(*[chat_chunk({"tool_calls": [{"index": i, "id": "call_a", "type": "function", "function": {
    "name": "web_search", "arguments": '{"query": "q%d"}' % i}}]}) for i in (0, 1)], chat_chunk(finish="tool_calls")),
    True), (chat_sse(chat_chunk({"content": "done"}), chat_chunk(finish="stop")), True)],
    answers=[(200, b'{"web": {"results": [{"url": "https://x"}]}}')], max_calls=None, store=True)
@example(script=[(_searching("q"), True), (chat_sse(chat_chunk({"content": "done"}), chat_chunk(finish="stop")), True)],
         answers=[(200, b'{"web": {"results": [1, {"url": "https://x"}]}}')], max_calls=None, store=False)
def test_property_a_search_turn_is_the_same_on_every_transport(rig, script, answers, max_calls, store):
    """(The examples: two searches with one id (before: the first one's item added and never
    done); a search server's results that are no objects (before: the turn failed, "the
    gateway's relay failed", where the model should read what it could of them).)"""
    Backend.script, Search.answers = script, answers
    body = {"model": "m", "input": "look it up", "tools": [{"type": "web_search"}, EXEC], "store": store}
    if max_calls is not None:
        body["max_tool_calls"] = max_calls
    got = {t: _turn(rig, t, body) for t in ("http-stream", "http", "ws")}
    (final, events, sent, queries) = got["http-stream"]
    evs = check_stream(events, final["id"])
    assert evs[-1]["response"] == final
    # each search ran is one completed item, whatever the search server answered (its failure is
    # text for the model), and no turn fails for what a search server answered
    # (and a search past the bounds is a failed item, no search run: never a function_call web_search)
    assert [o["status"] for o in final["output"]
            if o["type"] == "web_search_call" and o["status"] != "failed"] == ["completed"] * len(queries)
    assert not any(o["type"] == "function_call" and o["name"] == "web_search" for o in final["output"])
    assert "relay failed" not in json.dumps(final.get("error")), final["error"]
    assert len(queries) <= (max_calls if max_calls is not None else 2 * 4)
    event(f"ends {final['status']} {(final.get('error') or {}).get('code', '')}")
    event(f"{min(len(queries), 3)} searches or more" if len(queries) >= 3 else f"{len(queries)} searches")
    for transport in ("http", "ws"):
        other, other_events, other_sent, other_queries = got[transport]
        assert other_sent == sent, transport
        assert sorted(other_queries) == sorted(queries), transport
        if "id" not in other:  # (the whole answer of a failed turn: the stream's code)
            assert (final["status"], final["error"]["code"]) == ("failed", other["error"]["code"])
            continue
        _same(_norm(other), _norm(final))
        if other_events is not None:
            check_stream(other_events, other["id"])
            canon = [_norm(e) for e in _canonical(other_events)]
            _same(canon, [_norm(e) for e in _canonical(events)])
    if store:
        for transport in got:
            final = got[transport][0]
            if "id" not in final:
                continue
            stored = requests.get(f"{rig.base_url}/responses/{final['id']}", timeout=10)
            assert stored.status_code == 200
            _same(_norm(stored.json()), _norm(final))


_GENERATED = re.compile(r"\bcall_[0-9a-f]{16}_(\d+)")  # (a call id the translator made: translator.py _open_tool)


def _norm(value):
    """``value`` with the gateway's random ids renamed by order of appearance, times blanked
    (test_transports_property.py ``_renamed``), and the call ids it made named by their index."""
    return json.loads(_GENERATED.sub(r"call_made_\1", _renamed(json.dumps(value))))


def _canonical(sse: bytes) -> list[dict]:
    """A stream's events with every run of deltas merged (the socket merges what one delivery
    brings: test_transports_property.py), keep-alives left out (a search's wait is timing)."""
    from helpers import parse_sse

    return [e for e in parse_sse(ws.canonical(sse)) if e["type"] != "response.in_progress"]


class Silent(QuietHandler):
    """A search server that takes the request and never answers."""

    def do_GET(self) -> None:
        threading.Event().wait(30)


def test_a_search_server_that_never_answers_is_no_hang(tmp_path):
    """A search that never answers ends when the upstream idle timeout says (the relay's GET is
    bounded by it): the item completes, the model reads that the search failed, the turn goes on."""
    Backend.script = [(_searching("q"), True), (chat_sse(chat_chunk({"content": "ok"}), chat_chunk(finish="stop")), True)]
    Backend.received.clear()
    with LocalServer(Backend) as backend, LocalServer(Silent) as search:
        gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                           "--set", "resp2chat_upstream_idle_timeout_secs=2",
                           env={"RESP2CHAT_BRAVE_API_KEY": KEY, "RESP2CHAT_BRAVE_BASE_URL": search.url})
        try:
            r = post_turn(gw, {"model": "m", "input": "x", "tools": [{"type": "web_search"}], "stream": True},
                          timeout=20)
        finally:
            gw.stop()
    final = check_stream(r.content.removesuffix(b"data: [DONE]\n\n"), json.loads(
        r.content[r.content.rfind(b"data: {") + 6:r.content.rfind(b"\n\ndata: [DONE]")])["response"]["id"])[-1]
    assert final["response"]["status"] == "completed"
    assert [o["status"] for o in final["response"]["output"] if o["type"] == "web_search_call"] == ["completed"]
    tool = json.loads(Backend.received[-1])["messages"][-1]
    assert tool["role"] == "tool" and tool["content"].startswith("Web search failed: TimeoutError"), tool
