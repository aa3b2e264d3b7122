"""The Responses WebSocket transport: the core (resp2chat_core/websocket.py) alone, then a raw
WebSocket client through a real mitmdump (relay/websocket.py, addons/websocket.py). The real
Codex CLI over the socket is in test_codex_builtin.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import wsproto.events as E

from resp2chat_core import websocket as ws
from resp2chat_core.errors import GatewayError

from helpers import (DONE, LocalServer, QuietHandler, chat_event, logged_bodies, parse_sse, read_flows, tool_call,
                     user)
from wsclient import Refused, WSClient, opened, refused_upgrade

TOOLS = [{"type": "function", "name": "exec_command", "description": "run a command", "strict": False,
          "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}]


# --- the core ------------------------------------------------------------------------------


def test_read_message():
    create = ws.read_message('{"type": "response.create", "model": "m", "input": "hi", "generate": false}')
    assert create.body == {"model": "m", "input": "hi"} and create.warmup and create.previous is None
    assert not ws.read_message('{"type": "response.create", "model": "m", "input": []}').warmup
    assert ws.read_message('{"type": "response.processed", "response_id": "resp_1"}') is None
    for bad, code in [("nope", "invalid_json"), ("[1]", "invalid_json"), ('{"type": "response.append"}',
                      "unsupported_message_type"), ('{"model": "m"}', "unsupported_message_type"),
                      ('{"type": "response.create", "generate": "no"}', "invalid_value")]:
        with pytest.raises(GatewayError) as err:
            ws.read_message(bad)
        assert err.value.code == code and err.value.status == 400
    message = json.loads(ws.error_message(GatewayError("input[2]: bad", param="input[2]", code="invalid_value")))
    assert message == {"type": "error", "status": 400, "error": {
        "message": "input[2]: bad", "type": "invalid_request_error", "param": "input[2]", "code": "invalid_value"}}


def test_messages_are_the_data_of_each_event():
    sse = b'event: response.created\ndata: {"type":"response.created"}\n\nevent: x\ndata: {"type":"x","a":"b\\n"}\n\n'
    assert ws.messages(sse) == ['{"type":"response.created"}', '{"type":"x","a":"b\\n"}']
    assert ws.messages(b"") == []


def _translator():
    from resp2chat_core.lowering import LoweringOptions
    from resp2chat_core.turn import begin_turn

    return begin_turn(b'{"model": "m", "input": "hi"}', LoweringOptions(), "resp_x", 1).translator()


def test_the_deltas_one_backend_read_brings_go_out_as_one_message():
    t = _translator()
    coalesce = ws.Coalescer()
    first = coalesce(t.accepted() + t.feed(chat_event({"reasoning_content": "a "})
                                           + chat_event({"reasoning_content": "b"})
                                           + chat_event({"content": "x"}) + chat_event({"content": "y"})))
    second = coalesce(t.feed(chat_event({"content": "z"})) + t.feed(chat_event(finish="stop") + DONE))
    events = [json.loads(m) for _, m in first + second]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))  # still contiguous
    deltas = [(e["type"].split(".")[1], e["delta"]) for e in events if e["type"].endswith(".delta")]
    assert deltas == [("reasoning_text", "a b"), ("output_text", "xy"), ("output_text", "z")]
    assert events[-1]["response"]["output"][-1]["content"][0]["text"] == "xyz"
    assert [k for k, _ in first + second] == [e["type"] for e in events]
    # chunked otherwise, the same answer: the same once every run of deltas is merged
    t2 = _translator()
    whole = t2.accepted() + t2.feed(chat_event({"reasoning_content": "a b"}) + chat_event({"content": "xyz"})
                                    + chat_event(finish="stop") + DONE)
    assert ws.canonical(ws.as_sse(first + second)) == ws.canonical(whole) == ws.as_sse(ws.Coalescer()(whole))


def test_deltas_merge_on_their_text_whatever_they_hold():
    """The merge joins the deltas' JSON strings as written (no decoding): quotes, backslashes,
    non-ASCII, line separators and U+FFFD (what a backend's lone surrogate escape is read as:
    chatstream.py) come out as one delta whose decoded text is the parts' joined; a tool
    call's argument deltas merge alike. Each message is valid JSON, as one decoding of the
    events would have it."""
    parts = ['say "hi"', "\\", "é😀", "\u2028", "\n\t", "\ud800", "\udc00", "{\"k\": [1]}"]
    t = _translator()
    out = t.accepted() + t.feed(b"".join(chat_event({"content": p}) for p in parts))
    messages = ws.Coalescer()(out)
    deltas = [json.loads(m) for k, m in messages if k == "response.output_text.delta"]
    read = "".join(parts).replace("\ud800", "\ufffd").replace("\udc00", "\ufffd")
    assert len(deltas) == 1 and deltas[0]["delta"] == read
    apart = "".join(json.loads(m)["delta"] for m in ws.messages(out) if '"response.output_text.delta"' in m)
    assert deltas[0]["delta"] == apart
    events = [json.loads(m) for _, m in messages]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    t = begin_turn_with_tools()
    out = t.accepted() + t.feed(b"".join(chat_event({"tool_calls": [tool_call(0, "c", "exec_command", a)]})
                                         for a in ['{"cmd"', ': "ls', ' \\"x\\""}']))
    args = [json.loads(m) for k, m in ws.Coalescer()(out) if k == "response.function_call_arguments.delta"]
    assert [a["delta"] for a in args] == ['{"cmd": "ls \\"x\\""}']
    # a delta that does not read as the translator writes one is passed as it is, never merged
    odd = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":0,'
           b'"delta":["a"],"item_id":"m"}\n\n') * 2
    assert [m.decode() for _, m in ws.Coalescer()(odd)] == ws.messages(odd)


def test_a_socket_turns_translator_merges_each_deliverys_runs_as_the_coalescer_does():
    """A WebSocket turn's translator merges each delivery's runs of deltas itself
    (``Translator.merge``; the reader reads a delivery's backend bytes in a row as one): the
    messages are those the coalescer makes of the same translator's unmerged events, for 400
    random answers cut at random places into random deliveries: text (some chunks with
    logprobs), reasoning (``reasoning_content``, or ``<think>`` tags, whole or split, with
    logprobs too; as summaries or not), function-call arguments, a custom tool's input
    (apply_patch), the gateway's own events between them (keepalives, a web search, an MCP
    call), escapes and lone surrogates, an upstream failure or a cut stream at the end."""
    import random

    from resp2chat_core import channel as ch
    from resp2chat_core.lowering import LoweringOptions
    from resp2chat_core.turn import begin_turn

    tools = [*TOOLS, {"type": "custom", "name": "apply_patch", "description": "patch"}]
    patch = [chat_event({"tool_calls": [{"index": 0, "id": "p", "type": "function", "function": {
        "arguments": args, **({"name": "apply_patch"} if i == 0 else {})}}]})
        for i, args in enumerate(['{"input": "', "ab", "\\ud800", '"}'])]  # (the surrogate: held, then the rest)
    words = ["a", " ", "\n", "é😀", 'say "hi"', "\\", "\u2028", "\ud800", "\udc00", "{\"k\": 1}", "  \n\n", "<b>",
             "<think>", "</think>", "x</think>y", "<thi", "nk>", "</"]

    def logprob(n: int) -> dict:
        return {"content": [{"token": f"t{n}", "logprob": -0.5, "bytes": None, "top_logprobs": []}]}

    rng, fewer = random.Random(22), 0
    for case in range(400):
        logprobs = rng.random() < 0.5
        body = {"model": "m", "input": "hi", "tools": tools, "top_logprobs": 2 if logprobs else 0}
        if rng.random() < 0.5:
            body["reasoning"] = {"summary": "auto"}
        turn = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 1)
        items = [chat_event({"content": "<think>"})] if rng.random() < 0.3 else []
        for n in range(rng.randrange(1, 40)):
            pick, text = rng.random(), rng.choice(words)
            if pick < 0.45:
                lp = {"logprobs": logprob(n)} if logprobs and rng.random() < 0.4 else {}
                items.append(chat_event(choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None, **lp}]))
            elif pick < 0.52:  # a refusal (OpenAI's chat API says one in delta.refusal)
                items.append(chat_event({"refusal": text}))
            elif pick < 0.6:
                items.append(chat_event({"reasoning_content": text}))
            elif pick < 0.75:
                call = rng.randrange(2)
                items.append(chat_event({"tool_calls": [tool_call(call, f"c{call}", "exec_command",
                                                                   json.dumps(text)[1:-1])]}))
            elif pick < 0.88:  # apply_patch's input, streamed live as the model writes it
                parts = ['{"input": "', *(json.dumps(rng.choice(words))[1:-1] for _ in range(rng.randrange(4))), '"}']
                for i, args in enumerate(parts):
                    items.append(chat_event({"tool_calls": [{"index": 10 + n, "id": f"p{n}", "type": "function",
                                                             "function": {"arguments": args,
                                                                          **({"name": "apply_patch"} if i == 0 else {})}}]}))
            elif pick < 0.92:
                items.append(ch.Keepalive())
            elif pick < 0.96:
                items += [ch.SearchStarted(f"s{n}", "q"), ch.SearchDone(f"s{n}", (("https://a.example", "A"),))]
            else:
                items += [ch.McpCalling(f"m{n}", "label", "tool", '{"a":1}'), ch.McpCalled(f"m{n}", "out")]
        end = rng.random()
        if end < 0.8:
            items.append(chat_event(finish="stop") + DONE)
        cut = []
        for item in items:  # backend bytes cut anywhere
            if item.__class__ is bytes and rng.random() < 0.5:
                at = rng.randrange(1, len(item))
                cut += [item[:at], item[at:]]
            else:
                cut.append(item)
        if end >= 0.9:
            cut.append(ch.UpstreamFailed(500, b'{"error":{"message":"x"}}'))
        deliveries, at = [], 0
        while at < len(cut):
            n = rng.randrange(1, 8)
            deliveries.append(cut[at:at + n])
            at += n
        got, expected, unmerged = both(turn, deliveries)
        assert got == expected, (case, deliveries)
        fewer += len(got) < unmerged
    assert fewer > 200, fewer  # (most answers had a run to merge: the comparison reads merged deltas)
    # apply_patch's input with a lone surrogate: held while live, then the rest at the call's end
    turn = begin_turn(json.dumps({"model": "m", "input": "hi", "tools": tools}).encode(), LoweringOptions(), "resp_x", 1)
    got, expected, unmerged = both(turn, [[*patch, chat_event(finish="tool_calls") + DONE]])
    assert got == expected and unmerged == len(got) + 1
    assert [json.loads(m)["delta"] for k, m in got if k.endswith(".delta")] == ["ab\ud800"]


def both(turn, deliveries: list) -> tuple[list, list, int]:
    """A turn's answer through a merging translator (its messages), through one that does not
    (the coalescer's messages of its events), and how many events that one wrote."""
    from resp2chat_core.channel import Reader

    plain, merged = turn.translator(), turn.translator()
    merged.merge = True
    coalesce, a, b = ws.Coalescer(), Reader(plain, 1 << 22), Reader(merged, 1 << 22)
    first = plain.accepted()
    expected = coalesce(first) + [m for d in deliveries for m in coalesce(a.apply_all(d))] + coalesce(a.finish())
    got = ws.events(merged.accepted()) + [m for d in deliveries for m in ws.events(b.apply_all(d))] \
        + ws.events(b.finish())
    return got, expected, len(ws.events(first + a.sent))


def begin_turn_with_tools():
    from resp2chat_core.lowering import LoweringOptions
    from resp2chat_core.turn import begin_turn

    return begin_turn(json.dumps({"model": "m", "input": "hi", "tools": TOOLS}).encode(), LoweringOptions(),
                      "resp_x", 1).translator()


def test_connection_memory_continues_responses_and_is_bounded():
    conn = ws.Connection(keep=2)
    stored = {"resp_stored": [user("from the store")]}
    conn.remember("resp_1", [user("a")])
    create = ws.read_message(json.dumps({"type": "response.create", "model": "m", "input": "b",
                                         "previous_response_id": "resp_1"}))
    assert conn.conversation(create, stored.get) == [user("a"), {"role": "user", "content": "b"}]
    create.body["previous_response_id"] = "resp_stored"  # not this connection's: the response store's
    assert conn.conversation(create, stored.get)[0] == user("from the store")
    create.body["previous_response_id"] = "resp_unknown"
    assert conn.conversation(create, stored.get) is None
    conn.remember("resp_2", [])
    conn.remember("resp_3", [])
    assert len(conn) == 2 and conn.history("resp_1") is None and conn.history("resp_3") == []
    # kept as the response store keeps it: references resolved, additional_tools items kept
    tools = {"type": "additional_tools", "tools": TOOLS}
    create = ws.read_message(json.dumps({"type": "response.create", "model": "m", "previous_response_id": "resp_3",
                                         "input": [{"type": "item_reference", "id": "msg_1"}, tools, user("c")]}))
    assert conn.conversation(create, None, lambda ids: {"msg_1": user("resolved")}) == [user("resolved"), tools, user("c")]


def test_connection_memory_is_bounded_in_bytes():
    """What one socket remembers is at most ``max_bytes`` (the addon: max_request_body_mb), by
    the sizes it is told: past it the oldest are forgotten; one larger than that alone is not
    remembered and the others stay; forgetting gives its bytes back."""
    conn = ws.Connection(keep=4, max_bytes=100)
    assert conn.remember("resp_a", [user("a")], 40) and conn.remember("resp_b", [user("b")], 40)
    assert conn.remember("resp_c", [user("c")], 40)  # 120: the oldest goes
    assert conn.history("resp_a") is None and conn.history("resp_b") == [user("b")] and conn.bytes == 80
    assert not conn.remember("resp_d", [user("d")], 101)  # alone past the bound: not kept, nothing else lost
    assert conn.history("resp_d") is None and len(conn) == 2 and conn.bytes == 80
    conn.forget("resp_b")
    assert conn.bytes == 40 and conn.remember("resp_e", [], 60) and len(conn) == 2 and conn.bytes == 100


# --- through a real mitmdump ---------------------------------------------------------------


@pytest.fixture
def gw(upstream, gateway_factory, tmp_path):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         "--set", f"resp2chat_upstream_request_log_path={tmp_path / 'up.jsonl'}",
                         "-w", str(tmp_path / "flows.mitm"))
    gw.request_log = tmp_path / "up.jsonl"
    gw.flows = tmp_path / "flows.mitm"
    return gw


def done(events: list[dict]) -> dict:
    assert events[-1]["type"] == "response.completed", events[-1]
    return events[-1]["response"]


def test_a_conversation_over_the_socket_lowers_to_the_same_bytes_as_over_http(gw, upstream):
    """previous_response_id + only the new input over the socket == the whole input over HTTP."""
    instructions = {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]}
    base = {"model": "demo-model", "tools": TOOLS, "store": False, "stream": True, "parallel_tool_calls": True}
    client = WSClient(gw.base_url)
    first = [instructions, user("run: echo from-the-socket")]
    r1 = done(client.turn({"type": "response.create", **base, "input": first}))
    assert r1["output"][-1]["type"] == "function_call"
    second = [{"type": "function_call_output", "call_id": r1["output"][-1]["call_id"], "output": "from-the-socket\n"}]
    r2 = done(client.turn({"type": "response.create", **base, "previous_response_id": r1["id"], "input": second}))
    assert r2["output"][-1]["content"][0]["text"] == "The tool returned: from-the-socket"
    third = [user("thanks")]
    r3 = done(client.turn({"type": "response.create", **base, "previous_response_id": r2["id"], "input": third}))
    client.close()
    # the same conversation, the client resending everything each time (as Codex does over HTTP)
    full = first
    for extra, earlier in ((None, None), (second, r1), (third, r2)):
        if extra is not None:
            full = full + earlier["output"] + extra
        r = requests.post(gw.base_url + "/responses", json={**base, "input": full}, timeout=30)
        assert parse_sse(r.content)[-1]["type"] == "response.completed"
    bodies = logged_bodies(gw.request_log)
    assert len(bodies) == 6
    assert bodies[:3] == bodies[3:]  # byte for byte: the backend's prefix cache cannot tell them apart
    assert r3["output"][-1]["content"][0]["text"] == "You said: thanks"


def test_the_connection_remembers_the_input_made_whole(gw, upstream):
    """What a socket turn referred to (item_reference) or carried sealed (reasoning) is kept in
    the connection's memory resolved, as the response store keeps it: the next turn lowers to
    the HTTP path's bytes for the whole conversation, even once the referenced response is gone."""
    include = ["reasoning.encrypted_content"]
    base = {"model": "demo-model", "store": False, "stream": True, "include": include}
    stored = requests.post(gw.base_url + "/responses", timeout=30, json={
        **base, "store": True, "input": [{"type": "message", "id": "msg_kept_1", "role": "user", "content": "kept"}]})
    r0 = parse_sse(stored.content)[-1]["response"]
    reasoning, message = r0["output"]
    assert reasoning["encrypted_content"].startswith("r2c1.")
    # (a reference names an item the gateway produced: a client's own input ids name nothing)
    first = [{"type": "message", "role": "user", "content": "kept"}, reasoning,
             {"type": "item_reference", "id": message["id"]}, user("next")]
    # the whole conversation as an HTTP client resends it (references and sealed items expanded)
    assert requests.post(gw.base_url + "/responses", json={**base, "input": first}, timeout=30).ok
    client = WSClient(gw.base_url)
    r1 = done(client.turn({"type": "response.create", **base, "input": first}))
    assert requests.delete(f"{gw.base_url}/responses/{r0['id']}", timeout=10).json()["deleted"]
    r2 = done(client.turn({"type": "response.create", **base, "previous_response_id": r1["id"],
                           "input": [user("and then")]}))
    client.close()
    assert r2["output"][-1]["content"][0]["text"] == "You said: and then"
    whole = requests.post(gw.base_url + "/responses", timeout=30, json={
        **base, "input": [{"type": "message", "role": "user", "content": "kept"}, reasoning, message, user("next"),
                          *r1["output"], user("and then")]})
    assert parse_sse(whole.content)[-1]["type"] == "response.completed"
    bodies = logged_bodies(gw.request_log)
    assert len(bodies) == 5 and bodies[1] == bodies[2] and bodies[3] == bodies[4]
    sent = json.loads(bodies[3])["messages"]
    assert sent[0] == {"role": "user", "content": "kept"} and sent[1]["reasoning_content"] == "Thinking about: kept"


def test_warm_up_is_answered_without_the_backend_and_then_continued(gw, upstream):
    upstream.clear()
    client = WSClient(gw.base_url)
    warm = client.turn({"type": "response.create", "model": "demo-model", "input": [user("hello")], "generate": False})
    assert [e["type"] for e in warm] == ["response.created", "response.in_progress", "response.completed"]
    assert warm[-1]["response"]["output"] == [] and upstream.requests() == []
    real = done(client.turn({"type": "response.create", "model": "demo-model", "input": [],
                             "previous_response_id": warm[-1]["response"]["id"]}))
    assert real["output"][-1]["content"][0]["text"] == "You said: hello"
    assert [m["content"] for m in upstream.requests()[0]["messages"]] == ["hello"]
    client.close()


def test_a_warm_up_is_a_request_against_its_clients_limits(upstream, gateway_factory, tmp_path):
    """A warm-up asks no backend, but the socket remembers what it carries: it is a request like
    any (one rpm token, the HTTP rule), open only while it is answered (max_streams 1: warm-ups
    in a row are all admitted). Before, no limit counted warm-ups: a client at its rpm went on
    adding to what its socket held. Refused, a message is not read: one carrying an mcp tool's
    secret keeps it out of the flow file as a refused turn does. The refusal says when to try
    again (``headers``, as the HTTP 429 has them; before, a socket's error carried no wait)."""
    key = "carol-key-0123456789abcdef"
    flows = tmp_path / "ws.mitm"
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", "-w", str(flows), env={
        "RESP2CHAT_CLIENTS": json.dumps([{"name": "carol", "key": key, "rpm": 2, "max_streams": 1}])})
    auth = {"authorization": f"Bearer {key}"}
    client = WSClient(gw.base_url, headers=auth)
    warm = {"type": "response.create", "model": "demo-model", "input": [user("hello")], "generate": False}
    assert done(client.turn(warm))["status"] == "completed"
    assert done(client.turn(warm))["status"] == "completed"
    refused = client.turn(warm)[-1]  # (the third request of the minute)
    assert refused["type"] == "error" and refused["status"] == 429, refused["type"]
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert "rpm" in refused["error"]["message"]
    # the wait as the HTTP 429's headers say it, where Codex reads a socket's error (status and
    # headers: codex-rs responses_websocket.rs, WrappedWebsocketErrorEvent), and in OpenAI's words
    wait = refused.get("headers") or {}
    assert 1 <= int(wait.get("retry-after", 0)) <= 30 and int(wait["retry-after-ms"]) > 0, refused
    assert refused["error"]["message"].endswith(f"Please try again in {wait['retry-after']}s."), refused
    secret = "mcp-secret-token-9d41c7"
    tool = {"type": "mcp", "server_label": "ev", "server_url": "https://mcp.example/sse",
            "headers": {"authorization": f"Bearer {secret}"}, "require_approval": "never"}
    [refused] = client.turn({**warm, "tools": [tool]})
    assert refused["status"] == 429
    client.close()
    # the same bucket as HTTP: the client's turn there is refused too
    r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "hi"}, headers=auth, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    gw.stop()
    [flow] = [f for f in read_flows(flows) if f.websocket]
    assert secret.encode() not in flows.read_bytes()
    assert [t["status"] for t in flow.metadata["resp2chat"]["turns"]] == ["completed", "completed", "rejected",
                                                                          "rejected"]


def test_a_client_past_its_max_sockets_is_refused_the_upgrade_until_one_closes(upstream, gateway_factory):
    """Each socket holds up to max_request_body_mb (and its flow's records): a client's
    max_sockets bounds how many it holds open at once on the replica. The next upgrade is a 429
    rate_limit_exceeded with retry-after, before the relay takes it (no socket); the client's
    HTTP turns and other clients' sockets go on; a socket closed (or dropped) frees its slot.
    Before, sockets were not counted at all."""
    carol, alice = "carol-key-0123456789abcdef", "alice-key-0123456789abcdef"
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0", env={
        "RESP2CHAT_CLIENTS": json.dumps([{"name": "carol", "key": carol, "max_sockets": 2},
                                         {"name": "alice", "key": alice}])})
    auth = {"authorization": f"Bearer {carol}"}
    first, second = WSClient(gw.base_url, headers=auth), WSClient(gw.base_url, headers=auth)
    hi = {"type": "response.create", "model": "demo-model", "input": "hello"}
    assert done(second.turn(hi))["output"][-1]["content"][0]["text"] == "You said: hello"
    refused = refused_upgrade(gw.base_url, auth)
    assert refused.status == 429, refused
    error = json.loads(refused.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "max_sockets 2" in error["message"], error
    assert refused.headers["retry-after"] == "1" and refused.headers["retry-after-ms"] == "1000"
    assert refused.headers["x-request-id"].startswith("req_")
    # the refusal is the client's alone: its HTTP turns, another client's socket, its own open ones
    r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "over http"}, headers=auth,
                      timeout=30)
    assert r.status_code == 200, r.text
    other = WSClient(gw.base_url, headers={"authorization": f"Bearer {alice}"})
    assert done(other.turn(hi))["status"] == "completed"
    assert done(first.turn(hi))["status"] == "completed"
    first.close()  # closed: its slot is free again
    third = opened(gw.base_url, auth)
    assert done(third.turn(hi))["status"] == "completed"
    assert refused_upgrade(gw.base_url, auth).status == 429
    third.sock.close()  # dropped without a close frame (the client gone): its slot is free too
    fourth = opened(gw.base_url, auth)
    assert refused_upgrade(gw.base_url, auth).status == 429
    for sock in (second, fourth, other):
        sock.close()


def test_the_gateway_bounds_its_open_sockets_keyless_too(upstream, gateway_factory):
    """max_websockets bounds the sockets open on the gateway, all clients together, a keyless
    gateway's too (anyone could open them): past it an upgrade is a 503 server_overloaded with
    retry-after (the replica is full, not this client's doing), and HTTP is still served."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         "--set", "resp2chat_max_websockets=2")
    a, b = WSClient(gw.base_url), WSClient(gw.base_url)
    refused = refused_upgrade(gw.base_url)
    assert refused.status == 503, refused
    error = json.loads(refused.body)["error"]
    assert error["code"] == "server_overloaded" and error["type"] == "server_error", error
    assert "max_websockets 2" in error["message"] and refused.headers["retry-after"] == "1"
    r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "over http"}, timeout=30)
    assert r.status_code == 200, r.text
    hi = {"type": "response.create", "model": "demo-model", "input": "hello"}
    assert done(a.turn(hi))["status"] == "completed"
    b.close()
    c = opened(gw.base_url)
    assert done(c.turn(hi))["status"] == "completed"
    assert refused_upgrade(gw.base_url).status == 503
    for sock in (a, c):
        sock.close()


@pytest.mark.parametrize("failing,status", [
    ({"input": [user("error: 500 the backend broke")]}, "failed"),  # the turn fails (the backend's 5xx)
    ({"input": [user("again")], "max_output_tokens": 1}, 400),  # the continuation is refused
])
def test_a_failed_continuation_evicts_what_it_continued(gw, upstream, failing, status):
    """The spec's rule: a continuation that fails drops its previous_response_id from the
    connection's memory; continuing from it again is previous_response_not_found."""
    client = WSClient(gw.base_url)
    base = {"type": "response.create", "model": "demo-model", "store": False}
    r1 = done(client.turn({**base, "input": [user("hello")]}))
    r2 = done(client.turn({**base, "previous_response_id": r1["id"], "input": [user("fine")]}))
    [*_, end] = client.turn({**base, "previous_response_id": r2["id"], **failing})
    if status == "failed":
        assert end["type"] == "response.failed", end
    else:
        assert end["type"] == "error" and end["status"] == status, end
    [error] = client.turn({**base, "previous_response_id": r2["id"], "input": [user("once more")]})
    assert error["type"] == "error" and error["error"]["code"] == "previous_response_not_found", error
    # what the connection remembers besides is still there
    again = done(client.turn({**base, "previous_response_id": r1["id"], "input": [user("from the first")]}))
    assert again["output"][-1]["content"][0]["text"] == "You said: from the first"
    client.close()


def test_a_response_deleted_over_http_is_not_continued_from_the_sockets_memory(gw, upstream):
    """A socket remembers what it answered (no store read per turn); a stored response deleted
    over HTTP meanwhile is gone for it too: continuing it is previous_response_not_found, as over
    HTTP. One never stored (store: false) is continued from the memory alone."""
    client = WSClient(gw.base_url)
    base = {"type": "response.create", "model": "demo-model"}
    kept = done(client.turn({**base, "store": True, "input": [user("keep this")]}))
    unstored = done(client.turn({**base, "store": False, "input": [user("not stored")]}))
    assert requests.delete(f"{gw.base_url}/responses/{kept['id']}", timeout=10).json()["deleted"]
    over_http = requests.post(gw.base_url + "/responses", timeout=30, json={
        "model": "demo-model", "previous_response_id": kept["id"], "input": "go on"})
    assert over_http.status_code == 400 and over_http.json()["error"]["code"] == "previous_response_not_found"
    [error] = client.turn({**base, "previous_response_id": kept["id"], "input": [user("go on")]})
    assert error["type"] == "error" and error["error"]["code"] == "previous_response_not_found", error
    assert error["status"] == 400
    upstream.clear()
    later = done(client.turn({**base, "store": False, "previous_response_id": unstored["id"], "input": [user("more")]}))
    assert later["output"][-1]["content"][0]["text"] == "You said: more"
    assert [m["content"] for m in upstream.requests()[-1]["messages"] if m["role"] == "user"] == ["not stored", "more"]
    client.close()


def test_bad_messages_get_an_error_and_the_socket_stays_usable(gw, upstream):
    client = WSClient(gw.base_url)
    cases = [
        ("not json", "invalid_json", None),
        ({"type": "response.cancel"}, "unsupported_message_type", "type"),
        ({"type": "response.create", "model": "demo-model", "input": [{"type": "nonsense"}]}, "unsupported_item_type",
         "input[0].type"),
        ({"type": "response.create", "model": "demo-model", "input": "x", "previous_response_id": "resp_gone"},
         "previous_response_not_found", "previous_response_id"),
        ({"type": "response.create", "model": "demo-model",
          "input": [{"type": "compaction", "encrypted_content": "r2c1.forged"}, user("go on")]},
         "invalid_encrypted_content", "input[0].encrypted_content"),
    ]
    for message, code, param in cases:
        [error] = client.turn(message)
        assert error["type"] == "error" and error["status"] == 400, error
        assert error["error"]["code"] == code and error["error"]["param"] == param
    client.send({"type": "response.processed", "response_id": "resp_x"})  # an acknowledgement: no answer
    client.ping()
    ok = done(client.turn({"type": "response.create", "model": "demo-model", "input": "still here?"}))
    assert ok["output"][-1]["content"][0]["text"] == "You said: still here?"
    client.close()


def test_a_message_is_read_as_strictly_as_an_http_body(gw, upstream):
    """Non-finite and huge numbers, lone surrogates, invalid UTF-8 (a binary message): the HTTP
    path's 400, byte offsets included, and nothing reaches the backend; the socket goes on."""
    upstream.clear()
    client = WSClient(gw.base_url)
    bodies = [b'{"model":"demo-model","input":"x","temperature":NaN', b'{"model":"demo-model","input":"x","top_p":Infinity',
              b'{"model":"demo-model","input":"x","temperature":1e999', b'{"model":"demo-model","input":"x","seed":' + b"9" * 5000,
              b'{"model":"demo-model","input":"lone \\ud800 here"', b'{"model":"demo-model","input":"\\udc00\\ud800"',
              b'{"model":"demo-model","input":"caf\xc3 \xed\xa0\x80"']
    for body in bodies:
        http_error = requests.post(gw.base_url + "/responses", data=body + b"}", timeout=30,
                                   headers={"content-type": "application/json"})
        assert http_error.status_code == 400, body
        message = body + b',"type":"response.create"}'  # the same offsets: the transport's member comes last
        if b"\xc3" in body or b"\xed" in body:
            client.sock.sendall(client.ws.send(E.BytesMessage(data=message)))  # not UTF-8: only binary can carry it
            error = client.events()[0]
        else:
            [error] = client.turn(message.decode())
        assert error == {"type": "error", "status": 400, **http_error.json()}, body
        assert error["error"]["code"] == "invalid_json"
    assert "byte offset" in error["error"]["message"]
    assert upstream.requests() == []
    client.sock.sendall(client.ws.send(E.BytesMessage(data=json.dumps(
        {"type": "response.create", "model": "demo-model", "input": "binary is fine"}).encode())))
    assert done(client.events())["output"][-1]["content"][0]["text"] == "You said: binary is fine"
    client.close()


def test_a_client_that_leaves_mid_turn_is_recorded_and_the_gateway_goes_on(gw, upstream, tmp_path):
    client = WSClient(gw.base_url)
    client.send({"type": "response.create", "model": "demo-model", "input": "words: 40\nnoreason\nslow: 200"})
    while client.next_message()["type"] != "response.output_text.delta":
        pass  # the answer is streaming, one word every 200 ms
    client.sock.close()  # gone, without a close frame
    again = WSClient(gw.base_url)
    assert done(again.turn({"type": "response.create", "model": "demo-model", "input": "still serving?"}))
    again.close()
    gw.stop()
    recorded = [f.metadata["resp2chat"]["turns"] for f in read_flows(gw.flows) if f.websocket is not None]
    assert [[t["status"] for t in turns] for turns in recorded] == [["unfinished"], ["completed"]]
    words = [e for e in parse_sse(recorded[0][0]["events"].encode()) if e["type"] == "response.output_text.delta"]
    assert 0 < len(words) < 40  # recorded as far as it went


def test_a_message_over_the_body_limit_is_refused(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=1")
    client = WSClient(gw.base_url)
    [error] = client.turn({"type": "response.create", "model": "demo-model", "input": "x" * (1 << 20)})
    assert error["status"] == 413 and error["error"]["code"] == "request_too_large"
    assert done(client.turn({"type": "response.create", "model": "demo-model", "input": "small"}))
    client.close()


def test_a_bug_of_ours_ends_the_message_with_an_error_and_the_socket_goes_on(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "-s", str(Path(__file__).with_name("ws_fault.py")))
    client = WSClient(gw.base_url)
    [error] = client.turn({"type": "response.create", "model": "demo-model", "input": "raise a bug"})
    message = error["error"].pop("message")
    assert error == {"type": "error", "status": 500, "error": {"type": "server_error", "param": None, "code": "server_error"}}
    rid = re.fullmatch(r"the gateway failed to handle this message \(request id (req_[0-9a-f]{20}_1)\)", message)[1]
    assert "injected" not in message
    assert done(client.turn({"type": "response.create", "model": "demo-model", "input": "and now?"}))
    client.close()
    # the details go to the log, under the id the client was given, not to the client
    assert re.search(f"websocket message {rid} failed: RuntimeError: a bug injected by tests/ws_fault.py", gw.log())


def test_upstream_failure_is_response_failed_on_the_socket(gw):
    client = WSClient(gw.base_url)
    events = client.turn({"type": "response.create", "model": "demo-model", "input": "error: 500 boom"})
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["code"] == "server_error"
    assert done(client.turn({"type": "response.create", "model": "demo-model", "input": "again"}))
    client.close()


def test_the_socket_is_recorded_in_the_flow_file(gw, upstream):
    client = WSClient(gw.base_url, headers={"authorization": "Bearer sk-client-secret-123456"})
    first = client.turn({"type": "response.create", "model": "demo-model", "input": "one", "generate": False})
    second = client.turn({"type": "response.create", "model": "demo-model", "input": "two",
                          "previous_response_id": first[-1]["response"]["id"]})
    client.turn("oops")
    client.close()
    gw.stop()
    [flow] = [f for f in read_flows(gw.flows) if f.websocket is not None]
    assert flow.request.path == "/v1/responses" and flow.response.status_code == 101
    assert not [h for h in flow.request.headers if h.lower().startswith("x-resp2chat")]
    assert b"sk-client-secret" not in gw.flows.read_bytes()
    sent = [json.loads(m.content) for m in flow.websocket.messages if not m.from_client]
    assert sent == first + second + [{"type": "error", "status": 400, "error": sent[-1]["error"]}]
    meta = flow.metadata["resp2chat"]
    assert meta["transport"] == "websocket"
    warm, turn, rejected = meta["turns"]
    assert warm["warmup"] and "upstream_sse" not in warm and rejected["status"] == "rejected"
    assert turn["status"] == "completed" and turn["response_id"] == second[-1]["response"]["id"]
    assert (turn["upstream"], turn["upstream_name"]) == (upstream.base_url, "default") and "upstream" not in meta
    assert turn["chat_request"].encode() == logged_bodies(gw.request_log)[0]
    assert "chat.completion.chunk" in turn["upstream_sse"]
    assert [e["type"] for e in parse_sse(turn["events"].encode())] == [e["type"] for e in second]
    assert flow.comment.startswith("WebSocket /v1/responses · 3 messages (1 warm-up, 1 completed, 1 rejected)")
    # mitmweb: each message readable, a client's beside the chat request the backend got for it
    from mitmproxy import contentviews
    from mitmproxy.test import taddons

    from resp2chat_io import views

    views.register()
    client_messages = [m for m in flow.websocket.messages if m.from_client]
    with taddons.context():
        warm, real, bad = (contentviews.prettify_message(m, flow) for m in client_messages)
        last = contentviews.prettify_message([m for m in flow.websocket.messages if not m.from_client][-2], flow)
    assert warm.view_name == real.view_name == last.view_name == "resp2chat message"
    assert "a warm-up" in warm.text and "chat request" not in warm.text
    assert "continuing resp_" in real.text and "== chat request (to the backend) ==" in real.text and "two" in real.text
    assert "refused: invalid_json" in bad.text
    assert "response.completed  status=completed" in last.text


def test_a_sockets_record_budget_counts_the_compaction_items_it_keeps(gateway_factory, tmp_path):
    """A turn that compacts keeps its sealed compaction item in its record's ``gateway_events``
    (``Compacted.item``: the summary, sealed, a third larger). Turns whose summaries are large
    (~3 MiB each: an item of ~4.5 MB) fill the socket's record budget (RECORD_BUDGET, 64 MiB);
    what the flow keeps of its turn records stays within it, their items counted. Before, the
    budget counted a record's text only, not that item: the records kept held 71.9 MiB."""
    from resp2chat_io.addons.websocket import RECORD_BUDGET
    from test_server_compaction import HISTORY, OVER, _LongSummary

    flows = tmp_path / "flows.mitm"
    handler = type("Long", (_LongSummary,), {"size": (7 << 20) // 2, "calls": []})
    with LocalServer(handler) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0", "-w", str(flows))
        client = WSClient(gw.base_url, timeout=120)
        for _ in range(6):
            end = client.turn({"type": "response.create", "model": "demo-model", "input": HISTORY, "store": False,
                               "context_management": OVER})[-1]
            assert end["type"] == "response.completed", end
            assert [o["type"] for o in end["response"]["output"]][0] == "compaction"
        client.close()
        gw.stop()
    [flow] = [f for f in read_flows(flows) if f.websocket is not None]
    records = flow.metadata["resp2chat"]["turns"]
    assert [r["status"] for r in records] == ["completed"] * 6
    kept = [r for r in records if not r.get("truncated")]
    assert 0 < len(kept) < 6, "the budget is reached: the later turns are kept without their bodies"
    assert all(r.get("truncated") for r in records[len(kept):])  # (the first ones kept, in order)
    [item] = [fields["item"] for _, name, fields in kept[0]["gateway_events"] if name == "Compacted"]
    assert len(item["encrypted_content"]) > 4 << 20  # (what the budget has to count)
    size = sum(len(json.dumps(r, ensure_ascii=False)) for r in kept)
    assert size <= RECORD_BUDGET + 1024 * len(kept), f"the records kept hold {size / (1 << 20):.1f} MiB"


@pytest.mark.parametrize("extra", ["kill", "404"])
def test_server_replay_extra_keeps_the_socket_open(upstream, gateway_factory, tmp_path, extra):
    """--server-replay with server_replay_extra kill (or a status): the upgrade is the gateway's
    own, not an unrecorded request: the socket opens, recorded turns are answered, an unrecorded
    one gets the extra's error message; other unrecorded requests still get the extra."""
    path = tmp_path / "recorded.mitm"
    live = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0")
    assert requests.get(live.base_url + "/models", timeout=10).ok  # a flow that is no turn: mitmproxy replays it
    client = WSClient(live.base_url)
    recorded = done(client.turn({"type": "response.create", "model": "demo-model", "input": "replay me"}))
    client.close()
    live.stop()
    offline = gateway_factory("http://127.0.0.1:9", "--server-replay", str(path),
                              "--set", f"server_replay_extra={extra}", "--set", "server_replay_reuse=true")
    for _ in range(2):  # (a second socket: what the first left in mitmproxy's server replay does not matter)
        client = WSClient(offline.base_url)
        again = done(client.turn({"type": "response.create", "model": "demo-model", "input": "replay me"}))
        assert again["output"] == recorded["output"]
        [missing] = client.turn({"type": "response.create", "model": "demo-model", "input": "never recorded"})
        assert missing["status"] == (502 if extra == "kill" else 404) and missing["error"]["code"] == "not_recorded"
        assert done(client.turn({"type": "response.create", "model": "demo-model", "input": "replay me"}))
        client.close()
    assert requests.get(offline.base_url + "/models", timeout=10).json()["data"]  # replayed by mitmproxy
    if extra == "kill":
        with pytest.raises(requests.ConnectionError):
            requests.post(offline.base_url + "/responses", json={"model": "demo-model", "input": "nope"}, timeout=10)
    else:
        assert requests.post(offline.base_url + "/responses", json={"model": "demo-model", "input": "nope"},
                             timeout=10).status_code == 404
    # an unrecorded request that is no turn: mitmproxy's server replay applies the extra, and says so
    if extra == "kill":
        with pytest.raises(requests.ConnectionError):
            requests.get(offline.base_url + "/models?unrecorded=1", timeout=10)
    else:
        assert requests.get(offline.base_url + "/models?unrecorded=1", timeout=10).status_code == 404
    offline.stop()
    misses = [line for line in offline.log().splitlines() if "non-replay request" in line]
    assert misses and not [line for line in misses if line.rstrip().endswith("/v1/responses")], misses


def test_a_replayed_socket_turn_ends_as_an_http_one(upstream, gateway_factory, tmp_path):
    """A turn answered from --server-replay on the socket ends as one over HTTP does (one ending:
    Turns.replayed): its client's open turn is given back (max_streams=1: a socket whose replayed
    turns kept theirs refused the next with 429), an unrecorded one's too; the store keeps the
    answer (another socket continues it); the access log counts it once, ``replayed``."""
    key = "carol-key-0123456789abcdef"
    carol = ["--set", "resp2chat_clients=" + json.dumps([{"name": "carol", "key": key, "max_streams": 1}])]
    auth = {"authorization": f"Bearer {key}"}
    path, log_path = tmp_path / "recorded.mitm", tmp_path / "access.jsonl"
    live = gateway_factory(upstream.origin, "-w", str(path), "--set", "resp2chat_max_replay_entries=0", *carol)
    client = WSClient(live.base_url, headers=auth)
    recorded = done(client.turn({"type": "response.create", "model": "demo-model", "input": "replay me"}))
    client.close()
    live.stop()
    offline = gateway_factory("http://127.0.0.1:9", "--server-replay", str(path), "--set", "server_replay_reuse=true",
                              "--set", "server_replay_extra=404", "--set", f"resp2chat_access_log_path={log_path}",
                              *carol)
    client = WSClient(offline.base_url, headers=auth)
    again = [done(client.turn({"type": "response.create", "model": "demo-model", "input": "replay me"}))
             for _ in range(2)]
    [missing] = client.turn({"type": "response.create", "model": "demo-model", "input": "never recorded"})
    assert missing["status"] == 404 and missing["error"]["code"] == "not_recorded"
    again.append(done(client.turn({"type": "response.create", "model": "demo-model", "input": "replay me"})))
    client.close()
    assert [a["output"] for a in again] == [recorded["output"]] * 3
    # a new socket (no memory of its own) continues it from the store: past the lookup, no
    # recording (not previous_response_not_found)
    client = WSClient(offline.base_url, headers=auth)
    [follow] = client.turn({"type": "response.create", "model": "demo-model", "input": "next",
                            "previous_response_id": recorded["id"]})
    client.close()
    assert follow["error"]["code"] == "not_recorded", follow
    offline.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(x["status"], x["upstream"], x["client"]) for x in lines] == [
        ("replayed", "server-replay", "carol")] * 2 + [("rejected", "", "carol"), ("replayed", "server-replay", "carol"),
                                                       ("rejected", "", "carol")]


# --- refusals: never a GET to the backend ---------------------------------------------------


class Recorder(QuietHandler):
    seen: list = []

    def do_GET(self):
        Recorder.seen.append(self.path)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


@pytest.fixture
def recorder():
    Recorder.seen = []
    with LocalServer(Recorder) as server:
        yield server.url


def test_upgrades_the_gateway_does_not_serve_are_refused_at_once(recorder, gateway_factory):
    off = gateway_factory(recorder, "--set", "resp2chat_responses_websocket=false")
    with pytest.raises(Refused) as err:
        WSClient(off.base_url)
    assert err.value.status == 426 and json.loads(err.value.body)["error"]["code"] == "websocket_disabled"
    on = gateway_factory(recorder)
    with pytest.raises(Refused) as err:
        WSClient(on.base_url, path="/models")
    assert err.value.status == 404 and json.loads(err.value.body)["error"]["code"] == "websocket_not_supported"
    plain = requests.get(on.base_url + "/responses", timeout=10)
    assert plain.status_code == 405 and plain.headers["allow"] == "POST"
    # each refusal names its request, as every other refusal of the gateway does
    upgrade = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
               "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    no_key = {k: v for k, v in upgrade.items() if k != "sec-websocket-key"}
    for gw, path, headers, status in ((off, "/responses", upgrade, 426), (on, "/models", upgrade, 404),
                                      (on, "/responses", no_key, 400), (on, "/responses", {}, 405)):
        r = requests.get(gw.base_url + path, headers=headers, timeout=10)
        assert r.status_code == status and r.headers.get("x-request-id", "").startswith("req_"), (status, r.headers)
        assert r.json()["error"]["code"]
    assert requests.get(on.base_url + "/models", timeout=10).status_code == 200  # other GETs still go upstream
    assert Recorder.seen == ["/v1/models"]
