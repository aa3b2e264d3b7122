"""Responses tools <-> chat-completions functions, and the names that travel between them.

A chat backend only knows flat functions whose names match ``^[a-zA-Z0-9_-]{1,64}$``. Responses
tools are richer: namespaces (``multi_agent_v1``, ``mcp__server__``), freeform ``custom`` tools
(apply_patch) and ``local_shell``. ``ToolMap`` flattens them into functions and remembers, for each
chat-side name, which Responses item a call to it must become. Names are derived by a pure
function of (namespace, name), so history lowering and the live stream agree without state.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from . import websearch
from .errors import GatewayError
from .schema import (
    CustomTool, FunctionTool, HostedTool, LocalShellTool, NamespaceTool, ToolSearchTool,
)

_VALID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_INVALID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")

SERVER_KINDS = frozenset({"web_search", "mcp"})  # Target kinds the gateway runs itself (toolloop.py)
LOCAL_SHELL_NAME = "local_shell"
TOOL_SEARCH_NAME = "tool_search"

LOCAL_SHELL_PARAMETERS = {
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"}, "description": "The command and its arguments, e.g. [\"bash\", \"-lc\", \"ls\"]."},
        "workdir": {"type": "string", "description": "Working directory to run the command in."},
        "timeout_ms": {"type": "integer", "description": "Timeout in milliseconds."},
    },
    "required": ["command"],
    "additionalProperties": False,
}

CUSTOM_PARAMETERS = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The raw input for this tool."}},
    "required": ["input"],
    "additionalProperties": False,
}


def chat_name(name: str, namespace: str | None = None) -> str:
    """The chat-side function name for a Responses tool; valid on strict backends."""
    if namespace:
        # `mcp__server__` already ends in a separator; `multi_agent_v1` gets one.
        name = namespace + name if namespace.endswith("_") else f"{namespace}__{name}"
    if _VALID.match(name):
        return name
    safe = _INVALID_CHARS.sub("_", name)
    if len(safe) > 64:
        safe = safe[:55] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


@dataclass(frozen=True)
class Target:
    """What a chat tool call must come back as: ``kind`` is the Responses item family."""

    kind: str  # "function" | "custom" | "local_shell" | "tool_search"; the gateway's own: "web_search" | "mcp"
    name: str
    namespace: str | None = None


@dataclass
class ToolMap:
    chat_tools: list[dict] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)

    def target(self, chat_tool_name: str) -> Target:
        # A name the model made up still comes back as a function call: the client reports it.
        # So does a tool the gateway runs (web_search, mcp) if it reaches the client (the
        # server-side tool loop normally takes it: toolloop.py).
        target = self.targets.get(chat_tool_name)
        return target if target and target.kind not in SERVER_KINDS else Target("function", chat_tool_name)

    def _add(self, target: Target, definition: dict, where: str) -> None:
        cname = definition["function"]["name"]
        if cname in self.targets:
            raise GatewayError(
                f"{where}: tool name {cname!r} collides with another tool once flattened for the "
                f"chat backend", param=where, code="tool_name_collision",
            )
        self.targets[cname] = target
        self.chat_tools.append(definition)


def _function(name: str, description: str | None, parameters: dict | None, strict: bool | None = None) -> dict:
    fn: dict = {"name": name}
    if description:
        fn["description"] = description
    fn["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    if strict:
        fn["strict"] = True
    return {"type": "function", "function": fn}


def _custom_description(tool: CustomTool) -> str:
    text = tool.description or ""
    fmt = tool.format or {}
    if fmt.get("type") == "grammar" and fmt.get("definition"):
        text += (
            f"\n\nPut the raw tool input in the `input` argument. It must follow this "
            f"{fmt.get('syntax', '')} grammar:\n{fmt['definition']}"
        )
    return text


def build_tool_map(tools, denylist: frozenset[str] = frozenset(), web_search: bool = False,
                   extra=None) -> ToolMap:
    """Flatten validated Responses tools into chat functions, in the client's order.

    Hosted tools are dropped (the backend cannot run them; clients have fallbacks), except
    ``web_search`` when the gateway runs searches itself (``web_search=True``). ``mcp`` tools
    are not the client's: ``extra(taken names)`` gives the functions of their listed tools
    (mcp.functions: ``(name, definition, Target)``), which come after the client's.
    """
    tmap = ToolMap()
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if isinstance(tool, HostedTool):
            if web_search and tool.type.startswith("web_search") and websearch.NAME not in tmap.targets \
                    and websearch.NAME not in denylist:
                tmap._add(Target("web_search", websearch.NAME), websearch.TOOL, where)
            continue
        if isinstance(tool, NamespaceTool):
            members = [(tool.name, t, f"{where}.tools[{j}]") for j, t in enumerate(tool.tools)]
        else:
            members = [(None, tool, where)]
        for ns, t, loc in members:
            if isinstance(t, (FunctionTool, CustomTool)) and (t.name in denylist or chat_name(t.name, ns) in denylist):
                continue
            if isinstance(t, FunctionTool):
                tmap._add(Target("function", t.name, ns),
                          _function(chat_name(t.name, ns), t.description, t.parameters, t.strict), loc)
            elif isinstance(t, CustomTool):
                tmap._add(Target("custom", t.name, ns),
                          _function(chat_name(t.name, ns), _custom_description(t), CUSTOM_PARAMETERS), loc)
            elif isinstance(t, LocalShellTool) and LOCAL_SHELL_NAME not in denylist:
                tmap._add(Target("local_shell", LOCAL_SHELL_NAME),
                          _function(LOCAL_SHELL_NAME, "Run a command on the user's machine.", LOCAL_SHELL_PARAMETERS), loc)
            elif isinstance(t, ToolSearchTool) and TOOL_SEARCH_NAME not in denylist:
                tmap._add(Target("tool_search", TOOL_SEARCH_NAME),
                          _function(TOOL_SEARCH_NAME, t.description, t.parameters), loc)
    if extra is not None:
        for name, definition, target in extra(set(tmap.targets)):
            tmap._add(target, definition, name)
    return tmap


_CHOICE_MODES = ("auto", "none", "required")


def _namespace(named: dict, where: str) -> str | None:
    """A tool_choice entry's ``namespace``: a string, or none."""
    ns = named.get("namespace")
    if ns is not None and not isinstance(ns, str):
        raise GatewayError(f"{where}.namespace: a string", param=f"{where}.namespace", code="invalid_value")
    return ns


def mcp_allowed(choice) -> frozenset | None:
    """The hosted MCP tools a ``tool_choice`` ``allowed_tools`` names
    (``{"type": "mcp", "server_label", "name"?}``): (server_label, tool name or None: all its
    tools) pairs (``mcp_chosen``); None for a ``tool_choice`` of another kind (no narrowing)."""
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return None
    listed = choice.get("tools") if isinstance(choice.get("tools"), list) else []
    chosen = set()
    for j, t in enumerate(listed):
        if isinstance(t, dict) and t.get("type") == "mcp" and t.get("server_label") is not None:
            where = f"tool_choice.tools[{j}]"  # (one without a server_label names no server's tools)
            if not isinstance(t["server_label"], str):
                raise GatewayError(f"{where}.server_label: a string", param=f"{where}.server_label",
                                   code="invalid_value")
            if t.get("name") is not None and not isinstance(t["name"], str):
                raise GatewayError(f"{where}.name: a string", param=f"{where}.name", code="invalid_value")
            chosen.add((t["server_label"], t.get("name")))
    return frozenset(chosen)


def mcp_chosen(allowed: frozenset, label: str | None, name: str) -> bool:
    """``mcp_allowed``'s pairs let the model use the tool ``name`` of server ``label``."""
    return (label, name) in allowed or (label, None) in allowed


def lower_tool_choice(choice, tmap: ToolMap) -> tuple[object, list[dict]]:
    """Return ``(chat tool_choice or None, chat tools)``; ``allowed_tools`` narrows the list."""
    tools = tmap.chat_tools
    if choice is None:
        return None, tools
    if isinstance(choice, str):
        if choice not in _CHOICE_MODES:
            raise GatewayError(f"tool_choice: unknown mode {choice!r}", param="tool_choice", code="invalid_value")
        return choice, tools
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        if name is None and kind == "function" and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")  # the Chat Completions spelling (vLLM and smg take it too)
        if not isinstance(name, str) or not name:
            raise GatewayError("tool_choice.name: required for a named tool", param="tool_choice.name", code="invalid_value")
        cname = chat_name(name, _namespace(choice, "tool_choice"))
        if cname not in tmap.targets:
            raise GatewayError(f"tool_choice: no tool named {name!r} in tools", param="tool_choice.name", code="invalid_value")
        return {"type": "function", "function": {"name": cname}}, tools
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise GatewayError(f"tool_choice.mode: unknown mode {mode!r}", param="tool_choice.mode", code="invalid_value")
        listed = choice.get("tools")
        if listed is not None and not isinstance(listed, list):
            raise GatewayError("tool_choice.tools: a list of tools", param="tool_choice.tools", code="invalid_value")
        allowed = set()
        for j, t in enumerate(listed or ()):
            where = f"tool_choice.tools[{j}]"
            if not isinstance(t, dict):
                raise GatewayError(f"{where}: a tool object", param=where, code="invalid_value")
            if t.get("type") == "local_shell":
                allowed.add(LOCAL_SHELL_NAME)
            elif t.get("type") == "mcp":
                continue  # (a hosted MCP server's tools: below)
            elif t.get("name") is not None:
                if not isinstance(t["name"], str):
                    raise GatewayError(f"{where}.name: a string", param=f"{where}.name", code="invalid_value")
                if t["name"]:
                    allowed.add(chat_name(t["name"], _namespace(t, where)))
        hosted = mcp_allowed(choice)  # a server's listed tools, or one of them by name
        allowed |= {cname for cname, target in tmap.targets.items()
                    if target.kind == "mcp" and mcp_chosen(hosted, target.namespace, target.name)}
        return mode, [t for t in tools if t["function"]["name"] in allowed]
    if kind == "mcp":  # a hosted MCP server's tool (mcp.py): its function once its tools are listed
        for cname, target in tmap.targets.items():
            if target.kind == "mcp" and target.namespace == choice.get("server_label") and target.name == choice.get("name"):
                return {"type": "function", "function": {"name": cname}}, tools
        return "auto", tools  # (not listed yet, or no tool named: the model chooses among them)
    if kind in ("local_shell", "tool_search"):
        cname = LOCAL_SHELL_NAME if kind == "local_shell" else TOOL_SEARCH_NAME
        if cname in tmap.targets:
            return {"type": "function", "function": {"name": cname}}, tools
    raise GatewayError(f"tool_choice: type {kind!r} is not supported by a chat backend",
                       param="tool_choice.type", code="unsupported_tool_choice")
