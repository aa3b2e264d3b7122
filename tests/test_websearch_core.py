"""resp2chat_core/websearch.py on its own: the tool, the loop and its events, without sockets.
Through a real mitmdump, with a fake Brave: test_websearch_e2e.py."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import (
    CREATED, RESP_ID, chat_chunk, chat_completion, chat_event, chat_sse, parse_chat_sse, parse_sse, tool_call_chunk,
)
from resp2chat_core import mcp, toolloop, websearch
from resp2chat_core.errors import specific_code
from resp2chat_core.chatstream import ChunkReader
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.translator import OUTPUT_TOO_LARGE, OVERSIZED
from resp2chat_core.turn import begin_turn
from test_chatstream import Calls


def usage(prompt, completion) -> dict:
    return chat_chunk(choices=[], usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion})


CHAT = {"model": "m", "messages": [{"role": "user", "content": "news?"}],
        "tools": [websearch.TOOL, {"type": "function", "function": {"name": "exec", "parameters": {}}}],
        "tool_choice": "auto", "stream": True}


def test_the_tool_is_offered_only_when_the_gateway_searches():
    body = json.dumps({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}).encode()
    on = begin_turn(body, LoweringOptions(web_search=True), "resp_x", 0)
    off = begin_turn(body, LoweringOptions(web_search=False), "resp_x", 0)
    assert on.web_search and json.loads(on.chat_body)["tools"] == [websearch.TOOL]
    assert not off.web_search and "tools" not in json.loads(off.chat_body)


def test_a_search_round_then_an_answer_is_one_stream_with_one_ending():
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    first = chat_sse(chat_chunk({"reasoning_content": "let me look"}),
                     tool_call_chunk(0, "call_1", "web_search", '{"query":'),
                     tool_call_chunk(0, args='"mitmproxy"}', nulls=True),  # (null where it leaves one out)
                     chat_chunk(finish="tool_calls"), usage(100, 10))
    passed = b"".join(loop.feed(first[i:i + 7]) for i in range(0, len(first), 7))  # any split
    out = parse_chat_sse(passed)
    # the client sees the reasoning, not the web_search call, no finish reason, no usage, no [DONE]
    assert out == [chat_chunk({"reasoning_content": "let me look"})]
    tail, step = loop.end_round(ok=True)
    assert tail == b"" and step == [websearch.Search("call_1", "mitmproxy")]
    loop.next_round(["1. result"])
    nxt = json.loads(loop.body)
    assert nxt["messages"][-2]["tool_calls"][0]["function"] == {"name": "web_search", "arguments": '{"query":"mitmproxy"}'}
    assert nxt["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "1. result"}
    assert [t["function"]["name"] for t in nxt["tools"]] == ["web_search", "exec"]  # more rounds allowed

    second = chat_sse(chat_chunk({"content": "Here."}), chat_chunk(finish="stop"), usage(150, 5))
    assert parse_chat_sse(loop.feed(second)) == [chat_chunk({"content": "Here."})]
    _, step = loop.end_round(ok=True)
    assert isinstance(step, toolloop.Finish)
    end = parse_chat_sse(step.tail)
    assert end[0]["choices"][0]["finish_reason"] == "stop" and end[-1] == "[DONE]"
    # the context the turn used (the last prompt) and every round's completion
    assert end[1]["usage"] == {"prompt_tokens": 150, "completion_tokens": 15, "total_tokens": 165}


def test_the_last_round_has_no_web_search_tool():
    loop = websearch.SearchLoop(json.dumps({**CHAT, "tools": [websearch.TOOL]}).encode(), max_rounds=1)
    loop.feed(chat_sse(tool_call_chunk(0, "c", "web_search", '{"query": "q"}'), chat_chunk(finish="tool_calls")))
    _, step = loop.end_round(ok=True)
    loop.next_round(["r"])
    nxt = json.loads(loop.body)
    assert "tools" not in nxt and "tool_choice" not in nxt


def test_max_tool_calls_bounds_the_calls_run_across_rounds():
    """The request's max_tool_calls (2): a round's third search is not run (the model reads that
    it was not), no later round offers the search, and a search the model makes anyway is held
    back (never the client's function_call): a ``Search`` refused with the bound, and the turn
    ends after its round."""
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5, max_calls=2)
    loop.feed(chat_sse(*[tool_call_chunk(i, f"s{i}", "web_search", f'{{"query": "q{i}"}}') for i in range(3)],
                       chat_chunk(finish="tool_calls")))
    _, steps = loop.end_round(ok=True)
    assert steps == [websearch.Search("s0", "q0"), websearch.Search("s1", "q1")]
    assert loop.next_round(["r0", "r1"]) is None
    nxt = json.loads(loop.body)
    assert [(m["tool_call_id"], m["content"]) for m in nxt["messages"][-3:]] == [
        ("s0", "r0"), ("s1", "r1"), ("s2", toolloop.NOT_RUN)]
    assert [t["function"]["name"] for t in nxt["tools"]] == ["exec"]  # (rounds were left: the calls were not)
    out = parse_chat_sse(loop.feed(chat_sse(tool_call_chunk(0, "s3", "web_search", '{"query": "q3"}'),
                                            chat_chunk(finish="tool_calls"))))
    assert not [c for c in out if c["choices"][0]["delta"].get("tool_calls")]  # held back: the gateway's
    _, steps = loop.end_round(ok=True)
    assert [(s.call_id, s.query) for s in steps] == [("s3", "q3")]
    assert steps[0].refused.startswith("Not run: ") and "max_tool_calls" in steps[0].refused
    assert isinstance(loop.next_round([steps[0].refused]), toolloop.Finish)


def test_client_tools_in_the_same_round_end_the_turn_there():
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    out = parse_chat_sse(loop.feed(chat_sse(tool_call_chunk(0, "s", "web_search", '{"query": "q"}'),
                                            tool_call_chunk(1, "e", "exec", "{}"), chat_chunk(finish="tool_calls"))))
    assert [c["choices"][0]["delta"]["tool_calls"][0]["id"] for c in out] == ["e"]  # only the client's call
    _, step = loop.end_round(ok=True)
    assert isinstance(step, toolloop.Finish)
    assert parse_chat_sse(step.tail)[0]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_filter_reads_every_dialect_as_the_translator_does():
    """A choice with index null, a call keyed by its id (no index), arguments sent as an object:
    the filter reads them with the translator's reader (chatstream.py), so the search is still
    held back and the round's assistant message still has the text and the call."""
    def null(d, finish=None) -> dict:
        return {"object": "chat.completion.chunk", "choices": [{"index": None, "delta": d, "finish_reason": finish}]}

    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    search = {"id": "call_s", "type": "function", "function": {"name": "web_search", "arguments": {"query": "mitmproxy"}}}
    out = parse_chat_sse(loop.feed(chat_sse(null({"content": "Let me look."}), null({"tool_calls": [search]}),
                                            null({}, "tool_calls"))))
    assert out == [null({"content": "Let me look."})]
    _, step = loop.end_round(ok=True)
    assert step == [websearch.Search("call_s", "mitmproxy")]
    loop.next_round(["1. result"])
    assistant = json.loads(loop.body)["messages"][-2]
    assert assistant["content"] == "Let me look."
    assert assistant["tool_calls"][0]["function"] == {"name": "web_search", "arguments": '{"query":"mitmproxy"}'}


def test_a_chunk_with_a_search_and_a_client_call_goes_on_without_the_search():
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    both = chat_chunk({"tool_calls": [
        {"id": "s", "type": "function", "function": {"name": "web_search", "arguments": {"query": "q"}}},
        {"id": "e", "type": "function", "function": {"name": "exec", "arguments": {"cmd": "ls"}}}]})
    out = parse_chat_sse(loop.feed(chat_sse(both, chat_chunk(finish="tool_calls"))))
    # re-encoded: the client's call only, keyed as before (by its id), arguments as the reader read them
    assert [c["choices"][0]["delta"] for c in out] == [
        {"tool_calls": [{"id": "e", "function": {"name": "exec", "arguments": '{"cmd":"ls"}'}}]}]
    _, step = loop.end_round(ok=True)
    assert isinstance(step, toolloop.Finish)  # the client runs its call first


def test_a_re_encoded_chunk_keeps_the_models_refusal():
    """A chunk that also holds the gateway's own call is written again without it: its text,
    refusal (``delta.refusal``: the translator makes it the message's refusal part) and the
    client's deltas stay, in the order the reader read them."""
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    both = chat_chunk({"content": "well", "refusal": "I can't search that.", "tool_calls": [
        {"id": "s", "type": "function", "function": {"name": "web_search", "arguments": {"query": "q"}}}]})
    out = parse_chat_sse(loop.feed(chat_sse(both, chat_chunk(finish="stop"))))
    assert out[0]["choices"][0]["delta"] == {"content": "well", "refusal": "I can't search that."}, out
    # the round's assistant message, the next round's history, keeps what the model said: its
    # refusal as text, as a refusal part of a client's history is lowered (lowering.py)
    _, step = loop.end_round(ok=True)
    assert step == [websearch.Search("s", "q")]
    loop.next_round(["1. result"])
    assert json.loads(loop.body)["messages"][-2]["content"] == "wellI can't search that."


def test_a_round_whose_body_holds_no_sse_event_reaches_the_translator_whole():
    """A completion (or an error) written as one pretty-printed JSON body under the stream's
    content type: the reader reads it whole at the end of the round, the filter passes the
    answer on without its ending, and the translator answers as it would without the filter."""
    completion = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Here.", "reasoning_content": "easy"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}
    error = {"error": {"message": "model not found", "type": "invalid_request_error"}}
    for body in (json.dumps(completion, indent=2).encode(), json.dumps(error, indent=2).encode()):
        turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True}).encode(), LoweringOptions(),
                          "resp_" + "b" * 32, 0)
        alone, behind = turn.translator(), turn.translator()
        want = alone.feed(body) + alone.finish()
        loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
        got = behind.feed(loop.feed(body))
        tail, step = loop.end_round(ok=True)
        got += behind.feed(tail) + behind.feed(step.tail) + behind.finish()
        assert got == want
    assert alone.response()["status"] == "failed" and "model not found" in alone.response()["error"]["message"]


def test_a_round_answered_with_one_json_body_is_read_as_its_stream():
    """A backend that ignores ``stream`` answers each round with one JSON ``chat.completion``
    (the relay hands it to ``ToolLoop.whole``): the loop reads it as the same answer streamed,
    its search held back and run, its ending held, so the next round's request, the turn's end
    and what the translator makes of it all are the stream's. An error body is not the loop's
    (None: the translator reads it whole)."""
    def completion(message: dict, finish: str, prompt: int, completion: int) -> bytes:
        return json.dumps(chat_completion(message, finish, prompt, completion)).encode()

    call = {"id": "call_1", "type": "function", "function": {"name": "web_search", "arguments": '{"query": "q"}'}}
    whole = [completion({"content": "Looking.", "reasoning_content": "hm", "tool_calls": [call]}, "tool_calls",
                        100, 10),
             completion({"content": "Here."}, "stop", 150, 5)]
    streams = [chat_sse(chat_chunk({"reasoning_content": "hm"}), chat_chunk({"content": "Looking."}),
                        tool_call_chunk(0, "call_1", "web_search", '{"query": "q"}'), chat_chunk(finish="tool_calls"),
                        usage(100, 10)),
               chat_sse(chat_chunk({"content": "Here."}), chat_chunk(finish="stop"), usage(150, 5))]
    runs = []
    for answers, read in ((streams, "feed"), (whole, "whole")):
        turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True}).encode(), LoweringOptions(),
                          "resp_" + "b" * 32, 0)
        translator = turn.translator()
        loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
        out, bodies, steps = b"", [], []
        for answer in answers:
            out += translator.feed(getattr(loop, read)(answer))
            tail, step = loop.end_round(ok=True)
            out += translator.feed(tail)
            steps.append(step)
            if isinstance(step, toolloop.Finish):
                out += translator.feed(step.tail)
            else:
                assert loop.next_round(["1. result"]) is None
                bodies.append(json.loads(loop.body))
        runs.append((out + translator.finish(), bodies, steps, translator.response()))
    assert runs[1] == runs[0]
    _, bodies, steps, response = runs[1]
    assert steps[0] == [websearch.Search("call_1", "q")]
    assert bodies[0]["messages"][-2]["tool_calls"][0]["function"] == call["function"]
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"]  # (no function_call)
    assert response["usage"]["input_tokens"] == 150 and response["usage"]["output_tokens"] == 15
    error = json.dumps({"error": {"message": "model not found", "type": "invalid_request_error"}}).encode()
    assert websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5).whole(error) is None


# Characters a whole answer's strings are made of: plain, JSON's escapes (quotes, backslashes,
# control characters: 2 to 6 bytes), 2 to 4 bytes of UTF-8, think tags, and lone surrogates (a
# backend's "\ud800" escape: the reader reads U+FFFD; the body goes out with backslashreplace).
_PIECES = st.one_of(st.characters(), st.sampled_from(
    ['"', "\\", "\n", "\r", "\t", "\x00", "\x01", "\x1f", "\x7f", "\u2028", "\u00f6", "\U0001f600", "\ud800",
     "\udfff", "<think>", "</think>", " "]))


def _long_text(data, bound: int, min_size: int = 0) -> str:
    """A string of up to ~2 × ``bound`` bytes: a short run of ``_PIECES`` repeated."""
    run = "".join(data.draw(st.lists(_PIECES, min_size=max(1, min_size), max_size=12)))
    most = 2 * bound // max(1, len(run.encode("utf-8", "backslashreplace")))
    return run * data.draw(st.integers(min_value=min(1, most) if min_size else 0, max_value=most))


def _merged(calls: list[tuple], drop=None) -> list[tuple]:
    """The deltas a sink was told, those of a kind in a row joined (a call's: of the same call),
    without the calls ``drop(name)`` says the gateway holds; the rest (start, usage…) left out.
    A call's key is told as the rank of its call among those kept (a key is the reader's name
    for a call: a held call before it may change it, not which deltas are one call)."""
    merged: list[tuple] = []
    names: dict = {}
    for what, *value in calls:  # (whose a call is comes with its first name, wherever that comes)
        if what == "tool":
            names[value[0]] = names.get(value[0]) or value[2]
    ranks: dict = {}
    for what, *value in calls:
        if what == "tool":
            key = value[0]
            if drop is not None and drop(names[key]):
                continue
            value[0] = ranks.setdefault(key, len(ranks))
        elif what not in ("text", "reasoning", "refusal", "logprobs"):
            continue
        last = merged[-1] if merged else (None,)
        if what == "tool" and last[0] == "tool" and last[1] == value[0]:
            args = None if last[4] is None and value[3] is None else (last[4] or "") + (value[3] or "")
            # (a call's id and name are the first it was given, in whichever of its deltas: an empty
            # first one, then one on the same index naming it, are one call of that name)
            merged[-1] = ("tool", last[1], last[2] or value[1], last[3] or value[2], args)
        elif what == last[0] and what != "tool":
            merged[-1] = (what, last[1] + value[0])
        else:
            merged.append((what, *value))
    return merged


def _moved(calls: list[tuple]) -> list[tuple]:
    """What a sink was told, each call's deltas before its name moved to right before its naming
    delta, a call never named left out: what a consumer makes of a call's early deltas (held till
    the name, then the call's: the translator's ``_tool_wait``), and where the filter puts them."""
    out: list[tuple] = []
    early: dict = {}
    for what, *value in calls:
        if what == "tool" and early.get(value[0], ()) is not None:
            if value[2] is None:
                early.setdefault(value[0], []).append((what, *value))
                continue
            out += early.get(value[0]) or []
            early[value[0]] = None  # (named)
        out.append((what, *value))
    return out


def _read(out: bytes, max_event: int) -> list[tuple]:
    sink = Calls()
    reader = ChunkReader(sink, max_event)
    reader.feed(out)
    reader.finish()
    assert not reader.parser.oversized
    return sink.calls


def test_a_whole_answer_past_one_events_bound_goes_on_in_several_events_within_it():
    """A round's whole JSON answer may be up to 8 × the bound of one SSE event (``max_event``),
    its deltas all in one payload: the filter passes them on in several events, each within the
    bound the translator's parser holds, and they read back as the same deltas in the same order
    (long ones cut into several of their kind: text, reasoning, a call's arguments, logprobs),
    the same bytes every time. The translator behind it makes of them the Response it makes of
    the answer in one event (read without a bound). Before: one event, refused by the parser."""
    bound = 256 << 10  # (and 2 MiB an answer's bound: 8 × it)
    text = "".join(f"w\u00f6rd{i} \"q\"\\\n\x01\U0001f600 " for i in range(15_000))  # 1 to 6 bytes a char
    reasoning = "".join(f"step{i}; " for i in range(30_000))
    args = json.dumps({"cmd": text}, ensure_ascii=False)
    lp = [{"token": f"t{i}" + "x" * 400, "logprob": -0.5, "bytes": [116], "top_logprobs": []} for i in range(1_000)]
    calls = [{"id": "call_s", "type": "function", "function": {"name": "web_search", "arguments": '{"query": "q"}'}},
             {"id": "call_x", "type": "function", "function": {"name": "exec", "arguments": args}}]
    answer = chat_completion({"reasoning_content": reasoning, "content": text, "tool_calls": calls}, "tool_calls")
    answer["choices"][0]["logprobs"] = {"content": lp}
    body = json.dumps(answer, ensure_ascii=False).encode()
    split, whole = (websearch.SearchLoop(json.dumps(CHAT).encode(), 5, max_event).whole(body)
                    for max_event in (bound, 1 << 30))
    assert websearch.SearchLoop(json.dumps(CHAT).encode(), 5, bound).whole(body) == split
    assert len(parse_chat_sse(whole)) == 1 and len(whole) > 4 * bound
    events = split.split(b"\n\n")[:-1]
    assert len(events) > 4 and max(len(e) + 2 for e in events) <= bound

    assert _merged(_read(split, bound)) == _merged(_read(whole, 1 << 30)) == [
        ("reasoning", reasoning), ("logprobs", lp), ("text", text), ("tool", 0, "call_x", "exec", args)]
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True, "top_logprobs": 1}).encode(),
                      LoweringOptions(), "resp_" + "d" * 32, 0)
    responses = []
    for out, max_event in ((split, bound), (whole, 1 << 30)):
        translator = turn.translator(max_event)
        translator.feed(out)
        translator.feed(toolloop.final_chunks("tool_calls", []))
        translator.finish()
        responses.append(translator.response())
    assert responses[0] == responses[1]
    assert responses[0]["status"] == "completed" and responses[0]["output"][-1]["arguments"] == args


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_property_a_whole_answer_split_within_any_bound_reads_back_as_itself(data):
    """Any whole answer (text, reasoning, refusal, client calls with any ids, names, indexes and
    arguments, a held web_search call, logprobs) past a small bound: every event the filter
    writes is within it (the translator's parser refuses none), the same bytes on a second run,
    and they read back as the deltas the answer holds, less the held call and any call without a
    name (an empty one: none, as the translator reads it): the Response the translator makes of
    them is the one it makes of the answer unsplit."""
    # (max_upstream_event_mb is 1 at least; the core takes any bound: small ones cut more)
    bound = data.draw(st.integers(min_value=4 << 10, max_value=64 << 10), label="bound")
    message: dict = {"role": "assistant"}
    if data.draw(st.booleans()):
        message[data.draw(st.sampled_from(["reasoning_content", "reasoning"]))] = _long_text(data, bound, 1)
    if data.draw(st.booleans()):  # as a string, or Mistral's parts (thinking between texts)
        text = _long_text(data, bound)
        if data.draw(st.booleans()):
            text = [text, {"type": "thinking", "thinking": [{"type": "text", "text": _long_text(data, bound // 4)}]},
                    {"type": "text", "text": _long_text(data, bound // 4)}]
        message["content"] = text
    if data.draw(st.booleans()):
        message["refusal"] = _long_text(data, bound // 2, 1)
    calls = []
    for _ in range(data.draw(st.integers(min_value=0, max_value=3))):
        name = data.draw(st.text(max_size=12))
        # (a call without a name may bring an id and arguments: on the index of a named call after
        # it, they are that call's, as the reader reads the answer unsplit)
        shape = data.draw(st.sampled_from(["none", "object", "string"]))  # (object: Ollama's)
        args = None if shape == "none" else _long_text(data, bound)
        call = {"type": "function", "function": {"name": name,
                                                 "arguments": {"cmd": args} if shape == "object" else args}}
        call_id = data.draw(st.one_of(st.none(), st.sampled_from(["call_a", "call_b", "0"]), st.text(max_size=12)))
        if call_id is not None:
            call["id"] = call_id
        index = data.draw(st.one_of(st.none(), st.integers(min_value=0, max_value=2)))
        if index is not None:
            call["index"] = index
        calls.append(call)
    if data.draw(st.booleans()):  # the gateway's own call, held back, anywhere among them (on an index too)
        held = {"id": "call_s", "type": "function", "function": {"name": "web_search", "arguments": '{"query":"q"}'}}
        index = data.draw(st.one_of(st.none(), st.integers(min_value=0, max_value=2)))
        calls.insert(data.draw(st.integers(min_value=0, max_value=len(calls))),
                     held if index is None else {"index": index, **held})
    if calls:
        message["tool_calls"] = calls
    answer = chat_completion(message, "tool_calls" if calls else "stop")
    if data.draw(st.booleans()):
        tokens = data.draw(st.lists(st.lists(_PIECES, min_size=1, max_size=4).map("".join), max_size=12)) \
            * data.draw(st.integers(min_value=1, max_value=bound // 256))
        answer["choices"][0]["logprobs"] = {"content": [
            {"token": t, "logprob": -0.25 * i, "bytes": list(t.encode("utf-8", "backslashreplace")),
             "top_logprobs": [{"token": t, "logprob": -0.5, "bytes": None}]} for i, t in enumerate(tokens)]}
    body = json.dumps(answer, ensure_ascii=False).encode("utf-8", "backslashreplace")
    huge = 1 << 30

    def whole(max_event: int) -> bytes:
        return websearch.SearchLoop(json.dumps(CHAT).encode(), 5, max_event).whole(body)

    split, unsplit = whole(bound), whole(huge)
    assert whole(bound) == split  # the same bytes every time
    events = split.split(b"\n\n")
    assert events[-1] == b"" and all(len(e) <= bound for e in events)
    # (less the held call, and a call never named: none, as the translator reads it; a call's
    # deltas before its name, which the filter moves to right before it, there)
    answered = _merged(_moved(_read(body, huge)), lambda name: name == "web_search")
    assert _merged(_read(split, bound)) == _merged(_read(unsplit, huge)) == answered
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True, "top_logprobs": 1}).encode(),
                      LoweringOptions(think_tags={"*": "off"}), "resp_" + "e" * 32, 0)
    # (think tags off: think.py's splitter reads "<think><think>" in one delta otherwise than
    # cut after a "<", a matter of its own, not of the cut)
    responses = []
    for out, max_event in ((split, bound), (split, huge), (unsplit, huge)):
        translator = turn.translator(max_event)
        translator.feed(out)
        translator.feed(toolloop.final_chunks(answer["choices"][0]["finish_reason"], []))
        translator.finish()
        responses.append(translator.response())
        # (the bound's translator holds 8 × it of output, each item and token of logprobs counted
        # more than its bytes: a large answer may outgrow that, as it would have streamed)
        assert translator.error is None or specific_code(translator.error) == OUTPUT_TOO_LARGE != OVERSIZED
    assert responses[1] == responses[2] and responses[1]["status"] == "completed"
    if responses[0]["status"] == "completed":
        assert responses[0] == responses[2]


def test_a_re_encoded_chunk_with_a_lone_surrogate_escape():
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    out = loop.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a\\ud800"},"finish_reason":"stop"}]}\n\n')
    # (read as U+FFFD, as a backend's invalid UTF-8 is: chatstream.py)
    assert [c["choices"][0]["delta"] for c in parse_chat_sse(out)] == [{"content": "a\ufffd"}]


def test_logprobs_stay_on_the_text_of_a_re_encoded_chunk():
    """vLLM sends the last token and the finish reason in one chunk: the filter writes it again
    without the finish reason, with the token's logprobs, so the translator behind it gives the
    answer (and its logprobs) byte for byte as it gives them alone."""
    def lp(token: str) -> dict:
        return {"content": [{"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}]}

    first, last = chat_chunk({"content": "He"}), chat_chunk({"content": "re."}, finish="stop")
    first["choices"][0]["logprobs"], last["choices"][0]["logprobs"] = lp("He"), lp("re.")
    body = chat_sse(first, last, usage(9, 2))
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    out = loop.feed(body)
    assert parse_chat_sse(out)[1] == {"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "re."}, "logprobs": lp("re.")}]}
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True, "top_logprobs": 1}).encode(),
                      LoweringOptions(), "resp_" + "c" * 32, 0)
    alone, behind = turn.translator(), turn.translator()
    want = alone.feed(body) + alone.finish()
    _, step = loop.end_round(ok=True)
    got = behind.feed(out) + behind.feed(step.tail) + behind.finish()
    assert got == want
    (message,) = alone.response()["output"]
    assert [t["token"] for t in message["content"][0]["logprobs"]] == ["He", "re."]


def test_a_failed_or_cut_round_ends_the_loop_as_it_ended():
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    loop.feed(b'data: {"choices":[{"index":0,"delta":{"content":"par')
    _, step = loop.end_round(ok=False)
    assert step == toolloop.Finish(b"")  # nothing added: the translator reports the stream as cut
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    loop.feed(chat_event({"content": "x"}, finish="length"))
    _, step = loop.end_round(ok=False)
    assert parse_chat_sse(step.tail)[0]["choices"][0]["finish_reason"] == "length"


def test_the_loops_work_is_every_rounds_usage_and_an_estimate_of_one_without():
    """What the rounds made the backend do (what a client's tpm spends, what the metrics count):
    each round's own usage, where the client's usage is the last prompt plus the completions; a
    round in flight (its client left) or cut without a usage by its request's and output's size
    (4 bytes a token); a round that failed before any output, nothing."""
    def searched() -> websearch.SearchLoop:
        loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
        loop.feed(chat_sse(tool_call_chunk(0, "call_1", "web_search", '{"query":"q"}'),
                           chat_chunk(finish="tool_calls"), usage(100, 10)))
        assert loop.work().tokens == 110  # (in flight: its usage came)
        loop.end_round(ok=True)
        loop.next_round(["1. result"])
        return loop

    loop = searched()
    assert loop.work().tokens == 110 + -(-len(loop.body) // 4)  # round 2 asked: its request, by its size
    loop.feed(chat_sse(chat_chunk({"content": "Here."}), done=False))
    second = 110 + -(-(len(loop.body) + 5) // 4)
    assert loop.work().tokens == loop.work(failed=True).tokens == second  # ... and its output so far
    loop.feed(chat_sse(chat_chunk(finish="stop"), usage(150, 5)))
    _, step = loop.end_round(ok=True)
    assert parse_chat_sse(step.tail)[1]["usage"]["total_tokens"] == 165  # (the client's)
    work = loop.work()
    assert work.tokens == 265
    assert (work.usage["input_tokens"], work.usage["output_tokens"], work.usage["total_tokens"]) == (250, 15, 265)

    loop = searched()
    loop.feed(chat_sse(chat_chunk({"content": "Here."}), done=False))
    loop.end_round(ok=False)  # cut after some output, no usage
    assert loop.work().tokens == second
    loop = searched()
    loop.end_round(ok=False)  # refused (an error status: the translator reads it, not the loop)
    assert loop.work().tokens == loop.work(failed=True).tokens == 110
    loop = searched()  # a round whose call failed, left before ``end_round``
    assert loop.work(failed=True).tokens == 110 and loop.work().usage["input_tokens"] == 100


def test_brave_request_and_answers():
    url, headers = websearch.brave_request("https://api.search.brave.com/", "k-123", "a b&c", 3)
    assert url == "https://api.search.brave.com/res/v1/web/search?q=a+b%26c&count=3"
    assert (b"x-subscription-token", b"k-123") in headers
    text, urls = websearch.read_brave("q", 200, json.dumps({"web": {"results": [
        {"title": "<b>T</b> &amp; U", "url": "https://x", "description": "d"}] * 5}}).encode(), 2, "k-123")
    assert urls == [("https://x", "T & U")] * 2 and "1. T & U" in text and "3." not in text
    text, urls = websearch.read_brave("q", 429, b'{"error": "quota for k-123"}', 2, "k-123")
    assert urls == [] and text.startswith("Web search failed (HTTP 429)") and "k-123" not in text
    assert websearch.read_brave("q", 200, b"<html>", 2, "k")[0].startswith("Web search failed")
    assert websearch.read_brave("q", 200, b"{}", 2, "k") == ("No web results for: q", [])


def test_the_client_sees_a_web_search_call_item():
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True, "tools": [{"type": "web_search"}]}).encode(),
                      LoweringOptions(web_search=True), "resp_" + "a" * 32, 0)
    t = turn.translator()
    out = t.accepted() + t.search_started("call_1", "mitmproxy") + t.search_done("call_1", (("https://x", "X"),))
    out += t.feed(chat_sse(chat_chunk({"content": "done"}), chat_chunk(finish="stop"))) + t.finish()
    events = parse_sse(out)
    types = [e["type"] for e in events]
    i = types.index("response.output_item.added")
    assert types[i:i + 5] == ["response.output_item.added", *websearch.STARTED_EVENTS, websearch.DONE_EVENT,
                              "response.output_item.done"]
    item = events[-1]["response"]["output"][0]
    assert item == websearch.call_item(item["id"], "mitmproxy", (("https://x", "X"),))
    assert item["action"]["sources"] == [{"type": "url", "url": "https://x"}]


def test_a_search_after_the_last_round_is_not_run_again():
    """The last round offers no web_search; a model that calls it anyway does not loop: the call
    is refused (a failed web_search_call, never the client's function_call: the client declared
    none), and the turn ends after its round."""
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=1)
    loop.feed(chat_sse(tool_call_chunk(0, "s1", "web_search", '{"query": "q"}'), chat_chunk(finish="tool_calls")))
    _, step = loop.end_round(ok=True)
    loop.next_round(["r"])
    again = parse_chat_sse(loop.feed(chat_sse(tool_call_chunk(0, "s2", "web_search", '{"query": "q"}'),
                                              chat_chunk(finish="tool_calls"))))
    assert not [c for c in again if c["choices"][0]["delta"].get("tool_calls")]  # held back, not passed on
    _, steps = loop.end_round(ok=True)
    assert [(s.call_id, s.query) for s in steps] == [("s2", "q")] and "max_web_search_rounds" in steps[0].refused
    assert isinstance(loop.next_round([steps[0].refused]), toolloop.Finish)


def _round(chunks: list) -> bytes:
    """What the translator reads of one round's ``chunks`` (dicts): the loop's output, its tail."""
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    out = loop.feed(chat_sse(*chunks, chat_chunk(finish="tool_calls")))
    return out + loop.end_round(ok=True)[0]


def _one(index, call_id, name, args) -> dict:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def test_client_calls_on_a_reused_index_and_id_around_a_held_call_stay_two_calls():
    """A backend that numbers every call 0 and sends one id twice: f "A", the held web_search,
    g "B", all index 0, f's and g's id the same. The reader reads three calls (a new id on a
    named index opens a call: call_s after call_a, then call_a after call_s); the client must
    get two, f "A" and g "B", whether each call comes in chunks of its own (passed on), all in
    one chunk (written again) or in a whole body. Before: one call f "AB" (g's naming delta,
    without call_s before it, read as f's again)."""
    f, s, g = _one(0, "call_a", "f", "A"), _one(0, "call_s", "web_search", '{"query":"q"}'), _one(0, "call_a", "g", "B")
    want = [("tool", 0, "call_a", "f", "A"), ("tool", 1, "call_a", "g", "B")]
    stream = [chat_chunk({"tool_calls": [c]}) for c in (f, s, g)]
    backend = chat_sse(*stream, chat_chunk(finish="tool_calls"))
    assert _merged(_read(backend, 1 << 20), lambda name: name == "web_search") == want  # (the reader's three, less one)
    assert _merged(_read(_round(stream), 1 << 20)) == want  # each in its own chunk
    assert _merged(_read(_round([chat_chunk({"tool_calls": [f, s, g]})]), 1 << 20)) == want  # one chunk
    split = [chat_chunk({"tool_calls": [dict(f, function={"name": "f", "arguments": ""})]}),
             chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "A"}}]}), chat_chunk({"tool_calls": [s]}),
             chat_chunk({"tool_calls": [dict(g, function={"name": "g", "arguments": ""})]}),
             chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "B"}}]})]
    assert _merged(_read(_round(split), 1 << 20)) == want  # arguments after the name: g's go on as g's
    whole = websearch.SearchLoop(json.dumps(CHAT).encode(), 5).whole(
        json.dumps(chat_completion({"tool_calls": [f, s, g]}, "tool_calls")).encode())
    assert _merged(_read(whole, 1 << 20)) == want



def _client_sees(answer: bytes, read: str = "feed") -> tuple[list, object, toolloop.ToolLoop]:
    """(what a client gets of a round answered with ``answer``, streamed, or whole with ``read``
    "whole", through the filter and a real translator: the turn's function calls if it ends
    there, else the items added so far; the loop's next step; the loop)."""
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True}).encode(), LoweringOptions(),
                      "resp_" + "f" * 32, 0)
    translator = turn.translator()
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    out = translator.feed(getattr(loop, read)(answer))
    tail, step = loop.end_round(ok=True)
    out += translator.feed(tail)
    if isinstance(step, toolloop.Finish):
        out += translator.feed(step.tail) + translator.finish()
        response = translator.response()
        assert response["status"] == "completed", response
        return [(o["call_id"], o["name"], o["arguments"]) for o in response["output"]], step, loop
    return [e["item"] for e in parse_sse(out) if e["type"] == "response.output_item.added"] if out else [], step, loop


def test_a_calls_deltas_before_its_name_wait_for_it():
    """Some backends send a call's id or arguments before its name; whose call it is (the
    gateway's, held back, or the client's) comes with the name. The held web_search's arguments
    come first on index 0, then the client's exec on index 0 (a new id), then a client's exec
    whose arguments come first on index 1: the client gets the two execs, each with its own
    arguments whole, and nothing of the search, streamed or in one JSON body. Before: the
    search's first arguments went on, and the translator gave them to the next call named on
    index 0 (exec '{"query": {"cmd": "ls"}')."""
    entries = [{"index": 0, "id": "call_s", "type": "function", "function": {"arguments": '{"query": '}},
               {"index": 0, "function": {"name": "web_search", "arguments": '"q"}'}},
               {"index": 0, "id": "call_f", "type": "function", "function": {"name": "exec", "arguments": ""}},
               {"index": 0, "function": {"arguments": '{"cmd": "ls"}'}},
               {"index": 1, "function": {"arguments": '{"cmd": '}},
               {"index": 1, "id": "call_g", "type": "function", "function": {"name": "exec", "arguments": '"pwd"}'}}]
    want = [("call_f", "exec", '{"cmd": "ls"}'), ("call_g", "exec", '{"cmd": "pwd"}')]
    stream = chat_sse(*[chat_chunk({"tool_calls": [e]}) for e in entries], chat_chunk(finish="tool_calls"))
    one = chat_sse(chat_chunk({"tool_calls": entries}), chat_chunk(finish="tool_calls"))
    whole = json.dumps(chat_completion({"tool_calls": entries}, "tool_calls")).encode()
    for answer, read in ((stream, "feed"), (one, "feed"), (whole, "whole")):
        calls, step, _ = _client_sees(answer, read)
        assert calls == want, read
        assert isinstance(step, toolloop.Finish)  # (the client's calls first)


def test_a_call_that_never_gets_a_name_is_no_call():
    """A call whose deltas never bring a name by the end of the round: the translator holds its
    arguments for a name that never comes, and it never reaches the client; the filter drops it
    too: no client call (the gateway's search runs), not in the next round's history (a call
    without a name, which a backend refuses). Before: read as a client's call, it ended the
    turn there, its search not run."""
    search = {"index": 0, "id": "call_s", "type": "function",
              "function": {"name": "web_search", "arguments": '{"query": "q"}'}}
    nameless = {"index": 1, "id": "call_x", "type": "function", "function": {"arguments": '{"cmd": "ls"}'}}
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True}).encode(), LoweringOptions(),
                      "resp_" + "f" * 32, 0)
    alone = turn.translator()  # (what the translator makes of a nameless call: nothing)
    alone.feed(chat_sse(chat_chunk({"tool_calls": [nameless]}), chat_chunk(finish="stop")))
    alone.finish()
    assert alone.response()["output"] == []
    stream = chat_sse(chat_chunk({"tool_calls": [search]}), chat_chunk({"tool_calls": [nameless]}),
                      chat_chunk(finish="tool_calls"))
    whole = json.dumps(chat_completion({"tool_calls": [nameless, search]}, "tool_calls")).encode()
    for answer, read in ((stream, "feed"), (whole, "whole")):
        added, step, loop = _client_sees(answer, read)
        assert step == [websearch.Search("call_s", "q")], read
        assert added == [], read  # nothing of either call
        assert loop.next_round(["1. result"]) is None
        assistant = json.loads(loop.body)["messages"][-2]
        assert [c["id"] for c in assistant["tool_calls"]] == ["call_s"]

_CALL_IDS = st.sampled_from([None, "", "call_a", "call_b", "call_s"])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from([0, 1, None, "absent", -1]), _CALL_IDS,
                                   st.sampled_from([None, "", "web_search", "f", "g"]),
                                   st.sampled_from(["A", None, "B", "", {"q": 1}])),
                         min_size=1, max_size=3), min_size=1, max_size=8))
@example([[(0, "call_s", None, "A")], [(0, None, "web_search", "B")], [(0, "call_a", "f", "A")]])  # (the held
# search's "A" came before its name: on main the translator gave it to f, the next call named on index 0)
@example([[(1, "call_a", None, None)], [(0, "call_s", "web_search", "A")], [(1, None, "f", "B")]])  # (f's id
# before its name, without arguments: the filter dropped it, and f had none behind it)
@example([[(None, "call_b", None, {"q": 1})], [(None, "call_b", "f", None)], [("absent", None, None, "A")],
          [(0, "call_s", "web_search", "")], [("absent", None, "g", None)]])  # (index null and absent)
@example([[(-1, "call_b", "f", None), (-1, "call_s", "web_search", None), (-1, "call_b", "f", "A")]])
@example([[(0, "call_a", "f", None)], [(0, "call_s", "web_search", None), (0, "call_a", "g", None), (-1, None, "h", "A")]])
# (a backend's negative index, which the filter gives a client call it moves: f again after the
# search went on under -1, read as f's; h on -1 was read as part of g, moved there)
def test_property_a_streamed_round_reads_back_as_its_calls_less_the_held_ones(chunks):
    """Any round of streamed tool-call deltas (indexes reused, null or absent, ids repeated,
    names and arguments in any order, arguments as JSON objects, ids and arguments before a
    call's name, calls never named, web_search calls among them) reads back, behind the filter,
    as the calls the translator reads of the backend's stream less the held ones (``_opened``:
    each with its id, name and arguments whole, those before its name too; a call never named
    is none), and as the same deltas, grouped into the same calls, where a delta before its
    call's name goes on right before the naming one (``_moved``), or not at all. The searches
    the loop runs have the ids the reader read."""
    stream = [chat_chunk({"tool_calls": [_entry(*entry) for entry in chunk]}) for chunk in chunks]
    backend = chat_sse(*stream, chat_chunk(finish="tool_calls"))
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    out = loop.feed(backend)
    tail, step = loop.end_round(ok=True)
    behind = _read(out + tail, 1 << 20)
    read = _read(backend, 1 << 20)
    assert _opened(behind) == _opened(read, lambda name: name == "web_search")
    assert _merged(behind) == _merged(_moved(read), lambda name: name == "web_search")
    ids = [call_id for call_id, _, _ in _opened(read)]
    if isinstance(step, list) and all(ids) and len(set(ids)) == len(ids):  # (else the loop makes ids up)
        assert [search.call_id for search in step] == ids


def _opened(calls: list[tuple], drop=None) -> list[tuple]:
    """The calls the translator makes of the deltas a sink was told (translator.py ``on_tool``,
    for a stream of calls alone): (id, name, arguments) each, in the order they open. A call
    opens at the first delta of its key that has a name, with that delta's id and the arguments
    its key had before it; later deltas of its key add theirs; a key never named is no call;
    the calls ``drop(name)`` says the gateway holds are left out."""
    opened: dict = {}
    early: dict = {}
    for what, *value in calls:
        if what != "tool":
            continue
        key, call_id, name, args = value
        call = opened.get(key)
        if call is None:
            if name is None:
                early[key] = early.get(key, "") + (args or "")
                continue
            call = opened[key] = [call_id, name, early.pop(key, "")]
        call[2] += args or ""
    return [tuple(call) for call in opened.values() if drop is None or not drop(call[1])]


def _entry(index, call_id, name, args) -> dict:
    """A ``tool_calls`` entry; ``index`` "absent": none (None: ``"index": null``), other fields
    left out where None."""
    return {**({} if index == "absent" else {"index": index}), **({"id": call_id} if call_id is not None else {}),
            "function": {**({"name": name} if name is not None else {}), **({"arguments": args} if args is not None else {})}}


_THINK_TEXT = st.sampled_from(["<thi", "nk>", "<think>", "</think>", "</thi", "a", " "])
_ROUND_DELTA = st.one_of(
    st.builds(lambda t: {"content": t}, _THINK_TEXT), st.builds(lambda t: {"reasoning_content": t}, _THINK_TEXT),
    st.lists(st.builds(_entry, st.sampled_from(["absent", None, 0, 1]), st.sampled_from([None, "call_a", "call_b"]),
                       st.sampled_from([None, "f", "g"]), st.sampled_from([None, "", "A", {"o": 1}])),
             min_size=1, max_size=2).map(lambda calls: {"tool_calls": calls}))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(_ROUND_DELTA, min_size=1, max_size=8), st.sampled_from(["auto", "on", "off"]))
@example([{"tool_calls": [{"function": {}}]}, {"content": "<think>"}], "auto")  # (a call never named, first)
@example([{"content": "<thi"}, {"tool_calls": [{"index": 0, "function": {"arguments": "A"}}]}, {"content": "nk>"},
          {"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f"}}]}], "on")  # (one named later)
@example([{"tool_calls": [{"index": 1, "id": "call_a", "function": {"arguments": ""}}]},
          {"tool_calls": [{"index": 1, "function": {"name": "f", "arguments": "A"}}]}], "off")  # (its id before its name)
def test_property_a_round_without_a_search_reads_the_same_behind_the_filter(deltas, think):
    """Any round of text, reasoning and tool-call deltas (``<think>`` tags cut anywhere, calls
    with or without index, ids, names and arguments, in any order) that calls no search: the
    translator behind the filter writes byte for byte what it writes alone (test_dialects' rule
    for its fixtures, on any stream). The filter moves a delta before its call's name to right
    before that name, or drops it with a call never named. Before: the translator alone let such
    a delta settle the text held before it, a ``<think>`` tag being read (a call's id before its
    name too, once the reader kept it: the filter dropped it)."""
    backend = chat_sse(*[chat_chunk(d) for d in deltas], chat_chunk(finish="stop"))
    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True}).encode(), LoweringOptions(),
                      "resp_" + "c" * 32, 0)
    turn.ctx.think = think
    alone = turn.translator()
    want = alone.feed(backend) + alone.finish()
    behind = turn.translator()
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    got = b"".join(behind.feed(loop.feed(backend[i:i + 40])) for i in range(0, len(backend), 40))
    tail, step = loop.end_round(ok=True)
    got += behind.feed(tail) + behind.feed(step.tail) + behind.finish()
    assert got == want


def test_a_rounds_last_logprobs_without_text_stay_out_of_the_next_rounds_answer():
    """vLLM ends a round with ``"delta": {}``, the finish reason and the end token's logprobs. A
    choice of logprobs alone hands them to the text that follows (chatstream.py), and the finish
    kept them: they went on the answer after the search (found in review)."""
    def lp(token: str) -> dict:
        return {"content": [{"token": token, "logprob": -1.0, "bytes": list(token.encode()), "top_logprobs": []}]}

    turn = begin_turn(json.dumps({"model": "m", "input": "x", "stream": True, "top_logprobs": 1}).encode(),
                      LoweringOptions(), "resp_" + "a" * 32, 0)
    tr = turn.translator()
    loop = websearch.SearchLoop(json.dumps(CHAT).encode(), max_rounds=5)
    end = chat_chunk(finish="tool_calls")
    end["choices"][0]["logprobs"] = lp("<|eot|>")
    out = tr.feed(loop.feed(chat_sse(tool_call_chunk(0, "call_1", "web_search", '{"query":"q"}'), end)))
    tail, step = loop.end_round(ok=True)
    out += tr.feed(tail) + tr.search_started("call_1", "q") + tr.search_done("call_1", ())
    loop.next_round(["1. result"])
    answer = chat_chunk({"content": "Answer"})
    answer["choices"][0]["logprobs"] = lp("Answer")
    out += tr.feed(loop.feed(chat_sse(answer, chat_chunk(finish="stop"))))
    tail, step = loop.end_round(ok=True)
    out += tr.feed(tail) + tr.feed(step.tail) + tr.finish()
    deltas = [e for e in parse_sse(out) if e["type"] == "response.output_text.delta"]
    assert [(e["delta"], [t["token"] for t in e["logprobs"]]) for e in deltas] == [("Answer", ["Answer"])]


def test_citations_name_each_whole_url_in_text_order():
    sources = {"https://a.example/x": "A", "https://a.example/x/y": "AY", "https://é.example": "É"}
    text = "é https://a.example/x/y, then https://a.example/x. https://a.example/xz and (https://é.example)"
    cites = websearch.citations(text, sources)
    assert [(c["url"], c["title"]) for c in cites] == [
        ("https://a.example/x/y", "AY"), ("https://a.example/x", "A"), ("https://é.example", "É")]
    assert all(text[c["start_index"]:c["end_index"]] == c["url"] and c["type"] == "url_citation" for c in cites)
    assert websearch.citations("no links here", sources) == [] and websearch.citations(text, {}) == []
    twice = websearch.citations("https://a.example/x and https://a.example/x", sources)
    assert [c["start_index"] for c in twice] == [0, 24]


def test_a_nameless_calls_id_on_a_named_calls_index_reads_the_same_split_and_unsplit():
    """A whole answer's call without a name, with an id, on the index of a named call after it:
    read unsplit, the two are one call with that id. Before: the filter held a delta before its
    call's name only for its arguments, and one without (an id alone) went nowhere: the call
    behind the filter had no id (found by the split-answer property, the sixteenth session)."""
    calls = [{"type": "function", "function": {"name": "", "arguments": None}},
             {"id": "call_a", "index": 2, "type": "function", "function": {"name": "", "arguments": None}},
             {"type": "function", "function": {"name": "0", "arguments": None}}]
    body = json.dumps(chat_completion({"role": "assistant", "tool_calls": calls}, "tool_calls")).encode()
    split = websearch.SearchLoop(json.dumps(CHAT).encode(), 5, 4096).whole(body)
    assert _merged(_read(split, 4096)) == _merged(_read(body, 1 << 30), lambda name: name is None) \
        == [("tool", 0, "call_a", "0", None)]


def test_a_round_that_also_ran_a_call_goes_on_past_a_refused_one():
    """Web search's rounds spent, the model calls web_search anyway and, in the same round, a
    hosted MCP tool still within its bounds: the search is refused (a failed item, no search) but
    the MCP call runs, and the turn goes on to a round where the model reads both (before: the
    turn ended with that round, the MCP call's result never read). A round in which every call
    was refused still ends the turn (the model would only ask again)."""
    servers = mcp.parse_servers([{"label": "ev", "url": "http://127.0.0.1:3001/mcp"}])
    body = {"model": "m", "input": "hi", "tools": [{"type": "web_search"}, {"type": "mcp", "server_label": "ev",
                                                                              "require_approval": "never"}]}
    t = begin_turn(json.dumps(body).encode(), LoweringOptions(web_search=True), RESP_ID, CREATED, mcp_servers=servers)
    echo = {"name": "echo", "input_schema": {"type": "object", "properties": {"message": {"type": "string"}}}}
    loop = toolloop.ToolLoop(t.chat_body, [websearch.WebSearchTools(1), mcp.McpTools(t.mcp, max_rounds=5)])
    loop.begin([(echo,)])
    loop.feed(chat_sse(tool_call_chunk(0, "s1", "web_search", '{"query": "q1"}'), chat_chunk(finish="tool_calls")))
    _, steps = loop.end_round(ok=True)
    assert [s.refused for s in steps] == [None] and loop.next_round(["results 1"]) is None
    assert "web_search" not in [f["function"]["name"] for f in json.loads(loop.body)["tools"]]  # its rounds spent
    loop.feed(chat_sse(tool_call_chunk(0, "s2", "web_search", '{"query": "q2"}'),
                       tool_call_chunk(1, "m1", "mcp__ev__echo", '{"message": "x"}'), chat_chunk(finish="tool_calls")))
    _, steps = loop.end_round(ok=True)
    assert [(type(s).__name__, s.refused is None) for s in steps] == [("Search", False), ("Call", True)]
    assert loop.next_round([steps[0].refused, "Echo: x"]) is None  # the MCP call ran: the model reads it
    assert [(m["tool_call_id"], m["content"]) for m in json.loads(loop.body)["messages"][-2:]] == [
        ("s2", steps[0].refused), ("m1", "Echo: x")]
    loop.feed(chat_sse(tool_call_chunk(0, "s3", "web_search", '{"query": "q3"}'), chat_chunk(finish="tool_calls")))
    _, steps = loop.end_round(ok=True)
    assert [s.refused is not None for s in steps] == [True]
    assert isinstance(loop.next_round([steps[0].refused]), toolloop.Finish)  # every call refused: the turn ends
