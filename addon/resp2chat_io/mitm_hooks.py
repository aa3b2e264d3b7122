"""A patch of mitmproxy 12's hook dispatch: each hook goes only to the addons that have it.

Why. mitmproxy runs every hook through every addon of its chain, whether it has the hook or not
(``AddonManager.trigger_event``): for each of its ~45 built-in addons, and for ours, a
``safecall`` context manager, an ``invoke_addon`` coroutine and a ``traverse`` generator, and a
flow's hook is followed by an ``update`` hook dispatched the same way (``handle_lifecycle``).
That is ~0.1 ms a hook whoever listens. An HTTP turn has four flow hooks; a WebSocket turn one
message hook per message, ~12 (docs/performance.md, "Issue 22, third round": a third of a socket
turn's CPU was this dispatch).

What. ``install()`` (once; calling it again changes nothing) replaces
``AddonManager.trigger_event`` with one that visits, in chain order, only the top-level addons
that may answer the hook: those that have it (themselves or an addon below them, mitmproxy's
``traverse``) and every addon that holds others (an ``addons`` attribute: mitmproxy's script
loader holds the scripts, which come and go). Each is invoked as before (``invoke_addon``:
its hooks found when it runs, inside ``safecall``, ``AddonHalt`` stops the dispatch). Which
addons to visit is found once per hook name and kept until an addon is registered or removed
(``register``, ``remove`` and ``clear`` count the chain's changes). The only difference: a top-level addon
holding no others that gains a hook method on itself after that is not called for it until the
chain changes; no mitmproxy addon does that.

Checked against mitmproxy 12.3 (every test runs real mitmdumps through it); ``install`` refuses
an ``AddonManager`` whose dispatch is no longer the one replaced.
"""

from __future__ import annotations

from mitmproxy import addonmanager, exceptions, hooks

_Manager = addonmanager.AddonManager
_original = {name: getattr(_Manager, name, None)
             for name in ("trigger_event", "register", "remove", "clear", "_iter_hooks", "invoke_addon")}


def _answers(manager, addon, event: hooks.Hook) -> bool:
    """The addon may have a hook for ``event``: it holds others, or it or one below it has it."""
    if hasattr(addon, "addons"):
        return True
    try:
        return any(True for _ in manager._iter_hooks(addon, event))
    except Exception:  # noqa: BLE001 — (a hook that is not callable: invoking it says so, as before)
        return True


async def trigger_event(self, event: hooks.Hook) -> None:
    """``AddonManager.trigger_event``, visiting only the addons that may answer ``event``."""
    index = self.__dict__.get("_resp2chat_index")
    chain = self.chain
    key = (self.__dict__.get("_resp2chat_generation", 0), id(chain), len(chain))
    if index is None or index[0] != key:
        index = self._resp2chat_index = (key, {})
    visit = index[1].get(event.name)
    if visit is None:
        visit = index[1][event.name] = tuple(a for a in chain if _answers(self, a, event))
    for addon in visit:
        try:
            with addonmanager.safecall():
                await self.invoke_addon(addon, event)
        except exceptions.AddonHalt:
            return


def _counting(method):
    def changed(self, *args, **kwargs):
        self._resp2chat_generation = self.__dict__.get("_resp2chat_generation", 0) + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._resp2chat_generation += 1

    changed.resp2chat = True
    return changed


def install() -> None:
    """Dispatch hooks through the index (once)."""
    if getattr(_Manager.trigger_event, "resp2chat", False):
        return
    if any(fn is None for fn in _original.values()) or not _original["trigger_event"].__qualname__.startswith(
            "AddonManager."):
        raise RuntimeError("mitmproxy's hook dispatch changed: resp2chat_io/mitm_hooks.py needs a look")
    trigger_event.resp2chat = True
    _Manager.trigger_event = trigger_event
    _Manager.register = _counting(_original["register"])
    _Manager.remove = _counting(_original["remove"])
    _Manager.clear = _counting(_original["clear"])
