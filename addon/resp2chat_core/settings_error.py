"""An invalid setting (``SettingsError``), and which settings are secrets it never shows.

Apart from settings.py (which imports and re-exports all of it: ``S.SettingsError``,
``S.SECRET_FIELDS``…) so that what validates an entry of a setting for ``settings.validate``
(clients.py ``parse_clients``) raises it without importing the table back. No imports.
"""

from __future__ import annotations

from typing import Any

SECRET_FIELDS = frozenset({"upstream_api_key", "brave_api_key", "gateway_api_key", "seal_key", "state_store_url"})
# Fields that are not secrets themselves but hold some, and which key of each entry is one (each
# upstream's api_key, each client's key), credential-like upstream_headers and every header of an
# mcp_servers entry: their option default stays empty like a secret's, the addon resolves them the
# same way, and those values are scrubbed like the secrets.
ENTRY_SECRETS = {"upstreams": "api_key", "clients": "key"}
HOLDS_SECRETS = frozenset({*ENTRY_SECRETS, "upstream_headers", "mcp_servers"})


class SettingsError(ValueError):
    """An invalid value: names the field, the value and why."""

    def __init__(self, field: str, value: Any, why: str, source: str = ""):
        self.field, self.value, self.why = field, value, why
        where = f" (from {source})" if source else ""
        hide = field in SECRET_FIELDS or field in HOLDS_SECRETS or field.endswith((".api_key", ".upstream_headers"))
        shown = "[hidden]" if hide else repr(value)
        super().__init__(f"{field}{where}: {shown} is invalid: {why}")
