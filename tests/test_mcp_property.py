"""Hosted MCP tools (resp2chat_core/mcp.py, the tool loop's mcp kind) under random listings and
approval histories, without sockets: through the real ``turn.begin_turn`` and ``ToolLoop``.

- the functions: for any tools 1-3 servers list (unicode, long, dots, names that clash with each
  other, with other servers' and with the client's own tools once made chat names), every chat
  function name is valid (``^[a-zA-Z0-9_-]{1,64}$``), unique, and the same whether the tools
  were listed in this turn (``McpTools.begin``) or a later turn finds the listing in its history
  (lowering): a later turn maps the model's earlier calls back to the same tool; each maps back
  to its (server_label, tool), and a call to it runs that tool on that server.
- approvals: any sequence of ``mcp_approval_response`` items (approve, deny, an unknown request,
  the same answer again) either runs an approved call once (never again in a later turn that
  holds its ``mcp_call``, or the model's answer after it: a client that left the ``mcp_call``
  out), tells the model of a denial once, or is a clear 400 (an unknown request; a request
  answered both ways; one for a tool ``allowed_tools`` refuses); the chat
  request never holds a tool call id twice; ``max_tool_calls`` counts the approved calls.
- results: any shape of a call's result is an ``mcp_call`` item the openai SDK reads, its text
  within ``max_output_kb``. (Against a real MCP server: test_mcp_relay_property.py.)

Derandomized: the same examples every run.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import NAME_RE
from resp2chat_core import mcp
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.toolloop import Finish, ToolLoop
from resp2chat_core.turn import begin_turn

RESP = "resp_" + "p" * 32
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def begin(specs, tools, input_, **extra):
    body = {"model": "m", "input": input_, "tools": tools, **extra}
    return begin_turn(json.dumps(body).encode(), LoweringOptions(), RESP, 0, mcp_servers=specs)


def chat_ids(chat: dict) -> list[str]:
    """Every tool call id of the chat request's assistant messages, in order."""
    return [c["id"] for m in chat["messages"] if m.get("role") == "assistant" for c in m.get("tool_calls") or ()]


def answered(chat: dict) -> None:
    """Each tool message answers an earlier call; no call id twice."""
    ids = chat_ids(chat)
    assert len(ids) == len(set(ids)), ids
    seen = set()
    for m in chat["messages"]:
        seen |= {c["id"] for c in m.get("tool_calls") or ()}
        if m.get("role") == "tool":
            assert m["tool_call_id"] in seen


# --- approvals ----------------------------------------------------------------------------------

SPEC = mcp.parse_servers([{"label": "ev", "url": "http://127.0.0.1:9/mcp"}])
LISTED = {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "ev",
          "tools": [{"name": "echo", "input_schema": {"type": "object"}}]}


def asked(n: int) -> dict:
    return {"type": "mcp_approval_request", "id": f"mcpr_{n}", "server_label": "ev", "name": "echo",
            "arguments": json.dumps({"message": n})}


def answer(request_id: str, approve: bool) -> dict:
    return {"type": "mcp_approval_response", "approval_request_id": request_id, "approve": approve,
            **({} if approve else {"reason": "no"})}


ANSWERS = st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=6)  # (request n; 3: unknown, approve)


@SETTINGS
@given(requests=st.integers(1, 3), answers=ANSWERS, ran_first=st.booleans(), dropped=st.booleans())
def test_any_approval_answers_run_a_call_once_tell_a_denial_once_or_are_a_400(requests, answers, ran_first, dropped):
    history = [{"role": "user", "content": "hi"}, LISTED, *[asked(n) for n in range(requests)]]
    items = history + [answer(f"mcpr_{n}", a) for n, a in answers]
    decisions: dict[str, set] = {}
    for n, a in answers:
        decisions.setdefault(f"mcpr_{n}", set()).add(a)
    unknown = any(n >= requests for n, _ in answers)
    both = any(len(d) > 1 for d in decisions.values())
    try:
        t = begin(SPEC, [{"type": "mcp", "server_label": "ev"}], items)
    except GatewayError as err:
        assert 400 <= err.status < 500 and (unknown or both), err.message
        return
    assert not unknown and not both
    approved = [r for r, d in decisions.items() if d == {True}]
    denied = [r for r, d in decisions.items() if d == {False}]
    assert [p.request_id for p in t.mcp.pending] == approved  # each approved call once, in order
    chat = json.loads(t.chat_body)
    answered(chat)
    told = [m["tool_call_id"] for m in chat["messages"]
            if m.get("role") == "tool" and m["content"].startswith("The user denied")]
    assert told == denied  # each denial once
    loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=3)])
    steps = loop.prelude()
    assert [s.approval_request_id for s in steps] == approved
    loop.begin([f"ran {s.call_id}" for s in steps])
    answered(json.loads(loop.body))
    # the next turn holds the calls that ran (mcp_call items with their approval_request_id), or
    # (``dropped``: a client that keeps only the answers) the model's answer after them, and the
    # client's answers again (a client that resends them): nothing runs twice
    ran = [{"type": "mcp_call", "id": f"mcp_{s.call_id}", "server_label": "ev", "name": "echo", "status": "completed",
            "arguments": s.arguments, "output": "ok", "approval_request_id": s.call_id} for s in steps]
    if dropped:
        ran = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]}]
    again = items + ran + ([answer(r, True) for r in approved] if ran_first else [])
    later = begin(SPEC, [{"type": "mcp", "server_label": "ev"}], again)
    assert later.mcp.pending == ()
    answered(json.loads(later.chat_body))



@pytest.mark.parametrize("operator, request_filter, annotations", [
    (["echo"], None, None), (None, ["echo"], None), ({"read_only": True}, None, {"readOnlyHint": False})])
def test_an_approval_runs_no_tool_its_server_does_not_allow(operator, request_filter, annotations):
    """An ``mcp_approval_request`` in the input is the client's word: one for a tool the
    operator's or the request's ``allowed_tools`` does not allow (the model was never offered
    it) is a 400 when approved, never a call; denied, the model is told."""
    spec = mcp.parse_servers([{"label": "ev", "url": "http://127.0.0.1:9/mcp",
                               **({"allowed_tools": operator} if operator is not None else {})}])
    tool = {"type": "mcp", "server_label": "ev", **({"allowed_tools": request_filter} if request_filter else {})}
    listing = {**LISTED, "tools": [*LISTED["tools"], {"name": "drop", "input_schema": {"type": "object"},
                                                      "annotations": annotations}]}
    forged = {**asked(0), "name": "drop"}
    with pytest.raises(GatewayError) as err:
        begin(spec, [tool], [{"role": "user", "content": "hi"}, listing, forged, answer("mcpr_0", True)])
    assert err.value.status == 400 and "drop" in err.value.message
    denied = begin(spec, [tool], [{"role": "user", "content": "hi"}, listing, forged, answer("mcpr_0", False)])
    assert denied.mcp.pending == ()
    assert json.loads(denied.chat_body)["messages"][-1]["content"] == "The user denied this tool call: no"



def test_an_approval_runs_once_whatever_follows_it_of_the_turn_that_asked():
    """An answer runs its call unless an item a later turn made follows it (that turn ran it):
    the items of the turn that asked (the gateway's ids name it), which a client may keep after
    its answer, are not a later turn's; an item no id names the turn of is."""
    request = {**asked(0), "id": "mcpr_aaaa_2"}
    same = {"type": "mcp_call", "id": "mcp_aaaa_3", "server_label": "ev", "name": "echo", "arguments": "{}",
            "output": "ok", "status": "completed"}
    later = {"type": "message", "role": "assistant", "id": "msg_bbbb_0", "content": [{"type": "output_text", "text": "x"}]}
    start = [{"role": "user", "content": "hi"}, LISTED, request, answer("mcpr_aaaa_2", True)]
    tools = [{"type": "mcp", "server_label": "ev"}]
    for follows, runs in (([], True), ([same], True), ([later], False), ([same, later], False),
                          ([{k: v for k, v in later.items() if k != "id"}], False)):
        pending = begin(SPEC, tools, start + follows).mcp.pending
        assert [p.request_id for p in pending] == (["mcpr_aaaa_2"] if runs else []), follows


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["message", "reasoning", "mcp_call", "user", "function_call_output"]),
                          st.sampled_from([None, "mcp_aaaa_1", "rs_bbbb_2", "msg_aaaa_3", "x_cccc", "fc_bbbb_4"])),
                max_size=8),
       st.sampled_from(["mcpr_aaaa_0", "mcpr_bbbb_0", "mcpr_0"]))
def test_what_follows_an_answer_is_summed_up_right(follows, request_id):
    """``mcp._later`` (linear) agrees with the question asked of every item after the answer."""
    from types import SimpleNamespace

    items = [SimpleNamespace(type="message" if kind == "user" else kind, role="user" if kind == "user" else "assistant",
                             id=item_id) for kind, item_id in follows]
    turn = mcp._turn_of(request_id)
    for i in range(-1, len(items)):
        expected = any(mcp._made(item) and (turn is None or mcp._turn_of(item.id) != turn) for item in items[i + 1:])
        assert mcp._later(items)(i, request_id) == expected, (i, follows)


def test_an_approval_runs_the_request_it_answers():
    """A request item after the answer, with the same id (a client's input may hold any), is not
    the one approved: the approved call runs with what the client saw when it approved. Such an
    input is refused before that (an id names one item: ``conversations.unique``); with the second
    request under an id of its own, the approval still runs the one it names (the second put
    before the answer: one after it was made by a later turn, which ran the approved call first,
    so nothing runs again: ``mcp.pending_of``)."""
    other = {**asked(0), "arguments": '{"message": "other"}'}
    items = [{"role": "user", "content": "hi"}, LISTED, asked(0), answer("mcpr_0", True), other]
    with pytest.raises(GatewayError, match="duplicate item found") as err:
        begin(SPEC, [{"type": "mcp", "server_label": "ev"}], items)
    assert err.value.param == "input[4].id"
    items[-1] = {**other, "id": "mcpr_other"}
    assert begin(SPEC, [{"type": "mcp", "server_label": "ev"}], items).mcp.pending == ()
    items[3:] = [items[-1], items[3]]
    (pending,) = begin(SPEC, [{"type": "mcp", "server_label": "ev"}], items).mcp.pending
    assert pending.request_id == "mcpr_0" and pending.arguments == asked(0)["arguments"]


def test_approved_calls_count_against_max_tool_calls():
    """``max_tool_calls`` bounds the calls the gateway runs in a response: the approved calls it
    runs before round 1 too (spent: round 1 offers none of its functions, and a call the model
    makes anyway runs nothing: it is refused, a failed mcp_call, and the turn ends after it)."""
    from helpers import chat_chunk, chat_sse, tool_call_chunk

    items = [{"role": "user", "content": "hi"}, LISTED, asked(0), answer("mcpr_0", True)]
    for max_calls, offered_after in ((1, []), (2, ["mcp__ev__echo"])):
        t = begin(SPEC, [{"type": "mcp", "server_label": "ev", "require_approval": "never"}], items,
                  max_tool_calls=max_calls)
        loop = ToolLoop(t.chat_body, [mcp.McpTools(t.mcp, max_rounds=3)], max_calls=t.max_tool_calls)
        (step,) = loop.prelude()
        loop.begin(["ran"])
        assert [f["function"]["name"] for f in json.loads(loop.body).get("tools") or ()] == offered_after
        loop.feed(chat_sse(tool_call_chunk(0, "c1", "mcp__ev__echo", "{}"), chat_chunk(finish="tool_calls")))
        _, then = loop.end_round(ok=True)
        assert len(then) == 1 and (then[0].refused is None) == bool(offered_after)
        if not offered_after:  # (spent: refused, nothing runs, and the turn ends)
            assert "max_tool_calls" in then[0].refused and isinstance(loop.next_round(["Error: not run"]), Finish)


# --- the functions ------------------------------------------------------------------------------

LABELS = st.sampled_from(["ev", "a.b", "a_b", "A-1", "x" * 64, "mcp", "s"])
TOOL_NAMES = st.one_of(
    st.sampled_from(["echo", "get-sum", "read.file", "read_file", "read file", "émoji😀", "x" * 70, "x" * 64,
                     "echo_2", "a" * 40 + "." + "b" * 30, "a" * 40 + "_" + "b" * 30, "_", "-"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=80))


@st.composite
def setups(draw):
    labels = draw(st.lists(LABELS, min_size=1, max_size=3, unique=True))
    listings = {label: draw(st.lists(TOOL_NAMES, max_size=6)) for label in labels}
    made = [mcp.base_name(label, name) for label, names in listings.items() for name in names]
    client = draw(st.lists(st.one_of(st.sampled_from(made or ["f"]), st.sampled_from(made or ["f"]).map(
        lambda n: n[:62] + "_2"), st.just("exec")), max_size=3, unique=True))
    allowed = {label: draw(st.none() | st.lists(st.sampled_from(names), max_size=2)) if names else None
               for label, names in listings.items()}
    choice = draw(st.sampled_from([None, "auto", "required", "allowed_tools"]))
    if choice == "allowed_tools":  # the client's first function, and a server's tools or one of them
        label = draw(st.sampled_from(labels))
        names = draw(st.none() | st.sampled_from(listings[label] or ["none"]))
        choice = {"type": "allowed_tools", "mode": "auto", "tools": [
            {"type": "function", "name": n} for n in client[:1]] + draw(st.sampled_from([[], [
                {"type": "mcp", "server_label": label, **({"name": names} if names is not None else {})}]]))}
    return labels, listings, client, allowed, choice


def listed(label: str, names: list[str]) -> list[dict]:
    return [mcp.listed_tool(name, f"{label} {name}", {"type": "object", "properties": {}}, None) for name in names]


def offered(chat: dict) -> list[str]:
    return [t["function"]["name"] for t in chat.get("tools") or ()]


@SETTINGS
@given(setup=setups())
def test_the_functions_are_valid_unique_the_same_in_every_turn_and_map_back(setup):
    labels, listings, client, allowed, choice = setup
    specs = mcp.parse_servers([{"label": label, "url": f"http://127.0.0.1:9/{n}"} for n, label in enumerate(labels)])
    tools = [{"type": "function", "name": name, "parameters": {"type": "object"}} for name in client] + [
        {"type": "mcp", "server_label": label, "require_approval": "never",
         **({"allowed_tools": allowed[label]} if allowed[label] is not None else {})} for label in labels]
    extra = {"tool_choice": choice} if choice is not None else {}
    # this turn lists the servers: the loop offers their functions in round 1
    first = begin(specs, tools, "hi", **extra)
    kind = mcp.McpTools(first.mcp, max_rounds=3)
    loop = ToolLoop(first.chat_body, [kind])
    loop.begin([tuple(listed(label, listings[label])) for label in labels])
    round1 = json.loads(loop.body)
    # a later turn finds the listings in its history
    items = [{"role": "user", "content": "hi"}] + [
        {"type": "mcp_list_tools", "id": f"mcpl_{n}", "server_label": label, "tools": listed(label, listings[label])}
        for n, label in enumerate(labels)]
    later = begin(specs, tools, items, **extra)
    chat = json.loads(later.chat_body)
    assert offered(round1) == offered(chat)
    assert kind.names == later.mcp.names  # the model's earlier calls map back to the same tools
    names = offered(chat)
    assert all(NAME_RE.match(n) for n in names) and len(names) == len(set(names))
    want = {(label, name) for label in labels for name in listings[label]
            if allowed[label] is None or name in allowed[label]}
    assert set(later.mcp.names.values()) == want
    chosen = [(e["server_label"], e.get("name")) for e in choice["tools"] if e["type"] == "mcp"] \
        if isinstance(choice, dict) else None  # (allowed_tools narrows what is offered)
    assert {later.mcp.names[n] for n in names if n in later.mcp.names} == {
        key for key in want if chosen is None or (key[0], None) in chosen or key in chosen}
    # a call to each function runs its tool on its server
    for cname, (label, name) in later.mcp.names.items():
        step = mcp.McpTools(later.mcp, max_rounds=3).step("c1", cname, "{}")
        assert (step.label, step.name, step.server.label) == (label, name, label)


# --- results ------------------------------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
BLOCKS = st.lists(st.one_of(
    st.builds(lambda t, n: {"type": "text", "text": t * n}, _TEXT, st.integers(1, 80)),
    st.builds(lambda m: {"type": "image", "data": "aGk=", "mimeType": m}, st.sampled_from(["image/png", ""])),
    st.just({"type": "audio", "data": "aGk=", "mimeType": "audio/wav"}),
    st.builds(lambda t: {"type": "resource", "resource": {"uri": "file:///x", "text": t}}, _TEXT),
    st.just({"type": "resource", "resource": {"uri": "file:///b", "blob": "aGk="}}),
    st.just({"type": "resource_link", "uri": "file:///l", "name": "l"}),
    st.just({"type": "mystery"}), st.just("not a block")), max_size=5)


@SETTINGS
@given(content=BLOCKS, structured=st.none() | st.dictionaries(_TEXT, _TEXT, max_size=2), is_error=st.booleans(),
       limit=st.integers(1, 600))
def test_any_result_is_a_bounded_well_formed_item_and_model_text(content, structured, is_error, limit):
    """A call's result of any shape (as relay/mcp.py makes the item of it): the ``mcp_call`` item
    the client gets is one the openai SDK reads, its text at most ``max_output_kb`` (and the note
    of what was cut), and the model reads that text (or the error) once."""
    from helpers import check_sdk, check_stream

    output = mcp.output_text(content, structured, limit)
    cut = output.split("\n[output truncated: ")
    assert len(cut[0].encode()) <= limit and len(cut) <= 2
    error = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": output}]} if is_error else None
    t = begin(SPEC, [{"type": "mcp", "server_label": "ev"}], "hi", stream=True)
    tr = t.translator()
    from resp2chat_core.channel import McpCalled
    out = tr.accepted() + tr.mcp_calling("c1", "ev", "echo", "{}")
    out += McpCalled("c1", None if is_error else output, json.dumps(error) if error else None).apply(tr)
    out += tr.feed(b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
                   b"data: [DONE]\n\n") + tr.finish()
    events = check_stream(out, RESP)
    check_sdk(events)
    (item,) = [o for o in events[-1]["response"]["output"] if o["type"] == "mcp_call"]
    if is_error:
        assert item["status"] == "failed" and item["output"] is None
        assert mcp.result_text(None, item["error"]) == "Error: the MCP tool call failed: " + (
            output or "the tool reported an error")
    else:
        assert item["status"] == "completed" and item["output"] == output
        assert mcp.result_text(item["output"], None) == output
