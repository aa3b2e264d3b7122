"""One Responses turn, from request bytes to a ready translator: the core's front door.

``begin_turn`` does everything that happens once per request (the conversation made whole,
validate, lower, prepare the fields echoed into Response objects), so the per-chunk path has
nothing left to decide. It is pure: what a request refers to (a previous response, item
references) is looked up before, asynchronously, by the one lookup of resp2chat_io
(``Turns.lookup``), and handed in as ``Found``.

``Caps`` bound what one request may hold (``max_input_items``, ``max_tools``,
``max_content_parts``) before anything walks it item by item: validating and lowering cost time
per item, and a 25 MB body of 900k tiny items would hold the event loop for seconds. A request
over a cap is a 400 ``array_above_max_length`` naming the cap and its setting, after one pass
over at most ``max_input_items`` items.
"""

from __future__ import annotations

import marshal
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from . import background, compaction, conversations, inputs, mcp, requestbody, response
from .errors import GatewayError
from .lowering import LoweringOptions, Recent, TextCache, dumps, dumps_spliced, lower, wants_logprobs
from .toolmap import ToolMap
from .schema import parse_request
from .seal import Sealer
from .sse import MAX_EVENT
from .translator import Translator, TurnContext
from .usage import estimate

@dataclass(frozen=True)
class Caps:
    """What one request may hold (settings.py: ``max_input_items``, ``max_tools``,
    ``max_content_parts``; 0: no cap). Counted on the request as the client sent it (the history
    ``previous_response_id`` puts in front is the store's, bounded there)."""

    input_items: int = 0  # items in ``input``
    tools: int = 0  # tools: ``tools``, the tools of ``namespace`` tools and of ``additional_tools`` items
    content_parts: int = 0  # content parts (text, images…) of all input items together

    SETTINGS = ("max_input_items", "max_tools", "max_content_parts")  # (in the order of the fields)

    @classmethod
    def from_settings(cls, values: dict) -> "Caps":
        return cls(*(values[name] for name in cls.SETTINGS))


def _over(what: str, count: int, setting: str, cap: int, param: str) -> GatewayError:
    return GatewayError(f"{param}: {count} {what}, more than this gateway accepts in one request ({setting}: {cap})",
                        param=param, code="array_above_max_length")


def _tools(tools: object, counted: int, caps: Caps) -> int:
    """``counted`` plus the tools of a ``tools`` list (a namespace counts as one, and so does each
    of its tools); ``GatewayError`` past ``max_tools``. Walks at most ``caps.tools`` tools."""
    if not isinstance(tools, list):
        return counted
    counted += len(tools)
    if caps.tools and counted <= caps.tools:
        counted += sum(len(t["tools"]) for t in tools if isinstance(t, dict) and isinstance(t.get("tools"), list))
    if caps.tools and counted > caps.tools:
        raise _over("tools", counted, "max_tools", caps.tools, "tools")
    return counted


def check_caps(raw: dict, caps: Caps) -> None:
    """``GatewayError`` if the request holds more than ``caps`` allow. Cheap: the counts of the
    lists first, then one pass over at most ``caps.input_items`` items (``inputs.facts``: the
    history walked before is not walked again), and only when a cap is passed, the pass that
    says where."""
    items = raw.get("input")
    items = items if isinstance(items, list) else ()
    if caps.input_items and len(items) > caps.input_items:
        raise _over("input items", len(items), "max_input_items", caps.input_items, "input")
    tools = _tools(raw.get("tools"), 0, caps)
    if items:
        known = inputs.facts(items)  # (bounded: at most caps.input_items items, as the pass below)
        if not known.more_tools and not (caps.content_parts and known.parts > caps.content_parts):
            return  # within the caps: the pass below only says where one is passed
    parts = 0
    for item in items:
        if not isinstance(item, dict):
            continue
        parts += inputs.parts_of(item)
        if caps.content_parts and parts > caps.content_parts:
            raise _over("content parts", parts, "max_content_parts", caps.content_parts, "input")
        if item.get("type") == "additional_tools":
            tools = _tools(item.get("tools"), tools, caps)


SESSION_HEADERS = ("session-id", "thread-id")  # Codex sends both (the thread id)


def session_key(prompt_cache_key: object, headers) -> str | None:
    """The one definition of a session, used by the request log, ``analyze``, routing and
    metrics: the request's ``prompt_cache_key``, else Codex's session header."""
    if isinstance(prompt_cache_key, str) and prompt_cache_key:
        return prompt_cache_key
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return None


class Alternate(NamedTuple):
    """How a fallback upstream gets a turn (routing.py; ``Turn.alternates``, in the order tried)."""

    body: bytes | None  # its chat request; None: the same bytes as ``Turn.chat_body`` (it lowers the same way)
    think: str  # how its <think> tags are read (think.py)
    tool_map: ToolMap  # its tools' map (a ``Rerouted`` event hands it to the translator)


@dataclass
class Turn:
    """What outlives the request hook. Not the decoded request nor the lowered chat dict: a turn
    lives as long as its stream, and with many streams open their ~100 KB each add up."""

    chat_body: bytes  # the chat request, encoded (what goes upstream)
    client_stream: bool  # what the *client* asked for; upstream is always streamed
    ctx: TurnContext
    web_search: bool = False  # the request has a web_search tool: the gateway runs its searches
    mcp: mcp.McpTurn | None = None  # the request's hosted MCP servers: the gateway runs their tools (mcp.py)
    active: Translator | None = None  # the translator answering this turn, once there is one
    items: list = field(default_factory=list)  # the whole conversation as input items (kept only to store or remember)
    store: bool = False  # the client wants this response kept (`store` not false)
    prompt_cache_key: str | None = None  # the client's, for session_key
    alternates: tuple[Alternate, ...] = ()  # the fallback upstreams' lowerings, in order (routing.py)
    compaction: bool = False  # Codex's remote compaction: the answer is one sealed summary (compaction.py)
    owner: str = ""  # whose stored state it reads and writes (owner.py): set by the caller, who knows the client
    conversation: str | None = None  # the conversation it goes on (conversations.py): its new items join it
    continued: int = 0  # how many of ``items`` came from that conversation (the rest are the turn's own)
    background: bool = False  # it runs in the gateway, off the client's connection (background.py)
    max_tool_calls: int | None = None  # the request's: bounds the calls the gateway runs for it (toolloop.py)
    # server-side compaction (context_management, its threshold crossed): a summary round runs
    # before the answer (compaction.py); a compaction turn (``compaction``) is that round alone;
    # None: the turn runs as it is
    server_compaction: compaction.ServerCompaction | None = None

    def translator(self, max_event: int = MAX_EVENT) -> Translator:
        """``max_event``: the largest SSE event its backend may send (``max_upstream_event_mb``)."""
        self.active = (compaction.CompactionTranslator if self.compaction else Translator)(self.ctx, max_event)
        return self.active


class KnownTools(NamedTuple):
    """A tool list lowered before (``ToolsCache``): what lowering the same list again gives."""

    tool_map: ToolMap
    chat_tools: bytes  # the chat request's tools, encoded (UTF-8)
    echo_tools: str  # the tools a Response echoes, encoded


class ToolsCache(Recent):
    """What a request's tools lowered to, for the last few distinct tool lists.

    Codex resends the same tools (~30 KB of JSON) every turn, and validating, flattening and
    encoding them (for the chat body and for the echo in Response objects: response.py) was ~40% of a turn's
    work. The key is ``marshal`` (format 2) of the decoded tools: it keeps dict order and tells
    ``true`` from ``1`` from ``1.0`` (``==`` does neither, and the bytes sent must be the ones the
    request gives), and costs ~30 µs for Codex's tools. Only lists that validated and lowered
    before are stored; output is byte for byte what lowering without the cache gives.

    It also carries the turn's ``texts`` (lowering.TextCache): the JSON of long message texts,
    which Codex resends as unchanged as its tools.
    """

    def __init__(self, size: int = 4):
        super().__init__(size)
        self.texts = TextCache()

    @staticmethod
    def key(raw_tools: list, opts: LoweringOptions) -> tuple | None:
        try:
            packed = marshal.dumps(raw_tools, 2)
        except ValueError:  # nested too deep to marshal: not a tool list that will validate anyway
            return None
        return packed, opts.tool_denylist, opts.web_search  # the tool map depends on these options only

    # find(key): the ``KnownTools`` of the same list lowered before, or None

    def add(self, key: tuple, raw_tools: list, tmap: ToolMap) -> KnownTools:
        return self.keep(key, KnownTools(tmap, dumps(tmap.chat_tools).encode(), dumps(response.echo_tools(raw_tools))))


def wants_summary(raw: dict) -> bool:
    """The request asks for its reasoning as a summary (``reasoning.summary``: ``auto``,
    ``concise``, ``detailed``; Codex always does): reasoning streams as ``summary`` with
    ``response.reasoning_summary_*`` events; otherwise as the item's ``content``
    (``reasoning_text``) with ``response.reasoning_text.*`` events."""
    reasoning = raw.get("reasoning")
    summary = reasoning.get("summary") if isinstance(reasoning, dict) else None
    return isinstance(summary, str) and summary not in ("", "none")


def decode_body(body: bytes | object) -> dict:
    """A request body (or its JSON value, decoded elsewhere: resp2chat_io/offload.py) as the
    request object; ``GatewayError`` otherwise."""
    data = requestbody.loads(body) if isinstance(body, bytes) else body  # strict UTF-8 JSON, or a 400 with the offset
    if not isinstance(data, dict):
        raise GatewayError("request body must be a JSON object", code="invalid_json")
    return data


@dataclass(frozen=True)
class Found:
    """What a request refers to, looked up before it is lowered (the store, or a socket's memory:
    resp2chat_io's one lookup, ``Turns.lookup``): the conversation ``previous_response_id``
    continues, or the items of the ``conversation`` it names (None: not found, or none asked
    for), and the items its ``item_reference`` ids name (missing: absent)."""

    earlier: list | None = None
    items: dict = field(default_factory=dict)


def wanted(raw: dict) -> tuple[str | None, tuple[str, ...]]:
    """What a request needs looked up: its ``previous_response_id`` (or the ``conversation`` it
    names: conversations.py) and its reference ids. ``GatewayError`` for a conversation named
    badly, or together with a previous response."""
    previous = raw.get("previous_response_id")
    conversation = conversations.named(raw)
    if conversation is not None and previous is not None:
        raise GatewayError("conversation and previous_response_id cannot be used together: a response continues "
                           "either a conversation or a previous response", param="conversation", code="invalid_value")
    return (conversation if conversation is not None else previous if isinstance(previous, str) and previous else None,
            tuple(dict.fromkeys(inputs.reference_ids(raw.get("input")))))


def conversation(raw: dict, found: Found, sealer: Sealer | None = None) -> tuple[dict, list | None, bool]:
    """A request's conversation made whole: the history ``previous_response_id`` continues in
    front, references resolved, sealed reasoning opened, ``additional_tools`` merged
    (inputs.py), and Codex's remote compaction read (compaction.py: a trailing
    ``compaction_trigger``; the sealed summaries Codex keeps opened for lowering). Returns
    ``(raw for lowering, the conversation as input items, is a compaction request)``; no
    ``input`` is none (``[]``), and the items are None when ``input`` is neither a string nor a
    list (validation names it). ``GatewayError`` for a reference, a sealed item
    or a previous response that cannot be used, and for an item id given twice: twice in the
    input, or one the conversation it goes on (``conversation``, ``previous_response_id``)
    holds (conversations.py ``unique``, OpenAI's ``Duplicate item found``; a reference counts as
    the item it names: either way the turn's conversation would hold one id twice)."""
    previous, _ = wanted(raw)
    named = conversations.named(raw)
    items = inputs.as_items(raw.get("input"))
    if items is None:
        return raw, None, False
    if raw.get("input") is None:
        raw = {**raw, "input": items}
    earlier = None
    if named is not None:
        earlier = found.earlier
        if earlier is None:
            raise conversations.not_found(named, "conversation")
        raw = {**raw, "conversation": None}
    elif previous is not None:
        earlier = found.earlier
        if earlier is None:
            raise GatewayError(f"previous response {previous!r} not found (unknown, expired or not stored)",
                               param="previous_response_id", code="previous_response_not_found")
        raw = {**raw, "previous_response_id": None}
    # the conversation it continues in front, then references, sealed reasoning and
    # additional_tools across the whole of it (inputs.py)
    resolve = (lambda ids: {i: found.items[i] for i in ids if i in found.items})
    before = len(earlier) if earlier else 0
    known = inputs.facts(earlier + items if earlier else items)  # (as expand walks it: one walk, inputs.FACTS)
    raw, items = inputs.expand(raw, items, resolve, sealer, earlier)
    if known.twice and known.twice[-1] >= before or known.refs and known.refs[-1][0] >= before:
        # (an id in the input twice, or one the conversation holds; a reference, the item it names)
        conversations.unique(items[before:], earlier or (), "input", "the conversation" if named is not None
                             else "the conversation previous_response_id continues")
    if named is not None:  # (the conversation keeps them: each must be one its items path can name)
        conversations.addressable(items[before:], "input")
    kept, opened, summarize = compaction.prepare(items, sealer, before)
    if opened is not items:
        raw = {**raw, "input": opened}
    return raw, kept, summarize


def nothing_to_send(items) -> GatewayError:
    """The 400 of a request that lowers to no message, in the client's terms: which of its input
    items give the model nothing (an ``mcp_list_tools``, an ``mcp_approval_request`` not answered,
    or answered by an approval whose call ran in a later turn of the conversation)."""
    kinds = sorted({str(getattr(item, "type", None) or "message")[:64] for item in items}) \
        if isinstance(items, list) and items else []
    if not kinds:
        return GatewayError("nothing to send the model: the request has no input, instructions or earlier "
                            "conversation", param="input", code="invalid_value")
    return GatewayError(f"nothing to send the model: the input's items ({', '.join(kinds)}) give the model nothing "
                        "to read (a tool listing, an approval request without an mcp_approval_response that approves "
                        "a call not run yet), and the request has no instructions or earlier conversation; send the "
                        "user's message, or continue with previous_response_id", param="input", code="invalid_value")


def begin_turn(body: bytes | dict, opts: LoweringOptions, response_id: str, created_at: int,
               found: Found = Found(), *, tools_cache: ToolsCache | None = None, sealer: Sealer | None = None,
               route: Callable[[str], Sequence[LoweringOptions]] | None = None, keep_items: bool = False,
               mcp_servers: tuple = ()) -> Turn:
    """Raise ``GatewayError`` for a request the gateway cannot serve. Pure: everything it reads
    comes in as arguments.

    ``body`` is the request's bytes, or the request already decoded (a WebSocket message's, or a
    large body's, decoded in a worker thread). ``found``: what the request refers to, looked up
    beforehand (``wanted`` says what). ``sealer`` reads and writes the ``encrypted_content`` the
    gateway hands clients (seal.py). ``route(model)`` (several upstreams, routing.py): the
    lowering options of each upstream that serves the client's model, in order; the first
    replaces ``opts``, the others get their own bodies (``Turn.alternates``). It raises
    ``GatewayError`` when no upstream serves the model. ``keep_items``: the turn keeps its
    conversation (``Turn.items``) even when the client did not ask to store it (a WebSocket
    remembers it). ``mcp_servers``: the MCP servers the operator allows (mcp.ServerSpec): a
    request's mcp tools must name one of them.
    """
    raw = decode_body(body)
    others: Sequence[LoweringOptions] = ()
    if route is not None:
        model = raw.get("model")
        opts, *others = route(model if isinstance(model, str) else "")
    asked = raw  # (as the client sent it: the Response echoes this, previous_response_id included)
    conversations.check_metadata(asked.get("metadata"))  # (echoed: OpenAI's limits, as a conversation's)
    raw, items, summarize = conversation(raw, found, sealer)
    tools = raw.get("tools")
    key = ToolsCache.key(tools, opts) if tools_cache is not None and tools and isinstance(tools, list) else None
    known = tools_cache.find(key) if key else None
    texts = tools_cache.texts if tools_cache is not None else None
    # (known: these tools validated and lowered before; the rest of the request still is checked)
    req = parse_request(raw if known is None else {k: v for k, v in raw.items() if k != "tools"},
                        texts.items if texts is not None else None)
    limit = req.compact_threshold  # (context_management, validated by the schema whatever the turn)
    if limit is not None and conversations.named(asked) is not None:
        raise GatewayError("context_management: not supported together with conversation here (the conversation "
                           "would keep every item the compaction replaces); use previous_response_id",
                           param="context_management", code="unsupported_parameter")
    if known is None:
        lowered = lower(req, opts, texts=texts, mcp_servers=mcp_servers)
        if key and lowered.mcp is None:  # (an mcp tool's functions depend on the conversation: not kept)
            known = tools_cache.add(key, tools, lowered.tool_map)
    else:
        lowered = lower(req, opts, known.tool_map, known.chat_tools, texts)
    if not lowered.chat["messages"] and not (lowered.mcp is not None and lowered.mcp.pending):
        # a chat request needs one message: no backend takes none (an approved MCP call that has not
        # run yet is two: it runs before round 1, and the model reads its call and result)
        raise nothing_to_send(req.input)
    if lowered.mcp is not None:  # (what an mcp tool carries for its server is not echoed)
        echoed = mcp.redacted_tools(response.echo_tools(asked.get("tools")))
        echo_json = response.echo_json(response.echo(asked, req, lowered.chat, tools=echoed))
    elif known and asked.get("tools") is tools:  # (the echoed tools encoded before: spliced in)
        echo_json = dumps_spliced(response.echo(asked, req, lowered.chat, tools=[]), "tools", known.echo_tools)[1:-1]
    else:
        echo_json = response.echo_json(response.echo(asked, req, lowered.chat))
    compact = limit is not None and not summarize and lowered.mcp is None and estimate(len(lowered.body)) >= limit
    if summarize:
        lowered = compaction.summary_request(lowered)
    ctx = TurnContext(response_id=response_id, created_at=created_at, model=req.model,
                      tool_map=lowered.tool_map, echo_json=echo_json,
                      think=opts.think_mode(lowered.chat["model"]), sealer=sealer,
                      encrypted_reasoning=inputs.wants_sealed_reasoning(raw),
                      summary=wants_summary(raw), logprobs=wants_logprobs(req),
                      queued=asked.get("background") is True)
    store = raw.get("store") is not False
    background.check(asked)
    named = conversations.named(asked)
    pck = raw.get("prompt_cache_key")
    alternates: list[Alternate] = []
    summaries: list[bytes | None] = []  # (server-side compaction: each fallback's summary request)
    for alt in others:  # each fallback upstream: its own byte-deterministic body
        if alt == opts:
            alternates.append(Alternate(None, ctx.think, lowered.tool_map))
            summaries.append(None)
            continue
        same_tools = (alt.tool_denylist, alt.web_search) == (opts.tool_denylist, opts.web_search)
        if known is not None and same_tools:
            other = lower(req, alt, known.tool_map, known.chat_tools, texts)
        else:  # req may lack its tools (the cache path): lower the whole request again
            other = lower(parse_request(raw) if known is not None else req, alt, texts=texts, mcp_servers=mcp_servers)
        if summarize:
            other = compaction.summary_request(other)
        elif compact:
            summaries.append(compaction.summary_request(other, copy=True).body)
        alternates.append(Alternate(other.body, alt.think_mode(other.chat["model"]), other.tool_map))
    ctx.tool_maps = tuple(a.tool_map for a in alternates)  # (a Rerouted event takes one)
    server = None
    if compact:
        server = _server_compaction(raw, items or [], lowered, opts, others, texts, sealer, tuple(summaries))
    elif summarize:  # (a compaction turn: that round alone, each candidate's body its summary request)
        server = compaction.ServerCompaction(lowered.body, None, sealer, tuple(a.body for a in alternates))
    return Turn(lowered.body, lowered.client_stream, ctx,
                web_search=not summarize and any(t.kind == "web_search" for t in lowered.tool_map.targets.values()),
                mcp=lowered.mcp if not summarize else None,
                items=([] if items is None or not (store or keep_items or named) else
                       compaction.users(items) if server is not None or summarize else items), store=store,
                prompt_cache_key=pck if isinstance(pck, str) and pck else None,
                alternates=tuple(alternates), compaction=summarize, conversation=named,
                background=asked.get("background") is True, max_tool_calls=req.max_tool_calls,
                continued=len(found.earlier) if named is not None and found.earlier is not None else 0,
                server_compaction=server)


def _server_compaction(raw: dict, items: list, lowered, opts: LoweringOptions, others: Sequence[LoweringOptions],
                       texts: TextCache | None, sealer: Sealer | None,
                       fallbacks: tuple[bytes | None, ...]) -> compaction.ServerCompaction:
    """A turn's compaction round (compaction.py): its summary request (the turn's own, the
    prompt last; ``fallbacks``: each fallback's, None when the first's), and the answer round's
    requests from the summary: the conversation's user messages, then the compaction item
    lowered as any later turn lowers it (SUMMARY_PREFIX), for each candidate (the first's
    options, then each fallback's: None when the same)."""
    kept = compaction.users(items)

    def answer(summary: str) -> list:
        opened = {**raw, "input": [*kept, {"type": "message", "role": "user",
                                           "content": compaction.SUMMARY_PREFIX + summary}]}
        req = parse_request(opened)
        return [lower(req, opts, texts=texts).body, *(None if alt == opts else lower(req, alt, texts=texts).body
                                                      for alt in others)]
    return compaction.ServerCompaction(compaction.summary_request(lowered, copy=True).body, answer, sealer,
                                       fallbacks)
