"""Several upstreams in the core (resp2chat_core/routing.py): entries, which serve a model, when
to fall back, the Attempt that holds a failure back, and each candidate's own lowering."""

from __future__ import annotations

import json

import pytest

from resp2chat_core import settings as S
from resp2chat_core.channel import Channel, Keepalive, Rerouted, UpstreamFailed, UpstreamJSON
from resp2chat_core.errors import GatewayError
from resp2chat_core.lowering import LoweringOptions
from resp2chat_core.routing import KINDS, Attempt, all_failed, candidates, deciding, falls_back, kind
from resp2chat_core.settings import parse_upstreams
from resp2chat_core.turn import ToolsCache, begin_turn

A = {"name": "a", "base_url": "http://10.0.0.1:8000/v1", "models": ["qwen*"], "api_key": "sk-aaaaaaaaaa"}
B = {"name": "b", "base_url": "https://b.example/api/v1", "max_tokens_field": "max_completion_tokens",
     "think_tags": {"*": "open"}}


def test_entries_parse_with_defaults_and_overrides():
    a, b = parse_upstreams([A, B])
    assert (a.name, a.models, a.api_key, a.overrides) == ("a", ("qwen*",), "sk-aaaaaaaaaa", ())
    assert b.models == ("*",) and dict(b.overrides) == {"max_tokens_field": "max_completion_tokens",
                                                         "think_tags": {"*": "open"}}
    assert b.settings({"max_tokens_field": "max_tokens", "flatten_content": True}) == {
        "max_tokens_field": "max_completion_tokens", "flatten_content": True, "think_tags": {"*": "open"}}
    assert "sk-aaaa" not in repr(a)


@pytest.mark.parametrize("entries,field,why", [
    ([{"base_url": "http://x/v1"}], "upstreams[0].name", "expected a name"),
    ([A, {**B, "name": "a"}], "upstreams[1] ('a').name", "same name"),
    ([A, {"name": "c"}], "upstreams[1] ('c').base_url", "required"),
    ([{"name": "c", "base_url": "ftp://x"}], "upstreams[0] ('c').base_url", "http:// or https://"),
    ([{**A, "models": []}], "upstreams[0] ('a').models", "non-empty list"),
    ([{**A, "max_tokens_field": "tokens"}], "upstreams[0] ('a').max_tokens_field", "max_tokens or max_completion"),
    ([{**A, "think_tags": {"*": "sometimes"}}], "upstreams[0] ('a').think_tags", "auto, open or off"),
    ([{**A, "colour": "red"}], "upstreams[0] ('a').colour", "unknown field"),
    ([{**A, "api_key": 5}], "upstreams[0] ('a').api_key", "expected a string"),
    (["a"], "upstreams[0]", "mapping"),
])
def test_invalid_entries_name_the_entry_and_the_field(entries, field, why):
    with pytest.raises(S.SettingsError) as err:
        parse_upstreams(entries)
    assert err.value.field == field and why in err.value.why, str(err.value)


def test_the_setting_comes_from_file_environment_and_keys_never_show_in_errors():
    values, sources = S.resolve({"upstreams": [A]}, {})
    assert values["upstreams"] == [A] and sources["upstreams"] == "config file"
    values, sources = S.resolve({}, {"RESP2CHAT_UPSTREAMS": json.dumps([A, B])})
    assert [e["name"] for e in values["upstreams"]] == ["a", "b"]
    with pytest.raises(S.SettingsError) as err:
        S.resolve({}, {"RESP2CHAT_UPSTREAMS": '[{"name": "a", "api_key": "sk-secret-one", "base_url": "x"}'})
    assert "sk-secret-one" not in str(err.value)
    with pytest.raises(S.SettingsError) as err:
        S.resolve({}, {"RESP2CHAT_UPSTREAMS": json.dumps([{**A, "api_key": ["sk-secret-two"]}])})
    assert "sk-secret-two" not in str(err.value) and "upstreams[0] ('a').api_key" in str(err.value)
    assert S.secret_values({"upstreams": [A], "upstream_api_key": ""}) == (b"sk-aaaaaaaaaa",)


def test_a_model_goes_to_the_first_match_and_later_matches_are_its_fallbacks():
    specs = parse_upstreams([A, B, {"name": "c", "base_url": "http://c/v1", "models": ["qwen3-*", "llama"]}])
    assert [s.name for s in candidates(specs, "qwen3-coder")] == ["a", "b", "c"]
    assert [s.name for s in candidates(specs, "llama")] == ["b", "c"]
    assert [s.name for s in candidates(specs, "gpt-5")] == ["b"]
    with pytest.raises(GatewayError) as err:
        candidates(parse_upstreams([A]), "gpt-5")
    assert err.value.status == 404 and err.value.code == "model_not_found" and "a: qwen*" in err.value.message


def test_which_failures_fall_back():
    assert falls_back(UpstreamFailed(502, b""))  # could not connect (the relay's own)
    assert falls_back(UpstreamFailed(503, b"")) and falls_back(UpstreamFailed(504, b""))
    assert falls_back(UpstreamFailed(429, b""))
    assert not falls_back(UpstreamFailed(400, b"context too long"))
    # the gateway's key refused (a 401, a 403 not about the request's words): the next has its own key
    assert falls_back(UpstreamFailed(401, b"")) and falls_back(REFUSED) and falls_back(FORBIDDEN)
    # but not a 403 about what the request says (OpenRouter's moderation), nor the client's own key refused
    assert not falls_back(FLAGGED) and not falls_back(UpstreamFailed(401, REFUSED.body, forwarded=True))
    assert not falls_back(UpstreamFailed(400, b'{"error": {"message": "bad tool schema"}}'))
    assert not falls_back(UpstreamFailed(404, b'{"error": {"message": "model not found"}}'))
    # a conversation too long for this backend's context (its words or its code): the next may hold more
    assert falls_back(UpstreamFailed(400, b'{"error": {"message": "This model\'s maximum context length is 4096"}}'))
    assert falls_back(UpstreamFailed(400, b'{"error": {"message": "no", "code": "context_length_exceeded"}}'))
    assert falls_back(UpstreamFailed(413, b'{"error": {"message": "prompt is too long: 210000 tokens"}}'))


def test_an_attempt_holds_back_a_failure_before_the_first_byte_only():
    ch = Channel()
    at = Attempt(ch)
    at.event(Keepalive())  # the gateway's own words to a waiting client: pass, commit nothing
    at.event(UpstreamFailed(503, b'{"error": {"message": "busy"}}'))
    assert ch.take() == [Keepalive()] and at.failure.status == 503 and not at.committed
    at = Attempt(ch, (Rerouted("open"),))
    at.data(b"data: {}\n\n")
    at.event(UpstreamFailed(500, b"mid-stream"))  # after data: the turn hears it
    assert ch.take() == [Rerouted("open"), b"data: {}\n\n", UpstreamFailed(500, b"mid-stream")]
    assert at.failure is None and at.committed
    at = Attempt(ch)
    at.event(UpstreamJSON(b"{}"))  # a whole JSON answer commits too
    assert at.committed and ch.take() == [UpstreamJSON(b"{}")]
    at.on_take = print  # flow control reads and sets the real channel's
    assert ch.on_take is print and at.size == ch.size == 0


RATE = UpstreamFailed(429, b'{"error": {"message": "slow down"}}', "7")
QUOTA = UpstreamFailed(429, b'{"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}')
DOWN = UpstreamFailed(503, b'{"error": {"message": "overloaded"}}', "2")
UNREACHABLE = UpstreamFailed(502, json.dumps({"error": {"message": "cannot connect"}}).encode(), own=True)
SILENT = UpstreamFailed(504, json.dumps({"error": {"message": "no answer", "code": "upstream_timeout"}}).encode(),
                        own=True)
LONG = UpstreamFailed(400, b'{"error": {"message": "This model\'s maximum context length is 4096 tokens"}}')
REFUSED = UpstreamFailed(401, b'{"error": {"message": "Incorrect API key provided: sk-proj-abcdef123456", '
                              b'"code": "invalid_api_key"}}')
FORBIDDEN = UpstreamFailed(403, b'{"error": {"message": "Project does not have access to model m"}}')
FLAGGED = UpstreamFailed(403, b'{"error": {"code": 403, "message": "m requires moderation on OpenRouter. Your input '
                              b'was flagged", "metadata": {"reasons": ["harassment"], "flagged_input": "..."}}}')


def test_each_failure_that_falls_back_is_of_one_kind():
    assert [kind(f) for f in (RATE, QUOTA, DOWN, UNREACHABLE, SILENT, LONG, REFUSED, FORBIDDEN)] == [
        "rate_limited", "out_of_quota", "down", "down", "down", "too_long", "refused_key", "refused_key"]
    assert kind(UpstreamFailed(400, b"")) == "other" and kind(FLAGGED) == "other"
    assert set(KINDS) == {"rate_limited", "down", "too_long", "out_of_quota", "refused_key"}
    assert all(falls_back(f) for f in (RATE, QUOTA, DOWN, UNREACHABLE, SILENT, LONG, REFUSED, FORBIDDEN))
    # a compaction summary's refused key: the gateway's 502 that stands for it is still one
    summary = UpstreamFailed(502, json.dumps({"error": {"message": "refused", "type": "upstream_error",
                                                        "code": "upstream_key_refused"}}).encode(), own=True)
    assert kind(summary) == "refused_key" and falls_back(summary)


@pytest.mark.parametrize("tried,decides", [
    # a rate limit anywhere: the client waits and retries (whatever came after it, or before)
    ([RATE, DOWN], RATE), ([DOWN, RATE], RATE), ([UNREACHABLE, LONG, RATE], RATE), ([QUOTA, RATE], RATE),
    # an outage beats what a retry cannot cure (a conversation too long, a quota): the first outage
    ([LONG, DOWN], DOWN), ([DOWN, LONG], DOWN), ([QUOTA, UNREACHABLE], UNREACHABLE), ([SILENT, DOWN], SILENT),
    ([UNREACHABLE, SILENT], UNREACHABLE),
    # too long everywhere it was not a quota: compact (Codex), not "quota exceeded"
    ([LONG, QUOTA], LONG), ([QUOTA, LONG], LONG), ([LONG, LONG], LONG),
    ([QUOTA, QUOTA], QUOTA),
    # a refused key last: nothing the client does cures it; what another upstream said may
    ([REFUSED, RATE], RATE), ([REFUSED, DOWN], DOWN), ([LONG, REFUSED], LONG), ([REFUSED, QUOTA], QUOTA),
    ([REFUSED, FORBIDDEN], REFUSED), ([FORBIDDEN, REFUSED], FORBIDDEN),
])
def test_the_failure_that_decides_is_the_one_that_tells_the_client_what_to_do(tried, decides):
    assert deciding(tried) is decides
    codes = {RATE: ("rate_limit_exceeded", 429), DOWN: ("server_error", 503), UNREACHABLE: ("server_error", 502),
             SILENT: ("upstream_timeout", 504), LONG: ("context_length_exceeded", 400), QUOTA: ("insufficient_quota", 429),
             REFUSED: ("upstream_key_refused", 401), FORBIDDEN: ("upstream_key_refused", 403)}
    failure = all_failed("m", [(f"u{i}", f) for i, f in enumerate(tried)])
    error = json.loads(failure.body)["error"]
    assert (error["code"], failure.status) == codes[decides], (tried, error, failure.status)
    assert all(f"u{i} (" in error["message"] for i in range(len(tried)))  # (each named, whichever decides)


def test_all_failed_names_every_upstream_with_the_deciding_status():
    failure = all_failed("qwen3", [("a", UpstreamFailed(502, json.dumps({"error": {"message": "cannot connect"}}).encode(),
                                                        own=True)),  # (the relay's: no say in the wait)
                                   ("b", UpstreamFailed(429, b'{"error": {"message": "slow down"}}', "7"))])
    message = json.loads(failure.body)["error"]["message"]
    assert failure.status == 429 and failure.retry_after == "7"
    assert message.startswith("every upstream for model 'qwen3' failed: a (") and "cannot connect" in message
    assert "b (upstream HTTP 429: slow down)" in message


def test_all_failed_of_refused_keys_names_the_cause_and_keeps_the_backends_words_for_the_operator():
    failure = all_failed("m", [("a", REFUSED), ("b", FORBIDDEN)])
    error = json.loads(failure.body)["error"]
    assert error["code"] == "upstream_key_refused"
    assert error["message"].count("refused the gateway's credentials") == 2, error["message"]
    assert "Incorrect API key" not in error["message"] and "sk-proj" not in error["message"]
    raw = error["metadata"]["raw"]  # (the turn's error detail: the operator's log)
    assert "Incorrect API key provided: sk-[redacted]" in raw and "does not have access to model m" in raw
    assert "abcdef123456" not in raw


def test_all_failed_asks_for_the_shortest_wait_any_upstream_gave():
    busy = lambda wait: UpstreamFailed(429, b'{"error": {"message": "slow down"}}', wait)  # noqa: E731
    tried = [("a", busy("30")), ("b", busy("1.5")), ("d", busy("7"))]
    assert all_failed("m", tried).retry_after == "1.5"  # (a retry goes through every upstream again)
    assert all_failed("m", [("a", busy(None)), ("b", busy(None))]).retry_after is None
    # one that asked for no wait may be ready at once: the client backs off by itself, it is not
    # told another's 30 s
    assert all_failed("m", [("a", busy("30")), ("c", busy(None))]).retry_after is None
    assert all_failed("m", [("c", UpstreamFailed(504, b"")), ("a", busy("1.5"))]).retry_after is None
    # what the relay saw itself (unreachable, silent) says nothing of when: the others' wait holds
    assert all_failed("m", [("c", UpstreamFailed(504, b"", own=True)), ("a", busy("1.5"))]).retry_after == "1.5"
    # a failure a retry cannot cure (too long, a quota, a refused key) says nothing of when either:
    # the rate limit's wait holds (without it the openai SDK gave up after its two quick retries)
    for cannot in (LONG, QUOTA, REFUSED, FORBIDDEN):
        assert all_failed("m", [("a", busy("20")), ("b", cannot)]).retry_after == "20", cannot
        assert all_failed("m", [("b", cannot), ("a", busy("20"))]).retry_after == "20", cannot
    assert all_failed("m", [("b", LONG), ("c", QUOTA)]).retry_after is None  # (nothing to wait for)


def test_each_candidate_gets_its_own_deterministic_body():
    body = json.dumps({"model": "qwen3", "input": "hi", "max_output_tokens": 19,
                       "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}).encode()
    a = LoweringOptions()
    b = LoweringOptions(max_tokens_field="max_completion_tokens", think_tags={"*": "off"})
    c = LoweringOptions(tool_denylist=frozenset({"f"}))
    for cache in (None, ToolsCache(), ToolsCache()):  # no cache, a miss, then (same cache) a hit
        for _ in range(2 if cache else 1):
            turn = begin_turn(body, LoweringOptions(), "resp_x", 0, tools_cache=cache, route=lambda m: [a, b, a, c])
            (b_body, b_think, b_tools), (same, a_think, a_tools), (c_body, _, c_tools) = turn.alternates
            assert json.loads(turn.chat_body)["max_tokens"] == 19 and "max_tokens" not in json.loads(b_body)
            assert json.loads(b_body)["max_completion_tokens"] == 19 and json.loads(b_body)["tools"]
            assert (b_think, same, a_think) == ("off", None, "auto")
            assert begin_turn(body, b, "resp_x", 0).chat_body == b_body  # what b alone would get, byte for byte
            # each candidate's own tool map, for the translator to take when it answers (Rerouted)
            assert turn.ctx.tool_maps == (b_tools, a_tools, c_tools) and a_tools is turn.ctx.tool_map
            assert "f" in a_tools.targets and "f" not in c_tools.targets and "tools" not in json.loads(c_body)
    with pytest.raises(GatewayError):
        begin_turn(body, a, "resp_x", 0, route=lambda m: [a for _ in candidates(parse_upstreams([{**A, "models": ["llama*"]}]), m)])
