"""The Responses request as pydantic models: validated once per request, never per chunk.

Models accept keys they do not know (``extra="allow"``): clients such as Codex send ids, statuses
and metadata the gateway has no use for, and rejecting them would break clients on every API
addition. What the gateway *does* read is typed strictly, and an item or tool type it cannot
translate faithfully is an error naming its place (``input[3].type``), never a silent guess; so
is a field asking for what it cannot do (``UNSUPPORTED_FIELDS``: ``unsupported_parameter``).
One model is strict about its keys as well: a ``context_management`` entry (``CompactionEntry``),
where a key the gateway does not know asks for a way of managing the context it would not keep.
"""

from __future__ import annotations

import marshal
from itertools import compress, count, repeat
from operator import is_, is_not
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool,
                      StrictInt, Tag, TypeAdapter, ValidationError)
from pydantic_core import PydanticCustomError

from .errors import GatewayError


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


# The largest counts a request may carry: JSON numbers have no bound, backends do. A count no
# backend takes (10**400 output tokens) is the client's error, a 400 naming the field, not a
# backend's 4xx, 5xx or overflow later. Counts (tokens, calls): a signed 32-bit integer, what
# llama.cpp reads them into (n_predict, n_probs) and far above any model's window. Durations in
# milliseconds: a signed 64-bit one (Codex's are u64; no one waits 292 million years).
MAX_COUNT = 2**31 - 1
MAX_MS = 2**63 - 1


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
Content = Union[str, Annotated[list[ContentPart], Field(fail_fast=True)]]


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
    name: str = Field(min_length=1)  # (a chat backend takes no nameless call)
    arguments: str
    namespace: str | None = None


class CustomToolCallItem(_Model):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str = Field(min_length=1)  # (a chat backend takes no nameless call)
    input: str
    namespace: str | None = None


class LocalShellAction(_Model):
    type: Literal["exec"] = "exec"
    command: list[str]
    timeout_ms: int | None = Field(default=None, ge=0, le=MAX_MS)
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
    status: str | None = None


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


class McpListToolsItem(_Model):
    """A listing of an MCP server's tools the gateway made (mcp.py): lowers to nothing, and a
    later turn offers its tools without listing again."""

    type: Literal["mcp_list_tools"]
    id: str | None = None
    server_label: str
    tools: list[Any] = []
    error: Any = None


class McpCallItem(_Model):
    type: Literal["mcp_call"]
    id: str
    server_label: str = Field(min_length=1)  # (a nameless one would go upstream as mcp____)
    name: str = Field(min_length=1)
    arguments: str = ""
    output: str | None = None
    error: Any = None
    approval_request_id: str | None = None


class McpApprovalRequestItem(_Model):
    type: Literal["mcp_approval_request"]
    id: str
    server_label: str = Field(min_length=1)  # (a nameless one would go upstream as mcp____)
    name: str = Field(min_length=1)
    arguments: str = ""


class McpApprovalResponseItem(_Model):
    type: Literal["mcp_approval_response"]
    approval_request_id: str
    approve: StrictBool
    reason: str | None = None


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
    "mcp_list_tools": McpListToolsItem,
    "mcp_call": McpCallItem,
    "mcp_approval_request": McpApprovalRequestItem,
    "mcp_approval_response": McpApprovalResponseItem,
}

# Known item types the gateway cannot carry to a chat backend, and why.
UNSUPPORTED_ITEMS = {
    "item_reference": "item references need the response store (inputs.py); resend the item itself",
    "compaction": "compaction items hold another provider's encrypted state; start a new session",
    "image_generation_call": "image generation is not available through a chat backend",
}


# Request fields the gateway cannot honour, and why: present (not null), the request is a 400
# naming the field (``unsupported_parameter``, OpenAI's code), never run without what it asked.
UNSUPPORTED_FIELDS = {
    "prompt": "stored prompt templates (prompt.id) live in OpenAI's prompt store, which this gateway does not "
              "have; send the template's text as instructions or input",
    "moderation": "the gateway runs no moderation model: what it was asked to score or block would be answered "
                  "unmoderated; moderate before or after the gateway",
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
    strict: StrictBool | None = None


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


class McpTool(_Model):
    """A hosted MCP server (mcp.py): the gateway runs its tools against the servers its operator
    allows (``mcp_servers``)."""

    type: Literal["mcp"]
    server_label: str = Field(min_length=1)
    server_url: str | None = None
    connector_id: str | None = None
    tunnel_id: str | None = None
    allowed_tools: Any = None
    require_approval: Any = None
    headers: Any = None
    authorization: str | None = None
    server_description: str | None = None


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
    "mcp": McpTool,
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


# ``include``'s values: the ones the API defines (openai-python's ``ResponseIncludable``), on
# POST /v1/responses and on the item lists (listing.py); another is a 400 naming it, as OpenAI's.
# The first two change what this gateway answers (inputs.py INCLUDE_REASONING, listing.py;
# lowering.py INCLUDE_LOGPROBS); the others are accepted as they ask for what it never makes
# (the AI SDK and the Agents SDK send them).
INCLUDES = ("reasoning.encrypted_content", "message.output_text.logprobs", "message.input_image.image_url",
            "computer_call_output.output.image_url", "file_search_call.results", "web_search_call.results",
            "web_search_call.action.sources", "code_interpreter_call.outputs")


# --- server-side compaction (compaction.py) -------------------------------------------------


class CompactionEntry(BaseModel):
    """An entry of ``context_management``: ``{"type": "compaction", "compact_threshold": N}``
    (tokens; no upper bound: a threshold never reached never compacts). No other key
    (``extra="forbid"``). Its errors are said as ``_context_error`` says them."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["compaction"]
    compact_threshold: StrictInt = Field(ge=0)


ONE_ENTRY = "context_management_entries"  # (the error type of a second entry: _context_error)


def _first_two(entries: Any) -> Any:
    """Only the first two entries decide (a second one that is right is one too many): a list of
    a million is not validated entry by entry."""
    return entries[:2] if isinstance(entries, list) and len(entries) > 2 else entries


def _one_entry(entries: list | None) -> list | None:
    if entries is not None and len(entries) > 1:
        raise PydanticCustomError(ONE_ENTRY, "only one compaction entry")
    return entries


class ResponsesRequest(_Model):
    model: str = Field(min_length=1)
    input: Union[str, Annotated[list[Item], Field(fail_fast=True)]]
    instructions: str | None = None
    tools: Annotated[list[Tool], Field(fail_fast=True)] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: StrictBool | None = None
    stream: StrictBool | None = False
    max_output_tokens: int | None = Field(default=None, ge=16, le=MAX_COUNT)  # (the API's minimum)
    max_tool_calls: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: Annotated[list[Literal[INCLUDES]], Field(fail_fast=True)] | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    store: StrictBool | None = None
    previous_response_id: str | None = None
    background: StrictBool | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, Any] | None = None
    # server-side compaction (compaction.py): not lowered, nor echoed
    context_management: Annotated[list[CompactionEntry] | None, BeforeValidator(_first_two),
                                  AfterValidator(_one_entry)] = None

    @property
    def compact_threshold(self) -> int | None:
        """The ``compact_threshold`` of the request's compaction entry (None: none asked)."""
        return self.context_management[0].compact_threshold if self.context_management else None


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


class ItemMemo:
    """Input items validated before, and their models: a conversation's history is validated
    once, not on every turn that resends it (Codex resends all of it on every HTTP turn).

    Two ways to find an item again. By identity, against the input of the requests validated
    last (``runs``): the decoded value of an unchanged history item is the same object from turn
    to turn (requestbody.py decodes it once), so one C-speed pass over the list finds them all.
    By its ``marshal`` bytes (format 2: dict order kept, ``true``, ``1`` and ``1.0`` told apart,
    as the bytes lowered from an item are) for the others: an item made again from the same
    request (inputs.py restores sealed reasoning into a new dict each turn), or decoded again.
    Only items that validated are kept; an item validates alone (its model does not depend on
    the request around it), so ``parse_request`` with the memo gives the models, and the errors,
    it gives without. Models are shared between requests: read, never changed.

    Bounded: ``runs`` lists (a request that goes on from one replaces it); by marshal bytes, two
    generations of at most ``size`` items and ``max_bytes`` of keys each (an item larger than
    ``MAX_ITEM`` is not kept by its bytes): a full young generation becomes the old one, and what
    the old one held and nobody asked for since is dropped.
    """

    MAX_ITEM = 256 << 10

    def __init__(self, size: int = 20000, max_bytes: int = 8 << 20, runs: int = 8):
        self.size, self.max_bytes, self.max_runs = size, max_bytes, runs
        self._runs: list[tuple[tuple, tuple]] = []  # (items, their models), least recently used first
        self._young: dict[bytes, Any] = {}
        self._old: dict[bytes, Any] = {}
        self._young_bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def clear(self) -> None:
        self._runs, self._young, self._old, self._young_bytes = [], {}, {}, 0

    def _run(self, items: list) -> tuple[tuple, tuple] | None:
        """The input validated before that this one goes on from: its last item the same object
        here, else (that item was made again) its first."""
        first = None
        for run in reversed(self._runs):
            n = len(run[0])
            if n <= len(items):
                if run[0][n - 1] is items[n - 1]:
                    return run
                if first is None and run[0][0] is items[0]:
                    first = run
        return first

    def _by_bytes(self, item) -> tuple[Any, bytes | None]:
        if item.__class__ is not dict:
            return None, None
        try:
            key = marshal.dumps(item, 2)
        except ValueError:  # nested too deep to marshal: validation says what is wrong with it
            return None, None
        model = self._young.get(key)
        if model is None:
            model = self._old.get(key)
            if model is not None:
                self._put(key, model)
        return model, key

    def _put(self, key: bytes, model) -> None:
        if len(key) > self.MAX_ITEM:
            return
        if len(self._young) >= self.size or self._young_bytes + len(key) > self.max_bytes:
            self._old, self._young, self._young_bytes = self._young, {}, 0
        self._young[key] = model
        self._young_bytes += len(key)

    def find(self, items: list) -> tuple[list, list, tuple | None]:
        """(models: each item's model validated before, or None; keys: the marshal bytes of
        those looked up by them, else None; the run they went on from)."""
        run = self._run(items)
        models: list = [None] * len(items)
        keys: list = [None] * len(items)
        todo: Any = range(len(items))
        if run is not None:
            n = len(run[0])
            models[:n] = run[1]
            # the items that are not the same objects (C-speed), then all after the run
            todo = [*compress(count(), map(is_not, run[0], items)), *range(n, len(items))]
            for i in todo:
                if i < n:
                    models[i] = None
        found = len(items) - len(todo)
        for i in todo:
            models[i], keys[i] = self._by_bytes(items[i])
            found += models[i] is not None
        self.hits += found
        return models, keys, run

    def keep(self, items: list, models: list, keys: list, run, new: list[int]) -> None:
        """``models``: the models of all ``items``, those at ``new`` just validated; ``keys`` the
        marshal bytes of those that were looked up by them (``find``). A new model kept by its
        bytes that holds JSON containers of its item as they were decoded (an ``Any`` field
        lowering reads) is replaced, in ``models`` too, by one validated from a copy of the item
        (its marshal bytes, loaded: as deep as marshal went, so never too deep to copy): the
        decoded value is the request's, and resp2chat_io/offload.py may empty it once the
        request is refused. (A model found again by identity is its own item's: that value is
        never emptied, requestbody.py.)"""
        for i in new:
            key = keys[i]
            if key is None:
                continue
            model = models[i]
            if model.__class__ in _HOLDS_JSON:
                model = models[i] = _ITEM.validate_python(marshal.loads(key))
            self._put(key, model)
        if run is not None and run in self._runs:
            self._runs.remove(run)
        self._runs.append((tuple(items), tuple(models)))
        del self._runs[:-self.max_runs]


_HOLDS_JSON = (ToolSearchCallItem, ToolSearchOutputItem, WebSearchCallItem, AdditionalToolsItem, McpListToolsItem,
               McpCallItem)
_ITEM = TypeAdapter(Item)


def parse_request(data: Any, memo: ItemMemo | None = None) -> ResponsesRequest:
    """Validate a decoded JSON body; raise ``GatewayError`` naming the first bad field.
    ``memo``: the input items validated before (``ItemMemo``); only the others are validated,
    with the same result."""
    if not isinstance(data, dict):
        raise GatewayError("request body must be a JSON object")
    for name, why in UNSUPPORTED_FIELDS.items():
        if data.get(name) is not None:
            raise GatewayError(f"{name}: not supported: {why}", param=name, code="unsupported_parameter")
    items = data.get("input")
    known: list = []
    new: Any = range(len(items)) if isinstance(items, list) else ()
    if memo is not None and isinstance(items, list) and items:
        known, keys, run = memo.find(items)
        new = list(compress(count(), map(is_, known, repeat(None))))  # (the others validated before: supported)
    for i in new:
        kind = _item_tag(items[i])
        if kind in UNSUPPORTED_ITEMS:
            raise GatewayError(
                f"input[{i}]: item type {kind!r} is not supported: {UNSUPPORTED_ITEMS[kind]}",
                param=f"input[{i}].type", code="unsupported_item_type",
            )
    if not known:
        try:
            return ResponsesRequest.model_validate(data)
        except ValidationError as exc:
            raise _to_gateway_error(exc, data) from None
    try:
        req = ResponsesRequest.model_validate({**data, "input": [items[i] for i in new]})
    except ValidationError as exc:
        raise _to_gateway_error(exc, data, new) from None
    for i, model in zip(new, req.input):
        known[i] = model
    memo.keep(items, known, keys, run, new)
    req.input = known
    return req


def _to_gateway_error(exc: ValidationError, data: dict, places: list[int] | None = None) -> GatewayError:
    """``places``: the input was validated in part (``ItemMemo``): an error's item index ``j``
    is ``input[places[j]]`` of the request."""
    errors = exc.errors(include_url=False)
    if places is not None:
        errors = [{**err, "loc": _relocated(err["loc"], places)} for err in errors]
    # context_management's errors first (compaction.py checked it before the rest of the request)
    context = [err for err in errors if err["loc"][:1] == ("context_management",)]
    if context:
        return _context_error(min(context, key=_context_order))
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
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"  # (OpenAI's codes)
    bound, value = _BOUNDS.get(err["type"]), err.get("input")
    if bound and value.__class__ in (int, float):  # the API's codes for a number out of its range
        code = f"{'integer' if value.__class__ is int else 'decimal'}_{bound}"
    if code == "missing_required_parameter" and param == "model":
        return GatewayError(MODEL_REQUIRED, param="model", code=code)
    return GatewayError(f"{param}: {err['msg']}", param=param or None, code=code)


def _context_order(err: dict) -> tuple[int, int]:
    """Which ``context_management`` error is the request's: the list that is not one, else the
    first entry that is wrong, in it its type, then a key it does not know (in their order), then
    its threshold; the second entry is one too many when the first two are right."""
    loc = err["loc"]
    if len(loc) == 1:
        return (1, 4) if err["type"] == ONE_ENTRY else (-1, 0)
    return loc[1], 0 if len(loc) == 2 else {"type": 1, "compact_threshold": 3}.get(loc[2], 2)


def _context_error(err: dict) -> GatewayError:
    """A ``context_management`` error (``_context_order``'s) in the words of the API's errors."""
    where, rank = _context_order(err)
    if where < 0:
        return GatewayError("context_management: a list of entries", param="context_management", code="invalid_type")
    param = f"context_management[{where}]"
    if rank == 4:
        return GatewayError(f"{param}: only one compaction entry", param=param, code="invalid_value")
    if rank == 0:
        return GatewayError(f"{param}: an object", param=param, code="invalid_type")
    value = err.get("input")
    if rank == 1 and err["type"] == "literal_error" and isinstance(value, str):
        return GatewayError(f"{param}.type: {value[:100]!r} not supported (only \"compaction\")",
                            param=f"{param}.type", code="unsupported_value")
    if rank == 1:
        return GatewayError(f"{param}.type: required, a string", param=f"{param}.type", code="invalid_type")
    if rank == 3:
        return GatewayError(f"{param}.compact_threshold: required, a non-negative integer (tokens)",
                            param=f"{param}.compact_threshold", code="invalid_value")
    key = f"{param}.{str(err['loc'][2])[:100]}"
    return GatewayError(f"{key}: unknown parameter", param=key, code="unknown_parameter")


# Every request that is lowered names its model, POST /v1/responses/input_tokens too (OpenAI's
# does without): the gateway routes by it (routing.candidates) and the backend is asked for it;
# there is no default model a request without one could go to (a turn has none either).
MODEL_REQUIRED = ("model: required: the gateway picks the upstream, and the model it asks, by the request's "
                  "model (also for /v1/responses/input_tokens, which counts what that upstream would get)")


_BOUNDS = {"greater_than_equal": "below_min_value", "greater_than": "below_min_value",
           "less_than_equal": "above_max_value", "less_than": "above_max_value"}


def _relocated(loc: tuple, places: list[int]) -> tuple:
    """An error location in the input validated in part, as a location in the whole request."""
    if not loc or loc[0] != "input":
        return loc
    for k, part in enumerate(loc):
        if isinstance(part, int):
            return (*loc[:k], places[part], *loc[k + 1:])
    return loc
