"""``POST /v1/responses/input_tokens``: how many tokens a Responses request's input is.

The request is made whole and lowered as a turn would be (``Turns``: decode, check, lookup,
lower: the history ``previous_response_id`` continues, references, sealed items, tools; what a
turn refuses, it refuses with the same error, ``stream``, ``store`` and ``background`` included), and
its chat request is counted by the backend that would get it (its first upstream), where the
backend has a tokenizer:

- ``POST {root}/tokenize`` with ``{model, messages, tools}`` (vLLM, sglang: the chat template
  applied, ``{"count": N}``);
- else ``POST {root}/apply-template`` with ``{messages, tools}`` then ``POST {root}/tokenize``
  with ``{"content": prompt}`` (llama.cpp's server: ``{"tokens": [...]}``);
- else (no tokenizer, or it failed) an estimate: one token per 4 bytes (``usage.estimate``) of the
  chat request's messages and tools as JSON (README says so).

``{root}`` is the upstream's base URL without its ``/v1`` (``http://host:8000/v1`` ->
``http://host:8000``). The answer is OpenAI's: ``{"object": "response.input_tokens",
"input_tokens": N}``; how it was counted is in the flow's metadata (``input_tokens_by``).
"""

from __future__ import annotations

import asyncio
import json

import h11
from mitmproxy import http

from resp2chat_core import gate as G
from resp2chat_core import mcp
from resp2chat_core.errors import GatewayError
from resp2chat_core import usage  # (the estimate's rule, without a tokenizer)
from resp2chat_core.routing import Candidate
from resp2chat_io.relay.upstream import TooLarge

from .base import META, fails_closed, json_response, log, refusal, request_id

TOKENIZE_SECS = 30.0  # one tokenizer call at most (else: the estimate)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def estimate(chat: dict) -> int:
    """The estimate (``usage.estimate``) of the chat request's messages and tools, as JSON."""
    return usage.estimate(len(_dumps(chat.get("messages") or []).encode())
                          + len(_dumps(chat.get("tools") or []).encode()))


@fails_closed
class InputTokens:
    name = "resp2chat_input_tokens"

    def __init__(self, turns, upstreams, gate) -> None:
        self.turns, self.upstreams, self.gate = turns, upstreams, gate

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.is_replay == "response":
            return
        req = flow.request
        if not G.is_input_tokens(req.method, req.path):
            return
        meta = flow.metadata.setdefault(META, {})
        owner = self.upstreams.owner_of(flow)
        try:
            body = req.get_content(strict=False) or b""
            raw = self.turns.check(await self.turns.decode(body), self.gate.client(meta.get("client")))
            meta["read"] = True  # (the flow keeps it without its mcp tools' secrets: redact.unread leaves it be)
            if mcp.client_secrets(raw):
                req.content = mcp.redact_text(body.decode("utf-8", "replace"), raw).encode()
            earlier = await self.turns.lookup(raw, owner)
            # (as it is: what a turn refuses, a stream, store or background it cannot take, it refuses
            # alike; they change no message or tool, so not the count)
            turn = self.turns.lower(raw, earlier, owner=owner, request_id=request_id(flow))
        except GatewayError as err:
            flow.response = refusal(flow, err)
            return
        first = self.upstreams.candidates(turn, flow, req.headers.get("authorization"))[0]
        count, by = await self.count(first, json.loads(turn.chat_body))
        meta["input_tokens_by"] = by
        flow.response = json_response(200, {"object": "response.input_tokens", "input_tokens": count},
                                      x_request_id=request_id(flow))

    async def count(self, to: Candidate, chat: dict) -> tuple[int, str]:
        """The chat request's token count, and how it was counted (the module's order)."""
        root = to.base_url.removesuffix("/v1")
        tools = {"tools": chat["tools"]} if chat.get("tools") else {}
        vllm = await self._ask(to, root + "/tokenize", {"model": chat["model"], "messages": chat["messages"], **tools})
        if isinstance(vllm, dict) and type(vllm.get("count")) is int:
            return vllm["count"], "tokenize"
        template = await self._ask(to, root + "/apply-template", {"messages": chat["messages"], **tools})
        if isinstance(template, dict) and isinstance(template.get("prompt"), str):
            tokens = await self._ask(to, root + "/tokenize", {"content": template["prompt"], "add_special": True})
            if isinstance(tokens, dict) and isinstance(tokens.get("tokens"), list):
                return len(tokens["tokens"]), "apply-template"
        return estimate(chat), "estimate"

    async def _ask(self, to: Candidate, url: str, body: dict) -> object:
        """One tokenizer call's JSON answer (None: not a 200 with JSON, or the backend could not
        be reached)."""
        headers = to.sent([(b"content-type", b"application/json")])  # (its key, upstream_headers: as a turn)
        try:
            status, answer = await asyncio.wait_for(self.upstreams.relay.client.get(url, headers, _dumps(body).encode()),
                                                    TOKENIZE_SECS)
            return json.loads(answer) if status == 200 else None
        except (OSError, ValueError, asyncio.TimeoutError, h11.ProtocolError, TooLarge) as exc:
            log.info(f"resp2chat: input_tokens: {url}: {type(exc).__name__}: {exc}")
            return None
