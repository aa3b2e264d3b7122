"""The Response object as the Open Responses specification requires it (resp2chat_core/response.py),
and the request fields it echoes and validates the way OpenAI does (issue 24 items 1, 7, 8).

Every Response and event the suite reads is checked against the spec by tests/helpers.py
(``check_spec``: ``parse_sse`` and the WebSocket client; ``check_body``: every JSON answer read
through ``requests`` or ``openai_client``). This file checks the values: what is echoed, the
documented defaults, ``completed_at``, logprobs, and the 400s.
"""

from __future__ import annotations

import json

import openai
import pytest

from helpers import (DONE, LocalServer, QuietHandler, chat_chunk, chat_completion, chat_event, chat_sse,
                     openai_client, parse_sse, send_json, send_sse, spec_errors)
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.turn import Found, begin_turn

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def turn(body: dict, opts: LoweringOptions = LoweringOptions(), found: Found = Found()):
    return begin_turn(json.dumps({"model": "m", "input": "hi", **body}).encode(), opts, "resp_x", 100, found)


def answer(body: dict, *chunks: bytes, opts: LoweringOptions = LoweringOptions()) -> list[dict]:
    t = turn(body, opts)
    t.ctx.clock = lambda: 107.9
    tr = t.translator()
    return parse_sse(tr.accepted() + tr.feed(b"".join(chunks) + chat_event(finish="stop") + DONE) + tr.finish())


def final(body: dict, opts: LoweringOptions = LoweringOptions()) -> dict:
    return answer(body, chat_event({"content": "ok"}), opts=opts)[-1]["response"]


# --- the defaults, and what is echoed ----------------------------------------------------------


def test_a_request_that_says_nothing_gets_every_field_with_the_documented_defaults():
    events = answer({}, chat_event({"content": "ok"}))
    created, done = events[0]["response"], events[-1]["response"]
    for response in (created, done):
        assert not spec_errors(response, "ResponseResource")
        assert {k: response[k] for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                          "top_logprobs", "service_tier", "background", "store", "truncation",
                                          "tool_choice", "tools", "metadata", "parallel_tool_calls", "text",
                                          "max_tool_calls", "safety_identifier", "prompt_cache_key", "user")} == {
            "temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_logprobs": 0,
            "service_tier": "default", "background": False, "store": True, "truncation": "disabled",
            "tool_choice": "auto", "tools": [], "metadata": {}, "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}}, "max_tool_calls": None, "safety_identifier": None,
            "prompt_cache_key": None, "user": None}
        assert "conversation" not in response
    assert created["completed_at"] is None and created["status"] == "in_progress"
    assert done["completed_at"] == 107 and done["created_at"] == 100  # (the caller's clock: the core reads none)


def test_the_request_values_are_echoed():
    body = {"temperature": 0.2, "top_p": 0.5, "presence_penalty": 0.5, "frequency_penalty": -1, "top_logprobs": 3,
            "user": "u-1", "safety_identifier": "sid", "prompt_cache_key": "pck", "service_tier": "flex",
            "max_tool_calls": 4, "max_output_tokens": 64, "metadata": {"k": "v"}, "truncation": "auto",
            "instructions": "Be brief.", "parallel_tool_calls": False, "store": False,
            "reasoning": {"effort": "low"}, "tools": [TOOL, {**TOOL, "name": "strict_one", "strict": True}],
            "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}, "verbosity": "low"}}
    response = final(body)
    assert {k: response[k] for k in body if k != "tools"} == {
        **{k: v for k, v in body.items() if k != "tools"}, "text": {"format": {"type": "json_schema", "name": "a", "description": None,
                                    "schema": {"type": "object"}, "strict": False}, "verbosity": "low"},
        "reasoning": {"effort": "low", "summary": None}}
    # a function tool echoes description, parameters and strict (null when the request gave none)
    assert response["tools"] == [{**TOOL, "description": None, "strict": None},
                                 {**TOOL, "name": "strict_one", "description": None, "strict": True}]
    assert final({"service_tier": "auto"})["service_tier"] == "default"


def test_sampling_parameters_the_request_left_out_are_what_the_backend_was_given():
    opts = LoweringOptions(upstream_extra_params={"temperature": 0.6, "presence_penalty": 1.5})
    response = final({"top_p": 0.9}, opts)
    assert (response["temperature"], response["presence_penalty"], response["top_p"]) == (0.6, 1.5, 0.9)
    assert response["frequency_penalty"] == 0.0  # (nobody said: the documented default)


def test_the_chat_style_tool_choice_is_taken_and_echoed_in_the_responses_form():
    chat_style = turn({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    responses_style = turn({"tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}})
    assert chat_style.chat_body == responses_style.chat_body
    assert json.loads(chat_style.chat_body)["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    for t in (chat_style, responses_style):
        assert json.loads("{" + t.ctx.echo_json + "}")["tool_choice"] == {"type": "function", "name": "get_weather"}


def test_a_conversation_is_echoed_as_its_id():
    for conversation in ("conv_1", {"id": "conv_1"}):
        t = turn({"conversation": conversation}, found=Found(earlier=[]))
        assert json.loads("{" + t.ctx.echo_json + "}")["conversation"] == {"id": "conv_1"}
        assert t.conversation == "conv_1"


# --- validation as OpenAI does it ----------------------------------------------------------------


@pytest.mark.parametrize("body,param,code", [
    ({"max_output_tokens": 15}, "max_output_tokens", "integer_below_min_value"),
    ({"max_tool_calls": 0}, "max_tool_calls", "integer_below_min_value"),
    ({"top_logprobs": 21}, "top_logprobs", "integer_above_max_value"),
    ({"presence_penalty": 2.5}, "presence_penalty", "decimal_above_max_value"),
    ({"truncation": "sometimes"}, "truncation", "invalid_value"),
])
def test_values_out_of_range_are_400s_naming_the_field(body, param, code):
    with pytest.raises(GatewayError) as err:
        turn(body)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)
    assert param in err.value.message
    turn({**body, param: {"max_output_tokens": 16, "max_tool_calls": 1, "top_logprobs": 20, "presence_penalty": 2,
                          "truncation": "auto"}[param]})  # (the bound itself is fine)


def test_a_conversation_with_a_previous_response_is_a_400_naming_both():
    with pytest.raises(GatewayError) as err:
        turn({"conversation": "conv_1", "previous_response_id": "resp_1"}, found=Found(earlier=[]))
    assert err.value.status == 400 and err.value.param == "conversation"
    assert "conversation" in err.value.message and "previous_response_id" in err.value.message


# --- logprobs ---------------------------------------------------------------------------------------


def lp(token: str, logprob: float, top: list | None = None) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top or []}


def text_with_logprobs(text: str, *entries: dict) -> bytes:
    """A text chunk whose choice carries ``logprobs.content`` (OpenAI, vLLM, llama.cpp)."""
    chunk = chat_chunk({"content": text})
    chunk["choices"][0]["logprobs"] = {"content": list(entries)}
    return chat_sse(chunk, done=False)


@pytest.mark.parametrize("body", [{"include": ["message.output_text.logprobs"]}, {"top_logprobs": 2}])
def test_logprobs_asked_for_reach_the_backend_and_come_back_on_the_output_text(body):
    chat = json.loads(turn(body).chat_body)
    assert chat["logprobs"] is True and chat.get("top_logprobs") == body.get("top_logprobs")
    first = lp("He", -0.5, [{"token": "He", "logprob": -0.5, "bytes": [72, 101]}])
    events = answer(body, chat_event({"reasoning_content": "hmm"}),
                    text_with_logprobs("He", first), text_with_logprobs("llo", {"token": "llo", "logprob": float("-inf")}))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["logprobs"] for d in deltas] == [[first], [lp("llo", -9999.0)]]
    (message,) = [i for i in events[-1]["response"]["output"] if i["type"] == "message"]
    assert message["content"][0]["logprobs"] == [first, lp("llo", -9999.0)]


def test_no_logprobs_unless_asked_for():
    chat = json.loads(turn({}).chat_body)
    assert "logprobs" not in chat and "top_logprobs" not in chat
    events = answer({}, text_with_logprobs("He", lp("He", -0.5)))
    assert all(e["logprobs"] == [] for e in events if e["type"] == "response.output_text.delta")
    (message,) = events[-1]["response"]["output"]
    assert message["content"][0]["logprobs"] == []


# --- through a real mitmdump, with the openai SDK -------------------------------------------------


def test_the_sdk_gets_its_fields_back_over_both_bodies_and_from_the_store(client, upstream):
    asked = dict(user="u-7", safety_identifier="sid-7", prompt_cache_key="pck-7", service_tier="flex",
                 max_tool_calls=2, temperature=0.3, metadata={"team": "a"}, tools=[TOOL],
                 tool_choice={"type": "function", "name": "get_weather"})
    whole = client.responses.create(model="demo-model", input="hello", **asked)
    streamed = list(client.responses.create(model="demo-model", input="hello", stream=True, **asked))[-1].response
    for response in (whole, streamed):
        assert (response.user, response.safety_identifier, response.prompt_cache_key, response.service_tier,
                response.max_tool_calls, response.temperature, response.metadata) == (
            "u-7", "sid-7", "pck-7", "flex", 2, 0.3, {"team": "a"})
        assert response.completed_at >= response.created_at
        assert response.tools[0].strict is None and response.background is False
        # the stored one (GET /v1/responses/{id}) is the one the client got
        assert client.responses.retrieve(response.id).model_dump() == response.model_dump()


def test_logprobs_through_the_gateway(client, upstream):
    upstream.clear()
    response = client.responses.create(model="demo-model", input="hello", top_logprobs=2,
                                       include=["message.output_text.logprobs"])
    sent = upstream.requests()[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    part = response.output[-1].content[0]
    assert "".join(t.token for t in part.logprobs) == part.text == "You said: hello"
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in part.logprobs)


class ReasoningWithLogprobs(QuietHandler):
    """A backend whose answers hold reasoning and text with logprobs, by model: ``whole``, one JSON
    ``chat.completion`` (``stream`` ignored) with ``reasoning_content``, ``content`` and the
    choice's ``logprobs``; ``streamed``, chunks of reasoning with logprobs (the reasoning
    tokens'), then one with a reasoning delta, a content delta and logprobs, then text without."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert body["logprobs"] is True and body["top_logprobs"] == 1
        if body["model"] == "whole":
            answer = chat_completion({"reasoning_content": "Let me think.", "content": "Hello"}, "stop")
            answer["choices"][0]["logprobs"] = {"content": [lp("Hel", -0.25), lp("lo", -0.5)]}
            send_json(self, 200, answer)
            return
        chunks = [chat_chunk({"reasoning_content": "Let me"}), chat_chunk({"reasoning_content": " think.", "content": "Hel"}),
                  chat_chunk({"content": "lo"}), chat_chunk(finish="stop")]
        chunks[0]["choices"][0]["logprobs"] = {"content": [lp("Let", -0.75), lp(" me", -0.75)]}
        chunks[1]["choices"][0]["logprobs"] = {"content": [lp("Hel", -0.25)]}
        send_sse(self, chat_sse(*chunks))


def test_logprobs_of_an_answer_with_reasoning_through_the_gateway(gateway_factory):
    """Through a real mitmdump and the openai SDK: an answer whose chunk (or whole JSON body)
    holds reasoning and text has its logprobs on the text, streamed or not; the reasoning's own
    tokens (a chunk of reasoning alone) and the next chunk's text get none. Before, the
    reasoning in the same chunk dropped them: ``logprobs: []``."""
    with LocalServer(ReasoningWithLogprobs) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        client = openai_client(gw)
        asked = dict(input="hi", top_logprobs=1, include=["message.output_text.logprobs"])
        for model, tokens in (("whole", [("Hel", -0.25), ("lo", -0.5)]), ("streamed", [("Hel", -0.25)])):
            response = client.responses.create(model=model, **asked)
            events = list(client.responses.create(model=model, stream=True, **asked))
            for final in (response, events[-1].response):
                assert [o.type for o in final.output] == ["reasoning", "message"], model
                part = final.output[-1].content[0]
                assert part.text == "Hello" and [(t.token, t.logprob) for t in part.logprobs] == tokens, model
            deltas = [(e.delta, [t.token for t in e.logprobs]) for e in events if e.type == "response.output_text.delta"]
            assert deltas == ([("Hello", ["Hel", "lo"])] if model == "whole" else [("Hel", ["Hel"]), ("lo", [])])
            (done,) = [e for e in events if e.type == "response.output_text.done"]
            assert [t.token for t in done.logprobs] == [t for t, _ in tokens]


def test_the_sdk_gets_the_400s_naming_the_field(client):
    for kw, param in (({"max_output_tokens": 8}, "max_output_tokens"), ({"max_tool_calls": 0}, "max_tool_calls"),
                      ({"conversation": "conv_x", "previous_response_id": "resp_x"}, "conversation")):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-model", input="hello", **kw)
        assert err.value.body["param"] == param, err.value.body


def test_a_cancelled_response_ends_with_its_output_so_far_closed():
    """A background response cancelled mid-answer (translator.cancel): its open message is
    closed, it ends with response.cancelled, status cancelled; nothing after it."""
    t = turn({})
    t.ctx.clock = lambda: 107.0
    tr = t.translator()
    out = tr.accepted() + tr.feed(chat_event({"content": "half an ans"})) + tr.cancel()
    events = parse_sse(out)
    assert events[-1]["type"] == "response.cancelled" and events[-1]["response"]["status"] == "cancelled"
    (message,) = events[-1]["response"]["output"]
    assert message["content"][0]["text"] == "half an ans"
    assert tr.cancel() == b"" and tr.feed(chat_event({"content": "more"}) + DONE) == b"" and tr.finish() == b""


@pytest.mark.parametrize("body,param", [
    ({"tools": [{**TOOL, "strict": 0}]}, "tools[0].strict"),
    ({"stream": 1}, "stream"),
    ({"store": "true"}, "store"),
    ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
])
def test_a_boolean_given_as_a_number_or_a_string_is_a_400_naming_the_field(body, param):
    """OpenAI's own validation: ``expected a boolean``. (Taken as pydantic's lax ``0 → False``, the
    tool's ``strict: 0`` came back raw in the Response, which the spec's boolean refuses: the
    WebSocket fuzz found it.)"""
    with pytest.raises(GatewayError) as err:
        turn(body)
    assert (err.value.status, err.value.param) == (400, param), err.value.message
    turn({**body, **{k: True for k in body if k != "tools"}, **({"tools": [{**TOOL, "strict": True}]}
                                                             if "tools" in body else {})})
