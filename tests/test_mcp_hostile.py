"""Hosted MCP tools against servers that misbehave (tests/mcp_hostile.py), through a real mitmdump
and the scripted chat backend: whatever a server does, the turn ends in bounded time with the
failure said in its item, and nothing of the server's credentials reaches the backend."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from helpers import (
    LocalServer, Peak, check_sdk, check_stream, openai_client, parse_sse, post_turn, serve_script, start_gateway,
)
from mcp_hostile import Hostile
from resp2chat_core import mcp

FAILING = {"hang": "did not answer within", "drip": "did not answer within", "garbage": "json_invalid",  # a call
           "wrong_id": "did not answer within", "cut": "ended without a response", "cut_json": "cut short",  # fails,
           "huge": "larger than 8 MiB"}  # with that said
MODES = ("ok", "echo_auth", "echo_garbage", "straddle", *FAILING, "fat_pages", "empty_pages", "bad_list", "redirect",
         "hang_init", "retry0", "resume0", "empty_tail", "refuse400", "proxy400", "paged404", "paged_err", "paged_hang", "schema")
TIMEOUT = 3
OPERATOR_TOKEN = "operator-hostile-key-7c1e0b"
CLIENT_TOKEN = "client-hostile-token-93af2d"
URL_KEY = "url-key-5be0c1d7"  # (in the query of a configured URL)


@pytest.fixture(scope="module")
def hostile():
    Hostile.calls.clear()
    Hostile.gets.clear()
    Hostile.inits.clear()
    Hostile.seen_headers = []
    with LocalServer(Hostile) as server:
        yield server.url


@pytest.fixture(scope="module")
def hostile_gateway(upstream, hostile, tmp_path_factory):
    servers = [{"label": m, "url": f"{hostile}/{m}/mcp", "timeout_secs": TIMEOUT,
                "headers": {"x-operator-key": OPERATOR_TOKEN}} for m in MODES]
    servers.append({"label": "legacy", "url": f"{hostile}/legacy/sse", "transport": "sse", "timeout_secs": TIMEOUT})
    servers.append({"label": "refused", "url": f"{hostile}/ok/sse?key={URL_KEY}", "transport": "sse", "timeout_secs": TIMEOUT})
    gw = start_gateway(upstream.origin, tmp_path_factory.mktemp("hostile-gateway"), "--set",
                       "resp2chat_max_replay_entries=0", env={"RESP2CHAT_MCP_SERVERS": json.dumps(servers)})
    yield gw
    gw.stop()


def tool(label: str, **extra) -> dict:
    return {"type": "mcp", "server_label": label, "require_approval": "never", **extra}


def turn(gw, mode: str, **extra) -> tuple[list[dict], float, bytes]:
    """A streamed turn whose model calls ``mode``'s tool: its events (checked: the stream's
    invariants, the openai SDK's models), how long it took, what the client got."""
    started = time.monotonic()
    r = post_turn(gw, {"model": "demo-model", "input": f"call: mcp__{mode}__say {{}}", "stream": True,
                       "tools": [tool(mode, **extra)]}, timeout=60)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text[:300]
    evs = parse_sse(r.content)
    check_stream(r.content, evs[0]["response"]["id"])
    check_sdk(evs)
    return evs, took, r.content


@pytest.mark.parametrize("mode,why", FAILING.items())
def test_a_server_that_misbehaves_fails_its_call_in_bounded_time(hostile_gateway, mode, why):
    """A call that hangs, drips, is answered with garbage, a stranger's id, a cut stream or body,
    or too much: its mcp_call item fails with why, within timeout_secs, and the turn goes on; the
    other call of the round, on the same session, gets its answer."""
    started = time.monotonic()
    r = post_turn(hostile_gateway, {"model": "demo-model", "stream": True, "tools": [tool(mode)],
                                    "input": f"call: mcp__{mode}__say {{}}\ncall: mcp__{mode}__small {{}}"})
    assert time.monotonic() - started < TIMEOUT + 5
    evs = parse_sse(r.content)
    check_stream(r.content, evs[0]["response"]["id"])
    check_sdk(evs)
    end = evs[-1]
    assert end["type"] == "response.completed"
    bad, small = [o for o in end["response"]["output"] if o["type"] == "mcp_call"]
    assert bad["status"] == "failed" and bad["output"] is None
    assert mode in bad["error"]["message"] and why in bad["error"]["message"], bad["error"]
    assert small["status"] == "completed" and small["output"] == "said", small["error"]
    assert "response.mcp_call.failed" in [e["type"] for e in evs]
    assert end["response"]["output"][-1]["type"] == "message"


def test_a_server_that_repeats_its_credentials_reaches_no_one_with_them(hostile_gateway, upstream):
    """The operator's and the client's headers for a server go to it only: a server that repeats
    them in its listing (a tool's description), in a result (also across what is kept of it), or
    in an answer that is not JSON (which the MCP SDK logs) has them scrubbed before the backend,
    the client or the log see them, whole or in part."""
    upstream.clear()
    _, _, garbage = turn(hostile_gateway, "echo_garbage", headers={"x-client-key": CLIENT_TOKEN})
    assert b"json_invalid" in garbage  # (what failed is said; the body is not quoted)
    _, _, straddled = turn(hostile_gateway, "straddle", headers={"x-client-key": CLIENT_TOKEN})
    assert b"output truncated" in straddled
    r = post_turn(hostile_gateway, {"model": "demo-model", "input": "call: mcp__straddle__err {}",
                                    "tools": [tool("straddle", headers={"x-client-key": CLIENT_TOKEN})]})
    assert r.json()["output"][2]["error"]["message"].startswith("MCP server straddle: MCPError: eee")
    straddled += r.content
    evs, _, raw = turn(hostile_gateway, "echo_auth", headers={"x-client-key": CLIENT_TOKEN})
    assert Hostile.seen_headers[-1]["x-client-key"] == CLIENT_TOKEN  # (the server had them)
    assert Hostile.seen_headers[-1]["x-operator-key"] == OPERATOR_TOKEN
    output = evs[-1]["response"]["output"]
    assert "[redacted]" in output[0]["tools"][0]["description"] and "[redacted]" in output[2]["output"]
    sent = json.dumps(upstream.requests())
    assert "headers:" in sent
    for secret in (OPERATOR_TOKEN, CLIENT_TOKEN):
        assert secret not in sent and secret.encode() not in raw and secret not in hostile_gateway.log()
        for piece in (secret[i:i + 12] for i in range(len(secret) - 11)):  # (nor a part of one)
            assert piece not in sent and piece.encode() not in garbage + straddled and piece not in hostile_gateway.log()


def test_a_listing_is_bounded_in_bytes(hostile_gateway):
    """A server that pages for ever, 7 MiB a page (descriptions and schemas of 512 KiB): the
    listing keeps what fits mcp.MAX_LISTING bytes (each description cut to mcp.MAX_DESCRIPTION),
    at once, and the gateway's memory does not grow with what the server sends."""
    peak = Peak(hostile_gateway.proc.pid)
    evs, took, raw = turn(hostile_gateway, "fat_pages")
    listing = evs[-1]["response"]["output"][0]
    assert listing["type"] == "mcp_list_tools" and listing["status"] == "completed" and listing["tools"]
    assert len(json.dumps(listing["tools"])) <= mcp.MAX_LISTING
    assert all(len(t["description"]) <= mcp.MAX_DESCRIPTION for t in listing["tools"])
    assert took < TIMEOUT and peak.grown < 200 << 20, (took, peak.grown >> 20)


# --- approvals, stateless (store: false, the conversation sent back each turn) --------------------


def test_a_stateless_approval_runs_its_call_once_whatever_the_client_sends_back(hostile_gateway):
    """An approval runs its call in the turn that gets it; a client that sends the conversation
    back without that turn's mcp_call (its answer kept), or with the approval twice, runs
    nothing again; a new approval in the same input still runs."""
    client = openai_client(hostile_gateway)
    ask = [tool("ok", require_approval="always")]
    first = [{"role": "user", "content": "call: mcp__ok__say {}"}]
    asked = client.responses.create(model="demo-model", input=first, tools=ask, store=False)
    listing, request = asked.output[0], asked.output[-1]
    assert request.type == "mcp_approval_request"
    approve = {"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}
    history = [*first, listing.model_dump(exclude_none=True), request.model_dump(exclude_none=True), approve]
    before = Hostile.calls["ok"]
    done = client.responses.create(model="demo-model", input=history, tools=ask, store=False)
    assert [o.type for o in done.output] == ["mcp_call", "reasoning", "message"] and Hostile.calls["ok"] == before + 1
    answer = done.output[-1].model_dump(exclude_none=True)
    for later in ([*history, answer, {"role": "user", "content": "thanks"}],  # (its mcp_call left out)
                  [*history, approve, answer, {"role": "user", "content": "thanks"}],
                  [*history, answer, approve, {"role": "user", "content": "thanks"}]):
        again = client.responses.create(model="demo-model", input=later, tools=ask, store=False)
        assert "mcp_call" not in [o.type for o in again.output] and again.output_text == "You said: thanks"
        assert Hostile.calls["ok"] == before + 1
    # a second request of the same conversation, approved: it runs, once
    asked = client.responses.create(model="demo-model", input=[*history, answer, {"role": "user", "content":
                                    "call: mcp__ok__say {}"}], tools=ask, store=False)
    second = asked.output[-1]
    more = [*history, answer, {"role": "user", "content": "call: mcp__ok__say {}"},
            *(o.model_dump(exclude_none=True) for o in asked.output),
            {"type": "mcp_approval_response", "approval_request_id": second.id, "approve": True}]
    ran = client.responses.create(model="demo-model", input=more, tools=ask, store=False)
    assert [o.approval_request_id for o in ran.output if o.type == "mcp_call"] == [second.id]
    assert Hostile.calls["ok"] == before + 2



@pytest.mark.parametrize("mode", ["redirect", "hang_init", "bad_list", "empty_pages"])
def test_a_listing_that_cannot_be_had_fails_its_item_in_bounded_time(hostile_gateway, mode):
    """A server that redirects to another origin (not followed: the gateway reaches no address
    but the configured ones), never opens its session, or refuses to list: the mcp_list_tools
    item fails with why, and the turn goes on without its tools."""
    n = len(Hostile.seen_headers)
    evs, took, _ = turn(hostile_gateway, mode)
    assert took < TIMEOUT + 5
    listing = evs[-1]["response"]["output"][0]
    assert listing["type"] == "mcp_list_tools" and listing["status"] == "failed" and listing["tools"] == []
    assert mode in listing["error"] and "response.mcp_list_tools.failed" in [e["type"] for e in evs]
    assert evs[-1]["type"] == "response.completed"
    assert all(h["host"].startswith("127.0.0.1:") for h in Hostile.seen_headers[n:])  # (never the other origin)
    if mode == "redirect":
        assert "not followed" in listing["error"]
    if mode == "empty_pages":  # (a cursor that never ends: a few pages, not timeout_secs)
        assert took < TIMEOUT and f"sent {mcp.MAX_EMPTY_PAGES} pages without a tool" in listing["error"]
    if mode == "bad_list":  # (what the server said, but not as a line of the log's own)
        assert "no listing" in listing["error"] and "resp2chat: forged" in hostile_gateway.log()
        assert not any(line.startswith("[00:00:00.000]") for line in hostile_gateway.log().splitlines())


@pytest.mark.parametrize("mode", ["bad_list", "hang_init", "ok"])
def test_a_call_of_a_tool_no_listing_offers_fails_as_an_mcp_call(hostile_gateway, mode):
    """The model calls a tool of a server whose listing failed (or, listed, a tool it does not
    list): the client never gets a function_call of a function it did not declare; the call
    fails as an mcp_call item with its error, nothing reaches the server, and the model is told
    and answers. Streamed (the events, checked) and not (the openai SDK)."""
    before = dict(Hostile.calls)
    name = "say" if mode != "ok" else "nope"
    body = {"model": "demo-model", "input": f"call: mcp__{mode}__{name} {{\"x\": 1}}", "tools": [tool(mode)]}
    r = post_turn(hostile_gateway, {**body, "stream": True}, timeout=60)
    evs = parse_sse(r.content)
    check_stream(r.content, evs[0]["response"]["id"])
    check_sdk(evs)
    assert "response.mcp_call.failed" in [e["type"] for e in evs]
    done = openai_client(hostile_gateway).responses.create(**body)
    for output in (evs[-1]["response"]["output"], [o.model_dump() for o in done.output]):
        assert [o["type"] for o in output] == ["mcp_list_tools", "reasoning", "mcp_call", "reasoning", "message"]
        listing, call = output[0], output[2]
        assert (listing["status"] == "failed") == (mode != "ok")
        assert call["status"] == "failed" and call["server_label"] == mode and call["name"] == name
        assert call["arguments"] == '{"x": 1}' and call["output"] is None
        assert f"MCP server {mode}" in call["error"]["message"] and repr(name) in call["error"]["message"]
        assert output[-1]["content"][0]["text"].startswith("The tool returned: Error: the MCP tool call failed: ")
    assert Hostile.calls == before  # (nothing ran)


def test_a_function_the_client_declared_reaches_it_whatever_its_name(hostile_gateway):
    """A client's own function named as a server's tool would be (mcp__<label>__<tool>) is the
    client's: its call reaches the client as a function_call, the listing failed or not."""
    done = openai_client(hostile_gateway).responses.create(
        model="demo-model", input='call: mcp__bad_list__say {"x": 1}',
        tools=[tool("bad_list"), {"type": "function", "name": "mcp__bad_list__say",
                                  "parameters": {"type": "object", "properties": {}}}])
    assert [o.type for o in done.output] == ["mcp_list_tools", "reasoning", "function_call"]
    assert done.output[-1].name == "mcp__bad_list__say" and done.output[-1].arguments == '{"x": 1}'


_LONG = "s3cret-" + "v" * 8186  # (8193 characters: one more than mcp.MAX_HEADER_VALUE)


@pytest.mark.parametrize("field,value", [("headers", {"x-k": "h\u00e9llo"}), ("headers", {"x-k": "a\x01b"}),
                                         ("headers", {"x-k": "a\x7fb"}), ("authorization", "t\u00e9st-token"),
                                         ("headers", {"x-k": _LONG}), ("authorization", _LONG)])
def test_a_header_no_http_request_can_carry_is_a_400(hostile_gateway, field, value):
    """A request's header value for its server that HTTP cannot carry (not printable ASCII), or
    one longer than 8 KiB (``mcp.MAX_HEADER_VALUE``: a secret the gateway scrubs, whose pattern
    costs event-loop time as it grows; before, any length went), is the client's error, said
    before anything runs, naming the header, never its value; never a failed listing."""
    n = len(Hostile.seen_headers)
    r = post_turn(hostile_gateway, {"model": "demo-model", "input": "hi", "tools": [tool("ok", **{field: value})]})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "invalid_value" and error["param"].startswith(f"tools[0].{field}")
    assert "h\u00e9llo" not in r.text and "t\u00e9st" not in r.text and "s3cret" not in r.text  # (a secret: never shown)
    assert "'x-k'" in error["message"] if field == "headers" else error["message"].startswith("tools[0].authorization")
    if value in ({"x-k": _LONG}, _LONG):
        assert "8193 characters, more than the 8192" in error["message"], error["message"]
    assert len(Hostile.seen_headers) == n



def test_the_older_sse_transport_bounds_each_answer_not_the_session(hostile_gateway):
    """On the older HTTP+SSE transport every answer comes on one stream: a turn whose calls'
    answers add up to more than 8 MiB (12 of 900 KiB) gets each of them."""
    before = Hostile.calls["legacy"]
    r = post_turn(hostile_gateway, {"model": "demo-model", "stream": True, "tools": [tool("legacy")],
                                    "input": "\n".join(["call: mcp__legacy__say {}"] * 12)})
    evs = parse_sse(r.content)
    calls = [o for o in evs[-1]["response"]["output"] if o["type"] == "mcp_call"]
    assert len(calls) == 12 and Hostile.calls["legacy"] == before + 12
    assert all(c["status"] == "completed" for c in calls), [c["error"] for c in calls if c["error"]][:1]


def test_the_websocket_fails_a_call_and_keeps_credentials_the_same_way(hostile_gateway, upstream):
    """The same over the Responses WebSocket: a hanging call fails within timeout_secs, the turn
    completes, and the next turn on the socket runs; a server that repeats its credentials has
    them scrubbed."""
    from wsclient import WSClient

    upstream.clear()
    ws = WSClient(hostile_gateway.base_url)
    try:
        started = time.monotonic()
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": "call: mcp__hang__say {}",
                          "tools": [tool("hang")]})
        assert time.monotonic() - started < TIMEOUT + 5
        check_sdk(events)
        (call,) = [o for o in events[-1]["response"]["output"] if o["type"] == "mcp_call"]
        assert events[-1]["type"] == "response.completed" and call["status"] == "failed"
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": "call: mcp__echo_auth__say {}",
                          "tools": [tool("echo_auth", headers={"x-client-key": CLIENT_TOKEN})]})
        check_sdk(events)
        assert events[-1]["type"] == "response.completed"
        raw = json.dumps(events) + json.dumps(upstream.requests())
        assert "[redacted]" in raw and CLIENT_TOKEN not in raw and OPERATOR_TOKEN not in raw
    finally:
        ws.close()



def test_a_failure_never_shows_the_servers_url(hostile_gateway):
    """A server that refuses the older transport's stream (405): the listing fails naming the
    server by its label, never by its configured URL (a key in it, where the server is)."""
    evs, _, raw = turn(hostile_gateway, "refused")
    listing = evs[-1]["response"]["output"][0]
    assert listing["status"] == "failed" and "405" in listing["error"] and "refused" in listing["error"]
    assert URL_KEY.encode() not in raw and "/ok/sse" not in listing["error"] and URL_KEY not in hostile_gateway.log()






@pytest.mark.parametrize("tools", [[], [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                                   [tool("hang")]])
def test_an_approval_whose_server_has_no_tool_in_the_request_is_a_400(hostile_gateway, upstream, tools):
    """An approved call can run only on a server the request has an mcp tool for (a request's
    tools are its own, not the conversation's): without it, a 400 that says so, never an approval
    dropped in silence (nothing ran, the model not told) nor a call that fails."""
    upstream.clear()
    before = Hostile.calls["ok"]
    items = [{"role": "user", "content": "call: mcp__ok__say {}"},
             {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "ok", "name": "say", "arguments": "{}"},
             {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}]
    r = post_turn(hostile_gateway, {"model": "demo-model", "input": items, "tools": tools})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert "mcpr_1" in error["message"] and "'ok'" in error["message"] and error["param"] == "tools"
    assert upstream.requests() == [] and Hostile.calls["ok"] == before
    # denied, it needs no server: the model is told
    items[-1] = {**items[-1], "approve": False}
    r = post_turn(hostile_gateway, {"model": "demo-model", "input": items, "tools": tools})
    assert r.status_code == 200 and "denied" in upstream.requests()[-1]["messages"][-1]["content"]



def test_a_server_to_client_stream_is_never_asked_for(hostile_gateway):
    """The gateway takes no request of a server's and reads none of its notifications: a
    streamable HTTP session never asks for the server-to-client stream (a GET), so a server that
    ends it at once with ``retry: 0`` is not asked again and again for the whole turn (the MCP
    SDK reconnected as fast as it could, ~15 times a second)."""
    before = sum(Hostile.gets.values())
    r = post_turn(hostile_gateway, {"model": "demo-model", "tools": [tool("retry0")],
                                    "input": "call: mcp__retry0__small {}\ncall: mcp__retry0__small {}"})
    output = r.json()["output"]
    assert [o["output"] for o in output if o["type"] == "mcp_call"] == ["said", "said"]
    assert sum(Hostile.gets.values()) == before, dict(Hostile.gets)


def test_a_call_whose_answer_ends_again_and_again_is_resumed_at_most_once_a_second(hostile_gateway):
    """A server that ends a call's SSE answer with an event id and ``retry: 0``, and each
    resumption of it (a GET with Last-Event-ID) the same way: the call fails within timeout_secs,
    having asked the server again at most once a second (the MCP SDK asked as fast as it could)."""
    before = Hostile.gets["resume0"]
    evs, took, _ = turn(hostile_gateway, "resume0")
    (call,) = [o for o in evs[-1]["response"]["output"] if o["type"] == "mcp_call"]
    assert call["status"] == "failed" and "did not answer within" in call["error"]["message"]
    assert Hostile.gets["resume0"] - before <= TIMEOUT + 1, Hostile.gets["resume0"] - before


def test_a_listing_whose_pages_never_end_keeps_what_it_listed(hostile_gateway):
    """A server whose first page lists tools, and whose pages after it list none and never end:
    the listing stops after a few empty pages, at once, and offers what it listed."""
    evs, took, _ = turn(hostile_gateway, "empty_tail")
    output = evs[-1]["response"]["output"]
    assert output[0]["status"] == "completed" and [t["name"] for t in output[0]["tools"]] == ["say", "small"]
    assert [o["output"] for o in output if o["type"] == "mcp_call"] == ["said"] and took < TIMEOUT


@pytest.mark.parametrize("fs,fs2", [("ok", "echo_auth"), ("bad_list", "ok"), ("ok", "bad_list")])
def test_two_servers_one_label_a_prefix_of_the_other(hostile_gateway, hostile, fs, fs2):
    """A request's servers labelled ``fs`` and ``fs2`` (each by its url): each call reaches the
    server of its own label, also when the other's listing failed (a call of a tool no listing
    offers fails on the server its name reads as, the longest label); approvals name theirs."""
    before = dict(Hostile.calls)
    tools = [tool("fs", server_url=f"{hostile}/{fs}/mcp"), tool("fs2", server_url=f"{hostile}/{fs2}/mcp")]
    done = openai_client(hostile_gateway).responses.create(
        model="demo-model", tools=tools, input="call: mcp__fs__say {}\ncall: mcp__fs2__say {}")
    listings = {o.server_label: o for o in done.output if o.type == "mcp_list_tools"}
    assert {label: o.error is None for label, o in listings.items()} == {"fs": fs != "bad_list", "fs2": fs2 != "bad_list"}
    calls = [o for o in done.output if o.type == "mcp_call"]
    assert [(c.server_label, c.name) for c in calls] == [("fs", "say"), ("fs2", "say")]
    for call, mode in zip(calls, (fs, fs2)):
        if mode == "bad_list":  # (fails on its own server: nothing ran)
            assert call.output is None and call.error.message.startswith(f"MCP server {call.server_label}: no tool 'say'")
        else:
            assert call.error is None and call.output.startswith("said" if mode == "ok" else "headers:")
    assert Hostile.calls - Counter(before) == Counter(m for m in (fs, fs2) if m != "bad_list")
    # approvals: each names its own server, and runs there
    asked = openai_client(hostile_gateway).responses.create(
        model="demo-model", tools=[{**t, "require_approval": "always"} for t in tools],
        input="call: mcp__fs2__say {}\ncall: mcp__fs__say {}")
    requests_ = [o for o in asked.output if o.type == "mcp_approval_request"]
    assert [(r.server_label, r.name) for r in requests_] == [
        (label, "say") for label, mode in (("fs2", fs2), ("fs", fs)) if mode != "bad_list"]


def test_a_call_the_server_refuses_with_a_400_keeps_its_session(hostile_gateway):
    """A server that answers a call HTTP 400 with a JSON-RPC error naming it (it read the call and
    refused it): the call fails with what the server said, once, and the session goes on (the
    round's other call runs on it: one session). Only a 400 or 404 that answers no request is a
    session the server no longer knows."""
    calls, inits = Hostile.calls["refuse400"], Hostile.inits["refuse400"]
    r = post_turn(hostile_gateway, {"model": "demo-model", "tools": [tool("refuse400")],
                                    "input": "call: mcp__refuse400__say {}\ncall: mcp__refuse400__small {}"})
    bad, small = [o for o in r.json()["output"] if o["type"] == "mcp_call"]
    assert bad["status"] == "failed" and "refused: bad say" in bad["error"]["message"] and small["output"] == "said"
    assert Hostile.calls["refuse400"] - calls == 2 and Hostile.inits["refuse400"] - inits == 1


def test_a_call_that_ran_is_not_run_again_when_another_of_its_round_lost_the_session(hostile_gateway):
    """Calls of one round on one session: a proxy answers one HTTP 400, no JSON-RPC (the gateway
    takes it for a session the server no longer knows: that call ran nothing, and runs once more
    on a new session), while the server runs the others: each runs once, never again on the new
    session (a tool with side effects ran twice), the one answered ends with its output (its
    session stays open while it runs), the one whose answer is cut fails."""
    Hostile.runs.clear()
    inits = Hostile.inits["proxy400"]
    r = post_turn(hostile_gateway, {"model": "demo-model", "tools": [tool("proxy400")], "input":
                                    "call: mcp__proxy400__say {}\ncall: mcp__proxy400__small {}\n"
                                    "call: mcp__proxy400__cut {}"})
    assert r.status_code == 200, r.text[:300]
    output = r.json()["output"]
    bad, small, cut = [o for o in output if o["type"] == "mcp_call"]
    assert Hostile.runs["proxy400", "small"] == 1 and Hostile.runs["proxy400", "cut"] == 1, dict(Hostile.runs)
    assert Hostile.runs["proxy400", "say"] == 2  # (it ran nothing, the gateway was told: once more, new session)
    assert Hostile.inits["proxy400"] - inits == 2
    assert bad["status"] == "failed" and "proxy400" in bad["error"]["message"], bad
    assert small["status"] == "completed" and small["output"] == "said", small["error"]
    assert cut["status"] == "failed" and "ended without a response" in cut["error"]["message"], cut["error"]
    assert output[-1]["type"] == "message"


def test_a_call_that_ran_is_not_run_again_when_another_of_its_round_could_not_connect(upstream, tmp_path):
    """Two calls of one round on one session, its one kept-alive connection: the server runs the
    call that has it, and refuses the other's new connection (it takes none any more): that one
    fails (it ran nothing: once more on a new session, which cannot connect either), and the
    one that ran runs once and ends with its output."""
    Hostile.runs.clear()
    with LocalServer(Hostile) as server:
        servers = [{"label": "one_conn", "url": f"{server.url}/one_conn/mcp", "timeout_secs": TIMEOUT}]
        gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                           env={"RESP2CHAT_MCP_SERVERS": json.dumps(servers)})
        try:
            r = post_turn(gw, {"model": "demo-model", "tools": [tool("one_conn")],
                               "input": "call: mcp__one_conn__say {}\ncall: mcp__one_conn__say {}"})
        finally:
            gw.stop()
    assert r.status_code == 200, r.text[:300]
    output = r.json()["output"]
    calls = [o for o in output if o["type"] == "mcp_call"]
    assert Hostile.runs["one_conn", "say"] == 1, dict(Hostile.runs)
    assert sorted(c["status"] for c in calls) == ["completed", "failed"], calls
    ran, refused = sorted(calls, key=lambda c: c["status"])
    assert ran["output"] == "said" and "ConnectError" in refused["error"]["message"], refused["error"]
    assert output[-1]["type"] == "message"


@pytest.mark.parametrize("mode,why", [("paged404", "Session not found"), ("paged_err", "the listing broke"),
                                      ("paged_hang", "did not answer within")])
def test_a_call_that_ran_keeps_its_result_whatever_a_listing_after_it_would_meet(hostile_gateway, mode, why):
    """A turn that lists nothing (its listing is in the conversation) calls a tool on its server's
    second page: the gateway's session lists the first page only, so the MCP SDK's own check of
    the result (``validate_tool_result``) would list the tools again after the call. The server
    answered the call, and then forgets the session (it restarted: a 404), fails its listings or
    never answers them: the call ran, so its item has its output (that listing ``why`` had it fail,
    the model told it failed, though it ran), at once, and it never runs again on a new session."""
    client = openai_client(hostile_gateway)
    listed = client.responses.create(model="demo-model", input="hi", tools=[tool(mode)], store=False)
    listing = listed.output[0]
    assert listing.type == "mcp_list_tools" and [t.name for t in listing.tools] == ["small", "say"], listing
    Hostile.runs.clear()
    inits = Hostile.inits[mode]
    started = time.monotonic()
    done = client.responses.create(model="demo-model", tools=[tool(mode)], store=False, input=[
        listing.model_dump(exclude_none=True), {"role": "user", "content": f"call: mcp__{mode}__say {{}}"}])
    assert time.monotonic() - started < TIMEOUT
    assert [o.type for o in done.output] == ["reasoning", "mcp_call", "reasoning", "message"], done.output
    assert Hostile.runs[mode, "say"] == 1, dict(Hostile.runs)
    assert Hostile.inits[mode] - inits == 1
    call = done.output[1]
    assert call.error is None and call.output == "said", call
    assert why not in done.output[-1].content[0].text and "said" in done.output[-1].content[0].text


def test_a_call_that_ran_keeps_its_result_when_its_server_cannot_list(hostile_gateway):
    """A stateless turn whose conversation holds a listing of a server that now fails every
    ``tools/list``: the call of its tool runs, and its item has its output (the MCP SDK listed
    the tools after the call to check its result, and that listing's error had the call fail)."""
    before = Hostile.calls["bad_list"]
    listing = {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "bad_list",
               "tools": [{"name": "say", "input_schema": {"type": "object", "properties": {}}}]}
    done = openai_client(hostile_gateway).responses.create(
        model="demo-model", tools=[tool("bad_list")], store=False,
        input=[listing, {"role": "user", "content": "call: mcp__bad_list__say {}"}])
    assert [o.type for o in done.output] == ["reasoning", "mcp_call", "reasoning", "message"], done.output
    call = done.output[1]
    assert call.error is None and call.output == "said", call
    assert Hostile.calls["bad_list"] == before + 1


def test_a_result_that_breaks_its_tools_output_schema_fails_its_call(hostile_gateway):
    """A tool that declares an output schema and answers structured content that breaks it: the
    call fails with what is wrong said (the MCP SDK's check, the spec's SHOULD: the server broke
    its own contract), and that the server ran it (the model is not to take it for a call that did
    not run; also when the schema is not one); a result that keeps it is the call's output."""
    r = post_turn(hostile_gateway, {"model": "demo-model", "tools": [tool("schema")],
                                    "input": "call: mcp__schema__say {}\ncall: mcp__schema__good {}\n"
                                             "call: mcp__schema__unschema {}"})
    assert r.status_code == 200, r.text[:300]
    bad, good, unschema = [o for o in r.json()["output"] if o["type"] == "mcp_call"]
    assert bad["status"] == "failed" and bad["output"] is None, bad
    message = bad["error"]["message"]
    assert message.startswith("MCP server schema: OutputSchemaError: the server ran the call, but its result "
                              "breaks the tool's output schema: tool say: 'seven' is not of type 'integer' (at $.n)")
    assert good["status"] == "completed" and json.loads(good["output"]) == {"n": 7}, good
    assert unschema["status"] == "failed" and unschema["error"]["message"].startswith(
        "MCP server schema: OutputSchemaError: the server ran the call, but the tool's output schema is not a JSON "
        "Schema: tool unschema: 5 is not valid under any of the given schemas (at $.properties.n.type)"), unschema["error"]


def test_a_result_that_breaks_its_output_schema_quoting_a_secret_reaches_no_one_with_it(hostile_gateway, upstream):
    """A result that breaks its tool's output schema with a header the server got in it (a value
    with spaces, which the schema error's pretty-printed instance split across lines; with a
    backslash and a quote, which its one line quotes as Python does: ``channel.scrub``): the call
    fails saying what is wrong, and the secret, whole or in part, reaches neither the client, the
    backend nor the log."""
    upstream.clear()
    secret = "client-key with-sp\\aces '5e1f0a"
    r = post_turn(hostile_gateway, {"model": "demo-model", "input": "call: mcp__schema__echo {}",
                                    "tools": [tool("schema", headers={"x-client-key": secret})]})
    assert r.status_code == 200, r.text[:300]
    (call,) = [o for o in r.json()["output"] if o["type"] == "mcp_call"]
    assert call["status"] == "failed" and "is not of type 'integer'" in call["error"]["message"], call
    assert "[redacted]" in call["error"]["message"] and "the server ran the call" in call["error"]["message"], call
    sent = json.dumps(upstream.requests())
    for piece in (secret[i:i + 8] for i in range(len(secret) - 7)):
        assert piece not in r.text and piece not in sent and piece not in hostile_gateway.log(), piece


# --- a real server of the 2026-07-28 protocol (the MCP SDK's own, tests/mcp_script_server.py) -----


ROUTE = {"name": "route", "inputSchema": {"type": "object", "properties": {
    "region": {"type": "string", "x-mcp-header": "Region"}}}}  # (its region goes in an Mcp-Param-Region header too)


@pytest.fixture(scope="module")
def paged(upstream, tmp_path_factory):
    """The SDK's server, one tool a page: ``small``, then ``route`` (an argument the server wants in
    a header, as its listing says), each request it gets logged; a gateway it is ``paged`` of."""
    folder = tmp_path_factory.mktemp("mcp-paged")
    script, log = folder / "script.json", folder / "requests.log"
    script.write_text(json.dumps({"page": 1, "log": str(log), "tools": [{**ROUTE, "name": "small"}, ROUTE],
                                  "results": {"route": {"content": [{"type": "text", "text": "routed"}]}}}))
    for url in serve_script(script):
        servers = [{"label": "paged", "url": url, "timeout_secs": TIMEOUT}]
        gw = start_gateway(upstream.origin, folder, "--set", "resp2chat_max_replay_entries=0",
                           env={"RESP2CHAT_MCP_SERVERS": json.dumps(servers)})
        try:
            yield gw, log
        finally:
            gw.stop()


def test_a_call_the_server_refuses_for_a_listing_it_lacks_runs_once_more_after_one(paged):
    """A stateless turn (its listing in the conversation) calls a tool on the server's second
    page: the turn's session lists the first page only, so the call goes without the header its
    tool's listing asks for, and the server refuses it (``HEADER_MISMATCH``: it ran nothing). The
    MCP SDK lists the tools again, finds it, and sends the call once more, with it: the call runs
    once, and its item has its output."""
    gw, log = paged
    client = openai_client(gw)
    listing = client.responses.create(model="demo-model", input="hi", tools=[tool("paged")], store=False).output[0]
    assert listing.type == "mcp_list_tools" and [t.name for t in listing.tools] == ["small", "route"], listing
    log.write_text("")
    done = client.responses.create(model="demo-model", tools=[tool("paged")], store=False, input=[
        listing.model_dump(exclude_none=True), {"role": "user", "content": 'call: mcp__paged__route {"region": "eu"}'}])
    assert [o.type for o in done.output] == ["reasoning", "mcp_call", "reasoning", "message"], done.output
    call = done.output[1]
    assert call.error is None and call.output == "routed", call
    asked = [(r["method"], r["name"] or r["cursor"], r["status"]) for r in map(json.loads, log.read_text().splitlines())
             if r["method"].startswith("tools/")]
    assert asked == [("tools/list", None, 200), ("tools/call", "route", 400),  # (the session's listing, a page)
                     ("tools/list", None, 200), ("tools/list", "1", 200),  # (the SDK's, until it finds the tool)
                     ("tools/call", "route", 200)], asked
