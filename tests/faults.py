"""A mitmproxy script for tests only: inject a failure at one stage of a running gateway, and
hold the gateway's start-up open.

    mitmdump -s tests/faults.py -s addon/resp2chat.py --mode reverse:…

Loaded before the gateway's script, it answers its own control requests itself (they never
reach the gateway's addons or a backend):

    POST /_faults/inject/<stage>   from now on, every request fails at <stage> (``STAGES``)
    POST /_faults/clear            no more failures
    POST /_faults/release          let start-up finish (``--set faults_hold_startup=true``)

A failure is a ``RuntimeError`` whose text plants internals (a password, an internal address)
that must never reach a client. With ``faults_hold_startup`` the script's ``running`` hook waits
for ``release``: mitmproxy is then listening and serving requests, but still starting up — its
``errorcheck`` exits the process on any ERROR logged in that window. The log says
``faults: start-up finished`` once errorcheck is done watching (the window has closed).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging

from mitmproxy import ctx, http

log = logging.getLogger("faults")

PLANTED = "password=hunter2 at 10.0.0.7"

# stage -> (module, attribute path): the function that fails. Each is looked up at call time by
# its caller, so replacing the attribute is enough.
STAGES = {
    "gate": ("resp2chat_io.addons.gate", "Gate.identify"),
    "replay": ("resp2chat_io.addons.turns", "replay_key"),
    "decode": ("resp2chat_core.turn", "decode_body"),
    "validation": ("resp2chat_core.turn", "parse_request"),
    "lowering": ("resp2chat_core.turn", "lower"),
    "store": ("resp2chat_io.addons.store", "StoredResponses.lookup"),
    "routing": ("resp2chat_io.addons.upstreams", "Upstreams.candidates"),
    "recording": ("resp2chat_io.addons.request_log", "session_key"),
    "relay": ("resp2chat_io.relay.server", "run"),
    "upstream_client": ("resp2chat_io.relay.upstream", "UpstreamClient.call"),
    "response_headers": ("resp2chat_io.addons.http_turns", "HttpTurns._show_upstream"),
    "response_head": ("resp2chat_io.addons.http_turns", "HttpTurns._answer_head"),  # in responseheaders only
    "stream_callable": ("resp2chat_core.channel", "Channel.take"),
    "translator": ("resp2chat_core.translator", "Translator._payload"),
    "answer": ("resp2chat_io.addons.http_turns", "HttpTurns._answer_whole"),
    "finished": ("resp2chat_io.addons.http_turns", "HttpTurns._record"),
    "listener": ("resp2chat_io.addons.replay", "ReplayCache.finished"),  # one of Turns.finished
    "metrics": ("resp2chat_io.addons.metrics", "Metrics.record"),  # the first of Outcomes.listeners
}

active: str | None = None


def _failing(stage: str, fn):
    def fail():
        raise RuntimeError(f"injected failure at {stage}: {PLANTED}")

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            if active == stage:
                fail()
            return await fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if active == stage:
                fail()
            return fn(*args, **kwargs)
    return wrapper


def _install() -> None:
    for stage, (module, path) in STAGES.items():
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        raw = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
        if isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(_failing(stage, raw.__func__)))
        else:
            setattr(owner, name, _failing(stage, raw))


_install()


class Faults:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    def load(self, loader) -> None:
        loader.add_option("faults_hold_startup", bool, False, "Hold start-up open until POST /_faults/release.")

    async def running(self) -> None:
        asyncio.ensure_future(self._watch_errorcheck())
        if ctx.options.faults_hold_startup:
            log.info("faults: holding start-up")
            await self.release.wait()

    async def _watch_errorcheck(self) -> None:
        ec = ctx.master.addons.get("errorcheck")
        while ec is not None and ec.logger in logging.getLogger().handlers:
            await asyncio.sleep(0.02)
        log.info("faults: start-up finished")

    def request(self, flow: http.HTTPFlow) -> None:
        global active
        path = flow.request.path
        if not path.startswith("/_faults/"):
            return
        command = path.removeprefix("/_faults/")
        if command.startswith("inject/") and command[7:] in STAGES:
            active = command[7:]
        elif command == "clear":
            active = None
        elif command == "release":
            self.release.set()
        else:
            flow.response = http.Response.make(404, b"unknown fault command")
            return
        flow.response = http.Response.make(200, b"ok")


addons = [Faults()]
