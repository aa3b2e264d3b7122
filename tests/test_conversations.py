"""The Conversations API (issue 24 item 9), through a real mitmdump: the openai SDK's
``conversations.*``, ``conversation`` on ``POST /v1/responses`` (HTTP and the WebSocket), the
OpenAI Agents SDK's ``OpenAIConversationsSession`` running a multi-turn agent, owners, the disk
copy and Redis shared by two replicas (appends from both at once all land)."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import openai
import pytest
import requests

from helpers import EVERY_PART, check_listed, openai_client, start_gateway, user, wait_until
from wsclient import WSClient


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=4")


def test_the_sdk_creates_reads_changes_and_deletes_a_conversation(gw):
    client = openai_client(gw)
    conv = client.conversations.create(metadata={"topic": "tea"}, items=[user("hello"), {"role": "user",
                                                                                         "content": "again"}])
    assert conv.id.startswith("conv_") and conv.object == "conversation" and conv.metadata == {"topic": "tea"}
    assert client.conversations.retrieve(conv.id) == conv
    assert client.conversations.update(conv.id, metadata={"topic": "coffee"}).metadata == {"topic": "coffee"}
    items = client.conversations.items.list(conv.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["hello", "again"] and all(i.id for i in items.data)
    added = client.conversations.items.create(conv.id, items=[user("third"), user("fourth")])
    assert [i.content[0].text for i in added.data] == ["third", "fourth"]
    newest = client.conversations.items.list(conv.id, limit=3)  # (desc: newest first)
    assert [i.content[0].text for i in newest.data] == ["fourth", "third", "again"] and newest.has_more
    assert [i.content[0].text for i in client.conversations.items.list(conv.id, limit=1)] == [
        "fourth", "third", "again", "hello"]  # (the SDK's auto-pagination: after)
    one = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert one.content[0].text == "third"
    client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    assert [i.content[0].text for i in client.conversations.items.list(conv.id, order="asc")] == [
        "hello", "again", "fourth"]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_listed_items_carry_every_field_the_sdk_and_spec_require_of_a_part(gw):
    """A conversation's items show a client's parts with what the API's objects require even
    where it left them out (an input_image's detail, an output_text's annotations), in a list and
    one by one."""
    client = openai_client(gw)
    conv = client.conversations.create(items=EVERY_PART)
    r = requests.get(f"{gw.base_url}/conversations/{conv.id}/items?order=asc", timeout=10)
    items = check_listed(r.json(), "ConversationItem")
    image = items[0]["content"][1]
    assert (image["type"], image["detail"], items[1]["content"][0]["annotations"]) == ("input_image", "auto", [])
    assert items[3]["output"][1]["detail"] == "auto"
    one = requests.get(f"{gw.base_url}/conversations/{conv.id}/items/{items[1]['id']}", timeout=10).json()
    assert one == items[1]


def test_refusals(gw, upstream):
    client = openai_client(gw)
    conv = client.conversations.create()
    base = f"{gw.base_url}/conversations"
    for path, body, param in (("", {"metadata": {"k": 1}}, "metadata"), ("", {"items": [{"type": "nonsense"}]},
                                                                        "items[0].type"),
                              ("", {"items": [user(str(i)) for i in range(21)]}, "items"),
                              (f"/{conv.id}/items", {"items": "no"}, "items")):
        r = requests.post(base + path, json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for url in (f"{base}/conv_nowhere", f"{base}/resp_x", f"{base}/{conv.id}/items/msg_nowhere"):
        assert requests.get(url, timeout=10).status_code == 404
    assert requests.get(f"{base}/{conv.id}/items?limit=500", timeout=10).status_code == 400
    assert requests.get(base, timeout=10).status_code == 405  # (no list of conversations, as OpenAI)
    # a conversation's id is no response's, and a response's no conversation's
    assert requests.get(f"{gw.base_url}/responses/{conv.id}", timeout=10).status_code == 404
    response = client.responses.create(model="demo-model", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="demo-model", input="hi", conversation=response.id)
    assert err.value.body["code"] == "conversation_not_found"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="demo-model", input="hi", previous_response_id=conv.id)


def test_a_json_turn_its_conversation_could_not_take_is_not_called_the_upstreams_error(gw, upstream):
    """A conversation deleted while its turn runs: a JSON client's answer is the 404
    ``conversation_not_found`` (the write's own status). Its ``type`` said ``upstream_error``,
    though the backend answered and the gateway's store refused: now ``invalid_request_error``,
    as a conversation not found is everywhere else (``GET`` of it, a turn naming it)."""
    client = openai_client(gw)
    conv = client.conversations.create().id
    deleting = threading.Timer(0.5, lambda: requests.delete(f"{gw.base_url}/conversations/{conv}", timeout=10))
    deleting.start()
    r = requests.post(f"{gw.base_url}/responses", timeout=30,
                      json={"model": "demo-model", "input": "noreason\nslow: 1500\nhello", "conversation": conv})
    deleting.join()
    assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found", r.text
    assert r.json()["error"]["type"] == "invalid_request_error", r.text
    assert requests.get(f"{gw.base_url}/conversations/{conv}", timeout=10).json()["error"]["type"] == \
        "invalid_request_error"


def test_a_conversation_takes_the_compaction_items_the_gateway_made(gw, upstream):
    """``POST /v1/responses/compact``'s output is the whole input of a later turn; a turn in a
    conversation with it as input keeps it there, and the conversation lists its sealed
    ``compaction`` item. Creating a conversation with those items (a client seeding one from a
    compaction, or copying one it listed), or adding them to one, was a 400 ("compaction items
    hold another provider's encrypted state"), for the very item the gateway made and listed.
    Now they are taken as the turn takes them: the next turn reads the summary in them. An
    item the gateway did not seal is still refused, saying so."""
    client = openai_client(gw)
    first = client.responses.create(model="demo-model", input="my name is Ada")
    compacted = requests.post(f"{gw.base_url}/responses/compact", timeout=30,
                              json={"model": "demo-model", "previous_response_id": first.id}).json()
    assert [i["type"] for i in compacted["output"]] == ["message", "compaction"], compacted
    r = requests.post(f"{gw.base_url}/conversations", json={"items": compacted["output"]}, timeout=10)
    assert r.status_code == 200, r.text
    conv = r.json()["id"]
    listed = check_listed(requests.get(f"{gw.base_url}/conversations/{conv}/items?order=asc", timeout=10).json(),
                          "ConversationItem")
    assert [i["type"] for i in listed] == ["message", "compaction"]
    assert listed[1]["encrypted_content"] == compacted["output"][1]["encrypted_content"]
    upstream.clear()
    client.responses.create(model="demo-model", input="what is my name", conversation=conv)
    sent = upstream.requests()[-1]["messages"]
    assert "my name is Ada" in json.dumps(sent) and "encrypted_content" not in json.dumps(sent), sent
    other = client.conversations.create()
    r = requests.post(f"{gw.base_url}/conversations/{other.id}/items", json={"items": [listed[1]]}, timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["type"] == "compaction", r.text
    forged = {**listed[1], "encrypted_content": "not-sealed-here"}
    for path in ("", f"/{other.id}/items"):
        r = requests.post(f"{gw.base_url}/conversations{path}", json={"items": [user("hi"), forged]}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "items[1].encrypted_content", r.text
        assert r.json()["error"]["code"] == "invalid_encrypted_content", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_in_a_conversation_reads_it_and_joins_it(gw, upstream, stream):
    client = openai_client(gw)
    conv = client.conversations.create(items=[{"role": "developer", "content": "Be brief."}])
    upstream.clear()

    def ask(text: str, **kw):
        if stream:
            return list(client.responses.create(model="demo-model", input=text, stream=True, **kw))[-1].response
        return client.responses.create(model="demo-model", input=text, **kw)

    first = ask("my name is Ada", conversation=conv.id)
    second = ask("what is my name", conversation={"id": conv.id})
    assert first.conversation.id == second.conversation.id == conv.id
    # the second turn's backend request holds the conversation: its item, the first turn
    sent = upstream.requests()[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in sent[1:]] == ["my name is Ada", "You said: my name is Ada", "what is my name"]
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "developer"), ("message", "user"), ("reasoning", None), ("message", "assistant"),
        ("message", "user"), ("reasoning", None), ("message", "assistant")]
    assert [i.id for i in items[2:4]] == [o.id for o in first.output]  # (its output as produced)
    # a failed turn adds nothing
    failed = ask("error: 500 broken", conversation=conv.id) if stream else None
    if not stream:
        with pytest.raises(openai.InternalServerError):
            ask("error: 500 broken", conversation=conv.id)
    assert failed is None or failed.status == "failed"
    assert len(client.conversations.items.list(conv.id, limit=100).data) == 7
    # an incomplete turn joins it (OpenAI's do: the client saw it, and goes on from it)
    cut = ask("words: 50", conversation=conv.id, max_output_tokens=16)
    assert cut.status == "incomplete"
    items = client.conversations.items.list(conv.id, limit=100, order="asc").data
    assert len(items) == 7 + 1 + len(cut.output)
    assert [i.id for i in items[-len(cut.output):]] == [o.id for o in cut.output]


def test_a_conversation_over_the_websocket(gw, upstream):
    client = openai_client(gw)
    conv = client.conversations.create()
    ws = WSClient(gw.base_url)
    for text in ("one", "two"):
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": [user(text)],
                          "conversation": conv.id, "store": False})
        assert events[-1]["type"] == "response.completed" and events[-1]["response"]["conversation"] == {"id": conv.id}
    ws.close()
    assert [m["content"] for m in upstream.requests()[-1]["messages"]] == ["one", "You said: one", "two"]
    assert len(client.conversations.items.list(conv.id).data) == 6


def test_turns_at_once_all_join_the_conversation(gw, upstream):
    client = openai_client(gw)
    conv = client.conversations.create()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.responses.create(model="demo-model", input=f"noreason\nturn {i}",
                                                        conversation=conv.id), range(8)))
    texts = [i.content[0].text for i in client.conversations.items.list(conv.id, limit=100).data]
    assert sorted(t.removeprefix("noreason\n") for t in texts if t.startswith("noreason")) == [
        f"turn {i}" for i in range(8)]
    assert len(texts) == 16  # (each turn's input and answer, none lost)


def test_a_replayed_answer_never_gives_a_conversation_an_item_no_path_can_name(upstream, gateway_factory, tmp_path):
    """``--server-replay`` writes a replayed turn's items to its conversation after the answer
    (no relay run landed them): through the same check as every conversation write
    (conversations.py ``addressable``). A recording whose output item has the id ``..`` (edited,
    or made by another gateway) answers the turn, but the conversation does not keep that item:
    ``…/items/..`` could never name it. It was kept, listed and unreachable."""
    from mitmproxy import io

    recording, edited = tmp_path / "conv.mitm", tmp_path / "edited.mitm"
    live = gateway_factory(upstream.origin, "-w", str(recording), "--set", "resp2chat_max_replay_entries=0")
    conv = openai_client(live).conversations.create()
    body = {"model": "demo-model", "input": "noreason\nwords: 3", "conversation": conv.id}
    assert requests.post(f"{live.base_url}/responses", json=body, timeout=30).status_code == 200
    live.stop()
    with recording.open("rb") as fh, edited.open("wb") as out:
        writer = io.FlowWriter(out)
        for flow in io.FlowReader(fh).stream():
            if getattr(flow, "metadata", {}).get("resp2chat", {}).get("responses_request"):  # (the turn alone)
                answer = json.loads(flow.response.content)
                answer["output"][-1]["id"] = ".."
                flow.response.content = json.dumps(answer).encode()
                writer.add(flow)
    gw = gateway_factory("http://127.0.0.1:9", "--server-replay", str(edited))  # (no backend: the discard port)
    client = openai_client(gw)
    conv = client.conversations.create()
    r = requests.post(f"{gw.base_url}/responses", json={**body, "conversation": conv.id}, timeout=30)
    assert r.status_code == 200 and r.json()["output"][-1]["id"] == "..", r.text  # (answered as recorded)
    wait_until(lambda: "not updated" in gw.log(), 10, "the conversation's write refused")
    assert "cannot name a conversation's item" in gw.log()
    listed = [item.id for item in client.conversations.items.list(conv.id)]
    assert ".." not in listed, listed
    for item_id in listed:
        assert requests.get(f"{gw.base_url}/conversations/{conv.id}/items/{quote(item_id, safe='')}",
                            timeout=10).status_code == 200


def test_a_conversation_belongs_to_its_owner(upstream, gateway_factory):
    """forward_client_auth: each credential is its own owner (owner.py): another's conversation
    is an unknown one."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_forward_client_auth=true")
    mine, theirs = openai_client(gw, api_key="sk-mine"), openai_client(gw, api_key="sk-theirs")
    conv = mine.conversations.create(items=[user("secret")])
    for call in (lambda: theirs.conversations.retrieve(conv.id), lambda: theirs.conversations.items.list(conv.id),
                 lambda: theirs.conversations.delete(conv.id),
                 lambda: theirs.responses.create(model="demo-model", input="hi", conversation=conv.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert mine.conversations.items.list(conv.id).data[0].content[0].text == "secret"


def test_a_conversation_survives_a_restart_with_the_disk_copy(upstream, gateway_factory, tmp_path):
    args = ("--set", f"resp2chat_session_store_dir={tmp_path / 'store'}")
    first = gateway_factory(upstream.origin, *args)
    conv = openai_client(first).conversations.create(items=[user("kept")])
    openai_client(first).responses.create(model="demo-model", input="and this", conversation=conv.id)
    first.stop()
    again = openai_client(gateway_factory(upstream.origin, *args))
    assert [i.content[0].text for i in again.conversations.items.list(conv.id, order="asc").data][::3] == [
        "kept", "You said: and this"]


def test_two_replicas_share_conversations_in_redis(upstream, tmp_path, redis_server):
    a, b = [start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}")
            for _ in range(2)]
    try:
        ca, cb = openai_client(a), openai_client(b)
        conv = ca.conversations.create(metadata={"on": "a"})
        assert cb.conversations.retrieve(conv.id).metadata == {"on": "a"}
        with ThreadPoolExecutor(6) as pool:  # turns on both replicas at once, each one write over what it read
            list(pool.map(lambda i: (ca if i % 2 else cb).responses.create(
                model="demo-model", input=f"noreason\nturn {i}", conversation=conv.id), range(6)))
        # (each turn's items were written before its answer: on the other replica too, at once)
        texts = [i.content[0].text for i in ca.conversations.items.list(conv.id, limit=100).data]
        assert len(texts) == 12
        assert sorted(t.removeprefix("noreason\n") for t in texts if t.startswith("noreason")) == [
            f"turn {i}" for i in range(6)]
        # one client's turns one after the other on one replica: each sees the one before (its write landed first)
        other = ca.conversations.create()
        for text in ("first", "second"):
            ca.responses.create(model="demo-model", input=f"noreason\n{text}", conversation=other.id)
        assert [m["content"] for m in upstream.requests()[-1]["messages"]] == [
            "noreason\nfirst", "You said: first", "noreason\nsecond"]
        assert cb.conversations.delete(conv.id).deleted
        with pytest.raises(openai.NotFoundError):
            ca.conversations.retrieve(conv.id)
    finally:
        a.stop()
        b.stop()


def test_the_agents_sdk_runs_a_multi_turn_agent_on_an_openai_conversations_session(gw, upstream):
    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled
    from agents.memory import OpenAIConversationsSession

    set_tracing_disabled(True)
    client = openai_client(gw, api_key="unused", asynchronous=True)
    agent = Agent(name="a", instructions="Be brief.", model=OpenAIResponsesModel(model="demo-model",
                                                                                 openai_client=client))
    session = OpenAIConversationsSession(openai_client=client)
    upstream.clear()

    async def run():
        first = await Runner.run(agent, "my name is Ada", session=session)
        second = await Runner.run(agent, "what is my name", session=session)
        return first.final_output, second.final_output, await session.get_items()

    first, second, items = asyncio.run(run())
    assert (first, second) == ("You said: my name is Ada", "You said: what is my name")
    # the second run sent the session's history: the first exchange, read back from the conversation
    sent = upstream.requests()[-1]["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "Be brief."), ("user", "my name is Ada"), ("assistant", "You said: my name is Ada"),
        ("user", "what is my name")]
    assert [i.get("role") for i in items if i.get("type", "message") == "message"] == [
        "user", "assistant", "user", "assistant"]
    assert openai_client(gw).conversations.retrieve(session.session_id).id == session.session_id
