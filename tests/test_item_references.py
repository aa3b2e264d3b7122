"""item_reference: items of stored responses found by id (the store's index, through mitmdump,
after replay-cache hits and restarts); and the core's input expansion (inputs.py)."""

from __future__ import annotations


import openai
import pytest
from hypothesis import given, settings, strategies as st
import requests

from resp2chat_core import inputs
from resp2chat_core.errors import GatewayError
from resp2chat_core.seal import Sealer
from resp2chat_core.turn import Found, conversation
from resp2chat_io.store import ResponseStore

from helpers import Clock, parse_sse, post_turn


def conv(n: int) -> list[dict]:
    return [{"role": "user", "content": f"q{n}"},
            {"id": f"rs_{n}", "type": "reasoning", "summary": [{"type": "summary_text", "text": f"r{n}"}]},
            {"id": f"msg_{n}", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": f"a{n}", "annotations": []}]}]


def made(n: int) -> dict:
    """The Response of turn ``n`` of ``conv``: its output, the items the gateway produced."""
    return {"id": f"resp_{n:08d}", "output": conv(n)[1:]}


# --- the store's index -----------------------------------------------------------------------


async def test_items_live_and_die_with_their_response():
    clock = Clock()
    store = ResponseStore(ttl=60, max_entries=2, max_bytes=1 << 20, clock=clock)
    await store.put("resp_00000001", conv(1), made(1))
    assert await store.items(["msg_1", "rs_1", "nope"]) == {"msg_1": conv(1)[2], "rs_1": conv(1)[1]}
    await store.delete("resp_00000001")
    assert await store.items(["msg_1"]) == {}
    await store.put("resp_00000002", conv(2), made(2))
    await store.put("resp_00000003", conv(3), made(3))
    await store.put("resp_00000004", conv(4), made(4))  # max_entries=2: response 2 and its items go
    assert (await store.items(["msg_2", "msg_3", "msg_4"])).keys() == {"msg_3", "msg_4"}
    clock.now += 61  # expired: their items with them
    assert await store.items(["msg_3", "msg_4"]) == {}
    assert store._items == {} and store._item_ids == {}


async def test_an_item_held_by_two_responses_outlives_the_first():
    store = ResponseStore(ttl=1e9, max_entries=10, max_bytes=1 << 20, clock=Clock())
    await store.put("resp_00000001", conv(1), made(1))
    await store.put("resp_00000002", conv(1) + conv(2), made(2))  # continued with previous_response_id
    await store.delete("resp_00000001")
    assert (await store.items(["rs_1", "msg_2"])).keys() == {"rs_1", "msg_2"}
    await store.delete("resp_00000002")
    assert await store.items(["rs_1"]) == {} and store._items == {}


async def test_the_index_is_rebuilt_from_disk(tmp_path):
    d = str(tmp_path / "store")
    await ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=d).put("resp_00000001", conv(1), made(1))
    again = ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=d)
    assert await again.items(["msg_1"]) == {"msg_1": conv(1)[2]}


# --- inputs.expand (pure) ----------------------------------------------------------------------


def test_expand_resolves_references_and_names_the_index_of_a_missing_one():
    stored = {i["id"]: i for i in conv(1) if "id" in i}
    raw = {"model": "m", "input": [{"type": "item_reference", "id": "rs_1"}, {"id": "msg_1"},
                                   {"role": "user", "content": "next"}]}
    _, items = inputs.expand(raw, raw["input"], lambda ids: {i: stored[i] for i in ids if i in stored})
    assert items == [stored["rs_1"], stored["msg_1"], {"role": "user", "content": "next"}]
    raw["input"].insert(1, {"type": "item_reference", "id": "msg_gone"})
    with pytest.raises(GatewayError) as err:
        inputs.expand(raw, raw["input"], lambda ids: {i: stored[i] for i in ids if i in stored})
    assert (err.value.code, err.value.param) == ("item_not_found", "input[1].id")
    for bad in (None, "", 7):
        with pytest.raises(GatewayError) as err:
            inputs.expand(raw, [{"role": "user", "content": "x"}, {"type": "item_reference", "id": bad}], None)
        assert (err.value.code, err.value.param) == ("invalid_value", "input[1].id")


def test_expand_merges_additional_tools():
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    more = {"type": "function", "name": "g", "parameters": {"type": "object"}}
    raw = {"model": "m", "tools": [tool], "input": [
        {"type": "additional_tools", "role": "developer", "tools": [more]}, {"role": "user", "content": "x"}]}
    out, _ = inputs.expand(raw, raw["input"])
    assert out["tools"] == [tool, more] and raw["tools"] == [tool]


def test_expand_makes_the_whole_conversation_whole():
    """The history in front of the input (previous_response_id) is expanded like the input: its
    additional tools first, in conversation order; a bad item of it is named by its place there."""
    sealer = Sealer(lambda: b"k" * 32)
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    more = {"type": "function", "name": "g", "parameters": {"type": "object"}}
    earlier = [{"type": "additional_tools", "role": "developer", "tools": [tool]},
               {"role": "user", "content": "x"},
               {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "shown"}],
                "encrypted_content": sealer.seal(inputs.REASONING_PURPOSE, "thought")}]
    new = [{"type": "additional_tools", "role": "developer", "tools": [more]}, {"role": "user", "content": "y"}]
    raw = {"model": "m", "input": new}
    out, items = inputs.expand(raw, new, None, sealer, earlier)
    assert out["tools"] == [tool, more] and out["input"] == items and len(items) == 5
    assert items[2]["content"] == [{"type": "reasoning_text", "text": "thought"}] and "encrypted_content" not in items[2]
    assert earlier[2]["encrypted_content"]  # the stored history itself is left as it was
    plain, whole = inputs.expand({"model": "m", "input": new[1:]}, new[1:], None, sealer, [{"role": "user", "content": "x"}])
    assert whole == plain["input"] == [{"role": "user", "content": "x"}, new[1]]  # (the common case: one pass)
    other = Sealer(lambda: b"o" * 32)
    with pytest.raises(GatewayError) as err:
        inputs.expand(raw, new, None, other, earlier)
    assert (err.value.code, err.value.param) == ("invalid_encrypted_content", "previous_response_id")
    assert "item 2 of the conversation previous_response_id continues" in err.value.message
    with pytest.raises(GatewayError) as err:
        inputs.expand(raw, [{"type": "item_reference", "id": "gone"}], lambda ids: {}, sealer, earlier)
    assert (err.value.code, err.value.param) == ("item_not_found", "input[0].id")  # the client's own index


def test_item_facts_of_a_history_walked_before_are_those_of_a_fresh_walk():
    """inputs.ItemFacts: a list that goes on from one walked before (its first items the same
    objects) is walked only past it, and its facts are those a fresh walk finds; a list whose
    history changed (an item replaced, one inserted, one equal but another object) is not
    mistaken for the one before."""
    def fresh(items):
        return inputs.ItemFacts().of(items)

    memo = inputs.ItemFacts(runs=2)
    history = [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}] * inputs.ItemFacts.MIN_ITEMS
    for n in range(1, 6):
        history = history + conv(n) + [{"type": "item_reference", "id": f"msg_{n}"}]
        assert memo.of(history) == fresh(history)
    assert memo.of(history) == memo.of(list(history)) == fresh(history)
    assert fresh(history).work and fresh(history).refs[-1] == (len(history) - 1, "msg_5")
    for changed in ([*history[:3], {"type": "compaction", "encrypted_content": "x"}, *history[4:]],
                    [*history[:3], {"type": "additional_tools", "tools": []}, *history[3:]],
                    [{"role": "user", "content": [{"type": "input_text", "text": "q"}, {"type": "input_text",
                                                                                          "text": "r"}]},
                     *history[1:]],
                    [dict(i) for i in history] + [{"type": "compaction_trigger"}]):
        assert memo.of(changed) == fresh(changed)
        assert memo.of(changed + [{"id": "x"}]) == fresh(changed + [{"id": "x"}])
    assert fresh(history[:3] + [{"type": "compaction", "encrypted_content": "x"}]).compaction == (3,)
    assert 0 < len(memo._runs) <= 2


def test_an_item_id_the_turns_conversation_would_hold_twice_is_refused_naming_it():
    """turn.conversation (begin_turn, either transport): an id given twice in the input, a
    reference to an item the input (or the conversation it goes on) already holds, or an id that
    conversation holds, is conversations.unique's 400 naming the client's index; ids null or empty
    are none, and a history that already held an id twice (stored before this rule) is not the
    turn's. A long history walked before (inputs.FACTS, extended) finds them as a fresh walk."""
    def said(item_id, text="x"):
        return {"type": "message", "role": "user", "content": text, **({"id": item_id} if item_id is not None else {})}

    def refused(raw, found=Found()):
        with pytest.raises(GatewayError) as err:
            conversation({"model": "m", **raw}, found)
        assert (err.value.status, err.value.code) == (400, "invalid_value")
        return err.value.param, err.value.message

    ref = {"type": "item_reference", "id": "msg_1"}
    found = Found(items={"msg_1": conv(1)[2]})
    assert refused({"input": [said("a"), said(None), said("a")]})[0] == "input[2].id"
    assert refused({"input": [ref, said(None), ref]}, found)[0] == "input[2].id"
    assert refused({"input": [conv(1)[2], ref]}, found)[0] == "input[1].id"
    param, message = refused({"input": [said("b"), said("a")], "conversation": "conv_1"},
                             Found(earlier=[said("a"), said("c")]))
    assert param == "input[1].id" and "duplicate item found with id 'a'" in message and "the conversation holds" in message
    param, message = refused({"input": [ref], "previous_response_id": "resp_1"}, Found(conv(1), found.items))
    assert param == "input[0].id" and "previous_response_id" in message
    for raw, found_, n in (({"input": [said(None), said(""), said(""), {**said(None), "id": None}, ref]}, found, 5),
                           ({"input": [said("d")], "conversation": "conv_1"}, Found(earlier=[said("a"), said("a")]), 3),
                           ({"input": "a", "conversation": "conv_1"}, Found(earlier=[said("a")]), 2)):
        assert len(conversation({"model": "m", **raw}, found_)[1]) == n  # (taken)
    history = [said(f"msg_h{i}") for i in range(inputs.ItemFacts.MIN_ITEMS * 2)]
    conversation({"model": "m", "input": history}, Found())  # (walked: the next list goes on from it)
    assert refused({"input": history + [said(None), said("msg_h3")]})[0] == f"input[{len(history) + 1}].id"
    assert inputs.facts(history + [said(None), said("msg_h3")]).twice == (len(history) + 1,)


# --- through a real mitmdump -------------------------------------------------------------------


def test_references_to_outputs_resolve_like_the_items_and_inputs_do_not(client, upstream):
    """Only what the gateway produced is found by id: an id a client gave its own input names
    nothing (tests/test_security_state.py: another client could redefine it)."""
    first = client.responses.create(model="demo-model", input=[
        {"type": "message", "id": "msg_client_0001", "role": "user", "content": "first question"}])
    reasoning, message = first.output
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-model", input=[{"type": "item_reference", "id": "msg_client_0001"}])
    assert (err.value.code, err.value.param) == ("item_not_found", "input[0].id")
    upstream.clear()
    second = client.responses.create(model="demo-model", input=[
        {"role": "user", "content": "first question"},
        {"type": "item_reference", "id": reasoning.id},
        {"type": "item_reference", "id": message.id},
        {"role": "user", "content": "second question"}])
    assert second.output_text == "You said: second question"
    sent = upstream.requests()[-1]["messages"]
    assert sent == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "You said: first question", "reasoning_content": "Thinking about: first question"},
        {"role": "user", "content": "second question"}]


def test_unknown_and_deleted_references_are_400_naming_the_index(client, gateway):
    first = client.responses.create(model="demo-model", input="to be deleted")
    body = {"model": "demo-model", "store": False, "input": [{"role": "user", "content": "x"},
                                             {"type": "item_reference", "id": first.output[-1].id}]}
    assert requests.post(gateway.base_url + "/responses", json=body, timeout=30).status_code == 200
    client.responses.delete(first.id)  # (store: false above: no other response holds the item)
    r = requests.post(gateway.base_url + "/responses", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "item_not_found" and r.json()["error"]["param"] == "input[1].id"
    body["input"][1] = {"type": "item_reference", "id": ["not", "an", "id"]}
    r = requests.post(gateway.base_url + "/responses", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].id"


def test_references_after_a_replay_cache_hit_and_a_restart(upstream, gateway_factory, tmp_path):
    store = tmp_path / "responses"
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_session_store_dir={store}")
    ask = {"model": "demo-model", "input": "cached question", "stream": True}
    miss = parse_sse(post_turn(gw, ask).content)[-1]["response"]
    upstream.clear()
    hit = parse_sse(post_turn(gw, ask).content)[-1]["response"]
    assert upstream.requests() == [], "the second answer must come from the replay cache"
    assert hit["id"] != miss["id"] and hit["output"][-1]["id"] != miss["output"][-1]["id"]
    follow = {"model": "demo-model", "input": [{"role": "user", "content": "cached question"},
                                               {"type": "item_reference", "id": hit["output"][-1]["id"]},
                                               {"role": "user", "content": "after the hit"}]}
    assert post_turn(gw, follow).json()["output"][-1]["content"][0]["text"] == "You said: after the hit"
    gw.stop()
    again = gateway_factory(upstream.origin, "--set", f"resp2chat_session_store_dir={store}")
    r = requests.post(again.base_url + "/responses", json=follow, timeout=30)
    assert r.status_code == 200, r.text
    assert upstream.requests()[-1]["messages"][1]["content"] == "You said: cached question"


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.sampled_from([f"msg_{i}" for i in range(40)]),
                                   st.text("abc", min_size=1, max_size=3)), max_size=12), min_size=1, max_size=25))
def test_item_facts_of_a_conversation_going_on_turn_by_turn_are_a_fresh_walks(turns):
    """A conversation that goes on by a few items a turn (ids new, repeated, absent), walked
    turn by turn through one memo as Codex's HTTP turns are: each turn's facts (the ids it
    holds, the items whose id one before them has) are those of a fresh walk; the ids are held
    in at most log2(n) + 1 layers (inputs.Ids), so a turn adds its own ids without copying
    the others."""
    memo = inputs.ItemFacts(runs=2)
    history = [{"role": "user", "content": "q"}] * inputs.ItemFacts.MIN_ITEMS
    for ids in turns:
        history = history + [{"role": "user", "content": "a", **({"id": i} if i else {})} for i in ids]
        got, fresh = memo.of(history), inputs.ItemFacts().of(history)
        assert got == fresh and set(got.ids) == {item["id"] for item in history if "id" in item}
        assert got.twice == fresh.twice == tuple(
            n for n, item in enumerate(history) if "id" in item and any(o.get("id") == item["id"] for o in history[:n]))
        assert len(got.ids._layers) <= max(1, len(got.ids)).bit_length()
