"""The gateway's settings: one table, one resolution rule, no I/O.

Every field exists in three places with one name: the YAML file (``upstream_base_url``), the
environment (``RESP2CHAT_UPSTREAM_BASE_URL``) and a mitmproxy option
(``--set resp2chat_upstream_base_url=…``). Precedence is ``--set`` > environment > file >
default. The addon gets there by declaring each option with *environment-or-file* as its
default, so mitmproxy's own ``--set`` handling supplies the top layer.

Secrets (``SECRET_FIELDS``) are the exception: their option default stays empty, because
option defaults are shown by ``mitmdump --options`` and in mitmweb's options editor. The addon
resolves them itself (``--set`` value, else environment, else file). Which fields are secrets,
and ``SettingsError`` (which never shows one), are in settings_error.py: clients.py raises it
while it validates an entry of ``clients``, for ``validate`` here, without importing this table.

Each field names its ``owner``: the addon (resp2chat_io/addons/) that declares its option and
hands it on to its consumer under the same name. A renamed field keeps its old name as an alias
that is still read in all three places, with a deprecation note; beside the new name in the
same place, it is ignored (with a warning: ``shadowed``), the new name wins.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from .clients import parse_clients
from .gate import DEFAULT_PASSTHROUGH, parse_passthrough
from .head_deadline import MIN_BODY_RATE
from .labels import HEADER_NAME, OPERATOR_NAME
from .mcp import parse_servers as parse_mcp_servers, secret_values as mcp_secret_values
from .settings_error import ENTRY_SECRETS, HOLDS_SECRETS, SECRET_FIELDS, SettingsError  # (S.SettingsError…)
from .sse import MAX_EVENT
from .think import MODES as THINK_MODES


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # str | int | bool | map | list | entries (a list of mappings: upstreams)
    default: Any
    help: str
    env_fallbacks: tuple[str, ...] = ()
    owner: str = ""  # the addon that declares the option (resp2chat_io/addons/): see OWNERS
    aliases: tuple[str, ...] = ()  # old names, still read (file, environment, --set) with a warning
    per_upstream: bool = False  # an entry of ``upstreams`` may set its own value (``UpstreamSpec``)

    @property
    def env(self) -> str:
        return "RESP2CHAT_" + self.name.upper()

    @property
    def option(self) -> str:
        return "resp2chat_" + self.name


# where turns go with no upstream configured and no --mode reverse target (the CLI's `start`
# serves the demo upstream when nothing answers there)
DEFAULT_UPSTREAM = "http://127.0.0.1:8000/v1"

# one request body's bound, and all bodies arriving at once: eight of the largest (gate.BodyBudget)
MAX_REQUEST_BODY_MB = 32
MAX_REQUEST_BODIES_MB = 8 * MAX_REQUEST_BODY_MB
# the gateway's own large answers waiting for their clients at once (gate.BodyBudget again)
MAX_ANSWERS_WAITING_MB = MAX_REQUEST_BODIES_MB


def first_upstream_entry(values: dict) -> dict | None:
    """The first of ``upstreams`` when the gateway goes there (no ``upstream_base_url`` beside
    them: the gateway refuses both), else None. The one place that decides it: the base URL
    (``first_upstream``), the key and the models the ``resp2chat`` command uses come from it."""
    entries = values.get("upstreams") or []
    if values.get("upstream_base_url") or not isinstance(entries, list) or not entries:
        return None
    return entries[0] if isinstance(entries[0], dict) else None


def first_upstream(values: dict) -> str:
    """The base URL a gateway with these settings is started toward (mitmproxy's reverse target,
    what the ``resp2chat`` command lists models from): ``upstream_base_url``, else the first of
    ``upstreams`` (routing.py picks per model), else ``DEFAULT_UPSTREAM`` (also for ``demo``)."""
    url = values.get("upstream_base_url") or (first_upstream_entry(values) or {}).get("base_url") or ""
    return url if url and url != "demo" else DEFAULT_UPSTREAM


FIELDS: tuple[Field, ...] = (
    Field("bind_addr", "str", "127.0.0.1:4000", "Address the gateway listens on (host:port). Binding beyond loopback requires gateway_api_key.", owner="listen"),
    Field("upstream_base_url", "str", "", "Chat Completions base URL, e.g. http://127.0.0.1:8000/v1 (may carry a path prefix: requests go to {base}/chat/completions). "
              f"Empty: the --mode reverse target plus /v1, else {DEFAULT_UPSTREAM}. 'demo' runs the bundled demo upstream.", owner="upstreams"),
    Field("upstream_api_key", "str", "", "Key sent upstream as 'Authorization: Bearer …'. Never logged or saved.", ("OPENAI_API_KEY",), owner="upstreams"),
    Field("upstream_model", "str", "", "Send this model name upstream whatever the client asks for (after model_map).", owner="lowering", per_upstream=True),
    Field("model_map", "map", {}, "Rename models on the way upstream: {client_model: upstream_model}.", owner="lowering", per_upstream=True),
    Field("tool_denylist", "list", [], "Tool names removed before the upstream sees them (Responses or flattened chat names).", owner="lowering", per_upstream=True),
    Field("upstream_extra_params", "map", {}, "JSON object merged into every chat request (e.g. {\"chat_template_kwargs\": {\"enable_thinking\": false}}).", owner="lowering", per_upstream=True),
    Field("drop_upstream_params", "list", [], "Chat request keys removed before sending (e.g. stream_options, parallel_tool_calls for backends that reject them).", owner="lowering", per_upstream=True),
    Field("model_extra_params", "map", {}, "Per upstream model: a JSON object merged after upstream_extra_params (one level deep), e.g. {\"qwen3\": {\"chat_template_kwargs\": {\"enable_thinking\": true}}}.", owner="lowering", per_upstream=True),
    Field("max_tokens_field", "str", "max_tokens", "Where max_output_tokens goes upstream: max_tokens or max_completion_tokens.", owner="lowering", per_upstream=True),
    Field("reasoning_effort_map", "map", {}, "Rename reasoning efforts for the backend, e.g. {\"minimal\": \"low\", \"xhigh\": \"high\"}; \"\" drops it.", owner="lowering", per_upstream=True),
    Field("history_reasoning_field", "str", "reasoning_content", "Key that carries earlier reasoning on assistant messages: reasoning_content, reasoning (newer vLLM, Ollama) or none (Groq, Mistral reject it).", owner="lowering", per_upstream=True),
    Field("think_tags", "map", {}, "<think> tags in content, per upstream model (\"*\" for all): auto (split tags), open (the template already opened <think>: DeepSeek-R1, QwQ), off.", owner="lowering", per_upstream=True),
    Field("flatten_content", "bool", True, "Send text-only message content as a plain string (every chat template accepts it).", owner="lowering", per_upstream=True),
    Field("forward_client_auth", "bool", False, "Forward the client's Authorization header upstream when no upstream_api_key is set.", owner="upstreams"),
    Field("upstream_idle_timeout_secs", "int", 60, "No upstream bytes for this long (before or during the answer): the turn fails (response.failed: error type upstream_timeout, code server_error) and the upstream request is dropped; before the first byte, the next upstream is tried. A passthrough_paths call without its answer's head within connect_timeout_secs + this of its being sent: a 504 upstream_timeout; its body bringing nothing for this long: cut. 0: no limit.", aliases=("request_timeout_secs",), owner="upstreams", per_upstream=True),
    Field("upstream_data_timeout_secs", "int", 300, "Only SSE comments and no stream data from the upstream for this long (before or during the answer): the turn fails (response.failed: error type upstream_timeout, code server_error) and the upstream request is dropped; when no data came at all, the next upstream for the model is tried first (comments are no answer: they are not passed on). SSE comments (`: keep-alive`, OpenRouter's `: OPENROUTER PROCESSING` while a request is queued) keep the connection from upstream_idle_timeout_secs but are not data: a backend that sends only them holds a turn this long at most (silence without comments is upstream_idle_timeout_secs' alone). Meanwhile the client gets keepalive_secs events. 0: no limit.", owner="upstreams", per_upstream=True),
    Field("connect_timeout_secs", "int", 10, "Upstream connect timeout.", owner="upstreams", per_upstream=True),
    Field("keepalive_secs", "int", 15, "While the upstream has sent no data yet (long prefill, a request queued: SSE comments are no data), or a tool the gateway runs (web search, hosted MCP) runs, send the client a data event this often (Codex's idle timer ignores SSE comments).", owner="upstreams", per_upstream=True),
    Field("coalesce_ms", "int", 40, "Once a turn's first tokens are out, the gateway passes the backend's news on at most once per this many milliseconds: a model streaming faster than that has several tokens share one pass through mitmproxy (HTTP: one chunk; WebSocket: one round of messages, deltas merged), so it costs less CPU per token, and each token waits at most this long (at 50 tokens/s and 40 ms: two tokens a pass, 40 ms apart instead of 20). A slower stream is never held, nor are the first token and the response's first events; a stream that goes on past a held pass is read from its socket once per window (the kernel keeps its tokens meanwhile, no loop wake-up per token), so its end may wait up to this long too, where a burst that ends within its first window goes at once. 0: every backend read at once. At most 1000.", owner="upstreams"),
    Field("upstream_headers", "map", {}, "Extra headers sent upstream with every chat request and passthrough call (the model list, embeddings, passthrough_paths), e.g. {\"HTTP-Referer\": \"https://app.example\", \"api-key\": \"…\"} (OpenRouter's attribution, Azure's key header). Values of headers named like a credential (key, token, secret, auth…) are secrets: hidden and scrubbed like the others. Not hop-by-hop or framing headers, nor authorization (use api_key).", owner="upstreams", per_upstream=True),
    Field("max_upstream_event_mb", "int", MAX_EVENT >> 20, "A backend's SSE line or event larger than this ends the turn with response.failed (error type upstream_event_too_large, code server_error) and the upstream request is dropped: what a backend sends cannot grow the gateway's memory. 8 × this bounds a turn's answer, however it comes (upstream_output_too_large): its output held from a stream, or the one JSON body of a backend that ignores stream. A backend's model list or tokenizer answer is read up to 1 × this. At least 1.", owner="upstreams"),
    Field("max_request_body_mb", "int", MAX_REQUEST_BODY_MB, "Larger Responses requests are refused with 413.", owner="gate"),
    Field("max_request_bodies_mb", "int", MAX_REQUEST_BODIES_MB, "Request bodies the gateway receives at once, all clients together (this replica): their declared sizes (content-length), from each head until its body is in, at most this many MiB. A request whose body would go past it is refused at its head, its body unread, with 503 server_overloaded and retry-after (the openai SDK and Codex retry); one body is always let in when no other is arriving. Bodies arriving just above the minimum rate (min_request_body_rate_kb) can otherwise make the gateway hold any number of them. Default: 8 × the default max_request_body_mb. 0: no cap.", owner="gate"),
    Field("max_input_items", "int", 50000, "Input items one request (HTTP body or WebSocket message) may hold; more: a 400 at once, before the request is validated. 0: no cap.", owner="gate"),
    Field("max_tools", "int", 2000, "Tools one request may hold (its tools, each namespace's tools, additional_tools items); more: a 400. 0: no cap.", owner="gate"),
    Field("max_content_parts", "int", 100000, "Content parts (text, images, tool output parts) all input items of one request may hold together; more: a 400. 0: no cap.", owner="gate"),
    Field("max_replay_entries", "int", 1000, "Replay cache capacity (identical requests answered without the upstream); 0 disables.", owner="replay"),
    Field("upstream_request_log_path", "str", "", "Append every chat request sent upstream to this JSONL file (no headers, no keys).", owner="request_log"),
    Field("brave_api_key", "str", "", "Brave Search API key: enables the proxy-side web_search tool.", ("BRAVE_SEARCH_API_KEY",), owner="web_search"),
    Field("brave_base_url", "str", "https://api.search.brave.com", "Brave Search API base URL.", owner="web_search"),
    Field("brave_max_results", "int", 5, "Search results given to the model per web search.", owner="web_search"),
    Field("max_web_search_rounds", "int", 5, "Web searches the gateway runs at most within one turn.", owner="web_search"),
    Field("mcp_servers", "entries", [], "MCP servers a request's hosted mcp tool may use (the gateway lists and calls their tools itself): a list of {label, url, transport, headers, allowed_tools, require_approval, timeout_secs, max_output_kb}. A request names one by label or by its exact url; any other server_url is refused. transport: streamable_http (default) or sse (the older HTTP+SSE transport; url is its SSE endpoint). headers go to that server only (secrets: hidden and scrubbed like keys); allowed_tools (a list of names) narrows what requests may use; require_approval (always, never, or {always: {tool_names: […]}, never: {…}}; default never) is a floor: a request may ask for more approvals, not fewer; timeout_secs (default 30) bounds each listing and call; max_output_kb (default 64) what the model gets of a result. Empty: requests with mcp tools are refused.", owner="mcp"),
    Field("max_mcp_rounds", "int", 8, "Rounds of MCP tool calls the gateway runs at most within one turn; the round after the last offers the model no MCP tool (a call it makes of one anyway is a failed mcp_call, and the turn ends).", owner="mcp"),
    Field("session_ttl_hours", "int", 168, "Stored responses (previous_response_id) expire after this many hours.", owner="store"),
    Field("max_sessions", "int", 256, "Stored responses kept at most, conversations and background responses included, all clients together (replicas sharing Redis: all of them). Past it, the client (owner) holding the most entries loses its oldest.", owner="store"),
    Field("max_session_memory_mb", "int", 512, "Memory the stored responses may use at most, all clients together. Past it, the client (owner) holding the most bytes loses its oldest entry.", owner="store"),
    Field("session_store_dir", "str", "", "Also keep stored responses in this directory (0600 files) so previous_response_id survives a restart; empty: memory only.", owner="store"),
    Field("responses_websocket", "bool", True, "Serve the Responses WebSocket transport at /v1/responses (Codex's built-in provider; a custom provider with supports_websockets = true). Off: an upgrade is refused at once with 426 and clients use HTTP.", owner="websocket"),
    Field("max_websockets", "int", 256, "Responses WebSockets open at once on this gateway (this replica), all clients together (and a keyless gateway's); past it an upgrade is refused with 503 server_overloaded and retry-after, and Codex uses HTTP. Each socket may hold up to max_request_body_mb of conversations and its flow's records (up to 80 MiB). A client's own cap is its max_sockets (clients). 0: no cap.", owner="websocket"),
    Field("seal_key", "str", "", "Secret that seals the encrypted_content the gateway hands clients (reasoning, compaction) so only it can read them back; replicas that share state need the same one. Empty: a random per-install key in seal.key beside the config file.", owner="lowering"),
    Field("gateway_api_key", "str", "", "Clients must present this key (Authorization: Bearer …); required when bind_addr is not loopback.", owner="gate"),
    Field("upstreams", "entries", [], "Several upstreams, in order: each {name, base_url, api_key, models: [glob…]} plus any per-backend lowering setting (max_tokens_field, think_tags, model_map…). A model goes to the first upstream whose models match; later matches are its fallbacks (tried on connect failure, 5xx, 429 or a conversation too long for its context, before the first byte). Empty: upstream_base_url alone.", owner="upstreams"),
    Field("routing_key_header", "str", "", "Send the session key (prompt_cache_key, else Codex's session header) upstream in this header, e.g. x-smg-routing-key, so a cache-aware router keeps each session on the replica holding its KV cache. Empty: off.", owner="upstreams"),
    Field("state_store_url", "str", "", "Where stored responses and the replay cache live: empty for this process's memory, or redis://[:password@]host:port/db (also Valkey) so replicas share them. Never logged.", owner="store"),
    Field("access_log_path", "str", "", "Append one JSON line per turn (time, session, model, upstream, status, tokens, TTFT and total ms; no content, no secrets) to this file; '-' for stderr. Empty: off.", owner="access_log"),
    Field("passthrough_paths", "list", list(DEFAULT_PASSTHROUGH), "What the gateway passes to the upstream besides turns, with the upstream key: '[METHOD] /path' entries, a last '/*' for any path below (e.g. 'GET /v1/models/*'). Exact, case-sensitive paths; anything else is a 404.", owner="gate"),
    Field("allowed_origins", "list", [], "Web pages (origins such as https://app.example.com; '*' for any) allowed to call the gateway from a browser. A request with any other Origin header is refused with 403; command-line clients and SDKs send none.", owner="gate"),
    Field("public_hosts", "list", [], "Host names clients may reach the gateway by besides IP addresses, localhost and the bind address (e.g. gw.example.com, *.corp.example; '*' for any). Any other Host is refused with 403 (DNS rebinding).", owner="gate"),
    Field("tls_cert_file", "str", "", "Serve HTTPS with this certificate (PEM, chain after it); with tls_key_file. Plain HTTP is then refused (but /healthz).", owner="listen"),
    Field("tls_key_file", "str", "", "The private key (PEM) of tls_cert_file.", owner="listen"),
    Field("header_timeout_secs", "int", 30, "A client connection must send a whole request head within this many seconds of connecting, or of the end of its previous answer (keep-alive); else it is closed, without an answer (clients open a new one). A request under way (a long stream) and a WebSocket have no such deadline; but a client that takes none of an answer waiting for it for this long is closed too (its turn ends, the backend call is dropped), and so is one whose request body, arriving, brings less than min_request_body_rate_kb (4 KiB/s) over the last this many seconds. At most 1000 connections wait for a head at once (past that the oldest waiting one is closed). 0: no deadline (mitmproxy's tcp_timeout, 600 s of silence, remains). A load balancer keeping idle connections to the gateway must drop them sooner than this (deploy/nginx.conf: keepalive_timeout 20s).", owner="connections"),
    Field("min_request_body_rate_kb", "int", MIN_BODY_RATE >> 10, "KiB a second a request body must bring, over each header_timeout_secs once that long passed since its head, while it arrives; else its connection is closed, without an answer, and what it held let go (an honest upload at least that fast is never cut, however long). The same rate bounds how slowly a client may take a large answer the gateway built itself (max_answers_waiting_mb): one taking less over the last header_timeout_secs is closed, so a genuinely slower link cannot read a large page (it can read smaller ones: limit). 0: no minimum rate (header_timeout_secs 0 has none either).", owner="connections"),
    Field("max_answers_waiting_mb", "int", MAX_ANSWERS_WAITING_MB, "Large answers the gateway builds itself (a stored response, its input items, a conversation or its items page, a non-streamed turn's Response; each of 64 KiB or more, or behind another still waiting on its connection: other small ones are not counted) waiting for their clients to take them, all clients together (this replica), at most this many MiB: each is counted from its answer until it has left the socket's write buffer (or its connection closes). A read (GET) whose answer would go past it is refused with 503 server_overloaded and retry-after (the openai SDK and Codex retry); one is always let out when no other waits. A turn's Response, which the client paid the backend for, is counted but never refused; a request that changes something (a conversation's items added, a deletion, a cancellation) is refused before its work while the budget is taken, and its answer then counted, never refused. With several clients, one client holds at most half (a 429 past it). Without it, clients reading a large page a few bytes at a time held it in the gateway's memory, each (min_request_body_rate_kb cuts such a reader after a window or two; this bounds what they hold meanwhile). Default: as max_request_bodies_mb. 0: no cap.", owner="connections"),
    # --- clients (issue 23): who may call the gateway, each with its own key -------------------
    Field("clients", "entries", [], "The gateway's clients, each with its own key: a list of {name, id, key | key_sha256, models: [glob…], rpm, tpm, max_streams, max_sockets} (rpm: requests per minute that make a backend work: turns, passthrough calls but reads, input_tokens; tpm: backend tokens per minute, prompt + output; max_streams: such requests open at once; max_sockets: Responses WebSockets open at once, on each replica; a limit left out is none). A plain key is hashed at load; `resp2chat keys add NAME` stores only key_sha256, and a random id: the identity that owns what the client stores, kept by `keys rotate` (an entry without one is owned by its name). gateway_api_key, when set, is one more client named default.", owner="gate"),
)

BY_NAME = {f.name: f for f in FIELDS}
ALIASES = {old: f for f in FIELDS for old in f.aliases}  # old name -> its field
PER_UPSTREAM = tuple(f.name for f in FIELDS if f.per_upstream)  # what an ``upstreams`` entry may set for itself
# (jwt, assertion: Cloudflare Access's Cf-Access-Jwt-Assertion, Google IAP's X-Goog-Iap-Jwt-Assertion)
_CREDENTIAL = re.compile(r"(?i)key|token|secret|auth|password|cookie|signature|jwt|assertion|credential")


def hidden_default(name: str) -> bool:
    """The option's default stays empty (mitmdump --options and mitmweb show defaults)."""
    return name in SECRET_FIELDS or name in HOLDS_SECRETS


def credential_header(name: str) -> bool:
    """A header (of ``upstream_headers``) whose value is a secret: named like a credential."""
    return bool(_CREDENTIAL.search(name))


MIN_SECRET = 6  # characters: a shorter secret is not scrubbed from text (it would mangle it)


def secret_values(values: Mapping[str, Any], min_len: int = MIN_SECRET) -> tuple[bytes, ...]:
    """Every configured secret in ``values`` (top-level keys, each upstream's api_key, each
    client's plain key, the credential-like ``upstream_headers`` at the top and per upstream, the
    headers of ``mcp_servers``), to be scrubbed from what the gateway emits. Shorter ones are not scrubbed (they would mangle
    text)."""
    found = [values[k] for k in sorted(SECRET_FIELDS) if k in values]
    found += [e.get(key) for name, key in ENTRY_SECRETS.items() for e in values.get(name) or () if isinstance(e, dict)]
    scopes = [values] + [e for e in values.get("upstreams") or () if isinstance(e, dict)]
    found += [v for scope in scopes for k, v in (scope.get("upstream_headers") or {}).items()
              if isinstance(k, str) and credential_header(k)]
    found += mcp_secret_values(values.get("mcp_servers"))
    return tuple(v.encode() for v in found if isinstance(v, str) and len(v) >= min_len)


def owned_by(owner: str) -> tuple[Field, ...]:
    """The fields whose options ``owner`` (an addon of resp2chat_io/addons/) declares."""
    return tuple(f for f in FIELDS if f.owner == owner)


def unknown_setting(name: str, prefix: str = "") -> str:
    """Why NAME is refused, wherever it was given (the config file, ``--set``, ``start()``): the
    setting it may have meant (as typed there: ``prefix``, e.g. ``resp2chat_`` for a mitmproxy
    option), never its value (a misspelled name may hold a secret: ``upstream_api_ky: sk-…``)."""
    near = difflib.get_close_matches(str(name), BY_NAME, 1)
    return "unknown setting " + (f"(did you mean {prefix}{near[0]}?)" if near else "(README: Configuration lists them)")


def deprecated(old: str) -> str:
    new = ALIASES[old].name
    return f"{old} is deprecated: it is now called {new} (the old name still works)"

# a whole-number setting at most (as a client's limits: clients.py MAX_LIMIT): hours, seconds, MiB past it
# no longer fit a float or a C timeout (a store's expiry of every turn failed)
MAX_WHOLE = 10**12
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def coerce_bool(value: Any) -> bool | None:
    """True or false as a bool setting reads it (``coerce``): a bool, or text such as ``yes``,
    ``on``, ``1`` (``no``, ``off``, ``0``, blank: false); None when it says neither."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return text in _TRUE if text in _TRUE or text in _FALSE else None


_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})\Z")


def coerce(field: Field, value: Any, source: str = "") -> Any:
    """Parse a value from YAML (typed) or the environment (a string) into the field's kind."""
    k = field.kind
    try:
        if k == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise SettingsError(field.name, value, "expected a string", source)
            return str(value)
        if k == "int":
            if isinstance(value, bool):
                raise SettingsError(field.name, value, "expected a whole number", source)
            try:
                number = int(value, 10) if isinstance(value, str) else value
            except ValueError:  # (Python's words, "invalid literal for int() with base 10", are no help)
                raise SettingsError(field.name, value, "expected a whole number >= 0", source) from None
            if not isinstance(number, int) or number < 0:
                raise SettingsError(field.name, value, "expected a whole number >= 0", source)
            if number > MAX_WHOLE:
                raise SettingsError(field.name, value, f"expected a whole number >= 0, at most {MAX_WHOLE:,}", source)
            return number
        if k == "bool":
            if (switch := coerce_bool(value)) is None:
                raise SettingsError(field.name, value, "expected true or false", source)
            return switch
        if k == "map":  # ("": none, as --set's empty value is)
            data = (json.loads(value) if value.strip() else {}) if isinstance(value, str) else value
            if not isinstance(data, dict):
                raise SettingsError(field.name, value, "expected a mapping (YAML) or a JSON object", source)
            if (why := _not_json(data)) is not None:
                raise SettingsError(field.name, value, why, source)
            return data
        if k == "list":
            if isinstance(value, str):
                text = value.strip()
                data = json.loads(text) if text.startswith("[") else [s.strip() for s in text.split(",") if s.strip()]
            else:
                data = list(value) if isinstance(value, tuple) else value  # mitmproxy's Sequence[str]
            if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
                raise SettingsError(field.name, value, "expected a list of strings", source)
            # (no entry is blank: `--set resp2chat_NAME=`, which mitmproxy reads as [""], is the
            # empty list, as the bare `--set resp2chat_NAME` and the environment's `NAME=` are)
            return [x for x in data if x.strip()]
        if k == "entries":
            data = json.loads(value) if isinstance(value, str) and value.strip() else (value or [])
            if not isinstance(data, list):
                raise SettingsError(field.name, "[hidden]", "expected a list (YAML) or a JSON array of objects", source)
            for i, entry in enumerate(data):
                if not isinstance(entry, dict):
                    raise SettingsError(f"{field.name}[{i}]", "[hidden]", "expected a mapping (YAML) or a JSON object", source)
                if (why := _not_json(entry)) is not None:
                    raise SettingsError(f"{field.name}[{i}]", "[hidden]", why, source)
            return [dict(e) for e in data]
    except (ValueError, TypeError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(field.name, value, str(exc), source) from None
    raise AssertionError(k)


def _not_json(item: Any, within: tuple = ()) -> str | None:
    """Why a map's or an entry's value (as YAML made it) is no JSON value, or None. What the
    gateway makes of one is JSON: mitmproxy's option value, a chat body, a listing. YAML also makes
    dates, binary, sets, keys that are numbers, .inf and .nan, and values that hold themselves."""
    if isinstance(item, (dict, list)):
        if any(item is outer for outer in within):
            return "a value holds itself (a YAML alias of what it is in)"
        within += (item,)
        for key, value in (item.items() if isinstance(item, dict) else ((None, v) for v in item)):
            if isinstance(item, dict) and not isinstance(key, str):
                return f"the key {key!r} is no string but a {type(key).__name__} (quote it)"
            if (why := _not_json(value, within)) is not None:
                return why
        return None
    if isinstance(item, float) and not math.isfinite(item):
        return "a number is not finite (.inf, .nan)"
    if item is not None and not isinstance(item, (str, int, float)):
        return f"a value is a {type(item).__name__}, which JSON has not (a date? quote it)"
    return None


def parse(field: Field, value: Any, source: str = "") -> Any:
    """A setting's value as its field takes it, from wherever it came (the file, the environment,
    ``--set``, ``start()``, an upstream entry): parsed (``coerce``), then checked (``validate``);
    an error names ``source``."""
    value = coerce(field, value, source)
    try:
        validate(field.name, value)
    except SettingsError as exc:
        if not source:
            raise
        raise SettingsError(exc.field, exc.value, exc.why, source) from None
    return value


def _either(words) -> str:
    return ", ".join(words[:-1]) + f" or {words[-1]}"


# Settings that take one of a few words, and maps whose values must pass a check.
_CHOICES = {
    "max_tokens_field": ("max_tokens", "max_completion_tokens"),
    "history_reasoning_field": ("reasoning_content", "reasoning", "none"),
}
_MAP_VALUES = {
    "model_map": (lambda v: isinstance(v, str), "a string (a model name)"),
    "think_tags": (lambda v: v in THINK_MODES, _either(THINK_MODES)),
    "reasoning_effort_map": (lambda v: isinstance(v, str), "a string"),
    "model_extra_params": (lambda v: isinstance(v, dict), "a JSON object"),
}


def validate(name: str, value: Any) -> None:
    """Checks beyond the type, shared by the file, the environment and --set."""
    if name == "bind_addr" and not _HOSTPORT.match(value):
        raise SettingsError(name, value, "expected host:port, e.g. 127.0.0.1:4000")
    if name in ("upstream_base_url", "brave_base_url") and value and value != "demo":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(name, value, "expected an http:// or https:// URL")
        if "@" in parts.netloc or parts.query or parts.fragment:
            # Neither was ever sent as it is (a user:password@ went into the Host header, a
            # ?query ended up before /chat/completions), yet both were shown wherever the URL is
            # (a client's "cannot connect to the upstream …", the log, flows): not shown here either.
            shown = f"{parts.scheme}://{'[hidden]@' if '@' in parts.netloc else ''}{parts.netloc.rpartition('@')[2]}{parts.path}" \
                    + ("?[hidden]" if parts.query else "") + ("#[hidden]" if parts.fragment else "")
            raise SettingsError(name, shown, "a user:password@, ?query or #fragment is not supported in this URL: "
                                             "a key goes in upstream_api_key (or upstream_headers)")
    if name == "max_upstream_event_mb" and value < 1:
        raise SettingsError(name, value, "expected a whole number >= 1 (MiB)")
    if name == "coalesce_ms" and value > 1000:
        raise SettingsError(name, value, "expected a whole number of milliseconds, at most 1000")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise SettingsError(name, value, "expected " + _either(_CHOICES[name]))
    if name in _MAP_VALUES:
        ok, what = _MAP_VALUES[name]
        if not all(ok(v) for v in value.values()):
            raise SettingsError(name, value, f"each value must be {what}")
    if name in ("upstream_request_log_path", "access_log_path") and value and "\n" in value:
        raise SettingsError(name, value, "expected a file path")
    if name == "upstreams" and value:
        parse_upstreams(value)
    if name == "mcp_servers" and value:
        try:
            parse_mcp_servers(value)
        except ValueError as exc:
            raise SettingsError(name, "[hidden]", str(exc)) from None
    if name == "upstream_headers":
        for header, v in value.items():
            if not HEADER_NAME.match(header) or header.lower() in _NOT_UPSTREAM_HEADERS:
                raise SettingsError(name, "[hidden]", f"{header!r} cannot be set: not a header name, or one the "
                                    "gateway writes itself (framing, hop-by-hop, authorization: use api_key)")
            if not isinstance(v, str) or any(c in v for c in "\r\n\x00"):
                raise SettingsError(name, "[hidden]", f"{header!r}: expected a one-line string value")
    if name == "passthrough_paths":
        try:
            parse_passthrough(value)
        except ValueError as exc:
            raise SettingsError(name, value, str(exc)) from None
    if name in ("tls_cert_file", "tls_key_file") and value and "\n" in value:
        raise SettingsError(name, value, "expected a file path")
    if name == "clients" and value:
        parse_clients(value)  # (with gateway_api_key, its `default` client: the gate checks both)
    if name == "routing_key_header" and value and not HEADER_NAME.match(value):
        raise SettingsError(name, value, "expected an HTTP header name, e.g. x-smg-routing-key")
    if name == "state_store_url" and value:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise SettingsError(name, "[hidden]", "expected redis://host:port/db, rediss://… or unix:///path")


def resolve(file_values: Mapping[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Defaults < file < environment. Returns (values, where each value came from). An old
    name (``Field.aliases``) counts as its field's name, below the new name in each layer."""
    # (YAML keys may be numbers, true, dates: each named as text)
    unknown = sorted(map(str, set(file_values) - set(BY_NAME) - set(ALIASES)))
    if unknown:  # its value unsaid: a misspelled name may hold a secret (`upstream_api_ky: sk-…`)
        raise SettingsError(unknown[0], "[hidden]", unknown_setting(unknown[0]), "config file")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in FIELDS:
        value, source, given = f.default, "default", ""
        for key in (f.name, *f.aliases):
            if key in file_values and file_values[key] is not None:
                value, given = file_values[key], "config file"
                source = given + (f" ({key}, deprecated)" if key != f.name else "")
                break
        for var in (f.env, *("RESP2CHAT_" + a.upper() for a in f.aliases), *f.env_fallbacks):
            if var in env:
                value, source = env[var], var
                given = var
                break
        values[f.name], sources[f.name] = parse(f, value, given), source
    return values, sources


# RESP2CHAT_* variables that are no setting, yet read: not warned of (``unknown_variables``)
NOT_SETTINGS = frozenset({
    "RESP2CHAT_CONFIG",  # the config file's path (resp2chat_io/config.py)
    "RESP2CHAT_API_KEY",  # a client's own key, which Codex sends (print-config's env_key)
    "RESP2CHAT_LLAMACPP_DIR",  # where llama.cpp is built: the Makefile, tests/, deploy/run-here.sh
    "RESP2CHAT_REGEN_DIALECTS",  # tests/test_dialects.py: rewrite the expected events
    "RESP2CHAT_RUN_DIR",  # deploy/run-here.sh: where its replicas keep their files
})


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A variable named like a setting's (``RESP2CHAT_…``, in any case) that is none, nor one of
    ``NOT_SETTINGS``: the gateway ignores it. What to warn of, one line each naming it and the
    closest known name, never its value (a misspelt ``RESP2CHAT_UPSTREAM_API_KY`` holds a key)."""
    known = {f.env for f in FIELDS} | {"RESP2CHAT_" + old.upper() for old in ALIASES} | NOT_SETTINGS
    notes = []
    for name in sorted(env):
        if not name.upper().startswith("RESP2CHAT_") or name in known:
            continue
        # (the names after the prefix compared: the prefix alone made any name look alike)
        near = difflib.get_close_matches(name.upper().removeprefix("RESP2CHAT_"),
                                         [k.removeprefix("RESP2CHAT_") for k in known], 1)
        notes.append(f"the environment's {name} is no setting, and is ignored"
                     + (f" (did you mean RESP2CHAT_{near[0]}?)" if near else " (README: Configuration lists them)"))
    return notes


def shadowed(file_values: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """An old name given beside its field's new name in the same place (the file, the environment):
    ignored, as ``resolve`` reads the new one. What to warn of, in words naming both (never a value)."""
    notes = []
    for f in FIELDS:
        for old in f.aliases:
            if f.name in file_values and old in file_values:
                notes.append(f"{old} in the config file is ignored: {f.name} is there too (the new name wins)")
            if f.env in env and "RESP2CHAT_" + old.upper() in env:
                notes.append(f"RESP2CHAT_{old.upper()} is ignored: {f.env} is set too (the new name wins)")
    return notes


# --- several upstreams: one entry of ``upstreams`` ---------------------------------------------

_OWN = ("name", "base_url", "api_key", "models")
_NOT_UPSTREAM_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "proxy-connection", "proxy-authorization", "authorization", "content-type", "content-encoding", "accept",
    "accept-encoding", "x-resp2chat-turn", "x-resp2chat-key"})


@dataclass(frozen=True)
class UpstreamSpec:
    """One entry of ``upstreams``, validated: its own fields, and the settings it sets for itself
    (``PER_UPSTREAM``: how its requests are lowered, its timeouts, its extra headers)."""

    name: str
    base_url: str  # http(s)://host[:port][/prefix], or "demo"
    api_key: str = ""
    models: tuple[str, ...] = ("*",)  # glob patterns of client model names (fnmatch, case-sensitive)
    overrides: tuple[tuple[str, Any], ...] = ()  # per-backend settings, by setting name

    def serves(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)

    def settings(self, base: dict) -> dict:
        """The top-level settings with this upstream's own values on top."""
        return {**base, **dict(self.overrides)} if self.overrides else base

    def __repr__(self) -> str:  # never the key
        return f"UpstreamSpec({self.name!r}, {self.base_url!r}, models={self.models!r})"


def parse_upstreams(value: Sequence[dict]) -> tuple[UpstreamSpec, ...]:
    """Validate the ``upstreams`` setting; ``SettingsError`` names the entry and the field."""
    specs: list[UpstreamSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise SettingsError(f"upstreams[{i}]", "[hidden]", "expected a mapping with name and base_url")
        label = f"upstreams[{i}]" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")

        def bad(key: str, why: str, shown: Any = None) -> SettingsError:
            # never a value that may be a secret: the key, an unknown field (a misspelt key?),
            # a URL (it may carry user:password), headers
            value = entry.get(key) if shown is None else shown
            if key in ("api_key", "base_url", "upstream_headers") or key not in _OWN + PER_UPSTREAM:
                value = "[hidden]"
            return SettingsError(f"{label}.{key}", value, why)

        unknown = sorted(map(str, set(entry) - set(_OWN) - set(PER_UPSTREAM)))
        if unknown:
            raise bad(unknown[0], f"unknown field (known: {', '.join(_OWN + PER_UPSTREAM)})")
        name = entry.get("name")
        if not isinstance(name, str) or not OPERATOR_NAME.match(name):
            raise bad("name", "expected a name of letters, digits, '_', '.', '-' (up to 64)")
        if name in seen:
            raise bad("name", "another entry has the same name")
        seen.add(name)
        url = entry.get("base_url")
        if not isinstance(url, str) or not url:
            raise bad("base_url", "required: the backend's Chat Completions base URL, e.g. http://10.0.0.5:8000/v1")
        try:
            validate("upstream_base_url", url)
        except SettingsError as exc:
            raise bad("base_url", exc.why) from None
        key = entry.get("api_key", "")
        if not isinstance(key, str):
            raise bad("api_key", "expected a string")
        models = entry.get("models", ["*"])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise bad("models", "expected a non-empty list of model name patterns ('*' for any)")
        overrides = []
        for setting in PER_UPSTREAM:
            if setting in entry:
                try:
                    v = parse(BY_NAME[setting], entry[setting])
                except SettingsError as exc:
                    raise bad(setting, exc.why) from None
                overrides.append((setting, v))
        specs.append(UpstreamSpec(name, url, key, tuple(models), tuple(overrides)))
    return tuple(specs)


def parse_bind(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


WILDCARD_HOSTS = ("0.0.0.0", "::")  # a bind host that listens on every interface


def reach_host(host: str) -> str:
    """The host a client on this machine connects to, for a listen host (a wildcard or none: 127.0.0.1)."""
    return "127.0.0.1" if not host or host in WILDCARD_HOSTS else host


def url_host(host: str) -> str:
    """A host as a URL names it: an IPv6 address in brackets (``http://[::1]:8080``)."""
    return f"[{host}]" if ":" in host else host


def listen_spec(addr: str) -> str:
    """``bind_addr`` as mitmproxy's mode spec ends (``reverse:URL@HOST:PORT``): the host without
    brackets, which mitmproxy would keep as part of the name (it splits at the last colon)."""
    host, port = parse_bind(addr)
    return f"{host}:{port}"


def to_option(field: Field, value: Any) -> Any:
    """A settings value as its mitmproxy option value (maps travel as JSON strings)."""
    if field.kind == "map":
        return json.dumps(value, sort_keys=True)
    if field.kind == "entries":
        return json.dumps(value) if value else ""
    return value


def option_type(field: Field):
    from collections.abc import Sequence  # (mitmproxy parses --set for this one, not typing's)

    return {"str": str, "int": int, "bool": bool, "map": str, "list": Sequence[str], "entries": str}[field.kind]


def optional_type(field: Field):
    """The option type of an alias (unset: ``None``)."""
    from typing import Optional

    return Optional[option_type(field)]
