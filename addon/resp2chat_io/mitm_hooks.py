"""A patch of mitmproxy 12's hook dispatch: each hook goes straight to the callables that have it.

Why. mitmproxy runs every hook through every addon of its chain, whether it has the hook or not
(``AddonManager.trigger_event``): for each of its ~45 built-in addons, and for ours, a
``safecall`` context manager, an ``invoke_addon`` coroutine and a ``traverse`` generator (a
``getattr`` on every addon below it: the script loader, its script, our module, our ~20 addons),
and a flow's hook is followed by an ``update`` hook dispatched the same way
(``handle_lifecycle``). That is ~0.1 ms a hook whoever listens. An HTTP turn has four flow hooks;
a WebSocket turn one message hook per message, ~12 (docs/performance.md, "Issue 22, third
round": a third of a socket turn's CPU was this dispatch).

What. ``install()`` (once; calling it again changes nothing) replaces
``AddonManager.trigger_event`` with one that keeps, per hook name, the hook's callables in
mitmproxy's order (each top-level addon of the chain in turn, its own callables found as
mitmproxy finds them: ``_iter_hooks``, ``traverse`` depth-first) and calls them directly: the
event's arguments taken once, an awaitable a callable returns awaited before the next one.
Errors as ``safecall`` has them, per top-level addon: an exception ends that addon's callables
and is logged by ``safecall`` itself (raised again inside it, from a function named as
mitmproxy's ``invoke_addon`` so that the logged traceback is cut where mitmproxy cuts it: from
the hook on), and the next addon is called; ``AddonHalt`` ends the dispatch; ``OptionsError``
propagates. A top-level addon whose walk raises (a hook attribute that is not callable: mitmproxy
raises ``AddonManagerError`` when it is invoked; a module under that name is skipped, as
mitmproxy skips it) is invoked by mitmproxy's own ``invoke_addon`` inside ``safecall`` at every
dispatch, as before.

``AddonManager.trigger``, the synchronous dispatch, goes through the same index: mitmproxy sends
every log record through it as an ``add_log`` hook (its deprecated ``LegacyLogEvents``, from the
loop's next pass), which no addon has: a socket turn's one log line cost ~0.2 ms of it. An addon
whose callables include a coroutine function is invoked by mitmproxy's ``invoke_addon_sync``, which
refuses it as before.

When the callables are found again. The index is kept until the chain changes: ``register``,
``remove`` and ``clear`` are counted, and so is ``ScriptLoader.configure`` (the ``scripts``
option: it reorders the scripts by assigning its ``addons`` list, without registering or
removing anything). A script's reload is a ``remove`` and a ``register`` (``Script.loadscript``).
What is not seen until the chain changes: an addon that sets a new hook attribute on itself (or
changes one) after its hooks were found, or an addon that changes the list of addons it holds
without calling ``register``/``remove`` (mitmproxy's ``register`` docs ask addons that manage
addons to call it) or not in the same synchronous step as that call. No mitmproxy addon and none
of ours does either.

Checked against mitmproxy 12.3 (every test runs real mitmdumps through it); ``install`` refuses
an ``AddonManager`` or a ``ScriptLoader`` whose methods are no longer the ones replaced or read.
"""

from __future__ import annotations

import functools
import inspect

from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy.addons import script

_Manager = addonmanager.AddonManager
_original = {name: getattr(_Manager, name, None)
             for name in ("trigger_event", "trigger", "register", "remove", "clear", "_iter_hooks", "invoke_addon",
                          "invoke_addon_sync")}
_original_configure = getattr(script.ScriptLoader, "configure", None)
_changes = 0  # how many times a chain may have changed (any manager's: they are rare)


def _hooked(manager, event: hooks.Hook) -> tuple:
    """(top-level addon, its callables for ``event`` in mitmproxy's order, or None: invoke it as
    mitmproxy does) for each addon of the chain that has the hook."""
    hooked = []
    for addon in manager.chain:
        try:
            funcs = tuple(func for _, func in manager._iter_hooks(addon, event))
        except Exception:  # noqa: BLE001 — (a hook that is not callable: invoking it says so, each time)
            hooked.append((addon, None))
            continue
        if funcs:
            hooked.append((addon, funcs))
    return tuple(hooked)


def invoke_addon(exc: Exception):
    """Raise ``exc`` again from the hook that raised it. Named as mitmproxy's
    ``AddonManager.invoke_addon``: ``safecall`` logs the traceback from the frame after the one of
    that name, the hook's, as for mitmproxy's own dispatch."""
    tb = exc.__traceback__
    raise exc.with_traceback(tb.tb_next if tb is not None else None)


def _index(manager, event: hooks.Hook, sync: bool = False) -> tuple:
    """The hook's (top-level addon, callables or None) found once per chain (``_hooked``); for
    the synchronous dispatch an addon with a coroutine function among them has None too:
    mitmproxy's ``invoke_addon_sync`` calls those before it and then says it cannot."""
    index = manager.__dict__.get("_resp2chat_index")
    chain = manager.chain
    key = (_changes, id(chain), len(chain))
    if index is None or index[0] != key:
        index = manager._resp2chat_index = (key, {})
    name = ("sync", event.name) if sync else event.name
    hooked = index[1].get(name)
    if hooked is None:
        hooked = _hooked(manager, event)
        if sync:
            hooked = tuple((addon, None if funcs is None or any(inspect.iscoroutinefunction(f) for f in funcs)
                            else funcs) for addon, funcs in hooked)
        index[1][name] = hooked
    return hooked


async def trigger_event(self, event: hooks.Hook) -> None:
    """``AddonManager.trigger_event``, calling the callables that have ``event`` directly."""
    hooked = _index(self, event)
    if not hooked:
        return
    args = event.args()
    for addon, funcs in hooked:
        if funcs is None:
            try:
                with addonmanager.safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return
            continue
        try:
            for func in funcs:
                res = func(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception as exc:  # noqa: BLE001 — logged by safecall, as mitmproxy's dispatch does
            with addonmanager.safecall():
                invoke_addon(exc)


def trigger(self, event: hooks.Hook) -> None:
    """``AddonManager.trigger`` (the synchronous dispatch: every log record's ``add_log``, which
    no addon of ours or mitmproxy's has, and ``update`` from commands), through the same index."""
    hooked = _index(self, event, sync=True)
    if not hooked:
        return
    args = event.args()
    for addon, funcs in hooked:
        if funcs is None:
            try:
                with addonmanager.safecall():
                    self.invoke_addon_sync(addon, event)
            except exceptions.AddonHalt:
                return
            continue
        try:
            for func in funcs:
                func(*args)
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception as exc:  # noqa: BLE001 — logged by safecall, as mitmproxy's dispatch does
            with addonmanager.safecall():
                invoke_addon(exc)


def _counting(method):
    @functools.wraps(method)
    def changed(*args, **kwargs):
        global _changes
        _changes += 1
        try:
            return method(*args, **kwargs)
        finally:
            _changes += 1

    changed.resp2chat = True
    return changed


def install() -> None:
    """Dispatch hooks through the index (once)."""
    if getattr(_Manager.trigger_event, "resp2chat", False):
        return
    if (any(fn is None for fn in _original.values())
            or not _original["trigger_event"].__qualname__.startswith("AddonManager.")
            or not _original["trigger"].__qualname__.startswith("AddonManager.")
            or _original_configure is None or _original_configure.__qualname__ != "ScriptLoader.configure"):
        raise RuntimeError("mitmproxy's hook dispatch changed: resp2chat_io/mitm_hooks.py needs a look")
    trigger_event.resp2chat = True
    _Manager.trigger_event = trigger_event
    _Manager.trigger = trigger
    _Manager.register = _counting(_original["register"])
    _Manager.remove = _counting(_original["remove"])
    _Manager.clear = _counting(_original["clear"])
    script.ScriptLoader.configure = _counting(_original_configure)
