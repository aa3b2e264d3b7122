"""Run a gateway from Python: test suites, notebooks, other tools.

    import resp2chat_io

    with resp2chat_io.start(upstream_base_url="http://127.0.0.1:8000/v1", model_map={"gpt-5": "qwen3"}) as gw:
        client = openai.OpenAI(base_url=gw.url, api_key="unused")
        ...

``start`` runs ``mitmdump -s addon/resp2chat.py`` in a subprocess on a free loopback port (or the
one given), with every keyword argument as a setting (``--set resp2chat_<name>=…``: the names of
README's configuration table; maps, lists and ``upstreams`` as Python objects), waits until it
answers ``/healthz`` and returns a ``Gateway``: ``url`` (``http://127.0.0.1:PORT/v1``, what a
client's ``base_url`` wants), ``stop()`` (SIGTERM, then SIGKILL), a context manager. It fails
with ``StartError`` naming the reason (an invalid setting, a port in use) and the log's tail.

By default the gateway ignores the user's config file and ``RESP2CHAT_*`` environment
(``isolated=True``), so what runs is what the call says; ``isolated=False`` layers the arguments
over them like ``--set`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from resp2chat_core import settings as S
from resp2chat_io import ADDON


class StartError(RuntimeError):
    """The gateway did not start (or a setting is invalid). Not resp2chat_core's ``GatewayError``
    (a request the gateway refuses); ``resp2chat_io.GatewayError`` is this class's old name."""


def _mitmdump() -> str:
    here = Path(sys.executable).with_name("mitmdump")
    found = str(here) if here.exists() else shutil.which("mitmdump")
    if not found:
        raise StartError("mitmdump not found (pip install resp2chat brings mitmproxy)")
    return found


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _option_values(name: str, value: Any) -> list[str]:
    """A setting as ``--set`` texts, checked against the settings table first: one, or for a list
    one per entry, as mitmproxy reads a list option (an empty list: the bare ``--set NAME``)."""
    if name in S.ALIASES:
        name = S.ALIASES[name].name
    field = S.BY_NAME.get(name)
    if field is None:
        raise StartError(f"{name}: {S.unknown_setting(name)}")
    try:
        if field.kind == "list":
            entries = S.parse(field, value if isinstance(value, str) else list(value), "start()")
            return [f"resp2chat_{name}={entry}" for entry in entries] or [f"resp2chat_{name}"]
        if field.kind in ("map", "entries") and not isinstance(value, str):
            text = json.dumps(value)
        elif field.kind == "bool":
            text = "true" if S.parse(field, value, "start()") else "false"  # ("false", "off": false)
        else:
            text = str(value)
        S.parse(field, text, "start()")
    except S.SettingsError as exc:
        raise StartError(str(exc)) from None
    return [f"resp2chat_{name}={text}"]


class Gateway:
    """A running gateway process (see ``start``)."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int, log_path: Path, workdir: Path | None) -> None:
        self.proc, self.host, self.port, self.log_path = proc, host, port, log_path
        self._workdir = workdir  # a temporary folder start() made (removed at stop)

    @property
    def origin(self) -> str:
        return f"http://{S.url_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL clients use: ``http://HOST:PORT/v1``."""
        return self.origin + "/v1"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """What mitmdump printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """Stop it: SIGTERM (mitmdump finishes writing flow files), SIGKILL after ``timeout``.
        Returns the exit code; stopping twice is fine."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return self.proc.returncode

    def __enter__(self) -> "Gateway":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<resp2chat gateway {self.url} pid={self.proc.pid}{'' if self.running else ' stopped'}>"


def start(upstream_base_url: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
          isolated: bool = True, mitmproxy_args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
          env: dict[str, str] | None = None, timeout: float = 30.0, **settings: Any) -> Gateway:
    """Start a gateway in a subprocess and wait until it answers; returns a ``Gateway``.

    ``upstream_base_url``: the backend (``"demo"``: the bundled scripted one); ``**settings``: any
    other setting by name (``upstreams=[{...}]``, ``state_store_url="redis://…"``,
    ``gateway_api_key="…"``…). ``port=0`` picks a free one. ``mitmproxy_args``: more mitmdump
    arguments (``["-w", "flows.mitm"]``). ``log_path``: where mitmdump's output goes (default: a
    temporary file, removed at ``stop``). ``env``: extra environment variables for the process.
    """
    if upstream_base_url is not None:
        settings["upstream_base_url"] = upstream_base_url
    # an old name beside its new one: the new one wins, as everywhere (both were --set of the new name)
    settings = {name: value for name, value in settings.items()
                if not (name in S.ALIASES and S.ALIASES[name].name in settings)}
    options = [option for name, value in settings.items() for option in _option_values(name, value)]
    if "bind_addr" in settings:  # (checked just above) the address named in --mode below: it wins over --set
        if port or host != "127.0.0.1":
            raise StartError("bind_addr says what host= and port= say: give one or the other")
        host, port = S.parse_bind(str(settings["bind_addr"]))
    # Settings that are or may hold secrets go in the process environment (RESP2CHAT_<FIELD>), not
    # on its command line, which any local user can read in `ps`.
    secret = {o for o in options if o.split("=", 1)[0].removeprefix("resp2chat_") in S.SECRET_FIELDS | S.HOLDS_SECRETS}
    options = [o for o in options if o not in secret]
    process_env = dict(os.environ)
    workdir = Path(tempfile.mkdtemp(prefix="resp2chat-gateway-"))
    if isolated:
        for name in list(process_env):
            if name.startswith("RESP2CHAT_") or name in ("OPENAI_API_KEY", "BRAVE_SEARCH_API_KEY"):
                del process_env[name]
        process_env["RESP2CHAT_CONFIG"] = str(workdir / "no-config.yaml")  # (never written: no file settings)
    for opt in secret:
        name, _, text = opt.partition("=")
        process_env["RESP2CHAT_" + name.removeprefix("resp2chat_").upper()] = text
    process_env.update(env or {})
    log_file = Path(log_path) if log_path else workdir / "mitmdump.log"
    why = ""
    for _ in range(3):  # a free port can be taken between choosing it and binding it
        chosen = port or _free_port(host)
        # The reverse target only matters for paths outside /v1 (passed through as they are).
        cmd = [_mitmdump(), "-s", str(ADDON), "--mode", f"reverse:{_reverse_target(settings)}@{host}:{chosen}",
               "--set", f"confdir={workdir / 'mitmproxy'}"]
        for opt in options:
            cmd += ["--set", opt]
        cmd += list(mitmproxy_args)
        with log_file.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=process_env, cwd=workdir)
        gw = Gateway(proc, S.reach_host(host), chosen, log_file, None)
        why = _wait_ready(gw, timeout)
        if why is None:
            gw._workdir = workdir
            return gw
        gw.stop()
        if port or "address already in use" not in why.lower():
            break
    shutil.rmtree(workdir, ignore_errors=True)
    raise StartError(why)


def _reverse_target(settings: dict) -> str:
    parts = urllib.parse.urlsplit(S.first_upstream(settings))
    return f"{parts.scheme}://{parts.netloc}"


def _wait_ready(gw: Gateway, timeout: float) -> str | None:
    """None once /healthz answers; else why not (with the log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            return f"the gateway exited with {gw.proc.returncode}:\n{gw.log()[-3000:]}"
        try:
            with urllib.request.urlopen(gw.origin + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    return f"the gateway did not answer /healthz within {timeout:g} s:\n{gw.log()[-3000:]}"
