"""resp2chat_core/chatstream.py on its own: the one reader of a backend's chat stream.

The dialect fixtures run through all three of its consumers in test_dialects.py; here are its
rules one by one, as the calls a sink gets, and the property the web-search filter relies on:
a call re-encoded with ``wire_call`` reads back as the same call.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import chat_chunk
from resp2chat_core.chatstream import NOT_JSON, NOT_OBJECT, NOT_SSE, ChunkReader, wire_call


class Calls:
    """A sink that writes down what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name.removeprefix("on_"), *args))


def read(*payloads, body: bytes | None = None) -> list[tuple]:
    sink = Calls()
    reader = ChunkReader(sink)
    for p in payloads:
        reader.payload(p if isinstance(p, str) else json.dumps(p))
    if body is not None:
        reader.feed(body)
        reader.finish()
    return sink.calls


def test_the_first_choice_is_index_0_absent_or_null():
    got = read({"choices": [{"index": None, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "x"}}]},
               {"choices": [{"delta": {"content": "b"}, "finish_reason": "STOP"}]})
    assert got == [("start",), ("text", "a"), ("text", "b"), ("finish", "stop")]


def test_reasoning_and_content_in_every_spelling():
    got = read(chat_chunk({"reasoning_content": "r1", "reasoning": "ignored"}), chat_chunk({"reasoning": "r2"}),
               chat_chunk({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "r3"}]},
                                       {"type": "text", "text": "t1"}, "t2", "",
                                       {"type": "thinking", "thinking": "r4"}]}))
    assert got[1:] == [("reasoning", "r1"), ("reasoning", "r2"), ("reasoning", "r3"), ("text", "t1"), ("text", "t2"),
                       ("reasoning", "r4")]


def test_tool_call_keys_ids_names_and_arguments():
    got = read(chat_chunk({"tool_calls": [
        {"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}},
        {"id": "b", "function": {"name": "g", "arguments": {"x": "é", "n": [1, 2]}}},  # keyed by id; an object
        {"function": {"name": "h"}},  # neither: its position
        {"index": [1], "id": 5, "function": {"name": 7, "arguments": 3}},  # junk: no id, no name, position
    ]}), chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
    assert got[1:] == [("tool", 0, "a", "f", ""), ("tool", "b", "b", "g", '{"x":"é","n":[1,2]}'),
                       ("tool", 2, None, "h", None), ("tool", 3, None, None, "3"), ("tool", 0, None, None, "{}")]


def test_a_new_id_on_a_named_index_is_a_new_call():
    got = read(chat_chunk({"tool_calls": [{"index": 0, "id": "one", "function": {"name": "f", "arguments": "1"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "2"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "id": "two", "function": {"name": "f", "arguments": "3"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "4"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "id": "two", "function": {"name": "f"}}]}))
    keys = [c[1] for c in got[1:]]
    assert keys[0] == keys[1] == 0 and keys[2] == keys[3] == keys[4] != 0
    # …but an id that comes with the name after arguments that had another one names that call
    got = read(chat_chunk({"tool_calls": [{"index": 0, "id": "early", "function": {"arguments": "1"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "id": "late", "function": {"name": "f"}}]}))
    assert [c[1] for c in got[1:]] == [0, 0]


def test_an_id_before_the_name_is_the_calls():
    """A call's id sent before its name, the name without one: the naming delta is told that id
    (the first its key gave), so every consumer (translator, web-search filter, contentview)
    reads the call with the backend's id; its own id, when it has one, wins. That id is the
    call's: the same id named again on its index is more of it, not a new call. Before: the
    naming delta was told None (the translator made an id up) and the same id named again
    opened a second call."""
    got = read(chat_chunk({"tool_calls": [{"index": 0, "id": "first", "function": {"arguments": ""}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "id": "second", "function": {"arguments": "1"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "2"}}]}),
               chat_chunk({"tool_calls": [{"index": 0, "id": "first", "function": {"name": "f", "arguments": "3"}}]}),
               # index null and missing: keyed by the id, so the naming delta brings it anyway
               chat_chunk({"tool_calls": [{"index": None, "id": "k", "function": {"arguments": {"a": 1}}}]}),
               chat_chunk({"tool_calls": [{"id": "k", "function": {"name": "g"}}]}),
               # an id after the name is no longer the call's: the naming delta's (None) stays
               chat_chunk({"tool_calls": [{"index": 1, "function": {"name": "h"}}]}),
               chat_chunk({"tool_calls": [{"index": 1, "id": "late", "function": {"arguments": "{}"}}]}),
               chat_chunk({"tool_calls": [{"index": 2, "id": "own", "function": {"arguments": "x"}}]}),
               chat_chunk({"tool_calls": [{"index": 2, "id": "named", "function": {"name": "k"}}]}))
    assert got[1:] == [("tool", 0, "first", None, ""), ("tool", 0, "second", None, "1"), ("tool", 0, "first", "f", "2"),
                       ("tool", 0, "first", "f", "3"), ("tool", "k", "k", None, '{"a":1}'), ("tool", "k", "k", "g", None),
                       ("tool", 1, None, "h", None), ("tool", 1, "late", None, "{}"),
                       ("tool", 2, "own", None, "x"), ("tool", 2, "named", "k", None)]


def test_usage_in_all_its_places():
    top = {"prompt_tokens": 1}
    groq = {"prompt_tokens": 2}
    kimi = {"prompt_tokens": 3}
    in_choice = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "usage": kimi}]}  # (Kimi)
    # per-choice usage counts only when none came before
    assert ("usage", kimi) in read(in_choice)
    assert read(chat_chunk({}, usage=top), in_choice)[1:] == [("usage", top), ("finish", "stop")]
    got = read(chat_chunk({}, "stop", x_groq={"usage": groq}), {"choices": [], "usage": top})
    assert got[1:] == [("usage", groq), ("finish", "stop"), ("usage", top)]  # usage before the choices; the last wins


def test_done_errors_and_garbage():
    got = read("[DONE]", " [DONE] ", "", '{"error": {"message": "x"}}', '{"object": "error", "message": "y"}',
               "<html>", "[1, 2]", "null")
    assert got == [("done",), ("done",), ("start",), ("error", b'{"error": {"message": "x"}}'),
                   ("error", b'{"object": "error", "message": "y"}'), ("garbage", "<html>", NOT_JSON),
                   ("garbage", "[1, 2]", NOT_OBJECT), ("garbage", "null", NOT_OBJECT)]
    # events run together without their blank line: each line on its own
    got = read('data: {"choices": [{"delta": {"content": "a"}}]}\ndata: [DONE]')
    assert got == [("start",), ("text", "a"), ("done",)]


def test_a_body_without_sse_events_is_read_whole():
    completion = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 4}}
    assert read(body=json.dumps(completion, indent=2).encode()) == [
        ("start",), ("usage", {"prompt_tokens": 4}), ("text", "hi"), ("tool", "c", "c", "f", "{}"), ("finish", "stop"),
        ("done",)]
    pretty = b'{\n  "error": {"message": "model not found"}\n}\n'
    assert read(body=pretty) == [("error", pretty.rstrip(b"\n"))]
    assert read(body=b"<html>\n<body>bad gateway</body>\n") == [("garbage", "<html>\n<body>bad gateway</body>", NOT_SSE)]
    # once an event came, other lines are not a body
    assert read(body=b'data: {"choices": []}\n\n<html>\n') == [("start",)]


def test_a_sink_that_stops_is_told_nothing_more():
    class Stopping(Calls):
        def on_finish(self, reason):
            self.calls.append(("finish", reason))
            reader.stopped = True

    sink = Stopping()
    reader = ChunkReader(sink)
    reader.payload(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "error"},
                                           {"index": None, "delta": {"content": "after"}}]}))
    assert sink.calls == [("start",), ("finish", "error")]


# --- wire_call: the web-search filter's seam -----------------------------------------------------

_IDS = st.sampled_from([None, "", "call_a", "call_b", "c"])
_NAMES = st.sampled_from([None, "", "f", "g"])
_ARGS = st.one_of(st.none(), st.sampled_from(["", "{", '"x"}', "{}"]), st.dictionaries(st.sampled_from("ab"),
                                                                                           st.integers(0, 3)))
_INDEXES = st.one_of(st.none(), st.integers(0, 2), st.just("k"))
_ENTRY = st.builds(lambda i, has_index, cid, name, args: {
    **({"index": i} if has_index else {}), **({"id": cid} if cid is not None else {}),
    "function": {**({"name": name} if name is not None else {}), **({"arguments": args} if args is not None else {})}},
    _INDEXES, st.booleans(), _IDS, _NAMES, _ARGS)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_ENTRY, min_size=1, max_size=3), max_size=12))
def test_a_re_encoded_call_reads_back_as_the_same_call(deltas):
    """Reading ``wire_call``'s entries (one per tool delta) gives the same ids, names and
    arguments, grouped into the same calls, as reading the backend's entries."""
    original, again = Calls(), Calls()
    first, second = ChunkReader(original), ChunkReader(again)
    for calls in deltas:
        original.calls.clear()
        first.payload(json.dumps(chat_chunk({"tool_calls": calls})))
        tools = [c[1:] for c in original.calls if c[0] == "tool"]
        second.payload(json.dumps(chat_chunk({"tool_calls": [wire_call(*t) for t in tools]})))
        got = [c[1:] for c in again.calls if c[0] == "tool"]
        again.calls.clear()
        assert [t[1:] for t in got] == [t[1:] for t in tools]
        for (k1, *_), (k2, *_) in zip(tools, got):
            assert _same_call.setdefault(("a", repr(k1)), repr(k2)) == repr(k2)
            assert _same_call.setdefault(("b", repr(k2)), repr(k1)) == repr(k1)
    _same_call.clear()


_same_call: dict = {}
