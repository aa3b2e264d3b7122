"""GET /metrics (Prometheus text, read with prometheus_client's own parser) and the JSON access
log, through a real mitmdump with the openai SDK and the scripted upstream."""

from __future__ import annotations

import json
import re

import openai
import pytest
import requests

from prometheus_client.parser import text_string_to_metric_families

import yaml

from helpers import (ROOT, cli_env, config_file, free_port, openai_client, run_cli, scrape, start_gateway, stored_by,
                     wait_until)


BY_CLIENT = ("resp2chat_turns_total", "resp2chat_tokens_total", "resp2chat_time_to_first_token_seconds",
             "resp2chat_turn_duration_seconds", "resp2chat_gateway_latency_seconds")


def value(samples: dict, name: str, **labels) -> float:
    """A sample's value; the metrics labelled by client are read for no client ("") unless given."""
    if name.startswith(BY_CLIENT):
        labels.setdefault("client", "")
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_refused(gw, headers: dict, log_path, *, counted: list[dict], logged: list[tuple]) -> list[dict]:
    """The gateway's /metrics (asked with ``headers``) count each of ``counted`` (labels) once in
    ``resp2chat_refused_requests_total``, nothing else there, and no turn; its access log (at
    ``log_path``) has the lines ``logged``, each as (path, http_status, code, client, status).
    Returns those lines."""
    m = scrape(gw, **headers)
    for labels in counted:
        assert value(m, "resp2chat_refused_requests_total", **labels) == 1, labels
    assert sum(v for (name, _), v in m.items() if name == "resp2chat_refused_requests_total") == len(counted)
    assert not any(name == "resp2chat_turns_total" for name, _ in m)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(x["path"], x["http_status"], x["code"], x["client"], x["status"]) for x in lines] == logged
    return lines


def test_metrics_and_access_log_per_upstream(upstream, tmp_path):
    log_path = tmp_path / "access.jsonl"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    entries = [{"name": "down", "base_url": dead, "models": ["demo-*"]},
               {"name": "demo", "base_url": upstream.base_url, "api_key": "sk-demo-secret-123"}]
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", f"resp2chat_access_log_path={log_path}", "--set", "resp2chat_max_replay_entries=10")
    try:
        client = openai_client(gw)
        before = scrape(gw)
        assert value(before, "resp2chat_streams_in_flight") == 0
        for _ in range(2):  # the second is a replay-cache hit
            with client.responses.stream(model="demo-model", input="secret prompt words: 5",
                                         prompt_cache_key="conv-7") as s:
                list(s)
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="demo-model", input=[{"type": "bogus"}])
        with pytest.raises(openai.APIStatusError):
            client.responses.create(model="other", input="error: 503 overloaded")  # every upstream fails
        m = scrape(gw)
        labels = dict(upstream="demo", model="demo-model")
        assert value(m, "resp2chat_turns_total", **labels, status="completed", code="") == 1
        assert value(m, "resp2chat_turns_total", upstream="replay-cache", model="demo-model", status="replayed", code="") == 1
        assert value(m, "resp2chat_turns_total", upstream="", model="demo-model", status="rejected", code="unsupported_item_type") == 1
        assert value(m, "resp2chat_turns_total", upstream="demo", model="other", status="failed", code="server_error") == 1
        assert value(m, "resp2chat_fallbacks_total", upstream="down", status="502") == 1
        assert value(m, "resp2chat_time_to_first_token_seconds_count", **labels) == 1
        assert 0 < value(m, "resp2chat_time_to_first_token_seconds_sum", **labels) <= value(
            m, "resp2chat_turn_duration_seconds_sum", **labels)
        # the gateway's own latency: the turns that reached a backend (not the replayed nor the
        # refused one), each less than its time to the first token
        assert value(m, "resp2chat_gateway_latency_seconds_count", **labels) == 1
        assert value(m, "resp2chat_gateway_latency_seconds_count", upstream="demo", model="other") == 1
        assert 0 < value(m, "resp2chat_gateway_latency_seconds_sum", **labels) < value(
            m, "resp2chat_time_to_first_token_seconds_sum", **labels)
        assert value(m, "resp2chat_tokens_total", **labels, kind="prompt") > 0
        assert value(m, "resp2chat_tokens_total", **labels, kind="output") > 0
        assert value(m, "resp2chat_replay_cache_hits_total") == 1
        assert value(m, "resp2chat_replay_cache_entries") == 1
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert [(x["upstream"], x["status"], x["code"]) for x in lines] == [
            ("demo", "completed", ""), ("replay-cache", "replayed", ""), ("", "rejected", "unsupported_item_type"),
            ("demo", "failed", "server_error")]
        first = lines[0]
        assert first["session"] == "conv-7" and first["model"] == "demo-model" and first["http_status"] == 200
        assert first["input_tokens"] > 0 and first["output_tokens"] > 0 and first["cached_tokens"] is not None
        assert 0 < first["ttft_ms"] <= first["total_ms"]
        assert 0 < first["gateway_ms"] < first["ttft_ms"]
        assert [x["gateway_ms"] is None for x in lines] == [False, True, True, False]  # (replayed, refused: none)
        assert first["fallbacks"] == [{"upstream": "down", "status": 502}]
        text = log_path.read_text()
        assert "secret prompt" not in text and "word0" not in text and "sk-demo" not in text  # no content, no keys
    finally:
        gw.stop()


def test_metrics_obey_the_gateway_key(upstream, tmp_path):
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_gateway_api_key=gw-key-123456")
    try:
        r = requests.get(gw.base_url.removesuffix("/v1") + "/metrics", timeout=10)
        assert r.status_code == 401 and r.headers["x-request-id"].startswith("req_")
        assert value(scrape(gw, authorization="Bearer gw-key-123456"), "resp2chat_streams_in_flight") == 0
    finally:
        gw.stop()


def test_requests_without_the_key_cannot_use_up_the_model_labels(upstream, tmp_path):
    """Metrics keep at most MAX_MODELS model names (later ones count as "other"): names from
    requests the gate refused must not take them."""
    from resp2chat_io.addons.metrics import MAX_MODELS

    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_gateway_api_key=gw-key-123456")
    key = {"authorization": "Bearer gw-key-123456"}
    try:
        with requests.Session() as s:
            for n in range(MAX_MODELS + 1):
                r = s.post(gw.base_url + "/responses", json={"model": f"spam-{n}", "input": "x"}, timeout=10)
                assert r.status_code == 401
        r = requests.post(gw.base_url + "/responses", json={"model": "demo-model", "input": "hi"}, headers=key,
                          timeout=30)
        assert r.status_code == 200, r.text
        m = scrape(gw, **key)
        # (gateway_api_key is the client named default; a request with no key is nobody's)
        assert value(m, "resp2chat_turns_total", upstream="default", model="demo-model", client="default",
                     status="completed", code="") == 1
        assert value(m, "resp2chat_turns_total", upstream="", model="", status="rejected",
                     code="invalid_api_key") == MAX_MODELS + 1
        assert not any(dict(labels).get("model", "").startswith("spam-") for _, labels in m)
    finally:
        gw.stop()


def test_socket_turns_are_counted_and_logged_like_http_turns(upstream, tmp_path):
    """Over the Responses WebSocket: the upstream that answered, fallbacks, TTFT, duration, one
    request id per message (in failures, the log and the access log), refused messages counted."""
    from wsclient import WSClient

    log_path = tmp_path / "access.jsonl"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    entries = [{"name": "down", "base_url": dead, "models": ["demo-*"]},
               {"name": "demo", "base_url": upstream.base_url, "api_key": "sk-demo-secret-123"}]
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", f"resp2chat_access_log_path={log_path}")
    try:
        client = WSClient(gw.base_url, headers={"session-id": "sess-ws-1"})
        create = {"type": "response.create", "model": "demo-model"}
        warm = client.turn({**create, "input": "warming up", "generate": False})  # no turn: not counted
        ok = client.turn({**create, "input": "words: 5", "previous_response_id": warm[-1]["response"]["id"]})
        assert ok[-1]["type"] == "response.completed"
        [refused] = client.turn({**create, "input": [{"type": "bogus"}]})
        assert refused["status"] == 400
        failed = client.turn({"type": "response.create", "model": "other", "input": "error: 503 overloaded"})
        assert failed[-1]["type"] == "response.failed"
        # a turn in flight is a stream in flight, as over HTTP
        client.send({**create, "input": "words: 30\nslow: 100"})
        while client.next_message()["type"] != "response.output_text.delta":
            pass
        assert value(scrape(gw), "resp2chat_streams_in_flight") == 1
        assert client.events()[-1]["type"] == "response.completed"
        client.close()
        m = scrape(gw)
        assert value(m, "resp2chat_streams_in_flight") == 0
        labels = dict(upstream="demo", model="demo-model")
        assert value(m, "resp2chat_turns_total", **labels, status="completed", code="") == 2
        assert value(m, "resp2chat_turns_total", upstream="", model="demo-model", status="rejected",
                     code="unsupported_item_type") == 1
        assert value(m, "resp2chat_turns_total", upstream="demo", model="other", status="failed", code="server_error") == 1
        assert value(m, "resp2chat_fallbacks_total", upstream="down", status="502") == 2  # ("other": demo only)
        assert value(m, "resp2chat_time_to_first_token_seconds_count", **labels) == 2
        assert 0 < value(m, "resp2chat_time_to_first_token_seconds_sum", **labels) <= value(
            m, "resp2chat_turn_duration_seconds_sum", **labels)
        assert value(m, "resp2chat_gateway_latency_seconds_count", **labels) == 2
        assert 0 < value(m, "resp2chat_gateway_latency_seconds_sum", **labels) < value(
            m, "resp2chat_time_to_first_token_seconds_sum", **labels)
        assert value(m, "resp2chat_tokens_total", **labels, kind="output") > 0
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert [(x["upstream"], x["status"], x["code"], x["http_status"]) for x in lines] == [
            ("demo", "completed", "", 200), ("", "rejected", "unsupported_item_type", 400),
            ("demo", "failed", "server_error", 200), ("demo", "completed", "", 200)]
        ids = [x["request_id"] for x in lines]
        assert len(set(ids)) == 4 and len({i.rsplit("_", 1)[0] for i in ids}) == 1  # one socket, one id a message
        assert [i.rsplit("_", 1)[1] for i in ids] == ["2", "3", "4", "5"]  # (message 1 was the warm-up)
        first = lines[0]
        assert first["session"] == "sess-ws-1" and first["fallbacks"] == [{"upstream": "down", "status": 502}]
        assert 0 < first["ttft_ms"] <= first["total_ms"] and first["output_tokens"] > 0
        assert 0 < first["gateway_ms"] < first["ttft_ms"] and lines[1]["gateway_ms"] is None  # (refused)
        # the failure names its request id to the client; the log has it with the upstream's detail
        said = failed[-1]["response"]["error"]["message"]
        assert ids[2] in said and "overloaded" not in said
        assert f"{ids[2]} failed (server_error): " in gw.log() and "overloaded" in gw.log()
        assert "sk-demo" not in log_path.read_text() + gw.log()
    finally:
        gw.stop()


def test_refused_passthrough_calls_are_counted_and_logged(upstream, gateway_factory, tmp_path):
    """A request that is not a turn but goes to a backend (a passthrough: embeddings, a model;
    input_tokens), refused by the gateway (no key: the gate's 401; a model the client may not
    use; a body it cannot read or that names the model twice; its rpm), counts in
    ``resp2chat_refused_requests_total`` by its passthrough_paths entry and has its access-log
    line (with its ``path``), as a refused turn does; what the backend answered is not counted,
    and no turn is. Before, none of them was anywhere."""
    log_path = tmp_path / "access.jsonl"
    carol = "carol-key-0123456789abcdef"
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_access_log_path={log_path}", env={
        "RESP2CHAT_CLIENTS": json.dumps([{"name": "carol", "key": carol, "models": ["demo-*"], "rpm": 5}])})
    auth = {"authorization": f"Bearer {carol}"}

    def embed(data: bytes, headers=auth) -> requests.Response:
        return requests.post(gw.base_url + "/embeddings", data=data, timeout=30,
                             headers={"content-type": "application/json", **headers})

    answers = [embed(b'{"model": "demo-model", "input": "x"}', {}),
               embed(b'{"model": "other", "input": "x"}'),
               embed(b'{"model": "demo-model", "input": '),
               embed(b'{"model": "other", "model": "demo-model", "input": "x"}'),
               requests.get(gw.base_url + "/models/other", headers=auth, timeout=30),
               embed(b'{"model": "demo-model", "input": "x"}'),  # (served: the backend's answer)
               requests.get(gw.base_url + "/models", headers=auth, timeout=30),  # (a read: served)
               embed(b'{"model": "demo-model", "input": "x"}'),
               embed(b'{"model": "demo-model", "input": "x"}'),  # (rpm 5: the refused model, two 400s, two served)
               requests.post(gw.base_url + "/responses/input_tokens", json={"model": "demo-model", "input": "x"},
                             headers=auth, timeout=30)]
    assert [r.status_code for r in answers] == [401, 404, 400, 400, 404, 200, 200, 200, 429, 429]
    embeddings = dict(route="POST /v1/embeddings", status="rejected")
    lines = assert_refused(gw, auth, log_path, counted=[
        dict(embeddings, client="", code="invalid_api_key"),
        dict(embeddings, client="carol", code="model_not_found"),
        dict(embeddings, client="carol", code="invalid_json"),
        dict(embeddings, client="carol", code="invalid_value"),
        dict(embeddings, client="carol", code="rate_limit_exceeded"),
        dict(route="GET /v1/models/*", status="rejected", client="carol", code="model_not_found"),
        dict(route="POST /v1/responses/input_tokens", status="rejected", client="carol", code="rate_limit_exceeded"),
    ], logged=[
        ("/v1/embeddings", 401, "invalid_api_key", None, "rejected"),
        ("/v1/embeddings", 404, "model_not_found", "carol", "rejected"),
        ("/v1/embeddings", 400, "invalid_json", "carol", "rejected"),
        ("/v1/embeddings", 400, "invalid_value", "carol", "rejected"),
        ("/v1/models/other", 404, "model_not_found", "carol", "rejected"),
        ("/v1/embeddings", 429, "rate_limit_exceeded", "carol", "rejected"),
        ("/v1/responses/input_tokens", 429, "rate_limit_exceeded", "carol", "rejected")])
    assert [x["request_id"] for x in lines] == [r.headers["x-request-id"] for r in answers if r.status_code >= 400]
    assert carol not in log_path.read_text()


def test_refused_upgrades_and_sockets_the_gateway_closed_are_counted_and_logged(upstream, tmp_path):
    """An upgrade to the Responses WebSocket the gateway refuses (no key: the gate's 401; past
    carol's max_sockets: 429; past the gateway's max_websockets: 503) counts in
    ``resp2chat_refused_requests_total`` with route ``GET /v1/responses`` and has its access-log
    line, as a refused passthrough call does; and so does a socket the gateway closes because
    its key was revoked (``invalid_api_key``; its line's HTTP status the upgrade's 101). No turn
    is counted. Before, none of them was anywhere."""
    from wsclient import WSClient, refused_upgrade

    log_path = tmp_path / "access.jsonl"
    carol = {"authorization": "Bearer " + run_cli(tmp_path, "keys", "add", "carol", "--max-sockets", "1").stdout.strip()}
    bob = {"authorization": "Bearer " + run_cli(tmp_path, "keys", "add", "bob").stdout.strip()}
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_websockets=2",
                       "--set", f"resp2chat_access_log_path={log_path}", env=cli_env(tmp_path))
    try:
        held = WSClient(gw.base_url, headers=carol)
        refused = [refused_upgrade(gw.base_url), refused_upgrade(gw.base_url, carol)]
        bobs = WSClient(gw.base_url, headers=bob)
        refused.append(refused_upgrade(gw.base_url, bob))
        assert [r.status for r in refused] == [401, 429, 503]
        assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
        bobs.sock.settimeout(8)
        assert bobs.next_message()["error"]["code"] == "invalid_api_key"
        assert bobs.next_message() is None and bobs.closed[0] == 1008
        socket = dict(route="GET /v1/responses")
        lines = assert_refused(gw, carol, log_path, counted=[
            dict(socket, client="", status="rejected", code="invalid_api_key"),
            dict(socket, client="carol", status="rejected", code="rate_limit_exceeded"),
            dict(socket, client="bob", status="failed", code="server_overloaded"),
            dict(socket, client="bob", status="rejected", code="invalid_api_key"),
        ], logged=[
            ("/v1/responses", 401, "invalid_api_key", None, "rejected"),
            ("/v1/responses", 429, "rate_limit_exceeded", "carol", "rejected"),
            ("/v1/responses", 503, "server_overloaded", "bob", "failed"),
            ("/v1/responses", 101, "invalid_api_key", "bob", "rejected")])
        assert [x["request_id"] for x in lines[:3]] == [r.headers["x-request-id"] for r in refused]
        assert lines[3]["request_id"].startswith("req_") and lines[3]["total_ms"] > 0
        held.close()
        text = log_path.read_text()
        assert carol["authorization"][7:] not in text and bob["authorization"][7:] not in text
    finally:
        gw.stop()


def entry_bytes(store_dir) -> dict[str, int]:
    """Owner -> the bytes of its entries as the store counts them (an entry's compact JSON), from
    the store's directory copy."""
    held: dict[str, int] = {}
    for path in store_dir.glob("*.json"):
        record = json.loads(path.read_bytes())
        size = len(json.dumps(record["entry"], ensure_ascii=False, separators=(",", ":")).encode())
        held[record["owner"]] = held.get(record["owner"], 0) + size
    return held


def test_stored_responses_are_shown_by_client(upstream, tmp_path):
    """Two clients made with ``resp2chat keys add`` store responses through the openai SDK:
    /metrics shows each one's stored responses and bytes under its name (the bytes the store
    counts: its directory copy's entries), the rest by kind, all adding up to the store; a
    response stored with ``store: false`` counts nowhere. Once bob is revoked, his entries (kept
    until they expire) are ``former``'s and no series names him. Before, the store was one
    unlabelled figure."""
    store = tmp_path / "store"
    keys = {name: run_cli(tmp_path, "keys", "add", name).stdout.strip() for name in ("alice", "bob")}
    ids = {c["name"]: c["id"] for c in yaml.safe_load(config_file(tmp_path).read_text())["clients"]}
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_session_store_dir={store}", env=cli_env(tmp_path))
    alice_auth = {"authorization": f"Bearer {keys['alice']}"}
    try:
        alice, bob = (openai_client(gw, api_key=keys[name]) for name in ("alice", "bob"))
        first = alice.responses.create(model="demo-model", input="alice's first")
        alice.responses.create(model="demo-model", input="and a longer second " * 30, previous_response_id=first.id)
        alice.responses.create(model="demo-model", input="not kept", store=False)
        bob.responses.create(model="demo-model", input="bob's")
        m = scrape(gw, **alice_auth)
        held = entry_bytes(store)
        assert set(held) == {f"id.{ids['alice']}", f"id.{ids['bob']}"}
        assert stored_by(m) == {("alice", "client"): 2, ("bob", "client"): 1, ("", "shared"): 0,
                                ("", "forwarded"): 0, ("", "former"): 0}
        assert stored_by(m, "resp2chat_stored_response_bytes") == {
            ("alice", "client"): held[f"id.{ids['alice']}"], ("bob", "client"): held[f"id.{ids['bob']}"],
            ("", "shared"): 0, ("", "forwarded"): 0, ("", "former"): 0}
        assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
        wait_until(lambda: scrape(gw, **alice_auth).get(
            ("resp2chat_stored_responses", (("client", "bob"), ("kind", "client")))) is None, 20, "bob revoked")
        m = scrape(gw, **alice_auth)
        assert stored_by(m) == {("alice", "client"): 2, ("", "shared"): 0, ("", "forwarded"): 0, ("", "former"): 1}
        assert stored_by(m, "resp2chat_stored_response_bytes")[("", "former")] == held[f"id.{ids['bob']}"]
        text = requests.get(gw.base_url.removesuffix("/v1") + "/metrics", headers=alice_auth, timeout=10).text
        assert ids["alice"] not in text and ids["bob"] not in text  # (names, never identities)
    finally:
        gw.stop()
    for key in keys.values():
        assert key not in gw.log()


def test_readme_lists_every_metric_with_its_labels(gateway):
    """README's metrics table (*Metrics and logs*) names every family /metrics serves, with its
    labels as the gateway gives them."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"\s*\| `resp2chat_", line)]
    documented = {name: set(filter(None, labels.split(","))) if brace else set()
                  for row in rows for name, brace, labels in re.findall(r"`(resp2chat_\w+)(\{([\w,]*)\})?`", row)}
    requests.post(gateway.base_url + "/responses", json={"model": "demo-model", "input": "count me"}, timeout=30)
    text = requests.get(gateway.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    served = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # prometheus_client's creation times of the labelled series
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        served[name] = {key for s in family.samples for key in s.labels if key != "le"}
    assert "resp2chat_turns_total" in served and served["resp2chat_turns_total"]
    for name, labels in served.items():
        assert name in documented, f"{name} is served by /metrics but not in README's metrics table"
        if labels:  # (a family with no series yet shows no labels)
            assert documented[name] == labels, (name, documented[name], labels)
