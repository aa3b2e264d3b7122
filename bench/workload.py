"""The benchmark workload: Codex-sized requests whose last user message scripts the demo upstream.

Every request is a real Codex CLI 0.169.0 request (tests/fixtures/codex-0.169.0, ~40 KB: the
system prompt, AGENTS.md context and the tool list) with the text of its last user message
replaced by directives for the demo upstream (resp2chat_io.demo_upstream):

- ``text``: text only (``noreason``, ``words: N``): the first content chunk is the first text token.
- ``reasoning``: R reasoning deltas, then text. The upstream's reasoning is "Thinking about: <the
  last line of the message>", so the last line has R-2 words.
- ``tool``: reasoning, then one ``exec_command`` call whose JSON arguments stream in 8-character
  pieces (``run: echo …``).

All three are sized to the same number of upstream content chunks (~200).

Each variant knows exactly what a client must receive (the joined reasoning, text and argument
strings, and how many deltas they came in), so the bench can count lost events on every path.
The direct and passthrough paths are sent the chat body the addon itself would send upstream
(``begin_turn`` lowering), so all paths put the same bytes on the upstream's wire.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))

from resp2chat_core.lowering import LoweringOptions  # noqa: E402
from resp2chat_core.turn import begin_turn  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "codex-0.169.0" / "01-text-only.json"
ARG_PIECE = 8  # the demo upstream streams tool arguments in pieces of this many characters


def _words(text: str) -> list[str]:
    # The demo upstream's tokenizer: one word with its trailing whitespace per delta.
    return re.findall(r"^\s+|\S+\s*", text)


@dataclass
class Variant:
    name: str
    responses_body: bytes  # POST /v1/responses
    chat_body: bytes  # POST /v1/chat/completions (what the addon sends upstream for it)
    expect: dict  # kind -> list of delta strings, in order ("reasoning", "text", "args")
    slow_ms: int = 0

    @property
    def content_deltas(self) -> int:
        return sum(len(v) for v in self.expect.values())


def _fixture_body() -> dict:
    return json.loads(FIXTURE.read_text())["body"]


def make_variant(kind: str, *, deltas: int, reasoning_words: int, slow_ms: int = 0,
                 nonce: str | None = None) -> Variant:
    """A Codex request whose answer streams about ``deltas`` content chunks.

    text: text only (``noreason``), so the first content chunk is the first text token;
    reasoning: reasoning_words of reasoning, then text; tool: reasoning, then one exec_command call.
    """
    think = " ".join(f"t{i}" for i in range(max(reasoning_words - 2, 1)))
    rest = deltas if kind == "text" else max(deltas - reasoning_words, 1)
    lines = []
    text = args = ""
    if kind in ("text", "reasoning"):
        lines.append(f"words: {rest}")
        text = " ".join(f"word{i}" for i in range(rest))
    elif kind == "tool":
        # {"cmd": "echo xxxx…"} in ARG_PIECE-character pieces: `rest` pieces.
        filler = "abcdefgh" * max(rest - 2, 1)
        lines.append(f"run: echo {filler}")
        args = json.dumps({"cmd": f"echo {filler}"})
    else:
        raise ValueError(kind)
    if kind == "text":
        lines.append("noreason")
    if slow_ms:
        lines.append(f"slow: {slow_ms}")
    if nonce:
        lines.append(f"nonce {nonce}")
    lines.append(think)  # last line: what the upstream "thinks about" (its reasoning text)
    body = _fixture_body()
    last = body["input"][-1]
    assert last["role"] == "user", last
    last["content"] = [{"type": "input_text", "text": "\n".join(lines)}]
    responses_body = json.dumps(body).encode()
    turn = begin_turn(responses_body, LoweringOptions(), "resp_bench", 0)
    expect = {"reasoning": _words(f"Thinking about: {think}") if kind != "text" else [],
              "text": _words(text),
              "args": [args[i:i + ARG_PIECE] for i in range(0, len(args), ARG_PIECE)]}
    return Variant(kind, responses_body, turn.chat_body, {k: v for k, v in expect.items() if v}, slow_ms)


@dataclass
class Turn:
    """One turn of a Codex conversation, as each transport sends it."""

    body: dict  # the whole Responses request (HTTP resends everything)
    new: list  # the items new since the previous turn's answer (the WebSocket sends only these)
    chat_body: bytes  # what the addon sends upstream for it (the direct path sends this)
    expect: dict


def conversation(turns: int, deltas: int) -> list[Turn]:
    """The real Codex request (~40 KB), then ``turns`` turns: each adds a user message asking for
    ``deltas`` words of text and, once answered, the assistant's message. Every transport sends
    the same conversation, so the backend gets the same chat bytes."""
    base = _fixture_body()
    items = base["input"][:-1]
    answer = " ".join(f"word{i}" for i in range(deltas))
    out = []
    for k in range(turns):
        ask = {"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": f"words: {deltas}\nnoreason\nturn {k}"}]}
        items = items + [ask]
        body = {**base, "input": items}
        chat = begin_turn(json.dumps(body).encode(), LoweringOptions(), "resp_bench", 0).chat_body
        out.append(Turn(body, [ask], chat, {"text": _words(answer)}))
        items = items + [{"type": "message", "role": "assistant",
                          "content": [{"type": "output_text", "text": answer}]}]
    return out


LONG_SEPARATORS = (",", ":")  # Codex sends compact JSON, non-ASCII as UTF-8 (serde_json)


@dataclass
class LongTurn:
    """One HTTP turn of a long Codex session: the whole history, resent."""

    responses_body: bytes  # what Codex sends (compact JSON, UTF-8)
    chat_body: bytes  # what the addon sends upstream for it (direct and passthrough send this)
    expect: dict


def _pair(k: int, deltas: int, session: str) -> tuple[dict, dict]:
    ask = {"type": "message", "role": "user",
           "content": [{"type": "input_text", "text": f"words: {deltas}\nnoreason\nsession {session} turn {k}"}]}
    answer = {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": " ".join(f"word{i}" for i in range(deltas))}]}
    return ask, answer


def long_pairs_for(input_kb: float, deltas: int) -> int:
    """How many question/answer pairs put Codex's input (its ~21 KB of developer and user
    messages) at about ``input_kb`` KB."""
    base = len(json.dumps(_fixture_body()["input"][:-1], separators=LONG_SEPARATORS, ensure_ascii=False))
    ask, answer = _pair(0, deltas, "x" * 16)
    per = len(json.dumps([ask, answer], separators=LONG_SEPARATORS)) - 1
    return max(0, round((input_kb * 1024 - base) / per))


def long_session(pairs: int, turns: int, deltas: int, session: str):
    """A Codex session that already holds ``pairs`` question/answer pairs, then ``turns`` more
    turns, each resending the whole history plus the answer to the previous question and a new
    question (as Codex does over HTTP). A generator of ``LongTurn``: the 2.5 MB bodies are made
    one at a time. ``session`` makes its history unlike any other session's after Codex's
    developer messages (the first user message says it), so a gateway's caches start cold."""
    base = _fixture_body()
    items = base["input"][:-1]
    items[2] = {**items[2], "content": [{"type": "input_text", "text": f"session {session}\n"
                                         + items[2]["content"][0]["text"]}]}
    for k in range(pairs):
        items += _pair(k, deltas, session)
    for t in range(turns):
        ask, answer = _pair(pairs + t, deltas, session)
        body = json.dumps({**base, "input": items + [ask]}, separators=LONG_SEPARATORS, ensure_ascii=False).encode()
        chat = begin_turn(body, LoweringOptions(), "resp_bench", 0).chat_body
        yield LongTurn(body, chat, {"text": _words(answer["content"][0]["text"])})
        items += [ask, answer]
