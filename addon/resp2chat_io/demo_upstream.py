"""Scripted OpenAI-compatible Chat Completions server (standard library only).

Used as the bundled demo backend, as the upstream of end-to-end tests (real
Codex CLI + real mitmdump) and as the benchmark upstream. It validates requests
like a strict real backend and streams the chunk shapes real servers emit
("dialects": vllm, ollama, llamacpp, deepseek; think, mistral, kimi).

What the "model" answers depends on the LAST message. For a user message the
first matching directive wins (one per line, at the start of the line):

    error: <status> <message>   HTTP error with OpenAI error JSON (429 adds Retry-After)
    midstream-error             a little text, then an SSE error event, no [DONE]
    truncate                    a little text, then the stream ends without finish/[DONE]
    length                      the default answer with finish_reason "length"
    call: <name> <json-args>    one tool call per line (parallel calls, in order)
    run: <shell command>        exec_command / local_shell tool call if such a tool is offered
    words: N                    "word0 word1 ..." (N words)
    json                        {"answer": "<default answer>"} as text
    (default)                   "You said: <last line>" (+ " (I see N image(s))")

`noreason`, `slow: <ms>` and `finish-on-text` (the last text chunk carries the finish reason,
as vLLM sends it, instead of a chunk of its own) are read from the latest user message
anywhere, so they also apply to the answer that follows a tool result.

`POST /v1/embeddings` ({model, input: a string or a list of them}) answers one small
deterministic vector per input and OpenAI's ``usage`` (``prompt_tokens`` = ``total_tokens``:
4 bytes of the inputs a token), last in the body; `slow: <ms>` in an input sends the body in
pieces that long apart (one per vector, the usage last), so a client can be mid-answer.

Token accounting: 1 token ~= 4 bytes of the canonical prompt
json.dumps([tools, messages]); `POST /tokenize` with {model, messages, tools} (vLLM's)
answers that count, without answering. A simulated KV prefix cache remembers the last
64 prompts; cached_tokens = longest common byte prefix // 4, in whole blocks
of 16 tokens. Completion tokens = reasoning words + text words + 8-character
tool-argument pieces.

    python -m resp2chat_io.demo_upstream --port 8000 --dialect vllm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

MODEL_ID = "demo-model"
ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image_url")
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
BYTES_PER_TOKEN = 4
CACHE_BLOCK = 16  # prefix caches hit in whole KV blocks
CACHE_ENTRIES = 64
MAX_RECORDED = 1000
ARG_PIECE = 8  # max characters per streamed tool-argument delta
MIDSTREAM_ERROR = {"error": {"message": "upstream exploded", "type": "server_error", "code": 500}}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error",
               429: "rate_limit_error"}


def _dumps(obj) -> bytes:
    # Raw UTF-8 like vLLM/Ollama; surrogatepass so odd client input cannot crash a response.
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _sse(obj) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class ApiError(Exception):
    """An OpenAI-style error response (vLLM also sets "object": "error")."""

    def __init__(self, status, message, *, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self):
        return {"object": "error", "error": {"message": self.message, "type": self.type,
                                             "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- validation

def _check_name(name, param):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(400, f"Invalid '{param}': {name!r} does not match pattern '^[a-zA-Z0-9_-]{{1,64}}$'.",
                       param=param)


def _check_content(content, p):
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ApiError(400, f"'{p}.content' must be a string or a list of content parts", param=f"{p}.content")
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise ApiError(400, f"Unknown content part type {kind!r} in '{p}.content[{k}]'; expected text or image_url",
                           param=f"{p}.content[{k}].type")


def validate(body):
    """Reject what strict backends (vLLM + Qwen-style chat templates) reject."""
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", param="tools")
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(fn, dict) and tool.get("type") == "function" and isinstance(fn.get("parameters"), dict)):
            raise ApiError(400, f"'tools[{i}]' must look like "
                                '{"type": "function", "function": {"name": ..., "parameters": {...}}}',
                           param=f"tools[{i}]")
        _check_name(fn.get("name"), f"tools[{i}].function.name")

    call_ids = set()  # ids of tool calls made by earlier assistant messages
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{p}' must be an object", param=p)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"Invalid role {role!r} in '{p}'; expected one of {', '.join(ROLES)}",
                           param=f"{p}.role")
        if role == "system" and i:
            # Qwen-style templates raise exactly this for a non-leading system message.
            raise ApiError(400, "System message must be at the beginning.", param=f"{p}.role")
        _check_content(m.get("content"), p)
        if role == "assistant" and m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise ApiError(400, f"'{p}.tool_calls' must be a list", param=f"{p}.tool_calls")
            for j, call in enumerate(m["tool_calls"]):
                q = f"{p}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
                    raise ApiError(400, f"'{q}' must have an 'id' and a 'function'", param=q)
                _check_name(fn.get("name"), f"{q}.function.name")
                if not isinstance(fn.get("arguments"), str):
                    raise ApiError(400, f"'{q}.function.arguments' must be a JSON-encoded string",
                                   param=f"{q}.function.arguments")
                call_ids.add(call["id"])
        if role == "tool":
            prev = msgs[i - 1] if i else {}
            if not (prev.get("role") == "tool" or (prev.get("role") == "assistant" and prev.get("tool_calls"))):
                raise ApiError(400, f"'{p}': a tool message must directly follow an assistant message "
                                    "with tool_calls or another tool message", param=p)
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or tid not in call_ids:
                raise ApiError(400, f"'{p}': tool_call_id {tid!r} does not match any tool call "
                                    "of an earlier assistant message", param=f"{p}.tool_call_id")


def canonical_prompt(body) -> bytes:
    return json.dumps([body.get("tools") or [], body["messages"]], separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def prompt_tokens(prompt: bytes) -> int:
    return -(-len(prompt) // BYTES_PER_TOKEN)  # ceil


def _common_prefix_len(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]; compare only the new span (memcmp)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Simulated KV prefix cache over the canonical prompts of the last requests."""

    def __init__(self, size=CACHE_ENTRIES):
        self._items = deque(maxlen=size)
        self._lock = threading.Lock()

    def hit(self, prompt: bytes) -> int:
        """Cached tokens for this prompt; then remember it."""
        with self._lock:
            best = 0
            for old in reversed(self._items):
                if min(len(old), len(prompt)) > best:
                    best = max(best, _common_prefix_len(prompt, old))
            if prompt in self._items:
                self._items.remove(prompt)
            self._items.append(prompt)
        return best // BYTES_PER_TOKEN // CACHE_BLOCK * CACHE_BLOCK


# ---------------------------------------------------------------- the answer plan

def _pieces(args: str):
    return [args[i:i + ARG_PIECE] for i in range(0, len(args), ARG_PIECE)]


def _words(text: str):
    # One word with its trailing whitespace per token; joining them gives text back exactly.
    return re.findall(r"^\s+|\S+\s*", text)


@dataclass
class Plan:
    """What to answer, independent of any dialect's wire format."""
    reasoning: list = field(default_factory=list)
    text: list = field(default_factory=list)
    tool_calls: list = field(default_factory=list)  # [(chat-side name, arguments JSON string)]
    finish: str = "stop"
    fault: str | None = None  # "midstream-error" | "truncate"
    delay: float = 0.0
    logprobs: int | None = None  # the request asked for logprobs (``logprobs: true``): its ``top_logprobs``
    finish_on_text: bool = False  # the last text chunk carries the finish reason (vLLM's way)

    @property
    def reasoning_tokens(self):
        return len(self.reasoning)

    @property
    def completion_tokens(self):
        return len(self.reasoning) + len(self.text) + sum(len(_pieces(a)) for _, a in self.tool_calls)

    def clip(self, limit):
        """Honour max_tokens like a real server: cut the output and report "length"."""
        if self.fault or self.completion_tokens <= limit:
            return
        self.reasoning = self.reasoning[:limit]
        self.text = self.text[:limit - len(self.reasoning)]
        self.tool_calls, self.finish = [], "length"


def _text(content) -> str:
    if isinstance(content, str):
        return content.replace("\r\n", "\n")
    if isinstance(content, list):
        return "\n".join(p.get("text") or "" for p in content if p.get("type") == "text")
    return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _line_re(pattern):
    return re.compile(r"^[ \t]*" + pattern + r"[ \t]*$", re.M)


D_ERROR = _line_re(r"error:[ \t]*(\d{3})[ \t]*(.*?)")
D_MIDSTREAM = _line_re(r"midstream-error")
D_TRUNCATE = _line_re(r"truncate")
D_LENGTH = _line_re(r"length")
D_CALL = _line_re(r"call:[ \t]*(\S+)[ \t]*(.*?)")
D_RUN = _line_re(r"run:[ \t]*(.+?)")
D_WORDS = _line_re(r"words:[ \t]*(\d+)")
D_JSON = _line_re(r"json")
D_NOREASON = re.compile(r"\bnoreason\b")
D_SLOW = re.compile(r"\bslow:[ \t]*(\d+)")
D_FINISH_ON_TEXT = re.compile(r"\bfinish-on-text\b")


def plan_answer(body, chunk_delay=0.0) -> Plan:
    msgs = body["messages"]
    last = msgs[-1]
    user = next((m for m in reversed(msgs) if m["role"] == "user"), None)
    utext = _text(user.get("content")) if user else ""
    plan = Plan()
    slow = D_SLOW.search(utext)
    plan.delay = int(slow[1]) / 1000 if slow else chunk_delay
    line = _last_line(_text(last.get("content")))

    if last["role"] == "tool":
        answer = f"The tool returned: {line}"
    elif last["role"] == "user":
        answer = _plan_user(body, utext, line, plan)
    else:
        answer = "Hello from the demo upstream."
    if answer is not None:
        plan.text = _words(answer)
    plan.finish_on_text = bool(D_FINISH_ON_TEXT.search(utext))
    if not D_NOREASON.search(utext):
        plan.reasoning = _words(f"Thinking about: {line}".rstrip())
    if body.get("logprobs") is True:
        top = body.get("top_logprobs")
        plan.logprobs = top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0
    return plan


def token_logprobs(word: str, top: int) -> dict:
    """A text chunk's ``logprobs`` as OpenAI and vLLM send them: the chunk as one token, a made-up
    (deterministic) log probability, and ``top`` alternatives, the token itself first."""
    def entry(token: str, rank: int) -> dict:
        return {"token": token, "logprob": -0.125 * (len(word) % 5 + rank), "bytes": list(token.encode())}
    return {"content": [{**entry(word, 0), "top_logprobs": [entry(word if r == 0 else f"{word.strip()}#{r}", r)
                                                            for r in range(top)]}]}


def _plan_user(body, text, line, plan):
    """Fill plan for a user turn; return the answer text (None when the plan is tool calls)."""
    parts = body["messages"][-1].get("content")
    images = sum(1 for p in parts if p.get("type") == "image_url") if isinstance(parts, list) else 0
    default = f"You said: {line}" + (f" (I see {images} image(s))" if images else "")
    offered = {t["function"]["name"] for t in body.get("tools") or []}
    can_call = body.get("tool_choice") != "none"

    if m := D_ERROR.search(text):
        status = int(m[1]) if 400 <= int(m[1]) <= 599 else 500
        raise ApiError(status, m[2] or f"demo error {status}",
                       type=ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                       code="rate_limit_exceeded" if status == 429 else None,
                       headers={"Retry-After": "2"} if status == 429 else None)
    if D_MIDSTREAM.search(text):
        plan.fault = "midstream-error"
        return "This answer will fail midway"
    if D_TRUNCATE.search(text):
        plan.fault = "truncate"
        return "This answer is cut short"
    if D_LENGTH.search(text):
        plan.finish = "length"
        return default
    if can_call and (calls := D_CALL.findall(text)):
        plan.tool_calls, plan.finish = [(name, args or "{}") for name, args in calls], "tool_calls"
        return None
    run = D_RUN.search(text)
    if can_call and run and offered & {"exec_command", "local_shell"}:
        args = {"cmd": run[1]} if "exec_command" in offered else {"command": ["bash", "-lc", run[1]]}
        name = "exec_command" if "exec_command" in offered else "local_shell"
        plan.tool_calls, plan.finish = [(name, json.dumps(args))], "tool_calls"
        return None
    if m := D_WORDS.search(text):
        return " ".join(f"word{i}" for i in range(int(m[1])))
    if D_JSON.search(text):
        return json.dumps({"answer": default})
    return default


# ---------------------------------------------------------------- dialects (wire formats)

@dataclass
class Ctx:
    id: str
    created: int
    model: str
    prompt_tokens: int
    cached_tokens: int
    include_usage: bool


class VLLM:
    """vLLM / sglang: role chunk first, `reasoning_content`, tool arguments in small deltas,
    usage in a separate choices-less chunk when asked."""

    reasoning_key = "reasoning_content"
    choice_extra = {"logprobs": None}

    def envelope(self, ctx):
        return {"id": ctx.id, "object": "chat.completion.chunk", "created": ctx.created, "model": ctx.model}

    def tool_id(self):
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def finish_reason(self, plan):
        return plan.finish

    def usage(self, plan, ctx):
        return {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": plan.completion_tokens,
                "total_tokens": ctx.prompt_tokens + plan.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": ctx.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": plan.reasoning_tokens}}

    # -- streaming
    def opening(self):
        return [{"role": "assistant", "content": ""}]

    def reasoning_delta(self, word):
        return {self.reasoning_key: word}

    def text_delta(self, word):
        return {"content": word}

    def tool_deltas(self, i, name, args):
        yield {"tool_calls": [{"index": i, "id": self.tool_id(), "type": "function",
                               "function": {"name": name, "arguments": ""}}]}
        for piece in _pieces(args):
            yield {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}

    def closing(self, plan, ctx):
        env = self.envelope(ctx)
        chunks = [{**env, "choices": [{"index": 0, "delta": {}, **self.choice_extra,
                                       "finish_reason": self.finish_reason(plan)}]}]
        if ctx.include_usage:
            chunks.append({**env, "choices": [], "usage": self.usage(plan, ctx)})
        return chunks

    def stream(self, plan, ctx) -> list[bytes]:
        """All SSE events, pre-encoded. Delta chunks share one envelope, so only the delta is serialised."""
        env = _dumps(self.envelope(ctx))[:-1]
        extra = b"".join(b"," + _dumps(k) + b":" + _dumps(v) for k, v in self.choice_extra.items())
        head = b"data: " + env + b',"choices":[{"index":0,"delta":'
        tail = extra + b',"finish_reason":null}]}\n\n'
        events = [head + _dumps(d) + tail for d in [*self.opening(), *map(self.reasoning_delta, plan.reasoning)]]
        if plan.logprobs is None:
            events += [head + _dumps(self.text_delta(word)) + tail for word in plan.text]
        else:  # (asked for: each text chunk carries its token's logprobs)
            lp_tail = b"".join(b"," + _dumps(k) + b":" + _dumps(v) for k, v in self.choice_extra.items()
                               if k != "logprobs") + b',"finish_reason":null}]}\n\n'
            events += [head + _dumps(self.text_delta(word)) + b',"logprobs":'
                       + _dumps(token_logprobs(word, plan.logprobs)) + lp_tail for word in plan.text]
        events += [head + _dumps(d) + tail for i, (name, args) in enumerate(plan.tool_calls)
                   for d in self.tool_deltas(i, name, args)]
        if plan.fault == "midstream-error":
            events.append(_sse(MIDSTREAM_ERROR))
        if plan.fault:
            return events  # no finish_reason, no [DONE]
        closing = self.closing(plan, ctx)
        if plan.finish_on_text and plan.text and not plan.tool_calls and "usage" not in closing[0] \
                and "usage" not in closing[0]["choices"][0] and events[-1].endswith(b',"finish_reason":null}]}\n\n'):
            # the last token and the finish reason in one chunk, as vLLM sends them
            end = b',"finish_reason":' + _dumps(self.finish_reason(plan)) + b"}]}\n\n"
            events[-1] = events[-1].removesuffix(b',"finish_reason":null}]}\n\n') + end
            closing = closing[1:]
        events += [_sse(c) for c in closing]
        events.append(b"data: [DONE]\n\n")
        return events

    # -- stream: false
    def tool_call(self, i, name, args):
        return {"id": self.tool_id(), "type": "function", "function": {"name": name, "arguments": args}}

    def message(self, plan):
        calls = [self.tool_call(i, n, a) for i, (n, a) in enumerate(plan.tool_calls)]
        text = "".join(plan.text)
        return {"role": "assistant", "content": text if text or not calls else None,
                self.reasoning_key: "".join(plan.reasoning) or None, "tool_calls": calls}

    def completion(self, plan, ctx):
        return {**self.envelope(ctx), "object": "chat.completion",
                "choices": [{"index": 0, "message": self.message(plan), **self.choice_extra,
                             "finish_reason": self.finish_reason(plan)}],
                "usage": self.usage(plan, ctx)}


class Ollama(VLLM):
    """Ollama's /v1 shim: role on every delta (no role-only chunk), `reasoning`, each tool call
    whole in one chunk, finish "stop" even for tool calls, usage on the finish chunk itself."""

    reasoning_key = "reasoning"
    choice_extra = {}

    def envelope(self, ctx):
        return {**super().envelope(ctx), "system_fingerprint": "fp_ollama"}

    def tool_id(self):
        return f"call_{uuid.uuid4().hex[:8]}"

    def finish_reason(self, plan):
        return "length" if plan.finish == "length" else "stop"

    def usage(self, plan, ctx):  # no cache or reasoning details
        return {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": plan.completion_tokens,
                "total_tokens": ctx.prompt_tokens + plan.completion_tokens}

    def opening(self):
        return []

    def reasoning_delta(self, word):
        return {"role": "assistant", "content": "", "reasoning": word}

    def text_delta(self, word):
        return {"role": "assistant", "content": word}

    def tool_call(self, i, name, args):
        return {"id": self.tool_id(), "index": i, "type": "function", "function": {"name": name, "arguments": args}}

    def tool_deltas(self, i, name, args):
        yield {"role": "assistant", "content": "", "tool_calls": [self.tool_call(i, name, args)]}

    def closing(self, plan, ctx):
        chunk = {**self.envelope(ctx), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": self.finish_reason(plan)}]}
        if ctx.include_usage:
            chunk["usage"] = self.usage(plan, ctx)
        return [chunk]

    def message(self, plan):
        msg = {"role": "assistant", "content": "".join(plan.text)}
        if plan.reasoning:
            msg["reasoning"] = "".join(plan.reasoning)
        if plan.tool_calls:
            msg["tool_calls"] = [self.tool_call(i, n, a) for i, (n, a) in enumerate(plan.tool_calls)]
        return msg


class LlamaCpp(VLLM):
    """llama.cpp server: vLLM-like; `timings` on the last chunk, cached tokens in usage."""

    def tool_id(self):
        return uuid.uuid4().hex  # llama.cpp uses random 32-character ids

    def usage(self, plan, ctx):
        return {"completion_tokens": plan.completion_tokens, "prompt_tokens": ctx.prompt_tokens,
                "total_tokens": ctx.prompt_tokens + plan.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": ctx.cached_tokens}}

    def timings(self, plan, ctx):
        return {"prompt_n": ctx.prompt_tokens - ctx.cached_tokens, "cache_n": ctx.cached_tokens,
                "predicted_n": plan.completion_tokens}

    def closing(self, plan, ctx):
        chunks = super().closing(plan, ctx)
        chunks[-1]["timings"] = self.timings(plan, ctx)  # the usage chunk when asked, else the finish chunk
        return chunks

    def completion(self, plan, ctx):
        return {**super().completion(plan, ctx), "timings": self.timings(plan, ctx)}


class DeepSeek(VLLM):
    """DeepSeek API: `reasoning_content`; usage also reports cache hit/miss tokens."""

    def tool_id(self):
        return f"call_0_{uuid.uuid4()}"

    def usage(self, plan, ctx):
        return {**super().usage(plan, ctx), "prompt_cache_hit_tokens": ctx.cached_tokens,
                "prompt_cache_miss_tokens": ctx.prompt_tokens - ctx.cached_tokens}


class Think(VLLM):
    """A server without a reasoning parser (vLLM/sglang without --reasoning-parser, llama.cpp
    --reasoning-format none): the thinking arrives inside content, wrapped in <think> tags."""

    reasoning_key = "content"

    @staticmethod
    def _tagged(plan):
        if not plan.reasoning:
            return plan
        return replace(plan, reasoning=["<think>\n", *plan.reasoning, "\n</think>\n\n"])

    def stream(self, plan, ctx):
        return super().stream(self._tagged(plan), ctx)

    def message(self, plan):
        calls = [self.tool_call(i, n, a) for i, (n, a) in enumerate(plan.tool_calls)]
        text = "".join(self._tagged(plan).reasoning) + "".join(plan.text)
        return {"role": "assistant", "content": text or None, "tool_calls": calls}


class Mistral(VLLM):
    """Mistral La Plateforme: 9-character tool ids, each call whole in one delta, the calls, the
    finish_reason and usage in one last chunk; Magistral reasoning as content "thinking" parts."""

    choice_extra = {}

    def tool_id(self):
        return uuid.uuid4().hex[:9]

    def usage(self, plan, ctx):
        return {"prompt_tokens": ctx.prompt_tokens, "total_tokens": ctx.prompt_tokens + plan.completion_tokens,
                "completion_tokens": plan.completion_tokens}

    def reasoning_delta(self, word):
        return {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": word}]}]}

    def tool_deltas(self, i, name, args):
        return []  # the calls ride on the closing chunk

    def closing(self, plan, ctx):
        delta = {}
        if plan.tool_calls:
            delta["tool_calls"] = [{"id": self.tool_id(), "function": {"name": n, "arguments": a}, "index": i}
                                   for i, (n, a) in enumerate(plan.tool_calls)]
        chunk = {**self.envelope(ctx), "choices": [{"index": 0, "delta": delta,
                                                    "finish_reason": self.finish_reason(plan)}]}
        if ctx.include_usage:
            chunk["usage"] = self.usage(plan, ctx)
        return [chunk]

    def message(self, plan):
        msg = super().message(plan)
        thinking = msg.pop(self.reasoning_key)
        if thinking:
            msg["content"] = [{"type": "thinking", "thinking": [{"type": "text", "text": thinking}]},
                              {"type": "text", "text": msg["content"] or ""}]
        return msg


class Kimi(VLLM):
    """Moonshot/Kimi API: tool ids functions.<name>:<n>, usage inside the finishing choice with a
    top-level cached_tokens."""

    choice_extra = {}

    def tool_deltas(self, i, name, args):
        yield {"tool_calls": [{"index": i, "id": f"functions.{name}:{i}", "type": "function",
                               "function": {"name": name, "arguments": ""}}]}
        for piece in _pieces(args):
            yield {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}

    def tool_call(self, i, name, args):
        return {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}}

    def usage(self, plan, ctx):
        return {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": plan.completion_tokens,
                "total_tokens": ctx.prompt_tokens + plan.completion_tokens, "cached_tokens": ctx.cached_tokens}

    def closing(self, plan, ctx):
        choice = {"index": 0, "delta": {}, "finish_reason": self.finish_reason(plan)}
        if ctx.include_usage:
            choice["usage"] = self.usage(plan, ctx)
        return [{**self.envelope(ctx), "choices": [choice]}]


DIALECTS = {"vllm": VLLM(), "ollama": Ollama(), "llamacpp": LlamaCpp(), "deepseek": DeepSeek(),
            "think": Think(), "mistral": Mistral(), "kimi": Kimi()}


# ---------------------------------------------------------------- HTTP

class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # socketserver's default of 5 resets connections under a burst

    def __init__(self, address, *, dialect, max_context, chunk_delay, log_path=None):
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
        self.dialect, self.max_context, self.chunk_delay, self.log_path = dialect, max_context, chunk_delay, log_path
        self.requests = deque(maxlen=MAX_RECORDED)
        self.lock = threading.Lock()
        self.cache = PrefixCache()
        super().__init__(address, Handler)

    def record(self, body):
        with self.lock:
            self.requests.append(body)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(body, ensure_ascii=False) + "\n")

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are normal
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "resp2chat-demo/1.0"
    disable_nagle_algorithm = True  # many tiny SSE writes: don't let Nagle/delayed ACK stall them

    def log_message(self, format, *args):  # quiet by default
        pass

    @property
    def route(self):
        return self.path.split("?", 1)[0]

    def do_GET(self):
        srv = self.server
        model = {"id": MODEL_ID, "object": "model", "owned_by": "resp2chat-demo", "max_model_len": srv.max_context}
        if self.route == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif self.route.startswith("/v1/models/"):  # (one model: what a client asks before using it)
            name = unquote(self.route.removeprefix("/v1/models/"))
            if name == MODEL_ID:
                self._send_json(200, model)
            else:
                err = ApiError(404, f"The model '{name[:200]}' does not exist", code="model_not_found")
                self._send_json(404, err.body())
        elif self.route in ("/health", "/healthz"):
            self._send_json(200, {"status": "ok"})
        elif self.route == "/_requests":
            with srv.lock:
                self._send_json(200, list(srv.requests))
        else:
            self._not_found()

    def do_DELETE(self):
        if self.route != "/_requests":
            return self._not_found()
        with self.server.lock:
            self.server.requests.clear()
        self._send_json(200, {"status": "ok"})

    def do_POST(self):
        raw = self._read_body()  # always consume the body to keep the keep-alive connection in sync
        if self.route == "/tokenize":
            return self._tokenize(raw)
        if self.route == "/v1/embeddings":
            return self._embeddings(raw)
        if self.route != "/v1/chat/completions":
            return self._not_found()
        try:
            self._chat(raw)
        except ApiError as e:
            self._send_json(e.status, e.body(), e.headers)

    def _tokenize(self, raw):
        """vLLM's /tokenize of a chat request: its prompt's token count (as a turn would count it)."""
        try:
            body = json.loads(raw)
            n = prompt_tokens(canonical_prompt(body))
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._send_json(400, ApiError(400, "expected {model, messages, tools}").body())
        self._send_json(200, _dumps({"count": n, "max_model_len": self.server.max_context, "tokens": list(range(n))}))

    def _embeddings(self, raw):
        """OpenAI's embeddings: a vector per input, the usage last (``slow: <ms>``: in pieces)."""
        try:
            body = json.loads(raw)
            given = body["input"]
            inputs = [given] if isinstance(given, str) else list(given)
            if not inputs or not all(isinstance(i, str) for i in inputs):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._send_json(400, ApiError(400, "expected {model, input: a string or a list of strings}").body())
        n = sum(prompt_tokens(i.encode("utf-8", "surrogatepass")) for i in inputs)
        model = body.get("model") if isinstance(body.get("model"), str) else MODEL_ID
        vectors = [_dumps({"object": "embedding", "index": k,
                           "embedding": [b / 255 for b in hashlib.sha256(i.encode("utf-8", "surrogatepass")).digest()[:8]]})
                   for k, i in enumerate(inputs)]
        pieces = [b'{"object":"list","data":[' + b",".join(vectors) + b"]", b',"model":' + _dumps(model),
                  b',"usage":' + _dumps({"prompt_tokens": n, "total_tokens": n}) + b"}"]
        slow = max((int(m[1]) for i in inputs if (m := D_SLOW.search(i))), default=0)
        if not slow:
            return self._send_json(200, b"".join(pieces))
        pieces = [b'{"object":"list","data":[' + vectors[0]] + [b"," + v for v in vectors[1:]] + [
            b'],"model":' + _dumps(model) + b',"usage":' + _dumps({"prompt_tokens": n, "total_tokens": n}) + b"}"]
        self._send_head(200, "application/json", {"Transfer-Encoding": "chunked"})
        try:
            for k, piece in enumerate(pieces):
                if k:
                    time.sleep(slow / 1000)
                self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _other(self):
        self._read_body()
        self._not_found()

    do_PUT = do_PATCH = _other

    def _chat(self, raw):
        srv = self.server
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"Request body is not valid JSON: {e}")
        srv.record(body)
        name = (self.headers.get("x-demo-dialect") or srv.dialect).lower()
        if name not in DIALECTS:
            raise ApiError(400, f"Unknown x-demo-dialect {name!r}; expected one of {', '.join(DIALECTS)}",
                           param="x-demo-dialect")
        validate(body)
        prompt = canonical_prompt(body)
        n = prompt_tokens(prompt)
        if n > srv.max_context:
            raise ApiError(400, f"This model's maximum context length is {srv.max_context} tokens. However, you "
                                f"requested {n} tokens in the messages, Please reduce the length of the messages.",
                           type="BadRequestError", code=400)
        plan = plan_answer(body, srv.chunk_delay)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            plan.clip(limit)
        opts = body.get("stream_options")
        model = body.get("model")
        ctx = Ctx(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                  model=model if isinstance(model, str) and model else MODEL_ID,
                  prompt_tokens=n, cached_tokens=srv.cache.hit(prompt),
                  include_usage=isinstance(opts, dict) and bool(opts.get("include_usage")))
        dialect = DIALECTS[name]
        if body.get("stream"):
            return self._send_stream(dialect.stream(plan, ctx), plan)
        if plan.fault == "midstream-error":
            raise ApiError(500, MIDSTREAM_ERROR["error"]["message"], type="server_error", code=500)
        data = _dumps(dialect.completion(plan, ctx))
        if plan.fault == "truncate":  # promise the whole body, deliver half, hang up
            self._send_head(200, "application/json", {"Content-Length": str(len(data))})
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        self._send_json(200, data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send_head(self, status, content_type, headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_json(self, status, obj, headers=None):
        data = obj if isinstance(obj, bytes) else _dumps(obj)
        self._send_head(status, "application/json", {**(headers or {}), "Content-Length": str(len(data))})
        self.wfile.write(data)

    def _not_found(self):
        err = ApiError(404, f"Not found: {self.command} {self.route}", type="not_found_error")
        self._send_json(404, err.body())

    def _send_stream(self, events, plan):
        # HTTP chunk framing done here so each SSE event is exactly one write.
        frames = [b"%X\r\n%s\r\n" % (len(e), e) for e in events]
        self._send_head(200, "text/event-stream; charset=utf-8",
                        {"Cache-Control": "no-cache", "Transfer-Encoding": "chunked"})
        try:
            for i, frame in enumerate(frames):
                if plan.delay and i:
                    time.sleep(plan.delay)
                self.wfile.write(frame)
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except ConnectionError:
            self.close_connection = True
        if plan.fault:
            self.close_connection = True


def make_server(host="127.0.0.1", port=0, *, dialect="vllm", max_context=131072, chunk_delay=0.0,
                log_path=None) -> ThreadingHTTPServer:
    return DemoServer((host, port), dialect=dialect, max_context=max_context, chunk_delay=chunk_delay,
                      log_path=log_path)


def serve_in_thread(host="127.0.0.1", port=0, **kwargs):
    """Start a server on a daemon thread; returns (server, base_url). Stop with server.shutdown()."""
    server = make_server(host, port, **kwargs)
    # Short poll interval: shutdown() waits for it, and tests start/stop servers often.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="demo-upstream",
                     daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}/v1"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m resp2chat_io.demo_upstream",
                                 description="Scripted OpenAI-compatible Chat Completions demo server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dialect", choices=sorted(DIALECTS), default="vllm")
    ap.add_argument("--max-context", type=int, default=131072, help="context window in tokens (1 token ~= 4 bytes)")
    ap.add_argument("--chunk-delay", type=float, default=0.0, help="seconds to sleep between stream chunks")
    ap.add_argument("--log", metavar="FILE.jsonl", help="append each received request body as one JSON line")
    args = ap.parse_args(argv)
    server = make_server(args.host, args.port, dialect=args.dialect, max_context=args.max_context,
                         chunk_delay=args.chunk_delay, log_path=args.log)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: leave serve_forever, close the socket
    host, port = server.server_address[:2]
    print(f"demo upstream listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
