"""mitmweb's contentviews (resp2chat_core/inspect.py, resp2chat_io/views.py), property-tested.

- They never raise, whatever a flow holds: random bytes, truncated JSON, random SSE, random JSON
  values where a Responses or chat request, event or chunk belongs (a client's refused request,
  a backend's broken stream, a recording of any gateway). mitmproxy shows a traceback instead
  of the view when a view chosen by name raises, and falls back to raw when one it chose does.
- The "resp2chat upstream" view shows what the translator read of the same stream: the same
  text, reasoning, refusal and tool calls (name and arguments), in every chunk shape the one
  reader (chatstream.py) accepts (index null or absent, other choices, arguments as JSON objects,
  both reasoning fields and Mistral's thinking parts, content parts, usage-only chunks, empty
  choices, comments, any split of the bytes).
"""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CREATED, RESP_ID, chat_chunk, chat_sse, parse_sse
from resp2chat_core import toolloop, websearch
from resp2chat_core.chatstream import ChunkReader
from resp2chat_core.inspect import (
    describe_chat_request, describe_chat_sse, describe_responses_request, describe_responses_sse,
)
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.turn import begin_turn
from test_chatstream import Calls

# --- random JSON, biased towards the names the views look at ----------------------------------

_KEYS = ["type", "sequence_number", "response", "item", "delta", "item_id", "output_index", "error", "usage",
         "incomplete_details", "reason", "name", "namespace", "arguments", "input", "code", "message", "status",
         "input_tokens_details", "cached_tokens", "role", "content", "tools", "messages", "tool_calls", "function",
         "text", "refusal", "summary", "output", "call_id", "tool_call_id", "reasoning_content", "model",
         "instructions", "choices", "finish_reason", "index", "id", "reasoning", "object", "x"]
_STRINGS = st.sampled_from(["response.output_text.delta", "response.completed", "response.output_item.done",
                            "response.output_item.added", "function_call", "custom_tool_call", "message",
                            "function_call_output", "reasoning", "user", "chat.completion.chunk", "error", "",
                            "x"]) | st.text(max_size=4)
_SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | _STRINGS
VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=6), max_leaves=25)


def _sse(values: list, cut: int | None) -> bytes:
    raw = b"".join(b"data: " + json.dumps(v, ensure_ascii=False).encode() + b"\n\n" for v in values)
    return raw if cut is None else raw[:cut]


@st.composite
def any_bytes(draw) -> bytes:
    """What a flow's body or record may hold: bytes, truncated JSON, SSE of random JSON values
    (cut anywhere), a Responses stream's or a chat stream's events with random fields."""
    form = draw(st.sampled_from(["bytes", "json", "sse", "events"]))
    if form == "bytes":
        return draw(st.binary(max_size=200))
    if form == "json":
        raw = json.dumps(draw(VALUES)).encode()
        return raw[:draw(st.integers(0, len(raw)))]
    values = draw(st.lists(VALUES, max_size=5))
    if form == "events":
        values = [dict(v, type=draw(_STRINGS)) if isinstance(v, dict) else v for v in values]
    cut = draw(st.none() | st.integers(0, 400))
    return _sse(values, cut)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(raw=any_bytes(), value=VALUES)
def test_property_the_descriptions_never_raise(raw, value):
    """Every description of a body is text, whatever the body: a stream's (Responses or chat),
    and a request's, of any JSON value (a refused request's record is the client's own)."""
    for describe in (describe_responses_sse, describe_chat_sse):
        assert isinstance(describe(raw), str)
    for describe in (describe_responses_request, describe_chat_request):
        assert isinstance(describe(value), str)


def test_a_value_nested_too_deep_is_no_exception():
    """JSON nested deeper than Python's decoder recurses (a backend's event, a whole body, a
    recorded client request): the reader calls it garbage, as any payload it cannot decode, and
    the views show it so. Before: RecursionError out of the reader (in the gateway, the web-search
    round filter's exception failed the turn as "the gateway's relay failed") and the views."""
    deep = b"[" * 100_000
    for raw in (b"data: " + deep + b"\n\n", deep, b'data: {"choices": ' + deep + b"\n\n"):
        sink = Calls()
        reader = ChunkReader(sink)
        reader.feed(raw)
        reader.finish()
        assert [c[0] for c in sink.calls] == ["garbage"], sink.calls
        loop = websearch.SearchLoop(json.dumps({"model": "m", "messages": [], "tools": [websearch.TOOL]}).encode(), 2)
        passed = loop.feed(raw)  # (the round filter, in the relay: the translator then fails the turn, its code)
        assert isinstance(loop.end_round(ok=True)[1], toolloop.Finish) and isinstance(passed, bytes)
        assert "not JSON" in describe_chat_sse(raw) or "neither SSE nor JSON" in describe_chat_sse(raw)
        assert "(not JSON)" in describe_responses_sse(raw) or describe_responses_sse(raw) == ""


def test_a_recorded_event_larger_than_the_default_bound_is_shown():
    """A gateway with ``max_upstream_event_mb`` above the default reads (and records) a backend
    event larger than 4 MiB; the view read the recording with the default bound, so it showed
    nothing of that event and nothing after it ([DONE] included). Before: only the finish
    reason's absence told."""
    text = "x" * (5 << 20)
    raw = chat_sse(chat_chunk({"content": "hi"}), chat_chunk({"content": text}), chat_chunk(finish="stop"))
    lines = describe_chat_sse(raw).splitlines()
    assert lines[0].startswith('content: "hix') and lines[1:] == ["finish_reason: stop", "[DONE]"], lines[1:]


# --- through mitmproxy's contentviews, as mitmweb shows a flow ---------------------------------


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=any_bytes(), response=any_bytes(), recorded=any_bytes(), upstream=any_bytes(),
       message=any_bytes(), turn=VALUES)
def test_property_every_view_renders_any_flow(request, response, recorded, upstream, message, turn):
    """Each of the four views, chosen by name (mitmproxy then shows a traceback if it raises) or
    automatically, renders any flow: any request and response bodies, any recorded Responses
    request and backend stream, a WebSocket message of any bytes from either side beside any
    turn record."""
    from mitmproxy import contentviews
    from mitmproxy.test import taddons, tflow
    from mitmproxy.websocket import WebSocketMessage
    from wsproto.frame_protocol import Opcode

    from resp2chat_io import views

    views.register()
    flow = tflow.tflow(resp=True)
    flow.request.content, flow.response.content = b"{" + request, response
    flow.metadata[views.META] = {"responses_request": recorded.decode("utf-8", "replace"),
                                 "upstream_sse": upstream.decode("utf-8", "replace")}
    sock = tflow.twebsocketflow()
    text = message.decode("utf-8", "replace")
    sock.metadata[views.META] = {"transport": "websocket", "turns": [
        turn if isinstance(turn, dict) else {}, {"responses_request": text, "chat_request": text, "error": turn}]}
    sock.websocket.messages = [WebSocketMessage(Opcode.TEXT, side, message) for side in (True, False)]
    names = [v.name for v in views.VIEWS]
    with taddons.context():
        for msg, f in ((flow.request, flow), (flow.response, flow), *((m, sock) for m in sock.websocket.messages)):
            for name in names:
                shown = contentviews.prettify_message(msg, f, view_name=name)
                assert not shown.text.startswith("Couldn't parse"), (name, shown.text)
            assert "failed to parse" not in contentviews.prettify_message(msg, f).description


# --- the upstream view shows what the translator read -------------------------------------------

_PIECES = st.text(alphabet='ab é😀"\\<>', min_size=1, max_size=5).filter(lambda s: s == s.strip())
_ARGS = st.sampled_from(['{"a"', ": 1}", "{}", "x", {"a": 1}, {"é": [True]}])


@st.composite
def backend_streams(draw) -> bytes:
    """A backend's chat stream in the shapes the reader accepts: reasoning, then text, a
    refusal, then tool-call deltas (ids, names and arguments in any order, indexes reused), a
    finish reason, a usage; choices with index 0, null or none (and other choices beside them),
    reasoning in any of its fields, text as a string or parts, arguments as JSON objects;
    usage-only chunks, empty choices, comments between them; [DONE] or not."""
    def chunk(delta: dict, finish: str | None = None) -> dict:
        choice = {"delta": delta, "finish_reason": finish}
        index = draw(st.sampled_from([0, None, "none"]))
        if index != "none":
            choice["index"] = index
        choices = [choice]
        if draw(st.integers(0, 5)) == 0:
            choices.insert(draw(st.integers(0, 1)), {"index": 1, "delta": {"content": "other"}})
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices}

    chunks: list = []
    for piece in draw(st.lists(_PIECES, max_size=3)):
        form = draw(st.sampled_from(["reasoning_content", "reasoning", "thinking"]))
        chunks.append(chunk({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": piece}]}]}
                            if form == "thinking" else {form: piece}))
    for piece in draw(st.lists(_PIECES, max_size=4)):
        chunks.append(chunk({"content": draw(st.sampled_from([piece, [piece], [{"type": "text", "text": piece}]]))}))
    if draw(st.integers(0, 4)) == 0:
        chunks.append(chunk({"refusal": draw(_PIECES)}))
    for _ in range(draw(st.integers(0, 5))):
        call: dict = {"type": "function", "function": {}}
        index = draw(st.sampled_from([0, 1, None]))
        if index is not None:
            call["index"] = index
        call_id = draw(st.sampled_from([None, "call_a", "call_b"]))
        if call_id:
            call["id"] = call_id
        name = draw(st.sampled_from([None, "f", "g"]))
        if name:
            call["function"]["name"] = name
        args = draw(st.none() | _ARGS)
        if args is not None:
            call["function"]["arguments"] = args
        chunks.append(chunk({"tool_calls": [call]}))
    chunks.append(chunk({}, draw(st.sampled_from(["stop", "tool_calls", "STOP"]))))
    for at in sorted(draw(st.lists(st.integers(0, len(chunks)), max_size=3)), reverse=True):
        chunks.insert(at, draw(st.sampled_from([
            {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
            {"object": "chat.completion.chunk", "choices": []}, ": keep-alive"])))
    raw = b"".join((c.encode() + b"\n\n") if isinstance(c, str) else chat_sse(c, done=False) for c in chunks)
    return raw + (b"data: [DONE]\n\n" if draw(st.booleans()) else b"")


def _shown(view: str) -> tuple:
    """(text, reasoning, refusal, sorted calls (name, arguments)) of the upstream view's lines."""
    said = {"content": "", "reasoning": "", "refusal": ""}
    calls: dict[str, str] = {}
    for line in view.splitlines():
        m = re.fullmatch(r'(content|reasoning|refusal|tool_call\[\d+\]): (".*")', line)
        if m is None:
            continue
        if m[1].startswith("tool_call"):
            calls[m[1]] = calls.get(m[1], "") + json.loads(m[2])
        else:
            said[m[1]] += json.loads(m[2])
    named = []
    for joined in calls.values():
        head = re.search(r"([fg]) id=\S+ args=", joined)  # (the names drawn; what came before a name is arguments)
        if head is not None:  # (a call never named is none)
            named.append((head[1], re.sub(r"[fg] id=\S+ args=", "", joined)))
    return said["content"], said["reasoning"], said["refusal"], sorted(named)


def _translated(out: bytes) -> tuple:
    """The same of the translator's events: its deltas, joined."""
    events = parse_sse(out)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    reasoning = "".join(e["delta"] for e in events if e["type"] in (
        "response.reasoning_text.delta", "response.reasoning_summary_text.delta"))
    refusal = "".join(e["delta"] for e in events if e["type"] == "response.refusal.delta")
    calls = {e["item"]["id"]: [e["item"]["name"], ""] for e in events
             if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            calls[e["item_id"]][1] += e["delta"]
    return text, reasoning, refusal, sorted(tuple(c) for c in calls.values())


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(raw=backend_streams(), cuts=st.lists(st.integers(0, 1 << 12), max_size=6))
def test_property_the_upstream_view_shows_what_the_translator_read(raw, cuts):
    tools = [{"type": "function", "name": n, "parameters": {"type": "object"}} for n in ("f", "g")]
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True, "tools": tools}).encode(),
                      LoweringOptions(), RESP_ID, CREATED)
    turn.ctx.think = "off"  # (<think> tags are the translator's to split, as its upstream says: no chunk shape)
    tr = turn.translator()
    out, at = b"", 0
    for cut in sorted(c % (len(raw) + 1) for c in cuts) + [len(raw)]:  # (any split of the bytes)
        out += tr.feed(raw[at:cut])
        at = cut
    out += tr.finish()
    assert _shown(describe_chat_sse(raw)) == _translated(out)
