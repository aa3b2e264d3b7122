"""A real MCP server (the official SDK's low-level ``Server``, streamable HTTP at ``/mcp``) whose
tools and results a test writes: ``python mcp_script_server.py PORT SCRIPT``, SCRIPT a JSON file
``{"tools": [Tool...], "results": {name: CallToolResult}}`` read again at each request (MCP's
own JSON shapes: camelCase), so a test changes what it serves between examples. Optional keys:
``"page": N``, ``tools/list`` pages N tools a page (its cursor: the index of the page's first
tool); ``"log": PATH``, a JSON line appended there for each JSON-RPC request the server got, as
it got it and as it answered (``{"method", "name", "cursor", "status"}``; the SDK's own listing of
a called tool's schema, which it checks the call's ``Mcp-Param-*`` headers against, is not one),
written before the answer's last part is sent: once a client has the answer, its line is there."""

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
        served, page = read(), None
        tools = [types.Tool.model_validate(t) for t in served["tools"]]
        if served.get("page"):
            start = int(params.cursor or 0) if params is not None else 0
            page = str(start + served["page"]) if start + served["page"] < len(tools) else None
            tools = tools[start:start + served["page"]]
        return types.ListToolsResult(tools=tools, next_cursor=page)

    async def call_tool(ctx, params) -> types.CallToolResult:
        result = read()["results"].get(params.name, {"content": [], "isError": True})
        return types.CallToolResult.model_validate(result)

    server = Server("script", on_list_tools=list_tools, on_call_tool=call_tool)
    app = server.streamable_http_app(stateless_http=True, json_response=True)

    async def logged(scope, receive, send):
        """``app``, each POSTed request and the status it got written to the script's ``log``."""
        log = read().get("log") if scope["type"] == "http" and scope["method"] == "POST" else None
        if not log:
            return await app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, status, written = b"".join(chunks), [], []
        try:
            request = json.loads(body)
        except ValueError:
            request = {}
        params = request.get("params") or {} if isinstance(request, dict) else {}

        def write() -> None:
            if not written:
                written.append(True)
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"method": request.get("method") if isinstance(request, dict) else None,
                                        "name": params.get("name"), "cursor": params.get("cursor"),
                                        "status": status[0] if status else None}) + "\n")

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        async def sent(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                write()  # (before the answer's end goes: a test reads the log as soon as its turn is done)
            await send(message)

        await app(scope, replay, sent)
        write()  # (an answer that never ended: its line after all)

    uvicorn.run(logged, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
