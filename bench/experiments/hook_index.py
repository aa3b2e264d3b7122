"""Experiment (bench only): mitmproxy's hook dispatch, indexed by hook name.

    .venv/bin/python bench/run.py --paths direct passthrough resp2chat --phases c1 --extra websocket \\
        --no-install --no-replay --ab bench/experiments/hook_index.py

mitmproxy runs every hook (and, for a flow's hook, an ``update`` after it: ``handle_lifecycle``)
through all ~45 addons of its chain, whether they have the hook or not: for each, a
``safecall`` context manager, an ``invoke_addon`` coroutine and a ``traverse`` generator
(``AddonManager.trigger_event``). A WebSocket turn is ~12 messages, so ~24 such dispatches, where
an HTTP turn has 4 flow hooks (8 dispatches); the profile puts hook dispatch at ~30 % of a socket
turn's CPU. This wrapper dispatches each hook only to the addons that have it (found once per hook
name and chain), each still inside ``safecall``, in the same order. Not for production as it
stands: it is a second patch of mitmproxy, and a script that gains or loses a hook (reloaded)
or an addon that sets one on itself later is not seen. What it measured: how much of the
socket's extra is mitmproxy's dispatch (docs/performance.md, "Issue 22, third round"); the
gateway now does this itself, robustly (resp2chat_io/mitm_hooks.py), so over this tree the
wrapper measures only what caching the hook callables too would add.
"""

import inspect

from mitmproxy import addonmanager, exceptions

import resp2chat

_found: dict = {}


async def trigger_event(self, event):
    key = (event.name, id(self.chain), len(self.chain))
    hooked = _found.get(key)
    if hooked is None:
        hooked = [(addon, funcs) for addon in self.chain
                  if (funcs := [f for _, f in self._iter_hooks(addon, event)])]
        _found[key] = hooked
    args = event.args()
    for _, funcs in hooked:
        try:
            with addonmanager.safecall():
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
        except exceptions.AddonHalt:
            return


addonmanager.AddonManager.trigger_event = trigger_event
addons = resp2chat.addons
