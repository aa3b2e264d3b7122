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
                value = [{k: ("[set]" if v else "") if k == "api_key" else {h: "[set]" for h in v} if k == "headers"
                          and isinstance(v, dict) else v for k, v in e.items()} for e in value]
            shown[f.name] = value
        return json.dumps(shown, indent=2)
