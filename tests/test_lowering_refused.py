"""End to end through a real mitmdump (the openai SDK, the scripted backend): requests that
tests/test_lowering_property.py found the lowering got wrong are a 400 naming the field, and
nothing reaches the backend."""

from __future__ import annotations

import openai
import pytest

F_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


@pytest.mark.parametrize("kw,param", [
    # a tool_choice namespace that is no string: was a 500 (AttributeError in toolmap.chat_name)
    ({"input": "hi", "tools": [F_TOOL], "tool_choice": {"type": "function", "name": "f", "namespace": 1}},
     "tool_choice.namespace"),
    ({"input": "hi", "tools": [F_TOOL], "tool_choice": {"type": "allowed_tools", "tools": [{"type": "function",
                                                                                          "name": 7}]}},
     "tool_choice.tools[0].name"),
    # an allowed_tools MCP entry whose server_label or name is no string: a 500 (unhashable in a set)
    ({"input": "hi", "tools": [F_TOOL], "tool_choice": {"type": "allowed_tools", "tools": [
        {"type": "mcp", "server_label": ["x"]}]}}, "tool_choice.tools[0].server_label"),
    ({"input": "hi", "tools": [F_TOOL], "tool_choice": {"type": "allowed_tools", "tools": [
        {"type": "mcp", "server_label": "x", "name": {"a": 1}}]}}, "tool_choice.tools[0].name"),
    # a call without a name: went upstream as a tool call named "" (no backend takes it)
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "function_call", "call_id": "call_a", "name": "", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_a", "output": "ok"}]}, "input[1].name"),
    # an MCP call without a name: went upstream as a call named mcp____
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "mcp_call", "id": "mcp_1", "server_label": "docs", "name": "", "arguments": "{}",
                 "output": "ok"}]}, "input[1].name"),
    # a tool_search_output answering no call: went upstream as an orphan tool message
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "tool_search_output", "call_id": "call_made_up", "execution": "client", "tools": []}]},
     "input[1].call_id"),
])
def test_what_lowering_cannot_send_is_a_400_naming_the_field(client, upstream, kw, param):
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-model", **kw)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["code"] == "invalid_value"
    assert upstream.requests() == []


def test_a_hosted_tool_search_from_openai_history_reaches_the_backend_answered(client, upstream):
    """History from OpenAI's server-executed tool search (``call_id`` null on the call and its
    output, each its own ``id``) goes on: the output answers the search before it. It was a 400,
    the output's own id naming no call."""
    upstream.clear()
    client.responses.create(model="demo-model", input=[
        {"role": "user", "content": "find a tool"},
        {"type": "tool_search_call", "id": "tsc_1", "call_id": None, "execution": "server", "arguments": {},
         "status": "completed"},
        {"type": "tool_search_output", "id": "tso_1", "call_id": None, "execution": "server", "tools": [],
         "status": "completed"},
        {"role": "user", "content": "go on"}])
    [sent] = upstream.requests()
    assert [m.get("tool_call_id") for m in sent["messages"] if m["role"] == "tool"] == ["tsc_1"]


def test_a_stored_item_whose_id_is_no_string_does_not_fail_the_turns_after_it(client, upstream):
    """An item id that is no string (the schema takes any) was kept in the stored response; a
    later turn on it whose input gave an id again (an item_reference) was a 500: the duplicate-id
    check could not put the stored one in a set. Only string ids name items."""
    other = client.responses.create(model="demo-model", input="elsewhere")
    first = client.responses.create(model="demo-model", input=[
        {"type": "message", "role": "user", "content": "hi", "id": {"odd": 1}}])
    later = client.responses.create(model="demo-model", previous_response_id=first.id, input=[
        {"type": "item_reference", "id": other.output[-1].id}, {"role": "user", "content": "again"}])
    assert later.status == "completed"
