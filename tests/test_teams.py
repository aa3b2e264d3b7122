"""A team's gateway (issue 23), as a team runs it: two replicas sharing a real redis-server,
three clients made with the real ``resp2chat keys`` into the config file both replicas read.
Each client's state is its own on both replicas and both transports; limits hold across the
replicas (a 429 with OpenAI's headers, then recovery, and the openai SDK and Codex retrying
through it); a revoked key stops working on both replicas without a restart; metrics, the
access log and ``resp2chat usage`` name the client."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import openai
import pytest
import requests
import yaml

from helpers import (ADDON, MITMDUMP, Codex, LocalServer, QuietHandler, chat_event, chat_sse, chat_chunk, cli_env,
                     config_file, free_port, http_chunk, open_embedding, openai_client, parse_sse, post_turn, rest,
                     run_cli, scrape, send_sse, start_gateway, start_sse, stop_process, stored_by, wait_http, wait_until)
from wsclient import WSClient

ALL = "demo-model"


class Team:
    """Two replicas and the clients' keys (``keys[name]``)."""

    def __init__(self, upstream, tmp_path, redis_server, clients: dict[str, tuple[str, ...]]):
        self.tmp, self.redis = tmp_path, redis_server.client()
        self.keys = {}
        for name, flags in clients.items():
            out = run_cli(tmp_path, "keys", "add", name, *flags)
            assert out.returncode == 0, out.stderr
            self.keys[name] = out.stdout.strip()
        self.logs = [tmp_path / "access-a.jsonl", tmp_path / "access-b.jsonl"]
        self.gws = [start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}",
                                  "--set", f"resp2chat_access_log_path={log}", env=cli_env(tmp_path))
                    for log in self.logs]

    def sdk(self, replica: int, name: str, **kw) -> openai.OpenAI:
        return openai_client(self.gws[replica], api_key=self.keys[name], **kw)

    def post(self, replica: int, name: str, body: dict) -> requests.Response:
        return post_turn(self.gws[replica], {"model": ALL, **body}, {"authorization": f"Bearer {self.keys[name]}"})

    def ws(self, replica: int, name: str) -> WSClient:
        return WSClient(self.gws[replica].base_url, headers={"authorization": f"Bearer {self.keys[name]}"})

    def owner(self, name: str) -> str:
        """The client's owner (owner.py): its identity, the ``id`` ``keys add`` wrote in the config
        file (an entry without one: its name)."""
        entry = next(c for c in yaml.safe_load(config_file(self.tmp).read_text())["clients"] if c["name"] == name)
        return f"id.{entry['id']}" if "id" in entry else f"client.{name}"

    def key(self, name: str, response_id: str) -> str:
        """The Redis key of a response ``name`` stored, under its owner's namespace."""
        return f"resp2chat:owner:{self.owner(name)}:response:{response_id}"

    def stored(self, name: str, response_id: str) -> None:
        """Writes to Redis run after the answer: wait for this one, under its client's namespace."""
        key = self.key(name, response_id)
        wait_until(lambda: self.redis.exists(key), 20, f"{response_id} stored for {name}")

    def access(self) -> list[dict]:
        return [json.loads(line) for log in self.logs if log.exists() for line in log.read_text().splitlines()]

    def stop(self) -> None:
        for gw in self.gws:
            gw.stop()


@pytest.fixture
def team(upstream, tmp_path, redis_server, request):
    t = Team(upstream, tmp_path, redis_server, request.param)
    yield t
    t.stop()
    for gw in t.gws:
        log = gw.log()
        for key in t.keys.values():
            assert key not in log  # no key in a gateway's log
        for path in t.logs:
            assert key not in (path.read_text() if path.exists() else "")


def uses(clients):
    return pytest.mark.parametrize("team", [clients], indirect=True)


THREE = {"alice": (), "bob": ("--models", "demo-*"), "carol": ()}
FOUR = {**THREE, "dave": ("--models", "qwen3-*")}


def ws_error(events: list[dict]) -> dict:
    assert events[-1]["type"] == "error", events[-1]
    return events[-1]


@uses(FOUR)
def test_each_clients_state_is_its_own_on_both_replicas_and_transports(team, upstream):
    alice_a, alice_b, bob_b = team.sdk(0, "alice"), team.sdk(1, "alice"), team.sdk(1, "bob")
    first = alice_a.responses.create(model=ALL, input="alice's secret plan")
    team.stored("alice", first.id)
    assert alice_b.responses.retrieve(first.id).id == first.id  # her own, on the other replica
    # to bob, alice's id is an unknown one: read, delete, continue, reference an item
    with pytest.raises(openai.NotFoundError):
        bob_b.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        team.sdk(0, "bob").responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as err:
        bob_b.responses.create(model=ALL, input="go on", previous_response_id=first.id)
    assert err.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        bob_b.responses.create(model=ALL, input=[{"type": "item_reference", "id": first.output[-1].id},
                                                 {"role": "user", "content": "and?"}])
    assert err.value.code == "item_not_found"
    # ... and over the WebSocket on either replica
    for replica in (0, 1):
        sock = team.ws(replica, "bob")
        try:
            events = sock.turn({"type": "response.create", "model": ALL, "input": "go on",
                                "previous_response_id": first.id})
        finally:
            sock.close()
        assert ws_error(events)["error"]["code"] == "previous_response_not_found"
    sock = team.ws(1, "alice")  # alice continues her own over the socket of the other replica
    try:
        done = sock.turn({"type": "response.create", "model": ALL, "input": "go on",
                          "previous_response_id": first.id})
    finally:
        sock.close()
    assert done[-1]["type"] == "response.completed"
    assert [m["content"] for m in upstream.requests()[-1]["messages"]][0] == "alice's secret plan"
    assert alice_a.responses.retrieve(first.id).id == first.id  # bob's delete did not touch it
    # the key in x-api-key (Anthropic-style clients) names the client as well; an unknown key is a 401
    as_header = post_turn(team.gws[1], {"model": ALL, "input": "go on", "previous_response_id": first.id},
                          {"x-api-key": team.keys["alice"]})
    assert as_header.status_code == 200, as_header.text
    unknown = post_turn(team.gws[0], {"model": ALL, "input": "hi"}, {"x-api-key": "r2c-" + "x" * 43})
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
    # the replay cache answers a client only with its own cached answers
    body = {"input": "a question everyone asks", "stream": True}
    assert team.post(0, "alice", body).status_code == 200
    wait_until(lambda: team.redis.zcard("resp2chat:replays") >= 1, 20, "the replay stored")
    asked = len(upstream.requests())
    again = team.post(1, "alice", body)
    assert again.status_code == 200 and len(upstream.requests()) == asked  # her own: from the cache
    for name in ("bob", "carol"):
        theirs = team.post(1, name, body)
        assert theirs.status_code == 200 and parse_sse(theirs.content)[-1]["type"] == "response.completed"
    assert len(upstream.requests()) == asked + 2  # theirs: each asked the backend
    # bob's models are his globs: another model does not exist for him, it does for alice
    with pytest.raises(openai.NotFoundError) as err:
        team.sdk(0, "bob").responses.create(model="other-model", input="hi")
    assert err.value.code == "model_not_found"
    # and GET /v1/models shows each client its own models only
    assert [m.id for m in team.sdk(1, "bob").models.list()] == [m.id for m in alice_b.models.list()] == [ALL]
    assert [m.id for m in team.sdk(0, "dave").models.list()] == []
    with pytest.raises(openai.NotFoundError) as err:
        team.sdk(1, "dave").models.retrieve(ALL)
    assert err.value.code == "model_not_found"
    assert alice_a.responses.create(model="other-model", input="hi").status == "completed"


@uses({"alice": (), "carol": ("--rpm", "6", "--max-streams", "1")})
def test_limits_hold_across_replicas_with_openais_headers_then_recover(team):
    # max_streams=1: a turn open on one replica keeps carol's next turn out on the other
    slow: dict = {}

    def long_turn():
        slow["r"] = team.post(0, "carol", {"input": "words: 30 slow: 100", "stream": True})

    t = threading.Thread(target=long_turn)
    t.start()
    wait_until(lambda: team.redis.zcard(f"resp2chat:limits:{team.owner('carol')}:streams") == 1, 20, "carol's turn open")
    busy = team.post(1, "carol", {"input": "me too"})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
    assert "max_streams" in busy.json()["error"]["message"] and int(busy.headers["retry-after"]) >= 1
    assert team.post(1, "alice", {"input": "not limited"}).status_code == 200  # nobody else waits
    t.join(30)
    assert slow["r"].status_code == 200 and parse_sse(slow["r"].content)[-1]["type"] == "response.completed"
    assert slow["r"].headers["x-ratelimit-limit-requests"] == "6"
    # rpm=6 across both replicas: turns alternate replicas; the remaining count falls as one
    remaining, refused = [], None
    for n in range(10):
        r = team.post(n % 2, "carol", {"input": f"turn {n}"})
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 200, r.text
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert refused is not None, "carol was never limited"
    assert 4 <= len(remaining) <= 5 and remaining == sorted(remaining, reverse=True) and remaining[-1] == 0
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "rpm" in err["message"] and "x-request-id" in refused.headers
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 10 and refused.headers["x-ratelimit-reset-requests"].endswith("s")
    # the WebSocket on the other replica says the same, as an error message; the socket goes on
    sock = team.ws(1, "carol")
    try:
        events = sock.turn({"type": "response.create", "model": ALL, "input": "over the socket"})
        err = ws_error(events)
        assert err["status"] == 429 and err["error"]["code"] == "rate_limit_exceeded"
        # reads are not turns
        assert team.sdk(1, "carol").models.list().data
        # recovery: the openai SDK backs off on the 429 (Retry-After) and then succeeds
        started = time.monotonic()
        answer = team.sdk(0, "carol", max_retries=3).responses.create(model=ALL, input="patiently")
        assert answer.output_text == "You said: patiently" and time.monotonic() - started >= 0.5
        wait_until(lambda: sock.turn({"type": "response.create", "model": ALL, "input": "later"})[-1]["type"]
                   == "response.completed", 30, "the socket's turn admitted again")
    finally:
        sock.close()
    # the access log keeps the refusals, naming the client
    refusals = [a for a in team.access() if a["client"] == "carol" and a["code"] == "rate_limit_exceeded"]
    assert len(refusals) >= 3 and all(a["http_status"] == 429 for a in refusals)


@uses({"carol": ("--rpm", "3", "--max-streams", "1")})
def test_embeddings_and_input_tokens_count_against_limits_across_replicas(team):
    """What a client makes a backend do besides its turns (a passthrough such as POST
    /v1/embeddings, POST /v1/responses/input_tokens) is counted where its turns are, in Redis
    for every replica (addons/limits.py): an embedding still answering on one replica keeps
    carol's turn out on the other; her three requests a minute are any three of them."""
    with open_embedding(team.gws[0], team.keys["carol"], ["slow: 300", "b", "c", "d"]) as sock:
        assert team.redis.zcard(f"resp2chat:limits:{team.owner('carol')}:streams") == 1
        busy = team.post(1, "carol", {"input": "me too"})
        assert busy.status_code == 429 and "max_streams" in busy.json()["error"]["message"], busy.text
        with pytest.raises(openai.RateLimitError):
            team.sdk(1, "carol").embeddings.create(model=ALL, input="and me")
        assert b'"usage"' in rest(sock)
    wait_until(lambda: team.redis.zcard(f"resp2chat:limits:{team.owner('carol')}:streams") == 0, 20, "the embedding released")
    counted = requests.post(team.gws[1].base_url + "/responses/input_tokens", json={"model": ALL, "input": "hi"},
                            headers={"authorization": f"Bearer {team.keys['carol']}"}, timeout=30)
    assert counted.status_code == 200 and counted.headers["x-ratelimit-remaining-requests"] == "1", counted.headers
    assert team.sdk(0, "carol").embeddings.create(model=ALL, input="third").data
    with pytest.raises(openai.RateLimitError) as err:  # the fourth of the minute, on the other replica
        team.sdk(1, "carol").embeddings.create(model=ALL, input="fourth")
    assert "rpm" in err.value.message and int(err.value.response.headers["retry-after"]) >= 1
    assert team.post(0, "carol", {"input": "a turn"}).status_code == 429
    assert team.sdk(1, "carol").models.list().data  # (a read: not counted)


@uses({"alice": (), "bob": (), "carol": ()})
def test_a_revoked_key_is_refused_on_every_replica_without_a_restart(team):
    sock = team.ws(1, "bob")
    try:
        assert sock.turn({"type": "response.create", "model": ALL, "input": "hello"})[-1]["type"] == "response.completed"
        for replica in (0, 1):
            assert team.post(replica, "bob", {"input": "hi"}).status_code == 200
        out = run_cli(team.tmp, "keys", "revoke", "bob")
        assert out.returncode == 0, out.stderr
        revoked_at = time.monotonic()
        for replica in (0, 1):
            wait_until(lambda: team.post(replica, "bob", {"input": "hi"}).status_code == 401, 10,
                       f"bob refused on replica {replica}")
        assert time.monotonic() - revoked_at < 10
        # the socket bob opened before: its next message is refused too
        err = ws_error(sock.turn({"type": "response.create", "model": ALL, "input": "still me"}))
        assert err["status"] == 401 and err["error"]["code"] == "invalid_api_key"
    finally:
        sock.close()
    assert team.post(0, "alice", {"input": "hi"}).status_code == 200  # the others are untouched
    # a key added now works on both, no restart either
    dave = run_cli(team.tmp, "keys", "add", "dave")
    key = dave.stdout.strip()
    for gw in team.gws:
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"},
                                     {"authorization": f"Bearer {key}"}).status_code == 200, 10, "dave admitted")


@uses(THREE)
def test_metrics_access_log_and_usage_name_the_client(team):
    asked = {"alice": 3, "bob": 1, "carol": 2}
    for name, n in asked.items():
        for i in range(n):
            assert team.sdk(i % 2, name).responses.create(model=ALL, input=f"{name} {i}").status == "completed"
    sock = team.ws(0, "carol")
    try:
        assert sock.turn({"type": "response.create", "model": ALL, "input": "socket"})[-1]["type"] == "response.completed"
    finally:
        sock.close()
    asked["carol"] += 1
    wait_until(lambda: len(team.access()) == sum(asked.values()), 20, "every turn in the access logs")
    lines = team.access()
    assert {name: sum(1 for a in lines if a["client"] == name) for name in asked} == asked
    # /metrics (with a client's key, as any key holder): the client a label of turns and tokens
    samples = scrape(team.gws[0], authorization=f"Bearer {team.keys['alice']}")
    by_client: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "resp2chat_turns_total":
            by_client[dict(labels)["client"]] = by_client.get(dict(labels)["client"], 0) + v
    assert by_client == {"alice": 2, "bob": 1, "carol": 2}  # replica a: alice 0 and 2, bob 0, carol 0 + socket
    assert {dict(labels)["client"] for (name, labels), v in samples.items()
            if name == "resp2chat_tokens_total" and v} == {"alice", "bob", "carol"}
    # resp2chat usage reads both replicas' logs: turns and tokens per client
    out = run_cli(team.tmp, "usage", *map(str, team.logs), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {name: c["turns"] for name, c in report["clients"].items()} == asked
    for name in asked:
        logged = [a for a in lines if a["client"] == name]
        assert report["clients"][name]["output_tokens"] == sum(a["output_tokens"] for a in logged) > 0
    table = run_cli(team.tmp, "usage", *map(str, team.logs))
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["alice", "total", "3"] == rows[[r[:2] for r in rows].index(["alice", "total"])][:3]


@uses({"dev": ("--rpm", "12")})
def test_codex_backs_off_on_the_429_and_then_succeeds(team, codex_bin, tmp_path):
    # spend dev's 12 requests (a token back every 5 s); the one turn admitted as soon as one is
    # back leaves the bucket empty, so Codex's first request (well within 5 s) meets the 429
    for n in range(20):
        if team.post(n % 2, "dev", {"input": f"spend {n}"}).status_code == 429:
            break
    else:
        pytest.fail("dev was never limited")
    out = run_cli(team.tmp, "print-config", "--key-env", "TEAM_KEY", "--base-url", team.gws[1].base_url)
    assert out.returncode == 0, out.stderr
    cx = Codex.at(codex_bin, tmp_path / "cx", env={"TEAM_KEY": team.keys["dev"]})
    (cx.home / "config.toml").write_text(out.stdout)
    wait_until(lambda: team.post(0, "dev", {"input": "the last token"}).status_code == 200, 10, "a token back")
    before = len(team.access())
    run = cx.exec("say hello after the limit", timeout=120)
    assert run.returncode == 0, run.output
    assert "You said: say hello after the limit" in run.output
    wait_until(lambda: team.access()[-1]["status"] == "completed", 20, "Codex's turn logged")
    codex_turns = [(a["http_status"], a["status"], a["code"]) for a in team.access()[before:]]
    assert codex_turns[0] == (429, "rejected", "rate_limit_exceeded") and codex_turns[-1] == (200, "completed", "")


def test_a_team_gateway_listens_beyond_loopback_with_clients_alone(tmp_path, upstream):
    """``clients`` without ``gateway_api_key`` is enough to listen on every interface (alone, the
    bind is refused); revoking the last client from the file closes the gateway (every key
    refused), never opens it."""
    port = free_port()
    args = [str(MITMDUMP), "-s", str(ADDON), "--mode", f"reverse:{upstream.origin}", "--set", f"confdir={tmp_path}"]
    env = cli_env(tmp_path, RESP2CHAT_BIND_ADDR=f"0.0.0.0:{port}")
    refused = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert refused.returncode != 0 and "needs gateway_api_key or clients" in refused.stdout + refused.stderr
    key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
    log = tmp_path / "gw.log"
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        gw = type("GW", (), {"base_url": f"http://127.0.0.1:{port}/v1"})()
        auth = {"authorization": f"Bearer {key}"}
        assert post_turn(gw, {"model": ALL, "input": "hi"}, auth).status_code == 200
        assert post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401
        assert run_cli(tmp_path, "keys", "revoke", "alice").returncode == 0
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, auth).status_code == 401, 10, "alice refused")
        for headers in ({}, {"authorization": "Bearer anything-at-all-0123456789"}):
            r = post_turn(gw, {"model": ALL, "input": "hi"}, headers)
            assert r.status_code == 401, "a gateway that started with keys must not become open"
    finally:
        stop_process(proc)
    assert "lists no client any more" in log.read_text() and key not in log.read_text()


@uses(THREE)
def test_conversations_and_background_responses_are_their_clients_own(team, upstream):
    """Issue 24's state on a team's gateway: a conversation and a background response belong to
    the client that made them (owner.py: its own Redis namespace), on both replicas; to another
    client they are unknown ids."""
    alice_a, alice_b, bob_b = team.sdk(0, "alice"), team.sdk(1, "alice"), team.sdk(1, "bob")
    conv = alice_a.conversations.create(items=[{"role": "user", "content": "alice's secret"}])
    assert team.redis.exists(team.key("alice", conv.id))
    for call in (lambda: bob_b.conversations.retrieve(conv.id), lambda: bob_b.conversations.items.list(conv.id),
                 lambda: bob_b.conversations.delete(conv.id),
                 lambda: bob_b.responses.create(model=ALL, input="and?", conversation=conv.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert alice_b.responses.create(model=ALL, input="and?", conversation=conv.id).output_text == "You said: and?"
    assert upstream.requests()[-1]["messages"][0]["content"] == "alice's secret"
    queued = alice_a.responses.create(model=ALL, input="noreason\nwords: 10\nslow: 50", background=True)
    for call in (lambda: bob_b.responses.retrieve(queued.id), lambda: bob_b.responses.cancel(queued.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    done = wait_until(lambda: (r := alice_b.responses.retrieve(queued.id)).status == "completed" and r, 30,
                      "alice's background response polled to its end on the other replica")
    assert done.output_text.split() == [f"word{i}" for i in range(10)]


@uses({"alice": (), "bob": ()})
def test_a_revoked_or_rotated_key_stops_its_background_responses_on_every_replica(team, upstream):
    """A background response runs in the gateway, off any connection: revoking its client's key
    (``keys revoke``) or rotating it (``keys rotate``) stops it on whichever replica runs it, as the
    next message of that client's open WebSocket is refused; it is stored ``failed`` with
    ``invalid_api_key``, and the backend call is dropped. Another client's run goes on."""
    long = "noreason\nwords: 400\nslow: 50"  # ~20 s of backend stream
    bob_run = team.sdk(0, "bob").responses.create(model=ALL, input=long, background=True)
    alice_run = team.sdk(1, "alice").responses.create(model=ALL, input="noreason\nwords: 60\nslow: 50",
                                                      background=True)
    owners = {name: team.owner(name) for name in ("alice", "bob")}  # (bob's entry is gone once revoked)

    def stored(name: str, response_id: str) -> dict:
        data, head, tail = team.redis.hmget(f"resp2chat:owner:{owners[name]}:response:{response_id}",
                                            ["data", "head", "tail"])  # (a renewed run's JSON: head + tail)
        data = data or (head + tail if head is not None and tail is not None else None)
        return json.loads(data)["response"] if data else {}

    wait_until(lambda: stored("bob", bob_run.id).get("status") == "in_progress", 20, "bob's run under way")
    assert run_cli(team.tmp, "keys", "revoke", "bob").returncode == 0
    revoked_at = time.monotonic()
    ended = wait_until(lambda: (r := stored("bob", bob_run.id)).get("status") not in ("queued", "in_progress", None)
                       and r, 10, "bob's background response stopped")
    assert time.monotonic() - revoked_at < 8  # (its backend stream had ~20 s to go)
    assert ended["status"] == "failed" and ended["error"]["type"] == "invalid_api_key", ended
    # its turn is over on replica a (the backend call dropped), well before its stream's end
    alice_key = f"Bearer {team.keys['alice']}"
    wait_until(lambda: scrape(team.gws[0], authorization=alice_key)[("resp2chat_streams_in_flight", ())] == 0, 5,
               "bob's turn over")
    assert time.monotonic() - revoked_at < 10
    # alice's run, on the other replica, is hers: it goes on to its end
    done = wait_until(lambda: (r := team.sdk(0, "alice").responses.retrieve(alice_run.id)).status == "completed"
                      and r, 30, "alice's run completed")
    assert len(done.output_text.split()) == 60
    # her key rotated (a new key, the same client): the old key's run stops too, on replica b
    old = team.sdk(1, "alice").responses.create(model=ALL, input=long, background=True)
    wait_until(lambda: stored("alice", old.id).get("status") == "in_progress", 20, "alice's second run under way")
    out = run_cli(team.tmp, "keys", "rotate", "alice")
    assert out.returncode == 0, out.stderr
    new_key = out.stdout.strip()
    assert team.owner("alice") == owners["alice"]  # (rotation keeps the identity)
    ended = wait_until(lambda: (r := stored("alice", old.id)).get("status") not in ("queued", "in_progress", None)
                       and r, 10, "alice's old key's run stopped")
    assert ended["status"] == "failed" and ended["error"]["type"] == "invalid_api_key", ended
    # her new key reads what the old one started (the state is the client's), and nothing runs any more
    for gw in team.gws:
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {new_key}"})
                   .status_code == 200, 10, "the new key taken")
    assert post_turn(team.gws[0], {"model": ALL, "input": "hi"}, {"authorization": alice_key}).status_code == 401
    seen = openai_client(team.gws[0], api_key=new_key).responses.retrieve(old.id)
    assert seen.status == "failed" and (seen.error.code, seen.error.type) == ("server_error", "invalid_api_key")
    team.keys["alice-new"] = new_key  # (the fixture checks no key reached a log)
    for gw in team.gws:
        wait_until(lambda: scrape(gw, authorization=f"Bearer {new_key}")[("resp2chat_streams_in_flight", ())] == 0,
                   10, "no turn left running")


def test_a_socket_opened_before_the_first_key_is_refused_once_keys_are_needed(tmp_path, upstream):
    """A loopback gateway without keys, then locked with ``keys add``: its next request without a
    key is a 401, and so is the next message of a WebSocket opened without one before (a socket
    is checked again at each message); before, that socket went on being served without a key."""
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    sock = WSClient(gw.base_url)
    try:
        assert sock.turn({"type": "response.create", "model": ALL, "input": "open"})[-1]["type"] == "response.completed"
        key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401, 10, "keys needed")
        err = ws_error(sock.turn({"type": "response.create", "model": ALL, "input": "still open"}))
        assert err["status"] == 401 and err["error"]["code"] == "invalid_api_key"
        keyed = WSClient(gw.base_url, headers={"authorization": f"Bearer {key}"})
        try:
            done = keyed.turn({"type": "response.create", "model": ALL, "input": "hi"})
            assert done[-1]["type"] == "response.completed"
        finally:
            keyed.close()
    finally:
        sock.close()
        gw.stop()
    assert key not in gw.log()


@uses({"alice": (), "bob": ()})
def test_the_other_reads_of_a_stored_response_are_its_clients_own_on_every_replica(team):
    """What test_each_clients_state… does not ask: a stored response's input items, a compaction
    and a token count that continue it, and the stream of a background one, are unknown ids to
    another client on the other replica (and over its WebSocket, a warm-up continuing it), and
    its owner's on both."""
    created = team.post(0, "alice", {"input": "alice's plan", "background": True, "stream": True})
    first = team.sdk(0, "alice").responses.retrieve(parse_sse(created.content)[0]["response"]["id"])
    wait_until(lambda: team.sdk(1, "alice").responses.retrieve(first.id).status == "completed", 20, "alice's answer")
    base = team.gws[1].base_url
    for name, found in (("bob", False), ("alice", True)):
        auth = {"authorization": f"Bearer {team.keys[name]}"}
        items = requests.get(f"{base}/responses/{first.id}/input_items", headers=auth, timeout=20)
        stream = requests.get(f"{base}/responses/{first.id}?stream=true", headers=auth, timeout=20)
        continuing = [requests.post(f"{base}/responses/{path}", headers=auth, timeout=20,
                                    json={"model": ALL, "input": "and?", "previous_response_id": first.id})
                      for path in ("compact", "input_tokens")]
        sock = team.ws(1, name)
        try:
            warm = sock.turn({"type": "response.create", "model": ALL, "input": "and?", "generate": False,
                              "previous_response_id": first.id})
        finally:
            sock.close()
        if found:
            assert items.status_code == 200 and items.json()["data"][0]["content"][0]["text"] == "alice's plan"
            assert stream.status_code == 200, stream.text
            assert parse_sse(stream.content)[-1]["type"] == "response.completed"
            assert [r.status_code for r in continuing] == [200, 200]
            assert warm[-1]["type"] == "response.completed"
        else:
            for r in (items, stream):
                assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found", r.text
                assert "alice" not in r.text
            for r in continuing:
                assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found", r.text
            assert ws_error(warm)["error"]["code"] == "previous_response_not_found"


def test_a_turn_its_client_leaves_midway_still_spends_tokens(tmp_path, upstream):
    """``tpm`` comes off when a turn ends, by the backend's usage, which comes with its last
    chunk: a client that hangs up before it (over HTTP or the WebSocket) still spent what the
    backend did, so its turn is charged an estimate (its chat request and its output so far, 4
    bytes a token); before, it was charged nothing, and cutting each answer just before its end
    made any tpm moot."""
    key = run_cli(tmp_path, "keys", "add", "carol", "--tpm", "3000").stdout.strip()
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    auth = {"authorization": f"Bearer {key}"}
    long = {"model": ALL, "input": "noreason\nwords: 3000\nslow: 5"}

    def remaining() -> int:
        r = post_turn(gw, {"model": ALL, "input": "hi"}, auth)
        assert r.status_code == 200, r.text
        return int(r.headers["x-ratelimit-remaining-tokens"])

    def idle() -> bool:
        return scrape(gw, **auth)[("resp2chat_streams_in_flight", ())] == 0

    try:
        before = remaining()
        with requests.post(gw.base_url + "/responses", json={**long, "stream": True}, stream=True, timeout=30,
                           headers={**auth, "content-type": "application/json"}) as r:
            deltas = 0
            for line in r.iter_lines():
                deltas += line == b"event: response.output_text.delta"
                if deltas >= 400:
                    break  # (the client hangs up, 400 words in)
        wait_until(idle, 10, "the cut turn over")
        after_http = remaining()
        assert before - after_http > 300, (before, after_http)  # (400 words ≈ 550 tokens; 50 a second come back)
        sock = WSClient(gw.base_url, headers=auth)
        sock.send({"type": "response.create", **long})
        said = ""
        while len(said) < 2400:  # (the socket's deltas come merged: as many characters, ~400 words)
            event = sock.next_message()
            assert event["type"] not in ("response.completed", "error"), event
            said += event.get("delta", "") if event["type"] == "response.output_text.delta" else ""
        sock.sock.close()  # (gone, mid-turn)
        wait_until(idle, 10, "the socket's turn over")
        assert after_http - remaining() > 300
    finally:
        gw.stop()


class Dropper(QuietHandler):
    """A chat backend that, for the model ``cut``, streams ~6000 characters of text and then
    drops the connection (no finish, no usage); for any other, a short whole answer."""

    def do_POST(self):
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        if model != "cut":
            send_sse(self, chat_sse(chat_chunk({"content": "ok"}, "stop")))
            return
        start_sse(self)
        for _ in range(100):
            self.wfile.write(http_chunk(chat_event({"content": "lorem ipsum " * 5})))
        self.wfile.flush()
        self.close_connection = True  # (gone without the body's end)


def test_a_turn_its_backend_cuts_midway_still_spends_tokens(tmp_path):
    """A turn whose backend streamed output and then failed (dropped, stalled, cut short)
    spent what the backend did: its estimate comes off ``tpm`` as a turn its client left does;
    only a turn that failed before any output (a backend that refused it) spends nothing."""
    key = run_cli(tmp_path, "keys", "add", "carol", "--tpm", "20000").stdout.strip()
    with LocalServer(Dropper) as backend:
        gw = start_gateway(backend.url, tmp_path, env=cli_env(tmp_path))
        auth = {"authorization": f"Bearer {key}"}

        def remaining() -> int:
            r = post_turn(gw, {"model": "ok", "input": "hi"}, auth)
            assert r.status_code == 200, r.text
            return int(r.headers["x-ratelimit-remaining-tokens"])

        try:
            before = remaining()
            with requests.post(gw.base_url + "/responses", json={"model": "cut", "input": "hi", "stream": True},
                               headers=auth, stream=True, timeout=30) as r:
                events = parse_sse(r.content)
            assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
            wait_until(lambda: scrape(gw, **auth)[("resp2chat_streams_in_flight", ())] == 0, 10, "the turn over")
            assert before - remaining() > 1000, before  # (6000 characters ≈ 1500 tokens; ~330 a second come back)
        finally:
            gw.stop()


def test_a_gateway_key_changed_in_the_file_is_said_to_need_a_restart(tmp_path, upstream):
    """``gateway_api_key`` is read at start; clients are read again when the file changes. An
    operator who rotates the gateway key in the file is told the running gateway still takes the
    old one (never which), instead of silence; the clients in the same file still reload."""
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True)
    old, new = "gw-key-before-0123456789", "gw-key-after-0123456789"
    path.write_text(yaml.safe_dump({"gateway_api_key": old}))
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    try:
        path.write_text(yaml.safe_dump({"gateway_api_key": new}))
        wait_until(lambda: "gateway_api_key changed in the config file" in gw.log(), 10, "the warning")
        assert post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {old}"}).status_code == 200
        key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()  # (keeps the file's gateway_api_key)
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"},
                                     {"authorization": f"Bearer {key}"}).status_code == 200, 10, "alice taken")
    finally:
        gw.stop()
    assert "restarted" in gw.log() and old not in gw.log() and new not in gw.log() and key not in gw.log()


@uses({"alice": (), "bob": ()})
def test_every_replica_shows_who_fills_the_shared_store(team):
    """Two clients store responses through the openai SDK, each on both replicas (alice goes on
    from her first on the other one): every replica's /metrics shows the whole shared store by
    client, each one's bytes those Redis holds for it, adding up to the store. bob revoked: his
    entries are ``former``'s on both replicas, and no series names him."""
    stored = {"alice": [], "bob": []}
    first = team.sdk(0, "alice").responses.create(model=ALL, input="alice on a")
    team.stored("alice", first.id)
    stored["alice"] += [first.id, team.sdk(1, "alice").responses.create(
        model=ALL, input="alice on b " * 40, previous_response_id=first.id).id]
    stored["bob"] += [team.sdk(1, "bob").responses.create(model=ALL, input="bob on b").id]
    team.sdk(0, "bob").responses.create(model=ALL, input="not kept", store=False)
    for name, ids in stored.items():
        for rid in ids:
            team.stored(name, rid)
    held = {name: sum(len(team.redis.hget(team.key(name, rid), "data")) for rid in ids) for name, ids in stored.items()}
    alice = {"authorization": f"Bearer {team.keys['alice']}"}
    for gw in team.gws:
        m = scrape(gw, **alice)
        assert stored_by(m) == {("alice", "client"): 2, ("bob", "client"): 1, ("", "shared"): 0,
                                ("", "forwarded"): 0, ("", "former"): 0}
        assert stored_by(m, "resp2chat_stored_response_bytes") == {
            ("alice", "client"): held["alice"], ("bob", "client"): held["bob"], ("", "shared"): 0,
            ("", "forwarded"): 0, ("", "former"): 0}
        assert sum(stored_by(m, "resp2chat_stored_response_bytes").values()) == int(
            team.redis.get("resp2chat:entries:bytes"))
    bob_owner = team.owner("bob")
    assert run_cli(team.tmp, "keys", "revoke", "bob").returncode == 0
    for gw in team.gws:
        wait_until(lambda: stored_by(scrape(gw, **alice)).get(("", "former")) == 1, 10, "bob's entries former")
        m = scrape(gw, **alice)
        assert stored_by(m) == {("alice", "client"): 2, ("", "shared"): 0, ("", "forwarded"): 0, ("", "former"): 1}
        assert stored_by(m, "resp2chat_stored_response_bytes")[("", "former")] == held["bob"]
        text = requests.get(gw.base_url.removesuffix("/v1") + "/metrics", headers=alice, timeout=10).text
        assert bob_owner.removeprefix("id.") not in text and team.owner("alice").removeprefix("id.") not in text
