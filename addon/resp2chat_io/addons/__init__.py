"""The gateway as mitmproxy addons, each owning its options, hooks and commands.

``build()`` wires them; the order is mitmproxy's hook order:

- ``Listen``          bind_addr, reverse mode, lazy connections (a gateway, not a proxy), TLS
- ``HeadDeadline``    a client connection that sends no request head in time is closed
                      (header_timeout_secs), at most 1000 wait for one at once; a body
                      slower than min_request_body_rate_kb is cut; the gateway's own large answers
                      waiting for their clients are bounded (max_answers_waiting_mb: a read past it
                      is a 503), and one taken slower than that rate is reset
- ``Gate``            /healthz, HTTPS, Host, Origin, the gateway key, which paths and methods are
                      served (passthrough_paths), content type, body size, room among the bodies
                      arriving at once (max_request_bodies_mb): all at the head
- ``StoredResponses`` GET/DELETE /v1/responses/{id} (and its input_items); the one lookup of what a turn
                      refers to; a conversation's new items
- ``Conversations``   the Conversations API (/v1/conversations…), on the response store
- ``Background``      background: true: the turn runs in the gateway; poll, cancel, resume (its streams' hooks)
- ``Limits``          each client's rpm, tpm, max_streams (asked by Turns.admit, and here for every other
                      request that makes a backend work: embeddings, input_tokens; in Redis for replicas)
- ``ReplayCache``     identical requests answered without the backend (asked by HttpTurns)
- ``Turns``           one turn's steps, both transports: decode, look up, lower, start, settle (no hooks)
- ``HttpTurns``       POST /v1/responses (and /compact): drives a turn through the relay, streams it, records it
- ``InputTokens``     POST /v1/responses/input_tokens: the backend's tokenizer, else an estimate
- ``ServerReplay``    --server-replay answers reruns of recorded turns (what varies between runs ignored)
- ``ResponsesWebSocket`` ws://…/v1/responses: drives the same turns for each message of a socket (how
                      many are open: a client's max_sockets, max_websockets)
- ``Upstreams``       passthrough_paths to the upstream (answers scrubbed); the relay's lifetime and timeouts
- ``Outcomes``        how each POST /v1/responses ended, for the next two
- ``Metrics``         GET /metrics (Prometheus)
- ``AccessLog``       one JSON line per turn (access_log_path)
- ``RequestLog``      the chat requests sent upstream, as JSON lines
- ``RawOutput``       --raw: the model's stream on stdout
- ``WebSearch``       the web_search settings
- ``McpServers``      the hosted MCP settings: the servers requests may use
- ``SettingsCommand`` the resp2chat.settings command
- ``Egress``          the gate's other end: only what the gateway routed or answered goes on; CORS headers
- ``Redact``          no credentials in flow files, mitmweb or answers
- ``AnswersOut``      (added last, by HeadDeadline) a non-streamed turn's Response counted in
                      max_answers_waiting_mb, never refused
- ``SetCheck``        last to load: a --set value mitmproxy would fail to apply after loading is an error
                      at start-up, not a gateway silently left out (its only hook is load)
"""

from __future__ import annotations

from resp2chat_io import mitm_hooks, mitm_typecheck, script_reload, views

from .access_log import AccessLog
from .background import Background
from .base import SettingsSource
from .conversations import Conversations
from .gate import Egress, Gate
from .head_deadline import HeadDeadline
from .http_turns import HttpTurns
from .input_tokens import InputTokens
from .limits import Limits
from .listen import Listen
from .mcp import McpServers
from .metrics import Metrics
from .outcomes import Outcomes
from .raw import RawOutput
from .redact import Redact
from .replay import ReplayCache
from .server_replay import ServerReplay
from .request_log import RequestLog
from .settings_command import SetCheck, SettingsCommand
from .store import StoredResponses
from .turns import Turns
from .upstreams import Upstreams
from .websearch import WebSearch
from .websocket import ResponsesWebSocket


def build() -> list:
    mitm_hooks.install()  # each hook only to the addons that have it (see there)
    mitm_typecheck.install()  # a message's optional fields leave no cycle holding its answer (see there)
    script_reload.install()  # a change of the gateway's script file does not rebuild it (see there)
    views.register()
    source = SettingsSource()
    upstreams = Upstreams(source)
    search = WebSearch(source)
    hosted = McpServers(source)
    store = StoredResponses(source, upstreams)
    gate = Gate(source, upstreams)
    limits = Limits(store, gate)
    upstreams.meter = limits.meter  # (a limited client's passthrough answer: its usage read on the way)
    turns = Turns(source, upstreams, search, store, limits, hosted)
    store.sealer = turns.sealer
    background = store.background = Background(turns, store, upstreams.relay)
    replay = ReplayCache(source, upstreams, turns, store)
    outcomes = Outcomes(gate)
    request_log = RequestLog(source, turns)
    raw = RawOutput()
    turns.started += [request_log.started, raw.started]
    turns.finished += [limits.finished, replay.finished, store.finished, outcomes.finished, request_log.finished]
    gate.reloaded.append(turns.clients_changed)  # (a revoked key's turns in flight stop: background ones too)
    turns.accepts = gate.accepts  # (and one that starts after the reload: Turns.start)
    http_turns = HttpTurns(turns, upstreams, replay, store, gate, background)
    server_replay = ServerReplay(turns)
    sockets = ResponsesWebSocket(source, upstreams, turns, gate, server_replay, outcomes)
    gate.reloaded.append(sockets.clients_changed)  # (and its sockets close: their turns stopped first, above)
    return [
        Listen(source, upstreams), HeadDeadline(source), gate, background, store, Conversations(store, upstreams), limits, replay, turns,
        http_turns, InputTokens(turns, upstreams, gate), server_replay, sockets,
        upstreams, outcomes, Metrics(turns, store, replay, outcomes, gate), AccessLog(source, outcomes),
        request_log, raw, search, hosted, SettingsCommand(source), Egress(gate), Redact(upstreams), SetCheck(),
    ]
