"""The directory copy of the response store (``session_store_dir``) after a restart answers as the
store did before it (store.py): an entry keeps its version, so a conversation is written again over
the version ``get`` gives; an item a later response holds unchanged still resolves once the
response that produced it is gone. The store itself, then through real gateways (mitmdump)
stopped and started again on one directory."""

from __future__ import annotations

import requests

from helpers import Clock, openai_client, post_turn, user
from resp2chat_io.store import ResponseStore

BIG = dict(ttl=1e9, max_entries=100, max_bytes=1 << 20)


async def test_an_entry_keeps_its_version_across_a_restart(tmp_path):
    clock = Clock()
    store = ResponseStore(clock=clock, directory=str(tmp_path), **BIG)
    conv = "conv_0123456789abcdef"
    for n in range(2):
        clock.now += 1
        assert await store.put(conv, [user(f"item {n}")], {"id": conv, "object": "conversation"}, expect=n)
    again = ResponseStore(clock=clock, directory=str(tmp_path), **BIG)
    entry = await again.get(conv)
    assert entry["version"] == 2
    assert await again.put(conv, entry["items"] + [user("after")], entry["response"], expect=2)
    assert not await again.put(conv, [], entry["response"], expect=2)  # (that version is gone now)
    assert (await ResponseStore(clock=clock, directory=str(tmp_path), **BIG).get(conv))["version"] == 3


async def test_an_item_held_by_a_later_response_outlives_its_producer_across_a_restart(tmp_path):
    store = ResponseStore(clock=Clock(), directory=str(tmp_path), **BIG)
    answer = {"type": "message", "id": "msg_0001", "role": "assistant", "content": "first answer"}
    assert await store.put("resp_first0001", [user("first"), answer], {"id": "resp_first0001", "output": [answer]})
    assert await store.put("resp_second001", [user("first"), dict(reversed(answer.items())), user("second")],
                           {"id": "resp_second001", "output": []})  # (held unchanged, whatever its keys' order)
    assert await store.delete("resp_first0001")
    assert await store.items(["msg_0001"]) == {"msg_0001": answer}
    again = ResponseStore(clock=Clock(), directory=str(tmp_path), **BIG)
    assert await again.items(["msg_0001"]) == {"msg_0001": answer}
    assert await again.delete("resp_second001") and await again.items(["msg_0001"]) == {}


async def test_two_owners_entries_of_one_id_are_two_files_and_the_version_befores_are_renamed(tmp_path):
    """Each owner's entry is its own file (``{id}@{owner}.json``; the shared owner's ``{id}.json``),
    so two owners of one id (a replayed answer's) are both read back after a restart. A file the
    version before named ``{id}.json`` whatever its owner (and its renewal) is read back as its
    owner's and renamed; a file whose name says another owner than the one it holds is not read."""
    store = ResponseStore(clock=Clock(), directory=str(tmp_path), **BIG)
    rid = "resp_replayed0001"
    for owner in ("", "client.a"):
        assert await store.put(rid, [user(f"from {owner!r}")], {"id": rid, "output": []}, owner=owner)
    assert await store.renew(rid, {"id": rid, "status": "in_progress", "output": [user("so far")]}, owner="client.a",
                             expect=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{rid}.json", f"{rid}@client.a.json",
                                                          f"{rid}@client.a.renewal"]
    again = ResponseStore(clock=Clock(), directory=str(tmp_path), **BIG)
    assert [(await again.get(rid, owner=o))["items"][0] for o in ("", "client.a")] == \
        [user("from ''"), user("from 'client.a'")]
    # as the version before left it: client.a's under {id}.json (the shared owner's gone)
    assert await again.delete(rid)
    for suffix in (".json", ".renewal"):
        (tmp_path / f"{rid}@client.a{suffix}").rename(tmp_path / f"{rid}{suffix}")
    (tmp_path / "resp_misnamed0001@client.b.json").write_bytes((tmp_path / f"{rid}.json").read_bytes())
    moved = ResponseStore(clock=Clock(), directory=str(tmp_path), **BIG)
    entry = await moved.get(rid, owner="client.a")
    assert entry["version"] == 2 and entry["items"][-1] == user("so far") and await moved.get(rid) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{rid}@client.a.json", f"{rid}@client.a.renewal"]
    assert len(moved) == 1 and await moved.get("resp_misnamed0001", owner="client.b") is None


def test_a_conversation_takes_new_items_after_a_restart(upstream, gateway_factory, tmp_path):
    args = ("--set", f"resp2chat_session_store_dir={tmp_path / 'store'}")
    first = gateway_factory(upstream.origin, *args)
    conv = openai_client(first).conversations.create(items=[user("before")])
    openai_client(first).conversations.items.create(conv.id, items=[user("also before")])  # (its version 2)
    first.stop()
    again = gateway_factory(upstream.origin, *args)
    added = requests.post(f"{again.base_url}/conversations/{conv.id}/items", json={"items": [user("after")]},
                          timeout=30)
    assert added.status_code == 200, added.text
    openai_client(again).responses.create(model="demo-model", input="noreason\na turn", conversation=conv.id)
    texts = [i.content[0].text for i in openai_client(again).conversations.items.list(conv.id, order="asc").data]
    assert texts == ["before", "also before", "after", "noreason\na turn", "You said: a turn"]


def test_an_item_reference_resolves_after_its_producer_was_deleted_and_a_restart(upstream, gateway_factory, tmp_path):
    args = ("--set", f"resp2chat_session_store_dir={tmp_path / 'store'}")
    gw = gateway_factory(upstream.origin, *args)
    client = openai_client(gw)
    first = client.responses.create(model="demo-model", input="noreason\nfirst question")
    client.responses.create(model="demo-model", input="noreason\nsecond", previous_response_id=first.id)
    client.responses.delete(first.id)  # (the second holds its answer unchanged)
    follow = {"model": "demo-model", "input": [{"role": "user", "content": "noreason\nfirst question"},
                                               {"type": "item_reference", "id": first.output[-1].id},
                                               {"role": "user", "content": "noreason\nthird"}]}
    assert post_turn(gw, follow).status_code == 200
    gw.stop()
    again = gateway_factory(upstream.origin, *args)
    upstream.clear()
    r = post_turn(again, follow)
    assert r.status_code == 200, r.text
    assert upstream.requests()[-1]["messages"][1]["content"] == "You said: first question"
