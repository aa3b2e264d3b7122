"""resp2chat_io/mitm_hooks.py: mitmproxy's hook dispatch, each hook straight to the callables that
have it, on mitmproxy's own AddonManager (the gateway installs it: every test through a real
mitmdump runs on it). The same callables are called, in the same order, with the same errors
logged, as by mitmproxy's own dispatch (``mitm_hooks._original``, run on the same chain), as the
chain changes."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
import traceback

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager
from mitmproxy.addons.script import ScriptLoader
from mitmproxy.http import HTTPFlow
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from resp2chat_io import mitm_hooks

mitm_hooks.install()


class Hears:
    def __init__(self, name: str, heard: list, halt: bool = False, fail: bool = False) -> None:
        self.name, self.heard, self.halt, self.fail = name, heard, halt, fail

    async def request(self, flow: HTTPFlow) -> None:
        self.heard.append(self.name)
        if self.fail:
            raise ValueError(f"boom in {self.name}")
        if self.halt:
            raise exceptions.AddonHalt


class HearsSync:
    def __init__(self, name: str, heard: list) -> None:
        self.name, self.heard = name, heard

    def request(self, flow: HTTPFlow) -> None:
        self.heard.append(self.name)


class Deaf:
    def __init__(self, name: str) -> None:
        self.name = name


class Holder:
    """An addon that holds others (as mitmproxy's script loader): it registers what it adds."""

    def __init__(self, name: str, addons: list) -> None:
        self.name, self.addons = name, addons


class HearingHolder(Holder, Hears):
    def __init__(self, name: str, heard: list, addons: list) -> None:
        Hears.__init__(self, name, heard)
        self.addons = addons


async def mitmproxys(manager: AddonManager, heard: list, caplog, make_event=lambda: HttpRequestHook(tflow.tflow())):
    """What our dispatch and then mitmproxy's own did for one event, asserted the same: the addons
    heard, what was logged (with the logged traceback's frames), what propagated."""

    async def run(dispatch) -> tuple:
        heard.clear()
        caplog.clear()
        raised = None
        with caplog.at_level(logging.INFO, logger="mitmproxy.addonmanager"):
            try:
                await dispatch(manager, make_event())
            except Exception as exc:  # noqa: BLE001
                raised = type(exc)
        logged = [(r.levelname, r.getMessage(),
                   tuple(f.name for f in traceback.extract_tb(r.exc_info[2])) if r.exc_info else ())
                  for r in caplog.records if r.name == "mitmproxy.addonmanager"]
        return list(heard), logged, raised

    ours = await run(mitm_hooks.trigger_event)
    assert ours == await run(mitm_hooks._original["trigger_event"])
    return ours


async def test_each_hook_goes_to_the_addons_that_have_it_in_order_as_the_chain_changes(caplog):
    mitm_hooks.install()  # (once: a second call changes nothing)
    assert AddonManager.trigger_event is mitm_hooks.trigger_event
    heard: list = []
    holder = Holder("holder", [])
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Hears("a", heard), Deaf("deaf"), holder, Hears("b", heard))

        async def request() -> list:
            found, _, _ = await mitmproxys(manager, heard, caplog)
            return found

        assert await request() == ["a", "b"]
        held = manager.register(Hears("held", heard))  # (a holder registers what it adds, as mitmproxy asks)
        holder.addons.append(held)
        assert await request() == ["a", "held", "b"]
        manager.add(Hears("c", heard))
        assert await request() == ["a", "held", "b", "c"]
        manager.remove(manager.get("a"))
        assert await request() == ["held", "b", "c"]
        manager.remove(held)
        holder.addons.remove(held)
        assert await request() == ["b", "c"]
        manager.add(Hears("stop", heard, halt=True), Hears("after", heard))
        assert await request() == ["b", "c", "stop"]  # AddonHalt ends the dispatch
        manager.remove(manager.get("stop"))
        manager.add(Hears("fails", heard, fail=True), Hears("last", heard))
        found, logged, raised = await mitmproxys(manager, heard, caplog)
        assert found == ["b", "c", "after", "fails", "last"]  # an error is logged: the rest run
        assert [m for _, m, _ in logged] == ["Addon error: boom in fails"] and raised is None
        manager.clear()
        assert await request() == []


async def test_the_order_is_mitmproxys_depth_first_through_nested_addons(caplog):
    heard: list = []
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        inner = HearingHolder("inner", heard, [Hears("inner.1", heard), Deaf("inner.deaf"), HearsSync("inner.2", heard)])
        outer = HearingHolder("outer", heard, [HearsSync("outer.1", heard), inner, Hears("outer.2", heard)])
        manager.add(Hears("first", heard), Holder("empty", []), outer, Deaf("deaf"), HearsSync("last", heard))
        found, logged, raised = await mitmproxys(manager, heard, caplog)
        assert found == ["first", "outer", "outer.1", "inner", "inner.1", "inner.2", "outer.2", "last"]
        assert logged == [] and raised is None
        # a hook none of them has: nothing called, nothing logged
        found, logged, raised = await mitmproxys(manager, heard, caplog, hooks.RunningHook)
        assert (found, logged, raised) == ([], [], None)


async def test_an_error_ends_its_top_level_addon_logged_as_mitmproxy_logs_it_and_the_next_ones_run(caplog):
    heard: list = []
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Hears("a", heard),
                    Holder("holder", [Hears("held.1", heard), Hears("held.fails", heard, fail=True),
                                      Hears("held.skipped", heard)]),
                    Hears("b", heard), Hears("b.fails", heard, fail=True), HearsSync("c", heard))
        for _ in range(2):  # (the second time from the index)
            found, logged, raised = await mitmproxys(manager, heard, caplog)
            # mitmproxy's safecall is per top-level addon: the holder's last addon is not called
            assert found == ["a", "held.1", "held.fails", "b", "b.fails", "c"]
            assert logged == [("ERROR", "Addon error: boom in held.fails", ("request",)),
                              ("ERROR", "Addon error: boom in b.fails", ("request",))]  # traceback: from the hook on
            assert raised is None


async def test_addon_halt_ends_the_dispatch_and_options_error_propagates(caplog):
    heard: list = []

    class Refuses(HearsSync):
        def request(self, flow: HTTPFlow) -> None:
            super().request(flow)
            raise exceptions.OptionsError("no")

    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Hears("a", heard), Holder("holder", [Hears("halts", heard, halt=True), Hears("held.after", heard)]),
                    Hears("after", heard))
        assert await mitmproxys(manager, heard, caplog) == (["a", "halts"], [], None)
        manager.remove(manager.get("holder"))
        manager.add(Refuses("refuses", heard), Hears("not.reached", heard))
        assert await mitmproxys(manager, heard, caplog) == (["a", "after", "refuses"], [], exceptions.OptionsError)


async def test_async_hooks_and_awaitables_are_awaited_in_turn(caplog):
    heard: list = []

    class Slow(Hears):
        async def request(self, flow: HTTPFlow) -> None:
            self.heard.append(self.name + ".start")
            await asyncio.sleep(0)  # (another task may run: the dispatch waits for this hook)
            await asyncio.sleep(0)
            self.heard.append(self.name + ".end")

    class GivesAwaitable(Hears):
        def request(self, flow: HTTPFlow):  # a plain function returning an awaitable: awaited too
            return Hears.request(self, flow)

    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Slow("slow", heard), GivesAwaitable("gives", heard), HearsSync("sync", heard),
                    Holder("holder", [Slow("held.slow", heard), HearsSync("held.sync", heard)]))
        for _ in range(2):
            assert await mitmproxys(manager, heard, caplog) == (
                ["slow.start", "slow.end", "gives", "sync", "held.slow.start", "held.slow.end", "held.sync"], [], None)


async def test_a_hook_attribute_that_is_not_callable_is_reported_each_time_as_mitmproxy_does(caplog):
    heard: list = []
    odd = Hears("odd", heard)
    odd.request = "not callable"
    skipped = Hears("module", heard)
    skipped.request = logging  # (a module of the hook's name: skipped silently, as mitmproxy does)
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Hears("a", heard), Holder("holder", [Hears("held", heard), odd, Hears("held.after", heard)]),
                    skipped, Hears("b", heard))
        for _ in range(2):
            found, logged, raised = await mitmproxys(manager, heard, caplog)
            assert found == ["a", "held", "b"] and raised is None
            assert logged == [("ERROR", f"Addon error: Addon handler request ({odd}) not callable", ("_iter_hooks",))]
        odd.request = lambda flow: heard.append("odd, callable now")  # (read at each dispatch, as by mitmproxy)
        assert (await mitmproxys(manager, heard, caplog))[0] == ["a", "held", "odd, callable now", "held.after", "b"]


async def test_the_hooks_are_found_once_until_the_chain_changes(caplog):
    heard: list = []

    class Counted:
        name, reads = "counted", 0

        @property
        def addons(self) -> list:
            Counted.reads += 1
            return self._addons

    counted = Counted()
    counted._addons = [Hears("held", heard)]
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Hears("a", heard), counted)
        heard.clear()
        await manager.trigger_event(HttpRequestHook(tflow.tflow()))
        assert heard == ["a", "held"]
        read = Counted.reads
        for _ in range(5):
            await manager.trigger_event(HttpRequestHook(tflow.tflow()))
        assert heard == ["a", "held"] * 6
        assert Counted.reads == read  # the holder's addons were not walked again
        manager.add(Hears("b", heard))
        heard.clear()
        await manager.trigger_event(HttpRequestHook(tflow.tflow()))
        assert heard == ["a", "held", "b"] and Counted.reads > read  # found again for the changed chain


def script(path, name: str) -> str:
    path.write_text(textwrap.dedent(f"""
        def request(flow):
            flow.metadata.setdefault("heard", []).append({name!r})
        """))
    return str(path)


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_scripts_are_called_in_the_scripts_option_order_as_it_changes_and_a_reload_is_seen(tmp_path):
    one, two = script(tmp_path / "one.py", "one"), script(tmp_path / "two.py", "two")
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        loader = ScriptLoader()
        manager.add(loader)

        async def request() -> list:
            flow = tflow.tflow()
            await manager.trigger_event(HttpRequestHook(flow))
            return flow.metadata.get("heard", [])

        try:
            tctx.configure(loader, scripts=[one, two])
            await wait_for(lambda: len(loader.addons) == 2 and all(s.ns for s in loader.addons))
            assert await request() == ["one", "two"]
            tctx.configure(loader, scripts=[two, one])  # (reordered: nothing registered or removed)
            assert await request() == ["two", "one"]
            tctx.configure(loader, scripts=[one])
            assert await request() == ["one"]
            loaded = loader.addons[0].ns
            script(tmp_path / "one.py", "uno")
            later = time.time() + 10
            os.utime(one, (later, later))
            await wait_for(lambda: loader.addons[0].ns is not loaded and loader.addons[0].ns is not None)
            assert await request() == ["uno"]  # the script's watcher reloaded it
        finally:
            tctx.configure(loader, scripts=[])  # (ends the scripts' watchers)


@pytest.mark.parametrize("replaced", ["AddonManager.trigger_event", "ScriptLoader.configure"])
def test_install_refuses_a_mitmproxy_whose_dispatch_changed(replaced):
    owner, method = replaced.split(".")
    code = textwrap.dedent(f"""
        from mitmproxy.addonmanager import AddonManager
        from mitmproxy.addons.script import ScriptLoader
        def {method}(*args): pass
        {owner}.{method} = {method}
        from resp2chat_io import mitm_hooks
        mitm_hooks.install()
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "mitmproxy's hook dispatch changed" in done.stderr


class LogHears:
    def __init__(self, name: str, heard: list, fail: bool = False, halt: bool = False, coro: bool = False) -> None:
        self.name, self.heard, self.fail, self.halt = name, heard, fail, halt
        if coro:
            self.add_log = self._async_add_log

    def add_log(self, entry) -> None:
        self.heard.append(self.name)
        if self.fail:
            raise ValueError(f"boom in {self.name}")
        if self.halt:
            raise exceptions.AddonHalt

    async def _async_add_log(self, entry) -> None:
        self.heard.append(self.name)


def test_the_synchronous_dispatch_goes_through_the_index_as_mitmproxys_own(caplog):
    """``AddonManager.trigger``: mitmproxy sends every log record through it as an ``add_log``
    hook (its deprecated LegacyLogEvents); no addon has it, so it costs nothing, and one that has it
    hears it as from mitmproxy: in order, an error logged, AddonHalt, an async handler refused."""
    from mitmproxy.log import AddLogHook, LogEntry

    assert AddonManager.trigger is mitm_hooks.trigger
    heard: list = []

    def both(manager) -> tuple:
        results = []
        for dispatch in (mitm_hooks.trigger, mitm_hooks._original["trigger"]):
            heard.clear()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="mitmproxy.addonmanager"):
                dispatch(manager, AddLogHook(LogEntry("hello", "info")))
            results.append((list(heard), [(r.levelname, r.getMessage(),
                                           tuple(f.name for f in traceback.extract_tb(r.exc_info[2]))
                                           if r.exc_info else ())
                                          for r in caplog.records if r.name == "mitmproxy.addonmanager"]))
        assert results[0] == results[1]
        return results[0]

    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        manager.add(Deaf("deaf"), Holder("holder", []))
        assert both(manager) == ([], [])
        assert mitm_hooks._index(manager, AddLogHook(LogEntry("x", "info")), sync=True) == ()  # (nobody: nothing to walk)
        manager.add(LogHears("a", heard), LogHears("fails", heard, fail=True), LogHears("b", heard))
        found, logged = both(manager)
        assert found == ["a", "fails", "b"]
        assert [(level, message) for level, message, _ in logged] == [("ERROR", "Addon error: boom in fails")]
        assert logged[0][2][-1] == "add_log"  # (the traceback from the hook on, as mitmproxy cuts it)
        manager.add(LogHears("async", heard, coro=True), LogHears("stop", heard, halt=True), LogHears("after", heard))
        found, logged = both(manager)
        assert found == ["a", "fails", "b", "stop"]  # the async one refused (logged), AddonHalt ends it
        assert any("cannot be called from sync context" in message for _, message, _ in logged)
