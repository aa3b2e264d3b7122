"""Lowering (Responses request -> chat request), schema validation and the tool map.

Pure unit tests: no network, no mitmproxy. Fixtures are real Codex 0.169.0 requests.
"""

from __future__ import annotations

import copy
import json

import pytest

from helpers import CODEX_FIXTURES, NAME_RE, codex_fixture, message, tool_names, user
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions, lower
from resp2chat_core.schema import parse_request
from resp2chat_core.toolmap import chat_name

FIXTURES = sorted(p.name for p in CODEX_FIXTURES.glob("*.json"))

PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP4z8AARwzEcQCukw/x0F8jngAAAABJRU5ErkJggg=="
OBJ = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}


# --- helpers -------------------------------------------------------------------------------


def fixture_body(name: str) -> dict:
    return codex_fixture(name)["body"]


def lower_raw(body: dict, opts: LoweringOptions = LoweringOptions()):
    return lower(parse_request(body), opts)


def chat(body: dict) -> dict:
    return lower_raw(body).chat


def req(input_, **kw) -> dict:
    return {"model": "m", "input": input_, **kw}


def fn_tool(name: str, params: dict | None = None) -> dict:
    return {"type": "function", "name": name, "description": f"tool {name}", "strict": False,
            "parameters": params or OBJ}


def fcall(call_id: str, name: str, args: str = '{"x":"1"}', namespace: str | None = None) -> dict:
    item = {"type": "function_call", "call_id": call_id, "name": name, "arguments": args}
    if namespace:
        item["namespace"] = namespace
    return item


def fout(call_id: str, output) -> dict:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def gateway_error(body: dict) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        lower_raw(body)
    assert info.value.status == 400
    return info.value


# --- real Codex fixtures -------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_lowers_deterministically(name):
    body = fixture_body(name)
    first = lower_raw(body)
    second = lower_raw(fixture_body(name))
    roundtrip = lower_raw(json.loads(json.dumps(copy.deepcopy(body))))
    assert first.body == second.body == roundtrip.body
    assert json.loads(first.body) == first.chat
    assert first.client_stream is True


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_shape(name):
    body = fixture_body(name)
    c = chat(body)
    msgs = c["messages"]
    # instructions (absent here) + the two leading developer messages -> one system message
    lead = [it for it in body["input"][:2]]
    assert all(it["role"] == "developer" for it in lead)
    expected_system = "\n\n".join("\n".join(p["text"] for p in it["content"]) for it in lead)
    assert msgs[0] == {"role": "system", "content": expected_system}
    assert [m["role"] for m in msgs].count("system") == 1
    assert msgs[1]["role"] == "user" and msgs[1]["content"].startswith("<environment_context>")
    # every function tool and every namespace member, in client order; web_search stripped
    expected = []
    for t in body["tools"]:
        if t["type"] == "function":
            expected.append(t["name"])
        elif t["type"] == "namespace":
            expected += [f"{t['name']}__{m['name']}" for m in t["tools"]]
    assert tool_names(c) == expected
    assert "multi_agent_v1__close_agent" in expected
    assert all(NAME_RE.match(n) for n in tool_names(c))
    assert c["tool_choice"] == "auto" and c["parallel_tool_calls"] is True
    assert c["stream"] is True and c["stream_options"] == {"include_usage": True}
    assert "reasoning_effort" not in c  # reasoning {summary: auto} carries no effort
    for key in ("input", "store", "include", "client_metadata", "reasoning", "instructions", "text"):
        assert key not in c


def test_fixture_tool_turn_history():
    c = chat(fixture_body("04-resumed-session-turn3.json"))
    roles = [m["role"] for m in c["messages"]]
    assert roles == ["system", "user", "user", "assistant", "tool", "assistant", "user"]
    call = c["messages"][3]
    assert call["content"] is None
    assert call["reasoning_content"] == "think0 think1 think2 "
    assert call["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "exec_command", "arguments": '{"cmd": "echo hello-from-tool"}'}}]
    assert c["messages"][4]["tool_call_id"] == "call_1"
    assert c["messages"][4]["content"].endswith("hello-from-tool\n")
    answer = c["messages"][5]
    assert answer["reasoning_content"] == "think0 think1 think2 "
    assert answer["content"].startswith("word0 word1") and "tool_calls" not in answer
    assert c["messages"][6] == {"role": "user", "content": "[text] and now summarize"}


def test_fixture_image_input():
    c = chat(fixture_body("05-image-input.json"))
    last = c["messages"][-1]
    assert last["role"] == "user"
    assert last["content"] == [
        {"type": "text", "text": '<image name=[Image #1] path="red.png">'},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
        {"type": "text", "text": "</image>"},
        {"type": "text", "text": "[text] what color is this"},
    ]


# --- messages ------------------------------------------------------------------------------


def test_system_rule_instructions_and_leading_run():
    c = chat(req([message("developer", "D1"), {"role": "system", "content": "S2"}, user("hi"),
                  message("developer", "late dev"), message("system", "late sys")], instructions="INS"))
    assert c["messages"] == [
        {"role": "system", "content": "INS\n\nD1\n\nS2"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "late dev"},
        {"role": "user", "content": "late sys"},
    ]


def test_no_system_message_without_instructions_or_leading_developer():
    c = chat(req([user("hi"), message("developer", "later")]))
    assert c["messages"] == [{"role": "user", "content": "hi"}, {"role": "user", "content": "later"}]


def test_string_input_is_one_user_message():
    c = chat(req("hello", instructions="be brief"))
    assert c["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def test_text_only_content_flattened_with_newline():
    c = chat(req([message("user", "a", "b", "c"), {"role": "user", "content": "plain"}]))
    assert c["messages"] == [{"role": "user", "content": "a\nb\nc"}, {"role": "user", "content": "plain"}]


def test_mixed_image_content_becomes_parts():
    content = [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": PNG, "detail": "low"},
        {"type": "input_image", "image_url": "https://example.com/cat.jpg"},
    ]
    c = chat(req([{"type": "message", "role": "user", "content": content}]))
    assert c["messages"][0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]


def test_image_file_id_is_a_named_400():
    content = [{"type": "input_text", "text": "see"}, {"type": "input_image", "file_id": "file-123"}]
    err = gateway_error(req([{"type": "message", "role": "user", "content": content}]))
    assert err.param is not None and err.param.startswith("input[0].content[1]")


def test_assistant_history_and_reasoning():
    c = chat(req([
        user("q1"),
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
        message("assistant", "answer", kind="output_text"),
        user("q2"),
    ]))
    assert c["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "answer", "reasoning_content": "thinking"},
        {"role": "user", "content": "q2"},
    ]


def test_reasoning_content_preferred_over_summary():
    c = chat(req([
        user("q"),
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "short"}],
         "content": [{"type": "reasoning_text", "text": "full thoughts"}], "encrypted_content": None},
        message("assistant", "a", kind="output_text"),
    ]))
    assert c["messages"][1]["reasoning_content"] == "full thoughts"


def test_reasoning_text_and_function_calls_fold_into_one_assistant_message():
    c = chat(req([
        user("do two things"),
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "plan"}]},
        message("assistant", "on it", kind="output_text"),
        fcall("c1", "a"),
        fcall("c2", "b", '{"x":"2"}'),
        fout("c1", "one"),
        fout("c2", "two"),
        user("thanks"),
    ], tools=[fn_tool("a"), fn_tool("b")]))
    m = c["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "tool", "tool", "user"]
    assert m[1] == {
        "role": "assistant", "content": "on it", "reasoning_content": "plan",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x":"1"}'}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": '{"x":"2"}'}},
        ],
    }
    assert m[2] == {"role": "tool", "tool_call_id": "c1", "content": "one"}
    assert m[3] == {"role": "tool", "tool_call_id": "c2", "content": "two"}


def test_new_reasoning_after_tool_run_starts_new_assistant_message():
    c = chat(req([
        user("q"), fcall("c1", "a"), fout("c1", "r1"),
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "next"}]},
        fcall("c2", "a"), fout("c2", "r2"),
    ], tools=[fn_tool("a")]))
    assistants = [m for m in c["messages"] if m["role"] == "assistant"]
    assert [[t["id"] for t in a["tool_calls"]] for a in assistants] == [["c1"], ["c2"]]
    assert "reasoning_content" not in assistants[0]
    assert assistants[1]["reasoning_content"] == "next"


def test_function_call_output_array_with_image():
    c = chat(req([
        user("look at both"),
        fcall("c1", "view_image", '{"path":"a.png"}'),
        fcall("c2", "view_image", '{"path":"b.png"}'),
        fout("c1", [{"type": "input_text", "text": "first"}, {"type": "input_text", "text": "line"}]),
        fout("c2", [{"type": "input_text", "text": "image b:"},
                    {"type": "input_image", "image_url": PNG, "detail": "high"}]),
        user("what do you see"),
    ], tools=[fn_tool("view_image")]))
    m = c["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "tool", "tool", "user", "user"]
    assert m[2] == {"role": "tool", "tool_call_id": "c1", "content": "first\nline"}
    assert m[3] == {"role": "tool", "tool_call_id": "c2", "content": "image b:"}
    assert m[4] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}}]}
    assert m[5] == {"role": "user", "content": "what do you see"}


def test_custom_tool_call_history():
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    c = chat(req([
        user("patch it"),
        {"type": "custom_tool_call", "call_id": "p1", "name": "apply_patch", "input": patch},
        {"type": "custom_tool_call_output", "call_id": "p1", "output": "Done!"},
    ], tools=[{"type": "custom", "name": "apply_patch", "description": "patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"}}]))
    call = c["messages"][1]["tool_calls"][0]
    assert call["id"] == "p1" and call["function"]["name"] == "apply_patch"
    assert json.loads(call["function"]["arguments"]) == {"input": patch}
    assert c["messages"][2] == {"role": "tool", "tool_call_id": "p1", "content": "Done!"}


def test_local_shell_call_history():
    c = chat(req([
        user("list"),
        {"type": "local_shell_call", "call_id": "ls1", "status": "completed",
         "action": {"type": "exec", "command": ["ls", "-la"], "working_directory": "/tmp",
                    "timeout_ms": 5000, "env": {}}},
        {"type": "local_shell_call_output", "call_id": "ls1", "output": "total 0"},
    ], tools=[{"type": "local_shell"}]))
    call = c["messages"][1]["tool_calls"][0]
    assert call["id"] == "ls1" and call["function"]["name"] == "local_shell"
    assert json.loads(call["function"]["arguments"]) == {"command": ["ls", "-la"], "workdir": "/tmp",
                                                         "timeout_ms": 5000}
    assert c["messages"][2] == {"role": "tool", "tool_call_id": "ls1", "content": "total 0"}


def test_tool_search_call_and_output_history():
    found = [{"type": "function", "name": "found_tool", "parameters": OBJ}]
    c = chat(req([
        user("find a tool"),
        {"type": "tool_search_call", "call_id": "ts1", "execution": "client", "status": "completed",
         "arguments": {"query": "weather"}},
        {"type": "tool_search_output", "call_id": "ts1", "execution": "client", "status": "completed",
         "tools": found},
    ], tools=[{"type": "tool_search", "execution": "client", "description": "search tools",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]))
    assert "tool_search" in tool_names(c)
    call = c["messages"][1]["tool_calls"][0]
    assert call["id"] == "ts1" and call["function"]["name"] == "tool_search"
    assert json.loads(call["function"]["arguments"]) == {"query": "weather"}
    tool_msg = c["messages"][2]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == "ts1"
    assert json.loads(tool_msg["content"]) == found


def test_web_search_call_history_becomes_assistant_note():
    c = chat(req([
        user("weather?"),
        {"type": "web_search_call", "id": "ws_1", "status": "completed",
         "action": {"type": "search", "query": "weather paris"}},
        message("assistant", "Sunny.", kind="output_text"),
        user("thanks"),
    ], tools=[{"type": "web_search", "external_web_access": True}]))
    m = c["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "user"]
    assert "weather paris" in m[1]["content"] and m[1]["content"].endswith("Sunny.")
    assert "tools" not in c  # web_search is stripped, nothing left


def test_namespaced_function_call_history_uses_flattened_name():
    c = chat(req([
        user("close it"),
        fcall("c1", "close_agent", '{"id":"a"}', namespace="multi_agent_v1"),
        fcall("c2", "x", "{}", namespace="mcp__srv__"),
        fout("c1", "ok"), fout("c2", "ok"),
    ], tools=[{"type": "namespace", "name": "multi_agent_v1", "description": "agents",
               "tools": [fn_tool("close_agent")]},
              {"type": "namespace", "name": "mcp__srv__", "description": "mcp", "tools": [fn_tool("x")]}]))
    assert tool_names(c) == ["multi_agent_v1__close_agent", "mcp__srv__x"]
    calls = c["messages"][1]["tool_calls"]
    assert [t["function"]["name"] for t in calls] == ["multi_agent_v1__close_agent", "mcp__srv__x"]


# --- tools ---------------------------------------------------------------------------------


def test_dotted_names_sanitized_and_consistent_with_history():
    c = chat(req([user("q"), fcall("c1", "srv.read.file"), fout("c1", "x")],
                 tools=[fn_tool("srv.read.file")]))
    assert tool_names(c) == ["srv_read_file"]
    assert c["messages"][1]["tool_calls"][0]["function"]["name"] == "srv_read_file"


def test_long_names_truncated_deterministically():
    long_a = "mcp.server." + "a" * 80 + ".one"
    long_b = "mcp.server." + "a" * 80 + ".two"
    tools = [fn_tool(long_a), fn_tool(long_b)]
    c1 = chat(req([user("q"), fcall("c1", long_a), fout("c1", "x")], tools=tools))
    c2 = chat(req([user("q"), fcall("c1", long_a), fout("c1", "x")], tools=copy.deepcopy(tools)))
    names = tool_names(c1)
    assert names == tool_names(c2)
    assert len(set(names)) == 2
    assert all(NAME_RE.match(n) for n in names)
    assert c1["messages"][1]["tool_calls"][0]["function"]["name"] == names[0]
    assert chat_name(long_a) == names[0]


@pytest.mark.parametrize("tools", [
    [fn_tool("a.b"), fn_tool("a_b")],
    [fn_tool("multi_agent_v1__close_agent"),
     {"type": "namespace", "name": "multi_agent_v1", "tools": [fn_tool("close_agent")]}],
    [fn_tool("dup"), fn_tool("dup")],
])
def test_tool_name_collision(tools):
    err = gateway_error(req([user("q")], tools=tools))
    assert err.code == "tool_name_collision"
    assert err.param is not None and err.param.startswith("tools[1]")


def test_function_tool_definition():
    c = chat(req([user("q")], tools=[{"type": "function", "name": "f", "description": "does f",
                                      "strict": True, "parameters": OBJ}]))
    assert c["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "does f", "parameters": OBJ, "strict": True}}]


def test_custom_tool_becomes_function_with_input_string():
    grammar = 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF'
    c = chat(req([user("q")], tools=[{"type": "custom", "name": "apply_patch", "description": "Edit files.",
                                      "format": {"type": "grammar", "syntax": "lark", "definition": grammar}}]))
    (tool,) = c["tools"]
    fn = tool["function"]
    assert tool["type"] == "function" and fn["name"] == "apply_patch"
    params = fn["parameters"]
    assert params["type"] == "object"
    assert list(params["properties"]) == ["input"]
    assert params["properties"]["input"]["type"] == "string"
    assert params["required"] == ["input"]
    assert fn["description"].startswith("Edit files.")
    assert grammar in fn["description"] and "lark" in fn["description"]


def test_local_shell_tool():
    c = chat(req([user("q")], tools=[{"type": "local_shell"}]))
    (tool,) = c["tools"]
    fn = tool["function"]
    assert fn["name"] == "local_shell"
    assert fn["parameters"]["properties"]["command"]["type"] == "array"
    assert fn["parameters"]["required"] == ["command"]


def test_hosted_tools_stripped():
    c = chat(req([user("q")], tools=[{"type": "web_search", "external_web_access": True},
                                     fn_tool("f"), {"type": "image_generation", "output_format": "png"}],
                 tool_choice="auto", parallel_tool_calls=False))
    assert tool_names(c) == ["f"]
    assert c["tool_choice"] == "auto" and c["parallel_tool_calls"] is False


def test_only_hosted_tools_leaves_no_tool_fields():
    c = chat(req([user("q")], tools=[{"type": "web_search"}], tool_choice="auto", parallel_tool_calls=True))
    assert "tools" not in c and "tool_choice" not in c and "parallel_tool_calls" not in c


def test_unsupported_tool_type_names_its_place():
    err = gateway_error(req([user("q")], tools=[fn_tool("f"), {"type": "file_search", "vector_store_ids": ["v"]}]))
    assert err.param == "tools[1].type"
    assert "tools[1]" in err.message and "file_search" in err.message


def test_unknown_item_type_names_its_place():
    err = gateway_error(req([user("q"), {"type": "telepathy", "payload": 1}]))
    assert err.param == "input[1].type"
    assert "input[1]" in err.message and "telepathy" in err.message


@pytest.mark.parametrize("item", [
    {"type": "compaction", "encrypted_content": "gAAAA"},
    {"type": "item_reference", "id": "msg_123"},
])
def test_compaction_and_item_reference_are_clear_400(item):
    err = gateway_error(req([user("q"), item]))
    assert err.status == 400
    assert err.param == "input[1].type"
    assert item["type"] in err.message


# --- tool_choice ---------------------------------------------------------------------------

NS_TOOLS = [fn_tool("a"), fn_tool("b"),
            {"type": "namespace", "name": "multi_agent_v1", "description": "agents",
             "tools": [fn_tool("close_agent"), fn_tool("spawn_agent")]}]


@pytest.mark.parametrize("mode", ["auto", "none", "required"])
def test_tool_choice_modes(mode):
    c = chat(req([user("q")], tools=NS_TOOLS, tool_choice=mode))
    assert c["tool_choice"] == mode
    assert len(c["tools"]) == 4


def test_tool_choice_named_function():
    c = chat(req([user("q")], tools=NS_TOOLS, tool_choice={"type": "function", "name": "b"}))
    assert c["tool_choice"] == {"type": "function", "function": {"name": "b"}}


def test_tool_choice_named_namespaced_function():
    c = chat(req([user("q")], tools=NS_TOOLS,
                 tool_choice={"type": "function", "name": "close_agent", "namespace": "multi_agent_v1"}))
    assert c["tool_choice"] == {"type": "function", "function": {"name": "multi_agent_v1__close_agent"}}


def test_tool_choice_named_custom_tool():
    c = chat(req([user("q")], tools=[{"type": "custom", "name": "apply_patch", "description": "p"}],
                 tool_choice={"type": "custom", "name": "apply_patch"}))
    assert c["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}


def test_tool_choice_allowed_tools_narrows():
    c = chat(req([user("q")], tools=NS_TOOLS, tool_choice={
        "type": "allowed_tools", "mode": "required",
        "tools": [{"type": "function", "name": "b"},
                  {"type": "function", "name": "spawn_agent", "namespace": "multi_agent_v1"}]}))
    assert c["tool_choice"] == "required"
    assert tool_names(c) == ["b", "multi_agent_v1__spawn_agent"]


def test_tool_choice_unknown_name_is_400():
    err = gateway_error(req([user("q")], tools=NS_TOOLS, tool_choice={"type": "function", "name": "nope"}))
    assert err.param == "tool_choice.name"
    assert "nope" in err.message


def test_tool_choice_required_without_tools_is_400():
    err = gateway_error(req([user("q")], tools=[{"type": "web_search"}], tool_choice="required"))
    assert err.param == "tool_choice"


# --- request parameters --------------------------------------------------------------------


def test_sampling_and_limits():
    c = chat(req([user("q")], max_output_tokens=256, temperature=0.3, top_p=0.9,
                 reasoning={"effort": "high", "summary": "auto"}))
    assert c["max_tokens"] == 256
    assert c["temperature"] == 0.3 and c["top_p"] == 0.9
    assert c["reasoning_effort"] == "high"
    assert "max_output_tokens" not in c and "reasoning" not in c


def test_json_schema_format():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    c = chat(req([user("q")], text={"format": {"type": "json_schema", "name": "num", "schema": schema,
                                               "strict": True}, "verbosity": "low"}))
    assert c["response_format"] == {"type": "json_schema",
                                    "json_schema": {"name": "num", "schema": schema, "strict": True}}


def test_text_format_text_sends_no_response_format():
    c = chat(req([user("q")], text={"format": {"type": "text"}}))
    assert "response_format" not in c


@pytest.mark.parametrize("stream", [True, False, None])
def test_upstream_always_streams_with_usage(stream):
    body = req([user("q")])
    if stream is not None:
        body["stream"] = stream
    low = lower_raw(body)
    assert low.chat["stream"] is True
    assert low.chat["stream_options"] == {"include_usage": True}
    assert low.client_stream is bool(stream)


@pytest.mark.parametrize("kind", ["function_call_output", "custom_tool_call_output"])
def test_a_tool_output_that_answers_no_call_is_a_400_naming_the_call_id(kind):
    """Never an orphan ``tool`` message upstream (backends refuse or misread one): OpenAI's 400."""
    output = {"type": kind, "call_id": "call_nowhere", "output": "x"}
    for before in ([user("q")], [user("q"), fcall("call_other", "f"), fout("call_other", "y")]):
        err = gateway_error(req([*before, output]))
        assert err.param == f"input[{len(before)}].call_id" and "'call_nowhere'" in err.message
    assert chat(req([user("q"), fcall("call_nowhere", "f"), output]))["messages"][-1]["tool_call_id"] == "call_nowhere"


def test_an_orphan_tool_output_is_found_when_the_conversation_goes_on_from_the_prefix_cache():
    from resp2chat_core.lowering import History, TextCache

    texts = TextCache()
    texts.history = History()
    first = req([user("q"), fcall("c1", "f"), fout("c1", "y")])
    lower(parse_request(first, texts.items), texts=texts)
    ok = {**first, "input": [*first["input"], fcall("c2", "f"), fout("c1", "again"), fout("c2", "z")]}
    lower(parse_request(ok, texts.items), texts=texts)  # (the earlier calls, known from the checkpoint)
    assert texts.history.hits == 1
    with pytest.raises(GatewayError) as err:
        bad = {**ok, "input": [*ok["input"], user("and"), fout("c9", "z")]}
        lower(parse_request(bad, texts.items), texts=texts)
    assert texts.history.hits == 2 and err.value.param == "input[7].call_id"


def test_previous_response_id_not_found():
    err = gateway_error(req([user("q")], previous_response_id="resp_abc"))
    assert err.code == "previous_response_not_found"
    assert err.param == "previous_response_id"


# --- malformed requests --------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    (req([{"type": "message", "role": "wizard", "content": "hi"}]), "input[0].role"),
    (req([user("q")], temperature=5), "temperature"),
    (req([user("q")], top_p=1.5), "top_p"),
    (req([user("q")], max_output_tokens=0), "max_output_tokens"),
    (req([user("q"), {"type": "function_call", "name": "f", "arguments": "{}"}]), "input[1].call_id"),
    (req([user("q"), {"type": "function_call_output", "output": "x"}]), "input[1].call_id"),
    (req([user("q"), {"type": "message", "role": "user", "content": [{"type": "input_text"}]}]),
     "input[1].content[0].text"),
    (req([user("q")], tools=[{"type": "function", "name": ""}]), "tools[0].name"),
    ({"input": "q"}, "model"),
])
def test_malformed_field_is_named(body, param):
    err = gateway_error(body)
    assert err.param == param, err.message
    assert param in err.message


def test_request_must_be_object():
    with pytest.raises(GatewayError):
        parse_request(["not", "an", "object"])


def test_unknown_top_level_and_item_keys_are_tolerated():
    body = req([{**user("q"), "id": "msg_1", "status": "completed", "phase": "x"}],
               store=False, include=["reasoning.encrypted_content"], prompt_cache_key="k",
               client_metadata={"a": "b"}, service_tier="auto")
    assert chat(body)["messages"] == [{"role": "user", "content": "q"}]


# --- the tools cache (turn.ToolsCache) -----------------------------------------------------


def _turn(body: dict, opts: LoweringOptions = LoweringOptions(), cache=None):
    from resp2chat_core.turn import begin_turn

    return begin_turn(json.dumps(body).encode(), opts, "resp_x", 1, tools_cache=cache)


@pytest.mark.parametrize("name", FIXTURES)
def test_tools_cache_gives_the_same_bytes(name):
    """A turn whose tools come from the cache sends the same chat body and echoes the same
    fields as one lowered from scratch — including when the earlier turn was another request."""
    from resp2chat_core.turn import ToolsCache

    cache = ToolsCache()
    other = fixture_body(FIXTURES[0] if name != FIXTURES[0] else FIXTURES[1])
    _turn(other, cache=cache)  # fills the cache (Codex sends the same tools in every fixture)
    cold = _turn(fixture_body(name))
    warm = _turn(fixture_body(name), cache=cache)
    assert cache.hits == 1
    assert warm.chat_body == cold.chat_body
    assert warm.ctx.echo_json == cold.ctx.echo_json
    assert warm.ctx.tool_map == cold.ctx.tool_map


def test_tools_cache_misses_on_other_tools_or_tool_options():
    from resp2chat_core.turn import ToolsCache

    cache = ToolsCache(size=3)
    body = req([user("hi")], tools=[fn_tool("a"), fn_tool("b")])
    _turn(body, cache=cache)
    fewer = _turn({**body, "tools": [fn_tool("a")]}, cache=cache)
    assert cache.hits == 0 and tool_names(json.loads(fewer.chat_body)) == ["a"]
    denied = _turn(body, LoweringOptions(tool_denylist=frozenset({"b"})), cache=cache)
    assert cache.hits == 0 and tool_names(json.loads(denied.chat_body)) == ["a"]
    again = _turn(body, cache=cache)
    assert cache.hits == 1 and tool_names(json.loads(again.chat_body)) == ["a", "b"]
    # allowed_tools narrows the list per request: the cached encoding is not used for it
    narrowed = _turn({**body, "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                              "tools": [{"type": "function", "name": "b"}]}}, cache=cache)
    assert tool_names(json.loads(narrowed.chat_body)) == ["b"]


def test_cached_tools_do_not_excuse_the_rest_of_the_request():
    from resp2chat_core.turn import ToolsCache

    cache = ToolsCache()
    body = req([user("hi")], tools=[fn_tool("a")])
    _turn(body, cache=cache)
    with pytest.raises(GatewayError):
        _turn({**body, "input": [{"type": "message", "role": "user", "content": 5}]}, cache=cache)
    with pytest.raises(GatewayError):
        _turn({**body, "tool_choice": {"type": "function", "name": "nope"}}, cache=cache)


@pytest.mark.parametrize("first,second", [
    ({"const": True}, {"const": 1}),  # == calls these equal; JSON Schema does not
    ({"maximum": 1.0}, {"maximum": 1}),
    ({"b": {}, "a": {}}, {"a": {}, "b": {}}),  # key order is part of the bytes sent
])
def test_tools_cache_tells_json_values_apart_that_compare_equal(first, second):
    from resp2chat_core.turn import ToolsCache

    def body(props):
        return req([user("hi")], tools=[{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {"x": props}}}])

    cache = ToolsCache()
    _turn(body(first), cache=cache)
    warm = _turn(body(second), cache=cache)
    assert warm.chat_body == _turn(body(second)).chat_body
    assert warm.ctx.echo_json == _turn(body(second)).ctx.echo_json


def test_tools_nested_too_deep_are_a_400_not_a_crash():
    from resp2chat_core.turn import ToolsCache, begin_turn

    deep = b'{"model":"m","input":"x","tools":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(GatewayError):
        begin_turn(deep, LoweringOptions(), "resp_x", 1, tools_cache=ToolsCache())


def test_json_nested_beyond_the_decoder_is_a_400():
    from resp2chat_core.turn import begin_turn

    deep = b'{"model":"m","input":' + b"[" * 200000 + b"]" * 200000 + b"}"
    with pytest.raises(GatewayError) as err:
        begin_turn(deep, LoweringOptions(), "resp_x", 1)
    assert err.value.status == 400 and "nested too deeply" in str(err.value.body())


def test_a_request_with_nothing_to_send_is_refused_not_forwarded():
    """No input, no instructions, no earlier conversation: `messages: []`, which no backend takes."""
    from resp2chat_core.turn import begin_turn

    with pytest.raises(GatewayError) as info:
        begin_turn(b'{"model":"m","input":[]}', LoweringOptions(), "resp_x", 0)
    assert info.value.status == 400 and info.value.param == "input"
    assert json.loads(begin_turn(b'{"model":"m","input":[],"instructions":"be brief"}', LoweringOptions(),
                                 "resp_x", 0).chat_body)["messages"] == [{"role": "system", "content": "be brief"}]


@pytest.mark.parametrize("name", FIXTURES)
def test_text_cache_gives_the_same_bytes(name):
    """Long message texts (Codex's developer prompt) found in the text cache: the chat body is
    byte for byte the cold lowering's, whatever another request left in the cache."""
    from resp2chat_core.turn import ToolsCache

    cache = ToolsCache()
    other = fixture_body(FIXTURES[0] if name != FIXTURES[0] else FIXTURES[1])
    _turn(other, cache=cache)
    hits = cache.texts.hits
    cold = _turn(fixture_body(name))
    warm = _turn(fixture_body(name), cache=cache)
    assert cache.texts.hits > hits
    assert warm.chat_body == cold.chat_body


def test_text_cache_keeps_only_long_texts_and_a_few():
    from resp2chat_core.lowering import TextCache, dumps
    from resp2chat_core.turn import ToolsCache

    texts = TextCache(size=2)
    long = ["é" * TextCache.MIN + str(i) for i in range(3)]
    for text in long + long[-1:]:
        assert texts.json(text) == dumps(text).encode()
    assert texts.hits == 1 and list(texts._entries) == long[1:]
    huge = "x" * (TextCache.MAX + 1)
    assert texts.json(huge) == dumps(huge).encode() and huge not in texts._entries
    # a short text is encoded in place (lower never asks the cache for one)
    body = req([user("hi " * 2000), user("short")], tools=[fn_tool("a")])
    cache = ToolsCache()
    assert _turn(body, cache=cache).chat_body == _turn(body).chat_body == _turn(body, cache=cache).chat_body


# --- caps: what one request may hold (turn.py check_caps) ------------------------------------------


def _caps_error(body: dict, caps) -> GatewayError | None:
    from resp2chat_core.turn import begin_turn, check_caps

    try:
        check_caps(body, caps)
        begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 0)
    except GatewayError as err:
        return err
    return None


@pytest.mark.parametrize("name", FIXTURES)
def test_codex_requests_are_far_inside_the_default_caps(name):
    from resp2chat_core import settings as S
    from resp2chat_core.turn import Caps, check_caps

    defaults = Caps.from_settings({f.name: f.default for f in S.FIELDS})
    assert defaults == Caps(50000, 2000, 100000)
    body = fixture_body(name)
    check_caps(body, defaults)
    # a Codex session adds a few items a turn and compacts long before its context fills: hundreds
    # of times this one (~10 items, 9 tools + 5 namespaced, ~10 parts) stay inside every cap
    check_caps({**body, "input": body["input"] * 500}, defaults)
    assert _caps_error(body, defaults) is None


def test_each_cap_is_a_400_naming_the_cap_and_its_setting():
    from resp2chat_core.turn import Caps

    fn = {"type": "function", "name": "f", "parameters": OBJ}
    ns = {"type": "namespace", "name": "ns", "description": "", "tools": [{**fn, "name": "a"}, {**fn, "name": "b"}]}
    part = {"type": "input_text", "text": "x"}
    cases = [
        (Caps(input_items=2), {"input": [user("a")] * 3}, "input", "3 input items", "max_input_items: 2"),
        (Caps(tools=3), {"input": "x", "tools": [fn, ns]}, "tools", "4 tools", "max_tools: 3"),
        (Caps(tools=3), {"input": [{"type": "additional_tools", "tools": [ns]}, user("x")], "tools": [fn]}, "tools",
         "4 tools", "max_tools: 3"),
        (Caps(content_parts=3), {"input": [{"role": "user", "content": [part] * 2}] * 2}, "input",
         "4 content parts", "max_content_parts: 3"),
        (Caps(content_parts=1), {"input": [{"type": "function_call_output", "call_id": "c", "output": [part] * 2}]},
         "input", "2 content parts", "max_content_parts: 1"),
    ]
    for caps, body, param, counted, setting in cases:
        err = _caps_error({"model": "m", **body}, caps)
        assert err is not None and (err.status, err.code, err.param) == (400, "array_above_max_length", param), body
        assert counted in err.message and setting in err.message, err.message
    # at the cap is fine; 0 is no cap
    assert _caps_error({"model": "m", "input": [user("a")] * 2}, Caps(input_items=2)) is None
    assert _caps_error({"model": "m", "input": [user("a")] * 3}, Caps()) is None


def test_caps_are_checked_before_validation_and_cost_one_count():
    """900k items of anything are refused by their count, before anything looks at one of them."""
    import time

    from resp2chat_core.turn import Caps, check_caps

    items = [{"type": "not-even-a-type"}] * 900_000
    start = time.perf_counter()
    with pytest.raises(GatewayError) as err:
        check_caps({"model": "m", "input": items}, Caps(input_items=50000))
    assert err.value.code == "array_above_max_length" and time.perf_counter() - start < 0.05
    with pytest.raises(GatewayError) as err:
        check_caps({"model": "m", "input": "x", "tools": [{}] * 900_000}, Caps(tools=2000))
    assert err.value.param == "tools"


def test_a_yielding_decode_is_the_same_value():
    """requestbody.loads(yielding=True) (a large body in a worker thread) decodes what the plain
    decoder does, and refuses what it refuses."""
    from resp2chat_core import requestbody

    for name in FIXTURES:
        raw = (CODEX_FIXTURES / name).read_bytes()
        assert requestbody.loads(raw, yielding=True) == requestbody.loads(raw)
    odd = b'{"a": [1, -0, 2.5e3, 12345678901234567890, {"b": {}}, [], true, null, "\\u00e9"]}'
    assert requestbody.loads(odd, yielding=True) == requestbody.loads(odd)
    assert type(requestbody.loads(b"[1]", yielding=True)[0]) is int
    for bad in (b'{"a": NaN}', b'{"a": 1e400}', b'{"a": ' + b"1" * 5000 + b"}", b'{"a": "\\ud800"}'):
        with pytest.raises(GatewayError) as plain:
            requestbody.loads(bad)
        with pytest.raises(GatewayError) as yielding:
            requestbody.loads(bad, yielding=True)
        assert yielding.value.message == plain.value.message


# --- every item type the schema accepts has a way to the backend ---------------------------------

MINIMAL_ITEMS = {
    "message": {"type": "message", "role": "user", "content": "more"},
    "reasoning": {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}]},
    "function_call": {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    "custom_tool_call": {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "x"},
    "local_shell_call": {"type": "local_shell_call", "call_id": "c3", "action": {"type": "exec", "command": ["ls"]}},
    "tool_search_call": {"type": "tool_search_call", "call_id": "c4", "arguments": {"q": "x"}},
    "web_search_call": {"type": "web_search_call", "action": {"type": "search", "query": "q"}},
    "function_call_output": {"type": "function_call_output", "call_id": "c1", "output": "ok"},
    "custom_tool_call_output": {"type": "custom_tool_call_output", "call_id": "c2", "output": "ok"},
    "local_shell_call_output": {"type": "local_shell_call_output", "call_id": "c3", "output": "ok"},
    "tool_search_output": {"type": "tool_search_output", "call_id": "c4", "tools": []},
    "additional_tools": {"type": "additional_tools", "tools": [{"type": "function", "name": "g"}]},
    "mcp_call": {"type": "mcp_call", "id": "mcp_1", "server_label": "s", "name": "echo", "arguments": "{}",
                 "output": "ok"},
    # (with the request it answers: a denial is a tool message under the request's call)
    "mcp_approval_response": [{"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "s", "name": "t",
                               "arguments": "{}"},
                              {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": False}],
}
# Items that lower to nothing by design: a listing offers its tools (test_mcp_core.py), an approval
# request lowers with its response (above).
SILENT_ITEMS = {
    "mcp_list_tools": {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "s", "tools": []},
    "mcp_approval_request": {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "s", "name": "t",
                             "arguments": "{}"},
}


def test_every_item_type_the_schema_accepts_reaches_the_backend():
    """An input item the schema accepts but lowering had no branch for would vanish from the
    conversation: each type leaves its trace in the chat request (its tools, for
    additional_tools), and one the lowering cannot carry is refused by name."""
    from resp2chat_core.schema import ITEM_TYPES
    from resp2chat_core.turn import begin_turn

    assert set(MINIMAL_ITEMS) | set(SILENT_ITEMS) == set(ITEM_TYPES)
    plain = json.loads(begin_turn(json.dumps({"model": "m", "input": "hi"}).encode(), LoweringOptions(), "resp_x", 0).chat_body)
    for kind, item in MINIMAL_ITEMS.items():
        call = MINIMAL_ITEMS.get(kind.removesuffix("_output") if kind.endswith("_call_output") else
                                 "tool_search_call" if kind == "tool_search_output" else "")  # (an output answers a call)
        body = {"model": "m", "input": [{"role": "user", "content": "hi"}, *([call] if call else []),
                                        *(item if isinstance(item, list) else [item])]}
        chat = json.loads(begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 0).chat_body)
        assert chat != plain, kind
        if call:  # (an output answers its call: the call alone lowers otherwise)
            alone = {**body, "input": body["input"][:-1]}
            assert chat != json.loads(begin_turn(json.dumps(alone).encode(), LoweringOptions(), "resp_x", 0).chat_body)


def test_every_type_of_the_schema_can_be_hashed():
    """Python 3.12.0–3.12.2's ``typing.Union`` hashes its members: a member ``Annotated`` with
    metadata that cannot be hashed (pydantic's ``FailFast()``, a dataclass) made ``import
    resp2chat_core.schema`` fail there (``TypeError: unhashable type: 'FailFast'``), so the
    gateway could not start on a Python ``requires-python`` accepts; ``Field(fail_fast=True)``
    does the same and can be hashed. Checked on this Python by hashing every annotation."""
    import typing

    from pydantic import BaseModel

    import resp2chat_core.schema as schema_module
    seen = [value for value in vars(schema_module).values()
            if typing.get_origin(value) is not None or isinstance(value, type(typing.Annotated[int, 1]))]
    seen += [annotation for model in vars(schema_module).values()
             if isinstance(model, type) and issubclass(model, BaseModel)
             for annotation in typing.get_type_hints(model, include_extras=True).values()]
    assert len(seen) > 50
    for annotation in seen:
        hash(annotation)


@pytest.mark.parametrize("field, bad", [
    ("include", "nope"),
    ("input", {"type": "message", "role": "nobody", "content": "a"}),
    ("input", {"type": "message", "role": "user", "content": [{"type": "input_text", "text": 1}]}),
    ("tools", {"type": "function", "name": 1}),
])
def test_a_list_of_many_bad_entries_is_refused_at_its_first(field, bad):
    """Validation of a list stops at its first bad entry: a request of 100 000 bad ``include``
    values (1 MB) cost 0.7 s of CPU when pydantic collected an error for each (~5x a valid
    request of that size), and the 400 names only the first anyway."""
    from pydantic import ValidationError
    from resp2chat_core.schema import ResponsesRequest
    data = {"model": "m", "input": "hi", field: [bad] * 100_000}
    with pytest.raises(ValidationError) as exc:
        ResponsesRequest.model_validate(data)
    assert exc.value.error_count() <= 4, exc.value.error_count()  # (the list's first; a union's other branches)
    with pytest.raises(GatewayError) as err:
        parse_request(data)
    assert err.value.param.startswith(f"{field}[0]") or err.value.param == field, err.value.param
