"""The ``resp2chat`` command: configure, keys, start, print-config, usage, analyze, retranslate."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from resp2chat_core import settings as S
from resp2chat_core.clients import DEFAULT, KEY_PREFIX, LIMITS, key_sha256, parse_clients
from resp2chat_io import ADDON
from resp2chat_io.columns import table
from resp2chat_io.config import Loaded, config_path, editing, load_settings, read_file, write_file


def _fail(message: str) -> int:
    print(f"resp2chat: {message}", file=sys.stderr)
    return 2


def _settings() -> Loaded:
    try:
        return load_settings()
    except S.SettingsError as exc:
        raise SystemExit(_fail(str(exc))) from None


def list_models(base_url: str, api_key: str = "", timeout: float = 3.0) -> list[dict]:
    """The upstream's /models entries ([] when it does not answer)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = requests.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout)
        data = r.json() if r.ok else {}
    except (requests.RequestException, ValueError):
        return []
    models = data.get("data") if isinstance(data, dict) else None
    return [m for m in models or () if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]


def context_window(model: dict) -> int | None:
    """vLLM max_model_len, OpenRouter/LM Studio context_length, llama.cpp meta.n_ctx_train."""
    for key in ("max_model_len", "context_length", "max_context_length", "context_window"):
        if isinstance(model.get(key), int) and model[key] > 0:
            return model[key]
    meta = model.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("n_ctx_train"), int):
        return meta["n_ctx_train"]
    return None


def first_upstream_key(values: dict) -> str:
    """The key the gateway sends to ``S.first_upstream``: with ``upstreams`` (and no
    ``upstream_base_url``), that entry's own ``api_key`` (upstream_api_key is not theirs)."""
    entry = S.first_upstream_entry(values)
    return (entry.get("api_key") or "") if entry is not None else values["upstream_api_key"]


# --- configure -------------------------------------------------------------------------------


def _ask(prompt: str, current: str) -> str:
    shown = f" [{current}]" if current else ""
    print(f"{prompt}{shown}: ", end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        return current
    return line.strip() or current


def cmd_configure(args) -> int:
    path = config_path()
    try:
        values, _ = S.resolve(read_file(path), {})
    except S.SettingsError as exc:
        return _fail(str(exc))
    before = dict(values)
    given = {name: getattr(args, name) for name in ("upstream_base_url", "upstream_api_key", "upstream_model", "bind_addr")
             if getattr(args, name) is not None}
    typed = {item.partition("=")[0] for item in args.set or ()}
    for item in args.set or ():
        name, _, raw = item.partition("=")
        if name in S.ALIASES:
            new = S.ALIASES[name].name
            if new in typed:  # (an old name beside the new one: the new one wins, wherever each stands)
                print(f"resp2chat: --set {name} is ignored: {new} is set too (the new name wins)", file=sys.stderr)
                continue
            print(f"resp2chat: {S.deprecated(name)}", file=sys.stderr)
            name = new
        if name not in S.BY_NAME:
            return _fail(f"--set {name}: {S.unknown_setting(name)}")
        given[name] = raw
    interactive = not args.yes
    try:
        for name, raw in given.items():
            values[name] = S.parse(S.BY_NAME[name], raw, "command line")
        if interactive:
            # with upstreams, no upstream_base_url asked: one beside them would stop the gateway
            if S.first_upstream_entry(values) is not None:  # (the file keeps them)
                names = ", ".join(str(e.get("name") or e.get("base_url")) for e in values["upstreams"])
                print(f"(upstreams: {names}; edit {path} to change them)")
                url, api_key = S.first_upstream(values), first_upstream_key(values)
            else:  # the file's value is the answer Enter keeps (`demo` too), else the default
                url = values["upstream_base_url"] = _ask("Chat Completions base URL",
                                                         values["upstream_base_url"] or S.DEFAULT_UPSTREAM)
                S.validate("upstream_base_url", url)
                key = _ask("Upstream API key (empty for none)", "[keep]" if values["upstream_api_key"] else "")
                if key != "[keep]":
                    values["upstream_api_key"] = key
                api_key = values["upstream_api_key"]
            models = [] if url == "demo" else list_models(url, api_key)
            if models:
                print("Models offered by the upstream:")
                for i, m in enumerate(models, 1):
                    window = context_window(m)
                    print(f"  {i}. {m['id']}" + (f"  (context {window})" if window else ""))
            elif url == "demo":
                print("(the bundled demo upstream serves demo-model)")
            else:
                print(f"(no model list from {url.rstrip('/')}/models: nothing answers there, or it lists none; type a name)")
            choice = _ask("Model to use", values["upstream_model"] or (models[0]["id"] if models else ""))
            if choice.isdigit() and models and 1 <= int(choice) <= len(models):
                choice = models[int(choice) - 1]["id"]
            values["upstream_model"] = choice
            values["bind_addr"] = _ask("Gateway listen address", values["bind_addr"])
            S.validate("bind_addr", values["bind_addr"])
    except S.SettingsError as exc:
        return _fail(str(exc))
    # What this run set (given, or answered otherwise than the file said) goes over the file as it
    # is now, under the lock `keys` takes: a `keys add` while the questions were asked is kept.
    changed = {name: value for name, value in values.items() if name in given or value != before[name]}
    with editing(path):
        try:
            now, _ = S.resolve(read_file(path), {})
        except S.SettingsError as exc:
            return _fail(str(exc))
        write_settings(path, {**now, **changed})
    print(f"wrote {path}")
    return 0


def write_settings(path: Path, values: dict) -> None:
    """The config file holds what differs from the defaults."""
    write_file(path, {k: v for k, v in values.items() if v != S.BY_NAME[k].default})


# --- keys ------------------------------------------------------------------------------------

CLIENT_KEY_PREFIX = KEY_PREFIX  # a resp2chat client key, recognisable in a leak report or a secret scanner
CLIENT_KEY_ENV = "RESP2CHAT_API_KEY"  # where a developer keeps their client key (print-config --key-env)


def new_key() -> str:
    """A client key: 256 random bits, URL-safe."""
    return CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)


def new_client_id() -> str:
    """A client's identity (clients.py ``id``): 128 random bits, hex. Not a secret."""
    return secrets.token_hex(16)


def _file_values(path: Path) -> dict:
    """The config file's settings alone (no environment), validated: what ``keys`` edits."""
    values, _ = S.resolve(read_file(path), {})
    return values


def _overridden() -> None:
    if "RESP2CHAT_CLIENTS" in os.environ:
        print("resp2chat: note: RESP2CHAT_CLIENTS is set here; a gateway started with it uses that list, "
              "not the config file's", file=sys.stderr)


def _limits(spec) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {getattr(spec, k):,}" for k in LIMITS if getattr(spec, k) is not None) or "no limits"


def cmd_keys_add(args) -> int:
    path = config_path()
    with editing(path):
        clients = None
        try:
            values = _file_values(path)
            clients = list(values["clients"])
            if any(e.get("name") == args.name for e in clients):
                return _fail(f"a client named {args.name!r} exists already in {path} "
                             f"(`resp2chat keys revoke {args.name}` first, or choose another name)")
            key = new_key()
            # (the identity: what the client stores is its, not the name's: owner.py; a name revoked
            # and added again is someone else's)
            entry = {"name": args.name, "id": new_client_id(), "key_sha256": key_sha256(key)}
            if args.models is not None:  # (an empty glob, `--models ''`, is refused, never read as "all")
                entry["models"] = [glob.strip() for value in args.models for glob in value.split(",")]
            entry.update({k: getattr(args, k) for k in LIMITS if getattr(args, k) is not None})
            gateway_key = os.environ.get("RESP2CHAT_GATEWAY_API_KEY") or values["gateway_api_key"]
            spec = parse_clients(clients + [entry], gateway_key)[len(clients)]
        except S.SettingsError as exc:  # (the file's own error, before clients: as it is)
            return _fail(str(exc) if clients is None else _as_typed(exc, len(clients)))
        values["clients"] = clients + [entry]
        write_settings(path, values)
    return _hand_over(key, f"added client {spec.name!r} to {path}", spec)


def _as_typed(exc: S.SettingsError, at: int) -> str:
    """An error in the entry ``keys add`` made (``clients[AT]``), worded for the command the user
    typed (the name, the option) rather than for the config file's list; any other as it is."""
    label = f"clients[{at}]"
    if not exc.field.startswith((label + " ", label + ".")):
        return str(exc)
    field = exc.field.rpartition(".")[2]
    if field == "name":
        return f"invalid client name {exc.value!r}: {exc.why}"
    if field == "models" and isinstance(exc.value, list):
        return f"--models {','.join(map(str, exc.value))!r}: {exc.why}"
    if field in LIMITS:
        return f"--{field.replace('_', '-')} {exc.value}: {exc.why}"
    return str(exc)


def _hand_over(key: str, what: str, spec) -> int:
    """The new key on stdout, alone (``KEY=$(resp2chat keys add NAME)`` works); what to do with it
    on stderr. Its output closed (``keys add NAME | true``): the key is lost, and it says so (1)."""
    try:
        print(key, flush=True)
    except BrokenPipeError:
        _stdout_gone()
        print(f"resp2chat: {what}, but the key was not shown: the output was closed, and the config file "
              f"keeps only its SHA-256, so no one has it: run `resp2chat keys rotate {spec.name}` for a new "
              f"one (or `resp2chat keys revoke {spec.name}`)", file=sys.stderr)
        return 1
    env = CLIENT_KEY_ENV
    print(f"""resp2chat: {what}: key fingerprint {spec.fingerprint}, models {', '.join(spec.models)}, {_limits(spec)}.
The key above is shown only this once (the config file keeps its SHA-256): hand it to {spec.name} now.
They keep it in an environment variable, e.g. export {env}=<the key>, and use it as:
  Codex, custom provider:   env_key = "{env}" in the provider (resp2chat print-config --key-env {env})
  Codex, built-in provider: printenv {env} | codex login --with-api-key   (once; `codex exec` also reads CODEX_API_KEY)
  SDKs:                     api_key=<the key>, base_url=<the gateway>/v1""", file=sys.stderr)
    _overridden()
    return 0


def cmd_keys_rotate(args) -> int:
    """A new key for the same client: the old one stops working (a running gateway's turns of it
    stop too), and what the client stored stays its own (its ``id`` is kept: owner.py)."""
    path = config_path()
    with editing(path):
        try:
            values = _file_values(path)
            clients = list(values["clients"])
            at = next((i for i, e in enumerate(clients) if e.get("name") == args.name), None)
            if at is None:
                if args.name == DEFAULT and (values["gateway_api_key"] or os.environ.get("RESP2CHAT_GATEWAY_API_KEY")):
                    return _fail("'default' is the client of gateway_api_key: change gateway_api_key to rotate it")
                return _fail(f"no client named {args.name!r} in {path} (`resp2chat keys list` shows them)")
            key = new_key()
            entry = {k: v for k, v in clients[at].items() if k not in ("key", "key_sha256")}
            entry["key_sha256"] = key_sha256(key)
            clients[at] = entry
            gateway_key = os.environ.get("RESP2CHAT_GATEWAY_API_KEY") or values["gateway_api_key"]
            spec = parse_clients(clients, gateway_key)[at]
        except S.SettingsError as exc:
            return _fail(str(exc))
        values["clients"] = clients
        write_settings(path, values)
    return _hand_over(key, f"a new key for client {spec.name!r} in {path} (the old one no longer works; what it "
                           "stored stays its own)", spec)


def cmd_keys_list(args) -> int:
    values, sources, path, _ = _settings()
    try:
        specs = parse_clients(values["clients"], values["gateway_api_key"])
    except S.SettingsError as exc:
        return _fail(str(exc))
    if not specs:
        print(f"resp2chat: no clients (add one with `resp2chat keys add NAME`; config file {path})", file=sys.stderr)
        return 0
    unlimited = "-"
    rows = [(s.name, s.fingerprint, (s.id or "-")[:8], ", ".join(s.models),
             *(unlimited if getattr(s, k) is None else f"{getattr(s, k):,}" for k in LIMITS)) for s in specs]
    sys.stdout.write(table(("NAME", "KEY", "ID", "MODELS", "RPM", "TPM", "MAX STREAMS", "MAX SOCKETS"), rows,
                           right=(4, 5, 6, 7)))
    where = {"config file": str(path), "default": str(path)}.get(sources["clients"], sources["clients"])
    print(f"\nKEY: the first 8 hex digits of the key's SHA-256 (printf %s \"$KEY\" | sha256sum | cut -c1-8). "
          "ID: the first 8 of the client's identity, which owns its stored state and its limits' counts "
          "(keys rotate keeps it; -: none, its name does). "
          f"RPM, TPM, MAX STREAMS, MAX SOCKETS -: no limit. Clients from {where}"
          + ("; default: the client of gateway_api_key." if values["gateway_api_key"] else "."))
    return 0


def cmd_keys_revoke(args) -> int:
    path = config_path()
    with editing(path):
        try:
            values = _file_values(path)
        except S.SettingsError as exc:
            return _fail(str(exc))
        clients = list(values["clients"])
        kept = [e for e in clients if e.get("name") != args.name]
        if len(kept) == len(clients):
            if args.name == DEFAULT and (values["gateway_api_key"] or os.environ.get("RESP2CHAT_GATEWAY_API_KEY")):
                return _fail("'default' is the client of gateway_api_key: change or remove gateway_api_key to revoke it")
            return _fail(f"no client named {args.name!r} in {path} (`resp2chat keys list` shows them)")
        gone = next(e for e in clients if e.get("name") == args.name)
        values["clients"] = kept
        write_settings(path, values)
    digest = gone.get("key_sha256") or key_sha256(gone.get("key") or "")
    print(f"revoked client {args.name!r} (key fingerprint {digest[:8].lower()}) in {path}")
    _overridden()
    return 0


# --- start -----------------------------------------------------------------------------------


def unanswered(urls, timeout: float = 1.5) -> dict[str, str]:
    """The URLs at whose host and port nothing accepts a TCP connection within ``timeout``, all
    tried at once (so ``start`` waits ``timeout`` at most, however many): url -> why. Sends nothing
    (no request, no key), and connects as the gateway does (directly: no HTTP(S)_PROXY)."""
    urls = list(dict.fromkeys(urls))
    why: dict[str, str] = {}

    def connect(url: str) -> None:
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            why[url] = ""
        except ConnectionRefusedError:
            why[url] = "connection refused"
        except socket.gaierror:
            why[url] = f"unknown host {parts.hostname}"
        except (OSError, ValueError) as exc:  # (a timeout: said below)
            if not isinstance(exc, TimeoutError):
                why[url] = getattr(exc, "strerror", None) or str(exc)

    threads = [threading.Thread(target=connect, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {url: why.get(url) or f"no answer within {timeout:g} s" for url in urls if why.get(url) != ""}


def _upstream_answers(url: str) -> bool:
    return not unanswered([url])


def _gives_mode(mitmproxy_args) -> bool:
    return any(a == "--mode" or a.startswith("--mode=") for a in mitmproxy_args)


def probed_upstreams(values: dict, demo: bool, mitmproxy_args) -> list[str]:
    """The base URLs a gateway with these settings sends to, which ``start`` checks: none for the
    demo upstream (the gateway serves it itself), nor for a ``--mode`` of the user's own."""
    if demo:
        return []
    if values["upstream_base_url"]:
        return [values["upstream_base_url"]]
    if values["upstreams"]:
        return [u["base_url"] for u in values["upstreams"] if u.get("base_url") not in (None, "", "demo")]
    return [] if _gives_mode(mitmproxy_args) else [S.DEFAULT_UPSTREAM]


def build_start_command(args, values: dict, sources: dict) -> tuple[list[str], dict]:
    tool = "mitmweb" if args.web else "mitmdump"
    exe = Path(sys.executable).with_name(tool)
    cmd = [str(exe) if exe.exists() else (shutil.which(tool) or tool), "-s", str(ADDON)]
    env = dict(os.environ)
    demo = values["upstream_base_url"] == "demo"
    if args.demo or (sources["upstream_base_url"] == "default" and not values["upstreams"]
                     and not _upstream_answers(S.DEFAULT_UPSTREAM)):
        env["RESP2CHAT_UPSTREAM_BASE_URL"], demo = "demo", True
        env["RESP2CHAT_UPSTREAMS"] = "[]"  # the demo instead of a configured list, not beside it
        if not args.demo:
            print(f"resp2chat: no backend configured and none at {S.DEFAULT_UPSTREAM}: serving the bundled "
                  "demo upstream (configure one with `resp2chat configure`)", file=sys.stderr)
    if not _gives_mode(args.mitmproxy_args):
        # Name the listen address in the mode so mitmproxy never binds its default *:8080 first.
        # (the demo upstream's port is only known inside the addon, which routes /v1 to it)
        target = urlsplit(S.DEFAULT_UPSTREAM if demo else S.first_upstream(values))
        cmd += ["--mode", f"reverse:{target.scheme}://{target.netloc}@{S.listen_spec(values['bind_addr'])}"]
    if args.raw:
        cmd += ["--set", "resp2chat_raw=true", "--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]
    cmd += args.mitmproxy_args
    return cmd, env


def set_settings(mitmproxy_args) -> dict:
    """The settings among mitmproxy's arguments (``--set resp2chat_NAME=VALUE``, ``--set=…``; an
    old name as its field): name -> the text given (a list setting: every one; a bare
    ``--set resp2chat_NAME``: ``true``, as mitmproxy reads it)."""
    given: dict = {}
    old: dict = {}  # (under an old name: below the new name, as the addon reads them)
    args = list(mitmproxy_args)
    for i, arg in enumerate(args):
        if arg.startswith("--set="):
            spec = arg.removeprefix("--set=")
        elif arg == "--set" and i + 1 < len(args):
            spec = args[i + 1]
        else:
            continue
        name, eq, text = spec.partition("=")
        name = name.removeprefix("resp2chat_") if name.startswith("resp2chat_") else ""
        field = S.BY_NAME.get(name) or S.ALIASES.get(name)
        if field is None:
            continue
        text = text if eq else "true"
        into = given if name == field.name else old
        if field.kind == "list":
            into.setdefault(field.name, []).append(text)
        else:
            into[field.name] = text
    return old | given


def listen_args(mitmproxy_args) -> dict:
    """mitmproxy's own listen address among its arguments: ``{"listen_host": text, "listen_port":
    text}``, each only when given (``--listen-host H``, ``--listen-port P``, ``-p P``, their
    ``=`` forms, ``--set listen_host=H`` / ``listen_port=P``; as mitmproxy reads them: its
    ``--set`` values first, then the flags (``process_options``), so a flag beats a ``--set``
    wherever each stands, and the last of each kind wins)."""
    flags = {"--listen-host": "listen_host", "--listen-port": "listen_port", "-p": "listen_port"}
    given: dict = {}
    sets: dict = {}
    args = list(mitmproxy_args)
    for i, arg in enumerate(args):
        name, eq, text = arg.partition("=")
        if name in flags:
            if eq:
                given[flags[name]] = text
            elif i + 1 < len(args):
                given[flags[name]] = args[i + 1]
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            given["listen_port"] = arg[2:]
        elif arg == "--set" and i + 1 < len(args) or name == "--set" and eq:
            option, _, value = (args[i + 1] if arg == "--set" else arg.removeprefix("--set=")).partition("=")
            if option in ("listen_host", "listen_port"):
                sets[option] = value
    return sets | given


def start_bind(values: dict, sources: dict, mitmproxy_args) -> str | None:
    """Apply mitmproxy's own listen arguments (``listen_args``) to ``bind_addr``, which ``start``
    names in ``--mode`` (where mitmproxy's ``@host:port`` beats ``--listen-host``/``--listen-port``):
    the user's explicit argument wins over the environment and the file, as ``--set
    resp2chat_bind_addr`` does. Both given and naming different addresses: why, refused (None: fine)."""
    given = listen_args(mitmproxy_args)
    if not given:
        return None
    said = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
    host, port = S.parse_bind(values["bind_addr"])
    if "listen_port" in given:
        try:
            wanted = int(given["listen_port"])
        except ValueError:
            return f"{said}: {given['listen_port']!r} is no port number"
        if sources["bind_addr"].startswith("--set") and wanted != port:
            return f"{said} and {sources['bind_addr']}={values['bind_addr']} name different ports: give one of them"
        port = wanted
    if given.get("listen_host"):
        if sources["bind_addr"].startswith("--set") and given["listen_host"] != host:
            return f"{said} and {sources['bind_addr']}={values['bind_addr']} name different hosts: give one of them"
        host = given["listen_host"]
    values["bind_addr"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sources["bind_addr"] = said
    try:
        S.parse(S.BY_NAME["bind_addr"], values["bind_addr"], said)
    except S.SettingsError as exc:
        return str(exc)
    return None


def whole_replays(mitmproxy_args) -> list[str]:
    """mitmproxy's ``--server-replay FILE`` arguments, a file cut short (a gateway stopped while it
    wrote it) replaced by a copy of its whole flows, with a warning that says where it was cut
    (flowfile.py). mitmproxy's own server replay reads the files as it starts, before the gateway's
    script loads, and refuses one cut short whole: ``start`` hands it what it can read. A file it
    cannot read at all is left for mitmproxy to refuse, saying why."""
    from mitmproxy import exceptions, io

    from . import flowfile

    args, out, copies = list(mitmproxy_args), [], None
    i = 0
    while i < len(args):
        arg = args[i]
        path, form = None, None
        if arg == "--server-replay" and i + 1 < len(args):
            path, form = args[i + 1], "pair"
        elif arg.startswith("--server-replay="):
            path, form = arg.split("=", 1)[1], "joined"
        if path is not None:
            try:
                flows, cut = flowfile.read(path)
            except (OSError, exceptions.FlowReadException):
                cut = None
            if cut is not None:
                copies = copies or tempfile.mkdtemp(prefix="resp2chat-replay-")
                whole = os.path.join(copies, f"{len(out)}-{os.path.basename(path)}")
                with open(whole, "wb") as fh:
                    writer = io.FlowWriter(fh)
                    for flow in flows:
                        writer.add(flow)
                print(f"resp2chat: warning: server replay: {cut}: replaying those (a copy: {whole})", file=sys.stderr)
                path = whole
            out += ["--server-replay", path] if form == "pair" else [f"--server-replay={path}"]
            i += 2 if form == "pair" else 1
            continue
        out.append(arg)
        i += 1
    return out


def cmd_start(args) -> int:
    values, sources, _, _ = _settings()
    # --set wins over the environment and the file, in the addon (SettingsSource.value) and so
    # here, for what start reads itself: the listen address in --mode, the upstream, the URL shown.
    for name, text in set_settings(args.mitmproxy_args).items():
        sources[name] = f"--set resp2chat_{name}"
        try:
            values[name] = S.parse(S.BY_NAME[name], text, sources[name])
        except S.SettingsError as exc:
            return _fail(str(exc))
    # So do mitmproxy's own --listen-host/--listen-port (else the @address in --mode beat them)
    if (refused := start_bind(values, sources, args.mitmproxy_args)) is not None:
        return _fail(refused)
    args.mitmproxy_args = whole_replays(args.mitmproxy_args)
    cmd, env = build_start_command(args, values, sources)
    demo = "demo" in (env.get("RESP2CHAT_UPSTREAM_BASE_URL"), values["upstream_base_url"])
    where = ("demo upstream" if demo else
             ", ".join(f"{u['name']} ({u['base_url']})" for u in values["upstreams"]) or S.first_upstream(values))
    # (said before mitmproxy runs: the gateway may still refuse a setting as it loads, so "starting")
    print(f"resp2chat: starting the gateway {where_it_listens(values)} -> {where}", file=sys.stderr)
    # A backend not running (or a wrong host or port) said now, not at the first turn; the gateway
    # starts all the same: the backend may come up later (systemd starts both at once).
    if silent := unanswered(probed_upstreams(values, demo, args.mitmproxy_args)):
        print("resp2chat: warning: nothing answers at " + ", ".join(f"{url} ({why})" for url, why in silent.items())
              + ": is the backend running? The gateway starts anyway.", file=sys.stderr)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # signals (Ctrl-C, systemd stop) go straight to mitmproxy


# --- print-config ----------------------------------------------------------------------------


def codex_catalog(codex_bin: str, slug: str, window: int | None) -> dict:
    """A Codex `model_catalog_json` for a backend model, seeded from this Codex's own metadata.

    Without one, Codex uses fallback metadata for any model it does not know: a warning, a
    272k context guess, and no apply_patch tool. The template entry carries this Codex
    version's base instructions, so the prompt stays what Codex would send anyway.
    """
    import subprocess

    out = subprocess.run([codex_bin, "debug", "models", "--bundled"], capture_output=True, text=True, timeout=60)
    try:
        bundled = json.loads(out.stdout)["models"]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(_fail(f"`{codex_bin} debug models --bundled` gave no model list: {out.stderr.strip()[:300]}"))
    # A template that speaks plain function tools: "code mode" / "responses lite" entries move
    # the tools into an `additional_tools` input item meant for OpenAI's own servers.
    plain = [m for m in bundled if not m.get("use_responses_lite") and not m.get("tool_mode")]
    entry = dict(min(plain or bundled, key=lambda m: m.get("priority", 0)))
    entry.update(tool_mode=None, use_responses_lite=False)
    entry.update(slug=slug, display_name=slug, description=f"{slug} through resp2chat", visibility="list",
                 priority=0, upgrade=None, service_tiers=[], additional_speed_tiers=[],
                 supported_reasoning_levels=[], input_modalities=["text", "image"])
    entry.pop("default_reasoning_level", None)  # else Codex sends reasoning.effort every turn
    if window:
        entry.update(context_window=window, max_context_window=window)
    else:
        print(f"resp2chat: the upstream did not say {slug}'s context window; the catalog keeps Codex's "
              f"default ({entry.get('context_window')}): edit it to what your backend serves", file=sys.stderr)
    return {"models": [entry]}


def gateway_url(values: dict) -> str:
    """Where clients reach the gateway: http://, or https:// with tls_cert_file (then by its first
    public_hosts name, which the certificate names, if there is one)."""
    host, port = S.parse_bind(values["bind_addr"])
    host = S.url_host(S.reach_host(host))
    if not values["tls_cert_file"]:
        return f"http://{host}:{port}/v1"
    names = [h for h in values["public_hosts"] if "*" not in h]
    return f"https://{names[0].split(':')[0] if names else host}:{port}/v1"


def wildcard_host(values: dict) -> str | None:
    """``bind_addr``'s host when it is a wildcard (0.0.0.0, ::: every interface), else None."""
    host, _ = S.parse_bind(values["bind_addr"])
    return host if host in S.WILDCARD_HOSTS else None


def where_it_listens(values: dict) -> str:
    """What ``start`` says of its listen address: ``on URL``, or, with a wildcard ``bind_addr``
    (``wildcard_host``), ``on every interface`` and the URL clients use here."""
    host = wildcard_host(values)
    if host is None:
        return f"on {gateway_url(values)}"
    every = "every IPv4 interface" if host == "0.0.0.0" else "every interface"
    reach = "e.g." if values["tls_cert_file"] else "from this machine:"
    return f"on {every} ({values['bind_addr']}; {reach} {gateway_url(values)})"


def key_env(values: dict, given: str | None = None) -> str | None:
    """The environment variable Codex takes the gateway key from: the one given (``--key-env``),
    else, when the gateway takes keys, RESP2CHAT_GATEWAY_API_KEY for its ``gateway_api_key`` (one
    person: the gateway and Codex read the same variable) or RESP2CHAT_API_KEY for a client key."""
    if given:
        return given
    if values["gateway_api_key"]:
        return "RESP2CHAT_GATEWAY_API_KEY"
    return CLIENT_KEY_ENV if values["clients"] else None


def codex_login_line(env: str | None) -> str:
    """What stores the key for Codex's built-in provider: interactive `codex` (0.169) shows its
    sign-in screen unless a key is stored, whatever the environment holds."""
    if env:
        return f"printenv {env} | codex login --with-api-key"
    return "echo unused | codex login --with-api-key"  # the gateway takes any key: a placeholder


def codex_config(values: dict, models: list[dict], provider: str = "resp2chat", catalog: str | None = None,
                 builtin: bool = False, env: str | None = None, base_url: str | None = None) -> str:
    """``env``: the variable holding the key (``key_env``); ``base_url``: where Codex reaches the
    gateway (default: ``gateway_url``)."""
    url = base_url or gateway_url(values)
    tls = ["# The gateway's certificate from a private CA: export CODEX_CA_CERTIFICATE=/path/to/ca.pem"] \
        if values["tls_cert_file"] else []
    model = selected_model(values, models)
    window = next((context_window(m) for m in models if m["id"] == model), None)
    # model metadata (context window, apply_patch) and compaction before the window is full: both setups
    model_lines = [f'model = "{model}"']
    if catalog:
        model_lines.append(f'model_catalog_json = "{catalog}"  # model metadata: context window, apply_patch')
    if window:
        model_lines += [f"model_context_window = {window}",
                        f"model_auto_compact_token_limit = {int(window * 0.9)}"]
    if builtin:  # Codex's own OpenAI provider, pointed at the gateway: WebSocket, remote compaction
        lines = [
            "# ~/.codex/config.toml — Codex CLI's built-in provider through resp2chat "
            "(generated by `resp2chat print-config --builtin`)",
            *(("# The key: store it once for this CODEX_HOME (interactive codex needs it stored; `codex exec`",
               "# also takes it from CODEX_API_KEY, never from OPENAI_API_KEY):") if env else
              ("# The gateway takes no key, but interactive codex asks for a sign-in unless one is stored:",
               "# store a placeholder once for this CODEX_HOME:")),
            f"#   {codex_login_line(env)}",
            *tls,
            *model_lines,
            f'openai_base_url = "{url}"',
        ]
        return "\n".join(lines) + "\n"
    lines = [
        "# ~/.codex/config.toml — Codex CLI through resp2chat (generated by `resp2chat print-config`)",
        *tls,
        *model_lines,
        f'model_provider = "{provider}"',
    ]
    lines += [
        "",
        f"[model_providers.{provider}]",
        'name = "resp2chat"',
        f'base_url = "{url}"',
        'wire_api = "responses"',
        "requires_openai_auth = false",
    ]
    if env:
        lines.append(f'env_key = "{env}"  # export {env}=<your key>')
    lines.append("stream_idle_timeout_ms = 300000")
    return "\n".join(lines) + "\n"


def selected_model(values: dict, models: list[dict]) -> str:
    return values["upstream_model"] or (models[0]["id"] if models else "demo-model")


def cmd_print_config(args) -> int:
    values = _settings().values
    listed = [] if args.offline else list_models(S.first_upstream(values), first_upstream_key(values))
    entry = S.first_upstream_entry(values)
    spec = S.parse_upstreams([entry])[0] if entry is not None else None
    # (with upstreams, a model the first entry's globs do not match goes elsewhere: not one of its own)
    models = [m for m in listed if spec is None or spec.serves(m["id"])]
    configured = values["upstreams"] or values["upstream_base_url"] not in ("", "demo")
    if not models and not values["upstream_model"] and configured:
        # no name from the backend nor the settings: the demo's (right only for a gateway running the demo)
        where = f"{S.first_upstream(values).rstrip('/')}/models"
        if args.offline:
            asked = "--offline: no model list asked"
        elif listed and spec is not None:
            asked = f"none of the models {where} lists matches the first of upstreams' models ({', '.join(spec.models)})"
        else:
            asked = f"no model list from {where} (nothing answers there, or it lists none)"
        print(f"resp2chat: {asked}: the config names model \"{selected_model(values, models)}\", a placeholder: "
              "put your backend's model name there, or set upstream_model (resp2chat configure)", file=sys.stderr)
    catalog = None
    if args.catalog:
        codex_bin = args.codex or shutil.which("codex")
        if not codex_bin:
            return _fail("--catalog needs the Codex CLI (on PATH or --codex PATH) to copy its metadata from")
        model = selected_model(values, models)
        window = next((context_window(m) for m in models if m["id"] == model), None)
        path = Path(args.catalog).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(codex_catalog(codex_bin, model, window), indent=2, ensure_ascii=False) + "\n")
        catalog = str(path)
        print(f"resp2chat: wrote Codex model catalog {path}", file=sys.stderr)
    env = key_env(values, args.key_env)
    sys.stdout.write(codex_config(values, models, args.provider, catalog, builtin=args.builtin, env=env,
                                  base_url=args.base_url))
    if args.builtin:
        print(f"resp2chat: before the first interactive `codex`, once: {codex_login_line(env)}", file=sys.stderr)
    if not args.base_url and wildcard_host(values) is not None:
        print(f"resp2chat: the base URL above is this machine's ({gateway_url(values)}; bind_addr "
              f"{values['bind_addr']} listens on every interface): for a teammate's Codex, give the one they "
              "reach the gateway by: --base-url https://NAME/v1", file=sys.stderr)
    return 0


def env_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an environment variable name")
    return text


def http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r'[\s"\\]', text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an http:// or https:// URL, e.g. https://llm.example.com/v1")
    return text.rstrip("/")


# --- usage -----------------------------------------------------------------------------------


def cmd_usage(args) -> int:
    from resp2chat_io.usage_report import main as usage_main

    files = args.files
    if not files:
        values, _, path, _ = _settings()
        where = values["access_log_path"]
        if not where:
            return _fail(f"no access log: name the files, or set access_log_path (config file {path}) so the "
                         "gateway writes one JSON line per turn there")
        if where == "-":
            return _fail("access_log_path is '-' (the gateway's stderr): name the file that output goes to, or "
                         "pipe it in: journalctl -u 'resp2chat@*' -o cat | resp2chat usage - (deploy/'s units), "
                         "journalctl --user -u resp2chat -o cat | resp2chat usage - (README's user unit)")
        files = [where]
    return usage_main(files, args.since, args.json)


def day(text: str) -> str:
    import datetime

    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected a day as YYYY-MM-DD")


# --- analyze ---------------------------------------------------------------------------------


def cmd_analyze(args) -> int:
    from resp2chat_io.analyze import main as analyze_main

    return analyze_main(args)


def cmd_retranslate(args) -> int:
    from resp2chat_io.retranslate import main as retranslate_main

    return retranslate_main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resp2chat", description="OpenAI Responses API gateway for any Chat Completions backend (a mitmproxy addon).")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("configure", help="write ~/.config/resp2chat/config.yaml (interactive unless -y)")
    c.add_argument("--upstream-base-url", dest="upstream_base_url")
    c.add_argument("--upstream-api-key", dest="upstream_api_key")
    c.add_argument("--upstream-model", dest="upstream_model")
    c.add_argument("--bind-addr", dest="bind_addr")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any setting (repeatable)")
    c.add_argument("-y", "--yes", action="store_true", help="no questions: write the given values")
    c.set_defaults(func=cmd_configure)

    k = sub.add_parser("keys", help="the gateway's clients, each with its own key: add, list, rotate, revoke")
    ks = k.add_subparsers(dest="keys_command", required=True)
    ka = ks.add_parser("add", help="make a client and its key: the key is printed once, the config file keeps "
                       "only its SHA-256")
    ka.add_argument("name", help="the client's name (letters, digits, _ . -; it names the client in metrics and logs)")
    ka.add_argument("--rpm", type=int, metavar="N", help="requests per minute at most (turns, embeddings and other passthrough calls but reads, input_tokens)")
    ka.add_argument("--tpm", type=int, metavar="N", help="backend tokens (prompt + output) per minute at most")
    ka.add_argument("--max-streams", dest="max_streams", type=int, metavar="N", help="such requests open at once at most")
    ka.add_argument("--max-sockets", dest="max_sockets", type=int, metavar="N",
                    help="Responses WebSockets open at once at most (Codex opens one per session; on each replica)")
    # (one value, commas between globs, repeatable: a list of values would swallow the name after it)
    ka.add_argument("--models", action="append", metavar="GLOB[,GLOB…]",
                    help="the model names it may use: globs, separated by commas, or the option repeated "
                    "(default: all)")
    ka.set_defaults(func=cmd_keys_add)
    kl = ks.add_parser("list", help="the clients: names, key fingerprints, models, limits (never keys)")
    kl.set_defaults(func=cmd_keys_list)
    kr = ks.add_parser("revoke", help="remove a client: its key stops working, its turns in flight stop; the "
                       "name added again later is a new client, with none of this one's stored state")
    kr.add_argument("name")
    kr.set_defaults(func=cmd_keys_revoke)
    kt = ks.add_parser("rotate", help="a new key for a client (printed once): the old key stops working, its "
                       "turns in flight stop; its stored state, models and limits stay")
    kt.add_argument("name")
    kt.set_defaults(func=cmd_keys_rotate)

    s = sub.add_parser("start", help="run the gateway (mitmdump, or mitmweb with --web)")
    s.add_argument("--web", action="store_true", help="run mitmweb for interactive inspection")
    s.add_argument("--raw", action="store_true", help="print the model's streamed output to stdout")
    s.add_argument("--demo", action="store_true", help="use the bundled demo upstream")
    s.add_argument("mitmproxy_args", nargs=argparse.REMAINDER, help="passed on to mitmdump/mitmweb (after --)")
    s.set_defaults(func=cmd_start)

    pc = sub.add_parser("print-config", help="print a ~/.codex/config.toml for this gateway")
    pc.add_argument("--provider", default="resp2chat", help="provider id in Codex's config")
    pc.add_argument("--offline", action="store_true", help="do not ask the upstream for model metadata")
    pc.add_argument("--catalog", metavar="PATH", help="also write a Codex model catalog (model_catalog_json) there: "
                    "no fallback-metadata warning, real context window, apply_patch tool")
    pc.add_argument("--codex", metavar="PATH", help="the codex binary whose metadata seeds the catalog (default: on PATH)")
    pc.add_argument("--builtin", action="store_true", help="configure Codex's built-in OpenAI provider "
                    "(openai_base_url: the WebSocket transport, remote compaction) instead of a custom provider")
    pc.add_argument("--key-env", metavar="NAME", type=env_name,
                    help="the environment variable that holds the key Codex sends (default, when the gateway takes keys: "
                    "RESP2CHAT_GATEWAY_API_KEY with gateway_api_key, else RESP2CHAT_API_KEY); with --builtin, "
                    "the `codex login` line reads it")
    pc.add_argument("--base-url", metavar="URL", type=http_url,
                    help="where Codex reaches the gateway, e.g. https://llm.example.com/v1 (default: from bind_addr)")
    pc.set_defaults(func=cmd_print_config)

    u = sub.add_parser("usage", help="turns and tokens per client, day and model, from access logs")
    u.add_argument("files", nargs="*", metavar="ACCESS_LOG", help="access log files ('-': stdin; default: the "
                   "configured access_log_path)")
    u.add_argument("--since", metavar="YYYY-MM-DD", type=day, help="only turns on or after this day (UTC)")
    u.add_argument("--json", action="store_true", help="machine-readable output")
    u.set_defaults(func=cmd_usage)

    a = sub.add_parser("analyze", help="prefix-cache analysis of recorded flows or a JSONL upstream log")
    a.add_argument("files", nargs="+")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_analyze)

    r = sub.add_parser("retranslate", help="lower and translate recorded turns again with this code; diff "
                       "against the recording (exit 1 on a difference)")
    r.add_argument("files", nargs="+", help="flow files (mitmdump -w, make recordings)")
    r.add_argument("--seal-key", metavar="SECRET", help="the seal_key the recording was made with (for sealed "
                   "items: compaction summaries); default: the configured key, else this install's")
    r.add_argument("-v", "--verbose", action="store_true", help="every turn, not only the ones that differ")
    r.add_argument("--json", action="store_true", help="also print the results as JSON")
    r.set_defaults(func=cmd_retranslate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "mitmproxy_args", None) and args.mitmproxy_args[0] == "--":
        args.mitmproxy_args = args.mitmproxy_args[1:]
    try:
        return args.func(args) or 0
    except PermissionError as exc:  # (a file it may not write: config.write_file says why)
        print(f"resp2chat: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `resp2chat keys list | head`: the reader left, nothing to tell it
        _stdout_gone()
        return 1


def _stdout_gone() -> None:
    """stdout's reader left: what is still buffered goes nowhere (no second error at exit's flush)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
