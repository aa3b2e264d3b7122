"""``upstream_headers`` on passthrough calls, through a real mitmdump: ``GET /v1/models`` (one
upstream's list, and the list merged over several ``upstreams``), ``GET /v1/models/{id}`` and
``POST /v1/embeddings`` get each upstream's own headers exactly as its turns do (the entry's over
the top-level ones; the operator's value replaces a client's header of the same name; a client's
header named like a credential is dropped; never another upstream's), and a credential-named one
is a secret: ``[redacted]`` in the flow file, in no log.

Backends are real HTTP servers of the test's own on loopback: each records the headers of every
request it gets and answers 401 without the header it needs (Azure's ``api-key``, a gateway's
tenant header). Before, passthrough calls went without ``upstream_headers``: such a backend
answered 401, and was left out of the merged model list.
"""

from __future__ import annotations

import json

import requests

from helpers import LocalServer, QuietHandler, read_flows, send_json, start_gateway

A_SECRET = "azure-key-a-0123456789"
B_SECRET = "azure-key-b-9876543210"


class Needs:
    """A backend that answers ``/v1/models``, ``/v1/models/{id}`` and ``/v1/embeddings`` only to a
    request carrying every header of ``needs`` with that value (else a 401), and records every
    request: (path, its headers as (lower-case name, value) pairs, in order)."""

    def __init__(self, needs: dict[str, str], models: tuple[str, ...]) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []
        outer = self

        class Handler(QuietHandler):
            def _allowed(self) -> bool:
                got = [(k.lower(), v) for k, v in self.headers.items()]
                outer.calls.append((self.path, got))
                if all(self.headers.get_all(k) == [v] for k, v in needs.items()):
                    return True
                send_json(self, 401, {"error": {"message": "missing or wrong api-key", "type": "invalid_request_error",
                                                "code": "unauthorized"}})
                return False

            def do_GET(self):
                if not self._allowed():
                    return
                if self.path == "/v1/models":
                    send_json(self, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
                elif self.path.startswith("/v1/models/") and self.path[11:] in models:
                    send_json(self, 200, {"id": self.path[11:], "object": "model"})
                elif self.path == "/v1/files":
                    send_json(self, 200, {"object": "list", "data": []})
                else:
                    send_json(self, 404, {"error": {"message": "no such model"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                if not self._allowed():
                    return
                send_json(self, 200, {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 1,
                                                                                         "total_tokens": 1},
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}]})

        self.server = LocalServer(Handler)
        self.base_url = self.server.url + "/v1"

    def close(self) -> None:
        self.server.close()

    def got(self, path: str) -> list[list[tuple[str, str]]]:
        """The headers of every request to ``path``."""
        return [h for p, h in self.calls if p == path]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n == name]


def one_upstream(tmp_path, backend: Needs, headers: dict, *extra: str, env: dict | None = None):
    """A gateway of one upstream (``upstream_base_url``) with these top-level ``upstream_headers``."""
    return start_gateway("http://127.0.0.1:9", tmp_path, "--set", f"resp2chat_upstream_base_url={backend.base_url}",
                         "--set", "resp2chat_upstream_headers=" + json.dumps(headers),
                         "--set", "resp2chat_max_replay_entries=0", *extra, env=env)


def test_the_model_list_of_an_upstream_that_needs_a_header(tmp_path):
    backend = Needs({"api-key": A_SECRET}, ("gpt-4o", "text-embedding-3-small"))
    gw = one_upstream(tmp_path, backend, {"api-key": A_SECRET})
    try:
        r = requests.get(gw.base_url + "/models", timeout=30)
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == ["gpt-4o", "text-embedding-3-small"]
        r = requests.get(gw.base_url + "/models/gpt-4o", timeout=30)
        assert r.status_code == 200 and r.json()["id"] == "gpt-4o", r.text
        for got in backend.got("/v1/models") + backend.got("/v1/models/gpt-4o"):
            assert values(got, "api-key") == [A_SECRET], got
    finally:
        gw.stop()
        backend.close()


def test_an_operator_listed_path_and_a_limited_clients_model_list_get_the_header(tmp_path):
    """A path ``passthrough_paths`` adds (``GET /v1/files``) goes as the default ones; a client
    limited to some models gets ``GET /v1/models`` made by the gateway (its list filtered): with
    the upstream's header too."""
    backend = Needs({"api-key": A_SECRET}, ("gpt-4o", "o3"))
    key = "team-key-0123456789abcdef"
    gw = one_upstream(tmp_path, backend, {"api-key": A_SECRET},
                      *(a for path in ("GET /v1/models", "GET /v1/models/*", "GET /v1/files")
                        for a in ("--set", f"resp2chat_passthrough_paths={path}")),
                      env={"RESP2CHAT_CLIENTS": json.dumps([{"name": "team", "key": key, "models": ["gpt-*"]}])})
    try:
        auth = {"authorization": f"Bearer {key}"}
        r = requests.get(gw.base_url + "/files", headers=auth, timeout=30)
        assert r.status_code == 200 and r.json() == {"object": "list", "data": []}, r.text
        assert r.headers["x-request-id"].startswith("req_")  # (the gateway's id on the backend's answer)
        r = requests.get(gw.base_url + "/models", headers=auth, timeout=30)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["gpt-4o"], r.text
        assert r.headers["x-request-id"].startswith("req_")  # (the gateway's own answer, as its errors)
        assert [(p, values(h, "api-key")) for p, h in backend.calls] == [("/v1/files", [A_SECRET]),
                                                                         ("/v1/models", [A_SECRET])]
        assert key not in json.dumps(backend.calls)
    finally:
        gw.stop()
        backend.close()


def test_the_merged_model_list_sends_each_upstream_its_own_header_only(tmp_path):
    a = Needs({"api-key": A_SECRET}, ("a-small", "shared"))
    b = Needs({"api-key": B_SECRET, "x-tenant": "team-b"}, ("b-large", "shared"))
    entries = [{"name": "a", "base_url": a.base_url, "upstream_headers": {"api-key": A_SECRET}},
               {"name": "b", "base_url": b.base_url, "upstream_headers": {"api-key": B_SECRET, "X-Tenant": "team-b"}}]
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_upstreams=" + json.dumps(entries),
                       "--set", "resp2chat_max_replay_entries=0")
    try:
        r = requests.get(gw.base_url + "/models", headers={"api-key": "client-own-key-000", "x-tenant": "evil"},
                         timeout=30)
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == ["a-small", "shared", "b-large"]  # both, the first listing wins
        # the rest goes to the first upstream, with its headers
        r = requests.post(gw.base_url + "/embeddings", json={"model": "a-small", "input": "hi"}, timeout=30)
        assert r.status_code == 200, r.text
        assert [(p, values(h, "api-key"), values(h, "x-tenant")) for p, h in a.calls] == [
            ("/v1/models", [A_SECRET], []), ("/v1/embeddings", [A_SECRET], [])]
        assert [(p, values(h, "api-key"), values(h, "x-tenant")) for p, h in b.calls] == [
            ("/v1/models", [B_SECRET], ["team-b"])]
        assert B_SECRET not in json.dumps(a.calls) and A_SECRET not in json.dumps(b.calls)
    finally:
        gw.stop()
        a.close()
        b.close()


def test_embeddings_get_the_upstreams_header(tmp_path):
    backend = Needs({"api-key": A_SECRET}, ("text-embedding-3-small",))
    gw = one_upstream(tmp_path, backend, {"api-key": A_SECRET, "HTTP-Referer": "https://app.example"})
    try:
        r = requests.post(gw.base_url + "/embeddings", json={"model": "text-embedding-3-small", "input": "hi"},
                          timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["embedding"] == [0.5, 0.25]
        [got] = backend.got("/v1/embeddings")
        assert values(got, "api-key") == [A_SECRET] and values(got, "http-referer") == ["https://app.example"]
        assert values(got, "content-type") == ["application/json"]  # (the client's own headers still go)
    finally:
        gw.stop()
        backend.close()


def test_a_clients_header_of_the_same_name_never_goes_ahead_of_the_operators(tmp_path):
    backend = Needs({"api-key": A_SECRET, "x-tenant": "team-a"}, ("text-embedding-3-small",))
    gw = one_upstream(tmp_path, backend, {"api-key": A_SECRET, "X-Tenant": "team-a"})
    try:
        sent = {"API-Key": "client-own-key-000", "x-tenant": "evil", "X-Other": "kept"}
        r = requests.get(gw.base_url + "/models", headers=sent, timeout=30)
        assert r.status_code == 200, r.text
        r = requests.post(gw.base_url + "/embeddings", json={"model": "text-embedding-3-small", "input": "hi"},
                          headers=sent, timeout=30)
        assert r.status_code == 200, r.text
        for got in backend.got("/v1/models") + backend.got("/v1/embeddings"):
            assert values(got, "api-key") == [A_SECRET] and values(got, "x-tenant") == ["team-a"], got
            assert values(got, "x-other") == ["kept"]
        assert "client-own-key-000" not in json.dumps(backend.calls) and "evil" not in json.dumps(backend.calls)
    finally:
        gw.stop()
        backend.close()


def test_the_flow_file_and_the_log_hold_no_credential_header(tmp_path):
    backend = Needs({"api-key": A_SECRET}, ("gpt-4o", "text-embedding-3-small"))
    flows = tmp_path / "flows.mitm"
    gw = one_upstream(tmp_path, backend, {"api-key": A_SECRET, "X-Title": "team gateway"}, "-w", str(flows))
    try:
        assert requests.get(gw.base_url + "/models", timeout=30).status_code == 200
        assert requests.post(gw.base_url + "/embeddings", json={"model": "gpt-4o", "input": "hi"},
                             timeout=30).status_code == 200
    finally:
        gw.stop()
        backend.close()
    got = {f.request.path: f for f in read_flows(flows) if f.request.path.startswith("/v1/")}
    assert set(got) == {"/v1/models", "/v1/embeddings"}, set(got)
    for flow in got.values():
        assert flow.response.status_code == 200
        assert flow.request.headers.get_all("api-key") == ["[redacted]"]  # (it went: shown, not its value)
        assert flow.request.headers["x-title"] == "team gateway"  # (no credential: shown as sent)
    assert A_SECRET.encode() not in flows.read_bytes()
    assert A_SECRET not in gw.log()
