"""The gateway's own web_search loop (Brave) through a real mitmdump, against a fake Brave server
on loopback. The loop, the round filter and the events alone: test_websearch_core.py."""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from helpers import (
    Codex, LocalServer, QuietHandler, chat_chunk, chat_completion, chat_sse, ended_at_a_bound,
    free_port, openai_client, parse_sse, post_turn, send_json, send_sse, start_gateway, tool_call, wait_until,
)

BRAVE_KEY = "brave-planted-key-123456"
WEB_SEARCH = {"type": "web_search"}
EXEC = {"type": "function", "name": "exec_command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}


class _Brave(QuietHandler):
    queries: list[dict] = []
    status = 200
    hold: threading.Event | None = None  # set: each search waits for it (a search in flight)
    description = "snippet &amp; text {i}"  # (each result's, {i} its number)

    def do_GET(self):
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        type(self).queries.append({"path": url.path, "q": q.get("q", [""])[0], "count": q.get("count", [""])[0],
                                   "token": self.headers.get("x-subscription-token")})
        if self.hold is not None:
            self.hold.wait(60)
        send_json(self, self.status, {"error": "quota exhausted"} if self.status != 200 else {"web": {"results": [
            {"title": f"<strong>Result {i}</strong> for {q['q'][0]}", "url": f"https://example.org/{i}",
             "description": self.description.format(i=i)} for i in range(1, 9)]}})


@pytest.fixture
def brave():
    _Brave.queries, _Brave.status, _Brave.hold, _Brave.description = [], 200, None, "snippet &amp; text {i}"
    with LocalServer(_Brave) as server:
        yield server.url, _Brave


@pytest.fixture
def search_gateway(upstream, gateway_factory, brave):
    url, _ = brave
    return gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                           "--set", "resp2chat_brave_max_results=3",
                           env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})


SEARCH_PROMPT = 'call: web_search {"query": "mitmproxy addons"}'


def test_search_loop_is_one_continuous_stream(search_gateway, upstream, brave):
    _, handler = brave
    upstream.clear()
    events = list(openai_client(search_gateway).responses.create(
        model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH], stream=True))
    types = [e.type for e in events]
    assert types.count("response.completed") == 1 and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    i = types.index("response.web_search_call.in_progress")
    assert types[i - 1] == "response.output_item.added"
    assert types[i:i + 3] == ["response.web_search_call.in_progress", "response.web_search_call.searching",
                              "response.web_search_call.completed"]
    final = events[-1].response
    kinds = [o.type for o in final.output]
    assert kinds == ["reasoning", "web_search_call", "reasoning", "message"]
    call = final.output[1]
    assert call.status == "completed" and call.action.query == "mitmproxy addons"
    assert [s.url for s in call.action.sources] == [f"https://example.org/{i}" for i in (1, 2, 3)]
    assert final.output_text == "The tool returned: snippet & text 3"
    # Brave got the query, the key and the result count; the model got the results back
    assert handler.queries == [{"path": "/res/v1/web/search", "q": "mitmproxy addons", "count": "3", "token": BRAVE_KEY}]
    first, second = upstream.requests()[-2:]
    assert any(t["function"]["name"] == "web_search" for t in first["tools"])
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "web_search"
    assert tool["role"] == "tool" and tool["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert tool["content"].startswith("Web search results for: mitmproxy addons\n\n1. Result 1 for mitmproxy addons")
    # one usage for the whole turn: the last round's prompt, every round's completion
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


@pytest.mark.parametrize("stream", [True, False])
def test_the_answer_cites_the_sources_it_names(search_gateway, brave, stream):
    """OpenAI's web search annotates the answer's text with ``url_citation``s: where it names a
    source, which one (URL, title). The gateway's never did (``annotations`` always empty), so a
    client showing sources (the Agents SDK's, a chat UI's) showed none. Each place the message
    names a URL of a search the turn ran, as a whole, is now one: in the final message and in the
    stream (``response.output_text.annotation.added``, before the text's ``done``). A URL that
    only starts a longer one is none."""
    _, handler = brave
    # (the demo model answers "The tool returned: <the results' last line>", the 3rd result's description)
    handler.description = "see https://example.org/{i}/more, or https://example.org/1."
    client = openai_client(search_gateway)
    if stream:
        events = list(client.responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH],
                                              stream=True))
        types = [e.type for e in events]
        added = [e for e in events if e.type == "response.output_text.annotation.added"]
        assert len(added) == 1 and types.index(added[0].type) < types.index("response.output_text.done")
        assert added[0].annotation_index == 0 and added[0].content_index == 0
        final = events[-1].response
        said = added[0].annotation
        assert added[0].item_id == final.output[-1].id and (said if isinstance(said, dict) else said.model_dump()) \
            == final.output[-1].content[0].annotations[0].model_dump()
    else:
        final = client.responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH])
    text = final.output[-1].content[0]
    assert text.text == "The tool returned: see https://example.org/3/more, or https://example.org/1."
    (cite,) = text.annotations
    assert cite.type == "url_citation" and cite.url == "https://example.org/1"
    assert cite.title == "Result 1 for mitmproxy addons" and text.text[cite.start_index:cite.end_index] == cite.url
    # a turn that searched nothing cites nothing
    plain = client.responses.create(model="demo-model", input="see https://example.org/1", tools=[WEB_SEARCH])
    assert plain.output[-1].content[0].annotations == []


def test_non_streaming_client_gets_the_whole_loop(search_gateway):
    resp = openai_client(search_gateway).responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH])
    assert [o.type for o in resp.output] == ["reasoning", "web_search_call", "reasoning", "message"]


def test_brave_errors_become_a_tool_result(search_gateway, upstream, brave):
    _, handler = brave
    handler.status = 500
    upstream.clear()
    resp = openai_client(search_gateway).responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH])
    assert resp.status == "completed"
    tool = upstream.requests()[-1]["messages"][-1]
    assert tool["content"].startswith("Web search failed (HTTP 500)") and BRAVE_KEY not in tool["content"]


def test_last_round_takes_the_search_tool_away(upstream, gateway_factory, brave):
    url, _ = brave
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_web_search_rounds=1",
                         env={"RESP2CHAT_BRAVE_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
    upstream.clear()
    openai_client(gw).responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH, EXEC])
    second = upstream.requests()[-1]
    assert [t["function"]["name"] for t in second["tools"]] == ["exec_command"]


def test_max_tool_calls_bounds_the_searches_the_gateway_runs(search_gateway, upstream, brave):
    """``max_tool_calls: 1``, and the model calls web_search twice at once: one search runs (one
    web_search_call item, one Brave query), the model reads that the other was not run, and the
    next round offers it no search (OpenAI's: further calls are ignored)."""
    _, handler = brave
    upstream.clear()
    twice = 'call: web_search {"query": "one"}\ncall: web_search {"query": "two"}'
    resp = openai_client(search_gateway).responses.create(model="demo-model", input=twice, tools=[WEB_SEARCH],
                                                           max_tool_calls=1)
    assert resp.status == "completed" and resp.max_tool_calls == 1
    assert [o.type for o in resp.output].count("web_search_call") == 1
    assert [q["q"] for q in handler.queries] == ["one"]
    second = upstream.requests()[-1]
    assert [m["content"] for m in second["messages"][-2:]][1] == "Not run: this response's max_tool_calls was reached."
    assert "tools" not in second


def test_without_a_key_web_search_is_stripped(gateway, upstream):
    upstream.clear()
    openai_client(gateway).responses.create(model="demo-model", input="plain", tools=[WEB_SEARCH, EXEC])
    assert [t["function"]["name"] for t in upstream.requests()[-1]["tools"]] == ["exec_command"]


def test_other_streams_flow_while_a_search_is_in_flight(search_gateway, brave):
    _, handler = brave
    handler.hold = threading.Event()
    client = openai_client(search_gateway)
    done = {}

    def searching():
        done["search"] = client.responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH])

    t = threading.Thread(target=searching)
    t.start()
    try:
        wait_until(lambda: handler.queries, what="the search reaching Brave")  # it now waits there
        quick = list(client.responses.create(model="demo-model", input="words: 20\nnoreason", stream=True))
        assert quick[-1].type == "response.completed"
        assert "search" not in done and t.is_alive()  # served while the search was still in flight
    finally:
        handler.hold.set()
    t.join(30)
    assert done["search"].status == "completed"


@pytest.mark.codex
def test_codex_sees_web_search_items(search_gateway, codex_bin, tmp_path):
    codex = Codex.at(codex_bin, tmp_path)
    codex.configure(search_gateway.base_url)
    run = codex.exec(SEARCH_PROMPT)
    assert run.returncode == 0, run.output
    assert "The tool returned: snippet & text 3" in run.stdout


def test_search_loop_after_a_fallback_stays_on_the_upstream_that_answered(upstream, gateway_factory, brave):
    url, _ = brave
    entries = [{"name": "down", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
               {"name": "demo", "base_url": upstream.base_url, "max_tokens_field": "max_completion_tokens"}]
    gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                         "--set", "resp2chat_upstreams=" + json.dumps(entries),
                         env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
    upstream.clear()
    resp = openai_client(gw).responses.create(model="demo-model", input=SEARCH_PROMPT, tools=[WEB_SEARCH],
                                           max_output_tokens=200)
    assert [o.type for o in resp.output] == ["reasoning", "web_search_call", "reasoning", "message"]
    first, second = upstream.requests()[-2:]  # both rounds went to demo, each with demo's own lowering
    assert first["max_completion_tokens"] == second["max_completion_tokens"] == 200
    assert second["messages"][-1]["role"] == "tool"


class _Rounds(QuietHandler):
    """A chat backend that answers each round as ``answers`` says, in order: ("json", a whole
    ``chat.completion``: a backend that ignores ``stream``) or ("sse", chunks); ``bodies``: the
    chat requests it got."""

    answers: list = []
    bodies: list = []

    def do_POST(self):
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        how, what = self.answers[len(self.bodies) - 1]
        if how == "json":
            send_json(self, 200, what)
        elif how == "json-close":  # (the same, saying ``connection: close``: whole all the same)
            send_json(self, 200, what, close=True)
        else:
            send_sse(self, chat_sse(*what))


def _search_call(call_id: str, query: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "web_search",
                                                            "arguments": json.dumps({"query": query})}}


SEARCH_JSON = chat_completion({"content": None, "tool_calls": [_search_call("call_j1", "json round")]}, "tool_calls",
                              completion_tokens=5)
ANSWER_JSON = chat_completion({"content": "Found it."}, "stop", completion_tokens=3)
SEARCH_SSE = [chat_chunk({"role": "assistant", "tool_calls": [tool_call(0, "call_s1", "web_search",
                                                                        '{"query": "sse round"}')]}),
              chat_chunk(finish="tool_calls"),
              chat_chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})]


@pytest.mark.parametrize("answers, queries, fallback", [
    ([("json", SEARCH_JSON), ("json", ANSWER_JSON)], ["json round"], False),  # round 1 answered whole
    ([("json", SEARCH_JSON), ("json", ANSWER_JSON)], ["json round"], True),  # … by a fallback upstream
    ([("sse", SEARCH_SSE), ("json", SEARCH_JSON), ("json", ANSWER_JSON)], ["sse round", "json round"], False),
    ([("json-close", SEARCH_JSON), ("json-close", ANSWER_JSON)], ["json round"], False),  # … connection: close
], ids=["first-round", "first-round-after-a-fallback", "later-round", "closing-the-connection"])
def test_a_round_answered_with_json_runs_the_gateways_calls(gateway_factory, brave, answers, queries, fallback):
    """A backend that ignores ``stream`` answers a round of the loop with one JSON
    ``chat.completion``: the loop reads it as it reads a stream. Its call of the gateway's
    ``web_search`` runs (a Brave query, a web_search_call item, the next round asked with the
    results), never reaching the client as a function_call it cannot run; the turn ends with
    the last round's answer, its usage the rounds' together. (``fallback``: the first upstream
    is down, the answer's first round goes through the walk of the candidates.)"""
    url, handler = brave
    backend = type("Rounds", (_Rounds,), {"answers": answers, "bodies": []})
    with LocalServer(backend) as server:
        upstreams = [{"name": "down", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
                     {"name": "rounds", "base_url": server.url + "/v1"}]
        gw = gateway_factory(*(("http://127.0.0.1:9", "--set", "resp2chat_upstreams=" + json.dumps(upstreams))
                               if fallback else (server.url,)), "--set", "resp2chat_max_replay_entries=0",
                             env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
        for stream in (False, True):
            handler.queries, backend.bodies = [], []
            r = requests.post(f"{gw.base_url}/responses", timeout=30, json={
                "model": "demo-model", "input": "search", "tools": [WEB_SEARCH], "stream": stream})
            assert r.status_code == 200, r.text
            final = parse_sse(r.content)[-1]["response"] if stream else r.json()
            assert final["status"] == "completed", final
            assert [o["type"] for o in final["output"]] == ["web_search_call"] * len(queries) + ["message"], final
            assert [o["action"]["query"] for o in final["output"][:-1]] == queries
            assert final["output"][-1]["content"][0]["text"] == "Found it."
            assert [q["q"] for q in handler.queries] == queries
            assert len(backend.bodies) == len(answers)
            for asked, (how, what) in zip(backend.bodies[1:], answers):  # each round's results go to the next
                call = (what["choices"][0]["message"] if how != "sse" else what[0]["choices"][0]["delta"])
                assistant, tool = asked["messages"][-2:]
                assert assistant["tool_calls"][0]["id"] == call["tool_calls"][0]["id"]
                assert tool["role"] == "tool" and tool["tool_call_id"] == call["tool_calls"][0]["id"]
                assert tool["content"].startswith("Web search results for: ")
            usage = final["usage"]  # the last round's prompt, every round's completion
            completion = [(what if how != "sse" else what[-1])["usage"]["completion_tokens"] for how, what in answers]
            assert usage["input_tokens"] == 20 and usage["output_tokens"] == sum(completion), usage


def _search_turns(gateway_factory, brave, answers: list, streams=(True,)) -> list[tuple[list, list]]:
    """A gateway before a ``_Rounds`` backend that answers each turn's rounds with ``answers``:
    a search turn per ``stream`` of ``streams``, each (its events: a client that did not stream
    gets its Response as the last, the chat requests its rounds sent)."""
    url, handler = brave
    backend = type("Rounds", (_Rounds,), {"answers": answers, "bodies": []})
    turns = []
    with LocalServer(backend) as server:
        gw = gateway_factory(server.url, "--set", "resp2chat_max_replay_entries=0",
                             env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
        for stream in streams:
            handler.queries, backend.bodies = [], []
            r = requests.post(f"{gw.base_url}/responses", timeout=120, json={
                "model": "demo-model", "input": "search", "tools": [WEB_SEARCH], "stream": stream})
            assert r.status_code == 200, r.text[:300]
            turns.append((parse_sse(r.content) if stream else [{"response": r.json()}], backend.bodies))
    return turns


LONG = "".join(f"word{i} " for i in range(200_000))  # 1.7 MB: past the 1 MiB an error body is read up to


def test_rounds_answered_with_json_past_1_mib_are_read_whole(gateway_factory, brave):
    """A backend that ignores ``stream`` answers a round with a JSON body past 1 MiB: round 1 a
    call of the gateway's ``web_search`` with 1.7 MB of arguments (besides its query), round 2 an
    answer of 1.7 MB. Each is read whole (the relay's bound for a 200 JSON body is an answer's,
    32 MiB): the search runs, the next round gets the call back whole, the answer is the turn's.
    Before, each body was cut at 1 MiB and read as garbage: the turn failed at round 1."""
    _, handler = brave
    call = {"id": "call_big", "type": "function",
            "function": {"name": "web_search", "arguments": json.dumps({"query": "big round", "why": LONG})}}
    answers = [("json", chat_completion({"content": None, "tool_calls": [call]}, "tool_calls", completion_tokens=5)),
               ("json", chat_completion({"content": LONG}, "stop", completion_tokens=3))]
    ((events, bodies),) = _search_turns(gateway_factory, brave, answers)
    final = events[-1]["response"]
    assert final["status"] == "completed", final["error"]
    assert [o["type"] for o in final["output"]] == ["web_search_call", "message"]
    assert final["output"][0]["action"]["query"] == "big round"
    assert final["output"][1]["content"][0]["text"] == LONG
    assert [q["q"] for q in handler.queries] == ["big round"]
    assistant = bodies[1]["messages"][-2]
    assert assistant["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]


BIG = "".join(f"word{i} \u00e9 \"q\"\n" for i in range(300_000))  # 5.9 MiB as JSON: past the 4 MiB of one event
THOUGHT = "".join(f"step{i}; " for i in range(200_000))  # 2.2 MiB


def test_a_round_answered_with_json_past_one_events_bound_reaches_the_client_whole(gateway_factory, brave):
    """At the default settings (``max_upstream_event_mb`` 4), the round after a search is
    answered with one JSON body of 8 MiB (``stream`` ignored): 5.9 MiB of text, 2.2 MiB of
    reasoning. An answer is bounded at 8 × 4 MiB, not at one event's 4 MiB: the loop passes it
    on as several events, each within the bound, and the client gets both whole, in a completed
    response, streamed or not. Before, the loop wrote the answer's deltas as one event and the
    translator refused it: ``upstream_event_too_large``."""
    search = chat_completion({"content": None, "tool_calls": [_search_call("call_b1", "big answer")]}, "tool_calls",
                             completion_tokens=5)
    answer = json.dumps(chat_completion({"reasoning_content": THOUGHT, "content": BIG}, "stop", completion_tokens=3),
                        ensure_ascii=False).encode()
    assert 8 << 20 < len(answer) < 9 << 20
    streamed, whole = _search_turns(gateway_factory, brave, [("json", search), ("json", answer)], (True, False))
    for events, bodies in (streamed, whole):
        final = events[-1]["response"]
        assert final["status"] == "completed", final["error"]
        assert [o["type"] for o in final["output"]] == ["web_search_call", "reasoning", "message"]
        assert final["output"][0]["action"]["query"] == "big answer" and len(bodies) == 2
        assert final["output"][1]["content"][0]["text"] == THOUGHT
        text = final["output"][2]["content"][0]["text"]
        assert len(text) == len(BIG) and text == BIG
    deltas = [e["delta"] for e in streamed[0] if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == BIG


def test_a_round_answered_with_a_json_error_fails_the_turn_with_it(gateway_factory, brave):
    """A later round answered 200 with a JSON error object (no completion): not the loop's to
    read; the turn fails with the backend's error, as a turn without the loop does."""
    url, _ = brave
    error = {"error": {"message": "the model is overloaded now", "type": "server_error"}}
    backend = type("Rounds", (_Rounds,), {"answers": [("sse", SEARCH_SSE), ("json", error)], "bodies": []})
    with LocalServer(backend) as server:
        gw = gateway_factory(server.url, "--set", "resp2chat_max_replay_entries=0",
                             env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
        r = requests.post(f"{gw.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": "search", "tools": [WEB_SEARCH], "stream": True})
        end = parse_sse(r.content)[-1]
        assert end["type"] == "response.failed", end
        assert "the model is overloaded now" in end["response"]["error"]["message"], end
        assert [o["type"] for o in end["response"]["output"]] == ["web_search_call"]
        assert len(backend.bodies) == 2


def _sdk_turns(gateway_factory, brave, answers: list, tools: list, text: str):
    """A gateway before a ``_Rounds`` backend that answers each turn's rounds with ``answers``,
    and the openai SDK's turn through it, streamed then not: each (its final Response, the
    searches it ran, the backend), as it comes."""
    url, handler = brave
    backend = type("Rounds", (_Rounds,), {"answers": answers, "bodies": []})
    with LocalServer(backend) as server:
        gw = gateway_factory(server.url, "--set", "resp2chat_max_replay_entries=0",
                             env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
        client = openai_client(gw)
        for stream in (True, False):
            handler.queries = []
            kw = dict(model="demo-model", input=text, tools=tools)
            final = list(client.responses.create(stream=True, **kw))[-1].response if stream \
                else client.responses.create(**kw)
            yield final, handler.queries, backend


READ_FILE = {"type": "function", "name": "read_file",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}


def test_client_calls_sharing_an_index_and_an_id_around_the_search_call_reach_the_client_as_two(gateway_factory, brave):
    """A backend that numbers every call 0 and sends one id for two calls streams the client's
    exec_command "A", the gateway's web_search, the client's read_file "B", each in chunks of
    its own, then the same three in one chunk. The search is held (the client has calls to run
    first: the turn ends), and the client (the openai SDK, streamed or not) gets both calls with
    their names and arguments. Before: one function_call exec_command with "AB" (read_file's
    naming delta, without the search call before it, read as more of exec_command)."""
    a = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "exec_command", "arguments": ""}}
    s = {"index": 0, **_search_call("call_s", "between")}
    b = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "read_file", "arguments": ""}}
    own = [chat_chunk({"role": "assistant", "tool_calls": [a]}),
           chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"cmd": "A"}'}}]}),
           chat_chunk({"tool_calls": [s]}), chat_chunk({"tool_calls": [b]}),
           chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path": "B"}'}}]})]
    one = [chat_chunk({"role": "assistant", "tool_calls": [
        {**a, "function": {"name": "exec_command", "arguments": '{"cmd": "A"}'}}, s,
        {**b, "function": {"name": "read_file", "arguments": '{"path": "B"}'}}]})]
    end = [chat_chunk(finish="tool_calls"),
           chat_chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})]
    for chunks in (own, one):
        for final, queries, _ in _sdk_turns(gateway_factory, brave, [("sse", chunks + end)] * 2,
                                            [WEB_SEARCH, EXEC, READ_FILE], "run both"):
            assert final.status == "completed", final.error
            assert [(o.type, o.call_id, o.name, o.arguments) for o in final.output] == [
                ("function_call", "call_a", "exec_command", '{"cmd": "A"}'),
                ("function_call", "call_a", "read_file", '{"path": "B"}')]
            assert queries == []  # (the client's calls first: the search is not run)


def test_a_calls_arguments_before_its_name_go_where_the_name_says(gateway_factory, brave):
    """A backend that sends a call's id and arguments before its name: the gateway's web_search
    on index 0, then the client's exec_command on index 0 (a new id), then the client's
    read_file whose arguments come before its name on index 1, streamed in chunks of their own
    or answered in one JSON body. Whose call it is comes with the name: the search's arguments
    never reach the client, and the client (the openai SDK, streamed or not) gets both its calls
    with their own arguments whole. Before: the search's first arguments went on and became
    exec_command's ('{"query": {"cmd": "A"}')."""
    entries = [{"index": 0, "id": "call_s", "type": "function", "function": {"arguments": '{"query": '}},
               {"index": 0, "function": {"name": "web_search", "arguments": '"between"}'}},
               {"index": 0, "id": "call_a", "type": "function", "function": {"name": "exec_command", "arguments": ""}},
               {"index": 0, "function": {"arguments": '{"cmd": "A"}'}},
               {"index": 1, "function": {"arguments": '{"path": '}},
               {"index": 1, "id": "call_b", "type": "function", "function": {"name": "read_file", "arguments": '"B"}'}}]
    streamed = [chat_chunk({"role": "assistant", "tool_calls": [entries[0]]}),
                *[chat_chunk({"tool_calls": [e]}) for e in entries[1:]], chat_chunk(finish="tool_calls"),
                chat_chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})]
    whole = chat_completion({"content": None, "tool_calls": entries}, "tool_calls", completion_tokens=4)
    for answer in (("sse", streamed), ("json", whole)):
        for final, queries, _ in _sdk_turns(gateway_factory, brave, [answer] * 2, [WEB_SEARCH, EXEC, READ_FILE],
                                            "run both"):
            assert final.status == "completed", final.error
            assert [(o.type, o.call_id, o.name, o.arguments) for o in final.output] == [
                ("function_call", "call_a", "exec_command", '{"cmd": "A"}'),
                ("function_call", "call_b", "read_file", '{"path": "B"}')], answer[0]
            assert queries == []  # (the client's calls first: the search is not run)


def test_a_call_that_never_gets_a_name_does_not_stop_the_search(gateway_factory, brave):
    """A round with the gateway's web_search and a call whose name never comes (its id and
    arguments only), streamed or in one JSON body: the translator reads no call without a name,
    so neither does the loop: the search runs, the next round's history has the search call
    alone, and the client (the openai SDK) gets the search and the answer. Before: read as a
    client's call, it ended the turn at round 1 with no output at all."""
    search = {"index": 0, **_search_call("call_s", "nameless round")}
    nameless = {"index": 1, "id": "call_x", "type": "function", "function": {"arguments": '{"cmd": "ls"}'}}
    streamed = [chat_chunk({"role": "assistant", "tool_calls": [search]}), chat_chunk({"tool_calls": [nameless]}),
                chat_chunk(finish="tool_calls"),
                chat_chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})]
    whole = chat_completion({"content": None, "tool_calls": [nameless, search]}, "tool_calls", completion_tokens=4)
    for answer in (("sse", streamed), ("json", whole)):
        for final, queries, backend in _sdk_turns(gateway_factory, brave, [answer, ("json", ANSWER_JSON)] * 2,
                                                  [WEB_SEARCH, EXEC], "search"):
            assert final.status == "completed", final.error
            assert [o.type for o in final.output] == ["web_search_call", "message"], answer[0]
            assert final.output[0].action.query == "nameless round" and final.output_text == "Found it."
            assert [q["q"] for q in queries] == ["nameless round"]
            assistant, tool = backend.bodies[-1]["messages"][-2:]
            assert [c["id"] for c in assistant["tool_calls"]] == ["call_s"]
            assert tool["tool_call_id"] == "call_s"


class _SearchesAlways(QuietHandler):
    """A chat backend whose model calls web_search in every round, offered or not (a model that
    ignores the tools it is given), until it reads that a call was not run; then it answers with
    what it read."""

    bodies: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        type(self).bodies.append(body)
        results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        if not any("Not run: " in r for r in results):
            call = {"id": f"call_{len(results)}", "type": "function", "function": {
                "name": "web_search", "arguments": json.dumps({"query": f"q{len(results)}"})}}
            send_json(self, 200, chat_completion({"content": None, "tool_calls": [call]}, "tool_calls"))
        else:
            send_json(self, 200, chat_completion({"content": " | ".join(results)}, "stop"))


@pytest.mark.parametrize("bound", ["max_tool_calls", "max_web_search_rounds"])
def test_a_search_past_the_bounds_is_a_failed_web_search_call_and_the_turn_ends(tmp_path, brave, bound):
    """Once a turn's ``max_tool_calls`` or ``max_web_search_rounds`` is spent, the next round offers
    no web_search; a model that calls it anyway gets no ``function_call`` of a function the client
    never declared (web_search is the gateway's): the call is a ``web_search_call`` that failed,
    no search runs, and the turn ends there, ``completed`` — the JSON answer, the stream and the
    stored Response alike (as a hosted MCP call past them: test_mcp_e2e.py). Before: a
    function_call ``web_search`` reached the client, which has no such function."""
    url, handler = brave
    extra = {"max_tool_calls": 1} if bound == "max_tool_calls" else {}
    with LocalServer(_SearchesAlways) as backend:
        gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                           "--set", "resp2chat_max_web_search_rounds=2",
                           env={"BRAVE_SEARCH_API_KEY": BRAVE_KEY, "RESP2CHAT_BRAVE_BASE_URL": url})
        try:
            ran = 1 if bound == "max_tool_calls" else 2
            for stream in (False, True):
                _SearchesAlways.bodies, handler.queries = [], []
                body = {"model": "demo-model", "input": "look it up", "tools": [WEB_SEARCH], "stream": stream,
                        **extra}
                types, answers = ended_at_a_bound(gw, body)
                if stream:
                    assert types.count("response.web_search_call.completed") == ran, types
                    assert types.count("response.web_search_call.searching") == ran, types  # (none for the refused)
                    assert types.count("response.web_search_call.in_progress") == ran + 1, types
                for answer in answers:
                    output = answer["output"]
                    assert [o["type"] for o in output] == ["web_search_call"] * (ran + 1), output
                    assert [o["status"] for o in output] == ["completed"] * ran + ["failed"], output
                    assert [o["action"]["query"] for o in output] == [f"q{n}" for n in range(ran + 1)]
                assert [q["q"] for q in handler.queries] == [f"q{n}" for n in range(ran)]  # the last one: no search
                # the backend was asked once per round that ran a search, and once more: no round after the refused call
                assert len(_SearchesAlways.bodies) == ran + 1
                assert not any(t["function"]["name"] == "web_search" for t in _SearchesAlways.bodies[-1].get("tools") or ())
            # the next turn's history: the searches that ran, and the one that did not, as such
            _SearchesAlways.bodies = []
            post_turn(gw, {"model": "demo-model", "input": "and?", "previous_response_id": answers[0]["id"],
                           **extra})
            history = json.dumps(_SearchesAlways.bodies[0]["messages"])
            assert f"(searched the web for: q{ran - 1})" in history and f"(a web search for: q{ran} failed)" in history
        finally:
            gw.stop()
