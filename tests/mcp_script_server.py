"""A real MCP server (the official SDK's low-level ``Server``, streamable HTTP at ``/mcp``) whose
tools and results a test writes: ``python mcp_script_server.py PORT SCRIPT``, SCRIPT a JSON file
``{"tools": [Tool...], "results": {name: CallToolResult}}`` read again at each request (MCP's
own JSON shapes: camelCase), so a test changes what it serves between examples."""

from __future__ import annotations

import json
import sys

import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server


def main(port: int, script: str) -> None:
    def read() -> dict:
        with open(script, encoding="utf-8") as f:
            return json.load(f)

    async def list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in read()["tools"]])

    async def call_tool(ctx, params) -> types.CallToolResult:
        result = read()["results"].get(params.name, {"content": [], "isError": True})
        return types.CallToolResult.model_validate(result)

    server = Server("script", on_list_tools=list_tools, on_call_tool=call_tool)
    uvicorn.run(server.streamable_http_app(stateless_http=True, json_response=True), host="127.0.0.1", port=port,
                log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
