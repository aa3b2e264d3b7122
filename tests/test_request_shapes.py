"""The request shapes real clients send, through a real mitmdump: compressed bodies, input items
and fields the gateway reads or accepts (additional_tools, prompt_cache_breakpoint,
client_metadata, conversation)."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import requests

from resp2chat_core.content_encoding import _zstd as zstd
from conftest import parse_sse

ENCODERS = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstd.compress, "br": brotli.compress}


def post(base_url: str, body: bytes | dict, headers: dict | None = None) -> requests.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(base_url + "/responses", data=data, timeout=30,
                         headers={"content-type": "application/json", **(headers or {})})


# --- compressed bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_compressed_request_bodies_are_decoded(gateway, upstream, coding):
    upstream.clear()
    body = {"model": "demo-model", "input": f"packed with {coding}", "stream": True}
    r = post(gateway.base_url, ENCODERS[coding](json.dumps(body).encode()), {"content-encoding": coding})
    assert r.status_code == 200, r.text
    final = parse_sse(r.content)[-1]["response"]
    assert final["output"][-1]["content"][0]["text"] == f"You said: packed with {coding}"
    assert upstream.requests()[-1]["messages"][-1]["content"] == f"packed with {coding}"


def test_codex_sized_zstd_request(gateway, upstream):
    """Codex (enable_request_compression, with a ChatGPT login) sends zstd of its ~40 KB body."""
    from conftest import codex_fixture

    body = codex_fixture("03-tool-call-turn2-with-output.json")["body"]
    r = post(gateway.base_url, zstd.compress(json.dumps(body).encode(), 3), {"content-encoding": "zstd"})
    assert r.status_code == 200, r.text
    assert parse_sse(r.content)[-1]["type"] == "response.completed"


def test_a_zip_bomb_is_413_and_the_gateway_lives_on(gateway_factory, upstream):
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_request_body_mb=1")
    inner = json.dumps({"model": "demo-model", "input": "x" * (4 << 20)}).encode()
    bomb = gzip.compress(inner)
    assert len(bomb) < 64 << 10
    r = post(gw.base_url, bomb, {"content-encoding": "gzip"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "once decoded" in r.json()["error"]["message"]
    # under the limit once decoded: served
    r = post(gw.base_url, gzip.compress(json.dumps({"model": "demo-model", "input": "small"}).encode()),
             {"content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "You said: small"


def test_unsupported_and_corrupt_encodings(gateway):
    body = json.dumps({"model": "demo-model", "input": "hi"}).encode()
    r = post(gateway.base_url, body, {"content-encoding": "compress"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_content_encoding"
    assert "compress" in r.json()["error"]["message"]
    r = post(gateway.base_url, gzip.compress(body)[:-8], {"content-encoding": "gzip"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_body"
    r = post(gateway.base_url, body, {"content-encoding": "identity"})
    assert r.status_code == 200
