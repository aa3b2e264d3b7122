"""The request shapes real clients send, through a real mitmdump: compressed bodies, input items
and fields the gateway reads or accepts (additional_tools, prompt_cache_breakpoint,
client_metadata, conversation)."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest

from resp2chat_core.content_encoding import _zstd as zstd
from helpers import codex_fixture, parse_sse, post_turn

ENCODERS = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstd.compress, "br": brotli.compress}


# --- compressed bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_compressed_request_bodies_are_decoded(gateway, upstream, coding):
    upstream.clear()
    body = {"model": "demo-model", "input": f"packed with {coding}", "stream": True}
    r = post_turn(gateway, ENCODERS[coding](json.dumps(body).encode()), {"content-encoding": coding})
    assert r.status_code == 200, r.text
    final = parse_sse(r.content)[-1]["response"]
    assert final["output"][-1]["content"][0]["text"] == f"You said: packed with {coding}"
    assert upstream.requests()[-1]["messages"][-1]["content"] == f"packed with {coding}"


def test_codex_sized_zstd_request(gateway, upstream):
    """Codex (enable_request_compression, with a ChatGPT login) sends zstd of its ~40 KB body."""
    body = codex_fixture("03-tool-call-turn2-with-output.json")["body"]
    r = post_turn(gateway, zstd.compress(json.dumps(body).encode(), 3), {"content-encoding": "zstd"})
    assert r.status_code == 200, r.text
    assert parse_sse(r.content)[-1]["type"] == "response.completed"


def test_a_zip_bomb_is_413_and_the_gateway_lives_on(gateway_factory, upstream):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=1")
    inner = json.dumps({"model": "demo-model", "input": "x" * (4 << 20)}).encode()
    bomb = gzip.compress(inner)
    assert len(bomb) < 64 << 10
    r = post_turn(gw, bomb, {"content-encoding": "gzip"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "once decoded" in r.json()["error"]["message"]
    # under the limit once decoded: served
    r = post_turn(gw, gzip.compress(json.dumps({"model": "demo-model", "input": "small"}).encode()),
                  {"content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "You said: small"


def test_unsupported_and_corrupt_encodings(gateway):
    body = json.dumps({"model": "demo-model", "input": "hi"}).encode()
    r = post_turn(gateway, body, {"content-encoding": "compress"})
    assert r.status_code == 415 and r.headers["x-request-id"].startswith("req_")
    assert r.json()["error"]["code"] == "unsupported_content_encoding"
    assert "compress" in r.json()["error"]["message"]
    r = post_turn(gateway, gzip.compress(body)[:-8], {"content-encoding": "gzip"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_body"
    r = post_turn(gateway, body, {"content-encoding": "identity"})
    assert r.status_code == 200


# --- fields and items ----------------------------------------------------------------------


def test_additional_tools_items_are_tools(gateway, upstream):
    """Newer Codex delivers tools as an input item; calls to them come back with their namespace."""
    upstream.clear()
    spawn = {"type": "function", "name": "spawn_agent", "description": "spawn",
             "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}}
    body = {"model": "demo-model", "stream": True, "tools": [
        {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}}],
        "input": [
            {"type": "additional_tools", "role": "developer", "id": "at_1",
             "tools": [{"type": "namespace", "name": "multi_agent_v1", "description": "agents", "tools": [spawn]}]},
            {"role": "developer", "content": "You are Codex."},
            {"role": "user", "content": 'call: multi_agent_v1__spawn_agent {"task": "t"}'}]}
    r = post_turn(gateway, body)
    assert r.status_code == 200, r.text
    call = parse_sse(r.content)[-1]["response"]["output"][-1]
    assert (call["type"], call["namespace"], call["name"]) == ("function_call", "multi_agent_v1", "spawn_agent")
    sent = upstream.requests()[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["exec_command", "multi_agent_v1__spawn_agent"]
    assert sent["messages"][0] == {"role": "system", "content": "You are Codex."}  # the item is no message


def test_additional_tools_of_an_earlier_turn_still_count_after_previous_response_id(gateway, upstream):
    """The tools an earlier turn delivered as an item are part of the conversation: a request that
    continues it (previous_response_id) still offers them, and a call to one comes back as it."""
    spawn = {"type": "function", "name": "spawn_agent", "parameters": {"type": "object", "properties": {}}}
    first = post_turn(gateway, {"model": "demo-model", "input": [
        {"type": "additional_tools", "role": "developer", "tools": [
            {"type": "namespace", "name": "multi_agent_v1", "description": "agents", "tools": [spawn]}]},
        {"role": "user", "content": "hello"}]})
    assert first.status_code == 200, first.text
    r = post_turn(gateway, {"model": "demo-model", "stream": True, "previous_response_id": first.json()["id"],
                            "input": 'call: multi_agent_v1__spawn_agent {"task": "t"}'})
    assert r.status_code == 200, r.text
    sent = upstream.requests()[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["multi_agent_v1__spawn_agent"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    call = parse_sse(r.content)[-1]["response"]["output"][-1]
    assert (call["type"], call["namespace"], call["name"]) == ("function_call", "multi_agent_v1", "spawn_agent")


def test_cache_hints_and_client_metadata_are_accepted_not_forwarded(gateway, upstream):
    upstream.clear()
    body = {"model": "demo-model", "prompt_cache_key": "thread-1", "prompt_cache_options": {"mode": "explicit"},
            "client_metadata": {"x-codex-turn": "1"}, "input": [
                {"role": "developer", "content": [{"type": "input_text", "text": "Be brief.",
                                                    "prompt_cache_breakpoint": {"mode": "explicit"}}]},
                {"role": "user", "content": [{"type": "input_text", "text": "cache me",
                                               "prompt_cache_breakpoint": {"mode": "explicit"}}]}]}
    r = post_turn(gateway, body)
    assert r.status_code == 200, r.text
    sent = upstream.requests()[-1]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "cache me"}]
    assert not {"prompt_cache_key", "prompt_cache_options", "client_metadata"} & sent.keys()


def test_prompt_cache_key_is_the_session_key(upstream, gateway_factory, tmp_path):
    log = tmp_path / "upstream.jsonl"
    gw = gateway_factory(upstream.origin, "--set", f"resp2chat_upstream_request_log_path={log}")
    body = {"model": "demo-model", "input": "hi", "prompt_cache_key": "my-thread"}
    assert post_turn(gw, zstd.compress(json.dumps(body).encode()), {"content-encoding": "zstd",
                                                                         "session-id": "header-id"}).status_code == 200
    assert post_turn(gw, {"model": "demo-model", "input": "hi"}, {"session-id": "header-id"}).status_code == 200
    gw.stop()
    sessions = [json.loads(line)["session"] for line in log.read_text().splitlines()]
    assert sessions == ["my-thread", "header-id"]
