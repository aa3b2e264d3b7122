"""resp2chat_io/mitm_hooks.py: mitmproxy's hook dispatch, each hook only to the addons that have
it, on mitmproxy's own AddonManager (the gateway installs it: every test through a real mitmdump
runs on it). The same addons are called, in the same order, as the chain changes."""

from __future__ import annotations

import logging

from mitmproxy import exceptions
from mitmproxy.addonmanager import AddonManager
from mitmproxy.http import HTTPFlow
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from resp2chat_io import mitm_hooks


class Hears:
    def __init__(self, name: str, heard: list, halt: bool = False, fail: bool = False) -> None:
        self.name, self.heard, self.halt, self.fail = name, heard, halt, fail

    async def request(self, flow: HTTPFlow) -> None:
        self.heard.append(self.name)
        if self.fail:
            raise ValueError("boom")
        if self.halt:
            raise exceptions.AddonHalt


class Deaf:
    def __init__(self, name: str) -> None:
        self.name = name


class Holder:
    """An addon that holds others, changing them as it likes (as mitmproxy's script loader)."""

    def __init__(self, name: str, addons: list) -> None:
        self.name, self.addons = name, addons


async def test_each_hook_goes_to_the_addons_that_have_it_in_order_as_the_chain_changes(caplog):
    mitm_hooks.install()
    mitm_hooks.install()  # (once: a second call changes nothing)
    assert AddonManager.trigger_event is mitm_hooks.trigger_event
    heard: list = []
    holder = Holder("holder", [])
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Hears("a", heard), Deaf("deaf"), holder, Hears("b", heard))

        async def request() -> list:
            heard.clear()
            await manager.trigger_event(HttpRequestHook(tflow.tflow()))
            return list(heard)

        assert await request() == ["a", "b"]
        holder.addons.append(Hears("held", heard))  # (a holder's addons are read when it is called)
        assert await request() == ["a", "held", "b"]
        manager.add(Hears("c", heard))
        assert await request() == ["a", "held", "b", "c"]
        manager.remove(manager.get("a"))
        assert await request() == ["held", "b", "c"]
        manager.add(Hears("stop", heard, halt=True), Hears("after", heard))
        assert await request() == ["held", "b", "c", "stop"]  # AddonHalt ends the dispatch, as before
        manager.remove(manager.get("stop"))
        manager.add(Hears("fails", heard, fail=True), Hears("last", heard))
        with caplog.at_level(logging.ERROR):
            assert await request() == ["held", "b", "c", "after", "fails", "last"]  # an error is logged: the rest run
        assert "Addon error: boom" in caplog.text
