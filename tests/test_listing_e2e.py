"""Item lists through a real mitmdump with the openai SDK (what tests/test_listing_property.py
found in the core): a turn takes no item id twice (its input, the conversation it goes on), nor does a
conversation; a ``limit`` of digits that are not ASCII ones, or of thousands of them, is a 400; both lists refuse
the same bad queries alike."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import openai
import pytest
import requests

from helpers import openai_client
from wsclient import WSClient


def said(item_id: str | None, text: str) -> dict:
    return {"type": "message", "role": "user", "content": text, **({"id": item_id} if item_id else {})}


def refused_as_a_duplicate(err, param: str) -> None:
    body = err.value.body
    assert (err.value.status_code, body["type"], body["code"], body["param"]) == (
        400, "invalid_request_error", "invalid_value", param), body
    assert "duplicate item found with id" in body["message"], body


def ws_refused_as_a_duplicate(events: list, param: str) -> None:
    [error] = events
    assert error["type"] == "error" and error["status"] == 400, error
    assert (error["error"]["type"], error["error"]["code"], error["error"]["param"]) == (
        "invalid_request_error", "invalid_value", param), error


@pytest.mark.parametrize("stream", [False, True])
def test_a_turn_takes_no_item_id_twice(own_gateway, upstream, stream):
    """As OpenAI's ``Duplicate item found with id …``: an input that gives an id twice (two items,
    or two references to one item, or an item and a reference to it), or gives one the conversation
    ``previous_response_id`` continues holds, is a 400 naming the second, before any backend
    request, over HTTP and the WebSocket. It was taken: the response's input held the id twice
    (its input items listed it twice, ``after`` found its first place)."""
    client = openai_client(own_gateway)
    first = client.responses.create(model="demo-model", input=[said("msg_mine", "one")])
    out = first.output[-1].id
    upstream.clear()
    cases = [([said("msg_twice", "one"), said(None, "two"), said("msg_twice", "three")], {}, "input[2].id"),
             ([{"type": "item_reference", "id": out}, {"type": "item_reference", "id": out}], {}, "input[1].id"),
             ([said(None, "hi"), {"type": "item_reference", "id": out}, first.output[-1].model_dump(exclude_none=True)],
              {}, "input[2].id"),
             ([said("msg_mine", "again")], {"previous_response_id": first.id}, "input[0].id"),
             ([said(None, "go on"), {"type": "item_reference", "id": out}], {"previous_response_id": first.id},
              "input[1].id")]
    ws = WSClient(own_gateway.base_url)
    for items, more, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-model", input=items, stream=stream, **more)
        refused_as_a_duplicate(err, param)
        ws_refused_as_a_duplicate(ws.turn({"type": "response.create", "model": "demo-model", "input": items,
                                           "stream": stream, **more}), param)
    assert upstream.requests() == []
    # the same ids once each are taken, on both transports (and the socket goes on)
    ok = client.responses.create(model="demo-model", input=[said("msg_once", "one"), said(None, "two")])
    assert [i.id for i in client.responses.input_items.list(ok.id, order="asc")][0] == "msg_once"
    [*_, end] = ws.turn({"type": "response.create", "model": "demo-model", "previous_response_id": first.id,
                         "input": [said("msg_other", "three")]})
    assert end["type"] == "response.completed", end
    ws.close()


def conversation_items(client, conv_id: str) -> list:
    return [i.model_dump() for i in client.conversations.items.list(conv_id, order="asc", limit=100).data]


@pytest.mark.parametrize("stream", [False, True])
def test_a_turn_in_a_conversation_adds_no_id_it_holds(own_gateway, upstream, stream):
    """A turn with ``conversation`` whose input gives an id the conversation holds (an item of its
    own, or a reference to one of the conversation's items) is a 400 naming it before the turn
    runs, over HTTP and the WebSocket: no backend request, nothing appended. It ran and was
    appended, and the conversation held the id twice (its items' ``GET`` and ``after`` found one
    of them, the SDK's walk did not end)."""
    client = openai_client(own_gateway)
    conv = client.conversations.create(items=[said("msg_held", "a")])
    turn = client.responses.create(model="demo-model", input="b", conversation=conv.id)
    before = conversation_items(client, conv.id)
    upstream.clear()
    cases = [([said(None, "c"), said("msg_held", "d")], "input[1].id"),
             ([said("msg_new", "c"), said("msg_new", "d")], "input[1].id"),
             ([{"type": "item_reference", "id": turn.output[-1].id}, said(None, "c")], "input[0].id")]
    ws = WSClient(own_gateway.base_url)
    for items, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-model", input=items, conversation=conv.id, stream=stream)
        refused_as_a_duplicate(err, param)
        ws_refused_as_a_duplicate(ws.turn({"type": "response.create", "model": "demo-model", "input": items,
                                           "conversation": conv.id, "stream": stream}), param)
    assert upstream.requests() == []
    assert conversation_items(client, conv.id) == before
    # an id it does not hold joins it, listed once
    client.responses.create(model="demo-model", input=[said("msg_new", "c")], conversation=conv.id)
    [*_, end] = ws.turn({"type": "response.create", "model": "demo-model", "input": [said("msg_newer", "d")],
                         "conversation": conv.id})
    assert end["type"] == "response.completed", end
    ws.close()
    ids = [i["id"] for i in conversation_items(client, conv.id)]
    assert ids[:len(before)] == [i["id"] for i in before] and len(ids) == len(set(ids)), ids
    assert {"msg_new", "msg_newer"} <= set(ids)


def test_a_limit_in_other_or_too_many_digits_is_a_400_on_both_lists(own_gateway):
    client = openai_client(own_gateway)
    response = client.responses.create(model="demo-model", input="hi")
    conv = client.conversations.create(items=[said(None, "hi")])
    for url in (f"{own_gateway.base_url}/responses/{response.id}/input_items",
                f"{own_gateway.base_url}/conversations/{conv.id}/items"):
        for query, param in (("limit=²", "limit"), ("limit=٣", "limit"), ("limit=" + "9" * 5000, "limit"),
                             ("limit=0007", None), ("after=msg_nowhere", "after"),
                             ("order=up", "order"), ("include=nonsense", "include")):
            r = requests.get(f"{url}?{query}", timeout=10)
            if param is None:
                assert r.status_code == 200, r.text
                continue
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (url, query[:20], r.status_code, r.text)


def test_a_conversation_takes_no_item_id_twice(own_gateway):
    """As OpenAI's ``Duplicate item found with id …``: an id given twice in one request, or one
    the conversation holds, is a 400 naming the item; every item keeps one id, and the SDK's
    walk over the items lists each once."""
    client = openai_client(own_gateway)
    with pytest.raises(openai.BadRequestError) as err:
        client.conversations.create(items=[said("msg_mine", "a"), said("msg_mine", "b")])
    assert err.value.body["param"] == "items[1].id"
    conv = client.conversations.create(items=[said("msg_mine", "a"), said(None, "b")])
    with pytest.raises(openai.BadRequestError) as err:
        client.conversations.items.create(conv.id, items=[said(None, "c"), said("msg_mine", "d")])
    assert err.value.body["param"] == "items[1].id"
    client.conversations.items.create(conv.id, items=[said(None, "c"), said("msg_other", "d")])
    client.conversations.items.delete("msg_mine", conversation_id=conv.id)
    client.conversations.items.create(conv.id, items=[said("msg_mine", "e")])  # (deleted: free again)
    texts = [i.content[0].text for i in islice(client.conversations.items.list(conv.id, order="asc", limit=1), 20)]
    assert texts == ["b", "c", "d", "e"]
    assert client.conversations.items.retrieve("msg_mine", conversation_id=conv.id).content[0].text == "e"


def test_items_sent_with_a_null_or_empty_id_are_listed_with_ids_of_their_own(own_gateway):
    """``"id": null`` or ``""`` (a client's dump of an item it made) is no id: the item is
    listed with one of its own (it was listed with the null one, and the SDK's walk, a page of one
    at a time, stopped after the first page), in a response's input items and a conversation."""
    client = openai_client(own_gateway)
    sent = [said(None, "one") | {"id": None}, said(None, "two") | {"id": ""}, said(None, "three")]
    response = client.responses.create(model="demo-model", input=sent)
    listed = list(client.responses.input_items.list(response.id, order="asc", limit=1))
    assert [i.content[0].text for i in listed] == ["one", "two", "three"] and all(i.id for i in listed)
    conv = client.conversations.create(items=sent[:2])
    added = client.conversations.items.create(conv.id, items=sent[:2])
    assert all(i.id for i in added.data)
    listed = list(client.conversations.items.list(conv.id, order="asc", limit=1))
    assert [i.content[0].text for i in listed] == ["one", "two", "one", "two"] and len({i.id for i in listed}) == 4
    assert client.conversations.items.retrieve(listed[0].id, conversation_id=conv.id).content[0].text == "one"


def test_adding_or_getting_an_item_reads_only_include_from_the_query(own_gateway):
    """``POST …/items`` and ``GET …/items/{item_id}`` take ``include`` (OpenAI's), not a list's
    ``limit``/``order``/``after``: those are no reason for a 400 there; a bad ``include`` is."""
    client = openai_client(own_gateway)
    conv = client.conversations.create(items=[said("msg_one", "one")])
    base = f"{own_gateway.base_url}/conversations/{conv.id}/items"
    odd = "limit=0&order=up&after=msg_nowhere"
    r = requests.post(f"{base}?{odd}", json={"items": [said(None, "two")]}, timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["content"][0]["text"] == "two", r.text
    r = requests.get(f"{base}/msg_one?{odd}", timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "msg_one", r.text
    for r in (requests.post(f"{base}?include=nonsense", json={"items": [said(None, "x")]}, timeout=10),
              requests.get(f"{base}/msg_one?include=nonsense", timeout=10)):
        assert r.status_code == 400 and r.json()["error"]["param"] == "include", r.text


def test_of_two_turns_at_once_giving_one_new_id_only_the_first_to_land_joins_the_conversation(own_gateway, upstream):
    """Two turns at once give the conversation the same new id: both pass the check as they begin
    (it holds neither yet), and the conversation's write checks again (``Turns.land``): the turn
    that lands second ends as a write that failed does, here a 400 naming the id, and adds
    nothing. Both were appended: the id twice."""
    client = openai_client(own_gateway)
    conv = client.conversations.create()
    upstream.clear()
    body = {"model": "demo-model", "conversation": conv.id, "input": [said("msg_race", "noreason\nslow: 1500\nhi")]}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{own_gateway.base_url}/responses", json=body, timeout=30),
                                range(2)))
    assert len(upstream.requests()) == 2  # (both ran: neither was refused as it began)
    assert sorted(r.status_code for r in answers) == [200, 400], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 400).json()["error"]
    assert (refused["type"], refused["code"]) == ("invalid_request_error", "invalid_value"), refused
    assert "not added to its conversation: input[0].id: duplicate item found" in refused["message"], refused
    ids = [i["id"] for i in conversation_items(client, conv.id)]
    assert ids.count("msg_race") == 1 and len(ids) == 2, ids  # (one turn's input and answer)
