"""The gateway's prefix cache (issue 22): a conversation's history decoded, validated and lowered
once, not on every turn that resends it.

Three caches, each checked against the path without it:
- requestbody.PREFIXES: a body that starts with the bytes of one decoded before, through some of
  its input items, decodes only the rest;
- the ItemMemo on lowering.TextCache: input items validated before keep their models;
- the History on lowering.TextCache: a conversation lowered before goes on from its checkpoint.

Differential: random conversations and the real Codex fixtures, each request decoded, validated
and lowered with the caches (warm, and shared with unrelated requests of other sessions, forks,
edits and retries) and without them (cold): the same value, the same chat bytes, the same error,
every time. Then the bounds, and the memory of a real gateway fed more history than the caches
hold.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import marshal
import random
from pathlib import Path

import pytest
import requests

from resp2chat_core import requestbody
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import History, LoweringOptions, TextCache, lower
from resp2chat_core.requestbody import Prefixes
from resp2chat_core.schema import ItemMemo, parse_request
from resp2chat_core.seal import Sealer
from resp2chat_core.turn import ToolsCache, begin_turn
from resp2chat_io import demo_upstream, offload

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CODEX = [p for d in ("codex-0.169.0", "codex-0.169.0-builtin-provider") for p in sorted((FIXTURES / d).glob("*.json"))
         if isinstance(json.loads(p.read_text())["body"], dict)]  # (not the WebSocket upgrade: no body)
KEY = b"k" * 32
SEALER = Sealer(lambda: KEY)
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP4z8AARwzEcQCukw/x0F8jngAAAABJRU5ErkJggg=="


@pytest.fixture
def prefixes(monkeypatch):
    """A fresh, small decode cache that takes bodies of any size (the real one: 64 KiB and up)."""
    cache = Prefixes(max_bytes=4 << 20, entries=6)
    monkeypatch.setattr(requestbody, "PREFIXES", cache)
    monkeypatch.setattr(requestbody, "PREFIX_MIN", 0)
    return cache


def same(a, b) -> bool:
    """Equal values of the same types, dict keys in the same order (``==`` takes 1 for true)."""
    return marshal.dumps(a, 2) == marshal.dumps(b, 2)


# --- random JSON and conversations -----------------------------------------------------------

TEXTS = ["plain", "é unicode ünïcödé", "emoji 😀 and 𝄞", 'quotes " and \\ backslash', "line\nbreak\ttab",
         "\u0000 nul \u001f", "\u2028 separators \u2029", "", "  leading", "{\"json\": [1, 2]}"]


def rand_text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 4))) + str(rng.random())


def rand_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rand_text(rng)
    if kind == 1:
        return rng.choice([0, -1, 7, 2**70, -(2**63)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1.5, 1e-7, 1.5e300, -2.25])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return rng.choice([1, 1.0, True, "1"])  # (told apart by the caches' keys)
    if kind in (6, 7):
        return {f"k{rng.randrange(5)}{rand_text(rng)[:3]}": rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def encode(body: dict, rng: random.Random) -> bytes:
    """JSON as clients send it: compact (Codex) or spaced (Python's default), UTF-8 or escaped."""
    style = rng.randrange(4)
    if style == 0:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    if style == 1:
        return json.dumps(body).encode()
    if style == 2:
        return json.dumps(body, indent=1, ensure_ascii=False).encode()
    return json.dumps(body, separators=(",", ":")).encode()


def turn_items(rng: random.Random, k: int, sealed: bool) -> list[dict]:
    """One turn of a conversation: a user message, then what the assistant did (every item type
    lowering handles), sometimes a developer note or additional tools."""
    items: list[dict] = []
    r = rng.random()
    if r < 0.4:
        items.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": rand_text(rng)}]})
    elif r < 0.6:
        items.append({"role": "user", "content": rand_text(rng)})  # (EasyInputMessage: no type)
    elif r < 0.7:
        items.append({"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": rand_text(rng)}, {"type": "input_image", "image_url": PNG, "detail": "low"}]})
    elif r < 0.8:
        items.append({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": rand_text(rng)}]})
    else:
        items.append({"type": "additional_tools", "tools": [
            {"type": "function", "name": f"extra_{k}", "parameters": {"type": "object", "properties": {}}}]})
        items.append({"type": "message", "role": "user", "content": rand_text(rng)})
    for j in range(rng.randint(0, 3)):
        r = rng.random()
        cid = f"call_{k}_{j}"
        if r < 0.2:
            text = rand_text(rng)
            item = {"type": "reasoning", "id": f"rs_{k}_{j}", "summary": [{"type": "summary_text", "text": text}]}
            if sealed and rng.random() < 0.7:
                item["encrypted_content"] = SEALER.seal("reasoning", "sealed " + text)
            elif rng.random() < 0.5:
                item["content"] = [{"type": "reasoning_text", "text": rand_text(rng)}]
            items.append(item)
        elif r < 0.45:
            items.append({"type": "function_call", "call_id": cid, "name": "shell",
                          "arguments": json.dumps({"cmd": rand_text(rng)}), "id": f"fc_{k}_{j}"})
            out = rand_text(rng) if rng.random() < 0.8 else [{"type": "input_text", "text": rand_text(rng)},
                                                             {"type": "input_image", "image_url": PNG}]
            items.append({"type": "function_call_output", "call_id": cid, "output": out})
        elif r < 0.55:
            items.append({"type": "custom_tool_call", "call_id": cid, "name": "apply_patch", "input": rand_text(rng)})
            items.append({"type": "custom_tool_call_output", "call_id": cid, "output": rand_text(rng)})
        elif r < 0.62:
            items.append({"type": "local_shell_call", "call_id": cid, "status": "completed",
                          "action": {"type": "exec", "command": ["ls", rand_text(rng)], "timeout_ms": rng.choice([None, 1000])}})
            items.append({"type": "local_shell_call_output", "call_id": cid, "output": rand_text(rng)})
        elif r < 0.68:
            items.append({"type": "tool_search_call", "call_id": cid, "arguments": rand_value(rng)})
            items.append({"type": "tool_search_output", "call_id": cid, "tools": [rand_value(rng)]})
        elif r < 0.72:
            items.append({"type": "web_search_call", "id": f"ws_{k}", "action": {"query": rand_text(rng)}})
        else:
            items.append({"type": "message", "role": "assistant", "id": f"msg_{k}_{j}",
                          "content": [{"type": "output_text", "text": rand_text(rng), "annotations": []}]})
    return items


def bad_item(rng: random.Random) -> dict:
    """An item the gateway refuses (each for another reason)."""
    return rng.choice([
        {"type": "no_such_item"},
        {"type": "function_call", "name": "f", "arguments": "{}"},  # no call_id
        {"type": "message", "role": "robot", "content": "x"},
        {"type": "message", "role": "assistant", "content": [{"type": "input_image", "image_url": PNG}]},
        {"type": "message", "role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]},
        {"type": "image_generation_call", "id": "ig_1"},
        {"type": "function_call_output", "output": "no call id"},
        {"type": "reasoning", "summary": [], "encrypted_content": "not ours"},
        "a string",
    ])


def request(order: int, items: list, tools: list, extra: dict) -> dict:
    """A body whose members come in the session's own order (``order``: clients put input
    anywhere among them, and keep it there)."""
    body = {"model": "gpt-test", "input": items, "tools": tools, "stream": True, **extra}
    keys = sorted(body)
    random.Random(order).shuffle(keys)
    return {k: body[k] for k in keys}


TOOLS = [{"type": "function", "name": "shell", "description": "run", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
         {"type": "custom", "name": "apply_patch", "description": "patch"},
         {"type": "local_shell"}, {"type": "web_search"}]


# --- the decode cache --------------------------------------------------------------------------


def bodies(seed: int, n: int = 60):
    """Random Responses bodies in sessions that go on, fork, get edited and retried, interleaved:
    (body, the previous body of its session)."""
    rng = random.Random(seed)
    sessions: list[list] = []
    for _ in range(n):
        if not sessions or rng.random() < 0.2:
            sessions.append([[{"type": "message", "role": "developer", "content": rand_text(rng) * 50}],
                             {"instructions": rand_text(rng)} if rng.random() < 0.5 else {}, rng.randrange(4)])
        s = rng.choice(sessions)
        r = rng.random()
        if r < 0.1 and len(s[0]) > 2:  # edited history
            s[0] = copy.deepcopy(s[0])
            s[0][rng.randrange(len(s[0]))] = {"type": "message", "role": "user", "content": rand_text(rng)}
        elif r < 0.15:  # a fork of it
            s = [list(s[0]), dict(s[1]), s[2]]
            sessions.append(s)
        elif r < 0.2 and len(s[0]) > 3:  # history cut short
            s[0] = s[0][:rng.randrange(1, len(s[0]))]
        elif r > 0.9:
            pass  # the same again (a retry)
        else:
            s[0] = s[0] + turn_items(rng, len(s[0]), False) + [{"k": rand_value(rng)}]
        extra = {**s[1], **({"metadata": {"x": rand_value(rng)}} if rng.random() < 0.3 else {})}
        yield encode(request(s[2], s[0], TOOLS, extra), random.Random(s[2] + len(s[0]) // 7))


@pytest.mark.parametrize("seed", range(4))
def test_decode_with_the_cache_is_json_loads(prefixes, seed):
    for body in bodies(seed):
        assert same(requestbody.loads(body), json.loads(body))
        assert same(requestbody.loads(body, yielding=True), json.loads(body))
    assert prefixes.hits > 10 and prefixes.reused > 100  # (the cache was used, not only filled)
    assert len(prefixes._kept) <= prefixes.max_entries and prefixes.size <= prefixes.max_bytes


def test_a_worker_threads_decode_shares_the_cache_and_frees_only_its_own(prefixes):
    """offload.py decodes a large body in its worker with the cache (the history a long
    conversation resends is decoded once), and empties what its worker decoded once done with it
    (a refused large body) only when that value shares nothing with the cache (``Private``): a
    shared value is left alone, the cache's values stay whole. The cache keeps only what is cheap
    to free (``OBJECTS``): a large body past that is decoded privately, and emptied."""
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"q{i}"}]} for i in range(50)]
    body = json.dumps({"model": "m", "input": items}).encode()
    shared = requestbody.loads(body)
    big = json.dumps({"model": "m", "input": items + [{"type": "message", "role": "user",
                                                       "content": "x" * offload.LARGE}]}).encode()
    value = asyncio.run(offload.loads(big))  # (large: decoded in the worker, with the cache…)
    assert prefixes.hits == 1 and not isinstance(value, requestbody.Private)
    assert all(a is b for a, b in zip(value["input"], shared["input"]))
    asyncio.run(offload.discard(value, len(big)))  # (…shared: left as it is)
    assert same(value, json.loads(big)) and same(requestbody.loads(body), json.loads(body))
    asyncio.run(offload.discard(shared, len(body)))  # (small: left as it is)
    assert same(shared, json.loads(body))
    many = [[] for _ in range(max(requestbody.OBJECTS + 1, offload.LARGE // 3))]  # (too many objects to keep: private)
    for huge in (json.dumps({"model": "m", "input": items, "x": many}).encode(),  # (a new conversation)
                 json.dumps({"model": "m", "input": items + [{"type": "message", "role": "user", "content": many}]}
                            ).encode()):  # (one that goes on from a kept one)
        assert len(huge) >= offload.LARGE
        value = asyncio.run(offload.loads(huge))
        assert isinstance(value, requestbody.Private) and same(dict(value), json.loads(huge))
        assert not {id(x) for x in value["input"]} & {id(x) for x in shared["input"]}
        asyncio.run(offload.discard(value, len(huge)))  # (private: emptied in the worker)
        assert value == {} and same(requestbody.loads(body), json.loads(body))
    # the store's prefetch (offload.reduce) decodes privately and empties what it decoded
    assert asyncio.run(offload.reduce(big, lambda raw: raw["model"])) == "m"
    assert same(requestbody.loads(big), json.loads(big)) and same(requestbody.loads(body), json.loads(body))


def test_what_a_refused_large_request_leaves_in_the_memo_is_its_own(prefixes):
    """A request validated (its models kept) and refused afterwards is emptied by offload.py: a
    kept model must not hold its decoded JSON (tool_search arguments and tools, web search
    actions are ``Any``)."""
    texts = TextCache()
    items = [{"type": "message", "role": "user", "content": "q"},
             {"type": "tool_search_call", "call_id": "c1", "arguments": {"query": ["a", {"b": 1}]}},
             {"type": "tool_search_output", "call_id": "c1", "tools": [{"type": "function", "name": "f"}]},
             {"type": "web_search_call", "id": "ws1", "action": {"query": "weather"}},
             {"type": "message", "role": "user", "content": "next"}]
    body = json.dumps({"model": "m", "input": items, "tool_choice": "required"}).encode()
    raw = requestbody.loads(body, yielding=True)
    with pytest.raises(GatewayError):  # (validates, then lowering refuses it: no tool for tool_choice)
        lower(parse_request(raw, texts.items), LoweringOptions(), texts=texts)
    offload._empty(raw)
    good = json.dumps({"model": "m", "input": items}).encode()
    assert lower(parse_request(requestbody.loads(good, yielding=True), texts.items), LoweringOptions(),
                 texts=texts).body == lower(parse_request(json.loads(good)), LoweringOptions()).body
    assert texts.items.hits >= 5


def test_a_session_holds_one_entry_and_reuses_its_history(prefixes):
    rng = random.Random(7)
    items = [{"type": "message", "role": "user", "content": rand_text(rng)}]
    for k in range(12):
        items += turn_items(rng, k, False)
        body = json.dumps({"model": "m", "input": items}).encode()
        assert same(requestbody.loads(body), json.loads(body))
    assert len(prefixes._kept) == 1 and prefixes.hits == 11


@pytest.mark.parametrize("seed", range(3))
def test_a_bodys_digest_is_its_sha256_its_history_hashed_once(prefixes, monkeypatch, seed):
    """``body_digest`` (the replay cache's key) of each body, asked for or not (a turn the replay
    cache skips never hashes; the next starts from scratch), is SHA-256 of its bytes, through
    sessions that go on, fork, get edited, cut short and retried. A body that goes on from one
    hashed before starts from that one's kept hash states: the same state objects, not the
    history hashed again."""
    monkeypatch.setattr(requestbody, "DIGEST_STEP", 512)  # (the real one: 256 KiB; marks on small bodies)
    rng = random.Random(seed)
    reused = 0
    for body in bodies(seed):
        requestbody.loads(body)
        if rng.random() < 0.2:
            continue  # (not asked for)
        trace = next((t for t in prefixes._kept if t.body is body), None)
        origin = trace.origin[0] if trace is not None else ()
        assert requestbody.body_digest(body) == hashlib.sha256(body).digest()
        if trace is not None:
            assert [off for off, _ in trace.marks] == list(range(512, len(body) + 1, 512))
            reused += sum(1 for m in origin if any(m[1] is n for _, n in trace.marks))
    assert reused > 50
    assert requestbody.body_digest(b'{"small": 1}') == hashlib.sha256(b'{"small": 1}').digest()


def refused(body: bytes) -> str:
    with pytest.raises(GatewayError) as exc:
        requestbody.loads(body)
    return exc.value.body()["error"]["message"]


def test_what_is_refused_is_refused_alike_after_a_shared_history(prefixes):
    rng = random.Random(3)
    items = [{"type": "message", "role": "user", "content": rand_text(rng)} for _ in range(5)]
    good = json.dumps({"model": "m", "input": items, "tools": []}, ensure_ascii=False).encode()
    requestbody.loads(good)
    head = good[:good.rindex(b"]", 0, good.index(b'"tools"'))]  # everything up to input's "]"
    tails = [b',{"x":NaN}],"tools":[]}', b',{"x":Infinity}]}', b',{"x":1e400}]}', b',"\\ud800"]}',
             b',"\\udc00\\ud800"]}', b',"ok \xff"]}', b',"\xe9"]}', b']}x', b']} {}',
             b',]}', b'"]}', b',{"a":1,}]}', b']', b'],"tools":[}', b',"' + b"\xf0\x9f" + b'"]}']
    for tail in tails:
        body = head + tail
        with pytest.raises(GatewayError) as plain:
            requestbody._loads(body)
        assert refused(body) == plain.value.body()["error"]["message"], tail
    # …and what is valid but unusual decodes as json.loads decodes it (the plain path takes it)
    for tail in (b',{"a":1,"a":2}]}', b'],"model":"other"}', b'],"input":[]}', b',"\\ud83d\\ude00"]}', b'  ] ,"z" : [ 1 ] } \n'):
        body = head + tail
        assert same(requestbody.loads(body), json.loads(body)), tail


def test_the_fuzzers_mutations_decode_and_lower_alike(prefixes):
    """tests/fuzz.py's byte-level mutations of real Codex requests (bit flips, cut bodies, bad
    UTF-8, deep nesting, duplicate keys, numbers, types…), which share long prefixes with each
    other: through warm caches, the same value or the same refusal as cold, and the same turn."""
    import fuzz  # noqa: PLC0415 — tests/fuzz.py

    warm = ToolsCache()
    outcomes = set()
    for case in fuzz.cases(7, 400):
        try:
            cold = ("ok", json.dumps(requestbody._loads(case.body)))
        except GatewayError as exc:
            cold = ("error", exc.body())
        try:
            hot = ("ok", json.dumps(requestbody.loads(case.body)))
        except GatewayError as exc:
            hot = ("error", exc.body())
        assert hot == cold, case.name
        assert outcome(case.body, LoweringOptions(), warm) == outcome(case.body, LoweringOptions(), None), case.name
        outcomes.add(cold[0])
    assert outcomes == {"ok", "error"} and prefixes.hits > 20


# --- validation and lowering ---------------------------------------------------------------------


def outcome(body: bytes, opts: LoweringOptions, warm: ToolsCache | None):
    """What begin_turn makes of a body: the chat bytes (and each fallback's), or the error."""
    try:
        raw = requestbody.loads(body) if warm is not None else requestbody._loads(body)
        turn = begin_turn(raw, opts, "resp_x", 0, tools_cache=warm, sealer=SEALER)
    except GatewayError as exc:
        return ("error", exc.status, exc.body())
    return ("ok", turn.chat_body, turn.items, turn.compaction, turn.web_search, turn.ctx.echo_json)


OPTIONS = [LoweringOptions(), LoweringOptions(flatten_content=False, history_reasoning_field="reasoning"),
           LoweringOptions(history_reasoning_field="none", tool_denylist=frozenset({"shell"}), web_search=True)]


@pytest.mark.parametrize("seed", range(6))
def test_lowering_with_the_caches_is_the_same_bytes(prefixes, seed):
    """Random conversations, interleaved, through one gateway's caches (shared by all of them
    and by three lowering options, as an upstream's fallbacks share them), against each request
    lowered cold: the same bytes, items, echo and errors."""
    rng = random.Random(100 + seed)
    warm = ToolsCache()
    sessions: list[list] = []
    errors = oks = 0
    for n in range(80):
        if not sessions or rng.random() < 0.15:
            start = [{"type": "message", "role": rng.choice(["developer", "system"]), "content": rand_text(rng) * 40}]
            sessions.append([start, {"instructions": rand_text(rng)} if rng.random() < 0.4 else {},
                             rng.choice(OPTIONS), rng.randrange(4)])
        s = rng.choice(sessions)
        r = rng.random()
        if r < 0.08 and len(s[0]) > 2:
            s[0] = list(s[0])
            s[0][rng.randrange(1, len(s[0]))] = {"type": "message", "role": "user", "content": rand_text(rng)}
        elif r < 0.14:
            sessions.append([list(s[0]), dict(s[1]), rng.choice(OPTIONS), s[3]])
        items = s[0] + turn_items(rng, n, True)
        if rng.random() < 0.12:  # refused: the history stays as it was
            body_items = items[:]
            body_items.insert(rng.randrange(len(body_items) + 1), bad_item(rng))
        else:
            body_items = items
            if rng.random() < 0.9:
                s[0] = items
        if rng.random() < 0.05:
            body_items = body_items + [{"type": "compaction_trigger"}]
        body = encode(request(s[3], body_items, TOOLS, s[1]), random.Random(s[3] + len(s[0]) // 5))
        cold, hot = outcome(body, s[2], None), outcome(body, s[2], warm)
        assert cold == hot, (n, cold[:2], hot[:2])
        errors += cold[0] == "error"
        oks += cold[0] == "ok"
    assert errors > 3 and oks > 40
    texts = warm.texts
    assert texts.history.hits > 10 and texts.items.hits > 100


@pytest.mark.parametrize("fixture", CODEX, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_codex_fixtures_with_the_caches(prefixes, fixture):
    """Each real Codex request, alone, then as the start of a session that goes on (its output
    and a question each turn) and is resent, through caches warm from the other fixtures."""
    warm = ToolsCache()
    others = [json.loads(p.read_text())["body"] for p in CODEX]
    for other in others:
        outcome(json.dumps(other).encode(), LoweringOptions(), warm)
    body = json.loads(fixture.read_text())["body"]
    rng = random.Random(fixture.name)
    items = list(body["input"]) if isinstance(body["input"], list) else [{"role": "user", "content": body["input"]}]
    for k in range(5):
        data = json.dumps({**body, "input": items}, separators=(",", ":"), ensure_ascii=False).encode()
        for _ in range(2):  # (and again: a retry)
            assert outcome(data, LoweringOptions(), None) == outcome(data, LoweringOptions(), warm)
        items = items + turn_items(rng, k, True)
    assert warm.texts.history.hits >= 4


def test_items_nested_too_deep_to_copy_or_marshal(prefixes):
    """JSON nested as deep as the decoder takes, in the Any fields a kept model owns a copy of
    (and too deep for marshal): served or refused as without the caches (a fuzz finding: the
    deep copy raised RecursionError, a 500)."""
    warm = ToolsCache()
    for depth in (50, 900, 1900, 2500, 5000):
        deep = "[" * depth + "]" * depth
        for item in ('{"type":"tool_search_call","call_id":"c","arguments":%s}' % deep,
                     '{"type":"tool_search_output","call_id":"c","tools":[%s]}' % deep,
                     '{"type":"web_search_call","action":{"query":%s}}' % deep,
                     '{"type":"message","role":"user","content":"x","extra":%s}' % deep):
            body = ('{"model":"m","input":[{"role":"user","content":"hi"},%s,{"role":"user","content":"go"}]}'
                    % item).encode()
            for _ in range(2):
                assert outcome(body, LoweringOptions(), warm) == outcome(body, LoweringOptions(), None), (depth, item[:40])


def test_a_partly_new_request_is_validated_in_part_with_the_same_errors():
    memo = ItemMemo()
    items = [{"type": "message", "role": "user", "content": f"q{i}"} for i in range(6)]
    parse_request({"model": "m", "input": items}, memo)
    bad = items + [{"type": "message", "role": "assistant", "content": [{"type": "output_text"}]}] + items[:2]
    for body in ({"model": "m", "input": bad}, {"model": "m", "input": items[:3] + [{"type": "nope"}]},
                 {"model": "", "input": items}, {"model": "m", "input": items + [{"type": "item_reference", "id": "x"}]}):
        with pytest.raises(GatewayError) as cold:
            parse_request(body)
        with pytest.raises(GatewayError) as hot:
            parse_request(body, memo)
        assert cold.value.body() == hot.value.body()
    assert memo.hits >= 6
    req = parse_request({"model": "m", "input": items + [{"role": "user", "content": "new"}]}, memo)
    again = parse_request({"model": "m", "input": list(items)}, memo)
    assert [a is b for a, b in zip(req.input, again.input)] == [True] * 6  # (the same models, found again)


def test_one_conversation_under_other_options_and_instructions():
    """The same items through one cache under each lowering option and other instructions, in
    turn (an upstream's fallbacks lower each turn again with theirs): a checkpoint serves only
    the options and instructions it was lowered with."""
    rng = random.Random(5)
    texts = TextCache()
    items = [{"type": "message", "role": "developer", "content": "rules"}]
    for k in range(6):
        items = items + turn_items(rng, k, False)
        for opts in OPTIONS:
            for instructions in (None, "be brief"):  # (6 combinations: the 8 checkpoints hold them all)
                body = {"model": "m", "input": items, **({"instructions": instructions} if instructions else {})}
                hot = lower(parse_request(body, texts.items), opts, texts=texts).body
                assert hot == lower(parse_request(body), opts).body, (k, opts, instructions)
    assert texts.history.hits >= 5 * 6


def test_a_checkpoint_is_taken_past_the_leading_system_run_only():
    """A request of system/developer messages only keeps no checkpoint: the next one may add
    another developer message, which joins the leading system message."""
    texts = TextCache()
    dev = {"type": "message", "role": "developer", "content": "rules"}
    for input_ in ([dev], [dev, dict(dev, content="more rules"), {"role": "user", "content": "hi"}]):
        req = parse_request({"model": "m", "input": input_}, texts.items)
        cold = lower(parse_request({"model": "m", "input": input_}), LoweringOptions())
        assert lower(req, LoweringOptions(), texts=texts).body == cold.body
    assert texts.history.hits == 0


# --- bounds -------------------------------------------------------------------------------------


def test_the_caches_stay_within_their_bounds():
    rng = random.Random(11)
    cache = Prefixes(max_bytes=300_000, entries=4)
    texts = TextCache()
    texts.items = ItemMemo(size=200, max_bytes=100_000, runs=3)
    texts.history = History(max_bytes=200_000, entries=3)
    for s in range(12):  # 12 sessions of 6 turns, ~60 KB each: more than any of them holds
        items = [{"type": "message", "role": "developer", "content": f"session {s} " + "x" * 20_000}]
        for k in range(6):
            items = items + turn_items(rng, k, False)
            body = json.dumps({"model": "m", "input": items}).encode()
            raw = cache.decode(body)
            assert same(raw, json.loads(body))
            lower(parse_request(raw, texts.items), LoweringOptions(), texts=texts)
            assert len(cache._kept) <= 4 and cache.size <= 300_000
            assert len(texts.items._young) <= 200 and len(texts.items._old) <= 200
            assert texts.items._young_bytes <= 100_000 and len(texts.items._runs) <= 3
            assert len(texts.history._kept) <= 3 and texts.history.size <= 200_000
            assert all(c.size == sum(map(len, c.pieces)) for c in texts.history._kept)
    assert cache.hits > 40 and texts.history.hits > 40


# --- a real gateway -----------------------------------------------------------------------------


def _rss_kb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1])
    return fields


@pytest.fixture
def roomy_upstream():
    """The demo upstream with a context window for 1.6 MB prompts (the session one: 512 KB)."""
    server, base_url = demo_upstream.serve_in_thread(max_context=4 << 20)
    yield base_url.removesuffix("/v1")
    server.shutdown()
    server.server_close()


def test_a_gateway_fed_more_history_than_its_caches_hold_keeps_its_memory_bounded(roomy_upstream, gateway_factory):
    """32 sessions of 2 turns with 1.6 MB of history each (100 MB of requests, 4x what the caches
    hold), through a real gateway (no response store, no replay cache: only the caches keep
    anything): every answer right, and once the caches are full (8 sessions) and the garbage
    collections of offload.py ``_reclaim`` have settled (15), the gateway's memory stays where it
    is. A finished turn's flow is cyclic garbage holding ~3x its body until a full collection:
    without ``_reclaim``, CPython ran one in 48 turns and the peak grew ~2 MB a turn after it
    (39-44 MB from session 7 to 23); with it (a collection every 16 MiB of large bodies, every
    4th of them full), it grows ~25 MB to session 19 and stays there (docs/performance.md)."""
    gw = gateway_factory(roomy_upstream, "--set", "resp2chat_max_replay_entries=0", "--set", "flow_detail=0")
    answer = " ".join(f"word{i}" for i in range(200))
    pairs = [item for i in range(1040) for item in (
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"question {i}"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]})]
    seen = {}
    for s in range(32):
        items = [{"type": "message", "role": "developer", "content": f"session {s}"}] + pairs
        for k in range(2):
            items = items + [{"type": "message", "role": "user", "content": f"words: 3\nnoreason\nsession {s} turn {k}"}]
            r = requests.post(gw.base_url + "/responses", data=json.dumps({"model": "m", "input": items, "store": False}),
                              headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code == 200, r.text[:300]
            assert r.json()["output"][-1]["content"][0]["text"] == "word0 word1 word2", r.json()
            items = items + r.json()["output"]
        seen[s] = _rss_kb(gw.proc.pid)
    started, settled, end = seen[0], seen[15], seen[31]
    assert end["VmHWM"] - settled["VmHWM"] < 15_000, seen  # kB: flat once full
    assert end["VmHWM"] - started["VmHWM"] < 160_000, seen  # what the caches hold (docs/performance.md)


def test_what_a_collection_froze_is_walked_again_when_no_more_large_bodies_come(monkeypatch):
    """offload.py freezes what survives its collection (``_collect``: the caches, later
    collections skip them); garbage made of what it froze (a socket's flow that ended since, a mitmweb flow
    cleared) is freed ``THAW_SECS`` after the last collection, not kept for as long as no large
    body comes."""
    import gc
    import weakref

    class Node:
        pass

    monkeypatch.setattr(offload, "THAW_SECS", 0.2)
    monkeypatch.setattr(offload, "_collections", 0)
    monkeypatch.setattr(offload, "_since", 0)

    async def run():
        node = Node()
        node.me = node  # (a cycle: only the collector frees it)
        gone = weakref.ref(node)
        offload._reclaim(offload.COLLECT)  # (a collection due…)
        offload.sent()  # (…made once a request is sent: node, alive, is frozen)
        await asyncio.sleep(0)
        del node
        gc.collect()
        frozen = gone() is not None
        await asyncio.sleep(1.0)
        return frozen, gone() is None

    try:
        frozen, freed = asyncio.run(run())
    finally:
        gc.unfreeze()
    assert frozen  # (what the freeze is for: collections skip it)
    assert freed


def test_a_collection_is_made_once_the_turn_that_made_it_due_is_sent_not_in_its_hook(monkeypatch):
    """The large body that makes a garbage collection due (offload._reclaim, every ``COLLECT``
    bytes) does not pay for it in its hook, where the turn's own latency runs: its decode
    returns without one, and the collection is made once the turn's chat request is written to
    its backend (the relay's upstream client, here to the real demo upstream), while the backend
    reads it. A body that reaches no backend (a refusal, a passthrough) leaves it due: the next
    large body's decode makes it."""
    import gc

    from resp2chat_core.channel import Channel
    from resp2chat_core.routing import Candidate
    from resp2chat_io.relay.upstream import UpstreamClient

    monkeypatch.setattr(offload, "_since", offload.COLLECT - 1)  # (the next large body makes one due)
    monkeypatch.setattr(offload, "_collections", 0)
    monkeypatch.setattr(offload, "_due", False, raising=False)
    monkeypatch.setattr(offload, "_thawing", None)
    server, base_url = demo_upstream.serve_in_thread()
    chat = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "words: 3\nnoreason"}]})
    to = Candidate("default", base_url + "/chat/completions", chat.encode())
    big = json.dumps({"model": "m", "input": "x" * offload.LARGE}).encode()
    channel, items, made = Channel(push=lambda got: items.extend(got)), [], []

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and offload._collections > len(made):  # (one of offload's, not CPython's own)
            made.append(channel.sent is not None)

    async def turn():
        await offload.loads(big)  # (the turn's hook: its body decoded)
        in_hook = offload._collections
        await UpstreamClient().call(to, [], to.body, channel)
        return in_hook

    async def unsent():
        monkeypatch.setattr(offload, "_since", offload.COLLECT - 1)
        await offload.loads(big)  # (due, and refused: no backend call)
        due = offload._collections
        await offload.loads(big)  # (the next large body)
        return due, offload._collections

    gc.callbacks.append(watch)
    try:
        in_hook = asyncio.run(turn())
        assert in_hook == 0  # (none while the hook ran)
        assert made == [True] and offload._collections == 1  # (one, the request written to the backend)
        answer = b"".join(i for i in items if isinstance(i, bytes))  # (the backend answered it)
        assert b"word2" in answer and answer.endswith(b"data: [DONE]\n\n")
        assert asyncio.run(unsent()) == (1, 2)
    finally:
        gc.callbacks.remove(watch)
        gc.unfreeze()
        server.shutdown()
        server.server_close()
