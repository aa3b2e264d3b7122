"""The replay cache through a real gateway: a hit answers what a miss would, or is no hit."""

from __future__ import annotations

import hashlib
import itertools
import json
import re

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ROOT, Upstream, parse_sse, read_flows, wait_until
from resp2chat_io.demo_upstream import serve_in_thread
from recordings import SEAL_KEY


def test_a_hit_is_no_hit_once_what_the_request_refers_to_is_gone(upstream, gateway_factory):
    """A request that refers to stored state (``previous_response_id``, an ``item_reference``)
    and asks for nothing to be stored is answered from the cache only while that state is there:
    once it is deleted (or expired), the same request is refused as a miss refuses it, never
    answered from what the deleted response held."""
    gw = gateway_factory(upstream.origin)
    post = lambda body: requests.post(gw.base_url + "/responses", json=body, timeout=30)  # noqa: E731
    upstream.clear()
    first = post({"model": "demo-model", "input": "the secret is 42"}).json()
    item = first["output"][-1]["id"]
    asks = [{"model": "demo-model", "input": "what was it?", "previous_response_id": first["id"], "store": False},
            {"model": "demo-model", "input": [{"type": "item_reference", "id": item},
                                              {"role": "user", "content": "and again?"}],
             "store": False, "stream": True}]
    for body in asks:
        for _ in range(2):  # a miss, then a hit
            assert post(body).status_code == 200
    assert len(upstream.requests()) == 3  # (the first, one miss each)
    assert requests.delete(f"{gw.base_url}/responses/{first['id']}", timeout=30).status_code == 200
    for body in asks:
        r = post(body)
        assert r.status_code in (400, 404), r.text[:300]
        assert "not found" in r.text, r.text[:300]
    assert len(upstream.requests()) == 3


# --- a hit answers what its miss answered, and leaves the same stored state --------------------

TOOL = {"type": "function", "name": "lookup", "description": "look a thing up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}

requests_drawn = st.fixed_dictionaries({
    "say": st.sampled_from(["hello {n}", 'call: lookup {{"q": "n{n}"}}', "json {n}", "words: 5\nn{n}"]),
    "stream": st.booleans(),
    "store": st.sampled_from([None, True, False]),
    "instructions": st.sampled_from([None, "be brief"]),
    "include": st.sampled_from([None, ["reasoning.encrypted_content"]]),
    "metadata": st.sampled_from([None, {"who": "prop"}]),
    "tools": st.sampled_from([None, [TOOL]]),
    "temperature": st.sampled_from([None, 0.5]),
    "reasoning": st.sampled_from([None, {"summary": "auto"}]),
    "context_management": st.sampled_from([None, [{"type": "compaction", "compact_threshold": 1}]]),
    "text": st.sampled_from([None, {"format": {"type": "json_object"}}, {"verbosity": "low"}]),
    "tool_choice": st.sampled_from([None, "auto", "none"]),
    "prompt_cache_key": st.sampled_from([None, "pck"]),
    "max_output_tokens": st.sampled_from([None, 500]),
    "prior": st.sampled_from([None, "previous", "sent back"]),  # continues a stored response, or sends its items back
})


def _as_miss(answer: bytes, hit_id: str, miss_id: str) -> bytes:
    """A hit's answer with its miss's response id (item and call ids derive from it), timestamps blanked."""
    new, old = hit_id.removeprefix("resp_").encode(), miss_id.removeprefix("resp_").encode()
    return _times(answer.replace(new, old).replace(new[:16], old[:16]))


def _times(raw: bytes) -> bytes:
    return re.sub(rb'"(created_at|completed_at)": ?\d+', rb'"\1":0', raw)


def _response_id(raw: bytes, stream: bool) -> str:
    return parse_sse(raw)[-1]["response"]["id"] if stream else json.loads(raw)["id"]


def test_a_hit_answers_and_stores_what_its_miss_did(upstream, gateway_factory):
    """Random requests (streamed or not, stored or not, tools, instructions, include, metadata,
    sampling, a reasoning summary, server-side compaction; continuing a stored response, or
    sending one's items back, sealed reasoning too), each sent twice: the second is answered from the cache, byte
    for byte the first's answer under its own response id and times; stored, it reads back as
    the first (``GET``, its input items), and a turn continuing it sends the backend the very
    chat request a turn continuing the first does."""
    gw = gateway_factory(upstream.origin)
    url = gw.base_url + "/responses"
    count = itertools.count()

    @settings(derandomize=True, max_examples=14, deadline=None, database=None)
    @given(drawn=requests_drawn)
    def check(drawn):
        n = next(count)
        body = {"model": "demo-model", "input": drawn["say"].format(n=n)}
        body.update({k: v for k, v in drawn.items() if k not in ("say", "prior") and v is not None})
        if drawn["prior"] is not None:
            prior = requests.post(url, json={"model": "demo-model", "input": f"before {n}", "store": drawn["prior"] == "previous",
                                             "include": ["reasoning.encrypted_content"]}, timeout=30).json()
            if drawn["prior"] == "previous":
                body["previous_response_id"] = prior["id"]
            else:
                body["input"] = [*prior["output"], {"role": "user", "content": body["input"]}]
        before = len(upstream.requests())
        miss = requests.post(url, json=body, timeout=30)
        after = len(upstream.requests())
        hit = requests.post(url, json=body, timeout=30)
        assert miss.status_code == hit.status_code == 200, miss.text[:300]
        assert len(upstream.requests()) == after > before  # (the second: a hit)
        stream = drawn["stream"]
        miss_id, hit_id = _response_id(miss.content, stream), _response_id(hit.content, stream)
        assert hit_id != miss_id
        assert _as_miss(hit.content, hit_id, miss_id) == _times(miss.content)
        if drawn["store"] is False:
            return
        for path in ("", "/input_items"):
            got = [requests.get(f"{url}/{rid}{path}", timeout=30) for rid in (miss_id, hit_id)]
            assert got[0].status_code == got[1].status_code == 200, got[1].text[:300]
            assert _as_miss(got[1].content, hit_id, miss_id) == _times(got[0].content), path
        sent = []
        for rid in (miss_id, hit_id):
            follow = requests.post(url, json={"model": "demo-model", "input": f"and then {n}", "previous_response_id": rid,
                                              **({"tools": [TOOL]} if drawn["tools"] else {})}, timeout=30)
            assert follow.status_code == 200, follow.text[:300]
            sent.append(json.dumps(upstream.requests()[-1]).encode())
        assert _as_miss(sent[1], hit_id, miss_id) == sent[0]

    check()


def test_a_hit_of_codexs_compaction_request_stores_what_its_miss_stores(upstream, gateway_factory):
    """Codex's compaction request (a trailing ``compaction_trigger``, stored): its hit stores what
    its miss does, the user messages beside the compaction item (what Codex keeps, server-side
    compaction's rule: a continuation goes on from the compacted state; test_compact_endpoint.py).
    Once, the miss kept the whole conversation and the hit only the user messages."""
    gw = gateway_factory(upstream.origin)
    url = gw.base_url + "/responses"
    body = {"model": "demo-model", "store": True, "input": [
        {"role": "user", "content": "my name is Ada"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada"}]},
        {"role": "user", "content": "I like tea"}, {"type": "compaction_trigger"}]}
    upstream.clear()
    miss, hit = (requests.post(url, json=body, timeout=30).json() for _ in range(2))
    assert len(upstream.requests()) == 1  # (the second: a hit)
    assert [o["type"] for o in hit["output"]] == [o["type"] for o in miss["output"]] == ["compaction"]
    listed = [requests.get(f"{url}/{r['id']}/input_items", params={"order": "asc"}, timeout=30).json()["data"]
              for r in (miss, hit)]
    assert [i.get("role") for i in listed[1]] == [i.get("role") for i in listed[0]] == ["user", "user"]


# --- preloaded answers hold what this gateway sealed, or are not preloaded ---------------------


@pytest.mark.parametrize("key", [SEAL_KEY, "another-seal-key-of-this-install"])
def test_a_preloaded_answer_is_served_only_when_its_sealed_contents_open_here(gateway_factory, key):
    """An answer holds what its gateway sealed (``encrypted_content``), which only that key
    opens: preloaded from a recording made under another key, a client would be handed reasoning
    it cannot send back (400 "sealed by another key"). So such an answer is not preloaded: the
    request goes to its (here dead) backend as a miss would."""
    recording = ROOT / "recordings" / "plain-answer.mitm"
    flow = [f for f in read_flows(recording) if "resp2chat" in f.metadata][0]
    assert b'"encrypted_content":"r2c1.' in flow.response.content  # (the recording holds sealed reasoning)
    gw = gateway_factory("http://127.0.0.1:9", "--set", f"resp2chat_replay_preload={recording}",
                         "--set", f"resp2chat_upstream_base_url={flow.metadata['resp2chat']['upstream']}",
                         "--set", f"resp2chat_seal_key={key}")
    r = requests.post(gw.base_url + "/responses", data=flow.metadata["resp2chat"]["responses_request"].encode(),
                      headers={"content-type": "application/json"}, timeout=30)
    if key != SEAL_KEY:
        assert b"response.completed" not in r.content, r.content[:300]
        return
    done = parse_sse(r.content)[-1]["response"]
    assert done["status"] == "completed"
    sealed = [o for o in done["output"] if o.get("encrypted_content")]
    assert sealed  # …and this gateway opens it again: a stateless turn that sends it back is lowered
    again = requests.post(gw.base_url + "/responses", json={
        "model": done["model"], "store": False, "input": [*sealed, {"role": "user", "content": "go on"}]}, timeout=30)
    assert "sealed" not in again.text, again.text[:300]


# --- the key: one per request, whatever the prefix cache kept (pure) ----------------------------

OWNERS = ("", "client.a", "auth-" + "0" * 32)
CONTEXTS = ("http://u/v1\nLoweringOptions()\nseal a", "http://u/v1\nLoweringOptions()\nseal b")
steps = st.lists(st.tuples(
    st.sampled_from(["append", "resend", "edit-old", "reorder", "tail", "fork", "cut"]),
    st.integers(0, 10**6), st.sampled_from([0, 1, 2]), st.sampled_from([0, 1]), st.booleans(),
    st.booleans()), min_size=2, max_size=12)


@settings(derandomize=True, max_examples=60, deadline=None, database=None)
@given(sequence=steps)
def test_two_requests_share_a_replay_key_only_when_they_are_the_same_request(sequence):
    """Sessions of bodies sharing long histories (turns appended, an old item edited deep inside,
    members reordered, the last member changed, forks, cut short, sent again, compact or spaced
    JSON) decoded through the prefix cache, which keeps hash states of what it decoded (small
    steps here) and hashes only what is new: two keys are equal exactly when the bodies are the
    same bytes, from the same owner, in the same context; each key is the one a cold cache gives."""
    import resp2chat_core.requestbody as rb
    from resp2chat_core.replay import replay_key

    saved = rb.PREFIXES, rb.PREFIX_MIN, rb.DIGEST_STEP
    rb.PREFIXES, rb.PREFIX_MIN, rb.DIGEST_STEP = rb.Prefixes(max_bytes=1 << 20, entries=4), 0, 256
    try:
        items: list = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi " * 40}]}]
        forks: list = []
        seen: dict[tuple, str] = {}
        for op, n, owner, context, spaced, ask in sequence:
            if op == "append":
                items = items + [{"type": "message", "role": "assistant" if n % 2 else "user",
                                  "content": [{"type": "output_text", "text": f"turn {n} " * (n % 50)}]}]
            elif op == "edit-old" and items:
                i = n % len(items)
                items = items[:i] + [{**items[i], "content": [{"type": "input_text", "text": f"edited {n}"}]}] + items[i + 1:]
            elif op == "fork":
                forks.append(items)
                items = items + [{"type": "message", "role": "user", "content": f"fork {n}"}]
            elif op == "cut" and len(items) > 1:
                items = items[:1 + n % (len(items) - 1)]
            elif op == "resend" and forks:
                items = forks[n % len(forks)]
            members = {"model": "m", "input": items, "stream": n % 3 == 0 if op == "tail" else True}
            if op == "reorder":
                members = dict(reversed(list(members.items())))
            body = json.dumps(members, indent=1 if spaced else None, separators=None if spaced else (",", ":")).encode()
            rb.loads(body)
            if not ask:
                continue  # (a turn the cache is not asked for hashes nothing)
            key = replay_key(CONTEXTS[context], rb.body_digest(body), OWNERS[owner])
            assert key == replay_key(CONTEXTS[context], hashlib.sha256(body).digest(), OWNERS[owner])
            request = (body, owner, context)
            for other, other_key in seen.items():
                assert (other == request) == (other_key == key)
            seen[request] = key
    finally:
        rb.PREFIXES, rb.PREFIX_MIN, rb.DIGEST_STEP = saved


# --- the upstream chosen is part of what a key says ----------------------------------------------


def test_replicas_routing_a_model_elsewhere_do_not_share_its_answers(gateway_factory, redis_server):
    """Replicas sharing Redis whose ``upstreams`` list the same backends but route a model to
    another one (its ``models`` globs: a configuration being rolled out) give other answers: a
    request one replica sent to backend a is sent to backend b by the other, not answered with
    a's answer from the shared replay cache."""
    servers = [serve_in_thread() for _ in range(2)]
    try:
        a, b = (Upstream(url, server) for server, url in servers)

        def routing(first_models: list) -> str:
            return "resp2chat_upstreams=" + json.dumps([{"name": "a", "base_url": a.base_url, "models": first_models},
                                                        {"name": "b", "base_url": b.base_url, "models": ["*"]}])
        shared = ("--set", f"resp2chat_state_store_url={redis_server.url}", "--set", "resp2chat_seal_key=one-key-for-both-replicas")
        to_a, to_b = (gateway_factory("http://127.0.0.1:9", *shared, "--set", routing(models))
                      for models in (["demo-*"], ["other-*"]))
        body = {"model": "demo-model", "input": "which backend?"}
        assert requests.post(to_a.base_url + "/responses", json=body, timeout=30).status_code == 200
        assert (len(a.requests()), len(b.requests())) == (1, 0)
        wait_until(lambda: redis_server.client().zcard("resp2chat:replays") == 1, 20, "the replay stored")
        assert requests.post(to_a.base_url + "/responses", json=body, timeout=30).status_code == 200
        assert len(a.requests()) == 1  # (the same routing: a hit)
        assert requests.post(to_b.base_url + "/responses", json=body, timeout=30).status_code == 200
        assert (len(a.requests()), len(b.requests())) == (1, 1)
    finally:
        for server, _ in servers:
            server.shutdown()
            server.server_close()


def test_replicas_sending_their_backend_other_keys_or_headers_do_not_share_answers(gateway_factory, redis_server):
    """Replicas sharing Redis whose upstream gets another key or other ``upstream_headers`` (an
    account, an OpenRouter provider order: another answer) do not answer each other's requests
    from the shared replay cache; replicas configured alike do. With one upstream and with an
    ``upstreams`` entry's own key and headers."""
    server, url = serve_in_thread()
    try:
        backend = Upstream(url, server)
        shared = ("--set", f"resp2chat_state_store_url={redis_server.url}", "--set", "resp2chat_seal_key=one-key-for-both-replicas")

        def one(key: str, order: str):
            return gateway_factory(backend.origin, *shared, "--set", f"resp2chat_upstream_api_key={key}", "--set",
                                   "resp2chat_upstream_headers=" + json.dumps({"X-Provider-Order": order}))

        def listed(key: str, order: str):
            return gateway_factory("http://127.0.0.1:9", *shared, "--set", "resp2chat_upstreams=" + json.dumps(
                [{"name": "a", "base_url": backend.base_url, "api_key": key,
                  "upstream_headers": {"X-Provider-Order": order}}]))

        for n, make in enumerate((one, listed)):
            gateways = [make("sk-account-one-0123456789", "a"), make("sk-account-one-0123456789", "a"),
                        make("sk-account-one-0123456789", "b"), make("sk-account-two-0123456789", "a")]
            body = {"model": "demo-model", "input": f"whose answer? {n}"}
            sent = []
            for gw in gateways:
                before = len(backend.requests())
                assert requests.post(gw.base_url + "/responses", json=body, timeout=30).status_code == 200
                sent.append(len(backend.requests()) - before)
                wait_until(lambda: redis_server.client().zcard("resp2chat:replays") >= 1, 20, "the replay stored")
            assert sent == [1, 0, 1, 1], (make.__name__, sent)  # (alike: a hit; another order, another key: misses)
    finally:
        server.shutdown()
        server.server_close()


def test_a_hit_echoes_the_request_as_the_miss_did(upstream, gateway_factory):
    """A hit swaps the Response's own id and times, and nothing the request set: a tool schema or
    a text format holding ``created_at``/``completed_at`` numbers is echoed as it was sent."""
    gw = gateway_factory(upstream.origin)
    stamps = {"type": "object", "properties": {"completed_at": {"type": "integer"}, "created_at": {"type": "integer"}},
              "examples": [{"completed_at": 7, "created_at": 7}]}
    body = {"model": "demo-model", "input": "json", "tools": [{**TOOL, "parameters": {**TOOL["parameters"], "default": {
        "completed_at": 8}}}], "text": {"format": {"type": "json_schema", "name": "stamps", "schema": stamps}}}
    for stream in (False, True):
        for _ in range(2):  # a miss, then a hit
            r = requests.post(gw.base_url + "/responses", json={**body, "stream": stream}, timeout=30)
            done = parse_sse(r.content)[-1]["response"] if stream else r.json()
            assert done["status"] == "completed"
            assert done["tools"][0]["parameters"]["default"] == {"completed_at": 8}
            assert done["text"]["format"]["schema"]["examples"] == [{"completed_at": 7, "created_at": 7}]
