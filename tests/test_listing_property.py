"""Item lists and their cursor pagination (listing.py, the Conversations API's items) under
random items and requests, against a simple model of OpenAI's list semantics.

Property tests: hypothesis draws item lists (messages with string or part content, function
calls and outputs, reasoning items; with and without a client's ids, now and then one id given
twice) and list requests (``limit`` 1 to 100, ``order`` asc or desc, ``include``). What the
rule header of listing.py promises must hold for every one:

- walking the pages with ``after`` = the last page's ``last_id`` until ``has_more`` is false
  lists every item once, in the order asked for (a list whose ids repeat, which no input should
  make: the walk still ends, from the first item to the last, in order); each page holds at most ``limit`` items, its
  ``first_id``/``last_id`` are its first and last item's, ``has_more`` says whether any follow;
- the ids listed are the same every time (``listed_ids``);
- an ``after`` that names no item is a 400 naming ``after``;
- ``include=reasoning.encrypted_content`` changes only the reasoning items (their
  ``encrypted_content``);
- a bad ``limit``, ``order`` or ``include`` is a 400 naming it, never another error.

And the Conversations API's items through the real addon (resp2chat_io/addons/conversations.py
over the real in-memory response store): random sequences of adds and deletes against a model
(a list of ids): items added are at the end, a deleted id is gone, every listing pages as above,
and an id the conversation already holds (or one request gives twice) is a 400, as OpenAI's
``Duplicate item found with id …``.

Derandomized: the same examples every run.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from resp2chat_core import listing
from resp2chat_core.errors import GatewayError
from resp2chat_core.seal import Sealer

SETTINGS = settings(derandomize=True, deadline=None, max_examples=120,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEALER = Sealer(lambda: b"k" * 32)
ENCRYPTED = "reasoning.encrypted_content"

# --- items ---------------------------------------------------------------------------------------

TEXT = st.text(max_size=6)
PART = st.one_of(st.builds(lambda t: {"type": "input_text", "text": t}, TEXT),
                 st.builds(lambda u: {"type": "input_image", "image_url": u}, st.just("data:image/png;base64,AA==")),
                 st.builds(lambda t: {"type": "output_text", "text": t}, TEXT))
MESSAGE = st.builds(lambda role, content: {"type": "message", "role": role, "content": content},
                    st.sampled_from(["user", "assistant", "system", "developer"]),
                    st.one_of(TEXT, st.lists(PART, min_size=1, max_size=2)))
BARE_MESSAGE = st.builds(lambda role, text: {"role": role, "content": text}, st.sampled_from(["user", "assistant"]),
                         TEXT)  # (no type: a message)
CALL = st.builds(lambda c: {"type": "function_call", "call_id": f"call_{c}", "name": "f", "arguments": "{}"},
                 st.integers(0, 5))
OUTPUT = st.builds(lambda c, out: {"type": "function_call_output", "call_id": f"call_{c}", "output": out},
                   st.integers(0, 5), st.one_of(TEXT, st.lists(PART, min_size=1, max_size=2)))
REASONING = st.builds(lambda t, sealed: {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                                                          "text": t}],
                                         **({"encrypted_content": "stored-seal"} if sealed else {})},
                      TEXT, st.booleans())
ITEM = st.one_of(MESSAGE, BARE_MESSAGE, CALL, OUTPUT, REASONING)
LIMITS = st.one_of(st.integers(1, 4), st.integers(1, 100))  # (small ones often: many pages)
IDS = st.sampled_from(["msg_a", "msg_b", "fc_c", "rs_d", "item_e", "x"])
NO_IDS = st.sampled_from([(None,), ("",)])  # (an id of null or "": none)


@st.composite
def item_lists(draw, repeats: bool):
    """Items, some with a client's id (unique unless ``repeats``)."""
    items = draw(st.lists(ITEM, max_size=30))
    given_ids = draw(st.lists(st.one_of(st.none(), NO_IDS, IDS), min_size=len(items), max_size=len(items)))
    out, used = [], set()
    for i, (item, given_id) in enumerate(zip(items, given_ids)):
        if isinstance(given_id, tuple):  # ("id": null or "": no id, as a client may send it)
            out.append({**item, "id": given_id[0]})
            continue
        if given_id is not None:
            given_id = given_id if repeats else f"{given_id}_{i}"
            if not repeats and given_id in used:
                given_id = None
            used.add(given_id)
        out.append({**item, "id": given_id} if given_id else item)
    return out


def walk(items: list, limit: int, order: str, include=frozenset()) -> list[dict]:
    """Every page, ``after`` each one's ``last_id``, until ``has_more`` is false; a walk that
    would not end is a failure (at most one page per item, and one more)."""
    pages, after = [], None
    for _ in range(len(items) + 2):
        p = listing.page(items, listing.Page(after=after, limit=limit, order=order, include=include), SEALER)
        pages.append(p)
        if not p["has_more"]:
            return pages
        after = p["last_id"]
    raise AssertionError(f"the walk does not end: {[[d['id'] for d in p['data']] for p in pages]}")


def check_page(p: dict, limit: int) -> None:
    assert p["object"] == "list" and len(p["data"]) <= limit
    assert p["first_id"] == (p["data"][0]["id"] if p["data"] else None)
    assert p["last_id"] == (p["data"][-1]["id"] if p["data"] else None)


@SETTINGS
@given(item_lists(repeats=False), LIMITS, st.sampled_from(["asc", "desc"]), st.booleans())
def test_walking_the_pages_lists_every_item_once_in_order(items, limit, order, include):
    listed = listing.listed_ids(items, "r1")
    assert [i["id"] for i in listed] == [i["id"] for i in listing.listed_ids(items, "r1")]  # (the same ids)
    expected = [i["id"] for i in listed][:: 1 if order == "asc" else -1]
    assert all(isinstance(i, str) and i for i in expected)  # (an item without one, null or "", is given one)
    assert len(set(expected)) == len(expected)  # (the model: ids unique, given or made)
    pages = walk(listed, limit, order, frozenset({ENCRYPTED}) if include else frozenset())
    for n, p in enumerate(pages):
        check_page(p, limit)
        assert p["has_more"] == (n < len(pages) - 1)
        assert len(p["data"]) == limit or not p["has_more"]  # (only the last page is short)
    assert [d["id"] for p in pages for d in p["data"]] == expected
    assert len(pages) == max(1, -(-len(items) // limit))


@SETTINGS
@given(item_lists(repeats=True), LIMITS, st.sampled_from(["asc", "desc"]))
def test_a_walk_over_repeated_ids_still_ends_in_order(items, limit, order):
    """No input should make a list with an id twice (OpenAI: ``Duplicate item found``); were
    there one, the pages still come in order and the walk ends."""
    listed = listing.listed_ids(items, "r1")
    expected = [i["id"] for i in listed][:: 1 if order == "asc" else -1]
    pages = walk(listed, limit, order)
    walked = [d["id"] for p in pages for d in p["data"]]
    it = iter(expected)
    assert all(any(x == y for y in it) for x in walked), (walked, expected)  # (a subsequence: in order)
    assert walked[:limit] == expected[:limit] and walked[-1:] == expected[-1:]  # (from the first to the last)


@SETTINGS
@given(item_lists(repeats=False), LIMITS, st.sampled_from(["asc", "desc"]),
       st.one_of(IDS, TEXT.filter(bool)))
def test_an_after_that_names_no_item_is_a_400_naming_after(items, limit, order, after):
    listed = listing.listed_ids(items, "r1")
    if after in {i["id"] for i in listed}:
        return
    with pytest.raises(GatewayError) as err:
        listing.page(listed, listing.Page(after=after, limit=limit, order=order))
    assert (err.value.status, err.value.param) == (400, "after")


@SETTINGS
@given(item_lists(repeats=False))
def test_include_changes_only_the_reasoning_items(items):
    listed = listing.listed_ids(items, "r1")
    plain = listing.page(listed, listing.Page(limit=100, order="asc"), SEALER)["data"]
    full = listing.page(listed, listing.Page(limit=100, order="asc", include=frozenset({ENCRYPTED})), SEALER)["data"]
    for item, a, b in zip(items, plain, full):
        if item.get("type") == "reasoning":
            assert "encrypted_content" not in a and b["encrypted_content"]
            assert {k: v for k, v in b.items() if k != "encrypted_content"} == a
            if item.get("encrypted_content"):
                assert b["encrypted_content"] == item["encrypted_content"]  # (what the store holds)
        else:
            assert a == b


GOOD_LIMITS = {str(n) for n in range(1, 101)}


@SETTINGS
@given(st.dictionaries(st.sampled_from(["limit", "order", "include", "include[]", "after"]),
                       st.lists(st.one_of(st.text(max_size=5), st.sampled_from(
                           ["0", "1", "100", "101", "20", "²", "٣", "-1", "1.5", "9" * 5000, "0" * 5000 + "7",
                            "asc", "desc", "ASC",
                            ENCRYPTED, "message.input_image.image_url", "nonsense", f"{ENCRYPTED},x"])),
                           min_size=1, max_size=2), max_size=4))
@example({"limit": ["9" * 5000]})
@example({"limit": ["0" * 5000 + "7"]})
@example({"limit": ["²"]})
def test_a_bad_limit_order_or_include_is_a_400_naming_it(query):
    last = {k: v[-1] for k, v in query.items()}
    includes = [x for k in ("include", "include[]") for v in query.get(k, ()) for x in v.split(",") if x]
    bad = {"limit": "limit" in last and last["limit"].lstrip("0") not in GOOD_LIMITS,
           "order": "order" in last and last["order"] not in ("asc", "desc"),
           "include": any(x not in listing.INCLUDES for x in includes)}
    try:
        p = listing.page_query(query)
    except GatewayError as err:
        assert err.status == 400 and bad.get(err.param), (query, err.param, err.message)
        return
    assert not any(bad.values()), (query, p)
    assert p.limit == (int(last["limit"].lstrip("0")) if "limit" in last else 20)
    assert p.order == last.get("order", "desc") and p.include == frozenset(includes)


# --- the Conversations API's items, through the real addon and store ------------------------------


class Gateway:
    """The Conversations addon over the real in-memory response store, on an event loop of
    its own (a thread) that the hypothesis examples call into."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready, self.stop = threading.Event(), None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    async def _main(self) -> None:
        from mitmproxy.test import taddons

        from resp2chat_io.addons.base import SettingsSource
        from resp2chat_io.addons.conversations import Conversations
        from resp2chat_io.addons.store import StoredResponses
        from resp2chat_io.addons.upstreams import Upstreams

        self.stop = asyncio.Event()
        store = StoredResponses(SettingsSource(), Upstreams(SettingsSource()))
        with taddons.context(store) as tctx:
            tctx.options.add_option("resp2chat_seal_key", str, "", "(Turns declares it in a gateway)")
            tctx.configure(store)
            store.sealer = SEALER
            self.addon = Conversations(store, store.upstreams)
            self.ready.set()
            await self.stop.wait()
            await store.done()

    def __call__(self, shape: str, method: str, ids: list, body: dict | None = None, query: dict | None = None):
        coro = self.addon.answer(shape, method, ids, body or {}, {k: [v] for k, v in (query or {}).items()}, "")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def conversations():
    gateway = Gateway()
    yield gateway
    gateway.close()


def listed(gw, conv: str, limit: int, order: str) -> list[str]:
    """The ids of every page of the conversation's items, walked as the SDK walks them."""
    out, after, pages = [], None, 0
    while True:
        p = gw("/{id}/items", "GET", [conv], query={"limit": str(limit), "order": order, **({"after": after}
                                                                                           if after else {})})
        check_page(p, limit)
        out += [d["id"] for d in p["data"]]
        pages += 1
        assert pages <= len(out) + 1, "the walk does not end"
        if not p["has_more"]:
            return out
        after = p["last_id"]


# an op: ("add", items, given ids (None: the gateway's)), ("delete", which one of the ids held), ("list", limit, order)
OP = st.one_of(
    st.tuples(st.just("add"), st.lists(ITEM, min_size=1, max_size=4), st.lists(st.one_of(st.none(), NO_IDS, IDS),
                                                                                 min_size=4, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 50)),
    st.tuples(st.just("list"), st.integers(1, 7), st.sampled_from(["asc", "desc"])))


@settings(derandomize=True, deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(ITEM, max_size=4), st.lists(OP, max_size=10))
def test_conversation_items_added_and_deleted_list_as_the_model(conversations, first, ops):
    gw = conversations
    conv = gw("", "POST", [], {"items": first})["id"]
    model = [d["id"] for d in gw("/{id}/items", "GET", [conv], query={"limit": "100", "order": "asc"})["data"]]
    assert len(model) == len(first)
    for op in ops:
        if op[0] == "add":
            items = [{**item, "id": given[0] if isinstance(given, tuple) else given} if given else item
                     for item, given in zip(op[1], op[2])]
            given_ids = [i["id"] for i in items if i.get("id")]
            if len(set(given_ids)) < len(given_ids) or set(given_ids) & set(model):
                with pytest.raises(GatewayError) as err:
                    gw("/{id}/items", "POST", [conv], {"items": items})
                assert err.value.status == 400 and err.value.param.startswith("items"), err.value.message
                continue
            added = gw("/{id}/items", "POST", [conv], {"items": items})
            ids = [d["id"] for d in added["data"]]
            assert len(ids) == len(items) and all(i.get("id") in (None, "", x) for i, x in zip(items, ids))
            assert all(isinstance(x, str) and x for x in ids) and not set(ids) & set(model)
            model += ids
        elif op[0] == "delete":
            if not model:
                continue
            gone = model[op[1] % len(model)]
            assert gw("/{id}/items/{id}", "DELETE", [conv, gone])["id"] == conv
            model.remove(gone)
            with pytest.raises(GatewayError) as err:
                gw("/{id}/items/{id}", "GET", [conv, gone])
            assert err.value.status == 404
        else:
            _, limit, order = op
            assert listed(gw, conv, limit, order) == model[:: 1 if order == "asc" else -1]
    assert listed(gw, conv, 3, "desc") == model[::-1]
    for item_id in model:  # (each one, by its id)
        assert gw("/{id}/items/{id}", "GET", [conv, item_id])["id"] == item_id
