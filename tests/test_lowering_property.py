"""Lowering (Responses request -> chat request) under random requests, mostly schema-valid.

Property tests: hypothesis draws Responses request bodies (string or item-list input: messages
of every role with string or part content, function/custom/local-shell/tool-search calls and
outputs answering a call or none, reasoning, web search calls, MCP items, additional tools;
instructions, tools, every shape of tool_choice, other fields, now and then a wrong one; strings
with quotes, control characters, U+2028, emoji and now and then a lone surrogate) and runs them
through the real ``turn.begin_turn`` (the body's bytes decoded, made whole, validated and
lowered as the gateway does). What lowering promises (lowering.py's rule header,
docs/architecture.md, README.md) must hold for every one:

- nothing but a ``GatewayError`` with a 4xx status ever comes out of a request that is refused;
- the body is one JSON chat request, the same bytes every time: cold, through a tools cache and
  a prefix cache warmed by other requests, as the first turns of a longer conversation, and
  with the keys of the request, its items and tools in another order;
- every ``tool`` message answers a tool call of an earlier assistant message (README: a tool
  output that answers no call is a 400, never an orphan tool message upstream);
- no input item the schema accepts is dropped in silence: each call and output reaches the
  backend, each message's text too;
- every tool name the backend gets matches ``^[a-zA-Z0-9_-]{1,64}$`` (toolmap.py).

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
from resp2chat_core.turn import ToolsCache, begin_turn

# --- strings ---------------------------------------------------------------------------------


def weighted(*choices):
    """One of the strategies, each ``(weight, strategy)`` drawn that often."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda k: table[k])


_NASTY = ['"', "\\", "\n", "\r", "\t", "\x00", "\x01", "\x1f", "\x7f", "\u2028", "\u2029", "😀", "é", "\ufeff",
          "</s>", "<think>", "{", "}", "'", " "]
_BASE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
TEXT = st.lists(st.one_of(_BASE, st.sampled_from(_NASTY)), max_size=5).map("".join)
# now and then past TextCache.MIN (4096 characters): the long texts' cache
LONG = weighted((6, TEXT), (1, st.tuples(TEXT, st.integers(4096, 5000)).map(
    lambda t: ("x" + t[0]) * (t[1] // (len(t[0]) + 1) + 1))))
SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udbff"])
ODD = st.one_of(st.none(), st.integers(), st.booleans(), st.lists(st.integers(), max_size=1), TEXT,
                st.dictionaries(TEXT, st.integers(), max_size=1))  # a value of any JSON type

NAMES = st.sampled_from(["shell", "apply_patch", "read.file", "a b", "x" * 70, "émoji😀", "f", "", "ns__f"])
NAMESPACES = st.one_of(st.none(), st.sampled_from(["mcp__srv__", "multi_agent_v1", "n s"]))
CALL_IDS = st.sampled_from(["call_1", "call_2", "call_3", "c\"4", "c\u20285"])


def _opt(key, strategy):
    """``{}`` or ``{key: a value}``."""
    return st.one_of(st.just({}), strategy.map(lambda v: {key: v}))


# --- input items ---------------------------------------------------------------------------


def _parts(kinds):
    text = st.builds(lambda k, t: {"type": k, "text": t}, st.sampled_from(kinds), LONG)
    image = st.builds(lambda u, d: {"type": "input_image", "image_url": u, **({"detail": d} if d else {})},
                      st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://x.test/a.png"]),
                      st.sampled_from([None, "low", "high", "auto"]))
    no_url = st.just({"type": "input_image", "file_id": "file_1"})
    refusal = st.builds(lambda t: {"type": "refusal", "refusal": t}, TEXT)
    return st.lists(weighted((6, text), (2, image), (1, refusal), (1, no_url)), max_size=3)


CONTENT = st.one_of(LONG, _parts(["input_text", "output_text", "text"]))
MESSAGE = st.builds(
    lambda role, content, typed: {**({"type": "message"} if typed else {}), "role": role, "content": content},
    st.sampled_from(["user", "system", "developer", "assistant"]), CONTENT, st.booleans())
FUNCTION_CALL = st.builds(lambda c, n, a, ns: {"type": "function_call", "call_id": c, "name": n, "arguments": a, **ns},
                          CALL_IDS, NAMES, st.one_of(st.just('{"x":"1"}'), TEXT), _opt("namespace", NAMESPACES))
CUSTOM_CALL = st.builds(lambda c, n, i, ns: {"type": "custom_tool_call", "call_id": c, "name": n, "input": i, **ns},
                        CALL_IDS, NAMES, TEXT, _opt("namespace", NAMESPACES))
SHELL_CALL = st.builds(
    lambda c, cmd, wd, t: {"type": "local_shell_call", **c, "action": {"type": "exec", "command": cmd, **wd, **t}},
    st.one_of(st.just({}), CALL_IDS.map(lambda c: {"call_id": c}), CALL_IDS.map(lambda c: {"id": c})),
    st.lists(TEXT, max_size=3), _opt("working_directory", TEXT), _opt("timeout_ms", st.integers(0, 10**6)))
SEARCH_CALL = st.builds(lambda c, e, a: {"type": "tool_search_call", **c, **e, **a},
                        st.one_of(st.just({}), CALL_IDS.map(lambda c: {"call_id": c})),
                        _opt("execution", st.sampled_from(["client", "server"])),
                        _opt("arguments", st.one_of(TEXT, st.dictionaries(TEXT, TEXT, max_size=2))))
OUTPUT = st.builds(lambda k, c, o: {"type": k, **c, "output": o},
                   st.sampled_from(["function_call_output", "custom_tool_call_output", "local_shell_call_output"]),
                   st.one_of(st.just({}), CALL_IDS.map(lambda c: {"call_id": c}), CALL_IDS.map(lambda c: {"id": c})),
                   st.one_of(TEXT, _parts(["input_text", "output_text"])))
SEARCH_OUTPUT = st.builds(lambda c, e, t: {"type": "tool_search_output", **c, **e, "tools": t},
                          st.one_of(st.just({}), CALL_IDS.map(lambda c: {"call_id": c})),
                          _opt("execution", st.sampled_from(["client", "server"])),
                          st.lists(st.dictionaries(TEXT, TEXT, max_size=2), max_size=2))
REASONING = st.builds(
    lambda s, c: {"type": "reasoning", "summary": [{"type": "summary_text", "text": t} for t in s], **c},
    st.lists(TEXT, max_size=2),
    _opt("content", st.lists(TEXT.map(lambda t: {"type": "reasoning_text", "text": t}), max_size=2)))
WEB_CALL = st.builds(lambda a: {"type": "web_search_call", "id": "ws_1", **a},
                     _opt("action", st.fixed_dictionaries({"type": st.just("search"), "query": TEXT})))

FUNCTION_TOOL = st.builds(
    lambda n, d, s: {"type": "function", "name": n, **d, **s,
                     "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}},
    NAMES.filter(bool), _opt("description", TEXT), _opt("strict", st.booleans()))
CUSTOM_TOOL = st.builds(
    lambda n, d, f: {"type": "custom", "name": n, **d, **f}, NAMES.filter(bool), _opt("description", TEXT),
    _opt("format", st.one_of(st.just({"type": "text"}),
                             st.builds(lambda g: {"type": "grammar", "syntax": "lark", "definition": g}, TEXT))))
NAMESPACE_TOOL = st.builds(lambda n, ts: {"type": "namespace", "name": n, "tools": ts},
                           st.sampled_from(["mcp__srv__", "multi_agent_v1", "n s"]),
                           st.lists(st.one_of(FUNCTION_TOOL, CUSTOM_TOOL), max_size=2))
OTHER_TOOL = st.sampled_from([{"type": "local_shell"}, {"type": "web_search"}, {"type": "image_generation"},
                              {"type": "tool_search", "description": "find tools"},
                              {"type": "mcp", "server_label": "srv", "server_url": "https://mcp.test/mcp"}])
TOOL = weighted((2, FUNCTION_TOOL), (1, CUSTOM_TOOL), (1, NAMESPACE_TOOL), (1, OTHER_TOOL))
MORE_TOOLS = st.builds(lambda ts: {"type": "additional_tools", "tools": ts}, st.lists(TOOL, max_size=2))

LABELS = st.sampled_from(["srv", "a b", ""])
MCP_CALL = st.builds(lambda i, lab, n, a, o, e: {"type": "mcp_call", "id": i, "server_label": lab, "name": n, **a, **o, **e},
                     CALL_IDS, LABELS, NAMES, _opt("arguments", TEXT), _opt("output", st.one_of(st.none(), TEXT)),
                     _opt("error", ODD))
MCP_LIST = st.builds(lambda lab, ts: {"type": "mcp_list_tools", "id": "ml_1", "server_label": lab, "tools": ts},
                     LABELS, st.lists(st.one_of(st.builds(lambda n: {"name": n, "input_schema": {"type": "object"}}, NAMES),
                                                ODD), max_size=2))
MCP_ASK = st.builds(lambda i, lab, n: {"type": "mcp_approval_request", "id": i, "server_label": lab, "name": n,
                                       "arguments": "{}"}, st.sampled_from(["mcpr_1", "mcpr_2"]), LABELS, NAMES)
MCP_ANSWER = st.builds(lambda i, ok, r: {"type": "mcp_approval_response", "approval_request_id": i, "approve": ok, **r},
                       st.sampled_from(["mcpr_1", "mcpr_2"]), st.booleans(), _opt("reason", st.one_of(st.none(), TEXT)))
ODD_ITEM = st.one_of(st.sampled_from([{"type": "item_reference", "id": "msg_1"}, {"id": "msg_2"},
                                      {"type": "compaction", "encrypted_content": "x"}, {"type": "image_generation_call"},
                                      {"type": "computer_call"}, {"type": "message", "role": "tool", "content": "x"},
                                      {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}]),
                     st.builds(lambda t: {"type": t}, ODD))


def _answered(call: dict, output: dict) -> list:
    """A call and its output (the output answering the call's id)."""
    return [call, {**output, "call_id": call.get("call_id") or call.get("id") or "call_1"}]


ITEM = weighted((6, MESSAGE), (3, FUNCTION_CALL), (2, CUSTOM_CALL), (3, REASONING), (1, SHELL_CALL), (1, SEARCH_CALL),
                (1, WEB_CALL), (1, MORE_TOOLS), (1, MCP_CALL), (1, MCP_LIST), (1, MCP_ASK), (1, MCP_ANSWER),
                (1, OUTPUT), (2, SEARCH_OUTPUT), (1, ODD_ITEM))  # (an output alone: often one answering no call)
ITEMS = st.lists(weighted((4, ITEM.map(lambda it: [it])),
                          (2, st.builds(_answered, st.one_of(FUNCTION_CALL, CUSTOM_CALL, SHELL_CALL), OUTPUT)),
                          (1, st.builds(_answered, SEARCH_CALL, SEARCH_OUTPUT))),
                 max_size=6).map(lambda runs: [it for run in runs for it in run])

# --- the request ---------------------------------------------------------------------------

NAMED = st.builds(lambda k, n, ns: {"type": k, **n, **ns}, st.sampled_from(["function", "custom"]),
                  _opt("name", weighted((4, NAMES), (1, ODD))), _opt("namespace", weighted((2, NAMESPACES), (1, ODD))))
TOOL_CHOICE = weighted(
    (2, st.sampled_from(["auto", "none", "required", "any"])),
    (3, NAMED),
    (1, st.builds(lambda n: {"type": "function", "function": {"name": n}}, NAMES)),
    (3, st.builds(lambda m, ts: {"type": "allowed_tools", **m, **ts},
                  _opt("mode", weighted((4, st.sampled_from(["auto", "required", "none"])), (1, ODD))),
                  _opt("tools", weighted((4, st.lists(weighted((4, NAMED), (1, st.just({"type": "local_shell"})), (1, ODD)),
                                                      max_size=3)), (1, ODD))))),
    (1, st.sampled_from([{"type": "local_shell"}, {"type": "tool_search"}, {"type": "web_search"}, {"type": "file_search"}])),
    (1, st.builds(lambda k: {"type": k}, ODD)),
)
FIELDS = st.fixed_dictionaries({}, optional={
    "text": st.fixed_dictionaries({}, optional={"format": st.one_of(
        st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
        st.builds(lambda n, s: {"type": "json_schema", "name": n, "schema": {"type": "object"}, **s},
                  TEXT, _opt("strict", st.booleans())))}),
    "reasoning": st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["low", "high", ""]),
                                                     "summary": st.sampled_from(["auto", "none"])}),
    "max_output_tokens": st.integers(16, 4096), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
    "top_logprobs": st.integers(0, 20), "include": st.lists(st.sampled_from(
        ["reasoning.encrypted_content", "message.output_text.logprobs", "file_search_call.results"]), max_size=2),
    "store": st.booleans(), "stream": st.booleans(), "metadata": st.dictionaries(TEXT, TEXT, max_size=2),
    "context_management": st.just([{"type": "compaction", "compact_threshold": 10}]),
    "prompt_cache_key": TEXT,
})
BAD_FIELDS = st.sampled_from([  # what the gateway refuses before or while lowering
    {"max_output_tokens": 2**40}, {"previous_response_id": "resp_1"}, {"conversation": "conv_1"}, {"include": ["nope"]},
    {"truncation": "middle"}, {"temperature": -1}, {"text": 5}, {"text": {"format": {"type": "xml"}}},
    {"text": {"format": {"type": "json_schema"}}}, {"reasoning": []}, {"input": None}, {"input": 5}, {"tools": {}},
])


def _lone_surrogate(body: dict, where: int, text: str, surrogate: str) -> dict:
    """``body`` with a lone surrogate in its instructions (``where`` 1) or input (2); else as it is."""
    if where == 1:
        return {**body, "instructions": text + surrogate}
    if where == 2:
        inp = body["input"]
        return {**body, "input": [*inp, {"role": "user", "content": [{"type": "input_text", "text": surrogate + text}]}]
                if isinstance(inp, list) else text + surrogate}
    return body


REQUEST = st.builds(
    lambda inp, ins, tools, choice, par, more: {"model": "m", "input": inp, **ins, **tools, **choice, **par, **more},
    st.one_of(LONG, ITEMS), _opt("instructions", LONG), _opt("tools", st.lists(TOOL, max_size=3)),
    _opt("tool_choice", TOOL_CHOICE), _opt("parallel_tool_calls", st.booleans()),
    weighted((3, st.just({})), (2, FIELDS), (1, BAD_FIELDS)))
# now and then a lone surrogate (the body then carries a "\ud8xx" escape: a 400 at decoding)
REQUEST = st.builds(_lone_surrogate, REQUEST, st.sampled_from([*[0] * 28, 1, 2]), TEXT, SURROGATES)

OPTIONS = st.builds(lambda flatten, field, deny: LoweringOptions(flatten_content=flatten, history_reasoning_field=field,
                                                                 tool_denylist=deny),
                    st.booleans(), st.sampled_from(["reasoning_content", "reasoning", "none"]),
                    st.sampled_from([frozenset(), frozenset({"shell"}), frozenset({"local_shell"})]))
MCP_SERVERS = (mcp.ServerSpec("srv", "https://mcp.test/mcp"),)  # (what the operator allows: never reached here)

# --- the properties ------------------------------------------------------------------------


def encode(body: dict) -> bytes:
    """The body as a client sends it: JSON, lone surrogates as ``\\udXXX`` escapes."""
    return json.dumps(body, ensure_ascii=True).encode()


def lowered(body: dict, opts: LoweringOptions, cache: ToolsCache | None = None) -> bytes | GatewayError:
    """The chat body begin_turn sends upstream, or the GatewayError it refuses with: nothing else."""
    try:
        return begin_turn(encode(body), opts, "resp_x", 0, tools_cache=cache, mcp_servers=MCP_SERVERS).chat_body
    except GatewayError as exc:
        assert 400 <= exc.status < 500, exc
        return exc


def same(a, b, message: bool = True) -> bool:
    """The same bytes, or the same refusal (its message too unless ``message`` is false: the
    byte offset an invalid body is named by moves with its keys)."""
    if isinstance(a, GatewayError) or isinstance(b, GatewayError):
        return isinstance(a, GatewayError) and isinstance(b, GatewayError) and (a.param, a.code, a.status) == \
            (b.param, b.code, b.status) and (not message or a.message == b.message)
    return a == b


def check_chat(body: dict, opts: LoweringOptions, chat_bytes: bytes) -> None:
    chat = json.loads(chat_bytes)  # one JSON value, UTF-8
    assert isinstance(chat, dict) and chat["model"] == "m" and chat["stream"] is True
    messages = chat["messages"]
    assert messages and all(m["role"] in ("system", "user", "assistant", "tool") for m in messages)
    assert all(m["role"] != "system" for m in messages[1:]), "a system message only in first place"
    for t in chat.get("tools", []):
        assert NAME_RE.match(t["function"]["name"]), t
    called: set = set()
    for m in messages:
        for c in m.get("tool_calls") or ():
            assert NAME_RE.match(c["function"]["name"]), c
            called.add(c["id"])
        if m["role"] == "tool":
            assert m["tool_call_id"] in called, f"orphan tool message {m['tool_call_id']!r}"
    # nothing the schema took is dropped in silence
    items = body["input"] if isinstance(body["input"], list) else \
        [{"role": "user", "content": body["input"]}] if isinstance(body["input"], str) else []
    calls = [it for it in items if it.get("type") in ("function_call", "custom_tool_call")]
    assert {c["call_id"] for c in calls} <= called
    outputs = [it for it in items if it.get("type", "").endswith("_output")]
    answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert len(answered) >= len(outputs)
    text = chat_bytes.decode()

    def kept(value: str) -> None:
        assert json.dumps(value, ensure_ascii=False)[1:-1] in text, f"{value!r} dropped"

    for it in items:
        kind = it.get("type", "message")
        if kind == "message":
            for part in [it["content"]] if isinstance(it["content"], str) else it["content"]:
                if isinstance(part, str) or part["type"] != "input_image":
                    kept(part if isinstance(part, str) else part.get("text", part.get("refusal")))
        elif kind == "function_call":
            kept(it["arguments"])
        elif kind == "custom_tool_call":
            kept(json.dumps({"input": it["input"]}, ensure_ascii=False, separators=(",", ":")))
        elif kind.endswith("call_output"):
            for part in [it["output"]] if isinstance(it["output"], str) else it["output"]:
                if isinstance(part, str) or part["type"] != "input_image":
                    kept(part if isinstance(part, str) else part.get("text", part.get("refusal")))
        elif kind == "reasoning" and opts.history_reasoning_field != "none":
            for part in it.get("content") or it["summary"]:
                kept(part["text"])


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST, OPTIONS)
def test_random_requests_lower_as_promised(body, opts):
    """Refused with a 4xx GatewayError or lowered to one JSON chat request that keeps every item,
    leaves no tool message without its call, names every tool as a backend takes it; and the same
    bytes (or the same refusal) again."""
    cold = lowered(body, opts)
    assert same(lowered(body, opts), cold)
    if isinstance(cold, bytes):
        check_chat(body, opts, cold)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST, OPTIONS, st.lists(REQUEST, max_size=2))
def test_the_caches_change_no_byte(body, opts, others):
    """Through a tools cache and a prefix cache warmed by other requests first (turn.ToolsCache,
    lowering.TextCache: the long texts, the items, the conversations), the same bytes as cold."""
    cold = lowered(body, opts)
    cache = ToolsCache()
    for other in others:
        lowered(other, opts, cache)
    assert same(lowered(body, opts, cache), cold), "the caches changed the bytes"
    assert same(lowered(body, opts, cache), cold), "the caches changed the bytes (found again)"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST, OPTIONS, ITEMS.filter(bool))
def test_a_conversation_going_on_lowers_as_cold(body, opts, more):
    """A later turn of the conversation (the same items, then more) through the prefix cache of
    the first turn is the same bytes as lowered cold."""
    if not isinstance(body["input"], list):
        return
    cache = ToolsCache()
    lowered(body, opts, cache)
    later = {**body, "input": [*body["input"], *more]}
    assert same(lowered(later, opts, cache), lowered(later, opts))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST, OPTIONS, st.randoms(use_true_random=False))
def test_key_order_of_items_and_request_does_not_change_the_bytes(body, opts, rnd):
    """The same request with its keys (the request's, each item's and tool's, its tool_choice's)
    in another order is the same request: the same bytes."""
    def shuffled(d: dict) -> dict:
        keys = list(d)
        rnd.shuffle(keys)
        return {k: d[k] for k in keys}
    moved = shuffled(body)
    for key in ("input", "tools"):
        if isinstance(body.get(key), list):
            moved[key] = [shuffled(it) for it in body[key]]
    if isinstance(body.get("tool_choice"), dict):
        moved["tool_choice"] = shuffled(body["tool_choice"])
    assert same(lowered(moved, opts), lowered(body, opts), message=False)


# --- what the properties found --------------------------------------------------------------


def refusal(body: dict) -> GatewayError:
    out = lowered(body, LoweringOptions())
    assert isinstance(out, GatewayError), out
    return out


F_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


@pytest.mark.parametrize("choice,param", [
    ({"type": "function", "name": "f", "namespace": 1}, "tool_choice.namespace"),
    ({"type": "custom", "name": "f", "namespace": ["n"]}, "tool_choice.namespace"),
    ({"type": "allowed_tools", "tools": [{"type": "function", "name": "f", "namespace": {"n": 1}}]},
     "tool_choice.tools[0].namespace"),
    ({"type": "allowed_tools", "tools": [{"type": "function", "name": 5}]}, "tool_choice.tools[0].name"),
    ({"type": "allowed_tools", "tools": [F_TOOL, "f"]}, "tool_choice.tools[1]"),
    ({"type": "allowed_tools", "tools": 5}, "tool_choice.tools"),
])
def test_a_tool_choice_naming_a_tool_by_no_string_is_a_400(choice, param):
    """A tool_choice whose namespace, name or tool list is of the wrong type: a 400 naming it (it
    was an AttributeError or TypeError out of toolmap.chat_name: a 500)."""
    err = refusal({"model": "m", "input": "hi", "tools": [F_TOOL], "tool_choice": choice})
    assert (err.param, err.code, err.status) == (param, "invalid_value", 400)


def test_allowed_tools_still_narrows_by_name_and_namespace():
    ns = {"type": "namespace", "name": "multi_agent_v1", "tools": [F_TOOL]}
    chat = json.loads(lowered({"model": "m", "input": "hi", "tools": [F_TOOL, ns], "tool_choice": {
        "type": "allowed_tools", "mode": "required",
        "tools": [{"type": "function", "name": "f", "namespace": "multi_agent_v1"}, {"type": "mcp"}]}},
        LoweringOptions()))
    assert chat["tool_choice"] == "required" and [t["function"]["name"] for t in chat["tools"]] == ["multi_agent_v1__f"]


@pytest.mark.parametrize("call", [
    {"type": "mcp_call", "id": "mcp_1", "server_label": "", "name": "echo", "arguments": "{}", "output": "ok"},
    {"type": "mcp_call", "id": "mcp_1", "server_label": "docs", "name": "", "arguments": "{}", "output": "ok"},
    {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "", "name": "echo", "arguments": "{}"},
    {"type": "mcp_approval_request", "id": "mcpr_1", "server_label": "docs", "name": "", "arguments": "{}"},
])
def test_an_mcp_item_without_a_server_label_or_name_is_a_400(call):
    """Such an item went upstream as a call named ``mcp____`` (a tool no server has)."""
    err = refusal({"model": "m", "input": [{"role": "user", "content": "hi"}, call]})
    field = "name" if call["server_label"] else "server_label"
    assert (err.param, err.code, err.status) == (f"input[1].{field}", "invalid_value", 400)



@pytest.mark.parametrize("call", [
    {"type": "function_call", "call_id": "c1", "name": "", "arguments": "{}"},
    {"type": "custom_tool_call", "call_id": "c1", "name": "", "input": "x"},
])
def test_a_call_without_a_name_is_a_400(call):
    """A call named "" went upstream as a tool call named "", which no backend takes (OpenAI's
    ``^[a-zA-Z0-9_-]{1,64}$``): a 400 naming it, as a tool without a name is."""
    err = refusal({"model": "m", "input": [{"role": "user", "content": "hi"}, call]})
    assert (err.param, err.code, err.status) == ("input[1].name", "invalid_value", 400)


def test_a_tool_search_output_that_answers_no_call_is_a_400_naming_the_call_id():
    """As any other tool output (README): never an orphan tool message upstream."""
    output = {"type": "tool_search_output", "call_id": "call_nowhere", "execution": "client", "tools": []}
    err = refusal({"model": "m", "input": [{"role": "user", "content": "hi"}, output]})
    assert (err.param, err.code) == ("input[1].call_id", "invalid_value") and "'call_nowhere'" in err.message
    call = {"type": "tool_search_call", "call_id": "call_nowhere", "execution": "client", "arguments": {"q": "x"}}
    chat = json.loads(lowered({"model": "m", "input": [{"role": "user", "content": "hi"}, call, output]},
                              LoweringOptions()))
    assert chat["messages"][-1] == {"role": "tool", "tool_call_id": "call_nowhere", "content": "[]"}


def test_a_hosted_tool_search_output_answers_the_search_before_it_through_the_caches_too():
    """OpenAI's server-executed tool search: a ``tool_search_call`` and its ``tool_search_output``
    with ``call_id`` null, each with its own ``id`` (openai-python's ResponseToolSearchCall /
    ResponseToolSearchOutputItem). The output answers the first search not yet answered (it was
    refused as answering no call: its own id named none). The same bytes when an earlier turn
    that ended between the two was lowered first (the prefix cache's checkpoint keeps it)."""
    call = {"type": "tool_search_call", "id": "tsc_1", "call_id": None, "execution": "server", "arguments": {}}
    output = {"type": "tool_search_output", "id": "tso_1", "call_id": None, "execution": "server", "tools": []}
    first = {"model": "m", "input": [{"role": "user", "content": "hi"}, call]}
    body = {"model": "m", "input": [*first["input"], output, {"role": "user", "content": "go on"}]}
    cold = lowered(body, LoweringOptions())
    assert not isinstance(cold, GatewayError), cold
    chat = json.loads(cold)
    assert [m.get("tool_call_id") for m in chat["messages"] if m["role"] == "tool"] == ["tsc_1"]
    assert [c["id"] for m in chat["messages"] for c in m.get("tool_calls") or ()] == ["tsc_1"]
    cache = ToolsCache()
    lowered(first, LoweringOptions(), cache)
    assert lowered(body, LoweringOptions(), cache) == cold
    # an output with no search left to answer is still refused
    again = {**output, "id": "tso_2"}  # (an id of its own: one given twice is refused for that first)
    err = refusal({"model": "m", "input": [*body["input"], again]})
    assert (err.param, err.code) == ("input[4].call_id", "invalid_value")
