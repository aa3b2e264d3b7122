"""Remote compaction: Codex's built-in provider asks the gateway to shorten a conversation.

Rules of this file:
- Sans-I/O. The summary request goes to the backend like any turn (the relay, an Exchange);
  this file only decides what that request holds and what the client gets back.
- The summary travels sealed (seal.py, purpose ``"compaction"``): only this gateway (or replicas
  sharing its ``seal_key``) can read a compaction item, and no client can forge or alter one.
- Deterministic. A later request that holds the item lowers it to the same bytes every time, at
  the item's own place in the conversation, so the backend's prefix cache keeps working after
  compaction (the item only ever sits where Codex put it, and Codex keeps it there).

Theory of operation (the contract, from codex-rs ``compact_remote_v2.rs``, checked against the
real Codex CLI 0.169.0; docs/codex.md has the details)::

    Codex ── POST /v1/responses {input: [...history, {"type": "compaction_trigger"}], tools…}
      gateway: lowers the history as for any turn, adds COMPACTION_PROMPT as the last user
               message, tool_choice "none" (same tools, same prefix: the backend's cache holds
               the whole conversation already) ──▶ backend answers with a summary
      gateway ──▶ response.created … output_item.added/done {"type": "compaction",
               "encrypted_content": seal(summary)} … response.completed (with the backend's usage)
    Codex keeps its user messages and the compaction item, drops the rest, and sends
    [...kept messages, {"type": "compaction", "encrypted_content": …}, new turn…] from then on.
    gateway: the item becomes one user message, SUMMARY_PREFIX + summary, in its place.

The same machinery answers ``POST /v1/responses/compact`` (the endpoint of the API and of the
Open Responses spec, for any client): ``compact_request`` makes its body the remote-compaction
turn above (whole conversation, trigger last, not stored, not streamed), and ``compacted`` makes
that turn's Response the endpoint's answer, ``{id, object: "response.compaction", created_at,
output, usage}``, whose output (the conversation's user messages, then the compaction item) is
the whole input of the client's next turn, on either transport.

Either way the summary is read whole before the client hears anything of it but keepalives: the
relay runs such a turn as the round server-side compaction runs before its answer (below), alone
(``ServerCompaction`` without an answer round; ``SummaryReader``), and hands the turn's
translator the sealed item and the backend's usage (``CompactionTranslator.summarized``). So,
with several upstreams, the summary falls back to the next one wherever it failed: before its
first byte, in its stream (an error object, garbage, a finish reason of failure, a cut, the
gateway's bounds), or with a context too short for the conversation (routing.py
``falls_back``, as an answer's first round does); when every one failed, the client gets the failure
it can act on (routing.py ``deciding``), with the code it would be for an answer (``context_length_exceeded``: Codex stops, it does not retry the same compaction).

Server-side compaction (``context_management: [{"type": "compaction", "compact_threshold": N}]``
on a turn, either transport: the OpenAI Agents SDKs send it) runs on the same machinery, as a
round before the answer (``ServerCompaction``; the relay runs it: relay/exchange.py; the entries
are validated with the rest of the request, schema.py ``CompactionEntry``)::

    turn whose chat request, as lowered, is at least N tokens (usage.estimate of its bytes: known
    before any call, for every client, byte-deterministic; the backend's usage of the last turn
    is not known to a stateless client's turn)
      round 1: the summary request above (the whole conversation, this turn's input included,
               COMPACTION_PROMPT last) ──▶ backend's summary, read whole, never streamed to the client
               (with several upstreams, it falls back as the answer does: routing.py's rule, one
               walk of the candidates, but at any point of the summary, not only before its first
               byte, and on what its reader finds is no summary (``SummaryReader.failure``):
               nothing of it reached the client; the answer then starts from the upstream
               that wrote it; a whole JSON answer, ``stream`` ignored, is read as the stream is)
      ──▶ the client hears output_item.added/done of one sealed ``compaction`` item, output[0]
      round 2: the turn again on the compacted input, the compact endpoint's rule: the
               conversation's user messages, then the compaction item (lowered as always) ──▶ the answer
    stored (previous_response_id): the user messages, then the output (compaction item first):
    the next turn's prefix is round 2's, byte for byte.

Below the threshold the turn is the one it always was (same bytes). Usage the client reads: round
2's, plus the summary's output tokens (the tool loop's rule: the last prompt, every completion);
``tpm`` spends both rounds whole, and a summary call that failed midway before another upstream
wrote it (``ServerCompaction.work``). The summary is the backend model's, not OpenAI's opaque state.

Codex counts ``output_item.done`` events and needs exactly one compaction item and a
``response.completed``: so the summary is sent whole at the end (one item, no deltas), a summary
cut by the backend's length limit is still a summary (completed, not incomplete), and a backend
that wrote no text at all fails the turn with ``server_error`` (Codex retries it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .channel import UpstreamFailed
from .errors import GatewayError
from .inputs import COMPACTION as ITEM, COMPACTION_TRIGGER as TRIGGER, facts, where
from .listing import as_listed
from .lowering import Lowered, encode
from .seal import Sealer, SealError
from .sse import MAX_EVENT
from .toolloop import Work
from .translator import Kind, Phase, Translator, TurnContext
from .usage import call_tokens, summed

PURPOSE = "compaction"  # the seal purpose: a sealed reasoning text cannot pass for a summary

COMPACTION_PROMPT = """\
Stop here: do not continue the task and do not call any tools. This conversation is being \
compacted to free up the context window, and your summary will replace everything above. \
Another assistant (possibly you) will continue the work from your summary alone, so write it \
for them:

1. Goal: what the user wants, with every requirement, constraint and preference they stated.
2. Decisions: what was decided or agreed, and why.
3. Files and commands: the paths read, created or changed (what changed in each), and the \
commands run with the results that matter (errors verbatim).
4. State of the work: what is done, what is in progress, what remains, in order.
5. Open questions: anything unresolved, unexpected or still to be checked.

Be specific: exact paths, names, identifiers, values and error messages. Be concise: no \
pleasantries, no repetition. Answer with the summary only.
Write the summary now."""

NO_SUMMARY = "the backend wrote no summary for the compaction"  # (server_error: Codex retries)
NO_SEAL = "the gateway has no seal key for the compaction summary"

SUMMARY_PREFIX = ("[Summary of the conversation so far. The earlier turns were compacted to save "
                  "context; continue the work from here.]\n\n")


def prepare(items: list, sealer: Sealer | None, before: int = 0) -> tuple[list, list, bool]:
    """A request's input items -> (items to keep, items to lower, is a compaction request).

    The trailing ``compaction_trigger`` is taken off both lists. In the items to lower, each
    compaction item becomes the user message that carries its summary; the items to keep (what
    a stored response remembers) keep the sealed item. ``GatewayError`` names an item the
    gateway did not make, or one that was altered, and a trigger anywhere but last: by its place
    in the client's own input, the first ``before`` items being the stored conversation the
    request continues (inputs.py ``where``: as every input item's error names it).
    """
    kept = untriggered(items)
    compaction = kept is not items
    lowered = kept
    if not facts(items).compaction:  # (no compaction item nor trigger: inputs.FACTS, the history not walked again)
        return kept, lowered, compaction
    for i, item in enumerate(kept):
        kind = _type(item)
        if kind == TRIGGER:
            name, param = where(i, before, "type")
            raise GatewayError(f"{name}: compaction_trigger must be the last input item", param=param,
                               code="invalid_value")
        if kind == ITEM:
            if lowered is kept:
                lowered = list(kept)
            lowered[i] = {"type": "message", "role": "user",
                          "content": SUMMARY_PREFIX + open_item(item, i, sealer, before)}
    return kept, lowered, compaction


def untriggered(items: list) -> list:
    """``items`` without a trailing ``compaction_trigger`` (``items`` itself when there is none)."""
    return items[:-1] if items and _type(items[-1]) == TRIGGER else items


def open_item(item: dict, i: int, sealer: Sealer | None, before: int = 0) -> str:
    """The summary a compaction item carries (``GatewayError`` if it is not one of ours; ``i``,
    ``before``: its place, inputs.py ``where``)."""
    name, param = where(i, before, "encrypted_content")
    token = item.get("encrypted_content")
    if not isinstance(token, str) or not token:
        raise GatewayError(f"{name}: a compaction item needs its encrypted_content", param=param,
                           code="invalid_value")
    if sealer is None:
        raise GatewayError(f"{name}: compaction items cannot be read here (no seal key)", param=param,
                           code="invalid_encrypted_content")
    try:
        return sealer.unseal(PURPOSE, token)
    except SealError as exc:
        raise GatewayError(
            f"{name}: this compaction item was not made by this gateway, or was altered ({exc}); "
            "start a new session, or give the gateway the seal_key that made it",
            param=param, code="invalid_encrypted_content") from None


def summary_request(lowered: Lowered, copy: bool = False) -> Lowered:
    """The chat request that asks the backend for the summary: the conversation as lowered
    for a normal turn, the prompt last, and no tool calls (the tools stay: same prefix). The
    summary is free text: not held to the answer's ``response_format`` (a turn's ``text.format``:
    a json_schema would make it an object of the answer's shape; the format is no part of the
    prompt the backend caches). ``copy``: ``lowered`` stays as it was (its chat is not changed)."""
    chat = {**lowered.chat, "messages": list(lowered.chat["messages"])} if copy else lowered.chat
    chat["messages"].append({"role": "user", "content": COMPACTION_PROMPT})
    chat.pop("response_format", None)
    if "tools" in chat:
        chat["tool_choice"] = "none"
    return Lowered(chat=chat, body=encode(chat), tool_map=lowered.tool_map, client_stream=lowered.client_stream)


# POST /v1/responses/compact: the fields its body may hold (the API's), and those the turn keeps
COMPACT_FIELDS = frozenset({"model", "input", "instructions", "previous_response_id", "prompt_cache_key",
                            "prompt_cache_options", "prompt_cache_retention", "safety_identifier", "service_tier",
                            "image"})
_COMPACT_KEPT = ("model", "instructions", "previous_response_id", "prompt_cache_key", "safety_identifier",
                 "service_tier")


def compact_request(raw: dict) -> dict:
    """The body of ``POST /v1/responses/compact`` as the Responses request of its turn: the
    conversation (``previous_response_id``'s, then ``input``) with the trigger last, not stored,
    not streamed. ``GatewayError``: ``model`` missing, or a field the endpoint does not take."""
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError("model: required (the model that writes the summary)", param="model",
                           code="missing_required_parameter")
    for key in raw:
        if key not in COMPACT_FIELDS:
            raise GatewayError(f"{str(key)[:100]}: not a parameter of /v1/responses/compact", param=str(key)[:100],
                               code="unknown_parameter")
    items = raw.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    elif items is None:
        items = []
    elif not isinstance(items, list):
        raise GatewayError("input: a string or a list of items", param="input", code="invalid_type")
    request = {k: raw[k] for k in _COMPACT_KEPT if raw.get(k) is not None}
    return {**request, "input": [*items, {"type": TRIGGER}], "store": False, "stream": False}


def compacted(response: dict, conversation: list) -> dict:
    """``POST /v1/responses/compact``'s answer from its turn's completed Response: the
    conversation's user messages (as output items: ids, their content as the API's objects hold
    it, listing.py ``as_listed``: a string as one ``input_text``, an ``input_image``'s ``detail``),
    then the sealed compaction item; the turn's usage."""
    suffix = response["id"].removeprefix("resp_")
    out = []
    for item in users(conversation):
        out.append({"id": item.get("id") or f"msg_{suffix}_u{len(out)}", "type": "message", "status": "completed",
                    "role": "user", "content": as_listed(item)["content"]})
    usage = response.get("usage") or {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
                                      "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                                      "total_tokens": 0}
    return {"id": response["id"], "object": "response.compaction", "created_at": response["created_at"],
            "output": [*out, *(i for i in response["output"] if i.get("type") == ITEM)], "usage": usage}


def users(conversation: list) -> list:
    """The compact endpoint's rule: what of a conversation stays beside its compaction item, its
    user messages (as they are)."""
    return [item for item in conversation if isinstance(item, dict) and item.get("role") == "user"
            and item.get("type", "message") == "message"]


@dataclass
class ServerCompaction:
    """A turn's compaction round (``context_management``, its threshold crossed): what the relay
    sends first, and how the answer round's requests are made from its summary. A compaction
    turn (Codex's trigger, the compact endpoint) is that round alone (``answer`` None): its
    summary, read whole, falls back to the next upstream as the round's does, wherever it failed."""

    summary_body: bytes  # the chat request that asks for the summary (the first candidate's)
    # summary -> the answer round's chat request of each candidate, in order (None: the first's);
    # None: the summary is the turn's answer (a compaction turn: Codex's trigger, the compact
    # endpoint; ``CompactionTranslator.summarized``), no answer round runs
    answer: Callable[[str], list] | None
    sealer: Sealer | None
    # the summary request of each fallback candidate, in order (None: the first's): the summary
    # falls back as the answer does (relay/exchange.py ``_walk``)
    fallbacks: tuple[bytes | None, ...] = ()

    def summary(self, i: int) -> bytes:
        """The summary request of the ``i``-th candidate (0: the first)."""
        return (self.fallbacks[i - 1] if i else None) or self.summary_body

    def reader(self, max_event: int = MAX_EVENT, think: str = "auto") -> "SummaryReader":
        """A summary call's reader (``think``: how its candidate's <think> tags are read, think.py)."""
        return SummaryReader(max_event, think)

    def item(self, summary: str) -> dict:
        """The compaction item (without its id: the translator gives it one)."""
        return {"type": ITEM, "encrypted_content": self.sealer.seal(PURPOSE, summary)}

    def work(self, calls: list[tuple[int, "SummaryReader", bool]]) -> Work | None:
        """What the round made the backend do, every candidate's summary call together (``calls``:
        each one's index, reader and whether it failed, in the order they ran): for ``tpm``, each
        call's tokens (``usage.call_tokens``: its usage's total, else the estimate of its request
        and of what it wrote, its reasoning too; 0 for one that failed before any of it came, not
        for one that failed midway: its backend read the prompt); their usages (Responses shape)
        summed for the metrics. None: no call made the backend do anything."""
        tokens, usage = 0, None
        for i, reader, failed in calls:
            written = len(reader.text().encode()) + reader.reasoned  # (a reasoning model's thinking too)
            tokens += call_tokens(reader.chat_usage, len(self.summary(i)), written, failed)
            usage = summed(usage, reader.answer_usage)
        return Work(tokens, usage) if tokens or usage else None


def _type(item) -> str | None:
    return item.get("type") if isinstance(item, dict) else None


class CompactionTranslator(Translator):
    """The translator of a compaction turn: the backend's text becomes one sealed compaction
    item, sent whole when the backend is done. Reasoning and (unrequested) tool calls are
    dropped; everything else (the gateway's own events, failures, usage, the output's bound)
    is a turn's. The one reader of a summary: server-side compaction's is this too
    (``SummaryReader``)."""

    WHAT, IN = "compaction summary", " in the compaction summary"

    def __init__(self, ctx, max_event: int = MAX_EVENT) -> None:
        super().__init__(ctx, max_event)
        self._summary: list[str] = []

    def summary(self) -> str:
        """The summary so far (the think blocks a backend wrote into its text left out)."""
        return "".join(self._summary).strip()

    def _delta(self, kind: Kind, text: str) -> None:
        if kind is Kind.TEXT:
            self._summary.append(text)
            if self.observer is not None:
                self.observer("text", text)

    def _break(self) -> None:
        # (a think block without its <think>: what came as text before its </think> was reasoning,
        # no part of the summary)
        self._summary.clear()

    def on_tool(self, key, call_id, name, args) -> None:
        # tool_choice is "none": a backend that calls a tool anyway is not heard (it still ends
        # a think block, as any other kind of delta does)
        if self._think is not None:
            self._settle_think()

    def summarized(self, item: dict, usage: dict | None) -> bytes:
        """The relay read the summary whole (``SummaryReader``, through the walk of the turn's
        upstreams: relay/exchange.py ``_compact``): ``item`` is its sealed compaction item, ``usage``
        the backend's usage object as it gave it (None: it gave none). The turn's answer is that
        item, completed."""
        if self.phase is not Phase.DONE:
            self._start()
            self._usage_raw, self._usage = usage, None
            self._answer(item)
        return self._flush()

    def _complete(self) -> None:
        self._start()
        if self._think is not None:
            self._think_pieces(self._think.flush())
        summary = self.summary()
        if not summary:
            self._fail("server_error", NO_SUMMARY)
            return
        if self.ctx.sealer is None:
            self._fail("server_error", NO_SEAL)
            return
        self._answer({"type": ITEM, "encrypted_content": self.ctx.sealer.seal(PURPOSE, summary)})

    def _answer(self, item: dict) -> None:
        """The compaction item (without its id) is the answer, sent whole; the turn completes."""
        index = self._alloc_index()
        item = {"id": f"cmp_{self._suffix}_{index}", **item}
        self._emit("response.output_item.added", output_index=index, item=item)
        self._item_done(item, index)
        if self.observer is not None:
            self.observer("end", "\n")
        self.finish_reason = None  # a summary cut at the length limit is still the summary
        self._emit_response("response.completed", "completed")
        self.phase = Phase.DONE
        self._reader.stopped = True


KEPT_SSE = 1 << 20  # the summary's backend stream a flow's record keeps (``SummaryReader.sse``), bytes


class SummaryReader(CompactionTranslator):
    """Reads a summary's stream (server-side compaction's round; a compaction turn's, Codex's
    trigger and the compact endpoint: relay/exchange.py ``_compact``), passing nothing on (``feed``
    returns b""), or the whole ``chat.completion`` of a backend that ignored ``stream``
    (``whole``, as the tool loop's ``ToolLoop.whole``: passing nothing on either; a body that is
    no completion is an error, as a garbage stream): its text, usage, and whether it failed. The
    relay's call reads the answer through it (relay/upstream.py ``Reader``).

    It is the compact endpoint's translator (``CompactionTranslator``) with nobody listening: one
    reader of a summary, so both read a stream alike (issue 22's "one reader" rule): its
    ``<think>`` tags the upstream's way (``think``: think.py; text found to be reasoning after all
    is none of it), the output's bound (translator.py ``output_bound``), the failing finish
    reasons and their codes. A summary is whole only when ended by a finish reason or ``[DONE]``
    (``ended``; else it stopped short: the relay makes that a failure that falls back) without a
    ``failure``: the backend's error object or garbage, or the translator's own (a finish reason
    of failure, an SSE event past ``max_event``, more output than an answer may hold), as the
    gateway's own 502 (it falls back) whose code and words are the ones a compaction turn's
    translator gives the client for the same stream (errors.py's code; the backend's words the
    operator's where they are withheld: ``metadata.raw``). On a failure ``feed`` returns None:
    the call reads no more. Its Response events are made and dropped (a summary's few)."""

    def __init__(self, max_event: int = MAX_EVENT, think: str = "auto") -> None:
        super().__init__(TurnContext(response_id="resp_summary", created_at=0, model="", think=think), max_event)
        self._sse: list[bytes] = []  # what the backend sent, up to KEPT_SSE bytes (``sse``)
        self._kept = 0
        self.reasoned = 0  # bytes of reasoning the backend wrote (what it did: ``ServerCompaction.work``)
        self.failure: UpstreamFailed | None = None  # why what came is no summary (the turn fails with it)
        self.ended = False  # a finish reason or [DONE] came

    # --- what the relay's call reads (relay/upstream.py ``Reader``) ------------------------------

    def feed(self, data: bytes) -> bytes | None:
        self._keep(data)
        super().feed(data)  # (its events are nobody's)
        return b"" if self.failure is None else None

    def whole(self, body: bytes) -> bytes:
        self._keep(body)
        if self.phase is not Phase.DONE:
            self._reader.body(body)
        self._flush()
        return b""

    def finish(self) -> bytes:
        """The body ended: what the parser holds, then a body that held no SSE event, read whole;
        ending short is no ``failure`` here (``ended`` says it: the relay's to fall back from)."""
        if self.phase is not Phase.DONE:
            self._reader.finish()
            if self.phase is not Phase.DONE and self._think is not None:
                self._think_pieces(self._think.flush())
        self._flush()
        return b""

    def text(self) -> str:
        return self.summary()

    @property
    def sse(self) -> bytes:
        """What the backend sent of the summary, as it came (its stream, or the whole JSON of one
        that ignored ``stream``), up to ``KEPT_SSE`` bytes: the flow's record of the compaction
        round (channel.py ``Summarized.sse``, ``Compacted.sse``), as a turn's ``upstream_sse``."""
        return b"".join(self._sse)

    def _keep(self, data: bytes) -> None:
        room = KEPT_SSE - self._kept
        if room > 0 and data:
            piece = data if len(data) <= room else data[:room]
            self._sse.append(piece)
            self._kept += len(piece)

    @property
    def chat_usage(self) -> dict | None:
        """The backend's last usage object, as it gave it (``ServerCompaction.work``)."""
        return self._usage_raw

    def output_tokens(self) -> int:
        usage = self.answer_usage
        return usage["output_tokens"] if usage else 0

    # --- the translator's, as a summary's ------------------------------------------------------

    def _delta(self, kind: Kind, text: str) -> None:
        if kind is Kind.REASONING:
            self.reasoned += len(text.encode())
        else:
            super()._delta(kind, text)

    def _break(self) -> None:
        self.reasoned += len("".join(self._summary).encode())  # (it was reasoning after all)
        super()._break()

    def on_finish(self, reason: str) -> None:
        self.ended = True
        super().on_finish(reason)

    def on_done(self) -> None:
        self.ended = True
        super().on_done()

    def _fail(self, code: str, message: str, detail: str | None = None, cut: bool = True,
              headers: dict | None = None) -> None:
        # (every way a stream fails comes here: the backend's error object, garbage, a finish reason of
        # failure, the bounds; its code and words are the ones the compact endpoint's translator
        # would give the client, the backend's own words, when it withholds them, the operator's)
        if self.failure is None and self.phase is not Phase.DONE:
            error = {"message": message, "type": "upstream_error", "code": code}
            if detail and detail != message:
                error["metadata"] = {"raw": detail}
            self.failure = UpstreamFailed(502, json.dumps({"error": error}).encode(), own=True)
        super()._fail(code, message, detail, cut, headers)

    def _complete(self) -> None:
        """Ended (a finish reason, then the end; ``[DONE]``): the summary is what it holds (the
        relay seals it: ``ServerCompaction.item``)."""
        if self._think is not None:
            self._think_pieces(self._think.flush())
        self.phase = Phase.DONE
        self._reader.stopped = True
