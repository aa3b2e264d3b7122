"""Metrics: ``GET /metrics`` in Prometheus's text format (``prometheus_client``).

Answered by the gateway itself, behind the gate like every other path (beyond loopback it needs
``gateway_api_key``). Per gateway process; each replica is scraped on its own.

| metric | labels | what |
| --- | --- | --- |
| ``resp2chat_streams_in_flight`` | | turns between request and end (streams open to clients) |
| ``resp2chat_turns_total`` | upstream, model, client, status, code | every ``POST /v1/responses`` by how it ended (completed, incomplete, failed, unfinished, rejected, replayed) and error code |
| ``resp2chat_refused_requests_total`` | route, client, status, code | requests that are not turns but go to a backend (``passthrough_paths``, ``input_tokens``, an upgrade to the Responses WebSocket) the gateway answered itself with an error: ``route`` the ``passthrough_paths`` entry (or ``POST /v1/responses/input_tokens``, ``GET /v1/responses``), status ``rejected`` (4xx) or ``failed`` (5xx: a passthrough call's backend failing before its answer's head too; and an answer cut for its backend's silence midway, ``upstream_timeout`` with the head's HTTP status: upstreams.py ``ENDED``); a passthrough answer cut midway because its key was revoked (``rejected``, ``invalid_api_key``); and sockets the gateway closed for their key (``GET /v1/responses``, ``rejected``, ``invalid_api_key``) |
| ``resp2chat_time_to_first_token_seconds`` | upstream, model, client | request to the first event made from backend data |
| ``resp2chat_turn_duration_seconds`` | upstream, model, client | request to the end of the turn |
| ``resp2chat_tokens_total`` | upstream, model, client, kind | prompt, cached (prompt tokens the backend's KV cache served), output: what the backends reported, every round of a turn the gateway's tool loop ran (``Outcome.work``; its client's usage counts the last round's prompt only) |
| ``resp2chat_fallbacks_total`` | upstream, status | an upstream failed before its first byte (a compaction summary's: at any point of it) and the next one was tried |
| ``resp2chat_mcp_calls_total`` | server, outcome | hosted MCP tool calls the gateway ran, by server (its ``mcp_servers`` label) and outcome (completed, failed, timeout, approval_requested) |
| ``resp2chat_replay_cache_hits_total`` / ``_misses_total`` | | replay-cache lookups |
| ``resp2chat_replay_cache_entries`` | | entries (with Redis: after this replica's last write) |
| ``resp2chat_stored_responses`` / ``_bytes`` | client, kind | who fills the response store: each configured client's entries (bytes) under its name (kind ``client``), the rest with client ``""`` by kind: ``shared`` (a keyless gateway's, ``gateway_api_key``'s), ``forwarded`` (every forwarded credential together), ``former`` (revoked clients'); their sum is the store's size. With Redis: the whole shared store, read at the scrape |
| ``resp2chat_state_store_up`` | | 1 while Redis answers, 0 when not (only with ``state_store_url``) |
| ``resp2chat_state_store_errors_total`` | | Redis calls that failed |

Model names come from clients, so a label is bounded in number and in size: a name gets a label
of its own once a turn for it was accepted (lowered and sent to a backend; a request refused
before, however many, names nothing new), if it is spelled as backends spell models
(resp2chat_core/labels.py ``label_safe``: at most 128 characters), up to ``MAX_MODELS`` names;
``client`` is a configured client's name (``clients``; the gate named it) or ``""``: bounded by
the setting;
what the store holds is shown by owner only for configured clients (by their current name; the
rest lumped in three fixed kinds: never an owner, so never a credential's digest), and its
figures are kept as the store goes (resp2chat_core/shares.py ``by_client``): a scrape costs
O(clients), with Redis one round trip of O(1) reads (redis_state.py ``figures``);
anything else counts as ``other`` (a request that could not be read: ``""``). Error codes are
the gateway's own (``other`` otherwise).
"""

from __future__ import annotations

from mitmproxy import http

from resp2chat_core.labels import code_label, label_safe
from resp2chat_core.usage import breakdown

from .base import fails_closed
from .outcomes import Outcome

MAX_MODELS = 100
PATH = "/metrics"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


@fails_closed
class Metrics:
    name = "resp2chat_metrics"

    def __init__(self, turns, store, replay, outcomes, gate) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.turns, self.store, self.replay, self.gate = turns, store, replay, gate
        self.stored: list | None = None  # who fills the store, read for the scrape being answered
        self.registry = r = CollectorRegistry(auto_describe=True)
        by = ("upstream", "model", "client")  # (client: a configured name, or "": bounded by the clients setting)
        Gauge("resp2chat_streams_in_flight", "Turns between request and end.", registry=r).set_function(
            lambda: len(turns.in_flight))
        self.turns_total = Counter("resp2chat_turns", "POST /v1/responses by how it ended.",
                                   (*by, "status", "code"), registry=r)
        self.ttft = Histogram("resp2chat_time_to_first_token_seconds", "Request to the first event made from "
                              "backend data.", by, buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("resp2chat_turn_duration_seconds", "Request to the end of the turn.", by,
                                  buckets=DURATION_BUCKETS, registry=r)
        self.latency = Histogram("resp2chat_gateway_latency_seconds", "Request to its chat request handed to a "
                                 "backend: what the gateway itself adds before a backend can start.", by,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("resp2chat_tokens", "Backend tokens by kind: prompt, cached (served from the backend's "
                              "KV cache), output; every round of a turn the gateway's tool loop ran.", (*by, "kind"), registry=r)
        self.refused = Counter("resp2chat_refused_requests", "Requests that are not turns but go to a backend "
                               "(passthrough_paths, input_tokens, a WebSocket upgrade), answered by the gateway "
                               "with an error (or a passthrough answer it cut); sockets it closed for their key.",
                               ("route", "client", "status", "code"), registry=r)
        self.fallbacks = Counter("resp2chat_fallbacks", "An upstream failed before its first byte (a compaction "
                                 "summary: at any point) and the next was tried (upstream: the one that failed).",
                                 ("upstream", "status"), registry=r)
        self.mcp_calls = Counter("resp2chat_mcp_calls", "Hosted MCP tool calls the gateway ran, by server "
                                 "(mcp_servers label) and outcome.", ("server", "outcome"), registry=r)
        r.register(_Sizes(self))
        self._models: set[str] = set()
        outcomes.listeners.append(self.record)

    def model(self, name: str, admit: bool) -> str:
        """The label of a client's model name; ``admit``: a turn for it was accepted."""
        if name in self._models or not name:
            return name
        if admit and len(self._models) < MAX_MODELS and label_safe(name):
            self._models.add(name)
            return name
        return "other"

    def record(self, o: Outcome) -> None:
        if o.route:  # (not a turn: its route is the operator's passthrough_paths, bounded)
            self.refused.labels(o.route, o.client, o.status, code_label(o.code)).inc()
            return
        model = self.model(o.model, admit=o.status != "rejected")
        client = o.client
        self.turns_total.labels(o.upstream, model, client, o.status, code_label(o.code)).inc()
        for name, status in o.skipped:
            self.fallbacks.labels(name, str(status)).inc()
        for server, outcome in o.mcp_calls:  # (the operator's labels and the gateway's words: bounded)
            self.mcp_calls.labels(server, outcome).inc()
        if o.status in ("rejected", "replayed"):
            return
        if o.ttft is not None:
            self.ttft.labels(o.upstream, model, client).observe(o.ttft)
        self.duration.labels(o.upstream, model, client).observe(o.took)
        if o.latency is not None:
            self.latency.labels(o.upstream, model, client).observe(o.latency)
        prompt, cached, output = breakdown(o.work)  # (the backends' work: a tool loop's every round)
        for kind, value in (("prompt", prompt), ("output", output), ("cached", cached)):
            if isinstance(value, int) and value > 0:
                self.tokens.labels(o.upstream, model, client, kind).inc(value)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        if flow.request.path.split("?", 1)[0] == PATH and flow.request.method in ("GET", "HEAD"):
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            # (read before the registry is: nothing awaits between this and its collect)
            self.stored = await self.store.who_fills([(c.name, c.identity) for c in self.gate.clients.specs])
            flow.response = http.Response.make(200, generate_latest(self.registry), {"content-type": CONTENT_TYPE_LATEST})


class _Sizes:
    """What is read at scrape time from the store, the replay cache and Redis."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cache = self.m.replay.cache
        up, errors = self.m.store.state_gauges()
        yield CounterMetricFamily("resp2chat_replay_cache_hits", "Replay-cache lookups answered.", value=cache.hits)
        yield CounterMetricFamily("resp2chat_replay_cache_misses", "Replay-cache lookups not answered.",
                                  value=cache.misses)
        yield GaugeMetricFamily("resp2chat_replay_cache_entries", "Replay-cache entries.", value=len(cache))
        if self.m.stored is not None:  # (None: Redis did not answer; state_store_up says so)
            count = GaugeMetricFamily("resp2chat_stored_responses", "Stored responses (previous_response_id, "
                                      "conversations) by who stored them: their sum is the store's.",
                                      labels=("client", "kind"))
            size = GaugeMetricFamily("resp2chat_stored_response_bytes", "Bytes of stored responses by who "
                                     "stored them: their sum is the store's.", labels=("client", "kind"))
            for client, kind, n, b in self.m.stored:
                count.add_metric((client, kind), n)
                size.add_metric((client, kind), b)
            yield count
            yield size
        if up is not None:
            yield GaugeMetricFamily("resp2chat_state_store_up", "1 while the shared state store answers.",
                                    value=1 if up else 0)
            yield CounterMetricFamily("resp2chat_state_store_errors", "Failed calls to the shared state store.",
                                      value=errors)
