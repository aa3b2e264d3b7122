"""An item the gateway produced resolves (``item_reference``) while any stored response of its
owner holds it unchanged, in Redis as in memory (store.py): deleting the newest holder leaves the
older ones' (the response that produced it among them). The store on a real redis-server, then
through a real gateway (mitmdump) with ``state_store_url``."""

from __future__ import annotations

from helpers import openai_client, post_turn, start_gateway, user, wait_until
from resp2chat_io.redis_state import RedisResponseStore, RedisState
from resp2chat_io.store import ResponseStore

BIG = dict(max_entries=100, max_bytes=1 << 20)


async def test_an_item_outlives_its_newest_holder_in_redis_as_in_memory(redis_server):
    state = RedisState(redis_server.url)
    answer = {"type": "message", "id": "msg_0001", "role": "assistant", "content": "first answer"}
    try:
        for store in (ResponseStore(ttl=1e9, **BIG), RedisResponseStore(state, ttl=3600, **BIG)):
            assert await store.put("resp_first0001", [user("first"), answer], {"id": "resp_first0001", "output": [answer]})
            for n in (2, 3):
                assert await store.put(f"resp_holder{n:03d}", [user("first"), answer, user(f"turn {n}")],
                                       {"id": f"resp_holder{n:03d}", "output": []})
            assert await store.delete("resp_holder003")  # (the newest holder)
            assert await store.items(["msg_0001"]) == {"msg_0001": answer}, type(store).__name__
            assert await store.put("resp_holder002", [user("rewritten")], {"id": "resp_holder002", "output": []})
            assert await store.items(["msg_0001"]) == {"msg_0001": answer}, type(store).__name__
            assert await store.delete("resp_first0001")  # (the last one holding it)
            assert await store.items(["msg_0001"]) == {}
        r = redis_server.client()
        assert not r.keys("resp2chat:item:*") and not r.keys("resp2chat:holders:*")  # (nothing left behind)
    finally:
        await state.close()


def test_an_item_reference_resolves_after_a_later_response_was_deleted(upstream, tmp_path, redis_server):
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
    r = redis_server.client()
    try:
        client = openai_client(gw)
        first = client.responses.create(model="demo-model", input="noreason\nfirst question")
        wait_until(lambda: r.exists(f"resp2chat:response:{first.id}"), 20, f"{first.id} stored")
        second = client.responses.create(model="demo-model", input="noreason\nsecond", previous_response_id=first.id)
        wait_until(lambda: r.exists(f"resp2chat:response:{second.id}"), 20, f"{second.id} stored")
        client.responses.delete(second.id)
        upstream.clear()
        follow = post_turn(gw, {"model": "demo-model", "input": [
            {"role": "user", "content": "noreason\nfirst question"},
            {"type": "item_reference", "id": first.output[-1].id},
            {"role": "user", "content": "noreason\nthird"}]})
        assert follow.status_code == 200, follow.text
        assert upstream.requests()[-1]["messages"][1]["content"] == "You said: first question"
    finally:
        gw.stop()


async def test_what_a_background_response_holds_lives_as_long_as_it_once_it_ended(redis_server):
    """In Redis an item's key expires with its newest holder's write (``ttl`` from it). A
    background response holds the items of its conversation from when it was queued (its
    ``put``); its end, a renewal that ends it (store.py ``renew(…, ended=True)``), writes it
    again, and what it holds lives as long as it does from then, as when its end was a ``put``:
    an item of its conversation still resolves after the response that produced it expired, as
    the item it produced does (in memory an item resolves while any holder of it lives)."""
    import asyncio

    state = RedisState(redis_server.url)
    answer = {"type": "message", "id": "msg_0001", "role": "assistant", "content": "first answer"}
    made = {"type": "message", "id": "msg_0002", "role": "assistant", "content": "its answer"}
    try:
        store = RedisResponseStore(state, ttl=3, **BIG)
        assert await store.put("resp_first0001", [user("first"), answer], {"id": "resp_first0001", "output": [answer]})
        assert await store.put("resp_backgr001", [user("first"), answer, user("go on")],
                               {"id": "resp_backgr001", "status": "queued", "output": []})
        await asyncio.sleep(2)
        assert (await store.renew("resp_backgr001", {"id": "resp_backgr001", "status": "completed", "output": [made]},
                                  expect=1, ended=True)).renewed
        await asyncio.sleep(1.8)  # (the first response's ttl passed, not the background one's since its end)
        assert await store.get("resp_first0001") is None
        assert (await store.get("resp_backgr001"))["items"][-1] == made
        assert await store.items(["msg_0001", "msg_0002"]) == {"msg_0001": answer, "msg_0002": made}
    finally:
        await state.close()
