"""resp2chat_core/mcp.py and the tool loop's mcp kind on their own: the servers an operator allows,
what a request's mcp tool binds to, the functions, approvals, lowering of the items, the loop's
steps and the items the client sees, without sockets. Through a real mitmdump against a real MCP
server: test_mcp_e2e.py."""

from __future__ import annotations

import json

import pytest

from helpers import chat_chunk, chat_sse, check_sdk, check_stream, parse_chat_sse, tool_call_chunk
from resp2chat_core import mcp, settings as S
from resp2chat_core.channel import McpCalled, McpListed, record_events, rebuild_event
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.schema import McpTool
from resp2chat_core.toolloop import Finish, ToolLoop
from resp2chat_core.turn import begin_turn

SPECS = mcp.parse_servers([
    {"label": "ev", "url": "http://127.0.0.1:3001/mcp", "headers": {"authorization": "Bearer op-key-123456"}},
    {"label": "docs", "url": "https://docs.example/mcp", "require_approval": {"always": {"tool_names": ["delete"]}},
     "allowed_tools": ["search", "delete"]},
])
ECHO = {"name": "echo", "description": "Echoes back", "annotations": {"readOnlyHint": True},
        "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                         "properties": {"message": {"type": "string"}}}}
SUM = {"name": "get-sum", "description": "Adds", "annotations": None,
       "input_schema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}
LISTING = {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "ev", "tools": [ECHO, SUM]}
RESP = "resp_" + "c" * 32


def turn(tools, input_, **extra):
    body = {"model": "m", "input": input_, "tools": tools, **extra}
    return begin_turn(json.dumps(body).encode(), LoweringOptions(), RESP, 0, mcp_servers=SPECS)


def refused(tools, input_="hi") -> GatewayError:
    with pytest.raises(GatewayError) as err:
        turn(tools, input_)
    return err.value


def tool(label="ev", **extra) -> dict:
    return {"type": "mcp", "server_label": label, **extra}


# --- the operator's servers ---------------------------------------------------------------------


def test_mcp_servers_are_validated_and_their_headers_are_secrets():
    values, _ = S.resolve({"mcp_servers": [{"label": "ev", "url": "http://127.0.0.1:3001/mcp",
                                            "headers": {"Authorization": "Bearer op-key-123456", "x-k": "v-secret-1"}}]},
                          {})
    assert set(S.secret_values(values)) >= {b"Bearer op-key-123456", b"op-key-123456", b"v-secret-1"}
    assert repr(mcp.parse_servers(values["mcp_servers"])[0]) == "ServerSpec('ev', 'http://127.0.0.1:3001/mcp')"
    for entry, why in (({"label": "ev", "url": "ftp://x"}, "url"), ({"label": "bad label", "url": "http://x"}, "label"),
                       ({"label": "ev", "url": "http://x", "timeout_secs": 0}, "timeout_secs"),
                       ({"label": "ev", "url": "http://x", "colour": 1}, "unknown field"),
                       ({"label": "ev", "url": "http://x", "headers": {"mcp-session-id": "s3cret-value"}}, "cannot be set"),
                       ({"label": "ev", "url": "http://x", "headers": {"x-k": "s3cret-value" + "v" * mcp.MAX_HEADER_VALUE}},
                        "'x-k': a value of 8204 characters, more than the 8192"),
                       ({"label": "ev", "url": "http://x", "require_approval": "sometimes"}, "require_approval"),
                       ({"label": "ev", "url": "http://x", "transport": "stdio"}, "transport")):
        with pytest.raises(S.SettingsError) as err:
            S.resolve({"mcp_servers": [entry]}, {})
        assert why in str(err.value) and "s3cret-value" not in str(err.value)
    longest = {"label": "ev", "url": "http://x", "headers": {"x-k": "v" * mcp.MAX_HEADER_VALUE}}
    assert mcp.parse_servers([longest])[0].headers == (("x-k", "v" * 8192),)  # (8 KiB: still taken)
    with pytest.raises(S.SettingsError, match="same label"):
        S.resolve({"mcp_servers": [{"label": "a", "url": "http://x"}, {"label": "a", "url": "http://y"}]}, {})
    env, _ = S.resolve({}, {"RESP2CHAT_MCP_SERVERS": json.dumps([{"label": "e", "url": "http://e/mcp"}])})
    assert mcp.parse_servers(env["mcp_servers"])[0].url == "http://e/mcp"


def test_a_request_names_an_allowed_server_by_label_or_exact_url():
    by_label = turn([tool()], "hi").mcp.servers[0]
    by_url = turn([tool("mine", server_url="https://docs.example/mcp")], "hi").mcp.servers[0]
    assert (by_label.label, by_label.spec.label) == ("ev", "ev")
    assert (by_url.label, by_url.spec.label) == ("mine", "docs")
    for tools, param in (([tool("ev", server_url="http://127.0.0.1:3001/mcp/")], "tools[0].server_url"),
                         ([tool("nope")], "tools[0].server_label"),
                         ([{"type": "function", "name": "f"}, tool("ev", server_url="http://10.0.0.1/")],
                          "tools[1].server_url")):
        err = refused(tools)
        assert err.code == "mcp_server_not_allowed" and err.param == param and err.status == 400
        assert "operator of this gateway has not allowed" in err.message and "ev, docs" not in err.message
    assert refused([tool("g", connector_id="connector_gmail")]).code == "unsupported_mcp_connector"
    assert "another mcp tool" in refused([tool(), tool()]).message
    assert refused([tool(headers={"content-length": "1"})]).param == "tools[0].headers"
    with pytest.raises(GatewayError, match="mcp_servers allows: none"):
        begin_turn(json.dumps({"model": "m", "input": "x", "tools": [tool()]}).encode(), LoweringOptions(), RESP, 0)


def test_headers_the_server_gets_and_what_is_never_echoed():
    t = turn([tool(authorization="client-tok-98765", headers={"x-tenant": "t-1234", "Authorization": "x"})], "hi")
    server = t.mcp.servers[0]
    assert server.headers() == {"x-tenant": "t-1234", "authorization": "Bearer op-key-123456"}  # the operator's win
    assert b"client-tok-98765" in server.secrets() and b"op-key-123456" in server.secrets()
    echoed = json.loads("{" + t.ctx.echo_json + "}")["tools"]
    assert echoed == [{"type": "mcp", "server_label": "ev"}]
    raw = {"tools": [tool(authorization="client-tok-98765", headers={"x-tenant": "t-1234"})]}
    text = json.dumps(raw)
    assert "client-tok-98765" not in mcp.redact_text(text, raw) and json.loads(mcp.redact_text(text, raw))
    # a value spelt with escapes the JSON of the value is not: the request is written again without it
    escaped = text.replace("t-1234", "t\\u002d1234")
    redone = mcp.redact_text(escaped, raw)
    assert "t-1234" not in redone and "t\\u002d1234" not in redone and "[redacted]" in redone


# --- approvals ----------------------------------------------------------------------------------


def test_approval_rules_request_and_operator():
    def needs(t, name, read_only=False):
        return t.mcp.servers[0].needs_approval(name, read_only)

    assert needs(turn([tool()], "hi"), "echo")  # the API's default: always
    assert not needs(turn([tool(require_approval="never")], "hi"), "echo")
    rule = turn([tool(require_approval={"never": {"tool_names": ["echo"]}})], "hi")
    assert not needs(rule, "echo") and needs(rule, "get-sum")
    read = turn([tool(require_approval={"never": {"read_only": True}})], "hi")
    assert not needs(read, "x", read_only=True) and needs(read, "y")
    # the operator's floor: its always stays, whatever the request says; its other tools follow the request
    docs = turn([tool("docs", require_approval="never")], "hi")
    assert needs(docs, "delete") and not needs(docs, "search")


# --- functions, lowering, the history -----------------------------------------------------------


def test_a_first_turn_offers_no_tools_until_they_are_listed():
    t = turn([tool(require_approval="never")], "hi", tool_choice="required")
    assert "tools" not in json.loads(t.chat_body)
    assert [s.label for s in t.mcp.unlisted] == ["ev"] and t.mcp.pending == ()


def test_a_listing_in_the_conversation_offers_its_tools_without_colliding():
    client = {"type": "function", "name": "mcp__ev__echo", "parameters": {"type": "object"}}
    t = turn([client, tool()], [{"role": "user", "content": "hi"}, LISTING])
    chat = json.loads(t.chat_body)
    names = [f["function"]["name"] for f in chat["tools"]]
    assert names == ["mcp__ev__echo", "mcp__ev__echo_2", "mcp__ev__get-sum"]  # the client's keeps its name
    echo = chat["tools"][1]["function"]
    assert echo["description"] == "Echoes back" and "$schema" not in echo["parameters"]
    assert t.mcp.names == {"mcp__ev__echo_2": ("ev", "echo"), "mcp__ev__get-sum": ("ev", "get-sum")}
    assert t.mcp.unlisted == ()
    # the operator's allowed_tools and the request's narrow what is offered
    narrow = turn([tool(allowed_tools=["get-sum"])], [{"role": "user", "content": "hi"}, LISTING])
    assert [f["function"]["name"] for f in json.loads(narrow.chat_body)["tools"]] == ["mcp__ev__get-sum"]


def test_the_history_lowers_calls_denials_and_pending_approvals():
    asked = {"type": "mcp_approval_request", "id": "mcpr_9", "server_label": "ev", "name": "echo",
             "arguments": '{"message":"m"}'}
    ran = {"type": "mcp_call", "id": "mcp_1", "server_label": "ev", "name": "get-sum", "arguments": '{"a":1,"b":2}',
           "output": "3", "status": "completed"}
    failed = {"type": "mcp_call", "id": "mcp_2", "server_label": "ev", "name": "echo", "arguments": "{}",
              "error": {"type": "mcp_protocol_error", "code": -32001, "message": "too slow"}, "status": "failed"}
    history = [{"role": "user", "content": "hi"}, LISTING, ran, failed, asked]
    denied = turn([tool()], [*history, {"type": "mcp_approval_response", "approval_request_id": "mcpr_9",
                                        "approve": False, "reason": "no"}])
    messages = json.loads(denied.chat_body)["messages"]
    assert messages[1]["tool_calls"][0] == {"id": "mcp_1", "type": "function",
                                            "function": {"name": "mcp__ev__get-sum", "arguments": '{"a":1,"b":2}'}}
    assert messages[2] == {"role": "tool", "tool_call_id": "mcp_1", "content": "3"}
    assert messages[4]["content"] == "Error: the MCP tool call failed: too slow"
    assert messages[5]["tool_calls"][0]["id"] == "mcpr_9"
    assert messages[6] == {"role": "tool", "tool_call_id": "mcpr_9", "content": "The user denied this tool call: no"}
    assert denied.mcp.pending == ()
    approved = turn([tool()], [*history, {"type": "mcp_approval_response", "approval_request_id": "mcpr_9",
                                          "approve": True}])
    assert approved.mcp.pending == (mcp.Pending("mcpr_9", "ev", "echo", '{"message":"m"}'),)
    assert json.loads(approved.chat_body)["messages"][-1]["tool_call_id"] == "mcp_2"  # it runs before round 1
    done = {**ran, "id": "mcp_3", "approval_request_id": "mcpr_9"}
    later = turn([tool()], [*history, {"type": "mcp_approval_response", "approval_request_id": "mcpr_9",
                                       "approve": True}, done])
    assert later.mcp.pending == ()  # it ran already
    err = refused([tool()], [{"type": "mcp_approval_response", "approval_request_id": "mcpr_x", "approve": True}])
    assert err.code == "invalid_value" and "mcpr_x" in err.message
    # an approved call that has not run needs its server's mcp tool in the request (never dropped)
    approving = [*history, {"type": "mcp_approval_response", "approval_request_id": "mcpr_9", "approve": True}]
    for tools in ([], [{"type": "function", "name": "f"}]):
        err = refused(tools, approving)
        assert err.param == "tools" and "mcpr_9" in err.message and "'ev'" in err.message
    assert turn([], [*approving, done]).mcp is None  # (it ran: nothing to run, no server needed)


# --- the loop -----------------------------------------------------------------------------------


def test_the_loop_lists_then_calls_then_answers():
    t = turn([tool(require_approval="never"), {"type": "function", "name": "exec"}], "hi")
    loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=1)])
    (listing,) = loop.prelude()
    assert isinstance(listing, mcp.ListTools) and listing.server.label == "ev"
    loop.begin([(ECHO, SUM)])
    assert [f["function"]["name"] for f in json.loads(loop.body)["tools"]] == ["exec", "mcp__ev__echo",
                                                                                "mcp__ev__get-sum"]
    out = loop.feed(chat_sse(chat_chunk({"content": "Let me see."}),
                             tool_call_chunk(0, "c1", "mcp__ev__echo", '{"message":"x"}'), chat_chunk(finish="tool_calls")))
    assert parse_chat_sse(out) == [chat_chunk({"content": "Let me see."})]  # the gateway's call is held back
    _, steps = loop.end_round(ok=True)
    assert steps == [mcp.Call("c1", t.mcp.servers[0], "ev", "echo", '{"message":"x"}')]
    assert loop.next_round(["Echo: x"]) is None
    nxt = json.loads(loop.body)
    assert nxt["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "Echo: x"}
    assert [f["function"]["name"] for f in nxt["tools"]] == ["exec"]  # max_mcp_rounds spent


def test_a_call_past_a_spent_bound_is_the_gateways_refused_and_the_turn_ends():
    """Once ``max_mcp_rounds`` (or ``max_tool_calls``) is spent the round offers no MCP tool; a
    call the model makes of one anyway is still held back (never a client's function_call): a
    ``Call`` refused with the bound it is past, that reaches no server, and the turn ends after
    its round (``Finish``: no round after it, where the model would only ask again)."""
    for max_rounds, max_calls, bound in ((1, None, "max_mcp_rounds"), (5, 1, "max_tool_calls")):
        t = turn([tool(require_approval="never"), {"type": "function", "name": "exec"}], "hi")
        loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=max_rounds)], max_calls=max_calls)
        loop.prelude()
        loop.begin([(ECHO, SUM)])
        loop.feed(chat_sse(tool_call_chunk(0, "c1", "mcp__ev__echo", '{"message":"x"}'), chat_chunk(finish="tool_calls")))
        _, steps = loop.end_round(ok=True)
        assert steps[0].refused is None and loop.next_round(["Echo: x"]) is None
        assert [f["function"]["name"] for f in json.loads(loop.body)["tools"]] == ["exec"]
        assert loop.owns("mcp__ev__echo") and loop.owns("mcp__ev__nope") and not loop.owns("exec")
        out = loop.feed(chat_sse(tool_call_chunk(0, "c2", "mcp__ev__get-sum", '{"a":1}'),
                                 tool_call_chunk(1, "c3", "mcp__ev__nope", "{}"), chat_chunk(finish="tool_calls")))
        assert parse_chat_sse(out) == []  # held back, both: the gateway's, not the client's
        _, steps = loop.end_round(ok=True)
        assert [(s.call_id, s.label, s.name) for s in steps] == [("c2", "ev", "get-sum"), ("c3", "ev", "nope")]
        assert all(isinstance(s, mcp.Call) and s.refused.startswith("Not run: ") and bound in s.refused
                   for s in steps), steps
        end = loop.next_round(["Error: " + s.refused for s in steps])
        assert isinstance(end, Finish)
        assert [c["choices"][0]["finish_reason"] for c in parse_chat_sse(end.tail) if isinstance(c, dict) and c.get("choices")] == ["tool_calls"]


def test_the_tool_choice_reaches_round_one_once_the_tools_are_listed():
    """A first turn's request has no tools to choose among until the listing: round 1 gets the
    client's choice then (``required``, an mcp tool by name, parallel_tool_calls); the round
    after a call the model was made to make is ``auto``, so it can answer."""
    for choice, want in (("required", "required"), ({"type": "mcp", "server_label": "ev", "name": "get-sum"},
                                                     {"type": "function", "function": {"name": "mcp__ev__get-sum"}}),
                         ({"type": "mcp", "server_label": "ev", "name": "nothing"}, "auto")):
        t = turn([tool(require_approval="never")], "hi", tool_choice=choice, parallel_tool_calls=False)
        assert "tool_choice" not in json.loads(t.chat_body)
        loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=5)])
        loop.begin([(ECHO, SUM)])
        first = json.loads(loop.body)
        assert (first["tool_choice"], first["parallel_tool_calls"]) == (want, False)
        loop.feed(chat_sse(tool_call_chunk(0, "c1", "mcp__ev__get-sum", "{}"), chat_chunk(finish="tool_calls")))
        loop.end_round(ok=True)
        loop.next_round(["3"])
        assert json.loads(loop.body)["tool_choice"] == "auto"
    # a server the request has no mcp tool for cannot be chosen: a 400, as a function not in tools is
    for tools in ([tool(require_approval="never")], [{"type": "function", "name": "f"}]):
        with pytest.raises(GatewayError) as caught:
            turn(tools, "hi", tool_choice={"type": "mcp", "server_label": "elsewhere", "name": "echo"})
        err = caught.value
        assert err.status == 400 and err.param == "tool_choice.server_label" and "'elsewhere'" in err.message
    # a listing that failed offers no tools: no tool choice either
    t = turn([tool(require_approval="never")], "hi", tool_choice="required")
    loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=5)])
    loop.begin([None])
    assert "tool_choice" not in json.loads(loop.body) and "tools" not in json.loads(loop.body)


def test_a_call_that_needs_approval_ends_the_turn_after_the_others_run():
    t = turn([tool(require_approval={"never": {"tool_names": ["echo"]}})], [{"role": "user", "content": "hi"}, LISTING])
    loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=5)])
    assert loop.prelude() == []
    loop.feed(chat_sse(tool_call_chunk(0, "c1", "mcp__ev__echo", "{}"),
                       tool_call_chunk(1, "c2", "mcp__ev__get-sum", "{}"),
                       chat_chunk(finish="tool_calls")))
    _, steps = loop.end_round(ok=True)
    assert [type(s).__name__ for s in steps] == ["Call", "Approve"]
    end = loop.next_round(["Echo: ", None])
    assert isinstance(end, Finish) and parse_chat_sse(end.tail)[0]["choices"][0]["finish_reason"] == "tool_calls"


def test_an_approved_call_runs_before_round_one():
    asked = {"type": "mcp_approval_request", "id": "mcpr_9", "server_label": "ev", "name": "echo", "arguments": "{}"}
    t = turn([tool()], [{"role": "user", "content": "hi"}, LISTING, {"type": "reasoning", "summary": []}, asked,
                        {"type": "mcp_approval_response", "approval_request_id": "mcpr_9", "approve": True}])
    loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=5)])
    (step,) = loop.prelude()
    assert step == mcp.Call("mcpr_9", t.mcp.servers[0], "ev", "echo", "{}", "mcpr_9")
    loop.begin(["Echo: "])
    messages = json.loads(loop.body)["messages"]
    assert messages[-2]["tool_calls"] == [{"id": "mcpr_9", "type": "function",
                                           "function": {"name": "mcp__ev__echo", "arguments": "{}"}}]
    assert messages[-1] == {"role": "tool", "tool_call_id": "mcpr_9", "content": "Echo: "}


def test_an_input_of_only_an_approval_lowers_to_the_call_it_runs():
    """The approval request and its answer alone (a stateless client): the user's answer as the
    first message (a chat template may want one before a call), then the call and its result;
    denied, the same before the call and what the model is told; with nothing pending it is a 400
    naming the input's items."""
    asked = {"type": "mcp_approval_request", "id": "mcpr_9", "server_label": "ev", "name": "echo", "arguments": "{}"}
    answer = {"type": "mcp_approval_response", "approval_request_id": "mcpr_9", "approve": True}
    t = turn([tool()], [asked, answer])
    assert json.loads(t.chat_body)["messages"] == [
        {"role": "user", "content": "I approve the call of the tool echo of the MCP server ev."}]
    loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=5)])
    listing, step = loop.prelude()
    assert isinstance(listing, mcp.ListTools) and step.approval_request_id == "mcpr_9"
    loop.begin([(ECHO, SUM), "Echo: "])
    assert [m["role"] for m in json.loads(loop.body)["messages"]] == ["user", "assistant", "tool"]
    t = turn([tool()], [asked, {**answer, "approve": False}])
    assert [(m["role"], m["content"]) for m in json.loads(t.chat_body)["messages"]] == [
        ("user", "I deny the call of the tool echo of the MCP server ev."), ("assistant", None),
        ("tool", "The user denied this tool call.")]
    t = turn([tool()], [{"role": "user", "content": "echo"}, asked, answer])  # (a user message before: as it was)
    assert json.loads(t.chat_body)["messages"] == [{"role": "user", "content": "echo"}]
    err = refused([tool()], [LISTING, asked])
    assert err.param == "input" and "(mcp_approval_request, mcp_list_tools)" in err.message


def test_a_call_no_listing_offers_fails_without_reaching_the_client():
    """A name that reads as a tool of one of the request's servers (``mcp__<label>__<tool>``)
    and that the client did not declare is the gateway's: held back, it fails as a refused Call.
    A client's function so named, or a server the request has no tool for, is the client's."""
    t = turn([tool(require_approval="always"), tool("docs"), {"type": "function", "name": "mcp__docs__mine"}], "hi")
    kind = mcp.McpTools(t.mcp, max_rounds=5)
    kind.listed("ev", (ECHO,))  # (docs: its listing failed)
    kind.retools(json.loads(t.chat_body).get("tools") or [])
    assert kind.owns("mcp__ev__echo") and kind.owns("mcp__ev__nope") and kind.owns("mcp__docs__search")
    assert not kind.owns("mcp__docs__mine") and not kind.owns("mcp__other__x") and not kind.owns("mcp__ev__")
    nope, search = kind.step("c1", "mcp__ev__nope", "{}"), kind.step("c2", "mcp__docs__search", "{}")
    assert (nope.label, nope.name, search.label, search.name) == ("ev", "nope", "docs", "search")
    assert "lists no tool 'nope'" in nope.refused and "could not be listed" in search.refused  # (never an Approve)
    assert isinstance(kind.step("c3", "mcp__ev__echo", "{}"), mcp.Approve)
    loop = ToolLoop(t.chat_body, [kind])
    out = loop.feed(chat_sse(tool_call_chunk(0, "c1", "mcp__docs__search", "{}"),
                             tool_call_chunk(1, "c2", "mcp__docs__mine", "{}"), chat_chunk(finish="tool_calls")))
    assert [c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] for c in parse_chat_sse(out)
            if c.get("choices") and c["choices"][0]["delta"].get("tool_calls")] == ["mcp__docs__mine"]


# --- what the client sees -----------------------------------------------------------------------


def test_the_items_and_events_the_client_sees():
    t = turn([tool()], "hi", stream=True)
    tr = t.translator()
    error = json.dumps({"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": "bad"}]})
    out = tr.accepted() + tr.mcp_listing("ev") + McpListed("ev", json.dumps([ECHO])).apply(tr)
    out += tr.mcp_calling("c1", "ev", "echo", '{"message":"x"}') + tr.mcp_called("c1", "Echo: x")
    out += tr.mcp_calling("c2", "ev", "echo", "{}", "mcpr_1") + McpCalled("c2", None, error).apply(tr)
    out += tr.mcp_approval("ev", "get-sum", "{}")
    out += tr.feed(chat_sse(chat_chunk({"content": "done"}), chat_chunk(finish="stop"))) + tr.finish()
    events = check_stream(out, RESP)
    check_sdk(events)
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["mcp_list_tools", "mcp_call", "mcp_call", "mcp_approval_request", "message"]
    assert output[0]["tools"] == [ECHO]
    assert output[1]["status"] == "completed" and output[1]["output"] == "Echo: x"
    assert output[2]["status"] == "failed" and output[2]["error"]["content"][0]["text"] == "bad"
    assert output[2]["approval_request_id"] == "mcpr_1"
    assert output[3]["id"].startswith("mcpr_") and output[3]["name"] == "get-sum"
    types = [e["type"] for e in events]
    assert "response.mcp_call.failed" in types and types.count("response.mcp_call.completed") == 1


def test_mcp_events_survive_a_record():
    listed = McpListed("ev", json.dumps([ECHO]))
    called = McpCalled("c1", None, json.dumps({"type": "http_error", "code": 502, "message": "bad gateway"}))
    record = json.loads(json.dumps(record_events([(0, listed), (5, called)], (b"op-key-123456",))))
    assert [rebuild_event(name, fields) for _, name, fields in record] == [listed, called]


def test_output_is_bounded():
    content = [{"type": "text", "text": "é" * 3000}, {"type": "image", "mimeType": "image/png", "data": "…"}]
    text = mcp.output_text(content, None, 1000)
    whole = len(("é" * 3000 + "\n[image content (image/png)]").encode())
    assert len(text.split("\n[output truncated")[0].encode()) <= 1000 and f"{whole} bytes" in text
    assert mcp.output_text([], {"t": 1}, 100) == '{"t": 1}'
    assert "[image content (image/png)]" in mcp.output_text(content[1:], None, 100)


def test_a_request_tool_validates():
    assert McpTool.model_validate(tool()).server_label == "ev"
    assert refused([{"type": "mcp"}]).param == "tools[0].server_label"
