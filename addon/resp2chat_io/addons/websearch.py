"""Web search settings: ``brave_api_key`` (turns it on), ``brave_base_url``,
``brave_max_results``, ``max_web_search_rounds``. The tool, the loop and its events are
resp2chat_core/websearch.py; the relay runs the loop (resp2chat_io/relay/exchange.py)."""

from __future__ import annotations

from resp2chat_io.relay import SearchSettings

from .base import Owner


class WebSearch(Owner):
    name = "resp2chat_websearch"
    owner = "web_search"

    def __init__(self, source) -> None:
        super().__init__(source)
        self.settings: SearchSettings | None = None  # None: the gateway runs no searches

    def apply(self, updated: set[str]) -> None:
        self.settings = SearchSettings(**self.s) if self.s["brave_api_key"] else None
