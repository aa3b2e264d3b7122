"""Experiment (bench only): what the relay's tick hop costs, by taking it away.

    .venv/bin/python bench/run.py --paths passthrough resp2chat --phases paced c64 \\
        --addon bench/experiments/inject_ticks.py

Once a streaming turn's response head is in, the relay's ticks no longer go through the loopback
socket: they are handed to mitmproxy's connection handler as if its socket had read them
(``ConnectionHandler.server_event(DataReceived(...))``). That skips one send, one epoll wake-up
and one recv per tick, and nothing else. Not for production: it reaches into mitmproxy's private
connection handling and bypasses its flow control. Result (docs/performance.md, "Floors"):
paced 1.36-1.49x passthrough, the same as with the socket tick; c64 worse. The hop's syscalls are
not where the per-event cost is.
"""

import asyncio

from mitmproxy import ctx
from mitmproxy.proxy import events

import resp2chat
from resp2chat_io.addons.http_turns import HttpTurns
from resp2chat_io.relay.server import TICK

_original = HttpTurns.responseheaders


def _responseheaders(self, flow):
    _original(self, flow)
    live = self.live.get(flow.id)
    ps = ctx.master.addons.get("proxyserver")
    handler = ps.connections.get(flow.client_conn.id) if ps else None
    if live is None or handler is None or not live.turn.client_stream:
        return
    channel, server = live.exchange.channel, flow.server_conn
    relay_wake = channel.wake

    def wake():
        if channel.wake is None:  # the relay is ending the body: its socket carries the rest
            return relay_wake()
        asyncio.ensure_future(handler.server_event(events.DataReceived(server, TICK)))

    channel.wake = wake


HttpTurns.responseheaders = _responseheaders
addons = resp2chat.addons
