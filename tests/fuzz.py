"""Byte-level fuzzing through a real mitmdump: mutated real Codex requests.

    python tests/fuzz.py --cases 20000                  (what `make fuzz` runs; a random seed)
    python tests/fuzz.py --cases 600 --seed 1           (what `make test` runs, tests/test_fuzz.py)
    python tests/fuzz.py --seed 5 --findings DIR        minimized findings written to DIR
    python tests/fuzz.py --websocket --cases 5000       the same, as messages on a Responses WebSocket

Each case is a real Codex 0.169.0 request (tests/fixtures/codex-0.169.0, whole or cut down to a
few items and tools) put through one to three mutations of its bytes — bit flips, interesting
bytes, truncation, inserted, deleted and duplicated spans, whole JSON members cut away, huge and
non-finite numbers, deep nesting, duplicate keys, unknown item types, wrong content part types, wrong value types,
invalid UTF-8 and lone surrogate escapes, an oversized body — sent with a content-type (and now
and then a content-encoding) that is usually, not always, the right one. The gateway's backend
is a recorder (``Recorder``) that keeps every request it gets and answers with a fixed stream.

What must hold for every case (``problems``):

- the answer is 200, 400 or 413 (or 415 for a content-encoding the gateway does not decode, or
  a content type that is not JSON) —
  never a 5xx, never a hang (a timeout) or a reset;
- a 400/413 is an OpenAI error object, and the backend received nothing;
- a 200 is a Responses answer (an SSE stream of ``response.*`` events ending in exactly one
  terminal event, or one ``response`` object), never the backend's chat body handed through;
  and the backend received exactly one request, a well-formed chat request (``well_formed``):
  strict UTF-8, strict JSON (no NaN/Infinity), the chat shape, ``stream: true``.

The WebSocket mode (``--websocket``) sends each case, with ``"type": "response.create"`` added
last (``as_message``), as a message on one socket (``Socket``): the same rules hold for its
answer (an ``error`` message is its status and body; a turn's messages, its stream), and the
socket must stay open through every case.

After the cases the gateway must still answer a normal turn and be running. A failing case is
shrunk (``minimize``: spans are cut away while the same problem remains) and, with
``--findings``, written as ``NAME.bin`` (the body) beside ``NAME.json`` (its headers and the
problem). Reviewed findings become regression fixtures in tests/fixtures/fuzz/ (``expected.json``
gives each one's status and error code), replayed by tests/test_fuzz.py on every ``make test``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from helpers import (
    ADDON, CODEX_FIXTURES, FIXTURES, NAME_RE, TERMINAL, LocalServer, QuietHandler, chat_chunk, chat_sse, codex_fixture,
    parse_sse, send_sse, start_gateway,
)

REGRESSIONS = FIXTURES / "fuzz"
ALLOWED = (200, 400, 413)
MAX_BODY_MB = 1  # the fuzzing gateway's max_request_body_mb: the oversize mutation crosses it

# --- the backend ----------------------------------------------------------------------------

CANNED_ID = "chatcmpl-fuzz-recorder"  # must never appear in what a client gets
_CANNED = chat_sse(
    chat_chunk({"role": "assistant", "content": "ok"}, id=CANNED_ID, model="fuzz"),
    chat_chunk(finish="stop", id=CANNED_ID, model="fuzz"),
    chat_chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}, id=CANNED_ID,
               model="fuzz"))


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes


class Recorder(LocalServer):
    """A chat backend that keeps every request it receives and answers each with ``_CANNED``."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.lock = threading.Lock()
        super().__init__(_RecorderHandler)

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def since(self, n: int) -> list[Received]:
        with self.lock:
            return self.received[n:]


class _RecorderHandler(QuietHandler):
    def do_POST(self):
        size = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(size)
        with self.server.lock:
            self.server.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        send_sse(self, _CANNED)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST


# --- what a backend may receive ---------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def well_formed(got: Received) -> str | None:
    """What is wrong with a request the backend received (None: a well-formed chat request)."""
    if got.path.split("?")[0] != "/v1/chat/completions":
        return f"went to {got.path}"
    if any(k.startswith("x-resp2chat") for k in got.headers):
        return "relay headers reached the backend"
    if got.headers.get("content-encoding", "identity") != "identity":
        return f"content-encoding {got.headers['content-encoding']} to the backend"
    try:
        chat = json.loads(got.body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"not strict UTF-8 JSON: {exc}"[:200]
    if not isinstance(chat, dict) or not isinstance(chat.get("model"), str) or chat.get("stream") is not True:
        return "not a streamed chat request"
    messages = chat.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"messages[{i}] has no valid role"
        content = m.get("content")
        if not (content is None or isinstance(content, str) or (isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") in ("text", "image_url") for p in content))):
            return f"messages[{i}].content is malformed"
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(fn, dict) and isinstance(call.get("id"), str) and isinstance(fn.get("arguments"), str)
                    and isinstance(fn.get("name"), str) and NAME_RE.match(fn["name"])):
                return f"messages[{i}].tool_calls is malformed"
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            return f"messages[{i}] has no tool_call_id"
    for i, tool in enumerate(chat.get("tools") or ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(fn, dict) and tool.get("type") == "function" and isinstance(fn.get("parameters"), dict)
                and isinstance(fn.get("name"), str) and NAME_RE.match(fn["name"])):
            return f"tools[{i}] is malformed"
    return None


# --- what a client may get --------------------------------------------------------------------


@dataclass
class Case:
    name: str
    body: bytes
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})


@dataclass
class Outcome:
    status: int | None  # None: no answer (a hang or a reset)
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    error: str = ""


class Socket:
    """The WebSocket mode: one Responses WebSocket to the gateway that every case is sent on as
    a message (text when it is UTF-8, else binary: only binary can carry invalid UTF-8), and
    its answer read back as an Outcome: an ``error`` message is its status and error body, a
    turn's messages are the SSE stream they stand for. The socket must survive every case: a
    close or a hang is a problem, and the next case gets a new socket."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url, self.timeout, self.client = base_url, timeout, None

    def send(self, case: Case) -> Outcome:
        import wsproto.events as E
        from wsclient import WSClient

        try:
            if self.client is None:
                self.client = WSClient(self.base_url, timeout=self.timeout)
            try:
                message = E.TextMessage(data=case.body.decode("utf-8"))
            except UnicodeDecodeError:
                message = E.BytesMessage(data=case.body)
            self.client.sock.sendall(self.client.ws.send(message))
            events = self.client.events()
        except Exception as exc:  # noqa: BLE001 — a close, a reset, a timeout, a refused upgrade
            self.close()
            return Outcome(None, error=f"the socket: {type(exc).__name__}: {exc}"[:300])
        if len(events) == 1 and events[0].get("type") == "error":
            return Outcome(events[0].get("status"), json.dumps({"error": events[0].get("error")}).encode(),
                           {"content-type": "application/json"})
        sse = b"".join(f"event: {e.get('type')}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
        return Outcome(200, sse, {"content-type": "text/event-stream"})

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def as_message(body: bytes) -> bytes:
    """An HTTP body as a ``response.create`` message: the transport's member goes last, so byte
    offsets into the body stay those of the HTTP body (and its errors' messages the same)."""
    head = body.rstrip()
    if not (head.startswith(b"{") and head.endswith(b"}")):
        return body
    inner = head[:-1].rstrip()
    return inner + (b"" if inner.endswith(b"{") else b",") + b'"type":"response.create"}'


def send(base_url: str, case: Case, timeout: float = 30.0) -> Outcome:
    try:
        r = requests.post(base_url + "/responses", data=case.body, headers=case.headers, timeout=timeout)
    except requests.RequestException as exc:
        return Outcome(None, error=f"{type(exc).__name__}: {exc}"[:300])
    return Outcome(r.status_code, r.content, {k.lower(): v for k, v in r.headers.items()})


def _sse_events(raw: bytes) -> list[dict] | str:
    """The events of a stream (helpers.parse_sse, the tests' strict reader), or what is wrong with it."""
    try:
        return parse_sse(raw)
    except (AssertionError, ValueError, KeyError, TypeError) as exc:  # (UnicodeDecodeError, JSON: ValueError)
        return f"not a well-formed Responses stream: {exc}"[:300]


def problems(out: Outcome, backend: list[Received]) -> str | None:
    """What is wrong with one answer, given what the backend received meanwhile (None: fine)."""
    if out.status is None:
        return f"no answer: {out.error}"
    if out.status not in ALLOWED and not (out.status == 415 and (b'"unsupported_content_encoding"' in out.body
                                                                 or b'"unsupported_media_type"' in out.body)):
        return f"status {out.status}: {out.body[:200]!r}"
    if CANNED_ID.encode() in out.body:
        return "the backend's body reached the client"
    if out.status != 200:
        if backend:
            return f"status {out.status}, yet the backend received {len(backend)} request(s)"
        try:
            err = json.loads(out.body)["error"]
            assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        except Exception:  # noqa: BLE001
            return f"status {out.status} without an OpenAI error object: {out.body[:200]!r}"
        return None
    if len(backend) != 1:
        return f"status 200, yet the backend received {len(backend)} requests"
    wrong = well_formed(backend[0])
    if wrong:
        return f"malformed request to the backend: {wrong}"
    if out.headers.get("content-type", "").startswith("text/event-stream"):
        events = _sse_events(out.body)
        if isinstance(events, str):
            return events
        types = [e.get("type", "") for e in events]
        if not types or not all(t.startswith("response.") for t in types):
            return f"not Responses events: {types[:5]}"
        if sum(t in TERMINAL for t in types) != 1 or types[-1] not in TERMINAL:
            return f"terminal events: {[t for t in types if t in TERMINAL]}"
        return None
    try:
        answer = json.loads(out.body)
    except ValueError:
        return f"status 200, neither SSE nor JSON: {out.body[:200]!r}"
    if not isinstance(answer, dict) or answer.get("object") != "response":
        return f"status 200, not a Response object: {out.body[:200]!r}"
    return None


def kind(problem: str) -> str:
    """A problem's kind, for shrinking: the same kind must remain ("status 500", "malformed
    request to the backend: no messages", …; not the bodies quoted after them)."""
    if problem.startswith("status "):
        return problem.split(":")[0].split(",")[0]
    return ": ".join(problem.split(": ")[:2])


# --- the inputs and their mutations -----------------------------------------------------------


def seeds(websocket: bool = False) -> list[bytes]:
    """The real Codex requests, whole and cut down (fewer bytes per case: more cases per second);
    as ``response.create`` messages in the WebSocket mode."""
    if websocket:
        return [as_message(seed) for seed in seeds()]
    out = []
    for path in sorted(CODEX_FIXTURES.glob("*.json")):
        body = json.loads(path.read_text())["body"]
        out.append(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
        small = {**body, "input": body["input"][-3:], "tools": body["tools"][:3]}
        out.append(json.dumps(small, separators=(",", ":"), ensure_ascii=False).encode())
    return out


INTERESTING = b'\x00\x7f\x80\xbf\xc0\xc1\xed\xf4\xf5\xff"\\{}[],:0-eE.'
NUMBERS = [b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"1e-999", b"-0", b"0.0e0", b"9" * 30,
           b"9" * 4400, b"-" + b"9" * 5000, b"1E+308", b"1.7976931348623157e309", b"01", b"1.", b".5", b"+1",
           b"0x10", b"-", b"2.5", b"4294967296", b"-1"]
NUMERIC_KEYS = [b"max_output_tokens", b"temperature", b"top_p", b"top_logprobs", b"max_tool_calls", b"seed"]
ITEM_TYPES = [b"message", b"function_call", b"function_call_output", b"custom_tool_call", b"custom_tool_call_output",
              b"reasoning", b"local_shell_call", b"local_shell_call_output", b"web_search_call", b"item_reference",
              b"compaction", b"image_generation_call", b"tool_search_call", b"mcp_call", b"zzz", b"", b"MESSAGE",
              b"function", b"input_text", b"output_text", b"text", b"json_schema", b"object", b"string"]
CONTENT_TYPES = [b"input_text", b"output_text", b"input_image", b"input_file", b"refusal", b"summary_text",
                 b"reasoning_text", b"text", b"image_url", b"input_audio", b"zzz"]
VALUES = [b"null", b"true", b"false", b"0", b"-1", b"[]", b"{}", b'""', b'"x"', b"[null]", b'[{"type":"zzz"}]',
          b'{"type":"message"}', b"1e999", b'"\\ud800"', b"[[[[[[[[]]]]]]]]"]
DUP_MEMBERS = [b'"model":"dup",', b'"input":"dup",', b'"stream":false,', b'"stream":true,', b'"type":"message",',
               b'"role":"system",', b'"tools":[],', b'"call_id":"dup",', b'"content":"dup",', b'"input":[],',
               b'"previous_response_id":"resp_nope",', b'"store":true,', b'"tool_choice":"required",',
               b'"text":{"format":{"type":"json_schema","name":"x","schema":{}}},']
BAD_TEXT = [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xff", b"\x80", b"\xe2\x82", b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80", b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"\\udbff\\udbff", b"\\uDC00\\uD800",
            b"\x00", b"\\u0000", b"\x1b[31m", b"\\\\ud800", b"\xef\xbb\xbf", b"\r\n"]


def _positions(data: bytes, pattern: bytes) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(pattern), data)]


def bit_flip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def interesting_byte(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.choice(INTERESTING)
    return bytes(b)


def truncate(rng, data):
    return data[:rng.randrange(len(data))]


def insert_span(rng, data):
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        span = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        start = rng.randrange(len(data))
        span = data[start:start + rng.randint(1, 256)]
    return data[:at] + span + data[at:]


def delete_span(rng, data):
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 512):]


def duplicate_span(rng, data):
    at = rng.randrange(len(data))
    span = data[at:at + rng.randint(1, 1024)]
    return data[:at] + span + span + data[at + len(span):]


def drop_members(rng, data):
    """Cut whole JSON members (input items, tools, keys, content parts): structure, not bytes."""
    for _ in range(rng.randint(1, 6)):
        spans = _elements(data)
        if not spans:
            break
        a, b = rng.choice(spans)
        data = data[:a] + data[b:]
    return data


def number(rng, data):
    value = rng.choice(NUMBERS)
    found = [m for m in re.finditer(rb"(?<=[:\[,])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", data)]
    if found and rng.random() < 0.5:
        m = rng.choice(found)
        return data[:m.start()] + value + data[m.end():]
    member = b'"' + rng.choice(NUMERIC_KEYS) + b'":' + value + b","
    at = rng.choice(_positions(data, b"{") or [0]) + 1
    return data[:at] + member + data[at:]


def deep_nesting(rng, data):
    depth = rng.choice([32, 100, 500, 990, 1000, 3000, 20000, 200000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    nest = opener * depth + rng.choice([b"1", b'"x"', b"null"]) + closer * depth
    at = rng.choice(_positions(data, b"{") or [0]) + 1
    return data[:at] + b'"' + rng.choice([b"zz", b"metadata", b"content", b"parameters", b"arguments", b"input"]) \
        + b'":' + nest + b"," + data[at:]


def duplicate_key(rng, data):
    at = rng.choice(_positions(data, b"{") or [0]) + 1
    return data[:at] + rng.choice(DUP_MEMBERS) + data[at:]


def item_type(rng, data):
    found = list(re.finditer(rb'"type":"([^"\\]*)"', data))
    if not found:
        return data
    m = rng.choice(found)
    return data[:m.start(1)] + rng.choice(ITEM_TYPES) + data[m.end(1):]


def content_type(rng, data):
    found = list(re.finditer(rb'"type":"(' + b"|".join(CONTENT_TYPES) + rb')"', data))
    if not found:
        return data
    m = rng.choice(found)
    return data[:m.start(1)] + rng.choice(CONTENT_TYPES) + data[m.end(1):]


def value_type(rng, data):
    found = list(re.finditer(rb':("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null)(?=[,}\]])', data))
    if not found:
        return data
    m = rng.choice(found)
    return data[:m.start(1)] + rng.choice(VALUES) + data[m.end(1):]


def bad_text(rng, data):
    strings = [m.start() + 1 for m in re.finditer(rb'"(?:text|content|output|arguments|input|instructions|model)":"', data)]
    at = (rng.choice(strings) + len(b'"text":"') - 1) if strings and rng.random() < 0.8 else rng.randrange(len(data))
    at = min(at, len(data))
    return data[:at] + rng.choice(BAD_TEXT) + data[at:]


def oversize(rng, data):
    at = data.find(b'"text":"')
    pad = b"x" * ((MAX_BODY_MB << 20) + rng.randint(1, 4096))
    return data[:at + 8] + pad + data[at + 8:] if at >= 0 else data + pad


MUTATORS = [bit_flip, interesting_byte, truncate, insert_span, delete_span, duplicate_span, drop_members, number,
            deep_nesting, duplicate_key, item_type, content_type, value_type, bad_text]
# mostly JSON: any other type is refused at the head (415), before the body parser the cases are for
CONTENT_TYPE_HEADERS = ["application/json"] * 36 + [
    "application/json; charset=utf-8", "application/json; charset=utf-16", "application/vnd.openai+json",
    "text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/x-ndjson"]


def make_case(rng: random.Random, bases: list[bytes], n: int, tag: str) -> Case:
    data = rng.choice(bases)
    names = []
    if rng.random() < 0.01:
        chosen = [oversize]
    else:
        chosen = [rng.choice(MUTATORS) for _ in range(rng.choices([1, 2, 3], [6, 3, 1])[0])]
    for mutate in chosen:
        if data:
            data = mutate(rng, data)
            names.append(mutate.__name__)
    headers = {}
    ctype = rng.choice(CONTENT_TYPE_HEADERS)
    if ctype:
        headers["content-type"] = ctype
    if rng.random() < 0.03:
        encoding = rng.choice(["gzip", "deflate", "br", "zstd", "identity", "x-bogus", "gzip, gzip"])
        headers["content-encoding"] = encoding
        if encoding == "gzip" and rng.random() < 0.5:
            data = gzip.compress(data)
            names.append("gzipped")
        names.append(f"encoding-{encoding}")
    return Case(f"{tag}-{n:05d}-{'+'.join(names) or 'none'}", data, headers)


def cases(seed: int, count: int, websocket: bool = False):
    rng = random.Random(seed)
    bases = seeds(websocket)
    for n in range(count):
        yield make_case(rng, bases, n, f"{'ws' if websocket else 's'}{seed}")  # (a message has no headers)


# --- running, shrinking, keeping --------------------------------------------------------------


def check(base_url: str, recorder: Recorder, case: Case, timeout: float = 30.0,
          socket: Socket | None = None) -> tuple[Outcome, str | None]:
    """One case, over HTTP, or as a message on ``socket`` (the WebSocket mode)."""
    before = recorder.count()
    out = socket.send(case) if socket is not None else send(base_url, case, timeout)
    return out, problems(out, recorder.since(before))


def _elements(data: bytes) -> list[tuple[int, int]]:
    """Spans of the members of every JSON array and object in ``data``, each with one comma, so
    that cutting one leaves the rest as valid (or as invalid) as it was. Reads bytes, so invalid
    UTF-8 inside strings is no obstacle; unbalanced input simply yields fewer spans."""
    spans, stack, in_string, escaped = [], [], False, False
    for i, c in enumerate(data):
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            stack.append([i + 1])
        elif c == 0x2C and stack:
            stack[-1].append(i)
        elif c in b"]}" and stack:
            bounds = stack.pop() + [i]
            commas = bounds[1:-1]
            if not commas:
                spans.append((bounds[0], i))
                continue
            spans.append((bounds[0], commas[0] + 1))
            spans += list(zip(commas, commas[1:] + [i]))
    return [(a, b) for a, b in spans if b > a]


def minimize(base_url: str, recorder: Recorder, case: Case, problem: str, budget: int = 400,
             socket: Socket | None = None) -> Case:
    """Cut JSON members, then plain byte spans, away while the same kind of problem remains (at
    most ``budget`` requests)."""
    want, body, tries = kind(problem), case.body, 0

    def still(candidate: bytes) -> bool:
        nonlocal tries
        tries += 1
        found = check(base_url, recorder, Case(case.name, candidate, case.headers), socket=socket)[1]
        return bool(found) and kind(found) == want

    progress = True
    while progress and tries < budget:
        progress = False
        for a, b in sorted(_elements(body), key=lambda span: span[0] - span[1]):  # the largest first
            if tries >= budget:
                break
            if still(body[:a] + body[b:]):
                body, progress = body[:a] + body[b:], True
                break
    chunk = max(len(body) // 2, 1)
    while chunk >= 1 and tries < budget:
        at, progress = 0, False
        while at < len(body) and tries < budget:
            candidate = body[:at] + body[at + chunk:]
            if still(candidate):
                body, progress = candidate, True
            else:
                at += chunk
        if not progress:
            chunk //= 2
    return Case(case.name, body, case.headers)


def normal_turn_works(base_url: str, recorder: Recorder, socket: Socket | None = None) -> str | None:
    body = json.dumps(codex_fixture("01-text-only.json")["body"]).encode()
    return check(base_url, recorder, Case("normal-turn", as_message(body) if socket else body), socket=socket)[1]


@dataclass
class Report:
    cases: int = 0
    statuses: dict = field(default_factory=dict)
    findings: list[tuple[Case, str]] = field(default_factory=list)


def fuzz(base_url: str, recorder: Recorder, seed: int, count: int, findings: Path | None = None,
         shrink: bool = True, deadline: float | None = None, websocket: bool = False) -> Report:
    """``websocket``: every case a message on one Responses WebSocket (``Socket``), not a POST."""
    report = Report()
    socket = Socket(base_url) if websocket else None
    try:
        for case in cases(seed, count, websocket):
            if deadline is not None and time.monotonic() > deadline:
                break
            out, problem = check(base_url, recorder, case, socket=socket)
            report.cases += 1
            report.statuses[out.status] = report.statuses.get(out.status, 0) + 1
            if problem:
                small = minimize(base_url, recorder, case, problem, socket=socket) if shrink else case
                report.findings.append((small, problem))
                if findings is not None:
                    save(findings, small, problem)
        after = normal_turn_works(base_url, recorder, socket)
        if after:
            report.findings.append((Case("normal-turn-after-fuzzing", b""), after))
    finally:
        if socket is not None:
            socket.close()
    return report


def save(directory: Path, case: Case, problem: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{case.name}.bin").write_bytes(case.body)
    (directory / f"{case.name}.json").write_text(json.dumps({"headers": case.headers, "problem": problem}, indent=1))


def regressions() -> list[tuple[str, Case, dict]]:
    """tests/fixtures/fuzz: (name, case, expectation) for every kept finding."""
    expected = json.loads((REGRESSIONS / "expected.json").read_text())
    return [(name, Case(name, (REGRESSIONS / f"{name}.bin").read_bytes(), want.get("headers", {})), want)
            for name, want in sorted(expected.items())]


def start(tmp: Path, addon: str | None = None):
    """A recorder and a real mitmdump in front of it (the gateway fuzzing talks to)."""
    recorder = Recorder()
    extra = ("--set", "resp2chat_max_replay_entries=0", "--set", f"resp2chat_max_request_body_mb={MAX_BODY_MB}",
             "--set", "flow_detail=0")
    # addon: another checkout's (e.g. to see what fuzzing finds there)
    gw = start_gateway(recorder.url, tmp, *extra, addon=Path(addon).resolve() if addon else ADDON)
    return recorder, gw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Byte-level fuzzing of the gateway through a real mitmdump.")
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, help="default: a random one (printed)")
    ap.add_argument("--seconds", type=float, help="stop after this long, whatever --cases says")
    ap.add_argument("--findings", type=Path, help="write each (minimized) finding here as NAME.bin + NAME.json")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--addon", help="the mitmproxy script to fuzz (default: this checkout's addon/resp2chat.py)")
    ap.add_argument("--websocket", action="store_true", help="send every case as a message on a Responses WebSocket")
    args = ap.parse_args(argv)
    import tempfile

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    recorder, gw = start(Path(tempfile.mkdtemp(prefix="resp2chat-fuzz-")), args.addon)
    started = time.monotonic()
    try:
        deadline = started + args.seconds if args.seconds else None
        report = fuzz(gw.base_url, recorder, seed, args.cases, args.findings, not args.no_shrink, deadline,
                      args.websocket)
        alive = gw.proc.poll() is None
    finally:
        gw.stop()
        recorder.close()
    took = time.monotonic() - started
    print(f"seed {seed}: {report.cases} cases in {took:.0f} s, statuses {report.statuses}, "
          f"{len(report.findings)} findings{'' if alive else ', THE GATEWAY EXITED'}")
    for case, problem in report.findings[:50]:
        print(f"  {case.name} ({len(case.body)} bytes): {problem}")
    return 1 if report.findings or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
