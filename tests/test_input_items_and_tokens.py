"""``GET /v1/responses/{id}/input_items`` and ``POST /v1/responses/input_tokens`` (issue 24 item
10), with the openai SDK through a real mitmdump; the pagination rules (resp2chat_core/listing.py)
in the core; the token count from llama.cpp's real server in tests/test_llamacpp.py."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from helpers import EVERY_PART, check_listed, openai_client
from wsclient import WSClient
from resp2chat_core import listing
from resp2chat_core.errors import GatewayError


# --- input_items ----------------------------------------------------------------------------------


def test_input_items_are_the_conversation_before_the_output_paged_as_openai_pages(own_gateway):
    client = openai_client(own_gateway)
    first = client.responses.create(model="demo-model", input=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "my name is Ada"}])
    second = client.responses.create(model="demo-model", previous_response_id=first.id, input="what is my name")
    newest_first = client.responses.input_items.list(second.id)
    # the history previous_response_id continues (its input and output), then this turn's input
    texts = [(i.type, getattr(i, "role", None), i.content[0].text if getattr(i, "content", None) else None)
             for i in newest_first.data]
    assert texts == [("message", "user", "what is my name"), ("message", "assistant", "You said: my name is Ada"),
                     ("reasoning", None, "Thinking about: my name is Ada"), ("message", "user", "my name is Ada"),
                     ("message", "developer", "Be brief.")]
    ids = [i.id for i in newest_first.data]
    assert len(set(ids)) == 5 and ids[1:3] == [o.id for o in first.output][::-1]  # (produced items keep theirs)
    assert client.responses.input_items.list(second.id).data == newest_first.data  # (the same ids every time)
    for response in (first, second):  # an input item never has one of its response's output items' ids
        listed = {i.id for i in client.responses.input_items.list(response.id)}
        assert not listed & {o.id for o in response.output}, (listed, response.output)
    oldest = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.id for i in oldest.data] == ids[::-1][:2] and oldest.has_more and oldest.last_id == ids[-2]
    rest = client.responses.input_items.list(second.id, order="asc", after=oldest.last_id, limit=10)
    assert [i.id for i in rest.data] == ids[::-1][2:] and not rest.has_more
    # the SDK's auto-pagination walks every page
    assert [i.id for i in client.responses.input_items.list(second.id, limit=2)] == ids


def test_input_items_carry_every_field_the_sdk_and_spec_require_of_a_part(own_gateway):
    """A client's parts come back with what the API's objects require even where it left them
    out: an input_image's detail (auto), an output_text's annotations (none)."""
    response = openai_client(own_gateway).responses.create(model="demo-model", input=EVERY_PART)
    r = requests.get(f"{own_gateway.base_url}/responses/{response.id}/input_items?order=asc", timeout=10)
    items = check_listed(r.json(), "ResponseItem")  # (requests' hook also checks it: helpers.check_body)
    parts = [p for i in items for p in i.get("content") or (i["output"] if isinstance(i.get("output"), list) else ())]
    assert [p["detail"] for p in parts if p["type"] == "input_image"] == ["auto", "auto"]
    assert [p["annotations"] for p in parts if p["type"] == "output_text"] == [[]]
    assert [p["type"] for p in parts] == ["input_text", "input_image", "output_text", "refusal", "input_text",
                                          "input_image", "input_text"]


def test_an_extension_item_is_listed_with_the_status_the_spec_requires(own_gateway):
    """An item of a type the spec does not define (Codex's ``additional_tools``) is listed with
    ``id``, ``type`` and ``status``, which the spec requires of every item (found by
    test_transports_property.py: a conversation's list lacked the status), in a response's input
    items as in a conversation's."""
    tools = {"type": "additional_tools", "tools": [{"type": "function", "name": "f", "parameters": {}}]}
    conv = requests.post(f"{own_gateway.base_url}/conversations", json={}, timeout=10).json()["id"]
    r = requests.post(f"{own_gateway.base_url}/responses", timeout=30, json={
        "model": "demo-model", "conversation": conv, "input": [tools, {"role": "user", "content": "hi"}]})
    lists = [requests.get(f"{own_gateway.base_url}/responses/{r.json()['id']}/input_items", timeout=10),
             requests.get(f"{own_gateway.base_url}/conversations/{conv}/items", timeout=10)]
    for listed in lists:
        (item,) = [i for i in listed.json()["data"] if i["type"] == "additional_tools"]
        assert item["status"] == "completed" and item["id"], item  # (requests' hook checks the list: check_body)


def test_input_items_show_sealed_reasoning_only_when_included(own_gateway):
    client = openai_client(own_gateway)
    first = client.responses.create(model="demo-model", input="hi", store=False,
                                    include=["reasoning.encrypted_content"])
    second = client.responses.create(model="demo-model", input=[
        {"role": "user", "content": "hi"}, *[o.model_dump(exclude_none=True) for o in first.output],
        {"role": "user", "content": "more"}])
    (reasoning,) = [i for i in client.responses.input_items.list(second.id).data if i.type == "reasoning"]
    assert reasoning.encrypted_content is None and reasoning.content[0].text == "Thinking about: hi"
    (reasoning,) = [i for i in client.responses.input_items.list(second.id, include=["reasoning.encrypted_content"]).data
                    if i.type == "reasoning"]
    assert reasoning.encrypted_content.startswith("r2c1.")
    # (what the gateway sealed: the item, sent back, is read as the turn's own)
    third = client.responses.create(model="demo-model", store=False, input=[
        {"role": "user", "content": "hi"}, reasoning.model_dump(exclude_none=True, include={"type", "id", "summary",
                                                                                            "encrypted_content"})])
    assert third.status == "completed"


def test_input_items_refusals(own_gateway):
    client = openai_client(own_gateway)
    response = client.responses.create(model="demo-model", input="hi")
    url = f"{own_gateway.base_url}/responses/{response.id}/input_items"
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("order=up", "order"),
                         ("include=nonsense", "include"), ("after=msg_nowhere", "after")):
        r = requests.get(f"{url}?{query}", timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nowhere")
    assert requests.post(url, json={}, timeout=10).status_code == 405
    unstored = client.responses.create(model="demo-model", input="hi", store=False)
    assert requests.get(f"{own_gateway.base_url}/responses/{unstored.id}/input_items", timeout=10).status_code == 404


def test_pages_in_the_core():
    items = [{"id": f"i{n}", "type": "message", "role": "user", "content": f"t{n}"} for n in range(5)]
    p = listing.page(items, listing.Page(limit=2))
    assert ([i["id"] for i in p["data"]], p["first_id"], p["last_id"], p["has_more"]) == (["i4", "i3"], "i4", "i3",
                                                                                          True)
    assert p["data"][0]["content"] == [{"type": "input_text", "text": "t4"}] and p["data"][0]["status"] == "completed"
    assert listing.page(items, listing.Page(after="i1", limit=5))["data"][0]["id"] == "i0"
    assert listing.page([], listing.Page()) == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                                "has_more": False}
    assert listing.page_query({"include": ["reasoning.encrypted_content,message.input_image.image_url"],
                               "order": ["asc"], "limit": ["100"]}) == listing.Page(
        None, 100, "asc", frozenset({"reasoning.encrypted_content", "message.input_image.image_url"}))
    with pytest.raises(GatewayError):
        listing.page(items, listing.Page(after="i9"))
    assert [i["id"] for i in listing.listed_ids([{"role": "user", "content": "a"}, {"type": "function_call_output",
                                                 "call_id": "c", "output": "x"}, {"id": "own"}], "r1")] == [
        "msg_r1_in0", "item_r1_in1", "own"]


# --- input_tokens ---------------------------------------------------------------------------------


def test_input_tokens_are_what_the_backends_tokenizer_counts(own_gateway, upstream):
    """The demo upstream has vLLM's /tokenize: the count is the one the turn itself reports."""
    client = openai_client(own_gateway)
    body = dict(model="demo-model", instructions="Be brief.", input=[{"role": "user", "content": "count me"}],
                tools=[{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}])
    counted = client.responses.input_tokens.count(**body)
    assert counted.object == "response.input_tokens"
    upstream.clear()
    answered = client.responses.create(**body)
    assert counted.input_tokens == answered.usage.input_tokens > 0
    # the history previous_response_id continues is counted too
    later = client.responses.input_tokens.count(model="demo-model", previous_response_id=answered.id, input="more")
    whole = client.responses.input_tokens.count(model="demo-model", input=[
        *body["input"], *[o.model_dump(exclude_none=True) for o in answered.output], {"role": "user", "content": "more"}])
    assert later.input_tokens == whole.input_tokens
    assert len(upstream.requests()) == 1  # (counting asks the tokenizer, never the model)


def test_input_tokens_without_a_tokenizer_are_the_documented_estimate(upstream, gateway_factory, tmp_path):
    """A backend without /tokenize (a path prefix it does not serve): one token per 4 bytes of the
    chat request's messages and tools, as JSON."""
    own_gateway = gateway_factory(upstream.origin, "--set", f"resp2chat_upstream_base_url={upstream.origin}/prefix/v1")
    counted = openai_client(own_gateway).responses.input_tokens.count(model="demo-model", input="count me")
    messages = [{"role": "user", "content": "count me"}]
    assert counted.input_tokens == -(-(len(json.dumps(messages, separators=(",", ":"))) + 2) // 4)


def test_input_tokens_refusals(own_gateway, upstream):
    url = own_gateway.base_url + "/responses/input_tokens"
    for body, param in (({"input": "hi"}, "model"), ({"model": "demo-model", "input": "hi", "previous_response_id":
                                                      "resp_gone"}, "previous_response_id")):
        r = requests.post(url, json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert requests.get(url, timeout=10).status_code == 405


def test_a_request_without_a_model_is_told_why_it_needs_one(own_gateway, upstream):
    """OpenAI's input_tokens endpoint does without ``model``; the gateway cannot: it routes every
    request by its model, and a turn without one has no default upstream either (the schema
    requires it). So both are the same 400, which now says why (it said ``model: Field
    required``), over HTTP (the openai SDK's count, a turn) and the WebSocket; the backend is not
    asked."""
    upstream.clear()
    client = openai_client(own_gateway)
    with pytest.raises(openai.BadRequestError) as counted:
        client.responses.input_tokens.count(input="hi")
    with pytest.raises(openai.BadRequestError) as turned:
        client.responses.create(input="hi")  # (the SDK lets model be left out)
    for err in (counted.value, turned.value):
        error = err.body if "message" in err.body else err.body["error"]
        assert (error["param"], error["code"]) == ("model", "missing_required_parameter"), error
        assert "picks the upstream" in error["message"] and "input_tokens" in error["message"], error
        assert err.response.headers["x-request-id"]
    ws = WSClient(own_gateway.base_url)
    try:
        event = ws.turn({"type": "response.create", "input": "hi"})[-1]
    finally:
        ws.close()
    assert event["type"] == "error" and "picks the upstream" in event["error"]["message"], event
    assert upstream.requests() == []
