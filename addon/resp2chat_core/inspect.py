"""Readable renderings of both sides of a turn, for mitmweb's contentviews and the analyzer.

Raw SSE is hundreds of one-token events; a person wants to see the conversation. Runs of deltas
for the same item collapse into one line with the joined text. The backend's chat stream is read
by chatstream.py, the reader the translator uses: the view shows what the translator read.

Total: a view shows whatever a flow holds (a client's refused request, a backend's broken
stream, a recording of another version), never raises. A value that is not what its place
expects (an event that is no object, a ``response`` that is no object, a field of another type)
is shown as it is, or left out.
"""

from __future__ import annotations

import json

from .chatstream import NOT_JSON, NOT_OBJECT, NOT_SSE, ChunkReader
from .sse import SSEParser


def _events(raw: bytes) -> list:
    parser = SSEParser(max(len(raw), 1))  # (a recorded body, already held whole: every event of it is shown)
    out: list = []
    for payload in parser.feed(raw) + parser.finish():
        try:
            out.append(json.loads(payload))
        except (ValueError, RecursionError):
            out.append(payload)
    return out


def _short(text, width: int = 400) -> str:
    try:
        text = json.dumps(text, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        text = '"…"'
    return text if len(text) <= width else text[:width] + "…\""


def _dict(value) -> dict:
    """``value`` where an object belongs: itself, or an empty one."""
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _str(value, default: str = "") -> str:
    return value if isinstance(value, str) else default


def describe_responses_sse(raw: bytes) -> str:
    lines: list[str] = []
    run: tuple | None = None  # (type, item_id, first seq, pieces)

    def close_run():
        if run:
            kind, item, first, pieces = run
            lines.append(f"{first:>5}  {kind} ×{len(pieces)}  {item}  {_short(''.join(pieces))}")

    for ev in _events(raw):
        if not isinstance(ev, dict):
            close_run()
            run = None
            lines.append(f"       (not JSON) {ev[:80]}" if isinstance(ev, str) else
                         f"       (not a JSON object) {_short(ev, 80)}")
            continue
        kind, seq = _str(ev.get("type"), "?"), ev.get("sequence_number", -1)
        if not isinstance(seq, (int, float, str)):
            seq = _short(seq, 20)
        if kind.endswith(".delta"):
            item = ev.get("item_id", "")
            if run and run[0] == kind and run[1] == item:
                run[3].append(str(ev.get("delta", "")))
                continue
            close_run()
            run = (kind, item, seq, [str(ev.get("delta", ""))])
            continue
        close_run()
        run = None
        detail = ""
        if "response" in ev:
            r = _dict(ev["response"])
            detail = f"status={r.get('status')}"
            if r.get("error"):
                error = _dict(r["error"])
                kind = f" ({error.get('type')})" if error.get("type") else ""  # (errors.response_error)
                detail += f" error={error.get('code')}{kind}: {error.get('message')}"
            if r.get("usage"):
                u = _dict(r["usage"])
                detail += (f" usage: in={u.get('input_tokens')} (cached "
                           f"{_dict(u.get('input_tokens_details')).get('cached_tokens')}) out={u.get('output_tokens')}")
            if r.get("incomplete_details"):
                detail += f" incomplete={_dict(r['incomplete_details']).get('reason')}"
        elif "item" in ev:
            it = _dict(ev["item"])
            detail = f"#{ev.get('output_index')} {it.get('type')} {it.get('id', '')}"
            if it.get("name"):
                detail += f" {str(it.get('namespace')) + '.' if it.get('namespace') else ''}{it['name']}"
            if kind.endswith(".done") and it.get("type") in ("function_call", "custom_tool_call"):
                detail += " " + _short(it.get("arguments", it.get("input", "")), 200)
        lines.append(f"{seq:>5}  {kind}  {detail}".rstrip())
    close_run()
    return "\n".join(lines)


def describe_chat_sse(raw: bytes) -> str:
    """A backend's chat stream (or whole JSON body), one line per run of deltas. Read whole:
    without the bound of one event (the gateway that recorded it read it within its own
    ``max_upstream_event_mb``, which may be larger than the default)."""
    view = _ChatLines()
    reader = ChunkReader(view, max(len(raw), 1))
    reader.feed(raw)
    reader.finish()
    view.flush()
    return "\n".join(view.lines)


_UNREADABLE = {NOT_JSON: "not JSON", NOT_OBJECT: "not a JSON object", NOT_SSE: "neither SSE nor JSON"}


class _ChatLines:
    """A chatstream sink that writes the lines of ``describe_chat_sse``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.label: str | None = None
        self.pieces: list[str] = []
        self.calls: dict = {}  # call key -> its number in the view (order of appearance)

    def flush(self) -> None:
        if self.label:
            self.lines.append(f"{self.label}: {_short(''.join(self.pieces))}")
        self.label, self.pieces = None, []

    def add(self, label: str, text: str) -> None:
        if self.label != label:
            self.flush()
            self.label = label
        self.pieces.append(text)

    def line(self, text: str) -> None:
        self.flush()
        self.lines.append(text)

    def on_start(self) -> None:
        pass

    def on_reasoning(self, text: str) -> None:
        self.add("reasoning", text)

    def on_text(self, text: str) -> None:
        self.add("content", text)

    def on_refusal(self, text: str) -> None:
        self.add("refusal", text)

    def on_tool(self, key, call_id: str | None, name: str | None, args: str | None) -> None:
        label = f"tool_call[{self.calls.setdefault(key, len(self.calls))}]"
        if name is not None:
            self.flush()
            self.label, self.pieces = label, [f"{name} id={call_id} args="]
        self.add(label, args or "")

    def on_logprobs(self, entries: list) -> None:
        pass  # (what tokens the text is made of: nothing to do here)

    def on_finish(self, reason: str) -> None:
        self.line(f"finish_reason: {reason}")

    def on_usage(self, usage: dict) -> None:
        self.line(f"usage: {json.dumps(usage)}")

    def on_error(self, body: bytes) -> None:
        try:
            text = json.dumps(json.loads(body), ensure_ascii=False)
        except (ValueError, RecursionError):
            text = body.decode("utf-8", "replace")
        self.line(f"error: {text}")

    def on_garbage(self, text: str, what: str) -> None:
        self.line(f"({_UNREADABLE.get(what, what)}) {text[:120]}")

    def on_done(self) -> None:
        self.line("[DONE]")


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    out = []
    for p in _list(content):
        if isinstance(p, dict):
            out.append(str(p.get("text") or p.get("refusal") or (f"[{p.get('type')}]")))
    return " ".join(out)


def describe_responses_request(body) -> str:
    body = _dict(body)
    lines = [f"model={body.get('model')} stream={body.get('stream')} tools={len(_list(body.get('tools')))}"
             f" tool_choice={body.get('tool_choice')} reasoning={body.get('reasoning')}"]
    if body.get("instructions"):
        lines.append(f"instructions: {_short(body['instructions'], 200)}")
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else _list(items)
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            lines.append(f"[{i}] (not an object) {_short(it, 200)}")
            continue
        kind = _str(it.get("type", "message"), "?")
        if kind == "message":
            lines.append(f"[{i}] {it.get('role')}: {_short(_content_text(it.get('content')), 200)}")
        elif kind in ("function_call", "custom_tool_call"):
            lines.append(f"[{i}] {kind} {it.get('call_id')} {it.get('name')} {_short(it.get('arguments', it.get('input', '')), 200)}")
        elif kind.endswith("_output"):
            out = it.get("output")
            lines.append(f"[{i}] {kind} {it.get('call_id')}: {_short(_content_text(out), 200)}")
        elif kind == "reasoning":
            lines.append(f"[{i}] reasoning: {_short(_content_text(it.get('summary')), 200)}")
        else:
            lines.append(f"[{i}] {kind}")
    tools = [_dict(t).get("name") or _dict(t).get("type") or t for t in _list(body.get("tools"))]
    if tools:
        lines.append("tools: " + ", ".join(map(str, tools)))
    return "\n".join(lines)


def describe_chat_request(body) -> str:
    body = _dict(body)
    lines = [f"model={body.get('model')} tools={len(_list(body.get('tools')))} tool_choice={body.get('tool_choice')}"]
    for i, m in enumerate(_list(body.get("messages"))):
        m = _dict(m)
        text = _content_text(m.get("content"))
        extra = ""
        if m.get("reasoning_content"):
            extra += f" reasoning={_short(m['reasoning_content'], 80)}"
        for tc in _list(m.get("tool_calls")):
            fn = _dict(_dict(tc).get("function"))
            extra += f" call {_dict(tc).get('id')} {fn.get('name')}({str(fn.get('arguments'))[:120]})"
        if m.get("tool_call_id"):
            extra += f" for {m['tool_call_id']}"
        lines.append(f"[{i}] {m.get('role')}: {_short(text, 200)}{extra}")
    return "\n".join(lines)
