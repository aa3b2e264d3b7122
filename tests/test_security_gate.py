"""Issue 21, track A, through real mitmdump gateways, on HTTP and on the Responses WebSocket alike:
the gateway key never leaves the gateway (1); no configured secret reaches a client or a flow,
and passthrough reaches only ``passthrough_paths`` (2); web pages are refused (Origin, Host, a
turn's content type) (3); a refused body is not read and memory stays flat (4); absolute-form
request targets never reach a backend; HTTPS with ``tls_cert_file``/``tls_key_file``, and a loud
warning beyond loopback without it."""

from __future__ import annotations

import datetime
import gc
import gzip
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest
import requests

from helpers import (
    Codex, KiB, LocalServer, MiB, QuietHandler, chat_chunk, chat_sse, cli_env, http_chunk, memory, openai_client, parse_sse,
    read_flows, run_cli, send_sse, wait_until,
)
from wsclient import Refused, WSClient

GW_KEY = "gw-key-planted-7777abcd"
UP_KEY = "sk-upstream-planted-5555wxyz"


# --- a backend that echoes what it was sent ----------------------------------------------------


class _Echo(QuietHandler):
    """Records every request (request line as sent, headers, body). A chat request gets an SSE
    stream whose text is the Authorization it got; any other path a JSON echo of its
    Authorization, as a header too: to a GET in 5-byte chunks (a secret split between chunks),
    to a POST with its content-length; a path with ``gzip`` in it the same, gzip-compressed."""

    seen: list = []

    def _any(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        type(self).seen.append((self.requestline, {k.lower(): v for k, v in self.headers.items()}, body))
        auth = self.headers.get("authorization", "")
        if self.path.endswith("/chat/completions"):
            data = chat_sse(chat_chunk({"content": f"the backend got {auth!r}"}), chat_chunk(finish="stop"))
            send_sse(self, data)
            return
        payload = json.dumps({"object": "list", "data": [], "echo": auth, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-echo-auth", auth)
        if "gzip" in self.path:
            payload = gzip.compress(payload)
            self.send_header("content-encoding", "gzip")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.command == "POST":  # (a content-length the scrubbed answer no longer matches)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(0, len(payload), 5):
            piece = payload[i:i + 5]
            self.wfile.write(http_chunk(piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _any


@pytest.fixture
def echo():
    """The echoing backend: its ``url``, and ``seen``, what it got."""
    _Echo.seen = []
    with LocalServer(_Echo) as server:
        server.seen = _Echo.seen
        yield server


def raw(port: int, request: bytes, timeout: float = 20, tls: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """One request as these bytes; the answer's status, headers and body (content-length, or
    up to the end of the connection; a 101's head alone)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        conn = tls.wrap_socket(s, server_hostname="localhost") if tls else s
        conn.sendall(request)
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and (head.startswith(b"HTTP/1.1 101") or b"content-length" in head.lower()
                            and len(body) >= int(_headers(head)["content-length"])):
                    break
        except (ConnectionResetError, ssl.SSLError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), _headers(head), body


def _headers(head: bytes) -> dict:
    lines = head.decode("latin-1").split("\r\n")
    return {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}


def upgrade(path: str = "/v1/responses", host: str = "127.0.0.1", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            f"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{extra}\r\n").encode()


def error_of(status_body) -> dict:
    return json.loads(status_body)["error"]


def turn_over_socket(base_url: str, headers: dict | None = None, tls=None, text: str = "hi") -> list[dict]:
    client = WSClient(base_url, headers=headers, tls=tls)
    try:
        return client.turn({"type": "response.create", "model": "m", "input": text})
    finally:
        client.close()


def final_text(events: list[dict]) -> str:
    assert events[-1]["type"] == "response.completed", events[-1]
    return events[-1]["response"]["output"][-1]["content"][0]["text"]


# --- 1. the gateway key never leaves the gateway ------------------------------------------------


PROBES = [  # (method, path, the client's credential header): what the issue sent
    ("GET", "/admin", "authorization"), ("GET", "/V1/MODELS", "authorization"), ("GET", "/v1", "authorization"),
    ("GET", "/models", "x-api-key"), ("OPTIONS", "/responses", "authorization"), ("PATCH", "/responses", "authorization"),
    ("OPTIONS", "/v1/responses", "x-api-key"), ("DELETE", "/v1/responses", "authorization"),
    ("GET", "/v1/files", "authorization"), ("POST", "/v1/files", "x-api-key"), ("GET", "/v1/organization/costs", "authorization"),
]


def test_the_gateway_key_never_reaches_a_backend(echo, gateway_factory):
    gw = gateway_factory(echo.url, "--set", f"resp2chat_gateway_api_key={GW_KEY}", "--set", "resp2chat_max_replay_entries=0")
    origin = f"http://127.0.0.1:{gw.port}"
    for method, path, header in PROBES:
        value = f"Bearer {GW_KEY}" if header == "authorization" else GW_KEY
        r = requests.request(method, origin + path, headers={header: value}, data=b"{}" if method != "GET" else None,
                             timeout=20)
        assert r.status_code in (404, 405), (method, path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] in ("unknown_path", "method_not_allowed") and r.headers["x-request-id"].startswith("req_")
        assert "passthrough_paths" in err["message"] or r.status_code == 405, err
    assert echo.seen == []  # none of them reached the backend
    # what passthrough_paths lets through, a turn over HTTP and one over the WebSocket: no gateway key
    auth = {"authorization": f"Bearer {GW_KEY}"}
    assert requests.get(gw.base_url + "/models", headers=auth, timeout=20).status_code == 200
    assert requests.get(gw.base_url + "/models", headers={"x-api-key": GW_KEY}, timeout=20).status_code == 200
    assert requests.post(gw.base_url + "/embeddings", json={"input": "x"}, headers=auth, timeout=20).status_code == 200
    r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, headers=auth, timeout=20)
    assert r.status_code == 200, r.text
    assert "the backend got ''" in final_text(turn_over_socket(gw.base_url, auth))
    assert [line.split()[1] for line, _, _ in echo.seen] == ["/v1/models", "/v1/models", "/v1/embeddings",
                                                           "/v1/chat/completions", "/v1/chat/completions"]
    for line, headers, body in echo.seen:
        assert GW_KEY not in line + json.dumps(headers) + body.decode("utf-8", "replace"), (line, headers)


def test_credentials_in_the_url_are_refused_and_never_kept(echo, gateway_factory, tmp_path):
    """A key put in the request URL (a query parameter named like a credential, or any configured
    secret anywhere in the target, plain or percent-encoded) is a 400 that names it, on every path
    and on the WebSocket's upgrade: it reached the backend, the log and the flow file before (the
    gate re-authorizes headers, not the URL). A plain query still passes."""
    flows = tmp_path / "flows.mitm"
    gw = gateway_factory(echo.url, "--set", f"resp2chat_gateway_api_key={GW_KEY}", "-w", str(flows),
                         "--set", "flow_detail=4", "--set", "resp2chat_max_replay_entries=0",
                         env={"RESP2CHAT_UPSTREAM_API_KEY": UP_KEY})
    auth = {"authorization": f"Bearer {GW_KEY}"}
    client_key = "a-client-key-nobody-configured"
    origin = f"http://127.0.0.1:{gw.port}"
    for target, headers in ((f"/v1/models?api_key={GW_KEY}", auth), (f"/v1/models?api_key={GW_KEY}", {}),
                            (f"/v1/models?x=1&Key={client_key}", auth), (f"/v1/models?access_token={client_key}", auth),
                            (f"/v1/models/{GW_KEY}", auth), (f"/v1/models?q={GW_KEY.replace('-', '%2D')}", auth),
                            (f"/v1/models?api%5Fkey={client_key}", auth), (f"/healthz?key={GW_KEY}", {}),
                            (f"/v1/files?token={client_key}", auth)):
        r = requests.get(origin + target, headers=headers, timeout=20)
        assert r.status_code == 400, (target, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "credential_in_url" and "Authorization" in err["message"], err
        assert r.headers["x-request-id"].startswith("req_")
    r = requests.post(gw.base_url + f"/responses?token={client_key}", json={"model": "m", "input": "hi"},
                      headers=auth, timeout=20)
    assert r.status_code == 400 and r.json()["error"]["code"] == "credential_in_url"
    with pytest.raises(Refused) as refused:
        WSClient(gw.base_url, path=f"/responses?api_key={GW_KEY}", headers=auth)
    assert refused.value.status == 400 and error_of(refused.value.body)["code"] == "credential_in_url"
    assert echo.seen == []
    # a query that holds no credential goes on as before, on both transports
    r = requests.get(gw.base_url + "/models?limit=5&after=x", headers=auth, timeout=20)
    assert r.status_code == 200 and r.json()["path"] == "/v1/models?limit=5&after=x"
    assert "the backend got" in final_text(turn_over_socket(gw.base_url, auth))
    gw.stop()
    said = gw.log() + flows.read_bytes().decode("latin-1")
    assert GW_KEY not in said and client_key not in said and GW_KEY.replace("-", "%2D") not in said
    assert "[redacted]" in gw.log()  # (the refused requests are shown, without the key)


# --- 2. no secret reaches a client or a flow; passthrough is an allowlist -----------------------


def test_no_configured_secret_reaches_a_client_or_a_flow(echo, gateway_factory, tmp_path):
    flows = tmp_path / "flows.mitm"
    gw = gateway_factory(echo.url, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0",
                         "--set", "flow_detail=4", "--set", "termlog_verbosity=debug",
                         env={"RESP2CHAT_UPSTREAM_API_KEY": UP_KEY})
    got = []
    for r in (requests.get(gw.base_url + "/models", timeout=20),
              requests.get(gw.base_url + "/models/some/model%2Fid?x=1", timeout=20),
              requests.post(gw.base_url + "/embeddings", json={"input": "x", "model": "m"}, timeout=20)):
        assert r.status_code == 200, r.text
        assert r.json()["echo"] == "Bearer [redacted]" and r.headers["x-echo-auth"] == "Bearer [redacted]"
        got.append(r.text + json.dumps(dict(r.headers)))
    # the upstream key did go upstream, to the paths passthrough_paths allows, and only there
    assert [line.split()[1] for line, _, _ in echo.seen] == ["/v1/models", "/v1/models/some/model%2Fid?x=1",
                                                           "/v1/embeddings"]
    assert all(h["authorization"] == f"Bearer {UP_KEY}" for _, h, _ in echo.seen)
    # everything else is a 404 that names the setting, and reaches nothing
    for path in ("/files", "/batches", "/fine_tuning/jobs", "/organization/costs", "/models/../files",
                 "/models/%2e%2e/files", "/audio/speech"):
        r = requests.post(gw.base_url + path, json={}, timeout=20) if "speech" in path else \
            requests.get(gw.base_url + path, timeout=20)
        assert r.status_code == 404 and "passthrough_paths" in r.json()["error"]["message"], (path, r.text)
    assert len(echo.seen) == 3
    # a compressed answer cannot be checked: a 502, and the key stays out of it
    r = requests.get(gw.base_url + "/models/gzip", timeout=20)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_encoded" and UP_KEY not in r.text
    # turns: HTTP (streamed and whole) and WebSocket
    events = parse_sse(requests.post(gw.base_url + "/responses", json={"model": "m", "input": "x", "stream": True},
                                     timeout=20).content)
    whole = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "x"}, timeout=20)
    socket_events = turn_over_socket(gw.base_url)
    for text in (final_text(events), final_text(socket_events), whole.text):
        assert "[redacted]" in text and UP_KEY not in text
    got += [json.dumps(events), json.dumps(socket_events), whole.text]
    gw.stop()
    assert all(UP_KEY not in text for text in got + [gw.log()])
    saved = flows.read_bytes()
    assert UP_KEY.encode() not in saved
    assert len(read_flows(flows)) >= 10


def test_passthrough_paths_is_the_allowlist(echo, gateway_factory):
    gw = gateway_factory(echo.url, "--set", "resp2chat_passthrough_paths=GET /v1/files",
                         "--set", "resp2chat_passthrough_paths=/v1/things/*",
                         env={"RESP2CHAT_UPSTREAM_API_KEY": UP_KEY})
    r = requests.get(gw.base_url + "/files?purpose=x", timeout=20)
    assert r.status_code == 200 and r.json()["echo"] == "Bearer [redacted]"
    assert requests.delete(gw.base_url + "/files", timeout=20).status_code == 405
    assert requests.put(gw.base_url + "/things/a/b", data=b"{}", timeout=20).status_code == 200  # any method
    r = requests.get(gw.base_url + "/models", timeout=20)  # not listed any more
    assert r.status_code == 404 and "GET /v1/files, /v1/things/*" in r.json()["error"]["message"]
    assert [line.split()[:2] for line, _, _ in echo.seen] == [["GET", "/v1/files?purpose=x"], ["PUT", "/v1/things/a/b"]]
    with pytest.raises(RuntimeError) as failed:
        gateway_factory(echo.url, "--set", "resp2chat_passthrough_paths=GET /v1/../files")
    assert "passthrough_paths" in str(failed.value) and "'GET /v1/../files'" in str(failed.value)


def test_a_client_limited_to_some_models_passes_through_with_those_only(echo, gateway_factory):
    """``clients``' ``models`` hold on ``passthrough_paths`` too: a limited client's POST there
    (embeddings) names one of its models in its JSON body, or it is refused (404
    ``model_not_found`` as for a turn, 400 without a model) and reaches no backend; before, it
    embedded with any model the backend had. A client with every model, and GETs, go on as before."""
    carol, alice = "carol-key-0123456789abcdef", "alice-key-0123456789abcdef"
    gw = gateway_factory(echo.url, env={"RESP2CHAT_CLIENTS": json.dumps([
        {"name": "carol", "key": carol, "models": ["qwen3-*"]}, {"name": "alice", "key": alice}])})

    def embed(key: str, body) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(gw.base_url + "/embeddings", data=data, timeout=20,
                             headers={"authorization": f"Bearer {key}", "content-type": "application/json"})

    for body, status, code in (({"model": "other-embedder", "input": "x"}, 404, "model_not_found"),
                               ({"model": "qwen3", "input": "x"}, 404, "model_not_found"),  # (globs match whole names)
                               ({"input": "x"}, 400, "missing_required_parameter"),
                               ({"model": ["qwen3-embed"], "input": "x"}, 400, "missing_required_parameter"),
                               (b"not json", 400, "invalid_json")):
        r = embed(carol, body)
        assert r.status_code == status and r.json()["error"]["code"] == code, (body, r.status_code, r.text)
        assert r.json()["error"]["param"] in ("model", None) and r.headers["x-request-id"].startswith("req_")
    assert echo.seen == []
    assert embed(carol, {"model": "qwen3-embed", "input": "x"}).status_code == 200
    assert embed(alice, {"model": "other-embedder", "input": "x"}).status_code == 200
    r = requests.get(gw.base_url + "/models", headers={"authorization": f"Bearer {carol}"}, timeout=20)
    assert r.status_code == 200
    assert [(line.split()[1], json.loads(body).get("model") if body else None) for line, _, body in echo.seen] == [
        ("/v1/embeddings", "qwen3-embed"), ("/v1/embeddings", "other-embedder"), ("/v1/models", None)]


def test_a_limited_client_cannot_name_the_model_twice_in_a_passthrough_body(echo, gateway_factory):
    """A body that names ``model`` twice is read by the gateway (Python's json) with the last,
    while a backend may take the first: a client limited to some models got a model it may not
    use embedded by naming an allowed one last. Refused now: 400 ``invalid_value`` naming
    ``model``, whatever spelling the key has (an escape is the same key) and however large the
    body (decoded in the worker); nothing reaches the backend. A key twice deeper in the body,
    or a client with every model, changes nothing."""
    carol, alice = "carol-key-0123456789abcdef", "alice-key-0123456789abcdef"
    gw = gateway_factory(echo.url, env={"RESP2CHAT_CLIENTS": json.dumps([
        {"name": "carol", "key": carol, "models": ["qwen3-*"]}, {"name": "alice", "key": alice}])})

    def embed(key: str, data: bytes) -> requests.Response:
        return requests.post(gw.base_url + "/embeddings", data=data, timeout=60,
                             headers={"authorization": f"Bearer {key}", "content-type": "application/json"})

    big = json.dumps("x" * (2 << 20))  # (past offload.LARGE: decoded in the worker thread)
    for data in (b'{"model": "other-embedder", "model": "qwen3-embed", "input": "x"}',
                 b'{"model": "qwen3-embed", "input": "x", "mod\\u0065l": "qwen3-embed"}',
                 b'{"model": "other-embedder", "input": ' + big.encode() + b', "model": "qwen3-embed"}'):
        r = embed(carol, data)
        assert r.status_code == 400, (data[:80], r.status_code, r.text)
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("model", "invalid_value") and "more than once" in err["message"]
        assert r.headers["x-request-id"].startswith("req_")
    assert echo.seen == []
    nested = b'{"model": "qwen3-embed", "input": "x", "extra": {"model": "a", "model": "b"}}'
    assert embed(carol, nested).status_code == 200
    assert embed(alice, b'{"model": "other-embedder", "model": "qwen3-embed", "input": "x"}').status_code == 200
    assert len(echo.seen) == 2


def test_a_team_gateway_without_a_valid_key_and_where_keys_never_show(echo, gateway_factory, tmp_path):
    """A team's gateway (clients made with ``resp2chat keys add``: only their SHA-256 in the
    file): without a valid key (none, an unknown one, the upstream's, in either header) every
    route it serves, the WebSocket's upgrade and ``/metrics`` included, is the same 401 JSON with
    its own ``x-request-id``, whether the id or path exists or not; nothing reaches the backend.
    With valid keys, refused and served requests alike, at mitmdump's most verbose output, no
    client key and no upstream key is in the log, the flow file, the access log or /metrics."""
    keys = {}
    for name, flags in {"alice": (), "carol": ("--rpm", "1", "--models", "qwen3-*")}.items():
        out = run_cli(tmp_path, "keys", "add", name, *flags)
        assert out.returncode == 0, out.stderr
        keys[name] = out.stdout.strip()
    flows, access, app = tmp_path / "flows.mitm", tmp_path / "access.jsonl", "https://app.example"
    gw = gateway_factory(echo.url, "-w", str(flows), "--set", "flow_detail=4", "--set", "termlog_verbosity=debug",
                         "--set", f"resp2chat_access_log_path={access}", "--set", f"resp2chat_allowed_origins={app}",
                         "--set", "resp2chat_max_replay_entries=0",
                         env=cli_env(tmp_path, RESP2CHAT_UPSTREAM_API_KEY=UP_KEY))
    alice, carol = ({"authorization": f"Bearer {keys[n]}"} for n in ("alice", "carol"))
    origin = f"http://127.0.0.1:{gw.port}"
    stored = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "alice's"}, headers=alice,
                           timeout=20)
    assert stored.status_code == 200, stored.text
    rid = stored.json()["id"]
    routes = [("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/m"), ("HEAD", "/v1/models"),
              ("POST", "/v1/embeddings"), ("GET", f"/v1/responses/{rid}"), ("GET", "/v1/responses/resp_nobody"),
              ("DELETE", f"/v1/responses/{rid}"), ("GET", f"/v1/responses/{rid}/input_items"),
              ("POST", f"/v1/responses/{rid}/cancel"), ("GET", f"/v1/responses/{rid}?stream=true"),
              ("POST", "/v1/responses"), ("POST", "/v1/responses/compact"), ("POST", "/v1/responses/input_tokens"),
              ("POST", "/v1/conversations"), ("GET", "/v1/conversations/conv_0123"), ("GET", "/v1/responses"),
              ("PUT", "/v1/responses"), ("OPTIONS", "/v1/responses"), ("GET", "/v1/files"), ("GET", "/"),
              ("GET", "/admin")]
    wrong = "r2c-" + "x" * 43
    bodies, ids = set(), set()
    for creds in ({}, {"authorization": f"Bearer {wrong}"}, {"x-api-key": wrong}, {"authorization": f"Bearer {UP_KEY}"},
                  {"authorization": "Bearer"}, {"authorization": f"Bearer {keys['alice']}x"}):
        for method, path in routes:
            r = requests.request(method, origin + path, headers=creds, timeout=20,
                                 data=b"{}" if method in ("POST", "PUT") else None)
            assert r.status_code == 401 and r.headers["content-type"] == "application/json", (creds, method, path)
            assert r.headers["x-request-id"].startswith("req_") and r.headers["x-request-id"] not in ids
            ids.add(r.headers["x-request-id"])
            if method != "HEAD":
                bodies.add(r.content)
        status, headers, answer = raw(gw.port, upgrade(extra="".join(f"{k}: {v}\r\n" for k, v in creds.items())))
        assert status == 401 and headers["x-request-id"].startswith("req_"), (creds, status)
        bodies.add(answer)
    assert len(bodies) == 1, bodies  # one answer: nothing said of the path, the id or the key
    err = error_of(bodies.pop())
    assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")
    # a page of an allowed origin reads the 401 (CORS headers on it); its preflight needs no key
    r = requests.post(gw.base_url + "/responses", json={}, headers={"origin": app}, timeout=20)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == app
    r = requests.options(gw.base_url + "/responses", headers={"origin": app, "access-control-request-method": "POST"},
                         timeout=20)
    assert r.status_code == 204 and r.content == b""
    assert [line.split()[1] for line, _, _ in echo.seen] == ["/v1/chat/completions"]
    # valid keys: served, and refused at the gate or by a limit, on both transports
    assert requests.get(origin + "/metrics", headers=alice, timeout=20).status_code == 200
    assert "the backend got" in final_text(turn_over_socket(gw.base_url, {"x-api-key": keys["alice"]}))
    refused = [requests.get(gw.base_url + "/models", headers={**alice, "host": "evil.example"}, timeout=20),
               requests.get(gw.base_url + "/models", headers={**alice, "origin": "https://evil.example"}, timeout=20),
               requests.post(gw.base_url + "/responses", data=b"{}", headers={**alice, "content-type": "text/plain"},
                             timeout=20),
               requests.get(gw.base_url + f"/models?api_key={keys['alice']}", headers=alice, timeout=20),
               requests.post(gw.base_url + "/responses", json={"model": "m", "input": "x"}, headers=carol, timeout=20),
               requests.post(gw.base_url + "/responses", json={"model": "qwen3-a", "input": "x"}, headers=carol,
                             timeout=20)]  # (rpm 1: the refused turn before spent it)
    assert [r.status_code for r in refused] == [403, 403, 415, 400, 404, 429]
    with pytest.raises(Refused):
        WSClient(gw.base_url, headers={**carol, "origin": "https://evil.example"})
    metrics = requests.get(origin + "/metrics", headers=carol, timeout=20).text
    gw.stop()
    said = {"log": gw.log(), "flows": flows.read_bytes().decode("latin-1"), "access log": access.read_text(),
            "metrics": metrics, "answers": "".join(r.text + json.dumps(dict(r.headers)) for r in refused)}
    assert "[redacted]" in said["log"]  # (the refused requests are shown, their credentials redacted)
    for where, text in said.items():
        for secret in (*keys.values(), UP_KEY):
            assert secret not in text, (where, secret)


# --- 3. web pages: Origin, Host (DNS rebinding), a turn's content type ---------------------------


def test_web_pages_are_refused(echo, gateway_factory):
    gw = gateway_factory(echo.url, "--set", "resp2chat_max_replay_entries=0")  # loopback, no key
    port, turn = gw.port, {"model": "m", "input": "hi"}
    evil = {"origin": "https://evil.example"}
    r = requests.post(gw.base_url + "/responses", json=turn, headers=evil, timeout=20)
    assert r.status_code == 403 and error_of(r.content)["code"] == "origin_not_allowed"
    assert error_of(r.content)["param"] == "allowed_origins" and "access-control-allow-origin" not in r.headers
    assert requests.get(gw.base_url + "/models", headers=evil, timeout=20).status_code == 403
    # a sandboxed frame or a file:// page sends "null"; a page on the gateway's own address is a page too
    for page in ("null", f"http://127.0.0.1:{port}"):
        assert requests.post(gw.base_url + "/responses", json=turn, headers={"origin": page}, timeout=20).status_code == 403
        with pytest.raises(Refused):
            WSClient(gw.base_url, headers={"origin": page})
    r = requests.options(gw.base_url + "/responses", headers={**evil, "access-control-request-method": "POST"}, timeout=20)
    assert r.status_code == 403
    # a turn that is not JSON (text/plain, or no content type: no preflight in a browser)
    r = requests.post(gw.base_url + "/responses", data=json.dumps(turn), headers={"content-type": "text/plain"}, timeout=20)
    assert r.status_code == 415 and error_of(r.content)["code"] == "unsupported_media_type"
    body = json.dumps(turn).encode()
    status, _, answer = raw(port, b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: %d\r\n"
                                  b"connection: close\r\n\r\n%s" % (len(body), body))
    assert status == 415 and "application/json" in error_of(answer)["message"]
    for ctype in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = requests.post(gw.base_url + "/responses", data=body, headers={"content-type": ctype}, timeout=20)
        assert r.status_code == 200, (ctype, r.text)
    # DNS rebinding: a name that is not the gateway's, however it resolved
    for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1.nip.io"):
        status, _, answer = raw(port, f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        assert status == 403 and error_of(answer)["param"] == "public_hosts", (host, answer)
    status, _, answer = raw(port, b"GET /v1/models HTTP/1.1\r\nconnection: close\r\n\r\n")  # no Host at all
    assert status == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "app.localhost"):
        assert raw(port, f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())[0] == 200
    # the same on the WebSocket
    with pytest.raises(Refused) as refused:
        WSClient(gw.base_url, headers=evil)
    assert refused.value.status == 403 and error_of(refused.value.body)["code"] == "origin_not_allowed"
    status, _, answer = raw(port, upgrade(host=f"evil.example:{port}"))
    assert status == 403 and error_of(answer)["code"] == "host_not_allowed"
    assert [line.split()[1] for line, _, _ in echo.seen] == ["/v1/chat/completions"] * 2 + ["/v1/models"] * 4


def test_allowed_origins_and_public_hosts(echo, gateway_factory):
    app = "https://app.example"
    gw = gateway_factory(echo.url, "--set", f"resp2chat_allowed_origins={app}",
                         env={"RESP2CHAT_PUBLIC_HOSTS": "gw.example.com,*.corp.example"})
    r = requests.options(gw.base_url + "/responses", timeout=20, headers={
        "origin": app, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == app
    assert r.headers["access-control-allow-methods"] == "POST"
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, headers={"origin": app}, timeout=20)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app
    assert "x-request-id" in r.headers["access-control-expose-headers"] and r.headers["vary"] == "Origin"
    r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"},
                      headers={"origin": "https://app.example.evil"}, timeout=20)
    assert r.status_code == 403
    for host in ("gw.example.com", "gw.example.com:443", "a.corp.example"):
        status, _, _ = raw(gw.port, f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        assert status == 200, host
    assert raw(gw.port, b"GET /v1/models HTTP/1.1\r\nhost: corp.example.evil\r\nconnection: close\r\n\r\n")[0] == 403
    assert "the backend got" in final_text(turn_over_socket(gw.base_url, {"origin": app}))


# --- 4. a refused body is not read; memory stays flat -------------------------------------------


def push(port: int, head: bytes, total: int, chunked: bool) -> tuple[int, bytes]:
    """Send ``head`` and up to ``total`` bytes of body as fast as the gateway takes them; how
    much it took before it ended the connection, and its answer."""
    piece = b"x" * (1 << 20)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        try:
            while sent < total:
                s.sendall(http_chunk(piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    return sent, answer


# an operator's addon loaded after the gateway that asks mitmproxy, in the same hook, to stream every
# request body (``True``) or to read it whole (``False``): neither may make it read a refused one
OPERATOR_STREAM = """
class Operator:
    def requestheaders(self, flow):
        flow.request.stream = {stream}


addons = [Operator()]
"""


@pytest.mark.parametrize("operator", [None, True, False], ids=["gateway", "addon-streams", "addon-reads-whole"])
def test_refused_bodies_are_not_read_and_memory_stays_flat(operator, echo, gateway_factory, tmp_path):
    """A request refused at its head (no key, too large, of unknown length) is answered at once,
    its connection closed after at most a few MiB of its body, none of it held: also when an
    operator's addon after the gateway's sets ``request.stream`` in the same hook (mitm_head.py
    ``_refusal_stands``; before, ``True`` had the body read whole into memory, without bound, and
    the answer only once it was in)."""
    hook = ()
    if operator is not None:
        script = tmp_path / "operator.py"
        script.write_text(OPERATOR_STREAM.format(stream=operator))
        hook = ("-s", str(script))
    gw = gateway_factory(echo.url, "--set", f"resp2chat_gateway_api_key={GW_KEY}", "--set", "flow_detail=0", *hook)
    port, big = gw.port, 200 << 20
    post = f"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
    before = memory(gw.proc.pid)
    cases = [  # (head, chunked, status, code)
        (post + "transfer-encoding: chunked\r\n\r\n", True, 401, "invalid_api_key"),  # no key, chunked
        (post + f"content-length: {big}\r\n\r\n", False, 401, "invalid_api_key"),  # no key, declared
        (post + f"authorization: Bearer {GW_KEY}\r\ncontent-length: {big}\r\n\r\n", False, 413, "request_too_large"),
        (post + f"authorization: Bearer {GW_KEY}\r\ntransfer-encoding: chunked\r\n\r\n", True, 411, "length_required"),
        (f"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: wrong\r\ncontent-length: {big}\r\n\r\n",
         False, 401, "invalid_api_key"),
    ]
    for head, chunked, status, code in cases:
        started = time.monotonic()
        sent, answer = push(port, head.encode(), big, chunked)
        top, _, body = answer.partition(b"\r\n\r\n")
        assert top.startswith(b"HTTP/1.1 %d" % status), (head, answer[:300])
        assert b"connection: close" in top.lower() and b"x-request-id: req_" in top.lower()
        assert error_of(body)["code"] == code
        assert sent < 64 << 20, f"the gateway read {sent >> 20} MiB of a refused body"  # (socket buffers: a few MiB)
        assert time.monotonic() - started < 15
    after = memory(gw.proc.pid)
    assert after["VmHWM"] - before["VmHWM"] < 30_000 * KiB, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 30_000 * KiB, (before, after)
    assert echo.seen == []
    # real clients read the early answer: the openai SDK (httpx), requests (urllib3), curl
    client = openai_client(gw, api_key="wrong-key")
    with pytest.raises(openai.AuthenticationError):
        client.responses.create(model="m", input="x" * (40 << 20))
    r = requests.post(gw.base_url + "/responses", data=b"x" * (40 << 20), timeout=30,
                      headers={"authorization": f"Bearer {GW_KEY}", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--data-binary", "@-",
                          "-H", "content-type: application/json", gw.base_url + "/responses"],
                         input=b"x" * (40 << 20), capture_output=True, timeout=60)
    assert out.stdout.endswith(b"\n401") and b"invalid_api_key" in out.stdout, out
    assert memory(gw.proc.pid)["VmHWM"] - before["VmHWM"] < 60_000 * KiB  # (the clients' bodies were not held either)
    # and the gateway serves as before: the same connection pattern, with the key
    ok = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, timeout=20,
                       headers={"authorization": f"Bearer {GW_KEY}"})
    assert ok.status_code == 200
    # the WebSocket's upgrade is refused at its head like any request
    with pytest.raises(Refused) as refused:
        WSClient(gw.base_url)
    assert refused.value.status == 401


def _cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used so far (user and system), in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_rate_limited_clients_socket_messages_are_refused_before_they_are_read(echo, gateway_factory):
    """A client at its rpm is refused before its request is decoded, on HTTP (437c1ba) and on the
    Responses WebSocket alike: every message is admitted first (a warm-up too: no flag to read
    first). Before, the socket decoded each message in full (turns.decode, then parse_message)
    and only then asked the limits: 8 messages of 10 MiB made of millions of small JSON values
    (a client may send them without end) cost the gateway ~15 s of CPU for their 429s. Now
    about what 8 messages as large cost that are refused at their first byte (invalid JSON):
    the transport's share (mitmproxy and the relay each read a 10 MiB message)."""
    keys = {"carol": "carol-key-0123456789abcdef", "alice": "alice-key-0123456789abcdef"}
    gw = gateway_factory(echo.url, "--set", "resp2chat_max_replay_entries=0", env={"RESP2CHAT_CLIENTS": json.dumps(
        [{"name": "carol", "key": keys["carol"], "rpm": 1}, {"name": "alice", "key": keys["alice"]}])})
    carol = {"authorization": f"Bearer {keys['carol']}"}
    r = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi"}, headers=carol, timeout=20)
    assert r.status_code == 200, r.text  # (its one request of the minute)
    heavy = '{"type":"response.create","model":"m","input":"hi","x":[' + \
        ",".join(["[]"] * (10 * MiB // 3)) + "]}"

    def refusals(name: str, message: str) -> tuple[list, float]:
        """8 times ``message`` from ``name``: the errors, and the gateway's CPU seconds for them."""
        client = WSClient(gw.base_url, headers={"authorization": f"Bearer {keys[name]}"}, timeout=120)
        before, errors = _cpu_seconds(gw.proc.pid), []
        for _ in range(8):
            client.send(message)
            error = client.next_message()
            errors.append((error.get("status"), (error.get("error") or {}).get("code")))
        spent = _cpu_seconds(gw.proc.pid) - before
        client.close()
        return errors, spent

    unread, floor = refusals("alice", "n" * len(heavy))
    assert unread == [(400, "invalid_json")] * 8, unread
    limited, spent = refusals("carol", heavy)
    assert limited == [(429, "rate_limit_exceeded")] * 8, limited
    assert spent < floor + 1.0, f"8 messages refused with 429 cost the gateway {spent:.1f} s of CPU ({floor:.1f} s: " \
        "8 as large refused at their first byte)"
    assert len(echo.seen) == 1


# --- absolute-form request targets ---------------------------------------------------------------


def test_absolute_form_targets_never_reach_a_backend(echo, gateway_factory):
    gw = gateway_factory(echo.url, "--set", "resp2chat_max_replay_entries=0")
    port = gw.port
    status, _, _ = raw(port, f"GET http://127.0.0.1:{port}/v1/models?a=1 HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                             "connection: close\r\n\r\n".encode())
    assert status == 200
    body = b'{"model": "m", "input": "hi"}'
    status, _, _ = raw(port, b"POST http://127.0.0.1:%d/v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                             b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                       % (port, len(body), body))
    assert status == 200
    # an absolute URL naming another host is a request for another host: refused like its Host
    status, _, answer = raw(port, f"GET http://evil.example/v1/models HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                                  "connection: close\r\n\r\n".encode())
    assert status == 403 and error_of(answer)["code"] == "host_not_allowed"
    # the WebSocket's upgrade in absolute form still reaches the gateway's socket, not a backend
    status, _, _ = raw(port, upgrade(f"http://127.0.0.1:{port}/v1/responses"))
    assert status == 101
    assert [line for line, _, _ in echo.seen] == ["GET /v1/models?a=1 HTTP/1.1", "POST /v1/chat/completions HTTP/1.1"]


# --- beyond loopback: TLS, or a loud warning ---------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict:
    """A test CA and a server certificate for localhost/127.0.0.1 it signed (made here)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "resp2chat test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem", "other_key": d / "other.pem"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files["other_key"].write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def tls_gateway(gateway_factory, upstream_url: str, tls_files, *extra: str):
    return gateway_factory(upstream_url, "--set", f"resp2chat_tls_cert_file={tls_files['cert']}",
                           "--set", f"resp2chat_tls_key_file={tls_files['key']}", *extra)


def test_https_with_tls_cert_file(echo, upstream, gateway_factory, tls_files, tmp_path):
    gw = tls_gateway(gateway_factory, upstream.origin, tls_files, "--set", f"resp2chat_gateway_api_key={GW_KEY}")
    base = f"https://localhost:{gw.port}/v1"
    pem = tmp_path / "mitmconf" / "resp2chat-tls.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    # curl, streaming a turn
    out = subprocess.run(["curl", "-sS", "--cacert", str(tls_files["ca"]), base + "/responses", "-H",
                          f"authorization: Bearer {GW_KEY}", "-H", "content-type: application/json",
                          "-d", json.dumps({"model": "m", "input": "over https", "stream": True})],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert final_text(parse_sse(out.stdout)) == "You said: over https"
    # the openai SDK, trusting the test CA
    client = openai_client(base, api_key=GW_KEY, http_client=httpx.Client(verify=str(tls_files["ca"])))
    assert client.responses.create(model="m", input="sdk over https").output_text == "You said: sdk over https"
    assert [m.id for m in client.models.list()] == ["demo-model"]
    # the Responses WebSocket over TLS (wss://)
    tls = ssl.create_default_context(cafile=str(tls_files["ca"]))
    events = turn_over_socket(base, {"authorization": f"Bearer {GW_KEY}"}, tls=tls, text="over wss")
    assert final_text(events) == "You said: over wss"
    # not trusting the certificate fails; plain HTTP is refused (but /healthz, for load balancers)
    with pytest.raises(openai.APIConnectionError):
        openai_client(base, api_key=GW_KEY).models.list()
    r = requests.post(f"http://127.0.0.1:{gw.port}/v1/responses", json={"model": "m", "input": "x"},
                      headers={"authorization": f"Bearer {GW_KEY}"}, timeout=20)
    assert r.status_code == 400 and r.json()["error"]["code"] == "https_required"
    status, _, _ = raw(gw.port, upgrade(extra=f"authorization: Bearer {GW_KEY}\r\n"))
    assert status == 400
    assert requests.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=20).status_code == 200
    assert "WITHOUT TLS" not in gw.log()


def test_tls_settings_are_checked_at_start_up(upstream, gateway_factory, tls_files):
    for extra, words in (([f"resp2chat_tls_cert_file={tls_files['cert']}"], "go together"),
                         ([f"resp2chat_tls_cert_file={tls_files['cert']}", f"resp2chat_tls_key_file={tls_files['other_key']}"],
                          "is not the key of"),
                         ([f"resp2chat_tls_cert_file={tls_files['key']}", f"resp2chat_tls_key_file={tls_files['key']}"],
                          "no PEM certificate"),
                         (["resp2chat_tls_cert_file=/nonexistent.pem", f"resp2chat_tls_key_file={tls_files['key']}"],
                          "cannot read /nonexistent.pem")):
        with pytest.raises(RuntimeError) as failed:
            gateway_factory(upstream.origin, *(a for x in extra for a in ("--set", x)))
        assert words in str(failed.value), str(failed.value)[-2000:]


def test_beyond_loopback_without_tls_is_said_loudly(upstream, gateway_factory, tls_files):
    gw = gateway_factory(upstream.origin, "--listen-host", "0.0.0.0", "--set", f"resp2chat_gateway_api_key={GW_KEY}")
    assert wait_until(lambda: "WITHOUT TLS" in gw.log())
    line = next(line for line in gw.log().splitlines() if "WITHOUT TLS" in line)
    assert "0.0.0.0" in line and "tls_cert_file" in line
    quiet = tls_gateway(gateway_factory, upstream.origin, tls_files, "--listen-host", "0.0.0.0",
                        "--set", f"resp2chat_gateway_api_key={GW_KEY}")
    assert requests.get(f"http://127.0.0.1:{quiet.port}/healthz", timeout=20).status_code == 200
    assert "WITHOUT TLS" not in quiet.log()


@pytest.mark.codex
def test_codex_over_https_with_its_ca_setting(upstream, gateway_factory, tls_files, codex_bin, tmp_path):
    """Codex trusts a private CA through CODEX_CA_CERTIFICATE or SSL_CERT_FILE: HTTP turns on a
    custom provider, and the built-in provider's WebSocket (wss://)."""
    gw = tls_gateway(gateway_factory, upstream.origin, tls_files, "--set", "resp2chat_max_replay_entries=0")
    base = f"https://localhost:{gw.port}/v1"
    for name, setup, variable in (("http", lambda cx: cx.configure(base), "CODEX_CA_CERTIFICATE"),
                                  ("websocket", lambda cx: cx.configure_builtin(base), "SSL_CERT_FILE")):
        cx = Codex.at(codex_bin, tmp_path / name, env={variable: str(tls_files["ca"])})
        setup(cx)
        run = cx.exec(f"hello over {name}")
        assert run.returncode == 0 and f"You said: hello over {name}" in run.output, run.output[-3000:]
        assert "Falling back from WebSockets" not in run.output
    log = gw.log()
    assert "POST http" in log and "WebSocket /v1/responses message" in log
    untrusted = Codex.at(codex_bin, tmp_path / "untrusted")
    untrusted.configure(base)
    try:  # (it retries a failed handshake for minutes: what matters is that it never got through)
        run = untrusted.exec("not without the CA", timeout=15)
        assert run.returncode != 0 and "You said" not in run.output
    except subprocess.TimeoutExpired:
        pass
    assert "Client TLS handshake failed" in gw.log()[len(log):]


# --- the rules alone (resp2chat_core) ----------------------------------------------------------


def test_the_gate_rules():
    from resp2chat_core import gate as G
    from resp2chat_core.errors import GatewayError

    rules = G.parse_passthrough(G.DEFAULT_PASSTHROUGH)
    served = [("GET", "/v1/models"), ("GET", "/v1/models/org/name"), ("GET", "/v1/models/a%2Fb"),
              ("POST", "/v1/embeddings"), ("POST", "/v1/responses"), ("GET", "/responses"),
              ("DELETE", "/v1/responses/resp_1"), ("GET", "/metrics"), ("POST", "/v1/conversations/x")]
    for method, path in served:
        assert not isinstance(G.route(method, path, rules), GatewayError), (method, path)
    refused = {("GET", "/V1/MODELS"): 404, ("GET", "/v1/models/"): 404, ("GET", "/v1/models/../files"): 404,
               ("GET", "/v1/models/%2e%2e/files"): 404, ("GET", "/v1/models//x"): 404, ("GET", "/v1/models/a\\..\\b"): 404,
               ("DELETE", "/v1/models/ft-1"): 405, ("PATCH", "/v1/responses"): 405, ("PUT", "/v1/responses/r"): 405,
               ("POST", "/healthz"): 405, ("GET", "/v1"): 404, ("GET", "/v1/files"): 404}
    for (method, path), status in refused.items():
        err = G.route(method, path, rules)
        assert isinstance(err, GatewayError) and err.status == status, (method, path, err)
    assert G.route("PATCH", "/v1/responses", rules).allow == "GET, POST"
    for bad in ("GET /v1/x/*/y", "get /v1/models", "/v1/../x", "/v1/responses/x", "v1/models", "/v1/%2e%2e"):
        with pytest.raises(ValueError):
            G.parse_passthrough([bad])
    own = lambda host, public=(): G.host_refusal([host], "127.0.0.1", list(public)) is None  # noqa: E731
    assert all(own(h) for h in ("127.0.0.1:4000", "[::1]:4000", "10.1.2.3", "localhost", "LOCALHOST.", "a.localhost:1"))
    assert not any(own(h) for h in ("evil.example", "127.0.0.1.nip.io", "localhost.evil", "", None))
    assert own("gw.example.com:443", ["gw.example.com"]) and own("x.corp.example", ["*.corp.example"])
    assert not own("corp.example.evil", ["*.corp.example"]) and own("anything", ["*"])
    assert G.origin_refusal(None, []) is None and G.origin_refusal("https://a.example", ["https://A.example/"]) is None
    assert G.origin_refusal("null", []).status == 403 and G.origin_refusal("https://a.example.evil", ["https://a.example"])
    keys = ["gw-key-1234"]
    clean = {"/v1/models": None, "/v1/models?limit=2&after=k": None, "/v1/models?monkey=1&keys=2": None,
             "/v1/models?api_key=zz": "/v1/models?api_key=[redacted]", "/v1/models?a=1&API-KEY=zz&b=2":
             "/v1/models?a=1&API-KEY=[redacted]&b=2", "/v1/models?x_api_key=&token=t": "/v1/models?x_api_key=&token=[redacted]",
             "/v1/gw-key-1234/x": "/v1/[redacted]/x", "/v1/models?q=gw%2Dkey-1234": "/v1/models?[redacted]",
             "/v1/models?ke%79=zz": "/v1/models?ke%79=[redacted]"}
    key = "r2c-" + "k" * 43  # (a client key's shape: clients.KEY_SHAPE)
    clean |= {f"/v1/{key}/x": "/v1/[redacted]/x", f"/v1/models?q={key.replace('-', '%2D')}": "/v1/models?[redacted]",
              f"/v1/{key}x": None, f"/v1/{key}/gw-key-1234": "/v1/[redacted]/[redacted]",
              f"/v1/m?q={key}gw-key-1234": "/v1/m?q=[redacted][redacted]"}  # (a key once the secret beside it is out)
    for target, want in clean.items():
        assert G.without_credentials(target, keys) == want, target
    # a secret that holds a client key's shape goes whole (before: the shape went first, the rest of it stayed)
    assert G.without_credentials(f"/v1/m?x=abc.{key}", [f"abc.{key}"]) == "/v1/m?x=[redacted]"
    assert [G.is_json(t) for t in ("application/json", "Application/JSON; charset=utf-8", "application/vnd.x+json",
                                   "text/plain", None, "", "application/x-www-form-urlencoded", "json")] \
        == [True, True, True, False, False, False, False, False]


def test_no_client_key_is_kept_once_a_target_or_body_is_scrubbed():
    """A client's presented key, which the gate takes out of a request target
    (``without_credentials``), and a credential it forwards, which ``scrub`` takes out of what a
    backend says, are held by nothing once that is done: no cache keeps them (the gateway's config
    holds only client keys' hashes). Before, ``longest_first``'s cache kept the last 64 lists of
    them, the keys in plain text."""
    from resp2chat_core import gate as G
    from resp2chat_core.channel import scrub

    key = "".join(["client-", os.urandom(12).hex()])  # (made here: no constant holds it, nothing interns it)
    raw_key = key.encode()
    before = sys.getrefcount(key), sys.getrefcount(raw_key)
    target = G.without_credentials(f"/v1/models?x={key}", ["sk-up-0000-1234", key])
    # (no backslash in what is scrubbed: JSON's and Python's spellings, channel._escaped's, are not looked for)
    said = scrub(b"the key " + raw_key + b" is not allowed", (b"sk-up-0000-1234", raw_key))
    assert (target, said) == ("/v1/models?x=[redacted]", b"the key [redacted] is not allowed")
    gc.collect()
    assert (sys.getrefcount(key), sys.getrefcount(raw_key)) == before  # (a cache that held it would hold a reference)


def test_a_secrets_pattern_is_made_only_when_what_is_scrubbed_holds_its_anchor():
    """Scrubbing looks for a secret's anchor (``channel._anchor``: its longest run of letters and
    digits, which every spelling holds as is) before it makes the pattern of its JSON and Python
    spellings (``channel._spellings``), whose compiling costs ~25 ms a KiB of secret on the event
    loop: a body full of backslashes but without the anchor, scrubbed whole (``scrub``) or in
    pieces (``Scrubber``), makes none; one that spells the secret makes it once and is scrubbed.
    Before, any backslash (and every ``Scrubber``'s start) made it."""
    from resp2chat_core import channel

    secret = ("sk-" + os.urandom(8).hex() + "'q\\-" + "x-" * 2000).encode()  # (a client's MCP header, ~4 KiB)
    made = channel._spellings.cache_info().misses
    noisy = b'{"delta": "a \\"quoted\\" line\\nwith a \\\\ and sk and q, no key"}\n' * 40
    scrubber = channel.Scrubber((secret,))
    pieces = [piece for at in range(0, len(noisy), 333) for piece in scrubber(noisy[at:at + 333])] + scrubber(b"")
    assert channel.scrub(noisy, (secret,)) is noisy and b"".join(pieces) == noisy
    assert channel._spellings.cache_info().misses == made  # (no pattern made)
    spelled = json.dumps({"error": repr("bad key " + secret.decode())}).encode()  # (JSON of Python's repr of it)
    assert secret not in spelled and channel.scrub(spelled, (secret,)) == b'{"error": "\\"bad key [redacted]\\""}'
    assert channel._spellings.cache_info().misses == made + 1


def test_the_scrubber_finds_a_secret_split_anywhere():
    from resp2chat_core.channel import Scrubber

    secrets = (b"sk-secret-123456", b"other-key-0000")
    text = b"abc sk-secret-123456 def other-key-0000 ghi sk-secret-123456" * 3
    for size in (1, 2, 5, 7, 16, 17, 1000):
        s = Scrubber(secrets)
        out = [piece for i in range(0, len(text), size) for piece in s(text[i:i + size])] + s(b"")
        assert b"".join(out) == text.replace(b"sk-secret-123456", b"[redacted]").replace(b"other-key-0000", b"[redacted]")
        assert b"" not in out
