"""One random sequence of store operations through every ``Store`` (resp2chat_io/store.py): the
memory store, the memory store with its directory copy (restarted now and then: a new store
reading the same directory), and ``RedisResponseStore`` on a real redis-server. After each step
all answer alike, and as a plain model of store.py's docstring says: owners see only their own
entries (two owners' entries of one id are two entries); ``put(…, expect=version)`` writes only over that version, every ``put`` counts it up;
``items`` resolves only items the gateway produced (a response's output), held unchanged by a
live response of that owner (a later response holding an exact copy, whatever its keys' order,
becomes a holder too); what clients put in their input never resolves. ``renew(…, expect=version)``
(of an entry whose output is not indexed, as background.py renews one) replaces its Response and
the output after its input items over that version only (else answers the Response there), and
leaves what it holds as it was, but for one that ends it (``ended``), whose output it holds then.
``status`` is the Response's brief (background.py ``brief``) and its version, as ``get`` has them.

Bounds are far off (eviction: tests/test_store_shares.py compares it), and nothing expires (the
memory stores' clock moves by hand; Redis's ttl is an hour).
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import Clock
from resp2chat_io.redis_state import RedisResponseStore, RedisState
from resp2chat_core.background import PRIVATE, brief
from resp2chat_io.store import Renewal, ResponseStore, item_digest

OWNERS = ("", "client.a", "auth-" + "0" * 32)
TAGS = ("s", "a", "f")  # each owner's own id 0 (ids 1 to 3 are every owner's: a replayed answer keeps its id)
BIG = dict(max_entries=10_000, max_bytes=64 << 20)


def entry_id(owner: int, kind: int, k: int) -> str:
    return f"{('resp', 'conv')[kind]}_{TAGS[owner] if k < 1 else 'x'}{k:07d}"


def reordered(item: dict) -> dict:
    return dict(reversed(list(item.items())))


def altered(item: dict) -> dict:
    return {**item, "content": f"altered {item.get('content')!r}"}


# --- the model: store.py's docstring -------------------------------------------------------------


class Model:
    """Entries by (owner, id): their items, Response, version, and the item ids each holds. An
    item resolves through any live response of its owner holding it."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], dict] = {}
        self.produced: dict[str, dict] = {}  # item id -> the item as the gateway produced it (ids are unique)

    def resolves(self, owner: str, item_id: str) -> bool:
        return any(item_id in e["held"] for (o, _), e in self.entries.items() if o == owner)

    def _drop(self, owner: str, rid: str) -> bool:
        return self.entries.pop((owner, rid), None) is not None

    def put(self, owner: str, rid: str, items: list, response: dict, expect: int | None) -> bool:
        found = self.entries.get((owner, rid))
        version = found["version"] if found else 0
        if expect is not None and expect != version:
            return False
        self._drop(owner, rid)
        output = {i["id"]: i for i in response.get("output", ())}
        self.produced.update(output)
        held = set(output)
        for item in items:
            iid = item.get("id")
            if iid and iid not in output and iid in self.produced and self.resolves(owner, iid) \
                    and item_digest(item) == item_digest(self.produced[iid]):
                held.add(iid)
        self.entries[(owner, rid)] = {"items": items, "response": response, "version": version + 1, "held": held}
        return True

    def renewable(self, owner: str, rid: str) -> bool:
        """An entry whose output is not indexed (none, or a renewal's): what background.py renews
        (its Response queued with no output, then its renewals')."""
        found = self.entries.get((owner, rid))
        return found is None or not found["held"] & {i["id"] for i in found["response"].get("output") or ()}

    def renew(self, owner: str, rid: str, response: dict, expect: int, ended: bool) -> Renewal | None:
        """Its Response replaced, and its output after its input items; what it holds as it was,
        but for a renewal that ends it, whose output it holds then (as a put's)."""
        found = self.entries.get((owner, rid))
        if found is None:
            return None
        if found["version"] != expect:
            return Renewal(found["version"], found["response"])
        items, old = found["items"], found["response"].get("output") or ()
        found.update(items=items[:len(items) - len(old)] + response["output"], response=response,
                     version=expect + 1)
        if ended:
            output = {i["id"]: i for i in response["output"]}
            self.produced.update(output)
            found["held"] |= set(output)
        return Renewal(expect + 1)

    def status(self, owner: str, rid: str) -> dict | None:
        found = self.entries.get((owner, rid))
        return found and {**brief(found["response"]), "version": found["version"]}

    def get(self, owner: str, rid: str) -> dict | None:
        found = self.entries.get((owner, rid))
        return found and {"items": found["items"], "response": found["response"], "version": found["version"]}

    def delete(self, owner: str, rid: str) -> bool:
        return self._drop(owner, rid)

    def items(self, owner: str, ids: list[str]) -> dict[str, dict]:
        return {i: self.produced[i] for i in ids if i in self.produced and self.resolves(owner, i)}


# --- the operations ------------------------------------------------------------------------------

owner_ = st.integers(0, len(OWNERS) - 1)
pick = st.tuples(st.integers(0, 1 << 16), st.sampled_from(("same", "same", "reordered", "altered")))
put_op = st.tuples(
    st.just("put"), owner_, st.sampled_from((0, 0, 0, 1)), st.integers(0, 3),  # owner, resp/conv, which
    st.sampled_from((None, None, "right", "wrong")),  # expect
    st.sampled_from(("fresh", "continue", "again")),  # history: picked items, another entry's, its own
    st.integers(0, 1 << 16), st.lists(pick, max_size=3),
    st.integers(0, 2),  # output items (a conversation produces none)
    st.sampled_from((None, None, "reused", "new")))  # the input's id: none, a produced one (altered), a client's
ask_op = st.tuples(st.sampled_from(("get", "get", "delete")), owner_, st.integers(0, 1 << 16))
items_op = st.tuples(st.just("items"), owner_, st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4))
renew_op = st.tuples(st.just("renew"), owner_, st.integers(0, 1 << 16), st.sampled_from(("right", "right", "wrong")),
                     st.integers(0, 2),  # owner, which entry, expect, output items
                     st.sampled_from(("running", "running", "asked", "ended")))  # what it writes
# (weighed by hand: mostly writes, a restart now and then)
op_ = st.integers(0, 23).flatmap(lambda n: put_op if n < 9 else ask_op if n < 14 else items_op if n < 18
                                 else renew_op if n < 22 else st.just(("restart",)))
ops = st.lists(op_, min_size=1, max_size=40)


class Run:
    """The stores and the models one sequence drives."""

    def __init__(self, directory: str, redis: RedisResponseStore) -> None:
        self.clock = Clock()
        self.directory = directory
        self.memory = ResponseStore(ttl=1e9, clock=self.clock, **BIG)
        self.disk = self.restarted()
        self.redis = redis
        self.models = {"memory": Model(), "disk": Model(), "redis": Model()}  # (one each: a put changes its model)
        self.model = self.models["memory"]
        self.ids: list[tuple[str, str]] = []  # every (owner, id) put so far
        self.client_ids = itertools.count()
        self.counter = itertools.count()

    def restarted(self) -> ResponseStore:
        return ResponseStore(ttl=1e9, clock=self.clock, directory=self.directory, **BIG)

    @property
    def stores(self):
        return (("memory", self.memory, self.models["memory"]), ("disk", self.disk, self.models["disk"]),
                ("redis", self.redis, self.models["redis"]))

    def some_id(self, owner: str, n: int) -> str:
        """Mostly the owner's own entries (another owner's, an unknown id, one no entry can have)."""
        choices = [i for o, i in self.ids if o == owner] * 4 + [i for _, i in self.ids] + ["resp_unknown00", "not an id"]
        return choices[n % len(choices)]

    def some_item_id(self, n: int) -> str:
        choices = sorted(self.model.produced) + [f"msg_client{k}" for k in range(2)] + ["msg_unknown", "bad id"]
        return choices[n % len(choices)]

    def build(self, op) -> tuple[str, str, list, dict, int | None]:
        _, o, kind, k, expect, history, which, picks, n_out, input_id = op
        owner, rid = OWNERS[o], entry_id(o, kind, k)
        current = self.model.get(owner, rid)
        version = current["version"] if current else 0
        expect = {None: None, "right": version, "wrong": version + 1 + which % 2}[expect]
        produced = sorted(self.model.produced)
        if history == "again" and current:
            items = list(current["items"])
        elif history == "continue" and any(o2 == owner for o2, _ in self.ids):
            mine = [i for o2, i in self.ids if o2 == owner and self.model.get(owner, i)]
            items = list(self.model.get(owner, mine[which % len(mine)])["items"]) if mine else []
        else:
            items = []
            for n, how in picks if produced else ():
                item = self.model.produced[produced[n % len(produced)]]
                items.append({"same": item, "reordered": reordered(item), "altered": altered(item)}[how])
        ask = {"role": "user", "content": f"question {next(self.counter)}"}
        if input_id == "reused" and produced:
            ask = {"type": "message", "id": produced[which % len(produced)], **ask}
        elif input_id == "new":
            ask = {"type": "message", "id": f"msg_client{next(self.client_ids) % 2}", **ask}
        items.append(ask)
        if kind == 1:  # a conversation: its items, the conversation object
            return owner, rid, items, {"id": rid, "object": "conversation", "metadata": {"n": len(items)}}, expect
        output = []
        for _ in range(n_out):
            n = next(self.counter)
            output.append({"type": "reasoning", "id": f"rs_{n:06d}", "summary": [], "content": f"thought {n}"}
                          if n % 3 == 0 else
                          {"type": "message", "id": f"msg_{n:06d}", "role": "assistant", "content": f"answer {n}"})
        return owner, rid, items + output, {"id": rid, "object": "response", "output": output}, expect

    async def step(self, op) -> None:
        self.clock.now += 1
        if op[0] == "restart":
            self.disk = self.restarted()
        elif op[0] == "put":
            owner, rid, items, response, expect = self.build(op)
            for name, store, model in self.stores:
                answer = await store.put(rid, items, response, owner=owner, expect=expect)
                assert answer == model.put(owner, rid, items, response, expect), (name, "put", owner, rid, expect)
            if (owner, rid) not in self.ids:
                self.ids.append((owner, rid))
        elif op[0] == "renew":
            _, o, n, expect, n_out, how = op
            live = [(o2, i) for o2, i in self.ids if self.model.get(o2, i) and self.model.renewable(o2, i)]
            if live and n % 4:  # (mostly an entry it can renew, by its owner; else another owner's, or none)
                owner, rid = live[n % len(live)]
            else:
                owner, rid = OWNERS[o], self.some_id(OWNERS[o], n)
                if not self.model.renewable(owner, rid):
                    rid = "resp_unknown00"
            current = self.model.get(owner, rid)
            expect = (current["version"] if current else 1) + (expect == "wrong")
            output = [{"type": "message", "id": f"msg_r{next(self.counter):06d}", "role": "assistant",
                       "content": "so far"} for _ in range(n_out)]
            response = {"id": rid, "object": "response", "status": "cancelled" if how == "ended" else "in_progress",
                        "background": True, "output": output,
                        PRIVATE: {"until": float(n), "streamed": True, **({"cancel": True} if how == "asked" else {})}}
            for name, store, model in self.stores:
                answer = await store.renew(rid, response, owner=owner, expect=expect, ended=how == "ended")
                assert answer == model.renew(owner, rid, response, expect, how == "ended"), \
                    (name, "renew", owner, rid, expect, how)
        elif op[0] == "items":
            owner, ids = OWNERS[op[1]], [self.some_item_id(n) for n in op[2]]
            for name, store, model in self.stores:
                assert await store.items(ids, owner=owner) == model.items(owner, ids), (name, "items", owner, ids)
        else:
            what, owner, rid = op[0], OWNERS[op[1]], self.some_id(OWNERS[op[1]], op[2])
            for name, store, model in self.stores:
                assert await getattr(store, what)(rid, owner=owner) == getattr(model, what)(owner, rid), \
                    (name, what, owner, rid)
        # every owner's every entry, and who fills the stores (/metrics), alike everywhere
        for owner in OWNERS:
            for _, rid in self.ids:
                seen = [await store.get(rid, owner=owner) for _, store, _ in self.stores]
                assert seen[0] == seen[1] == seen[2] == self.model.get(owner, rid), (owner, rid, seen)
                seen = [await store.status(rid, owner=owner) for _, store, _ in self.stores]
                assert seen[0] == seen[1] == seen[2] == self.model.status(owner, rid), (owner, rid, seen)
        assert await self.memory.figures(OWNERS) == await self.disk.figures(OWNERS) == \
            await self.redis.figures(OWNERS)


async def run(sequence, directory: str, url: str) -> None:
    state = RedisState(url)
    try:
        await state.client.flushdb()
        run = Run(directory, RedisResponseStore(state, ttl=3600, **BIG))
        for op in sequence:
            await run.step(op)
        run.disk = run.restarted()  # (and once more at the end: what the directory holds is all there)
        for owner in range(len(OWNERS)):
            await run.step(("items", owner, list(range(len(run.model.produced) + 4))))
    finally:
        await state.close()


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


@settings(derandomize=True, max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=ops)
@example(sequence=[  # two owners put one id (a replayed answer's), renew it, and one deletes his
    ("put", 0, 0, 2, None, "fresh", 0, [], 1, None), ("put", 1, 0, 2, None, "fresh", 0, [], 2, None),
    ("renew", 0, 1, "right", 1, "running"), ("delete", 1, 0), ("put", 2, 0, 2, None, "fresh", 0, [], 1, None),
    ("renew", 2, 1, "right", 2, "ended"), ("items", 2, [0, 1, 2, 3, 4, 5])])
def test_every_store_answers_as_the_docstring_says(sequence, redis_url, tmp_path):
    asyncio.run(run(sequence, tempfile.mkdtemp(dir=tmp_path), redis_url))
