"""The Responses request as pydantic models: validated once per request, never per chunk.

Models accept keys they do not know (``extra="allow"``): clients such as Codex send ids, statuses
and metadata the gateway has no use for, and rejecting them would break clients on every API
addition. What the gateway *does* read is typed strictly, and an item or tool type it cannot
translate faithfully is an error naming its place (``input[3].type``), never a silent guess.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from .errors import GatewayError


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- content parts -------------------------------------------------------------------------


class TextPart(_Model):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class RefusalPart(_Model):
    type: Literal["refusal"]
    refusal: str


class ImagePart(_Model):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


ContentPart = Annotated[Union[TextPart, RefusalPart, ImagePart], Field(discriminator="type")]
Content = Union[str, list[ContentPart]]


# --- input items ---------------------------------------------------------------------------


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    summary: list[TextPart] = []
    content: list[TextPart] | None = None
    encrypted_content: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class CustomToolCallItem(_Model):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None


class LocalShellAction(_Model):
    type: Literal["exec"] = "exec"
    command: list[str]
    timeout_ms: int | None = None
    working_directory: str | None = None
    env: dict[str, str] | None = None
    user: str | None = None


class LocalShellCallItem(_Model):
    type: Literal["local_shell_call"]
    call_id: str | None = None
    id: str | None = None
    action: LocalShellAction


class ToolSearchCallItem(_Model):
    type: Literal["tool_search_call"]
    call_id: str | None = None
    id: str | None = None
    execution: str | None = None
    arguments: Any = None


class WebSearchCallItem(_Model):
    type: Literal["web_search_call"]
    id: str | None = None
    action: dict[str, Any] | None = None


class ToolOutputItem(_Model):
    """``function_call_output``, ``custom_tool_call_output``, ``local_shell_call_output``."""

    type: Literal["function_call_output", "custom_tool_call_output", "local_shell_call_output"]
    call_id: str | None = None
    id: str | None = None
    output: Content


class ToolSearchOutputItem(_Model):
    type: Literal["tool_search_output"]
    call_id: str | None = None
    execution: str | None = None
    tools: list[Any] = []


class AdditionalToolsItem(_Model):
    """Tools delivered inside the input (newer Codex): inputs.py adds them to ``tools``."""

    type: Literal["additional_tools"]
    tools: list[Any] = []


ITEM_TYPES: dict[str, type[_Model]] = {
    "message": MessageItem,
    "reasoning": ReasoningItem,
    "function_call": FunctionCallItem,
    "custom_tool_call": CustomToolCallItem,
    "local_shell_call": LocalShellCallItem,
    "tool_search_call": ToolSearchCallItem,
    "web_search_call": WebSearchCallItem,
    "function_call_output": ToolOutputItem,
    "custom_tool_call_output": ToolOutputItem,
    "local_shell_call_output": ToolOutputItem,
    "tool_search_output": ToolSearchOutputItem,
    "additional_tools": AdditionalToolsItem,
}

# Known item types the gateway cannot carry to a chat backend, and why.
UNSUPPORTED_ITEMS = {
    "item_reference": "item references need the response store (inputs.py); resend the item itself",
    "compaction": "compaction items hold another provider's encrypted state; start a new session",
    "image_generation_call": "image generation is not available through a chat backend",
}


def _item_tag(value: Any) -> str | None:
    tag = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return tag if isinstance(tag, str) else None  # EasyInputMessage ({"role", "content"}) has no type


def _tool_tag(value: Any) -> str | None:
    tag = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return tag if isinstance(tag, str) else None


Item = Annotated[
    Union[tuple(Annotated[m, Tag(t)] for t, m in ITEM_TYPES.items())],  # type: ignore[misc]
    Discriminator(_item_tag),
]


# --- tools ---------------------------------------------------------------------------------


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomTool(_Model):
    type: Literal["custom"]
    name: str = Field(min_length=1)
    description: str | None = None
    format: dict[str, Any] | None = None


class NamespaceTool(_Model):
    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[Annotated[Union[FunctionTool, CustomTool], Field(discriminator="type")]]


class LocalShellTool(_Model):
    type: Literal["local_shell"]


class ToolSearchTool(_Model):
    type: Literal["tool_search"]
    execution: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None


class HostedTool(_Model):
    """Server-side tools a chat backend cannot run; stripped from the upstream request."""

    type: Literal[
        "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
        "image_generation",
    ]


TOOL_TYPES = {
    "function": FunctionTool,
    "custom": CustomTool,
    "namespace": NamespaceTool,
    "local_shell": LocalShellTool,
    "tool_search": ToolSearchTool,
    **{t: HostedTool for t in HostedTool.model_fields["type"].annotation.__args__},
}

Tool = Annotated[
    Union[tuple(Annotated[m, Tag(t)] for t, m in TOOL_TYPES.items())],  # type: ignore[misc]
    Discriminator(_tool_tag),
]


# --- the request ---------------------------------------------------------------------------


class ReasoningConfig(_Model):
    effort: str | None = None
    summary: str | None = None


class TextConfig(_Model):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(_Model):
    model: str = Field(min_length=1)
    input: Union[str, list[Item]]
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    user: str | None = None


_BRANCH_LABELS = {
    "str", *TOOL_TYPES, *ITEM_TYPES, "input_text", "output_text", "summary_text",
    "reasoning_text", "refusal", "input_image",
}


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _BRANCH_LABELS:
            continue  # pydantic's union-branch labels are noise to a client
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_request(data: Any) -> ResponsesRequest:
    """Validate a decoded JSON body; raise ``GatewayError`` naming the first bad field."""
    if not isinstance(data, dict):
        raise GatewayError("request body must be a JSON object")
    items = data.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = _item_tag(item)
        if kind in UNSUPPORTED_ITEMS:
            raise GatewayError(
                f"input[{i}]: item type {kind!r} is not supported: {UNSUPPORTED_ITEMS[kind]}",
                param=f"input[{i}].type", code="unsupported_item_type",
            )
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        raise _to_gateway_error(exc, data) from None


def _to_gateway_error(exc: ValidationError, data: dict) -> GatewayError:
    errors = exc.errors(include_url=False)
    # A wrong item/tool type is reported by pydantic as a tag error: say so in plain words.
    for err in errors:
        if err["type"] == "union_tag_invalid":
            param = _param(err["loc"])
            tag = err.get("ctx", {}).get("tag")
            what = "item" if param.startswith("input") else "tool"
            return GatewayError(
                f"{param}: unsupported {what} type {tag!r}", param=f"{param}.type",
                code=f"unsupported_{what}_type",
            )
    # Prefer the deepest location: it is the one that names the actual bad field.
    err = max(errors, key=lambda e: len(e["loc"]))
    param = _param(err["loc"])
    return GatewayError(f"{param}: {err['msg']}", param=param or None, code="invalid_value")
