"""previous_response_id and stored responses: the store's bounds, and the API through mitmdump."""

from __future__ import annotations

import stat

import openai
import pytest
import requests

from helpers import Clock, openai_client
from resp2chat_io.store import ResponseStore

EXEC = {"type": "function", "name": "exec_command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}


# --- the store's bounds (a fake clock) ---------------------------------------------------------


async def test_store_expires_by_ttl():
    clock = Clock()
    store = ResponseStore(ttl=60, max_entries=10, max_bytes=1 << 20, clock=clock)
    await store.put("resp_aaaaaaaa", [{"role": "user", "content": "a"}], {"id": "resp_aaaaaaaa"})
    clock.now += 59
    assert await store.get("resp_aaaaaaaa") is not None
    clock.now += 2
    assert await store.get("resp_aaaaaaaa") is None and len(store) == 0 and store.bytes == 0


async def test_store_evicts_oldest_by_count_and_memory():
    store = ResponseStore(ttl=1e9, max_entries=3, max_bytes=10_000, clock=Clock())
    for i in range(5):
        await store.put(f"resp_{i:08d}", [], {"id": i})
    assert len(store) == 3 and await store.get("resp_00000000") is None and await store.get("resp_00000004")
    big = ResponseStore(ttl=1e9, max_entries=100, max_bytes=3_000, clock=Clock())
    for i in range(10):
        await big.put(f"resp_{i:08d}", [{"role": "user", "content": "x" * 900}], {})
    assert big.bytes <= 3_000 and len(big) == 3 and await big.get("resp_00000009")
    await big.put("resp_huge0000", [{"content": "y" * 5_000}], {})  # larger than the store: not kept
    assert await big.get("resp_huge0000") is None and len(big) == 3


async def test_store_survives_a_restart_on_disk(tmp_path):
    d = tmp_path / "store"
    store = ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=str(d))
    await store.put("resp_disk0001", [{"role": "user", "content": "kept"}], {"id": "resp_disk0001"})
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "resp_disk0001.json").stat().st_mode) == 0o600
    again = ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=str(d))
    assert (await again.get("resp_disk0001"))["items"] == [{"role": "user", "content": "kept"}]
    await again.delete("resp_disk0001")
    assert not (d / "resp_disk0001.json").exists()
    (d / "resp_torn0001.json").write_text("{not json")
    ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20, directory=str(d))
    assert not (d / "resp_torn0001.json").exists()


# --- through mitmdump ----------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client, upstream):
    first = client.responses.create(model="demo-model", input="first question", instructions="Be brief.")
    upstream.clear()
    second = client.responses.create(model="demo-model", input="second question", previous_response_id=first.id)
    assert second.output_text == "You said: second question"
    assert second.previous_response_id == first.id
    messages = upstream.requests()[-1]["messages"]
    # instructions are not inherited (as in the OpenAI API); the history is
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "first question"
    assert messages[1]["content"] == "You said: first question"
    assert messages[1]["reasoning_content"] == "Thinking about: first question"


def test_previous_response_id_with_tool_calls_streaming(client, upstream):
    first = client.responses.create(model="demo-model", input="run: echo 7", tools=[EXEC])
    call = first.output[-1]
    assert call.type == "function_call"
    upstream.clear()
    with client.responses.stream(model="demo-model", tools=[EXEC], previous_response_id=first.id, input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "7\n"}]) as stream:
        final = stream.get_final_response()
    assert final.output_text == "The tool returned: 7"
    messages = upstream.requests()[-1]["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == call.call_id and messages[-1]["role"] == "tool"
    # and a third turn chains through the second
    third = client.responses.create(model="demo-model", input="thanks", previous_response_id=final.id, tools=[EXEC])
    assert third.output_text == "You said: thanks"
    roles = [m["role"] for m in upstream.requests()[-1]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "user"]


def test_unknown_or_unstored_previous_response(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="demo-model", input="x", previous_response_id="resp_doesnotexist")
    assert info.value.body["code"] == "previous_response_not_found"
    unstored = client.responses.create(model="demo-model", input="forget me", store=False)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="demo-model", input="x", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_retrieve_and_delete(client, gateway):
    resp = client.responses.create(model="demo-model", input="keep this")
    got = client.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == "You said: keep this" and got.status == "completed"
    r = requests.delete(f"{gateway.base_url}/responses/{resp.id}", timeout=10)
    assert r.json() == {"id": resp.id, "object": "response", "deleted": True}
    assert requests.get(f"{gateway.base_url}/responses/{resp.id}", timeout=10).status_code == 404


def test_store_on_disk_survives_gateway_restart(upstream, gateway_factory, tmp_path):
    args = ("--set", f"resp2chat_session_store_dir={tmp_path / 'sessions'}")
    gw = gateway_factory(upstream.origin, *args)
    c = openai_client(gw)
    first = c.responses.create(model="demo-model", input="remember across restarts")
    gw.stop()
    files = list((tmp_path / "sessions").iterdir())
    assert [f.name for f in files] == [f"{first.id}.json"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    gw2 = gateway_factory(upstream.origin, *args)
    c2 = openai_client(gw2)
    upstream.clear()
    second = c2.responses.create(model="demo-model", input="still there?", previous_response_id=first.id)
    assert second.output_text == "You said: still there?"
    assert upstream.requests()[-1]["messages"][0]["content"] == "remember across restarts"


def test_store_count_bound_through_gateway(upstream, gateway_factory):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_sessions=2", "--set", "resp2chat_max_replay_entries=0")
    c = openai_client(gw)
    ids = [c.responses.create(model="demo-model", input=f"n{i}").id for i in range(3)]
    statuses = [requests.get(f"{gw.base_url}/responses/{i}", timeout=10).status_code for i in ids]
    assert statuses == [404, 200, 200]
