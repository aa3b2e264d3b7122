"""Translator: chat-completions SSE in, Responses SSE out.

Every test checks the whole output stream against the invariants Codex and the openai SDK rely
on (``helpers.check_stream``): contiguous sequence numbers, exactly one terminal event and
nothing after it, every delta after its item's ``output_item.added``, strictly increasing output
indexes, and every event valid as ``openai.types.responses.ResponseStreamEvent``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (CREATED, RESP_ID, chat_chunk, chat_sse, check_sdk, check_stream, codex_fixture, parse_sse,
                     tool_call, tool_call_chunk)
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.translator import Translator
from resp2chat_core.turn import begin_turn

LONG_NAME = "mcp.server." + "x" * 80
GRAMMAR = 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF'


# --- helpers -------------------------------------------------------------------------------


def request_body() -> dict:
    """The real Codex request, plus the tool kinds Codex sends to other models."""
    body = codex_fixture("02-tool-call-turn1.json")["body"]
    body["tools"] = body["tools"] + [
        {"type": "custom", "name": "apply_patch", "description": "Edit files.",
         "format": {"type": "grammar", "syntax": "lark", "definition": GRAMMAR}},
        {"type": "namespace", "name": "mcp__srv__", "description": "an MCP server",
         "tools": [{"type": "function", "name": "x", "description": "x", "strict": False,
                    "parameters": {"type": "object", "properties": {}}}]},
        {"type": "function", "name": "srv.read", "description": "dotted", "strict": False,
         "parameters": {"type": "object", "properties": {}}},
        {"type": "function", "name": LONG_NAME, "description": "long", "strict": False,
         "parameters": {"type": "object", "properties": {}}},
        {"type": "local_shell"},
        {"type": "tool_search", "execution": "client", "description": "find tools",
         "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
    ]
    return body


def new_turn():
    return begin_turn(json.dumps(request_body()).encode(), LoweringOptions(), RESP_ID, CREATED)


def chat_tool_name(name: str) -> str:
    """The chat-side name the lowering gave a tool (by its Responses name)."""
    turn = new_turn()
    for cname, target in turn.ctx.tool_map.targets.items():
        if target.name == name:
            return cname
    raise KeyError(name)


def translator() -> Translator:
    return new_turn().translator()


def run(raw: bytes, tr: Translator | None = None, out: bytes = b"") -> list[dict]:
    """Feed ``raw`` (after ``out``, what ``tr`` already emitted), finish, check the invariants.
    Tests call ``check_sdk`` last, so their own assertions run even when the SDK check fails."""
    tr = tr or translator()
    evs = check_stream(out + tr.feed(raw) + tr.finish())
    assert tr.done
    assert tr.feed(chat_sse(chat_chunk({"content": "late"}))) == b"" and tr.finish() == b""
    return evs


def types(evs) -> list[str]:
    return [e["type"] for e in evs]


def of(evs, type_: str) -> list[dict]:
    return [e for e in evs if e["type"] == type_]


def items(evs) -> list[dict]:
    return [e["item"] for e in of(evs, "response.output_item.done")]


USAGE = {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280,
         "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 30}}


# --- whole responses -----------------------------------------------------------------------


def test_reasoning_then_text_full_sequence():
    evs = run(chat_sse(chat_chunk({"role": "assistant", "content": ""}), chat_chunk({"reasoning_content": "Let me "}),
                       chat_chunk({"reasoning_content": "think."}), chat_chunk({"content": "Hello"}),
                       chat_chunk({"content": " world"}), chat_chunk(finish="stop"),
                       {"id": "chatcmpl-1", "choices": [], "usage": USAGE}))
    assert types(evs) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    reasoning, message = items(evs)
    assert reasoning["type"] == "reasoning"
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"] == "Hello world"
    assert [e["delta"] for e in of(evs, "response.output_text.delta")] == ["Hello", " world"]
    assert of(evs, "response.output_text.done")[0]["text"] == "Hello world"
    final = evs[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "fake-model"
    assert final["created_at"] == CREATED
    assert evs[0]["response"]["status"] == "in_progress" and evs[0]["response"]["output"] == []
    check_sdk(evs)


def test_text_deltas_stream_live():
    tr = translator()
    first = parse_sse(tr.feed(chat_sse(chat_chunk({"content": "Hel"}), done=False)))
    assert types(first)[-1] == "response.output_text.delta" and first[-1]["delta"] == "Hel"
    second = parse_sse(tr.feed(chat_sse(chat_chunk({"content": "lo"}), done=False)))
    assert types(second) == ["response.output_text.delta"]
    check_sdk(first + second)


def test_function_call_streamed_by_index():
    tr = translator()
    out = tr.feed(chat_sse(
        chat_chunk({"role": "assistant", "tool_calls": [tool_call(0, id="call_up_1", name="exec_command", args="")]}),
        tool_call_chunk(0, args='{"cmd":'), done=False))
    live = parse_sse(out)
    assert types(live)[-2:] == ["response.output_item.added", "response.function_call_arguments.delta"]
    assert live[-1]["delta"] == '{"cmd":'
    out += tr.feed(chat_sse(tool_call_chunk(0, args=' "ls"}'), chat_chunk(finish="tool_calls")))
    evs = check_stream(out + tr.finish())
    added = of(evs, "response.output_item.added")[0]["item"]
    assert added["type"] == "function_call" and added["call_id"] == "call_up_1" and added["name"] == "exec_command"
    assert [e["delta"] for e in of(evs, "response.function_call_arguments.delta")] == ['{"cmd":', ' "ls"}']
    (args_done,) = of(evs, "response.function_call_arguments.done")
    assert args_done["arguments"] == '{"cmd": "ls"}' and args_done["name"] == "exec_command"
    (item,) = items(evs)
    assert item["type"] == "function_call" and item["status"] == "completed"
    assert item["call_id"] == "call_up_1" and item["name"] == "exec_command"
    assert item["arguments"] == '{"cmd": "ls"}'
    assert "namespace" not in item
    assert evs[-1]["type"] == "response.completed"
    check_sdk(evs)


@pytest.mark.parametrize("name,namespace", [("close_agent", "multi_agent_v1"), ("x", "mcp__srv__")])
def test_namespaced_call_gets_namespace_back(name, namespace):
    cname = chat_tool_name(name)
    assert cname == (f"{namespace}__{name}" if not namespace.endswith("_") else namespace + name)
    evs = run(chat_sse(tool_call_chunk(0, id="call_ns", name=cname, args='{"id":"a"}'),
                       chat_chunk(finish="tool_calls")))
    (item,) = items(evs)
    assert item["name"] == name and item["namespace"] == namespace
    assert of(evs, "response.output_item.added")[0]["item"]["namespace"] == namespace
    assert of(evs, "response.function_call_arguments.done")[0]["name"] == name
    check_sdk(evs)


@pytest.mark.parametrize("name", ["srv.read", LONG_NAME])
def test_sanitized_names_map_back_to_client_names(name):
    cname = chat_tool_name(name)
    assert cname != name
    evs = run(chat_sse(tool_call_chunk(0, id="call_s", name=cname, args="{}"),
                       chat_chunk(finish="tool_calls")))
    (item,) = items(evs)
    assert item["name"] == name and "namespace" not in item
    check_sdk(evs)


def test_custom_tool_call():
    patch = "*** Begin Patch\n*** Add File: hello.txt\n+hi \"there\"\n*** End Patch\n"
    args = json.dumps({"input": patch})
    evs = run(chat_sse(tool_call_chunk(0, id="call_patch", name="apply_patch", args=""),
                       tool_call_chunk(0, args=args[:20]),
                       tool_call_chunk(0, args=args[20:]), chat_chunk(finish="tool_calls")))
    assert not of(evs, "response.function_call_arguments.delta")
    assert not of(evs, "response.function_call_arguments.done")
    deltas = of(evs, "response.custom_tool_call_input.delta")
    assert "".join(d["delta"] for d in deltas) == patch
    (done,) = of(evs, "response.custom_tool_call_input.done")
    assert done["input"] == patch
    (item,) = items(evs)
    assert item["type"] == "custom_tool_call"
    assert item["name"] == "apply_patch" and item["call_id"] == "call_patch" and item["input"] == patch
    assert types(evs).index("response.custom_tool_call_input.done") < types(evs).index("response.output_item.done")
    check_sdk(evs)


@pytest.mark.parametrize("args,action", [
    ('{"command":["ls","-la"],"workdir":"/tmp","timeout_ms":500}',
     {"command": ["ls", "-la"], "working_directory": "/tmp", "timeout_ms": 500}),
    ('{"command":"ls -la"}', {"command": ["bash", "-lc", "ls -la"]}),
])
def test_local_shell_call(args, action):
    evs = run(chat_sse(tool_call_chunk(0, id="call_sh", name="local_shell", args=args),
                       chat_chunk(finish="tool_calls")))
    (item,) = items(evs)
    assert item["type"] == "local_shell_call" and item["call_id"] == "call_sh"
    assert item["action"]["type"] == "exec"
    assert {k: v for k, v in item["action"].items() if k in action} == action
    check_sdk(evs)


def test_tool_search_call():
    evs = run(chat_sse(
        tool_call_chunk(0, id="call_ts", name="tool_search", args='{"query":"weather"}'),
        chat_chunk(finish="tool_calls")))
    (item,) = items(evs)
    assert item["type"] == "tool_search_call" and item["call_id"] == "call_ts"
    assert item["execution"] == "client" and item["arguments"] == {"query": "weather"}
    check_sdk(evs)


def test_parallel_tool_calls_each_own_item():
    evs = run(chat_sse(
        tool_call_chunk(0, id="call_a", name="exec_command", args='{"cmd":'),
        tool_call_chunk(1, id="call_b", name="view_image", args='{"path":'),
        tool_call_chunk(0, args='"ls"}'),
        tool_call_chunk(1, args='"a.png"}'),
        chat_chunk(finish="tool_calls"),
    ))
    a, b = items(evs)
    assert (a["call_id"], a["name"], a["arguments"]) == ("call_a", "exec_command", '{"cmd":"ls"}')
    assert (b["call_id"], b["name"], b["arguments"]) == ("call_b", "view_image", '{"path":"a.png"}')
    assert a["id"] != b["id"]
    added = of(evs, "response.output_item.added")
    assert [e["item"]["call_id"] for e in added] == ["call_a", "call_b"]
    for e in of(evs, "response.function_call_arguments.delta"):
        owner = next(x for x in added if x["item"]["id"] == e["item_id"])
        assert e["delta"] in (('{"cmd":', '"ls"}') if owner["item"]["call_id"] == "call_a" else ('{"path":', '"a.png"}'))
    check_sdk(evs)


def test_parallel_calls_in_one_chunk():
    evs = run(chat_sse(chat_chunk({"tool_calls": [tool_call(0, id="c0", name="exec_command", args='{"cmd":"a"}'),
                                                  tool_call(1, id="c1", name="exec_command", args='{"cmd":"b"}')]}),
                       chat_chunk(finish="tool_calls")))
    assert [(i["call_id"], i["arguments"]) for i in items(evs)] == [("c0", '{"cmd":"a"}'), ("c1", '{"cmd":"b"}')]
    check_sdk(evs)


def test_zero_arg_call_has_empty_object_arguments():
    evs = run(chat_sse(tool_call_chunk(0, id="call_g", name="get_goal", args=""),
                       chat_chunk(finish="tool_calls")))
    (item,) = items(evs)
    assert item["arguments"] == "{}"
    assert of(evs, "response.function_call_arguments.done")[0]["arguments"] == "{}"
    check_sdk(evs)


def test_ollama_whole_tool_call_in_one_chunk_with_stop():
    raw = chat_sse({"model": "qwen3", "created_at": "x", "choices": [{"index": 0, "delta": {
        "role": "assistant", "content": "", "tool_calls": [{"id": "call_ol", "index": 0, "type": "function",
                                                            "function": {"name": "exec_command",
                                                                         "arguments": '{"cmd":"pwd"}'}}]},
        "finish_reason": "stop"}]})
    evs = run(raw)
    (item,) = items(evs)
    assert item["type"] == "function_call" and item["call_id"] == "call_ol" and item["arguments"] == '{"cmd":"pwd"}'
    assert evs[-1]["type"] == "response.completed"
    check_sdk(evs)


def test_missing_call_id_is_generated_and_unique():
    evs = run(chat_sse(
        chat_chunk({"tool_calls": [tool_call(0, name="exec_command", args="{}"),
                                   tool_call(1, name="get_goal", args="{}")]}),
        chat_chunk(finish="tool_calls")))
    ids = [i["call_id"] for i in items(evs)]
    assert all(ids) and len(set(ids)) == 2
    check_sdk(evs)


def test_whitespace_content_before_tool_call_creates_no_message():
    evs = run(chat_sse(chat_chunk({"reasoning_content": "need ls"}), chat_chunk({"content": "\n\n"}),
                       tool_call_chunk(0, id="call_w", name="exec_command", args='{"cmd":"ls"}'),
                       chat_chunk(finish="tool_calls")))
    assert [i["type"] for i in items(evs)] == ["reasoning", "function_call"]
    assert not of(evs, "response.output_text.delta")
    check_sdk(evs)


def test_text_after_tool_call_is_a_new_message():
    evs = run(chat_sse(tool_call_chunk(0, id="c", name="exec_command", args="{}"),
                       chat_chunk({"content": "done"}), chat_chunk(finish="stop")))
    assert [i["type"] for i in items(evs)] == ["function_call", "message"]
    check_sdk(evs)


# --- usage ---------------------------------------------------------------------------------


def test_usage_only_final_chunk():
    evs = run(chat_sse(chat_chunk({"content": "hi"}), chat_chunk(finish="stop"),
                       {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}))
    assert evs[-1]["type"] == "response.completed"
    usage = evs[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (1200, 80, 1280)
    assert usage["input_tokens_details"]["cached_tokens"] == 1024
    assert usage["output_tokens_details"]["reasoning_tokens"] == 30
    check_sdk(evs)


def test_deepseek_prompt_cache_hit_tokens():
    usage = {"prompt_tokens": 500, "completion_tokens": 20, "total_tokens": 520,
             "prompt_cache_hit_tokens": 384, "prompt_cache_miss_tokens": 116}
    evs = run(chat_sse(chat_chunk({"content": "ok"}), chat_chunk(finish="stop"), {"choices": [], "usage": usage}))
    u = evs[-1]["response"]["usage"]
    assert (u["input_tokens"], u["output_tokens"], u["total_tokens"]) == (500, 20, 520)
    assert u["input_tokens_details"]["cached_tokens"] == 384
    check_sdk(evs)


def test_usage_in_finish_chunk_without_done():
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    evs = run(chat_sse(chat_chunk({"content": "ok"}), chat_chunk(finish="stop", usage=usage), done=False))
    assert evs[-1]["type"] == "response.completed"
    assert evs[-1]["response"]["usage"]["total_tokens"] == 4
    check_sdk(evs)


# --- endings -------------------------------------------------------------------------------


@pytest.mark.parametrize("finish,reason", [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_incomplete(finish, reason):
    evs = run(chat_sse(chat_chunk({"content": "partial"}), chat_chunk(finish=finish)))
    assert evs[-1]["type"] == "response.incomplete"
    resp = evs[-1]["response"]
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": reason}
    assert resp["output"][0]["content"][0]["text"] == "partial"
    check_sdk(evs)


def test_error_payload_mid_stream_fails_and_stops():
    tr = translator()
    out = tr.feed(chat_sse(chat_chunk({"content": "Hel"}),
                           {"error": {"message": "Rate limit reached, try again in 2s", "code": "rate_limit_exceeded"}},
                           chat_chunk({"content": "lo"}), chat_chunk(finish="stop")))
    assert tr.done
    evs = run(b"", tr, out)
    assert evs[-1]["type"] == "response.failed"
    err = evs[-1]["response"]["error"]
    assert err["code"] == "rate_limit_exceeded" and "try again in 2s" in err["message"]
    assert [e["delta"] for e in of(evs, "response.output_text.delta")] == ["Hel"]
    check_sdk(evs)


@pytest.mark.parametrize("status,body,code", [
    (429, b'{"error":{"message":"Rate limit reached. Please try again in 20s.","type":"requests"}}',
     "rate_limit_exceeded"),
    (400, b'{"error":{"message":"This model\'s maximum context length is 8192 tokens. However, you requested '
          b'9000 tokens.","type":"invalid_request_error","code":null}}', "context_length_exceeded"),
    # Codex 0.169 treats server_is_overloaded as fatal ("model at capacity"); a 5xx must stay
    # retryable, so it maps to server_error (errors.py, observed with the real CLI).
    (503, b"Service Unavailable", "server_error"),
    (400, b'{"error":{"message":"unknown field foo","type":"invalid_request_error"}}', "invalid_prompt"),
])
def test_fail_upstream_http_errors(status, body, code):
    tr = translator()
    out = tr.fail_upstream(status, body)
    evs = check_stream(out + tr.finish())
    assert types(evs) == ["response.created", "response.in_progress", "response.failed"]
    err = evs[-1]["response"]["error"]
    assert err["code"] == code
    assert str(status) in err["message"]
    assert evs[-1]["response"]["status"] == "failed"
    check_sdk(evs)


@pytest.mark.parametrize("status,body,retry_after,message,headers", [
    (429, b'{"error":{"message":"slow down"}}', "2", "upstream HTTP 429: slow down. Please try again in 2s.",
     {"retry-after": "2", "retry-after-ms": "2000"}),
    (503, b"Service Unavailable", "0.25", "upstream HTTP 503: the upstream failed (request id req_t; the gateway's "
     "log has the details). Please try again in 250ms.", {"retry-after": "1", "retry-after-ms": "250"}),
    # the backend's own words say it already: kept as they are, the header's wait beside them
    (429, b'{"error":{"message":"Rate limit reached. Please try again in 20s."}}', "20",
     "upstream HTTP 429: Rate limit reached. Please try again in 20s.", {"retry-after": "20", "retry-after-ms": "20000"}),
    (503, b"Service Unavailable", None, "upstream HTTP 503: the upstream failed (request id req_t; the gateway's "
     "log has the details)", None),
    # an hour (a backend in maintenance): the words say it; the headers Codex waits by, at most a minute
    (503, b"Service Unavailable", "3600", "upstream HTTP 503: the upstream failed (request id req_t; the gateway's "
     "log has the details). Please try again in 3600s.", {"retry-after": "60", "retry-after-ms": "60000"}),
])
def test_a_backends_wait_is_in_the_failed_event(status, body, retry_after, message, headers):
    """The stream's head has gone: the wait (``Retry-After``) is said inside the error, where
    Codex 0.169 reads it: ``headers`` (any code; at most ``MAX_TOLD_WAIT``, the openai SDK's own
    bound: a client is never told to sit an hour in one turn) and OpenAI's words at the end of
    the message."""
    tr = translator()
    tr.ctx.request_id = "req_t"
    err = check_stream(tr.fail_upstream(status, body, retry_after) + tr.finish())[-1]["response"]["error"]
    assert (err["message"], err.get("headers")) == (message, headers)


PLANTED = "password=hunter2 at 10.0.0.7"


@pytest.mark.parametrize("status,body,shown", [
    # a 5xx is written for the backend's operator: the client gets the status and the request id
    (503, b'{"error":{"message":"db ' + PLANTED.encode() + b'","type":"server_error"}}', False),
    (500, b"Traceback (most recent call last): " + PLANTED.encode(), False),
    # a body that is no JSON error (an HTML page from a proxy), whatever the status
    (404, b"<html><body>nginx " + PLANTED.encode() + b"</body></html>", False),
    (None, b'{"error":{"message":"CUDA OOM ' + PLANTED.encode() + b'","code":500}}', False),  # mid-stream 5xx
    # a 4xx JSON error is written for the client: it keeps its text (key-like strings scrubbed)
    (400, b'{"error":{"message":"unknown field foo ' + PLANTED.encode() + b'"}}', True),
    (429, b'{"error":{"message":"slow down ' + PLANTED.encode() + b'"}}', True),
    (None, b'{"error":{"message":"model not found ' + PLANTED.encode() + b'"}}', True),  # a JSON error in a 200
])
def test_upstream_error_text_reaches_the_client_only_if_written_for_it(status, body, shown):
    turn = new_turn()
    turn.ctx.request_id = "req_abc123"
    tr = turn.translator()
    evs = check_stream(tr.fail_upstream(status, body) + tr.finish())
    message = evs[-1]["response"]["error"]["message"]
    assert (PLANTED in message) is shown
    assert PLANTED in tr.error_detail  # the operator always gets the backend's words (log, flow)
    if not shown:
        assert "req_abc123" in message and (str(status) in message if status else "upstream error" in message)
    check_sdk(evs)


def test_the_relays_own_failures_keep_their_words_and_name_the_request():
    turn = new_turn()
    turn.ctx.request_id = "req_abc123"
    tr = turn.translator()
    body = b'{"error":{"message":"cannot connect to the upstream http://127.0.0.1:9: Connection refused"}}'
    evs = check_stream(tr.fail_upstream(502, body, own=True) + tr.finish())
    assert evs[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "cannot connect to the upstream http://127.0.0.1:9: Connection refused (request id req_abc123)"}


@pytest.mark.parametrize("raw", [
    b"data: <html>" + PLANTED.encode() + b"</html>\n\n",  # an event that is not JSON
    b"<html><body>" + PLANTED.encode() + b"</body></html>\n",  # a body that is neither SSE nor JSON
])
def test_non_json_upstream_bytes_are_not_quoted_to_the_client(raw):
    tr = translator()
    evs = run(raw, tr)
    assert evs[-1]["response"]["error"]["code"] == "server_error"
    assert PLANTED not in json.dumps(evs) and PLANTED in tr.error_detail


def test_a_translator_bug_names_no_internals():
    tr = translator()
    tr._payload = lambda payload: 1 / 0
    evs = run(chat_sse(chat_chunk({"content": "x"})), tr)
    error = evs[-1]["response"]["error"]
    assert error["message"].startswith("the gateway failed to translate") and "ZeroDivision" not in error["message"]
    assert tr.error_detail == "ZeroDivisionError: division by zero"


def test_a_lone_surrogate_escape_is_replaced_as_invalid_utf8_is():
    """JSON lets a string hold "\\ud800" (a lone surrogate), which no UTF-8 can carry: the
    translator must not raise (the stream callable would), and the client gets U+FFFD, as for a
    backend's invalid UTF-8 bytes (nothing made of the text can fail to encode later: the stored
    Response, a whole answer; tests/test_hostile_audit.py)."""
    tr = translator()
    out = tr.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a\\ud800b"}}]}\n\n') + tr.finish()
    evs = parse_sse(out)
    assert [e["delta"] for e in of(evs, "response.output_text.delta")] == ["a\ufffdb"]
    assert evs[-1]["type"] == "response.failed"  # (cut short: no finish, no [DONE])


def test_end_without_finish_reason_or_done_fails():
    evs = run(chat_sse(chat_chunk({"content": "cut off"}), done=False))
    assert evs[-1]["type"] == "response.failed"
    assert evs[-1]["response"]["error"]["code"] == "server_error"
    check_sdk(evs)


def test_empty_upstream_body_fails():
    tr = translator()
    evs = check_stream(tr.finish())
    assert evs[-1]["type"] == "response.failed"
    check_sdk(evs)


def test_done_without_finish_reason_completes():
    evs = run(chat_sse(chat_chunk({"content": "hi"})))
    assert evs[-1]["type"] == "response.completed"
    assert items(evs)[0]["content"][0]["text"] == "hi"
    check_sdk(evs)


def test_done_alone_completes_empty():
    evs = run(chat_sse())
    assert types(evs) == ["response.created", "response.in_progress", "response.completed"]
    assert evs[-1]["response"]["output"] == []
    check_sdk(evs)


@pytest.mark.parametrize("payload", ["not json at all", "{\"choices\": [", "[1, 2]", "42", "\"text\"", "null"])
def test_bad_payload_fails(payload):
    evs = run(chat_sse(chat_chunk({"content": "a"}), payload, chat_chunk({"content": "b"}), chat_chunk(finish="stop")))
    assert evs[-1]["type"] == "response.failed"
    assert [e["delta"] for e in of(evs, "response.output_text.delta")] == ["a"]
    check_sdk(evs)


def test_comments_and_crlf_are_transparent():
    raw = b": OPENROUTER PROCESSING\r\n\r\n" + chat_sse(chat_chunk({"content": "x"}), chat_chunk(finish="stop"),
                                                     eol="\r\n")
    evs = run(raw)
    assert evs[-1]["type"] == "response.completed" and items(evs)[0]["content"][0]["text"] == "x"
    check_sdk(evs)


def test_translate_json_whole_completion():
    body = {
        "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "up",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Running it.", "reasoning_content": "should run ls",
            "tool_calls": [{"id": "call_b", "type": "function",
                            "function": {"name": "exec_command", "arguments": '{"cmd":"ls"}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    tr = translator()
    evs = check_stream(tr.translate_json(json.dumps(body).encode()))
    assert tr.done and tr.finish() == b""
    assert [i["type"] for i in items(evs)] == ["reasoning", "message", "function_call"]
    assert items(evs)[1]["content"][0]["text"] == "Running it."
    assert items(evs)[2]["call_id"] == "call_b" and items(evs)[2]["arguments"] == '{"cmd":"ls"}'
    assert evs[-1]["type"] == "response.completed"
    assert evs[-1]["response"]["usage"]["total_tokens"] == 15
    check_sdk(evs)


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b'{"error":{"message":"boom"}}', b"[]"])
def test_translate_json_errors_fail(body):
    evs = check_stream(translator().translate_json(body))
    assert evs[-1]["type"] == "response.failed"
    check_sdk(evs)


def test_minimal_request_echo_is_a_valid_response():
    tr = begin_turn(b'{"model":"gpt-x","input":"hi"}', LoweringOptions(), RESP_ID, CREATED).translator()
    evs = run(chat_sse(chat_chunk({"content": "hello"}), chat_chunk(finish="stop")), tr)
    resp = evs[-1]["response"]
    assert resp["model"] == "gpt-x" and resp["tools"] == [] and resp["tool_choice"] == "auto"
    assert resp["store"] is True  # the API's default, and the gateway keeps it
    check_sdk(evs)


def test_response_snapshot_matches_terminal_event():
    tr = translator()
    evs = check_stream(tr.feed(chat_sse(chat_chunk({"content": "hi"}), chat_chunk(finish="stop"))) + tr.finish())
    assert tr.response() == evs[-1]["response"]
    check_sdk(evs)


# --- property: any split of the upstream bytes gives the same output -----------------------

def multiline(payload: dict, eol: str) -> bytes:
    """One event whose JSON spans two ``data:`` lines (joined by LF, which JSON allows)."""
    text = json.dumps(payload)
    cut = text.index(",") + 1
    return f"data: {text[:cut]}{eol}data: {text[cut:]}{eol}{eol}".encode()


STREAMS = {
    "reasoning-text-usage-crlf": multiline(chat_chunk({"role": "assistant", "reasoning_content": "思考中…"}), "\r\n")
    + chat_sse(
        chat_chunk({"reasoning_content": " ok 🎉"}), chat_chunk({"content": "\n\n"}), chat_chunk({"content": "Grüße, "}),
        chat_chunk({"content": "мир"}), chat_chunk(finish="stop"),
        {"choices": [], "usage": USAGE}, eol="\r\n"),
    "parallel-tools-with-comments": b": PROCESSING\n\n" + chat_sse(
        tool_call_chunk(0, id="call_a", name="exec_command", args='{"cmd":'),
        tool_call_chunk(1, id="call_b", name="multi_agent_v1__close_agent", args="{"),
        tool_call_chunk(0, args='"ls"}'), tool_call_chunk(1, args="}"),
        chat_chunk(finish="tool_calls")),
    "custom-tool-lone-cr": chat_sse(
        chat_chunk({"content": "Patching."}),
        tool_call_chunk(0, id="call_p", name="apply_patch", args='{"input":"*** Begin'),
        tool_call_chunk(0, args=' Patch\\n*** End Patch"}'), chat_chunk(finish="tool_calls"),
        eol="\r"),
    "error-mid-stream": chat_sse(chat_chunk({"content": "a"}), {"error": {"message": "overloaded", "code": 503}},
                                 chat_chunk({"content": "b"})),
    "truncated": chat_sse(chat_chunk({"content": "no end"}), done=False),
}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(STREAMS)), data=st.data())
def test_property_any_split_same_output(name, data):
    raw = STREAMS[name]
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=25, unique=True))
    pieces = [raw[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(raw)])]
    whole_tr = translator()
    whole = whole_tr.feed(raw) + whole_tr.finish()
    split_tr = translator()
    split = b"".join(split_tr.feed(p) for p in pieces) + split_tr.finish()
    assert split == whole
    check_stream(whole)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_byte_at_a_time_same_output(name):
    raw = STREAMS[name]
    whole_tr, split_tr = translator(), translator()
    whole = whole_tr.feed(raw) + whole_tr.finish()
    split = b"".join(split_tr.feed(raw[i:i + 1]) for i in range(len(raw))) + split_tr.finish()
    assert split == whole


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_fixture_streams_are_valid(name):
    tr = translator()
    evs = check_stream(tr.feed(STREAMS[name]) + tr.finish())
    check_sdk(evs)


# --- the envelope fast path (chatstream.ChunkReader._learn) ------------------------------

_DELTAS = st.one_of(
    st.builds(lambda t: {"content": t}, st.text(max_size=8)),
    st.builds(lambda t: {"reasoning_content": t}, st.text(max_size=8)),
    st.builds(lambda a: {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}, st.text(max_size=8)),
    st.just({}),
    st.just({"role": "assistant", "content": None}),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_DELTAS, max_size=30), st.sampled_from(["stop", "length", "tool_calls"]), st.booleans())
def test_envelope_fast_path_translates_like_full_decoding(deltas, finish, usage_alone):
    """Chunks that repeat their envelope byte for byte (the fast path) and the same chunks with
    a changing ``created`` (full decoding every time) give the same events."""
    name = chat_tool_name("exec_command")
    deltas = [{"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": name, "arguments": ""}}]}
              if "tool_calls" in d and i == next(j for j, e in enumerate(deltas) if "tool_calls" in e) else d
              for i, d in enumerate(deltas)]
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    tail = [chat_chunk(finish=finish), chat_chunk(choices=[], usage=usage)] if usage_alone \
        else [chat_chunk(finish=finish, usage=usage)]
    outputs, hits = [], []
    for vary in (False, True):
        payloads = [{**chat_chunk(d), "created": i if vary else 1} for i, d in enumerate(deltas)] + tail
        t = translator()
        outputs.append(t.feed(chat_sse(*payloads)) + t.finish())
        hits.append(t._reader.hits)
    assert outputs[0] == outputs[1]
    check_stream(outputs[0])
    assert hits[1] == 0
    if sum(1 for d in deltas if d) > 2:
        assert hits[0] > 0  # the fast path did run


def test_envelope_that_changes_every_chunk_is_no_longer_learnt():
    t = translator()
    t.feed(chat_sse(*[{**chat_chunk({"content": f"w{i} "}), "created": i} for i in range(40)], done=False))
    assert t._reader._envelope is None and t._reader.misses > 8
    out = t.feed(chat_sse(chat_chunk(finish="stop")))
    assert parse_sse(out)[-1]["response"]["output"][0]["content"][0]["text"] == " ".join(
        f"w{i}" for i in range(40)) + " "


@pytest.mark.parametrize("dup", ['"delta" :', '"d\\u0065lta":'])
def test_envelope_is_not_learnt_from_a_delta_key_that_decoding_overrides(dup):
    """JSON keeps the last of duplicate keys: a template whose literal ``"delta":`` is followed
    by another spelling of the key must not be learnt (the probe in _learn)."""
    first = '{"choices":[{"index":0,"delta":{"content":"A"},%s{"content":"A"}}]}' % dup
    second = '{"choices":[{"index":0,"delta":{"content":"B"},%s{"content":"A"}}]}' % dup
    t = translator()
    out = check_stream(t.feed(chat_sse(first, second, chat_chunk(finish="stop"))) + t.finish())
    assert [e["delta"] for e in out if e["type"] == "response.output_text.delta"] == ["A", "A"]
    assert t._reader.hits == 0


# --- logprobs: on the text of their chunk, whatever else it holds ---------------------------


def lp_translator(think: str = "auto") -> Translator:
    """A translator of a turn that asked for logprobs (``top_logprobs``)."""
    body = {"model": "m", "input": "hi", "top_logprobs": 1}
    opts = LoweringOptions(think_tags={"*": think})
    return begin_turn(json.dumps(body).encode(), opts, RESP_ID, CREATED).translator()


def lp(*tokens: str) -> list[dict]:
    """A choice's ``logprobs.content`` for ``tokens``, as the output_text's logprobs say them too."""
    return [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]


def with_lp(delta: dict, entries: list, finish: str | None = None, key: str = "delta") -> dict:
    chunk = chat_chunk(delta, finish)
    choice = chunk["choices"][0]
    choice["logprobs"] = {"content": entries}
    if key != "delta":
        choice[key] = choice.pop("delta")
    return chunk


def text_logprobs(evs) -> tuple[list, list]:
    """(each output_text delta's logprobs, the done part's)."""
    done = of(evs, "response.output_text.done")
    assert len(done) == 1 and done[0]["logprobs"] == items(evs)[-1]["content"][0]["logprobs"]
    return [e["logprobs"] for e in of(evs, "response.output_text.delta")], done[0]["logprobs"]


def test_a_whole_answer_with_reasoning_keeps_its_logprobs_on_the_output_text():
    """A non-streamed chat.completion with reasoning, content and ``logprobs.content``: the
    logprobs are the output text's (the reader hands them over after the reasoning, before the
    text; before, the reasoning dropped them)."""
    body = {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": lp("Hel", "lo")},
                         "message": {"role": "assistant", "reasoning_content": "think", "content": "Hello"}}]}
    for think in ("auto", "off"):
        evs = check_stream(lp_translator(think).translate_json(json.dumps(body).encode()))
        assert [i["type"] for i in items(evs)] == ["reasoning", "message"]
        assert text_logprobs(evs) == ([lp("Hel", "lo")], lp("Hel", "lo"))
        check_sdk(evs)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_a_chunks_logprobs_go_on_its_text_and_no_later_chunks(key):
    """A chunk with a reasoning delta, a content delta and logprobs: they go on its text (the
    text delta, the done part); the next chunk's text, without logprobs, gets none; a chunk of
    reasoning alone with logprobs (a backend's reasoning tokens) gives them to no text."""
    evs = run(chat_sse(chat_chunk({key: "Hmm."}), with_lp({key: " ok", "content": "He"}, lp("He")),
                       chat_chunk({"content": "llo"}), with_lp({key: "more"}, lp("more")),
                       chat_chunk({"content": " there"}), chat_chunk(finish="stop")), lp_translator())
    assert [i["type"] for i in items(evs)] == ["reasoning", "message", "reasoning", "message"]
    first, second = [e for e in of(evs, "response.output_text.done")]
    assert [(e["delta"], e["logprobs"]) for e in of(evs, "response.output_text.delta")] == [
        ("He", lp("He")), ("llo", []), (" there", [])]
    assert (first["text"], first["logprobs"], second["text"], second["logprobs"]) == ("Hello", lp("He"), " there", [])
    check_sdk(evs)


def test_the_logprobs_of_a_think_block_are_not_the_answers():
    """``<think>`` in content (think.py): a chunk that ends inside the think block is reasoning,
    its logprobs no text's; the chunk that closes it and begins the answer gives the answer its
    logprobs (all of that chunk's: they are not split by token). Before, every think chunk's
    logprobs piled up on the first answer delta."""
    evs = run(chat_sse(with_lp({"content": "<think>a"}, lp("<think>", "a")), with_lp({"content": "b"}, lp("b")),
                       with_lp({"content": "</think>Hi"}, lp("</think>", "Hi")), chat_chunk({"content": "!"}),
                       chat_chunk(finish="stop")), lp_translator())
    assert [i["type"] for i in items(evs)] == ["reasoning", "message"]
    assert text_logprobs(evs) == ([lp("</think>", "Hi"), []], lp("</think>", "Hi"))
    check_sdk(evs)


def test_a_calls_arguments_before_its_name_wait_for_it_across_other_items():
    """Arguments of call 1 before its name, text between, then its name: the call has them (the
    text's item closing the open call dropped them: an empty call went to the client, while the
    same stream through the tool loop kept them; found in review)."""
    name = chat_tool_name("exec_command")
    evs = run(chat_sse(
        chat_chunk({"tool_calls": [tool_call(0, "call_f", name, '{"cmd": "ls"}')]}),
        chat_chunk({"tool_calls": [tool_call(1, args='{"cmd": "pwd"}')]}),
        chat_chunk({"content": "and"}),
        chat_chunk({"tool_calls": [tool_call(1, "call_g", name, "")]}),
        chat_chunk(finish="tool_calls")))
    calls = [(i["call_id"], json.loads(i["arguments"])) for i in items(evs) if i["type"] == "function_call"]
    assert calls == [("call_f", {"cmd": "ls"}), ("call_g", {"cmd": "pwd"})]
    check_sdk(evs)


def test_a_calls_id_before_its_name_is_its_call_id():
    """A backend that sends a call's id before its name (the naming delta without one): the
    client's call has the backend's id (the reader tells it with the name: chatstream.py), so
    its output goes back to the backend under the id the backend gave. Before: made up."""
    name = chat_tool_name("exec_command")
    evs = run(chat_sse(chat_chunk({"tool_calls": [{"index": 0, "id": "call_b", "type": "function",
                                                   "function": {"arguments": ""}}]}),
                       chat_chunk({"tool_calls": [tool_call(0, name=name, args='{"cmd": "ls"}')]}),
                       chat_chunk(finish="tool_calls")))
    assert [(i["call_id"], i["arguments"]) for i in items(evs)] == [("call_b", '{"cmd": "ls"}')]
    check_sdk(evs)


@pytest.mark.parametrize("think", ["auto", "on"])
def test_a_delta_before_a_calls_name_settles_no_held_text(think):
    """A tool delta that waits for its call's name makes nothing, so the text held before it
    (``<think>`` tags being read: think.py) is not settled by it: the text reads as it would
    without it, the way the web-search filter passes it on (it moves such a delta to right
    before the call's naming delta, or drops it with a call never named). Before: the held
    "<thi" went out as text ("<thi" "nk>r</think>ok" read as text alone), and a never-named
    delta first made the "<think>" that followed text in auto mode."""
    def answer(*deltas):
        tr = lp_translator(think)
        return [(i["type"], i.get("content") or i.get("summary")) for i in items(run(chat_sse(
            *[chat_chunk(d) for d in deltas], chat_chunk(finish="stop")), tr))]

    nameless = {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    text = [{"content": "<thi"}, {"content": "nk>r</think>ok"}]
    assert answer(text[0], nameless, text[1]) == answer(*text)
    assert answer(nameless, *text) == answer(*text)
    assert answer(*text)[-1][1][0]["text"] == "ok"
