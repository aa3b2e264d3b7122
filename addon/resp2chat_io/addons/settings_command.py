"""The ``resp2chat.settings`` command: the effective settings, secrets hidden."""

from __future__ import annotations

import json

from mitmproxy import command

from resp2chat_core import settings as S


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
        shown[k] = v
    return shown
