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
            shown[f.name] = ("[set]" if value else "") if f.name in S.SECRET_FIELDS else value
        return json.dumps(shown, indent=2)
