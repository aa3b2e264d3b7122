"""End to end against a real backend: llama.cpp's llama-server with a tiny random-weight Qwen3.

client (openai SDK, raw HTTP, Codex CLI) -> real `mitmdump -s addon/resp2chat.py` -> llama-server.
The build comes from `make llamacpp` (tests/llamacpp/build.sh into RESP2CHAT_LLAMACPP_DIR, default
~/.cache/resp2chat-llamacpp); without it these tests fail and say so. What the server does
(chunk shapes, caching, errors) is described in tests/llamacpp/README.md.

The model writes gibberish, but its tokens, chat template, usage, prompt cache and errors are
real: so these tests check real usage figures, real cached tokens, the server's real error
shapes, and the KV-cache figure of a real Codex session (tests/llamacpp/kv_figure.py).
Where a test needs a completed answer, its gateway adds ``logit_bias`` on ``<|im_end|>``
(``upstream_extra_params``, kv_figure.STOP_BIAS): the model then stops after a few tokens instead
of running into max tokens (which is ``response.incomplete``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import requests

from helpers import iter_sse, openai_client, parse_chat_sse, parse_sse, terminal, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent / "llamacpp"))
import kv_figure  # noqa: E402

pytestmark = pytest.mark.llamacpp

MODEL = kv_figure.MODEL_ID
STOP = "resp2chat_upstream_extra_params=" + json.dumps(kv_figure.STOP_BIAS)
NO_REPLAY = "resp2chat_max_replay_entries=0"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                               "required": ["city"]}}


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    why = kv_figure.missing_build()
    if why:
        pytest.fail(why, pytrace=False)
    server = kv_figure.LlamaServer(tmp_path_factory.mktemp("llama") / "llama-server.log").start()
    yield server
    server.stop()


def read_log(path: Path) -> list[dict]:
    """Chat bodies the gateway sent upstream (resp2chat_upstream_request_log_path)."""
    return [json.loads(line).get("body", json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def direct_usage(llama, chat: dict) -> dict:
    """Send a lowered chat body straight to llama-server; its usage chunk."""
    r = requests.post(llama.origin + "/v1/chat/completions", json=chat, stream=True, timeout=60)
    assert r.status_code == 200, r.text
    usage = None
    for chunk in iter_sse(r):
        usage = chunk.get("usage") or usage
    assert usage, "llama-server sent no usage chunk"
    return usage


def server_usage(upstream_sse: str) -> dict:
    """The usage chunk llama-server sent (the raw chat SSE the gateway recorded)."""
    usage = [c["usage"] for c in parse_chat_sse(upstream_sse.encode()) if c != "[DONE]" and "usage" in c]
    assert len(usage) == 1, upstream_sse[-2000:]
    return usage[0]


def sse_events(gw, body: dict) -> tuple[int, list[dict]]:
    r = requests.post(gw.base_url + "/responses", json=body, timeout=60)
    return r.status_code, parse_sse(r.content) if r.status_code == 200 else []


# --- streamed answer: real usage, real cached tokens -----------------------------------------


def test_streamed_answer_carries_the_servers_usage_and_cache(llama, gateway_factory, tmp_path):
    log, flows = tmp_path / "upstream.jsonl", tmp_path / "flows.mitm"
    gw = gateway_factory(llama.origin, "--set", NO_REPLAY, "--set", STOP, "-w", str(flows),
                         "--set", f"resp2chat_upstream_request_log_path={log}")
    client = openai_client(gw, timeout=120)  # (a real model, on a CPU)
    request = dict(model=MODEL, instructions="You are a terse assistant.",
                   input="Say hello to the llama.cpp test suite, please.", max_output_tokens=32)

    def streamed() -> tuple[list[str], object]:
        types, final = [], None
        for event in client.responses.create(stream=True, **request):
            types.append(event.type)
            if event.type == "response.completed":
                final = event.response
        return types, final

    types, first = streamed()
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert "response.output_text.delta" in types, types
    assert first.status == "completed" and first.model == MODEL
    u1 = first.usage
    assert u1.input_tokens > 0 and u1.output_tokens > 0
    assert u1.total_tokens == u1.input_tokens + u1.output_tokens

    # The same lowered body sent straight to llama-server: the same prompt token count.
    (chat,) = read_log(log)
    assert chat["messages"][0] == {"role": "system", "content": "You are a terse assistant."}
    assert direct_usage(llama, chat)["prompt_tokens"] == u1.input_tokens

    # Again (same prefix): the server serves it from its prompt cache, and says so.
    types, second = streamed()
    assert types[-1] == "response.completed", types
    u2 = second.usage
    assert u2.input_tokens == u1.input_tokens
    assert 0 < u2.input_tokens_details.cached_tokens <= u2.input_tokens, u2
    # llama.cpp re-evaluates the last prompt token of an identical prompt
    assert u2.input_tokens_details.cached_tokens == u2.input_tokens - 1, u2

    # stream: false gets one Response with the same real figures.
    third = client.responses.create(stream=False, **request)
    assert third.status == "completed" and third.output and third.output[0].type == "message"
    assert third.usage.input_tokens == u1.input_tokens
    assert third.usage.input_tokens_details.cached_tokens == u1.input_tokens - 1
    assert len(read_log(log)) == 3

    # Each figure the client saw is the one in the server's own usage chunk (recorded with -w).
    gw.stop()
    raw = [server_usage(meta["upstream_sse"]) for meta in kv_figure.read_turns(flows)]
    assert len(raw) == 3
    for seen, server in zip((u1, u2, third.usage), raw):
        assert (seen.input_tokens, seen.output_tokens, seen.input_tokens_details.cached_tokens) == (
            server["prompt_tokens"], server["completion_tokens"], server["prompt_tokens_details"]["cached_tokens"])


# --- errors ------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context(llama, gateway_factory):
    """llama-server: HTTP 400 `exceed_context_size_error` (also for stream: true)."""
    gw = gateway_factory(llama.origin, "--set", NO_REPLAY)
    body = {"model": MODEL, "input": "hello " * (llama.ctx + 600)}

    status, events = sse_events(gw, {**body, "stream": True})
    assert status == 200
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"], events
    error = events[-1]["response"]["error"]
    assert error["code"] == "context_length_exceeded", error
    assert "exceeds the available context size" in error["message"], error

    r = requests.post(gw.base_url + "/responses", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_mid_stream_error(llama, gateway_factory):
    """A `<tool_call>\\n` prefill with tool_choice auto: llama-server answers 200, sends the role
    chunk, then `data: {"error": …}` and ends the stream without [DONE]."""
    gw = gateway_factory(llama.origin, "--set", NO_REPLAY)
    body = {"model": MODEL, "tools": [WEATHER_TOOL], "tool_choice": "auto", "max_output_tokens": 32,
            "input": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": "<tool_call>\n"}]}

    status, events = sse_events(gw, {**body, "stream": True})
    assert status == 200
    assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
    error = events[-1]["response"]["error"]
    assert error["code"] == "server_error", error
    # its error says code 500: the words are the operator's (the gateway's log), the client gets the request id
    assert "does not match the expected" not in error["message"] and "request id req_" in error["message"], error
    rid = error["message"].split("request id ")[1].split(";")[0]
    wait_until(lambda: f"{rid} failed (server_error)" in gw.log() and "does not match the expected" in gw.log())
    terminal(events)

    r = requests.post(gw.base_url + "/responses", json={**body, "stream": False}, timeout=60)
    assert r.status_code >= 500, r.text
    assert r.json()["error"]["code"] == "server_error", r.text


def test_remote_compaction_reuses_the_servers_prefix_cache(llama, gateway_factory):
    """The summary request is the conversation as a turn would send it, then the compaction prompt,
    same tools (tool_choice none): a real server serves the conversation from its prefix cache."""
    gw = gateway_factory(llama.origin, "--set", STOP, "--set", NO_REPLAY, "--set", f"resp2chat_upstream_model={MODEL}")
    path = Path(__file__).resolve().parent / "fixtures" / "codex-0.169.0-builtin-provider" / \
        "06-builtin-provider-remote-compaction.json"
    body = json.loads(path.read_text())["body"]  # what Codex 0.169 sent: the history, then the trigger
    status, plain = sse_events(gw, {**body, "input": body["input"][:-1]})  # the same conversation as a turn
    assert status == 200 and plain[-1]["type"] == "response.completed"
    status, compact = sse_events(gw, body)
    assert status == 200 and compact[-1]["type"] == "response.completed", compact[-1]
    final = compact[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["compaction"]
    before = plain[-1]["response"]["usage"]["input_tokens"]
    assert final["usage"]["input_tokens"] > before  # the conversation and the compaction prompt
    assert final["usage"]["input_tokens_details"]["cached_tokens"] >= 0.98 * before, final["usage"]


# --- Codex CLI: a multi-turn session and the real KV-cache figure -------------------------------


@pytest.fixture(scope="module")
def codex_session(llama, codex_bin, tmp_path_factory):
    """exec + `resume --last` twice, recorded with `-w` (the flow file stays in tmp)."""
    return kv_figure.run_session(codex_bin, llama.origin, tmp_path_factory.mktemp("codex-llama"))


@pytest.mark.codex
def test_codex_session_runs_to_completion(codex_session, llama):
    s = codex_session
    assert s.ok, s.describe() + f"\n--- llama-server log (tail):\n{llama.log()[-2000:]}"
    turns = kv_figure.read_turns(s.flow_path)
    assert len(turns) == len(kv_figure.SESSION), s.describe()
    for i, meta in enumerate(turns):
        assert meta.get("status") == "completed", (i, meta.get("status"), s.describe())
        assert meta["usage"]["input_tokens"] > 8000, meta["usage"]  # Codex's whole developer prompt + tools
    # Each resumed turn sends the whole conversation again, one answer and one question longer.
    inputs = [m["usage"]["input_tokens"] for m in turns]
    assert inputs == sorted(inputs) and len(set(inputs)) == len(inputs), inputs


@pytest.mark.codex
def test_codex_session_kv_cache_figure(codex_session):
    s = codex_session
    assert s.ok, s.describe()
    fig = kv_figure.kv_figure(s.flow_path)
    print("KV figure:", json.dumps(fig))
    assert fig["turns"] == len(kv_figure.SESSION), fig
    usage = [m["usage"] for m in kv_figure.read_turns(s.flow_path)]
    for prev, cur in zip(usage, usage[1:]):
        # The whole previous prompt came from the cache; only the answer and the new question are new
        # (a few tokens of slack: BPE may merge the template's "assistant\n" with an answer that
        # starts with whitespace, so the re-sent history can diverge just before the answer).
        assert cur["input_tokens_details"]["cached_tokens"] >= prev["input_tokens"] - 3, usage
    assert fig["server_cached_ratio_later_turns"] >= 0.99, fig
    # analyze's byte-level simulation agrees with what the server did.
    assert fig["simulated_radix_ratio_later_turns"] >= 0.99, fig
    assert abs(fig["server_cached_ratio_later_turns"] - fig["simulated_radix_ratio_later_turns"]) < 0.01, fig


# --- the input's token count, logprobs: the server's own ---------------------------------------------


def test_input_tokens_are_counted_by_the_servers_own_tokenizer(llama, gateway_factory):
    """llama-server has no chat /tokenize: the gateway asks its /apply-template for the prompt,
    then its /tokenize: the count is the prompt tokens the server reports for the same request."""
    gw = gateway_factory(llama.origin, "--set", NO_REPLAY, "--set", STOP)
    client = openai_client(gw, timeout=120)
    request = dict(model=MODEL, instructions="You are a terse assistant.", tools=[WEATHER_TOOL],
                   input="Count the tokens of this prompt, please.")
    counted = client.responses.input_tokens.count(**request)
    answered = client.responses.create(**request, max_output_tokens=16)
    assert counted.input_tokens == answered.usage.input_tokens > 20


def test_logprobs_come_from_the_server(llama, gateway_factory):
    gw = gateway_factory(llama.origin, "--set", NO_REPLAY, "--set", STOP)
    response = openai_client(gw, timeout=120).responses.create(
        model=MODEL, input="Say something.", max_output_tokens=16, top_logprobs=2,
        include=["message.output_text.logprobs"])
    (message,) = [o for o in response.output if o.type == "message"]
    part = message.content[0]
    # the server's tokens (the text's leading whitespace is not shown: translator.py)
    assert part.logprobs and "".join(t.token for t in part.logprobs).lstrip() == part.text
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in part.logprobs)


# --- a chat template that wants a user message: a continued approval ------------------------------

STRICT_TEMPLATE = Path(__file__).resolve().parent / "llamacpp" / "Qwen3.5-4B.jinja"  # (llama.cpp's copy of
# Qwen3.5's own: it refuses a conversation without a user message, "No user query found in messages.")


@pytest.fixture(scope="module")
def strict_llama(tmp_path_factory):
    why = kv_figure.missing_build()
    if why:
        pytest.fail(why, pytrace=False)
    server = kv_figure.LlamaServer(tmp_path_factory.mktemp("strict-llama") / "llama-server.log", ctx=4096,
                                   n_predict=8, extra=("--chat-template-file", str(STRICT_TEMPLATE))).start()
    yield server
    server.stop()


@pytest.mark.parametrize("approve", [True, False])
def test_an_approval_continued_alone_reaches_a_template_that_wants_a_user_message(strict_llama, everything,
                                                                                  gateway_factory, approve):
    """An input of only an approval request and its answer (a stateless client that kept neither
    the user's message nor the rest of the turn): the chat request begins with a user message
    saying what the user answered, so a chat template that refuses a conversation without one
    (Qwen3.5's) takes it; the approved call runs once. Continued by previous_response_id, the
    stored conversation's user message comes first, as it was."""
    gw = gateway_factory(strict_llama.origin, "--set", NO_REPLAY, env={"RESP2CHAT_MCP_SERVERS": json.dumps(
        [{"label": "ev", "url": everything}])})
    client = openai_client(gw)
    tools = [{"type": "mcp", "server_label": "ev", "require_approval": "always"}]
    asked = {"type": "mcp_approval_request", "id": "mcpr_strict1", "server_label": "ev", "name": "echo",
             "arguments": json.dumps({"message": "strict"})}
    answer = {"type": "mcp_approval_response", "approval_request_id": "mcpr_strict1", "approve": approve}
    done = client.responses.create(model=MODEL, tools=tools, input=[asked, answer], store=False, max_output_tokens=16)
    assert done.status in ("completed", "incomplete"), done.error
    ran = [o for o in done.output if o.type == "mcp_call"]
    assert [c.output for c in ran] == (["Echo: strict"] if approve else [])
    # the same, continuing a stored turn that asked (its user message first)
    first = client.responses.create(model=MODEL, tools=tools, max_output_tokens=16,
                                    input=[{"role": "user", "content": "echo strict, please"}, asked])
    done = client.responses.create(model=MODEL, tools=tools, previous_response_id=first.id, input=[answer],
                                   max_output_tokens=16)
    assert done.status in ("completed", "incomplete"), done.error
    assert [c.output for c in done.output if c.type == "mcp_call"] == (["Echo: strict"] if approve else [])
