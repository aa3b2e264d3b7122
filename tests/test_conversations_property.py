"""The Conversations API (addons/conversations.py) under random sequences of operations, through
real mitmdump gateways and the openai SDK's typed client, against a plain model: each
conversation is its owner, its metadata and a list of (id, role, text) items.

Property tests (hypothesis, derandomized: the same examples every run):

- a random sequence of creates, metadata updates, deletes, item adds, item deletes, item GETs,
  list walks and turns naming the conversation (HTTP JSON, streamed, the WebSocket) agrees with the model on
  every read, on the memory store and on Redis shared by two replicas (each operation on either
  one): both agree with the model, so with each other;
- a turn lowers exactly the conversation's items as they are then (deleted ones gone), then its
  input and output join it; ids are unique, those the client gave kept;
- every answer parses strictly with the SDK's own models (``Conversation``,
  ``ConversationDeletedResource``, ``ConversationItemList``, ``ConversationItem``);
- the metadata bounds (16 pairs, keys up to 64 characters, values up to 512) and the 20 items a
  request may add are 400s that change nothing; an id the conversation holds, or one a request
  gives twice, is a 400 that changes nothing;
- each client (``forward_client_auth``: each credential its own owner) sees only its own
  conversations: another's is a 404 on every endpoint, and stays as it was;
- bad ids and bad parameters are 4xx JSON errors, never a 500;
- appends from two replicas at once (item adds and turns) all land, each once, each request's
  items together and in order.
"""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
import pydantic
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openai.types import conversations as T
from openai.types.responses import Response

from helpers import openai_client, start_gateway
from wsclient import WSClient
from redis_server import RedisServer, missing

KEYS = ("sk-conv-prop-owner-one-0001", "sk-conv-prop-owner-two-0002")  # (forward_client_auth: two owners)
ITEM = pydantic.TypeAdapter(T.ConversationItem)
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])


# --- the gateways -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_gateways(upstream, tmp_path_factory):
    gw = start_gateway(upstream.origin, tmp_path_factory.mktemp("conv-memory"), "--set",
                       "resp2chat_forward_client_auth=true", "--set", "resp2chat_max_replay_entries=0")
    yield [gw]
    gw.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    if missing():
        pytest.fail(missing())
    server = RedisServer(tmp_path_factory.mktemp("conv-redis-server") / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_gateways(upstream, redis, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv-redis")
    gws = [start_gateway(upstream.origin, tmp, "--set", f"resp2chat_state_store_url={redis.url}", "--set",
                         "resp2chat_forward_client_auth=true", "--set", "resp2chat_max_replay_entries=0")
           for _ in range(2)]
    yield gws
    for gw in gws:
        gw.stop()


@pytest.fixture(params=["memory", "redis"])
def gateways(request):
    return request.getfixturevalue(f"{request.param}_gateways")


# --- strict parsing with the SDK's models -------------------------------------------------------------


def strict(model, raw) -> object:
    """An SDK call's raw answer (``with_raw_response``), validated with ``model`` (the SDK itself
    only constructs its models, unvalidated), parsed as the SDK parses it."""
    data = raw.http_response.json()
    model.model_validate(data)
    if model is T.ConversationItemList:
        for item in data["data"]:
            ITEM.validate_python(item)
    return raw.parse()


def page_checked(p: dict, limit: int) -> list[dict]:
    assert p["object"] == "list" and len(p["data"]) <= limit, p
    for item in p["data"]:
        ITEM.validate_python(item)
    if p["data"]:
        T.ConversationItemList.model_validate(p)
        assert (p["first_id"], p["last_id"]) == (p["data"][0]["id"], p["data"][-1]["id"]), p
    return p["data"]


def text_of(item: dict) -> tuple[str, str]:
    content = item["content"]
    assert item["type"] == "message" and len(content) == 1, item
    return item["role"], content[0]["text"]


# --- the model ----------------------------------------------------------------------------------------


@dataclass
class Conv:
    id: str
    owner: int
    metadata: dict
    items: list = field(default_factory=list)  # (id, role, text)
    gone: bool = False


def metadata_ok(metadata: dict) -> bool:
    return len(metadata) <= 16 and all(len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())


GOOD_METADATA = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
METADATA = st.one_of(  # (mostly good; past each bound now and then)
    GOOD_METADATA, GOOD_METADATA, GOOD_METADATA,
    st.dictionaries(st.text(min_size=60, max_size=68), st.text(max_size=4), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=4), st.text(min_size=508, max_size=516), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=6), st.just("v"), min_size=15, max_size=18))
# an item: (role, as parts?, the id it is given: None, a fresh one, an odd one, one the conversation holds, or one
# given twice)
NEW_ITEM = st.tuples(st.sampled_from(["user", "assistant"]), st.booleans(),
                     st.sampled_from([None, None, None, "fresh", "fresh", "odd", "held", "twice"]))
WHO = st.sampled_from([0, 0, 0, 0, 0, 0, 1])  # 1: the other owner asks
CONV = st.integers(0, 9)
OPS = {  # (kind: (weight, its arguments))
    "create": (2, st.tuples(st.integers(0, 1), st.lists(NEW_ITEM, max_size=4), st.one_of(st.none(), METADATA))),
    "create_many": (1, st.tuples(st.integers(0, 1), st.lists(NEW_ITEM, min_size=21, max_size=22), st.none())),
    "update": (2, st.tuples(WHO, CONV, METADATA)),
    "delete": (1, st.tuples(st.sampled_from([0, 0, 1]), CONV)),
    "add": (5, st.tuples(WHO, CONV, st.lists(NEW_ITEM, min_size=1, max_size=4))),
    "add_many": (1, st.tuples(st.just(0), CONV, st.lists(NEW_ITEM, min_size=21, max_size=21))),
    "drop": (4, st.tuples(WHO, CONV, st.integers(0, 99))),
    "get": (2, st.tuples(WHO, CONV, st.integers(0, 99))),
    "list": (3, st.tuples(WHO, CONV, st.integers(1, 5), st.sampled_from(["asc", "desc"]))),
    "turn": (5, st.tuples(WHO, CONV, st.sampled_from(["json", "stream", "ws"]))),
}
OP = st.sampled_from([k for k, (w, _) in OPS.items() for _ in range(w)]).flatmap(
    lambda k: OPS[k][1].map(lambda args: (k.removesuffix("_many"), *args)))
FIRST = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.booleans(),
                           st.sampled_from([None, "fresh", "odd"])),
                 max_size=5)  # (each sequence starts from a conversation of each owner)
COUNTER = itertools.count()


class Run:
    """One sequence of operations: the gateways (each operation on one of them, by turns), the
    SDK clients of both owners on each, and the model."""

    def __init__(self, gws, upstream) -> None:
        self.gws, self.upstream = gws, upstream
        self.clients = [[openai_client(gw, api_key=k) for k in KEYS] for gw in gws]
        self.convs: list[Conv] = []
        self.turn = 0

    def client(self, who: int):
        self.turn += 1
        return self.clients[self.turn % len(self.gws)][who]

    def new_items(self, spec: list, conv: Conv | None) -> tuple[list, bool]:
        """The items to send and whether they are good (no id held or given twice, at most 20)."""
        items, ok, given = [], len(spec) <= 20, []
        for role, parts, give in spec:
            text = f"{role} says {next(COUNTER)}"
            kind = "output_text" if role == "assistant" else "input_text"
            item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]} if parts else \
                {"role": role, "content": text}
            if give == "odd":  # (a space, a non-ASCII letter, ? and #: the SDK percent-encodes them in a path)
                item["id"] = f"msg odd é?{next(COUNTER)}#"
            elif give == "fresh":
                item["id"] = f"msg_given{next(COUNTER)}"
            elif give == "held" and conv is not None and conv.items:
                item["id"], ok = conv.items[len(items) % len(conv.items)][0], False
            elif give == "twice" and given:
                item["id"], ok = given[-1], False
            if "id" in item:
                given.append(item["id"])
            items.append(item)
        return items, ok

    def expect_refused(self, call, status: int) -> None:
        with pytest.raises(openai.APIStatusError) as err:
            call()
        assert err.value.status_code == status, (err.value.status_code, err.value.body)
        assert isinstance(err.value.body, dict) and err.value.body.get("message"), err.value.body

    def pick(self, n: int) -> Conv | None:
        return self.convs[n % len(self.convs)] if self.convs else None

    def do(self, op: tuple) -> None:
        kind = op[0]
        if kind == "create":
            _, owner, spec, metadata = op
            client = self.client(owner)
            items, ok = self.new_items(spec, None)
            body = {"items": items, **({"metadata": metadata} if metadata is not None else {})}
            if not ok or metadata is not None and not metadata_ok(metadata):
                return self.expect_refused(lambda: client.conversations.create(**body), 400)
            conv = strict(T.Conversation, client.conversations.with_raw_response.create(**body))
            assert conv.object == "conversation" and conv.metadata == (metadata or {})
            assert not any(c.id == conv.id for c in self.convs)
            model = Conv(conv.id, owner, metadata or {})
            self.convs.append(model)
            listed = self.walk(client, model, 100, "asc")
            assert len(listed) == len(items), listed
            given = [i.get("id") for i in items]
            assert all(g is None or g == got["id"] for g, got in zip(given, listed)), (given, listed)
            model.items = [(got["id"], *text_of(got)) for got in listed]
            return
        conv = self.pick(op[2])
        if conv is None:
            return
        owner = conv.owner if op[1] == 0 else 1 - conv.owner
        client = self.client(owner)
        if conv.gone or owner != conv.owner:  # (unknown to this owner: 404 everywhere, nothing changes)
            return self.unknown(client, conv, op)
        if kind == "update":
            metadata = op[3]
            if not metadata_ok(metadata):
                self.expect_refused(lambda: client.conversations.update(conv.id, metadata=metadata), 400)
            else:
                got = strict(T.Conversation, client.conversations.with_raw_response.update(conv.id, metadata=metadata))
                assert got.metadata == metadata and got.id == conv.id
                conv.metadata = metadata
        elif kind == "delete":
            got = strict(T.ConversationDeletedResource, client.conversations.with_raw_response.delete(conv.id))
            assert got.deleted and got.id == conv.id
            conv.gone = True
        elif kind == "add":
            items, ok = self.new_items(op[3], conv)
            if not ok:
                self.expect_refused(lambda: client.conversations.items.create(conv.id, items=items), 400)
            else:
                got = strict(T.ConversationItemList, client.conversations.items.with_raw_response.create(
                    conv.id, items=items))
                assert [text_of(i.model_dump()) for i in got.data] == [
                    (i["role"], i["content"] if isinstance(i["content"], str) else i["content"][0]["text"])
                    for i in items]
                assert all(i.get("id") in (None, g.id) for i, g in zip(items, got.data))
                assert (got.first_id, got.last_id, got.has_more) == (got.data[0].id, got.data[-1].id, False)
                conv.items += [(g.id, *text_of(g.model_dump())) for g in got.data]
        elif kind == "drop":
            if not conv.items:
                self.expect_refused(lambda: client.conversations.items.delete("msg_none", conversation_id=conv.id),
                                    404)
            else:
                gone = conv.items[op[3] % len(conv.items)]
                got = strict(T.Conversation, client.conversations.items.with_raw_response.delete(
                    gone[0], conversation_id=conv.id))
                assert got.id == conv.id and got.metadata == conv.metadata
                conv.items.remove(gone)
                self.expect_refused(lambda: client.conversations.items.retrieve(gone[0], conversation_id=conv.id),
                                    404)
        elif kind == "get":
            if conv.items:
                want = conv.items[op[3] % len(conv.items)]
                raw = client.conversations.items.with_raw_response.retrieve(want[0], conversation_id=conv.id)
                data = raw.http_response.json()
                ITEM.validate_python(data)
                assert (data["id"], *text_of(data)) == want
        elif kind == "list":
            got = strict(T.Conversation, client.conversations.with_raw_response.retrieve(conv.id))
            assert got.metadata == conv.metadata and got.id == conv.id
            listed = self.walk(client, conv, op[3], op[4])
            assert [(i["id"], *text_of(i)) for i in listed] == conv.items[::1 if op[4] == "asc" else -1]
        elif kind == "turn":
            self.turn_in(client, conv, op[3])

    def unknown(self, client, conv: Conv, op: tuple) -> None:
        """Another owner's conversation, or a deleted one: unknown on every endpoint."""
        calls = {"update": lambda: client.conversations.update(conv.id, metadata={"x": "y"}),
                 "delete": lambda: client.conversations.delete(conv.id),
                 "add": lambda: client.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
                 "drop": lambda: client.conversations.items.delete(
                     conv.items[0][0] if conv.items else "msg_x", conversation_id=conv.id),
                 "get": lambda: client.conversations.items.retrieve(
                     conv.items[0][0] if conv.items else "msg_x", conversation_id=conv.id),
                 "list": lambda: client.conversations.items.list(conv.id),
                 "turn": lambda: client.responses.create(model="demo-model", input="hi", conversation=conv.id)}
        self.expect_refused(calls[op[0]], 404)
        if not conv.gone:  # (its owner still sees it as it was)
            mine = self.client(conv.owner)
            assert strict(T.Conversation, mine.conversations.with_raw_response.retrieve(conv.id)).metadata == \
                conv.metadata
            assert [(i["id"], *text_of(i)) for i in self.walk(mine, conv, 100, "asc")] == conv.items

    def walk(self, client, conv: Conv, limit: int, order: str) -> list[dict]:
        """Every page of the conversation's items, as the SDK walks them (``after``: the last id)."""
        out, after = [], None
        for _ in range(len(conv.items) + 2):
            kw = {"after": after} if after else {}
            raw = client.conversations.items.with_raw_response.list(conv.id, limit=limit, order=order, **kw)
            p = raw.http_response.json()
            out += page_checked(p, limit)
            if not p["has_more"]:
                return out
            after = p["last_id"]
        raise AssertionError(f"the walk of {conv.id} does not end: {out}")

    def turn_in(self, client, conv: Conv, how: str) -> None:
        """A turn naming the conversation (a JSON answer, a stream, the WebSocket) lowers exactly
        its items, then its input and output join it."""
        text = f"noreason\nturn {next(COUNTER)}"
        event(f"turn: {how}")
        self.upstream.clear()
        if how == "stream":
            events = list(client.responses.create(model="demo-model", input=text, conversation=conv.id, stream=True))
            response = events[-1].response
        elif how == "ws":  # (on the replica this client asks)
            ws = WSClient(str(client.base_url).rstrip("/"), headers={"authorization": f"Bearer {client.api_key}"})
            try:
                events = ws.turn({"type": "response.create", "model": "demo-model", "input": text,
                                  "conversation": {"id": conv.id}})
            finally:
                ws.close()
            assert events[-1]["type"] == "response.completed", events[-1]
            response = Response.model_validate(events[-1]["response"])
        else:
            response = client.responses.create(model="demo-model", input=text, conversation={"id": conv.id})
        assert response.status == "completed" and response.conversation.id == conv.id, response
        sent = [(m["role"], m["content"]) for m in self.upstream.requests()[-1]["messages"]]
        assert sent == [(role, t) for _, role, t in conv.items] + [("user", text)], sent
        [answer] = response.output
        assert answer.content[0].text == "You said: " + text.split("\n")[-1]
        listed = self.walk(client, conv, 100, "asc")
        assert [(i["id"], *text_of(i)) for i in listed[:len(conv.items)]] == conv.items
        assert [text_of(i) for i in listed[len(conv.items):]] == [("user", text), ("assistant", answer.content[0].text)]
        assert listed[-1]["id"] == answer.id
        conv.items = [(i["id"], *text_of(i)) for i in listed]

    def check_all(self) -> None:
        for conv in self.convs:
            if not conv.gone:
                client = self.client(conv.owner)
                assert strict(T.Conversation, client.conversations.with_raw_response.retrieve(conv.id)).metadata == \
                    conv.metadata
                listed = self.walk(client, conv, 7, "desc")
                assert [(i["id"], *text_of(i)) for i in listed] == conv.items[::-1]
        ids = [i[0] for c in self.convs for i in c.items]
        assert len(ids) == len(set(ids)), "an item id twice"


@settings(max_examples=15, **SETTINGS)
@given(first=FIRST, ops=st.lists(OP, min_size=1, max_size=14))
def test_a_random_sequence_of_operations_agrees_with_the_model(gateways, upstream, first, ops):
    run = Run(gateways, upstream)
    run.do(("create", 0, first, {"owner": "one"}))
    run.do(("create", 1, first[:1], None))
    for op in ops:
        run.do(op)
        event(op[0])
    run.check_all()


# --- bad ids and bad parameters: 4xx, never a 500 -----------------------------------------------------

BAD_QUERIES = ["limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1e2", "limit=", "limit=%EF%BC%91",
               "order=up", "order=", "after=nope", "include=bogus", "include[]=x", "after=%00",
               "limit=99999999999999999999999"]
BAD_IDS = ["conv_", "conv_x", "resp_abc", "conv_" + "a" * 300, "conv_%20", "conv_%C3%A9", "conv_..", "x",
           "conv_a%2Fb", "conv_%2e%2e", "msg_1"]
BAD_BODIES = [b"", b"nope", b"[]", b"1", b'"s"', b"null", b'{"metadata": 1}', b'{"metadata": {"a": 1}}',
              b'{"metadata": [1]}', b'{"items": {}}', b'{"items": [1]}', b'{"items": [null]}',
              b'{"items": [{"type": "message"}]}', b'{"items": [{"role": "user"}]}', b'{"items": "x"}',
              b'{"items": [{"role": "user", "content": "x", "id": 5}]}', b'{"metadata": {"k": null}}',
              b'{"items": [{"type": "item_reference", "id": "msg_x"}]}', b'{"items": [{"id": "msg_x"}]}',
              b'{"items": [{"role": "wizard", "content": "x"}]}', b'{"items": [{"type": "compaction"}]}',
              b'{"items": [{"type": "compaction", "encrypted_content": "x"}]}', b"{" * 2000]


@settings(max_examples=40, **SETTINGS)
@given(case=st.tuples(st.sampled_from(["get", "list", "item", "post", "items", "drop", "delete", "turn"]),
                      st.sampled_from([None, *BAD_IDS]), st.sampled_from([None, *BAD_QUERIES]),
                      st.sampled_from(BAD_BODIES)))
def test_bad_ids_and_parameters_are_4xx_never_a_500(memory_gateways, case):
    gw = memory_gateways[0]
    base = f"{gw.base_url}/conversations"
    auth = {"authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"}
    conv = requests.post(base, json={"items": [{"role": "user", "content": "hi"}]}, headers=auth, timeout=10).json()
    item = requests.get(f"{base}/{conv['id']}/items", headers=auth, timeout=10).json()["data"][0]["id"]
    what, bad_id, query, body = case
    cid = bad_id if bad_id is not None and what not in ("item", "drop") else conv["id"]
    iid = bad_id if bad_id is not None and what in ("item", "drop") else item
    method, path = {"get": ("GET", f"/{cid}"), "list": ("GET", f"/{cid}/items"), "item": ("GET", f"/{cid}/items/{iid}"),
                    "post": ("POST", f"/{cid}"), "items": ("POST", f"/{cid}/items"),
                    "drop": ("DELETE", f"/{cid}/items/{iid}"), "delete": ("DELETE", f"/{cid}"),
                    "turn": ("POST", "")}[what]
    url = base + path + (f"?{query}" if query else "")
    if what == "turn":  # (a turn naming a bad conversation)
        url = f"{gw.base_url}/responses"
        body = json.dumps({"model": "demo-model", "input": "hi", "conversation": cid if bad_id else
                           {"id": 5}}).encode()
    r = requests.request(method, url, data=body if method == "POST" else None, headers=auth, timeout=10)
    assert r.status_code < 500, (method, url, body[:80], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text


# --- appends at once, on two replicas -----------------------------------------------------------------


@settings(max_examples=5, **SETTINGS)
@given(batches=st.lists(st.integers(1, 4), min_size=2, max_size=14), turns=st.integers(0, 6))
def test_appends_at_once_on_two_replicas_lose_nothing_and_duplicate_nothing(redis_gateways, batches, turns):
    clients = [openai_client(gw, api_key=KEYS[0]) for gw in redis_gateways]
    conv = clients[0].conversations.create(items=[{"role": "user", "content": "first"}]).id
    tag = next(COUNTER)

    def add(n: int):
        k, size = n, batches[n] if n < len(batches) else None
        if size is None:  # a turn
            r = clients[k % 2].responses.create(model="demo-model", input=f"noreason\nat once {tag}.{k}",
                                                conversation=conv)
            return [f"noreason\nat once {tag}.{k}", r.output_text]
        texts = [f"batch {tag}.{k}.{j}" for j in range(size)]
        got = clients[k % 2].conversations.items.create(conv, items=[{"role": "user", "content": t} for t in texts])
        assert [i.content[0].text for i in got.data] == texts
        return texts

    with ThreadPoolExecutor(len(batches) + turns) as pool:
        added = list(pool.map(add, range(len(batches) + turns)))
    listed = [i for i in clients[1].conversations.items.list(conv, order="asc", limit=100)]
    texts = [i.content[0].text for i in listed]
    ids = [i.id for i in listed]
    assert len(ids) == len(set(ids)) and texts[0] == "first"
    assert sorted(texts[1:]) == sorted(t for group in added for t in group), texts
    for group in added:  # (each request's items together, in order)
        at = texts.index(group[0])
        assert texts[at:at + len(group)] == group, (group, texts)


# --- what the property tests found ------------------------------------------------------------------


def test_adding_no_items_is_a_400_not_a_list_the_sdk_cannot_parse(memory_gateways):
    """``POST /v1/conversations/{id}/items`` without items (none, null, ``[]``) answered 200 with
    an empty list whose ``first_id`` and ``last_id`` were null: the SDK's ``ConversationItemList``
    (what ``conversations.items.create`` returns) requires strings there, so a strict parse
    failed. OpenAI requires ``items`` (1 to 20 of them): a 400 naming ``items``, nothing added."""
    client = openai_client(memory_gateways[0], api_key=KEYS[0])
    conv = client.conversations.create(items=[{"role": "user", "content": "kept"}])
    base = f"{memory_gateways[0].base_url}/conversations/{conv.id}/items"
    auth = {"authorization": f"Bearer {KEYS[0]}"}
    for body in ({}, {"items": None}, {"items": []}):
        r = requests.post(base, json=body, headers=auth, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "items", (body, r.status_code, r.text)
    with pytest.raises(openai.BadRequestError):
        client.conversations.items.create(conv.id, items=[])
    assert [i.content[0].text for i in client.conversations.items.list(conv.id)] == ["kept"]


def test_an_update_without_metadata_is_a_400_and_keeps_the_metadata(memory_gateways):
    """``POST /v1/conversations/{id}`` without ``metadata`` (an empty body, a typo'd field) erased
    the conversation's metadata, answering 200: OpenAI requires the field. Now a 400 naming it,
    the metadata kept; an explicit null still clears it."""
    client = openai_client(memory_gateways[0], api_key=KEYS[0])
    conv = client.conversations.create(metadata={"topic": "tea"})
    url = f"{memory_gateways[0].base_url}/conversations/{conv.id}"
    auth = {"authorization": f"Bearer {KEYS[0]}"}
    for body in ({}, {"metadata_": {"topic": "coffee"}}):
        r = requests.post(url, json=body, headers=auth, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "metadata", (body, r.status_code, r.text)
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "tea"}
    assert client.conversations.update(conv.id, metadata=None).metadata == {}


def test_an_item_id_the_sdk_percent_encodes_can_be_read_and_deleted(memory_gateways):
    """A client's own item id may hold characters a URL path cannot (a space, non-ASCII): the
    SDK percent-encodes them in ``…/items/{item_id}`` (RFC 3986), and the gateway refused every
    such path as a disguised one (400 ``invalid_path``), so the item it had taken could never be
    read or deleted by its id. A path that is already the gateway's own endpoint, its ids aside,
    is no disguise: its ids are read decoded."""
    client = openai_client(memory_gateways[0], api_key=KEYS[0])
    odd = ["msg with space", "msg_é", "msg%41", "msg?x=1#y"]
    conv = client.conversations.create(items=[{"id": i, "role": "user", "content": i} for i in odd])
    for item_id in odd:
        assert client.conversations.items.retrieve(item_id, conversation_id=conv.id).id == item_id
    client.conversations.items.delete(odd[0], conversation_id=conv.id)
    assert [i.id for i in client.conversations.items.list(conv.id, order="asc")] == odd[1:]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(odd[0], conversation_id=conv.id)
    # a path that names another endpoint (or none) once decoded is still refused
    base = f"{memory_gateways[0].base_url}/conversations/{conv.id}"
    auth = {"authorization": f"Bearer {KEYS[0]}"}
    for path in ("/items/a%2Fb", "/items/%2e%2e", "%2Fitems"):
        r = requests.get(base + path, headers=auth, timeout=10)
        assert 400 <= r.status_code < 500 and r.status_code != 405, (path, r.status_code, r.text)


def test_many_appends_at_once_on_two_replicas_all_land(redis_gateways):
    """24 clients adding to one conversation at once, on two replicas sharing Redis: each write
    goes over the version it read, and one that finds another version reads again. With 8 tries
    back to back, the last of a crowd lost every race and answered 409 ``conversation_busy``
    (the README: appends and turns at once on any replicas all land). Tries now wait a random
    moment, longer each time, so the crowd spreads out: every one lands, once."""
    import threading

    clients = [openai_client(gw, api_key=KEYS[0]) for gw in redis_gateways]
    conv = clients[0].conversations.create().id
    n = 32
    start = threading.Barrier(n)

    def add(k: int) -> str:
        start.wait(10)
        return clients[k % 2].conversations.items.create(conv, items=[{"role": "user", "content": f"at once {k}"}]
                                                         ).data[0].id

    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(add, range(n)))
    listed = list(clients[1].conversations.items.list(conv, order="asc", limit=100))
    assert sorted(i.id for i in listed) == sorted(ids) and len(set(ids)) == n
    assert sorted(i.content[0].text for i in listed) == sorted(f"at once {k}" for k in range(n))


def test_an_item_id_no_path_can_name_is_refused_where_it_would_be_kept(memory_gateways):
    """An item id holding ``/`` (or the whole id ``.``/``..``) cannot be addressed as
    ``…/items/{item_id}``: encoded, the gate refuses the path (``%2F`` names another endpoint
    once decoded), and unencoded it is another path. The gateway kept such an item, which could
    then never be read nor deleted by its id. It is now a 400 wherever a conversation would
    keep it: a create, an items request, and a turn naming the conversation. A turn that names
    no conversation keeps taking it (nothing reads it by path)."""
    client = openai_client(memory_gateways[0], api_key=KEYS[0])
    conv = client.conversations.create(items=[{"id": "msg_ok", "role": "user", "content": "hi"}])
    for bad in ("msg/1", "a/b/c", "/", ".", ".."):
        item = {"id": bad, "role": "user", "content": "x"}
        with pytest.raises(openai.BadRequestError) as err:
            client.conversations.create(items=[{"role": "user", "content": "first"}, item])
        assert err.value.body["param"] == "items[1].id" and err.value.body["code"] == "invalid_value", err.value.body
        with pytest.raises(openai.BadRequestError) as err:
            client.conversations.items.create(conv.id, items=[item])
        assert err.value.body["param"] == "items[0].id", err.value.body
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="demo-model", conversation=conv.id, input=[item])
        assert err.value.body["param"] == "input[0].id", err.value.body
    assert [i.id for i in client.conversations.items.list(conv.id)] == ["msg_ok"]  # (nothing kept)
    assert client.responses.create(model="demo-model", input=[{"id": "msg/1", "role": "user", "content": "x"}],
                                   store=False).status == "completed"


def test_items_may_reference_stored_items_as_a_turn_input_may(gateways):
    """``POST …/items`` and a create take Responses input items, ``item_reference`` among them
    (the openai SDK's types allow it): the item a reference names (a stored response's output,
    the owner's) joins the conversation. The gateway refused every reference (400 "item
    references need the response store"). An unknown id, or another owner's, is a 400
    ``item_not_found``, and nothing is added."""
    client = openai_client(gateways[0], api_key=KEYS[0])
    other = openai_client(gateways[-1], api_key=KEYS[1])
    first = client.responses.create(model="demo-model", input="q?").output[-1]
    answer = client.responses.create(model="demo-model", input="again?").output[-1]
    conv = client.conversations.create(items=[{"type": "item_reference", "id": first.id}])
    added = client.conversations.items.create(conv.id, items=[{"type": "item_reference", "id": answer.id},
                                                             {"role": "user", "content": "more"}])
    assert [i.id for i in added.data][0] == answer.id
    listed = list(client.conversations.items.list(conv.id, order="asc"))
    assert [i.id for i in listed][:2] == [first.id, answer.id]
    assert listed[0].content[0].text == first.content[0].text and listed[1].content[0].text == answer.content[0].text
    assert listed[2].content[0].text == "more"
    for ref, who in (("msg_nowhere", client), (answer.id, other)):
        target = conv.id if who is client else who.conversations.create().id
        with pytest.raises(openai.BadRequestError) as err:
            who.conversations.items.create(target, items=[{"role": "user", "content": "x"},
                                                          {"type": "item_reference", "id": ref}])
        assert err.value.body["code"] == "item_not_found" and err.value.body["param"] == "items[1].id", err.value.body
    assert len(list(client.conversations.items.list(conv.id))) == 3
    # a turn on the conversation reads the referenced items as its history
    turn = client.responses.create(model="demo-model", conversation=conv.id, input="go on")
    assert turn.status == "completed"


def test_an_unknown_conversation_on_redis_is_a_404_at_once(redis_gateways, redis):
    """An id another replica wrote a moment ago may not be in Redis yet, so the store asks again
    for up to its ``fresh_wait`` (2 s, every 50 ms) before an id is unknown. That holds for a
    response (stored after its client saw its id), never for a conversation: its create, and
    every change, is in Redis before its answer. Every unknown conversation id (a typo, one
    deleted) was asked ~40 times and answered 404 after 2 s; it is now asked once."""
    client = openai_client(redis_gateways[0], api_key=KEYS[0])
    conv = client.conversations.create(items=[{"role": "user", "content": "hi"}])
    client.conversations.delete(conv.id)
    r = redis.client()

    def calls() -> int:
        return sum(v["calls"] for k, v in r.info("commandstats").items() if k != "cmdstat_info")

    for ask in (lambda: client.conversations.retrieve(conv.id),
                lambda: client.conversations.items.list("conv_" + "0" * 32),
                lambda: client.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
                lambda: client.responses.create(model="demo-model", input="x", conversation=conv.id)):
        before = calls()
        with pytest.raises(openai.NotFoundError):
            ask()
        assert calls() - before <= 4, calls() - before
    before = calls()  # (a response id is still asked again: stored after its client saw it)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)
    assert calls() - before > 10
