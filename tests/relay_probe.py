"""A mitmproxy script for tests only: what the relay holds, and mitmproxy's way to it held up.

    mitmdump -s tests/relay_probe.py -s addon/resp2chat.py -s tests/late_hooks.py --mode reverse:…

Loaded before the gateway's script, it answers its own requests (they never reach the gateway's
addons or a backend):

    GET  /_probe/relay     {"active", "expected", "unclaimed", "connects"}: the relay's counts
                           (relay/server.py) and, for each connection mitmproxy opened to the
                           relay, [when its server_connect hook began, when it ended]
                           (time.monotonic: one clock for every process of the machine)
    POST /_probe/resume    the flows tests/late_hooks.py holds (intercepted) go on
    POST /_probe/kill      they are killed (as mitmweb's kill of an intercepted flow)

A turn whose client sends ``x-probe: hold`` or ``x-probe: kill`` is intercepted or killed by
tests/late_hooks.py, in its ``request`` hook, after the gateway's (which replaced the client's
headers): this script marks the flow (``flow.metadata["probe"]``) before they run.

Options: ``probe_connect_delay`` (seconds, as text) holds each connection to the relay that long
in ``server_connect``; ``probe_connect_refuse`` refuses it there (``server.error``: mitmproxy never
reaches the relay); ``probe_request_deadline`` (seconds, as text) replaces the relay's
``REQUEST_DEADLINE``.
"""

from __future__ import annotations

import asyncio
import json
import time

from mitmproxy import ctx, http

from resp2chat_io.relay import server


class RelayProbe:
    name = "relay_probe"

    def __init__(self) -> None:
        self.connects: list[list[float]] = []

    def load(self, loader) -> None:
        loader.add_option("probe_connect_delay", str, "0", "Seconds each connection to the relay waits.")
        loader.add_option("probe_connect_refuse", bool, False, "Refuse every connection to the relay.")
        loader.add_option("probe_request_deadline", str, "", "The relay's REQUEST_DEADLINE (seconds).")

    def configure(self, updated) -> None:
        if "probe_request_deadline" in updated and ctx.options.probe_request_deadline:
            server.REQUEST_DEADLINE = float(ctx.options.probe_request_deadline)

    @staticmethod
    def relay():
        return ctx.master.addons.get("resp2chat_upstreams").relay

    def request(self, flow: http.HTTPFlow) -> None:
        mark = flow.request.headers.get("x-probe")
        if mark:
            flow.metadata["probe"] = mark
        path = flow.request.path
        if not path.startswith("/_probe/"):
            return
        command = path.removeprefix("/_probe/")
        held = ctx.master.addons.get("late_hooks").held
        if command == "relay":
            relay = self.relay()
            body = {"active": relay.active, "expected": relay.expected, "unclaimed": len(getattr(relay, "_unclaimed", ())),
                    "connects": self.connects}
            flow.response = http.Response.make(200, json.dumps(body).encode(), {"content-type": "application/json"})
            return
        if command in ("resume", "kill"):
            for f in held:
                f.resume()
                if command == "kill":
                    f.kill()
            held.clear()
            flow.response = http.Response.make(200, b"ok")
            return
        flow.response = http.Response.make(404, b"unknown probe command")

    async def server_connect(self, data) -> None:
        if tuple(data.server.address) != self.relay().address:
            return
        began = time.monotonic()
        if ctx.options.probe_connect_refuse:
            data.server.error = "refused by the test"
        await asyncio.sleep(float(ctx.options.probe_connect_delay))
        self.connects.append([began, time.monotonic()])


addons = [RelayProbe()]
