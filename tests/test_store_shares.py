"""One owner's writes push out its own stored state, not everyone's (resp2chat_core/shares.py): past
``max_sessions`` or ``max_session_memory_mb`` the owner holding the most loses its oldest entry,
in memory, on disk (rebuilt after a restart) and in Redis (one Lua script for every replica, the
same choices as memory's; entries the version before wrote are read and evicted). Through real
gateways with two client keys: a client that floods the store keeps only its own newest, the
other's responses and conversation stay retrievable and continuable."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from helpers import Clock, cli_env, openai_client, start_gateway, wait_until
from resp2chat_core.shares import BYTES, COUNT, Shares
from resp2chat_io.redis_state import RedisResponseStore, RedisState, namespace
from resp2chat_io.store import ResponseStore

# --- the rule (sans I/O) -----------------------------------------------------------------------


def shares_of(*entries: tuple[str, str, int]) -> Shares:
    """(owner, id, size) in the order they were stored (at 1, 2, …)."""
    s = Shares()
    for at, (owner, entry_id, size) in enumerate(entries, 1):
        s.add(owner, entry_id, float(at), size)
    return s


def test_the_owner_holding_the_most_entries_loses_its_oldest():
    s = shares_of(("a", "a1", 10), ("b", "b1", 10), ("b", "b2", 10), ("a", "a2", 10), ("b", "b3", 10))
    assert s.victim(COUNT) == ("b", "b1")  # b holds 3, a 2: b's oldest, though a1 is older
    s.remove("b", "b1")
    assert s.victim(COUNT) == ("a", "a1")  # 2 and 2: the owner whose oldest entry is oldest
    s.remove("a", "a1")
    s.remove("a", "a2")
    assert s.held("a") == (0, 0) and len(s) == 1 and s.victim(COUNT) == ("b", "b2")


def test_the_byte_cap_takes_from_the_owner_holding_the_most_bytes():
    s = shares_of(("big", "g1", 5000), ("many", "m1", 100), ("many", "m2", 100), ("many", "m3", 100))
    assert s.victim(BYTES) == ("big", "g1") and s.victim(COUNT) == ("many", "m1")
    assert s.held("many") == (3, 300)


def test_the_entry_being_written_is_never_its_own_victim():
    # the writer's one large entry makes it the largest: the next largest owner gives way
    s = shares_of(("small", "s1", 100), ("small", "s2", 100), ("other", "o1", 150), ("writer", "w1", 900))
    assert s.victim(BYTES) == ("writer", "w1")
    assert s.victim(BYTES, keep=("writer", "w1")) == ("small", "s1")
    s.add("writer", "w0", 5.0, 10)
    assert s.victim(BYTES, keep=("writer", "w0")) == ("writer", "w1")  # it holds another one: that goes
    assert shares_of(("only", "x", 1)).victim(COUNT, keep=("only", "x")) is None
    # (by owner and id: another owner's entry of the same id is not the one being written)
    assert shares_of(("a", "x", 5), ("b", "x", 1)).victim(BYTES, keep=("b", "x")) == ("a", "x")


def test_many_changes_keep_the_choice_right():
    """The heaps' stale entries are skipped and trimmed: after thousands of changes the choice is
    what a plain scan of every owner says."""
    rng, s, live, at = random.Random(7), Shares(), {}, 0.0
    for _ in range(5000):
        owner = f"o{rng.randrange(12)}"
        if live.get(owner) and rng.random() < 0.4:
            entry_id = rng.choice(list(live[owner]))
            s.remove(owner, entry_id)
            del live[owner][entry_id]
        else:
            at += 1
            entry_id, size = f"e{at:.0f}", rng.randrange(1, 500)
            s.add(owner, entry_id, at, size)
            live.setdefault(owner, {})[entry_id] = (at, size)
        holding = {o: e for o, e in live.items() if e}
        for measure in (COUNT, BYTES):
            def held(o, measure=measure):
                return len(holding[o]) if measure == COUNT else sum(size for _, size in holding[o].values())
            expected = min(holding, key=lambda o: (-held(o), min(a for a, _ in holding[o].values()), o))
            assert s.victim(measure) == (expected, min(holding[expected], key=lambda e: holding[expected][e][0]))
        assert all(len(h) <= 4 * 12 + 65 for h in s._heaps)  # (stale entries trimmed: bounded)


# --- the store in memory, and its directory copy -------------------------------------------------


async def put(store, owner: str, response_id: str, text: str = "x") -> None:
    assert await store.put(response_id, [{"role": "user", "content": text}], {"id": response_id}, owner=owner)


async def kept(store, owner: str, ids) -> list[str]:
    return [i for i in ids if await store.get(i, owner=owner) is not None]


def rid(owner: str, i: int) -> str:
    return f"resp_{owner[-1]}{i:07d}"


async def test_a_flooding_owner_pushes_out_only_its_own_entries():
    store = ResponseStore(ttl=1e9, max_entries=10, max_bytes=1 << 20, clock=Clock())
    a = [rid("a", i) for i in range(3)]
    b = [rid("b", i) for i in range(50)]
    for i in a:
        await put(store, "client.a", i)
    for i in b:
        await put(store, "client.b", i)
    assert await kept(store, "client.a", a) == a
    assert await kept(store, "client.b", b) == b[-7:] and len(store) == 10
    # the byte cap the same way: b's large entries go, never the shared owner's small ones
    small = ResponseStore(ttl=1e9, max_entries=100, max_bytes=3_000, clock=Clock())
    for i in a:
        await put(small, "", i)
    for i in b[:5]:
        await put(small, "client.b", i, "y" * 900)
    assert await kept(small, "", a) == a and await kept(small, "client.b", b[:5]) == b[3:5]
    assert small.bytes <= 3_000


async def test_the_directory_copy_rebuilds_each_owners_share_after_a_restart(tmp_path):
    d = str(tmp_path / "store")
    store = ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=d)
    a, b = [rid("a", i) for i in range(3)], [rid("b", i) for i in range(20)]
    for i in a:
        await put(store, "client.a", i)
    for i in b[:7]:
        await put(store, "client.b", i)
    again = ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=d)
    assert len(again) == 10
    for i in b[7:]:
        await put(again, "client.b", i)
    assert await kept(again, "client.a", a) == a and await kept(again, "client.b", b) == b[-7:]
    assert sorted(p.stem for p in (tmp_path / "store").glob("resp_*.json")) == sorted(
        [f"{i}@client.a" for i in a] + [f"{i}@client.b" for i in b[-7:]])  # (each owner's file its own)


# --- Redis: the same choices, and the version before's entries ------------------------------------


def redis_kept(r) -> set[str]:
    return {m.decode() for m in r.zrange("resp2chat:entries", 0, -1)}


async def test_redis_keeps_what_memory_keeps(redis_server):
    """One random sequence of writes, rewrites and deletes by four owners (the shared one too; an
    owner writing an id another owner holds too), through the memory store and the Lua script, caps on count and bytes: after each step both
    hold the same entries, and Redis's accounting adds up, and both show the same figures of who
    fills them (/metrics: each owner's, the forwarded credentials' together), the Redis ones
    kept by its script (counted again from the shares when its count went missing, as after
    an upgrade)."""
    state = RedisState(redis_server.url)
    r = redis_server.client()
    rng = random.Random(23)
    clock = Clock()
    memory = ResponseStore(ttl=1e9, max_entries=12, max_bytes=6_000, clock=clock)
    redis = RedisResponseStore(state, ttl=3600, max_entries=12, max_bytes=6_000)
    owners = ["", "client.a", "client.b", "auth-" + "0" * 32]
    written: list[tuple[str, str]] = []
    try:
        for step in range(300):
            clock.now += 1
            owner = rng.choice(owners[:2] if step % 3 else owners)  # (some owners write more)
            if written and rng.random() < 0.1:
                o, i = rng.choice(written)
                assert await memory.delete(i, owner=o) == await redis.delete(i, owner=o)
            else:
                again = rng.random() if written else 1.0
                # (its own entry again; another owner's id, as a replayed answer keeps its recorded id; a new one)
                o, i = rng.choice(written) if again < 0.2 else (owner, rng.choice(written)[1]) if again < 0.3 \
                    else (owner, f"resp_{step:08d}")
                text = "z" * rng.choice((10, 50, 300, 1500))
                for store in (memory, redis):
                    assert await store.put(i, [{"role": "user", "content": text}], {"id": i}, owner=o)
                written.append((o, i))
            assert redis_kept(r) == {namespace(o) + i for o, i in memory._entries}, step
            assert r.zcard("resp2chat:entries") == len(memory)
            assert int(r.get("resp2chat:entries:bytes") or 0) == memory.bytes
            held = {k.decode(): int(v) for k, v in r.hgetall("resp2chat:owners:bytes").items()}
            assert held == {namespace(o): memory._shares.held(o)[1] for o in owners if memory._shares.held(o)[0]}
            assert await redis.figures(owners[1:3]) == await memory.figures(owners[1:3]), step
            if step == 150:
                r.delete("resp2chat:owners:kinds")  # (the version before kept none)
    finally:
        await state.close()


def write_as_the_version_before(r, owner: str, response_id: str, at: float, text: str) -> str:
    """What the version before's script left for an entry: its hash, and one index of every
    owner's entries by time with their sizes (no shares)."""
    member = namespace(owner) + response_id
    data = json.dumps({"items": [{"role": "user", "content": text}], "response": {"id": response_id}},
                      separators=(",", ":"))
    r.hset(f"resp2chat:{namespace(owner)}response:{response_id}", mapping={"data": data, "items": "", "v": 1})
    r.expire(f"resp2chat:{namespace(owner)}response:{response_id}", 3600)
    r.zadd("resp2chat:responses", {member: at})
    r.hset("resp2chat:responses:sizes", member, len(data))
    r.incrby("resp2chat:responses:bytes", len(data))
    return member


async def test_redis_reads_and_evicts_entries_the_version_before_wrote(redis_server):
    r = redis_server.client()
    now = float(r.time()[0])
    a = [rid("a", i) for i in range(3)]
    b = [rid("b", i) for i in range(100)]
    for n, i in enumerate(a):
        write_as_the_version_before(r, "client.a", i, now - 100 + n, "a")
    for n, i in enumerate(b[:70]):  # more than one write moves in at once: past the caps meanwhile
        write_as_the_version_before(r, "client.b", i, now - 90 + n, "b")
    state = RedisState(redis_server.url)
    store = RedisResponseStore(state, ttl=3600, max_entries=10, max_bytes=1 << 20)
    try:
        assert (await store.get(a[0], owner="client.a"))["items"] == [{"role": "user", "content": "a"}]
        for i in b[70:]:
            await put(store, "client.b", i)
        assert len(store) == 10  # the cap held from the first write on
        assert await kept(store, "client.a", a) == a and await kept(store, "client.b", b) == b[-7:]
        assert not r.exists("resp2chat:responses") and not r.exists("resp2chat:responses:bytes")
        assert int(r.get("resp2chat:entries:bytes")) == sum(int(v) for v in r.hvals("resp2chat:entries:sizes")) == \
            sum(int(v) for v in r.hvals("resp2chat:owners:bytes"))
    finally:
        await state.close()


async def test_redis_moves_in_every_entry_of_the_version_befores_last_batch(redis_server):
    """A store the version before left with fewer entries than one write moves in (its last batch):
    every one of them joins the index and its owner's share, none is left outside the caps."""
    r = redis_server.client()
    now = float(r.time()[0])
    a = [rid("a", i) for i in range(5)]
    for n, i in enumerate(a):
        write_as_the_version_before(r, "client.a", i, now - 100 + n, "a")
    state = RedisState(redis_server.url)
    store = RedisResponseStore(state, ttl=3600, max_entries=4, max_bytes=1 << 20)
    try:
        await put(store, "client.b", rid("b", 0))
        assert not r.exists("resp2chat:responses")
        assert r.zcard("resp2chat:entries") == len(store) == 4  # (the cap holds: a's oldest two gone)
        assert await kept(store, "client.a", a) == a[2:]
        assert int(r.get("resp2chat:entries:bytes")) == sum(int(v) for v in r.hvals("resp2chat:entries:sizes")) == \
            sum(int(v) for v in r.hvals("resp2chat:owners:bytes"))
    finally:
        await state.close()


async def test_redis_evicts_even_when_redis_lost_an_index_key(redis_server):
    """Redis may lose a key of the index (an eviction policy such as allkeys-lru under memory
    pressure, an operator's DEL): a write past a cap still ends, the cap held, instead of a
    script that picks the same victim forever (Redis busy, every replica's call refused)."""
    r = redis_server.client()
    state = RedisState(redis_server.url)
    store = RedisResponseStore(state, ttl=3600, max_entries=3, max_bytes=1 << 20)
    try:
        for n in range(3):
            await put(store, "client.a", rid("a", n))
        r.delete("resp2chat:entries:sizes")
        await put(store, "client.a", rid("a", 3))
        assert len(store) == 3 and r.zcard("resp2chat:entries") == 3
        await put(store, "client.b", rid("b", 0))
        assert await kept(store, "client.b", [rid("b", 0)]) == [rid("b", 0)]
        assert r.zcard("resp2chat:entries") == 3
    finally:
        await state.close()


# --- through real gateways: two clients -----------------------------------------------------------

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


@pytest.mark.parametrize("where", ["memory", "disk", "redis"])
def test_one_clients_flood_leaves_anothers_stored_state(where, upstream, tmp_path, request):
    """max_sessions 10; alice stores 3 responses and a conversation, bob stores 50 responses (with
    Redis, on two replicas in turn): alice's four are all there (GET, previous_response_id, the
    conversation's items), bob keeps his newest 6."""
    env = cli_env(tmp_path, RESP2CHAT_CLIENTS=json.dumps([{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}]))
    args = ["--set", "resp2chat_max_sessions=10", "--set", "resp2chat_max_replay_entries=0"]
    r = None
    if where == "disk":
        args += ["--set", f"resp2chat_session_store_dir={tmp_path / 'sessions'}"]
    if where == "redis":
        redis_server = request.getfixturevalue("redis_server")
        args += ["--set", f"resp2chat_state_store_url={redis_server.url}"]
        r = redis_server.client()
    gws = [start_gateway(upstream.origin, tmp_path, *args, env=env) for _ in range(2 if r else 1)]

    def stored(name: str, response_id: str) -> None:  # (Redis writes run just after the answer)
        if r is not None:
            wait_until(lambda: r.exists(f"resp2chat:owner:client.{name}:response:{response_id}"), 20,
                       f"{response_id} stored")

    try:
        alice = [openai_client(gw, api_key=ALICE) for gw in gws]
        bob = [openai_client(gw, api_key=BOB) for gw in gws]
        mine = []
        for n in range(3):
            mine.append(alice[0].responses.create(model="demo-model", input=f"alice's note {n}").id)
            stored("alice", mine[-1])
        conv = alice[0].conversations.create(items=[{"role": "user", "content": "alice's conversation"}])
        theirs = []
        for n in range(50):
            theirs.append(bob[n % len(bob)].responses.create(model="demo-model", input=f"bob's flood {n}").id)
            stored("bob", theirs[-1])
        for client in alice:  # every replica
            assert [client.responses.retrieve(i).id for i in mine] == mine
            assert [i.content[0].text for i in client.conversations.items.list(conv.id)] == ["alice's conversation"]
        for n, i in enumerate(mine):
            upstream.clear()
            follow = alice[-1].responses.create(model="demo-model", input="go on", previous_response_id=i,
                                                store=False)  # (reads alone: the counts stay as they are)
            assert follow.output_text == "You said: go on"
            assert upstream.requests()[-1]["messages"][0]["content"] == f"alice's note {n}"
        headers = {"authorization": f"Bearer {BOB}"}
        # (all at once: with Redis each unknown id is asked again for the store's fresh_wait, 2 s, before
        # its 404, as it may be on its way from another replica; one after the other that was 90 s)
        with ThreadPoolExecutor(len(theirs)) as pool:
            found = list(pool.map(lambda i: requests.get(f"{gws[0].base_url}/responses/{i}", headers=headers,
                                                         timeout=30).status_code, theirs))
        assert found == [404] * 44 + [200] * 6
        with pytest.raises(openai.BadRequestError) as err:
            bob[0].responses.create(model="demo-model", input="x", previous_response_id=theirs[0])
        assert err.value.code == "previous_response_not_found"
    finally:
        for gw in gws:
            gw.stop()
