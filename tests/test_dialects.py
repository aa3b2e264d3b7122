"""Upstream dialect matrix: every backend's chunk shapes, through the translator and a real mitmdump.

Each fixture in tests/fixtures/dialects/ is a pair (see the README there):

    <name>.sse            the upstream response body, byte for byte as that server sends it
    <name>.expected.json  which backend and shapes it covers, the HTTP status and content type
                          the server answers with, and the Responses events the client must get,
                          as a compact projection (``project`` below)

Three ways each fixture runs, all compared against the same projection:

1. the translator, whole (``test_fixture``), also validated by the openai SDK's event types;
2. the translator, cut at random places (``test_any_split_same_events``, hypothesis) and one
   byte at a time: byte-identical output;
3. a real ``mitmdump -s addon/resp2chat.py`` in front of a tiny upstream that replays the
   fixture verbatim with chunked transfer encoding, read by the openai SDK
   (``client.responses.create(stream=True)``): ``test_end_to_end_sdk``.

And through the other two readers of a chat stream (resp2chat_core/chatstream.py is the one
reader all three share):

4. the web-search round filter (``websearch.SearchLoop``) in front of the translator, in a
   round that calls no search: byte-identical output to the translator alone
   (``test_behind_the_web_search_filter``);
5. mitmweb's "resp2chat upstream" contentview: renders, and shows every tool call with its id
   and streamed arguments (``test_contentview``).

Set RESP2CHAT_REGEN_DIALECTS=1 to rewrite the ``events`` of every expected file from the
translator's current output (then review the diff: the expected files are the specification).
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    CREATED, DELTAS, FIXTURES, RESP_ID, TERMINAL, LocalServer, QuietHandler, check_sdk, check_stream, openai_client,
    parse_sse, start_gateway,
)
from resp2chat_core import toolloop, websearch
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.think import ThinkSplitter
from resp2chat_core.translator import Translator
from resp2chat_core.turn import begin_turn

DIR = FIXTURES / "dialects"
NAMES = sorted(p.name.removesuffix(".sse") for p in DIR.glob("*.sse"))
REGEN = os.environ.get("RESP2CHAT_REGEN_DIALECTS") == "1"


def _fn(name: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "name": name, "description": name, "strict": False,
            "parameters": {"type": "object", "properties": props, "required": required}}


TOOLS = [
    _fn("exec_command", {"cmd": {"type": "string"}, "workdir": {"type": "string"}}, ["cmd"]),
    _fn("get_weather", {"city": {"type": "string"}}, ["city"]),
    _fn("add", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _fn("multiply", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _fn("get_goal", {}, []),
]


def request_body(name: str, summary: bool = False) -> dict:
    """What the client sends: the model name selects the fixture on the replay upstream.
    ``summary``: it asks for a reasoning summary (as Codex does): reasoning streams as the
    reasoning item's summary, else as its content (translator.py)."""
    body = {"model": name, "input": "hello", "tools": TOOLS, "stream": True}
    return {**body, "reasoning": {"summary": "auto"}} if summary else body


def meta(name: str) -> dict:
    return json.loads((DIR / f"{name}.expected.json").read_text())


def raw(name: str) -> bytes:
    return (DIR / f"{name}.sse").read_bytes()


def translator(name: str, summary: bool = False) -> Translator:
    turn = begin_turn(json.dumps(request_body(name, summary)).encode(), LoweringOptions(), RESP_ID, CREATED)
    turn.ctx.think = meta(name).get("think", "auto")
    return turn.translator()


def translate(name: str, pieces: list[bytes] | None = None, summary: bool = False) -> bytes:
    """Run a fixture the way the addon does: error status, JSON body, or a stream fed in pieces."""
    http = meta(name)["http"]
    tr = translator(name, summary)
    body = raw(name)
    if http["status"] != 200:
        out = tr.fail_upstream(http["status"], body)
    elif "json" in http["content_type"]:
        out = tr.translate_json(body)
    else:
        out = b"".join(tr.feed(p) for p in (pieces if pieces is not None else [body])) + tr.finish()
    assert tr.done
    return out


# --- the projection --------------------------------------------------------------------------


def _call_id(call_id: str, suffix: str) -> str:
    # (the translator's: call_<the response id's first 16 characters after resp_>_<output index>)
    return "<generated>" if suffix and re.fullmatch(rf"call_{re.escape(suffix[:16])}_\d+", call_id) else call_id


def _item(item: dict, suffix: str) -> dict:
    kind = item.get("type")
    if kind == "message":
        return {"type": kind, "text": "".join(p.get("text") or "" for p in item.get("content") or [])}
    if kind == "reasoning":  # (its text: as content, or as a summary when the request asked for one)
        where = "content" if "content" in item else "summary"
        return {"type": kind, where: "".join(p.get("text") or "" for p in item.get(where) or [])}
    out = {"type": kind, "name": item.get("name"), "call_id": _call_id(item.get("call_id") or "", suffix)}
    if kind == "function_call":
        out["arguments"] = item.get("arguments")
    elif kind == "custom_tool_call":
        out["input"] = item.get("input")
    if item.get("namespace"):
        out["namespace"] = item["namespace"]
    return out


def project(events: list[dict], messages: bool = True) -> list[list]:
    """The compact, order-preserving view of a Responses stream that expected files hold.

    - ``response.`` is dropped from every type; ids are left out (they embed the response id);
      a call_id the gateway generated reads ``<generated>``;
    - a run of delta events of one type for one item becomes one entry with the joined text
      (how many deltas a run has is the upstream's chunking, not a property of the dialect);
    - ``in_progress`` after the first is dropped (keep-alive events of the relay);
    - items are ``{type, text}`` (message), ``{type, summary}`` (reasoning), ``{type, name,
      call_id, arguments}`` (function_call) and the like;
    - the terminal event is ``[type, {status, usage: [input, cached, output, reasoning, total]
      or null, error: [code, message] or null, incomplete: reason or null}]``; with
      ``messages=False`` the error message is left out.
    """
    out: list[list] = []
    suffix = ""
    seen_progress = False
    for e in events:
        t = e["type"]
        short = t.removeprefix("response.")
        if t == "response.created":
            suffix = e["response"]["id"].removeprefix("resp_")
            out.append([short])
        elif t == "response.in_progress":
            if not seen_progress:
                out.append([short])
            seen_progress = True
        elif t in DELTAS:
            if out and out[-1][0] == short and out[-1][1] == e["output_index"]:
                out[-1][2] += e["delta"]
            else:
                out.append([short, e["output_index"], e["delta"]])
        elif t in ("response.output_item.added", "response.output_item.done"):
            out.append([short, e["output_index"], _item(e["item"], suffix)])
        elif t in ("response.output_text.done", "response.reasoning_summary_text.done",
                   "response.reasoning_text.done"):
            out.append([short, e["output_index"], e["text"]])
        elif t == "response.function_call_arguments.done":
            out.append([short, e["output_index"], e.get("name"), e["arguments"]])
        elif t == "response.custom_tool_call_input.done":
            out.append([short, e["output_index"], e["input"]])
        elif t in TERMINAL:
            r = e["response"]
            u = r.get("usage")
            usage = None if not u else [
                u["input_tokens"], (u.get("input_tokens_details") or {}).get("cached_tokens"),
                u["output_tokens"], (u.get("output_tokens_details") or {}).get("reasoning_tokens"),
                u["total_tokens"]]
            err = r.get("error")
            error = None if not err else ([err["code"], err["message"]] if messages else [err["code"]])
            inc = (r.get("incomplete_details") or {}).get("reason")
            out.append([short, {"status": r["status"], "usage": usage, "error": error, "incomplete": inc}])
        else:
            out.append([short, e.get("output_index")])
    return out


def as_summary(projection: list[list]) -> list[list]:
    """A projection of a turn that did not ask for a reasoning summary, as the same turn asking
    for one gives it: each reasoning item's content is its summary, with the summary's events."""
    reasoning = {e[1] for e in projection if e[0] == "output_item.added" and e[2]["type"] == "reasoning"}
    names = {"content_part.added": "reasoning_summary_part.added", "content_part.done": "reasoning_summary_part.done",
             "reasoning_text.delta": "reasoning_summary_text.delta", "reasoning_text.done": "reasoning_summary_text.done"}
    out = []
    for entry in projection:
        if len(entry) > 1 and isinstance(entry[1], int) and entry[1] in reasoning:
            if entry[0] in names:
                entry = [names[entry[0]], *entry[1:]]
            elif entry[0].startswith("output_item."):
                entry = [entry[0], entry[1], {"type": "reasoning", "summary": entry[2]["content"]}]
        out.append(entry)
    return out


def _without_messages(projection: list[list]) -> list[list]:
    out = []
    for entry in projection:
        if entry[0] in ("completed", "incomplete", "failed") and entry[1]["error"]:
            entry = [entry[0], {**entry[1], "error": entry[1]["error"][:1]}]
        out.append(entry)
    return out


def _write_expected(name: str, events: list[list]) -> None:
    doc = meta(name)
    head = {k: v for k, v in doc.items() if k != "events"}
    text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    lines = ",\n  ".join(json.dumps(e, ensure_ascii=False) for e in events)
    (DIR / f"{name}.expected.json").write_text(f'{text},\n "events": [\n  {lines}\n ]\n}}\n')


# --- 1. the translator -----------------------------------------------------------------------


def test_every_fixture_has_expectations():
    assert len(NAMES) >= 30
    for name in NAMES:
        doc = meta(name)
        assert doc["backend"] and doc["covers"] and doc["http"]["status"] in (200, 400, 429, 500, 503)
        assert REGEN or doc["events"], f"{name}: no expected events (run with RESP2CHAT_REGEN_DIALECTS=1)"


@pytest.mark.parametrize("name", NAMES)
def test_fixture(name):
    out = translate(name)
    evs = check_stream(out)  # (every event also as the Open Responses spec requires: helpers.check_spec)
    got = project(evs)
    if REGEN:
        _write_expected(name, got)
    assert got == meta(name)["events"]
    check_sdk(evs)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_asking_for_a_summary(name):
    """The same backend stream, for a request that asks for a reasoning summary (Codex): the
    reasoning streams as the item's summary, with the summary's events; nothing else changes."""
    evs = check_stream(translate(name, summary=True))
    assert project(evs) == as_summary(meta(name)["events"])
    check_sdk(evs)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([n for n in NAMES if meta(n)["http"] == {"status": 200,
                                                                      "content_type": "text/event-stream"}]),
       data=st.data())
def test_any_split_same_events(name, data):
    body = raw(name)
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(body) - 1), max_size=40, unique=True))
    points = sorted(cuts)
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]
    assert translate(name, pieces) == translate(name)


@pytest.mark.parametrize("name", [n for n in NAMES if meta(n)["http"]["content_type"] == "text/event-stream"])
def test_byte_at_a_time_same_events(name):
    body = raw(name)
    assert translate(name, [body[i:i + 1] for i in range(len(body))]) == translate(name)


# --- 4. behind the web-search round filter ---------------------------------------------------

_STREAMED = [n for n in NAMES if meta(n)["http"] == {"status": 200, "content_type": "text/event-stream"}]


def _odd_pieces(name: str, body: bytes) -> list[bytes]:
    rng = random.Random(name)  # odd, repeatable boundaries: mid-line, mid-UTF-8, mid-CRLF
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, len(body) // 23 + 1)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


@pytest.mark.parametrize("name", _STREAMED)
def test_behind_the_web_search_filter(name):
    """A web-search turn whose round calls no search: the translator behind the round filter
    (as relay/exchange.py runs it: each read through ``loop.feed``, then the round's end) gives
    byte for byte what it gives alone. (JSON bodies and HTTP errors never pass the filter.)"""
    body = raw(name)
    loop = websearch.SearchLoop(json.dumps({"model": name, "messages": []}).encode(), max_rounds=3)
    tr = translator(name)
    out = b"".join(tr.feed(loop.feed(piece)) for piece in _odd_pieces(name, body))
    tail, step = loop.end_round(ok=True)
    assert isinstance(step, toolloop.Finish)
    out += tr.feed(tail) + tr.feed(step.tail) + tr.finish()
    assert out == translate(name)


# --- 5. the contentview --------------------------------------------------------------------------


def _view_calls(text: str) -> list[str]:
    """The tool-call runs of the "resp2chat upstream" view, joined per call (a call's lines may
    be interleaved with another's)."""
    calls: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'(tool_call\[\d+\]): (".*")', line)
        if m:
            calls[m[1]] = calls.get(m[1], "") + json.loads(m[2])
    return list(calls.values())


@pytest.mark.parametrize("name", NAMES)
def test_contentview(name):
    """mitmweb's view of the backend's stream, as a recorded flow holds it: it renders (mitmproxy
    shows a traceback when an explicitly chosen view raises) and shows each call the translator
    made, with the backend's id and the argument text as it streamed."""
    from mitmproxy import contentviews
    from mitmproxy.test import taddons, tflow

    from resp2chat_io import views

    views.register()
    flow = tflow.tflow(resp=True)
    answer = translate(name)
    flow.response.content = answer
    flow.metadata[views.META] = {"upstream_sse": raw(name).decode("utf-8", "replace")}
    with taddons.context():
        shown = contentviews.prettify_message(flow.response, flow, view_name="resp2chat upstream")
    assert shown.view_name == "resp2chat upstream" and not shown.text.startswith("Couldn't parse"), shown.text
    events = meta(name)["events"]
    calls = _view_calls(shown.text)
    for kind, index, item in (e for e in events if e[0] == "output_item.done"):
        if item["type"] != "function_call":
            continue
        call_id = None if item["call_id"] == "<generated>" else item["call_id"]
        head = f"{item['name']} id={call_id} args="
        args = "".join(e[2] for e in events if e[0] == "function_call_arguments.delta" and e[1] == index)
        assert any(head in c and c.replace(head, "") == args for c in calls), (head, args, calls)


# --- focused checks the projection alone would not make obvious ------------------------------


def test_think_open_without_tag_in_auto_mode():
    """Unconfigured, a stream that starts inside thinking streams as text until ``</think>``;
    the text cannot be unsent, so that message closes there and the answer is its own message."""
    tr = translator("think-open-no-tag")
    tr.ctx.think = "auto"
    tr = Translator(tr.ctx)
    evs = check_stream(tr.feed(raw("think-open-no-tag")) + tr.finish())
    items = [e["item"] for e in evs if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in items] == ["message", "message"]
    assert items[0]["content"][0]["text"] == "Okay, the user says hi.\n"
    assert items[1]["content"][0]["text"] == "Hi there!"
    assert "</think>" not in json.dumps(evs)
    check_sdk(evs)


def test_think_off_leaves_content_alone():
    tr = translator("think-tags")
    tr.ctx.think = "off"
    tr = Translator(tr.ctx)
    evs = check_stream(tr.feed(raw("think-tags")) + tr.finish())
    (item,) = [e["item"] for e in evs if e["type"] == "response.output_item.done"]
    assert item["content"][0]["text"].startswith("<think>\nOkay")


def test_arguments_stream_live():
    """Argument deltas leave the translator as they arrive, before the call is finished."""
    tr = translator("vllm-reasoning-content-tools")
    body = raw("vllm-reasoning-content-tools")
    cut = body.index(b'"arguments":" -la"')
    live = parse_sse(tr.feed(body[:cut]))
    assert [e["delta"] for e in live if e["type"] == "response.function_call_arguments.delta"] == ['{"cmd": "', "ls"]


@pytest.mark.parametrize("chunks,expected", [
    (["<think>a</think>b"], [("reasoning", "a"), ("text", "b")]),
    (["<", "t", "h", "i", "n", "k", ">", "x", "<", "/", "think", ">", " y"], [("reasoning", "x"), ("text", "y")]),
    (["  \n<think>\n\n", "r1\n\n", "r2\n", "</think>\n\n\nA"], [("reasoning", "r1"), ("reasoning", "\n\nr2"),
                                                               ("text", "A")]),
    (["<thinking>"], [("text", "<thinking>")]),
    (["hi <think> there"], [("text", "hi <think> there")]),
    (["plain", " </think>", " answer"], [("text", "plain"), ("text", " "), ("break", ""), ("text", "answer")]),
    (["<th"], [("text", "<th")]),
    (["<think>unclosed <"], [("reasoning", "unclosed"), ("reasoning", " <")]),
])
def test_think_splitter_units(chunks, expected):
    sp = ThinkSplitter("auto")
    got: list[tuple[str, str]] = []
    for c in chunks:
        got += sp.feed(c)
    got += sp.flush()
    assert got == expected


def _split_think(mode: str, deltas: list[str]) -> list[tuple[str, str]]:
    """The splitter's pieces for these deltas, runs of one kind joined (how a client reads them)."""
    sp = ThinkSplitter(mode)
    out: list[tuple[str, str]] = []
    for kind, text in [p for d in deltas for p in sp.feed(d)] + sp.flush():
        if out and kind == out[-1][0] and kind != "break":
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


_THINK_BITS = st.sampled_from(["<think>", "</think>", "<", "</", "<th", "</thi", "think>", ">", "/", " ", "\n",
                               "a", "b c", "<thinking>"])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(mode=st.sampled_from(["auto", "open"]), bits=st.lists(_THINK_BITS, max_size=12), data=st.data())
def test_property_think_split_does_not_depend_on_where_the_deltas_cut(mode, bits, data):
    """The same content, cut into deltas anywhere, reads back as the same reasoning and text
    (the module's promise: the answer depends on the content, not on how it was cut)."""
    text = "".join(bits)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=8))) if len(text) > 1 else []
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert _split_think(mode, deltas) == _split_think(mode, [text] if text else [])


def test_think_a_second_opening_tag_is_dropped_wherever_the_stream_cuts_it():
    """``<think><think>`` (found by the property test above): one delta gave no reasoning, while
    cut before the second ``<`` it gave a reasoning item ``<think>``."""
    for deltas in (["<think><think>x</think>y"], ["<think><", "think>x</think>y"], ["<think>", "<", "think>x</think>y"]):
        assert _split_think("auto", deltas) == [("reasoning", "x"), ("text", "y")], deltas


# --- 3. end to end through a real mitmdump -----------------------------------------------------


class _Replay(QuietHandler):
    """Answers POST /v1/chat/completions with the fixture named by the request's model, a stream
    in odd pieces, its chunk sizes in upper-case hex (helpers.http_chunk writes lower case)."""

    seen: list[dict] = []

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        _Replay.seen.append(body)
        name = body.get("model", "")
        if name not in NAMES:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        http = meta(name)["http"]
        data = raw(name)
        self.send_response(http["status"])
        self.send_header("content-type", http["content_type"])
        if http["status"] != 200 or "json" in http["content_type"]:
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        rng = random.Random(name)  # odd, repeatable boundaries: mid-line, mid-UTF-8, mid-CRLF
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 97)
            piece = data[pos:pos + n]
            pos += n
            self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def replay_upstream():
    with LocalServer(_Replay) as server:
        yield server.url


@pytest.fixture(scope="module")
def dialect_gateway(replay_upstream, tmp_path_factory):
    gw = start_gateway(replay_upstream, tmp_path_factory.mktemp("dialects"), "--set", "resp2chat_max_replay_entries=0")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def dialect_gateway_think_open(replay_upstream, tmp_path_factory):
    """For models whose template opens <think> itself (think_tags: open)."""
    gw = start_gateway(replay_upstream, tmp_path_factory.mktemp("dialects-open"), "--set",
                       "resp2chat_max_replay_entries=0", "--set", 'resp2chat_think_tags={"*": "open"}')
    yield gw
    gw.stop()


@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_sdk(name, request):
    mode = meta(name).get("think", "auto")
    gw = request.getfixturevalue({"auto": "dialect_gateway", "open": "dialect_gateway_think_open"}[mode])
    client = openai_client(gw)
    body = request_body(name)
    body.pop("stream")
    events = [e.model_dump(mode="json") for e in client.responses.create(**body, stream=True)]
    got = project(events, messages=False)
    assert got == _without_messages(meta(name)["events"])
    want = meta(name)["events"][-1][1]["error"]
    if want:  # the message may gain context on the way (a retry hint, the request id), never lose it
        message = re.sub(r"request id req_[0-9a-f]+; ", "", events[-1]["response"]["error"]["message"])
        assert want[1].split(": ", 1)[-1][:40] in message


# --- the pieces behind the matrix ------------------------------------------------------------


def test_parser_bom_bare_json_and_stray_lines():
    from resp2chat_core.sse import SSEParser

    p = SSEParser()
    bom = b"\xef\xbb\xbfdata: a\n\n"
    assert p.feed(bom[:1]) == [] and p.feed(bom[1:2]) == [] and p.feed(bom[2:]) == ["a"]
    p = SSEParser()
    assert p.feed(b'data: a\n\n{"error": {"message": "x"}}\n<html>\n') == ["a", '{"error": {"message": "x"}}']
    assert p.stray == [b"<html>"]
    p.stray = None  # the reader saw SSE: nothing more is kept
    assert p.feed(b"junk\n") == [] and p.stray is None
    p = SSEParser()
    assert p.feed(b'{\n  "error": "pretty"\n}\n') == [] and b"\n".join(p.stray) == b'{\n  "error": "pretty"\n}'


@pytest.mark.parametrize("usage,expected", [
    ({"prompt_tokens": 100, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": 64}}, (100, 64, 10, 0, 110)),
    ({"prompt_tokens": 100, "completion_tokens": 10, "prompt_cache_hit_tokens": 32}, (100, 32, 10, 0, 110)),
    ({"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110, "cached_tokens": 16}, (100, 16, 10, 0, 110)),
    ({"input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 80}, (100, 80, 10, 0, 110)),
    ({"prompt_tokens": 100, "completion_tokens": 10, "timings": {"cache_n": 99}}, (100, 99, 10, 0, 110)),
    ({"prompt_tokens": 100.0, "completion_tokens": 10, "reasoning_tokens": 4}, (100, 0, 10, 4, 110)),
    ({"prompt_tokens": None, "completion_tokens": -1, "prompt_tokens_details": None}, (0, 0, 0, 0, 0)),
])
def test_usage_spellings(usage, expected):
    from resp2chat_core.usage import to_responses_usage

    u = to_responses_usage(usage)
    assert (u["input_tokens"], u["input_tokens_details"]["cached_tokens"], u["output_tokens"],
            u["output_tokens_details"]["reasoning_tokens"], u["total_tokens"]) == expected


@pytest.mark.parametrize("status,body,code", [
    (None, b'{"error": {"message": "slow down", "code": 429}}', "rate_limit_exceeded"),
    (None, b'{"object": "error", "message": "bad value for top_k", "type": "BadRequestError", "code": 400}',
     "invalid_prompt"),
    (200, b'{"error": {"message": "Provider returned error", "code": 400, "metadata": {"raw": '
          b'"{\\"message\\": \\"prompt is too long: 210000 tokens\\"}"}}}', "context_length_exceeded"),
    (None, b'{"error": {"message": "boom", "code": 502}}', "server_error"),
    (503, b'{"detail": "overloaded"}', "server_error"),
    # the backend refused the gateway's key: the operator's, not the request's (errors.py KEY_REFUSED)
    (401, b'{"error": {"message": "Incorrect API key provided: sk-x", "type": "invalid_request_error", '
          b'"code": "invalid_api_key"}}', "upstream_key_refused"),
    (401, b'{"error": {"message": "No auth credentials found", "code": 401}}', "upstream_key_refused"),
    (403, b'{"type": "error", "error": {"type": "permission_error", "message": "Your API key does not have '
          b'permission to use the specified resource."}}', "upstream_key_refused"),
    (None, b'{"error": {"message": "User not found.", "code": 401}}', "upstream_key_refused"),
    # a 403 about what the request says is the request's (OpenRouter's moderation, a guardrail)
    (403, b'{"error": {"code": 403, "message": "m requires moderation on OpenRouter. Your input was flagged for '
          b'\\"harassment\\"", "metadata": {"reasons": ["harassment"], "flagged_input": "..."}}}', "invalid_prompt"),
    (403, b'{"error": {"message": "Request blocked: prompt injection patterns detected"}}', "invalid_prompt"),
    (403, b'{"error": {"message": "no", "code": "content_policy_violation"}}', "invalid_prompt"),
])
def test_error_classification_in_band(status, body, code):
    from resp2chat_core.errors import classify_upstream_error, upstream_error_message

    message, upstream_code = upstream_error_message(status, body)
    assert classify_upstream_error(status, message, upstream_code) == code


def test_a_refused_key_is_the_operators_and_the_backends_words_are_not_the_clients():
    """The gateway's key refused: the client reads the cause (no backend words: a 401 may echo
    the key), the operator both; the client's own key refused (``forward_client_auth``) stays the
    client's, in the backend's words, as any other 4xx."""
    from resp2chat_core.errors import upstream_failure

    body = b'{"error": {"message": "Incorrect API key provided: sk-proj-abcdef123456", "code": "invalid_api_key"}}'
    code, said, detail = upstream_failure(401, body, "req_1")
    assert code == "upstream_key_refused"
    assert said.startswith("upstream HTTP 401: the upstream refused the gateway's credentials") and "req_1" in said
    assert "upstream_api_key" in said and "Incorrect" not in said and "sk-proj" not in said
    assert "Incorrect API key provided: sk-[redacted]" in detail and "upstream_api_key" in detail
    assert upstream_failure(401, body, forwarded=True) == ("invalid_prompt", *[
        "upstream HTTP 401: Incorrect API key provided: sk-[redacted]"] * 2)


# --- the scripted upstream's extra dialects, through the session gateway ---------------------
# The demo upstream (resp2chat_io.demo_upstream) speaks some of these shapes live: a whole turn
# and a tool loop, with the openai SDK and with the real Codex CLI.

DEMO_DIALECTS = ["think", "mistral", "kimi"]
EXEC_TOOL = _fn("exec_command", {"cmd": {"type": "string"}}, ["cmd"])


@pytest.mark.parametrize("dialect", DEMO_DIALECTS)
@pytest.mark.parametrize("stream", [True, False])
def test_demo_dialect_tool_loop_sdk(dialect, stream, gateway, upstream):
    client = openai_client(gateway, default_headers={"x-demo-dialect": dialect})

    def ask(inp):
        if not stream:
            return client.responses.create(model="demo-model", input=inp, tools=[EXEC_TOOL])
        with client.responses.stream(model="demo-model", input=inp, tools=[EXEC_TOOL]) as s:
            for _ in s:
                pass
            return s.get_final_response()

    first = ask("run: echo 42")
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Thinking about: run: echo 42"
    assert reasoning.summary == []  # (no summary asked for: the reasoning is the item's content)
    assert call.type == "function_call" and json.loads(call.arguments) == {"cmd": "echo 42"}
    assert first.usage.input_tokens > 0
    if dialect == "kimi":
        assert call.call_id == "functions.exec_command:0"
    history = [{"role": "user", "content": "run: echo 42"}, *[o.model_dump(exclude_none=True) for o in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "42\n"}]
    upstream.clear()
    second = ask(history)
    assert second.output_text == "The tool returned: 42"
    assert [o.type for o in second.output] == ["reasoning", "message"]
    sent = upstream.requests()[-1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id and sent[1]["reasoning_content"]
    assert "<think>" not in json.dumps(sent)


@pytest.mark.codex
@pytest.mark.parametrize("dialect", ["think", "mistral"])
def test_demo_dialect_codex_tool_loop(dialect, codex, upstream, gateway):
    cfg = codex.home / "config.toml"
    cfg.write_text(cfg.read_text() + f'http_headers = {{ "x-demo-dialect" = "{dialect}" }}\n')
    upstream.clear()
    run = codex.exec("run: echo dialect-ok")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:] + gateway.log()[-2000:]
    assert "The tool returned: dialect-ok" in run.stdout, output[-3000:]
    assert "<think>" not in output and "</think>" not in output
    first, second = upstream.requests()
    call = next(m for m in second["messages"] if m.get("tool_calls"))["tool_calls"][0]
    assert call["function"]["name"] == "exec_command"
    if dialect == "mistral":  # the header reached the upstream: Mistral-style 9-character ids
        assert len(call["id"]) == 9, call
