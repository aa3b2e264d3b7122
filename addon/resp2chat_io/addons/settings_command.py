"""The ``resp2chat.settings`` command: the effective settings, secrets hidden; ``SetCheck``: the
``--set`` values mitmproxy applies after the addons load, checked before it does."""

from __future__ import annotations

import json

from mitmproxy import command, exceptions
from mitmproxy.utils import typecheck

from resp2chat_core import settings as S

from .base import log


class SettingsCommand:
    name = "resp2chat_settings"

    def __init__(self, source) -> None:
        self.source = source

    @command.command("resp2chat.settings")
    def show_settings(self) -> str:
        """The effective settings (secrets hidden)."""
        shown = {}
        for f in S.FIELDS:
            value = self.source.value(f.name)
            if f.name in S.SECRET_FIELDS:
                value = "[set]" if value else ""
            elif f.name == "upstream_headers":
                value = _headers(value)
            elif f.kind == "entries":
                value = [_entry(f.name, e) for e in value]
            shown[f.name] = value
        return json.dumps(shown, indent=2)


def _entry(field: str, entry: dict) -> dict:
    """An entry of ``upstreams``, ``clients`` or ``mcp_servers`` without its key (a client's
    key_sha256 shortened to the fingerprint ``resp2chat keys list`` shows; an MCP server's
    header values hidden)."""
    secret = S.ENTRY_SECRETS.get(field)
    shown = {}
    for k, v in entry.items():
        if k == secret:
            v = "[set]" if v else ""
        elif field == "clients" and k == "key_sha256" and isinstance(v, str):
            v = v[:8].lower() + "…"
        elif field == "mcp_servers" and k == "headers" and isinstance(v, dict):
            v = {h: "[set]" for h in v}
        elif field == "upstreams" and k == "upstream_headers" and isinstance(v, dict):
            v = _headers(v)
        shown[k] = v
    return shown


def _headers(headers: dict) -> dict:
    """``upstream_headers`` with the values of credential-like ones hidden (secrets: settings.py)."""
    return {h: "[set]" if S.credential_header(str(h)) else v for h, v in headers.items()}


class SetCheck:
    """Last in ``load``: the values mitmproxy kept aside for options it did not know yet
    (``options.deferred``: every ``--set resp2chat_…``, as the script loads after the command line
    is read, and the ``resp2chat_…`` keys of mitmproxy's own ``config.yaml``) are checked before it
    applies them, right after this.

    mitmproxy applies them in its script loader (``AddonManager.register`` ->
    ``process_deferred``): a value it cannot parse (``--set resp2chat_max_sessions=lots``) raises
    there, inside the script's reload task, where nothing logs it; the script is left out of the
    addon chain and the proxy serves on without the gateway: no key, Host or path check, every
    request forwarded to the backend. So each value mitmproxy would refuse, of any option known by
    now, and each ``resp2chat_`` name no addon declares, is an ERROR naming the option and the value
    (a starting mitmdump/mitmweb exits on it: errorcheck) and is dropped, so the addons still load
    — with that setting from the environment, config file or default — and stay in the chain."""

    name = "resp2chat_set_check"

    def load(self, loader) -> None:
        opts = loader.master.options
        for name, value in list(opts.deferred.items()):
            given = getattr(value, "val", None)  # --set NAME=VALUE: the strings as given
            if name not in opts:
                if name.startswith("resp2chat_"):
                    del opts.deferred[name]
                    log.error(f"resp2chat: --set {name}: "  # its value unsaid: maybe a misnamed secret
                              + S.unknown_setting(name.removeprefix("resp2chat_"), "resp2chat_"))
                continue
            try:
                if given is not None:
                    value = opts._parse_setval(opts._options[name], given)
                typecheck.check_option_type(name, value, opts._options[name].typespec)
            except (exceptions.OptionsError, TypeError) as exc:
                del opts.deferred[name]
                if given is None:  # (a typed value: from mitmproxy's own config.yaml in its confdir)
                    log.error(f"resp2chat: option {name}: {value!r} is invalid ({exc})")
                else:
                    log.error(f"resp2chat: --set {name}={' '.join(given)!r} is invalid ({exc})")
