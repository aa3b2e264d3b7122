"""The access log: one JSON line per turn, however it ended (``access_log_path``; ``-``: stderr):
each ``POST /v1/responses`` (refused and replayed ones included) and each turn on the Responses
WebSocket (outcomes.py); and one per request that is not a turn but goes to a backend
(``passthrough_paths``, ``input_tokens``, an upgrade to the Responses WebSocket) the gateway
refused or answered with its own error (a passthrough whose backend failed before its answer's
head) or cut (its backend silent midway), and per socket it closed because its key is no longer accepted (``"http_status"``
101: the upgrade's), with its ``"path"`` (a turn's line has none: ``resp2chat usage`` counts
turns only).

``{"time", "request_id", "session", "model", "upstream", "client", "status", "code", "http_status",
"input_tokens", "cached_tokens", "output_tokens", "gateway_ms", "ttft_ms", "total_ms"}`` (+ ``"fallbacks"``
when upstreams were fallen back from; + ``"backend_input_tokens"``, ``"backend_cached_tokens"``,
``"backend_output_tokens"`` when the backends did more than the client's usage says: every round
of the gateway's tool loop, a compaction summary; ``Outcome.work``, what the metrics and ``tpm``
count, and ``resp2chat usage`` too). No content, no headers, no keys: what an operator needs to
follow a session and a latency, nothing a user said. What a client chose (its model name and
session key) is bounded (resp2chat_core/labels.py ``shown``): a line stays a line.
"""

from __future__ import annotations

import json
import sys
import time

from resp2chat_core.labels import shown
from resp2chat_core.usage import breakdown

from .base import Owner, close_log, open_log
from .outcomes import Outcome


class AccessLog(Owner):
    name = "resp2chat_access_log"
    owner = "access_log"

    def __init__(self, source, outcomes) -> None:
        super().__init__(source)
        self.file = None
        outcomes.listeners.append(self.write)

    def apply(self, updated: set[str]) -> None:
        file = open_log("access_log_path", self.s["access_log_path"], stderr=True)
        self.done()
        self.file = file

    def done(self) -> None:
        close_log(self.file)
        self.file = None

    def write(self, o: Outcome) -> None:
        if self.file is None:
            return
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(o.at)) + f".{int(o.at % 1 * 1000):03d}Z",
            "request_id": o.request_id, "session": None if o.session is None else shown(o.session),
            "model": shown(o.model), "upstream": o.upstream, "client": o.client or None, "status": o.status,
            "code": shown(o.code),
            "http_status": o.http_status,
            **_tokens("", o.usage),
            "gateway_ms": None if o.latency is None else round(o.latency * 1000, 2),
            "ttft_ms": None if o.ttft is None else round(o.ttft * 1000, 1), "total_ms": round(o.took * 1000, 1),
        }
        if o.path:
            line["path"] = o.path
        if o.skipped:
            line["fallbacks"] = [{"upstream": name, "status": status} for name, status in o.skipped]
        if o.work is not None and o.work is not o.usage and o.work != o.usage:  # (most turns: the same)
            line.update(_tokens("backend_", o.work))
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        if self.file is sys.stderr:
            self.file.flush()


def _tokens(prefix: str, usage: dict | None) -> dict:
    """A Responses usage as the line's token counts (``prefix``: ``backend_`` for the work)."""
    return dict(zip((prefix + "input_tokens", prefix + "cached_tokens", prefix + "output_tokens"), breakdown(usage)))
