"""The gateway's script is not reloaded when its file changes: one gateway per process.

mitmproxy watches every ``-s`` script and reloads it when its file's mtime moves
(``Script.loadscript``): it removes the script's addons (``AddonManager.remove``, which calls their
``done`` hooks synchronously) and runs the file again for new ones. For the gateway that is wrong
three ways:

- it cannot work: the gateway's ``done`` hooks (closing the relay, the store, background turns)
  are coroutines, which the synchronous call refuses (``AddonManagerError``) after removing the
  addons from the chain: the reload stops there, in mitmproxy's watcher task, and the gateway is
  left without its addons, a plain reverse proxy (no gateway key, Host or path check) — what
  tests/test_startup_fails_closed.py guards against at start-up;
- had it worked, it would be a restart that keeps nothing: stored responses, limits' counts,
  background turns and turns in flight (their relay closed) gone, and ``BodyAside`` and
  ``KeepUpgrades``, which the addons add to mitmproxy outside the script, holding the old ones;
- and it would run no new code: everything but the few lines of addon/resp2chat.py is imported
  from ``resp2chat_io`` once per process (Python's module cache), so the new addons would be the
  old code with empty state.

So ``install()`` (called by ``build()``) keeps a script whose addons are the gateway's as it is
when its file changes, and says so once per change (a warning: a restart runs the new file).
Every other script reloads as mitmproxy does. ``install`` refuses a ``Script`` whose
``loadscript`` is no longer the one it wraps (checked against mitmproxy 12.3)."""

from __future__ import annotations

import functools
import logging

from mitmproxy.addons import script

log = logging.getLogger("resp2chat")
_original = getattr(script.Script, "loadscript", None)


def _is_gateway(ns) -> bool:
    from .addons.listen import Listen  # (the gateway's first addon: only build() makes one)

    return any(isinstance(addon, Listen) for addon in getattr(ns, "addons", None) or ())


def loadscript(self) -> None:
    """``Script.loadscript``, but not again for the gateway's script (module docstring)."""
    if self.ns is not None and _is_gateway(self.ns):
        log.warning(f"resp2chat: {self.path} changed on disk: the gateway goes on as it was started (its code "
                    "is not reloaded while it runs, and its state is kept); restart it to run the change")
        return
    _original(self)


def install() -> None:
    """Keep the gateway's script on a change of its file (once; again changes nothing)."""
    if getattr(script.Script.loadscript, "resp2chat", False):
        return
    if _original is None or _original.__qualname__ != "Script.loadscript":
        raise RuntimeError("mitmproxy's script loading changed: resp2chat_io/script_reload.py needs a look")
    wrapped = functools.wraps(_original)(loadscript)
    wrapped.resp2chat = True
    script.Script.loadscript = wrapped
