"""Item lists through a real mitmdump with the openai SDK (what tests/test_listing_property.py
found in the core): a walk of the pages over items a client gave one id twice ends; a ``limit``
of digits that are not ASCII ones, or of thousands of them, is a 400; a conversation takes no id twice; both lists refuse
the same bad queries alike."""

from __future__ import annotations

from itertools import islice

import openai
import pytest
import requests

from helpers import openai_client


def said(item_id: str | None, text: str) -> dict:
    return {"type": "message", "role": "user", "content": text, **({"id": item_id} if item_id else {})}


def test_the_sdks_walk_over_input_items_with_an_id_given_twice_ends(own_gateway):
    """A response's input holds an id twice (the input took it): the SDK's auto-pagination, a
    page of one at a time, oldest first, goes from the first item to the last and ends (it went
    round for ever: ``after`` found the id's first place again)."""
    client = openai_client(own_gateway)
    response = client.responses.create(model="demo-model", input=[
        said("msg_twice", "one"), said(None, "two"), said("msg_twice", "three"), said(None, "four")])
    walked = [i.content[0].text for i in islice(client.responses.input_items.list(response.id, order="asc", limit=1), 20)]
    assert len(walked) < 20 and walked[0] == "one" and walked[-1] == "four", walked


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
