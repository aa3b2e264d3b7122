"""An adversarial hunt through real mitmdump gateways and a real backend that records what it
gets (tests/test_security_gate.py's echo): what a browser, an odd request target or a client's
own headers can make a gateway hand a backend.

- A request target of odd spellings (percent-encoding, double slashes, dot segments, ``;``):
  whatever reaches the backend is a path ``passthrough_paths`` lets through, as the backend may
  read it (decoded and normalised), never one of the gateway's own, and nothing is a 500.
- A browser's cross-site request that carries no ``Origin`` (an ``<img>``, a ``<script>``, a link:
  no-cors GETs) says so in ``Sec-Fetch-Site``: refused like one with an ``Origin`` not listed.
- A client's ``Proxy-Authorization`` (the credential of a proxy, RFC 9110 §11.7.2: spent by the
  first proxy that takes it) reaches no backend, on a passthrough call as on a turn, and a flow
  file keeps it ``[redacted]``; nor does any header named like a credential (an SSO proxy's
  cookie or token in front of the gateway, another API's key).
- A key a backend repeats reaches no client, log or flow however it comes: JSON-escaped (PHP's
  ``\\/``, .NET's ``\\u002B``) in a passthrough answer or a turn's error, in the reason phrase of
  its status line, in a response head that breaks off or does not parse, as a bad chunk header.
- A backend's endless response head is cut, its memory bounded (measured: /proc/PID/status).
"""

from __future__ import annotations

import ast
import contextlib
import json
import posixpath
import re
import socket
import time
import types
from urllib.parse import unquote

import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import LocalServer, MiB, Peak, QuietHandler, RawServer, read_flows, read_request, start_gateway
from test_security_gate import UP_KEY, _Echo, error_of, raw
from wsclient import WSClient

from resp2chat_core import gate as G, settings as S
from resp2chat_core.channel import Scrubber, scrub

PROXY_CREDENTIAL = "Basic cHJveHl1c2VyOnByb3h5LXBhc3Mtc2VjcmV0LTQyNDI="  # proxyuser:proxy-pass-secret-4242


def _echo_gateway(tmp):
    """A gateway (upstream key set, flows written) in front of an echoing backend: (gateway,
    backend, flow file); both stopped on the way out."""
    _Echo.seen = []
    server = LocalServer(_Echo)
    server.seen = _Echo.seen
    flows = tmp / "flows.mitm"
    gw = start_gateway(server.url, tmp, "--set", f"resp2chat_upstream_api_key={UP_KEY}",
                       "--set", "resp2chat_max_replay_entries=0", "-w", str(flows))
    try:
        yield gw, server, flows
    finally:
        gw.stop()
        server.close()


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory):
    """One for the module."""
    yield from _echo_gateway(tmp_path_factory.mktemp("echo-gateway"))


@pytest.fixture
def own_echo_gateway(tmp_path):
    """One of the test's own (its flow file read once it stopped)."""
    yield from _echo_gateway(tmp_path)


def _get(port: int, target: str, extra: str = "") -> tuple[int, dict, bytes]:
    return raw(port, f"GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}connection: close\r\n\r\n".encode())


# --- odd request targets --------------------------------------------------------------------

_PIECES = ["v1", "models", "responses", "conversations", "files", "embeddings", "healthz", "metrics", "m",
           "..", ".", "", "%2e%2e", "%2E", "%2f", "%2F..", "%252e%252e", "%72esponses", "..;", ";x", "%00", "%5c",
           "a%2fb", "%20", "~", "%"]
_RULES = G.parse_passthrough(G.DEFAULT_PASSTHROUGH)


def _allowed_for_a_backend(method: str, target: str) -> bool:
    """A request a backend may get: a default passthrough path, the same read plain and
    decoded-and-normalised (a backend that decodes it is led nowhere else)."""
    path = target.split("?", 1)[0]
    normal = posixpath.normpath(unquote(path))
    return (any(r.matches_path(path) and r.matches_path(normal) and r.method in (None, method) for r in _RULES)
            and not any(normal == p or normal.startswith(p + "/") for p in G.GATEWAY_PATHS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "DELETE"]),
       pieces=st.lists(st.sampled_from(_PIECES), min_size=1, max_size=5),
       query=st.sampled_from(["", "?x=1", "?x=../../files", "?stream=true"]))
def test_odd_targets_reach_a_backend_only_as_an_allowed_path(echo_gateway, method, pieces, query):
    gw, server, _ = echo_gateway
    target = "/" + "/".join(pieces) + query
    before = len(server.seen)
    body = b'{"model": "m", "input": "hi"}'
    status, headers, _ = raw(gw.port, (f"{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                       f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                                       f"connection: close\r\n\r\n").encode() + body)
    assert status < 500, (target, status)
    for line, _, _ in server.seen[before:]:
        got_method, got_target, version = line.split(" ")
        assert version == "HTTP/1.1" and got_target.startswith("/"), line
        assert (got_method, got_target) == ("POST", "/v1/chat/completions") or _allowed_for_a_backend(
            got_method, got_target), (target, line)


# --- a browser's cross-site request without Origin -------------------------------------------------


@pytest.mark.parametrize("target", ["/v1/models", "/v1/responses/resp_x", "/metrics"])
def test_a_cross_site_request_without_origin_is_refused(echo_gateway, target):
    """Chrome, Firefox and Safari send no ``Origin`` on a no-cors GET (``<img src>``, ``<script
    src>``, a prefetch) but say ``Sec-Fetch-Site: cross-site``: a page on any site would have
    the loopback gateway spend its upstream key and read its stored responses for it."""
    gw, server, _ = echo_gateway
    before = len(server.seen)
    status, headers, body = _get(gw.port, target, "sec-fetch-site: cross-site\r\nsec-fetch-mode: no-cors\r\n"
                                                  "sec-fetch-dest: image\r\n")
    assert status == 403, (status, body)
    assert error_of(body)["code"] == "origin_not_allowed"
    assert headers["x-request-id"].startswith("req_")
    assert server.seen[before:] == []
    # what a person typing the URL sends (none), or a page of the same site: as before
    for site in ("none", "same-origin"):
        status, _, body = _get(gw.port, "/v1/models", f"sec-fetch-site: {site}\r\n")
        assert status == 200, (site, body)


# --- a client's proxy credential ---------------------------------------------------------------


def test_a_clients_proxy_credential_reaches_no_backend_nor_a_flow(own_echo_gateway):
    gw, server, flows = own_echo_gateway
    before = len(server.seen)
    status, _, _ = _get(gw.port, "/v1/models", f"proxy-authorization: {PROXY_CREDENTIAL}\r\n")
    assert status == 200
    body = json.dumps({"model": "m", "input": "hi", "stream": False}).encode()
    status, _, answer = raw(gw.port, (f"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                      f"proxy-authorization: {PROXY_CREDENTIAL}\r\ncontent-type: application/json\r\n"
                                      f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body)
    assert status == 200, answer
    got = server.seen[before:]
    assert [line.split(" ")[1] for line, _, _ in got] == ["/v1/models", "/v1/chat/completions"]
    for line, headers, _ in got:
        assert "proxy-authorization" not in headers, line
        assert headers["authorization"] == f"Bearer {UP_KEY}"  # (the upstream's key, as ever)
    status, _, _ = _get(gw.port, "/v1/files", f"proxy-authorization: {PROXY_CREDENTIAL}\r\n")
    assert status == 404  # (refused: its flow keeps the client's request as it came)
    gw.stop()  # (the flow file whole)
    kept = [f for f in read_flows(flows) if f.request.headers.get("proxy-authorization")]
    assert [f.request.path for f in kept] == ["/v1/files"]
    assert kept[0].request.headers["proxy-authorization"] == "[redacted]"
    assert PROXY_CREDENTIAL.encode() not in flows.read_bytes()


def test_the_cross_site_rule():
    assert G.origin_refusal(None, [], "cross-site").code == "origin_not_allowed"
    assert G.origin_refusal(None, [], " Cross-Site ").status == 403
    for site in (None, "none", "same-origin", "same-site"):
        assert G.origin_refusal(None, [], site) is None
    assert G.origin_refusal(None, ["*"], "cross-site") is None  # (every page let in)
    assert G.origin_refusal(None, ["https://app.example"], "cross-site") is not None  # (no Origin to match)
    assert G.origin_refusal("https://app.example", ["https://app.example"], "cross-site") is None


# --- a secret a backend repeats JSON-escaped ---------------------------------------------------

ESCAPING_KEY = "Zm9vYmFy/c2VjcmV0+a2V5cGxhbnRlZA/x=="  # (a base64 key: '/', '+' and '=' in it)


def _escaped(text: str, how: str) -> str:
    """``text`` as a JSON encoder writes it inside a string: PHP's json_encode (``\\/``), .NET's
    System.Text.Json (``+`` as ``\\u002B``), every mark as ``\\u00xx`` (lower-case hex)."""
    if how == "php":
        return text.replace("/", "\\/")
    if how == "dotnet":
        return text.replace("+", "\\u002B")
    return "".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in text)


class _Escaping(QuietHandler):
    """A backend that repeats the Authorization it got, JSON-escaped every way ``_escaped`` knows:
    in the model list (200) and in a chat request's 401."""

    def _any(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        said = " / ".join(_escaped(self.headers.get("authorization", ""), how) for how in ("php", "dotnet", "all"))
        body = ('{"object": "list", "data": [], "error": {"message": "invalid key: %s", "type": "invalid_request_error",'
                ' "code": "invalid_api_key"}}' % said).encode()
        self.send_response(401 if self.path.endswith("/chat/completions") else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _any


def _pieces_of_the_key(text: str) -> list[str]:
    """The runs of 6 or more letters and digits of ESCAPING_KEY found in ``text`` (what a client
    reads of it)."""
    runs = [r for r in re.split(r"[^A-Za-z0-9]", ESCAPING_KEY) if len(r) >= 6]
    return [r for r in runs if r in text]


def test_a_key_a_backend_repeats_json_escaped_reaches_no_client_nor_flow(tmp_path):
    """A backend written in PHP escapes '/' (``\\/``), one in .NET '+' (``\\u002B``): a key with
    either in it, repeated in a passthrough answer, passed the scrubber (it looks for the key's
    bytes) and the client's JSON parser read the key whole; in a turn's error, the key-like
    pattern cut it at its first '/' and the rest of it went to the client."""
    flows = tmp_path / "flows.mitm"
    with LocalServer(_Escaping) as server:
        gw = start_gateway(server.url, tmp_path, "--set", f"resp2chat_upstream_api_key={ESCAPING_KEY}",
                           "--set", "resp2chat_max_replay_entries=0", "-w", str(flows))
        try:
            listed = requests.get(gw.base_url + "/models", timeout=30)
            assert listed.status_code == 200
            seen = [json.dumps(listed.json(), ensure_ascii=False)]
            for stream in (False, True):
                turn = requests.post(gw.base_url + "/responses", json={"model": "m", "input": "hi", "stream": stream},
                                     timeout=30)
                seen.append(turn.text if stream else json.dumps(turn.json(), ensure_ascii=False))
                if stream:
                    seen += [json.dumps(json.loads(line[6:]), ensure_ascii=False) for line in turn.text.splitlines()
                             if line.startswith("data: {")]
        finally:
            gw.stop()
    assert "invalid key" in seen[0]  # (the backend's words, passed on: a passthrough answer)
    # (a turn's 401 refused the gateway's key: the client reads that; the words are the operator's)
    assert "refused the gateway's credentials" in seen[1] and "invalid key" in gw.log()
    for text in seen:
        assert _pieces_of_the_key(text) == [], text
    kept = flows.read_bytes().decode("latin-1")
    assert _pieces_of_the_key(kept) == []
    assert _pieces_of_the_key(gw.log()) == []


@settings(max_examples=80, deadline=None)
@given(how=st.sampled_from(["plain", "php", "dotnet", "all"]), before=st.text(max_size=20),
       after=st.text(max_size=20), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_the_scrubber_finds_a_json_escaped_secret_split_anywhere(how, before, after, cuts):
    secret = ESCAPING_KEY.encode()
    written = ESCAPING_KEY if how == "plain" else _escaped(ESCAPING_KEY, how)
    data = json.dumps(before)[1:-1].encode() + written.encode() + json.dumps(after)[1:-1].encode()
    assert scrub(data, (secret,)).count(b"[redacted]") == 1
    scrubber, out, at = Scrubber((secret,)), b"", 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        out += b"".join(scrubber(data[at:cut]) if cut > at else [])
        at = max(at, cut)
    out += b"".join(scrubber(b""))
    assert out == scrub(data, (secret,))
    assert _pieces_of_the_key(json.loads(b'"' + out + b'"')) == []


# what may be in a key (a configured secret is any string): quotes, a backslash, a tab, a mark past ASCII,
# a control character Python's repr writes as \x7f
_ODD_KEY = st.text(alphabet="ab12/-'\"\\\t\u00e9\x7f\U0001F600", min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(key=_ODD_KEY, how=st.sampled_from(["repr", "repr-in-double-quotes", "json", "json-ascii", "json-of-repr"]),
       before=st.text(alphabet="xy '\"\\", max_size=6), after=st.text(alphabet="xy '\"\\", max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4))
def test_a_key_quoted_by_python_or_json_is_scrubbed_split_anywhere(key, how, before, after, cuts):
    """An upstream key (no MCP header: ``settings.secret_values``) as an error's text quotes it,
    inside a longer string: by Python (``repr``, an httpx or requests exception naming it: a
    backslash doubled, a ``'`` escaped or not as the quotes around it were chosen, a control
    character as ``\\x..``) or by a JSON encoder (``\\"``, ``\\\\``, ``\\t``, ``\\u00e9``): ``scrub`` and the
    streaming ``Scrubber`` redact it, and what is left, read back the way it was written, holds no
    key. Or by both: a Python backend's error text, quoting it, in its JSON answer (``json-of-repr``:
    ``\\\\'`` for a quote, ``\\\\\\\\`` for a backslash). Before, only MCP header values had Python's
    spellings (``mcp._forms``), and JSON's ``\\"`` and ``\\\\`` were no one's: the key went through
    whole; and JSON's spelling of Python's was no one's either (a key with a ``'``, a ``\\`` or
    a tab went through whole)."""
    secret = "sk-" + key + "-0042"
    secrets = S.secret_values({"upstream_api_key": secret})
    assert secrets == (secret.encode(),)
    text = before + secret + after
    if how.startswith("repr"):
        assume(how == "repr" or '"' not in text)  # (Python quotes with "..." only a string with no " in it)
        written = repr(text) if how == "repr" else '"' + repr("'\"" + text)[4:-1].replace("\\'", "'") + '"'
        read = ast.literal_eval
    elif how == "json-of-repr":
        written = json.dumps(repr(text))
        read = lambda w: ast.literal_eval(json.loads(w))
    else:
        written = json.dumps(text, ensure_ascii=how == "json-ascii")
        read = json.loads
    assert read(written) == text
    data = ("error: " + written + " was refused").encode()
    clean = scrub(data, secrets)
    assert clean.count(b"[redacted]") == 1, (written, clean)
    assert secret not in read(clean.decode()[len("error: "):-len(" was refused")]), clean
    scrubber, out, at = Scrubber(secrets), b"", 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        out += b"".join(scrubber(data[at:cut]) if cut > at else [])
        at = max(at, cut)
    assert out + b"".join(scrubber(b"")) == clean


@settings(max_examples=80, deadline=None)
@given(short=st.text(alphabet="abcdefXYZ-_.~0123", min_size=4, max_size=12),
       rest=st.text(alphabet="abcdefXYZ-_.~0123", min_size=1, max_size=12),
       head=st.text(alphabet="abcdefXYZ-_.~0123", max_size=4), around=st.text(alphabet="/ =&q", max_size=6),
       order=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=3))
def test_a_secret_inside_another_leaves_nothing_of_either(short, rest, head, around, order, cuts):
    """Two secrets one of which holds the other (an upstream key, and a header value that begins
    with it): whichever comes first in the secrets, no piece of the longer one is left, in a body
    (``scrub``), in one that passes in pieces (``Scrubber``) or in a URL (``without_credentials``).
    Before, the shorter one, replaced first, left the longer one's rest."""
    long = head + short + rest
    secrets = (short, long) if order else (long, short)
    data = (around + long + around + short + around).encode()
    clean = scrub(data, tuple(x.encode() for x in secrets))
    assert clean.count(b"[redacted]") == 2 and clean.replace(b"[redacted]", b"") == (around * 3).encode(), clean
    scrubber, out, at = Scrubber(tuple(x.encode() for x in secrets)), b"", 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        out += b"".join(scrubber(data[at:cut]) if cut > at else [])
        at = max(at, cut)
    assert out + b"".join(scrubber(b"")) == clean
    url = G.without_credentials(f"/v1/models?x={long}&y=1", secrets)
    assert url is not None and long not in url and rest not in url.replace("[redacted]", "").partition("x=")[2][:len(rest) + 1] \
        and url.startswith("/v1/models?x=") and url.endswith("&y=1") and "[redacted]" in url, url


# --- what an auth proxy in front of the gateway adds ------------------------------------------------

# What a team's SSO proxy in front of the gateway puts on every request (oauth2-proxy's cookie and
# tokens, AWS ALB's, Cloudflare Access's), and another API's key in a client's own header: the
# user's credentials for other services, none of them the backend's.
FRONT = {"cookie": "_oauth2_proxy=sso-session-planted-1111", "x-forwarded-access-token": "ya29.sso-access-planted-2222",
         "x-auth-request-access-token": "ya29.sso-access-planted-3333", "x-amzn-oidc-accesstoken": "alb-planted-4444",
         "api-key": "azure-client-planted-5555", "x-goog-api-key": "AIza-client-planted-6666"}
KEPT = {"session_id": "codex-session-1", "x-trace-id": "trace-77", "openai-organization": "org-1"}


def test_credentials_of_other_services_reach_no_backend_nor_a_flow(own_echo_gateway):
    """A client's headers go on to the backend (Codex's session headers, a trace id), but not
    those named like a credential: an SSO proxy's session cookie or access token (valid for the
    user's other services) went to every backend, a hosted provider's too, and into flow files."""
    gw, server, flows = own_echo_gateway
    before = len(server.seen)
    headers = {**FRONT, **KEPT}
    assert requests.get(gw.base_url + "/models", headers=headers, timeout=30).status_code == 200
    assert requests.post(gw.base_url + "/embeddings", headers=headers, json={"model": "m", "input": "hi"},
                         timeout=30).status_code == 200
    assert requests.post(gw.base_url + "/responses", headers=headers, json={"model": "m", "input": "hi", "stream": False},
                         timeout=30).status_code == 200
    socket_headers = {k: v for k, v in headers.items() if k != "cookie"}
    sock = WSClient(gw.base_url, headers={**socket_headers, "cookie": FRONT["cookie"]})
    try:
        assert sock.turn({"type": "response.create", "model": "m", "input": "hi"})[-1]["type"] == "response.completed"
    finally:
        sock.close()
    got = server.seen[before:]
    assert [line.split(" ")[:2] for line, _, _ in got] == [["GET", "/v1/models"], ["POST", "/v1/embeddings"],
                                                          ["POST", "/v1/chat/completions"], ["POST", "/v1/chat/completions"]]
    for line, seen, _ in got:
        assert not set(FRONT) & set(seen), (line, seen)
        assert not any(v in json.dumps(seen) for v in FRONT.values()), line
        assert {k: seen.get(k) for k in KEPT} == KEPT, line  # (the others still go on)
        assert seen["authorization"] == f"Bearer {UP_KEY}"
    gw.stop()
    kept = flows.read_bytes()
    assert not [v for v in FRONT.values() if v.encode() in kept]


# --- a backend's broken or endless response head (passthrough) ----------------------------------


class _RawBackend(RawServer):
    """A backend that answers each connection's request with the pieces of ``answer(its head)``
    as they are, then closes. The head is read whole (helpers.read_request): one ``recv`` may
    hold part of it, the Authorization the answers repeat not in it."""

    def __init__(self, answer) -> None:
        self.answer = answer
        super().__init__()

    def serve(self, conn: socket.socket, index: int) -> None:
        if (request := read_request(conn, bytearray())) is not None:
            for piece in self.answer(request[0]):
                conn.sendall(piece)


def _echoed_auth(request: bytes) -> bytes:
    return next((line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                 if line.lower().startswith(b"authorization:")), b"none")


def HEAD_CUT(request: bytes) -> list[bytes]:
    """A head that ends with its connection, half way."""
    return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-echo: " + _echoed_auth(request) + b"\r\n"]


def HEAD_BAD(request: bytes) -> list[bytes]:
    """A head with a line that is no header field."""
    return [b"HTTP/1.1 200 OK\r\nx-echo " + _echoed_auth(request) + b"\r\ncontent-length: 0\r\n\r\n"]


@contextlib.contextmanager
def _models_through(answer, tmp_path):
    """``GET /models`` (passthrough) through a gateway recording flows, its backend answering
    with ``answer``: yields the ``requests`` call to make, then checks that the upstream key is
    in neither the gateway's log nor the flow file (``.log``: what the log said, once stopped)."""
    backend = _RawBackend(answer)
    flows = tmp_path / "flows.mitm"
    gw = start_gateway(backend.url, tmp_path, "--set", f"resp2chat_upstream_api_key={UP_KEY}",
                       "--set", "resp2chat_max_replay_entries=0", "-w", str(flows))
    seen = types.SimpleNamespace(get=lambda: requests.get(gw.base_url + "/models", timeout=30), log="")
    try:
        yield seen
    finally:
        gw.stop()
        backend.close()
    seen.log = gw.log()
    assert UP_KEY not in seen.log
    assert UP_KEY.encode() not in flows.read_bytes()


@pytest.mark.parametrize("answer", [HEAD_CUT, HEAD_BAD], ids=["cut-in-its-head", "a-bad-header-line"])
def test_a_backends_broken_head_repeating_the_key_reaches_no_client_log_or_flow(tmp_path, answer):
    """mitmproxy's 502 for a response head it could not read quoted the backend's bytes (its
    whole head so far, or the bad line): a backend repeating the Authorization it got handed the
    upstream key to the client (an HTML page), the gateway's log and the flow file."""
    with _models_through(answer, tmp_path) as gw:
        got = gw.get()
        assert got.status_code == 502
        assert UP_KEY not in got.text and "sk-upstream" not in got.text, got.text


def _reason_echo(request: bytes) -> list[bytes]:
    """A whole answer whose status line's reason phrase repeats the Authorization it got."""
    return [b"HTTP/1.1 200 " + _echoed_auth(request) + b"\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_key_a_backend_repeats_in_its_reason_phrase_reaches_no_client_log_or_flow(tmp_path):
    """Headers and body were scrubbed, the status line's reason phrase was passed on as it came:
    the client read the upstream key in ``HTTP/1.1 200 Bearer sk-…``, so did the log and the flow."""
    with _models_through(_reason_echo, tmp_path) as gw:
        got = gw.get()
        assert got.status_code == 200 and got.json() == {}
        assert UP_KEY not in got.reason, got.reason


def _bad_chunk(request: bytes) -> list[bytes]:
    """A chunked answer whose first chunk header is the Authorization it got."""
    return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            + _echoed_auth(request) + b"\r\n"]


def test_a_key_a_backend_repeats_as_a_bad_chunk_reaches_no_log_or_flow(tmp_path):
    """mitmproxy's error for a body it could not read quoted the bytes (``illegal chunk header:
    bytearray(b'Bearer sk-…')``) into the log and the flow's error."""
    with _models_through(_bad_chunk, tmp_path) as gw:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # (its head went out: the body breaks off)
            gw.get().content
    assert "illegal chunk header" in gw.log  # (what went wrong is still said)


def test_a_backends_endless_response_head_is_cut_with_memory_bounded(tmp_path):
    """A passthrough answer's head is bounded as a request's is: 200 MiB of one header line held
    +1000 MiB (its bytes, then their repr in the 502 page) and took 37 s before."""
    total = 64 << 20

    def endless(request):
        yield b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-big: "
        for _ in range(total >> 20):
            yield b"a" * (1 << 20)

    backend = _RawBackend(endless)
    gw = start_gateway(backend.url, tmp_path, "--set", "resp2chat_max_replay_entries=0")
    try:
        requests.get(gw.base_url + "/models", timeout=30)  # (once: what the process holds anyway)
        peak = Peak(gw.proc.pid)
        started = time.monotonic()
        got = requests.get(gw.base_url + "/models", timeout=60)
        assert got.status_code == 502 and "aaaa" not in got.text, got.text[:300]
        assert time.monotonic() - started < 10
        assert peak.grown < 16 * MiB, peak.grown / MiB
    finally:
        gw.stop()
        backend.close()


def test_an_identity_proxys_jwt_reaches_no_backend(own_echo_gateway):
    """Cloudflare Access and Google's IAP put the user's signed identity (a JWT) in
    ``Cf-Access-Jwt-Assertion`` / ``X-Goog-Iap-Jwt-Assertion``: a bearer credential for every
    application behind the same proxy, named like none of ``credential_header``'s words."""
    gw, server, _ = own_echo_gateway
    before = len(server.seen)
    headers = {"cf-access-jwt-assertion": "eyJ.cf-planted.7777", "x-goog-iap-jwt-assertion": "eyJ.iap-planted.8888"}
    assert requests.post(gw.base_url + "/responses", headers=headers, json={"model": "m", "input": "hi", "stream": False},
                         timeout=30).status_code == 200
    for line, seen, _ in server.seen[before:]:
        assert not set(headers) & set(seen), (line, seen)
