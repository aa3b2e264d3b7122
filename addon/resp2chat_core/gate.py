"""What the gate lets in, decided from a request's head alone (no I/O, no mitmproxy).

Each check returns ``None`` (let it in) or the ``GatewayError`` the client gets; the addon
(resp2chat_io/addons/gate.py) answers it before reading the body.

- ``host_refusal``: the ``Host`` must be one of the gateway's own names (DNS rebinding: a web
  page whose name resolves to this machine must not be served). An IP literal and ``localhost``
  (``*.localhost``) are always the gateway's own — no page can make a browser send them for
  another site — as are the bind host and ``public_hosts``. Any other DNS name must be listed in
  ``public_hosts``, a wildcard bind (``0.0.0.0``) included.
- ``origin_refusal``: a request that carries an ``Origin`` (a browser's; command-line clients and
  SDKs send none) is refused unless ``allowed_origins`` lists it, and so is a browser's
  cross-site request without one (``Sec-Fetch-Site: cross-site``: a no-cors GET).
- ``route``: what serves a path (the gateway itself, or the upstream through
  ``passthrough_paths``), or the 404/405 for a path or method nobody serves.
- ``content_type_refusal``: a turn's body is JSON: ``application/json`` or any ``+json`` type.
- ``disguised``: a path that names a gateway endpoint only once percent-decoded or normalised.
- ``without_credentials``: a request target with a key put in it (a query parameter named like a
  credential, a configured secret or a key of the shape ``resp2chat keys`` makes anywhere) redacted: the gate refuses it (a key in a URL
  reaches a backend's logs, the gateway's log and flow files, whatever the gateway checks).
- ``BodyBudget``: the request bodies arriving at once, all clients together, by their declared
  sizes (``max_request_bodies_mb``): one that would go past it is refused (``bodies_overloaded``),
  and so is one past its client's half of it (``client_bodies_overloaded``). The same budget
  bounds the gateway's own large answers waiting for their clients (``max_answers_waiting_mb``,
  ``answers_overloaded``, a client past its half ``client_answers_overloaded``:
  resp2chat_io/addons/head_deadline.py counts them).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass
from typing import Hashable
from urllib.parse import unquote, unquote_plus

from .channel import longest_first
from .clients import KEY_SHAPE
from .errors import GatewayError

RESPONSES_PATHS = ("/v1/responses", "/responses")  # where clients create responses (and open the WebSocket)
CONVERSATIONS = ("/v1/conversations", "/conversations")  # the Conversations API (addons/conversations.py)
HEALTHZ, METRICS = "/healthz", "/metrics"
GATEWAY_PATHS = (*RESPONSES_PATHS, *CONVERSATIONS, HEALTHZ, METRICS)

# A request head (its request line and header fields) larger than this is refused with a 431,
# whole (``head_size``, the gate) or while it arrives (resp2chat_io/mitm_head.py: mitmproxy
# itself gathers a head without limit). Node's default is 16 KiB, nginx's 4 × 8 KiB; the relay
# reads mitmproxy's request heads up to four times this (relay/server.py).
MAX_HEAD = 32 << 10


BODIES_RETRY_SECS = 1  # the wait a request refused by ``BodyBudget`` is told (its retry-after)


class BodyBudget:
    """The request-body bytes the gateway receives at once, all clients together: each request
    takes its declared size (its ``content-length``: the gate refuses a body of unknown length)
    from its head until its body is all in (or the request ends, or its connection goes).

    Why. Each body is bounded (``max_request_body_mb``), and one that arrives slower than the
    minimum rate is cut (head_deadline.py ``BodyRate``), but how many arrive at once was not: a
    client (or many) sending each body just above the rate made the gateway hold as many of them
    as it liked. Reserving at the head, by the declared size, is what bounds it: the bytes a
    request may still bring are counted before it brings them, so the sum held never passes
    ``cap`` — except that one body is always let in when none other is arriving, so a ``cap``
    below the largest body a request may have never makes that body impossible. A request that
    would go past it is refused at its head, its body unread (``bodies_overloaded``: 503 and
    retry-after, which the openai SDK and Codex retry); it does not wait, as a wait would hold
    its connection and head with no bound on how many wait.

    One client's share (``who``: its identity, where the gateway has several clients) is half of
    ``cap``: past it, that client's next body is refused (``client_bodies_overloaded``: 429 and
    retry-after) while the other half stays for the others, so one key's slow uploads cannot hold
    off every other client's; a client with no body arriving always gets one in (the rule above).

    The same bound, the other way (``overloaded=answers_overloaded``): the bytes of the large
    answers the gateway built itself (a stored response, a conversation's items page, a
    non-streamed turn's Response) still waiting in their clients' sockets, each counted from its
    answer until it has left the write buffer (or its connection goes): a read that would go past
    it is refused (``answers_overloaded``), an answer the client already paid for is counted all
    the same, never refused (``take(..., must=True)``); one client's share is half here too (the
    same ``who``), so one key's slow readers cannot hold the reads of every other client off.

    Requests and their connections are named by the caller (a flow id, a client id)."""

    def __init__(self, cap: int, overloaded=None, share_overloaded=None) -> None:
        self.cap = cap  # bytes; 0: no cap (still counted)
        self.overloaded = overloaded or bodies_overloaded  # the refusal past ``cap`` (given ``cap``)
        self.share_overloaded = share_overloaded or client_bodies_overloaded  # past a client's half
        self.held = 0
        self._taken: dict[Hashable, tuple[Hashable, int, Hashable]] = {}  # request -> (its connection, size, who)
        self._on: dict[Hashable, set] = {}  # connection -> its requests counted
        self._by: dict[Hashable, int] = {}  # who -> the bytes its requests hold

    def __len__(self) -> int:
        """How many bodies arrive now (with a size)."""
        return len(self._taken)

    def take(self, request: Hashable, conn: Hashable, size: int, who: Hashable = None,
             must: bool = False) -> GatewayError | None:
        """Room for ``size`` more bytes of body (the request's declared size)? If so (None) they
        are counted until ``give_back`` (or ``gone``); else nothing is counted and the refusal the
        caller answers with is returned: all clients' room, or ``who``'s share (None: no share).
        ``must``: counted whatever is held, never refused."""
        if size <= 0 or request in self._taken:
            return None
        if self.cap and self.held and self.held + size > self.cap and not must:
            return self.overloaded(self.cap)
        mine = self._by.get(who, 0) if who is not None else 0
        if self.cap and mine and mine + size > self.cap // 2 and not must:
            return self.share_overloaded(self.cap)
        self._taken[request] = (conn, size, who)
        self._on.setdefault(conn, set()).add(request)
        self.held += size
        if who is not None:
            self._by[who] = mine + size
        return None

    def give_back(self, request: Hashable) -> None:
        """The request's body is all in (or it ended): no longer counted (again: nothing)."""
        taken = self._taken.pop(request, None)
        if taken is not None:
            conn, size, who = taken
            self.held -= size
            if who is not None:
                if (left := self._by[who] - size) > 0:
                    self._by[who] = left
                else:
                    del self._by[who]
            requests = self._on.get(conn)
            if requests is not None:
                requests.discard(request)
                if not requests:
                    del self._on[conn]

    def gone(self, conn: Hashable) -> None:
        """The connection closed: whatever its requests took is given back."""
        for request in list(self._on.get(conn, ())):
            self.give_back(request)

    def on(self, conn: Hashable) -> int:
        """The bytes the connection's requests hold now."""
        return sum(self._taken[request][1] for request in self._on.get(conn, ()))


def bodies_overloaded(cap: int) -> GatewayError:
    return GatewayError(f"this gateway is receiving as many request bodies as it holds at once "
                        f"(max_request_bodies_mb {cap >> 20} MiB, all clients together); try again shortly",
                        param="max_request_bodies_mb", code="server_overloaded", status=503, type="server_error",
                        retry_after=BODIES_RETRY_SECS)


def client_bodies_overloaded(cap: int) -> GatewayError:
    return GatewayError(f"your requests' bodies arriving at once already take your share of what this gateway "
                        f"receives at once (half of max_request_bodies_mb {cap >> 20} MiB). Please try again in {BODIES_RETRY_SECS}s.",
                        param="max_request_bodies_mb", code="rate_limit_exceeded", status=429, type="requests",
                        retry_after=BODIES_RETRY_SECS)


def client_answers_overloaded(cap: int) -> GatewayError:
    return GatewayError(f"your large answers waiting to be read already take your share of what this gateway holds "
                        f"for its clients at once (half of max_answers_waiting_mb {cap >> 20} MiB). Please try again in {BODIES_RETRY_SECS}s.",
                        param="max_answers_waiting_mb", code="rate_limit_exceeded", status=429, type="requests",
                        retry_after=BODIES_RETRY_SECS)


def answers_overloaded(cap: int) -> GatewayError:
    return GatewayError(f"this gateway holds as many of its large answers waiting for their clients as it may at once "
                        f"(max_answers_waiting_mb {cap >> 20} MiB, all clients together); try again shortly",
                        param="max_answers_waiting_mb", code="server_overloaded", status=503, type="server_error",
                        retry_after=BODIES_RETRY_SECS)


def head_size(method: str, target: str, fields) -> int:
    """The bytes of a request head as HTTP/1.1 writes it: ``fields`` as (name, value) bytes."""
    return len(method) + len(target) + 12 + sum(len(name) + len(value) + 4 for name, value in fields) + 2


def head_too_large() -> GatewayError:
    return GatewayError(f"the request head (request line and header fields) is larger than {MAX_HEAD >> 10} KiB",
                        param="headers", code="request_header_fields_too_large", status=431)

# The gateway's own paths and the methods it serves there (anything else: 405 from the gate).
# Below /v1/responses and /v1/conversations, a path's shape says what it is: "{id}" stands for
# one segment (an id), anything else is literal; a fixed name wins over an id.
_READ = ("GET", "HEAD")
OWN_METHODS = {HEALTHZ: _READ, METRICS: _READ}
RESPONSES_BELOW = {
    "": ("GET", "POST"),  # create a response; GET: the WebSocket's upgrade
    "/compact": ("POST",),  # compaction.py
    "/input_tokens": ("POST",),  # the input's token count
    "/{id}": ("GET", "DELETE"),  # a stored response (GET ?stream=true: a background response's events)
    "/{id}/cancel": ("POST",),  # a background response
    "/{id}/input_items": ("GET",),
}
CONVERSATIONS_BELOW = {
    "": ("POST",),
    "/{id}": ("GET", "POST", "DELETE"),
    "/{id}/items": ("GET", "POST"),
    "/{id}/items/{id}": ("GET", "DELETE"),
}
_SEGMENT = re.compile(r"/[^/]+")


def is_input_tokens(method: str, path: str) -> bool:
    """Whether a request is ``POST /v1/responses/input_tokens`` (its query left on or off): the
    token count, which asks the backend's tokenizer (addons/input_tokens.py serves it;
    addons/limits.py counts it as backend work)."""
    found = endpoint(path.split("?", 1)[0])
    return method == "POST" and found is not None and found[:2] == ("responses", "/input_tokens")


def endpoint(path: str) -> tuple[str, str, tuple[str, ...]] | None:
    """Which of the gateway's own API endpoints ``path`` is (its query left off): (``responses``
    or ``conversations``, its shape in ``RESPONSES_BELOW``/``CONVERSATIONS_BELOW``, the methods
    served there); None for any other path. ``path_ids`` gives the ids it names."""
    for prefixes, kind, table in ((RESPONSES_PATHS, "responses", RESPONSES_BELOW),
                                  (CONVERSATIONS, "conversations", CONVERSATIONS_BELOW)):
        for prefix in prefixes:
            if path != prefix and not path.startswith(prefix + "/"):
                continue
            segments = _SEGMENT.findall(path[len(prefix):])
            if "".join(segments) != path[len(prefix):]:
                return None  # (an empty segment: a trailing or double slash)
            shape = _shape(segments, table)
            return (kind, shape, table[shape]) if shape is not None else None
    return None


_FIXED = {"compact", "input_tokens", "cancel", "input_items", "items"}  # names that are never an id


def _shape(segments: list[str], table: dict) -> str | None:
    """The table's key for these segments: each one literal where the table has it there, else
    an id (a fixed name is never an id)."""
    for key in table:
        parts = _SEGMENT.findall(key)
        if len(parts) == len(segments) and all(p == s or p == "/{id}" and s[1:] not in _FIXED
                                               for p, s in zip(parts, segments)):
            return key
    return None


def path_ids(path: str) -> list[str]:
    """The ids a path of ``endpoint`` names, in order, percent-decoded
    (``/v1/conversations/conv_1/items/msg%202``: ``["conv_1", "msg 2"]``; ``disguised`` lets
    through a path whose ids alone are encoded)."""
    kind, shape, _ = endpoint(path) or ("", "", ())
    prefix = next(p for p in (RESPONSES_PATHS if kind == "responses" else CONVERSATIONS) if path.startswith(p))
    return [unquote(s[1:]) for p, s in zip(_SEGMENT.findall(shape), _SEGMENT.findall(path[len(prefix):]))
            if p == "/{id}"]


def takes_json(method: str, path: str) -> bool:
    """A request whose body is JSON the gateway reads (its content type is checked at the head)."""
    found = endpoint(path) if method == "POST" else None
    return found is not None and found[1] != "/{id}/cancel"

# What a Responses gateway's clients need besides /v1/responses: the model list (Codex, the
# SDKs' model pickers, LangChain and pydantic-ai health checks), one model, and embeddings (the
# retrieval half of the same applications). Files, batches, fine-tuning, audio, images and the
# organisation endpoints stay out unless an operator lists them.
DEFAULT_PASSTHROUGH = ("GET /v1/models", "GET /v1/models/*", "POST /v1/embeddings")
_METHOD = re.compile(r"^[A-Z]{3,10}$")
_SEGMENT_SAFE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


@dataclass(frozen=True)
class PassRule:
    method: str | None  # None: any method
    path: str  # exact, or a prefix ending in "/" when ``rest`` (the entry ended in "/*")
    rest: bool

    def matches_path(self, path: str) -> bool:
        return path.startswith(self.path) and len(path) > len(self.path) if self.rest else path == self.path


def parse_passthrough(entries) -> tuple[PassRule, ...]:
    """``["GET /v1/models", "/v1/embeddings", "GET /v1/models/*"]`` -> rules; ``ValueError``
    names a bad entry. ``*`` only as the last segment (``/*``: one or more further segments)."""
    rules = []
    for entry in entries:
        method, _, path = entry.strip().rpartition(" ")
        method = method.strip() or None
        if method is not None and not _METHOD.match(method):
            raise ValueError(f"{entry!r}: expected '[METHOD] /path', e.g. 'GET /v1/models' (methods in capitals)")
        rest = path.endswith("/*")
        bare = path[:-1] if rest else path
        if not bare.startswith("/") or "*" in bare or not _SEGMENT_SAFE.match(bare) or not canonical(bare.rstrip("/") or "/"):
            raise ValueError(f"{entry!r}: expected an absolute path without '*' (but a last '/*'), '.', '..', '//' or '%'")
        if any(bare == p or bare.startswith(p + "/") for p in GATEWAY_PATHS):
            raise ValueError(f"{entry!r}: the gateway answers that path itself")
        rules.append(PassRule(method, bare, rest))
    return tuple(rules)


def canonical(path: str) -> bool:
    """A path that means the same to every server: no dot segments, no empty segments, no
    backslash or control character, once percent-decoded too (a backend that decodes
    ``%2e%2e`` must not be led out of an allowed prefix)."""
    decoded = unquote(path)
    if "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return False
    return posixpath.normpath(decoded) == decoded and not decoded.startswith("//")


def disguised(path: str) -> bool:
    """A path that only once percent-decoded and normalised names one the gateway answers itself:
    it must not reach a backend as it is. A path that already is one of the gateway's endpoints,
    and the same one decoded (only its ids percent-encoded: a client's item id with a space or a
    non-ASCII letter, as the SDKs put it in ``…/items/{item_id}``), is none: the gateway answers
    it, and reads its ids decoded (``path_ids``)."""
    normal = posixpath.normpath(unquote(path)) if path else path
    normal = "/" + normal.lstrip("/")
    if normal == path:
        return False
    found = endpoint(path)
    if found is not None and endpoint(normal) == found:
        return False
    return any(normal == p or normal.startswith(p + "/") for p in GATEWAY_PATHS)


# query parameters that carry a key when a client puts one in a URL (never a Responses API parameter)
_CREDENTIAL_PARAM = re.compile(r"^(?:x-)?(?:api[-_]?key|key|access[-_]?token|token|auth|authorization|bearer|"
                               r"password|secret)$", re.I)
REDACTED = "[redacted]"


def without_credentials(target: str, secrets) -> str | None:
    """``target`` (a request's path and query) with every credential in it replaced by
    ``[redacted]``: the value of a query parameter named like one (``api_key``, ``key``,
    ``access_token``…), any of ``secrets`` (str) found in a part plain or percent-decoded, and
    any client key of the shape ``resp2chat keys`` makes (``clients.KEY_SHAPE``: the config holds
    only their hashes, so a path segment or an oddly named parameter would keep one); None when
    it holds none."""
    path, sep, query = target.partition("?")
    parts = [path] + (query.split("&") if sep else [])
    clean = [_without_secrets(p, secrets) for p in parts]
    for i, part in enumerate(clean[1:], 1):
        name, eq, value = part.partition("=")
        if eq and value and _CREDENTIAL_PARAM.match(unquote_plus(name)):
            clean[i] = f"{name}={REDACTED}"
    if clean == parts:
        return None
    return clean[0] + (sep + "&".join(clean[1:]) if sep else "")


def _without_secrets(part: str, secrets) -> str:
    """``part`` (the path or one ``name=value`` of the query) with each credential in it, a secret
    or a client key's shape, replaced by ``[redacted]`` where it is plain; one only there
    percent-encoded (or still there once the plain ones are out): all of the part."""
    def holds(text: str) -> bool:
        return KEY_SHAPE.search(text) is not None or any(s in text for s in secrets)

    if not (holds(part) or holds(unquote_plus(part))):
        return part
    for s in longest_first(tuple(secrets)):  # (the secrets first: one may hold a key's shape, which
        part = part.replace(s, REDACTED)  # would split it; the longest first: one may hold another)
    part = KEY_SHAPE.sub(REDACTED, part)
    return REDACTED if holds(unquote_plus(part)) else part


@dataclass(frozen=True)
class Route:
    """Who serves a request: ``own`` (the gateway's addons) or ``passthrough`` (the upstream)."""

    kind: str  # own | passthrough


OWN, PASSTHROUGH = Route("own"), Route("passthrough")


def route(method: str, path: str, rules: tuple[PassRule, ...]) -> Route | GatewayError:
    """``path`` without its query. The gateway's paths are answered by it (wrong method: 405);
    ``passthrough_paths`` go to the upstream (wrong method: 405); anything else is a 404."""
    allowed = OWN_METHODS.get(path)
    if allowed is None and (found := endpoint(path)) is not None:
        allowed = found[2]
    elif allowed is None and any(path == p or path.startswith(p + "/") for p in (*RESPONSES_PATHS, *CONVERSATIONS)):
        return GatewayError(f"{path[:200]} is no endpoint of this gateway's Responses or Conversations API",
                            param="path", code="unknown_path", status=404)
    if allowed is not None:
        return OWN if method in allowed else not_allowed(method, path, allowed)
    if canonical(path):
        decoded = unquote(path)
        matching = [r for r in rules if r.matches_path(path) and r.matches_path(decoded)]
        if any(r.method in (None, method) for r in matching):
            return PASSTHROUGH
        if matching:
            return not_allowed(method, path, tuple(dict.fromkeys(r.method for r in matching)), passthrough=True)
    return GatewayError(
        f"{path[:200]} is not served by this gateway: it answers /v1/responses and passes only the paths in "
        f"passthrough_paths to the upstream ({', '.join(_show(r) for r in rules) or 'none'})",
        param="passthrough_paths", code="unknown_path", status=404)


@dataclass
class NotAllowed(GatewayError):
    allow: str = ""  # the methods served there (the Allow header)


def not_allowed(method: str, path: str, allowed: tuple, passthrough: bool = False) -> NotAllowed:
    where = " (passthrough_paths)" if passthrough else ""
    return NotAllowed(f"{method[:20]} is not allowed on {path[:200]}{where}: {', '.join(allowed)}",
                      param="passthrough_paths" if passthrough else "method", code="method_not_allowed", status=405,
                      allow=", ".join(allowed))


def _show(rule: PassRule) -> str:
    return f"{rule.method + ' ' if rule.method else ''}{rule.path}{'*' if rule.rest else ''}"


# --- Host ---------------------------------------------------------------------------------


def host_name(value: str) -> str:
    """The host part of a ``Host`` header or an authority (port, brackets and a trailing dot off,
    lower case)."""
    value = value.strip()
    if value.startswith("["):
        return value[1:value.find("]")].lower() if "]" in value else value.lower()
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".").lower()


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def own_name(name: str, bind_host: str, public_hosts) -> bool:
    if not name:
        return False
    if is_ip(name) or name == "localhost" or name.endswith(".localhost"):
        return True
    if name == host_name(bind_host):
        return True
    for entry in public_hosts:
        entry = host_name(entry)
        if entry == "*" or entry == name or entry.startswith("*.") and name.endswith(entry[1:]):
            return True
    return False


def host_refusal(hosts: list[str | None], bind_host: str, public_hosts) -> GatewayError | None:
    """``hosts``: the ``Host`` header (and an absolute-form request's authority). None: missing."""
    for value in hosts:
        name = host_name(value or "")
        if not own_name(name, bind_host, public_hosts):
            shown = repr(value[:100]) if value else "(none)"
            return GatewayError(
                f"Host {shown} is not one of this gateway's names: it answers IP addresses, localhost and the "
                f"names in public_hosts ({', '.join(public_hosts) or 'none'})",
                param="public_hosts", code="host_not_allowed", status=403)
    return None


# --- Origin -------------------------------------------------------------------------------


def normal_origin(value: str) -> str:
    return value.strip().rstrip("/").lower()


def origin_allowed(origin: str, allowed_origins) -> bool:
    o = normal_origin(origin)
    return any(a.strip() == "*" or normal_origin(a) == o for a in allowed_origins)


def origin_refusal(origin: str | None, allowed_origins, fetch_site: str | None = None) -> GatewayError | None:
    """A request with an ``Origin`` comes from a web page: only the pages in ``allowed_origins``.
    A browser sends no ``Origin`` on a cross-site GET that needs no CORS (``<img src>``, ``<script
    src>``, a link followed): its ``Sec-Fetch-Site: cross-site`` (``fetch_site``) says it is
    another site's page all the same, refused unless ``allowed_origins`` has ``*``."""
    if origin is None:
        if (fetch_site or "").strip().lower() != "cross-site" or any(a.strip() == "*" for a in allowed_origins):
            return None
        return GatewayError(
            "requests from web pages are refused unless their origin is in allowed_origins (Sec-Fetch-Site: "
            "cross-site, without an Origin)", param="allowed_origins", code="origin_not_allowed", status=403)
    if origin_allowed(origin, allowed_origins):
        return None
    return GatewayError(
        f"requests from web pages are refused unless their origin is in allowed_origins (Origin: {origin[:100]!r})",
        param="allowed_origins", code="origin_not_allowed", status=403)


# --- Content type ----------------------------------------------------------------------------


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    return bool(kind) and (media == "application/json" or sub.endswith("+json") and "/" not in sub)


def content_type_refusal(content_type: str | None) -> GatewayError | None:
    """A turn (``POST /v1/responses``) is a JSON body. A missing content type is refused too: a
    browser's ``fetch`` of a binary body sends none without a preflight, and every client of
    this gateway says ``application/json``."""
    if is_json(content_type):
        return None
    shown = repr(content_type[:100]) if content_type else "none"
    return GatewayError(f"content-type {shown} is not accepted: send the request as application/json",
                        param="content-type", code="unsupported_media_type", status=415)
