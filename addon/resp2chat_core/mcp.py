"""Hosted MCP tools run by the gateway, sans I/O: one tool kind of the server-side tool loop.

A request's ``{"type": "mcp", "server_label", "server_url", "allowed_tools", "require_approval",
"headers"}`` tool names an MCP server; the gateway lists its tools, offers them to the model as
functions, runs the calls the model makes (resp2chat_io/relay/mcp.py talks to the server) and
answers the model with their results, in one turn (toolloop.py). What lives here:

- ``ServerSpec`` / ``parse_servers``: the ``mcp_servers`` setting, the servers the operator allows.
  A request reaches no other server: its tool names one by ``server_label`` or by its exact
  ``server_url``; anything else is a 400 (the gateway must never be a way to reach any URL).
- ``bind``: a request's mcp tools bound to those servers (``Server``: the operator's entry plus
  the request's label, allowed tools, approval rule and headers). A client's headers go to that
  server only; ``client_secrets`` are their values, which the gateway scrubs from what it records.
- ``functions``: a server's listed tools as chat functions, named ``mcp__<label>__<tool>``
  (sanitized, and made unique against the client's own tools and the other servers'), the same
  in every turn (a ``tool_choice``'s ``allowed_tools`` narrows what is offered, not the names).
- ``McpTools``: the tool kind the loop runs: which calls are the gateway's, whether a call needs
  the client's approval (``require_approval``), what goes back to the model.
- the items the client sees (``mcp_list_tools``, ``mcp_call``, ``mcp_approval_request``) and the
  history: what those items (and ``mcp_approval_response``) lower to (``lower_item``).

Theory of operation::

    first turn:  ListTools(server) ─▶ mcp_list_tools item ─▶ its tools offered as functions ─▶ round 1
    a round:     model calls mcp__s__t ─▶ approval needed? ── no ──▶ Call ─▶ mcp_call item ─▶ result to the model
                 (a tool no listing offers, s a server of the request: a refused Call, a failed mcp_call)
                                                   └── yes ─▶ mcp_approval_request item; the turn ends
    next turn:   mcp_approval_response approve ─▶ the call runs first (Call, an mcp_call item)
                                       deny    ─▶ the model is told so (lowered: a tool message)

A later turn of the conversation finds the ``mcp_list_tools`` item in its history (the items
``previous_response_id`` continues, or the client's input) and lists nothing again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import GatewayError
from .labels import HEADER_NAME, OPERATOR_NAME  # (a server label is an OPERATOR_NAME)
from .toolloop import rounds_of
from .toolmap import Target, chat_name, mcp_chosen

KIND = "mcp"  # the loop's name for this kind, and the Target kind of its functions
# Headers the MCP client writes itself (framing, hop-by-hop, the protocol's own): a client or the
# operator setting one would break the exchange or smuggle another request.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "proxy-connection", "proxy-authorization", "content-type", "content-encoding", "accept", "accept-encoding",
    "mcp-session-id", "mcp-protocol-version", "last-event-id"})
MAX_LISTED = 512  # tools of one server a listing keeps (more are dropped: a model cannot use thousands)
MAX_DESCRIPTION = 4096  # characters of a tool's description kept (its listing's, and what the model is offered)
MAX_LISTING = 1 << 20  # bytes of a listing's tools kept (their JSON): the tools past it are dropped, like past MAX_LISTED
MAX_PAGES = 64  # pages of a server's tools/list asked at most (the tools of the pages after are dropped, like past
# MAX_LISTED)
MAX_EMPTY_PAGES = 4  # pages in a row without a tool asked at most (a cursor that never ends): a listing that has no tool
# by then fails
DEFAULT_TIMEOUT = 30  # seconds one listing or call may take (timeout_secs)
MAX_HEADER_VALUE = 8192  # characters of one header value (a request's or the operator's) or a request's authorization at
# most: what common servers take in one header line (nginx's 8k); each is a secret the gateway scrubs, whose pattern
# (channel._spellings) costs time on the event loop as it grows
DEFAULT_OUTPUT_KB = 64  # KiB of one call's output kept and given to the model (max_output_kb)
_ENTRY = ("label", "url", "transport", "headers", "allowed_tools", "require_approval", "timeout_secs", "max_output_kb")
TRANSPORTS = ("streamable_http", "sse")  # the MCP HTTP transports: streamable HTTP, and the older HTTP+SSE

# --- the rules: allowed tools, approvals -----------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """Tools by name, or the read-only ones (their ``readOnlyHint``)."""

    names: frozenset[str] | None = None
    read_only: bool | None = None

    def matches(self, name: str, read_only: bool) -> bool:
        return (self.names is not None and name in self.names) or (self.read_only is True and read_only)


def parse_filter(value: Any, where: str) -> Filter | None:
    """``allowed_tools``: a list of names, ``{tool_names, read_only}``, or null (every tool)."""
    if value is None:
        return None
    if isinstance(value, list):
        value = {"tool_names": value}
    if not isinstance(value, dict) or set(value) - {"tool_names", "read_only"}:
        raise ValueError(f"{where}: expected a list of tool names or {{tool_names: [...], read_only: true}}")
    names = value.get("tool_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}.tool_names: expected a list of tool names")
    read_only = value.get("read_only")
    if read_only is not None and not isinstance(read_only, bool):
        raise ValueError(f"{where}.read_only: expected true or false")
    return Filter(frozenset(names) if names is not None else None, read_only)


@dataclass(frozen=True)
class Approval:
    """``require_approval``: ``always``, ``never``, or ``{always: filter, never: filter}``; a tool
    that matches neither filter follows ``default`` (a request's: always, as the API's default;
    the operator's: never)."""

    mode: str  # "always" | "never" | "filter"
    always: Filter | None = None
    never: Filter | None = None
    default: bool = True

    def needed(self, name: str, read_only: bool) -> bool:
        if self.mode != "filter":
            return self.mode == "always"
        if self.always is not None and self.always.matches(name, read_only):
            return True
        if self.never is not None and self.never.matches(name, read_only):
            return False
        return self.default


ALWAYS, NEVER = Approval("always"), Approval("never")


def parse_approval(value: Any, where: str, default: Approval) -> Approval:
    if value is None:
        return default
    if value in ("always", "never"):
        return ALWAYS if value == "always" else NEVER
    if not isinstance(value, dict) or not value or set(value) - {"always", "never"}:
        raise ValueError(f"{where}: expected always, never, or {{always: {{tool_names: [...]}}, never: {{...}}}}")
    return Approval("filter", parse_filter(value.get("always"), f"{where}.always"),
                    parse_filter(value.get("never"), f"{where}.never"), default.mode == "always")


def _sendable(value: str) -> bool:
    """Can an HTTP request carry ``value`` as a header's value (what the MCP client's sends:
    printable ASCII, spaces and tabs)?"""
    return all(c == "\t" or " " <= c <= "~" for c in value)


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping of header names to values")
    out = []
    for name, v in value.items():
        if not isinstance(name, str) or not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            raise ValueError(f"{where}: {str(name)[:64]!r} cannot be set: not a header name, or one the MCP "
                             "client writes itself (framing, hop-by-hop, content type, the MCP session)")
        if not isinstance(v, str) or not _sendable(v):
            raise ValueError(f"{where}: {name!r}: expected a one-line string value of printable ASCII")
        if len(v) > MAX_HEADER_VALUE:
            raise ValueError(f"{where}: {name!r}: a value of {len(v)} characters, more than the {MAX_HEADER_VALUE} "
                             "a header value may have")
        out.append((name, v))
    return tuple(out)


# --- the servers the operator allows (mcp_servers) ---------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One entry of ``mcp_servers``, validated. ``headers`` are secrets (never shown)."""

    label: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    allowed_tools: Filter | None = None  # None: every tool the server lists
    require_approval: Approval = NEVER  # the operator's floor: a request can ask for more approvals, not fewer
    timeout_secs: int = DEFAULT_TIMEOUT
    max_output_kb: int = DEFAULT_OUTPUT_KB
    transport: str = TRANSPORTS[0]

    def __repr__(self) -> str:  # never the headers
        return f"ServerSpec({self.label!r}, {self.url!r})"


def parse_servers(value: list) -> tuple[ServerSpec, ...]:
    """The ``mcp_servers`` setting; ``ValueError`` naming the entry and the field (never a
    header's value)."""
    from urllib.parse import urlsplit

    specs, labels, urls = [], set(), set()
    for i, entry in enumerate(value or ()):
        where = f"mcp_servers[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with label and url")
        unknown = sorted(set(entry) - set(_ENTRY))
        if unknown:
            raise ValueError(f"{where}.{str(unknown[0])[:64]}: unknown field (known: {', '.join(_ENTRY)})")
        label = entry.get("label")
        if not isinstance(label, str) or not OPERATOR_NAME.match(label):
            raise ValueError(f"{where}.label: expected a name of letters, digits, '_', '.', '-' (up to 64)")
        if label in labels:
            raise ValueError(f"{where}.label: another entry has the same label")
        url = entry.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{where}.url: expected the server's http:// or https:// URL (streamable HTTP), "
                             "e.g. http://127.0.0.1:3001/mcp")
        if url in urls:
            raise ValueError(f"{where}.url: another entry has the same url")
        transport = entry.get("transport", TRANSPORTS[0])
        if transport not in TRANSPORTS:
            raise ValueError(f"{where}.transport: expected streamable_http (the default) or sse (the older "
                             "HTTP+SSE transport: url is then the server's SSE endpoint)")
        labels.add(label)
        urls.add(url)
        numbers = {}
        for key, default, top in (("timeout_secs", DEFAULT_TIMEOUT, 3600), ("max_output_kb", DEFAULT_OUTPUT_KB, 16384)):
            n = entry.get(key, default)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
                raise ValueError(f"{where}.{key}: expected a whole number from 1 to {top}")
            numbers[key] = n
        specs.append(ServerSpec(label, url, _headers(entry.get("headers"), f"{where}.headers"),
                                parse_filter(entry.get("allowed_tools"), f"{where}.allowed_tools"),
                                parse_approval(entry.get("require_approval"), f"{where}.require_approval", NEVER),
                                **numbers, transport=transport))
    return tuple(specs)


def secret_values(value: list) -> list[str]:
    """The header values of ``mcp_servers`` entries (all of them are secrets)."""
    return [form for e in value or () if isinstance(e, dict) and isinstance(e.get("headers"), dict)
            for v in e["headers"].values() if isinstance(v, str) for form in _forms(v)]


def _forms(value: str) -> list[str]:
    """A secret header value, and the credential alone in an ``Authorization``-style value. (How
    an error's text may quote either, Python's ``repr`` in the SDK's or jsonschema's words,
    ``relay/mcp.py`` ``_schema_error``, ``channel.scrub`` knows, as for every secret.)"""
    scheme, _, credential = value.partition(" ")
    return [value, credential] if credential and scheme.lower() in ("bearer", "basic", "token") else [value]


# --- a request's mcp tools, bound to those servers ---------------------------------------------


@dataclass(frozen=True)
class Server:
    """A request's mcp tool bound to the operator's server it names."""

    label: str  # the request's server_label (what its items carry)
    spec: ServerSpec
    allowed: Filter | None = None  # the request's allowed_tools (None: all)
    approval: Approval = ALWAYS  # the request's require_approval (the API's default: always)
    client_headers: tuple[tuple[str, str], ...] = ()  # secrets: forwarded to this server only

    def __repr__(self) -> str:  # never the headers
        return f"Server({self.label!r} -> {self.spec.label!r})"

    def headers(self) -> dict[str, str]:
        """What the server gets: the client's headers, the operator's over them."""
        out = {k.lower(): v for k, v in self.client_headers}
        out.update((k.lower(), v) for k, v in self.spec.headers)
        return out

    def allows(self, name: str, read_only: bool) -> bool:
        return all(f is None or f.matches(name, read_only) for f in (self.spec.allowed_tools, self.allowed))

    def needs_approval(self, name: str, read_only: bool) -> bool:
        return self.spec.require_approval.needed(name, read_only) or self.approval.needed(name, read_only)

    def secrets(self) -> tuple[bytes, ...]:
        return tuple(form.encode() for _, v in (*self.client_headers, *self.spec.headers)
                     for form in _forms(v) if len(form) >= 4)


def _tool_secrets(tool: dict) -> list[str]:
    found = [tool["authorization"]] if isinstance(tool.get("authorization"), str) else []
    headers = tool.get("headers")
    if isinstance(headers, dict):
        found += [v for v in headers.values() if isinstance(v, str)]
    return [v for v in found if v]


def mcp_tools(tools: object) -> list[tuple[int, dict]]:
    """The request's ``{"type": "mcp"}`` tools (decoded JSON), with their places."""
    if not isinstance(tools, list):
        return []
    return [(i, t) for i, t in enumerate(tools) if isinstance(t, dict) and t.get("type") == KIND]


def client_secrets(raw: dict) -> tuple[str, ...]:
    """What a request's mcp tools carry for their servers only (``headers`` values and
    ``authorization``): never recorded, logged or shown (the gateway scrubs them)."""
    return tuple(v for _, t in mcp_tools(raw.get("tools")) for v in _tool_secrets(t))


def redacted_tools(tools: list) -> list:
    """The request's tools as a Response object echoes them: an mcp tool without what it carries
    for its server (``headers``, ``authorization``)."""
    return [{k: v for k, v in t.items() if k not in ("headers", "authorization")}
            if isinstance(t, dict) and t.get("type") == KIND else t for t in tools]


def redact_text(text: str, raw: dict) -> str:
    """A request's text (the body, a WebSocket message) without its mcp tools' secrets: each
    value's JSON string replaced by ``"[redacted]"``; a text where one cannot be found so (an
    escape spelt another way) becomes the request re-encoded with the secrets replaced."""
    found = client_secrets(raw)
    if not found:
        return text
    out = text
    for value in found:
        quoted = json.dumps(value, ensure_ascii=False)
        if quoted not in out:
            return json.dumps({**raw, "tools": _replaced(raw["tools"])}, ensure_ascii=False)
        out = out.replace(quoted, '"[redacted]"')
    return out


def _replaced(tools: list) -> list:
    out = []
    for t in tools:
        if isinstance(t, dict) and t.get("type") == KIND:
            t = dict(t)
            if isinstance(t.get("authorization"), str):
                t["authorization"] = "[redacted]"
            if isinstance(t.get("headers"), dict):
                t["headers"] = {k: "[redacted]" for k in t["headers"]}
        out.append(t)
    return out


def recorded_servers(raw: dict) -> tuple[ServerSpec, ...]:
    """The servers a recorded request's mcp tools named, each allowed (``resp2chat retranslate``
    lowers a recording again offline: nothing is reached, and the operator's list is not at hand)."""
    specs, seen = [], set()
    for _, tool in mcp_tools(raw.get("tools")):
        label, url = tool.get("server_label"), tool.get("server_url")
        if isinstance(label, str) and OPERATOR_NAME.match(label) and label not in seen:
            seen.add(label)
            specs.append(ServerSpec(label, url if isinstance(url, str) and url else f"recorded://{label}"))
    return tuple(specs)


def bind(tools: list[tuple[int, Any]], specs: tuple[ServerSpec, ...]) -> tuple[Server, ...]:
    """The request's mcp tools (validated models, with their places in ``tools``) bound to the
    operator's servers; ``GatewayError`` (400) for one the operator has not allowed."""
    servers: list[Server] = []
    labels: set[str] = set()
    by_label = {s.label: s for s in specs}
    by_url = {s.url: s for s in specs}
    for i, tool in tools:
        where = f"tools[{i}]"
        for field_ in ("connector_id", "tunnel_id"):
            if getattr(tool, field_, None):
                raise GatewayError(
                    f"{where}.{field_}: MCP connectors and tunnels are not supported: this gateway runs hosted MCP "
                    "tools only against the MCP servers its operator allows (mcp_servers); name one by server_label "
                    "or server_url", param=f"{where}.{field_}", code="unsupported_mcp_connector")
        label = tool.server_label
        if not OPERATOR_NAME.match(label):
            raise GatewayError(f"{where}.server_label: expected a name of letters, digits, '_', '.', '-' (up to 64)",
                               param=f"{where}.server_label", code="invalid_value")
        if label in labels:
            raise GatewayError(f"{where}.server_label: another mcp tool of this request has the label {label!r}",
                               param=f"{where}.server_label", code="invalid_value")
        spec = by_url.get(tool.server_url) if tool.server_url else by_label.get(label)
        if spec is None:
            allowed = ", ".join(sorted(by_label)) or "none"
            what = "this server_url" if tool.server_url else f"an MCP server labelled {label!r}"
            raise GatewayError(
                f"{where}: the operator of this gateway has not allowed {what} (mcp_servers allows: {allowed}); "
                "the gateway connects only to the MCP servers it is configured with, named by server_label or by "
                "their exact server_url", param=f"{where}.server_url" if tool.server_url else f"{where}.server_label",
                code="mcp_server_not_allowed")
        labels.add(label)
        try:
            allowed_tools = parse_filter(tool.allowed_tools, f"{where}.allowed_tools")
            approval = parse_approval(tool.require_approval, f"{where}.require_approval", ALWAYS)
            headers = _headers(tool.headers, f"{where}.headers")
        except ValueError as exc:
            param = str(exc).split(":", 1)[0]
            raise GatewayError(str(exc), param=param, code="invalid_value") from None
        if tool.authorization:
            if not _sendable(tool.authorization):
                raise GatewayError(f"{where}.authorization: expected a one-line token of printable ASCII",
                                   param=f"{where}.authorization", code="invalid_value")
            if len(tool.authorization) > MAX_HEADER_VALUE:
                raise GatewayError(f"{where}.authorization: a token of {len(tool.authorization)} characters, more than "
                                   f"the {MAX_HEADER_VALUE} a header value may have",
                                   param=f"{where}.authorization", code="invalid_value")
            headers = (*[(k, v) for k, v in headers if k.lower() != "authorization"],
                       ("authorization", f"Bearer {tool.authorization}"))
        servers.append(Server(label, spec, allowed_tools, approval, headers))
    return tuple(servers)


# --- the functions the model is offered --------------------------------------------------------


def read_only(tool: dict) -> bool:
    annotations = tool.get("annotations")
    return isinstance(annotations, dict) and annotations.get("readOnlyHint") is True


def base_name(label: str, tool: str) -> str:
    """The chat name of a server's tool before it is made unique: ``mcp__<label>__<tool>``."""
    return chat_name(tool, f"mcp__{label}__")


def functions(servers: tuple[Server, ...], listings: dict[str, tuple[dict, ...]],
              taken: set[str]) -> list[tuple[str, dict, Target]]:
    """The chat functions of the servers' listed tools (``listings``: label -> the listing's
    tools), the allowed ones, in the servers' order and the listing's; each name unique against
    ``taken`` (the client's tools, which keep theirs), which it joins; one per tool (a listing
    that names a tool twice offers its first). Pure: the same servers, listings and taken names
    give the same functions, whichever turn asks."""
    out = []
    for s in servers:
        made = set()
        for tool in listings.get(s.label) or ():
            name = tool.get("name")
            if not isinstance(name, str) or not name or name in made or not s.allows(name, read_only(tool)):
                continue
            made.add(name)
            cname = unique(base_name(s.label, name), taken)
            parameters = tool.get("input_schema")
            parameters = {k: v for k, v in parameters.items() if k != "$schema"} if isinstance(parameters, dict) \
                else {"type": "object", "properties": {}}
            fn: dict = {"name": cname}
            description = tool.get("description")
            if isinstance(description, str) and description:
                fn["description"] = description[:MAX_DESCRIPTION]
            fn["parameters"] = parameters
            out.append((cname, {"type": "function", "function": fn}, Target(KIND, name, s.label)))
    return out


def unique(name: str, taken: set[str]) -> str:
    found, n = name, 2
    while found in taken:
        suffix = f"_{n}"
        found = name[:64 - len(suffix)] + suffix
        n += 1
    taken.add(found)
    return found


def names_of(tool_map) -> dict[tuple[str, str], str]:
    """(server label, tool name) -> chat name, for the mcp functions of a tool map."""
    return {(t.namespace, t.name): cname for cname, t in tool_map.targets.items() if t.kind == KIND}


# --- the items the client sees -----------------------------------------------------------------


def listed_tool(name: str, description: str | None, input_schema: Any, annotations: Any) -> dict:
    """One tool of an ``mcp_list_tools`` item (its description cut to ``MAX_DESCRIPTION``)."""
    if isinstance(description, str):
        description = description[:MAX_DESCRIPTION]
    return {"name": name, "description": description, "input_schema": input_schema if isinstance(input_schema, dict)
            else {"type": "object", "properties": {}}, "annotations": annotations if isinstance(annotations, dict) else None}


def list_item(item_id: str, label: str, tools: tuple = (), error: str | None = None, status: str = "") -> dict:
    """``status`` (the Open Responses spec's extension items carry one): ``in_progress`` while it
    lists, else ``completed``, or ``failed`` with its ``error``."""
    item = {"id": item_id, "type": "mcp_list_tools", "status": status or ("failed" if error is not None else "completed"),
            "server_label": label, "tools": list(tools)}
    if error is not None:
        item["error"] = error
    return item


def call_item(item_id: str, label: str, name: str, arguments: str, status: str, output: str | None = None,
              error: dict | None = None, approval_request_id: str | None = None) -> dict:
    return {"id": item_id, "type": "mcp_call", "status": status, "server_label": label, "name": name,
            "arguments": arguments, "output": output, "error": error, "approval_request_id": approval_request_id}


def approval_item(item_id: str, label: str, name: str, arguments: str) -> dict:
    """(``status``: the Open Responses spec's extension items carry one; the request is made whole.)"""
    return {"id": item_id, "type": "mcp_approval_request", "status": "completed", "server_label": label, "name": name,
            "arguments": arguments}


LIST_EVENTS = ("response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed",
               "response.mcp_list_tools.failed")
CALL_EVENTS = ("response.mcp_call.in_progress", "response.mcp_call_arguments.delta",
               "response.mcp_call_arguments.done", "response.mcp_call.completed", "response.mcp_call.failed")


def error_text(error: dict | None) -> str:
    """A call's error as words (for the model, the log)."""
    if isinstance(error, str) and error:
        return error
    if not isinstance(error, dict):
        return "failed"
    if error.get("type") == "mcp_tool_execution_error":
        content = error.get("content")
        texts = [c.get("text") for c in content if isinstance(c, dict) and isinstance(c.get("text"), str)] \
            if isinstance(content, list) else []
        return "; ".join(texts) or "the tool reported an error"
    return str(error.get("message") or "failed")


def result_text(output: str | None, error: dict | str | None) -> str:
    """What the model reads of a call: its output, or why it failed."""
    if error:
        return f"Error: the MCP tool call failed: {error_text(error)}"
    return output or ""


def denied_text(reason: str | None) -> str:
    return "The user denied this tool call" + (f": {reason}" if reason else ".")


def answer_text(label: str, name: str, approve: bool) -> str:
    """The user's message an approval answer is lowered to when the conversation holds none
    before it (an input of only the request and its answer: ``lowering``): a chat template may
    refuse a conversation without a user message (Qwen3.5's: "No user query found")."""
    return f"{'I approve' if approve else 'I deny'} the call of the tool {name} of the MCP server {label}."


def output_text(content: list, structured: Any, limit: int) -> str:
    """A call's result content (MCP content blocks as dicts) as the text the model reads and the
    ``mcp_call`` item's ``output``: text blocks as they are, others described, at most ``limit``
    bytes (UTF-8; what is cut off is said)."""
    parts = []
    for block in content or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind == "resource" and isinstance(block.get("resource"), dict):
            res = block["resource"]
            parts.append(res["text"] if isinstance(res.get("text"), str) else f"[resource {res.get('uri', '')}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.get('uri', '')}]")
        else:
            parts.append(f"[{kind} content ({block.get('mime_type') or block.get('mimeType') or 'binary'})]")
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False))
    return bounded("\n".join(parts), limit)


def bounded(text: str, limit: int) -> str:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return kept + f"\n[output truncated: {len(data)} bytes, the gateway keeps {limit}]"


# --- the loop's steps ------------------------------------------------------------------------


@dataclass(frozen=True)
class ListTools:
    """List ``server``'s tools (its first turn in this conversation)."""

    server: Server


@dataclass(frozen=True)
class Call:
    """Run ``name`` on ``server`` with ``arguments`` (JSON text). ``call_id``: the model's call
    (its result goes back under it); ``approval_request_id``: the approval it runs on."""

    call_id: str
    server: Server | None  # None: the call names a server this request has no tool for (it fails)
    label: str
    name: str
    arguments: str
    approval_request_id: str | None = None
    refused: str | None = None  # why it fails without reaching the server (a tool no listing offers: McpTools.stray)


@dataclass(frozen=True)
class Approve:
    """The model's call needs the client's approval: an ``mcp_approval_request`` item, and the
    turn ends after this round. It runs nothing, and spends none of ``max_tool_calls``
    (toolloop.py): the turn that runs the call, approved, counts it."""

    spends = False  # (a class attribute: not a field)
    call_id: str
    label: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Pending:
    """An approved ``mcp_approval_request`` of the conversation that has not run yet."""

    request_id: str
    label: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Choice:
    """A request's ``tool_choice`` ``{"type": "mcp", "server_label", "name"}``: that tool's
    function, once its server's tools are listed."""

    label: str
    name: str


@dataclass
class McpTurn:
    """What a turn's lowering knows of its mcp tools: the servers, the listings its
    conversation holds (label -> tools), the chat names lowering gave their tools (chat name ->
    (label, tool)), the approved calls that have not run yet. ``tool_choice`` and
    ``parallel_tool_calls``: what round 1 gets once servers not listed yet are (a chat request
    has no tool choice without tools; lowering had none of theirs): the chat tool choice lowering
    made, or a ``Choice``; None: as lowering left it."""

    servers: tuple[Server, ...]
    listings: dict[str, tuple[dict, ...]] = field(default_factory=dict)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)
    pending: tuple[Pending, ...] = ()
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    taken: frozenset[str] | None = None  # the names of the request's other functions (all, before any narrowing)
    allowed: frozenset | None = None  # a tool_choice allowed_tools' mcp tools (toolmap.mcp_allowed); None: all

    @property
    def unlisted(self) -> tuple[Server, ...]:
        return tuple(s for s in self.servers if s.label not in self.listings)

    def secrets(self) -> tuple[bytes, ...]:
        return tuple(v for s in self.servers for v in s.secrets())


class McpTools:
    """The loop's mcp kind for one turn (toolloop.py): its functions, its steps, its results."""

    name = KIND

    def __init__(self, turn: McpTurn, max_rounds: int):
        self.turn = turn
        self.max_rounds = max_rounds
        self.servers = {s.label: s for s in turn.servers}
        self.listings = dict(turn.listings)
        self.names = dict(turn.names)  # chat name -> (label, tool name)
        self.tools = {(label, t.get("name")): t for label, tools in self.listings.items() for t in tools}
        self.rounds = 0

    def owns(self, name: str) -> bool:
        """The function is one of the servers' listed tools, or reads as one (``stray``): its
        call is the gateway's, never a function_call of a function the client did not declare."""
        return name in self.names or self.stray(name) is not None

    def stray(self, name: str) -> tuple[str, str] | None:
        """(label, tool) of a name no listing offers that reads as a tool of one of the
        request's servers, ``mcp__<label>__<tool>`` (the longest label that fits), and that is
        not a function the client declared: the model called a tool of a server whose listing
        failed, or one its server does not list (or allow). Such a call fails (``step``)."""
        if name in self.names or not name.startswith("mcp__") or (self.turn.taken and name in self.turn.taken):
            return None
        found = None
        for label in self.servers:
            prefix = chat_name("", f"mcp__{label}__")
            if len(name) > len(prefix) and name.startswith(prefix) and (found is None or len(prefix) > len(found[1])):
                found = (label, prefix)
        return (found[0], name[len(found[1]):]) if found else None

    def function_names(self) -> set[str]:
        return set(self.names)

    def prelude(self) -> list:
        """Before round 1: list the servers the conversation has not listed, run the calls the
        client approved."""
        return [ListTools(s) for s in self.turn.unlisted] + self.pending_calls()

    def begin(self, chat: dict, steps: list, results: list) -> dict:
        """Round 1's request with the prelude's results: the listed tools offered (``results``
        of a ``ListTools``: the listing's tools, None when it failed), the approved calls and
        their results (texts) after the conversation."""
        listed = False
        for step, result in zip(steps, results):
            if isinstance(step, ListTools) and result is not None:
                self.listed(step.server.label, tuple(result))
                listed = True
        if listed:
            tools = self.retools(chat.get("tools") or [])
            chat = {**chat, "tools": tools}
            if not tools:
                del chat["tools"]
            else:  # the model chooses in round 1: the client's tool choice, now that there are tools
                choice = self.turn.tool_choice
                if isinstance(choice, Choice):
                    names = {key: cname for cname, key in self.names.items()}
                    cname = names.get((choice.label, choice.name))  # (None: not listed, or not allowed)
                    choice = {"type": "function", "function": {"name": cname}} if cname else "auto"
                if choice is not None:
                    chat["tool_choice"] = choice
                if self.turn.parallel_tool_calls is not None:
                    chat["parallel_tool_calls"] = self.turn.parallel_tool_calls
        ran = [(step, text) for step, text in zip(steps, results) if isinstance(step, Call)]
        if ran:
            names = {key: cname for cname, key in self.names.items()}
            calls = [{"id": step.call_id, "type": "function", "function": {
                "name": chat_name_of(names, step.label, step.name), "arguments": step.arguments or "{}"}}
                for step, _ in ran]
            messages = list(chat["messages"])
            last = messages[-1] if messages else None
            if last is not None and last.get("role") == "assistant" and not last.get("tool_calls"):
                messages[-1] = {**last, "content": last.get("content") or None, "tool_calls": calls}
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            messages += [{"role": "tool", "tool_call_id": step.call_id, "content": text} for step, text in ran]
            chat = {**chat, "messages": messages}
        return chat

    def listed(self, label: str, tools: tuple[dict, ...]) -> None:
        """A listing came in (``ListTools``): its tools are offered from the next request on."""
        self.listings[label] = tools
        for t in tools:
            self.tools[(label, t.get("name"))] = t

    def retools(self, chat_tools: list[dict]) -> list[dict]:
        """The chat request's tools with every server's functions made again from the listings
        (the client's tools first, theirs after, as lowering puts them)."""
        own = [t for t in chat_tools if t.get("function", {}).get("name") not in self.names]
        # (named against all the request's functions, as lowering names them: a tool choice's
        # allowed_tools narrows what is offered, not the names)
        taken = set(self.turn.taken) if self.turn.taken is not None \
            else {t.get("function", {}).get("name") for t in own}
        made = functions(self.turn.servers, self.listings, taken)
        self.names = {cname: (target.namespace, target.name) for cname, _, target in made}
        allowed = self.turn.allowed
        return own + [definition for _, definition, target in made
                      if allowed is None or mcp_chosen(allowed, target.namespace, target.name)]

    def step(self, call_id: str, name: str, arguments: str) -> Call | Approve:
        if name not in self.names:  # (``stray``: it fails as an mcp_call, and the model reads why)
            label, tool = self.stray(name)
            why = f"MCP server {label}: " + (
                f"no tool {tool[:200]!r} of it was offered (its tools could not be listed: see its mcp_list_tools "
                "item's error)" if label not in self.listings else
                f"it lists no tool {tool[:200]!r} that this request allows")
            return Call(call_id, self.servers[label], label, tool, arguments, refused=why)
        label, tool = self.names[name]
        server = self.servers[label]
        listed = self.tools.get((label, tool)) or {}
        if server.needs_approval(tool, read_only(listed)):
            return Approve(call_id, label, tool, arguments)
        return Call(call_id, server, label, tool, arguments)

    def refuse(self, call_id: str, name: str, arguments: str, bound: str) -> Call:
        """A call the model made once ``bound`` (``max_tool_calls``, ``max_mcp_rounds``) was spent,
        its function no longer offered: a ``Call`` refused with why, a failed ``mcp_call`` that
        reaches no server (never a function_call of a function the client did not declare); the
        turn ends after its round unless another call of it ran (toolloop.py)."""
        label, tool = self.names.get(name) or self.stray(name)
        why = (f"Not run: this response's max_tool_calls was reached, and the model called {tool[:200]!r} of MCP "
               f"server {label} anyway" if bound == "max_tool_calls" else
               f"Not run: the {rounds_of(self.max_rounds)} of MCP tool calls this gateway runs in one response "
               f"(max_mcp_rounds) were spent, and the model called {tool[:200]!r} of MCP server {label} anyway")
        return Call(call_id, self.servers[label], label, tool, arguments, refused=why)

    def pending_calls(self) -> list[Call]:
        return [Call(p.request_id, self.servers.get(p.label), p.label, p.name, p.arguments, p.request_id)
                for p in self.turn.pending]


# --- the history: what the items lower to ------------------------------------------------------


def listings_of(items: list) -> dict[str, tuple[dict, ...]]:
    """The tools of the last successful ``mcp_list_tools`` item of each server in a conversation."""
    found: dict[str, tuple[dict, ...]] = {}
    for item in items:
        if getattr(item, "type", None) == "mcp_list_tools" and not item.error:
            found[item.server_label] = tuple(t for t in item.tools if isinstance(t, dict))
    return found


def pending_of(items: list, servers: tuple[Server, ...] = ()) -> tuple[Pending, ...]:
    """The approved ``mcp_approval_request``\\s of a conversation that no turn ran yet: none that an
    ``mcp_call`` ran, and none answered before an item a later turn made (``_later``: the model's
    or the gateway's, not of the turn that asked) — the turn that got the answer ran the call
    first, and a client that sends the conversation back without that ``mcp_call`` does not run
    it again. ``GatewayError`` for a
    response to a request the conversation does not hold, an approval of a call on a server the
    request (``servers``: its mcp tools) has no tool for, or of one for a tool its server does
    not allow: a request item is the client's word (it may send any), and an approval never runs
    more than a model's call could."""
    requests, ran, approved = {}, set(), {}
    later = _later(items)
    for i, item in enumerate(items):
        kind = getattr(item, "type", None)
        if kind == "mcp_approval_request":
            requests[item.id] = item
        elif kind == "mcp_call" and item.approval_request_id:
            ran.add(item.approval_request_id)
        elif kind == "mcp_approval_response":
            if item.approval_request_id not in requests:
                raise unknown_request(item.approval_request_id)
            if later(i, requests[item.approval_request_id].id):  # (a turn ran after it: the call ran then)
                ran.add(item.approval_request_id)
            if item.approve and item.approval_request_id not in approved:  # (it answers the last one before it)
                approved[item.approval_request_id] = requests[item.approval_request_id]
    pending = tuple(Pending(r, asked.server_label, asked.name, asked.arguments)
                    for r, asked in approved.items() if r not in ran)
    by_label, listings = {s.label: s for s in servers}, listings_of(items)
    for p in pending:
        server = by_label.get(p.label)
        if server is None:
            raise GatewayError(f"mcp_approval_response: approval_request_id {str(p.request_id)[:200]!r} approves a "
                               f"call of MCP server {str(p.label)[:200]!r}, and tools has no mcp tool with that "
                               "server_label to run it on (a request's tools are its own: send the mcp tool again)",
                               param="tools", code="invalid_value")
        listed = next((t for t in listings.get(p.label, ()) if t.get("name") == p.name), {})
        if not server.allows(p.name, read_only(listed)):
            raise GatewayError(f"mcp_approval_response: approval_request_id {str(p.request_id)[:200]!r} asks to run "
                               f"{str(p.name)[:200]!r}, a tool of server {p.label!r} that allowed_tools (the "
                               "request's or the operator's) does not allow", param="input", code="invalid_value")
    return pending


# the items a turn makes (the model's, the gateway's), besides an assistant message
_TURN_ITEMS = frozenset({"reasoning", "function_call", "custom_tool_call", "local_shell_call", "tool_search_call",
                         "web_search_call", "mcp_list_tools", "mcp_call", "mcp_approval_request", "compaction"})


def _made(item) -> bool:
    """Did a turn make ``item`` (an input item): the model's answer or call, the gateway's item?"""
    kind = getattr(item, "type", None)
    return kind in _TURN_ITEMS or (kind in ("message", None) and getattr(item, "role", None) == "assistant")


def _turn_of(item_id) -> str | None:
    """The response an item id of the gateway's names (``<kind>_<response>_<index>``), or None."""
    parts = item_id.split("_") if isinstance(item_id, str) else ()
    return parts[1] if len(parts) == 3 and parts[1] and parts[2].isdigit() else None


def _later(items: list):
    """``later(i, request_id)``: is there, after ``items[i]``, an item a turn made (``_made``) that
    is not of the turn that made the request ``request_id`` (a client may put its answer right
    after the request, before the other items of that turn); an item whose turn is not known
    (no id of the gateway's) is a later turn's. Linear: what follows each place is summed up once
    (the turn of the nearest made item after it, and whether another turn's follows too)."""
    after: list[tuple[bool, str | None, bool]] = [(False, None, False)] * (len(items) + 1)
    for i in range(len(items) - 1, -1, -1):
        made, nearest, mixed = after[i + 1]
        if _made(items[i]):
            turn = _turn_of(getattr(items[i], "id", None))
            mixed = mixed or (made and (turn is None or turn != nearest))
            made, nearest = True, turn
        after[i] = (made, nearest, mixed)

    def later(i: int, request_id: str) -> bool:
        made, nearest, mixed = after[i + 1]
        asked = _turn_of(request_id)
        return made and (mixed or nearest is None or asked is None or nearest != asked)

    return later


def unknown_request(request_id: str) -> GatewayError:
    return GatewayError(f"mcp_approval_response: approval_request_id {str(request_id)[:200]!r} names no "
                        "mcp_approval_request of this conversation (send the request item with it, or continue "
                        "the response that made it with previous_response_id)",
                        param="input", code="invalid_value")


def chat_name_of(names: dict[tuple[str, str], str], label: str, tool: str) -> str:
    return names.get((label, tool)) or base_name(label, tool)
