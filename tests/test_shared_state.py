"""Replicas sharing state through a real redis-server (`make redis`): previous_response_id and
the replay cache across gateways, the bounds in Redis, Redis going away and coming back, and a
replica killed mid-stream storing nothing."""

from __future__ import annotations

import asyncio
import signal

import openai
import pytest
import requests

from helpers import iter_sse, openai_client, parse_sse, scrape, start_gateway, wait_http, wait_until


def replicas(upstream, tmp_path, redis_url, n=2, *extra):
    return [start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_url}", *extra)
            for _ in range(n)]


def wait_stored(r, response_id: str) -> None:
    """Writes to Redis run as tasks after the answer: wait for this one."""
    wait_until(lambda: r.exists(f"resp2chat:response:{response_id}"), 20, f"{response_id} stored")


def test_any_replica_continues_any_conversation(upstream, tmp_path, redis_server):
    a, b = replicas(upstream, tmp_path, redis_server.url)
    r = redis_server.client()
    try:
        ca, cb = (openai_client(g) for g in (a, b))
        first = ca.responses.create(model="demo-model", input="remember the word apricot")
        wait_stored(r, first.id)
        assert cb.responses.retrieve(first.id).id == first.id  # (b has stored nothing itself yet)
        second = cb.responses.create(model="demo-model", input="and now?", previous_response_id=first.id)
        assert second.output_text == "You said: and now?"
        sent = upstream.requests()[-1]["messages"]  # b sent the whole conversation upstream
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[0]["content"] == "remember the word apricot"
        wait_stored(r, second.id)
        third = ca.responses.create(model="demo-model", input="third", previous_response_id=second.id)
        assert len(upstream.requests()[-1]["messages"]) == 5
        assert cb.responses.retrieve(first.id).id == first.id  # GET on the other replica
        wait_stored(r, third.id)
        # every item of a stored conversation is indexed, under the newest response holding it,
        # with that response's expiry
        item_id = first.output[-1].id
        assert r.get(f"resp2chat:item:{item_id}") == third.id.encode()
        ttl = r.ttl(f"resp2chat:item:{item_id}")
        assert 0 < ttl <= 168 * 3600 and abs(ttl - r.ttl(f"resp2chat:response:{third.id}")) <= 1
        cb.responses.delete(first.id)  # DELETE on b: gone for a
        with pytest.raises(openai.NotFoundError):
            ca.responses.retrieve(first.id)
        assert r.get(f"resp2chat:item:{item_id}") == third.id.encode()  # still held by the third
        ca.responses.delete(third.id)  # the newest holder goes: the second, holding it too, takes over
        assert r.get(f"resp2chat:item:{item_id}") == second.id.encode()
        ca.responses.delete(second.id)  # the last holder goes: so does its items' index
        assert r.get(f"resp2chat:item:{item_id}") is None and not r.exists(f"resp2chat:holders:{item_id}")
    finally:
        for g in (a, b):
            g.stop()


def test_item_references_resolve_on_any_replica(upstream, tmp_path, redis_server):
    """item_reference ids (the outputs of a stored response) found through Redis; unknown, or an
    id a client gave its own input → 400."""
    a, b = replicas(upstream, tmp_path, redis_server.url)
    r = redis_server.client()
    try:
        ca, cb = (openai_client(g) for g in (a, b))
        first = ca.responses.create(model="demo-model", input=[
            {"type": "message", "id": "msg_client_0001", "role": "user", "content": "first question"}])
        wait_stored(r, first.id)
        reasoning, message = first.output
        with pytest.raises(openai.BadRequestError) as err:
            cb.responses.create(model="demo-model", input=[{"type": "item_reference", "id": "msg_client_0001"}])
        assert err.value.body["code"] == "item_not_found" and err.value.body["param"] == "input[0].id"
        upstream.clear()
        second = cb.responses.create(model="demo-model", input=[
            {"role": "user", "content": "first question"},
            {"type": "item_reference", "id": reasoning.id},
            {"type": "item_reference", "id": message.id},
            {"role": "user", "content": "second question"}])
        assert second.output_text == "You said: second question"
        assert upstream.requests()[-1]["messages"] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "You said: first question", "reasoning_content": "Thinking about: first question"},
            {"role": "user", "content": "second question"}]
        with pytest.raises(openai.BadRequestError) as err:
            cb.responses.create(model="demo-model", input=[{"role": "user", "content": "x"},
                                                           {"type": "item_reference", "id": "msg_nowhere"}])
        assert err.value.body["code"] == "item_not_found" and err.value.body["param"] == "input[1].id"
    finally:
        for g in (a, b):
            g.stop()


def test_the_replay_cache_is_shared(upstream, tmp_path, redis_server):
    a, b = replicas(upstream, tmp_path, redis_server.url)
    try:
        body = {"model": "demo-model", "input": "replay me across replicas", "stream": True}
        upstream.clear()
        first = requests.post(a.base_url + "/responses", json=body, timeout=30)
        r = redis_server.client()
        wait_until(lambda: r.zcard("resp2chat:replays") == 1, 20, "the replay stored")
        second = requests.post(b.base_url + "/responses", json=body, timeout=30)
        assert len(upstream.requests()) == 1  # b answered from Redis
        e1, e2 = parse_sse(first.content), parse_sse(second.content)
        assert [e["type"] for e in e1] == [e["type"] for e in e2]
        assert e1[-1]["response"]["id"] != e2[-1]["response"]["id"]
        assert scrape(b)[("resp2chat_replay_cache_hits_total", ())] == 1
    finally:
        for g in (a, b):
            g.stop()


def test_replicas_with_other_seal_keys_do_not_share_answers(upstream, tmp_path, redis_server):
    """An answer holds what its replica sealed (encrypted_content): a replica with another key
    must not serve it from the shared replay cache (its client could not send it back). Without
    seal_key each replica would seal with its own key: the gateway says so at start-up."""
    a, b = (replicas(upstream, tmp_path, redis_server.url, 1, "--set", f"resp2chat_seal_key=key-of-{name}-0123456789")[0]
            for name in ("a", "b"))
    (unkeyed,) = replicas(upstream, tmp_path, redis_server.url, 1)
    try:
        assert "seal_key is not" in unkeyed.log() and "seal_key is not" not in a.log() + b.log()
        body = {"model": "demo-model", "input": "think it over", "include": ["reasoning.encrypted_content"],
                "store": False}
        upstream.clear()
        requests.post(a.base_url + "/responses", json=body, timeout=30)
        r = redis_server.client()
        wait_until(lambda: r.zcard("resp2chat:replays") == 1, 20, "the replay stored")
        second = requests.post(b.base_url + "/responses", json=body, timeout=30).json()
        assert len(upstream.requests()) == 2  # b's own answer, not a's
        reasoning = next(o for o in second["output"] if o["type"] == "reasoning")
        follow = requests.post(b.base_url + "/responses", json={**body, "input": [
            {"role": "user", "content": "think it over"}, reasoning, {"role": "user", "content": "and?"}]}, timeout=30)
        assert follow.status_code == 200, follow.text  # b opens what b sealed
    finally:
        for g in (a, b, unkeyed):
            g.stop()


def test_bounds_are_applied_in_redis(upstream, tmp_path, redis_server):
    (gw,) = replicas(upstream, tmp_path, redis_server.url, 1, "--set", "resp2chat_max_sessions=2",
                     "--set", "resp2chat_max_replay_entries=2", "--set", "resp2chat_session_ttl_hours=1")
    r = redis_server.client()
    try:
        client = openai_client(gw)
        ids = []
        for i in range(4):
            ids.append(client.responses.create(model="demo-model", input=f"number {i}").id)
            wait_stored(r, ids[-1])
        kept = [x.decode() for x in r.zrange("resp2chat:entries", 0, -1)]
        assert kept == ids[2:]  # the oldest went first
        assert not r.exists(f"resp2chat:response:{ids[0]}") and 0 < r.ttl(f"resp2chat:response:{ids[3]}") <= 3600
        assert int(r.get("resp2chat:entries:bytes")) == sum(
            len(r.hget(f"resp2chat:response:{x}", "data")) for x in kept)
        assert r.zcard("resp2chat:replays") == 2 and len(r.keys("resp2chat:replay:*")) == 2
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-model", input="x", previous_response_id=ids[0])
        assert err.value.code == "previous_response_not_found"
    finally:
        gw.stop()


def test_redis_down_503_for_what_needs_it_plain_turns_work_recovery_automatic(upstream, tmp_path, redis_server):
    (gw,) = replicas(upstream, tmp_path, redis_server.url, 1, "--set", "resp2chat_max_replay_entries=0")
    client = openai_client(gw)
    try:
        first = client.responses.create(model="demo-model", input="before")
        wait_stored(redis_server.client(), first.id)
        redis_server.stop()
        with pytest.raises(openai.InternalServerError) as err:
            client.responses.create(model="demo-model", input="after", previous_response_id=first.id)
        assert err.value.status_code == 503 and err.value.code == "store_unavailable"
        assert "Redis" in err.value.message
        got = requests.get(f"{gw.base_url}/responses/{first.id}")
        assert got.status_code == 503 and (got.headers["retry-after"], got.headers["retry-after-ms"]) == ("1", "1000")
        plain = client.responses.create(model="demo-model", input="a plain turn")  # needs no store
        assert plain.output_text == "You said: a plain turn"
        assert scrape(gw)[("resp2chat_state_store_up", ())] == 0
        redis_server.start()  # same port, empty (no persistence): the gateway finds it again by itself
        r = redis_server.client()

        def kept():  # within the short back-off a write is still refused: the next turn's is kept
            again = client.responses.create(model="demo-model", input="after recovery")
            try:
                return wait_until(lambda: r.exists(f"resp2chat:response:{again.id}") and again, 2)
            except TimeoutError:
                return None

        again = wait_until(kept, 30, "the gateway using Redis again")
        follow = client.responses.create(model="demo-model", input="continued", previous_response_id=again.id)
        assert follow.output_text == "You said: continued"
        assert scrape(gw)[("resp2chat_state_store_up", ())] == 1
    finally:
        gw.stop()


def test_redis_refusing_commands_is_a_miss_a_warning_or_a_503(upstream, tmp_path, redis_server):
    """Redis answers, with an error reply (here an ACL's NOPERM; OOM past maxmemory and READONLY on
    a replica are the same kind): the replay-cache lookup is a miss (not a 500), a write is a
    warning (not a task exception logged as an error), a read the request needs is a 503."""
    redis_server.client().execute_command("ACL", "SETUSER", "limited", "on", ">limited-pw-4711", "~*", "&*",
                                          "+@all", "-get", "-evalsha", "-eval", "-hget", "-hmget")
    url = f"redis://limited:limited-pw-4711@127.0.0.1:{redis_server.port}/0"
    (gw,) = replicas(upstream, tmp_path, url, 1)
    try:
        r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "refused"}, timeout=30)
        assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "You said: refused"
        wait_until(lambda: "replay cache entry not kept" in gw.log() and "not stored" in gw.log(), 20,
                   "both warnings logged")
        assert "NoPermissionError" in gw.log() and "limited-pw-4711" not in gw.log()
        got = requests.get(f"{gw.base_url}/responses/{r.json()['id']}", timeout=30)
        assert got.status_code == 503 and got.json()["error"]["code"] == "store_unavailable"
        assert "Task exception was never retrieved" not in gw.log() and "Traceback" not in gw.log()
    finally:
        gw.stop()


def test_a_replica_killed_mid_stream_stores_nothing(tmp_path, redis_server):
    from resp2chat_io.demo_upstream import serve_in_thread

    server, url = serve_in_thread(chunk_delay=0.05)  # a slow stream: 200 words take ~10 s
    a, b = [start_gateway(url.removesuffix("/v1"), tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    try:
        with requests.post(a.base_url + "/responses", json={"model": "demo-model", "input": "words: 200",
                                                            "stream": True, "store": True}, stream=True, timeout=60) as r:
            events = iter_sse(r)
            response_id = None
            for event in events:
                if event["type"] == "response.output_text.delta":
                    break
                if event["type"] == "response.created" and response_id is None:
                    response_id = event["response"]["id"]
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
                for event in events:
                    assert event["type"] != "response.completed"
        assert response_id
        r2 = requests.get(f"{b.base_url}/responses/{response_id}", timeout=10)
        assert r2.status_code == 404
        assert not redis_server.client().exists(f"resp2chat:response:{response_id}")
        wait_http(b.base_url.removesuffix("/v1") + "/healthz")  # the other replica is unaffected
    finally:
        a.stop()
        b.stop()
        server.shutdown()
        server.server_close()


async def test_each_lookup_gets_its_own_answer_and_a_failed_one_is_a_503(redis_server):
    """Redis is asked before a turn is lowered (``StoredResponses.lookup``, the one lookup of
    both transports), one await after the other. What one lookup found is its own: another
    lookup of the same response that ends meanwhile takes nothing from it; a lookup Redis fails
    half-way is a 503 ``store_unavailable``, and the next one after Redis is back finds it all."""
    from mitmproxy.test import taddons

    from resp2chat_core.errors import GatewayError
    from resp2chat_io.addons.base import SettingsSource
    from resp2chat_io.addons.store import StoredResponses
    from resp2chat_io.addons.upstreams import Upstreams

    addon = StoredResponses(SettingsSource(), Upstreams(SettingsSource()))  # (the owner: "" without forward_client_auth)
    with taddons.context(addon) as tctx:
        tctx.options.add_option("resp2chat_seal_key", str, "", "(Turns declares it in a gateway)")
        tctx.configure(addon, resp2chat_state_store_url=redis_server.url)
        output = [{"type": "message", "id": "msg_1", "role": "assistant", "content": []}]
        history = [{"role": "user", "content": "hi"}, *output]  # (as the store keeps a turn: inputs, then output)
        await addon.store.put("resp_1", history, {"id": "resp_1", "object": "response", "output": output})
        real, entered, go = addon.store.items, asyncio.Event(), asyncio.Event()

        async def paused(item_ids, **owner):  # the second await of a lookup, held until the test says
            entered.set()
            await go.wait()
            return await real(item_ids, **owner)

        addon.store.items = paused
        first = asyncio.ensure_future(addon.lookup("resp_1", ("msg_1",), owner=""))
        await entered.wait()  # it has its history, not its items yet
        addon.store.items = real
        other = await addon.lookup("resp_1", ("msg_1",), owner="")  # another one, done meanwhile
        assert other.earlier == history and other.items["msg_1"] == output[0]
        go.set()
        found = await first
        assert found.earlier == history and found.items == {"msg_1": output[0]}

        entered.clear(), go.clear()
        addon.store.items = paused
        failing = asyncio.ensure_future(addon.lookup("resp_1", ("msg_1",), owner=""))
        await entered.wait()  # it has its history; Redis goes away before its items
        redis_server.stop()
        go.set()
        with pytest.raises(GatewayError) as refused:
            await failing
        assert refused.value.status == 503 and refused.value.code == "store_unavailable"
        await addon.done()


def test_socket_turns_find_stored_responses_and_items_in_redis(upstream, tmp_path, redis_server):
    """A Responses WebSocket turn on one replica continues a response another stored and refers to
    its items (fetched from Redis for the message); Redis down: 503 store_unavailable as an
    error message, the socket goes on, and what needs no Redis still works."""
    from wsclient import WSClient

    a, b = replicas(upstream, tmp_path, redis_server.url)
    r = redis_server.client()
    client = None
    try:
        ca = openai_client(a)
        first = ca.responses.create(model="demo-model", input=[
            {"type": "message", "id": "msg_client_ws_1", "role": "user", "content": "first question"}])
        wait_stored(r, first.id)
        reasoning, message = first.output
        client = WSClient(b.base_url)
        create = {"type": "response.create", "model": "demo-model"}
        upstream.clear()
        second = client.turn({**create, "input": "and now?", "previous_response_id": first.id, "store": True})
        assert second[-1]["type"] == "response.completed", second[-1]
        assert [m["role"] for m in upstream.requests()[-1]["messages"]] == ["user", "assistant", "user"]
        [own] = client.turn({**create, "input": [{"type": "item_reference", "id": "msg_client_ws_1"}]})
        assert (own["status"], own["error"]["code"]) == (400, "item_not_found")  # (a client's input: never by id)
        third = client.turn({**create, "store": False, "input": [
            {"role": "user", "content": "first question"}, {"type": "item_reference", "id": reasoning.id},
            {"type": "item_reference", "id": message.id}, {"role": "user", "content": "second question"}]})
        assert third[-1]["response"]["output"][-1]["content"][0]["text"] == "You said: second question"
        assert upstream.requests()[-1]["messages"] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "You said: first question", "reasoning_content": "Thinking about: first question"},
            {"role": "user", "content": "second question"}]
        wait_stored(r, second[-1]["response"]["id"])  # a socket turn with store: true is shared too
        assert get_response(a, second[-1]["response"]["id"]).status_code == 200
        [unknown] = client.turn({**create, "input": [{"type": "item_reference", "id": "msg_nowhere"}]})
        assert (unknown["status"], unknown["error"]["code"]) == (400, "item_not_found")
        redis_server.stop()
        for needs_redis in ({**create, "input": "x", "previous_response_id": first.id},
                         {**create, "input": [{"type": "item_reference", "id": message.id}]}):
            [down] = client.turn(needs_redis)
            assert down["status"] == 503 and down["error"]["code"] == "store_unavailable", down
            assert "Redis" in down["error"]["message"]
        # a plain turn, and continuing a response of this very socket, need no Redis
        plain = client.turn({**create, "input": "a plain turn", "store": False})
        assert plain[-1]["type"] == "response.completed"
        follow = client.turn({**create, "input": "go on", "previous_response_id": plain[-1]["response"]["id"]})
        assert follow[-1]["response"]["output"][-1]["content"][0]["text"] == "You said: go on"
    finally:
        if client is not None:
            client.close()
        for g in (a, b):
            g.stop()


def test_a_response_deleted_on_another_replica_is_not_continued_from_a_sockets_memory(upstream, tmp_path,
                                                                                     redis_server):
    """A socket on one replica remembers a stored response it answered; another replica deletes
    it over HTTP: the socket's continuation of it is previous_response_not_found, as over HTTP."""
    from wsclient import WSClient

    a, b = replicas(upstream, tmp_path, redis_server.url)
    r = redis_server.client()
    client = None
    try:
        client = WSClient(b.base_url)
        create = {"type": "response.create", "model": "demo-model", "store": True}
        first = client.turn({**create, "input": "remember the word apricot"})[-1]["response"]
        wait_stored(r, first["id"])
        second = client.turn({**create, "input": "and now?", "previous_response_id": first["id"]})
        assert second[-1]["type"] == "response.completed", second[-1]  # (from the socket's memory)
        assert requests.delete(f"{a.base_url}/responses/{first['id']}", timeout=10).json()["deleted"]
        [error] = client.turn({**create, "input": "go on", "previous_response_id": first["id"]})
        assert error["type"] == "error" and error["error"]["code"] == "previous_response_not_found", error
        # what was not deleted is still continued
        third = client.turn({**create, "input": "still here?", "previous_response_id": second[-1]["response"]["id"]})
        assert third[-1]["type"] == "response.completed", third[-1]
    finally:
        if client is not None:
            client.close()
        for g in (a, b):
            g.stop()


def get_response(gw, response_id: str):
    return requests.get(f"{gw.base_url}/responses/{response_id}", timeout=10)


async def test_a_turn_admitted_in_redis_ends_there_and_an_old_redis_is_never_reopened(tmp_path, redis_server,
                                                                                   caplog):
    """A turn's limits are released where it was admitted (its ``Ticket``), whatever Redis did
    meanwhile: this replica's own state while Redis was down, Redis once it is back. After
    ``state_store_url`` changes, a turn admitted in the old Redis opens no connection to it
    again (it would stay open): its end is not counted there, with a warning."""
    from mitmproxy.test import taddons

    from redis_server import RedisServer
    from resp2chat_core.clients import ClientSpec
    from resp2chat_io.addons.base import SettingsSource
    from resp2chat_io.addons.limits import Limits
    from resp2chat_io.addons.store import StoredResponses
    from resp2chat_io.addons.upstreams import Upstreams
    from resp2chat_io.store import StateUnavailable

    carol = ClientSpec("carol", "0" * 64, ("*",), tpm=100, max_streams=1)
    r = redis_server.client()
    streams = "resp2chat:limits:client.carol:streams"  # (its identity: no id, its name)
    store = StoredResponses(SettingsSource(), Upstreams(SettingsSource()))
    limits = Limits(store)
    with taddons.context(store) as tctx:
        tctx.options.add_option("resp2chat_seal_key", str, "", "(Turns declares it in a gateway)")
        tctx.configure(store, resp2chat_state_store_url=redis_server.url)
        assert (await limits.admit(carol, "turn_a")).admitted and r.zscore(streams, "turn_a") is not None
        assert (await limits.admit(carol, "turn_b")).why == "streams"  # (max_streams=1, counted in Redis)
        redis_server.stop()
        assert (await limits.admit(carol, "turn_c")).admitted  # Redis down: this replica decides alone
        redis_server.start()  # (empty: it keeps nothing on disk)
        r.zadd(streams, {"turn_a": 1e12})  # (as if it had kept turn_a)
        while not store.state.up:  # (past the back-off after the failure)
            try:
                await store.state.call("ping", lambda c: c.ping())
            except StateUnavailable:
                await asyncio.sleep(0.05)
        limits.release(carol, "turn_c", 10)  # admitted here: released here
        limits.release(carol, "turn_a", 30)  # admitted in Redis: released in Redis
        limits.release(carol, "turn_a", 30)  # once
        await store.writes.flush()
        assert r.zscore(streams, "turn_a") is None and round(float(r.hget("resp2chat:limits:client.carol", "t"))) == 70

        other = RedisServer(tmp_path / "other").start()
        try:
            assert (await limits.admit(carol, "turn_d")).admitted
            tctx.configure(store, resp2chat_state_store_url=other.url)
            await asyncio.sleep(0)  # (the old state closes)
            assert (await limits.admit(carol, "turn_e")).admitted and other.client().zcard(streams) == 1
            before = {c["id"] for c in r.client_list()}
            limits.release(carol, "turn_d", 5)
            await store.writes.flush()
            assert [c for c in r.client_list() if c["id"] not in before] == []  # nothing reopened
            assert "the end of turn turn_d not counted for client 'carol'" in caplog.text
            limits.release(carol, "turn_e", 5)
            await store.writes.flush()
            assert other.client().zcard(streams) == 0
            await store.done()
        finally:
            other.stop()


async def test_a_redis_left_behind_is_closed_when_the_gateway_stops_at_once(tmp_path, redis_server):
    """``state_store_url`` changed, and the gateway stops before the old Redis's closing task
    (addons/store.py ``_retire``) took its first step: ``done`` closes that Redis itself (a task
    cancelled before its first step never runs its ``finally``: its connections stayed open)."""
    from mitmproxy.test import taddons

    from redis_server import RedisServer
    from resp2chat_io.addons.base import SettingsSource
    from resp2chat_io.addons.store import StoredResponses
    from resp2chat_io.addons.upstreams import Upstreams

    r = redis_server.client()
    store = StoredResponses(SettingsSource(), Upstreams(SettingsSource()))
    with taddons.context(store) as tctx, RedisServer(tmp_path / "other") as other:
        tctx.options.add_option("resp2chat_seal_key", str, "", "(Turns declares it in a gateway)")
        tctx.configure(store, resp2chat_state_store_url=redis_server.url)
        old = store.state
        assert await store.store.put("resp_left00001", [], {"id": "resp_left00001"})  # (a connection there)
        assert len(r.client_list()) == 2
        tctx.configure(store, resp2chat_state_store_url=other.url)
        await store.done()  # (no await between: the old Redis's closing task has not started)
        assert old.closed
        wait_until(lambda: len(r.client_list()) == 1, 10, "the gateway's connection to the old Redis closed")
    r.close()
