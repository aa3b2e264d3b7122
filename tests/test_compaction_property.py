"""Compaction, property tests (resp2chat_core/compaction.py), through one real mitmdump gateway
and a scripted local backend, over HTTP and the WebSocket:

- a summary is written two ways, by ``POST /v1/responses/compact`` (the translator of Codex's
  compaction turn, ``CompactionTranslator``) and by server-side compaction (``context_management``:
  the relay's ``SummaryReader``): for any answer of the backend both succeed or both fail (with
  the same code, never a 500), and when they succeed they sealed the same summary, what a later
  turn lowers their item to (SUMMARY_PREFIX + summary);
- a compaction item that is not one the gateway sealed (altered, cut, another key's, another
  purpose's, no string), or a trigger not last, is a 400 naming the item's place in the client's
  own input (continuing a stored response or not), on either transport; a sound one lowers to its
  summary in its place;
- the compact endpoint's answer for a random conversation (user, assistant and developer
  messages, images, tool calls, empty texts; continuing a stored response or not) is the
  conversation's user messages then one compaction item, its usage the backend's; it is a whole
  input again: to a later turn (either transport), which lowers it to those user messages then
  the summary, and to the endpoint itself.
"""

from __future__ import annotations

import json
import threading

import pytest
import requests
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from helpers import (PNG, LocalServer, QuietHandler, chat_chunk, chat_completion, chat_sse, post_turn, send_cut,
                     send_json, send_sse, start_gateway)
from resp2chat_core.compaction import COMPACTION_PROMPT, PURPOSE, SUMMARY_PREFIX
from resp2chat_core.seal import derive_key, seal
from wsclient import WSClient

MODEL = "m"
SECRET = "compaction property seal key"
KEY = derive_key(SECRET)
OVER = [{"type": "compaction", "compact_threshold": 1}]  # (every request is over it)
HISTORY = [{"role": "user", "content": "my name is Ada"},
           {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada"}]},
           {"role": "user", "content": [{"type": "input_text", "text": "I like tea"}]}]
NEXT = {"role": "user", "content": "what do I like?"}
USAGE = {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53}
ANSWER = chat_sse(chat_chunk({"role": "assistant", "content": "answer"}), chat_chunk(finish="stop"),
                  chat_chunk(choices=[], usage=USAGE))


class Backend(QuietHandler):
    """Answers a summary request (the compaction prompt last) with ``Backend.summary``, anything
    else with ``Backend.answer``: ("sse", bytes), ("json", a body), ("status", int), ("cut",
    bytes: the stream's head and these, then the connection drops); keeps every chat request."""

    summary: tuple = ("sse", ANSWER)
    answer: tuple = ("sse", ANSWER)
    received: list[dict] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        with Backend.lock:
            Backend.received.append(body)
        kind, what = Backend.summary if body["messages"][-1].get("content") == COMPACTION_PROMPT else Backend.answer
        if kind == "status":
            send_json(self, what, {"error": {"message": f"backend says {what}", "type": "x",
                                             "code": "context_length_exceeded" if what == 400 else None}})
        elif kind == "json":
            send_json(self, 200, what)
        elif kind == "cut":
            send_cut(self, what)
        else:
            send_sse(self, what)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compaction")
    with LocalServer(Backend) as backend:
        gw = start_gateway(backend.url, tmp, "--set", "resp2chat_max_replay_entries=0",
                           "--set", f"resp2chat_seal_key={SECRET}")
        try:
            yield gw
        finally:
            gw.stop()


def _sent() -> list[dict]:
    with Backend.lock:
        return list(Backend.received)


def _clear() -> None:
    with Backend.lock:
        Backend.received.clear()


# --- 1. the two ways a summary is written read the backend alike ------------------------------

_PIECES = st.sampled_from(["Goal: tea.", " ", "\n", "é😀 ", "a b", "  spaced  ", "\n\nState: done\n",
                          "<think>hm</think>ok", "<think>", "</think>", "plan</think>"])


@st.composite
def summaries(draw) -> tuple:
    """A backend's answer to a summary request: a stream of text, reasoning, refusals and tool
    calls, ended well or not (a finish reason, [DONE], an error object, garbage, a cut), a whole
    ``chat.completion``, or an error status."""
    form = draw(st.sampled_from(["sse"] * 8 + ["cut", "status", "whole"]))
    if form == "status":
        return "status", draw(st.sampled_from([400, 404, 429, 500, 503]))
    if form == "whole":
        message = {"content": draw(st.sampled_from(["", "Goal: tea.", "  \n", "é😀"]))}
        if draw(st.booleans()):
            message["reasoning_content"] = "hmm"
        return "json", chat_completion(message, draw(st.sampled_from(["stop", "length", "error", "abort"])))
    chunks: list = [chat_chunk({"role": "assistant"})]
    for key in draw(st.lists(st.sampled_from(["reasoning_content", "content", "refusal"]), max_size=3,
                             unique=True)):
        chunks += [chat_chunk({key: piece}) for piece in draw(st.lists(_PIECES, min_size=1, max_size=3))]
    if draw(st.booleans()):
        chunks += [chat_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "f", "arguments": "{}"}}]})]
    trouble = draw(st.sampled_from([None] * 5 + ["error", "garbage"]))
    if trouble == "error":
        chunks.append({"error": {"message": "overloaded", "type": "server_error",
                                 "code": draw(st.sampled_from([None, "context_length_exceeded"]))}})
    elif trouble == "garbage":
        chunks.append("this is no JSON")
    finish = draw(st.sampled_from(["stop"] * 4 + ["length", "content_filter", "tool_calls", "error", "abort", None]))
    if finish is not None:
        chunks.append(chat_chunk(finish=finish))
    if draw(st.booleans()):
        chunks.append(chat_chunk(choices=[], usage={"prompt_tokens": 90, "completion_tokens": 7, "total_tokens": 97}))
    done = draw(st.sampled_from([True, True, True, False]))
    if form == "cut":
        return "cut", chat_sse(*chunks, done=False)
    return "sse", chat_sse(*chunks, done=done)


def _failed(status: int | None, error: dict) -> tuple:
    return "failed", status, error.get("code")


def _by_the_endpoint(gw) -> tuple:
    """The compact endpoint's summary: ("ok", the summary its item lowers to later) or ("failed", status, code)."""
    _clear()
    r = requests.post(gw.base_url + "/responses/compact", json={"model": MODEL, "input": HISTORY}, timeout=30)
    if r.status_code != 200:
        return _failed(r.status_code, r.json()["error"])
    output = r.json()["output"]
    assert [o["type"] for o in output] == ["message", "message", "compaction"], output
    later = post_turn(gw, {"model": MODEL, "input": output + [NEXT], "store": False})
    assert later.status_code == 200, later.text
    messages = _sent()[-1]["messages"]
    assert messages[-1] == NEXT and messages[-2]["role"] == "user", messages
    return "ok", messages[-2]["content"].removeprefix(SUMMARY_PREFIX)


def _server_side(gw, transport: str) -> tuple:
    """A turn's own compaction round's summary: ("ok", the summary its answer round got) or ("failed", status, code)."""
    _clear()
    body = {"model": MODEL, "input": HISTORY, "store": False, "context_management": OVER}
    if transport == "http":
        r = post_turn(gw, body)
        if r.status_code != 200:
            return _failed(r.status_code, r.json()["error"])
        response = r.json()
    else:
        ws = WSClient(gw.base_url)
        try:
            end = ws.turn({"type": "response.create", **body})[-1]
        finally:
            ws.close()
        if end["type"] == "error":
            return _failed(end["status"], end["error"])
        response = end["response"]
        if response["status"] == "failed":
            return _failed(None, response["error"])
    assert response["status"] == "completed", response
    assert [o["type"] for o in response["output"]] == ["compaction", "message"], response["output"]
    messages = _sent()[-1]["messages"]
    assert messages[-1]["role"] == "user", messages
    # (its usage: the answer's, and the summary's output tokens, when the backend told them)
    return "ok", messages[-1]["content"].removeprefix(SUMMARY_PREFIX), response["usage"]["output_tokens"]


# (each example asks the gateway 3-5 times: no shrinking, which would take minutes; a failure shows its example whole)
@settings(max_examples=50, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(summary=summaries())
def test_property_the_endpoint_and_server_side_compaction_read_a_summary_alike(rig, summary):
    Backend.summary, Backend.answer = summary, ("sse", ANSWER)
    endpoint = _by_the_endpoint(rig)
    over_http, over_socket = _server_side(rig, "http"), _server_side(rig, "ws")
    event(f"{endpoint[0]} {endpoint[2] if endpoint[0] == 'failed' else ''}")
    for got in (endpoint, over_http, over_socket):
        assert got[0] == "ok" or got[1] != 500, got  # (a backend's failure is never the gateway's 500)
    assert endpoint[0] == over_http[0] == over_socket[0], (endpoint, over_http, over_socket)
    if endpoint[0] == "ok":
        assert endpoint[1] == over_http[1] == over_socket[1], (endpoint, over_http, over_socket)
        assert endpoint[1] and endpoint[1] == endpoint[1].strip()
        kind, what = summary
        told = 4 if kind == "json" else 7 if b'"completion_tokens": 7' in what else 0
        assert over_http[2] == over_socket[2] == 3 + told, (over_http, over_socket, told)
    else:
        assert endpoint[2] == over_http[2] == over_socket[2], (endpoint, over_http, over_socket)
        assert endpoint[1] == over_http[1], (endpoint, over_http)


# --- 2. a compaction item the gateway did not seal is a 400 naming it ---------------------------

_TURNS = st.sampled_from([
    {"role": "user", "content": "hi"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
    {"role": "user", "content": [{"type": "input_text", "text": "more"}]},
    {"role": "developer", "content": "Be terse."},
])
_SUMMARY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                        max_size=40).filter(str.strip)


@st.composite
def items(draw) -> tuple[dict | None, str, str | None]:
    """A compaction item as a client may send it: (the item, what it is, its summary when sound)."""
    text = draw(_SUMMARY_TEXT)
    token = seal(KEY, PURPOSE, text)
    how = draw(st.sampled_from(["sound", "cut", "altered", "another key", "another purpose", "not sealed", "empty",
                                "none", "number", "list", "missing", "trigger"]))
    if how == "trigger":
        return {"type": "compaction_trigger"}, how, None
    content = {
        "sound": token,
        "cut": token[:draw(st.integers(1, len(token) - 1))],
        "another key": seal(derive_key("another gateway"), PURPOSE, text),
        "another purpose": seal(KEY, "reasoning", text),
        "not sealed": "gAAAAABpZ-openai-encrypted-state",
        "empty": "", "none": None, "number": 7, "list": [token],
    }.get(how, token)
    if how == "altered":  # (one character of the body other than the last two, whose spare bits may not count)
        at = draw(st.integers(5, len(token) - 3))
        content = token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1:]
    item = {"type": "compaction"} if how == "missing" else {"type": "compaction", "encrypted_content": content}
    if draw(st.booleans()):
        item["id"] = "cmp_" + "0" * 32 + "_0"
    return item, how, text if how == "sound" else None


@settings(max_examples=60, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(before=st.lists(_TURNS, max_size=3), after=st.lists(_TURNS, max_size=2), item=items(),
       stored=st.lists(_TURNS, max_size=2), transport=st.sampled_from(["http", "ws"]))
def test_property_a_compaction_item_is_its_summary_in_place_or_a_400_naming_it(rig, before, after, item, stored,
                                                                               transport):
    Backend.summary = Backend.answer = ("sse", ANSWER)
    sent_item, how, text = item
    body: dict = {"model": MODEL, "input": [*before, sent_item, *after, NEXT], "store": False}
    if stored:  # (continuing a stored response: the item's place is still the one in the client's input)
        r = post_turn(rig, {"model": MODEL, "input": stored})
        assert r.status_code == 200, r.text
        body["previous_response_id"] = r.json()["id"]
    _clear()
    if transport == "http":
        r = post_turn(rig, body)
        status, answer = r.status_code, r.json()
    else:
        ws = WSClient(rig.base_url)
        try:
            end = ws.turn({"type": "response.create", **body})[-1]
        finally:
            ws.close()
        status, answer = (end["status"], end) if end["type"] == "error" else (200, end["response"])
    event(how)
    k = len(before)
    if how == "sound":
        assert status == 200 and answer["status"] == "completed", answer
        (sent,) = _sent()
        # the chat request is the one of the same input with a user message carrying the summary in its place
        _clear()
        opened = {**body, "input": [*before, {"role": "user", "content": SUMMARY_PREFIX + text}, *after, NEXT]}
        assert post_turn(rig, opened).status_code == 200
        assert _sent() == [sent]
        return
    assert status == 400, (status, answer)
    error = answer["error"]
    assert _sent() == []
    field = "type" if how == "trigger" else "encrypted_content"
    assert error["param"] == f"input[{k}].{field}", (error, k)
    assert error["message"].startswith(f"input[{k}].{field}: "), error  # (where param points: inputs.where)
    expected = {"trigger": "invalid_value", "empty": "invalid_value", "none": "invalid_value",
                "number": "invalid_value", "list": "invalid_value", "missing": "invalid_value"}
    assert error["code"] == expected.get(how, "invalid_encrypted_content"), error


# --- 3. the compact endpoint's answer is a whole input again ------------------------------------

_CALL = [{"type": "function_call", "call_id": "call_q", "name": "look", "arguments": "{}"},
         {"type": "function_call_output", "call_id": "call_q", "output": "seen"}]
_PARTS = st.sampled_from([
    [{"role": "user", "content": "my name is Ada"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "é😀\n" * 30}],
    [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "I like tea"}]}],
    [{"role": "user", "content": [{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": PNG}]}],
    [{"role": "user", "content": [{"type": "input_text", "text": "one"}, {"type": "input_text", "text": "two"}]}],
    [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}],
    [{"role": "developer", "content": "Be terse."}],
    _CALL,
])
_SUMMARIES = st.sampled_from(["Goal: tea.", "é😀 line\nline", "x" * 3000, "\\ud83d"])


def _as_output(item: dict) -> tuple:
    """A user message as the endpoint answers it (what matters: role and content, a string as one
    input_text, an image's ``detail`` "auto" when the client left it out: as the API's objects are)."""
    content = item["content"]
    if isinstance(content, str):
        return item.get("role"), [{"type": "input_text", "text": content}]
    return item.get("role"), [{"detail": "auto", **p} if p["type"] == "input_image" else p for p in content]


def _plain(messages: list[dict]) -> list[dict]:
    """Chat messages, an image's ``detail`` "auto" (the default) left out."""
    def part(p):
        if isinstance(p, dict) and p.get("type") == "image_url" and p["image_url"].get("detail") == "auto":
            return {**p, "image_url": {k: v for k, v in p["image_url"].items() if k != "detail"}}
        return p
    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


@settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_PARTS, min_size=1, max_size=5), stored=st.integers(0, 2), summary=_SUMMARIES,
       instructions=st.sampled_from([None, "Be brief."]), transport=st.sampled_from(["http", "ws"]))
def test_property_the_endpoint_answers_user_messages_then_the_item_a_whole_input_again(
        rig, parts, stored, summary, instructions, transport):
    conversation = [item for part in parts for item in part]
    stored = min(stored, len(parts) - 1)
    first = [item for part in parts[:stored] for item in part]  # (a stored response the request continues)
    rest = [item for part in parts[stored:] for item in part]
    usage = {"prompt_tokens": 321, "completion_tokens": 12, "total_tokens": 333,
             "prompt_tokens_details": {"cached_tokens": 300}}
    Backend.answer = ("sse", ANSWER)
    Backend.summary = ("sse", chat_sse(chat_chunk({"role": "assistant", "content": summary}), chat_chunk(finish="stop"),
                                       chat_chunk(choices=[], usage=usage)).replace(b"\\\\ud83d", b"\\ud83d"))
    body: dict = {"model": MODEL, "input": rest}
    if instructions:
        body["instructions"] = instructions
    kept = list(conversation)
    if first:
        r = post_turn(rig, {"model": MODEL, "input": first})
        assert r.status_code == 200, r.text
        body["previous_response_id"] = r.json()["id"]
        kept = first + r.json()["output"] + rest
    _clear()
    r = requests.post(rig.base_url + "/responses/compact", json=body, timeout=30)
    assert r.status_code == 200, r.text
    compacted = r.json()
    (asked,) = _sent()
    assert asked["messages"][-1] == {"role": "user", "content": COMPACTION_PROMPT}
    *users, item = compacted["output"]
    assert item["type"] == "compaction" and item["encrypted_content"].startswith("r2c1.")
    assert [_as_output(u) for u in users] == [_as_output(i) for i in kept if i.get("role") == "user"]
    assert all(u["type"] == "message" and u["status"] == "completed" and u["id"] for u in users)
    assert len({u["id"] for u in users}) == len(users)
    got = compacted["usage"]  # (the summary call's, as the backend told it)
    assert (got["input_tokens"], got["input_tokens_details"]["cached_tokens"], got["output_tokens"],
            got["total_tokens"]) == (321, 300, 12, 333), got
    said = summary if summary != "\\ud83d" else "\ufffd"  # (a lone surrogate escape from the backend: U+FFFD)
    opened = {"role": "user", "content": SUMMARY_PREFIX + said}
    later = {"model": MODEL, "input": compacted["output"] + [NEXT], "store": False}
    if instructions:
        later["instructions"] = instructions
    _clear()
    if transport == "http":
        r = post_turn(rig, later)
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    else:
        ws = WSClient(rig.base_url)
        try:
            end = ws.turn({"type": "response.create", **later})[-1]
        finally:
            ws.close()
        assert end["type"] == "response.completed", end
    (sent,) = _sent()
    # the later turn is the one of the conversation's user messages (as the client sent them), the summary in a
    # user message, then its new input (an image's detail "auto", the default, aside)
    _clear()
    plain = {**later, "input": [i for i in kept if i.get("role") == "user"] + [opened, NEXT]}
    assert post_turn(rig, plain).status_code == 200
    (expected,) = _sent()
    assert _plain(sent["messages"]) == _plain(expected["messages"])
    # and the endpoint takes its own answer again: the same user messages, a new item, and a summary request
    # of that conversation
    _clear()
    again = requests.post(rig.base_url + "/responses/compact", timeout=30, json={
        "model": MODEL, "input": compacted["output"], **({"instructions": instructions} if instructions else {})})
    assert again.status_code == 200, again.text
    assert again.json()["output"][:-1] == users
    (asked,) = _sent()
    assert _plain(asked["messages"][:-1]) == _plain(expected["messages"][:-1])
