"""Hosted MCP tools through a real mitmdump, against a real MCP server nobody here wrote: npm's
@modelcontextprotocol/server-everything (`make mcp-everything`), over streamable HTTP. The
scripted chat backend (demo_upstream) calls the tools the gateway offers it (``call: NAME ARGS``).
The loop, its items and lowering alone: test_mcp_core.py."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import threading
import time

import pytest
import requests

from helpers import (
    ADDON, ECHO_CALL, MITMDUMP, LocalServer, QuietHandler, chat_completion, check_sdk, check_stream, cli_env,
    ended_at_a_bound, everything_bin, free_port, gateway_env, iter_sse, openai_client, parse_sse, post_turn,
    read_flows, retranslate, run_cli, scrape, send_json, serve_everything, shown_settings, start_gateway, stop_process,
    wait_http, wait_until,
)

CLIENT_TOKEN = "client-mcp-token-5f3a9c"  # a client's authorization for the server (a secret)
OPERATOR_TOKEN = "operator-mcp-key-81d2e7"  # the operator's header for the server (a secret)
KEEPALIVE = 1  # keepalive_secs of the module's gateway: a silent client hears from it every second


@pytest.fixture(scope="module")
def everything_sse(tmp_path_factory):
    """server-everything (conftest's ``everything``) on the older HTTP+SSE transport: its /sse URL."""
    yield from serve_everything(tmp_path_factory, "sse", "/sse", lambda url, proc, log: wait_until(
        lambda: b"running on port" in log.read_bytes(), proc=proc, what="the SSE server listening"))


class _Seen(QuietHandler):
    """In front of server-everything: records the headers each request brought, forwards it."""

    target = ""
    headers: list[dict] = []
    methods: list[str] = []  # the JSON-RPC methods asked, in order
    commands: list[str] = []  # the HTTP methods, in order

    def _forward(self):
        type(self).headers.append({k.lower(): v for k, v in self.headers.items()})
        type(self).commands.append(self.command)
        if self.command == "GET":  # (the optional server-to-client stream: not offered)
            self.send_response(405)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if body:
            message = json.loads(body)
            type(self).methods += [m.get("method") for m in (message if isinstance(message, list) else [message])]
        keep = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        r = requests.request(self.command, self.target, data=body, headers=keep, timeout=30)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.send_header("content-length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_POST = do_GET = do_DELETE = _forward


@pytest.fixture(scope="module")
def seen(everything):
    _Seen.target, _Seen.headers, _Seen.methods, _Seen.commands = everything, [], [], []
    with LocalServer(_Seen) as server:
        yield server.url + "/mcp", _Seen


def allowed(everything: str, seen: str) -> str:
    """The operator's mcp_servers: ``ev`` (server-everything, approvals as the request asks),
    ``fast`` (the same server by another URL, 2 s per step), ``down`` (nothing listens there),
    ``seen`` (the same server behind a recorder of headers, with the operator's own header)."""
    port = everything.removeprefix("http://127.0.0.1:").removesuffix("/mcp")
    return json.dumps([{"label": "ev", "url": everything, "timeout_secs": 30},
                       {"label": "fast", "url": f"http://localhost:{port}/mcp", "timeout_secs": 2},
                       {"label": "down", "url": f"http://127.0.0.1:{free_port()}/mcp", "timeout_secs": 5},
                       {"label": "seen", "url": seen, "headers": {"x-operator-key": OPERATOR_TOKEN},
                        "allowed_tools": ["echo", "get-sum"]}])


@pytest.fixture(scope="module")
def mcp_gateway(upstream, everything, seen, tmp_path_factory):
    gw = start_gateway(upstream.origin, tmp_path_factory.mktemp("mcp-gateway"), "--set",
                       "resp2chat_max_replay_entries=0", "--set", f"resp2chat_keepalive_secs={KEEPALIVE}",
                       env={"RESP2CHAT_MCP_SERVERS": allowed(everything, seen[0])})
    yield gw
    gw.stop()


def mcp_tool(label: str = "ev", **extra) -> dict:
    return {"type": "mcp", "server_label": label, "require_approval": "never", **extra}


def kinds(output) -> list[str]:
    return [item.type if hasattr(item, "type") else item["type"] for item in output]


# --- one turn: list, call, answer ---------------------------------------------------------------


def test_a_turn_lists_the_tools_calls_one_and_answers(mcp_gateway, upstream):
    upstream.clear()
    resp = openai_client(mcp_gateway).responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool()])
    assert resp.status == "completed"
    assert kinds(resp.output) == ["mcp_list_tools", "reasoning", "mcp_call", "reasoning", "message"]
    listing, call = resp.output[0], resp.output[2]
    assert listing.server_label == "ev" and listing.error is None
    assert {"echo", "get-sum", "trigger-long-running-operation"} <= {t.name for t in listing.tools}
    assert call.server_label == "ev" and call.name == "echo" and call.status == "completed"
    assert json.loads(call.arguments) == {"message": "hello mcp"} and call.output == "Echo: hello mcp"
    assert call.error is None
    assert resp.output_text == "The tool returned: Echo: hello mcp"
    first, second = upstream.requests()[-2:]
    offered = [t["function"]["name"] for t in first["tools"]]
    assert "mcp__ev__echo" in offered and "mcp__ev__get-sum" in offered
    echo = next(t["function"] for t in first["tools"] if t["function"]["name"] == "mcp__ev__echo")
    assert echo["parameters"]["properties"]["message"]["type"] == "string" and "$schema" not in echo["parameters"]
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "mcp__ev__echo"
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "Echo: hello mcp"}
    # the usage of the whole turn: the last round's prompt, every round's completion
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0


def test_a_streamed_turn_has_every_mcp_event_in_order(mcp_gateway):
    r = post_turn(mcp_gateway, {"model": "demo-model", "input": ECHO_CALL, "tools": [mcp_tool()], "stream": True})
    assert r.status_code == 200
    response_id = parse_sse(r.content)[0]["response"]["id"]
    events = check_stream(r.content, response_id)  # one stream: order, sequence numbers, one ending
    check_sdk(events)  # every event as the openai SDK reads it
    types = [e["type"] for e in events]
    i = types.index("response.mcp_list_tools.in_progress")
    assert types[i - 1] == "response.output_item.added" and types[i + 1] == "response.mcp_list_tools.completed"
    j = types.index("response.mcp_call.in_progress")
    assert types[j - 1:j + 5] == ["response.output_item.added", "response.mcp_call.in_progress",
                                  "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
                                  "response.mcp_call.completed", "response.output_item.done"]
    assert events[j + 1]["delta"] == events[j + 2]["arguments"] == '{"message": "hello mcp"}'
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][2]["output"] == "Echo: hello mcp"


def test_the_openai_sdk_streams_it(mcp_gateway):
    with openai_client(mcp_gateway).responses.stream(model="demo-model", input=ECHO_CALL, tools=[mcp_tool()]) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.mcp_call.completed" in types and "response.mcp_list_tools.completed" in types
    assert final.output_text == "The tool returned: Echo: hello mcp"


# --- a conversation lists once ------------------------------------------------------------------


def test_a_conversation_lists_the_tools_once(mcp_gateway, upstream, seen):
    """What the server was asked (its JSON-RPC methods, seen in front of it): the client's
    mcp_list_tools item on the first turn only, whether the conversation goes on by
    previous_response_id or by its items; each turn with a step opens one session (its
    handshake) and lists once (the MCP SDK checks a result against the tool's output schema)."""
    _, server = seen
    server.methods.clear()

    def sessions() -> tuple[int, int]:
        """(sessions, calls) so far; and each session listed the tools once"""
        assert server.methods.count("tools/list") == server.methods.count("initialize")
        return server.methods.count("initialize"), server.methods.count("tools/call")

    client = openai_client(mcp_gateway)
    echo = 'call: mcp__seen__echo {"message": "hello mcp"}'
    first = client.responses.create(model="demo-model", input=echo, tools=[mcp_tool("seen")])
    assert sessions() == (1, 1)
    upstream.clear()
    second = client.responses.create(model="demo-model", previous_response_id=first.id, tools=[mcp_tool("seen")],
                                     input='call: mcp__seen__get-sum {"a": 2, "b": 40}')
    assert kinds(second.output) == ["reasoning", "mcp_call", "reasoning", "message"]  # no mcp_list_tools
    assert second.output[1].output == "The sum of 2 and 40 is 42."
    assert sessions() == (2, 2)
    round1 = upstream.requests()[0]  # offered from the listing the first turn made
    assert "mcp__seen__get-sum" in [t["function"]["name"] for t in round1["tools"]]
    # the earlier call is in the history the model reads: the call and its result
    history = [m for m in round1["messages"] if m["role"] == "tool"]
    assert history[0]["content"] == "Echo: hello mcp"
    # … and a client that sends the whole conversation (the Agents SDK) is not listed again either
    items = [item.model_dump(exclude_none=True) for item in first.output]
    third = client.responses.create(model="demo-model", tools=[mcp_tool("seen")], store=False, input=[
        {"role": "user", "content": echo}, *items, {"role": "user", "content": "thanks"}])
    assert kinds(third.output) == ["reasoning", "message"] and third.output_text == "You said: thanks"
    assert sessions() == (2, 2)  # (no step: no session)


def test_a_round_of_calls_shares_one_session(mcp_gateway, seen):
    """Three calls in one round, the listing before them: one session (one handshake, one
    tools/list), not one per step."""
    _, server = seen
    server.methods.clear()
    server.commands.clear()
    resp = openai_client(mcp_gateway).responses.create(model="demo-model", tools=[mcp_tool("seen")], input="\n".join((
        'call: mcp__seen__echo {"message": "one"}', 'call: mcp__seen__get-sum {"a": 1, "b": 2}',
        'call: mcp__seen__echo {"message": "three"}')))
    assert kinds(resp.output) == ["mcp_list_tools", "reasoning", "mcp_call", "mcp_call", "mcp_call", "reasoning",
                                  "message"]
    assert [c.output for c in resp.output[2:5]] == ["Echo: one", "The sum of 1 and 2 is 3.", "Echo: three"]
    methods = [m for m in server.methods if m in ("server/discover", "initialize", "tools/list", "tools/call")]
    assert methods == ["server/discover", "initialize", "tools/list"] + ["tools/call"] * 3, methods
    # … and the session ends with the turn (the SDK's DELETE: the server may let go of it)
    wait_until(lambda: server.commands.count("DELETE") == 1, what="the session closed")


# --- tool_choice ---------------------------------------------------------------------------------


def test_tool_choice_reaches_the_round_where_the_model_chooses(mcp_gateway, upstream):
    """On a first turn the request has no tools until the listing: the backend's round 1 still
    gets the client's tool_choice (``required``, or an mcp tool by name as its function), and
    the round after the forced call ``auto``."""
    client = openai_client(mcp_gateway)
    for choice, want in (("required", "required"), ({"type": "mcp", "server_label": "ev", "name": "echo"},
                                                     {"type": "function", "function": {"name": "mcp__ev__echo"}})):
        upstream.clear()
        resp = client.responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool()], tool_choice=choice)
        assert resp.status == "completed" and resp.output_text == "The tool returned: Echo: hello mcp"
        assert resp.tool_choice == choice if isinstance(choice, str) else resp.tool_choice.model_dump() == choice
        first, second = upstream.requests()
        assert first["tool_choice"] == want and "mcp__ev__echo" in [t["function"]["name"] for t in first["tools"]]
        assert second["tool_choice"] == "auto"
        # a later turn (the listing from the conversation) the same
        upstream.clear()
        client.responses.create(model="demo-model", previous_response_id=resp.id, input=ECHO_CALL, tools=[mcp_tool()],
                                tool_choice=choice)
        assert [r["tool_choice"] for r in upstream.requests()] == [want, "auto"]


# --- approvals ----------------------------------------------------------------------------------


def test_an_approved_call_runs_in_the_next_turn(mcp_gateway, upstream):
    client = openai_client(mcp_gateway)
    asked = client.responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool(require_approval="always")])
    assert asked.status == "completed"
    assert kinds(asked.output) == ["mcp_list_tools", "reasoning", "mcp_approval_request"]
    request = asked.output[-1]
    assert request.server_label == "ev" and request.name == "echo"
    assert json.loads(request.arguments) == {"message": "hello mcp"}
    upstream.clear()
    done = client.responses.create(model="demo-model", previous_response_id=asked.id,
                                   tools=[mcp_tool(require_approval="always")],
                                   input=[{"type": "mcp_approval_response", "approval_request_id": request.id,
                                           "approve": True}])
    assert kinds(done.output) == ["mcp_call", "reasoning", "message"]
    call = done.output[0]
    assert call.approval_request_id == request.id and call.output == "Echo: hello mcp"
    assert done.output_text == "The tool returned: Echo: hello mcp"
    (only,) = upstream.requests()  # the call ran before the model was asked again
    assistant, tool = only["messages"][-2:]
    assert assistant["tool_calls"][0]["id"] == request.id and tool["content"] == "Echo: hello mcp"
    # the same answer again in a later turn runs nothing again; the other answer is a 400
    for approve in (True, False):
        r = post_turn(mcp_gateway, {"model": "demo-model", "previous_response_id": done.id, "input": [
            {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": approve}],
            "tools": [mcp_tool(require_approval="always")]})
        if approve:
            assert r.status_code == 200 and "mcp_call" not in kinds(r.json()["output"])
        else:
            assert r.status_code == 400 and "answered the other way" in r.json()["error"]["message"]


def test_a_denied_call_is_told_to_the_model(mcp_gateway, upstream):
    client = openai_client(mcp_gateway)
    asked = client.responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool(require_approval="always")])
    request = asked.output[-1]
    upstream.clear()
    done = client.responses.create(model="demo-model", previous_response_id=asked.id,
                                   tools=[mcp_tool(require_approval="always")],
                                   input=[{"type": "mcp_approval_response", "approval_request_id": request.id,
                                           "approve": False, "reason": "not today"}])
    assert kinds(done.output) == ["reasoning", "message"]  # nothing ran
    assert done.output_text == "The tool returned: The user denied this tool call: not today"
    assert upstream.requests()[-1]["messages"][-1]["content"] == "The user denied this tool call: not today"


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("listed", [False, True])
def test_an_input_of_only_the_approval_runs_the_call_and_continues(mcp_gateway, upstream, store, listed):
    """A client continuing statelessly sends back the approval request and its answer alone (no
    user message, no reasoning, the listing or not): the approved call runs once, and the model
    is asked to go on with its result (it was "nothing to send the model", a 400)."""
    client = openai_client(mcp_gateway)
    tools = [mcp_tool(require_approval="always")]
    asked = client.responses.create(model="demo-model", input=ECHO_CALL, tools=tools, store=False)
    listing, request = asked.output[0], asked.output[-1]
    assert (listing.type, request.type) == ("mcp_list_tools", "mcp_approval_request")
    answer = {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}
    items = [listing.model_dump(exclude_none=True)] if listed else []
    items += [request.model_dump(exclude_none=True), answer]
    upstream.clear()
    done = client.responses.create(model="demo-model", tools=tools, store=store, input=items)
    assert done.status == "completed"
    assert kinds(done.output) == [*(() if listed else ("mcp_list_tools",)), "mcp_call", "reasoning", "message"]
    call = done.output[-3]
    assert call.approval_request_id == request.id and call.output == "Echo: hello mcp" and call.error is None
    assert done.output_text == "The tool returned: Echo: hello mcp"
    (only,) = upstream.requests()  # the call ran once, before the model was asked
    assistant, tool = only["messages"][-2:]
    assert assistant["tool_calls"][0]["id"] == request.id and tool["content"] == "Echo: hello mcp"
    # sent back with the call that ran, the approval runs nothing again
    again = client.responses.create(model="demo-model", tools=tools, store=False,
                                    input=[*items, *(o.model_dump(exclude_none=True) for o in done.output),
                                           {"role": "user", "content": "thanks"}])
    assert "mcp_call" not in kinds(again.output) and again.output_text == "You said: thanks"


def test_an_input_that_gives_the_model_nothing_says_which_items(mcp_gateway):
    """A listing and an approval request nobody answered: nothing to run, nothing for the model;
    the 400 names the items, in the client's terms."""
    client = openai_client(mcp_gateway)
    tools = [mcp_tool(require_approval="always")]
    asked = client.responses.create(model="demo-model", input=ECHO_CALL, tools=tools, store=False)
    r = post_turn(mcp_gateway, {"model": "demo-model", "tools": tools, "store": False,
                                "input": [asked.output[0].model_dump(), asked.output[-1].model_dump()]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input" and "mcp_approval_request, mcp_list_tools" in error["message"]
    assert "mcp_approval_response" in error["message"]


def test_approval_rules_name_tools(mcp_gateway):
    """``{never: {tool_names}}``: those run at once, every other tool asks first."""
    client = openai_client(mcp_gateway)
    rule = {"never": {"tool_names": ["echo"]}}
    ran = client.responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool(require_approval=rule)])
    assert "mcp_call" in kinds(ran.output)
    asked = client.responses.create(model="demo-model", input='call: mcp__ev__get-sum {"a": 1, "b": 2}',
                                    tools=[mcp_tool(require_approval=rule)])
    assert kinds(asked.output)[-1] == "mcp_approval_request"


def test_the_agents_sdk_hosted_mcp_tool_with_approvals(mcp_gateway, upstream):
    from agents import Agent, HostedMCPTool, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    asked = []

    def decide(approve: bool):
        def on_approval_request(request):
            asked.append((request.data.name, json.loads(request.data.arguments)))
            return {"approve": approve, "reason": None if approve else "no thanks"}
        return on_approval_request

    def run(approve: bool):
        model = OpenAIResponsesModel(model="demo-model",
                                     openai_client=openai_client(mcp_gateway, api_key="unused", asynchronous=True))
        tool = HostedMCPTool(tool_config={"type": "mcp", "server_label": "ev", "require_approval": "always"},
                             on_approval_request=decide(approve))
        return asyncio.run(Runner.run(Agent(name="m", instructions="Use tools.", model=model, tools=[tool]), ECHO_CALL))

    upstream.clear()
    approved = run(True)
    assert asked == [("echo", {"message": "hello mcp"})]
    assert approved.final_output == "The tool returned: Echo: hello mcp"
    calls = [item.raw_item for item in approved.new_items if item.type == "tool_call_item"]
    assert [c.output for c in calls if getattr(c, "type", "") == "mcp_call"] == ["Echo: hello mcp"]
    denied = run(False)
    assert len(asked) == 2 and denied.final_output == "The tool returned: The user denied this tool call: no thanks"


# --- failures: a call's, not the turn's ---------------------------------------------------------


def test_a_server_that_is_down_fails_its_listing_not_the_turn(mcp_gateway, upstream):
    upstream.clear()
    resp = openai_client(mcp_gateway).responses.create(model="demo-model", input="hello",
                                                        tools=[mcp_tool("down"), mcp_tool()])
    assert resp.status == "completed" and resp.output_text == "You said: hello"
    down, ev = resp.output[0], resp.output[1]
    assert down.type == ev.type == "mcp_list_tools"
    assert down.server_label == "down" and down.tools == [] and "MCP server down" in down.error
    assert ev.error is None and ev.tools
    offered = [t["function"]["name"] for t in upstream.requests()[-1]["tools"]]
    assert offered and all(name.startswith("mcp__ev__") for name in offered)


def test_a_tool_that_errors_fails_its_call_not_the_turn(mcp_gateway, upstream):
    upstream.clear()
    resp = openai_client(mcp_gateway).responses.create(model="demo-model", tools=[mcp_tool()],
                                                        input='call: mcp__ev__get-sum {"a": 1, "b": "two"}')
    assert resp.status == "completed"
    call = next(item for item in resp.output if item.type == "mcp_call")
    assert call.status == "failed" and call.output is None
    assert call.error.type == "mcp_tool_execution_error" and "expected number" in json.dumps(call.error.content)
    told = upstream.requests()[-1]["messages"][-1]["content"]
    assert told.startswith("Error: the MCP tool call failed: ") and "expected number" in told
    assert resp.output_text.startswith("The tool returned: Error: the MCP tool call failed")


def test_a_tool_slower_than_its_bound_fails_its_call(mcp_gateway):
    resp = openai_client(mcp_gateway).responses.create(
        model="demo-model", tools=[mcp_tool("fast")],
        input='call: mcp__fast__trigger-long-running-operation {"duration": 30, "steps": 3}')
    assert resp.status == "completed"
    call = next(item for item in resp.output if item.type == "mcp_call")
    assert call.status == "failed" and call.error.type == "mcp_protocol_error"
    assert "did not answer within 2 s" in call.error.message
    assert "did not answer within 2 s" in resp.output_text


def test_other_turns_flow_while_a_tool_runs(mcp_gateway):
    """The MCP client runs on mitmproxy's event loop (anyio on asyncio): a slow tool holds its
    own turn, nothing else."""
    client = openai_client(mcp_gateway)
    done = {}

    def slow():
        done["slow"] = client.responses.create(
            model="demo-model", tools=[mcp_tool()],
            input='call: mcp__ev__trigger-long-running-operation {"duration": 4, "steps": 2}')

    t = threading.Thread(target=slow)
    started = time.monotonic()
    t.start()
    try:
        wait_until(lambda: in_flight(mcp_gateway) == 1, what="the slow turn in flight")
        quick = client.responses.create(model="demo-model", input="words: 20\nnoreason")
        assert quick.status == "completed" and "slow" not in done  # served while the tool ran
    finally:
        t.join(60)
    assert done["slow"].status == "completed" and time.monotonic() - started >= 4
    assert "Long running operation completed" in done["slow"].output[2].output


def slow(seconds: int, label: str = "ev") -> str:
    return f'call: mcp__{label}__trigger-long-running-operation {{"duration": {seconds}, "steps": 1}}'


def test_a_long_call_keeps_the_client_hearing_from_the_gateway(mcp_gateway):
    """A call longer than keepalive_secs: the client gets data events (response.in_progress, as
    during a backend's long prefill) while it runs, as they are due, on HTTP and the WebSocket;
    the turn ends well."""
    body = {"model": "demo-model", "tools": [mcp_tool()], "input": slow(3 * KEEPALIVE + 1)}

    def check(timed: list[tuple[float, dict]]) -> None:
        types = [e["type"] for _, e in timed]
        i, j = types.index("response.mcp_call_arguments.done"), types.index("response.mcp_call.completed")
        alive = [t for t, e in timed[i + 1:j] if e["type"] == "response.in_progress"]
        assert types[i + 1:j] == ["response.in_progress"] * len(alive) and len(alive) >= 2, types
        gaps = [b - a for a, b in zip([timed[i][0], *alive], [*alive, timed[j][0]])]
        assert max(gaps) < KEEPALIVE + 1.5, gaps  # each came when due, not held back to the end
        final = timed[-1][1]["response"]
        assert final["status"] == "completed" and "Long running operation completed" in final["output"][2]["output"]

    raw = bytearray()
    with requests.post(mcp_gateway.base_url + "/responses", json={**body, "stream": True}, stream=True,
                       timeout=60) as r:
        timed = [(time.monotonic(), event) for event in iter_sse(r, raw)]  # (each event timed as it arrives)
    check_sdk(check_stream(bytes(raw), timed[0][1]["response"]["id"]))
    check(timed)
    from wsclient import WSClient

    ws = WSClient(mcp_gateway.base_url)
    try:
        ws.send({"type": "response.create", **body})
        timed = []
        while not timed or timed[-1][1]["type"] not in ("response.completed", "response.failed", "error"):
            timed.append((time.monotonic(), ws.next_message()))
    finally:
        ws.close()
    check(timed)


def test_the_calls_of_a_round_run_at_once(mcp_gateway, upstream):
    """Two slow calls in one round take about one call's time, not two; their items are in the
    order the model asked (the first asked is the slower one), and so are their results for
    the model."""
    upstream.clear()
    started = time.monotonic()
    resp = openai_client(mcp_gateway).responses.create(model="demo-model", tools=[mcp_tool()],
                                                        input=slow(4) + "\n" + slow(3))
    took = time.monotonic() - started
    assert 4 <= took < 6.5, took  # (one after the other: 7 s and more)
    calls = [item for item in resp.output if item.type == "mcp_call"]
    assert [json.loads(c.arguments)["duration"] for c in calls] == [4, 3]
    assert all(c.status == "completed" and "Long running operation completed" in c.output for c in calls)
    assistant, *results = upstream.requests()[-1]["messages"][-3:]
    assert [r["tool_call_id"] for r in results] == [c["id"] for c in assistant["tool_calls"]]


def test_a_client_that_leaves_mid_call_leaves_nothing_running(mcp_gateway):
    body = {"model": "demo-model", "tools": [mcp_tool()], "stream": True,
            "input": 'call: mcp__ev__trigger-long-running-operation {"duration": 20, "steps": 2}'}
    with requests.post(mcp_gateway.base_url + "/responses", json=body, stream=True, timeout=30) as r:
        for event in iter_sse(r):
            if event["type"] == "response.mcp_call.in_progress":
                break  # the call runs: hang up
    left = time.monotonic()
    wait_until(lambda: in_flight(mcp_gateway) == 0, timeout=10, what="the turn ending with its client")
    assert time.monotonic() - left < 10  # well before the 20 s the tool would take


def in_flight(gw) -> float:
    return scrape(gw)[("resp2chat_streams_in_flight", ())]


# --- what a request may name --------------------------------------------------------------------


def test_a_server_the_operator_has_not_allowed_is_refused(mcp_gateway, upstream):
    upstream.clear()
    for tool, param in ((mcp_tool("ev", server_url="http://169.254.169.254/latest"), "tools[0].server_url"),
                        (mcp_tool("elsewhere"), "tools[0].server_label")):
        r = post_turn(mcp_gateway, {"model": "demo-model", "input": "hi", "tools": [tool]})
        assert r.status_code == 400 and r.headers["x-request-id"]
        error = r.json()["error"]
        assert error["code"] == "mcp_server_not_allowed" and error["param"] == param
        assert "operator of this gateway has not allowed" in error["message"]
    r = post_turn(mcp_gateway, {"model": "demo-model", "input": "hi",
                                "tools": [{"type": "mcp", "server_label": "gmail", "connector_id": "connector_gmail"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_mcp_connector"
    assert "connectors" in r.json()["error"]["message"]
    assert upstream.requests() == []  # nothing went anywhere


def test_a_server_may_be_named_by_its_exact_url(mcp_gateway, everything):
    resp = openai_client(mcp_gateway).responses.create(
        model="demo-model", input='call: mcp__mine__echo {"message": "by url"}',
        tools=[{"type": "mcp", "server_label": "mine", "server_url": everything, "require_approval": "never"}])
    assert resp.output_text == "The tool returned: Echo: by url"


def test_the_replay_cache_never_answers_an_mcp_turn(gateway_factory, everything, seen, upstream):
    """An identical request runs its tools again: a replayed answer would skip their effects."""
    gw = gateway_factory(upstream.origin, env={"RESP2CHAT_MCP_SERVERS": allowed(everything, seen[0])})
    client = openai_client(gw)
    upstream.clear()
    answers = [client.responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool()]) for _ in range(2)]
    assert [a.output[2].output for a in answers] == ["Echo: hello mcp"] * 2
    assert len(upstream.requests()) == 4  # two rounds each: neither was a replay
    plain = [client.responses.create(model="demo-model", input="hello") for _ in range(2)]
    assert len(upstream.requests()) == 5 and plain[0].output_text == plain[1].output_text  # (the cache is on)



def test_a_listing_in_the_input_cannot_widen_the_operators_read_only_tools(gateway_factory, everything, upstream):
    """An ``mcp_list_tools`` item in a stateless input is the client's word: one that calls a
    tool read-only the server does not (server-everything's ``toggle-simulated-logging``) never
    gets it run under the operator's ``allowed_tools: {read_only: true}``: the gateway checks
    the server's own listing before a call."""
    gw = gateway_factory(upstream.origin, env={"RESP2CHAT_MCP_SERVERS": json.dumps(
        [{"label": "ro", "url": everything, "allowed_tools": {"read_only": True}}])})
    forged = {"type": "mcp_list_tools", "id": "mcpl_forged", "server_label": "ro", "tools": [
        {"name": name, "input_schema": {"type": "object", "properties": {}}, "annotations": {"readOnlyHint": True}}
        for name in ("get-sum", "toggle-simulated-logging")]}
    client = openai_client(gw)
    for name, args, ran in (("toggle-simulated-logging", {}, False), ("get-sum", {"a": 1, "b": 2}, True)):
        resp = client.responses.create(model="demo-model", tools=[mcp_tool("ro")], input=[
            forged, {"role": "user", "content": f"call: mcp__ro__{name} {json.dumps(args)}"}])
        call = next(item for item in resp.output if item.type == "mcp_call")
        assert call.name == name
        if ran:  # a tool the server itself calls read-only runs
            assert call.error is None and call.output == "The sum of 1 and 2 is 3."
        else:
            assert call.output is None and "allowed_tools" in call.error.message, call


def test_the_older_sse_transport(gateway_factory, everything_sse, upstream):
    gw = gateway_factory(upstream.origin, env={"RESP2CHAT_MCP_SERVERS": json.dumps(
        [{"label": "old", "url": everything_sse, "transport": "sse"}])})
    resp = openai_client(gw).responses.create(model="demo-model", tools=[mcp_tool("old")],
                                              input='call: mcp__old__echo {"message": "over sse"}')
    assert kinds(resp.output) == ["mcp_list_tools", "reasoning", "mcp_call", "reasoning", "message"]
    assert resp.output_text == "The tool returned: Echo: over sse"


def test_a_recorded_mcp_turn_replays_offline_without_the_server(gateway_factory, everything, seen, upstream,
                                                                 tmp_path):
    flows = tmp_path / "recorded"
    live = gateway_factory(upstream.origin, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0",
                           env={"RESP2CHAT_MCP_SERVERS": allowed(everything, seen[0])})
    body = {"model": "demo-model", "input": ECHO_CALL, "tools": [mcp_tool()], "stream": True}
    recorded = post_turn(live, body)
    live.stop()
    # offline: the backend is gone and the operator's "ev" points nowhere; the recording answers
    offline = gateway_factory("http://127.0.0.1:9", "--server-replay", str(flows), env={
        "RESP2CHAT_MCP_SERVERS": json.dumps([{"label": "ev", "url": f"http://127.0.0.1:{free_port()}/mcp"}])})
    again = post_turn(offline, body)
    assert again.status_code == 200 and again.content == recorded.content
    assert parse_sse(again.content)[-1]["response"]["output"][2]["output"] == "Echo: hello mcp"


def test_options_and_the_settings_command_never_show_a_header(tmp_path, everything):
    servers = json.dumps([{"label": "ev", "url": everything, "headers": {"x-operator-key": OPERATOR_TOKEN}}])
    options, shown, log = shown_settings(tmp_path, {"RESP2CHAT_MCP_SERVERS": servers})
    assert options.returncode == 0 and "resp2chat_mcp_servers: ''" in options.stdout
    assert OPERATOR_TOKEN not in options.stdout + options.stderr
    assert shown["mcp_servers"] == [{"label": "ev", "url": everything, "headers": {"x-operator-key": "[set]"}}]
    assert OPERATOR_TOKEN not in log
    # an invalid entry stops the start naming the field, never a header's value
    bad = json.dumps([{"label": "ev", "url": "ftp://x", "headers": {"x-operator-key": OPERATOR_TOKEN}}])
    run = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--set", f"confdir={tmp_path / 'conf'}", "--options"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**gateway_env(), "RESP2CHAT_MCP_SERVERS": bad})
    assert "mcp_servers[0].url" in run.stdout + run.stderr and OPERATOR_TOKEN not in run.stdout + run.stderr


# --- secrets ------------------------------------------------------------------------------------


def test_headers_go_to_their_server_only_and_are_never_recorded(gateway_factory, everything, seen, upstream, tmp_path):
    _, handler = seen
    handler.headers.clear()
    flows = tmp_path / "flows"
    gw = gateway_factory(upstream.origin, "-w", str(flows), env={"RESP2CHAT_MCP_SERVERS": allowed(everything, seen[0])})
    upstream.clear()
    r = post_turn(gw, {"model": "demo-model", "input": 'call: mcp__seen__echo {"message": "x"}',
                       "tools": [mcp_tool("seen", authorization=CLIENT_TOKEN, headers={"x-tenant": "tenant-7f7e2b"})]})
    assert r.status_code == 200
    body = r.json()
    assert body["output"][-1]["content"][0]["text"] == "The tool returned: Echo: x"
    # the server got the client's authorization, its header and the operator's
    assert handler.headers and all(h.get("authorization") == f"Bearer {CLIENT_TOKEN}" and
                                   h.get("x-tenant") == "tenant-7f7e2b" and
                                   h.get("x-operator-key") == OPERATOR_TOKEN for h in handler.headers)
    # the operator's allowed_tools narrow the listing
    assert [t["name"] for t in body["output"][0]["tools"]] == ["echo", "get-sum"]
    # … but no secret reaches the answer, the backend, the log or the flow file
    secrets = (CLIENT_TOKEN, "tenant-7f7e2b", OPERATOR_TOKEN)
    assert body["tools"] == [{"type": "mcp", "server_label": "seen", "require_approval": "never"}]
    assert not any(s in r.text for s in secrets)
    assert not any(s in json.dumps(upstream.requests()) for s in secrets)
    # the same over the WebSocket (its flow keeps the messages and a record of each turn), and
    # a refused request that carried them
    from wsclient import WSClient

    ws = WSClient(gw.base_url)
    try:
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": 'call: mcp__seen__echo {"message": "y"}',
                          "tools": [mcp_tool("seen", authorization=CLIENT_TOKEN, headers={"x-tenant": "tenant-7f7e2b"})]})
        assert events[-1]["response"]["output"][-1]["content"][0]["text"] == "The tool returned: Echo: y"
        refused = ws.turn({"type": "response.create", "model": "demo-model", "input": "hi",
                           "tools": [mcp_tool("nowhere", authorization=CLIENT_TOKEN)]})
        assert refused[-1]["type"] == "error" and refused[-1]["error"]["code"] == "mcp_server_not_allowed"
    finally:
        ws.close()
    r = post_turn(gw, {"model": "demo-model", "input": "hi", "tools": [mcp_tool("nowhere", authorization=CLIENT_TOKEN)]})
    assert r.status_code == 400
    gw.stop()  # (the flow file is complete once mitmdump has stopped)
    saved = flows.read_bytes()
    assert saved and not any(s.encode() in saved for s in secrets)
    assert not any(s in gw.log() for s in secrets)
    turn = next(f.metadata["resp2chat"] for f in read_flows(flows) if "resp2chat" in f.metadata)
    assert '"[redacted]"' in turn["responses_request"]
    # the MCP exchange is in the turn's record: the listing, the call, its arguments and output
    names = [e[1] for e in turn["gateway_events"]]
    assert names[:2] == ["Accepted", "McpListing"] and "McpCalled" in names
    calling = next(e[2] for e in turn["gateway_events"] if e[1] == "McpCalling")
    assert calling["name"] == "echo" and json.loads(calling["arguments"]) == {"message": "x"}
    assert next(e[2] for e in turn["gateway_events"] if e[1] == "McpCalled")["output"] == "Echo: x"
    # … enough to translate the recorded turns again, byte for byte (resp2chat retranslate)
    out, results = retranslate(str(flows))
    assert out.returncode == 0 and [r["outcome"] for r in results] == ["same", "same"], out.stdout


def test_a_request_refused_before_it_was_read_keeps_no_mcp_secret_in_the_flow(gateway_factory, everything, seen,
                                                                            upstream, tmp_path):
    """A client past its ``rpm`` is refused before its body is read (it costs no decoding), so
    its hosted MCP tool's ``authorization`` and headers were never redacted: the flow file kept
    them as sent — for a turn, a compressed turn, a turn spelling ``mcp`` with a JSON escape, an
    ``input_tokens`` call (read or refused). Now a Responses request refused before it was read
    keeps none of its body when it may carry them (redact.unread), and one read keeps it
    without them."""
    key = "sk-carol-" + "c" * 32
    flows = tmp_path / "flows"
    gw = gateway_factory(upstream.origin, "-w", str(flows), "--set",
                         "resp2chat_clients=" + json.dumps([{"name": "carol", "key": key, "rpm": 2}]),
                         env={"RESP2CHAT_MCP_SERVERS": allowed(everything, seen[0])})
    auth = {"authorization": f"Bearer {key}"}
    turn = {"model": "demo-model", "input": "hi",
            "tools": [mcp_tool("seen", authorization=CLIENT_TOKEN, headers={"x-tenant": "tenant-7f7e2b"})]}
    counted = requests.post(f"{gw.base_url}/responses/input_tokens", json=turn, headers=auth, timeout=30)
    assert counted.status_code == 200, counted.text  # (read: kept without the secrets)
    assert post_turn(gw, {"model": "demo-model", "input": "hi"}, auth).status_code == 200  # (its last request)
    refused = [
        post_turn(gw, turn, auth),
        post_turn(gw, gzip.compress(json.dumps(turn).encode()), {**auth, "content-encoding": "gzip"}),
        post_turn(gw, json.dumps(turn).replace('"mcp"', '"\\u006dcp"').encode(), auth),
        requests.post(f"{gw.base_url}/responses/input_tokens", json=turn, headers=auth, timeout=30),
    ]
    assert [r.status_code for r in refused] == [429] * 4, [r.text for r in refused]
    broken = json.dumps(turn).encode()[:-2]  # (does not parse: refused before its tools were read)
    assert post_turn(gw, broken, auth).status_code in (400, 429)
    gw.stop()
    saved = flows.read_bytes()
    for secret in (CLIENT_TOKEN, "tenant-7f7e2b", key):
        assert secret.encode() not in saved and secret not in gw.log(), secret
    kept = [f.request.get_content(strict=False) for f in read_flows(flows) if f.request.method == "POST"]
    assert not any(s.encode() in k for k in kept for s in (CLIENT_TOKEN, "tenant-7f7e2b"))  # (nor compressed)
    assert sum(b"not kept: refused before it was read" in k for k in kept) == 5, kept
    assert any(b'"[redacted]"' in k for k in kept)  # (the input_tokens call it read)


def test_the_gateways_tool_servers_never_get_the_upstream_key_or_a_client_key(gateway_factory, everything, seen,
                                                                              upstream, tmp_path):
    """A team's gateway (an upstream key, clients made with ``keys add``) runs a client's hosted
    MCP tool and web search: the MCP server gets its operator's headers only and the search API its
    own key only, over HTTP and the WebSocket; neither gets the upstream key, a client's key, or any
    ``authorization`` the request did not give that server."""
    _, handler = seen
    handler.headers.clear()
    searched: list[dict] = []

    class Search(QuietHandler):
        def do_GET(self):
            searched.append({k.lower(): v for k, v in self.headers.items()})
            result = {"title": "t", "url": "https://example.org/", "description": "d"}
            send_json(self, 200, {"web": {"results": [result]}})

    up_key, brave_key = "sk-upstream-for-tools-7777", "brave-key-for-tools-8888"
    key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
    with LocalServer(Search) as brave:
        gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", env=cli_env(
            tmp_path, RESP2CHAT_UPSTREAM_API_KEY=up_key, RESP2CHAT_MCP_SERVERS=allowed(everything, seen[0]),
            BRAVE_SEARCH_API_KEY=brave_key, RESP2CHAT_BRAVE_BASE_URL=brave.url))
        client = openai_client(gw, api_key=key)
        mcp = client.responses.create(model="demo-model", input='call: mcp__seen__echo {"message": "x"}',
                                      tools=[mcp_tool("seen")])
        assert mcp.output_text == "The tool returned: Echo: x"
        search = client.responses.create(model="demo-model", input='call: web_search {"query": "q"}',
                                         tools=[{"type": "web_search"}])
        assert search.status == "completed" and "web_search_call" in [item.type for item in search.output]
        from wsclient import WSClient

        ws = WSClient(gw.base_url, headers={"authorization": f"Bearer {key}"})
        try:
            for text, tools in (('call: mcp__seen__echo {"message": "y"}', [mcp_tool("seen")]),
                                ('call: web_search {"query": "r"}', [{"type": "web_search"}])):
                events = ws.turn({"type": "response.create", "model": "demo-model", "input": text, "tools": tools})
                assert events[-1]["type"] == "response.completed", events[-1]
        finally:
            ws.close()
    assert handler.headers and len(searched) == 2
    for got in handler.headers:
        assert got.get("x-operator-key") == OPERATOR_TOKEN and "authorization" not in got and "x-api-key" not in got
    for got in searched:
        assert got.get("x-subscription-token") == brave_key and "authorization" not in got and "x-api-key" not in got
    for got in handler.headers + searched:
        assert up_key not in json.dumps(got) and key not in json.dumps(got)



def test_rounds_answered_with_json_run_the_mcp_calls_in_them(gateway_factory, everything, seen):
    """A backend that ignores ``stream`` answers every round with one JSON ``chat.completion``:
    the loop reads each as its stream; the call of ``mcp__ev__echo`` in the first runs on the
    server (an mcp_call item, its output back to the model), never reaching the client as a
    function_call; the second round's text is the answer."""
    bodies: list[dict] = []

    call = {"id": "call_m1", "type": "function",
            "function": {"name": "mcp__ev__echo", "arguments": '{"message": "json round"}'}}
    answers = [chat_completion({"content": None, "tool_calls": [call]}, "tool_calls"),
               chat_completion({"content": "Echoed."}, "stop")]

    class Rounds(QuietHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            send_json(self, 200, answers[len(bodies) - 1])

    with LocalServer(Rounds) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             env={"RESP2CHAT_MCP_SERVERS": allowed(everything, seen[0])})
        resp = openai_client(gw).responses.create(model="demo-model", input="echo it", tools=[mcp_tool()])
    assert resp.status == "completed"
    assert kinds(resp.output) == ["mcp_list_tools", "mcp_call", "message"]
    assert resp.output[1].name == "echo" and resp.output[1].output == "Echo: json round"
    assert resp.output_text == "Echoed."
    assert len(bodies) == 2
    assistant, tool = bodies[1]["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "mcp__ev__echo"
    assert tool == {"role": "tool", "tool_call_id": "call_m1", "content": "Echo: json round"}

# --- metrics, and the WebSocket -----------------------------------------------------------------


def test_metrics_count_mcp_calls_by_server_and_outcome(mcp_gateway):
    def count(outcome: str) -> float:
        return scrape(mcp_gateway).get(("resp2chat_mcp_calls_total", (("outcome", outcome), ("server", "ev"))), 0.0)

    before = count("completed"), count("failed")
    client = openai_client(mcp_gateway)
    client.responses.create(model="demo-model", input=ECHO_CALL, tools=[mcp_tool()])
    client.responses.create(model="demo-model", input='call: mcp__ev__get-sum {"a": "x"}', tools=[mcp_tool()])
    assert (count("completed"), count("failed")) == (before[0] + 1, before[1] + 1)


def test_the_websocket_runs_the_same_loop(mcp_gateway, upstream):
    from wsclient import WSClient

    ws = WSClient(mcp_gateway.base_url)
    try:
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": ECHO_CALL, "tools": [mcp_tool()]})
        types = [e["type"] for e in events]
        assert "response.mcp_list_tools.completed" in types and "response.mcp_call.completed" in types
        first = events[-1]["response"]
        assert first["status"] == "completed" and kinds(first["output"])[0] == "mcp_list_tools"
        # the socket remembers the conversation: the next turn lists nothing again
        events = ws.turn({"type": "response.create", "model": "demo-model", "previous_response_id": first["id"],
                          "input": 'call: mcp__ev__get-sum {"a": 1, "b": 1}', "tools": [mcp_tool()]})
        final = events[-1]["response"]
        assert kinds(final["output"]) == ["reasoning", "mcp_call", "reasoning", "message"]
        assert final["output"][1]["output"] == "The sum of 1 and 1 is 2."
    finally:
        ws.close()


# --- logprobs through the loop ------------------------------------------------------------------


def test_logprobs_survive_the_loop(mcp_gateway, upstream):
    """The answer after an MCP round keeps its token logprobs, also when the backend sends the
    last token and the finish reason in one chunk (vLLM's way: the demo's ``finish-on-text``),
    a chunk the loop's round filter writes again without its finish reason."""
    asked = dict(model="demo-model", input="finish-on-text\n" + ECHO_CALL, tools=[mcp_tool()], top_logprobs=2,
                 include=["message.output_text.logprobs"])
    upstream.clear()
    client = openai_client(mcp_gateway)
    whole = client.responses.create(**asked)
    assert [r.get("logprobs") for r in upstream.requests()] == [True, True]  # every round asks for them
    with client.responses.stream(**asked) as stream:
        deltas = [e for e in stream if e.type == "response.output_text.delta"]
        streamed = stream.get_final_response()
    for resp in (whole, streamed):
        assert kinds(resp.output) == ["mcp_list_tools", "reasoning", "mcp_call", "reasoning", "message"]
        part = resp.output[-1].content[0]
        assert "".join(t.token for t in part.logprobs) == part.text == "The tool returned: Echo: hello mcp"
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in part.logprobs)
    assert all(d.logprobs for d in deltas) and deltas[-1].delta == "mcp" and deltas[-1].logprobs[0].token == "mcp"


# --- a server that goes away or restarts within a turn -----------------------------------------


class _Rounds(QuietHandler):
    """A chat backend for turns of several rounds (one JSON completion a request): in each of its
    first ``rounds`` rounds that offer its server's tools it calls ``tool`` (``{"message": "call <n>"}``,
    n: the tool results it has read), then it answers with the tool results it read; ``before(n)`` runs before it answers
    round n (what a test does to the MCP server between two calls of one turn)."""

    tool = "mcp__ev__echo"
    rounds = 2
    always = False  # call it in a round that offers none of the server's tools too (a model that ignores them)
    before = staticmethod(lambda n: None)
    bodies: list[dict] = []  # the chat requests it got

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        type(self).bodies.append(body)
        type(self).before(len(results))
        prefix = self.tool.rsplit("__", 1)[0] + "__"  # (a round that offers none of the server's tools: an answer)
        # (``always``: until it reads that a call was refused, "Not run: …", as a model would)
        offered = any(t["function"]["name"].startswith(prefix) for t in body.get("tools") or ())
        if len(results) < self.rounds and (offered and not self.always
                                           or self.always and not any("Not run: " in r for r in results)):
            call = {"id": f"call_{len(results)}", "type": "function", "function": {
                "name": self.tool, "arguments": json.dumps({"message": f"call {len(results)}"})}}
            send_json(self, 200, chat_completion({"content": None, "tool_calls": [call]}, "tool_calls"))
        else:
            send_json(self, 200, chat_completion({"content": " | ".join(results)}, "stop"))


class _Everything:
    """server-everything (streamable HTTP) on one port, which a test stops and starts again: a
    restarted server knows none of the sessions it had."""

    def __init__(self, log) -> None:
        self.port, self.log, self.proc = free_port(), log, None
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> None:
        self.proc = subprocess.Popen([everything_bin(), "streamableHttp"], env={**gateway_env(), "PORT": str(self.port)},
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_http(self.url, proc=self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.mark.parametrize("case", ["restarted", "down_then_back"])
def test_a_server_that_restarts_within_a_turn_costs_its_steps_a_new_session(tmp_path, case):
    """A turn's session with a server that restarts between two of its steps (a new server knows
    none of the old one's sessions): the next step opens a new session and runs, once. A server
    down for one call: that call fails (it connected nowhere: tried once more on a new session,
    no more), and the next call of the same turn, the server back, runs on a new session."""
    server = _Everything(tmp_path / "everything.log")
    server.start()
    calls = {"restarted": 2, "down_then_back": 3}[case]

    def before(n: int) -> None:  # (the backend's round n: the calls before it ran)
        if case == "restarted" and n == 1:
            server.stop()
            server.start()
        elif case == "down_then_back" and n == 1:
            server.stop()
        elif case == "down_then_back" and n == 2:
            server.start()

    _Rounds.tool, _Rounds.rounds, _Rounds.before, _Rounds.always = "mcp__ev__echo", calls, staticmethod(before), False
    try:
        with LocalServer(_Rounds) as backend:
            gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0", env={
                "RESP2CHAT_MCP_SERVERS": json.dumps([{"label": "ev", "url": server.url, "timeout_secs": 10}])})
            try:
                resp = openai_client(gw).responses.create(model="demo-model", input="go", tools=[mcp_tool()])
            finally:
                gw.stop()
    finally:
        server.stop()
    ran = [o for o in resp.output if o.type == "mcp_call"]
    assert len(ran) == calls, kinds(resp.output)
    if case == "restarted":
        assert [c.output for c in ran] == ["Echo: call 0", "Echo: call 1"], [c.error for c in ran]
    else:
        assert ran[0].output == "Echo: call 0" and ran[2].output == "Echo: call 2", [c.error for c in ran]
        assert ran[1].output is None and "ConnectError" in ran[1].error.message
    assert "Connection closed" not in resp.output_text


# --- what spends max_tool_calls and max_mcp_rounds -----------------------------------------------


def test_a_call_waiting_for_approval_or_denied_spends_no_tool_call(mcp_gateway):
    """``max_tool_calls`` counts the calls the gateway runs: a call that waits for the client's
    approval runs nothing in the turn that asks (approved, it counts in the turn that runs it;
    denied, nowhere), so the other call of its round runs within a bound of one; the turn that
    tells the model of a denial has its whole bound for the calls the model makes then."""
    client = openai_client(mcp_gateway)
    tools = [mcp_tool(require_approval={"always": {"tool_names": ["echo"]}, "never": {"tool_names": ["get-sum"]}})]
    asked = client.responses.create(model="demo-model", tools=tools, max_tool_calls=1, input=(
        'call: mcp__ev__echo {"message": "a"}\ncall: mcp__ev__get-sum {"a": 1, "b": 2}'))
    assert kinds(asked.output) == ["mcp_list_tools", "reasoning", "mcp_approval_request", "mcp_call"]
    request, ran = asked.output[2], asked.output[3]
    assert ran.name == "get-sum" and "3" in ran.output
    denied = client.responses.create(model="demo-model", tools=tools, max_tool_calls=1, previous_response_id=asked.id,
                                     input=[{"type": "mcp_approval_response", "approval_request_id": request.id,
                                             "approve": False},
                                            {"role": "user", "content": 'call: mcp__ev__get-sum {"a": 2, "b": 2}'}])
    assert [(o.name, "4" in o.output) for o in denied.output if o.type == "mcp_call"] == [("get-sum", True)]
    approved = client.responses.create(model="demo-model", tools=tools, max_tool_calls=1, previous_response_id=asked.id,
                                       input=[{"type": "mcp_approval_response", "approval_request_id": request.id,
                                               "approve": True}])
    assert [(o.name, o.output) for o in approved.output if o.type == "mcp_call"] == [("echo", "Echo: a")]



def test_a_call_refused_without_running_spends_a_tool_call_and_a_round(tmp_path, everything):
    """A call the gateway refuses without reaching the server (a tool its server does not list)
    spends one of ``max_tool_calls`` and its round one of ``max_mcp_rounds``: the bounds are on
    what the model asks for, so a model that asks again and again for what it cannot have stops
    there (each time it is told why), and the round after offers no MCP tool."""
    _Rounds.tool, _Rounds.rounds, _Rounds.before, _Rounds.bodies = "mcp__ev__nope", 100, staticmethod(lambda n: None), []
    _Rounds.always = False
    with LocalServer(_Rounds) as backend:
        gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0", "--set",
                           "resp2chat_max_mcp_rounds=3", env={"RESP2CHAT_MCP_SERVERS": json.dumps(
                               [{"label": "ev", "url": everything}])})
        try:
            for max_calls, refused in ((2, 2), (None, 3)):
                _Rounds.bodies = []
                resp = openai_client(gw).responses.create(model="demo-model", input="go", tools=[mcp_tool()],
                                                          **({"max_tool_calls": max_calls} if max_calls else {}))
                calls = [o for o in resp.output if o.type == "mcp_call"]
                assert len(calls) == refused and all(c.error and "lists no tool 'nope'" in c.error.message
                                                     for c in calls)
                assert len(_Rounds.bodies) == refused + 1 and resp.output[-1].type == "message"
                assert not any(t["function"]["name"].startswith("mcp__ev__") for t in _Rounds.bodies[-1].get("tools") or ())
        finally:
            gw.stop()


@pytest.mark.parametrize("bound", ["max_tool_calls", "max_mcp_rounds"])
def test_a_call_past_the_bounds_is_a_failed_mcp_call_and_the_turn_ends(tmp_path, everything, bound):
    """Once a turn's ``max_tool_calls`` or ``max_mcp_rounds`` is spent, the next round offers no MCP
    tool; a model that calls one anyway (a stray call, ``_Rounds.always``) gets no function_call of
    a function the client never declared: its call is an ``mcp_call`` that failed, saying which
    bound was spent, and the turn ends there, ``completed`` (OpenAI's: "any further attempts to
    call a tool by the model will be ignored"; ``incomplete`` would need a reason the openai SDK
    does not know) — in the JSON answer, the stream and the stored Response alike. The Agents SDK
    takes such a response (no message, hosted tool calls) as a step and asks again, the failed
    call in its input: the model, having read why, answers."""
    _Rounds.tool, _Rounds.rounds, _Rounds.before, _Rounds.bodies = "mcp__ev__echo", 100, staticmethod(lambda n: None), []
    _Rounds.always = True
    extra = {"max_tool_calls": 1} if bound == "max_tool_calls" else {}
    try:
        with LocalServer(_Rounds) as backend:
            gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0", "--set",
                               "resp2chat_max_mcp_rounds=2", env={"RESP2CHAT_MCP_SERVERS": json.dumps(
                                   [{"label": "ev", "url": everything}])})
            try:
                ran = 1 if bound == "max_tool_calls" else 2
                for stream in (False, True):
                    _Rounds.bodies = []
                    body = {"model": "demo-model", "input": "go", "tools": [mcp_tool()], "stream": stream, **extra}
                    types, answers = ended_at_a_bound(gw, body)
                    assert not stream or "response.mcp_call.failed" in types, types
                    for answer in answers:
                        output = answer["output"]
                        calls = [o for o in output if o["type"] == "mcp_call"]
                        assert len(calls) == ran + 1, kinds(output)
                        assert [c["output"] for c in calls[:ran]] == [f"Echo: call {n}" for n in range(ran)]
                        last = calls[-1]
                        assert last["status"] == "failed" and last["output"] is None and last["name"] == "echo"
                        assert last["server_label"] == "ev" and bound in last["error"]["message"], last["error"]
                    # the backend was asked once per round that ran a call, and once more: no round after the refused call
                    assert len(_Rounds.bodies) == ran + 1
                    assert not any(t["function"]["name"].startswith("mcp__ev__")
                                   for t in _Rounds.bodies[-1].get("tools") or ())
                # the Agents SDK: a response of hosted tool calls and no message makes it ask again (its
                # NextStepRunAgain), with the failed mcp_call in the input; the model, having read why, answers
                # (a function_call of a tool the agent does not have would have failed the run instead)
                from agents import Agent, HostedMCPTool, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

                set_tracing_disabled(True)
                model = OpenAIResponsesModel(model="demo-model", openai_client=openai_client(gw, asynchronous=True))
                agent = Agent(name="m", model=model, tools=[HostedMCPTool(tool_config=mcp_tool())],
                              model_settings=ModelSettings(extra_body=extra or None))
                result = asyncio.run(Runner.run(agent, "go"))
                calls = [item.raw_item for item in result.new_items if item.type == "tool_call_item"]
                assert [getattr(c, "type", "") for c in calls] == ["mcp_call"] * (ran + 1)
                assert calls[-1].status == "failed" and bound in calls[-1].error.message
                assert "Not run: " in result.final_output and len(result.raw_responses) == 2
            finally:
                gw.stop()
    finally:
        _Rounds.always = False
