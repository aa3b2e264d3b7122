"""Live decoding of a custom tool's {"input": "..."} arguments (apply_patch streams as it is written)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import chat_chunk, chat_sse, parse_sse
from resp2chat_core.jsonstring import InputStream
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.translator import Translator
from resp2chat_core.turn import begin_turn


def decode(pieces: list[str]) -> tuple[str, bool]:
    s = InputStream()
    return "".join(s.feed(p) for p in pieces), s.failed


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.integers(0, 10_000), max_size=12), st.booleans(), st.booleans())
def test_any_split_of_any_input_decodes_exactly(value, cuts, spaced, ascii_only):
    args = json.dumps({"input": value}, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":"))
    text, failed = decode(split(args, cuts))
    assert not failed
    expected = value.encode("utf-8", "replace").decode() if ascii_only else value
    # lone surrogates cannot be sent as text; everything else comes through byte for byte
    if not any("\ud800" <= c <= "\udfff" for c in value):
        assert text == expected


def test_patch_text_with_escapes_split_everywhere():
    patch = '*** Begin Patch\n*** Add File: a.py\n+print("héllo \\ world")\t😀\n*** End Patch\n'
    args = json.dumps({"input": patch})
    assert decode(list(args)) == (patch, False)  # one character at a time


def test_other_shapes_give_up_quietly():
    assert decode(['{"path": "x", "input": "y"}'])[1] is True
    assert decode(['{"input": 5}'])[1] is True
    assert decode(["*** Begin Patch"])[1] is True  # the model wrote the raw input, not JSON
    assert decode(['{"inp', 'ut"', ":", ' "ab', 'c"}']) == ("abc", False)


def _custom_turn():
    body = {"model": "m", "input": "x", "tools": [
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark", "definition": "x"}}]}
    return begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_" + "a" * 32, 0)


def _call(args_pieces: list[str]) -> bytes:
    calls = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "apply_patch", "arguments": ""}}]
    calls += [{"index": 0, "function": {"arguments": p}} for p in args_pieces]
    return chat_sse(*(chat_chunk({"tool_calls": [c]}) for c in calls), chat_chunk(finish="tool_calls"))


def test_translator_streams_custom_input_live():
    patch = "*** Begin Patch\n*** Add File: x\n+hi\n*** End Patch\n"
    args = json.dumps({"input": patch})
    t = Translator(_custom_turn().ctx)
    events = parse_sse(t.feed(_call([args[i:i + 7] for i in range(0, len(args), 7)])) + t.finish())
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 3 and "".join(deltas) == patch
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert done["input"] == patch
    assert events[-1]["response"]["output"][0] == {**events[-1]["response"]["output"][0], "type": "custom_tool_call",
                                                   "input": patch}


def test_translator_falls_back_to_one_delta_for_other_shapes():
    t = Translator(_custom_turn().ctx)
    events = parse_sse(t.feed(_call(['{"patch": 1, "input": ', '"raw text"}'])) + t.finish())
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert deltas == ["raw text"]
