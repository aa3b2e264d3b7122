"""The mitmproxy addon's hooks, driven with mitmproxy's own test helpers (taddons, tflow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow

from conftest import ADDON, codex_fixture


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("resp2chat_addon_under_test", ADDON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def addon(mod):
    return mod.Resp2Chat()


def responses_flow(body: dict | bytes, path="/v1/responses", headers=None) -> http.HTTPFlow:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = http.Request.make("POST", f"http://127.0.0.1:8000{path}", raw,
                            {"content-type": "application/json", **(headers or {})})
    f = tflow.tflow()
    f.request = req
    return f


def upstream_response(flow, body: bytes, status=200, ctype="text/event-stream"):
    flow.response = http.Response.make(status, body, {"content-type": ctype})
    return flow


def streaming_flow(addon) -> http.HTTPFlow:
    """A streaming /v1/responses flow whose upstream answered 200: the stream callable is set."""
    f = responses_flow({"model": "m", "input": "hi", "stream": True})
    addon.request(f)
    upstream_response(f, b"")
    addon.responseheaders(f)
    return f


def chunk(delta=None, finish=None) -> bytes:
    c = {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    return b"data: " + json.dumps(c).encode() + b"\n\n"


def test_request_is_lowered_and_routed_to_reverse_target(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow({"model": "m", "input": "hi", "stream": True})
        addon.request(f)
        assert f.response is None
        assert f.request.path == "/v1/chat/completions"
        assert (f.request.host, f.request.port) == ("127.0.0.1", 8000)
        chat = json.loads(f.request.content)
        assert chat["messages"] == [{"role": "user", "content": "hi"}]
        assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_upstream_base_url_with_path_prefix_and_key(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, resp2chat_upstream_base_url="https://llm.example:8443/api/v1",
                       resp2chat_upstream_api_key="sk-upstream-secret")
        f = responses_flow({"model": "m", "input": "hi"}, headers={"authorization": "Bearer sk-client"})
        addon.request(f)
        r = f.request
        assert (r.scheme, r.host, r.port, r.path) == ("https", "llm.example", 8443, "/api/v1/chat/completions")
        assert r.headers["host"] == "llm.example:8443"
        assert r.headers["authorization"] == "Bearer sk-upstream-secret"
        m = tflow.tflow()
        m.request = http.Request.make("GET", "http://127.0.0.1:8000/v1/models?x=1")
        addon.request(m)
        assert m.request.path == "/api/v1/models?x=1"


def test_client_authorization_dropped_unless_forwarding(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow({"model": "m", "input": "hi"}, headers={"authorization": "Bearer sk-client"})
        addon.request(f)
        assert "authorization" not in f.request.headers
        tctx.configure(addon, resp2chat_forward_client_auth=True)
        f = responses_flow({"model": "m", "input": "hi"}, headers={"authorization": "Bearer sk-client"})
        addon.request(f)
        assert f.request.headers["authorization"] == "Bearer sk-client"


def test_saved_flows_never_hold_credentials(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, resp2chat_upstream_api_key="sk-upstream-secret")
        f = streaming_flow(addon)
        addon.response(f)
        assert "sk-upstream-secret" not in json.dumps(f.get_state(), default=str)


def test_bad_request_answered_locally(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow({"model": "m", "input": [{"type": "nope"}]})
        addon.request(f)
        assert f.response.status_code == 400
        assert json.loads(f.response.content)["error"]["param"] == "input[0].type"
        assert f.id not in addon.turns


def test_healthz_answered_locally(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = tflow.tflow()
        f.request = http.Request.make("GET", "http://127.0.0.1:8000/healthz")
        addon.request(f)
        assert f.response.status_code == 200


def run_stream(addon, f, pieces: list[bytes]) -> tuple[list, bytes]:
    addon.responseheaders(f)
    stream = f.response.stream
    assert callable(stream)
    results = [stream(p) for p in pieces] + [stream(b"")]
    return results, b"".join(r if isinstance(r, bytes) else b"".join(r) for r in results)


def test_stream_callable_translates_and_fixes_headers(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow({"model": "m", "input": "hi", "stream": True})
        addon.request(f)
        upstream_response(f, b"")
        f.response.headers["content-length"] = "123"
        results, out = run_stream(addon, f, [chunk({"content": "Hel"})[:10], chunk({"content": "Hel"})[10:],
                                             b": keep-alive\n\n", chunk(finish="stop"), b"data: [DONE]\n\n"])
        assert f.response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in f.response.headers
        assert f.response.headers["transfer-encoding"] == "chunked"
        # nothing to say mid-stream must be [], never b"" (b"" ends the client's body early)
        assert results[0] == [] and results[2] == []
        assert all(r != b"" for r in results)
        assert out.count(b"event: response.completed") == 1
        assert b'"delta":"Hel"' in out


def test_stream_callable_never_raises(addon, monkeypatch):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = streaming_flow(addon)
        stream = f.response.stream

        def boom(data):
            raise RuntimeError("bug")

        monkeypatch.setattr(stream.translator, "feed", boom)
        out = stream(chunk({"content": "x"}))
        assert b"response.failed" in out and b"RuntimeError" in out
        assert stream(b"more") == [] and stream(b"") == []


def test_upstream_http_error_becomes_response_failed_stream(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow({"model": "m", "input": "hi", "stream": True})
        addon.request(f)
        upstream_response(f, b"", status=400, ctype="application/json")
        body = json.dumps({"error": {"message": "This model's maximum context length is 10 tokens. "
                                                "However, you requested 99 tokens", "code": 400}}).encode()
        _, out = run_stream(addon, f, [body[:20], body[20:]])
        assert f.response.status_code == 200
        events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
        assert events[-1]["response"]["error"]["code"] == "context_length_exceeded"


def test_non_streaming_client_gets_one_json_response(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow({"model": "m", "input": "hi"})
        addon.request(f)
        upstream_response(f, chunk({"content": "Hello"}) + chunk(finish="stop") + b"data: [DONE]\n\n")
        addon.responseheaders(f)
        assert not callable(f.response.stream)
        addon.response(f)
        resp = json.loads(f.response.content)
        assert f.response.status_code == 200
        assert resp["object"] == "response" and resp["status"] == "completed"
        assert resp["output"][0]["content"][0]["text"] == "Hello"
        assert f.id not in addon.turns


def test_codex_fixture_flow_round_trip(addon):
    body = codex_fixture("02-tool-call-turn1.json")["body"]
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = responses_flow(body)
        addon.request(f)
        chat = json.loads(f.request.content)
        names = [t["function"]["name"] for t in chat["tools"]]
        assert "multi_agent_v1__spawn_agent" in names
        call = {"index": 0, "id": "call_x", "function": {"name": "multi_agent_v1__spawn_agent",
                                                          "arguments": '{"message":"go"}'}}
        upstream_response(f, b"")
        _, out = run_stream(addon, f, [chunk({"tool_calls": [call]}), chunk(finish="tool_calls"),
                                       b"data: [DONE]\n\n"])
        done = json.loads(out.decode().split("data: ")[-1])
        item = done["response"]["output"][0]
        assert (item["type"], item["name"], item["namespace"]) == ("function_call", "spawn_agent", "multi_agent_v1")


def test_gateway_defaults_loopback_4000_lazy(addon):
    with taddons.context(Proxyserver(), addon) as tctx:
        addon.configure(set(tctx.options.keys()))  # what mitmproxy's script loader does
        opts = tctx.options
        assert opts.connection_strategy == "lazy"
        assert opts.store_streamed_bodies is True
        assert opts.mode == ["reverse:http://127.0.0.1:8000@127.0.0.1:4000"]


def test_explicit_listen_address_is_respected(addon):
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, mode=["reverse:http://10.0.0.5:9000"], listen_port=5555)
        assert tctx.options.mode == ["reverse:http://10.0.0.5:9000@127.0.0.1:5555"]
        tctx.configure(addon, mode=["reverse:http://10.0.0.5:9000@127.0.0.1:6000"])
        assert tctx.options.mode == ["reverse:http://10.0.0.5:9000@127.0.0.1:6000"]


def test_binding_beyond_loopback_needs_gateway_key(addon):
    with taddons.context(Proxyserver(), addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="gateway_api_key"):
            tctx.configure(addon, mode=["reverse:http://10.0.0.5:9000@0.0.0.0:4000"])
        tctx.configure(addon, mode=["reverse:http://10.0.0.5:9000@0.0.0.0:4000"],
                       resp2chat_gateway_api_key="gw-key")
        f = responses_flow({"model": "m", "input": "hi"})
        addon.request(f)
        assert f.response.status_code == 401
        f = responses_flow({"model": "m", "input": "hi"}, headers={"authorization": "Bearer gw-key"})
        addon.request(f)
        assert f.response is None and "authorization" not in f.request.headers


def test_turn_recorded_when_client_hangs_up_after_completed(addon):
    """Codex closes the connection on response.completed (sent at [DONE]), which can beat the end
    of the upstream body: mitmproxy then calls `error`, not `response`. Seen with llama-server."""
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        f = streaming_flow(addon)
        usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10,
                 "prompt_tokens_details": {"cached_tokens": 8}}
        out = f.response.stream(chunk({"content": "Hi"}) + chunk(finish="stop")
                                + b'data: {"choices": [], "usage": ' + json.dumps(usage).encode() + b"}\n\n"
                                + b"data: [DONE]\n\n")
        assert b"event: response.completed" in out
        f.error = flow_error = tflow.terr("Client disconnected.")
        addon.error(f)
        meta = f.metadata["resp2chat"]
        assert f.error is flow_error and f.id not in addon.turns
        assert meta["status"] == "completed"
        assert meta["usage"]["input_tokens"] == 9 and meta["usage"]["input_tokens_details"]["cached_tokens"] == 8
        assert "[DONE]" in meta["upstream_sse"]
        # the flow file keeps what the client got (mitmproxy stores a streamed body only at its
        # end, which never came): server replay of this recording must answer in full
        assert f.response.raw_content == out
