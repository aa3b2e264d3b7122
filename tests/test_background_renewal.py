"""A running background response's renewal (addons/background.py ``_renew``, every ``RENEW_SECS``)
through store.py's ``renew`` on every store (memory, its directory copy, Redis on a real
redis-server): its Response written again, its conversation neither read nor written, under
the version check; and, through real mitmdump gateways, what a run does when the store can no
longer take it, is deleted, or cannot be asked (Redis down) while a client resumes it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from helpers import (Endless, KiB, LocalServer, QuietHandler, chat_event, http_chunk, openai_client, parse_sse,
                     start_gateway, start_mitmweb_gateway, start_sse, wait_until)
from resp2chat_core import background as B
from resp2chat_io.redis_state import RedisResponseStore, RedisState
from resp2chat_io.store import ResponseStore
from redis_server import RedisServer

SLOW = "noreason\nwords: 40\nslow: 100"  # (the demo upstream: 40 words, 0.1 s apart: ~4 s)
BOUNDS = dict(ttl=3600, max_entries=100, max_bytes=64 << 20)


@pytest.fixture(params=["memory", "directory", "redis"])
def where(request, tmp_path):
    """Which store (``opened``): its kind, and its directory or Redis URL."""
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_server").url
    return request.param, str(tmp_path / "store")


@contextlib.asynccontextmanager
async def opened(where, **bounds):
    """A store of that kind: ``make()`` gives one (again: a restart, for the directory copy)."""
    kind, place = where
    states = []

    def make():
        if kind == "redis":
            states.append(RedisState(place))
            return RedisResponseStore(states[-1], **{**BOUNDS, **bounds})
        return ResponseStore(directory=place if kind == "directory" else None, **{**BOUNDS, **bounds})
    try:
        yield make
    finally:
        for state in states:
            await state.close()


def message(n: int, size: int, role: str = "user") -> dict:
    kind = "input_text" if role == "user" else "output_text"
    return {"type": "message", "id": f"msg_{role[0]}{n:06d}", "role": role,
            "content": [{"type": kind, "text": f"{n} " + "x" * size}]}


def conversation(total: int) -> list:
    """About ``total`` bytes of turns, ~5 KiB each; its assistant messages are items a response
    produced (their ids)."""
    return [message(n, 5 * KiB, ("user", "assistant")[n % 2]) for n in range(max(total // (5 * KiB), 2))]


def running(rid: str, output: list, **private) -> dict:
    return B.running({"id": rid, "object": "response", "status": "in_progress", "background": True,
                      "output": output, B.PRIVATE: {"streamed": False, **private}}, time.time())


def out(n: int, text: str = "word") -> dict:
    return {"type": "message", "id": f"msg_out{n:04d}", "role": "assistant", "status": "in_progress",
            "content": [{"type": "output_text", "text": f"{text} {n}", "annotations": []}]}


def listed_input(entry: dict) -> list:
    """What ``GET /v1/responses/{id}/input_items`` lists of an entry (addons/store.py ``input_items``)."""
    items = entry["items"]
    return items[:len(items) - len(entry["response"].get("output") or ())]


# --- the store's renewal ---------------------------------------------------------------------------


async def test_a_renewal_costs_the_same_whatever_the_conversation(where):
    """A renewal of a 2.5 MB conversation's response costs about what one of a 10 KB
    conversation's does (medians of 15, taken in turns: the same machine minutes), on every
    store: neither decodes nor encodes the conversation. (A ``get`` and ``put`` of the entry,
    the renewal before ``renew``: 10-20 ms memory and directory, 35-55 ms Redis, against < 1 ms.)
    The directory copy's file of the entry is not written again."""
    sizes = (2500 * KiB, 10 * KiB)
    async with opened(where) as make:
        store, entries, before = make(), {}, {}
        for size in sizes:
            rid = f"resp_size{size:010d}"
            entries[size] = rid, conversation(size), {"version": 1, "times": []}
            assert await store.put(rid, entries[size][1], running(rid, []))
            if where[0] == "directory":
                before[size] = os.stat(Path(where[1]) / f"{rid}.json")
        for k in range(15):
            for size in sizes:
                rid, _, seen = entries[size]
                t = time.perf_counter()
                found = await store.renew(rid, running(rid, [out(i) for i in range(k)]), expect=seen["version"])
                seen["times"].append(time.perf_counter() - t)
                assert found.renewed
                seen["version"] = found.version
        for size in sizes:
            rid, items, _ = entries[size]
            entry = await store.get(rid)
            assert entry["version"] == 16 and listed_input(entry) == items
            assert entry["items"][len(items):] == [out(i) for i in range(14)]
            if where[0] == "directory":
                after = os.stat(Path(where[1]) / f"{rid}.json")
                assert (after.st_ino, after.st_mtime_ns) == (before[size].st_ino, before[size].st_mtime_ns)
        cost = {size: statistics.median(entries[size][2]["times"]) for size in sizes}
        assert cost[sizes[0]] < 4 * cost[sizes[1]] + 0.003, cost


async def test_a_deleted_response_leaves_a_tombstone_an_evicted_one_none(where):
    """On every store: ``deleted`` says whether a ``delete`` removed an id (what a WebSocket's
    memory asks before continuing a response it stored), for its owner only; an entry evicted
    past a cap, one never stored, and one deleted by no one are not deleted."""
    async with opened(where, max_entries=2) as make:
        store = make()
        for n in range(3):  # (the third evicts the first)
            assert await store.put(f"resp_tomb{n:08d}", [], {"id": f"resp_tomb{n:08d}", "output": []}, owner="alice")
        assert await store.get("resp_tomb00000000", owner="alice") is None
        assert await store.delete("resp_tomb00000001", owner="alice")
        assert not await store.delete("resp_tomb00000002", owner="bob")  # (another owner's: unknown)
        assert [await store.deleted(f"resp_tomb{n:08d}", owner="alice") for n in range(3)] == [False, True, False]
        assert not await store.deleted("resp_tomb00000001", owner="bob")
        assert not await store.deleted("resp_nowhere0001", owner="alice")


async def test_a_status_is_the_responses_brief_whatever_wrote_it(where):
    """On every store: ``status`` is the stored Response's brief (background.py ``brief``: status,
    lease, a cancellation asked) and the entry's version, after a put, renewals and a renewal that
    ends it, for its owner only (another owner's entry of the same id has its own). In Redis it
    reads the fields ``s``/``sv``; an entry whose brief is of another version (a replica of the
    version before renewed it, writing no brief) or has none is read whole instead, still right."""
    rid = "resp_status000001"
    async with opened(where) as make:
        store = make()
        queued = running(rid, [])
        assert await store.put(rid, conversation(50 * KiB), queued, owner="alice")
        assert await store.put(rid, [], {"id": rid, "object": "response", "status": "completed"}, owner="bob")
        assert await store.status(rid, owner="alice") == {**B.brief(queued), "version": 1}
        assert B.is_running(await store.status(rid, owner="alice"))
        asked = B.ask_cancel(running(rid, [out(0)]))
        assert (await store.renew(rid, asked, owner="alice", expect=1)).renewed
        found = await store.status(rid, owner="alice")
        assert found == {"status": "in_progress", "background": True, B.PRIVATE: {
            "until": asked[B.PRIVATE]["until"], "cancel": True}, "version": 2} and B.cancel_asked(found)
        ended = B.cancelled_here(asked)
        assert (await store.renew(rid, ended, owner="alice", expect=2, ended=True)).renewed
        assert await store.status(rid, owner="alice") == {"status": "cancelled", "background": True, "version": 3}
        assert await store.items(["msg_out0000"], owner="alice") == {"msg_out0000": out(0)}  # (indexed as it ended)
        assert await store.status(rid, owner="bob") == {"status": "completed", "background": False, "version": 1}
        assert await store.status(rid, owner="carol") is None and await store.status("not an id") is None
        if where[0] == "directory":  # (read back after a restart: its renewal's)
            again = make()
            assert await again.status(rid, owner="alice") == {"status": "cancelled", "background": True, "version": 3}
            assert await again.items(["msg_out0000"], owner="alice") == {"msg_out0000": out(0)}
        if where[0] == "redis":  # as a replica of the version before leaves it: a renewal without a brief
            r = make().state.client
            await r.hset(f"resp2chat:owner:alice:response:{rid}", mapping={"v": 4})
            assert await store.status(rid, owner="alice") == {"status": "cancelled", "background": True, "version": 4}
            await r.hdel(f"resp2chat:owner:alice:response:{rid}", "s", "sv")
            assert await store.status(rid, owner="alice") == {"status": "cancelled", "background": True, "version": 4}


def write_before_versions(r, rid: str, response: dict, items: list) -> None:
    """An entry as the gateway wrote it before entries had versions (before conversations): its
    hash's ``data`` and ``items``, no ``v`` (nor ``s``, ``sv``, ``in``, ``r``), in the index of that
    version (``resp2chat:responses``)."""
    data = json.dumps({"items": items, "response": response}, separators=(",", ":"))
    r.hset(f"resp2chat:response:{rid}", mapping={"data": data, "items": ""})
    r.expire(f"resp2chat:response:{rid}", 3600)
    r.zadd("resp2chat:responses", {rid: float(r.time()[0])})
    r.hset("resp2chat:responses:sizes", rid, len(data))
    r.incrby("resp2chat:responses:bytes", len(data))


async def test_redis_reads_an_entry_written_before_versions_as_version_1(redis_server):
    """An entry a gateway of the version before versions wrote (no ``v``): ``get`` and ``status``
    agree, as version 1 (``status`` read it as gone, ``get`` as version 1)."""
    rid = "resp_unversioned1"
    response = {"id": rid, "object": "response", "status": "completed", "output": [out(0)]}
    write_before_versions(redis_server.client(), rid, response, [message(0, 10)])
    async with opened(("redis", redis_server.url)) as make:
        store = make()
        entry = await store.get(rid)
        assert entry == {"items": [message(0, 10)], "response": response, "version": 1}
        assert await store.status(rid) == {**B.brief(response), "version": 1} == \
            {"status": "completed", "background": False, "version": 1}
        assert await store.status(rid, owner="alice") is None  # (another owner's: unknown, as for get)


async def test_redis_writes_over_an_entry_written_before_versions_as_over_version_1(redis_server):
    """A write over an entry of the version before versions names the version ``get`` read, 1,
    and lands (the Lua script read the missing ``v`` as 0, a new entry: a write naming version 1
    was refused, so a renewal of such an entry, which puts it whole, tried again forever); it
    replaces that entry and its accounting, as over any other; a write naming another version
    is refused."""
    rid = "resp_unversioned2"
    r = redis_server.client()
    write_before_versions(r, rid, {"id": rid, "object": "response", "status": "completed", "output": []},
                          [message(0, 10)])
    async with opened(("redis", redis_server.url)) as make:
        store = make()
        assert (await store.get(rid))["version"] == 1
        assert not await store.put(rid, [message(1, 10)], {"id": rid, "object": "response"}, expect=2)
        assert await store.put(rid, [message(1, 10)], {"id": rid, "object": "response"}, expect=1)
        entry = await store.get(rid)
        assert entry["version"] == 2 and entry["items"] == [message(1, 10)]
        assert await store.status(rid) == {"status": None, "background": False, "version": 2}
        size = int(r.hget("resp2chat:entries:sizes", rid))
        assert len(store) == r.zcard("resp2chat:entries") == 1 and not r.exists("resp2chat:responses")
        assert int(r.get("resp2chat:entries:bytes")) == size == len(r.hget(f"resp2chat:response:{rid}", "data"))
        write_before_versions(r, rid, {"id": rid, "object": "response", "status": "completed", "output": []},
                              [message(0, 10)])
        r.hdel(f"resp2chat:response:{rid}", "v", "in", "r", "s", "sv")  # (as that version left it again)
        ended = {"id": rid, "object": "response", "status": "completed", "output": [out(0)]}
        renewal = await store.renew(rid, ended, expect=1, ended=True)  # (put whole: the entry has no ``in``)
        assert renewal.renewed and renewal.version == 2
        assert (await store.get(rid))["items"] == [message(0, 10), out(0)]



async def test_redis_renewal_of_an_entry_before_versions_past_max_bytes_is_too_large(redis_server):
    """A renewal of an entry of the version before (put whole, it has no ``in``) that ``put``
    refuses for the store's bounds (past ``max_bytes``; a store keeping no more entries) is
    ``too_large``, as any renewal past them: the size checked is the one ``put`` measured, the
    entry's input and its new output, and the other bounds too (before: a refusal for a bound the
    check did not see was read as another version's, and the renewal tried again until Python's
    RecursionError)."""
    rid = "resp_unversioned3"
    r = redis_server.client()
    write_before_versions(r, rid, {"id": rid, "object": "response", "status": "in_progress", "output": []},
                          [message(0, 10)])
    async with opened(("redis", redis_server.url), max_bytes=4096) as make:
        store = make()
        assert (await store.get(rid))["version"] == 1
        grown = {"id": rid, "object": "response", "status": "completed", "output": [message(1, 8000, "assistant")]}
        renewal = await store.renew(rid, grown, expect=1, ended=True)
        assert renewal is not None and renewal.too_large and not renewal.renewed
        assert (await store.get(rid))["items"] == [message(0, 10)]  # (left as it was)
    async with opened(("redis", redis_server.url), max_entries=0) as make:  # (a store that keeps nothing more)
        renewal = await make().renew(rid, {**grown, "output": []}, expect=1, ended=True)
        assert renewal is not None and renewal.too_large


def test_a_gateway_answers_for_an_entry_written_before_versions(upstream, gateway_factory, redis_server):
    """Through a real gateway on Redis, a response stored by a gateway of the version before
    versions (a response this one stored, its hash then left as that version wrote it: ``data``
    and ``items``, no ``v``) is a stored response like any: a GET of it, its input items, a
    continuation from it; a cancellation and a resume of it are refused as for any response
    that is not a background one (400), not as for one that is gone (404)."""
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
    r, client = redis_server.client(), openai_client(gw)
    first = client.responses.create(model="demo-model", input="noreason\nold question")
    key = f"resp2chat:response:{first.id}"
    wait_until(lambda: r.exists(key), 20, f"{first.id} stored")
    r.hdel(key, "v", "s", "sv", "in", "r")
    assert set(r.hkeys(key)) == {b"data", b"items"} | {k for k in r.hkeys(key) if k.startswith(b"d:")}
    got = client.responses.retrieve(first.id)
    assert (got.status, got.output_text, got.output[-1].id) == ("completed", first.output_text, first.output[-1].id)
    listed = client.responses.input_items.list(first.id, order="asc").data
    assert [i.content[0].text for i in listed] == ["noreason\nold question"]
    upstream.clear()
    follow = client.responses.create(model="demo-model", input="noreason\nnew question", previous_response_id=first.id)
    assert follow.status == "completed"
    assert [m["content"] for m in upstream.requests()[-1]["messages"]] == \
        ["noreason\nold question", first.output_text, "noreason\nnew question"]
    cancel = requests.post(f"{gw.base_url}/responses/{first.id}/cancel", timeout=10)
    resume = requests.get(f"{gw.base_url}/responses/{first.id}?stream=true", timeout=10)
    assert (cancel.status_code, resume.status_code) == (400, 400), (cancel.text, resume.text)


async def test_renewals_keep_the_entry_right(where):
    """On every store: a renewal writes the Response (its lease, its output, which the
    conversation ends with: the input items listed stay the input) over the version it names,
    else answers the Response there (a cancellation another replica stored), writing nothing;
    None once the entry is gone; ``too_large`` past the byte cap. What the conversation holds
    resolves as before; the output so far is indexed for ``item_reference`` only once the run
    ends (its ``put``). The directory copy: a restart reads the renewal back, or the ``put``
    after it."""
    rid, items = "resp_renewed0001", conversation(40 * KiB)
    async with opened(where, max_bytes=200 * KiB) as make:
        store = make()
        first = await store.put("resp_earlier0001", items, {"id": "resp_earlier0001", "output": items[-1:]})
        assert first and await store.put(rid, items, running(rid, []))
        lease = running(rid, [out(0)])
        assert await store.renew(rid, lease, expect=1) == (2, None, False)
        entry = await store.get(rid)
        assert entry["version"] == 2 and entry["response"] == lease and entry["items"] == items + [out(0)]
        assert listed_input(entry) == items
        # another replica asks for its cancellation (over what it read): the next renewal gets it, writes nothing
        assert await store.put(rid, entry["items"], B.ask_cancel(entry["response"]), expect=2)
        found = await store.renew(rid, running(rid, [out(0), out(1)]), expect=2)
        assert found.version == 3 and not found.renewed and B.cancel_asked(found.response)
        assert found.response == B.ask_cancel(lease)
        assert (await store.get(rid))["version"] == 3
        # over that version: the output grows, then is another (the conversation follows it)
        for output in ([out(0), out(1), out(2)], [out(5, "other")], []):
            found = await store.renew(rid, running(rid, output), expect=found.version)
            assert found.renewed
            entry = await store.get(rid)
            assert entry["items"] == items + output and listed_input(entry) == items and entry["version"] == found.version
        final = await store.renew(rid, lease, expect=found.version)
        # what it holds of the conversation resolves; its output only once its end is stored
        assert await store.items([items[-1]["id"], "msg_out0002"]) == {items[-1]["id"]: items[-1]}
        if where[0] == "directory":
            again = await make().get(rid)
            assert again == await store.get(rid) and again["version"] == final.version
        # past the byte cap: not written
        huge = running(rid, [out(0, "y" * 300 * KiB)])
        assert await store.renew(rid, huge, expect=final.version) == (final.version, None, True)
        assert (await store.get(rid))["response"] == lease
        # its end: a put over the version it renewed last; its output resolves now
        done = {**lease, "status": "completed", "output": [{**out(0), "status": "completed"}]}
        assert await store.put(rid, items + done["output"], done, expect=final.version)
        assert (await store.items(["msg_out0000"]))["msg_out0000"]["status"] == "completed"
        if where[0] == "directory":
            assert not (Path(where[1]) / f"{rid}.renewal").exists()
            assert (await make().get(rid))["response"] == done
        assert await store.delete(rid)
        assert await store.renew(rid, lease, expect=final.version + 1) is None
        assert await store.renew("resp_nowhere0001", lease, expect=1) is None


async def test_a_restart_reads_a_renewal_only_over_the_file_it_renewed(tmp_path):
    """The directory copy: a renewal beside an entry's file names the version of that file; a
    ``put`` torn after it wrote the file but before it removed the renewal leaves a renewal of
    another version, which a restart drops (the file is the entry), as one whose file is gone."""
    where = str(tmp_path / "store")
    store = ResponseStore(directory=where, **BOUNDS)
    rid, items = "resp_torn000001", conversation(20 * KiB)
    assert await store.put(rid, items, running(rid, []))
    assert (await store.renew(rid, running(rid, [out(0)]), expect=1)).renewed
    renewal = (Path(where) / f"{rid}.renewal").read_bytes()
    done = {**running(rid, [out(0)]), "status": "completed"}
    assert await store.put(rid, items + [out(0)], done, expect=2)
    (Path(where) / f"{rid}.renewal").write_bytes(renewal)  # (as a put torn in between leaves it)
    (Path(where) / "resp_gone0000001.renewal").write_bytes(renewal)
    again = ResponseStore(directory=where, **BOUNDS)
    assert await again.get(rid) == {"items": items + [out(0)], "response": done, "version": 3}
    assert sorted(p.name for p in Path(where).iterdir()) == [f"{rid}.json"]


# --- through a gateway -------------------------------------------------------------------------------


def test_a_running_response_leaves_its_conversations_file_alone(upstream, gateway_factory, tmp_path):
    """A background response of a 400 KiB conversation (what the demo model takes) on a gateway with a store directory: while
    it runs, its renewals write its Response beside the entry's file (``.renewal``), never the
    file itself; its input items are listed meanwhile; its end is a renewal too (one that ends
    it: store.py ``renew(…, ended=True)``), the file still untouched, which a restarted gateway
    reads with the renewal over it."""
    store = tmp_path / "store"
    args = ("--set", f"resp2chat_session_store_dir={store}")
    client = openai_client(gateway_factory(upstream.origin, *args))
    history = [{"role": "user", "content": "z " * (200 * KiB)}, {"role": "user", "content": SLOW}]
    queued = client.responses.create(model="demo-model", input=history, background=True)
    path, renewal = store / f"{queued.id}.json", store / f"{queued.id}.renewal"
    before = os.stat(path)
    seen = set()

    def renewed_twice():
        if renewal.exists():
            seen.add(json.loads(renewal.read_bytes())["version"])
        return len(seen) >= 2
    wait_until(renewed_twice, 10, "two renewals")
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert client.responses.retrieve(queued.id).status == "in_progress"
    listed = client.responses.input_items.list(queued.id, order="asc")
    assert [len(i.content[0].text) for i in listed.data] == [400 * KiB, len(SLOW)]
    done = wait_until(lambda: (r := client.responses.retrieve(queued.id)).status == "completed" and r, 30, "its end")
    assert len(done.output_text.split()) == 40
    assert json.loads(renewal.read_bytes())["response"]["status"] == "completed"
    ended = os.stat(path)
    assert (ended.st_ino, ended.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    again = openai_client(gateway_factory(upstream.origin, *args))
    assert again.responses.retrieve(queued.id).output_text == done.output_text


class Flood(QuietHandler):
    """A backend whose answer is larger than a 1 MiB store keeps: 1.5 MiB of text, 64 KiB a
    chunk, 20 chunks a second."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        start_sse(self)
        for _ in range(24):
            self.wfile.write(http_chunk(chat_event({"content": "f " * 32 * KiB})))
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(http_chunk(chat_event({}, "stop") + b"data: [DONE]\n\n") + http_chunk(b""))
        self.wfile.flush()


def test_a_run_the_store_can_no_longer_take_ends_failed(gateway_factory):
    """A background response whose output is larger than the store keeps
    (``max_session_memory_mb``): it is stored ``failed`` with ``response_too_large`` when it
    ends, kept without its output (its input items listed as before), said once in the
    gateway's log; not left ``in_progress`` until its lease lapsed, then read as a dead
    gateway's ``server_error``. (A renewal the store refuses stops the run so, at once:
    store.py ``renew``'s ``too_large``, tests above.)"""
    with LocalServer(Flood) as flood:
        gw = gateway_factory(flood.url, "--set", "resp2chat_max_session_memory_mb=1")
        client = openai_client(gw)
        queued = client.responses.create(model="m", input="flood", background=True)
        ended = wait_until(lambda: (r := client.responses.retrieve(queued.id)).status not in B.RUNNING and r, 20,
                           "its end")
        assert ended.status == "failed" and (ended.error.code, ended.error.type) == ("server_error", "response_too_large"), ended.error
        assert ended.output == []
        assert [i.content[0].text for i in client.responses.input_items.list(queued.id).data] == ["flood"]
        said = gw.log()  # (the store's warning once, at a renewal or at its end)
        assert said.count("is larger than the response store keeps") + said.count(
            "are larger than the response store keeps") == 1, said[-3000:]
        assert "failed (response_too_large)" in said  # (its turn ended so, as the store says: not completed)


def test_deleting_a_running_response_stops_its_backend_call(endless, gateway_factory):
    """``DELETE /v1/responses/{id}`` of a background response running on this replica stops its
    run at once (its backend call closed); it stays deleted (404)."""
    here = openai_client(gateway_factory(endless.url))
    queued = here.responses.create(model="m", input="go on", background=True)
    wait_until(lambda: Endless.started, 10, "the backend call")
    assert here.responses.delete(queued.id) is None
    wait_until(lambda: Endless.closed, 5, "the backend call closed")
    with pytest.raises(openai.NotFoundError):
        here.responses.retrieve(queued.id)


def test_deleting_a_response_running_on_another_replica_stops_it_at_its_next_renewal(endless, gateway_factory,
                                                                                     redis_server):
    """Replica B deletes a background response replica A runs: A's next renewal finds the entry
    gone and stops the run (its backend call closed), which stays deleted (404 on both)."""
    a, b = [openai_client(gateway_factory(endless.url, "--set", f"resp2chat_state_store_url={redis_server.url}"))
            for _ in range(2)]
    queued = a.responses.create(model="m", input="go on", background=True)
    wait_until(lambda: Endless.started, 10, "the backend call")
    b.responses.delete(queued.id)
    wait_until(lambda: Endless.closed, B.RENEW_SECS + 5, "the backend call closed at the next renewal")
    for client in (a, b):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(queued.id)


def test_a_resume_checks_include(upstream, gateway_factory):
    """A resume (``GET /v1/responses/{id}?stream=true``) refuses an ``include`` the API does not
    define, as a GET of it does: a 400 naming ``include``."""
    gw = gateway_factory(upstream.origin)
    client = openai_client(gw)
    stream = client.responses.create(model="demo-model", input=SLOW, background=True, stream=True)
    first = next(iter(stream))
    stream.close()
    for ask in ("", "?stream=true&"):
        bad = requests.get(f"{gw.base_url}/responses/{first.response.id}{ask or '?'}include=nonsense", timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "include", (ask, bad.text)
    good = requests.get(f"{gw.base_url}/responses/{first.response.id}?stream=true&include=reasoning.encrypted_content",
                        timeout=30)
    assert good.status_code == 200 and parse_sse(good.content)[-1]["type"] == "response.completed"


def test_a_resume_on_the_replica_running_it_survives_a_redis_blip(upstream, gateway_factory, redis_server):
    """A resume on the replica running the response streams from that replica's events when
    the store does not answer (Redis down: the response is not known deleted), rather than
    a 503."""
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}")
    client = openai_client(gw)
    stream = client.responses.create(model="demo-model", input=SLOW, background=True, stream=True)
    first = next(iter(stream))
    stream.close()
    redis_server.stop()
    try:
        resumed = requests.get(f"{gw.base_url}/responses/{first.response.id}?stream=true"
                               f"&starting_after={first.sequence_number}", timeout=30)
        assert resumed.status_code == 200, resumed.text
        events = parse_sse(resumed.content)
        assert events[0]["sequence_number"] == first.sequence_number + 1 and events[-1]["type"] == "response.completed"
    finally:
        redis_server.start()


def test_a_run_ends_in_the_store_it_was_queued_in_when_state_store_url_changes(upstream, tmp_path, redis_server):
    """``state_store_url`` changed while a background response runs (mitmweb's options): its
    renewals and its end still go to the store it was queued in (before, its next renewal, in the
    new store where it is not, read it as deleted and stopped it): its client gets it whole, and a
    replica on the old store sees it completed; requests here read the new store, where it is
    unknown (404, and a cancel does not stop it); the old Redis is let go once the run ended."""
    gw, put = start_mitmweb_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
    try:
        events = iter(openai_client(gw).responses.create(model="demo-model", input=SLOW, background=True,
                                                          stream=True))
        rid = next(events).response.id
        with RedisServer(tmp_path / "other") as other:
            assert put(resp2chat_state_store_url=other.url).status_code == 200
            assert stored_status(redis_server.url, rid)["status"] in B.RUNNING  # (switched while it ran)
            assert requests.get(f"{gw.base_url}/responses/{rid}", timeout=10).status_code == 404
            assert requests.post(f"{gw.base_url}/responses/{rid}/cancel", timeout=10).status_code == 404
            rest = list(events)
            assert rest[-1].type == "response.completed", [e.type for e in rest[-3:]]
            streamed = rest[-1].response.output_text
            assert len(streamed.split()) == 40
            old = redis_server.client()
            wait_until(lambda: len(old.client_list()) == 1, 10, "the gateway's connections to the old Redis closed")
            old.close()
        replica = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
        try:
            kept = openai_client(replica).responses.retrieve(rid)
            assert kept.status == "completed" and kept.output_text == streamed
        finally:
            replica.stop()
        assert "Traceback" not in gw.log(), gw.log()
    finally:
        gw.stop()


def stored_status(url: str, response_id: str) -> dict | None:
    """A response's status as the Redis at ``url`` holds it (store.py ``status``), read there."""
    async def read():
        state = RedisState(url)
        try:
            return await RedisResponseStore(state, **BOUNDS).status(response_id)
        finally:
            await state.close()
    return asyncio.run(read())


def test_a_run_being_queued_when_state_store_url_changes_lives_in_the_store_it_was_queued_in(upstream, tmp_path,
                                                                                            redis_server):
    """``state_store_url`` changed while a background response's first write (``Background.queue``:
    stored ``queued``) is still in flight in the old Redis (held there: ``CLIENT PAUSE … WRITE``):
    the old Redis is not closed under it (before, no run lived there yet, so it was closed at once:
    the write was cut, or the run's renewals and end failed, the entry left ``queued`` there until
    its lease ran out); it runs to its end there, and the old Redis is let go after."""
    gw, put = start_mitmweb_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
    old = redis_server.client()
    try:
        with RedisServer(tmp_path / "other") as other:
            old.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            created = {}
            asked = threading.Thread(target=lambda: created.update(response=openai_client(gw).responses.create(
                model="demo-model", input="noreason\nwords: 5", background=True)))
            asked.start()
            try:
                wait_until(lambda: any("b" in c["flags"] for c in old.client_list()), 10,
                           "the gateway's queued write held in the old Redis")
                assert put(resp2chat_state_store_url=other.url).status_code == 200
            finally:
                old.execute_command("CLIENT", "UNPAUSE")
                asked.join(30)
            response = created["response"]  # (its queued Response: it was stored)
            assert response.status == "queued"
            ended = wait_until(lambda: B.is_running(s := stored_status(redis_server.url, response.id)) is False and s,
                               15, "the run ended in the old Redis")
            assert ended["status"] == "completed", ended
            wait_until(lambda: len(old.client_list()) == 1, 10, "the gateway's connections to the old Redis closed")
            assert stored_status(other.url, response.id) is None
        assert "Traceback" not in gw.log(), gw.log()
    finally:
        old.close()
        gw.stop()


def test_a_run_keeps_its_redis_when_session_store_dir_then_state_store_url_change(upstream, tmp_path, redis_server):
    """With Redis, ``session_store_dir`` (the memory store's copy) changing is no new store: the
    one a background run was queued in stays the current one, so a later ``state_store_url``
    change still lets that Redis go only once the run ended there (before, a new store object was
    made on the same Redis; the run, queued in the old object, was not waited for: the old Redis
    was closed under it, its renewals and end failed, its entry left ``in_progress``)."""
    gw, put = start_mitmweb_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
    old = redis_server.client()
    try:
        queued = openai_client(gw).responses.create(model="demo-model", input="noreason\nwords: 20\nslow: 100",
                                                    background=True)
        with RedisServer(tmp_path / "other") as other:
            assert put(resp2chat_session_store_dir=str(tmp_path / "dir")).status_code == 200
            assert put(resp2chat_state_store_url=other.url).status_code == 200
            assert stored_status(redis_server.url, queued.id)["status"] in B.RUNNING  # (switched while it ran)
            ended = wait_until(lambda: B.is_running(s := stored_status(redis_server.url, queued.id)) is False and s,
                               15, "the run ended in the old Redis")
            assert ended["status"] == "completed", ended
            wait_until(lambda: len(old.client_list()) == 1, 10, "the gateway's connections to the old Redis closed")
        assert "Traceback" not in gw.log(), gw.log()
    finally:
        old.close()
        gw.stop()
