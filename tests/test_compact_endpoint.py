"""POST /v1/responses/compact (issue 24 item 2): the remote compaction built for Codex
(resp2chat_core/compaction.py: the backend writes the summary, the gateway seals it), as the
endpoint of the API and of the Open Responses spec, through a real mitmdump with the openai SDK.
Every answer is checked against the spec's shape (helpers.check_body)."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from helpers import (
    FIXTURES, PNG, LocalServer, QuietHandler, chat_chunk, chat_event, chat_sse, check_stream, http_chunk, openai_client,
    parse_sse, read_flows, send_cut, send_json, send_paced, send_sse, start_sse,
)
from resp2chat_core.compaction import COMPACTION_PROMPT, SUMMARY_PREFIX
from wsclient import WSClient

HISTORY = [{"role": "user", "content": "my name is Ada"},
           {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada"}]},
           {"role": "user", "content": [{"type": "input_text", "text": "I like tea"}]}]


def test_compact_answers_the_user_messages_then_one_sealed_compaction_item(own_gateway, upstream):
    client = openai_client(own_gateway)
    upstream.clear()
    compacted = client.responses.compact(model="demo-model", input=HISTORY, instructions="Be brief.")
    assert compacted.object == "response.compaction" and compacted.id.startswith("resp_")
    *users, item = compacted.output
    assert [(u.type, u.role, u.content[0].text) for u in users] == [
        ("message", "user", "my name is Ada"), ("message", "user", "I like tea")]
    assert item.type == "compaction" and item.encrypted_content.startswith("r2c1.")
    # sealed, only this gateway reads it: the summary the backend wrote is not in it (a phrase with spaces,
    # which base64 never spells by chance, as it could a short name)
    assert "You said: Write the summary now." not in item.encrypted_content
    assert compacted.usage.input_tokens > 0
    # the backend was asked for the summary: the conversation, then the compaction prompt, not stored
    (sent,) = upstream.requests()
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][-1] == {"role": "user", "content": COMPACTION_PROMPT}
    assert requests.get(f"{own_gateway.base_url}/responses/{compacted.id}", timeout=10).status_code == 404


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_the_output_is_the_whole_input_of_a_later_turn(own_gateway, upstream, transport):
    client = openai_client(own_gateway)
    compacted = client.responses.compact(model="demo-model", input=HISTORY)
    later = [item.model_dump(exclude_none=True, warnings=False) for item in compacted.output] + [
        {"role": "user", "content": "what do I like?"}]
    upstream.clear()
    if transport == "http":
        answer = client.responses.create(model="demo-model", input=later, store=False).output_text
    else:
        ws = WSClient(own_gateway.base_url)
        events = ws.turn({"type": "response.create", "model": "demo-model", "input": later, "store": False})
        ws.close()
        answer = events[-1]["response"]["output"][-1]["content"][0]["text"]
    assert answer == "You said: what do I like?"
    messages = upstream.requests()[-1]["messages"]
    # the item became one user message holding the summary the backend wrote, in its place
    assert messages == [{"role": "user", "content": "my name is Ada"}, {"role": "user", "content": "I like tea"},
                        {"role": "user", "content": SUMMARY_PREFIX + "You said: Write the summary now."},
                        {"role": "user", "content": "what do I like?"}]


def test_compact_continues_a_stored_response(own_gateway, upstream):
    client = openai_client(own_gateway)
    first = client.responses.create(model="demo-model", input="my name is Ada")
    upstream.clear()
    compacted = client.responses.compact(model="demo-model", previous_response_id=first.id, input="and Bob")
    assert [o.type for o in compacted.output] == ["message", "message", "compaction"]
    sent = upstream.requests()[-1]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["my name is Ada", "and Bob", COMPACTION_PROMPT]
    assert [m for m in sent if m["role"] == "assistant"][0]["content"] == "You said: my name is Ada"


def test_compact_refuses_what_it_cannot_do(own_gateway, upstream):
    url = own_gateway.base_url + "/responses/compact"
    upstream.clear()
    for body, param, code in (({"input": "hi"}, "model", "missing_required_parameter"),
                              ({"model": "demo-model", "input": "hi", "tools": []}, "tools", "unknown_parameter"),
                              ({"model": "demo-model", "input": 7}, "input", "invalid_type"),
                              ({"model": "demo-model", "previous_response_id": "resp_gone"}, "previous_response_id",
                               "previous_response_not_found")):
        r = requests.post(url, json=body, timeout=10)
        assert r.status_code == 400 and (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code), r.text
    assert requests.get(url, timeout=10).status_code == 405
    assert upstream.requests() == []
    with pytest.raises(openai.BadRequestError):  # (an empty conversation: nothing to summarize)
        openai_client(own_gateway).responses.compact(model="demo-model", input=[])


def test_a_backend_failure_is_the_error_it_would_be_for_a_response(own_gateway, gateway_factory):
    dead = gateway_factory("http://127.0.0.1:9")  # (nothing listens: the backend cannot be reached)
    with pytest.raises(openai.InternalServerError) as err:
        openai_client(dead).responses.compact(model="demo-model", input="hi")
    assert err.value.status_code == 502 and err.value.body["code"] == "server_error"
    r = requests.post(own_gateway.base_url + "/responses/compact", data=json.dumps({"model": "m", "input": "x"}),
                      timeout=10)
    assert r.status_code == 415  # (a JSON body: the content type is checked at the head, as for /v1/responses)


def test_the_user_messages_are_answered_as_the_api_s_objects_hold_them(own_gateway, upstream):
    """A user message's content as the spec's CompactionResponse holds it (an ``input_image``'s
    ``detail``, "auto" when the client left it out, as the item lists show it: listing.py); and
    the answer is still the whole input of a later turn. Before, the parts were answered as the
    client sent them: no ``detail``, not a CompactionResponse (helpers.check_body)."""
    image = {"type": "input_image", "image_url": PNG}
    compacted = requests.post(own_gateway.base_url + "/responses/compact", timeout=30, json={
        "model": "demo-model", "input": [{"role": "user", "content": [{"type": "input_text", "text": "see"}, image]}]})
    assert compacted.status_code == 200, compacted.text
    output = compacted.json()["output"]
    assert output[0]["content"] == [{"type": "input_text", "text": "see"}, {**image, "detail": "auto"}]
    later = requests.post(own_gateway.base_url + "/responses", timeout=30, json={
        "model": "demo-model", "input": output + [{"role": "user", "content": "and?"}], "store": False})
    assert later.status_code == 200 and later.json()["status"] == "completed", later.text


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_a_stored_trigger_turn_continued_by_previous_response_id_goes_on_from_the_compacted_state(
        own_gateway, upstream, transport):
    """Codex's compaction turn (a trailing ``compaction_trigger``) stored (``store``; a socket
    remembers it anyway) and continued with ``previous_response_id``: the backend gets what Codex
    itself would send after it, the user messages, the summary, the new input; the turn the
    compact endpoint and server-side compaction make. Before, the stored conversation was the
    whole history with the item after it: the continuation sent everything the summary replaces,
    and the summary too."""
    trigger = [*HISTORY, {"type": "compaction_trigger"}]
    upstream.clear()
    if transport == "http":
        client = openai_client(own_gateway)
        first = requests.post(f"{own_gateway.base_url}/responses", timeout=30, json={
            "model": "demo-model", "input": trigger, "store": True}).json()
        assert [o["type"] for o in first["output"]] == ["compaction"], first
        answer = client.responses.create(model="demo-model", previous_response_id=first["id"],
                                         input="what do I like?").output_text
    else:
        ws = WSClient(own_gateway.base_url)
        first = ws.turn({"type": "response.create", "model": "demo-model", "input": trigger, "store": False})[-1]
        assert [o["type"] for o in first["response"]["output"]] == ["compaction"], first
        events = ws.turn({"type": "response.create", "model": "demo-model", "store": False,
                          "previous_response_id": first["response"]["id"], "input": "what do I like?"})
        ws.close()
        answer = events[-1]["response"]["output"][-1]["content"][0]["text"]
    assert answer == "You said: what do I like?"
    assert upstream.requests()[-1]["messages"] == [
        {"role": "user", "content": "my name is Ada"}, {"role": "user", "content": "I like tea"},
        {"role": "user", "content": SUMMARY_PREFIX + "You said: Write the summary now."},
        {"role": "user", "content": "what do I like?"}]


def test_an_image_lowers_to_the_same_bytes_with_or_without_the_detail_the_api_lists(own_gateway, upstream):
    """The compact endpoint answers an ``input_image`` with ``detail: "auto"`` (the API's default,
    which its objects require); a client that goes on from that output and one that keeps its own
    user messages as it sent them (Codex keeps its own) hold the same history, and the backend must
    get the same bytes for it (its prefix cache), as it does for a stored response continued with
    ``previous_response_id`` and the same one resent whole from ``input_items`` (which lists the
    default too). Before, the listed default reached the backend as ``"detail": "auto"``: another
    prompt for the same conversation."""
    image = {"type": "input_image", "image_url": PNG}
    said = [{"role": "user", "content": [{"type": "input_text", "text": "see"}, image]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a dot"}]}]
    nxt = {"role": "user", "content": "and?"}
    compacted = requests.post(own_gateway.base_url + "/responses/compact", timeout=30,
                              json={"model": "demo-model", "input": said}).json()
    *listed, item = compacted["output"]
    bodies = []
    for history in (listed, [said[0]]):
        upstream.clear()
        r = requests.post(own_gateway.base_url + "/responses", timeout=30, json={
            "model": "demo-model", "input": [*history, item, nxt], "store": False})
        assert r.status_code == 200, r.text
        bodies.append(upstream.requests()[-1])
    assert bodies[0] == bodies[1]
    first = requests.post(own_gateway.base_url + "/responses", timeout=30,
                          json={"model": "demo-model", "input": said[:1]}).json()
    items = requests.get(f"{own_gateway.base_url}/responses/{first['id']}/input_items?order=asc", timeout=10).json()
    bodies = []
    for body in ({"previous_response_id": first["id"], "input": [nxt]},
                 {"input": [*items["data"], *first["output"], nxt], "store": False}):
        upstream.clear()
        r = requests.post(own_gateway.base_url + "/responses", timeout=30, json={"model": "demo-model", **body})
        assert r.status_code == 200, r.text
        bodies.append(upstream.requests()[-1])
    assert bodies[0] == bodies[1]


def test_a_stored_trigger_turn_answered_by_the_replay_cache_goes_on_from_the_compacted_state(gateway_factory,
                                                                                               upstream):
    """The same for a compaction turn the replay cache answers (the second of two alike): what it
    stores is what a miss stores, the user messages (the output brings the item)."""
    gw = gateway_factory(upstream.origin)  # (its replay cache on)
    trigger = [*HISTORY, {"type": "compaction_trigger"}]
    ids = []
    for _ in range(2):
        r = requests.post(f"{gw.base_url}/responses", timeout=30,
                          json={"model": "demo-model", "input": trigger, "store": True})
        assert r.status_code == 200 and [o["type"] for o in r.json()["output"]] == ["compaction"], r.text
        ids.append(r.json()["id"])
    upstream.clear()
    r = requests.post(f"{gw.base_url}/responses", timeout=30, json={
        "model": "demo-model", "previous_response_id": ids[1], "input": "what do I like?"})
    assert r.status_code == 200, r.text
    assert upstream.requests()[-1]["messages"] == [
        {"role": "user", "content": "my name is Ada"}, {"role": "user", "content": "I like tea"},
        {"role": "user", "content": SUMMARY_PREFIX + "You said: Write the summary now."},
        {"role": "user", "content": "what do I like?"}]


def test_prompt_cache_fields_do_for_the_compact_endpoint_what_they_do_for_a_turn(gateway_factory):
    """``prompt_cache_key`` names the session as a turn's does (its routing key upstream,
    ``routing_key_header``); ``prompt_cache_retention`` and ``prompt_cache_options``, as on a turn,
    are accepted and send the backend nothing (it has no such field): the summary request is the
    bytes of the one without them."""
    got: list[tuple[dict, bytes]] = []

    class Recorder(QuietHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            send_sse(self, chat_sse(chat_chunk({"content": "Goal: tea."}), chat_chunk(finish="stop")))

    with LocalServer(Recorder) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_routing_key_header=x-smg-routing-key",
                             "--set", "resp2chat_max_replay_entries=0")
        cache = {"prompt_cache_key": "conv-7", "prompt_cache_retention": "24h",
                 "prompt_cache_options": {"mode": "x"}}
        for path, body in (("/responses/compact", {"model": "m", "input": HISTORY}),
                           ("/responses", {"model": "m", "input": HISTORY, "store": False})):
            got.clear()
            for extra in ({}, cache):
                r = requests.post(gw.base_url + path, json={**body, **extra}, timeout=30)
                assert r.status_code == 200, (path, r.text)
            (plain, plain_body), (keyed, keyed_body) = got
            assert "x-smg-routing-key" not in plain and keyed["x-smg-routing-key"] == "conv-7", path
            assert keyed_body == plain_body, path


# --- a summary its backend fails: the next upstream writes it ----------------------------------

CODEX = FIXTURES / "codex-0.169.0-builtin-provider" / "06-builtin-provider-remote-compaction.json"
_PARTIAL = chat_chunk({"role": "assistant", "content": "Goal: the first half of a summary"})
_TOO_LONG = {"error": {"message": "This model's maximum context length is 4096 tokens. However, you requested 9000",
                       "type": "invalid_request_error", "code": "context_length_exceeded"}}


class _Failing(QuietHandler):
    """A backend that fails every summary it is asked for, ``how``: in its stream after some text
    (its error object, a finish reason of failure, garbage, the connection cut), past the gateway's
    output bound (8 MiB with max_upstream_event_mb=1), or too long for its context (a 400, or its
    error object first thing in the stream). ``bodies``: the chat requests it got."""

    how = "error object"
    bodies: list[dict] = []

    def do_POST(self):
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        if self.how == "error object":
            send_sse(self, chat_sse(_PARTIAL, {"error": {"message": "overloaded", "type": "server_error"}}, done=False))
        elif self.how == "finish error":
            send_sse(self, chat_sse(_PARTIAL, chat_chunk(finish="error")))
        elif self.how == "garbage":
            send_sse(self, chat_sse(_PARTIAL, "this is no JSON", chat_chunk(finish="stop")))
        elif self.how == "cut":
            send_cut(self, chat_sse(_PARTIAL, done=False))
        elif self.how == "too long":
            send_json(self, 400, _TOO_LONG)
        elif self.how == "too long in stream":
            send_sse(self, chat_sse(_TOO_LONG, done=False))
        else:  # "bound": 9 MiB of summary, as fast as it is read
            start_sse(self)
            piece = http_chunk(chat_event({"content": "x" * 1000}) * 200)
            try:
                for _ in range((9 << 20) // len(piece) + 1):
                    self.wfile.write(piece)
                self.wfile.write(http_chunk(chat_event(finish="stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n")
            except OSError:
                self.close_connection = True


def _two(gateway_factory, first: str, second: str, *extra: str):
    return gateway_factory("http://127.0.0.1:9", "--set", "resp2chat_max_replay_entries=0", *extra,
                           "--set", "resp2chat_upstreams=" + json.dumps([{"name": "failing", "base_url": first},
                                                                         {"name": "good", "base_url": second}]))


def _summaries(gw) -> tuple[requests.Response, list, dict, requests.Response]:
    """A summary asked for each way it comes: the compact endpoint's JSON answer, the turn Codex
    0.169 sent (its real request, a trailing compaction_trigger) streamed over HTTP, the same over
    the Responses WebSocket (its last event), and an ordinary turn's server-side compaction."""
    codex = {**json.loads(CODEX.read_text())["body"], "model": "demo-model"}
    compact = requests.post(gw.base_url + "/responses/compact", json={"model": "demo-model", "input": HISTORY},
                            timeout=60)
    raw = requests.post(gw.base_url + "/responses", json=codex, timeout=60).content
    events = check_stream(raw, parse_sse(raw)[0]["response"]["id"])
    ws = WSClient(gw.base_url)
    end = ws.turn({"type": "response.create", **{k: v for k, v in codex.items() if k != "stream"}})[-1]
    ws.close()
    turn = requests.post(gw.base_url + "/responses", timeout=60, json={
        "model": "demo-model", "input": HISTORY, "store": False,
        "context_management": [{"type": "compaction", "compact_threshold": 1}]})
    return compact, events, end, turn


@pytest.mark.parametrize("how", ["error object", "finish error", "garbage", "cut", "bound", "too long",
                                 "too long in stream"])
def test_a_summary_its_backend_fails_is_written_by_the_next_upstream(gateway_factory, upstream, how):
    """Nothing of the summary reaches the client before its end (it is read whole, then answered), so
    a backend that fails it anywhere in its stream (its error object, a finish reason of failure,
    garbage, a cut connection, the gateway's output bound), or finds the conversation too long for its
    context (another upstream may hold more), is a failure before the turn's first output: the next
    upstream writes the summary, for the compact endpoint and for Codex's trigger turn over HTTP and
    the WebSocket alike, as for an ordinary turn's summary (server-side compaction). Before, only a
    failure before the first byte fell back: these failed the compaction though another upstream
    remained (Codex: "Error running remote compact task")."""
    failing = type("Failing", (_Failing,), {"how": how, "bodies": []})
    with LocalServer(failing) as backend:
        gw = _two(gateway_factory, backend.url + "/v1", upstream.base_url, "--set", "resp2chat_max_upstream_event_mb=1")
        upstream.clear()
        compact, events, end, turn = _summaries(gw)
        assert compact.status_code == 200, compact.text[:500]
        assert [o["type"] for o in compact.json()["output"]] == ["message", "message", "compaction"], compact.json()
        assert compact.json()["usage"]["output_tokens"] > 0  # (the usage of the summary the good one wrote)
        assert events[-1]["type"] == "response.completed", events[-1]
        assert [o["type"] for o in events[-1]["response"]["output"]] == ["compaction"]
        assert [e["type"] for e in events if e["type"] == "response.output_item.done"] == ["response.output_item.done"]
        assert end["type"] == "response.completed", end
        assert [o["type"] for o in end["response"]["output"]] == ["compaction"]
        assert turn.status_code == 200, turn.text[:500]
        assert [o["type"] for o in turn.json()["output"] if o["type"] != "reasoning"] == ["compaction", "message"]
        assert [b["messages"][-1]["content"] for b in failing.bodies] == [COMPACTION_PROMPT] * 4
        assert [b["messages"][-1]["content"] for b in upstream.requests()] == [COMPACTION_PROMPT] * 4 + [
            SUMMARY_PREFIX + "You said: Write the summary now."]
        assert gw.log().count("upstream failing failed writing the compaction summary") == 4, gw.log()[-3000:]


@pytest.mark.parametrize("how", ["too long", "too long in stream"])
def test_a_conversation_too_long_for_every_upstream_is_context_length_exceeded(gateway_factory, how):
    """Every upstream finds the conversation too long for its context: the client gets the code
    Codex acts on (it stops, where it retries a ``server_error`` compaction with the same
    conversation), naming each upstream; each was asked once."""
    first = type("First", (_Failing,), {"how": how, "bodies": []})
    second = type("Second", (_Failing,), {"how": how, "bodies": []})
    with LocalServer(first) as a, LocalServer(second) as b:
        gw = _two(gateway_factory, a.url + "/v1", b.url + "/v1")
        compact, events, end, turn = _summaries(gw)
        for error in (compact.json()["error"], events[-1]["response"]["error"], end["response"]["error"],
                      turn.json()["error"]):
            assert error["code"] == "context_length_exceeded", error
            assert "every upstream for model 'demo-model' failed" in error["message"], error
            assert "failing (" in error["message"] and "good (" in error["message"], error
        assert compact.status_code == turn.status_code == 400, (compact.text, turn.text)
        assert events[-1]["type"] == end["type"] == "response.failed"
        assert len(first.bodies) == len(second.bodies) == 4


def test_the_request_log_holds_each_summary_request_as_each_upstream_got_it(gateway_factory, upstream, tmp_path):
    """The upstream request log (every chat request sent upstream, byte for byte, its upstream
    named) of summaries the first upstream fails in its stream: the compact endpoint's, Codex's
    trigger turn's (HTTP, the WebSocket), and an ordinary turn's server-side compaction (its summary,
    then its answer)."""
    failing = type("Failing", (_Failing,), {"how": "error object", "bodies": []})
    log = tmp_path / "requests.jsonl"
    with LocalServer(failing) as backend:
        gw = _two(gateway_factory, backend.url + "/v1", upstream.base_url,
                  "--set", f"resp2chat_upstream_request_log_path={log}")
        upstream.clear()
        _summaries(gw)
        gw.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    sent = [("failing", b) for b in failing.bodies] + [("good", b) for b in upstream.requests()]
    assert sorted((line["upstream"], json.dumps(line["body"], sort_keys=True)) for line in lines) == sorted(
        (name, json.dumps(body, sort_keys=True)) for name, body in sent)


class _SlowSummary(QuietHandler):
    """A backend whose summary takes ~2.5 s to stream: a word every 0.5 s."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        send_paced(self, [chat_sse(chat_chunk({"content": f"word{i} "}), done=False) for i in range(5)] + [
            chat_sse(chat_chunk(finish="stop"))], 0.5)


def test_codex_hears_keepalives_while_the_backend_streams_the_summary(gateway_factory):
    """Codex's trigger turn (HTTP and the WebSocket): the summary streams to nobody, so the client
    hears a keepalive every keepalive_secs for as long as the backend writes it, as while it
    thinks (Codex's idle timer: 300 s; a long summary of a slow model passes it). Before, the
    keepalives stopped at the backend's first byte: the client heard nothing until the summary's end."""
    with LocalServer(_SlowSummary) as backend:
        gw = gateway_factory(backend.url, "--set", "resp2chat_max_replay_entries=0",
                             "--set", "resp2chat_keepalive_secs=1")
        codex = {**json.loads(CODEX.read_text())["body"], "model": "demo-model"}
        raw = requests.post(gw.base_url + "/responses", json=codex, timeout=60).content
        ws = WSClient(gw.base_url)
        on_socket = ws.turn({"type": "response.create", **{k: v for k, v in codex.items() if k != "stream"}})
        ws.close()
        for events in (check_stream(raw, parse_sse(raw)[0]["response"]["id"]), on_socket):
            kinds = [e["type"] for e in events]
            before = kinds[:kinds.index("response.output_item.added")]
            assert before.count("response.in_progress") >= 3, kinds  # (the first, then one a second)
            assert events[-1]["type"] == "response.completed", events[-1]


_KEY = "sk-upstream-key-0123456789abcdef"


class _Summarizer(QuietHandler):
    """A backend that writes a summary in three pieces, one of them its own key (a backend that
    echoes it), and answers anything else with "ok"."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body["messages"][-1]["content"] == COMPACTION_PROMPT:
            send_sse(self, chat_sse(*(chat_chunk({"content": p}) for p in ("Ada likes tea. ", _KEY, " End.")),
                                    chat_chunk(finish="stop")))
        else:
            send_sse(self, chat_sse(chat_chunk({"content": "ok"}), chat_chunk(finish="stop")))


def test_a_compaction_rounds_backend_stream_is_in_its_flow_scrubbed(gateway_factory, tmp_path):
    """A flow keeps a turn's backend stream (``upstream_sse``) for ``resp2chat retranslate`` and the
    operator; a compaction round's summary streams to nobody, so its flow kept only the sealed item
    the gateway made of it: the summary's own words were in no flow. Each way a summary comes (the
    compact endpoint, Codex's trigger turn over HTTP and the WebSocket, an ordinary turn's
    server-side compaction) now records it with its gateway event (``Summarized.sse``,
    ``Compacted.sse``), the upstream's key scrubbed as everywhere in a flow."""
    flows = tmp_path / "flows.mitm"
    with LocalServer(_Summarizer) as backend:
        gw = gateway_factory(backend.url, "-w", str(flows), "--set", "resp2chat_max_replay_entries=0",
                             "--set", f"resp2chat_upstream_api_key={_KEY}")
        compact, events, end, turn = _summaries(gw)
        assert compact.status_code == turn.status_code == 200 and end["type"] == "response.completed"
        gw.stop()
    records = []
    for flow in read_flows(flows):
        meta = flow.metadata.get("resp2chat", {})
        records += [meta] + list(meta.get("turns", []))
    kept = [(name, fields["sse"]) for record in records for _, name, fields in record.get("gateway_events", ())
            if name in ("Summarized", "Compacted")]
    assert sorted(name for name, _ in kept) == ["Compacted"] + ["Summarized"] * 3, kept
    for _, sse in kept:
        assert '"Ada likes tea. "' in sse and '" End."' in sse and "[DONE]" in sse, sse
        assert _KEY not in sse, sse
    assert _KEY.encode() not in flows.read_bytes()
