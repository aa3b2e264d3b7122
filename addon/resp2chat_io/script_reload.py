"""The gateway's script is not reloaded when its file changes, nor unloaded by the ``scripts``
option: one gateway per process.

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
Every other script reloads as mitmproxy does.

mitmproxy's ``scripts`` option unloads a script the same way (``ScriptLoader.configure``: a
``remove``, its ``done`` hooks called synchronously) when a new value lacks its path: mitmweb's
options (``PUT /options``), a ``set scripts=…`` command, and the script watcher itself when the
file is gone (a deploy that deletes and writes it again). That stopped half-way too (the header
deadline's ``done`` run, the file's watcher cancelled), and worse: the script manager kept the
half-removed script, whose addons went on serving out of mitmproxy's
lookup, so every later value without its path failed ("No such addon") and a value that loaded
another copy of the gateway (another path to the file) then built a second gateway beside it,
in the hook chain after the first (its ``running`` hooks refused: a second relay port bound that
nothing serves, a second demo upstream). And an unload that worked would leave mitmproxy a plain
proxy to the backend (no key, Host or path check). So a value of ``scripts`` without the running
gateway's script is refused (``OptionsError``: mitmproxy puts the option back, mitmweb answers
400 saying why, and the watcher of a file that is gone ends, with a warning): the gateway stops
with its process. A second copy of the gateway loaded beside it is refused by mitmproxy itself
(``An addon called 'resp2chat_listen' already exists``), the first one's addons keeping their
names. Other scripts load and unload as mitmproxy does.

A setting the gateway refuses at start-up (``bind_addr`` beyond loopback without a key,
``upstream_base_url`` beside ``upstreams``…: an ``OptionsError`` from its ``configure``, which
mitmproxy calls as it loads the script) was logged by ``script.script_error_handler`` as "error in
script" with a traceback, and mitmproxy went on to print "listening at *:PORT" before its start-up
error check stopped it. ``install`` replaces that handler (a module global, looked up when the
gateway's own first load calls it) for such an error of the gateway's code: the message alone, one
error line. mitmproxy's start-up error check then ends the process (exit code 1) as before, right
after binding its servers and before any addon's ``running``; their "listening at" line, which
would say otherwise, is left out after any error the gateway logs before mitmproxy runs (``StartupError``:
also an invalid value in the environment or the config file, or of a ``--set``). Any other script error is logged as mitmproxy logs it (and a
value refused while it runs is mitmproxy's to report: the option keeps its old value).

``install`` refuses a ``Script`` whose ``loadscript``, a ``ScriptLoader`` whose ``configure``, or a
``script_error_handler``, is no longer the one it wraps (checked against mitmproxy 12.3)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addons import script

from . import mitm_hooks

log = logging.getLogger("resp2chat")
_original = getattr(script.Script, "loadscript", None)
_error_handler = getattr(script, "script_error_handler", None)
_OWN_CODE = str(Path(__file__).resolve().parent) + os.sep  # (resp2chat_io: the gateway's addons)


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


def refuse_unload(loader, updated) -> None:
    """Refuse a ``scripts`` value without the running gateway's script (module docstring)."""
    if "scripts" not in updated:
        return
    for sc in loader.addons:
        if sc.path in ctx.options.scripts or sc.ns is None or not _is_gateway(sc.ns):
            continue
        try:
            watcher = sc.reloadtask is not None and asyncio.current_task() is sc.reloadtask
        except RuntimeError:  # (no event loop: not the watcher)
            watcher = False
        why = ("its file was gone: mitmproxy no longer watches it" if watcher
               else "the scripts option no longer names it")
        refused = (f"resp2chat: the gateway's script {sc.path} is not unloaded ({why}): the gateway goes on as it was "
                   "started, its state kept (unloaded, it would leave a plain proxy to the backend); stop the "
                   "process to stop it, restart it to run another script")
        if watcher:  # (the refusal ends mitmproxy's watcher, which says nothing of it)
            log.warning(refused)
        raise exceptions.OptionsError(refused)


def refused_setting(exc: BaseException) -> bool:
    """An ``OptionsError`` raised by the gateway's own code (its message says what and why)."""
    if not isinstance(exc, exceptions.OptionsError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE):
            return True
        tb = tb.tb_next
    return False


def script_error(path: str, exc: Exception) -> None:
    """``script.script_error_handler``, but a setting the gateway refuses is its message alone
    (at start-up, without the "listening at" line of the servers mitmproxy then stops: module
    docstring)."""
    if not refused_setting(exc):
        _error_handler(path, exc)
        return
    log.error(str(exc))  # (at start-up, an error logged: mitmproxy's error check ends the process, exit 1)


class StartupError(logging.Handler):
    """The gateway's errors (its ``resp2chat`` logger): one logged before mitmproxy runs means
    mitmproxy's start-up error check ends the process once its servers are bound, so their
    "listening at" line, which would say otherwise, is left out."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        loader = ctx.master.addons.get("scriptloader") if getattr(ctx, "master", None) else None
        if loader is not None and not loader.is_running:
            logging.getLogger("mitmproxy.proxy.mode_servers").addFilter(_not_listening)


def _not_listening(record: logging.LogRecord) -> bool:
    return " listening at " not in record.getMessage()


def install() -> None:
    """Keep the gateway's script on a change of its file or of ``scripts`` (once; again changes nothing)."""
    if getattr(script.Script.loadscript, "resp2chat", False):
        return
    mitm_hooks.install()  # (first: it replaces ScriptLoader.configure, which is wrapped here)
    configure = script.ScriptLoader.configure
    if _original is None or _original.__qualname__ != "Script.loadscript" \
            or inspect.unwrap(configure).__qualname__ != "ScriptLoader.configure" \
            or getattr(_error_handler, "__qualname__", None) != "script_error_handler":
        raise RuntimeError("mitmproxy's script loading changed: resp2chat_io/script_reload.py needs a look")

    @functools.wraps(configure)
    def refusing(self, updated) -> None:
        refuse_unload(self, updated)
        configure(self, updated)

    wrapped = functools.wraps(_original)(loadscript)
    wrapped.resp2chat = True
    script.ScriptLoader.configure = refusing
    script.script_error_handler = script_error
    log.addHandler(StartupError())
    script.Script.loadscript = wrapped
