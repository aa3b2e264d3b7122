"""One turn runs the same on both transports: ``POST /v1/responses`` (streamed and not) and the
Responses WebSocket (``response.create`` messages on one socket).

A property test through one real mitmdump gateway and a scripted local backend that answers each
chat request as the example says: reasoning, text (``<think>`` tags too), function, custom and
local_shell tool calls, a refusal, usage, an error mid-stream, a cut stream, a backend 4xx/5xx,
an empty answer, a whole ``chat.completion``. Random requests (tools, tool_choice, store,
instructions, metadata, include, text.format json_schema, sampling and other fields, some of
them wrong; first inputs of several shapes, item references) run as chains of 1-3 turns over
each transport: by ``previous_response_id`` (after a failed turn: from it, or from the last that
did not fail), by a ``conversation``, and on the socket after a warm-up or with a ``stream``
field in its messages. Then:

- the chat requests the backend received are byte for byte the same on all three;
- the events of a streamed HTTP turn and of a socket turn are the same (types, item ids up to
  their renaming, sequence numbers, deltas: once runs of deltas are merged, below);
- the final Response objects are equal (ids and times aside) on all three, and so is what the
  store shows of them (``GET /v1/responses/{id}``, its input items, a conversation's items);
- a refusal is the same error (status, code, message, param) on all three, and a failed turn's
  JSON body has the code of the stream's ``response.failed``.

What differs by design is normalised here, each with where it is said:
- ids are random (a socket message's request id is ``req_…_<n>``: README, *The WebSocket
  transport*): they are renamed by order of appearance; sealed content is random too;
- the socket merges the deltas one backend delivery brings into one delta (README, *The
  WebSocket transport*; resp2chat_core/websocket.py ``Coalescer``): both streams are compared
  with every run of deltas merged (``ws.canonical``, as ``resp2chat retranslate`` compares them);
- with ``store: false`` an HTTP client cannot continue a response (nothing is stored): it sends
  the whole conversation again, where a socket continues from its connection's memory (README,
  docs/codex.md): so the HTTP Response says no ``previous_response_id``, the socket's does, and
  an error naming an input item names it further on over HTTP. A socket's first turn after a
  warm-up continues the warm-up, alike. After a failed turn a socket forgets what it continued
  (README: the spec's rule), so going on from the last good one is compared with ``store`` on;
- a non-streamed HTTP turn has no events, and a failed one is its error as a JSON body
  (README, *Errors*; http_turns.py), so its chain ends there.
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import requests
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from helpers import (LocalServer, QuietHandler, chat_chunk, chat_completion, chat_sse, parse_sse, post_turn, send_cut,
                     send_json, send_sse, start_gateway)
from resp2chat_core import websocket as ws
from resp2chat_core.errors import specific_code
from wsclient import WSClient

MODEL = "m"
_TOOLS = [{"type": "function", "name": n, "strict": False,
           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}} for n in ("f", "g")]
_SCHEMA = {"type": "json_schema", "name": "out", "strict": True,
           "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
                      "additionalProperties": False}}


class Backend(QuietHandler):
    """Answers each chat request with ``Backend.answer`` (set before each turn) and keeps what
    it was sent."""

    answer: tuple = ("sse", b"data: [DONE]\n\n")
    received: list[bytes] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with Backend.lock:
            Backend.received.append(body)
        kind, what = Backend.answer
        if kind == "status":
            code = "context_length_exceeded" if what == 413 else None
            send_json(self, what, {"error": {"message": f"backend says {what}", "type": "x", "code": code}},
                      headers={"retry-after": "2"} if what == 429 else None)
        elif kind == "cut":  # the stream's head and some events, then the connection drops
            send_cut(self, what)
        else:
            send_sse(self, what)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transports")
    with LocalServer(Backend) as backend:
        gw = start_gateway(backend.url, tmp, "--set", "resp2chat_max_replay_entries=0")
        try:
            yield gw
        finally:
            gw.stop()


# --- the answers and the requests -------------------------------------------------------------

_TEXT = st.sampled_from(["", "hi", "a b", '{"a": "x"}', "line\nbreak", "é😀", "  spaced ", "<think>hm</think>ok",
                         "<think>", "\n\n"])


@st.composite
def answers(draw) -> tuple:
    """One backend answer: ("sse", bytes), ("cut", bytes) or ("status", int)."""
    form = draw(st.sampled_from(["sse"] * 6 + ["cut", "status", "empty", "error", "whole"]))
    if form == "status":
        return "status", draw(st.sampled_from([400, 401, 404, 413, 429, 500, 503]))
    if form == "empty":
        return "sse", draw(st.sampled_from([chat_sse(), b"", b"data: {}\n\n"]))
    if form == "whole":  # a backend that ignores ``stream``
        message = {"role": "assistant", "content": draw(_TEXT)}
        if draw(st.booleans()):
            message["reasoning_content"] = draw(_TEXT)
        return "sse", json.dumps(chat_completion(message, draw(st.sampled_from(["stop", "length"])))).encode()
    chunks = [chat_chunk({"role": "assistant"})]
    for key in draw(st.lists(st.sampled_from(["reasoning_content", "content", "refusal"]), max_size=3, unique=True)):
        pieces = draw(st.lists(_TEXT.filter(bool), min_size=1, max_size=3))
        logprobs = key == "content" and draw(st.booleans())
        for piece in pieces:
            chunks.append(chat_chunk({key: piece}))
            if logprobs:
                chunks[-1]["choices"][0]["logprobs"] = {"content": [
                    {"token": piece, "logprob": -0.5, "bytes": list(piece.encode()), "top_logprobs": []}]}
    calls = draw(st.lists(st.sampled_from(["f", "g", "c", "local_shell"]), max_size=2))
    for i, name in enumerate(calls):
        chunks.append(chat_chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]}))
        chunks += [chat_chunk({"tool_calls": [{"index": i, "function": {"arguments": a}}]})
                   for a in draw(st.sampled_from([["{}"], ['{"a"', ": 1}"], [], ['{"input": "*** Begin', ' Patch"}'],
                                                  ['{"command": ["ls"]}']]))]
    if form == "error":
        code = draw(st.sampled_from([None, "context_length_exceeded", "rate_limit_exceeded"]))
        return "sse", chat_sse(*chunks, {"error": {"message": "overloaded", "type": "server_error", "code": code}},
                               done=False)
    finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
    chunks.append(chat_chunk(finish=finish))
    if draw(st.booleans()):
        chunks.append(chat_chunk(choices=[], usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}))
    if form == "cut":
        return "cut", chat_sse(*chunks, done=False)
    return "sse", chat_sse(*chunks)


@st.composite
def requests_(draw) -> dict:
    """A turn's request, but its input."""
    body: dict = {"model": MODEL, "store": draw(st.sampled_from([True, False, None]))}
    if body["store"] is None:
        del body["store"]  # (the default: stored)
    if draw(st.booleans()):
        body["tools"] = _TOOLS + draw(st.sampled_from([[], [{"type": "custom", "name": "c", "description": "raw"},
                                                            {"type": "local_shell"}]]))
        choice = draw(st.sampled_from([None, "auto", "required", "none", {"type": "function", "name": "g"}]))
        if choice is not None:
            body["tool_choice"] = choice
    if draw(st.booleans()):
        body["instructions"] = draw(st.sampled_from(["Be brief.", "Answer in JSON."]))
    if draw(st.booleans()):
        body["metadata"] = {"k": "v"}
    body["include"] = draw(st.sampled_from([[], ["reasoning.encrypted_content"], ["message.output_text.logprobs"]]))
    if draw(st.booleans()):
        body["text"] = draw(st.sampled_from([{"format": _SCHEMA}, {"format": {"type": "json_object"}},
                                             {"verbosity": "low"}, {"format": {"type": "json_schema"}}]))
    for key, values in _MORE.items():
        if draw(st.integers(0, 7)) == 0:
            body[key] = draw(st.sampled_from(values))
    return body


_MORE = {  # other fields a request may carry, some of them wrong
    "max_output_tokens": [16, 0], "temperature": [0.5, 5], "parallel_tool_calls": [False],
    "reasoning": [{"effort": "low", "summary": "auto"}, {"effort": "high"}, {"summary": "bogus"}],
    "truncation": ["auto"], "user": ["u"], "prompt_cache_key": ["k"], "service_tier": ["auto", "flex"],
    "top_logprobs": [2], "max_tool_calls": [1], "stream_options": [{"include_obfuscation": False}],
    "safety_identifier": ["s"], "bogus": [1], "prompt": [{"id": "pmpt_1"}], "generate": [True],
    "metadata": [{"k" * 65: "v"}, {"k": "v" * 513}],
}


# --- running a chain on each transport ---------------------------------------------------------


_FIRST = [  # a chain's first input, in the forms a client may send it
    "hi",
    [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    [{"type": "additional_tools", "tools": _TOOLS[:1]}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
     {"type": "function_call", "call_id": "call_x", "name": "f", "arguments": "{}"},
     {"type": "function_call_output", "call_id": "call_x", "output": "done"}],
]


_OUTPUTS = {"function_call": "function_call_output", "custom_tool_call": "custom_tool_call_output",
            "local_shell_call": "local_shell_call_output"}


def _next_input(k: int, previous: dict | None, first, refer: bool) -> list:
    """Turn ``k``'s new input: the outputs of the previous turn's calls, else a user message
    (``refer``: after a reference to the previous turn's first output item)."""
    if k == 0:
        return first
    output = (previous or {}).get("output", [])
    new = [{"type": _OUTPUTS[c["type"]], "call_id": c["call_id"], "output": "ok"} for c in output
           if c["type"] in _OUTPUTS] or \
        [{"role": "user", "content": f"turn {k}"}]
    return ([{"type": "item_reference", "id": output[0]["id"]}] if refer and output else []) + new


def _sse_of_http(r: requests.Response) -> tuple:
    if r.status_code != 200:
        return "refused", r.status_code, r.json()["error"]["code"], r.json()
    return "events", r.content.removesuffix(b"data: [DONE]\n\n")


def _sse_of_socket(messages: list[dict]) -> tuple:
    if messages[-1]["type"] == "error":
        return "refused", messages[-1]["status"], messages[-1]["error"]["code"], \
            {"error": messages[-1]["error"]}
    return "events", ws.as_sse([(m["type"], json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode())
                                for m in messages])


def _run(gw, transport: str, body: dict, script: list, chain: str, first, refer: bool) -> tuple[list, list[bytes]]:
    """A chain over ``transport``: per turn what the client got; and the backend's requests.
    ``chain``: "previous" (previous_response_id), "conversation" (one made for it), or with the
    socket, "previous" and a ``stream`` of true or false in each message), "retry" (after a failed
    turn, the next continues the last that did not fail), "warm-up" (the socket's first turn
    continues a warm-up of its input, as Codex's does)."""
    Backend.received.clear()
    got, previous, conversation, good = [], None, [], None
    conv = requests.post(gw.base_url + "/conversations", json={}, timeout=10).json()["id"] \
        if chain == "conversation" else None
    sock = WSClient(gw.base_url) if transport == "ws" else None
    try:
        for k, answer in enumerate(script):
            Backend.answer = answer
            if chain == "retry" and previous is not None and previous["status"] == "failed":
                previous = good
            # (a failed turn's output is no client's to answer: a non-streaming one never saw it)
            new = _next_input(k, previous if previous is None or previous["status"] != "failed" else None, first,
                              refer)
            request = {**body, "input": new}
            if conv is not None:
                request["conversation"] = conv
            elif previous is not None:
                if body.get("store", True) or transport == "ws" or previous["status"] == "failed":
                    request["previous_response_id"] = previous["id"]  # (a failed one: refused alike)
                else:  # nothing stored: an HTTP client sends the whole conversation again
                    request["input"] = conversation + new
            if transport == "ws":
                if chain.startswith("stream "):
                    request["stream"] = chain == "stream true"
                if chain == "warm-up" and k == 0:  # (as Codex: warmed up, then only what is new)
                    warm = sock.turn({"type": "response.create", **request, "generate": False})
                    if warm[-1]["type"] == "response.completed":
                        request = {**request, "input": [], "previous_response_id": warm[-1]["response"]["id"]}
                end = _sse_of_socket(sock.turn({"type": "response.create", **request}))
            else:
                r = post_turn(gw, {**request, "stream": transport == "http-stream"})
                end = _sse_of_http(r) if transport == "http-stream" or r.status_code != 200 else ("whole", r.json())
            previous = _response(end)
            stored = _stored(gw, previous["id"]) if previous is not None and body.get("store", True) else None
            if conv is not None:
                r = requests.get(f"{gw.base_url}/conversations/{conv}/items", params={"order": "asc"}, timeout=10)
                stored = (stored, r.status_code, r.json())
            got.append(end + (stored,))
            if (previous is None or transport == "http" and previous["status"] == "failed") and conv is None:
                break  # (a failed turn's JSON body is its error: no id to continue from)
            if previous is not None and previous["status"] != "failed":
                good = previous
            as_items = [{"role": "user", "content": new}] if isinstance(new, str) else new
            conversation = conversation + as_items + (previous["output"] if previous is not None else [])
    finally:
        if sock is not None:
            sock.close()
    return got, list(Backend.received)


def _stored(gw, response_id: str) -> tuple:
    """What the store shows of a response: GET it, and its input items."""
    url = f"{gw.base_url}/responses/{response_id}"
    got = requests.get(url, timeout=10), requests.get(url + "/input_items", timeout=10)
    return tuple((r.status_code, r.json()) for r in got)


def _response(end: tuple) -> dict | None:
    if end[0] == "whole":
        return end[1]
    if end[0] == "events":
        return parse_sse(end[1])[-1]["response"]
    return None


# --- comparing -----------------------------------------------------------------------------------

_ID = re.compile(r'\b([a-z]+)_[0-9a-f]{32}[A-Za-z0-9_-]*|\b(req)_[0-9a-f]{20}(_\d+)?')
# (the gateway's random ids; a request id, and a socket message's own, req_…_<n>: README)
_SEALED = re.compile(r'"encrypted_content": ?"[^"]*"')
_TIMES = re.compile(r'"(created_at|completed_at)": ?\d+(\.\d+)?')


def _renamed(text: str) -> str:
    """Random ids renamed by order of appearance, sealed content and times blanked."""
    names: dict[str, str] = {}
    text = _ID.sub(lambda m: names.setdefault(m[0], f"{m[1] or m[2]}_{len(names)}"), text)
    return _TIMES.sub(r'"\1": 0', _SEALED.sub('"encrypted_content": "<sealed>"', text))


def _events(sse: bytes, store: bool) -> list[dict]:
    """A stream's events with every run of deltas merged (as the socket sends them: docstring)."""
    events = parse_sse(ws.canonical(sse))
    for e in events:
        if "response" in e:
            e["response"] = _unchained(e["response"], store)
    return json.loads(_renamed(json.dumps(events)))


def _unchained(response: dict, store: bool) -> dict:
    """(store false: an HTTP client sends the whole conversation again, the socket continues: docstring)"""
    return response if store else {k: v for k, v in response.items() if k != "previous_response_id"}


def _kept(stored: tuple | None, store: bool):
    """What the store shows of a turn (``_run``), ids and times aside."""
    if stored is not None and len(stored) == 3:  # (with a conversation's items)
        return _kept(stored[0], store), json.loads(_renamed(json.dumps(stored[1:])))
    if stored is None:
        return None
    (status, response), items = stored
    return json.loads(_renamed(json.dumps([status, _unchained(response, store), items])))


def _same(a, b) -> None:
    """``a == b``, or an AssertionError showing where they differ."""
    if a != b:
        import difflib
        lines = difflib.unified_diff(json.dumps(a, indent=1).splitlines(), json.dumps(b, indent=1).splitlines(),
                                     lineterm="", n=2)
        raise AssertionError("\n".join(list(lines)[:80]))


def _outcome(end: tuple, store: bool) -> tuple:
    """What a client makes of a turn's end, ids and times aside."""
    if end[0] == "refused":
        text = _renamed(json.dumps(end[:4]))
        # (store false: over HTTP the whole conversation again, its new input further on: docstring)
        return json.loads(text if store else re.sub(r"input\[\d+\]", "input[_]", text))
    return "response", json.loads(_renamed(json.dumps(_unchained(_response(end), store))))


# (each example runs three chains through the gateway: no shrinking, which would take minutes; a
# failure shows its example whole)
@settings(max_examples=60, deadline=None, derandomize=True, phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@given(body=requests_(), script=st.lists(answers(), min_size=1, max_size=3),
       chain=st.sampled_from(["previous", "conversation", "stream true", "stream false", "retry", "warm-up"]),
       first=st.sampled_from(_FIRST), refer=st.booleans())
def test_property_a_turn_runs_the_same_over_http_and_the_websocket(rig, body, script, chain, first, refer):
    store = body.get("store", True) and chain != "warm-up"  # (the first turn continues a warm-up: previous_response_id)
    if chain == "retry" and not store:
        chain = "previous"  # (over HTTP, the whole conversation again; the socket forgot it: the spec's rule)
    http_stream, sent_stream = _run(rig, "http-stream", body, script, chain, first, refer)
    http_whole, sent_whole = _run(rig, "http", body, script, chain, first, refer)
    socket, sent_socket = _run(rig, "ws", body, script, chain, first, refer)
    assert sent_stream == sent_socket
    assert sent_whole == sent_stream[:len(sent_whole)]  # (its chain may end sooner: _run)
    assert len(http_stream) == len(socket)
    for streamed, whole, over_socket in zip(http_stream, http_whole + [None] * 3, socket):
        if streamed[0] == "events" and over_socket[0] == "events":
            _same(_events(streamed[1], store), _events(over_socket[1], store))
        _same(_outcome(streamed, store), _outcome(over_socket, store))
        _same(_kept(streamed[-1], store), _kept(over_socket[-1], store))
        outcome = _outcome(streamed, store)
        event(f"ends {outcome[2] if outcome[0] == 'refused' else outcome[1]['status']}")
        if outcome[0] == "response":
            event("output " + ",".join(sorted({i["type"] for i in outcome[1]["output"]})))
        if whole is None:
            continue
        if whole[0] == "whole":
            _same(_outcome(streamed, store), _outcome(whole, store))
            _same(_kept(streamed[-1], store), _kept(whole[-1], store))
        elif streamed[0] == "events":  # a failed turn's JSON body: the stream's response.failed, its code
            end = _response(streamed)  # (the gateway's own code, a refused key's: server_error, the code in type)
            assert (end["status"], specific_code(end["error"])) == ("failed", whole[2]), (end, whole)
        else:
            _same(_outcome(streamed, store), _outcome(whole, store))
    event(f"chain of {len(http_stream)}")
