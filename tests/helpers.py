"""The plain helpers every test file shares: the hermetic environment, real gateways and Codex
CLIs, waiting on conditions. Pytest fixtures are in conftest.py; everything else a test needs
from another file is here, once.

Importing this module makes the process hermetic (see ``_hermetic``): every test, and every
script that starts a gateway outside pytest (tests/fuzz.py, soak.py, recordings.py,
llamacpp/kv_figure.py and fleet.py), gets its own HOME and none of the developer's settings.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import typing
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests


def _hermetic() -> Path:
    """Every test, and every process a test starts, runs with its own HOME and XDG folders and
    without the developer's RESP2CHAT_*/OPENAI_*/BRAVE_* settings: a config file saved by
    `resp2chat configure`, or an exported key, must not reach a test gateway."""
    os.environ.setdefault("RESP2CHAT_LLAMACPP_DIR", str(Path.home() / ".cache" / "resp2chat-llamacpp"))
    keep = {"RESP2CHAT_LLAMACPP_DIR", "RESP2CHAT_REGEN_DIALECTS"}  # the test suite's own knobs
    for name in list(os.environ):
        if name.startswith(("RESP2CHAT_", "OPENAI_", "BRAVE_", "XDG_", "CODEX_HOME")) and name not in keep:
            del os.environ[name]
    home = Path(tempfile.mkdtemp(prefix="resp2chat-test-home-"))
    os.environ.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"))
    return home


TEST_HOME = _hermetic()


def gateway_env() -> dict:
    """The environment a test gateway starts from: the hermetic one, without even the test
    suite's own RESP2CHAT_* knobs (a test adds what it means to set, e.g. cli_env)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RESP2CHAT_", "OPENAI_", "BRAVE_"))}


ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "resp2chat.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CODEX_FIXTURES = FIXTURES / "codex-0.169.0"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
MITMWEB = MITMDUMP.with_name("mitmweb")


def codex_fixture(name: str) -> dict:
    return json.loads((CODEX_FIXTURES / name).read_text())


# --- waiting, processes, time -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 30.0, what: str = "the condition", proc: subprocess.Popen | None = None):
    """Poll ``condition()`` until it returns something true, and return that: tests wait on the
    condition itself, never for a fixed time (a loaded 2-core CI machine must not flake).
    ``proc``: a process that must keep running meanwhile (a RuntimeError once it exited)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before {what}")
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def answers(url: str, ok=lambda r: r.status_code < 500, timeout: float = 1) -> bool:
    """Whether ``url`` answers a GET now, as ``ok`` wants it (by default: anything but a 5xx)."""
    try:
        return ok(requests.get(url, timeout=timeout))
    except requests.RequestException:
        return False


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers (``answers``), while ``proc`` (its server) keeps running."""
    wait_until(lambda: answers(url), timeout, f"{url} answering", proc)


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Clock:
    """A clock a test moves by hand (``now``, in seconds): for what expires (the response store)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- a process's resources (/proc) ------------------------------------------------------------

KiB, MiB = 1 << 10, 1 << 20


def memory(pid: int) -> dict[str, int]:
    """What process ``pid`` holds now (``VmRSS``) and at most so far (``VmHWM``), in bytes: the
    gateway's memory, as claims about it are measured (/proc/PID/status)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * KiB
    assert fields.keys() == {"VmRSS", "VmHWM"}, f"no VmRSS/VmHWM for {pid}: {fields}"
    return fields


class Peak:
    """A process's peak memory from now on, above what it holds now: VmHWM is reset to VmRSS
    (5 to /proc/PID/clear_refs), ``grown`` is the peak since, in bytes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.base = memory(pid)["VmRSS"]

    @property
    def grown(self) -> int:
        return memory(self.pid)["VmHWM"] - self.base


def open_fds(pid: int) -> int:
    """How many files (sockets among them) process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening_ports(pid: int) -> set[int]:
    """The loopback TCP ports process ``pid`` listens on (its sockets in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


# --- the scripted upstream and real gateways --------------------------------------------------


@dataclass
class Upstream:
    """The bundled scripted chat backend (resp2chat_io.demo_upstream), as conftest's ``upstream``."""

    base_url: str  # http://127.0.0.1:PORT/v1
    server: object

    @property
    def origin(self) -> str:
        return self.base_url.removesuffix("/v1")

    def requests(self) -> list[dict]:
        return requests.get(self.origin + "/_requests", timeout=5).json()

    def clear(self) -> None:
        requests.delete(self.origin + "/_requests", timeout=5)


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def start_gateway(upstream_url: str, tmp: Path, *extra: str, env: dict | None = None,
                  scripts_first: tuple[str, ...] = (), addon: Path = ADDON, program: Path = MITMDUMP) -> Gateway:
    """A real `mitmdump -s addon/resp2chat.py --mode reverse:…` on a free loopback port
    (``scripts_first``: mitmproxy scripts loaded before the gateway's, e.g. tests/faults.py;
    ``addon``: another checkout's, e.g. tests/fuzz.py --addon; ``program``: ``MITMWEB``)."""
    port = free_port()
    log_path = tmp / f"mitmdump-{port}.log"
    args = [str(program), *(a for script in scripts_first for a in ("-s", script)),
            "-s", str(addon), "--mode", f"reverse:{upstream_url}",
            "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={tmp / 'mitmconf'}", *extra]
    proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=tmp,
                            env={**gateway_env(), **(env or {})})
    gw = Gateway(proc, port, log_path, args)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
    except Exception:
        gw.stop()
        raise RuntimeError(f"gateway did not start:\n{gw.log()}")
    return gw


def start_mitmweb_gateway(upstream_url: str, tmp: Path, *extra: str, env: dict | None = None):
    """A gateway under mitmweb (``start_gateway``), and ``put(**options)``: its options editor's
    ``PUT /options`` (what an operator changes while it runs), the response."""
    web_port, password = free_port(), "web-" + "p" * 24
    gw = start_gateway(upstream_url, tmp, *extra, "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
                       "--set", "web_open_browser=false", "--set", f"web_password={password}", env=env, program=MITMWEB)

    def put(**options):
        xsrf = "x" * 32
        return requests.put(f"http://127.0.0.1:{web_port}/options", json=options,
                            headers={"authorization": f"Bearer {password}", "X-XSRFToken": xsrf},
                            cookies={"_mitmproxy_xsrf": xsrf}, timeout=10)

    return gw, put


# --- asking a gateway, and what it answers (Responses SSE) ------------------------------------


def message(role: str, *texts: str, kind: str = "input_text") -> dict:
    """A Responses ``message`` item of ``role``: one ``kind`` part per text."""
    return {"type": "message", "role": role, "content": [{"type": kind, "text": t} for t in texts]}


def user(text: str) -> dict:
    """A user's ``message`` item of one ``input_text``."""
    return message("user", text)


# A client's input with every kind of content part the gateway takes, each as short as a client
# may send it (an input_image without ``detail``, an output_text without ``annotations``, a tool
# output's image): the item lists show it back with what the API's objects require
# (listing.py LISTED_PARTS), as ``check_listed`` checks.
PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP4z8AARwzEcQCukw/x0F8jng"
       "AAAABJRU5ErkJggg==")
EVERY_PART = [
    {"role": "user", "content": [{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": PNG}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a red dot"},
                                                         {"type": "refusal", "refusal": "no more"}]},
    {"type": "function_call", "call_id": "call_look", "name": "look", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_look",
     "output": [{"type": "input_text", "text": "seen"}, {"type": "input_image", "image_url": PNG}]},
    {"role": "user", "content": "and now?"},
]


def check_listed(listed: dict, sdk_union: str) -> list[dict]:
    """An item list as the Open Responses spec requires it (``spec_errors``: every part type the
    SPEC knows) and each item as the openai SDK's ``sdk_union`` validates it (``ResponseItem``
    for a response's input items, ``ConversationItem`` for a conversation's): the SDK's list
    calls build their models without validating, so a missing field shows only here. Returns
    the items."""
    import pydantic
    from openai.types import conversations, responses

    union = {"ResponseItem": responses.ResponseItem, "ConversationItem": conversations.ConversationItem}[sdk_union]
    assert spec_errors(listed, "ItemList") == []
    adapter = pydantic.TypeAdapter(union)
    for item in listed["data"]:
        adapter.validate_python(item)
    return listed["data"]


def post_turn(gw, body: dict | bytes, headers: dict | None = None, timeout: float = 60) -> requests.Response:
    """POST /v1/responses to a gateway (anything with a ``base_url``): a dict as JSON, bytes as
    they are, as ``application/json`` (``headers`` may say otherwise)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(gw.base_url + "/responses", data=data, timeout=timeout,
                         headers={"content-type": "application/json", **(headers or {})})


def stream_turn(gw, body: dict, headers: dict | None = None, timeout: float = 60) -> list[dict]:
    """A streamed turn (``"stream": true`` unless ``body`` says otherwise): it must answer 200;
    its events, read strictly (``parse_sse``)."""
    r = post_turn(gw, {"stream": True, **body}, headers, timeout)
    assert r.status_code == 200, r.text[:300]
    return parse_sse(r.content)


def openai_client(gw, api_key: str = "sk-client-key", *, asynchronous: bool = False, **kw):
    """The openai SDK's client of a gateway (its base URL, or anything with a ``base_url``): no
    retries (a failure shows at once, not hidden by a second try) and a 30 s timeout, unless
    ``kw`` says otherwise; ``asynchronous``: an ``AsyncOpenAI`` (what the Agents SDK takes).
    Every JSON answer it reads is checked against the spec (``check_body``)."""
    import openai

    import httpx

    base_url = gw if isinstance(gw, str) else gw.base_url
    if asynchronous:
        cls, http, hook = openai.AsyncOpenAI, httpx.AsyncClient, _check_httpx_answer_async
    else:
        cls, http, hook = openai.OpenAI, httpx.Client, _check_httpx_answer
    kw.setdefault("http_client", http())
    kw["http_client"].event_hooks["response"].append(hook)
    return cls(base_url=base_url, api_key=api_key, **{"max_retries": 0, "timeout": 30, **kw})


def _is_json_answer(response) -> bool:
    return response.status_code == 200 and response.headers.get("content-type", "").startswith("application/json")


def _check_httpx_answer(response) -> None:
    if _is_json_answer(response):
        response.read()
        check_body(response.content, response.url.path)


async def _check_httpx_answer_async(response) -> None:
    if _is_json_answer(response):
        await response.aread()
        check_body(response.content, response.url.path)


def _check_requests_answer(response, *args, **kwargs):
    if _is_json_answer(response):
        check_body(response.content, urlsplit(response.url).path)
    return response


def _checking_requests() -> None:
    """Every JSON answer the suite reads with ``requests`` (``post_turn``, ``requests.get`` of a
    stored response…) is checked against the spec (``check_body``), as ``parse_sse`` checks
    every stream: a session's hooks are where requests lets one look at each answer."""
    init = requests.Session.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.hooks["response"].append(_check_requests_answer)

    requests.Session.__init__ = __init__


_checking_requests()


TERMINAL = ("response.completed", "response.failed", "response.incomplete", "response.cancelled")  # a turn's last event


def parse_sse(raw: bytes) -> list[dict]:
    """The strict reader of what the gateway emits: every event exactly ``event: <type>``,
    ``data: <JSON of that type>`` and a blank line; the stream ends with one (an empty stream is
    no answer), then, over HTTP, ``data: [DONE]`` and a blank line (the spec's end: sse.DONE),
    which is not an event; a translator's own output has none."""
    text = raw.decode()
    assert text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-200:]!r}"
    text = text.removesuffix("data: [DONE]\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), \
            f"not an SSE event: {block[:200]!r}"
        event = json.loads(lines[1][6:])
        assert isinstance(event, dict) and event.get("type") == lines[0][7:], \
            f"event name and type differ: {block[:200]!r}"
        events.append(event)
    return check_spec(events)


def iter_sse(response: requests.Response, into: bytearray | None = None) -> typing.Iterator[dict]:
    """The live reader of a streamed answer (``requests.post(…, stream=True)``): each event's
    JSON as soon as its blank line is in, while the stream goes on (a test may act between
    events, or stop reading and hang up). A gateway's event is read as strictly as ``parse_sse``
    reads it (``event: <type>``, ``data: <JSON of that type>``, as the specification requires
    it); a chat backend's is one ``data:`` line (as ``parse_chat_sse``); ``data: [DONE]`` is no
    event. A stream that ends must end with a blank line. ``into`` gets every byte read (for
    ``parse_sse``/``check_stream`` of the whole stream afterwards)."""
    buf = b""
    for piece in response.iter_content(chunk_size=None):  # (each piece as it arrives)
        if into is not None:
            into += piece
        buf += piece
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            lines = block.decode().split("\n")
            if lines == ["data: [DONE]"]:
                continue
            if len(lines) == 1:
                assert lines[0].startswith("data: "), f"not an SSE event: {block[:200]!r}"
                yield json.loads(lines[0][6:])
                continue
            assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), \
                f"not an SSE event: {block[:200]!r}"
            event = json.loads(lines[1][6:])
            assert isinstance(event, dict) and event.get("type") == lines[0][7:], \
                f"event name and type differ: {block[:200]!r}"
            yield check_spec([event])[0]
    assert buf == b"", f"the stream does not end with a blank line: {buf[-200:]!r}"


def terminal(events: list[dict]) -> dict:
    """A turn's terminal event: there is exactly one, and it is the last."""
    ends = [e for e in events if e["type"] in TERMINAL]
    assert len(ends) == 1 and ends[0] is events[-1], [e["type"] for e in events]
    return ends[0]


# --- what a gateway leaves behind -------------------------------------------------------------


def read_flows(path: Path) -> list:
    """The HTTP flows (WebSocket ones among them) a gateway wrote to ``path`` (``-w``), in order."""
    from mitmproxy import http, io

    with path.open("rb") as fh:
        return [f for f in io.FlowReader(fh).stream() if isinstance(f, http.HTTPFlow)]


def turn_flows(path: Path) -> list:
    """The Responses turns of a gateway's flow file: the flows that carry a client's Responses
    request (``metadata["resp2chat"]["responses_request"]``), in order."""
    return [f for f in read_flows(path) if "responses_request" in f.metadata.get("resp2chat", {})]


def responses_requests(path: Path) -> list[dict]:
    """The Responses requests clients sent, as the gateway recorded each turn in its flow file."""
    return [json.loads(f.metadata["resp2chat"]["responses_request"]) for f in turn_flows(path)]


def logged_bodies(path: Path) -> list[bytes]:
    """The chat requests the gateway sent upstream, byte for byte, from its request log
    (``resp2chat_upstream_request_log_path`` keeps each body as it went)."""
    return [line[line.index(b', "body": ') + 10:-1] for line in path.read_bytes().splitlines()]


# --- what a chat backend sends, and what the gateway sends it ---------------------------------


def chat_chunk(delta: dict | None = None, finish: str | None = None, **fields) -> dict:
    """One ``chat.completion.chunk`` as a backend sends it: one choice (index 0) with ``delta``
    and ``finish``; ``fields`` go at the top (``usage=…``; ``choices=[]`` for usage alone)."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **fields}


def chat_completion(message: dict, finish: str, prompt_tokens: int = 20, completion_tokens: int = 4) -> dict:
    """A whole ``chat.completion`` as a backend that ignores ``stream`` answers: one choice (index
    0), the assistant's ``message`` (its fields: ``content``, ``tool_calls``…) ended by ``finish``,
    and its usage."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", **message}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def tool_call(index: int, id: str | None = None, name: str | None = None, args: str | None = None, *,
              nulls: bool = False) -> dict:
    """One entry of a chunk's ``delta.tool_calls`` as a backend streams it: ``index``, then
    ``id`` with ``"type": "function"`` (on the chunk that starts the call), and the function's
    ``name`` and ``arguments`` (``args``), each where given; with ``nulls``, every field there and
    null where not given (some backends send a call's later chunks so)."""
    call: dict = {"index": index}
    if id or nulls:
        call.update(id=id, type="function")
    fn = {"name": name, "arguments": args} if nulls else {}
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    call["function"] = fn
    return call


def tool_call_chunk(index: int, id: str | None = None, name: str | None = None, args: str | None = None, *,
                    nulls: bool = False) -> dict:
    """A chunk (``chat_chunk``) whose delta is that one tool call (``tool_call``)."""
    return chat_chunk({"tool_calls": [tool_call(index, id, name, args, nulls=nulls)]})


DONE = b"data: [DONE]\n\n"


def chat_sse(*chunks, done: bool = True, eol: str = "\n") -> bytes:
    """A chat stream: ``data: <chunk>`` and a blank line per chunk (a dict as JSON, a str as it
    is), then ``data: [DONE]`` (``done``); ``eol`` ends each line (CRLF or CR: some backends)."""
    out = "".join("data: " + (c if isinstance(c, str) else json.dumps(c)) + eol + eol for c in chunks)
    return (out + ("data: [DONE]" + eol + eol if done else "")).encode()


def chat_event(delta: dict | None = None, finish: str | None = None, **fields) -> bytes:
    """One chunk (``chat_chunk``) as one SSE event, without ``[DONE]``."""
    return chat_sse(chat_chunk(delta, finish, **fields), done=False)


def http_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked HTTP body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def parse_chat_sse(raw: bytes) -> list:
    """The strict reader of a chat stream (a backend's, or what the web-search filter passes on):
    every event is one ``data: `` line, JSON or ``[DONE]``, ended by a blank line; nothing else
    (an empty stream is none: []). ``[DONE]`` is kept as the string."""
    text = raw.decode()
    assert text == "" or text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-200:]!r}"
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"not one data line: {block[:200]!r}"
        data = block[6:]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # a tool name every chat backend takes (OpenAI's rule)


def tool_names(chat: dict) -> list[str]:
    """The names of a chat request's tools (none when it has none)."""
    return [t["function"]["name"] for t in chat.get("tools", [])]


# --- small upstreams of a test's own ----------------------------------------------------------


class QuietHandler(BaseHTTPRequestHandler):
    """The base of a test upstream's handler: HTTP/1.1 (kept-alive connections, as backends
    keep them) and no line on stderr per request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    """``handler`` served on a free loopback port from a daemon thread, from now on; ``url`` is
    its origin (``http://127.0.0.1:PORT``). ``close()``, or the end of a ``with``, stops it
    (and no handler still running holds that up)."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # (the gateway hung up on an answer the test was done with: a broken pipe, a reset)
        super().handle_error(request, client_address)

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def __exit__(self, *exc) -> None:
        self.close()


class RawServer:
    """A server on a raw loopback socket, for answers no HTTP server writes (a head cut short, a
    reset, a request read and then nothing): each connection it accepts is served by ``serve(conn,
    index)`` (``index``: 0 for the first, ``conns`` counts them) in a daemon thread of its own,
    the connection closed after; ``url`` is its origin (``http://127.0.0.1:PORT``). ``close()``
    stops accepting."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(conn, self.conns - 1), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            self.serve(conn, index)
        except OSError:
            pass
        finally:
            conn.close()

    def serve(self, conn: socket.socket, index: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


def read_request(conn: socket.socket, buf: bytearray) -> tuple[bytes, bytes] | None:
    """One whole HTTP/1 request from a raw connection: (its head, its body by content-length);
    None when the connection ends first. ``buf`` keeps what came after it (the next request of a
    kept-alive connection)."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    buf[:] = rest[length:]
    return head, rest[:length]


def start_sse(handler) -> None:
    """A test upstream's (BaseHTTPRequestHandler) answer head: 200, an SSE body, chunked."""
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()


def shown_settings(tmp_path: Path, env: dict) -> tuple[subprocess.CompletedProcess, dict, str]:
    """What a gateway with ``env`` shows of its settings: ``mitmdump --options``, then the
    ``resp2chat.settings`` command's answer in a real gateway (a test script asks for it once it
    runs), and that gateway's log."""
    options = subprocess.run([str(MITMDUMP), "-s", str(ADDON), "--set", f"confdir={tmp_path / 'conf'}", "--options"],
                             capture_output=True, text=True, timeout=60, env={**gateway_env(), **env}, cwd=tmp_path)
    out = tmp_path / "settings.json"
    script = tmp_path / "ask_settings.py"
    script.write_text(
        "from mitmproxy import ctx\n"
        "class Ask:\n"
        "    def running(self):\n"
        f"        open({str(out)!r}, 'w').write(ctx.master.commands.execute('resp2chat.settings'))\n"
        "addons = [Ask()]\n")
    gw = start_gateway("http://127.0.0.1:9", tmp_path, "-s", str(script), env=env)
    try:
        shown = json.loads(wait_until(lambda: out.exists() and out.read_text(), what="the settings command's answer"))
    finally:
        gw.stop()
    return options, shown, gw.log()


def send_json(handler, status: int, obj, *, close: bool = False, headers: dict | None = None) -> None:
    """Answer from a test upstream (BaseHTTPRequestHandler) with a whole JSON body (its length
    declared): ``obj`` as JSON (bytes: as they are, JSON or not); ``headers`` added (one whose
    value is None is not sent, e.g. ``retry-after``); with ``close``, ``connection: close`` and
    the connection closed after it (the body is whole all the same)."""
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    for name, value in (headers or {}).items():
        if value is not None:
            handler.send_header(name, value)
    if close:
        handler.send_header("connection", "close")
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(body)


def send_sse(handler, data: bytes) -> None:
    """Answer from a test upstream (BaseHTTPRequestHandler) with a whole SSE body (its length
    declared): 200, ``data``."""
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def send_cut(handler, data: bytes) -> None:
    """Answer from a test upstream (BaseHTTPRequestHandler) with an SSE body cut short: 200, a
    declared length 100 bytes past ``data``, ``data``, then the connection drops (a backend that
    died midway: the gateway reads ``data`` and then the end of a body that is not whole)."""
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("content-length", str(len(data) + 100))
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()
    handler.close_connection = True


def send_paced(handler, pieces: list[bytes], pause: float) -> None:
    """Answer from a test upstream (BaseHTTPRequestHandler) with an SSE body of a declared length
    sent in ``pieces``, ``pause`` seconds after each: a backend writing slowly."""
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("content-length", str(sum(map(len, pieces))))
    handler.end_headers()
    for piece in pieces:
        handler.wfile.write(piece)
        handler.wfile.flush()
        time.sleep(pause)


def send_text_chunk(handler, n: int) -> None:
    """One chat chunk with the content ``t<n> `` as one HTTP chunk, flushed: a test upstream
    (BaseHTTPRequestHandler) streaming a chunked SSE body at its own pace."""
    handler.wfile.write(http_chunk(chat_event({"content": f"t{n} "})))
    handler.wfile.flush()


def stream_until_gone(handler) -> int:
    """A test upstream's answer that never ends by itself (its head sent: ``start_sse``): text
    chunks at a model's pace (20 a second) until the gateway hangs up; how many went."""
    n = 0
    try:
        while True:
            send_text_chunk(handler, n)
            n += 1
            time.sleep(0.05)  # (a model's pace, not a wait)
    except OSError:
        return n


class Endless(QuietHandler):
    """A test backend whose answer never ends by itself (conftest's ``endless`` serves it): it
    streams (``stream_until_gone``) until its client hangs up. ``started``: when each call came
    (time.monotonic); ``closed``: when the client hung up on each."""

    started: list[float] = []
    closed: list[float] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        type(self).started.append(time.monotonic())
        start_sse(self)
        stream_until_gone(self)
        type(self).closed.append(time.monotonic())


# --- a translated stream's invariants (the sans-I/O translator tests) -------------------------

RESP_ID = "resp_0123456789abcdef"  # the response the translator tests' turns make
CREATED = 1795311942

DELTAS = {
    "response.output_text.delta", "response.reasoning_summary_text.delta", "response.reasoning_text.delta",
    "response.function_call_arguments.delta", "response.custom_tool_call_input.delta", "response.refusal.delta",
}
ITEM_EVENTS = DELTAS | {  # the events of one output item, between its output_item.added and .done
    "response.output_text.done", "response.reasoning_summary_text.done", "response.reasoning_text.done",
    "response.function_call_arguments.done", "response.custom_tool_call_input.done", "response.refusal.done",
    "response.content_part.added", "response.content_part.done",
    "response.reasoning_summary_part.added", "response.reasoning_summary_part.done",
}


CUT_CALLS = {"function_call", "custom_tool_call", "local_shell_call", "tool_search_call"}  # (the model's calls)


def check_stream(raw: bytes, response_id: str = RESP_ID) -> list[dict]:
    """Parse a whole translated stream (``parse_sse``) and assert the invariants every stream
    must hold: contiguous sequence numbers, created and in_progress first (a background
    response's: created and queued, then in_progress), one terminal event last, each item's
    events inside its added/done in output order, one response id, and a terminal output that is
    the items done: every item added is done, however the response ended, but for a tool call a
    failure or a cancellation cut (translator ``_cut``: a client would run it) and what the output
    bound cut (``_outgrown``: closing it would repeat what is too large)."""
    evs = parse_sse(raw)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    first = [e["type"] for e in evs][:3]
    assert first[:2] == ["response.created", "response.in_progress"] or first == [
        "response.created", "response.queued", "response.in_progress"], first
    terminal(evs)
    added: dict[str, int] = {}
    calls: set[int] = set()  # the output indexes of model-written tool calls
    last_index = -1
    for e in evs:
        if e["type"] == "response.output_item.added":
            assert e["output_index"] > last_index
            last_index = e["output_index"]
            added[e["item"]["id"]] = e["output_index"]
            if e["item"]["type"] in CUT_CALLS:
                calls.add(e["output_index"])
        elif e["type"] in ITEM_EVENTS:
            assert added.get(e["item_id"]) == e["output_index"], f"{e['type']} before its item was added"
        elif e["type"] == "response.output_item.done":
            assert added.get(e["item"]["id"]) == e["output_index"]
    for e in evs:
        assert e.get("response", {"id": response_id})["id"] == response_id
    end = evs[-1]["response"]
    done = [e for e in evs if e["type"] == "response.output_item.done"]
    open_ = set(added.values()) - {e["output_index"] for e in done}
    assert not open_ or end["status"] in ("failed", "cancelled") and (
        open_ <= calls or end["error"].get("type") == "upstream_output_too_large"), f"items added never done: {open_}"
    assert len(done) == len({e["output_index"] for e in done})
    assert end["output"] == [e["item"] for e in sorted(done, key=lambda e: e["output_index"])]
    return evs


# Codes the real API and Codex use that the SDK's ResponseError enum does not list (WIRE.md:
# Codex acts on them). Where the SDK and Codex disagree, Codex wins; the rest must validate.
CODEX_ONLY_CODES = {"context_length_exceeded", "insufficient_quota"}


@functools.cache
def _sdk_events():
    """The openai SDK's ``ResponseStreamEvent`` adapter, and event type -> its SDK class (to
    explain a union failure in a few lines). Built on first use: scripts need no pydantic."""
    import pydantic
    from openai.types.responses import ResponseStreamEvent

    classes = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
               for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}
    return pydantic.TypeAdapter(ResponseStreamEvent), classes


def check_sdk(evs: list[dict]) -> None:
    """Every event must validate as the openai SDK's ``ResponseStreamEvent``."""
    import pydantic
    import pytest

    adapter, classes = _sdk_events()
    bad = []
    for e in evs:
        err = e.get("response", {}).get("error") or {}
        if err.get("code") in CODEX_ONLY_CODES:
            e = {**e, "response": {**e["response"], "error": {**err, "code": "server_error"}}}
        try:
            adapter.validate_python(e)
        except pydantic.ValidationError:
            cls = classes.get(e["type"])
            try:
                detail = cls.model_validate(e) and "(validates alone?)" if cls else "unknown event type"
            except pydantic.ValidationError as exc:
                detail = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in exc.errors())
            bad.append(f"#{e['sequence_number']} {e['type']}: {detail}")
    if bad:
        pytest.fail("events rejected by openai.types.responses.ResponseStreamEvent:\n  " + "\n  ".join(bad),
                    pytrace=False)


def ended_at_a_bound(gw, body: dict) -> tuple[list[str], list[dict]]:
    """Post a turn (JSON or streamed, as ``body`` says) in which the model calls a gateway's tool
    (web search, a hosted MCP tool) once its ``max_tool_calls`` or rounds are spent: the gateway
    refuses that call and the turn ends ``completed``, no ``function_call`` of a function the
    client never declared. Asserts that of the stream (``check_stream``, ``check_sdk``: its last
    event ``response.completed``, no ``response.function_call…`` event), of the answer and of the
    stored Response (status ``completed``, no ``incomplete_details``, no ``function_call`` item).
    Returns the stream's event types ([] for JSON) and those two Responses, for the caller's own
    checks of its calls."""
    r = post_turn(gw, body)
    assert r.status_code == 200, r.text
    types: list[str] = []
    if body.get("stream"):
        events = check_stream(r.content, parse_sse(r.content)[0]["response"]["id"])
        check_sdk(events)
        types = [e["type"] for e in events]
        assert types[-1] == "response.completed", types
        assert not any(t.startswith("response.function_call") for t in types), types
        resp = events[-1]["response"]
    else:
        resp = r.json()
    answers = [resp, openai_client(gw).responses.retrieve(resp["id"]).model_dump()]
    for answer in answers:
        assert answer["status"] == "completed" and answer["incomplete_details"] is None, answer
        assert "function_call" not in [o["type"] for o in answer["output"]], answer["output"]
    return types, answers


# --- the Open Responses specification (2026-04-24) ------------------------------------------
#
# A transcription, by hand, of what the specification requires of everything the gateway emits:
# its generated schema (openresponses/openresponses, public/openapi/openapi.json "Open Responses
# 2026-04-24": ResponseResource, the streaming events, ItemField, the content parts, Usage,
# LogProb, WebSocketErrorEvent) and its text (src/pages/specification.mdx: the `[DONE]` terminal
# event, "Required item fields" of extension items, "Extending streaming events"). Only required
# fields and their types, and the enums of what the gateway decides; keys ending in "?" are
# optional (checked when present). A type is a primitive ("string", "integer", "number",
# "boolean", "object", "array", "any"), a schema name below, ("enum", …), ("list", type) or
# ("one_of", type, …); a trailing "?" on a name also allows null. Where the generated schema
# and the rest of the spec disagree, the transcription says which it follows and why.

_INT = lambda v: v.__class__ is int  # noqa: E731 (bool is not an integer, nor a number)
_PRIMITIVES = {
    "string": lambda v: isinstance(v, str), "integer": _INT, "number": lambda v: v.__class__ in (int, float),
    "boolean": lambda v: isinstance(v, bool), "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list), "any": lambda v: True,
}
_PART = ("by_type", {
    "input_text": "InputTextContent", "output_text": "OutputTextContent", "text": "TextContent",
    "summary_text": "SummaryTextContent", "reasoning_text": "ReasoningTextContent", "refusal": "RefusalContent",
    "input_image": "InputImageContent", "input_file": "InputFileContent"}, None)
_ITEM_STATUS = ("enum", "in_progress", "completed", "incomplete")
# ItemField: the spec's item types; any other type is an extension item, which "MUST include"
# id, type and status (specification.mdx, "Required item fields")
_ITEM = ("by_type", {"message": "Message", "function_call": "FunctionCall", "function_call_output": "FunctionCallOutput",
                     "reasoning": "ReasoningBody", "compaction": "CompactionBody"}, "ExtensionItem")
_TOOL = ("by_type", {"function": "FunctionTool"}, "ExtensionTool")

SPEC = {
    "ResponseResource": {
        "id": "string", "object": ("enum", "response"), "created_at": "integer", "completed_at": "integer?",
        "status": ("enum", "queued", "in_progress", "completed", "failed", "incomplete", "cancelled"),
        "incomplete_details": "IncompleteDetails?", "model": "string", "previous_response_id": "string?",
        "instructions": "string?", "output": ("list", _ITEM), "error": "Error?", "tools": ("list", _TOOL),
        "tool_choice": ("one_of", ("enum", "none", "auto", "required"), "FunctionToolChoice", "AllowedToolChoice",
                        "ExtensionToolChoice"),
        "truncation": ("enum", "auto", "disabled"), "parallel_tool_calls": "boolean", "text": "TextField",
        "top_p": "number", "presence_penalty": "number", "frequency_penalty": "number", "top_logprobs": "integer",
        "temperature": "number", "reasoning": "Reasoning?", "usage": "Usage?", "max_output_tokens": "integer?",
        "max_tool_calls": "integer?", "store": "boolean", "background": "boolean", "service_tier": "string",
        "metadata": "object", "safety_identifier": "string?", "prompt_cache_key": "string?",
        # not required by 2026-04-24's bundle, required by the schema file before it: always sent
        "user": "string?",
        "conversation?": "Conversation?",
    },
    "Conversation": {"id": "string"},
    "IncompleteDetails": {"reason": "string"},
    "Error": {"code": "string", "message": "string"},
    "Usage": {"input_tokens": "integer", "output_tokens": "integer", "total_tokens": "integer",
              "input_tokens_details": "InputTokensDetails", "output_tokens_details": "OutputTokensDetails"},
    "InputTokensDetails": {"cached_tokens": "integer"},
    "OutputTokensDetails": {"reasoning_tokens": "integer"},
    "Reasoning": {"effort": "string?", "summary": "string?"},
    "TextField": {"format": ("by_type", {"text": "TextResponseFormat", "json_object": "TextResponseFormat",
                                         "json_schema": "JsonSchemaResponseFormat"}, None),
                  "verbosity?": ("enum", "low", "medium", "high")},
    "TextResponseFormat": {"type": "string"},
    # (the bundle types `schema` as null: a slip of its generator; an object is what is meant)
    "JsonSchemaResponseFormat": {"type": "string", "name": "string", "description": "string?", "schema": "any",
                                 "strict": "boolean"},
    "FunctionTool": {"type": "string", "name": "string", "description": "string?", "parameters": "object?",
                     "strict": "boolean?"},
    "ExtensionTool": {"type": "string"},
    "FunctionToolChoice": {"type": ("enum", "function"), "name?": "string"},
    "AllowedToolChoice": {"type": ("enum", "allowed_tools"), "tools": ("list", "FunctionToolChoice"),
                          "mode": ("enum", "none", "auto", "required")},
    "ExtensionToolChoice": {"type": "string"},
    # items
    "Message": {"type": "string", "id": "string", "status": _ITEM_STATUS,
                "role": ("enum", "user", "assistant", "system", "developer"), "content": ("list", _PART)},
    "FunctionCall": {"type": "string", "id": "string", "call_id": "string", "name": "string", "arguments": "string",
                     "status": _ITEM_STATUS},
    "FunctionCallOutput": {"type": "string", "id": "string", "call_id": "string",
                           "output": ("one_of", "string", "array"), "status": _ITEM_STATUS},
    "ReasoningBody": {"type": "string", "id": "string", "summary": ("list", _PART), "content?": ("list", _PART),
                      "encrypted_content?": "string"},
    "CompactionBody": {"type": "string", "id": "string", "encrypted_content": "string", "created_by?": "string"},
    "ConversationResource": {"id": "string", "object": ("enum", "conversation"), "created_at": "integer",
                             "metadata": "object"},
    "ItemList": {"object": ("enum", "list"), "data": ("list", _ITEM), "first_id": "string?", "last_id": "string?",
                 "has_more": "boolean"},
    # POST /v1/responses/compact's answer (the spec's compact endpoint)
    "CompactionResponse": {"id": "string", "object": ("enum", "response.compaction"), "created_at": "integer",
                           "output": ("list", _ITEM), "usage": "Usage"},
    "ExtensionItem": {"type": "string", "id": "string", "status": "string"},
    # content parts
    "InputTextContent": {"type": "string", "text": "string"},
    "OutputTextContent": {"type": "string", "text": "string", "annotations": "array", "logprobs?": ("list", "LogProb")},
    "TextContent": {"type": "string", "text": "string"},
    "SummaryTextContent": {"type": "string", "text": "string"},
    "ReasoningTextContent": {"type": "string", "text": "string"},
    "RefusalContent": {"type": "string", "refusal": "string"},
    "InputImageContent": {"type": "string", "image_url": "string?", "detail": ("enum", "low", "high", "auto")},
    "InputFileContent": {"type": "string"},
    "LogProb": {"token": "string", "logprob": "number", "bytes": ("list", "integer"),
                "top_logprobs": ("list", "TopLogProb")},
    "TopLogProb": {"token": "string", "logprob": "number", "bytes": ("list", "integer")},
    # streaming events (every one: type and sequence_number)
    "ResponseEvent": {"type": "string", "sequence_number": "integer", "response": "ResponseResource"},
    # ("Item": the ItemField union above)
    "OutputItemEvent": {"type": "string", "sequence_number": "integer", "output_index": "integer", "item": "Item?"},
    "ContentPartEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                         "output_index": "integer", "content_index": "integer", "part": _PART},
    "SummaryPartEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                         "output_index": "integer", "summary_index": "integer", "part": _PART},
    "OutputTextDeltaEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                             "output_index": "integer", "content_index": "integer", "delta": "string",
                             "logprobs?": ("list", "LogProb")},
    "OutputTextDoneEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                            "output_index": "integer", "content_index": "integer", "text": "string",
                            "logprobs?": ("list", "LogProb")},
    "ReasoningDeltaEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                            "output_index": "integer", "content_index": "integer", "delta": "string"},
    "ReasoningDoneEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                           "output_index": "integer", "content_index": "integer", "text": "string"},
    "SummaryDeltaEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                          "output_index": "integer", "summary_index": "integer", "delta": "string"},
    "SummaryDoneEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                         "output_index": "integer", "summary_index": "integer", "text": "string"},
    "RefusalDeltaEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                          "output_index": "integer", "content_index": "integer", "delta": "string"},
    "RefusalDoneEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                         "output_index": "integer", "content_index": "integer", "refusal": "string"},
    "ArgumentsDeltaEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                            "output_index": "integer", "delta": "string"},
    "ArgumentsDoneEvent": {"type": "string", "sequence_number": "integer", "item_id": "string",
                           "output_index": "integer", "arguments": "string"},
    "ExtensionEvent": {"type": "string", "sequence_number": "integer"},  # "Extending streaming events"
    "WebSocketErrorEvent": {"type": ("enum", "error"), "status": "integer", "error": "WebSocketError"},
    "WebSocketError": {"code": "string", "message": "string", "type?": "string", "param?": "string?"},
}
# The reasoning-text events: `response.reasoning_text.delta`/`.done` as the spec's component file
# (schema/components/schemas/ResponseReasoningDeltaStreamingEvent.json), OpenAI, vLLM, the openai
# SDK and @ai-sdk/open-responses name them; the 2026-04-24 bundle's events.tsp calls them
# `response.reasoning.delta`, which no client in the suite reads.
SPEC_EVENTS = {
    **dict.fromkeys(("response.created", "response.queued", "response.in_progress", "response.completed",
                     "response.failed", "response.incomplete", "response.cancelled"), "ResponseEvent"),
    "response.output_item.added": "OutputItemEvent", "response.output_item.done": "OutputItemEvent",
    "response.content_part.added": "ContentPartEvent", "response.content_part.done": "ContentPartEvent",
    "response.reasoning_summary_part.added": "SummaryPartEvent",
    "response.reasoning_summary_part.done": "SummaryPartEvent",
    "response.output_text.delta": "OutputTextDeltaEvent", "response.output_text.done": "OutputTextDoneEvent",
    "response.reasoning_text.delta": "ReasoningDeltaEvent", "response.reasoning_text.done": "ReasoningDoneEvent",
    "response.reasoning_summary_text.delta": "SummaryDeltaEvent",
    "response.reasoning_summary_text.done": "SummaryDoneEvent",
    "response.refusal.delta": "RefusalDeltaEvent", "response.refusal.done": "RefusalDoneEvent",
    "response.function_call_arguments.delta": "ArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ArgumentsDoneEvent",
    "error": "WebSocketErrorEvent",
}


def _spec_check(value, t, where: str, errors: list[str]) -> None:
    if isinstance(t, str):
        nullable = t.endswith("?")
        name = t.removesuffix("?")
        if value is None:
            if not nullable:
                errors.append(f"{where}: null, not {name}")
        elif name == "Item":
            _spec_check(value, _ITEM, where, errors)
        elif name in _PRIMITIVES:
            if not _PRIMITIVES[name](value):
                errors.append(f"{where}: {value!r:.60} is not {name}")
        elif not isinstance(value, dict):
            errors.append(f"{where}: {value!r:.60} is not an object ({name})")
        else:
            for key, sub in SPEC[name].items():
                field = key.removesuffix("?")
                if field in value:
                    _spec_check(value[field], sub, f"{where}.{field}", errors)
                elif not key.endswith("?"):
                    errors.append(f"{where}: {field} missing ({name})")
    elif t[0] == "enum":
        if value not in t[1:]:
            errors.append(f"{where}: {value!r:.60} is not one of {t[1:]}")
    elif t[0] == "list":
        if not isinstance(value, list):
            errors.append(f"{where}: {value!r:.60} is not an array")
        else:
            for i, v in enumerate(value):
                _spec_check(v, t[1], f"{where}[{i}]", errors)
    elif t[0] == "one_of":
        for option in t[1:]:
            tried: list[str] = []
            _spec_check(value, option, where, tried)
            if not tried:
                return
        errors.append(f"{where}: {value!r:.80} is none of {t[1:]}")
    elif t[0] == "by_type":
        kind = value.get("type") if isinstance(value, dict) else None
        name = t[1].get(kind, t[2])
        if name is None:
            errors.append(f"{where}: type {kind!r} is none of {sorted(t[1])}")
        else:
            _spec_check(value, name, where, errors)


def spec_errors(value, name: str) -> list[str]:
    """What in ``value`` breaks the specification's ``name`` (a schema of ``SPEC``): [] if nothing."""
    errors: list[str] = []
    _spec_check(value, name, name, errors)
    return errors


def check_spec(events: list[dict]) -> list[dict]:
    """Every event (and the Response, item and parts inside it) as the Open Responses
    specification requires it; an event type it does not define must still be an extension
    event (a ``type`` and a ``sequence_number``). ``parse_sse`` and ``wsclient`` check every
    stream and socket turn the suite reads; returns ``events``."""
    bad = []
    for e in events:
        bad += spec_errors(e, SPEC_EVENTS.get(e.get("type"), "ExtensionEvent"))
    assert not bad, "not as the Open Responses specification requires:\n  " + "\n  ".join(bad[:40])
    return events


# a JSON answer's ``object`` -> what the spec says it is (the Conversations API's and item lists:
# OpenAI's shapes, which the Open Responses spec does not define)
BODIES = {"response": "ResponseResource", "response.compaction": "CompactionResponse",
          "conversation": "ConversationResource", "list": "ItemList"}
LISTS_OF_ITEMS = re.compile(r"/(input_items|items)$")  # the paths whose "list" is one of items (not /v1/models)


def check_body(body: bytes, path: str = "") -> None:
    """A JSON answer of the gateway (to a request for ``path``), when it is one of the spec's
    objects (``BODIES``), as the specification requires it. Every answer the suite reads through
    ``requests`` or ``openai_client`` passes here (their hooks)."""
    try:
        data = json.loads(body)
    except ValueError:
        return
    name = BODIES.get(data.get("object")) if isinstance(data, dict) and "deleted" not in data else None
    if name == "ItemList" and not LISTS_OF_ITEMS.search(path):
        return
    if name is not None:
        bad = spec_errors(data, name)
        assert not bad, f"not a {name}:\n  " + "\n  ".join(bad[:40])


# --- the resp2chat CLI ------------------------------------------------------------------------


def resp2chat_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m resp2chat_io.main ARGS`` in a bare environment (the addon on PYTHONPATH, PATH,
    the hermetic HOME): what the CLI does with nothing configured. Its output as text."""
    return subprocess.run([sys.executable, "-m", "resp2chat_io.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "addon"), "PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]})


def retranslate(*args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``resp2chat retranslate --json ARGS``: the run, and the result of every turn it checked."""
    out = resp2chat_cli("retranslate", "--json", *args)
    return out, [r for line in out.stdout.splitlines() if line.startswith("[") for r in json.loads(line)]


RESP2CHAT = Path(sys.executable).with_name("resp2chat")  # the installed console script


def cli_env(tmp_path: Path, **extra: str) -> dict:
    """A gateway's environment (``gateway_env``) whose HOME and config folder are in ``tmp_path``
    (the config file: ``config_file``), with ``extra``."""
    return {**gateway_env(), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), **extra}


def run_cli(tmp_path: Path, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    """The ``resp2chat`` console script with ARGS in ``cli_env(tmp_path, **env)``, ``stdin``
    as its input: what a user with that config folder runs. Its output as text."""
    return subprocess.run([str(RESP2CHAT), *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env=cli_env(tmp_path, **env), cwd=tmp_path)


def config_file(tmp_path: Path) -> Path:
    """The config file the CLI (and a gateway) in ``cli_env(tmp_path)`` read and write."""
    return tmp_path / "xdg" / "resp2chat" / "config.yaml"


# --- what a gateway tells about itself --------------------------------------------------------


def stored_by(samples: dict, metric: str = "resp2chat_stored_responses") -> dict:
    """Who fills the response store, from a ``scrape``: (client, kind) -> the ``metric``'s value
    (``resp2chat_stored_responses`` or ``resp2chat_stored_response_bytes``)."""
    return {(dict(labels).get("client"), dict(labels).get("kind")): v
            for (name, labels), v in samples.items() if name == metric}


def scrape(gw, **headers) -> dict:
    """A gateway's /metrics (asked with ``headers``), read with prometheus_client's own parser:
    (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(gw.base_url.removesuffix("/v1") + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# --- third-party clients against the scripted upstream ----------------------------------------

WEATHER_CALL = 'call: get_weather {"city": "Paris"}'  # the scripted upstream calls get_weather, then answers
ECHO_CALL = 'call: mcp__ev__echo {"message": "hello mcp"}'  # … calls the MCP server ``ev``'s echo


def assert_tool_loop(upstream_requests: list[dict]) -> None:
    """The backend saw the call (``WEATHER_CALL``), then the client's tool result as a tool message."""
    assert len(upstream_requests) == 2, [r["messages"][-1] for r in upstream_requests]
    first, second = upstream_requests
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    call_msg, result = second["messages"][-2:]
    (call,) = call_msg["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert result == {"role": "tool", "tool_call_id": call["id"], "content": result["content"]}
    assert "sunny in Paris" in result["content"]


def assert_chat_history(upstream_requests: list[dict]) -> None:
    """The second turn reached the backend with the first turn as the client kept it, the
    reasoning as the assistant message's reasoning field."""
    messages = upstream_requests[-1]["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["my name is Ada", "what is my name"], messages
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert len(assistants) == 1, messages
    assert assistants[0]["content"] == "You said: my name is Ada"
    assert assistants[0]["reasoning_content"] == "Thinking about: my name is Ada"


def assert_response_format(upstream_request: dict) -> None:
    """The client's structured output (a schema with a string ``answer``) reached the backend."""
    fmt = upstream_request["response_format"]
    assert fmt["type"] == "json_schema", fmt
    schema = fmt["json_schema"]["schema"]
    assert schema["properties"]["answer"]["type"] == "string" and "answer" in schema["required"]


EVERYTHING_VERSION = "2026.8.31"  # the Makefile's MCP_EVERYTHING_VER


def everything_bin() -> str:
    """The real MCP test server (npm @modelcontextprotocol/server-everything): $MCP_EVERYTHING_BIN
    or `make mcp-everything`'s."""
    import pytest

    path = os.environ.get("MCP_EVERYTHING_BIN") or str(
        ROOT / ".tools" / f"mcp-everything-{EVERYTHING_VERSION}" / "node_modules" / ".bin" / "mcp-server-everything")
    if not Path(path).exists():
        pytest.fail("the MCP test server is not installed: run `make mcp-everything` (or set MCP_EVERYTHING_BIN)")
    return path


def serve_everything(tmp_path_factory, transport: str, path: str, ready):
    """server-everything on ``transport`` on a free port until the fixture ends: its URL (``path``),
    once ``ready(url, proc, log)`` says it listens."""
    port = free_port()
    log = tmp_path_factory.mktemp(f"everything-{transport}") / "server.log"
    proc = subprocess.Popen([everything_bin(), transport], env={**os.environ, "PORT": str(port)},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}{path}"
        ready(url, proc, log)
        yield url
    finally:
        stop_process(proc)


def serve_script(script: Path):
    """tests/mcp_script_server.py (the official MCP SDK's server, what ``script`` says) on a free
    port until the generator ends: its URL, once it listens."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "mcp_script_server.py"), str(port), str(script)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, 20, "the scripted MCP server listening", proc)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_process(proc)


# --- Codex CLI --------------------------------------------------------------------------------


def codex_bin_path() -> str | None:
    """The Codex CLI the tests run: $CODEX_BIN, `make codex`'s, or one on PATH."""
    env = os.environ.get("CODEX_BIN")
    if env:
        return env
    local = ROOT / ".tools" / "codex-0.171.0" / "node_modules" / ".bin" / "codex"
    return str(local) if local.exists() else shutil.which("codex")


@dataclass
class CodexRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Codex:
    """A Codex CLI with its own CODEX_HOME pointed at a gateway, run headless."""

    bin: str
    home: Path
    workdir: Path
    env: dict = field(default_factory=dict)  # added to the hermetic environment (e.g. OPENAI_API_KEY)

    @classmethod
    def at(cls, bin: str, folder: Path, env: dict | None = None) -> Codex:
        """A Codex with its CODEX_HOME in ``folder/codex-home`` and its working folder in
        ``folder/work`` (made if missing: two Codex at one folder share them, as a resumed
        session does)."""
        home, work = folder / "codex-home", folder / "work"
        home.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        return cls(bin, home, work, dict(env or {}))

    def configure(self, base_url: str, model: str = "demo-model") -> None:
        (self.home / "config.toml").write_text(
            f'model = "{model}"\nmodel_provider = "gw"\n\n[model_providers.gw]\n'
            f'name = "resp2chat"\nbase_url = "{base_url}"\nwire_api = "responses"\n'
            "requires_openai_auth = false\nrequest_max_retries = 0\nstream_max_retries = 0\n"
        )

    def configure_builtin(self, base_url: str, model: str = "demo-model", extra: str = "") -> None:
        """Codex's built-in OpenAI provider pointed at the gateway (``openai_base_url``), as
        people do who write no provider: WebSocket transport first, remote compaction. (It needs
        no key; a gateway key goes in ``env["CODEX_API_KEY"]``.)"""
        (self.home / "config.toml").write_text(f'model = "{model}"\nopenai_base_url = "{base_url}"\n{extra}')

    def exec(self, *args: str, timeout: float = 120) -> CodexRun:
        cmd = [self.bin, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
        env["CODEX_HOME"] = str(self.home)
        env.update(self.env)
        proc = subprocess.run(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        return CodexRun(proc.returncode, proc.stdout, proc.stderr)


def write_png(path: Path, width: int = 4, height: int = 4, rgb=(255, 0, 0)) -> bytes:
    """A tiny valid RGB PNG written to ``path`` with zlib/struct only; its bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * width  # filter type 0 + pixels
    data = (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))
    path.write_bytes(data)
    return data


class Answer(socket.socket):
    got = b""  # what came of the answer so far


def open_embedding(gw, key: str, inputs: list[str]) -> Answer:
    """``POST /v1/embeddings`` over a plain socket, returned once the answer's head (200) came: its
    body (the scripted backend's ``slow: <ms>`` pieces) still coming."""
    sock = Answer()
    sock.settimeout(30)
    sock.connect(("127.0.0.1", gw.port))
    body = json.dumps({"model": "demo-model", "input": inputs}).encode()
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nauthorization: Bearer %s\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (gw.port, key.encode(), len(body), body))
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(4096)
        assert got, "no answer"
    assert got.startswith(b"HTTP/1.1 200"), got
    sock.got = got
    return sock


def rest(sock: Answer) -> bytes:
    """The rest of an ``open_embedding``'s answer (chunked), up to its end."""
    while not sock.got.endswith(b"0\r\n\r\n"):
        more = sock.recv(65536)
        assert more, sock.got
        sock.got += more
    return sock.got
