"""Hosted MCP settings: ``mcp_servers`` (the MCP servers requests may use; their headers are
secrets) and ``max_mcp_rounds``. What a request's mcp tool binds to, the loop's kind and its
items are resp2chat_core/mcp.py; the relay runs the loop (relay/exchange.py) and talks to the
servers (relay/mcp.py)."""

from __future__ import annotations

from resp2chat_core import mcp

from .base import Owner


class McpServers(Owner):
    name = "resp2chat_mcp"
    owner = "mcp"

    def __init__(self, source) -> None:
        super().__init__(source)
        self.specs: tuple[mcp.ServerSpec, ...] = ()  # () : requests with mcp tools are refused
        self.max_rounds = self.s["max_mcp_rounds"]

    def apply(self, updated: set[str]) -> None:
        self.specs = mcp.parse_servers(self.s["mcp_servers"])
        self.max_rounds = self.s["max_mcp_rounds"]
