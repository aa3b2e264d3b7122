"""``POST /v1/responses/input_tokens`` and the stored-response API (``GET``/``DELETE
/v1/responses/{id}``, its ``stream=true`` resume, ``GET /v1/responses/{id}/input_items``) as
properties, through real mitmdump gateways, the scripted upstream and the openai SDK's typed
client (every JSON answer it or ``requests`` reads is checked against the spec: helpers.py
``check_body``).

How the gateway counts input tokens (addons/input_tokens.py): the request is lowered as a turn
would be, and its chat request counted by the first upstream's tokenizer (vLLM's ``/tokenize``;
llama.cpp's ``/apply-template`` + ``/tokenize``), else estimated (4 bytes a token). The scripted
upstream has vLLM's ``/tokenize``, which counts what its chat endpoint reports as
``prompt_tokens``: so the count must be the ``usage.input_tokens`` of the same request as a turn.

Properties (hypothesis draws requests, chains, pages, ids):

- input_tokens equals the turn's ``usage.input_tokens`` (with ``previous_response_id`` too) and
  never calls the chat endpoint; it refuses exactly the requests a turn refuses, with the same
  status, ``param`` and ``code``;
- a stored response read back (``GET``) is the final Response its stream ended with, field for
  field (``include=reasoning.encrypted_content``: the same, with the reasoning sealed); a JSON
  turn's answer too;
- ``input_items`` of a chain lists exactly that response's input (the history it continues,
  then its own input), in order, under random ``limit``/``order`` walks without loss or repeat; an
  ``after`` from another response's list is a 400 naming ``after``;
- once deleted: ``GET``, ``input_items``, a second ``DELETE`` are 404s, ``previous_response_id``
  (a turn's, input_tokens') a 400 ``previous_response_not_found``;
- an id of any spelling (unicode, slashes, percent-encoding, dots, very long) is a 4xx JSON
  error, never a 5xx;
- with client keys, one client can neither read, list, delete, resume, cancel nor continue
  another's response, and its attempts change nothing;
- a background response: its input items are its input while it runs too, and once a replica
  that took it for dead cancelled it (with Redis), whose continuation has the whole conversation;
  once deleted it is gone for a resume as for a GET; one the store cannot keep is a 413 at once.

Found here (each test failed before its fix): input_tokens counted a request a turn refuses (a
``stream``/``store``/``background`` that is no boolean, ``background`` without ``store``): it
lowered it with those three replaced; a background response was stored without its conversation
until it ended (no input items while it ran, none ever once cancelled by another replica, whose
continuation lost its history), and one the store could not keep answered ``queued`` and was
never found; a resume of one deleted while it ran here streamed it on.

What held (no bug): input_tokens equals the turn's ``usage.input_tokens`` (vLLM's ``/tokenize``
on the scripted upstream), with ``previous_response_id`` too, and never calls the model; GET is
the final Response field for field; input_items pages without loss or repeat; a deleted response
is a 404/``previous_response_not_found`` everywhere; odd ids are 4xx (a percent-encoded one is the
gate's 400 ``invalid_path``); one client never reaches another's response. (Server-side
compaction, ``context_management``, is where the two counts differ by design: input_tokens counts
the request, the turn's usage the answer round after its compaction.)

Derandomized: the same examples every run; few of them (each is a few gateway round trips).
"""

from __future__ import annotations

import json
import signal
import time
from urllib.parse import quote

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import iter_sse, openai_client, parse_sse, start_gateway, terminal, wait_until
from resp2chat_core import background as B

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
ENCRYPTED = "reasoning.encrypted_content"


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory):
    gateway = start_gateway(upstream.origin, tmp_path_factory.mktemp("stored-api"),
                            "--set", "resp2chat_max_replay_entries=0")
    yield gateway
    gateway.stop()


def error_of(r: requests.Response) -> tuple[int, str | None, str | None]:
    """A refusal as (status, param, code); its body must be OpenAI's error JSON."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"], error
    return r.status_code, error.get("param"), error.get("code")


# --- requests -------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
ANSWER = st.sampled_from(["", "noreason\n", "words: 3\n", "length\n", "json\n"])
CALL = "call: f {\"x\": 1}\n"  # (a call of the tool f: only where it is offered)
FUNCTION = {"type": "function", "name": "f", "description": "a tool",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}


@st.composite
def turn_bodies(draw, tools: bool = True) -> dict:
    """A request the scripted upstream answers (its last user message directs it); ``tools``:
    now and then with a function tool, which it may be told to call."""
    history = draw(st.lists(st.tuples(st.sampled_from(["user", "assistant", "developer"]), TEXT), max_size=3))
    offered = tools and draw(st.booleans())
    last = draw(st.sampled_from([CALL]) | ANSWER if offered else ANSWER) + draw(TEXT)
    as_string = not history and draw(st.booleans())
    body = {"model": "demo-model",
            "input": last if as_string else [{"role": r, "content": t} for r, t in history]
            + [{"role": "user", "content": last}]}
    if draw(st.booleans()):
        body["instructions"] = draw(TEXT)
    if offered:
        body["tools"] = [FUNCTION]
        body["tool_choice"] = draw(st.sampled_from(["auto", "required", "none"]))
    if draw(st.booleans()):
        body["text"] = {"format": {"type": "json_schema", "name": "answer", "strict": True, "schema": {
            "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
            "additionalProperties": False}}}
    return body


COUNTED = ("conversation", "input", "instructions", "model", "parallel_tool_calls", "previous_response_id",
           "reasoning", "text", "tool_choice", "tools", "truncation")  # (the SDK's count takes these)


def count(client, body: dict) -> int:
    counted = client.responses.input_tokens.count(**{k: v for k, v in body.items() if k in COUNTED},
                                                  extra_body={k: v for k, v in body.items() if k not in COUNTED})
    assert counted.object == "response.input_tokens" and isinstance(counted.input_tokens, int)
    return counted.input_tokens


@settings(max_examples=12, **SETTINGS)
@given(turn_bodies(), st.booleans(), st.one_of(st.none(), turn_bodies()))
def test_input_tokens_are_what_the_turn_reports_and_never_call_the_model(gw, upstream, body, stream, later):
    """The count of a request is its turn's ``usage.input_tokens`` (the scripted upstream's
    ``/tokenize`` counts as its chat endpoint does), without a call of the chat endpoint; the
    same for a request that continues it (``previous_response_id``)."""
    client = openai_client(gw)
    upstream.clear()
    counted = count(client, body)
    assert upstream.requests() == []  # (the tokenizer only: never the model)
    answered = client.responses.create(**body, stream=False)
    assert counted == answered.usage.input_tokens > 0, (counted, answered.usage)
    if later is None or any(o.type == "function_call" for o in answered.output):  # (a call left open: its
        return  # output must come next)
    later = {**later, "previous_response_id": answered.id, "store": True}
    upstream.clear()
    counted = count(client, later)
    assert upstream.requests() == []
    if stream:
        events = parse_sse(requests.post(f"{gw.base_url}/responses", json={**later, "stream": True}, timeout=60).content)
        usage = terminal(events)["response"]["usage"]
    else:
        usage = client.responses.create(**later).usage.model_dump()
    assert counted == usage["input_tokens"], (counted, usage)


# requests a turn refuses (and so must input_tokens, with the same error): (what to change, why)
REFUSED = [
    ({"model": None}, "no model"), ({"model": 7}, "a model that is no string"), ({"model": ""}, "an empty model"),
    ({"input": 5}, "an input that is neither a string nor items"),
    ({"input": [{"type": "nonsense"}]}, "an item of no type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "a part without its text"),
    ({"input": [], "instructions": None}, "nothing to send"),
    ({"tools": [{"type": "function"}]}, "a function tool without a name"),
    ({"tools": "f"}, "tools that are no list"),
    ({"previous_response_id": "resp_nowhere0000"}, "an unknown previous response"),
    ({"previous_response_id": 7}, "a previous response id that is no string"),
    ({"input": [{"type": "item_reference", "id": "msg_nowhere"}]}, "an unknown item reference"),
    ({"stream": "yes"}, "a stream that is no boolean"),
    ({"store": "no"}, "a store that is no boolean"),
    ({"background": True, "store": False}, "a background response that is not stored"),
    ({"background": "yes"}, "a background that is no boolean"),
    ({"temperature": 9}, "a temperature out of range"),
    ({"max_output_tokens": 1}, "max_output_tokens below the API's minimum"),
    ({"include": ["nonsense"]}, "an include the API does not define"),
    ({"truncation": "sometimes"}, "an unknown truncation"),
    ({"text": {"format": {"type": "json_schema"}}}, "a json_schema format without its schema"),
    ({"tool_choice": {"type": "function", "name": "missing"}}, "a tool choice naming no tool"),
    ({"conversation": "conv_nowhere000"}, "an unknown conversation"),
    ({"metadata": {"k" * 65: "v"}}, "a metadata key longer than OpenAI's limit"),
]


@settings(max_examples=30, **SETTINGS)
@given(st.sampled_from(REFUSED), turn_bodies())
def test_input_tokens_refuse_what_a_turn_refuses_with_the_same_error(gw, upstream, refused, body):
    change, why = refused
    bad = {k: v for k, v in {**body, **change}.items() if v is not None}
    upstream.clear()
    turned = requests.post(f"{gw.base_url}/responses", json=bad, timeout=30)
    counted = requests.post(f"{gw.base_url}/responses/input_tokens", json=bad, timeout=30)
    assert 400 <= turned.status_code < 500, (why, turned.status_code, turned.text[:300])
    assert error_of(counted) == error_of(turned), (why, counted.text[:300], turned.text[:300])
    assert upstream.requests() == []


def test_input_tokens_of_a_body_that_is_no_json_object_are_refused_as_a_turn(gw, upstream):
    for body in (b"[]", b"nul", b'{"model": "demo-model", "input": "hi"', b"\xff", b'"x"', b"{}"):
        turned = requests.post(f"{gw.base_url}/responses", data=body, timeout=30,
                               headers={"content-type": "application/json"})
        counted = requests.post(f"{gw.base_url}/responses/input_tokens", data=body, timeout=30,
                                headers={"content-type": "application/json"})
        assert 400 <= counted.status_code < 500 and error_of(counted) == error_of(turned), (body, counted.text)


# --- a stored response read back ----------------------------------------------------------------


def without_seals(response: dict) -> dict:
    return {**response, "output": [{k: v for k, v in i.items() if k != "encrypted_content"}
                                   for i in response["output"]]}


@settings(max_examples=10, **SETTINGS)
@given(turn_bodies(), st.booleans(), st.booleans(), st.sampled_from(["", "\nerror: 400 refused here"]))
def test_a_stored_response_reads_back_as_its_stream_ended(gw, body, stream, include, failing):
    """``GET /v1/responses/{id}`` is the final Response the turn answered (the ``response`` of its
    stream's terminal event, or its JSON answer), every field; with ``include``
    ``reasoning.encrypted_content`` its reasoning items carry the seal, as the turn gave them
    when it asked for it. A failed turn is kept when its client saw its id (a stream)."""
    client = openai_client(gw)
    if failing and isinstance(body["input"], list):
        body = {**body, "input": [*body["input"][:-1], {"role": "user", "content": failing.strip()}]}
    elif failing:
        body = {**body, "input": failing.strip()}
    turn = {**body, **({"include": [ENCRYPTED]} if include else {})}
    if stream:
        final = terminal(parse_sse(requests.post(f"{gw.base_url}/responses", json={**turn, "stream": True},
                                                 timeout=60).content))["response"]
    else:
        answer = requests.post(f"{gw.base_url}/responses", json=turn, timeout=60)
        if failing:  # (a JSON answer's failure is an error body alone: nothing to read back)
            assert answer.status_code >= 400, answer.text
            return
        final = answer.json()
    assert final["status"] in ("completed", "incomplete", "failed"), final
    read = requests.get(f"{gw.base_url}/responses/{final['id']}", timeout=30)
    assert read.status_code == 200, read.text
    assert read.json() == (without_seals(final) if include else final)
    sealed = requests.get(f"{gw.base_url}/responses/{final['id']}?include={ENCRYPTED}", timeout=30).json()
    assert without_seals(sealed) == without_seals(final)
    assert all(i.get("encrypted_content") for i in sealed["output"] if i["type"] == "reasoning")
    typed = client.responses.retrieve(final["id"])
    assert typed.id == final["id"] and typed.status == final["status"]
    assert [o.id for o in typed.output] == [o["id"] for o in final["output"]]
    # a resume of a response that is no background one is a 400 naming stream, not its events
    resumed = requests.get(f"{gw.base_url}/responses/{final['id']}?stream=true", timeout=30)
    assert error_of(resumed)[:2] == (400, "stream"), resumed.text


# --- input_items of chains ------------------------------------------------------------------------


def walk(client, rid: str, limit: int, order: str) -> list[str]:
    """Every page of a response's input items, ``after`` each one's ``last_id``."""
    out, after = [], None
    for _ in range(60):
        page = client.responses.input_items.list(rid, limit=limit, order=order,
                                                 **({"after": after} if after else {}))
        ids = [i.id for i in page.data]
        assert len(ids) <= limit and (page.has_more is False or len(ids) == limit)
        assert page.first_id == (ids[0] if ids else None) and page.last_id == (ids[-1] if ids else None)
        out += ids
        if not page.has_more:
            return out
        after = page.last_id
    raise AssertionError(f"the walk does not end: {out}")


def shown(item) -> tuple:
    """An item as its content shows it (role and texts, or its type and call id)."""
    item = item if isinstance(item, dict) else item.model_dump()
    content = item.get("content")
    texts = tuple(p.get("text") or p.get("refusal") for p in content) if isinstance(content, list) else (content,)
    return (item.get("type", "message"), item.get("role"), texts if content is not None else item.get("call_id"))


@settings(max_examples=8, **SETTINGS)
@given(st.lists(turn_bodies(tools=False), min_size=1, max_size=3), st.data())
def test_input_items_of_a_chain_are_its_input_paged_without_loss_or_repeat(gw, bodies, data):
    client = openai_client(gw)
    chain, expected, previous = [], [], None
    for body in bodies:
        if previous is not None:
            body = {**body, "previous_response_id": previous.id}
        response = client.responses.create(**body)
        own = [{"role": "user", "content": [{"type": "input_text", "text": body["input"]}]}] \
            if isinstance(body["input"], str) else body["input"]
        expected = expected + ([o.model_dump() for o in previous.output] if previous is not None else []) + own
        chain.append((response, [shown(i) for i in expected]))
        previous = response
    for response, items in chain:
        whole = client.responses.input_items.list(response.id, limit=100, order="asc")
        listed = [shown(i) for i in whole.data]
        assert [(t, r, x if t == "message" and r != "assistant" else None) for t, r, x in listed] == [
            (t, r, x if t == "message" and r != "assistant" else None) for t, r, x in items], (listed, items)
        ids = [i.id for i in whole.data]
        assert len(set(ids)) == len(ids) and all(ids)
        limit, order = data.draw(st.integers(1, 5)), data.draw(st.sampled_from(["asc", "desc"]))
        assert walk(client, response.id, limit, order) == (ids if order == "asc" else ids[::-1])
        assert [i.id for i in client.responses.input_items.list(response.id, limit=limit)] == ids[::-1]
    # a cursor of another response's list (one not in this one) is a 400 naming after
    first, last = chain[0][0], chain[-1][0]
    theirs = [i.id for i in client.responses.input_items.list(last.id, limit=100)]
    mine = {i.id for i in client.responses.input_items.list(first.id, limit=100)}
    for cursor in [c for c in theirs if c not in mine][:2]:
        r = requests.get(f"{gw.base_url}/responses/{first.id}/input_items", params={"after": cursor}, timeout=30)
        assert error_of(r)[:2] == (400, "after"), r.text


# --- delete ------------------------------------------------------------------------------------


@settings(max_examples=6, **SETTINGS)
@given(turn_bodies(tools=False), st.booleans())
def test_a_deleted_response_is_gone_everywhere(gw, upstream, body, stream):
    client = openai_client(gw)
    first = client.responses.create(**body)
    later = client.responses.create(model="demo-model", input="after it", previous_response_id=first.id)
    deleted = client.responses.delete(first.id)
    assert deleted is None  # (the SDK's delete reads no body; the raw one:)
    for method, path in (("GET", ""), ("GET", "/input_items"), ("DELETE", ""), ("GET", "?include=" + ENCRYPTED),
                         ("GET", "?stream=true"), ("POST", "/cancel")):
        r = requests.request(method, f"{gw.base_url}/responses/{first.id}{path}", timeout=30)
        assert error_of(r)[:1] == (404,), (method, path, r.text)
    for url in (f"{gw.base_url}/responses", f"{gw.base_url}/responses/input_tokens"):
        r = requests.post(url, json={"model": "demo-model", "input": "more", "previous_response_id": first.id,
                                     "stream": stream}, timeout=30)
        assert error_of(r) == (400, "previous_response_id", "previous_response_not_found"), (url, r.text)
    # what continued it before is whole still: it holds the conversation
    assert client.responses.retrieve(later.id).id == later.id
    assert client.responses.create(model="demo-model", input="on", previous_response_id=later.id).status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(first.id)


def test_delete_answers_what_openai_answers(gw):
    client = openai_client(gw)
    response = client.responses.create(model="demo-model", input="hi")
    r = requests.delete(f"{gw.base_url}/responses/{response.id}", timeout=30)
    assert r.status_code == 200 and r.json() == {"id": response.id, "object": "response", "deleted": True}


# --- ids of any spelling -------------------------------------------------------------------------

ODD = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20),
    st.sampled_from(["resp_/x", "resp_%2Fx", "..", ".", "%2e%2e", "resp_%00", "resp_ x", "resp_\u00e9", "resp_\u202e",
                     "resp_" + "a" * 5000, "resp_" + "a" * 40000, "input_tokens", "compact", "%", "%zz", "resp_%",
                     "conv_12345678", "resp_12345678?stream=true", "resp_#x", "resp_;x", "resp_\\x"]),
    st.builds(lambda n: "resp_" + "9" * n, st.integers(50, 200)))


def spellings(odd: str) -> list[str]:
    """The ways a client may put ``odd`` in a path: percent-encoded as the SDK does, as raw
    UTF-8 (what survives a request line), and encoded twice."""
    out = [quote(odd, safe=""), quote(odd, safe="/%"), quote(quote(odd, safe=""), safe="")]
    if all(0x20 < ord(c) < 0x7F and c not in "?#" for c in odd):
        out.append(odd)
    return list(dict.fromkeys(out))


@settings(max_examples=25, **SETTINGS)
@given(ODD)
def test_an_id_of_any_spelling_is_a_4xx_never_a_5xx(gw, odd):
    client = openai_client(gw)
    for spelt in spellings(odd):
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("GET", "?stream=true"),
                             ("POST", "/cancel"), ("GET", "/input_items?after=x&limit=2")):
            url = f"{gw.base_url}/responses/{spelt}{path}"
            r = requests.request(method, url, timeout=30)
            assert 400 <= r.status_code < 500, (method, url[:200], r.status_code, r.text[:300])
            if r.status_code != 431:  # (a head too large: answered before any JSON body is made)
                error_of(r)
    for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list,
                 client.responses.cancel):
        try:
            call(odd)
        except (openai.BadRequestError, openai.NotFoundError, openai.APIStatusError) as err:
            assert 400 <= err.status_code < 500, (call, odd[:100], err)
        except ValueError:  # (the SDK refuses a dot segment itself: path_template)
            pass
        else:
            raise AssertionError(f"{call} of {odd[:100]!r} answered")
    r = requests.post(f"{gw.base_url}/responses/input_tokens", timeout=30,
                      json={"model": "demo-model", "input": "x", "previous_response_id": odd})
    assert error_of(r)[:2] == (400, "previous_response_id"), r.text


# --- client identities ------------------------------------------------------------------------------

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef00"


@pytest.fixture(scope="module")
def keyed(upstream, tmp_path_factory):
    clients = json.dumps([{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}])
    gateway = start_gateway(upstream.origin, tmp_path_factory.mktemp("keyed"), "--set",
                            "resp2chat_max_replay_entries=0", "--set", f"resp2chat_clients={clients}")
    yield gateway
    gateway.stop()


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@settings(max_examples=4, **SETTINGS)
@given(turn_bodies(tools=False), st.booleans())
def test_one_client_cannot_touch_anothers_response(keyed, body, background):
    alice, bob = openai_client(keyed, ALICE), openai_client(keyed, BOB)
    if background:
        body = {**body, "input": "noreason\nwords: 20\nslow: 20", "background": True, "stream": True}
        r = requests.post(f"{keyed.base_url}/responses", json=body, headers=auth(ALICE), stream=True, timeout=60)
        reading = iter_sse(r)
        rid = next(reading)["response"]["id"]
    else:
        rid = alice.responses.create(**body).id
    url = f"{keyed.base_url}/responses/{rid}"
    for method, path in (("GET", ""), ("GET", "/input_items"), ("GET", "?stream=true"), ("POST", "/cancel"),
                         ("DELETE", "")):
        r = requests.request(method, url + path, headers=auth(BOB), timeout=30)
        assert error_of(r)[:1] == (404,), (method, path, r.text)
    for path in ("", "/input_tokens"):
        r = requests.post(f"{keyed.base_url}/responses{path}", headers=auth(BOB), timeout=30,
                          json={"model": "demo-model", "input": "x", "previous_response_id": rid})
        assert error_of(r)[:2] == (400, "previous_response_id"), (path, r.text)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(rid)
    if background:
        for _ in reading:
            pass
        wait_until(lambda: alice.responses.retrieve(rid).status == "completed", 30, "the run's end")
    assert alice.responses.retrieve(rid).id == rid  # (bob's attempts changed nothing)
    assert alice.responses.input_items.list(rid).data
    alice.responses.delete(rid)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(rid)


# --- background responses -----------------------------------------------------------------------


def test_a_running_background_responses_input_items_are_its_input(gw):
    """OpenAI lists a background response's input items from its creation: here they were
    stored only once it ended (queued and in_progress, none)."""
    client = openai_client(gw)
    first = client.responses.create(model="demo-model", input="remember me")
    body = {"model": "demo-model", "previous_response_id": first.id, "background": True,
            "input": [{"role": "user", "content": "noreason\nwords: 40\nslow: 50"}]}
    queued = requests.post(f"{gw.base_url}/responses", json=body, timeout=30).json()
    assert queued["status"] in ("queued", "in_progress"), queued
    whole = [shown(i) for i in client.responses.input_items.list(first.id, order="asc").data] + [
        shown(o) for o in first.output] + [shown({"role": "user", "content": [
            {"type": "input_text", "text": body["input"][0]["content"]}]})]
    seen = []
    for _ in range(3):  # (queued, in progress, with some output)
        got = client.responses.retrieve(queued["id"])
        listed = [shown(i) for i in client.responses.input_items.list(queued["id"], order="asc", limit=100).data]
        seen.append(got.status)
        assert [(t, r) for t, r, _ in listed] == [(t, r) for t, r, _ in whole], (got.status, listed)
        time.sleep(0.6)
    assert "in_progress" in seen or "queued" in seen, seen
    wait_until(lambda: client.responses.retrieve(queued["id"]).status == "completed", 30, "the run's end")
    listed = [shown(i) for i in client.responses.input_items.list(queued["id"], order="asc", limit=100).data]
    assert [(t, r) for t, r, _ in listed] == [(t, r) for t, r, _ in whole]


def test_a_background_response_deleted_while_it_runs_is_gone_for_a_resume_too(gw):
    r = requests.post(f"{gw.base_url}/responses", stream=True, timeout=30, json={
        "model": "demo-model", "input": "noreason\nwords: 60\nslow: 50", "background": True, "stream": True})
    reading = iter_sse(r)
    rid = next(reading)["response"]["id"]
    assert requests.delete(f"{gw.base_url}/responses/{rid}", timeout=30).status_code == 200
    assert requests.get(f"{gw.base_url}/responses/{rid}", timeout=30).status_code == 404
    resumed = requests.get(f"{gw.base_url}/responses/{rid}?stream=true", timeout=30, stream=True)
    assert error_of(resumed) == (404, None, "response_not_found"), resumed.status_code
    r.close()


def test_a_background_response_cancelled_on_another_replica_keeps_its_conversation(upstream, gateway_factory,
                                                                                    redis_server):
    """Replica A runs a background response that continues another, and stalls past its lease;
    replica B cancels it, storing it ``cancelled`` itself over what A stored last. Its input
    items are still its input, and a turn that continues it still has the whole conversation
    (A stored the conversation only at the run's end: B's write kept none of it)."""
    a, b = [gateway_factory(upstream.origin, "--set", f"resp2chat_state_store_url={redis_server.url}",
                            "--set", "resp2chat_max_replay_entries=0") for _ in range(2)]
    on_a, on_b = openai_client(a), openai_client(b)
    first = on_a.responses.create(model="demo-model", input="my name is Ada")
    running = on_a.responses.create(model="demo-model", input="noreason\nwords: 800\nslow: 50",
                                    previous_response_id=first.id, background=True)
    wait_until(lambda: on_b.responses.retrieve(running.id).status == "in_progress", 10, "it runs")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(B.LEASE_SECS + 1)
        cancelled = on_b.responses.cancel(running.id)
        assert cancelled.status == "cancelled"
        listed = [shown(i) for i in on_b.responses.input_items.list(running.id, order="asc", limit=100).data]
        assert [(t, r) for t, r, _ in listed] == [("message", "user"), ("reasoning", None), ("message", "assistant"),
                                                  ("message", "user")], listed
        upstream.clear()
        on_b.responses.create(model="demo-model", input="what is my name", previous_response_id=running.id)
        (sent,) = upstream.requests()
        assert "my name is Ada" in json.dumps(sent["messages"]), sent["messages"]
    finally:
        a.proc.send_signal(signal.SIGCONT)


def test_a_background_response_the_store_cannot_keep_is_refused_at_once(upstream, gateway_factory):
    """A background response is read from the store: one whose conversation the store cannot
    keep (larger than ``max_session_memory_mb``) is a 413 naming its input, not a ``queued``
    response that a poll finds nowhere and whose run ends unkept."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_session_memory_mb=1")
    r = requests.post(f"{gw.base_url}/responses", timeout=30, json={
        "model": "demo-model", "background": True, "input": [{"role": "user", "content": "x" * (1 << 20)},
                                                             {"role": "user", "content": "noreason\nhi"}]})
    assert error_of(r) == (413, "input", "conversation_too_large"), (r.status_code, r.text[:300])
