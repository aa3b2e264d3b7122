"""The upstream request log: every chat request sent upstream, one JSON line each
(``upstream_request_log_path``): time, flow, session, URL (and, with several upstreams, the
upstream's name) and the body byte for byte. No headers, no keys. ``resp2chat analyze`` reads it
like a flow file.

A turn's request is written when it goes out to its (first) upstream; when fallbacks were tried
(resp2chat_core/routing.py), each one's request, as that upstream got it, is written when the
turn ends (a ``finished`` listener of turns.py). A turn with a compaction round (server-side
compaction; a compaction turn: Codex's trigger, the compact endpoint) sends the summary request
first; the rest it sent (the fallbacks' summary requests, the answer's) is written at its end
(``Exchange.sent``)."""

from __future__ import annotations

import json
import time

from mitmproxy import http

from resp2chat_core.turn import session_key

from .base import Owner, close_log, open_log


class RequestLog(Owner):
    name = "resp2chat_request_log"
    owner = "request_log"

    def __init__(self, source, turns) -> None:
        super().__init__(source)
        self.turns = turns
        self.file = None

    def apply(self, updated: set[str]) -> None:
        file = open_log("upstream_request_log_path", self.s["upstream_request_log_path"])
        self.done()
        self.file = file

    def done(self) -> None:
        close_log(self.file)
        self.file = None

    def started(self, run) -> None:
        """A turns.py ``started`` listener (HTTP and the WebSocket alike): the request its first
        upstream gets, as it goes out."""
        if self.file is not None:
            ex = run.exchange
            self.write(run.flow, run.turn, ex.candidates[0], several=len(self.turns.specs) > 0,
                       body=ex.compaction.summary(0) if ex.compaction is not None else None)

    def finished(self, done) -> None:
        """A turns.py ``finished`` listener: the fallbacks' requests, when fallbacks were tried;
        after a compaction round, every request but the first (``Exchange.sent``)."""
        ex = done.exchange
        if self.file is None or ex is None:
            return
        several = len(self.turns.specs) > 0
        if ex.compaction is not None:
            for i, body in ex.sent[1:]:
                self.write(done.flow, done.turn, ex.candidates[i], several=several, body=body)
            return
        for candidate in ex.candidates[1:ex.answered + 1]:
            self.write(done.flow, done.turn, candidate, several=True)

    def write(self, flow: http.HTTPFlow, turn, to, several: bool = False, body: bytes | None = None) -> None:
        """One line for a chat request a turn sent the candidate ``to`` (its URL, ``body``: its body
        unless another; ``several``: the upstream's name too)."""
        line = {"ts": time.time(), "flow": flow.id, "session": session_key(turn.prompt_cache_key, flow.request.headers),
                "url": to.url}
        if several:
            line["upstream"] = to.name
        head = json.dumps(line, ensure_ascii=False)
        # the body spliced in as sent: byte for byte what the upstream got
        self.file.write(f'{head[:-1]}, "body": {(to.body if body is None else body).decode()}}}\n')
