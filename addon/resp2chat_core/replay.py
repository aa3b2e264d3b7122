"""Replay cache: completed answers keyed by the SHA-256 of the exact client request.

An identical request (same bytes, same upstreams serving the same models, same settings, same
owner) is answered from memory with the very answer the client got the first time, its response
id and its own ``created_at``/``completed_at`` swapped for fresh ones (item and call ids derive
from the response id, so they change with it); what the request referred to must still be
there (addons/http_turns.py ``_answer_hit``). Only answers that completed are kept. FIFO with a fixed number of entries and a per-entry size cap, so memory is
bounded whatever the traffic. This file says what an entry and its key are; the caches that
hold them (this process's memory, or Redis) are resp2chat_io's (store.py, redis_state.py).

Offline replay (``--server-replay``) is here too: ``rerun_key`` matches a rerun of a recorded
Codex session to its recording although tool output carries wall times (see ``rerun_key``).
"""

from __future__ import annotations

import hashlib
import json
import re

MAX_ENTRY_BYTES = 4 << 20


def replay_key(context: str, body_digest: bytes, owner: str) -> str:
    """The key of a request body by its SHA-256 (``body_digest``: requestbody.py, which hashes
    only what a long conversation's body adds to the one before). ``context``: what else decides
    the answer (upstream URL, effective lowering settings); ``owner`` (owner.py): whose answer it
    is, served to nobody else."""
    return hashlib.sha256(f"owner {owner}\n{context}\n".encode() + body_digest).hexdigest()


def pack(response_id: str, created_at: int, body: bytes, *, stream: bool, store: bool) -> bytes:
    """An entry: the answer, and what a hit needs to know without parsing the request again."""
    return f"{response_id} {created_at} {int(stream)} {int(store)}\n".encode() + body


def entry_flags(entry: bytes) -> tuple[bool, bool]:
    """(the client streamed, the client wants the response stored) of an entry's request."""
    fields = entry[:entry.index(b"\n")].split(b" ")
    return fields[2] == b"1", fields[3] == b"1"


# The Response's own times, where response.py writes them, just after its id (an SSE answer's
# compact JSON, or a JSON body's): only these, never a number the request set that the Response
# echoes (a tool's schema, a text format's may hold "created_at"/"completed_at" members).
# Compiled once: the id is matched as a group and compared in the replacement (a pattern per
# response id would be a new compile on every hit, churning ``re``'s cache).
_TIMES = re.compile(rb'("id": ?"resp_([^"\\]*)", ?"object": ?"response", ?"created_at": ?)[0-9]+'
                    rb'(, ?"status": ?"[a-z_]+", ?"completed_at": ?)([0-9]+|null)')


def unpack_fresh(entry: bytes, response_id: str, created_at: int) -> bytes:
    """The stored answer under a new response id and creation time (``completed_at`` too: a
    cached answer completes as it is created)."""
    head, _, body = entry.partition(b"\n")
    old_id = head.decode().split(" ")[0]
    old, new = old_id.removeprefix("resp_").encode(), response_id.removeprefix("resp_").encode()
    body = body.replace(old, new).replace(old[:16], new[:16])  # item ids, then generated call ids
    stamp = b"%d" % created_at

    def fresh(m: re.Match) -> bytes:
        if m[2] != new:  # (another response's, echoed)
            return m[0]
        return m[1] + stamp + m[3] + (m[4] if m[4] == b"null" else stamp)
    return _TIMES.sub(fresh, body)


_SEALED = re.compile(rb'"encrypted_content": ?"(r2c1\.[A-Za-z0-9_-]*)"')  # (seal.py SEALED_PREFIX)


def opens_here(answer: bytes, unseal, purposes: tuple[str, ...]) -> bool:
    """Whether every ``encrypted_content`` the gateway sealed in an answer opens with this
    gateway's key (``unseal``: ``Sealer.unseal``), for one of ``purposes``: a recorded answer
    sealed under another key is no answer of this gateway (its client could not send it back)."""
    def opens(token: str) -> bool:
        for purpose in purposes:
            try:
                unseal(purpose, token)
                return True
            except ValueError:  # (seal.SealError)
                pass
        return False
    return all(opens(m[1].decode()) for m in _SEALED.finditer(answer))


# --- offline replay that matches a rerun (``--server-replay``; addons/server_replay.py) -------

# What differs between two runs of the same Codex session, blanked before two chat requests are
# compared: Codex's exec tool output starts with a chunk id and the command's wall time, and its
# environment context names today's date. Everything else must be equal, byte for byte.
VARIES_IN_TOOL_OUTPUT = (
    (re.compile(r"^Chunk ID: [0-9A-Za-z]+$", re.M), "Chunk ID: _"),
    (re.compile(r"^Wall time: [0-9]+(?:\.[0-9]+)? seconds$", re.M), "Wall time: _ seconds"),
)
VARIES_IN_MESSAGES = ((re.compile(r"<current_date>[^<\n]*</current_date>"), "<current_date>_</current_date>"),)


def _blank(text: str, rules) -> str:
    for pattern, placeholder in rules:
        text = pattern.sub(placeholder, text)
    return text


def rerun_key(chat_body: bytes, kind: str = "") -> str:
    """What a recorded chat request and a rerun's must share to be the same request: the whole
    request, with ``VARIES_IN_TOOL_OUTPUT`` blanked in tool messages and ``VARIES_IN_MESSAGES``
    in every text. (Not valid JSON: hashed as it is, so nothing else can change.) ``kind`` keeps
    apart answers of another kind to the same request (a WebSocket warm-up's)."""
    prefix = kind.encode() + b"\n"
    try:
        chat = json.loads(chat_body)
    except (ValueError, UnicodeDecodeError):
        return hashlib.sha256(prefix + chat_body).hexdigest()
    messages = chat.get("messages") if isinstance(chat, dict) else None
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        rules = VARIES_IN_MESSAGES + (VARIES_IN_TOOL_OUTPUT if message.get("role") == "tool" else ())
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = _blank(content, rules)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = _blank(part["text"], rules)
    return hashlib.sha256(prefix + json.dumps(chat, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


class Recordings:
    """Recorded answers by ``rerun_key``, taken in recording order (``reuse``: kept for more)."""

    def __init__(self) -> None:
        self._answers: dict[str, list] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._answers.values())

    def add(self, chat_body: bytes, answer, kind: str = "") -> None:
        self._answers.setdefault(rerun_key(chat_body, kind), []).append(answer)

    def take(self, chat_body: bytes, reuse: bool = False, kind: str = ""):
        if not self._answers:
            return None
        key = rerun_key(chat_body, kind)
        found = self._answers.get(key)
        if not found:
            return None
        if reuse:
            return found[0]
        answer = found.pop(0)
        if not found:
            del self._answers[key]
        return answer
