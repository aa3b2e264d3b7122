"""One answer, two forms: a backend that streams it and one that ignores ``stream`` and sends the
whole ``chat.completion`` give a client the same Response.

The translator reads both through the one chunk reader (chatstream.py), but what it makes of a
delta may depend on where the backend cut the text (whitespace held back, ``<think>`` tags held
until the next delta decides). This property test draws answers (reasoning, text, a refusal,
client calls, token logprobs) and cuts each string anywhere, and checks the streamed Response
equals the whole one, item for item. It found two rules that depended on the cut: a second ``<think>`` cut after
its ``<``, and an answer's leading line breaks cut from its text.
"""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CREATED, RESP_ID, chat_chunk, chat_completion, chat_sse, check_stream, parse_sse
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.turn import begin_turn

_TOOLS = [{"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}} for n in ("f", "g")]
_BITS = list('ab "\\\n\t<>/{}') + ["\r\n", "\u2028", "\U0001f600", "<think>", "</think>", "\ud800"]
_TEXT = st.lists(st.sampled_from(_BITS), max_size=12).map("".join)
_IDS = re.compile(r'"(id|call_id|item_id)": ?"[^"]*"')


def _translator():
    body = {"model": "m", "input": "hi", "stream": True, "tools": _TOOLS, "top_logprobs": 1}
    return begin_turn(json.dumps(body).encode(), LoweringOptions(), RESP_ID, CREATED).translator()


def _response(raw: bytes) -> tuple:
    """What a client keeps of a turn: its end, the output items (ids aside), the status."""
    final = check_stream(raw)[-1]
    response = final["response"]
    return final["type"], json.loads(_IDS.sub('"id": ""', json.dumps(response["output"]))), response["status"]


def _cut(data, text: str) -> list[str]:
    if len(text) < 2:
        return [text] if text else []
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=4)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _logprobs(piece: str) -> list[dict]:
    """One token for a piece of text (a backend's ``logprobs.content`` entry)."""
    return [{"token": piece, "logprob": -0.25, "bytes": list(piece.encode("utf-8", "surrogatepass")),
             "top_logprobs": []}]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(reasoning=st.none() | _TEXT, content=st.none() | _TEXT, refusal=st.none() | _TEXT,
       calls=st.lists(st.tuples(st.sampled_from(["f", "g"]), st.sampled_from(["{}", '{"a":1}', '{"s":"x y"}', ""])),
                      max_size=3),
       finish=st.sampled_from(["stop", "length", "tool_calls"]), logprobs=st.booleans(), data=st.data())
def test_property_a_streamed_answer_reads_as_the_same_answer_whole(reasoning, content, refusal, calls, finish,
                                                                    logprobs, data):
    """With ``logprobs``, each text chunk carries its tokens' and the whole answer all of them
    (not with ``<think>`` in the text: streamed, a think block's tokens are no text's, while a
    whole answer's cannot be told apart)."""
    message = {k: v for k, v in (("reasoning_content", reasoning), ("content", content), ("refusal", refusal))
               if v is not None}
    if calls:
        message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                                 for i, (n, a) in enumerate(calls)]
    whole = chat_completion(message, finish)
    chunks = [chat_chunk({"role": "assistant"})]
    logprobs = logprobs and "<think>" not in (content or "") and "</think>" not in (content or "")
    for key in ("reasoning_content", "content", "refusal"):
        pieces = _cut(data, message.get(key) or "")
        chunks += [chat_chunk({key: piece}) for piece in pieces]
        if key == "content" and logprobs and pieces:
            for chunk, piece in zip(chunks[-len(pieces):], pieces):
                chunk["choices"][0]["logprobs"] = {"content": _logprobs(piece)}
            whole["choices"][0]["logprobs"] = {"content": [t for piece in pieces for t in _logprobs(piece)]}
    for i, (name, args) in enumerate(calls):
        chunks.append(chat_chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]}))
        chunks += [chat_chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                   for piece in _cut(data, args)]
    chunks += [chat_chunk(finish=finish), chat_chunk(choices=[], usage=whole["usage"])]
    streamed = _translator()
    as_whole = _translator()
    assert _response(streamed.feed(chat_sse(*chunks)) + streamed.finish()) == \
        _response(as_whole.translate_json(json.dumps(whole).encode()))


def test_an_answers_leading_line_breaks_go_wherever_the_stream_cuts_them():
    """Found by the property test: ``"\\n"`` then ``"\\nHello"`` kept one line break that
    ``"\\n\\nHello"`` in one delta, or in a whole answer, did not... and the other way round."""
    texts = []
    for pieces in (["\n\nHello"], ["\n", "\nHello"], ["\n", "\n", "Hello"], ["\r\n\r\nHel", "lo"]):
        tr = _translator()
        events = parse_sse(tr.feed(chat_sse(*[chat_chunk({"content": p}) for p in pieces], chat_chunk(finish="stop")))
                           + tr.finish())
        texts.append(events[-1]["response"]["output"][0]["content"][0]["text"])
    assert texts == ["Hello"] * 4
