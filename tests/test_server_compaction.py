"""Server-side compaction: ``context_management: [{"type": "compaction", "compact_threshold": N}]``
on a turn (resp2chat_core/compaction.py ``ServerCompaction``), through a real mitmdump and the
scripted demo backend (which answers "You said: " + the last line of the last user message: so
its summary is "You said: Write the summary now.", the compaction prompt's last line), driven by
the openai SDK, a WebSocket client and the OpenAI Agents SDK."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests

from helpers import (
    LocalServer, QuietHandler, chat_chunk, chat_completion, chat_event, chat_sse, check_stream, cli_env, free_port,
    http_chunk, logged_bodies, openai_client, parse_sse, post_turn, read_flows, run_cli, scrape, send_json, send_paced,
    send_sse, start_gateway, start_sse, wait_until,
)
from resp2chat_core.compaction import COMPACTION_PROMPT, SUMMARY_PREFIX
from resp2chat_core.errors import specific_code
from wsclient import WSClient

HISTORY = [{"role": "user", "content": "my name is Ada"},
           {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada"}]},
           {"role": "user", "content": "I like tea"}]
OVER = [{"type": "compaction", "compact_threshold": 1}]  # every request is over it
UNDER = [{"type": "compaction", "compact_threshold": 1_000_000}]
SUMMARY = "You said: Write the summary now."
COMPACTED = [{"role": "user", "content": "my name is Ada"}, {"role": "user", "content": "I like tea"},
             {"role": "user", "content": SUMMARY_PREFIX + SUMMARY}]  # the answer round's messages


def kinds(output) -> list[str]:
    """The output's item types, reasoning left out (the demo backend reasons before it answers)."""
    return [o["type"] if isinstance(o, dict) else o.type for o in output
            if (o["type"] if isinstance(o, dict) else o.type) != "reasoning"]


def said(messages: list[dict]) -> list[dict]:
    """Chat messages without what lowering adds to an assistant's (its reasoning)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def test_over_the_threshold_the_turn_compacts_first_then_answers_on_the_compacted_input(own_gateway, upstream):
    client = openai_client(own_gateway)
    upstream.clear()
    r = client.responses.create(model="demo-model", input=HISTORY, context_management=OVER)
    assert kinds(r.output) == ["compaction", "message"]
    # sealed: the summary the backend wrote is not in it (a phrase with spaces: base64 never spells one by chance)
    assert r.output[0].encrypted_content.startswith("r2c1.") and SUMMARY not in r.output[0].encrypted_content
    assert r.output_text == "You said: " + SUMMARY
    summary, answer = upstream.requests()
    # the compaction request: the whole conversation, the prompt last, as POST /v1/responses/compact sends it
    assert [m["content"] for m in summary["messages"]][:-1] == ["my name is Ada", "Hello Ada", "I like tea"]
    assert summary["messages"][-1] == {"role": "user", "content": COMPACTION_PROMPT}
    assert answer["messages"] == COMPACTED  # the user messages, then the summary in the item's place
    # the usage: the answer's, plus the summary the turn wrote
    assert r.usage.output_tokens > len("You said: You said: Write the summary now.".split())
    # stored: the next turn (previous_response_id, no context_management) continues from the compacted state
    upstream.clear()
    later = client.responses.create(model="demo-model", previous_response_id=r.id, input="what do I like?")
    assert later.output_text == "You said: what do I like?"
    (sent,) = upstream.requests()
    assert said(sent["messages"]) == [*COMPACTED, {"role": "assistant", "content": "You said: " + SUMMARY},
                                {"role": "user", "content": "what do I like?"}]
    items = requests.get(f"{own_gateway.base_url}/responses/{r.id}/input_items", timeout=10).json()["data"]
    assert [i["role"] for i in items] == ["user", "user"]


def test_under_the_threshold_the_turn_is_the_one_it_always_was(own_gateway, upstream):
    client = openai_client(own_gateway)
    upstream.clear()
    plain = client.responses.create(model="demo-model", input=HISTORY, store=False)
    managed = client.responses.create(model="demo-model", input=HISTORY, store=False, context_management=UNDER)
    assert kinds(managed.output) == ["message"] and managed.output_text == plain.output_text
    first, second = upstream.requests()
    assert first == second  # (one chat request each, the same)


def test_a_stateless_client_appends_the_output_and_the_item_lowers_to_one_summary_message(own_gateway, upstream):
    """The Agents SDK's rule (sandbox compaction's process_context): the client drops what came
    before the compaction item and sends the output on."""
    client = openai_client(own_gateway)
    r = client.responses.create(model="demo-model", input=HISTORY, store=False, context_management=OVER)
    later = [o.model_dump(exclude_none=True, warnings=False) for o in r.output] + [
        {"role": "user", "content": "what do I like?"}]
    upstream.clear()
    assert client.responses.create(model="demo-model", input=later, store=False).output_text == \
        "You said: what do I like?"
    (sent,) = upstream.requests()
    assert said(sent["messages"]) == [{"role": "user", "content": SUMMARY_PREFIX + SUMMARY},
                                {"role": "assistant", "content": "You said: " + SUMMARY},
                                {"role": "user", "content": "what do I like?"}]


def test_the_stream_opens_with_the_compaction_item(own_gateway, upstream):
    raw = requests.post(f"{own_gateway.base_url}/responses", timeout=30, json={
        "model": "demo-model", "input": HISTORY, "stream": True, "context_management": OVER}).content
    events = check_stream(raw, parse_sse(raw)[0]["response"]["id"])
    items = [(e["type"], e["output_index"], e["item"]["type"]) for e in events if e["type"].startswith(
        "response.output_item.") and e["item"]["type"] != "reasoning"]
    assert items[:2] == [("response.output_item.added", 0, "compaction"),
                         ("response.output_item.done", 0, "compaction")]
    assert [i[2] for i in items[2:]] == ["message", "message"]
    end = events[-1]["response"]
    assert end["status"] == "completed" and kinds(end["output"]) == ["compaction", "message"]


def test_the_websocket_compacts_as_http_does(own_gateway, upstream):
    ws = WSClient(own_gateway.base_url)
    upstream.clear()
    events = ws.turn({"type": "response.create", "model": "demo-model", "input": HISTORY, "store": False,
                      "context_management": OVER})
    ws.close()
    assert kinds(events[-1]["response"]["output"]) == ["compaction", "message"]
    assert upstream.requests()[-1]["messages"] == COMPACTED


@pytest.mark.parametrize("entries, param, code", [
    ([{"type": "truncation"}], "context_management[0].type", "unsupported_value"),
    ([{"type": "compaction", "compact_threshold": -1}], "context_management[0].compact_threshold", "invalid_value"),
    ([{"type": "compaction", "compact_threshold": 5}, "x"], "context_management[1]", "invalid_type"),
    ({"type": "compaction"}, "context_management", "invalid_type"),
])
def test_an_entry_it_cannot_run_is_a_400_naming_it(own_gateway, upstream, entries, param, code):
    upstream.clear()
    r = post_turn(own_gateway, {"model": "demo-model", "input": "hi", "context_management": entries})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and r.json()["error"]["code"] == code
    assert upstream.requests() == []


ENTRY = {"type": "compaction", "compact_threshold": 5}
ONLY_ONE = ("context_management[1]", "invalid_value", "context_management[1]: only one compaction entry")
NOT_AN_INT = "required, a non-negative integer (tokens)"


@pytest.mark.parametrize("entries, expected", [
    ({"type": "compaction"}, ("context_management", "invalid_type", "context_management: a list of entries")),
    ("compaction", ("context_management", "invalid_type", "context_management: a list of entries")),
    (["x"], ("context_management[0]", "invalid_type", "context_management[0]: an object")),
    ([None], ("context_management[0]", "invalid_type", "context_management[0]: an object")),
    ([{"compact_threshold": 5}], ("context_management[0].type", "invalid_type",
                                  "context_management[0].type: required, a string")),
    ([{"type": 5, "compact_threshold": 5}], ("context_management[0].type", "invalid_type",
                                             "context_management[0].type: required, a string")),
    ([{"type": "truncation"}], ("context_management[0].type", "unsupported_value",
                                "context_management[0].type: 'truncation' not supported (only \"compaction\")")),
    ([{"type": "t" * 150}], ("context_management[0].type", "unsupported_value",
                             f"context_management[0].type: {'t' * 100!r} not supported (only \"compaction\")")),
    ([{"type": "compaction"}], ("context_management[0].compact_threshold", "invalid_value",
                                f"context_management[0].compact_threshold: {NOT_AN_INT}")),
    *(([{"type": "compaction", "compact_threshold": value}], ("context_management[0].compact_threshold",
                                                             "invalid_value",
                                                             f"context_management[0].compact_threshold: {NOT_AN_INT}"))
      for value in (-1, True, 5.0, "5", None)),
    ([{**ENTRY, "keep": 1}], ("context_management[0].keep", "unknown_parameter",
                              "context_management[0].keep: unknown parameter")),
    ([{**ENTRY, "a[0]": 1}], ("context_management[0].a[0]", "unknown_parameter",
                              "context_management[0].a[0]: unknown parameter")),
    ([{**ENTRY, "k" * 150: 1}], (f"context_management[0].{'k' * 100}", "unknown_parameter",
                                 f"context_management[0].{'k' * 100}: unknown parameter")),
    # the first entry that is wrong, and in it: the type, then a key it does not know, then the threshold
    ([{"type": "truncation", "keep": 1}], ("context_management[0].type", "unsupported_value",
                                           "context_management[0].type: 'truncation' not supported (only \"compaction\")")),
    ([{"type": "compaction", "compact_threshold": -1, "keep": 1}], ("context_management[0].keep", "unknown_parameter",
                                                                    "context_management[0].keep: unknown parameter")),
    (["x", {"type": "truncation"}], ("context_management[0]", "invalid_type", "context_management[0]: an object")),
    ([ENTRY, "x"], ("context_management[1]", "invalid_type", "context_management[1]: an object")),
    ([ENTRY, ENTRY], ONLY_ONE),
    ([ENTRY, ENTRY, "x"], ONLY_ONE),
    ([ENTRY, {"type": "compaction"}], ("context_management[1].compact_threshold", "invalid_value",
                                       f"context_management[1].compact_threshold: {NOT_AN_INT}")),
])
def test_each_entry_error_names_its_place_code_and_reason(own_gateway, upstream, entries, expected):
    upstream.clear()
    r = post_turn(own_gateway, {"model": "demo-model", "input": "hi", "context_management": entries})
    error = r.json()["error"]
    assert r.status_code == 400 and (error["param"], error["code"], error["message"]) == expected, r.text
    assert upstream.requests() == []


def test_an_entry_error_comes_before_the_request_s_other_field_errors(own_gateway, upstream):
    r = post_turn(own_gateway, {"model": "demo-model", "input": "hi", "temperature": 5,
                                "context_management": [{"type": "compaction"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "context_management[0].compact_threshold"


def test_the_websocket_and_input_tokens_refuse_an_entry_as_a_turn_does(own_gateway, upstream):
    ws = WSClient(own_gateway.base_url)
    [error] = ws.turn({"type": "response.create", "model": "demo-model", "input": "hi",
                       "context_management": [{"type": "compaction"}]})
    ws.close()
    assert error["type"] == "error" and error["status"] == 400, error
    assert (error["error"]["param"], error["error"]["code"]) == ("context_management[0].compact_threshold",
                                                                  "invalid_value")
    r = requests.post(own_gateway.base_url + "/responses/input_tokens", timeout=30, json={
        "model": "demo-model", "input": "hi", "context_management": [{"type": "compaction", "compact_threshold": -1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "context_management[0].compact_threshold", r.text


@pytest.mark.parametrize("entries", [None, [], [{"type": "compaction", "compact_threshold": 10**30}]])
def test_no_entry_or_a_threshold_never_reached_is_a_turn_as_any(own_gateway, upstream, entries):
    upstream.clear()
    r = post_turn(own_gateway, {"model": "demo-model", "input": HISTORY, "store": False,
                                "context_management": entries})
    assert r.status_code == 200, r.text
    assert kinds(r.json()["output"]) == ["message"] and len(upstream.requests()) == 1
    assert "context_management" not in upstream.requests()[0]


def test_a_conversation_refuses_compaction_and_still_validates_the_entries(own_gateway, upstream):
    client = openai_client(own_gateway)
    conv = client.conversations.create().id
    upstream.clear()
    r = post_turn(own_gateway, {"model": "demo-model", "input": "hi", "conversation": conv, "context_management": OVER})
    error = r.json()["error"]
    assert r.status_code == 400 and (error["param"], error["code"]) == ("context_management", "unsupported_parameter")
    assert error["message"].startswith("context_management: not supported together with conversation here")
    r = post_turn(own_gateway, {"model": "demo-model", "input": "hi", "conversation": conv,
                                "context_management": [{"type": "truncation"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_value", r.text
    assert upstream.requests() == []
    r = post_turn(own_gateway, {"model": "demo-model", "input": "hi", "conversation": conv, "context_management": []})
    assert r.status_code == 200, r.text


def test_the_agents_sdk_sends_it_through_model_settings(own_gateway, upstream):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    model = OpenAIResponsesModel(model="demo-model", openai_client=openai_client(
        own_gateway, api_key="unused", asynchronous=True))
    agent = Agent(name="a", model=model, model_settings=ModelSettings(context_management=OVER))
    upstream.clear()
    result = asyncio.run(Runner.run(agent, "my name is Ada"))
    assert result.final_output == "You said: " + SUMMARY
    assert kinds(result.raw_responses[0].output) == ["compaction", "message"]
    summary, answer = upstream.requests()
    assert summary["messages"][-1]["content"] == COMPACTION_PROMPT
    assert answer["messages"][-1]["content"] == SUMMARY_PREFIX + SUMMARY


def test_tpm_and_the_metrics_count_both_rounds(tmp_path, upstream):
    """The client's usage is the answer's (plus the summary's output), but its backend read two
    prompts: tpm spends both rounds whole (as the tool loop's rounds: limits.py), and the
    metrics count both."""
    from resp2chat_io.demo_upstream import canonical_prompt, prompt_tokens

    key = run_cli(tmp_path, "keys", "add", "carol", "--tpm", "6000").stdout.strip()
    gw = start_gateway(upstream.origin, tmp_path, "--set", "resp2chat_max_replay_entries=0", env=cli_env(tmp_path))
    try:
        auth = {"authorization": f"Bearer {key}"}
        upstream.clear()
        start = time.monotonic()
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "context_management": OVER}, auth)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        summary, answer = upstream.requests()
        prompts = [prompt_tokens(canonical_prompt(body)) for body in (summary, answer)]
        assert usage["input_tokens"] == prompts[1]  # (the client's: the context its answer used)
        spent = sum(prompts) + usage["output_tokens"]  # (both rounds' outputs are in the client's)
        tokens = {dict(labels)["kind"]: value for (name, labels), value in scrape(gw, **auth).items()
                  if name == "resp2chat_tokens_total"}
        assert (tokens["prompt"], tokens["output"]) == (sum(prompts), usage["output_tokens"]), (tokens, prompts)
        left = int(post_turn(gw, {"model": "demo-model", "input": "x"}, auth).headers["x-ratelimit-remaining-tokens"])
        refilled = (time.monotonic() - start) * 100 + 1  # (6000 a minute come back)
        assert 6000 - spent - 60 <= left <= 6000 - spent + refilled, (left, spent, prompts)
    finally:
        gw.stop()


class _FailedSummary(QuietHandler):
    """A backend that answers the compaction request with ``summary`` (``(status, body)``: a JSON
    body when it begins with ``{``, else an SSE stream, status 200) and anything else with a
    plain answer: ``bodies``, every chat request. A test sets both before its gateway runs."""

    summary: tuple[int, bytes] = (500, b"{}")
    bodies: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).bodies.append(body)
        status, answer = _FailedSummary.summary
        if body["messages"][-1]["content"] != COMPACTION_PROMPT:
            send_sse(self, chat_sse(chat_chunk({"content": "answer"}), chat_chunk(finish="stop")))
        elif answer.startswith(b"{"):
            send_json(self, status, answer)
        else:
            send_sse(self, answer)


def _failing_summary(summary: tuple[int, bytes]) -> LocalServer:
    """A ``_FailedSummary`` backend answering summaries with ``summary``, its ``bodies`` emptied."""
    _FailedSummary.summary, _FailedSummary.bodies = summary, []
    return LocalServer(_FailedSummary)


@pytest.mark.parametrize("summary, code", [
    ((500, json.dumps({"error": {"message": "out of memory", "type": "server_error"}}).encode()), "server_error"),
    ((200, chat_sse(chat_chunk(finish="stop"))), "server_error"),
    ((200, chat_sse({"error": {"message": "This model's maximum context length is 4096 tokens",  # (in a 200 stream)
                               "type": "invalid_request_error", "code": "context_length_exceeded"}})),
     "context_length_exceeded"),
], ids=["500", "200", "error object"])
def test_a_compaction_round_without_a_summary_fails_the_turn_and_no_answer_runs(gateway_factory, summary, code):
    """The backend's failure as any turn's (its error object's code: Codex acts on it), else
    ``server_error``."""
    with _failing_summary(summary) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        raw = requests.post(f"{gw.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": HISTORY, "stream": True, "context_management": OVER}).content
        events = check_stream(raw, parse_sse(raw)[0]["response"]["id"])
        end = events[-1]
        assert end["type"] == "response.failed" and end["response"]["output"] == []
        assert end["response"]["error"]["code"] == code
        assert len(_FailedSummary.bodies) == 1  # (the answer round never ran)
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "context_management": OVER})
        assert r.status_code >= 400 and r.json()["error"]["code"] == code, r.text


class _SlowSummary(QuietHandler):
    """A backend whose summary takes ~2.5 s to stream (a word every 0.5 s); answers at once."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body["messages"][-1]["content"] != COMPACTION_PROMPT:
            send_sse(self, chat_sse(chat_chunk({"content": "answer"}), chat_chunk(finish="stop")))
            return
        send_paced(self, [chat_sse(chat_chunk({"content": f"word{i} "}), done=False) for i in range(5)] + [
            chat_sse(chat_chunk(finish="stop"))], 0.5)


def test_the_client_hears_keepalives_while_the_summary_is_written(gateway_factory):
    """The summary streams to nobody: without keepalives a client's idle timer (Codex's, a
    proxy's) would see a silent stream for as long as the backend writes it."""
    with LocalServer(_SlowSummary) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0", "--set",
                             "resp2chat_keepalive_secs=1")
        raw = requests.post(f"{gw.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": HISTORY, "stream": True, "context_management": OVER}).content
        events = check_stream(raw, parse_sse(raw)[0]["response"]["id"])
        before = [e["type"] for e in events][:[e["type"] for e in events].index("response.output_item.added")]
        assert before.count("response.in_progress") >= 3, before  # (the first, then one a second)
        assert events[-1]["response"]["output"][0]["type"] == "compaction"
        assert "word4" not in raw.decode()  # (the summary is sealed, never streamed)


class _Busy(QuietHandler):
    """A backend that answers every chat request with ``status`` (and its ``Retry-After``), counted in ``calls``."""

    status, retry_after, calls = 503, None, 0

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        type(self).calls += 1
        send_json(self, self.status, {"error": {"message": "busy", "type": "server_error"}},
                  headers={"retry-after": self.retry_after})


def _upstreams(*entries: tuple[str, str]) -> tuple[str, str]:
    return "--set", "resp2chat_upstreams=" + json.dumps([{"name": n, "base_url": u} for n, u in entries])


@pytest.mark.parametrize("first", ["dead", "busy"])
def test_the_summary_falls_back_as_the_answer_does_and_the_answer_stays_with_its_writer(
        gateway_factory, upstream, tmp_path, first):
    """The first upstream is down (a closed port: 502) or busy (503): the summary comes from the
    next one, and so does the answer (the first is not asked again in the turn); the flow and
    the record show the upstream that answered and the one fallen back from. The WebSocket alike."""
    busy = type("Busy", (_Busy,), {"calls": 0})
    with LocalServer(busy) as server:
        down = f"http://127.0.0.1:{free_port()}/v1" if first == "dead" else server.url + "/v1"
        flows = tmp_path / "flows.mitm"
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0", "-w", str(flows),
                             *_upstreams((first, down), ("good", upstream.base_url)))
        upstream.clear()
        r = openai_client(gw).responses.create(model="demo-model", input=HISTORY, context_management=OVER)
        assert kinds(r.output) == ["compaction", "message"] and r.output_text == "You said: " + SUMMARY
        summary, answer = upstream.requests()
        assert summary["messages"][-1] == {"role": "user", "content": COMPACTION_PROMPT}
        assert answer["messages"] == COMPACTED
        assert busy.calls == (1 if first == "busy" else 0)  # (the summary's try only)
        upstream.clear()
        ws = WSClient(gw.base_url)
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": HISTORY, "store": False,
                          "context_management": OVER})
        ws.close()
        assert events[-1]["type"] == "response.completed", events[-1]
        assert kinds(events[-1]["response"]["output"]) == ["compaction", "message"]
        assert [m["messages"][-1]["content"] for m in upstream.requests()] == [COMPACTION_PROMPT,
                                                                                SUMMARY_PREFIX + SUMMARY]
    gw.stop()
    flow = next(f for f in read_flows(flows) if f.request.path.endswith("/chat/completions"))
    meta = flow.metadata["resp2chat"]
    assert meta["upstream_name"] == "good" and flow.request.url == upstream.base_url + "/chat/completions"
    assert meta["fallbacks"] == [{"upstream": first, "status": 502 if first == "dead" else 503}]


def test_every_upstream_failing_the_summary_is_the_error_a_turn_gets(gateway_factory):
    """As for any turn: one error naming every upstream tried, the status that decides (routing.py
    ``deciding``), the shortest Retry-After any gave; over HTTP (status), a stream and the WebSocket
    (response.failed)."""
    slow = type("Slow", (_Busy,), {"status": 429, "retry_after": "30", "calls": 0})
    soon = type("Soon", (_Busy,), {"status": 429, "retry_after": "7", "calls": 0})
    with LocalServer(slow) as a, LocalServer(soon) as b:
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                             *_upstreams(("slow", a.url + "/v1"), ("soon", b.url + "/v1")))
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "context_management": OVER})
        assert r.status_code == 429 and r.headers["retry-after"] == "7", (r.status_code, r.headers, r.text)
        error = r.json()["error"]
        assert "every upstream for model 'demo-model' failed" in error["message"], error
        assert "slow (" in error["message"] and "soon (" in error["message"]
        raw = requests.post(f"{gw.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": HISTORY, "stream": True, "context_management": OVER}).content
        end = check_stream(raw, parse_sse(raw)[0]["response"]["id"])[-1]
        assert end["type"] == "response.failed" and end["response"]["error"]["code"] == "rate_limit_exceeded"
        assert end["response"]["output"] == []
        ws = WSClient(gw.base_url)
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": HISTORY, "store": False,
                          "context_management": OVER})
        ws.close()
        assert events[-1]["type"] == "response.failed", events[-1]
        assert events[-1]["response"]["error"]["code"] == "rate_limit_exceeded"
        assert "every upstream" in events[-1]["response"]["error"]["message"]
        assert slow.calls == soon.calls == 3  # (each asked once a turn: the summary; no answer round)


def test_a_fallback_writes_the_summary_and_answers_with_its_own_lowering_and_think_tags(gateway_factory, upstream):
    """The fallback's own settings (routing.py: per-upstream lowering) hold for both calls of
    the turn: its summary request is its own lowering (max_completion_tokens), and its answer's
    <think> tags are read its way ("off": they stay text), the compaction item before it."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    entries = [{"name": "dead", "base_url": dead},
               {"name": "raw", "base_url": upstream.base_url, "think_tags": {"*": "off"},
                "max_tokens_field": "max_completion_tokens"}]
    gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                         "--set", "resp2chat_upstreams=" + json.dumps(entries))
    upstream.clear()
    r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "max_output_tokens": 200, "store": False,
                       "context_management": OVER}, {"x-demo-dialect": "think"})
    assert r.status_code == 200, r.text
    output = r.json()["output"]
    assert [o["type"] for o in output] == ["compaction", "message"], output  # ("off": no reasoning item)
    assert "<think>" in output[1]["content"][0]["text"]
    summary, answer = upstream.requests()
    assert summary["messages"][-1]["content"] == COMPACTION_PROMPT
    assert summary["max_completion_tokens"] == answer["max_completion_tokens"] == 200 and "max_tokens" not in summary


class _SummaryThenBusy(QuietHandler):
    """A backend that writes the summary (its first chat request) and answers 503 after."""

    calls = 0

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        type(self).calls += 1
        if type(self).calls == 1:
            send_sse(self, b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Ada asked."}}]}\n\n'
                           b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        else:
            send_json(self, 503, {"error": {"message": "busy", "type": "server_error"}})


def test_an_answer_falling_back_after_the_summary_is_read_its_upstreams_way(gateway_factory, upstream):
    """The first upstream writes the summary, then fails the answer (503): the answer comes from
    the fallback, read its way (``think_tags`` "off": its <think> stays text), though the output
    already holds the compaction item."""
    first = type("First", (_SummaryThenBusy,), {"calls": 0})
    with LocalServer(first) as server:
        entries = [{"name": "first", "base_url": server.url + "/v1"},
                   {"name": "raw", "base_url": upstream.base_url, "think_tags": {"*": "off"}}]
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_upstreams=" + json.dumps(entries))
        upstream.clear()
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER},
                      {"x-demo-dialect": "think"})
        assert r.status_code == 200, r.text
        output = r.json()["output"]
        assert [o["type"] for o in output] == ["compaction", "message"], output  # ("off": no reasoning item)
        assert "<think>" in output[1]["content"][0]["text"], output
        assert first.calls == 2  # (the summary, then the answer it failed)
        (answer,) = upstream.requests()
        assert answer["messages"][-1]["content"] == SUMMARY_PREFIX + "Ada asked."


class _JsonSummary(QuietHandler):
    """A backend that ignores ``stream``: it answers the summary request with one JSON body
    (``summary``: a ``chat.completion``, or bytes as they are), the answer as a stream; ``bodies``,
    every chat request."""

    summary: object = None
    bodies: list[dict] = []
    close = False  # the JSON answer says ``connection: close`` (it is whole all the same)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).bodies.append(body)
        if body["messages"][-1]["content"] != COMPACTION_PROMPT:
            send_sse(self, chat_sse(chat_chunk({"content": "answer"}), chat_chunk(finish="stop"), chat_chunk(
                choices=[], usage={"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53})))
            return
        send_json(self, 200, self.summary, close=self.close)


@pytest.mark.parametrize("close", [False, True])
def test_a_summary_answered_with_json_is_the_summary_not_the_turn_s_answer(gateway_factory, close):
    """A backend that ignores ``stream`` (a JSON ``chat.completion``) writes the summary as a
    stream does: its text (think tags left out) sealed into the item, its usage counted; the
    answer then runs. A JSON body that is no completion fails the turn as a garbage stream does,
    and no answer runs. A whole body is an answer whether or not the backend keeps the
    connection (``close``: HTTP/1.0 servers, a server that closes after its share of requests)."""
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up",
                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                      "role": "assistant", "content": "<think>who is she?</think>Ada likes tea."}}],
                  "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}}
    handler = type("Json", (_JsonSummary,), {"summary": completion, "bodies": [], "close": close})
    with LocalServer(handler) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [o["type"] for o in out["output"]] == ["compaction", "message"], out["output"]
        assert out["output"][1]["content"][0]["text"] == "answer"
        assert out["usage"]["output_tokens"] == 3 + 7  # (the answer's, and the summary's output)
        summary, answer = handler.bodies
        assert summary["messages"][-1]["content"] == COMPACTION_PROMPT
        assert answer["messages"][-1] == {"role": "user", "content": SUMMARY_PREFIX + "Ada likes tea."}
        handler.summary, handler.bodies = b"<html>502 Bad Gateway</html>", []
        raw = requests.post(f"{gw.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": HISTORY, "stream": True, "store": False,
            "context_management": OVER}).content
        end = check_stream(raw, parse_sse(raw)[0]["response"]["id"])[-1]
        assert end["type"] == "response.failed" and end["response"]["output"] == [], end
        message = end["response"]["error"]["message"]  # (a garbage stream's, the compact endpoint's: words withheld)
        assert message.startswith("upstream error: upstream sent a body that is neither SSE nor JSON"), end
        assert "html" not in message and "request id req_" in message, end
        assert len(handler.bodies) == 1  # (the answer round never ran)


def test_a_summary_answered_with_json_past_1_mib_is_read_whole(gateway_factory):
    """A long summary (1.7 MB) from a backend that ignores ``stream``: its JSON body is read whole
    (the relay's bound for a 200 JSON body is an answer's, 32 MiB), sealed into the item, the
    answer round asked with it. Before, the body was cut at 1 MiB and read as garbage: the turn
    failed and no answer ran."""
    long = "".join(f"word{i} " for i in range(200_000)).strip()
    completion = chat_completion({"content": long}, "stop", prompt_tokens=100, completion_tokens=200_000)
    handler = type("Json", (_JsonSummary,), {"summary": completion, "bodies": []})
    with LocalServer(handler) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER},
                      timeout=60)
        assert r.status_code == 200, r.text[:300]
        out = r.json()
        assert [o["type"] for o in out["output"]] == ["compaction", "message"], out["output"]
        summary, answer = handler.bodies
        assert answer["messages"][-1] == {"role": "user", "content": SUMMARY_PREFIX + long}


class _HalfSummary(QuietHandler):
    """A backend that streams part of the summary, then goes silent (``how``: "silent", past
    the gateway's idle timeout) or closes the connection midway ("cut"); ``bodies``: the chat
    requests it got."""

    how = "silent"
    field = "content"  # what the model writes before it fails ("reasoning_content": it only thought)
    bodies: list[bytes] = []
    PIECE = "word " * 1000  # (four of them: 20000 bytes of summary, 5000 tokens' worth)

    def do_POST(self):
        type(self).bodies.append(self.rfile.read(int(self.headers["content-length"])))
        start_sse(self)
        for _ in range(4):
            self.wfile.write(http_chunk(chat_event({self.field: self.PIECE})))
        self.wfile.flush()
        if self.how == "silent":
            time.sleep(3)
        self.close_connection = True


@pytest.mark.parametrize("how, status, field", [("silent", 504, "content"), ("cut", 502, "content"),
                                                ("cut", 502, "reasoning_content")])
def test_a_summary_failing_midway_falls_back_and_tpm_spends_what_it_did(tmp_path, upstream, how, status, field):
    """Nothing of the summary reaches the client, so one that fails midway (a silence past the
    upstream's idle timeout, a connection cut) is written by the next upstream, which answers
    too; tpm spends the failed call's work besides both rounds (its prompt and what it wrote,
    its reasoning too: ``usage.call_tokens``' estimate, as for any call without usage)."""
    from resp2chat_core.usage import estimate
    from resp2chat_io.demo_upstream import canonical_prompt, prompt_tokens

    half = type("Half", (_HalfSummary,), {"how": how, "field": field, "bodies": []})
    key = run_cli(tmp_path, "keys", "add", "carol", "--tpm", "30000").stdout.strip()
    with LocalServer(half) as server:
        entries = [{"name": "half", "base_url": server.url + "/v1", "upstream_idle_timeout_secs": 1},
                   {"name": "good", "base_url": upstream.base_url}]
        gw = start_gateway("http://127.0.0.1:9", tmp_path, "--set", "resp2chat_max_replay_entries=0",
                           "--set", "resp2chat_upstreams=" + json.dumps(entries), env=cli_env(tmp_path))
        try:
            auth = {"authorization": f"Bearer {key}"}
            upstream.clear()
            start = time.monotonic()
            r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False,
                               "context_management": OVER}, auth)
            assert r.status_code == 200, r.text
            out = r.json()
            assert kinds(out["output"]) == ["compaction", "message"], out["output"]
            (failed,) = half.bodies  # (the summary's try only: the answer went to the one that wrote it)
            summary, answer = upstream.requests()
            assert json.loads(failed)["messages"][-1]["content"] == COMPACTION_PROMPT
            assert answer["messages"] == COMPACTED
            prompts = [prompt_tokens(canonical_prompt(body)) for body in (summary, answer)]
            written = half.PIECE * 4  # (the failed call: no usage; its text as the summary's, stripped)
            wasted = estimate(len(failed) + len(written.strip() if field == "content" else written))
            spent = sum(prompts) + out["usage"]["output_tokens"] + wasted
            left = int(post_turn(gw, {"model": "demo-model", "input": "x"}, auth).headers[
                "x-ratelimit-remaining-tokens"])
            refilled = (time.monotonic() - start) * 500 + 1  # (30000 a minute come back)
            assert 30000 - spent - 60 <= left <= 30000 - spent + refilled, (left, spent, wasted, prompts)
            assert f"upstream half failed writing the compaction summary (HTTP {status})" in gw.log()
        finally:
            gw.stop()


class _LongSummary(QuietHandler):
    """A backend whose summary (its answer to the compaction prompt) is ``size`` bytes of text in
    deltas of ``delta`` characters, then finished, as fast as it is read; anything else is answered
    at once. ``calls``: per summary call, the bytes sent and whether the gateway cut it."""

    size, delta = 0, 1000
    calls: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body["messages"][-1]["content"] != COMPACTION_PROMPT:
            send_sse(self, chat_sse(chat_chunk({"content": "answer"}), chat_chunk(finish="stop")))
            return
        call = {"sent": 0, "cut": False}
        type(self).calls.append(call)
        start_sse(self)
        piece = http_chunk(chat_event({"content": "x" * self.delta}) * max(1, (256 << 10) // (self.delta + 100)))
        try:
            while call["sent"] < self.size:
                self.wfile.write(piece)
                call["sent"] += len(piece)
            self.wfile.write(http_chunk(chat_event(finish="stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n")
        except OSError:
            call["cut"] = True
            self.close_connection = True


@pytest.mark.parametrize("delta, size, code", [(1000, 40 << 20, "upstream_output_too_large"),
                                               ((3 << 20) // 2, 1, "upstream_event_too_large")])
def test_a_summary_past_the_gateway_s_bounds_fails_the_turn_as_an_answer_would(gateway_factory, delta, size, code):
    """A summary the backend streams past the bound of an answer's output (8 × max_upstream_event_mb:
    8 MiB with 1), or in an SSE event past max_upstream_event_mb: the turn fails with the code an
    answer (and the compact endpoint's summary) gets, the backend call is cut, no answer round runs.
    Before, the summary's reader held whatever came (no bound: a backend that never stops grew the
    gateway without end) and an event past the bound was dropped silently: the summary cut short
    was sealed and answered on as if whole."""
    handler = type("Long", (_LongSummary,), {"size": size, "delta": delta, "calls": []})
    with LocalServer(handler) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_max_upstream_event_mb=1")
        compact = requests.post(gw.base_url + "/responses/compact", json={"model": "demo-model", "input": HISTORY},
                                timeout=60)
        assert compact.status_code == 502 and compact.json()["error"]["code"] == code, compact.text[:300]
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER})
        assert r.status_code == 502 and r.json()["error"]["code"] == code, r.text[:300]
        ws = WSClient(gw.base_url)
        end = ws.turn({"type": "response.create", "model": "demo-model", "input": HISTORY, "store": False,
                       "context_management": OVER})[-1]
        ws.close()
        assert end["type"] == "response.failed" and specific_code(end["response"]["error"]) == code, end
        assert end["response"]["output"] == []
        assert len(handler.calls) == 3  # (the summary's calls only: no answer round ran)
        if size > 1:  # (a summary that would not end by itself: its calls are cut, not read to their end)
            wait_until(lambda: all(call["cut"] for call in handler.calls), what="the summary calls cut")
        assert all(call["sent"] < 32 << 20 for call in handler.calls), handler.calls


_PARTIAL = chat_chunk({"role": "assistant", "content": "Goal: the first half of a summary"})


@pytest.mark.parametrize("answer, code", [
    (chat_sse(_PARTIAL, {"error": {"message": "overloaded", "type": "server_error", "code": "context_length_exceeded"}},
              done=False), "context_length_exceeded"),
    (chat_sse(_PARTIAL, "this is no JSON", chat_chunk(finish="stop")), "server_error"),
    (chat_sse(_PARTIAL, chat_chunk(finish="error")), "server_error"),
    (chat_sse(_PARTIAL, chat_chunk(finish="abort"), done=False), "server_error"),
    (chat_sse(_PARTIAL, done=False), "server_error"),
    (json.dumps(chat_completion({"content": "Goal: the first half"}, "error")).encode(), "server_error"),
])
def test_a_summary_the_backend_failed_midway_is_no_summary(gateway_factory, answer, code):
    """A summary whose stream the backend failed after some text (an error object, an event that is
    no JSON, a ``finish_reason`` of failure, a stream that stopped with neither a finish reason nor
    [DONE]) fails the turn, with the code the compact endpoint's summary (and any answer) gets from
    the same stream. Before, the text before the failure was sealed as the summary and the turn
    answered on it, as if the backend had written it whole."""
    with _failing_summary((200, answer)) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0")
        compact = requests.post(gw.base_url + "/responses/compact", json={"model": "demo-model", "input": HISTORY},
                                timeout=30)
        assert compact.status_code >= 400 and compact.json()["error"]["code"] == code, compact.text
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER})
        assert r.status_code == compact.status_code and r.json()["error"]["code"] == code, r.text
        raw = requests.post(f"{gw.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": HISTORY, "stream": True, "context_management": OVER}).content
        end = check_stream(raw, parse_sse(raw)[0]["response"]["id"])[-1]
        assert end["type"] == "response.failed" and end["response"]["error"]["code"] == code, end
        assert end["response"]["output"] == []
        sent = [b["messages"][-1]["content"] for b in _FailedSummary.bodies]
        assert sent == [COMPACTION_PROMPT] * 3  # (no answer round)


def test_the_summary_is_free_text_whatever_format_the_answer_has(own_gateway, upstream):
    """A turn whose answer must be JSON of a schema (``text.format``; the Agents SDK's
    ``output_type``): its summary request asks for no format (a summary is prose for whoever
    continues, and the format is no part of the prompt the backend caches), its answer round
    does. Before, the summary request carried the answer's ``response_format``: a backend that
    enforces it wrote the summary as an object of the answer's shape."""
    schema = {"type": "json_schema", "name": "out", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}}
    upstream.clear()
    r = post_turn(own_gateway, {"model": "demo-model", "input": HISTORY, "store": False, "text": {"format": schema},
                                "context_management": OVER})
    assert r.status_code == 200, r.text
    summary, answer = upstream.requests()
    assert summary["messages"][-1]["content"] == COMPACTION_PROMPT and "response_format" not in summary
    assert answer["response_format"]["type"] == "json_schema"


def test_a_websocket_warm_up_with_a_compaction_trigger_is_a_400_naming_generate(own_gateway, upstream):
    """A warm-up (``generate: false``) answers at once without the backend, so it cannot write the
    summary a ``compaction_trigger`` asks for (and the trigger is no part of what a continuation
    remembers): a 400 naming ``generate``, the socket still serving; the same request generating
    is compacted. A warm-up of a plain turn is still one. Before, the warm-up failed with
    ``server_error`` ("the backend wrote no summary"), as if the backend had failed."""
    trigger = [*HISTORY, {"type": "compaction_trigger"}]
    ws = WSClient(own_gateway.base_url)
    upstream.clear()
    [error] = ws.turn({"type": "response.create", "generate": False, "model": "demo-model", "input": trigger})
    assert error["type"] == "error" and error["status"] == 400, error
    assert (error["error"]["param"], error["error"]["code"]) == ("generate", "unsupported_parameter"), error
    assert "compaction_trigger" in error["error"]["message"], error
    warm = ws.turn({"type": "response.create", "generate": False, "model": "demo-model", "input": HISTORY})[-1]
    assert warm["type"] == "response.completed" and warm["response"]["output"] == [], warm
    end = ws.turn({"type": "response.create", "model": "demo-model", "input": trigger, "store": False})[-1]
    ws.close()
    assert end["type"] == "response.completed" and kinds(end["response"]["output"]) == ["compaction"], end
    assert [m["messages"][-1]["content"] for m in upstream.requests()] == [COMPACTION_PROMPT]


@pytest.mark.parametrize("answer", [
    chat_sse({"error": {"message": "overloaded", "type": "server_error"}}, done=False),
    chat_sse(_PARTIAL, {"error": {"message": "overloaded", "type": "server_error"}}, done=False),
    chat_sse(_PARTIAL, chat_chunk(finish="error")),
    chat_sse(_PARTIAL, "this is no JSON", chat_chunk(finish="stop")),
])
def test_a_summary_the_backend_fails_in_its_stream_falls_back_to_the_next_upstream(gateway_factory, upstream, answer):
    """Nothing of the summary reaches the client, so a failure the backend streams in it (its error
    object, a finish reason of failure, garbage; before any text or after some) is a failure before
    the turn's first output: the next upstream writes the summary and answers, as for a silence or a
    cut. Before, the turn failed with the first upstream's error though another upstream remained."""
    with _failing_summary((200, answer)) as backend:
        gw = gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0",
                             *_upstreams(("failing", backend.url + "/v1"), ("good", upstream.base_url)))
        upstream.clear()
        r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER})
        assert r.status_code == 200, r.text
        assert kinds(r.json()["output"]) == ["compaction", "message"], r.json()["output"]
        assert [b["messages"][-1]["content"] for b in _FailedSummary.bodies] == [COMPACTION_PROMPT]
        assert [m["messages"][-1]["content"] for m in upstream.requests()] == [COMPACTION_PROMPT,
                                                                                SUMMARY_PREFIX + SUMMARY]
        assert "upstream failing failed writing the compaction summary" in gw.log()


def test_the_request_log_holds_the_summary_request_then_the_answer_s(gateway_factory, upstream, tmp_path):
    """The upstream request log holds each chat request the turn sent, byte for byte: its summary
    request, then its answer's. Before, it held the turn's request as lowered before compaction,
    which no upstream got, and neither of the two sent."""
    log = tmp_path / "requests.jsonl"
    gw = gateway_factory(upstream.origin, "--set", "resp2chat_max_replay_entries=0",
                         "--set", f"resp2chat_upstream_request_log_path={log}")
    upstream.clear()
    r = post_turn(gw, {"model": "demo-model", "input": HISTORY, "store": False, "context_management": OVER})
    assert r.status_code == 200, r.text
    gw.stop()
    assert [json.loads(body) for body in logged_bodies(log)] == upstream.requests()
    assert [b["messages"][-1]["content"] for b in upstream.requests()] == [COMPACTION_PROMPT, SUMMARY_PREFIX + SUMMARY]
