"""Revoking (or rotating) a client's key on a running team gateway, as a team lead does it: the
real ``resp2chat keys`` CLI edits the config file real mitmdump replicas watch.

- The turns of that key that are in flight stop at once, on every replica, whatever carries them
  (an HTTP stream, a JSON turn, a WebSocket turn, a background response, a turn whose gateway's
  tool loop is waiting for a search): the backend call is closed and the client hears
  ``invalid_api_key``. Other clients' turns go on.
- Its open WebSockets, idle or not, are closed by the gateway without waiting for the client
  (an ``error``, ``invalid_api_key``, then a close frame 1008, after the turn in flight has
  stopped): they hold no memory and no slot of ``max_websockets`` any more.
- A gateway that took no keys and is locked with ``keys add`` stops the keyless turns it runs.
- A name revoked and added again (someone else) owns none of its former holder's stored state;
  a rotated key keeps its client's; an entry written before ids keeps its name's.

The backend here is ``helpers.Endless``: its answer never ends by itself, so a turn that is not
stopped never ends, and ``Endless.closed`` says when the gateway hung up on each call.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from types import SimpleNamespace

import openai
import pytest
import requests
import yaml

from helpers import (MITMWEB, Endless, LocalServer, cli_env, config_file, free_port, iter_sse, openai_client, post_turn,
                     run_cli, scrape, start_gateway, wait_until)
from test_teams import ALL, Team
from test_websearch_e2e import BRAVE_KEY, SEARCH_PROMPT, WEB_SEARCH, _Brave
from wsclient import WSClient, opened, refused_upgrade

STOP_WITHIN = 8.0  # seconds from the CLI's edit to a stopped turn: the gate looks at the file every second


def read_until(events, wanted, deadline: float, seen: list) -> dict:
    """The next event of ``events`` (an iterator of dicts) whose type is in ``wanted``, the ones
    before it added to ``seen``; a TimeoutError once ``deadline`` (time.monotonic) is past, as an
    endless stream that is not stopped would read on forever."""
    for event in events:
        seen.append(event)
        if event["type"] in wanted:
            return event
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {wanted} by the deadline; last: {event['type']}")
    raise AssertionError(f"the stream ended without {wanted}: {[e['type'] for e in seen[-5:]]}")


def sdk_events(stream):
    for event in stream:
        yield event.model_dump()


def ws_events(sock: WSClient):
    while True:
        event = sock.next_message()
        if event is None:
            return
        yield event


def assert_stopped(events: list[dict]) -> None:
    """A turn stopped for its key: one ``response.failed`` (``invalid_api_key``) last, the message
    it was writing closed ``incomplete`` before it (Translator._cut, as any failure closes it)."""
    final = events[-1]
    assert final["type"] == "response.failed", final["type"]
    assert (final["response"]["error"]["code"], final["response"]["error"]["type"]) == ("server_error", "invalid_api_key"), \
        final["response"]["error"]
    assert [e["type"] for e in events].count("response.failed") == 1
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert done and done[-1]["item"]["type"] == "message" and done[-1]["item"]["status"] == "incomplete", done
    assert final["response"]["output"][-1]["status"] == "incomplete"


def assert_closed_for_its_key(sock: WSClient, within: float = STOP_WITHIN) -> None:
    """The gateway closes a socket whose key is no longer accepted, without being sent anything:
    an ``error`` (401 ``invalid_api_key``), then a close frame (1008, policy violation)."""
    sock.sock.settimeout(within)
    err = sock.next_message()
    assert err is not None and err["type"] == "error", err
    assert err["status"] == 401 and err["error"]["code"] == "invalid_api_key", err
    assert err["error"]["type"] == "authentication_error", err
    assert sock.next_message() is None and sock.closed is not None, "the socket is still open"
    assert sock.closed[0] == 1008, sock.closed


def running(origin: str, tmp_path, redis_server, clients: dict):
    """test_teams' two replicas sharing Redis, in front of ``origin``, with ``clients``; no key in their logs."""
    t = Team(SimpleNamespace(origin=origin), tmp_path, redis_server, clients)
    yield t
    t.stop()
    for gw in t.gws:
        for key in t.keys.values():
            assert key not in gw.log()


@pytest.fixture
def endless_team(endless, tmp_path, redis_server, request):
    yield from running(endless.url, tmp_path, redis_server, request.param)


@pytest.fixture
def team(upstream, tmp_path, redis_server):
    yield from running(upstream.origin, tmp_path, redis_server, {"alice": ()})


@pytest.mark.parametrize("endless_team", [{"alice": (), "bob": ()}], indirect=True)
def test_a_revoked_keys_turns_in_flight_stop_at_once_on_every_replica_and_transport(endless_team):
    """bob streams over HTTP on replica a, waits for a JSON answer on replica b and runs a turn on
    a WebSocket of replica b; alice streams on replica a. ``keys revoke bob``: each of bob's turns
    ends within seconds — the stream and the socket's turn with ``response.failed``
    (``invalid_api_key``, the message cut ``incomplete``), the JSON turn with a 401 — and each of
    their backend calls is closed; then the gateway closes the socket; alice streams on."""
    team = endless_team
    deadline = time.monotonic() + 60
    bob_stream = team.sdk(0, "bob").responses.create(model=ALL, input="go on", stream=True)
    bob_events: list = []
    bob_iter = sdk_events(bob_stream)
    read_until(bob_iter, {"response.output_text.delta"}, deadline, bob_events)
    alice_stream = team.sdk(0, "alice").responses.create(model=ALL, input="go on", stream=True)
    alice_iter, alice_events = sdk_events(alice_stream), []
    read_until(alice_iter, {"response.output_text.delta"}, deadline, alice_events)
    sock = team.ws(1, "bob")
    sock.send({"type": "response.create", "model": ALL, "input": "go on"})
    ws_iter, ws_seen = ws_events(sock), []
    read_until(ws_iter, {"response.output_text.delta"}, deadline, ws_seen)
    whole: dict = {}
    json_turn = threading.Thread(target=lambda: whole.update(r=team.post(1, "bob", {"input": "go on"})), daemon=True)
    json_turn.start()
    wait_until(lambda: len(Endless.started) == 4, 20, "four backend calls under way")
    assert not Endless.closed

    assert run_cli(team.tmp, "keys", "revoke", "bob").returncode == 0
    revoked_at = time.monotonic()
    stop_by = revoked_at + STOP_WITHIN
    read_until(bob_iter, {"response.failed", "response.completed"}, stop_by, bob_events)
    assert_stopped(bob_events)
    read_until(ws_iter, {"response.failed", "response.completed", "error"}, stop_by, ws_seen)
    assert_stopped(ws_seen)
    json_turn.join(max(stop_by - time.monotonic(), 0.1))
    assert not json_turn.is_alive(), "bob's JSON turn still runs"
    r = whole["r"]
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert r.json()["error"]["type"] == "authentication_error" and r.headers["x-request-id"].startswith("req_")
    # bob's three backend calls were closed; alice's goes on, and so does her stream
    wait_until(lambda: len(Endless.closed) == 3, STOP_WITHIN, "bob's backend calls closed")
    assert time.monotonic() - revoked_at < STOP_WITHIN
    n = len(alice_events)
    read_until(alice_iter, {"response.output_text.delta"}, time.monotonic() + 10, alice_events)
    assert len(alice_events) > n and len(Endless.closed) == 3
    # then the gateway closes the socket, as a new request with bob's key would be refused
    assert_closed_for_its_key(sock)
    sock.close()
    alice_stream.close()
    alice_key = f"Bearer {team.keys['alice']}"
    for gw in team.gws:
        wait_until(lambda: scrape(gw, authorization=alice_key)[("resp2chat_streams_in_flight", ())] == 0, 10,
                   "no turn left in flight")
    records = team.access()
    bob_ends = [rec for rec in records if rec.get("client") == "bob" and rec["status"] != "rejected"]
    assert len(bob_ends) == 3 and all(rec["status"] == "failed" and rec["code"] == "invalid_api_key"
                                      for rec in bob_ends), bob_ends


@pytest.mark.parametrize("endless_team", [{"alice": ()}], indirect=True)
def test_a_rotated_keys_stream_stops_and_the_new_key_goes_on(endless_team):
    """``keys rotate``: the old key's stream in flight stops (``invalid_api_key``) on the replica
    running it; the new key streams."""
    team = endless_team
    deadline = time.monotonic() + 60
    events: list = []
    it = sdk_events(team.sdk(1, "alice").responses.create(model=ALL, input="go on", stream=True))
    read_until(it, {"response.output_text.delta"}, deadline, events)
    out = run_cli(team.tmp, "keys", "rotate", "alice")
    assert out.returncode == 0, out.stderr
    new_key = team.keys["alice-new"] = out.stdout.strip()
    read_until(it, {"response.failed", "response.completed"}, time.monotonic() + STOP_WITHIN, events)
    assert_stopped(events)
    wait_until(lambda: len(Endless.closed) == 1, STOP_WITHIN, "its backend call closed")
    fresh: list = []
    stream = openai_client(team.gws[1], api_key=new_key).responses.create(model=ALL, input="go on", stream=True)
    read_until(sdk_events(stream), {"response.output_text.delta"}, time.monotonic() + 20, fresh)
    stream.close()


def test_keyless_turns_stop_once_keys_add_locks_the_gateway(endless, tmp_path):
    """A loopback gateway without keys, then locked with ``keys add``: what it runs for requests
    that came without a key stops — a background response (stored ``failed``,
    ``invalid_api_key``), an HTTP stream and a WebSocket turn (then its socket is closed) — as
    their next request would be refused."""
    log = tmp_path / "access.jsonl"
    gw = start_gateway(endless.url, tmp_path, "--set", f"resp2chat_access_log_path={log}", env=cli_env(tmp_path))
    try:
        deadline = time.monotonic() + 60
        client = openai_client(gw)
        queued = client.responses.create(model=ALL, input="go on", background=True)
        events: list = []
        it = sdk_events(client.responses.create(model=ALL, input="go on", stream=True))
        read_until(it, {"response.output_text.delta"}, deadline, events)
        sock = WSClient(gw.base_url)
        sock.send({"type": "response.create", "model": ALL, "input": "go on"})
        ws_it, ws_seen = ws_events(sock), []
        read_until(ws_it, {"response.output_text.delta"}, deadline, ws_seen)
        wait_until(lambda: len(Endless.started) == 3, 20, "three backend calls under way")
        key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
        stop_by = time.monotonic() + STOP_WITHIN
        read_until(it, {"response.failed", "response.completed"}, stop_by, events)
        assert_stopped(events)
        read_until(ws_it, {"response.failed", "response.completed", "error"}, stop_by, ws_seen)
        assert_stopped(ws_seen)
        wait_until(lambda: len(Endless.closed) == 3, STOP_WITHIN, "the three backend calls closed")

        def ended() -> list[dict]:
            lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            return [rec for rec in lines if rec["status"] not in ("rejected", "unfinished")]  # (unfinished: the
            # background response's creating request, answered at once; its turn ends as its own record)
        records = wait_until(lambda: len(ended()) == 3 and ended(), 10, "three turns ended")
        assert all(rec["status"] == "failed" and rec["code"] == "invalid_api_key" for rec in records), records
        assert_closed_for_its_key(sock)  # (as its next request would be refused)
        sock.close()
        assert queued.status == "queued"  # (the three: its turn, the stream, the socket's turn)
        assert post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401
        assert key not in gw.log()
    finally:
        gw.stop()


def test_clients_set_in_mitmweb_while_it_runs_stop_a_dropped_keys_turns(endless, tmp_path):
    """An operator who edits ``clients`` in mitmweb's options (its REST API, as its editor does)
    rather than in the file: bob's stream in flight stops (``invalid_api_key``) as a file edit
    stops it, and his key is refused from then on; alice's stream goes on."""
    keys = {name: f"sk-{name}-" + "k" * 32 for name in ("alice", "bob")}
    entries = [{"name": name, "key": key} for name, key in keys.items()]
    web_port, password = free_port(), "web-" + "p" * 24
    gw = start_gateway(endless.url, tmp_path, "--set", "resp2chat_clients=" + json.dumps(entries),
                       "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1", "--set", "web_open_browser=false",
                       "--set", f"web_password={password}", env=cli_env(tmp_path), program=MITMWEB)
    try:
        deadline = time.monotonic() + 60
        streams = {name: sdk_events(openai_client(gw, api_key=key).responses.create(
            model=ALL, input="go on", stream=True)) for name, key in keys.items()}
        seen: dict[str, list] = {name: [] for name in keys}
        for name, it in streams.items():
            read_until(it, {"response.output_text.delta"}, deadline, seen[name])
        xsrf = "x" * 32  # (mitmweb's double-submit check: the same value as cookie and header)
        r = requests.put(f"http://127.0.0.1:{web_port}/options", json={"resp2chat_clients": json.dumps(entries[:1])},
                         headers={"authorization": f"Bearer {password}", "X-XSRFToken": xsrf},
                         cookies={"_mitmproxy_xsrf": xsrf}, timeout=10)
        assert r.status_code == 200, r.text
        read_until(streams["bob"], {"response.failed", "response.completed"}, time.monotonic() + STOP_WITHIN,
                   seen["bob"])
        assert_stopped(seen["bob"])
        wait_until(lambda: len(Endless.closed) == 1, STOP_WITHIN, "bob's backend call closed")
        n = len(seen["alice"])
        read_until(streams["alice"], {"response.output_text.delta"}, time.monotonic() + 10, seen["alice"])
        assert len(seen["alice"]) > n and len(Endless.closed) == 1
        assert post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {keys['bob']}"}).status_code == 401
        for key in keys.values():
            assert key not in gw.log()
    finally:
        gw.stop()


@pytest.fixture
def brave():
    _Brave.queries, _Brave.status, _Brave.hold = [], 200, threading.Event()
    with LocalServer(_Brave) as server:
        yield server.url, _Brave
    _Brave.hold.set()


def test_a_revoked_keys_tool_loop_stops_while_its_search_runs(upstream, tmp_path, brave):
    """A turn whose gateway runs its tool loop (web search): revoked while its search waits on
    Brave, it fails at once (``invalid_api_key``), its web_search_call closed ``failed``, and no
    further round reaches the backend."""
    url, handler = brave
    key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_replay_entries=0",
                       env=cli_env(tmp_path, BRAVE_SEARCH_API_KEY=BRAVE_KEY, RESP2CHAT_BRAVE_BASE_URL=url))
    try:
        upstream.clear()
        events: list = []
        it = sdk_events(openai_client(gw, api_key=key).responses.create(
            model=ALL, input=SEARCH_PROMPT, tools=[WEB_SEARCH], stream=True))
        read_until(it, {"response.web_search_call.searching"}, time.monotonic() + 30, events)
        wait_until(lambda: handler.queries, 10, "the search reaching Brave")  # it waits there now
        assert run_cli(tmp_path, "keys", "revoke", "alice").returncode == 0
        read_until(it, {"response.failed", "response.completed"}, time.monotonic() + STOP_WITHIN, events)
        final = events[-1]
        assert final["type"] == "response.failed" and final["response"]["error"]["type"] == "invalid_api_key"
        calls = [o for o in final["response"]["output"] if o["type"] == "web_search_call"]
        assert [c["status"] for c in calls] == ["failed"], final["response"]["output"]
        assert len(upstream.requests()) == 1  # round 1 only: the loop ran no further round
        assert key not in gw.log()
    finally:
        gw.stop()


# --- whose stored state is whose ------------------------------------------------------------


def test_a_name_revoked_and_added_again_owns_none_of_its_former_holders_state(team):
    """alice leaves (``keys revoke alice``); later someone else is given the name (``keys add
    alice``). The new alice gets none of the old one's stored responses or conversations, on
    either replica (unknown ids: 404, ``previous_response_not_found``), and her own are hers."""
    old = team.sdk(0, "alice")
    secret = old.responses.create(model=ALL, input="the old alice's secret plan")
    conv = old.conversations.create(items=[{"role": "user", "content": "the old alice's notes"}])
    team.stored("alice", secret.id)
    old_owner = team.owner("alice")
    assert run_cli(team.tmp, "keys", "revoke", "alice").returncode == 0
    out = run_cli(team.tmp, "keys", "add", "alice")
    assert out.returncode == 0, out.stderr
    new_key = team.keys["alice-new"] = out.stdout.strip()
    for gw in team.gws:
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {new_key}"})
                   .status_code == 200, 10, "the new alice admitted")
    for replica in (0, 1):
        new = openai_client(team.gws[replica], api_key=new_key)
        for call in (lambda: new.responses.retrieve(secret.id), lambda: new.responses.input_items.list(secret.id),
                     lambda: new.conversations.retrieve(conv.id), lambda: new.conversations.items.list(conv.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as refused:
            new.responses.create(model=ALL, input="and?", previous_response_id=secret.id)
        assert refused.value.code == "previous_response_not_found"
    assert team.owner("alice") != old_owner  # (her state is in a namespace of its own)
    mine = openai_client(team.gws[0], api_key=new_key).responses.create(model=ALL, input="mine now")
    team.stored("alice", mine.id)
    assert openai_client(team.gws[1], api_key=new_key).responses.retrieve(mine.id).output_text == "You said: mine now"


def test_a_client_named_default_owns_its_own_state_not_the_shared_one(upstream, tmp_path):
    """Without ``gateway_api_key``, ``keys add default`` is a client as any other: what it stores
    is its id's. Revoked and added again for someone else, the new holder cannot read the former
    one's response (it could: the name ``default`` was the shared owner whatever its id), nor
    what the gateway stored while it took no keys."""
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_replay_entries=0", env=cli_env(tmp_path))
    try:
        keyless = post_turn(gw, {"model": ALL, "input": "stored before keys"})
        assert keyless.status_code == 200, keyless.text
        first = run_cli(tmp_path, "keys", "add", "default")
        assert first.returncode == 0, first.stderr
        old = {"authorization": f"Bearer {first.stdout.strip()}"}
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401, 10, "keys needed")
        r = post_turn(gw, {"model": ALL, "input": "the former holder's plan"}, old)
        assert r.status_code == 200, r.text
        assert requests.get(f"{gw.base_url}/responses/{keyless.json()['id']}", headers=old, timeout=10).status_code == 404
        assert run_cli(tmp_path, "keys", "revoke", "default").returncode == 0
        second = run_cli(tmp_path, "keys", "add", "default")
        assert second.returncode == 0, second.stderr
        new = {"authorization": f"Bearer {second.stdout.strip()}"}
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, new).status_code == 200, 10, "the new key")
        for rid in (r.json()["id"], keyless.json()["id"]):
            got = requests.get(f"{gw.base_url}/responses/{rid}", headers=new, timeout=10)
            assert got.status_code == 404, got.text
    finally:
        gw.stop()


def test_revoking_the_last_key_does_not_open_a_gateway_that_keys_add_locked(upstream, tmp_path):
    """A loopback gateway started without keys, locked with ``keys add``: revoking that key (a
    leaked one, the only one) refuses every request, with or without a key, until a key is
    added; it opened the gateway to anyone again."""
    gw = start_gateway(upstream.origin, tmp_path, env=cli_env(tmp_path))
    try:
        assert post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 200
        key = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401, 10, "keys needed")
        assert run_cli(tmp_path, "keys", "revoke", "alice").returncode == 0
        wait_until(lambda: "lists no client any more" in gw.log(), 10, "the revoke read")
        for headers in ({}, {"authorization": f"Bearer {key}"}):
            r = post_turn(gw, {"model": ALL, "input": "hi"}, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        bob = run_cli(tmp_path, "keys", "add", "bob").stdout.strip()
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {bob}"})
                   .status_code == 200, 10, "bob's key")
    finally:
        gw.stop()


def test_a_rotated_key_keeps_its_clients_state(team):
    """``keys rotate alice``: the new key reads what the old one stored, on both replicas; the
    old key is refused."""
    old_key = team.keys["alice"]
    stored = team.sdk(0, "alice").responses.create(model=ALL, input="remember this")
    team.stored("alice", stored.id)
    owner = team.owner("alice")
    out = run_cli(team.tmp, "keys", "rotate", "alice")
    assert out.returncode == 0, out.stderr
    new_key = team.keys["alice-new"] = out.stdout.strip()
    assert new_key != old_key and new_key not in out.stderr and "shown only this once" in out.stderr
    assert team.owner("alice") == owner
    for gw in team.gws:
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {old_key}"})
                   .status_code == 401, 10, "the old key refused")
        again = openai_client(gw, api_key=new_key)
        assert again.responses.retrieve(stored.id).output_text == "You said: remember this"
        assert again.responses.create(model=ALL, input="and?", previous_response_id=stored.id).status == "completed"


def test_an_entry_without_an_id_keeps_its_names_state(upstream, tmp_path, redis_server):
    """A config file written before ids (or by hand): its client's state stays under its name
    (``owner:client.NAME``), so nothing stored is lost on upgrade, and ``keys rotate`` keeps it so."""
    key = "hand-written-key-0123456789"
    path = config_file(tmp_path)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_text(yaml.safe_dump({"clients": [{"name": "alice", "key": key}]}))
    path.chmod(0o600)
    gw = start_gateway(upstream.origin, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}",
                       env=cli_env(tmp_path))
    try:
        stored = openai_client(gw, api_key=key).responses.create(model=ALL, input="from before")
        redis = redis_server.client()
        wait_until(lambda: redis.exists(f"resp2chat:owner:client.alice:response:{stored.id}"), 20, "stored by name")
        out = run_cli(tmp_path, "keys", "rotate", "alice")
        assert out.returncode == 0, out.stderr
        new_key = out.stdout.strip()
        assert "id" not in yaml.safe_load(path.read_text())["clients"][0]
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {new_key}"})
                   .status_code == 200, 10, "the new key taken")
        assert openai_client(gw, api_key=new_key).responses.retrieve(stored.id).output_text == "You said: from before"
        assert key not in gw.log() and new_key not in gw.log()
    finally:
        gw.stop()


PATHS = ("/v1/responses", "/v1/embeddings", "/v1/responses/input_tokens")  # (a turn, a passthrough, the token count)


def test_a_key_revoked_while_its_request_body_comes_in_is_refused(upstream, tmp_path):
    """The gate lets a request in at its head; its body may take a while to come. A key revoked
    or rotated meanwhile is refused once the body is in (401 ``invalid_api_key``), not served as
    a request of nobody (no client, no limits) or of the name's new key: a turn, a passthrough
    the backend serves (embeddings) and the token count alike; nothing reaches the backend."""
    cases = [(path, change, f"c{n}{change[:3]}") for n, path in enumerate(PATHS) for change in ("revoke", "rotate")]
    keys = {name: run_cli(tmp_path, "keys", "add", name).stdout.strip() for _, _, name in cases}
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_replay_entries=0", env=cli_env(tmp_path))
    host, port = gw.base_url.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps({"model": ALL, "input": "hi"}).encode()
    try:
        upstream.clear()
        for path, change, name in cases:
            key = keys[name]
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                         f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n".encode())
            out = run_cli(tmp_path, "keys", change, name)  # (the head is in: the gate let it in)
            assert out.returncode == 0, out.stderr
            keys[f"{name}-new"] = out.stdout.strip()
            wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {key}"})
                       .status_code == 401, 10, f"{name}'s key refused once {change}d")
            sock.sendall(body)
            answer = http.client.HTTPResponse(sock)
            answer.begin()
            text = answer.read()
            sock.close()
            assert answer.status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", (path, text[:300])
            assert answer.getheader("x-request-id").startswith("req_")
        # (the turns above that waited for the reload reached it; no embeddings request did)
        assert not [r for r in upstream.requests() if "input" in r]
        for key in keys.values():
            assert not key or key not in gw.log()
    finally:
        gw.stop()


def test_limits_are_counted_for_the_identity_not_the_name(upstream, tmp_path, redis_server):
    """A client's rpm is counted for who holds the name (``ClientSpec.identity``), as its stored
    state is: a name revoked and given to someone else starts with a full allowance on every
    replica (before: the former holder's spent requests, counted by name, refused the newcomer for
    up to a minute), and a rotated key does not start afresh (rotating is no way around a limit)."""
    team = running(upstream.origin, tmp_path, redis_server, {"alice": ("--rpm", "2")})
    t = next(team)
    try:
        def status(replica: int, key: str) -> int:
            return post_turn(t.gws[replica], {"model": ALL, "input": "hi"}, {"authorization": f"Bearer {key}"}).status_code

        def taken(key: str) -> None:  # (asked with a read, which spends nothing)
            for gw in t.gws:
                wait_until(lambda: requests.get(gw.base_url + "/models", headers={"authorization": f"Bearer {key}"},
                                                timeout=10).status_code == 200, 10, "the key taken")

        assert [status(0, t.keys["alice"]), status(1, t.keys["alice"]), status(0, t.keys["alice"])] == [200, 200, 429]
        out = run_cli(t.tmp, "keys", "rotate", "alice")
        assert out.returncode == 0, out.stderr
        rotated = t.keys["alice-rotated"] = out.stdout.strip()
        taken(rotated)
        assert [status(0, rotated), status(1, rotated)] == [429, 429]
        assert run_cli(t.tmp, "keys", "revoke", "alice").returncode == 0
        out = run_cli(t.tmp, "keys", "add", "alice", "--rpm", "2")
        assert out.returncode == 0, out.stderr
        newcomer = t.keys["alice-new"] = out.stdout.strip()
        taken(newcomer)
        assert [status(1, newcomer), status(0, newcomer), status(1, newcomer)] == [200, 200, 429]
    finally:
        next(team, None)


def test_a_revoked_keys_sockets_are_closed_by_the_gateway_and_free_their_slots(endless, tmp_path):
    """bob holds two sockets of a gateway with room for two (max_websockets 2): one idle, one
    with a turn in flight on a backend that never ends; alice's upgrade is refused (503).
    ``keys revoke bob``: without sending anything, the idle socket gets an ``error``
    (``invalid_api_key``) and a close frame (1008); the other's turn stops (``response.failed``),
    then the same. Their slots are free at once: alice's socket opens, and serves her."""
    gw = start_gateway(endless.url, tmp_path, "--set", "resp2chat_max_websockets=2", env=cli_env(tmp_path))
    try:
        alice = {"authorization": f"Bearer {run_cli(tmp_path, 'keys', 'add', 'alice').stdout.strip()}"}
        bob = {"authorization": f"Bearer {run_cli(tmp_path, 'keys', 'add', 'bob').stdout.strip()}"}
        idle = opened(gw.base_url, bob)  # (once the gateway has read bob's key)
        busy = WSClient(gw.base_url, headers=bob)
        busy.send({"type": "response.create", "model": ALL, "input": "go on"})
        seen: list = []
        read_until(ws_events(busy), {"response.output_text.delta"}, time.monotonic() + 30, seen)
        full = refused_upgrade(gw.base_url, alice)
        assert full.status == 503 and json.loads(full.body)["error"]["code"] == "server_overloaded", full.body

        assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
        stop_by = time.monotonic() + STOP_WITHIN
        read_until(ws_events(busy), {"response.failed", "response.completed", "error"}, stop_by, seen)
        assert_stopped(seen)
        assert_closed_for_its_key(busy, max(stop_by - time.monotonic(), 0.1))
        assert_closed_for_its_key(idle, max(stop_by - time.monotonic(), 0.1))
        wait_until(lambda: len(Endless.closed) == 1, STOP_WITHIN, "the turn's backend call closed")
        mine = opened(gw.base_url, alice, within=3)  # (the closed sockets left the gateway's count)
        mine.send({"type": "response.create", "model": ALL, "input": "go on"})
        read_until(ws_events(mine), {"response.output_text.delta"}, time.monotonic() + 30, [])
        another = opened(gw.base_url, alice, within=3)  # (both: bob's two are gone)
        assert refused_upgrade(gw.base_url, alice).status == 503
        for sock in (idle, busy, mine, another):
            sock.close()
        assert "WebSocket" in gw.log() and "closed: its key is no longer accepted" in gw.log()
    finally:
        gw.stop()


def test_a_rotated_keys_open_socket_is_closed_and_holds_no_slot(upstream, tmp_path):
    """carol (max_sockets 1) holds a socket; ``keys rotate carol`` (a leaked key, say): the
    gateway closes that socket (``invalid_api_key``, 1008) without waiting for whoever holds the
    old key, so it holds no slot, neither of the new key's nor of the gateway's max_websockets."""
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_websockets=2", env=cli_env(tmp_path))
    try:
        bob = {"authorization": f"Bearer {run_cli(tmp_path, 'keys', 'add', 'bob').stdout.strip()}"}
        old = {"authorization": f"Bearer {run_cli(tmp_path, 'keys', 'add', 'carol', '--max-sockets', '1').stdout.strip()}"}
        # (the gateway reads its file within about a second: until then it has no clients and lets
        # anyone in, carol's first socket as nobody's; once it refuses no key and takes carol's, it
        # knows carol and her max_sockets, written with her key)
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401, 10, "keys needed")
        wait_until(lambda: requests.get(f"{gw.base_url}/models", headers=old, timeout=10).status_code == 200, 10,
                   "carol's key taken")
        held = opened(gw.base_url, old)
        assert refused_upgrade(gw.base_url, old).status == 429
        out = run_cli(tmp_path, "keys", "rotate", "carol")
        assert out.returncode == 0, out.stderr
        new = {"authorization": f"Bearer {out.stdout.strip()}"}
        assert_closed_for_its_key(held)
        mine = opened(gw.base_url, new, within=3)  # the old key's socket held no slot of carol's
        assert refused_upgrade(gw.base_url, new).status == 429  # (this one does)
        theirs = opened(gw.base_url, bob, within=3)  # nor of the gateway's: two open, carol's and bob's
        full = refused_upgrade(gw.base_url, bob)
        assert full.status == 503 and json.loads(full.body)["error"]["code"] == "server_overloaded"
        for sock in (held, mine, theirs):
            sock.close()
    finally:
        gw.stop()


def _passthrough_stream(gw, key: str) -> tuple[socket.socket, bytes]:
    """A streamed ``POST /v1/chat/completions`` (a ``passthrough_paths`` entry) over a plain
    socket, returned once its first chunk came (the backend's answer never ends by itself), with
    what it read by then (the answer's head, the first chunk)."""
    body = json.dumps({"model": ALL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer %s\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (key.encode(), len(body), body))
    got = b""
    while b"t1 " not in got:
        more = sock.recv(65536)
        assert more, got
        got += more
    assert got.startswith(b"HTTP/1.1 200"), got
    return sock, got


def _ends_within(sock: socket.socket, seconds: float) -> bool:
    """The answer on ``sock`` ends (its connection closed) within ``seconds``."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            pass
        except OSError:
            return True
    return False


def test_a_revoked_keys_passthrough_stream_stops_and_frees_its_slot(endless, tmp_path, redis_server):
    """``passthrough_paths`` with ``POST /v1/chat/completions``: bob (max_streams 1) and alice
    each stream a chat completion straight from the backend, which never ends by itself.
    ``keys revoke bob``: his stream ends at once (its connection closed: its head went long ago),
    the backend call is dropped, and the slot it held (in Redis) is given back; alice's goes on. Before,
    a revoked key's passthrough stream went on for as long as the backend sent.
    The cut is the gateway's doing, so the access log has it (``rejected``, ``invalid_api_key``,
    the head's 200, under the request id the answer's head carried) and
    ``resp2chat_refused_requests_total`` counts it, as a cut for a backend's silence (before:
    neither said anything of it)."""
    access = tmp_path / "access.jsonl"
    gw = start_gateway(endless.url, tmp_path, "--set", "resp2chat_passthrough_paths=POST /v1/chat/completions",
                       "--set", f"resp2chat_state_store_url={redis_server.url}",
                       "--set", f"resp2chat_access_log_path={access}", env=cli_env(tmp_path))
    redis = redis_server.client()
    try:
        alice = run_cli(tmp_path, "keys", "add", "alice").stdout.strip()
        bob = run_cli(tmp_path, "keys", "add", "bob", "--max-streams", "1").stdout.strip()
        wait_until(lambda: post_turn(gw, {"model": ALL, "input": "hi"}).status_code == 401, 10, "keys needed")
        wait_until(lambda: requests.get(f"{gw.base_url}/models", headers={"authorization": f"Bearer {bob}"},
                                        timeout=10).status_code == 404, 10, "bob's key taken")  # (not a passthrough)
        (theirs, _), (his, head) = _passthrough_stream(gw, alice), _passthrough_stream(gw, bob)
        rid = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")
                   if line.lower().startswith(b"x-request-id:"))
        route = ("resp2chat_refused_requests_total", (("client", "bob"), ("code", "invalid_api_key"),
                                                      ("route", "POST /v1/chat/completions"), ("status", "rejected")))
        ident = next(c["id"] for c in yaml.safe_load(config_file(tmp_path).read_text())["clients"] if c["name"] == "bob")
        slots = f"resp2chat:limits:id.{ident}:streams"
        assert redis.zcard(slots) == 1
        assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
        assert _ends_within(his, STOP_WITHIN), "bob's passthrough stream goes on after his key was revoked"
        wait_until(lambda: len(Endless.closed) == 1, 5, "bob's backend call closed")
        wait_until(lambda: redis.zcard(slots) == 0, 5, "bob's slot given back")
        lines = lambda: [json.loads(x) for x in access.read_text().splitlines()] if access.exists() else []  # noqa: E731
        wait_until(lambda: any(x["request_id"] == rid for x in lines()), 10, "bob's cut in the access log")
        line = next(x for x in lines() if x["request_id"] == rid)
        assert (line["path"], line["client"], line["status"], line["code"], line["http_status"]) == \
            ("/v1/chat/completions", "bob", "rejected", "invalid_api_key", 200), line
        wait_until(lambda: scrape(gw, authorization=f"Bearer {alice}").get(route) == 1, 10, "bob's cut counted")
        assert not _ends_within(theirs, 1), "alice's stream stopped too"
        theirs.close()
        his.close()
        wait_until(lambda: scrape(gw, authorization=f"Bearer {alice}")[("resp2chat_streams_in_flight", ())] == 0, 10,
                   "nothing in flight")
        assert "passthrough" in gw.log() and "of client 'bob' stopped: its key is no longer accepted" in gw.log()
    finally:
        gw.stop()
    assert bob not in gw.log() and alice not in gw.log()


def test_a_turn_its_key_was_revoked_for_while_it_was_being_admitted_is_stopped(endless, tmp_path, redis_server):
    """bob's turn has been let in (its key checked) and waits for its limits in Redis, which is
    slow (stopped here); meanwhile ``keys revoke bob`` reloads the gateway's clients, when the
    turn is not in flight yet, so nothing stops it then. Once Redis answers, the turn starts: it
    must stop at once as every turn of that key in flight did, not run on (before, it streamed
    for as long as the backend sent, the revoked key served)."""
    gw = start_gateway(endless.url, tmp_path, "--set", f"resp2chat_state_store_url={redis_server.url}",
                       env=cli_env(tmp_path))
    try:
        bob = {"authorization": f"Bearer {run_cli(tmp_path, 'keys', 'add', 'bob', '--max-streams', '5').stdout.strip()}"}
        # (the gateway takes keys only once it read bob's: before, a keyless request passed too, and
        # that reload could come while Redis was stopped, after the check)
        wait_until(lambda: requests.get(f"{gw.base_url}/models", timeout=10).status_code == 401, 10, "keys needed")
        wait_until(lambda: requests.get(f"{gw.base_url}/models", headers=bob, timeout=10).status_code not in (401, 404),
                   10, "bob's key taken")  # (the model list goes to the backend: whatever it answers)
        redis_server.proc.send_signal(signal.SIGSTOP)
        answer: dict = {}
        try:
            turn = threading.Thread(target=lambda: answer.update(r=requests.post(
                f"{gw.base_url}/responses", json={"model": ALL, "input": "go on", "stream": True}, headers=bob,
                stream=True, timeout=30)))
            turn.start()
            time.sleep(0.5)  # (its key checked: it waits for Redis)
            reloads = gw.log().count("clients reloaded from the config file")
            assert run_cli(tmp_path, "keys", "revoke", "bob").returncode == 0
            # (the gateway's own word that it read the file again: a request of bob's to see it would
            # wait for the stopped Redis itself, its limits, and read a refusal only once that ends)
            wait_until(lambda: gw.log().count("clients reloaded from the config file") > reloads, 10,
                       "bob's key revoked")
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        turn.join(30)
        r = answer["r"]
        assert r.status_code == 200, r.text  # (its stream began: it had been let in)
        seen: list = []
        read_until(iter_sse(r), {"response.failed", "response.completed"}, time.monotonic() + STOP_WITHIN, seen)
        assert seen[-1]["type"] == "response.failed" and seen[-1]["response"]["error"]["type"] == "invalid_api_key"
        wait_until(lambda: len(Endless.closed) == len(Endless.started), 5, "no backend call left")
    finally:
        gw.stop()
