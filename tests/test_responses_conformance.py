"""A conformance audit of what strict Responses clients see: deviations from OpenAI's API (and the
Open Responses spec) that the rest of the suite did not catch, each through a real mitmdump with
a real client (the openai SDK, raw ``requests``, the Responses WebSocket), each failing on the
code before its fix. The openai SDK's pydantic models are the strict reader here:
``Response.model_validate`` of what the gateway answers."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests
from openai.types.responses import Response

from helpers import (
    LocalServer, QuietHandler, chat_chunk, chat_completion, chat_sse, check_sdk, check_stream, openai_client,
    parse_sse, send_json, send_sse, tool_call_chunk, wait_until,
)
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.translator import OUTPUT_TOO_LARGE, Translator
from resp2chat_core.turn import begin_turn
from wsclient import WSClient


# --- metadata: OpenAI's limits, as on a conversation ------------------------------------------------

BAD_METADATA = [
    {"k": 1},  # (echoed as it came, the SDK's Response rejects it: metadata is Dict[str, str])
    {f"k{i}": "v" for i in range(17)},
    {"k" * 65: "v"},
    {"k": "v" * 513},
    ["not", "an", "object"],
]


@pytest.mark.parametrize("metadata", BAD_METADATA)
def test_a_responses_request_with_metadata_past_openais_limits_is_a_400_naming_it(own_gateway, metadata):
    """OpenAI: at most 16 pairs, string keys up to 64 characters, string values up to 512. The
    gateway took any object and echoed it in the Response, which a strict client then cannot
    read (``Response.model_validate``: ``metadata.k: Input should be a valid string``)."""
    client = openai_client(own_gateway)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-model", input="hi", metadata=metadata)
    assert err.value.body["param"] == "metadata" and err.value.body["code"] == "invalid_value", err.value.body
    # the same over the Responses WebSocket, and for a background response (queued before it runs)
    ws = WSClient(own_gateway.base_url)
    try:
        [error] = ws.turn({"type": "response.create", "model": "demo-model", "input": "hi", "metadata": metadata})
    finally:
        ws.close()
    assert error["type"] == "error" and error["error"]["param"] == "metadata", error
    r = requests.post(f"{own_gateway.base_url}/responses", timeout=30,
                      json={"model": "demo-model", "input": "hi", "background": True, "metadata": metadata})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata", r.text


def test_metadata_at_openais_limits_is_taken_and_echoed(own_gateway):
    client = openai_client(own_gateway)
    metadata = {f"{i:064d}": "v" * 512 for i in range(16)}
    response = client.responses.create(model="demo-model", input="hi", metadata=metadata)
    assert response.metadata == metadata
    Response.model_validate(client.responses.retrieve(response.id).model_dump())


# --- GET /v1/responses/{id}: its include, as an item list's ----------------------------------------

ENCRYPTED = "reasoning.encrypted_content"


def reasoning_of(response) -> dict:
    (item,) = [i for i in response["output"] if i["type"] == "reasoning"]
    return item


@pytest.mark.parametrize("created_with", [[], [ENCRYPTED]])
def test_get_shows_encrypted_reasoning_as_its_include_says(own_gateway, upstream, created_with):
    """``GET /v1/responses/{id}?include[]=reasoning.encrypted_content`` (the SDK's
    ``responses.retrieve(id, include=[…])``) shows each reasoning item's ``encrypted_content``;
    without it, none, whatever the creating request asked (as ``input_items`` and a conversation's
    items already did). The gateway ignored the GET's include: the stored item as it was, and a
    value the API does not define went unrefused."""
    client = openai_client(own_gateway)
    created = client.responses.create(model="demo-model", input="my name is Ada", include=created_with)
    assert ("encrypted_content" in reasoning_of(created.model_dump(exclude_none=True))) == bool(created_with)
    plain = requests.get(f"{own_gateway.base_url}/responses/{created.id}", timeout=30).json()
    assert "encrypted_content" not in reasoning_of(plain)
    for query in ("include[]=" + ENCRYPTED, "include=" + ENCRYPTED):
        shown = requests.get(f"{own_gateway.base_url}/responses/{created.id}?{query}", timeout=30).json()
        assert reasoning_of(shown)["encrypted_content"].startswith("r2c1.")
        assert {k: v for k, v in shown.items() if k != "output"} == {k: v for k, v in plain.items() if k != "output"}
    retrieved = client.responses.retrieve(created.id, include=[ENCRYPTED])
    Response.model_validate(retrieved.model_dump())
    # the sealed reasoning is what the gateway reads back: a stateless turn that returns it
    upstream.clear()
    item = reasoning_of(retrieved.model_dump(exclude_none=True))
    client.responses.create(model="demo-model", store=False, include=[ENCRYPTED],
                            input=[{"role": "user", "content": "my name is Ada"},
                                   {k: v for k, v in item.items() if k != "content"},
                                   {"role": "user", "content": "what is it?"}])
    (sent,) = upstream.requests()
    assert any("Thinking about: my name is Ada" in str(m.get("reasoning_content") or m.get("content"))
               for m in sent["messages"] if m["role"] == "assistant"), sent["messages"]


def test_get_with_an_include_the_api_does_not_define_is_a_400_naming_it(own_gateway):
    client = openai_client(own_gateway)
    created = client.responses.create(model="demo-model", input="hi")
    r = requests.get(f"{own_gateway.base_url}/responses/{created.id}?include=bogus", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "include", r.text


def test_a_turn_with_an_include_the_api_does_not_define_is_a_400_naming_it(own_gateway, upstream):
    """``include`` on ``POST /v1/responses``: a value the API does not define is OpenAI's 400
    (``invalid_value``, the value's place ``include[i]``, the message listing the accepted
    ones), over HTTP and on the WebSocket alike (one validation), and nothing reaches the
    backend; every value the API defines is accepted (openai-python's ``ResponseIncludable``:
    what Codex, the AI SDK and the Agents SDK send), even those that ask for what the gateway
    never makes. Before, any string went."""
    from typing import get_args

    from openai.types.responses import ResponseIncludable

    from wsclient import WSClient

    client = openai_client(own_gateway)
    defined = list(get_args(ResponseIncludable))
    assert ENCRYPTED in defined and len(defined) >= 8
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="demo-model", input="hi", include=[ENCRYPTED, "reasoning.summary"])
    err = refused.value.body
    assert (err["param"], err["code"]) == ("include[1]", "invalid_value"), err
    assert all(value in err["message"] for value in defined), err["message"]
    sock = WSClient(own_gateway.base_url)
    try:
        (event,) = sock.turn({"type": "response.create", "model": "demo-model", "input": "hi", "include": ["bogus"]})
        assert event["type"] == "error" and event["status"] == 400, event
        assert (event["error"]["param"], event["error"]["code"]) == ("include[0]", "invalid_value")
        assert upstream.requests() == []
        done = sock.turn({"type": "response.create", "model": "demo-model", "input": "hi", "include": defined})
        assert done[-1]["type"] == "response.completed"
    finally:
        sock.close()
    answer = client.responses.create(model="demo-model", input="hi", include=defined)
    assert answer.status == "completed" and len(upstream.requests()) == 2


# --- a missing required field: OpenAI's code -------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    ({"input": "hi"}, "model"),
    ({"model": "demo-model", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
])
def test_a_missing_required_field_is_missing_required_parameter_on_every_transport(own_gateway, body, param):
    """OpenAI answers a request that lacks a required field with ``code:
    "missing_required_parameter"`` (as this gateway's own /v1/responses/compact already did);
    POST /v1/responses and the WebSocket said ``invalid_value``."""
    r = requests.post(f"{own_gateway.base_url}/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, "missing_required_parameter"), r.text
    ws = WSClient(own_gateway.base_url)
    try:
        [error] = ws.turn({"type": "response.create", **body})
    finally:
        ws.close()
    assert (error["error"]["param"], error["error"]["code"]) == (param, "missing_required_parameter"), error
    r = requests.post(f"{own_gateway.base_url}/responses/input_tokens", json=body, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "missing_required_parameter"), r.text


# --- a stored prompt template, moderation: refused, not dropped ----------------------------------


UNSUPPORTED = [
    ("prompt", {"id": "pmpt_123", "variables": {"city": "Paris"}}),
    ("moderation", {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}, "output": {"mode": "block"}}}),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_a_field_asking_for_what_the_gateway_cannot_do_is_refused_on_every_transport(own_gateway, upstream,
                                                                                       field, value):
    """``prompt`` (openai-python ``ResponseCreateParams.prompt``) names a template in OpenAI's
    prompt store, which the gateway does not have: the turn ran without it (a 200 answering
    something else). ``moderation`` asks OpenAI's moderation model to score or block the input
    and output: the turn ran unmoderated, what it was asked to block answered. Now a 400 naming
    the field, as the README promises for what it cannot do; null asks for nothing."""
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(own_gateway).responses.create(model="demo-model", input="hi", **{field: value})
    assert (err.value.body["param"], err.value.body["code"]) == (field, "unsupported_parameter"), err.value.body
    ws = WSClient(own_gateway.base_url)
    try:
        [error] = ws.turn({"type": "response.create", "model": "demo-model", "input": "hi", field: value})
    finally:
        ws.close()
    assert (error["error"]["param"], error["error"]["code"]) == (field, "unsupported_parameter"), error
    r = requests.post(f"{own_gateway.base_url}/responses/input_tokens",
                      json={"model": "demo-model", "input": "hi", field: value}, timeout=30)
    assert (r.status_code, r.json()["error"]["param"]) == (400, field), r.text
    assert upstream.requests() == []
    r = requests.post(f"{own_gateway.base_url}/responses", json={"model": "demo-model", "input": "hi", field: None},
                      timeout=30)
    assert r.status_code == 200, r.text  # (null asks for nothing)


# --- a backend's 429: its Retry-After, for the SDK's retry ------------------------------------------


def test_a_backend_429_keeps_its_retry_after_for_a_json_client(own_gateway, upstream):
    """The backend said ``Retry-After: 2`` (demo_upstream.py); the openai SDK sets its retry wait
    from ``retry-after``/``retry-after-ms`` (OpenAI's own 429s carry them), not from the message:
    a JSON client got only "(try again in 2s)" in the text, and retried at once."""
    r = requests.post(f"{own_gateway.base_url}/responses", json={"model": "demo-model", "input": "error: 429 slow down"},
                      timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    assert (r.headers.get("retry-after"), r.headers.get("retry-after-ms")) == ("2", "2000"), dict(r.headers)
    upstream.clear()
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        openai_client(own_gateway, max_retries=1).responses.create(model="demo-model", input="error: 429 slow down")
    waited = time.monotonic() - started
    assert len(upstream.requests()) == 2 and waited >= 1.9, waited  # (the SDK's own backoff: under a second)


@pytest.mark.parametrize("background", [False, True])
def test_a_stored_failure_keeps_only_the_schemas_error_fields(own_gateway, background):
    """A streamed turn the backend refused with ``429`` and ``Retry-After: 2``: its
    ``response.failed`` event's error carries ``headers`` (``retry-after``, ``retry-after-ms``:
    where Codex reads the wait), but the Response stored (and a GET of it, later) has the
    schema's ``code`` and ``message`` alone: the wait was out of date there, in a field the
    Responses API does not define. An ordinary stored turn and a background one alike."""
    raw = requests.post(f"{own_gateway.base_url}/responses", timeout=30, json={
        "model": "demo-model", "input": "error: 429 slow down", "stream": True, "background": background}).content
    failed = check_stream(raw, parse_sse(raw)[0]["response"]["id"])[-1]
    assert failed["type"] == "response.failed", failed
    assert failed["response"]["error"]["headers"] == {"retry-after": "2", "retry-after-ms": "2000"}, failed
    rid = failed["response"]["id"]
    if background:
        wait_until(lambda: requests.get(f"{own_gateway.base_url}/responses/{rid}", timeout=30).json()["status"]
                   == "failed", 10, "stored as it ended")
    stored = requests.get(f"{own_gateway.base_url}/responses/{rid}", timeout=30).json()
    assert stored["status"] == "failed" and stored["error"] == {
        "code": "rate_limit_exceeded", "message": failed["response"]["error"]["message"]}, stored["error"]
    Response.model_validate(stored)


# --- an incomplete response: the item the model was writing is incomplete ---------------------------

WEATHER_TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}},
                 {"type": "function", "name": "f2", "parameters": {"type": "object", "properties": {}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_the_last_item_of_an_incomplete_response_is_incomplete(own_gateway, stream):
    """Open Responses, "Items are state machines": ``incomplete``: the model exhausted its token
    budget while emitting this item; it MUST be the last item, in an ``incomplete`` response.
    The gateway closed the item cut short ``completed``: a client could not tell a message cut
    at max_output_tokens from a whole one by its item. The items before it are completed."""
    client = openai_client(own_gateway)
    response = client.responses.create(model="demo-model", input="words: 50", max_output_tokens=16, stream=stream)
    if stream:
        events = list(response)
        done = [e.item for e in events if e.type == "response.output_item.done"]
        response = events[-1].response
        assert [i.model_dump() for i in done] == [i.model_dump() for i in response.output]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    *before, last = response.output
    assert (last.type, last.status) == ("message", "incomplete")
    assert all(getattr(i, "status", None) in (None, "completed") for i in before)


def test_parallel_calls_cut_short_only_the_last_is_incomplete():
    """The core: of two calls the budget ran out in, the second (the one being written) is
    incomplete; a completed turn's are completed, byte for byte as before."""
    def final(finish: str) -> dict:
        body = {"model": "m", "input": "hi", "tools": WEATHER_TOOLS}
        t = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 100)
        tr = t.translator()
        stream = chat_sse(tool_call_chunk(0, "c1", "get_weather", "{}"), tool_call_chunk(1, "c2", "f2", '{"a": '),
                          chat_chunk(finish=finish))
        out = tr.accepted() + tr.feed(stream) + tr.finish()
        return check_stream(out, "resp_x")[-1]["response"]

    assert [i["status"] for i in final("length")["output"]] == ["completed", "incomplete"]
    assert [i["status"] for i in final("tool_calls")["output"]] == ["completed", "completed"]


@pytest.mark.parametrize("stream", [False, True])
def test_an_incomplete_response_is_stored_and_continues(own_gateway, upstream, stream):
    """OpenAI stores every response a request did not say ``store: false`` of: an incomplete
    one is retrieved and continued (``previous_response_id``: how a client goes on after
    max_output_tokens). The gateway stored only completed ones: a GET was a 404, the
    continuation ``previous_response_not_found``."""
    client = openai_client(own_gateway)
    response = client.responses.create(model="demo-model", input="words: 50", max_output_tokens=16, stream=stream)
    if stream:
        response = list(response)[-1].response
    assert response.status == "incomplete"
    stored = client.responses.retrieve(response.id)
    assert stored.model_dump() == response.model_dump()
    assert [i.id for i in client.responses.input_items.list(response.id).data] != []
    upstream.clear()
    later = client.responses.create(model="demo-model", previous_response_id=response.id, input="go on")
    assert later.status == "completed"
    (sent,) = upstream.requests()
    partial = response.output[-1].content[0].text
    assert [m["content"] for m in sent["messages"] if m["role"] == "assistant"][-1] == partial
    # (store: false still keeps nothing)
    unstored = client.responses.create(model="demo-model", input="words: 50", max_output_tokens=16, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_an_incomplete_response_continues_on_its_websocket_unstored(own_gateway, upstream):
    """The WebSocket's own memory of its responses (``store: false``, as Codex sends them) keeps
    an incomplete one too: the next turn goes on from it, as from a completed one."""
    ws = WSClient(own_gateway.base_url)
    try:
        first = ws.turn({"type": "response.create", "model": "demo-model", "input": "words: 50",
                         "max_output_tokens": 16, "store": False})[-1]
        assert first["type"] == "response.incomplete", first
        upstream.clear()
        later = ws.turn({"type": "response.create", "model": "demo-model", "input": "go on", "store": False,
                         "previous_response_id": first["response"]["id"]})[-1]
    finally:
        ws.close()
    assert later["type"] == "response.completed", later
    (sent,) = upstream.requests()
    partial = first["response"]["output"][-1]["content"][0]["text"]
    assert [m["content"] for m in sent["messages"] if m["role"] == "assistant"][-1] == partial


# --- input is optional ---------------------------------------------------------------------------


def test_a_request_without_input_goes_on_from_what_it_names(own_gateway, upstream):
    """``input`` is optional in the API (the openai SDK's and the Open Responses spec's
    CreateResponseBody): a request may continue a previous response (after max_output_tokens:
    "go on", with nothing new), a conversation, or give only instructions. The gateway said
    ``input: Field required``."""
    client = openai_client(own_gateway)
    cut = client.responses.create(model="demo-model", input="words: 50", max_output_tokens=16)
    upstream.clear()
    on = client.responses.create(model="demo-model", previous_response_id=cut.id)
    assert on.status == "completed"
    (sent,) = upstream.requests()
    assert [m["role"] for m in sent["messages"]][-2:] == ["user", "assistant"]  # (the history, nothing new)
    assert [i.id for i in client.responses.input_items.list(on.id, order="asc").data][-1] == cut.output[-1].id
    only = client.responses.create(model="demo-model", instructions="Say hello.", input=None)
    assert only.status == "completed" and only.instructions == "Say hello."
    conv = client.conversations.create(items=[{"role": "user", "content": "my name is Ada"}])
    in_conv = client.responses.create(model="demo-model", conversation=conv.id)
    assert in_conv.output_text == "You said: my name is Ada"
    assert client.responses.input_tokens.count(model="demo-model", previous_response_id=cut.id).input_tokens > 0
    ws = WSClient(own_gateway.base_url)
    try:
        last = ws.turn({"type": "response.create", "model": "demo-model", "previous_response_id": cut.id})[-1]
    finally:
        ws.close()
    assert last["type"] == "response.completed", last
    # nothing at all is still a 400 naming input
    r = requests.post(f"{own_gateway.base_url}/responses", json={"model": "demo-model"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


# --- how a stream ends: every item it opened is closed, as the end says ------------------------------


def ended_items(events: list[dict]) -> tuple[list, list]:
    """The ids of the items a stream added, and the items it closed (``output_item.done``)."""
    return ([e["item"]["id"] for e in events if e["type"] == "response.output_item.added"],
            [e["item"] for e in events if e["type"] == "response.output_item.done"])


@pytest.mark.parametrize("fault", ["midstream-error", "truncate"])
def test_a_response_that_fails_mid_stream_closes_the_items_it_opened(own_gateway, fault):
    """Open Responses: an item goes ``in_progress`` → ``completed`` or ``incomplete``; a stream
    adds it (``output_item.added``), fills it and closes it (its ``*.done`` events, then
    ``output_item.done``). The backend failing mid-answer (an error event, or its stream cut
    off) ended the turn with ``response.failed`` straight after the text's deltas: the message
    was never closed (a strict client tracking items holds it open forever) and the failed
    Response's output was empty though its text had streamed. Now it is closed ``incomplete``
    (sampling stopped in it: the only such status the spec has), its text whole in
    ``output_text.done``, and the failed Response's output is the items the events closed; the
    same on the Responses WebSocket. The openai SDK reads every event."""
    client = openai_client(own_gateway)
    events = list(client.responses.create(model="demo-model", input=fault, stream=True))
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.error.code == "server_error"
    added, done = ended_items([e.model_dump() for e in events])
    assert added and [i["id"] for i in done] == added, "an item the stream opened was never closed"
    message = done[-1]
    assert (message["type"], message["status"]) == ("message", "incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and message["content"][0]["text"] == text
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    assert [e.type for e in events][-4:-1] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done"]
    assert [i.model_dump() for i in failed.response.output] == done
    ws = WSClient(own_gateway.base_url)
    try:
        sent = ws.turn({"type": "response.create", "model": "demo-model", "input": fault, "store": False})
    finally:
        ws.close()
    check_sdk(sent)
    assert sent[-1]["type"] == "response.failed", sent[-1]
    added, done = ended_items(sent)
    assert added and [i["id"] for i in done] == added and done[-1]["status"] == "incomplete"
    assert sent[-1]["response"]["output"] == done


def test_the_gateways_own_runs_close_and_the_output_bound_closes_nothing():
    """The core, for the failures an e2e backend cannot cheaply cause: a failure while the
    gateway's own web search runs closed nothing, its ``web_search_call`` left in progress: it
    ends ``failed`` (its only other end), in the failed Response's output too. The output bound
    (``upstream_output_too_large``) is the one failure that closes nothing: the message's done
    events and the failed Response would each repeat what is too large to hold
    (test_hostile_audit.py measures it); its output is what was closed before (helpers.check_stream)."""
    body = {"model": "m", "input": "hi"}
    tr = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 100).translator()
    out = tr.accepted() + tr.search_started("call_1", "weather") + tr.fail_upstream(502, b"bad gateway")
    evs = check_stream(out, "resp_x")
    check_sdk(evs)
    assert [(i["type"], i["status"]) for i in evs[-1]["response"]["output"]] == [("web_search_call", "failed")]

    t = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 100)
    tr = Translator(t.ctx, max_event=1024)  # (the bound: 8 × 1 KiB of output, each delta and item at its cost)
    out = tr.accepted() + tr.feed(chat_sse(chat_chunk({"reasoning_content": "hmm"}),
                                           *[chat_chunk({"content": "word "}) for _ in range(100)]))
    evs = check_stream(out, "resp_x")
    check_sdk(evs)  # (the gateway's own code is the error's type: errors.py response_error)
    end = evs[-1]["response"]
    assert (end["status"], end["error"]["code"], end["error"]["type"]) == ("failed", "server_error", OUTPUT_TOO_LARGE)
    assert [i["type"] for i in end["output"]] == ["reasoning"]
    assert not [e for e in evs if e["type"] == "response.output_text.done"]


def test_a_tool_call_a_failure_cuts_is_not_closed():
    """The exception: a call the model was writing when the response failed (or was cancelled)
    gets no ``output_item.done`` and is not in the failed Response's output. A client runs a
    call when its ``output_item.done`` comes, whatever its status (Codex does:
    test_e2e_codex.py), and a failed response's call may be whole or cut anywhere; the reasoning
    before it is closed as usual."""
    body = {"model": "m", "input": "hi", "tools": WEATHER_TOOLS}
    for end in (lambda tr: tr.fail_upstream(None, b'{"error": {"message": "boom"}}'), lambda tr: tr.cancel()):
        tr = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_x", 100).translator()
        out = tr.accepted() + tr.feed(chat_sse(chat_chunk({"reasoning_content": "let me see"}),
                                               tool_call_chunk(0, "c1", "get_weather", "{}"), done=False))
        evs = check_stream(out + end(tr), "resp_x")
        assert [e["item"]["type"] for e in evs if e["type"] == "response.output_item.added"] == [
            "reasoning", "function_call"]
        assert [(e["item"]["type"]) for e in evs if e["type"] == "response.output_item.done"] == ["reasoning"]
        assert [i["type"] for i in evs[-1]["response"]["output"]] == ["reasoning"]
        assert not [e for e in evs if e["type"] == "response.function_call_arguments.done"]


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_a_failed_response_is_stored_with_its_error_and_not_gone_on_from(upstream, gateway_factory, transport):
    """OpenAI keeps a failed response (``store`` true): ``GET /v1/responses/{id}`` answers it,
    ``status: failed`` with its ``error`` and the output it had. The gateway stored only
    completed and incomplete ones: a failed stream's id was a 404. A ``previous_response_id``
    naming it is a 400 that says it failed, with the code a client recovers with
    (``previous_response_not_found``: send the history again), not a continuation of a turn
    that never finished. Kept as every stored response: ``store: false`` keeps nothing, and
    another client's (``forward_client_auth``: each credential its own owner) is unknown."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         "--set", "resp2chat_forward_client_auth=true")
    client = openai_client(gw)
    if transport == "http":
        failed = list(client.responses.create(model="demo-model", input="midstream-error", stream=True))[-1]
        failed = failed.response.model_dump()
    else:
        ws = WSClient(gw.base_url, headers={"authorization": "Bearer sk-client-key"})
        try:
            failed = ws.turn({"type": "response.create", "model": "demo-model", "input": "midstream-error"})[-1]
        finally:
            ws.close()
        failed = failed["response"]
    assert failed["status"] == "failed" and failed["output"], failed
    stored = client.responses.retrieve(failed["id"])
    assert stored.status == "failed" and stored.error.code == "server_error"
    assert stored.model_dump() == Response.model_validate(failed).model_dump()
    assert [i.content[0].text for i in client.responses.input_items.list(failed["id"]).data] == ["midstream-error"]
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo-model", previous_response_id=failed["id"], input="go on")
    assert (err.value.body["param"], err.value.body["code"]) == ("previous_response_id", "previous_response_not_found")
    assert "failed" in err.value.body["message"] and upstream.requests() == []
    with pytest.raises(openai.NotFoundError):  # (another credential: another owner)
        openai_client(gw, api_key="sk-someone-else").responses.retrieve(failed["id"])
    unstored = list(client.responses.create(model="demo-model", input="midstream-error", stream=True,
                                            store=False))[-1]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.response.id)


# --- a backend's refusal: a message's refusal part ----------------------------------------------


class Refuses(QuietHandler):
    """A chat backend that refuses, as OpenAI's Chat Completions API does: ``delta.refusal``
    pieces in a stream, finish ``stop``; asked for a "whole" answer, it ignores ``stream`` and
    sends one ``chat.completion`` (``message.refusal``, content null)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if "whole" not in json.dumps(body["messages"]):
            send_sse(self, chat_sse(chat_chunk({"role": "assistant", "content": ""}),
                                    chat_chunk({"refusal": "I can't"}), chat_chunk({"refusal": " help with that."}),
                                    chat_chunk({}, "stop")))
        else:
            send_json(self, 200, chat_completion({"role": "assistant", "content": None,
                                                  "refusal": "I can't help with that."}, "stop"))


def test_a_backends_refusal_is_a_refusal_part_of_the_message(gateway_factory):
    """OpenAI's Chat Completions API says a refusal in ``refusal`` (a stream's deltas, a body's
    message), not in ``content``; the Responses API's answer is a message whose content part is
    ``{"type": "refusal", "refusal"}``, streamed as ``response.refusal.delta``/``.done`` between
    the part's added and done (what the openai SDK's ``responses.parse`` reads a refusal from).
    The gateway dropped it: a ``completed`` response with no output at all, as if the model had
    said nothing. The same whether the backend streams or answers one JSON body, over HTTP and
    the Responses WebSocket."""
    with LocalServer(Refuses) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        client = openai_client(gw)
        part = {"type": "refusal", "refusal": "I can't help with that."}
        answer = client.responses.create(model="m", input="how do I pick a lock?")
        assert answer.status == "completed" and [i.type for i in answer.output] == ["message"], answer
        assert [p.model_dump() for p in answer.output[0].content] == [part]
        assert client.responses.retrieve(answer.id).output == answer.output
        whole = client.responses.create(model="m", input="whole: how do I pick a lock?")
        assert [p.model_dump() for p in whole.output[0].content] == [part], whole
        r = requests.post(f"{gw.base_url}/responses", timeout=30,
                          json={"model": "m", "input": "how do I pick a lock?", "stream": True})
        events = check_stream(r.content, r.content.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())
        check_sdk(events)
        kinds = [e["type"] for e in events]
        assert kinds[2:-1] == ["response.output_item.added", "response.content_part.added",
                               "response.refusal.delta", "response.refusal.delta", "response.refusal.done",
                               "response.content_part.done", "response.output_item.done"], kinds
        item_id = events[2]["item"]["id"]
        assert all(e["item_id"] == item_id and e["output_index"] == 0 and e["content_index"] == 0
                   for e in events[3:-2]), events[3:-2]
        assert events[3]["part"] == {"type": "refusal", "refusal": ""}
        assert "".join(e["delta"] for e in events if e["type"] == "response.refusal.delta") == part["refusal"]
        assert events[-3]["part"] == part and events[-4]["refusal"] == part["refusal"]
        assert events[-1]["response"]["output"] == [events[-2]["item"]] and events[-2]["item"]["content"] == [part]
        ws = WSClient(gw.base_url)
        try:
            sent = ws.turn({"type": "response.create", "model": "m", "input": "how do I pick a lock?"})
        finally:
            ws.close()
        check_sdk(sent)
        assert sent[-1]["response"]["output"][0]["content"] == [part], sent[-1]
