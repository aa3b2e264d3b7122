"""Experiment (bench only): the addon with its in-process upstream relay left out.

    .venv/bin/python bench/run.py --addon bench/experiments/no_relay.py

``Relay.start`` does nothing, so the relay has no port and turns go straight to the upstream
(no keepalive markers, no timeouts, no web search): what the hop costs, by difference. Patches
relay.py internals as of commit 0de5b39; see docs/performance.md.
"""

from resp2chat_io import relay as _relay


async def _no_start(self):
    return 0


_relay.Relay.start = _no_start
import resp2chat  # noqa: E402

addons = resp2chat.addons
