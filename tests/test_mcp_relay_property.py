"""The gateway's MCP client (resp2chat_io/relay/mcp.py) against a real MCP server (the official
SDK's, ``mcp_script_server.py``) that serves random tool lists and results: whatever a server
lists and answers, a listing is tools (or why it failed), their functions are valid, unique chat
names that map back, and a call is an output within ``max_output_kb`` (and the note of what was
cut) or an error the ``mcp_call`` item holds, never an exception; and against a server that
misbehaves (``mcp_hostile.py``), whatever one answer does fails its call alone, never the session.
Derandomized, bounded."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import NAME_RE, free_port, serve_script
from resp2chat_core import mcp
from resp2chat_io.relay import mcp as relay

LIMIT_KB = 1


@pytest.fixture(scope="module")
def script_server(tmp_path_factory):
    """The scripted server on a free port: (its server binding, the script file it serves)."""
    script = tmp_path_factory.mktemp("mcp-script") / "script.json"
    script.write_text(json.dumps({"tools": [], "results": {}}))
    for url in serve_script(script):
        (spec,) = mcp.parse_servers([{"label": "sc", "url": url, "max_output_kb": LIMIT_KB, "timeout_secs": 10}])
        yield mcp.Server("sc", spec, approval=mcp.NEVER), script


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
NAMES = st.one_of(st.sampled_from(["echo", "a.b", "a_b", "a b", "émoji😀", "x" * 70, "x" * 64, "echo_2", "-", "/"]),
                  _TEXT.filter(bool))
BLOCKS = st.lists(st.one_of(
    st.builds(lambda t, n: {"type": "text", "text": t * n}, _TEXT, st.integers(1, 80)),
    st.just({"type": "image", "data": "aGk=", "mimeType": "image/png"}),
    st.just({"type": "audio", "data": "aGk=", "mimeType": "audio/wav"}),
    st.builds(lambda t: {"type": "resource", "resource": {"uri": "file:///x", "text": t}}, _TEXT),
    st.just({"type": "resource", "resource": {"uri": "file:///b", "blob": "aGk="}}),
    st.just({"type": "resource_link", "uri": "file:///l", "name": "l"})), max_size=4)
RESULTS = st.fixed_dictionaries({"content": BLOCKS}, optional={
    "isError": st.booleans(), "structuredContent": st.dictionaries(_TEXT, _TEXT, max_size=2)})
TOOLS = st.lists(st.tuples(NAMES, st.none() | st.booleans(), RESULTS), max_size=5)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tools=TOOLS)
@example(tools=[("a.b", None, {"content": []}), ("a_b", True, {"content": [], "isError": True}),
                ("a.b", False, {"content": [{"type": "text", "text": "é" * 2000}]})])  # (a name listed twice)
def test_any_listing_and_result_of_a_real_server(script_server, tools):
    server, script = script_server
    listed = [{"name": name, "inputSchema": {"type": "object"},
               **({"annotations": {"readOnlyHint": ro}} if ro is not None else {})} for name, ro, _ in tools]
    script.write_text(json.dumps({"tools": listed, "results": {name: r for name, _, r in tools}}))

    async def turn():
        sessions = relay.Sessions()
        try:
            got, why = await relay.list_tools(server, sessions)
            assert why is None, why
            made = mcp.functions((server,), {"sc": got}, {"exec"})
            calls = [await relay.call_tool(server, target.name, "{}", sessions) for _, _, target in made]
            return got, made, calls
        finally:
            sessions.close()

    got, made, calls = asyncio.run(turn())
    assert [t["name"] for t in got] == [name for name, _, _ in tools]
    names = [cname for cname, _, _ in made]
    assert all(NAME_RE.match(n) for n in names) and len(set(names)) == len(names) and "exec" not in names
    assert sorted(target.name for _, _, target in made) == sorted({name for name, _, _ in tools})
    results = {name: r for name, _, r in tools}  # (the last of a name: the script's)
    for (_, _, target), (output, error) in zip(made, calls):
        text = output if error is None else error["content"][0]["text"]
        assert (error is None) == (output is not None)
        assert len(text.split("\n[output truncated: ")[0].encode()) <= LIMIT_KB << 10
        if error is not None:
            assert error["type"] == "mcp_tool_execution_error" and results[target.name].get("isError")


# --- a session survives whatever one answer on it does ------------------------------------------

BEHAVIOURS = ("small", "garbage", "cut", "cut_json", "huge", "wrong_id")  # (tests/mcp_hostile.py's modes)


@pytest.fixture(scope="module")
def hostile_server():
    from helpers import LocalServer
    from mcp_hostile import Hostile

    with LocalServer(Hostile) as http:
        (spec,) = mcp.parse_servers([{"label": "mixed", "url": f"{http.url}/mixed/mcp", "timeout_secs": 2}])
        yield mcp.Server("mixed", spec, approval=mcp.NEVER)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(round_=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=5))
@example(round_=["huge", "small", "cut_json", "garbage"])
def test_calls_of_one_session_fail_alone(hostile_server, round_):
    """Calls run at once on one session (as a round's do), each answered its own way (well, with
    garbage, cut short, too large, under another id): each answered well completes, each other
    fails with an error its item holds, and a call after them on the same session completes."""

    async def turn():
        sessions = relay.Sessions()
        try:
            calls = await asyncio.gather(*(relay.call_tool(hostile_server, b, "{}", sessions) for b in round_))
            return calls, await relay.call_tool(hostile_server, "small", "{}", sessions)
        finally:
            sessions.close()

    calls, after = asyncio.run(turn())
    for behaviour, (output, error) in zip(round_, calls):
        if behaviour == "small":
            assert (output, error) == ("said", None)
        else:
            assert output is None and error["type"] == "mcp_protocol_error" and error["message"], (behaviour, error)
    assert after == ("said", None)


@pytest.mark.parametrize("method,session", [("server/discover", None), ("initialize", None), ("tools/call", "s1"),
                                            ("tools/list", "s1")])
def test_a_request_that_cannot_connect_ends_a_session_only_once_it_is_open(method, session):
    """A request that cannot connect (nothing listens: refused): one that opens the session
    (``server/discover``, ``initialize``) leaves it whole (it fails to open, or, a discover answered
    with an error, the SDK falls back to initialize: a session that opens then is not dead, and the
    next step does not open another); one of an open session (its mcp-session-id) ends it, its id
    one of the requests that did not run. Each but initialize is answered with a JSON-RPC error
    naming it (the SDK fails it alone)."""
    import httpx2

    port = free_port()

    async def post():
        health = relay.Health()
        transport = relay._Bounded(health, streamable=True)
        headers = {"content-type": "application/json", **({"mcp-session-id": session} if session else {})}
        request = httpx2.Request("POST", f"http://127.0.0.1:{port}/mcp", headers=headers,
                                 json={"jsonrpc": "2.0", "id": 7, "method": method, "params": {}})
        try:
            return health, await transport.handle_async_request(request)
        except httpx2.ConnectError:
            return health, None
        finally:
            await transport.aclose()

    health, response = asyncio.run(post())
    assert health.dead == (session is not None) and health.unrun == ({7} if session else set())
    if method == "initialize":
        assert response is None
    else:
        assert response.status_code == 503 and json.loads(response.read())["id"] == 7
