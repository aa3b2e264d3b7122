"""End to end through a real mitmdump: the openai SDK and raw SSE against the scripted upstream."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from helpers import codex_fixture, parse_sse, post_turn, terminal


# --- the openai SDK ------------------------------------------------------------------------


def test_sdk_stream_events_and_final_response(client):
    events = list(client.responses.create(model="demo-model", input="hello there", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text == "You said: hello there"
    assert [o.type for o in final.output] == ["reasoning", "message"]
    # no summary asked for: the backend's reasoning is the item's content (reasoning_text)
    assert final.output[0].content[0].text == "Thinking about: hello there" and final.output[0].summary == []
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "You said: hello there"


def test_sdk_reasoning_as_a_summary_when_asked_for_one(client):
    """``reasoning.summary`` (as Codex sends it): the reasoning streams as the item's summary, with
    the summary's events; without it, as its content with ``response.reasoning_text.*``."""
    for summary in ("auto", None):
        events = list(client.responses.create(model="demo-model", input="hello there", stream=True,
                                              **({"reasoning": {"summary": summary}} if summary else {})))
        kinds = {e.type for e in events}
        (reasoning,) = [o for o in events[-1].response.output if o.type == "reasoning"]
        if summary:
            assert "response.reasoning_summary_text.delta" in kinds and "response.reasoning_text.delta" not in kinds
            assert reasoning.summary[0].text == "Thinking about: hello there" and not reasoning.content
            assert events[-1].response.reasoning.summary == "auto"
        else:
            assert "response.reasoning_text.delta" in kinds and "response.reasoning_summary_text.delta" not in kinds
            assert reasoning.content[0].text == "Thinking about: hello there" and reasoning.summary == []
            assert events[-1].response.reasoning is None


def test_sdk_stream_helper_get_final_response(client):
    with client.responses.stream(model="demo-model", input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "what is up"}]},
    ]) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == "You said: what is up"


def test_sdk_non_streaming(client):
    resp = client.responses.create(model="demo-model", input="no stream please")
    assert resp.status == "completed"
    assert resp.output_text == "You said: no stream please"
    assert resp.id.startswith("resp_")
    assert resp.usage.input_tokens > 0


EXEC_TOOL = {"type": "function", "name": "exec_command", "description": "Run a command",
             "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}


def test_sdk_function_call_streams_arguments(client, upstream):
    upstream.clear()
    with client.responses.stream(model="demo-model", input="run: ls -la /tmp", tools=[EXEC_TOOL]) as stream:
        arg_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "exec_command"
    assert json.loads(call.arguments) == {"cmd": "ls -la /tmp"}
    assert len(arg_deltas) > 1, "arguments must stream as they arrive, not in one piece"
    assert "".join(arg_deltas) == call.arguments
    sent = upstream.requests()[-1]
    assert sent["tools"][0]["function"]["name"] == "exec_command"


def test_sdk_namespaced_and_custom_tools_round_trip(client):
    tools = [
        {"type": "namespace", "name": "multi_agent_v1", "description": "agents",
         "tools": [{"type": "function", "name": "wait_agent", "parameters": {"type": "object", "properties": {}}}]},
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/s"}},
    ]
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    prompt = ('call: multi_agent_v1__wait_agent {"targets":["a"]}\n'
              f"call: apply_patch {json.dumps({'input': patch})}")
    final = client.responses.create(model="demo-model", input=prompt, tools=tools)
    fc, ctc = final.output[-2], final.output[-1]
    assert fc.type == "function_call" and fc.name == "wait_agent" and fc.namespace == "multi_agent_v1"
    assert json.loads(fc.arguments) == {"targets": ["a"]}
    assert ctc.type == "custom_tool_call" and ctc.name == "apply_patch" and ctc.input == patch
    assert fc.call_id != ctc.call_id


def test_sdk_multi_turn_tool_loop(client, upstream):
    first = client.responses.create(model="demo-model", input="run: echo 42", tools=[EXEC_TOOL])
    call = first.output[-1]
    history = [{"role": "user", "content": "run: echo 42"}]
    history += [o.model_dump(exclude_none=True) for o in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "42\n"})
    upstream.clear()
    second = client.responses.create(model="demo-model", input=history, tools=[EXEC_TOOL])
    assert second.output_text == "The tool returned: 42"
    messages = upstream.requests()[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["reasoning_content"].startswith("Thinking about")
    assert messages[1]["tool_calls"][0]["id"] == call.call_id == messages[2]["tool_call_id"]


def test_sdk_incomplete_on_length(client):
    events = list(client.responses.create(model="demo-model", input="length", stream=True))
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("prompt,code", [
    ("error: 429 slow down", "rate_limit_exceeded"),
    ("error: 503 busy", "server_error"),
    ("error: 400 bad", "invalid_prompt"),
    ("midstream-error", "server_error"),
    ("truncate", "server_error"),
])
def test_sdk_failures_arrive_as_response_failed(client, prompt, code):
    events = list(client.responses.create(model="demo-model", input=prompt, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.code == code
    terminal([e.model_dump() for e in events])


def test_sdk_non_streaming_error_status(client):
    with pytest.raises(openai.RateLimitError) as info:
        client.responses.create(model="demo-model", input="error: 429 slow down")
    assert info.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="demo-model", input="error: 400 nope")


def test_sdk_codex_fixture_with_image(client, upstream):
    body = codex_fixture("05-image-input.json")["body"]
    body.pop("stream")
    extra = {"client_metadata": body.pop("client_metadata")}  # Codex-only field: the SDK has no kwarg
    upstream.clear()
    resp = client.responses.create(**body, stream=True, extra_body=extra)
    events = list(resp)
    assert events[-1].type == "response.completed"
    assert "(I see 1 image(s))" in events[-1].response.output_text
    last_user = upstream.requests()[-1]["messages"][-1]
    assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,")
               for p in last_user["content"])


# --- raw HTTP ------------------------------------------------------------------------------


def test_raw_sse_order_and_framing(gateway):
    r = post_turn(gateway, {"model": "m", "input": "raw check", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    expected_message = ["response.output_item.added", "response.content_part.added"]
    i = types.index("response.output_text.delta")
    assert types[i - 2:i] == expected_message
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == sorted(added) == list(range(len(added)))


@pytest.mark.parametrize("prompt,end", [("done check", "response.completed"), ("error: 503 busy", "response.failed"),
                                        ("length", "response.incomplete")])
def test_an_http_stream_ends_with_done_after_its_terminal_event(gateway_factory, upstream, prompt, end):
    """The Open Responses spec's end of an SSE stream: ``data: [DONE]``, once, after the terminal
    event (OpenAI sends none; every client in the suite reads it: test_client_libraries.py, the Codex
    tests). A replay-cache hit ends alike; the WebSocket carries none (wsclient reads JSON only)."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=4")
    upstream.clear()
    for _ in range(2 if end == "response.completed" else 1):  # (the second: a replay-cache hit)
        raw = post_turn(gw, {"model": "m", "input": prompt, "stream": True, "max_output_tokens": 16}).content
        assert raw.count(b"[DONE]") == 1 and raw.endswith(b"\n\ndata: [DONE]\n\n"), raw[-200:]
        assert parse_sse(raw)[-1]["type"] == end
    assert len(upstream.requests()) == 1  # (the completed one's second answer: from the replay cache)


def test_raw_codex_fixture_tool_turn(gateway):
    body = codex_fixture("03-tool-call-turn2-with-output.json")["body"]
    r = post_turn(gateway, body)
    events = parse_sse(r.content)
    done = events[-1]
    assert done["type"] == "response.completed"
    assert done["response"]["output"][-1]["content"][0]["text"].startswith("The tool returned: hello-from-tool")
    assert done["response"]["tools"] == body["tools"]  # the Response echoes the request


@pytest.mark.parametrize("body,param", [
    ({"input": "hi"}, "model"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"type": "mystery"}]}, "input[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "temperature": 7}, "temperature"),
])
def test_bad_requests_are_400_json_naming_the_field(gateway, body, param):
    r = post_turn(gateway, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and param.split("[")[0] in err["message"]
    assert err["type"] == "invalid_request_error"


def test_malformed_json_is_400(gateway):
    r = requests.post(gateway.base_url + "/responses", data=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_other_endpoints(gateway, upstream, gateway_factory):
    health = requests.get(f"http://127.0.0.1:{gateway.port}/healthz", timeout=5)
    assert health.json() == {"status": "ok"}
    models = requests.get(gateway.base_url + "/models", timeout=5).json()
    assert models["data"][0]["id"] == "demo-model"
    # plain chat completions reach the backend only when passthrough_paths lists them
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "noreason\nplain chat"}]}
    refused = requests.post(gateway.base_url + "/chat/completions", timeout=10, json=body)
    assert refused.status_code == 404 and "passthrough_paths" in refused.json()["error"]["message"]
    listed = gateway_factory(upstream.origin, "--set", "resp2chat_passthrough_paths=POST /v1/chat/completions")
    chat = requests.post(listed.base_url + "/chat/completions", timeout=10, json=body).json()
    assert chat["choices"][0]["message"]["content"] == "You said: plain chat"


def test_concurrent_streams_all_complete(client):
    def one(i):
        prompt = f"words: 50\nnoreason\nstream {i}"
        events = list(client.responses.create(model="demo-model", input=prompt, stream=True))
        return events[-1].type, events[-1].response.output_text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    for kind, text in results:
        assert kind == "response.completed"
        assert text.split() == [f"word{i}" for i in range(50)]


def test_lowering_is_deterministic_upstream(gateway, upstream):
    body = codex_fixture("04-resumed-session-turn3.json")["body"]
    upstream.clear()
    post_turn(gateway, body)
    post_turn(gateway, json.loads(json.dumps(body)))
    a, b = upstream.requests()[-2:]
    assert json.dumps(a) == json.dumps(b)
    assert a["messages"][0]["role"] == "system"
    assert sum(m["role"] == "system" for m in a["messages"]) == 1
    assert uuid.UUID(body["prompt_cache_key"])  # fixture sanity


def test_an_orphan_tool_output_is_a_400_naming_the_call_id(client, upstream):
    """A function_call_output answering no call of the conversation: OpenAI's 400, never an
    orphan tool message upstream (nothing reaches the backend)."""
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-model", input=[
            {"role": "user", "content": "hi"},
            {"type": "function_call_output", "call_id": "call_made_up", "output": "42"}])
    assert "call_made_up" in err.value.body["message"] and err.value.body["param"] == "input[1].call_id"
    assert upstream.requests() == []
