"""A failed Response's ``error.code`` is one a strict client takes (errors.py ``response_error``).

openai-python types ``ResponseError.code`` as a closed enum: an event or a Response whose code
is not in it does not validate (``model_validate``). The gateway's own codes for what it saw
(``upstream_timeout``, ``upstream_event_too_large``, ``upstream_output_too_large``,
``response_too_large``, a conversation write's code…) go to ``error.type`` (the SDK's "original
error type") and ``error.code`` is ``server_error``; the codes Codex acts on
(``context_length_exceeded``, ``insufficient_quota``, ``rate_limit_exceeded``,
``invalid_prompt``) are the code as before. A real gateway, a real loopback backend, the SDK's
own models, strictly (no code forgiven)."""

from __future__ import annotations

import json
import threading

import pytest
import requests

from helpers import (Codex, LocalServer, QuietHandler, chat_chunk, chat_sse, post_turn, send_json, send_sse,
                     stream_turn)
from test_e2e_codex import diag, set_retries


class _Backend(QuietHandler):
    """Behaves as the last word of the request's last message says (``once-silent``: silent the
    first time, then an answer). ``seen``: those words, one per request."""

    release = threading.Event()
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        word = body["messages"][-1]["content"]
        word = word if isinstance(word, str) else word[-1]["text"]
        word = word.split()[-1]
        type(self).seen.append(word)
        if word == "once-silent" and type(self).seen.count(word) == 1:
            word = "silent"
        if word == "silent":
            type(self).release.wait(30)
            return
        if word == "huge":  # one SSE line past max_upstream_event_mb (1 MiB)
            return send_sse(self, b"data: " + b"x" * (3 << 19) + b"\n\n")
        errors = {"ctx": (400, "This model's maximum context length is 8192 tokens"),
                  "quota": (429, "You exceeded your current quota, please check your plan and billing details"),
                  "busy": (429, "Rate limit reached"),
                  "bad": (400, "messages: something is wrong"),
                  "keyless": (401, "Incorrect API key provided: sk-echoed-0123456789"),
                  "moderated": (403, "m requires moderation on OpenRouter. Your input was flagged")}
        if word in errors:
            status, text = errors[word]
            return send_json(self, status, {"error": {"message": text, "type": "invalid_request_error"}})
        send_sse(self, chat_sse(chat_chunk({"role": "assistant", "content": "hi"}), chat_chunk(finish="stop")))


@pytest.fixture
def gw(gateway_factory):
    _Backend.release.clear()
    _Backend.seen = []
    with LocalServer(_Backend) as server:
        yield gateway_factory(server.url, "--set", "resp2chat_upstream_idle_timeout_secs=1", "--set", "resp2chat_keepalive_secs=0",
                              "--set", "resp2chat_max_upstream_event_mb=1", "--set", "resp2chat_max_replay_entries=0")
        _Backend.release.set()


def _strict_events(events: list[dict]) -> None:
    """Every event, as the SDK types it, with nothing forgiven."""
    import pydantic
    from openai.types.responses import ResponseStreamEvent

    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)


# (the gateway's own failures: the specific code goes to type; Codex retries either code alike)
# (and a backend's 401: the gateway's key refused, errors.py KEY_REFUSED: the operator's to fix)
OWN = {"silent": "upstream_timeout", "huge": "upstream_event_too_large", "keyless": "upstream_key_refused"}
# (what Codex acts on, unchanged: README's table; a 403 about what the request says is the request's)
CODEX = {"ctx": "context_length_exceeded", "quota": "insufficient_quota", "busy": "rate_limit_exceeded",
         "bad": "invalid_prompt", "moderated": "invalid_prompt"}


@pytest.mark.parametrize("word", [*OWN, *CODEX])
def test_failed_responses_validate_strictly_and_keep_codex_codes(gw, word):
    from openai.types.responses import Response

    events = stream_turn(gw, {"model": "m", "input": f"please {word}", "store": True})
    end = events[-1]
    assert end["type"] == "response.failed", [e["type"] for e in events]
    error = end["response"]["error"]
    if word in OWN:
        assert (error["code"], error.get("type")) == ("server_error", OWN[word]), error
        _strict_events(events)
    else:
        assert error["code"] == CODEX[word], error
        # (the two codes the SDK's enum lacks are the real API's and Codex's: they stay)
        if error["code"] not in ("context_length_exceeded", "insufficient_quota"):
            _strict_events(events)
    # the stored Response (GET) the same
    got = requests.get(f"{gw.base_url}/responses/{end['response']['id']}", timeout=10).json()
    assert got["error"]["code"] == error["code"] and got["error"].get("type") == error.get("type"), got["error"]
    if word in OWN:
        Response.model_validate(got)


def test_json_client_keeps_the_specific_code_in_its_http_error(gw):
    """A client that did not stream gets an HTTP error body, whose ``code`` is a free string for
    every client (openai SDK ``APIError.code``): the gateway's specific code, as before."""
    r = post_turn(gw, {"model": "m", "input": "please silent"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_timeout", r.text
    # the backend refused the gateway's key: a 502 naming the cause (never the 400 of a wrong request)
    r = post_turn(gw, {"model": "m", "input": "please keyless"})
    error = r.json()["error"]
    assert (r.status_code, error["code"], error["type"]) == (502, "upstream_key_refused", "upstream_error"), r.text
    assert "refused the gateway's credentials" in error["message"] and "sk-echoed" not in r.text


def test_the_codes_a_strict_client_takes_are_the_sdk_s_own():
    """errors.py's copy of the SDK's enum is the enum (a newer SDK that adds a code: add it)."""
    import typing

    from openai.types.responses.response_error import ResponseError

    from resp2chat_core.errors import CODEX_CODES, RESPONSE_CODES, response_error

    assert RESPONSE_CODES == set(typing.get_args(ResponseError.model_fields["code"].annotation))
    for code in CODEX_CODES:
        assert response_error(code, "m") == {"code": code, "message": "m"}  # (README's table: Codex's)
    assert response_error("store_unavailable", "m") == {"code": "server_error", "message": "m", "type": "store_unavailable"}


@pytest.mark.codex
def test_codex_acts_on_the_codes_as_before(gw, codex_bin, tmp_path):
    """The real Codex CLI, two stream retries allowed: a gateway's own failure (a silent backend:
    ``server_error``, type ``upstream_timeout``) is retried as the specific code was (Codex retries
    any code it does not know), and the retry is answered; ``context_length_exceeded`` still ends
    the turn at once with Codex's own words for it (its context window), never retried; the
    gateway's key refused by the backend ends it with the gateway's words for that, retried."""
    codex = Codex.at(codex_bin, tmp_path)
    codex.configure(gw.base_url)
    set_retries(codex, stream=2)
    run = codex.exec("please once-silent", timeout=90)
    assert run.returncode == 0 and "hi" in run.stdout, diag(run, gw)
    assert _Backend.seen.count("once-silent") == 2, _Backend.seen
    run = codex.exec("please ctx", timeout=90)
    assert run.returncode != 0 and "context window" in run.output, diag(run, gw)
    assert _Backend.seen.count("ctx") == 1, _Backend.seen
    # the backend refused the gateway's key: Codex tells its user the gateway's operator must fix it
    # (not "your request is wrong"), after its retries (server_error: the key may be fixed meanwhile)
    run = codex.exec("please keyless", timeout=90)
    assert run.returncode != 0 and "refused the gateway's credentials" in run.output, diag(run, gw)
    assert "sk-echoed" not in run.output and _Backend.seen.count("keyless") == 3, _Backend.seen
