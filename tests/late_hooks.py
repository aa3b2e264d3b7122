"""A mitmproxy script for tests only, loaded after the gateway's: its ``request`` hook runs after
the gateway's turn was made (and before the gateway's last hook, http_turns.BodyAside, which
mitmproxy's chain gets at ``running``), as a user's script or mitmweb's intercept does.

A flow tests/relay_probe.py marked ``hold`` is intercepted (held until the probe's resume or
kill), one marked ``kill`` is killed.
"""

from __future__ import annotations

from mitmproxy import http


class LateHooks:
    name = "late_hooks"

    def __init__(self) -> None:
        self.held: list[http.HTTPFlow] = []

    def request(self, flow: http.HTTPFlow) -> None:
        mark = flow.metadata.get("probe")
        if mark == "hold":
            flow.intercept()
            self.held.append(flow)
        elif mark == "kill":
            flow.kill()


addons = [LateHooks()]
