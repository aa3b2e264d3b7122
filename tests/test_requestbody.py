"""resp2chat_core/requestbody.py: a /v1/responses body is strict UTF-8 JSON, or a 400 that says where."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import codex_fixture
from resp2chat_core import requestbody
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.turn import begin_turn


def refused(body: bytes) -> str:
    with pytest.raises(GatewayError) as info:
        requestbody.loads(body)
    assert info.value.status == 400 and info.value.code == "invalid_json"
    return info.value.message


@pytest.mark.parametrize("body, says", [
    # an encoded surrogate (what json.loads on bytes lets through as U+D800)
    (b'{"input":"a\xed\xa0\x80b"}', "not valid UTF-8: invalid continuation byte at byte offset 11"),
    (b'{"input":"\xc3"}', "not valid UTF-8: invalid continuation byte at byte offset 10"),
    (b'{"input":"x"}\xff', "not valid UTF-8: invalid start byte at byte offset 13"),
    (b'{"input":"\xc0\x80"}', "not valid UTF-8: invalid start byte at byte offset 10"),  # overlong NUL
    (b'\xff\xfe{\x00}\x00', "not valid UTF-8: invalid start byte at byte offset 0"),  # UTF-16: not accepted
    # lone surrogate escapes, wherever they are (offsets count bytes: "é" is two)
    (b'{"input":"\\ud800"}', "lone surrogate escape (\\ud800) at byte offset 10"),
    ('{"é":"\\uDC00"}'.encode(), "lone surrogate escape (\\uDC00) at byte offset 7"),
    (b'{"a":"\\udc00\\ud800"}', "lone surrogate escape (\\udc00) at byte offset 6"),  # low before high
    (b'{"a":"\\ud800\\ud800"}', "lone surrogate escape (\\ud800) at byte offset 6"),
    (b'{"a":"\\\\\\ud83d"}', "lone surrogate escape (\\ud83d) at byte offset 8"),  # \\ then a real escape
    (b'{"\\ud800":1}', "lone surrogate escape (\\ud800) at byte offset 2"),  # in a key
    # numbers JSON does not have, or that no float holds
    (b'{"temperature":NaN}', "NaN is not a JSON number"),
    (b'{"temperature":-Infinity}', "-Infinity is not a JSON number"),
    (b'{"temperature":1e400}', "the number 1e400 is out of range"),
    (b'{"temperature":-1e999}', "the number -1e999 is out of range"),
    (b'{"n":' + b"9" * 5000 + b"}", "an integer has too many digits"),
    # plain syntax errors say where, too
    (b'{"input": "x",}', "trailing comma before end of object at byte offset 13"),
    (b'\xef\xbb\xbf{}', "Unexpected UTF-8 BOM"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_refused_with_the_offset(body, says):
    assert says in refused(body)


@pytest.mark.parametrize("body, value", [
    (b'{"a":"\\ud83d\\ude00"}', {"a": "\U0001F600"}),  # a surrogate pair is one character
    (b'{"a":"\\uD83D\\uDE00"}', {"a": "\U0001F600"}),
    (b'{"a":"\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash, then plain text
    (b'{"a":"\\\\\\\\ud800"}', {"a": "\\\\ud800"}),
    ('{"a":"é😀"}'.encode(), {"a": "é😀"}),
    (b'{"a":1e308,"b":-0.0,"c":12345678901234567890}', {"a": 1e308, "b": -0.0, "c": 12345678901234567890}),
])
def test_accepted(body, value):
    assert requestbody.loads(body) == value


def test_the_issue_reproduction_is_a_400_not_a_crash_in_lowering():
    """Before: json.loads let U+D800 through, and lowering raised UnicodeEncodeError."""
    body = b'{"model":"m","input":"hi \xed\xa0\x80 there"}'
    with pytest.raises(GatewayError) as info:
        begin_turn(body, LoweringOptions(), "resp_x", 0)
    assert info.value.code == "invalid_json" and "byte offset 25" in info.value.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_whatever_is_accepted_encodes_again(text):
    """What passes goes upstream re-encoded: it must encode as strict UTF-8 and strict JSON."""
    for body in (json.dumps({"a": text}).encode(), json.dumps({"a": text}, ensure_ascii=False).encode("utf-8", "surrogatepass")):
        try:
            value = requestbody.loads(body)
        except GatewayError as err:
            assert any(0xD800 <= ord(c) <= 0xDFFF for c in text), err.message  # only lone surrogates are refused
            continue
        assert value == {"a": text}
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def test_a_real_codex_request_decodes_to_what_json_loads_gives():
    body = json.dumps(codex_fixture("03-tool-call-turn2-with-output.json")["body"]).encode()
    assert requestbody.loads(body) == json.loads(body)


@pytest.mark.parametrize("yielding", [False, True])
def test_loads_keys_names_the_top_level_keys_given_twice(yielding):
    """``loads_keys``: the value json.loads gives, and the top-level keys named more than once
    (an escaped spelling is the same key); keys twice deeper down, or in a top-level array, are
    not the top level's. Refusals are ``_loads``'s."""
    body = b'{"model":"a","x":{"model":1,"model":2},"mod\\u0065l":"b","y":[{"k":1,"k":2}],"x":3}'
    value, twice = requestbody.loads_keys(body, yielding)
    assert value == json.loads(body) and twice == {"model", "x"}
    assert requestbody.loads_keys(b'{"model":"a","input":[1,2.5]}', yielding) == ({"model": "a", "input": [1, 2.5]},
                                                                                  frozenset())
    assert requestbody.loads_keys(b'[{"a":1,"a":2}]', yielding) == ([{"a": 2}], frozenset())
    with pytest.raises(GatewayError) as info:
        requestbody.loads_keys(b'{"model":NaN}', yielding)
    assert info.value.code == "invalid_json"
