"""A backend that ignores ``stream`` answers with one whole JSON body: the relay reads a 200 JSON
body whole up to the bound of an answer's output (OUTPUT_EVENTS × max_upstream_event_mb: 32 MiB
by default, relay/upstream.py ``MAX_ANSWER``), not up to the 1 MiB of an error body. Before, a
body past 1 MiB was cut there and read as if whole: a long answer failed as a garbage one.
Past the bound the turn fails with ``upstream_output_too_large`` (a ``response.failed``, or a
502 JSON for a client that did not stream) and the rest of the body is not read. Through real
mitmdump gateways and small real backends; the tool loop's and the compaction summary's whole
JSON answers are in test_websearch_e2e.py and test_server_compaction.py."""

from __future__ import annotations

import json

import requests

from helpers import LocalServer, MiB, Peak, QuietHandler, chat_completion, parse_sse, post_turn, send_json, wait_until

TEXT = "".join(f"word{i} " for i in range(300_000))  # 2.5 MB of text: past 1 MiB


def _completion(text: str) -> dict:
    return chat_completion({"content": text}, "stop", prompt_tokens=10, completion_tokens=300_000)


class Whole(QuietHandler):
    """A chat backend that ignores ``stream``, by model: ``big``, a ``chat.completion`` of ``TEXT``
    (its length declared); ``small``, one of "hello"; ``huge``, one of 9 MiB of text (declared); ``endless``, a
    ``chat.completion`` whose text never ends (chunked, as fast as it is read, 256 MiB at most).
    ``GET /v1/models``: a list of 3000 models with long descriptions (1.6 MB). ``calls``: per
    call, its model, the bytes sent and whether the gateway cut it."""

    calls: list[dict] = []

    def do_GET(self):
        models = [{"id": f"model-{i}", "object": "model", "description": "d" * 500} for i in range(3000)]
        try:
            self._send(json.dumps({"object": "list", "data": models}).encode())
        except OSError:  # (a gateway that reads no more of it: test_a_model_list_past_its_own_bound…)
            self.close_connection = True

    def do_POST(self):
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        call = {"model": model, "sent": 0, "cut": False, "done": False}
        type(self).calls.append(call)
        try:
            if model == "endless":
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                head = json.dumps(_completion("")).encode().split(b'"content": ""')[0] + b'"content": "'
                for piece in [head] + [b"x" * (256 << 10)] * 1024:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    call["sent"] += len(piece)
                self.close_connection = True
            else:
                text = {"huge": "y" * (9 * MiB), "small": "hello"}.get(model, TEXT)
                self._send(json.dumps(_completion(text)).encode(), call)
            call["done"] = True
        except OSError:
            call["cut"] = True
            self.close_connection = True

    def _send(self, data: bytes, call: dict | None = None) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        for at in range(0, len(data), 1 << 20):
            self.wfile.write(data[at:at + (1 << 20)])
            if call is not None:
                call["sent"] += min(1 << 20, len(data) - at)


def _turn(gw, model: str, stream: bool) -> requests.Response:
    return post_turn(gw, {"model": model, "input": "hi", "stream": stream}, timeout=120)


def test_a_whole_json_answer_past_1_mib_is_read_whole(gateway_factory):
    """A 2.5 MB ``chat.completion`` (a long answer from a backend that ignored ``stream``) is the
    turn's answer, whole, streamed or not (before: cut at 1 MiB, then failed as garbage)."""
    Whole.calls = []
    with LocalServer(Whole) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        events = parse_sse(_turn(gw, "big", True).content)
        end = events[-1]
        assert end["type"] == "response.completed", end
        assert end["response"]["output"][-1]["content"][0]["text"] == TEXT
        assert end["response"]["usage"]["output_tokens"] == 300_000
        r = _turn(gw, "big", False)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["output"][-1]["content"][0]["text"] == TEXT


def test_a_whole_json_answer_past_the_bound_fails_the_turn_and_is_not_read(gateway_factory):
    """With ``max_upstream_event_mb`` 1 the bound is 8 MiB: a body that declares more (``huge``)
    fails the turn at its head, one that grows past it (``endless``, chunked) once it did; either
    way with ``upstream_output_too_large`` naming the bound (a ``response.failed`` in a stream, a
    502 JSON for a client that did not stream), the backend's call is dropped, and the gateway's
    memory stays within the bound's reach. A turn within the bound then still answers."""
    Whole.calls = []
    with LocalServer(Whole) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_max_upstream_event_mb=1")
        assert _turn(gw, "small", False).status_code == 200  # (warm: imports, pools)
        for model in ("huge", "endless"):
            peak = Peak(gw.proc.pid)
            end = parse_sse(_turn(gw, model, True).content)[-1]
            assert end["type"] == "response.failed", (model, end)
            error = end["response"]["error"]
            assert (error["code"], error["type"]) == ("server_error", "upstream_output_too_large"), error
            assert "larger than 8 MiB (8 × max_upstream_event_mb)" in error["message"], error
            call = Whole.calls[-1]
            wait_until(lambda: call["cut"] or call["done"], what=f"the {model} call ending")  # noqa: B023
            if model == "endless":
                assert call["cut"] and call["sent"] < 64 * MiB, call
            assert peak.grown < 64 * MiB, f"{model}: the gateway grew {peak.grown / MiB:.0f} MiB"
            r = _turn(gw, model, False)
            assert r.status_code == 502, r.text[:300]
            assert r.json()["error"]["code"] == "upstream_output_too_large", r.text[:300]
        r = _turn(gw, "small", False)
        assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "hello", r.text[:300]


def test_a_model_list_past_1_mib_is_read_whole(gateway_factory):
    """``GET /v1/models`` with several upstreams asks each (the relay's ``get``): a list of 1.6 MB
    (an upstream with thousands of models) is read whole and merged (before: cut at 1 MiB, not
    JSON, that upstream left out of the list)."""
    with LocalServer(Whole) as many, LocalServer(Whole) as other:
        upstreams = [{"name": "many", "base_url": many.url + "/v1"},
                     {"name": "other", "base_url": other.url + "/v1", "models": ["other-*"]}]
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_upstreams=" + json.dumps(upstreams))
        r = requests.get(gw.base_url + "/models", timeout=60)
        assert r.status_code == 200, r.text[:300]
        ids = [m["id"] for m in r.json()["data"]]
        assert ids == [f"model-{i}" for i in range(3000)], ids[:5]


class ChunkedList(QuietHandler):
    """``GET /v1/models``: a 1.6 MB list as ``Whole``'s, chunked (its length not declared: it
    grows past a bound only as it is read)."""

    def do_GET(self):
        data = json.dumps({"object": "list", "data": [
            {"id": f"chunked-{i}", "object": "model", "description": "d" * 500} for i in range(3000)]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for at in range(0, len(data), 64 << 10):
                piece = data[at:at + (64 << 10)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True


class Few(QuietHandler):
    def do_GET(self):
        send_json(self, 200, {"object": "list", "data": [{"id": "few-1", "object": "model"}]})


def test_a_model_list_past_its_own_bound_is_left_out_with_a_clear_reason(gateway_factory):
    """The relay's ``get`` (a model list, a tokenizer's token ids) reads a 200 body up to
    ``max_upstream_event_mb`` (its own bound), not up to an answer's (8 × it): with 1 MiB, a 1.6 MB
    list, declared (``Whole``) or chunked (``ChunkedList``), leaves its
    upstream out of the merged ``GET /v1/models``, the log saying why; with none left, a 502 that
    says no upstream answered. Neither hangs nor breaks the gateway (before: read whole up to
    8 MiB, the lists merged)."""
    with LocalServer(Whole) as many, LocalServer(ChunkedList) as chunked, LocalServer(Few) as few:
        upstreams = [{"name": "many", "base_url": many.url + "/v1"},
                     {"name": "chunked", "base_url": chunked.url + "/v1", "models": ["chunked-*"]},
                     {"name": "few", "base_url": few.url + "/v1", "models": ["few-*"]}]
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_upstream_event_mb=1",
                             "--set", "resp2chat_upstreams=" + json.dumps(upstreams))
        r = requests.get(gw.base_url + "/models", timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert [m["id"] for m in r.json()["data"]] == ["few-1"], r.text[:300]
        for name in ("many", "chunked"):
            line = f"GET /models from upstream {name}: TooLarge: the answer is larger than 1 MiB (max_upstream_event_mb)"
            wait_until(lambda: line in gw.log(), what=f"{name}'s reason")  # noqa: B023
    with LocalServer(Whole) as many:
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_upstream_event_mb=1", "--set",
                             "resp2chat_upstreams=" + json.dumps([{"name": "many", "base_url": many.url + "/v1"},
                                                                 {"name": "few", "base_url": "http://127.0.0.1:9/v1",
                                                                  "models": ["few-*"]}]))
        r = requests.get(gw.base_url + "/models", timeout=60)
        assert r.status_code == 502, r.text[:300]
        assert r.json()["error"]["message"] == "no upstream answered GET /models (tried many, few)", r.text[:300]
        assert requests.get(gw.base_url.removesuffix("/v1") + "/healthz", timeout=10).status_code == 200


def test_a_whole_json_answer_past_the_bound_falls_back_to_the_next_upstream(gateway_factory, upstream):
    """Nothing of a body past the bound reached the client (it is read whole before anything
    goes on): with several upstreams the next one answers, as after any failure before the
    first byte (routing.py's rule), and the log says which failed and why."""
    Whole.calls = []
    with LocalServer(Whole) as backend:
        upstreams = [{"name": "whole", "base_url": backend.url + "/v1"},
                     {"name": "demo", "base_url": upstream.base_url}]
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_max_upstream_event_mb=1",
                             "--set", "resp2chat_upstreams=" + json.dumps(upstreams))
        r = _turn(gw, "huge", False)
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text[:300]
        assert [c["model"] for c in Whole.calls] == ["huge"]
        wait_until(lambda: "upstream whole failed before its first byte (HTTP 502): trying demo" in gw.log(),
                   what="the fallback's log line")
