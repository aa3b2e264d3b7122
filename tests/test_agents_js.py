"""The OpenAI Agents SDK for JavaScript (npm ``@openai/agents``, `make agents-js`) as people build
with it, against a real mitmdump in front of the scripted upstream: the SDK's default OpenAI
client pointed at the gateway, the Responses API (its default), over HTTP and over its Responses
WebSocket transport. A streamed and a plain run, the multi-step tool loop the SDK runs, multi-turn
from its own history, by ``previousResponseId`` and in an ``OpenAIConversationsSession``,
structured output from a zod schema, a reasoning summary, backend failures, and hosted MCP tools
(with and without approvals) against the real server-everything. The node side:
tests/clients/agents_js.cjs; the upstream's directives: demo_upstream.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from helpers import (ROOT, WEATHER_CALL, assert_chat_history, assert_response_format, assert_tool_loop, parse_sse,
                     read_flows, responses_requests, start_gateway, turn_flows)

AGENTS_JS_VERSION = "0.20.0"  # the Makefile's AGENTS_JS_VER
TOOL_LOOP = ["reasoning_item", "tool_call_item", "tool_call_output_item", "reasoning_item", "message_output_item"]


@pytest.fixture(scope="session")
def agents_js_dir() -> Path:
    path = Path(os.environ.get("AGENTS_JS_DIR") or ROOT / ".tools" / f"agents-js-{AGENTS_JS_VERSION}")
    if not (path / "node_modules" / "@openai" / "agents" / "package.json").is_file() or not shutil.which("node"):
        pytest.fail("the OpenAI Agents SDK for JavaScript is not installed: run `make agents-js` (or set AGENTS_JS_DIR)")
    return path


@pytest.fixture(scope="session")
def agents_js(agents_js_dir):
    """Runs one scenario of agents_js.cjs against a gateway: its JSON answer."""
    node = ["node"]
    if int(subprocess.check_output(["node", "-p", "process.versions.node"], text=True).split(".")[0]) < 22:
        node.append("--experimental-websocket")  # (the SDK's WebSocket transport needs the global WebSocket)

    def run(scenario: str, gw, transport: str = "http", prompt: str = "") -> dict:
        proc = subprocess.run([*node, str(ROOT / "tests" / "clients" / "agents_js.cjs"), scenario, gw.base_url,
                               transport, prompt], env={**os.environ, "AGENTS_JS_DIR": str(agents_js_dir)},
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return run


# --- over HTTP (the SDK's default) ---------------------------------------------------------------


def test_streams_text_and_reads_the_end_of_the_stream(agents_js, recording_gateway, upstream):
    gw, flows = recording_gateway
    upstream.clear()
    out = agents_js("stream", gw)
    assert out["final"] == "".join(out["deltas"]) == "You said: hello agents js" and len(out["deltas"]) > 1
    assert out["responseId"].startswith("resp_")
    assert upstream.requests()[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hello agents js"}]
    gw.stop()
    (turn,) = turn_flows(flows)
    assert json.loads(turn.metadata["resp2chat"]["responses_request"])["stream"] is True
    # what the SDK read: a stream as the spec says (parse_sse checks it), ending in data: [DONE]
    raw = turn.response.content
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and parse_sse(raw)[-1]["response"]["id"] == out["responseId"]


def test_text_stream(agents_js, gateway):
    out = agents_js("text_stream", gateway)
    assert out["final"] == "".join(out["chunks"]) == "You said: hello text stream" and len(out["chunks"]) > 1


def test_run_without_streaming(agents_js, recording_gateway, upstream):
    gw, flows = recording_gateway
    out = agents_js("run", gw)
    assert out["final"] == "You said: hello agents js"
    assert out["items"] == ["reasoning_item", "message_output_item"]
    usage = out["usage"]
    assert usage["inputTokens"] > 0 and usage["outputTokens"] > 0
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    gw.stop()
    (request,) = responses_requests(flows)
    assert request["stream"] is False and request["instructions"] == "Be brief."


@pytest.mark.parametrize("scenario", ["tools", "tools_stream"])
def test_tool_loop(agents_js, recording_gateway, upstream, scenario):
    """The SDK runs the tool and sends the whole turn back: its reasoning item (summary empty, the
    reasoning as content, as the gateway gave it), the call and the output."""
    gw, flows = recording_gateway
    upstream.clear()
    out = agents_js(scenario, gw)
    assert out["ran"] == ["Paris"] and out["final"] == "The tool returned: sunny in Paris"
    assert out["items"] == TOOL_LOOP
    if scenario == "tools_stream":
        assert "".join(out["deltas"]) == out["final"] and len(out["deltas"]) > 1
    assert_tool_loop(upstream.requests())
    assert upstream.requests()[-1]["messages"][-2]["reasoning_content"] == f"Thinking about: {WEATHER_CALL}"
    gw.stop()
    second = responses_requests(flows)[1]
    assert [i.get("type") for i in second["input"]] == [None, "reasoning", "function_call", "function_call_output"]


def test_chat_from_its_own_history(agents_js, recording_gateway, upstream):
    gw, flows = recording_gateway
    upstream.clear()
    out = agents_js("chat", gw)
    assert out == {"first": "You said: my name is Ada", "second": "You said: what is my name"}
    assert_chat_history(upstream.requests())
    gw.stop()
    second = responses_requests(flows)[1]
    assert [i.get("type") for i in second["input"]] == [None, "reasoning", "message", None]


def test_chat_by_previous_response_id(agents_js, recording_gateway, upstream):
    gw, flows = recording_gateway
    upstream.clear()
    out = agents_js("previous_response", gw)
    assert (out["first"], out["second"]) == ("You said: my name is Ada", "You said: what is my name")
    assert_chat_history(upstream.requests())  # the gateway's stored turn, the reasoning with it
    gw.stop()
    second = responses_requests(flows)[1]
    assert second["previous_response_id"] == out["firstId"]
    assert second["input"] == [{"role": "user", "content": "what is my name"}]


def test_streamed_tool_loop_by_previous_response_id(agents_js, recording_gateway, upstream):
    """Continued by reference, the SDK chains each step to the last: the tool's step sends only its
    output; the backend gets the whole conversation."""
    gw, flows = recording_gateway
    upstream.clear()
    out = agents_js("previous_response_tools", gw)
    assert out["ran"] == ["Paris"] and out["final"] == "The tool returned: sunny in Paris"
    assert out["items"] == TOOL_LOOP
    requests_ = upstream.requests()
    assert_tool_loop(requests_[1:])
    assert [m["role"] for m in requests_[-1]["messages"]] == ["system", "user", "assistant", "user", "assistant", "tool"]
    gw.stop()
    first, call, output = turn_flows(flows)
    step = json.loads(output.metadata["resp2chat"]["responses_request"])
    assert step["previous_response_id"] == parse_sse(call.response.content)[-1]["response"]["id"]
    assert [i["type"] for i in step["input"]] == ["function_call_output"]


def test_conversations_session(agents_js, gateway, upstream):
    """``OpenAIConversationsSession`` keeps the conversation in the gateway's Conversations API."""
    upstream.clear()
    out = agents_js("session", gateway)
    assert (out["first"], out["second"]) == ("You said: my name is Ada", "You said: what is my name")
    assert out["kept"] == ["user", "reasoning", "assistant"] * 2
    assert_chat_history(upstream.requests())
    items = requests.get(f"{gateway.base_url}/conversations/{out['conversation']}/items", params={"order": "asc"},
                         timeout=10).json()["data"]
    assert [i["type"] for i in items] == ["message", "reasoning", "message"] * 2
    assert items[-1]["content"][0]["text"] == "You said: what is my name"


def test_compaction_session(agents_js, upstream, gateway_factory):
    """``OpenAIResponsesCompactionSession`` compacts through ``POST /v1/responses/compact``. The SDK
    takes only an OpenAI-like model name there; ``model_map`` sends the backend's instead."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_MODEL_MAP": json.dumps({"gpt-5.1": "demo-model"})})
    upstream.clear()
    out = agents_js("compaction", gw, "http", "gpt-5.1")
    assert (out["first"], out["second"]) == ("You said: my name is Ada", "You said: what is my name")
    # the first turn compacted (the SDK then skips a history its last exchange does not cover):
    # the second turn's history is the first's user message and the summary
    assert out["kept"] == ["user", "compaction", "user", "reasoning", "assistant"]
    first, compact, second = upstream.requests()
    assert {r["model"] for r in (first, compact, second)} == {"demo-model"}
    assert compact["messages"][:2] == first["messages"][1:] + [
        {"role": "assistant", "content": "You said: my name is Ada", "reasoning_content": "Thinking about: my name is Ada"}]
    summary = second["messages"][1]
    assert summary["role"] == "user" and summary["content"].startswith("[Summary of the conversation so far.")
    assert second["messages"][-1] == {"role": "user", "content": "what is my name"}


@pytest.mark.parametrize("scenario", ["structured", "structured_stream"])
def test_structured_output(agents_js, recording_gateway, upstream, scenario):
    gw, flows = recording_gateway
    upstream.clear()
    assert agents_js(scenario, gw) == {"final": {"answer": "You said: json"}}
    assert_response_format(upstream.requests()[-1])
    gw.stop()
    (request,) = responses_requests(flows)
    assert request["text"]["format"]["type"] == "json_schema" and request["text"]["format"]["strict"] is True


def test_reasoning_summary_when_asked(agents_js, gateway):
    """The SDK shows a reasoning item's summary; asked for one (``reasoning.summary``), it gets it."""
    assert agents_js("reasoning", gateway) == {"final": "You said: hello agents js",
                                               "reasoning": [["Thinking about: hello agents js"]]}


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_backend_failures(agents_js, gateway, upstream, transport):
    """A failed turn is an error in the SDK, never a hang or an empty answer: streamed, the SDK
    reads the ``response.failed``/``response.incomplete`` terminal event; a plain HTTP run gets
    the gateway's 502 with its message."""
    failed = agents_js("failure", gateway, transport, "error: 503 busy")
    assert failed["stream"] == {"error": "ModelBehaviorError", "message":
                                'OpenAI Responses request ended with unsuccessful terminal state "response.failed".'}
    if transport == "http":
        assert failed["run"]["error"] == "InternalServerError" and failed["run"]["message"].startswith("502 upstream")
    else:
        assert failed["run"] == failed["stream"]
    cut = agents_js("failure", gateway, transport, "length")
    assert cut["stream"]["message"].endswith('"response.incomplete".') and cut["run"] == cut["stream"]


# --- over the Responses WebSocket (setOpenAIResponsesTransport("websocket")) -----------------------


def test_websocket_streams_text(agents_js, upstream, gateway_factory, tmp_path):
    """The socket merges the deltas of one backend read (the scripted upstream sends its answer in
    one): here the backend takes its time (``slow``) and the gateway sends each read at once."""
    flows = tmp_path / "flows.mitm"
    gw = gateway_factory(upstream.origin, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0",
                         "--set", "resp2chat_coalesce_ms=0")
    out = agents_js("stream", gw, "websocket", "slow: 20\nhello agents js")
    assert out["final"] == "".join(out["deltas"]) == "You said: hello agents js" and len(out["deltas"]) > 1
    gw.stop()
    (ws,) = [f for f in read_flows(flows) if f.websocket is not None]
    assert ws.request.path == "/v1/responses"
    sent = [json.loads(m.content) for m in ws.websocket.messages if m.from_client]
    assert [m["type"] for m in sent] == ["response.create"]


@pytest.mark.parametrize("scenario", ["tools", "previous_response_tools"])
def test_websocket_tool_loop(agents_js, gateway, upstream, scenario):
    upstream.clear()
    out = agents_js(scenario, gateway, "websocket")
    assert out["ran"] == ["Paris"] and out["final"] == "The tool returned: sunny in Paris"
    assert out["items"] == TOOL_LOOP
    assert_tool_loop(upstream.requests()[-2:])


def test_websocket_chat_and_structured_output(agents_js, gateway, upstream):
    upstream.clear()
    out = agents_js("previous_response", gateway, "websocket")
    assert (out["first"], out["second"]) == ("You said: my name is Ada", "You said: what is my name")
    assert_chat_history(upstream.requests())
    upstream.clear()
    assert agents_js("structured", gateway, "websocket") == {"final": {"answer": "You said: json"}}
    assert_response_format(upstream.requests()[-1])


# --- hosted MCP tools (hostedMcpTool), run by the gateway against server-everything -------------


@pytest.fixture(scope="module")
def mcp_gateway(upstream, everything, tmp_path_factory):
    servers = json.dumps([{"label": "ev", "url": everything, "timeout_secs": 30}])
    gw = start_gateway(upstream.origin, tmp_path_factory.mktemp("agents-js-mcp"), "--set",
                       "resp2chat_max_replay_entries=0", env={"RESP2CHAT_MCP_SERVERS": servers})
    yield gw
    gw.stop()


def assert_echo_reached_the_backend(upstream_requests: list[dict]) -> None:
    """The backend was offered the server's tools, called echo, and got the real server's answer."""
    first, last = upstream_requests[0], upstream_requests[-1]
    assert "mcp__ev__echo" in [t["function"]["name"] for t in first["tools"]]
    assert last["messages"][-1]["role"] == "tool" and "Echo: hello mcp" in last["messages"][-1]["content"]


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_hosted_mcp_tool(agents_js, mcp_gateway, upstream, transport):
    upstream.clear()
    out = agents_js("mcp", mcp_gateway, transport)
    assert out["final"] == "The tool returned: Echo: hello mcp"
    # the hosted calls are items of one response: the SDK runs no step of its own
    assert out["items"] == ["tool_call_item", "reasoning_item", "tool_call_item", "reasoning_item", "message_output_item"]
    listing, call = out["output"][0], out["output"][2]
    assert listing["name"] == "mcp_list_tools" and "echo" in [t["name"] for t in listing["providerData"]["tools"]]
    assert call["name"] == "mcp_call" and call["output"] == "Echo: hello mcp"
    assert call["providerData"]["server_label"] == "ev" and call["providerData"]["error"] is None
    assert_echo_reached_the_backend(upstream.requests())


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_hosted_mcp_tool_with_approval(agents_js, mcp_gateway, upstream, transport):
    """``requireApproval: "always"``: the turn ends with an approval request, the SDK's
    ``onApproval`` approves, the SDK sends the approval in a second turn and the gateway calls."""
    upstream.clear()
    out = agents_js("mcp_approval", mcp_gateway, transport)
    assert out["asked"] == ["echo"] and out["responses"] == 2
    assert out["final"] == "The tool returned: Echo: hello mcp"
    assert_echo_reached_the_backend(upstream.requests())
