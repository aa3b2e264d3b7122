"""Issue 21, what clients can do to the gateway's state, its labels and its one event loop; each
through a real mitmdump, over HTTP and the Responses WebSocket, with Redis where the store is:

- finding 7: a client's model name or session key is bounded wherever an operator reads it
  (``/metrics``, the access log, the gateway's log, flow comments);
- finding 8: an item id resolves only to the item the gateway produced: a client's input cannot
  redefine it;
- finding 9: one request of ~900k input items is refused at once by a cap, and ``/healthz`` keeps
  answering meanwhile (its body is decoded off the event loop);
- finding 10: with ``forward_client_auth`` the replay cache and the store belong to the credential
  that made them: another credential (or none) gets the backend's verdict and sees unknown ids.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    LocalServer, QuietHandler, chat_chunk, chat_sse, openai_client, parse_sse, post_turn, read_flows, send_json,
    scrape, send_sse, start_gateway, stored_by, wait_until,
)
from resp2chat_io import demo_upstream
from wsclient import WSClient


# --- the core pieces ---------------------------------------------------------------------------


def test_shown_bounds_and_keeps_apart():
    from resp2chat_core.labels import SHOWN, code_label, label_safe, shown

    assert shown("demo-model") == "demo-model"
    a, b = shown("q" * 10_000 + "a"), shown("q" * 10_000 + "b")
    assert len(a) <= SHOWN and a != b and "10001 chars" in a
    assert shown("x\nresp2chat: forged") == "x\\nresp2chat: forged"
    assert all(label_safe(n) for n in ("demo-model", "Qwen/Qwen3-Coder-30B-A3B-Instruct", "llama3.1:8b", "gpt-5"))
    assert not any(label_safe(n) for n in ("", "x" * 129, "a b", "a\nb", "-lead", "é"))
    assert code_label("rate_limit_exceeded") == "rate_limit_exceeded" and code_label("Bad Code!") == "other"


def test_an_owner_is_a_digest_never_the_credential():
    from resp2chat_core import owner

    a, c = owner.of_credential(KEY_A), owner.of_credential(KEY_C)
    assert a == owner.of_credential(KEY_A) and a != c and owner.of_credential(None) not in (a, c, owner.SHARED)
    assert "alpha" not in a and owner.check(a) == a and owner.check(owner.SHARED) == ""
    assert owner.check("client." + "x" * 64) == "client." + "x" * 64  # (a hand-written client's longest name)
    for bad in ("has:colon", "has space", "x" * 72):
        with pytest.raises(ValueError):
            owner.check(bad)


async def test_the_store_keeps_owners_apart_and_indexes_only_what_it_produced():
    from resp2chat_io.store import ResponseStore

    store = ResponseStore(ttl=3600, max_entries=10, max_bytes=1 << 20)
    made = {"id": "msg_made_1", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]}
    await store.put("resp_aaaaaaaa", [{"role": "user", "content": "q"}, made], {"output": [made]}, owner="auth-a")
    assert await store.get("resp_aaaaaaaa", owner="auth-a") and await store.get("resp_aaaaaaaa", owner="auth-c") is None
    assert await store.get("resp_aaaaaaaa") is None and await store.items(["msg_made_1"], owner="auth-c") == {}
    assert not await store.delete("resp_aaaaaaaa", owner="auth-c") and await store.get("resp_aaaaaaaa", owner="auth-a")
    # an input reusing the id, altered: not a holder; the same item unchanged (a continuation): one
    await store.put("resp_bbbbbbbb", [forged_copy("msg_made_1"), {"role": "user", "content": "x"}], {"output": []},
              owner="auth-a")
    await store.put("resp_cccccccc", [{"role": "user", "content": "q"}, made, {"role": "user", "content": "y"}],
              {"output": []}, owner="auth-a")
    assert await store.items(["msg_made_1"], owner="auth-a") == {"msg_made_1": made}
    await store.delete("resp_aaaaaaaa", owner="auth-a")
    assert await store.items(["msg_made_1"], owner="auth-a") == {"msg_made_1": made}  # (held by resp_cccccccc)
    await store.delete("resp_cccccccc", owner="auth-a")
    assert await store.items(["msg_made_1"], owner="auth-a") == {}  # (resp_bbbbbbbb's copy names nothing)
    for bad in ("owner:x:resp_1", "../resp_1", "resp_" + "a" * 65):
        assert await store.get(bad) is None and not await store.delete(bad)


def create(**body) -> dict:
    return {"type": "response.create", "model": "demo-model", **body}


# --- finding 7: labels and logged client strings -------------------------------------------------


def test_client_strings_are_bounded_in_metrics_logs_and_flows(upstream, gateway_factory, tmp_path):
    """Refused requests with 4 MB model names (HTTP and WebSocket) name nothing in /metrics; an
    accepted turn's model name gets a label only if it is spelled like one; the access log, the
    log and flow comments show at most a bounded, printable form of what a client chose."""
    access, flows = tmp_path / "access.jsonl", tmp_path / "flows.mitm"
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_access_log_path={access}", "-w", str(flows))
    huge = "m" * (4 << 20)
    for n in range(3):
        r = post_turn(gw, {"model": f"{huge}{n}", "input": [{"type": "bogus"}], "prompt_cache_key": huge})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_item_type"
    ws = WSClient(gw.base_url)
    [refused] = ws.turn(create(model=huge + "ws", input=[{"type": "bogus"}]))
    assert refused["status"] == 400
    # accepted turns with names no label should carry: too long; a newline that would forge a log line
    long_name, forged = "x" * (1 << 20), "demo\nresp2chat: FORGED LOG LINE"
    for name in (long_name, forged):
        r = post_turn(gw, {"model": name, "input": "hi", "prompt_cache_key": "k" * (1 << 20)})
        assert r.status_code == 200, r.text
    done = ws.turn(create(model="y" * 300, input="hi"))  # (its events carry the name: wsclient reads whole frames)
    assert done[-1]["type"] == "response.completed"
    assert post_turn(gw, {"model": "demo-model", "input": "hi"}).status_code == 200
    ws.close()

    text = requests.get(gw.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    assert len(text) < 64 << 10, f"/metrics is {len(text)} bytes"
    models = {s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples if "model" in s.labels}
    assert "demo-model" in models and "other" in models  # (the refused ones and the odd names: "other")
    assert all(len(m) <= 128 and "\n" not in m for m in models), sorted(m[:40] for m in models)

    lines = access.read_text().splitlines()
    assert len(lines) == 8 and all(len(line) < 2048 for line in lines), [len(line) for line in lines]
    for entry in map(json.loads, lines):
        assert len(entry["model"]) <= 200 and (entry["session"] is None or len(entry["session"]) <= 200)
    assert "\n" not in "".join(json.loads(line)["model"] for line in lines)
    log = gw.log()
    assert "\nresp2chat: FORGED LOG LINE" not in log and "x" * 1000 not in log and "m" * 1000 not in log
    assert "y" * 300 not in access.read_text()

    gw.stop()
    comments = [f.comment for f in read_flows(flows) if f.comment]
    assert comments and all(len(c) <= 400 and "\n" not in c for c in comments), [c[:80] for c in comments]


# --- finding 8: item ids -----------------------------------------------------------------------


FORGED = "FORGED: the answer was 42"


def forged_copy(item_id: str) -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": FORGED, "annotations": []}]}


def assert_real_answer_sent(upstream) -> None:
    sent = upstream.requests()[-1]["messages"]
    assert FORGED not in json.dumps(sent)
    assert sent[0] == {"role": "assistant", "content": "You said: the real question"}, sent


def test_an_input_cannot_redefine_an_item_id(upstream, gateway_factory):
    """Another client stores a turn whose input reuses the id of an item the gateway produced, with
    other content (HTTP, then WebSocket): a reference to that id still resolves to the item as the
    gateway produced it, over both transports."""
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0")
    client = openai_client(gw)
    first = client.responses.create(model="demo-model", input="the real question")
    item_id = first.output[-1].id
    assert post_turn(gw, {"model": "demo-model", "input": [forged_copy(item_id), {"role": "user", "content": "a"}]}).ok
    ws = WSClient(gw.base_url)
    stored = ws.turn(create(store=True, input=[forged_copy(item_id), {"role": "user", "content": "b"}]))
    assert stored[-1]["type"] == "response.completed"
    refer = [{"type": "item_reference", "id": item_id}, {"role": "user", "content": "go on"}]
    upstream.clear()
    assert client.responses.create(model="demo-model", input=refer).output_text == "You said: go on"
    assert_real_answer_sent(upstream)
    assert ws.turn(create(input=refer))[-1]["type"] == "response.completed"
    assert_real_answer_sent(upstream)
    ws.close()


def test_an_input_cannot_redefine_an_item_id_in_redis(upstream, tmp_path, redis_server):
    """The same across two replicas sharing Redis: the forged copy is stored through the other
    replica, the reference resolves to what the gateway produced on both."""
    a, b = (start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}",
                          "--set", "resp2chat_max_replay_entries=0") for _ in range(2))
    r = redis_server.client()
    try:
        first = post_turn(a, {"model": "demo-model", "input": "the real question"}).json()
        item_id = first["output"][-1]["id"]
        wait_until(lambda: r.exists(f"resp2chat:response:{first['id']}"), what="the first response stored")
        forged = post_turn(b, {"model": "demo-model",
                               "input": [forged_copy(item_id), {"role": "user", "content": "a"}]})
        wait_until(lambda: r.exists(f"resp2chat:response:{forged.json()['id']}"), what="the forged copy stored")
        ws = WSClient(b.base_url)
        stored = ws.turn(create(store=True, input=[forged_copy(item_id), {"role": "user", "content": "b"}]))
        wait_until(lambda: r.exists(f"resp2chat:response:{stored[-1]['response']['id']}"), what="stored")
        refer = [{"type": "item_reference", "id": item_id}, {"role": "user", "content": "go on"}]
        for gw in (a, b):
            upstream.clear()
            assert post_turn(gw, {"model": "demo-model", "input": refer}).status_code == 200
            assert_real_answer_sent(upstream)
        assert ws.turn(create(input=refer))[-1]["type"] == "response.completed"
        assert_real_answer_sent(upstream)
        ws.close()
    finally:
        a.stop()
        b.stop()


# --- finding 9: one request stalls nobody ----------------------------------------------------------


MANY = 900_000  # input items: ~27 MB, under max_request_body_mb


def many_items(n: int = MANY, head: str = '{"model":"demo-model","input":[') -> bytes:
    return head.encode() + b",".join([b'{"role":"user","content":"x"}'] * n) + b"]}"


def healthz_while(gw, send) -> tuple[object, list[float]]:
    """Run ``send()`` in a thread and ask /healthz again and again until it returns: (its result,
    how long each /healthz took)."""
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(answer=send()), daemon=True)
    url = gw.base_url.removesuffix("/v1") + "/healthz"
    took = []
    with requests.Session() as s:
        s.get(url, timeout=10)
        worker.start()
        while worker.is_alive():
            start = time.monotonic()
            assert s.get(url, timeout=60).status_code == 200
            took.append(time.monotonic() - start)
        worker.join()
    return result.get("answer"), took


HEALTHZ_BOUND = 1.0  # seconds: the target; before the fix it waited 2-6 s


def test_a_huge_request_is_refused_at_once_and_stalls_nobody(gateway_factory, upstream):
    gw = gateway_factory(upstream.origin)
    body = many_items()
    upstream.clear()
    started = time.monotonic()
    r, took = healthz_while(gw, lambda: requests.post(gw.base_url + "/responses", data=body, timeout=120,
                                                      headers={"content-type": "application/json"}))
    assert len(took) >= 3 and max(took) < HEALTHZ_BOUND, f"/healthz took up to {max(took):.2f} s ({len(took)} asks)"
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "array_above_max_length" and err["param"] == "input"
    assert f"{MANY} input items" in err["message"] and "max_input_items" in err["message"]
    assert r.headers["x-request-id"].startswith("req_") and upstream.requests() == []
    assert time.monotonic() - started < 30


def test_a_huge_websocket_message_is_refused_at_once_and_stalls_nobody(gateway_factory, upstream):
    gw = gateway_factory(upstream.origin)
    message = many_items(head='{"type":"response.create","model":"demo-model","input":[').decode()
    ws = WSClient(gw.base_url, timeout=120)
    upstream.clear()
    answer, took = healthz_while(gw, lambda: ws.turn(message))
    assert len(took) >= 3 and max(took) < HEALTHZ_BOUND, f"/healthz took up to {max(took):.2f} s ({len(took)} asks)"
    [refused] = answer
    assert refused["type"] == "error" and refused["status"] == 400
    assert refused["error"]["code"] == "array_above_max_length" and "max_input_items" in refused["error"]["message"]
    assert ws.turn(create(input="still here"))[-1]["type"] == "response.completed"  # the socket goes on
    ws.close()
    assert len(upstream.requests()) == 1


def test_tools_and_content_parts_have_caps_too(gateway_factory, upstream):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_tools=3", "--set", "resp2chat_max_content_parts=4")
    fn = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    namespace = {"type": "namespace", "name": "ns", "description": "", "tools": [{**fn, "name": "a"}, {**fn, "name": "b"}]}
    part = {"type": "input_text", "text": "x"}
    cases = [({"tools": [fn, namespace]}, "tools", "max_tools"),  # (a namespace and each of its tools count)
             ({"input": [{"type": "additional_tools", "tools": [fn] * 4}]}, "tools", "max_tools"),
             ({"input": [{"role": "user", "content": [part] * 3}] * 2}, "input", "max_content_parts")]
    ws = WSClient(gw.base_url)
    upstream.clear()
    for extra, param, setting in cases:
        body = {"model": "demo-model", "input": "x", **extra}
        r = post_turn(gw, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert r.json()["error"]["code"] == "array_above_max_length" and setting in r.json()["error"]["message"]
        [refused] = ws.turn(create(**body))
        assert (refused["status"], refused["error"]["param"]) == (400, param)
    assert upstream.requests() == []
    ok = {"model": "demo-model", "tools": [{**fn, "name": f"f{n}"} for n in range(3)],
          "input": [{"role": "user", "content": [part] * 4}]}
    assert post_turn(gw, ok).status_code == 200 and ws.turn(create(**ok))[-1]["type"] == "response.completed"
    ws.close()


# --- finding 10: forward_client_auth owns what it stores ---------------------------------------------


KEY_A, KEY_C = "Bearer key-alpha-0123456789", "Bearer key-gamma-0123456789"
WRONG = "Bearer key-wrong-0123456789"


class _Keyed(demo_upstream.Handler):
    """The scripted backend, answering only the keys it knows (401 otherwise), and noting the
    Authorization of every chat request: a backend that decides who its clients are."""

    def do_POST(self):
        auth = self.headers.get("authorization")
        self.server.auths.append(auth)
        if auth not in (KEY_A, KEY_C):
            self._read_body()
            self._send_json(401, {"error": {"message": "invalid api key", "type": "authentication_error",
                                            "code": "invalid_api_key"}})
            return
        super().do_POST()


@pytest.fixture
def keyed_upstream():
    server, _ = demo_upstream.serve_in_thread()
    server.auths = []
    server.RequestHandlerClass = _Keyed  # (before any request)
    yield server
    server.shutdown()
    server.server_close()


def origin(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def auth(value: str | None) -> dict:
    return {"authorization": value} if value else {}


def test_forwarded_credentials_own_their_replay_cache_and_store(keyed_upstream, gateway_factory, tmp_path):
    access = tmp_path / "access.jsonl"
    gw = gateway_factory(origin(keyed_upstream), "--set", "resp2chat_forward_client_auth=true",
                         "--set", f"resp2chat_access_log_path={access}")
    auths = keyed_upstream.auths
    body = {"model": "demo-model", "input": "tell me a secret"}
    first = post_turn(gw, body, auth(KEY_A))
    assert first.status_code == 200 and auths == [KEY_A]
    # the very same bytes with another credential, a wrong one, none: the backend decides each
    for who, status in ((KEY_C, 200), (WRONG, 400), (None, 400)):
        r = post_turn(gw, body, auth(who))
        assert (r.status_code, auths[-1]) == (status, who), (r.text, auths)
    assert len(auths) == 4
    again = post_turn(gw, body, auth(KEY_A))  # the same credential: answered from the cache, as before
    assert again.status_code == 200 and len(auths) == 4 and again.json()["id"] != first.json()["id"]

    rid, item_id = first.json()["id"], first.json()["output"][-1]["id"]
    url = f"{gw.base_url}/responses/{rid}"
    assert requests.get(url, headers=auth(KEY_A), timeout=30).status_code == 200
    for who in (KEY_C, WRONG, None):
        r = requests.get(url, headers=auth(who), timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
        assert requests.delete(url, headers=auth(who), timeout=30).status_code == 404
    assert requests.get(url, headers=auth(KEY_A), timeout=30).status_code == 200  # still there
    cont = {"model": "demo-model", "input": "and?", "previous_response_id": rid}
    refer = {"model": "demo-model", "input": [{"type": "item_reference", "id": item_id}, {"role": "user", "content": "x"}]}
    for request, code in ((cont, "previous_response_not_found"), (refer, "item_not_found")):
        r = post_turn(gw, request, auth(KEY_C))
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        assert post_turn(gw, request, auth(KEY_A)).status_code == 200

    # over the WebSocket: the socket's credential is its owner
    other = WSClient(gw.base_url, headers=auth(KEY_C))
    for request, code in ((cont, "previous_response_not_found"), (refer, "item_not_found")):
        [refused] = other.turn({"type": "response.create", **request})
        assert refused["error"]["code"] == code, refused
    mine = other.turn(create(input="kept by gamma", store=True))[-1]["response"]["id"]
    other.close()
    owner = WSClient(gw.base_url, headers=auth(KEY_A))
    for request in (cont, refer):
        assert owner.turn({"type": "response.create", **request})[-1]["type"] == "response.completed"
    [refused] = owner.turn(create(input="go on", previous_response_id=mine))
    assert refused["error"]["code"] == "previous_response_not_found"
    owner.close()
    assert requests.get(f"{gw.base_url}/responses/{mine}", headers=auth(KEY_A), timeout=30).status_code == 404
    assert requests.get(f"{gw.base_url}/responses/{mine}", headers=auth(KEY_C), timeout=30).status_code == 200
    gw.stop()
    said = gw.log() + access.read_text()
    assert "key-alpha" not in said and "key-gamma" not in said and "key-wrong" not in said


def test_forwarded_credentials_own_their_state_in_redis(keyed_upstream, tmp_path, redis_server):
    a, b = (start_gateway(origin(keyed_upstream), tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}",
                          "--set", "resp2chat_forward_client_auth=true") for _ in range(2))
    r = redis_server.client()
    auths = keyed_upstream.auths
    try:
        body = {"model": "demo-model", "input": "a shared secret", "stream": True}
        first = parse_sse(post_turn(a, body, auth(KEY_A)).content)[-1]["response"]
        rid, item_id = first["id"], first["output"][-1]["id"]
        wait_until(lambda: r.zcard("resp2chat:replays") == 1 and r.zcard("resp2chat:entries") == 1,
                   what="the answer in Redis")
        assert parse_sse(post_turn(b, body, auth(KEY_C)).content)[-1]["type"] == "response.completed"
        assert auths[-1] == KEY_C and len(auths) == 2  # another owner: not b's replay hit
        post_turn(b, body, auth(KEY_A))
        assert len(auths) == 2  # the owner: b answers from Redis
        url = f"{b.base_url}/responses/{rid}"
        assert requests.get(url, headers=auth(KEY_A), timeout=30).status_code == 200
        assert requests.get(url, headers=auth(KEY_C), timeout=30).status_code == 404
        assert requests.delete(url, headers=auth(None), timeout=30).status_code == 404
        refer = {"model": "demo-model", "input": [{"type": "item_reference", "id": item_id}, {"role": "user", "content": "x"}]}
        assert post_turn(b, refer, auth(KEY_C)).json()["error"]["code"] == "item_not_found"
        assert post_turn(b, refer, auth(KEY_A)).status_code == 200
        ws = WSClient(b.base_url, headers=auth(KEY_C))
        [refused] = ws.turn(create(input="x", previous_response_id=rid))
        assert refused["error"]["code"] == "previous_response_not_found"
        ws.close()
        # the owner's namespace, never the credential itself
        keys = [k.decode() for k in r.keys("*")]
        assert not r.exists(f"resp2chat:response:{rid}")
        assert any(k.startswith("resp2chat:owner:auth-") and k.endswith(f":response:{rid}") for k in keys), keys
        dumped = " ".join(keys) + " ".join(str(r.dump(k)) for k in keys)
        assert "key-alpha" not in dumped and "key-gamma" not in dumped
    finally:
        a.stop()
        b.stop()


def test_a_forwarded_credential_is_never_a_label_of_who_fills_the_store(keyed_upstream, tmp_path, redis_server):
    """forward_client_auth, two replicas sharing Redis: two credentials store responses through
    the openai SDK. Both replicas' /metrics show them together as ``forwarded`` (their entries
    and bytes, as Redis holds them), and their owners (digests of the credentials) and the
    credentials themselves are nowhere in it; one deleted, the figure follows."""
    a, b = (start_gateway(origin(keyed_upstream), tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}",
                          "--set", "resp2chat_forward_client_auth=true") for _ in range(2))
    r = redis_server.client()
    try:
        alpha, gamma = (openai_client(gw, api_key=key.removeprefix("Bearer ")) for gw, key in ((a, KEY_A), (b, KEY_C)))
        made = [alpha.responses.create(model="demo-model", input="alpha's first").id,
                alpha.responses.create(model="demo-model", input="alpha's second " * 20).id,
                gamma.responses.create(model="demo-model", input="gamma's").id]
        wait_until(lambda: r.zcard("resp2chat:entries") == 3, what="three entries in Redis")
        owners = {k.decode().split(":")[2] for k in r.keys("resp2chat:owner:auth-*:response:*")}
        assert len(owners) == 2
        size = sum(int(v) for v in r.hvals("resp2chat:entries:sizes"))
        for gw in (a, b):
            m = scrape(gw)
            assert stored_by(m) == {("", "shared"): 0, ("", "forwarded"): 3, ("", "former"): 0}
            assert stored_by(m, "resp2chat_stored_response_bytes") == {("", "shared"): 0, ("", "forwarded"): size,
                                                                       ("", "former"): 0}
            text = requests.get(gw.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
            for secret in (*owners, *(o.removeprefix("auth-") for o in owners), "key-alpha", "key-gamma"):
                assert secret not in text
        gamma.responses.delete(made[2])
        assert stored_by(scrape(a))[("", "forwarded")] == 2
    finally:
        a.stop()
        b.stop()


FORWARDED = "tok-forwarded-0123456789"  # (not shaped like a known key: only knowing it finds it)


class _Echoing(QuietHandler):
    """A backend that repeats the credential it got: in a turn's text (model ``echo``), in a 429
    error (``limited``), in an error event inside its stream (``event``), in a passthrough
    answer's body and header."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        auth = self.headers.get("authorization", "")
        model = body.get("model")
        if model == "limited":
            key = auth.removeprefix("Bearer ")
            return send_json(self, 429, {"error": {"message": f"rate limited for key {key}", "code": "rate_limit_exceeded"}})
        if model == "event":
            data = b"data: " + json.dumps({"error": {"message": f"bad credential {auth}", "code": 400}}).encode() + b"\n\n"
        else:
            data = chat_sse(chat_chunk({"content": f"you are {auth}"}), chat_chunk(finish="stop"))
        send_sse(self, data)

    def do_GET(self):
        auth = self.headers.get("authorization", "")
        send_json(self, 200, {"object": "list", "data": [], "echo": auth}, headers={"x-echo": auth})


def test_a_forwarded_credential_is_a_secret_of_its_request(gateway_factory, tmp_path):
    """With forward_client_auth the client's credential goes to the backend (it decides who the
    client is), and from there nowhere: a backend that repeats it (in a turn's text, a 429's
    message, an error event, a passthrough answer) has it scrubbed like a configured key from
    what the gateway logs, records in flows and answers (HTTP, streamed and whole, and the
    WebSocket). Before, the 429's message went to the log's warning and every flow kept it.
    The same for a configured upstream key that does not look like one (no ``sk-``): a turn's
    record kept the error message as the backend wrote it."""
    PLAIN = "plain-upstream-secret-4242"
    with LocalServer(_Echoing) as backend:
        for secret, extra, env in ((FORWARDED, ("--set", "resp2chat_forward_client_auth=true"), {}),
                                   (PLAIN, (), {"RESP2CHAT_UPSTREAM_API_KEY": PLAIN})):
            flows, access = tmp_path / f"{secret}.mitm", tmp_path / f"{secret}.jsonl"
            gw = gateway_factory(backend.url, *extra, "-w", str(flows), "--set", f"resp2chat_access_log_path={access}",
                                 "--set", "resp2chat_max_replay_entries=0", env=env)
            mine = auth(f"Bearer {FORWARDED}")
            answers = []
            for model in ("echo", "limited", "event"):
                answers.append(post_turn(gw, {"model": model, "input": "hi"}, mine).text)
                answers.append(post_turn(gw, {"model": model, "input": "hi", "stream": True}, mine).text)
                ws = WSClient(gw.base_url, headers=mine)
                answers.append(json.dumps(ws.turn(create(model=model, input="hi"))))
                ws.close()
            r = requests.get(gw.base_url + "/models", headers=mine, timeout=30)
            assert r.status_code == 200
            answers.append(r.text + json.dumps(dict(r.headers)))
            assert "[redacted]" in answers[0] and "[redacted]" in answers[-1]
            assert all(secret not in a for a in answers), [a[:200] for a in answers if secret in a]
            gw.stop()
            assert "rate limited for key [redacted]" in gw.log()  # (the warning is there, without the secret)
            said = gw.log() + access.read_text() + flows.read_bytes().decode("latin-1")
            assert secret not in said, secret
