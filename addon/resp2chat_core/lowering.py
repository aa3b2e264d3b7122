"""Lowering: a validated Responses request -> one Chat Completions request body.

Rules of this file:
- Pure and byte-deterministic: the same request gives the same bytes, always. No clocks, no
  randomness, no set iteration, no sort that depends on anything but the input. Server replay
  hashes these bytes, and the backend's KV prefix cache rewards prompts that only grow.
- History lowers the way the model produced it. One assistant turn in Responses is several items
  (reasoning, message, function_call…); they fold back into one chat assistant message carrying
  ``reasoning_content``, ``content`` and ``tool_calls``, so the backend re-reads its own turn.

System messages: ``instructions`` plus the leading run of system/developer messages become one
leading system message (joined by a blank line): templates such as Qwen's accept a system
message only in first place. A system/developer message later in the conversation becomes a
``user`` message with the same text; folding it into the leading one instead would rewrite the
start of the prompt and throw away the backend's whole prefix cache.
"""

from __future__ import annotations

import json
import operator
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from . import mcp
from .errors import GatewayError
from .labels import shown
from .schema import (
    AdditionalToolsItem, CustomToolCallItem, FunctionCallItem, ImagePart, ItemMemo, LocalShellCallItem,
    McpApprovalRequestItem, McpApprovalResponseItem, McpCallItem, McpListToolsItem, McpTool, MessageItem,
    ReasoningItem, RefusalPart, ResponsesRequest, ToolOutputItem, ToolSearchCallItem, ToolSearchOutputItem,
    WebSearchCallItem,
)
from .toolmap import (
    LOCAL_SHELL_NAME, TOOL_SEARCH_NAME, ToolMap, build_tool_map, chat_name, lower_tool_choice, mcp_allowed,
)


@dataclass(frozen=True)
class LoweringOptions:
    """The settings lowering reads, under their setting names (settings.py), plus one derived
    flag: ``web_search``, true when the gateway runs web searches (``brave_api_key`` is set)."""

    flatten_content: bool = True  # text-only content as a plain string (every template takes it)
    upstream_model: str | None = None  # force one model name upstream
    model_map: dict[str, str] = field(default_factory=dict)
    tool_denylist: frozenset[str] = frozenset()
    upstream_extra_params: dict[str, Any] = field(default_factory=dict)  # merged into every chat request
    drop_upstream_params: frozenset[str] = frozenset()  # removed from every chat request
    web_search: bool = False  # derived: offer a web_search function the gateway answers itself
    model_extra_params: dict[str, dict] = field(default_factory=dict)  # per upstream model, after the above
    max_tokens_field: str = "max_tokens"  # or max_completion_tokens
    reasoning_effort_map: dict[str, str] = field(default_factory=dict)  # "" drops the effort
    history_reasoning_field: str = "reasoning_content"  # or "reasoning", or "none"
    think_tags: dict[str, str] = field(default_factory=dict)  # upstream model (or "*") -> think mode

    @classmethod
    def from_settings(cls, values: dict, web_search: bool = False) -> "LoweringOptions":
        """From resolved settings (the ``lowering`` fields of settings.py, same names)."""
        return cls(
            flatten_content=values["flatten_content"], upstream_model=values["upstream_model"] or None,
            model_map=values["model_map"], tool_denylist=frozenset(values["tool_denylist"]),
            upstream_extra_params=values["upstream_extra_params"],
            drop_upstream_params=frozenset(values["drop_upstream_params"]), web_search=web_search,
            model_extra_params=values["model_extra_params"], max_tokens_field=values["max_tokens_field"],
            reasoning_effort_map=values["reasoning_effort_map"],
            history_reasoning_field=values["history_reasoning_field"], think_tags=values["think_tags"])

    def think_mode(self, model: str) -> str:
        return self.think_tags.get(model) or self.think_tags.get("*") or "auto"


@dataclass
class Lowered:
    chat: dict  # the chat request
    body: bytes  # its canonical encoding
    tool_map: ToolMap
    client_stream: bool  # what the *client* asked for; upstream is always streamed
    mcp: mcp.McpTurn | None = None  # the request's hosted MCP servers (mcp.py): the gateway runs their tools


dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # the one compact encoding


def encode(chat: dict) -> bytes:
    return dumps(chat).encode()


_HOLDER = f"\x00resp2chat-{os.urandom(8).hex()}"  # can't occur in a request: a fresh token per process


def _holder(k: int) -> str:
    return f"{_HOLDER}-{k}\x00"


def _splice(text: str, fragments: list) -> list:
    """``text`` (JSON holding ``_holder(k)`` for each ``k``) cut at the holders, ``fragments[k]``
    in the place of each: the pieces in order (the text's as str, the fragments as given)."""
    holders = [dumps(_holder(k)) for k in range(len(fragments))]
    out, pos = [], 0
    for at, k in sorted((text.find(h), k) for k, h in enumerate(holders)):
        out += (text[pos:at], fragments[k])
        pos = at + len(holders[k])
    out.append(text[pos:])
    return out


def dumps_spliced(obj: dict, key: str, fragment: str) -> str:
    """``json.dumps(obj)`` (compact, UTF-8) where ``obj[key]`` is already encoded as ``fragment``:
    the same text, without encoding that value again (see turn.ToolsCache)."""
    return "".join(_splice(dumps({**obj, key: _holder(0)}), [fragment]))


class Recent:
    """The entries of the last ``size`` distinct keys, the least recently used dropped first;
    ``hits`` counts the keys found."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0

    def find(self, key):
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return found

    def keep(self, key, value):
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value


class TextCache(Recent):
    """The encoded JSON of long message texts, for the last few distinct ones; and what a
    gateway keeps of the conversations it lowered (``items``, ``history``).

    Codex sends the same ~17 KB developer prompt (and AGENTS.md context) every turn; encoding a
    text that long is ~0.1 ms, finding it again a hash of it (~10 µs). An entry is the JSON of
    its text and nothing else — the same bytes whoever sent that text — so what one request left
    here changes no other request's body (test_lowering.py checks the bytes against a cold
    lowering). Texts of ``MIN``..``MAX`` characters only, ``size`` of them.

    Codex also resends its whole history every turn: ``items`` (schema.ItemMemo) holds the input
    items validated before and ``history`` (``History``) the conversations lowered before, so a
    turn validates, lowers and encodes only what is new (test_prefix_cache.py: the same bytes).
    """

    MIN = 4096
    MAX = 1 << 18

    def __init__(self, size: int = 8):
        super().__init__(size)
        self.items = ItemMemo()
        self.history = History()

    def json(self, text: str) -> bytes:
        """``dumps(text).encode()``, from the cache when it holds the text."""
        found = self.find(text)
        if found is None:
            found = dumps(text).encode()
            if len(text) <= self.MAX:
                self.keep(text, found)
        return found


def encode_spliced(chat: dict, tools_json: bytes | None, texts: TextCache | None,
                   messages_json: tuple[bytes, ...] | None = None) -> bytes:
    """``encode(chat)``, with the JSON already known as bytes spliced in instead of encoded
    again: the tools' (``tools_json``, turn.ToolsCache), the messages' (``messages_json``: the
    JSON of ``chat["messages"]`` without its brackets, in pieces to be joined by commas, from
    ``History``) or else long message texts' (``texts``). The same bytes as ``encode(chat)``:
    UTF-8 of a concatenation is the concatenation of the pieces' UTF-8, and the JSON of a list
    is its items' JSON joined by commas, in brackets."""
    fragments: list = []
    obj = chat
    if tools_json is not None:
        obj = {**obj, "tools": _holder(0)}
        fragments.append(tools_json)
    messages = chat.get("messages")
    if messages_json is None and texts is not None and isinstance(messages, list):
        messages_json = (_list_json(messages, texts),)
    if messages_json is not None:
        obj = {**obj, "messages": [_holder(len(fragments))]}
        fragments.append(messages_json)
    if not fragments:
        return encode(chat)
    out: list[bytes] = []
    for p in _splice(dumps(obj), fragments):
        if p.__class__ is str:
            out.append(p.encode())
        elif p.__class__ is tuple:  # (the messages' pieces: copied once, in the join below)
            first = True
            for x in p:
                if x:
                    if not first:
                        out.append(b",")
                    out.append(x)
                    first = False
        else:
            out.append(p)
    return b"".join(out)


def _list_json(items: list, texts: TextCache | None) -> bytes:
    """The JSON of a list of messages without its brackets (UTF-8), long message texts from
    ``texts``."""
    if not items:
        return b""
    fragments: list[bytes] = []
    spliced = None
    if texts is not None:
        for i, message in enumerate(items):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and len(content) >= texts.MIN:
                spliced = spliced or list(items)
                spliced[i] = {**message, "content": _holder(len(fragments))}
                fragments.append(texts.json(content))
    text = dumps(spliced or items)[1:-1]
    if not fragments:
        return text.encode()
    return b"".join(p.encode() if p.__class__ is str else p for p in _splice(text, fragments))


# --- conversations lowered before ----------------------------------------------------------


@dataclass(eq=False)
class Checkpoint:
    """A conversation lowered through its first input items: where a later request that starts
    with the same items (the same validated models: schema.ItemMemo hands them out again) goes
    on from. What lowering an item gives depends on the items before it (one assistant turn's
    items fold into one message, the leading system run into one), the instructions and two
    options only (``params``), never on what comes after it: so lowering the rest from here gives
    the bytes lowering everything gives."""

    models: tuple  # the items lowered (the request's validated input, up to here)
    params: tuple  # (instructions, flatten_content, history_reasoning_field, the mcp tools' chat names): _params
    messages: tuple  # the chat messages finished by then
    pieces: tuple  # their JSON (UTF-8), in pieces: b",".join(pieces) is the JSON of ``messages`` without brackets
    pending: tuple  # the assistant message being put together then (_Conversation.state)
    size: int = 0  # bytes in ``pieces``
    calls: frozenset = frozenset()  # the tool call ids of the items lowered (a later output must answer one)


class History:
    """The conversations lowered last (``Checkpoint``, at the end of each request's input), so
    the next turn of a conversation lowers and encodes only its new items.

    Bounded: at most ``entries`` checkpoints and ``max_bytes`` of their encoded messages (the
    messages themselves, and the models, share their strings with the requests). A checkpoint
    that a later request went on from is replaced by that request's (a session holds one)."""

    def __init__(self, max_bytes: int = 24 << 20, entries: int = 8):
        self.max_bytes, self.max_entries = max_bytes, entries
        self._kept: list[Checkpoint] = []  # least recently used first
        self.hits = 0

    def clear(self) -> None:
        self._kept.clear()

    def find(self, models: list, params: tuple) -> Checkpoint | None:
        """The checkpoint of the longest first items of ``models`` (the same objects), if any."""
        best = None
        for cp in self._kept:
            n = len(cp.models)
            if n <= len(models) and (best is None or n > len(best.models)) and cp.params == params \
                    and models[n - 1] is cp.models[n - 1] and all(map(operator.is_, cp.models, models)):
                best = cp
        if best is not None:
            self.hits += 1
            self._kept.remove(best)
            self._kept.append(best)
        return best

    def keep(self, cp: Checkpoint, replaces: Checkpoint | None) -> None:
        if replaces is not None and replaces in self._kept:
            self._kept.remove(replaces)
        self._kept.append(cp)
        while self._kept and (len(self._kept) > self.max_entries or sum(c.size for c in self._kept) > self.max_bytes):
            self._kept.pop(0)

    @property
    def size(self) -> int:
        return sum(c.size for c in self._kept)


# --- content -------------------------------------------------------------------------------


def _part_text(part) -> str | None:
    if isinstance(part, RefusalPart):
        return part.refusal
    if isinstance(part, ImagePart):
        return None
    return part.text


def _image(part: ImagePart, where: str) -> dict:
    if not part.image_url:
        raise GatewayError(f"{where}: input_image needs image_url (file_id needs a file store)",
                           param=f"{where}.image_url", code="unsupported_file_id")
    image = {"url": part.image_url}
    if part.detail and part.detail != "auto":
        # ("auto", the API's default, is the detail left out: an image the item lists show with it
        # (listing.py), resent, lowers to the bytes of the one sent without: the backend's prefix cache)
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def _content(content, where: str, flatten: bool, allow_images: bool = True):
    """Chat message content: a string when text-only (if flattening), else a part list."""
    if isinstance(content, str):
        return content
    if flatten and not any(isinstance(p, ImagePart) for p in content):
        return "\n".join(_part_text(p) for p in content)
    parts = []
    for j, p in enumerate(content):
        if isinstance(p, ImagePart):
            if not allow_images:
                raise GatewayError(f"{where}[{j}]: images are only accepted in user content",
                                   param=f"{where}[{j}]", code="invalid_value")
            parts.append(_image(p, f"{where}[{j}]"))
        else:
            parts.append({"type": "text", "text": _part_text(p)})
    return parts


def _split_output(output, where: str) -> tuple[str, list[dict]]:
    """Tool output -> (text for the tool message, image parts to show in a user message)."""
    if isinstance(output, str):
        return output, []
    texts, images = [], []
    for j, p in enumerate(output):
        if isinstance(p, ImagePart):
            images.append(_image(p, f"{where}[{j}]"))
        else:
            texts.append(_part_text(p))
    return "\n".join(texts), images


# --- history -------------------------------------------------------------------------------


class _Conversation:
    """Accumulates chat messages; folds one assistant turn's items into one message."""

    def __init__(self, flatten: bool, reasoning_field: str = "reasoning_content"):
        self.flatten = flatten
        self.reasoning_field = reasoning_field
        self.messages: list[dict] = []
        self._reasoning: list[str] = []
        self._notes: list[str] = []
        self._content: Any = None
        self._tool_calls: list[dict] = []
        self._tool_images: list[dict] = []  # images from tool outputs, shown after the tool run
        self.calls: set[str] = set()  # the ids of the tool calls so far: what a tool output may answer
        # hosted tool searches (no call_id: OpenAI's server-executed ones) not answered yet, by item id:
        # an output without a call_id answers the first
        self.searches: list[str] = []

    def _assistant_open(self) -> bool:
        return bool(self._reasoning or self._notes or self._content is not None or self._tool_calls)

    def flush_assistant(self) -> None:
        if not self._assistant_open():
            return
        msg: dict = {"role": "assistant"}
        content = self._content
        if self._notes:
            content = "\n".join(self._notes + ([content] if isinstance(content, str) and content else []))
        msg["content"] = content if content is not None else ("" if not self._tool_calls else None)
        if self._reasoning and self.reasoning_field != "none":
            msg[self.reasoning_field] = "\n\n".join(self._reasoning)
        if self._tool_calls:
            msg["tool_calls"] = self._tool_calls
        self.messages.append(msg)
        self._reasoning, self._notes, self._content, self._tool_calls = [], [], None, []

    def flush_tool_images(self) -> None:
        if self._tool_images:
            self.messages.append({"role": "user", "content": self._tool_images})
            self._tool_images = []

    def add(self, msg: dict) -> None:
        self.flush_assistant()
        if msg["role"] != "tool":
            self.flush_tool_images()
        self.messages.append(msg)

    def reasoning(self, text: str) -> None:
        if self._content is not None or self._tool_calls:
            self.flush_assistant()  # new reasoning starts a new generation
        if text:
            self._reasoning.append(text)

    def assistant_content(self, content) -> None:
        if self._content is not None or self._tool_calls:
            self.flush_assistant()
        self.flush_tool_images()
        self._content = content

    def tool_call(self, call_id: str, name: str, arguments: str) -> None:
        self.flush_tool_images()
        self.calls.add(call_id)
        self._tool_calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )

    def note(self, text: str) -> None:
        self._notes.append(text)

    def finish(self) -> list[dict]:
        self.flush_assistant()
        self.flush_tool_images()
        return self.messages

    def state(self) -> tuple:
        """What is being put together (copies): ``resume`` takes it back."""
        return (tuple(self._reasoning), tuple(self._notes), self._content, tuple(self._tool_calls),
                tuple(self._tool_images), tuple(self.searches))

    def resume(self, messages: tuple, state: tuple, calls: frozenset) -> None:
        reasoning, notes, self._content, tool_calls, images, searches = state
        self.searches = list(searches)
        self.calls = set(calls)
        self.messages = list(messages)
        self._reasoning, self._notes, self._tool_calls, self._tool_images = (
            list(reasoning), list(notes), list(tool_calls), list(images))


@dataclass
class _Input:
    """The input lowered: the messages, and what ``History`` keeps of it."""

    messages: list[dict]
    checkpoint: Checkpoint | None = None  # where it went on from
    finished: int = 0  # messages finished before the input's end (the rest: flushed by ``finish``)
    state: tuple = ()  # the conversation's state at the input's end
    start: int = 0  # items of the leading system run
    calls: frozenset = frozenset()  # the tool call ids in it


def _lower_input(req: ResponsesRequest, flatten: bool, reasoning_field: str = "reasoning_content",
                 history: History | None = None, mcp_names: dict | None = None) -> _Input:
    """``mcp_names``: (server label, tool) -> the chat name its tool has (mcp.names_of)."""
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    conv = _Conversation(flatten, reasoning_field)
    params = _params(req, flatten, reasoning_field, mcp_names)
    found = history.find(items, params) if history is not None and items else None
    if found is not None:  # its items lowered before: the rest goes on from there
        conv.resume(found.messages, found.pending, found.calls)
        start = len(found.models)
    else:
        # instructions + leading system/developer run -> a single first system message
        system: list[str] = [req.instructions] if req.instructions else []
        start = 0
        while start < len(items) and (isinstance(items[start], AdditionalToolsItem) or (
                isinstance(items[start], MessageItem) and items[start].role in ("system", "developer"))):
            if isinstance(items[start], MessageItem):
                system.append(_content(items[start].content, f"input[{start}].content", True, allow_images=False))
            start += 1
        if system:
            conv.add({"role": "system", "content": "\n\n".join(system)})
    lead = start if found is None else 0  # (a checkpoint lies past the leading run: see History)

    for i in range(start, len(items)):
        item, where = items[i], f"input[{i}]"
        if isinstance(item, MessageItem):
            if item.role == "assistant":
                conv.assistant_content(_content(item.content, f"{where}.content", True, allow_images=False))
            else:  # user, and system/developer after the leading run (see module docstring)
                conv.add({"role": "user", "content": _content(item.content, f"{where}.content", flatten)})
        elif isinstance(item, ReasoningItem):
            parts = item.content if item.content else item.summary
            conv.reasoning("\n\n".join(p.text for p in parts))
        elif isinstance(item, FunctionCallItem):
            conv.tool_call(item.call_id, chat_name(item.name, item.namespace), item.arguments)
        elif isinstance(item, CustomToolCallItem):
            conv.tool_call(item.call_id, chat_name(item.name, item.namespace), dumps({"input": item.input}))
        elif isinstance(item, LocalShellCallItem):
            a = item.action
            args = {"command": a.command}
            if a.working_directory:
                args["workdir"] = a.working_directory
            if a.timeout_ms is not None:
                args["timeout_ms"] = a.timeout_ms
            conv.tool_call(_call_id(item, where), LOCAL_SHELL_NAME, dumps(args))
        elif isinstance(item, ToolSearchCallItem):
            args = item.arguments if isinstance(item.arguments, str) else dumps(item.arguments or {})
            call_id = _call_id(item, where)
            conv.tool_call(call_id, TOOL_SEARCH_NAME, args)
            if not item.call_id:
                conv.searches.append(call_id)
        elif isinstance(item, WebSearchCallItem):
            # A hosted search ran on the server; the chat model only needs to know it happened
            # (or, failed, that it did not: a call the gateway refused past its bounds ran nothing).
            query = (item.action or {}).get("query") or ""
            if item.status == "failed":
                conv.note(f"(a web search for: {query} failed)" if query else "(a web search failed)")
            else:
                conv.note(f"(searched the web for: {query})" if query else "(searched the web)")
        elif isinstance(item, ToolOutputItem):
            call_id = _answered_call(item, where, conv.calls)
            text, images = _split_output(item.output, f"{where}.output")
            conv.add({"role": "tool", "tool_call_id": call_id, "content": text})
            conv._tool_images.extend(images)
        elif isinstance(item, ToolSearchOutputItem):
            if not item.call_id and conv.searches:  # (a hosted search's output names no call: the first unanswered)
                call_id = conv.searches.pop(0)
            else:
                call_id = _answered_call(item, where, conv.calls)
                if call_id in conv.searches:
                    conv.searches.remove(call_id)
            conv.add({"role": "tool", "tool_call_id": call_id, "content": dumps(item.tools)})
        elif isinstance(item, AdditionalToolsItem):
            pass  # its tools joined the request's tools (inputs.py); no message
        elif isinstance(item, McpCallItem):  # a call the gateway ran (mcp.py): the call and its result
            name = mcp.chat_name_of(mcp_names or {}, item.server_label, item.name)
            conv.tool_call(item.id, name, item.arguments or "{}")
            conv.add({"role": "tool", "tool_call_id": item.id, "content": mcp.result_text(item.output, item.error)})
        elif isinstance(item, McpApprovalResponseItem):
            # denied: the model is told so under the request's call; approved: the call runs (an
            # mcp_call item follows, or the loop runs it first: mcp.pending_of)
            asked = _approval_request(items, i, item.approval_request_id)
            if _answered_before(items, i, item, where):
                continue  # the same answer again: it was lowered (or runs) once
            if not any(m["role"] == "user" for m in conv.messages):  # (the user's answer, as the conversation's
                # first user message: a chat template may refuse a call and its result without one before them)
                conv.add({"role": "user", "content": mcp.answer_text(asked.server_label, asked.name, item.approve)})
            if not item.approve:
                conv.tool_call(asked.id, mcp.chat_name_of(mcp_names or {}, asked.server_label, asked.name),
                               asked.arguments or "{}")
                conv.add({"role": "tool", "tool_call_id": asked.id, "content": mcp.denied_text(item.reason)})
        elif isinstance(item, (McpListToolsItem, McpApprovalRequestItem)):
            pass  # a listing offers its tools (the tool map); a request lowers with its response
        else:  # an item the schema accepts must have a way to the backend: never dropped in silence
            raise GatewayError(f"{where}: item type {getattr(item, 'type', '?')!r} cannot be sent to a chat backend",
                               param=f"{where}.type", code="unsupported_item_type")
    if history is None:
        return _Input(conv.finish())
    finished, state = len(conv.messages), conv.state()
    return _Input(conv.finish(), found, finished, state, lead, frozenset(conv.calls))


def _params(req: ResponsesRequest, flatten: bool, reasoning_field: str, mcp_names: dict | None) -> tuple:
    """What lowering an item depends on besides the items before it (``Checkpoint.params``)."""
    return (req.instructions, flatten, reasoning_field, tuple(sorted(mcp_names.items())) if mcp_names else None)


def _approval_request(items: list, i: int, request_id: str) -> McpApprovalRequestItem:
    for earlier in reversed(items[:i]):
        if isinstance(earlier, McpApprovalRequestItem) and earlier.id == request_id:
            return earlier
    raise mcp.unknown_request(request_id)


def _answered_before(items: list, i: int, item: McpApprovalResponseItem, where: str) -> bool:
    """An earlier ``mcp_approval_response`` answered the same request the same way (True); the
    other way is a 400 (a call both run and denied)."""
    for earlier in items[:i]:
        if isinstance(earlier, McpApprovalResponseItem) and earlier.approval_request_id == item.approval_request_id:
            if bool(earlier.approve) != bool(item.approve):
                raise GatewayError(f"{where}: approval_request_id {shown(item.approval_request_id)!r} was answered "
                                   "the other way before: an approval request is answered once (approve or deny)",
                                   param=f"{where}.approve", code="invalid_value")
            return True
    return False


def _answered_call(item, where: str, calls: set) -> str:
    """The call id a tool output answers: a call of the conversation (never an orphan tool
    message upstream: OpenAI's 400)."""
    call_id = _call_id(item, where)
    if call_id not in calls:
        raise GatewayError(f"{where}: no tool call found for {item.type} with call_id {shown(call_id)!r}",
                           param=f"{where}.call_id", code="invalid_value")
    return call_id


def _call_id(item, where: str) -> str:
    cid = getattr(item, "call_id", None) or getattr(item, "id", None)
    if not cid:
        raise GatewayError(f"{where}.call_id: required", param=f"{where}.call_id", code="missing_required_parameter")
    return cid


# --- request parameters --------------------------------------------------------------------


def _response_format(fmt: dict | None):
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise GatewayError("text.format.schema: required for json_schema", param="text.format.schema", code="invalid_value")
        spec = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if fmt.get("description"):
            spec["description"] = fmt["description"]
        if fmt.get("strict") is not None:
            spec["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": spec}
    raise GatewayError(f"text.format.type: unsupported {fmt['type']!r}", param="text.format.type", code="invalid_value")


INCLUDE_LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for output_text logprobs


def wants_logprobs(req: ResponsesRequest) -> bool:
    """The request asks for the output text's token logprobs: ``include:
    ["message.output_text.logprobs"]``, or ``top_logprobs`` above 0."""
    return bool(req.top_logprobs) or (req.include is not None and INCLUDE_LOGPROBS in req.include)


def lower(req: ResponsesRequest, opts: LoweringOptions = LoweringOptions(), known: ToolMap | None = None,
          tools_json: bytes | None = None, texts: TextCache | None = None,
          mcp_servers: tuple[mcp.ServerSpec, ...] = ()) -> Lowered:
    """``known``: the tool map ``req``'s tools lowered to before (``req.tools`` is then not read),
    ``tools_json`` its ``chat_tools`` encoded: both from turn.ToolsCache (never a request with
    mcp tools: its tool map depends on its conversation). ``texts``: where the JSON of long
    message texts is kept from turn to turn (the body's bytes are the same). ``mcp_servers``:
    the MCP servers the operator allows (``mcp_servers``): a request's mcp tools must name one."""
    if req.previous_response_id:  # begin_turn resolves it from the response store
        raise GatewayError(f"previous response {req.previous_response_id!r} not found",
                           param="previous_response_id", code="previous_response_not_found")

    hosted = None
    if known is None and req.tools:
        found = [(i, t) for i, t in enumerate(req.tools) if isinstance(t, McpTool)]
        if found:  # the servers its mcp tools name, and the listings its conversation holds of them
            servers = mcp.bind(found, mcp_servers)
            listed = mcp.listings_of(req.input) if isinstance(req.input, list) else {}
            hosted = mcp.McpTurn(servers, {s.label: listed[s.label] for s in servers if s.label in listed})
    tmap = known or build_tool_map(req.tools, opts.tool_denylist, opts.web_search,
                                   (lambda taken: mcp.functions(hosted.servers, hosted.listings, taken)) if hosted else None)
    mcp_names = None
    if hosted is not None:
        mcp_names = mcp.names_of(tmap)
        hosted.names = {cname: key for key, cname in mcp_names.items()}
        hosted.pending = mcp.pending_of(req.input, hosted.servers) if isinstance(req.input, list) else ()
        hosted.taken = frozenset(n for n, t in tmap.targets.items() if t.kind != mcp.KIND)
        hosted.allowed = mcp_allowed(req.tool_choice)
    elif isinstance(req.input, list) and any(isinstance(item, McpApprovalResponseItem) for item in req.input):
        mcp.pending_of(req.input)  # (no mcp tool: an approved call that has not run is a 400)
    tool_choice, tools = lower_tool_choice(req.tool_choice, tmap)
    chosen = req.tool_choice
    if isinstance(chosen, dict) and chosen.get("type") == mcp.KIND and (
            hosted is None or chosen.get("server_label") not in {s.label for s in hosted.servers}):
        raise GatewayError(f"tool_choice.server_label: tools has no mcp tool with server_label "
                           f"{str(chosen.get('server_label'))[:200]!r}", param="tool_choice.server_label",
                           code="invalid_value")  # (a server's tool not listed, or not yet: the model chooses)
    if hosted is not None and hosted.unlisted:  # round 1 offers their tools: its choice is made there
        if isinstance(chosen, dict) and chosen.get("type") == mcp.KIND and isinstance(chosen.get("server_label"), str) \
                and isinstance(chosen.get("name"), str):
            hosted.tool_choice = mcp.Choice(chosen["server_label"], chosen["name"])
        else:
            hosted.tool_choice = tool_choice
        hosted.parallel_tool_calls = req.parallel_tool_calls

    model = opts.upstream_model or opts.model_map.get(req.model, req.model)
    history = texts.history if texts is not None else None
    lowered_input = _lower_input(req, opts.flatten_content, opts.history_reasoning_field, history, mcp_names)
    messages = lowered_input.messages
    chat: dict[str, Any] = {"model": model, "messages": messages}
    if tools:
        chat["tools"] = tools
        if tool_choice is not None:
            chat["tool_choice"] = tool_choice
        if req.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = req.parallel_tool_calls
    elif (tool_choice == "required" or isinstance(tool_choice, dict)) and not (hosted and hosted.unlisted):
        # (a hosted MCP server not listed yet: its tools join before the first round, mcp.McpTools.begin)
        raise GatewayError("tool_choice requires a tool, but no tool is left for the backend",
                           param="tool_choice", code="invalid_value")
    response_format = _response_format(req.text.format if req.text else None)
    if response_format:
        chat["response_format"] = response_format
    if req.reasoning and req.reasoning.effort:
        effort = opts.reasoning_effort_map.get(req.reasoning.effort, req.reasoning.effort)
        if effort:
            chat["reasoning_effort"] = effort
    if req.max_output_tokens is not None:
        chat[opts.max_tokens_field] = req.max_output_tokens
    if req.temperature is not None:
        chat["temperature"] = req.temperature
    if req.top_p is not None:
        chat["top_p"] = req.top_p
    if req.presence_penalty is not None:
        chat["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty is not None:
        chat["frequency_penalty"] = req.frequency_penalty
    if wants_logprobs(req):  # the backend's token logprobs, translated into output_text parts
        chat["logprobs"] = True
        if req.top_logprobs is not None:
            chat["top_logprobs"] = req.top_logprobs
    # Always stream upstream, with usage: one translation path, and Codex needs real token counts.
    chat["stream"] = True
    chat["stream_options"] = {"include_usage": True}
    if opts.upstream_extra_params:
        chat.update(opts.upstream_extra_params)
    for key, value in opts.model_extra_params.get(model, {}).items():
        # one level deep, so per-model chat_template_kwargs add to the global ones
        if isinstance(value, dict) and isinstance(chat.get(key), dict):
            chat[key] = {**chat[key], **value}
        else:
            chat[key] = value
    for key in opts.drop_upstream_params:
        chat.pop(key, None)
    spliced_tools = tools_json if tools_json is not None and chat.get("tools") is tmap.chat_tools else None
    messages_json = None
    if history is not None:
        messages_json = _remember(history, req, opts, lowered_input, texts, mcp_names)
        if chat.get("messages") is not messages:  # (replaced by upstream_extra_params: encoded whole)
            messages_json = None
    body = encode_spliced(chat, spliced_tools, texts, messages_json)
    return Lowered(chat=chat, body=body, tool_map=tmap, client_stream=bool(req.stream), mcp=hosted)


def _remember(history: History, req: ResponsesRequest, opts: LoweringOptions, done: _Input,
              texts: TextCache | None, mcp_names: dict | None = None) -> tuple[bytes, ...]:
    """The JSON of the lowered messages in pieces (``encode_spliced``'s ``messages_json``): a
    checkpoint's, then what is new; the checkpoint at the end of this input kept in ``history``
    (when the input goes past its leading system run: a later request could extend that run)."""
    cp, messages = done.checkpoint, done.messages
    known = cp.pieces if cp is not None else ()
    first = len(cp.messages) if cp is not None else 0
    new = _list_json(messages[first:done.finished], texts)
    rest = _list_json(messages[done.finished:], texts)
    items = req.input
    if isinstance(items, list) and done.start < len(items):
        pieces = (*known, new) if new else known
        history.keep(Checkpoint(tuple(items), _params(req, opts.flatten_content, opts.history_reasoning_field, mcp_names),
                                tuple(messages[:done.finished]), pieces, done.state,
                                (cp.size if cp is not None else 0) + len(new), done.calls), cp)
    return (*known, new, rest)

